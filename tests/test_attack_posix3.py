"""Attack round 3 on threadlets.posix: random request sequences against
glibc's own aio_* on the same kinds of file (regular, O_APPEND, read-only,
write-only, a directory, /dev/null, a non-blocking pipe, a closed fd, an fd
number that dup2 points at another file between calls), zero-length
transfers, aio_suspend's odd timeouts, and what the earlier rounds held
(fork with requests in flight, SIGEV_THREAD functions that call aio_*
themselves, lio_listio with a bad entry), on both engine backends.
"""

from __future__ import annotations

import errno
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import threadlets.posix as px
from threadlets import AioContext, RingUnavailable

from . import glibc_aio
from .conftest import interrupt_at_c_return, wait_until

needs_glibc = pytest.mark.skipif(not glibc_aio.AVAILABLE, reason="needs glibc on x86_64/aarch64")
DATA = bytes(range(256)) * 32  # 8 KiB
BACKENDS = ["threads", "io_uring"]


@pytest.fixture(params=BACKENDS)
def rt(request: pytest.FixtureRequest) -> Iterator[px.PosixAio]:
    """A runtime of its own on each engine backend."""
    try:
        ctx = AioContext(deliver=False, backend=request.param)
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")
    yield px.PosixAio(ctx)
    assert ctx.close(timeout=10)


# -- the differential model ---------------------------------------------------------------

KINDS = ["rw", "ro", "wo", "append", "nonblock", "dir", "null", "pipe", "closed", "slot"]


