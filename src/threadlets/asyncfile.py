"""Async file objects: ``threadlets.open`` and ``threadlets.wrap``.

This module owns :class:`AsyncFile`, the file object most users touch, and
:func:`open`/:func:`wrap` that make one.  It has two faces:

* Positional I/O with no shared file position -- ``pread``, ``preadinto``,
  ``pwrite``, ``preadv``, ``pwritev`` -- each one engine request, safe to
  run from many tasks at once.
* The stream of a Python file object -- ``read``, ``read1``, ``readinto``,
  ``readinto1``, ``readline``, ``readlines``, async iteration over lines, ``write``,
  ``writelines``, ``seek``, ``tell``, ``truncate``, ``flush`` -- with a read
  buffer, so lines are cut from 64 KiB chunks instead of costing a request
  each, and (regular files and block devices) a write buffer of the same
  size, sent as one request when it would overflow and before any read,
  seek, truncate, flush, close or positional call, with
  ``io.BufferedWriter``'s rules (a write larger than the buffer goes
  straight through; a failed or cancelled flush keeps what it did not
  write).  Stream calls on one file are atomic with respect to each other, as
  a Python buffered file's are: they take the file's :class:`StreamLock`
  (a flag test when nobody else holds it).  In text mode the stream is a
  :class:`threadlets.textio.AsyncTextWrapper` over the file's binary stream,
  with Python's text-mode semantics.

Plus ``fsync``, ``fdatasync``, ``discard``, ``write_zeroes``, ``allocate``
and ``stat``.  Every call that changes the file drops the read-ahead.

Files that can block for ever (pipes, FIFOs, terminals, sockets: anything
but a regular file or block device, decided once from ``fstat``) are read
and written through the stream by waiting for readiness on the event loop
and then moving data without blocking, so such a call can be cancelled at
any time with nothing consumed.  Other calls are engine requests awaited
through :mod:`threadlets.awaitable`, with its cancellation guarantee: a
cancelled call either never happened or finished before the cancellation
is seen.

A file belongs to the event loop it was opened in; another loop gets a
RuntimeError.  Closing it waits for its outstanding requests, then closes
the descriptor, even if the closing task is cancelled meanwhile.  A stream
call of another task that spans the close gets ValueError at its next
request (none is ever submitted on a closed descriptor), and one waiting
for readiness is woken with ValueError before the descriptor goes.  A
cancelled read consumes nothing (a file's position, and in text mode the
decoder, go back to where they were; what a pipe's read took goes back to
the read-ahead or the text layer); a cancelled write that ran moves the
position, and a cancelled text seek stays where it was.  A write (or
``writelines``) that raises -- cancelled or not -- once bytes moved says how
many in the exception's ``characters_written``, as io's ``BlockingIOError``
does (a pipe may have taken part of it).  A write
that only fills the buffer awaits nothing after its checks, so it is never
cancelled half-way.  Closing sends the buffer first (shielded, as the rest
of close), closes even if that fails, then raises.  A file collected
unclosed writes what its buffer holds (blocking, errors ignored), closes its
descriptor and warns (ResourceWarning), as io's finalizer does.  (So, as with
io, a forked child that collects its copy of a file writes the buffer the
parent held at the fork again: flush before forking.)

The stream's reads and writes are positional: they move no descriptor
offset.  A file opened from a descriptor (``open(fd)``, ``wrap(fd)``),
whose owner may go on using it, has the descriptor's offset moved to where
the stream stands at ``flush()`` and ``close()`` (append mode: the end), as
io's raw file would have left it.

A character device (``/dev/zero``, a terminal) is read and written at its
descriptor's offset: ``seek`` and ``tell`` are its ``lseek``'s, as FileIO's.

Where io differs: in append mode ``tell()`` sends the buffer and answers
where the descriptor is (the end of the file), where io's buffered files
count from a position they cached before an earlier ``seek``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import fcntl
import io
import operator
import os
import stat
import sys
import termios
import threading
import warnings
from asyncio.events import _get_running_loop
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Union, overload

from threadlets.awaitable import FdWaits, LoopIO, StreamLock, current
from threadlets.engine import AioRequest, _check_range, _InlineDone, _nonnegative
from threadlets.oneshot import open_cached_into
from threadlets.pool import _DONE, CancelResult
from threadlets.probe import F_NOCACHE, O_DIRECT, capability_note
from threadlets.probe import RWF_NOWAIT as _RWF_NOWAIT
from threadlets.textio import _UNSET

if TYPE_CHECKING:
    from _typeshed import (
        OpenBinaryMode,
        OpenTextMode,
        ReadableBuffer,
        StrPath,
        WriteableBuffer,
    )

T = TypeVar("T")

__all__ = ["AsyncBinaryFile", "AsyncFile", "AsyncTextFile", "open", "wrap"]

#: Read-ahead of the stream methods.
CHUNK = 64 * 1024


def _flags_for(mode: str) -> tuple[int, bool, bool, bool]:
    """os.open flags for a Python-style mode; and (text, readable, writable)."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, not {type(mode).__name__}")
    chars = set(mode)
    if len(chars) != len(mode) or not chars <= set("rwaxbt+") or len(chars & set("rwax")) != 1:
        raise ValueError(f"invalid mode: {mode!r}")
    if "b" in chars and "t" in chars:
        raise ValueError(f"invalid mode: {mode!r} (both binary and text)")
    plus = "+" in chars
    if "r" in chars:
        flags, readable, writable = (os.O_RDWR if plus else os.O_RDONLY), True, plus
    else:
        flags = (os.O_RDWR if plus else os.O_WRONLY) | os.O_CREAT
        readable, writable = plus, True
        if "w" in chars:
            flags |= os.O_TRUNC
        elif "a" in chars:
            flags |= os.O_APPEND
        else:
            flags |= os.O_EXCL
    return flags | os.O_CLOEXEC, "b" not in chars, readable, writable


def _raw_mode(mode: str, readable: bool, writable: bool) -> str:
    """FileIO's ``mode`` for a binary ``mode`` (Modules/_io/fileio.c)."""
    plus = "+" if readable and writable else ""
    if "x" in mode:
        return "xb" + plus
    if "a" in mode:
        return "ab" + plus
    return ("rb" + plus) if readable else "wb"


def _check_text_args(
    text: bool, encoding: str | None, errors: str | None, newline: str | None
) -> None:
    """The checks io.open makes of its arguments before it opens anything
    (see _check_text_values for the rest)."""
    for name, value in (("encoding", encoding), ("errors", errors), ("newline", newline)):
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(
                    f"open() argument '{name}' must be str or None, not {type(value).__name__}"
                )
            if "\0" in value:
                raise ValueError("embedded null character")
    if not text:
        for what, value in (
            ("an encoding", encoding),
            ("an errors", errors),
            ("a newline", newline),
        ):
            if value is not None:
                raise ValueError(f"binary mode doesn't take {what} argument")


def _check_text_values(text: bool, encoding: str | None, newline: str | None) -> None:
    """The checks io.open makes once the descriptor is open (TextIOWrapper's):
    an open(fd) that fails them closes ``fd``, as io's does."""
    if not text:
        return
    if encoding is not None and encoding != "locale":  # ("locale": io's name for it, 3.10+)
        info = codecs.lookup(encoding)  # LookupError for an unknown codec
        if not getattr(info, "_is_text_encoding", True):
            raise LookupError(
                f"'{encoding}' is not a text encoding; use codecs.open() to handle arbitrary codecs"
            )
    if newline not in (None, "", "\n", "\r", "\r\n"):
        raise ValueError(f"illegal newline value: {newline}")


def _check_buffering(buffering: object, text: bool, warn: bool = True, late: bool = True) -> bool:
    """Check ``buffering`` as open() does; True for line buffering (text).
    ``late=False``: only what io checks before it opens anything."""
    if not isinstance(buffering, int):  # (True is 1, as open() takes it)
        raise TypeError(f"'{type(buffering).__name__}' object cannot be interpreted as an integer")
    if buffering == 0 and text and late:
        raise ValueError("can't have unbuffered text I/O")
    if buffering == 1 and not text and warn:
        warnings.warn(
            "line buffering (buffering=1) isn't supported in binary mode, "
            "the default buffer size will be used",
            RuntimeWarning,
            stacklevel=3,
        )
    return buffering == 1 and text


def _size(size: object) -> int:
    """A read size as the built-in files take it: an int, or None for all."""
    if size is None:
        return -1
    try:
        n = operator.index(size)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"argument should be integer or None, not '{type(size).__name__}'"
        ) from None
    return _ssize(n)


def _ssize(n: int) -> int:
    """A size io takes as a C ssize_t: OverflowError past one, as io."""
    if not -sys.maxsize - 1 <= n <= sys.maxsize:
        raise OverflowError("cannot fit 'int' into an index-sized integer")
    return n


def _off_t(n: int, raw: bool) -> int:
    """An offset io takes as a C off_t: past one, a raw file (buffering=0)
    raises OverflowError and a buffered one ValueError, as io does."""
    if not -(2**63) <= n < 2**63:
        if raw:
            raise OverflowError("Python int too large to convert to C long")
        raise ValueError("cannot fit 'int' into an offset-sized integer")
    return n


def _nbytes(*buffers: object, into: bool = False) -> int | None:
    """The bytes ``buffers`` hold; None if one is not a buffer, or ``into``
    one is read-only (the engine says how it refuses it)."""
    total = 0
    for b in buffers:
        try:
            view = memoryview(b)  # type: ignore[arg-type]
        except TypeError:
            return None
        if into and view.readonly:
            return None
        total += view.nbytes
    return total


