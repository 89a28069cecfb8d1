"""The engine's own read() and write(), cheaper (issue 13's engine row):
the common case -- a known fd, a plain int offset in range, one flat
buffer, no inline attempt to make, no zero-fill -- is decided first and
handed to the backend at once (the ring's _start_rw with a file record,
or the threads backend's _start_new), nothing built that it does not use.
Everything else must answer exactly as before: the old read() and write()
are pinned here (a copy of them at a5f774d, run in the engine's own
namespace) and compared, case by case, with the new ones and with the
front end's door -- the way taken, the answer (count, error type and
message), the bytes moved, the callback's calls, the context's counters --
over a grid of descriptors, offsets, buffers, callbacks and zero_fill, on
both backends, inline or not, delivering or not, and once closed.  And a
Ctrl-C at every C return of the new way leaves nothing outstanding, or a
request that finishes with its real count."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import select
import socket
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threadlets import AioContext, aligned_buffer
from threadlets import engine as _engine
from threadlets.engine import _MAX_IO_OFFSET
from threadlets.probe import portable

from .conftest import interrupt_at_c_return

SIZE = 64 * 1024
DATA = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)

# AioContext.read and write at a5f774d, before this change: the oracle.
_PINNED = '''
from __future__ import annotations

def old_read(
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
    # context knows, a sane offset, one flat writable buffer.
    f = self._files.get(fd)
    t = type(buffers)
    views: list[Any]
    one: Any
    if (
        f is not None
        and type(offset) is int
        and offset >= 0  # (two comparisons, not a chained one: two steps fewer)
        and offset <= _MAX_IO_OFFSET
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
        views = [buffers]
        total = len(buffers)  # type: ignore[arg-type]
        one = buffers  # (the ring's fast path: see _start_rw)
    else:
        ff, views, total = self._prepare(fd, offset, buffers, True, callback)
        if isinstance(ff, OSError):
            return self._fail_now("read", ff, callback)
        f = ff
        one = None
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

def old_write(
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
    if (
        f is not None
        and type(offset) is int
        and 0 <= offset <= _MAX_IO_OFFSET
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
        views = [buffers]
        total = len(buffers)  # type: ignore[arg-type]
        one = buffers  # (the ring's fast path: see _start_rw)
    else:
        ff, views, total = self._prepare(fd, offset, buffers, False, callback)
        if isinstance(ff, OSError):
            return self._fail_now("write", ff, callback)
        f = ff
        one = None
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
'''

_namespace = dict(vars(_engine))  # (the engine's own names: the same objects)
exec(compile(_PINNED, "<read() and write() at a5f774d>", "exec"), _namespace)
OLD_READ: Callable[..., Any] = _namespace["old_read"]
OLD_WRITE: Callable[..., Any] = _namespace["old_write"]


@pytest.fixture
def scratch() -> Iterator[str]:
    """A file of DATA on /var/tmp (ext4: O_DIRECT works there), if it is
    there; else the system temp dir."""
    where = "/var/tmp" if os.path.isdir("/var/tmp") else None
    fd, path = tempfile.mkstemp(prefix="threadlets-eng-", dir=where)
    try:
        os.write(fd, DATA)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


# -- the grid -----------------------------------------------------------------------


class _IntSub(int):
    pass


class _FakeInt:
    """An offset that says it is an int (as a mock with spec=int does)."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return int

    def __index__(self) -> int:
        return 4096

    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return False

    def __rshift__(self, other: object) -> int:
        return 0

    def __ge__(self, other: object) -> bool:
        return True

    def __le__(self, other: object) -> bool:
        return True


OFFSETS: list[object] = [0, 4096, 4097, SIZE - 100, SIZE + 4096, -1, -(2**70), 1.0, True]
OFFSETS += [_IntSub(4096), _FakeInt(), 2**62 - 1, 2**62, _MAX_IO_OFFSET, _MAX_IO_OFFSET + 1, 2**64]


def _released() -> memoryview:
    m = memoryview(bytearray(4096))
    m.release()
    return m


def _filled(view: memoryview, data: bytes) -> memoryview:
    view[:] = data
    return view


