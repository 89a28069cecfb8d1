"""The threads backend's cheaper hot path (the pool's worker loop, the
completion queue, ops.transfer) keeps every promise of the one it replaced.

What the existing sweeps do not reach: the queued count kept as the deque's
length less the cancelled left in it (``_stale``), the workers' alert (one
look per hold instead of ``live`` and the cap), the completion queue's head
taken off in one step, and ops.transfer's first call made without
rw_loop -- each against an oracle, and the main-thread steps at every C
return a Ctrl-C can land on."""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext, AioRequest, Threadlet, ThreadletQueue
from threadlets.ops import IOV_MAX
from threadlets.pool import CancelResult, ThreadletState
from threadlets.probe import aligned_buffer

from .conftest import Gate, interrupt_at_c_return, wait_until


def _consistent(q: ThreadletQueue) -> None:
    """The counters agree with each other and with the deque."""
    with q._lock:
        queued = sum(1 for t in q._items if t._state is ThreadletState.QUEUED)
        assert q._queued == queued, (q._queued, queued, q._stale)
    s = q.stats()
    assert s.submitted == s.completed + s.cancelled + s.queued + s.running, s
    assert min(s.completed, s.queued, s.running) >= 0, s


# -- the queued count (len(_items) - _stale) ------------------------------------------------


def test_cancelled_threadlets_left_in_the_deque_are_not_counted_queued() -> None:
    q = ThreadletQueue(max_threads=1, idle_timeout=60)
    gate = Gate()
    try:
        blocker = q.submit(gate)
        assert gate.started.wait(10)
        ran: list[int] = []
        items = [q.submit(ran.append, i) for i in range(6)]
        assert q.stats().queued == 6
        for t in items[1::2]:
            assert t.cancel() is CancelResult.CANCELED
        _consistent(q)
        assert (q.stats().queued, q.stats().cancelled) == (3, 3)
        gate.release.set()
        assert q.drain(timeout=10)
        _consistent(q)
        s = q.stats()
        assert (s.queued, s.running, s.completed, s.cancelled) == (0, 0, 4, 3), s
        assert ran == [0, 2, 4]
        assert blocker.result() is None
        with q._lock:
            assert (q._stale, len(q._items)) == (0, 0)  # each met and dropped by the worker
    finally:
        gate.release.set()
        assert q.close(timeout=10)


def test_close_with_cancelled_threadlets_left_in_the_deque() -> None:
    q = ThreadletQueue(max_threads=1, idle_timeout=60)
    gate = Gate()
    try:
        q.submit(gate)
        assert gate.started.wait(10)
        items = [q.submit(int) for _ in range(5)]
        items[2].cancel()
        gate.release.set()
        assert q.close(timeout=10)
        _consistent(q)
        s = q.stats()
        assert (s.queued, s.running) == (0, 0)
        assert s.completed + s.cancelled == 6
        assert all(t.done() for t in items)
        with q._lock:
            assert (q._stale, len(q._items)) == (0, 0)
    finally:
        gate.release.set()
        q.close(timeout=10)


@pytest.mark.parametrize("step", ["submit", "cancel", "close"])
def test_ctrl_c_at_every_c_return_keeps_the_queued_count(step: str) -> None:
    """A KeyboardInterrupt as each C call returns inside submit(), cancel()
    or close() (with cancelled threadlets left in the deque): the counters
    agree after it, and everything submitted runs or is cancelled, once."""
    n = 0
    while True:
        n += 1
        assert n < 300, "never ran to its end"
        q = ThreadletQueue(max_threads=1, idle_timeout=60)
        gate = Gate()
        try:
            q.submit(gate)
            assert gate.started.wait(10)
            runs: list[int] = []
            items = [q.submit(runs.append, i) for i in range(4)]
            items[1].cancel()
            seen = interrupt_at_c_return(n)
            try:
                if step == "submit":
                    items.append(q.submit(runs.append, 9))
                elif step == "cancel":
                    items[2].cancel()
                else:
                    q.close(timeout=0)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            _consistent(q)
            gate.release.set()
            q.close(timeout=10)
            _consistent(q)
            s = q.stats()
            assert (s.queued, s.running) == (0, 0), (n, s)
            for t in items:
                assert t.done(), n
            assert sorted(runs) == sorted(set(runs)), n  # none ran twice
            assert len(runs) == sum(1 for t in items if not t.cancelled()), n
        finally:
            gate.release.set()
            q.close(timeout=10)
        if seen[0] < n:
            break
    assert n > 2


# -- the workers' alert -------------------------------------------------------------------


