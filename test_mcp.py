"""The MCP server: in-process through the SDK's Client, a real stdio subprocess, and the
two-process shape (HTTP server + MCP server on one file)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client

import http_server
import kvmem
import kvmem_cli
import mcp_server
from testutil import (
    FILTER_CASES,
    FILTER_NAMESPACES,
    FILTER_QUERY,
    HERE,
    LIST_CASES,
    Child,
    check_acknowledged,
    child_env,
    fill_filter_store,
    forged_cursor,
    found_keys,
    mark_index_rebuilding,
)

CONFIG = kvmem.Config.build(environ={})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with kvmem.Store.open(tmp_path / "kv.db", config=CONFIG, role="mcp") as opened:
        yield opened


@pytest.fixture
async def client(store: kvmem.Store) -> AsyncIterator[Client]:
    async with Client(mcp_server.build_server(store)) as c:
        yield c


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def call_error(client: Client, tool: str, code: str, **arguments: Any) -> str:
    """The tool failed with a tool error whose text starts with the kvmem code."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith(f"{code}: "), text
    assert "pydantic" not in text and "Error executing" not in text, text
    return str(text)


# ----------------------------------------------------------------- tools and schemas ----

# The published interface: a change here is a visible test failure, on purpose.
EXPECTED_TOOLS = {
    "memory_set": ({"key", "value", "namespace", "tags", "ttl_seconds", "half_life_seconds",
                    "if_version"}, ["key", "value"], {"created", "memory"}),
    "memory_get": ({"key", "namespace"}, ["key"], {"found", "memory"}),
    "memory_delete": ({"key", "namespace", "if_version"}, ["key"], {"deleted"}),
    "memory_list": ({"namespace", "prefix", "tag", "tags", "updated_after", "updated_before",
                     "archived", "limit", "cursor"}, [], {"items", "next_cursor"}),
    "memory_search": ({"query", "namespace", "tags", "prefix", "updated_after",
                       "updated_before", "limit"}, ["query"], {"items"}),
    "memory_namespaces": (set(), [], {"items"}),
    "memory_forget": ({"namespace", "prefix", "tags", "updated_after", "updated_before",
                       "dry_run"}, [], {"dry_run", "matched", "deleted", "keys", "more"}),
    "memory_reinforce": ({"key", "namespace"}, ["key"], {"memory"}),
    "memory_batch": ({"ops", "namespace"}, ["ops"], {"results"}),
    "memory_stats": (set(), [], set(kvmem_cli.STATS_SCHEMA["properties"])),
}
# (read-only, destructive, idempotent) hints of each tool
EXPECTED_HINTS = {"memory_set": (False, True, False), "memory_get": (True, False, True),
                  "memory_delete": (False, True, True), "memory_list": (True, False, True),
                  "memory_search": (True, False, True), "memory_reinforce": (False, False, False),
                  "memory_batch": (False, True, False), "memory_stats": (True, False, True),
                  "memory_namespaces": (True, False, True),
                  "memory_forget": (False, True, True)}
MEMORY_FIELDS = {"namespace", "key", "value", "tags", "version", "created_at", "updated_at",
                 "expires_at", "strength", "current_strength", "half_life_seconds",
                 "last_reinforced_at", "archived"}


@pytest.mark.anyio
async def test_tool_list_and_schemas(client: Client, store: kvmem.Store) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == set(EXPECTED_TOOLS)
    for name, (inputs, required, outputs) in EXPECTED_TOOLS.items():
        tool = tools[name]
        assert set(tool.input_schema.get("properties", {})) == inputs, name
        assert sorted(tool.input_schema.get("required", [])) == sorted(required), name
        assert tool.output_schema is not None, name
        assert set(tool.output_schema.get("properties", {})) == outputs, name
        assert tool.description and len(tool.description) > 40, name
        assert not any(line.startswith(" ") for line in tool.description.splitlines()), name
        assert tool.title and tool.annotations and tool.annotations.title == tool.title, name
        hints = tool.annotations
        assert (hints.read_only_hint, hints.destructive_hint,
                hints.idempotent_hint) == EXPECTED_HINTS[name], name
        assert tool.input_schema["additionalProperties"] is False, name
        for argument, schema in tool.input_schema["properties"].items():
            assert schema.get("description"), (name, argument)
    memory = tools["memory_get"].output_schema["$defs"]["Memory"]  # type: ignore[index]
    assert set(memory["properties"]) == MEMORY_FIELDS and set(memory["required"]) == MEMORY_FIELDS
    kinds = tools["memory_batch"].input_schema["$defs"]["BatchOp"]["oneOf"]
    assert [kind["properties"]["op"] for kind in kinds] == [{"const": "set"}, {"const": "delete"}]
    assert [kind["required"] for kind in kinds] == [["op", "key", "value"], ["op", "key"]]
    assert all(kind["additionalProperties"] is False for kind in kinds)
    stats = store.stats()  # SQLite's; test_pg_store checks PostgreSQL's against the schema
    assert set(kvmem_cli.STATS_SCHEMA["required"]) <= set(stats) \
        and set(stats) <= set(kvmem_cli.STATS_SCHEMA["properties"])
    assert tools["memory_stats"].output_schema == kvmem_cli.STATS_SCHEMA
    assert tools["memory_namespaces"].output_schema == kvmem_cli.NAMESPACE_LIST_SCHEMA


