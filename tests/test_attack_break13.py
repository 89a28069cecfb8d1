"""h-break13: the threads backend's cheaper pool, ops.transfer and the
POSIX AIO cut, attacked from outside.

Found here: a Ctrl-C as a C call returned inside ``ThreadletQueue._spawn``
before its ``try`` (the peak's ``max()``, the listing's ``add()``) left a
worker counted that never ran -- submit() then spawned no other, the work
waited for good, and close() waited for it."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadlets import AioContext, ThreadletQueue
from threadlets.ops import IOV_MAX
from threadlets.pool import CancelResult, ThreadletState
from threadlets.probe import portable

from .conftest import Gate, interrupt_at_c_return, wait_until

SIZE = 3 * 4096 + 300  # not a whole number of blocks: O_DIRECT's end of file


def _consistent(q: ThreadletQueue) -> None:
    with q._lock:
        queued = sum(1 for t in q._items if t._state is ThreadletState.QUEUED)
        assert q._queued == queued, (q._queued, queued, q._stale)
        assert q._threads == len(q._workers), (q._threads, q._workers)
    s = q.stats()
    assert s.submitted == s.completed + s.cancelled + s.queued + s.running, s
    assert min(s.completed, s.queued, s.running, s.cancelled) >= 0, s


# -- pool: Ctrl-C inside a worker's start ---------------------------------------------------


@pytest.mark.parametrize("step", ["submit", "set_limits"])
def test_ctrl_c_at_every_c_return_of_a_spawn_leaves_no_phantom_worker(step: str) -> None:
    """submit() starting a worker, set_limits() raising max_threads for
    queued work: a KeyboardInterrupt at each C return leaves the thread
    count equal to the workers that exist, all work runs, close() ends."""
    n = 0
    while True:
        n += 1
        assert n < 200, "never ran to its end"
        q = ThreadletQueue(max_threads=1 if step == "set_limits" else 2, idle_timeout=60)
        gate = Gate()
        items = []
        try:
            if step == "set_limits":
                q.submit(gate)
                assert gate.started.wait(10)
                items = [q.submit(int, i) for i in range(3)]
            seen = interrupt_at_c_return(n)
            try:
                if step == "submit":
                    items.append(q.submit(int, 7))
                else:
                    q.set_limits(max_threads=3)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            _consistent(q)
            gate.release.set()
            if step == "submit" and not items:
                items.append(q.submit(int, 8))  # the queue is still usable
            assert q.drain(timeout=10), n
            for t in items:
                assert t.result(timeout=10) in (7, 8, 0, 1, 2), n
            _consistent(q)
            assert q.close(timeout=10), n
        finally:
            gate.release.set()
            q.close(timeout=10)
        if seen[0] < n:
            break


# -- ops.transfer: vectored reads against the kernel's own preadv -----------------------------


@pytest.fixture(scope="module")
def data_files() -> Iterator[tuple[str, str]]:
    """The same bytes in the system temp dir and on /var/tmp (ext4: O_DIRECT)."""
    want = os.urandom(SIZE)
    names = []
    try:
        for d in (None, "/var/tmp" if os.path.isdir("/var/tmp") else None):
            fd, name = tempfile.mkstemp(dir=d)
            names.append(name)
            os.write(fd, want)
            os.close(fd)
        yield names[0], names[1]
    finally:
        for name in names:
            os.unlink(name)


def _views(lengths: list[int], misalign: int) -> tuple[mmap.mmap, list[memoryview]]:
    total = sum(lengths)
    m = mmap.mmap(-1, max(total + misalign, 1) + 4096)
    mv = memoryview(m)
    out, at = [], misalign
    for n in lengths:
        out.append(mv[at : at + n])
        at += n
    for v in out:
        v[:] = b"\xee" * len(v)
    return m, out


def _expect(want: bytes, offset: int, lengths: list[int], zero_fill: bool) -> tuple[int, bytes]:
    total = sum(lengths)
    got = want[offset : offset + total]
    if zero_fill:
        return total, got + bytes(total - len(got))
    return len(got), got + b"\xee" * (total - len(got))


_LENGTHS = st.one_of(
    st.lists(st.sampled_from([0, 1, 7, 100, 511, 512, 4096, 3584, 8192]), min_size=1, max_size=6),
    st.builds(lambda k, n: [n] * k, st.sampled_from([IOV_MAX + 3]), st.sampled_from([0, 1, 16])),
)


@pytest.mark.parametrize("backend_", ["threads", "io_uring"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lengths=_LENGTHS,
    offset=st.sampled_from([0, 1, 512, 4096, 8192 + 7, 3 * 4096, SIZE - 1, SIZE, SIZE + 4096]),
    direct=st.booleans() if not portable() else st.just(False),  # (O_DIRECT off there)
    misalign=st.sampled_from([0, 0, 1, 512]),
    zero_fill=st.booleans(),
)
def test_vectored_reads_against_preadv(
    data_files: tuple[str, str],
    backend_: str,
    lengths: list[int],
    offset: int,
    direct: bool,
    misalign: int,
    zero_fill: bool,
) -> None:
    plain, on_ext4 = data_files
    want = Path(plain).read_bytes()
    flags = os.O_RDONLY
    if direct:
        flags |= os.O_DIRECT
    try:
        fd = os.open(on_ext4 if direct else plain, flags)
    except OSError:
        pytest.skip("no O_DIRECT here")
    ctx = AioContext(backend=backend_, inline=False)
    m, bufs = _views(lengths, misalign)
    try:
        req = ctx.read(fd, offset, bufs, zero_fill=zero_fill)
        assert ctx.wait(req, timeout=10)
        n, data = _expect(want, offset, lengths, zero_fill)
        assert req.result() == n
        got = b"".join(bytes(b) for b in bufs)
        if direct and not zero_fill:
            # Past the end of file O_DIRECT moves whole blocks (os.preadv
            # too): only the count's bytes are the file's.
            got, data = got[:n], data[:n]
        assert got == data
    finally:
        ctx.close(timeout=10)
        os.close(fd)
        del m, bufs  # (an io_uring request pins its memory while it lives)


def _in_syscall(tid: int) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return first not in ("running", "-1") and int(first) in (
        0,
        17,
        19,
        295,
    )  # read, pread64, readv, preadv


def test_a_signal_handler_interrupting_a_blocked_fifo_read(tmp_path: Path) -> None:
    """A handled signal delivered to the worker blocked in a FIFO read
    (EINTR, no SA_RESTART): the read goes on and gives what comes, as
    os.read does."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(fifo, os.O_WRONLY)
    os.set_blocking(rfd, True)
    hits: list[int] = []
    sig = signal.SIGRTMIN
    old = signal.signal(sig, lambda s, f: hits.append(s))
    ctx = AioContext(backend="threads", inline=False)
    try:
        buf = bytearray(10)
        req = ctx.read(rfd, 0, buf)
        workers = [w.thread for w in ctx._queue._workers if w.thread is not None]
        tids = [t.native_id for t in workers if t.native_id is not None]
        from .conftest import wait_until

        wait_until(lambda: any(_in_syscall(t) for t in tids))
        # The one worker in the read, and only it: a signal sent to an idle
        # worker could still be pending when the default handler (which
        # kills the process) is put back below.  Delivered once the
        # handler ran (hits), so nothing is pending at the restore.
        reader = next(t for t in workers if t.native_id is not None and _in_syscall(t.native_id))
        assert reader.ident is not None
        signal.pthread_kill(reader.ident, sig)
        wait_until(lambda: bool(hits))
        os.write(wfd, b"hello")
        assert ctx.wait(req, timeout=10)
        assert req.result() == 5
        assert bytes(buf[:5]) == b"hello"
    finally:
        signal.signal(sig, old)
        ctx.close(timeout=10)
        os.close(wfd)
        os.close(rfd)


