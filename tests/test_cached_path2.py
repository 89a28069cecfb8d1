"""The cached-read hot path, second round (issue 13): the engine's inline
reader knows its scratch buffer's count by identity (``n is size``),
pread's one cheap test covers a closed file (close() sets its _home to
_NO_HOME first), and the fair yield of inline preads is a per-loop tick.

Each must answer as before: the reader as its model (the bytes, ``b""``
at the end, None for anything read() must answer), a closed file with
ValueError even when its descriptor's number was reused, a Ctrl-C at any
line of close() leaves pread's test right, and a task reading cached data
from many files lets the others run every YIELD_EVERY reads."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import threadlets
from threadlets import AioContext
from threadlets import awaitable as aw
from threadlets.asyncfile import CHUNK, AsyncFile

from .conftest import HAVE_RING

SIZE = 2 * CHUNK + 777
DATA = random.Random(1302).randbytes(SIZE)


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


def _model(n: object, off: object, limit: int) -> bytes | None:
    """What the inline reader answers: the bytes if all there, b"" at or
    past the end, None for a short read or anything read() must answer."""
    if type(n) is not int or not 0 < n <= limit:
        return None
    if type(off) is not int or off < 0 or off + n > 2**63 - 1:
        return None
    if off >= SIZE:
        return b""
    got = DATA[off : off + n]
    return got if len(got) == n else None


def _fresh(v: int) -> int:
    """An int equal to ``v`` but another object (for v > 256)."""
    return int(str(v))


# -- the reader: its count by identity -----------------------------------------------------------


@pytest.mark.linux_only("rwf_nowait")
def test_the_first_count_and_equal_counts_of_other_objects_read_right(
    backend: str, data_path: Path
) -> None:
    """A new reader answers None (never b"") for None or any other object as
    the count, even past the end of the file (its "no buffer yet" is no
    argument's value); an equal count of another object reads as the
    constant does; a bool or an int subclass of the buffer's length is
    read()'s to answer."""
    fd = os.open(data_path, os.O_RDONLY)
    ctx = AioContext(backend=backend)
    try:
        reader = ctx.inline_bytes_reader(fd, CHUNK)
        assert reader is not None
        for n in (None, object(), 0, -1, "4", 1.0):
            assert reader(n, SIZE + 100) is None, n  # type: ignore[arg-type]
            assert reader(n, 0) is None, n  # type: ignore[arg-type]
        before = ctx.stats().inline
        const = 4096
        assert reader(const, 10) == DATA[10:4106]
        assert reader(const, SIZE) == b""
        for k in range(6):  # alternating objects, one length
            n = const if k % 2 else _fresh(4096)
            assert n == 4096
            assert reader(n, 100 * k) == DATA[100 * k : 100 * k + 4096]
        assert reader(_fresh(4096), SIZE - 10) is None  # short
        assert ctx.stats().inline == before + 8
        assert reader(1, 5) == DATA[5:6]
        assert reader(True, 5) is None  # (not a plain int, though == 1)

        class Count(int):
            pass

        assert reader(Count(1), 5) is None
        assert reader(1, 6) == DATA[6:7]
    finally:
        ctx.close(timeout=10)
        os.close(fd)


@pytest.mark.linux_only("rwf_nowait")
@settings(max_examples=60, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from([1, 16, 4096, CHUNK, CHUNK + 1, 0, -1]),
                st.integers(-2, CHUNK + 2),
                st.sampled_from([None, True, 4096.0]),
            ),
            st.booleans(),  # a fresh object of the count
            st.one_of(st.integers(-2, SIZE + 10), st.sampled_from([2**63 - 1, 2**64, True])),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_the_reader_answers_as_its_model_whatever_the_order_of_counts(
    calls: list[tuple[object, bool, object]],
) -> None:
    """A differential test: any sequence of counts (the same objects,
    equal ones, new lengths, bad ones) and offsets, against the model."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f"
        p.write_bytes(DATA)
        with open(p, "rb") as f:
            f.read()
        fd = os.open(p, os.O_RDONLY)
        ctx = AioContext(backend="threads")
        try:
            reader = ctx.inline_bytes_reader(fd, CHUNK)
            assert reader is not None
            for count, fresh, off in calls:
                n = _fresh(count) if fresh and type(count) is int else count
                got = reader(n, off)  # type: ignore[arg-type]
                want = _model(n, off, CHUNK)
                # (Cached, so never "would block"; a model's None is None.)
                assert got == want, (n, off)
        finally:
            ctx.close(timeout=10)
            os.close(fd)


# -- pread's cheap test and close() ----------------------------------------------------------------


@pytest.mark.linux_only("rwf_nowait")
def test_pread_of_a_closed_file_raises_even_when_its_number_is_reused(
    backend: str, data_path: Path, tmp_path: Path
) -> None:
    """A closed file's pread, in its loop's thread, raises ValueError --
    it does not read whatever file got the descriptor's number since."""
    other = tmp_path / "other"
    other.write_bytes(b"o" * 8192)

    async def main() -> None:
        f = await threadlets.open(data_path, "rb")
        assert await f.pread(4096, 0) == DATA[:4096]  # inline
        number = f.fileno()
        await f.close()
        assert f._home._thread_id is None
        fd = os.open(other, os.O_RDONLY)  # (most likely the number just closed)
        try:
            assert fd == number or os.fstat(number)  # (else taken by someone else: still open)
            with pytest.raises(ValueError, match="closed"):
                await f.pread(4096, 0)
            with pytest.raises(ValueError, match="closed"):
                await f.pread(_fresh(4096), 0)
        finally:
            os.close(fd)

    asyncio.run(main())


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


@pytest.mark.linux_only("rwf_nowait")
def test_a_ctrl_c_at_any_line_of_close_leaves_preads_test_right(data_path: Path) -> None:
    """A KeyboardInterrupt at each line of close(): whenever the file is on
    the slow path, pread's cheap test does not pass (_home is _NO_HOME), and
    pread either reads (not closed yet) or raises ValueError."""
    code = AsyncFile.close.__code__

    async def main() -> int:
        k = 0
        while True:
            k += 1
            fd = os.open(data_path, os.O_RDONLY)
            f = threadlets.wrap(fd, closefd=False)
            try:
                assert await f.pread(16, 0) == DATA[:16]
                coro = f.close()
                sys.settrace(_interrupt_at_line(code, k))
                try:
                    coro.send(None)  # (nothing to wait for: no await)
                except StopIteration:
                    interrupted = False
                except KeyboardInterrupt:
                    interrupted = True
                finally:
                    sys.settrace(None)
                    coro.close()
                if f._slow_path:
                    assert f._home._thread_id is None, k
                try:
                    got = await f.pread(16, 100)
                except ValueError:
                    assert f._closed, k
                else:
                    assert got == DATA[100:116], k
                    assert not f._closed, k
            finally:
                f._closed = f._slow_path = True  # (as closed, for __del__)
                with contextlib.suppress(Exception):
                    f._ctx.forget(fd)
                os.close(fd)
            if not interrupted:
                return k

    assert asyncio.run(main()) > 3


# -- the fair yield ----------------------------------------------------------------------------------


@pytest.mark.linux_only("rwf_nowait")  # (no inline answer without it)
def test_inline_preads_yield_once_every_yield_every_reads_of_the_loop(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tick is the loop's, shared by all its files: one task reading
    round-robin from 8 files (each file YIELD_EVERY/2 reads) yields once
    every YIELD_EVERY reads in all, and lets another task run each time."""
    yields = []
    real = aw.LoopIO.fair_yield

    async def counting(self: aw.LoopIO) -> None:
        yields.append(1)
        await real(self)

    monkeypatch.setattr(aw.LoopIO, "fair_yield", counting)

    async def main() -> int:
        files = [await threadlets.open(data_path, "rb") for _ in range(8)]
        for f in files:
            assert f._tick is files[0]._tick
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        start = ticks
        del yields[:]
        for i in range(aw.YIELD_EVERY * 4):
            f = files[i % 8]
            assert await f.pread(64, (i * 64) % (SIZE - 64)) == DATA[(i * 64) % (SIZE - 64) :][:64]
        ran = ticks - start
        done = True
        await t
        for f in files:
            await f.close()
        assert len(yields) == 4
        return ran

    assert asyncio.run(main()) >= 4


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_task_reading_many_cached_files_lets_others_run(data_path: Path) -> None:
    """As above, on each event loop: another task runs while one reads
    cached data round-robin from more files than reads per file between
    yields."""
    import anyio

    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    files = [await threadlets.open(data_path, "rb") for _ in range(8)]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.lowlevel.checkpoint()
            start = ticks
            for i in range(aw.YIELD_EVERY * 6):
                await files[i % 8].pread(64, (i * 64) % 4096)
            done = True
        assert ticks - start >= 5
    finally:
        for f in files:
            await f.close()


# -- the two copies of the fast path -------------------------------------------------------------


def _fast_path(fn: Any) -> list[str]:
    """The lines of ``fn`` from its inline read to ``return data``, comments
    and blank lines left out."""
    lines = inspect.getsource(fn).splitlines()
    start = next(i for i, s in enumerate(lines) if "read_inline = self._read_inline" in s)
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "return data")
    out = []
    for line in lines[start : end + 1]:
        code = line.split("#", 1)[0].strip()
        if code:
            out.append(code)
    return out


def test_pread_and_read_at_share_the_fast_path() -> None:
    """_read_at repeats pread's inline read: keep the two in step."""
    assert _fast_path(AsyncFile.pread) == _fast_path(AsyncFile._read_at)
    assert any("next(self._tick)" in s for s in _fast_path(AsyncFile.pread))


def test_each_loop_has_one_tick() -> None:
    """LoopIO.tick: one tick per LoopIO, true once in YIELD_EVERY."""

    async def main() -> None:
        io_ = aw.current()
        t = io_.tick
        assert aw.current().tick is t
        assert [next(t) for _ in range(aw.YIELD_EVERY * 2)].count(True) == 2

    asyncio.run(main())
    asyncio.run(main())
