"""The NBD protocol without I/O: messages, the handshake, requests, replies.

This module owns the rules of the NBD protocol (doc/proto.md of the NBD
project) as pure functions and two small state machines that know nothing
of sockets, files or threads (h11 style), so tests drive them with bytes:

* :class:`Handshake` -- the fixed newstyle handshake, server side: the
  greeting, then ``receive(data) -> bytes to send`` until ``done`` (the
  transmission phase begins, with ``export``, ``structured`` and
  ``meta_context`` settled) or ``closed`` (the client aborted).
* :class:`RequestParser` -- the transmission phase, client to server:
  ``feed(data) -> [Request]``; a WRITE's payload arrives with its request.
* :func:`check_request` -- is a request allowed (command, flags, range,
  read-only, negotiated features)?  0, or the NBD error and a message.
* reply builders -- :func:`reply_ok`, :func:`reply_error`,
  :func:`reply_read`, :func:`reply_block_status`: simple replies, or
  structured chunks once the client negotiated them.

A violation the protocol does not let us answer (bad magic, unknown client
flags, an unknown export after NBD_OPT_EXPORT_NAME) raises
:class:`ProtocolError`: the server then drops the connection (a hard
disconnect, which the spec allows for it).  Every other bad input gets the
error reply the spec names.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "BASE_ALLOCATION",
    "Cmd",
    "CmdFlag",
    "ExportInfo",
    "Handshake",
    "ProtocolError",
    "Request",
    "RequestParser",
    "check_request",
    "nbd_errno",
    "reply_block_status",
    "reply_error",
    "reply_ok",
    "reply_read",
    "transmission_flags",
]

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags: the same two bits.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES


class TxFlag(enum.IntFlag):
    """Transmission flags (16 bits, sent with the export's size)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR | 1
    ERR_POLICY = _ERR | 2
    ERR_INVALID = _ERR | 3
    ERR_PLATFORM = _ERR | 4
    ERR_TLS_REQD = _ERR | 5
    ERR_UNKNOWN = _ERR | 6
    ERR_SHUTDOWN = _ERR | 7
    ERR_BLOCK_SIZE_REQD = _ERR | 8
    ERR_TOO_BIG = _ERR | 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = _ERR >> 16 | 1
    ERROR_OFFSET = _ERR >> 16 | 2


# The same as plain ints, for the per-request paths.
_FUA, _DF = int(CmdFlag.FUA), int(CmdFlag.DF)
_READ, _WRITE, _FLUSH, _TRIM = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.FLUSH), int(Cmd.TRIM)
_DISC = int(Cmd.DISC)
_WRITE_ZEROES, _BLOCK_STATUS = int(Cmd.WRITE_ZEROES), int(Cmd.BLOCK_STATUS)

REPLY_FLAG_DONE = 1 << 0
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

#: The one metadata context this server offers, and its id.
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1

#: Strings (export names, queries) are at most this long (the spec's MUST).
MAX_STRING = 4096
#: Option data beyond this is skipped and answered NBD_REP_ERR_TOO_BIG.
MAX_OPTION = 64 * 1024
#: The largest READ or WRITE payload (the spec's default maximum, 32 MiB).
MAX_PAYLOAD = 32 * 1024 * 1024

#: The only errors the protocol allows on the wire.
_NBD_ERRNOS = frozenset(
    {
        errno.EPERM,
        errno.EIO,
        errno.ENOMEM,
        errno.EINVAL,
        errno.ENOSPC,
        errno.EOVERFLOW,
        errno.ENOTSUP,
        errno.ESHUTDOWN,
    }
)
_ERRNO_MAP = {
    errno.EDQUOT: errno.ENOSPC,
    errno.EFBIG: errno.ENOSPC,
    errno.EROFS: errno.EPERM,
    errno.EACCES: errno.EPERM,
    errno.EOPNOTSUPP: errno.ENOTSUP,
}

_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")


class ProtocolError(Exception):
    """The peer broke a rule that allows no error reply: disconnect."""


