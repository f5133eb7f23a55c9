"""bench.py must not rot: its quick run completes and its JSON has every section.

The figures themselves are not asserted (shared, noisy machines); bench.py prints them
beside their baselines for a person to read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from testutil import HERE, child_env


def test_bench_quick_json_structure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(out),
                           "--dir", str(tmp_path)], cwd=HERE, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results) >= {"machine", "targets", "fsync_per_s", "durability_levels",
                            "group_commit", "reads", "http", "two_processes", "mcp", "scale",
                            "peers", "hostile"}
    assert results["fsync_per_s"] > 0
    for level in ("off", "normal", "full", "extra"):
        row = results["durability_levels"][level]
        assert row["raw"] > 0 and row["store"] > 0 and row["ratio"] > 0
    assert set(results["group_commit"]) == {"1", "4", "16", "64"}
    for row in results["group_commit"].values():
        assert row["writes_per_s"] > 0 and row["writes_per_commit"] >= 1
    assert results["reads"]["store_get"] > 0 and results["reads"]["raw_select"] > 0
    assert len(results["reads"]["latency"]) == 2
    rows = results["http"]["rows"]
    assert set(rows) == {f"{mode}/{n}" for mode in ("kvmem", "kvmem_group_commit_off", "naive")
                         for n in (1, 16)}
    for row in rows.values():
        for kind in ("get", "put"):
            assert row[kind]["rps"] > 0 and row[kind]["p99_ms"] >= row[kind]["p50_ms"]
            assert row[kind]["errors"] == 0
    assert results["two_processes"]["library"]["busy"] == 0
    assert results["mcp"]["stdio_startup_s"] > 0 and results["mcp"]["inprocess_p50_ms"] > 0
    assert len(results["scale"]) == 2
    assert set(results["peers"]) >= {"redis"}
    assert set(results["wal_peak_bytes"]) == {
        "fsync_limit", "durability_levels", "group_commit", "reads", "http", "two_processes",
        "mcp", "scale", "peers", "hostile"}
    assert results["wal_peak_bytes"]["group_commit"] > 0  # the watch sees kvmem's WAL files
    assert done.stdout.count("WAL: largest kvmem WAL file") == 10
    hostile = results["hostile"]
    for phase in ("baseline", "idle"):  # (the heavy phase may starve them: CPU-bound work)
        for kind in ("get", "put"):
            assert hostile[phase][kind]["rps"] > 0 and hostile[phase][kind]["errors"] == 0
    assert all(hostile[phase]["peak_rss_mib"] > 0 for phase in ("baseline", "idle", "heavy"))
    assert hostile["idle"]["hostile"]["idle_connections_held"] == 200
    assert hostile["idle"]["hostile"]["idle_closed_by_server"] == 0
    heavy = hostile["heavy"]["hostile"]
    assert heavy["batch_200"] > 0 and heavy["list_200"] > 0 and heavy["search_200"] > 0
    for name in ("store_set_extra_vs_raw_full", "store_set_off_per_s", "group_16_vs_1_thread",
                 "group_16_threads_per_s", "store_get_vs_raw_select", "http_put_vs_naive_16",
                 "http_put_vs_naive_1", "http_put_vs_get_16", "http_get_vs_naive_16",
                 "http_put_p99_ms_16", "two_processes_p99_ms", "wal_peak_mib",
                 "hostile_idle_get_p99_ms", "hostile_idle_put_p99_ms", "hostile_peak_rss_mib"):
        target = results["targets"][name]
        assert {"value", "target", "met"} <= set(target)
    assert "targets:" in done.stdout and "1. disk" in done.stdout
