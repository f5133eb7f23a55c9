"""What only kvmem_pg.PgStore has, on a real PostgreSQL (conftest's session server):
compare-and-set across two pools, its errors by SQLSTATE, migrations, the search columns
and their agreement with SQLite's ranking, the server killed and restarted.

The Store's behaviours shared with SQLite are test_store.py's and test_search.py's tests,
which run on both backends (conftest.py parametrizes their ``store``)."""

from __future__ import annotations

import inspect
import io
import json
import os
import random
import shlex
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import kvmem
import kvmem_cli
import pgtest
from testutil import HERE, Clock, child_env, run_threads, wait_until

try:
    import psycopg
    import psycopg.conninfo
    import psycopg.errors
    import psycopg_pool

    import kvmem_pg
except ImportError:  # no psycopg: _require_postgres skips every test (fails it in CI)
    pass

CONFIG = kvmem.Config.build(environ={})


# PostgreSQL's own tests: conftest's ``store`` is a PgStore here, on a fresh schema
# (``pg_dsn``) of the session's server.
pytestmark = pytest.mark.backends("postgresql")


@pytest.fixture(autouse=True)
def _require_postgres() -> None:
    pgtest.require_postgres()


SHARED = ("set", "delete", "reinforce", "batch", "list", "search", "import_", "forget",
          "interrupt")  # kvmem.BaseStore's, written once


@pytest.mark.parametrize("method", ["get", "apply", "namespaces", "export", "prune", "stats",
                                    "health", "close", "open", *SHARED])
def test_same_api_as_store(method: str) -> None:
    """The shared methods are BaseStore's own on both (one body); the others have
    kvmem.Store's signatures."""
    if method in SHARED:
        assert getattr(kvmem_pg.PgStore, method) is getattr(kvmem.BaseStore, method) \
            is getattr(kvmem.Store, method)
        return
    assert method in vars(kvmem_pg.PgStore) and method in vars(kvmem.Store)
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


def _deadlocks(dsn: str) -> int:
    """PostgreSQL's count of deadlocks detected in this database (a new connection: a
    session caches the statistics it read)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT deadlocks FROM pg_stat_database"
                           " WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row[0])


def test_batch_locks_its_keys_in_one_order(pg_dsn: str) -> None:
    """Batches over the same keys in opposite orders, from two pools at once: no deadlock
    happens (PostgreSQL counted none: it would also have been retried, hiding it), and
    every batch applied all its ops."""
    deadlocks = _deadlocks(pg_dsn)
    stores = [kvmem_pg.PgStore.open(pg_dsn, config=CONFIG, pool_size=4) for _ in range(2)]
    keys = [f"k{i}" for i in range(8)]
    try:
        def run(n: int) -> None:
            order = keys if n % 2 else keys[::-1]
            for _ in range(15):
                stores[n % 2].batch([{"op": "set", "key": k, "value": n} for k in order])

        assert run_threads(run, 6) == []
        values = {m.key: m.value for m in stores[0].list().items}
        assert set(values) == set(keys) and len(set(values.values())) == 1  # one batch last
        assert {m.version for m in stores[0].list().items} == {6 * 15}
    finally:
        for store in stores:
            store.close()
    time.sleep(0.2)  # the closed sessions' statistics reach the shared counters
    assert _deadlocks(pg_dsn) == deadlocks


def test_batch_op_objects_keep_their_namespace(store: kvmem_pg.PgStore) -> None:
    ops: list[kvmem.SetOp | kvmem.DeleteOp] = [
        kvmem.SetOp.parse({"value": 1}, CONFIG, key="k", namespace="a"),
        kvmem.DeleteOp.parse({}, CONFIG, key="k", namespace="b")]
    assert [r["op"] for r in store.batch(ops, namespace="ignored")] == ["set", "delete"]
    assert store.get("k", namespace="a") is not None
    with pytest.raises(kvmem.InvalidInputError, match="cannot be in a batch"):
        store.batch([kvmem.ReinforceOp.parse({}, CONFIG, key="k", namespace="a")])  # type: ignore[list-item]
    with pytest.raises(kvmem.InvalidInputError, match="at most"):
        store.batch([{"op": "delete", "key": "k"}] * (CONFIG.max_batch_ops + 1))


def test_list_filters_archived_and_time_bounds(store: kvmem_pg.PgStore, clock: Clock,
                                               pg_dsn: str) -> None:
    store.set("a", 1, tags=["x", "y"])
    clock.advance(10)
    middle = clock.now
    store.set("b", 2, tags=["y"])
    clock.advance(10)
    store.set("c", 3, tags=["x", "y", "z"], ttl_seconds=5)
    store.set("d", 4, namespace="other")
    assert [m.key for m in store.list(tags=["x", "y"]).items] == ["a", "c"]
    assert [m.key for m in store.list(tag="z", tags=["x"]).items] == ["c"]
    assert [m.key for m in store.list(updated_after=middle - 1).items] == ["b", "c"]
    assert [m.key for m in store.list(updated_before=middle + 1).items] == ["a", "b"]
    assert [m.key for m in store.list(updated_after=kvmem.rfc3339(middle - 1),
                                      updated_before=kvmem.rfc3339(middle + 1)).items] == ["b"]
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE memories SET archived = 1 WHERE key = 'a'")
    assert [m.key for m in store.list().items] == ["b", "c"]
    assert [m.key for m in store.list(archived=True).items] == ["a"]
    assert store.namespaces() == [{"namespace": "default", "live": 2, "archived": 1},
                                  {"namespace": "other", "live": 1, "archived": 0}]
    clock.advance(6)  # c expires: invisible to list and not counted
    assert [m.key for m in store.list(tag="x").items] == []
    assert store.namespaces()[0] == {"namespace": "default", "live": 1, "archived": 1}
    for bad in ({"archived": 1}, {"limit": 0}, {"limit": kvmem.MAX_LIST_LIMIT + 1},
                {"cursor": "garbage"}, {"tags": ["a b\n"]}, {"updated_after": "yesterday"}):
        with pytest.raises(kvmem.InvalidInputError):
            store.list(**bad)


def test_a_cursor_of_another_database_is_refused(store: kvmem_pg.PgStore,
                                                 tmp_path: Path) -> None:
    for i in range(3):
        store.set(f"k{i}", i)
    cursor = store.list(limit=1).next_cursor
    assert cursor is not None
    assert [m.key for m in store.list(limit=5, cursor=cursor).items] == ["k1", "k2"]
    with kvmem.Store.open(tmp_path / "kv.db", config=CONFIG) as sqlite_store:
        for i in range(3):
            sqlite_store.set(f"k{i}", i)
        with pytest.raises(kvmem.InvalidInputError, match="cursor"):
            sqlite_store.list(cursor=cursor)
        other = sqlite_store.list(limit=1).next_cursor
    with pytest.raises(kvmem.InvalidInputError, match="cursor"):
        store.list(cursor=other)


def _sqlite_fixture_memories(store: kvmem.Store, clock: Clock) -> None:
    """Memories using every field in its odd cases: JSON that jsonb would rewrite, floats
    that need all 17 digits, TTLs, decay, archived, reinforced, Unicode, two namespaces."""
    store.set("plain", "text", tags=["t1", "t2", "ünï"])
    store.set("json", {"deep": [1, {"x": None}], "f": 0.1 + 0.2, "big": 10 ** 30,
                       "neg0": -0.0, "tiny": 5e-324, "esc": "nul \u0000 tab\t \u2028"},
              namespace="ns2")
    store.set("dup-order", {"z": 1, "a": 2}, namespace="ns2")
    store.set("ttl", 1, ttl_seconds=3600)
    store.set("decay", 2, half_life_seconds=60)
    store.set("nodecay", [], half_life_seconds=None)
    store.set("versioned", 1)
    store.set("versioned", 2)
    store.set("日本", "ユニコード", tags=["🧠"])
    clock.advance(600.123456789)
    store.prune()  # archives "decay"
    store.reinforce("plain")
    store.set("late", None, namespace="ns2")
    store.set("expired", 1, ttl_seconds=1)
    clock.advance(2.5)  # exported while expired, not yet pruned


def test_export_from_sqlite_imports_into_postgres_and_back_exactly(
        store: kvmem_pg.PgStore, clock: Clock, tmp_path: Path) -> None:
    with kvmem.Store.open(tmp_path / "a.db", config=CONFIG, clock=clock) as sqlite_a:
        _sqlite_fixture_memories(sqlite_a, clock)
        first = io.StringIO()
        count = sqlite_a.export(first)
        first_ns2 = io.StringIO()
        sqlite_a.export(first_ns2, namespace="ns2")
        shown = (sqlite_a.namespaces(), sqlite_a.list(archived=True), sqlite_a.list(limit=3),
                 sqlite_a.list(namespace="ns2", tags=[]))
    # split on \n only: str.splitlines() also splits inside a value holding U+2028
    records = [json.loads(line) for line in first.getvalue().split("\n")[:-1]]
    assert {r["key"] for r in records if r["archived"]} == {"decay"}
    assert "expired" in {r["key"] for r in records}
    assert store.import_(io.StringIO(first.getvalue())) == {"imported": count, "lines": count}
    second = io.StringIO()
    assert store.export(second) == count
    assert second.getvalue() == first.getvalue()  # byte for byte, so every field
    second_ns2 = io.StringIO()
    store.export(second_ns2, namespace="ns2")
    assert second_ns2.getvalue() == first_ns2.getvalue()
    # every field of every record, as Memory objects, too
    got = [kvmem.memory_from_record(json.loads(line), CONFIG)
           for line in second.getvalue().split("\n")[:-1]]
    want = [kvmem.memory_from_record(r, CONFIG) for r in records]
    for mine, theirs in zip(got, want, strict=True):
        for name in kvmem.MEMORY_COLUMNS:
            a, b = getattr(mine, name), getattr(theirs, name)
            assert a == b and type(a) is type(b), (mine.key, name, a, b)
            if isinstance(a, float):
                assert a.hex() == b.hex()  # -0.0 and every bit kept
    # PostgreSQL's export imported back into a new SQLite file gives the same export again
    with kvmem.Store.open(tmp_path / "b.db", config=CONFIG, clock=clock) as sqlite_b:
        sqlite_b.import_(io.StringIO(second.getvalue()))
        third = io.StringIO()
        sqlite_b.export(third)
    assert third.getvalue() == first.getvalue()
    # what the stores show agrees too (cursors differ: each database signs its own)
    assert shown[0] == store.namespaces()
    assert shown[0][0] == {"namespace": "default", "live": 5, "archived": 1}
    assert shown[1].items == store.list(archived=True).items
    assert [m.key for m in shown[1].items] == ["decay"]
    assert shown[2].items == store.list(limit=3).items
    assert shown[3] == store.list(namespace="ns2", tags=[])
    json_memory = store.get("json", namespace="ns2")
    assert json_memory is not None and json_memory.value["f"] == 0.1 + 0.2


def test_kvmem_export_piped_into_kvmem_import_both_ways(pg_dsn: str, clock: Clock,
                                                       tmp_path: Path) -> None:
    """The README's move: ``kvmem export`` of an SQLite file piped into ``kvmem import``
    on PostgreSQL, and back into a new file; the three exports are the same bytes."""
    source, back = str(tmp_path / "a.db"), str(tmp_path / "back.db")
    with kvmem.Store.open(source, config=CONFIG, clock=clock) as sqlite_a:
        _sqlite_fixture_memories(sqlite_a, clock)
    kvmem_cmd = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(HERE, 'kvmem_cli.py'))}"

    def shell(script: str) -> str:
        result = subprocess.run(["bash", "-c", "set -euo pipefail; " + script],
                                capture_output=True, text=True, env=child_env(), timeout=120)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return result.stdout

    def move(src: str, dst: str) -> dict[str, Any]:
        out = shell(f"{kvmem_cmd} export --db {shlex.quote(src)} | "
                    f"{kvmem_cmd} import --db {shlex.quote(dst)}")
        return dict(json.loads(out))

    def export(db: str) -> str:
        return shell(f"{kvmem_cmd} export --db {shlex.quote(db)}")

    first = export(source)
    count = first.count("\n")
    assert count == 10, first  # _sqlite_fixture_memories' memories, expired ones included
    assert move(source, pg_dsn) == {"imported": count, "lines": count}
    assert export(pg_dsn) == first
    assert move(pg_dsn, back) == {"imported": count, "lines": count}
    assert export(back) == first


def _tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = "
                            "current_schema() ORDER BY tablename").fetchall()
    return [r[0] for r in rows]


def test_the_cli_on_postgresql(pg_dsn: str) -> None:
    """Every kvmem command on a postgresql:// --db: those that must not create a database
    refuse one without kvmem's tables (not_found) and leave it without them, as they
    refuse a missing file; set creates them; checkpoint and backup are SQLite's."""

    def kvmem_cli_json(*args: str) -> tuple[int, Any]:
        result = subprocess.run([sys.executable, os.path.join(HERE, "kvmem_cli.py"), *args,
                                 "--db", pg_dsn], capture_output=True, text=True,
                                env=child_env(), timeout=60)
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, json.loads(result.stdout)

    for command in (["get", "k"], ["list"], ["search", "tea"], ["delete", "k"],
                    ["forget", "--prefix", "k"], ["namespaces"], ["stats"]):
        status, out = kvmem_cli_json(*command)
        assert status == 1 and out["error"]["code"] == "not_found", (command, out)
        assert "no kvmem database at postgresql://" in out["error"]["message"]
    status, out = kvmem_cli_json("check")
    assert status == 1 and out["ok"] is False and out["error"]["code"] == "not_found", out
    assert _tables(pg_dsn) == []  # nothing created
    status, out = kvmem_cli_json("set", "k", '"green tea"')
    assert status == 0 and out["version"] == 1, out
    assert "memories" in _tables(pg_dsn)
    assert kvmem_cli_json("get", "k")[1]["value"] == "green tea"
    assert [h["key"] for h in kvmem_cli_json("search", "tea")[1]["items"]] == ["k"]
    assert kvmem_cli_json("namespaces")[1]["items"] == [
        {"namespace": "default", "live": 1, "archived": 0}]
    status, out = kvmem_cli_json("check")
    assert status == 0 and out["ok"] is True and out["backend"] == "postgresql", out
    status, out = kvmem_cli_json("stats")
    assert status == 0 and out["counts"]["live"] == 1 and out["backend"] == "postgresql"
    for command in (["checkpoint"], ["backup", "/nonexistent/x.db"]):
        status, out = kvmem_cli_json(*command)
        assert status == 1 and out["error"]["code"] == "invalid_config", out


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
    ("OutOfMemory", False, "busy"),  # the lock table full: it passes
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
        while True:
            try:
                got = store.get("acknowledged")
                break
            except kvmem.BusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling for the pool to reconnect
        assert got is not None and got.value == "before the crash"  # None: it was lost
        assert store.set("after", 1).version == 1


