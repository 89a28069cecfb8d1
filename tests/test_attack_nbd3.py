"""Attack round 3 on the NBD server, from raw sockets, on both engine
backends: request floods packed into one read of the socket (the server's
memory must stay bounded), clients that vanish with a backlog, odd ranges
and flags, and pipelined unaligned writes to an O_DIRECT export checked
against a model of the file."""

from __future__ import annotations

import os
import random
import socket
import struct
from pathlib import Path

import pytest

from threadlets.nbd import proto, server
from threadlets.nbd.proto import Cmd, CmdFlag
from threadlets.nbd.server import open_export
from threadlets.probe import O_DIRECT

from . import test_nbd_server
from .conftest import wait_until
from .test_nbd_server import Client, NBDError, ServerThread

SIZE = 1 << 20

# test_nbd_server's fixtures; served serves this module's image.
backend = test_nbd_server.backend
served = test_nbd_server.served


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "image.raw"
    p.write_bytes(bytes(range(256)) * (SIZE // 256))
    return p


@pytest.fixture
def peak(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[requests, bytes]: the most any connection had in flight, with the
    limits lowered (8 requests, 64 KiB) so a small burst goes past them."""
    monkeypatch.setattr(server, "MAX_IN_FLIGHT", 8)
    monkeypatch.setattr(server, "MAX_IN_FLIGHT_BYTES", 64 * 1024)
    seen = [0, 0]
    begin = server._Connection._begin

    def counting(self: server._Connection, nbytes: int) -> None:
        begin(self, nbytes)
        seen[0] = max(seen[0], self.in_flight)
        seen[1] = max(seen[1], self.in_flight_bytes)

    monkeypatch.setattr(server._Connection, "_begin", counting)
    return seen


def burst(c: Client, n: int, length: int, then: bytes = b"") -> None:
    """``n`` READs of ``length`` bytes (offsets cycling through the image),
    sent with one sendall: the server reads them in one or a few chunks."""
    out = []
    for k in range(n):
        handle = c.next_handle
        c.next_handle += 1
        c.read_lengths[handle] = length
        offset = (k * length) % (SIZE - length + 1)
        out.append(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, Cmd.READ, handle, offset, length))
    c.sock.sendall(b"".join(out) + then)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("length", [512, 16 * 1024])
def test_a_burst_of_reads_in_one_chunk_keeps_to_the_in_flight_limits(
    served: ServerThread, image: Path, peak: list[int], length: int
) -> None:
    """Every request parsed from a chunk was started at once, its buffer
    made: 28 bytes of READ asked for up to max_block bytes of memory, so
    one 256 KiB chunk could make a server allocate gigabytes.  The limits
    now hold per request (one request's buffer may go past the bytes)."""
    c = served.client(structured=False)
    n = 300
    burst(c, n, length)
    data = image.read_bytes()
    for _ in range(n):
        handle, err, payload, _ = c.reply()
        assert err == 0
        k = handle - 1
        offset = (k * length) % (SIZE - length + 1)
        assert payload == data[offset : offset + length]
    c.close()
    assert peak[0] <= 8
    assert peak[1] < 64 * 1024 + length


def test_disc_after_a_backlog_answers_all_of_it_first(
    served: ServerThread, peak: list[int]
) -> None:
    c = served.client(structured=True)
    disc = struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0)
    burst(c, 100, 4096, then=disc)
    handles = {c.reply()[0] for _ in range(100)}
    assert handles == set(range(1, 101))
    assert c.at_eof()
    c.close()
    assert peak[0] <= 8


def test_a_client_that_reads_nothing_and_leaves_is_forgotten(
    served: ServerThread, peak: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once it is gone its backlog (held back by the full write buffer)
    starts no more READs -- 2000 of them kept its slot busy reading for
    nobody -- and the server lets go of the connection: nothing leaks."""
    baseline = open_fds()
    started = [0]
    submit = server._Connection._submit

    def counting(self: server._Connection, req: proto.Request) -> None:
        started[0] += 1
        submit(self, req)

    monkeypatch.setattr(server._Connection, "_submit", counting)
    for _ in range(3):
        c = served.client(structured=False)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        burst(c, 2000, 64 * 1024)
        wait_until(lambda: any(not conn.reading for conn in list(served.server.connections)))
        c.close()
    wait_until(lambda: not served.server.connections)
    wait_until(lambda: open_fds() <= baseline)
    assert started[0] < 3 * 1000
    # (And the server still serves.)
    c = served.client()
    assert c.read(0, 4) == bytes(range(4))
    c.close()


def test_odd_requests_get_the_specs_errors(served: ServerThread, image: Path) -> None:
    before = image.read_bytes()
    c = served.client()
    cases = [
        (Cmd.READ, SIZE, 1, 0, 22),
        (Cmd.READ, 2**64 - 1, 1, 0, 22),
        (Cmd.READ, 1, SIZE, 0, 22),
        (Cmd.WRITE_ZEROES, SIZE - 1, 2, 0, 28),
        (Cmd.TRIM, SIZE, 1, 0, 22),
        (Cmd.CACHE, 0, 2**32 - 1, 0, 22),
        (Cmd.BLOCK_STATUS, SIZE, 0, 0, 22),
        (Cmd.BLOCK_STATUS, 0, 0, 0, 22),
        (Cmd.FLUSH, 1, 0, 0, 22),
        (8, 0, 0, 0, 22),
        (0xFFFF, 0, 4096, 0, 22),
        (Cmd.READ, 0, 1, 0x8000, 22),
        (Cmd.WRITE_ZEROES, 0, 1, CmdFlag.FAST_ZERO, 22),
        (Cmd.READ, 0, 2 << 20, 0, 22),  # over max_block
    ]
    for cmd, offset, length, flags, want in cases:
        handle = c.send(cmd, offset, length, flags)
        got, err, _, _ = c.reply()
        assert (got, err) == (handle, want), (cmd, offset, length, flags)
    # Odd but valid: a block status of one byte at the end, zero-length I/O.
    assert c.call(Cmd.BLOCK_STATUS, SIZE - 1, 1) == [(1, 0)]
    assert c.call(Cmd.BLOCK_STATUS, 1, SIZE - 1, CmdFlag.REQ_ONE) == [(SIZE - 1, 0)]
    assert c.read(SIZE, 0) == b""
    c.write(SIZE, b"")
    # A WRITE over the maximum: its payload is skipped, the connection goes on.
    with pytest.raises(NBDError) as e:
        c.write(0, b"x" * (2 << 20))
    assert e.value.errno == 22
    assert c.read(0, 4) == bytes(range(4))
    c.close()
    assert image.read_bytes() == before


@pytest.mark.skipif(not O_DIRECT, reason="needs O_DIRECT")
@pytest.mark.parametrize("seed", range(4))
def test_pipelined_unaligned_writes_to_a_direct_export_land_exactly(
    tmp_path: Path, backend: str, seed: int
) -> None:
    """Disjoint unaligned WRITE / WRITE_ZEROES ranges, all in flight at once
    (read-modify-writes of shared edge blocks), then read back: the image
    is the model, and its size (not a block multiple) is unchanged."""
    rnd = random.Random(seed)
    size = 3 * 4096 + 1234
    path = tmp_path / "direct.raw"
    path.write_bytes(bytes(size))
    try:
        export = open_export(path, direct=True)
    except OSError as e:  # (a file system without O_DIRECT: tmpfs)
        pytest.skip(f"O_DIRECT: {e}")
    st = ServerThread(export, backend=backend).start()
    try:
        c = st.client()
        model = bytearray(size)
        cuts = sorted(rnd.sample(range(1, size), 12))
        ranges = list(zip([0, *cuts], [*cuts, size], strict=True))
        rnd.shuffle(ranges)
        for a, b in ranges:
            if rnd.random() < 0.7:
                data = bytes(rnd.randrange(1, 256) for _ in range(b - a))
                c.send(Cmd.WRITE, a, b - a, rnd.choice([0, CmdFlag.FUA]), data)
                model[a:b] = data
            else:
                c.send(Cmd.WRITE_ZEROES, a, b - a, rnd.choice([0, CmdFlag.NO_HOLE]))
                model[a:b] = bytes(b - a)
        assert all(c.reply()[1] == 0 for _ in ranges)
        assert c.read(0, size) == bytes(model)
        c.close()
    finally:
        st.stop()
    assert path.read_bytes() == bytes(model)