class Files:
    """One side's files: the same kinds, by name, for threadlets and glibc.
    ``slot`` is an fd number that ``reuse`` points at another kind's file."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.path = root / "data"
        self.path.write_bytes(DATA)
        p = str(self.path)
        self.fds = {
            "rw": os.open(p, os.O_RDWR),
            "ro": os.open(p, os.O_RDONLY),
            "wo": os.open(p, os.O_WRONLY),
            "append": os.open(p, os.O_RDWR | os.O_APPEND),
            "nonblock": os.open(p, os.O_RDWR | os.O_NONBLOCK),
            "dir": os.open(root, os.O_RDONLY),
            "null": os.open(os.devnull, os.O_RDWR),
        }
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.write(w, b"piped data")
        self.fds["pipe"] = r
        self.pipe_w = w
        self.fds["slot"] = os.dup(self.fds["rw"])
        closed = os.open(os.devnull, os.O_RDONLY)
        os.close(closed)
        self.fds["closed"] = 10**6  # (far above any number this process uses)

    def reuse(self, kind: str) -> None:
        os.dup2(self.fds[kind] if kind != "closed" else self.fds["null"], self.fds["slot"])

    def close(self) -> None:
        for kind, fd in self.fds.items():
            if kind != "closed":
                os.close(fd)
        os.close(self.pipe_w)


Op = tuple[str, str, int, int]
OFFSETS = [-1, 0, 1, 4095, 4096, len(DATA) - 1, len(DATA), 10**6, 2**63 - 1, 2**63 - 4, 2**63]
SIZES = [0, 1, 7, 4096]

ops = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["read", "write", "fsync", "fdatasync", "lio"]),
            st.sampled_from(KINDS),
            st.sampled_from(OFFSETS),
            st.sampled_from(SIZES),
        ),
        st.tuples(st.just("reuse"), st.sampled_from(KINDS[:-1]), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


def run_one(impl: Any, files: Files, op: Op, k: int) -> tuple[Any, ...]:
    """One step, finished before the next: what the caller can see."""
    name, kind, offset, n = op
    if name == "reuse":
        files.reuse(kind)
        return ("reused",)
    fd = files.fds[kind]
    write = name == "write" or (name == "lio" and k % 2)
    payload = bytes((k * 7 + i) & 0xFF for i in range(n))
    if impl is not glibc_aio:
        buf: Any = bytearray(payload) if write else bytearray(n)
    else:
        buf = payload if write else bytes(n)
    cb = impl.aiocb(fd, offset, buf)
    try:
        if name == "read":
            impl.aio_read(cb)
        elif name == "write":
            impl.aio_write(cb)
        elif name == "lio":
            cb = impl.aiocb(fd, offset, buf, lio_opcode=px.LIO_WRITE if write else px.LIO_READ)
            impl.lio_listio(px.LIO_WAIT, [cb])
        else:
            impl.aio_fsync(os.O_SYNC if name == "fsync" else os.O_DSYNC, cb)
    except OSError as e:
        if name != "lio" or e.errno != errno.EIO:
            return ("raised", e.errno)
    impl.aio_suspend([cb], 10)
    err, ret = impl.aio_error(cb), impl.aio_return(cb)
    data = bytes(cb.aio_buf)[: max(ret, 0)] if not write and name != "fsync" else b""
    try:
        cancelled: Any = impl.aio_cancel(fd)
    except OSError as e:
        cancelled = ("raised", e.errno)
    return err, ret, data, cancelled


@needs_glibc
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(program=ops)
def test_random_sequences_match_glibc(
    rt: px.PosixAio, tmp_path_factory: pytest.TempPathFactory, program: list[Op]
) -> None:
    """Each step's error, return value, data read and aio_cancel answer,
    and the file at the end, are glibc's (sequential steps: where glibc's
    one-request-per-fd rule and our parallel runs would differ nothing
    overlaps)."""
    base = tmp_path_factory.mktemp("seq")
    ours, theirs = Files(base / "ours"), Files(base / "glibc")
    impl = _Runtime(rt)
    try:
        for k, op in enumerate(program):
            got, want = run_one(impl, ours, op, k), run_one(glibc_aio, theirs, op, k)
            assert got == want, (k, op)
        assert ours.path.read_bytes() == theirs.path.read_bytes()
    finally:
        ours.close()
        theirs.close()


EDGES = [
    ("read", "wo", 2**63 - 1, 1),  # the kernel checks the fd before the range: EBADF
    ("write", "ro", 2**63 - 4, 7),
    ("read", "pipe", 2**63 - 1, 7),  # pread fails ESPIPE, glibc reads: no offset used
    ("write", "pipe", 2**63 - 4, 7),  # (the write end is not ours: EBADF, after the range)
    ("read", "null", 2**63 - 1, 1),  # a seekable character device: EINVAL
    ("read", "wo", 2**63, 0),  # not an off_t: EINVAL first
    ("read", "closed", -1, 1),
    ("read", "dir", 0, 0),  # EISDIR
    ("write", "dir", 0, 0),
]


@needs_glibc
@pytest.mark.parametrize("step", EDGES, ids=repr)
@pytest.mark.parametrize("how", ["quick", "lio"])
def test_refusals_come_in_the_kernels_order(
    rt: px.PosixAio, tmp_path: Path, step: Op, how: str
) -> None:
    """Where several things are wrong, the error is the one pread/pwrite
    gives (glibc's); a pipe takes any offset.  (EINVAL came first for an
    offset past MAX_OFFSET, and a pipe refused one.)"""
    ours, theirs = Files(tmp_path / "ours"), Files(tmp_path / "glibc")
    name, kind, offset, n = step
    op = (name if how == "quick" else "lio", kind, offset, n)
    k = int(name == "write")  # (run_one's lio writes on odd steps)
    try:
        got, want = run_one(_Runtime(rt), ours, op, k), run_one(glibc_aio, theirs, op, k)
        assert got == want
    finally:
        ours.close()
        theirs.close()
    assert ours.path.read_bytes() == theirs.path.read_bytes() == DATA


class _Runtime:
    """A PosixAio runtime with the module's interface (for run_one)."""

    def __init__(self, rt: px.PosixAio) -> None:
        self.rt = rt
        self.aiocb = px.aiocb

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn: Callable[..., Any] = getattr(self.rt, name)
        return fn


# -- zero-length transfers ---------------------------------------------------------------


ZERO_CASES = [
    ("read", os.O_WRONLY, errno.EBADF),
    ("write", os.O_RDONLY, errno.EBADF),
    ("read", os.O_RDONLY, 0),
    ("write", os.O_WRONLY, 0),
    ("read", getattr(os, "O_PATH", os.O_RDONLY), errno.EBADF if hasattr(os, "O_PATH") else 0),
]