@pytest.mark.anyio
async def test_set_get_conflict(client: Client, store: kvmem.Store) -> None:
    out = await call(client, "memory_set", key="user/tea", value={"likes": "green"},
                     tags=["prefs"], namespace="agent-1")
    assert out["created"] is True and out["memory"]["version"] == 1
    assert set(out["memory"]) == MEMORY_FIELDS
    memory = store.get("user/tea", namespace="agent-1")  # the shared store really is shared
    assert memory is not None and memory.value == {"likes": "green"}
    out = await call(client, "memory_set", key="user/tea", value="oolong", if_version=1,
                     namespace="agent-1")
    assert out["created"] is False and out["memory"]["version"] == 2
    text = await call_error(client, "memory_set", "version_conflict", key="user/tea",
                            value=1, if_version=1, namespace="agent-1")
    assert "current_version=2" in text
    await call_error(client, "memory_set", "version_conflict", key="user/tea", value=1,
                     if_version=0, namespace="agent-1")
    got = await call(client, "memory_get", key="user/tea", namespace="agent-1")
    assert got["found"] is True and got["memory"]["value"] == "oolong"
    assert await call(client, "memory_get", key="nope") == {"found": False, "memory": None}


@pytest.mark.anyio
@pytest.mark.parametrize(("arguments", "fragment"), [
    ({"key": "", "value": 1}, "key"),
    ({"key": "a\nb", "value": 1}, "control"),
    ({"key": "k", "value": 1, "namespace": "bad ns"}, "namespace"),
    ({"key": "k", "value": 1, "tags": ["x" * 65]}, "tag"),
    ({"key": "k", "value": 1, "ttl_seconds": -1}, "ttl_seconds"),
    ({"key": "k", "value": 1, "if_version": -1}, "if_version"),
    ({"key": "k", "value": "x" * (1024 * 1024)}, "limit"),
])
async def test_set_invalid_input(client: Client, store: kvmem.Store, arguments: dict[str, Any],
                                 fragment: str) -> None:
    code = "payload_too_large" if fragment == "limit" else "invalid_request"
    text = await call_error(client, "memory_set", code, **arguments)
    assert fragment in text
    assert store.stats()["counts"]["live"] == 0


@pytest.mark.anyio
async def test_delete_reinforce_list_search(client: Client) -> None:
    for i in range(5):
        await call(client, "memory_set", key=f"note/{i}", value=f"green tea number {i}",
                   tags=["tea"] if i % 2 else ["other"], half_life_seconds=3600)
    await call(client, "memory_set", key="coffee", value="black coffee")
    page = await call(client, "memory_list", prefix="note/", limit=3)
    assert [m["key"] for m in page["items"]] == ["note/0", "note/1", "note/2"]
    rest = await call(client, "memory_list", prefix="note/", limit=3, cursor=page["next_cursor"])
    assert [m["key"] for m in rest["items"]] == ["note/3", "note/4"] and rest["next_cursor"] is None
    tagged = await call(client, "memory_list", tag="tea")
    assert [m["key"] for m in tagged["items"]] == ["note/1", "note/3"]
    await call_error(client, "memory_list", "invalid_request", cursor="garbage")
    await call_error(client, "memory_list", "invalid_request", limit=0)
    found = await call(client, "memory_search", query="coffee")
    assert [h["key"] for h in found["items"]] == ["coffee"] and found["items"][0]["score"] > 0
    assert (await call(client, "memory_search", query='"NEAR( * tea'))["items"]
    await call_error(client, "memory_search", "invalid_request", query="***")
    out = await call(client, "memory_reinforce", key="note/1")
    assert out["memory"]["key"] == "note/1"
    await call_error(client, "memory_reinforce", "not_found", key="missing")
    assert await call(client, "memory_delete", key="note/1") == {"deleted": True}
    assert await call(client, "memory_delete", key="note/1") == {"deleted": False}
    await call_error(client, "memory_delete", "version_conflict", key="coffee", if_version=7)


