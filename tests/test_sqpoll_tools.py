"""The tools with SQPOLL (issue 13): ``threadlets stress --sqpoll``, the
"threadlets sqpoll" and "fio io_uring sqpoll" rows of ``threadlets bench``
(or the note that says why a row is missing).  No speed is asserted."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import threadlets.awaitable as aw
from threadlets import AioContext, bench, engine
from threadlets.bench import FIO_SQPOLL, SQPOLL, BenchConfig, Skipped, run_bench, to_markdown
from threadlets.cli import build_parser, main
from threadlets.stress import StressConfig, StressError, run_stress
from threadlets.uring import Ring, RingUnavailable

SMALL = 1 << 20


def _ring_polls() -> bool:
    """Whether this machine gives a ring that polls (the kernel may refuse)."""
    try:
        with AioContext(backend="io_uring", sqpoll=True) as ctx:
            return ctx.sqpoll
    except RingUnavailable:
        return False


# -- threadlets stress --sqpoll -------------------------------------------------------------------


def test_stress_parses_sqpoll() -> None:
    parser = build_parser()
    assert parser.parse_args(["stress", "--sqpoll"]).sqpoll is True
    assert parser.parse_args(["stress"]).sqpoll is False
    assert StressConfig().sqpoll is False


@pytest.mark.parametrize(
    "extra",
    [["--backend", "threads"], ["--inject-faults", "0.1"]],
    ids=" ".join,
)
def test_stress_sqpoll_without_the_ring_is_a_usage_error(
    tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "f"
    with pytest.raises(SystemExit) as exc:
        main(["stress", str(target), "--size", "64K", "--ops", "10", "--sqpoll", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:")
    assert "--sqpoll needs the ring" in err
    assert "Traceback" not in err
    assert not target.exists()  # refused before anything was made


def test_stress_config_refuses_sqpoll_on_threads() -> None:
    with pytest.raises(StressError, match="--sqpoll"):
        StressConfig(backend="threads", sqpoll=True, ops=1).check()
    with pytest.raises(StressError, match="--sqpoll"):
        StressConfig(sqpoll=True, inject_faults=0.1, ops=1).check()
    StressConfig(backend="auto", sqpoll=True, ops=1).check()
    StressConfig(backend="io_uring", sqpoll=True, ops=1).check()


@pytest.mark.linux_only("io_uring")
@pytest.mark.parametrize("direct", [False, True])
def test_stress_with_sqpoll_verifies_the_data(tmp_path: Path, direct: bool) -> None:
    cfg = StressConfig(
        path=str(tmp_path / "f"),
        size=SMALL,
        ops=1500,
        seed=13,
        backend="io_uring",
        sqpoll=True,
        direct=direct,
    )
    report = run_stress(cfg)
    assert report.ok, report.as_json()
    assert report.ops == 1500
    assert report.verified_reads > 100
    assert report.backend == "io_uring"
    assert report.sqpoll is _ring_polls()  # what this machine gives
    assert report.as_json()["sqpoll"] is report.sqpoll


@pytest.mark.linux_only("io_uring")
def test_stress_with_sqpoll_still_catches_corruption(tmp_path: Path) -> None:
    cfg = StressConfig(
        path=str(tmp_path / "f"),
        size=SMALL,
        ops=1500,
        seed=3,
        backend="io_uring",
        sqpoll=True,
        corrupt_after=300,
        mix={"write": 50, "read": 50},
        cancel_rate=0.0,
    )
    report = run_stress(cfg)
    assert report.mismatches
    assert not report.ok


def test_stress_report_says_whether_sqpoll_was_in_effect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (auto: in portable mode, or without a ring, the run goes to threads
    # and the report says SQPOLL was asked but not in effect.)
    args = ["stress", str(tmp_path / "f"), "--size", "256K", "--ops", "200", "--sqpoll"]
    assert main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ok"] is True
    with AioContext(backend="auto", sqpoll=True) as ctx:
        assert got["backend"] == ctx.backend
        assert got["sqpoll"] is ctx.sqpoll
    assert main([*args, "--force"]) == 0
    out = capsys.readouterr().out
    assert "SQPOLL" in out
    assert ("in effect (a kernel thread" in out) is got["sqpoll"]
    # Not asked, not said (the default report as it was).
    assert main(["stress", str(tmp_path / "f"), "--size", "256K", "--ops", "50", "--force"]) == 0
    assert "SQPOLL" not in capsys.readouterr().out


# -- threadlets bench: the rows ------------------------------------------------------------------------


def _cfg(tmp_path: Path) -> BenchConfig:
    cfg = BenchConfig(workloads=["cached-read-qd1"], quick=True, directory=str(tmp_path))
    cfg.seconds = 0.05
    cfg.repeats = 1
    return cfg


@pytest.mark.parametrize(
    "workload", ["cached-read-qd1", "cached-read-qd32", "random-write-qd32", "direct-read-qd32"]
)
def test_every_rw_workload_plans_the_sqpoll_rows(
    tmp_path: Path, workload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fio = "/usr/bin/fio"
    monkeypatch.setattr(bench.shutil, "which", lambda name: fio if name == "fio" else None)
    monkeypatch.setattr(bench, "probe_direct_io", lambda d: type("P", (), {"supported": True}))
    runners = bench._runners(workload, _cfg(tmp_path), str(tmp_path / "f"), str(tmp_path))
    assert "threadlets" in runners  # beside it
    assert SQPOLL in runners
    assert {"fio io_uring", FIO_SQPOLL} <= set(runners)
    # Not planned without fio.
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    runners = bench._runners(workload, _cfg(tmp_path), str(tmp_path / "f"), str(tmp_path))
    assert SQPOLL in runners
    assert not any(k.startswith("fio") for k in runners)


def test_the_sqpoll_rows_are_grouped_with_their_kind() -> None:
    assert bench._kind(SQPOLL) == "threadlets"
    assert bench._kind(FIO_SQPOLL) == bench._kind("fio io_uring") == "fio / qemu-img (C, no Python)"


def _fake_fio(calls: list[list[str]], status: int = 0) -> Any:
    job = {
        "read": {
            "iops": 1000.0,
            "runtime": 1000,
            "clat_ns": {"percentile": {"50.000000": 17e9, "99.000000": 17e9}},
        }
    }
    job["write"] = job["read"]

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        out = json.dumps({"jobs": [job]}) if status == 0 else ""
        err = "" if status == 0 else "fio: io_uring_setup: Operation not permitted\n"
        return subprocess.CompletedProcess(cmd, status, out, err)

    return run


def test_fio_sqpoll_is_fio_io_uring_with_sqthread_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/fio")
    monkeypatch.setattr(bench.subprocess, "run", _fake_fio(calls))
    runners = bench._rw_workload(_cfg(tmp_path), str(tmp_path / "f"), 32, False, True, False)
    plain = runners["fio io_uring"]()
    polled = runners[FIO_SQPOLL]()
    assert plain is not None
    assert polled is not None
    # Like for like: the same options, and --sqthread_poll=1.
    assert calls[1] == [*calls[0], "--sqthread_poll=1"]
    assert "--direct=1" in calls[1]
    assert "--iodepth=32" in calls[1]
    # fio's latencies with a polling ring are nonsense: none reported.
    assert plain.latencies
    assert not polled.latencies
    assert polled.rate == plain.rate


def test_fio_sqpoll_refused_is_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/fio")
    monkeypatch.setattr(bench.subprocess, "run", _fake_fio(calls, status=1))
    runners = bench._rw_workload(_cfg(tmp_path), str(tmp_path / "f"), 32, False, False, True)
    assert runners["fio io_uring"]() is None  # (as before: left out)
    with pytest.raises(Skipped, match=r"sqthread_poll.*Operation not permitted"):
        runners[FIO_SQPOLL]()


def _only_sqpoll(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rw workloads with threadlets' two rows alone (no peers, no C tools)."""
    keep = {k: bench.ASYNC_CONTENDERS[k] for k in ("threadlets", SQPOLL)}
    monkeypatch.setattr(bench, "ASYNC_CONTENDERS", keep)
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)


