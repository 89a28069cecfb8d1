"""The per-request fast paths (issue 13): AioContext.write's common case,
the ring's single-buffer submission spelled out in _RingBackend.start,
pin_buffer's bytes address, the claimed set's weak references, Ring._collect's
counts and reap's clear of a batch handed out whole, AsyncFile.preadinto's
and pwrite's spelled-out checks and waits.  Each must answer as the generic
path does: same bytes, same exception types, nothing left behind."""

from __future__ import annotations

import array
import asyncio
import ctypes
import gc
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets import AioContext
from threadlets.probe import pin_buffer

from .conftest import HAVE_RING, interrupt_at_c_return


def _outcome(fn: Any) -> tuple[str, object]:
    try:
        return "ok", fn()
    except Exception as e:
        return "raised", type(e)


BAD_WRITES: list[tuple[str, Any, Any]] = [
    ("bytes", b"abcd", 0),
    ("bytearray", bytearray(b"efgh"), 4),
    ("memoryview", memoryview(b"ijkl"), 8),
    ("readonly view of bytearray", memoryview(bytearray(b"mnop")).toreadonly(), 12),
    ("view cast to I", memoryview(bytearray(8)).cast("I"), 16),
    ("2-d view", memoryview(bytearray(8)).cast("B", (2, 4)), 24),
    ("strided view", memoryview(bytearray(8))[::2], 0),
    ("array", array.array("h", [1, 2]), 0),
    ("not a buffer", "text", 0),
    ("negative offset", b"x", -1),
    ("offset past the largest", b"x", 2**63 - 1),
    ("float offset", b"x", 1.0),
    ("bool offset", b"x", True),
]


@pytest.mark.parametrize(("what", "data", "offset"), BAD_WRITES, ids=[b[0] for b in BAD_WRITES])
def test_a_write_on_the_fast_path_answers_as_the_checked_path(
    backend: str, tmp_path: Path, what: str, data: Any, offset: Any
) -> None:
    """The same write through a context that knows the fd (the fast path)
    and through one meeting it first (the checked path, _prepare): the
    same count or the same exception type, and the same bytes in the file."""
    results = []
    contents = []
    for warm in (False, True):
        p = tmp_path / f"f{warm}"
        p.write_bytes(bytes(64))
        fd = os.open(p, os.O_RDWR)
        ctx = AioContext(backend=backend, inline=False)
        try:
            if warm:
                assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1  # fd now known
            # Refused at submission (nothing queued), or failed as a request.
            submitted = _outcome(lambda c=ctx, d=fd: c.write(d, offset, data))
            if submitted[0] == "ok":
                req: Any = submitted[1]
                results.append(("request", _outcome(lambda r=req: r.result(timeout=10))))
            else:
                results.append(submitted)
            assert ctx.drain(timeout=10)
            assert ctx.stats().outstanding == 0
            assert not ctx.queue._claimed
        finally:
            ctx.close(timeout=10)
            os.close(fd)
        contents.append(p.read_bytes())
    assert results[0] == results[1], what
    assert contents[0] == contents[1], what


def test_pin_buffer_gives_the_address_of_a_bytes_objects_data() -> None:
    for data in (b"a", b"threadlets" * 100, bytes(range(256))):
        pinned = pin_buffer(memoryview(data))
        assert pinned is not None
        addr, keep = pinned
        assert keep is data
        assert addr == ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        assert ctypes.string_at(addr, len(data)) == data
    assert pin_buffer(memoryview(b"abcdef")[1:]) is None  # a slice: not the whole object


@pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")
def test_ctrl_c_at_every_c_return_of_a_ring_write_leaves_nothing_behind(tmp_path: Path) -> None:
    """A write of bytes on the ring (the spelled-out submission, the pin
    taken from the object's address, the completion as the request's bound
    method): Ctrl-C at the n-th C return of ctx.write and of the wait, for
    every n.  The request completes or never starts; drain() returns,
    nothing is outstanding or left claimed, and a write that completed
    wrote its bytes."""
    p = tmp_path / "f"
    p.write_bytes(bytes(8192))
    fd = os.open(p, os.O_RDWR)
    try:
        n = 0
        while True:
            n += 1
            assert n < 2000, "never ran to its end"
            ctx = AioContext(backend="io_uring", inline=False)
            try:
                assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1
                data = bytes([n % 251 + 1]) * 4096
                req = None
                seen = interrupt_at_c_return(n)
                try:
                    req = ctx.write(fd, 4096, data)
                    ctx.wait(req, timeout=10)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                assert ctx.drain(timeout=10), f"C return {n}"
                assert ctx.stats().outstanding == 0, f"C return {n}"
                assert not ctx.queue._claimed, f"C return {n}"
                if req is not None and req.done() and not req.cancelled():
                    assert req.result() == 4096
                    assert os.pread(fd, 4096, 4096) == data, f"C return {n}"
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break  # the interrupt no longer lands: every point was tried
        assert n > 20, f"only {n} C returns: the write did not reach the ring"
    finally:
        os.close(fd)


@pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")
def test_the_ring_counts_balance_after_batches(tmp_path: Path) -> None:
    """Ring._collect's counts: submitted = reaped + in flight, and the
    ready queue empty once a batch was handed out whole (reap's clear)."""
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * 256)
    fd = os.open(p, os.O_RDONLY)
    ctx = AioContext(backend="io_uring", inline=False)
    try:
        got: list[int] = []
        for _round in range(3):
            bufs = [bytearray(512) for _ in range(40)]
            reqs = [
                ctx.read(fd, 512 * i, b, callback=lambda r: got.append(r.result()))
                for i, b in enumerate(bufs)
            ]
            for r in reqs:
                assert ctx.wait(r, timeout=10)
            for i, b in enumerate(bufs):
                assert bytes(b) == os.pread(fd, 512, 512 * i)
        ring = ctx._ring
        assert ring is not None
        assert ctx.drain(timeout=10)
        assert got == [512] * 120
        assert ring.submitted == ring.reaped + ring._inflight
        assert ring._inflight == 0
        assert not ring._ready
        assert not ctx.queue._claimed
    finally:
        ctx.close(timeout=10)
        os.close(fd)


EMPTY_AND_ODD: list[tuple[str, Any]] = [
    ("empty bytes", b""),
    ("empty bytearray", bytearray()),
    ("empty view", memoryview(b"")),
    ("empty writable view", memoryview(bytearray())),
    ("readonly view", memoryview(b"abcd")),
    ("array", array.array("b", [1, 2, 3])),
    ("not a buffer", 12),
]


def _released() -> memoryview:
    m = memoryview(bytearray(4))
    m.release()
    return m


@pytest.mark.parametrize(
    ("what", "buf"),
    [*EMPTY_AND_ODD, ("released view", _released())],
    ids=[*(e[0] for e in EMPTY_AND_ODD), "released view"],
)
def test_preadinto_and_pwrite_answer_odd_buffers_as_the_generic_checks(
    tmp_path: Path, what: str, buf: Any
) -> None:
    """preadinto's and pwrite's spelled-out tests of the common types
    answer as their generic form (_nbytes, then the engine) does: the same
    count or the same exception type."""
    from threadlets.asyncfile import _nbytes

    p = tmp_path / "f"
    p.write_bytes(b"0123456789")

    async def main() -> tuple[tuple[str, object], tuple[str, object]]:
        async with await threadlets.open(p, "r+b", buffering=0) as f:

            async def outcome(call: Any) -> tuple[str, object]:
                try:
                    return "ok", await call
                except Exception as e:
                    return "raised", type(e)

            read = await outcome(f.preadinto(buf, 2))
            write = await outcome(f.pwrite(buf, 2))
            return read, write

    read, write = asyncio.run(main())
    # The reference: what the generic checks say of the buffer.
    reference = _outcome(lambda: (_nbytes(buf, into=True), _nbytes(buf)))
    if reference[0] == "raised":
        assert read == reference, what
        assert write == reference, what
        return
    into, plain = reference[1]  # type: ignore[misc]
    if into == 0:
        assert read == ("ok", 0), what
    elif into is None:
        assert read[0] == "raised", what
    else:
        assert read == ("ok", into), what
    if plain == 0:
        assert write == ("ok", 0), what
    elif plain is None:
        assert write[0] == "raised", what
    else:
        assert write == ("ok", plain), what


