"""kvmem as MCP tools, over the official ``mcp`` SDK (2.x, ``MCPServer``).

Each tool is a row of data (``Tool``): its JSON schemas, derived from kvmem's own and the
store's limits, its hints, and the Store call it makes.  ``KvmemMCP`` serves these rows
itself instead of the SDK's decorated functions, so every tool is handled the same way,
once:

- the arguments reach kvmem exactly as the client sent them, as over HTTP, and kvmem
  checks every value (no coercion: ``true`` is not 1 and ``"1"`` is not 1);
- an argument the tool does not take is refused by name;
- every failure is a tool error whose text starts with the kvmem code
  (``invalid_request: ...``, ``version_conflict: ...``, ``busy: ... retry``); a memory
  that is not there is a normal result (``found: false``);
- a result is its structured content plus the same object as compact JSON text.

One Store per process, opened before the server starts and shared by every session.
Calls run in worker threads (the Store is thread-safe and its writes go through group
commit).  Two transports:

- stdio: a line the SDK cannot read gets a JSON-RPC error from us instead of no answer;
  SIGINT or SIGTERM stops reading, lets the calls in flight answer, closes the Store
  (final checkpoint) and exits 0.  stdout is the protocol, so logs go to stderr.
- streamable HTTP (``http://HOST:8766/mcp``): the bearer token of kvmem-http, checked by
  the same function, and an Origin check; the SDK checks the Host of a loopback bind.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import fcntl
import inspect
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import IO, Any, cast

import kvmem
import kvmem_cli

try:
    import anyio
    import anyio.abc
    import anyio.from_thread
    import anyio.lowlevel
    import mcp_types as types
    import uvicorn
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.stdio import stdio_server
    from mcp.server.transport_security import TransportSecuritySettings
    from mcp.shared.dispatcher import as_request_id, coerce_request_id
    from mcp.shared.message import SessionMessage
    from mcp_types import CallToolResult, TextContent, ToolAnnotations
    from mcp_types import Tool as MCPTool
    from pydantic import ValidationError
    from starlette.datastructures import Headers
    from starlette.responses import JSONResponse
    from starlette.types import ASGIApp, Receive, Scope, Send
except ModuleNotFoundError as exc:  # run by a Python that lacks kvmem's dependencies
    if __name__ != "__main__":
        raise
    sys.exit(f"kvmem-mcp: this Python ({sys.executable}) lacks the MCP SDK and the "
             f"packages it needs (no module {exc.name!r}): install them with 'pip install -e "
             ".' in a virtual environment, then run .venv/bin/kvmem-mcp")

log = logging.getLogger("kvmem.mcp")

INSTRUCTIONS = """\
kvmem is a durable key-value memory. Use it to remember facts, preferences and notes across
conversations, and to look them up later.
- memory_search first when you do not know the exact key: it ranks by text relevance and by
  how strong (recently reinforced) a memory is.
  Narrow it with tags (all of them), a key prefix, updated_after/updated_before, and
  search several namespaces (a list) or all of them ("*").
- memory_get when you know the key; memory_list to browse keys by prefix, tags or time.
- memory_namespaces to see which namespaces hold memories, and how many.
- memory_set to save or replace; use if_version for safe read-modify-write (0 = only if new).
- memory_reinforce when a memory proved useful, so it stays strong and is not archived.
- memory_forget to delete many memories by key prefix or tags: a dry run unless
  dry_run=false, so look at what it would delete first.
- Namespaces keep separate agents, users or projects apart (default "default"); tags group
  related memories inside a namespace.
