"""threadlets bench --quick checks the harness itself: every installed
contender produces a number, the JSON has the documented shape, and the
plot is a valid PNG.  No speed is asserted."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from threadlets.bench import WORKLOADS

EXPECTED_ALWAYS = {"threadlets", "direct loop (blocks the loop)"}


def test_quick_bench_harness(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    md = tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "threadlets.cli",
            "bench",
            "--quick",
            "--json",
            "--plot",
            str(png),
            "--markdown",
            str(md),
            "--directory",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert set(report) >= {"date", "machine", "config", "workloads", "command", "queue_depth"}
    assert report["config"]["quick"] is True
    assert set(report["workloads"]) == set(WORKLOADS) - {"queue-depth"}
    for name, w in report["workloads"].items():
        rows = w["contenders"]
        assert set(rows) >= EXPECTED_ALWAYS, name
        for cname, r in rows.items():
            assert r["ops_per_s"] > 0, (name, cname)
            assert r["spread"][0] <= r["ops_per_s"] <= r["spread"][1]
            assert 0 < r["vs_best"] <= 1
            assert r["vs_direct"] is None or r["vs_direct"] > 0
            assert set(r) == {
                "ops_per_s",
                "spread",
                "mib_per_s",
                "p50_us",
                "p99_us",
                "vs_best",
                "vs_direct",
            }
    # Every installed peer shows up where its workload applies.
    cached = report["workloads"]["cached-read-qd32"]["contenders"]
    for module, cname in (("aiofiles", "aiofiles"), ("caio", "caio"), ("anyio", "anyio.to_thread")):
        if importlib.util.find_spec(module) is not None:
            assert cname in cached
    if shutil.which("fio"):
        assert {"fio psync", "fio io_uring"} <= set(cached) or "fio psync" in cached
    if shutil.which("qemu-img"):
        assert "qemu-img bench threads" in cached
    points = report["queue_depth"]["points"]
    assert [p["depth"] for p in points] == sorted(p["depth"] for p in points)
    assert all(p["ops_per_s"] > 0 for p in points)
    assert report["queue_depth"]["threads_over_time"]
    # A real PNG, with a header and an end.
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[-8:-4] == b"IEND"
    assert "| contender | ops/s |" in md.read_text()


def test_bad_workload_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "threadlets.cli", "bench", "--workload", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_is_described(name: str) -> None:
    assert WORKLOADS[name]