def _indirect() -> list[tuple[str, Callable[[], Any]]]:
    """A PIL-style buffer (suboffsets: neither flat nor C-contiguous), where
    CPython's test module makes one."""
    try:
        import _testbuffer as tb  # type: ignore[import-not-found]
    except ImportError:
        return []
    flags = tb.ND_WRITABLE | tb.ND_PIL
    return [
        (
            "indirect",
            lambda: memoryview(tb.ndarray([7] * 4096, shape=[4096], format="B", flags=flags)),
        )
    ]


def _read_buffers() -> list[tuple[str, Callable[[], Any]]]:
    return [
        *_indirect(),
        ("bytearray", lambda: bytearray(4096)),
        ("bytearray-0", bytearray),
        ("aligned", lambda: aligned_buffer(4096)),
        ("aligned-odd", lambda: aligned_buffer(8192)[1:4097]),
        ("strided", lambda: aligned_buffer(8192)[::2]),
        ("strided-1", lambda: memoryview(bytearray(2))[::2]),
        ("strided-0", lambda: memoryview(bytearray(2))[2::2]),
        ("signed", lambda: aligned_buffer(4096).cast("b")),
        ("2-d", lambda: aligned_buffer(4096).cast("B", (64, 64))),
        ("2-d-row", lambda: aligned_buffer(4096).cast("B", (1, 4096))),
        ("read-only", lambda: memoryview(bytes(4096))),
        ("released", _released),
        ("bytes", lambda: bytes(4096)),
        ("list", lambda: [bytearray(100), aligned_buffer(4096)]),
        ("list-0", list),
        ("str", lambda: "abc"),
    ]


def _write_buffers() -> list[tuple[str, Callable[[], Any]]]:
    payload = bytes(range(256)) * 16
    return [
        *_indirect(),
        ("bytes", lambda: payload),
        ("bytes-0", bytes),
        ("bytearray", lambda: bytearray(payload)),
        ("aligned", lambda: _filled(aligned_buffer(4096), payload)),
        ("read-only", lambda: memoryview(payload)),
        ("strided", lambda: memoryview(payload * 2)[::2]),
        ("strided-1", lambda: memoryview(b"ab")[::2]),
        ("signed", lambda: memoryview(bytearray(payload)).cast("b")),
        ("2-d", lambda: memoryview(bytearray(payload)).cast("B", (64, 64))),
        ("released", _released),
        ("list", lambda: [b"x" * 100, payload]),
        ("str", lambda: "abc"),
    ]


def _callback_kinds(record: list[Any]) -> list[tuple[str, Any]]:
    def called(req: Any) -> None:
        record.append((type(req).__name__, req.kind))

    return [("not-given", None), ("none", None), ("callable", called), ("not-callable", 5)]


_DEFAULT = object()  # (no zero_fill= given)
ZERO_FILLS: list[object] = [_DEFAULT, False, True, 0]
CALLBACKS = 4  # none given, None, callable, not callable


def _door_takes(buf: Any, write: bool) -> bool:
    """What the front end's door is given: a bytearray or a memoryview
    (for a write, bytes too) of at least one byte."""
    if type(buf) is memoryview:
        try:
            return buf.nbytes > 0
        except ValueError:  # (released)
            return False
    return (type(buf) is bytearray or (write and type(buf) is bytes)) and len(buf) > 0


class _Paths:
    """Records which of the engine's ways a request took."""

    def __init__(self, ctx: AioContext) -> None:
        self.seen: list[str] = []
        for name in ("_start", "_start_new", "_start_rw_start", "_fail_now", "_prepare"):
            self._wrap(ctx, name)
        real = ctx._start_rw

        def start_rw(f: Any, *args: Any, **kwargs: Any) -> Any:
            self.seen.append("_start_rw" if f is not None else "door")
            return real(f, *args, **kwargs)

        ctx._start_rw = start_rw  # type: ignore[method-assign]
        if ctx._ring is not None:
            self._wrap(ctx._ring, "submit")

    def _wrap(self, obj: Any, name: str) -> None:
        real = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.seen.append(name)
            return real(*args, **kwargs)

        setattr(obj, name, wrapper)


