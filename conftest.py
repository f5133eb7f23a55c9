"""pytest options and fixtures shared by the suites: ``--soak`` turns the short reliability
runs of CI into long ones and prints the totals at the end.

Both backends: a test whose fixtures include ``backend`` (``store`` and ``db`` do) runs
once on an SQLite file and once on PostgreSQL (a fresh schema of one server that the
session starts, ``pgtest.py``), with the same assertions.  ``@pytest.mark.backends("sqlite")``
keeps a test on one backend (SQLite's files, locks and checkpoints have no counterpart on
PostgreSQL).  Without PostgreSQL its runs skip with the reason; in CI
(``KVMEM_TEST_REQUIRE_POSTGRES=1``) they fail."""

from __future__ import annotations

import os
import secrets
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import crashsim
import kvmem
import kvmem_cli
import pgtest
import testutil

BACKENDS = ("sqlite", "postgresql")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     help="long crash/load/fuzz runs (thousands of kills, minutes of load)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run on these backends only "
                            "(default: sqlite and postgresql)")
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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("backend", marker.args if marker else BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """"sqlite" or "postgresql" (``pytest_generate_tests``)."""
    return str(request.param)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgtest.PostgresServer]:
    """One PostgreSQL for the session, started on first use."""
    pgtest.require_postgres()
    with pgtest.postgres_server() as server:
        yield server


def schema_url(dsn: str, schema: str) -> str:
    """``dsn`` (a URL) whose tables live in ``schema``: a --db for a server or the CLI."""
    options = urllib.parse.quote(f"-csearch_path={schema}", safe="")
    return f"{dsn}{'&' if '?' in dsn else '?'}options={options}"


@pytest.fixture
def pg_dsn(pg_server: pgtest.PostgresServer) -> Iterator[str]:
    """A postgresql:// URL whose tables live in a fresh schema, dropped at the end: each
    test migrates an empty database of its own."""
    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # a name made here, not input
    yield schema_url(pg_server.dsn, schema)
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def db(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A new database's ``--db``: a file in ``tmp_path``, or a fresh PostgreSQL schema."""
    if backend == "postgresql":
        pgtest.require_postgres()
        return str(request.getfixturevalue("pg_dsn"))
    return str(tmp_path / "kv.db")


@pytest.fixture
def store(db: str, clock: testutil.Clock) -> Iterator[Any]:
    """A store on ``db`` (``kvmem_cli.open_store``: a kvmem.Store or a kvmem_pg.PgStore),
    default settings, on ``clock``."""
    config = kvmem.Config.build(environ={}, flags={"db": db})
    with kvmem_cli.open_store(config, role="library", clock=clock) as opened:
        yield opened


@pytest.fixture
def store_with(db: str, clock: testutil.Clock) -> Iterator[Callable[..., Any]]:
    """``store_with(prune_batch="7", ...)``: a store on ``db`` with these settings (flag
    names, raw strings), on ``clock``; every one opened is closed at the end."""
    opened: list[Any] = []

    def open_store(**flags: str) -> Any:
        config = kvmem.Config.build(environ={}, flags={"db": db, **flags})
        opened.append(kvmem_cli.open_store(config, role="library", clock=clock))
        return opened[-1]

    yield open_store
    for one in opened:
        one.close()


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