Every write is durable when the tool answers. An error starts with its code, e.g.
"invalid_request: ..." (fix the arguments) or "busy: ..." (retry)."""

HTTP_PATH = "/mcp"


@dataclasses.dataclass(frozen=True)
class Tool:
    """One MCP tool: what ``tools/list`` shows, and the Store call behind it."""

    name: str
    description: str
    arguments: dict[str, Any]  # JSON schema of the arguments object
    result: dict[str, Any]  # JSON schema of the structured result
    hints: ToolAnnotations  # its title and read-only / destructive / idempotent hints
    run: Callable[[dict[str, Any]], dict[str, Any]]  # arguments as sent -> result


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """An object schema that allows no other property (``required``: all of them)."""
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": list(properties) if required is None else required}


def _hints(title: str, *, read_only: bool = False, destructive: bool = False,
           idempotent: bool = False) -> ToolAnnotations:
    return ToolAnnotations(title=title, read_only_hint=read_only, destructive_hint=destructive,
                           idempotent_hint=read_only or idempotent, open_world_hint=False)


def _limit(maximum: int, default: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": maximum, "default": default,
            "description": "most results to return"}


MEMORY_REF = {"$ref": "#/$defs/Memory"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null (which kvmem takes as "not given"), described as ``schema``."""
    return {"anyOf": [schema, {"type": "null"}], "description": schema["description"]}


def _result(properties: dict[str, Any]) -> dict[str, Any]:
    hit = {**kvmem.MEMORY_SCHEMA, "required": [*kvmem.MEMORY_SCHEMA["required"], "score"],
           "properties": {**kvmem.MEMORY_SCHEMA["properties"], "score": {"type": "number"}}}
    return {**_object(properties), "$defs": {"Memory": kvmem.MEMORY_SCHEMA, "Hit": hit}}


