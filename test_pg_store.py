"""kvmem_pg.PgStore on a real PostgreSQL (pgtest.py starts one per module): the Store
behaviours it has so far, compare-and-set across two pools, its errors and migrations.

Where test_store.py's Store tests only use what PgStore has (set, get, delete), they run
here unchanged: this module's ``store`` fixture, a PgStore, replaces conftest's for them.
The suite moves to one fixture parametrized over both backends once PgStore has list,
search and prune (docs/postgres-design.md, section 6)."""

from __future__ import annotations

import inspect
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import kvmem
import pgtest
import test_store
from testutil import Clock, run_threads

try:
    import psycopg
    import psycopg.conninfo
    import psycopg.errors
    import psycopg_pool

    import kvmem_pg
except ImportError:  # no psycopg: _require_postgres skips every test (fails it in CI)
    pass

CONFIG = kvmem.Config.build(environ={})


@pytest.fixture(autouse=True)
def _require_postgres() -> None:
    pgtest.require_postgres()


@pytest.fixture(scope="module")
def pg_server() -> Iterator[pgtest.PostgresServer]:
    pgtest.require_postgres()
    with pgtest.postgres_server() as server:
        yield server


def _schema_dsn(dsn: str, schema: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, options=f"-csearch_path={schema}")


@pytest.fixture
def pg_dsn(pg_server: pgtest.PostgresServer) -> Iterator[str]:
    """A DSN whose tables live in a fresh schema, dropped at the end: every test migrates
    an empty database of its own."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # a name made here, not input
    yield _schema_dsn(pg_server.dsn, schema)
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def store(pg_dsn: str, clock: Clock) -> Iterator[kvmem_pg.PgStore]:
    with kvmem_pg.PgStore.open(pg_dsn, config=CONFIG, clock=clock) as opened:
        yield opened


# test_store.py's assertions, on PgStore.
test_set_get_round_trip = test_store.test_set_get_round_trip
test_compare_and_set = test_store.test_compare_and_set
test_delete = test_store.test_delete


@pytest.mark.parametrize("method", ["set", "get", "delete", "reinforce", "apply", "open"])
def test_same_signatures_as_store(method: str) -> None:
    ours = inspect.signature(getattr(kvmem_pg.PgStore, method))
    theirs = inspect.signature(getattr(kvmem.Store, method))
    if method == "open":  # the DSN for the path; no SQLite background threads
        assert ours.parameters["config"] == theirs.parameters["config"]
        assert ours.parameters["clock"] == theirs.parameters["clock"]
        return
    assert ours == theirs


def test_reinforce(store: kvmem_pg.PgStore, clock: Clock) -> None:
    created = store.set("k", "v", half_life_seconds=10)
    clock.advance(100)
    reinforced = store.reinforce("k")
    expected = kvmem.reinforced_strength(1.0, created.last_reinforced_at, 10, clock.now)
    assert reinforced.strength == pytest.approx(expected) and expected < 1.0
    assert reinforced.version == 1  # a reinforce changes no content
    assert reinforced.last_reinforced_at == clock.now
    assert store.get("k") == reinforced
    with pytest.raises(kvmem.NotFoundError) as info:
        store.reinforce("absent")
    assert info.value.code == "not_found"


def _rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM memories").fetchone()
    assert row is not None
    return int(row[0])


def test_ttl_expiry_is_invisible_at_once(store: kvmem_pg.PgStore, clock: Clock,
                                         pg_dsn: str) -> None:
    store.set("short", "gone soon", ttl_seconds=10)
    store.set("long", "stays", ttl_seconds=1000)
    clock.advance(9.9)
    assert store.get("short") is not None
    clock.advance(0.2)
    assert store.get("short") is None
    assert store.get("long") is not None
    assert _rows(pg_dsn) == 2  # still stored until prune; get never writes
    with pytest.raises(kvmem.NotFoundError):
        store.reinforce("short")
    with pytest.raises(kvmem.VersionConflictError) as info:
        store.set("short", "x", if_version=1)
    assert info.value.current_version == 0  # expired = absent
    assert store.set("short", "again", if_version=0).version == 1
    clock.advance(1000)
    assert store.get("long") is None
    assert store.delete("long") is False  # an expired memory is not found...
    assert store.get("short") is not None  # ...and the second life of 'short' has no TTL


def test_bad_input_is_refused_before_the_database(store: kvmem_pg.PgStore,
                                                  pg_dsn: str) -> None:
    for call in (lambda: store.set("", 1), lambda: store.set("k", float("nan")),
                 lambda: store.set("k", 1, ttl_seconds=-1), lambda: store.get("k\n"),
                 lambda: store.delete("k", namespace="a b")):
        with pytest.raises(kvmem.InvalidInputError):
            call()
    assert _rows(pg_dsn) == 0


def test_a_held_key_is_busy_after_the_deadline(pg_dsn: str, clock: Clock) -> None:
    config = kvmem.Config.build(environ={"KVMEM_BUSY_TIMEOUT_MS": "200"})
    with kvmem_pg.PgStore.open(pg_dsn, config=config, clock=clock) as store:
        store.set("k", 1)
        with psycopg.connect(pg_dsn) as other:  # a transaction holds the row
            other.execute("SELECT 1 FROM memories WHERE key = 'k' FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(kvmem.BusyError) as info:
                store.set("k", 2)
            assert info.value.code == "busy"
            assert 0.15 < time.monotonic() - started < 5
            assert store.set("other", 1).version == 1  # other keys are not held
        assert store.set("k", 3, if_version=1).version == 2  # the busy write left nothing


def test_two_pools_count_exactly_the_acknowledged_increments(pg_dsn: str) -> None:
    """Two stores (two pools, as two servers on two hosts) increment one counter by
    read, then set with if_version, retrying on conflict."""
    per_thread, threads = 25, 6
    stores = [kvmem_pg.PgStore.open(pg_dsn, config=CONFIG, pool_size=3) for _ in range(2)]
    try:
        stores[0].set("counter", 0)
        acknowledged = [0] * threads
        conflicts = [0] * threads

        def increment(n: int) -> None:
            store = stores[n % 2]
            while acknowledged[n] < per_thread:
                current = store.get("counter")
                assert current is not None
                try:
                    store.set("counter", current.value + 1, if_version=current.version)
                except kvmem.VersionConflictError:
                    conflicts[n] += 1
                    continue
                acknowledged[n] += 1

        assert run_threads(increment, threads) == []
        final = stores[1].get("counter")
        assert final is not None
        assert final.value == sum(acknowledged) == per_thread * threads
        assert final.version == 1 + sum(acknowledged)
        assert sum(conflicts) > 0  # the threads did race
    finally:
        for store in stores:
            store.close()


def test_creating_one_key_from_two_pools_never_collides(pg_dsn: str) -> None:
    """if_version=0 (create only) from many threads on two pools: exactly one wins each
    key, the others get a version conflict (not a unique violation, not a 5xx)."""
    stores = [kvmem_pg.PgStore.open(pg_dsn, config=CONFIG, pool_size=4) for _ in range(2)]
    wins: list[str] = []
    lock = threading.Lock()
    try:
        def create(n: int) -> None:
            for i in range(20):
                try:
                    stores[n % 2].set(f"k{i}", n, if_version=0)
                except kvmem.VersionConflictError as exc:
                    assert exc.current_version == 1
                    continue
                with lock:
                    wins.append(f"k{i}")

        assert run_threads(create, 8) == []
        assert sorted(wins) == sorted(f"k{i}" for i in range(20))
    finally:
        for store in stores:
            store.close()


def test_migrations_run_once_and_refuse_a_newer_schema(pg_dsn: str) -> None:
    stores = []
    errors = run_threads(lambda n: stores.append(kvmem_pg.PgStore.open(pg_dsn, config=CONFIG)), 4)
    for store in stores:
        store.close()
    assert errors == []
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM kvmem_version").fetchall() == [
            (kvmem_pg.SCHEMA_VERSION,)]
        secrets_rows = conn.execute("SELECT count(*) FROM kvmem_meta").fetchone()
        assert secrets_rows == (1,)
        conn.execute("UPDATE kvmem_version SET version = 99")
    with pytest.raises(kvmem.SchemaTooNewError) as info:
        kvmem_pg.PgStore.open(pg_dsn, config=CONFIG)
    assert info.value.code == "schema_too_new"
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT version FROM kvmem_version").fetchall() == [(99,)]


@pytest.mark.parametrize(("error", "committing", "code"), [
    ("DiskFull", False, "storage_full"),
    ("ReadOnlySqlTransaction", False, "read_only"),  # a standby
    ("SerializationFailure", False, "busy"),
    ("DeadlockDetected", False, "busy"),
    ("LockNotAvailable", False, "busy"),  # lock_timeout
    ("AdminShutdown", False, "busy"),  # the server went away before COMMIT: nothing written
    ("ConnectionFailure", False, "busy"),
    ("AdminShutdown", True, "storage_error"),  # during COMMIT: the outcome is unknown
    ("ConnectionFailure", True, "storage_error"),
    ("UniqueViolation", False, "storage_error"),
])
def test_errors_map_by_sqlstate(error: str, committing: bool, code: str) -> None:
    mapped = kvmem_pg._pg_error(getattr(psycopg.errors, error)("m"), "here",
                                committing=committing)
    assert mapped.code == code and str(mapped).startswith("here: ")
    if committing:
        assert "outcome unknown" in str(mapped)


def test_a_closed_connection_and_a_pool_timeout_are_busy() -> None:
    closed = psycopg.OperationalError("the connection is closed")  # psycopg's own: no SQLSTATE
    assert kvmem_pg._pg_error(closed, "here").code == "busy"
    assert "outcome unknown" in str(kvmem_pg._pg_error(closed, "here", committing=True))
    assert kvmem_pg._pg_error(psycopg_pool.PoolTimeout("x"), "here").code == "busy"


@pytest.mark.parametrize("level", ["normal", "off"])
def test_synchronous_levels_without_an_honest_mapping_are_refused(pg_dsn: str,
                                                                   level: str) -> None:
    config = kvmem.Config.build(environ={"KVMEM_SYNCHRONOUS": level})
    with pytest.raises(kvmem.ConfigError, match="synchronous_commit=off"):
        kvmem_pg.PgStore.open(pg_dsn, config=config)


def test_connections_use_synchronous_commit_on(store: kvmem_pg.PgStore) -> None:
    assert store.server_settings["synchronous_commit"] == "on"
    assert store.server_settings["fsync"] == "on"


def test_a_stopped_server_is_busy_and_the_store_recovers(clock: Clock) -> None:
    """PostgreSQL killed (no shutdown checkpoint): calls fail with busy, nothing
    acknowledged is lost, and the same store works again once the server is back."""
    pgtest.require_postgres()
    config = kvmem.Config.build(environ={"KVMEM_BUSY_TIMEOUT_MS": "300"})
    with pgtest.postgres_server() as server, \
            kvmem_pg.PgStore.open(server.dsn, config=config, clock=clock) as store:
        store.set("acknowledged", "before the crash")
        server.kill_immediately()
        calls: list[Callable[[], object]] = [lambda: store.set("k", 1),
                                             lambda: store.get("acknowledged")]
        for call in calls:
            with pytest.raises(kvmem.BusyError):
                call()
        server.restart()
        deadline = time.monotonic() + 30
        got: Any = None
        while got is None:
            try:
                got = store.get("acknowledged")
            except kvmem.BusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling for the pool to reconnect
        assert got.value == "before the crash"
        assert store.set("after", 1).version == 1
