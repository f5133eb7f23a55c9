"""kvmem's HTTP JSON API: stdlib ``http.server`` over ``kvmem.Store``.

Thin by design: parse and validate the request, call the Store, render the result.  One
route table (``ROUTES``) drives both dispatch and ``GET /openapi.json``, so the published
description cannot drift from what the server does.  Errors are translated here and only
here: a ``KvmemError``'s ``code`` picks the status, and every error body has one shape,
``{"error": {"code": ..., "message": ..., "request_id": ...}}``.

Threads: ``ThreadingHTTPServer`` runs a thread per client connection; reads borrow pooled
connections, writes go through the Store's group commit, so a response is sent only
after its COMMIT returned.  SIGINT/SIGTERM: stop accepting, let in-flight requests finish,
close idle keep-alive connections, stop the background threads, checkpoint, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.server
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

import kvmem
import kvmem_cli

log = logging.getLogger("kvmem.http")

MAX_BODY_BYTES = kvmem_cli.MAX_BODY_BYTES
JSON_TYPES = ("application/json",)


# ----------------------------------------------------------------------------- errors ----


class HTTPError(Exception):
    """An error response decided by the HTTP layer itself (bad request shape, auth...)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, dict(headers or {})


STATUS_BY_CODE = {
    "invalid_request": 400, "invalid_config": 400, "payload_too_large": 413,
    "not_found": 404, "version_conflict": 409, "busy": 503, "storage_full": 507,
    "read_only": 503, "storage_error": 503, "not_a_database": 503, "corrupt_database": 503,
    "schema_too_new": 503,
}


def error_body(code: str, message: str, request_id: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id, **extra}}


# ---------------------------------------------------------------------------- the API ----


