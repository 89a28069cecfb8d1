"""POSIX asynchronous I/O (IEEE 1003.1 ``aio_*``) for threaded Python code.

This module owns the POSIX interface: :class:`aiocb`, :class:`sigevent`,
``aio_read`` ... ``lio_listio`` and their constants, with glibc's values, and
:class:`PosixAio`, the runtime that carries them out.  The module-level
functions are those of one default runtime.  A runtime runs every request on
the paio engine (:mod:`threadlets.engine`), through one
:class:`~threadlets.engine.AioContext` that delivers nothing: each request's
completion is followed through the request itself.  By default that context
is made on first use with ``backend="auto"`` (io_uring where it can be set
up: reads and writes then finish in the ring's reaper thread, the rest on
the pool).  :func:`set_context` / :func:`use_context` give the runtime
another one; it must be made with ``deliver=False`` (a delivering context
would hold completions back for an owner thread that posix does not have),
and it stays the caller's to close -- requests submitted after it was closed
fail (see below).

Where C returns -1 and sets errno, these functions raise ``OSError`` with
that errno, as the ``os`` module does.

Differences from glibc, on purpose
==================================

* glibc runs one request per file descriptor at a time.  Here requests on
  one fd run in parallel; only what POSIX orders is ordered: writes to an
  ``O_APPEND`` fd land in call order, and ``aio_fsync`` starts only after
  the I/O queued on that fd before it has finished.
* ``aio_reqprio`` is checked (0..AIO_PRIO_DELTA_MAX) but, as requests run in
  parallel, not used to reorder them.
* ``SIGEV_SIGNAL`` sends the signal to the process; a Python signal handler
  cannot see ``sigev_value``.  ``SIGEV_THREAD`` calls ``function(value)``
  on a thread of a queue kept for notifications (glibc starts a thread
  each; here idle ones are reused), never on the I/O pool, and without a
  practical bound, so functions that wait cannot starve anything; what
  it raises is logged (logger ``threadlets``).
* ``aio_suspend`` and ``lio_listio(LIO_WAIT)`` are not interrupted with
  EINTR (glibc's are, by any handled signal -- the list's own SIGEV_SIGNAL
  notifications too): Python runs signal handlers and resumes the wait
  (PEP 475); a handler that raises ends it with that exception (the
  requests run on).  In the main thread the wait wakes every 50 ms to
  look again, so the handler of a signal that landed as it went to sleep
  (which CPython would run only once the wait ended) runs then.  A
  negative timeout raises EINVAL (glibc times
  out: EAGAIN), a NaN one ValueError (as ``time.sleep``); one longer than
  a lock can wait (inf) waits for ever, as glibc does.
* ``aio_error``/``aio_return`` on an aiocb that was never submitted raise
  EINVAL (glibc reads whatever the struct holds); ``aio_return`` while the
  request is in progress raises EINPROGRESS (undefined in POSIX).
* If handing a request to the engine raises (Ctrl-C, a closed context),
  the exception propagates from the call that submitted it, and the aiocb
  is finished -- with the OSError's errno, else ECANCELED -- so nothing
  waits on it for ever.  What lio_listio accepted is launched or finished
  that way too before the exception propagates.  An aiocb whose request
  the engine already took is not: that request finishes it, as usual
  (finished by the interrupt, its buffer could still be filled): reads
  and writes are handed over with their done-callback and the engine's
  ``taken`` list, on every path.  (One window is left, for aio_fsync and
  transfers of 0 bytes: an interrupt inside the engine's submit, after
  the engine took the request and before it returned it, finishes the
  aiocb while the request runs.)
* Requests run with what the aiocb held when submitted: changing its
  fields while it is in progress changes nothing.
* On an ``O_DIRECT`` fd, a buffer, offset or length that is not aligned
  (for an ``O_APPEND`` write: the end of the file) goes through the
  engine's aligned bounce buffer and succeeds, where glibc's pread/pwrite
  fail EINVAL.
* On the io_uring backend a read or write that waits in the ring having
  moved nothing (an empty pipe or socket) is taken back by ``aio_cancel``
  (IORING_OP_ASYNC_CANCEL): AIO_CANCELED, and it finishes ECANCELED
  having consumed nothing.  glibc answers AIO_NOTCANCELED for it (it is
  running) and it completes once data comes, as on the threads backend.
* ``lio_listio`` checks every entry before any starts: an entry with a
  bad ``aio_reqprio``, opcode or buffer raises (EINVAL, TypeError) and
  none is submitted.  glibc starts the others and marks the bad entry
  EINVAL (LIO_WAIT then fails EIO).  What the system call would refuse
  (a bad fd or offset) is reported through the entry, as in glibc.

What glibc does and we keep: a bad fd (negative, past INT_MAX, not open)
or offset is reported through ``aio_error`` (EBADF, EINVAL), not raised;
a transfer that moved some bytes and then failed reports the bytes moved
(``aio_error`` 0, ``aio_return`` the count), where the engine itself keeps
QEMU's rule (the error) and says how much moved in ``exc.transferred``.

File identity: the engine keeps per-fd state (O_DIRECT alignment, flags,
sticky flush errors).  Each submission reads the fd's identity (F_GETFL
flags, file type, st_dev, st_ino); when it changed since the runtime last saw that fd
number -- the fd was closed and the number reused, or its flags changed --
the runtime makes the context forget the fd before submitting.  Identities
are kept per context (each remembers its own fds).  Cost: an F_GETFL and an
fstat per submission, per fd of a lio_listio list (see ``_identity``).
The same file opened again
with the same flags on the same number is not told apart.

Locking (per runtime): ``_lock`` protects every aiocb's ``_status``/
``_outcome``/``_group``, the per-fd tables and the identities.
An aiocb leaves IDLE/DONE only under ``_lock``, all entries of a list at
once, after every entry was checked.  Engine calls are made without the
lock: an aiocb is *claimed* (INFLIGHT, ``_req`` None) under the lock, then
submitted outside it; the submitting thread stores ``_req`` and registers
the done-callback, which takes the lock to finish the aiocb.  Until ``_req``
is stored, aio_cancel answers NOTCANCELED for it (it is as good as
running), and nothing else but that submitting thread may finish it.  A
claimed aiocb is launched (or finished) even if Ctrl-C lands in between.
aio_read/aio_write's common case (``_submit_one``) claims and launches in
one lock hold; whatever it cannot vouch for goes the general way.  It
-- and the general launch of a read or write (_launch) -- hands the
done-callback to the engine with the request
(AioContext._read_checked), so that callback may finish the aiocb before
``_req`` is stored: it knows its submission by ``_view`` (a new object per
submission, stored in the claim, None once the aiocb is not in progress),
and ``_req`` is stored only while the aiocb still has that view.  If an
interrupt cuts the hand-over short, the engine's ``taken`` list says
whether the request (and so the callback) reached a backend: then the
aiocb stays in progress for it.  An aiocb not in progress has no
``_view``, ``_group`` or ``_sigev`` (each way out of progress clears
them), so the quick claim does not store them again.
``_outcome`` is None until the first submission, ``_RUNNING`` (a
one-item tuple: EINPROGRESS) while the aiocb is in progress, else the
(error, return value) pair, one immutable tuple stored as the aiocb
finishes: aio_error and aio_return read it with one load and no lock, and
so never see an error and a return value of different submissions.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import math
import operator
import os
import signal
import stat
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from threadlets.engine import AioContext, AioRequest, _finishing
from threadlets.ops import MAX_OFFSET
from threadlets.pool import CancelResult, Threadlet, ThreadletQueue, _ContainedCallback
from threadlets.syscalls import NR_FCNTL, NR_FSTAT
from threadlets.syscalls import quick_syscall as _quick_syscall

__all__ = [
    "AIO_ALLDONE",
    "AIO_CANCELED",
    "AIO_NOTCANCELED",
    "AIO_PRIO_DELTA_MAX",
    "LIO_NOP",
    "LIO_NOWAIT",
    "LIO_READ",
    "LIO_WAIT",
    "LIO_WRITE",
    "SIGEV_NONE",
    "SIGEV_SIGNAL",
    "SIGEV_THREAD",
    "PosixAio",
    "aio_cancel",
    "aio_error",
    "aio_fsync",
    "aio_read",
    "aio_return",
    "aio_suspend",
    "aio_write",
    "aiocb",
    "default_runtime",
    "lio_listio",
    "set_context",
    "sigevent",
    "use_context",
]

log = logging.getLogger("threadlets")

AIO_CANCELED = 0
AIO_NOTCANCELED = 1
AIO_ALLDONE = 2
LIO_READ = 0
LIO_WRITE = 1
LIO_NOP = 2
LIO_WAIT = 0
LIO_NOWAIT = 1
SIGEV_SIGNAL = 0
SIGEV_NONE = 1
SIGEV_THREAD = 2
AIO_PRIO_DELTA_MAX = 20

_PRIORITIES = frozenset(range(AIO_PRIO_DELTA_MAX + 1))
_PRIO_0 = 0
#: aio_fildes is a C int: larger numbers cannot name an open file.
_FD_MAX = 2**31 - 1

# aiocb._status; leaving _IDLE/_DONE happens under the runtime's lock.
_IDLE = "idle"  # never submitted
_PENDING = "pending"  # accepted, waiting for an ordering constraint
_INFLIGHT = "inflight"  # claimed: being submitted (_req None) or run by _req
_DONE = "done"

_IN_PROGRESS = frozenset({_PENDING, _INFLIGHT})
#: aiocb._outcome while in progress (None: never submitted).  One item:
#: aio_error reads EINPROGRESS from it, aio_return finds no value.
_RUNNING = (errno.EINPROGRESS,)
_quick_fields = operator.attrgetter(
    "aio_reqprio", "aio_fildes", "aio_offset", "aio_buf", "aio_nbytes", "aio_sigevent"
)
_O_APPEND = os.O_APPEND
_status_of = operator.attrgetter("_status")

#: (F_GETFL flags, st_mode & S_IFMT, st_dev, st_ino): see _identity.
_Identity = tuple[int, int, int, int]
_partial = functools.partial


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)}: {what}")


def _ebadf() -> OSError:
    return OSError(errno.EBADF, os.strerror(errno.EBADF))


def _is_open(fd: int) -> bool:
    if not 0 <= fd <= _FD_MAX:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return False
    return True


def _identity(fd: int) -> _Identity | None:
    """(F_GETFL flags, file type (st_mode & S_IFMT), st_dev, st_ino) of an
    open fd, or None if it is not one.  The type always counts: the
    engine's memory of an fd says whether it is a stream and whether it
    takes positional calls, so a pipe reusing a regular file's number with
    the same flags (or the reverse) must be noticed.  The fstat that gives
    the type gives st_dev and st_ino too, so every reuse by another file is
    noticed.  Both calls keep the GIL where they can
    (syscalls.quick_syscall; see syscall_holding_the_gil for why): a
    submission then hands the ring's reaper no chance to wake for each
    completion."""
    # (Raw system calls take only C ints -- an unprototyped ctypes argument
    # is one: a wider number would be cut to its low bits -- and are not
    # known everywhere; a test sets _quick_syscall None, as portable mode.)
    if not 0 <= fd <= _FD_MAX or _quick_syscall is None:
        return _identity_os(fd)
    flags = _quick_syscall(NR_FCNTL, fd, _F_GETFL)
    st = _Stat()  # (one per call: another thread may run right after the call)
    if flags < 0 or _quick_syscall(NR_FSTAT, fd, st) < 0:
        return None
    # struct stat on x86-64: st_dev, st_ino, st_nlink, then st_mode (32 bits).
    return flags, st[3] & 0o170000, st[0], st[1]


_F_GETFL = fcntl.F_GETFL
_Stat = ctypes.c_uint64 * 18  # struct stat (144 bytes on x86-64)


def _identity_os(fd: int) -> _Identity | None:
    """_identity through the os module (where raw system calls are not
    known)."""
    if not 0 <= fd <= _FD_MAX:
        return None
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        st = os.fstat(fd)
    except OSError:
        return None
    return flags, stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino


def _refusal(op: str, offset: int, length: int, ident: _Identity | None) -> int:
    """The errno pread(2)/pwrite(2) of ``length`` bytes at ``offset``
    answers before moving anything, checked in the kernel's order (glibc's
    aio reports it), or 0.  The engine is not asked: it refuses an offset
    past MAX_OFFSET outright, where the kernel first checks the fd (a
    stream, where pread fails ESPIPE and glibc reads, ignores the offset).
    A transfer of 0 bytes makes glibc's call on a worker (see
    :func:`_no_bytes`), which says the rest."""
    if not 0 <= offset <= MAX_OFFSET:  # (not an off_t: in C, a negative one)
        return errno.EINVAL
    if ident is None or ident[0] & _O_PATH:
        return errno.EBADF
    if ident[0] & _O_ACCMODE == (os.O_WRONLY if op == "read" else os.O_RDONLY):
        return errno.EBADF
    if offset > MAX_OFFSET - length and ident[1] not in _STREAMS:
        return errno.EINVAL
    return 0


def _no_bytes(fd: int, offset: int, write: bool) -> int:
    """A read or write of 0 bytes, as glibc's aio makes it: pread/pwrite,
    then read/write if the fd takes no offset (ESPIPE).  The engine's own
    zero-length transfer is a preadv/pwritev of an empty iovec, which the
    kernel answers 0 without asking the file, where pread(fd, buf, 0)
    reaches it: EISDIR for a directory, EINVAL for an eventfd (which moves
    8 bytes or nothing), ..."""
    try:
        return os.pwrite(fd, b"", offset) if write else len(os.pread(fd, 0, offset))
    except OSError as e:
        if e.errno != errno.ESPIPE:
            raise
    return os.write(fd, b"") if write else len(os.read(fd, 0))


_O_PATH = getattr(os, "O_PATH", 0)
#: File types where pread fails ESPIPE (glibc then reads: the offset is not used).
_STREAMS = frozenset({stat.S_IFIFO, stat.S_IFSOCK})
_WAIT_MAX = threading.TIMEOUT_MAX
#: Longest sleep of a wait in the main thread (see PosixAio._wait).
_SIGNAL_SLICE = 0.05
_get_ident = threading.get_ident
_O_ACCMODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR


def _failed_outcome(req: Threadlet[int]) -> tuple[int, int]:
    """(error, return value) of a finished request that did not simply
    succeed: as glibc, a transfer that moved bytes before its error reports
    the bytes moved."""
    assert isinstance(req, AioRequest)
    err, ret = req.outcome()
    if err and err != errno.ECANCELED:
        moved = getattr(req.exception(), "transferred", 0)
        if type(moved) is int and moved > 0:
            return 0, moved
    return err, ret


def _submit_errno(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.ECANCELED


#: SIGEV_THREAD functions run on a queue of their own, with no practical
#: bound on its threads: glibc starts a thread for each notification, so a
#: function may wait (aio_suspend, a lock, another notification's effect)
#: for as long as it likes.  On a bounded queue shared with other work
#: (the default queue's 64 workers) enough such waiters would take every
#: worker and starve what they wait for.  Idle threads retire as the
#: pool's do.
_SIGEV_THREAD_MAX = 2**31 - 1
_notify_lock = threading.Lock()
_notify: ThreadletQueue | None = None


def _notify_queue() -> ThreadletQueue:
    global _notify
    with _notify_lock:
        if _notify is None or _notify.closed:
            _notify = ThreadletQueue(max_threads=_SIGEV_THREAD_MAX, name="threadlets-sigev")
        return _notify


def _call_notify(fn: Callable[[Any], object], value: object) -> None:
    try:
        fn(value)
    except Exception:
        log.exception("exception in SIGEV_THREAD function %r", fn)


class sigevent:
    """How a finished request notifies: ``SIGEV_NONE``, ``SIGEV_SIGNAL``
    (send ``signo`` to this process) or ``SIGEV_THREAD`` (call
    ``function(value)`` on a worker thread)."""

    __slots__ = ("function", "sigev_notify", "sigev_signo", "sigev_value")

    def __init__(
        self,
        notify: int = SIGEV_NONE,
        signo: int = 0,
        value: object = None,
        function: Callable[[Any], object] | None = None,
    ) -> None:
        self.sigev_notify = notify
        self.sigev_signo = signo
        self.sigev_value = value
        self.function = function

    def __repr__(self) -> str:
        return f"sigevent(notify={self.sigev_notify}, signo={self.sigev_signo})"

    def _check(self) -> None:
        if self.sigev_notify == SIGEV_NONE:
            return
        if self.sigev_notify == SIGEV_SIGNAL:
            if not isinstance(self.sigev_signo, int) or not 0 < self.sigev_signo < signal.NSIG:
                raise _einval(f"bad signal number {self.sigev_signo!r}")
            return
        if self.sigev_notify == SIGEV_THREAD:
            if not callable(self.function):
                raise _einval("SIGEV_THREAD needs a callable function")
            return
        raise _einval(f"bad sigev_notify {self.sigev_notify!r}")

    def _copy(self) -> sigevent | None:
        """What fires at completion, fixed at submission (None: nothing)."""
        if self.sigev_notify == SIGEV_NONE:
            return None
        return sigevent(self.sigev_notify, self.sigev_signo, self.sigev_value, self.function)

    def _fire(self) -> None:
        if self.sigev_notify == SIGEV_SIGNAL:
            os.kill(os.getpid(), self.sigev_signo)
        elif self.sigev_notify == SIGEV_THREAD:
            fn = self.function
            assert fn is not None
            _notify_queue().submit(_call_notify, fn, self.sigev_value)


_SigEvent = sigevent  # (aiocb.__init__ and lio_listio have a parameter `sigevent`)


class aiocb:
    """An asynchronous I/O control block, with the POSIX attribute names.

    ``aio_buf`` is a writable buffer for reads and any bytes-like object for
    writes; ``aio_nbytes`` defaults to its length.  The block may be reused
    once its request has finished.  The request runs with the values the
    fields had when it was submitted.
    """

    __slots__ = (
        "__weakref__",
        "_ctx",
        "_fd",
        "_group",
        "_offset",
        "_op",
        "_outcome",
        "_req",
        "_sigev",
        "_status",
        "_view",
        "aio_buf",
        "aio_fildes",
        "aio_lio_opcode",
        "aio_nbytes",
        "aio_offset",
        "aio_reqprio",
        "aio_sigevent",
    )

    def __init__(
        self,
        fildes: int,
        offset: int = 0,
        buf: Any = None,
        nbytes: int | None = None,
        reqprio: int = 0,
        sigevent: sigevent | None = None,
        lio_opcode: int = LIO_NOP,
    ) -> None:
        if isinstance(fildes, bool) or not isinstance(fildes, int):
            raise TypeError(f"aio_fildes must be an int, not {type(fildes).__name__}")
        self.aio_fildes = fildes
        self.aio_offset = offset
        self.aio_buf = buf
        self.aio_nbytes = nbytes
        self.aio_reqprio = reqprio
        self.aio_sigevent = sigevent
        self.aio_lio_opcode = lio_opcode
        # Written under the runtime's lock (but _req: see the module docstring):
        self._status = _IDLE
        #: (error, return value) once DONE, else None (see the module docstring).
        self._outcome: tuple[int, ...] | None = None
        self._group: _Group | None = None
        # Fixed by each submission while the aiocb is in progress:
        self._req: AioRequest | None = None
        #: The context it was accepted for (whose memory of the fd was
        #: checked), which it is launched on: the general path's (_accept,
        #: read by _launch alone).  A quick submission (_submit_one), which
        #: launches at once, stores none.
        self._ctx: AioContext | None = None
        self._op = ""
        self._fd = fildes
        self._offset = 0
        self._view: memoryview | None = None
        self._sigev: _SigEvent | None = None

    def __repr__(self) -> str:
        return (
            f"aiocb(fildes={self.aio_fildes}, offset={self.aio_offset}, "
            f"nbytes={self.aio_nbytes}, status={self._status})"
        )


class _Group:
    """The requests of one lio_listio call, for its list notification."""

    __slots__ = ("remaining", "sigevent")

    def __init__(self, remaining: int, sigev: sigevent | None) -> None:
        self.remaining = remaining
        self.sigevent = sigev


class _Fd:
    """What must be ordered on one fd (protected by the runtime's lock)."""

    __slots__ = ("active", "appends", "barriers")

    def __init__(self) -> None:
        #: Accepted and not finished, in submission order.
        self.active: dict[aiocb, None] = {}
        #: O_APPEND writes not yet finished; the head is the one running.
        self.appends: deque[aiocb] = deque()
        #: aio_fsync blocks waiting for the I/O queued before them.
        self.barriers: list[tuple[aiocb, set[aiocb]]] = []


#: The table of an fd that has none (it holds no aiocb).
_NO_TABLE = _Fd()


class _After:
    """What a critical section leaves for after the lock is dropped: aiocbs
    claimed for launch, and notifications to send."""

    __slots__ = ("launch", "notify")

    def __init__(self) -> None:
        self.launch: list[aiocb] = []
        self.notify: list[sigevent] = []


#: One entry of a submission: (aiocb, op, buffer or None, identity of its fd).
_Entry = tuple[aiocb, str, "memoryview | None", "_Identity | None"]
_Entries = list[_Entry]  # (the methods' parameter `list` shadows the builtin)


# -- checks made before anything changes -----------------------------------------


def _check_common(cb: object) -> aiocb:
    # (`type(x) is int` first: the exact type is the common case, and bool's
    # type is not int.)
    if type(cb) is not aiocb and not isinstance(cb, aiocb):
        raise TypeError(f"expected an aiocb, not {type(cb).__name__}")
    prio = cb.aio_reqprio
    if type(prio) is not int and (isinstance(prio, bool) or not isinstance(prio, int)):
        raise TypeError(f"aio_reqprio must be an int, not {type(prio).__name__}")
    if not 0 <= prio <= AIO_PRIO_DELTA_MAX:
        raise _einval(f"aio_reqprio {prio} is outside 0..{AIO_PRIO_DELTA_MAX}")
    if cb.aio_sigevent is not None:
        if not isinstance(cb.aio_sigevent, sigevent):
            raise TypeError("aio_sigevent must be a sigevent or None")
        cb.aio_sigevent._check()
    if cb._status is _PENDING or cb._status is _INFLIGHT:  # (checked again under the lock)
        raise _einval("this aiocb is already in progress")
    fd = cb.aio_fildes
    if type(fd) is not int and (isinstance(fd, bool) or not isinstance(fd, int)):
        raise TypeError(f"aio_fildes must be an int, not {type(fd).__name__}")
    offset = cb.aio_offset
    if type(offset) is not int and (isinstance(offset, bool) or not isinstance(offset, int)):
        raise TypeError(f"aio_offset must be an int, not {type(offset).__name__}")
    return cb


def _buffer(cb: aiocb, writable: bool) -> memoryview:
    try:
        view = memoryview(cb.aio_buf)
    except TypeError:
        raise TypeError(
            f"aio_buf must be a buffer (bytes-like object), not {type(cb.aio_buf).__name__}"
        ) from None
    if writable and view.readonly:
        raise TypeError("aio_read needs a writable aio_buf")
    if not view.c_contiguous:
        raise _einval("aio_buf must be contiguous")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    n = cb.aio_nbytes
    if n is None:
        return view
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"aio_nbytes must be an int or None, not {type(n).__name__}")
    if not 0 <= n <= len(view):
        raise _einval(f"aio_nbytes {n} does not fit aio_buf of {len(view)} bytes")
    return view[:n]


