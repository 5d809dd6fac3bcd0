"""The delivery benchmarks run, print their figures and record them (smoke mode).

The figures themselves are not checked: they depend on the machine. The full
runs are documented in README's Performance section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.e2e


def run_smoke(module: str, results) -> tuple[str, dict]:
    env = {**os.environ, "BENCH_RESULTS_DIR": str(results)}
    done = subprocess.run(
        [sys.executable, "-m", module, "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    name = module.removeprefix("bench.")
    [line] = (results / f"{name}.jsonl").read_text().splitlines()
    return done.stdout, json.loads(line)


def test_delivery_benchmark_prints_its_rates_and_ratios(tmp_path):
    printed, entry = run_smoke("bench.delivery", tmp_path)

    figures = entry["figures"]
    for name in (
        "deliveries_per_second",
        "noop_jobs_per_second",
        "ratio_to_noop",
        "forking_worker_deliveries_per_second",
        "ratio_to_forking_worker",
        "redis_commands_per_delivery",
    ):
        assert f'"{name}"' in printed
        assert figures[name] > 0
    assert figures["puts_received"] >= figures["deliveries"]
    assert entry["machine"]["versions"]["rq"]
    assert entry["settings"]["smoke"] is True


def test_latency_benchmark_prints_rates_and_memory_per_worker_count(tmp_path):
    printed, entry = run_smoke("bench.latency", tmp_path)

    assert '"copernica_max_rps"' in printed
    runs = entry["figures"]["runs"]
    assert [run["workers"] for run in runs] == entry["settings"]["workers"]
    for run in runs:
        assert run["deliveries_per_second"] > 0
        assert run["ceiling_per_second"] == run["workers"] * 10
        # Every worker process was measured (RQ's scheduler may add one).
        assert len(run["rss_mb_per_process"]) >= run["workers"]
        assert run["rss_mb_all_processes"] > 0
