"""An asyncio NBD server: one file or block device, served on the engine.

This module owns the I/O side of ``threadlets nbd serve``: the export (an
open file and what clients are told about it), one asyncio protocol per
connection, and the server's life cycle.  The protocol's rules live in
:mod:`threadlets.nbd.proto`; here they meet sockets and the engine.

Requests and replies
====================

Every NBD request that passes :func:`~threadlets.nbd.proto.check_request`
becomes one engine request of the server's :class:`~threadlets.AioContext`
(a FUA write becomes a write, then a flush), whose eventfd the event loop
watches.  Many requests are in flight per connection; each reply is queued
when its request completes (out of order, as the spec allows) and the
queued replies go out in one ``transport.write`` per loop iteration.  An
O_DIRECT export's READ and WRITE data go through pooled page-aligned
buffers (see :class:`_AlignedBuffers`), so they can reach the ring.

Who touches what: everything here runs in the event loop's thread, the
engine's callbacks included (``process_completions`` is the loop's reader
of the eventfd).  A request's buffer belongs to the engine until its
callback ran.

Flow control: a connection stops reading while it has
:data:`MAX_IN_FLIGHT` requests (or :data:`MAX_IN_FLIGHT_BYTES` of buffers)
in flight, or while the transport's write buffer is full, so a client that
floods requests or never reads replies costs bounded memory.  The limits
hold per request: what one read of the socket brought (thousands of
28-byte READs, each asking for a buffer of up to max_block bytes) waits in
the connection's backlog and starts as requests finish.  The handshake
too: option replies are made :data:`HANDSHAKE_TURN` bytes at a time, and
none while the write buffer is full (an option of 26 bytes may be
answered with 8 KiB).

Bad input: a request the spec lets us refuse gets its error reply; a
violation that allows no reply (bad magic) drops the connection.  A client
that disconnects mid-request: its requests still finish (nothing is
written outside the export), their replies are dropped.  A handshake that
has not finished after ``handshake_timeout`` seconds is dropped.

Idle clients: once the handshake is done there is no idle timeout, as in
qemu-nbd and nbdkit (whose ``--timeout`` covers the handshake only): the
kernel's nbd driver and qemu keep a connection open, silent, for as long
as the device is attached, and dropping it would fail their next request.
A client that goes silent keeps its connection slot (``max_connections``)
until it disconnects or the server stops; it never delays shutdown, which
closes silent connections at once (nothing in flight, nothing to send).

Shutdown (:meth:`NBDServer.close`): stop accepting, drop connections still
in the handshake, stop reading requests, let those in flight finish and
send their replies, flush the file, close the connections, then the
engine context and the file; if the flush failed, OSError once all that is
done (``nbd serve`` exits 1: what clients wrote may not be on the disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from threadlets.engine import AioContext, AioRequest
from threadlets.nbd import proto
from threadlets.nbd.proto import Cmd, CmdFlag, ExportInfo, Handshake, Request, RequestParser
from threadlets.probe import (
    MAX_ALIGNMENT,
    O_DIRECT,
    PAGE_SIZE,
    aligned_buffer,
    capability_note,
    probe_alignment,
)

__all__ = [
    "DEFAULT_PORT",
    "Export",
    "NBDServer",
    "allocation_extents",
    "open_export",
    "parse_bind",
    "serve",
]

log = logging.getLogger("threadlets.nbd")

#: The IANA port of NBD.
DEFAULT_PORT = 10809
#: Requests one connection may have in flight before it stops reading.
MAX_IN_FLIGHT = 128
#: Buffer bytes one connection may have in flight before it stops reading.
MAX_IN_FLIGHT_BYTES = 256 * 1024 * 1024
#: Seconds a client has to finish the handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Bytes of option replies made per turn of the handshake: a client that
#: sends options faster than it reads the replies (up to 320 times their
#: size) fills the write buffer to its limit, then waits.
HANDSHAKE_TURN = 64 * 1024
#: At most this many block status descriptors in one reply.
MAX_EXTENTS = 1024
#: O_DIRECT buffers up to this size are kept for reuse, at most
#: :data:`POOL_BYTES` of them per server.
POOL_MAX = 1 << 20
POOL_BYTES = 64 * 1024 * 1024

# Plain ints for the per-request paths.
_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_FUA = int(CmdFlag.FUA)
#: The commands that write, for which FUA means a flush before the reply.
_FUA_COMMANDS = frozenset({_WRITE, int(Cmd.TRIM), int(Cmd.WRITE_ZEROES)})
#: The commands that change the export (or flush it).
_CHANGES = _FUA_COMMANDS | {_FLUSH}


@dataclass(frozen=True)
class Export:
    """An open file or block device and what clients are told about it.
    ``fd`` belongs to the export: :meth:`close` closes it."""

    path: str
    fd: int
    info: ExportInfo
    regular: bool
    direct: bool

    def close(self) -> None:
        os.close(self.fd)


def open_export(
    path: str | os.PathLike[str],
    *,
    name: str = "",
    read_only: bool = False,
    direct: bool = False,
    description: str | None = None,
    max_block: int = proto.MAX_PAYLOAD,
) -> Export:
    """Open ``path`` (a regular file or a block device) for serving.  With
    ``direct`` it is opened O_DIRECT and its alignment is the export's
    minimum block size; ``max_block`` is the largest READ/WRITE accepted.
    A block device is opened O_EXCL: one the system uses (mounted, swap...)
    is refused with EBUSY.  Raises OSError, or ValueError for other file
    types."""
    path = os.fspath(path)
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    # O_EXCL on a block device: EBUSY if the system uses it (mounted, swap,
    # a device-mapper member, another exclusive opener), as ``stress`` and
    # ``bench`` refuse one: clients would write under a mounted file system
    # (or read it changing under them).  Linux ignores O_EXCL without
    # O_CREAT for anything but a block device, so it is always given there
    # (no window between a check and the open); elsewhere only for what
    # names a block device now.
    if sys.platform.startswith("linux"):
        flags |= os.O_EXCL
    else:
        with contextlib.suppress(OSError):
            if stat.S_ISBLK(os.stat(path).st_mode):
                flags |= os.O_EXCL
    if direct:
        if not O_DIRECT:  # (portable mode, or a system without it)
            raise OSError(errno.ENOTSUP, f"--direct: {capability_note('o_direct')}")
        flags |= O_DIRECT
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise OSError(
                e.errno, f"{e.strerror} (mounted, or in use by the system)", path
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise ValueError(f"{path}: not a regular file or a block device")
        min_block = 1
        if direct:
            if stat.S_ISREG(st.st_mode) and size < 2 * MAX_ALIGNMENT:
                min_block = MAX_ALIGNMENT  # too short to probe: the strictest
            else:
                min_block = probe_alignment(fd)[0]
        preferred = max(min_block, 4096, min(st.st_blksize, 1 << 20))
        info = ExportInfo(
            name=name,
            size=size,
            read_only=read_only,
            description=description if description is not None else os.path.basename(path),
            min_block=min_block,
            preferred_block=min(preferred, max_block),
            max_block=max_block,
        )
        return Export(path, fd, info, stat.S_ISREG(st.st_mode), direct)
    except BaseException:
        os.close(fd)
        raise


class _AlignedBuffers:
    """Page-aligned buffers for an O_DIRECT export's READ and WRITE data.

    A Python ``bytearray`` has no alignment, so O_DIRECT cannot use it:
    the io_uring backend hands such a request to a worker and the worker
    bounces it through a fresh aligned buffer (after a refused call).  An
    aligned buffer goes to the ring, or straight to the worker's system
    call.  Buffers up to :data:`POOL_MAX` bytes come back with :meth:`put`
    once the engine is done with them and are reused, at most
    :data:`POOL_BYTES` kept; only the event loop's thread touches this."""

    def __init__(self, alignment: int = PAGE_SIZE) -> None:
        self.alignment = max(PAGE_SIZE, alignment)
        self.free: dict[int, list[memoryview]] = {}
        self.kept = 0

    def get(self, length: int) -> memoryview:
        """A buffer of at least ``length`` bytes (a multiple of the alignment)."""
        align = self.alignment
        size = max(align, -(-length // align) * align)
        free = self.free.get(size)
        if free:
            self.kept -= size
            return free.pop()
        return aligned_buffer(size, align)

    def put(self, buf: memoryview) -> None:
        size = len(buf)
        if size <= POOL_MAX and self.kept + size <= POOL_BYTES:
            self.free.setdefault(size, []).append(buf)
            self.kept += size


def allocation_extents(
    fd: int, offset: int, length: int, regular: bool, one: bool = False
) -> list[tuple[int, int]]:
    """base:allocation for ``length`` bytes at ``offset``: (length, flags)
    descriptors found with SEEK_DATA/SEEK_HOLE.  Anything not known to be
    a hole is reported allocated (flags 0), as the spec allows; a block
    device is reported allocated throughout.  Past the end of the file is
    a hole (it reads as zeros)."""
    if not regular:
        return [(length, 0)]
    end = offset + length
    out: list[tuple[int, int]] = []
    pos = offset
    hole = proto.STATE_HOLE | proto.STATE_ZERO
    while pos < end and len(out) < MAX_EXTENTS and not (one and out):
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                return out or [(length, 0)]
            data = end  # no data from pos on
        if data > pos:
            stop = min(data, end)
            out.append((stop - pos, hole))
            pos = stop
            continue
        try:
            stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        except OSError:
            stop = end
        if stop <= pos:
            stop = end
        out.append((stop - pos, 0))
        pos = stop
    return out


def _prefetch(fd: int, offset: int, length: int) -> int:
    """NBD_CMD_CACHE: start reading the range into the page cache.  (Returns
    0: the engine's ``outcome()`` wants a call's result not to be None.)"""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    return 0


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``[IPV6]:PORT`` -> (host, port);
    the host defaults to 127.0.0.1, the port to 10809."""
    host, port = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"bad address {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}")
        port = rest[1:]
        if rest and not rest[1:]:
            raise ValueError(f"bad port in {text!r}")
    elif text.count(":") == 1:
        host, port = text.split(":")
        if not port:
            raise ValueError(f"bad port in {text!r}")
    # ASCII digits only: int() also takes "+80", " 80", "1_000" and "٨٠".
    if port and not (port.isascii() and port.isdigit()):
        raise ValueError(f"bad port in {text!r}")
    number = int(port) if port else DEFAULT_PORT
    if not 0 <= number <= 65535:
        raise ValueError(f"port must be 0..65535, not {number}")
    return host or "127.0.0.1", number


class _Connection(asyncio.Protocol):
    """One client.  Handshake, then requests; see the module docstring."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.handshake: Handshake | None = Handshake({server.info.name: server.info})
        self.parser: RequestParser | None = None
        self.structured = False
        self.meta_context: dict[int, str] = {}
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.out: list[bytes | bytearray] = []
        self.flush_scheduled = False
        self.lost = False
        self.paused: set[str] = set()
        self.reading = True
        self.timer: asyncio.TimerHandle | None = None
        #: Requests parsed but not started: one chunk of bytes can hold
        #: thousands, and a READ's buffer is made when it starts.
        self.backlog: deque[Request] = deque()

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses.)
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        server = self.server
        if server.closing or len(server.connections) >= server.max_connections:
            log.info("nbd: refusing a connection (%s)", "closing" if server.closing else "full")
            self.lost = True
            transport.abort()
            return
        server.connections.add(self)
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        self.timer = self.loop.call_later(server.handshake_timeout, self._handshake_timeout)
        transport.write(Handshake.greeting())

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.out.clear()
        if self.timer is not None:
            self.timer.cancel()
        if self.backlog:
            # Nobody reads the answers now: only what changes the export
            # still runs (a flood of READs would keep the slot for nothing).
            self.backlog = deque(r for r in self.backlog if r.cmd in _CHANGES)
        self._settle()  # (the rest, held back for a full write buffer, goes on)

    def pause_writing(self) -> None:
        self._pause("writing")

    def resume_writing(self) -> None:
        self._resume("writing")
        if self.parser is None:
            self._handshake_more()
            return
        self._settle()

    def eof_received(self) -> bool | None:
        return None  # close our side too; requests in flight still finish

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return
        if self.parser is None:
            data = self._handshake_data(data)
            if not data:
                return
        assert self.parser is not None
        try:
            requests = self.parser.feed(data)
        except proto.ProtocolError as e:
            self._drop(str(e))
            return
        self.backlog.extend(requests)
        if self.parser.disconnected:
            self._pause("disconnect")
        self._settle()

    # -- handshake -----------------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> bytes:
        """Feed the handshake; return the bytes left for the transmission
        phase (empty while the handshake goes on)."""
        hs = self.handshake
        assert hs is not None
        assert self.transport is not None
        try:
            out = hs.receive(data, HANDSHAKE_TURN)
        except proto.ProtocolError as e:
            self._drop(str(e))
            return b""
        if out:
            self.transport.write(out)  # (may pause writing: see below)
        if hs.closed:
            self.transport.close()
            return b""
        if not hs.done:
            # Options left unanswered: read no more until they are, and
            # answer the next ones in a later turn -- after the client read
            # enough, if the write buffer is full (resume_writing).
            if hs.more:
                self._pause("handshake")
                if "writing" not in self.paused:
                    self.loop.call_soon(self._handshake_more)
            else:
                self._resume("handshake")
            return b""
        self._resume("handshake")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        assert hs.export is not None
        self.structured = hs.structured
        self.meta_context = hs.meta_context
        self.parser = RequestParser(hs.export.max_block)
        self.handshake = None
        return hs.leftover

    def _handshake_more(self) -> None:
        """Answer the options a turn left (see ``_handshake_data``)."""
        hs = self.handshake
        if hs is None or self.lost or not hs.more or hs.done or hs.closed:
            return
        self.data_received(b"")

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.parser is None:
            self._drop("handshake timed out")

    def _drop(self, why: str) -> None:
        log.info("nbd: dropping a connection: %s", why)
        if self.transport is not None and not self.lost:
            self.lost = True  # replies still to come go nowhere
            self.out.clear()
            self.transport.abort()

    # -- flow control --------------------------------------------------------------------

    def _pause(self, reason: str) -> None:
        self.paused.add(reason)
        if self.reading and not self.lost and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def _resume(self, reason: str) -> None:
        self.paused.discard(reason)
        if not self.paused and not self.reading and not self.lost and self.transport is not None:
            self.reading = True
            self.transport.resume_reading()

    def _settle(self) -> None:
        """Start what the backlog holds while the connection is under its
        limits (the transport's write buffer counts only while the client
        is there); once nothing is left: close after NBD_CMD_DISC, or let
        the server forget a lost connection."""
        backlog = self.backlog
        paused = self.paused
        while backlog and "in flight" not in paused and ("writing" not in paused or self.lost):
            self._dispatch(backlog.popleft())
        if self.in_flight == 0 and not backlog:
            if self.parser is not None and self.parser.disconnected:
                self._close_when_idle()
            if self.lost:
                self.server._gone(self)

    def _close_when_idle(self) -> None:
        if self.transport is not None and not self.lost:
            self._flush_out()
            self.transport.close()

    # -- replies -------------------------------------------------------------------------

    def _send(self, *data: bytes | bytearray) -> None:
        if self.lost:
            return
        self.out.extend(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self.flush_scheduled = False
        out = self.out
        if out and not self.lost and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _error(self, req: Request, err: int, message: str) -> None:
        self._send(proto.reply_error(req.handle, err, message, self.structured))

    # -- requests ------------------------------------------------------------------------

    def _begin(self, nbytes: int) -> None:
        self.in_flight += 1
        self.in_flight_bytes += nbytes
        if self.in_flight >= MAX_IN_FLIGHT or self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES:
            self._pause("in flight")

    def _end(self, nbytes: int) -> None:
        self.in_flight -= 1
        self.in_flight_bytes -= nbytes
        if "in flight" in self.paused and (
            self.in_flight < MAX_IN_FLIGHT // 2 and self.in_flight_bytes < MAX_IN_FLIGHT_BYTES // 2
        ):
            self._resume("in flight")
            self._settle()
        elif self.in_flight == 0:
            self._settle()
        if self.in_flight == 0:
            self.server._notify()

    def _dispatch(self, req: Request) -> None:
        server = self.server
        info = server.info
        cmd = req.cmd
        if cmd == _DISC:
            return
        err, message = proto.check_request(req, info, self.structured, self.meta_context)
        if err:
            self._error(req, err, message)
            return
        if server.closing:
            self._error(req, errno.ESHUTDOWN, "server shutting down")
            return
        try:
            self._submit(req)
        except Exception as e:  # the context is closing, or a bug: answer, don't crash
            log.exception("nbd: request %s failed to start", Cmd(cmd).name)
            self._error(req, errno.EIO, f"{type(e).__name__}: {e}")

    def _submit(self, req: Request) -> None:
        server = self.server
        ctx, fd = server.ctx, server.export.fd
        cmd, handle, offset, length = req.cmd, req.handle, req.offset, req.length
        if cmd == _READ:
            if length == 0:
                self._send(proto.reply_read_header(handle, offset, 0, self.structured))
                return
            pool = server.buffers
            structured = self.structured
            piece = None if pool is None else pool.get(length)
            buf = bytearray(length) if piece is None else piece[:length]

            def read_done(r: AioRequest) -> None:
                try:
                    err, _ = r.outcome()
                    if err:
                        self._error(req, err, os.strerror(err))
                    else:
                        header = proto.reply_read_header(handle, offset, length, structured)
                        # A pooled buffer is copied out now: it is reused at once.
                        self._send(header, buf if type(buf) is bytearray else bytes(buf))
                finally:
                    if piece is not None and pool is not None:
                        pool.put(piece)
                    self._end(length)

            ctx.read(fd, offset, buf, zero_fill=True, callback=read_done)
            self._begin(length)  # (after: a submission that raises begins nothing)
            return
        if length == 0 and cmd != _FLUSH:
            # Nothing to move (fallocate would refuse a zero length).
            self._send(proto.reply_ok(handle))
            return
        if cmd == _WRITE:
            payload = req.data
            assert payload is not None
            data: bytes | memoryview = payload
            callback = self._then_reply(req, length)
            pool = server.buffers
            if pool is not None:
                piece = pool.get(length)
                data = piece[:length]
                data[:] = payload
                reply = callback

                def recycle(r: AioRequest) -> None:
                    try:
                        reply(r)
                    finally:
                        pool.put(piece)

                callback = recycle
            ctx.write(fd, offset, data, callback=callback)
            self._begin(length)
            return
        done = self._then_reply(req, 0)
        if cmd == Cmd.FLUSH:
            ctx.flush(fd, callback=done)
        elif cmd == Cmd.TRIM:
            ctx.discard(fd, offset, length, callback=self._then_reply(req, 0, ok_unsupported=True))
        elif cmd == Cmd.WRITE_ZEROES:
            if req.flags & CmdFlag.NO_HOLE or not server.export.regular:
                ctx.write_zeroes(fd, offset, length, callback=done)
            else:
                # A punched hole reads as zeros in a regular file; where the
                # file system cannot punch, write zeros instead.
                def fallback() -> None:
                    self._follow(req, lambda: ctx.write_zeroes(fd, offset, length, callback=done))

                ctx.discard(fd, offset, length, callback=self._then_reply(req, 0, fallback))
        elif cmd == Cmd.CACHE:
            ctx.call(_prefetch, fd, offset, length, callback=done)
        else:  # BLOCK_STATUS (check_request let nothing else through)
            one = bool(req.flags & CmdFlag.REQ_ONE)
            regular = server.export.regular
            end = min(length, 2**32 - 1)

            def status_done(r: AioRequest) -> None:
                try:
                    err, _ = r.outcome()
                    if err:
                        self._error(req, err, os.strerror(err))
                        return
                    extents = cast(list[tuple[int, int]], r.result())
                    for ctx_id in self.meta_context:
                        self._send(proto.reply_block_status(handle, ctx_id, extents))
                finally:
                    self._end(0)

            ctx.call(allocation_extents, fd, offset, end, regular, one, callback=status_done)
        self._begin(0)

    def _follow(self, req: Request, submit: Callable[[], object]) -> None:
        """From a callback: start the next engine request of ``req``, or
        answer it with an error if that cannot start."""
        try:
            submit()
        except Exception as e:
            log.exception("nbd: a follow-up request failed to start")
            self._error(req, errno.EIO, f"{type(e).__name__}: {e}")
        else:
            self._begin(0)

    def _then_reply(
        self,
        req: Request,
        nbytes: int,
        on_unsupported: Callable[[], None] | None = None,
        *,
        ok_unsupported: bool = False,
    ) -> Callable[[AioRequest], None]:
        """The callback that answers ``req`` when its engine request
        completes (after a flush first, for FUA)."""
        fua = bool(req.flags & _FUA) and req.cmd in _FUA_COMMANDS

        def flushed(r: AioRequest) -> None:
            try:
                err, _ = r.outcome()
                if err:
                    self._error(req, err, os.strerror(err))
                else:
                    self._send(proto.reply_ok(req.handle))
            finally:
                self._end(0)

        # The reply (or the next step) before _end(): the connection may
        # close once nothing is in flight.
        def done(r: AioRequest) -> None:
            try:
                err, _ = r.outcome()
                if err == errno.ENOTSUP:
                    if on_unsupported is not None:
                        on_unsupported()
                        return
                    if ok_unsupported:
                        err = 0  # TRIM is advisory
                if err:
                    self._error(req, err, os.strerror(err))
                elif fua:
                    ctx, fd = self.server.ctx, self.server.export.fd
                    self._follow(req, lambda: ctx.flush(fd, callback=flushed))
                else:
                    self._send(proto.reply_ok(req.handle))
            finally:
                self._end(nbytes)

        return done


class NBDServer:
    """Serves one :class:`Export` to NBD clients from an asyncio event loop.

    Start it with :meth:`start_tcp` or :meth:`start_unix` (in the loop that
    will run it), stop it with :meth:`close`.  ``backend`` chooses the
    engine backend (``"auto"``, ``"threads"``, ``"io_uring"``).  At most
    ``max_connections`` clients are served at once; more are dropped as
    they connect.  The export's fd stays the caller's: close the export
    after :meth:`close`.
    """

    def __init__(
        self,
        export: Export,
        *,
        backend: str = "auto",
        max_connections: int = 16,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        if not handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be > 0, not {handshake_timeout}")
        self.export = export
        self.info = export.info
        self.backend = backend
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.connections: set[_Connection] = set()
        self.closing = False
        self.closed = False
        self._ctx: AioContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._changed: asyncio.Event | None = None
        #: Aligned READ/WRITE buffers, for an O_DIRECT export only.
        self.buffers = _AlignedBuffers() if export.direct else None

    @property
    def ctx(self) -> AioContext:
        assert self._ctx is not None, "the server is not started"
        return self._ctx

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the server is not started"
        return self._loop

    def _prepare(self) -> None:
        if self._server is not None or self.closing:
            raise RuntimeError("the server was already started")
        loop = asyncio.get_running_loop()
        ctx = AioContext(backend=self.backend)
        loop.add_reader(ctx.fileno(), ctx.process_completions)
        ctx.hold_submissions(loop.call_soon)
        self._loop, self._ctx = loop, ctx
        self._changed = asyncio.Event()

    def _release(self) -> None:
        ctx = self._ctx
        if ctx is not None and not ctx.closed:
            self.loop.remove_reader(ctx.fileno())
            ctx.close()

    async def start_tcp(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        """Listen on ``host:port`` (port 0: any free port; see :attr:`address`)."""
        self._prepare()
        try:
            self._server = await self.loop.create_server(
                lambda: _Connection(self), host, port, reuse_address=True
            )
        except BaseException:
            self._release()
            raise

    async def start_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on the unix socket ``path``."""
        self._prepare()
        try:
            self._server = await self.loop.create_unix_server(
                lambda: _Connection(self), os.fspath(path)
            )
        except BaseException:
            self._release()
            raise

    @property
    def address(self) -> Any:
        """The listening address: (host, port) for TCP, the path for unix."""
        assert self._server is not None, "the server is not started"
        return self._server.sockets[0].getsockname()

    def _gone(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        self._notify()

    def _notify(self) -> None:
        """A request finished or a connection went (for :meth:`close`)."""
        if self.closing and self._changed is not None:
            self._changed.set()

    async def _until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``done()`` (checked whenever a request finishes or a
        connection goes), or the loop time ``deadline``."""
        changed = self._changed
        assert changed is not None
        while not done():
            changed.clear()
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return done()
        return True

    async def close(self, timeout: float = 30.0) -> None:
        """Graceful shutdown: see the module docstring.  After ``timeout``
        seconds, connections with requests in flight, or whose clients do not
        read their last replies, are dropped.  If the image could not be
        flushed, OSError once everything is closed (as a file's close()
        raises when its flush failed): what clients wrote may be lost."""
        if self.closing:
            return
        self.closing = True
        if self._loop is None:  # never started
            self.closed = True
            return
        deadline = self.loop.time() + timeout
        err = 0
        if self._server is not None:
            self._server.close()
        try:
            for conn in list(self.connections):
                if conn.parser is None:
                    conn._drop("server shutting down")
                else:
                    conn._pause("shutdown")
            if not await self._until(
                lambda: all(c.in_flight == 0 for c in self.connections), deadline
            ):
                log.warning("nbd: requests still in flight after %s s: dropping", timeout)
            if not self.info.read_only:
                fut = self.loop.create_future()

                def flushed(r: AioRequest) -> None:
                    if not fut.done():
                        fut.set_result(r.outcome()[0])

                self.ctx.flush(self.export.fd, callback=flushed)
                err = await fut
            for conn in list(self.connections):
                conn._flush_out()
                if conn.transport is not None and not conn.lost:
                    conn.transport.close()  # after the replies still buffered
            if not await self._until(lambda: not self.connections, deadline):
                for conn in list(self.connections):
                    conn._drop("shutdown timed out")
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            if self._ctx is not None:
                # Anything still running finishes; its reply goes nowhere.
                self.ctx.drain(timeout)
            self._release()
            self.closed = True
        if err:
            # (Raised, not logged: ``nbd serve`` exits 1, not 0, when what
            # the clients wrote may not be on the disk.)
            raise OSError(err, f"{os.strerror(err)} (flushing at shutdown)", self.export.path)


async def serve(
    export: Export,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    socket_path: str | None = None,
    backend: str = "auto",
    max_connections: int = 16,
    stop: asyncio.Event | None = None,
    ready: Callable[[NBDServer], object] | None = None,
) -> None:
    """Serve ``export`` until ``stop`` is set (default: SIGINT or SIGTERM),
    then shut down gracefully (OSError if the image could not be flushed)."""
    import signal

    server = NBDServer(export, backend=backend, max_connections=max_connections)
    if socket_path is not None:
        await server.start_unix(socket_path)
    else:
        await server.start_tcp(host, port)
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        if ready is not None:
            ready(server)
        await stop.wait()
    finally:
        for handled_sig in handled:
            loop.remove_signal_handler(handled_sig)
        try:
            await server.close()
        finally:
            if socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path)