@pytest.mark.parametrize("backend_", ["threads", "io_uring"])
@pytest.mark.parametrize("what", ["directory", "closed", "write-only"])
def test_a_failing_first_read_gives_preadvs_errno(tmp_path: Path, backend_: str, what: str) -> None:
    if what == "directory":
        fd = os.open(tmp_path, os.O_RDONLY)
    else:
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    ctx = AioContext(backend=backend_, inline=False)
    try:
        if what == "closed":
            os.close(fd)
        bufs = [bytearray(8), bytearray(0), bytearray(3)]
        with pytest.raises(OSError) as oracle:
            os.preadv(fd, bufs, 0)
        req = ctx.read(fd, 0, bufs)
        assert ctx.wait(req, timeout=10)
        with pytest.raises(OSError) as info:
            req.result()
        assert info.value.errno == oracle.value.errno
        assert bytes(bufs[0]) == bytes(8)
    finally:
        ctx.close(timeout=10)
        if what != "closed":
            os.close(fd)


# -- pool races ---------------------------------------------------------------------------


@pytest.fixture
def switchy_() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_cancel_racing_the_take_answers_exactly(switchy_: None) -> None:
    """CANCELED: the function never ran; NOTCANCELED or ALLDONE: it ran,
    once.  The worker takes each as the main thread cancels it."""
    q = ThreadletQueue(max_threads=2, idle_timeout=60)
    try:
        for i in range(400):
            ran: list[int] = []
            t = q.submit(ran.append, i)
            answer = t.cancel()
            t.wait(timeout=10)
            if answer is CancelResult.CANCELED:
                assert ran == [], i
                assert t.cancelled(), i
            else:
                assert ran == [i], (i, answer)
                assert not t.cancelled(), (i, answer)
                assert t.result() is None
        assert q.drain(timeout=10)
        _consistent(q)
    finally:
        assert q.close(timeout=10)