def nbd_errno(err: int) -> int:
    """The NBD error for an errno: itself where the protocol allows it,
    ENOSPC for EDQUOT/EFBIG, EPERM for EROFS/EACCES, else EIO."""
    err = _ERRNO_MAP.get(err, err)
    return err if err in _NBD_ERRNOS else errno.EIO


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What a client is told about one export.  ``min_block`` is the
    alignment requests should keep (1, or the O_DIRECT alignment),
    ``preferred_block`` the efficient I/O size, ``max_block`` the largest
    READ/WRITE payload."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD
    rotational: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.size < 2**63:
            raise ValueError(f"export size must be in [0, 2**63), not {self.size}")
        if not (
            1 <= self.min_block <= self.preferred_block
            and self.min_block <= self.max_block <= MAX_PAYLOAD
        ):
            raise ValueError(
                f"block sizes must satisfy 1 <= min <= preferred and min <= max <= {MAX_PAYLOAD}"
            )
        if len(self.name.encode()) > MAX_STRING or "\0" in self.name:
            raise ValueError("an export name is at most 4096 bytes, without NUL")


def transmission_flags(export: ExportInfo, structured: bool) -> int:
    """The transmission flags for ``export``.  Every connection shares one
    file (one page cache; a flush is fdatasync of that file), so
    CAN_MULTI_CONN is always true."""
    flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_CACHE | TxFlag.CAN_MULTI_CONN
    if export.read_only:
        flags |= TxFlag.READ_ONLY
    else:
        flags |= TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES
    if structured:
        flags |= TxFlag.SEND_DF
    if export.rotational:
        flags |= TxFlag.ROTATIONAL
    return int(flags)


# -- handshake ---------------------------------------------------------------------------------


def _opt_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(data)) + data


def _string(raw: bytes) -> str | None:
    """A protocol string, or None if it is not one (bad UTF-8, NUL, too long)."""
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


class _Invalid(Exception):
    """An option's data is malformed: answer NBD_REP_ERR_INVALID."""


