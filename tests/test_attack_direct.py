"""Attacks on the direct delivery of io_uring completions (commit a7ec1ae):
the owner's reap delivering at once (``_CompletionQueue.direct``), the
ring's test-and-set hand-out, Ring._collect's wrapping runs and
_RingBackend.start's fast path.  A test whose docstring names a7ec1ae
failed there; the fixes landed with it.  The rest passed there and stay
as coverage of what was tried."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext, AioRequest
from threadlets.pool import Threadlet

from .conftest import HAVE_RING, interrupt_at_c_return, wait_until


def _ring_context(**kwargs: Any) -> AioContext:
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    return AioContext(backend="io_uring", **kwargs)


def test_a_workers_done_callback_leaves_no_direct_delivery_behind(path: Path) -> None:
    """A worker finishes a request that has a done-callback while the owner
    reaps the ring (cq.direct is the owner's): on a7ec1ae the worker's _finished saved
    the owner's ident and stored it back after the owner had left
    process_completions, so from then on a request finished inline ran its
    callback inside ctx.read() itself, in the submitting call (and any
    completion this thread reaped in a wait or a cancel ran its callback
    there).  Fixed: only the thread that holds ``direct`` clears and
    restores it around done-callbacks."""
    ctx = _ring_context()
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    go, in_dc, release = threading.Event(), threading.Event(), threading.Event()
    code = AioRequest._ring_done.__code__

    def trace(frame: Any, event: str, arg: object) -> None:
        # In the owner, reaping with cq.direct set: let the worker finish now.
        if event == "call" and frame.f_code is code:
            sys.settrace(None)
            go.set()
            assert in_dc.wait(10)

    try:
        on_ring = ctx.read(r, 0, bytearray(16), callback=lambda r: None)
        assert on_ring._on_ring
        os.write(w, b"x")
        worked = ctx.call(lambda: go.wait(10))
        worked.add_done_callback(lambda _: (in_dc.set(), release.wait(10)))
        sys.settrace(trace)
        try:
            assert ctx.wait(on_ring, timeout=10)
        finally:
            sys.settrace(None)
        assert go.is_set()
        release.set()
        assert ctx.wait(worked, timeout=10)
        # Cached now: a read finishes inline; its callback must wait for
        # process_completions.
        inside: list[bool] = []
        reading = [True]
        req = ctx.read(fd, 0, bytearray(16), callback=lambda r: inside.append(reading[0]))
        reading[0] = False
        assert ctx.wait(req, timeout=10)
        assert inside == [False], "the callback ran inside ctx.read()"
        assert ctx.drain(timeout=10)
        assert ctx.stats().outstanding == 0
    finally:
        release.set()
        go.set()
        ctx.close(timeout=10)
        os.close(fd)
        os.close(r)
        os.close(w)


# -- Ctrl-C at every C return of a direct delivery ----------------------------------------


def _finished_unseen(ctx: AioContext, reqs: list[AioRequest]) -> None:
    """Wait until every request in ``reqs`` finished and nobody delivered
    it yet: on the ring's CQ (io_uring: process_completions' reap delivers
    them directly), or on the ready queue (threads)."""
    ring = ctx._ring
    if ring is not None:
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= len(reqs))
    else:
        for r in reqs:
            assert r.wait(timeout=10)
        wait_until(lambda: len(ctx._cq.ready) == len(reqs))


BEHAVIOURS = [
    "submit",
    "nest",
    "ctx_wait",
    "req_wait",
    "cancel",
    "close",
    "done_nest",
    "raise",
    "cancelled_error",
]


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_ctrl_c_at_every_c_return_of_a_direct_delivery(
    backend: str, path: Path, behaviour: str
) -> None:
    """Three finished reads (on the ring's CQ: delivered directly by the
    reap) and one blocked pipe read; the first callback submits, nests,
    waits (ctx.wait, req.wait), cancels the pipe read, closes the context,
    or raises SystemExit or CancelledError; done-callbacks process
    completions.  Ctrl-C at the n-th C return, for every n: each callback
    runs exactly once, drain() returns, the counters balance.  (Passed on
    a7ec1ae: kept as coverage.)"""
    if behaviour == "done_nest" and backend == "threads":
        pytest.skip("done-callbacks run in the worker there")
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        while True:
            n += 1
            assert n < 3000, "never ran to its end"
            ctx = AioContext(backend=backend, inline=False)
            r, w = os.pipe()
            ran: list[AioRequest] = []
            extra: list[AioRequest] = []
            reqs: list[AioRequest] = []

            def cb(
                req: AioRequest,
                ctx: AioContext = ctx,
                ran: list[AioRequest] = ran,
                extra: list[AioRequest] = extra,
                reqs: list[AioRequest] = reqs,
                w: int = w,
            ) -> None:
                ran.append(req)
                if len(ran) != 1:
                    return
                if behaviour == "submit":
                    extra.append(ctx.read(fd, 0, bytearray(8), callback=ran.append))
                    extra.append(ctx.read(fd, 8, bytearray(8), callback=ran.append))
                elif behaviour == "nest":
                    ctx.process_completions()
                elif behaviour == "ctx_wait":
                    ctx.wait(reqs[2], timeout=10)
                elif behaviour == "req_wait":
                    reqs[2].wait(timeout=10)
                elif behaviour == "cancel":
                    reqs[3].cancel()
                elif behaviour == "close":
                    if not reqs[3].done():
                        os.write(w, b"abcd")
                    ctx.close(timeout=10)
                elif behaviour == "raise":
                    raise SystemExit(3)
                elif behaviour == "cancelled_error":
                    raise asyncio.CancelledError

            pipe_read = ctx.read(r, 0, bytearray(4), callback=cb)
            reqs.extend(ctx.read(fd, 16 * i, bytearray(16), callback=cb) for i in range(3))
            reqs.append(pipe_read)
            if behaviour == "done_nest":
                for q in reqs[:3]:
                    q.add_done_callback(lambda _, ctx=ctx: ctx.process_completions())
            _finished_unseen(ctx, reqs[:3])
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                ctx.process_completions()
            except KeyboardInterrupt:
                interrupted = True
            except (SystemExit, asyncio.CancelledError):
                pass
            finally:
                sys.setprofile(None)
            if not pipe_read.done():
                os.write(w, b"abcd")
            while True:
                try:
                    assert ctx.drain(timeout=5), f"C return {n}: {ctx.stats()}"
                    break
                except (SystemExit, asyncio.CancelledError):  # the first callback's
                    continue
            ids = [id(q) for q in ran]
            assert len(ids) == len(set(ids)), f"C return {n}: delivered twice"
            assert {id(q) for q in reqs + extra} <= set(ids), f"C return {n}: {ran}"
            assert len(ids) <= len(reqs) + len(extra) + 2, f"C return {n}"
            s = ctx.stats()
            assert s.outstanding == 0, f"C return {n}: {s}"
            assert s.processed == s.submitted, f"C return {n}: {s}"
            assert not ctx._cq.direct, f"C return {n}"
            assert ctx.close(timeout=10)
            os.close(r)
            os.close(w)
            if not interrupted and seen[0] < n:
                break
    finally:
        sys.setprofile(None)
        os.close(fd)


def test_a_nested_call_is_not_counted_twice(backend: str, path: Path) -> None:
    """process_completions() returns how many requests it processed: a
    callback's own process_completions() delivers the rest of the batch,
    and the outer call does not count those again.  (On a7ec1ae the outer
    call counted every direct delivery made while it reaped, nested ones
    included: a loop summing poll()'s answers stopped early.)"""
    fd = os.open(path, os.O_RDONLY)
    ctx = AioContext(backend=backend, inline=False)
    counts: list[int] = []
    ran: list[AioRequest] = []
    try:

        def cb(req: AioRequest) -> None:
            ran.append(req)
            if len(ran) == 1:
                counts.append(ctx.process_completions())

        reqs = [ctx.read(fd, 16 * i, bytearray(16), callback=cb) for i in range(3)]
        _finished_unseen(ctx, reqs)
        counts.append(ctx.process_completions())
        assert len(ran) == 3
        assert counts == [2, 1]
    finally:
        ctx.close(timeout=10)
        os.close(fd)


def test_two_threads_polling_one_context_while_callbacks_resubmit(
    backend: str, path: Path, switchy: None
) -> None:
    """Two threads poll() one context while the callbacks (run by either)
    keep about 200 reads in flight, 3000 in all (the ring's 512-entry CQ
    wraps many times): each callback runs once, with the file's bytes;
    the polls' answers add up to the requests; the counters balance.  (On
    a7ec1ae the answers added up to more: each call counted the direct
    deliveries made while it reaped, another thread's included.)"""
    total, depth = 3000, 200
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    ctx = AioContext(backend=backend, inline=False)
    lock = threading.Lock()
    ran: list[AioRequest] = []
    bad: list[int] = []
    submitted = [0]
    done = threading.Event()

    def submit() -> None:
        with lock:
            if submitted[0] == total:
                return
            i = submitted[0]
            submitted[0] += 1
        off = (i * 97) % (len(data) - 64)
        buf = bytearray(64)
        ctx.read(fd, off, buf, callback=lambda r: on_done(r, i, off, buf))

    def on_done(req: AioRequest, i: int, off: int, buf: bytearray) -> None:
        if req.result() != 64 or buf != data[off : off + 64]:
            bad.append(i)
        with lock:
            ran.append(req)
            if len(ran) == total:
                done.set()
        submit()

    counts: list[int] = []

    def poller() -> None:
        n = 0
        while not done.is_set():
            n += ctx.poll(timeout=0.05)
        counts.append(n)

    t = threading.Thread(target=poller)
    try:
        t.start()
        for _ in range(depth):
            submit()
        poller()
        t.join(20)
        assert not t.is_alive()
        assert ctx.drain(timeout=10)
        assert not bad
        assert len({id(r) for r in ran}) == len(ran) == total
        assert sum(counts) == total, counts
        s = ctx.stats()
        assert s.outstanding == 0
        assert s.processed == s.submitted == total
        assert not ctx._cq.direct
        if ctx._ring is not None:
            assert ctx._ring._inflight == 0
            assert ctx._ring._in_kernel == 0
    finally:
        done.set()
        t.join(10)
        ctx.close(timeout=10)
        os.close(fd)


def _sleeps_in_poll(native_id: int) -> bool:
    with open(f"/proc/self/task/{native_id}/syscall") as f:
        return f.read().split(" ", 1)[0] in ("7", "271")  # poll, ppoll (x86-64)


def test_drain_from_another_thread_while_the_owner_polls(backend: str, path: Path) -> None:
    """The owner sleeps in poll(); another thread drains the context (as
    close() from another thread does).  On a7ec1ae both slept on one
    select.poll object, which refuses a second concurrent poll():
    drain() raised RuntimeError("concurrent poll() invocation").  Fixed:
    a second sleeper polls an object of its own."""
    if os.uname().machine != "x86_64":
        pytest.skip("syscall numbers are x86-64's")
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    ctx = AioContext(backend=backend, inline=False)
    got: list[int] = []
    ids: list[int] = []

    def owner() -> None:
        # One poll: it returns once it delivered the pipe read or, if the
        # drainer did, the read submitted after the drain.
        ids.append(threading.get_native_id())
        got.append(ctx.poll(timeout=10))

    t = threading.Thread(target=owner)
    try:
        ran: list[AioRequest] = []
        req = ctx.read(r, 0, bytearray(4), callback=ran.append)
        t.start()
        wait_until(lambda: bool(ids) and _sleeps_in_poll(ids[0]))
        drained: list[bool | BaseException] = []

        def drainer() -> None:
            try:
                drained.append(ctx.drain(timeout=10))
            except BaseException as e:
                drained.append(e)

        d = threading.Thread(target=drainer)
        d.start()
        wait_until(
            lambda: bool(drained) or (d.native_id is not None and _sleeps_in_poll(d.native_id))
        )
        os.write(w, b"abcd")
        d.join(15)
        assert drained == [True]
        assert ran == [req]
        ctx.read(fd, 0, bytearray(4))  # (for the owner, if the drainer delivered the first)
        t.join(15)
        assert got == [1]
        assert ctx.drain(timeout=10)
        assert ctx.stats().outstanding == 0
    finally:
        os.write(w, b"abcd")
        ctx.close(timeout=10)
        t.join(10)
        os.close(fd)
        os.close(r)
        os.close(w)


# -- the CQ ring wrapping -----------------------------------------------------------------


def _advance_cq_head(ctx: AioContext, fd: int, to: int) -> None:
    """Run reads through the ring until its CQ head sits at ``to`` (mod the
    CQ's size)."""
    ring = ctx._ring
    assert ring is not None
    size = ring._cq_mask + 1
    while True:
        k = (to - ring._cq_head.value) % size
        if not k:
            return
        reqs = [ctx.read(fd, 0, bytearray(8)) for _ in range(min(k, 200))]
        assert all(q._on_ring for q in reqs)
        count = len(reqs)
        wait_until(lambda n=count: ring._cq_tail.value - ring._cq_head.value >= n)
        ctx.process_completions()


def test_ctrl_c_at_every_c_return_of_a_collect_that_wraps(path: Path) -> None:
    """Five completions posted across the CQ array's end (two runs of
    iter_unpack); Ctrl-C at each C return of the process_completions that
    collects and delivers them: each delivered once with the file's bytes,
    the ring's counts (in flight, in the kernel) back to zero.  (On a7ec1ae
    it hung: a Ctrl-C inside Ring._plug left the ring plugged, see below.)"""
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    ctx = _ring_context(inline=False)
    ring = ctx._ring
    assert ring is not None
    try:
        n = 0
        while True:
            n += 1
            assert n < 500, "never ran to its end"
            _advance_cq_head(ctx, fd, ring._cq_mask - 1)
            ran: list[AioRequest] = []
            bufs = [bytearray(32) for _ in range(5)]
            reqs = [ctx.read(fd, 100 * i, b, callback=ran.append) for i, b in enumerate(bufs)]
            wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= 5)
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                ctx.process_completions()
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
            assert ctx.drain(timeout=5), f"C return {n}: {ctx.stats()}"
            assert sorted(map(id, ran)) == sorted(map(id, reqs)), f"C return {n}"
            for i, b in enumerate(bufs):
                assert b == data[100 * i : 100 * i + 32], f"C return {n}"
            assert ring._inflight == 0, f"C return {n}"
            assert ring._in_kernel == 0, f"C return {n}"
            # (Handed out, left for the next reap to drop: Ctrl-C at its lock.)
            assert all(item[2] is True for item in ring._ready), f"C return {n}"
            s = ctx.stats()
            assert s.outstanding == 0
            assert s.processed == s.submitted
            if not interrupted and seen[0] < n:
                break
    finally:
        sys.setprofile(None)
        ctx.close(timeout=10)
        os.close(fd)


