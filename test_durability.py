"""Reliability proof suite: crashes, two servers under load, cold starts, faults, fuzzing.

``pytest test_durability.py`` is the CI size (over 100 SIGKILLs, 20 s of three-process
load); ``pytest test_durability.py --soak -s`` the long one (over 2,000 kills, minutes of
load, thousands of fuzz cases).  Totals are printed at the end of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mcp import Client, ClientSession, StdioServerParameters, stdio_client

import kvmem
import kvmem_cli
import mcp_server
from test_mcp import EXPECTED_TOOLS
from testchildren import crash_value
from testutil import (
    DURABILITY_TOTALS,
    HERE,
    SOAK,
    Child,
    Stored,
    check_acknowledged,
    child_env,
    file_digest,
    http_json,
    lost_writes,
    read_back,
    read_rows,
    run_cli,
)

CONFIG = kvmem.Config.build(environ={})
TOTALS = DURABILITY_TOTALS

# ------------------------------------------------------------------- crash matrix ----

def _verify(db: str, acked_sets: dict[str, int], acked_batches: set[str]) -> None:
    """Reopen (recovery), integrity_check, every acknowledged write exact, no partial batch."""
    acked = dict(acked_sets)  # a batch is five sets of new keys (version 1)
    acked.update({f"{batch}-{n}": 1 for batch in acked_batches for n in range(5)})
    # Checks run after every kill, some before the first acknowledgement: the test asserts
    # at its end that writes were acknowledged.
    rows = check_acknowledged(db, acked, config=CONFIG, value=crash_value, allow_empty=True,
                              totals=TOTALS).rows
    batches = {k.rsplit("-", 1)[0] for k in rows if "-b" in k}
    for batch in batches:  # every batch visible at all is visible whole
        present = [f"{batch}-{n}" in rows for n in range(5)]
        if not all(present):
            TOTALS["partial_batches_visible"] += 1
        assert all(present), f"partial batch {batch}: {present}"


@pytest.mark.parametrize("mode", ["plain", "group", "batch", "prune", "checkpoint"])
def test_crash_matrix(tmp_path: Path, mode: str, soak: bool) -> None:
    db = str(tmp_path / "kv.db")
    rng = random.Random(f"crash-{mode}")
    acked_sets: dict[str, int] = {}
    acked_batches: set[str] = set()
    for run in range(350 if soak else 15):
        child = Child("crash_writer", mode, db, f"r{run}")
        for _ in range(rng.randint(1, 60)):  # a random number of acknowledgements...
            child.expect("")
        for line in child.kill():  # ...then SIGKILL, wherever the writer is
            fields = line.split()
            if not fields or fields[-1] != "ok":
                continue
            if fields[0] == "set":
                acked_sets[fields[1]] = int(fields[2])
            elif fields[0] == "batch":
                acked_batches.add(fields[1])
        assert child.killed, child.stderr  # a writer never ends on its own
        TOTALS["kills"] += 1
        _verify(db, acked_sets, acked_batches)
    assert acked_sets or acked_batches
    TOTALS["acknowledged_writes"] += len(acked_sets) + 5 * len(acked_batches)


IMPORT_LINES = 1500
IMPORT_CHUNK = 100  # crash_writer's prune_batch in import mode: the lines of a transaction
IMPORT_CONFIG = kvmem.Config.build(environ={}, flags={"prune_batch": str(IMPORT_CHUNK)})


def _import_records(namespace: str) -> list[dict[str, Any]]:
    return [{"namespace": namespace, "key": f"imp-{i:05d}", "value": {"i": i, "s": "v" * (i % 90)},
             "tags": ["imported"], "version": 3 + i % 5, "created_at": 1e9 + i,
             "updated_at": 1e9 + 2 * i, "expires_at": None, "strength": 1.0,
             "half_life_seconds": None, "last_reinforced_at": 1e9 + 2 * i, "archived": False}
            for i in range(IMPORT_LINES)]


def _not_as_imported(rows: dict[str, Stored], records: list[dict[str, Any]]) -> list[str]:
    """The keys of ``records`` that ``rows`` lacks or holds otherwise than the file has
    them (value, version, timestamps: an import keeps them)."""
    return [r["key"] for r in records if (row := rows.get(r["key"])) is None
            or (row.version, row.value, row.created_at, row.updated_at)
            != (r["version"], r["value"], r["created_at"], r["updated_at"])]


def _verify_import(db: str, path: Path, records: list[dict[str, Any]], committed: int,
                   done: dict[str, list[dict[str, Any]]]) -> int:
    """After a kill inside an import of ``records`` (one namespace, the file ``path``), of
    which ``committed`` chunks were committed before the kill: recovery and
    integrity_check; the rows present are the file's first chunks, each one whole and as
    in the file, at least ``committed`` of them; the imports finished before (``done``,
    namespace -> records) are intact; and importing the file again finishes this one.
    Returns how many chunks the kill left."""
    conn = kvmem.open_db(db, config=CONFIG)
    try:
        found = read_back(conn, namespace=records[0]["namespace"])
        earlier = {ns: _not_as_imported(read_rows(conn, namespace=ns), done[ns]) for ns in done}
    finally:
        conn.close()
    present = [sum(r["key"] in found.rows for r in records[i:i + IMPORT_CHUNK])
               for i in range(0, IMPORT_LINES, IMPORT_CHUNK)]
    left = sum(n > 0 for n in present)
    wrong = _not_as_imported(found.rows, records[:left * IMPORT_CHUNK])
    TOTALS["integrity_failures"] += int(not found.sound)
    TOTALS["acknowledged_write_checks"] += committed * IMPORT_CHUNK + IMPORT_LINES * len(done)
    TOTALS["lost"] += max(0, committed - left) * IMPORT_CHUNK + sum(map(len, earlier.values()))
    assert found.sound, f"integrity_check: {found.integrity[:3]}"
    assert present == [IMPORT_CHUNK] * left + [0] * (len(present) - left), \
        f"the rows left are not whole chunks from the start of the file: {present}"
    assert len(found.rows) == left * IMPORT_CHUNK and wrong == [], wrong[:3]
    assert left >= committed, f"{committed} chunks committed, {left} left"
    assert all(keys == [] for keys in earlier.values()), {ns: keys[:3] for ns, keys in
                                                          earlier.items() if keys}
    with kvmem.Store.open(db, config=IMPORT_CONFIG) as store, open(path) as fp:
        assert store.import_(fp) == {"imported": IMPORT_LINES, "lines": IMPORT_LINES}
    conn = kvmem.open_db(db, config=CONFIG)
    try:
        rows = read_rows(conn, namespace=records[0]["namespace"])
    finally:
        conn.close()
    assert len(rows) == IMPORT_LINES and _not_as_imported(rows, records) == []
    return left


def test_crash_matrix_import(tmp_path: Path, soak: bool) -> None:
    """An import is resumable, not atomic: it commits ``prune_batch`` lines at a time.  Each
    run imports a file into a namespace of its own and is killed as it starts on a chunk
    drawn at random; what it left must be whole chunks from the start of the file, the
    chunks committed before the kill among them, and running the import again finishes
    it.  Every finished import stays intact through the later kills."""
    db = str(tmp_path / "kv.db")
    rng = random.Random("crash-import")
    runs = 350 if soak else 15
    done: dict[str, list[dict[str, Any]]] = {}
    partial = 0
    for run in range(runs):
        records = _import_records(f"r{run}")
        path = tmp_path / f"import{run}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        child = Child("crash_writer", "import", db, f"r{run}", str(path))
        chunk = rng.randrange(IMPORT_LINES // IMPORT_CHUNK)
        child.expect(f"chunk {chunk}", timeout=60)  # the chunks before it are committed
        lines = child.kill()  # SIGKILL while chunk `chunk` (or a later one) is written
        assert child.killed, child.stderr
        TOTALS["kills"] += 1
        finished = any(line.startswith("import ") and line.endswith(" ok") for line in lines)
        recent = dict(list(done.items())[-10:])  # (all of them at the end)
        left = _verify_import(db, path, records, IMPORT_LINES // IMPORT_CHUNK if finished
                              else chunk, recent)
        partial += 0 < left < IMPORT_LINES // IMPORT_CHUNK
        TOTALS["acknowledged_writes"] += IMPORT_LINES if finished else chunk * IMPORT_CHUNK
        done[f"r{run}"] = records
        path.unlink()
    assert partial >= runs // 2, f"only {partial} of {runs} kills left an import cut short"
    conn = kvmem.open_db(db, config=CONFIG)
    try:
        for namespace, records in done.items():
            assert _not_as_imported(read_rows(conn, namespace=namespace), records) == [], \
                namespace
    finally:
        conn.close()


# The lines a ``starter`` prints before its acknowledgement when it finds the schema in
# place (64 measured; 87 when it creates it): kill stages are drawn from these.
START_UP_STAGES = 60


def _kill_at_stage(child: Child, stage: int, problems: list[str]) -> None:
    """SIGKILL ``child`` as soon as it printed line ``stage`` (0 = ``up``), or find it
    exited on its own before that line."""
    try:
        for _ in range(stage + 1):
            child.expect("", timeout=60)
    except AssertionError:
        if child.proc.poll() is None:  # no line for 60 s: stuck in its start-up
            problems.append(f"stuck after {child.lines[-1:]}: {child.drain_stderr()[-500:]}")
    child.kill()


def test_kill_during_open_db_of_eight_processes(tmp_path: Path, soak: bool) -> None:
    """Eight processes open a new file at once; all but one to three of them are killed,
    each at a start-up stage drawn at random (before kvmem is imported, at the connect
    that creates the file, at any SQL statement of the WAL switch, the migration, the
    election or the first write, from its own thread), the rest run to their end.  Every
    child ends killed (-SIGKILL while running) or with exit 0 and its acknowledgement,
    and the file holds every acknowledged write and the finished schema."""
    rng = random.Random("open")
    rounds = 60 if soak else 4
    kills_before_ack = 0
    acknowledged = 0
    for round_ in range(rounds):
        db = str(tmp_path / f"fresh{round_}.db")
        finishers = rng.randint(1, 3)
        stages = [None] * finishers + [rng.randrange(START_UP_STAGES)
                                       for _ in range(8 - finishers)]
        rng.shuffle(stages)
        children = [Child("starter", db, f"{round_}-{n}") for n in range(8)]
        problems: list[str] = []
        watchers = [threading.Thread(target=_kill_at_stage, args=(child, stage, problems))
                    for child, stage in zip(children, stages, strict=True) if stage is not None]
        for watcher in watchers:
            watcher.start()
        for watcher in watchers:
            watcher.join()
        acked: dict[str, int] = {}
        for child, stage in zip(children, stages, strict=True):
            if stage is None:
                assert child.wait() == 0, child.stderr
            mine = [line.split() for line in child.lines if line.startswith("set ")]
            acked.update({fields[1]: int(fields[2]) for fields in mine})
            if child.killed:
                TOTALS["kills"] += 1
                kills_before_ack += not mine
            else:  # it ended on its own: exit 0, after its write was acknowledged
                assert child.proc.returncode == 0 and mine, (stage, child.lines[-3:],
                                                             child.stderr)
        assert problems == []
        # Each round has a finisher, so the file exists: no kill point explains its absence.
        assert os.path.exists(db), [child.lines[-1:] for child in children]
        check_acknowledged(db, acked, config=CONFIG, totals=TOTALS)
        acknowledged += len(acked)
        TOTALS["acknowledged_writes"] += len(acked)
        conn = kvmem.open_db(db, config=CONFIG)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == kvmem.SCHEMA_VERSION
        finally:
            conn.close()
    # Most kills land mid-start-up (a kill drawn near the end may come after the write or
    # the exit); each round acknowledged its finishers' writes.
    assert kills_before_ack >= 3 * rounds, kills_before_ack
    assert acknowledged >= rounds


# --------------------------------------------------------- two servers under load ----


_http = http_json


def _mcp_params(db: str, env: dict[str, str]) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=[os.path.join(HERE, "mcp_server.py"), "--db", db,
                                      "--log-level", "WARNING"], env=env, cwd=HERE)


def _flock_holders(path: str) -> list[int]:
    """The pids holding a ``flock`` on ``path`` now, as the kernel lists them in
    /proc/locks (``1: FLOCK  ADVISORY  WRITE PID MAJOR:MINOR:INODE 0 EOF``; a blocked
    waiter's line has ``->`` and holds nothing)."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    # One read() of /proc/locks is one consistent listing; a file object reads it in
    # pieces, and lines that moved between two pieces came back twice (a CI run saw the
    # holder listed twice under load).
    fd = os.open("/proc/locks", os.O_RDONLY)
    try:
        text = os.read(fd, 1 << 22).decode("ascii", "replace")
    finally:
        os.close(fd)
    return [int(fields[4]) for fields in map(str.split, text.splitlines())
            if fields[1] == "FLOCK" and fields[5] == ident]


@pytest.mark.anyio
async def test_http_mcp_and_library_under_load(tmp_path: Path, soak: bool) -> None:
    db = str(tmp_path / "shared.db")
    seconds = 120.0 if soak else 20.0
    cap = 4 * 1024 * 1024
    env = child_env(KVMEM_WAL_CAP_BYTES=str(cap), KVMEM_CHECKPOINT_POLL_S="0.05")
    http_child = Child("serve_http", "--db", db, "--port", "0", "--log-level", "WARNING", env=env)
    port = int(http_child.expect("listening on").rsplit(":", 1)[1])
    library = Child("library_process", db, str(seconds), env=env, stdin=True)
    library.expect("ready")
    increments = {f"counter-{k}": 0 for k in range(4)}
    acked_sets: dict[str, int] = {}
    problems: list[str] = []
    # (pids holding the lock's flock, {pid: says it is the holder}, pids holding it after)
    holders_seen: list[tuple[list[int], dict[int, bool], list[int]]] = []
    wal_sizes: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def increment(conn: http.client.HTTPConnection, key: str) -> None:
        while True:
            status, body = _http(port, "GET", f"/v1/memories/{key}", conn=conn)
            current, version = (body["value"], body["version"]) if status == 200 else (0, 0)
            status, body = _http(port, "PUT", f"/v1/memories/{key}",
                                 {"value": current + 1, "if_version": version}, conn=conn)
            if status in (200, 201):
                with lock:
                    increments[key] += 1
                return
            if status != 409:
                problems.append(f"http increment {status} {body}")
                return

    def http_worker(t: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = 0
        while not stop.is_set():
            increment(conn, f"counter-{i % 4}")
            status, body = _http(port, "PUT", f"/v1/memories/http{t}-{i}", {"value": i}, conn=conn)
            if status != 201:
                problems.append(f"http set {status} {body}")
            else:
                with lock:
                    acked_sets[f"http{t}-{i}"] = body["version"]
            i += 1
        conn.close()

    async with stdio_client(_mcp_params(db, env)) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        workers = [threading.Thread(target=http_worker, args=(t,)) for t in range(3)]
        for worker in workers:
            worker.start()
        started = time.monotonic()
        i = 0
        try:
            while time.monotonic() - started < seconds:
                key = f"counter-{i % 4}"
                while True:
                    got = await session.call_tool("memory_get", {"key": key})
                    memory = got.structured_content["memory"]
                    current, version = (memory["value"], memory["version"]) if memory else (0, 0)
                    result = await session.call_tool("memory_set", {
                        "key": key, "value": current + 1, "if_version": version})
                    if not result.is_error:
                        increments[key] += 1
                        break
                    text = result.content[0].text  # type: ignore[union-attr]
                    if "version_conflict" not in text:
                        problems.append(f"mcp {text}")
                        break
                result = await session.call_tool("memory_set", {"key": f"mcp-{i}", "value": i})
                if result.is_error:
                    problems.append(f"mcp set {result.content}")
                else:
                    acked_sets[f"mcp-{i}"] = result.structured_content["memory"]["version"]
                if i % 20 == 0:  # who checkpoints: the kernel's answer, and every process's
                    before = _flock_holders(db + ".checkpoint.lock")
                    _, http_stats = _http(port, "GET", "/v1/stats")
                    mcp_stats = (await session.call_tool("memory_stats", {})).structured_content
                    library.send("holder\n")
                    _, pid, holder, _ = library.expect("holder ").split()
                    holders_seen.append((before, {
                        http_stats["pid"]: http_stats["checkpointer"]["holder"],
                        mcp_stats["pid"]: mcp_stats["checkpointer"]["holder"],
                        int(pid): holder == "1"}, _flock_holders(db + ".checkpoint.lock")))
                    wal_sizes.append(http_stats["wal_bytes"])
                i += 1
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        if "done ok" not in library.lines:  # (an expect of "holder" may have read past it)
            library.expect("done", timeout=seconds + 60)
        library.proc.stdin.close()  # type: ignore[union-attr]
        assert library.wait() == 0, library.stderr
        for line in library.lines:
            fields = line.split()
            if fields[0] == "inc" and fields[-1] == "ok":
                increments[fields[1]] += 1
            elif fields[0] == "set" and fields[-1] == "ok":
                acked_sets[fields[1]] = int(fields[2])
            elif fields[0] == "state":
                wal_sizes.append(int(fields[2]))
        assert problems == []
        # No lost update: each counter equals the increments acknowledged to anyone.
        for key, count in increments.items():
            status, body = _http(port, "GET", f"/v1/memories/{key}")
            assert status == 200 and body["value"] == count, (key, body, count)
        assert sum(increments.values()) > 50
        # Every acknowledged set is readable from every process.
        sample = random.Random(1).sample(sorted(acked_sets), min(300, len(acked_sets)))
        for key in sample:
            status, body = _http(port, "GET", f"/v1/memories/{key}")
            assert status == 200 and body["version"] == acked_sets[key], key
            got = await session.call_tool("memory_get", {"key": key})
            assert got.structured_content["found"] is True
        check_acknowledged(db, acked_sets, config=CONFIG, totals=TOTALS)
        TOTALS["acknowledged_write_checks"] += sum(increments.values())
        TOTALS["acknowledged_writes"] += len(acked_sets) + sum(increments.values())
    # Exactly one process holds the lock at every sample, the same one before and after
    # the three answers, and exactly that one says it is the checkpointer.
    assert len(holders_seen) >= 10, holders_seen
    for before, says, after in holders_seen:
        assert len(says) == 3 and len(before) == 1 and after == before, (before, says, after)
        assert [pid for pid, holder in says.items() if holder] == before, (before, says)
    # Writers never wait for the checkpointer, so the cap is soft; the hard cap holds.
    assert max(wal_sizes) <= 4 * cap, max(wal_sizes)
    http_child.proc.send_signal(signal.SIGTERM)
    assert http_child.wait() == 0
    for text in (http_child.stderr, library.stderr):
        assert "database is locked" not in text and "not a database" not in text
        assert "Traceback" not in text


MCP_INIT = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {},
    "clientInfo": {"name": "race", "version": "0"}}}) + "\n"


