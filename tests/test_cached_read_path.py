"""The cached-read hot path (issue 13): AsyncFile.pread's inline read through
AioContext.inline_bytes_reader, and pread's cheap test of its loop.

Each must answer as the request path does (the same bytes, the same
exception types, the descriptor's offset untouched), share its scratch
buffer between concurrent preads without mixing their bytes, survive a
Ctrl-C at any line of a buffer change, stop once its context closes, and
refuse a foreign loop -- another thread's, a later one, a forked child's --
whether or not the data is cached."""

from __future__ import annotations

import asyncio
import enum
import os
import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest

import threadlets
from threadlets import AioContext
from threadlets import awaitable as aw
from threadlets.asyncfile import CHUNK

from .conftest import HAVE_RING

SIZE = 3 * CHUNK + 1000  # (not a multiple of anything: short reads at the end)
DATA = random.Random(13).randbytes(SIZE)


@pytest.fixture(params=["threads", "io_uring"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    aw.configure(backend=request.param)
    try:
        yield request.param
    finally:
        aw.configure()


@pytest.fixture
def data_path(tmp_path: Path) -> Path:
    p = tmp_path / "f"
    p.write_bytes(DATA)
    with open(p, "rb") as f:
        f.read()  # cached
    return p


def _loops() -> list[Any]:
    loops: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return loops
    # (Not an asyncio.BaseEventLoop: no cheap test of the loop, the exact one.)
    loops.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return loops


class Five(enum.IntEnum):
    FIVE = 5


COUNTS: list[object] = [0, 1, 7, 4096, 4097, CHUNK, CHUNK + 1, -1, 4096.0, True, "4", None]
OFFSETS: list[object] = [
    0,
    1,
    SIZE - 1,
    SIZE,
    SIZE + 100,
    -1,  # (preadv2's "the file's position")
    -2,
    True,
    1.0,
    Five.FIVE,
    2**62,
    2**63 - 1 - 4096,
    2**63 - 1,
    2**63,
    2**64,
]


def _answers(path: Path, backend: str, inline: bool, loop_factory: Any) -> list[tuple[str, object]]:
    aw.configure(inline=inline, backend=backend)
    try:
        fd = os.open(path, os.O_RDONLY)
        os.lseek(fd, 5, os.SEEK_SET)  # (a read "at the position" would show)

        async def main() -> list[tuple[str, object]]:
            f = threadlets.wrap(fd, closefd=False)
            out: list[tuple[str, object]] = []
            for n in COUNTS:
                for off in OFFSETS:
                    for _ in range(2):  # (the second: the scratch buffer sized)
                        try:
                            out.append(("ok", await f.pread(n, off)))  # type: ignore[arg-type]
                        except Exception as e:
                            out.append(("raised", type(e)))
            out.append(("ok", os.lseek(fd, 0, os.SEEK_CUR)))
            await f.close()
            return out

        loop = loop_factory()
        try:
            return loop.run_until_complete(main())
        finally:
            loop.close()
            os.close(fd)
    finally:
        aw.configure(backend=backend)


def test_a_files_first_pread_is_answered_as_with_inline_off(tmp_path: Path, backend: str) -> None:
    """Each count as the first pread of a file (the reader has no scratch
    buffer yet): the answer a request gives.  (The reader's "no buffer"
    length was once -1, so pread(-1, 0) first returned b"" instead of
    raising ValueError.)"""
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)

    def first(inline: bool) -> list[tuple[str, object]]:
        aw.configure(inline=inline, backend=backend)
        out: list[tuple[str, object]] = []

        async def main() -> None:
            for n in COUNTS:
                f = await threadlets.open(path, "rb")
                try:
                    out.append(("ok", await f.pread(n, 0)))  # type: ignore[arg-type]
                except Exception as e:
                    out.append(("raised", type(e)))
                await f.close()

        try:
            asyncio.run(main())
        finally:
            aw.configure()
        return out

    assert first(True) == first(False)


@pytest.mark.parametrize("loop_factory", _loops())
def test_pread_answers_as_the_request_path_and_os_pread(
    backend: str, data_path: Path, loop_factory: Any
) -> None:
    """Every count and offset, good and bad: the inline path's answer is the
    request path's (inline off), byte for byte and exception for exception;
    the bytes are os.pread's; the descriptor's offset never moves (a
    negative offset reached preadv2, which reads -1 as "at the position":
    pread(n, -1) returned the bytes at 5 and moved the offset)."""
    inline = _answers(data_path, backend, True, loop_factory)
    queued = _answers(data_path, backend, False, loop_factory)
    assert inline == queued
    assert inline[-1] == ("ok", 5)
    fd = os.open(data_path, os.O_RDONLY)
    try:
        k = 0
        for n in COUNTS:
            for off in OFFSETS:
                for _ in range(2):
                    kind, got = inline[k]
                    k += 1
                    if kind == "ok" and type(n) is int and type(off) is int:
                        assert got == os.pread(fd, n, off), (n, off)
    finally:
        os.close(fd)


def test_a_negative_offset_reads_nothing_inline(backend: str, data_path: Path) -> None:
    """pread(n, -1) of cached data: ValueError, as a request gives, and the
    descriptor's offset stays where it was."""
    fd = os.open(data_path, os.O_RDONLY)
    os.lseek(fd, 5, os.SEEK_SET)

    async def main() -> None:
        f = threadlets.wrap(fd, closefd=False)
        assert await f.pread(4, 5) == DATA[5:9]  # (inline: the scratch is 4 long)
        for off in (-1, -2, -(2**63)):
            with pytest.raises(ValueError):
                await f.pread(4, off)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 5
        await f.close()

    try:
        asyncio.run(main())
    finally:
        os.close(fd)


@pytest.mark.linux_only("rwf_nowait")  # (no inline reads without it)
def test_concurrent_preads_of_many_sizes_never_mix_their_bytes(
    backend: str, data_path: Path
) -> None:
    """32 tasks reading at random offsets with random counts (the shared
    scratch buffer changing size all the time, fair yields among them):
    each gets the bytes of its own read."""

    async def main() -> int:
        f = await threadlets.open(data_path, "rb")
        sizes = [1, 512, 4096, 4096, 4096, 5000, CHUNK]
        done = 0

        async def task(seed: int) -> None:
            nonlocal done
            rnd = random.Random(seed)
            for _ in range(300):
                n = rnd.choice(sizes)
                off = rnd.randrange(SIZE + 10)
                assert await f.pread(n, off) == DATA[off : off + n]
                done += 1
                if rnd.random() < 0.05:
                    await asyncio.sleep(0)

        await asyncio.gather(*(task(i) for i in range(32)))
        stats = f._ctx.stats()
        await f.close()
        assert stats.inline > 0
        return done

    assert asyncio.run(main()) == 32 * 300


@pytest.mark.linux_only("rwf_nowait")  # (no inline reads without it)
def test_the_reader_answers_as_read_and_stops_once_its_context_closes(
    backend: str, data_path: Path
) -> None:
    fd = os.open(data_path, os.O_RDONLY)
    try:
        ctx = AioContext(backend=backend)
        reader = ctx.inline_bytes_reader(fd, 4096)
        assert reader is not None
        before = ctx.stats().inline
        assert reader(16, 100) == DATA[100:116]
        assert reader(4096, 0) == DATA[:4096]
        assert reader(16, SIZE) == b""  # at the end
        assert reader(16, SIZE + 10**6) == b""  # past it
        assert reader(16, SIZE - 4) is None  # short: the rest is a request's
        for n, off in ((0, 0), (4097, 0), (-1, 0), (16, -1), (16, True), (True, 0), (16, 2**64)):
            assert reader(n, off) is None, (n, off)  # read()'s to answer
        assert ctx.stats().inline == before + 4
        r, w = os.pipe()
        try:
            assert ctx.inline_bytes_reader(r, 16) is None  # (a pipe: never inline)
        finally:
            os.close(r)
            os.close(w)
        assert ctx.close(timeout=10)
        assert reader(16, 100) is None  # handed out before: answers "submit it"
        with pytest.raises(RuntimeError, match="closed"):
            ctx.inline_bytes_reader(fd, 16)
    finally:
        os.close(fd)


def _interrupt_at_line(code: CodeType, k: int) -> Any:
    """A tracer that raises KeyboardInterrupt at the k-th line of ``code``."""
    seen = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal seen
        if frame.f_code is not code:
            return None
        if event == "line":
            seen += 1
            if seen == k:
                raise KeyboardInterrupt
        return tracer

    return tracer


@pytest.mark.linux_only("rwf_nowait")  # (no inline reads without it)
def test_a_ctrl_c_at_any_line_of_a_buffer_change_leaves_the_reader_right(
    backend: str, data_path: Path
) -> None:
    """A KeyboardInterrupt at each line of the reader while it changes its
    scratch buffer's size: it propagates, and every later read answers the
    bytes of its own offset, at either size (or None) -- never those of an
    earlier read, never a buffer of the wrong length."""
    fd = os.open(data_path, os.O_RDONLY)
    ctx = AioContext(backend=backend)
    try:
        reader = ctx.inline_bytes_reader(fd, CHUNK)
        assert reader is not None
        code = reader.__code__
        k = 0
        while True:
            k += 1
            assert reader(16, 0) == DATA[:16]  # the old size in use
            sys.settrace(_interrupt_at_line(code, k))
            try:
                got = reader(32, 1000)
            except KeyboardInterrupt:
                got = None
                interrupted = True
            else:
                interrupted = False
            finally:
                sys.settrace(None)
            assert got in (None, DATA[1000:1032])
            for n, off in ((32, 7), (16, 3), (32, 4000), (16, 9)):
                assert reader(n, off) in (None, DATA[off : off + n]), (k, n, off)
            assert reader(32, 70) == DATA[70:102]
            if not interrupted:
                break
        assert k > 5  # (the size change's lines were all reached)
    finally:
        ctx.close(timeout=10)
        os.close(fd)


def test_another_threads_loop_is_refused_even_for_cached_data(
    backend: str, data_path: Path
) -> None:
    """The cheap test of the loop (its thread) lets no other loop through:
    another thread's loop, a coroutine driven by hand in another thread
    while the file's loop runs, and a later loop in the same thread all get
    RuntimeError, with the data cached."""

    async def main() -> threadlets.AsyncFile:
        f = await threadlets.open(data_path, "rb")
        assert await f.pread(8, 0) == DATA[:8]
        out: list[object] = []

        def other_loop() -> None:
            async def read() -> bytes:
                return await f.pread(8, 0)

            try:
                out.append(asyncio.run(read()))
            except RuntimeError as e:
                out.append(e)

        def by_hand() -> None:
            coro = f.pread(8, 0)
            try:
                coro.send(None)
            except RuntimeError as e:
                out.append(e)
            except StopIteration as e:
                out.append(e.value)
            finally:
                coro.close()

        for fn in (other_loop, by_hand):
            t = threading.Thread(target=fn)
            t.start()
            t.join()
        assert [type(x) for x in out] == [RuntimeError, RuntimeError], out
        assert await f.pread(8, 0) == DATA[:8]  # still its own loop's
        return f

    f = asyncio.run(main())

    async def later() -> bytes:
        return await f.pread(8, 0)

    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(later())
    f._closed = f._released = True  # (its loop is gone: close it by hand)
    f._ctx.forget(f._fd)
    os.close(f._fd)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_gets_runtime_error_not_the_parents_loop(data_path: Path) -> None:
    """A child forked inside the file's loop: the loop it copied runs in a
    thread of the same id there, but is not running (asyncio's own test sees
    the pid change): pread raises RuntimeError, as before the cheap test."""

    async def main() -> int:
        f = await threadlets.open(data_path, "rb")
        assert await f.pread(8, 0) == DATA[:8]
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 3
            try:
                coro = f.pread(8, 0)
                try:
                    coro.send(None)
                except RuntimeError:
                    code = 0
                except StopIteration:
                    code = 1
                except BaseException:
                    code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert await f.pread(8, 0) == DATA[:8]
        await f.close()
        return os.waitstatus_to_exitcode(status)

    assert asyncio.run(main()) == 0