class _Reader:
    """Bounds-checked reads from an option's data."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise _Invalid("option data too short")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def string(self, n: int) -> str:
        s = _string(self.take(n))
        if s is None:
            raise _Invalid("not a valid string")
        return s

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _Invalid("trailing option data")


class Handshake:
    """The server side of the fixed newstyle handshake.

    Send :meth:`greeting`, then pass every byte received to :meth:`receive`
    and send what it returns, until ``done`` (go on with ``leftover`` bytes
    in the transmission phase) or ``closed`` (send the output, then close).
    ``exports`` maps names to exports; the empty name means ``default``.
    With ``shutting_down`` set, options other than NBD_OPT_ABORT are
    answered NBD_REP_ERR_SHUTDOWN.
    """

    def __init__(self, exports: Mapping[str, ExportInfo], default: str | None = None) -> None:
        self.exports = dict(exports)
        self.default = default if default is not None else next(iter(self.exports), None)
        self.shutting_down = False
        self._buf = bytearray()
        self._have_flags = False
        self._skip = 0  # bytes of an oversized option still to discard
        self._skip_opt = 0
        self.no_zeroes = False
        self.structured = False
        #: Selected metadata contexts: id -> name, for ``_meta_export``.
        self.meta_context: dict[int, str] = {}
        self._meta_export: str | None = None
        self.export: ExportInfo | None = None
        self.done = False
        self.closed = False
        self.leftover = b""
        #: ``receive`` stopped at ``max_output`` with options left unanswered.
        self.more = False

    @staticmethod
    def greeting() -> bytes:
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)

    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self.default is not None:
            return self.exports.get(self.default)
        return self.exports.get(name)

    def receive(self, data: bytes, max_output: int | None = None) -> bytes:
        """Consume client bytes; return the bytes to send.  Raises
        ProtocolError for a violation that ends the connection.

        ``max_output``: stop answering options once this many bytes of
        replies are made (at least one option is answered), keeping the
        rest of the bytes; ``more`` then says so, and ``receive(b"")``
        goes on.  (A 26-byte NBD_OPT_INFO can be answered with 8 KiB: a
        client that sends thousands and reads nothing must not make the
        server hold all the answers.)"""
        if self.done or self.closed:
            raise ProtocolError("the handshake is over")
        buf = self._buf
        buf += data
        out: list[bytes] = []
        made = 0
        self.more = False
        while not (self.done or self.closed):
            if max_output is not None and made >= max_output:
                self.more = True
                break
            if self._skip:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    break
                out.append(_opt_reply(self._skip_opt, Rep.ERR_TOO_BIG, b"option too large"))
                made += len(out[-1])
                continue
            if not self._have_flags:
                if len(buf) < 4:
                    break
                (cflags,) = struct.unpack_from(">I", buf)
                del buf[:4]
                if cflags & ~SERVER_HANDSHAKE_FLAGS:
                    raise ProtocolError(f"unknown client flags {cflags:#x}")
                self.no_zeroes = bool(cflags & FLAG_NO_ZEROES)
                self._have_flags = True
                continue
            if len(buf) < _OPT_HEADER.size:
                break
            magic, opt, length = _OPT_HEADER.unpack_from(buf)
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                if opt == Opt.EXPORT_NAME:
                    raise ProtocolError("NBD_OPT_EXPORT_NAME too long")
                del buf[: _OPT_HEADER.size]
                self._skip, self._skip_opt = length, opt
                continue
            if len(buf) < _OPT_HEADER.size + length:
                break
            payload = bytes(buf[_OPT_HEADER.size : _OPT_HEADER.size + length])
            del buf[: _OPT_HEADER.size + length]
            out.append(self._option(opt, payload))
            made += len(out[-1])
        if self.done:
            self.leftover = bytes(buf)
            buf.clear()
        return b"".join(out)

    def _option(self, opt: int, data: bytes) -> bytes:
        if opt == Opt.ABORT:
            self.closed = True
            return _opt_reply(opt, Rep.ACK)
        if opt == Opt.EXPORT_NAME:
            return self._export_name(data)
        if self.shutting_down:
            return _opt_reply(opt, Rep.ERR_SHUTDOWN, b"server shutting down")
        try:
            if opt == Opt.LIST:
                return self._list(data)
            if opt in (Opt.INFO, Opt.GO):
                return self._info(opt, data)
            if opt == Opt.STRUCTURED_REPLY:
                if data:
                    raise _Invalid("NBD_OPT_STRUCTURED_REPLY takes no data")
                self.structured = True
                return _opt_reply(opt, Rep.ACK)
            if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                return self._meta(opt, data)
        except _Invalid as e:
            return _opt_reply(opt, Rep.ERR_INVALID, str(e).encode())
        return _opt_reply(opt, Rep.ERR_UNSUP, b"option not supported")

    def _finish(self, export: ExportInfo) -> None:
        self.export = export
        self.done = True
        if self._meta_export is None or self._lookup(self._meta_export) is not export:
            self.meta_context = {}  # selected for another export: not for this one

    def _export_name(self, data: bytes) -> bytes:
        name = _string(data)
        export = None if name is None else self._lookup(name)
        if export is None or self.shutting_down:
            raise ProtocolError("NBD_OPT_EXPORT_NAME: no such export")
        self._finish(export)
        reply = struct.pack(">QH", export.size, transmission_flags(export, self.structured))
        return reply if self.no_zeroes else reply + bytes(124)

    def _list(self, data: bytes) -> bytes:
        if data:
            raise _Invalid("NBD_OPT_LIST takes no data")
        out = []
        for name in self.exports:
            raw = name.encode()
            out.append(_opt_reply(Opt.LIST, Rep.SERVER, struct.pack(">I", len(raw)) + raw))
        out.append(_opt_reply(Opt.LIST, Rep.ACK))
        return b"".join(out)

    def _info(self, opt: int, data: bytes) -> bytes:
        r = _Reader(data)
        name = r.string(r.u32())
        requests = [r.u16() for _ in range(r.u16())]
        r.end()
        export = self._lookup(name)
        if export is None:
            return _opt_reply(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
        flags = transmission_flags(export, self.structured)
        out = [_opt_reply(opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, export.size, flags))]
        if Info.NAME in requests:  # the canonical name (the client may have sent "")
            raw = export.name.encode()
            out.append(_opt_reply(opt, Rep.INFO, struct.pack(">H", Info.NAME) + raw))
        if Info.DESCRIPTION in requests and export.description:
            desc = export.description.encode()[:MAX_STRING]
            out.append(_opt_reply(opt, Rep.INFO, struct.pack(">H", Info.DESCRIPTION) + desc))
        sizes = (export.min_block, export.preferred_block, export.max_block)
        out.append(_opt_reply(opt, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, *sizes)))
        out.append(_opt_reply(opt, Rep.ACK))
        if opt == Opt.GO:
            self._finish(export)
        return b"".join(out)

    def _meta(self, opt: int, data: bytes) -> bytes:
        if not self.structured:
            raise _Invalid("negotiate NBD_OPT_STRUCTURED_REPLY first")
        r = _Reader(data)
        name = r.string(r.u32())
        queries = [r.string(r.u32()) for _ in range(r.u32())]
        r.end()
        if self._lookup(name) is None:
            return _opt_reply(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
        listing = opt == Opt.LIST_META_CONTEXT
        if listing:
            found = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            found = BASE_ALLOCATION in queries
            self.meta_context = {BASE_ALLOCATION_ID: BASE_ALLOCATION} if found else {}
            self._meta_export = name
        out = []
        if found:
            ctx_id = 0 if listing else BASE_ALLOCATION_ID
            payload = struct.pack(">I", ctx_id) + BASE_ALLOCATION.encode()
            out.append(_opt_reply(opt, Rep.META_CONTEXT, payload))
        out.append(_opt_reply(opt, Rep.ACK))
        return b"".join(out)


# -- transmission ------------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One client request.  ``data`` is a WRITE's payload; ``dropped`` says
    the payload was longer than the parser keeps and was skipped (the
    request must then be refused)."""

    cmd: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes | None = None
    dropped: bool = field(default=False)


