"""kvmem-mcp as a real process: raw stdio (malformed requests, signals) and streamable HTTP
through the SDK's client (the token, the Origin and Host checks, signals).  The tests of
what a client sends that reaches the store take conftest's ``db`` and run on both backends;
the signal tests' final checkpoint is SQLite's."""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import pty
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

import kvmem
import kvmem_cli
import mcp_server
from testutil import HERE, Child, child_env

CONFIG = kvmem.Config.build(environ={})
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {},
    "clientInfo": {"name": "test", "version": "1"}}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tool_call(ident: int, tool: str, arguments: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": ident, "method": "tools/call",
                       "params": {"name": tool, "arguments": arguments}})


class StdioServer:
    """kvmem-mcp over stdio, spoken to line by line."""

    def __init__(self, db: str, *args: str) -> None:
        self.child = Child("serve_mcp", "--db", db, *args, stdin=True)
        assert self.request(json.dumps(INITIALIZE))["result"]["serverInfo"]["name"] == "kvmem"
        self.child.send('{"jsonrpc":"2.0","method":"notifications/initialized"}\n')

    def request(self, line: str) -> dict[str, Any]:
        """Send one line and return the next message: every request gets one answer."""
        self.child.send(line + "\n")
        answer: dict[str, Any] = json.loads(self.child.expect("{"))
        return answer


def wait_for_stderr(child: Child, text: str, timeout: float = 30.0, *,
                    count: int = 1) -> None:
    """Wait until stderr holds ``text`` (``count`` times)."""
    deadline = time.monotonic() + timeout
    while child.stderr.count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} on stderr: {child.stderr[-2000:]}"
        assert child.proc.poll() is None, f"exited: {child.stderr[-2000:]}"
        time.sleep(0.01)  # polling a condition, not waiting a fixed time


def assert_stopped_cleanly(child: Child, db: str) -> None:
    """Exit 0, no traceback, and on SQLite the final checkpoint: the WAL gone or empty."""
    rc = child.wait()
    assert rc == 0, child.stderr[-3000:]
    assert "Traceback" not in child.stderr, child.stderr[-3000:]
    assert "stopped cleanly" in child.stderr
    if kvmem.is_postgres(db):
        return
    wal = db + "-wal"
    assert not os.path.exists(wal) or os.path.getsize(wal) == 0, os.path.getsize(wal)


def deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# ------------------------------------------------------------------------------ stdio ----

MALFORMED = [  # (the line, the id it should be answered with, the JSON-RPC error code)
    (tool_call(2, "memory_set", {"key": "k", "value": "x"}).replace('"x"', "[" * 250 + "]" * 250),
     2, -32600),
    (tool_call(3, "memory_set", {"key": "k", "value": "x"}).replace('"x"', '"\\ud800"'), 3, -32600),
    (tool_call(4, "memory_set", {"key": "k", "value": "x"}).replace('"x"', "9" * 5000), None,
     -32700),
    ('{"jsonrpc":"1.0","id":5,"method":"tools/list"}', 5, -32600),
    ('{"jsonrpc":"2.0","id":6,"method":"tools/call","params":"x"}', 6, -32600),
    ("this is not JSON", None, -32700),
    ('{"jsonrpc":"2.0","id":true,"method":"tools/list"}', None, -32600),
    ('{"jsonrpc":"2.0","\\u0069d":true,"method":"ping"}', None, -32600),
]