def _check_list(items: Iterable[aiocb | None]) -> list[aiocb]:
    # (No bytecode per entry where it can be helped: aio_suspend's list is
    # often long, and an aiocb is true.)
    if (type(items) is list or type(items) is tuple) and set(map(type, items)) <= _LIST_TYPES:
        return list(filter(None, items))
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError("expected a list of aiocb or None")
    out = []
    for c in items:
        if c is None:
            continue
        if not isinstance(c, aiocb):
            raise TypeError(f"expected an aiocb or None in the list, not {type(c).__name__}")
        out.append(c)
    return out


_LIST_TYPES = frozenset({aiocb, type(None)})


def _check_context(context: object) -> None:
    if context is not None:
        if not isinstance(context, AioContext):
            raise TypeError(f"expected an AioContext, not {type(context).__name__}")
        if context.deliver:
            raise ValueError("threadlets.posix needs an AioContext(deliver=False)")


class PosixAio:
    """A POSIX AIO runtime: the lock, the per-fd ordering tables, the fd
    identities and the :class:`~threadlets.engine.AioContext` behind one set
    of ``aio_*`` functions (its methods of the same names).

    ``context`` (optional) must be an ``AioContext(deliver=False)``;
    without one, the runtime makes its own on first use
    (``backend="auto"``).  An aiocb belongs to the runtime that runs it
    until it finishes: wait for it, cancel it and read its status through
    that runtime's methods.  In a forked child, every aiocb the parent had in
    progress reads ECANCELED / -1, and the runtime's own context is made
    afresh (a given one is kept: the engine handles the fork).
    """

    def __init__(self, context: AioContext | None = None) -> None:
        # (An RLock for its owner: see _after_fork_in_child.  Never taken
        # twice by one thread.)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # Protected by _lock:
        self._fds: dict[int, _Fd] = {}
        #: Threads in _cond.wait(): a finished aiocb wakes them only if any.
        self._waiting = 0
        #: The fd identities last seen, per context (what each may remember);
        #: _identities is _tables[_table_ctx], the table of the context in use.
        self._tables: weakref.WeakKeyDictionary[AioContext, dict[int, _Identity]] = (
            weakref.WeakKeyDictionary()
        )
        self._table_ctx: AioContext | None = None
        self._identities: dict[int, _Identity] = {}
        # Replaced under _lock; read by submitting threads without it:
        self._given: AioContext | None = None
        self._own: AioContext | None = None
        # Under _lock: _given is the context of the innermost use_context
        # block still open (one-item lists, in the order they opened: a
        # thread's block may end before another's that opened later), else
        # _base, what set_context gave outside any block.
        self._scopes: list[list[AioContext | None]] = []
        self._base: AioContext | None = None
        if context is not None:
            self.set_context(context)
        _runtimes.add(self)

    def __repr__(self) -> str:
        return f"<PosixAio context={self._given or self._own!r}>"

    # -- the context ------------------------------------------------------------

    @property
    def context(self) -> AioContext:
        """The context requests are submitted to (made on first use)."""
        ctx = self._given
        if ctx is None:
            ctx = self._own
            if ctx is None:
                with self._lock:
                    ctx = self._given if self._given is not None else self._own_context()
        return ctx

    def _own_context(self) -> AioContext:
        """The runtime's own context, made if need be.  With _lock held."""
        if self._own is None:
            self._own = AioContext(deliver=False, backend="auto")
        return self._own

    def set_context(self, context: AioContext | None) -> AioContext | None:
        """Submit later requests to ``context`` (an ``AioContext(deliver=False)``;
        None: the runtime's own).  Requests in progress finish where they
        run.  Returns the context given before (None if none was).  Inside
        a use_context block, it replaces that block's context."""
        _check_context(context)
        with self._lock:
            previous = self._given
            if self._scopes:
                self._scopes[-1][0] = context
            else:
                self._base = context
            self._given = context
        return previous

    @contextlib.contextmanager
    def use_context(self, context: AioContext | None) -> Iterator[AioContext]:
        """``with runtime.use_context(ctx):`` -- requests go to ``ctx`` in
        the block (None: the runtime's own); after it, to the context of
        the innermost block still open, else to what set_context gave.
        Blocks of several threads may end in any order."""
        _check_context(context)
        scope = [context]
        with self._lock:
            self._scopes.append(scope)
            self._given = context
        try:
            if context is not None:
                yield context
            else:
                with self._lock:
                    own = self._own_context()
                yield own
        finally:
            with self._lock:
                self._scopes = [s for s in self._scopes if s is not scope]
                self._given = self._scopes[-1][0] if self._scopes else self._base

    # -- submission ---------------------------------------------------------------

    def aio_read(self, cb: aiocb) -> None:
        """Queue a read of ``aio_nbytes`` at ``aio_offset`` into ``aio_buf``."""
        self._submit_one(cb, "read")

    def aio_write(self, cb: aiocb) -> None:
        """Queue a write of ``aio_buf[:aio_nbytes]`` at ``aio_offset`` (at the
        end of the file, in call order, for an O_APPEND fd)."""
        self._submit_one(cb, "write")

    def _submit_one(self, cb: aiocb, op: str) -> None:
        """aio_read / aio_write.  The common case in the fewest steps: an
        aiocb (not a subclass) without a sigevent, a flat buffer, sane
        numbers, an fd that is not O_APPEND (nothing then orders a read or
        a write: fsync barriers wait for them, not the reverse) and whose
        identity this runtime already noted for the context in use.  It is
        claimed in one lock hold and launched at once.  Anything else --
        and whatever the quick look cannot vouch for -- takes the general
        path, which checks everything again -- as does every submission
        where raw system calls are not known (see _identity).  (Each step
        here is counted: benchmarks/bytecodes_per_request.py.)"""
        if cb.__class__ is not aiocb:  # (no call: see below)
            self._submit_checked(cb, op)
            return
        # (The fields in one call: no bytecode each.  `x.__class__ is int`:
        # type(x) is int without the call -- a bool's or a float's class
        # cannot pretend, and an int subclass that does is an int, which the
        # general path takes too.  No C call here that costs more than the
        # bytecodes it saves: a dotted attrgetter of the classes, or `fd in
        # range(...)`, cost more time than these tests.)
        # (`prio is _PRIO_0`: the int 0 itself, CPython's one object for it
        # -- what aiocb() gives -- in one test; any other goes the long way
        # round.  `not fd >> 31`: 0 <= fd <= _FD_MAX for an int, in fewer
        # steps.)
        prio, fd, offset, buf, n, sev = _quick_fields(cb)
        if not (
            sev is None
            and (prio is _PRIO_0 or (prio.__class__ is int and prio in _PRIORITIES))
            and fd.__class__ is int
            and offset.__class__ is int
            and not fd >> 31  # (a C int: see _identity)
            and _quick_syscall is not None  # (as in portable mode: see _identity)
        ):
            self._submit_checked(cb, op)
            return
        try:
            # (What _buffer checks, in one call: a C-contiguous buffer.)
            view = memoryview(buf).cast("B")
        except (TypeError, ValueError):
            self._submit_checked(cb, op)  # (raises what fits)
            return
        if n is not None:
            if n.__class__ is not int or not 0 <= n <= len(view):
                self._submit_checked(cb, op)
                return
            view = view[:n]
        # (0 bytes: glibc's own call, on a worker; see _no_bytes.  An
        # offset the kernel refuses: _refusal.)
        if (
            not view
            or (view.readonly and op == "read")
            or offset < 0
            or offset > MAX_OFFSET - view.nbytes
        ):
            self._submit_checked(cb, op)
            return
        # The fd's identity: _identity, written out (one call fewer).  A
        # failed F_GETFL makes flags -1, which no noted identity has (and
        # which has O_APPEND): the general path then looks again.
        flags = _quick_syscall(NR_FCNTL, fd, _F_GETFL)
        st = _Stat()  # (one per call: another thread may run right after the call)
        if _quick_syscall(NR_FSTAT, fd, st) < 0 or (op == "write" and flags & _O_APPEND):
            self._submit_checked(cb, op)
            return
        ident = flags, st[3] & 0o170000, st[0], st[1]
        claimed = False
        try:
            with self._lock:
                # (The context read under the lock: set_context() comes
                # before this claim or after it, as after the general
                # path's own look in _launch.  None, none made yet, has no
                # table: _table_ctx is None only with _identities empty.)
                ctx = self._given or self._own
                if (
                    ctx is self._table_ctx
                    and cb._status not in _IN_PROGRESS
                    and self._identities.get(fd) == ident
                ):
                    state = self._fds.get(fd)
                    if state is None:
                        state = self._new_fd(fd)
                    # (No call from here on: an interrupt lands before all
                    # of it or after all of it.  An aiocb not in progress
                    # has no _group, _sigev or _view: _finish, the
                    # completion and the fork reset clear them.  _req too,
                    # but for one case: a child forked by a signal handler
                    # inside _launch's engine call, whose thread goes on to
                    # store the request there after the reset.  _view, a
                    # new object per submission, also tells this
                    # submission's request apart: see below.)
                    cb._op = op
                    cb._fd = fd
                    cb._req = None  # (see below: a fork's reset may leave one)
                    cb._view = view
                    cb._outcome = _RUNNING
                    state.active[cb] = None
                    cb._status = _INFLIGHT
                    claimed = True
        finally:
            if claimed:  # (launched even if Ctrl-C lands as the lock is let go)
                taken: list[AioRequest] = []  # (see _read_checked)
                try:
                    # The callback goes with the request (stored before it
                    # is published): it may run before the call returns,
                    # so it knows cb's request by the view, not by _req
                    # (None until stored below).
                    fin = _ContainedCallback(self._quick_finished, cb, view, state)
                    if op == "read":
                        req = ctx._read_checked(fd, offset, view, fin, taken)  # type: ignore[union-attr]
                    else:
                        req = ctx._write_checked(fd, offset, view, fin, taken)  # type: ignore[union-attr]
                    if cb._view is view:
                        # Not finished yet by its callback (plain bytecodes:
                        # no other thread comes between the test and the
                        # store; _view is None once cb is not in progress):
                        # for aio_cancel and _rewatch, as _launch leaves it.
                        cb._req = req
                        if req._callbacks is None:
                            # Not taken (read()/write() answered: see
                            # _read_checked): as _launch does, _req first.
                            req.add_done_callback(_partial(self._request_finished, cb))
                except BaseException as e:
                    if taken:
                        # Interrupted, but the engine has the request, and
                        # its callback (fin) finishes cb: reported finished
                        # now, cb's buffer could be filled after the caller
                        # got it back.  (_req for aio_cancel, as above.)
                        if cb._view is view:
                            cb._req = taken[0]
                            # (A write finished inline went without fin: see
                            # _write_checked.  Twice is harmless.)
                            self._rewatch(cb)
                        raise
                    after = _After()
                    try:
                        self._launch_failed(cb, e, after)
                    finally:
                        self._run(after, raising=True)
                    raise
        if not claimed:
            # In progress (the general path raises EINVAL), an fd whose
            # identity must be noted first, or another context in use.
            self._submit_checked(cb, op)

    def _submit_checked(self, cb: aiocb, op: str) -> None:
        """aio_read / aio_write, every check spelled out."""
        _check_common(cb)
        view = _buffer(cb, writable=op == "read")
        self._submit([(cb, op, view, _identity(cb.aio_fildes))], None)

    def aio_fsync(self, op: int, cb: aiocb) -> None:
        """Queue an fsync (``op`` os.O_SYNC) or fdatasync (os.O_DSYNC) of
        ``aio_fildes`` that completes after the I/O queued on it before."""
        dsync = getattr(os, "O_DSYNC", -1)
        if op not in (os.O_SYNC, dsync):
            raise _einval("op must be os.O_SYNC or os.O_DSYNC")
        _check_common(cb)
        ident = _identity(cb.aio_fildes)
        if ident is None:
            raise _ebadf()
        self._submit([(cb, "fsync" if op == os.O_SYNC else "fdatasync", None, ident)], None)

    def lio_listio(
        self, mode: int, list: Sequence[aiocb | None], sigevent: sigevent | None = None
    ) -> None:
        """Submit a list of reads and writes (``aio_lio_opcode`` LIO_READ,
        LIO_WRITE, or LIO_NOP to skip).  Every entry is checked before any
        starts: one bad entry raises, and none is submitted.

        LIO_WAIT waits for all of them and raises OSError(EIO) if any failed
        (each aiocb keeps its own status).  LIO_NOWAIT returns at once; each
        request's own notification fires, and ``sigevent`` once all are done.
        """
        if mode not in (LIO_WAIT, LIO_NOWAIT):
            raise _einval(f"bad mode {mode!r}")
        cbs = _check_list(list)
        if sigevent is not None:
            if not isinstance(sigevent, _SigEvent):
                raise TypeError("sigevent must be a sigevent or None")
            sigevent._check()
        work: _Entries = []
        for c in cbs:
            op = c.aio_lio_opcode
            if op == LIO_NOP:
                continue
            if op not in (LIO_READ, LIO_WRITE):
                raise _einval(f"bad aio_lio_opcode {op!r}")
            _check_common(c)
            view = _buffer(c, op == LIO_READ)
            work.append((c, "read" if op == LIO_READ else "write", view, None))
        if len({id(c) for c, _, _, _ in work}) != len(work):
            raise _einval("the same aiocb appears twice in the list")
        # One identity per fd of the list: its entries are accepted at once
        # (a close racing with this call may precede or follow all of them).
        idents: dict[int, _Identity | None] = {}
        for i, entry in enumerate(work):
            fd = entry[0].aio_fildes
            if fd not in idents:
                idents[fd] = _identity(fd)
            work[i] = (entry[0], entry[1], entry[2], idents[fd])
        group_sigev = None if mode == LIO_WAIT or sigevent is None else sigevent._copy()
        if not work:
            if group_sigev is not None:
                group_sigev._fire()
            return
        self._submit(work, _Group(len(work), group_sigev))
        if mode == LIO_NOWAIT:
            return
        self._send_held()
        with self._lock:
            while any(c._status is not _DONE for c, _, _, _ in work):
                self._wait(None)
            failed = any(c._outcome is None or c._outcome[0] for c, _, _, _ in work)
        if failed:
            raise OSError(errno.EIO, "at least one request of the list failed")

    def _submit(self, entries: _Entries, group: _Group | None) -> None:
        """Accept checked entries, all or none, then launch what may start."""
        ctx = self.context
        after = _After()
        try:
            with self._lock:
                for cb, _, _, _ in entries:
                    if cb._status is _PENDING or cb._status is _INFLIGHT:
                        raise _einval("this aiocb is already in progress")
                accepted = 0
                try:
                    for cb, op, view, ident in entries:
                        self._accept(ctx, cb, op, view, ident, group, after)
                        accepted += 1
                finally:
                    # (What started and finished here was never seen in
                    # progress by a waiter: nobody to wake.)
                    if accepted < len(entries):  # (an interrupt: Ctrl-C)
                        self._interrupted(entries[accepted][0], entries, group, after)
        finally:
            self._run(after, raising=True)  # (what was claimed, even after an interrupt)

    def _interrupted(
        self, cb: aiocb, entries: _Entries, group: _Group | None, after: _After
    ) -> None:
        """An interrupt cut _accept short at ``cb``: finish it unless it was
        claimed, and let the group wait only for what is in progress.  With
        _lock held."""
        if cb._status is _PENDING or (cb._status is _INFLIGHT and cb not in after.launch):
            self._finish(cb, errno.ECANCELED, -1, after)
        elif cb._status is not _INFLIGHT and cb._group is group:
            cb._group = None  # it never got in progress
        if group is not None and group.remaining > 0:
            group.remaining = sum(1 for c, _, _, _ in entries if c._group is group)
            if group.remaining == 0 and group.sigevent is not None:
                after.notify.append(group.sigevent)

    def _accept(
        self,
        ctx: AioContext,
        cb: aiocb,
        op: str,
        view: memoryview | None,
        ident: _Identity | None,
        group: _Group | None,
        after: _After,
    ) -> None:
        """Take a checked aiocb in progress: claim it for launch, or queue it
        behind what POSIX orders it after.  With _lock held."""
        fd = cb.aio_fildes
        offset = cb.aio_offset
        cb._op = op
        cb._fd = fd
        cb._offset = offset
        cb._view = view
        cb._group = group
        cb._sigev = None if cb.aio_sigevent is None else cb.aio_sigevent._copy()
        cb._req = None
        cb._ctx = ctx
        cb._outcome = _RUNNING
        cb._status = _PENDING
        self._note_identity(ctx, fd, ident)
        err = errno.EBADF if ident is None else 0
        if view is not None:
            err = _refusal(op, offset, len(view), ident)
            if not err and offset > MAX_OFFSET - len(view):
                cb._offset = 0  # a stream: the offset is not used
        if err or ident is None:
            # As glibc: the system call refuses it, so the status says so.
            self._finish(cb, err, -1, after)
            return
        state = self._fds.get(fd)
        if state is None:
            state = self._new_fd(fd)
        if view is None:  # fsync / fdatasync
            before = {c for c in state.active if c._op in {"read", "write"}}
            state.active[cb] = None
            if before:
                state.barriers.append((cb, before))
                return
        else:
            state.active[cb] = None
            if op == "write" and ident[0] & os.O_APPEND:
                state.appends.append(cb)
                if len(state.appends) > 1:
                    return
        cb._status = _INFLIGHT
        after.launch.append(cb)

    def _new_fd(self, fd: int) -> _Fd:
        """The table of an fd that had none: stored, and returned.  With
        _lock held.  setdefault: a signal handler submitting on this fd may
        run at _Fd()'s entry, inside this lock (an RLock), and its table is
        kept, not replaced (a look, then a store, would let one run between
        the two).  A Ctrl-C as setdefault returns stored a table nobody
        holds: it is taken out again if still empty, or it stayed for good
        (no aiocb of it would ever finish to remove it)."""
        try:
            return self._fds.setdefault(fd, _Fd())
        except BaseException:
            left = self._fds.get(fd)
            if left is not None and not left.active:
                del self._fds[fd]
            raise

    def _note_identity(self, ctx: AioContext, fd: int, ident: _Identity | None) -> None:
        """Remember what ``fd`` is for ``ctx``, and make ``ctx`` forget what
        it knew of the number if another file (or other flags) took it.
        With _lock held."""
        if self._table_ctx is not ctx:
            self._identities = self._tables.setdefault(ctx, {})
            self._table_ctx = ctx
        known = self._identities.get(fd)
        if known == ident:
            return
        if known is not None:
            # Closed, or reused for another file, or its flags changed: what
            # the engine remembers about this fd number is stale.
            ctx.forget(fd)
        if ident is None:
            self._identities.pop(fd, None)
        else:
            self._identities[fd] = ident

    def _run(self, after: _After, raising: bool) -> None:
        """After the lock is dropped: submit every claimed aiocb (finishing
        the ones the engine refuses), then send every notification.  Then
        the first exception propagates if ``raising`` (the submitter's own
        call) or if it is not an Exception (Ctrl-C); otherwise the aiocb
        reports a refused submission, and a notification that could not be
        sent is logged."""
        first: BaseException | None = None
        launch = after.launch
        i = 0
        while True:
            try:
                while i < len(launch):  # (finishing one may claim more)
                    cb = launch[i]
                    i += 1
                    try:
                        self._launch(cb)
                    except BaseException as e:
                        first = first or e
                        self._launch_failed(cb, e, after)
                break
            except BaseException as e:
                # Ctrl-C between two launches: what is claimed still goes
                # (a claimed aiocb nobody launches stays in progress for good).
                first = first or e
        launch.clear()
        for sev in after.notify:
            try:
                sev._fire()
            except BaseException as e:
                if not raising and isinstance(e, Exception):
                    log.exception("could not send the notification %r", sev)
                first = first or e
        if first is not None and (raising or not isinstance(first, Exception)):
            raise first

    def _launch(self, cb: aiocb) -> None:
        """Hand a claimed aiocb to the engine it was accepted for.  Without
        _lock."""
        ctx = cb._ctx
        current = self._given or self._own
        if ctx is not current:
            # set_context() since it was accepted (it waited behind an
            # O_APPEND write or for an fsync's turn): it runs on the context
            # in use now -- after set_context(None) the runtime's own, made
            # here if it was not yet -- once that one's memory of the fd is
            # checked.
            current = self.context
            ident = _identity(cb._fd)
            with self._lock:
                self._note_identity(current, cb._fd, ident)
            ctx = cb._ctx = current
        assert ctx is not None
        view = cb._view
        if view is None:
            req = ctx.flush(cb._fd, datasync=cb._op == "fdatasync")
        elif not view.nbytes:  # (no call: an interrupt lands after one)
            req = ctx.call(_no_bytes, cb._fd, cb._offset, cb._op == "write")
        else:
            # A read or write, handed over as the quick path does: its
            # callback goes with the request, knowing it by the view (a new
            # object per submission), and `taken` says whether a backend
            # has it if an interrupt cuts the hand-over short -- then cb
            # stays in progress for it (_launch_failed: _rewatch), not
            # finished ECANCELED while the request runs.
            taken: list[AioRequest] = []
            fin = _partial(self._request_finished, cb, launched=view)
            try:
                if cb._op == "read":
                    req = ctx._read_checked(cb._fd, cb._offset, view, fin, taken)
                else:
                    req = ctx._write_checked(cb._fd, cb._offset, view, fin, taken)
            except BaseException:
                if taken and cb._view is view:
                    cb._req = taken[0]
                raise
            if cb._view is view:  # (not finished yet by its callback)
                cb._req = req
                if req._callbacks is None:  # (not taken: read()/write() answered)
                    req.add_done_callback(_partial(self._request_finished, cb))
            return
        # Stored before the callback can run: it checks that it is cb's request.
        cb._req = req
        req.add_done_callback(_partial(self._request_finished, cb))

    def _launch_failed(self, cb: aiocb, exc: BaseException, after: _After) -> None:
        if self._rewatch(cb):
            return
        with self._lock:
            if cb._status is _INFLIGHT and cb._req is None:
                self._finish(cb, _submit_errno(exc), -1, after)
                self._cond.notify_all()

    def _rewatch(self, cb: aiocb) -> bool:
        """After an interrupt: if an engine request runs cb, make sure its
        callback will finish cb (registered twice is harmless: the second
        call finds cb no longer INFLIGHT with that request)."""
        req = cb._req
        if req is None:
            return False
        req.add_done_callback(_partial(self._request_finished, cb))
        return True

    # -- completion ----------------------------------------------------------------

    def _request_finished(
        self,
        cb: aiocb,
        req: Threadlet[int],
        launched: memoryview | None = None,
    ) -> None:
        # cb's request is ``req`` if cb._req says so, or -- where the
        # callback went with the request, before cb._req could be stored --
        # if cb._view is that submission's view (a new object per
        # submission, None once cb is not in progress): ``launched``, from
        # the general path (_launch).  (The quick path's: _quick_finished.)
        # (A finished request's outcome is final: read without its lock.)
        ret = req._result
        if req._exception is None and ret.__class__ is int:
            outcome = (0, ret)
        else:
            outcome = _failed_outcome(req)
        after = None
        try:
            with self._lock:
                if launched is None:
                    if cb._status is not _INFLIGHT or cb._req is not req:
                        return
                elif cb._view is not launched:
                    return
                fd = cb._fd
                try:
                    state = self._fds[fd]
                except KeyError:
                    state = _NO_TABLE  # (cb is not in it: _finish)
                if (
                    cb in state.active  # (else _finish: see _accept's re-entry)
                    and not state.barriers
                    and cb._sigev is None
                    and cb._group is None
                    and not state.appends
                ):
                    # _finish's common case, written out: nothing to notify,
                    # nothing ordered behind it.  (No call: an interrupt
                    # lands before all of it or after all of it.)
                    cb._outcome = outcome
                    cb._status = _DONE
                    cb._view = None
                    cb._req = None
                    cb._ctx = None
                    active = state.active
                    del active[cb]
                    if not active:
                        del self._fds[fd]
                    if self._waiting:
                        # In the ring's reaper, waiters are woken once per
                        # batch of completions.  (The context in use, not
                        # cb's, which is cleared: the answer says only
                        # whether this thread is handing out a batch --
                        # another context's reaper has its waiters woken
                        # at once.)
                        ctx = self._given or self._own
                        batched = False
                        try:
                            batched = ctx is not None and ctx.call_after_batch(self._wake_waiters)
                        finally:  # (woken now if Ctrl-C lands in the call)
                            if not batched:
                                self._cond.notify_all()
                else:
                    after = _After()
                    try:
                        self._finish(cb, outcome[0], outcome[1], after)
                    finally:  # (the waiters see cb finished even if Ctrl-C lands)
                        if self._waiting:
                            self._cond.notify_all()
        finally:
            # (What finishing cb claimed is launched even if Ctrl-C lands as
            # the lock is let go: cancel() runs this in the caller's thread.)
            if after is not None:
                self._run(after, raising=False)

    def _quick_finished(self, cb: aiocb, view: memoryview, state: _Fd, req: Threadlet[int]) -> None:
        """_request_finished for a quick submission (_submit_one: no
        sigevent, no group, not an O_APPEND write), whose callback goes
        with the request: cb's request if cb._view is still ``view``.
        ``state`` is the table of cb's fd the submission put cb in: while
        cb is in progress with ``view`` and in that table, it is the
        table in ``_fds`` (a table leaves ``_fds`` only empty, or in a
        forked child's reset, which ended cb's progress), so it is not
        looked up again.  A
        _ContainedCallback: no code of the user's runs here but where
        finishing cb releases others (an fsync barrier's turn, with its
        notifications), and there the request counts as this thread's, as
        the engine's long way counts it (see AioRequest._finished)."""
        # (A finished request's outcome is final: read without its lock.)
        ret = req._result
        if req._exception is None and ret.__class__ is int:
            outcome = (0, ret)
        else:
            outcome = _failed_outcome(req)
        after = None
        try:
            with self._lock:
                if cb._view is not view:
                    return
                active = state.active
                if cb in active and not state.barriers:
                    # As in _request_finished, but for _ctx: a quick
                    # submission stores none (only _launch reads it).  (No
                    # call: an interrupt lands before all of it or after
                    # all of it.)
                    cb._outcome = outcome
                    cb._status = _DONE
                    cb._view = None
                    cb._req = None
                    del active[cb]
                    if not active:
                        del self._fds[cb._fd]  # (state: see above)
                    if self._waiting:
                        ctx = self._given or self._own
                        batched = False
                        try:
                            batched = ctx is not None and ctx.call_after_batch(self._wake_waiters)
                        finally:  # (woken now if Ctrl-C lands in the call)
                            if not batched:
                                self._cond.notify_all()
                    return
                after = _After()
                try:
                    self._finish(cb, outcome[0], outcome[1], after)
                finally:  # (the waiters see cb finished even if Ctrl-C lands)
                    if self._waiting:
                        self._cond.notify_all()
        finally:
            if after is not None:
                # (As in _request_finished.  What runs here may be a
                # signal's handler, the user's: the request counts as this
                # thread's while it runs, so that a close() of its context
                # there does not wait for it.)
                own = _finishing.requests
                try:
                    own.append(req)  # type: ignore[arg-type]
                finally:
                    try:
                        self._run(after, raising=False)
                    finally:
                        if own and own[-1] is req:
                            del own[-1]

    def _wake_waiters(self) -> None:
        with self._lock:
            self._cond.notify_all()

    def _finish(self, cb: aiocb, err: int, ret: int, after: _After) -> None:
        """Finish an aiocb, claim what waited for it (in ``after.launch``),
        queue its notifications (in ``after.notify``).  With _lock held;
        the caller wakes the waiters and runs ``after`` -- in a finally:
        what this claimed is there even if an interrupt cut it short.  No
        call until the aiocb is DONE, off its fd's table and counted in its
        group (an interrupt lands before all of that or after), none until
        its notifications are queued; then the claims, which an interrupt
        does not cut short (see _release_ordered)."""
        cb._outcome = (err, ret)
        cb._status = _DONE
        cb._view = None
        cb._req = None
        cb._ctx = None
        sev = cb._sigev
        group = cb._group
        cb._sigev = None
        cb._group = None
        group_sev = None
        if group is not None:
            group.remaining -= 1
            if group.remaining == 0:
                group_sev = group.sigevent
        fd = cb._fd
        state: _Fd | None
        try:
            state = self._fds[fd]
            del state.active[cb]
        except KeyError:
            state = None  # (never queued on the fd: refused at acceptance)
        # (A list extended by `+=`, not a call: no interrupt between the two.)
        if group_sev is not None:
            after.notify += (group_sev,) if sev is None else (sev, group_sev)
        elif sev is not None:
            after.notify += (sev,)
        if state is None:
            left = self._fds.get(fd)
            if left is not None and not left.active:
                # Made for cb, which an interrupt cut short before it went in
                # (a Ctrl-C at a function entry of _accept): nobody else
                # would remove it.
                del self._fds[fd]
            return
        if not state.active:
            del self._fds[fd]  # (nothing waits on a table with nothing in it)
            return
        if state.appends or state.barriers:
            try:
                self._release_ordered(cb, state, after)
            except BaseException:
                # An interrupt (Ctrl-C) between two steps: what it did not
                # claim yet would wait for good -- cb, which it waited for,
                # is finished and will not finish again.
                self._release_ordered(cb, state, after)
                raise

    def _release_ordered(self, cb: aiocb, state: _Fd, after: _After) -> None:
        """Claim for launch what waited on the fd for ``cb``, finished: the
        next O_APPEND write, an aio_fsync whose I/O all finished.  With
        _lock held.  Idempotent: run again after an interrupt, it finishes
        the job (each finished head is popped, each claim made once, cb
        taken out of every barrier)."""
        appends = state.appends
        if appends:
            if appends[0] is not cb and cb in appends:
                appends.remove(cb)  # (finished while it waited its turn: cancelled)
            while appends and appends[0]._status is _DONE:
                appends.popleft()
            if appends and appends[0]._status is _PENDING:
                nxt = appends[0]
                nxt._status = _INFLIGHT
                after.launch.append(nxt)
        if state.barriers:
            still: list[tuple[aiocb, set[aiocb]]] = []
            for fsync_cb, waiting in state.barriers:
                waiting.discard(cb)
                if fsync_cb._status is not _PENDING:
                    continue
                if waiting:
                    still.append((fsync_cb, waiting))
                else:
                    fsync_cb._status = _INFLIGHT
                    after.launch.append(fsync_cb)
            state.barriers = still

    # -- status -------------------------------------------------------------------

    def _status(self, cb: object) -> tuple[int, ...]:
        """aio_error/aio_return's long way: the (error, return value) pair
        of a submitted aiocb, or _RUNNING while it is in progress."""
        if not isinstance(cb, aiocb):
            raise TypeError(f"expected an aiocb, not {type(cb).__name__}")
        outcome = cb._outcome
        if outcome is None:
            with self._lock:
                if cb._status is _IDLE:
                    raise _einval("this aiocb was never submitted")
                outcome = cb._outcome
        assert outcome is not None
        return outcome

    def aio_error(self, cb: aiocb) -> int:
        """EINPROGRESS while in progress; then 0 or the errno (ECANCELED if
        cancelled)."""
        # One load of the (error, return value) pair, or of _RUNNING: see
        # the module docstring.  (None, never submitted: the long way.)
        if cb.__class__ is aiocb:  # (isinstance's answer, without the call)
            try:
                return cb._outcome[0]  # type: ignore[index]
            except TypeError:
                pass
        return self._status(cb)[0]

    def aio_return(self, cb: aiocb) -> int:
        """The byte count of a finished request, or -1 if it failed."""
        if cb.__class__ is aiocb:  # (isinstance's answer, without the call)
            try:
                return cb._outcome[1]  # type: ignore[index]
            except (TypeError, IndexError):  # (never submitted; _RUNNING)
                pass
        outcome = self._status(cb)
        if outcome is _RUNNING:
            raise OSError(errno.EINPROGRESS, "the request is still in progress")
        return outcome[1]

    def aio_cancel(self, fildes: int, cb: aiocb | None = None) -> int:
        """Cancel ``cb``, or every request on ``fildes``.

        AIO_CANCELED if all targeted requests were cancelled, AIO_NOTCANCELED
        if at least one is running (it completes normally), AIO_ALLDONE if
        none was outstanding.  A cancelled request still gets its
        notification.
        """
        if isinstance(fildes, bool) or not isinstance(fildes, int):
            raise TypeError(f"fildes must be an int, not {type(fildes).__name__}")
        if not _is_open(fildes):
            raise _ebadf()
        if cb is not None:
            if not isinstance(cb, aiocb):
                raise TypeError(f"expected an aiocb or None, not {type(cb).__name__}")
            if cb.aio_fildes != fildes:
                raise _einval("the aiocb is for another file descriptor")
        after = _After()
        running: list[AioRequest] = []
        targets: list[aiocb] = []
        cancelled = 0
        launching = False
        try:
            with self._lock:
                state = self._fds.get(fildes)
                targets = [] if state is None else list(state.active)
                if cb is not None:
                    targets = [cb] if cb in targets else []
                for c in targets:
                    if c._status is _PENDING:
                        self._finish(c, errno.ECANCELED, -1, after)
                        cancelled += 1
                    elif c._status is _INFLIGHT:
                        if c._req is None:
                            launching = True  # being submitted: as good as running
                        else:
                            running.append(c._req)
                if cancelled:
                    self._cond.notify_all()
            # Without _lock: a cancel finishes the request, whose callback takes it.
            outcomes = [r.cancel() for r in running]
        except BaseException:
            for c in targets:  # (an interrupt may have cut a callback short)
                self._rewatch(c)
            raise
        finally:
            self._run(after, raising=True)
        if not targets:
            return AIO_ALLDONE
        if launching or CancelResult.NOTCANCELED in outcomes:
            return AIO_NOTCANCELED
        if cancelled + outcomes.count(CancelResult.CANCELED) == 0:
            return AIO_ALLDONE
        return AIO_CANCELED

    def aio_suspend(self, list: Sequence[aiocb | None], timeout: float | None = None) -> None:
        """Wait until at least one request of ``list`` is no longer in
        progress (None entries are ignored).  Raises OSError(EAGAIN) on
        timeout."""
        cbs = _check_list(list)
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
            if isinstance(timeout, float) and math.isnan(timeout):
                raise ValueError("Invalid value NaN (not a number)")
            if timeout < 0:
                raise _einval("timeout must be >= 0")
        self._send_held()
        with self._lock:
            # (The statuses are gathered without bytecode per entry: the
            # list is often long.)
            if not cbs or not set(map(_status_of, cbs)) <= _IN_PROGRESS:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise OSError(errno.EAGAIN, "aio_suspend timed out")
                # (A timeout past what a lock can wait -- inf, 1e300 -- is
                # waited in TIMEOUT_MAX steps.)
                self._wait(None if remaining is None else min(remaining, _WAIT_MAX))
                if not set(map(_status_of, cbs)) <= _IN_PROGRESS:
                    return

    def _wait(self, timeout: float | None) -> None:
        """_cond.wait, counted in _waiting.  With _lock held.  The caller
        checks again after it, whatever woke it.

        In the main thread the wait lasts at most _SIGNAL_SLICE: CPython
        runs a signal handler only between bytecodes, and a lock wait runs
        the handlers of the signals that interrupt it -- but a signal that
        lands as the thread goes to sleep (after the last check, before the
        futex wait: the GIL handed to the sending thread there makes that
        likely) interrupts nothing, and its handler waited for the wait to
        end: for ever if the handler is what would finish a request of the
        list (aio_suspend without a timeout, lio_listio(LIO_WAIT)), and in
        a child forked by a handler that ran as this thread was about to
        sleep, for ever whatever happens (nothing wakes the parent's
        condition there)."""
        if _get_ident() == threading.main_thread().ident:
            timeout = _SIGNAL_SLICE if timeout is None else min(timeout, _SIGNAL_SLICE)
        self._waiting += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiting -= 1

    def _send_held(self) -> None:
        """Before this thread sleeps: what its burst of submissions left held
        back for the ring's reaper goes now, in one io_uring_enter."""
        ctx = self._given or self._own
        if ctx is not None:
            ctx.send_held()

    # -- fork ------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In the child the parent's requests are not ours to finish: the pool
        marked their threadlets CANCELLED; mark their aiocbs so too.

        The lock and the condition stay the same objects: the forking thread
        may be inside a posix call (a signal handler forked there) and goes
        on with them.  A lock held by a thread that is not here is let go
        for it (_lock is an RLock, so the child can tell: one this thread
        holds it lets go itself); a wait the forking thread goes on with is
        woken, and finds its aiocbs finished."""
        lock = self._lock
        if not lock._is_owned():  # type: ignore[attr-defined]
            if lock.acquire(False):
                lock.release()
            else:
                # (What Condition.wait lets go with; it does not ask whose it is.)
                lock._release_save()  # type: ignore[attr-defined]
        # (_waiting keeps counting the parent's waiting threads: the forking
        # thread's own wait counts itself out as it ends, and a count too
        # high only wakes nobody.)
        with lock:
            self._cond.notify_all()  # (the parent's waiters are let go too)
        for state in self._fds.values():
            for c in state.active:
                c._outcome = (errno.ECANCELED, -1)
                c._status = _DONE
                c._req = None
                c._ctx = None
                c._view = None
                c._group = None
                c._sigev = None
        self._fds.clear()
        if self._own is not None and self._table_ctx is self._own:
            self._table_ctx = None
            self._identities = {}
        self._own = None  # (a given context is the caller's: the engine handles it)


_runtimes: weakref.WeakSet[PosixAio] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _notify_lock
    _notify_lock = threading.Lock()  # (the pool resets the queue itself)
    for rt in list(_runtimes):
        rt._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: The runtime behind the module-level functions.
_default = PosixAio()


def default_runtime() -> PosixAio:
    """The runtime behind the module-level ``aio_*`` functions."""
    return _default


def set_context(context: AioContext | None) -> AioContext | None:
    """Give the default runtime an ``AioContext(deliver=False)`` to submit
    to (None: its own, made on first use); returns the one given before.
    See :meth:`PosixAio.set_context`."""
    return _default.set_context(context)


def use_context(context: AioContext | None) -> contextlib.AbstractContextManager[AioContext]:
    """``with threadlets.posix.use_context(ctx):`` -- the default runtime
    submits to ``ctx`` inside the block."""
    return _default.use_context(context)


aio_read = _default.aio_read
aio_write = _default.aio_write
aio_fsync = _default.aio_fsync
aio_error = _default.aio_error
aio_return = _default.aio_return
aio_cancel = _default.aio_cancel
aio_suspend = _default.aio_suspend
lio_listio = _default.lio_listio
