"""Ninth session, left: Ctrl-C windows that leaked descriptors (the
one-call helpers' inline read and its hand-over, the openat2 probe, the
probes of threadlets.probe), and the command line as an outside user meets
it (a report that could not be written, bench's partial report on Ctrl-C,
abbreviated options)."""

from __future__ import annotations

import contextlib
import dis
import errno
import gc
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType, FrameType

import pytest

from threadlets import bench, cli, oneshot, probe
from threadlets.cli import build_parser, main

from .conftest import interrupt_cli_at
from .test_asyncfile import anyio_backend

__all__ = ["anyio_backend"]  # a fixture used by name

SRC = str(Path(cli.__file__).resolve().parent.parent)

needs_openat2 = pytest.mark.skipif(
    oneshot._openat2 is None, reason="no inline open here (openat2 RESOLVE_CACHED)"
)


def _open_fds() -> dict[str, str]:
    """Open descriptors and what they are (the listing's own, closed by
    then, left out)."""
    fds = {fd: _target(fd) for fd in os.listdir("/proc/self/fd")}
    return {fd: what for fd, what in fds.items() if what}


def _handlers(code: CodeType) -> Callable[[int], int]:
    """The exception handler (its target offset, -1 for none) that covers
    an instruction offset of ``code``."""
    table = dis._parse_exception_table(code)  # type: ignore[attr-defined]

    def handler(offset: int) -> int:
        for entry in table:
            if entry.start <= offset < entry.end:
                return int(entry.target)
        return -1

    return handler


def _interrupt_after_call(n: int, codes: set[CodeType], fn: Callable[[], object]) -> int:
    """``fn()``, raising KeyboardInterrupt once, at the n-th point where
    CPython 3.11 raises a pending SIGINT in a frame running one of
    ``codes``: as any call -- a Python function, a builtin, a ctypes
    function -- returns.  Raised from the tracer at the instruction after
    the call (test_attack_leak8's way, which also sees ctypes' calls), but
    only where that instruction has the call's exception handler: CPython
    raises it within the call's instruction, so where the next one is
    outside the call's try (a ``return f()`` in a try whose finally is
    inlined after the call), a trace's interrupt would skip a finally
    that a real one runs.  Returns how many points there were."""
    seen = [0]
    last: dict[int, int] = {}
    raw = {code: code.co_code for code in codes}
    handlers = {code: _handlers(code) for code in codes}
    call = dis.opmap["CALL"]

    def local(frame: FrameType, event: str, arg: object) -> object:
        if event == "opcode":
            at = frame.f_lasti
            before = last.get(id(frame), -1)
            if before >= 0 and raw[frame.f_code][before] == call:
                handler = handlers[frame.f_code]
                if handler(before) == handler(at):
                    seen[0] += 1
                    if seen[0] == n:
                        sys.settrace(None)
                        frame.f_trace = None
                        raise KeyboardInterrupt
            last[id(frame)] = at
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> object:
        if frame.f_code in raw:
            frame.f_trace_opcodes = True
            last[id(frame)] = -1  # (a new frame: an old one's id may be reused)
            return local
        return None

    gc.disable()  # (no finalizer of an earlier round runs traced)
    sys.settrace(tracer)  # type: ignore[arg-type]
    try:
        fn()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
        gc.enable()
    return seen[0]


def _sweep(codes: set[CodeType], fn: Callable[[], object], least: int = 2) -> int:
    """``fn()`` with a KeyboardInterrupt at each point in turn where one
    can land in ``codes`` (after any call: see _interrupt_after_call);
    after each, once the garbage is collected, no descriptor more is open."""
    fn()  # (warm: imports, caches)
    gc.collect()
    before = _open_fds()
    n = 0
    while True:
        n += 1
        assert n < 400
        points = _interrupt_after_call(n, codes, fn)
        gc.collect()
        after = _open_fds()
        assert after == before, (n, set(after.items()) ^ set(before.items()))
        if points < n:
            break
    assert n > least
    return n


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# -- 1. Ctrl-C as a descriptor is made ------------------------------------------------------


