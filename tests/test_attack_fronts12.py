"""Round 12 of attacks on the front ends and tools, as an outside user
would make them: text mode through real files against io.open, the whole-
file helpers against pathlib and io.open, a second SIGTERM during stress,
and nbd serve when the image cannot be flushed at shutdown."""

from __future__ import annotations

import asyncio
import errno
import faulthandler
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import threadlets
from threadlets import cli

from .test_asyncfile import anyio_backend, backend

__all__ = ["anyio_backend", "backend"]  # fixtures used by name

SRC = str(Path(cli.__file__).resolve().parent.parent)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, **extra}


# -- text mode through threadlets.open, against io.open on real files ----------------------

Op = tuple[str, Any]
_CHARS = [*"ab\r\n é€\U0001d11e", "\udcff", "日"]
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.none() | st.integers(-1, 12)),
        st.tuples(st.just("readline"), st.integers(-1, 12)),
        st.tuples(st.just("readlines"), st.integers(-1, 12)),
        st.tuples(st.sampled_from(["next", "tell", "seek_end", "seek_cur", "seek0"]), st.none()),
        st.tuples(st.just("seek"), st.integers(0, 7)),
        st.tuples(st.just("write"), st.text(st.sampled_from(_CHARS), max_size=5)),
        st.tuples(st.just("truncate"), st.none() | st.integers(0, 40)),
    ),
    max_size=10,
)


def _defined(ops: Sequence[Op]) -> list[Op]:
    """ops without what io leaves undefined: a tell() after an iteration
    left early (see test_textio._defined), and a read after a truncate
    (io keeps decoding text the truncate removed; a seek ends that).  So is
    a tell() after an iteration and a write (which the sides follow with a
    flush): io's flush turns telling back on mid-iteration, and its tell()
    then gives the raw position without the decoder's state (a pending
    '\r' of newline=None: 2 where threadlets' cookie carries the state;
    both seek back to the same place)."""
    kept: list[Op] = []
    iterating = stale = False
    for name, arg in ops:
        if name in ("next", "readlines"):
            iterating = True
        elif name == "truncate":
            stale, iterating = stale or iterating, False
        elif name in ("seek", "seek_end", "seek0"):
            stale = iterating = False
        elif name == "write" and iterating:
            stale = True
        elif stale and name in ("tell", "seek_cur"):
            continue
        kept.append((name, arg))
        if name == "truncate":
            kept.append(("seek0", None))
    return kept


def _call(f: Any, name: str, a: Any) -> Any:
    """The call ``name`` on a file (its result: a coroutine for threadlets')."""
    if name in ("read", "readline", "readlines", "write", "truncate"):
        return getattr(f, name)(a)
    if name == "next":
        return f.__anext__() if hasattr(f, "__anext__") else next(f)
    if name == "tell":
        return f.tell()
    whence = {"seek": 0, "seek0": 0, "seek_cur": 1, "seek_end": 2}[name]
    return f.seek(a if name == "seek" else 0, whence)


def _io_side(path: Path, mode: str, kwargs: dict[str, Any], ops: Sequence[Op]) -> Any:
    out: list[Any] = []
    cookies: list[int] = []
    try:
        f = open(path, mode, **kwargs)  # noqa: SIM115 (closed below)
    except Exception as e:
        return ("open", type(e))
    with f:
        for name, op_arg in ops:
            a = (cookies[op_arg % len(cookies)] if cookies else 0) if name == "seek" else op_arg
            try:
                out.append(("ok", _call(f, name, a)))
            except StopIteration:
                out.append(("stop",))
            except Exception as e:
                out.append(("err", type(e)))
            if name == "write":
                # (io holds a write's bytes and sends them after the next
                # read's read-ahead, at the end of it: bpo-12215.  A flush
                # on both sides keeps to what io defines.)
                f.flush()
            if name == "tell" and out[-1][0] == "ok":
                cookies.append(out[-1][1])
    return out, path.read_bytes()


