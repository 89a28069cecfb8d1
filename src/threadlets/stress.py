"""``threadlets stress``: hammer a file through the engine and prove that no
byte was lost or misplaced.

This module owns the stress tester: the operation generator, the shadow
model that knows what every byte must be (in the spirit of fsx), the
scheduler that keeps ``concurrency`` requests in flight, and the report.

The model
=========

``model`` holds what the file must contain if every acknowledged write
landed.  Every read is compared with it.  What concurrency leaves open is
tracked, not guessed:

* A cancel that answered CANCELED never happened: the model ignores the
  request, and later reads prove the file never saw it.  NOTCANCELED and
  ALLDONE requests happened.
* Writes (and discards, write-zeroes) that overlap while both are in flight
  may land in either order: the overlap becomes *uncertain*, and a byte
  there may hold either writer's value until a later write covers it.  A
  write that failed (injected EIO/ENOSPC) may have landed in part: its range
  may hold its new value or the old one.
* Reads are never in flight together with a write to the same bytes, and
  truncates run alone, so a read has exactly one right answer outside the
  uncertain bytes.

Write data is a per-operation 256-byte pattern repeated, so the value any
write gives any byte can be recomputed when a byte is checked.

Reproducibility: the operation sequence is drawn from the seed alone, and
operations are issued in sequence order (an operation that conflicts with
one in flight waits for it), so the same seed and ``--ops`` replay the same
operations; only their timing differs.

The target
==========

A path that does not exist is created; an existing regular file is
overwritten only with ``force`` (a temporary file made for the run is
removed afterwards).  A block device is used in place, and only one the system does not use
(one mounted is refused: O_EXCL, EBUSY): nothing truncates it,
its size is the device's (``size`` may ask for less), the model starts from
what the device holds, truncates are left out of the mix and discards and
write-zeroes are aligned to its logical block size.  Anything else (a
directory, a FIFO, a path that cannot be opened) is a :class:`StressError`
before any request runs.

Ctrl-C
======

In the main thread, SIGINT stops the run instead of raising: nothing new is
issued, what is in flight finishes and is checked, and the report (with
``interrupted`` set) covers what ran.  A second SIGINT raises
KeyboardInterrupt as usual.  Either way a temporary file is removed.
SIGTERM and SIGHUP, left at their default (which kills at once and leaves
the temporary file), do the same as the first Ctrl-C; ``stopped_by`` says
which.  A second one raises SystemExit(128 + the signal), the temporary
file still removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from threadlets.engine import BACKENDS, AioContext, AioRequest
from threadlets.pool import CancelResult, ThreadletQueue
from threadlets.probe import O_DIRECT, aligned_buffer
from threadlets.syscalls import FaultInjector, Syscalls

__all__ = [
    "KINDS",
    "Mismatch",
    "StressConfig",
    "StressReport",
    "fio_verify",
    "first_signal_calls",
    "run_stress",
    "signals_deferred",
]

KINDS = ("read", "write", "readv", "writev", "flush", "discard", "write_zeroes", "truncate")
DEFAULT_MIX = {
    "read": 35,
    "write": 25,
    "readv": 10,
    "writev": 10,
    "flush": 4,
    "discard": 6,
    "write_zeroes": 6,
    "truncate": 4,
}
_WRITERS = ("write", "writev", "discard", "write_zeroes")
_PATTERN = 256
DEFAULT_SIZE = 256 << 20
#: Longer than anyone runs a stress test; beyond it a duration is a typo.
MAX_DURATION = 365 * 86400.0
_BLKSSZGET = 0x1268  # <linux/fs.h>: the logical block size, an int


class StressError(Exception):
    """Bad configuration (the CLI turns it into a usage error)."""


@dataclass
class StressConfig:
    path: str | None = None
    #: Bytes to use; None: DEFAULT_SIZE for a file, all of a block device.
    size: int | None = None
    duration: float | None = 20.0
    ops: int | None = None
    concurrency: int = 32
    block_size: int = 4096
    mix: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    direct: bool = False
    #: The engine backend: "threads", "io_uring" or "auto" (see AioContext);
    #: "auto", as the front ends use, runs fault injection on threads.
    backend: str = "auto"
    #: Ask the ring for IORING_SETUP_SQPOLL (a kernel thread polls it; see
    #: AioContext's ``sqpoll``): "io_uring" or "auto" only.  The report's
    #: ``sqpoll`` says whether the ring got it.
    sqpoll: bool = False
    seed: int = 0
    cancel_rate: float = 0.05
    inject_faults: float = 0.0
    fio_pattern: bool = False
    #: Self-test: after this many operations, flip a byte of the file behind
    #: the engine's back (the run must then report a mismatch).
    corrupt_after: int | None = None
    #: Overwrite an existing regular file at ``path``.
    force: bool = False
    progress: Callable[[int, float], None] | None = None
    #: Called once the target is open and the context made, before the
    #: first request: (path, size, backend).
    on_start: Callable[[str, int, str], None] | None = None

    def check(self) -> None:
        if self.size is not None:
            _check_size(self.size, self.block_size)
        if self.concurrency < 1:
            raise StressError("--concurrency must be >= 1")
        if self.block_size < 1:
            raise StressError("--block-size must be >= 1")
        if self.ops is None and (self.duration is None or not 0 < self.duration <= MAX_DURATION):
            raise StressError(f"give --ops, or --duration > 0 and at most {MAX_DURATION:.0f} s")
        if self.ops is not None and self.ops < 0:
            raise StressError("--ops must be >= 0")
        if not 0 <= self.cancel_rate <= 1 or not 0 <= self.inject_faults <= 1:
            raise StressError("rates must be between 0 and 1")
        unknown = set(self.mix) - set(KINDS)
        if unknown:
            raise StressError(f"unknown operation kinds in --mix: {sorted(unknown)}")
        if sum(self.mix.values()) <= 0 or min(self.mix.values()) < 0:
            raise StressError("--mix needs positive weights")
        if self.backend not in BACKENDS:
            raise StressError(f"--backend must be one of {', '.join(BACKENDS)}")
        if self.backend == "io_uring" and self.inject_faults:
            raise StressError("--inject-faults needs the threads backend (faults enter through it)")
        if self.sqpoll and self.backend == "threads":
            raise StressError("--sqpoll needs the ring: --backend io_uring or auto")
        if self.sqpoll and self.inject_faults:
            raise StressError("--sqpoll needs the ring, and --inject-faults runs on threads")
        if self.direct and self.block_size % 512:
            raise StressError("--direct needs a --block-size that is a multiple of 512")
        if self.fio_pattern and ((self.size or 0) % self.block_size or self.block_size % 8):
            raise StressError("--fio-pattern needs --size a multiple of --block-size (of 8 bytes)")


def _memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover
        return 1 << 62


def _check_size(size: int, block_size: int) -> None:
    if size <= 0:
        raise StressError("--size must be > 0")
    if size > _memory():
        raise StressError(
            f"--size {size} is more than this machine's memory ({_memory()} bytes): "
            "the model keeps a copy of every byte"
        )
    if block_size > size:
        raise StressError(f"--block-size {block_size} is larger than --size {size}")


@dataclass
class Op:
    n: int  # sequence number, from 0
    kind: str
    offset: int
    length: int
    pieces: int = 1
    cancel: bool = False
    # set while running
    req: AioRequest | None = None
    bufs: list[Any] = field(default_factory=list)
    started: float = 0.0
    cancel_result: CancelResult | None = None
    #: For a pseudo-operation standing for the bytes as they were.
    frozen: bytes | None = None
    issue_seq: int = 0
    done_seq: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    def value_at(self, pos: int) -> int:
        """The byte this operation writes at file offset ``pos``."""
        if self.frozen is not None:
            return self.frozen[pos - self.offset]
        if self.kind in ("discard", "write_zeroes", "truncate"):
            return 0
        return _pattern(self.n)[(pos - self.offset) % _PATTERN]

    def data(self) -> bytes:
        if self.kind in ("discard", "write_zeroes"):
            return bytes(self.length)
        reps = -(-self.length // _PATTERN)
        return (_pattern(self.n) * reps)[: self.length]


def _pattern(n: int) -> bytes:
    return random.Random(n * 7919 + 17).randbytes(_PATTERN)


@dataclass
class Mismatch:
    offset: int
    expected: bytes
    found: bytes
    history: list[str]
    seed: int

    def describe(self) -> str:
        lines = [
            f"MISMATCH at offset {self.offset} (seed {self.seed})",
            f"  expected: {self.expected.hex(' ')}",
            f"  found:    {self.found.hex(' ')}",
            "  operations on this range, oldest first:",
        ]
        lines += [f"    {h}" for h in self.history] or [
            "    (none: the file was changed behind our back)"
        ]
        return "\n".join(lines)


@dataclass
class StressReport:
    seed: int
    #: What ran the requests that did not finish inline ("threads"/"io_uring").
    backend: str = "threads"
    #: Whether the ring polled (IORING_SETUP_SQPOLL): asked with --sqpoll
    #: and granted by the kernel.
    sqpoll: bool = False
    path: str = ""
    size: int = 0
    #: Stopped early by SIGINT or SIGTERM: the figures cover what ran.
    interrupted: bool = False
    #: The signal that stopped the run early, 0 if none.
    stopped_by: int = 0
    ops: int = 0
    seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    verified_reads: int = 0
    expected_errors: dict[str, int] = field(default_factory=dict)
    unexpected_errors: dict[str, int] = field(default_factory=dict)
    cancels: dict[str, int] = field(default_factory=dict)
    latency_us: dict[str, dict[str, float]] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    faults: dict[str, Any] = field(default_factory=dict)
    fio_pattern_written: bool = False
    #: "passed", "failed: ...", or why fio did not run; None without --fio-pattern.
    fio_check: str | None = None
    sequence_digest: str = ""

    @property
    def ok(self) -> bool:
        fio_ok = self.fio_check is None or not self.fio_check.startswith("failed")
        return not self.mismatches and not self.unexpected_errors and fio_ok

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "backend": self.backend,
            "sqpoll": self.sqpoll,
            "path": self.path,
            "size": self.size,
            "interrupted": self.interrupted,
            "ops": self.ops,
            "seconds": round(self.seconds, 3),
            "ops_per_second": round(self.ops_per_second, 1),
            "by_kind": self.by_kind,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "verified_reads": self.verified_reads,
            "expected_errors": self.expected_errors,
            "unexpected_errors": self.unexpected_errors,
            "cancels": self.cancels,
            "latency_us": self.latency_us,
            "faults": self.faults,
            "fio_pattern_written": self.fio_pattern_written,
            "fio_check": self.fio_check,
            "sequence_digest": self.sequence_digest,
            "mismatches": [
                {
                    "offset": m.offset,
                    "expected": m.expected.hex(),
                    "found": m.found.hex(),
                    "history": m.history,
                }
                for m in self.mismatches
            ],
        }


_ZEROS = memoryview(bytes(1 << 20))


def _zeros(n: int) -> memoryview | bytes:
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)


class _Model:
    """What the file must hold: bytes, size, and the uncertain bytes."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.size = size
        #: offset -> the operations whose value the byte may hold instead
        self.uncertain: dict[int, list[Op]] = {}

    def apply(self, op: Op) -> None:
        if op.kind == "truncate":
            if op.offset < self.size:
                self.data[op.offset : self.size] = _zeros(self.size - op.offset)
            self.size = op.offset
            for pos in [p for p in self.uncertain if p >= op.offset]:
                del self.uncertain[pos]
            return
        if op.kind == "discard":
            end = min(op.end, self.size)  # a hole keeps the size
            if end > op.offset:
                self.data[op.offset : end] = _zeros(end - op.offset)
        else:
            self.data[op.offset : op.end] = op.data()
            self.size = max(self.size, op.end)
        self.settle(op.offset, op.end)

    def settle(self, start: int, end: int) -> None:
        if self.uncertain:
            for pos in [p for p in self.uncertain if start <= p < end]:
                del self.uncertain[pos]

    def unsure(self, start: int, end: int, ops: list[Op]) -> None:
        for pos in range(start, end):
            self.uncertain.setdefault(pos, []).extend(ops)

    def allowed(self, pos: int, found: int) -> bool:
        return any(op.value_at(pos) == found for op in self.uncertain.get(pos, ()))