def _oneshot_codes(*extra: Callable[..., object]) -> set[CodeType]:
    fns = [
        oneshot._read_inline,
        getattr(oneshot, "open_cached_into", oneshot.open_cached),
        oneshot.open_cached,
        oneshot._openat2,
        *(getattr(oneshot._Handoff, name, None) for name in ("__init__", "abandon", "_finish")),
        getattr(oneshot._Handoff, "__del__", None),
        *extra,
    ]
    return {f.__code__ for f in fns if hasattr(f, "__code__")}  # type: ignore[union-attr]


@needs_openat2
def test_ctrl_c_as_a_fifo_is_handed_over_leaks_nothing(tmp_path: Path) -> None:
    """read_bytes() of a FIFO opens it on the loop and hands it to a worker
    with a wake-up pipe: a Ctrl-C as os.pipe2 returned (in _Handoff) left
    both pipe ends open for good; one as the hand-over returned to its
    caller left the FIFO's descriptor too."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def caller() -> None:  # (as _read does: given up before the worker runs)
        got = oneshot._read_inline(str(fifo))
        assert isinstance(got, oneshot._Handoff)
        got.abandon()

    _sweep(_oneshot_codes(caller), caller, least=5)


@needs_openat2
@pytest.mark.parametrize("kind", ["cached", "directory", "missing"])
def test_ctrl_c_anywhere_in_the_inline_read_leaks_nothing(tmp_path: Path, kind: str) -> None:
    """The inline open's descriptor, made by a ctypes call: a Ctrl-C as the
    system call returned (in openat2, before int() stored it) or as
    open_cached returned it left it open."""
    p = tmp_path / "f"
    if kind == "cached":
        p.write_bytes(b"x" * 100)
    elif kind == "directory":
        p.mkdir()

    def caller() -> None:
        got = oneshot._read_inline(str(p))
        assert not isinstance(got, oneshot._Handoff)

    _sweep(_oneshot_codes(caller), caller)


@needs_openat2
def test_ctrl_c_in_the_openat2_probe_leaks_nothing() -> None:
    """_make_openat2 opens "/" to see that the kernel takes
    RESOLVE_CACHED: a Ctrl-C as that open returned leaked the descriptor."""
    made: list[object] = []

    def make() -> None:
        made.append(oneshot._make_openat2())

    codes = {oneshot._make_openat2.__code__, oneshot._openat2.__code__}  # type: ignore[union-attr]
    _sweep(codes, make)
    assert made[0] is not None


def test_ctrl_c_in_the_probes_leaks_nothing(tmp_path: Path) -> None:
    """threadlets.probe's descriptors: io_uring_setup's ring (a ctypes
    call), the /proc/self/fd reopenings of _data_offset and direct_alignment,
    probe_direct_io's O_DIRECT open."""
    f = tmp_path / "f"
    f.write_bytes(b"y" * 8192)
    wfd = os.open(f, os.O_WRONLY)
    try:

        def probes() -> None:
            probe.probe_io_uring()
            probe._data_offset(wfd)
            probe.direct_alignment(wfd)

        codes = {
            probe.probe_io_uring.__code__,
            probe._data_offset.__code__,
            probe.direct_alignment.__code__,
        }
        _sweep(codes, probes)
        if probe.O_DIRECT:
            d = Path("/var/tmp") if os.path.isdir("/var/tmp") else tmp_path
            _sweep({probe.probe_direct_io.__code__}, lambda: probe.probe_direct_io(str(d)))
    finally:
        os.close(wfd)


# -- 2. a report that could not be written --------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, **extra}