def test_an_outcome_read_the_moment_done_says_true(switchy_: None) -> None:
    """Another thread spinning on done() reads the real result or
    exception at once, never a stale None."""
    q = ThreadletQueue(max_threads=2, idle_timeout=60)
    stop = threading.Event()
    bad: list[object] = []
    current: list[Any] = [None, -1]
    seen = threading.Semaphore(0)

    def reader() -> None:
        while not stop.is_set():
            t, want = current[0], current[1]
            if t is None or not t.done():
                continue
            try:
                got = t.result()
            except ValueError as e:
                got = e.args[0]
            if got != want:
                bad.append((want, got))
            current[0] = None
            seen.release()

    def work(i: int) -> int:
        if i % 3 == 0:
            raise ValueError(i)
        return i

    r = threading.Thread(target=reader)
    r.start()
    try:
        for i in range(300):
            current[1] = i
            current[0] = q.submit(work, i)
            assert seen.acquire(timeout=10)
        assert bad == []
    finally:
        stop.set()
        r.join(10)
        assert q.close(timeout=10)


def test_idle_timeout_expiry_racing_submissions(switchy_: None) -> None:
    """Workers time out idle as work arrives: every submission runs."""
    q = ThreadletQueue(max_threads=2, idle_timeout=0.0005)
    try:
        for i in range(300):
            assert q.submit(int, i).result(timeout=10) == i
            if i % 7 == 0:
                threading.Event().wait(0.001)  # (lets the idle wait time out: not a sync)
        assert q.drain(timeout=10)
        _consistent(q)
    finally:
        assert q.close(timeout=10)
    s = q.stats()
    assert s.completed == 300