def test_stdio_answers_every_malformed_request_and_keeps_serving(db: str) -> None:
    server = StdioServer(db)
    try:
        for line, ident, code in MALFORMED:
            answer = server.request(line)
            assert answer.get("id") == ident and answer["error"]["code"] == code, (line[:80],
                                                                                   answer)
            assert "pydantic" not in answer["error"]["message"]
        answer = server.request(tool_call(7, "memory_set", {"key": "deep",
                                                            "value": deep(kvmem.MAX_NESTING)}))
        assert answer["id"] == 7 and answer["result"]["isError"] is False, answer
        answer = server.request(tool_call(8, "memory_get", {"key": "deep"}))
        assert answer["result"]["structuredContent"]["memory"]["value"] == deep(kvmem.MAX_NESTING)
        answer = server.request(tool_call(9, "memory_set", {"key": "k", "value": 1, "ttl": 60}))
        text = answer["result"]["content"][0]["text"]
        assert answer["result"]["isError"] is True and text.startswith("invalid_request: "), text
    finally:
        server.child.proc.send_signal(signal.SIGTERM)
    assert_stopped_cleanly(server.child, db)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stdio_signal_answers_the_call_in_flight_then_exits_0_after_a_checkpoint(
        tmp_path: Path, signum: int) -> None:
    db = str(tmp_path / "kv.db")
    server = StdioServer(db, "--log-level", "DEBUG")
    answer = server.request(tool_call(2, "memory_set", {"key": "first", "value": 1}))
    assert answer["result"]["isError"] is False, answer
    ops = [{"op": "set", "key": f"b{i}", "value": "x" * 1000} for i in range(1000)]
    server.child.send(tool_call(3, "memory_batch", {"ops": ops}) + "\n")
    wait_for_stderr(server.child, "call 'memory_batch'")  # the call has started
    server.child.proc.send_signal(signum)  # stdin stays open: the stop must not wait on it
    answer = json.loads(server.child.expect("{"))
    assert answer["id"] == 3 and answer["result"]["isError"] is False, answer
    assert_stopped_cleanly(server.child, db)
    with kvmem.Store.open(db, config=CONFIG) as store:
        assert store.get("first") is not None and store.get("b999") is not None


def test_stdio_second_signal_stops_without_waiting_for_the_call(tmp_path: Path) -> None:
    """The call in flight waits for a write lock another connection holds: the first
    signal waits for it, the second does not (the call gets no success answer)."""
    db = str(tmp_path / "kv.db")
    server = StdioServer(db, "--log-level", "DEBUG", "--busy-timeout-ms", "120000")
    holder = kvmem.open_db(db, config=CONFIG)
    holder.execute("BEGIN IMMEDIATE")
    try:
        server.child.send(tool_call(5, "memory_set", {"key": "blocked", "value": 1}) + "\n")
        wait_for_stderr(server.child, "call 'memory_set'")
        server.child.proc.send_signal(signal.SIGINT)
        wait_for_stderr(server.child, "finishing the calls in flight")
        assert server.child.proc.poll() is None  # waiting for the call, as it should
        server.child.proc.send_signal(signal.SIGINT)
        wait_for_stderr(server.child, "stopping without waiting")
    finally:
        holder.execute("ROLLBACK")  # the blocked write may now commit; the store closes
        holder.close()
    assert_stopped_cleanly(server.child, db)
    answers = [json.loads(line) for line in server.child.lines[1:] if line.startswith("{")]
    assert all("error" in a or a["result"]["isError"] for a in answers if a["id"] == 5), answers


@pytest.mark.parametrize(("calls", "cancel", "answered"), [
    ([5], 5, []),  # cancelled: no answer comes, and the end does not wait for one
    ([5], "5", []),  # the SDK takes "5" for 5
    ([5], [5], [5]),  # no id at all: ignored, the call is answered
    ([1], True, [1]),  # a bool is no id (it would alias 1): ignored
    ([7, 7], 7, [7]),  # of two calls with one id the SDK cancels the latest
])
def test_stdio_end_of_input_waits_for_the_calls_not_cancelled(
        tmp_path: Path, calls: list[int], cancel: Any, answered: list[int]) -> None:
    """The calls wait for a write lock another connection holds, so each is in flight
    when the cancel and the end of input come."""
    db = str(tmp_path / "kv.db")
    server = StdioServer(db, "--log-level", "DEBUG", "--busy-timeout-ms", "120000")
    holder = kvmem.open_db(db, config=CONFIG)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for n, ident in enumerate(calls):
            server.child.send(tool_call(ident, "memory_set", {"key": f"k{n}", "value": n}) + "\n")
            wait_for_stderr(server.child, "call 'memory_set'", count=n + 1)
        server.child.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                      "params": {"requestId": cancel}}) + "\n")
        assert server.child.proc.stdin is not None
        server.child.proc.stdin.close()
        wait_for_stderr(server.child, f"end of input: {len(answered)} call(s) to answer first")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_stopped_cleanly(server.child, db)
    answers = [json.loads(line) for line in server.child.lines[1:] if line.startswith("{")]
    assert [a["id"] for a in answers if "result" in a and not a["result"]["isError"]] \
        == answered, answers