def test_cold_start_race_of_both_servers(tmp_path: Path, soak: bool) -> None:
    for trial in range(100 if soak else 20):
        db = str(tmp_path / f"race{trial}.db")
        http_child = Child("serve_http", "--db", db, "--port", "0", "--log-level", "WARNING")
        mcp_child = Child("serve_mcp", "--db", db, "--log-level", "WARNING", stdin=True)
        mcp_child.send(MCP_INIT)
        port = int(http_child.expect("listening on").rsplit(":", 1)[1])
        reply = json.loads(mcp_child.expect('{"jsonrpc"', timeout=60))
        assert reply["id"] == 1 and reply["result"]["serverInfo"]["name"] == "kvmem"
        status, body = _http(port, "GET", "/healthz")
        assert status == 200 and body["ok"], body
        http_child.proc.send_signal(signal.SIGTERM)
        mcp_child.proc.stdin.close()  # type: ignore[union-attr]
        assert http_child.wait() == 0 and mcp_child.wait() == 0, mcp_child.stderr
        conn = kvmem.open_db(db, config=CONFIG)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == kvmem.SCHEMA_VERSION
            assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                                " AND name = 'memories'").fetchone()[0] == 1
        finally:
            conn.close()
        for child in (http_child, mcp_child):
            assert "locked" not in child.stderr and "Traceback" not in child.stderr


# --------------------------------------------------------------------------- faults ----


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path | None]:
    """A real tmpfs of ``size`` mounted at ``path`` (root only); None when not allowed."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory: Path, name: str) -> None:
    """Fill a filesystem with a ballast file until it is full."""
    with open(directory / name, "wb") as fp, contextlib.suppress(OSError):
        while True:
            fp.write(b"\0" * 65536)
            fp.flush()


def test_disk_full_then_freed_http(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", "3m") as mounted:
        if mounted is None:
            pytest.fail("cannot mount a tmpfs here (not root?); the disk-full proof needs one")
        db = str(mounted / "kv.db")
        child = Child("serve_http", "--db", db, "--port", "0", "--log-level", "WARNING")
        port = int(child.expect("listening on").rsplit(":", 1)[1])
        try:
            assert _http(port, "PUT", "/v1/memories/before", {"value": "small"})[0] == 201
            _fill(mounted, "ballast")
            statuses = [_http(port, "PUT", f"/v1/memories/big{i}", {"value": "x" * 200_000})
                        for i in range(20)]
            full = [body for status, body in statuses if status == 507]
            assert full and full[0]["error"]["code"] == "storage_full", statuses[:2]
            assert all(status in (201, 507) for status, _ in statuses)
            status, body = _http(port, "GET", "/v1/memories/before")  # reads keep working
            assert status == 200 and body["value"] == "small"
            os.remove(mounted / "ballast")  # space freed: writes work again, no restart
            status, body = _http(port, "PUT", "/v1/memories/after", {"value": "x" * 200_000})
            assert status == 201, body
            assert _http(port, "GET", "/healthz")[0] == 200
        finally:
            child.proc.send_signal(signal.SIGTERM)
            child.wait()
        assert "Traceback" not in child.stderr
        assert run_cli("check", db).returncode == 0
    TOTALS["fault_cases"] += 1


@pytest.mark.anyio
async def test_disk_full_then_freed_mcp(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", "3m") as mounted:
        if mounted is None:
            pytest.fail("cannot mount a tmpfs here (not root?); the disk-full proof needs one")
        with kvmem.Store.open(mounted / "kv.db", config=CONFIG) as store:
            async with Client(mcp_server.build_server(store)) as client:
                assert not (await client.call_tool("memory_set", {"key": "a", "value": 1})).is_error
                _fill(mounted, "ballast")
                texts = []
                for i in range(20):
                    result = await client.call_tool("memory_set",
                                                    {"key": f"big{i}", "value": "x" * 200_000})
                    if result.is_error:
                        texts.append(result.content[0].text)  # type: ignore[union-attr]
                assert texts and all("storage_full: " in t for t in texts), texts[:2]
                got = await client.call_tool("memory_get", {"key": "a"})
                assert got.structured_content["found"] is True
                os.remove(mounted / "ballast")
                result = await client.call_tool("memory_set", {"key": "after", "value": 2})
                assert not result.is_error
    TOTALS["fault_cases"] += 1


def test_wal_fills_a_small_disk_then_restart_and_space_back(tmp_path: Path) -> None:
    """A reader holding a snapshot keeps the WAL from restarting until it fills a real
    8 MiB tmpfs.  Writes then fail with storage_full while reads keep working; the
    process is killed; a new one opens on the still-full disk (its start-up checkpoint
    fails and is recorded, not raised) and reads every acknowledged write; once space
    exists, writes work at once and the WAL file is cut back."""
    with small_filesystem(tmp_path / "small", "8m") as mounted:
        if mounted is None:
            pytest.fail("cannot mount a tmpfs here (not root?); the disk-full proof needs one")
        db = str(mounted / "kv.db")
        with open(mounted / "ballast", "wb") as fp:  # not the database: no connection to it
            fp.write(b"\0" * 3 * 1024 * 1024)
        writer = Child("pinned_writer", db, stdin=True)
        full = writer.expect("full", timeout=120).split(" ", 2)
        acked = [int(line.split()[1]) for line in writer.lines if line.startswith("ack ")]
        assert "read 0:" in writer.lines, writer.lines[-3:]  # a read during the full disk
        health = json.loads(full[2])
        assert int(full[1]) > 3 * 1024 * 1024  # the WAL filled the disk
        assert any("held a snapshot" in p and "export" in p for p in health["problems"]), health
        writer.kill()
        assert len(acked) >= 50
        refused = [line.split()[1] for line in writer.lines if line.startswith("refused ")]
        assert len(refused) == 3
        restarted = Child("restarted", db, ",".join(map(str, acked)), ",".join(refused),
                          stdin=True)
        opened = restarted.expect("opened", timeout=60).split()
        assert opened[1] == "failed", opened  # the start-up checkpoint had no room
        assert int(opened[2]) == len(acked)  # every acknowledged write survived
        assert int(opened[3]) == 0  # and no write answered storage_full was stored
        os.remove(mounted / "ballast")
        restarted.send("go\n")
        after = restarted.expect("after", timeout=120).split()
        assert after[3] == "ok", after  # the first write after space exists works
        assert int(after[4]) < 1024 * 1024, after  # and the WAL gave its space back
        assert after[5] == "true", after
        assert restarted.wait() == 0, restarted.stderr
        assert "Traceback" not in writer.stderr + restarted.stderr
        assert run_cli("check", db).returncode == 0
    TOTALS["fault_cases"] += 1


@pytest.mark.parametrize("left", ["crashed", "closed"])
def test_read_only_filesystem(tmp_path: Path, left: str) -> None:
    """A database on a filesystem remounted read-only, as its last writer left it.

    Left by a crash (its -wal and -shm still there), it reads: ``kvmem check`` exits 0 and
    a read-only open reads every acknowledged memory.  Closed cleanly (no -wal, no -shm),
    SQLite cannot read a WAL-mode file where it cannot create the -shm
    (https://sqlite.org/wal.html#readonly): ``check`` exits 1 with storage_error
    (SQLITE_CANTOPEN), and every open fails the same way, the server's with exit 2.
    Either way nothing is written, and every memory reads once the mount is writable."""
    with small_filesystem(tmp_path / "ro", "4m") as mounted:
        if mounted is None:
            pytest.fail("cannot mount a tmpfs here (not root?)")
        db = str(mounted / "kv.db")
        with kvmem.Store.open(db, config=CONFIG) as store:
            store.set("kept", "value")
        acked = {"kept": 1}
        if left == "crashed":
            writer = Child("crash_writer", "plain", db, "r0")
            for _ in range(20):
                writer.expect("set ")
            for line in writer.kill():
                fields = line.split()
                if len(fields) == 4 and fields[-1] == "ok":
                    acked[fields[1]] = int(fields[2])
            assert writer.killed and len(acked) > 20, (writer.lines[-3:], writer.stderr)
            assert os.path.exists(db + "-wal") and os.path.exists(db + "-shm")
        before = file_digest(db)
        subprocess.run(["mount", "-o", "remount,ro", str(mounted)], check=True)
        try:
            check = run_cli("check", db)
            report = json.loads(check.stdout)
            if left == "crashed":
                assert (check.returncode, report["ok"], report["integrity"]) == (0, True, ["ok"]), \
                    (check.returncode, check.stdout)
                conn = kvmem.open_db(db, config=CONFIG, readonly=True)
                try:
                    rows = read_back(conn).rows
                finally:
                    conn.close()
                assert rows["kept"].value == "value"
                assert lost_writes(rows, acked, value=_crash_or_kept) == []
            else:
                error = report.get("error", {})
                assert (check.returncode, error.get("code")) == (1, "storage_error"), \
                    (check.returncode, check.stdout)
                assert "SQLITE_CANTOPEN" in error["message"], check.stdout
                with pytest.raises(kvmem.StorageError, match="SQLITE_CANTOPEN"):
                    kvmem.open_db(db, config=CONFIG, readonly=True)
                with pytest.raises(kvmem.StorageError, match="SQLITE_CANTOPEN"):
                    kvmem.Store.open(db, config=CONFIG)
                child = Child("serve_http", "--db", db, "--port", "0")
                assert child.wait() == 2 and "kvmem-http:" in child.stderr, child.stderr
                assert "Traceback" not in child.stderr
            assert file_digest(db) == before
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mounted)], check=True)
        assert file_digest(db) == before
        check_acknowledged(db, acked, config=CONFIG, value=_crash_or_kept)
    TOTALS["fault_cases"] += 1


def _crash_or_kept(key: str) -> Any:
    return "value" if key == "kept" else crash_value(key)


@pytest.mark.parametrize("content", ["text", "zeros", "truncated", "wal"])
def test_servers_refuse_a_file_that_is_not_a_database(tmp_path: Path, content: str) -> None:
    db = tmp_path / "bad.db"
    if content == "text":
        db.write_text("[settings]\nnot = 'a database'\n")
    elif content == "zeros":
        db.write_bytes(b"\0" * 16384)
    elif content == "truncated":
        db.write_bytes(kvmem.SQLITE_MAGIC + b"\0" * 20)
    else:
        db.write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 4092)
    before = file_digest(str(db))
    for server in ("serve_http", "serve_mcp"):
        child = Child(server, "--db", str(db), "--port", "0")
        assert child.wait() == 2, server
        assert "not an SQLite database" in child.stderr and "Traceback" not in child.stderr
    assert file_digest(str(db)) == before
    assert run_cli("check", str(db)).returncode == 1
    TOTALS["fault_cases"] += 1


def test_corrupt_page_reported_never_repaired(tmp_path: Path) -> None:
    db = str(tmp_path / "kv.db")
    with kvmem.Store.open(db, config=CONFIG) as store:
        store.batch([{"op": "set", "key": f"k{i:04d}", "value": "v" * 300} for i in range(800)])
    conn = kvmem.open_db(db, config=CONFIG)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'memories'").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0
    with open(db, "r+b") as fp:  # garble an interior page of the memories table
        fp.seek((root - 1) * page_size + 8)
        fp.write(b"\xde\xad\xbe\xef" * 64)
    before = file_digest(db)
    check = run_cli("check", db)
    report = json.loads(check.stdout)
    assert check.returncode == 1 and not report["ok"] and report["integrity"] != ["ok"]
    # Default start-up runs quick_check and refuses the file with a clear error.
    child = Child("serve_http", "--db", db, "--port", "0")
    assert child.wait() == 2 and "corrupt" in child.stderr.lower()
    # Started without the check, the server runs, meets the damage, and says so.
    child = Child("serve_http", "--db", db,
                  "--port", "0", "--quick-check", "false", "--log-level", "WARNING")
    port = int(child.expect("listening on").rsplit(":", 1)[1])
    try:
        status, body = _http(port, "GET", "/v1/memories?limit=1000")
        assert status == 503 and body["error"]["code"] == "corrupt_database", body
        status, body = _http(port, "GET", "/healthz")
        assert status == 503 and not body["ok"] and "corrupt" in json.dumps(body)
    finally:
        child.proc.send_signal(signal.SIGTERM)
        child.wait()
    assert file_digest(db) == before  # nothing deleted, rewritten or "repaired"
    assert os.path.getsize(db) == pages * page_size
    TOTALS["fault_cases"] += 1


def test_newer_schema_refused_by_both_servers(tmp_path: Path) -> None:
    db = str(tmp_path / "kv.db")
    kvmem.open_db(db, config=CONFIG).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 42")
    raw.close()
    before = file_digest(db)
    for server in ("serve_http", "serve_mcp"):
        child = Child(server, "--db", db, "--port", "0")
        assert child.wait() == 2 and "newer kvmem" in child.stderr, child.stderr
    assert file_digest(db) == before
    TOTALS["fault_cases"] += 1


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_directory_deleted_or_replaced_while_serving(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    db = str(directory / "kv.db")
    child = Child("serve_http", "--db", db, "--port", "0", "--log-level", "WARNING")
    port = int(child.expect("listening on").rsplit(":", 1)[1])
    try:
        assert _http(port, "PUT", "/v1/memories/k", {"value": 1})[0] == 201
        shutil.move(str(directory), str(tmp_path / "moved-away"))
        if how == "replaced":
            directory.mkdir()
            kvmem.open_db(db, config=CONFIG).close()  # someone starts a fresh database there
        status, body = _http(port, "GET", "/healthz")
        assert status == 503 and not body["ok"] and how in json.dumps(body), body
        status, body = _http(port, "PUT", "/v1/memories/ghost", {"value": 2})
        assert status == 503 and "refused" in body["error"]["message"], body
    finally:
        child.proc.send_signal(signal.SIGTERM)
        child.wait()
    # The write was not acknowledged, and it is in neither file: no silent split.
    for path in (str(tmp_path / "moved-away" / "kv.db"), db):
        if os.path.exists(path):
            conn = kvmem.open_db(path, config=CONFIG)
            try:
                keys = [r[0] for r in conn.execute("SELECT key FROM memories")]
            finally:
                conn.close()
            assert "ghost" not in keys
    TOTALS["fault_cases"] += 1


# ----------------------------------------------------------------------- hostile MCP ----

# Text with NUL and the other control characters beside any other character; and text
# with a lone surrogate, which only goes over stdio (as a \\udXXX escape, which the MCP
# SDK refuses before any tool sees it; its client cannot send one at all).
plain_texts = st.text(st.characters(codec="utf-8") | st.characters(categories=["Cc"])
                      | st.sampled_from(["\x00", " "]), max_size=30)
surrogate_texts = st.builds(lambda head, surrogate, tail: head + surrogate + tail,
                            plain_texts, st.characters(categories=["Cs"]), plain_texts)


def _json_of(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8)


json_values = _json_of(plain_texts)
# Every argument of every tool, as their input schemas declare them (test_mcp.py checks
# EXPECTED_TOOLS against the live schemas), plus one no tool takes.
ARGUMENT_NAMES = sorted({name for inputs, _, _ in EXPECTED_TOOLS.values() for name in inputs}
                        | {"unknown_argument"})


# The codes of a request's own fault.  Any other (storage_error, internal, busy...) is
# the server's fault: fuzzed arguments against an idle store must never cause one.
CLIENT_FAULTS = ("invalid_request", "not_found", "version_conflict", "payload_too_large")


def assert_client_fault(text: str) -> None:
    """A tool error: a client-fault kvmem code, then what was wrong, with no internals."""
    code, _, message = text.partition(": ")
    assert code in CLIENT_FAULTS and len(message) >= 5, text
    assert "pydantic" not in text and "Traceback" not in text, text


# Refusals no JSON schema states: the state of the store, the size as stored, the words
# of a query, and tags that are too many only before duplicates are dropped.
SCHEMA_CANNOT_SAY = ("not_found: ", "version_conflict: ", "payload_too_large: ",
                     "at least one word", "cursor", "tags (got")


@pytest.mark.anyio
@settings(max_examples=3000 if SOAK else 300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tool=st.sampled_from(sorted(EXPECTED_TOOLS)),
    arguments=st.dictionaries(st.sampled_from(ARGUMENT_NAMES), json_values | st.lists(
        st.dictionaries(st.sampled_from(["op", "key", "value", "if_version", "tags",
                                         "ttl_seconds", "half_life_seconds", "namespace"]),
                        json_values | st.sampled_from(["set", "delete"]), max_size=4),
        max_size=3), max_size=5))
@example(tool="memory_get", arguments={"key": "k\n"})  # "$" in a pattern matches before "\n"
@example(tool="memory_search", arguments={"query": "a\x00b"})  # was storage_error
@example(tool="memory_set", arguments={"key": "nul", "value": {"a\x00": "b\x00c"}})  # stored as
@example(tool="memory_batch", arguments={"ops": [{"op": "set", "key": "nul",  # \u0000: a text
                                                  "value": "\x00"}]})  # column refuses NUL
async def test_fuzz_mcp_tools(store: kvmem_cli.AnyStore, tool: str, arguments: dict[str, Any],
                              caplog: pytest.LogCaptureFixture) -> None:
    """Fuzzed arguments for every tool, over conftest's ``store`` (each backend; one store
    for all the examples, which pile up in it)."""
    async with Client(mcp_server.build_server(store)) as client:
        schema = {t.name: t.input_schema for t in (await client.list_tools()).tools}[tool]
        result = await client.call_tool(tool, arguments)
    TOTALS["fuzz_cases"] += 1
    try:
        json.dumps(arguments, allow_nan=False)
    except ValueError:  # NaN or an infinity: no JSON client can send these
        pass
    else:  # the published schema tells what the tool takes
        valid = jsonschema.Draft202012Validator(schema).is_valid(arguments)
        text = "" if not result.is_error else result.content[0].text  # type: ignore[union-attr]
        assert valid or result.is_error, ("the schema refuses what the tool took", arguments)
        assert not valid or not result.is_error or any(
            reason in text for reason in SCHEMA_CANNOT_SAY), (text, arguments)
    unknown = sorted(name for name in arguments if name not in EXPECTED_TOOLS[tool][0])
    if unknown:  # refused whatever else is wrong or right, naming what the tool does not take
        assert result.is_error, (tool, arguments)
    if result.is_error:
        text = result.content[0].text  # type: ignore[union-attr]
        assert_client_fault(text)
        if unknown:
            assert text.startswith("invalid_request: unknown argument"), text
            assert all(repr(name) in text for name in unknown), text
    assert "Traceback" not in caplog.text and "failed unexpectedly" not in caplog.text


# ------------------------------------------------------------- hostile MCP over stdio ----

# JSON-RPC errors that blame the request: unreadable, not a request, no such method, bad
# params.  -32603 (internal error) or any other would blame the server.
JSONRPC_CLIENT_FAULTS = {-32700, -32600, -32601, -32602}


@dataclasses.dataclass(frozen=True)
class RawNumber:
    """A number token written as is: JSON allows what Python's json would not write."""

    token: str