@pytest.mark.anyio
async def test_batch(client: Client, store: kvmem.Store) -> None:
    out = await call(client, "memory_batch", ops=[
        {"op": "set", "key": "a", "value": 1, "tags": ["x"]},
        {"op": "set", "key": "b", "value": {"nested": [1]}},
        {"op": "delete", "key": "zzz"}])
    assert [r["op"] for r in out["results"]] == ["set", "set", "delete"]
    assert out["results"][2]["deleted"] is False and out["results"][0]["memory"]["tags"] == ["x"]
    text = await call_error(client, "memory_batch", "version_conflict", ops=[
        {"op": "set", "key": "c", "value": 1},
        {"op": "set", "key": "a", "value": 2, "if_version": 9}])
    assert "op_index=1" in text
    assert store.get("c") is None  # all or nothing
    await call_error(client, "memory_batch", "invalid_request", ops=[{"op": "set", "key": "d"}])
    result = await client.call_tool("memory_batch", {"ops": [{"op": "upsert", "key": "d"}]})
    assert result.is_error  # refused by the input schema before the tool runs
    assert store.get("d") is None


@pytest.mark.anyio
async def test_busy_and_storage_full_are_tool_errors(tmp_path: Path) -> None:
    config = kvmem.Config.build(environ={}, flags={"busy_timeout_ms": "200"})
    with kvmem.Store.open(tmp_path / "busy.db", config=config) as store:
        async with Client(mcp_server.build_server(store)) as client:
            holder = kvmem.open_db(tmp_path / "busy.db", config=config)
            holder.execute("BEGIN IMMEDIATE")
            try:
                text = await call_error(client, "memory_set", "busy", key="k", value=1)
                assert "retry" in text
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            pages = store.stats()["page_count"]
            store._writer.submit(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 2}"))
            text = await call_error(client, "memory_set", "storage_full", key="big",
                                    value="x" * 300_000)
            assert "reads still work" in text
            assert (await call(client, "memory_get", key="big"))["found"] is False


@pytest.mark.anyio
async def test_stats(client: Client) -> None:
    out = await call(client, "memory_stats")
    assert out["settings"]["journal_mode"] == "wal" and out["settings"]["synchronous"] == "extra"
    assert out["pid"] == os.getpid() and out["health"]["ok"] is True
    with anyio.fail_after(10):  # the checkpointer takes the lock on its first poll
        while not out["checkpointer"]["holder"]:
            await anyio.sleep(0.01)
            out = await call(client, "memory_stats")


# ------------------------------------------------------------------ real processes ----


def stdio_params(db: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable,
                                 args=[os.path.join(HERE, "mcp_server.py"), "--db", db,
                                       "--log-level", "WARNING"],
                                 env=child_env(), cwd=HERE)


@pytest.mark.anyio
async def test_real_stdio_subprocess(tmp_path: Path) -> None:
    async with stdio_client(stdio_params(str(tmp_path / "kv.db"))) as (read, write), \
            ClientSession(read, write) as session:
        init = await session.initialize()
        assert init.server_info.name == "kvmem"
        assert {t.name for t in (await session.list_tools()).tools} == set(EXPECTED_TOOLS)
        result = await session.call_tool("memory_set", {"key": "k", "value": "stdio works"})
        assert not result.is_error and result.structured_content["created"] is True
        result = await session.call_tool("memory_get", {"key": "k"})
        assert result.structured_content["memory"]["value"] == "stdio works"
        result = await session.call_tool("memory_search", {"query": "stdio"})
        assert [h["key"] for h in result.structured_content["items"]] == ["k"]


