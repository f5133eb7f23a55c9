"""Two kvmem-http servers on one real PostgreSQL, as two hosts run them (issue #19).

Each server is a real subprocess of http_server.py (``Child("serve_http")``, port 0, up
once it printed its ``listening on`` line), both on one database through ``--db
postgresql://...``; each test has a fresh schema of its own (``?options=-csearch_path``).
Writer threads talk to one server each over keep-alive connections and write down what
they were told (``Load``): the acknowledged writes (a 2xx answer), the acknowledged
compare-and-set increments, the writes whose outcome is unknown (no answer arrived, or
503 storage_error: the connection was lost during COMMIT) and the writes refused with 503
busy (PostgreSQL unavailable before COMMIT: nothing written).  Each test then reads
PostgreSQL itself and both servers:

* compare-and-set counters incremented through both servers equal the acknowledged
  increments;
* every acknowledged write reads back through the other server at once;
* SIGKILL of either server at random moments, with requests in flight, loses nothing
  acknowledged; the killed one is started again and writes go on through both;
* PostgreSQL killed (``pg_ctl stop -m immediate``) and restarted while both servers
  write: meanwhile they answer 503 busy (storage_error for a COMMIT cut off), they
  recover by themselves, and nothing acknowledged is lost.

``--soak`` runs more kills and more outages.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import random
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pgtest
from test_http import Client
from testchildren import crash_value
from testutil import (
    DURABILITY_TOTALS,
    READ_ROWS,
    Child,
    Stored,
    http_json,
    lost_writes,
    wait_until,
)

with contextlib.suppress(ImportError):  # no psycopg: every test skips (fails in CI)
    import psycopg

TOTALS = DURABILITY_TOTALS
SERVER_FLAGS = ("--port", "0", "--log-level", "WARNING")
START_TIMEOUT_S = 60.0
WAIT_TIMEOUT_S = 60.0  # any condition a test waits on
RECOVERY_DEADLINE_S = 30.0  # PostgreSQL back: writes succeed through both servers by then
COUNTERS = 2  # few counters, many writers: compare-and-set conflicts are certain
READ_ROWS_PG = READ_ROWS.replace("?", "%s")
# Connection-level failures: the server is gone (or went while the request was out).
CUT_OFF = (OSError, http.client.HTTPException)


@pytest.fixture(autouse=True)
def _require_postgres() -> None:
    pgtest.require_postgres()


@pytest.fixture(scope="module")
def pg_server() -> Iterator[pgtest.PostgresServer]:
    pgtest.require_postgres()
    with pgtest.postgres_server() as server:
        yield server


def schema_url(dsn: str) -> str:
    """A new schema on ``dsn``'s server, and a URL whose connections use it."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # a name made here, not input
    return f"{dsn}?options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url(pg_server: pgtest.PostgresServer) -> str:
    """A ``postgresql://`` URL of a fresh schema: every test migrates an empty database."""
    return schema_url(pg_server.dsn)


def stored_rows(url: str) -> dict[str, Stored]:
    """Every memory of the default namespace as PostgreSQL holds it, read directly."""
    with psycopg.connect(url, autocommit=True) as conn:
        return {key: Stored(version, value, created_at, updated_at)
                for key, version, value, created_at, updated_at
                in conn.execute(READ_ROWS_PG, ("default",))}


# ---------------------------------------------------------------------------- hosts ----


@dataclasses.dataclass
class Kill:
    """One SIGKILL of a server: when, and how many requests it cut off (sent before it
    and never answered)."""

    server: int
    generation: int
    at: float
    cut_off: int = 0


