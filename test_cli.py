"""The command line of all three programs: ``kvmem``'s data and file commands, what
``--version`` and ``--help`` say, and how kvmem-http and kvmem-mcp fail to start.

Every test runs the real programs as child processes on real files in tmp_path and reads
what they print; the database is read back through the library.  A server is waited on
by the line it prints when it listens, never by a sleep.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import importlib.metadata
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import kvmem
import kvmem_cli
from testutil import (
    FILTER_CASES,
    HERE,
    LIST_CASES,
    Child,
    child_env,
    fill_filter_store,
    found_keys,
)

CONFIG = kvmem.Config.build(environ={})
MODULES = {"kvmem": "kvmem_cli", "kvmem-http": "http_server", "kvmem-mcp": "mcp_server"}
TIMEOUT_S = 30  # a server that starts when it should not is a failure, not a hang


def run(program: str, *args: str, env: dict[str, str] | None = None, stdin: str | None = None,
        python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """``program`` (kvmem, kvmem-http or kvmem-mcp) run from this directory by
    ``python``, with ``args``; stdin is ``stdin``, else empty."""
    return subprocess.run([python, "-m", MODULES[program], *args], cwd=HERE,
                          env=env or child_env(), input=stdin or "", capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def kvmem_json(*args: str, db: str | Path | None = None, stdin: str | None = None,
               env: dict[str, str] | None = None) -> tuple[int, Any]:
    """``kvmem ARGS`` on the database ``db`` (KVMEM_DB): its exit status and its output as
    JSON.  No traceback, whatever happened; an error is one JSON line."""
    extra = {"KVMEM_DB": str(db)} if db is not None else {}
    result = run("kvmem", *args, env=env or child_env(**extra), stdin=stdin)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 1 and args[0] != "check":  # check prints its report
        assert result.stdout.count("\n") == 1, result.stdout  # one line
    return result.returncode, json.loads(result.stdout)


def assert_error(outcome: tuple[int, Any], code: str, *texts: str) -> dict[str, Any]:
    """A failed command: exit 1 and ``{"ok": false, "error": {"code": code, ...}}`` whose
    message holds each of ``texts``."""
    status, body = outcome
    assert status == 1 and body["ok"] is False and body["error"]["code"] == code, outcome
    for text in texts:
        assert text in body["error"]["message"], (text, body)
    error: dict[str, Any] = body["error"]
    return error


def exported(db: str | Path) -> list[dict[str, Any]]:
    """Every memory of ``db`` as Store.export writes it."""
    out = io.StringIO()
    with kvmem.Store.open(db, config=CONFIG, checkpointer=False) as store:
        store.export(out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def tree(root: Path) -> list[str]:
    """Every file and directory under ``root``, relative to it."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


# ------------------------------------------------------------------- data commands ----


