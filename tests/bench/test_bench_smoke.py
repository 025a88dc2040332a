"""bench/fleet_bench.py at a tiny size: it runs to the end and reports every figure. Never its timings:
machines are shared and noisy, and the benchmark is for reading, not for asserting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fleet_bench.py"


@pytest.mark.slow
def test_the_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--users", "5", "--propagation", "0.2", "--concurrency", "4",
         "--baseline-users", "2", "--idle-users", "3", "--idle-seconds", "2", "--cold-runs", "2",
         "--default", "propagation_interval=0.1s", "--json", str(results)],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = json.loads(results.read_text())
    assert numbers["pass"]["rotated"] == 5
    for figure in ("seconds", "cpu_seconds", "peak_rss_mb", "iam", "sts"):
        assert numbers["pass"][figure] > 0, figure
    assert numbers["pass"]["iam_by_action"]["CreateAccessKey"] == 1
    assert numbers["sequential"]["seconds_per_user"] > numbers["sequential"]["work_per_user"] > 0
    assert numbers["cold"]["help"] > 0 and numbers["cold"]["check_config"] > 0
    assert numbers["idle"]["rss_mb"] > 0 and numbers["idle"]["cpu_percent"] >= 0
    table = done.stdout
    for row in ("pass wall time", "ideal N*D/C + API time", "against the sequential way", "IAM calls per rotation",
                "STS calls per rotation", "rotator's CPU per rotation", "peak memory of the pass",
                "`rotator --help`, cold", "idle `rotator run`"):
        assert f"| {row}" in table, row


@pytest.mark.slow
def test_the_profile_of_a_pass_covers_the_rotations_in_worker_threads(tmp_path: Path) -> None:
    import pstats

    profile = tmp_path / "pass.pstats"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--users", "3", "--propagation", "0.2", "--concurrency", "2",
         "--skip", "sequential", "--skip", "cold", "--skip", "idle", "--default", "propagation_interval=0.1s",
         "--profile", str(profile)],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    functions = {(Path(file).name, name): calls[1]
                 for (file, _, name), calls in pstats.Stats(str(profile)).stats.items()}  # type: ignore[attr-defined]
    assert functions[("engine.py", "rotate")] == 3  # each rotation ran in a worker thread: cProfile alone misses it
    assert functions[("cli.py", "main")] == 1
