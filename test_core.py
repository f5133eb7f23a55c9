"""The pure core, in tables and without a database: each op's plan from the memory as
stored to the next one, the liveness rules, op parsing, and the checkpoint decisions;
then the one write path that applies a plan, on a real file."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import http_server
import kvmem

CONFIG = kvmem.Config.build(environ={}, flags={"default_half_life_s": "3600"})
NOW = 1_000_000.0


def stored(**changes: Any) -> kvmem.Memory:
    """A memory as stored: version 3, created at 10, no TTL, live, reinforced one
    half-life (100 s) ago."""
    memory = kvmem.memory_from_record({  # fields added later take their import default
        "namespace": "ns", "key": "k", "value": {"old": 1}, "tags": ["t"], "version": 3,
        "created_at": 10.0, "updated_at": 20.0, "expires_at": None, "strength": 0.4,
        "half_life_seconds": 100.0, "last_reinforced_at": NOW - 100, "archived": False,
    }, CONFIG)
    return dataclasses.replace(memory, **changes)


EXPIRED = stored(expires_at=NOW)  # expires_at <= now: expired
ARCHIVED = stored(archived=True)
NOT_YET = stored(expires_at=NOW + 0.001)


# -------------------------------------------------------------------------- liveness ----

@pytest.mark.parametrize(("memory", "expired", "live"), [
    (stored(), False, True),
    (EXPIRED, True, False),
    (NOT_YET, False, True),
    (ARCHIVED, False, False),
    (dataclasses.replace(ARCHIVED, expires_at=NOW - 1), True, False),
])
def test_liveness(memory: kvmem.Memory, expired: bool, live: bool) -> None:
    assert (memory.is_expired(NOW), memory.is_live(NOW)) == (expired, live)


# ---------------------------------------------------------------------------- set plan ----

def set_op(**spec: Any) -> kvmem.SetOp:
    return kvmem.SetOp.parse({"value": {"new": 2}, **spec}, CONFIG, key="k", namespace="ns")


# current, extra arguments, then (version, created_at) of the result, or the conflict's
# current_version.
SET_TABLE: list[tuple[kvmem.Memory | None, dict[str, Any], tuple[int, float] | int]] = [
    (None, {}, (1, NOW)),                          # created
    (stored(), {}, (4, 10.0)),                     # replaced: version bumped, created kept
    (EXPIRED, {}, (1, NOW)),                       # expired counts as absent
    (NOT_YET, {}, (4, 10.0)),
    (ARCHIVED, {}, (4, 10.0)),                     # archived counts as present
    (None, {"if_version": 0}, (1, NOW)),           # only if absent: it is
    (EXPIRED, {"if_version": 0}, (1, NOW)),
    (stored(), {"if_version": 3}, (4, 10.0)),      # compare-and-set matches
    (ARCHIVED, {"if_version": 3}, (4, 10.0)),
    (stored(), {"if_version": 0}, 3),              # present: conflict, current 3
    (ARCHIVED, {"if_version": 0}, 3),
    (stored(), {"if_version": 2}, 3),
    (None, {"if_version": 1}, 0),                  # absent: current 0
    (EXPIRED, {"if_version": 3}, 0),               # expired: absent
]


@pytest.mark.parametrize(("current", "spec", "expected"), SET_TABLE)
def test_set_plan(current: kvmem.Memory | None, spec: dict[str, Any],
                  expected: tuple[int, float] | int) -> None:
    op = set_op(tags=["a", "b", "a"], ttl_seconds=60, **spec)
    if isinstance(expected, int):
        with pytest.raises(kvmem.VersionConflictError) as info:
            op.plan(current, NOW)
        assert info.value.current_version == expected and info.value.key == "k"
        return
    after, outcome = op.plan(current, NOW)
    assert after == outcome
    assert (after.version, after.created_at) == expected
    assert after == kvmem.Memory(
        namespace="ns", key="k", value={"new": 2}, tags=["a", "b"], version=expected[0],
        created_at=expected[1], updated_at=NOW, expires_at=NOW + 60,
        strength=kvmem.INITIAL_STRENGTH, half_life_seconds=3600.0, last_reinforced_at=NOW,
        archived=False)  # full strength, un-archived, fresh TTL, the default half-life


@pytest.mark.parametrize(("spec", "half_life"), [
    ({}, 3600.0),                                # omitted: the configured default
    ({"half_life_seconds": None}, None),         # null: never decays
    ({"half_life_seconds": 5}, 5.0),
])
def test_set_half_life(spec: dict[str, Any], half_life: float | None) -> None:
    after, _ = set_op(**spec).plan(None, NOW)
    assert after.half_life_seconds == half_life


# ------------------------------------------------------------------------- delete plan ----

DELETE_TABLE: list[tuple[kvmem.Memory | None, int | None, bool | int]] = [
    (None, None, False),
    (stored(), None, True),
    (ARCHIVED, None, True),          # archived is present: reported deleted
    (EXPIRED, None, False),          # expired is absent (its row goes anyway)
    (stored(), 3, True),
    (ARCHIVED, 3, True),
    (stored(), 2, 3),                # conflict: current 3
    (stored(), 0, 3),
    (None, 0, False),
    (EXPIRED, 0, False),
    (EXPIRED, 3, 0),                 # expired: current 0
    (None, 1, 0),
]


@pytest.mark.parametrize(("current", "if_version", "expected"), DELETE_TABLE)
def test_delete_plan(current: kvmem.Memory | None, if_version: int | None,
                     expected: bool | int) -> None:
    op = kvmem.DeleteOp.parse({"if_version": if_version}, CONFIG, key="k", namespace="ns")
    if not isinstance(expected, bool):
        with pytest.raises(kvmem.VersionConflictError) as info:
            op.plan(current, NOW)
        assert info.value.current_version == expected
        return
    assert op.plan(current, NOW) == (None, expected)  # no row afterwards, either way


# ---------------------------------------------------------------------- reinforce plan ----

@pytest.mark.parametrize(("current", "strength"), [
    (stored(), 0.7),      # one half-life since: 0.4 -> 0.2, plus the boost 0.5
    (ARCHIVED, 0.7),      # and an archived one is restored
    (stored(strength=0.9, half_life_seconds=None), 1.0),                      # capped
    (stored(last_reinforced_at=NOW + 50), 0.4 + kvmem.REINFORCE_BOOST),      # clock back
])
def test_reinforce_plan(current: kvmem.Memory, strength: float) -> None:
    op = kvmem.ReinforceOp.parse({}, CONFIG, key="k", namespace="ns")
    after, outcome = op.plan(current, NOW)
    assert after == outcome
    assert math.isclose(after.strength, strength)
    assert after == dataclasses.replace(current, strength=after.strength,
                                        last_reinforced_at=NOW, archived=False)
    assert after.version == current.version  # content unchanged: version kept


@pytest.mark.parametrize("current", [None, EXPIRED])
def test_reinforce_plan_absent(current: kvmem.Memory | None) -> None:
    op = kvmem.ReinforceOp.parse({}, CONFIG, key="k", namespace="ns")
    with pytest.raises(kvmem.NotFoundError, match="'k'"):
        op.plan(current, NOW)


# --------------------------------------------------------------------------- parsing ----

@pytest.mark.parametrize(("spec", "given", "fragment"), [
    ({}, {"key": "k"}, "field 'value' is required"),
    ({"value": 1}, {}, "field 'key' is required"),
    ({"value": 1, "colour": "red"}, {"key": "k"}, "unknown field 'colour'"),
    ({"value": 1, "key": "other"}, {"key": "k"}, "unknown field 'key'"),  # given, not in spec
    ({"value": 1, "ttl_seconds": 0}, {"key": "k"}, "ttl_seconds"),
    ({"value": 1, "ttl_seconds": 10 ** 400}, {"key": "k"}, "ttl_seconds"),
    ({"value": 1, "if_version": True}, {"key": "k"}, "if_version"),
    ({"value": 1, "if_version": -1}, {"key": "k"}, "if_version"),
    ({"value": 1, "tags": "a,b"}, {"key": "k"}, "tags"),
    ({"value": float("nan")}, {"key": "k"}, "JSON"),
    ({"value": 1}, {"key": "k", "namespace": "bad ns"}, "namespace"),
    ([1], {"key": "k"}, "must be an object"),
])
def test_set_parse_refuses(spec: Any, given: dict[str, Any], fragment: str) -> None:
    with pytest.raises(kvmem.InvalidInputError, match=fragment):
        kvmem.SetOp.parse(spec, CONFIG, **given)


def test_set_parse_normalises() -> None:
    op = kvmem.SetOp.parse({"value": (1, "é"), "tags": ("x", "x")}, CONFIG, key="k")
    assert (op.namespace, op.value, op.value_json, op.tags) == ("default", [1, "é"],
                                                                '[1,"é"]', ["x"])


@pytest.mark.parametrize(("spec", "kind"), [
    ({"op": "set", "key": "a", "value": 1}, kvmem.SetOp),
    ({"op": "delete", "key": "a"}, kvmem.DeleteOp),
])
def test_batch_op_kinds(spec: dict[str, Any], kind: type[kvmem.Op]) -> None:
    op = kvmem.parse_batch_op(spec, CONFIG, namespace="ns")
    assert type(op) is kind and (op.namespace, op.key) == ("ns", "a")


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"op": "upsert", "key": "a"}, "op must be one of"),
    ({"op": "reinforce", "key": "a"}, "op must be one of"),   # not a batch op
    ({"op": "delete", "key": "a", "value": 1}, "unknown field 'value'"),
    ({"op": "set", "key": "a", "namespace": "x", "value": 1}, "unknown field 'namespace'"),
    ("set", "must be an object"),
])
def test_batch_op_refused(spec: Any, fragment: str) -> None:
    with pytest.raises(kvmem.InvalidInputError, match=fragment):
        kvmem.parse_batch_op(spec, CONFIG, namespace="ns")


def test_schemas_follow_the_ops_and_the_limits() -> None:
    small = kvmem.Config.build(environ={}, flags={"max_key_chars": "7", "max_tags": "2"})
    body = kvmem.SetOp.schema(small, exclude=("namespace", "key"))
    assert body["required"] == ["value"] and body["additionalProperties"] is False
    assert set(body["properties"]) == {"value", "tags", "ttl_seconds", "half_life_seconds",
                                       "if_version"}
    assert body["properties"]["tags"]["maxItems"] == 2
    kinds = kvmem.batch_op_schema(small)["oneOf"]
    assert [kind["properties"]["op"]["const"] for kind in kinds] == ["set", "delete"]
    assert all(kind["properties"]["key"]["maxLength"] == 7 for kind in kinds)
    put = http_server.openapi_document(small)["paths"]["/v1/memories/{key}"]["put"]
    assert put["parameters"][0]["schema"]["maxLength"] == 7  # the path key, from the limits
    assert put["requestBody"]["content"]["application/json"]["schema"] == body


def test_render_matches_the_memory_schema_and_record_round_trips() -> None:
    for memory in (stored(), NOT_YET, ARCHIVED):
        shown = memory.render(NOW)
        jsonschema.validate(shown, kvmem.MEMORY_SCHEMA)
        assert set(shown) == set(kvmem.MEMORY_SCHEMA["required"])
        assert shown["created_at"] == "1970-01-01T00:00:10.000000Z"
        record = json.loads(json.dumps(memory.to_record()))
        assert kvmem.memory_from_record(record, CONFIG) == memory


@pytest.mark.parametrize(("change", "fragment"), [
    ({"version": 0}, "version"),
    ({"strength": -1}, "strength"),
    ({"archived": 1}, "archived"),
    ({"created_at": "yesterday"}, "created_at"),
    ({"expires_at": float("inf")}, "expires_at"),
    ({"extra": 1}, "unknown"),
    ({"version": None}, r"fields missing: \['version'\]"),  # None here: left out
    ({"version": 2 ** 63}, "version"),         # would not fit SQLite's INTEGER (counting up)
    ({"created_at": 1e300}, "created_at"),     # no RFC 3339 time can show it
    ({"expires_at": -1.0}, "expires_at"),
    # every field's range, as a set checks it (an import used to take some of these)
    ({"strength": 1.5}, "strength"),
    ({"strength": float("nan")}, "strength"),
    ({"created_at": 1e18}, "created_at"),
    ({"created_at": -1e13}, "created_at"),
    ({"updated_at": -1.0}, "updated_at"),
    ({"last_reinforced_at": 1e18}, "last_reinforced_at"),
    ({"version": 1.5}, "version"),
    ({"version": True}, "version"),
    ({"half_life_seconds": 0}, "half_life_seconds"),
    ({"half_life_seconds": kvmem.MAX_TTL_SECONDS * 2}, "half_life_seconds"),
    ({"key": "k" * 513}, "key"),
    ({"key": "a\u0000b"}, "key"),
    ({"namespace": "no spaces"}, "namespace"),
    ({"tags": [f"t{i}" for i in range(33)]}, "tags"),
    ({"tags": ["x" * 65]}, "tag"),
    ({"value": "x" * (1024 * 1024)}, "value"),
    ({"value": json.loads("[" * 101 + "]" * 101)}, "nests"),
    ({"value": "\ud800"}, "surrogates"),
])
def test_memory_from_record_refuses(change: dict[str, Any], fragment: str) -> None:
    record = {**stored().to_record(), **change}
    record = {name: value for name, value in record.items() if value is not None
              or name in ("expires_at", "half_life_seconds")}
    with pytest.raises(kvmem.InvalidInputError, match=fragment):
        kvmem.memory_from_record(record, CONFIG)


# ---------------------------------------------------------------------- search query ----

@pytest.mark.parametrize(("text", "query"), [
    ("green tea", '"green" OR "tea"*'),  # the last word is also a prefix
    ('say "hi" NEAR(x', '"say" OR """hi""" OR "NEAR(x"*'),  # FTS syntax is only text
    ("p\x00q", '"p" OR "q"'),  # NUL would end FTS5's C string inside the quotes
    ("tab\tnew\nline\x7fdel\x85c1", '"tab" OR "new" OR "line" OR "del" OR "c1"'),
    ("p\u2028q", '"p" OR "q"'),
    ("the cat is on the mat", '"cat" OR "mat"*'),  # stopwords go...
    ("the who", '"the" OR "who"*'),  # ...unless nothing else is left
    ("tea tea TEA", '"tea"*'),  # one term a word
    ("上海浦东", '"上海" OR "海浦" OR "浦东"'),  # CJK as pairs
    ("茶", '"茶"*'),  # a lone CJK character as a prefix
    ("用Python写", '"用"* OR "Python" OR "写"*'),
    ("ＡＢＣ１２３", '"ABC123"*'),  # full-width as ASCII (FTS5 folds the case)
])
def test_fts_query(text: str, query: str) -> None:
    assert kvmem.fts_query(text) == query
    fts = sqlite3.connect(":memory:")  # the query must be one FTS5 accepts
    try:
        fts.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
        fts.execute("INSERT INTO t VALUES ('a b green tea')")
        fts.execute("SELECT count(*) FROM t WHERE t MATCH ?", (query,)).fetchone()
    finally:
        fts.close()


@pytest.mark.parametrize("text", ["", " \x00\x01 ", "***", "\ud800 word", 5, None])
def test_fts_query_refuses(text: object) -> None:
    with pytest.raises(kvmem.InvalidInputError):
        kvmem.fts_query(text)


# -------------------------------------------------------------- checkpoint decisions ----

CAP = kvmem.Config.build(environ={}, flags={"wal_cap_bytes": str(64 * 1024 * 1024)})
SOFT, HARD = CAP.wal_soft_cap_bytes, CAP.wal_hard_cap_bytes
FRAME = 4096 + 24


@pytest.mark.parametrize(("wal_bytes", "changed", "since_s", "complete", "pages", "want"), [
    (0, False, 10.0, True, 1000, None),                    # idle and done
    (100, True, 0.01, True, 1000, None),                   # changed, but asked just now
    (100, True, kvmem.ACTIVE_POLL_S, True, 1000, "idle"),  # another process wrote
    (100, False, 1.0, False, 1000, "idle"),                # a reader held the last one back
    (4 * 1000 * FRAME, False, 0.0, True, 1000, None),      # four intervals: not yet
    (4 * 1000 * FRAME + 1, False, 0.0, True, 1000, "shrink"),
    (4 * 16 * FRAME + 1, False, 0.0, True, 16, "shrink"),  # a low pages_limit (full disk)
    (SOFT + 1, False, 0.0, True, 100_000, "shrink"),       # the soft cap bounds it too
])
def test_checkpoint_request(wal_bytes: int, changed: bool, since_s: float, complete: bool,
                            pages: int, want: str | None) -> None:
    assert kvmem.checkpoint_request(wal_bytes, changed=changed, since_s=since_s,
                                    complete=complete, pages_limit=pages, page_size=4096,
                                    config=CAP) == want


@pytest.mark.parametrize(("wal_bytes", "lock_free", "want"), [
    (SOFT, True, None),                    # at the soft cap: nothing to do
    (SOFT + 1, True, "no checkpointer"),   # nobody holds the election
    (SOFT + 1, False, None),               # the checkpointer's job
    (HARD, False, None),
    (HARD + 1, False, "fallback"),         # a checkpointer that does not keep up
    (HARD + 1, True, "no checkpointer"),
])
def test_fallback_reason(wal_bytes: int, lock_free: bool, want: str | None) -> None:
    assert kvmem.fallback_reason(wal_bytes, lock_free=lock_free, config=CAP) == want


@pytest.mark.parametrize(("free_bytes", "want"), [
    (10 ** 12, CAP.wal_pages),         # plenty of room
    (400 * 4096, 100),                 # a quarter of the free pages
    (0, 16),                           # never below 16
])
def test_wal_pages_limit(free_bytes: int, want: int) -> None:
    assert kvmem.wal_pages_limit(free_bytes, 4096, CAP) == want


# -------------------------------------------------- the one write path, on a real file ----

def test_write_sets_only_changed_columns(tmp_path: Any) -> None:
    """A reinforce changes no indexed column, so the full-text trigger does not run; a
    set with new text re-indexes.  (total_changes counts the rows the trigger and FTS5
    write too: 1 is the memory's row alone.)"""
    with kvmem.Store.open(tmp_path / "kv.db", config=CONFIG) as store:
        store.set("k", {"text": "green tea"}, tags=["drink"])

        def changes(op: kvmem.Op) -> int:
            def run(conn: kvmem.KvmemConnection) -> int:
                before = conn.total_changes
                kvmem._apply(conn, op, store.clock())
                return conn.total_changes - before
            result: int = store._writer.submit(run)
            return result

        assert changes(kvmem.ReinforceOp.parse({}, CONFIG, key="k")) == 1
        reinforced = store.reinforce("k")  # returned whole, its value decoded
        assert (reinforced.value, reinforced.tags) == ({"text": "green tea"}, ["drink"])
        same = {"value": {"text": "green tea"}, "tags": ["drink"]}
        assert changes(kvmem.SetOp.parse(same, CONFIG, key="k")) == 1
        assert changes(kvmem.SetOp.parse({"value": "oolong"}, CONFIG, key="k")) > 1  # re-indexed
        assert [h.memory.key for h in store.search("oolong")] == ["k"]
        assert store.search("green") == []
        retagged = {"value": "oolong", "tags": ["tea", "hot"]}  # only the tags change
        assert changes(kvmem.SetOp.parse(retagged, CONFIG, key="k")) > 1
    with kvmem.Store.open(tmp_path / "kv.db", config=CONFIG) as store:  # what is on disk
        memory = store.get("k")
        assert memory is not None and (memory.version, memory.value) == (4, "oolong")
        assert memory.tags == ["tea", "hot"]
        assert [h.memory.key for h in store.search("hot")] == ["k"]
        assert store.search("drink") == []


@pytest.mark.parametrize("value", [10 ** 5000, -(10 ** 5000), 2 ** 63],
                         ids=["huge", "-huge", "2**63"])
def test_huge_integers_are_refused_by_name(value: int) -> None:
    with pytest.raises(kvmem.InvalidInputError, match="if_version must be an integer"):
        kvmem.DeleteOp.parse({"if_version": value}, CONFIG, key="k")
    with pytest.raises(kvmem.InvalidInputError, match="ttl_seconds"):
        set_op(ttl_seconds=value)


def test_ops_built_directly_are_checked(tmp_path: Path) -> None:
    """An op made by its constructor, not parse(), is checked like a client's input."""
    raw = kvmem.SetOp(namespace="ns", key="k", value=(1, 2), tags=None,  # type: ignore[arg-type]
                      ttl_seconds=None, half_life_seconds=None, if_version=None)
    bad = dataclasses.replace(raw, key="")
    with kvmem.Store.open(tmp_path / "kv.db", config=CONFIG) as store:
        memory = store.apply(raw)
        assert (memory.value, memory.tags) == ([1, 2], [])
        assert [m.key for m in store.list(namespace="ns").items] == ["k"]  # readable back
        with pytest.raises(kvmem.InvalidInputError, match="key"):
            store.apply(bad)
        with pytest.raises(kvmem.InvalidInputError, match="ops\\[1\\]: key"):
            store.batch([raw, bad], namespace="other")
        results = store.batch([raw], namespace="other")  # an op keeps its own namespace
        assert results[0]["memory"].namespace == "ns" and results[0]["memory"].version == 2
        with pytest.raises(kvmem.InvalidInputError, match="reinforce op cannot be in a batch"):
            store.batch([kvmem.ReinforceOp.parse({}, CONFIG, key="k",  # type: ignore[list-item]
                                                 namespace="ns")])
        exported = store.list(namespace="ns").items[0]
        assert exported.tags == [] and exported.value == [1, 2]


# --------------------------------------------------- one place maps sqlite3 errors ----

def _mapped_error(call: Any) -> kvmem.KvmemError:
    with pytest.raises(kvmem.KvmemError) as info:
        call()
    assert not isinstance(info.value, sqlite3.Error)
    assert isinstance(info.value.__cause__, sqlite3.Error)  # SQLite's own error is kept
    return info.value


def test_every_call_on_a_connection_raises_kvmem_errors(tmp_path: Path) -> None:
    conn = kvmem.open_db(tmp_path / "kv.db", config=CONFIG)
    other = kvmem.open_db(tmp_path / "other.db", config=CONFIG)
    # A fetch steps the statement again: the second row fails (malformed JSON).
    failing = "SELECT json(column1) FROM (VALUES ('1'), ('not json'))"
    for fetch in (lambda c: c.fetchall(), lambda c: list(c), lambda c: c.fetchmany(5),
                  lambda c: [c.fetchone(), c.fetchone()]):
        cursor = conn.execute(failing)
        assert _mapped_error(lambda: fetch(cursor)).code == "storage_error"  # noqa: B023
    errors: list[BaseException] = []

    def elsewhere() -> None:  # a connection belongs to the thread that opened it
        for call in (lambda: conn.execute("SELECT 1"), conn.close):
            try:
                call()
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert len(errors) == 2 and all(isinstance(e, kvmem.KvmemError) for e in errors), errors
    other.close()
    _mapped_error(lambda: conn.backup(other))  # into a closed connection
    conn.close()
    for call in (lambda: conn.execute("SELECT 1"), lambda: conn.executemany("SELECT ?", [(1,)]),
                 lambda: conn.in_transaction, conn.cursor):
        _mapped_error(call)


# ------------------------------------------------------------- health and threads ----

def test_health_probes_the_database(tmp_path: Path) -> None:
    with kvmem.Store.open(tmp_path / "kv.db", config=CONFIG) as store:
        assert store.health()["ok"] is True
        other = kvmem.open_db(tmp_path / "kv.db", config=CONFIG)
        try:
            with kvmem.transaction(other):
                other.execute("ALTER TABLE memories RENAME TO moved_away")
            health = store.health()
            assert health["ok"] is False
            assert any("no such table: memories" in p for p in health["problems"]), health
            with kvmem.transaction(other):
                other.execute("ALTER TABLE moved_away RENAME TO memories")
            assert store.health()["ok"] is True
        finally:
            other.close()


def test_a_background_bug_marks_the_thread_failed(tmp_path: Path) -> None:
    class BuggyStore(kvmem.Store):
        def prune(self, now: float | None = None) -> kvmem.PruneResult:
            raise RuntimeError("a bug in prune")

    config = kvmem.Config.build(environ={}, flags={"decay_interval_s": "0.01"})
    with BuggyStore.open(tmp_path / "kv.db", config=config, decay=True) as store:
        deadline = time.monotonic() + 30
        while not store.stats()["decay"]["failed"]:  # waits on the thread's state
            assert time.monotonic() < deadline, store.stats()["decay"]
            time.sleep(0.01)
        assert store.stats()["decay"]["failed"] == "internal: RuntimeError: a bug in prune"
        health = store.health()
        assert not health["ok"] and "decay failed: internal: RuntimeError" in health["problems"][0]


def test_stats_after_the_file_moved(tmp_path: Path) -> None:
    with kvmem.Store.open(tmp_path / "kv.db", config=CONFIG) as store:
        store.set("k", 1)
        (tmp_path / "kv.db").rename(tmp_path / "moved.db")
        stats = store.stats()  # answers, and says what is wrong
        assert stats["db_bytes"] is None
        assert any("was deleted" in p for p in stats["health"]["problems"])
        (tmp_path / "moved.db").rename(tmp_path / "kv.db")
