"""pytest options shared by the suites: ``--soak`` turns the short reliability runs of CI
into long ones and prints the totals at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import crashsim
import kvmem
import testutil


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     help="long crash/load/fuzz runs (thousands of kills, minutes of load)")


def pytest_configure(config: pytest.Config) -> None:
    # Read at import time by the fuzz tests, whose example counts are fixed by decorators
    # (test modules are imported after this hook).
    if config.getoption("--soak"):
        os.environ["KVMEM_TEST_SOAK"] = "1"  # for child processes
        testutil.SOAK = True  # testutil was imported before this ran


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test() -> Iterator[None]:
    yield
    while testutil.LIVE_CHILDREN:
        child = testutil.LIVE_CHILDREN.pop()
        if child.proc.poll() is None:
            child.kill()


@pytest.fixture
def clock() -> testutil.Clock:
    """The clock of ``store``: a test moves time by hand."""
    return testutil.Clock()


@pytest.fixture
def store(tmp_path: Path, clock: testutil.Clock) -> Iterator[kvmem.Store]:
    """A Store on a new file in ``tmp_path``, default settings, on ``clock``."""
    with kvmem.Store.open(tmp_path / "kv.db", config=kvmem.Config.build(environ={}),
                          clock=clock) as opened:
        yield opened


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if testutil.POWERLOSS_REPORTS:
        terminalreporter.write_sep("-", "power loss (crashsim.py: replayed system calls)")
        for line in crashsim.table(testutil.POWERLOSS_REPORTS):
            terminalreporter.write_line(line)
    totals = testutil.DURABILITY_TOTALS
    if any(totals.values()):
        terminalreporter.write_sep("-", "reliability totals")
        terminalreporter.write_line(", ".join(f"{name}={value}" for name, value in totals.items()))