@pytest.mark.parametrize("offset", [-1, 2**63, 2**64], ids=["negative", "2**63", "2**64"])
def test_an_empty_transfer_refuses_an_offset_as_a_full_one(tmp_path: Path, offset: int) -> None:
    """An offset out of range gets the same error whether the call moves
    bytes or none: a zero-byte pwrite or preadinto at 2**63 raised
    OverflowError (os.pwrite's), where one byte raised ValueError."""
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")

    async def main() -> list[tuple[str, object]]:
        async with await threadlets.open(p, "r+b", buffering=0) as f:
            out = []
            for call in (
                lambda: f.pwrite(b"", offset),
                lambda: f.pwrite(b"x", offset),
                lambda: f.preadinto(bytearray(0), offset),
                lambda: f.preadinto(bytearray(1), offset),
                lambda: f.pread(0, offset),
                lambda: f.pread(1, offset),
            ):
                try:
                    out.append(("ok", await call()))
                except Exception as e:
                    out.append(("raised", type(e)))
            return out

    answers = asyncio.run(main())
    assert answers == [("raised", ValueError)] * 6
    assert p.read_bytes() == b"0123456789"


# -- read()'s inline attempt for a read nobody is called back for ----------------------------


@pytest.mark.linux_only("rwf_nowait")
@pytest.mark.parametrize("backend", ["threads", "io_uring"])
@pytest.mark.parametrize("refusal", [None, "EOPNOTSUPP", "EAGAIN", "EIO"])
def test_the_uncalled_inline_read_answers_as_preadv(
    backend: str, refusal: str | None, tmp_path: Path
) -> None:
    """read() without a callback makes its RWF_NOWAIT attempt itself (no
    _nowait frame, no admission): the count and bytes are os.preadv's; a
    file system that refuses the flag is not asked again; would-block and
    errors go to the backend, which answers."""
    import errno

    if backend == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    p = tmp_path / "f"
    data = os.urandom(20000)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    ctx = AioContext(backend=backend)
    calls: list[int] = []
    real = ctx._preadv

    def preadv(fd_: int, views: Any, offset: int, *flags: int) -> int:
        if flags and refusal is not None:
            calls.append(offset)
            code = getattr(errno, refusal)
            raise (BlockingIOError if code == errno.EAGAIN else OSError)(code, refusal)
        return real(fd_, views, offset, *flags)

    try:
        ctx._preadv = preadv  # type: ignore[method-assign]
        for off, n in ((0, 4096), (100, 5000), (19000, 4096), (20000, 10)):
            buf = bytearray(n)
            req = ctx.read(fd, off, buf)
            assert req.result(timeout=10) == len(os.pread(fd, n, off))
            assert bytes(buf[: req.result()]) == os.pread(fd, n, off)
        f = ctx._files[fd]
        assert f.nowait_reads is (refusal != "EOPNOTSUPP")
        # Asked once when refused for good, each time otherwise.
        assert len(calls) == {None: 0, "EOPNOTSUPP": 1}.get(refusal, 4)
        assert ctx.drain(timeout=10)
        assert ctx._cq.admitted == ctx._cq.delivered
    finally:
        ctx.close(timeout=10)
        os.close(fd)


def test_an_uncalled_inline_read_costs_few_bytecodes(tmp_path: Path) -> None:
    """The cached-read hot path: 95 bytecodes at 8d57167, 140 with an
    admission taken for every attempt, 102 without it."""
    p = tmp_path / "f"
    p.write_bytes(os.urandom(1 << 16))
    fd = os.open(p, os.O_RDONLY)
    ctx = AioContext(backend="threads")
    buf = bytearray(4096)
    try:
        for i in range(8):
            assert ctx.read(fd, i * 4096, buf).result() == 4096
        f = ctx._files[fd]
        if not f.nowait_reads:
            pytest.skip("no inline reads here")
        count = [0]

        def local(frame: Any, event: str, arg: object) -> Any:
            if event == "opcode":
                count[0] += 1
            return local

        def tracer(frame: Any, event: str, arg: object) -> Any:
            frame.f_trace_opcodes = True
            return local

        sys.settrace(tracer)
        try:
            for i in range(16):
                ctx.read(fd, i * 4096, buf)
        finally:
            sys.settrace(None)
        assert count[0] / 16 <= 110, count[0] / 16
    finally:
        ctx.close(timeout=10)
        os.close(fd)
