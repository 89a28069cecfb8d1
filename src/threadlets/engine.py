"""The paio engine: I/O requests, completion contexts, cancel and drain.

This module owns :class:`AioContext` (the owner of a set of requests and of
the eventfd that says some of them finished) and :class:`AioRequest` (one
I/O request).  What a request does to the file lives in :mod:`threadlets.ops`;
a request's states and their transitions live in :mod:`threadlets.pool`
(the threadlet protocol), which every path here calls; what runs a request
is a *backend*: the thread pool, or the kernel's io_uring
(:mod:`threadlets.uring`) for what it can take: reads and writes (single
and vectored), fsync, fallocate, and the front ends' open, stat and close
(OPENAT, STATX, CLOSE), each where the kernel has the opcode.

A context is three parts along its seams:

* :class:`_CompletionQueue` -- the completion side: the notifier (an
  eventfd), the finished requests not yet delivered, ``process``/``wait``/
  ``drain``, the counters, and admission (close excludes submission).
* the pool backend -- ``ThreadletQueue._submit``: a worker runs the
  request's transfer or operation.
* :class:`_RingBackend` -- the requests the ring takes (see above).

``AioContext._start`` is the one door: a request finished inline is
delivered, else the ring takes it, else the pool.

Life of a request
=================

QUEUED -> RUNNING -> DONE, or QUEUED -> CANCELLED, every transition by
the pool's protocol under the queue's lock:

* **Inline fast path.**  A read first tries ``preadv(..., RWF_NOWAIT)`` in
  the submitting thread: if the data is in the page cache the request is
  born DONE (``_born_finished``), without a thread hop.  What would block
  (or came up short) goes to a backend, which resumes where the inline
  attempt stopped.  Writes do the same where the file system takes
  ``RWF_NOWAIT`` writes.
* **The io_uring backend** (``backend="io_uring"``, or ``"auto"``).  A
  single-buffer read or write that did not finish inline is claimed
  (QUEUED -> RUNNING) and handed to the kernel.  Cancel asks the kernel to
  take it back (IORING_OP_ASYNC_CANCEL): CANCELED if it had moved nothing
  (a read waiting on an empty pipe, an operation still queued in the
  kernel), else NOTCANCELED or ALLDONE, as on the threads.  A full transfer
  finishes it.  On a stream (a pipe, socket
  or terminal) any count is the answer, as one ``readv``/``writev`` is.
  Anything else -- short, EOF, an error -- is finished by a worker that
  repeats the call from where the kernel stopped (:class:`_Transfer`), so
  every rule of :mod:`threadlets.ops` has the last word.
* **Completion through the context.**  When a request finishes (in a
  worker, inline, on the ring, or by cancel) it is appended to the
  context's ready queue, and the first completion of a batch writes the
  eventfd once.  The owner calls :meth:`AioContext.process_completions`,
  which runs each request's callback exactly once, in that thread.

Delivery survives interrupts: a call of process_completions() snapshots
what is ready, then delivers it in order, each by a test-and-set of
``_processed`` before its callback; a request leaves the ready queue only
once delivered and at its head, and what an exception interrupts is left
for the next call.  So a callback raising anything
(``KeyboardInterrupt``, ``SystemExit``, ``CancelledError``), or Ctrl-C in a
wait or between two steps, leaves the rest deliverable by the next call,
each exactly once; the counters count what was delivered.  (The ring hands
its completions out the same way.)  CPython raises a pending Ctrl-C after a
C call returns or as a Python function is entered; every step here that
must not be separated from the next is a plain bytecode (``del``, ``+=``,
attribute stores), and tests interrupt at every C-call return of a
delivery and a submission.  One window is left, as in any pure-Python
code: a Ctrl-C raised exactly as a callback is entered counts as that
callback's run (for the engine's own ring and completion handlers, the
request then stays unfinished).  trio closes that window with a SIGINT
handler of its own; a library should not install one.

Ordering that matters: the eventfd is cleared *before* the ready queue is
looked at, and ``signalled`` is reset in the same critical section that
snapshots it; a completion after that finds ``signalled`` false and writes
the eventfd again, so no wakeup is lost.  The eventfd is written under the
queue's lock, and closed under it once nothing is outstanding and nothing
can be admitted: no completion ever writes a closed (or reused) fd number.

Fork: in a child, every request the parent had outstanding reads CANCELLED
(the pool's fork rule) and counts as finished, so waits, ``drain()`` and
``close()`` return at once; the child gets a fresh eventfd and never
touches the parent's ring.

Who touches what: the completion queue's fields are under its ``lock``;
``_files`` is touched by submitting threads (single dict operations) and
emptied by close; a request's ``callback`` and ``_processed`` belong to
the threads that run :meth:`AioContext.process_completions`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import operator
import os
import select
import sys
import threading
import time
import types
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
    _ContainedCallback,
    _in_worker,
    _invoke_callback,
    _run_callbacks,
)
from threadlets.probe import _BYTES_DATA, RWF_NOWAIT, capabilities, capability_note, pin_buffer
from threadlets.syscalls import NR_READ, NR_WRITE, Syscalls
from threadlets.syscalls import quick_syscall as _quick_syscall
from threadlets.uring import Ring, RingUnavailable

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, StrOrBytesPath, WriteableBuffer

__all__ = ["AioContext", "AioRequest", "ContextStats", "io_queue"]

log = logging.getLogger("threadlets")

_QUEUED = ThreadletState.QUEUED
_RUNNING = ThreadletState.RUNNING
_DONE = ThreadletState.DONE
_CANCELLED = ThreadletState.CANCELLED

Callback = Callable[["AioRequest"], object]

#: Below this, offset + any buffer length cannot pass MAX_OFFSET.
_MAX_IO_OFFSET = MAX_OFFSET - (1 << 40)
#: The SQE offset that means "the file's own position" (-1 as a u64).
_CURRENT_POSITION = 2**64 - 1
#: File descriptors are C ints: a larger number is not an open file (EBADF).
_MAX_FD = 2**31 - 1
#: The most one read or write moves in Linux (MAX_RW_COUNT); larger ring
#: transfers go to the pool, whose loop resumes after each short count.
_MAX_RING_LENGTH = 0x7FFFF000


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


_OP_READ, _OP_WRITE = uring.OP_READ, uring.OP_WRITE
_c_char_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof
_NEG_ECANCELED = -errno.ECANCELED


class _Transfer:
    """A read or write, named: what ops, the ring and the worker share.

    ``done`` bytes were moved already (by the inline attempt or the ring);
    :meth:`run` moves the rest by ops' rules and returns the request's
    result.  (Fields in slots, stored by a frame: the ring reads most of
    them on each request, and a slot is the cheapest read.)"""

    __slots__ = ("buffers", "done", "file", "offset", "sc", "total", "write", "zero_fill")

    def __init__(
        self,
        sc: Syscalls,
        file: AioFile,
        buffers: list[memoryview],
        offset: int,
        total: int,
        done: int,
        write: bool,
        zero_fill: bool,
        /,
    ) -> None:
        self.sc = sc
        self.file = file
        self.buffers = buffers
        self.offset = offset
        self.total = total
        self.done = done
        self.write = write
        self.zero_fill = zero_fill

    def run(self) -> int:
        return ops.transfer(
            self.sc,
            self.file,
            self.buffers,
            self.offset,
            self.total,
            self.done,
            self.write,
            self.zero_fill,
        )

    def one_transfer(self, moved: int) -> int:
        """The result when one system call moving ``moved`` bytes is the
        whole answer (a stream), as ops gives it."""
        n = self.done + moved
        if self.zero_fill and not self.write and n < self.total:
            ops._zero(self.buffers, n)
            return self.total
        return n


class _RingOp:
    """A request that is one system call other than a transfer, named: what
    the ring and the worker share.  :meth:`run` is the worker path, the
    reference; :meth:`sqe` says what the ring would do instead (None: it
    cannot); :meth:`outcome` reads the kernel's answer into (result,
    exception), or None: the worker finishes it; :meth:`abandon` releases
    what the kernel made when its answer reaches nobody."""

    __slots__ = ()

    done = 0  # (moves no data: a cancel that wins touched nothing)

    def run(self) -> Any:
        raise NotImplementedError

    def sqe(self, supported: frozenset[int]) -> tuple[int, int, int, int, int, int] | None:
        """(opcode, fd, offset, addr, len, op flags) for the ring, or None."""
        raise NotImplementedError

    def outcome(self, res: int) -> tuple[Any, BaseException | None] | None:
        raise NotImplementedError

    def abandon(self, res: int) -> None:
        """The kernel's answer ``res`` reaches nobody (an interrupt cut its
        completion short): release what it made.  Nothing here."""


class _FileOp(_RingOp):
    """A flush or a space request (discard, allocate, write_zeroes) on an
    :class:`AioFile`: the ring's answer is read by ops' rules (sticky flush
    errors, remembered ENOTSUP), and the worker finishes EINTR and
    write_zeroes' fallbacks."""

    __slots__ = ("datasync", "file", "kind", "length", "offset", "sc")

    def __init__(
        self,
        sc: Syscalls,
        file: AioFile,
        kind: str,
        offset: int = 0,
        length: int = 0,
        datasync: bool = True,
    ) -> None:
        self.sc = sc
        self.file = file
        self.kind = kind
        self.offset = offset
        self.length = length
        self.datasync = datasync

    def run(self) -> int:
        sc, f = self.sc, self.file
        if self.kind == "flush":
            return ops.flush(sc, f, self.datasync)
        if self.kind == "discard":
            return ops.discard(sc, f, self.offset, self.length)
        if self.kind == "allocate":
            return ops.allocate(sc, f, self.offset, self.length)
        return ops.write_zeroes(sc, f, self.offset, self.length)

    def _name(self) -> str:
        return "zero_range" if self.kind == "write_zeroes" else self.kind

    def sqe(self, supported: frozenset[int]) -> tuple[int, int, int, int, int, int] | None:
        f = self.file
        if self.kind == "flush":
            if uring.OP_FSYNC not in supported:
                return None
            try:
                ops.check_flush(f)
            except OSError:
                return None  # the worker reports the sticky error
            return (uring.OP_FSYNC, f.fd, 0, 0, 0, uring.FSYNC_DATASYNC if self.datasync else 0)
        mode = ops.FALLOCATE_MODES[self._name()]
        if (
            uring.OP_FALLOCATE not in supported
            or not self.length
            or f.is_unsupported(self._name())
            or ops.fallocate_needs_lock(f, mode)
        ):
            return None
        # IORING_OP_FALLOCATE: the length travels in addr, the mode in len.
        return (uring.OP_FALLOCATE, f.fd, self.offset, self.length, mode, 0)

    def outcome(self, res: int) -> tuple[int | None, BaseException | None] | None:
        if res >= 0:
            return 0, None
        err = -res
        if err == errno.EINTR:
            return None
        exc = OSError(err, os.strerror(err))
        if self.kind == "flush":
            return None, ops.flush_failed(self.file, exc)
        exc = self.file.note_error(self._name(), exc)
        if self.kind == "write_zeroes" and exc.errno == errno.ENOTSUP:
            return None  # the worker tries the fallbacks (now remembered)
        return None, exc


#: The kernel's "restart the call" errnos, which a ring operation
#: interrupted by a signal may report where the system call says EINTR.
_RESTART_ERRNOS = frozenset({errno.EINTR, 512, 513, 514, 516})
#: Open flags with which the ring's OPENAT opens exactly as open(2) does.
#: Without them its first, non-blocking attempt adds O_NONBLOCK, which
#: changes what opening a FIFO (or a device) does: a FIFO's reader would
#: not wait for a writer, a writer would get ENXIO.  With O_NONBLOCK the
#: caller asked for that; O_CREAT, O_TRUNC and O_TMPFILE go straight to the
#: kernel's blocking path.
_RING_OPEN_FLAGS = (
    os.O_NONBLOCK | os.O_CREAT | os.O_TRUNC | (getattr(os, "O_TMPFILE", 0) & ~os.O_DIRECTORY)
)


def _path_bytes(path: object, fn: str, fd_ok: bool = False) -> tuple[str | bytes, bytes]:
    """``os.fspath(path)`` (what os names in its errors) and what the
    kernel reads for it (the file-system encoding), refused as the os
    function ``fn`` refuses it."""
    try:
        p: str | bytes = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        kinds = "string, bytes, os.PathLike or integer" if fd_ok else "string, bytes or os.PathLike"
        raise TypeError(f"{fn}: path should be {kinds}, not {type(path).__name__}") from None
    encoded = os.fsencode(p)
    if b"\0" in encoded:
        raise ValueError("embedded null byte")
    return p, encoded


def _c_int(value: object) -> int:
    """An int that os takes as a C int, refused at once as os refuses it."""
    n = operator.index(value)  # type: ignore[arg-type]
    if not -(2**31) <= n <= _MAX_FD:
        raise OverflowError("Python int too large to convert to C int")
    return n


def _os_fd(fd: object) -> int:
    """A descriptor os would take (os says OverflowError past a C int)."""
    n = _check_fd(fd)
    if n > _MAX_FD:
        raise OverflowError("fd is greater than maximum")
    return n


def _dir_fd(dir_fd: object) -> int:
    return uring.AT_FDCWD if dir_fd is None else _os_fd(dir_fd)


def _os_dir_fd(dir_fd: int) -> int | None:
    """What os takes for the ring's dir_fd."""
    return None if dir_fd == uring.AT_FDCWD else dir_fd


class _OsOp(_RingOp):
    """An os call that may run on the ring: the front ends' OPENAT, STATX,
    CLOSE, with no :class:`AioFile`.  :meth:`run` is the os call, the
    reference; :meth:`outcome` reads the kernel's answer into what the os
    call returns or raises.  The op holds the memory the kernel reads and
    writes (the NUL-terminated path, the statx buffer) until the
    completion: the ring's callback holds the op."""

    __slots__ = ()

    def outcome(self, res: int) -> tuple[Any, BaseException | None] | None:
        if res >= 0:
            return self.result(res), None
        if -res in _RESTART_ERRNOS:
            return None  # the worker repeats the call, as os retries EINTR
        return None, self.error(-res)

    def result(self, res: int) -> Any:
        return res

    def error(self, err: int) -> OSError:
        return OSError(err, os.strerror(err))


class _OpenOp(_OsOp):
    """``os.open(path, flags, mode, dir_fd=dir_fd)``; the result is the fd."""

    __slots__ = ("cpath", "dir_fd", "encoded", "flags", "mode", "path")

    def __init__(self, path: object, flags: int, mode: int, dir_fd: int) -> None:
        self.path, self.encoded = _path_bytes(path, "open")
        self.cpath: Any = None  # what the kernel reads, made when the ring takes it
        self.flags = flags
        self.mode = mode
        self.dir_fd = dir_fd

    def run(self) -> int:
        return os.open(self.path, self.flags, self.mode, dir_fd=_os_dir_fd(self.dir_fd))

    def sqe(self, supported: frozenset[int]) -> tuple[int, int, int, int, int, int] | None:
        # os.open adds O_CLOEXEC (PEP 446); so does the ring's.
        flags = self.flags | os.O_CLOEXEC
        if (
            uring.OP_OPENAT not in supported
            or not flags & _RING_OPEN_FLAGS
            or flags < 0
            or self.mode < 0
        ):
            return None  # (the worker gives os.open's answer)
        # IORING_OP_OPENAT: the path in addr, the mode in len, the flags in
        # the op flags.
        self.cpath = cpath = ctypes.create_string_buffer(self.encoded)
        return (uring.OP_OPENAT, self.dir_fd, 0, ctypes.addressof(cpath), self.mode, flags)

    def error(self, err: int) -> OSError:
        return OSError(err, os.strerror(err), self.path)

    def abandon(self, res: int) -> None:
        if res >= 0:
            os.close(res)  # the fd the kernel opened


