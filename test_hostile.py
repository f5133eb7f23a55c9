"""Hostile clients and operator mistakes (#15): files deleted or replaced under running
processes, and the HTTP server's bounds (connections, timeouts, memory) under clients that
misbehave.  Real processes, real sockets, real files; every wait is on a condition.

The sidecar and file tests are SQLite's (they take ``tmp_path``); the server's bounds take
conftest's ``db`` and run on both backends (an SQLite file, a PostgreSQL schema)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import http_server
import kvmem
import test_http
from test_http import open_store, writes_held
from testutil import HERE, Child, check_acknowledged, child_command, child_env
from testutil import http_json as _http

CONFIG = kvmem.Config.build(environ={})


# --------------------------------------------------- sidecars deleted or replaced ----


def _acks(lines: list[str]) -> dict[str, int]:
    return {f[1]: int(f[2]) for f in (line.split() for line in lines)
            if len(f) == 4 and f[0] == "set" and f[3] == "ok"}


@pytest.mark.parametrize("how", ["deleted", "replaced", "deleted with the lock file"])
@pytest.mark.parametrize("sidecar", ["-wal", "-shm"])
def test_a_deleted_or_replaced_sidecar_stops_every_writer(tmp_path: Path, sidecar: str,
                                                          how: str) -> None:
    """A server and a library process write; someone deletes (or replaces) the -wal or
    -shm.  From then on no process acknowledges a write: the server answers 503 and its
    health is 503 naming the file, the library process is refused, and a process that
    starts afterwards (and so sees files consistent to itself) is refused too.  Stopped
    gracefully, the last process folds what it wrote back into the database: nothing
    acknowledged is lost."""
    db = str(tmp_path / "kv.db")
    # With the lock file gone too, the one that starts afterwards finds the election free
    # and no checkpointer's record to compare with (the server's polls, 30 s apart here,
    # do not take the new lock file first): it must find the split by itself.
    env = child_env(KVMEM_CHECKPOINT_POLL_S="30" if "lock" in how else "0.05")
    server = Child("serve_http", "--db", db, "--port", "0", "--log-level", "WARNING", env=env)
    port = int(server.expect("listening on").rsplit(":", 1)[1])
    acked: dict[str, int] = {}
    for i in range(20):
        status, body = _http(port, "PUT", f"/v1/memories/http-{i}", {"value": i})
        assert status == 201, body
        acked[body["key"]] = body["version"]
    writer = Child("sidecar_writer", db, "lib", env=env)
    writer.expect("ready")
    for _ in range(50):
        writer.expect("set lib-")  # writing, acknowledged

    path = db + sidecar
    if how == "replaced":  # a copy put in its place, as a restore or a sync tool would
        shutil.copyfile(path, path + ".copy")
        os.replace(path + ".copy", path)
    else:
        os.unlink(path)
    if "lock" in how:
        os.unlink(db + ".checkpoint.lock")
        late = Child("sidecar_writer", db, "late", env=env)  # at once, before any poll

    status, health = _http(port, "GET", "/healthz")
    assert status == 503 and not health["ok"], health
    assert any(path in problem and "refused" in problem for problem in health["problems"])
    status, body = _http(port, "PUT", "/v1/memories/after", {"value": 1})
    assert status == 503 and body["error"]["code"] == "storage_error", body
    assert "refused" in body["error"]["message"] and path in body["error"]["message"]
    refused = writer.expect("refused")
    assert refused.split()[2:] == ["storage_error", "False"], refused
    writer.expect("refused")  # and the next one too

    if "lock" not in how:
        late = Child("sidecar_writer", db, "late", env=env)  # opens after the deletion
    first = late.expect("")
    if first == "ready":  # it opened: then its first write is refused, never acknowledged
        first = late.expect("refused")
        assert first.split()[2:] == ["storage_error", "False"], first
    else:
        assert first.startswith("open-failed"), first

    late_lines = late.kill()
    writer_lines = writer.kill()
    after = writer_lines[writer_lines.index(refused):]
    assert _acks(after) == {}, after  # nothing acknowledged once the first was refused
    assert _acks(late.lines + late_lines) == {}
    acked.update(_acks(writer.lines + writer_lines))
    assert len(acked) >= 70
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.stderr
    assert "Traceback" not in server.stderr + writer.stderr + late.stderr
    check_acknowledged(db, acked, config=CONFIG)


@pytest.mark.parametrize("sidecars", [("-wal",), ("-shm",), ("-wal", "-shm")])
def test_library_processes_without_a_checkpointer_find_the_split(tmp_path: Path,
                                                                 sidecars: tuple[str, ...]) -> None:
    """No process runs a Checkpointer, so no lock file holds a record to compare with:
    a process opened after the deletion finds the split by what the first one has open
    (or cannot open at all), writes nothing, and the first one, closed, loses nothing."""
    db = str(tmp_path / "kv.db")
    first = Child("sidecar_writer", db, "first", "no-checkpointer", "stdin", stdin=True)
    first.expect("ready")
    for _ in range(100):
        first.expect("set first-")
    for sidecar in sidecars:
        os.unlink(db + sidecar)
    late = Child("sidecar_writer", db, "late", "no-checkpointer")
    line = late.expect("")
    if line == "ready":
        line = late.expect("refused")
        assert line.split()[2:] == ["storage_error", "False"], line
    else:
        assert line.startswith("open-failed"), line
    late_lines = late.kill()
    assert _acks(late.lines + late_lines) == {}
    refused = first.expect("refused")
    first.send("stop\n")
    first.expect("closed")
    assert first.wait() == 0, first.stderr
    after = first.lines[first.lines.index(refused):]
    assert _acks(after) == {}, after[:5]
    assert "Traceback" not in first.stderr + late.stderr
    check_acknowledged(db, _acks(first.lines), config=CONFIG)


def test_a_process_whose_database_went_away_leaves_the_election(tmp_path: Path) -> None:
    """The data directory is deleted and made again under a server, and a second server
    starts on the new database at the same path: the second becomes its checkpointer
    (the first took the new lock file and kept the new database from being checkpointed
    by anyone)."""
    directory = tmp_path / "data"
    directory.mkdir()
    db = str(directory / "kv.db")
    env = child_env(KVMEM_CHECKPOINT_POLL_S="0.05")
    old = Child("serve_http", "--db", db, "--port", "0", "--log-level", "INFO", env=env)
    old_port = int(old.expect("listening on").rsplit(":", 1)[1])
    shutil.rmtree(directory)
    directory.mkdir()
    new = Child("serve_http", "--db", db, "--port", "0", "--log-level", "INFO", env=env)
    new_port = int(new.expect("listening on").rsplit(":", 1)[1])
    deadline = time.monotonic() + 10
    while True:  # the election settles within a few polls
        holders = [_http(port, "GET", "/v1/stats")[1]["checkpointer"]["holder"]
                   for port in (old_port, new_port)]
        if holders == [False, True] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert holders == [False, True]
    assert (kvmem.read_lock_record(db) or {}).get("pid") == new.proc.pid
    for child in (old, new):
        child.proc.send_signal(signal.SIGTERM)
        assert child.wait() == 0, child.stderr


# ----------------------------------------------------------- the HTTP server's bounds ----


@contextlib.contextmanager
def serving(db: str, **flags: str) -> Iterator[tuple[http_server.Server, int]]:
    """kvmem-http in this process over a store on ``db`` with ``flags`` (settings), on a
    free port."""
    with open_store(db, clock=time.time, decay=False, **flags) as store, \
            test_http.serving(store) as server:
        yield server, int(server.server_address[1])


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


REQUEST = b"GET /v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def put_request(key: str, value: Any) -> bytes:
    body = json.dumps({"value": value}).encode()
    return (f"PUT /v1/memories/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


# Bytes read from a socket past the response read_response returned: with pipelining, one
# recv() can hold the end of one response and the start of the next.
_UNREAD: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict[str, str], Any]:
    """One whole response from ``sock``: status, headers (lower-case names), JSON body."""
    sock.settimeout(timeout)
    data = _UNREAD.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":")
                                                             for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response body"
        body += chunk
    body, _UNREAD[sock] = body[:length], body[length:]
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def closed_by_server(sock: socket.socket, timeout: float = 30.0) -> bool:
    """Wait for the server to close ``sock`` (EOF or reset); False if it stays open."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` (a state of the server) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