def tools(store: kvmem_cli.AnyStore) -> list[Tool]:
    """The tools over ``store``, with its limits in their schemas."""
    config = store.config
    namespace = {"namespace": kvmem.namespace_schema(config)}
    filters = {name: _nullable(schema) for name, schema in kvmem.filter_schemas(config).items()}

    def out(memory: kvmem.Memory) -> dict[str, Any]:
        return memory.render(store.clock())

    def op(cls: type[kvmem.Op], answer: Callable[[Any], dict[str, Any]]) -> Callable[..., Any]:
        return lambda arguments: answer(store.apply(cls.parse(arguments, config)))

    def found(memory: kvmem.Memory | None) -> dict[str, Any]:
        return {"found": memory is not None, "memory": None if memory is None else out(memory)}

    def page(page: kvmem.Page) -> dict[str, Any]:
        return {"items": [out(m) for m in page.items], "next_cursor": page.next_cursor}

    def batch(arguments: dict[str, Any]) -> dict[str, Any]:
        results = store.batch(arguments["ops"], namespace=arguments.get("namespace", "default"))
        return {"results": [{"op": r["op"], "memory": out(r["memory"])} if "memory" in r
                            else {"op": r["op"], "deleted": r["deleted"]} for r in results]}

    batch_op = kvmem.batch_op_schema(config)
    return [
        Tool("memory_set", """\
            Save a memory under `key`, replacing any existing one (value, tags, TTL,
            half-life). `value` is any JSON (text, number, object, list). `tags` group
            related memories (e.g. ["preference", "project-x"]). `ttl_seconds` makes it
            expire; without it the memory is kept. `half_life_seconds` makes it fade unless
            reinforced (archived when weak). `if_version`: write only if the stored version
            equals it (0 = only if the key is new); on a mismatch the error says the
            current version: read, merge, retry.""",
             kvmem.SetOp.schema(config),
             _result({"created": {"type": "boolean"}, "memory": MEMORY_REF}),
             _hints("Save a memory", destructive=True),
             op(kvmem.SetOp, lambda m: {"created": m.version == 1, "memory": out(m)})),
        Tool("memory_get", """\
            Read the memory stored under exactly `key`. Returns found=false when there is
            none (or it expired or was archived). Use memory_search when unsure of the
            key.""",
             _object({"key": kvmem.key_schema(config), **namespace}, ["key"]),
             _result({"found": {"type": "boolean"},
                      "memory": {"anyOf": [MEMORY_REF, {"type": "null"}]}}),
             _hints("Read a memory", read_only=True),
             lambda arguments: found(store.get(**arguments))),
        Tool("memory_delete", """\
            Forget a memory for good. deleted=false if there was none. With `if_version`,
            only that version is deleted.""",
             kvmem.DeleteOp.schema(config), _result({"deleted": {"type": "boolean"}}),
             _hints("Delete a memory", destructive=True, idempotent=True),
             op(kvmem.DeleteOp, lambda deleted: {"deleted": deleted})),
        Tool("memory_list", """\
            List memories in key order, optionally only keys starting with `prefix`, having
            `tag` and every one of `tags`, or updated after `updated_after` / before
            `updated_before` (Unix seconds or an RFC 3339 time with a zone, such as
            "2026-01-31T12:00:00Z"). `archived=true` lists faded (archived) memories
            instead. Pass `next_cursor` back as `cursor` for the next page (null = no
            more), with the same filters.""",
             _object({**namespace, **filters,
                      "tag": {"anyOf": [kvmem.tag_schema(config), {"type": "null"}],
                              "description": "only memories with this tag"},
                      "archived": {"type": "boolean", "default": False,
                                   "description": "list archived memories instead"},
                      "limit": _limit(kvmem.MAX_LIST_LIMIT, 100),
                      "cursor": {"type": ["string", "null"],
                                 "description": "next_cursor of the previous page"}}, []),
             _result({"items": {"type": "array", "items": MEMORY_REF},
                      "next_cursor": {"type": ["string", "null"]}}),
             _hints("List memories", read_only=True),
             lambda arguments: page(store.list(**arguments))),
        Tool("memory_search", """\
            Find memories by words in their key, value or tags, best first. Ranked by text
            relevance (BM25) times current strength. `query` is plain words; quotes and
            operators are treated as text. `namespace` is one namespace, a list of them, or
            "*" for all (each hit says its namespace). Narrow it with `tags` (memories
            holding all of them), a key `prefix`, and `updated_after` / `updated_before`
            (Unix seconds or an RFC 3339 time with a zone, such as
            "2026-01-31T12:00:00Z").""",
             _object({"query": {"type": "string", "minLength": 1,
                                "maxLength": kvmem.MAX_QUERY_CHARS,
                                "description": "plain words to look for (at least one)"},
                      "namespace": kvmem.search_namespaces_schema(config), **filters,
                      "limit": _limit(kvmem.MAX_SEARCH_LIMIT, 20)}, ["query"]),
             _result({"items": {"type": "array", "items": {"$ref": "#/$defs/Hit"}}}),
             _hints("Search memories", read_only=True),
             lambda arguments: {"items": [{**out(hit.memory), "score": hit.score}
                                          for hit in store.search(**arguments)]}),
        Tool("memory_namespaces", """\
            The namespaces that hold memories, in name order, with how many of their
            memories are live and how many archived.""",
             _object({}), kvmem_cli.NAMESPACE_LIST_SCHEMA,
             _hints("List namespaces", read_only=True),
             lambda arguments: {"items": store.namespaces()}),
        Tool("memory_forget", """\
            Forget in bulk: every memory of `namespace` (live, archived or expired) whose
            key starts with `prefix` and that holds all of `tags` (and was updated after
            `updated_after` / before `updated_before`). A prefix or tags are required
            (a non-empty prefix, or tags). It is a dry run unless `dry_run` is false:
            first call it as is to see how many memories and which keys (the first 100)
            would go, then again with dry_run=false to delete them.""",
             {**_object({**namespace, **filters,
                         "dry_run": {"type": "boolean", "default": True,
                                     "description": "only report what would be deleted "
                                                    "(the default); false deletes"}}, []),
              "anyOf": [{"required": ["prefix"],
                         "properties": {"prefix": {"type": "string", "minLength": 1}}},
                        {"required": ["tags"],
                         "properties": {"tags": {"type": "array", "minItems": 1}}}]},
             _object({"dry_run": {"type": "boolean"}, "matched": {"type": "integer"},
                      "deleted": {"type": "integer"},
                      "keys": {"type": "array", "items": {"type": "string"}},
                      "more": {"type": "boolean"}}),
             _hints("Forget memories in bulk", destructive=True, idempotent=True),
             lambda arguments: store.forget(**{"dry_run": True, **arguments})),
        Tool("memory_reinforce", """\
            Mark a memory as useful: raises its strength and restarts its fading, and
            brings back an archived one.""",
             kvmem.ReinforceOp.schema(config), _result({"memory": MEMORY_REF}),
             _hints("Reinforce a memory"),
             op(kvmem.ReinforceOp, lambda m: {"memory": out(m)})),
        Tool("memory_batch", """\
            Apply several set/delete ops at once, atomically: all of them or none. Each op
            is {"op": "set", "key", "value", "tags"?, "ttl_seconds"?, "half_life_seconds"?,
            "if_version"?} or {"op": "delete", "key", "if_version"?}; all in `namespace`.""",
             {**_object({"ops": {"type": "array", "minItems": 1,
                                 "maxItems": config.max_batch_ops,
                                 "items": {"$ref": "#/$defs/BatchOp"},
                                 "description": "the ops, applied in order"}, **namespace},
                         ["ops"]),
              "$defs": {"BatchOp": batch_op}},
             _result({"results": {"type": "array", "items": _object({
                 "op": {"enum": list(kvmem.BATCH_OPS)}, "memory": MEMORY_REF,
                 "deleted": {"type": "boolean"}}, ["op"])}}),
             _hints("Apply ops atomically", destructive=True), batch),
        Tool("memory_stats", """\
            Store health and figures: settings, sizes, counts of live/archived memories,
            background work.""",
             _object({}), kvmem_cli.STATS_SCHEMA, _hints("Store statistics", read_only=True),
             lambda arguments: store.stats()),
    ]


