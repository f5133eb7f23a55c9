"""Hostile clients and operator mistakes (#15): files deleted or replaced under running
processes, and the HTTP server's bounds (connections, timeouts, memory) under clients that
misbehave.  Real processes, real sockets, real files; every wait is on a condition."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

import kvmem
from testutil import Child, check_acknowledged, child_env

CONFIG = kvmem.Config.build(environ={})


def _http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# --------------------------------------------------- sidecars deleted or replaced ----


def _acks(lines: list[str]) -> dict[str, int]:
    return {f[1]: int(f[2]) for f in (line.split() for line in lines)
            if len(f) == 4 and f[0] == "set" and f[3] == "ok"}


@pytest.mark.parametrize("how", ["deleted", "replaced"])
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
    env = child_env(KVMEM_CHECKPOINT_POLL_S="0.05")
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
    if how == "deleted":
        os.unlink(path)
    else:  # a copy put in its place, as a restore or a sync tool would
        shutil.copyfile(path, path + ".copy")
        os.replace(path + ".copy", path)

    status, health = _http(port, "GET", "/healthz")
    assert status == 503 and not health["ok"], health
    assert any(path in problem and "refused" in problem for problem in health["problems"])
    status, body = _http(port, "PUT", "/v1/memories/after", {"value": 1})
    assert status == 503 and body["error"]["code"] == "storage_error", body
    assert "refused" in body["error"]["message"] and path in body["error"]["message"]
    refused = writer.expect("refused")
    assert refused.split()[2:] == ["storage_error", "False"], refused
    writer.expect("refused")  # and the next one too

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
