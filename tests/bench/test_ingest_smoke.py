"""The ingest, end-to-end and memory benchmarks run and print their figures.

Smoke runs only: a few seconds each, as subprocesses, with their results
written to a scratch folder. The figures' values are not judged here; on a
shared CI machine they mean little.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.e2e


def run_bench(module: str, tmp_path, *extra: str) -> tuple[str, dict]:
    """Run ``python -m bench.<module> --smoke``; its output and its result line."""
    finished = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--smoke", *extra],
        cwd=ROOT,
        env={**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    [line] = (tmp_path / f"{module}.jsonl").read_text().splitlines()
    return finished.stdout, json.loads(line)


def test_ingest(tmp_path):
    output, result = run_bench("ingest", tmp_path)

    assert "ratio" in output and "p99" in output
    figures = result["figures"]
    for name in ("relay", "noop"):
        assert figures[name]["requests"] > 0
        assert {"requests_per_second", "p50_ms", "p99_ms"} <= figures[name].keys()
    assert "ratio_to_noop" in figures
    assert figures["jobs_in_redis"] >= figures["relay"]["accepted"]
    assert result["settings"]["smoke"] is True
    assert {"python", "cpus", "versions"} <= result["machine"].keys()


def test_end_to_end(tmp_path):
    output, result = run_bench("end_to_end", tmp_path)

    assert "p50" in output and "COPERNICA_MAX_RPS=" in output
    figures = result["figures"]
    assert figures["sent"] > 0
    assert {"p50_ms", "p99_ms", "undelivered", "delivered"} <= figures.keys()
    assert result["settings"]["copernica_max_rps"]


def test_memory(tmp_path):
    output, result = run_bench("memory", tmp_path)

    assert "RSS" in output and "per dedupe key" in output
    figures = result["figures"]
    assert len(figures["web_worker_rss_mb"]) == len(figures["worker_rss_mb"]) == 3
    for queued in figures["redis_bytes_per_queued_event"].values():
        assert queued["job_hash"] > 0
    assert figures["redis_bytes_per_dedupe_key"] > 0