def http_json(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.anyio
async def test_http_and_mcp_processes_share_one_file(tmp_path: Path) -> None:
    db = str(tmp_path / "fresh.db")  # does not exist yet: both servers race to create it
    http_child = Child("serve_http", "--db", db, "--port", "0", "--log-level", "WARNING")
    async with stdio_client(stdio_params(db)) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        port = int(http_child.expect("listening on").rsplit(":", 1)[1])
        problems: list[str] = []
        http_keys: list[str] = []
        stop = threading.Event()

        def http_writer(t: int) -> None:
            i = 0
            while not stop.is_set():
                status, body = http_json(port, "PUT", f"/v1/memories/h{t}-{i}", {"value": i})
                if status != 201:
                    problems.append(f"http {status} {body}")
                else:
                    http_keys.append(f"h{t}-{i}")
                i += 1

        writers = [threading.Thread(target=http_writer, args=(t,)) for t in range(2)]
        for writer in writers:
            writer.start()
        mcp_keys = []
        try:
            with anyio.move_on_after(3):
                i = 0
                while True:
                    result = await session.call_tool("memory_set", {"key": f"m{i}", "value": i})
                    if result.is_error:
                        problems.append(f"mcp {result.content}")
                    else:
                        mcp_keys.append(f"m{i}")
                    i += 1
        finally:
            stop.set()
            for writer in writers:
                writer.join()
        assert problems == []
        assert len(mcp_keys) > 10 and len(http_keys) > 10
        # Each side reads the other's writes.
        for key in mcp_keys[-5:]:
            assert http_json(port, "GET", f"/v1/memories/{key}")[0] == 200
        for key in http_keys[-5:]:
            result = await session.call_tool("memory_get", {"key": key})
            assert result.structured_content["found"] is True
        _, http_stats = http_json(port, "GET", "/v1/stats")
        result = await session.call_tool("memory_stats", {})
        mcp_stats = result.structured_content
        assert mcp_stats is not None
        assert http_stats["settings"] == mcp_stats["settings"]
        assert http_stats["settings"]["journal_mode"] == "wal"
        holders = [http_stats["checkpointer"]["holder"], mcp_stats["checkpointer"]["holder"]]
        assert sorted(holders) == [False, True], holders  # exactly one checkpointer
        for stats in (http_stats, mcp_stats):
            assert stats["health"]["ok"] and stats["schema_version"] == kvmem.SCHEMA_VERSION
    http_child.proc.send_signal(signal.SIGTERM)
    assert http_child.wait() == 0
    for line in http_child.stderr.splitlines():
        assert "database is locked" not in line and "not a database" not in line


@pytest.mark.anyio
async def test_stdio_server_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    db = str(tmp_path / "kv.db")
    acked: dict[str, int] = {}
    for run in range(3):
        def killer(pid: int, target: int) -> None:  # kills once enough writes were acked
            while len(acked) < target:
                threading.Event().wait(0.001)
            os.kill(pid, signal.SIGKILL)

        try:
            with anyio.fail_after(120):
                async with stdio_client(stdio_params(db)) as (read, write), \
                        ClientSession(read, write) as session:
                    await session.initialize()
                    stats = await session.call_tool("memory_stats", {})
                    pid = stats.structured_content["pid"]
                    threading.Thread(target=killer, args=(pid, len(acked) + 40 + 30 * run),
                                     daemon=True).start()
                    for i in range(100_000):
                        result = await session.call_tool("memory_set",
                                                         {"key": f"r{run}-{i}", "value": i})
                        if result.is_error:
                            break
                        acked[f"r{run}-{i}"] = result.structured_content["memory"]["version"]
        except Exception as exc:  # the session dies with its server; later calls are not acked
            assert not isinstance(exc, TimeoutError), "the client hung after the kill"
    assert len(acked) >= 100
    check_acknowledged(db, acked, config=CONFIG)


# One valid call of each tool, for the tests that add something wrong to it.
VALID_CALLS: dict[str, dict[str, Any]] = {
    "memory_set": {"key": "k", "value": 1}, "memory_get": {"key": "k"},
    "memory_delete": {"key": "k"}, "memory_list": {}, "memory_search": {"query": "tea"},
    "memory_reinforce": {"key": "k"}, "memory_batch": {"ops": [{"op": "set", "key": "k",
                                                                "value": 2}]},
    "memory_stats": {}, "memory_namespaces": {}, "memory_forget": {"prefix": "k"},
}


def snapshot(store: kvmem.Store) -> list[dict[str, Any]]:
    return [m.to_record() for m in store.list(limit=1000).items]


@pytest.mark.anyio
@pytest.mark.parametrize("tool", sorted(EXPECTED_TOOLS))
async def test_every_tool_refuses_an_unknown_argument(client: Client, store: kvmem.Store,
                                                     tool: str) -> None:
    await call(client, "memory_set", key="k", value=0)
    assert set(VALID_CALLS) == set(EXPECTED_TOOLS)
    await call(client, tool, **VALID_CALLS[tool])  # the call is valid without the extra one
    before = snapshot(store)
    text = await call_error(client, tool, "invalid_request", **VALID_CALLS[tool],
                            unknown_argument=1)
    assert f"unknown argument 'unknown_argument' for {tool}" in text
    assert snapshot(store) == before  # refused whole: a set or batch wrote nothing


@pytest.mark.anyio
@pytest.mark.parametrize(("arguments", "named", "hint"), [
    ({"key": "temp", "value": 1, "ttl": 60}, "ttl", "ttl_seconds"),
    ({"key": "k", "value": 1, "name_space": "agent-2"}, "name_space", "namespace"),
    ({"key": "k", "value": 1, "tag": "prefs"}, "tag", "tags"),
])
async def test_a_misspelled_argument_is_refused_with_the_right_name(
        client: Client, store: kvmem.Store, arguments: dict[str, Any], named: str,
        hint: str) -> None:
    text = await call_error(client, "memory_set", "invalid_request", **arguments)
    assert f"'{named}'" in text and f"did you mean '{hint}'" in text, text
    assert snapshot(store) == []


@pytest.mark.anyio
@pytest.mark.parametrize(("tool", "arguments", "fragment"), [
    ("memory_set", {"key": "k"}, "needs 'value'"),
    ("memory_set", {"key": 123, "value": 1}, "key must be a string"),
    ("memory_set", {"key": "k", "value": 1, "tags": "prefs"}, "tags must be a list"),
    ("memory_set", {"key": "k", "value": 1, "ttl_seconds": True}, "ttl_seconds"),
    ("memory_set", {"key": "k", "value": 1, "ttl_seconds": "60"}, "ttl_seconds"),
    ("memory_set", {"key": "k", "value": 1, "if_version": "0"}, "if_version"),
    ("memory_set", {"key": "k", "value": 1, "if_version": 0.5}, "if_version"),
    ("memory_set", {"key": "k", "value": 1, "half_life_seconds": "never"}, '"default"'),
    ("memory_set", {"key": None, "value": 1}, "key must be a string"),
    ("memory_get", {"key": "k", "namespace": None}, "namespace"),
    ("memory_list", {"limit": "ten"}, "limit"),
    ("memory_list", {"limit": True}, "limit"),
    ("memory_list", {"archived": "yes"}, "archived"),
    ("memory_search", {"query": "x", "limit": 1.5}, "limit"),
    ("memory_batch", {"ops": [{"op": "get", "key": "k"}]}, "ops[0]: op must be one of"),
    ("memory_batch", {"ops": "x"}, "ops must be a non-empty list"),
    ("memory_batch", {"ops": [{"op": "set", "key": "k", "value": 1, "namespace": "x"}]},
     "unknown field 'namespace'"),
    ("memory_nope", {}, "unknown tool 'memory_nope'"),
    ("memory_list", {"cursor": forged_cursor("\ud800")}, "cursor"),
])
async def test_bad_arguments_are_kvmem_errors_and_change_nothing(
        client: Client, store: kvmem.Store, tool: str, arguments: dict[str, Any],
        fragment: str) -> None:
    text = await call_error(client, tool, "invalid_request", **arguments)
    assert fragment in text, text
    assert snapshot(store) == []


# (tool, arguments, whether kvmem takes them): the published schema must say the same.
SCHEMA_CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("memory_set", {"key": "a\x00b", "value": 1}, False),
    ("memory_set", {"key": "a\x85b", "value": 1}, False),
    ("memory_set", {"key": "k", "value": 1, "tags": ["\x1f"]}, False),
    ("memory_set", {"key": "k", "value": 1, "if_version": 0.0}, True),
    ("memory_set", {"key": "k", "value": 1, "half_life_seconds": "default"}, True),
    ("memory_set", {"key": "k", "value": 1, "half_life_seconds": "Default"}, False),
    ("memory_set", {"key": "k" * 513, "value": 1}, False),
    ("memory_list", {"prefix": "a\x7f"}, False),
    ("memory_list", {"limit": 2.0}, True),
    ("memory_list", {"tag": None, "prefix": None, "cursor": None}, True),
    ("memory_list", {"tags": None, "updated_after": None, "updated_before": None}, True),
    ("memory_list", {"tags": ["a", "b"], "updated_after": 1,
                     "updated_before": "2023-01-01T00:00:00Z"}, True),
    ("memory_list", {"tags": "a"}, False),
    ("memory_list", {"tags": [""]}, False),
    ("memory_list", {"updated_after": True}, False),
    ("memory_list", {"namespace": ["a", "b"]}, False),
    ("memory_list", {"namespace": "*"}, False),
    ("memory_search", {"query": "tea", "namespace": "*"}, True),
    ("memory_search", {"query": "tea", "namespace": ["a", "b"], "tags": ["x"], "prefix": "p",
                       "updated_after": 1.5, "updated_before": "2023-01-01T00:00:00+01:00"},
     True),
    ("memory_search", {"query": "tea", "namespace": None, "tags": None, "prefix": None,
                       "updated_after": None, "updated_before": None}, False),
    ("memory_search", {"query": "tea", "tags": None, "prefix": None,
                       "updated_after": None, "updated_before": None}, True),
    ("memory_search", {"query": "tea", "namespace": []}, False),
    ("memory_search", {"query": "tea", "namespace": ["*"]}, False),
    ("memory_search", {"query": "tea", "namespace": ["a", "bad ns"]}, False),
    ("memory_search", {"query": "tea", "namespace": [f"n{i}" for i in range(101)]}, False),
    ("memory_search", {"query": "tea", "tags": [f"t{i}" for i in range(33)]}, False),
    ("memory_search", {"query": "tea", "prefix": "a\x00"}, False),
    ("memory_search", {"query": "tea", "updated_before": [1]}, False),
    ("memory_namespaces", {}, True),
    ("memory_forget", {}, False),
    ("memory_forget", {"prefix": None, "tags": None}, False),
    ("memory_forget", {"prefix": ""}, False),
    ("memory_forget", {"prefix": "k", "tags": []}, True),
    ("memory_forget", {"tags": ["t"], "dry_run": "no"}, False),
    ("memory_forget", {"prefix": "a\x00"}, False),
    ("memory_search", {"query": "x" * (kvmem.MAX_QUERY_CHARS + 1)}, False),
    ("memory_search", {"query": "tea", "limit": 101}, False),
    ("memory_batch", {"ops": [{"op": "delete", "key": "k", "value": 1}]}, False),
    ("memory_batch", {"ops": [{"op": "set", "key": "k"}]}, False),
    ("memory_batch", {"ops": [{"op": "set", "key": "k", "value": 1, "ttl_seconds": 5}]}, True),
    ("memory_batch", {"ops": []}, False),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("tool", "arguments", "taken"), SCHEMA_CASES)
