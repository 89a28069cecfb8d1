"""The paio engine: I/O requests, completion contexts, cancel and drain.

This module owns :class:`AioContext` (the owner of a set of requests and of
the eventfd that says some of them finished) and :class:`AioRequest` (one
I/O request).  What a request does to the file lives in :mod:`threadlets.ops`;
what runs it is the *backend*'s business: the thread pool
(:mod:`threadlets.pool`), or the kernel's io_uring (:mod:`threadlets.uring`)
for the reads and writes it can take, with the pool for everything else.
The interface is the same for both.

Life of a request
=================

A request is a :class:`~threadlets.pool.Threadlet` whose work is an
operation from :mod:`threadlets.ops`, so its states and its cancel are the
pool's: QUEUED -> RUNNING -> DONE, or QUEUED -> CANCELLED, every transition
under the queue's lock.  Two things are added:

* **Inline fast path.**  A read first tries ``preadv(..., RWF_NOWAIT)`` in
  the submitting thread: if the data is in the page cache the request is
  DONE before ``read()`` returns, without a thread hop.  What would block
  (or came up short) goes to a worker, which resumes where the inline
  attempt stopped.  Writes do the same where the file system takes
  ``RWF_NOWAIT`` writes (EOPNOTSUPP turns it off for that file).
* **The io_uring backend** (``backend="io_uring"``, or ``"auto"``: where
  it can be set up).  A single-buffer read or write that did not finish
  inline goes to the ring and is RUNNING from then on: the kernel may start
  it at once, so cancel answers NOTCANCELED.  A full transfer finishes it;
  anything else -- short, EOF, an error, an alignment the ring was not given
  -- goes to a worker that repeats the call from where the kernel stopped,
  so every rule of :mod:`threadlets.ops` (EINTR, zero-fill, bounce buffers,
  the errno reported) still has the last word.  Vectored requests, O_APPEND
  writes, flushes and the rest run on the pool.  A delivering context reaps
  the ring in its owner's thread, woken by the kernel through the same
  eventfd; requests then finish when the owner processes completions or
  someone waits on them.  A context with ``deliver=False`` has a reaper
  thread instead, so its requests finish on their own.
* **Completion through the context.**  When a request finishes (in a worker,
  inline, or by cancel) it is appended to the context's completed list, and
  the first completion of a batch writes the eventfd once.  The owner
  thread (an event loop watching :meth:`AioContext.fileno`, or a caller of
  :meth:`AioContext.wait`) calls :meth:`AioContext.process_completions`,
  which runs each request's callback exactly once, in that thread.  No
  callback ever runs inside a submit or inside ``cancel()``.

Ordering that matters: the eventfd is cleared *before* the completed list is
taken, and ``_signalled`` is reset in the same critical section that takes
the list.  A completion that arrives after the list was taken therefore
finds ``_signalled`` false and writes the eventfd again: no wakeup is lost,
and a spurious one only costs an empty pass.  With a ring in owner mode the
kernel also writes the eventfd, so the order is: clear, reap, take the list
(and never clear again in that pass): a completion posted after the reap
leaves the eventfd readable.

Who touches what: ``_completed``, ``_signalled``, ``_processed`` and the
wakeup counters are protected by the context's ``_lock``; the submission
counters are ``itertools.count`` objects (one atomic C call each); ``_files`` is touched
only by submitting threads (dict operations on it are single bytecodes).
A request's callback and ``_processed`` flag belong to the thread that runs
:meth:`process_completions`.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from threadlets import ops, uring
from threadlets.ops import MAX_OFFSET, AioFile
from threadlets.pool import (
    CancelResult,
    Threadlet,
    ThreadletQueue,
    ThreadletState,
    _check_timeout,
    _invoke_callback,
)
from threadlets.probe import RWF_NOWAIT, pin_buffer
from threadlets.syscalls import Syscalls
from threadlets.uring import Ring, RingUnavailable

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["AioContext", "AioRequest", "ContextStats", "io_queue"]

log = logging.getLogger("threadlets")

_QUEUED = ThreadletState.QUEUED
_RUNNING = ThreadletState.RUNNING
_DONE = ThreadletState.DONE
_CANCELLED = ThreadletState.CANCELLED

Callback = Callable[["AioRequest"], object]

#: Below this, offset + any buffer length cannot pass MAX_OFFSET.
_MAX_IO_OFFSET = MAX_OFFSET - (1 << 40)


#: What runs requests that do not finish inline: a thread pool, the kernel's
#: io_uring, or io_uring where it can be set up and the pool elsewhere.
BACKENDS = ("threads", "io_uring", "auto")
#: Submission slots of a context's ring: more in flight go to the threads.
RING_ENTRIES = 256

_io_queue_lock = threading.Lock()
_io_queue: ThreadletQueue | None = None


def io_queue() -> ThreadletQueue:
    """The queue that contexts made without one share: the elastic pool,
    capped at 4 threads per CPU (at most 64).

    Each request costs some Python work under the GIL, so past a few
    threads per CPU more threads only contend for it: measured on 2 CPUs,
    O_DIRECT reads at depth 32 ran 21k ops/s with 8 threads and 14k with
    32 (docs/benchmarks.md).  A context for slow, high-latency storage can
    be given a larger queue of its own.
    """
    global _io_queue
    with _io_queue_lock:
        if _io_queue is None or _io_queue.closed:
            cap = min(64, 4 * (os.cpu_count() or 1))
            _io_queue = ThreadletQueue(max_threads=cap, name="threadlets-io")
        return _io_queue


def _reset_io_queue_lock() -> None:
    global _io_queue_lock
    _io_queue_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_io_queue_lock)


class AioRequest(Threadlet[int]):
    """One I/O request.  Made by the methods of :class:`AioContext`.

    ``state`` and ``cancel()`` are those of a threadlet.  When finished,
    ``error`` is 0 or the errno, and ``result()`` the byte count (0 for
    requests that move no data; an ioctl's return value) or raises the
    OSError.  ``callback(request)`` runs once, from
    :meth:`AioContext.process_completions` in the context's thread.
    """

    __slots__ = ("_ctx", "_on_ring", "_processed", "callback", "kind")

    def __init__(
        self,
        ctx: AioContext,
        kind: str,
        fn: Callable[..., int] | None,
        args: tuple[Any, ...],
        callback: Callback | None,
    ) -> None:
        # Threadlet.__init__ spelled out: this runs once per request.
        self._queue = ctx._queue
        self._fn = fn
        self._args = args
        self._kwargs = None
        self._state = _QUEUED
        self._result = None
        self._exception = None
        self._waiters = None
        self._callbacks = None
        self._ctx = ctx
        self.kind = kind
        self.callback = callback
        #: Set by process_completions once the callback ran (or would have).
        self._processed = False
        #: In the kernel's hands (io_uring backend), until it completes there.
        self._on_ring = False

    def __repr__(self) -> str:
        return f"<AioRequest {self.kind} {self._state.value}>"

    @property
    def error(self) -> int:
        """EINPROGRESS until finished; then 0, ECANCELED, or the errno."""
        return self.outcome()[0]

    def outcome(self) -> tuple[int, int]:
        """(error, value), read together: (EINPROGRESS, -1) until finished,
        then (0, the result) or (the errno, -1) -- aio_error and aio_return
        in one call."""
        with self._queue._lock:
            state = self._state
            exc = self._exception
            result = self._result
        if state is _QUEUED or state is _RUNNING:
            return errno.EINPROGRESS, -1
        if state is _CANCELLED:
            return errno.ECANCELED, -1
        if exc is None:
            assert result is not None
            return 0, result
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno, -1
        return errno.EIO, -1

    def wait(self, timeout: float | None = None) -> bool:
        ring = self._ctx._ring
        # (DONE is final: no lock needed.)  A ring that is not usable (closed,
        # or the parent's after a fork) has nothing to reap for this thread.
        if ring is None or self._state is _DONE or not ring.usable:
            return Threadlet.wait(self, timeout)
        # Called from a completion callback, this thread may hold the ring's
        # plug with the request still held back: send it first.
        ring.flush()
        if not ring.owner_mode:
            return Threadlet.wait(self, timeout)
        # Owner mode: nobody else may be reaping, so reap while waiting.
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ring.reap()
            if Threadlet.wait(self, 0):
                return True
            remaining = _time_left(deadline)
            if remaining is not None and remaining <= 0:
                return False
            if not self._on_ring:  # finishing on a worker: an ordinary wait
                return Threadlet.wait(self, remaining)
            ring.wait(remaining)

    def _finished(self) -> None:
        if self._waiters or self._callbacks:
            Threadlet._finished(self)
        self._ctx._complete(self)

    # -- made finished without a worker -----------------------------------------

    def _set_inline(self, result: int | None, exc: BaseException | None) -> None:
        # Nobody else has seen this request yet: no lock needed to finish it.
        self._result = result
        self._exception = exc
        self._state = _DONE


@dataclass(frozen=True, slots=True)
class ContextStats:
    """Counters of one context.  ``wakeups`` counts eventfd writes: one per
    batch of completions, not one per request."""

    submitted: int
    inline: int
    threaded: int
    ring: int
    processed: int
    outstanding: int
    wakeups: int
    batches: int


class _Notifier:
    """An eventfd (a pipe where there is none): readable while signalled."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self._rfd = self._wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._eventfd = True
        else:  # pragma: no cover - not Linux
            self._rfd, self._wfd = os.pipe()
            os.set_blocking(self._rfd, False)
            os.set_blocking(self._wfd, False)
            self._eventfd = False
        self._poll = select.poll()
        self._poll.register(self._rfd, select.POLLIN)

    def fileno(self) -> int:
        return self._rfd

    def signal(self) -> None:
        try:
            if self._eventfd:
                os.eventfd_write(self._wfd, 1)
            else:  # pragma: no cover
                os.write(self._wfd, b"\0")
        except BlockingIOError:  # pragma: no cover - counter or pipe full: still readable
            pass

    def clear(self) -> None:
        try:
            if self._eventfd:
                os.eventfd_read(self._rfd)
            else:  # pragma: no cover
                while os.read(self._rfd, 4096):
                    pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float | None) -> bool:
        """Block until signalled or ``timeout`` seconds passed."""
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        return bool(self._poll.poll(ms))

    def close(self) -> None:
        os.close(self._rfd)
        if self._wfd != self._rfd:  # pragma: no cover
            os.close(self._wfd)


