"""Helpers shared by the test suites: child processes driven by the lines they print, and
the check of acknowledged writes that every crash test makes."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.client
import io
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kvmem
import testchildren

HERE = os.path.dirname(os.path.abspath(__file__))
LIVE_CHILDREN: list[Child] = []  # killed after each test by conftest.py, whatever happened


def child_env(**extra: str) -> dict[str, str]:
    """The test process's environment with this directory importable, KVMEM_* cleared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMEM_")}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def child_command(name: str, *args: str) -> list[str]:
    """The command line of child program ``name`` (a function in testchildren.py); run it
    with ``cwd=HERE`` or ``child_env()`` so that it imports this directory's modules."""
    if name not in testchildren.CHILDREN:
        raise ValueError(f"no child program {name!r} in testchildren.py")
    return [sys.executable, "-m", "testchildren", name, *args]


class Child:
    """Child program ``name`` of testchildren.py, whose stdout lines are collected by a
    reader thread, so a test waits on a line (a condition), never on a fixed sleep."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None,
                 stdin: bool = False) -> None:
        self.proc = subprocess.Popen(
            child_command(name, *args), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True, env=env or child_env(), cwd=HERE,
        )
        self.lines: list[str] = []
        self.killed = False  # set by kill()
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
                self._queue.put(None)  # the end stays in the queue for _finish()
                raise AssertionError(f"child exited (rc={self.proc.wait()}) before {prefix!r}; "
                                     f"got {self.lines[-5:]}\nstderr: {self.drain_stderr()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def send_bytes(self, data: bytes) -> None:
        """Write ``data`` to stdin as it is (any bytes, not only text)."""
        stdin = self.proc.stdin
        assert isinstance(stdin, io.TextIOWrapper)
        stdin.flush()
        stdin.buffer.write(data)
        stdin.buffer.flush()

    def kill(self) -> list[str]:
        """SIGKILL, then return every line the child printed (all of them, read to EOF).

        ``killed`` then says whether this kill ended the child: it was running just before
        the signal and its status is -SIGKILL (a child that had exited on its own was
        not killed, whatever its status)."""
        running = self.proc.poll() is None
        self.proc.kill()
        lines = self._finish()
        self.killed = running and self.proc.returncode == -signal.SIGKILL
        return lines

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
    return subprocess.run([sys.executable, os.path.join(HERE, "kvmem_cli.py"), *args],
                          capture_output=True, text=True, env=env or child_env(), timeout=120)


# ------------------------------------------------------------- acknowledged writes ----

READ_ROWS = ("SELECT key, version, value, created_at, updated_at FROM memories"
             " WHERE namespace = ?")


@dataclasses.dataclass(frozen=True, slots=True)
class Stored:
    """One memory as a reopened database holds it."""

    version: int
    value_json: str  # the column as stored; ``value`` decodes it
    created_at: float
    updated_at: float

    @property
    def value(self) -> Any:
        return json.loads(self.value_json)


@dataclasses.dataclass(frozen=True, slots=True)
class ReadBack:
    """A database as read back after a crash: ``PRAGMA integrity_check``'s answer and one
    namespace's memories by key."""

    integrity: list[str]
    rows: dict[str, Stored]

    @property
    def sound(self) -> bool:
        return self.integrity == ["ok"]


def read_back(conn: sqlite3.Connection, *, namespace: str = "default") -> ReadBack:
    """Run ``integrity_check`` on ``conn`` and read every memory of ``namespace``.

    Raises what ``conn.execute`` raises on a damaged file (``sqlite3.DatabaseError``)."""
    integrity = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
    return ReadBack(integrity, read_rows(conn, namespace=namespace))


def read_rows(conn: sqlite3.Connection, *, namespace: str = "default") -> dict[str, Stored]:
    """Every memory of ``namespace`` by key, as stored."""
    return {key: Stored(version, value, created_at, updated_at)
            for key, version, value, created_at, updated_at
            in conn.execute(READ_ROWS, (namespace,))}