def test_set_get_delete_reinforce(tmp_path: Path) -> None:
    db = tmp_path / "new" / "kv.db"  # set creates the database and its directory
    status, created = kvmem_json("set", "user/tea", '{"likes": "green tea"}', "--tag", "prefs",
                                 "--tag", "drinks", "--ttl-seconds", "3600", db=db)
    assert status == 0, created
    assert (created["key"], created["value"], created["tags"], created["version"]) == \
        ("user/tea", {"likes": "green tea"}, ["prefs", "drinks"], 1)
    assert created["expires_at"] is not None and created["namespace"] == "default"
    status, piped = kvmem_json("set", "user/tea", "-", "--if-version", "1", "--namespace",
                               "agent-1", db=db, stdin='{"from": "stdin"}\n')
    assert status == 1  # version 1 is in "default", not in agent-1: the key is absent there
    assert assert_error((status, piped), "version_conflict")["current_version"] == 0
    status, piped = kvmem_json("set", "user/tea", "-", "--if-version", "0", "--namespace",
                               "agent-1", "--half-life-seconds", "60", db=db,
                               stdin='{"from": "stdin"}\n')
    assert status == 0 and piped["value"] == {"from": "stdin"}, piped
    assert piped["half_life_seconds"] == 60 and piped["namespace"] == "agent-1"

    status, got = kvmem_json("get", "user/tea", "--db", str(db))
    assert status == 0 and got == {**created, "current_strength": got["current_strength"]}
    with kvmem.Store.open(db, config=CONFIG, checkpointer=False) as store:
        stored = store.get("user/tea")
        assert stored is not None and stored.render(store.clock())["updated_at"] == \
            got["updated_at"]
        assert stored.value == {"likes": "green tea"} and stored.tags == ["prefs", "drinks"]
        other = store.get("user/tea", namespace="agent-1")
        assert other is not None and other.value == {"from": "stdin"}

    conflict = kvmem_json("set", "user/tea", '"x"', "--if-version", "7", db=db)
    assert assert_error(conflict, "version_conflict")["current_version"] == 1
    status, again = kvmem_json("set", "user/tea", '"black"', "--if-version", "1", db=db)
    assert status == 0 and (again["value"], again["version"], again["tags"]) == ("black", 2, [])
    status, reinforced = kvmem_json("reinforce", "user/tea", "--namespace", "agent-1", db=db)
    assert status == 0 and reinforced["version"] == 1 and reinforced["value"] == {"from": "stdin"}

    assert_error(kvmem_json("delete", "user/tea", "--if-version", "1", db=db), "version_conflict")
    assert kvmem_json("delete", "user/tea", "--if-version", "2", db=db) == (0, {"deleted": True})
    assert_error(kvmem_json("delete", "user/tea", db=db), "not_found", "'user/tea'")
    assert_error(kvmem_json("get", "user/tea", db=db), "not_found", "'user/tea'")
    assert_error(kvmem_json("reinforce", "user/tea", db=db), "not_found")
    too_big = '"' + "x" * kvmem_cli.MAX_VALUE_TEXT + '"'  # refused before it is all read
    assert_error(kvmem_json("set", "big", "-", db=db, stdin=too_big), "payload_too_large",
                 "on stdin")
    assert [(m["namespace"], m["key"]) for m in exported(db)] == [("agent-1", "user/tea")]


@pytest.fixture(scope="module")
def filter_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """testutil's filter memories (FILTER_MEMORIES), written by the library."""
    db = str(tmp_path_factory.mktemp("filters") / "kv.db")
    clock = [0.0]
    with kvmem.Store.open(db, config=CONFIG, clock=lambda: clock[0]) as store:
        fill_filter_store(store, clock)
    return db


def filter_flags(filters: dict[str, Any]) -> list[str]:
    """testutil's filters as kvmem's flags: a list as the flag repeated."""
    flags = []
    for name, value in filters.items():
        flag = "--tag" if name == "tags" else "--" + name.replace("_", "-")
        for one in value if isinstance(value, list) else [value]:
            flags += [flag, str(one)]
    return flags


@pytest.mark.parametrize(("filters", "found"), FILTER_CASES)
def test_search_filters(filter_db: str, filters: dict[str, Any], found: set[str]) -> None:
    status, hits = kvmem_json("search", "tea", *filter_flags(filters), db=filter_db)
    assert status == 0, hits
    assert found_keys(hits["items"]) == found
    assert all(hit["score"] > 0 for hit in hits["items"])


@pytest.mark.parametrize(("filters", "found"), LIST_CASES)
def test_list_filters(filter_db: str, filters: dict[str, Any], found: set[str]) -> None:
    status, page = kvmem_json("list", *filter_flags(filters), db=filter_db)
    assert status == 0 and page["next_cursor"] is None, page
    assert found_keys(page["items"]) == found