def _io_side_or_crash(path: Path, mode: str, kwargs: dict[str, Any], ops: Sequence[Op]) -> Any:
    """_io_side, or None where io crashes the interpreter: CPython's ISO-2022
    decoders, which io sets to state 0 at a plain position (as after a
    write), make a NULL call at the next graphic byte (see
    threadlets.textio._Iso2022Guard).  Those run in a child process."""
    if not str(kwargs["encoding"]).startswith("iso2022"):
        return _io_side(path, mode, kwargs, ops)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        status = 1
        try:
            os.close(r)
            faulthandler.disable()
            with os.fdopen(w, "wb") as pipe:
                pipe.write(pickle.dumps(_io_side(path, mode, kwargs, ops)))
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return None
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    return pickle.loads(data)


async def _threadlets_side(path: Path, mode: str, kwargs: dict[str, Any], ops: Sequence[Op]) -> Any:
    out: list[Any] = []
    cookies: list[int] = []
    try:
        f = await threadlets.open(path, mode, **kwargs)
    except Exception as e:
        return ("open", type(e))
    async with f:
        for name, op_arg in ops:
            a = (cookies[op_arg % len(cookies)] if cookies else 0) if name == "seek" else op_arg
            try:
                out.append(("ok", await _call(f, name, a)))
            except StopAsyncIteration:
                out.append(("stop",))
            except Exception as e:
                out.append(("err", type(e)))
            if name == "write":
                await f.flush()
            if name == "tell" and out[-1][0] == "ok":
                cookies.append(out[-1][1])
    return out, path.read_bytes()


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    encoding=st.sampled_from(
        ["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "iso2022_jp", "gb18030"]
    ),
    errors=st.sampled_from(["strict", "replace", "surrogateescape", "backslashreplace"]),
    newline=st.sampled_from([None, "", "\n", "\r", "\r\n"]),
    mode=st.sampled_from(["r", "w", "a", "r+", "w+", "a+"]),
    initial=st.binary(max_size=20)
    | st.text(st.sampled_from(_CHARS[:-2]), max_size=10).map(lambda t: t.encode("utf-16")),
    ops=_OPS.map(_defined),
)
# (io's decoder in state 0 after a seek to a plain position: threadlets
# reset it there, and its tell() gave its fresh state, not io's 1.)
@example(
    encoding="iso2022_jp",
    errors="strict",
    newline=None,
    mode="r",
    initial=b"\x00",
    ops=[("read", None), ("seek_cur", None), ("read", 1), ("tell", None)],
)
# (io crashes: a write, a seek to its plain position, a graphic byte.)
@example(
    encoding="iso2022_jp",
    errors="strict",
    newline=None,
    mode="r+",
    initial=b"ab",
    ops=[("write", "x"), ("tell", None), ("seek", 0), ("read", None), ("tell", None)],
)
def test_text_files_are_io_open_files(
    tmp_path_factory: pytest.TempPathFactory,
    encoding: str,
    errors: str,
    newline: str | None,
    mode: str,
    initial: bytes,
    ops: list[Op],
) -> None:
    d = tmp_path_factory.mktemp("text")
    a, b = d / "io", d / "threadlets"
    a.write_bytes(initial)
    b.write_bytes(initial)
    kwargs = {"encoding": encoding, "errors": errors, "newline": newline}
    expected = _io_side_or_crash(a, mode, kwargs, ops)
    got = asyncio.run(_threadlets_side(b, mode, kwargs, ops))
    if expected is not None:  # (where io crashes, threadlets goes on)
        assert got == expected


# -- whole files: errors as pathlib's and io.open's -----------------------------------------


@pytest.mark.anyio
async def test_write_bytes_of_a_non_contiguous_buffer_is_a_buffer_error(
    tmp_path: Path, backend: str
) -> None:
    # pathlib's write_bytes (a file's write()) raises BufferError; it was
    # a TypeError (memoryview.cast's).  Nothing is created.
    data = memoryview(b"abcdef")[::2]
    with pytest.raises(BufferError) as want:
        (tmp_path / "pathlib").write_bytes(data)
    with pytest.raises(BufferError) as got:
        await threadlets.write_bytes(tmp_path / "f", data)
    assert str(got.value) == str(want.value)
    with pytest.raises(BufferError):
        await threadlets.Path(tmp_path / "f").write_bytes(data)
    assert not (tmp_path / "f").exists()
    # (A contiguous one of wider items is its bytes, as pathlib writes it.)
    wide = memoryview(bytes(range(16))).cast("Q")
    assert await threadlets.write_bytes(tmp_path / "f", wide) == 16
    assert (tmp_path / "f").read_bytes() == bytes(range(16))


_BAD_ARGS: list[tuple[object, dict[str, Any]]] = [
    (None, {"newline": "x"}),
    (None, {"encoding": "no-such-codec"}),
    (3.5, {"newline": "x"}),
    ("a\0b", {"newline": "x"}),
    ("a\0b", {"encoding": "no-such-codec"}),
    (b"a\0b", {"encoding": "no-such-codec"}),
    ("a\0b", {"errors": 3}),
    (None, {"errors": 3}),
]


def _io_error(path: object, mode: str, kwargs: dict[str, Any]) -> tuple[type, str]:
    try:
        with open(path, mode, **kwargs):  # type: ignore[call-overload]
            pass
    except Exception as e:
        return type(e), str(e)
    raise AssertionError("io.open took it")


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "kwargs"), _BAD_ARGS)
async def test_read_text_and_write_text_check_arguments_in_io_opens_order(
    path: object, kwargs: dict[str, Any]
) -> None:
    # io.open: the text arguments' types, then the path (TypeError, a NUL),
    # then the newline's value and the codec.  The path came last: a
    # LookupError or "illegal newline value" for a path io refuses.
    want = _io_error(path, "r", kwargs)
    with pytest.raises(Exception) as got:
        await threadlets.read_text(path, **kwargs)  # type: ignore[arg-type]
    assert (got.type, str(got.value)) == want
    want = _io_error(path, "w", kwargs)
    with pytest.raises(Exception) as got:
        await threadlets.write_text(path, "x", **kwargs)  # type: ignore[arg-type]
    assert (got.type, str(got.value)) == want