def test_idle_connections_cost_no_thread(db: str) -> None:
    """500 idle connections are held open, the process's threads do not grow (they grew
    by one per connection), and a normal request is answered meanwhile."""
    with serving(db, http_max_connections="600", http_workers="4") as (server, port):
        threads_before = threading.active_count()
        idle = [connect(port) for _ in range(500)]
        try:
            wait_for(lambda: server.stats["accepted"] >= 500)
            assert threading.active_count() == threads_before
            workers = [t for t in threading.enumerate() if t.name.startswith("kvmem-http-worker")]
            assert len(workers) == 4
            with connect(port) as sock:
                sock.sendall(REQUEST)
                assert read_response(sock)[0] == 200
            assert len(server._conns) >= 500  # none of them was closed for it
        finally:
            for sock in idle:
                sock.close()


def test_at_the_connection_cap_the_longest_idle_one_is_closed(db: str) -> None:
    with serving(db, http_max_connections="4") as (server, port):
        idle = []
        for n in range(1, 5):
            idle.append(connect(port))
            wait_for(functools.partial(lambda n: server.stats["accepted"] >= n, n))  # in order
        try:
            with connect(port) as sock:
                sock.sendall(REQUEST)
                assert read_response(sock)[0] == 200
            assert closed_by_server(idle[0])  # the oldest idle one made room
            assert server.stats["evicted"] == 1
            idle[1].sendall(REQUEST)  # the others still work
            assert read_response(idle[1])[0] == 200
        finally:
            for sock in idle:
                sock.close()


