"""Attack round 8 on the POSIX AIO front end and the NBD server: the same
random sequences given to threadlets and to a reference, every observable
result compared.

* threadlets.posix against glibc's aio_* (tests/glibc_aio.py), a hypothesis
  state machine on both engine backends: aio_read/aio_write (zero-length,
  at and past end of file, O_APPEND, O_DIRECT with and without alignment,
  on a sparse file), lio_listio LIO_WAIT/LIO_NOWAIT, aio_fsync, aio_cancel
  of a finished request and of a whole fd, aio_suspend, reused aiocbs, fd
  numbers closed and taken by another file between requests, and a read
  waiting on an empty pipe.  glibc's side opens the O_DIRECT kinds
  without O_DIRECT: the module docstring promises that unaligned requests
  succeed through the bounce buffer, so a buffered fd is the oracle.
  SIGEV_SIGNAL counts are compared in a child interpreter (the signal is
  blocked in every thread and counted with sigtimedwait).
* The NBD server against nbdkit's file plugin through libnbd (strict mode
  off, so out-of-range, oversized and unaligned requests reach the
  server): reads, FUA writes, trim, write-zeroes with NO_HOLE, cache,
  flush, block status, structured replies on and off, read-only and
  O_DIRECT exports, several connections at once; clients that vanish in
  the middle of a write (against a model: nbdkit itself aborts there).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

import threadlets.posix as px
from threadlets import AioContext, RingUnavailable
from threadlets.nbd import proto
from threadlets.nbd.proto import Cmd, CmdFlag, ExportInfo, Request, check_request
from threadlets.nbd.server import open_export
from threadlets.probe import O_DIRECT, probe_alignment

from . import glibc_aio
from .conftest import HAVE_RING, wait_until
from .test_nbd_libnbd import load_nbd
from .test_nbd_server import Client, ServerThread
from .test_posix import needs_proc, readers_blocked_on

needs_glibc = pytest.mark.skipif(not glibc_aio.AVAILABLE, reason="needs glibc on x86_64/aarch64")
needs_direct = pytest.mark.skipif(not O_DIRECT, reason="needs O_DIRECT")
BACKENDS = [
    "threads",
    pytest.param("io_uring", marks=pytest.mark.skipif(not HAVE_RING, reason="no io_uring")),
]
#: A disk file system (O_DIRECT works there; /tmp may be tmpfs).
DISK_TMP = "/var/tmp"


def direct_dir() -> str:
    """A scratch directory on a file system that takes O_DIRECT (skips if
    there is none)."""
    d = tempfile.mkdtemp(dir=DISK_TMP if os.path.isdir(DISK_TMP) else None)
    try:
        os.close(os.open(d + "/probe", os.O_RDWR | os.O_CREAT | O_DIRECT))
    except OSError as e:
        shutil.rmtree(d)
        pytest.skip(f"O_DIRECT refused: {e}")
    os.unlink(d + "/probe")
    return d


@pytest.fixture
def disk_dir() -> Iterator[str]:
    d = direct_dir()
    try:
        yield d
    finally:
        shutil.rmtree(d)


# == POSIX AIO against glibc ==================================================================

DATA = bytes(range(256)) * 5 + b"xyz"  # 1283 bytes: the end of file is not aligned
#: How each kind of slot is opened (glibc's O_DIRECT kinds: without it, see above).
KINDS = {
    "rw": os.O_RDWR,
    "ro": os.O_RDONLY,
    "wo": os.O_WRONLY,
    "append": os.O_RDWR | os.O_APPEND,
    "wappend": os.O_WRONLY | os.O_APPEND,
    "direct": os.O_RDWR | O_DIRECT,
    "dappend": os.O_RDWR | O_DIRECT | os.O_APPEND,
}
OFFSETS = [0, 1, 511, 512, 1283, 1284, 4096, 3 * 4096 + 100, 10**6, -1, 2**62, 2**63 - 1]
SIZES = [0, 1, 3, 512, 1024, 4096, 5000]
SLOTS = 3
#: fd numbers of the slots: fixed, so that closing one and opening another
#: file there reuses the number (and no other open takes it meanwhile).
SLOT_FD = 700


class PosixWorld:
    """One side's files and fds: glibc's, or a threadlets runtime's.  File 0
    is sparse (its first three blocks are a hole: an O_DIRECT read there is
    answered whatever its alignment), file 1 is not."""

    def __init__(self, impl: Any, root: str) -> None:
        self.impl = impl
        self.glibc = impl is glibc_aio
        self.base = SLOT_FD + (0 if self.glibc else 50)
        os.mkdir(root)
        self.paths = [f"{root}/sparse", f"{root}/dense"]
        with open(self.paths[0], "wb") as f:
            f.truncate(3 * 4096)
            f.seek(3 * 4096)
            f.write(DATA)
        Path(self.paths[1]).write_bytes(DATA)
        self.slots: dict[int, tuple[str, int]] = {}  # slot: (kind or "closed", file)
        self.keep: list[Any] = []  # glibc's aiocbs and buffers outlive their requests
        self.pipe = os.pipe()
        self.pending: Any = None  # the aiocb of a read waiting on the empty pipe

    def fd(self, slot: int) -> int:
        return self.base + slot

    def open(self, slot: int, kind: str, file: int) -> None:
        flags = KINDS[kind]
        if self.glibc:
            flags &= ~O_DIRECT
        fd = os.open(self.paths[file], flags)
        os.dup2(fd, self.fd(slot))
        os.close(fd)
        self.slots[slot] = (kind, file)

    def close_slot(self, slot: int) -> None:
        if self.slots.get(slot, ("closed", 0))[0] != "closed":
            os.close(self.fd(slot))
            self.slots[slot] = ("closed", self.slots[slot][1])

    def close(self) -> None:
        for slot in list(self.slots):
            self.close_slot(slot)
        for fd in self.pipe:
            os.close(fd)

    def aiocb(self, fd: int, offset: int, n: int, data: bytes | None, opcode: int) -> Any:
        if n and n % 512 == 0:  # (aligned memory: the O_DIRECT fast path; else the bounce)
            m = mmap.mmap(-1, -(-n // 4096) * 4096)
            if data is not None:
                m[:n] = data
            buf: Any = memoryview(m)[:n]
        elif self.glibc:
            buf = data if data is not None else bytes(n)
        else:
            buf = bytearray(data if data is not None else bytes(n))
        cb = self.impl.aiocb(fd, offset, buf, lio_opcode=opcode)
        self.keep.append(cb)
        return cb

    def outcome(self, cb: Any, write: bool) -> tuple[int, int, bytes]:
        self.impl.aio_suspend([cb], 10)
        err, ret = self.impl.aio_error(cb), self.impl.aio_return(cb)
        return err, ret, b"" if write else bytes(cb.aio_buf)[: max(ret, 0)]


def payload(k: int, n: int) -> bytes:
    return bytes((k * 7 + i) & 0xFF for i in range(n))


class _Runtime:
    """A PosixAio runtime with the module's interface (aiocb included)."""

    def __init__(self, rt: px.PosixAio) -> None:
        self.rt = rt
        self.aiocb = px.aiocb

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rt, name)


def raised(call: Any) -> Any:
    try:
        return call()
    except OSError as e:
        return ("raised", e.errno)


class PosixMachine(RuleBasedStateMachine):
    """Each rule runs on both sides and compares what a caller sees."""

    rt: px.PosixAio
    backend: str

    def __init__(self) -> None:
        super().__init__()
        self.root = direct_dir()
        self.theirs = PosixWorld(glibc_aio, self.root + "/glibc")
        self.ours = PosixWorld(_Runtime(self.rt), self.root + "/ours")
        self.step = 0
        for slot, (kind, file) in enumerate([("direct", 0), ("append", 1), ("rw", 0)]):
            for w in self.worlds:
                w.open(slot, kind, file)

    @property
    def worlds(self) -> tuple[PosixWorld, PosixWorld]:
        return self.theirs, self.ours

    def teardown(self) -> None:
        try:
            for w in self.worlds:
                if w.pending is not None:  # (let the waiting read go)
                    os.write(w.pipe[1], b"0123456789")
                    w.impl.aio_suspend([w.pending], 10)
            for a, b in zip(*(map(Path, w.paths) for w in self.worlds), strict=True):
                assert a.read_bytes() == b.read_bytes(), a.name
        finally:
            for w in self.worlds:
                w.close()
            shutil.rmtree(self.root)

    def both(self, fn: Any) -> Any:
        """fn(world) on each side; the results must be equal."""
        self.step += 1
        theirs, ours = fn(self.theirs), fn(self.ours)
        assert ours == theirs
        return ours

    def _transfer(
        self, w: PosixWorld, name: str, slot: int, offset: int, n: int, again: bool
    ) -> Any:
        write = name == "write"
        data = payload(self.step, n) if write else None
        cb = w.aiocb(w.fd(slot), offset, n, data, px.LIO_NOP)
        submit = w.impl.aio_write if write else w.impl.aio_read
        got: list[Any] = [raised(lambda: submit(cb))]
        got.append(w.outcome(cb, write))
        if again:  # the same aiocb, once more
            got.append(raised(lambda: submit(cb)))
            got.append(w.outcome(cb, write))
        got.append(raised(lambda: w.impl.aio_cancel(w.fd(slot), cb)))
        got.append(raised(lambda: w.impl.aio_suspend([cb, None], 0)))
        return got

    @rule(
        slot=st.integers(0, SLOTS - 1), kind=st.sampled_from(sorted(KINDS)), file=st.integers(0, 1)
    )
    def reopen(self, slot: int, kind: str, file: int) -> None:
        for w in self.worlds:
            w.open(slot, kind, file)

    @rule(slot=st.integers(0, SLOTS - 1))
    def close_fd(self, slot: int) -> None:
        for w in self.worlds:
            w.close_slot(slot)

    @rule(
        name=st.sampled_from(["read", "write"]),
        slot=st.integers(0, SLOTS - 1),
        offset=st.sampled_from(OFFSETS),
        n=st.sampled_from(SIZES),
        again=st.booleans(),
    )
    def transfer(self, name: str, slot: int, offset: int, n: int, again: bool) -> None:
        self.both(lambda w: self._transfer(w, name, slot, offset, n, again))

    @rule(
        mode=st.sampled_from([px.LIO_WAIT, px.LIO_NOWAIT]),
        entries=st.lists(
            st.tuples(
                st.sampled_from([px.LIO_READ, px.LIO_WRITE, px.LIO_NOP]),
                st.integers(0, SLOTS - 1),
                st.sampled_from(OFFSETS),
                st.sampled_from(SIZES),
            ),
            max_size=4,
        ),
    )
    def lio(self, mode: int, entries: list[tuple[int, int, int, int]]) -> None:
        # The entries of one list run in parallel here, one after another in
        # glibc: a file written by one entry is touched by no other.
        files: dict[int, list[int]] = {}
        for op, slot, _, _ in entries:
            kind, file = self.theirs.slots[slot]
            if op != px.LIO_NOP and kind != "closed":
                files.setdefault(file, []).append(op)

        def clash(op: int, slot: int) -> bool:
            kind, file = self.theirs.slots[slot]
            ops = files.get(file, [])
            return kind != "closed" and len(ops) > 1 and px.LIO_WRITE in ops

        entries = [(px.LIO_NOP if clash(op, s) else op, s, o, n) for op, s, o, n in entries]

        def run(w: PosixWorld) -> Any:
            cbs = [
                w.aiocb(
                    w.fd(s),
                    o,
                    n,
                    payload(self.step * 10 + j, n) if op == px.LIO_WRITE else None,
                    op,
                )
                for j, (op, s, o, n) in enumerate(entries)
            ]
            got = [raised(lambda: w.impl.lio_listio(mode, cbs))]
            got += [
                w.outcome(cb, op == px.LIO_WRITE)
                for cb, (op, _, _, _) in zip(cbs, entries, strict=True)
                if op != px.LIO_NOP
            ]
            return got

        self.both(run)

    @rule(slot=st.integers(0, SLOTS - 1), op=st.sampled_from([os.O_SYNC, os.O_DSYNC, 0]))
    def fsync(self, slot: int, op: int) -> None:
        def run(w: PosixWorld) -> Any:
            cb = w.aiocb(w.fd(slot), 0, 0, None, px.LIO_NOP)
            got = raised(lambda: w.impl.aio_fsync(op, cb))
            return got if got is not None else w.outcome(cb, True)

        self.both(run)

    @rule(slot=st.integers(0, SLOTS - 1))
    def cancel_fd(self, slot: int) -> None:
        self.both(lambda w: raised(lambda: w.impl.aio_cancel(w.fd(slot))))

    @precondition(lambda self: self.ours.pending is None)
    @rule(n=st.sampled_from([1, 4, 16]))
    def read_empty_pipe(self, n: int) -> None:
        """A read that waits: in progress, aio_suspend times out, the other
        fds' requests go on around it."""

        def run(w: PosixWorld) -> Any:
            cb = w.aiocb(w.pipe[0], 0, n, None, px.LIO_NOP)
            w.impl.aio_read(cb)
            w.pending = cb
            if w.glibc or self.backend == "threads":  # (in the ring: no thread waits)
                # Running, not queued: what aio_cancel answers depends on it.
                wait_until(lambda: readers_blocked_on(w.pipe[0]) == 1)
            return (
                w.impl.aio_error(cb),
                raised(lambda: w.impl.aio_suspend([cb], 0)),
                raised(lambda: w.impl.aio_suspend([None, cb], 0.001)),
                raised(lambda: w.impl.aio_cancel(w.fd(0))),
                w.impl.aio_error(cb),
            )

        self.both(run)

    @precondition(lambda self: self.ours.pending is not None)
    @rule(data=st.binary(min_size=1, max_size=20))
    def feed_pipe(self, data: bytes) -> None:
        def run(w: PosixWorld) -> Any:
            cb, w.pending = w.pending, None
            os.write(w.pipe[1], data)
            got = w.outcome(cb, False)
            if len(data) > got[1]:  # (what the read left: the next one waits again)
                os.read(w.pipe[0], len(data) - got[1])
            return got

        self.both(run)

    @precondition(lambda self: self.ours.pending is not None)
    @rule(whole_fd=st.booleans())
    def cancel_pipe_read(self, whole_fd: bool) -> None:
        """glibc: the read is running, AIO_NOTCANCELED.  The io_uring
        backend takes it back (a difference the module docstring states)."""
        answers = []
        for w in self.worlds:
            r = w.pipe[0]
            answers.append(w.impl.aio_cancel(r) if whole_fd else w.impl.aio_cancel(r, w.pending))
        assert answers[0] == px.AIO_NOTCANCELED
        if self.backend == "io_uring":
            assert answers[1] == px.AIO_CANCELED
            assert self.ours.outcome(self.ours.pending, False) == (errno.ECANCELED, -1, b"")
            self.ours.pending = None
            # glibc's read runs on: finish it (its pipe is its own).
            os.write(self.theirs.pipe[1], b"x" * 16)
            err, n, _ = self.theirs.outcome(self.theirs.pending, False)
            assert err == 0
            if n < 16:
                os.read(self.theirs.pipe[0], 16 - n)
            self.theirs.pending = None
        else:
            assert answers[1] == px.AIO_NOTCANCELED
            assert self.ours.impl.aio_error(self.ours.pending) == errno.EINPROGRESS