class Hosts:
    """kvmem-http servers on one database, each as a host runs it: its own process and
    port.  A killed server is started again on a new port (its next ``generation``), and
    its writers move to it (``wait_newer``)."""

    def __init__(self, url: str, count: int, *flags: str) -> None:
        self.url, self.flags = url, flags
        self.cond = threading.Condition()
        self.children = [self._spawn() for _ in range(count)]  # start together, then wait
        self.every_child = list(self.children)  # the killed ones too
        self.ports = [self._port(child) for child in self.children]
        self.pids = [child.proc.pid for child in self.children]
        self.generations = [0] * count
        self.waiting = [0] * count  # writers of each server waiting for its next generation
        self.kills: list[Kill] = []
        self.stopping = False

    def _spawn(self) -> Child:
        return Child("serve_http", "--db", self.url, *SERVER_FLAGS, *self.flags)

    @staticmethod
    def _port(child: Child) -> int:
        line = child.expect("listening on http://127.0.0.1:", timeout=START_TIMEOUT_S)
        return int(line.rsplit(":", 1)[1])

    def current(self, server: int) -> tuple[int, int]:
        with self.cond:
            return self.ports[server], self.generations[server]

    def kill_of(self, server: int, generation: int) -> Kill | None:
        with self.cond:
            return next((k for k in self.kills
                         if (k.server, k.generation) == (server, generation)), None)

    def kill(self, server: int) -> Kill:
        """SIGKILL ``server``, which must be running; the Kill once it ended with -SIGKILL."""
        child = self.children[server]
        assert child.proc.poll() is None, f"server {server} was not running: {child.stderr}"
        with self.cond:
            kill = Kill(server, self.generations[server], time.monotonic())
            self.kills.append(kill)
        child.kill()
        assert child.killed, (child.proc.returncode, child.stderr)
        return kill

    def restart(self, server: int) -> None:
        """Start a killed server again (a new process, a new port) and move its writers."""
        child = self._spawn()
        self.every_child.append(child)
        port = self._port(child)
        with self.cond:
            self.children[server], self.ports[server] = child, port
            self.pids[server] = child.proc.pid
            self.generations[server] += 1
            self.cond.notify_all()

    def wait_newer(self, server: int, generation: int) -> None:
        """Until ``server`` runs a generation after ``generation`` (or the test stops)."""
        with self.cond:
            self.waiting[server] += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.stopping or self.generations[server] != generation,
                               timeout=WAIT_TIMEOUT_S)
            self.waiting[server] -= 1

    def stop(self) -> None:
        """SIGTERM every server: each exits 0, with no traceback on stderr."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for child in self.children:
            child.proc.send_signal(signal.SIGTERM)
        for child in self.children:
            assert child.wait() == 0, child.stderr[-3000:]

    def stderr(self) -> str:
        return "".join(child.stderr for child in self.every_child)


# ----------------------------------------------------------------------------- load ----


class Conn(Client):
    """A keep-alive connection to one generation of one server."""

    def __init__(self, hosts: Hosts, server: int) -> None:
        port, self.generation = hosts.current(server)
        super().__init__(port)
        self.server = server


Answer = tuple[int, dict[str, str], Any]


class Load:
    """``per_server`` writer threads on each server of ``hosts``, each calling ``step(load,
    conn, name)`` with a new ``name`` until ``stop()``, and what the servers told them.

    A connection that fails is a request cut off by a kill when it was sent before the
    SIGKILL of its server's generation; the writer then waits for the server's next
    generation.  Any other failure, and any answer a test did not expect, is a problem."""

    def __init__(self, hosts: Hosts, per_server: int,
                 step: Callable[[Load, Conn, str], None]) -> None:
        self.hosts, self.per_server, self.step = hosts, per_server, step
        self.lock = threading.Lock()
        self.acked: dict[str, int] = {}  # key -> the latest version acknowledged
        self.unknown: set[str] = set()  # sets with no answer, or an unknown outcome
        self.refused: set[str] = set()  # sets answered 503 busy: nothing may be written
        self.increments: collections.Counter[str] = collections.Counter()  # acknowledged
        self.unknown_increments: collections.Counter[str] = collections.Counter()
        self.increments_by_server: collections.Counter[int] = collections.Counter()
        self.conflicts = 0
        self.answers: collections.Counter[tuple[int, int, str]] = collections.Counter()
        # When the latest acknowledged write, and the latest request answered 503, were sent.
        self.last_ack = [0.0] * len(hosts.children)
        self.last_503 = [0.0] * len(hosts.children)
        self.problems: list[str] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(server, slot))
                        for server in range(len(hosts.children)) for slot in range(per_server)]
        for thread in self.threads:
            thread.start()

    def _run(self, server: int, slot: int) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                conn = Conn(self.hosts, server)
                try:
                    while not self._stop.is_set():
                        self.step(self, conn, f"w{server}-{slot}-g{conn.generation}-{n}")
                        n += 1
                except CUT_OFF:
                    pass  # recorded by request(); the server's next generation follows
                finally:
                    conn.close()
                if not self._stop.is_set():
                    self.hosts.wait_newer(server, conn.generation)
        except BaseException as exc:  # a bug of the test itself: fail it, do not hang it
            self.problem(f"writer {server}/{slot}: {exc!r}")

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def request(self, conn: Conn, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> Answer:
        """One request; a connection failure is recorded and raised."""
        sent = time.monotonic()
        try:
            answer = conn.request(method, path, body, headers=headers)
        except CUT_OFF as exc:
            kill = self.hosts.kill_of(conn.server, conn.generation)
            with self.lock:
                if kill is None:
                    self.problems.append(f"server {conn.server} dropped {method} {path}: "
                                         f"{exc!r}")
                elif sent < kill.at:
                    kill.cut_off += 1
            raise
        status, _, answer_body = answer
        code = answer_body["error"]["code"] if status >= 400 else ""
        with self.lock:
            self.answers[(conn.server, status, code)] += 1
            if 200 <= status < 300 and method == "PUT":
                self.last_ack[conn.server] = max(self.last_ack[conn.server], sent)
            if status == 503:
                self.last_503[conn.server] = max(self.last_503[conn.server], sent)
        if status >= 500 and not self._unavailable(answer, writes=method == "PUT"):
            self.problem(f"{method} {path}: {status} {answer_body}")
        return answer

    @staticmethod
    def _unavailable(answer: Answer, *, writes: bool) -> bool:
        """What kvmem-http answers while PostgreSQL is down: 503 busy with Retry-After
        (nothing written), or, to a write, 503 storage_error for a connection lost during
        COMMIT (the outcome unknown: kvmem_pg._pg_error)."""
        status, headers, body = answer
        code, message = body["error"]["code"], body["error"]["message"]
        return status == 503 and (
            (code == "busy" and headers.get("Retry-After") == "1")
            or (writes and code == "storage_error"
                and "connection lost during COMMIT, outcome unknown" in message))

    def set_new(self, conn: Conn, key: str) -> bool:
        """PUT a new memory, ``crash_value(key)``; whether it was acknowledged."""
        try:
            status, _, body = self.request(conn, "PUT", f"/v1/memories/{key}",
                                           {"value": crash_value(key)})
        except CUT_OFF:
            with self.lock:
                self.unknown.add(key)
            raise
        with self.lock:
            if status == 201 and body["version"] == 1:
                self.acked[key] = 1
                return True
            if status == 503 and body["error"]["code"] == "busy":
                self.refused.add(key)
            elif status == 503:
                self.unknown.add(key)
            else:
                self.problems.append(f"PUT {key}: {status} {body}")
        return False

    def increment(self, conn: Conn, key: str) -> None:
        """Add 1 to counter ``key``: read it, write it back with its version (If-Match or
        If-None-Match on even tries, ``if_version`` in the body on odd ones), again on 409.
        A counter's value is its version: created at 1, each write adds one to both."""
        for attempt in range(1000):
            status, _, body = self.request(conn, "GET", f"/v1/memories/{key}")
            if status not in (200, 404):
                return  # 503: checked by request()
            version = body["version"] if status == 200 else 0
            headers: dict[str, str] = {}
            payload: dict[str, Any] = {"value": version + 1}
            if attempt % 2:
                payload["if_version"] = version
            elif version:
                headers["If-Match"] = f'"{version}"'
            else:
                headers["If-None-Match"] = "*"
            try:
                status, _, body = self.request(conn, "PUT", f"/v1/memories/{key}", payload,
                                               headers)
            except CUT_OFF:
                with self.lock:
                    self.unknown_increments[key] += 1
                raise
            with self.lock:
                if status in (200, 201) and body["version"] == version + 1:
                    self.increments[key] += 1
                    self.increments_by_server[conn.server] += 1
                    return
                if status == 409:
                    self.conflicts += 1
                    continue
                if status == 503 and body["error"]["code"] != "busy":
                    self.unknown_increments[key] += 1
                elif status != 503:
                    self.problems.append(f"increment {key}: {status} {body}")
                return
        self.problem(f"increment {key}: 1000 conflicts in a row")

    def acknowledged(self) -> int:
        with self.lock:
            return len(self.acked) + sum(self.increments.values())

    def stop(self) -> None:
        self._stop.set()
        with self.hosts.cond:
            self.hosts.stopping = True
            self.hosts.cond.notify_all()
        for thread in self.threads:
            thread.join()

    def check_stored(self, url: str) -> None:
        """PostgreSQL itself holds every acknowledged set, with its value, at the version
        acknowledged; none refused with 503 busy; and counters within what was
        acknowledged and what may have been written.  The totals go to DURABILITY_TOTALS."""
        rows = stored_rows(url)
        lost = lost_writes(rows, self.acked, value=crash_value)
        TOTALS["acknowledged_writes"] += self.acknowledged()
        TOTALS["acknowledged_write_checks"] += len(self.acked) + len(self.increments)
        TOTALS["lost"] += len(lost)
        assert lost == [], f"{len(lost)} of {len(self.acked)} acknowledged writes lost: {lost[:3]}"
        written = sorted(self.refused & rows.keys())
        assert written == [], f"answered 503 busy, yet written: {written[:3]}"
        for key, count in self.increments.items():
            row = rows.get(key)
            assert row is not None and row.value == row.version, (key, row)
            assert count <= row.value <= count + self.unknown_increments[key], \
                (key, row.value, count, self.unknown_increments[key])