def _cpu_ticks(thread: threading.Thread) -> int:
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1]
    utime, stime = fields.split()[11:13]
    return int(utime) + int(stime)


def test_at_the_cap_with_no_idle_connection_new_ones_wait_without_spinning(
        db: str) -> None:
    """Three connections in the middle of a request (not idle, so not closed for room);
    a fourth waits in the listen backlog, the loop does not spin, and it is answered
    once one of the three goes."""
    with serving(db, http_max_connections="3") as (server, port):
        loop = next(t for t in threading.enumerate() if t.name == "kvmem-http-loop")
        busy = [connect(port) for _ in range(3)]
        for sock in busy:
            sock.sendall(b"GET /v1/stats HTTP/1.1\r\n")  # a head, not yet whole
        wait_for(lambda: sum(c.phase == http_server.HEAD for c in server._conns.values()) == 3)
        late = connect(port)  # the kernel accepts it into the backlog
        late.sendall(REQUEST)
        wait_for(lambda: server.stats["refused_at_cap"] >= 1)
        ticks = _cpu_ticks(loop)
        time.sleep(1.0)  # a window to measure the loop's CPU in, not a wait for something
        spent = _cpu_ticks(loop) - ticks
        assert spent < 30, f"the loop used {spent} of 100 ticks in one second"
        busy.pop().close()
        assert read_response(late)[0] == 200
        for sock in [*busy, late]:
            sock.close()


