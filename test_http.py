"""The HTTP API: a real server on 127.0.0.1:0, a real HTTP client, real processes.

A test whose fixtures include conftest's ``db`` (``served``, ``client`` and ``filtered``
do) runs on both backends: an SQLite file and a PostgreSQL schema."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import http.client
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import http_server
import kvmem
import kvmem_cli
from testutil import (
    DURABILITY_TOTALS,
    FILTER_CASES,
    FILTER_NAMESPACES,
    FILTER_QUERY,
    LIST_CASES,
    READ_ROWS,
    SOAK,
    Child,
    Stored,
    check_acknowledged,
    fill_filter_store,
    filter_query,
    forged_cursor,
    found_keys,
    lost_writes,
    mark_index_rebuilding,
)

CONFIG = kvmem.Config.build(environ={})


class Client:
    """A keep-alive HTTP/1.1 client on one connection."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body: Any = None, *,
                headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        sent = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        self.conn.request(method, path, body=data, headers=sent)
        response = self.conn.getresponse()
        payload = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return response.status, dict(response.getheaders()), json.loads(payload or b"null")

    def close(self) -> None:
        self.conn.close()


def assert_error(result: tuple[int, dict[str, str], Any], status: int, code: str) -> str:
    """The one error shape, checked the same way everywhere; returns the message."""
    got_status, headers, body = result
    assert got_status == status, (got_status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["request_id"], str) and error["request_id"], error
    assert "Traceback" not in error["message"]
    if "X-Request-Id" in headers:
        assert headers["X-Request-Id"] == error["request_id"]
    return str(error["message"])


def open_store(db: str, *, clock: Callable[[], float] = time.time, decay: bool = False,
               **flags: str) -> kvmem_cli.AnyStore:
    """A store on ``db`` (conftest's: an SQLite file or a PostgreSQL schema) with the
    settings ``flags``, as kvmem-http opens it (with the decay scheduler if ``decay``)."""
    config = kvmem.Config.build(environ={}, flags={"db": db, **flags})
    return kvmem_cli.open_store(config, role="http", clock=clock, decay=decay)


@contextlib.contextmanager
def serving(store: kvmem_cli.AnyStore, token: str = "") -> Iterator[http_server.Server]:
    """kvmem-http in this process over ``store``, on a free port, until the block ends."""
    server = http_server.build_server(store, "127.0.0.1", 0, token)
    thread = server.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join()


@contextlib.contextmanager
def writes_held(db: str) -> Iterator[Callable[[], None]]:
    """Another connection holds off every write to ``db`` (reads go on) until the function
    yielded is called, or the block ends: SQLite's ``BEGIN IMMEDIATE``; on PostgreSQL
    ``LOCK TABLE memories IN EXCLUSIVE MODE``, which a write's ``SELECT ... FOR UPDATE``
    waits for (``lock_timeout``: busy_timeout_ms)."""
    if kvmem.is_postgres(db):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("BEGIN")
            conn.execute("LOCK TABLE memories IN EXCLUSIVE MODE")

            def release() -> None:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")

            yield release
            release()
        return
    holder = kvmem.open_db(db, config=CONFIG)

    def rollback() -> None:
        if holder.in_transaction:
            holder.execute("ROLLBACK")

    try:
        holder.execute("BEGIN IMMEDIATE")
        yield rollback
        rollback()
    finally:
        holder.close()


def read_acknowledged_rows(db: str, *, namespace: str = "default") -> dict[str, Stored]:
    """Every memory of ``namespace`` as a PostgreSQL database holds it, read by a new
    connection (testutil.check_acknowledged reads an SQLite file)."""
    import psycopg

    with psycopg.connect(db) as conn:
        return {key: Stored(version, value, created_at, updated_at)
                for key, version, value, created_at, updated_at
                in conn.execute(READ_ROWS.replace("?", "%s"), (namespace,))}


@pytest.fixture
def served(store: kvmem_cli.AnyStore) -> Iterator[tuple[http_server.Server, kvmem_cli.AnyStore]]:
    """A server in this process over conftest's ``store`` (on each backend)."""
    with serving(store) as server:
        yield server, store


@pytest.fixture
def client(served: tuple[http_server.Server, kvmem_cli.AnyStore]) -> Iterator[Client]:
    c = Client(served[0].server_address[1])
    yield c
    c.close()


# ------------------------------------------------------------------------- endpoints ----


def test_put_get_update_conflict(client: Client) -> None:
    status, headers, body = client.request("PUT", "/v1/memories/user%2Ftea",
                                           {"value": {"likes": "green"}, "tags": ["prefs"]})
    assert status == 201 and body["key"] == "user/tea" and body["version"] == 1
    assert body["created_at"].endswith("Z") and body["expires_at"] is None
    assert headers["Content-Type"].startswith("application/json")
    status, _, body = client.request("PUT", "/v1/memories/user%2Ftea",
                                     {"value": "black", "if_version": 1, "ttl_seconds": 60})
    assert status == 200 and body["version"] == 2 and body["expires_at"] is not None
    result = client.request("PUT", "/v1/memories/user%2Ftea", {"value": 1, "if_version": 1})
    assert_error(result, 409, "version_conflict")
    assert result[2]["error"]["current_version"] == 2
    status, _, body = client.request("GET", "/v1/memories/user%2Ftea")
    assert status == 200 and body["value"] == "black"
    assert_error(client.request("GET", "/v1/memories/absent"), 404, "not_found")
    assert_error(client.request("GET", "/v1/memories/user%2Ftea?namespace=other"), 404,
                 "not_found")


def test_delete_and_reinforce(client: Client) -> None:
    client.request("PUT", "/v1/memories/k", {"value": 1, "half_life_seconds": 3600})
    assert_error(client.request("DELETE", "/v1/memories/k?if_version=9"), 409,
                 "version_conflict")
    status, _, body = client.request("POST", "/v1/memories/k/reinforce")
    assert status == 200 and body["key"] == "k" and body["half_life_seconds"] == 3600
    assert client.request("DELETE", "/v1/memories/k?if_version=1")[:3:2] == (200, {"deleted": True})
    assert_error(client.request("DELETE", "/v1/memories/k"), 404, "not_found")
    assert_error(client.request("POST", "/v1/memories/k/reinforce"), 404, "not_found")