class _StatOp(_OsOp):
    """``os.stat(target, dir_fd=dir_fd, follow_symlinks=follow)`` (an fd
    target: fstat); the result is the os.stat_result.  On the ring: STATX,
    with AT_EMPTY_PATH for an fd."""

    __slots__ = ("buf", "dir_fd", "encoded", "follow", "target")

    def __init__(self, target: object, dir_fd: int, follow: bool) -> None:
        # (An fd target comes with dir_fd = that fd: statx(fd, "", AT_EMPTY_PATH).)
        self.target = target
        self.encoded = b""
        if not isinstance(target, int):
            self.target, self.encoded = _path_bytes(target, "stat", True)
        self.dir_fd = dir_fd
        self.follow = follow
        #: The struct statx, then the path, made when the ring takes it.
        self.buf: Any = None

    def run(self) -> Any:
        if isinstance(self.target, int):
            return os.stat(self.target)
        return os.stat(
            self.target,  # type: ignore[arg-type]
            dir_fd=_os_dir_fd(self.dir_fd),
            follow_symlinks=self.follow,
        )

    def sqe(self, supported: frozenset[int]) -> tuple[int, int, int, int, int, int] | None:
        if uring.OP_STATX not in supported:
            return None
        flags = 0 if self.follow else uring.AT_SYMLINK_NOFOLLOW
        if isinstance(self.target, int):
            flags = uring.AT_EMPTY_PATH
        self.buf = buf = ctypes.create_string_buffer(uring.STATX_SIZE + len(self.encoded) + 1)
        addr = ctypes.addressof(buf)
        ctypes.memmove(addr + uring.STATX_SIZE, self.encoded, len(self.encoded))
        # IORING_OP_STATX: the path in addr, the struct statx in addr2 (the
        # offset field), the mask in len, the flags in the op flags.
        return (
            uring.OP_STATX,
            self.dir_fd,
            addr,
            addr + uring.STATX_SIZE,
            uring.STATX_BASIC_STATS,
            flags,
        )

    def result(self, res: int) -> Any:
        return uring.stat_result(self.buf)

    def error(self, err: int) -> OSError:
        return OSError(err, os.strerror(err), self.target)


class _CloseOp(_OsOp):
    """``os.close(fd)``.  Never repeated once the kernel closed it:
    whatever close answers then, the number is free afterwards, and may
    already be another file's.  (The ring's EBADF closed nothing: the
    worker's os.close answers instead.)"""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def run(self) -> int:
        os.close(self.fd)
        return 0

    def sqe(self, supported: frozenset[int]) -> tuple[int, int, int, int, int, int] | None:
        if uring.OP_CLOSE not in supported:
            return None
        return (uring.OP_CLOSE, self.fd, 0, 0, 0, 0)

    def outcome(self, res: int) -> tuple[Any, BaseException | None] | None:
        if res >= 0:
            return 0, None
        if res == -errno.EBADF:
            # The ring's close refuses an io_uring descriptor (os.close takes
            # it); the kernel closed nothing, so the worker's os.close gives
            # the answer (EBADF again where nothing is open).
            return None
        err = errno.EINTR if -res in _RESTART_ERRNOS else -res
        return None, OSError(err, os.strerror(err))


class AioRequest(Threadlet[int]):
    """One I/O request.  Made by the methods of :class:`AioContext`.

    ``state`` and ``cancel()`` are those of a threadlet.  When finished,
    ``error`` is 0 or the errno, and ``result()`` the byte count (0 for
    requests that move no data; an ioctl's return value) or raises the
    OSError.  ``callback(request)`` runs once, from
    :meth:`AioContext.process_completions` in the context's thread.
    """

    __slots__ = (
        "_admitted",
        "_cancel_asked",
        "_ctx",
        "_on_ring",
        "_pin",
        "_processed",
        "_resumed",
        "_ring_ident",
        "_transfer",
        "callback",
        "kind",
    )

    _pin: object  # (see __init__)
    _ring_ident: int  # (these three too)
    _cancel_asked: bool
    _resumed: bool

    def __init__(
        self,
        ctx: AioContext,
        kind: str,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        callback: Callback | None,
        transfer: _Transfer | _RingOp | None = None,
    ) -> None:
        # Threadlet.__init__ spelled out: this runs once per request.  (And
        # this, spelled out in AioContext._start_rw and _start_new: keep the
        # three in step.)
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
        self._transfer = transfer
        #: Set by process_completions once the callback ran (or would have).
        self._processed = False
        #: In the kernel's hands (io_uring backend), until it completes there.
        self._on_ring = False
        self._admitted = False  # counted by the completion queue
        # (Slots left unset, as most requests never need them: Threadlet's
        # _claim_ref, set by a claim and read only by what follows one (see
        # Threadlet._finish); _pin, what keeps a ring request's memory in
        # place until the kernel is done with it, set by the ring's
        # submissions and never read; and three read with getattr, where
        # an unset one means its default: _ring_ident, the ring's id of its
        # operation (0: none), set as the ring took it; _cancel_asked,
        # whether we asked the kernel to cancel it (False), set by
        # _RingBackend.cancel; _resumed, handed from the ring to a worker,
        # which finishes it (False), set by _continue.)

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
            return 0, result if isinstance(result, int) else 0
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno, -1
        return errno.EIO, -1

    def wait(self, timeout: float | None = None) -> bool:
        ring = self._ctx._ring
        # (DONE is final: no lock needed.)  A ring that is not usable (closed,
        # or the parent's after a fork) has nothing to reap for this thread.
        if ring is None or self._state is _DONE or not ring.usable:
            return Threadlet.wait(self, timeout)
        if not ring.owner_mode and not ring.is_reaper():
            # The reaper thread finishes ring requests; a held-back one (a
            # callback's plug) must start first.
            ring.flush()
            return Threadlet.wait(self, timeout)
        # Owner mode, or the reaper itself waiting inside a callback: reap
        # while waiting (see Ring.wait for why no wakeup is lost).
        timeout = _check_timeout(timeout)  # (inf, or past TIMEOUT_MAX: None)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ring.reap()
            if Threadlet.wait(self, 0):
                return True
            remaining = _time_left(deadline)
            if remaining is not None and remaining <= 0:
                return False
            if not self._on_ring or not ring.usable:
                # Finishing on a worker, or the ring closed under us (its
                # closer drained it): an ordinary wait.
                return Threadlet.wait(self, remaining)
            ring.wait(remaining, self._left_ring)

    def _left_ring(self) -> bool:
        return not self._on_ring

    def cancel(self) -> CancelResult:
        """Cancel the request if it has not started: CANCELED (it never
        touches the file or the buffer), NOTCANCELED (running: it completes
        with its real result) or ALLDONE (finished).

        On the io_uring backend a request in the kernel that has moved
        nothing yet -- a read of an empty pipe, an operation still queued
        in the kernel -- is taken back with IORING_OP_ASYNC_CANCEL, so the
        answers are the same on both backends."""
        rb = self._ctx._ring_backend
        if self._on_ring and rb is not None:
            answer = rb.cancel(self)
            if answer is not None:
                return answer
        return Threadlet.cancel(self)

    def _run(self) -> int:
        # A read or write runs ops' transfer here (_Transfer.run, one frame
        # less); a flush or space request its operation; any other,
        # fn(*args).
        t: Any = self._transfer
        if t.__class__ is _Transfer:
            return ops.transfer(
                t.sc, t.file, t.buffers, t.offset, t.total, t.done, t.write, t.zero_fill
            )
        if t is None:
            return Threadlet._run(self)
        return t.run()  # type: ignore[no-any-return]

    #: Without waiters and done-callbacks, _finished only queues the request
    #: for its context (see the pool's worker loop).
    _quiet_finish = True

    def _finish_quiet(self) -> None:
        """A worker's delivery of a request it published with no waiter and
        no done-callback (see Threadlet._finish_quiet): _finished's first
        branch, without its looks at the two lists.

        For a delivering context whose eventfd is open, this is
        _CompletionQueue.complete() and the ready-queue branch of its
        _enqueue, spelled out (one frame and two calls less per request):
        keep the three in step (tests/test_threads_path_cost.py compares
        them).  Two of complete()'s looks are left out, as they cannot
        apply in a pool worker, the only caller: ``direct`` (the thread that
        delivers at once is inside process_completions, which a worker's
        loop never is while it runs this: the answer is always the queue),
        and ``_processed`` (set ahead of delivery only in a forked child,
        where the worker that would run this does not exist; the thread
        that forked, if a worker, exits at its next look at its queue).

        The append takes no lock: one list operation, atomic under the GIL,
        at the tail, where process() neither reads nor takes (it copies the
        list and deletes from its head, each one operation).  The lock is
        taken only to signal, as _enqueue does, when ``signalled`` is
        false after the append: read after it, a true ``signalled`` was
        set before process() reset it, and that process() resets it and
        copies the list in one hold of the lock, so its copy holds this
        request.  The eventfd cannot close meanwhile: it is closed only
        once nothing is outstanding, and this request is until delivered.
        """
        self._transfer = None  # finished: the buffers are the caller's again
        cq = self._ctx._cq
        if cq.deliver and not cq.notifier.closed:
            try:
                cq.ready.append(self)
            finally:
                # (Signalled even if Ctrl-C lands as the append returns: the
                # request is queued then; see _enqueue.)
                if not cq.signalled:
                    with cq.lock:
                        if not cq.signalled:
                            cq.signalled = True
                            cq.wakeups += 1
                            cq._signal()  # (not if closed: see _signal)
            return
        cq.complete(self)

    def _finished(self) -> None:
        self._transfer = None  # finished: the buffers are the caller's again
        callbacks = self._callbacks
        cq = self._ctx._cq
        if not self._waiters:
            if not callbacks:
                cq.complete(self)  # (the front ends' common case)
                return
            if not cq.deliver:
                # The common case of a context that delivers nothing
                # (posix): done-callbacks (the one given at submission), no
                # waiter, and no `direct` (set only by a delivering
                # context): the long way below, spelled out.  Each step
                # runs even if Ctrl-C lands in the one before.
                fn = callbacks[0]
                if fn.__class__ is _ContainedCallback and callbacks[-1] is fn:
                    # posix's quick path: its only callback (one is added
                    # to one request once), which cannot drain or close a
                    # context (see _ContainedCallback), so the request need
                    # not be counted as this thread's (_own_finishing);
                    # _run_callbacks for one callback.  (No C call before
                    # the try: Ctrl-C cannot land before the callback.)
                    try:
                        fn(self)
                    except Exception:
                        log.exception("exception in done-callback %r of %r", fn, self)
                    except BaseException as exc:  # KeyboardInterrupt, SystemExit, ...
                        if not _in_worker():
                            raise
                        log.exception("%s in done-callback %r of %r", type(exc).__name__, fn, self)
                    finally:
                        # (As below.)
                        if not self._processed:
                            self._processed = True
                            cq.delivered += 1
                            if cq.admitted == cq.delivered or cq.closing:
                                with cq.lock:
                                    cq.quiet.notify_all()
                    return
                own = _finishing.requests
                try:
                    own.append(self)  # (see _own_finishing)
                finally:
                    try:
                        _run_callbacks(callbacks, self)
                    finally:
                        try:
                            if own and own[-1] is self:
                                del own[-1]
                        finally:
                            # complete() of a context that delivers nothing,
                            # spelled out (see _enqueue), but for the lock:
                            # the test-and-set and the count are plain
                            # bytecodes, which no other thread comes
                            # between (as admission's count: see _start),
                            # and no interrupt either.  The lock only to
                            # wake a close() waiting for quiet: one that
                            # looked before the count holds the lock from
                            # its look to its wait, so it is asleep on
                            # `quiet` when this takes the lock.
                            if not self._processed:
                                self._processed = True
                                cq.delivered += 1
                                if cq.admitted == cq.delivered or cq.closing:
                                    with cq.lock:
                                        cq.quiet.notify_all()
                return
        held = cq.direct
        direct = None
        mine: list[AioRequest] | None = None
        try:
            # While its done-callbacks run in this thread, a drain() or
            # close() of its context from inside one does not wait for
            # it (it would wait for itself): see _own_finishing.
            if callbacks:
                mine = _finishing.requests
                mine.append(self)
            # Done-callbacks run as callbacks do: not with `direct` set.
            # Only its holder clears it (and so restores it): another
            # thread would restore it after the holder let it go.
            if held is not None and held.ident == _get_ident():
                cq.direct = None
                direct = held
        finally:  # (waiters and done-callbacks even if Ctrl-C lands above)
            try:
                Threadlet._finished(self)
            finally:  # (a done-callback's KeyboardInterrupt outside a worker)
                if mine and mine[-1] is self:
                    del mine[-1]
                if direct is not None:
                    cq.direct = direct
                cq.complete(self)

    def _ring_rw_done(self, res: int) -> None:
        """The ring's completion of a request _start_rw sent (no _Transfer:
        the transfer's particulars and the pin in ``_args``, nothing moved
        before), in the thread that reaped it: a full count finishes it
        here, fused; anything else makes its _Transfer and goes on as
        _ring_done.  (The ring's record of the bound method is the
        request's claim: see Threadlet._claim_held.)"""
        self._on_ring = False
        try:
            args = self._args
            self._args = ()  # (the buffer is the caller's again, unpinned)
            if res == args[3]:
                # The common case (a full count), fused: _finish's
                # steps and, with no waiter and no done-callback,
                # _finish_quiet's, without their frames.  (From
                # _start_rw: no _fn, no _exception, no _transfer to
                # let go, no claim reference: its claim is the ring's
                # record, which ends with the batch.)  The outcome
                # before the state, under the lock; delivered even if
                # Ctrl-C lands as the lock is let go.  A Ctrl-C below,
                # once the state changed, reaches _finish_interrupted,
                # which finds it not RUNNING and changes nothing.
                try:
                    with self._queue._lock:
                        if self._state is not _RUNNING:
                            return  # (cancelled in a forked child)
                        self._result = res
                        self._state = _DONE
                finally:
                    # (Changed here if DONE: it was RUNNING, and only the
                    # ring's completion finishes it.)
                    if self._state is _DONE:
                        if self._waiters or self._callbacks:
                            # (Final once DONE, read as _finished reads
                            # them: none is added after.)
                            self._finished()
                        elif not self._processed:
                            # _CompletionQueue.complete, spelled out
                            # (keep the two in step): delivered at once
                            # in the thread reaping for the queue, else
                            # queued.
                            cq = self._ctx._cq
                            direct = cq.direct
                            if direct:
                                try:
                                    me = _get_ident()
                                except BaseException:  # (Ctrl-C as it returned)
                                    cq._enqueue(self)
                                    raise
                                if direct.ident == me:
                                    self._processed = True
                                    cq.delivered += 1
                                    direct.count += 1
                                    cb = self.callback
                                    if cb is not None:
                                        cq.direct = None
                                        try:
                                            cb(self)
                                        except Exception:
                                            log.exception(
                                                "exception in completion callback of %r",
                                                self,
                                            )
                                        finally:
                                            cq.direct = direct
                                else:
                                    cq._enqueue(self)
                            else:
                                cq._enqueue(self)
                return
            # Not the whole answer: a _Transfer, and _ring_done's steps.
            # (_fn and _kwargs were left unset while the ring had it: see
            # _start_rw.)
            self._fn = self._kwargs = None
            f, buf, offset, total, write, _ = args
            view = buf if type(buf) is memoryview else memoryview(buf)
            self._transfer = _Transfer(self._ctx._sc, f, [view], offset, total, 0, write, False)
            self._ring_done(res)  # (inside the try: a Ctrl-C at its entry)
        except BaseException:
            # (The kernel moved `res` into the buffers: counted.  Once
            # _ring_done handled it, this finds it finished or resumed.)
            _finish_interrupted(self, max(res, 0))
            raise

    def _ring_done(self, res: int) -> None:
        """The ring's completion of a read or write with its _Transfer
        (_RingBackend.start's, or one _ring_rw_done made), in
        the thread that reaped it.  A full transfer finishes the request,
        and so does any count on a stream (one transfer is the answer
        there); anything else -- short, an error, EOF, EINTR, an alignment
        the probe did not foresee -- goes to a worker, which repeats the
        call from where the kernel stopped.  (A method of the request: the
        ring's callback is the bound method, one object per request; the
        ring's record of it is the request's claim: see
        Threadlet._claim_held.)"""
        t: _Transfer = self._transfer  # type: ignore[assignment]
        self._on_ring = False
        try:
            # (What Threadlet._finish and _finish_cancelled read of a claim:
            # none here, the ring's record was it.  And the pin of a
            # request start() sent: the kernel is done with the memory.)
            self._claim_ref = None
            self._pin = None
            # (The common case first: a full count is never negative.)
            if res == t.total - t.done and not t.zero_fill:
                self._finish(t.total, None)
                return
            if res == _NEG_ECANCELED and getattr(self, "_cancel_asked", False):
                self._finish_cancelled()  # (see _RingBackend.cancel: nothing moved)
                return
            if res == t.total - t.done or (res >= 0 and t.file.stream):
                self._finish(t.one_transfer(res), None)
                return
            if res > 0:
                t.done += res
            res = 0  # (counted in t.done: no call between the two steps)
            self._ctx._continue(self, t.run)  # (sets _resumed once handed over)
        except BaseException:
            # (The kernel moved `res` more into the buffers: counted.)
            _finish_interrupted(self, t.done + max(res, 0))
            raise

    def _forked(self) -> None:
        # The parent's request, cancelled in this child or being delivered at
        # the fork: nothing to deliver here (complete() then skips it).
        self._processed = True


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


