"""Async file objects: ``threadlets.open`` and ``threadlets.wrap``.

This module owns :class:`AsyncFile`, the file object most users touch, and
:func:`open`/:func:`wrap` that make one.  It has two faces:

* Positional I/O with no shared file position -- ``pread``, ``preadinto``,
  ``pwrite``, ``preadv``, ``pwritev`` -- each one engine request, safe to
  run from many tasks at once.
* The aiofiles-shaped stream -- ``read``, ``readinto``, ``readline``, async
  iteration over lines, ``write``, ``seek``, ``tell``, ``flush``,
  ``close`` -- with a read buffer, so lines are cut from 64 KiB chunks
  instead of costing a request each.  Stream calls on one file must not
  overlap (as with any file object): await one before the next.

Plus ``fsync``, ``fdatasync``, ``discard``, ``write_zeroes``, ``allocate``,
``truncate`` and ``stat``.  Every call is an engine request awaited through
:mod:`threadlets.awaitable`, with its cancellation guarantee: a cancelled
call either never happened or finished before the cancellation is seen.

A file belongs to the event loop it was opened in.  Closing it waits for
its outstanding requests, then closes the descriptor.
"""

from __future__ import annotations

import codecs
import fcntl
import io
import os
from collections.abc import AsyncIterator, Generator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from threadlets.awaitable import YIELD_EVERY, LoopIO, current
from threadlets.engine import AioRequest, _InlineDone, _nonnegative
from threadlets.probe import O_DIRECT

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, StrPath, WriteableBuffer

__all__ = ["AsyncFile", "open", "wrap"]

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


def _check_text_args(
    text: bool, encoding: str | None, errors: str | None, newline: str | None
) -> None:
    if not text:
        if encoding is not None or errors is not None or newline is not None:
            raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
        return
    codecs.lookup(encoding or "utf-8")  # LookupError for an unknown codec
    if newline not in (None, "", "\n", "\r\n"):
        raise ValueError(f"illegal newline value: {newline!r}")