def test_lowered_max_threads_retires_the_surplus_and_the_alert_goes_off() -> None:
    q = ThreadletQueue(max_threads=4, idle_timeout=60)
    gates = [Gate() for _ in range(4)]
    try:
        for g in gates:
            q.submit(g)
        for g in gates:
            assert g.started.wait(10)
        q.set_limits(max_threads=2)
        assert q._alert.on
        for g in gates:
            g.release.set()
        assert q.drain(timeout=10)
        wait_until(lambda: q.stats().threads == 2)
        # The next look of a remaining worker finds nobody above the cap.
        assert q.submit(int).result(timeout=10) == 0
        assert not q._alert.on
        assert q.stats().threads == 2
        results = [q.submit(pow, 2, i) for i in range(20)]
        assert [t.result(timeout=10) for t in results] == [2**i for i in range(20)]
        assert q.stats().peak_threads == 4
        assert q.stats().threads <= 2
    finally:
        for g in gates:
            g.release.set()
        assert q.close(timeout=10)


def test_close_turns_the_alert_on_and_every_worker_retires() -> None:
    q = ThreadletQueue(max_threads=3, min_threads=3, idle_timeout=60)
    try:
        assert [q.submit(int).result(timeout=10) for _ in range(5)] == [0] * 5
        wait_until(lambda: q.stats().idle == 3)
        assert not q._alert.on
    finally:
        assert q.close(timeout=10)
    assert q._alert.on
    assert q.stats().threads == 0


# -- what a worker keeps ------------------------------------------------------------------


_delivered: list[int] = []


class _Quiet(Threadlet[int]):
    __slots__ = ()
    _quiet_finish = True

    def _finished(self) -> None:
        _delivered.append(id(self))
        Threadlet._finished(self)


def test_a_quiet_threadlet_is_delivered_once_and_not_kept_by_its_worker() -> None:
    """A quiet subclass with its own _finished and no _finish_quiet: the
    worker's quiet delivery is that _finished, once each; once the worker
    is idle, nothing of the last one is alive."""
    _delivered.clear()
    q = ThreadletQueue(max_threads=1, idle_timeout=60)
    try:
        items = [_Quiet(q, pow, (3, i)) for i in range(10)]
        for t in items:
            q._submit(t)
        assert [t.result(timeout=10) for t in items] == [3**i for i in range(10)]
        wait_until(lambda: len(_delivered) == 10 and q.stats().idle == 1)
        assert sorted(_delivered) == sorted(map(id, items))
        last = weakref.ref(items[-1])
        del items, t
        gc.collect()
        assert last() is None, gc.get_referrers(last())
    finally:
        assert q.close(timeout=10)


def test_done_and_outcome_read_after_the_worker_published_them() -> None:
    q = ThreadletQueue(max_threads=2)
    try:
        ok = q.submit(divmod, 7, 2)
        bad = q.submit(divmod, 1, 0)
        assert ok.result(timeout=10) == (3, 1)
        assert isinstance(bad.exception(timeout=10), ZeroDivisionError)
        assert ok.done()
        assert bad.done()
        assert not ok.cancelled()
        with pytest.raises(ZeroDivisionError):
            bad.result()
    finally:
        assert q.close(timeout=10)


# -- the completion queue's head --------------------------------------------------------


def _ready_batch(ctx: AioContext, fd: int, n: int, cb: Any) -> list[AioRequest]:
    reqs = [ctx.read(fd, 0, bytearray(16), callback=cb) for _ in range(n)]
    for r in reqs:
        assert r.wait(timeout=10)
    wait_until(lambda: len(ctx._cq.ready) == n)
    return reqs


def test_ctrl_c_at_every_c_return_of_a_delivery_delivers_each_once_in_order(
    backend: str, path: Path
) -> None:
    """process_completions() on a batch of four, a KeyboardInterrupt as the
    n-th C call returns, for every n (a callback that is a C function, so
    that each delivery has its own): each callback runs once, in
    completion order, and nothing stays counted outstanding."""
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        while True:
            n += 1
            assert n < 200, "never ran to its end"
            ctx = AioContext(backend=backend, inline=False)
            try:
                ran: list[AioRequest] = []
                reqs = _ready_batch(ctx, fd, 4, ran.append)
                order = list(ctx._cq.ready)
                seen = interrupt_at_c_return(n)
                try:
                    ctx.process_completions()
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                assert ctx.drain(timeout=10), (n, ctx.stats())
                assert ran == order, n
                assert sorted(map(id, ran)) == sorted(map(id, reqs))
                assert ctx.stats().outstanding == 0, (n, ctx.stats())
                assert not ctx._cq.ready, n
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break
        assert n > 4
    finally:
        os.close(fd)