async def test_the_published_schema_says_what_the_tool_takes(
        client: Client, tool: str, arguments: dict[str, Any], taken: bool) -> None:
    schema = {t.name: t.input_schema for t in (await client.list_tools()).tools}[tool]
    assert jsonschema.Draft202012Validator(schema).is_valid(arguments) is taken
    result = await client.call_tool(tool, arguments)
    assert result.is_error is not taken, result.content


@pytest.mark.anyio
async def test_half_life_null_never_fades_and_default_takes_the_setting(tmp_path: Path) -> None:
    config = kvmem.Config.build(environ={}, flags={"default_half_life_s": "100"})
    with kvmem.Store.open(tmp_path / "kv.db", config=config) as store:
        async with Client(mcp_server.build_server(store)) as client:
            for key, extra, want in (("omitted", {}, 100.0), ("null", {"half_life_seconds": None},
                                     None), ("default", {"half_life_seconds": "default"}, 100.0),
                                     ("given", {"half_life_seconds": 5}, 5.0)):
                out = await call(client, "memory_set", key=key, value=1, tags=None, **extra)
                assert out["memory"]["half_life_seconds"] == want, key
                assert out["memory"]["tags"] == []
                batch = await call(client, "memory_batch", ops=[
                    {"op": "set", "key": f"b-{key}", "value": 1, **extra}])
                assert batch["results"][0]["memory"]["half_life_seconds"] == want, key
        assert store.get("null") is not None and store.get("null").half_life_seconds is None  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_results_are_compact_json_of_the_structured_content(client: Client) -> None:
    await call(client, "memory_set", key="k", value="a short note")
    result = await client.call_tool("memory_get", {"key": "k"})
    text = result.content[0].text  # type: ignore[union-attr]
    assert json.loads(text) == result.structured_content
    assert text == json.dumps(result.structured_content, ensure_ascii=False,
                              separators=(",", ":"))


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.anyio
async def test_nesting_limit_is_the_same_for_both_interfaces_and_stored_values_read_back(
        client: Client, store: kvmem.Store) -> None:
    deepest = nested(kvmem.MAX_NESTING)
    await call(client, "memory_set", key="deep", value=deepest)
    got = await call(client, "memory_get", key="deep")
    assert got["memory"]["value"] == deepest
    listed = await call(client, "memory_list")
    assert [m["value"] for m in listed["items"]] == [deepest]
    text = await call_error(client, "memory_set", "invalid_request", key="deeper",
                            value=nested(kvmem.MAX_NESTING + 1))
    assert f"more than {kvmem.MAX_NESTING} levels" in text
    with pytest.raises(kvmem.InvalidInputError, match="levels"):
        store.set("deeper", nested(kvmem.MAX_NESTING + 1))  # the library and so HTTP too
    assert [m["key"] for m in snapshot(store)] == ["deep"]


