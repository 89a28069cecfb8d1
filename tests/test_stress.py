"""threadlets stress: short runs of each mode, a checker that can fail,
reproducibility, and fio agreeing with --fio-pattern files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from threadlets import AioContext
from threadlets.stress import StressConfig, StressError, fio_verify, run_stress

SMALL = 4 << 20


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="default-mix"),
        pytest.param({"direct": True}, id="direct"),
        pytest.param({"inject_faults": 0.05}, id="faults"),
        pytest.param({"cancel_rate": 0.5}, id="many-cancels"),
        pytest.param({"mix": {"readv": 50, "writev": 50}, "concurrency": 64}, id="vectored-deep"),
        pytest.param({"mix": {"write": 60, "read": 40}, "concurrency": 1}, id="serial"),
        pytest.param({"backend": "auto"}, id="io_uring-where-available"),
        pytest.param({"backend": "auto", "direct": True}, id="io_uring-direct"),
    ],
)
def test_short_run_of_each_mode(tmp_path: Path, extra: dict[str, object]) -> None:
    cfg = StressConfig(path=str(tmp_path / "f"), size=SMALL, ops=1500, seed=11, **extra)  # type: ignore[arg-type]
    report = run_stress(cfg)
    assert report.ok, report.as_json()
    assert report.ops == 1500
    assert report.verified_reads > 100
    assert not report.mismatches
    if extra.get("inject_faults"):
        assert report.faults["errors"]
        assert report.expected_errors
    if extra.get("cancel_rate"):
        assert report.cancels.get("CANCELED", 0) > 50
    with AioContext(backend=str(extra.get("backend", "threads"))) as ctx:
        assert report.backend == ctx.backend  # what the run got is what this machine gives


def test_corruption_is_reported_with_exit_status_1(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "threadlets.cli",
            "stress",
            str(tmp_path / "f"),
            "--size",
            "4M",
            "--ops",
            "2000",
            "--seed",
            "5",
            "--corrupt-after",
            "1500",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    (m,) = report["mismatches"]
    assert bytes.fromhex(m["expected"])[0] ^ bytes.fromhex(m["found"])[0] == 0xFF
    assert report["seed"] == 5


def test_a_clean_run_exits_0_and_prints_a_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "threadlets.cli", "stress", "--size", "2M", "--ops", "500"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verdict" in proc.stdout
    assert "OK" in proc.stdout
    assert os.listdir(tmp_path) == []  # the temporary file is gone


def test_same_seed_same_operations(tmp_path: Path) -> None:
    def digest(seed: int) -> str:
        cfg = StressConfig(path=str(tmp_path / f"f{seed}"), size=SMALL, ops=800, seed=seed)
        report = run_stress(cfg)
        assert report.ok
        return report.sequence_digest

    assert digest(3) == digest(3)
    assert digest(3) != digest(4)


def test_bad_configuration() -> None:
    for bad in (
        StressConfig(size=0, ops=1),
        StressConfig(ops=None, duration=0),
        StressConfig(ops=1, mix={"nope": 1}),
        StressConfig(ops=1, direct=True, block_size=100),
        StressConfig(ops=1, cancel_rate=2),
        StressConfig(ops=1, backend="fibers"),
        StressConfig(ops=1, backend="io_uring", inject_faults=0.1),
    ):
        with pytest.raises(StressError):
            run_stress(bad)
    proc = subprocess.run(
        [sys.executable, "-m", "threadlets.cli", "stress", "--size", "lots"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "not a size" in proc.stderr


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_fio_accepts_the_pattern_and_rejects_a_flipped_byte(tmp_path: Path) -> None:
    path = tmp_path / "pattern"
    report = run_stress(
        StressConfig(path=str(path), size=1 << 20, ops=500, seed=2, fio_pattern=True)
    )
    assert report.ok
    assert report.fio_check == "passed"
    ok, out = fio_verify(str(path), 1 << 20, 4096)
    assert ok, out
    with open(path, "r+b") as f:
        f.seek(300_000)
        b = f.read(1)
        f.seek(300_000)
        f.write(bytes([b[0] ^ 1]))
    ok, out = fio_verify(str(path), 1 << 20, 4096)
    assert not ok
    assert "verify" in out.lower()