@pytest.mark.parametrize(("op", "flags", "want"), ZERO_CASES)
@pytest.mark.parametrize("how", ["quick", "general", "lio"])
def test_a_zero_length_transfer_still_needs_the_fd_open_that_way(
    rt: px.PosixAio, tmp_path: Path, op: str, flags: int, want: int, how: str
) -> None:
    """read(2)/write(2) of 0 bytes checks the fd's access mode (glibc
    reports EBADF); the engine makes no call for 0 bytes, so this was 0."""
    p = tmp_path / "f"
    p.write_bytes(DATA)
    fd = os.open(p, flags)
    try:
        buf = bytearray(0)
        if how == "lio":
            opcode = px.LIO_READ if op == "read" else px.LIO_WRITE
            cb = px.aiocb(fd, 0, buf, lio_opcode=opcode)
            if want:
                with pytest.raises(OSError) as failed:
                    rt.lio_listio(px.LIO_WAIT, [cb])
                assert failed.value.errno == errno.EIO
            else:
                rt.lio_listio(px.LIO_WAIT, [cb])
        else:
            sigev = None if how == "quick" else px.sigevent(px.SIGEV_NONE)
            cb = px.aiocb(fd, 0, buf, sigevent=sigev)
            for _ in range(2):  # (the second: the quick path knows the fd)
                (rt.aio_read if op == "read" else rt.aio_write)(cb)
                rt.aio_suspend([cb], 10)
                assert (rt.aio_error(cb), rt.aio_return(cb)) == (want, -1 if want else 0)
        rt.aio_suspend([cb], 10)
        assert (rt.aio_error(cb), rt.aio_return(cb)) == (want, -1 if want else 0)
    finally:
        os.close(fd)
    assert p.read_bytes() == DATA


@needs_glibc
@pytest.mark.parametrize("op", ["read", "write"])
def test_zero_length_on_a_directory_matches_glibc(tmp_path: Path, op: str) -> None:
    outcomes = []
    for impl in (px, glibc_aio):
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            cb = impl.aiocb(fd, 0, bytearray(0) if impl is px else b"")
            (impl.aio_read if op == "read" else impl.aio_write)(cb)
            impl.aio_suspend([cb], 10)
            outcomes.append((impl.aio_error(cb), impl.aio_return(cb)))
        finally:
            os.close(fd)
    assert outcomes[0] == outcomes[1] == [(errno.EISDIR, -1), (errno.EBADF, -1)][op == "write"]


# -- aio_suspend's timeouts ----------------------------------------------------------------


@pytest.fixture
def pending(rt: px.PosixAio) -> Iterator[tuple[px.PosixAio, px.aiocb, int]]:
    """A read of an empty pipe: in progress until the test writes."""
    r, w = os.pipe()
    cb = px.aiocb(r, 0, bytearray(4))
    rt.aio_read(cb)
    try:
        yield rt, cb, w
    finally:
        if rt.aio_error(cb) == errno.EINPROGRESS:
            os.write(w, b"done")
        rt.aio_suspend([cb], 10)
        os.close(r)
        os.close(w)


def test_a_nan_timeout_is_a_value_error_at_once(
    pending: tuple[px.PosixAio, px.aiocb, int],
) -> None:
    """As time.sleep and select.select: ValueError.  (It waited for ever:
    a lock's wait with a NaN timeout never times out.)"""
    rt, cb, w = pending
    outcome: list[BaseException | None] = []

    def suspend() -> None:
        try:
            rt.aio_suspend([cb], math.nan)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=suspend, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        os.write(w, b"free")  # (lets the old code's waiter go)
        t.join(10)
        pytest.fail("aio_suspend(timeout=nan) waited")
    assert isinstance(outcome[0], ValueError)
    assert "NaN" in str(outcome[0])
    assert rt.aio_error(cb) == errno.EINPROGRESS  # nothing else changed


@pytest.mark.parametrize("timeout", [math.inf, 1e300, 2**70])
def test_a_timeout_beyond_what_a_lock_waits_means_for_ever(
    pending: tuple[px.PosixAio, px.aiocb, int], timeout: float
) -> None:
    """glibc waits for such a timespec; we raised OverflowError from inside
    the wait."""
    rt, cb, w = pending
    outcome: list[BaseException | None] = []

    def suspend() -> None:
        try:
            rt.aio_suspend([cb], timeout)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=suspend)
    t.start()
    wait_until(lambda: rt._waiting == 1 or bool(outcome))
    os.write(w, b"data")
    t.join(10)
    assert outcome == [None]
    assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, 4)
    rt.aio_suspend([cb], math.inf)  # done: returns at once


