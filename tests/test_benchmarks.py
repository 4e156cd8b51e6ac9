"""The benchmark harness runs end to end in a tiny configuration and reports every figure.

No timing is asserted: figures are printed by ``make bench``, never judged by tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(out: Path, **options: str) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks --<option> <value> ...`` (``class_n``: ``--class-n``), its results
    written to ``out``."""
    args = [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", value)]
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )


@pytest.mark.timeout(600)
def test_a_tiny_benchmark_prints_the_table_and_writes_every_figure(tmp_path: Path) -> None:
    run = bench(tmp_path, n="2", delays="0,1", capacity="3", capacity_delay="1", read_seconds="1", legacy_a_max="2")
    assert run.returncode == 0, run.stdout + run.stderr

    for row in (
        "launcher",
        "floor",
        "legacy_a",
        "legacy_b",
        "capacity",
        "read:echo",
        "read:launcher",
        "read:hub_direct",
    ):
        assert f"\n{row} " in run.stdout, run.stdout
    (written,) = tmp_path.glob("bench-*.json")
    results = json.loads(written.read_text())
    assert results["failures"] == 0
    assert {"started", "machine", "parameters", "figures", "raw", "targets"} <= set(results)
    launches = results["figures"]["launches"]
    assert {(f["system"], f["delay"]) for f in launches} == {
        (system, delay) for system in ("launcher", "floor", "legacy_a", "legacy_b") for delay in (0.0, 1.0)
    }
    for figure in launches:
        assert figure["failures"] == 0 and figure["untimed"] == 0, figure
        for key in ("reply_s", "hub_ready_s", "overhead_s"):
            assert set(figure[key]) == {"count", "p50", "p95", "max"} and figure[key]["count"] == 2
        assert figure["hub_requests_per_launch"] > 0
    ours = [f for f in launches if f["system"] == "launcher"]
    assert all(f["consumer_cpu_s_per_launch"] > 0 and f["consumer_peak_rss_mb"] > 0 for f in ours)
    assert results["figures"]["capacity"]["peak_in_flight"] >= 1
    for system in ("echo", "launcher", "hub_direct"):
        assert results["figures"]["read"][system]["completed"] > 0
    assert {t["target"].split(" (")[0] for t in results["targets"]} >= {
        "overhead over hub-ready p95 <= 50 ms",
        "read throughput >= 70% of a bare echo consumer",
    }


@pytest.mark.timeout(600)
def test_a_tiny_class_start_prints_its_table_with_this_checkout_and_a_baseline(tmp_path: Path) -> None:
    run = bench(
        tmp_path, only="class_start", class_n="4", class_cases="0:0,2:1", class_idle="0.5", class_base=str(ROOT)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "class start (scenario 6)" in run.stdout, run.stdout
    (written,) = tmp_path.glob("bench-*.json")
    rounds = json.loads(written.read_text())["raw"]["class_start"]
    assert [(r["system"], r["limit"], r["delay"]) for r in rounds] == [
        ("launcher", 0, 0.0),
        ("base", 0, 0.0),
        ("launcher", 2, 1.0),
        ("base", 2, 1.0),
    ]
    for r in rounds:
        assert r["failures"] == 0 and r["ready_timed"] == 4, r
        assert r["probe_idle_s"]["count"] > 0 and r["probe_burst_s"]["count"] > 0
        assert r["hub_requests_per_launch"] > 0 and r["start_requests"] >= 4


@pytest.mark.timeout(120)
def test_a_bench_hub_that_fails_to_start_leaves_no_stand_in_running(tmp_path: Path) -> None:
    from benchmarks.hub import BenchHub
    from tests.support.localhub import LocalHub

    broken = tmp_path / "broken_config.py"
    broken.write_text("raise RuntimeError('this hub config fails on purpose')\n")
    bench = BenchHub(hub=LocalHub(config=broken))
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        process = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        started.append(process)
        return process  # type: ignore[no-any-return]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", recording_popen)
        with pytest.raises(RuntimeError, match="JupyterHub exited"):
            bench.start()
    standins = [p for p in started if "benchmarks.standin" in str(p.args)]
    assert len(standins) == 1
    assert standins[0].poll() is not None, "the stand-in server is still running"
    assert bench.standin is None