def _controlling_terminal() -> None:  # in the child: its stdin (a pty) is its terminal
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_stdio_ctrl_c_in_a_terminal_exits_0_at_once(tmp_path: Path) -> None:
    """Ctrl-C typed at a terminal (the tty sends SIGINT while a read of stdin blocks)."""
    db = str(tmp_path / "kv.db")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mcp_server.py"), "--db", db],
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(), preexec_fn=_controlling_terminal)
    os.close(slave)
    try:
        os.write(master, json.dumps(INITIALIZE).encode() + b"\n")
        assert proc.stdout is not None and b'"serverInfo"' in proc.stdout.readline()
        os.write(master, b"\x03")  # Ctrl-C
        rc = proc.wait(timeout=10)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert rc == 0 and "Traceback" not in stderr and "stopped cleanly" in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)


# -------------------------------------------------------------------- streamable HTTP ----


class HTTPServer:
    def __init__(self, db: str, token: str = "", *args: str) -> None:
        env = {**child_env(), "KVMEM_TOKEN": token}
        self.child = Child("serve_mcp", "--db", db, "--transport", "streamable-http",
                           "--port", "0", *args, env=env)
        self.url = self.child.expect("listening on ").split()[-1]
        self.port = int(urlsplit(self.url).port or 0)


@pytest.fixture
def http_server_with_token(tmp_path: Path) -> Iterator[HTTPServer]:
    server = HTTPServer(str(tmp_path / "kv.db"), "s3cret")
    yield server
    if server.child.proc.poll() is None:
        server.child.proc.send_signal(signal.SIGTERM)
        server.child.wait()


async def sdk_session(url: str, headers: dict[str, str]) -> tuple[list[int], Any]:
    """The statuses the SDK's client got, and its tool list (or the error it raised)."""
    statuses: list[int] = []

    async def record(response: httpx2.Response) -> None:
        statuses.append(response.status_code)

    async with httpx2.AsyncClient(headers=headers, event_hooks={"response": [record]}) as http:
        try:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                names = sorted(t.name for t in (await client.list_tools()).tools)
                result = await client.call_tool("memory_set", {"key": "via-http", "value": 1})
                assert not result.is_error, result.content
                return statuses, names
        except Exception as exc:  # the SDK raises its own error; the statuses say why
            return statuses, exc


def post(port: int, headers: dict[str, str], body: Any = INITIALIZE,
         address: str = "127.0.0.1") -> tuple[int, Any]:
    conn = http.client.HTTPConnection(address, port, timeout=30)
    try:
        conn.request("POST", mcp_server.HTTP_PATH, body=body if isinstance(body, bytes)
                     else json.dumps(body), headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize(("headers", "allowed"), [
    ({}, False), ({"Authorization": "Bearer wrong"}, False),
    ({"Authorization": "s3cret"}, False), ({"Authorization": "Bearer s3cretX"}, False),
    ({"Authorization": "Bearer s3cre"}, False), ({"Authorization": "Bearer s3cret"}, True),
    ({"Authorization": "bearer  s3cret"}, True),
])
async def test_streamable_http_requires_the_token(http_server_with_token: HTTPServer,
                                                  headers: dict[str, str],
                                                  allowed: bool) -> None:
    statuses, outcome = await sdk_session(http_server_with_token.url, headers)
    if allowed:
        assert outcome == ["memory_batch", "memory_delete", "memory_forget", "memory_get",
                           "memory_list", "memory_namespaces", "memory_reinforce",
                           "memory_search",
                           "memory_set", "memory_stats"], outcome
        assert 401 not in statuses
    else:
        assert isinstance(outcome, Exception) and statuses and set(statuses) == {401}, statuses
    status, body = await anyio.to_thread.run_sync(post, http_server_with_token.port, headers)
    assert (status == 401) is not allowed, (status, body)
    if not allowed:
        assert json.loads(body)["error"]["code"] == "unauthorized"


ORIGIN_CASES = [
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "http://rebind.example:8766"}, 403),
    ({"Origin": "null"}, 403),
    ({"Origin": "http://localhost:3000"}, 200),
    ({"Origin": "http://127.0.0.1:8766"}, 200),
    ({}, 200),
]