def check_arguments(tool: Tool, arguments: Mapping[str, Any]) -> None:
    """Refuse (InvalidInputError) an argument ``tool`` does not take, or a missing one."""
    known = tool.arguments["properties"]
    unknown = sorted(name for name in arguments if name not in known)
    if unknown:
        first = unknown[0]
        close = [name for name in known if first and (name.startswith(first) or
                                                      first.startswith(name))] \
            or difflib.get_close_matches(first, known)
        raise kvmem.InvalidInputError(
            f"unknown argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(name[:60]) for name in unknown[:5])} for {tool.name}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; it takes {', '.join(known) or 'no arguments'}")
    missing = [name for name in tool.arguments["required"] if name not in arguments]
    if missing:
        raise kvmem.InvalidInputError(f"{tool.name} needs {', '.join(map(repr, missing))}")


def error_text(exc: kvmem.KvmemError) -> str:
    """A kvmem error as the text a model reads: the code first, then what to do."""
    text = f"{exc.code}: {exc}"
    if isinstance(exc, kvmem.VersionConflictError):
        text += f" (current_version={exc.current_version}"
        text += f", op_index={exc.op_index})" if exc.op_index is not None else ")"
    # (an index rebuild is no busy database: its message says what happens and to retry)
    elif isinstance(exc, kvmem.BusyError) and not isinstance(exc, kvmem.IndexRebuildingError):
        text += " - the database is busy; retry in a moment"
    elif isinstance(exc, kvmem.StorageFullError):
        text += " - the disk is full; reads still work, writes fail until space is freed"
    return text


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class KvmemMCP(MCPServer[None]):
    """The MCP server over one Store: the SDK's protocol, kvmem's tools."""

    def __init__(self, store: kvmem_cli.AnyStore) -> None:
        super().__init__("kvmem", version="0.1.0", instructions=INSTRUCTIONS)
        self.kvmem_tools = {tool.name: tool for tool in tools(store)}

    async def list_tools(self) -> list[MCPTool]:
        return [MCPTool(name=t.name, title=t.hints.title, description=inspect.cleandoc(
            t.description), input_schema=t.arguments, output_schema=t.result,
            annotations=t.hints) for t in self.kvmem_tools.values()]

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Context[None, Any] | None = None) -> Any:
        tool = self.kvmem_tools.get(name)
        log.debug("call %r", name[:60])
        try:
            if tool is None:
                raise kvmem.InvalidInputError(f"unknown tool {name[:60]!r}; the tools are "
                                              f"{', '.join(self.kvmem_tools)}")
            check_arguments(tool, arguments)
            result = await anyio.to_thread.run_sync(tool.run, dict(arguments))
        except kvmem.KvmemError as exc:
            log.info("%r refused: %s", name[:60], exc.code)
            return CallToolResult(content=[TextContent(type="text", text=error_text(exc))],
                                  is_error=True)
        except Exception:  # a bug: the model gets no internals, the log gets the traceback
            log.exception("%r failed unexpectedly", name[:60])
            return CallToolResult(content=[TextContent(
                type="text", text="internal: the tool failed; the server's log says why")],
                is_error=True)
        return CallToolResult(content=[TextContent(type="text", text=compact(result))],
                              structured_content=result)

    async def serve(self, read: Any, write: Any) -> None:
        """Serve one connection until its input ends (stdio)."""
        server = self._lowlevel_server
        await server.run(read, write, server.create_initialization_options())