def check_through_servers(hosts: Hosts, acked: dict[str, int], *, exact: bool) -> None:
    """Every acknowledged write reads back through every server with its value, at the
    acknowledged version (``exact``) or a later one."""
    for server in range(len(hosts.children)):
        client = Client(hosts.current(server)[0])
        try:
            for key, version in acked.items():
                status, _, body = client.request("GET", f"/v1/memories/{key}")
                assert status == 200 and body["value"] == crash_value(key), (server, key, body)
                assert body["version"] == version if exact else body["version"] >= version, \
                    (server, key, body, version)
        finally:
            client.close()


HOLD_ROWS = ("SELECT key FROM memories WHERE namespace = 'default' AND key = ANY(%s)"
             " FOR UPDATE")
BLOCKED_BY = "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"


@contextlib.contextmanager
def writes_held_in_flight(load: Load, url: str,
                          held: dict[int, str]) -> Iterator[dict[int, Answer | None]]:
    """For each server and key of ``held`` (existing memories), a PUT of the key through
    the server that stays in flight: this process's own transaction holds their rows FOR
    UPDATE, so no server can answer until the block ends.  Yields once PostgreSQL shows
    each server's connection waiting on that transaction; at the end (the block ended,
    or PostgreSQL is gone) the answers by server, None where none arrived."""
    answers: dict[int, Answer | None] = {}
    conns = {server: Conn(load.hosts, server) for server in held}

    def put(server: int) -> None:
        try:
            answers[server] = load.request(conns[server], "PUT", f"/v1/memories/{held[server]}",
                                           {"value": crash_value(held[server])})
        except CUT_OFF:  # (recorded by request())
            answers[server] = None

    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as watcher:
        rows = holder.execute(HOLD_ROWS, (list(held.values()),)).fetchall()
        assert len(rows) == len(held), (rows, held)
        writers = [threading.Thread(target=put, args=(server,)) for server in held]
        for writer in writers:
            writer.start()

        def blocked() -> bool:
            row = watcher.execute(BLOCKED_BY, (holder.info.backend_pid,)).fetchone()
            return row is not None and row[0] == len(held)

        try:
            wait_until(blocked, f"the writes of {sorted(held.values())} blocked in PostgreSQL")
            yield answers
        finally:
            with contextlib.suppress(psycopg.OperationalError):  # PostgreSQL may be gone
                holder.rollback()
            for writer in writers:
                writer.join()
            for conn in conns.values():
                conn.close()


