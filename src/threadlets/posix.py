"""POSIX asynchronous I/O (IEEE 1003.1 ``aio_*``) for threaded Python code.

This module owns the POSIX interface: :class:`aiocb`, :class:`sigevent`,
``aio_read`` ... ``lio_listio`` and their constants, with glibc's values.  It
runs every request on the paio engine (:mod:`threadlets.engine`), through one
process-wide :class:`~threadlets.engine.AioContext` that delivers nothing:
each request's completion is followed through the request itself.  That
context uses io_uring where it can be set up (``backend="auto"``): reads and
writes then finish in the ring's reaper thread, the rest on the pool.

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
  on a worker thread.
* ``aio_suspend`` is not interrupted with EINTR: Python runs signal
  handlers and resumes the wait (PEP 475); a handler that raises ends it
  with that exception.
* ``aio_error``/``aio_return`` on an aiocb that was never submitted raise
  EINVAL (glibc reads whatever the struct holds); ``aio_return`` while the
  request is in progress raises EINPROGRESS (undefined in POSIX).

Locking: ``_lock`` protects every aiocb's ``_status``/``_error``/
``_return``/``_req`` and the per-fd tables.  Engine calls that may finish
a request (and so run its done-callback, which takes ``_lock``) are made
without holding it, except ``_launch``, which submits with the lock held:
the engine never calls back into this module from a submit.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from threadlets.engine import AioContext, AioRequest
from threadlets.ops import MAX_OFFSET
from threadlets.pool import CancelResult, Threadlet, default_queue

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
    "aio_cancel",
    "aio_error",
    "aio_fsync",
    "aio_read",
    "aio_return",
    "aio_suspend",
    "aio_write",
    "aiocb",
    "lio_listio",
    "sigevent",
]

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

# aiocb._status
_IDLE = "idle"  # never submitted
_PENDING = "pending"  # accepted, waiting for an ordering constraint
_INFLIGHT = "inflight"  # an engine request runs it
_DONE = "done"


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)}: {what}")


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

    def _fire(self) -> None:
        if self.sigev_notify == SIGEV_SIGNAL:
            os.kill(os.getpid(), self.sigev_signo)
        elif self.sigev_notify == SIGEV_THREAD:
            fn = self.function
            assert fn is not None
            default_queue().submit(fn, self.sigev_value)


class aiocb:
    """An asynchronous I/O control block, with the POSIX attribute names.

    ``aio_buf`` is a writable buffer for reads and any bytes-like object for
    writes; ``aio_nbytes`` defaults to its length.  The block may be reused
    once its request has finished.
    """

    __slots__ = (
        "__weakref__",
        "_error",
        "_group",
        "_op",
        "_req",
        "_return",
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
        self._status = _IDLE
        self._error = 0
        self._return = 0
        self._req: AioRequest | None = None
        self._op = ""
        self._view: memoryview | None = None
        self._group: _Group | None = None

    def __repr__(self) -> str:
        return (
            f"aiocb(fildes={self.aio_fildes}, offset={self.aio_offset}, "
            f"nbytes={self.aio_nbytes}, status={self._status})"
        )


class _Group:
    """The requests of one lio_listio call, for its list notification."""

    __slots__ = ("failed", "remaining", "sigevent")

    def __init__(self, remaining: int, sigev: sigevent | None) -> None:
        self.remaining = remaining
        self.failed = False
        self.sigevent = sigev


class _Fd:
    """What must be ordered on one fd (protected by ``_lock``)."""

    __slots__ = ("active", "appends", "barriers")

    def __init__(self) -> None:
        #: Accepted and not finished, in submission order.
        self.active: dict[aiocb, None] = {}
        #: O_APPEND writes not yet finished; the head is the one running.
        self.appends: deque[aiocb] = deque()
        #: aio_fsync blocks waiting for the I/O queued before them.
        self.barriers: list[tuple[aiocb, set[aiocb]]] = []


_lock = threading.Lock()
_cond = threading.Condition(_lock)
_fds: dict[int, _Fd] = {}
_ctx: AioContext | None = None


def _context() -> AioContext:
    global _ctx
    if _ctx is None:
        _ctx = AioContext(deliver=False, backend="auto")
    return _ctx


# -- submission --------------------------------------------------------------------


def _check_common(cb: object) -> aiocb:
    if not isinstance(cb, aiocb):
        raise TypeError(f"expected an aiocb, not {type(cb).__name__}")
    prio = cb.aio_reqprio
    if isinstance(prio, bool) or not isinstance(prio, int):
        raise TypeError(f"aio_reqprio must be an int, not {type(prio).__name__}")
    if not 0 <= prio <= AIO_PRIO_DELTA_MAX:
        raise _einval(f"aio_reqprio {prio} is outside 0..{AIO_PRIO_DELTA_MAX}")
    if cb.aio_sigevent is not None:
        if not isinstance(cb.aio_sigevent, sigevent):
            raise TypeError("aio_sigevent must be a sigevent or None")
        cb.aio_sigevent._check()
    if cb._status in (_PENDING, _INFLIGHT):
        raise _einval("this aiocb is already in progress")
    offset = cb.aio_offset
    if isinstance(offset, bool) or not isinstance(offset, int):
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


def _flags(fd: int) -> int | None:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL)
    except (OSError, OverflowError):
        return None


def _accept(cb: aiocb, op: str, view: memoryview | None, group: _Group | None) -> None:
    """Take a validated aiocb in flight: order it, then launch it."""
    fd = cb.aio_fildes
    offset = cb.aio_offset
    length = 0 if view is None else len(view)
    append = op == "write" and (_flags(fd) or 0) & os.O_APPEND
    notify: list[aiocb] = []
    with _lock:
        cb._op = op
        cb._view = view
        cb._group = group
        cb._req = None
        cb._status = _PENDING
        cb._error = errno.EINPROGRESS
        cb._return = 0
        if op not in ("fsync", "fdatasync") and (offset < 0 or offset + length > MAX_OFFSET):
            # As glibc: the system call refuses it, so the status says so.
            _set_done(cb, errno.EINVAL, -1, notify)
        elif fd < 0:
            _set_done(cb, errno.EBADF, -1, notify)
        else:
            state = _fds.setdefault(fd, _Fd())
            if op in ("fsync", "fdatasync"):
                before = {c for c in state.active if c._op in ("read", "write")}
                state.active[cb] = None
                if before:
                    state.barriers.append((cb, before))
                else:
                    _launch(cb)
            else:
                state.active[cb] = None
                if append:
                    state.appends.append(cb)
                    if len(state.appends) == 1:
                        _launch(cb)
                else:
                    _launch(cb)
    _notify(notify)


def _launch(cb: aiocb) -> None:
    """Start the engine request of a PENDING aiocb.  Called with _lock held."""
    ctx = _context()
    fd = cb.aio_fildes
    if cb._op == "read":
        assert cb._view is not None
        req = ctx.read(fd, cb.aio_offset, cb._view)
    elif cb._op == "write":
        assert cb._view is not None
        req = ctx.write(fd, cb.aio_offset, cb._view)
    else:
        req = ctx.flush(fd, datasync=cb._op == "fdatasync")
    cb._req = req
    cb._status = _INFLIGHT
    # The done-callback takes _lock, and runs at once if the request already
    # finished (inline): it is registered by _watch_launched, without _lock.
    _launched.append((cb, req))


#: (aiocb, request) pairs launched under _lock, their callbacks not yet set.
_launched: list[tuple[aiocb, AioRequest]] = []


def _watch_launched() -> None:
    while _launched:  # (an unlocked peek: the list is taken under _lock)
        with _lock:
            if not _launched:
                return
            batch = _launched[:]
            _launched.clear()
        for cb, req in batch:
            req.add_done_callback(functools.partial(_request_finished, cb))


def _request_finished(cb: aiocb, req: Threadlet[int]) -> None:
    assert isinstance(req, AioRequest)
    err, ret = req.outcome()
    notify: list[aiocb] = []
    with _lock:
        if cb._req is not req or cb._status != _INFLIGHT:
            return
        _set_done(cb, err, ret, notify)
    _notify(notify)


def _set_done(cb: aiocb, err: int, ret: int, notify: list[aiocb]) -> None:
    """Finish an aiocb and start what waited for it.  With _lock held."""
    cb._status = _DONE
    cb._error = err
    cb._return = ret
    cb._view = None
    notify.append(cb)
    state = _fds.get(cb.aio_fildes)
    if state is None:
        return
    state.active.pop(cb, None)
    if state.appends and state.appends[0] is cb:
        state.appends.popleft()
        while state.appends:
            nxt = state.appends[0]
            if nxt._status == _PENDING:
                _launch(nxt)
                break
            state.appends.popleft()
    elif cb in state.appends:
        state.appends.remove(cb)
    still: list[tuple[aiocb, set[aiocb]]] = []
    for fsync_cb, waiting in state.barriers:
        waiting.discard(cb)
        if waiting or fsync_cb._status != _PENDING:
            if fsync_cb._status == _PENDING:
                still.append((fsync_cb, waiting))
            continue
        _launch(fsync_cb)
    state.barriers = still
    if not state.active:
        del _fds[cb.aio_fildes]


def _wake_waiters() -> None:
    with _lock:
        _cond.notify_all()


def _notify(done: list[aiocb]) -> None:
    """After _lock is dropped: watch what was launched, wake aio_suspend and
    lio_listio waiters, send each finished aiocb's notifications."""
    _watch_launched()
    if not done:
        return
    groups: list[_Group] = []
    # In the ring's reaper, waiters are woken once per batch of completions.
    deferred = _ctx is not None and _ctx.call_after_batch(_wake_waiters)
    with _lock:
        if not deferred:
            _cond.notify_all()
        for cb in done:
            g = cb._group
            if g is not None:
                cb._group = None
                if cb._error:
                    g.failed = True
                g.remaining -= 1
                if g.remaining == 0:
                    groups.append(g)
    for cb in done:
        if cb.aio_sigevent is not None:
            cb.aio_sigevent._fire()
    for g in groups:
        if g.sigevent is not None:
            g.sigevent._fire()