@pytest.mark.parametrize("setting", ["fsync", "full_page_writes"])
def test_a_server_that_can_lose_commits_is_refused(setting: str) -> None:
    pgtest.require_postgres()
    with pgtest.postgres_server(settings={setting: "off"}) as server:
        assert server.settings(setting)[setting] == "off"
        with pytest.raises(kvmem.ConfigError, match=f"{setting}=off"):
            kvmem_pg.PgStore.open(server.dsn, config=CONFIG)


def test_a_full_lock_table_is_busy_and_writes_nothing(clock: Clock) -> None:
    """Each key of a batch holds an advisory lock until COMMIT, in PostgreSQL's shared lock
    table (max_locks_per_transaction x max_connections slots): a batch past it is busy
    (503, retry later), not a storage error, and writes nothing; smaller ones go on."""
    pgtest.require_postgres()
    with pgtest.postgres_server(settings={"max_locks_per_transaction": "10",
                                                     "max_connections": "20"}) as server, \
            kvmem_pg.PgStore.open(server.dsn, config=CONFIG, clock=clock) as store:
        with pytest.raises(kvmem.BusyError, match="53200"):
            store.batch([{"op": "set", "key": f"k{i}", "value": i} for i in range(1000)])
        assert store.stats()["counts"]["live"] == 0
        store.batch([{"op": "set", "key": f"k{i}", "value": i} for i in range(100)])
        assert store.stats()["counts"]["live"] == 100