def build_server(store: kvmem_cli.AnyStore) -> KvmemMCP:
    """The MCP server over ``store`` (opened once per process by the caller)."""
    return KvmemMCP(store)


# ------------------------------------------------------------------------------ stdio ----


def read_message(line: str) -> tuple[types.JSONRPCMessage | None, types.JSONRPCError | None]:
    """A line as the SDK reads it, or (None, the JSON-RPC error that answers it)."""
    try:
        message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValidationError as exc:
        detail = "; ".join(dict.fromkeys(str(e["msg"]) for e in exc.errors()))
    else:  # a request whose id is no string or integer would pass as a notification
        if not isinstance(message, types.JSONRPCNotification) or not _has_id(line):
            return message, None
        detail = "the id must be a string or an integer"
    try:
        parsed = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return None, _jsonrpc_error(None, types.PARSE_ERROR, f"Parse error: {str(exc)[:200]}")
    given = parsed.get("id") if isinstance(parsed, dict) else None
    ident = given if isinstance(given, str | int) and not isinstance(given, bool) else None
    return None, _jsonrpc_error(ident, types.INVALID_REQUEST, f"Invalid request: {detail[:300]}")


def _has_id(line: str) -> bool:
    try:
        return "id" in json.loads(line)
    except (ValueError, RecursionError):
        return False


def _jsonrpc_error(ident: str | int | None, code: int, message: str) -> types.JSONRPCError:
    return types.JSONRPCError(jsonrpc="2.0", id=ident,
                              error=types.ErrorData(code=code, message=message))


def _request_key(ident: object) -> str | int | None:
    """A request id as the SDK correlates it (no bools; "7" is 7), None if it is none."""
    given = as_request_id(ident)
    return None if given is None else coerce_request_id(given)


class StdinRequests:
    """The requests on stdin, line by line, for the SDK's stdio transport.

    - A line the SDK cannot read is answered here (``read_message``), not passed on.
    - A daemon thread reads, so stopping never waits on a blocked read.
    - ``stop()`` ends the requests as the end of input does; either way they end only once
      every tool call passed on has been answered or cancelled by the client (the SDK
      cancels what is still running when its input ends, and a write whose answer is lost
      is a write not acknowledged).  Ids are matched as the SDK matches them.
    - ``stop_now()`` ends them without waiting.
    """

    def __init__(self, wire: IO[bytes]) -> None:
        self._wire = wire
        self._send, self._receive = anyio.create_memory_object_stream[bytes](16)
        self._reply: Callable[[SessionMessage], Awaitable[None]] | None = None
        self._pending: collections.Counter[str | int] = collections.Counter()  # id: calls
        self._settled: anyio.Event | None = None
        self.stopping = False

    def start(self, reply: Callable[[SessionMessage], Awaitable[None]]) -> None:
        self._reply = reply
        token = anyio.lowlevel.current_token()
        threading.Thread(target=self._read, args=(token,), name="kvmem-mcp-stdin",
                         daemon=True).start()

    def _read(self, token: Any) -> None:
        try:
            for line in self._wire:
                anyio.from_thread.run(self._send.send, line, token=token)
            anyio.from_thread.run_sync(self._send.close, token=token)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError):
            pass  # stopped, or the event loop is gone

    def stop(self) -> None:
        self._send.close()

    def stop_now(self) -> None:
        self.stop()
        self._pending.clear()
        self.answered(None)

    def answered(self, ident: object) -> None:
        """A call with this id was answered, or cancelled (a cancelled call gets no
        answer; of several calls with one id, the SDK cancels the latest)."""
        key = _request_key(ident)
        if key is not None and self._pending[key] > 0:
            self._pending[key] -= 1
            if not self._pending[key]:
                del self._pending[key]
        if not self._pending and self._settled is not None:
            self._settled.set()

    def __aiter__(self) -> StdinRequests:
        return self

    async def __anext__(self) -> str:
        while True:
            try:
                line = (await self._receive.receive()).decode("utf-8", "replace")
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                log.info("end of input: %d call(s) to answer first", self._pending.total())
                while self._pending:
                    self._settled = anyio.Event()
                    await self._settled.wait()
                raise StopAsyncIteration from None
            if not line.strip():
                continue
            message, problem = read_message(line)
            if problem is None:
                if isinstance(message, types.JSONRPCRequest) and message.method == "tools/call":
                    key = _request_key(message.id)  # (not a long-lived request: a listen)
                    if key is not None:
                        self._pending[key] += 1
                elif isinstance(message, types.JSONRPCNotification) and \
                        message.method == "notifications/cancelled":
                    self.answered((message.params or {}).get("requestId"))
                return line
            log.info("answered a malformed request: %s", problem.error.message[:200])
            assert self._reply is not None
            await self._reply(SessionMessage(problem))