@pytest.mark.anyio
async def test_argument_schemas_carry_the_store_limits(tmp_path: Path) -> None:
    config = kvmem.Config.build(environ={}, flags={"max_key_chars": "7", "max_tags": "2"})
    with kvmem.Store.open(tmp_path / "kv.db", config=config) as store:
        async with Client(mcp_server.build_server(store)) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            op = tools["memory_batch"].input_schema["$defs"]["BatchOp"]["oneOf"][0]["properties"]
            for schema in (tools["memory_set"].input_schema["properties"], op):
                assert schema["key"]["maxLength"] == 7 and schema["tags"]["maxItems"] == 2
            assert tools["memory_delete"].input_schema["properties"]["key"]["maxLength"] == 7
            await call_error(client, "memory_set", "invalid_request", key="eight..", value=1,
                             tags=["a", "b", "c"])
            # The filters' and namespaces' schemas are kvmem's, with these limits.
            filters = kvmem.filter_schemas(config)
            assert filters["tags"]["maxItems"] == 2 and filters["prefix"]["maxLength"] == 7
            for tool in ("memory_search", "memory_list"):
                arguments = tools[tool].input_schema["properties"]
                for name, schema in filters.items():
                    assert arguments[name]["anyOf"] == [schema, {"type": "null"}], (tool, name)
            assert tools["memory_search"].input_schema["properties"]["namespace"] \
                == kvmem.search_namespaces_schema(config)
            await call_error(client, "memory_search", "invalid_request", query="tea",
                             tags=["a", "b", "c"])