class RequestParser:
    """Splits the client's byte stream into :class:`Request` objects.

    A WRITE payload up to ``max_payload`` bytes is kept and delivered with
    its request; a longer one is read and thrown away (``dropped``), so a
    client cannot make the server buffer more.  After NBD_CMD_DISC nothing
    more is parsed.  A bad request magic raises ProtocolError.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pending: Request | None = None  # a WRITE waiting for its payload
        self._skip = 0
        self.disconnected = False

    def feed(self, data: bytes) -> list[Request]:
        if self.disconnected:
            return []
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data
        out: list[Request] = []
        pos = 0
        end = len(src)
        unpack = _REQUEST.unpack_from
        while True:
            if self._skip:
                n = min(self._skip, end - pos)
                pos += n
                self._skip -= n
                if self._skip:
                    break
                pending = self._pending
                assert pending is not None
                self._pending = None
                out.append(pending)
                continue
            pending = self._pending
            if pending is not None:
                if end - pos < pending.length:
                    break
                pending.data = bytes(src[pos : pos + pending.length])
                pos += pending.length
                self._pending = None
                out.append(pending)
                continue
            if end - pos < 28:
                break
            magic, flags, cmd, handle, offset, length = unpack(src, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            pos += 28
            req = Request(cmd, flags, handle, offset, length)
            if cmd == _WRITE and length:
                if length > self.max_payload:
                    req.dropped = True
                    self._skip = length
                self._pending = req
                continue
            out.append(req)
            if cmd == _DISC:
                self.disconnected = True
                break
        if src is buf:
            del buf[:pos]
        elif pos < end and not self.disconnected:
            buf += data[pos:]
        if self.disconnected:
            buf.clear()
        return out

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a request."""
        return len(self._buf)


