"""The ring path's cost (issue 13): what it no longer does per request, and
the promises the cheaper steps keep.

* A ring request is claimed with one store: the ring's record of its
  callback is the claim's record, which a forked child's reset finds
  through the queue's claim holders (no weak reference, no set of the
  queue's per request).
* No receipt: a submission interrupted (Ctrl-C) asks the ring
  (Ring.ident_of) whether it was queued; cancel() asks it for the id.
* Ring.submit's one test (``_free``): room, a full SQ and a forked child
  in one count, which NOPs count in too.
* Ring._collect moves a batch of CQEs in C calls; a callback that forks
  leaves the rest of its batch to the parent (marked handed out in the
  child).
"""

from __future__ import annotations

import gc
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext, aligned_buffer
from threadlets import pool as pool_mod
from threadlets.probe import buffer_address

from .conftest import HAVE_RING, interrupt_at_c_return, wait_until

pytestmark = pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")


def _settled(ctx: AioContext, where: object) -> None:
    assert ctx.drain(timeout=10), where
    assert ctx.stats().outstanding == 0, where
    assert not ctx.queue._claimed, where


@pytest.fixture
def data_fd(tmp_path: Path) -> Any:
    p = tmp_path / "f"
    data = os.urandom(4 * 4096)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        yield fd, data
    finally:
        os.close(fd)


def _warm(ctx: AioContext, fd: int) -> None:
    assert ctx.read(fd, 0, bytearray(4096)).result(timeout=10) == 4096
    assert ctx._files[fd] in ctx._ring_plain


def _in_child(check: Any) -> int:
    """Fork; in the child exit 0 if ``check()`` is true (1 if not, 3 if it
    raised); in the parent, the child's exit code."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = 0 if check() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_ring_request_is_claimed_without_the_queues_set(
    data_fd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On both ways to the ring (_start_rw's fast path, and start() for a
    file the context does not know yet or a pipe): no _claim_unpublished,
    nothing in the queue's set of claimed threadlets while the kernel has
    the request; each completes with its count."""
    fd, data = data_fd
    ctx = AioContext(backend="io_uring", inline=False)

    def refuse(self: Any) -> None:
        raise AssertionError("a ring request claimed through the queue's set")

    r, w = os.pipe()
    try:
        monkeypatch.setattr(pool_mod.Threadlet, "_claim_unpublished", refuse)
        first = ctx.read(fd, 0, bytearray(4096))  # (start(): a file not known yet)
        assert first._on_ring
        assert not ctx.queue._claimed
        assert ctx.wait(first, timeout=10)
        assert first.result() == 4096
        assert ctx._files[fd] in ctx._ring_plain
        buf = bytearray(4096)
        fast = ctx.read(fd, 8192, buf)  # (_start_rw)
        assert fast._on_ring
        assert fast._transfer is None
        assert not ctx.queue._claimed
        piped = ctx.read(r, 0, bytearray(4))  # (start()'s _submit: stays in the kernel)
        assert piped._on_ring
        assert not ctx.queue._claimed
        os.write(w, b"abcd")
        assert ctx.wait(fast, timeout=10)
        assert fast.result() == 4096
        assert bytes(buf) == data[8192:12288]
        assert ctx.wait(piped, timeout=10)
        assert piped.result() == 4
        _settled(ctx, "end")
    finally:
        ctx.close(timeout=10)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("where", ["kernel-fast", "kernel-pipe", "reaped-not-handed"])
def test_a_fork_cancels_what_the_ring_holds_in_the_child(data_fd: Any, where: str) -> None:
    """A fork while a request is the ring's -- its completion not reaped
    (_start_rw's or a pipe's read in the kernel), or reaped and not handed
    out yet -- finds it through the ring's record: in the child it reads
    CANCELLED and a wait returns at once; the parent completes it."""
    fd, _ = data_fd
    ctx = AioContext(backend="io_uring", inline=False)
    ring = ctx._ring
    assert ring is not None
    r, w = os.pipe()
    try:
        _warm(ctx, fd)
        if where == "kernel-pipe":
            req = ctx.read(r, 0, bytearray(1))
        else:
            req = ctx.read(fd, 4096, bytearray(4096))
            assert req._transfer is None  # (the fast path's)
            wait_until(lambda: ring._cq_tail.value != ring._cq_head.value)
            if where == "reaped-not-handed":
                with ring._lock:
                    ring._collect()
                assert [item[0] for item in ring._ready] == [req._ring_rw_done]
        assert req._on_ring
        assert not ctx.queue._claimed

        def child() -> bool:
            return req.cancelled() and req.wait(0)

        assert _in_child(child) == 0
        os.write(w, b"x")
        assert ctx.wait(req, timeout=10)
        assert req.result() == (1 if where == "kernel-pipe" else 4096)
        _settled(ctx, "end")
    finally:
        ctx.close(timeout=10)
        os.close(r)
        os.close(w)