# One-element arrays: ctypes passes an array by its address.
_ONE = (ctypes.c_uint64 * 1)(1)  # what an eventfd write adds (read-only: shared)
_SCRATCH = (ctypes.c_uint64 * 1)()  # where an eventfd's count is read to (and dropped)


#: The longest poll() takes, in milliseconds (a C int).
_MAX_POLL_MS = 2**31 - 1


class _Notifier:
    """An eventfd (a pipe where there is none, or in portable mode):
    readable while signalled."""

    def __init__(self) -> None:
        self._registered = False
        #: What _close_fds has still to close: from there on __del__ closes
        #: them if an interrupt cuts the construction short.
        self._open_fds: list[int] = []
        self.closed = False
        # Each descriptor is made by a call from C (map, inside the list's
        # extend): CPython raises a pending Ctrl-C only as a call made by
        # Python code returns, so it lands before the call or after the
        # extend, never between the fd's creation and its store (where it
        # used to leak the fd).
        if capabilities().eventfd:
            self._open_fds.extend(map(os.eventfd, (0,), (os.EFD_NONBLOCK | os.EFD_CLOEXEC,)))
            self._rfd = self._wfd = self._open_fds[0]
            self._eventfd = True
        else:
            self._open_fds.extend(itertools.chain.from_iterable(itertools.starmap(os.pipe, [()])))
            self._rfd, self._wfd = self._open_fds
            os.set_blocking(self._rfd, False)
            os.set_blocking(self._wfd, False)
            self._eventfd = False
        self._poll = select.poll()
        self._registered = True  # (before the call: unregistering one never made is harmless)
        self._poll.register(self._rfd, select.POLLIN)
        #: Threads asleep in :meth:`sleep`: one that delivers completions
        #: wakes them (it may have cleared the signal they slept on), and a
        #: close while they sleep leaves the descriptor to the last of them.
        self.sleepers = 0
        #: Closed while threads slept on it: the last one out closes the fds.
        self._deferred = False

    def fileno(self) -> int:
        return self._rfd

    def signal(self) -> None:
        try:
            if self._eventfd:
                # Keeping the GIL (see syscalls): the caller holds the
                # completion queue's lock, which the owner and the other
                # workers then wait for no longer than the write takes.
                # (Failed: the os call, which lets the GIL go, says why.)
                if _quick_syscall is None or _quick_syscall(NR_WRITE, self._wfd, _ONE, 8) < 0:
                    os.eventfd_write(self._wfd, 1)
            else:
                os.write(self._wfd, b"\0")
        except BlockingIOError:  # pragma: no cover - counter or pipe full: still readable
            pass

    def clear(self) -> None:
        try:
            if self._eventfd:
                if _quick_syscall is not None:
                    # Keeping the GIL: letting it go here costs the owner a
                    # wait behind every busy worker to get it back.  (The
                    # value read is not used: one scratch word for all.)
                    _quick_syscall(NR_READ, self._rfd, _SCRATCH, 8)
                    return
                os.eventfd_read(self._rfd)
            else:
                while os.read(self._rfd, 4096):
                    pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float | None) -> bool:
        """Block until signalled or ``timeout`` seconds passed."""
        deadline = None
        if timeout is not None and timeout * 1000 > _MAX_POLL_MS:
            # Longer than poll() takes (about 24.8 days): in steps.
            deadline = time.monotonic() + timeout
        while True:
            if deadline is not None:
                timeout = min(_MAX_POLL_MS / 1000, max(0.0, deadline - time.monotonic()))
            ms = None if timeout is None else min(_MAX_POLL_MS, int(timeout * 1000 + 0.999))
            try:
                events = self._poll.poll(ms)
            except RuntimeError:
                # Another thread sleeps on it (a poll object takes one at a
                # time): a drain or close in a second thread gets its own.
                poll = select.poll()
                poll.register(self._rfd, select.POLLIN)
                events = poll.poll(ms)
            for _, revents in events:
                if revents & select.POLLNVAL:
                    if self.closed:
                        return True  # (closed by its owner: the caller looks again)
                    # Closed behind our back (a double close elsewhere in the
                    # process): waiting again would return at once, for ever.
                    raise OSError(
                        errno.EBADF,
                        f"the completion eventfd (fd {self._rfd}) was closed by someone else",
                    )
            if events or deadline is None or ms is None or ms < _MAX_POLL_MS:
                return bool(events)

    def sleep(self, timeout: float | None, done: Callable[[], bool] | None = None) -> bool:
        """:meth:`wait`, counted as a sleeper from before the last look at
        ``done()`` (a thread delivering after that look wakes this one):
        True at once if ``done()`` or closed.  A close meanwhile wakes the
        sleepers and leaves the descriptor open until the last one is out:
        none ever polls a number that may be another file's by then."""
        self.sleepers += 1
        try:
            return (done is not None and done()) or self.closed or self.wait(timeout)
        finally:
            # (Plain bytecodes from the count to the test-and-set: see close.)
            self.sleepers -= 1
            if self._deferred and not self.sleepers:
                self._deferred = False
                self._close_fds()

    def close(self) -> None:
        """Close for good; a second call finishes what an interrupt (Ctrl-C
        as a call returned) cut short."""
        if self.closed:
            if not self._deferred:
                self._close_fds()  # (nothing left to do, or what was cut short)
            return
        self.closed = True
        if self.sleepers:
            # Asleep in another thread (a poll() or drain() racing a close):
            # wake them; the last one out closes the fds.  (No call between
            # the look at the count and the store: a sleeper leaving meets
            # either a count of zero here or the flag set.)
            self._deferred = True
            self.signal()
            return
        self._close_fds()

    def __del__(self) -> None:
        # A notifier nobody closed: its context's construction was cut
        # short by an interrupt (a finalizer closes every other one first).
        if self._open_fds:
            self.closed = True
            self._close_fds()

    def _close_fds(self) -> None:
        # Each step marked done before its call: a Ctrl-C as one returns
        # leaves the rest to the next close, never a number closed twice
        # (it may be another file's by then).
        if self._registered:
            self._registered = False
            with contextlib.suppress(KeyError):  # (never registered after all)
                self._poll.unregister(self._rfd)
        while self._open_fds:
            fd = self._open_fds[0]
            self._open_fds = self._open_fds[1:]
            os.close(fd)


class _Direct:
    """The cell of one direct delivery (see _CompletionQueue.direct): the
    thread that delivers, and how many it delivered."""

    __slots__ = ("count", "ident")

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.count = 0


class _CompletionQueue:
    """The completion side of a context: admission, the ready queue, the
    notifier and the counters.

    Invariants (all under ``lock``, but for admission, see AioContext._start):

    * ``admitted`` counts requests let in; none is let in once ``closing``.
    * ``delivered`` counts those whose completion was taken: by
      :meth:`process` (a delivering context) or at completion (one that
      delivers nothing).  ``admitted - delivered`` is what is outstanding.
    * ``ready`` holds finished requests not yet delivered; while it is not
      empty, ``signalled`` is true or the eventfd is readable.  (A pool
      worker appends without the lock, and takes it only to signal: see
      AioRequest._finish_quiet for why that keeps this.)
    * The notifier is written only under the lock and only while open; it
      is closed under the lock, after nothing is outstanding or admissible.
    """

    def __init__(self, deliver: bool) -> None:
        self.deliver = deliver
        self.notifier = _Notifier()
        self.lock = threading.Lock()
        #: Notified when nothing is outstanding (close() of a context that
        #: delivers nothing waits on it).
        self.quiet = threading.Condition(self.lock)
        #: (A list: process() takes its head off with one operator, no call.)
        self.ready: list[AioRequest] = []
        self.signalled = False
        self.closing = False
        self.admitted = 0
        self.delivered = 0
        self.wakeups = 0
        self.batches = 0
        #: A _Direct (thread ident, count): the thread reaping the ring for this
        #: queue inside process_completions, which delivers what it
        #: finishes at once, and how many it delivered so (that call's
        #: own: a cell per call, so that a nested call's or another
        #: thread's are not counted in it).  None: none, or it is running
        #: a callback.  A hint: where it is not set, completions take the
        #: ready queue, always correct.
        self.direct: _Direct | None = None

    def unadmit(self, req: AioRequest) -> None:
        """Take back the admission of a request that reached no backend, and
        wake a close() that may be waiting for it."""
        with self.lock:
            if req._admitted:
                req._admitted = False
                self.admitted -= 1
                if self.closing:
                    self.quiet.notify_all()
                    if self.deliver and not self.signalled:
                        # Signalled as complete() does, or process() would
                        # never clear it, and close()'s drain would spin.
                        self.signalled = True
                        self.wakeups += 1
                        self._signal()

    def outstanding(self) -> int:
        with self.lock:
            return self.admitted - self.delivered

    def complete_once(self, req: AioRequest) -> None:
        """complete(), unless the request already reached the ready queue."""
        with self.lock:
            if req in self.ready:
                return
        self.complete(req)

    def complete(self, req: AioRequest) -> None:
        """A request finished: queue it for delivery and wake the owner,
        once per batch.  Any thread; never raises, and runs no callback --
        except in the thread that reaps the ring for this queue inside
        :meth:`AioContext.process_completions` (``direct``), which
        delivers it at once, as process() would.  A request already marked
        processed is the parent's, handed over in a forked child by the
        thread that forked while delivering it: it counts as delivered
        there (see AioRequest._forked), and its callback is the parent's.
        (Spelled out in AioRequest._ring_done's fused path, and for a
        worker's hand-over in AioRequest._finish_quiet: keep them in
        step.)"""
        if req._processed:
            return
        direct = self.direct
        if direct:
            try:
                me = _get_ident()
            except BaseException:  # (Ctrl-C as the call returned)
                self._enqueue(req)
                raise
            if direct.ident == me:
                # Plain bytecodes up to the callback's call (no lock: the
                # GIL orders these stores, as admission's; see
                # AioContext._start): delivered and counted from here on,
                # even if the callback raises.  It never enters the queue.
                req._processed = True
                self.delivered += 1
                direct.count += 1
                cb = req.callback
                if cb is not None:
                    # While it runs, this thread is not reaping for the
                    # queue: a wait inside it that reaps queues what it
                    # finds, and runs no other callback inside this one.
                    self.direct = None
                    try:
                        cb(req)
                    except Exception:
                        log.exception("exception in completion callback of %r", req)
                    finally:
                        self.direct = direct
                return
        self._enqueue(req)

    def _enqueue(self, req: AioRequest) -> None:
        with self.lock:
            if not self.deliver:
                # Taken (with the count, in plain bytecodes): _start's
                # clean-up after an interrupt must not count it twice.
                req._processed = True
                self.delivered += 1
                if self.admitted == self.delivered or self.closing:
                    # (Closing: a close() that counts requests of its own
                    # -- a done-callback's, see _own_finishing; an inline
                    # attempt's, see _own_inline -- waits for fewer than
                    # all, and is woken at each delivery to look.)
                    self.quiet.notify_all()
                return
            if not self.notifier.closed:
                try:
                    self.ready.append(req)
                finally:
                    # (Signalled even if Ctrl-C lands as the append returns:
                    # the request is queued then, and complete_once will not
                    # queue it again -- an event loop waiting on fileno()
                    # for it slept on.)
                    if not self.signalled:
                        self.signalled = True
                        self.wakeups += 1
                        self._signal()
                return
            # Closed from inside this request's own done-callbacks (see
            # AioContext._own_finishing), in this thread: nothing will
            # process it now, so it is delivered here, by the thread that
            # closed the context (whose close delivered the others).
            req._processed = True
            self.delivered += 1
            cb = req.callback
        if cb is not None:
            try:
                cb(req)
            except Exception:
                log.exception("exception in completion callback of %r", req)

    def _signal(self) -> None:
        # Under the lock, so that close() cannot close the fd under us.
        if not self.notifier.closed:
            try:
                self.notifier.signal()
            except OSError:  # pragma: no cover - would be a bug: keep the worker alive
                log.exception("cannot signal the completion eventfd")

    def process(self, clear: bool = True) -> int:
        """Deliver the requests that were ready when called, one at a time,
        running each callback in this thread.  See the module docstring for
        the ordering and for what an exception leaves behind."""
        lock, ready = self.lock, self.ready
        n = size = 0  # (what an early return delivered, of a batch of none)
        try:
            with lock:
                if self.notifier.closed:
                    return 0  # closed: the fd number may be another file's now
                # The eventfd is cleared before the snapshot below, in the
                # same hold of the lock: a completion after it finds
                # `signalled` false and writes the eventfd again.  (Reset
                # first: if Ctrl-C lands as the clear returns, the finally
                # below signals again for what is left.)
                signalled, self.signalled = self.signalled, False
                if clear and signalled:
                    self.notifier.clear()
                if not ready:
                    return 0
                self.batches += 1
                # What is ready now (later ones have written the eventfd
                # again).  Each is delivered by a test-and-set of plain
                # bytecodes on ``_processed`` (no other thread and no
                # interrupt comes between the test and the store): once, by
                # whichever call gets to it first -- this one, a nested one
                # (a callback that waits, drains or closes), another
                # thread's.  An exception leaves the rest to the next call,
                # with nothing to give back.
                batch = ready[:]
            # How many this call delivers: counted as those it skipped (the
            # rare case), the rest worked out once at the end.  Cut short by
            # an exception, the count stays -1: "maybe some" (see below).
            size = len(batch)
            n = -1
            skipped = 0
            for req in batch:
                if req._processed:
                    skipped += 1
                    continue
                # Delivered from here on, even if its callback raises: it
                # leaves the queue once at its head (see the finally).
                req._processed = True
                cb = req.callback
                if cb is not None:
                    try:
                        cb(req)
                    except Exception:
                        log.exception("exception in completion callback of %r", req)
            n = size - skipped
        finally:
            with lock:
                try:
                    # The delivered ones leave the queue from its head (an
                    # early return, with nothing ready, has nothing to take).
                    if size or ready:
                        if n > 0 and ready and ready[0] is batch[0]:
                            # Ran to its end, and nobody took any off (only
                            # a call's clean-up does, from the head, and this
                            # one's first is still there; the rest came after
                            # it): the head is the batch, all of it delivered.
                            k = size
                        else:
                            k = 0
                            for req in ready:
                                if not req._processed:
                                    break
                                k += 1
                        # Two operators, no call: nothing lands between the
                        # removal and its count.  (An interrupt before leaves
                        # both to the next call.)
                        del ready[:k]
                        self.delivered += k
                finally:
                    if (
                        (ready or (n and self.notifier.sleepers))
                        and not self.signalled
                        and not self.notifier.closed
                    ):
                        # Left behind (an exception): come back.  Or another
                        # thread sleeps on the signal this call cleared (or
                        # may have, cut short): wake it.
                        self.signalled = True
                        self.wakeups += 1
                        self._signal()
        return n

    def clear_unsignalled(self) -> None:
        """The owner woke and found nothing: if nobody here signalled, the
        eventfd was written from outside (a stray write into its fd number
        by code that wrote to a file it had closed): clear it, or every
        later wait would return at once (a spin).  Under the lock, so that
        no signal of ours is lost: one we send sets ``signalled`` first."""
        with self.lock:
            if not self.signalled and not self.notifier.closed:
                self.notifier.clear()

    def resignal(self) -> None:
        """Make the eventfd readable, so that the owner comes back."""
        with self.lock:
            self.signalled = True
            self.wakeups += 1
            self._signal()

    def wait_quiet(self, timeout: float | None, own: int = 0) -> bool:
        """Wait until at most ``own`` requests are outstanding."""
        with self.lock:
            return self.quiet.wait_for(lambda: self.admitted - self.delivered <= own, timeout)

    def after_fork(self) -> None:
        """In a forked child: the parent's requests count as finished, and
        the child gets an eventfd of its own (the inherited one is the
        parent's too)."""
        for req in self.ready:
            req._processed = True
        self.ready.clear()
        old_lock, old_quiet = self.lock, self.quiet
        self.lock = threading.Lock()
        self.quiet = threading.Condition(self.lock)
        self.delivered = self.admitted
        self.signalled = False
        # The thread that forked may be inside a wait here: a signal handler
        # (which forked) runs inside it, and the child goes on with it.
        if old_lock.acquire(False):  # (else held by a thread not here, or this one)
            old_quiet.notify_all()  # (wait_quiet: it finds nothing outstanding)
            old_lock.release()
        old = self.notifier
        old.sleepers = _sleeps_here(old)  # (the parent's other threads: none here)
        if old.sleepers and not old.closed:
            # Its poll, resumed after the handler, must return: the child's
            # copy of the descriptor becomes one always readable, which the
            # last sleep out closes (the parent's eventfd is not touched).
            nul = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.dup2(nul, old._rfd)
            finally:
                os.close(nul)
            old.closed = old._deferred = True  # (as close() with sleepers: no signal)
            self.notifier = _Notifier()
            return
        if old._deferred:
            old._deferred = False
            old._close_fds()  # the child's copy only
        if not old.closed:
            old.close()  # the child's copy only
            self.notifier = _Notifier()


