"""Text mode for async files: Python's ``TextIOWrapper`` over an awaited binary stream.

This module owns :class:`AsyncTextWrapper`, which turns an
:class:`AsyncBinaryBuffer` (what :class:`threadlets.AsyncFile`'s binary
stream provides) into a text stream whose every call gives the same result,
raises the same exception type and leaves the same bytes as ``io.open``
with the same arguments would, for any sequence of calls.  It uses the
standard library's own machinery: the codec's incremental decoder and
encoder, and ``io.IncrementalNewlineDecoder`` for universal newlines.  It
knows nothing of event loops: it only awaits the buffer's methods.

The control flow, the ``tell()`` cookie (its bit layout included) and the
points where state is reset are those of CPython's C ``_io.TextIOWrapper``
(Modules/_io/textio.c), which ``io.open`` returns; where that differs from
the pure-Python ``_pyio.TextIOWrapper`` (the cookie layout, ``truncate()``
with no argument truncating at the buffer's position, the decoder reset
rule, ``readline`` fetching a chunk when nothing is decoded, ``read()``
keeping decoded text when the final decode fails), the C behaviour wins.
Ported from Lib/_pyio.py and Modules/_io/textio.c of CPython 3.11:
Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved;
used under the PSF License Agreement, version 2.

Invariants:

* ``_decoded_chars[_decoded_chars_used:]`` is text decoded from the buffer
  but not yet returned; the buffer's position is past all of it.
* ``_snapshot`` is ``None`` or ``(dec_flags, next_input)``: the decoder had
  nothing buffered and flags ``dec_flags`` ``len(next_input)`` bytes before
  the buffer's position, and ``next_input`` are the bytes fed since then.
  ``tell()`` replays them to find a cookie.  io takes no snapshot while it
  iterates (``tell()`` is refused then), so after an iteration left early
  and a ``flush()`` its ``tell()`` decodes a stale snapshot and answers an
  error or garbage (C reads past the end of a bytes object); this wrapper
  always takes one, and caps its guess at the snapshot's end, so it
  answers the right cookie there.  Those are its only departures from io,
  both where io's answer is undefined.
* Writes go through to the buffer at once (as ``_pyio`` does); nothing is
  held here, so closing the buffer loses nothing.
* ``io.TextIOWrapper`` asks the buffer for its position when it is made,
  to write no BOM in the middle of a file.  The constructor here cannot
  await, so ``_bom_check`` stays set until the first call, which asks
  before it moves the buffer.

Calls on one wrapper must not overlap: await one before starting the next.
"""

from __future__ import annotations

import codecs
import io
import locale
import operator
import os
import sys
from _multibytecodec import MultibyteIncrementalDecoder as _MultibyteIncrementalDecoder
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

__all__ = ["AsyncBinaryBuffer", "AsyncTextWrapper"]

T = TypeVar("T")

_SSIZE_MAX = sys.maxsize
_NEWLINES = (None, "", "\n", "\r", "\r\n")


_UNSET: Any = object()  # reconfigure()'s newline not given (None is a value)


def _text_codec(encoding: str) -> codecs.CodecInfo:
    info = codecs.lookup(encoding)
    if not getattr(info, "_is_text_encoding", True):
        raise LookupError(
            f"'{encoding}' is not a text encoding; use codecs.open() to handle arbitrary codecs"
        )
    return info


class AsyncBinaryBuffer(Protocol):
    """What a binary stream must provide for :class:`AsyncTextWrapper`."""

    async def read1(self, size: int = -1) -> bytes:
        """At most ``size`` bytes in one request; ``b""`` only at end of file."""
        ...

    async def read(self, size: int = -1) -> bytes: ...

    async def write(self, data: bytes) -> int: ...

    async def seek(self, pos: int, whence: int = 0) -> int: ...

    async def tell(self) -> int: ...

    async def flush(self) -> None: ...

    async def truncate(self, pos: int | None = None) -> int: ...

    def readable(self) -> bool: ...

    def writable(self) -> bool: ...

    def seekable(self) -> bool: ...


class _Decoder(Protocol):
    def decode(self, input: bytes, final: bool = False) -> str: ...

    def getstate(self) -> tuple[bytes, int]: ...

    def setstate(self, state: tuple[bytes, int]) -> None: ...

    def reset(self) -> None: ...