class Api:
    """Route handlers: each takes (key, query, body) and returns (status, JSON body).
    Requests become kvmem ops (``SetOp.parse`` and the rest), checked by kvmem itself."""

    def __init__(self, store: kvmem.Store) -> None:
        self.store = store
        self.batch_body = batch_body(store.config)  # built once, not per request

    def put_memory(self, key: str, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            raise HTTPError(400, "invalid_request", "the body must be a JSON object")
        op = kvmem.SetOp.parse(body, self.store.config, key=key,
                               namespace=query.get("namespace", "default"))
        memory: kvmem.Memory = self.store.apply(op)
        return (201 if memory.version == 1 else 200), memory.render(self.store.clock())

    def get_memory(self, key: str, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        memory = self.store.get(key, namespace=query.get("namespace", "default"))
        if memory is None:
            raise kvmem.NotFoundError(f"no memory {key[:200]!r}")
        return 200, memory.render(self.store.clock())

    def delete_memory(self, key: str, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        deleted = self.store.delete(key, namespace=query.get("namespace", "default"),
                                    if_version=int_param(query, "if_version", None))
        if not deleted:
            raise kvmem.NotFoundError(f"no memory {key[:200]!r}")
        return 200, {"deleted": True}

    def reinforce_memory(self, key: str, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        memory = self.store.reinforce(key, namespace=query.get("namespace", "default"))
        return 200, memory.render(self.store.clock())

    def list_memories(self, key: None, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        page = self.store.list(
            namespace=query.get("namespace", "default"), prefix=query.get("prefix"),
            tag=query.get("tag"), archived=bool_param(query, "archived"),
            limit=int_param(query, "limit", 100) or 0, cursor=query.get("cursor"),
        )
        now = self.store.clock()
        return 200, {"items": [m.render(now) for m in page.items],
                     "next_cursor": page.next_cursor}

    def search(self, key: None, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        hits = self.store.search(query["q"], namespace=query.get("namespace", "default"),
                                 limit=int_param(query, "limit", 20) or 0)
        now = self.store.clock()
        return 200, {"items": [{**h.memory.render(now), "score": h.score} for h in hits]}

    def batch(self, key: None, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        fields = check_body(body, self.batch_body)
        results = self.store.batch(fields["ops"], namespace=query.get("namespace", "default"))
        now = self.store.clock()
        return 200, {"results": [{**r, "memory": r["memory"].render(now)} if "memory" in r
                                 else r for r in results]}

    def stats(self, key: None, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        return 200, self.store.stats()

    def healthz(self, key: None, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        health = self.store.health()
        return (200 if health["ok"] else 503), health

    def openapi(self, key: None, query: Mapping[str, str], body: Any) -> tuple[int, Any]:
        return 200, openapi_document(self.store.config)


def check_body(body: Any, schema: Mapping[str, Any]) -> dict[str, Any]:
    """The top level of a request body: an object, required fields there, no unknown
    ones.  Field values are validated by kvmem itself."""
    if not isinstance(body, dict):
        raise HTTPError(400, "invalid_request", "the body must be a JSON object")
    unknown = sorted(set(body) - set(schema["properties"]))
    if unknown:
        raise HTTPError(400, "invalid_request", f"unknown field {unknown[0][:100]!r}")
    for name in schema["required"]:
        if name not in body:
            raise HTTPError(400, "invalid_request", f"field {name!r} is required")
    return body


# ---------------------------------------------------------------------- route table ----

NAMESPACE_PARAM = {"name": "namespace", "schema": {"type": "string", "default": "default"},
                   "description": "1-64 of A-Z a-z 0-9 . _ -"}
RouteHandler = Callable[[Api, Any, Mapping[str, str], Any], tuple[int, Any]]


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI template; "{key}" is one percent-encoded path segment
    handler: RouteHandler  # a method of Api
    summary: str
    query: tuple[dict[str, Any], ...] = ()
    body: Callable[[kvmem.Config], dict[str, Any]] | None = None  # JSON schema of the body
    responses: Mapping[int, str] = dataclasses.field(default_factory=dict)  # status -> schema
    auth: bool = True


def set_body(config: kvmem.Config) -> dict[str, Any]:
    return kvmem.SetOp.schema(config, exclude=("namespace", "key"))


def batch_body(config: kvmem.Config) -> dict[str, Any]:
    return {"type": "object", "required": ["ops"], "additionalProperties": False,
            "properties": {"ops": {"type": "array", "minItems": 1,
                                   "maxItems": config.max_batch_ops,
                                   "items": kvmem.batch_op_schema(config)}}}


# Any route can answer these: bad input, auth, wrong method, body rules, busy database.
COMMON_ERRORS = {400: "Error", 401: "Error", 405: "Error", 411: "Error", 413: "Error",
                 415: "Error", 503: "Error"}

ROUTES: tuple[Route, ...] = (
    Route("PUT", "/v1/memories/{key}", Api.put_memory, "Create or replace a memory",
          query=(NAMESPACE_PARAM,), body=set_body,
          responses={200: "Memory", 201: "Memory", 409: "Error", 413: "Error", 415: "Error",
                     507: "Error", **COMMON_ERRORS}),
    Route("GET", "/v1/memories/{key}", Api.get_memory, "Read a live memory",
          query=(NAMESPACE_PARAM,), responses={200: "Memory", 404: "Error", **COMMON_ERRORS}),
    Route("DELETE", "/v1/memories/{key}", Api.delete_memory, "Delete a memory",
          query=(NAMESPACE_PARAM, {"name": "if_version", "schema": {"type": "integer",
                                                                    "minimum": 0}}),
          responses={200: "Deleted", 404: "Error", 409: "Error", 507: "Error", **COMMON_ERRORS}),
    Route("POST", "/v1/memories/{key}/reinforce", Api.reinforce_memory,
          "Strengthen a memory and restart its decay; restores an archived one",
          query=(NAMESPACE_PARAM,),
          responses={200: "Memory", 404: "Error", 507: "Error", **COMMON_ERRORS}),
    Route("GET", "/v1/memories", Api.list_memories, "List memories in key order",
          query=(NAMESPACE_PARAM, {"name": "prefix", "schema": {"type": "string"}},
                 {"name": "tag", "schema": {"type": "string"}},
                 {"name": "archived", "schema": {"type": "boolean", "default": False}},
                 {"name": "limit", "schema": {"type": "integer", "minimum": 1,
                                              "maximum": kvmem.MAX_LIST_LIMIT, "default": 100}},
                 {"name": "cursor", "schema": {"type": "string"}}),
          responses={200: "MemoryList", **COMMON_ERRORS}),
    Route("GET", "/v1/search", Api.search, "Full-text search, ranked by BM25 x current strength",
          query=(NAMESPACE_PARAM, {"name": "q", "required": True, "schema": {"type": "string"}},
                 {"name": "limit", "schema": {"type": "integer", "minimum": 1,
                                              "maximum": kvmem.MAX_SEARCH_LIMIT, "default": 20}}),
          responses={200: "SearchResults", **COMMON_ERRORS}),
    Route("POST", "/v1/batch", Api.batch, "Apply set/delete ops atomically: all or none",
          query=(NAMESPACE_PARAM,), body=batch_body,
          responses={200: "BatchResults", 409: "Error", 413: "Error", 415: "Error",
                     507: "Error", **COMMON_ERRORS}),
    Route("GET", "/v1/stats", Api.stats, "Settings read back, sizes, counts, background state",
          responses={200: "Stats", **COMMON_ERRORS}),
    Route("GET", "/healthz", Api.healthz, "Health; 503 when the database does not answer",
          responses={200: "Health", 503: "Health"}, auth=False),
    Route("GET", "/openapi.json", Api.openapi, "This description", responses={200: "OpenAPI"}),
)

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message", "request_id"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "request_id": {"type": "string"},
                       "current_version": {"type": "integer"}, "op_index": {"type": "integer"}},
    }}},
    "Memory": kvmem.MEMORY_SCHEMA,
    "MemoryList": {"type": "object", "required": ["items", "next_cursor"], "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Memory"}},
        "next_cursor": {"type": ["string", "null"]}}},
    "SearchResults": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": {"allOf": [
            {"$ref": "#/components/schemas/Memory"},
            {"type": "object", "required": ["score"], "properties": {"score": {"type": "number"}}},
        ]}}}},
    "Deleted": {"type": "object", "required": ["deleted"],
                "properties": {"deleted": {"const": True}}},
    "BatchResults": {"type": "object", "required": ["results"], "properties": {
        "results": {"type": "array", "items": {"type": "object", "required": ["op"],
                                               "properties": {
            "op": {"enum": list(kvmem.BATCH_OPS)},
            "memory": {"$ref": "#/components/schemas/Memory"},
            "deleted": {"type": "boolean"}}}}}},
    "Stats": {"type": "object", "required": ["settings", "sqlite_version", "counts"]},
    "Health": {"type": "object", "required": ["ok"], "properties": {
        "ok": {"type": "boolean"}, "problems": {"type": "array", "items": {"type": "string"}}}},
    "OpenAPI": {"type": "object", "required": ["openapi", "paths"]},
}


