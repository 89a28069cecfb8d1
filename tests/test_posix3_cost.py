"""threadlets.posix's per-request cost, third pass (issue 13): a quick
aio_read/aio_write stores no context in the aiocb (only the general path's
launch reads it), and its completion clears none; the general path keeps
its own.  The counts of posix.py's bytecodes per quick read on each side
(see tests/test_posix_cost.py for the method) with the new bounds."""

from __future__ import annotations

import collections
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext, ThreadletQueue

from .conftest import wait_until

DATA = bytes((i * 11 + 5) % 251 + 1 for i in range(4096))


class Sub(px.aiocb):
    """An aiocb that always takes the general path (not the exact class)."""

    __slots__ = ()


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    p = tmp_path / "data"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDWR)
    yield fd
    os.close(fd)


def _done(rt: px.PosixAio, cb: px.aiocb) -> tuple[int, int]:
    rt.aio_suspend([cb], 10)
    return rt.aio_error(cb), rt.aio_return(cb)


@pytest.mark.parametrize(
    "general",
    [
        pytest.param(
            False,
            marks=pytest.mark.skipif(
                px._quick_syscall is None,
                reason="posix's quick path (raw system calls) is off here: portable mode",
            ),
        ),
        True,
    ],
)
def test_only_the_general_path_stores_the_context_and_every_end_clears_it(
    backend: str, general: bool
) -> None:
    """A read held in progress (an empty pipe) on each path: the quick one
    (an aiocb, its fd's identity noted by an earlier submission) stores no
    context, the general one (a subclass) the context it was accepted for;
    both read None once finished, with the data the pipe got, and a
    cancel in between answers as before (NOTCANCELED on the threads
    backend, where the read runs; CANCELED on io_uring, which takes it
    back -- then the next read gets the data)."""
    ctx = AioContext(deliver=False, backend=backend, inline=False)
    r, w = os.pipe()
    try:
        rt = px.PosixAio(ctx)
        first = px.aiocb(r, 0, bytearray(4))
        os.write(w, b"abcd")
        rt.aio_read(first)  # (notes the pipe's identity: the next may be quick)
        assert _done(rt, first) == (0, 4)
        cb = (Sub if general else px.aiocb)(r, 0, bytearray(4))
        rt.aio_read(cb)
        assert rt.aio_error(cb) == px.errno.EINPROGRESS
        assert cb._ctx is (ctx if general else None)
        assert cb._status is px._INFLIGHT
        answer = rt.aio_cancel(r, cb)
        if answer == px.AIO_CANCELED:
            assert _done(rt, cb) == (px.errno.ECANCELED, -1)
            assert cb._ctx is None
            cb = px.aiocb(r, 0, bytearray(4))
            rt.aio_read(cb)
        else:
            assert answer == px.AIO_NOTCANCELED
        os.write(w, b"wxyz")
        assert _done(rt, cb) == (0, 4)
        assert bytes(cb.aio_buf) == b"wxyz"
        assert (cb._ctx, cb._view, cb._req) == (None, None, None)
        assert not rt._fds
    finally:
        os.close(w)
        os.close(r)
        ctx.close()


def test_a_quick_read_then_a_general_fsync_then_a_quick_read_on_one_aiocb(
    backend: str, fd: int
) -> None:
    """One aiocb through the quick path, the general one (aio_fsync) and
    the quick one again: each finishes with its own answer and leaves no
    context behind (the general path's launch reads the one it stored)."""
    ctx = AioContext(deliver=False, backend=backend)
    try:
        rt = px.PosixAio(ctx)
        cb = px.aiocb(fd, 100, bytearray(50))
        rt.aio_read(cb)  # general (identity noted)
        assert _done(rt, cb) == (0, 50)
        rt.aio_read(cb)  # quick
        assert _done(rt, cb) == (0, 50)
        assert bytes(cb.aio_buf) == DATA[100:150]
        rt.aio_fsync(os.O_SYNC, cb)
        assert _done(rt, cb) == (0, 0)
        assert cb._ctx is None
        cb.aio_offset = 4090
        rt.aio_read(cb)  # quick, short at the end of the file
        assert _done(rt, cb) == (0, 6)
        assert bytes(cb.aio_buf[:6]) == DATA[4090:]
        assert cb._ctx is None
    finally:
        ctx.close()


@pytest.mark.linux_only("rwf_nowait")  # (portable mode: the general path, see _identity)
def test_a_quick_read_costs_fewer_bytecodes_of_posix_on_each_side(backend: str, fd: int) -> None:
    """posix.py's bytecodes per aio_read + aio_error + aio_return in the
    submitting thread and per completion in the completing one, counted as
    tests/test_posix_cost.py counts them (nobody waits: no timing in the
    count): 275-281 and 83 now (io_uring, threads), against 278-284 and
    87 before the quick path stopped storing (and its completion
    clearing) the context."""
    posix_file = px.__file__
    counts: collections.Counter[bool] = collections.Counter()
    main = threading.get_ident()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != posix_file:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[threading.get_ident() == main] += 1
        return tracer

    threading.settrace(tracer)
    queue = ThreadletQueue(max_threads=2)
    try:
        ctx = AioContext(queue, deliver=False, backend=backend, inline=False)
        try:
            rt = px.PosixAio(ctx)
            cb = px.aiocb(fd, 0, bytearray(512))
            rt.aio_read(cb)
            assert _done(rt, cb) == (0, 512)
            counts.clear()
            n = 32
            for k in range(n):
                cb.aio_offset = 512 * (k % 8)
                sys.settrace(tracer)
                rt.aio_read(cb)
                sys.settrace(None)
                wait_until(lambda: cb._status is px._DONE)
                sys.settrace(tracer)
                rt.aio_error(cb)
                rt.aio_return(cb)
                sys.settrace(None)
            assert _done(rt, cb) == (0, 512)
        finally:
            sys.settrace(None)
            threading.settrace(None)  # type: ignore[arg-type]
            ctx.close()
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
        queue.close(timeout=10)
    submitting, completing = counts[True] / n, counts[False] / n
    assert submitting < 283, f"{submitting:.0f} bytecodes of posix.py per read, submitting"
    assert completing < 86, f"{completing:.0f} bytecodes of posix.py per read, completing"