class _Side:
    """One context of the comparison: 'old' (the pinned read() and write()),
    'new', or 'door' (the front end's door where its caller could use it,
    else new)."""

    def __init__(self, how: str, ctx: AioContext) -> None:
        self.how = how
        self.ctx = ctx
        if how == "old":
            ctx.read = types.MethodType(OLD_READ, ctx)  # type: ignore[method-assign]
            ctx.write = types.MethodType(OLD_WRITE, ctx)  # type: ignore[method-assign]
        self.paths = _Paths(ctx)
        self.record: list[Any] = []
        self.callbacks = _callback_kinds(self.record)

    def submit(self, fd: Any, offset: Any, buf: Any, write: bool, cb: int, zf: object) -> Any:
        callback = self.callbacks[cb][1]
        door = self.how == "door" and type(fd) is int and not cb and zf is _DEFAULT
        if door and _door_takes(buf, write):
            return self.ctx._start_rw(None, buf, offset, 0, write, fd=fd)
        kwargs: dict[str, Any] = {}
        if cb:  # (callback=None, and no callback= at all)
            kwargs["callback"] = callback
        if write:
            return self.ctx.write(fd, offset, buf, **kwargs)
        if zf is not _DEFAULT:
            kwargs["zero_fill"] = zf
        return self.ctx.read(fd, offset, buf, **kwargs)

    def outcome(self, fd: Any, offset: Any, buf: Any, write: bool, cb: int, zf: object) -> Any:
        del self.paths.seen[:]
        del self.record[:]
        before = self._counts()
        try:
            req = self.submit(fd, offset, buf, write, cb, zf)
        except Exception as e:  # (what the built-ins raise: the same here and there)
            return ("raised", type(e), str(e), list(self.paths.seen), self._counts(), before)
        try:
            got: object = req.result(timeout=10)
        except Exception as e:
            got = (type(e), str(e))
        if self.ctx._deliver:  # (else the request's wait was the completion)
            assert self.ctx.drain(timeout=10)
        content = _content(buf)
        seen = [s for s in self.paths.seen if s != "door"]
        rec = self.ctx._files.get(fd) if type(fd) is int else None
        inline = None if rec is None else (rec.nowait_reads, rec.nowait_writes)
        return (
            "answered",
            type(req).__name__,
            req.kind,
            got,
            seen,
            content,
            list(self.record),
            self._counts(),
            before,
            inline,
        )

    def _counts(self) -> tuple[int, ...]:
        s = self.ctx.stats()
        return (s.submitted, s.inline, s.threaded, s.ring, s.processed, s.outstanding)


def _content(buf: Any) -> Any:
    if isinstance(buf, list):
        return [_content(b) for b in buf]
    if isinstance(buf, memoryview):
        try:
            return buf.tobytes()
        except ValueError:  # released
            return None
    if isinstance(buf, bytearray):
        return bytes(buf)
    return None


def _clear(buf: Any) -> None:
    if isinstance(buf, list):
        for b in buf:
            _clear(b)
    elif isinstance(buf, bytearray):
        buf[:] = bytes(len(buf))
    elif isinstance(buf, memoryview):
        try:
            if buf.readonly:
                return
            whole = memoryview(buf.obj).cast("B")
        except ValueError:  # (released)
            return
        except TypeError:  # (indirect: 1-D, 'B')
            buf[:] = bytes(buf.nbytes)
            return
        whole[:] = bytes(whole.nbytes)


class _Stream:
    """A pipe, socket or FIFO to read from or write to: before each
    request, ``drains`` are emptied (what an earlier request wrote or left)
    and, for a read, ``feed`` gets the same bytes each time."""

    def __init__(self, fd: int, drains: list[int], feed: int = -1) -> None:
        self.fd = fd
        self.drains = drains
        self.feed = feed

    def prime(self, write: bool) -> None:
        for d in self.drains:
            while select.select([d], [], [], 0)[0]:
                if not os.read(d, 1 << 16):
                    break
        if not write:
            os.write(self.feed, DATA[: 3 * 4096])


def _streams(tmp: str, opened: list[int]) -> dict[str, tuple[_Stream, _Stream]]:
    """name -> (the stream read from, the stream written to)."""
    r, w = os.pipe()
    r2, w2 = os.pipe()
    a, b = socket.socketpair()
    fa, fb = a.detach(), b.detach()
    fifo = os.path.join(tmp, "fifo")
    os.mkfifo(fifo)
    ff = os.open(fifo, os.O_RDWR)
    opened += [r, w, r2, w2, fa, fb, ff]
    return {
        "pipe": (_Stream(r, [r], w), _Stream(w2, [r2])),
        "socket": (_Stream(fa, [fa], fb), _Stream(fa, [fb])),
        "fifo": (_Stream(ff, [ff], ff), _Stream(ff, [ff])),
    }