class AsyncFile:
    """An open file whose every I/O call is awaited.  Made by :func:`open`
    or :func:`wrap`; use ``async with`` or ``await f.close()``."""

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
    ) -> None:
        _, text, readable, writable = _flags_for(mode)
        self._fd = fd
        self.name = name
        self.mode = mode
        self._io = io_
        self._ctx = io_.ctx
        self._readable = readable
        self._writable = writable
        self._append = "a" in mode
        self._closefd = closefd
        self._owner = owner  # a wrapped Python file object, kept alive
        self._closed = False
        self._trio = io_.kind == "trio"
        #: True once closed, and always on trio: the fast paths check only this.
        self._slow_path = self._trio
        #: The engine's inline read of this fd (None: reads always queue).
        self._read_inline = io_.ctx.inline_reader(fd)
        self._scratch = bytearray()  # pread's buffer on the inline path
        self._outstanding: set[AioRequest] = set()
        self._pos = 0
        self._rbuf = b""  # read-ahead: bytes of the file from _rbuf_off
        self._rbuf_off = 0
        self._text = text
        _check_text_args(text, encoding, errors, newline)
        if text:
            self.encoding = encoding or "utf-8"
            self.errors = errors or "strict"
            self.newline = newline

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<threadlets.AsyncFile {self.name!r} mode={self.mode!r} {state}>"

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

    async def _run(self, req: AioRequest) -> Any:
        """Await one request; what every call comes down to."""
        if type(req) is _InlineDone:
            io_ = self._io
            io_.inline_run += 1
            if io_.inline_run >= YIELD_EVERY:
                await io_.fair_yield()
            return req._result
        outstanding = self._outstanding
        outstanding.add(req)
        try:
            await self._io.wait(req)
        finally:
            outstanding.discard(req)
        return req.result()

    async def preadinto(self, buf: WriteableBuffer, offset: int) -> int:
        """Read into ``buf`` from ``offset``; returns the count (short at EOF)."""
        if self._closed:
            raise ValueError("I/O operation on closed file")
        if self._trio:
            await self._io.checkpoint()
        result: int = await self._run(self._ctx.read(self._fd, offset, buf))
        return result

    async def pread(self, n: int, offset: int) -> bytes:
        """Read up to ``n`` bytes at ``offset``."""
        if self._slow_path:  # closed, or trio (which wants a checkpoint)
            self._check_open()
            await self._io.checkpoint()
        # The cached-data fast path, spelled out: no request object at all.
        # The read goes into the file's scratch buffer and is copied out
        # before anything else can run, so concurrent preads may share it.
        read_inline = self._read_inline
        if read_inline is not None and type(n) is int and 0 < n <= CHUNK:
            buf = self._scratch
            if len(buf) != n:
                buf = self._scratch = bytearray(n)
            got = read_inline(buf, offset)
            if got >= 0:
                data = bytes(buf) if got == n else bytes(buf[:got])  # before any await
                io_ = self._io
                io_.inline_run += 1
                if io_.inline_run >= YIELD_EVERY:
                    await io_.fair_yield()
                return data
        buf = bytearray(_nonnegative(n, "count"))
        got = await self._run(self._ctx.read(self._fd, offset, buf))
        return bytes(buf) if got == n else bytes(memoryview(buf)[:got])

    async def preadv(self, buffers: Sequence[WriteableBuffer], offset: int) -> int:
        """Read into several buffers, in order, from ``offset``."""
        self._check_open()
        await self._io.checkpoint()
        result: int = await self._run(self._ctx.read(self._fd, offset, list(buffers)))
        return result

    async def pwrite(self, data: ReadableBuffer, offset: int) -> int:
        """Write ``data`` at ``offset``; returns the count written."""
        self._check_open()
        await self._io.checkpoint()
        result: int = await self._run(self._ctx.write(self._fd, offset, data))
        return result

    async def pwritev(self, buffers: Sequence[ReadableBuffer], offset: int) -> int:
        """Write several buffers, in order, at ``offset``."""
        self._check_open()
        await self._io.checkpoint()
        result: int = await self._run(self._ctx.write(self._fd, offset, list(buffers)))
        return result

    # -- the rest of the engine ------------------------------------------------------------------

    async def _op(self, req: AioRequest) -> Any:
        await self._io.checkpoint()
        return await self._run(req)

    async def fsync(self) -> None:
        self._check_open()
        await self._op(self._ctx.flush(self._fd, datasync=False))

    async def fdatasync(self) -> None:
        self._check_open()
        await self._op(self._ctx.flush(self._fd, datasync=True))

    async def discard(self, offset: int, length: int) -> None:
        """Punch a hole: the range reads as zeros; the size is kept."""
        self._check_open()
        self._drop_read_ahead()
        await self._op(self._ctx.discard(self._fd, offset, length))

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check_open()
        self._drop_read_ahead()
        await self._op(self._ctx.write_zeroes(self._fd, offset, length))

    async def allocate(self, offset: int, length: int) -> None:
        self._check_open()
        await self._op(self._ctx.allocate(self._fd, offset, length))

    async def truncate(self, size: int | None = None) -> int:
        """Set the size (default: the current position); returns it."""
        self._check_open()
        if size is None:
            size = self._pos
        self._drop_read_ahead()
        await self._op(self._ctx.truncate(self._fd, size))
        return size

    async def stat(self) -> os.stat_result:
        self._check_open()
        result: os.stat_result = await self._op(self._ctx.call(os.fstat, self._fd))
        return result

    # -- the stream (aiofiles-shaped) ---------------------------------------------------------

    def _drop_read_ahead(self) -> None:
        self._rbuf = b""

    async def _fill(self, want: int) -> bool:
        """Read ahead from the end of the buffer; False at end of file."""
        end = self._rbuf_off + len(self._rbuf)
        if not (self._rbuf_off <= self._pos <= end):
            self._rbuf, self._rbuf_off, end = b"", self._pos, self._pos
        chunk = await self.pread(max(CHUNK, want), end)
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

    async def _read_bytes(self, n: int = -1) -> bytes:
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
        if n is None or n < 0:
            parts = [bytes(self._buffered())]
            self._pos += len(parts[0])
            self._drop_read_ahead()
            size = CHUNK
            while True:
                chunk = await self.pread(size, self._pos)
                size = min(size * 2, 1 << 20)  # grow for large files
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
                self._pos += len(chunk)
        have = self._buffered()
        if len(have) < n:
            if n - len(have) >= CHUNK:  # large: read it directly
                rest = await self.pread(n - len(have), self._pos + len(have))
                out = bytes(have) + rest
                self._pos += len(out)
                self._drop_read_ahead()
                return out
            await self._fill(n)
            have = self._buffered()
        out = bytes(have[:n])
        self._pos += len(out)
        return out

    async def _readline_bytes(self, limit: int = -1) -> bytes:
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
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
            if not await self._fill(len(have) + CHUNK):
                out = bytes(self._buffered())
                self._pos += len(out)
                return out

    def _find_nl(self) -> int:
        start = self._pos - self._rbuf_off
        i = self._rbuf.find(b"\n", start)
        return i - start if i >= 0 else -1

    async def read(self, n: int = -1) -> Any:
        """Read up to ``n`` bytes (text mode: characters), or to the end."""
        self._check_open()
        if not self._text:
            return await self._read_bytes(n)
        if n is None or n < 0:
            return self._translate((await self._read_bytes(-1)).decode(self.encoding, self.errors))
        # Text: decode what the read-ahead holds (at least n characters'
        # worth, or to the end), keep n characters, and advance the byte
        # position by what they encode to.
        while True:
            have = bytes(self._buffered())
            text = have.decode(self.encoding, "ignore" if len(have) > 4 * n else self.errors)
            if len(text) > n or not await self._fill(len(have) + 4 * n):
                break
        text = have.decode(self.encoding, self.errors) if len(have) <= 4 * n else text
        out = text[:n]
        self._pos += len(out.encode(self.encoding, self.errors))
        return self._translate(out)

    def _translate(self, text: str) -> str:
        if self.newline is None and "\r" in text:
            return text.replace("\r\n", "\n").replace("\r", "\n")
        return text

    async def readinto(self, buf: WriteableBuffer) -> int:
        """Read into ``buf`` at the current position (binary mode)."""
        self._check_open()
        if self._text:
            raise io.UnsupportedOperation("readinto() needs binary mode")
        view = memoryview(buf).cast("B")
        data = await self._read_bytes(len(view))
        view[: len(data)] = data
        return len(data)

    async def readline(self, size: int = -1) -> Any:
        """One line, with its newline; b"" / "" at end of file."""
        self._check_open()
        line = await self._readline_bytes(size)
        if self._text:
            return self._translate(line.decode(self.encoding, self.errors))
        return line

    async def readlines(self) -> list[Any]:
        return [line async for line in self]

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line

    async def write(self, data: Any) -> int:
        """Write at the current position (at the end in append mode);
        returns the count of bytes (text mode: characters) written."""
        self._check_open()
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        if self._text:
            if not isinstance(data, str):
                raise TypeError(f"write() argument must be str, not {type(data).__name__}")
            payload = data.encode(self.encoding, self.errors)
            if self.newline not in (None, "", "\n"):
                payload = data.replace("\n", self.newline).encode(self.encoding, self.errors)
        else:
            if isinstance(data, str):
                raise TypeError("a bytes-like object is required, not 'str'")
            payload = data
        self._drop_read_ahead()
        n = await self.pwrite(payload, self._pos)
        if self._append:
            self._pos = (await self.stat()).st_size
        else:
            self._pos += n
        return len(data) if self._text else n

    async def writelines(self, lines: Sequence[Any]) -> None:
        for line in lines:
            await self.write(line)

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position; returns the new one."""
        self._check_open()
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int, not {type(offset).__name__}")
        if whence == os.SEEK_SET:
            new = offset
        elif whence == os.SEEK_CUR:
            new = self._pos + offset
        elif whence == os.SEEK_END:
            new = (await self.stat()).st_size + offset
        else:
            raise ValueError(f"invalid whence ({whence!r}, should be 0, 1 or 2)")
        if new < 0:
            raise OSError(22, f"negative seek position {new}")
        self._pos = new
        return new

    async def tell(self) -> int:
        """The position (in text mode: a byte offset, as a cookie for seek)."""
        self._check_open()
        return self._pos

    async def flush(self) -> None:
        """Writes are not buffered here: nothing to do (see fsync)."""
        self._check_open()

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    # -- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Wait for this file's outstanding requests, then close it."""
        if self._closed:
            return
        self._closed = True
        self._slow_path = True
        for req in list(self._outstanding):
            # Another task awaits it; wait for it on a worker, not the loop.
            await self._run(self._ctx.call(req.wait))
        self._ctx.forget(self._fd)
        if self._owner is not None:
            self._owner.close()
        elif self._closefd:
            os.close(self._fd)

    async def __aenter__(self) -> AsyncFile:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Opener:
    """What :func:`open` returns: awaitable, and an async context manager."""

    __slots__ = ("_args", "_file")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self._args = args
        self._file: AsyncFile | None = None

    def __await__(self) -> Generator[Any, None, AsyncFile]:
        return _open(*self._args).__await__()

    async def __aenter__(self) -> AsyncFile:
        self._file = await _open(*self._args)
        return self._file

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._file is not None
        await self._file.close()


