"""The memory model: pure core (no database), Store, group commit, prune, export/import."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvmem
from testutil import Child, Clock, check_acknowledged, child_env, run_threads

CONFIG = kvmem.Config.build(environ={})


# ------------------------------------------------------------------------ pure core ----


@pytest.mark.parametrize("key", [
    "a", "x" * 512, "日本語/キー", "emoji 🧠 memory", "with spaces and\ttabs?"[:14],
    "../../etc/passwd", "%2F..%2F", "a/b/c", "NULL", "'; DROP TABLE memories; --",
])
def test_valid_keys(key: str) -> None:
    assert kvmem.validate_key(key, CONFIG) == key


@pytest.mark.parametrize(("key", "message"), [
    ("", "1 to 512"), ("x" * 513, "1 to 512"), ("a\x00b", "control"), ("line\nbreak", "control"),
    ("tab\there", "control"), ("del\x7f", "control"), ("c1\x85", "control"),
    ("\ud800", "control"), (42, "string"), (None, "string"), (b"bytes", "string"),
])
def test_invalid_keys(key: object, message: str) -> None:
    with pytest.raises(kvmem.InvalidInputError, match=message):
        kvmem.validate_key(key, CONFIG)


@pytest.mark.parametrize(("namespace", "ok"), [
    ("default", True), ("agent-1.project_x", True), ("a" * 64, True), ("a" * 65, False),
    ("", False), ("with space", False), ("slash/es", False), ("ünïcode", False), (3, False),
])
def test_namespaces(namespace: object, ok: bool) -> None:
    if ok:
        assert kvmem.validate_namespace(namespace, CONFIG) == namespace
    else:
        with pytest.raises(kvmem.InvalidInputError, match="namespace"):
            kvmem.validate_namespace(namespace, CONFIG)


@pytest.mark.parametrize(("tags", "expected"), [
    (None, []), ([], []), (["a", "b", "a"], ["a", "b"]), (("x",), ["x"]),
    ([f"t{i}" for i in range(32)], [f"t{i}" for i in range(32)]),
])
def test_valid_tags(tags: object, expected: list[str]) -> None:
    assert kvmem.validate_tags(tags, CONFIG) == expected


@pytest.mark.parametrize("tags", [
    "not-a-list", [1], [""], ["x" * 65], ["bad\ntag"], [f"t{i}" for i in range(33)], {"a": 1},
])
def test_invalid_tags(tags: object) -> None:
    with pytest.raises(kvmem.InvalidInputError, match="tag"):
        kvmem.validate_tags(tags, CONFIG)


@pytest.mark.parametrize("value", [None, True, 0, -1.5, "text", [], {"nested": {"list": [1, "2"]}}])
def test_values_encode_as_json(value: object) -> None:
    assert json.loads(kvmem.encode_value(value, CONFIG)) == value


@pytest.mark.parametrize(("value", "error"), [
    (math.nan, kvmem.InvalidInputError), (math.inf, kvmem.InvalidInputError),
    ({1, 2}, kvmem.InvalidInputError), (object(), kvmem.InvalidInputError),
    ("\udc80", kvmem.InvalidInputError),
    ("x" * (1024 * 1024), kvmem.PayloadTooLargeError),
])
def test_bad_values(value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        kvmem.encode_value(value, CONFIG)


def test_value_limit_is_exact() -> None:
    largest = "x" * (1024 * 1024 - 2)  # plus two quote characters
    assert len(kvmem.encode_value(largest, CONFIG)) == 1024 * 1024
    with pytest.raises(kvmem.PayloadTooLargeError, match="1048577 bytes"):
        kvmem.encode_value(largest + "x", CONFIG)


@pytest.mark.parametrize(("strength", "last", "half_life", "now", "expected"), [
    (1.0, 0.0, None, 10**9, 1.0),          # no half-life: never decays
    (1.0, 0.0, 100.0, 0.0, 1.0),
    (1.0, 0.0, 100.0, 100.0, 0.5),
    (1.0, 0.0, 100.0, 200.0, 0.25),
    (0.8, 50.0, 10.0, 80.0, 0.1),
    (1.0, 100.0, 100.0, 50.0, 1.0),        # a clock that went backwards counts as zero
])
def test_strength_at(strength: float, last: float, half_life: float | None, now: float,
                     expected: float) -> None:
    assert kvmem.strength_at(strength, last, half_life, now) == pytest.approx(expected)


def test_reinforce_rule() -> None:
    assert kvmem.reinforced_strength(1.0, 0.0, 100.0, 100.0) == pytest.approx(1.0)  # 0.5+0.5
    assert kvmem.reinforced_strength(1.0, 0.0, 100.0, 200.0) == pytest.approx(0.75)
    assert kvmem.reinforced_strength(1.0, 0.0, None, 10**6) == 1.0  # capped


def test_ttl_and_score() -> None:
    assert kvmem.expires_at(None, 5.0) is None
    assert kvmem.expires_at(10.0, 5.0) == 15.0
    assert kvmem.search_score(-2.0, 0.5) == 1.0
    assert kvmem.search_score(-2.0, 1.0) > kvmem.search_score(-2.0, 0.25)


@pytest.mark.parametrize("text", ["", "   ", "*** ---", 5, "x" * 1001])
def test_fts_query_refuses_empty_or_bad(text: object) -> None:
    with pytest.raises(kvmem.InvalidInputError, match="query"):
        kvmem.fts_query(text)


SECRET = bytes(range(32))


def test_cursor_round_trip() -> None:
    for key in ["a", "日本語", "x" * 512, "quote\"and'"]:
        cursor = kvmem.encode_cursor(key, "ns", "pre", "tag", False, secret=SECRET)
        assert kvmem.decode_cursor(cursor, "ns", "pre", "tag", False, secret=SECRET) == key


def _forged(body: dict[str, Any], check: bytes) -> str:
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(check + raw).decode().rstrip("=")


def test_garbled_or_forged_cursors_are_clear_errors() -> None:
    good = kvmem.encode_cursor("some-key", "default", None, None, False, secret=SECRET)
    body = {"v": kvmem.CURSOR_VERSION, "k": "\ud800",
            "f": kvmem._cursor_filter("default", None, None, False)}
    raw = json.dumps(body, separators=(",", ":")).encode()
    garbled = [
        good[:-1] + ("A" if good[-1] != "A" else "B"),  # one character changed
        good[:10],                                      # truncated
        good + "xyz",                                   # extended
        "not a cursor at all!",
        "",
        "=" * 20,
        "é" * 30,
        kvmem.encode_cursor("some-key", "other", None, None, False, secret=SECRET),
        kvmem.encode_cursor("some-key", "default", "p", None, False, secret=SECRET),
        kvmem.encode_cursor("some-key", "default", None, None, True, secret=SECRET),
        # another database's secret
        kvmem.encode_cursor("some-key", "default", None, None, False, secret=b"x" * 32),
        # forged: a lone surrogate as the key, with the unkeyed checksum cursors once had
        _forged(body, hashlib.sha256(raw).digest()[:16]),
        _forged(body, hashlib.sha256(raw).digest()[:8]),
    ]
    for cursor in garbled:
        with pytest.raises(kvmem.InvalidInputError, match="cursor"):
            kvmem.decode_cursor(cursor, "default", None, None, False, secret=SECRET)


def test_cursors_are_signed_by_their_database(tmp_path: Path) -> None:
    """The secret is made once per database, kept in it, shared by every process (and
    by reopening), and a cursor of one database is refused by another."""
    with kvmem.Store.open(tmp_path / "a.db", config=CONFIG) as a, \
            kvmem.Store.open(tmp_path / "b.db", config=CONFIG) as b:
        for store in (a, b):
            store.batch([{"op": "set", "key": f"k{i}", "value": i} for i in range(5)])
        cursor = a.list(limit=2).next_cursor
        assert cursor is not None
        with pytest.raises(kvmem.InvalidInputError, match="cursor"):
            b.list(limit=2, cursor=cursor)
    code = ("import kvmem, sys, json\n"
            "with kvmem.Store.open(sys.argv[1]) as s:\n"
            "    print(json.dumps([m.key for m in s.list(limit=2, cursor=sys.argv[2]).items]))")
    again = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.db"), cursor],
                           env=child_env(), capture_output=True, text=True, check=True)
    assert json.loads(again.stdout) == ["k2", "k3"]


# -------------------------------------------------------------------------- Store ----


def test_set_get_round_trip(store: kvmem.Store, clock: Clock) -> None:
    value = {"text": "likes green tea", "n": [1, 2.5, None, True], "ü": "ß"}
    created = store.set("user/prefs", value, tags=["prefs", "user"], namespace="agent-1")
    assert created.version == 1 and created.created_at == clock.now
    got = store.get("user/prefs", namespace="agent-1")
    assert got == created and got is not None and got.value == value
    assert store.get("user/prefs") is None  # other namespace
    clock.advance(5)
    updated = store.set("user/prefs", "plain", namespace="agent-1")
    assert updated.version == 2 and updated.created_at == created.created_at
    assert updated.updated_at == clock.now and updated.tags == []


@pytest.mark.parametrize("key", ["日本語のキー", "🧠", "a/../b", "spaces are fine", "x" * 512])
def test_unicode_and_odd_keys_round_trip(store: kvmem.Store, key: str) -> None:
    store.set(key, key)
    got = store.get(key)
    assert got is not None and got.key == key and got.value == key
    assert [m.key for m in store.list().items] == [key]


def test_compare_and_set(store: kvmem.Store) -> None:
    assert store.set("k", 1, if_version=0).version == 1  # create-only, absent: ok
    with pytest.raises(kvmem.VersionConflictError) as info:
        store.set("k", 2, if_version=0)  # create-only, present
    assert info.value.current_version == 1 and info.value.code == "version_conflict"
    with pytest.raises(kvmem.VersionConflictError) as info:
        store.set("k", 2, if_version=7)
    assert info.value.current_version == 1
    assert store.set("k", 2, if_version=1).version == 2
    got = store.get("k")
    assert got is not None and got.value == 2
    with pytest.raises(kvmem.VersionConflictError) as info:
        store.set("absent", 1, if_version=3)
    assert info.value.current_version == 0
    assert store.get("absent") is None


def test_delete(store: kvmem.Store) -> None:
    store.set("k", 1)
    store.set("k", 2)
    with pytest.raises(kvmem.VersionConflictError):
        store.delete("k", if_version=1)
    assert store.get("k") is not None
    assert store.delete("k", if_version=2) is True
    assert store.delete("k") is False
    assert store.get("k") is None
    assert store.set("k", 3).version == 1  # a new life starts at version 1


def test_bad_input_changes_nothing(store: kvmem.Store) -> None:
    store.set("k", "v")
    bad_calls: list[Callable[[], object]] = [
        lambda: store.set("", 1), lambda: store.set("k", math.nan),
        lambda: store.set("k", 1, tags="x"), lambda: store.set("k", 1, ttl_seconds=-1),
        lambda: store.set("k", 1, ttl_seconds=True), lambda: store.set("k", 1, if_version=-1),
        lambda: store.set("k", 1, half_life_seconds=0), lambda: store.set("k", 1, namespace="a b"),
        lambda: store.list(limit=0), lambda: store.list(limit=1001), lambda: store.list(cursor="x"),
        lambda: store.search("***"), lambda: store.delete("k\n"),
    ]
    for call in bad_calls:
        with pytest.raises(kvmem.InvalidInputError):
            call()
    got = store.get("k")
    assert got is not None and got.value == "v" and got.version == 1


@pytest.mark.backends("sqlite")  # SQLite's own connections and files
def test_get_never_writes(store: kvmem.Store, clock: Clock, tmp_path: Path) -> None:
    store.set("expiring", 1, ttl_seconds=1)
    store.set("decaying", 1, half_life_seconds=1)
    clock.advance(100)
    watcher = kvmem.open_db(tmp_path / "kv.db", config=CONFIG)
    try:
        before = watcher.execute("PRAGMA data_version").fetchone()[0]
        for _ in range(3):
            assert store.get("expiring") is None
            store.get("decaying")
            store.list()
            store.search("anything")
        after = watcher.execute("PRAGMA data_version").fetchone()[0]
        rows = watcher.execute("SELECT count(*) FROM memories").fetchone()[0]
    finally:
        watcher.close()
    assert before == after  # no other connection committed anything
    assert rows == 2  # the expired memory is still there until prune


def test_extreme_half_lives_and_strengths_never_fail(store: kvmem.Store, clock: Clock) -> None:
    """Every half-life and strength the API and import accept is arithmetic both backends
    take: a half-life of 1e-310 decays to nothing in a second (PostgreSQL's float8 raised
    "value out of range" for elapsed / 1e-310, failing search and every prune)."""
    store.set("tiny", "hello there", half_life_seconds=1e-310)
    store.set("huge", "hello again", half_life_seconds=3e9)  # the most: about 95 years
    faint = {"namespace": "default", "key": "faint", "value": "hello faint", "tags": [],
             "version": 1, "created_at": clock.now, "updated_at": clock.now,
             "expires_at": None, "strength": 1e-300, "half_life_seconds": 1e9,
             "last_reinforced_at": clock.now, "archived": False}
    store.import_(io.StringIO(json.dumps(faint) + "\n"))
    clock.advance(1)
    assert {h.memory.key for h in store.search("hello")} >= {"huge"}
    assert store.prune().archived == 2  # tiny and faint
    assert [m.key for m in store.list(archived=True).items] == ["faint", "tiny"]
    assert [m.key for m in store.list().items] == ["huge"]


def test_ttl_expiry(store: kvmem.Store, clock: Clock) -> None:
    store.set("short", "gone soon", ttl_seconds=10, tags=["t"])
    store.set("long", "stays", ttl_seconds=1000)
    clock.advance(9.9)
    assert store.get("short") is not None
    clock.advance(0.2)
    assert store.get("short") is None
    assert [m.key for m in store.list().items] == ["long"]
    assert [m.key for m in store.list(tag="t").items] == []
    assert store.search("gone soon") == []
    assert store.stats()["counts"] == {"live": 1, "archived": 0, "expired_pending": 1}
    with pytest.raises(kvmem.NotFoundError):
        store.reinforce("short")
    assert store.set("short", "again", if_version=0).version == 1  # expired = absent
    clock.advance(100)
    assert store.prune().deleted == 0  # the second life of 'short' has no TTL
    clock.advance(1000)
    assert store.get("long") is None
    assert store.prune().deleted == 1
    assert store.get("short") is not None


def test_prune_deletes_expired(store: kvmem.Store, clock: Clock) -> None:
    for i in range(30):
        store.set(f"e{i}", i, ttl_seconds=5)
    store.set("keep", 1)
    clock.advance(6)
    assert store.stats()["counts"]["expired_pending"] == 30
    assert store.prune().deleted == 30
    assert store.prune().deleted == 0  # idempotent
    assert store.stats()["counts"] == {"live": 1, "archived": 0, "expired_pending": 0}


def test_decay_archive_restore(store: kvmem.Store, clock: Clock) -> None:
    store.set("fading", "old news", half_life_seconds=100, tags=["news"])
    store.set("steady", "no half-life")
    clock.advance(400)  # strength 1/16 = 0.0625: above the 0.05 threshold
    assert store.prune().archived == 0
    assert store.get("fading") is not None
    clock.advance(100)  # 1/32 = 0.031: below
    assert store.prune().archived == 1
    assert store.get("fading") is None and store.get("steady") is not None
    assert [m.key for m in store.list().items] == ["steady"]
    assert [m.key for m in store.list(archived=True).items] == ["fading"]
    assert store.search("news") == []
    restored = store.reinforce("fading")  # reinforce restores: 0.031 + 0.5
    assert not restored.archived and restored.strength == pytest.approx(1 / 32 + 0.5)
    assert store.get("fading") is not None and store.search("news")
    clock.advance(1000)
    store.prune()
    assert store.get("fading") is None
    again = store.set("fading", "fresh news")  # set restores too, at full strength
    assert again.version == 2 and again.strength == 1.0 and not again.archived
    assert store.list(archived=True).items == []


def test_search_finds_key_value_and_tags(store: kvmem.Store) -> None:
    store.set("deadline-alpha", {"note": "ship the release"}, tags=["work"])
    store.set("groceries", ["milk", "bread"], tags=["home"])
    store.set("misc", {"numbers": [1, 2]})
    assert [h.memory.key for h in store.search("alpha")] == ["deadline-alpha"]  # key
    assert [h.memory.key for h in store.search("bread")] == ["groceries"]  # value text
    assert [h.memory.key for h in store.search("home")] == ["groceries"]  # tag
    assert store.search("release", namespace="other") == []


def test_search_stronger_outranks_weaker(store: kvmem.Store, clock: Clock) -> None:
    for i in range(20):  # unrelated memories, so that the words below are rare (BM25 idf)
        store.set(f"filler{i}", f"unrelated filler number {i}")
    store.set("weak", "the launch code is blue", half_life_seconds=100)
    store.set("strong", "the launch code is blue", half_life_seconds=100)
    clock.advance(200)  # both at 0.25
    store.reinforce("strong")  # 0.75
    hits = store.search("launch code")
    assert [h.memory.key for h in hits] == ["strong", "weak"]
    assert hits[0].score == pytest.approx(hits[1].score * 3)
    assert all(h.score > 0 for h in hits)
    assert store.search("launch", limit=1)[0].memory.key == "strong"


@pytest.mark.parametrize("query", [
    '"', "'", "NEAR(", "a AND", "OR", "*", "col:val", "(((", "^x", "-x", "x\"y", "a)b(c",
    "🙂 emoji", "ümlaut", "DROP TABLE", "memories_fts MATCH",
])
def test_search_special_characters_are_text(store: kvmem.Store, query: str) -> None:
    store.set("k", "x y col val ümlaut emoji drop table near")
    try:
        hits = store.search(query)
    except kvmem.InvalidInputError as exc:  # no word characters at all: a clear error
        assert "query" in str(exc)
    else:
        assert isinstance(hits, list)


def test_list_prefix_tag_and_pages(store: kvmem.Store) -> None:
    for i in range(25):
        store.set(f"note/{i:02d}", i, tags=["even"] if i % 2 == 0 else ["odd"])
    store.set("other", 0)
    keys: list[str] = []
    cursor = None
    while True:
        page = store.list(prefix="note/", limit=7, cursor=cursor)
        keys += [m.key for m in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert keys == [f"note/{i:02d}" for i in range(25)]
    assert [m.value for m in store.list(tag="even", limit=100).items] == list(range(0, 25, 2))
    assert len(store.list(limit=1000).items) == 26
    with pytest.raises(kvmem.InvalidInputError, match="cursor"):
        store.list(prefix="other", cursor=cursor)  # a cursor of another query


def test_pagination_while_another_thread_writes(store: kvmem.Store) -> None:
    before = {f"k{i:04d}" for i in range(600)}
    store.batch([{"op": "set", "key": k, "value": 0} for k in sorted(before)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(7)
        try:
            while not stop.is_set():
                store.set(f"k{rng.randrange(10000):04d}x", 1)  # new keys everywhere
                store.set(f"k{rng.randrange(600):04d}", 2)     # updates of old ones
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[str] = []
    cursor = None
    try:
        while True:
            page = store.list(limit=13, cursor=cursor)
            seen += [m.key for m in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(seen) == len(set(seen)), "a key was returned twice"
    assert before - set(seen) == set(), "a key that existed before the scan was skipped"
    assert seen == sorted(seen)


def test_batch_is_atomic(store: kvmem.Store) -> None:
    store.set("existing", "old")
    results = store.batch([
        {"op": "set", "key": "a", "value": 1, "tags": ["x"]},
        {"op": "set", "key": "existing", "value": "new", "if_version": 1},
        {"op": "delete", "key": "nothing-here"},
    ])
    assert results[0]["memory"].version == 1 and results[1]["memory"].version == 2
    assert results[2] == {"op": "delete", "deleted": False}

    with pytest.raises(kvmem.VersionConflictError) as info:
        store.batch([
            {"op": "set", "key": "b", "value": 1},
            {"op": "delete", "key": "a"},
            {"op": "set", "key": "existing", "value": "newer", "if_version": 1},  # stale
            {"op": "set", "key": "c", "value": 1},
        ])
    assert info.value.op_index == 2 and info.value.current_version == 2
    assert "ops[2]" in str(info.value)
    assert store.get("b") is None and store.get("a") is not None
    got = store.get("existing")
    assert got is not None and got.value == "new"

    bad_batches: list[tuple[list[dict[str, Any]], int]] = [
        ([{"op": "set", "key": "d", "value": 1}, {"op": "set", "key": ""}], 1),
        ([{"op": "upsert", "key": "d"}], 0),
        ([{"op": "set", "key": "d", "value": 1, "extra": 1}], 0),
        ([{"op": "delete"}], 0)]
    for bad, index in bad_batches:
        with pytest.raises(kvmem.InvalidInputError, match=rf"ops\[{index}\]"):
            store.batch(bad)
    assert store.get("d") is None
    with pytest.raises(kvmem.InvalidInputError):
        store.batch([])


# --------------------------------------------------------------------- group commit ----


def test_group_commit_many_threads(store: kvmem.Store, backend: str) -> None:
    acked: dict[str, int] = {}
    lock = threading.Lock()

    def writer(t: int) -> None:
        for i in range(200):
            memory = store.set(f"t{t:02d}-{i:03d}", {"t": t, "i": i})
            with lock:
                acked[memory.key] = memory.version

    errors = run_threads(writer, 16)
    assert errors == [] and len(acked) == 3200
    page = store.list(limit=1000)
    present = {m.key for m in page.items}
    cursor = page.next_cursor
    while cursor:
        page = store.list(limit=1000, cursor=cursor)
        present |= {m.key for m in page.items}
        cursor = page.next_cursor
    assert present == set(acked)
    if backend == "postgresql":
        return  # a COMMIT per write there (group commit is SQLite's)
    figures = store.stats()["group_commit"]
    assert figures["ops"] >= 3200
    assert figures["commits"] * 3 <= figures["ops"], figures  # far fewer COMMITs than writes
    assert figures["largest_group"] > 1


@pytest.mark.backends("sqlite")  # SQLite's own connections and files
def test_failing_op_in_a_group_fails_alone(store: kvmem.Store) -> None:
    store.set("cas", "v1")
    # Park a leader inside a group, so that the writes below all queue up behind it and
    # then land together in the next group.
    parked, release = threading.Event(), threading.Event()

    def park(conn: kvmem.KvmemConnection) -> None:
        parked.set()
        release.wait()

    blocker = threading.Thread(target=store._writer.submit, args=(park,))
    blocker.start()
    assert parked.wait(10)
    outcomes: dict[str, Any] = {}

    def call(name: str, fn: Any) -> None:
        try:
            outcomes[name] = fn()
        except BaseException as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=(f"ok{i}", lambda i=i: store.set(f"ok{i}", i)))
               for i in range(10)]
    threads.append(threading.Thread(
        target=call, args=("bad", lambda: store.set("cas", "v2", if_version=5))))
    for thread in threads:
        thread.start()
    while store._writer.pending() < 11:  # all eleven queued (a condition, not a sleep)
        threading.Event().wait(0.001)
    release.set()
    for thread in [*threads, blocker]:
        thread.join()
    assert isinstance(outcomes.pop("bad"), kvmem.VersionConflictError)
    assert all(isinstance(m, kvmem.Memory) for m in outcomes.values()), outcomes
    assert all(store.get(f"ok{i}") is not None for i in range(10))
    got = store.get("cas")
    assert got is not None and got.value == "v1"
    figures = store.stats()["group_commit"]
    assert figures["largest_group"] == 11 and figures["failed_ops"] == 1


@pytest.mark.backends("sqlite")  # SQLite's own connections and files
def test_storage_full_fails_the_group_and_recovers(store: kvmem.Store, tmp_path: Path) -> None:
    store.set("before", "small")
    conn = kvmem.open_db(tmp_path / "kv.db", config=CONFIG)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    # max_page_count is per connection: set it on the group committer's own connection.
    store._writer.submit(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 2}"))
    with pytest.raises(kvmem.StorageFullError):
        store.set("big", "x" * 200_000)
    assert store.get("big") is None
    got = store.get("before")
    assert got is not None and got.value == "small"  # reads keep working
    store._writer.submit(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    assert store.set("big", "x" * 200_000).version == 1  # and writes again, no restart


def test_sigkill_loses_no_group_committed_write(tmp_path: Path) -> None:
    db = str(tmp_path / "kv.db")
    rng = random.Random(99)
    acked: dict[str, int] = {}
    for run in range(10):
        child = Child("group_writer", db, f"r{run}")
        for _ in range(rng.randint(20, 400)):
            child.expect(f"r{run}-")
        for line in child.kill():
            fields = line.split()
            if len(fields) == 3 and fields[2] == "ok":  # a line cut by the kill is no ack
                acked[fields[0]] = int(fields[1])
        check_acknowledged(db, acked, config=CONFIG)
    assert len(acked) >= 200


# ----------------------------------------------------------------- prune, two processes ----


def _decayed_export(count: int) -> str:
    """Export lines of memories that are already expired or faded (old timestamps)."""
    lines = []
    for i in range(count):
        record = {"namespace": "default", "key": f"m{i:05d}", "value": {"i": i}, "tags": [],
                  "version": 1, "created_at": 1000.0, "updated_at": 1000.0,
                  "expires_at": 2000.0 if i % 3 == 0 else None, "strength": 1.0,
                  "half_life_seconds": 10.0 if i % 3 == 1 else None,
                  "last_reinforced_at": 1000.0, "archived": False}
        lines.append(json.dumps(record))
    return "\n".join(lines) + "\n"


def test_two_processes_prune_concurrently(tmp_path: Path) -> None:
    text = _decayed_export(900)
    for name in ("both.db", "one.db"):
        with kvmem.Store.open(tmp_path / name, config=CONFIG) as s:
            assert s.import_(io.StringIO(text))["imported"] == 900
    children = [Child("pruner", str(tmp_path / "both.db"), stdin=True) for _ in range(2)]
    for child in children:
        child.expect("ready")
    for child in children:
        child.send("go\n")
    totals = [0, 0]
    for child in children:
        _, archived, deleted = child.expect("pruned").split()
        totals[0] += int(archived)
        totals[1] += int(deleted)
        assert child.wait() == 0, child.stderr
        assert "Traceback" not in child.stderr and "Error" not in child.stderr
    assert totals == [300, 300]  # each memory pruned once, by one process or the other
    with kvmem.Store.open(tmp_path / "one.db", config=CONFIG) as s:
        s.prune()
        expected = io.StringIO()
        s.export(expected)
    with kvmem.Store.open(tmp_path / "both.db", config=CONFIG) as s:
        actual = io.StringIO()
        s.export(actual)
    assert actual.getvalue() == expected.getvalue()
    assert len(actual.getvalue().splitlines()) == 600


# ------------------------------------------------------------------- export / import ----


def test_export_import_round_trip(tmp_path: Path, clock: Clock) -> None:
    with kvmem.Store.open(tmp_path / "a.db", config=CONFIG, clock=clock) as a:
        a.set("plain", "text", tags=["t1", "t2"])
        a.set("json", {"deep": [1, {"x": None}], "f": 0.1 + 0.2}, namespace="ns2")
        a.set("ttl", 1, ttl_seconds=3600)
        a.set("decay", 2, half_life_seconds=60)
        a.set("versioned", 1)
        a.set("versioned", 2)
        a.set("日本", "ユニコード")
        clock.advance(600)
        a.prune()  # archives "decay"
        a.reinforce("plain")
        first = io.StringIO()
        assert a.export(first) == 6
    with kvmem.Store.open(tmp_path / "b.db", config=CONFIG, clock=clock) as b:
        assert b.import_(io.StringIO(first.getvalue())) == {"imported": 6, "lines": 6}
        second = io.StringIO()
        b.export(second)
        got = b.get("versioned")
        assert got is not None and got.version == 2
        assert [h.memory.key for h in b.search("ユニコード")] == ["日本"]  # FTS rebuilt
        assert [m.key for m in b.list(archived=True).items] == ["decay"]
    assert second.getvalue() == first.getvalue()
    records = [json.loads(line) for line in first.getvalue().splitlines()]
    assert {r["key"] for r in records if r["archived"]} == {"decay"}


def test_import_bad_lines_reported_nothing_imported(store: kvmem.Store) -> None:
    good = _decayed_export(3).splitlines()
    lines = [good[0], "{not json", good[1], json.dumps({"key": "x"}),
             json.dumps({**json.loads(good[2]), "namespace": "bad ns"}), good[2]]
    with pytest.raises(kvmem.InvalidInputError) as info:
        store.import_(io.StringIO("\n".join(lines) + "\n"))
    message = str(info.value)
    assert "line 2:" in message and "line 4:" in message and "line 5:" in message
    assert "line 1:" not in message and "line 3:" not in message
    assert store.stats()["counts"] == {"live": 0, "archived": 0, "expired_pending": 0}


def test_import_is_resumable(store: kvmem.Store) -> None:
    text = _decayed_export(120)
    store.import_(io.StringIO("\n".join(text.splitlines()[:50]) + "\n"))  # cut short
    assert store.import_(io.StringIO(text))["imported"] == 120  # run again: converges
    exported = io.StringIO()
    store.export(exported)
    assert sorted(exported.getvalue().splitlines()) == sorted(
        json.dumps(json.loads(line), ensure_ascii=False) for line in text.splitlines())


def test_export_streams_constant_memory(store: kvmem.Store) -> None:
    class CountingSink(io.StringIO):
        writes = 0

        def write(self, s: str) -> int:
            CountingSink.writes += 1
            return len(s)

    store.batch([{"op": "set", "key": f"k{i}", "value": i} for i in range(1000)])
    assert store.export(CountingSink()) == 1000 and CountingSink.writes == 1000


# ------------------------------------------------------------------ decay scheduler ----


def test_decay_scheduler_prunes_and_survives_busy(tmp_path: Path, clock: Clock,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = kvmem.Config.build(environ={}, flags={"decay_interval_s": "0.05",
                                                   "busy_timeout_ms": "100"})
    with kvmem.Store.open(tmp_path / "kv.db", config=config, clock=clock) as store:
        store.set("e", 1, ttl_seconds=1)
        holder = kvmem.open_db(tmp_path / "kv.db", config=config)
        holder.execute("BEGIN IMMEDIATE")  # the scheduler's prune will meet a busy database
        clock.advance(5)
        scheduler = kvmem.DecayScheduler(store, role="test").start()
        try:
            while scheduler.state()["errors"] == 0:  # wait for a logged busy failure
                threading.Event().wait(0.01)
            holder.execute("COMMIT")
            # ... then for the retry: its prune committed and its run was counted
            while store.stats()["counts"]["expired_pending"] or not scheduler.state()["runs"]:
                threading.Event().wait(0.01)
            state = scheduler.state()
        finally:
            scheduler.stop()
            holder.close()
    assert state["failed"] is None and state["runs"] >= 1
    assert "BusyError" in str(state["last_error"])
    assert "[test] prune failed (BusyError)" in caplog.text


def test_store_health_sees_a_replaced_file(tmp_path: Path) -> None:
    with kvmem.Store.open(tmp_path / "kv.db", config=CONFIG) as store:
        assert store.health() == {"ok": True, "problems": [], "past": {}}
        os.rename(tmp_path / "kv.db", tmp_path / "moved.db")
        health = store.health()
    assert not health["ok"] and "deleted" in health["problems"][0]


def test_sqlite_raw_rows_match_memory_fields(store: kvmem.Store, tmp_path: Path) -> None:
    """The schema and Memory agree: every column a Memory field, nothing else."""
    conn = kvmem.open_db(tmp_path / "kv.db", config=CONFIG)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(memories)")]
    conn.close()
    assert columns[1:] == [f.name for f in dataclasses.fields(kvmem.Memory)]


def test_own_connections_never_recreate_a_moved_database(tmp_path: Path) -> None:
    """kvmem's later connections (read pool, background threads) open with create=False:
    a database moved away while the store runs is not replaced by a fresh empty file."""
    db = tmp_path / "kv.db"
    with kvmem.Store.open(db, config=CONFIG) as store:
        store.set("k", 1)
        os.rename(db, tmp_path / "moved.db")
        idle = store._reads.take()  # the pool has to open a new connection now
        try:
            with pytest.raises(kvmem.StorageError):
                store.get("k")
            checkpointer = kvmem.Checkpointer(db, config=CONFIG, role="late").start()
            while checkpointer.state()["errors"] == 0:  # its first open failed (a condition)
                threading.Event().wait(0.01)
            checkpointer.stop()
        finally:
            store._reads.give(idle, None)
        assert not db.exists()
        assert store.health()["ok"] is False


# ------------------------------------------------------------- bounded memory use ----


def test_a_list_page_stops_at_its_byte_budget_and_the_cursor_continues(
        store_with: Callable[..., kvmem.Store]) -> None:
    with store_with(max_page_bytes="10000") as store:
        store.batch([{"op": "set", "key": f"k{i:03d}", "value": "v" * 2000} for i in range(23)])
        store.set("k999-huge", "h" * 50_000)  # alone it passes the budget: a page of its own
        pages: list[list[str]] = []
        cursor = None
        while True:
            page = store.list(limit=1000, cursor=cursor)
            pages.append([m.key for m in page.items])
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert [len(p) for p in pages] == [4, 4, 4, 4, 4, 3, 1], pages
        assert [k for p in pages for k in p] == [f"k{i:03d}" for i in range(23)] + ["k999-huge"]
        store.batch([{"op": "set", "key": f"s{i}", "value": "tea " + "x" * 3000}
                     for i in range(10)])
        assert len(store.search("tea", limit=100)) == 3  # 3 x ~3 KB fit in 10 KB, 4 do not
        store.set("big", "haystack " + "y" * 20000)
        assert [h.memory.key for h in store.search("haystack")] == ["big"]  # at least one


def test_read_connections_are_bounded(tmp_path: Path) -> None:
    """However many threads read at once, at most read_connections connections exist;
    past them a reader waits, and past busy_timeout_ms it gets BusyError."""
    config = kvmem.Config.build(environ={}, flags={"read_connections": "2",
                                                   "busy_timeout_ms": "300"})
    with kvmem.Store.open(tmp_path / "kv.db", config=config) as store:
        store.set("k", 1)
        go = threading.Barrier(16)

        def reader(n: int) -> None:
            go.wait()
            for _ in range(200):
                assert store.get("k") is not None

        assert run_threads(reader, 16) == []
        # Descriptors of the database file: the writer, its checkpoint gate, and at most
        # two read connections (16 readers used to open up to 16 and keep 8).
        db = os.path.realpath(tmp_path / "kv.db")
        fds = [fd for fd in os.listdir("/proc/self/fd")
               if os.path.realpath(f"/proc/self/fd/{fd}") == db]
        assert len(fds) <= 4, len(fds)
        held = [store._reads.take(), store._reads.take()]
        with pytest.raises(kvmem.BusyError, match="read connections"):
            store.get("k")
        store._reads.give(held.pop(), None)
        assert store.get("k") is not None
        store._reads.give(held.pop(), None)
        cache = store.stats()["settings"]["cache_size"]
        assert cache == -config.read_cache_kib  # the smaller cache of read connections


def test_readers_waiting_for_a_read_connection_are_served_in_turn(tmp_path: Path) -> None:
    """16 threads read through 2 connections: each gets its turn (a reader that gave its
    connection back used to take it again at once, so some threads never read and got
    BusyError after busy_timeout_ms)."""
    config = kvmem.Config.build(environ={}, flags={"read_connections": "2",
                                                   "busy_timeout_ms": "2000"})
    with kvmem.Store.open(tmp_path / "kv.db", config=config) as store:
        store.set("k", 1)
        done = [0] * 16

        def reader(n: int) -> None:
            for _ in range(300):
                store.get("k")
                done[n] += 1

        errors = run_threads(reader, 16)
        assert errors == [] and done == [300] * 16


# ------------------------------------------------------------------------- forget ----


def _forget_fixture(store_with: Callable[..., kvmem.Store], clock: Clock) -> kvmem.Store:
    """250 memories under u/ (odd ones tagged 'old', u/000 archived, u/002 expired), and
    v/keep tagged 'old' in the same namespace, u/001 in another; batches of 7."""
    store = store_with(prune_batch="7")
    for i in range(250):
        store.set(f"u/{i:03d}", {"n": i}, tags=["old"] if i % 2 else [],
                  ttl_seconds=100 if i == 2 else None,
                  half_life_seconds=1 if i == 0 else None)
    store.set("v/keep", "stays", tags=["old"])
    store.set("u/001", "other namespace", tags=["old"], namespace="elsewhere")
    clock.advance(60)
    assert store.prune().archived == 1  # u/000
    clock.advance(60)  # u/002 expires, not yet pruned
    assert store.get("u/002") is None
    return store


def test_forget_dry_run_reports_what_it_would_delete_and_changes_nothing(
        store_with: Callable[..., kvmem.Store], clock: Clock) -> None:
    store = _forget_fixture(store_with, clock)
    out = io.StringIO()
    store.export(out)
    report = store.forget(prefix="u/", dry_run=True)
    assert report["dry_run"] and report["deleted"] == 0
    assert report["matched"] == 250  # live, archived and expired ones alike
    assert report["keys"] == [f"u/{i:03d}" for i in range(100)] and report["more"]
    again = io.StringIO()
    store.export(again)
    assert again.getvalue() == out.getvalue()
    tagged = store.forget(prefix="u/", tags=["old"], dry_run=True)
    assert tagged["matched"] == 125 and tagged["keys"][:2] == ["u/001", "u/003"]
    assert store.forget(tags=["old"], dry_run=True)["matched"] == 126  # and v/keep


def commits(store: kvmem.Store) -> int:
    """The transactions the store committed: SQLite's group commits, or PostgreSQL's."""
    stats = store.stats()
    return int(stats["group_commit"]["commits"] if stats["backend"] == "sqlite"
               else stats["transactions"]["commits"])


def test_forget_deletes_exactly_its_selection_in_batches(
        store_with: Callable[..., kvmem.Store], clock: Clock) -> None:
    store = _forget_fixture(store_with, clock)
    before = commits(store)
    report = store.forget(prefix="u/", tags=["old"])
    # A transaction per 7 memories walked (250 under u/; the last window also holds v/keep),
    # matched or not: never one long transaction.
    assert commits(store) - before == math.ceil(251 / 7)
    assert report["deleted"] == report["matched"] == 125 and not report["dry_run"]
    assert report["keys"] == [f"u/{i:03d}" for i in range(1, 200, 2)] and report["more"]
    left = {m.key for m in store.list(prefix="u/", limit=1000).items}
    assert left == {f"u/{i:03d}" for i in range(0, 250, 2)} - {"u/000", "u/002"}
    assert [m.key for m in store.list(archived=True).items] == ["u/000"]
    kept, other = store.get("v/keep"), store.get("u/001", namespace="elsewhere")
    assert kept is not None and kept.value == "stays"  # tagged, outside the prefix
    assert other is not None and other.value == "other namespace"
    rest = store.forget(prefix="u/")  # archived and expired ones included
    assert rest["deleted"] == 125
    assert store.forget(prefix="v/")["deleted"] == 1
    assert store.namespaces() == [{"namespace": "elsewhere", "live": 1, "archived": 0}]


@pytest.mark.parametrize(("arguments", "message"), [
    ({}, "forget needs a prefix or tags"),
    ({"prefix": None, "tags": []}, "forget needs a prefix or tags"),
    ({"prefix": ""}, "forget needs a prefix or tags"),
    ({"prefix": "u/", "dry_run": "yes"}, "dry_run must be true or false"),
    ({"prefix": "u/\x00"}, "prefix"),
    ({"tags": ["a b c" * 40]}, "tag"),
    ({"prefix": "u/", "namespace": "no/slash"}, "namespace"),
])
def test_forget_bad_input_is_refused_and_changes_nothing(
        store: kvmem.Store, arguments: dict[str, Any], message: str) -> None:
    store.set("u/1", 1)
    with pytest.raises(kvmem.InvalidInputError, match=message):
        store.forget(**arguments)
    memory = store.get("u/1")
    assert memory is not None and memory.value == 1


def _everything(store: kvmem.Store) -> dict[tuple[str, str], tuple[int, Any]]:
    """(namespace, key) -> (version, value) of every live memory, page by page."""
    out: dict[tuple[str, str], tuple[int, Any]] = {}
    for namespace in ("default", "other"):
        cursor = None
        while True:
            page = store.list(namespace=namespace, limit=1000, cursor=cursor)
            out |= {(namespace, m.key): (m.version, m.value) for m in page.items}
            if (cursor := page.next_cursor) is None:
                break
    return out


def test_sigkill_during_a_bulk_forget_loses_nothing_outside_its_selection(
        tmp_path: Path) -> None:
    """A forget of 1,500 memories in batches of 10, killed with SIGKILL once some batches
    are committed and others not: every memory outside the selection (same prefix without
    the tag, other keys, another namespace) is still there, unchanged, and what is gone of
    the selection went in key order (never a memory skipped in between)."""
    db = str(tmp_path / "kv.db")
    with kvmem.Store.open(db, config=CONFIG) as store:
        for start in range(0, 2000, 500):
            store.batch([{"op": "set", "key": f"sel/{i:04d}", "value": {"n": i},
                          "tags": ["x"] if i % 4 else ["y"]}
                         for i in range(start, start + 500)])
        store.batch([{"op": "set", "key": f"zzz/{i}", "value": i, "tags": ["x"]}
                     for i in range(200)])
        store.batch([{"op": "set", "key": f"sel/{i}", "value": i, "tags": ["x"]}
                     for i in range(100)], namespace="other")
        before = _everything(store)
    selected = {key for (ns, key) in before if ns == "default" and key.startswith("sel/")
                and int(key[4:]) % 4}
    assert len(before) == 2300 and len(selected) == 1500
    child = Child("forgetter", db, stdin=True)
    child.expect("ready")
    reader = kvmem.open_db(db, config=CONFIG, readonly=True)
    try:
        child.send("go\n")
        while True:  # until a few batches are committed, but not all
            left = reader.execute("SELECT count(*) FROM memories WHERE namespace = 'default'"
                                  " AND key LIKE 'sel/%' AND tags = '[\"x\"]'").fetchone()[0]
            assert child.proc.poll() is None, f"the forget ended first: {child.kill()}"
            if left <= 1500 - 30:
                break
    finally:
        reader.close()
    child.kill()
    assert child.killed, "the child was not running when it was killed"
    with kvmem.Store.open(db, config=CONFIG) as store:
        after = _everything(store)
    kept_outside = {k: v for k, v in before.items() if k[1] not in selected or k[0] != "default"}
    assert {k: after.get(k) for k in kept_outside} == kept_outside
    gone = sorted(key for key in selected if ("default", key) not in after)
    assert 30 <= len(gone) < 1500
    assert gone == sorted(selected)[:len(gone)]  # in key order, nothing skipped
    for key in selected - set(gone):
        assert after[("default", key)] == before[("default", key)]


def test_an_interrupted_forget_ends_between_batches(store: kvmem.Store) -> None:
    store.batch([{"op": "set", "key": f"k{i}", "value": i} for i in range(10)])
    store.interrupt()
    with pytest.raises(kvmem.BusyError, match="forget ended after deleting 0 memories"):
        store.forget(prefix="k")
    assert len(store.list().items) == 10