def test_a_synchronous_standby_serves_reads_and_takes_over_without_loss(clock: Clock) -> None:
    """The README's standby: a streaming replica made by pg_basebackup, synchronous
    (``synchronous_standby_names``), so a COMMIT returns once the standby has the WAL too.
    While the primary lives, kvmem on the standby reads and refuses writes (health says
    standby, stats shows the lag); the primary's stats show the standby.  Then the primary
    is killed mid-writes and the standby promoted: a store on a two-host URL with
    ``target_session_attrs=read-write`` is busy meanwhile, then writes to the new primary
    by itself, and every write it acknowledged before the kill is there."""
    pgtest.require_postgres()
    config = kvmem.Config.build(environ={"KVMEM_BUSY_TIMEOUT_MS": "500"})
    with pgtest.postgres_server() as primary, \
            pgtest.postgres_server(standby_of=primary) as standby:
        primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        primary.execute("SELECT pg_reload_conf()")
        wait_until(lambda: primary.execute("SELECT sync_state FROM pg_stat_replication")
              == [("sync",)], "a synchronous standby")
        url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
               "/postgres?target_session_attrs=read-write")
        flags = {"db": url, "busy_timeout_ms": "500"}  # as --db takes it
        with kvmem_cli.open_store(kvmem.Config.build(environ={}, flags=flags), role="http",
                                  clock=clock) as store:
            store.set("first", 1)
            standbys = store.stats()["replication"]["standbys"]
            assert [(s["state"], s["sync_state"]) for s in standbys] == [("streaming", "sync")]
            # synchronous_commit=on waits for the standby to flush the WAL, not to replay
            # it: wait for the replay before reading there (remote_apply would wait too).
            (lsn,), = primary.execute("SELECT pg_current_wal_lsn()::text")
            wait_until(lambda: standby.execute(
                f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") == [(True,)],
                "replayed on the standby")
            with kvmem_pg.PgStore.open(standby.dsn, config=config, clock=clock) as replica:
                got = replica.get("first")
                assert got is not None and got.value == 1
                with pytest.raises(kvmem.ReadOnlyError):
                    replica.set("nope", 1)
                health = replica.health()
                assert not health["ok"] and "standby" in health["problems"][0], health
                assert replica.stats()["replication"]["role"] == "standby"
            acked: dict[str, int] = {}
            failures: list[str] = []
            stop = threading.Event()

            def writer() -> None:
                i = 0
                while not stop.is_set():
                    try:
                        acked[f"k{i}"] = store.set(f"k{i}", i).value
                    except (kvmem.BusyError, kvmem.StorageError) as exc:
                        failures.append(exc.code)
                    i += 1

            thread = threading.Thread(target=writer)
            thread.start()
            try:
                wait_until(lambda: len(acked) >= 50, "50 acknowledged writes")
                primary.kill_immediately()
                wait_until(lambda: failures, "a failed write while no primary runs")
                before = dict(acked)
                standby.promote()
                wait_until(lambda: len(acked) > len(before) + 20, "writes on the new primary")
            finally:
                stop.set()
                thread.join()
            assert set(failures) <= {"busy", "storage_error"}, failures
            assert len(before) >= 50
            for key, value in acked.items():  # before the failover and after it
                got = store.get(key)
                assert got is not None and got.value == value, key
            assert store.stats()["replication"] == {"role": "primary", "standbys": []}


# ---------------------------------------------------------------------------- search ----


def _search_columns(dsn: str) -> dict[str, tuple[str, int, str, str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT key, search::text, search_len, value, tags, namespace"
                            " FROM memories").fetchall()
    return {f"{ns}:{key}": (vector, length, key, value, tags)
            for key, vector, length, value, tags, ns in rows}


def _assert_search_columns_exact(dsn: str) -> None:
    """Every row's search columns are what its stored text gives from scratch (as
    test_search's index_is_exact checks SQLite's index)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, (vector, length, key, value, tags) in _search_columns(dsn).items():
            literal, want_length = kvmem_pg.search_vector(key, value, tags)
            row = conn.execute("SELECT %s::tsvector::text", (literal,)).fetchone()
            assert row is not None and (vector, length) == (row[0], want_length), name


def test_search_columns_follow_every_write(store: kvmem_pg.PgStore, pg_dsn: str,
                                           clock: Clock) -> None:
    store.set("k", "green tea", tags=["drink"], half_life_seconds=60)
    assert [h.memory.key for h in store.search("tea")] == ["k"]
    store.set("k", "black coffee")  # new text: the old words are gone
    assert store.search("tea") == [] and [h.memory.key for h in store.search("coffee")] == ["k"]
    store.set("k", "black coffee", tags=["morning"])  # tags only
    assert [h.memory.key for h in store.search("morning")] == ["k"]
    assert store.search("drink") == []
    store.batch([{"op": "set", "key": "b1", "value": {"note": "oolong"}},
                 {"op": "set", "key": "k", "value": "espresso"}])
    assert [h.memory.key for h in store.search("oolong")] == ["b1"]
    assert store.search("coffee") == [] and len(store.search("espresso")) == 1
    before = _search_columns(pg_dsn)
    clock.advance(30)
    store.reinforce("k")  # no new text: the search columns are not rewritten
    assert _search_columns(pg_dsn) == before
    exported = io.StringIO()
    store.export(exported)
    store.delete("b1")
    assert store.search("oolong") == []
    store.import_(io.StringIO(exported.getvalue()))  # import writes them again
    assert [h.memory.key for h in store.search("oolong")] == ["b1"]
    _assert_search_columns_exact(pg_dsn)


def test_search_ranks_as_sqlite_does(store: kvmem_pg.PgStore, clock: Clock,
                                     tmp_path: Path) -> None:
    """The same memories in both backends: the same hits in the same order, and for
    one-token words the same scores (FTS5's bm25 with BM25_WEIGHTS, N, avgdl, IDF)."""
    rng = random.Random(19)
    vocab = ["tea", "green", "coffee", "running", "runner", "connection", "blue", "sky",
             "绿茶", "咖啡", "launch", "code", "review", "python", "memory", "strength"]
    specs = [{"op": "set", "key": f"{rng.choice(['note', 'fact', 'tea'])}/{i}",
              "value": {"text": " ".join(rng.choices(vocab, k=rng.randint(1, 12)))},
              "tags": rng.sample(["blue", "work", "home", "tea"], rng.randint(0, 2)),
              "half_life_seconds": rng.choice([None, 600, 3600])} for i in range(80)]
    with kvmem.Store.open(tmp_path / "kv.db", config=CONFIG, clock=clock) as sqlite_store:
        for stores_ in (sqlite_store, store):
            stores_.batch(specs[:40])
        clock.advance(900)
        for stores_ in (sqlite_store, store):
            stores_.batch(specs[40:])
            stores_.reinforce(str(specs[3]["key"]))  # decayed, then reinforced
        clock.advance(300)
        for query in ["tea", "green tea", "run", "connections", "绿茶", "咖啡 python",
                      "blue sky", "launch code review", "memo", "work", "tea/1", "strength"]:
            theirs = sqlite_store.search(query, limit=100)
            ours = store.search(query, limit=100)
            assert [h.memory.key for h in ours] == [h.memory.key for h in theirs], query
            assert [h.score for h in ours] == pytest.approx([h.score for h in theirs],
                                                            rel=1e-9), query


def test_search_migration_fills_memories_written_before_it(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:  # a database of schema 1, before search
        patch.setattr(kvmem_pg, "MIGRATIONS_PG", kvmem_pg.MIGRATIONS_PG[:1])
        patch.setattr(kvmem_pg, "SCHEMA_VERSION", 1)
        patch.setattr(kvmem_pg, "_new_search", lambda *args: None)  # no search columns yet
        with kvmem_pg.PgStore.open(pg_dsn, config=CONFIG) as old:
            for start in (0, 600):  # more than one fill batch
                old.batch([{"op": "set", "key": f"k{i}", "value": f"word{i % 7} shared"}
                           for i in range(start, start + 600)])
    with kvmem_pg.PgStore.open(pg_dsn, config=CONFIG) as new:
        assert len(new.search("word3", limit=100)) == 100
        assert {h.memory.key for h in new.search("word3 zzz", limit=100)} <= \
            {f"k{i}" for i in range(3, 1200, 7)}
    _assert_search_columns_exact(pg_dsn)


def test_huge_and_odd_text_stays_within_postgresqls_limits(store: kvmem_pg.PgStore) -> None:
    """tsvector limits (1 MiB, 2,046-byte lexemes, 255 positions, position 16,383) never
    become an error: the memory is stored and its first words are searchable."""
    rng = random.Random(7)
    words = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(140_000)]
    store.set("huge", " ".join(["firstword", *words]))
    # this thread's tokenizer was renewed (FTS5's hash table would stay that large)
    assert getattr(kvmem_pg._tokenizers, "conn", None) is None
    store.set("long", "x" * 3000 + " shortword")
    store.set("many", " ".join(["again"] * 20_000))
    store.set("quote", "it's a back\\slash o'clock")
    assert [h.memory.key for h in store.search("firstword")] == ["huge"]
    assert [h.memory.key for h in store.search("shortword")] == ["long"]
    assert [h.memory.key for h in store.search("again")] == ["many"]
    assert [h.memory.key for h in store.search("o'clock")] == ["quote"]
    assert [h.memory.key for h in store.search("back\\slash")] == ["quote"]


# ------------------------------------------------------------------ prune and forget ----


def test_prune_skips_rows_another_transaction_holds(store: kvmem_pg.PgStore, clock: Clock,
                                                     pg_dsn: str) -> None:
    """SKIP LOCKED: a row locked elsewhere is left for the next pass, without waiting."""
    for i in range(5):
        store.set(f"e{i}", i, ttl_seconds=5)
    store.set("fade", "x", half_life_seconds=1)
    clock.advance(60)
    with psycopg.connect(pg_dsn) as holder:  # a transaction holding e0 and fade
        holder.execute("SELECT 1 FROM memories WHERE key IN ('e0', 'fade') FOR UPDATE")
        started = time.monotonic()
        first = store.prune()
        assert time.monotonic() - started < 1.0  # busy_timeout_ms is longer: it never waited
        assert (first.deleted, first.archived) == (4, 0)
    second = store.prune()
    assert (second.deleted, second.archived) == (1, 1)
    assert store.stats()["counts"] == {"live": 0, "archived": 1, "expired_pending": 0}
    assert store.stats()["last_prune"]["deleted"] == 1


def test_two_stores_prune_at_once(pg_dsn: str, clock: Clock) -> None:
    """Two stores (two pools, as two servers) pruning 3,000 expired and 3,000 fading
    memories at once, batches of 50: each row is deleted or archived once in all."""
    config = kvmem.Config.build(environ={}, flags={"prune_batch": "50"})
    with kvmem_pg.PgStore.open(pg_dsn, config=config, clock=clock) as a, \
            kvmem_pg.PgStore.open(pg_dsn, config=config, clock=clock) as b:
        for start in range(0, 3000, 1000):
            a.batch([{"op": "set", "key": f"e{i}", "value": i, "ttl_seconds": 5}
                     for i in range(start, start + 1000)])
            a.batch([{"op": "set", "key": f"f{i}", "value": i, "half_life_seconds": 1}
                     for i in range(start, start + 1000)])
        a.set("keep", 1)
        clock.advance(60)
        results: list[kvmem.PruneResult] = []
        errors = run_threads(lambda n: results.append((a, b)[n].prune()), 2)
        assert errors == []
        assert sum(r.deleted for r in results) == 3000
        assert sum(r.archived for r in results) == 3000
        assert a.stats()["counts"] == {"live": 1, "archived": 3000, "expired_pending": 0}


def test_forget_and_batches_at_once_never_deadlock(pg_dsn: str) -> None:
    """forget takes its window's advisory locks in the batches' order: batches writing
    the keys it walks, in reverse key order, meet no deadlock (PostgreSQL's counter)."""
    config = kvmem.Config.build(environ={}, flags={"prune_batch": "20"})
    deadlocks = _deadlocks(pg_dsn)
    with kvmem_pg.PgStore.open(pg_dsn, config=config) as a, \
            kvmem_pg.PgStore.open(pg_dsn, config=config) as b:
        def work(n: int) -> None:
            if n == 0:
                a.forget(prefix="k", tags=["x"])
            else:
                for start in range(380, -1, -20):
                    b.batch([{"op": "set", "key": f"k{i:03d}", "value": -i, "tags": ["y"]}
                             for i in range(start + 19, start - 1, -1)])

        for _ in range(5):  # (checked: with FOR UPDATE instead, most runs deadlock)
            a.batch([{"op": "set", "key": f"k{i:03d}", "value": i, "tags": ["x"]}
                     for i in range(400)])
            assert run_threads(work, 2) == []
            left = a.list(prefix="k", limit=1000).items
            assert all(m.tags == ["y"] for m in left)  # every one tagged x is gone
    assert _deadlocks(pg_dsn) == deadlocks


def test_stats_and_health(store: kvmem_pg.PgStore, pg_server: pgtest.PostgresServer) -> None:
    store.set("a", 1)
    stats = store.stats()
    assert stats["backend"] == "postgresql" and stats["counts"]["live"] == 1
    assert stats["server"]["version"] == pg_server.settings("server_version")["server_version"]
    assert stats["server"]["in_recovery"] is False
    assert stats["pool"]["pool_max"] == 10
    assert stats["health"] == {"ok": True, "problems": [], "past": {}}
    assert stats["config"] == store.config.public() and stats["last_prune"] is None
    assert stats["replication"] == {"role": "primary", "standbys": []}
    assert stats["decay"] is None and stats["path"] == kvmem_pg.describe_dsn(pg_server.dsn)
    store.prune()
    assert store.stats()["last_prune"]["batches"] == 1
    # As kvmem-mcp's memory_stats publishes it.
    jsonschema.validate(store.stats(), kvmem_cli.STATS_SCHEMA)
    assert set(store.stats()) <= set(kvmem_cli.STATS_SCHEMA["properties"])


def test_decay_runs_prune(pg_dsn: str, clock: Clock) -> None:
    config = kvmem.Config.build(environ={}, flags={"decay_interval_s": "0.05"})
    with kvmem_pg.PgStore.open(pg_dsn, config=config, clock=clock, decay=True) as store:
        store.set("gone", 1, ttl_seconds=1)
        clock.advance(2)
        deadline = time.monotonic() + 30
        while store.stats()["decay"]["runs"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.stats()["counts"] == {"live": 0, "archived": 0, "expired_pending": 0}
        assert store.stats()["decay"]["failed"] is None