def openapi_document(config: kvmem.Config | None = None) -> dict[str, Any]:
    """OpenAPI 3.1, generated from ROUTES and SCHEMAS, with the limits of ``config``."""
    config = config or kvmem.Config.build(environ={})
    paths: dict[str, Any] = {}
    for route in ROUTES:
        parameters = [{"name": "key", "in": "path", "required": True,
                       "schema": kvmem.SetOp.schema(config)["properties"]["key"],
                       "description": "percent-encoded; '/' as %2F"}]
        if "{key}" not in route.path:
            parameters = []
        parameters += [{"in": "query", "required": False, **p} for p in route.query]
        operation: dict[str, Any] = {
            "operationId": route.handler.__name__, "summary": route.summary,
            "parameters": parameters,
            "responses": {str(status): {
                "description": schema,
                "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{schema}"}}},
            } for status, schema in route.responses.items()},
        }
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": route.body(config)}}}
        if route.auth:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvmem", "version": "1",
                 "description": "Durable key-value memory for AI agents. Every error is "
                                "{\"error\": {\"code\", \"message\", \"request_id\"}}."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def match_route(method: str, raw_path: str) -> tuple[Route, str | None]:
    """The route for ``method`` and a raw (still percent-encoded) path, and the decoded
    key.  Raises HTTPError 404 (no such path) or 405 (path exists, method does not)."""
    segments = raw_path.split("/")
    candidates: list[tuple[Route, str | None]] = []
    for route in ROUTES:
        template = route.path.split("/")
        if len(template) != len(segments):
            continue
        key: str | None = None
        for want, got in zip(template, segments, strict=True):
            if want == "{key}":
                key = decode_segment(got) if got else None
                if key is None:
                    break
            elif want != got:
                break
        else:
            candidates.append((route, key))
    if not candidates:
        raise HTTPError(404, "not_found", f"no such path: {raw_path[:200]}")
    for route, key in candidates:
        if route.method == method:
            return route, key
    allowed = ", ".join(sorted({r.method for r, _ in candidates}))
    raise HTTPError(405, "method_not_allowed", f"{method} is not allowed here; use {allowed}",
                    headers={"Allow": allowed})