def open(
    path: StrPath | bytes,
    mode: str = "rb",
    *,
    direct: bool = False,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    perms: int = 0o666,
) -> _Opener:
    """Open a file for async I/O: ``async with threadlets.open(p) as f`` or
    ``f = await threadlets.open(p)``.

    ``mode`` is Python's ("r", "w", "a", "x", with "+", "b" or "t"; binary
    by default).  ``direct=True`` opens with O_DIRECT (any buffer works:
    misaligned ones go through a bounce buffer).  The open runs on a worker;
    a cancelled open closes the descriptor it got.
    """
    flags, text, _, _ = _flags_for(mode)
    _check_text_args(text, encoding, errors, newline)
    if direct:
        if not O_DIRECT:
            raise OSError(95, "O_DIRECT is not supported on this platform")
        flags |= O_DIRECT
    return _Opener((path, mode, flags, perms, encoding, errors, newline))


async def _open(
    path: Any,
    mode: str,
    flags: int,
    perms: int,
    encoding: str | None,
    errors: str | None,
    newline: str | None,
) -> AsyncFile:
    io_ = current()
    await io_.checkpoint()
    req = io_.ctx.call(os.open, os.fspath(path), flags, perms)
    try:
        await io_.wait(req)
    except BaseException:
        # Cancelled: if the open ran anyway, its descriptor is ours to close.
        if req.error == 0:
            os.close(req.result())
        raise
    fd: int = req.result()
    try:
        return AsyncFile(fd, path, mode, io_, encoding=encoding, errors=errors, newline=newline)
    except BaseException:
        os.close(fd)
        raise


def wrap(
    file: int | Any,
    mode: str | None = None,
    *,
    closefd: bool = True,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> AsyncFile:
    """An AsyncFile over an open descriptor or Python file object.

    The mode defaults to the file object's, or to what the descriptor was
    opened for.  Closing the AsyncFile closes the file object, or the
    descriptor if ``closefd``.  Call it inside the event loop that will use
    the file.
    """
    owner = None
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
    else:
        raise TypeError(f"expected a file descriptor or file object, not {type(file).__name__}")
    if mode is None:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)  # OSError(EBADF) for a bad fd
        access = fl & os.O_ACCMODE
        mode = {os.O_RDONLY: "rb", os.O_WRONLY: "wb", os.O_RDWR: "r+b"}[access]
        if fl & os.O_APPEND:
            mode = "ab" if access == os.O_WRONLY else "a+b"
    return AsyncFile(
        fd,
        name,
        mode,
        current(),
        encoding=encoding,
        errors=errors,
        newline=newline,
        closefd=closefd,
        owner=owner,
    )