@dataclasses.dataclass(frozen=True)
class Nested:
    """``value`` inside ``depth`` arrays (kept flat here: a deep value would not print)."""

    value: Any
    depth: int


def _encode(value: Any) -> str:
    """JSON text of ``value`` in ASCII (a lone surrogate as a \\udXXX escape, NUL as
    \\u0000), RawNumber tokens as they are."""
    if isinstance(value, RawNumber):
        return value.token
    if isinstance(value, Nested):
        return "[" * value.depth + _encode(value.value) + "]" * value.depth
    if isinstance(value, list):
        return "[" + ",".join(map(_encode, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_encode(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _beyond_python(value: Any) -> bool:
    """Whether ``value`` holds what Python's json, the parser a server falls back on to
    read the id of a request its own parser refused, cannot read at its default limits:
    over 1,000 levels of nesting, an integer of over 4,300 digits."""
    if isinstance(value, Nested):
        return value.depth >= 1000 or _beyond_python(value.value)
    if isinstance(value, RawNumber):
        return len(value.token.lstrip("-")) > 4300 and value.token.lstrip("-").isdigit()
    if isinstance(value, dict):
        return any(map(_beyond_python, value.values()))
    return isinstance(value, list) and any(map(_beyond_python, value))


raw_numbers = st.sampled_from(["1e400", "-1e400", "1E-400", "-0", "0.0e0", "1" + "0" * 30,
                               "9" * 4000, "9" * 5000, "-" + "1" * 400 + ".5e-3"]).map(RawNumber)
stdio_values = st.one_of(
    json_values, raw_numbers, st.integers(-10**400, 10**400),
    # Not near 1,000 levels: there whether Python's json gets through depends on the stack
    # in use (a 975-deep request got a null-id parse error).
    st.builds(Nested, json_values | raw_numbers,
              st.integers(0, 600) | st.integers(1100, 3000)))
argument_names = st.sampled_from(ARGUMENT_NAMES)
op_fields = st.sampled_from(["op", "key", "value", "if_version", "tags", "ttl_seconds"])
stdio_objects = st.dictionaries(st.one_of(argument_names, argument_names, argument_names,
                                          plain_texts), stdio_values | st.lists(
    st.dictionaries(op_fields | plain_texts,
                    stdio_values | st.sampled_from(["set", "delete"]), max_size=4),
    max_size=3), max_size=5)
tool_names = st.sampled_from(sorted(EXPECTED_TOOLS))


@st.composite
def stdio_messages(draw: st.DrawFn) -> tuple[str, Any]:
    """One line for kvmem-mcp's stdin, as a kind and its content: ``request`` (a message
    to send with an id), ``notification`` (no id: no answer), ``malformed`` (bytes:
    answered by a null-id error) or ``blank``."""
    kind = draw(st.sampled_from(["call"] * 6 + ["request", "notification", "malformed"]))
    if kind == "call":
        # Mostly tools the server has, with arguments it can read; sometimes not.
        name = draw(st.integers(0, 9))
        params: dict[str, Any] = {"name": draw(
            tool_names if name < 8 else plain_texts if name == 8 else surrogate_texts)}
        arguments = draw(st.integers(0, 19))
        if arguments == 1:  # not an object at all
            params["arguments"] = draw(stdio_values)
        elif arguments > 1:
            params["arguments"] = draw(stdio_objects)
            if arguments == 2:
                params["arguments"][draw(argument_names)] = draw(surrogate_texts)
        return "request", {"jsonrpc": "2.0", "method": "tools/call", "params": params}
    if kind == "request":
        method = draw(st.sampled_from(["tools/list", "ping", "resources/list", "prompts/get"])
                      | plain_texts)
        return "request", {"jsonrpc": "2.0", "method": method, "params": draw(
            st.none() | st.dictionaries(plain_texts, stdio_values, max_size=2))}
    if kind == "notification":
        return "notification", {"jsonrpc": "2.0", "method": "notifications/" + draw(
            plain_texts if draw(st.integers(0, 3)) else surrogate_texts)}
    garbage = draw(st.one_of(
        st.binary(min_size=1, max_size=200),
        st.builds(lambda text, cut: text[:max(1, cut % len(text))],  # a request cut short
                  st.builds(lambda a: _encode({"jsonrpc": "2.0", "id": 1,
                                               "method": "tools/call", "params": a}),
                            stdio_objects).map(str.encode), st.integers(0, 10**6)),
        st.builds(lambda v: _encode([v]).encode(), stdio_values)))  # a batch, or a bare value
    garbage = garbage.replace(b"\n", b" ")
    if not garbage.decode("utf-8", "replace").strip():
        return "blank", garbage  # the server skips a blank line
    return "malformed", garbage


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(map(_has_surrogate, value)) or any(map(_has_surrogate, value.values()))
    return isinstance(value, list) and any(map(_has_surrogate, value))


def _stdio_ping(child: Child, ident: int) -> None:
    """A ping, and every line up to its answer: there must be none (an answer no line
    asked for).  Read to the ping's answer either way, so the next case starts clean."""
    child.send(json.dumps({"jsonrpc": "2.0", "id": f"ping-{ident}", "method": "ping"}) + "\n")
    strays = []
    while (answer := _stdio_answer(child)).get("id") != f"ping-{ident}":
        strays.append(answer)
    assert strays == [], strays[:3]
    assert answer == {"jsonrpc": "2.0", "id": f"ping-{ident}", "result": {}}, answer


def _stdio_answer(child: Child) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(child.expect(""))
    return answer


def test_fuzz_mcp_stdio(db: str) -> None:
    """kvmem-mcp as a process, its stdin fed raw lines: tool calls with fuzzed arguments
    (lone surrogates, NULs, deep nesting, numbers of any size), other requests,
    notifications, garbage bytes.  One line at a time, each request gets exactly one
    answer, with its id (null only for a line Python's json cannot read either): a
    result, a tool error with a client-fault kvmem code, or a JSON-RPC error blaming the
    request; a line that is no request gets a null-id error if it is not JSON-RPC, and
    no answer if it is blank or a notification.  A ping after each line shows no other
    answer came.  The server exits 0 at the end of its input, with no traceback.  On each
    backend."""
    server = Child("serve_mcp", "--db", db, "--log-level", "WARNING", stdin=True)
    server.send(MCP_INIT)
    assert _stdio_answer(server)["id"] == 1
    server.send('{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
    server.send(tool_call_line(2, "memory_set", {"key": "k", "value": "a b"}))
    assert _stdio_answer(server)["result"]["isError"] is False
    ids = iter(range(3, 10**9))

    @settings(max_examples=4000 if SOAK else 400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(message=stdio_messages())
    @example(message=("request", {"jsonrpc": "2.0", "method": "tools/call", "params": {
        "name": "memory_search", "arguments": {"query": "a\x00b"}}}))  # was storage_error
    @example(message=("request", {"jsonrpc": "2.0", "method": "tools/call", "params": {
        "name": "memory_set", "arguments": {"key": "\ud800", "value": "\udfff"}}}))
    @example(message=("request", {"jsonrpc": "2.0", "method": "tools/call", "params": {
        "name": "memory_set", "arguments": {"key": "nul", "value": {"a\x00": "b\x00c"}}}}))
    def one(message: tuple[str, Any]) -> None:
        kind, content = message
        ident = next(ids)
        TOTALS["fuzz_cases"] += 1
        if kind in ("blank", "malformed"):
            line = content
        else:
            line = _encode({**content, "id": ident} if kind == "request" else content).encode()
        server.send_bytes(line + b"\n")
        try:
            if kind == "malformed" or (kind == "notification" and _has_surrogate(content)):
                # Not JSON-RPC to the SDK (it refuses lone surrogates), so kvmem-mcp answers.
                answer = _stdio_answer(server)
                assert answer["id"] is None and answer["error"]["code"] in (-32700, -32600), \
                    (line[:300], answer)
            elif kind == "request":
                answer = _stdio_answer(server)
                if answer["id"] != ident:  # only a request Python's json cannot read may
                    assert _beyond_python(content) and answer["id"] is None \
                        and answer["error"]["code"] == -32700, (line[:300], answer)  # lose it
                if "error" in answer:
                    assert answer["error"]["code"] in JSONRPC_CLIENT_FAULTS, (line[:300], answer)
                    assert "Traceback" not in answer["error"]["message"], answer
                elif content["method"] == "tools/call" and answer["result"].get("isError"):
                    assert_client_fault(answer["result"]["content"][0]["text"])
        finally:
            _stdio_ping(server, ident)  # and no other answer

    try:
        one()
    finally:
        server.proc.stdin.close()  # type: ignore[union-attr]
        rc = server.wait()
    assert rc == 0, server.stderr[-3000:]
    assert "Traceback" not in server.stderr and "failed unexpectedly" not in server.stderr, \
        server.stderr[-3000:]


def tool_call_line(ident: int, tool: str, arguments: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": ident, "method": "tools/call",
                       "params": {"name": tool, "arguments": arguments}}) + "\n"