# ------------------------------------------------ search and list filters, namespaces ----


@pytest.fixture
async def filtered(tmp_path: Path) -> AsyncIterator[tuple[Client, kvmem.Store]]:
    """A client of a server over a store holding testutil's FILTER_MEMORIES."""
    clock = [0.0]
    with kvmem.Store.open(tmp_path / "filtered.db", config=CONFIG, role="mcp",
                          clock=lambda: clock[0]) as store:
        fill_filter_store(store, clock)
        async with Client(mcp_server.build_server(store)) as c:
            yield c, store


@pytest.mark.anyio
async def test_search_filters(filtered: tuple[Client, kvmem.Store]) -> None:
    client, _ = filtered
    for filters, expected in FILTER_CASES:
        out = await call(client, "memory_search", query=FILTER_QUERY, **filters)
        assert found_keys(out["items"]) == expected, filters
        assert all(hit["score"] > 0 for hit in out["items"])


@pytest.mark.anyio
async def test_list_filters(filtered: tuple[Client, kvmem.Store]) -> None:
    client, _ = filtered
    for filters, expected in LIST_CASES:
        out = await call(client, "memory_list", **filters)
        assert found_keys(out["items"]) == expected, filters
        assert out["next_cursor"] is None
    first = await call(client, "memory_list", namespace="alpha", tags=["hot"], limit=1)
    assert found_keys(first["items"]) == {"alpha/food/rice"}
    rest = await call(client, "memory_list", namespace="alpha", tags=["hot"], limit=1,
                      cursor=first["next_cursor"])
    assert found_keys(rest["items"]) == {"alpha/tea/green"}
    both = await call(client, "memory_list", namespace="alpha", tag="drink", tags=["hot"])
    assert found_keys(both["items"]) == {"alpha/tea/green"}  # tag is one more of tags


@pytest.mark.anyio
async def test_namespaces(filtered: tuple[Client, kvmem.Store], client: Client) -> None:
    result = await filtered[0].call_tool("memory_namespaces", {})
    assert not result.is_error and result.structured_content == {"items": FILTER_NAMESPACES}
    assert json.loads(result.content[0].text) == {"items": FILTER_NAMESPACES}  # type: ignore[union-attr]
    jsonschema.validate(result.structured_content, kvmem_cli.NAMESPACE_LIST_SCHEMA)
    assert await call(client, "memory_namespaces") == {"items": []}  # an empty store


BAD_FILTERS: list[dict[str, Any]] = [
    {"tags": "hot"}, {"tags": [""]}, {"tags": ["a\x00"]}, {"tags": [1]},
    {"tags": [f"t{i}" for i in range(CONFIG.max_tags + 1)]},
    {"prefix": "a\x00b"}, {"prefix": 5}, {"prefix": "p" * (CONFIG.max_key_chars + 1)},
    {"updated_after": "yesterday"}, {"updated_after": "2023-01-01T00:00:00"},  # no zone
    {"updated_before": -5}, {"updated_before": True}, {"updated_after": 1e40},
    {"updated_before": [1]},
]


@pytest.mark.anyio
@pytest.mark.parametrize(("tool", "arguments"), [
    *[("memory_search", {"query": "tea", "namespace": "*", **bad}) for bad in BAD_FILTERS],
    *[("memory_list", {"namespace": "alpha", **bad}) for bad in BAD_FILTERS],
    ("memory_search", {"query": "tea", "namespace": []}),
    ("memory_search", {"query": "tea", "namespace": ["*", "alpha"]}),
    ("memory_search", {"query": "tea", "namespace": ["alpha", "bad ns"]}),
    ("memory_search", {"query": "tea", "namespace": [f"n{i}" for i in range(101)]}),
    ("memory_search", {"query": "tea", "namespace": 5}),
    ("memory_search", {"query": "tea", "namespace": None}),
    ("memory_list", {"namespace": ["alpha"]}),
    ("memory_list", {"namespace": "*"}),
    ("memory_namespaces", {"namespace": "alpha"}),
])
async def test_bad_filters_are_invalid_request_and_change_nothing(
        filtered: tuple[Client, kvmem.Store], tool: str, arguments: dict[str, Any]) -> None:
    client, store = filtered
    before = store.namespaces(), snapshot(store)
    await call_error(client, tool, "invalid_request", **arguments)
    assert (store.namespaces(), snapshot(store)) == before


