"""threadlets bench --quick checks the harness itself: every installed
contender produces a number, the JSON has the documented shape, and the
plot is a valid PNG.  No speed is asserted.  Also: scratch files go to the
temp directory and leave with Ctrl-C, bad arguments are usage errors, the
progress counts and estimates, and the plot is honest."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import threadlets.bench
from threadlets.bench import WORKLOADS, BenchConfig, Step, figure, run_bench
from threadlets.cli import main

from .conftest import interrupt_cli_at

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


# -- where scratch files go, and Ctrl-C --------------------------------------------------------


def _interrupt_at(args: list[str], marker: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run the CLI; SIGINT once a line of its stderr holds ``marker``.
    (exit status, stderr)."""
    status, _, err = interrupt_cli_at(args, marker, cwd, env)
    return status, err


@pytest.mark.parametrize(
    "marker",
    [
        "scratch files in",  # while the test file is being written
        "workload 1/2 small-files",  # small files made, measuring
        "workload 2/2 cached-read-qd1",
    ],
)
def test_ctrl_c_leaves_nothing_behind(tmp_path: Path, marker: str) -> None:
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}  # the system temp directory, for the child
    args = ["bench", "--quick", "--workload", "small-files", "--workload", "cached-read-qd1"]
    status, err = _interrupt_at(args, marker, env, cwd)
    assert f"scratch files in {tmp}{os.sep}threadlets-bench-" in err  # not the cwd
    assert status == 130, err
    assert "Traceback" not in err
    assert os.listdir(tmp) == []
    assert os.listdir(cwd) == []


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--repeats", "0"],
        ["--repeats", "-1"],
        ["--seconds", "-1"],
        ["--seconds", "0"],
        ["--seconds", "nan"],
        ["--seconds", "inf"],
        ["--directory", "{tmp}/missing"],
        ["--directory", "{tmp}/file"],
        ["--plot", "{tmp}/missing/bench.png"],
        ["--plot", "{tmp}"],
        ["--markdown", "{tmp}/missing/bench.md"],
        ["--markdown", "{tmp}"],
        # (os.access says yes to root in both, the file system says no)
        ["--plot", "/proc/threadlets-bench.png"],
        ["--markdown", "/sys/threadlets-bench.md"],
        ["--markdown", "{tmp}/fifo"],  # a FIFO nobody reads
    ],
    ids=" ".join,
)
def test_bad_arguments_are_usage_errors_before_measuring(
    tmp_path: Path,
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo")

    def measure(cfg: BenchConfig) -> None:
        raise AssertionError("measuring started")

    monkeypatch.setattr(threadlets.bench, "run_bench", measure)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", *(a.format(tmp=tmp_path) for a in args)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:")
    assert "Traceback" not in err


def test_the_writability_check_leaves_files_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check opens the file for writing: an existing one keeps its bytes,
    # a new one is not left behind when measuring fails.
    old = tmp_path / "old.md"
    old.write_bytes(b"kept")

    def measure(cfg: BenchConfig) -> None:
        raise RuntimeError("measuring failed")

    monkeypatch.setattr(threadlets.bench, "run_bench", measure)
    with pytest.raises(RuntimeError):
        main(["bench", "--quick", "--markdown", str(old), "--plot", str(tmp_path / "new.png")])
    assert old.read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.md"]


def test_bench_config_refuses_what_cannot_be_measured() -> None:
    for bad in (
        BenchConfig(repeats=0),
        BenchConfig(seconds=float("nan")),
        BenchConfig(seconds=-1),
        BenchConfig(workloads=["nope"]),
    ):
        with pytest.raises(ValueError, match=r"repeats|seconds|unknown"):
            run_bench(bad)


# -- progress ------------------------------------------------------------------------------------------


def test_progress_counts_every_measurement_and_the_time_left(tmp_path: Path) -> None:
    steps: list[Step] = []
    cfg = BenchConfig(
        workloads=["small-files", "queue-depth"],
        quick=True,
        directory=str(tmp_path),
        progress=steps.append,
    )
    cfg.seconds = 0.02
    cfg.repeats = 2
    report = run_bench(cfg)
    assert os.listdir(tmp_path) == []
    total = steps[0].total
    assert [s.done for s in steps] == list(range(total))
    assert all(s.total == total and s.workloads == 2 for s in steps)
    contenders = len(report["workloads"]["small-files"]["contenders"])
    depths = len(report["queue_depth"]["points"])
    assert total == 2 * contenders + depths
    first = [s for s in steps if s.workload == "small-files"]
    assert {s.workload_index for s in first} == {1}
    assert [s.round for s in first] == [1] * contenders + [2] * contenders
    assert {s.workload_index for s in steps[len(first) :]} == {2}
    assert steps[0].seconds_left == pytest.approx(total * 0.02)  # the plan, before any ran
    assert all(s.seconds_left >= 0 for s in steps)
    assert steps[-1].seconds_left < steps[0].seconds_left


# -- the plot ---------------------------------------------------------------------------------------------


def _report() -> dict[str, Any]:
    def row(ops: float, low: float, high: float, best: float) -> dict[str, Any]:
        return {"ops_per_s": ops, "spread": [low, high], "vs_best": round(ops / best, 3)}

    return {
        "date": "2026-11-30 14:00:00 UTC",
        "machine": {
            "platform": "Linux-6.1-x86_64",
            "kernel": "Linux 6.1.0-test",
            "python": "3.11.7",
            "cpus": 7,
        },
        "config": {"seconds": 2.0, "repeats": 3, "quick": False, "file_mib": 64},
        "workloads": {
            "cached-read-qd32": {
                "title": "cached reads",
                "contenders": {
                    "threadlets": row(112_000, 100_000, 118_000, 112_000),
                    "aiofiles": row(100_000, 95_000, 104_000, 112_000),
                    "fio psync": row(90_000, 89_000, 91_000, 112_000),
                },
            }
        },
        "queue_depth": {
            "points": [{"depth": 1, "ops_per_s": 10.0}, {"depth": 4, "ops_per_s": 30.0}],
            "threads_over_time": [{"t": 0.0, "threads": 1}, {"t": 0.1, "threads": 4}],
        },
    }


def test_the_plot_is_honest() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    fig = figure(_report())
    try:
        ax = fig.axes[0]
        # A linear axis from zero: a 1.12x difference looks like one.
        assert ax.get_xscale() == "linear"
        assert ax.get_xlim()[0] == 0
        (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
        widths = sorted(p.get_width() for p in bars.patches)
        assert widths == [90_000, 100_000, 112_000]
        # Whiskers from the measured spread of the rounds.
        (whiskers,) = [c for c in ax.containers if c is not bars and c.has_xerr]
        spans = sorted(tuple(seg[:, 0]) for seg in whiskers.lines[2][0].get_segments())
        assert spans == [(89_000, 91_000), (95_000, 104_000), (100_000, 118_000)]
        assert fig.legends
        labels = {t.get_text() for t in fig.legends[0].get_texts()}
        assert {"threadlets", "min to max of the rounds"} <= labels
        title = fig._suptitle.get_text()
        assert "7 cores" in title
        assert "Linux 6.1.0-test" in title
        assert "2026-11-30" in title
        assert "median" in title
        for ax in fig.axes[1:]:
            assert ax.get_ylim()[0] == 0  # the queue-depth panels start at zero too
    finally:
        plt.close(fig)
