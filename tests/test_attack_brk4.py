"""An outsider's attack on the twelfth session's speed changes (issue 13):
the front end's door (AioContext._start_rw with no file record), the
cheap thread test of preadinto and pwrite, the cached pread (the reader's
count by identity, close()'s _home, the per-loop fair-yield tick), and the
ring's mask by subscript.

Oracles: os.pread, the old reader's model, read() against the door, the
fair-yield promise of threadlets.awaitable ("every YIELD_EVERY inline
completions on a loop, the task that makes the next one yields")."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets import awaitable as aw
from threadlets.asyncfile import CHUNK

from .conftest import HAVE_RING

SIZE = 3 * CHUNK + 321
DATA = random.Random(4).randbytes(SIZE)


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


def _run_on(loop_kind: str, main: Callable[[], Awaitable[Any]]) -> Any:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
        try:
            return loop.run_until_complete(main())
        finally:
            loop.close()
    return asyncio.run(main())  # type: ignore[arg-type]


# -- the fair yield: one count for every inline path of a loop ---------------------------------


@pytest.mark.linux_only("rwf_nowait")
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_task_mixing_inline_paths_lets_others_run_every_yield_every_answers(
    backend: str, loop_kind: str, data_path: Path
) -> None:
    """pread counted its inline answers on a tick of its own, preadinto,
    the stream and read_bytes on LoopIO.inline_run: a task taking turns
    between them answered up to 2 * YIELD_EVERY - 1 times in a row (511)
    without letting another task run.  One count for them all: never more
    than YIELD_EVERY in a row, whatever the mix."""

    async def main() -> int:
        f = await threadlets.open(data_path, "rb")
        g = await threadlets.open(data_path, "rb", buffering=0)
        ran = 0
        done = False

        async def ticker() -> None:
            nonlocal ran
            while not done:
                ran += 1
                await asyncio.sleep(0)

        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        buf = bytearray(64)
        worst = run = 0
        last = ran
        calls: list[Callable[[int], Awaitable[object]]] = [
            lambda i: f.pread(64, i % 4096),
            lambda i: f.preadinto(buf, i % 4096),
            lambda i: g.read(64),
            lambda i: threadlets.read_bytes(data_path),
        ]
        for mix in ([0, 1], [0, 2], [0, 3], [1, 0, 0, 2, 3]):
            for i in range(aw.YIELD_EVERY * 6):
                await calls[mix[i % len(mix)]](i)
                if ran == last:
                    run += 1
                else:
                    worst = max(worst, run)
                    run, last = 1, ran
                if i % 64 == 0:
                    await g.seek(0)
        worst = max(worst, run)
        done = True
        await t
        await f.close()
        await g.close()
        return worst

    worst = _run_on(loop_kind, main)
    assert aw.YIELD_EVERY // 2 < worst <= aw.YIELD_EVERY  # (inline it was; and fair)


# -- a file collected open, kept alive by its ResourceWarning -------------------------------------


def test_a_file_kept_by_its_unclosed_warning_reads_no_reused_descriptor(
    backend: str, tmp_path: Path
) -> None:
    """A file collected open is closed by __del__, with a ResourceWarning
    whose ``source`` is the file: warnings' record=True (pytest's own
    capture) keeps it alive.  __del__ closed its descriptor but left pread's
    one cheap test (_home) and preadinto's and pwrite's (_slow_path) open,
    so the file read -- and wrote -- whatever file got the number next.
    As after close(): ValueError, and the other file untouched."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A" * 100)
    b.write_bytes(b"SECRET" * 10)

    async def main() -> list[str]:
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            f = await threadlets.open(a, "r+b")
            fd = f.fileno()
            await f.pread(6, 0)  # (the inline reader made and used)
            del f
            gc.collect()
        kept = [w.source for w in log if isinstance(w.source, threadlets.AsyncFile)]
        assert len(kept) == 1
        assert kept[0].closed
        g = kept[0]
        fd2 = os.open(b, os.O_RDWR)
        try:
            assert fd2 == fd  # (the number reused)
            out = []
            for call in (
                lambda: g.pread(6, 0),
                lambda: g.preadinto(bytearray(6), 0),
                lambda: g.preadinto(memoryview(bytearray(6)), 0),
                lambda: g.pwrite(b"XXXXXX", 0),
                lambda: g.pwrite(bytearray(b"XXXXXX"), 0),
            ):
                try:
                    got = await call()
                except ValueError as e:
                    out.append(str(e))
                else:
                    out.append(f"answered {got!r}")
            return out
        finally:
            os.close(fd2)

    out = asyncio.run(main())
    assert out == ["I/O operation on closed file"] * 5
    assert b.read_bytes() == b"SECRET" * 10