def aio_read(cb: aiocb) -> None:
    """Queue a read of ``aio_nbytes`` at ``aio_offset`` into ``aio_buf``."""
    _check_common(cb)
    _accept(cb, "read", _buffer(cb, writable=True), None)


def aio_write(cb: aiocb) -> None:
    """Queue a write of ``aio_buf[:aio_nbytes]`` at ``aio_offset`` (at the end
    of the file, in call order, for an O_APPEND fd)."""
    _check_common(cb)
    _accept(cb, "write", _buffer(cb, writable=False), None)


def aio_fsync(op: int, cb: aiocb) -> None:
    """Queue an fsync (``op`` os.O_SYNC) or fdatasync (os.O_DSYNC) of
    ``aio_fildes`` that completes after the I/O queued on it before."""
    dsync = getattr(os, "O_DSYNC", -1)
    if op not in (os.O_SYNC, dsync):
        raise _einval("op must be os.O_SYNC or os.O_DSYNC")
    _check_common(cb)
    if _flags(cb.aio_fildes) is None:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    _accept(cb, "fsync" if op == os.O_SYNC else "fdatasync", None, None)


def _status(cb: object) -> tuple[bool, int, int]:
    """(finished, error, return value) of a submitted aiocb, read together."""
    if not isinstance(cb, aiocb):
        raise TypeError(f"expected an aiocb, not {type(cb).__name__}")
    with _lock:
        if cb._status == _IDLE:
            raise _einval("this aiocb was never submitted")
        return cb._status == _DONE, cb._error, cb._return