def test_lowered_max_threads_while_busy_and_idle() -> None:
    q = ThreadletQueue(max_threads=4, idle_timeout=60)
    gates = [Gate(i) for i in range(3)]
    try:
        ts = [q.submit(g) for g in gates]
        for g in gates:
            assert g.started.wait(10)
        q.submit(int).result(timeout=10)  # a fourth worker, idle now
        assert q._threads == 4
        q.set_limits(max_threads=1)
        more = [q.submit(int, i) for i in range(20)]
        for g in gates:
            g.release.set()
        assert [t.result(timeout=10) for t in ts] == [0, 1, 2]
        assert [t.result(timeout=10) for t in more] == list(range(20))
        from .conftest import wait_until

        wait_until(lambda: q._threads <= 1)
        _consistent(q)
        assert q.submit(int, 5).result(timeout=10) == 5
        q.set_limits(max_threads=3, min_threads=2)
        with q._lock:
            assert q._threads >= 2
        _consistent(q)
    finally:
        for g in gates:
            g.release.set()
        assert q.close(timeout=10)
    assert q._threads == 0


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_base_exceptions_from_a_function_and_a_callback(exc: type[BaseException]) -> None:
    q = ThreadletQueue(max_threads=1, idle_timeout=60)
    try:

        def boom() -> None:
            raise exc("x")

        t = q.submit(boom)
        with pytest.raises(exc):
            t.result(timeout=10)
        assert isinstance(t.exception(), exc)
        gate = Gate()
        t2 = q.submit(gate)

        def cb(_: object) -> None:
            raise exc("cb")

        t2.add_done_callback(cb)
        gate.release.set()
        assert t2.result(timeout=10) is None
        assert q.submit(int, 3).result(timeout=10) == 3  # the worker lives on
        assert q.drain(timeout=10)
        _consistent(q)
    finally:
        assert q.close(timeout=10)


def test_a_queue_dropped_without_close_lets_its_workers_go() -> None:
    import weakref

    q = ThreadletQueue(max_threads=3, min_threads=2, idle_timeout=60)
    assert q.submit(int, 1).result(timeout=10) == 1
    threads = [w.thread for w in q._workers if w.thread is not None]
    ref = weakref.ref(q)
    del q
    # Collected once no worker holds it: a worker lets go as it goes idle
    # (the one that ran the threadlet may be on its way there; a warm one
    # may still be starting).
    wait_until(lambda: gc.collect() >= 0 and ref() is None)
    for t in threads:
        t.join(10)
        assert not t.is_alive()


def test_a_thousand_queues_leave_no_threads_or_descriptors() -> None:
    before_fds = len(os.listdir("/proc/self/fd"))
    before_threads = threading.active_count()
    for i in range(1000):
        q = ThreadletQueue(max_threads=2, min_threads=i % 2, idle_timeout=60)
        assert q.submit(int, i).result(timeout=10) == i
        assert q.close(timeout=10)
    assert threading.active_count() == before_threads
    assert len(os.listdir("/proc/self/fd")) <= before_fds


# -- fork with workers in each state ------------------------------------------------------


def _stats_ok(q: ThreadletQueue) -> dict[str, int]:
    _consistent(q)
    s = q.stats()
    return {"queued": s.queued, "running": s.running, "cancelled": s.cancelled}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("where", ["main", "worker"])
def test_a_fork_with_workers_busy_delivering_idle_and_stale_items(where: str) -> None:
    from .test_attack_fork8 import _collect, _fork

    q = ThreadletQueue(max_threads=3, idle_timeout=60)
    busy, in_cb = Gate(1), threading.Event()
    leave_cb = threading.Event()
    try:
        t_busy = q.submit(busy)
        assert busy.started.wait(10)
        gate2 = Gate(2)
        t_cb = q.submit(gate2)
        t_cb.add_done_callback(lambda _: (in_cb.set(), leave_cb.wait(30)))
        assert gate2.started.wait(10)
        gate2.release.set()
        assert in_cb.wait(10)  # a worker delivering
        gate3 = Gate(3)
        t3 = q.submit(gate3)
        assert gate3.started.wait(10)  # the third busy: the rest stay queued
        queued = [q.submit(int, i) for i in range(4)]
        assert queued[1].cancel() is CancelResult.CANCELED  # stale in the deque

        def child() -> object:
            out = _stats_ok(q)
            states = [t.state.value for t in (t_busy, t3, *queued)]
            assert q.submit(int, 42).result(timeout=10) == 42
            q.submit(int, 1).cancel()
            out2 = _stats_ok(q)
            assert q.close(timeout=10)
            return [out, states, out2]

        if where == "main":
            pid, r = _fork(child)
        else:
            forked: list[tuple[int, int]] = []
            forker = q.submit(lambda: forked.append(_fork(child)))
            busy.release.set()  # its worker takes the forker next
            forker.result(timeout=10)
            pid, r = forked[0]
        out, states, out2 = _collect(pid, r)
        assert (out["running"], out["queued"]) == (0, 0), out
        assert set(states) <= {"cancelled", "done"}, states
        if where == "main":
            assert states[0] == "cancelled"
        assert out2["queued"] == 0, out2
        # The parent's work goes on.
        busy.release.set()
        gate3.release.set()
        leave_cb.set()
        assert t_busy.result(timeout=10) == 1
        assert t3.result(timeout=10) == 3
        assert [t.result(timeout=10) for t in queued if not t.cancelled()] == [0, 2, 3]
        assert q.drain(timeout=10)
        _consistent(q)
    finally:
        busy.release.set()
        gate3.release.set() if "gate3" in locals() else None
        leave_cb.set()
        assert q.close(timeout=10)


