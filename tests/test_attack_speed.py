"""Attacks on the speed recovery of the core: posix's fd identity through
raw system calls, the completion eventfd written and read holding the GIL,
and the reaper's holding of submissions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext, RingUnavailable

DATA = bytes(range(256)) * 32  # 8 KiB


@pytest.fixture(params=["threads", "io_uring"])
def ctx(request: pytest.FixtureRequest) -> Iterator[AioContext]:
    try:
        c = AioContext(deliver=False, backend=request.param)
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")
    try:
        yield c
    finally:
        c.close()


def _read(rt: px.PosixAio, fd: int, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    cb = px.aiocb(fd, offset, buf, n)
    rt.aio_read(cb)
    rt.aio_suspend([cb], 10)
    assert rt.aio_error(cb) == 0
    return bytes(buf[: rt.aio_return(cb)])


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "os"])
def test_fifo_number_reused_for_a_regular_file_with_the_same_flags(
    ctx: AioContext, tmp_path: Path, raw: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO and a regular file opened O_RDWR have the same F_GETFL flags
    (O_RDWR|O_LARGEFILE).  The engine remembers a FIFO as a stream that
    takes no positional calls: if the reuse goes unnoticed, a read of the
    file at an offset reads at the file position (offset 0) instead.
    Failed before: the read at 4112 returned the bytes at 0."""
    if not raw:
        monkeypatch.setattr(px, "_quick_syscall", None)  # portable mode's path
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reg = tmp_path / "reg"
    reg.write_bytes(DATA)
    rt = px.PosixAio(ctx)
    fd = os.open(fifo, os.O_RDWR)
    try:
        os.write(fd, b"hello")
        assert _read(rt, fd, 0, 100) == b"hello"
    finally:
        os.close(fd)
    fd2 = os.open(reg, os.O_RDWR)
    try:
        assert fd2 == fd  # the number is reused
        assert _read(rt, fd2, 4096 + 16, 16) == DATA[4096 + 16 : 4096 + 32]
    finally:
        os.close(fd2)


class _InterruptFirstSubmit:
    """Stands in for a ring's io_uring_enter: once armed, the next call that
    submits raises KeyboardInterrupt before the system call -- where Ctrl-C
    lands when it arrives at the first instruction of Ring._kick, after the
    SQEs were taken."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.armed = False

    def __call__(self, nr: int, fd: int, to_submit: int, *rest: Any) -> int:
        if to_submit and self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return int(self.real(nr, fd, to_submit, *rest))


@pytest.fixture
def ring_ctx() -> Iterator[tuple[AioContext, _InterruptFirstSubmit]]:
    try:
        c = AioContext(deliver=False, backend="io_uring")
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")
    ring = c._ring
    assert ring is not None
    hook = _InterruptFirstSubmit(ring._enter)
    ring._enter = hook
    try:
        yield c, hook
    finally:
        hook.armed = False
        assert c.close(10)  # (a stranded SQE would keep it open for ever)


def test_ctrl_c_in_send_held_loses_no_submission(
    ring_ctx: tuple[AioContext, _InterruptFirstSubmit],
) -> None:
    """Ctrl-C inside send_held() after the held SQE was taken: the next
    send_held must still submit it.  Failed before: each kick submitted only
    its own count, so the taken SQE stayed in the ring and the read never
    started (wait timed out)."""
    ctx, hook = ring_ctx
    ring = ctx._ring
    assert ring is not None
    r, w = os.pipe()
    try:
        buf = bytearray(4)
        assert ring.plug()
        req = ctx.read(r, 0, buf)  # held by this thread's plug
        hook.armed = True
        with pytest.raises(KeyboardInterrupt):
            ctx.send_held()
        ring.unplug()
        ctx.send_held()
        os.write(w, b"data")
        assert req.wait(10)
        assert req.result() == 4
        assert buf == b"data"
    finally:
        os.close(r)
        os.close(w)


def test_ctrl_c_in_a_submit_does_not_strand_the_next_one(
    ring_ctx: tuple[AioContext, _InterruptFirstSubmit],
) -> None:
    """An interrupted submission's SQE is sent by the next kick; the next
    request must be sent too.  Failed before: the next kick sent only the
    first SQE, and the second read never started."""
    ctx, hook = ring_ctx
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        b1, b2 = bytearray(4), bytearray(4)
        hook.armed = True
        with pytest.raises(KeyboardInterrupt):
            ctx.read(r1, 0, b1)
        req2 = ctx.read(r2, 0, b2)
        os.write(w1, b"aaaa")
        os.write(w2, b"bbbb")
        assert req2.wait(10)
        assert req2.result() == 4
        assert b2 == b"bbbb"
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_ctrl_c_in_aio_suspend_then_aio_suspend_again(
    ring_ctx: tuple[AioContext, _InterruptFirstSubmit],
) -> None:
    """posix: Ctrl-C in aio_suspend's send of what is held; a second
    aio_suspend must see the request complete.  Failed before (EAGAIN after
    the 10 s safety net)."""
    ctx, hook = ring_ctx
    ring = ctx._ring
    assert ring is not None
    rt = px.PosixAio(ctx)
    r, w = os.pipe()
    try:
        buf = bytearray(4)
        cb = px.aiocb(r, 0, buf, 4)
        assert ring.plug()
        rt.aio_read(cb)
        hook.armed = True
        with pytest.raises(KeyboardInterrupt):
            rt.aio_suspend([cb], 10)
        ring.unplug()
        os.write(w, b"data")
        rt.aio_suspend([cb], 10)
        assert rt.aio_error(cb) == 0
        assert rt.aio_return(cb) == 4
        assert buf == b"data"
    finally:
        os.close(r)
        os.close(w)