class _Iso2022Guard:
    """An ISO-2022 decoder (CPython's CJK codecs) that does not crash.

    Their state (``getstate()[1]``) is the bytes of C's ``state.c``, little-
    endian: ``c[0]``..``c[3]`` the character sets designated to G0..G3
    (0x80: double-byte), ``c[4]`` the flags (1: shifted to G1, 2: "ESC
    throughout").  A new one has G0..G2 ASCII (0x424242); ``reset()``
    designates ASCII to G0 and unshifts.  io's TextIOWrapper sets state
    ``(b"", 0)`` (no character set at all) where it seeks to a plain
    position (as after a write), and CPython's decoder crashes the
    interpreter (a NULL call) when it then meets a graphic byte
    (0x20-0x7f) with no character set designated to the shift it is in.
    This one takes every state io gives its decoder, so that its states and
    ``tell()`` cookies are io's; only where io's decoder would crash, it
    designates ASCII to the empty G0/G1 first and goes on (io defines no
    answer there)."""

    __slots__ = ("_decoder",)

    def __init__(self, decoder: _Decoder) -> None:
        self._decoder = decoder

    def getstate(self) -> tuple[bytes, int]:
        return self._decoder.getstate()

    def setstate(self, state: tuple[bytes, int]) -> None:
        self._decoder.setstate(state)

    def reset(self) -> None:
        self._decoder.reset()

    def decode(self, input: bytes, final: bool = False) -> str:
        decoder = self._decoder
        flags = decoder.getstate()[1]
        if flags & 0xFF and (flags & 0xFF00 or (not flags & 1 << 32 and 0x0E not in input)):
            return decoder.decode(input, final)  # (G0 set; G1 set or never shifted to)
        # Byte by byte, looking at the state before each graphic byte.
        data = bytes(input)
        out = []
        last = len(data) - 1
        for i, byte in enumerate(data):
            if 0x20 <= byte < 0x80:
                pending, flags = decoder.getstate()
                shift = 8 if flags & 1 << 32 else 0
                if not pending and not flags & 2 << 32 and not flags >> shift & 0xFF:
                    decoder.setstate(
                        (
                            b"",
                            flags
                            | (0x42 if not flags & 0xFF else 0)
                            | (0x4200 if not flags & 0xFF00 else 0),
                        )
                    )
            out.append(decoder.decode(data[i : i + 1], final and i == last))
        if not data:
            out.append(decoder.decode(b"", final))
        return "".join(out)


def _optional_size(size: object) -> int:
    """An ``int | None`` size argument as ``io`` parses it (None means -1)."""
    if size is None:
        return -1
    if not hasattr(type(size), "__index__"):
        raise TypeError(f"argument should be integer or None, not '{type(size).__name__}'")
    n = operator.index(size)  # type: ignore[arg-type]
    if not -_SSIZE_MAX - 1 <= n <= _SSIZE_MAX:
        raise OverflowError(f"cannot fit '{type(size).__name__}' into an index-sized integer")
    return n


def _size(size: object) -> int:
    """An ``int`` size argument (None refused) as ``io`` parses it."""
    n = operator.index(size)  # type: ignore[arg-type]
    if not -_SSIZE_MAX - 1 <= n <= _SSIZE_MAX:
        raise OverflowError("Python int too large to convert to C ssize_t")
    return n


def _c_int(value: object) -> int:
    n = operator.index(value)  # type: ignore[arg-type]
    if not -(2**31) <= n < 2**31:
        raise OverflowError("Python int too large to convert to C int")
    return n


def _dec_flags(flags: int) -> int:
    """A decoder's flags as tell() reads them: a C int (PyArg_ParseTuple's
    "i"; an ISO-2022 state in "ESC throughout" mode is wider)."""
    if flags > 0x7FFFFFFF:
        raise OverflowError("signed integer is greater than maximum")
    if flags < -(2**31):
        raise OverflowError("signed integer is less than minimum")
    return flags


def _optional_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"TextIOWrapper() argument '{name}' must be str or None, not {type(value).__name__}"
        )
    if "\0" in value:
        raise ValueError("embedded null character")
    return value


# The cookie is C's struct {off_t start_pos; int dec_flags; int bytes_to_feed;
# int chars_to_skip; char need_eof;} read as one little-endian unsigned integer.
def _build_cookie(
    start_pos: int,
    dec_flags: int = 0,
    bytes_to_feed: int = 0,
    chars_to_skip: int = 0,
    need_eof: bool = False,
) -> int:
    return (
        (start_pos & (2**64 - 1))
        | (dec_flags & 0xFFFFFFFF) << 64
        | (bytes_to_feed & 0xFFFFFFFF) << 96
        | (chars_to_skip & 0xFFFFFFFF) << 128
        | int(need_eof) << 160
    )


def _parse_cookie(cookie: int) -> tuple[int, int, int, int, bool]:
    raw = cookie.to_bytes(21, "little")  # OverflowError: int too big to convert

    def field(start: int, stop: int) -> int:
        return int.from_bytes(raw[start:stop], "little", signed=True)

    return field(0, 8), field(8, 12), field(12, 16), field(16, 20), raw[20] != 0