def test_list_pages_and_archived(filter_db: str) -> None:
    keys = []
    cursor: list[str] = []
    for _ in range(3):  # a cursor that does not move on must not loop for ever
        status, page = kvmem_json("list", "--namespace", "alpha", "--limit", "2", *cursor,
                                  db=filter_db)
        assert status == 0 and len(page["items"]) <= 2, page
        keys += [item["key"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = ["--cursor", page["next_cursor"]]
    assert keys == ["food/rice", "tea/black", "tea/green"]
    status, archived = kvmem_json("list", "--namespace", "beta", "--archived", db=filter_db)
    assert status == 0 and [m["key"] for m in archived["items"]] == ["tea/faded"]


# (arguments, error code, a text the message holds): each refused, nothing changed.
BAD_INPUT = [
    (["set", "k", "green"], "invalid_request", "must be JSON"),
    (["set", "k", "NaN"], "invalid_request", "NaN"),
    (["set", "", "1"], "invalid_request", "key"),
    (["set", "k\x01", "1"], "invalid_request", "key"),
    (["set", "k", "1", "--namespace", "no spaces"], "invalid_request", "namespace"),
    (["set", "k", "1", "--ttl-seconds", "-5"], "invalid_request", "ttl_seconds"),
    (["set", "k", "1", "--ttl-seconds", "soon"], "invalid_request", "ttl_seconds"),
    (["set", "k", "1", "--half-life-seconds", "0"], "invalid_request", "half_life_seconds"),
    (["set", "k", "1", "--tag", ""], "invalid_request", "tag"),
    (["set", "k", "1", "--if-version", "1.5"], "invalid_request", "if_version"),
    (["set", "k", "1", "--if-version", "3"], "version_conflict", "version 3"),
    (["set", "k", '"' + "x" * 200 + '"', "--max-value-bytes", "100"], "payload_too_large", "100"),
    (["delete", "k", "--if-version", "-1"], "invalid_request", "if_version"),
    (["delete", "k", "--if-version", "2"], "version_conflict", "version 2"),
    (["get", "absent"], "not_found", "'absent'"),
    (["list", "--limit", "0"], "invalid_request", "limit"),
    (["list", "--limit", "many"], "invalid_request", "limit"),
    (["list", "--updated-after", "yesterday"], "invalid_request", "updated_after"),
    (["list", "--cursor", "garbage"], "invalid_request", "cursor"),
    (["search", "k", "--limit", "1000"], "invalid_request", "limit"),
    (["search", "k", "--namespace", "a b"], "invalid_request", "namespace"),
    (["set", "k", "1", "--synchronous", "sometimes"], "invalid_config", "--synchronous"),
]


@pytest.fixture(scope="module")
def one_memory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database holding "k" at version 1 (each test that uses it must leave it so)."""
    db = tmp_path_factory.mktemp("one") / "kv.db"
    with kvmem.Store.open(db, config=CONFIG) as store:
        store.set("k", {"v": 1}, tags=["t"])
    return db


@pytest.mark.parametrize(("args", "code", "text"), BAD_INPUT, ids=[
    " ".join(args)[:40] for args, _, _ in BAD_INPUT])
def test_bad_input_is_refused_and_changes_nothing(one_memory: Path, args: list[str], code: str,
                                                   text: str) -> None:
    before = exported(one_memory)
    assert [(r["key"], r["version"]) for r in before] == [("k", 1)]
    assert_error(kvmem_json(*args, db=one_memory), code, text)
    assert exported(one_memory) == before


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    for args in (["get"], ["set", "k"], ["frobnicate"], ["list", "--no-such-flag"], []):
        result = run("kvmem", *args, env=child_env(KVMEM_DB=str(db)))
        assert result.returncode == 2 and "usage: kvmem" in result.stderr, (args, result)
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert not db.exists()


def test_export_and_import(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    with kvmem.Store.open(db, config=CONFIG) as store:
        for i in range(30):
            store.set(f"note/{i:02d}", {"text": f"note {i} ünïcode", "n": i},
                      namespace="a" if i % 2 else "b", tags=[f"t{i % 3}"])
        store.set("gone", 1, ttl_seconds=0.001)  # expired: exported all the same
    records = exported(db)
    assert len(records) == 31

    lines = run("kvmem", "export", env=child_env(KVMEM_DB=str(db)))
    assert lines.returncode == 0 and lines.stderr == ""
    assert [json.loads(line) for line in lines.stdout.splitlines()] == records
    only_a = run("kvmem", "export", "--namespace", "a", env=child_env(KVMEM_DB=str(db)))
    assert [json.loads(line) for line in only_a.stdout.splitlines()] == \
        [r for r in records if r["namespace"] == "a"]

    out = tmp_path / "out.jsonl"
    assert kvmem_json("export", "-o", str(out), db=db) == (
        0, {"exported": 31, "path": str(out)})
    assert [json.loads(line) for line in out.read_text("utf-8").splitlines()] == records
    before = out.read_text("utf-8")
    assert_error(kvmem_json("export", "-o", str(out), db=db), "invalid_request",
                 "already exists")
    assert out.read_text("utf-8") == before
    for sidecar in ("", "-wal", "-shm", ".checkpoint.lock"):  # never written over
        assert_error(kvmem_json("export", "-o", f"{db}{sidecar}", db=db), "invalid_request",
                     "is the database")
        assert_error(kvmem_json("import", f"{db}{sidecar}", db=db), "invalid_request")

    from_file = tmp_path / "restored" / "kv.db"  # import creates the database
    assert kvmem_json("import", str(out), db=from_file) == (0, {"imported": 31, "lines": 31})
    assert exported(from_file) == records
    from_stdin = tmp_path / "piped.db"
    assert kvmem_json("import", db=from_stdin, stdin=before) == (
        0, {"imported": 31, "lines": 31})
    assert exported(from_stdin) == records
    assert kvmem_json("import", "-", db=from_stdin, stdin=before) == (  # idempotent
        0, {"imported": 31, "lines": 31})
    assert exported(from_stdin) == records


def test_export_into_a_pipe_closed_early(tmp_path: Path) -> None:
    """``kvmem export | head -1``: the reader goes away; export stops, quietly."""
    db = tmp_path / "kv.db"
    with kvmem.Store.open(db, config=CONFIG) as store:
        store.batch([{"op": "set", "key": f"k{i:04d}", "value": "v" * 500} for i in range(400)])
    proc = subprocess.Popen([sys.executable, "-m", "kvmem_cli", "export"], cwd=HERE,
                            env=child_env(KVMEM_DB=str(db)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["key"] == "k0000"
    proc.stdout.close()  # 200 kB to go: more than a pipe holds
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=TIMEOUT_S) == 1 and stderr == "", stderr


def test_export_onto_a_full_disk(tmp_path: Path) -> None:
    """stdout on a full disk (/dev/full): the error on stderr, as JSON, exit 1."""
    db = tmp_path / "kv.db"
    with kvmem.Store.open(db, config=CONFIG) as store:
        store.batch([{"op": "set", "key": f"k{i:04d}", "value": "v" * 500} for i in range(100)])
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "kvmem_cli", "export"], cwd=HERE,
                                env=child_env(KVMEM_DB=str(db)), stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert json.loads(result.stderr) == {"ok": False, "error": {
        "code": "storage_error", "message": "No space left on device"}}


@pytest.mark.parametrize("content", [
    '{"not": "a memory"}\n', "not json\n", "\udcff\n", '{"namespace": "a"}\n' * 30])
@pytest.mark.parametrize("existing", [True, False])
def test_bad_import_changes_nothing(tmp_path: Path, content: str, existing: bool) -> None:
    db = tmp_path / "kv.db"
    if existing:
        with kvmem.Store.open(db, config=CONFIG) as store:
            store.set("kept", 1)
    source = tmp_path / "in.jsonl"
    source.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert_error(kvmem_json("import", str(source), db=db), "invalid_request",
                 "nothing imported")
    if existing:
        assert [r["key"] for r in exported(db)] == ["kept"]
    else:
        assert tree(tmp_path) == ["in.jsonl"]  # no database created for a bad input


def test_bad_import_from_stdin_or_no_file(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    assert_error(kvmem_json("import", db=db, stdin='{"namespace": "a"}\n' * 30),
                 "invalid_request", "30 bad line(s), nothing imported", "(and 10 more)")
    assert_error(kvmem_json("import", str(tmp_path / "absent.jsonl"), db=db), "not_found",
                 "absent.jsonl")
    assert tree(tmp_path) == []


# ----------------------------------------------------- commands on a missing database ----

# Every command but set and import, on a database that is not there: "no database at
# PATH", exit 1, and no file or directory made.  {db} is the missing database, {out} a
# directory for what a command would write.
MISSING = [
    ["check", "{db}"], ["stats", "{db}"], ["stats"], ["checkpoint", "{db}"],
    ["checkpoint", "--truncate"], ["backup", "{db}", "{out}/b.db"], ["namespaces", "{db}"],
    ["get", "k"], ["delete", "k"], ["reinforce", "k"], ["list"], ["search", "tea"],
    ["export"], ["export", "-o", "{out}/e.jsonl"], ["forget", "--prefix", "k"],
]


# In a directory that is not there either: none is made.
MISSING_DIR = [["stats", "{db}"], ["backup", "{db}", "{out}/new/b.db"], ["get", "k"],
               ["export", "-o", "{out}/e.jsonl"]]


@pytest.mark.parametrize(("args", "where"), [(args, "kv.db") for args in MISSING] + [
    (args, "sub/dir/kv.db") for args in MISSING_DIR], ids=[
    " ".join(args) for args in MISSING] + [f"{' '.join(args)}, no dir" for args in MISSING_DIR])
def test_no_command_creates_a_missing_database(tmp_path: Path, args: list[str],
                                               where: str) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    db = data / where
    argv = [arg.format(db=db, out=out) for arg in args]
    status, body = kvmem_json(*argv, db=db)  # also KVMEM_DB, for those without a path
    assert status == 1, body
    error = body["error"]
    assert error == {"code": "not_found", "message": f"no database at {db}"}, body
    assert tree(data) == [] and tree(out) == []


@pytest.mark.parametrize("content", ["empty", "foreign"])
@pytest.mark.parametrize("args", [args for args in MISSING if not args[0].startswith(
    ("check", "backup", "export"))] + [["export"]], ids=lambda a: " ".join(a)
    if isinstance(a, list) else a)
def test_no_command_converts_an_empty_or_foreign_file(tmp_path: Path, args: list[str],
                                                      content: str) -> None:
    db = tmp_path / "kv.db"
    db.touch()
    if content == "foreign":  # another program's SQLite file, rollback-journal mode
        raw = sqlite3.connect(db)
        raw.execute("CREATE TABLE notes (n INTEGER)")
        raw.commit()
        raw.close()
    before = db.read_bytes()
    status, body = kvmem_json(*[arg.format(db=db, out=tmp_path) for arg in args], db=db)
    assert status == 1 and body["error"]["code"] == "not_a_database", body
    assert db.read_bytes() == before and tree(tmp_path) == ["kv.db"]
    status, report = kvmem_json("check", str(db))
    assert status == 1 and report["schema_version"] == 0 and not report["ok"], report
    assert report["error"]["code"] == "not_a_database"


@pytest.mark.parametrize("suffix", ["-journal", "-wal", "-shm", ".checkpoint.lock"])
def test_backup_refuses_the_sources_own_files(tmp_path: Path, suffix: str) -> None:
    db = tmp_path / "kv.db"
    assert kvmem_json("set", "k", "1", db=db)[0] == 0
    files = tree(tmp_path)
    assert_error(kvmem_json("backup", str(db), f"{db}{suffix}"), "invalid_request",
                 "is the database or one of its files")
    assert tree(tmp_path) == files
    assert kvmem_json("get", "k", db=db)[1]["value"] == 1


def test_forget_reports_with_dry_run_then_deletes(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    with kvmem.Store.open(db, config=CONFIG) as store:
        for key in ("tmp/a", "tmp/b", "keep"):
            store.set(key, key, tags=["x"] if key != "tmp/b" else [])
        store.set("tmp/c", 1, namespace="other")
    status, report = kvmem_json("forget", "--prefix", "tmp/", "--dry-run", db=db)
    assert status == 0 and report == {"dry_run": True, "matched": 2, "deleted": 0,
                                      "keys": ["tmp/a", "tmp/b"], "more": False}
    assert len(exported(db)) == 4
    status, report = kvmem_json("forget", "--prefix", "tmp/", "--tag", "x", db=db)
    assert status == 0 and (report["deleted"], report["keys"]) == (1, ["tmp/a"])
    assert sorted(r["key"] for r in exported(db)) == ["keep", "tmp/b", "tmp/c"]
    assert_error(kvmem_json("forget", db=db), "invalid_request", "needs a prefix or tags")
    status, report = kvmem_json("forget", "--prefix", "tmp/", "--namespace", "other", db=db)
    assert status == 0 and report["deleted"] == 1
    assert sorted(r["key"] for r in exported(db)) == ["keep", "tmp/b"]


# ---------------------------------------------------------------------------- backup ----


def test_backup_is_one_self_contained_file(tmp_path: Path, unwritable_dir: Path) -> None:
    db = tmp_path / "live" / "kv.db"
    with kvmem.Store.open(db, config=CONFIG) as store:  # open, with a WAL, during the backup
        for i in range(200):
            store.set(f"k{i:03d}", {"i": i, "pad": "p" * 100})
        assert kvmem.wal_size(str(db)) > 0
        records = exported(db)
        backups = tmp_path / "backups"
        status, report = kvmem_json("backup", str(db), str(backups / "b.db"))
        assert status == 0 and report["ok"] and report["integrity"] == ["ok"], report
        assert report["journal_mode"] == "delete"
        assert tree(backups) == ["b.db"]  # no -wal, -shm or checkpoint lock
        store.set("after", 1)  # the live database goes on
    moved = tmp_path / "elsewhere"  # the file alone is the whole database
    moved.mkdir()
    (backups / "b.db").rename(moved / "b.db")
    assert exported(moved / "b.db") == records

    before = (moved / "b.db").stat()
    status, body = kvmem_json("backup", str(db), str(moved / "b.db"))
    assert_error((status, body), "invalid_request", "already exists")
    after = (moved / "b.db").stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)

    (tmp_path / "file").write_text("in the way\n")
    assert_error(kvmem_json("backup", str(db), str(tmp_path / "file" / "b.db")),
                 "storage_error", f"{tmp_path / 'file'} is not a directory")
    assert_error(kvmem_json("backup", str(db), str(unwritable_dir / "b.db")), "storage_error",
                 "permission denied")
    assert tree(unwritable_dir) == []


# ------------------------------------------------------------------ version and help ----


def script(name: str) -> str:
    """The installed console script ``name`` (pip install -e . makes them)."""
    path = os.path.join(sysconfig.get_path("scripts"), name)
    assert os.path.exists(path), f"{path}: not installed; run pip install -e '.[test]'"
    return path


def test_version(tmp_path: Path) -> None:
    installed = importlib.metadata.version("kvmem")
    with open(os.path.join(HERE, "pyproject.toml"), "rb") as fp:
        assert tomllib.load(fp)["project"]["version"] == installed == kvmem_cli.VERSION
    for name in MODULES:
        result = subprocess.run([script(name), "--version"], capture_output=True, text=True,
                                env=child_env(), timeout=TIMEOUT_S, cwd=tmp_path)
        assert (result.returncode, result.stdout, result.stderr) == \
            (0, f"kvmem {installed}\n", ""), name
    assert not os.listdir(tmp_path)


def test_help_shows_the_defaults(tmp_path: Path) -> None:
    env = child_env(XDG_DATA_HOME=str(tmp_path / "xdg"))
    db = str(tmp_path / "xdg" / "kvmem" / "memory.db")

    def help_text(program: str, *args: str) -> str:
        result = run(program, *args, "--help", env=env)
        assert result.returncode == 0, result.stderr
        return " ".join(result.stdout.split())

    http_help = help_text("kvmem-http")
    for text in (f"(default {db})", "--port PORT kvmem-http's port (0 = any free port) "
                 "(default 8765)", "(default extra)", "(default 127.0.0.1)",
                 "debug, info, warning, error, critical (default info)", "--version"):
        assert text in http_help, text
    mcp_help = help_text("kvmem-mcp")
    for text in (f"(default {db})", "(default 8766)", "(default extra)", "default stdio"):
        assert text in mcp_help, text
    assert f"(default {db})" in help_text("kvmem", "set")
    assert f"else {db})" in help_text("kvmem", "stats")
    assert "(default 8765)" not in help_text("kvmem", "get")  # no server settings there
    assert not os.path.exists(db)


# ------------------------------------------------------------------- start-up errors ----


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in which this process may create no file: made immutable (chattr +i)
    when it runs as root, whom permissions do not stop; read-only (0o555) otherwise."""
    path = tmp_path / "locked"
    path.mkdir()
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    else:
        path.chmod(0o555)
    try:
        with pytest.raises(PermissionError):  # the situation is real, or the test is void
            (path / "probe").mkdir()
        yield path
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this process listens on."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python without kvmem's dependencies: a new virtual environment, no packages."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import mcp"], capture_output=True)
    assert probe.returncode == 1 and b"ModuleNotFoundError" in probe.stderr
    return python


@dataclasses.dataclass(frozen=True)
class Startup:
    """A program started as it should not be: ``args`` ({db}, {file}, {locked},
    {empty_token}, {busy_port} filled in), the exit status, texts its one-line error
    holds (and texts it must not hold), and whether the database may exist after."""

    program: str
    args: Sequence[str]
    status: int
    says: Sequence[str]
    not_says: Sequence[str] = ()
    opens_db: bool = False
    bare: bool = False  # run by a Python without kvmem's dependencies


# The servers' mistakes: (name, args, texts the error says, texts it must not say,
# whether kvmem-http has opened the database by then: it listens only after).  Both
# servers run the first ones; the checks behind the others are kvmem_cli's, shared.
BOTH_SERVERS: list[tuple[str, list[str], list[str], list[str], bool]] = [
    ("port too big", ["--port", "99999"], ["'99999'", "at most 65535"], [], False),
    ("log level", ["--log-level", "bogus"],
     ["'bogus'", "debug, info, warning, error, critical"], [], False),
    ("address in use", ["--port", "{busy_port}"],
     ["cannot listen on 127.0.0.1:{busy_port}", "already in use"], [], True),
    ("invalid host", ["--host", "127.0.0.999"],
     ["'127.0.0.999'", "not an IP address or a host name"], ["without a token"], False),
    ("unwritable dir", ["--db", "{locked}/kv.db"],
     ["permission denied", "cannot create files in {locked}"], [], False),
    ("empty token file", ["--host", "0.0.0.0", "--token-file", "{empty_token}"],
     ["--token-file {empty_token}: the file is empty"], ["set KVMEM_TOKEN"], False),
]
HTTP_ONLY: list[tuple[str, list[str], list[str], list[str], bool]] = [
    ("host not here", ["--host", "192.0.2.1", "--token-file", "{token}"],
     ["cannot listen on 192.0.2.1:", "not an address of this machine"], [], True),
    ("public without token", ["--host", "::"], ["refusing to listen on :: without a token"],
     [], False),
    ("db under a file", ["--db", "{file}/kv.db"], ["{file} is not a directory"], [], False),
    ("unwritable dir, new subdir", ["--db", "{locked}/sub/kv.db"],
     ["cannot create its directory", "{locked}/sub"], [], False),
    ("missing token file", ["--host", "0.0.0.0", "--token-file", "{file}.nope"],
     ["--token-file {file}.nope: No such file or directory"], [], False),
]
STARTUP = {
    f"{program} {name}": Startup(program, (*extra, *args), 2, says, not_says,
                                 opens_db=opened and program == "kvmem-http")
    for program, extra, rows in (("kvmem-http", (), BOTH_SERVERS + HTTP_ONLY),
                                 ("kvmem-mcp", ("--transport", "streamable-http"), BOTH_SERVERS))
    for name, args, says, not_says, opened in rows
} | {
    "kvmem-mcp host not here": Startup(
        "kvmem-mcp", ("--transport", "streamable-http", "--host", "192.0.2.1", "--token-file",
                      "{token}"), 2, ["cannot listen on 192.0.2.1:8766", "not an address"]),
    "kvmem-mcp without the SDK": Startup("kvmem-mcp", (), 1, ["pip install -e .", "no module"],
                                         bare=True),
    "kvmem set, unwritable dir": Startup(
        "kvmem", ("set", "k", "1", "--db", "{locked}/kv.db"), 1,
        ["permission denied", "cannot create files in {locked}"]),
    "kvmem set, db under a file": Startup(
        "kvmem", ("set", "k", "1", "--db", "{file}/kv.db"), 1, ["{file} is not a directory"]),
}


@pytest.mark.parametrize("case", STARTUP.values(), ids=STARTUP.keys())
def test_startup_errors(tmp_path: Path, case: Startup, unwritable_dir: Path, busy_port: int,
                        bare_python: str) -> None:
    """Each start-up mistake: the exit status, one line naming the problem (last on
    stderr for a server, the JSON error line for kvmem), no traceback, no database."""
    db, file, empty_token, token = (tmp_path / "kv.db", tmp_path / "file",
                                    tmp_path / "empty-token", tmp_path / "token")
    file.write_text("a regular file\n")
    empty_token.write_text("\n")
    token.write_text("s3cret\n")
    names = {"db": db, "file": file, "locked": unwritable_dir, "empty_token": empty_token,
             "token": token, "busy_port": busy_port}
    args = [arg.format(**names) for arg in case.args]
    python = bare_python if case.bare else sys.executable
    try:
        result = run(case.program, *args, env=child_env(KVMEM_DB=str(db)), python=python)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{case.program} {args} started instead of failing") from exc
    assert "Traceback" not in result.stderr, result.stderr
    if case.program == "kvmem":
        line = json.loads(result.stdout)["error"]["message"]
    else:
        lines = result.stderr.strip().splitlines()
        line = lines[-1] if lines else ""
        assert line.startswith(f"{case.program}: "), result.stderr
        assert result.stdout == ""
    assert result.returncode == case.status, (result.returncode, result.stderr)
    for text in case.says:
        assert text.format(**names) in line, (text, line)
    for text in case.not_says:
        assert text not in line, (text, line)
    if not case.opens_db:
        assert not db.exists()
    assert tree(unwritable_dir) == []


# ------------------------------------------------------------------- IPv6 loopback ----


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return False
        raise


def stop(child: Child) -> None:
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait() == 0, child.stderr


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_servers_listen_on_ipv6_loopback(tmp_path: Path, host: str) -> None:
    db = str(tmp_path / "kv.db")
    server = Child("serve_http", "--db", db, "--host", host, "--port", "0")
    try:
        port = int(server.expect("listening on http://[::1]:").rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("::1", port, timeout=TIMEOUT_S)
        try:
            conn.request("PUT", "/v1/memories/six", json.dumps({"value": "over IPv6"}),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 201, response.read()
            response.read()
            conn.request("GET", "/v1/memories/six")
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["value"] == \
                "over IPv6"
        finally:
            conn.close()
    finally:
        stop(server)

    mcp = Child("serve_mcp", "--db", db, "--transport", "streamable-http", "--host", host,
                "--port", "0")
    try:
        url = mcp.expect("listening on http://[::1]:").split()[-1]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("::1", port, timeout=TIMEOUT_S)
        try:
            conn.request("POST", "/mcp", json.dumps({
                "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "test", "version": "1"}}}),
                {"Content-Type": "application/json",
                 "Accept": "application/json, text/event-stream"})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200 and b'"serverInfo"' in body, body
        finally:
            conn.close()
    finally:
        stop(mcp)
    assert exported(db)[0]["value"] == "over IPv6"


@pytest.mark.parametrize("program", ["kvmem-http", "kvmem-mcp"])
def test_a_server_whose_stdout_is_full_says_so_and_stops(tmp_path: Path, program: str) -> None:
    extra = ["--transport", "streamable-http"] if program == "kvmem-mcp" else []
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", MODULES[program], *extra, "--port", "0",
                                 "--db", str(tmp_path / "kv.db")], cwd=HERE, env=child_env(),
                                stdout=full, stderr=subprocess.PIPE, text=True,
                                timeout=TIMEOUT_S)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode != 0
    assert "No space left on device" in result.stderr or "cannot write to stdout" in \
        result.stderr, result.stderr


@pytest.mark.parametrize("argv", [["stats", "sqlite:///mem.db"],
                                  ["get", "k", "--db", "mysql://u@db.example/mem"],
                                  ["set", "k", "1", "--db", "http://x/y"]])
def test_a_database_url_is_refused_not_made_a_directory(tmp_path: Path,
                                                         argv: list[str]) -> None:
    result = subprocess.run([sys.executable, os.path.join(HERE, "kvmem_cli.py"), *argv],
                            cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "invalid_config" and "is not a database kvmem can open" in \
        error["message"], error
    assert os.listdir(tmp_path) == []  # no "sqlite:" directory in the working directory


@pytest.mark.parametrize("argv", [["stats", "postgresql://kv:s3cret@127.0.0.1:1/mem"],
                                  ["get", "k", "--db", "postgres://kv:s3cret@127.0.0.1:1/m"],
                                  ["set", "k", "1", "--db", "postgresql://kv:s3cret@[::1"]])
def test_a_postgres_url_that_fails_says_why_in_one_line(tmp_path: Path,
                                                        argv: list[str]) -> None:
    """A postgresql:// --db is PostgreSQL's (kvmem_pg), never a path: nothing listens on
    port 1, and a URL that does not parse is a configuration error; either way one JSON
    line says so, without the password, and the working directory stays empty."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "kvmem_cli.py"), *argv],
                            cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    error = json.loads(result.stdout)["error"]
    if "[" in argv[-1]:
        assert error["code"] == "invalid_config" and "not a valid URL" in error["message"]
    else:
        assert error["code"] == "storage_error" and "cannot connect" in error["message"] \
            and "Connection refused" in error["message"], error
    assert "s3cret" not in result.stdout + result.stderr
    assert os.listdir(tmp_path) == []  # no "postgresql:" directory in the working directory