def lost_writes(rows: Mapping[str, Stored], acked: Mapping[str, int], *,
                exact_version: bool = True,
                value: Callable[[str], Any] | None = None) -> list[str]:
    """The keys of ``acked`` (key -> acknowledged version) that ``rows`` does not hold as
    acknowledged: missing, at another version (``exact_version``) or at a lower one (not
    ``exact_version``: a later write may have moved it on), or, when ``value`` is given,
    holding a value other than ``value(key)``."""
    lost = []
    for key, version in acked.items():
        row = rows.get(key)
        if (row is None or (row.version != version if exact_version else row.version < version)
                or (value is not None and row.value != value(key))):
            lost.append(key)
    return lost


def check_acknowledged(db: str | os.PathLike[str], acked: Mapping[str, int], *,
                       config: kvmem.Config | None = None, namespace: str = "default",
                       exact_version: bool = True, value: Callable[[str], Any] | None = None,
                       allow_empty: bool = False,
                       totals: dict[str, int] | None = None) -> ReadBack:
    """Reopen ``db`` as the next process would after a crash (``kvmem.open_db`` runs
    recovery) and assert what every crash test asserts: ``integrity_check`` says ok and
    no acknowledged write is lost (see ``lost_writes`` for ``exact_version`` and
    ``value``).  ``acked`` maps each key of ``namespace`` to its acknowledged version.

    An empty ``acked`` fails (a check of nothing proves nothing) unless ``allow_empty``:
    for a test that checks after every kill, some of which come before any
    acknowledgement, and asserts elsewhere that writes were acknowledged.  With
    ``totals`` (``DURABILITY_TOTALS``), the checks, losses and integrity failures are
    counted there before the asserts.  Returns what was read, for a test's own checks.
    """
    assert allow_empty or acked, "no acknowledged write to check: the check would prove nothing"
    conn = kvmem.open_db(db, config=config or kvmem.Config.build(environ={}))
    try:
        found = read_back(conn, namespace=namespace)
    finally:
        conn.close()
    lost = lost_writes(found.rows, acked, exact_version=exact_version, value=value)
    if totals is not None:
        totals["integrity_failures"] += int(not found.sound)
        totals["acknowledged_write_checks"] += len(acked)
        totals["lost"] += len(lost)
    assert found.sound, f"integrity_check: {found.integrity[:3]}"
    assert lost == [], f"{len(lost)} of {len(acked)} acknowledged writes lost, e.g. {lost[:3]}"
    return found


# Rows of the power-loss table (test_powerloss.py), printed at the end of a run.
POWERLOSS_REPORTS: list[Any] = []

SOAK = os.environ.get("KVMEM_TEST_SOAK") == "1"  # set by conftest.py for --soak

# Totals of the reliability suite, printed at the end of a run (conftest.py).
DURABILITY_TOTALS: dict[str, int] = {
    "kills": 0, "acknowledged_writes": 0, "acknowledged_write_checks": 0, "lost": 0,
    "integrity_failures": 0,
    "partial_batches_visible": 0, "fault_cases": 0, "fuzz_cases": 0,
}


def forged_cursor(last_key: str, namespace: str = "default") -> str:
    """A cursor made the way kvmem makes one (its checksum is not secret), holding
    ``last_key``: a client can write any key into one."""
    body = json.dumps({"v": kvmem.CURSOR_VERSION, "k": last_key,
                       "f": kvmem._cursor_filter(namespace, None, None, False)},
                      separators=(",", ":")).encode()  # ASCII: a lone surrogate as \\ud800
    check = hashlib.sha256(body).digest()[:8]
    return base64.urlsafe_b64encode(check + body).decode().rstrip("=")