@pytest.fixture
def stdout_to() -> Iterator[Callable[[io.TextIOBase], None]]:
    """Make sys.stdout another file for main() (restored after)."""
    saved = sys.stdout

    def use(f: io.TextIOBase) -> None:
        sys.stdout = f

    yield use
    sys.stdout = saved


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_report_written_to_a_full_device_is_exit_1_not_a_traceback(
    tmp_path: Path,
    stdout_to: Callable[[io.TextIOBase], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    full = open("/dev/full", "w")  # noqa: SIM115
    try:
        stdout_to(full)
        status = main(["info", "--json", "--directory", str(tmp_path)])
        with pytest.raises(SystemExit) as e:  # (argparse swallowed the error: exit 0)
            main(["stress", "--help"])
        assert e.value.code == 1
    finally:
        with contextlib.suppress(OSError):  # (what could not be written is still buffered)
            full.close()
    assert status == 1
    err = capsys.readouterr().err
    assert err.count("write error: No space left on device") == 2, err


def test_a_reader_gone_is_141(
    tmp_path: Path,
    stdout_to: Callable[[io.TextIOBase], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    r, w = os.pipe()
    os.close(r)
    with open(w, "w") as gone:
        stdout_to(gone)
        assert main(["info", "--json", "--directory", str(tmp_path)]) == 141
        with pytest.raises(SystemExit) as e:
            main(["bench", "--help"])
        assert e.value.code == 141
        sys.stdout = sys.__stdout__  # (the pipe's buffer is not flushed again)
        with pytest.raises(BrokenPipeError):
            gone.close()
    assert "Traceback" not in capsys.readouterr().err


def test_stdout_closed_at_start_is_exit_1(tmp_path: Path) -> None:
    """``threadlets stress >&-``: the run went on (fd 1 is /dev/null, so no
    file under test takes it) and exited 0 with its report lost."""
    proc = subprocess.run(
        [
            "sh",
            "-c",
            'exec "$@" >&-',
            "sh",
            sys.executable,
            "-m",
            "threadlets.cli",
            "stress",
            "--ops",
            "50",
            "--size",
            "64K",
            "--json",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=_env(TMPDIR=str(tmp_path)),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "threadlets stress: write error: Bad file descriptor" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_stdout_to_dev_null_is_still_success(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "threadlets.cli", "stress", "--ops", "50", "--size", "64K"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(TMPDIR=str(tmp_path)),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# -- 3. bench --json on Ctrl-C --------------------------------------------------------------


def _fake_runners(stop_in: str, sig: int = signal.SIGINT) -> Callable[..., dict[str, bench.Runner]]:
    """Instant runners; the one named ``stop_in`` (workload:contender)
    stops the run as a Ctrl-C during its measurement does."""

    def runners(name: str, cfg: object, path: str, scratch: str) -> dict[str, bench.Runner]:
        def run(cname: str) -> bench.Runner:
            def measure() -> bench.Result:
                if f"{name}:{cname}" == stop_in:
                    bench._stop_on(sig)  # what the first Ctrl-C (SIGTERM...) does
                return bench.Result(ops=1000, seconds=0.5, latencies=[1e-5])

            return measure

        return {c: run(c) for c in ("a", "b")}

    return runners


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "tables"])
def test_bench_interrupted_prints_what_was_measured(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    as_json: bool,
) -> None:
    monkeypatch.setattr(bench, "_runners", _fake_runners("cached-read-qd1:b"))
    monkeypatch.setattr(bench, "_cache", lambda path: None)
    args = ["bench", "--quick", "--directory", str(tmp_path)]
    args += ["--workload", "small-files", "--workload", "cached-read-qd1"]
    status = main([*args, "--json"] if as_json else args)
    out, err = capsys.readouterr()
    assert status == 130
    assert "threadlets bench: interrupted" in err
    assert os.listdir(tmp_path) == []  # the scratch files removed
    if as_json:
        report = json.loads(out)
        assert report["interrupted"] is True
        assert sorted(report["workloads"]) == ["cached-read-qd1", "small-files"]
        assert sorted(report["workloads"]["small-files"]["contenders"]) == ["a", "b"]
        # The measurement cut short is no figure; the one before it is.
        assert sorted(report["workloads"]["cached-read-qd1"]["contenders"]) == ["a"]
    else:
        assert "small-files" in out
        assert "Interrupted" in out


def test_bench_stopped_by_sigterm_prints_what_was_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "_runners", _fake_runners("small-files:b", signal.SIGTERM))
    args = ["bench", "--quick", "--json", "--directory", str(tmp_path)]
    assert main([*args, "--workload", "small-files"]) == 128 + signal.SIGTERM
    out, err = capsys.readouterr()
    assert "threadlets bench: stopped by SIGTERM" in err
    report = json.loads(out)
    assert report["interrupted"] is True
    assert sorted(report["workloads"]["small-files"]["contenders"]) == ["a"]
    assert os.listdir(tmp_path) == []


def test_bench_finished_says_not_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "_runners", _fake_runners(""))
    args = ["bench", "--quick", "--json", "--directory", str(tmp_path)]
    assert main([*args, "--workload", "small-files"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["interrupted"] is False
    assert sorted(report["workloads"]["small-files"]["contenders"]) == ["a", "b"]


def test_bench_json_sigint_end_to_end(tmp_path: Path) -> None:
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    args = ["bench", "--quick", "--json", "--workload", "small-files"]
    status, out, err = interrupt_cli_at(
        args, "small-files: threadlets.read_bytes", cwd, _env(TMPDIR=str(tmp)), timeout=60
    )
    assert status == 130, err
    report = json.loads(out)
    assert report["interrupted"] is True
    assert "threadlets" in report["workloads"]["small-files"]["contenders"]
    assert os.listdir(tmp) == []
    assert os.listdir(cwd) == []


# -- 4. no abbreviated options --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--vers"],
        ["info", "--dir", "."],
        ["stress", "--dur", "5"],
        ["stress", "--op", "5"],
        ["bench", "--sec", "1"],
        ["bench", "--work", "small-files"],
        ["nbd", "serve", "--read", "x"],
        ["nbd", "serve", "--max-conn", "3", "x"],
    ],
    ids=" ".join,
)
def test_abbreviated_options_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2  # (--vers printed the version, exit 0)
    assert "error:" in capsys.readouterr().err


def test_every_parser_refuses_abbreviations() -> None:
    import argparse

    def walk(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    parsers = list(walk(build_parser()))
    assert len(parsers) == 6
    assert all(not p.allow_abbrev for p in parsers)


# -- 5. attacked as an outside user ---------------------------------------------------------


def test_mix_naming_a_kind_twice_is_refused() -> None:
    # "read=10,read=90" ran with read=90: the first (a typo for another kind?) was dropped.
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="names read twice"):
        cli.parse_mix("read=10,write=5,read=90")
    assert cli.parse_mix("read=10,write=5") == {"read": 10, "write": 5}


@pytest.mark.skipif(os.geteuid() != 0, reason="/proc/self/status opens for writing as root only")
def test_stress_refuses_a_proc_file(capsys: pytest.CaptureFixture[str]) -> None:
    # A /proc file is a "regular file" of size 0 that keeps nothing written:
    # the run reported a MISMATCH (exit 1), as if the engine were wrong.
    status = main(["stress", "/proc/self/status", "--force", "--ops", "10", "--size", "64K"])
    assert status == 2
    assert "does not keep what is written" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_bench_a_file_not_written_still_prints_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # --markdown on a full disk: exit 1 with "[Errno 28] No space left on
    # device" (no file named), and the whole run's figures thrown away.
    monkeypatch.setattr(bench, "_runners", _fake_runners(""))
    args = ["bench", "--quick", "--json", "--directory", str(tmp_path)]
    status = main([*args, "--workload", "small-files", "--markdown", "/dev/full"])
    out, err = capsys.readouterr()
    assert status == 1
    assert "threadlets bench: cannot write /dev/full: No space left on device" in err
    assert sorted(json.loads(out)["workloads"]["small-files"]["contenders"]) == ["a", "b"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_while_stress_sets_up_removes_its_file(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM (or SIGHUP) while stress made and allocated its temporary
    file, before the run's handlers were in place: its default action
    killed the process and left the file (--size bytes) in the cwd."""
    script = (
        "import os, signal, sys\n"
        "from threadlets import cli, stress\n"
        "real = stress._reserve\n"
        "def reserve(fd, path, size):\n"
        f"    os.kill(os.getpid(), {int(sig)})\n"
        "    real(fd, path, size)\n"
        "stress._reserve = reserve\n"
        "sys.exit(cli.main(['stress', '--ops', '10', '--size', '64K']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 128 + sig, proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_nbd_serve_names_a_directory_as_the_other_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dir").mkdir()
    sock = str(tmp_path / "s")
    assert main(["nbd", "serve", str(tmp_path / "dir"), "--socket", sock]) == 1
    assert capsys.readouterr().err == f"threadlets nbd serve: {tmp_path / 'dir'}: Is a directory\n"


@pytest.mark.parametrize("other", ["b", 1, None, b"b"], ids=repr)
def test_path_ordering_with_a_non_path_is_a_type_error(other: object) -> None:
    # Path("a") < "b" raised AttributeError ('str' object has no attribute
    # '_path'); pathlib says TypeError, and so does sorted() of a mixed list.
    import operator
    import pathlib

    from threadlets import Path as AsyncPath

    for op in (operator.lt, operator.le, operator.gt, operator.ge):
        with pytest.raises(TypeError):
            op(pathlib.PurePosixPath("a"), other)  # the oracle
        with pytest.raises(TypeError):
            op(AsyncPath("a"), other)
        with pytest.raises(TypeError):
            op(other, AsyncPath("a"))
    assert sorted([AsyncPath("b"), AsyncPath("a")]) == [AsyncPath("a"), AsyncPath("b")]


_CODECS = ["utf-8", "utf-16", "utf-16-be", "utf-32", "utf-7", "utf-8-sig", "latin-1", "cp037"]


def _text_layer(data: bytes, encoding: str, errors: str, newline: str | None) -> object:
    try:
        with io.TextIOWrapper(io.BytesIO(data), encoding, errors, newline) as f:
            return f.read()
    except (UnicodeError, LookupError) as e:
        return type(e)


def _ours(data: bytes, encoding: str, errors: str, newline: str | None) -> object:
    try:
        return oneshot._decode(data, oneshot._encoding(encoding), errors, newline)
    except (UnicodeError, LookupError) as e:
        return type(e)


@pytest.mark.parametrize("encoding", _CODECS)
def test_read_text_decodes_as_the_text_layer(encoding: str) -> None:
    """read_text's decoding against io.TextIOWrapper's (pathlib's
    read_text): utf-16/utf-32 without a byte order mark is an error there
    (bytes.decode guessed the machine's order); a carriage return a codec
    spells without a 0x0D byte (utf-7 "+AA0-") was not translated."""
    from hypothesis import given, settings
    from hypothesis import strategies as hs

    texts = hs.text(alphabet=hs.sampled_from("ab\r\n\u00e9\u20ac\U0001f600 "), max_size=20)

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(
        hs.one_of(hs.binary(max_size=24), texts.map(lambda t: t.encode(encoding, "replace"))),
        hs.sampled_from(["strict", "replace", "surrogateescape"]),
        hs.sampled_from([None, "", "\n", "\r", "\r\n"]),
    )
    def check(data: bytes, errors: str, newline: str | None) -> None:
        assert _ours(data, encoding, errors, newline) == _text_layer(
            data, encoding, errors, newline
        )

    check()


def test_read_text_decodes_the_two_cases_found() -> None:
    assert _ours(b"a+AA0-b", "utf-7", "strict", None) == "a\nb"
    assert _ours(b"a\x00b\x00", "utf-16", "strict", None) is UnicodeError


@pytest.mark.anyio
async def test_read_text_refuses_a_codec_that_is_not_text_before_reading(
    anyio_backend: object, tmp_path: Path
) -> None:
    # The same error as pathlib's (LookupError either way; the words were
    # bytes.decode's "use codecs.decode()", after the file was read).
    import anyio

    import threadlets

    p = tmp_path / "f"
    p.write_bytes(b"abc")
    for codec in ("rot13", "base64"):
        with pytest.raises(LookupError) as ours:
            await threadlets.read_text(p, encoding=codec)
        with pytest.raises(LookupError) as oracle:
            p.read_text(encoding=codec)
        assert str(ours.value) == str(oracle.value)
    await anyio.lowlevel.checkpoint()


def test_nbd_serve_says_where_it_cannot_listen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "threadlets nbd serve: [Errno 13] Permission denied" named neither the
    # socket nor the address.
    import socket

    img = tmp_path / "img"
    img.write_bytes(b"\0" * 4096)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["nbd", "serve", str(img), "--bind", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"threadlets nbd serve: cannot listen on 127.0.0.1:{port}: "), err


_FIFO_WRITES = """
import array, asyncio, fcntl, os, sys, termios, threadlets, trio
import threadlets.awaitable

def outstanding():
    return threadlets.awaitable.current().ctx.stats().outstanding

def full(r):
    # The pipe holds all it can: its writer is blocked.
    n = array.array("i", [0])
    fcntl.ioctl(r, termios.FIONREAD, n)
    return n[0] >= fcntl.fcntl(r, 1032)  # F_GETPIPE_SZ

async def give_up(call, kind, blocked):
    # Cancel once the call waits: on a worker's request, or a full pipe.
    if kind == "asyncio":
        task = asyncio.ensure_future(call)
        while not task.done() and not blocked():
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "finished"
    with trio.CancelScope() as scope:
        async def cancel_once_blocked():
            while not blocked():
                await trio.lowlevel.checkpoint()
            scope.cancel()
        async with trio.open_nursery() as n:
            n.start_soon(cancel_once_blocked)
            await call
    return "cancelled" if scope.cancelled_caught else "finished"

async def main(kind):
    fifo = sys.argv[1]
    # No reader: waits in its open; a reader that never reads: waits in write.
    print(kind, await give_up(threadlets.write_bytes(fifo, b"x"), kind, lambda: outstanding() > 0))
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    big = threadlets.write_text(fifo, "y" * (1 << 20))
    print(kind, await give_up(big, kind, lambda: outstanding() > 0 or full(r)))
    os.close(r)

asyncio.run(main("asyncio"))
trio.run(main, "trio")
"""


def test_write_bytes_to_a_fifo_can_be_cancelled(tmp_path: Path) -> None:
    """write_bytes() of a FIFO with no reader (or a reader that does not
    read) blocked its worker for good, and a cancelled task waited for it:
    the program never ended.  (In a child, so that a hang is a failure.)"""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = tmp_path / "s.py"
    script.write_text(_FIFO_WRITES)
    proc = subprocess.run(
        [sys.executable, str(script), str(fifo)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[:4] == ["asyncio cancelled"] * 2 + ["trio cancelled"] * 2, proc.stdout


@pytest.mark.anyio
async def test_write_bytes_to_streams_as_pathlib(anyio_backend: object, tmp_path: Path) -> None:
    import threading

    import threadlets

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    await threadlets.write_bytes(tmp_path / "warm", b"")  # (the loop's context made)
    before = _open_fds()
    t = threading.Thread(target=reader)
    t.start()
    data = os.urandom(300_000)  # more than a pipe holds
    assert await threadlets.write_bytes(fifo, data) == len(data)
    t.join()
    assert got == [data]
    assert await threadlets.write_text("/dev/null", "abc") == 3
    if os.path.exists("/dev/full"):
        with pytest.raises(OSError) as ours:
            await threadlets.write_bytes("/dev/full", b"abc")
        with pytest.raises(OSError) as oracle:
            Path("/dev/full").write_bytes(b"abc")
        assert ours.value.errno == oracle.value.errno == errno.ENOSPC
    p = tmp_path / "f"
    assert await threadlets.write_text(p, "a\nb", newline="\r\n") == 3
    assert p.read_bytes() == b"a\r\nb"
    assert _open_fds() == before
