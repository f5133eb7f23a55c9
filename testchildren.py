"""Child programs of the test suites, one function each: ``python -m testchildren NAME ARGS...``.

A test starts one with ``testutil.Child(NAME, *ARGS)`` (or ``testutil.child_command``) and
waits on the lines it prints, so each child prints a line only once the thing it names has
happened (an acknowledgement is printed after the write returned) and flushes it at once.
Each imports kvmem (or the server it runs) inside its function: a child starts as quickly
as the one-liner it replaces, and only loads what it uses.  Arguments arrive as strings,
in the order ``argv`` gives them; a child's return value is its exit status (None is 0),
and an exception ends it with status 1 and a traceback on stderr.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# ------------------------------------------------------------------------- servers ----


def serve_http(*argv: str) -> int:
    """``kvmem-http`` with ``argv`` (prints ``listening on http://HOST:PORT`` when ready)."""
    import http_server

    return http_server.main(list(argv))


def serve_mcp(*argv: str) -> int:
    """``kvmem-mcp`` with ``argv`` (MCP over stdin/stdout)."""
    import mcp_server

    return mcp_server.main(list(argv))


# --------------------------------------------------------- test_durability.py ----


def crash_value(key: str) -> dict[str, str]:
    """The value ``crash_writer`` stores under ``key`` (the test checks it exactly)."""
    return {"key": key, "pad": "p" * (len(key) * 37 % 700)}


def crash_writer(mode: str, db: str, run: str, *rest: str) -> None:
    """One writer of the crash matrix per ``mode``, writing until it is killed.  It prints
    ``<kind> <fields...> ok`` only after the write returned (the acknowledgement); a line
    cut by the kill has no ``ok`` and counts for nothing.  Mode ``import`` takes the
    export file to import as ``rest[0]``, prints ``importing`` before each import and
    ``chunk K`` as it starts on chunk K (see ``ChunkReport``)."""
    import kvmem

    flags = {"prune_batch": "100" if mode == "import" else "10"}
    if mode == "checkpoint":  # a tiny WAL cap: checkpoints all the time
        flags.update(wal_cap_bytes="65536", checkpoint_poll_s="0.005", checkpoint_pages="4")
    store = kvmem.Store.open(db, config=kvmem.Config.build(flags=flags),
                             checkpointer=mode == "checkpoint")
    lock = threading.Lock()

    def ack(*fields: object) -> None:
        with lock:
            print(*fields, "ok", flush=True)

    def plain(tag: str) -> None:
        i = 0
        while True:
            key = f"{run}-{tag}-{i}"
            m = store.set(key, crash_value(key))
            ack("set", key, m.version)
            i += 1

    if mode in ("plain", "checkpoint"):
        plain("p")
    elif mode == "group":
        for t in range(8):
            threading.Thread(target=plain, args=(f"g{t}",), daemon=True).start()
        threading.Event().wait()
    elif mode == "batch":
        j = 0
        while True:
            keys = [f"{run}-b{j}-{k}" for k in range(5)]
            store.batch([{"op": "set", "key": k, "value": crash_value(k)} for k in keys])
            ack("batch", f"{run}-b{j}", 5)
            j += 1
    elif mode == "prune":
        i = 0
        while True:
            key = f"{run}-keep-{i}"
            m = store.set(key, crash_value(key))
            ack("set", key, m.version)
            store.batch([{"op": "set", "key": f"{run}-gone-{i}-{k}", "value": k,
                          "ttl_seconds": 0.001} for k in range(30)])
            time.sleep(0.002)  # let them expire, then prune them in batches of 10
            store.prune()
            i += 1
    elif mode == "import":
        with open(rest[0]) as fp:
            text = fp.read()
        while True:
            print("importing", flush=True)
            result = store.import_(ChunkReport(text, store.config.prune_batch))
            ack("import", result["imported"])


class ChunkReport(io.StringIO):
    """An import file that prints ``chunk K`` as ``Store.import_``'s second pass (the
    one that writes, after its ``seek(0)``) reads the first line of chunk K, of ``batch``
    lines each: the import reads a chunk only once the one before it was committed."""

    def __init__(self, text: str, batch: int) -> None:
        super().__init__(text)
        self.batch, self.passes, self.lines_read = batch, 0, 0

    def seek(self, position: int, whence: int = 0) -> int:
        self.passes, self.lines_read = self.passes + 1, 0
        return super().seek(position, whence)

    def __next__(self) -> str:  # type: ignore[override]  # typeshed: _IOBase yields bytes
        line = super().__next__()
        if self.passes == 1 and self.lines_read % self.batch == 0:
            print("chunk", self.lines_read // self.batch, flush=True)
        self.lines_read += 1
        return line


def starter(db: str, tag: str) -> None:
    """Open ``db`` (maybe creating it) and write one memory: ``set KEY VERSION ok``.

    On the way it prints its start-up stages, each before the stage goes on, so a test
    can kill it at one: ``up`` (before importing kvmem), ``imported``, ``connected`` after
    each ``sqlite3.connect`` returned (the file exists from the first), and ``sql
    STATEMENT`` as SQLite starts each statement (the WAL switch, the migration, the
    checkpointer's election...), from any of its threads."""
    import sqlite3

    out = threading.Lock()

    def say(*fields: object) -> None:  # one whole line at a time, from any thread
        with out:
            sys.stdout.write(" ".join(map(str, fields)) + "\n")
            sys.stdout.flush()

    say("up")
    import kvmem

    say("imported")
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        say("connected")
        conn.set_trace_callback(lambda sql: say("sql", " ".join(sql.split())[:60]))
        return conn

    sqlite3.connect = traced  # type: ignore[assignment]  # kvmem opens through this name
    store = kvmem.Store.open(db)
    m = store.set(f"start-{tag}", {"started": tag})
    say("set", m.key, m.version, "ok")


def library_process(db: str, seconds: str) -> None:
    """The library beside both servers for ``seconds``: compare-and-set increments of
    ``counter-0..3`` (``inc KEY ok``) and plain sets (``set KEY VERSION ok``); every 0.2 s
    ``state HOLDER WAL_BYTES ok``; ``ready ok`` first and ``done ok`` last.  A line
    ``holder`` on stdin is answered at once, until stdin ends (then it exits):
    ``holder PID HOLDER ok``, HOLDER being 1 if its checkpointer holds the election."""
    import kvmem

    store = kvmem.Store.open(db, role="library")
    stop = threading.Event()
    out = threading.Lock()

    def say(*fields: object) -> None:  # one whole line at a time, from any thread
        with out:
            sys.stdout.write(" ".join(map(str, fields)) + "\n")
            sys.stdout.flush()

    def report() -> None:
        while not stop.wait(0.2):
            state = store.stats()
            say("state", int(state["checkpointer"]["holder"]), state["wal_bytes"], "ok")

    def answer() -> None:
        for line in sys.stdin:
            if line.strip() == "holder":
                checkpointer = store.stats()["checkpointer"]
                say("holder", os.getpid(), int(checkpointer["holder"]), "ok")

    threading.Thread(target=report, daemon=True).start()
    answering = threading.Thread(target=answer, daemon=True)
    answering.start()
    say("ready", "ok")
    deadline = time.monotonic() + float(seconds)
    i = 0
    while time.monotonic() < deadline:
        key = f"counter-{i % 4}"
        while True:
            current = store.get(key)
            try:
                store.set(key, (current.value if current else 0) + 1,
                          if_version=current.version if current else 0)
                break
            except kvmem.VersionConflictError:
                continue
        say("inc", key, "ok")
        m = store.set(f"lib-{i}", i)
        say("set", m.key, m.version, "ok")
        i += 1
    stop.set()
    say("done", "ok")
    answering.join()  # until stdin ends
    store.close()


def pinned_writer(db: str) -> None:
    """An export stalled on its output pins a snapshot; once health names it, write 3 KB
    values (``ack I``) until three are refused with storage_full (``refused I``), then
    ``read 0:`` (a read on the full disk), ``full WAL_BYTES HEALTH_JSON``, and wait on
    stdin (the test kills it there)."""
    import kvmem

    config = kvmem.Config.build(flags={"checkpoint_poll_s": "0.05", "reader_warn_s": "0.5"})
    store = kvmem.Store.open(db, config=config)
    store.set("seed", "s")
    stalled = threading.Event()

    class Stalled:  # an export whose reader went away: it holds its snapshot
        def write(self, text: str) -> int:
            stalled.set()
            threading.Event().wait()
            return len(text)

    threading.Thread(target=store.export, args=(Stalled(),), daemon=True).start()
    stalled.wait()
    while store.health()["ok"]:  # until the checkpointer names the stalled reader
        stalled.wait(0.01)
    full = 0
    for i in range(100000):
        try:
            store.set(f"k{i}", f"{i}:" + "v" * 3000)
            print("ack", i, flush=True)
        except kvmem.StorageFullError:
            print("refused", i, flush=True)
            full += 1
            if full == 3:
                break
    first = store.get("k0")
    assert first is not None
    print("read", first.value[:2], flush=True)  # reads work on the full disk
    print("full", os.stat(db + "-wal").st_size, json.dumps(store.health()), flush=True)
    sys.stdin.readline()


def restarted(db: str, acked: str, refused: str) -> None:
    """Open ``db`` on the still-full disk and count the acknowledged and the refused keys
    (comma-separated numbers) it holds: ``opened CHECKPOINT FOUND REFUSED_FOUND``; after a
    line on stdin (space freed), write until the WAL is back under 1 MiB:
    ``after OKS FULLS FIRST WAL_BYTES HEALTH_OK``."""
    import kvmem

    config = kvmem.Config.build(flags={"checkpoint_poll_s": "0.05"})
    store = kvmem.Store.open(db, config=config)  # on the full disk
    record = kvmem.recovery_record(db)
    assert record is not None
    found = sum(store.get(f"k{i}") is not None for i in map(int, acked.split(",")))
    stored = sum(store.get(f"k{i}") is not None for i in map(int, refused.split(",")))
    print("opened", record.checkpoint.split(":")[0], found, stored, flush=True)
    sys.stdin.readline()  # the test frees space
    answers: list[str] = []
    while len(answers) < 2000:
        try:
            store.set(f"after{len(answers) % 50}", "a" * 3000)
            answers.append("ok")
        except kvmem.StorageFullError:
            answers.append("full")
        if answers[0] == "ok" and os.stat(db + "-wal").st_size < 1024 * 1024:
            break
    print("after", answers.count("ok"), answers.count("full"), answers[0],
          os.stat(db + "-wal").st_size, json.dumps(store.health()["ok"]), flush=True)
    store.close()


# -------------------------------------------------------------- test_kvmem.py ----

RAW_INSERT = ("INSERT INTO memories (namespace, key, value, version, created_at, updated_at,"
              " strength, last_reinforced_at) VALUES ('test', ?, ?, 1, 0, 0, 1, 0)")


def wal_left_behind(path: str) -> None:
    """Leave a real ``-wal`` file beside ``path``, as a process that died with its
    connection open does (plain sqlite3, no kvmem)."""
    import sqlite3

    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.execute("CREATE TABLE t(x)")
    c.execute("INSERT INTO t VALUES (1)")
    os._exit(0)


def first_transaction(path: str) -> None:
    """A new database's first transaction (plain sqlite3, DELETE mode), its pages spilled
    to the file: prints ``spilled FILE_SIZE`` and waits on stdin to be killed."""
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=delete")
    conn.execute("PRAGMA cache_size=5")  # a tiny cache: pages spill to the file mid-transaction
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("CREATE TABLE t(x)")
    for _ in range(100):
        conn.execute("INSERT INTO t VALUES (?)", (os.urandom(2000),))
    print("spilled", os.path.getsize(path), flush=True)
    sys.stdin.read()


def raw_writer(path: str, start: str) -> None:
    """Insert rows ``start``, ``start + 1``... (namespace ``test``, version 1) through
    ``kvmem.transaction`` until killed: ``I ok`` after each commit returned."""
    import kvmem

    conn = kvmem.open_db(path)
    i = int(start)
    while True:
        with kvmem.transaction(conn):
            conn.execute(RAW_INSERT, (str(i), json.dumps("v" * (i % 900))))
        print(i, "ok", flush=True)  # the acknowledgement: only after transaction() returned
        i += 1


def opener(db: str) -> None:
    """``ready``; after a line on stdin, ``open_db`` and print ``opened JOURNAL_MODE``."""
    import kvmem

    print("ready", flush=True)
    sys.stdin.readline()
    conn = kvmem.open_db(db)
    print("opened", conn.execute("PRAGMA journal_mode").fetchone()[0], flush=True)


def checkpointer(db: str, role: str) -> None:
    """A Checkpointer alone, until killed: ``holder`` or ``standby`` at each change."""
    import kvmem

    config = kvmem.Config.build(flags={"checkpoint_poll_s": "0.05"})
    cp = kvmem.Checkpointer(db, config=config, role=role).start()
    last = None
    while True:  # report each change of state; the test waits on these lines
        state = cp.state()
        if state["polls"] and state["holder"] != last:
            last = state["holder"]
            print("holder" if last else "standby", flush=True)
        time.sleep(0.005)


def traced_writer(db: str, prefix: str, count: str) -> None:
    """After its first checkpoint poll, ``ready PID HOLDER``; after a line on stdin,
    ``count`` sets and ``done CHECKPOINTS``; then waits on stdin to be killed (no close,
    so no checkpoint at close either)."""
    import kvmem

    config = kvmem.Config.build(flags={"checkpoint_pages": "32", "checkpoint_poll_s": "0.02",
                                       "synchronous": "normal"})
    store = kvmem.Store.open(db, config=config)
    while store.stats()["checkpointer"]["polls"] == 0:  # its first poll (election) is done
        pass
    print("ready", os.getpid(), store.stats()["checkpointer"]["holder"], flush=True)
    sys.stdin.readline()
    for i in range(int(count)):
        store.set(f"{prefix}{i % 200}", prefix + "x" * 300)
    print("done", store.stats()["group_commit"]["checkpoints"], flush=True)
    sys.stdin.readline()  # killed here


def under_strace(trace: str, name: str, *args: str) -> None:
    """Become ``strace`` (writes only, into ``trace``) running child ``name``."""
    os.execvp("strace", ["strace", "-f", "-qq", "-y", "-e", "trace=pwrite64,pwritev,write",
                         "-o", trace, sys.executable, "-m", "testchildren", name, *args])


# -------------------------------------------------------------- test_store.py ----


def group_writer(db: str, run: str) -> None:
    """Eight threads setting ``RUN-T-I`` until killed: ``KEY VERSION ok`` after each
    set returned (group commit, no checkpointer)."""
    import kvmem

    store = kvmem.Store.open(db, checkpointer=False)
    lock = threading.Lock()

    def writer(t: int) -> None:
        i = 0
        while True:
            m = store.set(f"{run}-{t}-{i}", {"i": i, "pad": "p" * (i % 500)})
            with lock:
                print(m.key, m.version, "ok", flush=True)  # acknowledged: set() returned
            i += 1

    for t in range(8):
        threading.Thread(target=writer, args=(t,), daemon=True).start()
    threading.Event().wait()


def pruner(db: str) -> None:
    """``ready``; after a line on stdin, one ``prune()`` in batches of 50:
    ``pruned ARCHIVED DELETED``."""
    import kvmem

    store = kvmem.Store.open(db, config=kvmem.Config.build(flags={"prune_batch": "50"}))
    print("ready", flush=True)
    sys.stdin.readline()
    result = store.prune()
    print("pruned", result.archived, result.deleted, flush=True)
    store.close()


def forgetter(db: str) -> None:
    """``ready``; after a line on stdin, forget prefix ``sel/`` with tag ``x`` in batches of
    10 (until killed): ``forgot DELETED`` if it ends first."""
    import kvmem

    store = kvmem.Store.open(db, config=kvmem.Config.build(flags={"prune_batch": "10"}))
    print("ready", flush=True)
    sys.stdin.readline()
    print("forgot", store.forget(prefix="sel/", tags=["x"])["deleted"], flush=True)
    store.close()


def sidecar_writer(db: str, prefix: str, *options: str) -> None:
    """Set ``PREFIX-0``, ``PREFIX-1``... until killed: ``set KEY VERSION ok`` after each set
    returned, ``refused KEY CODE HEALTH_OK`` for one refused (then a 10 ms pause);
    ``ready`` once open, or ``open-failed CODE`` if the store does not open.  Options:
    ``no-checkpointer`` (a Store without its Checkpointer thread), ``stdin`` (a line on
    stdin stops the writes, closes the store and prints ``closed``)."""
    import kvmem

    try:
        store = kvmem.Store.open(db, role="library", checkpointer="no-checkpointer" not in options)
    except kvmem.KvmemError as exc:
        print("open-failed", exc.code, flush=True)
        return
    stop = threading.Event()

    def wait_for_a_line() -> None:
        sys.stdin.readline()
        stop.set()

    if "stdin" in options:
        threading.Thread(target=wait_for_a_line, daemon=True).start()
    print("ready", flush=True)
    for i in itertools.count():
        if stop.is_set():
            break
        key = f"{prefix}-{i}"
        try:
            m = store.set(key, i)
            print("set", key, m.version, "ok", flush=True)
        except kvmem.KvmemError as exc:
            print("refused", key, exc.code, store.health()["ok"], flush=True)
            time.sleep(0.01)
    store.close()
    print("closed", flush=True)


def hoarder(port: str) -> None:
    """One keep-alive connection to kvmem-http on ``port``, sending ``GET /healthz`` again
    the moment each answer is read, until killed; ``going`` after 20 answers."""
    import socket

    with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as sock:
        for n in itertools.count():
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while not data.endswith(b"}"):  # the body is one JSON object
                data += sock.recv(65536)
            if n == 20:
                print("going", flush=True)


# ---------------------------------------------------------------------------- main ----

CHILDREN: dict[str, Callable[..., Any]] = {child.__name__: child for child in (
    serve_http, serve_mcp, crash_writer, starter, library_process, pinned_writer, restarted,
    wal_left_behind, first_transaction, raw_writer, opener, checkpointer, traced_writer,
    under_strace, group_writer, pruner, forgetter, sidecar_writer, hoarder)}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in CHILDREN:
        print(f"usage: python -m testchildren NAME ARGS...  (NAME: {', '.join(CHILDREN)})",
              file=sys.stderr)
        return 2
    status: int | None = CHILDREN[argv[0]](*argv[1:])
    return status or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