def create(hosts: Hosts, server: int, key: str) -> None:
    """A new memory ``key`` through ``server`` (to be held by writes_held_in_flight)."""
    status, body = http_json(hosts.current(server)[0], "PUT", f"/v1/memories/{key}",
                             {"value": crash_value(key)})
    assert status == 201, body


def counter_of(name: str) -> str:
    """The counter a writer's step ``name`` (``...-N``) increments."""
    return f"counter-{int(name.rsplit('-', 1)[1]) % COUNTERS}"


def set_increment(load: Load, conn: Conn, name: str) -> None:
    """A new memory ``name``, then one compare-and-set increment."""
    load.set_new(conn, name)
    load.increment(conn, counter_of(name))


# ---------------------------------------------------------------------------- tests ----


def test_compare_and_set_counters_through_two_servers(pg_url: str, soak: bool) -> None:
    """Three writers on each server increment two counters by read, then PUT with
    If-Match (or if_version in the body), again on 409: each counter ends equal to the
    increments acknowledged through both servers, read through either."""
    hosts = Hosts(pg_url, 2)
    target = 3000 if soak else 300
    load = Load(hosts, 3, lambda load, conn, name: load.increment(conn, counter_of(name)))
    try:
        wait_until(lambda: load.acknowledged() >= target, f"{target} increments")
    finally:
        load.stop()
    assert load.problems == [], load.problems[:5]
    assert sum(load.unknown_increments.values()) == 0  # nothing was killed
    assert min(load.increments_by_server[0], load.increments_by_server[1]) >= target // 10, \
        load.increments_by_server
    assert load.conflicts > 0  # the servers did race for the same versions
    for server in (0, 1):
        client = Client(hosts.current(server)[0])
        for key, count in load.increments.items():
            status, _, body = client.request("GET", f"/v1/memories/{key}")
            assert status == 200 and body["value"] == count == body["version"], \
                (server, key, body, count)
        client.close()
    load.check_stored(pg_url)
    hosts.stop()
    assert "Traceback" not in hosts.stderr()


def test_every_acknowledged_write_reads_through_the_other_server(pg_url: str,
                                                                  soak: bool) -> None:
    """Writers on each server PUT a new memory, and overwrite one of four shared ones,
    and read each acknowledged write back through the other server at once: it is there,
    at the acknowledged version (or a later one, for a shared memory another writer
    moved on).  At the end every acknowledged write reads through both."""
    hosts = Hosts(pg_url, 2)
    shared: dict[str, int] = {}
    lock = threading.Lock()
    readers: dict[tuple[int, str], Client] = {}  # (other server, writer name prefix)

    def write_and_read(load: Load, conn: Conn, name: str) -> None:
        other = 1 - conn.server
        prefix = name.rsplit("-", 1)[0]
        reader = readers.get((other, prefix))
        if reader is None:
            reader = readers[(other, prefix)] = Client(hosts.current(other)[0])
        if load.set_new(conn, name):
            status, _, body = reader.request("GET", f"/v1/memories/{name}")
            if (status, body.get("version"), body.get("value")) != (200, 1, crash_value(name)):
                load.problem(f"{name} acknowledged by server {conn.server}, then "
                             f"server {other} answered {status} {body}")
        key = f"shared-{int(name.rsplit('-', 1)[1]) % 4}"
        status, _, body = load.request(conn, "PUT", f"/v1/memories/{key}",
                                       {"value": crash_value(key)})
        if status not in (200, 201):
            load.problem(f"PUT {key}: {status} {body}")
            return
        with lock:
            shared[key] = max(shared.get(key, 0), body["version"])
        status, _, seen = reader.request("GET", f"/v1/memories/{key}")
        if status != 200 or seen["version"] < body["version"]:
            load.problem(f"{key} version {body['version']} acknowledged by server "
                         f"{conn.server}, then server {other} answered {status} {seen}")

    target = 4000 if soak else 400
    load = Load(hosts, 2, write_and_read)
    try:
        wait_until(lambda: load.acknowledged() >= target, f"{target} acknowledged writes")
    finally:
        load.stop()
        for reader in readers.values():
            reader.close()
    assert load.problems == [], load.problems[:5]
    assert len(load.acked) >= target and len(shared) == 4
    assert load.unknown == set() and load.refused == set()
    check_through_servers(hosts, load.acked, exact=True)
    check_through_servers(hosts, shared, exact=False)
    load.check_stored(pg_url)
    assert lost_writes(stored_rows(pg_url), shared, exact_version=False,
                       value=crash_value) == []
    hosts.stop()
    assert "Traceback" not in hosts.stderr()