def test_list_and_pages(client: Client) -> None:
    for i in range(12):
        client.request("PUT", f"/v1/memories/n{i:02d}?namespace=ns1",
                       {"value": i, "tags": ["even" if i % 2 == 0 else "odd"]})
    keys, cursor = [], None
    while True:
        path = "/v1/memories?namespace=ns1&limit=5" + (f"&cursor={cursor}" if cursor else "")
        status, _, body = client.request("GET", path)
        assert status == 200
        keys += [m["key"] for m in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert keys == [f"n{i:02d}" for i in range(12)]
    _, _, body = client.request("GET", "/v1/memories?namespace=ns1&tag=odd&prefix=n0")
    assert [m["value"] for m in body["items"]] == [1, 3, 5, 7, 9]
    _, _, body = client.request("GET", "/v1/memories?namespace=ns1&archived=true")
    assert body == {"items": [], "next_cursor": None}
    for bad in ("limit=0", "limit=abc", "limit=1001", "cursor=garbage", "archived=maybe",
                "namespace=bad%20ns", "limit=1&limit=2", "unknown=1"):
        assert_error(client.request("GET", f"/v1/memories?{bad}"), 400, "invalid_request")


def test_search(client: Client) -> None:
    client.request("PUT", "/v1/memories/tea", {"value": "green tea with lemon"})
    client.request("PUT", "/v1/memories/coffee", {"value": "black coffee"})
    status, _, body = client.request("GET", "/v1/search?q=lemon+tea")
    assert status == 200 and [h["key"] for h in body["items"]] == ["tea"]
    assert body["items"][0]["score"] > 0
    status, _, body = client.request("GET", "/v1/search?q=%22NEAR(%20*&limit=5")
    assert status == 200 and body["items"] == []
    assert_error(client.request("GET", "/v1/search"), 400, "invalid_request")
    assert_error(client.request("GET", "/v1/search?q=***"), 400, "invalid_request")


def test_batch(client: Client) -> None:
    status, _, body = client.request("POST", "/v1/batch", {"ops": [
        {"op": "set", "key": "a", "value": 1}, {"op": "set", "key": "b", "value": 2},
        {"op": "delete", "key": "zzz"}]})
    assert status == 200
    assert [r["op"] for r in body["results"]] == ["set", "set", "delete"]
    assert body["results"][2] == {"op": "delete", "deleted": False}
    result = client.request("POST", "/v1/batch", {"ops": [
        {"op": "set", "key": "c", "value": 3}, {"op": "set", "key": "a", "value": 9,
                                                "if_version": 5}]})
    assert_error(result, 409, "version_conflict")
    assert result[2]["error"]["op_index"] == 1
    assert_error(client.request("GET", "/v1/memories/c"), 404, "not_found")  # nothing applied
    message = assert_error(client.request("POST", "/v1/batch", {"ops": [{"op": "nope"}]}),
                           400, "invalid_request")
    assert "ops[0]" in message
    assert_error(client.request("POST", "/v1/batch", {"ops": []}), 400, "invalid_request")
    assert_error(client.request("POST", "/v1/batch", {"opz": []}), 400, "invalid_request")


def test_stats_health_openapi(client: Client, backend: str) -> None:
    client.request("PUT", "/v1/memories/a", {"value": 1})
    body = documented_ok(client, "/v1/stats")  # STATS_SCHEMA: what both backends report
    assert body["counts"]["live"] == 1 and body["config"]["token"] == ""
    assert body["health"]["ok"] is True and body["pid"] == os.getpid()
    assert body["backend"] == backend
    if backend == "sqlite":  # the file's settings and group commit: SQLite's figures
        assert body["settings"]["journal_mode"] == "wal"
        assert body["settings"]["synchronous"] == "extra"
        assert body["sqlite_version"] and body["group_commit"]["commits"] >= 1
    else:
        assert body["server"]["version"] and body["pool"]
    status, _, body = client.request("GET", "/healthz")
    assert (status, body["ok"]) == (200, True)
    status, _, spec = client.request("GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops
                  if m not in ("head", "options")}
    assert documented == {(r.method, r.path) for r in http_server.ROUTES}
    assert len(documented) == 12
    assert {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops
            if m == "head"} == {("HEAD", r.path) for r in http_server.ROUTES if r.method == "GET"}
    assert all("options" in ops for ops in spec["paths"].values())


# ------------------------------------------------ search and list filters, namespaces ----


@pytest.fixture
def filtered(db: str) -> Iterator[tuple[Client, kvmem_cli.AnyStore]]:
    """A server over a store on ``db`` holding testutil's FILTER_MEMORIES, written at
    their times."""
    clock = [0.0]
    with open_store(db, clock=lambda: clock[0]) as store:
        fill_filter_store(store, clock)  # type: ignore[arg-type]
        with serving(store) as server:
            c = Client(server.server_address[1])
            try:
                yield c, store
            finally:
                c.close()


def documented_ok(client: Client, path: str) -> Any:
    """GET ``path``: a 200 whose body is what the OpenAPI document says it is."""
    status, _, body = client.request("GET", path)
    assert status == 200, (path, body)
    operation = SPEC["paths"][path.partition("?")[0]]["get"]
    jsonschema.validate(body, {**operation["responses"]["200"]["content"]["application/json"][
        "schema"], "components": SPEC["components"]})
    return body


def test_search_filters_and_namespaces(filtered: tuple[Client, kvmem_cli.AnyStore]) -> None:
    client, _ = filtered
    for filters, expected in FILTER_CASES:
        query = urlencode([("q", FILTER_QUERY), *filter_query(filters)])
        body = documented_ok(client, f"/v1/search?{query}")
        assert found_keys(body["items"]) == expected, query


def test_list_filters(filtered: tuple[Client, kvmem_cli.AnyStore]) -> None:
    client, _ = filtered
    for filters, expected in LIST_CASES:
        query = urlencode(filter_query(filters))
        body = documented_ok(client, f"/v1/memories?{query}")
        assert found_keys(body["items"]) == expected, query
        assert body["next_cursor"] is None
    # A cursor goes on with the same filters, and only with them.
    body = documented_ok(client, "/v1/memories?namespace=alpha&tag=hot&limit=1")
    assert found_keys(body["items"]) == {"alpha/food/rice"}
    cursor = quote(body["next_cursor"], safe="")
    rest = documented_ok(client, f"/v1/memories?namespace=alpha&tag=hot&limit=1&cursor={cursor}")
    assert found_keys(rest["items"]) == {"alpha/tea/green"}
    assert_error(client.request("GET", f"/v1/memories?namespace=alpha&tag=drink&cursor={cursor}"),
                 400, "invalid_request")


def test_namespaces(filtered: tuple[Client, kvmem_cli.AnyStore]) -> None:
    assert documented_ok(filtered[0], "/v1/namespaces") == {"items": FILTER_NAMESPACES}


def test_namespaces_of_an_empty_store(client: Client) -> None:
    assert documented_ok(client, "/v1/namespaces") == {"items": []}
    assert_error(client.request("GET", "/v1/namespaces?namespace=default"), 400,
                 "invalid_request")
    assert_error(client.request("POST", "/v1/namespaces"), 405, "method_not_allowed")


BAD_FILTERS = [
    "tag=", "tag=a%00b", "&".join(f"tag=t{i}" for i in range(CONFIG.max_tags + 1)),
    "prefix=a%00b", "prefix=" + "p" * (CONFIG.max_key_chars + 1),
    "updated_after=yesterday", "updated_after=2023-01-01T00:00:00",  # no zone
    "updated_after=2023-01-01T01:00:00+01:00",  # the '+' not encoded: a space
    "updated_before=-5", "updated_before=1e3", "updated_before=", "updated_after=nan",
    "updated_before=" + "9" * 40,
]
BAD_SEARCH_NAMESPACES = [
    "namespace=", "namespace=bad%20ns", "namespace=alpha&namespace=bad%20ns",
    "namespace=*&namespace=alpha", "&".join(f"namespace=n{i}" for i in range(101)),
]


def test_bad_filters_are_400_and_change_nothing(
        filtered: tuple[Client, kvmem_cli.AnyStore]) -> None:
    client, store = filtered
    before = store.namespaces(), [m.to_record() for m in store.list(namespace="alpha").items]
    for bad in BAD_FILTERS:
        for path in (f"/v1/search?q=tea&namespace=*&{bad}", f"/v1/memories?namespace=alpha&{bad}"):
            assert_error(client.request("GET", path), 400, "invalid_request")
    for bad in BAD_SEARCH_NAMESPACES:
        assert_error(client.request("GET", f"/v1/search?q=tea&{bad}"), 400, "invalid_request")
    # list takes one namespace, never several or all
    for bad in ("namespace=alpha&namespace=beta", "namespace=*"):
        assert_error(client.request("GET", f"/v1/memories?{bad}"), 400, "invalid_request")
    after = store.namespaces(), [m.to_record() for m in store.list(namespace="alpha").items]
    assert after == before


# A valid value of each query parameter of search and list.
VALID_PARAMS = {"q": "tea", "namespace": "alpha", "tag": "hot", "prefix": "tea/",
                "updated_after": "1", "updated_before": "2023-01-01T00:05:00Z", "limit": "5",
                "archived": "false", "cursor": "x"}


@pytest.mark.parametrize("path", ["/v1/search", "/v1/memories"])
def test_a_repeated_parameter_counts_every_value_or_is_refused(
        filtered: tuple[Client, kvmem_cli.AnyStore], path: str) -> None:
    """Parameters documented with explode (namespace for search, tag) take every value;
    any other given twice is a 400, never one value silently dropped."""
    client, _ = filtered
    route = next(r for r in http_server.ROUTES if r.path == path and r.method == "GET")
    repeatable = {p["name"] for p in route.query if p.get("explode")}
    assert repeatable == ({"namespace", "tag"} if path == "/v1/search" else {"tag"})
    base = [("q", "tea")] if path == "/v1/search" else []
    for param in route.query:
        name = param["name"]
        twice = [*base, (name, VALID_PARAMS[name]), (name, VALID_PARAMS[name])]
        if name == "q":
            twice = twice[1:]
        result = client.request("GET", f"{path}?{urlencode(twice)}")
        if name in repeatable:
            assert result[0] == 200, (name, result)
        else:
            message = assert_error(result, 400, "invalid_request")
            assert f"{name!r} given twice" in message, message


def test_openapi_parameters_are_kvmem_definitions() -> None:
    config = kvmem.Config.build(environ={}, flags={"max_tags": "2", "max_key_chars": "7"})
    spec = http_server.openapi_document(config)
    filters = kvmem.filter_schemas(config)
    for path in ("/v1/search", "/v1/memories"):
        params = {p["name"]: p for p in spec["paths"][path]["get"]["parameters"]}
        assert params["tag"]["schema"] == filters["tags"] and params["tag"]["schema"][
            "maxItems"] == 2
        assert (params["tag"]["style"], params["tag"]["explode"]) == ("form", True)
        assert params["prefix"]["schema"] == filters["prefix"]
        assert params["prefix"]["schema"]["maxLength"] == 7
        for name in ("updated_after", "updated_before"):
            assert params[name]["schema"] == filters[name] and "explode" not in params[name]
    search = {p["name"]: p for p in spec["paths"]["/v1/search"]["get"]["parameters"]}
    assert search["namespace"]["schema"] == kvmem.search_namespaces_schema(config)
    assert (search["namespace"]["style"], search["namespace"]["explode"]) == ("form", True)
    assert spec["components"]["schemas"]["NamespaceList"] == kvmem_cli.NAMESPACE_LIST_SCHEMA
    assert spec["components"]["schemas"]["Stats"] == kvmem_cli.STATS_SCHEMA  # both backends'


@pytest.mark.backends("sqlite")  # an upgraded file's FTS5 rebuild (PostgreSQL indexes each write)
def test_search_during_an_index_rebuild_is_503_busy(filtered: tuple[Client, kvmem_cli.AnyStore]
                                                    ) -> None:
    """An upgraded file whose search index is still being rebuilt (as migration 3 leaves
    it): search answers busy with Retry-After, like any busy database; the rest works."""
    client, store = filtered
    mark_index_rebuilding(store.path)
    result = client.request("GET", "/v1/search?q=tea&namespace=*&tag=hot")
    message = assert_error(result, 503, "busy")
    assert "rebuilt" in message and result[1]["Retry-After"] == "1"
    assert documented_ok(client, "/v1/namespaces") == {"items": FILTER_NAMESPACES}
    assert found_keys(documented_ok(client, "/v1/memories?namespace=alpha&tag=drink")[
        "items"]) == {"alpha/tea/black", "alpha/tea/green"}


@pytest.mark.backends("sqlite")  # the database file renamed under the server
def test_healthz_503_when_file_replaced(client: Client, tmp_path: Path) -> None:
    os.rename(tmp_path / "kv.db", tmp_path / "moved.db")
    status, _, body = client.request("GET", "/healthz")
    assert status == 503 and not body["ok"], (status, body, os.listdir(tmp_path))
    assert "deleted" in body["problems"][0], (body, os.listdir(tmp_path))


# ------------------------------------------------------------------------------ auth ----


def test_auth(store: kvmem_cli.AnyStore) -> None:
    with serving(store, "s3cret-token") as server:
        port = server.server_address[1]
        anonymous, wrong, right = Client(port), Client(port, "wrong"), Client(port, "s3cret-token")
        result = anonymous.request("GET", "/v1/memories/x")
        assert_error(result, 401, "unauthorized")
        assert result[1]["WWW-Authenticate"] == "Bearer"
        anonymous = Client(port)
        assert_error(anonymous.request("PUT", "/v1/memories/x", {"value": 1}), 401, "unauthorized")
        assert_error(wrong.request("GET", "/v1/stats"), 401, "unauthorized")
        wrong = Client(port)
        assert_error(wrong.request("GET", "/v1/stats", headers={"Authorization": "Basic eDp5"}),
                     401, "unauthorized")
        assert right.request("PUT", "/v1/memories/x", {"value": 1})[0] == 201
        assert right.request("GET", "/v1/memories/x")[0] == 200
        assert Client(port).request("GET", "/healthz")[0] == 200  # health needs no token
        assert store.get("x") is not None


def test_non_loopback_refused_without_token(store: kvmem_cli.AnyStore, db: str) -> None:
    for host in ("0.0.0.0", "192.0.2.1", "example.org", "::"):
        with pytest.raises(kvmem.ConfigError, match="without a token"):
            http_server.build_server(store, host, 0, "")
    assert kvmem_cli.is_loopback("127.0.0.5") and kvmem_cli.is_loopback("::1")
    result = Child("serve_http", "--db", db, "--host", "0.0.0.0")
    assert result.wait() == 2 and "without a token" in result.stderr


# ------------------------------------------------------------------ malformed input ----


@dataclasses.dataclass(frozen=True)
class RawResponse:
    """One response as read off the wire: status, headers (names lowercased), body."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes on a new connection, then end the sending side (a request cut short
    needs the EOF); return everything the server sent until it closed.

    The server may answer and close first: with a FIN, or with a reset when it closes
    with bytes unread.  After a reset ``shutdown`` fails with ENOTCONN and ``recv``, once
    the answer already received is read, with ECONNRESET; Linux keeps what arrived before
    the reset readable.  So those errors end the exchange, and what was read is returned
    (``read_responses`` then requires each response in it whole).
    """
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and reset while sending: the answer is read below
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # answered and reset before the shutdown
                raise
        with contextlib.suppress(ConnectionResetError):  # after the answer: see above
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def read_responses(data: bytes, *, head: bool = False) -> list[RawResponse]:
    """The responses in ``data``, one after another (a request's unread bytes may be taken
    for another request, and answered), each required complete: a status line, headers
    and ``Content-Length`` bytes of body (none for a ``head`` request's first, unless it
    is all that is left: the server sends its 400 for a HEAD whose request line it
    refused with a body, and closes)."""
    responses: list[RawResponse] = []
    while data:
        head_bytes, separator, rest = data.partition(b"\r\n\r\n")
        assert separator, f"no complete response head: {data[:200]!r}"
        lines = head_bytes.split(b"\r\n")
        version, status, _ = (lines[0] + b" ").split(b" ", 2)
        assert version in (b"HTTP/1.1", b"HTTP/1.0") and status.isdigit(), lines[0]
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(b":") for line in lines[1:])}
        assert b"content-length" in headers, lines
        length = int(headers[b"content-length"])
        if head and not responses and len(rest) != length:
            length = 0
        assert len(rest) >= length, f"response cut short: {len(rest)} of {length} body bytes"
        responses.append(RawResponse(int(status), headers, rest[:length]))
        data = rest[length:]
    return responses