def test_a_zero_timeout_polls(pending: tuple[px.PosixAio, px.aiocb, int]) -> None:
    rt, cb, w = pending
    for timeout in (0, 0.0, -0.0, 1e-9):
        with pytest.raises(OSError) as e:
            rt.aio_suspend([cb], timeout)
        assert e.value.errno == errno.EAGAIN
    rt.aio_suspend([None, None], 0)  # nothing to wait for
    rt.aio_suspend([], math.inf)
    os.write(w, b"data")
    rt.aio_suspend([cb, None, cb], 10)


# -- use_context from several threads ----------------------------------------------------


def test_use_context_blocks_of_two_threads_may_end_in_any_order(tmp_path: Path) -> None:
    """Thread A opens a block with context a, thread B one with b, A's
    ends first.  B's requests go on to b, and after both the runtime is
    back on its own context.  (A's end restored what A saw before -- none
    -- while B was inside; B's end then restored a, which A's owner may
    have closed: every later request of the runtime failed.)"""
    p = tmp_path / "f"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDONLY)
    rt = px.PosixAio()
    a = AioContext(deliver=False, backend="threads")
    b = AioContext(deliver=False, backend="threads")
    steps = [threading.Event() for _ in range(4)]
    seen: dict[str, Any] = {}

    def thread_a() -> None:
        with rt.use_context(a) as got:
            seen["a"] = got
            steps[0].set()
            steps[1].wait(10)
        steps[2].set()

    def thread_b() -> None:
        steps[0].wait(10)
        with rt.use_context(b) as got:
            seen["b"] = got
            steps[1].set()
            steps[2].wait(10)
            seen["inside b after a"] = rt.context
            cb = px.aiocb(fd, 0, bytearray(8))
            rt.aio_read(cb)
            rt.aio_suspend([cb], 10)
            seen["read"] = (rt.aio_error(cb), rt.aio_return(cb))

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen["a"] is a
        assert seen["b"] is b
        assert seen["inside b after a"] is b
        assert seen["read"] == (0, 8)
        assert b.stats().submitted == 1
        assert a.stats().submitted == 0
        a.close()
        assert rt.context is not a
        assert rt.context is not b
        cb = px.aiocb(fd, 0, bytearray(8))
        rt.aio_read(cb)  # (on the runtime's own context)
        rt.aio_suspend([cb], 10)
        assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, 8)
    finally:
        os.close(fd)
        b.close()
        rt.context.close()


def test_set_context_inside_a_block_lasts_for_the_block(tmp_path: Path) -> None:
    rt = px.PosixAio()
    a = AioContext(deliver=False, backend="threads")
    b = AioContext(deliver=False, backend="threads")
    try:
        assert rt.set_context(a) is None
        with rt.use_context(None) as own:
            assert rt.context is own
            assert own is not a
            assert rt.set_context(b) is None
            assert rt.context is b
        assert rt.context is a
        delivering = AioContext(backend="threads")
        try:
            with pytest.raises(ValueError, match="deliver=False"), rt.use_context(delivering):
                pass
        finally:
            delivering.close()
        assert rt.context is a
        assert rt.set_context(None) is a
    finally:
        a.close()
        b.close()
        rt.context.close()


# -- what held ---------------------------------------------------------------------------


