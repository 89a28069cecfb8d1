"""The command-line tools attacked as a user and an attacker would: Ctrl-C
while the parser is built, a closed stdout, SIGTERM during bench, huge
counts, empty and multi-line paths, nbd serve's --bind/--socket/
--export-name/--max-connections, info on a missing or unwritable directory,
stress in an unwritable cwd, and SIGINT at random moments."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import threadlets.bench
import threadlets.stress
from threadlets import cli
from threadlets.bench import BenchConfig, run_bench
from threadlets.cli import main
from threadlets.stress import StressConfig, run_stress

from .conftest import interrupt_cli_at

SRC = str(Path(cli.__file__).resolve().parent.parent)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, **extra}


def _refuses_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any tool that starts fails the test: the error must come first."""

    def ran(args: object) -> int:
        raise AssertionError("the tool ran")

    for name in ("_info", "_stress", "_bench", "_nbd"):
        monkeypatch.setattr(cli, name, ran)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:"), err
    assert "Traceback" not in err
    assert err.rstrip("\n").splitlines()[-1].startswith(f"threadlets {argv[0]}"), err
    return err


# -- Ctrl-C while parsing --------------------------------------------------------------------


def test_ctrl_c_while_the_parser_is_built_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Building the parser imports the tools' modules: Ctrl-C lands there
    # often (6 of 30 random SIGINTs did), and escaped main as a traceback.
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        status = main(["stress", "--ops", "1"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main (a traceback)")
    assert status == 130
    assert capsys.readouterr().err == "threadlets: interrupted\n"


# -- a closed stdout -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["info", "--json"],
        ["info"],
        ["stress", "{tmp}/f", "--size", "64K", "--ops", "20", "--json"],
    ],
    ids=" ".join,
)
def test_a_closed_stdout_is_no_traceback(tmp_path: Path, args: list[str]) -> None:
    r, w = os.pipe()
    os.close(r)  # every write to stdout: EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "threadlets.cli", *(a.format(tmp=tmp_path) for a in args)],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr
    assert "Exception ignored" not in proc.stderr
    # Not 1: from stress that says "mismatch" (rich's own answer was 1).
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, proc.stderr


# -- SIGTERM during bench --------------------------------------------------------------------


def _signal_at(
    args: list[str], marker: str, sig: int, env: dict[str, str], cwd: Path
) -> tuple[int, str]:
    """Run the CLI; send ``sig`` once a line of its stderr holds ``marker``."""
    status, _, err = interrupt_cli_at(args, marker, cwd, env, timeout=60, sig=sig)
    return status, err


@pytest.mark.parametrize("marker", ["scratch files in", "workload 1/1 small-files"])
def test_sigterm_during_bench_removes_the_scratch_files(tmp_path: Path, marker: str) -> None:
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    args = ["bench", "--quick", "--workload", "small-files"]
    status, err = _signal_at(args, marker, signal.SIGTERM, _env(TMPDIR=str(tmp)), cwd)
    assert "Traceback" not in err
    assert os.listdir(tmp) == []  # SIGTERM's default action left the scratch directory
    assert os.listdir(cwd) == []
    assert status == 128 + signal.SIGTERM, err


# -- numbers ---------------------------------------------------------------------------------


HUGE = str(10**30)


