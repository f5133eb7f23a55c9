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
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from typing_extensions import NotRequired, TypedDict  # noqa: UP035 (pydantic needs these on 3.11)

import kvmem

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


class MemoryOut(TypedDict):
    namespace: str
    key: str
    value: Any
    tags: list[str]
    version: int
    created_at: str
    updated_at: str
    expires_at: str | None
    strength: float
    current_strength: float
    half_life_seconds: float | None
    last_reinforced_at: str
    archived: bool


class HitOut(MemoryOut):
    score: float


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


class BatchOp(TypedDict):
    op: Literal["set", "delete"]
    key: str
    value: NotRequired[Any]
    tags: NotRequired[list[str] | None]
    ttl_seconds: NotRequired[float | None]
    half_life_seconds: NotRequired[float | None]
    if_version: NotRequired[int | None]


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


def _out(memory: kvmem.Memory, now: float) -> MemoryOut:
    rendered: MemoryOut = memory.render(now)  # type: ignore[assignment]
    return rendered


def build_server(store: kvmem.Store) -> MCPServer[None]:
    """The MCP server over ``store`` (opened once per process by the caller)."""
    mcp: MCPServer[None] = MCPServer("kvmem", version="0.1.0", instructions=INSTRUCTIONS)

    @mcp.tool()
    def memory_set(key: str, value: Any, namespace: str = "default",
                   tags: list[str] | None = None, ttl_seconds: float | None = None,
                   half_life_seconds: float | None = None,
                   if_version: int | None = None) -> SetResult:
        """Save a memory under `key`, replacing any existing one (value, tags, TTL).

        `value` is any JSON (text, number, object, list). `tags` group related memories
        (e.g. ["preference", "project-x"]). `ttl_seconds` makes it expire; without it the
        memory is kept. `half_life_seconds` makes it fade unless reinforced (archived when
        weak). `if_version`: write only if the stored version equals it (0 = only if the
        key is new); on a mismatch the error says the current version: read, merge, retry.
        """
        half_life = kvmem._DEFAULT if half_life_seconds is None else half_life_seconds
        memory = _call(lambda: store.set(key, value, namespace=namespace, tags=tags,
                                         ttl_seconds=ttl_seconds, half_life_seconds=half_life,
                                         if_version=if_version))
        return {"created": memory.version == 1, "memory": _out(memory, store.clock())}

    @mcp.tool()
    def memory_get(key: str, namespace: str = "default") -> GetResult:
        """Read the memory stored under exactly `key`. Returns found=false when there is
        none (or it expired or was archived). Use memory_search when unsure of the key."""
        memory = _call(lambda: store.get(key, namespace=namespace))
        if memory is None:
            return {"found": False, "memory": None}
        return {"found": True, "memory": _out(memory, store.clock())}

    @mcp.tool()
    def memory_delete(key: str, namespace: str = "default",
                      if_version: int | None = None) -> DeleteResult:
        """Forget a memory for good. deleted=false if there was none. With `if_version`,
        only that version is deleted."""
        deleted = _call(lambda: store.delete(key, namespace=namespace, if_version=if_version))
        return {"deleted": deleted}

    @mcp.tool()
    def memory_list(namespace: str = "default", prefix: str | None = None,
                    tag: str | None = None, archived: bool = False, limit: int = 100,
                    cursor: str | None = None) -> ListResult:
        """List memories in key order, optionally only keys starting with `prefix` or
        having `tag`. `archived=true` lists faded (archived) memories instead. Pass
        `next_cursor` back as `cursor` for the next page (null = no more)."""
        page = _call(lambda: store.list(namespace=namespace, prefix=prefix, tag=tag,
                                        archived=archived, limit=limit, cursor=cursor))
        now = store.clock()
        return {"items": [_out(m, now) for m in page.items], "next_cursor": page.next_cursor}

    @mcp.tool()
    def memory_search(query: str, namespace: str = "default", limit: int = 20) -> SearchResult:
        """Find memories by words in their key, value or tags, best first. Ranked by
        text relevance (BM25) times current strength. `query` is plain words; quotes and
        operators are treated as text."""
        hits = _call(lambda: store.search(query, namespace=namespace, limit=limit))
        now = store.clock()
        items: list[HitOut] = []
        for hit in hits:
            item: HitOut = {**_out(hit.memory, now), "score": hit.score}
            items.append(item)
        return {"items": items}

    @mcp.tool()
    def memory_reinforce(key: str, namespace: str = "default") -> ReinforceResult:
        """Mark a memory as useful: raises its strength and restarts its fading, and
        brings back an archived one."""
        memory = _call(lambda: store.reinforce(key, namespace=namespace))
        return {"memory": _out(memory, store.clock())}

    @mcp.tool()
    def memory_batch(ops: list[BatchOp], namespace: str = "default") -> BatchResult:
        """Apply several set/delete ops at once, atomically: all of them or none. Each op
        is {"op": "set", "key", "value", "tags"?, "ttl_seconds"?, "half_life_seconds"?,
        "if_version"?} or {"op": "delete", "key", "if_version"?}."""
        specs = [{k: v for k, v in op.items() if v is not None or k == "value"} for op in ops]
        results = _call(lambda: store.batch(specs, namespace=namespace))
        now = store.clock()
        out: list[BatchItem] = []
        for result in results:
            if result["op"] == "set":
                out.append({"op": "set", "memory": _out(result["memory"], now)})
            else:
                out.append({"op": "delete", "deleted": result["deleted"]})
        return {"results": out}

    @mcp.tool()
    def memory_stats() -> dict[str, Any]:
        """Store health and figures: settings, sizes, counts of live/archived memories."""
        stats = _call(store.stats)
        stats["config"] = store.config.public()
        stats["pid"] = os.getpid()
        return stats

    return mcp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmem-mcp", description="kvmem as an MCP server")
    parser.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio")
    parser.add_argument("--log-level", default="INFO")
    kvmem.add_config_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = kvmem.config_from_args(args)
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
