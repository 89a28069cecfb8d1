"""Async files under attack (second round): close() racing stream calls,
cancelled calls that must consume nothing, cancelled FIFO opens, dropped
loops.  One regression test per finding, on asyncio, uvloop and trio where
the loop matters, on both engine backends where requests do."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest

import threadlets
import threadlets.awaitable as aw

from .test_asyncfile import anyio_backend, backend, until

__all__ = ["anyio_backend", "backend"]  # fixtures used by name

pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

BIG = bytes(range(256)) * (4 << 12)  # 4 MiB


@pytest.fixture
def no_inline(backend: str) -> Any:
    aw.configure(inline=False, backend=backend)
    try:
        yield backend
    finally:
        aw.configure()


# -- S1: close() during a binary stream call -------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("call", ["writelines", "read"])
async def test_close_stops_a_stream_call_in_progress(
    tmp_path: Path, no_inline: str, call: str
) -> None:
    p, victim = tmp_path / "a", tmp_path / "victim"
    p.write_bytes(BIG)
    victim.write_bytes(b"v" * len(BIG))
    f = await threadlets.open(p, "r+b")
    outcome: list[object] = []

    async def task() -> None:
        try:
            if call == "writelines":
                await f.writelines([b"A" * 65536] * 64)
                outcome.append("done")
            else:
                outcome.append(await f.read())
        except ValueError as e:
            outcome.append(e)

    fd2 = -1
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(task)
            await until(lambda: bool(f._outstanding))
            await f.close()
            fd2 = os.open(victim, os.O_RDWR)  # the number f had, most likely
        [got] = outcome
        if isinstance(got, ValueError):
            assert str(got) == "I/O operation on closed file."
        elif call == "read":
            assert got == BIG  # finished before the close took effect
        os.lseek(fd2, 0, os.SEEK_SET)
        assert os.read(fd2, len(BIG) + 1) == b"v" * len(BIG)
    finally:
        if fd2 >= 0:
            os.close(fd2)


# -- S2/S5: close() while a task waits for readiness ------------------------------------------


@pytest.mark.anyio
async def test_close_wakes_a_pipe_reader_and_frees_the_number() -> None:
    r, w = os.pipe()
    f = threadlets.wrap(r, "rb")
    outcome: list[object] = []

    async def reader() -> None:
        try:
            outcome.append(await f.read(5))
        except ValueError as e:
            outcome.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        await f.close()
        with anyio.fail_after(10):
            while not outcome:
                await anyio.lowlevel.checkpoint()
    [got] = outcome
    assert isinstance(got, ValueError) and "closed file" in str(got)
    # The number, reused, works for a new file on the same loop.
    r2, w2 = os.pipe()
    try:
        g = threadlets.wrap(r2, "rb")
        async with g, anyio.create_task_group() as tg:

            async def read_it() -> None:
                outcome.append(await g.read(5))

            tg.start_soon(read_it)
            await anyio.wait_all_tasks_blocked()
            os.write(w2, b"FOR-B")
        assert outcome[-1] == b"FOR-B"
    finally:
        os.close(w)
        os.close(w2)


@pytest.mark.anyio
async def test_closing_a_text_stream_with_a_blocked_reader_finishes() -> None:
    a, b = socket.socketpair()
    try:
        f = threadlets.wrap(a.fileno(), "r+", encoding="utf-8", closefd=False)
        outcome: list[object] = []

        async def reader() -> None:
            try:
                outcome.append(await f.readline())
            except ValueError as e:
                outcome.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(10):
                await f.close()
        assert f.closed
        assert isinstance(outcome[0], ValueError)
        # closefd=False: the socket still works.
        b.send(b"x")
        assert a.recv(1) == b"x"
    finally:
        a.close()
        b.close()