@pytest.mark.parametrize("direct", [False, True])
def test_full_depth_rounds_across_the_cq_end_read_what_preadv_reads(
    tmp_path: Path, direct: bool
) -> None:
    """Rounds of 255 reads, each round collected at once (one CQ read of
    255 entries, straddling the array's end on most rounds), 4000 reads in
    all, of a plain file and of an O_DIRECT one (the fast path): every
    buffer equals os.preadv's, the counts balance."""
    if direct and not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT")
    p = tmp_path / "data"
    data = os.urandom(1 << 20)
    p.write_bytes(data)
    try:
        fd = os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        pytest.skip("O_DIRECT refused here")
    ctx = _ring_context(inline=False)
    ring = ctx._ring
    assert ring is not None
    from threadlets import aligned_buffer

    size = 4096
    try:
        done = 0
        rnd = 0
        while done < 4000:
            rnd += 1
            bufs = [aligned_buffer(size) for _ in range(255)]
            offs = [((rnd * 7919 + i * 104729) % ((1 << 20) // size)) * size for i in range(255)]
            reqs = [ctx.read(fd, o, b) for o, b in zip(offs, bufs, strict=True)]
            on_ring = sum(q._on_ring for q in reqs)
            wait_until(lambda k=on_ring: ring._cq_tail.value - ring._cq_head.value >= k)
            assert ctx.drain(timeout=10)
            for q, o, b in zip(reqs, offs, bufs, strict=True):
                assert q.result() == size
                want = bytearray(size)
                assert os.preadv(fd, [want], o) == size if not direct else True
                assert bytes(b) == data[o : o + size]
            done += len(reqs)
        assert ring._inflight == 0
        assert ring._in_kernel == 0
        s = ctx.stats()
        assert s.outstanding == 0
        assert s.processed == s.submitted
        assert s.ring >= 3000
    finally:
        ctx.close(timeout=10)
        os.close(fd)


def test_ctrl_c_as_process_completions_plugs_the_ring_leaves_it_unplugged(path: Path) -> None:
    """Ctrl-C as Ring.plug's lock is let go (a C return inside
    process_completions, before its try): on a7ec1ae the ring stayed
    plugged by this thread for good, so a later submission of this thread
    sat in the SQ and never reached the kernel -- an event loop waiting on
    fileno() for it slept for ever.  Fixed: _plug takes the plug back if it
    is interrupted after taking it."""
    import select

    from threadlets.uring import Ring

    fd = os.open(path, os.O_RDONLY)
    ctx = _ring_context(inline=False)
    try:
        plug = Ring._plug.__code__
        for hit in range(1, 4):  # each C return inside _plug
            left = [hit]

            def prof(frame: Any, event: str, arg: object, left: list[int] = left) -> None:
                if event == "c_return" and frame.f_code is plug:
                    left[0] -= 1
                    if not left[0]:
                        sys.setprofile(None)
                        raise KeyboardInterrupt

            sys.setprofile(prof)
            try:
                ctx.process_completions()
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            req = ctx.read(fd, 0, bytearray(8))
            assert req._on_ring
            readable, _, _ = select.select([ctx.fileno()], [], [], 10)
            assert readable, f"C return {hit} in _plug: the read never reached the kernel"
            assert ctx.drain(timeout=10)
    finally:
        sys.setprofile(None)
        ctx.close(timeout=10)
        os.close(fd)


def test_a_drain_going_to_sleep_as_another_thread_delivers_the_last_wakes(
    backend: str,
) -> None:
    """A second thread's drain() has seen a request outstanding and is on
    its way to sleep on the eventfd when the owner delivers that request
    (clearing the eventfd).  On a7ec1ae the drain then slept for good
    (its timeout; None: until some later completion) though nothing was
    outstanding -- and with both asleep, the owner's clear could swallow
    the wakeup the same way.  Fixed: the notifier counts its sleepers, a
    sleeper checks its condition once counted, and a thread that delivers
    wakes the sleepers."""
    from threadlets.engine import _Notifier

    r, w = os.pipe()
    ctx = AioContext(backend=backend, inline=False)
    at_wait, go = threading.Event(), threading.Event()
    code = _Notifier.wait.__code__
    drained: list[bool] = []

    def trace(frame: Any, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is code:
            sys.settrace(None)
            at_wait.set()
            assert go.wait(10)

    def drainer() -> None:
        sys.settrace(trace)
        drained.append(ctx.drain())

    d = threading.Thread(target=drainer)
    try:
        req = ctx.read(r, 0, bytearray(4))
        d.start()
        assert at_wait.wait(10)
        os.write(w, b"abcd")
        assert ctx.wait(req, timeout=10)  # the owner delivers it
        go.set()
        d.join(10)
        assert drained == [True], "drain() slept with nothing outstanding"
    finally:
        go.set()
        if d.is_alive():
            os.write(w, b"abcd")
            ctx.read(r, 0, bytearray(4))  # (wakes it)
            d.join(10)
        ctx.close(timeout=10)
        os.close(r)
        os.close(w)


# -- what start()'s fast path and _start_other move ----------------------------------------


def _engine(ctx: AioContext, req: AioRequest) -> int:
    assert ctx.wait(req, timeout=10)
    return req.result()


@pytest.mark.parametrize("flags", ["plain", "direct", "append"])
def test_regular_file_reads_and_writes_equal_preadv_pwritev(
    backend: str, tmp_path: Path, flags: str
) -> None:
    """Reads (aligned or not, across EOF, vectored) equal os.preadv's; writes
    leave what os.pwritev (or, O_APPEND, os.write) leaves."""
    p, q = tmp_path / "a", tmp_path / "b"
    data = os.urandom(3 * 4096 + 100)
    p.write_bytes(data)
    q.write_bytes(data)
    extra = {"plain": 0, "direct": getattr(os, "O_DIRECT", 0), "append": os.O_APPEND}[flags]
    if flags == "direct" and not extra:
        pytest.skip("no O_DIRECT")
    try:
        fd = os.open(p, os.O_RDWR | extra)
    except OSError:
        pytest.skip("O_DIRECT refused here")
    ref = os.open(q, os.O_RDWR | (os.O_APPEND if flags == "append" else 0))
    ctx = AioContext(backend=backend, inline=False)
    from threadlets import aligned_buffer

    try:
        shapes = [(0, [4096]), (4096, [8192]), (100, [33]), (3 * 4096, [4096]), (8, [7, 4096, 9])]
        for off, sizes in shapes:
            got = [aligned_buffer(n) for n in sizes]
            want = [bytearray(n) for n in sizes]
            n_got = _engine(ctx, ctx.read(fd, off, got if len(got) > 1 else got[0]))
            n_want = os.preadv(ref, want, off)
            assert n_got == n_want, (off, sizes)
            assert b"".join(bytes(b) for b in got)[:n_got] == b"".join(want)[:n_want]
        for off, size in [(0, 4096), (4096, 100), (3 * 4096 + 100, 4096), (50, 8192)]:
            payload = os.urandom(size)
            buf = aligned_buffer(size)
            buf[:] = payload
            n_got = _engine(ctx, ctx.write(fd, off, buf))
            n_want = (
                os.write(ref, payload) if flags == "append" else os.pwritev(ref, [payload], off)
            )
            assert n_got == n_want
        assert ctx.drain(timeout=10)
        assert p.read_bytes() == q.read_bytes()
    finally:
        ctx.close(timeout=10)
        os.close(fd)
        os.close(ref)


@pytest.mark.parametrize("kind", ["pipe", "fifo"])
def test_stream_reads_equal_readv(backend: str, tmp_path: Path, kind: str) -> None:
    """A pipe's or FIFO's read is one transfer, as os.readv: with more data
    waiting than asked, less, or none yet (the read waits, then takes what
    the one write gave)."""
    if kind == "pipe":
        r, w = os.pipe()
    else:
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        w = os.open(fifo, os.O_WRONLY)
        os.set_blocking(r, True)
    ctx = AioContext(backend=backend)
    try:
        for sizes, chunk in [([10], b"x" * 25), ([100], b"abc"), ([3, 4], b"0123456789")]:
            os.write(w, chunk)
            want = [bytearray(n) for n in sizes]
            n_want = os.readv(r, want)
            os.read(r, 1 << 16) if n_want < len(chunk) else None  # (the rest)
            os.write(w, chunk)
            got = [bytearray(n) for n in sizes]
            n_got = _engine(ctx, ctx.read(r, 0, got if len(got) > 1 else got[0]))
            assert (n_got, got) == (n_want, want)
            os.read(r, 1 << 16) if n_got < len(chunk) else None
        got1 = bytearray(64)
        req = ctx.read(r, 0, got1)  # nothing there yet: it waits
        os.write(w, b"late")
        assert _engine(ctx, req) == 4
        assert got1[:4] == b"late"
    finally:
        ctx.close(timeout=10)
        os.close(r)
        os.close(w)


def test_fork_inside_a_directly_delivered_callback(path: Path) -> None:
    """The first callback of a reap forks: the child returns through the
    rest of the parent's reap (its requests read CANCELLED there: no
    callback runs), then drains, closes and uses a fresh context; the
    parent delivers everything once, counters balanced."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    import subprocess

    code = f"""
import os, threadlets
from threadlets import ThreadletState
ctx = threadlets.AioContext(backend="io_uring", inline=False)
fd = os.open({str(path)!r}, os.O_RDONLY)
r, w = os.pipe()
ran, pid = [], []
def cb(req):
    ran.append(req)
    if len(ran) == 1:
        pid.append(os.fork())
reqs = [ctx.read(fd, 16 * i, bytearray(16), callback=cb) for i in range(4)]
blocked = ctx.read(r, 0, bytearray(2), callback=cb)
ring = ctx._ring
while ring._cq_tail.value - ring._cq_head.value < 4:
    pass
ctx.process_completions()
if pid[0] == 0:
    ok = len(ran) == 1
    ok = ok and all(q.done() for q in reqs[1:] + [blocked])
    ok = ok and ctx.drain(timeout=5) and ctx.stats().outstanding == 0
    ok = ok and ctx.close(timeout=5)
    with threadlets.AioContext(backend="io_uring", inline=False) as fresh:
        buf = bytearray(16)
        q = fresh.read(fd, 0, buf)
        ok = ok and fresh.wait(q, 5) and q.result() == 16 and buf == os.pread(fd, 16, 0)
    os._exit(0 if ok else 1)
os.write(w, b"xy")
assert ctx.drain(timeout=10)
assert sorted(map(id, ran)) == sorted(map(id, reqs + [blocked])), ran
s = ctx.stats()
assert s.outstanding == 0 and s.processed == s.submitted, s
_, status = os.waitpid(pid[0], 0)
assert status == 0, status
assert ctx.close(timeout=10)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    p = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, timeout=60, capture_output=True
    )
    assert p.returncode == 0, p.stderr.decode()


def test_cancel_from_another_thread_while_the_owner_delivers(switchy: None) -> None:
    """A pipe read on the ring; a writer fills the pipe while another
    thread cancels the read and the owner sits in ctx.wait() (reaping and
    delivering directly): the cancel's answer matches the end state, the
    callback runs once, in the owner."""
    from threadlets import CancelResult, ThreadletState

    ctx = _ring_context(inline=False)
    owner = threading.get_ident()
    try:
        for _ in range(100):
            r, w = os.pipe()
            try:
                ran: list[int] = []
                req = ctx.read(
                    r,
                    0,
                    bytearray(4),
                    callback=lambda _, ran=ran: ran.append(threading.get_ident()),
                )
                go = threading.Barrier(3)
                answers: list[CancelResult] = []
                ts = [
                    threading.Thread(target=lambda go=go, w=w: (go.wait(), os.write(w, b"abcd"))),
                    threading.Thread(
                        target=lambda go=go, req=req, answers=answers: (
                            go.wait(),
                            answers.append(req.cancel()),
                        )
                    ),
                ]
                for t in ts:
                    t.start()
                go.wait()
                assert ctx.wait(req, timeout=10)
                for t in ts:
                    t.join(10)
                if answers == [CancelResult.CANCELED]:
                    assert req.state is ThreadletState.CANCELLED
                else:
                    assert req.state is ThreadletState.DONE, answers
                    assert req.result() == 4
                assert ran == [owner]
            finally:
                os.close(r)
                os.close(w)
        assert ctx.drain(timeout=10)
        s = ctx.stats()
        assert s.outstanding == 0
        assert s.processed == s.submitted
        assert not ctx._cq.direct
    finally:
        ctx.close(timeout=10)


def test_ctrl_c_at_each_c_return_of_finished_still_runs_done_callbacks(
    backend: str, path: Path
) -> None:
    """Ctrl-C at each C return inside AioRequest._finished (the one that
    finishes a request with a done-callback and a waiter): the
    done-callback still runs and the waiter is woken, the request is
    delivered once.  (Guards this session's fix of _finished, whose first
    version looked up the thread before running them.)"""
    from threadlets.engine import AioRequest as Req

    code = Req._finished.__code__
    fd = os.open(path, os.O_RDONLY)
    try:
        for hit in range(1, 4):
            ctx = AioContext(backend=backend, inline=False)
            r, w = os.pipe()
            try:
                ran: list[AioRequest] = []
                req = ctx.read(r, 0, bytearray(2), callback=ran.append)
                dc: list[object] = []
                req.add_done_callback(dc.append)
                woke: list[bool] = []
                # (The pool's wait: it sleeps on a waiter lock, never reaps.)
                waiter = threading.Thread(
                    target=lambda req=req, woke=woke: woke.append(Threadlet.wait(req, 10))
                )
                waiter.start()
                wait_until(lambda req=req: bool(req._waiters))
                left = [hit]

                def prof(frame: Any, event: str, arg: object, left: list[int] = left) -> None:
                    if event == "c_return" and frame.f_code is code:
                        left[0] -= 1
                        if not left[0]:
                            sys.setprofile(None)
                            raise KeyboardInterrupt

                os.write(w, b"ab")
                # (The ring's completion is finished in this thread's reap;
                # the threads' by a worker, where the profile does not run.)
                sys.setprofile(prof)
                try:
                    ctx.drain(timeout=10)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                assert ctx.drain(timeout=10)
                waiter.join(10)
                assert woke == [True], f"C return {hit}"
                assert dc == [req], f"C return {hit}"
                assert ran == [req], f"C return {hit}"
            finally:
                ctx.close(timeout=10)
                os.close(r)
                os.close(w)
    finally:
        os.close(fd)


@pytest.mark.parametrize("method", ["unplug", "flush"])
def test_ctrl_c_as_the_plug_is_released_still_submits(path: Path, method: str) -> None:
    """A callback submits a read (held back by process_completions' plug);
    Ctrl-C as Ring.unplug (or a flush) lets the ring's lock go, before its
    io_uring_enter: the read must still reach the kernel (an event loop
    waits on fileno() for it).  On a7ec1ae it sat in the SQ until some
    later submission or wait flushed."""
    import select

    from threadlets.uring import Ring

    fd = os.open(path, os.O_RDONLY)
    ctx = _ring_context(inline=False)
    ring = ctx._ring
    assert ring is not None
    code = getattr(Ring, method).__code__
    try:
        later: list[AioRequest] = []

        def cb(_: AioRequest) -> None:
            later.append(ctx.read(fd, 0, bytearray(8)))

        first = ctx.read(fd, 0, bytearray(8), callback=cb)
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= 1)
        fired = [False]

        def prof(frame: Any, event: str, arg: object) -> None:
            if event == "c_return" and frame.f_code is code:
                sys.setprofile(None)
                fired[0] = True
                raise KeyboardInterrupt

        if method == "flush":
            ring.hold(lambda: None)  # (process_completions then flushes: plug() fails)
        sys.setprofile(prof)
        try:
            ctx.process_completions()
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        assert fired[0]
        assert first._processed
        assert later
        assert later[0]._on_ring
        readable, _, _ = select.select([ctx.fileno()], [], [], 10)
        assert readable, "the callback's read never reached the kernel"
        assert ctx.drain(timeout=10)
    finally:
        sys.setprofile(None)
        ctx.close(timeout=10)
        os.close(fd)


def test_ctrl_c_in_the_reaps_cleanup_leaves_no_batch_or_plug_behind(path: Path) -> None:
    """Ctrl-C at each C return of Ring.reap (a reap outside
    process_completions: a req.wait() in the owner, which takes the plug
    itself): afterwards this thread is not "in a batch" (call_after_batch
    answers False, so the caller runs its function) and the ring is not
    plugged (a submission reaches the kernel).  On a7ec1ae a Ctrl-C as the
    cleanup's lock was let go left both behind for good: after-batch
    functions were dropped and submissions held."""
    import select

    from threadlets.uring import Ring, call_after_batch

    fd = os.open(path, os.O_RDONLY)
    ctx = _ring_context(inline=False)
    ring = ctx._ring
    assert ring is not None
    code = Ring.reap.__code__
    try:
        hit = 0
        while True:
            hit += 1
            assert hit < 100
            req = ctx.read(fd, 0, bytearray(8))
            wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= 1)
            left = [hit]

            def prof(frame: Any, event: str, arg: object, left: list[int] = left) -> None:
                if event == "c_return" and frame.f_code is code:
                    left[0] -= 1
                    if not left[0]:
                        sys.setprofile(None)
                        raise KeyboardInterrupt

            sys.setprofile(prof)
            try:
                req.wait(10)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            assert not call_after_batch(lambda: None), f"C return {hit}: still in a batch"
            assert ring._plugged_by is None, f"C return {hit}: left plugged"
            probe = ctx.read(fd, 0, bytearray(8))
            readable, _, _ = select.select([ctx.fileno()], [], [], 10)
            assert readable, f"C return {hit}"
            assert ctx.drain(timeout=10)
            assert probe.done()
            if left[0] > 0:
                break
    finally:
        sys.setprofile(None)
        ctx.close(timeout=10)
        os.close(fd)


def test_a_child_forked_in_a_callback_does_not_finish_its_parents_short_transfer(
    tmp_path: Path,
) -> None:
    """The first callback of a reap forks; the next completion of that
    batch is a short read (it ends at end of file), which the parent hands
    to a worker to finish.  The child goes on through the rest of the reap,
    but the request is the parent's (CANCELLED in the child): the child's
    pool gets no job for it."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    import subprocess

    p = tmp_path / "f"
    p.write_bytes(os.urandom(4096 + 100))
    code = f"""
import os, threadlets
ctx = threadlets.AioContext(backend="io_uring", inline=False)
fd = os.open({str(p)!r}, os.O_RDONLY)
pid, before = [], []
def cb(req):
    if not pid:
        pid.append(os.fork())
        if pid[0] == 0:
            before.append(ctx.queue.stats().submitted)
ring = ctx._ring
first = ctx.read(fd, 0, bytearray(16), callback=cb)
while ring._cq_tail.value - ring._cq_head.value < 1:
    pass
short = ctx.read(fd, 4096, bytearray(4096), callback=cb)
while ring._cq_tail.value - ring._cq_head.value < 2:
    pass
ctx.process_completions()
if pid[0] == 0:
    os._exit(0 if ctx.queue.stats().submitted == before[0] else 1)
assert ctx.drain(timeout=10)
assert short.result() == 100
_, status = os.waitpid(pid[0], 0)
assert status == 0, status
assert ctx.close(timeout=10)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    run = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, timeout=60, capture_output=True
    )
    assert run.returncode == 0, run.stderr.decode()


def test_after_batch_calls_run_even_if_a_later_done_callback_raises(path: Path) -> None:
    """A done-callback that asked for a call after the batch (what posix
    does to wake its aio_suspend waiters once per batch), then another one
    of the same batch raising KeyboardInterrupt: the call still runs (before
    the fix it was dropped with the rest of the batch's bookkeeping, and a
    waiter it would have woken slept on)."""
    fd = os.open(path, os.O_RDONLY)
    ctx = _ring_context(inline=False)
    ring = ctx._ring
    assert ring is not None
    woken: list[int] = []
    try:
        a = ctx.read(fd, 0, bytearray(16))
        b = ctx.read(fd, 16, bytearray(16))
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= 2)
        a.add_done_callback(lambda _: ctx.call_after_batch(lambda: woken.append(1)))

        def interrupted(_: object) -> None:
            raise KeyboardInterrupt

        b.add_done_callback(interrupted)
        with pytest.raises(KeyboardInterrupt):
            ctx.process_completions()
        assert woken == [1]
        assert ctx.drain(timeout=10)
        assert woken == [1]
    finally:
        ctx.close()
        os.close(fd)