@pytest.mark.parametrize(
    "args",
    [
        ["stress", "--ops", HUGE],
        ["stress", "--concurrency", HUGE],
        ["stress", "--corrupt-after", HUGE],
        ["bench", "--repeats", HUGE],
        ["bench", "--seconds", "1e30"],
        ["nbd", "serve", "img", "--max-connections", HUGE],
    ],
    ids=" ".join,
)
def test_huge_counts_are_usage_errors(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _refuses_running(monkeypatch)
    _usage_error(args, capsys)


# -- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["stress", ""],
        ["stress", "{tmp}/a\nb"],
        ["bench", "--directory", ""],
        ["bench", "--directory", "{tmp}/a\nb"],
        ["bench", "--plot", "{tmp}/a\nb.png"],
        ["bench", "--markdown", "{tmp}/a\nb.md"],
        ["bench", "--markdown", ""],
        ["info", "--directory", "{tmp}/missing"],
        ["info", "--directory", "{tmp}/file"],
        ["nbd", "serve", ""],
        ["nbd", "serve", "{tmp}/a\nb"],
        ["nbd", "serve", "img", "--socket", ""],
        ["nbd", "serve", "img", "--socket", "{tmp}/file"],  # exists
        ["nbd", "serve", "img", "--socket", "{tmp}"],
        ["nbd", "serve", "img", "--socket", "{tmp}/missing/s"],
        ["nbd", "serve", "img", "--socket", "{tmp}/a\nb"],
        ["nbd", "serve", "img", "--socket", "{tmp}/" + "s" * 120],
    ],
    ids=lambda a: " ".join(a).replace("\n", "\\n")[:60],
)
def test_bad_paths_are_usage_errors(
    tmp_path: Path,
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_bytes(b"")
    _refuses_running(monkeypatch)
    _usage_error([a.format(tmp=tmp_path) for a in args], capsys)
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("where", ["/proc", "/sys"])
def test_a_directory_the_file_system_refuses_is_a_usage_error(
    where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # (os.access() says yes to root there; bench made its scratch
    # directory only once running, and info probed: both a traceback.)
    if not os.path.isdir(where):
        pytest.skip(f"no {where}")
    _refuses_running(monkeypatch)
    _usage_error(["bench", "--directory", where], capsys)
    monkeypatch.undo()  # info runs: its probe is what fails
    err = _usage_error(["info", "--directory", where], capsys)
    assert "cannot" in err


def test_stress_in_a_cwd_it_cannot_write_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default target is a temporary file in the cwd.
    monkeypatch.chdir("/proc")
    assert main(["stress", "--size", "64K", "--ops", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("threadlets stress: error: cannot make a temporary file in '/proc'")
    assert err.count("\n") == 1, err


# -- nbd serve -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bind",
    [
        "",
        ":",
        "[]:10809",
        "127.0.0.1:+80",  # int() takes these three
        "127.0.0.1: 80",
        "127.0.0.1:1_000",
        "127.0.0.1:\u0663",  # ARABIC-INDIC DIGIT THREE
        "a\nb:80",
        "no-such-host.invalid:80",
    ],
)
def test_bad_bind_addresses_are_usage_errors(
    bind: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _refuses_running(monkeypatch)
    _usage_error(["nbd", "serve", "img", "--bind", bind], capsys)


@pytest.mark.parametrize("bind", [":0", "[::1]:0", "::1", "localhost:0", "127.0.0.1"])
def test_good_bind_addresses_pass(bind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(cli, "_nbd", lambda args: seen.append(args.bind) or 0)
    assert main(["nbd", "serve", "img", "--bind", bind]) == 0
    assert seen == [bind]


@pytest.mark.parametrize(
    "name", ["x" * 4097, "\u00e9" * 2049, "a\0b", "\udcff"], ids=["4097", "2049-e", "nul", "bad"]
)
def test_bad_export_names_are_usage_errors(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _refuses_running(monkeypatch)
    _usage_error(["nbd", "serve", "img", "--export-name", name], capsys)


# -- SIGINT at random moments ----------------------------------------------------------------

_RANDOM_SIGINTS = textwrap.dedent(
    """
    import contextlib, io, os, random, signal, sys, threading, time
    from threadlets.cli import main

    rng = random.Random(int(sys.argv[1]))
    argv = sys.argv[2:]
    problems = []
    outcomes = []
    # One run without a signal says how long a run takes: the signals
    # then land anywhere in it, and a little after.
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    span = (time.perf_counter() - t0) * 1.1
    for run in range(int(os.environ["RUNS"])):
        delay = rng.uniform(0, span)
        fired = threading.Event()

        def kill():
            time.sleep(delay)  # the random moment, not a synchronisation
            os.kill(os.getpid(), signal.SIGINT)
            fired.set()

        out, err = io.StringIO(), io.StringIO()
        returned = None
        killer = threading.Thread(target=kill)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                killer.start()
                returned = main(argv)
                fired.wait()
                killer.join()
                time.sleep(0)  # (where a pending signal is raised)
        except KeyboardInterrupt:
            killer.join()
            if returned is None and not out.getvalue():
                problems.append(f"run {run}: KeyboardInterrupt escaped main\\n{err.getvalue()}")
        except BaseException as e:
            problems.append(f"run {run}: {e!r}\\n{err.getvalue()}")
        outcomes.append(returned)
        if returned not in (None, 0, 130):
            problems.append(f"run {run}: exit {returned}\\n{err.getvalue()}")
        if "Traceback" in err.getvalue():
            problems.append(f"run {run}: {err.getvalue()}")
    interrupted = sum(1 for p in outcomes if p == 130)
    if not interrupted:
        problems.append(f"no run was interrupted: {outcomes}")
    print("\\n".join(problems))
    """
)


@pytest.mark.parametrize(
    ("runs", "args"),
    [
        (20, ["stress", "--size", "64K", "--ops", "400", "--concurrency", "4"]),
        (10, ["stress", "--size", "64K", "--ops", "100", "--fio-pattern", "--json"]),
        (8, ["bench", "--quick", "--seconds", "0.01", "--workload", "small-files"]),
    ],
    ids=["stress", "stress-fio-pattern", "bench"],
)
def test_sigint_at_random_moments_leaves_no_file_and_no_traceback(
    tmp_path: Path, runs: int, args: list[str]
) -> None:
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _RANDOM_SIGINTS, "7", *args],
        cwd=cwd,
        env=_env(TMPDIR=str(tmp), RUNS=str(runs)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout
    assert os.listdir(tmp) == []
    assert os.listdir(cwd) == []


# -- fio and a colon in a path ---------------------------------------------------------------

need_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")


@need_fio
def test_fio_pattern_on_a_path_with_a_colon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # fio's --filename splits at ':': it checked (and made) "a" and "b"
    # instead, and stress said the data was wrong (exit 1).
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "a:b"
    argv = ["stress", str(target), "--size", "64K", "--ops", "50", "--fio-pattern", "--json"]
    assert main(argv) == 0, capsys.readouterr()
    assert json.loads(capsys.readouterr().out)["fio_check"] == "passed"
    assert sorted(os.listdir(tmp_path)) == ["a:b"]


@need_fio
def test_bench_runs_fio_in_a_temp_dir_with_a_colon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (fio failed there, and bench left its contenders out without a word.)
    directory = tmp_path / "c:d"
    directory.mkdir()
    monkeypatch.setattr(threadlets.bench, "ASYNC_CONTENDERS", {})
    cfg = BenchConfig(workloads=["cached-read-qd1"], quick=True, directory=str(directory))
    cfg.seconds = 0.1
    report = run_bench(cfg)
    assert {"fio psync", "fio io_uring"} <= set(
        report["workloads"]["cached-read-qd1"]["contenders"]
    )
    assert os.listdir(directory) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_during_stress_reports_and_removes_the_temp_file(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # (SIGTERM's default action killed it: no report, its temporary file
    # left in the cwd.  SIGHUP's -- the terminal closed -- too: session 8.)
    if signal.getsignal(sig) is signal.SIG_IGN:
        pytest.skip("ignored here (nohup)")
    args = ["stress", "--size", "256K", "--duration", "10m", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "threadlets.cli", *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "started" in line, line
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err
    assert proc.returncode == 128 + sig, err
    report = json.loads(out)
    assert report["interrupted"] is True
    assert report["ok"] is True
    assert os.listdir(tmp_path) == []


# -- a block device the system uses ----------------------------------------------------------


def test_stress_refuses_a_mounted_block_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It opened the device without O_EXCL and wrote over the mounted file
    # system.
    from .test_stress import _loop_device

    if shutil.which("mkfs.ext4") is None or shutil.which("mount") is None:
        pytest.skip("needs mkfs.ext4 and mount")
    backing = tmp_path / "disk"
    backing.write_bytes(b"")
    os.truncate(backing, 4 << 20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _loop_device(backing) as device:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, timeout=60)
        if subprocess.run(["mount", device, str(mnt)], check=False, timeout=60).returncode:
            pytest.skip("cannot mount here")
        try:
            before = backing.read_bytes()
            assert main(["stress", device, "--ops", "20", "--seed", "3"]) == 2
            assert backing.read_bytes() == before
        finally:
            subprocess.run(["umount", str(mnt)], check=False, timeout=60)
    err = capsys.readouterr().err
    assert err.startswith(f"threadlets stress: error: cannot open {device}: ")
    assert "busy" in err
    assert err.count("\n") == 1, err


# -- Ctrl-C while the fio pattern is written -------------------------------------------------


def test_ctrl_c_while_the_fio_pattern_is_written_stops_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It wrote the rest of the file and ran fio over all of it first.
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    blocks: list[int] = []
    real = threadlets.stress.aligned_buffer

    def buffer(n: int) -> memoryview:
        blocks.append(n)  # (only the pattern's writes take one without --direct)
        if len(blocks) == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C: the handler runs here
        return real(n)

    def fio(*args: object) -> tuple[bool, str]:
        raise AssertionError("fio ran after Ctrl-C")

    monkeypatch.setattr(threadlets.stress, "aligned_buffer", buffer)
    monkeypatch.setattr(threadlets.stress, "fio_verify", fio)
    cfg = StressConfig(path=str(tmp_path / "f"), size=64 * 4096, ops=50, fio_pattern=True)
    report = run_stress(cfg)
    assert report.interrupted
    assert report.fio_check == "interrupted"
    assert len(blocks) == 2, len(blocks)  # not 64
    assert os.listdir(tmp_path) == ["f"]


def test_a_workload_named_twice_runs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # (The progress said "workload 1/2" and never came to 2.)
    seen: list[list[str]] = []

    def measure(cfg: BenchConfig) -> dict[str, object]:
        seen.append(cfg.workloads)
        raise KeyboardInterrupt

    monkeypatch.setattr(threadlets.bench, "run_bench", measure)
    assert (
        main(["bench", "--quick", "--workload", "small-files", "--workload", "small-files"]) == 130
    )
    assert seen == [["small-files"]]


def test_truncate_alone_on_a_block_device_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from .test_stress import _loop_device

    backing = tmp_path / "disk"
    backing.write_bytes(bytes(64 << 10))
    with _loop_device(backing) as device:
        assert main(["stress", device, "--mix", "truncate=1", "--ops", "5"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"threadlets stress: error: {device} is a block device: "
        "--mix needs kinds besides truncate\n"
    )


def test_ctrl_c_while_stress_cleans_up_keeps_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (The handler was gone while the context and queue closed: the
    # finished run's report was lost to a KeyboardInterrupt.)
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    real = threadlets.stress._Stress.close

    def close(self: threadlets.stress._Stress) -> None:
        signal.raise_signal(signal.SIGINT)
        real(self)

    monkeypatch.setattr(threadlets.stress._Stress, "close", close)
    try:
        report = run_stress(StressConfig(path=str(tmp_path / "f"), size=64 << 10, ops=30))
    except KeyboardInterrupt:
        pytest.fail("the report was lost to Ctrl-C")
    assert report.ok
    assert report.ops == 30
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_full_disk_during_bench_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # (A traceback, from making the test file on a full file system.)
    def make_file(directory: str, size: int) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(threadlets.bench, "make_file", make_file)
    argv = ["bench", "--quick", "--workload", "small-files", "--directory", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "threadlets bench: error: [Errno 28] No space left on device"
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []
