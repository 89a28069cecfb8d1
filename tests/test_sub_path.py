"""The submission side of a front-end read or write (issue 13, twelfth
session): AsyncFile.preadinto and pwrite test their loop cheaply (its
thread first, as pread does: no getpid() system call per request), and
send a bytearray, bytes or memoryview through the engine's door for them
(AioContext._start_rw with no file record: read() or write() in one frame
less), which must answer exactly as read() and write() do -- same path,
same count, same bytes, same error -- for every buffer, offset and state
of the file and context."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import threadlets
from threadlets import AioContext, aligned_buffer
from threadlets import asyncfile as af
from threadlets import awaitable as aw
from threadlets.engine import _MAX_IO_OFFSET

from .conftest import HAVE_RING, interrupt_at_c_return

SIZE = 64 * 1024
DATA = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)


@pytest.fixture
def scratch() -> Iterator[str]:
    """A file of DATA on /var/tmp (ext4: O_DIRECT works there), if it is
    there; else the system temp dir."""
    where = "/var/tmp" if os.path.isdir("/var/tmp") else None
    fd, path = tempfile.mkstemp(prefix="threadlets-sub-", dir=where)
    try:
        os.write(fd, DATA)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def _open(path: str, direct: bool) -> int:
    if not direct:
        return os.open(path, os.O_RDWR)
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT")
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
        pytest.skip("O_DIRECT refused here")


# -- the door answers as read() and write() ------------------------------------------


def _read_buffers() -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("bytearray", lambda: bytearray(4096)),
        ("bytearray-1", lambda: bytearray(1)),
        ("aligned", lambda: aligned_buffer(4096)),
        ("aligned-odd", lambda: aligned_buffer(8192)[1:4097]),
        ("strided", lambda: aligned_buffer(8192)[::2]),
        ("signed", lambda: aligned_buffer(4096).cast("b")),
        ("2-d", lambda: aligned_buffer(4096).cast("B", (64, 64))),
        ("read-only", lambda: memoryview(bytes(4096))),
    ]


def _write_buffers() -> list[tuple[str, Callable[[], Any]]]:
    payload = bytes(range(256)) * 16
    return [
        ("bytes", lambda: payload),
        ("bytes-1", lambda: b"w"),
        ("bytearray", lambda: bytearray(payload)),
        ("aligned", lambda: _filled(aligned_buffer(4096), payload)),
        ("read-only", lambda: memoryview(payload)),
        ("strided", lambda: memoryview(payload * 2)[::2]),
        ("signed", lambda: memoryview(bytearray(payload)).cast("b")),
        ("2-d", lambda: memoryview(bytearray(payload)).cast("B", (64, 64))),
    ]


def _clear(buf: Any) -> None:
    if isinstance(buf, bytearray):
        buf[:] = bytes(len(buf))
    elif isinstance(buf, memoryview) and not buf.readonly:
        whole = memoryview(buf.obj).cast("B")
        whole[:] = bytes(whole.nbytes)


def _filled(view: memoryview, data: bytes) -> memoryview:
    view[:] = data
    return view


class _FakeInt:
    """An offset that says it is an int (as a mock with spec=int does)."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return int

    def __index__(self) -> int:
        return 4096

    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return False


OFFSETS: list[object] = [0, 4096, 4097, SIZE - 100, SIZE + 4096, -1, 1.0, True, _FakeInt()]
OFFSETS += [_MAX_IO_OFFSET, _MAX_IO_OFFSET + 1, 2**63, 2**64]


class _Paths:
    """Records which of the engine's ways a request took."""

    def __init__(self, ctx: AioContext) -> None:
        self.seen: list[str] = []
        for name in ("_start", "_start_new", "_start_rw_start", "_fail_now"):
            self._wrap(ctx, name)
        if ctx._ring is not None:
            self._wrap(ctx._ring, "submit")

    def _wrap(self, obj: Any, name: str) -> None:
        real = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.seen.append(name)
            return real(*args, **kwargs)

        setattr(obj, name, wrapper)


def _submit(ctx: AioContext, door: bool, fd: int, offset: Any, buf: Any, write: bool) -> Any:
    if door:
        return ctx._start_rw(None, buf, offset, 0, write, fd=fd)
    if write:
        return ctx.write(fd, offset, buf)
    return ctx.read(fd, offset, buf)


def _outcome(
    ctx: AioContext, paths: _Paths, door: bool, fd: int, offset: Any, buf: Any, write: bool
) -> tuple[Any, ...]:
    del paths.seen[:]
    try:
        req = _submit(ctx, door, fd, offset, buf, write)
    except Exception as e:  # (what the built-ins raise: the same here and there)
        return ("raised", type(e), str(e), list(paths.seen))
    try:
        got: object = req.result(timeout=10)
    except Exception as e:
        got = (type(e), str(e))
    kind = type(req).__name__
    content = bytes(buf) if isinstance(buf, (bytearray, memoryview)) else None
    return ("answered", kind, got, list(paths.seen), content)


@pytest.mark.parametrize("inline", [False, True], ids=["no-inline", "inline"])
@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
def test_the_door_answers_as_read_and_write(
    backend: str, inline: bool, direct: bool, scratch: str
) -> None:
    """For every buffer, offset and file state (known, never seen,
    forgotten), the door and read()/write() take the same way (the ring's
    fast path, _start, _start_new, the ring's submit), with the same
    answer (count, error type and message) and the same bytes read; and
    the same once the context is closed."""
    fd = _open(scratch, direct)
    ctxs = [AioContext(backend=backend, inline=inline) for _ in range(2)]
    try:
        paths = [_Paths(c) for c in ctxs]  # (ctxs[0] through the door, ctxs[1] not)
        cases = 0
        for write in (False, True):
            buffers = _write_buffers() if write else _read_buffers()
            for state in ("known", "unknown", "forgotten"):
                for name, make in buffers:
                    for offset in OFFSETS:
                        got = []
                        # (One buffer for both: its address decides O_DIRECT's
                        # way, and a bytearray's may or may not be aligned.)
                        buf = make()
                        for i, ctx in enumerate(ctxs):
                            _clear(buf)
                            if state == "known":
                                ctx.read(fd, 0, aligned_buffer(4096)).result(timeout=10)
                            elif state == "forgotten":
                                ctx.read(fd, 0, aligned_buffer(4096)).result(timeout=10)
                                ctx.forget(fd)
                            else:
                                ctx.forget(fd)
                            got.append(_outcome(ctx, paths[i], i == 0, fd, offset, buf, write))
                        assert got[0] == got[1], (write, state, name, offset)
                        cases += 1
        assert cases == 3 * len(OFFSETS) * (len(_read_buffers()) + len(_write_buffers()))
        for ctx in ctxs:
            assert ctx.close(timeout=10)
        for write in (False, True):
            got = []
            for i, ctx in enumerate(ctxs):
                got.append(_outcome(ctx, paths[i], i == 0, fd, 0, bytearray(4096), write))
            assert got[0] == got[1]
            assert got[0][:2] == ("raised", RuntimeError)
    finally:
        for ctx in ctxs:
            ctx.close(timeout=10)
        os.close(fd)