def decode_segment(segment: str) -> str:
    """Strict percent-decoding of one path segment to UTF-8 text (400 on garbage)."""
    for i, ch in enumerate(segment):
        if ch == "%" and not (len(segment) >= i + 3 and all(
                c in "0123456789abcdefABCDEF" for c in segment[i + 1:i + 3])):
            raise HTTPError(400, "invalid_request", "bad percent-encoding in the path")
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid_request", "the key is not valid UTF-8") from None


def parse_query(raw: str, route: Route) -> dict[str, str]:
    """Strictly parsed query parameters: known names only, each at most once."""
    known = {p["name"] for p in route.query}
    out: dict[str, str] = {}
    for part in raw.split("&") if raw else ():
        if not part:
            continue
        name_raw, _, value_raw = part.partition("=")
        name = decode_segment(name_raw.replace("+", " "))
        value = decode_segment(value_raw.replace("+", " "))
        if name not in known:
            raise HTTPError(400, "invalid_request", f"unknown query parameter {name[:100]!r}")
        if name in out:
            raise HTTPError(400, "invalid_request", f"query parameter {name!r} given twice")
        out[name] = value
    for param in route.query:
        if param.get("required") and param["name"] not in out:
            raise HTTPError(400, "invalid_request",
                            f"query parameter {param['name']!r} is required")
    return out


def int_param(query: Mapping[str, str], name: str, default: int | None) -> int | None:
    if name not in query:
        return default
    text = query[name]
    if not text.isascii() or not text.lstrip("-").isdigit() or len(text) > 18:
        raise HTTPError(400, "invalid_request", f"{name} must be an integer")
    return int(text)