class _NoHome:
    """The _home of a file whose loop has no ``_thread_id`` to test."""

    _thread_id = None


_NO_HOME = _NoHome()
#: What AsyncFile._home's ``_thread_id`` is compared with: the thread's id;
#: in a forked child, a new object each time (equal to nothing), for ever
#: -- a loop copied from the parent has the same thread id there but is
#: not running (asyncio's own test sees the pid change), so every child's
#: test is the exact one.
_thread_key: Callable[[], object] = threading.get_ident


def _after_fork_in_child() -> None:
    global _thread_key
    _thread_key = object


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _no_inline_read(n: int, offset: int) -> bytes | None:
    """The inline reader of a file whose reads always queue."""
    return None


def _espipe() -> OSError:
    return OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))


def _einval() -> OSError:
    return OSError(errno.EINVAL, os.strerror(errno.EINVAL))


class AsyncFile:
    """An open file whose every I/O call is awaited.  Made by :func:`open`
    or :func:`wrap`; use ``async with`` or ``await f.close()``.

    Who touches what: everything here belongs to the file's event loop.
    The stream state (``_pos``, the read-ahead ``_rbuf`` at ``_rbuf_off``,
    the text layer) is changed only by a holder of ``_lock``, and by the
    positional calls that change the file, which drop the read-ahead and
    bump ``_wgen`` before and after they run (a read-ahead filled across a
    bump is read again).  The write buffer ``_wbuf`` is stream state too:
    positional calls take the lock to send it before they run."""

    def __init__(
        self,
        fd: int,
        name: object,
        mode: str,
        io_: LoopIO,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        closefd: bool = True,
        owner: Any = None,
        st: os.stat_result | None = None,
        pos: int | None = None,
        buffering: int = -1,
        coalesce: bool = True,
    ) -> None:
        self._closed = True  # until set up: nothing for __del__ to close
        #: The descriptor was given up (closed, or handed to the ring's
        #: close): set by _release.  A close() cut short by an interrupt
        #: before that leaves it for its except clause or __del__.
        self._released = True
        _, text, readable, writable = _flags_for(mode)
        _check_text_args(text, encoding, errors, newline)
        _check_text_values(text, encoding, newline)
        line_buffering = _check_buffering(buffering, text, warn=False)
        #: Read-ahead size (0: unbuffered, reads go straight to the file).
        self._chunk = CHUNK if buffering < 0 or buffering == 1 else max(buffering, 0)
        self._fd = fd
        self.name = name
        #: As io's: a text file's is the mode given, a binary file's its
        #: FileIO's ("r+b" is "rb+", "w+b" "rb+", "br" "rb").
        self.mode = mode if text else _raw_mode(mode, readable, writable)
        self._io = io_
        self._ctx = io_.ctx
        # asyncio: the loop, to tell a foreign loop at a glance (trio checks
        # through the slow path).
        self._loop = asyncio.get_running_loop() if io_.kind == "asyncio" else None
        #: pread's cheap test of the loop: ``self._home._thread_id ==
        #: _thread_key()`` says that ``_loop`` runs in this thread, so is
        #: the running loop (asyncio runs no loop inside another), without
        #: asyncio's _get_running_loop(), which makes a getpid() system
        #: call each time.  For a loop that keeps no ``_thread_id`` (not an
        #: asyncio.BaseEventLoop: uvloop), and trio, it never matches: the
        #: exact test then.
        self._home: Any = self._loop if isinstance(self._loop, asyncio.BaseEventLoop) else _NO_HOME
        self._readable = readable
        self._writable = writable
        #: Writes land at the end: append mode, or a descriptor opened with
        #: O_APPEND (the kernel appends whatever offset a write names).
        self._append = "a" in mode or (
            pos is None and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
        )
        self._closefd = closefd
        self._owner = owner  # a wrapped Python file object, kept alive
        self._trio = io_.kind == "trio"
        if st is None:
            st = os.fstat(fd)
        #: Can block for ever: readiness on the loop, then non-blocking I/O.
        self._stream = not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode))
        self._regular = stat.S_ISREG(st.st_mode)
        self._size_at_open = st.st_size
        self._pipe = stat.S_ISFIFO(st.st_mode)
        #: The write buffer (see _flush_wbuf): bytes written through the
        #: stream but not yet sent, for the file at _wbuf_pos (in append mode,
        #: for its end).  Only regular files and block devices coalesce: a
        #: pipe's, terminal's or socket's reader sees each write at once.
        #: While it holds anything, _pos is its end (append mode: stale,
        #: flushed before use).
        self._wsize = self._chunk if writable and coalesce and not self._stream else 0
        self._wbuf = bytearray()
        self._wbuf_pos = 0
        #: The stream's readiness waits, ended by close() (see S2 in close).
        self._waits = FdWaits()
        self._nowait_read = self._nowait_write = bool(_RWF_NOWAIT)
        try:
            # (A descriptor opened in append mode is at its end, as FileIO
            # seeks it there: a text file then writes no BOM mid-file.)
            whence = os.SEEK_END if pos is None and "a" in mode and not self._stream else 0
            here = os.lseek(fd, 0, whence or os.SEEK_CUR)
            self._seekable = True
        except OSError:
            here, self._seekable = 0, False
        self._pos = here if pos is None else pos
        #: Opened from a descriptor (its owner may go on using it): the
        #: descriptor's offset follows the stream at flush and close, as
        #: io's raw file (whose reads and writes move it) leaves it.
        self._shares_offset = pos is None and self._seekable and not self._stream
        self._synced = self._pos  # (where the descriptor's offset was left)
        #: The engine's inline read of this fd, for pread (see there):
        #: _no_inline_read if reads of it always queue.
        self._read_inline: Callable[[int, int], bytes | None] = (
            None if self._stream else io_.ctx.inline_bytes_reader(fd, CHUNK)
        ) or _no_inline_read
        #: The loop's fair-yield tick (LoopIO.tick), a local attribute.
        self._tick = io_.tick
        self._outstanding: set[AioRequest] = set()
        self._rbuf = b""  # read-ahead: bytes of the file from _rbuf_off
        self._rbuf_off = 0
        self._wgen = 0
        #: Bytes the last stream write moved, set even when it raised.
        self._moved = 0
        self._lock = StreamLock(io_.kind)
        self._text: Any = None
        if text and buffering < 0 and stat.S_ISCHR(st.st_mode) and os.isatty(fd):
            line_buffering = True  # (io's rule: a terminal's text is line-buffered)
        if text:
            from threadlets.textio import AsyncTextWrapper

            self._text = AsyncTextWrapper(
                _BinaryStream(self),
                encoding=encoding,
                errors=errors,
                newline=newline,
                line_buffering=line_buffering,
                write_through=False,
            )
            self.encoding = getattr(self._text, "encoding", encoding)
            self.errors = getattr(self._text, "errors", errors or "strict")
            self.newline = newline
        self._closed = False
        self._released = False
        #: True once closed, and always on trio: the fast paths check only this.
        self._slow_path = self._trio
        #: A binary file with offsets (no stream, no text layer): pwrite's
        #: fast path.  (Both are fixed when the file is made.)
        self._plain = not self._stream and self._text is None

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<threadlets.AsyncFile {self.name!r} mode={self.mode!r} {state}>"

    def __del__(self) -> None:
        # Like the built-in files: a file collected open is closed, with a
        # warning.  No loop access here (any thread, any time).  Also one
        # whose close() an interrupt (Ctrl-C) cut short before the
        # descriptor went: it is closed, and what its buffer held written.
        if getattr(self, "_released", True):
            return
        # The fast paths' tests first, as close() sets them: a file kept
        # alive by what its warning holds (warnings' record=True keeps the
        # source) must not read the descriptor's next owner.
        self._home = _NO_HOME
        self._slow_path = True
        # As io's finalizer does: what the buffer holds is written first
        # (blocking, best effort: a failure is lost with the file).
        self._write_buffer_now()
        if self._owner is None and self._closefd:
            try:
                if not self._closed:
                    warnings.warn(
                        f"unclosed file {self!r}", ResourceWarning, stacklevel=2, source=self
                    )
            finally:
                self._closed = self._released = True
                self._ctx.forget(self._fd)
                with contextlib.suppress(OSError):
                    os.close(self._fd)
        self._closed = self._released = True

    # -- plumbing -----------------------------------------------------------------------

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed file")

    def _still_open(self) -> None:
        """Checked by the stream before each request or system call on the
        descriptor: a call that spans several may see a close() between."""
        if self._closed:
            raise ValueError("I/O operation on closed file.")

    def _check_loop(self) -> None:
        if self._loop is not None:
            if _get_running_loop() is not self._loop:
                self._io.check_current()  # raises
        else:
            self._io.check_current()

    def _enter(self) -> None:
        """What every call checks before it does anything."""
        if self._closed:
            raise ValueError("I/O operation on closed file")
        self._check_loop()

    async def _run(self, req: AioRequest) -> Any:
        """Await one request; what every call comes down to."""
        if type(req) is _InlineDone:
            if next(self._tick):  # (the loop's tick, shared by every inline path)
                await self._io.fair_yield()
            return req._result
        outstanding = self._outstanding
        try:
            outstanding.add(req)
            await self._io._wait(req)
        except BaseException:
            self._wait_cut_short(req)
            raise
        outstanding.discard(req)
        if req._state is _DONE and req._exception is None:
            return req._result  # (result()'s own fast path, without its call)
        return req.result()

    def _wait_cut_short(self, req: AioRequest) -> None:
        """The wait for ``req`` raised: interrupted (Ctrl-C) before it could
        hold the caller (a cancellation waits a running request out).  A
        request not started is cancelled; one running stays outstanding,
        for close() to wait for before the descriptor goes."""
        if not req._processed and req.cancel() is CancelResult.NOTCANCELED:
            return
        self._outstanding.discard(req)

    # -- positional I/O ---------------------------------------------------------------------

    async def preadinto(self, buf: WriteableBuffer, offset: int) -> int:
        """Read into ``buf`` from ``offset``; returns the count (short at EOF)."""
        if self._slow_path or self._wbuf:  # (closed, or trio, or a buffer to send)
            self._enter()
            if self._wbuf:
                await self._flush_locked()
            elif self._trio:
                await self._io.checkpoint()
        # (The cheap test first, as in pread -- see _home -- then, if it
        # cannot tell, the exact one.)
        elif self._home._thread_id != _thread_key() and _get_running_loop() is not self._loop:
            self._io.check_current()  # raises
        # _nbytes(buf, into=True) == 0, spelled out for the common types (a
        # read-only view is not empty here: the engine refuses it).  Those
        # go through the engine's door for them (read() in a frame less:
        # see AioContext._start_rw), which is told what is known here.
        t = type(buf)
        if t is bytearray:
            if not buf:
                return self._transfer_nothing(False, offset)
            req = self._ctx._start_rw(None, buf, offset, 0, False, fd=self._fd)
        elif t is memoryview:
            if not buf.nbytes and not buf.readonly:  # type: ignore[attr-defined]
                return self._transfer_nothing(False, offset)
            req = self._ctx._start_rw(None, buf, offset, 0, False, fd=self._fd)
        elif _nbytes(buf, into=True) == 0:
            return self._transfer_nothing(False, offset)
        else:
            req = self._ctx.read(self._fd, offset, buf)
        # await self._run(req), spelled out (a coroutine less per read):
        # keep the two in step.
        if req.__class__ is _InlineDone:  # (type(req), without a call)
            if next(self._tick):  # (the loop's tick, as pread's)
                await self._io.fair_yield()
            return req._result  # type: ignore[return-value]
        outstanding = self._outstanding
        try:
            outstanding.add(req)
            await self._io._wait(req)
        except BaseException:
            self._wait_cut_short(req)
            raise
        outstanding.discard(req)
        if req._state is _DONE and req._exception is None:
            return req._result  # type: ignore[return-value]
        return req.result()

    async def pread(self, n: int, offset: int) -> bytes:
        """Read up to ``n`` bytes at ``offset``."""
        # The common case in one cheap test (see _home): the file's loop
        # runs in this thread -- never true of a closed file or trio's (their
        # _home is _NO_HOME), so those go on to the slow path's tests, as
        # does any loop the test cannot tell (then the exact test).
        if self._home._thread_id != _thread_key():
            if self._slow_path:  # closed, or trio (which wants a checkpoint)
                self._enter()
                await self._io.checkpoint()
            elif _get_running_loop() is not self._loop:
                self._io.check_current()  # raises
        if self._wbuf:
            await self._flush_locked()
        # The cached-data fast path: no request object at all.  The engine's
        # reader checks the arguments (plain ints, 0 < n <= CHUNK; anything
        # else is the request's to refuse), reads into its scratch buffer
        # and copies the bytes out before it returns, so concurrent preads
        # (all in this thread) share that buffer.  (_read_at's body,
        # repeated: a coroutine call costs here -- keep the two in step.)
        read_inline = self._read_inline  # (a local: self._read_inline(...) is not specialised)
        data = read_inline(n, offset)
        if data is not None:
            if next(self._tick):  # the loop's YIELD_EVERY-th inline pread: let others run
                await self._io.fair_yield()
            return data
        # A request: its completion goes to the loop, which the exact test
        # (the running loop's, not the thread's) makes sure of first.
        self._check_loop()
        buf = bytearray(_nonnegative(n, "count"))
        if not n:
            self._transfer_nothing(False, offset)
            return b""
        got = await self._run(self._ctx.read(self._fd, offset, buf))
        return bytes(buf) if got == n else bytes(memoryview(buf)[:got])

    def _transfer_nothing(self, write: bool, offset: object) -> int:
        """A positional call that moves no bytes: a system call that moves
        none, at once, for its errors (EBADF on a descriptor not open that
        way, as os.pread/os.pwrite) -- the engine answers 0 without one.
        Offsets are checked as the engine checks them; a pipe or terminal
        (where the engine makes one read or write, no offset) gets a readv or
        writev of no buffers, which the kernel answers without waiting."""
        where, _ = _check_range(offset, 0)  # (past the largest offset: ValueError, as with bytes)
        if self._stream:
            return os.writev(self._fd, []) if write else os.readv(self._fd, [])
        if write:
            return os.pwrite(self._fd, b"", where)
        os.pread(self._fd, 0, where)
        return 0

    async def _read_at(self, n: int, offset: int) -> bytes:
        """pread without its checks, for the stream (see pread)."""
        self._still_open()
        read_inline = self._read_inline
        data = read_inline(n, offset)
        if data is not None:
            if next(self._tick):
                await self._io.fair_yield()
            return data
        buf = bytearray(_nonnegative(n, "count"))
        got = await self._run(self._ctx.read(self._fd, offset, buf))
        return bytes(buf) if got == n else bytes(memoryview(buf)[:got])

    async def preadv(self, buffers: Sequence[WriteableBuffer], offset: int) -> int:
        """Read into several buffers, in order, from ``offset``."""
        self._enter()
        await self._io.checkpoint()
        if self._wbuf:
            await self._flush_locked()
        bufs = list(buffers)
        if _nbytes(*bufs, into=True) == 0:
            return self._transfer_nothing(False, offset)
        result: int = await self._run(self._ctx.read(self._fd, offset, bufs))
        return result

    async def pwrite(self, data: ReadableBuffer, offset: int) -> int:
        """Write ``data`` at ``offset``; returns the count written."""
        if self._slow_path or self._wbuf:  # (closed, or trio, or a buffer to send)
            self._enter()
            await self._io.checkpoint()  # (trio's: nothing on asyncio)
            if self._wbuf:
                await self._flush_locked()
        # (The cheap test first: see preadinto.)
        elif self._home._thread_id != _thread_key() and _get_running_loop() is not self._loop:
            self._io.check_current()  # raises
        # _nbytes(data) == 0, spelled out for the common types, which go
        # through the engine's door (see preadinto).
        t: type | None = type(data)
        if t is bytes or t is bytearray:
            if not data:
                return self._transfer_nothing(True, offset)
        elif t is memoryview:
            if not data.nbytes:  # type: ignore[attr-defined]
                return self._transfer_nothing(True, offset)
        elif _nbytes(data) == 0:
            return self._transfer_nothing(True, offset)
        else:
            t = None
        if not self._plain:
            result: int = await self._changing(lambda: self._ctx.write(self._fd, offset, data))
            return result
        # _changing's body for a plain binary file, spelled out (no closure
        # per write): the read-ahead dropped before and after.
        if self._closed:
            raise ValueError("I/O operation on closed file.")
        self._rbuf = b""
        self._wgen += 1
        try:
            req = (
                self._ctx.write(self._fd, offset, data)
                if t is None
                else self._ctx._start_rw(None, data, offset, 0, True, fd=self._fd)
            )
            # await self._run(req), spelled out as in preadinto (a write
            # never finishes inline without a request: no _InlineDone).
            outstanding = self._outstanding
            try:
                outstanding.add(req)
                await self._io._wait(req)
            except BaseException:
                self._wait_cut_short(req)
                raise
            outstanding.discard(req)
            if req._state is _DONE and req._exception is None:
                return req._result  # type: ignore[return-value]
            return req.result()
        finally:
            self._rbuf = b""
            self._wgen += 1

    async def pwritev(self, buffers: Sequence[ReadableBuffer], offset: int) -> int:
        """Write several buffers, in order, at ``offset``."""
        self._enter()
        await self._io.checkpoint()
        if self._wbuf:
            await self._flush_locked()
        bufs = list(buffers)
        if _nbytes(*bufs) == 0:
            return self._transfer_nothing(True, offset)
        result: int = await self._changing(lambda: self._ctx.write(self._fd, offset, bufs))
        return result

    async def _flush_locked(self) -> None:
        """Send the write buffer, if it holds anything, before a positional
        call (which sees what the stream wrote before it)."""
        if self._wbuf:
            await self._locked(self._flush_wbuf)

    async def _changing(self, submit: Callable[[], AioRequest], closing: bool = False) -> Any:
        """Run a request that changes the file: the read-ahead is dropped
        before it is submitted and again once it finished.  (A stream's
        read-ahead is data already taken from it: it stays.)  ``closing``:
        close() sends the write buffer, after the file reads as closed."""
        if not closing:
            self._still_open()
        if self._stream:
            return await self._run(submit())
        self._rbuf = b""
        self._wgen += 1
        if self._text is not None:
            self._text.invalidate()  # its decoded text, too
        try:
            return await self._run(submit())
        finally:
            self._rbuf = b""
            self._wgen += 1

    # -- the rest of the engine ------------------------------------------------------------------

    async def _op(self, submit: Callable[[], AioRequest], changes: bool = False) -> Any:
        self._enter()
        await self._io.checkpoint()
        if self._wbuf:
            await self._flush_locked()
        if changes:
            return await self._changing(submit)
        return await self._run(submit())

    async def fsync(self) -> None:
        await self._op(lambda: self._ctx.flush(self._fd, datasync=False))

    async def fdatasync(self) -> None:
        await self._op(lambda: self._ctx.flush(self._fd, datasync=True))

    async def discard(self, offset: int, length: int) -> None:
        """Punch a hole: the range reads as zeros; the size is kept."""
        await self._op(lambda: self._ctx.discard(self._fd, offset, length), True)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._op(lambda: self._ctx.write_zeroes(self._fd, offset, length), True)

    async def allocate(self, offset: int, length: int) -> None:
        await self._op(lambda: self._ctx.allocate(self._fd, offset, length), True)

    async def stat(self) -> os.stat_result:
        result: os.stat_result = await self._op(lambda: self._ctx.stat(self._fd))
        return result

    async def _size_now(self) -> int:
        self._still_open()
        st: os.stat_result = await self._run(self._ctx.stat(self._fd))
        return st.st_size

    # -- the binary stream, without the lock (callers hold it) ----------------------------

    def _drop_read_ahead(self) -> None:
        self._rbuf = b""

    async def _raw_read(self, n: int, offset: int) -> bytes:
        if self._stream:
            return await self._stream_read(n)
        return await self._read_at(n, offset)

    async def _fill(self, want: int) -> bool:
        """Read ahead from the end of the buffer; False at end of file."""
        while True:
            end = self._rbuf_off + len(self._rbuf)
            if not (self._rbuf_off <= self._pos <= end):
                self._rbuf, self._rbuf_off, end = b"", self._pos, self._pos
            gen = self._wgen
            chunk = await self._raw_read(max(self._chunk, want), end)
            if gen == self._wgen or self._stream:  # (a stream's data is read once)
                break
            self._rbuf = b""  # the file changed meanwhile: read it again
        if not chunk:
            return False
        keep = self._rbuf[self._pos - self._rbuf_off :]
        self._rbuf = keep + chunk if keep else chunk
        self._rbuf_off = self._pos
        return True

    def _buffered(self) -> memoryview:
        start = self._pos - self._rbuf_off
        if 0 <= start <= len(self._rbuf):
            return memoryview(self._rbuf)[start:]
        return memoryview(b"")

    def _check_readable(self, what: str = "read") -> None:
        if not self._readable:
            raise io.UnsupportedOperation(what)

    async def _read(self, n: int) -> bytes:
        self._check_readable()
        if n < -1:
            if self._chunk:
                raise ValueError("read length must be non-negative or -1")
            n = -1  # (io's raw files read everything for any negative size)
        if self._wbuf:
            await self._flush_wbuf()
        if n >= 0 and self._stream and not self._chunk:
            # Unbuffered, as FileIO: one read of a pipe or terminal is the
            # answer, short or not (waiting for the rest may wait for ever).
            return await self._read1(n)
        if n == -1:
            start, gen = self._pos, self._wgen
            parts = [bytes(self._buffered())]
            self._pos += len(parts[0])
            self._drop_read_ahead()
            size = CHUNK
            try:
                left = self._size_at_open - self._pos
                if self._regular and left > 0:
                    # What the size at open says is left, in one read (inline
                    # if cached: a read that ends short would not be); at the
                    # end if the size has not changed since.
                    chunk = await self._read_at(left, self._pos)
                    parts.append(chunk)
                    self._pos += len(chunk)
                    self._still_open()
                    if len(chunk) == left and os.fstat(self._fd).st_size == self._pos:
                        return b"".join(parts)
                while True:
                    chunk = await self._raw_read(size, self._pos)
                    size = min(size * 2, 1 << 20)  # grow for large files
                    if not chunk:
                        return b"".join(parts)
                    parts.append(chunk)
                    self._pos += len(chunk)
            except BaseException as e:
                if not isinstance(e, Exception):  # cancelled: consume nothing
                    self._unread(start, gen, parts)
                raise
        have = self._buffered()
        if len(have) < n and not self._stream and n - len(have) >= self._chunk:
            # Large: read it directly.
            rest = await self._read_at(n - len(have), self._pos + len(have))
            out = bytes(have) + rest
            self._pos += len(out)
            self._drop_read_ahead()
            return out
        while len(have) < n:
            # (A stream may need several reads; what each got stays in the
            # read-ahead, so a cancellation between them loses nothing.)
            if not await self._fill(n - len(have)):
                break
            have = self._buffered()
        out = bytes(have[:n])
        self._pos += len(out)
        return out

    def _unread(self, start: int, gen: int, parts: list[bytes]) -> None:
        """Undo a read that took ``parts`` from position ``start``: they
        become the read-ahead again (a stream's only copy; a file's, unless
        it changed since)."""
        self._pos = start
        if self._stream or gen == self._wgen:
            self._rbuf, self._rbuf_off = b"".join(parts), start

    async def _read1(self, n: int) -> bytes:
        """At most ``n`` bytes, with at most one read of the file; b"" only
        at end of file (or for ``n == 0``)."""
        self._check_readable("read1")
        if self._wbuf:
            await self._flush_wbuf()
        if n < 0:
            n = self._chunk or CHUNK  # (io's: the buffer's size)
        have = self._buffered()
        if not have and n:
            await self._fill(n)
            have = self._buffered()
        out = bytes(have[:n])
        self._pos += len(out)
        return out

    async def _readline(self, limit: int) -> bytes:
        if not limit:
            return b""  # (io's readline(0) reads nothing: even a write-only file answers)
        self._check_readable()
        if self._wbuf:
            await self._flush_wbuf()
        while True:
            have = self._buffered()
            nl = bytes(have).find(b"\n") if len(have) < 4096 else self._find_nl()
            if nl >= 0 or (0 <= limit <= len(have)):
                cut = nl + 1 if nl >= 0 else len(have)
                if 0 <= limit < cut:
                    cut = limit
                out = bytes(have[:cut])
                self._pos += cut
                return out
            if not await self._fill(len(have) + (self._chunk or CHUNK)):
                out = bytes(self._buffered())
                self._pos += len(out)
                return out

    def _find_nl(self) -> int:
        start = self._pos - self._rbuf_off
        i = self._rbuf.find(b"\n", start)
        return i - start if i >= 0 else -1

    async def _readlines(self, hint: int) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        start, gen = self._pos, self._wgen
        try:
            while True:
                line = await self._readline(-1)
                if not line:
                    return lines
                lines.append(line)
                total += len(line)
                if 0 < hint < total:  # (io: "exceeds hint")
                    return lines
        except BaseException as e:
            if not isinstance(e, Exception):  # cancelled: consume nothing
                self._unread(start, gen, [*lines, bytes(self._buffered())])
            raise

    async def _write(self, data: Any) -> int:
        # io: a buffered reader has no write at all; a raw file (buffering=0)
        # checks the argument first.
        if not self._writable and self._chunk:
            raise io.UnsupportedOperation("write")
        if isinstance(data, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        try:
            view = memoryview(data)
        except TypeError:
            raise TypeError(
                f"a bytes-like object is required, not '{type(data).__name__}'"
            ) from None
        if not view.c_contiguous:
            raise BufferError("memoryview: underlying buffer is not C-contiguous")
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        self._moved = 0
        n = view.nbytes
        if not n:
            return 0  # (io moves nothing, not even in append mode)
        if self._stream:
            return await self._stream_write(view)
        if self._wsize:
            # io.BufferedWriter's rule: what fits is buffered (once the
            # buffer is sent, if it would overflow); a larger write goes
            # straight to the file, in one request.
            if self._wbuf and len(self._wbuf) + n > self._wsize:
                await self._flush_wbuf()
            if n <= self._wsize:
                self._still_open()  # (close() may have begun during the flush)
                if not self._wbuf:
                    self._wbuf_pos = self._pos
                    self._rbuf = b""
                self._wbuf += view
                if not self._append:
                    self._pos += n
                self._moved = n
                return n
        pos = self._pos
        req: AioRequest | None = None

        def submit() -> AioRequest:
            nonlocal req
            req = self._ctx.write(self._fd, pos, data)
            return req

        try:
            written: int = await self._changing(submit)
        except BaseException as e:
            # Cancelled while it ran (or once it finished inline), or failed
            # part-way (EFBIG, ENOSPC): what was written happened, and the
            # position must follow it.
            moved = _moved_by(req, e)
            if moved > 0:
                self._moved = moved
                if self._append and not self._closed:
                    self._pos = os.fstat(self._fd).st_size
                else:
                    self._pos = pos + moved
                if not self._chunk and isinstance(e, OSError):
                    return moved  # (FileIO: one write(2), a short count; the error comes next)
            raise
        self._moved = written
        if self._append:
            await self._to_end()
        else:
            self._pos = pos + written
        return written

    async def _to_end(self) -> None:
        """Append mode: the position follows a write to the end of the file."""
        try:
            self._pos = await self._size_now()
        except BaseException as e:
            if not isinstance(e, Exception) and not self._closed:
                self._pos = os.fstat(self._fd).st_size
            raise

    async def _flush_wbuf(self, closing: bool = False) -> None:
        """Send the write buffer, as one request.  What a request that
        failed (ENOSPC, EIO) or whose caller was cancelled wrote leaves the
        buffer; the rest stays, to be sent by the next flush (as with
        io.BufferedWriter).  In append mode the position is then the end of
        the file."""
        if not self._wbuf:
            return
        moved = 1
        while self._wbuf and moved:
            data, pos = self._wbuf, self._wbuf_pos
            # A new buffer: the request may keep a view of this one.
            self._wbuf = bytearray()
            req: AioRequest | None = None

            def submit() -> AioRequest:
                nonlocal req
                req = self._ctx.write(self._fd, pos, data)  # noqa: B023
                return req

            moved = 0
            try:
                moved = await self._changing(submit, closing)
            except BaseException as e:
                moved = _moved_by(req, e)
                if not isinstance(e, Exception) and req in self._outstanding:
                    # Interrupted (Ctrl-C) while it runs on: it writes what
                    # it was given -- not to be sent again (append mode
                    # would write it twice).
                    moved = len(data)
                if moved and self._append and not self._closed:
                    self._pos = os.fstat(self._fd).st_size
                raise
            finally:
                if moved < len(data):
                    self._wbuf = data[moved:]
                self._wbuf_pos = pos + moved
        if self._append and not closing:
            await self._to_end()

    async def _seek(self, offset: object, whence: object = os.SEEK_SET) -> int:
        off = _off_t(operator.index(offset), not self._chunk)  # type: ignore[arg-type]
        how = operator.index(whence)  # type: ignore[arg-type]
        if not -(2**31) <= how < 2**31:
            raise OverflowError("Python int too large to convert to C int")
        if how not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            if not self._chunk:
                raise _einval()  # (FileIO leaves whence to lseek)
            raise ValueError(f"whence value {how} unsupported")
        if not self._seekable and self._chunk:  # (io's buffered files check seekable() first)
            raise io.UnsupportedOperation("File or stream is not seekable.")
        if self._stream:
            # A character device reads and writes at the descriptor's own
            # offset: the seek is lseek's (whose answer is the device's:
            # /dev/zero's is always 0; a pipe's ESPIPE), as FileIO's; what
            # was read ahead is dropped, as BufferedReader drops it.
            if how == os.SEEK_CUR:
                off -= len(self._buffered())
            self._still_open()
            new = os.lseek(self._fd, off, how)
            self._rbuf, self._rbuf_off, self._pos = b"", new, new
            return new
        if self._wbuf:
            await self._flush_wbuf()
        if how == os.SEEK_SET:
            new = off
        elif how == os.SEEK_CUR:
            new = self._pos + off
        elif how == os.SEEK_END:
            new = await self._size_now() + off
        else:
            self._still_open()
            new = await self._run(self._ctx.call(os.lseek, self._fd, off, how))
        if new < 0:
            raise _einval()
        self._pos = new
        return new

    def _tell(self) -> int:
        if self._stream:
            # The descriptor's offset (see _seek), less what was read ahead
            # (not below 0), as io's; a pipe's lseek raises ESPIPE.
            self._still_open()
            return max(os.lseek(self._fd, 0, os.SEEK_CUR) - len(self._buffered()), 0)
        if not self._seekable:
            raise _espipe()
        return self._pos

    async def _truncate(self, size: object = None) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("truncate")
        if self._wbuf:
            await self._flush_wbuf()
        if size is None and not self._seekable:
            raise _espipe()  # (io asks tell() for the size)
        n = self._pos if size is None else operator.index(size)  # type: ignore[arg-type]
        _off_t(n, True)  # (io's truncate takes a C long, raw or buffered)
        if n < 0:
            raise _einval()
        await self._changing(lambda: self._ctx.truncate(self._fd, n))
        return n

    # -- streams that can block for ever (pipes, terminals...) ------------------------------

    def _try_read(self, n: int) -> bytes | None:
        """One read that does not block: the bytes, or None if it would."""
        fd = self._fd
        if self._nowait_read:
            buf = bytearray(n)
            try:
                got = os.preadv(fd, [buf], -1, _RWF_NOWAIT)  # -1: the file position
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ESPIPE):
                    raise
                self._nowait_read = False  # (a terminal): see below
            else:
                del buf[got:]
                return bytes(buf)
        # The descriptor is non-blocking for this one call only: the open
        # file description may be shared (stdin).
        with _NonBlocking(fd):
            try:
                return os.read(fd, n)
            except BlockingIOError:
                return None

    def _try_write(self, view: memoryview) -> int | None:
        fd = self._fd
        if self._nowait_write:
            try:
                return os.pwritev(fd, [view], -1, _RWF_NOWAIT)
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ESPIPE):
                    raise
                self._nowait_write = False
        with _NonBlocking(fd):
            try:
                return os.write(fd, view)
            except BlockingIOError:
                return None

    async def _stream_read(self, n: int) -> bytes:
        """One read of up to ``n`` bytes, as io's raw read: past 64 KiB, up
        to what the descriptor holds where it tells (FIONREAD: a pipe
        enlarged with F_SETPIPE_SZ, a socket, a terminal), so a large ``n``
        allocates no more than one read can give; else (``/dev/zero``) ``n``."""
        waited = False
        while True:
            self._still_open()
            if n > CHUNK:
                held = _unread(self._fd)
                want = n if held < 0 else min(n, max(CHUNK, held))
            else:
                want = n
            data = self._try_read(want)
            # A FIFO that no writer has opened yet reads as end of file but
            # is not readable: end of file only once the loop says readable.
            if data is None or (not data and self._pipe and not waited):
                await self._io.wait_fd(self._fd, False, self._waits)
                waited = True
                continue
            return data

    async def _stream_write(self, view: memoryview) -> int:
        view = view.cast("B")
        done = 0
        while done < len(view):
            self._still_open()
            n = self._try_write(view[done:])
            if n is None:
                await self._io.wait_fd(self._fd, True, self._waits)
            else:
                done += n
                self._moved = done
        return done

    # -- the stream's public calls -------------------------------------------------------------

    async def _locked(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        self._enter()
        await self._io.checkpoint()
        # A stream call counts on the loop's fair-yield tick (see LoopIO.tick)
        # as an inline answer does: most are answered from the read-ahead
        # or into the write buffer without suspending, and a fill counts
        # once for a whole CHUNK -- ``async for line in f`` over a cached
        # file ran 4M lines (12 s) without letting another task run.
        # (Before the lock: the yield holds nothing.)
        if next(self._tick):
            await self._io.fair_yield()
        lock = self._lock
        if lock.busy:
            await lock.acquire()
        else:
            lock.busy = True
        try:
            return await fn(*args)
        finally:
            lock.release()

    async def read(self, size: int | None = -1) -> Any:
        """Read up to ``size`` bytes (text mode: characters), or to the end."""
        if self._text is not None:
            return await self._locked(self._text.read, size)
        return await self._locked(self._read, _size(size))

    async def read1(self, size: int = -1) -> bytes:
        """At most ``size`` bytes with at most one read of the file (binary)."""
        if self._text is not None:
            raise AttributeError("read1 needs binary mode")
        n = _ssize(operator.index(size))
        return await self._locked(self._read1, n)  # type: ignore[no-any-return]

    async def peek(self, size: int = 0) -> bytes:
        """Bytes ahead of the position, without moving it: what the read-ahead
        holds, after at most one read of the file if it holds nothing
        (binary; like BufferedReader.peek, the count may differ from ``size``)."""
        if self._text is not None:
            raise AttributeError("peek needs binary mode")
        return await self._locked(self._peek, operator.index(size))  # type: ignore[no-any-return]

    async def _peek(self, size: int) -> bytes:
        self._check_readable("peek")
        if self._wbuf:
            await self._flush_wbuf()
        have = self._buffered()
        if not have:
            await self._fill(max(size, 1))
            have = self._buffered()
        return bytes(have)

    async def readinto(self, buf: WriteableBuffer) -> int:
        """Read into ``buf`` at the current position (binary mode)."""
        return await self._readinto(buf, "readinto")

    async def readinto1(self, buf: WriteableBuffer) -> int:
        """Read into ``buf`` with at most one read of the file, as
        :meth:`read1` (binary mode; io's buffered files have it)."""
        return await self._readinto(buf, "readinto1")

    async def _readinto(self, buf: WriteableBuffer, what: str) -> int:
        if self._text is not None:
            # (as read1 and peek: io's text files have no readinto)
            raise AttributeError(f"{what} needs binary mode")
        view = memoryview(buf)
        if view.readonly:
            raise TypeError(
                f"{what}() argument must be read-write bytes-like object, not {type(buf).__name__}"
            )
        view = view.cast("B")
        if not self._readable:
            self._enter()
            raise io.UnsupportedOperation("read" if what == "readinto" else "read1")
        read = self._read if what == "readinto" else self._read1
        data: bytes = await self._locked(read, len(view))
        view[: len(data)] = data
        return len(data)

    async def readline(self, size: int | None = -1) -> Any:
        """One line, with its newline; b"" / "" at end of file."""
        if self._text is not None:
            return await self._locked(self._text.readline, size)
        return await self._locked(self._readline, _size(size))

    async def readlines(self, hint: int | None = -1) -> list[Any]:
        """The remaining lines (stopping once ``hint`` bytes/characters are read)."""
        if self._text is not None:
            return await self._locked(self._text.readlines, hint)  # type: ignore[no-any-return]
        return await self._locked(self._readlines, _size(hint))  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[Any]:
        self._check_open()  # (as io's iter() of a closed file)
        return self

    async def __anext__(self) -> Any:
        if self._text is not None:
            return await self._locked(self._text.__anext__)
        line = await self._locked(self._readline, -1)
        if not line:
            raise StopAsyncIteration
        return line

    async def write(self, data: Any) -> int:
        """Write at the current position (at the end in append mode);
        returns the count of bytes (text mode: characters) written.

        A write that raises once some of it moved -- cancelled (a pipe took
        part of it before the reader stopped; a request that ran), a pipe
        whose reader went (BrokenPipeError), a file closed meanwhile by
        another task (ValueError) -- raises with ``characters_written`` set
        to the count of bytes moved, as io's ``BlockingIOError`` carries it:
        read it as ``getattr(e, "characters_written", 0)`` (absent: nothing
        moved)."""
        if self._text is not None:
            return await self._locked(self._counted, self._text.write, data)  # type: ignore[no-any-return]
        return await self._locked(self._counted, self._write, data)  # type: ignore[no-any-return]

    async def _counted(self, write: Callable[[Any], Awaitable[int]], data: Any) -> int:
        """``write(data)``, telling an exception what it moved."""
        self._moved = 0
        try:
            return await write(data)
        except BaseException as e:
            if self._moved:
                with contextlib.suppress(AttributeError, TypeError):
                    e.characters_written = self._moved  # type: ignore[attr-defined]
            raise

    async def writelines(self, lines: Iterable[Any]) -> None:
        """Write each of ``lines``, as one call."""
        await self._locked(self._writelines, lines)

    async def _writelines(self, lines: Iterable[Any]) -> None:
        """Each line in turn; an exception tells the bytes moved by the
        lines before it and by its own, as write()'s does."""
        write = self._text.write if self._text is not None else self._write
        moved = 0
        try:
            for line in lines:
                self._moved = 0
                await write(line)
                moved += self._moved
        except BaseException as e:
            if moved + self._moved:
                with contextlib.suppress(AttributeError, TypeError):
                    e.characters_written = moved + self._moved  # type: ignore[attr-defined]
            raise

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position; returns the new one."""
        if self._text is not None:
            return await self._locked(self._text.seek, offset, whence)  # type: ignore[no-any-return]
        return await self._locked(self._seek, offset, whence)  # type: ignore[no-any-return]

    async def tell(self) -> int:
        """The position (in text mode: an opaque cookie for seek)."""
        if self._text is not None:
            return await self._locked(self._text.tell)  # type: ignore[no-any-return]
        return await self._locked(self._tell_async)  # type: ignore[no-any-return]

    async def _tell_async(self) -> int:
        if self._wbuf and self._append:  # (where the buffer lands is known once sent)
            await self._flush_wbuf()
        return self._tell()

    async def truncate(self, size: int | None = None) -> int:
        """Set the size (default: the current position); returns it.  The
        position does not move."""
        if self._text is not None:
            return await self._locked(self._text.truncate, size)  # type: ignore[no-any-return]
        return await self._locked(self._truncate, size)  # type: ignore[no-any-return]

    async def flush(self) -> None:
        """Send what the write buffer holds, as one request (see fsync for
        durability)."""
        if self._text is not None:
            await self._locked(self._text.flush)
        else:
            await self._locked(self._flush_wbuf)
        if self._shares_offset and not self._wbuf and not self._closed:
            self._sync_offset(self._pos)

    @property
    def reconfigure(self) -> Callable[..., Awaitable[None]]:
        """Text mode: ``await f.reconfigure(*, encoding, errors, newline,
        line_buffering, write_through)``, as ``io.TextIOWrapper``'s (a
        binary file has none, as io's)."""
        if self._text is None:
            raise AttributeError("reconfigure needs text mode")
        return self._reconfigure

    async def _reconfigure(
        self,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: Any = _UNSET,
        line_buffering: bool | None = None,
        write_through: bool | None = None,
    ) -> None:
        text = self._text

        async def run() -> None:
            await text.reconfigure(
                encoding=encoding,
                errors=errors,
                newline=newline,
                line_buffering=line_buffering,
                write_through=write_through,
            )

        try:
            await self._locked(run)
        finally:
            self.encoding, self.errors = text.encoding, text.errors
        if newline is not _UNSET:
            self.newline = newline

    @property
    def newlines(self) -> str | tuple[str, ...] | None:
        """Text mode: the newlines read so far, as io's."""
        if self._text is None:
            raise AttributeError("newlines needs text mode")
        newlines: str | tuple[str, ...] | None = self._text.newlines
        return newlines

    @property
    def line_buffering(self) -> bool:
        if self._text is None:
            raise AttributeError("line_buffering needs text mode")
        return bool(self._text.line_buffering)

    @property
    def write_through(self) -> bool:
        if self._text is None:
            raise AttributeError("write_through needs text mode")
        return bool(self._text.write_through)

    def readable(self) -> bool:
        self._check_open()
        return self._readable

    def writable(self) -> bool:
        self._check_open()
        return self._writable

    def seekable(self) -> bool:
        """True only where the descriptor can seek (not a pipe or terminal)."""
        self._check_open()
        return self._seekable

    def isatty(self) -> bool:
        """True if the descriptor is a terminal (a cheap ioctl, not awaited)."""
        self._check_open()
        return os.isatty(self._fd)

    # -- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Send what the write buffer holds, wait for this file's outstanding
        requests, then close it.  A cancelled close still closes the file,
        then lets the cancellation through; one whose write fails closes
        it, then raises the error (the unsent bytes are lost, as with io)."""
        if self._closed:
            return
        self._check_loop()
        # The fast paths' tests first, then the flag the slow path checks: a
        # Ctrl-C among these stores leaves no fast path open to a file
        # marked closed (pread's cheap test: see there).
        self._home = _NO_HOME
        self._slow_path = True
        self._closed = True
        try:
            # Stream calls in other tasks see _closed before their next
            # request or system call; those waiting for readiness are woken
            # (with ValueError) and the loop stops watching the descriptor.
            self._waits.close()
            if self._outstanding or self._wbuf or (self._wsize and self._lock.busy):
                await self._io.shielded(self._finish_close)
            else:
                # Nothing to wait for: closed here, with no await (a close on
                # the ring would be a point where a cancellation comes
                # through, and costs a round trip that a local file's
                # close(2) does not).
                self._sync_offset(self._pos)
                self._release()
        except BaseException:
            # Cut short (Ctrl-C, SystemExit) before the descriptor went: it
            # goes now, unless a request still runs on it (then __del__
            # closes it, once nothing refers to the file).
            if not self._released and not self._outstanding:
                self._abandon()
            raise

    def _write_buffer_now(self) -> None:
        """Write what the buffer holds, blocking and best effort (a failure
        is lost with the file), as io's finalizer does."""
        if self._wbuf:
            data, self._wbuf = self._wbuf, bytearray()
            with contextlib.suppress(OSError):
                if self._append:
                    os.write(self._fd, data)
                else:
                    os.pwrite(self._fd, data, self._wbuf_pos)
                    self._pos = max(self._pos, self._wbuf_pos + len(data))

    def _abandon(self) -> None:
        """A close cut short: write what the buffer holds (blocking, as
        io's finalizer does) and give the descriptor up, now."""
        try:
            self._write_buffer_now()
            self._sync_offset(self._pos)
        finally:
            self._release()

    async def _finish_close(self) -> None:
        try:
            # After the stream call in progress (if any): its write may
            # have buffered, or be sending the buffer.
            if self._wsize:
                lock = self._lock
                await lock.acquire()
                try:
                    await self._flush_wbuf(closing=True)
                finally:
                    lock.release()
        finally:
            # (What a failed flush did not send is lost: the stream ends
            # where the sent bytes end.)
            end = self._wbuf_pos if self._wbuf else self._pos
            self._wbuf = bytearray()
            while self._outstanding:
                # Another task awaits it; wait for it on a worker, not the loop.
                req = next(iter(self._outstanding))
                await self._run(self._ctx.call(req.wait))
                self._outstanding.discard(req)
            self._sync_offset(end)
            if self._closes_on_ring():
                await self._close_on_ring()
            else:
                self._release()

    def _sync_offset(self, pos: int) -> None:
        """A file opened from a descriptor: move the descriptor's offset to
        ``pos`` (append mode: the end), where io's raw file would have left
        it -- the stream's own I/O is positional and moves it nowhere.  Not
        if the stream has not moved since it last did (the owner may have
        used the descriptor meanwhile, as io leaves it then)."""
        if self._shares_offset and pos != self._synced:
            self._synced = pos
            with contextlib.suppress(OSError):
                os.lseek(self._fd, 0, os.SEEK_END) if self._append else os.lseek(
                    self._fd, pos, os.SEEK_SET
                )

    def _closes_on_ring(self) -> bool:
        """Whether the last step of a close that waited anyway is an
        IORING_OP_CLOSE: on the io_uring backend, for a descriptor the file
        owns (not a wrapped file object's; not a trio stream's, which trio
        must be told of)."""
        return (
            self._ctx.backend == "io_uring"
            and self._owner is None
            and self._closefd
            and not (self._stream and self._trio)
        )

    async def _close_on_ring(self) -> None:
        """_release, with the close(2) in the kernel's hands (where a file
        system's flush-on-close blocks, it blocks there).  Run shielded: a
        close request is never cancelled."""
        try:
            req = self._ctx.close_fd(self._fd)
        except Exception:
            # Refused at once (the context is closed): closed here, as
            # before the ring took closes -- never left open.
            self._release()
            return
        self._released = True  # (the ring closes it: never repeated)
        await self._run(req)

    def _release(self) -> None:
        """Give the descriptor up (the last step of closing), once: an
        interrupt in any step still closes it."""
        if self._released:
            return
        self._released = True
        try:
            self._ctx.forget(self._fd)
        finally:
            if self._owner is not None:
                self._owner.close()
            elif self._closefd:
                try:
                    if self._stream and self._trio:
                        import trio

                        trio.lowlevel.notify_closing(self._fd)
                finally:
                    os.close(self._fd)

    async def __aenter__(self) -> AsyncFile:
        self._check_open()  # (as io's __enter__ of a closed file)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _moved_by(req: AioRequest | None, e: BaseException) -> int:
    """What a write request moved before ``e`` was raised to its caller:
    its error's ``transferred``, or its whole result if it ran and the
    caller was cancelled."""
    if isinstance(e, OSError):
        return int(getattr(e, "transferred", 0))
    if req is None or isinstance(e, Exception):
        return 0
    err, value = req.outcome()
    if err == 0:
        return max(value, 0)
    if err in (errno.EINPROGRESS, errno.ECANCELED):
        return 0
    return int(getattr(req.exception(), "transferred", 0))


def _unread(fd: int) -> int:
    """Bytes waiting to be read from a pipe, socket or terminal (FIONREAD);
    -1 if it cannot tell (a character device that has no such count)."""
    try:
        got = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return -1
    return int.from_bytes(got, sys.byteorder, signed=True)


class _NonBlocking:
    """O_NONBLOCK on a descriptor for the span of a ``with``, restored after."""

    __slots__ = ("_fd", "_flags")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._flags = -1

    def __enter__(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            self._flags = flags

    def __exit__(self, *exc_info: object) -> None:
        if self._flags >= 0:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags)


class _BinaryStream:
    """A file's binary stream as the text layer uses it: the async calls of
    a Python buffered file, without the file's lock (the text call that
    reaches here holds it)."""

    __slots__ = ("_f",)

    def __init__(self, f: AsyncFile) -> None:
        self._f = f

    @property
    def closed(self) -> bool:
        return self._f._closed

    @property
    def name(self) -> object:
        return self._f.name

    async def read1(self, size: int = -1) -> bytes:
        return await self._f._read1(operator.index(size))

    async def read(self, size: int | None = -1) -> bytes:
        return await self._f._read(_size(size))

    async def write(self, data: ReadableBuffer) -> int:
        return await self._f._write(data)

    @property
    def moved(self) -> int:
        """Bytes the last write moved (set even when it raised)."""
        return self._f._moved

    def mark(self) -> tuple[int, int] | None:
        """Where the stream is, for :meth:`rewind`; None where it cannot go
        back (a pipe's bytes are read once; an append-mode buffer still to
        send leaves the position unknown)."""
        f = self._f
        if f._stream or f._wbuf:
            return None
        return f._pos, f._wgen

    def rewind(self, mark: tuple[int, int]) -> bool:
        """Back to ``mark`` (a cancelled text read gives back what it took):
        the read-ahead stays, and serves the bytes again.  False if the
        stream was written since (nothing is undone then)."""
        f = self._f
        if f._closed or f._wbuf:
            return False
        f._pos = mark[0]
        return True

    async def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        return await self._f._seek(pos, whence)

    async def tell(self) -> int:
        return await self._f._tell_async()

    async def flush(self) -> None:
        await self._f._flush_wbuf()

    async def truncate(self, pos: int | None = None) -> int:
        return await self._f._truncate(pos)

    def readable(self) -> bool:
        return self._f._readable

    def writable(self) -> bool:
        return self._f._writable

    def seekable(self) -> bool:
        return self._f._seekable


class AsyncBinaryFile(AsyncFile):
    """An :class:`AsyncFile` opened in binary mode: reads give ``bytes``.
    (The same object at run time; the class tells type checkers.)"""

    if TYPE_CHECKING:

        async def read(self, size: int | None = -1) -> bytes: ...
        async def readline(self, size: int | None = -1) -> bytes: ...
        async def readlines(self, hint: int | None = -1) -> list[bytes]: ...
        async def write(self, data: ReadableBuffer) -> int: ...
        async def writelines(self, lines: Iterable[ReadableBuffer]) -> None: ...
        def __aiter__(self) -> AsyncIterator[bytes]: ...
        async def __anext__(self) -> bytes: ...
        async def __aenter__(self) -> AsyncBinaryFile: ...


class AsyncTextFile(AsyncFile):
    """An :class:`AsyncFile` opened in text mode: reads give ``str``.
    (The same object at run time; the class tells type checkers.)"""

    encoding: str
    errors: str
    newline: str | None

    if TYPE_CHECKING:

        async def read(self, size: int | None = -1) -> str: ...
        async def readline(self, size: int | None = -1) -> str: ...
        async def readlines(self, hint: int | None = -1) -> list[str]: ...
        async def write(self, data: str) -> int: ...
        async def writelines(self, lines: Iterable[str]) -> None: ...
        def __aiter__(self) -> AsyncIterator[str]: ...
        async def __anext__(self) -> str: ...
        async def __aenter__(self) -> AsyncTextFile: ...


_F = TypeVar("_F", bound=AsyncFile)


class _Opener(Generic[_F]):
    """What :func:`open` returns: awaitable, and an async context manager."""

    __slots__ = ("_args", "_file")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self._args = args
        self._file: _F | None = None

    def __await__(self) -> Generator[Any, None, _F]:
        return _open(*self._args).__await__()  # type: ignore[return-value]

    async def __aenter__(self) -> _F:
        self._file = await _open(*self._args)  # type: ignore[assignment]
        assert self._file is not None
        return self._file

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._file is not None
        await self._file.close()


_Path = Union["StrPath", bytes, int]


@overload
def open(
    file: _Path,
    mode: OpenTextMode = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: Callable[[str, int], int] | None = None,
    *,
    direct: bool = False,
    perms: int = 0o666,
) -> _Opener[AsyncTextFile]: ...
@overload
def open(
    file: _Path,
    mode: OpenBinaryMode,
    buffering: int = -1,
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    closefd: bool = True,
    opener: Callable[[str, int], int] | None = None,
    *,
    direct: bool = False,
    perms: int = 0o666,
) -> _Opener[AsyncBinaryFile]: ...
@overload
def open(
    file: _Path,
    mode: str,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: Callable[[str, int], int] | None = None,
    *,
    direct: bool = False,
    perms: int = 0o666,
) -> _Opener[AsyncFile]: ...
def open(
    file: _Path,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: Callable[[str, int], int] | None = None,
    *,
    direct: bool = False,
    perms: int = 0o666,
) -> _Opener[Any]:
    """Open a file for async I/O: ``async with threadlets.open(p) as f`` or
    ``f = await threadlets.open(p)``.

    The arguments are the built-in open()'s, with its defaults: ``mode``
    "r" is text ("rb" for bytes); ``file`` may be an open descriptor
    (closed with the file unless ``closefd=False``); ``buffering`` 0 is
    unbuffered (binary only: one request per read or write), N > 1 the
    read-ahead and write-buffer size (-1: 64 KiB), 1 line buffering (text);
    writes to pipes, sockets and terminals are never held back.
    ``opener(path, flags)`` returns the descriptor.  Also
    ``direct=True``: O_DIRECT (any buffer works: misaligned ones go through
    a bounce buffer); where there is no O_DIRECT (macOS, portable mode),
    ``fcntl(F_NOCACHE)`` on the descriptor opened; where there is neither,
    OSError(ENOTSUP) at once.  ``perms``: the mode bits of a created file.
    The open runs on a worker (on the io_uring backend the kernel opens it:
    IORING_OP_OPENAT), or inline where every path component is cached; a
    cancelled open closes the descriptor it got.
    A binary file's reads are ``bytes`` (:class:`AsyncBinaryFile`), a text
    file's ``str`` (:class:`AsyncTextFile`).
    """
    flags, text, _, _ = _flags_for(mode)
    _check_text_args(text, encoding, errors, newline)
    _check_buffering(buffering, text, late=False)
    if isinstance(file, bool):
        raise TypeError("expected str, bytes, os.PathLike object or integer, not bool")
    if isinstance(file, int) and file < 0:
        raise ValueError("negative file descriptor")
    if not isinstance(file, int):
        file = _no_nul(os.fspath(file))
        if not closefd:
            raise ValueError("Cannot use closefd=False with file name")
        if opener is not None and not callable(opener):
            raise TypeError(f"'{type(opener).__name__}' object is not callable")
    try:
        # What io checks once it holds the descriptor: an open(fd) that
        # fails here has the descriptor closed (unless closefd=False), as
        # io.open's error path closes its FileIO.
        _check_text_values(text, encoding, newline)
        _check_buffering(buffering, text, warn=False)
    except BaseException:
        if isinstance(file, int) and closefd:
            with contextlib.suppress(OSError):
                os.close(file)
        raise
    nocache = False
    if direct:
        if O_DIRECT:
            flags |= O_DIRECT
        elif F_NOCACHE:
            nocache = True
        else:
            note = capability_note("o_direct")
            raise OSError(errno.ENOTSUP, f"direct=True: {note}, and there is no F_NOCACHE")
    return _Opener(
        (file, mode, flags, perms, encoding, errors, newline, buffering, closefd, opener, nocache)
    )


async def _open(
    path: Any,
    mode: str,
    flags: int,
    perms: int,
    encoding: str | None,
    errors: str | None,
    newline: str | None,
    buffering: int = -1,
    closefd: bool = True,
    opener: Callable[[str, int], int] | None = None,
    nocache: bool = False,
) -> AsyncFile:
    io_ = current()
    await io_.checkpoint()
    cls = AsyncBinaryFile if "b" in mode else AsyncTextFile
    if isinstance(path, int):
        fd = path
        st = await _call(io_, os.fstat, fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        pos = None
    else:
        got: Any = None
        if opener is None and io_.ctx.inline:
            got = _open_inline(path, flags)
        if got is not None:
            pass
        elif opener is not None:
            got = await _open_blocking(io_, path, flags, perms, opener)
        else:
            on_ring = io_.ctx.backend == "io_uring"
            # Until the wait below takes the request over, its callback
            # closes what it opens: a Ctrl-C as the submission returns
            # leaves a request that runs, but no caller to close its result.
            orphan = _opened_closer(on_ring)
            if on_ring:
                # The kernel opens it (O_NONBLOCK: as _open_nonblocking does);
                # the rest of _open_nonblocking then runs here, as after an
                # inline open.
                req = io_.ctx.openat(path, flags | os.O_NONBLOCK, perms, callback=orphan)
            else:
                req = io_.ctx.call(_open_nonblocking, path, flags, perms, callback=orphan)
            handed = False  # (set once _opened owns the descriptor: it closes it on error)
            try:
                await io_._wait(req)
                if on_ring:
                    if req.error in (errno.ENXIO, errno.EAGAIN):
                        got = None
                    else:
                        opened_fd = req.result()
                        handed = True
                        got = _clear_nonblocking(*_opened(opened_fd, path), flags)
                else:
                    got = req.result()
            except BaseException:
                # Cancelled, or interrupted (Ctrl-C) before the wait began or
                # as it ended: if the open ran anyway, or runs still, its
                # descriptor is ours to close.
                if not handed:
                    _close_opened(req, on_ring)
                raise
            if got is None:
                got = await _open_blocking(io_, path, flags, perms)
        fd, st = got
        pos = st.st_size if "a" in mode else 0
    try:
        if nocache and not isinstance(path, int):
            fcntl.fcntl(fd, F_NOCACHE, 1)
        return cls(
            fd,
            path,
            mode,
            io_,
            encoding=encoding,
            errors=errors,
            newline=newline,
            st=st,
            pos=pos,
            buffering=buffering,
            closefd=closefd,
        )
    except BaseException:
        if not isinstance(path, int):  # (a caller's descriptor stays theirs, as open() does)
            os.close(fd)
        raise


def _opened_closer(on_ring: bool) -> Callable[[AioRequest], None]:
    """The callback of an open request nobody awaits: closes what it opened."""

    def close(r: AioRequest) -> None:
        opened: Any = r.result() if r.error == 0 else None
        if opened is not None:
            os.close(opened if on_ring else opened[0])

    return close


def _close_opened(req: AioRequest, on_ring: bool) -> None:
    """An open request its task gave up on: close what it opened, now if
    it finished, else when its completion is processed (a request that
    has not started is cancelled)."""
    close = _opened_closer(on_ring)
    if req.error == errno.EINPROGRESS and req.cancel() is CancelResult.NOTCANCELED:
        req.callback = close  # (delivered by this thread: not yet processed)
    else:
        close(req)


async def _call(io_: LoopIO, fn: Callable[..., T], *args: Any) -> T:
    req = io_.ctx.call(fn, *args)
    await io_._wait(req)
    result: Any = req.result()
    return result  # type: ignore[no-any-return]


def _opened(fd: int, path: Any) -> tuple[int, os.stat_result]:
    """The descriptor and its stat, or IsADirectoryError as open() gives."""
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _no_nul(path: T) -> T:
    """``path``, refused as os.open refuses it if it holds a NUL (a C
    string would end there: the inline open would open another file)."""
    if (b"\0" if isinstance(path, bytes) else "\0") in path:  # type: ignore[operator]
        raise ValueError("embedded null byte")
    return path


def _open_inline(path: Any, flags: int) -> tuple[int, os.stat_result] | None:
    """Open on the loop's thread if that cannot block (see
    :func:`threadlets.oneshot.open_cached`); else None.

    The descriptor lives in ``fds`` from the call that makes it on (see
    :func:`threadlets.oneshot.open_cached_into`) until it is returned, so
    that a Ctrl-C anywhere in between closes it (once: the slot is marked
    closed first)."""
    fds: list[int] = []
    try:
        if not open_cached_into(path, flags, fds):
            return None
        fd = fds[0]
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & _SETFL_FLAGS)
        fds[0] = -1  # the caller's from here (no call up to the return)
        return fd, st
    except BaseException:
        if fds and fds[0] >= 0:
            fd, fds[0] = fds[0], -1
            os.close(fd)
        raise


#: The status flags that F_SETFL sets (the rest it leaves alone).
_SETFL_FLAGS = os.O_APPEND | os.O_NONBLOCK | O_DIRECT | getattr(os, "O_NOATIME", 0)


def _clear_nonblocking(fd: int, st: os.stat_result, flags: int) -> tuple[int, os.stat_result]:
    if not flags & os.O_NONBLOCK:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & _SETFL_FLAGS)
        except BaseException:
            os.close(fd)
            raise
    return fd, st


