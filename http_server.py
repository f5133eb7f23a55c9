"""kvmem's HTTP JSON API: stdlib ``http.server`` over ``kvmem.Store``.

Thin by design: parse and validate the request, call the Store, render the result.  One
route table (``ROUTES``) drives both dispatch and ``GET /openapi.json``, so the published
description cannot drift from what the server does.  Errors are translated here and only
here: a ``KvmemError``'s ``code`` picks the status, and every error body has one shape,
``{"error": {"code": ..., "message": ..., "request_id": ...}}``.  A memory's answer carries
its version as ``ETag``; If-Match is another spelling of ``if_version``.  Every answer,
the loop's own refusals included, is one line of the access log (``log_access``).

Threads: one event loop reads requests whole and a bounded pool of workers runs them
(``Server``; parsing and error shapes are ``http.server``'s); so clients that hold
connections open, or send slowly, cost a socket and never a thread, and every resource
has a bound (``Config.http_*``).  Reads borrow pooled connections, writes go through the
Store's group commit, so a response is sent only after its COMMIT returned.
SIGINT/SIGTERM: stop accepting, close connections with no request in flight, let the
requests in flight finish (at most ``shutdown_grace_s``), stop the background threads,
checkpoint, exit 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import functools
import http
import http.client
import http.server
import importlib.resources
import io
import json
import logging
import math
import os
import queue
import random
import re
import resource
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple
from urllib.parse import quote, unquote_to_bytes

import kvmem
import kvmem_cli

log = logging.getLogger("kvmem.http")
# One line per answer, at INFO (``log_access``); silenced with the logger's level (for
# instance --log-level WARNING).
access_log = logging.getLogger("kvmem.http.access")

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


class Request(NamedTuple):
    """What a route handler gets: the decoded key ("" on a route without ``{key}``), the
    query, the JSON body (None when the route takes none) and the precondition of the
    request's If-Match or If-None-Match header (``parse_preconditions``)."""

    key: str
    query: Query
    body: Any
    precondition: int | str | None = None  # a version (0: absent), ANY_VERSION, or none


class Api:
    """Route handlers: each takes a ``Request`` and returns (status, JSON body).
    Requests become kvmem ops (``SetOp.parse`` and the rest), checked by kvmem itself."""

    def __init__(self, store: kvmem_cli.AnyStore) -> None:
        self.store = store
        self.batch_body = batch_body(store.config)  # built once, not per request

    def put_memory(self, request: Request) -> tuple[int, Any]:
        key, query, body = request.key, request.query, request.body
        if not isinstance(body, dict):
            raise HTTPError(400, "invalid_request", "the body must be a JSON object")
        namespace = query.get("namespace", "default")
        given: dict[str, Any] = {"key": key, "namespace": namespace}
        precondition = one_precondition(request.precondition, "if_version" in body,
                                        body.get("if_version"), "the body's if_version")
        if isinstance(precondition, int) and "if_version" not in body:
            given["if_version"] = precondition
        op_class = SetIfPresent if precondition == ANY_VERSION else kvmem.SetOp
        memory: kvmem.Memory = self.store.apply(op_class.parse(body, self.store.config,
                                                               **given))
        return (201 if memory.version == 1 else 200), memory.render(self.store.clock())

    def get_memory(self, request: Request) -> tuple[int, Any]:
        namespace = request.query.get("namespace", "default")
        memory = self.store.get(request.key, namespace=namespace)
        if memory is None:
            raise memory_not_found(request.key, namespace)
        return 200, memory.render(self.store.clock())

    def delete_memory(self, request: Request) -> tuple[int, Any]:
        namespace = request.query.get("namespace", "default")
        if_version = int_param(request.query, "if_version", None)
        precondition = one_precondition(request.precondition, if_version is not None,
                                        if_version, "the query's if_version")
        if isinstance(precondition, int):
            if_version = precondition
        op_class = DeleteIfPresent if precondition == ANY_VERSION else kvmem.DeleteOp
        deleted = self.store.apply(op_class.parse({"if_version": if_version},
                                                  self.store.config, key=request.key,
                                                  namespace=namespace))
        if not deleted:
            raise memory_not_found(request.key, namespace)
        return 200, {"deleted": True}

    def reinforce_memory(self, request: Request) -> tuple[int, Any]:
        namespace = request.query.get("namespace", "default")
        try:
            memory = self.store.reinforce(request.key, namespace=namespace)
        except kvmem.NotFoundError as exc:  # the library's words: this layer says it once
            raise memory_not_found(request.key, namespace) from exc
        return 200, memory.render(self.store.clock())

    def list_memories(self, request: Request) -> tuple[int, Any]:
        query = request.query
        page = self.store.list(
            namespace=query.get("namespace", "default"), **filter_args(query),
            archived=bool_param(query, "archived"),
            limit=int_param(query, "limit", 100) or 0, cursor=query.get("cursor"),
        )
        now = self.store.clock()
        return 200, {"items": [m.render(now) for m in page.items],
                     "next_cursor": page.next_cursor}

    def search(self, request: Request) -> tuple[int, Any]:
        query = request.query
        namespaces = query.getall("namespace")  # one is a name or "*", several a list
        hits = self.store.search(query["q"], namespace=namespaces[0] if len(namespaces) == 1
                                 else namespaces or "default", **filter_args(query),
                                 limit=int_param(query, "limit", 20) or 0)
        now = self.store.clock()
        return 200, {"items": [{**h.memory.render(now), "score": h.score} for h in hits]}

    def batch(self, request: Request) -> tuple[int, Any]:
        fields = check_body(request.body, self.batch_body)
        results = self.store.batch(fields["ops"],
                                   namespace=request.query.get("namespace", "default"))
        now = self.store.clock()
        return 200, {"results": [{**r, "memory": r["memory"].render(now)} if "memory" in r
                                 else r for r in results]}

    def namespaces(self, request: Request) -> tuple[int, Any]:
        return 200, {"items": self.store.namespaces()}

    def stats(self, request: Request) -> tuple[int, Any]:
        return 200, self.store.stats()

    def forget_memories(self, request: Request) -> tuple[int, Any]:
        query = request.query
        return 200, self.store.forget(namespace=query.get("namespace", "default"),
                                      **filter_args(query),
                                      dry_run=bool_param(query, "dry_run"))

    def healthz(self, request: Request) -> tuple[int, Any]:
        health = self.store.health()
        return (200 if health["ok"] else 503), health

    def openapi(self, request: Request) -> tuple[int, Any]:
        return 200, openapi_document(self.store.config)


def memory_not_found(key: str, namespace: str) -> kvmem.NotFoundError:
    """The one 404 of a memory, whichever route looked for it."""
    return kvmem.NotFoundError(f"no memory {key!r} in namespace {namespace!r}")


# -- preconditions: If-Match and If-None-Match, another spelling of if_version ------------

ANY_VERSION = "*"  # If-Match: * -- the memory exists, at any version


def etag(version: int) -> str:
    """A memory's entity tag: its version, quoted.  A strong validator while the memory
    lives (a version names one content of it); a key deleted and created again starts
    at version 1 again, so a tag from before the delete can match the new memory."""
    return f'"{version}"'


ETAG_VALUE = re.compile(r'"(0|[1-9][0-9]{0,17})"')  # as etag() writes it: "01" is not "1"