@pytest.mark.parametrize(("headers", "status"), [
    *ORIGIN_CASES, ({"Host": "rebind.example:8766"}, 421)])
def test_streamable_http_checks_origin_and_host(http_server_with_token: HTTPServer,
                                                headers: dict[str, str], status: int) -> None:
    got, body = post(http_server_with_token.port, {"Authorization": "Bearer s3cret", **headers})
    assert got == status, (got, body)


def test_streamable_http_checks_origin_on_every_address(tmp_path: Path) -> None:
    """Bound to all addresses (where the SDK checks neither Host nor Origin), kvmem's own
    check still refuses another site's page."""
    server = HTTPServer(str(tmp_path / "kv.db"), "s3cret", "--host", "0.0.0.0")
    try:
        for headers, status in ORIGIN_CASES:
            got, body = post(server.port, {"Authorization": "Bearer s3cret", **headers})
            assert got == status, (headers, got, body)
    finally:
        server.child.proc.send_signal(signal.SIGTERM)
        assert server.child.wait() == 0


def test_streamable_http_checks_host_on_any_loopback_address(tmp_path: Path) -> None:
    server = HTTPServer(str(tmp_path / "kv.db"), "", "--host", "127.0.0.2")
    try:
        for host, status in (("rebind.example:8766", 421), ("127.0.0.2:8766", 200),
                             ("localhost", 200)):
            got, body = post(server.port, {"Host": host}, address="127.0.0.2")
            assert got == status, (host, got, body)
    finally:
        server.child.proc.send_signal(signal.SIGTERM)
        assert server.child.wait() == 0


@pytest.mark.anyio
async def test_streamable_http_takes_the_bodies_kvmem_http_takes(db: str) -> None:
    """A batch of 5 values of 900 KB (4.5 MB, past the SDK's default cap of 4 MiB) works;
    a body past kvmem's cap gets kvmem's 413."""
    server = HTTPServer(db, "s3cret")
    try:
        ops = [{"op": "set", "key": f"big{i}", "value": "x" * 900_000} for i in range(5)]
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret"}) as http, \
                Client(streamable_http_client(server.url, http_client=http)) as c:
            result = await c.call_tool("memory_batch", {"ops": ops})
            assert not result.is_error, result.content
            got = await c.call_tool("memory_get", {"key": "big4"})
            assert got.structured_content is not None
            assert got.structured_content["memory"]["value"] == "x" * 900_000
        status, body = post(server.port, {"Authorization": "Bearer s3cret"},
                            body=b"x" * (kvmem_cli.MAX_BODY_BYTES + 1))
        assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    finally:
        server.child.proc.send_signal(signal.SIGTERM)
        assert server.child.wait() == 0, server.child.stderr[-3000:]


