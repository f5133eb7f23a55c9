"""The project's standing rules that a tool can check: ruff and mypy stay clean."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=HERE, capture_output=True,
                          text=True, timeout=300)


def test_ruff_clean() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_clean() -> None:
    result = _run("mypy")  # files and strictness come from pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr


def test_license_file_matches_the_package_metadata() -> None:
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as fp:
        assert 'license = { text = "MIT" }' in fp.read()
    with open(os.path.join(HERE, "LICENSE"), encoding="utf-8") as fp:
        assert fp.readline().strip() == "MIT License"
