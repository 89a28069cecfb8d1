"""``threadlets stress``'s proof, through NBD: a random, data-verifying
read/write workload driven by libnbd against the server, on both engine
backends, cached and ``--direct``, with 0 mismatches.

The harness is stress's model in small (see :mod:`threadlets.stress`): a
shadow copy holds what every byte must be once every acknowledged write
landed; operations (reads, writes with and without FUA, trims, write-zeroes
with and without NO_HOLE, caches, flushes) of random unaligned offsets and
lengths are drawn from a seed and issued in order, up to DEPTH in flight,
an operation that overlaps one in flight waits for it unless both are
reads.  So a read has exactly one right answer when it is issued, and is
checked against the shadow when it completes.  A trim may or may not
discard (the spec makes it advisory): a trimmed byte may read as its old
value or as zero until something writes it.  At the end the whole export
is read back through NBD and the image file is compared with the shadow.  A run lasts SECONDS and
at least MIN_OPS operations.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.test_nbd_libnbd import connect, need_nbd, remove_socket, serve
from tests.test_nbd_server import BACKENDS

SIZE = 4 << 20
DEPTH = 32
MAX_LEN = 32 << 10
SECONDS = 1.0
#: ... and at least this many operations, however slow the machine is (the
#: first MIN_OPS of a seed's sequence are the same every run).
MIN_OPS = 600
#: kind -> weight
MIX = {
    "read": 40,
    "write": 25,
    "write_fua": 5,
    "trim": 6,
    "zero": 6,
    "zero_no_hole": 6,
    "cache": 4,
    "flush": 2,
}
WRITES = {"write", "write_fua", "trim", "zero", "zero_no_hole"}


@dataclass
class Op:
    n: int
    kind: str
    offset: int
    length: int
    data: bytes = b""
    buf: Any = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    def conflicts(self, other: Op) -> bool:
        writes = self.kind in WRITES or other.kind in WRITES
        return writes and self.offset < other.end and other.offset < self.end


@dataclass
class Harness:
    """One libnbd connection, the shadow, and what the run found."""

    h: Any
    seed: int
    shadow: bytearray
    #: 1 where a trim may have left zeros instead of the shadow's byte.
    trimmed: bytearray = field(default_factory=lambda: bytearray(SIZE))
    ops: int = 0
    verified_reads: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    def generate(self) -> Iterator[Op]:
        rng = random.Random(self.seed)
        kinds, weights = list(MIX), list(MIX.values())
        for n in range(1 << 62):
            kind = rng.choices(kinds, weights)[0]
            if kind == "flush":
                yield Op(n, kind, 0, 0)
                continue
            length = rng.randrange(1, MAX_LEN)
            offset = rng.randrange(SIZE - length + 1)
            data = rng.randbytes(length) if kind in ("write", "write_fua") else b""
            yield Op(n, kind, offset, length, data)

    def issue(self, op: Op) -> int:
        nbd = need_nbd()
        h, kind = self.h, op.kind
        if kind == "read":
            op.buf = nbd.Buffer(op.length)
            return int(h.aio_pread(op.buf, op.offset))
        if kind in ("write", "write_fua"):
            op.buf = nbd.Buffer.from_bytearray(op.data)
            flags = nbd.CMD_FLAG_FUA if kind == "write_fua" else 0
            return int(h.aio_pwrite(op.buf, op.offset, flags=flags))
        if kind == "trim":
            return int(h.aio_trim(op.length, op.offset))
        if kind in ("zero", "zero_no_hole"):
            flags = nbd.CMD_FLAG_NO_HOLE if kind == "zero_no_hole" else 0
            return int(h.aio_zero(op.length, op.offset, flags=flags))
        if kind == "cache":
            return int(h.aio_cache(op.length, op.offset))
        return int(h.aio_flush())

    def check(self, offset: int, found: bytes | bytearray, what: str) -> None:
        """``found`` at ``offset`` against the shadow; one line per mismatch."""
        want = self.shadow[offset : offset + len(found)]
        if found == want:
            return
        for i, (w, f) in enumerate(zip(want, found, strict=True)):
            if w != f and not (f == 0 and self.trimmed[offset + i]):
                self.mismatches.append(
                    f"{what}: byte {offset + i}: expected {w:#04x}, found {f:#04x} (seed {self.seed})"
                )
                return

    def retire(self, op: Op) -> None:
        self.ops += 1
        self.by_kind[op.kind] = self.by_kind.get(op.kind, 0) + 1
        if op.kind == "read":
            self.check(op.offset, op.buf.to_bytearray(), f"read #{op.n}")
            self.verified_reads += 1
        elif op.kind in ("write", "write_fua"):
            self.shadow[op.offset : op.end] = op.data
        elif op.kind in ("zero", "zero_no_hole"):
            self.shadow[op.offset : op.end] = bytes(op.length)
        if op.kind == "trim":
            self.trimmed[op.offset : op.end] = b"\x01" * op.length
        elif op.kind in WRITES:
            self.trimmed[op.offset : op.end] = bytes(op.length)

    def run(self, seconds: float, min_ops: int = 0) -> None:
        deadline = time.monotonic() + seconds
        ops = self.generate()
        pending: Op | None = None
        inflight: dict[int, Op] = {}
        issued = 0
        while True:
            stopping = issued >= min_ops and time.monotonic() >= deadline
            while not stopping and len(inflight) < DEPTH:
                op = pending if pending is not None else next(ops)
                if any(op.conflicts(o) for o in inflight.values()):
                    pending = op  # issued in order: it waits for what it overlaps
                    break
                pending = None
                inflight[self.issue(op)] = op
                issued += 1
            if not inflight:
                return
            self.h.poll(10_000)
            for cookie in [c for c in inflight if self.h.aio_command_completed(c)]:
                self.retire(inflight.pop(cookie))

    def verify_all(self) -> None:
        """Read the whole export back through NBD."""
        step = 1 << 20
        for off in range(0, SIZE, step):
            self.check(off, self.h.pread(step, off), "final read")


def stress(image: Path, backend: str, direct: bool, seed: int) -> Harness:
    nbd = need_nbd()
    initial = random.Random(-seed).randbytes(SIZE)
    image.write_bytes(initial)
    try:
        st, sock = serve(image, backend, direct=direct)
    except OSError as e:  # (the O_DIRECT open)
        pytest.skip(f"O_DIRECT refused here: {e}")
    try:
        h = connect(sock)
        try:
            if direct:  # requests of any alignment, as stress makes them
                assert h.get_block_size(nbd.SIZE_MINIMUM) > 1
                h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
            harness = Harness(h, seed, bytearray(initial))
            harness.run(SECONDS, MIN_OPS)
            h.flush()
            harness.verify_all()
        finally:
            h.shutdown()
    finally:
        st.stop()
        remove_socket(sock)
    harness.check(0, image.read_bytes(), "image file")
    return harness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
def test_stress_through_nbd_has_no_mismatches(tmp_path: Path, backend: str, direct: bool) -> None:
    need_nbd()
    # /tmp may be tmpfs, which refuses O_DIRECT: a direct image goes on /var/tmp.
    with tempfile.TemporaryDirectory(dir="/var/tmp" if direct else tmp_path) as d:
        harness = stress(Path(d) / "image.raw", backend, direct, seed=15)
    assert not harness.mismatches, "\n".join(harness.mismatches[:10])
    assert harness.ops >= MIN_OPS
    assert set(harness.by_kind) == set(MIX), harness.by_kind


def test_the_harness_sees_a_byte_changed_behind_its_back(tmp_path: Path) -> None:
    need_nbd()
    image = tmp_path / "img.raw"
    image.write_bytes(bytes(SIZE))
    st, sock = serve(image, "threads")
    try:
        h = connect(sock)
        try:
            harness = Harness(h, 1, bytearray(SIZE))
            harness.run(0.1)
            pos = harness.trimmed.index(0, 12345)
            with open(image, "r+b") as f:
                f.seek(pos)
                f.write(bytes([harness.shadow[pos] ^ 0xFF]))
            harness.verify_all()
        finally:
            h.shutdown()
    finally:
        st.stop()
        remove_socket(sock)
    assert len(harness.mismatches) == 1
    assert f"byte {pos}:" in harness.mismatches[0]