def _open_nonblocking(path: Any, flags: int, perms: int) -> tuple[int, os.stat_result] | None:
    """Open without waiting for a FIFO's other end (then clear O_NONBLOCK);
    None where that cannot be done (a FIFO for writing with no reader)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, perms)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EAGAIN):
            return None
        raise
    return _clear_nonblocking(*_opened(fd, path), flags)


class _DetachedOpen:
    """A blocking open on a worker that its task may abandon while it runs
    (a FIFO with no reader may wait for ever).  Abandoned while it waits in
    open(2), it is given a reader (ours, opened without blocking) so the
    worker returns at once; the descriptors are then closed, the writer's
    first, so no phantom writer ever meets a later reader.  The descriptor
    it gets after being abandoned is closed at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._path: Any = None  # set once it runs (then it may block)
        self._done = False
        self._unblock = -1  # our reader of the FIFO, once abandoned
        self._fd: int | None = None

    def run(
        self, path: Any, flags: int, perms: int, opener: Callable[[str, int], int] | None
    ) -> tuple[int, os.stat_result] | None:
        with self._lock:
            if self._abandoned:
                return None
            self._path = path
        fd = -1
        abandoned = True
        try:
            got = os.open(path, flags, perms) if opener is None else opener(path, flags)
            if not isinstance(got, int):
                raise TypeError("expected integer from opener")  # (as io)
            if got < 0:
                raise ValueError(f"opener returned {got!r}")
            fd = got
        finally:
            with self._lock:
                self._done = True
                abandoned = self._abandoned
                unblock, self._unblock = self._unblock, -1
            if fd >= 0 and abandoned:
                os.close(fd)
            if unblock >= 0:
                os.close(unblock)
        if abandoned:
            return None
        fd, st = _opened(fd, path)
        with self._lock:
            if not self._abandoned:
                self._fd = fd
                return fd, st
        os.close(fd)
        return None

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            fd, self._fd = self._fd, None
            if self._path is not None and not self._done:
                self._unblock = _fifo_reader(self._path)
        if fd is not None:
            os.close(fd)