def _sleeps_here(notifier: _Notifier) -> int:
    """How many sleeps on ``notifier`` the calling thread is inside (in a
    forked child: a signal handler that forked ran inside one)."""
    n = 0
    code = _Notifier.sleep.__code__
    f: types.FrameType | None = sys._getframe(1)
    while f is not None:
        if f.f_code is code and f.f_locals.get("self") is notifier:
            n += 1
        f = f.f_back
    return n


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


def _check_callback(callback: object) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, not {type(callback).__name__}")


def _views(buffers: object, writable: bool) -> tuple[list[memoryview], int]:
    """One buffer or a list/tuple of them, as flat byte memoryviews.

    Raises TypeError for what is not a buffer (or a read-only one to read
    into) and BufferError for a non-contiguous one, as ``os.preadv`` does,
    before anything is queued."""
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
        if not mv.c_contiguous:
            raise BufferError("memoryview: underlying buffer is not C-contiguous")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        views.append(mv)
        total += mv.nbytes
    return views, total


class _RingBackend:
    """The requests a context's ring takes: reads and writes (one buffer,
    or READV/WRITEV), and the :class:`_RingOp` kinds (flush and space
    requests, and the os calls of :class:`_OsOp`).

    :meth:`start` claims a request (QUEUED -> RUNNING) and hands it to the
    kernel, or returns False and leaves it QUEUED for the pool.  The
    completion (in the thread that reaps it) finishes the request, or sends
    what is left of it to a worker."""

    __slots__ = ("__weakref__", "ctx", "ring")

    def __init__(self, ctx: AioContext, ring: Ring) -> None:
        self.ctx = ctx
        self.ring = ring
        # The ring's record of a request is its claim (Threadlet._claim_held).
        ctx._queue._claim_holders.add(self)

    def claimed_in_child(self) -> list[AioRequest]:
        """In a forked child, for the queue's reset (see
        ThreadletQueue._claim_holders): the requests the ring holds -- in
        the kernel, or reaped in a batch not over -- whose callback is
        their _ring_done.  (The others, flush and space requests and os
        calls, the queue remembers itself: see _start_op.)"""
        found = []
        for cb in self.ring.callbacks():
            req = getattr(cb, "__self__", None)
            if isinstance(req, AioRequest):
                found.append(req)
        return found

    def start(self, req: AioRequest) -> bool:
        t = req._transfer
        if type(t) is not _Transfer:
            return isinstance(t, _RingOp) and self._start_op(req, t)
        done = t.done
        length = t.total - done
        if not length or length > _MAX_RING_LENGTH:
            # Nothing left, or more than one SQE moves (its len is 32 bits).
            return False
        f = t.file
        write = t.write
        if f.stream or f.short_nowait or (write and f.append):
            return self._start_other(req, t, length)
        # A regular file or a block device (the common case, in few steps).
        pos = t.offset + done
        if f.direct:
            # (The probe's answer once made -- written once, a whole tuple --
            # without a call: AioFile.alignment's own first step.)
            request_align, buffer_align = f._alignment or f.alignment(t.sc)
            if f not in self.ctx._ring_plain and not f.short_nowait:
                # _start_rw's fast path from now on, where the two are powers
                # of two (one mask for both: the larger).
                align = max(request_align, buffer_align)
                if not align & (align - 1):
                    self.ctx._ring_plain[f] = align - 1
            if pos % request_align or length % request_align:
                return False  # the threads' bounce buffer handles it
            # (A write of whole blocks goes beside ops' RMWs even where it
            # extends the file: no RMW shrinks a file; see ops.)
            if len(t.buffers) != 1:
                return self._start_vectored(req, t, pos, request_align, buffer_align)
        else:
            if len(t.buffers) != 1:
                return self._start_vectored(req, t, pos, 1, 1)
            buffer_align = 1
        view = t.buffers[0]  # (a memoryview: see read() and write())
        pin: object
        if view.readonly:
            # pin_buffer(view)'s read-only case, spelled out for whole bytes
            # (held themselves; their data's address from the object's).
            pin = view.obj
            if type(pin) is bytes and len(view) == len(pin) and _BYTES_DATA:
                addr = id(pin) + _BYTES_DATA
            else:
                pinned = pin_buffer(view)
                if pinned is None:
                    return False
                addr, pin = pinned
        else:
            # pin_buffer(view)'s writable case, spelled out: an export of
            # the buffer keeps its memory in place.
            try:
                pin = _c_char_from_buffer(view)
            except (TypeError, ValueError):
                return False
            addr = _addressof(pin)
        addr += done
        if addr % buffer_align:
            return False
        # _submit(req, _OP_WRITE or _OP_READ, f.fd, pos, addr, length, 0,
        # req._ring_done, pin) spelled out, step for step (this runs once
        # per request): keep the two in step.  The request holds the pin
        # until the kernel is done with the memory.
        req._pin = pin
        req._on_ring = True
        try:
            # (pool.py's transition, see _submit; inside the try: a Ctrl-C
            # at its entry or return is undone there too.)
            req._claim_held()
            ident = self.ring.submit(
                _OP_WRITE if write else _OP_READ, f.fd, pos, addr, length, 0, req._ring_done
            )
        except BaseException:
            _submit_interrupted(self.ring, req)
            raise
        if ident:
            return True  # (its id: the ring knows it, see cancel)
        req._on_ring = False
        req._pin = None
        try:
            req._unclaim()  # (unpublished, as it was: nobody else saw the claim)
        except BaseException:
            req._unclaim()  # (Ctrl-C at its entry: undone all the same)
            raise
        return False

    def _start_other(self, req: AioRequest, t: _Transfer, length: int) -> bool:
        """start() for what is not a plain file or not a plain request: a
        read of a pipe, socket or terminal goes to the ring; the rest to
        the pool."""
        f = t.file
        if t.write or f.short_nowait or not f.ring_readable:
            # An O_APPEND write (the kernel picks the offset); a stream's
            # write (a blocking writev waits for room for all of it, the
            # kernel's ring write ends at the first partial transfer); a
            # character device (see AioFile.short_nowait).
            return False
        if t.sc.getfl(f.fd) & os.O_NONBLOCK:
            # The kernel would wait for data where readv says EAGAIN at once:
            # the pool's one readv is the answer.  (Checked per request: a
            # stream's O_NONBLOCK is often toggled.)
            return False
        # (O_DIRECT means nothing to a stream: no alignment.)
        offset = t.offset + t.done if f.positional else _CURRENT_POSITION  # a pipe has none
        if len(t.buffers) != 1:
            return self._start_vectored(req, t, offset, 1, 1)
        pinned = pin_buffer(t.buffers[0])
        if pinned is None:
            return False
        return self._submit(
            req, _OP_READ, f.fd, offset, pinned[0] + t.done, length, 0, req._ring_done, pinned[1]
        )

    def _start_vectored(
        self, req: AioRequest, t: _Transfer, offset: int, request_align: int, buffer_align: int
    ) -> bool:
        """READV/WRITEV: an iovec array the kernel reads, built from pinned
        buffers.  Only from the start (a resumed request goes to a worker),
        and only where every piece meets O_DIRECT's alignment."""
        opcode = uring.OP_WRITEV if t.write else uring.OP_READV
        if t.done or len(t.buffers) > ops.IOV_MAX or opcode not in self.ring.supported:
            return False
        iov = (_Iovec * len(t.buffers))()
        pins = []
        n = 0
        for b in t.buffers:
            if not len(b):
                continue  # moves nothing: left out
            pinned = pin_buffer(b)
            if pinned is None:
                return False
            addr, pin = pinned
            if addr % buffer_align or len(b) % request_align:
                return False
            iov[n].base = addr
            iov[n].len = len(b)
            pins.append(pin)
            n += 1
        held = (iov, pins)  # alive until the kernel is done with both
        return self._submit(
            req, opcode, t.file.fd, offset, ctypes.addressof(iov), n, 0, req._ring_done, held
        )

    def _submit(
        self,
        req: AioRequest,
        opcode: int,
        fd: int,
        offset: int,
        addr: int,
        length: int,
        op_flags: int,
        on_done: Callable[[int], None],
        pin: object,
    ) -> bool:
        """Claim ``req`` and hand it to the kernel; False (and QUEUED) if
        the ring cannot take it, even when interrupted between the two.
        ``on_done`` gets the kernel's result (a transfer's:
        :meth:`AioRequest._ring_done`); ``pin`` is held by the request
        until then."""
        # (Called only by start(), from _start: the request is not
        # published yet, so it is QUEUED and nobody else holds it.)
        # Claimed with one store (Threadlet._claim_held): from the moment
        # it is queued, the ring's record of its callback is what a forked
        # child's reset finds it by (see claimed_in_child); before that,
        # nobody but this thread can reach it.
        req._pin = pin
        req._on_ring = True
        try:
            req._claim_held()  # (inside the try: see start)
            ident = self.ring.submit(opcode, fd, offset, addr, length, op_flags, on_done)
        except BaseException:
            # (Even if interrupted: once queued, the kernel finishes it.)
            _submit_interrupted(self.ring, req, on_done)
            raise
        if ident:
            req._ring_ident = ident
            return True
        req._on_ring = False
        req._pin = None
        try:
            req._unclaim()  # (only if it is RUNNING: claimed just now)
        except BaseException:
            req._unclaim()  # (Ctrl-C at its entry: undone all the same)
            raise
        return False  # (not queued: the ring is full or closing; the pool takes it)

    def _start_op(self, req: AioRequest, op: _RingOp) -> bool:
        sqe = op.sqe(self.ring.supported)
        if sqe is None:
            return False
        # (Remembered by the queue too: its callback does not name it, so
        # the ring's record cannot -- see claimed_in_child.)
        req._claim_remember()
        return self._submit(req, *sqe, lambda res: self._op_done(req, op, res), None)

    def _op_done(self, req: AioRequest, op: _RingOp, res: int) -> None:
        req._on_ring = False
        try:
            if res == -errno.ECANCELED and getattr(req, "_cancel_asked", False):
                req._finish_cancelled()
                return
            outcome = op.outcome(res)
            if outcome is None:
                self.ctx._continue(req, op.run)  # (sets _resumed once handed over)
                return
            req._finish(*outcome)
        except BaseException:
            if _finish_interrupted(req, 0):
                op.abandon(res)  # (what the kernel made, an fd, is nobody's now)
            raise

    def cancel(self, req: AioRequest) -> CancelResult | None:
        """Take a request back from the kernel if it has moved nothing:
        CANCELED once it reads CANCELLED, else None (the caller answers as
        for any running or finished request).  Waits for the kernel's
        answer, which it gives while the cancel is submitted."""
        t = req._transfer
        ring = self.ring
        ident = getattr(req, "_ring_ident", 0)  # (see AioRequest.__init__)
        if not ident and req._on_ring:
            # The ring's id of it, not kept on the request (start() and
            # _start_rw do not store it: one store less per request).
            ident = ring.ident_of(req._ring_rw_done if t is None else req._ring_done)
            if ident == uring.REAPED:
                ident = 0  # (completed: nothing to cancel)
        if not ident or not req._on_ring or (t is not None and t.done) or not ring.usable:
            # Nothing to cancel, or bytes already moved.  (No _Transfer yet:
            # nothing moved; see _start_rw.)
            return None
        answer: list[int] = []
        got = threading.Event()

        def on_done(res: int) -> None:
            answer.append(res)
            got.set()

        # Set before the cancel is submitted (its -ECANCELED may be reaped at
        # once) and never cleared: another thread's cancel may have won.
        req._cancel_asked = True
        if not ring.cancel(ident, on_done):
            return None
        if ring.owner_mode or ring.is_reaper():
            while not answer:  # nobody else reaps for this thread
                ring.reap()
                if not answer:
                    ring.wait(None, lambda: bool(answer))
        else:
            got.wait()
        if answer[0] != 0:
            return None  # running (-EALREADY) or completed (-ENOENT)
        req.wait()  # its -ECANCELED completion is posted: let it finish
        return CancelResult.CANCELED if req._state is _CANCELLED else None


def _nowait(
    f: AioFile, write: bool, call: Callable[..., int], fd: int, views: Any, offset: int
) -> int:
    """The inline attempt: one RWF_NOWAIT preadv/pwritev (``call``) in the
    calling thread.  The count it moved, or -1: it would block, or it failed
    (the backend repeats the call and reports the error).  A file system
    that refuses the flag (EOPNOTSUPP), or a stream (ESPIPE), is not asked
    again."""
    try:
        return call(fd, views, offset, RWF_NOWAIT)
    except BlockingIOError:
        return -1
    except OSError as e:
        return _nowait_failed(f, write, e)


def _nowait_failed(f: AioFile, write: bool, e: OSError) -> int:
    """_nowait's answer to an OSError: -1, and a file system that refuses
    the flag, or a stream, is not asked again."""
    if e.errno in (errno.EOPNOTSUPP, errno.ESPIPE):
        if write:
            f.nowait_writes = False
        else:
            f.nowait_reads = False
    return -1


def _give_back(cq: _CompletionQueue) -> None:
    """An admission no request took (read()'s or write()'s, made before the
    inline attempt) was just given back (``cq.admitted -= 1``, plain
    bytecodes) to a context whose close() began: wake the close, as
    unadmit() does.  (The count first, the wake after: a Ctrl-C as a call
    here returns leaves the count right.)"""
    with cq.lock:
        cq.quiet.notify_all()
        if cq.deliver and not cq.signalled:
            # (See unadmit.)
            cq.signalled = True
            cq.wakeups += 1
            cq._signal()


def _submit_interrupted(
    ring: Ring, req: AioRequest, on_done: Callable[[int], None] | None = None
) -> None:
    """Ctrl-C (or another BaseException) inside ``ring.submit`` for a
    claimed request (RUNNING, ``_on_ring`` set): find out from the ring
    whether the operation was queued (``on_done``, default its _ring_done).
    Queued, it stays the kernel's -- its completion finishes it -- and what
    is published is sent (the interrupt may have cut the kick short); not
    queued, the claim is undone (QUEUED, for the caller's clean-up).  The
    ring is asked first, then ``_on_ring`` is read: a completion handed out
    and over before the look cleared it (see Ring.ident_of)."""
    ident = ring.ident_of(req._ring_done if on_done is None else on_done)
    if not ident and req._on_ring:
        req._on_ring = False
        req._pin = None
        req._unclaim()
        return
    if ident and ident != uring.REAPED:
        req._ring_ident = ident
    ring.flush()