def bool_param(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise HTTPError(400, "invalid_request", f"{name} must be true or false")
    return value in ("true", "1")


# ---------------------------------------------------------------------------- server ----


class Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its open connections, for a graceful stop."""

    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = kvmem_cli.LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], api: Api, token: str) -> None:
        self.api = api
        self.token = token
        self.bind_host = address[0]
        self.allowed_hosts = api.store.config.allowed_hosts
        self.stopping = False
        self.lock = threading.Lock()
        self.handlers: set[Handler] = set()
        self.woken: set[Handler] = set()  # idle handlers stop() shut the reading side of
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr for any exception in a handler; a
        # client that hangs up mid-request is routine, anything else is logged as a bug.
        kind = sys.exc_info()[0]
        if kind is not None and issubclass(kind, ConnectionError | TimeoutError):
            log.debug("client %s went away: %s", client_address, kind.__name__)
            return
        log.exception("unexpected error serving %s", client_address)

    def stop(self) -> None:
        """Stop accepting, close idle keep-alive connections, wait for in-flight requests."""
        self.shutdown()  # serve_forever returns: no new connections are accepted
        with self.lock:
            self.stopping = True  # before the idle ones are picked: see parse_request()
            idle = [h for h in self.handlers if not h.in_request]
            self.woken.update(idle)
        for handler in idle:  # a handler waiting for its next request sees EOF and ends
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RD)
        self.server_close()  # joins every handler thread


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    # Answer even an unparsable request line with a status line and headers, not the
    # bare body of HTTP/0.9.
    default_request_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each response waits ~40 ms for a delayed ACK
    server_version = "kvmem"
    in_request = False
    body_consumed = False
    _headers_buffer: list[bytes]  # BaseHTTPRequestHandler's, filled by send_header()

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.handlers.add(self)

    def finish(self) -> None:
        with self.server.lock:
            self.server.handlers.discard(self)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self.dispatch()

    do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # http.server's own errors (bad request line, headers too long, unknown method,
        # HTTP/2.0...) in our shape, and never a 5xx: each of them is the client's doing.
        self.close_connection = True
        status = code if code < 500 else 405 if code == 501 else 400
        code_name = "method_not_allowed" if status == 405 else "invalid_request"
        self.respond(status, error_body(code_name, message or "bad request",
                                        new_request_id()), {})

    def parse_request(self) -> bool:
        # A request line has arrived: busy from here on, before its headers are read.
        # stop() sets stopping before it picks the idle handlers, so one that still reads
        # False here is not among them.  One that reads True and was picked may find its
        # reads cut short: it answers nothing (the client sees the connection close, as
        # for any request the server did not take) rather than a 400 for a cut body.
        self.in_request = True
        if self.server.stopping:
            with self.server.lock:
                if self in self.server.woken:
                    self.close_connection = True
                    return False
        return super().parse_request()

    def dispatch(self) -> None:
        # Plain attribute writes, atomic under the GIL, in the order stop() relies on:
        # no lock on the hot path (16 threads contending for one costs a futex each).
        self.in_request = True
        self.body_consumed = False
        request_id = new_request_id()
        started = time.monotonic()
        try:
            status, body, headers = self.handle_api(request_id)
        except HTTPError as exc:
            status, body, headers = exc.status, error_body(exc.code, str(exc), request_id), \
                exc.headers
        except kvmem.KvmemError as exc:
            status = STATUS_BY_CODE.get(exc.code, 500)
            extra: dict[str, Any] = {}
            if isinstance(exc, kvmem.VersionConflictError):
                extra["current_version"] = exc.current_version
                if exc.op_index is not None:
                    extra["op_index"] = exc.op_index
            body, headers = error_body(exc.code, str(exc), request_id, **extra), {}
            if isinstance(exc, kvmem.BusyError):
                headers = {"Retry-After": "1"}
        except Exception:
            log.exception("request %s %s %s failed", request_id, self.command, self.path[:200])
            status, headers = 500, {}
            body = error_body("internal", "internal error; see the server log for request "
                                          f"id {request_id}", request_id)
        if not self.body_consumed and self.headers.get("Content-Length", "0").strip() != "0":
            # Answered before reading the body (no route, no auth...): the unread bytes
            # would be taken for the next request, so this connection ends here.
            self.close_connection = True
        self.respond(status, body, {"X-Request-Id": request_id, **headers})
        log.debug("%s %s %s -> %d in %.1f ms", request_id, self.command, self.path[:200],
                  status, (time.monotonic() - started) * 1000)
        self.in_request = False
        if self.server.stopping:  # read after in_request is cleared: see stop()
            self.close_connection = True

    def handle_api(self, request_id: str) -> tuple[int, Any, dict[str, str]]:
        raw_path, _, raw_query = self.path.partition("?")
        refusal = kvmem_cli.request_refusal(self.headers.get("Host", ""),
                                            self.headers.get("Origin"), self.server.bind_host,
                                            self.server.allowed_hosts)
        if refusal is not None:
            self.close_connection = True
            raise HTTPError(*refusal)
        if not self.path.isascii():  # the request line arrives decoded as Latin-1
            raise HTTPError(400, "invalid_request", "the request target must be ASCII "
                            "(percent-encode UTF-8)")
        if len(self.headers.get_all("Content-Length") or ()) > 1:
            self.close_connection = True
            raise HTTPError(400, "invalid_request", "more than one Content-Length")
        if not raw_path.startswith("/"):
            raise HTTPError(400, "invalid_request", "the request target must be a path")
        route, key = match_route(self.command, raw_path)
        if route.auth and self.server.token and not kvmem_cli.bearer_ok(
                self.headers.get("Authorization"), self.server.token):
            self.close_connection = True  # the body, if any, is left unread
            raise HTTPError(401, "unauthorized", kvmem_cli.UNAUTHORIZED,
                            headers={"WWW-Authenticate": "Bearer"})
        query = parse_query(raw_query, route)
        body = self.read_body(route)
        status, payload = route.handler(self.server.api, key, query, body)
        return status, payload, {}

    def read_body(self, route: Route | None) -> Any:
        """The JSON body (None when the route takes none).  Checks Content-Length (411,
        413), Content-Type (415), UTF-8 and JSON (400)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "length_required", "send the body with Content-Length, "
                            "not Transfer-Encoding")
        length_text = self.headers.get("Content-Length", "0").strip()
        if not length_text.isdigit() or len(length_text) > 12:
            self.close_connection = True
            raise HTTPError(400, "invalid_request", "bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # not reading it: the connection can't be reused
            raise HTTPError(413, "payload_too_large",
                            f"body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        raw = self.rfile.read(length) if length else b""
        if len(raw) != length:
            self.close_connection = True
            raise HTTPError(400, "invalid_request", "the body ended early")
        self.body_consumed = True
        if route is None:
            return None
        if route.body is None:
            if raw.strip():
                raise HTTPError(400, "invalid_request",
                                f"{route.method} {route.path} takes no body")
            return None
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in JSON_TYPES:
            raise HTTPError(415, "unsupported_media_type", "the body must be application/json")
        try:
            text = raw.decode("utf-8")
            return json.loads(text, parse_constant=_refuse_constant)
        except UnicodeDecodeError:
            raise HTTPError(400, "invalid_request", "the body is not valid UTF-8") from None
        except (ValueError, RecursionError) as exc:
            raise HTTPError(400, "invalid_request", f"the body is not valid JSON: {exc}") from None

    def respond(self, status: int, body: Any, headers: Mapping[str, str]) -> None:
        data = json.dumps(body, ensure_ascii=False, allow_nan=False,
                          default=str).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            # Head and body in one write (end_headers() would send the head alone): one
            # system call, one segment.
            self._headers_buffer.append(b"\r\n")
            if self.command != "HEAD":
                self._headers_buffer.append(data)
            self.flush_headers()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def new_request_id() -> str:
    """12 hex digits to find a request in the log.  Not a secret, so no system call:
    ``uuid4`` reads ``os.urandom``, and every system call lets another thread take the GIL."""
    return f"{random.getrandbits(48):012x}"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# ------------------------------------------------------------------------------- main ----


def build_server(store: kvmem.Store, host: str, port: int, token: str) -> Server:
    """The server, bound and ready for ``serve_forever()``; see ``check_exposure``."""
    kvmem_cli.check_exposure(host, token)
    return Server((host, port), Api(store), token)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmem-http", description="kvmem's HTTP JSON API")
    args = kvmem_cli.parse_server_args(parser, argv, exclude=("mcp_port",))
    try:
        config = kvmem_cli.server_config(args)
        store = kvmem.Store.open(config=config, role="http", decay=True)
    except (kvmem.KvmemError, OSError) as exc:
        print(f"kvmem-http: {exc}", file=sys.stderr)
        return 2
    try:
        server = build_server(store, config.host, config.port, config.token)
    except (kvmem.KvmemError, OSError) as exc:
        store.close()
        print(f"kvmem-http: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    host, port = str(server.server_address[0]), int(server.server_address[1])
    log.info("kvmem-http listening on http://%s:%d pid=%d db=%s settings=%s recovery=%s",
             host, port, os.getpid(), store.path, json.dumps(store.settings()),
             json.dumps(dataclasses.asdict(kvmem.recovery_record(store.path) or
                                           _no_record(store.path))))
    print(f"listening on http://{host}:{port}", flush=True)
    serving = threading.Thread(target=server.serve_forever, name="kvmem-http-accept")
    serving.start()
    while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
        pass
    log.info("stopping: finishing in-flight requests")
    server.stop()
    serving.join()
    store.close()
    log.info("stopped cleanly")
    return 0


def _no_record(path: str) -> kvmem.RecoveryRecord:
    return kvmem.RecoveryRecord(path, 0, "skipped", "skipped", None, None, 0.0)


if __name__ == "__main__":
    sys.exit(main())