def aio_error(cb: aiocb) -> int:
    """EINPROGRESS while in progress; then 0 or the errno (ECANCELED if
    cancelled)."""
    finished, error, _ = _status(cb)
    return error if finished else errno.EINPROGRESS


def aio_return(cb: aiocb) -> int:
    """The byte count of a finished request, or -1 if it failed."""
    finished, _, value = _status(cb)
    if not finished:
        raise OSError(errno.EINPROGRESS, "the request is still in progress")
    return value


def aio_cancel(fildes: int, cb: aiocb | None = None) -> int:
    """Cancel ``cb``, or every request on ``fildes``.

    AIO_CANCELED if all targeted requests were cancelled, AIO_NOTCANCELED if
    at least one is running (it completes normally), AIO_ALLDONE if none was
    outstanding.  A cancelled request still gets its notification.
    """
    if isinstance(fildes, bool) or not isinstance(fildes, int):
        raise TypeError(f"fildes must be an int, not {type(fildes).__name__}")
    if _flags(fildes) is None:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    if cb is not None:
        if not isinstance(cb, aiocb):
            raise TypeError(f"expected an aiocb or None, not {type(cb).__name__}")
        if cb.aio_fildes != fildes:
            raise _einval("the aiocb is for another file descriptor")
    notify: list[aiocb] = []
    running: list[AioRequest] = []
    cancelled = 0
    with _lock:
        state = _fds.get(fildes)
        targets = [] if state is None else list(state.active)
        if cb is not None:
            targets = [cb] if cb in targets else []
        for c in targets:
            if c._status == _PENDING:
                _set_done(c, errno.ECANCELED, -1, notify)
                cancelled += 1
            elif c._status == _INFLIGHT:
                assert c._req is not None
                running.append(c._req)
    outcomes = [r.cancel() for r in running]  # without _lock: cancel finishes them
    _notify(notify)
    if not targets:
        return AIO_ALLDONE
    if CancelResult.NOTCANCELED in outcomes:
        return AIO_NOTCANCELED
    if cancelled + outcomes.count(CancelResult.CANCELED) == 0:
        return AIO_ALLDONE
    return AIO_CANCELED


