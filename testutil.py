"""Helpers shared by the test suites: child processes driven by the lines they print."""

from __future__ import annotations

import hashlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
LIVE_CHILDREN: list[Child] = []  # killed after each test by conftest.py, whatever happened


def child_env(**extra: str) -> dict[str, str]:
    """The test process's environment with this directory importable, KVMEM_* cleared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMEM_")}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Child:
    """A Python child process whose stdout lines are collected by a reader thread, so a
    test waits on a line (a condition), never on a fixed sleep."""

    def __init__(self, code: str, *args: str, env: dict[str, str] | None = None,
                 stdin: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True, env=env or child_env(), cwd=HERE,
        )
        self.lines: list[str] = []
        self._finished = False
        LIVE_CHILDREN.append(self)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr: list[str] = []
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """Wait for a line starting with ``prefix``; fail with stderr if it never comes."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r} within {timeout}s; got {self.lines[-5:]}"
                                     f"\nstderr: {self.drain_stderr()}") from None
            if line is None:
                raise AssertionError(f"child exited (rc={self.proc.wait()}) before {prefix!r}; "
                                     f"got {self.lines[-5:]}\nstderr: {self.drain_stderr()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def kill(self) -> list[str]:
        """SIGKILL, then return every line the child printed (all of them, read to EOF)."""
        self.proc.kill()
        return self._finish()

    def _finish(self) -> list[str]:
        """After exit: collect the rest of stdout once (the reader's ``None`` ends it)."""
        self.proc.wait()
        self._reader.join()
        if not self._finished:
            self._finished = True
            while (line := self._queue.get()) is not None:
                self.lines.append(line)
        self.drain_stderr()
        return self.lines

    def wait(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._finish()
        return rc

    def drain_stderr(self) -> str:
        if self.proc.poll() is not None:
            self._err_reader.join(timeout=5)
        return self.stderr


def file_digest(path: str) -> str:
    """sha256 of a file this process has no connection to."""
    with open(path, "rb") as fp:
        return hashlib.sha256(fp.read()).hexdigest()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, os.path.join(HERE, "kvmem.py"), *args],
                          capture_output=True, text=True, env=env or child_env(), timeout=120)


def start_all(children: Sequence[Child], ready: str = "ready") -> None:
    for child in children:
        child.expect(ready)


# Rows of the power-loss table (test_powerloss.py), printed at the end of a run.
POWERLOSS_REPORTS: list[Any] = []

SOAK = os.environ.get("KVMEM_TEST_SOAK") == "1"  # set by conftest.py for --soak

# Totals of the reliability suite, printed at the end of a run (conftest.py).
DURABILITY_TOTALS: dict[str, int] = {
    "kills": 0, "acknowledged_writes": 0, "acknowledged_write_checks": 0, "lost": 0,
    "integrity_failures": 0,
    "partial_batches_visible": 0, "fault_cases": 0, "fuzz_cases": 0,
}
