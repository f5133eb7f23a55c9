"""kvmem as MCP tools, over the official ``mcp`` SDK (2.x, ``MCPServer``).

Thin by design: each tool validates nothing itself, calls the ``kvmem.Store`` and returns
a typed result (so clients get an output schema).  Failures a model should read become
``ToolError`` whose text starts with the kvmem error code (``invalid_request: ...``,
``version_conflict: ...``, ``busy: ... retry``); a memory that is not there is a normal
result (``found: false``), not an error.

One Store per process, opened before the server starts and shared by every MCP session
(``build_server(store)``).  Tools are sync functions, so the SDK runs them in worker
threads; the Store is thread-safe and its writes go through group commit.  stdout is the
protocol on stdio, so logging goes to stderr only.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import WithJsonSchema
from typing_extensions import NotRequired, Required, TypedDict  # noqa: UP035 (pydantic needs these on 3.11)

import kvmem
import kvmem_cli

log = logging.getLogger("kvmem.mcp")

INSTRUCTIONS = """\
kvmem is a durable key-value memory. Use it to remember facts, preferences and notes across
conversations, and to look them up later.
- memory_search first when you do not know the exact key: it ranks by text relevance and by
  how strong (recently reinforced) a memory is.
- memory_get when you know the key; memory_list to browse keys by prefix or tag.
- memory_set to save or replace; use if_version for safe read-modify-write (0 = only if new).
- memory_reinforce when a memory proved useful, so it stays strong and is not archived.
- Namespaces keep separate agents, users or projects apart (default "default"); tags group
  related memories inside a namespace.
Every write is durable when the tool answers."""

T = TypeVar("T")


def _shape(name: str, fields: dict[str, Any], *, total: bool = True) -> Any:
    """A TypedDict (so the SDK publishes it by ``name`` in the schema's ``$defs``) whose
    fields carry kvmem's own JSON schemas: the shapes are derived, never retyped."""
    return TypedDict(name, fields, total=total)  # type: ignore[operator]


def _field(schema: dict[str, Any], *, python: Any = Any) -> Any:
    return Annotated[python, WithJsonSchema(schema)]


_PYTHON: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool,
                           "array": list[str]}


def _argument(schema: dict[str, Any]) -> Any:
    """An argument's annotation: kvmem's schema, published as is, on the Python type it
    names, which the SDK's validation converts to as it always has ("60" -> 60.0)."""
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    python: Any = Any
    for kind in (k for k in kinds if k != "null"):
        python = _PYTHON[kind]
    return _field(schema, python=python | None if python is not Any and "null" in kinds
                  else python)


def _batch_op(config: kvmem.Config) -> Any:
    """One op of ``memory_batch``, with the limits of ``config``."""
    schemas = kvmem.batch_op_schema(config)["properties"]
    return _shape("BatchOp", {"op": Required[Literal[tuple(kvmem.BATCH_OPS)]],
                              "key": Required[_argument(schemas["key"])],
                              **{name: _argument(schema) for name, schema in schemas.items()
                                 if name not in ("op", "key")}}, total=False)


if TYPE_CHECKING:
    MemoryOut: TypeAlias = dict[str, Any]
    HitOut: TypeAlias = dict[str, Any]
    BatchOp: TypeAlias = dict[str, Any]
else:
    _MEMORY = {name: _field(schema) for name, schema in kvmem.MEMORY_SCHEMA["properties"].items()}
    MemoryOut = _shape("MemoryOut", _MEMORY)
    HitOut = _shape("HitOut", {**_MEMORY, "score": float})
    BatchOp = _batch_op(kvmem.Config.build(environ={}))  # build_server uses its store's limits


class SetResult(TypedDict):
    created: bool
    memory: MemoryOut


class GetResult(TypedDict):
    found: bool
    memory: MemoryOut | None


class DeleteResult(TypedDict):
    deleted: bool


class ReinforceResult(TypedDict):
    memory: MemoryOut


class ListResult(TypedDict):
    items: list[MemoryOut]
    next_cursor: str | None


class SearchResult(TypedDict):
    items: list[HitOut]


class BatchItem(TypedDict):
    op: Literal["set", "delete"]
    memory: NotRequired[MemoryOut]
    deleted: NotRequired[bool]


class BatchResult(TypedDict):
    results: list[BatchItem]


def tool_error(exc: kvmem.KvmemError) -> ToolError:
    """A kvmem error as the text a model reads: the code first, then what to do."""
    text = f"{exc.code}: {exc}"
    if isinstance(exc, kvmem.VersionConflictError):
        text += f" (current_version={exc.current_version}"
        text += f", op_index={exc.op_index})" if exc.op_index is not None else ")"
    elif isinstance(exc, kvmem.BusyError):
        text += " - the database is busy; retry in a moment"
    elif isinstance(exc, kvmem.StorageFullError):
        text += " - the disk is full; reads still work, writes fail until space is freed"
    return ToolError(text)


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except kvmem.KvmemError as exc:
        raise tool_error(exc) from exc