class AsyncTextWrapper:
    """A text stream over an :class:`AsyncBinaryBuffer`, with ``io.open``'s
    text-mode semantics; the arguments are those of ``io.TextIOWrapper``.
    ``write_through`` is accepted and has no effect: writes always go
    through to the buffer."""

    _CHUNK_SIZE = 8192

    def __init__(
        self,
        buffer: AsyncBinaryBuffer,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        line_buffering: bool = False,
        write_through: bool = False,
    ) -> None:
        # The checks and their order are io.TextIOWrapper's.
        encoding = _optional_str("encoding", encoding)
        newline = _optional_str("newline", newline)
        line_buffering = bool(_c_int(line_buffering))
        write_through = bool(_c_int(write_through))
        if errors is None:
            errors = "strict"
        elif not isinstance(errors, str):
            raise TypeError(
                f"TextIOWrapper() argument 'errors' must be str or None, "
                f"not {type(errors).__name__}"
            )
        if newline not in _NEWLINES:
            raise ValueError(f"illegal newline value: {newline}")
        if encoding is None and sys.flags.utf8_mode:
            encoding = "utf-8"
        elif encoding is None or encoding == "locale":
            encoding = locale.getencoding()
        info = _text_codec(encoding)

        self._buffer = buffer
        self._line_buffering = line_buffering
        self._write_through = write_through
        self._set_newline(newline)
        self._set_codec(encoding, errors, info)

        self._decoded_chars = ""
        self._has_decoded = False
        self._decoded_chars_used = 0
        self._snapshot: tuple[int, bytes] | None = None
        self._b2cratio = 0.0
        self._seekable = self._telling = buffer.seekable()
        self._bom_check = self._seekable and self._encoder is not None
        #: During a read call: (snapshot, bytes, text) of each chunk it
        #: decoded, so a cancelled call can give back what it took.
        self._fed: list[tuple[tuple[int, bytes], bytes, str]] | None = None
        #: The file changed under the decoded text (see invalidate).
        self._stale = False

    def _set_newline(self, newline: str | None) -> None:
        self._readuniversal = not newline
        self._readtranslate = newline is None
        self._readnl = newline
        self._writetranslate = newline != ""
        writenl = newline or os.linesep
        self._writenl = None if writenl == "\n" else writenl

    def _set_codec(self, encoding: str, errors: str, info: codecs.CodecInfo) -> None:
        """A new decoder and encoder (the newline settings made already)."""
        self._encoding = encoding
        self._errors = errors
        self._decoder: _Decoder | None = None
        if self._buffer.readable():
            decoder: _Decoder = info.incrementaldecoder(errors)
            if isinstance(decoder, _MultibyteIncrementalDecoder) and decoder.getstate()[1]:
                decoder = _Iso2022Guard(decoder)
            if self._readuniversal:
                decoder = io.IncrementalNewlineDecoder(decoder, self._readtranslate)  # type: ignore[arg-type]
            self._decoder = decoder
        self._encoder: codecs.IncrementalEncoder | None = None
        if self._buffer.writable():
            self._encoder = info.incrementalencoder(errors)
        # io encodes UTF-16/32 itself and leaves the start of the stream (where
        # a BOM is written) after any write, even one that failed to encode.
        self._bom_once = info.name in ("utf-16", "utf-32")

    async def _reconfigure(
        self,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: Any = _UNSET,
        line_buffering: bool | None = None,
        write_through: bool | None = None,
    ) -> None:
        """Change the encoding, errors, newline, line_buffering or
        write_through, as ``io.TextIOWrapper.reconfigure`` (what is not
        given stays; a new ``encoding`` without ``errors`` is strict).  The
        encoding and newline cannot change once text was read ahead."""
        # The checks and their order are C's _io_TextIOWrapper_reconfigure_impl.
        if self._has_decoded and (
            encoding is not None or errors is not None or newline is not _UNSET
        ):
            raise io.UnsupportedOperation(
                "It is not possible to set the encoding or newline of stream after the first read"
            )
        if newline is not _UNSET and newline is not None:
            if not isinstance(newline, str):
                raise TypeError(
                    f"reconfigure() argument 'newline' must be str or None, "
                    f"not {type(newline).__name__}"
                )
            if newline not in _NEWLINES:
                raise ValueError(f"illegal newline value: {newline}")
        lb = self._line_buffering if line_buffering is None else bool(line_buffering)
        wt = self._write_through if write_through is None else bool(write_through)
        await self.flush()
        recode = encoding is not None or errors is not None or newline is not _UNSET
        # (Asked before anything changes: a cancellation here changes nothing.)
        fix_encoder = recode and self._seekable and self._buffer.writable()
        at_start = fix_encoder and await self._buffer.tell() == 0
        self._b2cratio = 0.0
        if newline is not _UNSET:
            self._set_newline(newline)
        if recode:
            if encoding is None:
                encoding = self._encoding
                if errors is None:
                    errors = self._errors
            else:
                if not isinstance(encoding, str):
                    raise TypeError(
                        f"reconfigure() argument 'encoding' must be str or None, "
                        f"not {type(encoding).__name__}"
                    )
                if encoding == "locale":
                    encoding = locale.getencoding()
                if errors is None:
                    errors = "strict"
            if not isinstance(errors, str):
                raise TypeError(
                    f"reconfigure() argument 'errors' must be str or None, "
                    f"not {type(errors).__name__}"
                )
            self._set_codec(encoding, errors, _text_codec(encoding))
            # (io's _textiowrapper_fix_encoder_state: no BOM past the start.)
            if fix_encoder and self._encoder is not None:
                self._bom_check = False
                if not at_start:
                    self._encoder.setstate(0)
        self._line_buffering, self._write_through = lb, wt

    # -- attributes -----------------------------------------------------------------------

    @property
    def buffer(self) -> AsyncBinaryBuffer:
        return self._buffer

    @property
    def encoding(self) -> str:
        return self._encoding

    @property
    def errors(self) -> str:
        return self._errors

    @property
    def line_buffering(self) -> bool:
        return self._line_buffering

    @property
    def write_through(self) -> bool:
        return self._write_through

    @property
    def newlines(self) -> str | tuple[str, ...] | None:
        newlines: str | tuple[str, ...] | None = getattr(self._decoder, "newlines", None)
        return newlines

    def readable(self) -> bool:
        return self._buffer.readable()

    def writable(self) -> bool:
        return self._buffer.writable()

    def seekable(self) -> bool:
        return self._buffer.seekable()

    def __repr__(self) -> str:
        return f"<threadlets.AsyncTextWrapper encoding={self._encoding!r}>"

    # -- plumbing -------------------------------------------------------------------------

    async def _check_bom(self) -> None:
        """Do what io.TextIOWrapper's constructor does: no BOM unless the
        buffer was at position 0.  Must run before the buffer moves."""
        if self._bom_check:
            at_start = await self._buffer.tell() == 0
            self._bom_check = False
            if not at_start and self._encoder is not None:
                self._encoder.setstate(0)

    def _set_decoded_chars(self, chars: str | None) -> None:
        """None: C's NULL (nothing decoded ahead: reconfigure() may change
        the encoding); "" is decoded text, if empty (it may not)."""
        self._decoded_chars = chars or ""
        self._has_decoded = chars is not None
        self._decoded_chars_used = 0

    def _get_decoded_chars(self, n: int = -1) -> str:
        offset = self._decoded_chars_used
        avail = len(self._decoded_chars) - offset
        if n < 0 or n > avail:
            n = avail
        self._decoded_chars_used += n
        return self._decoded_chars[offset : offset + n]

    def _decoder_setstate(self, decoder: _Decoder, start_pos: int, dec_flags: int) -> None:
        # At the start of the stream reset() rather than setstate(): a few
        # decoders (utf-16) do not start in state (b"", 0).  (Nor do the
        # ISO-2022 ones, which state 0 leaves with no character set: see
        # _Iso2022Guard.)
        if dec_flags == 0 and start_pos == 0:
            decoder.reset()
        else:
            decoder.setstate((b"", dec_flags))

    def _encoder_reset(self, start_of_stream: bool) -> None:
        if self._encoder is not None:
            if start_of_stream:
                self._encoder.reset()
            else:
                self._encoder.setstate(0)

    async def _read_chunk(self, size_hint: int) -> bool:
        """Read and decode the next chunk into ``_decoded_chars`` (replacing
        it); False at end of file."""
        decoder = self._decoder
        if decoder is None:
            raise io.UnsupportedOperation("not readable")
        # A snapshot point: len(dec_buffer) bytes back, nothing was buffered.
        dec_buffer, dec_flags = decoder.getstate()
        if size_hint > 0:
            size_hint = int(max(self._b2cratio, 1.0) * size_hint)
        chunk = await self._buffer.read1(max(self._CHUNK_SIZE, size_hint))
        eof = not chunk
        decoded = decoder.decode(chunk, eof)
        self._set_decoded_chars(decoded)
        self._b2cratio = len(chunk) / len(decoded) if decoded else 0.0
        if decoded:
            eof = False
        self._snapshot = (dec_flags, dec_buffer + chunk)
        if self._fed is not None:
            self._fed.append((self._snapshot, chunk, decoded))
        return not eof

    async def _consuming(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a read call so that, if it is cancelled (a BaseException that
        is not an Exception), it consumes nothing: over a buffer that can go
        back (``mark``/``rewind``: a file), everything is as before it;
        else (a pipe) the text it took and the text it decoded since go back
        into ``_decoded_chars``, with a snapshot that covers them, so
        ``tell()`` is where it was."""
        if self._fed is not None:  # (nested: the outer call undoes)
            return await fn(*args)
        if self._stale:
            await self._resync()
        saved = self._decoded_chars, self._decoded_chars_used, self._snapshot, self._telling
        # Where the buffer can go back (a file, not a pipe), the call is
        # undone whole: the buffer's position, the decoder's state and the
        # decoded text are as before it, as if it never ran -- so a write
        # or truncate after it lands where io's would.  (Keeping what it
        # decoded as read-ahead would leave the buffer past it.)
        undo = self._save()
        fed = self._fed = []
        try:
            return await fn(*args)
        except BaseException as e:
            if not isinstance(e, Exception) and not self._restore(undo):
                self._give_back(saved, fed)
            raise
        finally:
            self._fed = None

    def invalidate(self) -> None:
        """The file changed other than through this wrapper (a positional
        write): the next read decodes it again from the current position."""
        self._stale = True

    async def _resync(self) -> None:
        self._stale = False
        if self._snapshot is None or not self._seekable:
            return  # nothing decoded ahead
        # Where tell() would put a seek(), without the side effects io's
        # calls would have: the encoder keeps its state (a BOM still to
        # write, an ISO-2022 shift) and flags wider than a C int do.
        telling, self._telling = self._telling, True
        try:
            await self._untold(self._go, *await self._tell(False), False)
        finally:
            self._telling = telling

    def _give_back(
        self,
        saved: tuple[str, int, tuple[int, bytes] | None, bool],
        fed: list[tuple[tuple[int, bytes], bytes, str]],
    ) -> None:
        chars, used, snapshot, telling = saved
        if fed:
            # The decoder has taken every chunk: the decoded text of all of
            # them, from the first snapshot, is what is left to return.
            if snapshot is None:
                snapshot, chars, used = fed[0][0], fed[0][2], 0
                fed = fed[1:]
            flags, data = snapshot
            snapshot = (flags, data + b"".join(chunk for _, chunk, _ in fed))
            chars += "".join(text for _, _, text in fed)
        self._decoded_chars, self._decoded_chars_used = chars, used
        self._snapshot, self._telling = snapshot, telling

    # -- reading --------------------------------------------------------------------------

    async def read(self, size: int | None = -1) -> str:
        """Read up to ``size`` characters, or to the end of the file."""
        return await self._consuming(self._read, size)

    async def _read(self, size: int | None) -> str:
        n = _optional_size(size)
        decoder = self._decoder
        if decoder is None:
            raise io.UnsupportedOperation("not readable")
        await self._check_bom()
        if n < 0:
            decoded = decoder.decode(await self._buffer.read(), True)
            result = self._get_decoded_chars() + decoded
            self._set_decoded_chars(None)
            self._snapshot = None
            return result
        chunks = [self._get_decoded_chars(n)]
        remaining = n - len(chunks[0])
        # Stop as soon as n characters are decoded: a pipe holding exactly
        # n characters must not be asked for more.
        while remaining > 0:
            if not await self._read_chunk(remaining):
                break
            chunks.append(self._get_decoded_chars(remaining))
            remaining -= len(chunks[-1])
        return "".join(chunks)

    async def readline(self, size: int | None = -1) -> str:
        """Read one line (at most ``size`` characters of it)."""
        return await self._consuming(self._readline, _size(size))

    async def readlines(self, hint: int | None = -1) -> list[str]:
        """The remaining lines; stop once they total more than ``hint``
        characters (if it is positive)."""
        return await self._consuming(self._readlines, hint)

    async def _readlines(self, hint: int | None) -> list[str]:
        limit = _optional_size(hint)
        lines: list[str] = []
        length = 0
        while True:
            try:
                line = await self.__anext__()
            except StopAsyncIteration:
                return lines
            lines.append(line)
            if limit > 0:
                if len(line) > limit - length:
                    return lines
                length += len(line)

    def __aiter__(self) -> AsyncTextWrapper:
        return self

    async def __anext__(self) -> str:
        return await self._consuming(self._next)

    async def _next(self) -> str:
        self._telling = False  # until the end of the file (or a flush)
        line = await self._readline(-1)
        if not line:
            self._snapshot = None
            self._telling = self._seekable
            raise StopAsyncIteration
        return line

    def _find_line_ending(self, line: str, start: int) -> tuple[int, int]:
        """(end of the first line ending at or after start, or -1; how many
        characters after start can be set aside when there is none)."""
        if self._readtranslate:
            pos = line.find("\n", start)
            return (pos + 1 - start, 0) if pos >= 0 else (-1, len(line) - start)
        if self._readuniversal:
            nl = line.find("\n", start)
            cr = line.find("\r", start)
            if cr < 0 or 0 <= nl < cr:
                return (nl + 1 - start, 0) if nl >= 0 else (-1, len(line) - start)
            return cr + (2 if nl == cr + 1 else 1) - start, 0
        readnl = self._readnl
        assert readnl
        pos = line.find(readnl, start)
        if pos >= 0:
            return pos + len(readnl) - start, 0
        # A '\r' at the very end may be the start of '\r\n': keep it.
        if len(readnl) == 2 and len(line) > start and line[-1] == "\r":
            return -1, len(line) - 1 - start
        return -1, len(line) - start

    async def _readline(self, limit: int) -> str:
        await self._check_bom()
        chunks: list[str] = []
        chunked = 0
        remaining: str | None = None  # undecided text carried to the next chunk
        line: str | None = None
        start = endpos = offset_to_buffer = 0
        while True:
            more = True
            while not self._decoded_chars:
                more = await self._read_chunk(0)
                if not more:
                    break
            if not more:
                self._set_decoded_chars(None)
                self._snapshot = None
                start = endpos = offset_to_buffer = 0
                break
            if remaining is None:
                line = self._decoded_chars
                start = self._decoded_chars_used
                offset_to_buffer = 0
            else:
                line = remaining + self._decoded_chars
                start = 0
                offset_to_buffer = len(remaining)
                remaining = None
            found, consumed = self._find_line_ending(line, start)
            if found >= 0:
                endpos = start + found
                if limit >= 0 and endpos - start + chunked >= limit:
                    endpos = start + limit - chunked
                break
            endpos = start + consumed
            if limit >= 0 and endpos - start + chunked >= limit:
                endpos = start + limit - chunked
                break
            if endpos > start:
                chunks.append(line[start:endpos])
                chunked += endpos - start
            if endpos < len(line):
                remaining = line[endpos:]
            line = None
            self._set_decoded_chars(None)
        if line is not None:
            self._decoded_chars_used = endpos - offset_to_buffer
            line = line[start:endpos]
        if remaining is not None:
            chunks.append(remaining)
        if line is not None:
            chunks.append(line)
        return "".join(chunks)

    # -- writing --------------------------------------------------------------------------

    async def write(self, s: str) -> int:
        """Write ``s``, translating '\\n' as ``newline`` says; returns len(s)."""
        if not isinstance(s, str):
            what = "None" if s is None else type(s).__name__
            raise TypeError(f"write() argument must be str, not {what}")
        encoder = self._encoder
        if encoder is None:
            raise io.UnsupportedOperation("not writable")
        await self._check_bom()
        text = s
        haslf = (
            (self._writetranslate and self._writenl is not None) or self._line_buffering
        ) and "\n" in text
        if haslf and self._writetranslate and self._writenl is not None:
            text = text.replace("\n", self._writenl)
        needflush = self._line_buffering and (haslf or "\r" in text)
        state = encoder.getstate()
        try:
            data = encoder.encode(text)
        finally:
            if self._bom_once:
                encoder.setstate(0)
        try:
            await self._buffer.write(data)
        except BaseException as e:
            # Cancelled before anything was written: the encoder's state (a
            # stateful codec's shift, a BOM still to write) goes back too.
            if not isinstance(e, Exception):
                if getattr(self._buffer, "moved", None) == 0:
                    encoder.setstate(state)
                else:
                    # Cancelled once it ran: it happened, and what was
                    # decoded ahead of it is dropped as after any write.
                    self._after_write()
            raise
        if needflush:
            try:
                await self._buffer.flush()
            except BaseException as e:
                if not isinstance(e, Exception):
                    self._after_write()  # (the write happened; see above)
                raise
        self._after_write()
        return len(s)

    def _after_write(self) -> None:
        self._set_decoded_chars(None)
        self._snapshot = None
        if self._decoder is not None:
            self._decoder.reset()

    async def _flush(self) -> None:
        self._telling = self._seekable
        await self._check_bom()
        await self._buffer.flush()

    async def _truncate(self, pos: int | None = None) -> int:
        """Truncate the buffer at ``pos`` (default: the buffer's position,
        which is past any read-ahead, as with io)."""
        await self.flush()
        return await self._buffer.truncate(pos)

    # -- position -------------------------------------------------------------------------

    async def tell(self) -> int:
        """An opaque cookie for :meth:`seek`, io.TextIOWrapper's own."""
        return _build_cookie(*await self._tell(True))

    async def _tell(self, checked: bool) -> tuple[int, int, int, int, bool]:
        """tell()'s cookie, its fields apart; ``checked``: the decoder's
        flags must fit a C int, as io's tell() reads them (else they are
        kept whole, for :meth:`_resync`)."""
        check = _dec_flags if checked else int
        if not self._seekable:
            raise io.UnsupportedOperation("underlying stream is not seekable")
        if not self._telling:
            raise OSError("telling position disabled by next() call")
        await self.flush()
        position = await self._buffer.tell()
        decoder = self._decoder
        if decoder is None or self._snapshot is None:
            return position, 0, 0, 0, False
        dec_flags, next_input = self._snapshot
        dec_flags = check(dec_flags)
        start_pos = position - len(next_input)
        chars_to_skip = self._decoded_chars_used
        if chars_to_skip == 0:
            return start_pos, dec_flags, 0, 0, False

        saved_state = decoder.getstate()
        try:
            # Fast search for a start point close to the current position
            # (one decode for fixed-width codecs).
            # (io does not cap this, and may read past next_input's end.)
            skip_bytes = min(int(self._b2cratio * chars_to_skip), len(next_input))
            skip_back = 1
            while skip_bytes > 0:
                self._decoder_setstate(decoder, start_pos, dec_flags)
                n = len(decoder.decode(next_input[:skip_bytes]))
                if n <= chars_to_skip:
                    dec_buffer, flags = decoder.getstate()
                    flags = check(flags)
                    if not dec_buffer:
                        dec_flags = flags
                        chars_to_skip -= n
                        break
                    skip_bytes -= len(dec_buffer)
                    skip_back = 1
                else:
                    skip_bytes -= skip_back
                    skip_back *= 2
            if skip_bytes <= 0:
                skip_bytes = 0
                self._decoder_setstate(decoder, start_pos, dec_flags)
            start_pos += skip_bytes
            if chars_to_skip == 0:
                return start_pos, dec_flags, 0, 0, False

            # Feed one byte at a time, noting the last safe start point (the
            # decoder holding nothing) before the current position.
            bytes_to_feed = chars_decoded = 0
            need_eof = False
            i = skip_bytes
            while i < len(next_input):
                chars_decoded += len(decoder.decode(next_input[i : i + 1]))
                bytes_to_feed += 1
                dec_buffer, flags = decoder.getstate()
                flags = check(flags)
                if not dec_buffer and chars_decoded <= chars_to_skip:
                    start_pos += bytes_to_feed
                    chars_to_skip -= chars_decoded
                    dec_flags = flags
                    bytes_to_feed = chars_decoded = 0
                if chars_decoded >= chars_to_skip:
                    break
                i += 1
            else:
                chars_decoded += len(decoder.decode(b"", True))
                need_eof = True
                if chars_decoded < chars_to_skip:
                    raise OSError("can't reconstruct logical file position")
            return start_pos, dec_flags, bytes_to_feed, chars_to_skip, need_eof
        finally:
            decoder.setstate(saved_state)

    async def _seek(self, cookie: int, whence: int = 0) -> int:
        """Go to a cookie from :meth:`tell` (whence 0), or to the current
        position or the end (whence 1 or 2, offset 0).  Cancelled part-way
        (once the buffer moved), it goes back to where it was: a seek happens
        whole or not at all."""
        whence = _c_int(whence)
        if not self._seekable:
            raise io.UnsupportedOperation("underlying stream is not seekable")
        if whence == os.SEEK_CUR:
            if cookie != 0:
                raise io.UnsupportedOperation("can't do nonzero cur-relative seeks")
            cookie = await self.tell()
        elif whence == os.SEEK_END:
            if cookie != 0:
                raise io.UnsupportedOperation("can't do nonzero end-relative seeks")
            await self.flush()
            undo = self._save()
            try:
                self._set_decoded_chars(None)
                self._snapshot = None
                if self._decoder is not None:
                    self._decoder.reset()
                position = await self._buffer.seek(0, os.SEEK_END)
            except BaseException as e:
                if not isinstance(e, Exception):
                    self._restore(undo)
                raise
            self._encoder_reset(position == 0)
            return position
        elif whence != os.SEEK_SET:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if cookie < 0:
            raise ValueError(f"negative seek position {cookie!r}")
        await self.flush()

        # Go back to the safe start point and replay read(chars_to_skip).
        await self._go(*_parse_cookie(int(cookie)))
        return cookie

    async def _go(
        self,
        start_pos: int,
        dec_flags: int,
        bytes_to_feed: int,
        chars_to_skip: int,
        need_eof: bool,
        encoder_too: bool = True,
    ) -> None:
        """Seek to a cookie's fields (whole or not at all, as :meth:`_seek`);
        ``encoder_too``: reset the encoder as io's seek() does."""
        undo = self._save()
        try:
            await self._buffer.seek(start_pos)
            self._set_decoded_chars(None)
            self._snapshot = None
            decoder = self._decoder
            if decoder is not None:
                self._decoder_setstate(decoder, start_pos, dec_flags)
            if chars_to_skip:
                if decoder is None:
                    raise io.UnsupportedOperation("not readable")
                chunk = await self._buffer.read(bytes_to_feed)
                self._snapshot = (dec_flags, chunk)
                self._set_decoded_chars(decoder.decode(chunk, need_eof))
                if len(self._decoded_chars) < chars_to_skip:
                    raise OSError("can't restore logical file position")
                self._decoded_chars_used = chars_to_skip
            else:
                self._snapshot = (dec_flags, b"")
        except BaseException as e:
            if not isinstance(e, Exception):
                self._restore(undo)
            raise
        if encoder_too:
            self._encoder_reset(start_pos == 0 and dec_flags == 0)

    def start_at(self, cookie: int, pread: Callable[[int, int], bytes]) -> int:
        """Set up as :meth:`seek` to ``cookie`` would, without awaiting, for
        a wrapper just made over a buffer at the cookie's start position
        (``threadlets.wrap`` of a text file, whose ``tell()`` was
        ``cookie``).  ``pread(n, offset)`` reads the bytes to replay.
        Returns how many bytes past that position the buffer must go."""
        start_pos, dec_flags, bytes_to_feed, chars_to_skip, need_eof = _parse_cookie(int(cookie))
        self._set_decoded_chars(None)
        self._snapshot = (dec_flags, b"")
        decoder = self._decoder
        chunk = b""
        if decoder is not None:
            self._decoder_setstate(decoder, start_pos, dec_flags)
            if chars_to_skip:
                chunk = pread(bytes_to_feed, start_pos)
                self._snapshot = (dec_flags, chunk)
                self._set_decoded_chars(decoder.decode(chunk, need_eof))
                if len(self._decoded_chars) < chars_to_skip:
                    raise OSError("can't restore logical file position")
                self._decoded_chars_used = chars_to_skip
        self._encoder_reset(start_pos == 0 and dec_flags == 0)
        self._bom_check = False
        return len(chunk)

    # A cancelled flush, truncate, seek or reconfigure leaves tell() as it
    # was: each begins with a flush, which re-enables tell() (after an
    # iteration) -- only a call that finished may have done that.

    async def flush(self) -> None:
        await self._untold(self._flush)

    async def truncate(self, pos: int | None = None) -> int:
        """Truncate the buffer at ``pos`` (default: the buffer's position,
        which is past any read-ahead, as with io)."""
        return await self._untold(self._truncate, pos)

    async def seek(self, cookie: int, whence: int = 0) -> int:
        """Go to a cookie from :meth:`tell` (whence 0), or to the current
        position or the end (whence 1 or 2, offset 0).  Cancelled part-way
        (once the buffer moved), it goes back to where it was: a seek happens
        whole or not at all."""
        return await self._untold(self._seek, cookie, whence)

    async def reconfigure(self, **kwargs: Any) -> None:
        """Change the encoding, errors, newline, line_buffering or
        write_through, as ``io.TextIOWrapper.reconfigure`` (keywords only;
        what is not given stays; a new ``encoding`` without ``errors`` is
        strict).  The encoding and newline cannot change once text was read
        ahead."""
        await self._untold(lambda: self._reconfigure(**kwargs))

    async def _untold(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        telling = self._telling
        try:
            return await fn(*args)
        except BaseException as e:
            if not isinstance(e, Exception):
                self._telling = telling
            raise

    def _save(self) -> tuple[Any, ...] | None:
        """The state a cancelled call goes back to (see :meth:`_restore`);
        None where the buffer cannot go back (a pipe)."""
        mark_fn: Callable[[], Any] | None = getattr(self._buffer, "mark", None)
        mark = mark_fn() if mark_fn is not None else None
        if mark is None:
            return None
        dec_state = self._decoder.getstate() if self._decoder is not None else None
        chars = (
            self._decoded_chars,
            self._has_decoded,
            self._decoded_chars_used,
            self._snapshot,
            self._telling,
        )
        return mark, dec_state, chars

    def _restore(self, undo: tuple[Any, ...] | None) -> bool:
        """Undo a call cancelled part-way: the buffer's position, the
        decoder's state and the decoded text as :meth:`_save` found them.
        False (nothing done) if that cannot be."""
        if undo is None:
            return False
        mark, dec_state, chars = undo
        if not self._buffer.rewind(mark):  # type: ignore[attr-defined]
            return False
        if self._decoder is not None:
            self._decoder.setstate(dec_state)
        (
            self._decoded_chars,
            self._has_decoded,
            self._decoded_chars_used,
            self._snapshot,
            self._telling,
        ) = chars
        return True