def parse_preconditions(if_match: list[str], if_none_match: list[str],
                        route: Route) -> int | str | None:
    """The version a request's If-Match (``"N"``: version N; ``*``: it exists) or
    If-None-Match (``*`` only: it is absent, version 0) requires, or None.  On a route that
    does not honour them they are refused (a write must not drop its condition), except on
    GET, where answering in full is always correct."""
    if not if_match and not if_none_match:
        return None
    if route.method == "GET":
        return None
    for name, values in (("If-Match", if_match), ("If-None-Match", if_none_match)):
        if values and name not in route.preconditions:
            honoured = " and ".join(f"{r.method} {r.path}" for r in ROUTES
                                    if name in r.preconditions)
            raise HTTPError(400, "invalid_request", f"{name} is honoured on {honoured} only")
    if if_match and if_none_match:
        raise HTTPError(400, "invalid_request", "send If-Match or If-None-Match, not both")
    if if_none_match:
        if ",".join(if_none_match).strip() != "*":
            raise HTTPError(400, "invalid_request", "If-None-Match takes only * here (write "
                            "only if the memory is absent)")
        return 0
    text = ",".join(if_match).strip()
    if text == "*":
        return ANY_VERSION
    if "," in text:
        raise HTTPError(400, "invalid_request", "If-Match takes one ETag (a memory has one "
                        "version) or *")
    found = ETAG_VALUE.fullmatch(text)
    if found is None:
        raise HTTPError(400, "invalid_request", 'If-Match must be an ETag this server sent '
                        '(the version in double quotes, such as "3") or *; weak ETags (W/) '
                        f"never match: got {text[:50]!r}")
    version = int(found[1])
    if version == 0:
        raise HTTPError(400, "invalid_request", 'If-Match "0" names no version (they start at '
                        "1); to write only if the memory is absent, send If-None-Match: *")
    return version


def one_precondition(header: int | str | None, given: bool, field: Any,
                     field_name: str) -> int | str | None:
    """The precondition of a request that may carry both a header (``header``, from
    ``parse_preconditions``) and an ``if_version`` field (``given``: present, with value
    ``field``): either one, or both saying the same version; anything else is a 400."""
    if header is None:
        return None  # the field (if any) goes to kvmem, which checks it
    if not given:
        return header
    if header == ANY_VERSION or not (type(field) is int and field == header):
        shown = ("If-None-Match: *" if header == 0 else "If-Match: *" if header == ANY_VERSION
                 else f"If-Match: {etag(int(header))}")
        raise HTTPError(400, "invalid_request", f"{shown} and {field_name} "
                        f"{json.dumps(field)[:50]} disagree; send one of them")
    return header


def _require_present(current: kvmem.Memory | None, now: float, key: str) -> None:
    if current is None or current.is_expired(now):  # as for if_version: archived counts
        raise kvmem.VersionConflictError(f"{key!r} is absent; If-Match: * needs it to exist",
                                         current_version=0, key=key)


@dataclasses.dataclass(frozen=True)
class SetIfPresent(kvmem.SetOp):
    """A set under ``If-Match: *``: only if the memory exists (an expired one does not, an
    archived one does, as for ``if_version``); checked in the same transaction."""

    def plan(self, current: kvmem.Memory | None, now: float) -> tuple[kvmem.Memory,
                                                                      kvmem.Memory]:
        _require_present(current, now, self.key)
        return super().plan(current, now)


@dataclasses.dataclass(frozen=True)
class DeleteIfPresent(kvmem.DeleteOp):
    """A delete under ``If-Match: *``: a conflict, not a 404, when the memory is absent."""

    def plan(self, current: kvmem.Memory | None, now: float) -> tuple[None, bool]:
        _require_present(current, now, self.key)
        return super().plan(current, now)


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

# A query parameter is its OpenAPI description; its "schema" may be a function of the
# Config (kvmem's own definitions, with the store's limits).  One with "explode" may be
# repeated (name=a&name=b: every value counts); any other may be given once.
NAMESPACE_PARAM = {"name": "namespace", "schema": {"type": "string", "default": "default"},
                   "description": "1-64 of A-Z a-z 0-9 . _ -"}
SEARCH_NAMESPACE_PARAM = {
    "name": "namespace", "schema": kvmem.search_namespaces_schema, "style": "form",
    "explode": True, "description": "where to search: a namespace, several "
    "(namespace=a&namespace=b), or * for all; default \"default\""}


def _filter_param(name: str, filter_name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "schema": lambda config: kvmem.filter_schemas(config)[filter_name],
            **extra}


# The words every boolean query parameter takes (``bool_param``: any case), and their
# values: the words of kvmem's boolean settings (KVMEM_QUICK_CHECK=off).
BOOLEAN_WORDS = kvmem.BOOLEAN_WORDS
BOOLEAN_TEXT = f"one of {', '.join(BOOLEAN_WORDS)} (any case)"
_TIME_TEXT = ("Unix seconds (a decimal number) or an RFC 3339 time with a zone, "
              "percent-encoded (a '+' is %2B)")
FILTER_PARAMS = (
    _filter_param("tag", "tags", style="form", explode=True,
                  description="repeat for several (tag=a&tag=b): only memories holding all "
                              "of them"),
    _filter_param("prefix", "prefix"),
    _filter_param("updated_after", "updated_after",
                  description=f"only memories updated after this (exclusive): {_TIME_TEXT}"),
    _filter_param("updated_before", "updated_before",
                  description=f"only memories updated before this (exclusive): {_TIME_TEXT}"),
)


class Query(dict[str, str]):
    """A request's query parameters (``parse_query``): the value of each name given once,
    and every value of a repeatable one (``getall``)."""

    def __init__(self) -> None:
        super().__init__()
        self.repeated: dict[str, list[str]] = {}

    def getall(self, name: str) -> list[str]:
        return self.repeated.get(name, [])


RouteHandler = Callable[[Api, Request], tuple[int, Any]]


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
    preconditions: tuple[str, ...] = ()  # the request headers of PRECONDITION_HEADERS it honours


def set_body(config: kvmem.Config) -> dict[str, Any]:
    return kvmem.SetOp.schema(config, exclude=("namespace", "key"))


def batch_body(config: kvmem.Config) -> dict[str, Any]:
    return {"type": "object", "required": ["ops"], "additionalProperties": False,
            "properties": {"ops": {"type": "array", "minItems": 1,
                                   "maxItems": config.max_batch_ops,
                                   "items": kvmem.batch_op_schema(config)}}}


# The request headers a route may honour (``Route.preconditions``), as OpenAPI parameters.
PRECONDITION_HEADERS: dict[str, dict[str, Any]] = {
    "If-Match": {"name": "If-Match", "in": "header", "schema": {"type": "string"},
                 "description": "the ETag of a memory's response (\"3\"): only if it is at "
                 "that version, as if_version=3; *: only if it exists (archived counts, "
                 "expired does not).  A mismatch is 409 version_conflict, as for if_version. "
                 "With if_version as well, both must say the same version"},
    "If-None-Match": {"name": "If-None-Match", "in": "header", "schema": {"const": "*"},
                      "description": "*: only if the memory is absent, as if_version=0"},
}

# Headers of a response whose body is a memory, as OpenAPI documents them.
ETAG_HEADER = {"description": "the memory's version, quoted (\"3\"): send it back in "
                              "If-Match to write only that version",
               "schema": {"type": "string", "pattern": '^"[0-9]+"$'}}
LOCATION_HEADER = {"description": "the created memory's path, its key percent-encoded "
                                  "(with ?namespace= unless it is \"default\")",
                   "schema": {"type": "string"}}


def memory_path(key: str, namespace: str) -> str:
    """The path (and query, outside the default namespace) that reads a memory."""
    path = "/v1/memories/" + quote(key, safe="")
    return path if namespace == "default" else f"{path}?namespace={quote(namespace, safe='')}"


def response_headers(status: int, schema: str | None, body: Any) -> dict[str, str]:
    """The headers a response of ``schema`` carries besides the usual ones: a memory's
    ETag, and a created memory's Location (documented by ``documented_headers``)."""
    if schema != "Memory":
        return {}
    headers = {"ETag": etag(body["version"])}
    if status == 201:
        headers["Location"] = memory_path(body["key"], body["namespace"])
    return headers


def documented_headers(status: int, schema: str) -> dict[str, Any]:
    """OpenAPI's description of ``response_headers(status, schema, ...)``."""
    if schema != "Memory":
        return {}
    return {"ETag": ETAG_HEADER, **({"Location": LOCATION_HEADER} if status == 201 else {})}