@pytest.fixture(params=BACKENDS)
def runtime(request: pytest.FixtureRequest) -> Iterator[tuple[px.PosixAio, str]]:
    try:
        ctx = AioContext(deliver=False, backend=request.param)
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")
    yield px.PosixAio(ctx), request.param
    assert ctx.close(timeout=10)


@needs_glibc
@needs_direct
@needs_proc
def test_posix_state_machine_matches_glibc(runtime: tuple[px.PosixAio, str]) -> None:
    """(Before: an O_DIRECT fd on a file whose first blocks are a hole
    failed every unaligned write EINVAL: the alignment probe read the hole,
    which the kernel answers whatever the alignment, and took (1, 1).)"""
    rt, backend = runtime
    machine = type("PosixMachineRun", (PosixMachine,), {"rt": rt, "backend": backend})
    machine.TestCase.settings = settings(max_examples=80, stateful_step_count=15, deadline=None)
    machine.TestCase().runTest()


# -- what the state machine found, pinned ------------------------------------------------------


@needs_direct
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first", ["discard", "nothing"])
def test_unaligned_o_direct_io_on_a_file_that_starts_with_a_hole(
    disk_dir: str, backend: str, first: str
) -> None:
    """The alignment probe read offset 0; a hole there reads fine at any
    alignment, so the engine took (1, 1) and sent unaligned requests
    straight to the kernel: EINVAL, through posix (documented to succeed)
    and through the NBD server.  Now it probes where the file has data."""
    p = Path(disk_dir) / "img"
    with open(p, "wb") as f:
        f.truncate(64 * 1024)
        if first == "discard":
            f.write(os.urandom(64 * 1024))
    fd = os.open(p, os.O_RDWR | O_DIRECT)
    try:
        os.lseek(fd, 77, os.SEEK_SET)
        with AioContext(deliver=False, backend=backend) as ctx:
            if first == "discard":
                ctx.discard(fd, 0, 12783).result(10)
            assert ctx.write(fd, 20000, b"unaligned").result(10) == 9
            buf = bytearray(13)
            assert ctx.read(fd, 19998, buf).result(10) == 13
        assert os.lseek(fd, 0, os.SEEK_CUR) == 77  # the probe put the position back
        assert probe_alignment(fd) != (1, 1)
    finally:
        os.close(fd)
    data = p.read_bytes()
    assert data[20000:20009] == b"unaligned"
    assert bytes(buf) == data[19998:20011]
    if first == "discard":
        assert data[:12783] == bytes(12783)