def _fifo_reader(path: Any) -> int:
    """A reader of the FIFO at ``path``, opened without blocking; -1 if it
    is not a FIFO (or cannot be opened)."""
    try:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            return -1
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1


async def _open_blocking(
    io_: LoopIO,
    path: Any,
    flags: int,
    perms: int,
    opener: Callable[[str, int], int] | None = None,
) -> tuple[int, os.stat_result]:
    detached = _DetachedOpen()
    # (Abandoned by its callback, unless the wait takes it over: a Ctrl-C
    # as the submission returns leaves it running with no caller.)
    req = io_.ctx.call(
        detached.run, path, flags, perms, opener, callback=lambda r: detached.abandon()
    )
    try:
        await io_._wait(req, detach=True)
    except BaseException:
        detached.abandon()
        raise
    got: Any = req.result()
    return got  # type: ignore[no-any-return]


def wrap(
    file: int | Any,
    mode: str | None = None,
    *,
    closefd: bool = True,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> AsyncFile:
    """An AsyncFile over an open descriptor or Python file object, from its
    current position.

    The mode defaults to the file object's, or to what the descriptor was
    opened for; a text file object's encoding and errors are the defaults of
    a text-mode result.  A file object's own buffer is flushed first.  Its
    writes are not buffered (each is one request, as with ``buffering=0``):
    the descriptor's owner may write to it too.
    Closing the AsyncFile closes the file object, or the descriptor if
    ``closefd``.  Call it inside the event loop that will use the file.
    """
    io_ = current()
    owner = None
    pos: int | None = None
    if isinstance(file, bool):
        raise TypeError("expected a file descriptor or file object, not bool")
    if isinstance(file, int):
        fd = file
        name: object = fd
    elif hasattr(file, "fileno"):
        owner = file
        fd = file.fileno()
        name = getattr(file, "name", fd)
        if mode is None and isinstance(getattr(file, "mode", None), str):
            mode = file.mode.replace("U", "")
            if "b" not in mode and not hasattr(file, "encoding"):
                mode += "b"
        if mode is not None and "b" not in mode and hasattr(file, "encoding"):
            encoding = encoding if encoding is not None else file.encoding
            errors = errors if errors is not None else getattr(file, "errors", None)
        # Where the file object stands, its own buffer counted.
        if not getattr(file, "closed", False):
            if getattr(file, "writable", lambda: False)():
                file.flush()
            try:
                pos = file.tell()
            except (OSError, ValueError):
                pos = None
    else:
        raise TypeError(f"expected a file descriptor or file object, not {type(file).__name__}")
    if mode is None:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)  # OSError(EBADF) for a bad fd
        access = fl & os.O_ACCMODE
        mode = {os.O_RDONLY: "rb", os.O_WRONLY: "wb", os.O_RDWR: "r+b"}[access]
        if fl & os.O_APPEND:
            mode = "ab" if access == os.O_WRONLY else "a+b"
    cls = AsyncBinaryFile if "b" in mode else AsyncTextFile
    cookie = None
    if pos is not None and hasattr(file, "encoding"):
        # A text file's tell() is a cookie (io's layout, as textio's): the
        # byte position is its start, then the decoder's state and the
        # characters to skip are set up as seek(cookie) would (a fresh
        # decoder there misreads: utf-16 past its BOM raised UnicodeError).
        from threadlets.textio import _parse_cookie

        cookie, pos = pos, _parse_cookie(pos)[0]
    f = cls(
        fd,
        name,
        mode,
        io_,
        encoding=encoding,
        errors=errors,
        newline=newline,
        closefd=closefd,
        owner=owner,
        pos=pos,
        coalesce=False,
    )
    if cookie is not None and f._text is not None:
        f._pos += f._text.start_at(cookie, lambda n, at: os.pread(fd, n, at))
    return f
