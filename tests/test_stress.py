"""threadlets stress: short runs of each mode, a checker that can fail,
reproducibility, fio agreeing with --fio-pattern files, block devices, bad
input as usage errors, and Ctrl-C."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import threadlets.awaitable as aw
import threadlets.stress
from threadlets import AioContext
from threadlets.cli import build_parser, main
from threadlets.stress import StressConfig, StressError, fio_verify, run_stress

from .conftest import interrupt_cli_at

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
    # What the run got is what this machine gives (faults enter through threads).
    backend = "threads" if extra.get("inject_faults") else str(extra.get("backend", "auto"))
    with AioContext(backend=backend) as ctx:
        assert report.backend == ctx.backend


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
    with AioContext(backend="auto") as ctx:
        assert f"backend {ctx.backend}" in proc.stderr  # the started line
        assert ctx.backend in proc.stdout.split("backend", 1)[1].splitlines()[0]


def test_same_seed_same_operations(tmp_path: Path) -> None:
    def digest(seed: int) -> str:
        cfg = StressConfig(
            path=str(tmp_path / f"f{seed}"), size=SMALL, ops=800, seed=seed, force=True
        )
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


# -- the default backend -------------------------------------------------------------------


def test_stress_uses_the_front_ends_default_backend() -> None:
    front_end = inspect.signature(aw.configure).parameters["backend"].default
    assert front_end == "auto"
    assert StressConfig().backend == front_end
    assert build_parser().parse_args(["stress"]).backend == front_end


# -- block devices ---------------------------------------------------------------------------


@contextlib.contextmanager
def _loop_device(backing: Path) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup")
    proc = subprocess.run(
        ["losetup", "--find", "--show", str(backing)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {proc.stderr.strip()}")
    device = proc.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False, timeout=30)


@pytest.mark.parametrize("backend", ["threads", "auto"])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_block_device(tmp_path: Path, backend: str, direct: bool) -> None:
    backing = tmp_path / "backing"
    backing.write_bytes(os.urandom(1 << 20))  # the model starts from what it holds
    with _loop_device(backing) as device:
        report = run_stress(
            StressConfig(path=device, ops=600, seed=7, backend=backend, direct=direct)
        )
        assert report.ok, report.as_json()
        assert report.ops == 600
        assert report.size == 1 << 20  # the device's size
        assert "truncate" not in report.by_kind
        assert report.by_kind.get("discard")
        assert report.by_kind.get("write_zeroes")
        assert report.verified_reads > 50
        if backend == "threads" and not direct:
            # Asking for less is fine; for more is refused before anything runs.
            assert run_stress(StressConfig(path=device, ops=100, size=512 << 10)).ok
            with pytest.raises(StressError, match="larger than"):
                run_stress(StressConfig(path=device, ops=1, size=2 << 20))
    assert backing.stat().st_size == 1 << 20  # nothing truncated it


# -- bad input ---------------------------------------------------------------------------------


def _refuses_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cfg: StressConfig) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(threadlets.stress, "run_stress", run)


@pytest.mark.parametrize(
    "args",
    [
        ["--size", "nan"],
        ["--size", "inf"],
        ["--size", "-1M"],
        ["--size", "0"],
        ["--size", "1024T"],  # more than any machine's memory: the model holds it
        ["--block-size", "0"],
        ["--block-size", "nan"],
        ["--size", "1M", "--block-size", "2M"],
        ["--duration", "nan"],
        ["--duration", "inf"],
        ["--duration", "1e400m"],
        ["--duration", "0"],
        ["--duration", "-5s"],
        ["--duration", "1000000h"],
        ["--ops", "-1"],
        ["--ops", "0"],
        ["--concurrency", "0"],
        ["--corrupt-after", "-1"],
    ],
    ids=" ".join,
)
def test_bad_numbers_are_usage_errors(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _refuses_before_running(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["stress", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:")
    assert "Traceback" not in err


@contextlib.contextmanager
def _read_only_dir(path: Path) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only file system needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, timeout=30)


@pytest.mark.parametrize("kind", ["directory", "fifo", "missing-parent", "read-only", "exists"])
def test_bad_path_is_a_one_line_error(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "directory":
            path, why = tmp_path, "is a directory"
        elif kind == "fifo":
            path, why = tmp_path / "fifo", "neither a regular file nor a block device"
            os.mkfifo(path)
        elif kind == "missing-parent":
            path, why = tmp_path / "no" / "f", "No such file or directory"
        elif kind == "read-only":
            ro = stack.enter_context(_read_only_dir(tmp_path / "ro"))
            path, why = ro / "f", "Read-only file system"
        else:
            path, why = tmp_path / "precious", "--force"
            path.write_bytes(b"keep me")
        assert main(["stress", str(path), "--size", "1M", "--ops", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("threadlets stress: error: ")
    assert why in err
    if kind == "exists":
        assert path.read_bytes() == b"keep me"
        assert main(["stress", str(path), "--size", "1M", "--ops", "50", "--force"]) == 0
        assert path.stat().st_size > len(b"keep me")  # overwritten
    assert sorted(os.listdir(tmp_path)) == sorted(
        {"directory": [], "fifo": ["fifo"], "missing-parent": [], "read-only": ["ro"]}.get(
            kind, ["precious"]
        )
    )


# -- Ctrl-C -------------------------------------------------------------------------------------


def _start_and_interrupt(args: list[str], cwd: Path, marker: str) -> tuple[int, str, str]:
    """Run the CLI, send SIGINT once a line of its stderr holds ``marker``;
    (exit status, stdout, stderr)."""
    return interrupt_cli_at(args, marker, cwd, timeout=60)


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_ctrl_c_prints_what_ran_and_exits_130(tmp_path: Path, as_json: bool) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ["stress", "--size", "2M", "--duration", "10m", *(["--json"] if as_json else [])]
    status, out, err = _start_and_interrupt(args, cwd, "started")
    assert status == 130, err
    assert "Traceback" not in err
    if as_json:
        report = json.loads(out)
        assert report["interrupted"] is True
        assert report["ok"] is True
    else:
        assert "INTERRUPTED" in out
        assert "operations" in out
    assert os.listdir(cwd) == []  # the temporary file is gone
