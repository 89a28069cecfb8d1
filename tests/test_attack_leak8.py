"""Resource leaks, attacked: contexts, rings and queues that are dropped,
closed early or interrupted, in loops -- descriptors (/proc/self/fd),
threads, and objects must all come back."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import os
import threading
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import threadlets
import threadlets.awaitable as aw
from threadlets import AioContext, ThreadletQueue, oneshot, uring
from threadlets.probe import pin_buffer

from .conftest import HAVE_RING, call_interrupted_at, interrupt_after_call, wait_until
from .test_asyncfile import anyio_backend

__all__ = ["anyio_backend"]  # a fixture used by name

needs_ring = pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _until_back(fds: int, threads: int | None = None) -> None:
    """Until no more fds (and threads) than before are open, collecting
    garbage: a worker or reaper on its way out holds what it handed over
    for a moment."""

    def back() -> bool:
        gc.collect()
        return _fds() <= fds and (threads is None or threading.active_count() <= threads)

    wait_until(back)


@pytest.fixture
def pipes() -> Iterator[Callable[[], tuple[int, int]]]:
    made: list[int] = []

    def make() -> tuple[int, int]:
        r, w = os.pipe()
        made.extend((r, w))
        return r, w

    yield make
    for fd in made:
        os.close(fd)


# -- 1. a delivering context dropped while the kernel has its requests ---------------------


def test_a_context_dropped_with_requests_in_flight_is_released(
    backend: str, pipes: Callable[[], tuple[int, int]]
) -> None:
    """The io_uring backend's default (owner-reaped) context, dropped
    without close() while reads of empty pipes are in the kernel: the
    ring's pending table held the callbacks, which held the requests, which
    held the context (and a module-level set held the ring, the pool's
    claimed set the requests): 50 contexts kept 200 descriptors for good.
    Now the requests are cancelled in the kernel and the context is
    released at the next collection, running no callback; the cancelled
    reads took nothing from the pipes.  The threads backend releases each
    once its worker's read ends (as CPython's executor would)."""
    gc.collect()
    fds, threads = _fds(), threading.active_count()
    ran: list[str] = []

    def note(r: object) -> None:
        ran.append(type(r).__name__)  # (not the request: that would hold its context)

    ends, bufs, refs = [], [], []
    for _ in range(50):
        r, w = pipes()
        ends.append((r, w))
        ctx = AioContext(backend=backend)
        buf = bytearray(8)
        bufs.append(buf)
        req = ctx.read(r, 0, buf, callback=note)
        req.add_done_callback(note)
        refs.append(weakref.ref(ctx))
    del ctx, req
    fds += 2 * len(ends)  # (the pipes)
    if backend == "io_uring":
        gc.collect()
        assert all(ref() is None for ref in refs)
        assert _fds() <= fds
        assert threading.active_count() <= threads
        for r, w in ends:
            os.write(w, b"12345678")
            assert os.read(r, 100) == b"12345678"  # nothing was read before
    else:
        for _r, w in ends:
            os.write(w, b"12345678")  # the workers' reads end
        _until_back(fds)
        assert all(ref() is None for ref in refs)
    if backend == "io_uring":
        assert ran == []  # nobody could see them: nothing ran in the collector's thread
        assert all(buf == bytes(8) for buf in bufs)
    else:
        # Each worker ran its request's done-callback, as it does; no
        # completion was delivered (nobody processes the context).
        assert ran == ["AioRequest"] * len(ends)
        assert all(buf == b"12345678" for buf in bufs)


def test_a_dropped_context_that_delivers_nothing_finishes_its_requests(
    backend: str, pipes: Callable[[], tuple[int, int]]
) -> None:
    """deliver=False (threadlets.posix's kind): the done-callbacks are the
    delivery, so a dropped context's requests are finished -- on the
    workers, or by the ring's reaper thread, which now holds the ring only
    weakly: the collector hands the ring back to it -- and then it is
    released."""
    gc.collect()
    fds, threads = _fds(), threading.active_count()
    done: list[int] = []
    ends, bufs = [], []
    for _ in range(20):
        r, w = pipes()
        ends.append((r, w))
        ctx = AioContext(backend=backend, deliver=False)
        buf = bytearray(8)
        bufs.append(buf)
        ctx.read(r, 0, buf).add_done_callback(lambda q: done.append(q.result()))
    del ctx
    gc.collect()
    for _r, w in ends:
        os.write(w, b"12345678")
    # (The reapers end; the default queue keeps the workers it grew.)
    _until_back(fds + 2 * len(ends), threads if backend == "io_uring" else None)
    assert done == [8] * len(ends)
    assert all(buf == b"12345678" for buf in bufs)


@needs_ring
def test_a_dropped_owner_ring_gives_up_on_its_operations(
    pipes: Callable[[], tuple[int, int]],
) -> None:
    """A bare Ring in owner mode dropped (or closed) with an operation in
    flight: cancelled, then released; its callback is never called."""
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        for close in (False, True):
            gc.collect()
            fds = _fds()
            r, w = pipes()
            ring = uring.Ring(8, eventfd=efd)
            buf = bytearray(4)
            addr, pin = pin_buffer(buf) or (0, None)
            called: list[int] = []

            def on_done(res: int, pin: object = pin, called: list[int] = called) -> None:
                called.append(res)

            assert ring.submit(uring.OP_READ, r, 2**64 - 1, addr, 4, 0, on_done)
            del pin
            if close:
                ring.close()
            del ring
            gc.collect()
            assert _fds() <= fds + 2
            assert not uring._abandoned
            os.write(w, b"abcd")
            assert os.read(r, 10) == b"abcd"
            assert called == []
            assert buf == bytes(4)
    finally:
        os.close(efd)


@needs_ring
def test_an_abandoned_ring_keeps_the_buffers_until_the_kernel_is_done(
    pipes: Callable[[], tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the kernel does not give back at once (here: cancels turned
    into NOPs) keeps the ring -- and the memory its callbacks pin -- until
    it comes back; the next ring made then releases it."""
    monkeypatch.setattr(uring, "OP_ASYNC_CANCEL", uring.OP_NOP)
    monkeypatch.setattr(uring, "ABANDON_WAIT", 0)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        gc.collect()
        fds = _fds()
        r, w = pipes()
        ring = uring.Ring(8, eventfd=efd)
        buf = bytearray(4)
        addr, pin = pin_buffer(buf) or (0, None)
        called: list[int] = []
        assert ring.submit(uring.OP_READ, r, 2**64 - 1, addr, 4, 0, lambda res, p=pin: None)
        del pin
        kept = weakref.ref(ring)
        del ring
        gc.collect()
        assert kept() is not None
        assert kept() in uring._abandoned
        with pytest.raises(BufferError):
            buf.extend(b"x")  # still pinned: the kernel may write into it
        os.write(w, b"wxyz")
        # (Reaped without waiting when the next ring is made.)
        wait_until(lambda: (uring.Ring(8, eventfd=efd).close(), kept() is None)[1])
        assert not uring._abandoned
        assert buf == b"wxyz"  # the read the kernel did, into memory still held
        buf.extend(b"!")  # let go
        assert called == []
        gc.collect()
        assert _fds() <= fds + 2
    finally:
        os.close(efd)


@needs_ring
def test_reaper_rings_dropped_without_close_end_their_threads() -> None:
    """A bare Ring in reaper mode dropped without close(): its reaper
    thread held it (the thread's target was a bound method), so every one
    kept a thread and three descriptors for good.  Now the thread holds it
    weakly while asleep; the ring's finalizer hands it back to the thread,
    which finishes what is in flight (its callbacks run there, as ever)
    and releases it."""
    gc.collect()
    fds, threads = _fds(), threading.active_count()
    called: list[int] = []
    for i in range(100):
        ring = uring.Ring(8)
        if i % 2:
            assert ring.submit(uring.OP_NOP, -1, 0, 0, 0, 0, called.append)
        del ring
    _until_back(fds, threads)
    assert called == [0] * 50


@needs_ring
def test_a_kick_under_way_keeps_the_ring_fd_until_it_is_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """close() publishes its STOP, then kicks it outside the lock; another
    thread's flush (its take counts every published SQE) sent the STOP
    first, the reaper reaped it and released the ring -- closing the fd --
    and close()'s kick then entered a closed fd number (EBADF, or another
    file's by then).  The fd now stays open until the last kick is done."""
    ring = uring.Ring(8)
    real = ring._enter
    armed = [True]

    def enter(*args: object) -> int:
        if armed[0] and threading.current_thread() is threading.main_thread():
            armed[0] = False  # close()'s kick, taken, not sent yet: another thread sends it
            other = threading.Thread(target=ring.flush)
            other.start()
            other.join()
            assert ring.join(10)  # the reaper reaped the STOP and released the ring
        result: int = real(*args)
        return result

    ring._enter = enter  # type: ignore[method-assign]
    fds = _fds()
    with caplog.at_level("ERROR", logger="threadlets.uring"):
        ring.close()
    assert not armed[0]
    assert not [r for r in caplog.records if "io_uring_enter" in r.getMessage()]
    assert _fds() < fds  # (closed after the kick)


@needs_ring
def test_a_wait_never_enters_the_fd_of_a_ring_released_under_it() -> None:
    """Ring.wait() looked at the ring, then called ready(), then slept in
    io_uring_enter on the ring's fd: a release in between (here by ready()
    itself; or the owner's close in another thread) had it enter a closed
    fd number -- by then maybe another ring's, whose completions it would
    wait for."""
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        ring = uring.Ring(8, eventfd=efd)
        real = ring._enter
        entered: list[bool] = []

        def enter(*args: object) -> int:
            entered.append(ring._released)
            result: int = real(*args)
            return result

        ring._enter = enter  # type: ignore[method-assign]

        def ready() -> bool:
            ring.close()  # (owner mode, nothing in flight: released at once)
            return False

        ring.wait(0.01, ready)
        assert ring._released
        assert True not in entered
    finally:
        os.close(efd)


@pytest.mark.usefixtures("young_gc")
@needs_ring
def test_an_open_that_comes_back_to_an_abandoned_ring_is_closed(tmp_path: Path) -> None:
    """An OPENAT that completed (or could not be cancelled: one under way)
    when its ring was given up on: the fd it opened is nobody's, and is
    closed, not leaked with the callback that is not called."""
    target = tmp_path / "file"
    target.write_bytes(b"x")
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        for _ in range(20):
            ring = uring.Ring(8, eventfd=efd)
            if uring.OP_OPENAT not in ring.supported:
                pytest.skip("no IORING_OP_OPENAT here")
            path = ctypes.create_string_buffer(bytes(target))
            opened: list[int] = []
            assert ring.submit(
                uring.OP_OPENAT, uring.AT_FDCWD, 0, ctypes.addressof(path), 0,
                os.O_RDONLY | os.O_CLOEXEC, lambda res, p=path, o=opened: o.append(res),
            )  # fmt: skip
            del path
            kept = weakref.ref(ring)
            del ring
            gc.collect()
            wait_until(lambda: (uring.Ring(8, eventfd=efd).close(), kept() is None)[1])  # noqa: B023
            assert opened == []
            assert not [fd for fd in os.listdir("/proc/self/fd") if _names(fd, target)]
    finally:
        os.close(efd)


def _names(fd: str, path: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == str(path)
    except OSError:
        return False


# -- 3. Ctrl-C as a call returns, inside the constructors ----------------------------------


@pytest.mark.usefixtures("young_gc")
@pytest.mark.parametrize("deliver", [True, False])
def test_ctrl_c_as_any_call_returns_in_a_context_construction_leaks_nothing(
    backend: str, deliver: bool
) -> None:
    """Ctrl-C landing as os.eventfd() or io_uring_setup returned, before
    the fd was stored, leaked it; now each is stored by the call that made
    it.  Every other point leaves nothing behind either."""
    from threadlets import engine

    codes = {
        AioContext.__init__.__code__,
        engine._CompletionQueue.__init__.__code__,
        engine._Notifier.__init__.__code__,
        uring.Ring.__init__.__code__,
    }
    AioContext(backend=backend, deliver=deliver).close()  # (warm: imports, probes)
    gc.collect()
    fds, threads = _fds(), threading.active_count()
    n = 0
    while True:
        n += 1
        assert n < 500
        points = interrupt_after_call(
            n, codes, lambda: AioContext(backend=backend, deliver=deliver).close()
        )
        _until_back(fds, threads)
        if points < n:
            break
    assert n > 5


@pytest.mark.usefixtures("young_gc")
@pytest.mark.parametrize("deliver", [True, False])
def test_ctrl_c_as_any_call_returns_in_close_leaks_nothing(
    backend: str, deliver: bool, path: Path
) -> None:
    """Ctrl-C at any call return (or Python function entry: the same
    point, seen from the caller) inside close(): the next close() finishes
    it.  A reaper-mode ring's close() cut short as it entered _take() left
    its STOP published but not sent: the reaper slept for good, every later
    close() returned False and the ring's fds and thread stayed."""
    from threadlets import engine

    codes = {
        AioContext.close.__code__,
        AioContext._release_now.__code__,
        AioContext._join_reaper.__code__,
        engine._release.__code__,
        engine._Notifier.close.__code__,
        engine._Notifier._close_fds.__code__,
        uring.Ring.close.__code__,
        uring.Ring._release.__code__,
        uring.Ring.join.__code__,
    }
    fd = os.open(path, os.O_RDONLY)
    try:
        AioContext(backend=backend, deliver=deliver).close()  # (warm)
        gc.collect()
        fds, threads = _fds(), threading.active_count()
        n = 0
        while True:
            n += 1
            assert n < 500
            ctx = AioContext(backend=backend, deliver=deliver, inline=False)
            assert ctx.read(fd, 0, bytearray(16)).wait(timeout=10)
            points = interrupt_after_call(n, codes, ctx.close)
            assert ctx.close(timeout=10), f"interrupted at point {n}"
            del ctx
            # (The default queue's workers come and go: the reapers' count.)
            _until_back(fds, threads if backend == "io_uring" else None)
            if points < n:
                break
    finally:
        os.close(fd)


# -- 2. loops ---------------------------------------------------------------------------


def _ours() -> dict[str, int]:
    """How many of the engine's objects are alive, by type."""
    gc.collect()
    kinds = ("AioContext", "AioRequest", "Ring", "_Notifier", "_CompletionQueue", "ThreadletQueue")
    counts = dict.fromkeys(kinds, 0)
    for o in gc.get_objects():
        name = type(o).__name__
        if name in counts:
            counts[name] += 1
    return counts


def _no_growth(cycle: Callable[[int], object], n: int) -> None:
    """``cycle(i)`` n times: no descriptor, thread or engine object is left
    behind, and the memory traced does not grow with the cycles.  (A
    quarter as many cycles first, traced, warm the caches -- the
    interpreter's free lists fill up with blocks allocated under tracing;
    then the least growth of three runs of a quarter of n each counts: a
    leak shows in every one, the noise of a long test session does not.)"""
    quarter = max(n // 4, 1)
    tracemalloc.start()
    try:
        for i in range(quarter):
            cycle(i)
        gc.collect()
        fds, threads, objects = _fds(), threading.active_count(), _ours()
        grown = []
        for _ in range(3):
            before = tracemalloc.get_traced_memory()[0]
            for i in range(quarter):
                cycle(i)
            gc.collect()
            grown.append(tracemalloc.get_traced_memory()[0] - before)
        _until_back(fds, threads)
    finally:
        tracemalloc.stop()
    # No more of each than after the warm-up (which may have caught one of
    # its own on its way out: a ring whose reaper is still letting go).
    now = _ours()
    assert all(now[k] <= objects[k] for k in now), (now, objects)
    # (Above the noise; a leak of one object with a dict a cycle is 100
    # bytes or more.)
    assert min(grown) < max(64 * quarter, 8192), grown


@pytest.mark.usefixtures("young_gc")
@pytest.mark.parametrize("how", ["in-flight", "timeout-0", "ctrl-c"])
def test_close_cycles_leak_nothing(backend: str, how: str, path: Path) -> None:
    """Contexts closed with a request in flight (a pipe's read, its data
    written meanwhile), after close(timeout=0) refused, or with Ctrl-C at
    every C-call return of close(): nothing stays behind."""
    fd = os.open(path, os.O_RDONLY)

    def cycle(i: int) -> None:
        ctx = AioContext(backend=backend, inline=False, deliver=i % 2 == 0)
        if how == "ctrl-c":
            assert ctx.read(fd, 0, bytearray(16)).wait(timeout=10)
            call_interrupted_at(i % 40 + 1, ctx.close)
            assert ctx.close(timeout=10)
            return
        r, w = os.pipe()
        try:
            req = ctx.read(r, 0, bytearray(16))
            if how == "timeout-0":
                assert not ctx.close(timeout=0)
            os.write(w, b"x" * 16)
            assert ctx.close(timeout=10)
            assert req.result() == 16
        finally:
            os.close(r)
            os.close(w)

    try:
        _no_growth(cycle, 200)
    finally:
        os.close(fd)


@pytest.mark.usefixtures("young_gc")
def test_asyncio_run_and_open_cycles_leak_nothing(backend: str, path: Path) -> None:
    async def main() -> None:
        async with threadlets.open(path, "rb") as f:
            assert await f.read(100) == path.read_bytes()[:100]

    aw.configure(backend=backend)
    try:
        _no_growth(lambda i: asyncio.run(main()), 100)
    finally:
        aw.configure()


@pytest.mark.usefixtures("young_gc")
def test_abandoned_queues_with_min_threads_and_rings_leak_nothing() -> None:
    def queue(i: int) -> None:
        q = ThreadletQueue(min_threads=2, max_threads=4)
        assert q.submit(int, 1).result(timeout=10) == 1

    _no_growth(queue, 50)
    if HAVE_RING:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            _no_growth(lambda i: uring.Ring(8, eventfd=efd).close(), 200)
            _no_growth(lambda i: uring.Ring(8, eventfd=efd), 200)
            _no_growth(lambda i: uring.Ring(8).close(), 100)
        finally:
            os.close(efd)


# -- oneshot: read_bytes of a FIFO whose hand-over is refused --------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    if oneshot._openat2 is None:
        pytest.skip("no openat2(RESOLVE_CACHED) here: nothing is opened inline")
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return p


@pytest.mark.anyio
@pytest.mark.parametrize("refusal", ["queue-closed", "emfile"])
async def test_read_bytes_refused_after_the_inline_open_closes_what_it_opened(
    anyio_backend: object, fifo: Path, refusal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_bytes() of a FIFO opens it on the loop, then hands the
    descriptor (and a wake-up pipe) to a worker.  If the hand-over was
    refused -- the queue closed (RuntimeError), the wake-up pipe refused
    (EMFILE) -- the descriptor, and the pipe, leaked."""
    queue = ThreadletQueue(max_threads=1)
    if refusal == "queue-closed":
        queue.close()
        expected: type[BaseException] = RuntimeError
    else:

        def pipe2(flags: int) -> tuple[int, int]:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        monkeypatch.setattr(os, "pipe2", pipe2)
        expected = OSError
    aw.configure(queue=queue, backend="threads")
    try:
        aw.current()  # (the loop's own context and eventfd, made now)
        gc.collect()
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(expected):
            await oneshot.read_bytes(fifo)
        gc.collect()
        assert set(os.listdir("/proc/self/fd")) <= before
    finally:
        aw.configure()
        queue.close(timeout=10)