def test_a_callback_that_forks_hands_out_nothing_more_in_the_child(tmp_path: Path) -> None:
    """Three completions in one reap; the first's callback forks: in the
    child the other two -- the parent's -- are not handed out (the reap
    goes on there, past its look at the generation it no longer makes per
    completion); in the parent all three are, once each."""
    from threadlets.uring import OP_NOP, Ring

    efd = os.eventfd(0, os.EFD_CLOEXEC)
    ring = Ring(8, eventfd=efd)
    ran: list[int] = []
    child_pid = [-1]

    def first(res: int) -> None:
        ran.append(0)
        child_pid[0] = os.fork()

    try:
        assert ring.submit(OP_NOP, -1, 0, 0, 0, 0, first)
        assert ring.submit(OP_NOP, -1, 0, 0, 0, 0, lambda res: ran.append(1))
        assert ring.submit(OP_NOP, -1, 0, 0, 0, 0, lambda res: ran.append(2))
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value == 3)
        handed = ring.reap()
        if child_pid[0] == 0:
            os._exit(0 if ran == [0] else 1)
        _, status = os.waitpid(child_pid[0], 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child handed out the parent's"
        assert ran == [0, 1, 2]
        assert handed == 3
    finally:
        ring.close()
        os.close(efd)


def test_submit_counts_every_sqe_whose_cqe_is_not_taken(tmp_path: Path) -> None:
    """_free is the room less every SQE published whose CQE is not off the
    CQ -- operations and NOPs (a sleepers' wake-up) alike -- so a
    submission never finds the SQ full: with NOPs in between, random
    submissions and reaps keep the count exact, the SQ's fill at most its
    size, and a ring with no room refuses (returns 0) without writing."""
    from threadlets.uring import OP_NOP, OP_READ, Ring

    efd = os.eventfd(0, os.EFD_CLOEXEC)
    ring = Ring(8, eventfd=efd)
    r, w = os.pipe()
    rng = random.Random(13)
    bufs = [bytearray(1) for _ in range(64)]
    done: list[int] = []
    try:
        for step in range(400):
            op = rng.random()
            with ring._lock:
                fill = (ring._tail - ring._sq_head.value) & 0xFFFFFFFF
                assert fill <= ring.entries, step
                assert ring._free == ring._cap - ring._tail + ring._cq_head.value, step
                assert ring._inflight <= ring.entries, step
            if op < 0.3:
                with ring._lock:  # (a sleepers' NOP, as _nop_for_sleepers adds it)
                    if (ring._tail - ring._sq_head.value) & 0xFFFFFFFF < ring.entries:
                        ring._push(OP_NOP, -1, 0, 0, 0, 0, 1 << 63)
                if rng.random() < 0.5:
                    ring.flush()
            elif op < 0.7:
                free = ring._free
                buf = bufs[step % len(bufs)]  # (alive to the end: the kernel's)
                if rng.random() < 0.5:
                    ident = ring.submit(OP_NOP, -1, 0, 0, 0, 0, done.append)
                else:
                    addr = buffer_address(memoryview(buf))
                    assert addr is not None
                    ident = ring.submit(OP_READ, r, 2**64 - 1, addr, 1, 0, done.append)
                assert bool(ident) == (free > 0), step
            else:
                ring.reap()
        with ring._lock:
            assert ring._free == ring._cap - ring._tail + ring._cq_head.value
    finally:
        os.close(w)  # (the pipe reads end: EOF)
        ring.flush()  # (the NOPs pushed last)
        wait_until(lambda: ring.reap() == 0 and not ring._pending and ring._free == ring._cap)
        with ring._lock:
            assert ring._free == ring._cap
        ring.close()
        os.close(r)
        os.close(efd)


def test_ctrl_c_at_every_c_return_of_a_collect_with_nops(tmp_path: Path) -> None:
    """A batch of completions with NOPs (no callback) among them, collected
    and handed out by reap(), Ctrl-C at each C return of it: every callback
    exactly once, the counts (reaped, in the kernel, room) exact."""
    from threadlets.uring import OP_NOP, Ring

    n = 0
    while True:
        n += 1
        assert n < 500, "never ran to its end"
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        ring = Ring(8, eventfd=efd)
        ran: list[int] = []
        try:
            for i in range(4):
                assert ring.submit(OP_NOP, -1, 0, 0, 0, 0, lambda res, i=i, ran=ran: ran.append(i))
                with ring._lock:
                    ring._push(OP_NOP, -1, 0, 0, 0, 0, 1 << 63)  # (a sleepers' NOP)
            ring.flush()
            wait_until(lambda ring=ring: ring._cq_tail.value - ring._cq_head.value == 8)
            seen = interrupt_at_c_return(n, only=sys.modules[Ring.__module__].__file__)
            try:
                ring.reap()
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            while ring.reap():
                pass
            assert ran == [0, 1, 2, 3], (n, ran)
            assert ring.reaped == 4, n
            assert ring._in_kernel == 0, n
            assert not ring._pending, n
            assert ring._free == ring._cap, n
        finally:
            ring.close()
            os.close(efd)
        if seen[0] < n:
            break
    assert n > 3, f"only {n} C returns"


@pytest.mark.parametrize("kind", ["first-read", "pipe"])
def test_ctrl_c_at_every_c_return_of_a_submission_through_start(tmp_path: Path, kind: str) -> None:
    """Ctrl-C at each C return of a read that start() sends (a file the
    context does not know yet: its spelled-out _submit; a pipe: _submit),
    Ring.submit included: the request completes with its count or EINTR,
    or never starts; nothing outstanding or claimed."""
    p = tmp_path / "f"
    data = os.urandom(8192)
    p.write_bytes(data)
    n = 0
    while True:
        n += 1
        assert n < 500, "never ran to its end"
        ctx = AioContext(backend="io_uring", inline=False)
        fd = os.open(p, os.O_RDONLY)
        r, w = os.pipe()
        os.write(w, b"abcd")
        buf = aligned_buffer(4096)
        req = None
        try:
            seen = interrupt_at_c_return(n)
            try:
                req = ctx.read(fd, 4096, buf) if kind == "first-read" else ctx.read(r, 0, buf)
                ctx.wait(req, timeout=10)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            _settled(ctx, f"C return {n}")
            if req is not None:
                assert req.done(), n
                exc = req.exception()
                if exc is None:
                    want = 4096 if kind == "first-read" else 4
                    assert req.result() == want, n
                    expect = data[4096:] if kind == "first-read" else b"abcd"
                    assert bytes(buf[:want]) == expect, n
                else:
                    assert isinstance(exc, InterruptedError), (n, exc)
        finally:
            ctx.close(timeout=10)
            os.close(fd)
            os.close(r)
            os.close(w)
        if seen[0] < n:
            break
    assert n > 10, f"only {n} C returns: the request did not reach the ring"


def test_cancel_asks_the_ring_for_the_id_of_a_fast_path_request(data_fd: Any) -> None:
    """_start_rw keeps no id on its request: cancel() gets the one the
    ring gave from the ring (Ring.ident_of), and answers one of three."""
    fd, _ = data_fd
    ctx = AioContext(backend="io_uring", inline=False)
    ring = ctx._ring
    assert ring is not None
    given: list[int] = []
    asked: list[int] = []
    submit, cancel = ring.submit, ring.cancel

    def recording_submit(*args: Any) -> int:
        ident = submit(*args)
        given.append(ident)
        return ident

    def recording_cancel(ident: int, on_done: Any) -> bool:
        asked.append(ident)
        return cancel(ident, on_done)

    try:
        _warm(ctx, fd)
        ring.submit = recording_submit  # type: ignore[method-assign]
        ring.cancel = recording_cancel  # type: ignore[method-assign]
        req = ctx.read(fd, 4096, bytearray(4096))
        assert req._transfer is None
        assert not hasattr(req, "_ring_ident")
        wait_until(lambda: ring._cq_tail.value != ring._cq_head.value)  # (done, not reaped)
        assert req._on_ring
        answer = req.cancel()
        assert asked == given[:1], (asked, given)
        assert ctx.wait(req, timeout=10)
        assert req.cancelled() or req.result() == 4096, answer
        _settled(ctx, "end")
    finally:
        del ring.submit, ring.cancel
        ctx.close(timeout=10)