#: The command flags each command may carry (FUA is valid on all of them),
#: as plain ints: ~ on an IntFlag keeps only the defined bits, and unknown
#: bits are exactly what must be caught.
_ALLOWED_FLAGS: dict[int, int] = {
    int(cmd): int(flags)
    for cmd, flags in {
        Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
        Cmd.WRITE: CmdFlag.FUA,
        Cmd.DISC: CmdFlag.FUA,
        Cmd.FLUSH: CmdFlag.FUA,
        Cmd.TRIM: CmdFlag.FUA,
        Cmd.CACHE: CmdFlag.FUA,
        Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE,
        Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
    }.items()
}
_WRITES = frozenset({_WRITE, _TRIM, _WRITE_ZEROES})


def check_request(
    req: Request, export: ExportInfo, structured: bool, meta_context: Mapping[int, str]
) -> tuple[int, str]:
    """(0, "") if the server should carry ``req`` out, else (the NBD error,
    a message for the client).  Nothing outside the export is ever allowed.
    (Plain ints throughout: this runs for every request.)"""
    cmd = req.cmd
    allowed = _ALLOWED_FLAGS.get(cmd)
    if allowed is None:
        return errno.EINVAL, f"unknown command {cmd}"
    if export.read_only:
        # (Before the flags: a write or trim to a read-only export is EPERM
        # whatever it carries -- FUA, not advertised here, too -- as the
        # protocol says (SHOULD) and nbdkit answers it.)
        if cmd in _WRITES:
            return errno.EPERM, "the export is read-only"
        allowed &= ~_FUA
    if not structured:
        allowed &= ~_DF
    if req.flags & ~allowed:
        return errno.EINVAL, f"flags {req.flags:#x} not valid for {Cmd(cmd).name}"
    if cmd == _FLUSH:
        if req.offset or req.length:
            return errno.EINVAL, "NBD_CMD_FLUSH needs offset and length 0"
        return 0, ""
    if cmd in (_READ, _WRITE) and (req.dropped or req.length > export.max_block):
        return errno.EINVAL, f"length {req.length} over the maximum {export.max_block}"
    if req.offset > export.size or req.length > export.size - req.offset:
        err = errno.ENOSPC if cmd in (_WRITE, _WRITE_ZEROES) else errno.EINVAL
        return err, f"request beyond the end of the export ({export.size} bytes)"
    if cmd == _BLOCK_STATUS:
        if not structured or not meta_context:
            return errno.EINVAL, "no metadata context was negotiated"
        if req.length == 0:
            return errno.EINVAL, "NBD_CMD_BLOCK_STATUS needs a length"
    return 0, ""


def reply_ok(handle: int) -> bytes:
    """Success with no payload (a simple reply is valid in either mode)."""
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, handle)


def reply_error(handle: int, error: int, message: str, structured: bool) -> bytes:
    """An error reply: ``error`` is mapped to one the protocol allows."""
    error = nbd_errno(error)
    if not structured:
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle)
    msg = message.encode()[:MAX_STRING]
    payload = struct.pack(">IH", error, len(msg)) + msg
    return (
        _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, handle, len(payload))
        + payload
    )


def reply_read_header(handle: int, offset: int, length: int, structured: bool) -> bytes:
    """The bytes that precede ``length`` bytes of read data."""
    if not structured:
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, handle)
    if length == 0:  # nothing to cover: the final NONE chunk alone
        return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, handle, 0)
    return _CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, handle, length + 8
    ) + struct.pack(">Q", offset)


def reply_read(handle: int, offset: int, data: bytes, structured: bool) -> bytes:
    """A successful READ: one data chunk (so NBD_CMD_FLAG_DF always holds)."""
    return reply_read_header(handle, offset, len(data), structured) + data


def reply_block_status(handle: int, ctx_id: int, extents: list[tuple[int, int]]) -> bytes:
    """The NBD_REPLY_TYPE_BLOCK_STATUS chunk: ``extents`` is (length, flags)
    pairs, consecutive from the request's offset, each length > 0."""
    if not extents or any(n <= 0 or n >= 2**32 for n, _ in extents):
        raise ValueError("block status needs one or more extents of length 1 .. 2**32-1")
    payload = struct.pack(">I", ctx_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    header = _CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, handle, len(payload)
    )
    return header + payload