def aio_suspend(list: Sequence[aiocb | None], timeout: float | None = None) -> None:
    """Wait until at least one request of ``list`` is no longer in progress
    (None entries are ignored).  Raises OSError(EAGAIN) on timeout."""
    cbs = _check_list(list)
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
        if timeout < 0:
            raise _einval("timeout must be >= 0")
    deadline = None if timeout is None else time.monotonic() + timeout
    with _lock:
        while all(c._status in (_PENDING, _INFLIGHT) for c in cbs) and cbs:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise OSError(errno.EAGAIN, "aio_suspend timed out")
            _cond.wait(remaining)


def _check_list(items: Iterable[aiocb | None]) -> list[aiocb]:
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


_Work = list[tuple[aiocb, str, memoryview]]


def lio_listio(mode: int, list: Sequence[aiocb | None], sigevent: sigevent | None = None) -> None:
    """Submit a list of reads and writes (``aio_lio_opcode`` LIO_READ,
    LIO_WRITE, or LIO_NOP to skip).

    LIO_WAIT waits for all of them and raises OSError(EIO) if any failed
    (each aiocb keeps its own status).  LIO_NOWAIT returns at once; each
    request's own notification fires, and ``sigevent`` once all are done.
    """
    if mode not in (LIO_WAIT, LIO_NOWAIT):
        raise _einval(f"bad mode {mode!r}")
    cbs = _check_list(list)
    if sigevent is not None:
        sigevent._check()
    work: _Work = []
    for c in cbs:
        op = c.aio_lio_opcode
        if op == LIO_NOP:
            continue
        if op not in (LIO_READ, LIO_WRITE):
            raise _einval(f"bad aio_lio_opcode {op!r}")
        _check_common(c)
        work.append((c, "read" if op == LIO_READ else "write", _buffer(c, op == LIO_READ)))
    if len({id(c) for c, _, _ in work}) != len(work):
        raise _einval("the same aiocb appears twice in the list")
    group = _Group(len(work), sigevent if mode == LIO_NOWAIT else None)
    if not work:
        if group.sigevent is not None:
            group.sigevent._fire()
        return
    for c, kind, view in work:
        _accept(c, kind, view, group)
    if mode == LIO_NOWAIT:
        return
    with _lock:
        while any(c._status != _DONE for c, _, _ in work):
            _cond.wait()
        failed = any(c._error for c, _, _ in work)
    if failed:
        raise OSError(errno.EIO, "at least one request of the list failed")


# -- fork --------------------------------------------------------------------------


def _after_fork_in_child() -> None:
    """In the child the parent's requests are not ours to finish: the pool
    marked their threadlets CANCELLED; mark their aiocbs so too."""
    global _lock, _cond, _ctx
    _lock = threading.Lock()
    _cond = threading.Condition(_lock)
    for state in _fds.values():
        for c in state.active:
            c._status = _DONE
            c._error = errno.ECANCELED
            c._return = -1
    _fds.clear()
    _launched.clear()
    _ctx = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