def http_json(port: int, method: str, path: str, body: Any = None,
              conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    """One request to a server on ``port`` (over ``conn`` if given, else a new
    connection): its status and JSON body."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        if own:
            conn.close()


# ------------------------------------------------ search and list filters, namespaces ----
#
# One table for every interface: the same memories, the same filters and the same answers
# through the library, HTTP, MCP and the command line.

FILTER_T0 = 1_672_531_200.0  # 2023-01-01T00:00:00Z
FILTER_QUERY = "tea"  # every memory below holds the word
# (namespace, key, value, tags, seconds after FILTER_T0 it was written)
FILTER_MEMORIES = [
    ("alpha", "tea/green", "green tea leaves", ["drink", "hot"], 100),
    ("alpha", "tea/black", "black tea leaves", ["drink"], 200),
    ("alpha", "food/rice", "rice with tea sauce", ["hot"], 300),
    ("beta", "tea/oolong", "oolong tea", ["drink", "hot"], 400),
    ("gamma", "tea/mint", "mint tea", ["drink"], 500),
    ("default", "tea/house", "house tea", [], 600),
]
# What Store.namespaces() says of them: beta also holds an archived memory; delta only an
# expired one, so it is not listed.
FILTER_NAMESPACES = [{"namespace": "alpha", "live": 3, "archived": 0},
                     {"namespace": "beta", "live": 1, "archived": 1},
                     {"namespace": "default", "live": 1, "archived": 0},
                     {"namespace": "gamma", "live": 1, "archived": 0}]

ALPHA = {"alpha/tea/green", "alpha/tea/black", "alpha/food/rice"}
EVERY = ALPHA | {"beta/tea/oolong", "gamma/tea/mint", "default/tea/house"}
# (filters as the library names them, the "namespace/key" of what search finds); where
# the namespace is one name (or left out), list answers the same.
FILTER_CASES: list[tuple[dict[str, Any], set[str]]] = [
    ({}, {"default/tea/house"}),
    ({"namespace": "alpha"}, ALPHA),
    ({"namespace": ["alpha", "beta"]}, ALPHA | {"beta/tea/oolong"}),
    ({"namespace": ["gamma"]}, {"gamma/tea/mint"}),
    ({"namespace": "*"}, EVERY),
    ({"namespace": "*", "tags": ["drink", "hot"]}, {"alpha/tea/green", "beta/tea/oolong"}),
    ({"namespace": "*", "prefix": "tea/"}, EVERY - {"alpha/food/rice"}),
    ({"namespace": "*", "tags": ["hot"], "prefix": "tea/"},
     {"alpha/tea/green", "beta/tea/oolong"}),
    ({"namespace": "*", "updated_after": int(FILTER_T0) + 250},
     {"alpha/food/rice", "beta/tea/oolong", "gamma/tea/mint", "default/tea/house"}),
    ({"namespace": "*", "updated_before": "2023-01-01T00:05:00Z"},  # T0 + 300, exclusive
     {"alpha/tea/green", "alpha/tea/black"}),
    ({"namespace": "*", "updated_after": "2023-01-01T01:05:00+01:00"},  # T0 + 300, exclusive
     {"beta/tea/oolong", "gamma/tea/mint", "default/tea/house"}),
    ({"namespace": ["alpha", "beta"], "updated_after": FILTER_T0 + 150.5,
      "updated_before": FILTER_T0 + 450}, {"alpha/tea/black", "alpha/food/rice",
                                           "beta/tea/oolong"}),
    ({"namespace": "alpha", "tags": ["drink", "hot"]}, {"alpha/tea/green"}),
    ({"namespace": "alpha", "tags": ["hot", "hot"]}, {"alpha/tea/green", "alpha/food/rice"}),
    ({"namespace": "beta", "tags": ["hot"]}, {"beta/tea/oolong"}),  # not the archived one
    ({"namespace": "alpha", "prefix": "tea/"}, {"alpha/tea/green", "alpha/tea/black"}),
    ({"namespace": "alpha", "updated_before": "2023-01-01T00:03:20Z"}, {"alpha/tea/green"}),
    ({"namespace": "alpha", "prefix": "tea/", "updated_after": "2023-01-01T00:01:40.000Z"},
     {"alpha/tea/black"}),
    ({"namespace": "alpha", "updated_after": FILTER_T0 + 150, "updated_before": FILTER_T0 + 250},
     {"alpha/tea/black"}),
    ({"namespace": "alpha", "updated_after": FILTER_T0 + 600}, set()),
]
LIST_CASES = [(filters, found) for filters, found in FILTER_CASES
              if isinstance(filters.get("namespace", ""), str) and filters.get("namespace") != "*"]


def fill_filter_store(store: kvmem.Store, clock: list[float]) -> None:
    """Write FILTER_MEMORIES into ``store`` (whose clock reads ``clock[0]``), each at its
    time, and in beta one more that fades and is archived, in delta one that expires."""
    for namespace, key, value, tags, at in FILTER_MEMORIES:
        clock[0] = FILTER_T0 + at
        store.set(key, value, namespace=namespace, tags=tags, half_life_seconds=None)
    clock[0] = FILTER_T0 + 700
    store.set("tea/faded", "faded tea", namespace="beta", tags=["drink", "hot"],
              half_life_seconds=1)
    clock[0] = FILTER_T0 + 800
    assert store.prune().archived == 1
    store.set("tea/expired", "expired tea", namespace="delta", tags=["drink", "hot"],
              ttl_seconds=1, half_life_seconds=None)
    clock[0] = FILTER_T0 + 900
    assert store.namespaces() == FILTER_NAMESPACES


def found_keys(items: list[dict[str, Any]]) -> set[str]:
    """Hits or listed memories as "namespace/key"; each one only once."""
    keys = [f"{item['namespace']}/{item['key']}" for item in items]
    assert len(keys) == len(set(keys)), keys
    return set(keys)


def filter_query(filters: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``filters`` as HTTP query parameters: a list of namespaces or tags as the name
    repeated, times as they are (a number as its decimal text)."""
    params: list[tuple[str, str]] = []
    for name, value in filters.items():
        http_name = {"tags": "tag"}.get(name, name)
        for one in value if isinstance(value, list) else [value]:
            params.append((http_name, str(one)))
    return params


def schema2_database(path: str, count: int, *, big: int = 0,
                     now: float = 1_700_000_000.0) -> None:
    """A file as the release before #16 wrote it: schema version 2 (its migrations are
    kvmem.MIGRATIONS[:2], unchanged), ``count`` memories ``old-000000``... indexed by
    migration 1's triggers, each holding the words ``teas and coffees N`` and ``wN``, then
    ``big`` memories ``big-N`` of about 1 MiB of Chinese characters each."""
    conn = sqlite3.connect(path, isolation_level=None)  # rollback journal: no 20 MB WAL
    conn.execute("BEGIN")
    for step in kvmem.MIGRATIONS[:2]:
        for statement in step:
            conn.execute(statement, {"secret": bytes(32)})
    conn.execute("PRAGMA user_version = 2")
    conn.executemany(
        "INSERT INTO memories (namespace, key, value, tags, version, created_at, updated_at,"
        " strength, half_life_seconds, last_reinforced_at)"
        " VALUES ('default', ?, ?, ?, 1, ?, ?, 1.0, NULL, ?)",
        [(f"old-{i:06d}", json.dumps({"text": f"teas and coffees {i}", "n": f"w{i}"}),
          json.dumps(["legacy"]), now, now, now) for i in range(count)])
    text = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(340_000))
    conn.executemany(
        "INSERT INTO memories (namespace, key, value, tags, version, created_at, updated_at,"
        " strength, half_life_seconds, last_reinforced_at)"
        " VALUES ('default', ?, ?, '[]', 1, ?, ?, 1.0, NULL, ?)",
        [(f"big-{n}", json.dumps(text[n:] + text[:n], ensure_ascii=False), now, now, now)
         for n in range(big)])
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = wal")  # as kvmem leaves its files
    conn.close()


class Clock:
    """An injected clock: tests move time by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def mark_index_rebuilding(path: str) -> None:
    """Leave the file as migration 3 leaves an upgraded one: memory 1 not indexed yet, so
    search answers that the index is being rebuilt."""
    conn = kvmem.open_db(path)
    try:
        with kvmem.transaction(conn):
            conn.execute("UPDATE kvmem_meta SET value = 1 WHERE name = 'index_pending_through'")
    finally:
        conn.close()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``condition`` until it returns something true, and return that; fail naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.002)  # polling a condition, not a fixed sleep
    return value


def run_threads(target: Callable[[int], object], count: int) -> list[BaseException]:
    """Run ``target(n)`` in ``count`` threads at once, n = 0..count-1; what they raised."""
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