def _finish_interrupted(req: AioRequest, moved: int) -> bool:
    """Ctrl-C (or another BaseException) landed inside a ring completion
    handler before the request was finished or handed to a worker: finish
    it now -- failed with EINTR, carrying what moved -- or it would stay
    RUNNING for good and every wait, drain() and close() would hang.  True
    if it did (the kernel's answer then reaches nobody)."""
    if getattr(req, "_resumed", False) or req._state is not _RUNNING:
        return False  # finished, or a worker finishes it
    if not hasattr(req, "_claim_ref"):
        req._claim_ref = None  # (claimed by the ring's record: see _ring_done)
    if not hasattr(req, "_fn"):
        req._fn = req._kwargs = None  # (left unset by _start_rw)
    exc = InterruptedError(errno.EINTR, "interrupted while its completion was handled")
    return req._finish(None, ops._moved(exc, moved) if moved else exc)


class _Iovec(ctypes.Structure):  # struct iovec
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


@dataclass(frozen=True, slots=True)
class _Continuation:
    """What is left of a claimed request, run on a worker (or, if the queue
    cancels it, in the thread that cancelled it), then finished."""

    req: AioRequest
    run: Callable[[], int]

    def __call__(self) -> None:
        result: int | None = None
        exc: BaseException | None = None
        try:
            result = self.run()
        except BaseException as e:
            exc = e
        self.req._finish(result, exc)

    def if_cancelled(self, t: Threadlet[None]) -> None:
        # The queue was closed under us: a claimed request must still finish.
        if t.cancelled():
            self()


_live_contexts: weakref.WeakSet[AioContext] = weakref.WeakSet()


class _Finishing(threading.local):
    """``requests``: the requests whose done-callbacks this thread runs
    (nested ones last)."""

    def __init__(self) -> None:
        self.requests: list[AioRequest] = []