def raw_request(port: int, data: bytes) -> tuple[int, Any]:
    """Send raw bytes (see ``raw_exchange``); the status and JSON body of the one whole
    response."""
    responses = read_responses(raw_exchange(port, data))
    assert len(responses) == 1, responses
    return responses[0].status, responses[0].json()


@pytest.mark.parametrize(("data", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /v1/stats HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", 431),
    (b"GET /v1/stats HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /v1/stats HTTP/2.0\r\n\r\n", 400),
    (b"FOO /v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    # 65,537 bytes and no line end: the server reads all of it (a longer line would leave
    # bytes unread, and its close would then reset the connection under the answer).
    (b"GET " + b"/x" * 32766 + b"/", 414),
    (b"GET /v1/memories/%ZZ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /v1/memories/%FF%FE HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /v1/memories/a%00b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET http://example.org/v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"PUT /v1/memories/k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: 99999999999\r\n\r\n", 413),
    (b"PUT /v1/memories/k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: -5\r\n\r\n", 400),
    (b"PUT /v1/memories/k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
    (b"PUT /v1/memories/k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: 20\r\n\r\n{\"value\": 1", 400),  # body ends early
])
def test_garbage_requests_get_4xx(served: tuple[http_server.Server, kvmem_cli.AnyStore],
                                  data: bytes, status: int) -> None:
    got, body = raw_request(served[0].server_address[1], data)
    assert got == status
    assert body is None or set(body["error"]) >= {"code", "message"}


@pytest.mark.parametrize(("body", "headers", "status", "fragment"), [
    (b"{not json", {}, 400, "not valid JSON"),
    (b'{"value": NaN}', {}, 400, "not valid JSON"),
    (b"\xff\xfe{}", {}, 400, "UTF-8"),
    (b'["value"]', {}, 400, "object"),
    (b'{"value": 1, "colour": "red"}', {}, 400, "'colour'"),
    (b'{"tags": []}', {}, 400, "'value'"),
    (b'{"value": 1, "tags": "a,b"}', {}, 400, "tags"),
    (b'{"value": 1, "tags": [1, 2]}', {}, 400, "tag"),
    (b'{"value": 1, "ttl_seconds": "soon"}', {}, 400, "ttl_seconds"),
    (b'{"value": 1, "ttl_seconds": -1}', {}, 400, "ttl_seconds"),
    (b'{"value": 1, "if_version": 1.5}', {}, 400, "if_version"),
    (b'{"value": 1, "if_version": true}', {}, 400, "if_version"),
    (b'{"value": 1, "half_life_seconds": 0}', {}, 400, "half_life_seconds"),
    (b'{"value": 1}', {"Content-Type": "text/plain"}, 415, "application/json"),
    (b'{"value": 1}', {"Content-Type": ""}, 415, "application/json"),
    (b'{"value": "' + b"x" * (1024 * 1024) + b'"}', {}, 413, "limit"),
    (b"[" * 100000 + b"]" * 100000, {}, 400, "JSON"),
])
def test_malformed_bodies(client: Client, body: bytes, headers: dict[str, str], status: int,
                          fragment: str) -> None:
    sent = {"Content-Type": "application/json", **headers}
    result = client.request("PUT", "/v1/memories/k", raw=body, headers=sent)
    code = {400: "invalid_request", 413: "payload_too_large", 415: "unsupported_media_type"}
    assert fragment in assert_error(result, status, code[status])
    assert client.request("GET", "/v1/memories/k")[0] == 404  # nothing was written


def _distinct_words(count: int) -> list[str]:
    """``count`` different words of 8 letters."""
    letters = "bcdfghjklmnpqrstvwxz"
    return ["".join(letters[n // 20 ** i % 20] for i in range(7)) + "a" for n in range(count)]


# Values a client may send (each under max_value_bytes) that go past a limit of PostgreSQL's
# full-text search (a tsvector of at most 1 MiB, lexemes of at most 2,046 bytes, 255
# positions a lexeme, none past 16,383): stored whole, found by a word they hold.
PAST_SEARCH_LIMITS = [
    (" ".join(_distinct_words(110_000)), "bbbbbbba"),  # more distinct words than fit
    ("tea " * 200_000, "tea"),  # one word at 200,000 positions
    ("\u0436" * 1500 + " tea", "tea"),  # a word of 3,000 bytes (Cyrillic), then another
    ({"w\u0000": "\u0000" * 1000 + " tea\u0000green"}, "green"),  # NULs (text refuses them)
]


@pytest.mark.parametrize(("value", "word"), PAST_SEARCH_LIMITS,
                         ids=["distinct-words", "positions", "long-word", "nul"])
def test_values_past_the_search_limits_are_stored_and_found(client: Client, value: Any,
                                                             word: str) -> None:
    status, _, body = client.request("PUT", "/v1/memories/big", {"value": value})
    assert status == 201, body
    status, _, body = client.request("GET", "/v1/memories/big")
    assert status == 200 and body["value"] == value
    status, _, body = client.request("GET", f"/v1/search?q={word}")
    assert status == 200 and [hit["key"] for hit in body["items"]] == ["big"], body


@pytest.mark.parametrize("key", ["日本語", "🧠 brain", "../../etc/passwd", "..", "a/b/c",
                                 "%2F", "quote\"d", "space key", "x" * 512])
def test_odd_keys_round_trip(client: Client, key: str) -> None:
    path = "/v1/memories/" + quote(key, safe="")
    status, _, body = client.request("PUT", path, {"value": key})
    assert status == 201 and body["key"] == key
    status, _, body = client.request("GET", path)
    assert status == 200 and body["value"] == key
    assert client.request("GET", "/v1/memories")[2]["items"][0]["key"] == key


def test_unread_body_does_not_desync_keep_alive(client: Client) -> None:
    """A request answered before its body is read (here: no such path) must not leave
    the body in the connection to be parsed as the next request."""
    body = b"GET /v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # looks like a request
    result = client.request("PUT", "/v1/nowhere", raw=body,
                            headers={"Content-Type": "application/json"})
    assert_error(result, 404, "not_found")
    assert result[1].get("Connection") == "close"
    status, _, _ = client.request("GET", "/v1/memories/k")
    assert status == 404  # the answer to this request, not to the smuggled one


def test_key_limits(client: Client) -> None:
    assert_error(client.request("PUT", "/v1/memories/" + "x" * 513, {"value": 1}), 400,
                 "invalid_request")
    assert_error(client.request("PUT", "/v1/memories/a%0Ab", {"value": 1}), 400,
                 "invalid_request")
    assert_error(client.request("GET", "/v1/memories/"), 404, "not_found")
    assert_error(client.request("GET", "/v1/nothing"), 404, "not_found")
    result = client.request("PATCH", "/v1/memories/a")
    assert_error(result, 405, "method_not_allowed")
    assert result[1]["Allow"] == "DELETE, GET, HEAD, OPTIONS, PUT"


# --------------------------------------------------------------------------- fuzzing ----

SPEC = http_server.openapi_document()


def _schema(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10,
)
field_names = st.sampled_from(["value", "tags", "ttl_seconds", "half_life_seconds",
                               "if_version", "ops", "op", "key", "extra"])
bodies = st.one_of(
    st.none(), json_values,
    st.dictionaries(field_names, json_values | st.lists(
        st.dictionaries(field_names, json_values | st.sampled_from(["set", "delete"]),
                        max_size=5), max_size=3), max_size=5),
)
query_names = st.sampled_from(["namespace", "prefix", "tag", "archived", "limit", "cursor", "q",
                               "if_version", "dry_run", "updated_after", "x"])
query_values = st.one_of(st.text(max_size=12), st.integers(-5, 2000).map(str),
                         st.sampled_from(["true", "false", "default", "%", "%ZZ", "%FF", "--1",
                                          "-", "+1", "-0", "%2D%2D5", "1e3", " 1", "٣"]))


TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
raw_bytes = st.binary(max_size=40)  # any byte: CR, LF, NUL, non-ASCII, invalid UTF-8
# Hosts this server does not answer to (it answers to loopback names and its address).
bad_hosts = st.one_of(st.sampled_from([b"", b"evil.example", b"127.0.0.1.evil.example:80",
                                       b"[::1", b"localhost.evil"]),
                      raw_bytes.map(lambda tail: b"evil-" + tail))


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, bytes, bytes, bool]:
    """A request drawn from the route table as bytes, any part of which may be garbage
    (each now and then, so that many requests reach a handler): the request line (method,
    key, query, version), the headers (Host, Content-Type, Content-Length, others) and
    the body.  Returns it with its method, its path, and whether its Host is one the
    server does not answer to (or none)."""

    def now_and_then() -> bool:
        return draw(st.integers(0, 9)) == 0

    route = draw(st.sampled_from(http_server.ROUTES))
    bad_host = now_and_then()
    if bad_host or not now_and_then():  # (http.server refuses an unknown method first)
        method = draw(st.sampled_from([route.method] * 6 + ["GET", "PUT", "POST", "DELETE",
                                                            "PATCH", "HEAD", "OPTIONS"]))
        method_bytes = method.encode()
    else:
        method_bytes = draw(st.text(TOKEN, min_size=1, max_size=8).map(str.encode) | raw_bytes)
    key = draw(st.text(max_size=30))
    key_bytes = quote(key, safe="").encode()
    if now_and_then():
        key_bytes = draw(st.sampled_from([key.encode(), b"%", b"%2", b"%ZZ", b"%FF%FE",
                                          b"a%00b", b"..", b"%2F"]) | raw_bytes)
    path = route.path.encode().replace(b"{key}", key_bytes)
    names = st.sampled_from([q["name"] for q in route.query]) if route.query else query_names
    params = draw(st.lists(st.tuples(names if not now_and_then() else query_names,
                                     query_values), max_size=3))
    query = [(quote(name).encode(), quote(value, safe="%").encode()) for name, value in params]
    if query and now_and_then():
        query.append((draw(raw_bytes), draw(raw_bytes)))
    if query:
        path += b"?" + b"&".join(name + b"=" + value for name, value in query)
    version = b"HTTP/1.1"
    if not bad_host and now_and_then():
        version = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/x", b"HTTP/1.1 x", b""]))
    body = draw(bodies)
    raw = b"" if body is None else json.dumps(body).encode()
    if now_and_then():
        raw = draw(raw_bytes)
    headers = [] if bad_host and draw(st.booleans()) else [
        (b"Host", draw(bad_hosts) if bad_host else b"127.0.0.1")]
    content_type = b"application/json"
    if now_and_then():
        content_type = draw(st.sampled_from([b"application/json; charset=utf-8", b"text/plain",
                                             b""]) | raw_bytes)
    headers.append((b"Content-Type", content_type))
    length = str(len(raw)).encode()
    if now_and_then():
        length = draw(st.sampled_from([str(len(raw) + 5).encode(),  # more: the body ends early
                                       str(max(0, len(raw) - 3)).encode(),  # less: the rest
                                       b"", b"-1", b"0x10", b"1e3",  # is another request
                                       b"4\xb2"])  # Latin-1 "4²": str.isdigit() says yes
                      | raw_bytes)
    if not now_and_then():  # else none at all
        headers.append((b"Content-Length", length))
    if now_and_then():
        headers += draw(st.lists(st.tuples(
            st.sampled_from([b"Origin", b"Connection", b"Transfer-Encoding", b"Content-Length",
                             b"X-Any", b"Authorization", b"If-Match", b"If-None-Match"])
            | raw_bytes,
            st.sampled_from([b"close", b"keep-alive", b"chunked", b"http://evil.example",
                             b"*", b'"1"', b'"0"', b'W/"1"', b'"1", "2"'])
            | raw_bytes), min_size=1, max_size=3))
    data = (method_bytes + b" " + path + (b" " + version if version else b"") + b"\r\n"
            + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            + b"\r\n" + raw)
    return data, method_bytes, path, bad_host


def _documented(method: bytes, path: bytes) -> dict[str, Any]:
    """The OpenAPI operation of ``method`` and ``path`` (a template's ``{key}`` is any
    one non-empty segment); fails when there is none."""
    assert path.isascii(), f"{method!r} {path!r} was answered 2xx: its target is not ASCII"
    segments = path.partition(b"?")[0].decode("ascii").split("/")
    for template, operations in SPEC["paths"].items():
        parts = template.split("/")
        if len(parts) == len(segments) and all(part == got or (part == "{key}" and got)
                                               for part, got in zip(parts, segments, strict=True)):
            operation: dict[str, Any] = operations.get(method.decode("ascii").lower(), {})
            assert operation, f"{method!r} {path!r} was answered 2xx but is not documented"
            return operation
    raise AssertionError(f"{method!r} {path!r} was answered 2xx but is not documented")


def test_fuzz_api_from_route_table(db: str) -> None:
    """A kvmem-http process gets fuzzed requests as raw bytes on a socket (see
    ``raw_requests``).  Every one is answered, completely, with a 2xx (as the OpenAPI
    document says for it) or a 4xx in the one error shape, never a 5xx; one to a Host
    it does not answer to gets 421 (or 400, when something else is wrong first).  Bytes
    a request leaves unread may be answered as another request, the same way.  The
    server logs no traceback and stops cleanly.  On each backend."""
    child, port = start_server(db)
    for key in ("a", "b c", "caf\u00e9"):  # something to read, list and search
        assert raw_request(port, b"PUT /v1/memories/" + quote(key, safe="").encode()
                           + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                           b"\r\nContent-Length: 12\r\n\r\n{\"value\": 1}")[0] == 201

    @settings(max_examples=4000 if SOAK else 400, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(request=raw_requests())
    @example(request=(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\xb2\r\n"
                      b"\r\n", b"GET", b"/healthz", False))  # int("4²") raised: a 500
    @example(request=(b"PUT /v1/memories/nul HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 33\r\n\r\n"
                      b'{"value": {"a\\u0000": "b\\u0000"}}', b"PUT", b"/v1/memories/nul",
                      False))  # NULs, which PostgreSQL's text refuses
    def one(request: tuple[bytes, bytes, bytes, bool]) -> None:
        data, method, path, bad_host = request
        responses = read_responses(raw_exchange(port, data), head=method == b"HEAD")
        if not responses:  # http.server closes on an empty first line (RFC 9112 section
            # 2.2 says a server SHOULD skip it): the one request left unanswered
            assert data.startswith((b"\n", b"\r\n")), f"no answer to {data[:300]!r}"
            return
        DURABILITY_TOTALS["fuzz_cases"] += 1
        for n, response in enumerate(responses):
            assert 200 <= response.status < 300 or 400 <= response.status < 500, \
                (response, data[:300])
            if n == 0 and method == b"HEAD":
                continue
            body = response.json()
            if response.status >= 400:
                jsonschema.validate(body, _schema("Error"))
                assert set(body) == {"error"} and response.headers.get(
                    b"x-request-id", body["error"]["request_id"].encode()) \
                    == body["error"]["request_id"].encode(), (response, data[:300])
            elif n == 0:
                responses_documented = _documented(method, path)["responses"]
                assert str(response.status) in responses_documented, (response, data[:300])
                jsonschema.validate(body, {**responses_documented[str(response.status)][
                    "content"]["application/json"]["schema"], "components": SPEC["components"]})
        if bad_host:
            assert responses[0].status in (421, 400), (responses[0], data[:300])
        assert "Traceback" not in child.stderr, child.stderr[-3000:]

    try:
        one()
    finally:
        child.proc.send_signal(signal.SIGTERM)
        rc = child.wait()
    assert rc == 0 and "Traceback" not in child.stderr, child.stderr[-3000:]
    assert " ERROR " not in child.stderr, child.stderr[-3000:]


# ------------------------------------------------------------- processes, crash, stop ----


def start_server(db: str, *extra: str) -> tuple[Child, int]:
    child = Child("serve_http", "--db", db, "--port", "0", "--log-level", "WARNING", *extra)
    line = child.expect("listening on http://127.0.0.1:")
    return child, int(line.rsplit(":", 1)[1])


def _writer_thread(port: int, prefix: str, acked: dict[str, int], lock: threading.Lock,
                   statuses: list[int], stop: threading.Event) -> None:
    """PUT keys until the connection fails; record each 2xx (an acknowledgement)."""
    client = Client(port)
    i = 0
    try:
        while not stop.is_set():
            key = f"{prefix}-{i}"
            try:
                status, _, body = client.request("PUT", f"/v1/memories/{key}",
                                                 {"value": {"i": i, "p": prefix}})
            except (OSError, http.client.HTTPException):
                return  # failed at the connection: not acknowledged
            statuses.append(status)
            if 200 <= status < 300:
                with lock:
                    acked[key] = body["version"]
            i += 1
    finally:
        client.close()


def _written(key: str) -> dict[str, Any]:
    """The value a writer thread PUT under ``key`` (``PREFIX-I``)."""
    prefix, i = key.rsplit("-", 1)
    return {"i": int(i), "p": prefix}


def _check_acked(db: str, acked: dict[str, int]) -> None:
    """No acknowledged write lost: an SQLite file reopened as after a crash (with its
    integrity check), a PostgreSQL database read by a new connection."""
    if not kvmem.is_postgres(db):
        check_acknowledged(db, acked, config=CONFIG, value=_written)
        return
    assert acked, "no acknowledged write to check: the check would prove nothing"
    lost = lost_writes(read_acknowledged_rows(db), acked, value=_written)
    assert lost == [], f"{len(lost)} of {len(acked)} acknowledged writes lost, e.g. {lost[:3]}"


def test_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    db = str(tmp_path / "kv.db")
    rng = random.Random(4242)
    acked: dict[str, int] = {}
    lock = threading.Lock()
    for run in range(10):
        child, port = start_server(db)
        stop = threading.Event()
        statuses: list[int] = []
        threads = [threading.Thread(target=_writer_thread,
                                    args=(port, f"r{run}t{t}", acked, lock, statuses, stop))
                   for t in range(4)]
        for thread in threads:
            thread.start()
        target = len(acked) + rng.randint(5, 150)
        while len(acked) < target and any(t.is_alive() for t in threads):
            threading.Event().wait(0.002)  # poll the acknowledgement count (a condition)
        child.kill()
        stop.set()
        for thread in threads:
            thread.join()
        assert all(s < 500 for s in statuses)
        _check_acked(db, acked)
    assert len(acked) >= 50


def test_sigterm_during_load_is_graceful(db: str, backend: str) -> None:
    child, port = start_server(db, "--log-level", "INFO")
    acked: dict[str, int] = {}
    lock = threading.Lock()
    statuses: list[int] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_writer_thread,
                                args=(port, f"t{t}", acked, lock, statuses, stop))
               for t in range(8)]
    for thread in threads:
        thread.start()
    while len(acked) < 200:
        threading.Event().wait(0.002)
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 0, child.stderr
    stop.set()
    for thread in threads:
        thread.join()
    assert statuses and all(200 <= s < 300 for s in statuses), sorted(set(statuses))
    assert "stopped cleanly" in child.stderr
    _check_acked(db, acked)
    if backend == "sqlite":  # a final checkpoint emptied the WAL
        assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0


def test_sixteen_keep_alive_writers(served: tuple[http_server.Server, kvmem_cli.AnyStore],
                                    db: str, backend: str) -> None:
    server, store = served
    port = server.server_address[1]
    acked: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        client = Client(port)
        try:
            for i in range(60):
                status, _, body = client.request("PUT", f"/v1/memories/w{t}-{i}",
                                                 {"value": {"i": i, "p": f"w{t}"}})
                assert status == 201, body
                with lock:
                    acked[f"w{t}-{i}"] = body["version"]
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(acked) == 960
    if backend == "sqlite":  # group commit is SQLite's (PostgreSQL: a COMMIT a write)
        figures = store.stats()["group_commit"]
        assert figures["commits"] < figures["ops"] and figures["largest_group"] > 1, figures
    _check_acked(db, acked)


def test_busy_database_is_503_with_retry_after(db: str) -> None:
    with open_store(db, busy_timeout_ms="200") as store, serving(store) as server, \
            writes_held(db) as release:  # another writer keeps the lock past the deadline
        port = server.server_address[1]
        result = Client(port).request("PUT", "/v1/memories/k", {"value": 1})
        assert_error(result, 503, "busy")
        assert result[1]["Retry-After"] == "1"
        assert Client(port).request("GET", "/v1/memories/k")[0] == 404  # reads go on
        release()
        assert Client(port).request("PUT", "/v1/memories/k", {"value": 1})[0] == 201


def test_unexpected_error_is_500_without_details(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    class BrokenStore(kvmem.Store):  # a bug behind the stats handler
        def stats(self) -> dict[str, Any]:
            raise RuntimeError("secret internal detail")

    store = BrokenStore.open(tmp_path / "kv.db", config=CONFIG)
    server = http_server.build_server(store, "127.0.0.1", 0, "")
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        client = Client(server.server_address[1])
        result = client.request("GET", "/v1/stats")
        message = assert_error(result, 500, "internal")
        assert "secret" not in json.dumps(result[2]) and "Traceback" not in json.dumps(result[2])
        request_id = result[2]["error"]["request_id"]
        assert request_id in message
        assert f"request {request_id} GET /v1/stats failed" in caplog.text
        assert "secret internal detail" in caplog.text  # the log has the details
        assert client.request("GET", "/healthz")[0] == 200  # the server keeps serving
    finally:
        server.stop()
        thread.join()
        store.close()


# ------------------------------------------------------------ hostile requests (#15) ----


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({"Host": "evil.example:8765"}, 421, "misdirected"),  # DNS rebinding
    ({"Host": "localhost:8765"}, 200, None),
    ({"Host": "[::1]:8765"}, 200, None),
    ({"Origin": "http://evil.example"}, 403, "forbidden"),
    ({"Origin": "http://localhost:3000"}, 200, None),
])
def test_host_and_origin_are_checked_against_dns_rebinding(
        client: Client, headers: dict[str, str], status: int, code: str | None) -> None:
    result = client.request("GET", "/v1/stats", headers=headers)
    if code is None:
        assert result[0] == status, result
    else:
        assert_error(result, status, code)


def test_an_allowed_host_is_answered(db: str) -> None:
    with open_store(db, allowed_hosts="kv.example, Proxy.lan") as store, \
            serving(store) as server:
        c = Client(server.server_address[1])
        try:
            for host, status in (("kv.example", 200), ("proxy.lan:443", 200),
                                 ("other.example", 421)):
                assert c.request("GET", "/v1/stats", headers={"Host": host})[0] == status, host
        finally:
            c.close()


def test_raw_bytes_in_the_path_and_two_content_lengths_are_refused(
        served: tuple[http_server.Server, kvmem_cli.AnyStore]) -> None:
    server, store = served
    port = server.server_address[1]
    status, body = raw_request(port, b"PUT /v1/memories/caf\xc3\xa9 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: 11\r\n"
                                     b"\r\n{\"value\":1}")
    assert (status, body["error"]["code"]) == (400, "invalid_request"), body
    status, body = raw_request(port, b"PUT /v1/memories/k HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: 11\r\n"
                                     b"Content-Length: 2\r\n\r\n{\"value\":1}")
    assert (status, body["error"]["code"]) == (400, "invalid_request"), body
    assert "Content-Length" in body["error"]["message"]
    assert store.list().items == []  # neither was stored
    status, body = raw_request(port, b"PUT /v1/memories/caf%C3%A9 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: 11\r\n"
                                     b"\r\n{\"value\":1}")
    assert status == 201 and body["key"] == "café", body


def test_a_burst_of_200_connections_is_served(
        served: tuple[http_server.Server, kvmem_cli.AnyStore]) -> None:
    """Python's default listen backlog (5) reset most of such a burst."""
    port = served[0].server_address[1]
    barrier = threading.Barrier(200)
    results: list[int] = []

    def one() -> None:
        barrier.wait()
        try:
            status, _ = raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                          b"Connection: close\r\n\r\n")
            results.append(status)
        except OSError:  # reset: the listen queue overflowed
            results.append(-1)

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(200) == 200, sorted(set(results))


@pytest.mark.parametrize("last_key", ["\ud800", "a\x00b"])
def test_a_forged_cursor_with_a_key_no_key_can_be_is_a_400(client: Client,
                                                          last_key: str) -> None:
    cursor = forged_cursor(last_key)
    result = client.request("GET", f"/v1/memories?cursor={cursor}")
    assert "cursor" in assert_error(result, 400, "invalid_request")