# -- stress: a second SIGTERM or SIGHUP ------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_second_signal_during_stress_still_removes_its_file(tmp_path: Path, sig: int) -> None:
    # The first stops the run (it reports); the second, while it stops, did
    # what the default does -- killed the process -- and left the temporary
    # file (--size bytes) behind.  Now it exits at once, 128 + the signal,
    # the file removed, as a second Ctrl-C does.
    script = textwrap.dedent(
        f"""
        import os, sys
        from threadlets import stress
        run = stress._run
        def twice(*args):
            os.kill(os.getpid(), {int(sig)})
            os.kill(os.getpid(), {int(sig)})
            return run(*args)
        stress._run = twice
        from threadlets.cli import main
        sys.exit(main(["stress", "--size", "256K", "--ops", "100", "--concurrency", "2"]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_env(TMPDIR=str(tmp_path)),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert os.listdir(tmp_path) == []
    assert proc.returncode == 128 + sig, proc.stderr
    assert "Traceback" not in proc.stderr


# -- nbd serve: a failed flush at shutdown ---------------------------------------------------


class _FlushFails(threadlets.Syscalls):
    def fsync(self, fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def fdatasync(self, fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def _failing_flush_contexts(monkeypatch: pytest.MonkeyPatch) -> None:
    from threadlets.nbd import server

    real = server.AioContext
    monkeypatch.setattr(
        server, "AioContext", lambda backend: real(backend="threads", syscalls=_FlushFails())
    )


def test_nbd_server_close_raises_when_the_image_cannot_be_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file's close() raises when its flush fails; the server logged it
    # and returned, and nbd serve exited 0 with the clients' writes maybe
    # lost.  (Flush failures come from the syscalls: the threads backend.)
    from threadlets.nbd.server import NBDServer, open_export, serve

    _failing_flush_contexts(monkeypatch)
    image = tmp_path / "image"
    image.write_bytes(bytes(1 << 16))
    export = open_export(image)
    sock = tmp_path / "sock"

    async def main() -> None:
        server = NBDServer(export)
        await server.start_unix(sock)
        with pytest.raises(OSError) as e:
            await server.close()
        assert e.value.errno == errno.EIO
        assert server.closed
        assert server._ctx is not None
        assert server._ctx.closed
        os.unlink(sock)
        stop = asyncio.Event()
        stop.set()
        with pytest.raises(OSError):
            await serve(export, socket_path=str(sock), stop=stop)
        assert not sock.exists()  # (removed all the same)
        # A read-only export is not flushed: nothing to report.
        ro = open_export(image, read_only=True)
        try:
            await serve(ro, socket_path=str(sock), stop=stop)
        finally:
            ro.close()

    try:
        asyncio.run(main())
    finally:
        export.close()


def test_nbd_serve_exits_1_when_the_image_cannot_be_flushed(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(bytes(1 << 16))
    sock = tmp_path / "sock"
    script = textwrap.dedent(
        """
        import errno, os, sys, threadlets
        from threadlets.nbd import server
        class FlushFails(threadlets.Syscalls):
            def fsync(self, fd):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            fdatasync = fsync
        real = server.AioContext
        server.AioContext = lambda backend: real(backend="threads", syscalls=FlushFails())
        from threadlets.cli import main
        sys.exit(main(["nbd", "serve", "--socket", sys.argv[1], sys.argv[2]]))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(sock), str(image)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "serving ...": the handlers are in place
        assert "serving" in line, line + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        assert proc.wait(30) == 1, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert "flushing at shutdown" in err, err
    assert "Input/output error" in err, err
    assert "Traceback" not in err
    assert not sock.exists()


# -- a second signal while the tools remove their scratch files ---------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_as_bench_removes_its_scratch_files_leaves_nothing(
    tmp_path: Path, sig: int
) -> None:
    # As bench removes its scratch directory (the signal sent as the
    # first file goes): rmtree was cut short, the directory left.
    script = textwrap.dedent(
        f"""
        import os, shutil, sys, types
        from threadlets import bench
        armed = []
        def make_file(directory, size):
            for i in range(50):
                open(os.path.join(directory, f"f{{i}}"), "wb").close()
            armed.append(1)
            os.kill(os.getpid(), {int(sig)})  # the first: the run stops
            return os.path.join(directory, "f0")
        bench.make_file = make_file
        real_unlink = os.unlink
        def unlink(path, *args, **kwargs):
            real_unlink(path, *args, **kwargs)
            if armed:
                armed.clear()
                os.kill(os.getpid(), {int(sig)})  # the second, half-way
        os.unlink = unlink
        from threadlets.cli import main
        sys.exit(main(["bench", "--quick", "--workload", "small-files"]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_env(TMPDIR=str(tmp_path)),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert os.listdir(tmp_path) == [], proc.stderr
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), proc.stderr
    assert "Traceback" not in proc.stderr


# -- Ctrl-C in the loop's completion reader (engine.process_completions) -----------


def _ring() -> Any:
    from .conftest import HAVE_RING

    return pytest.param(
        "io_uring", marks=pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")
    )


@pytest.mark.parametrize("backend_name", ["threads", _ring()])
def test_ctrl_c_in_on_readable_strands_no_completion(backend_name: str, tmp_path: Path) -> None:
    # What bench's second Ctrl-C hit: asyncio.run then cancelled its tasks
    # and waited for ever for reads that had finished (one thread left, in
    # epoll_wait).  A loop calls on_readable() only when the eventfd polls
    # readable: after an interrupt there, what is left must keep it so.
    import gc
    import select

    from threadlets import AioContext

    from .conftest import interrupt_at_c_return

    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * 16)
    fd = os.open(data, os.O_RDONLY)
    try:
        n = 0
        while True:
            n += 1
            assert n < 500, "never ran to its end"
            ctx = AioContext(backend=backend_name, inline=False)
            try:
                got: list[object] = []
                req = ctx.read(fd, 0, bytearray(4096), callback=got.append)
                # Finished (a worker's or the kernel's completion signals the eventfd).
                assert select.select([ctx.fileno()], [], [], 10)[0]
                if backend_name == "threads":
                    req.wait(10)
                seen = interrupt_at_c_return(n)
                try:
                    ctx.on_readable()
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                # The loop from here on: on_readable() whenever it polls readable.
                while not got and select.select([ctx.fileno()], [], [], 1.0)[0]:
                    ctx.on_readable()
                assert got == [req], f"C return {n}: the completion was stranded"
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break
    finally:
        os.close(fd)
