"""The ring's one-buffer fast path (issue 13, tenth session):
AioContext._start_rw sends a read or write of one flat buffer of a file
_ring_plain knows to the ring without _start's and _RingBackend.start's
frames and without a _Transfer (the request keeps the transfer's
particulars in ``_args`` until its completion needs one: a short transfer,
resumed by a worker).  Each must answer as the generic path does -- same
bytes, same counts, the buffer the caller's again once finished -- and
hold under a Ctrl-C at every C return of submission and completion."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext, CancelResult, aligned_buffer

from .conftest import HAVE_RING, interrupt_at_c_return

pytestmark = pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")


def _open_direct(path: Path, flags: int) -> int:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT")
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError:
        pytest.skip("O_DIRECT refused here")


def _settled(ctx: AioContext, where: object) -> None:
    assert ctx.drain(timeout=10), where
    assert ctx.stats().outstanding == 0, where
    assert not ctx.queue._claimed, where


def test_the_fast_path_is_taken_and_answers_as_preadv(tmp_path: Path) -> None:
    """A buffered file is known to _ring_plain from its first use; an
    O_DIRECT one once its alignment was probed.  Reads and writes of
    bytes, bytearray and memoryviews (read-only ones of bytes, and of a
    bytearray, which the ring cannot take) give what os.preadv gives."""
    p = tmp_path / "f"
    data = os.urandom(1 << 16)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    dfd = _open_direct(p, os.O_RDWR)
    ctx = AioContext(backend="io_uring", inline=False)
    try:
        buf = bytearray(4096)
        assert ctx.read(fd, 4096, buf).result(timeout=10) == 4096
        assert bytes(buf) == data[4096:8192]
        f = ctx._files[fd]
        assert ctx._ring_plain[f] == 0
        before = ctx.stats().ring
        cases: list[Any] = [
            b"a" * 100,
            bytearray(b"b" * 300),
            memoryview(bytearray(b"c" * 5000))[1000:],
            memoryview(b"d" * 700),
            memoryview(bytearray(b"e" * 64)).toreadonly(),  # (not the ring's: the pool's)
        ]
        for i, w in enumerate(cases):
            n = len(memoryview(w))
            assert ctx.write(fd, 1000 * i + 7, w).result(timeout=10) == n
            assert os.pread(fd, n, 1000 * i + 7) == bytes(w)
        for off, n in [(0, 1), (12345, 4000), (len(data) - 10, 100), (len(data) + 5, 10)]:
            got = bytearray(n)
            want = os.preadv(fd, [bytearray(n)], off)
            assert ctx.read(fd, off, got).result(timeout=10) == want
            assert bytes(got[:want]) == os.pread(fd, n, off)
            view = memoryview(bytearray(n + 3))[3:]
            assert ctx.read(fd, off, view).result(timeout=10) == want
            assert bytes(view[:want]) == os.pread(fd, n, off)
        assert ctx.stats().ring - before == len(cases) - 1 + 8
        # O_DIRECT: the first aligned read probes, then the fast path.
        dbuf = aligned_buffer(4096)
        assert ctx.read(dfd, 8192, dbuf).result(timeout=10) == 4096
        df = ctx._files[dfd]
        assert df in ctx._ring_plain
        assert ctx._ring_plain[df] > 0
        for off in (0, 4096 * 3):
            assert ctx.read(dfd, off, dbuf).result(timeout=10) == 4096
            assert bytes(dbuf) == os.pread(fd, 4096, off)
        # Misaligned (offset, length, address): the threads' bounce buffer.
        for off, b in [(1, aligned_buffer(4096)), (0, aligned_buffer(4097)[:100])]:
            n = len(b)
            assert ctx.read(dfd, off, b).result(timeout=10) == n
            assert bytes(b) == os.pread(fd, n, off)
        odd = bytearray(4096 + 1)
        assert ctx.read(dfd, 0, memoryview(odd)[1:]).result(timeout=10) == 4096
        assert bytes(odd[1:]) == os.pread(fd, 4096, 0)
        ctx.forget(fd)
        assert f not in ctx._ring_plain
    finally:
        ctx.close(timeout=10)
        os.close(fd)
        os.close(dfd)


def test_an_append_write_is_not_sent_to_an_offset(tmp_path: Path) -> None:
    """An O_APPEND file is in _ring_plain (its reads go to the ring), but
    a write there is the kernel's to place: never the fast path's offset."""
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")
    fd = os.open(p, os.O_RDWR | os.O_APPEND)
    ctx = AioContext(backend="io_uring", inline=False)
    try:
        assert ctx.write(fd, 0, b"abc").result(timeout=10) == 3
        assert ctx.write(fd, 2, bytearray(b"de")).result(timeout=10) == 2
        assert p.read_bytes() == b"0123456789abcde"
        got = bytearray(4)
        assert ctx.read(fd, 8, got).result(timeout=10) == 4
        assert bytes(got) == b"89ab"
    finally:
        ctx.close(timeout=10)
        os.close(fd)


@pytest.mark.parametrize("refused", [False, True])
def test_the_buffer_is_the_callers_again_once_finished(tmp_path: Path, refused: bool) -> None:
    """Whole, short (resumed by a worker), or refused by the ring (the
    pool's, with a _Transfer made then): once the request finished, nothing
    of it holds an export of the buffer -- a bytearray read into through a
    memoryview the caller let go can be resized while the request is
    still held."""
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * 32)
    fd = os.open(p, os.O_RDWR)
    ctx = AioContext(backend="io_uring", inline=False)
    ring = ctx._ring
    assert ring is not None
    try:
        assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1
        if refused:
            ring.submit = lambda *a, **k: 0  # type: ignore[method-assign]
        for off in (0, 8192 - 100):  # whole; short at EOF
            ba = bytearray(512)
            req = ctx.read(fd, off, memoryview(ba))
            assert req.result(timeout=10) == min(512, 8192 - off)
            assert ctx.drain(timeout=10)
            ba.extend(b"x")  # BufferError if the request still held a view
            assert bytes(ba[: req.result()]) == os.pread(fd, 512, off)
            wa = bytearray(b"w" * 300)
            wreq = ctx.write(fd, off, memoryview(wa))
            assert wreq.result(timeout=10) == 300
            assert ctx.drain(timeout=10)
            wa.extend(b"x")
            del req, wreq
        _settled(ctx, "end")
    finally:
        ctx.close(timeout=10)
        os.close(fd)


@pytest.mark.parametrize("kind", ["read", "write", "direct-read", "short-read"])
def test_ctrl_c_at_every_c_return_of_the_fast_path(tmp_path: Path, kind: str) -> None:
    """Ctrl-C at the n-th C return of the submission (the pin, the claim,
    Ring.submit, the stats' counter) and of the wait (the reap, the
    completion's _Transfer made for a short read, its hand-over to a
    worker), for every n: the request completes -- with its real count,
    or EINTR carrying what moved -- or never starts; nothing stays
    outstanding or claimed; a completed read holds the file's bytes."""
    p = tmp_path / "f"
    data = os.urandom(3 * 4096 + 100)
    p.write_bytes(data)
    direct = kind == "direct-read"
    fd = _open_direct(p, os.O_RDWR) if direct else os.open(p, os.O_RDWR)
    off = 3 * 4096 if kind == "short-read" else 4096
    try:
        n = 0
        while True:
            n += 1
            assert n < 3000, "never ran to its end"
            ctx = AioContext(backend="io_uring", inline=False)
            try:
                warm = aligned_buffer(4096)
                assert ctx.read(fd, 0, warm).result(timeout=10) == 4096
                assert ctx.read(fd, 8192, aligned_buffer(4096)).result(timeout=10) == 4096
                assert ctx._files[fd] in ctx._ring_plain
                buf = aligned_buffer(4096)
                payload = bytes([n % 251 + 1]) * 4096
                req = None
                seen = interrupt_at_c_return(n)
                try:
                    write = kind == "write"
                    req = ctx.write(fd, off, payload) if write else ctx.read(fd, off, buf)
                    ctx.wait(req, timeout=10)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                _settled(ctx, f"C return {n}")
                if req is not None:
                    assert req.done(), f"C return {n}"
                    want = 4096 if kind != "short-read" else 100
                    if not req.cancelled() and req.exception() is None:
                        assert req.result() == want, f"C return {n}"
                        if kind == "write":
                            assert os.pread(fd, 4096, off) == payload
                        else:
                            assert bytes(buf[:want]) == data[off : off + want]
                    elif not req.cancelled():
                        exc = req.exception()
                        assert isinstance(exc, InterruptedError), (n, exc)
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break  # the interrupt no longer lands: every point was tried
        assert n > 15, f"only {n} C returns: the request did not reach the ring"
    finally:
        os.close(fd)


def test_cancel_of_a_fast_path_request_answers_one_of_three(tmp_path: Path) -> None:
    """cancel() of a request the fast path sent (no _Transfer yet): CANCELED
    (it never touched the buffer), NOTCANCELED (it completes with its real
    count) or ALLDONE, and the state agrees."""
    p = tmp_path / "f"
    data = os.urandom(1 << 18)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    ctx = AioContext(backend="io_uring", inline=False)
    try:
        assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1
        answers = set()
        for i in range(64):
            buf = bytearray(b"\xee" * 4096)
            req = ctx.read(fd, 4096 * (i % 64), buf)
            answer = req.cancel()
            answers.add(answer)
            ctx.wait(req, timeout=10)
            if answer is CancelResult.CANCELED:
                assert req.cancelled()
                assert buf == b"\xee" * 4096
            else:
                assert req.result() == 4096
                assert bytes(buf) == data[4096 * (i % 64) : 4096 * (i % 64 + 1)]
        assert answers <= set(CancelResult)
        _settled(ctx, "end")
    finally:
        ctx.close(timeout=10)
        os.close(fd)


def test_close_and_fork_forget_what_the_fast_path_knew(tmp_path: Path) -> None:
    """close() clears _ring_plain with the files; a closed ring (its _room
    0) refuses a submission as it did before."""
    p = tmp_path / "f"
    p.write_bytes(bytes(4096))
    fd = os.open(p, os.O_RDWR)
    ctx = AioContext(backend="io_uring", inline=False)
    ring = ctx._ring
    assert ring is not None
    try:
        assert ctx.write(fd, 0, b"x").result(timeout=10) == 1
        assert ctx._ring_plain
    finally:
        assert ctx.close(timeout=10)
        os.close(fd)
    assert not ctx._ring_plain
    assert ring._room == 0
    assert ring.submit(0, -1, 0, 0, 0, 0, lambda res: None) == 0
    with pytest.raises(RuntimeError):
        ctx.write(fd, 0, b"x")


def test_start_rw_sets_what_aiorequest_init_sets(tmp_path: Path) -> None:
    """_start_rw builds its request without AioRequest.__init__ (one frame
    less per request), spelling out the same stores: a slot one of them
    sets and the other does not is an AttributeError (or a stale value)
    later, on some rare path.  Compared at the moment the ring is asked."""
    from threadlets.engine import AioRequest

    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    fd = os.open(p, os.O_RDWR)
    ctx = AioContext(backend="io_uring", inline=False)
    ring = ctx._ring
    assert ring is not None

    def slots_set(req: object) -> set[str]:
        names: set[str] = set()
        for cls in type(req).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if name != "__weakref__" and hasattr(req, name):
                    names.add(name)
        return names

    seen: list[set[str]] = []

    def refuse(*args: Any, **kwargs: Any) -> int:
        seen.append(slots_set(args[6].__self__))  # (the request's _ring_done)
        return 0  # refused: the request goes to the pool

    try:
        assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1  # learns the file
        ring.submit = refuse  # type: ignore[method-assign]
        refused = []
        for write in (False, True):
            buf = bytearray(b"w" * 512)
            req = (ctx.write if write else ctx.read)(fd, 0, buf)
            refused.append(slots_set(req))
            assert req.result(timeout=10) == 512
        assert len(seen) == 2
        made = slots_set(AioRequest(ctx, "read", None, (), None))
        for names in seen:
            # What it leaves unset while the ring has it: _fn and _kwargs
            # (see _start_rw: what finishes it other than the fused path
            # sets them first).
            assert names == made - {"_fn", "_kwargs"}
        for names in refused:
            assert names == made  # (the pool's: as __init__ made it)
    finally:
        del ring.submit
        ctx.close(timeout=10)
        os.close(fd)