# -- the counters under every interleaving of the controls ------------------------------------

from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.q = ThreadletQueue(max_threads=2, idle_timeout=60)
        self.items: list[Any] = []
        self.gates: list[Gate] = []
        self.runs: list[int] = []
        self.answers: dict[int, CancelResult] = {}

    @rule(gated=st.booleans())
    def submit(self, gated: bool) -> None:
        if self.q.closed:
            with pytest.raises(RuntimeError):
                self.q.submit(int)
            return
        i = len(self.items)
        if gated:
            g = Gate(i)
            self.gates.append(g)

            def work(g: Gate = g, i: int = i) -> int:
                self.runs.append(i)
                g()
                return i

            self.items.append(self.q.submit(work))
        else:
            self.items.append(self.q.submit(lambda i=i: self.runs.append(i) or i))

    @precondition(lambda self: bool(self.gates))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.gates)).release.set()

    @precondition(lambda self: bool(self.items))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.items) - 1))
        answer = self.items[i].cancel()
        if answer is CancelResult.CANCELED:
            self.answers[i] = answer

    @rule(lo=st.integers(0, 3), hi=st.integers(1, 4))
    def set_limits(self, lo: int, hi: int) -> None:
        if lo > hi:
            with pytest.raises(ValueError):
                self.q.set_limits(min_threads=lo, max_threads=hi)
        else:
            self.q.set_limits(min_threads=lo, max_threads=hi)

    @rule()
    def close_now(self) -> None:
        self.q.close(timeout=0)

    @invariant()
    def balanced(self) -> None:
        _consistent(self.q)
        with self.q._lock:
            assert self.q._threads <= max(self.q._max, self.q._threads)  # (retiring: above max)
            assert self.q._running <= self.q._threads

    def teardown(self) -> None:
        for g in self.gates:
            g.release.set()
        assert self.q.close(timeout=10)
        _consistent(self.q)
        s = self.q.stats()
        assert (s.queued, s.running) == (0, 0), s
        for i, t in enumerate(self.items):
            assert t.done()
            if t.cancelled():
                assert i not in self.runs
            else:
                assert self.runs.count(i) == 1
                assert t.result() == i
        for i in self.answers:
            assert self.items[i].cancelled()
        assert s.completed == len(self.items) - s.cancelled
        with self.q._lock:
            assert self.q._threads == 0


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


# -- posix: an interrupted first submission on an fd --------------------------------------

from threadlets import posix as px  # noqa: E402


def _px_done(rt: px.PosixAio, cb: px.aiocb) -> tuple[int, int] | str:
    if cb._status == "idle":  # (aio_error: EINVAL)
        return "never submitted"
    while rt.aio_error(cb) == errno.EINPROGRESS:
        rt.aio_suspend([cb], 10)
    return rt.aio_error(cb), rt.aio_return(cb)


def _quiet_ctx(ctx: AioContext) -> bool:
    cq = ctx._cq
    return bool(cq.admitted == cq.delivered)


@pytest.mark.parametrize("backend_", ["threads", "io_uring"])
@pytest.mark.parametrize("flags", ["plain", "append"])
def test_ctrl_c_in_the_first_write_on_an_fd_never_reports_ecanceled_for_bytes_written(
    tmp_path: Path, backend_: str, flags: str
) -> None:
    """An aio_write on an fd the context has not looked up yet (its first
    request, or the first after the fd was reused), Ctrl-C at each C
    return: an aiocb reported ECANCELED (or never submitted) wrote
    nothing, even once every request of the context finished."""
    from .conftest import wait_until

    px._notify_queue()  # (made once, not inside the sweep)
    p = tmp_path / "f"
    n = 0
    bad = []
    while True:
        n += 1
        assert n < 300, "never ran to its end"
        p.write_bytes(b"")
        fd = os.open(p, os.O_RDWR | (os.O_APPEND if flags == "append" else 0))
        ctx = AioContext(deliver=False, backend=backend_, inline=False)
        try:
            rt = px.PosixAio(ctx)
            cb = px.aiocb(fd, 0, b"aaaa")
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                rt.aio_write(cb)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
                gc.enable()
            outcome = _px_done(rt, cb)
            wait_until(lambda ctx=ctx: _quiet_ctx(ctx))  # type: ignore[misc]
            written = os.pread(fd, 8, 0)
            if outcome in ((errno.ECANCELED, -1), "never submitted"):
                if written:
                    bad.append((n, outcome, written))
            else:
                assert outcome == (0, 4), (n, outcome)
                assert written == b"aaaa", n
        finally:
            ctx.close(timeout=10)
            os.close(fd)
        if not interrupted and seen[0] < n:
            break
    assert bad == [], "reported cancelled, and wrote"


@pytest.mark.parametrize("backend_", ["threads", "io_uring"])
def test_aio_error_and_aio_return_read_by_another_thread_as_completion_runs(
    tmp_path: Path, backend_: str, switchy_: None
) -> None:
    """A thread spinning on aio_error sees EINPROGRESS, then the final
    pair: aio_return (twice) gives that submission's count, never a
    stale or placeholder one; the aiocb is resubmitted after each."""
    p = tmp_path / "f"
    p.write_bytes(os.urandom(4096))
    fd = os.open(p, os.O_RDWR)
    ctx = AioContext(deliver=False, backend=backend_, inline=False)
    rt = px.PosixAio(ctx)
    cb = px.aiocb(fd, 0, bytearray(4096))
    want: list[int] = [-1]
    go, seen = threading.Semaphore(0), threading.Semaphore(0)
    bad: list[object] = []
    stop = threading.Event()

    def reader() -> None:
        while True:
            go.acquire()
            if stop.is_set():
                return
            while (err := rt.aio_error(cb)) == errno.EINPROGRESS:
                pass
            got = (err, rt.aio_return(cb), rt.aio_return(cb))
            if got != (0, want[0], want[0]):
                bad.append((want[0], got))
            seen.release()

    r = threading.Thread(target=reader)
    r.start()
    try:
        for i in range(200):
            n = 1 + (i * 37) % 4096
            want[0] = min(n, 4096 - (i % 3))
            cb.aio_nbytes = n
            cb.aio_offset = i % 3
            rt.aio_read(cb)
            go.release()
            assert seen.acquire(timeout=10)
        assert bad == []
    finally:
        stop.set()
        go.release()
        r.join(10)
        ctx.close(timeout=10)
        os.close(fd)


def test_close_with_a_timeout_is_bounded_and_warm_workers_stay() -> None:
    import time

    q = ThreadletQueue(max_threads=3, min_threads=2, idle_timeout=0.001)
    gate = Gate()
    try:
        with q._lock:
            assert q._threads == 2  # warm from the start
        assert q.submit(int, 1).result(timeout=10) == 1
        threading.Event().wait(0.01)  # (idle past the timeout: warm ones stay)
        with q._lock:
            assert q._threads >= 2
        t = q.submit(gate)
        assert gate.started.wait(10)
        queued = q.submit(int, 2)
        start = time.monotonic()
        assert not q.close(timeout=0.05)
        assert time.monotonic() - start < 5
        assert queued.cancelled() or queued.result(timeout=10) == 2
        gate.release.set()
        assert t.result(timeout=10) is None
        assert q.close(timeout=10)
        _consistent(q)
    finally:
        gate.release.set()
        q.close(timeout=10)