class AnsweringStream:
    """The SDK's write stream, telling ``requests`` which of them got their answer."""

    def __init__(self, stream: Any, requests: StdinRequests) -> None:
        self._stream, self._requests = stream, requests

    async def send(self, item: SessionMessage) -> None:
        await self._stream.send(item)
        if isinstance(item.message, types.JSONRPCResponse | types.JSONRPCError):
            self._requests.answered(item.message.id)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> AnsweringStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _claim(fd: int, replacement: int) -> int:
    """A private duplicate of ``fd`` for the protocol, and ``fd`` pointed at
    ``replacement``, so that a stray read or print cannot touch the protocol stream."""
    private = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.dup2(replacement, fd)
    return private


async def serve_stdio(server: KvmemMCP) -> None:
    """Serve over stdin/stdout until the input ends or a signal stops it (see
    ``StdinRequests`` and ``_stop_on_signal``)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    wire_in, wire_out = _claim(0, devnull), _claim(1, 2)
    os.close(devnull)
    requests = StdinRequests(os.fdopen(wire_in, "rb"))
    out = anyio.wrap_file(open(wire_out, "w", encoding="utf-8", newline="\n"))  # noqa: SIM115
    async with stdio_server(stdin=cast(Any, requests), stdout=cast(Any, out)) as (read, write), \
            anyio.create_task_group() as tasks:
        await tasks.start(_stop_on_signal, requests)
        requests.start(write.send)
        await server.serve(read, AnsweringStream(write, requests))
        tasks.cancel_scope.cancel()


async def _stop_on_signal(requests: StdinRequests, *,
                          task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                          ) -> None:
    """The first SIGINT/SIGTERM stops reading; a second one stops without waiting for the
    answers of the calls in flight (the SDK cancels them: each is unacknowledged, and a
    write it queued still commits or fails within busy_timeout_ms before the store
    closes)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if requests.stopping:
                log.warning("%s again: stopping without waiting", name)
                requests.stop_now()
                return
            log.info("%s: finishing the calls in flight", name)
            requests.stopping = True
            requests.stop()


# ---------------------------------------------------------------------- streamable HTTP ----


class HTTPGuard:
    """In front of the SDK's app, kvmem-http's rules, by the same functions: the Host and
    the browser's Origin against DNS rebinding (``kvmem_cli.request_refusal``), the
    bearer token, and the body size."""

    def __init__(self, app: ASGIApp, config: kvmem.Config) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope["method"], Headers(scope=scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, method: str, headers: Headers) -> JSONResponse | None:
        problem = kvmem_cli.request_refusal(headers.get("host", ""), headers.get("origin"),
                                            self.config.host, self.config.allowed_hosts)
        if problem is not None:
            return _refusal(*problem)
        token = self.config.token
        if token and not kvmem_cli.bearer_ok(headers.get("authorization"), token):
            return _refusal(401, "unauthorized", kvmem_cli.UNAUTHORIZED)
        length = headers.get("content-length", "").strip()
        if method == "POST" and not length.isdigit():
            return _refusal(411, "length_required", "a POST needs a Content-Length")
        if length.isdigit() and int(length) > kvmem_cli.MAX_BODY_BYTES:
            return _refusal(413, "payload_too_large", f"body is {length} bytes; the limit "
                            f"is {kvmem_cli.MAX_BODY_BYTES}")
        return None