@needs_direct
def test_a_direct_export_of_a_sparse_image_advertises_a_real_block_size(disk_dir: str) -> None:
    p = Path(disk_dir) / "img"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    e = open_export(p, direct=True)
    try:
        assert e.info.min_block >= 512  # (was 1: clients then sent what failed EINVAL)
    finally:
        e.close()
    buffered = os.open(p, os.O_RDONLY)
    try:
        assert probe_alignment(buffered) == (1, 1)  # no O_DIRECT: any alignment
    finally:
        os.close(buffered)


@needs_direct
def test_a_probe_read_the_kernel_does_not_check_is_not_believed(
    disk_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the file has data, the kernel may still answer an O_DIRECT read
    without checking its alignment: an unwritten extent (ZERO_RANGE's, or
    a block just written back whose conversion has not run yet) reads as
    zeros, like a hole.  The differential run met it (a write-zeroes, then
    every unaligned write to the export failed EINVAL); here every read is
    accepted, as such a file answers them.  As QEMU, a passing 1-byte read
    on an O_DIRECT fd gets the strictest alignment."""
    from threadlets import probe

    p = Path(disk_dir) / "img"
    p.write_bytes(os.urandom(64 * 1024))
    monkeypatch.setattr(probe, "_reads", lambda fd, view, offset=0: True)
    fd = os.open(p, os.O_RDWR | O_DIRECT)
    try:
        assert probe.probe_alignment(fd) == (probe.MAX_ALIGNMENT, probe.MAX_ALIGNMENT)
    finally:
        os.close(fd)
    fd = os.open(p, os.O_RDWR)  # (without O_DIRECT any alignment is right)
    try:
        assert probe.probe_alignment(fd) == (1, 1)
    finally:
        os.close(fd)


def test_posix_docstring_states_the_differences_the_machine_allows() -> None:
    """The two differences from glibc seen above that the module docstring
    did not state: an io_uring cancel of a waiting read, and lio_listio's
    LIO_WAIT not failing EINTR."""
    doc = px.__doc__ or ""
    differences = doc.split("Differences from glibc, on purpose")[1].split("What glibc does")[0]
    assert "IORING_OP_ASYNC_CANCEL" in differences
    assert "lio_listio(LIO_WAIT)" in differences
    assert "end of the file" in differences  # O_DIRECT|O_APPEND


@pytest.mark.parametrize("backend", BACKENDS)
def test_lio_wait_runs_handlers_and_is_not_interrupted(backend: str, tmp_path: Path) -> None:
    """glibc's lio_listio(LIO_WAIT) fails EINTR when a handled signal
    arrives while it waits (its aiocbs' own SIGEV_SIGNAL, say); here the
    handler runs and the wait goes on (PEP 475), as the docstring says."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    signo = int(signal.SIGRTMIN) + 2
    seen: list[int] = []
    old = signal.signal(signo, lambda s, f: seen.append(s))
    p = tmp_path / "f"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDWR)
    r, w = os.pipe()
    try:
        with AioContext(deliver=False, backend=backend) as ctx:
            rt = px.PosixAio(ctx)
            sev = px.sigevent(px.SIGEV_SIGNAL, signo)
            first = px.aiocb(fd, 0, bytearray(8), sigevent=sev, lio_opcode=px.LIO_READ)
            slow = px.aiocb(r, 0, bytearray(4), lio_opcode=px.LIO_READ)

            def feed() -> None:  # once the first entry's signal was handled
                wait_until(lambda: bool(seen))
                os.write(w, b"late")

            t = threading.Thread(target=feed)
            t.start()
            rt.lio_listio(px.LIO_WAIT, [first, slow])
            t.join(10)
            assert seen == [signo]
            assert [(rt.aio_error(c), rt.aio_return(c)) for c in (first, slow)] == [(0, 8), (0, 4)]
    finally:
        signal.signal(signo, old)
        for x in (fd, r, w):
            os.close(x)


# -- SIGEV_SIGNAL counts, in a child with the signal blocked everywhere -----------------------

_SIGNAL_CHILD = textwrap.dedent(
    """
    import ctypes, json, os, signal, sys, tempfile
    SIG = signal.SIGRTMIN + 1
    signal.pthread_sigmask(signal.SIG_BLOCK, [SIG])  # (before any thread starts)
    import threadlets.posix as px
    from threadlets import AioContext
    from tests import glibc_aio as g

    keep = []

    def count():
        n = 0
        while signal.sigtimedwait([SIG], 0.1) is not None:
            n += 1
        return n

    def scenario(impl, path):
        fd = os.open(path, os.O_RDWR)
        out = []

        def mk(off, n, op=px.LIO_NOP, data=None, sig=True):
            if impl is g:
                cb = g.aiocb(fd, off, data if data is not None else bytes(n), lio_opcode=op)
                if sig:
                    cb.c.aio_sigevent.sigev_notify = px.SIGEV_SIGNAL
                    cb.c.aio_sigevent.sigev_signo = SIG
            else:
                sev = px.sigevent(px.SIGEV_SIGNAL, SIG) if sig else None
                buf = bytearray(data if data is not None else bytes(n))
                cb = px.aiocb(fd, off, buf, lio_opcode=op, sigevent=sev)
            keep.append(cb)
            return cb

        def lio(mode, cbs, signo):
            if impl is g:
                sev = g._Sigevent()
                sev.sigev_notify = px.SIGEV_SIGNAL if signo else px.SIGEV_NONE
                sev.sigev_signo = signo
                keep.append(sev)
                if g._libc.lio_listio(mode, g._array(cbs), len(cbs), ctypes.byref(sev)):
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            else:
                impl.lio_listio(mode, cbs, px.sigevent(px.SIGEV_SIGNAL, signo) if signo else None)

        def done(cbs):
            for c in cbs:
                impl.aio_suspend([c], 10)
            return [(impl.aio_error(c), impl.aio_return(c)) for c in cbs]

        def bad_fd():
            cb = mk(0, 4)
            cb.aio_fildes = 10**6
            if impl is g:
                cb.c.aio_fildes = 10**6
            impl.aio_read(cb)
            return done([cb])

        def fsync():
            cb = mk(0, 0)
            impl.aio_fsync(os.O_DSYNC, cb)
            return done([cb])

        def lio_nowait(*entries, signo=SIG):
            cbs = [mk(*e) for e in entries]
            lio(px.LIO_NOWAIT, cbs, signo)
            return done([c for c, e in zip(cbs, entries) if e[2] != px.LIO_NOP])

        def lio_wait(*entries):
            cbs = [mk(*e) for e in entries]
            try:
                lio(px.LIO_WAIT, cbs, SIG)
            except OSError as e:
                return e.errno, done(cbs)
            return done(cbs)

        def one_read():
            cb = mk(0, 10)
            impl.aio_read(cb)
            return done([cb])

        steps = [
            one_read,
            bad_fd,
            fsync,
            lambda: lio_nowait((0, 10, px.LIO_READ), (100, 4, px.LIO_WRITE, b"abcd")),
            lambda: lio_nowait((0, 0, px.LIO_NOP)),
            lambda: lio_nowait(),
            lambda: lio_nowait((-1, 4, px.LIO_READ, None, False), (0, 4, px.LIO_READ, None, False)),
            lambda: lio_wait((0, 10, px.LIO_READ), (200, 4, px.LIO_WRITE, b"wxyz")),
            lambda: lio_wait((-1, 10, px.LIO_READ), (0, 4, px.LIO_READ)),
        ]
        for step in steps:
            try:
                got = step()
            except OSError as e:
                got = ("raised", e.errno)
            out.append([got, count()])
        os.close(fd)
        return out

    with tempfile.TemporaryDirectory() as d:
        results = {}
        for name in ("glibc", "threads", "io_uring"):
            p = os.path.join(d, name)
            with open(p, "wb") as f:
                f.write(bytes(range(256)) * 16)
            if name == "glibc":
                results[name] = scenario(g, p)
            elif name in sys.argv[1:]:
                with px.use_context(AioContext(deliver=False, backend=name)):
                    results[name] = scenario(px, p)
        print(json.dumps(results))
    """
)


@needs_glibc
def test_sigev_signal_counts_match_glibc(tmp_path: Path) -> None:
    """One signal per request (a refused one too), one per LIO_NOWAIT list
    (an empty list too, at once), none for LIO_WAIT's list sigevent."""
    import json

    script = tmp_path / "child.py"
    script.write_text(_SIGNAL_CHILD)
    backends = ["threads"] + (["io_uring"] if HAVE_RING else [])
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root)])
    out = subprocess.run(
        [sys.executable, str(script), *backends],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    for backend in backends:
        assert results[backend] == results["glibc"], backend


# == NBD against nbdkit ======================================================================

NBDKIT = shutil.which("nbdkit")
_NBD = load_nbd()
needs_libnbd = pytest.mark.skipif(isinstance(_NBD, str), reason=str(_NBD))
needs_nbdkit = pytest.mark.skipif(NBDKIT is None, reason="needs nbdkit")
NBD_SIZE = 1 << 20


class Nbdkit:
    """nbdkit's file plugin serving ``path`` on a unix socket."""

    def __init__(self, path: Path, sock: str, read_only: bool) -> None:
        assert NBDKIT is not None
        args = [NBDKIT, "-U", sock, "-f", "--exit-with-parent", "-e", "disk"]
        args += ["-r"] if read_only else []
        self.proc = subprocess.Popen(
            [*args, "file", f"file={path}"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        self.sock = sock

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # (a client still connected)
            self.proc.kill()
            self.proc.wait(5)


def nbd_connect(sock: str, structured: bool = True, wait: bool = False) -> Any:
    nbd = _NBD
    assert not isinstance(nbd, str)

    def attempt() -> Any:
        h = nbd.NBD()
        h.set_export_name("disk")
        h.set_request_structured_replies(structured)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.set_strict_mode(0)  # let odd requests reach the server
        h.connect_unix(sock)
        return h

    if not wait:
        return attempt()
    handle: list[Any] = []

    def ready() -> bool:
        try:
            handle.append(attempt())
        except nbd.Error:
            return False
        return True

    wait_until(ready)
    return handle[0]


def nbd_op(h: Any, op: tuple[Any, ...], k: int) -> Any:
    """One command; what the client sees (data, "ok", extents or the errno)."""
    nbd = _NBD
    assert not isinstance(nbd, str)
    name, offset, n, flags = op
    try:
        if name == "read":
            return h.pread(n, offset, flags)
        if name == "write":
            h.pwrite(random.Random(k).randbytes(n), offset, flags)
        elif name == "trim":
            h.trim(n, offset, flags)
        elif name == "zero":
            h.zero(n, offset, flags)
        elif name == "cache":
            h.cache(n, offset, flags)
        elif name == "flush":
            h.flush(flags)
        else:
            got: list[tuple[int, list[int]]] = []

            def extent(meta: str, at: int, entries: list[int], err: Any) -> int:
                got.append((at, list(entries)))
                return 0

            h.block_status(n, offset, extent, flags)
            return ("extents", got)
    except nbd.Error as e:
        return ("error", e.errnum)
    return "ok"


def truthful(got: Any, image: bytes) -> Any:
    """Block status answers may differ between servers; what must hold is
    that every extent said to read as zeros does."""
    if not (isinstance(got, tuple) and got[0] == "extents"):
        return got
    for at, entries in got[1]:
        pos = at
        for length, state in zip(entries[::2], entries[1::2], strict=True):
            assert not (state & 2 and any(image[pos : pos + length])), (pos, length)
            pos += length
    return "extents"


def nbd_program(seed: int, fast_zero: bool) -> list[tuple[Any, ...]]:
    nbd = _NBD
    assert not isinstance(nbd, str)
    rnd = random.Random(seed)
    offsets = [0, 1, 511, 512, 4096, NBD_SIZE - 512, NBD_SIZE - 1, NBD_SIZE, NBD_SIZE + 1, 2**62]
    sizes = [1, 512, 4096, 65537, NBD_SIZE, (32 << 20) + 1]
    zero_flags = [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE]
    zero_flags += [nbd.CMD_FLAG_FAST_ZERO] if fast_zero else []
    program: list[tuple[Any, ...]] = []
    for _ in range(30):
        offset = rnd.choice(offsets) if rnd.random() < 0.4 else rnd.randrange(NBD_SIZE)
        n = rnd.choice(sizes) if rnd.random() < 0.4 else rnd.randrange(1, 70000)
        c = rnd.random()
        if c < 0.2:
            program.append(("read", offset, n, rnd.choice([0, nbd.CMD_FLAG_DF, nbd.CMD_FLAG_FUA])))
        elif c < 0.45:
            program.append(("write", offset, min(n, 1 << 21), rnd.choice([0, nbd.CMD_FLAG_FUA])))
        elif c < 0.55:
            program.append(("trim", offset, n, rnd.choice([0, nbd.CMD_FLAG_FUA])))
        elif c < 0.7:
            program.append(("zero", offset, n, rnd.choice(zero_flags)))
        elif c < 0.78:
            program.append(("cache", offset, n, 0))
        elif c < 0.85:
            program.append(("flush", 0, 0, rnd.choice([0, nbd.CMD_FLAG_FUA])))
        else:
            program.append(("block_status", offset, n, rnd.choice([0, nbd.CMD_FLAG_REQ_ONE])))
    return program


INFO = [
    "get_size",
    "is_read_only",
    "can_flush",
    "can_fua",
    "can_trim",
    "can_zero",
    "can_fast_zero",
    "can_cache",
    "can_multi_conn",
    "can_df",
    "get_structured_replies_negotiated",
]


@needs_libnbd
@needs_nbdkit
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("structured", "read_only", "direct"),
    [(True, False, False), (False, False, False), (True, True, False), (True, False, True)],
    ids=["structured", "simple", "read-only", "direct"],
)
def test_nbd_command_sequences_match_nbdkit(
    disk_dir: str, backend: str, structured: bool, read_only: bool, direct: bool
) -> None:
    """Each reply and the final image are nbdkit's (block status: only as
    truthful).  (Before: a FUA write, trim or write-zeroes to a read-only
    export was EINVAL -- FUA is not advertised there -- where the protocol
    says EPERM, as nbdkit answers; a direct export of an image starting with a hole
    failed unaligned requests.)"""
    nbd = _NBD
    assert not isinstance(nbd, str)
    for seed in range(3):
        d = Path(disk_dir) / str(seed)
        d.mkdir()
        data = random.Random(seed).randbytes(NBD_SIZE // 2)
        theirs_img, ours_img = d / "nbdkit.img", d / "ours.img"
        for p in (theirs_img, ours_img):
            with open(p, "wb") as f:  # a hole, data, a hole
                f.truncate(NBD_SIZE)
                f.seek(3 * 4096)
                f.write(data)
        kit = Nbdkit(theirs_img, str(d / "kit.sock"), read_only)
        st = ServerThread(
            open_export(ours_img, name="disk", read_only=read_only, direct=direct), backend=backend
        ).start(unix=str(d / "ours.sock"))
        try:
            theirs = nbd_connect(kit.sock, structured, wait=True)
            ours = nbd_connect(str(d / "ours.sock"), structured)
            info = {name: getattr(theirs, name)() for name in INFO}
            assert {name: getattr(ours, name)() for name in INFO} == info
            for k, op in enumerate(nbd_program(seed, info["can_fast_zero"])):
                want = truthful(nbd_op(theirs, op, k), theirs_img.read_bytes())
                got = truthful(nbd_op(ours, op, k), ours_img.read_bytes())
                assert got == want, (seed, k, op)
            for h in (theirs, ours):
                h.shutdown()
            assert ours_img.read_bytes() == theirs_img.read_bytes()
        finally:
            kit.stop()
            st.stop()


@needs_libnbd
@needs_nbdkit
@pytest.mark.parametrize("backend", BACKENDS)
def test_nbd_several_connections_at_once_match_nbdkit(disk_dir: str, backend: str) -> None:
    """Three connections, each with many commands in flight (on ranges no
    other command in flight touches), then the images compared."""
    nbd = _NBD
    assert not isinstance(nbd, str)
    slot = 70000
    size = 48 * slot
    images = [Path(disk_dir) / "nbdkit.img", Path(disk_dir) / "ours.img"]
    for p in images:
        with open(p, "wb") as f:
            f.truncate(size)
    kit = Nbdkit(images[0], disk_dir + "/kit.sock", False)
    st = ServerThread(open_export(images[1], name="disk"), backend=backend).start(
        unix=disk_dir + "/ours.sock"
    )
    try:
        for seed in range(4):
            for sock, wait in ((kit.sock, True), (disk_dir + "/ours.sock", False)):
                rnd = random.Random(seed)
                handles = [nbd_connect(sock, rnd.random() < 0.5, wait) for _ in range(3)]
                cookies: dict[int, list[int]] = {i: [] for i in range(3)}
                keep = []
                for k in range(48):
                    i = rnd.randrange(3)
                    h = handles[i]
                    offset, n = k * slot + rnd.randrange(4000), rnd.randrange(1, 65536)
                    c = rnd.random()
                    if c < 0.4:
                        flags = rnd.choice([0, nbd.CMD_FLAG_FUA])
                        cookies[i].append(h.aio_pwrite(rnd.randbytes(n), offset, flags=flags))
                    elif c < 0.55:
                        flags = rnd.choice([0, nbd.CMD_FLAG_NO_HOLE])
                        cookies[i].append(h.aio_zero(n, offset, flags=flags))
                    elif c < 0.65:
                        cookies[i].append(h.aio_trim(n, offset))
                    elif c < 0.7:
                        cookies[i].append(h.aio_flush())
                    else:
                        keep.append(nbd.Buffer(n))
                        cookies[i].append(h.aio_pread(keep[-1], offset))
                for i, h in enumerate(handles):
                    pending = set(cookies[i])
                    while pending:
                        h.poll(10_000)
                        pending = {c for c in pending if not h.aio_command_completed(c)}
                    h.shutdown()
            assert images[1].read_bytes() == images[0].read_bytes(), seed
    finally:
        kit.stop()
        st.stop()


@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
@pytest.mark.parametrize("flags", [0, CmdFlag.FUA, CmdFlag.FUA | CmdFlag.NO_HOLE, 0x8000])
def test_a_write_to_a_read_only_export_is_eperm_whatever_its_flags(cmd: Cmd, flags: int) -> None:
    if cmd != Cmd.WRITE_ZEROES and flags & CmdFlag.NO_HOLE:
        return
    ro = ExportInfo(name="ro", size=1 << 20, read_only=True)
    req = Request(int(cmd), int(flags), 1, 0, 512, b"x" * 512 if cmd == Cmd.WRITE else None)
    assert check_request(req, ro, True, {1: proto.BASE_ALLOCATION})[0] == errno.EPERM
    # (A read with FUA -- not advertised on a read-only export -- stays EINVAL.)
    read = Request(int(Cmd.READ), int(CmdFlag.FUA), 1, 0, 512, None)
    assert check_request(read, ro, True, {})[0] == errno.EINVAL


# -- clients that vanish in the middle of a write ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_client_gone_in_the_middle_of_a_write_leaves_whole_writes_only(
    tmp_path: Path, backend: str
) -> None:
    """Writes sent whole then a cut one (in its header or its payload), and
    the socket closed (or reset).  The cut write never lands; each whole
    one lands entirely or not at all (a reply that cannot be sent may end
    the connection first, as in qemu-nbd and nbdkit); the server serves the
    next client.  (nbdkit 1.32 aborts on this: a model is the oracle.)"""
    image = tmp_path / "image.raw"
    image.write_bytes(random.Random(0).randbytes(NBD_SIZE))
    sock = tempfile.mkdtemp(prefix="nbd-") + "/sock"
    st = ServerThread(open_export(image, name="disk"), backend=backend).start(unix=sock)
    try:
        for seed in range(16):
            rnd = random.Random(seed)
            before = image.read_bytes()
            c = Client.connect(sock)
            c.handshake("disk", structured=rnd.random() < 0.5)
            regions = []
            for i in range(rnd.randrange(0, 5)):
                offset, n = i * 131072 + rnd.randrange(65536), rnd.randrange(1, 65536)
                data = rnd.randbytes(n)
                c.send(Cmd.WRITE, offset, n, rnd.choice([0, int(CmdFlag.FUA)]), data)
                regions.append((offset, data))
            if rnd.random() < 0.5:
                c.send(Cmd.FLUSH)
            offset, n = 7 * 131072 + rnd.randrange(65536), rnd.randrange(2, 65536)
            header = struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, Cmd.WRITE, 999, offset, n)
            if rnd.random() < 0.5:
                c.sock.sendall(header[: rnd.randrange(1, len(header))])
            else:
                c.sock.sendall(header + rnd.randbytes(rnd.randrange(n)))
            if rnd.random() < 0.5:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            wait_until(lambda: not st.server.connections)
            after = image.read_bytes()
            assert after[offset : offset + n] == before[offset : offset + n], seed
            for at, data in regions:
                assert after[at : at + len(data)] in (data, before[at : at + len(data)]), seed
            probe = Client.connect(sock)
            probe.handshake("disk")
            assert probe.read(0, 4096) == after[:4096]
            probe.close()
    finally:
        st.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(os.path.dirname(sock))