def _op_tool(mcp: MCPServer[None], store: kvmem.Store, op: type[kvmem.Op], returns: Any,
             doc: str, answer: Callable[[Any], Any]) -> None:
    """A tool that runs one kvmem op; its arguments are the op's, with their schemas.
    A null argument means "not given", as if it were left out."""
    def tool(**arguments: Any) -> Any:
        given = {k: v for k, v in arguments.items() if v is not None or k == "value"}
        return answer(_call(lambda: store.apply(op.parse(given, store.config))))

    parameters = [inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, annotation=_argument(
            field.metadata["schema"](store.config)),
        default=inspect.Parameter.empty if field.metadata["required"]
        else field.metadata["default"](store.config) if field.name == "namespace" else None,
    ) for field in op.arguments()]
    tool.__name__ = f"memory_{op.kind}"
    tool.__doc__ = doc
    tool.__signature__ = inspect.Signature(parameters, return_annotation=returns)  # type: ignore[attr-defined]
    mcp.tool()(tool)


def build_server(store: kvmem.Store) -> MCPServer[None]:
    """The MCP server over ``store`` (opened once per process by the caller)."""
    mcp: MCPServer[None] = MCPServer("kvmem", version="0.1.0", instructions=INSTRUCTIONS)

    def out(memory: kvmem.Memory) -> MemoryOut:
        return memory.render(store.clock())

    _op_tool(mcp, store, kvmem.SetOp, SetResult, """\
        Save a memory under `key`, replacing any existing one (value, tags, TTL).

        `value` is any JSON (text, number, object, list). `tags` group related memories
        (e.g. ["preference", "project-x"]). `ttl_seconds` makes it expire; without it the
        memory is kept. `half_life_seconds` makes it fade unless reinforced (archived when
        weak). `if_version`: write only if the stored version equals it (0 = only if the
        key is new); on a mismatch the error says the current version: read, merge, retry.
        """, lambda memory: {"created": memory.version == 1, "memory": out(memory)})

    @mcp.tool()
    def memory_get(key: str, namespace: str = "default") -> GetResult:
        """Read the memory stored under exactly `key`. Returns found=false when there is
        none (or it expired or was archived). Use memory_search when unsure of the key."""
        memory = _call(lambda: store.get(key, namespace=namespace))
        if memory is None:
            return {"found": False, "memory": None}
        return {"found": True, "memory": out(memory)}

    _op_tool(mcp, store, kvmem.DeleteOp, DeleteResult, """\
        Forget a memory for good. deleted=false if there was none. With `if_version`,
        only that version is deleted.""", lambda deleted: {"deleted": deleted})

    @mcp.tool()
    def memory_list(namespace: str = "default", prefix: str | None = None,
                    tag: str | None = None, archived: bool = False, limit: int = 100,
                    cursor: str | None = None) -> ListResult:
        """List memories in key order, optionally only keys starting with `prefix` or
        having `tag`. `archived=true` lists faded (archived) memories instead. Pass
        `next_cursor` back as `cursor` for the next page (null = no more)."""
        page = _call(lambda: store.list(namespace=namespace, prefix=prefix, tag=tag,
                                        archived=archived, limit=limit, cursor=cursor))
        return {"items": [out(m) for m in page.items], "next_cursor": page.next_cursor}

    @mcp.tool()
    def memory_search(query: str, namespace: str = "default", limit: int = 20) -> SearchResult:
        """Find memories by words in their key, value or tags, best first. Ranked by
        text relevance (BM25) times current strength. `query` is plain words; quotes and
        operators are treated as text."""
        hits = _call(lambda: store.search(query, namespace=namespace, limit=limit))
        return {"items": [{**out(hit.memory), "score": hit.score} for hit in hits]}

    _op_tool(mcp, store, kvmem.ReinforceOp, ReinforceResult, """\
        Mark a memory as useful: raises its strength and restarts its fading, and
        brings back an archived one.""", lambda memory: {"memory": out(memory)})

    def memory_batch(ops: list[BatchOp], namespace: str = "default") -> BatchResult:
        """Apply several set/delete ops at once, atomically: all of them or none. Each op
        is {"op": "set", "key", "value", "tags"?, "ttl_seconds"?, "half_life_seconds"?,
        "if_version"?} or {"op": "delete", "key", "if_version"?}."""
        specs = [{k: v for k, v in op.items() if v is not None or k == "value"} for op in ops]
        results = _call(lambda: store.batch(specs, namespace=namespace))
        items: list[BatchItem] = [{"op": r["op"], "memory": out(r["memory"])} if "memory" in r
                                  else {"op": r["op"], "deleted": r["deleted"]} for r in results]
        return {"results": items}

    memory_batch.__annotations__["ops"] = list[_batch_op(store.config)]  # type: ignore[misc]
    mcp.tool()(memory_batch)

    @mcp.tool()
    def memory_stats() -> dict[str, Any]:
        """Store health and figures: settings, sizes, counts of live/archived memories."""
        return _call(store.stats)

    return mcp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmem-mcp", description="kvmem as an MCP server")
    parser.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio")
    args = kvmem_cli.parse_server_args(parser, argv)
    try:
        config = kvmem_cli.config_from_args(args)
        store = kvmem.Store.open(config=config, role="mcp", decay=True)
    except (kvmem.KvmemError, OSError) as exc:
        print(f"kvmem-mcp: {exc}", file=sys.stderr)
        return 2
    log.info("kvmem-mcp (%s) pid=%d db=%s settings=%s", args.transport, os.getpid(),
             store.path, store.settings())
    try:
        server = build_server(store)
        if args.transport == "stdio":
            server.run()
        else:
            server.run("streamable-http", host=config.host, port=config.port)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