@pytest.mark.parametrize("slow", [False, True])
def test_partial_headers_and_slowloris_get_408_at_the_header_timeout(
        db: str, slow: bool) -> None:
    """A head that never ends is answered 408 once header_timeout has passed since its
    first byte, whether the client goes silent or trickles a byte at a time."""
    with serving(db, http_header_timeout_s="0.5") as (_, port), connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        if slow:
            sock.settimeout(0.1)
            answer = b""
            while not answer:  # a byte every 0.1 s: the attack itself
                with contextlib.suppress(TimeoutError):
                    sock.sendall(b"a")
                    answer = sock.recv(65536)
                assert time.monotonic() - started < 10, "no answer while trickling"
            sock.settimeout(30)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        else:
            status, headers, body = read_response(sock)
            assert status == 408 and body["error"]["code"] == "request_timeout", body
            assert headers["connection"] == "close"
        assert 0.5 <= time.monotonic() - started < 5
        assert closed_by_server(sock)


def test_a_lying_content_length_gets_408_at_the_body_timeout(db: str) -> None:
    with serving(db, http_body_timeout_s="0.5", http_workers="1") as (_, port), \
            connect(port) as liar, connect(port) as other:
        liar.sendall(put_request("k", "x" * 100)[:-50])  # 50 bytes short, then silence
        started = time.monotonic()
        other.sendall(REQUEST)  # the one worker is free: the liar holds no thread
        assert read_response(other)[0] == 200
        status, _, body = read_response(liar)
        assert status == 408 and body["error"]["code"] == "request_timeout", body
        assert 0.5 <= time.monotonic() - started < 5
        assert closed_by_server(liar)


def test_the_idle_timeout_closes_a_keep_alive_connection(db: str) -> None:
    with serving(db, http_idle_timeout_s="0.5") as (_, port), connect(port) as sock:
        sock.sendall(REQUEST)
        assert read_response(sock)[0] == 200
        answered = time.monotonic()
        assert closed_by_server(sock, timeout=10)
        assert 0.5 <= time.monotonic() - answered < 5


def test_request_bodies_held_in_memory_are_bounded(db: str) -> None:
    """With room for 100 KB of bodies, a 90 KB request being read keeps a 60 KB one
    waiting, unread, until it is done; one that waits past body_timeout gets 503."""
    with serving(db, http_buffer_bytes="100000", http_body_timeout_s="2") as (server,
                                                                                    port):
        big = put_request("big", "b" * 90_000)
        with connect(port) as first, connect(port) as second:
            first.sendall(big[:-1000])
            wait_for(lambda: any(c.phase == http_server.BODY for c in server._conns.values()))
            second.sendall(put_request("next", "n" * 60_000))
            wait_for(lambda: len(server._waiting) == 1)
            first.sendall(big[-1000:])
            assert read_response(first)[0] == 201
            assert read_response(second)[0] == 201
        # A whole 90 KB request keeps its room while it runs (held up here by another
        # writer's lock): one that waits past its body timeout gets 503.
        with writes_held(db) as release, connect(port) as first, connect(port) as second:
            first.sendall(big)
            wait_for(lambda: any(c.phase == http_server.WORK for c in server._conns.values()))
            second.sendall(put_request("late", "n" * 60_000))
            status, headers, body = read_response(second)
            assert status == 503 and body["error"]["code"] == "busy", body
            assert headers["retry-after"] == "1"
            release()
            assert read_response(first)[0] == 200  # "big" again: replaced