@pytest.mark.linux_only("io_uring")
def test_bench_measures_the_sqpoll_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _only_sqpoll(monkeypatch)
    report = run_bench(_cfg(tmp_path))
    w = report["workloads"]["cached-read-qd1"]
    assert os.listdir(tmp_path) == []
    if _ring_polls():
        assert set(w["contenders"]) == {"threadlets", SQPOLL}
        assert w["contenders"][SQPOLL]["ops_per_s"] > 0
        assert w["contenders"][SQPOLL]["vs_best"] > 0
        assert w["notes"] == {}
    else:  # (a kernel that refuses SQPOLL: the note says so)
        assert set(w["contenders"]) == {"threadlets"}
        assert "IORING_SETUP_SQPOLL" in w["notes"][SQPOLL]
    # The configuration is the default again after the row.
    assert aw._settings["backend"] == "auto"
    assert not aw._settings.get("sqpoll")


def _refuse(why: str) -> Any:
    """A Ring for engine.py that refuses SQPOLL (a kernel saying EPERM) or,
    with ``why`` "no ring", refuses to be made at all."""

    class Refusing(Ring):
        def __init__(self, *args: Any, sqpoll: bool = False, **kw: Any) -> None:
            if why == "no ring":
                raise RingUnavailable(errno.ENOSYS, "no ring in this test")
            super().__init__(*args, sqpoll=False, **kw)

    return Refusing


@pytest.mark.parametrize(
    "why",
    [
        pytest.param("refused", marks=pytest.mark.linux_only("io_uring")),
        "no ring",
    ],
)
def test_bench_without_sqpoll_says_why_in_a_note(
    tmp_path: Path, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _only_sqpoll(monkeypatch)
    monkeypatch.setattr(engine, "Ring", _refuse(why))
    report = run_bench(_cfg(tmp_path))
    w = report["workloads"]["cached-read-qd1"]
    assert set(w["contenders"]) == {"threadlets"}  # measured, on threads or a plain ring
    note = w["notes"][SQPOLL]
    assert note.startswith("skipped: ")
    if why == "refused":
        assert "IORING_SETUP_SQPOLL" in note
    else:
        assert "no io_uring ring here" in note
    md = to_markdown(report, "threadlets bench")
    assert f"- {SQPOLL}: {note}" in md
    assert aw._settings["backend"] == "auto"
    assert not aw._settings.get("sqpoll")
    assert os.listdir(tmp_path) == []