def _nonnegative(value: object, name: str) -> int:
    """An int argument that must be >= 0 (bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    return value


def _check_fd(fd: object) -> int:
    return _nonnegative(fd, "fd")


def _check_range(offset: object, length: object, what: str = "length") -> tuple[int, int]:
    start = _nonnegative(offset, "offset")
    count = _nonnegative(length, what)
    if start + count > MAX_OFFSET:
        raise ValueError(
            f"offset {start} + {what} {count} is past the largest file offset ({MAX_OFFSET})"
        )
    return start, count


def _views(buffers: object, writable: bool) -> tuple[list[memoryview], int]:
    """One buffer or a list/tuple of them, as flat byte memoryviews."""
    items = buffers if isinstance(buffers, (list, tuple)) else (buffers,)
    views: list[memoryview] = []
    total = 0
    for b in items:
        try:
            mv = memoryview(b)
        except TypeError:
            raise TypeError(
                f"expected a buffer (bytes-like object), not {type(b).__name__}"
            ) from None
        if writable and mv.readonly:
            raise TypeError(f"cannot read into a read-only buffer ({type(b).__name__})")
        if mv.format != "B" or mv.ndim != 1:
            if not mv.c_contiguous:
                raise ValueError("buffers must be C-contiguous")
            mv = mv.cast("B")
        views.append(mv)
        total += mv.nbytes
    return views, total


class AioContext:
    """The owner of a set of I/O requests and of their completions.

    Requests run on ``queue`` (default: :func:`io_queue`); several
    contexts can share one queue and never see each other's completions.
    ``fileno()`` becomes readable when requests finished; the owner then
    calls :meth:`process_completions`.  ``inline=False`` turns the
    ``RWF_NOWAIT`` fast path off.  ``syscalls`` replaces the system calls
    (fault injection).

    ``backend`` is what runs requests that do not finish inline:
    ``"threads"`` (the pool, the default), ``"io_uring"`` (the kernel's ring
    for single-buffer reads and writes, the pool for the rest; raises
    :class:`~threadlets.uring.RingUnavailable`, an OSError, where it cannot
    be set up) or ``"auto"`` (io_uring where possible).  The attribute
    ``backend`` says which one the context got.  Fault injection
    (``syscalls=``) needs the threads.

    ``deliver=False`` makes a context that delivers nothing: finished
    requests are not queued for :meth:`process_completions` and per-request
    ``callback=`` is refused.  Its users follow each request through the
    request itself (``wait()``, ``add_done_callback()``, which runs in the
    thread that finishes it), as :mod:`threadlets.posix` does.

    File state (O_DIRECT alignment, sticky flush errors, what the file does
    not support) is kept per fd.  If you close an fd and open another file
    on the same number, call :meth:`forget` first.
    """

    def __init__(
        self,
        queue: ThreadletQueue | None = None,
        *,
        inline: bool = True,
        syscalls: Syscalls | None = None,
        deliver: bool = True,
        backend: str = "threads",
    ) -> None:
        if queue is not None and not isinstance(queue, ThreadletQueue):
            raise TypeError(f"queue must be a ThreadletQueue, not {type(queue).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self._queue = queue if queue is not None else io_queue()
        self._sc = syscalls if syscalls is not None else Syscalls()
        self.inline = bool(inline) and bool(RWF_NOWAIT)
        self._deliver = bool(deliver)
        if backend == "io_uring" and type(self._sc) is not Syscalls:
            raise ValueError("syscalls= (fault injection) needs the threads backend")
        self._notifier = _Notifier()
        self._ring: Ring | None = None
        if backend != "threads" and type(self._sc) is Syscalls:
            try:
                # A delivering context reaps in its owner's thread, woken by
                # the kernel through the eventfd; otherwise a reaper thread
                # finishes requests (see threadlets.uring).
                efd = self._notifier.fileno() if self._deliver else None
                self._ring = Ring(RING_ENTRIES, eventfd=efd)
            except RingUnavailable:
                if backend == "io_uring":
                    self._notifier.close()
                    raise
        #: "io_uring" or "threads": what runs requests that do not finish inline.
        self.backend = "threads" if self._ring is None else "io_uring"
        # The eventfd (and ring) close with the context, or when it is collected.
        self._finalizer = weakref.finalize(self, _release, self._notifier, self._ring)
        self._files: dict[int, AioFile] = {}
        self._preadv = os.preadv if type(self._sc) is Syscalls else self._sc.preadv
        # Submission counters are itertools.count objects: next() is one C
        # call, atomic under the GIL, so the submit path takes no lock of
        # ours.  They only count; no state depends on them but drain's
        # "nothing outstanding" (tracked - processed), read by the owner.
        self._n_unseen = itertools.count()  # finished inline, no callback
        self._n_inline = itertools.count()  # finished inline, with a callback
        self._n_tracked = itertools.count()  # all that reach the completed list
        self._n_ring = itertools.count()  # of those, submitted to the ring
        self._lock = threading.Lock()
        # Protected by _lock:
        self._completed: list[AioRequest] = []
        self._signalled = False
        self._closed = False
        self._processed = 0
        self._wakeups = 0
        self._batches = 0

    def __repr__(self) -> str:
        return f"<AioContext fd={self._notifier.fileno()} outstanding={self._outstanding()}>"

    def __enter__(self) -> AioContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def queue(self) -> ThreadletQueue:
        return self._queue

    def fileno(self) -> int:
        """The eventfd: readable when completions wait to be processed."""
        return self._notifier.fileno()

    def call_after_batch(self, fn: Callable[[], object]) -> bool:
        """For a request's done-callback: if this thread is delivering a
        batch of io_uring completions, run ``fn`` once after the whole batch
        and return True; otherwise return False (the caller runs it now).
        Lets a front end wake its waiters once per batch, not per request."""
        return self._ring is not None and uring.call_after_batch(fn)

    def hold_submissions(self, schedule: Callable[[Callable[[], None]], object]) -> bool:
        """For an event loop that owns this context: from now on, what this
        thread submits to the io_uring backend is held back and sent in one
        ``io_uring_enter`` by a flush that ``schedule(flush)`` arranges
        (pass ``loop.call_soon``), so a loop iteration's worth of requests
        costs one system call.  Blocking waits flush first.  False (nothing
        changes) without a ring in owner mode."""
        ring = self._ring
        if ring is None or not ring.owner_mode:
            return False
        flush = ring.flush
        return ring.hold(lambda: schedule(flush))

    def forget(self, fd: int) -> None:
        """Drop what the context remembers about ``fd`` (call before the
        number is reused for another file)."""
        self._files.pop(fd, None)

    # -- submission ---------------------------------------------------------------

    def _file(self, fd: int) -> AioFile | OSError:
        f = self._files.get(fd)
        if f is None:
            try:
                f = AioFile.from_fd(self._sc, fd)
            except OSError as e:
                return e
            if not self.inline:
                f.nowait_reads = f.nowait_writes = False
            self._files[fd] = f
        return f

    def _start(self, req: AioRequest) -> AioRequest:
        """Deliver a request finished inline, or hand one to the backend:
        the ring for the reads and writes it takes, else the pool."""
        if self._closed:
            raise RuntimeError("the AioContext is closed")
        if req.callback is not None and not self._deliver:
            raise ValueError("this AioContext does not deliver completions: no callback=")
        if req._state is _DONE:
            next(self._n_inline)
            next(self._n_tracked)
            self._complete(req)
        elif (
            self._ring is not None
            and (req._fn is ops.read or req._fn is ops.write)  # (identity: any callable may come)
            and self._ring_submit(req)
        ):
            next(self._n_tracked)
            next(self._n_ring)
        else:
            self._queue._submit(req)
            next(self._n_tracked)
        return req

    def _ring_submit(self, req: AioRequest) -> bool:
        """Hand an ops.read or ops.write request to the ring, RUNNING from
        now on (the kernel may start it at once: it cannot be cancelled).
        False if the ring does not take it; then it goes to the threads.

        Its arguments say everything: ``(sc, f, views, offset, total, ...,
        done)``, ``done`` being what the inline attempt already moved."""
        fn = req._fn
        assert fn is not None
        args = req._args
        f: AioFile = args[1]
        views, offset, total, done = args[2], args[3], args[4], args[-1]
        if len(views) != 1 or total == done or (f.append and fn is ops.write):
            return False  # vectored; nothing left; or the kernel picks the offset
        pinned = pin_buffer(views[0])
        if pinned is None:
            return False
        addr, pin = pinned
        addr += done
        length = total - done
        pos = offset + done
        if f.direct:
            try:
                request_align, buffer_align = f.alignment(self._sc)
            except OSError:
                return False  # the worker repeats the probe and reports the error
            if pos % request_align or length % request_align or addr % buffer_align:
                return False  # the threads' bounce buffer handles it
        req._state = _RUNNING
        req._on_ring = True
        ring = self._ring
        assert ring is not None
        # The callback holds `pin` until the kernel is done with the memory.
        if not ring.submit(
            uring.OP_READ if fn is ops.read else uring.OP_WRITE,
            f.fd,
            pos,
            addr,
            length,
            0,
            lambda res: self._ring_done(req, res, length, pin),
        ):
            req._state = _QUEUED
            req._on_ring = False
            return False
        return True

    def _ring_done(self, req: AioRequest, res: int, length: int, pin: object) -> None:
        """A ring completion (in the thread that reaped it).  A full transfer
        finishes the request; anything else -- short, an error, EOF, EINTR,
        an alignment the probe did not foresee -- goes to a worker, which
        repeats the call from where the kernel stopped and has the last
        word, with all of :mod:`threadlets.ops`'s rules."""
        req._on_ring = False
        if res == length:
            args = req._args
            with req._queue._lock:
                req._result = args[4]  # the request's total
                req._state = _DONE
            req._finished()
            return
        args = req._args
        if res > 0:
            args = (*args[:-1], args[-1] + res)  # the last argument is `done`
        fn = req._fn
        assert fn is not None
        try:
            self._queue.submit(_finish_elsewhere, req, fn, args)
        except RuntimeError:  # the queue was closed under us: finish it here
            _finish_elsewhere(req, fn, args)
        ring = self._ring
        if ring is not None and ring.owner_mode:
            # A waiter in ring.wait() for this request must look again.
            ring.submit(uring.OP_NOP, -1, 0, 0, 0, 0, _ignore)

    def _outstanding(self) -> int:
        with self._lock:
            processed = self._processed
        return _count(self._n_tracked) - processed

    def _prepare(
        self, fd: object, offset: object, buffers: object, writable: bool
    ) -> tuple[AioFile | OSError, list[memoryview], int]:
        """Check a read's or write's arguments (raising for bad ones) and
        find its file (or the OSError that looking it up gave)."""
        if self._closed:
            raise RuntimeError("the AioContext is closed")
        f = self._file(_check_fd(fd))
        views, total = _views(buffers, writable=writable)
        _check_range(offset, total)
        return f, views, total

    def _fail_now(self, kind: str, exc: OSError, callback: Callback | None) -> AioRequest:
        req = AioRequest(self, kind, None, (), callback)
        req._set_inline(None, exc)
        return self._start(req)

    def inline_reader(self, fd: int) -> Callable[[bytearray, int], int] | None:
        """The inline fast path alone, bound to one descriptor, for front
        ends that read one file many times.

        Returns ``read_inline(buffer, offset) -> int``, which reads into the
        bytearray ``buffer`` in the calling thread if the data is in the page
        cache and returns the count (short only at end of file), or -1 if the
        read would block, failed or came up short -- then submit it with
        :meth:`read`, which reports what went wrong.  Nothing is queued and
        no request object is made.  Returns None if reads of ``fd`` never
        go inline here (inline path off, or ``fd`` is not a usable file).
        Valid until :meth:`forget` of ``fd`` or :meth:`close`.
        """
        f = self._file(_check_fd(fd))
        if isinstance(f, OSError) or not f.nowait_reads:
            return None
        preadv, unseen = self._preadv, self._n_unseen

        def read_inline(buffer: bytearray, offset: int) -> int:
            if not f.nowait_reads or type(offset) is not int or not 0 <= offset <= _MAX_IO_OFFSET:
                return -1
            try:
                n = preadv(fd, (buffer,), offset, RWF_NOWAIT)
            except OSError:
                return -1  # would block, or an error for read() to report
            if n == len(buffer) or not n:
                next(unseen)
                return n
            return -1

        return read_inline

    def read(
        self,
        fd: int,
        offset: int,
        buffers: WriteableBuffer | Sequence[WriteableBuffer],
        *,
        zero_fill: bool = False,
        callback: Callback | None = None,
    ) -> AioRequest:
        """Read into one buffer or a list of them (vectored), from ``offset``.

        The result is the byte count, short only at end of file; with
        ``zero_fill`` the rest is zero-filled and the full length reported.
        """
        # The common case first, in as few steps as possible: an fd this
        # context knows, a sane offset, one flat writable buffer.
        f = self._files.get(fd)
        t = type(buffers)
        views: list[Any]
        if (
            f is not None
            and type(offset) is int
            and 0 <= offset <= _MAX_IO_OFFSET
            and type(fd) is int
            and (  # (a closed context has no files, so no fast path)
                t is bytearray
                or (
                    t is memoryview
                    and buffers.ndim == 1  # type: ignore[union-attr]
                    and buffers.format == "B"  # type: ignore[union-attr]
                    and not buffers.readonly  # type: ignore[union-attr]
                )
            )
        ):
            views = [buffers]
            total = len(buffers)  # type: ignore[arg-type]
        else:
            ff, views, total = self._prepare(fd, offset, buffers, writable=True)
            if isinstance(ff, OSError):
                return self._fail_now("read", ff, callback)
            f = ff
        done = 0
        if f.nowait_reads and total:
            try:
                done = self._preadv(fd, views, offset, RWF_NOWAIT)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ESPIPE):
                    f.nowait_reads = False
                # Anything else: the worker repeats the call and reports it.
            else:
                if done == total or not done:
                    if zero_fill and done < total:
                        ops._zero([memoryview(v) for v in views], done)
                        done = total
                    if callback is None:
                        # Nothing to deliver: finished before anyone saw it.
                        next(self._n_unseen)
                        d = _new_object(_InlineDone)  # no __init__ frame: see the class
                        d._ctx = self
                        d._result = done
                        return d
                    req = AioRequest(self, "read", None, (), callback)
                    req._set_inline(done, None)
                    return self._start(req)
        if views and type(views[0]) is bytearray:  # the fast path's: ops slices views
            views = [memoryview(views[0])]
        args = (self._sc, f, views, offset, total, zero_fill, done)
        return self._start(AioRequest(self, "read", ops.read, args, callback))

    def write(
        self,
        fd: int,
        offset: int,
        buffers: ReadableBuffer | Sequence[ReadableBuffer],
        *,
        callback: Callback | None = None,
    ) -> AioRequest:
        """Write one buffer or a list of them (vectored), at ``offset``.

        The buffers must not change until the request finished.
        """
        f, views, total = self._prepare(fd, offset, buffers, writable=False)
        if isinstance(f, OSError):
            return self._fail_now("write", f, callback)
        done = 0
        if f.nowait_writes and total:
            try:
                done = self._sc.pwritev(fd, views, offset, RWF_NOWAIT)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ESPIPE):
                    f.nowait_writes = False
            else:
                if done == total:
                    req = AioRequest(self, "write", None, (), callback)
                    req._set_inline(done, None)
                    return self._start(req)
        args = (self._sc, f, views, offset, total, done)
        return self._start(AioRequest(self, "write", ops.write, args, callback))

    def _submit_op(
        self,
        kind: str,
        fd: int,
        fn: Callable[..., int],
        args: tuple[Any, ...],
        callback: Callback | None,
    ) -> AioRequest:
        f = self._file(_check_fd(fd))
        if isinstance(f, OSError):
            return self._fail_now(kind, f, callback)
        return self._start(AioRequest(self, kind, fn, (self._sc, f, *args), callback))

    def flush(
        self, fd: int, *, datasync: bool = True, callback: Callback | None = None
    ) -> AioRequest:
        """fdatasync (or fsync with ``datasync=False``).  After a failed
        flush, later flushes of this fd fail with the same errno."""
        return self._submit_op("flush", fd, ops.flush, (bool(datasync),), callback)

    def ioctl(
        self,
        fd: int,
        request: int,
        arg: int | bytearray = 0,
        *,
        callback: Callback | None = None,
    ) -> AioRequest:
        """``fcntl.ioctl(fd, request, arg)`` on a worker.  ``arg`` is an int
        or a bytearray that the kernel reads and updates in place; the result
        is the ioctl's return value."""
        if isinstance(request, bool) or not isinstance(request, int):
            raise TypeError(f"request must be an int, not {type(request).__name__}")
        if isinstance(arg, bool) or not isinstance(arg, (int, bytearray)):
            raise TypeError(f"arg must be an int or a bytearray, not {type(arg).__name__}")
        return self._submit_op("ioctl", fd, ops.ioctl, (request, arg), callback)

    def discard(
        self, fd: int, offset: int, length: int, *, callback: Callback | None = None
    ) -> AioRequest:
        """Punch a hole: the range reads as zeros, the file size is kept."""
        _check_range(offset, length)
        return self._submit_op("discard", fd, ops.discard, (offset, length), callback)

    def write_zeroes(
        self, fd: int, offset: int, length: int, *, callback: Callback | None = None
    ) -> AioRequest:
        """Make the range read as zeros, as a write of zeros would."""
        _check_range(offset, length)
        return self._submit_op("write_zeroes", fd, ops.write_zeroes, (offset, length), callback)

    def allocate(
        self, fd: int, offset: int, length: int, *, callback: Callback | None = None
    ) -> AioRequest:
        """Allocate space for the range (fallocate mode 0)."""
        _check_range(offset, length)
        if length == 0:
            raise ValueError("length must be > 0 for allocate")
        return self._submit_op("allocate", fd, ops.allocate, (offset, length), callback)

    def truncate(self, fd: int, length: int, *, callback: Callback | None = None) -> AioRequest:
        """Set the file size."""
        _check_range(0, length)
        return self._submit_op("truncate", fd, ops.truncate, (length,), callback)

    def copy_range(
        self,
        src_fd: int,
        src_offset: int,
        dst_fd: int,
        dst_offset: int,
        length: int,
        *,
        callback: Callback | None = None,
    ) -> AioRequest:
        """copy_file_range in a loop; the result is the count copied (short
        only at the end of the source)."""
        _check_range(src_offset, length)
        _check_range(dst_offset, length)
        src = self._file(_check_fd(src_fd))
        if isinstance(src, OSError):
            return self._fail_now("copy_range", src, callback)
        return self._submit_op(
            "copy_range", dst_fd, _copy_range_args, (src, src_offset, dst_offset, length), callback
        )

    def call(
        self, fn: Callable[..., Any], /, *args: Any, callback: Callback | None = None
    ) -> AioRequest:
        """Run any blocking call (``os.open``, ``os.fstat``...) on a worker as a
        request of this context: same cancel, same completion delivery.  The
        result is whatever ``fn`` returns."""
        if not callable(fn):
            raise TypeError(f"call() needs a callable, not {type(fn).__name__}")
        return self._start(AioRequest(self, "call", fn, args, callback))

    # -- completion -------------------------------------------------------------------

    def _complete(self, req: AioRequest) -> None:
        """A request finished: queue it for process_completions and wake the
        owner, once per batch.  Any thread; never runs a callback."""
        if not self._deliver:
            with self._lock:
                self._processed += 1
            return
        with self._lock:
            self._completed.append(req)
            if self._signalled:
                return
            self._signalled = True
            self._wakeups += 1
        self._notifier.signal()

    def process_completions(self) -> int:
        """Run the callbacks of finished requests, each exactly once, in this
        thread.  Returns how many requests it processed.

        Callbacks may submit, cancel, wait for other requests, or call this
        method again.  An exception from a callback is logged, and the rest
        still run.
        """
        ring = self._ring
        if ring is None:
            return self._process()
        # What the callbacks submit, and what the ring held back for the
        # reap, reaches the kernel in one io_uring_enter when this returns.
        plugged = ring.plug()
        try:
            if ring.owner_mode and ring.usable:
                # The kernel writes the eventfd too: clear it, then reap, so
                # a completion posted after the reap leaves it readable.
                self._notifier.clear()
                with self._lock:
                    # What the reap finishes is taken by _process: no eventfd
                    # write for it (later completions write as usual).
                    self._signalled = True
                ring.reap()
                # No second clear in _process: it could swallow the wakeup
                # of a completion posted since the reap.
                return self._process(clear=False)
            return self._process()
        finally:
            if plugged:
                ring.unplug()
            else:
                ring.flush()

    def _process(self, clear: bool = True) -> int:
        with self._lock:
            signalled = self._signalled
        if signalled and clear:
            self._notifier.clear()  # before taking the list: see the module docstring
        with self._lock:
            batch = self._completed
            self._signalled = False  # true only while the list is non-empty (or just above)
            if not batch:
                return 0
            self._completed = []
            self._processed += len(batch)
            self._batches += 1
        for req in batch:
            req._processed = True
            cb = req.callback
            if cb is not None:
                try:
                    cb(req)
                except Exception:
                    log.exception("exception in completion callback of %r", req)
        return len(batch)

    def poll(self, timeout: float | None = None) -> int:
        """Process completions; if there were none, block until some arrive
        (or ``timeout`` seconds pass) and process those.  QEMU's aio_poll.
        Returns how many requests were processed."""
        if not self._deliver:
            raise RuntimeError("this AioContext does not deliver completions: wait on requests")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None or >= 0, not {timeout!r}")
        n = self.process_completions()
        if n:
            return n
        if self._ring is not None:
            self._ring.flush()  # a callback's plugged submissions must start before we sleep
        if not self._notifier.wait(timeout):
            return n
        return self.process_completions()

    def wait(self, request: AioRequest, timeout: float | None = None) -> bool:
        """Process completions until ``request`` has been processed (its
        callback ran).  Returns False if ``timeout`` seconds passed first.

        Call it from the context's own thread (the one that processes its
        completions); other threads wait with ``request.wait()``.
        """
        if not isinstance(request, AioRequest):
            raise TypeError(f"expected an AioRequest, not {type(request).__name__}")
        if request._ctx is not self:
            raise ValueError("the request belongs to another AioContext")
        return self._wait_until(lambda: request._processed, timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Process completions until no request is outstanding (QEMU's
        qemu_aio_flush).  Returns False if ``timeout`` seconds passed first."""
        return self._wait_until(lambda: self._outstanding() <= 0, timeout)

    def _wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        if not self._deliver:
            raise RuntimeError("this AioContext does not deliver completions: wait on requests")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None or >= 0, not {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if done():
                return True
            self.process_completions()
            if done():
                return True
            remaining = _time_left(deadline)
            if remaining is not None and remaining <= 0:
                return False
            if self._ring is not None:
                self._ring.flush()  # see poll()
            self._notifier.wait(remaining)

    def close(self, timeout: float | None = None) -> bool:
        """Wait for outstanding requests (running their callbacks), then
        release the eventfd.  Returns False, leaving the context open, if
        ``timeout`` seconds passed first.  Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return True
        if self._deliver and not self.drain(timeout):
            return False
        with self._lock:
            self._closed = True
        self._finalizer()
        self._files.clear()
        return True

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def stats(self) -> ContextStats:
        unseen = _count(self._n_unseen)
        inline = _count(self._n_inline) + unseen
        tracked = _count(self._n_tracked)
        with self._lock:
            processed = self._processed
            return ContextStats(
                submitted=tracked + unseen,
                inline=inline,
                threaded=tracked + unseen - inline - _count(self._n_ring),
                ring=_count(self._n_ring),
                processed=processed + unseen,
                outstanding=tracked - processed,
                wakeups=self._wakeups,
                batches=self._batches,
            )


class _InlineDone(AioRequest):
    """A request that finished inline and had no callback: born DONE.

    The hot path of cached reads builds one of these per read with
    ``object.__new__`` (no ``__init__`` frame) and sets only ``_ctx`` and
    ``_result``: every other field is a class attribute.  It overrides every
    accessor that would look at the others (waiters, callbacks, the queue's
    lock): there is nothing left to synchronise with.
    """

    __slots__ = ()

    # What every such request holds is a class attribute: these names shadow
    # the slots for reading, and nothing writes them on a finished request.
    _state = _DONE
    _processed = True
    _on_ring = False
    _exception = None
    _waiters = None
    _callbacks = None
    _fn = None
    _args = ()
    _kwargs = None
    callback = None
    kind = "read"  # the only kind that finishes inline without a callback

    @property
    def state(self) -> ThreadletState:
        return _DONE

    @property
    def error(self) -> int:
        return 0

    def outcome(self) -> tuple[int, int]:
        result: int = self._result  # type: ignore[assignment]
        return 0, result

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def cancel(self) -> CancelResult:
        return CancelResult.ALLDONE

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None or >= 0, not {timeout!r}")
        return True

    def result(self, timeout: float | None = None) -> int:
        self.wait(timeout)
        result: int = self._result  # type: ignore[assignment]
        return result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.wait(timeout)
        return None

    def add_done_callback(self, fn: Callable[[Threadlet[int]], object]) -> None:
        if not callable(fn):
            raise TypeError(f"callback must be callable, not {type(fn).__name__}")
        _invoke_callback(fn, self)


def _finish_elsewhere(req: AioRequest, fn: Callable[..., int], args: tuple[Any, ...]) -> None:
    """Run what the ring left of a request on a worker, then finish it."""
    result: int | None = None
    exc: BaseException | None = None
    try:
        result = fn(*args)
    except BaseException as e:
        exc = e
    with req._queue._lock:
        req._result = result  # the outcome before the state
        req._exception = exc
        req._state = _DONE
    req._finished()


def _time_left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _ignore(res: int) -> None:
    pass


def _release(notifier: _Notifier, ring: Ring | None) -> None:
    notifier.close()
    if ring is not None:
        ring.close()


_new_object = object.__new__


def _count(counter: itertools.count[int]) -> int:
    """How far an itertools.count has counted (its repr is "count(N)")."""
    return int(repr(counter)[6:-1])


def _copy_range_args(
    sc: Syscalls, dst: AioFile, src: AioFile, src_offset: int, dst_offset: int, length: int
) -> int:
    return ops.copy_range(sc, src, src_offset, dst, dst_offset, length)