def test_streamable_http_refuses_a_post_without_a_length(
        http_server_with_token: HTTPServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", http_server_with_token.port, timeout=30)
    try:
        conn.request("POST", mcp_server.HTTP_PATH, body=iter([json.dumps(INITIALIZE).encode()]),
                     headers={"Content-Type": "application/json",
                              "Authorization": "Bearer s3cret",
                              "Accept": "application/json, text/event-stream"},
                     encode_chunked=True)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 411, body
        assert json.loads(body)["error"]["code"] == "length_required"
    finally:
        conn.close()


def test_streamable_http_signal_as_soon_as_it_listens(tmp_path: Path) -> None:
    db = str(tmp_path / "kv.db")
    server = HTTPServer(db, "s3cret")
    server.child.proc.send_signal(signal.SIGTERM)  # the line comes once handlers are set
    assert_stopped_cleanly(server.child, db)


def _start(program: str, db: str, *args: str, env: dict[str, str]) -> Child:
    transport = ["--transport", "streamable-http"] if program == "serve_mcp" else []
    return Child(program, "--db", db, "--port", "0", *transport, *args, env=env)


def _status(program: str, port: int, authorization: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if program == "serve_mcp":
            conn.request("POST", mcp_server.HTTP_PATH, body=json.dumps(INITIALIZE), headers={
                "Content-Type": "application/json", "Authorization": authorization,
                "Accept": "application/json, text/event-stream"})
        else:
            conn.request("GET", "/v1/stats", headers={"Authorization": authorization})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.parametrize("program", ["serve_mcp", "serve_http"])
def test_a_utf8_token_is_compared_as_bytes(tmp_path: Path, program: str) -> None:
    token = "ключ two"
    child = _start(program, str(tmp_path / "kv.db"), env={**child_env(), "KVMEM_TOKEN": token})
    port = int(urlsplit(child.expect("listening on ").split()[-1]).port or 0)
    try:
        assert _status(program, port, b"Bearer " + token.encode()) == 200
        assert _status(program, port, b"Bearer " + "ключ".encode()) == 401
        assert _status(program, port, b"Bearer " + token.encode("cp1251")) == 401
    finally:
        child.proc.send_signal(signal.SIGTERM)
        assert child.wait() == 0


@pytest.mark.parametrize("program", ["serve_mcp", "serve_http"])
@pytest.mark.parametrize("token", ["tab\there", "new\nline", " padded", "\udcff"])
def test_a_token_no_header_can_carry_is_refused_at_start(tmp_path: Path, program: str,
                                                         token: str) -> None:
    env = {**child_env(), "KVMEM_TOKEN": token}
    if token == "\udcff":  # a byte the environment cannot decode
        env = {**child_env(), "KVMEM_TOKEN": os.fsdecode(b"\xff")}
    child = _start(program, str(tmp_path / "kv.db"), env=env)
    assert child.wait() == 2 and "the token must be UTF-8 text" in child.stderr, child.stderr


@pytest.mark.parametrize("program", ["serve_mcp", "serve_http"])
def test_no_token_flag_and_no_empty_token_file(tmp_path: Path, program: str) -> None:
    child = _start(program, str(tmp_path / "kv.db"), "--token", "s3cret", env=child_env())
    assert child.wait() == 2 and "unrecognized arguments: --token" in child.stderr
    empty = tmp_path / "token"
    empty.write_text("\n")
    child = _start(program, str(tmp_path / "kv.db"), "--token-file", str(empty),
                   env=child_env())
    assert child.wait() == 2 and "the file is empty" in child.stderr, child.stderr
    assert not os.path.exists(tmp_path / "kv.db")


def test_streamable_http_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    child = Child("serve_mcp", "--db", str(tmp_path / "kv.db"), "--transport",
                  "streamable-http", "--host", "0.0.0.0", "--port", "0",
                  env={**child_env(), "KVMEM_TOKEN": ""})
    assert child.wait() == 2
    assert "refusing to listen on 0.0.0.0 without a token" in child.stderr, child.stderr
    assert not any(line.startswith("listening") for line in child.lines)
    assert not os.path.exists(tmp_path / "kv.db")  # refused before the database was made


@pytest.mark.anyio
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_streamable_http_signal_answers_the_call_in_flight_then_exits_0(
        tmp_path: Path, signum: int) -> None:
    db = str(tmp_path / "kv.db")
    server = HTTPServer(db, "s3cret", "--log-level", "DEBUG")
    ops = [{"op": "set", "key": f"b{i}", "value": "x" * 4000} for i in range(1000)]
    async with httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret"}) as http, \
            Client(streamable_http_client(server.url, http_client=http)) as client:
        assert not (await client.call_tool("memory_set", {"key": "first", "value": 1})).is_error
        async with anyio.create_task_group() as tasks:
            answers: list[Any] = []

            async def batch() -> None:
                answers.append(await client.call_tool("memory_batch", {"ops": ops}))

            tasks.start_soon(batch)
            await anyio.to_thread.run_sync(wait_for_stderr, server.child, "call 'memory_batch'")
            server.child.proc.send_signal(signum)
        assert len(answers) == 1 and not answers[0].is_error, answers
    assert_stopped_cleanly(server.child, db)
    with kvmem.Store.open(db, config=CONFIG) as store:
        assert store.get("first") is not None and store.get("b999") is not None


def test_help_names_the_endpoint_and_its_own_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        mcp_server.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "http://127.0.0.1:8766/mcp" in text and "--port MCP_PORT" in text
    assert "HTTP API" not in text and "--mcp-port" in text