def _refusal(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url
        self.stdout_failed = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:  # after the signal handlers are in place
            try:
                print(f"listening on {self.url}", flush=True)
            except OSError as exc:  # stdout is a full disk or a closed pipe
                log.error("cannot write to stdout: %s; stopping", exc)
                self.should_exit = self.stdout_failed = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Stop as uvicorn does, but without raising the signal again once stopped (that
        made SIGTERM exit 143 and SIGINT end in a traceback); a second SIGINT forces."""
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def listen(config: kvmem.Config) -> socket.socket:
    """The streamable HTTP socket, bound before the database is opened; ConfigError
    naming the address when it cannot listen there."""
    host = config.host.strip("[]")
    try:
        return socket.create_server((host, config.mcp_port), family=kvmem_cli.listen_family(host),
                                    backlog=kvmem_cli.LISTEN_BACKLOG)
    except OSError as exc:
        raise kvmem_cli.listen_error(host, config.mcp_port, exc) from exc


def serve_http(server: KvmemMCP, config: kvmem.Config, sock: socket.socket) -> bool:
    """Serve streamable HTTP on ``sock`` until SIGINT or SIGTERM; False when it could not
    say so on stdout (and stopped at once)."""
    app = HTTPGuard(server.streamable_http_app(
        streamable_http_path=HTTP_PATH, max_request_body_size=kvmem_cli.MAX_BODY_BYTES,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False)),
        config)  # HTTPGuard checks Host and Origin, on every address
    url = f"http://{kvmem_cli.host_port(*sock.getsockname()[:2])}{HTTP_PATH}"
    log.info("streamable HTTP at %s (token %s)", url, "required" if config.token else "off")
    # Uvicorn's own bounds, from the same settings as kvmem-http's: past
    # limit_concurrency connections and requests it answers 503; idle keep-alive
    # connections close after the idle timeout; h11 caps a request's head at 16 KiB.
    served = _Uvicorn(uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on",
        limit_concurrency=config.http_max_connections,
        timeout_keep_alive=max(1, round(config.http_idle_timeout_s)),
        timeout_graceful_shutdown=max(1, round(config.shutdown_grace_s))), url)
    served.run(sockets=[sock])
    return not served.stdout_failed


# ------------------------------------------------------------------------------- main ----


def main(argv: list[str] | None = None) -> int:
    """``kvmem-mcp``: exit 0 once stopped (end of stdin, SIGINT, SIGTERM), 2 when it
    cannot start (``kvmem_cli.startup_failed``: one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="kvmem-mcp", description="kvmem as an MCP server: over stdio (for a client that "
        "starts it) or over streamable HTTP at http://HOST:PORT/mcp (default "
        "http://127.0.0.1:8766/mcp; a token is required off loopback)",
        formatter_class=kvmem_cli.HelpFormatter)
    parser.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio",
                        help="default stdio")
    sock = None
    try:
        args = kvmem_cli.parse_server_args(parser, argv, exclude=(  # kvmem-http's own
            "port", "http_workers", "http_header_timeout_s", "http_body_timeout_s",
            "http_buffer_bytes", "cors_origins", "access_log"), aliases={"mcp_port": "--port"})
        config = kvmem_cli.server_config(args)
        sock = listen(config) if args.transport == "streamable-http" else None
        store = kvmem_cli.open_store(config, role="mcp", decay=True)
    except (kvmem.KvmemError, OSError) as exc:
        if sock is not None:
            sock.close()
        return kvmem_cli.startup_failed("kvmem-mcp", exc)
    log.info("kvmem-mcp (%s) pid=%d db=%s settings=%s", args.transport, os.getpid(),
             store.path, store.settings())
    try:
        server = build_server(store)
        if sock is None:
            anyio.run(serve_stdio, server)
        elif not serve_http(server, config, sock):
            return kvmem_cli.EXIT_STARTUP
    except KeyboardInterrupt:  # before the signal handlers were in place
        pass
    finally:
        store.close()
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
