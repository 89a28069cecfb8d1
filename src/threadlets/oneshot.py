"""Whole-file helpers: ``read_bytes``, ``read_text``, ``write_bytes``,
``write_text``, each one request on the engine (one hop to a worker that
opens, reads or writes, and closes), with pathlib's semantics.

What each one checks that the caller can get wrong (a str for bytes, an
unknown codec, a bad ``newline``) is checked before anything is submitted;
an encoding error in ``write_text`` happens before the file is opened, so a
failed call never leaves a truncated file.  Reads first try to finish inline, on the loop's thread, doing only what
cannot block -- as io_uring does for its own opens: ``openat2`` with
``RESOLVE_CACHED`` (fails rather than wait for a path lookup) and
``O_NONBLOCK`` (a FIFO does not wait for a writer), ``fstat``, and one
``preadv2(RWF_NOWAIT)`` of the whole file (fails rather than wait for the
disk).  Anything else -- not a regular file, a short read, an error, the
context's inline path turned off -- closes what was opened and does the
whole call as one request.  Cancellation is the engine's
(:mod:`threadlets.awaitable`): cancelled while queued, nothing happened;
cancelled while running, the call is waited out -- a write has then been
done -- before the cancellation is seen.  A write to a stream (a FIFO, a
device) is the exception, as a read of one is: the worker opens it without
waiting for a reader and the task writes it as :func:`threadlets.open`'s
files are written, so a cancellation gets through even if nobody ever reads
(what was written before stays written).
"""

from __future__ import annotations

import codecs
import ctypes
import errno
import io
import itertools
import locale
import os
import select
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from threadlets.awaitable import LoopIO, current
from threadlets.probe import RWF_NOWAIT as _RWF_NOWAIT
from threadlets.probe import capabilities

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, StrOrBytesPath

__all__ = [
    "open_cached",
    "open_cached_into",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
]

_RDONLY = os.O_RDONLY | os.O_CLOEXEC
_WRONLY = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
_NEWLINES = (None, "", "\n", "\r", "\r\n")

#: Larger files are read on a worker: an inline read of them holds the loop.
INLINE_MAX = 256 * 1024


