"""The NBD server (threadlets.nbd.server) in-process, on both engine
backends, driven by a small raw client over loopback: requests and their
replies, bad input, disconnects, timeouts, limits, graceful shutdown, and
the CLI's signal handling."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets.nbd import proto, server
from threadlets.nbd.proto import Cmd, CmdFlag, Opt, Rep
from threadlets.nbd.server import NBDServer, open_export, parse_bind
from threadlets.probe import PAGE_SIZE, pin_buffer

SIZE = 4 << 20
TIMEOUT = 10.0


def ring_available() -> bool:
    try:
        threadlets.AioContext(backend="io_uring").close()
    except threadlets.RingUnavailable:
        return False
    return True


BACKENDS = [
    "threads",
    pytest.param(
        "io_uring",
        marks=pytest.mark.skipif(not ring_available(), reason="io_uring unavailable here"),
    ),
]


class NBDError(OSError):
    pass


class Client:
    """A blocking NBD client: enough of the protocol to test the server."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        self.sock = sock
        self.structured = False
        self.size = 0
        self.flags = 0
        self.meta_id: int | None = None
        self.next_handle = 1
        self.read_lengths: dict[int, int] = {}

    @classmethod
    def connect(cls, address: Any) -> Client:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(TIMEOUT)
            sock.connect(address)
            return cls(sock)
        return cls(socket.create_connection(address[:2], timeout=TIMEOUT))

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += got
        return bytes(out)

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def greet(self) -> None:
        magic, ihaveopt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, ihaveopt) == (proto.NBDMAGIC, proto.IHAVEOPT)
        assert hflags == 3
        self.sock.sendall(struct.pack(">I", 3))

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.sock.sendall(struct.pack(">QII", proto.IHAVEOPT, option, len(data)) + data)
        out = []
        while True:
            magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
            assert magic == proto.OPT_REPLY_MAGIC
            assert opt == option
            out.append((rep, self.recv(length)))
            if rep == Rep.ACK or rep & (1 << 31):
                return out

    def handshake(self, name: str = "", structured: bool = True, meta: bool = True) -> None:
        self.greet()
        if structured:
            assert self.option(Opt.STRUCTURED_REPLY) == [(Rep.ACK, b"")]
            self.structured = True
        raw = name.encode()
        if structured and meta:
            q = proto.BASE_ALLOCATION.encode()
            data = struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(q)) + q
            got = self.option(Opt.SET_META_CONTEXT, data)
            assert got[-1][0] == Rep.ACK
            self.meta_id = struct.unpack(">I", got[0][1][:4])[0]
        got = self.option(Opt.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, 3))
        assert got[-1][0] == Rep.ACK, got
        for rep, data in got:
            if rep == Rep.INFO and struct.unpack(">H", data[:2])[0] == 0:
                self.size, self.flags = struct.unpack(">QH", data[2:])

    def send(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> int:
        handle = self.next_handle
        self.next_handle += 1
        if cmd == Cmd.READ:
            self.read_lengths[handle] = length
        header = struct.pack(">IHHQQI", proto.REQUEST_MAGIC, flags, cmd, handle, offset, length)
        self.sock.sendall(header + data)
        return handle

    def reply(self) -> tuple[int, int, bytes, list[tuple[int, int]]]:
        """(handle, error, data, extents) of the next reply."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == proto.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", self.recv(12))
            length = self.read_lengths.pop(handle, 0)
            data = self.recv(length) if length and not err else b""
            return handle, err, data, []
        assert magic == proto.STRUCTURED_REPLY_MAGIC, hex(magic)
        data = bytearray()
        extents: list[tuple[int, int]] = []
        err = 0
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(length)
            if rtype == proto.ReplyType.OFFSET_DATA:
                data += payload[8:]
            elif rtype == proto.ReplyType.BLOCK_STATUS:
                assert struct.unpack(">I", payload[:4])[0] == self.meta_id
                extents += [
                    struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)
                ]
            elif rtype & 0x8000:
                err = struct.unpack(">I", payload[:4])[0]
            if flags & proto.REPLY_FLAG_DONE:
                self.read_lengths.pop(handle, None)
                return handle, err, bytes(data), extents
            magic = struct.unpack(">I", self.recv(4))[0]
            assert magic == proto.STRUCTURED_REPLY_MAGIC

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""):  # type: ignore[no-untyped-def]
        handle = self.send(cmd, offset, length, flags, data)
        got, err, payload, extents = self.reply()
        assert got == handle
        if err:
            raise NBDError(err, os.strerror(err))
        return payload if cmd == Cmd.READ else extents

    def read(self, offset: int, length: int) -> bytes:
        data: bytes = self.call(Cmd.READ, offset, length)
        return data

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.call(Cmd.WRITE, offset, len(data), flags, data)


class ServerThread:
    """An NBDServer running in its own event loop thread."""

    def __init__(
        self, export: server.Export, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        self.export = export
        self.loop = loop if loop is not None else asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(ctx))
        self.server = NBDServer(export, **kwargs)
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-test-loop")
        self.thread.start()

    def run(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self, unix: str | None = None) -> ServerThread:
        if unix is None:
            self.run(self.server.start_tcp("127.0.0.1", 0)).result(TIMEOUT)
        else:
            self.run(self.server.start_unix(unix)).result(TIMEOUT)
        return self

    @property
    def address(self) -> Any:
        return self.server.address

    def client(self, **handshake: Any) -> Client:
        c = Client.connect(self.address)
        c.handshake(**handshake)
        return c

    def stop(self) -> None:
        try:
            if not self.server.closing:
                self.run(self.server.close(TIMEOUT)).result(TIMEOUT * 2)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()
            self.export.close()
        assert not self.errors, self.errors


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "image.raw"
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return p


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def served(image: Path, backend: str, caplog: pytest.LogCaptureFixture) -> Iterator[ServerThread]:
    caplog.set_level(logging.WARNING, logger="threadlets")
    st = ServerThread(open_export(image, max_block=1 << 20), backend=backend).start()
    try:
        yield st
    finally:
        st.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


# -- requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False])
def test_write_then_read_back(served: ServerThread, image: Path, structured: bool) -> None:
    c = served.client(structured=structured, meta=structured)
    try:
        assert c.size == SIZE
        assert c.flags & proto.TxFlag.CAN_MULTI_CONN
        data = pattern(65536, 3)
        c.write(4096, data)
        assert c.read(4096, 65536) == data
        assert c.read(0, 4096) == bytes(4096)
        assert c.read(4096, 0) == b""
        with open(image, "rb") as f:
            f.seek(4096)
            assert f.read(65536) == data
    finally:
        c.close()


def test_many_requests_in_flight_each_answered_once(served: ServerThread) -> None:
    """More requests than the per-connection limit, pipelined: every one is
    answered exactly once, by handle, whatever the order."""
    c = served.client()
    try:
        n = server.MAX_IN_FLIGHT * 3
        expected: dict[int, bytes | None] = {}
        for i in range(n):
            off = (i % 64) * 4096
            if i < 64:
                expected[c.send(Cmd.WRITE, off, 4096, data=pattern(4096, i))] = None
        got = {}
        for _ in range(64):
            handle, err, _, _ = c.reply()
            assert err == 0
            got[handle] = None
        for i in range(64, n):
            off = (i % 64) * 4096
            expected[c.send(Cmd.READ, off, 4096)] = pattern(4096, i % 64)
        for _ in range(64, n):
            handle, err, data, _ = c.reply()
            assert err == 0
            assert handle not in got
            got[handle] = data
        assert got == expected
    finally:
        c.close()


def test_bad_requests_get_errors_and_the_connection_goes_on(
    served: ServerThread, image: Path
) -> None:
    c = served.client()
    try:
        cases = [
            ((Cmd.READ, SIZE - 512, 1024), errno.EINVAL),
            ((Cmd.READ, 2**64 - 512, 512), errno.EINVAL),
            ((Cmd.WRITE, SIZE, 512, 0, bytes(512)), errno.ENOSPC),
            ((Cmd.WRITE_ZEROES, SIZE - 1, 2), errno.ENOSPC),
            ((Cmd.TRIM, SIZE, 1), errno.EINVAL),
            ((42, 0, 0), errno.EINVAL),
            ((Cmd.READ, 0, 512, 0x40), errno.EINVAL),
            ((Cmd.FLUSH, 0, 512), errno.EINVAL),
            ((Cmd.READ, 0, (1 << 20) + 1), errno.EINVAL),
            ((Cmd.WRITE, 0, (1 << 20) + 1, 0, b"\xee" * ((1 << 20) + 1)), errno.EINVAL),
        ]
        for args, want in cases:
            with pytest.raises(NBDError) as e:
                c.call(*args)
            assert e.value.errno == want, args
        assert c.read(0, 512) == bytes(512)
        assert os.path.getsize(image) == SIZE
        assert b"\xee" not in image.read_bytes()
    finally:
        c.close()


def test_simple_replies_carry_errors_without_payload(served: ServerThread) -> None:
    c = served.client(structured=False)
    try:
        with pytest.raises(NBDError) as e:
            c.read(SIZE, 512)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(NBDError) as e:
            c.call(Cmd.BLOCK_STATUS, 0, 512)
        assert e.value.errno == errno.EINVAL
        assert c.read(0, 16) == bytes(16)
    finally:
        c.close()


def test_read_only_export(image: Path, backend: str) -> None:
    image.write_bytes(pattern(SIZE))
    st = ServerThread(open_export(image, read_only=True), backend=backend).start()
    try:
        c = st.client()
        assert c.flags & proto.TxFlag.READ_ONLY
        assert not c.flags & proto.TxFlag.SEND_TRIM
        for args in [
            (Cmd.WRITE, 0, 512, 0, bytes(512)),
            (Cmd.TRIM, 0, 512),
            (Cmd.WRITE_ZEROES, 0, 512),
        ]:
            with pytest.raises(NBDError) as e:
                c.call(*args)
            assert e.value.errno == errno.EPERM
        assert c.read(0, 4096) == pattern(4096)
        c.call(Cmd.FLUSH)
        c.close()
    finally:
        st.stop()
    assert image.read_bytes() == pattern(SIZE)


def test_trim_write_zeroes_fua_flush_cache(served: ServerThread, image: Path) -> None:
    c = served.client()
    try:
        data = pattern(1 << 20, 5)
        c.write(0, data, flags=CmdFlag.FUA)
        c.call(Cmd.FLUSH)
        c.call(Cmd.TRIM, 0, 65536, CmdFlag.FUA)
        assert c.read(0, 65536) == bytes(65536)  # a punched hole (ext4, xfs, tmpfs)
        c.call(Cmd.WRITE_ZEROES, 65536, 4096)
        c.call(Cmd.WRITE_ZEROES, 2 * 65536 + 1, 4095, CmdFlag.NO_HOLE | CmdFlag.FUA)
        assert c.read(65536, 4096) == bytes(4096)
        base = 2 * 65536
        assert c.read(base, 4097) == data[base : base + 1] + bytes(4095) + data[base + 4096 :][:1]
        assert c.read(3 * 65536, 4096) == data[3 * 65536 : 3 * 65536 + 4096]
        c.call(Cmd.CACHE, 0, 1 << 20)
        c.call(Cmd.CACHE, 0, 1 << 20, CmdFlag.FUA)
    finally:
        c.close()
    assert os.path.getsize(image) == SIZE


def test_zero_length_requests_succeed_without_touching_the_file(
    served: ServerThread, image: Path
) -> None:
    c = served.client()
    try:
        for cmd in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE):
            assert not c.call(cmd, SIZE, 0, CmdFlag.FUA if cmd != Cmd.READ else 0)
        with pytest.raises(NBDError) as e:
            c.call(Cmd.BLOCK_STATUS, 0, 0)
        assert e.value.errno == errno.EINVAL
    finally:
        c.close()
    assert os.path.getsize(image) == SIZE


def test_a_request_the_engine_refuses_is_answered_and_not_left_in_flight(
    served: ServerThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the AioContext is closed")

    c = served.client()
    try:
        monkeypatch.setattr(served.server.ctx, "read", refuse)
        with pytest.raises(NBDError) as e:
            c.read(0, 512)
        assert e.value.errno == errno.EIO
        monkeypatch.undo()
        assert c.read(0, 512) == bytes(512)
        c.send(Cmd.DISC)
        assert c.at_eof()  # nothing counted in flight: DISC closes at once
    finally:
        c.close()
    assert "failed to start" in caplog.text
    caplog.clear()  # the one error logged on purpose


def test_block_status_reports_holes_and_data(served: ServerThread) -> None:
    c = served.client()
    try:
        c.write(1 << 20, pattern(65536))
        extents = c.call(Cmd.BLOCK_STATUS, 0, 2 << 20)
        assert sum(n for n, _ in extents) == 2 << 20
        hole = proto.STATE_HOLE | proto.STATE_ZERO
        assert extents[0] == (1 << 20, hole)
        assert extents[1][1] == 0
        assert extents[-1][1] == hole
        assert c.call(Cmd.BLOCK_STATUS, 0, 2 << 20, CmdFlag.REQ_ONE) == [(1 << 20, hole)]
        assert c.call(Cmd.BLOCK_STATUS, 1 << 20, 4096, CmdFlag.REQ_ONE) == [(4096, 0)]
        with pytest.raises(NBDError):
            c.call(Cmd.BLOCK_STATUS, SIZE - 512, 1024)
    finally:
        c.close()


def test_block_status_without_a_meta_context_is_einval(served: ServerThread) -> None:
    c = served.client(meta=False)
    try:
        with pytest.raises(NBDError) as e:
            c.call(Cmd.BLOCK_STATUS, 0, 4096)
        assert e.value.errno == errno.EINVAL
    finally:
        c.close()


def test_allocation_extents_on_a_block_device_says_allocated() -> None:
    assert server.allocation_extents(-1, 0, 8192, regular=False) == [(8192, 0)]


# -- disconnects, garbage, limits ---------------------------------------------------------------


def test_disc_answers_outstanding_requests_then_closes(served: ServerThread, image: Path) -> None:
    c = served.client()
    try:
        handles = {c.send(Cmd.WRITE, i * 4096, 4096, data=pattern(4096, i)) for i in range(16)}
        c.send(Cmd.DISC)
        got = {c.reply()[0] for _ in range(16)}
        assert got == handles
        assert c.at_eof()
    finally:
        c.close()
    with open(image, "rb") as f:
        for i in range(16):
            assert f.read(4096) == pattern(4096, i)


def test_client_vanishing_mid_request_writes_nothing_and_hurts_no_one(
    served: ServerThread, image: Path
) -> None:
    c = served.client()
    header = struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 65536)
    c.sock.sendall(header + b"\xab" * 1000)  # the payload never finishes
    c.close()
    c = served.client()
    for i in range(100):  # requests in flight when the client goes
        c.send(Cmd.WRITE if i % 2 else Cmd.READ, 8192 * i, 4096, data=b"\xcd" * 4096 * (i % 2))
    c.sock.shutdown(socket.SHUT_WR)
    c.close()
    c = served.client()
    try:
        assert c.read(0, 1000) == bytes(1000)
    finally:
        c.close()
    assert b"\xab" not in image.read_bytes()


def test_bad_magic_drops_only_that_connection(served: ServerThread) -> None:
    bad = served.client()
    good = served.client()
    try:
        bad.sock.sendall(b"\0" * 28)
        assert bad.at_eof()
        assert good.read(0, 512) == bytes(512)
    finally:
        bad.close()
        good.close()


def test_garbage_during_the_handshake_drops_the_connection(served: ServerThread) -> None:
    c = Client.connect(served.address)
    try:
        c.recv(18)
        c.sock.sendall(struct.pack(">I", 0x80))  # unknown client flags
        assert c.at_eof()
    finally:
        c.close()


def test_idle_handshake_times_out(image: Path) -> None:
    st = ServerThread(open_export(image), backend="threads", handshake_timeout=1.0).start()
    try:
        done = st.client()  # finished its handshake: no timeout applies any more
        idle = Client.connect(st.address)
        slow = Client.connect(st.address)  # sends, but never finishes
        idle.recv(18)
        slow.greet()
        slow.sock.sendall(struct.pack(">QI", proto.IHAVEOPT, Opt.GO))
        assert idle.at_eof()  # dropped after 1 s (the socket would wait 10 s)
        assert slow.at_eof()
        idle.close()
        slow.close()
        assert done.read(0, 16) == bytes(16)
        done.close()
    finally:
        st.stop()


def test_max_connections(image: Path) -> None:
    st = ServerThread(open_export(image), backend="threads", max_connections=1).start()
    try:
        first = st.client()
        second = Client.connect(st.address)
        assert second.at_eof()
        second.close()
        assert first.read(0, 16) == bytes(16)
        first.close()
    finally:
        st.stop()


def test_unix_socket(image: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    st = ServerThread(open_export(image), backend="threads").start(unix=path)
    try:
        c = st.client()
        c.write(0, b"unix")
        assert c.read(0, 4) == b"unix"
        c.close()
    finally:
        st.stop()


def test_uvloop(image: Path, backend: str) -> None:
    uvloop = pytest.importorskip("uvloop")
    st = ServerThread(open_export(image), loop=uvloop.new_event_loop(), backend=backend).start()
    try:
        c = st.client()
        c.write(0, b"uvloop")
        assert c.read(0, 6) == b"uvloop"
        c.close()
    finally:
        st.stop()


def test_several_clients_at_once(served: ServerThread, image: Path) -> None:
    """CAN_MULTI_CONN: clients writing disjoint ranges at once, each reading
    back its own and, after a flush, everyone's."""
    n = 4
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def worker(k: int) -> None:
        try:
            c = served.client()
            barrier.wait(TIMEOUT)
            for i in range(32):
                c.send(Cmd.WRITE, (k * 32 + i) * 4096, 4096, data=pattern(4096, k * 32 + i))
            for _ in range(32):
                assert c.reply()[1] == 0
            c.call(Cmd.FLUSH)
            for i in range(32):
                assert c.read((k * 32 + i) * 4096, 4096) == pattern(4096, k * 32 + i)
            c.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors, errors
    with open(image, "rb") as f:
        for j in range(n * 32):
            assert f.read(4096) == pattern(4096, j)


def test_fuzz_the_live_server(image: Path) -> None:
    """Random, truncated and mangled bytes after a good handshake: the server
    answers or drops that connection, keeps serving others, and never writes
    outside the export."""
    from hypothesis import HealthCheck, given, settings

    from tests.test_nbd import _valid_requests, mangled

    st = ServerThread(open_export(image, max_block=1 << 16), backend="threads").start()
    try:

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(data=mangled(_valid_requests))
        def feed(data: bytes) -> None:
            c = st.client()
            try:
                c.sock.sendall(data)
            except OSError:
                pass  # dropped while we were still sending: that is an answer too
            finally:
                c.close()

        feed()
        c = st.client()
        c.write(0, b"still here")
        assert c.read(0, 10) == b"still here"
        c.close()
    finally:
        st.stop()
    assert os.path.getsize(image) == SIZE


# -- shutdown ----------------------------------------------------------------------------------


def test_shutdown_finishes_requests_in_flight(
    image: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close(): stop accepting and reading, drop handshakes, answer what is
    in flight, then close."""
    started, release = threading.Event(), threading.Event()
    real = server.allocation_extents

    def gated(*args: Any) -> list[tuple[int, int]]:
        started.set()
        assert release.wait(TIMEOUT)
        return real(*args)

    monkeypatch.setattr(server, "allocation_extents", gated)
    st = ServerThread(open_export(image), backend=backend).start()
    address = st.address
    c = st.client()
    pending = Client.connect(address)
    try:
        c.write(0, b"before")
        pending.recv(18)  # the greeting: the server has it
        handle = c.send(Cmd.BLOCK_STATUS, 0, 4096)
        assert started.wait(TIMEOUT)
        closing = st.run(st.server.close(TIMEOUT))
        assert pending.at_eof()  # still in the handshake: dropped
        release.set()
        got, err, _, extents = c.reply()
        assert (got, err) == (handle, 0)
        assert extents
        assert c.at_eof()
        closing.result(TIMEOUT)
        with pytest.raises(OSError):
            Client.connect(address).close()
    finally:
        release.set()
        c.close()
        pending.close()
        st.stop()
    assert image.read_bytes()[:6] == b"before"


def test_server_start_failures_and_closing_an_unstarted_server(image: Path) -> None:
    export = open_export(image)
    try:
        with pytest.raises(ValueError, match="max_connections"):
            NBDServer(export, max_connections=0)
        srv = NBDServer(export)
        asyncio.run(srv.close())
        assert srv.closed

        async def port_in_use() -> None:
            first = NBDServer(export, backend="threads")
            await first.start_tcp("127.0.0.1", 0)
            second = NBDServer(export, backend="threads")
            try:
                with pytest.raises(OSError):
                    await second.start_tcp("127.0.0.1", first.address[1])
            finally:
                await first.close()

        asyncio.run(port_in_use())
    finally:
        export.close()


def test_shutdown_drops_a_client_that_reads_no_replies(image: Path) -> None:
    st = ServerThread(open_export(image, max_block=1 << 20), backend="threads").start()
    c = st.client()
    try:
        for _ in range(64):  # 64 MiB of replies that are never read
            c.send(Cmd.READ, 0, 1 << 20)
        assert c.read_lengths
        st.run(st.server.close(0.5)).result(TIMEOUT)
        assert st.server.closed
        assert not st.server.connections
    finally:
        c.close()
        st.stop()


def _serve_cli(image: Path, sock: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "threadlets.cli", "nbd", "serve", str(image)),
            *("--socket", str(sock), "--export-name", "disk", "--backend", "threads"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "serving ...": the socket is listening
    assert "serving" in line, line + proc.stderr.read()
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_stops_gracefully_on_signals(image: Path, tmp_path: Path, sig: int) -> None:
    sock = tmp_path / "nbd.sock"
    proc = _serve_cli(image, sock)
    try:
        c = Client.connect(str(sock))
        c.handshake(name="disk")
        c.write(512, b"persisted", flags=CmdFlag.FUA)
        proc.send_signal(sig)
        assert proc.wait(TIMEOUT) == 0
        assert c.at_eof()
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert not sock.exists()
    with open(image, "rb") as f:
        f.seek(512)
        assert f.read(9) == b"persisted"


def test_cli_reports_a_missing_image(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "threadlets.cli", "nbd", "serve", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        check=False,
        timeout=TIMEOUT,
    )
    assert out.returncode == 1
    assert "No such file" in out.stderr


def test_cli_refuses_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    from threadlets import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["nbd", "serve", "image", "--bind", "host:port"])
    assert e.value.code == 2
    assert "bad port" in capsys.readouterr().err
    assert cli.main(["nbd"]) == 2


# -- exports and addresses ---------------------------------------------------------------------


def test_open_export_rejects_other_file_types(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        open_export(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening it O_RDWR cannot block
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            open_export(fifo)
    finally:
        os.close(fd)


def test_direct_export_advertises_its_alignment_and_serves_unaligned_io(
    image: Path, backend: str
) -> None:
    image.write_bytes(pattern(SIZE))  # allocated: O_DIRECT alignment can be probed
    try:
        export = open_export(image, direct=True)
    except OSError as e:
        pytest.skip(f"no O_DIRECT here: {e}")
    info = export.info
    assert info.min_block in (1, 512, 1024, 2048, 4096)
    assert info.preferred_block % info.min_block == 0
    st = ServerThread(export, backend=backend).start()
    try:
        c = st.client()
        c.write(1000, b"unaligned")  # the engine bounces what O_DIRECT refuses
        assert c.read(999, 11) == pattern(SIZE)[999:1000] + b"unaligned" + pattern(SIZE)[1009:1010]
        c.close()
    finally:
        st.stop()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:10809", ("127.0.0.1", 10809)),
        (":0", ("127.0.0.1", 0)),
        ("localhost", ("localhost", 10809)),
        ("[::1]:1234", ("::1", 1234)),
        ("::1", ("::1", 10809)),
    ],
)
def test_parse_bind(text: str, want: tuple[str, int]) -> None:
    assert parse_bind(text) == want


@pytest.mark.parametrize("text", ["a:b", "1.2.3.4:70000", "[::1", "[::1]x"])
def test_parse_bind_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"port|address"):
        parse_bind(text)


def test_direct_reads_and_writes_use_aligned_reused_buffers(image: Path, backend: str) -> None:
    """O_DIRECT cannot use a bytearray's memory: each READ/WRITE of a direct
    export hands the engine a page-aligned buffer (so it can go to the ring,
    not through a worker's bounce buffer), and reusing those buffers never
    mixes up two requests' data."""
    image.write_bytes(pattern(SIZE))
    try:
        export = open_export(image, direct=True)
    except OSError as e:
        pytest.skip(f"no O_DIRECT here: {e}")
    st = ServerThread(export, backend=backend).start()
    ctx = st.server.ctx
    addresses: list[int] = []

    def recording(method: Any) -> Any:
        def call(fd: int, offset: int, buf: Any, **kwargs: Any) -> Any:
            pinned = pin_buffer(buf)
            addresses.append(-1 if pinned is None else pinned[0])
            return method(fd, offset, buf, **kwargs)

        return call

    try:
        ctx.read = recording(ctx.read)  # type: ignore[method-assign]
        ctx.write = recording(ctx.write)  # type: ignore[method-assign]
        c = st.client(structured=True)
        try:
            blocks = {i: pattern(4096, i) for i in range(48)}
            handles = {c.send(Cmd.WRITE, i * 4096, 4096, data=d): i for i, d in blocks.items()}
            for _ in handles:
                assert c.reply()[1] == 0
            for _ in range(2):  # twice: the second round reuses the first's buffers
                reads = {c.send(Cmd.READ, i * 4096, 4096): i for i in blocks}
                for _ in reads:
                    handle, err, data, _ = c.reply()
                    assert err == 0
                    assert data == blocks[reads[handle]]
        finally:
            c.close()
    finally:
        st.stop()
    assert len(addresses) == 48 * 3
    assert all(a % PAGE_SIZE == 0 for a in addresses), addresses