@pytest.mark.anyio
async def test_search_during_an_index_rebuild_is_a_busy_error(
        filtered: tuple[Client, kvmem.Store]) -> None:
    """An upgraded file whose search index is still being rebuilt (as migration 3 leaves
    it): memory_search is a busy tool error that says so; the other tools work."""
    client, store = filtered
    mark_index_rebuilding(store.path)
    text = await call_error(client, "memory_search", "busy", query="tea", namespace="*",
                            tags=["hot"])
    assert "rebuilt" in text and "retry" in text and "the database is busy" not in text
    assert await call(client, "memory_namespaces") == {"items": FILTER_NAMESPACES}
    listed = await call(client, "memory_list", namespace="alpha", tags=["drink"])
    assert found_keys(listed["items"]) == {"alpha/tea/black", "alpha/tea/green"}


# --------------------------------------------------------- one meaning on both interfaces ----

SAME_INPUTS: list[dict[str, Any]] = [
    {"value": {"likes": "green tea"}},
    {"value": 1, "half_life_seconds": None},
    {"value": 1, "half_life_seconds": "default"},
    {"value": 1, "half_life_seconds": 5},
    {"value": "x", "tags": ["b", "a", "b"], "ttl_seconds": 60},
    {"value": None, "tags": None, "ttl_seconds": None, "if_version": None},
    {"value": nested(kvmem.MAX_NESTING)},
    {"value": "[1]"}, {"value": "null"}, {"value": "60", "tags": ["1"]},  # strings stay strings
]
REFUSED_INPUTS: list[dict[str, Any]] = [
    {"value": nested(kvmem.MAX_NESTING + 1)}, {"value": 1, "ttl_seconds": True},
    {"value": 1, "if_version": "0"}, {"value": 1, "half_life_seconds": "x"},
    {"value": 1, "tags": "prefs"}, {"value": 1, "ttl": 60},
]


def comparable(store: kvmem.Store) -> dict[str, dict[str, Any]]:
    """Every memory, without the times of its writing (its TTL kept as a duration)."""
    out = {}
    for memory in store.list(limit=1000).items:
        record = memory.to_record()
        ttl = None if memory.expires_at is None else round(memory.expires_at - memory.updated_at, 3)
        for name in ("created_at", "updated_at", "last_reinforced_at", "expires_at"):
            del record[name]
        out[memory.key] = {**record, "ttl": ttl}
    return out


@pytest.mark.anyio
async def test_http_and_mcp_store_identical_memories_for_the_same_inputs(tmp_path: Path) -> None:
    config = kvmem.Config.build(environ={}, flags={"default_half_life_s": "100"})
    with kvmem.Store.open(tmp_path / "http.db", config=config) as via_http, \
            kvmem.Store.open(tmp_path / "mcp.db", config=config) as via_mcp:
        server = http_server.build_server(via_http, "127.0.0.1", 0, "")
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        port = server.server_address[1]
        try:
            async with Client(mcp_server.build_server(via_mcp)) as client:
                for i, body in enumerate(SAME_INPUTS):
                    status, answer = await anyio.to_thread.run_sync(
                        http_json, port, "PUT", f"/v1/memories/set-{i}", body)
                    assert status == 201, answer
                    await call(client, "memory_set", key=f"set-{i}", **body)
                ops = [{"op": "set", "key": f"batch-{i}", **body}
                       for i, body in enumerate(SAME_INPUTS)]
                status, answer = await anyio.to_thread.run_sync(
                    http_json, port, "POST", "/v1/batch", {"ops": ops})
                assert status == 200, answer
                await call(client, "memory_batch", ops=ops)
                for body in REFUSED_INPUTS:
                    status, answer = await anyio.to_thread.run_sync(
                        http_json, port, "PUT", "/v1/memories/refused", body)
                    assert (status, answer["error"]["code"]) == (400, "invalid_request"), body
                    await call_error(client, "memory_set", "invalid_request", key="refused",
                                     **body)
        finally:
            server.stop()
            thread.join()
        stored_http, stored_mcp = comparable(via_http), comparable(via_mcp)
    assert len(stored_http) == 2 * len(SAME_INPUTS)
    assert stored_http == stored_mcp
    half_lives = [stored_mcp[f"set-{i}"]["half_life_seconds"] for i in range(4)]
    assert half_lives == [100.0, None, 100.0, 5.0]



@pytest.mark.anyio
async def test_forget_is_a_dry_run_unless_told_otherwise(client: Client,
                                                         store: kvmem.Store) -> None:
    for key in ("tmp/a", "tmp/b", "keep"):
        store.set(key, key)
    report = await call(client, "memory_forget", prefix="tmp/")
    assert report == {"dry_run": True, "matched": 2, "deleted": 0, "keys": ["tmp/a", "tmp/b"],
                      "more": False}
    assert len(store.list().items) == 3
    report = await call(client, "memory_forget", prefix="tmp/", dry_run=False)
    assert report["deleted"] == 2 and not report["dry_run"]
    assert [m.key for m in store.list().items] == ["keep"]
    message = await call_error(client, "memory_forget", "invalid_request")
    assert "forget needs a prefix or tags" in message