def test_sigkill_of_either_server_loses_no_acknowledged_write(pg_url: str,
                                                              soak: bool) -> None:
    """Three writers on each server PUT new memories and increment counters.  At a random
    count of acknowledgements one server drawn at random is killed with SIGKILL, with a
    write to it surely in flight (``writes_held_in_flight``) besides its writers' own; it
    is started again (a new process on a new port) while the other goes on serving its
    writers, and its writers move to it.  Every kill cuts off at least one request; the
    survivor never fails one; at the end PostgreSQL and both servers hold every
    acknowledged write, and each counter lies between its acknowledged increments and
    those plus the ones whose answer never came."""
    rng = random.Random("pg-servers-sigkill")
    kills = 80 if soak else 6
    hosts = Hosts(pg_url, 2)
    load = Load(hosts, 3, set_increment)
    try:
        for n in range(kills):
            victim = rng.randrange(2)
            held = f"held-{n}"
            create(hosts, 1 - victim, held)
            target = load.acknowledged() + rng.randint(10, 120)
            wait_until(lambda: load.acknowledged() >= target,  # noqa: B023 (called here)
                       "acknowledgements")
            with writes_held_in_flight(load, pg_url, {victim: held}) as answers:
                kill = hosts.kill(victim)
            assert answers == {victim: None}, answers  # cut off: no answer ever came
            TOTALS["kills"] += 1
            wait_until(lambda: hosts.waiting[victim] == load.per_server,  # noqa: B023
                       "the killed server's writers to notice")
            hosts.restart(victim)
            assert kill.cut_off >= 1, kill  # the kill hit requests in flight (the held one)
        restarted = time.monotonic()
        wait_until(lambda: min(load.last_ack) > restarted, "writes through both at the end")
    finally:
        load.stop()
    assert load.problems == [], load.problems[:5]
    assert {kill.server for kill in hosts.kills} == {0, 1}  # either server
    assert len(load.acked) >= 30 * kills and sum(load.increments.values()) >= 10 * kills
    assert all(status < 500 for (_, status, _) in load.answers), load.answers
    load.check_stored(pg_url)
    check_through_servers(hosts, load.acked, exact=True)
    hosts.stop()
    assert "Traceback" not in hosts.stderr()


def test_postgres_killed_while_both_servers_write(soak: bool) -> None:
    """Two writers on each server PUT new memories and increment counters; PostgreSQL is
    stopped with ``pg_ctl stop -m immediate`` (no checkpoint: crash recovery at the next
    start) while a write through each server is surely in flight (``writes_held_in_flight``:
    both answer 503 busy, and are not written), and started again once each server has
    answered 503 to a request sent after the kill too.  Meanwhile every 5xx is 503 busy
    with Retry-After (nothing written) or 503 storage_error for a COMMIT whose outcome
    is unknown; the same server processes recover by themselves, acknowledging writes
    through both within RECOVERY_DEADLINE_S of the restart.  At the end every
    acknowledged write is there, through PostgreSQL and both servers, and no write
    refused as busy is."""
    outages = 10 if soak else 2
    with pgtest.postgres_server() as pg:
        url = schema_url(pg.dsn)
        # Each request waits busy_timeout_ms for a connection before its 503: 1 s keeps an
        # outage short.
        hosts = Hosts(url, 2, "--busy-timeout-ms", "1000")
        load = Load(hosts, 2, set_increment)
        held_keys: list[str] = []
        try:
            for outage in range(outages):
                held = {server: f"held-{outage}-{server}" for server in (0, 1)}
                for server, key in held.items():
                    create(hosts, server, key)
                    held_keys.append(key)
                target = load.acknowledged() + 100
                wait_until(lambda: load.acknowledged() >= target,  # noqa: B023
                           "acknowledgements")
                with writes_held_in_flight(load, url, held) as answers:
                    pg.kill_immediately()
                down = time.monotonic()
                # Writes in flight through both, cut off before their COMMIT: nothing
                # written, and the server says so.
                for server, answer in answers.items():
                    assert answer is not None, server
                    status, headers, body = answer
                    assert (status, body["error"]["code"], headers.get("Retry-After")) == \
                        (503, "busy", "1"), (server, answer)
                # Not only the requests the kill cut off: requests sent to a server that
                # has no connection left answer 503 too.
                wait_until(lambda: min(load.last_503) > down,  # noqa: B023
                           "a request sent to each server after the kill answered 503")
                pg.restart()
                up = time.monotonic()
                wait_until(lambda: min(load.last_ack) > up,  # noqa: B023
                           "a write acknowledged through each server after the restart",
                           timeout=RECOVERY_DEADLINE_S)
        finally:
            load.stop()
        assert load.problems == [], load.problems[:5]
        assert all(child.proc.poll() is None for child in hosts.children)
        assert [c.proc.pid for c in hosts.children] == hosts.pids  # never restarted
        for server in (0, 1):  # at least its held writes'
            assert load.answers[(server, 503, "busy")] >= outages, load.answers
        assert len(load.acked) >= 100 * outages // 2, len(load.acked)
        load.check_stored(url)
        rows = stored_rows(url)
        assert [rows[key].version for key in held_keys] == [1] * len(held_keys)  # 503 busy
        check_through_servers(hosts, load.acked, exact=True)
        hosts.stop()
        assert "Traceback" not in hosts.stderr()
        TOTALS["fault_cases"] += outages