def test_the_door_takes_the_rings_fast_path(scratch: str) -> None:
    """A direct read and a write of a known file go to the ring from the
    door itself: no read() or write() frame on the way."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    fd = _open(scratch, True)
    ctx = AioContext(backend="io_uring", inline=False)
    try:
        assert ctx.read(fd, 0, aligned_buffer(4096)).result(timeout=10) == 4096
        called: list[str] = []
        ctx.read = lambda *a, **k: called.append("read")  # type: ignore[method-assign]
        ctx.write = lambda *a, **k: called.append("write")  # type: ignore[method-assign]
        buf = aligned_buffer(4096)
        req = ctx._start_rw(None, buf, 8192, 0, False, fd=fd)
        assert req.result(timeout=10) == 4096
        assert bytes(buf) == DATA[8192 : 8192 + 4096]
        assert req._args == () or req._args[0] is ctx._files[fd]
        out = aligned_buffer(4096)
        out[:] = b"z" * 4096
        assert ctx._start_rw(None, out, 4096, 0, True, fd=fd).result(timeout=10) == 4096
        assert called == []
        assert ctx.drain(timeout=10)
        stats = ctx.stats()
        assert (stats.ring, stats.threaded, stats.outstanding) == (3, 0, 0)
    finally:
        del ctx.read, ctx.write
        ctx.close(timeout=10)
        os.close(fd)
    with open(scratch, "rb") as f:
        assert f.read(8192)[4096:] == b"z" * 4096


# -- the front end: the cheap test of the loop, and the door ---------------------------


@pytest.fixture(params=["threads", "io_uring"])
def front_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    aw.configure(backend=request.param)
    try:
        yield request.param
    finally:
        aw.configure()


def _loops() -> list[Any]:
    loops: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return loops
    # (Not an asyncio.BaseEventLoop: no cheap test of the loop, the exact one.)
    loops.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return loops


@pytest.mark.parametrize("loop_factory", _loops())
@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
def test_preadinto_and_pwrite_ask_asyncio_for_no_running_loop(
    front_backend: str,
    direct: bool,
    scratch: str,
    monkeypatch: pytest.MonkeyPatch,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """On the file's own asyncio loop, preadinto and pwrite never call
    asyncio's _get_running_loop() (a getpid() system call each on 3.11):
    the loop's thread says it -- on a loop that keeps no thread id
    (uvloop), the exact test, once per call.  And they read and write what
    os.pread and os.pwrite would."""
    calls: list[int] = []
    real = af._get_running_loop

    def counting() -> Any:
        calls.append(1)
        return real()

    async def main() -> None:
        f = await threadlets.open(scratch, "r+b", buffering=0, direct=direct)
        try:
            monkeypatch.setattr(af, "_get_running_loop", counting)
            for buf in (aligned_buffer(4096), bytearray(4096)):
                assert await f.preadinto(buf, 4096) == 4096
                assert bytes(buf) == DATA[4096:8192]
            data = aligned_buffer(4096)
            data[:] = b"q" * 4096
            for d in (data, bytes(data), bytearray(data)):
                assert await f.pwrite(d, 8192) == 4096
            exact = not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop)
            assert len(calls) == (5 if exact else 0)
            monkeypatch.setattr(af, "_get_running_loop", real)
        finally:
            await f.close()

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    with open(scratch, "rb") as f:
        assert f.read()[8192 : 8192 + 4096] == b"q" * 4096


def test_another_threads_loop_is_refused_by_preadinto_and_pwrite(
    front_backend: str, scratch: str
) -> None:
    """The cheap test lets no other loop through: another thread's loop, a
    coroutine driven by hand in another thread while the file's loop runs,
    and a later loop in the same thread all get RuntimeError, and nothing
    is read or written."""
    calls: list[Callable[[Any], Any]] = [
        lambda f: f.preadinto(bytearray(16), 0),
        lambda f: f.preadinto(aligned_buffer(4096), 0),
        lambda f: f.pwrite(b"x" * 16, 0),
        lambda f: f.pwrite(bytearray(b"x" * 16), 0),
    ]

    async def main() -> threadlets.AsyncFile:
        f = await threadlets.open(scratch, "r+b", buffering=0)
        out: list[object] = []

        def other_loop(call: Callable[[Any], Any]) -> None:
            async def run() -> Any:
                return await call(f)

            try:
                out.append(asyncio.run(run()))
            except RuntimeError as e:
                out.append(e)

        def by_hand(call: Callable[[Any], Any]) -> None:
            coro = call(f)
            try:
                coro.send(None)
            except RuntimeError as e:
                out.append(e)
            except StopIteration as e:
                out.append(e.value)
            finally:
                coro.close()

        for call in calls:
            for fn in (other_loop, by_hand):
                t = threading.Thread(target=fn, args=(call,))
                t.start()
                t.join()
        assert [type(x) for x in out] == [RuntimeError] * 2 * len(calls), out
        assert await f.preadinto(bytearray(16), 0) == 16  # still its own loop's
        return f

    f = asyncio.run(main())
    for call in calls:

        async def later(call: Callable[[Any], Any] = call) -> Any:
            return await call(f)

        with pytest.raises(RuntimeError, match="another event loop"):
            asyncio.run(later())
    f._closed = f._released = True  # (its loop is gone: close it by hand)
    f._ctx.forget(f._fd)
    os.close(f._fd)
    with open(scratch, "rb") as g:
        assert g.read() == DATA


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("which", ["preadinto", "pwrite"])
def test_a_forked_child_gets_runtime_error_from_preadinto_and_pwrite(
    scratch: str, which: str
) -> None:
    """A child forked inside the file's loop: the loop it copied runs in a
    thread of the same id there, but is not running: preadinto and pwrite
    raise RuntimeError (the exact test), as before the cheap test."""

    async def main() -> int:
        f = await threadlets.open(scratch, "r+b", buffering=0)
        assert await f.preadinto(bytearray(8), 0) == 8
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 3
            try:
                coro = (
                    f.preadinto(bytearray(8), 0) if which == "preadinto" else f.pwrite(b"c" * 8, 0)
                )
                try:
                    coro.send(None)
                except RuntimeError as e:
                    code = 0 if "another event loop" in str(e) else 4
                except StopIteration:
                    code = 1
                except BaseException:
                    code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert await f.preadinto(bytearray(8), 0) == 8
        await f.close()
        return os.waitstatus_to_exitcode(status)

    assert asyncio.run(main()) == 0
    with open(scratch, "rb") as g:
        assert g.read(8) == DATA[:8]


@pytest.mark.parametrize("kind", ["read", "write", "direct-read", "direct-write"])
def test_ctrl_c_at_every_c_return_of_the_door(backend: str, kind: str, scratch: str) -> None:
    """Ctrl-C at the n-th C return of a submission through the door (a
    bytearray; an aligned memoryview, O_DIRECT), for every n: the request was made and finishes with its real count (the
    file's bytes read, the data written), or the interrupt left nothing
    outstanding or claimed."""
    direct = kind.startswith("direct")
    write = kind.endswith("write")
    fd = _open(scratch, direct)
    ctx = AioContext(backend=backend, inline=False)
    try:
        assert ctx.read(fd, 0, aligned_buffer(4096)).result(timeout=10) == 4096  # learns it
        n = 0
        while True:
            n += 1
            assert n < 3000, "never ran to its end"
            buf: Any = aligned_buffer(4096) if direct else bytearray(4096)
            if write:
                buf[:] = bytes([n % 251 + 1]) * 4096
            req = None
            seen = interrupt_at_c_return(n)
            try:
                req = ctx._start_rw(None, buf, 4096, 0, write, fd=fd)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            assert ctx.drain(timeout=10), n
            assert ctx.stats().outstanding == 0, n
            assert not ctx.queue._claimed, n
            if req is not None:
                assert req.result(timeout=10) == 4096, n
                if write:
                    with open(scratch, "rb") as f:
                        f.seek(4096)
                        assert f.read(4096) == bytes(buf), n
                else:
                    assert bytes(buf) == DATA[4096:8192], n
            if seen[0] < n:
                break  # the interrupt no longer lands: every point was tried
        assert n > 3
    finally:
        ctx.close(timeout=10)
        os.close(fd)