def test_a_batch_delivered_partly_by_a_nested_call(backend: str, path: Path) -> None:
    """A callback that processes completions itself delivers the rest of
    its caller's batch (and what came after): each once, and the head
    taken off by whichever call finishes last counts each once."""
    fd = os.open(path, os.O_RDONLY)
    ctx = AioContext(backend=backend, inline=False)
    ran: list[AioRequest] = []
    nested: list[int] = []
    try:
        reqs: list[AioRequest] = []

        def cb(r: AioRequest) -> None:
            ran.append(r)
            if r is reqs[0]:
                late = ctx.read(fd, 0, bytearray(16), callback=ran.append)
                assert late.wait(timeout=10)
                wait_until(lambda: late in ctx._cq.ready)
                nested.append(ctx.process_completions())

        reqs.extend(_ready_batch(ctx, fd, 3, cb))
        outer = ctx.process_completions()
        assert outer + nested[0] == 4, (outer, nested)
        assert len(ran) == 4
        assert len(set(map(id, ran))) == 4
        assert ctx.stats().outstanding == 0
        assert not ctx._cq.ready
    finally:
        ctx.close(timeout=10)
        os.close(fd)


# -- ops.transfer against an oracle -----------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "data"
    p.write_bytes(os.urandom(64 * 1024 + 100))
    return p


def test_a_cached_read_in_more_buffers_than_one_call_takes(data_file: Path) -> None:
    want = data_file.read_bytes()
    fd = os.open(data_file, os.O_RDONLY)
    ctx = AioContext(backend="threads", inline=False)
    try:
        bufs = [bytearray(16) for _ in range(IOV_MAX + 5)]
        req = ctx.read(fd, 3, bufs)
        assert ctx.wait(req, timeout=10)
        assert req.result() == 16 * len(bufs)
        assert b"".join(bufs) == want[3 : 3 + 16 * len(bufs)]
        # Short at end of file, then zero-filled.
        tail = [bytearray(64), bytearray(64)]
        req = ctx.read(fd, len(want) - 70, tail, zero_fill=True)
        assert ctx.wait(req, timeout=10)
        assert req.result() == 128
        assert bytes(tail[0]) + bytes(tail[1]) == want[-70:] + bytes(58)
        req = ctx.read(fd, len(want) + 10, bytearray(8))
        assert ctx.wait(req, timeout=10)
        assert req.result() == 0
    finally:
        ctx.close(timeout=10)
        os.close(fd)


def _direct_fd(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("no O_DIRECT here")


@pytest.fixture
def direct_file() -> Any:
    import tempfile

    fd, name = tempfile.mkstemp(dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    try:
        os.write(fd, os.urandom(256 * 1024))
        os.close(fd)
        yield Path(name)
    finally:
        os.unlink(name)


@pytest.mark.parametrize(
    "shape", ["aligned", "misaligned memory", "vectored odd lengths", "odd offset", "at eof"]
)
@pytest.mark.linux_only("o_direct")
def test_an_o_direct_read_on_the_threads_backend(direct_file: Path, shape: str) -> None:
    want = direct_file.read_bytes()
    fd = _direct_fd(direct_file)
    ctx = AioContext(backend="threads", inline=False)
    try:
        offset, bufs = 8192, [aligned_buffer(8192)]
        if shape == "misaligned memory":
            bufs = [memoryview(aligned_buffer(8192 + 4096))[1 : 1 + 8192]]
        elif shape == "vectored odd lengths":
            whole = aligned_buffer(8192)
            bufs = [memoryview(whole)[:100], memoryview(whole)[100:]]
        elif shape == "odd offset":
            offset = 8192 + 7
        elif shape == "at eof":
            offset = len(want) - 4096
        total = sum(len(b) for b in bufs)
        req = ctx.read(fd, offset, bufs)
        assert ctx.wait(req, timeout=10)
        expect = want[offset : offset + total]
        assert req.result() == len(expect)
        assert b"".join(bytes(b) for b in bufs)[: len(expect)] == expect
    finally:
        ctx.close(timeout=10)
        os.close(fd)


def test_a_read_of_a_descriptor_that_fails_raises_as_rw_loop_does(tmp_path: Path) -> None:
    """The first call failing (a directory: EISDIR) gives rw_loop's error,
    with nothing counted as moved."""
    d = os.open(tmp_path, os.O_RDONLY)
    ctx = AioContext(backend="threads", inline=False)
    try:
        req = ctx.read(d, 0, bytearray(8))
        assert ctx.wait(req, timeout=10)
        with pytest.raises(OSError) as info:
            req.result()
        with pytest.raises(OSError) as oracle:
            os.preadv(d, [bytearray(8)], 0)
        assert info.value.errno == oracle.value.errno
        assert not hasattr(info.value, "transferred")
    finally:
        ctx.close(timeout=10)
        os.close(d)


def test_workers_serve_many_threads_submitting_at_once() -> None:
    q = ThreadletQueue(max_threads=3, idle_timeout=60)
    out: list[list[int]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def client(k: int) -> None:
        barrier.wait()
        ts = [q.submit(pow, k, i) for i in range(200)]
        out[k] = [t.result(timeout=30) for t in ts]

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == [[k**i for i in range(200)] for k in range(4)]
        assert q.drain(timeout=10)
        _consistent(q)
        assert q.stats().completed == 800
    finally:
        assert q.close(timeout=10)
