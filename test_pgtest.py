"""The test PostgreSQL of pgtest.py: it starts as the tests need it, is durable as kvmem
will promise on it, and survives an immediate stop (a crash) with its committed rows."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import pgtest


@pytest.fixture
def server() -> Iterator[pgtest.PostgresServer]:
    pgtest.require_postgres()
    with pgtest.postgres_server() as started:
        yield started


def test_starts_on_loopback_with_commits_durable(server: pgtest.PostgresServer) -> None:
    import psycopg

    assert server.dsn == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    with psycopg.connect(server.dsn) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        assert conn.info.encoding == "utf-8"
    assert server.settings("synchronous_commit", "fsync", "full_page_writes",
                           "listen_addresses", "lc_collate") == {
        "synchronous_commit": "on", "fsync": "on", "full_page_writes": "on",
        "listen_addresses": "127.0.0.1", "lc_collate": "C"}
    if os.geteuid() == 0:  # initdb refuses root: the server runs as the postgres account
        with psycopg.connect(server.dsn) as conn:  # open: its backend process lives
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            owner = os.stat(f"/proc/{row[0]}").st_uid
        assert owner == os.stat(server.data).st_uid != 0


def test_immediate_stop_keeps_committed_rows(server: pgtest.PostgresServer) -> None:
    import psycopg

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'committed')")
    uncommitted = psycopg.connect(server.dsn)
    uncommitted.execute("INSERT INTO t VALUES (2, 'in flight')")  # never committed
    server.kill_immediately()
    assert not server.running()
    with pytest.raises(psycopg.OperationalError):
        uncommitted.execute("SELECT 1")
    uncommitted.close()
    server.restart()
    with psycopg.connect(server.dsn) as conn:
        assert conn.execute("SELECT id, v FROM t ORDER BY id").fetchall() == [(1, "committed")]


def test_stops_and_removes_its_directory() -> None:
    pgtest.require_postgres()
    with pgtest.postgres_server() as server:
        base, dsn = server.base, server.dsn
        assert server.running()
    assert not os.path.exists(base)
    import psycopg

    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)


def test_missing_postgres_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgtest, "find_bindir", lambda: None)
    assert "initdb" in (pgtest.postgres_problem() or "")
    monkeypatch.delenv(pgtest.REQUIRE_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        pgtest.require_postgres()
    monkeypatch.setenv(pgtest.REQUIRE_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match="KVMEM_TEST_REQUIRE_POSTGRES=1"):
        pgtest.require_postgres()
