"""What every benchmark shares: the machine, the results file, process figures.

Results go to bench/results/<name>.jsonl, or to the folder named by
BENCH_RESULTS_DIR (the smoke tests use a scratch folder, so a CI run leaves
the recorded figures alone).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from http.client import HTTPConnection
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": {
            name: version(name)
            for name in ("flask", "gunicorn", "rq", "redis", "requests")
        },
        "commit": _commit(),
    }


def record(benchmark: str, settings: dict, figures: dict) -> None:
    """Print the run and append it to bench/results/<benchmark>.jsonl."""
    entry = {
        "benchmark": benchmark,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        "figures": figures,
    }
    print(json.dumps(entry, indent=2))
    if settings.get("smoke") and not os.environ.get("BENCH_RESULTS_DIR", "").strip():
        # A smoke run checks that the benchmark runs; its figures are not
        # results, so bench/results keeps only real runs.
        print("smoke run: not appended to bench/results (set BENCH_RESULTS_DIR)")
        return
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{benchmark}.jsonl", "a") as out:
        out.write(json.dumps(entry) + "\n")


def results_dir() -> Path:
    override = os.environ.get("BENCH_RESULTS_DIR", "").strip()
    return Path(override) if override else RESULTS


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise ValueError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The direct children of a process, such as gunicorn's workers."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def percentile(sorted_values: list[float], share: float) -> float:
    """The value below which ``share`` of the sorted values fall (nearest rank)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(len(sorted_values) * share) - 1))
    return sorted_values[index]


def start_gunicorn(
    app_spec: str, env: dict[str, str], log_path: Path, timeout: float = 20.0
):
    """``app_spec`` under gunicorn.conf.py on a free loopback port, once ready.

    Returns the harness Process and the base URL; stop it with ``.stop()``.
    """
    from tests.harness import Process
    from tools.embedded_redis import free_port

    port = free_port()
    process = Process(
        app_spec,
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            "gunicorn.conf.py",
            app_spec,
        ],
        {**env, "PORT": str(port), "HOST": "127.0.0.1"},
        log_path,
    )
    process.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            process.stop()
            raise RuntimeError(f"gunicorn exited:\n{process.output()}")
        # http.client, not urllib: no proxy setting can send this elsewhere.
        connection = HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return process, url
        except OSError:
            time.sleep(0.1)
        finally:
            connection.close()
    process.stop()
    raise RuntimeError(f"gunicorn not ready:\n{process.output()}")


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