def test_sigterm_ends_within_the_grace_whatever_clients_do(db: str) -> None:
    """Idle connections, partial heads and a body that never ends do not hold up a
    SIGTERM past shutdown_grace_s, and a request whose body arrives within it is answered."""
    child = Child("serve_http", "--db", db, "--port", "0", "--shutdown-grace-s", "2",
                  "--http-body-timeout-s", "60", "--http-header-timeout-s", "60")
    port = int(child.expect("listening on").rsplit(":", 1)[1])
    socks = [connect(port) for _ in range(20)]
    try:
        for sock in socks[:5]:
            sock.sendall(b"GET /v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        stalled, finishing = socks[5], socks[6]
        body = put_request("finished", "f" * 1000)
        stalled.sendall(put_request("never", "n" * 1000)[:-10])
        finishing.sendall(body[:-10])
        sent = time.monotonic()
        child.proc.send_signal(signal.SIGTERM)
        while "stopping" not in child.stderr:
            assert time.monotonic() - sent < 10, child.stderr
            time.sleep(0.01)
        finishing.sendall(body[-10:])
        status, headers, _ = read_response(finishing)
        assert status == 201 and headers["connection"] == "close"
        assert child.wait(timeout=30) == 0, child.stderr
        assert time.monotonic() - sent < 2 + 3, "the grace did not bound the stop"
        assert all(closed_by_server(sock, timeout=1) for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    assert "Traceback" not in child.stderr
    with open_store(db) as store:
        assert store.get("finished") is not None and store.get("never") is None


def test_a_list_of_large_values_comes_in_pages_of_bounded_size(db: str) -> None:
    with serving(db) as (_, port), connect(port) as sock:
        for i in range(5):
            sock.sendall(put_request(f"big-{i}", "x" * (1024 * 1024 - 10)))
            assert read_response(sock)[0] == 201
        keys, cursor, largest = [], "", 0
        while True:
            path = "/v1/memories?limit=1000" + (f"&cursor={cursor}" if cursor else "")
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            status, headers, page = read_response(sock)
            assert status == 200
            largest = max(largest, int(headers["content-length"]))
            keys += [m["key"] for m in page["items"]]
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]
        assert keys == [f"big-{i}" for i in range(5)]
        assert largest < 1.1 * 1024 * 1024  # one memory a page: 1 MiB each


def test_an_out_of_range_import_is_refused_and_reads_keep_working(db: str) -> None:
    """Once, ``created_at=1e18`` imported fine and then every read of its namespace was
    a 500 (no RFC 3339 time can show it)."""
    with serving(db) as (server, port), connect(port) as sock:
        store = server.api.store
        good = {"namespace": "default", "key": "k", "value": 1, "tags": [], "version": 1,
                "created_at": 1e9, "updated_at": 1e9, "expires_at": None, "strength": 1.0,
                "half_life_seconds": None, "last_reinforced_at": 1e9, "archived": False}
        for change in ({"created_at": 1e18}, {"updated_at": -1e13}, {"strength": 7.0},
                       {"last_reinforced_at": 1e18}, {"expires_at": 1e30}):
            with pytest.raises(kvmem.InvalidInputError):
                store.import_(io.StringIO(json.dumps({**good, **change}) + "\n"))
        for path in ("/v1/memories/k", "/v1/memories", "/v1/search?q=k"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            status, _, body = read_response(sock)
            assert status in (200, 404), body


def test_at_the_file_limit_the_server_neither_spins_nor_fails(db: str) -> None:
    """Under ``ulimit -n 128`` the cap comes down to what the process may open (64 here),
    so the server never meets EMFILE in accept (at that limit the old accept loop spun at
    100 % CPU): 150 connections sending half a request leave the process idle, and once
    they go a new request is answered."""
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc = subprocess.Popen(child_command("serve_http", "--db", db, "--port", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=HERE, preexec_fn=low_limit)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        half = [connect(port) for _ in range(150)]  # 64 accepted, the rest in the backlog
        for sock in half:
            sock.sendall(b"GET /v1/stats HTTP/1.1\r\n")
        stat = Path(f"/proc/{proc.pid}/stat")

        def ticks() -> int:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])

        before = ticks()
        time.sleep(1.0)  # a window to measure the process's CPU in, not a wait for something
        spent = ticks() - before
        assert spent < 30, f"the server used {spent} of 100 ticks in one second"
        for sock in half:
            sock.close()
        with connect(port) as sock:
            sock.sendall(REQUEST)
            assert read_response(sock)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "cannot accept" not in err, err


@pytest.mark.parametrize("data", [
    b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # empty lines first (RFC 9112)
    b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\r\n",  # bare LF lines, a CRLF to end
    b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n",
])
def test_heads_http_client_would_read_are_read(db: str, data: bytes) -> None:
    with serving(db) as (_, port), connect(port) as sock:
        sock.sendall(data)
        assert read_response(sock)[0] == 200


# ------------------------------------------------- what a review of the server found ----


def test_bodies_declared_and_never_sent_do_not_hold_up_small_writes(db: str) -> None:
    """Two clients declare 8 MiB bodies (the whole buffer) and send a byte: a small PUT
    of a third is answered at once, not after their body timeout."""
    with serving(db, http_body_timeout_s="20") as (_, port), \
            connect(port) as a, connect(port) as b, connect(port) as victim:
        for sock in (a, b):
            sock.sendall(b"PUT /v1/memories/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 8388608\r\n\r\n{")
        started = time.monotonic()
        victim.sendall(put_request("small", "s" * 1000))
        assert read_response(victim)[0] == 201
        assert time.monotonic() - started < 10  # (it took the 20 s body timeout, then 503)


def test_without_the_token_a_body_is_neither_read_nor_given_room(db: str) -> None:
    with open_store(db, http_body_timeout_s="20") as store, \
            test_http.serving(store, "s3cret") as server:
        port = int(server.server_address[1])
        for line in (b"PUT /v1/memories/x", b"GET /healthz"):  # (/healthz takes no token:
            with connect(port) as sock:  # a body it was not sent is not "cut short")
                sock.sendall(line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 8388608\r\n\r\n{")
                status, headers, _ = read_response(sock)
                assert status == 401 and headers["connection"] == "close"
        assert server._buffered == 0


def test_room_freed_by_a_timed_out_body_lets_a_waiting_one_in(db: str) -> None:
    with serving(db, http_buffer_bytes="100000", http_body_timeout_s="2") as (
            server, port), connect(port) as first, connect(port) as second:
        first.sendall(put_request("stalls", "a" * 90_000)[:-1000])
        wait_for(lambda: any(c.phase == http_server.BODY for c in server._conns.values()))
        time.sleep(0.5)  # so that the second's deadline comes later: the scenario itself
        second.sendall(put_request("waits", "b" * 60_000))
        wait_for(lambda: len(server._waiting) == 1)
        assert read_response(first)[0] == 408
        assert read_response(second)[0] == 201  # let in when the first went (was 503)
        assert not server._waiting


def test_at_the_cap_a_connection_gone_idle_makes_room(db: str) -> None:
    with serving(db, http_max_connections="4") as (server, port):
        busy = [connect(port) for _ in range(4)]
        for sock in busy:
            sock.sendall(b"GET /v1/stats HTTP/1.1\r\n")
        wait_for(lambda: sum(c.phase == http_server.HEAD for c in server._conns.values()) == 4)
        late = connect(port)
        late.sendall(REQUEST)
        wait_for(lambda: server.stats["refused_at_cap"] >= 1)
        for sock in busy:  # their requests end; they stay open, idle
            sock.sendall(b"Host: 127.0.0.1\r\n\r\n")
            assert read_response(sock)[0] == 200
        started = time.monotonic()
        assert read_response(late)[0] == 200
        assert time.monotonic() - started < 5  # (it waited for the 30 s idle timeout)
        for sock in [*busy, late]:
            sock.close()


def _all_responses(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_pipelined_requests_before_a_half_close_are_all_answered(db: str) -> None:
    with serving(db) as (server, port), connect(port) as sock:
        sock.sendall(b"GET /v1/memories/p HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     + put_request("p", "piped")
                     + b"GET /v1/memories/p HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        statuses = [read_response(sock)[0] for _ in range(3)]
        assert statuses == [404, 201, 200]
        assert _all_responses(sock) == b""  # then the server closes
        memory = server.api.store.get("p")
        assert memory is not None and memory.value == "piped"


def test_a_request_cut_short_is_refused_never_run(db: str) -> None:
    with serving(db) as (server, port):
        store = server.api.store
        store.set("precious", 1)
        for cut in (b"DELETE /v1/memories/precious HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthoriz",
                    put_request("precious", 2)[:-3]):
            with connect(port) as sock:
                sock.sendall(cut)
                sock.shutdown(socket.SHUT_WR)
                status, _, body = read_response(sock)
                assert status == 400 and "cut short" in body["error"]["message"], body
        memory = store.get("precious")
        assert memory is not None and memory.value == 1


def test_a_worker_handing_a_connection_back_races_no_close(db: str) -> None:
    """A worker re-registers a connection in the loop's selector while the loop closes it
    to make room at the cap: the registration is slowed down here so that the two meet.
    The loop survives (it died of a KeyError) and goes on serving."""
    with serving(db, http_max_connections="2") as (server, port):
        real_register = server._selector.register

        def slow_register(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name.startswith("kvmem-http-worker"):
                time.sleep(0.3)  # widen the window between the phase and the registration
            return real_register(*args, **kwargs)

        server._selector.register = slow_register  # type: ignore[method-assign]
        with connect(port) as first, connect(port) as other:
            other.sendall(b"GET /v1/stats HTTP/1.1\r\n")  # not idle: never closed for room
            first.sendall(REQUEST)
            assert read_response(first)[0] == 200  # sent before the worker re-registers it
            with connect(port) as third:  # at the cap: the loop closes ``first`` for room
                third.sendall(REQUEST)
                assert read_response(third)[0] == 200
            assert closed_by_server(first)
        with connect(port) as again:
            again.sendall(REQUEST)
            assert read_response(again)[0] == 200


@pytest.mark.parametrize("twice", [b"Host: 127.0.0.1\r\nHost: evil.example\r\n",
                                   b"Host: 127.0.0.1\r\nOrigin: http://127.0.0.1\r\n"
                                   b"Origin: http://evil.example\r\n"])
def test_two_host_or_origin_headers_are_a_400(db: str, twice: bytes) -> None:
    with serving(db) as (_, port), connect(port) as sock:
        sock.sendall(b"GET /v1/stats HTTP/1.1\r\n" + twice + b"\r\n")
        status, _, body = read_response(sock)
        assert status == 400 and "more than one" in body["error"]["message"], body


def test_clients_that_keep_a_worker_busy_do_not_starve_another(db: str) -> None:
    """Two client processes send request after request, each the moment its answer comes,
    to a server of two workers: a third client is answered while they go on (a worker used
    to keep serving the client it had, for as long as it kept sending)."""
    with serving(db, http_workers="2") as (_, port):
        hoarders = [Child("hoarder", str(port)) for _ in range(2)]
        for child in hoarders:
            child.expect("going")
        with connect(port) as victim:
            victim.sendall(REQUEST)
            assert read_response(victim, timeout=10)[0] == 200
        assert all(child.proc.poll() is None for child in hoarders)  # still at it
        for child in hoarders:
            child.kill()


def test_a_request_waiting_for_room_is_answered_during_the_stop(db: str) -> None:
    """A stop closes connections with no whole request; one whose request came whole and
    waits for buffer room gets its answer when the room comes, within the grace."""
    with open_store(db, http_buffer_bytes="100000") as store, writes_held(db) as release:
        # (the first request runs, and waits for the write lock)
        server = http_server.build_server(store, "127.0.0.1", 0, "")
        thread = server.start()
        port = int(server.server_address[1])
        stopping = threading.Thread(target=server.stop)
        try:
            with connect(port) as first, connect(port) as second:
                first.sendall(put_request("first", "a" * 90_000))
                wait_for(lambda: any(c.phase == http_server.WORK
                                     for c in server._conns.values()))
                second.sendall(put_request("second", "b" * 60_000))
                wait_for(lambda: len(server._waiting) == 1)
                stopping.start()
                wait_for(lambda: server.stopping)
                release()
                assert read_response(first)[0] == 201
                status, headers, _ = read_response(second)
                assert status == 201 and headers["connection"] == "close"
        finally:
            release()
            if stopping.ident is None:  # the test failed before the stop began
                server.stop()
            else:
                stopping.join()
            thread.join()