def _make_openat2() -> Callable[[bytes, int, list[int]], None] | None:
    """``openat2(AT_FDCWD, path, flags, RESOLVE_CACHED)``, its result -- a
    descriptor, or -1 -- appended to the list given (the caller adds
    O_NONBLOCK: a FIFO must not wait for its other end); None where the
    kernel or platform has no openat2 (Linux < 5.12 has no RESOLVE_CACHED:
    EINVAL, also None).

    The descriptor is stored by the call that makes it: the system call
    runs from C (map, inside the list's extend), and CPython raises a
    pending Ctrl-C only as a call made by Python code returns -- before
    the extend or after it, never between the open and the store, where it
    left the descriptor open for good."""
    if not capabilities().openat2 or not _RWF_NOWAIT:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):
        return None

    class OpenHow(ctypes.Structure):
        _fields_ = [
            ("flags", ctypes.c_uint64),
            ("mode", ctypes.c_uint64),
            ("resolve", ctypes.c_uint64),
        ]

    syscall.restype = ctypes.c_long
    syscall.argtypes = [
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    how_n = (ctypes.sizeof(OpenHow),)
    at_fdcwd = (-100,)
    sys_openat2 = (437,)  # the same number on every Linux architecture

    def openat2(path: bytes, flags: int, into: list[int]) -> None:
        how = OpenHow(flags, 0, 0x20)  # RESOLVE_CACHED; one per call: any thread
        into.extend(map(syscall, sys_openat2, at_fdcwd, (path,), (ctypes.addressof(how),), how_n))

    probe: list[int] = []
    try:
        openat2(b"/", _RDONLY, probe)
        # ENOSYS, or EINVAL for RESOLVE_CACHED (older kernels): None.
        return openat2 if probe[0] >= 0 else None
    finally:
        if probe and probe[0] >= 0:
            os.close(probe[0])


def open_cached_into(path: str | bytes, flags: int, into: list[int]) -> bool:
    """:func:`open_cached`, the descriptor appended to ``into`` by the call
    that makes it (a Ctrl-C lands before or after, never between the open
    and the store); False, and ``into`` as it was, if nothing was opened."""
    name = os.fsencode(path)
    if b"\0" in name:  # (os.open's words, which differ by type)
        if isinstance(os.fspath(path), bytes):
            raise ValueError("open: embedded null character in path")
        raise ValueError("embedded null byte")
    if _openat2 is None or flags & (os.O_CREAT | os.O_TRUNC):
        return False
    _openat2(name, flags | os.O_NONBLOCK, into)
    if into[-1] < 0:
        del into[-1]  # (no call: nothing to interrupt)
        return False
    return True


def open_cached(path: str | bytes, flags: int) -> int:
    """Open without blocking, or -1: only if every path component is in the
    kernel's cache, and never O_CREAT or O_TRUNC (they write); with
    O_NONBLOCK added (the caller clears it if it must).  Call it only from
    an event loop's thread.  A path holding a NUL is refused as os.open
    refuses it (ValueError): a C string would end there, and another file
    would be opened.  (A caller that must not leak the descriptor to a
    Ctrl-C landing as this returns uses :func:`open_cached_into`.)"""
    into: list[int] = []
    return into[0] if open_cached_into(path, flags, into) else -1


_openat2 = _make_openat2()


def _read_inline(path: str | bytes) -> bytes | _Handoff | None:
    """The whole of a cached regular file, read without blocking; or the
    descriptor opened, for a worker to go on with; or None (nothing open).

    Whatever a Ctrl-C cuts short -- here, or in the caller as this returns
    a hand-over -- nothing stays open: the descriptor lives in ``fds`` from
    the call that made it on, each close marks it closed first (a number
    is never closed twice: by then it may be another thread's new file),
    and a hand-over dropped unused closes what it holds."""
    fds: list[int] = []
    try:
        if not open_cached_into(path, _RDONLY, fds):
            return None
        fd = fds[0]
        st = os.fstat(fd)
        size = st.st_size
        if stat.S_ISDIR(st.st_mode):
            fds[0] = -1
            os.close(fd)
            return None  # the worker's open says IsADirectoryError
        if stat.S_ISREG(st.st_mode) and size <= INLINE_MAX:
            buf = bytearray(size + 1)
            try:
                got = os.preadv(fd, [buf], 0, _RWF_NOWAIT)
            except OSError:
                got = -1
            if got == size:
                fds[0] = -1
                os.close(fd)
                del buf[size:]
                return bytes(buf)
        # Not cached, large, or not a regular file: opened already (a FIFO's
        # writer may have seen us open it), so the worker reads this
        # descriptor.  (Its wake-up pipe refused -- EMFILE -- or a Ctrl-C:
        # the descriptor is closed below.)
        return _Handoff(fds, path, not stat.S_ISREG(st.st_mode))
    except BaseException:
        if fds and fds[0] >= 0:
            fd = fds[0]
            fds[0] = -1
            os.close(fd)
        raise


class _Handoff:
    """A descriptor opened on the loop for a worker to read and close.  If
    the task gives up before the worker took it, the task closes it; if
    after, and the file is a stream (a FIFO that may never be written),
    the task wakes the worker through a pipe and the worker gives up.  One
    dropped unused (a Ctrl-C as it was handed over) closes what it holds
    when it is collected."""

    __slots__ = ("_done", "_fds", "_lock", "_wake", "path", "stream")

    def __init__(self, fds: list[int], path: Any, stream: bool) -> None:
        #: [the descriptor], -1 once taken or closed (marked before the
        #: close, in plain bytecode: shared with _read_inline's clean-up).
        self._fds = fds
        #: A stream's wake-up pipe, stored by the call that makes it.
        self._wake: list[int] = []
        self._done = False  # the wake-up pipe closed
        self.path = path
        self.stream = stream  # not a regular file: may block for ever
        self._lock = threading.Lock()
        if stream:
            self._wake.extend(itertools.chain.from_iterable(map(os.pipe2, (os.O_CLOEXEC,))))

    def __del__(self) -> None:
        try:
            fd = self._fds[0]
            if fd >= 0:
                self._fds[0] = -1
                os.close(fd)
            if self._wake and not self._done:
                self._finish()
        except AttributeError:  # (a construction cut short: nothing of it)
            pass

    def _take(self) -> int:
        with self._lock:
            fd = self._fds[0]
            self._fds[0] = -1
        return fd

    def abandon(self) -> None:
        with self._lock:
            fd = self._fds[0]
            if fd >= 0:
                self._fds[0] = -1
                os.close(fd)  # (cut short after this: the pipe is __del__'s)
            if self._wake and not self._done:
                if fd >= 0:  # the worker never started: nobody else uses the pipe
                    self._finish()
                else:
                    os.write(self._wake[1], b"x")

    def _finish(self) -> None:
        """Close the pipe (the lock held, or the last reference gone)."""
        self._done = True
        r, w = self._wake
        try:
            os.close(r)
        finally:
            os.close(w)

    def read(self) -> bytes:
        """On the worker: the rest of the file, then close it."""
        fd = self._take()
        if fd < 0:
            raise OSError(errno.ECANCELED, os.strerror(errno.ECANCELED))
        try:
            if not self._wake:
                return _read_fd(fd, self.path)
            return self._read_stream(fd, self._wake[0])
        finally:
            os.close(fd)
            with self._lock:
                if self._wake and not self._done:
                    self._finish()

    def _read_stream(self, fd: int, wake: int) -> bytes:
        # Opened O_NONBLOCK: wait as a blocking open and read would (a FIFO
        # until a writer comes), but for the task's wake-up too.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake, select.POLLIN)
        parts: list[bytes] = []
        while True:
            ready = dict(poller.poll())
            if wake in ready:
                raise OSError(errno.ECANCELED, os.strerror(errno.ECANCELED))
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                return b"".join(parts)
            parts.append(data)


def _read_fd(fd: int, path: Any) -> bytes:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    regular = stat.S_ISREG(st.st_mode)
    want = st.st_size + 1 if regular else 65536
    data = os.read(fd, want)
    # A regular file read short is at its end: no read to see b"".
    if regular and len(data) < want:
        return data
    parts = [data]
    while data:
        data = os.read(fd, max(want, 65536))
        parts.append(data)
    return b"".join(parts)


def _read_all(path: Any) -> bytes:
    fd = os.open(path, _RDONLY)
    try:
        return _read_fd(fd, path)
    finally:
        os.close(fd)


async def _inline_done(io_: LoopIO) -> None:
    if next(io_.tick):
        await io_.fair_yield()


async def _submit(io_: LoopIO, fn: Any, *args: Any) -> Any:
    req = io_.ctx.call(fn, *args)
    await io_._wait(req)
    return req.result()


async def _read(io_: LoopIO, where: Any) -> bytes:
    """read_bytes after its checks: inline, or a worker's."""
    if io_.ctx.inline:
        got = _read_inline(where)
        if isinstance(got, bytes):
            await _inline_done(io_)
            return got
        if got is not None:
            try:
                # (Refused too -- the queue closed, Ctrl-C --, the
                # descriptor and the wake-up pipe are closed here.)
                req = io_.ctx.call(got.read)
                await io_._wait(req, detach=got.stream)
            except BaseException:
                got.abandon()
                raise
            result: Any = req.result()
            return result  # type: ignore[no-any-return]
    data: bytes = await _submit(io_, _read_all, where)
    return data


#: What a worker's write hands back to the task: None (written whole),
#: or (a descriptor, what to write) for a stream -- a FIFO, a device -- the
#: task writes as threadlets.open's files are written (a cancellation
#: gets through: a FIFO whose reader does not read blocked the worker for
#: good, and the task waited for it); -1 for a FIFO with no reader yet,
#: which the task opens as threadlets.open does (cancellable too).
_Rest = tuple[int, memoryview] | None


def _write_all(path: Any, view: memoryview) -> _Rest:
    try:
        # Without waiting for a FIFO's reader: ENXIO if it has none.
        fd = os.open(path, _WRONLY | os.O_NONBLOCK, 0o666)
    except BlockingIOError:
        # A file another process holds a lease on (Samba, NFS): a blocking
        # open waits for the lease to be broken, as pathlib's does.
        fd = os.open(path, _WRONLY, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO and _is_fifo(path):
            return -1, view
        raise
    try:
        os.set_blocking(fd, True)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            handed, fd = fd, -1
            return handed, view
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _is_fifo(path: Any) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


async def _write(path: Any, fn: Callable[..., _Rest], *args: Any) -> None:
    """write_bytes/write_text after their checks: one request, and for a
    stream the rest on the loop (see _Rest)."""
    io_ = current()
    await io_.checkpoint()
    handed = _Handed(fn)
    # (Abandoned by its callback, unless the wait takes it over: a Ctrl-C
    # as the submission returns leaves it running with no caller.)
    req = io_.ctx.call(handed.run, path, *args, callback=lambda r: handed.abandon())
    try:
        await io_._wait(req)
        rest: _Rest = req.result()  # type: ignore[assignment]
        if rest is not None and rest[0] >= 0:
            rest = handed.fd, rest[1]  # (taken: plain bytecodes, no call)
            handed.fd = -1
    except BaseException:
        # Cut short: a stream the worker opened -- or opens after this (a
        # Ctrl-C does not wait a running request out) -- is closed.
        handed.abandon()
        raise
    if rest is not None:
        await _write_stream(path, rest[0], rest[1])


class _Handed:
    """A write's worker call (_write_all, _write_text) whose stream -- the
    descriptor it hands back -- is the task's only while the task is there
    to take it: abandoned (the task cut short, before or after the worker
    ran), that descriptor is closed, whenever the worker opens it."""

    __slots__ = ("_abandoned", "_fn", "_lock", "fd")

    def __init__(self, fn: Callable[..., _Rest]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._abandoned = False
        #: The stream the worker opened, until the task takes it.
        self.fd = -1

    def run(self, *args: Any) -> _Rest:
        """On the worker."""
        rest = self._fn(*args)
        if rest is not None and rest[0] >= 0:
            with self._lock:
                if not self._abandoned:
                    self.fd = rest[0]
                    return rest
            os.close(rest[0])
            return None
        return rest

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            fd = self.fd
            self.fd = -1
        if fd >= 0:
            os.close(fd)


async def _write_stream(path: Any, fd: int, view: memoryview) -> None:
    from threadlets import asyncfile  # (it imports this module)

    f: asyncfile.AsyncFile
    if fd < 0:
        f = await asyncfile.open(path, "wb", buffering=0)
    else:
        try:
            f = asyncfile.wrap(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
    async with f:
        done = 0
        while done < len(view):
            done += await f.write(view[done:])


def _encoding(encoding: str | None) -> str:
    name = io.text_encoding(encoding)
    if name == "locale":
        name = locale.getencoding()
    # LookupError for an unknown codec, or one that is not a text encoding
    # (rot13, base64: io.open's words), before any I/O.
    info = codecs.lookup(name)
    if not getattr(info, "_is_text_encoding", True):
        raise LookupError(
            f"'{name}' is not a text encoding; use codecs.open() to handle arbitrary codecs"
        )
    return info.name


def _check_text_args(path: Any, encoding: object, errors: object, newline: object) -> Any:
    """io.open's checks of its arguments, in its order: the three text
    arguments' types first (as its arguments are parsed), then the path's
    (a TypeError, a NUL), then the newline's value.  Returns the path as
    os.fspath gives it."""
    for name, value in (("encoding", encoding), ("errors", errors), ("newline", newline)):
        if value is not None and not isinstance(value, str):
            raise TypeError(
                f"open() argument '{name}' must be str or None, not {type(value).__name__}"
            )
    where = os.fspath(path)
    if (b"\0" if isinstance(where, bytes) else "\0") in where:
        raise ValueError("embedded null byte")
    if newline not in _NEWLINES:
        raise ValueError(f"illegal newline value: {newline!r}")
    return where


#: Codecs whose bytes.decode is what the text layer's decoder gives: no
#: state, no byte order mark to require (utf-16 without one is an error
#: there, and bytes.decode guessed the machine's order).
_STATELESS = frozenset({"utf-8", "ascii", "latin-1", "iso8859-1"})


def _decode(data: bytes, encoding: str, errors: str | None, newline: str | None) -> str:
    """``data`` as the text layer reads it (pathlib's read_text): its
    incremental decoder, then universal newlines unless ``newline`` says
    otherwise -- a carriage return is looked for in the text, not the
    bytes (utf-7 may spell one "+AA0-")."""
    if encoding in _STATELESS:
        text = data.decode(encoding, errors or "strict")
    else:
        decoder = codecs.getincrementaldecoder(encoding)(errors or "strict")
        text = decoder.decode(data, final=True)
    if newline is None and "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _read_text(path: Any, encoding: str, errors: str | None, newline: str | None) -> str:
    return _decode(_read_all(path), encoding, errors, newline)


def _write_text(
    path: Any, text: str, encoding: str, errors: str | None, newline: str | None
) -> _Rest:
    if newline in (None, "", "\n") or "\n" not in text:
        data = text.encode(encoding, errors or "strict")
    else:
        buf = io.BytesIO()
        f = io.TextIOWrapper(buf, encoding, errors, newline, write_through=True)
        f.write(text)
        f.flush()
        data = buf.getvalue()
    return _write_all(path, memoryview(data))


async def read_bytes(path: StrOrBytesPath) -> bytes:
    """The whole file's contents (pathlib's ``read_bytes``), in one request
    (or none, if it is cached)."""
    io_ = current()
    await io_.checkpoint()
    return await _read(io_, os.fspath(path))


async def read_text(
    path: StrOrBytesPath,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> str:
    """The whole file decoded (pathlib's ``read_text``; universal newlines
    unless ``newline`` says otherwise), in one request."""
    where = _check_text_args(path, encoding, errors, newline)
    codec = _encoding(encoding)
    io_ = current()
    await io_.checkpoint()
    if io_.ctx.inline:
        data = await _read(io_, where)
        if len(data) <= INLINE_MAX:
            return _decode(data, codec, errors, newline)
        result: str = await _submit(io_, _decode, data, codec, errors, newline)
        return result
    result = await _submit(io_, _read_text, where, codec, errors, newline)
    return result


async def write_bytes(path: StrOrBytesPath, data: ReadableBuffer) -> int:
    """Create or truncate the file and write ``data`` (pathlib's
    ``write_bytes``), in one request; returns the count written."""
    view = memoryview(data)  # TypeError for a str, before any I/O
    if not view.c_contiguous:  # (BufferError, as a file's write() raises it)
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    view = view.cast("B")
    await _write(os.fspath(path), _write_all, view)
    return len(view)


async def write_text(
    path: StrOrBytesPath,
    data: str,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> int:
    """Create or truncate the file and write ``data`` encoded (pathlib's
    ``write_text``), in one request; returns the count of characters."""
    if not isinstance(data, str):
        raise TypeError(f"data must be str, not {type(data).__name__}")
    where = _check_text_args(path, encoding, errors, newline)
    await _write(where, _write_text, data, _encoding(encoding), errors, newline)
    return len(data)