# Any route can answer these: bad input, auth, wrong method, body rules, busy database.
COMMON_ERRORS = {400: "Error", 401: "Error", 405: "Error", 411: "Error", 413: "Error",
                 415: "Error", 503: "Error"}

ROUTES: tuple[Route, ...] = (
    Route("PUT", "/v1/memories/{key}", Api.put_memory, "Create or replace a memory",
          query=(NAMESPACE_PARAM,), body=set_body,
          responses={200: "Memory", 201: "Memory", 409: "Error", 413: "Error", 415: "Error",
                     507: "Error", **COMMON_ERRORS},
          preconditions=("If-Match", "If-None-Match")),
    Route("GET", "/v1/memories/{key}", Api.get_memory, "Read a live memory",
          query=(NAMESPACE_PARAM,), responses={200: "Memory", 404: "Error", **COMMON_ERRORS}),
    Route("DELETE", "/v1/memories/{key}", Api.delete_memory, "Delete a memory",
          query=(NAMESPACE_PARAM, {"name": "if_version", "schema": {"type": "integer",
                                                                    "minimum": 0}}),
          responses={200: "Deleted", 404: "Error", 409: "Error", 507: "Error", **COMMON_ERRORS},
          preconditions=("If-Match",)),
    Route("POST", "/v1/memories/{key}/reinforce", Api.reinforce_memory,
          "Strengthen a memory and restart its decay; restores an archived one",
          query=(NAMESPACE_PARAM,),
          responses={200: "Memory", 404: "Error", 507: "Error", **COMMON_ERRORS}),
    Route("GET", "/v1/memories", Api.list_memories, "List memories in key order",
          query=(NAMESPACE_PARAM, *FILTER_PARAMS,
                 {"name": "archived", "schema": {"type": "boolean", "default": False},
                  "description": "archived (faded) memories instead of live ones; "
                                 f"{BOOLEAN_TEXT}"},
                 {"name": "limit", "schema": {"type": "integer", "minimum": 1,
                                              "maximum": kvmem.MAX_LIST_LIMIT, "default": 100}},
                 {"name": "cursor", "schema": {"type": "string"}}),
          responses={200: "MemoryList", **COMMON_ERRORS}),
    Route("DELETE", "/v1/memories", Api.forget_memories,
          "Forget in bulk: delete every memory of the namespace (live, archived or expired) "
          "that the filters select; a prefix or a tag is required.  Walks the namespace in "
          "key order, prune_batch memories a transaction; "
          "memories; with dry_run=true it only reports",
          query=(NAMESPACE_PARAM, *FILTER_PARAMS,
                 {"name": "dry_run", "schema": {"type": "boolean", "default": False},
                  "description": f"report what would be deleted, delete nothing; {BOOLEAN_TEXT}"}),
          responses={200: "ForgetReport", 507: "Error", **COMMON_ERRORS}),
    Route("GET", "/v1/search", Api.search, "Full-text search, ranked by BM25 x current strength",
          query=(SEARCH_NAMESPACE_PARAM,
                 {"name": "q", "required": True, "schema": {"type": "string"}}, *FILTER_PARAMS,
                 {"name": "limit", "schema": {"type": "integer", "minimum": 1,
                                              "maximum": kvmem.MAX_SEARCH_LIMIT, "default": 20}}),
          responses={200: "SearchResults", **COMMON_ERRORS}),
    Route("GET", "/v1/namespaces", Api.namespaces,
          "The namespaces that hold memories, in name order, with live and archived counts",
          responses={200: "NamespaceList", **COMMON_ERRORS}),
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
    "NamespaceList": kvmem_cli.NAMESPACE_LIST_SCHEMA,
    "Deleted": {"type": "object", "required": ["deleted"],
                "properties": {"deleted": {"const": True}}},
    "BatchResults": {"type": "object", "required": ["results"], "properties": {
        "results": {"type": "array", "items": {"type": "object", "required": ["op"],
                                               "properties": {
            "op": {"enum": list(kvmem.BATCH_OPS)},
            "memory": {"$ref": "#/components/schemas/Memory"},
            "deleted": {"type": "boolean"}}}}}},
    "Allow": {"type": "object", "required": ["allow"], "properties": {
        "allow": {"type": "array", "items": {"type": "string"}}}},
    "ForgetReport": {"type": "object", "required": ["dry_run", "matched", "deleted", "keys",
                                                    "more"], "properties": {
        "dry_run": {"type": "boolean"},
        "matched": {"type": "integer", "description": "memories selected"},
        "deleted": {"type": "integer", "description": "memories deleted (0 on a dry run)"},
        "keys": {"type": "array", "items": {"type": "string"},
                 "description": f"the first {kvmem.FORGET_SAMPLE} selected keys, in key order"},
        "more": {"type": "boolean", "description": "whether more keys were selected than "
                                                   "listed"}}},
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
        parameters += [{"in": "query", "required": False, **p,
                        "schema": p["schema"](config) if callable(p["schema"]) else p["schema"]}
                       for p in route.query]
        parameters += [{"required": False, **PRECONDITION_HEADERS[name]}
                       for name in route.preconditions]
        operation: dict[str, Any] = {
            "operationId": route.handler.__name__, "summary": route.summary,
            "parameters": parameters,
            "responses": {str(status): {
                "description": schema,
                **({"headers": headers} if (headers := documented_headers(status, schema))
                   else {}),
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
        if route.method == "GET":  # HEAD: the same answer without its body
            paths[route.path]["head"] = {
                **operation, "operationId": f"{route.handler.__name__}_head",
                "summary": f"{route.summary} (headers only)"}
    for path, operations in paths.items():
        allow = allowed_methods(r for r in ROUTES if r.path == path)
        operations["options"] = {
            "operationId": "options_" + re.sub(r"\W+", "_", path).strip("_"),
            "summary": f"The methods of this path in Allow ({allow}); no token needed, as "
                       "for a CORS preflight",
            "parameters": [],
            "responses": {"200": {"description": "Allow", "headers": {"Allow": {
                "schema": {"type": "string"}}}, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Allow"}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvmem", "version": "1",
                 "description": "Durable key-value memory for AI agents. Every error is "
                                "{\"error\": {\"code\", \"message\", \"request_id\"}}."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def allowed_methods(routes: Iterable[Route]) -> str:
    """The Allow header of a path served by ``routes``: theirs, HEAD with GET, OPTIONS."""
    methods = {route.method for route in routes} | {"OPTIONS"}
    return ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))


def match_route(method: str, raw_path: str) -> tuple[Route, str | None]:
    """The route for ``method`` (HEAD is GET without the body) and a raw (still
    percent-encoded) path, and the decoded key.  Raises HTTPError 404 (no such path) or 405
    (path exists, method does not)."""
    candidates = path_routes(method, raw_path)
    for route, key in candidates:
        if route.method == ("GET" if method == "HEAD" else method):
            return route, key
    allowed = allowed_methods(r for r, _ in candidates)
    raise HTTPError(405, "method_not_allowed", f"{method} is not allowed here; use {allowed}"
                    + slash_hint(method, raw_path), headers={"Allow": allowed})


def path_routes(method: str, raw_path: str) -> list[tuple[Route, str | None]]:
    """The routes whose path matches a raw path, each with the decoded key; HTTPError 404
    when there is none."""
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
        raise HTTPError(404, "not_found", f"no such path: {raw_path[:200]}"
                        + slash_hint(method, raw_path))
    return candidates


MEMORY_PREFIX = "/v1/memories/"


def slash_hint(method: str, raw_path: str) -> str:
    """For a path under /v1/memories/ that would be a memory's had its key's '/' been sent
    as %2F: a hint that says so, with that path (else "")."""
    rest = raw_path[len(MEMORY_PREFIX):] if raw_path.startswith(MEMORY_PREFIX) else ""
    parts = rest.split("/")
    if method == "POST" and len(parts) > 2 and parts[-1] == "reinforce":
        parts, suffix = parts[:-1], "/reinforce"
    elif method in ("GET", "PUT", "DELETE") and len(parts) > 1:
        suffix = ""
    else:
        return ""
    if not any(parts):
        return ""
    path = MEMORY_PREFIX + "%2F".join(parts) + suffix
    return f"; a key containing '/' must be sent as %2F: {path[:200]}"


def decode_segment(segment: str, what: str = "the key") -> str:
    """Strict percent-decoding of one path segment (or query part: ``what`` names it in
    the error) to UTF-8 text (400 on garbage)."""
    for i, ch in enumerate(segment):
        if ch == "%" and not (len(segment) >= i + 3 and all(
                c in "0123456789abcdefABCDEF" for c in segment[i + 1:i + 3])):
            raise HTTPError(400, "invalid_request", f"bad percent-encoding in {what}")
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid_request", f"{what} is not valid UTF-8") from None


def parse_query(raw: str, route: Route) -> Query:
    """Strictly parsed query parameters: known names only; a repeatable one (``explode``)
    as often as given, every value kept in order; any other at most once (a second value
    is refused, never dropped)."""
    params = {p["name"]: p for p in route.query}
    out = Query()
    for part in raw.split("&") if raw else ():
        if not part:
            continue
        name_raw, _, value_raw = part.partition("=")
        name = decode_segment(name_raw.replace("+", " "), "a query parameter's name")
        value = decode_segment(value_raw.replace("+", " "), f"query parameter {name[:100]!r}")
        param = params.get(name)
        if param is None:
            hint = ""
            if name == "namespace":  # every other route takes one: say why this one does not
                hint = (f": {route.method} {route.path} is not per namespace (GET "
                        "/v1/namespaces counts the memories of each)")
            raise HTTPError(400, "invalid_request",
                            f"unknown query parameter {name[:100]!r}{hint}")
        if param.get("explode"):
            out.repeated.setdefault(name, []).append(value)
        elif name in out:
            raise HTTPError(400, "invalid_request", f"query parameter {name!r} given twice")
        else:
            out[name] = value
    for param in route.query:
        if param.get("required") and param["name"] not in out \
                and not out.getall(param["name"]):
            raise HTTPError(400, "invalid_request",
                            f"query parameter {param['name']!r} is required")
    return out


UNIX_SECONDS = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def time_param(query: Query, name: str) -> float | str | None:
    """A time filter: a decimal number is Unix seconds; anything else goes to kvmem as an
    RFC 3339 time, and kvmem checks both."""
    text = query.get(name)
    if text is None:
        return None
    return float(text) if UNIX_SECONDS.fullmatch(text) else text


def filter_args(query: Query) -> dict[str, Any]:
    """The filters of ``list`` and ``search`` (``kvmem.Filters``) from FILTER_PARAMS."""
    return {"tags": query.getall("tag"), "prefix": query.get("prefix"),
            "updated_after": time_param(query, "updated_after"),
            "updated_before": time_param(query, "updated_before")}


INTEGER = re.compile(r"-?[0-9]{1,18}")


def int_param(query: Mapping[str, str], name: str, default: int | None) -> int | None:
    if name not in query:
        return default
    text = query[name]
    if not INTEGER.fullmatch(text):
        raise HTTPError(400, "invalid_request", f"{name} must be an integer")
    return int(text)


def bool_param(query: Mapping[str, str], name: str, default: bool = False) -> bool:
    """A boolean query parameter: one of BOOLEAN_WORDS in any case, else a 400 naming it."""
    if name not in query:
        return default
    value = BOOLEAN_WORDS.get(query[name].lower())
    if value is None:
        raise HTTPError(400, "invalid_request", f"query parameter {name!r} must be "
                        f"{BOOLEAN_TEXT}; got {query[name][:50]!r}")
    return value


# ---------------------------------------------------------------------------- server ----
#
# One event-loop thread owns every client socket and reads until a request is whole: its
# line and headers, then as many body bytes as Content-Length says.  Only then does a
# worker (one of ``http_workers`` threads) run it, from those bytes, and send the answer;
# what the socket does not take at once, the loop sends.  So a worker never waits for a
# client: an idle connection, a slow one (slowloris) or one whose body never comes costs
# a socket and its buffer, never a thread, and is closed at its deadline (idle, header,
# body).  Connections are capped (``http_max_connections``; at the cap the longest-idle
# one is closed, as nginx reuses keep-alive connections, else accepting pauses and new
# ones wait in the listen backlog); request bodies held in memory are capped
# (``http_buffer_bytes``; past it a request waits its turn, unread).

MAX_HEAD_BYTES = 64 * 1024  # a request line and headers, as http.server's longest line
RECV_BYTES = 64 * 1024
SCAN_S = 0.1  # how often the loop looks for connections past their deadline
ACCEPT_RETRY_S = 0.1  # after the process ran out of descriptors (EMFILE), try again then
RESERVED_FDS = 64  # descriptors kept for the database, logs and the loop itself

WORKER_WAIT_S = 0.002  # after an answer, how long a worker waits for the client's next request
LINGER_S = 2.0  # after a last answer, how long to read and drop what the client still sends
SMALL_BODY_BYTES = 16 * 1024  # a body this small is read at once, whatever the buffer holds

IDLE, HEAD, BODY, WAIT, WORK, SEND, LINGER = (
    "idle", "head", "body", "wait", "work", "send", "linger")


class Connection:
    """A client connection: owned by the loop, or by one worker while its request runs."""

    __slots__ = ("address", "body", "buf", "close_after", "deadline", "eof", "events", "head",
                 "head_end", "need", "out", "phase", "reserved", "since", "sock", "withheld")

    def __init__(self, sock: socket.socket, address: Any, now: float) -> None:
        self.sock, self.address = sock, address
        self.buf = bytearray()  # bytes read and not yet part of a request handed on
        self.phase, self.since, self.deadline = IDLE, now, math.inf
        self.events = 0  # what the loop's selector watches for (0: not registered)
        self.head_end = self.need = self.reserved = 0  # the request being read
        self.head = b""  # the request handed to a worker
        self.body: bytes | bytearray = b""
        self.out = b""  # the answer's bytes the socket has not taken yet
        self.close_after = False
        self.eof = False  # the client has ended its side: answer what it sent whole, then close
        self.withheld = False  # its body was not read: the request lacks the token


class Framing(NamedTuple):
    """What the loop needs of a request's head (``framing``)."""
    length: int | None  # of the body; None: the head goes on alone, to be refused
    continues: bool  # the client waits for 100 Continue before its body
    authorization: str | None  # the header, as the handler will see it (Latin-1)


def framing(head: bytes) -> Framing:
    """From a request's line and headers: the body's length, or None when the head must go
    on alone (the handler refuses it and the connection closes: a length that is not one
    plain number, two of them, Transfer-Encoding, one over MAX_BODY_BYTES); whether the
    client waits for ``100 Continue``; its Authorization.  A quick look, not the handler's
    full parse: where the two could differ (odd headers), the handler finds its body's
    length wrong and answers 400 with the connection closed, so no request can run into
    the next."""
    lines = head.split(b"\n")
    lengths: list[bytes] = []
    continues = False
    authorization: str | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.lower()
        if name == b"content-length":
            lengths.append(value.strip())
        elif name == b"transfer-encoding":
            return Framing(None, False, authorization)
        elif name == b"expect":
            continues = value.strip().lower() == b"100-continue"
        elif name == b"authorization" and authorization is None:
            authorization = value.strip().decode("latin-1")
    if len(lengths) > 1:
        return Framing(None, False, authorization)
    text = lengths[0] if lengths else b"0"
    if not text.isdigit() or len(text) > 12 or int(text) > MAX_BODY_BYTES:
        return Framing(None, False, authorization)
    words = lines[0].split()
    return Framing(int(text), continues and len(words) == 3 and words[2] >= b"HTTP/1.1",
                   authorization)


def head_end(buf: bytearray) -> int:
    """Where the first request's head ends, after its first empty line (CRLF or a bare LF,
    as ``http.client`` reads lines: ``\n\r\n`` also ends a CRLF head), or -1."""
    ends = [i + len(sep) for sep in (b"\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(ends, default=-1)


def plain_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None, *,
                   request_id: str | None = None) -> bytes:
    """A whole error answer that closes the connection, for the loop's own refusals."""
    body = json.dumps(error_body(code, message, request_id or new_request_id())).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
             "Content-Type: application/json; charset=utf-8", f"Content-Length: {len(body)}",
             "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=kvmem_cli.LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def connection_cap(wanted: int) -> int:
    """``wanted``, or fewer if the process may not open that many descriptors (raising
    its soft limit toward the hard one first, as servers do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    return max(1, min(wanted, soft - RESERVED_FDS)) if soft != resource.RLIM_INFINITY else wanted


class Server:
    """kvmem-http's server: the event loop (``serve_forever``) and the workers; see above.
    ``stop()`` (from another thread) stops accepting, closes connections with no request
    in flight, lets requests in flight finish and their answers go out for at most
    ``shutdown_grace_s``, closes the rest, and joins the workers."""

    def __init__(self, address: tuple[str, int], api: Api, token: str) -> None:
        config = api.store.config
        self.api, self.token, self.config = api, token, config
        self.bind_host = address[0]
        self.allowed_hosts = config.allowed_hosts
        self.cors_origins = frozenset(filter(None, config.cors_origins.split(",")))
        self.pages = page_files()
        self.max_connections = connection_cap(config.http_max_connections)
        self.socket = listen(*address)
        self.server_address = self.socket.getsockname()[:2]
        self.stopping = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._wake_lock = threading.Lock()
        self._returned: collections.deque[Connection] = collections.deque()
        self._jobs: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._conns: dict[int, Connection] = {}  # by file descriptor
        self._waiting: collections.deque[Connection] = collections.deque()  # for buffer room
        self._buffered = 0  # body bytes reserved by requests being read or run
        self._budget_lock = threading.Lock()  # for the two above (workers give room back)
        self._admitting = False
        self._handover = threading.Lock()  # a worker re-registering a socket vs. _close
        self._idle_workers = 0  # workers waiting for a request
        self._idle_lock = threading.Lock()
        self._accepting = False
        self._accept_at = 0.0  # when to accept again after EMFILE
        self._done = threading.Event()
        self._serving = False
        self.stats = {"accepted": 0, "evicted": 0, "timed_out": 0, "refused_at_cap": 0}
        self._workers = [threading.Thread(target=self._work, name=f"kvmem-http-worker-{i}",
                                          daemon=True) for i in range(config.http_workers)]
        for worker in self._workers:
            worker.start()

    # -- the loop ------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Serve in a new thread; a ``stop()`` from now on waits for it, so what clients
        sent before the stop is taken even if the thread had not begun."""
        with self._wake_lock:
            self._serving = True
        thread = threading.Thread(target=self._loop, name="kvmem-http-loop")
        thread.start()
        return thread

    def serve_forever(self) -> None:
        """Serve in this thread until ``stop()``."""
        with self._wake_lock:
            if self.stopping:  # stop() came first: it closed the socket
                return
            self._serving = True
        self._loop()

    def _loop(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._listen(True)
        grace_until = math.inf
        next_scan = 0.0
        try:
            while True:
                timeout = SCAN_S if self._conns or not self._accepting else 1.0
                for key, mask in self._selector.select(timeout):
                    if key.fileobj is self.socket:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._take_returned()
                    elif mask & selectors.EVENT_WRITE:
                        self._send(key.data)
                    else:
                        self._read(key.data)
                now = time.monotonic()
                if self.stopping and grace_until == math.inf:
                    grace_until = now + self.config.shutdown_grace_s
                    self._begin_stop()
                if self.stopping and (now >= grace_until or all(
                        c.phase == LINGER for c in self._conns.values())):
                    return
                if not self.stopping and not self._accepting and now >= self._accept_at \
                        and len(self._conns) < self.max_connections:
                    self._listen(True)
                if now >= next_scan:
                    next_scan = now + SCAN_S
                    self._expire(now)
                    if not self.stopping and not self._accepting and now >= self._accept_at \
                            and self._longest_idle() is not None:
                        self._listen(True)  # at the cap, but one can be closed for room
        finally:
            for conn in list(self._conns.values()):
                if conn.phase == WORK:  # its worker may be sending: stop() closes it
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
                else:
                    self._close(conn)
            self._selector.close()
            self.socket.close()
            self._done.set()

    def _listen(self, on: bool) -> None:
        if on != self._accepting:
            if on:
                self._selector.register(self.socket, selectors.EVENT_READ)
            else:
                self._selector.unregister(self.socket)
            self._accepting = on

    def _accept(self) -> None:
        now = time.monotonic()
        while self._accepting:
            full = len(self._conns) >= self.max_connections
            if full and self._longest_idle() is None:
                self.stats["refused_at_cap"] += 1
                self._listen(False)  # new connections wait in the backlog, no spinning
                return
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept a connection (%s); pausing for %.1f s",
                                exc.strerror, ACCEPT_RETRY_S)
                    self._listen(False)
                    self._accept_at = now + ACCEPT_RETRY_S
                return  # ECONNABORTED and the like: that client is gone
            if full and (oldest := self._longest_idle()) is not None:
                self.stats["evicted"] += 1  # room for the new one, as nginx reuses idle ones
                self._close(oldest)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, address, now)
            conn.deadline = now + self.config.http_idle_timeout_s
            self._conns[sock.fileno()] = conn
            self.stats["accepted"] += 1
            self._watch(conn, selectors.EVENT_READ)

    def _longest_idle(self) -> Connection | None:
        """The connection waiting longest for its next request (none half-sent)."""
        idle = [c for c in self._conns.values()
                if c.phase == LINGER or (c.phase == IDLE and not c.buf)]
        return min(idle, key=lambda c: c.since, default=None)

    def _watch(self, conn: Connection, events: int) -> None:
        if events == conn.events:
            return
        if not events:
            self._selector.unregister(conn.sock)
        elif not conn.events:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if conn.phase == LINGER:  # dropped, until the client's EOF
            if not data:
                self._close(conn)
            return
        if not data:  # the client ended its side (or reset it)
            conn.eof = True
            self._watch(conn, 0)
            self._end_of_input(conn)
            return
        conn.buf += data
        self._advance(conn, time.monotonic())

    def _end_of_input(self, conn: Connection) -> None:
        """The client sent all it will: what is whole was answered or is being; a request
        cut short is refused, never run (a head without its empty line could be a DELETE
        that lost its headers)."""
        if conn.phase == IDLE and not conn.buf:
            self._close(conn)
        elif conn.phase in (IDLE, HEAD, BODY):
            self._refuse(conn, 400, "invalid_request", "the request was cut short")

    def _advance(self, conn: Connection, now: float) -> None:
        """Move a connection on with what its buffer holds: to the next phase, to a worker,
        or to a refusal of its own."""
        if conn.phase in (IDLE, HEAD):
            if conn.phase == IDLE and conn.buf.startswith((b"\r", b"\n")):
                del conn.buf[:len(conn.buf) - len(conn.buf.lstrip(b"\r\n"))]  # RFC 9112 2.2
            if not conn.buf:
                conn.phase, conn.since = IDLE, now
                conn.deadline = now + self.config.http_idle_timeout_s
                return
            if conn.phase == IDLE:
                conn.phase, conn.since = HEAD, now
                conn.deadline = now + self.config.http_header_timeout_s
            end = head_end(conn.buf)
            if end < 0 or end > MAX_HEAD_BYTES:
                if len(conn.buf) > MAX_HEAD_BYTES or end > MAX_HEAD_BYTES:
                    long_line = conn.buf.find(b"\n", 0, 65537) < 0
                    self._refuse(conn, 414 if long_line else 431, "invalid_request",
                                 "the request line is too long" if long_line else
                                 f"the request's headers pass {MAX_HEAD_BYTES} bytes")
                return
            length, continues, authorization = framing(bytes(conn.buf[:end]))
            conn.withheld = bool(length) and bool(self.token) and not kvmem_cli.bearer_ok(
                authorization, self.token)
            if conn.withheld:
                length = None  # no token, no room: its head goes on alone, to get a 401
            conn.head_end, conn.need = end, end + (length or 0)
            conn.close_after = length is None
            if length:
                with self._budget_lock:
                    admitted = self._room(length)
                    if admitted:
                        self._buffered += length
                        conn.reserved = length
                    else:
                        self._waiting.append(conn)
                if not admitted:
                    conn.phase = WAIT
                    conn.deadline = now + self.config.http_body_timeout_s
                    self._watch(conn, 0)  # its body stays in the kernel's buffers
                    return
                if continues and len(conn.buf) < conn.need:
                    with contextlib.suppress(OSError):
                        conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            conn.phase = BODY
            conn.deadline = now + self.config.http_body_timeout_s
        if conn.phase == BODY and len(conn.buf) >= conn.need:
            self._dispatch(conn)

    def _dispatch(self, conn: Connection) -> None:
        """Hand the request at the front of the buffer to a worker."""
        self._take_request(conn)
        conn.phase, conn.deadline = WORK, math.inf
        self._watch(conn, 0)
        self._jobs.put(conn)

    @staticmethod
    def _take_request(conn: Connection) -> None:
        """Move the request at the front of the buffer to ``head`` and ``body``."""
        conn.head = bytes(conn.buf[:conn.head_end])
        if len(conn.buf) == conn.need:  # the usual case: hand the body over, no copy
            del conn.buf[:conn.head_end]  # (a bytearray drops its front in place)
            conn.body, conn.buf = conn.buf, bytearray()
        else:  # the client sent more (pipelining): keep that for later
            conn.body = bytes(conn.buf[conn.head_end:conn.need])
            del conn.buf[:conn.need]

    def _refuse(self, conn: Connection, status: int, code: str, message: str,
                headers: Mapping[str, str] | None = None) -> None:
        """Answer a request the loop refuses itself, then close; the room its body held is
        free at once."""
        with self._budget_lock:
            if conn in self._waiting:
                self._waiting.remove(conn)
            freed, conn.reserved = conn.reserved, 0
            self._buffered -= freed
        request_id = new_request_id()
        method, _, target = bytes(conn.buf[:MAX_HEAD_BYTES]).partition(b"\n")[0].partition(b" ")
        log_access(request_id, str(method, "latin-1").strip() or "-",
                   str(target.rpartition(b" HTTP/")[0] or target, "latin-1").strip() or "-",
                   status, conn.since)
        conn.out, conn.close_after = plain_response(status, code, message, headers,
                                                    request_id=request_id), True
        conn.buf.clear()
        self._send(conn)
        if freed:
            self._admit(time.monotonic())

    def _send(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.out) if conn.out else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        now = time.monotonic()
        if conn.out:
            if conn.phase != SEND:
                conn.phase, conn.deadline = SEND, now + self.config.http_body_timeout_s
            self._watch(conn, selectors.EVENT_WRITE)
        elif conn.close_after or self.stopping:
            self._linger(conn, now)
        else:
            conn.phase = IDLE
            if not conn.eof:
                self._watch(conn, selectors.EVENT_READ)
            self._advance(conn, now)  # a request the client sent meanwhile
            if conn.eof and conn.phase in (IDLE, HEAD, BODY):
                self._end_of_input(conn)

    def _linger(self, conn: Connection, now: float) -> None:
        """End a connection after its last answer: send FIN, then read and drop what the
        client still sends, for LINGER_S at most; closing at once with its bytes unread
        would reset the connection, and a reset can destroy the answer before the client
        reads it (nginx's lingering close)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.phase, conn.deadline = LINGER, now + LINGER_S
        conn.buf.clear()
        self._watch(conn, selectors.EVENT_READ)

    def _take_returned(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass
        with self._wake_lock:
            self._woken = False
        while self._returned:
            conn = self._returned.popleft()
            self._release(conn)
            conn.phase = SEND  # the worker sent what the socket took; the loop sends the rest
            conn.deadline = time.monotonic() + self.config.http_body_timeout_s
            self._send(conn)

    def _room(self, length: int) -> bool:
        """Whether a body of ``length`` bytes may be read now: one always may, alone, and
        a small one always may (so big bodies declared and never sent cannot hold up the
        small writes of other clients; small ones are bounded by the connection cap)."""
        return length <= SMALL_BODY_BYTES or not self._buffered \
            or self._buffered + length <= self.config.http_buffer_bytes

    def _release(self, conn: Connection) -> None:
        """Give back the buffer room a request held; let waiting requests in."""
        with self._budget_lock:
            self._buffered -= conn.reserved
            conn.reserved = 0
        self._admit(time.monotonic())

    def _admit(self, now: float) -> None:
        """Let waiting requests in, first come first, while there is room."""
        if self._admitting:  # called again from inside (a refusal closing): the outer goes on
            return
        self._admitting = True
        try:
            self._admit_waiting(now)
        finally:
            self._admitting = False

    def _admit_waiting(self, now: float) -> None:
        while True:
            with self._budget_lock:
                if not self._waiting or not self._room(
                        self._waiting[0].need - self._waiting[0].head_end):
                    return
                head = self._waiting.popleft()
            head.phase = HEAD  # admitted now: framing again is cheap and keeps one path
            self._watch(head, selectors.EVENT_READ)
            self._advance(head, now)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            if conn.deadline > now or conn.phase == WORK:  # moved on meanwhile (let in
                continue  # by the room an earlier one in this list freed)
            self.stats["timed_out"] += conn.phase in (HEAD, BODY, WAIT, SEND)
            if conn.phase in (HEAD, BODY):
                self._refuse(conn, 408, "request_timeout", f"the request did not arrive "
                             f"within its {conn.phase} timeout")
            elif conn.phase == WAIT:
                self._refuse(conn, 503, "busy", "the server holds as many request bodies "
                             "as it may; retry in a moment", {"Retry-After": "1"})
            else:  # idle, lingering, or an answer the client does not take
                self._close(conn)

    def _begin_stop(self) -> None:
        """Take what clients sent before the stop (connections in the backlog, bytes in
        the sockets); then close the connections with no whole request head: the others
        (their body coming, waiting for buffer room, running, being answered) have the
        grace to finish."""
        self._accept()
        self._listen(False)
        for conn in list(self._conns.values()):
            if conn.phase in (IDLE, HEAD):
                self._read(conn)
        for conn in list(self._conns.values()):
            if conn.phase in (IDLE, HEAD):
                self._close(conn)

    def _close(self, conn: Connection) -> None:
        with self._handover:  # a worker may be handing it back (``_rearm``)
            if conn.events:
                self._selector.unregister(conn.sock)
                conn.events = 0
            with self._budget_lock:
                if conn in self._waiting:
                    self._waiting.remove(conn)
                freed = conn.reserved if conn.phase != WORK else 0  # a worker's request
                self._buffered -= freed  # keeps its room until the worker is done
                conn.reserved -= freed
            self._conns.pop(conn.sock.fileno(), None)
            with contextlib.suppress(OSError):
                conn.sock.close()
        if freed:
            self._admit(time.monotonic())

    # -- the workers ---------------------------------------------------------------------

    def _get_job(self) -> Connection | None:
        with self._idle_lock:
            self._idle_workers += 1
        try:
            return self._jobs.get()
        finally:
            with self._idle_lock:
                self._idle_workers -= 1

    def _work(self) -> None:
        while (conn := self._get_job()) is not None:
            while self._answer(conn) and self._next_request(conn):
                pass  # the same client's next request, come while this worker waited
            if self._rearm(conn):
                continue
            self._returned.append(conn)  # the loop finishes it
            with self._wake_lock:
                wake, self._woken = not self._woken, True
            if wake:
                with contextlib.suppress(OSError):
                    self._wake_w.send(b"\0")

    def _answer(self, conn: Connection) -> bool:
        """Run the request handed over and send what the socket takes of its answer;
        then give back the buffer room it held unless requests wait for it (the loop
        lets them in).  True when the connection may go on with its next request here."""
        try:
            handler = Handler(self, conn.head, conn.body, conn.address, withheld=conn.withheld)
            conn.head, conn.body = b"", b""  # the handler's now: it lets go of it once read
            out = handler.run()
            conn.close_after = conn.close_after or handler.close_connection
            try:
                sent = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            conn.out = out[sent:]
        except OSError:
            conn.out, conn.close_after = b"", True  # the client went away
        except Exception:
            log.exception("serving %s failed", conn.address)
            conn.out, conn.close_after = b"", True
        conn.head, conn.body = b"", b""
        with self._budget_lock:
            if conn.reserved and not self._waiting:
                self._buffered -= conn.reserved
                conn.reserved = 0
            return not (conn.out or conn.close_after or conn.reserved or self.stopping)

    def _next_request(self, conn: Connection) -> bool:
        """Wait up to WORKER_WAIT_S for the client's next request and take it if it comes
        whole (a keep-alive client usually sends it at once: waiting costs less than two
        thread hand-offs through the loop), unless a request waits with no worker free to
        take it (then this client's next one queues behind it).  False: the loop reads what
        came."""
        if not self._idle_workers and not self._jobs.empty():  # a request waits for a worker:
            return False  # this client's next one queues behind it
        poll = select.poll()
        poll.register(conn.sock, select.POLLIN)
        if not poll.poll(WORKER_WAIT_S * 1000):
            return False
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            conn.eof = True  # the loop answers what is whole in the buffer, then closes
            return False
        conn.buf += data
        end = head_end(conn.buf)
        if not 0 <= end <= MAX_HEAD_BYTES:
            return False
        length, continues, _ = framing(bytes(conn.buf[:end]))
        if length is None or continues or len(conn.buf) < end + length:
            return False  # to be refused, or a body still coming: the loop's part
        with self._budget_lock:
            if length and not self._room(length):
                return False
            self._buffered += length
            conn.reserved = length
        conn.head_end, conn.need = end, end + length
        self._take_request(conn)
        return True

    def _rearm(self, conn: Connection) -> bool:
        """End a request the usual way, in its worker: the answer went out whole, the
        connection stays open, holds no more bytes and no buffer room; so it waits for
        its next request, watched by the loop again.  (A selector may be given a socket
        from another thread: epoll is.)  False: the loop must finish it."""
        if conn.out or conn.close_after or conn.eof or conn.buf or conn.reserved \
                or self.stopping:
            return False
        now = time.monotonic()
        with self._handover:  # the loop may not close it half registered
            conn.since, conn.deadline = now, now + self.config.http_idle_timeout_s
            conn.phase, conn.events = IDLE, selectors.EVENT_READ
            try:
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            except (ValueError, KeyError, OSError):  # the loop has ended: stop() closes it
                conn.events = 0
        return True

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def stop(self) -> None:
        """Stop serving (see the class); returns once the loop and the workers ended."""
        with self._wake_lock:
            self.stopping, serving = True, self._serving
        self._wake()
        if not serving:
            self.socket.close()
        elif not self._done.wait(self.config.shutdown_grace_s + 30):
            log.error("the event loop did not end")
        self.api.store.interrupt()  # the grace is over: long work (a forget) ends now
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(self.config.busy_timeout_ms / 1000 + 10)
        for conn in list(self._conns.values()):
            with contextlib.suppress(OSError):
                conn.sock.close()
        self._conns.clear()
        self._wake_r.close()
        self._wake_w.close()


class _Answer(io.BufferedIOBase):
    """The handler's ``wfile``: keeps what is written, for the worker to send."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)


class Handler(http.server.BaseHTTPRequestHandler):
    """One request, from the bytes the loop read, answered into bytes (``run``): the
    parsing and error shapes of ``http.server``, the routes of kvmem."""

    server: Server  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"
    # Answer even an unparsable request line with a status line and headers, not the
    # bare body of HTTP/0.9.
    default_request_version = "HTTP/1.1"
    server_version = "kvmem"
    _headers_buffer: list[bytes]  # BaseHTTPRequestHandler's, filled by send_header()

    def __init__(self, server: Server, head: bytes, body: bytes | bytearray, address: Any, *,
                 withheld: bool = False) -> None:
        # Not BaseRequestHandler's __init__: there is no socket here, only the request.
        self.withheld = withheld  # the loop did not read the body: no token came with it
        self.server = server
        self.client_address = address
        self.rfile = io.BytesIO(head)
        self.body = body
        self.answer = self.wfile = _Answer()
        self.close_connection = True
        self.body_consumed = False
        self.started = time.monotonic()

    def run(self) -> bytes:
        """Handle the request; the answer's bytes (``close_connection`` says whether the
        connection must end after it)."""
        self.handle_one_request()
        return b"".join(self.answer.parts)  # one part: no copy

    def handle_expect_100(self) -> bool:
        return True  # the loop sent 100 Continue when it took the body

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # http.server's line (with the query string) is replaced by log_access's

    def log_access(self, request_id: str, status: int) -> None:
        log_access(request_id, getattr(self, "command", None) or "-",
                   getattr(self, "path", None) or "-", status, self.started)

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "-"

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
        request_id = new_request_id()
        self.respond(status, error_body(code_name, message or "bad request", request_id), {})
        self.log_access(request_id, status)

    def dispatch(self) -> None:
        request_id = new_request_id()
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
            log.exception("request %s %s %s failed", request_id, self.command,
                          loggable_path(self.path))
            status, headers = 500, {}
            body = error_body("internal", "internal error; see the server log for request "
                                          f"id {request_id}", request_id)
        if not self.body_consumed and self.headers.get("Content-Length", "0").strip() != "0":
            # Answered before reading the body (no route, no auth...): end the connection,
            # as a server that did not read it must.
            self.close_connection = True
        if self.server.stopping:
            self.close_connection = True
        self.respond(status, body, {"X-Request-Id": request_id, **self.cors_headers(),
                                    **headers})
        self.log_access(request_id, status)  # before the worker sends the answer

    def cors_origin(self) -> str | None:
        """The request's Origin when it is one of --cors-origin's (a single header)."""
        origins = self.headers.get_all("Origin") if self.headers else None
        if origins and len(origins) == 1 and origins[0] in self.server.cors_origins:
            return str(origins[0])
        return None

    def cors_headers(self) -> dict[str, str]:
        """CORS headers for a --cors-origin origin; none for any other request."""
        origin = self.cors_origin()
        if origin is None:
            return {}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                   "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS}
        if self.command == "OPTIONS" and self.headers.get("Access-Control-Request-Method"):
            headers.update({"Access-Control-Allow-Methods": "GET, HEAD, PUT, POST, DELETE",
                            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                            "Access-Control-Max-Age": "600"})
        return headers

    def handle_api(self, request_id: str) -> tuple[int, Any, dict[str, str]]:
        raw_path, _, raw_query = self.path.partition("?")
        if any(len(self.headers.get_all(name) or ()) > 1 for name in ("Host", "Origin")):
            self.close_connection = True  # which one would a proxy have checked?
            raise HTTPError(400, "invalid_request", "more than one Host or Origin header")
        origin = None if self.cors_origin() else self.headers.get("Origin")
        refusal = kvmem_cli.request_refusal(self.headers.get("Host", ""), origin,
                                            self.server.bind_host, self.server.allowed_hosts)
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
        page = self.server.pages.get(raw_path)
        if page is not None or self.command == "OPTIONS":
            # Pages hold no data, and a CORS preflight never carries the token: no auth.
            allowed = PAGE_ALLOW if page is not None else allowed_methods(
                r for r, _ in path_routes(self.command, raw_path))
            self.read_body(None)
            if self.command == "OPTIONS":
                return 200, {"allow": allowed.split(", ")}, {"Allow": allowed}
            if self.command not in ("GET", "HEAD"):
                raise HTTPError(405, "method_not_allowed", f"{self.command} is not allowed "
                                f"here; use {allowed}", headers={"Allow": allowed})
            return 200, page, PAGE_HEADERS
        route, key = match_route(self.command, raw_path)
        if route.auth and self.server.token and not kvmem_cli.bearer_ok(
                self.headers.get("Authorization"), self.server.token):
            self.close_connection = True  # the body, if any, is left unread
            raise HTTPError(401, "unauthorized", kvmem_cli.UNAUTHORIZED,
                            headers={"WWW-Authenticate": "Bearer"})
        query = parse_query(raw_query, route)
        precondition = parse_preconditions(self.headers.get_all("If-Match") or [],
                                           self.headers.get_all("If-None-Match") or [], route)
        body = self.read_body(route)
        status, payload = route.handler(self.server.api,
                                        Request(key or "", query, body, precondition))
        return status, payload, response_headers(status, route.responses.get(status), payload)

    def read_body(self, route: Route | None) -> Any:
        """The JSON body (None when the route takes none).  Checks Content-Length (411,
        413), Content-Type (415), UTF-8 and JSON (400)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "length_required", "send the body with Content-Length, "
                            "not Transfer-Encoding")
        length_text = self.headers.get("Content-Length", "0").strip()
        if not length_text.isascii() or not length_text.isdigit() or len(length_text) > 12:
            self.close_connection = True
            raise HTTPError(400, "invalid_request", "bad Content-Length")
        length = int(length_text)
        if self.withheld:
            self.close_connection = True
            raise HTTPError(401, "unauthorized", kvmem_cli.UNAUTHORIZED,
                            headers={"WWW-Authenticate": "Bearer"})
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # not reading it: the connection can't be reused
            raise HTTPError(413, "payload_too_large",
                            f"body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        raw, self.body = self.body, b""  # the loop read exactly Content-Length bytes, or none
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
            text = str(raw, "utf-8")
            return json.loads(text, parse_constant=_refuse_constant)
        except UnicodeDecodeError:
            raise HTTPError(400, "invalid_request", "the body is not valid UTF-8") from None
        except (ValueError, RecursionError) as exc:
            raise HTTPError(400, "invalid_request", f"the body is not valid JSON: {exc}") from None

    def respond(self, status: int, body: Any, headers: Mapping[str, str]) -> None:
        if isinstance(body, StaticFile):
            data, content_type = body.data, body.content_type
        else:
            data = json.dumps(body, ensure_ascii=False, allow_nan=False,
                              default=str).encode("utf-8")
            content_type = "application/json; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Head and body in one write (end_headers() would write the head alone): one part
        # to send, one system call, one segment.
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(data)
        self.flush_headers()


def loggable_path(target: str) -> str:
    """A request target as the log shows it: the path without the query string (which may
    hold a search text or a cursor), at most 200 characters, and any byte that is not
    printable ASCII percent-encoded (so a client cannot write to the log's terminal)."""
    path = target.partition("?")[0].partition("#")[0]
    path = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", path)  # no user:password@
    shown = re.sub(r"[^!-~]", lambda m: "".join(f"%{b:02X}" for b in m[0].encode()),
                   path[:200])
    return shown + ("..." if len(path) > 200 else "")


def log_access(request_id: str, method: str, target: str, status: int,
               started: float) -> None:
    """The access log's line for one answer: method, path (``loggable_path``: never the
    query string; never a header or the body, so never the token), status, the time since
    the request arrived whole (or, for the loop's own refusals, since it began), and the
    request id that the answer's X-Request-Id and error body carry."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("%s %s %d %.1fms id=%s", loggable_path(method)[:20],
                        loggable_path(target), status,
                        (time.monotonic() - started) * 1000, request_id)


# -------------------------------------------------------------- the memory browser ----
#
# GET / is the memory browser and GET /docs the API page: static files of the kvmem_web
# package (HTML, CSS, plain JavaScript; no build step), which hold no data and so need no
# token.  The page calls the /v1 API like any client; its script and styles come from this
# server only (Content-Security-Policy: no inline script, no eval, no framing).

PAGE_FILES = {"/": "index.html", "/docs": "docs.html", "/static/app.js": "app.js",
              "/static/docs.js": "docs.js", "/static/style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
PAGE_ALLOW = "GET, HEAD, OPTIONS"
# CORS (only for the --cors-origin origins): what a page there may send and read.
CORS_ALLOW_HEADERS = "Authorization, Content-Type, If-Match, If-None-Match"
CORS_EXPOSE_HEADERS = "ETag, Location, X-Request-Id, Retry-After"


@dataclasses.dataclass(frozen=True)
class StaticFile:
    data: bytes
    content_type: str


@functools.cache
def page_files() -> dict[str, StaticFile]:
    """The files PAGE_FILES serves, read once from the installed kvmem_web package."""
    root = importlib.resources.files("kvmem_web")
    return {path: StaticFile(root.joinpath(name).read_bytes(),
                             CONTENT_TYPES[os.path.splitext(name)[1]])
            for path, name in PAGE_FILES.items()}


def new_request_id() -> str:
    """12 hex digits to find a request in the log.  Not a secret, so no system call:
    ``uuid4`` reads ``os.urandom``, and every system call lets another thread take the GIL."""
    return f"{random.getrandbits(48):012x}"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# ------------------------------------------------------------------------------- main ----


def build_server(store: kvmem_cli.AnyStore, host: str, port: int, token: str) -> Server:
    """The server, bound and ready for ``serve_forever()``; see ``check_exposure``.
    Raises ConfigError naming ``host``:``port`` when it cannot listen there."""
    kvmem_cli.check_exposure(host, token)
    try:
        return Server((host.strip("[]"), port), Api(store), token)
    except OSError as exc:
        raise kvmem_cli.listen_error(host, port, exc) from exc


def main(argv: list[str] | None = None) -> int:
    """``kvmem-http``: exit 0 once stopped by SIGINT or SIGTERM, 2 when it cannot start
    (``kvmem_cli.startup_failed``: one line on stderr)."""
    parser = argparse.ArgumentParser(prog="kvmem-http", description="kvmem's HTTP JSON API",
                                     formatter_class=kvmem_cli.HelpFormatter)
    store = None
    try:
        args = kvmem_cli.parse_server_args(parser, argv, exclude=("mcp_port",))
        config = kvmem_cli.server_config(args)
        if not config.access_log:
            access_log.setLevel(logging.WARNING)
        store = kvmem_cli.open_store(config, role="http", decay=True)
        server = build_server(store, config.host, config.port, config.token)
    except (kvmem.KvmemError, OSError) as exc:
        if store is not None:
            store.close()
        return kvmem_cli.startup_failed("kvmem-http", exc)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    host, port = str(server.server_address[0]), int(server.server_address[1])
    log.info("kvmem-http listening on http://%s pid=%d db=%s max_connections=%d "
             "settings=%s recovery=%s", kvmem_cli.host_port(host, port), os.getpid(),
             store.path, server.max_connections, json.dumps(store.settings()),
             json.dumps(dataclasses.asdict(kvmem.recovery_record(store.path) or
                                           _no_record(store.path))
                        if isinstance(store, kvmem.Store) else None))
    try:
        print(f"listening on http://{kvmem_cli.host_port(host, port)}", flush=True)
    except OSError as exc:  # stdout is a full disk or a closed pipe: say so on stderr
        server.stop()
        store.close()
        return kvmem_cli.startup_failed("kvmem-http", exc)
    serving = server.start()
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