def _unused_fd() -> int:
    for n in range(950, 1024):
        try:
            fcntl.fcntl(n, fcntl.F_GETFD)
        except OSError as e:
            if e.errno == errno.EBADF:
                return n
    pytest.skip("no unused descriptor")


def _seen_without_door(outcome: tuple[Any, ...]) -> tuple[Any, ...]:
    """An outcome with the door's own steps left out (it is read() or
    write() in one frame less)."""
    i = 3 if outcome[0] == "raised" else 4
    seen = [s for s in outcome[i] if s not in ("_start_rw", "door")]
    return (*outcome[:i], seen, *outcome[i + 1 :])


MODES = {"no-inline": (False, True), "inline": (True, True), "no-deliver": (False, False)}


@pytest.mark.parametrize("mode", list(MODES))
def test_read_and_write_answer_as_before(backend: str, mode: str, scratch: str) -> None:
    """For every descriptor, offset, buffer, callback and zero_fill (a
    cycle of the last two over the rest), the new read() and write() take
    the same way as the pinned old ones (the ring's fast path, _start,
    _start_new, _start_rw_start, _fail_now, _prepare, the ring's submit),
    with the same answer (count, error type and message), the same bytes,
    the same callback calls and the same counters; so does the door where
    the front end would use it; and the same once the contexts are closed."""
    inline, deliver = MODES[mode]
    opened: list[int] = []
    sides = [
        _Side(how, AioContext(backend=backend, inline=inline, deliver=deliver))
        for how in ("old", "new", "door")
    ]
    tmp = tempfile.mkdtemp(prefix="threadlets-eng-")
    try:
        reg = os.open(scratch, os.O_RDWR)
        opened.append(reg)
        fds: list[tuple[str, Any, Any]] = [("regular", reg, None)]
        direct = -1
        try:
            if portable():  # (no O_DIRECT handling there: the kernel's EINVAL)
                raise AttributeError
            direct = os.open(scratch, os.O_RDWR | os.O_DIRECT)
        except (OSError, AttributeError):
            pass
        else:
            opened.append(direct)
            fds.append(("direct", direct, None))
        append = os.open(scratch, os.O_RDWR | os.O_APPEND)
        opened.append(append)
        fds.append(("append", append, None))
        streams = _streams(tmp, opened)
        for name, pair in streams.items():
            fds.append((name, pair, None))
        forgotten = os.dup(reg)
        opened.append(forgotten)
        fds.append(("forgotten", forgotten, "forget"))
        closed = fcntl.fcntl(reg, fcntl.F_DUPFD, 900)
        for side in sides:  # (known to each, then closed under them)
            assert side.ctx.read(closed, 0, bytearray(1)).result(timeout=10) == 1
        os.close(closed)
        fds.append(("closed", closed, None))
        fds.append(("never-open", _unused_fd(), None))
        for weird in (-1, True, 3.0, _IntSub(reg), 2**40, "3", None):
            fds.append((f"weird-{weird!r}", weird, None))
        for side in sides:  # (each file known to each)
            for fd in opened:
                if fd == append or fd not in (reg, direct):
                    continue
                assert side.ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1
            assert side.ctx.read(append, 0, bytearray(1)).result(timeout=10) == 1
            for _, pair, _ in fds:
                if isinstance(pair, tuple):
                    side.ctx.read(pair[0].fd, 0, bytearray(0)).result(timeout=10)
                    side.ctx.write(pair[1].fd, 0, b"").result(timeout=10)
            if deliver:
                assert side.ctx.drain(timeout=10)
        # What each record says of the inline attempts, as first made: put
        # back before each request (a buffered write's attempt is refused
        # here, EOPNOTSUPP, and its record says so from then on: each
        # request gets its attempt, and what the attempt leaves is
        # compared).
        flags = {}
        for side in sides:
            for fd, rec in side.ctx._files.items():
                flags[id(side), fd] = (rec.nowait_reads, rec.nowait_writes)
        i = row = 0
        for write in (False, True):
            buffers = _write_buffers() if write else _read_buffers()
            for fdname, what, state in fds:
                stream = what[write] if isinstance(what, tuple) else None
                fd = stream.fd if stream is not None else what
                for bufname, make in buffers:
                    row += 1
                    for k, offset in enumerate(OFFSETS):
                        i += 1
                        # (Each offset with each callback and zero_fill, on
                        # some buffer of each descriptor.)
                        combo = (k + row) % (CALLBACKS * len(ZERO_FILLS))
                        cb, zf = combo % CALLBACKS, ZERO_FILLS[combo // CALLBACKS]
                        buf = make()  # (one for all: its address decides O_DIRECT's way)
                        got = []
                        for side in sides:
                            _clear(buf)
                            if state == "forget":
                                side.ctx.forget(fd)
                            if type(fd) is int and (id(side), fd) in flags:
                                rec = side.ctx._files[fd]
                                rec.nowait_reads, rec.nowait_writes = flags[id(side), fd]
                            if stream is not None:
                                stream.prime(write)
                            got.append(side.outcome(fd, offset, buf, write, cb, zf))
                        where = (write, fdname, bufname, offset, cb, zf)
                        assert got[1] == got[0], where
                        assert _seen_without_door(got[2]) == _seen_without_door(got[1]), where
        assert i == len(fds) * len(OFFSETS) * (len(_read_buffers()) + len(_write_buffers()))
        for side in sides:
            assert side.ctx.close(timeout=10)
        for write in (False, True):
            for fd in (reg, -1, True, closed):
                for make in (bytearray, lambda: bytearray(4096), lambda: aligned_buffer(4096), str):
                    for offset in (0, -1, 1.0):
                        for cb in range(CALLBACKS):
                            i += 1
                            zf = ZERO_FILLS[i % len(ZERO_FILLS)]
                            buf = make()
                            got = [side.outcome(fd, offset, buf, write, cb, zf) for side in sides]
                            assert got[1] == got[0], (write, fd, offset, cb, zf)
                            assert _seen_without_door(got[2]) == _seen_without_door(got[1])
    finally:
        for side in sides:
            side.ctx.close(timeout=10)
        for fd in opened:
            os.close(fd)
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


@pytest.mark.parametrize("callback", [False, True], ids=["no-callback", "callback"])
@pytest.mark.parametrize("kind", ["read", "write", "direct-read", "direct-write"])
def test_ctrl_c_at_every_c_return_of_read_and_write(
    backend: str, kind: str, callback: bool, scratch: str
) -> None:
    """Ctrl-C at the n-th C return of read() or write() on their new way (a
    known file, a bytearray, or an aligned memoryview with O_DIRECT; no
    inline attempt), for every n: the request was made and finishes with
    its real count (the file's bytes read, the data written), its callback
    called once; or the interrupt left nothing outstanding or claimed, and
    the callback was called at most once (a backend had it)."""
    direct = kind.startswith("direct")
    write = kind.endswith("write")
    flags = os.O_RDWR | (getattr(os, "O_DIRECT", 0) if direct else 0)
    try:
        fd = os.open(scratch, flags)
    except OSError:
        pytest.skip("O_DIRECT refused here")
    ctx = AioContext(backend=backend, inline=False)
    calls: list[Any] = []
    try:
        assert ctx.read(fd, 0, aligned_buffer(4096)).result(timeout=10) == 4096  # learns it
        n = 0
        while True:
            n += 1
            assert n < 3000, "never ran to its end"
            buf: Any = aligned_buffer(4096) if direct else bytearray(4096)
            if write:
                buf[:] = bytes([n % 251 + 1]) * 4096
            kwargs: dict[str, Any] = {"callback": calls.append} if callback else {}
            del calls[:]
            req = None
            seen = interrupt_at_c_return(n)
            try:
                if write:
                    req = ctx.write(fd, 4096, buf, **kwargs)
                else:
                    req = ctx.read(fd, 4096, buf, **kwargs)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            assert ctx.drain(timeout=10), n
            assert ctx.stats().outstanding == 0, n
            assert not ctx.queue._claimed, n
            assert len(calls) <= 1, n
            if req is not None:
                assert req.result(timeout=10) == 4096, n
                assert calls == ([req] if callback else []), n
                if write:
                    with open(scratch, "rb") as f:
                        f.seek(4096)
                        assert f.read(4096) == bytes(buf), n
                else:
                    assert bytes(buf) == DATA[4096:8192], n
            if seen[0] < n:
                break  # the interrupt no longer lands: every point was tried
        assert n > 3
    finally:
        ctx.close(timeout=10)
        os.close(fd)