def test_a_child_forked_with_requests_in_flight_on_a_given_context(
    rt: px.PosixAio, tmp_path: Path
) -> None:
    """Requests the parent had in flight (a read of an empty pipe, an fsync
    waiting for it, one with a SIGEV_THREAD notification) read ECANCELED /
    -1 in the child at once; the child's runtime then reads, appends,
    syncs and lists on its own; the parent's requests finish normally."""
    p = tmp_path / "f"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDWR)
    afd = os.open(p, os.O_RDWR | os.O_APPEND)
    r, w = os.pipe()
    notified = threading.Event()
    blocked = px.aiocb(r, 0, bytearray(3))
    rt.aio_read(blocked)
    barrier = px.aiocb(r)
    rt.aio_fsync(os.O_SYNC, barrier)  # waits for the read
    sigev = px.sigevent(px.SIGEV_THREAD, function=lambda _: notified.set())
    noted = px.aiocb(r, 0, bytearray(1), sigevent=sigev)
    rt.aio_read(noted)
    parents = [blocked, barrier, noted]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            rt.aio_suspend(parents, 0)  # (done: no EAGAIN)
            if [(rt.aio_error(c), rt.aio_return(c)) for c in parents] == [
                (errno.ECANCELED, -1)
            ] * 3 and rt.aio_cancel(r) == px.AIO_ALLDONE:
                code = 2
                r2, w2 = os.pipe()
                os.write(w2, b"zz")
                steps = [
                    px.aiocb(fd, 0, bytearray(4), lio_opcode=px.LIO_READ),
                    px.aiocb(afd, 0, bytearray(b"child"), lio_opcode=px.LIO_WRITE),
                    px.aiocb(r2, 0, bytearray(2), lio_opcode=px.LIO_READ),
                ]
                rt.lio_listio(px.LIO_WAIT, steps)
                sync = px.aiocb(afd)
                rt.aio_fsync(os.O_DSYNC, sync)
                rt.aio_suspend([sync], 10)
                if [rt.aio_return(c) for c in (*steps, sync)] == [4, 5, 2, 0]:
                    code = 0
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.write(w, b"abcd")
        for c in parents:
            rt.aio_suspend([c], 10)
        # (An fsync of a pipe: EINVAL, as glibc.)
        assert [(rt.aio_error(c), rt.aio_return(c)) for c in parents] == [
            (0, 3),
            (errno.EINVAL, -1),
            (0, 1),
        ]
        assert notified.wait(10)
        assert p.read_bytes() == DATA + b"child"
    finally:
        for f in (fd, afd, r, w):
            os.close(f)


def test_ctrl_c_at_every_c_return_of_a_waiting_list(rt: px.PosixAio, tmp_path: Path) -> None:
    """For n = 1, 2, ...: Ctrl-C as the n-th C call of posix.py returns in
    lio_listio(LIO_WAIT) of a file read, two O_APPEND writes and an entry
    refused EINVAL, while a pipe read and an fsync behind it wait: every
    aiocb ends finished, the appends land whole and in order (or not at
    all), and nothing is left on the runtime's tables."""
    p = tmp_path / "f"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDWR)
    afd = os.open(p, os.O_RDWR | os.O_APPEND)
    ctx = rt.context
    try:
        n = 0
        while True:
            n += 1
            assert n < 300, "the list never ran to its end"
            run = px.PosixAio(ctx)
            r, w = os.pipe()
            pre = px.aiocb(r, 0, bytearray(2))
            run.aio_read(pre)
            fsync = px.aiocb(r)
            run.aio_fsync(os.O_SYNC, fsync)
            entries = [
                px.aiocb(fd, 0, bytearray(8), lio_opcode=px.LIO_READ),
                px.aiocb(afd, 0, bytearray(b"ab"), lio_opcode=px.LIO_WRITE),
                px.aiocb(afd, 0, bytearray(b"cd"), lio_opcode=px.LIO_WRITE),
                px.aiocb(fd, -1, bytearray(8), lio_opcode=px.LIO_READ),
            ]
            size = os.fstat(fd).st_size
            interrupted = False
            seen = interrupt_at_c_return(n, only=px.__file__)
            failed = 0
            try:
                run.lio_listio(px.LIO_WAIT, [None, *entries])
            except KeyboardInterrupt:
                interrupted = True
            except OSError as e:
                failed = e.errno or -1
            finally:
                sys.setprofile(None)
            assert failed in (0, errno.EIO), n
            os.write(w, b"zz")
            for c in [pre, fsync, *entries]:
                if c._status != "idle":
                    run.aio_suspend([c], 10)
                    assert run.aio_error(c) != errno.EINPROGRESS, n
            assert not run._fds, (n, run._fds)
            with open(p, "rb") as f:
                f.seek(size)
                assert f.read() in (b"", b"ab", b"abcd"), n
            os.close(r)
            os.close(w)
            if not interrupted and seen[0] < n:
                break
        assert n > 20  # (it ran through many C returns)
    finally:
        os.close(fd)
        os.close(afd)