_finishing = _Finishing()


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

    ``sqpoll=True`` (with ``backend="io_uring"`` or ``"auto"``) sets the
    ring up with IORING_SETUP_SQPOLL: a kernel thread polls the submission
    queue: no system call per submission, at the cost of a CPU busy polling
    while requests flow and for :data:`~threadlets.uring.SQPOLL_IDLE_MS`
    milliseconds after; off by default.  Where the kernel refuses it the
    ring is made without it.  The attribute ``sqpoll`` says whether this
    context's ring polls (always False on the threads).

    ``deliver=False`` makes a context that delivers nothing: finished
    requests are not queued for :meth:`process_completions` and per-request
    ``callback=`` is refused.  Its users follow each request through the
    request itself (``wait()``, ``add_done_callback()``, which runs in the
    thread that finishes it), as :mod:`threadlets.posix` does.

    Closing: :meth:`close` refuses new requests from every thread at once,
    waits for the outstanding ones (delivering their callbacks), then
    releases the eventfd and the ring.  A submission racing it either
    completes before close returns or raises RuntimeError.

    Dropped without closing, a context is released when it is collected:
    once nothing holds it or any of its requests.  Its requests still on
    the pool's workers finish there first (as CPython's executor's work
    does); those in the kernel's hands on the io_uring backend are
    cancelled there (ones under way come back when done), and the ring and
    the eventfd are released once the kernel has given them all back.
    None of their callbacks runs -- nobody could process them -- and no
    completion callback ever runs in the collector's thread.  A context
    that delivers nothing has a reaper thread, which finishes its ring's
    requests (their done-callbacks are their delivery) before it goes.

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
        sqpoll: bool = False,
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
        self._cq = _CompletionQueue(self._deliver)
        self._ring: Ring | None = None
        self._ring_backend: _RingBackend | None = None
        made: list[Ring] = []  # (the ring made, even if Ctrl-C lands as Ring() returns)
        try:
            if backend != "threads" and type(self._sc) is Syscalls:
                try:
                    # A delivering context reaps in its owner's thread, woken
                    # by the kernel through the eventfd; otherwise a reaper
                    # thread finishes requests (see threadlets.uring).
                    efd = self._cq.notifier.fileno() if self._deliver else None
                    if not capabilities().io_uring:
                        raise RingUnavailable(errno.ENOSYS, capability_note("io_uring"))
                    self._ring = Ring(RING_ENTRIES, eventfd=efd, made=made, sqpoll=bool(sqpoll))
                    self._ring_backend = _RingBackend(self, self._ring)
                except RingUnavailable:
                    if backend == "io_uring":
                        raise
            #: "io_uring" or "threads": what runs requests that do not finish inline.
            self.backend = "threads" if self._ring is None else "io_uring"
            #: Whether the ring's SQ is polled by a kernel thread (``sqpoll=``).
            self.sqpoll = self._ring is not None and self._ring.sqpoll
            # The ring and the eventfd close with the context, or when it is
            # collected (the ring first: the kernel writes the eventfd).  The
            # ring held weakly: with requests in it, it holds the context
            # (through their callbacks), and a strong hold here would keep
            # both for ever -- see _release.
            self._finalizer = weakref.finalize(
                self, _release, self._cq.notifier, self._cq.lock, _weak(self._ring)
            )
        except BaseException:
            # Refused, or interrupted (Ctrl-C) half-way: release what was made
            # (a reaper thread would run for good).  Repeatable, should the
            # finalizer have been registered and run again.
            for ring in made:
                ring.close()
            self._cq.notifier.close()
            raise
        self._files: dict[int, AioFile] = {}
        #: In a forked child: the records _files held at the fork (forgotten
        #: there, see _after_fork_in_child), which inline readers handed out
        #: before it still read through: close() turns them off too.
        self._files_at_fork: list[AioFile] = []
        #: The files whose one-buffer reads and writes _start_rw sends to the
        #: ring itself: a regular file or a block device (not a stream, not
        #: a character device), with the mask O_DIRECT's alignment asks the
        #: offset, the length and the address to clear (0: buffered).  Set
        #: once per file (_file, and _RingBackend.start for O_DIRECT, once
        #: its alignment is known); what it says of a file never changes.
        self._ring_plain: dict[AioFile, int] = {}
        self._preadv = os.preadv if type(self._sc) is Syscalls else self._sc.preadv
        # Statistics only (itertools.count: one atomic C call each, no lock).
        self._n_unseen = itertools.count()  # finished inline, no callback
        self._n_inline = itertools.count()  # finished inline, with a callback
        self._n_ring = itertools.count()  # handed to the ring
        _live_contexts.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._cq.closing else f"fd={self._cq.notifier.fileno()}"
        return f"<AioContext {state} outstanding={self._cq.outstanding()}>"

    def __enter__(self) -> AioContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def queue(self) -> ThreadletQueue:
        return self._queue

    @property
    def deliver(self) -> bool:
        """False for a context that delivers nothing (see the class)."""
        return self._deliver

    def fileno(self) -> int:
        """The eventfd: readable when completions wait to be processed."""
        if self._cq.notifier.closed:
            raise ValueError("I/O operation on a closed AioContext")
        return self._cq.notifier.fileno()

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
        changes) without a ring in owner mode.

        A bound method is held weakly (the ring must not keep an event loop
        alive); once its object is gone, held submissions go at once."""
        ring = self._ring
        if ring is None or not ring.owner_mode or not ring.usable:
            return False
        flush = ring.flush
        try:
            weak: Callable[[], Callable[[Callable[[], None]], object] | None]
            weak = weakref.WeakMethod(schedule)
        except TypeError:
            weak = lambda: schedule  # noqa: E731 - not a bound method: hold it

        def arrange() -> None:
            fn = weak()
            if fn is None:
                flush()
            else:
                fn(flush)

        return ring.hold(arrange)

    def send_held(self) -> None:
        """Submit now what the io_uring backend holds back for a batch.  A
        thread about to block in a wait the engine does not see (a front
        end's own condition variable) calls this first, so that nothing it
        submitted waits on its sleep."""
        ring = self._ring
        if ring is not None:
            ring.flush()

    def forget(self, fd: int) -> None:
        """Drop what the context remembers about ``fd`` (call before the
        number is reused for another file).  Inline readers of ``fd`` handed
        out before (:meth:`inline_reader`, :meth:`inline_bytes_reader`)
        stop reading: the number may be another file's next."""
        f = self._files.pop(fd, None)
        if f is not None:
            self._ring_plain.pop(f, None)
            f.nowait_reads = False  # (the record's readers answer "not inline")

    # -- submission ---------------------------------------------------------------

    def _file(self, fd: int) -> AioFile | OSError:
        """The context's record of ``fd`` (made on first use), or the
        OSError that looking it up gave.  Raises if the context is closed."""
        f = self._files.get(fd)
        if f is None:
            if self._cq.closing:
                raise RuntimeError("the AioContext is closed")
            if fd > _MAX_FD:
                return OSError(errno.EBADF, f"{os.strerror(errno.EBADF)}: fd {fd}")
            try:
                f = AioFile.from_fd(self._sc, fd)
            except OSError as e:
                return e
            if not self.inline:
                f.nowait_reads = f.nowait_writes = False
            # One record per fd, even when two threads meet it first at once
            # (its locks serialise O_DIRECT size changes, its memory keeps
            # sticky flush errors): the first stored wins.
            f = self._files.setdefault(fd, f)
            if self._cq.closing:  # closed meanwhile: close() cleared _files before us
                self._files.pop(fd, None)
                raise RuntimeError("the AioContext is closed")
            if not (f.stream or f.short_nowait or f.direct):
                self._ring_plain[f] = 0  # (O_DIRECT: see _RingBackend.start)
        return f

    def _start(self, req: AioRequest) -> AioRequest:
        """The one door: deliver a request finished inline, or hand it to
        the ring, or to the pool.  (Spelled out, for a read or write that
        nothing moved yet, in _start_rw (the ring) and _start_new (the
        threads backend): keep them in step.)"""
        if req.callback is not None and not self._deliver:
            raise ValueError("this AioContext does not deliver completions: no callback=")
        cq = self._cq
        # Finished before it was submitted (inline, or failed at once): its
        # completion is this call's to make, and only then -- anything else
        # is finished by the backend that took it (a worker, the ring).
        born = req._state is _DONE
        try:
            # Admission without the lock (the hot path): count, then look at
            # `closing`; close() sets `closing`, then waits for what is
            # counted, so one of the two sees the other (the GIL orders
            # them).  The two stores are plain bytecodes: no interrupt and
            # no other thread comes between them (CPython switches threads
            # only where it checks for signals, at calls and loops).  A
            # request read() or write() made of what their inline attempt
            # left comes admitted: the admission was taken before anything
            # moved, and what moved is reported, closing or not.
            if not req._admitted:
                cq.admitted += 1
                req._admitted = True
                if cq.closing:
                    cq.unadmit(req)
                    raise RuntimeError("the AioContext is closed")
            elif not born and cq.notifier.closed:
                # Closed on top of the inline attempt that moved what this
                # request reports (a signal handler's close(), which counted
                # its admission as its own: see _own_inline): no backend
                # runs the rest now; finished with what moved, here.
                self._unstart(req, False)
                return req
            if born:
                next(self._n_inline)
                cq.complete(req)
                return req
            rb = self._ring_backend
            # (A ring that is closing, or a forked child's, refuses in submit.)
            if rb is not None and rb.start(req):
                next(self._n_ring)
                return req
            self._queue._submit(req)
        except BaseException:
            # (Ctrl-C, or the pool refusing it.)  A request no backend took
            # is not outstanding; one that reached the ring, the pool or the
            # ready queue is, and finishes as usual.  One the pool or the
            # ring took may already be DONE here, finished by a worker (or
            # a reaper) that completes it itself: completing it here too
            # queued it twice (counted delivered twice).  And the pool's
            # answer is one look under its lock (see _holds): a worker may
            # take the request just after the QUEUED read here.
            self._unstart(req, born)
            raise
        return req

    def _start_new(self, kind: str, xfer: _Transfer, callback: Callback | None) -> AioRequest:
        """_start(AioRequest(self, kind, None, (), callback, xfer)) for a read
        or write that nothing moved yet (``xfer.done`` is 0), on a context
        without a ring (the threads backend): AioRequest.__init__, and
        _start's admission, pool branch and clean-up, spelled out (no frame
        for either, and none of _start's looks that cannot apply to such a
        request: born finished, admitted already, the ring).  This runs once
        per request: keep the three in step (tests/test_threads_path_cost.py
        compares what they set)."""
        if callback is not None and not self._deliver:
            raise ValueError("this AioContext does not deliver completions: no callback=")
        # AioRequest.__init__, spelled out (as in _start_rw), but for
        # ``_admitted``, stored by the admission below.  (No call between
        # the object's making and the admission: an interrupt at the making
        # leaves nothing admitted, and none can land after it.)
        queue = self._queue
        req = _new_object(AioRequest)
        req._queue = queue
        req._fn = None
        req._args = ()
        req._kwargs = None
        req._state = _QUEUED
        req._result = None
        req._exception = None
        req._waiters = None
        req._callbacks = None
        req._ctx = self
        req.kind = kind
        req.callback = callback
        req._transfer = xfer
        req._processed = False
        req._on_ring = False
        cq = self._cq
        # Admission without the lock, as in _start: the count and the flag
        # are plain bytecodes, nothing comes between them.
        cq.admitted += 1
        req._admitted = True
        try:
            if cq.closing:
                cq.unadmit(req)
                raise RuntimeError("the AioContext is closed")
            queue._submit(req)
        except BaseException:
            # (Ctrl-C, or the pool refusing it: as in _start.)
            self._unstart(req, False)
            raise
        return req

    def _unstart(self, req: AioRequest, born: bool) -> None:
        """_start's clean-up after an exception, for a request ``born``
        finished or not: one no backend took is taken back -- or, if its
        inline attempt moved bytes, finished with what moved.  Idempotent:
        read() and write() (and the checked ones) call it again for a
        request that came admitted (see _start), as an interrupt at _start's
        entry left it admitted and nowhere."""
        if born:
            if req._admitted and not req._processed:  # (not refused: closing)
                self._cq.complete_once(req)
        elif req._state is _QUEUED and not self._queue._holds(req):
            t = req._transfer
            if req._admitted and t.__class__ is _Transfer and t.done:
                # The inline attempt moved bytes (short), and no backend took
                # the rest: finished here, carrying what moved, as a ring
                # completion cut short is (_finish_interrupted) -- taken
                # back, the caller (posix's aiocb) was told nothing moved.
                req._claim_unpublished()
                exc = InterruptedError(errno.EINTR, "interrupted before the rest was submitted")
                req._finish(None, ops._moved(exc, t.done))
            else:
                self._cq.unadmit(req)

    def _start_rw(
        self,
        f: AioFile | None,
        buf: Any,
        offset: int,
        total: int,
        write: bool,
        callback: Callback | None = None,
        callbacks: list[Callable[[Any], object]] | None = None,
        taken: list[AioRequest] | None = None,
        fd: int = -1,
    ) -> AioRequest:
        """_start(AioRequest(..., _Transfer(...))) for a read (not
        zero-filled) or write of one flat buffer (a bytes, bytearray or
        memoryview: read() and write() checked it) that nothing moved yet,
        on the io_uring backend.  A file _ring_plain knows -- a regular file or a block
        device; O_DIRECT with the alignment met -- goes to the ring here
        (_start's admission and clean-up, and _RingBackend.start's and
        _submit's steps, spelled out: this runs once per request; keep the
        four in step), with no _Transfer: the request keeps the transfer's
        particulars in ``_args`` until its completion needs one (see
        _ring_done).  Anything else goes through _start.

        With ``taken`` (a list, empty), posix's door (_read_checked and
        _write_checked; ``callback`` None): ``callbacks``, the request's
        done-callbacks (``[on_done]``), are stored before it is published,
        and the request is in ``taken`` once a backend has it, even if an
        interrupt then cuts this call short (_start_taken's contract).  Put
        there by this call where it raises (its clean-up) or goes through
        _start_taken (what the fast path does not take); where the fast
        path returns it, by the caller, if ``taken`` is still empty (no
        look at ``taken`` on read()'s and write()'s way: they pass none).
        (No interrupt lands between this call's return and the caller's
        append: an eval-loop check comes at a C call's return or a
        function's entry, and there is neither in between.)

        With ``f`` None, the front end's door (AsyncFile.preadinto and
        pwrite, which vouch for what read() and write() are told: ``fd``
        an int, the context's; no callback; ``buf`` a bytearray or a
        memoryview -- for a write, bytes too -- of at least one byte, or
        a read-only memoryview for a read, for read() to refuse):
        ``read(fd, offset, buf)`` or ``write(...)``, in one frame less.
        The checks of their fast path that the caller does not vouch for
        are made here, once (the file known to the context, the offset,
        a memoryview flat and -- a read's -- writable), and anything their
        fast path would not send here (an inline attempt to make, a buffer
        or offset for their checks to answer, a file not known) goes to
        read() or write() themselves; else it is what they do with it
        (the threads backend's _start_new, or what follows here).  Keep
        the three in step (tests/test_sub_path.py compares them).  The
        ``total`` given is not used: the buffer's length is."""
        if f is None:
            try:
                f = self._files[fd]  # (a closed context has no files)
            except KeyError:
                return self.write(fd, offset, buf) if write else self.read(fd, offset, buf)
            if (
                type(offset) is not int  # (not __class__, which an object can fake)
                # (0 <= offset < 2**62 in one step, as in read().)
                or (offset >> 62 and (offset < 0 or offset > _MAX_IO_OFFSET))
                or (f.nowait_writes if write else f.nowait_reads)
                or (
                    buf.__class__ is memoryview
                    and (
                        buf.ndim != 1
                        or buf.format != "B"
                        or not buf.c_contiguous
                        or (buf.readonly and not write)
                    )
                )
            ):
                return self.write(fd, offset, buf) if write else self.read(fd, offset, buf)
            total = len(buf)
            if self._ring_backend is None:
                # (read()'s and write()'s way on the threads backend.)
                view = buf if buf.__class__ is memoryview else memoryview(buf)
                xfer = _Transfer(self._sc, f, [view], offset, total, 0, write, False)
                return self._start_new("write" if write else "read", xfer, None)
        try:
            mask = self._ring_plain[f]  # (a subscript: no method call)
        except KeyError:
            return self._start_rw_start(f, buf, offset, total, write, callback, callbacks, taken)
        if not total or total > _MAX_RING_LENGTH or (write and f.append):
            return self._start_rw_start(f, buf, offset, total, write, callback, callbacks, taken)
        # pin_buffer's steps (the request holds the pin until the kernel is
        # done with the memory).
        pin: object
        if buf.__class__ is bytes and _BYTES_DATA:  # (type(buf), without a call)
            pin = buf
            addr = id(buf) + _BYTES_DATA
        else:
            try:
                pin = _c_char_from_buffer(buf)  # (an export: the memory stays put)
            except (TypeError, ValueError):
                # Read-only memory (a write's): whole bytes, or nothing.
                pinned = pin_buffer(buf if type(buf) is memoryview else memoryview(buf))
                if pinned is None:
                    return self._start_rw_start(
                        f, buf, offset, total, write, callback, callbacks, taken
                    )
                addr, pin = pinned
            else:
                addr = _addressof(pin)
        if mask and (offset | total | addr) & mask:
            # (Not where O_DIRECT's alignment wants it: the threads' bounce
            # buffer, through _start.)
            return self._start_rw_start(f, buf, offset, total, write, callback, callbacks, taken)
        if callback is not None and not self._deliver:
            raise ValueError("this AioContext does not deliver completions: no callback=")
        # AioRequest(self, kind, None, (f, buf, offset, total, write, pin),
        # callback), its __init__ spelled out (no frame): keep the two in
        # step (test_start_rw_sets_what_aiorequest_init_sets).  Left unset
        # while the ring has it, set if the pool takes it instead: _fn and
        # _kwargs (read only by a run of _fn and by what finishes a claimed
        # request other than the fused path: _ring_rw_done and
        # _finish_interrupted set them first), _on_ring (set as the ring
        # is asked) and _ring_ident (the ring knows it: see
        # _RingBackend.cancel); _admitted is set as it is counted, _pin
        # rides in _args (the request holds it until the kernel is done
        # with the memory: see _ring_rw_done).
        req = _new_object(AioRequest)
        req._queue = self._queue
        req._args = (f, buf, offset, total, write, pin)
        req._state = _QUEUED
        req._result = None
        req._exception = None
        req._waiters = None
        req._callbacks = callbacks  # (None but posix's: not published yet, no lock)
        req._ctx = self
        req.kind = "write" if write else "read"
        req.callback = callback
        req._transfer = None
        req._processed = False
        cq = self._cq
        try:
            # Admission without the lock: see _start.  (The count and the
            # flag: plain bytecodes, nothing comes between.)
            cq.admitted += 1
            req._admitted = True
            if cq.closing:
                cq.unadmit(req)
                raise RuntimeError("the AioContext is closed")
            ring = self._ring
            if ring is not None:
                # _RingBackend.start's _submit steps, spelled out: claimed
                # with one store, the ring's record of the operation being
                # the claim's record (Threadlet._claim_held); no receipt
                # (Ctrl-C inside submit: _submit_interrupted asks the ring).
                req._on_ring = True
                try:
                    # (pool.py's transition, one store, called rather than
                    # spelled out here: only pool.py changes a request's
                    # state.  Inside the try: a Ctrl-C at its entry or
                    # return is undone there too.)
                    req._claim_held()
                    ident = ring.submit(
                        _OP_WRITE if write else _OP_READ, f.fd, offset, addr, total, 0,
                        req._ring_rw_done,
                    )  # fmt: skip
                except BaseException:
                    _submit_interrupted(ring, req, req._ring_rw_done)
                    raise
                if ident:
                    next(self._n_ring)
                    return req
                req._on_ring = False
                try:
                    req._unclaim()  # (not queued: the pool's, below)
                except BaseException:
                    req._unclaim()  # (Ctrl-C at its entry: undone all the same)
                    raise
            # The ring refused it (full, closing): the pool's, with a _Transfer
            # (which alone holds the buffer from here on: a finished request
            # keeps no export of it).
            req._on_ring = False
            req._fn = req._kwargs = None
            view = buf if type(buf) is memoryview else memoryview(buf)
            req._transfer = _Transfer(self._sc, f, [view], offset, total, 0, write, False)
            req._args = ()
            self._queue._submit(req)
        except BaseException:
            # (As in _start, for a request not born finished.)  Not taken
            # back, a backend has it: posix's `taken` says so (the ring's,
            # or the pool's, even where an interrupt landed at the return
            # of the call that handed it over).
            if req._state is _QUEUED and not self._queue._holds(req):
                cq.unadmit(req)
            elif taken is not None and not taken:
                taken.append(req)
            raise
        return req

    def _start_rw_start(
        self,
        f: AioFile,
        buf: Any,
        offset: int,
        total: int,
        write: bool,
        callback: Callback | None,
        callbacks: list[Callable[[Any], object]] | None,
        taken: list[AioRequest] | None,
    ) -> AioRequest:
        """_start_rw's way for what its fast path does not take: _start
        (with ``taken``, posix's: _start_taken, the done-callbacks stored
        first)."""
        view = buf if type(buf) is memoryview else memoryview(buf)
        xfer = _Transfer(self._sc, f, [view], offset, total, 0, write, False)
        req = AioRequest(self, "write" if write else "read", None, (), callback, xfer)
        if taken is None:
            return self._start(req)
        req._callbacks = callbacks  # (not published yet: no lock)
        return self._start_taken(req, taken, False)

    def _continue(self, req: AioRequest, run: Callable[[], int]) -> None:
        """Finish a claimed request on a worker: ``run()`` gives its result.

        Sets ``req._resumed`` once the request is sure to be finished by
        someone else: a worker, or -- the queue closing under it -- the
        thread that cancels the continuation.  An interrupt (Ctrl-C) before
        the hand-over leaves it unset and raises, and the caller finishes
        the request (``_finish_interrupted``); one after it just raises."""
        if getattr(req, "_claim_ref", None) is None:
            # Leaving the ring's record (its claim: see Threadlet._claim_held)
            # still RUNNING: remembered by the queue until finished.
            req._claim_remember()
        job = _Continuation(req, run)
        queue = self._queue
        t: Threadlet[None] = Threadlet(queue, job)
        # Before it is published (no lock: nobody else sees it yet), so that
        # no interrupt can come between queueing it and being told if the
        # queue's close() cancels it instead of running it.
        t._callbacks = [job.if_cancelled]
        try:
            queue._submit(t)
        except RuntimeError:  # the queue is closed (nothing queued): finish it here
            req._resumed = True
            job()
            return
        except BaseException:
            # Queued after all if a worker took it or it waits in the queue.
            if t._state is not _QUEUED or queue._holds(t):
                req._resumed = True
            raise
        req._resumed = True

    def _prepare(
        self, fd: object, offset: object, buffers: object, writable: bool, callback: object
    ) -> tuple[AioFile | OSError, list[memoryview], int]:
        """Check a read's or write's arguments (raising for bad ones) and
        find its file (or the OSError that looking it up gave)."""
        _check_callback(callback)
        views, total = _views(buffers, writable=writable)
        _check_range(offset, total)
        f = self._file(_check_fd(fd))
        return f, views, total

    def _fail_now(self, kind: str, exc: OSError, callback: Callback | None) -> AioRequest:
        req = AioRequest(self, kind, None, (), callback)
        req._born_finished(None, exc)
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
        Valid until :meth:`forget` of ``fd`` or :meth:`close` (after either
        it always answers -1).
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

    def inline_bytes_reader(self, fd: int, limit: int) -> Callable[[int, int], bytes | None] | None:
        """:meth:`inline_reader` for a ``pread(n, offset) -> bytes`` of at
        most ``limit`` bytes, in as few steps as possible (the hot path of
        cached reads of an async file).

        Returns ``read_inline(n, offset)``: the ``n`` bytes at ``offset``
        if they are all in the page cache, ``b""`` at or past the end of
        the file, else None -- then submit the read with :meth:`read`,
        which reports what went wrong (bad arguments -- anything but a
        plain ``int`` -- an error, would block, a short count).  Returns
        None if reads of ``fd`` never go inline here.  Valid until
        :meth:`forget` of ``fd`` or :meth:`close` (after either it always
        answers None).

        The read goes into one scratch buffer of the reader's, copied out
        before it returns: a reader is for one thread (an event loop's),
        whose calls never overlap.
        """
        f = self._file(_check_fd(fd))
        if isinstance(f, OSError) or not f.nowait_reads:
            return None
        preadv, unseen, flags = self._preadv, self._n_unseen, RWF_NOWAIT
        # The count the scratch buffer is for: the very int object last
        # checked (``n is size`` -- a constant count, as most callers pass,
        # is the same object each time -- says it is a plain int that fits,
        # in one step); ``unset`` (no argument is it) while there is none or
        # it is being replaced.
        unset: object = object()
        size: object = unset
        # The buffer in a list made once (no sequence built per read), and
        # its view's tobytes, bound once (no method looked up per read; it
        # copies faster than bytes(buf)).  (A functools.partial of preadv
        # would save two steps but cost more in C than they do.)
        bufs = [bytearray()]
        tobytes: Callable[[], bytes] = memoryview(bufs[0]).tobytes

        def read_inline(n: int, offset: int) -> bytes | None:
            nonlocal size, bufs, tobytes
            if n is not size:
                # Another object: a plain int of the buffer's length (then it
                # is the one to look for), one that needs a new buffer, or
                # anything else (read()'s to refuse).  (The type first: a
                # comparison of anything else may run its code.)
                if type(n) is not int or not 0 < n <= limit:
                    return None
                if n != size:
                    # A buffer of the new length.  The count last: a Ctrl-C
                    # among these stores leaves no mismatched buffer in use.
                    size = unset
                    buf = bytearray(n)
                    bufs = [buf]
                    tobytes = memoryview(buf).tobytes
                size = n
            # A bad offset, a closed context (nowait_reads cleared), the
            # flag refused (cleared by read()'s try): read()'s to answer.
            # (A negative offset first: preadv2 reads -1 as "the file's
            # position"; the type before it, as above -- numpy's arrays
            # answer a comparison with an array, refused by `and`.)  An
            # offset too large raises below: the kernel refuses one whose end
            # is past the largest offset (EINVAL) -- a smaller one it answers
            # as it answers read()'s request.
            if type(offset) is int and offset >= 0 and f.nowait_reads:
                # (The answers inside the try, no jump past its handler: what
                # they call raises neither.)
                try:
                    got = preadv(fd, bufs, offset, flags)
                    if got == n:
                        next(unseen)
                        return tobytes()  # (before anything else can use the buffer)
                    if not got:  # at or past the end of the file
                        next(unseen)
                        return b""
                except (OSError, OverflowError):
                    return None  # would block, or an error for read() to report
            return None  # short (the rest on a backend), or read()'s to answer

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
        On a pipe, socket or terminal, one transfer is the answer: the count
        of one ``readv``.
        """
        # The common case first, in as few steps as possible: an fd this
        # context knows, a sane offset, one flat writable buffer; and with
        # no inline attempt to make and nothing to zero-fill, straight to
        # the backend (what the rest below would do with it, without
        # looking again).  Everything else answers as before the shortcut:
        # tests/test_eng_path.py compares both ways with a pinned copy.
        f = self._files.get(fd)
        t = type(buffers)
        views: list[Any]
        one: Any
        if not (
            f is not None
            and type(offset) is int
            # (0 <= offset < 2**62 in one step; else the two comparisons,
            # not a chained one: two steps fewer.)
            and (not offset >> 62 or (offset >= 0 and offset <= _MAX_IO_OFFSET))
            and type(fd) is int
            and (callback is None or callable(callback))
            and (  # (a closed context has no files, so no fast path)
                t is bytearray
                or (
                    t is memoryview
                    and buffers.ndim == 1  # type: ignore[union-attr]
                    and buffers.format == "B"  # type: ignore[union-attr]
                    and not buffers.readonly  # type: ignore[union-attr]
                    and buffers.c_contiguous  # type: ignore[union-attr]
                )
            )
        ):
            ff, views, total = self._prepare(fd, offset, buffers, True, callback)
            if isinstance(ff, OSError):
                return self._fail_now("read", ff, callback)
            f = ff
            one = None
        else:
            if not f.nowait_reads and zero_fill is False:
                # No inline attempt, nothing to zero-fill: the backend's,
                # at once (the ring's fast path, or the pool's _start_new),
                # nothing built that it does not use.  (``is False``: the
                # argument's truth is asked below only, as before: an object
                # that answers it is not taken here.)
                if self._ring_backend is not None:
                    return self._start_rw(f, buffers, offset, len(buffers), False, callback)  # type: ignore[arg-type]
                return self._start_new(
                    "read",
                    _Transfer(
                        self._sc, f, [buffers if t is memoryview else memoryview(buffers)],  # type: ignore[arg-type, list-item]
                        offset, len(buffers), 0, False, False,  # type: ignore[arg-type]
                    ),
                    callback,
                )  # fmt: skip
            views = [buffers]
            total = len(buffers)  # type: ignore[arg-type]
            one = buffers  # (the ring's fast path: see _start_rw)
        if f.nowait_reads and total and callback is None:
            # The inline attempt of a read nobody is called back for (the
            # hot path of cached reads): no admission unless a request is
            # made of it.  A whole answer (or end of file) is returned as
            # is -- a read that finished before a close() that begins
            # meanwhile.  A short one is a request for the rest, admitted
            # by _start: if close() began meanwhile, that refuses it
            # (RuntimeError) -- the bytes moved are in the caller's buffer
            # only, nothing in the file is lost (unlike a write's: see
            # write()).
            if self._cq.closing:
                raise RuntimeError("the AioContext is closed")
            # (_nowait's call, spelled out: one frame less per cached read.)
            try:
                done = self._preadv(fd, views, offset, RWF_NOWAIT)
            except BlockingIOError:
                done = -1
            except OSError as e:
                done = _nowait_failed(f, False, e)
            if done == total or not done:
                if zero_fill and done < total:
                    ops._zero([memoryview(v) for v in views], done)
                    done = total
                next(self._n_unseen)
                d = _new_object(_InlineDone)  # no __init__ frame: see the class
                d._ctx = self
                d._result = done
                return d
            if done > 0:  # (short: the rest on a backend)
                if t is bytearray:  # (ops slices the views)
                    views = [memoryview(buffers)]  # type: ignore[arg-type]
                xfer = _Transfer(self._sc, f, views, offset, total, done, False, zero_fill)
                return self._start(AioRequest(self, "read", None, (), None, xfer))
            # (Would block, or failed: the backend's to answer.)
        elif f.nowait_reads and total:
            # The inline attempt, admitted first (_start's admission, spelled
            # out): a context whose close() began refuses before anything
            # moves, and one whose close() begins later waits for what moved
            # to be reported.  A request made of what moved takes the
            # admission (stores with no call between: see _start); else it
            # is given back, and the request below (nothing moved) is
            # admitted as any other.
            cq = self._cq
            cq.admitted += 1
            held = True
            try:
                if cq.closing:
                    raise RuntimeError("the AioContext is closed")
                if callback is not None and not self._deliver:
                    raise ValueError("this AioContext does not deliver completions: no callback=")
                done = _nowait(f, False, self._preadv, fd, views, offset)
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
                        return d  # (the admission given back below)
                    born = True
                    req = AioRequest(self, "read", None, (), callback)
                    req._born_finished(done, None)
                    req._admitted = True
                    held = False
                    return self._start(req)
                if done > 0:  # (short: the rest on a backend)
                    if t is bytearray:  # (ops slices the views)
                        views = [memoryview(buffers)]  # type: ignore[arg-type]
                    born = False
                    req = AioRequest(
                        self, "read", None, (), callback,
                        _Transfer(self._sc, f, views, offset, total, done, False, zero_fill),
                    )  # fmt: skip
                    req._admitted = True
                    held = False
                    return self._start(req)
                # (Would block, or failed: the backend's to answer.)
            except BaseException:
                if not held:  # (an interrupt at _start's entry: see _unstart)
                    self._unstart(req, born)
                raise
            finally:
                if held:
                    # Given back in plain bytecodes before any call (a Ctrl-C
                    # at a call's return left it counted, and close() waited
                    # for it for good); a close() waiting is woken after.
                    cq.admitted -= 1
                    held = False  # (for _own_inline: given back)
                    if cq.closing:
                        _give_back(cq)
        if self._ring_backend is None:
            if t is bytearray:  # (ops slices the views)
                views = [memoryview(buffers)]  # type: ignore[arg-type]
            xfer = _Transfer(self._sc, f, views, offset, total, 0, False, zero_fill)
            return self._start_new("read", xfer, callback)
        if one is not None and not zero_fill:
            return self._start_rw(f, one, offset, total, False, callback)
        if t is bytearray:  # (ops slices the views)
            views = [memoryview(buffers)]  # type: ignore[arg-type]
        xfer = _Transfer(self._sc, f, views, offset, total, 0, False, zero_fill)
        return self._start(AioRequest(self, "read", None, (), callback, xfer))

    def write(
        self,
        fd: int,
        offset: int,
        buffers: ReadableBuffer | Sequence[ReadableBuffer],
        *,
        callback: Callback | None = None,
    ) -> AioRequest:
        """Write one buffer or a list of them (vectored), at ``offset``.

        The buffers must not change until the request finished.  On a
        pipe, socket or terminal, one transfer is the answer: the count of
        one ``writev``.
        """
        # The common case first, as in read(): an fd this context knows, a
        # sane offset, one flat buffer.
        f = self._files.get(fd)
        t = type(buffers)
        views: list[Any]
        one: Any
        if not (
            f is not None
            and type(offset) is int
            and (not offset >> 62 or (offset >= 0 and offset <= _MAX_IO_OFFSET))  # (see read())
            and type(fd) is int
            and (callback is None or callable(callback))
            and (  # (a closed context has no files, so no fast path)
                t is bytes
                or t is bytearray
                or (
                    t is memoryview
                    and buffers.ndim == 1  # type: ignore[union-attr]
                    and buffers.format == "B"  # type: ignore[union-attr]
                    and buffers.c_contiguous  # type: ignore[union-attr]
                )
            )
        ):
            ff, views, total = self._prepare(fd, offset, buffers, False, callback)
            if isinstance(ff, OSError):
                return self._fail_now("write", ff, callback)
            f = ff
            one = None
        else:
            if not f.nowait_writes:
                # No inline attempt: the backend's, at once, as in read().
                if self._ring_backend is not None:
                    return self._start_rw(f, buffers, offset, len(buffers), True, callback)  # type: ignore[arg-type]
                return self._start_new(
                    "write",
                    _Transfer(
                        self._sc, f, [buffers if t is memoryview else memoryview(buffers)],  # type: ignore[arg-type, list-item]
                        offset, len(buffers), 0, True, False,  # type: ignore[arg-type]
                    ),
                    callback,
                )  # fmt: skip
            views = [buffers]
            total = len(buffers)  # type: ignore[arg-type]
            one = buffers  # (the ring's fast path: see _start_rw)
        if f.nowait_writes and total:
            # The inline attempt, admitted first: see read().
            cq = self._cq
            cq.admitted += 1
            held = True
            try:
                if cq.closing:
                    raise RuntimeError("the AioContext is closed")
                if callback is not None and not self._deliver:
                    raise ValueError("this AioContext does not deliver completions: no callback=")
                # (No call between the write and the request made of it but
                # the request's own: see _unstart.)
                done = _nowait(f, True, self._sc.pwritev, fd, views, offset)
                if done > 0:
                    if done == total:
                        born = True
                        req = AioRequest(self, "write", None, (), callback)
                        req._born_finished(done, None)
                    else:
                        if one is not None and t is not memoryview:
                            views = [memoryview(one)]  # (ops slices the views)
                        born = False
                        req = AioRequest(
                            self, "write", None, (), callback,
                            _Transfer(self._sc, f, views, offset, total, done, True, False),
                        )  # fmt: skip
                    req._admitted = True
                    held = False
                    return self._start(req)
            except BaseException:
                if not held:  # (an interrupt at _start's entry: see _unstart)
                    self._unstart(req, born)
                raise
            finally:
                if held:
                    # Given back in plain bytecodes before any call (a Ctrl-C
                    # at a call's return left it counted, and close() waited
                    # for it for good); a close() waiting is woken after.
                    cq.admitted -= 1
                    held = False  # (for _own_inline: given back)
                    if cq.closing:
                        _give_back(cq)
        if one is not None:
            if self._ring_backend is not None:
                return self._start_rw(f, one, offset, total, True, callback)
            if t is not memoryview:  # (a memoryview each: ops slices the views)
                views = [memoryview(one)]
        xfer = _Transfer(self._sc, f, views, offset, total, 0, True, False)
        if self._ring_backend is None:
            return self._start_new("write", xfer, callback)
        return self._start(AioRequest(self, "write", None, (), callback, xfer))

    # -- for the package's front ends only ----------------------------------

    def _read_checked(
        self,
        fd: int,
        offset: int,
        view: memoryview,
        on_done: Callable[[Any], object],
        taken: list[AioRequest],
    ) -> AioRequest:
        """read(fd, offset, view) for a caller that checked its arguments
        (internal: threadlets.posix), with a done-callback taken at
        submission.  The caller vouches for: ``fd`` an int, ``offset`` an
        int >= 0, ``view`` a writable, flat (1-D, format 'B', C-contiguous)
        memoryview of at least one byte.  The rest is checked here, as
        read() checks it: anything else -- a closed context, an fd this
        context has not looked up, an offset past the range -- is read()
        itself, which answers as always.  A file read inline first gets
        read()'s inline attempt, here: finished by it, the answer is
        read()'s (on_done not taken); what it leaves goes to a backend with
        on_done and ``taken``, as below.

        ``on_done`` is *taken* only where the returned request's
        ``_callbacks`` is not None: stored before the request is published
        (no lock, no window), it then runs exactly once when the request
        finishes -- possibly before this returns -- in the thread that
        finishes it, or never if this raises before the request reached a
        backend.  Where it was not taken (read() answered), the caller adds
        it (``add_done_callback``) as for any request.

        ``taken`` gets the request the moment it is sure to run ``on_done``
        (it reached a backend), even if an interrupt (Ctrl-C) then cuts this
        call short: a caller that sees it there knows the request finishes
        as usual, and must not report it finished by the interrupt (its
        buffer may still be filled).  (A write finished inline is put there
        too, its on_done not taken: the caller adds it then, as for any
        request -- a second registration must be harmless.)"""
        if offset > _MAX_IO_OFFSET:
            return self.read(fd, offset, view)
        try:
            f = self._files[fd]  # (a subscript: no call)
        except KeyError:
            if self._cq.closing:  # (a closed context has no files)
                return self.read(fd, offset, view)
            # An fd this context has not looked up yet (its first request,
            # or the first since forget()): looked up here, so that the
            # request still goes down this path, with on_done and `taken`
            # (through read() an interrupt after a backend took it left the
            # caller no way to know).
            ff = self._file(fd)
            if isinstance(ff, OSError):
                return self._fail_now("read", ff, None)
            f = ff
        if f.nowait_reads:
            # read()'s inline attempt, written out (admitted first, as
            # there): what it leaves goes to a backend *here*, with on_done
            # and `taken` (through read() an interrupt after a backend took
            # it left the caller no way to know, and it reported finished a
            # request that filled its buffer later).
            cq = self._cq
            cq.admitted += 1
            held = True
            try:
                if cq.closing:
                    raise RuntimeError("the AioContext is closed")
                done = _nowait(f, False, self._preadv, fd, (view,), offset)
                if done == view.nbytes or not done:
                    next(self._n_unseen)
                    d = _new_object(_InlineDone)  # (not taken: as read())
                    d._ctx = self
                    d._result = done
                    return d  # (the admission given back below)
                if done > 0:
                    req = AioRequest(
                        self, "read", None, (), None,
                        _Transfer(self._sc, f, [view], offset, view.nbytes, done, False, False),
                    )  # fmt: skip
                    req._callbacks = [on_done]  # (not published yet: no lock)
                    req._admitted = True
                    held = False
                    return self._start_taken(req, taken, False)
            except BaseException:
                if not held:
                    self._untaken(req, taken, False)
                raise
            finally:
                if held:
                    # Given back in plain bytecodes before any call (a Ctrl-C
                    # at a call's return left it counted, and close() waited
                    # for it for good); a close() waiting is woken after.
                    cq.admitted -= 1
                    held = False  # (for _own_inline: given back)
                    if cq.closing:
                        _give_back(cq)
        if self._ring_backend is not None:
            # The ring's fast path, read()'s, with on_done and `taken` (the
            # request put there here if _start_rw returned it: see there).
            req = self._start_rw(f, view, offset, view.nbytes, False, None, [on_done], taken)
            if not taken:
                taken.append(req)
            return req
        req = AioRequest(
            self, "read", None, (), None,
            _Transfer(self._sc, f, [view], offset, view.nbytes, 0, False, False),
        )  # fmt: skip
        req._callbacks = [on_done]  # (not published yet: no lock)
        return self._start_taken(req, taken, False)

    def _start_taken(self, req: AioRequest, taken: list[AioRequest], born: bool) -> AioRequest:
        """_start for _read_checked/_write_checked: ``req`` goes into
        ``taken`` once a backend has it (admitted and not taken back: see
        _start), whatever interrupts the return.  (A request that came
        admitted, and met an interrupt at _start's entry: see _unstart.)
        On the io_uring backend, what nothing moved yet goes by _start_rw
        instead, which keeps the same contract: keep the two in step
        (tests/test_posix_ring_path.py)."""
        try:
            return self._start(req)
        except BaseException:
            self._unstart(req, born)
            raise
        finally:
            if req._admitted:
                taken.append(req)

    def _untaken(self, req: AioRequest, taken: list[AioRequest], born: bool) -> None:
        """_start_taken's clean-up, for an interrupt at its entry (with a
        request that came admitted: see _unstart)."""
        self._unstart(req, born)
        if req._admitted and not taken:
            taken.append(req)

    def _write_checked(
        self,
        fd: int,
        offset: int,
        view: memoryview,
        on_done: Callable[[Any], object],
        taken: list[AioRequest],
    ) -> AioRequest:
        """write(fd, offset, view) as :meth:`_read_checked` is read() (the
        view may be read-only)."""
        if offset > _MAX_IO_OFFSET:
            return self.write(fd, offset, view)
        try:
            f = self._files[fd]  # (as in _read_checked)
        except KeyError:
            if self._cq.closing:
                return self.write(fd, offset, view)
            ff = self._file(fd)  # (looked up here: see _read_checked)
            if isinstance(ff, OSError):
                return self._fail_now("write", ff, None)
            f = ff
        if f.nowait_writes:  # (write()'s inline attempt: see _read_checked)
            cq = self._cq
            cq.admitted += 1
            held = True
            try:
                if cq.closing:
                    raise RuntimeError("the AioContext is closed")
                # (No call between the write and the request made of it but
                # the request's own: a Ctrl-C as one returned would lose
                # what was written.)
                done = _nowait(f, True, self._sc.pwritev, fd, [view], offset)
                if done > 0:
                    if done == view.nbytes:
                        # Born finished, on_done not taken (the caller adds
                        # it); in `taken` all the same: the bytes moved.
                        born = True
                        req = AioRequest(self, "write", None, (), None)
                        req._born_finished(done, None)
                    else:
                        born = False
                        req = AioRequest(
                            self, "write", None, (), None,
                            _Transfer(self._sc, f, [view], offset, view.nbytes, done, True, False),
                        )  # fmt: skip
                        req._callbacks = [on_done]
                    req._admitted = True
                    held = False
                    return self._start_taken(req, taken, born)
            except BaseException:
                if not held:
                    self._untaken(req, taken, born)
                raise
            finally:
                if held:
                    # Given back in plain bytecodes before any call (a Ctrl-C
                    # at a call's return left it counted, and close() waited
                    # for it for good); a close() waiting is woken after.
                    cq.admitted -= 1
                    held = False  # (for _own_inline: given back)
                    if cq.closing:
                        _give_back(cq)
        if self._ring_backend is not None:
            # (As in _read_checked.)
            req = self._start_rw(f, view, offset, view.nbytes, True, None, [on_done], taken)
            if not taken:
                taken.append(req)
            return req
        req = AioRequest(
            self, "write", None, (), None,
            _Transfer(self._sc, f, [view], offset, view.nbytes, 0, True, False),
        )  # fmt: skip
        req._callbacks = [on_done]
        return self._start_taken(req, taken, False)

    def _submit_op(
        self,
        kind: str,
        fd: int,
        fn: Callable[..., int],
        args: tuple[Any, ...],
        callback: Callback | None,
    ) -> AioRequest:
        _check_callback(callback)
        f = self._file(_check_fd(fd))
        if isinstance(f, OSError):
            return self._fail_now(kind, f, callback)
        return self._start(AioRequest(self, kind, fn, (self._sc, f, *args), callback))

    def _submit_file_op(
        self,
        kind: str,
        fd: int,
        offset: int,
        length: int,
        callback: Callback | None,
        datasync: bool = True,
    ) -> AioRequest:
        _check_callback(callback)
        f = self._file(_check_fd(fd))
        if isinstance(f, OSError):
            return self._fail_now(kind, f, callback)
        op = _FileOp(self._sc, f, kind, offset, length, datasync)
        return self._start(AioRequest(self, kind, None, (), callback, op))

    def flush(
        self, fd: int, *, datasync: bool = True, callback: Callback | None = None
    ) -> AioRequest:
        """fdatasync (or fsync with ``datasync=False``).  After a failed
        flush, later flushes of this fd fail with the same errno."""
        return self._submit_file_op("flush", fd, 0, 0, callback, datasync=bool(datasync))

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
        return self._submit_file_op("discard", fd, offset, length, callback)

    def write_zeroes(
        self, fd: int, offset: int, length: int, *, callback: Callback | None = None
    ) -> AioRequest:
        """Make the range read as zeros, as a write of zeros would."""
        _check_range(offset, length)
        return self._submit_file_op("write_zeroes", fd, offset, length, callback)

    def allocate(
        self, fd: int, offset: int, length: int, *, callback: Callback | None = None
    ) -> AioRequest:
        """Allocate space for the range (fallocate mode 0)."""
        _check_range(offset, length)
        if length == 0:
            raise ValueError("length must be > 0 for allocate")
        return self._submit_file_op("allocate", fd, offset, length, callback)

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
        _check_callback(callback)
        src = self._file(_check_fd(src_fd))
        if isinstance(src, OSError):
            return self._fail_now("copy_range", src, callback)
        return self._submit_op(
            "copy_range", dst_fd, _copy_range_args, (src, src_offset, dst_offset, length), callback
        )

    def openat(
        self,
        path: StrOrBytesPath,
        flags: int,
        mode: int = 0o777,
        *,
        dir_fd: int | None = None,
        callback: Callback | None = None,
    ) -> AioRequest:
        """``os.open(path, flags, mode, dir_fd=dir_fd)`` as a request: the
        result is the new descriptor (close-on-exec, as os.open makes it),
        the error os.open's, filename included.  On the io_uring backend the
        kernel opens it (IORING_OP_OPENAT) where that opens exactly as
        open(2) does: with O_NONBLOCK, O_CREAT, O_TRUNC or O_TMPFILE in
        ``flags`` (otherwise the ring's first attempt would add O_NONBLOCK,
        and a FIFO would open differently).  A request that finished has
        its descriptor in its result: the caller closes it, even if it
        asked to cancel and was told NOTCANCELED."""
        _check_callback(callback)
        op = _OpenOp(path, _c_int(flags), _c_int(mode), _dir_fd(dir_fd))
        return self._start(AioRequest(self, "openat", None, (), callback, op))

    def stat(
        self,
        path: StrOrBytesPath | int,
        *,
        dir_fd: int | None = None,
        follow_symlinks: bool = True,
        callback: Callback | None = None,
    ) -> AioRequest:
        """``os.stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)``
        as a request (an fd: fstat): the result is the os.stat_result, the
        error os.stat's.  On the io_uring backend: IORING_OP_STATX, read
        into the same os.stat_result."""
        _check_callback(callback)
        if isinstance(path, bool):
            raise TypeError("stat: a bool is not a file descriptor")
        if isinstance(path, int):
            if dir_fd is not None:
                raise ValueError("stat: can't specify dir_fd without matching path")
            if not follow_symlinks:
                raise ValueError("stat: cannot use fd and follow_symlinks together")
            fd = _os_fd(path)
            op = _StatOp(fd, fd, True)
        else:
            op = _StatOp(path, _dir_fd(dir_fd), bool(follow_symlinks))
        return self._start(AioRequest(self, "stat", None, (), callback, op))

    def close_fd(self, fd: int, *, callback: Callback | None = None) -> AioRequest:
        """``os.close(fd)`` as a request (IORING_OP_CLOSE on the io_uring
        backend); the context forgets ``fd`` first (see :meth:`forget`).
        Requests already running on ``fd`` finish as they would after
        os.close: with the file they started on.  Never repeated: after
        any answer the number is free."""
        _check_callback(callback)
        if _check_fd(fd) > _MAX_FD:
            raise OverflowError("Python int too large to convert to C int")
        self.forget(fd)
        return self._start(AioRequest(self, "close", None, (), callback, _CloseOp(fd)))

    def call(
        self, fn: Callable[..., Any], /, *args: Any, callback: Callback | None = None
    ) -> AioRequest:
        """Run any blocking call (``os.open``, ``os.fstat``...) on a worker as a
        request of this context: same cancel, same completion delivery.  The
        result is whatever ``fn`` returns."""
        if not callable(fn):
            raise TypeError(f"call() needs a callable, not {type(fn).__name__}")
        _check_callback(callback)
        return self._start(AioRequest(self, "call", fn, args, callback))

    # -- completion -------------------------------------------------------------------

    def process_completions(self) -> int:
        """Run the callbacks of finished requests, each exactly once, in this
        thread.  Returns how many requests it processed.

        Callbacks may submit, cancel, wait for other requests, or call this
        method again.  An Exception from a callback is logged, and the rest
        still run.  Any other exception (KeyboardInterrupt, SystemExit,
        CancelledError), from a callback or an interrupt, propagates; the
        requests not yet delivered stay deliverable by the next call.
        """
        ring = self._ring
        if ring is None:
            return self._cq.process()
        # What the callbacks submit, and what the ring held back for the
        # reap, reaches the kernel in one io_uring_enter when this returns.
        plugged = ring.plug()
        try:
            if ring.owner_mode and ring.usable:
                # The kernel writes the eventfd too: clear it, then look at
                # the ready queue and the ring, so a completion posted after
                # that leaves it readable.  (No second clear in process(): it
                # could swallow such a wakeup.)  What finished first (inline,
                # on a worker) is delivered first.
                cq = self._cq
                direct: _Direct | None = None
                try:
                    # From the clear on, an exception of any kind (a callback
                    # raising, Ctrl-C at any C return, the clear's included)
                    # may leave completions on the ring or in the ready queue
                    # with the eventfd cleared: the loop would never call
                    # again.  The rest is delivered by the next call; make
                    # sure there is one.
                    cq.notifier.clear()
                    # (Nothing ready and nothing signalled -- the common case,
                    # the ring's completions being delivered by the reap --
                    # is what process() would find and leave, with the lock
                    # taken twice: a completion queued after this look
                    # signals, as it finds ``signalled`` false.)
                    n = cq.process(clear=False) if cq.ready or cq.signalled else 0
                    # What the reap finishes is delivered by it (see
                    # complete()), unless another thread does so now.
                    if cq.direct is None and cq.deliver:
                        direct = cq.direct = _Direct(_get_ident())
                    ring.reap()
                    if direct is not None:
                        n += direct.count
                        if direct.count and cq.notifier.sleepers:
                            cq.resignal()  # (see process)
                except BaseException:
                    cq.resignal()
                    raise
                finally:
                    if direct is not None and cq.direct is direct:
                        cq.direct = None
                return n
            return self._cq.process()
        finally:
            if plugged:
                ring.unplug()
            else:
                ring.flush()

    def on_readable(self) -> int:
        """What an event loop calls when :meth:`fileno` polls readable:
        :meth:`process_completions`, and if that found nothing, make sure
        the eventfd is not left readable by a write that was not ours (a
        stray write into its fd number by code writing to a file it had
        closed), so that a level-triggered loop does not spin on it."""
        n = self.process_completions()
        if not n and self._ring is None:
            # (With a ring, process_completions() clears the eventfd every
            # time: the kernel writes it too, and a clear here could swallow
            # a completion's wakeup.)
            self._cq.clear_unsignalled()
        return n

    def poll(self, timeout: float | None = None) -> int:
        """Process completions; if there were none, block until some arrive
        (or ``timeout`` seconds pass) and process those.  QEMU's aio_poll.
        Returns how many requests were processed."""
        if not self._deliver:
            raise RuntimeError("this AioContext does not deliver completions: wait on requests")
        timeout = _check_timeout(timeout)  # (NaN refused; inf, or past TIMEOUT_MAX: None)
        self._check_open()
        n = self.process_completions()
        if n:
            return n
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ring is not None:
                self._ring.flush()  # a callback's plugged submissions must start before we sleep
            if not self._cq.notifier.sleep(_time_left(deadline)):
                return 0
            if self._cq.notifier.closed:
                return 0  # closed meanwhile (by a callback, or another thread)
            n = self.on_readable()
            if n:
                return n
            # Woken for nothing (a stray write, or a ring completion whose
            # rest went to a worker): sleep again until the deadline.
            remaining = _time_left(deadline)
            if remaining is not None and remaining <= 0:
                return 0

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
        if request._processed:
            return True
        self._check_open()
        return self._wait_until(lambda: request._processed, timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Process completions until no request is outstanding (QEMU's
        qemu_aio_flush).  Returns False if ``timeout`` seconds passed first."""
        own = self._own_finishing() + self._own_inline()
        return self._wait_until(lambda: self._cq.outstanding() <= own, timeout)

    def _own_finishing(self) -> int:
        """How many of this context's requests this thread is finishing:
        a drain() or close() from one of their done-callbacks would wait
        for them, that is for itself, so it counts them as done (each is
        delivered as soon as its done-callbacks returned)."""
        mine = _finishing.requests
        return sum(1 for r in mine if r._ctx is self)

    def _own_inline(self) -> int:
        """How many admissions taken before an inline attempt (see read())
        this thread's frames below hold on this context: a drain() or
        close() in a signal handler that runs on top of the attempt would
        wait for them, that is for itself -- for good.  Counted as done: the
        attempt, resumed once the handler returned, reports what moved
        (see _start: a request made of it on a closed context is finished
        there) or is refused.

        Only the inline attempt's admission is counted.  A request the
        frame below admitted and has not yet handed to a backend (a handler
        landing inside _start) is not: telling it apart from one a worker
        is taking at that moment needs the pool's lock, which the frame
        below may hold -- so such a close() waits for it, to its timeout.
        (A signal handler that closes the context its own thread is
        submitting to is documented as unsupported: docs/engine.md.)"""
        n = 0
        # (drain()'s or close()'s caller: none when C called it -- atexit,
        # _thread.start_new_thread -- where sys._getframe(2) raised.)
        f: types.FrameType | None = sys._getframe(1).f_back
        while f is not None:
            code = f.f_code
            if code in _INLINE_CODES:
                local = f.f_locals
                if local.get("self") is self and local.get("held") is True:
                    n += 1
            f = f.f_back
        return n

    def _check_open(self) -> None:
        if self._cq.notifier.closed:
            raise RuntimeError("the AioContext is closed")

    def _wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        if not self._deliver:
            raise RuntimeError("this AioContext does not deliver completions: wait on requests")
        timeout = _check_timeout(timeout)  # (NaN refused; inf, or past TIMEOUT_MAX: None)
        deadline = None if timeout is None else time.monotonic() + timeout
        woken = False
        while True:
            if done():
                return True
            if woken:
                self.on_readable()
            else:
                self.process_completions()
            if done():
                return True
            remaining = _time_left(deadline)
            if remaining is not None and remaining <= 0:
                return False
            if self._ring is not None:
                self._ring.flush()  # see poll()
            if self._cq.notifier.closed:
                return done()  # closed meanwhile (by a callback): nothing to wait for
            woken = self._cq.notifier.sleep(remaining, done)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new requests (from any thread, at once), wait for the
        outstanding ones (running their callbacks), then release the eventfd
        and the ring.  Returns False, leaving the context open, if
        ``timeout`` seconds passed first; also False, the context closed,
        if a reaper thread still busy in a callback did not end within the
        rest of ``timeout`` (it releases the ring as it ends).  Closing twice
        is harmless."""
        timeout = _check_timeout(timeout)  # (before it begins: NaN refused)
        deadline = None if timeout is None else time.monotonic() + timeout
        cq = self._cq
        with cq.lock:
            closed = cq.notifier.closed
            cq.closing = True
        if closed:
            self._release_now()  # (what a Ctrl-C cut short, if anything)
            return self._join_reaper(deadline)
        try:
            if self._deliver:
                quiet = self.drain(timeout)
            else:
                quiet = self._wait_quiet(timeout, self._own_finishing() + self._own_inline())
        except BaseException:
            self._reopen()
            raise
        if not quiet:
            self._reopen()  # (what the context knows of its files stays)
            return False
        for f in list(self._files.values()) + self._files_at_fork:
            f.nowait_reads = False  # inline readers handed out answer -1 now
        self._files.clear()
        self._ring_plain.clear()
        self._release_now()
        return self._join_reaper(deadline)

    def _wait_quiet(self, timeout: float | None, own: int) -> bool:
        """close()'s wait of a context that delivers nothing.  In its reaper
        thread (a done-callback closing it), the requests left are finished
        by this thread's reaps -- the rest of the batch it is handing out,
        later completions -- so it reaps while it waits; elsewhere the
        reaper finishes them."""
        cq, ring = self._cq, self._ring
        if ring is None or not ring.usable or not ring.is_reaper():
            return cq.wait_quiet(timeout, own)
        deadline = None if timeout is None else time.monotonic() + timeout

        def quiet() -> bool:
            return cq.outstanding() <= own

        while True:
            ring.reap()
            if quiet():
                return True
            remaining = _time_left(deadline)
            if remaining is not None and remaining <= 0:
                return False
            if not ring.usable:
                return cq.wait_quiet(remaining, own)
            # Bounded: a request finishing on a worker posts no completion.
            ring.wait(0.01 if remaining is None else min(remaining, 0.01), quiet)

    def _release_now(self) -> None:
        """The finalizer's work (release the ring, then the eventfd), done
        here and only then let go of: a Ctrl-C inside it (a finalizer is
        called once) leaves it for the next close() or the collector."""
        release = self._finalizer.peek()
        if release is not None:
            release[1](*release[2])
            self._finalizer.detach()

    def _join_reaper(self, deadline: float | None) -> bool:
        ring = self._ring
        if ring is None or ring.owner_mode:
            return True
        # Its reaper releases the ring (its fd, its mappings) as it ends,
        # which it does at once now: close() returns after that.  (Not from
        # a callback in the reaper itself: join() sees that.)  Bounded by
        # what is left of the timeout, as everything close waits for.
        left = _time_left(deadline)
        return ring.join(None if left is None else max(0.0, left))

    def _reopen(self) -> None:
        with self._cq.lock:
            self._cq.closing = False

    @property
    def closed(self) -> bool:
        with self._cq.lock:
            return self._cq.notifier.closed

    def stats(self) -> ContextStats:
        unseen = _count(self._n_unseen)
        inline = _count(self._n_inline) + unseen
        ring = _count(self._n_ring)
        cq = self._cq
        with cq.lock:
            admitted, delivered = cq.admitted, cq.delivered
            wakeups, batches = cq.wakeups, cq.batches
        return ContextStats(
            submitted=admitted + unseen,
            inline=inline,
            threaded=admitted + unseen - inline - ring,
            ring=ring,
            processed=delivered + unseen,
            outstanding=admitted - delivered,
            wakeups=wakeups,
            batches=batches,
        )

    def _after_fork_in_child(self) -> None:
        # See the module docstring.  The pool already cancelled the
        # parent's requests (and marked them processed); the ring is the
        # parent's: this context uses the threads from now on.
        self._cq.after_fork()
        # (Kept for close(), which turns off the inline readers handed out
        # before the fork: they read through these records.)
        self._files_at_fork += self._files.values()
        self._files.clear()  # their locks may have been held at the fork
        self._ring_plain.clear()
        if self._ring is not None:
            self._ring.abandon_in_child()
        self._ring = None
        self._ring_backend = None
        self.backend = "threads"
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self, _release, self._cq.notifier, self._cq.lock, _weak(None)
        )


#: The frames that hold an admission across an inline attempt (see
#: AioContext._own_inline).
_INLINE_CODES = frozenset(
    (
        AioContext.read.__code__,
        AioContext.write.__code__,
        AioContext._read_checked.__code__,
        AioContext._write_checked.__code__,
    )
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
    _resumed = False
    _on_ring = False
    _ring_ident = 0
    _cancel_asked = False
    _admitted = False
    _exception = None
    _waiters = None
    _callbacks = None
    _fn = None
    _args = ()
    _kwargs = None
    _transfer = None
    _pin = None
    _claim_ref = None
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
        if timeout is not None:
            _check_timeout(timeout)  # (refused as anywhere else: NaN too)
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


def _time_left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _weak(ring: Ring | None) -> Callable[[], Ring | None]:
    return (lambda: None) if ring is None else weakref.ref(ring)


def _release(
    notifier: _Notifier, lock: threading.Lock, ring_ref: Callable[[], Ring | None]
) -> None:
    # (Not given the completion queue, nor the ring but weakly: its ready
    # requests, and the ring's callbacks, refer back to the context, which
    # the finalizer registry would then keep alive for ever.)
    #
    # A context dropped without close() while requests were in its ring's
    # kernel (a read of an empty pipe, say) is garbage together with its
    # ring, its requests and their buffers (a request holds its context:
    # nobody holds any of them).  The collector clears the weak reference
    # first and runs this; then the ring's own finalizer gives up on what
    # is in flight: cancelled, reaped without running any callback, and
    # released once the kernel is done with the buffers (see
    # Ring._abandon).  No request of it is delivered -- nobody could
    # process it, as with the threads, whose workers finish such requests
    # into a ready queue nobody reads.
    ring = ring_ref()
    if ring is not None:
        ring.close()  # first: the kernel writes the eventfd
    with lock:
        notifier.close()


_new_object = object.__new__
_get_ident = threading.get_ident


def _count(counter: itertools.count[int]) -> int:
    """How far an itertools.count has counted (its repr is "count(N)")."""
    return int(repr(counter)[6:-1])


def _copy_range_args(
    sc: Syscalls, dst: AioFile, src: AioFile, src_offset: int, dst_offset: int, length: int
) -> int:
    return ops.copy_range(sc, src, src_offset, dst, dst_offset, length)


# -- fork -------------------------------------------------------------------------------


def _after_fork_in_child() -> None:
    global _io_queue_lock
    _io_queue_lock = threading.Lock()
    for ctx in list(_live_contexts):
        ctx._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