class _Stress:
    def __init__(
        self, cfg: StressConfig, fd: int, report: StressReport, space_align: int = 1
    ) -> None:
        assert cfg.size is not None
        self.size = cfg.size
        self.cfg = cfg
        #: Discards and write-zeroes on a block device: its logical block size.
        self.space_align = space_align
        #: Set by SIGINT: issue nothing more, finish what is in flight.
        self.stopping = False
        self.device = False
        self.fd = fd
        self.report = report
        self.rng = random.Random(cfg.seed)
        # As many workers as io_queue() would have, never more than requests.
        cap = min(64, 4 * (os.cpu_count() or 1))
        self.queue = ThreadletQueue(max_threads=min(cfg.concurrency, cap), name="stress")
        self.sc: Syscalls = (
            FaultInjector(cfg.inject_faults, seed=cfg.seed) if cfg.inject_faults else Syscalls()
        )
        self.ctx = AioContext(self.queue, syscalls=self.sc, backend=cfg.backend, sqpoll=cfg.sqpoll)
        self.model = _Model(self.size)
        self.inflight: dict[int, Op] = {}
        self.history: deque[Op] = deque(maxlen=4096)
        self.latencies: dict[str, list[float]] = {}
        self.kinds = [k for k in KINDS if cfg.mix.get(k, 0) > 0]
        self.weights = [cfg.mix[k] for k in self.kinds]
        self.next_n = 0
        self.pending: Op | None = None
        self.flush_errno = 0
        self.corrupted = False
        self.seq = 0  # event clock: one tick per issue and per completion
        #: Writers that completed while some request now in flight was.
        self.recent_writers: list[Op] = []
        #: Fingerprint of the generated operation sequence (reproducibility).
        self.digest = hashlib.blake2b(digest_size=16)

    def stop(self, signum: int = signal.SIGINT) -> None:
        if not self.stopping:
            self.report.stopped_by = signum
        self.stopping = True

    # -- generating ---------------------------------------------------------------------

    def generate(self) -> Op:
        cfg = self.cfg
        rng = self.rng
        n = self.next_n
        self.next_n += 1
        kind = rng.choices(self.kinds, self.weights)[0]
        bs = cfg.block_size
        if cfg.direct:
            blocks = self.size // bs
            offset = rng.randrange(blocks) * bs
            length = rng.randint(1, min(4, blocks - offset // bs)) * bs
        else:
            offset = rng.randrange(self.size)
            length = rng.randint(1, min(4 * bs, self.size - offset))
        pieces = rng.randint(2, 4) if kind in ("readv", "writev") else 1
        if kind in ("discard", "write_zeroes") and self.space_align > 1:
            # A block device takes only whole logical blocks (the size is a
            # multiple of them, so the rounded-up length still fits).
            a = self.space_align
            offset -= offset % a
            length = -(-length // a) * a
        if kind == "truncate":
            # Within the last sixteenth of the file: the end moves back and
            # forth (later writes extend it again) without the model having
            # to zero most of a large file each time.
            low = self.size - self.size // 16
            offset = rng.randrange(low, self.size + 1)
            if cfg.direct:
                offset -= offset % bs
            length = 0
        if kind == "flush":
            offset, length = 0, 0
        op = Op(n, kind, offset, length, pieces, cancel=rng.random() < cfg.cancel_rate)
        self.digest.update(f"{n}:{kind}:{offset}:{length}:{pieces}:{op.cancel};".encode())
        return op

    def conflicts(self, op: Op) -> bool:
        if op.kind == "truncate":
            return bool(self.inflight)
        for other in self.inflight.values():
            if other.kind == "truncate":
                return True
            if op.kind == "flush" or other.kind == "flush":
                continue
            reading = op.kind in ("read", "readv")
            other_reading = other.kind in ("read", "readv")
            if reading and other_reading:
                continue
            if reading or other_reading:
                if op.offset < other.end and other.offset < op.end:
                    return True
                # A read past the end while a write moves the end.
                size = self.model.size
                if (reading and op.end > size and other.end > size) or (
                    other_reading and other.end > size and op.end > size
                ):
                    return True
        return False

    # -- issuing ------------------------------------------------------------------------

    def buffers(self, op: Op, data: bytes | None) -> list[Any]:
        """op.pieces buffers covering op.length (aligned ones for O_DIRECT)."""
        k = min(op.pieces - 1, op.length - 1)
        cuts = sorted(self.rng.sample(range(1, op.length), k)) if k > 0 else []
        if self.cfg.direct:
            bs = self.cfg.block_size
            cuts = sorted({c - c % bs for c in cuts if c - c % bs > 0})
        bounds = [0, *cuts, op.length]
        out = []
        for a, b in itertools.pairwise(bounds):
            buf = aligned_buffer(b - a) if self.cfg.direct else bytearray(b - a)
            if data is not None:
                buf[:] = data[a:b]
            out.append(buf)
        return out

    def issue(self, op: Op) -> None:
        ctx, fd = self.ctx, self.fd
        cb = self.completed
        op.started = time.perf_counter()
        if op.kind in ("read", "readv"):
            op.bufs = self.buffers(op, None)
            req = ctx.read(
                fd, op.offset, op.bufs if op.kind == "readv" else op.bufs[0], callback=cb
            )
        elif op.kind in ("write", "writev"):
            op.bufs = self.buffers(op, op.data())
            req = ctx.write(
                fd, op.offset, op.bufs if op.kind == "writev" else op.bufs[0], callback=cb
            )
        elif op.kind == "flush":
            req = ctx.flush(fd, callback=cb)
        elif op.kind == "discard":
            req = ctx.discard(fd, op.offset, op.length, callback=cb)
        elif op.kind == "write_zeroes":
            req = ctx.write_zeroes(fd, op.offset, op.length, callback=cb)
        else:
            req = ctx.truncate(fd, op.offset, callback=cb)
        op.req = req
        self.seq += 1
        op.issue_seq = self.seq
        self.inflight[id(req)] = op
        self.history.append(op)
        if op.cancel:
            op.cancel_result = req.cancel()
            self.report.cancels[op.cancel_result.name] = (
                self.report.cancels.get(op.cancel_result.name, 0) + 1
            )

    # -- completing ----------------------------------------------------------------------

    def racing_writers(self, op: Op) -> list[Op]:
        """Writers whose flight overlapped this one's on overlapping bytes:
        the kernel may have applied them in either order, whatever order
        their completions arrived in."""
        candidates = [o for o in self.inflight.values() if o is not op]
        candidates += [o for o in self.recent_writers if o.done_seq > op.issue_seq]
        return [
            o
            for o in candidates
            if o.kind in _WRITERS
            and o.offset < op.end
            and op.offset < o.end
            and o.cancel_result is not CancelResult.CANCELED
        ]

    def remember_writer(self, op: Op) -> None:
        self.recent_writers.append(op)
        oldest = min((o.issue_seq for o in self.inflight.values()), default=self.seq + 1)
        if len(self.recent_writers) > 64:
            self.recent_writers = [o for o in self.recent_writers if o.done_seq > oldest]

    def completed(self, req: AioRequest) -> None:
        op = self.inflight.pop(id(req))
        self.seq += 1
        op.done_seq = self.seq
        r = self.report
        r.ops += 1
        r.by_kind[op.kind] = r.by_kind.get(op.kind, 0) + 1
        self.latencies.setdefault(op.kind, []).append(time.perf_counter() - op.started)
        err = req.error
        if err == errno.ECANCELED:
            return  # never happened: the model ignores it
        if err:
            self.error(op, err)
            return
        if op.kind in ("read", "readv"):
            got = req.result()
            r.bytes_read += got
            self.verify(op, b"".join(bytes(b) for b in op.bufs)[:got])
        elif op.kind == "flush":
            pass
        else:
            if op.kind in ("write", "writev"):
                r.bytes_written += op.length
            racing = self.racing_writers(op)
            self.model.apply(op)
            self.remember_writer(op)
            for other in racing:
                lo, hi = max(op.offset, other.offset), min(op.end, other.end)
                # Either may land last: both values are allowed there.
                self.model.unsure(lo, hi, [op, other])

    def error(self, op: Op, err: int) -> None:
        name = errno.errorcode.get(err, str(err))
        if op.kind == "discard" and err == errno.ENOTSUP:
            # The file or device cannot punch holes: nothing happened.
            key = f"discard:{name}"
            self.report.expected_errors[key] = self.report.expected_errors.get(key, 0) + 1
            return
        injected = bool(self.cfg.inject_faults) and err in (errno.EIO, errno.ENOSPC)
        if op.kind == "flush" and self.flush_errno and err == self.flush_errno:
            injected = True  # the sticky flush error, as it should be
        bucket = self.report.expected_errors if injected else self.report.unexpected_errors
        bucket[f"{op.kind}:{name}"] = bucket.get(f"{op.kind}:{name}", 0) + 1
        if op.kind == "flush" and not self.flush_errno:
            self.flush_errno = err
        if op.kind in _WRITERS:
            # It may have landed in part: old or new values are allowed, and
            # the writers it raced with may have landed before or after it.
            end = min(op.end, self.size)
            self.model.unsure(op.offset, end, [op, *self._old_values(op), *self.racing_writers(op)])
            self.remember_writer(op)

    def _old_values(self, op: Op) -> list[Op]:
        # The current model bytes, frozen as a pseudo-operation.
        frozen = Op(-1, "frozen", op.offset, op.length)
        frozen.frozen = bytes(self.model.data[op.offset : op.end])
        return [frozen]

    def verify(self, op: Op, found: bytes) -> None:
        model = self.model
        want_len = max(0, min(op.end, model.size) - op.offset)
        expected = bytes(model.data[op.offset : op.offset + want_len])
        self.report.verified_reads += 1
        if len(found) == want_len and found == expected:
            return
        for i in range(max(len(found), want_len)):
            pos = op.offset + i
            e = expected[i] if i < len(expected) else None
            f = found[i] if i < len(found) else None
            if e == f:
                continue
            if f is not None and model.allowed(pos, f):
                continue
            if e is None and pos in model.uncertain and f is not None:
                continue  # the end moved by an uncertain write
            self.mismatch(pos, expected[i : i + 16], found[i : i + 16])
            return

    def mismatch(self, pos: int, expected: bytes, found: bytes) -> None:
        hist = [
            f"#{o.n} {o.kind} [{o.offset}, {o.end})"
            + (f" cancel={o.cancel_result.name}" if o.cancel_result is not None else "")
            + (
                f" error={errno.errorcode.get(o.req.error, o.req.error)}"
                if o.req and o.req.done() and o.req.error
                else ""
            )
            for o in self.history
            if (o.offset <= pos < max(o.end, o.offset + 1))
            or (o.kind == "truncate" and o.offset <= pos)
        ]
        self.report.mismatches.append(Mismatch(pos, expected, found, hist[-20:], self.cfg.seed))

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        deadline = None if cfg.ops is not None else t0 + (cfg.duration or 0)
        last_progress = t0
        while True:
            # Issue in sequence order while there is room.
            while len(self.inflight) < cfg.concurrency and not self.stopping:
                if self.pending is None:
                    if cfg.ops is not None and self.next_n >= cfg.ops:
                        break
                    if deadline is not None and time.perf_counter() >= deadline:
                        break
                    self.pending = self.generate()
                if self.conflicts(self.pending):
                    break
                op, self.pending = self.pending, None
                self.issue(op)
            finished = (cfg.ops is not None and self.next_n >= cfg.ops) or (
                deadline is not None and time.perf_counter() >= deadline
            )
            if self.stopping and not self.inflight:
                break
            if finished and not self.inflight and self.pending is None:
                break
            self.ctx.poll(0.1)
            if (
                cfg.corrupt_after is not None
                and not self.corrupted
                and self.report.ops >= cfg.corrupt_after
            ):
                self.corrupt()
            if self.report.mismatches:
                break
            now = time.perf_counter()
            if cfg.progress is not None and now - last_progress > 0.1:
                cfg.progress(self.report.ops, now - t0)
                last_progress = now
        self.ctx.drain()
        self.report.seconds = time.perf_counter() - t0
        self.report.interrupted = self.stopping
        if not self.report.mismatches and not self.stopping:
            self.final_check()

    def corrupt(self) -> None:
        """Self-test: flip one byte the model is sure about, behind the
        engine's back, then read it through the engine like any read."""
        self.corrupted = True
        self.ctx.drain()
        rng = random.Random(self.cfg.seed ^ 0x5EED)
        size = self.model.size
        if size == 0:
            return
        pos = rng.randrange(size)
        for _ in range(1000):
            if pos not in self.model.uncertain:
                break
            pos = rng.randrange(size)
        fd = os.open(self.path_for_corruption, os.O_RDWR)
        try:
            old = os.pread(fd, 1, pos)
            os.pwrite(fd, bytes([old[0] ^ 0xFF]) if old else b"\xff", pos)
        finally:
            os.close(fd)
        check = Op(-1, "read", pos, 1)
        buf = bytearray(1) if not self.cfg.direct else None
        if buf is not None:
            req = self.ctx.read(self.fd, pos, buf)
            self.ctx.wait(req)
            self.verify(check, bytes(buf[: req.result()]))

    path_for_corruption = ""

    def final_check(self) -> None:
        """Read the whole file back and compare it with the model."""
        size = os.fstat(self.fd).st_size  # 0 for a block device
        chunk = 1 << 20
        pos = 0
        end = max(size, self.model.size)
        while pos < end and not self.report.mismatches and not self.stopping:
            n = min(chunk, end - pos)
            op = Op(-1, "read", pos, n)
            bufs = [aligned_buffer(n)] if self.cfg.direct else [bytearray(n)]
            req = self.ctx.read(self.fd, pos, bufs[0])
            self.ctx.wait(req)
            if req.error:
                self.error(op, req.error)
                return
            self.verify(op, bytes(bufs[0][: req.result()]))
            pos += n

    def write_fio_pattern(self) -> None:
        bs = self.cfg.block_size
        for off in range(0, self.size, bs):
            if self.stopping:
                return  # Ctrl-C: the report now, not after the whole file
            block = off.to_bytes(8, "little") * (bs // 8)
            buf = aligned_buffer(bs)
            buf[:] = block
            req = self.ctx.write(self.fd, off, buf)
            self.ctx.wait(req)
            req.result()
        if not self.device:
            req = self.ctx.truncate(self.fd, self.size)
            self.ctx.wait(req)
        req = self.ctx.flush(self.fd)
        self.ctx.wait(req)
        self.report.fio_pattern_written = True

    def close(self) -> None:
        self.ctx.close()
        self.queue.close(timeout=10)


def _summarise_latency(lat: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for kind, vals in sorted(lat.items()):
        vals.sort()
        out[kind] = {
            "p50": round(vals[len(vals) // 2] * 1e6, 1),
            "p99": round(vals[min(len(vals) - 1, int(len(vals) * 0.99))] * 1e6, 1),
            "max": round(vals[-1] * 1e6, 1),
        }
    return out


@dataclass
class _Target:
    fd: int
    path: str
    size: int
    device: bool
    #: What discards and write-zeroes must be aligned to (1 for a file).
    space_align: int


@contextlib.contextmanager
def _target(cfg: StressConfig) -> Iterator[_Target]:
    """Open what the run works on (see "The target" above); afterwards
    close it and remove a temporary file."""
    if cfg.direct and not O_DIRECT:
        raise StressError("O_DIRECT is not supported on this platform")
    temp = None
    if cfg.path is None:
        try:
            fd, temp = tempfile.mkstemp(prefix="threadlets-stress-", dir=".")
        except OSError as e:
            raise StressError(
                f"cannot make a temporary file in {os.getcwd()!r}: {e.strerror}"
            ) from None
        os.close(fd)
    path = temp or str(cfg.path)
    created = False
    try:
        fd, device, created = _open(path, cfg.direct, cfg.force or temp is not None)
        try:
            if device:
                end = os.lseek(fd, 0, os.SEEK_END)
                align = _logical_block_size(fd)
                size = end if cfg.size is None else cfg.size
                if size > end:
                    raise StressError(f"--size {size} is larger than {path} ({end} bytes)")
                if size % align:
                    raise StressError(
                        f"--size must be a multiple of {path}'s logical block size ({align})"
                    )
            else:
                size = DEFAULT_SIZE if cfg.size is None else cfg.size
                align = 1
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)  # the model starts as zeros
                kept = os.fstat(fd).st_size
                if kept != size:  # (a /proc or /sys file: a "mismatch" it is not)
                    raise StressError(
                        f"{path} does not keep what is written (its size is {kept:,} after "
                        f"truncating it to {size:,}): not a file on a disk file system"
                    )
                _reserve(fd, path, size)
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(path)  # refused before the run: leave nothing behind
            raise
        try:
            yield _Target(fd, path, size, device, align)
        finally:
            os.close(fd)
    finally:
        if temp is not None:
            os.unlink(temp)


#: What fallocate says when the space is not there.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _reserve(fd: int, path: str, size: int) -> None:
    """Allocate the file's ``size`` bytes (zeros) before the run.  Where they do not
    fit, a StressError now -- not a run whose writes fail with ENOSPC,
    reported as unexpected errors.  A file system without fallocate(2) is
    left to the run (not posix_fallocate: its emulation there writes every
    block, for minutes on a large --size)."""
    while True:
        try:
            Syscalls().fallocate(fd, 0, 0, size)
            return
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise StressError(
                    f"not enough space for --size {size:,} on {path}: {e.strerror}"
                ) from None
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENODEV):
                return
            raise StressError(f"cannot allocate {size:,} bytes for {path}: {e.strerror}") from None


def _open(path: str, direct: bool, force: bool) -> tuple[int, bool, bool]:
    """(fd, is a block device, made by this call); a StressError for
    anything else."""
    try:
        mode: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise StressError(f"cannot use {path}: {e.strerror}") from None
    if mode is not None:
        _check_kind(path, mode)
        if stat.S_ISREG(mode) and not force:
            raise StressError(f"will not overwrite the existing file {path} (give --force)")
    create = os.O_CREAT | os.O_EXCL if mode is None else 0
    # O_EXCL on a block device: EBUSY if the system uses it (mounted, swap,
    # a device-mapper member) -- the run would write over a file system.
    exclusive = os.O_EXCL if mode is not None and stat.S_ISBLK(mode) else 0
    try:
        fd = os.open(path, os.O_RDWR | create | exclusive, 0o644)
    except OSError as e:
        why = " (mounted, or in use by the system)" if e.errno == errno.EBUSY else ""
        raise StressError(f"cannot open {path}: {e.strerror}{why}") from None
    try:
        mode = os.fstat(fd).st_mode  # what was opened, whatever the path names now
        _check_kind(path, mode)
        if direct:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | O_DIRECT)
            except OSError as e:
                raise StressError(f"cannot open {path} with O_DIRECT: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        if create:
            os.unlink(path)
        raise
    return fd, stat.S_ISBLK(mode), bool(create)


def _check_kind(path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise StressError(f"{path} is a directory")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise StressError(f"{path} is neither a regular file nor a block device")


def _logical_block_size(fd: int) -> int:
    try:
        got = fcntl.ioctl(fd, _BLKSSZGET, struct.pack("i", 0))
    except OSError:  # pragma: no cover
        return 512
    size: int = struct.unpack("i", got)[0]
    return max(1, size)


def _load(path: str, into: bytearray) -> None:
    """The model of a block device starts from what the device holds (read
    without O_DIRECT, before any request runs)."""
    with open(path, "rb", buffering=0) as f:
        view = memoryview(into)
        pos = 0
        while pos < len(into):
            n = f.readinto(view[pos : pos + (1 << 20)])
            if not n:
                raise StressError(f"{path} ended at {pos} bytes")
            pos += n


#: While the tools remove their scratch files (see :func:`signals_deferred`):
#: how deep, and the signals that arrived meanwhile, handled after.
_deferring = [0]
_deferred: list[int] = []


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within (the main thread), a signal that :func:`first_signal_calls`
    handles is only noted; it is handled on the way out.  For the removal
    of scratch files: a second Ctrl-C, SIGTERM or SIGHUP raised half-way
    through bench's scratch directory left it behind."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
        if not _deferring[0] and _deferred:
            signum = _deferred[0]
            _deferred.clear()
            handler = signal.getsignal(signum)
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


@contextlib.contextmanager
def first_signal_calls(
    signum: int,
    stop: Callable[[int], None],
    again: Callable[[int, object], None] | None = None,
) -> Iterator[None]:
    """Within, in the main thread, while ``signum`` (SIGINT, SIGTERM or
    SIGHUP) is at its default (an ignored one -- nohup -- stays ignored):
    the first such signal calls ``stop(signum)`` instead of raising
    KeyboardInterrupt or killing at once; a second one does what the
    default does, or calls ``again``.  For the tools, whose state must not
    be left half updated (a SIGTERM's death would also leave their scratch
    files).  Either waits for the end of a :func:`signals_deferred`."""
    default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signum) is not default:
        yield
        return

    def first(signum: int, frame: object) -> None:
        if _deferring[0]:
            _deferred.append(signum)
            return
        signal.signal(signum, second)
        stop(signum)

    def second(signum: int, frame: object) -> None:
        if _deferring[0]:
            _deferred.append(signum)
        elif again is not None:
            again(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # (the default action)

    signal.signal(signum, first)
    try:
        yield
    finally:
        signal.signal(signum, default)


def _exit_now(signum: int, frame: object) -> None:
    """A second SIGTERM or SIGHUP: exit at once (the temporary file still removed)."""
    raise SystemExit(128 + signum)


def _run(st: _Stress, cfg: StressConfig, report: StressReport, path: str, size: int) -> None:
    """The run itself, the fio check after it, and the report's figures."""
    if cfg.on_start is not None:
        cfg.on_start(path, size, report.backend)
    st.run()
    report.latency_us = _summarise_latency(st.latencies)
    if isinstance(st.sc, FaultInjector):
        report.faults = {
            "calls": st.sc.stats.calls,
            "errors": dict(st.sc.stats.errors),
            "short": st.sc.stats.short,
        }
    if cfg.fio_pattern and report.ok and not st.stopping:
        if cfg.inject_faults:
            st.ctx.close()
            st.ctx = AioContext(st.queue, backend=cfg.backend, sqpoll=cfg.sqpoll)  # no faults now
        st.write_fio_pattern()
        passed, output = (False, "") if st.stopping else fio_verify(path, size, cfg.block_size)
        if st.stopping:
            report.fio_check = "interrupted"
        elif passed:
            report.fio_check = "passed"
        elif shutil.which("fio") is None:
            report.fio_check = "skipped: fio is not installed"
        else:
            report.fio_check = "failed: " + output.strip()[-500:]
    report.interrupted = st.stopping


def run_stress(cfg: StressConfig) -> StressReport:
    """Run one stress test as configured; the report says what happened.
    Bad configuration or an unusable path: StressError, before any request."""
    cfg.check()
    report = StressReport(seed=cfg.seed)
    stopper: list[Callable[[int], None]] = []

    def stop(signum: int) -> None:
        # During the run, the run stops and reports.  Before it -- the file
        # being made, allocated, its model built -- the set-up stops at
        # once and cleans up: KeyboardInterrupt for Ctrl-C, as before;
        # SystemExit(128 + the signal) for SIGTERM and SIGHUP, whose default
        # action killed the process and left the temporary file (--size
        # bytes, in the current directory) behind.
        if stopper:
            stopper[0](signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)

    # (The handlers cover the clean-up too: a Ctrl-C there lost the report
    # of a finished run.)  A second SIGTERM or SIGHUP exits at once, as a
    # second Ctrl-C does, the temporary file still removed: their default
    # action left it behind.
    with (
        first_signal_calls(signal.SIGINT, stop),
        first_signal_calls(signal.SIGTERM, stop, again=_exit_now),
        first_signal_calls(signal.SIGHUP, stop, again=_exit_now),  # (the terminal closed)
        _target(cfg) as target,
    ):
        mix = dict(cfg.mix)
        if target.device:
            mix.pop("truncate", None)  # a block device has a fixed size
            if not any(mix.values()):
                raise StressError(
                    f"{target.path} is a block device: --mix needs kinds besides truncate"
                )
        cfg = dataclasses.replace(cfg, size=target.size, mix=mix)
        cfg.check()
        path, fd = target.path, target.fd
        report.path, report.size = path, target.size
        st = _Stress(cfg, fd, report, target.space_align)
        try:
            if target.device:
                _load(path, st.model.data)
            report.backend = st.ctx.backend
            report.sqpoll = st.ctx.sqpoll
            st.path_for_corruption = path
            st.device = target.device
            stopper.append(st.stop)
            _run(st, cfg, report, path, target.size)
        finally:
            report.sequence_digest = st.digest.hexdigest()
            st.close()
    return report


def fio_filename(path: str) -> str:
    """``path`` as fio's --filename takes it: a colon there separates file
    names (fio read "a:b" as the files "a" and "b", and made them) unless
    escaped."""
    return path.replace(":", "\\:")


def fio_verify(path: str, size: int, block_size: int) -> tuple[bool, str]:
    """Have fio check a file written with ``--fio-pattern``: every block
    must hold its own offset, as fio's ``--verify_pattern=%o`` writes it."""
    exe = shutil.which("fio")
    if exe is None:
        return False, "fio is not installed"
    cmd = [
        exe,
        "--name=threadlets-verify",
        f"--filename={fio_filename(path)}",
        "--readonly",
        "--allow_file_create=0",
        "--rw=read",
        f"--bs={block_size}",
        f"--size={size}",
        "--ioengine=psync",
        "--verify=pattern",
        "--verify_pattern=%o",
        "--verify_fatal=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr
