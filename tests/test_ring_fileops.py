"""The front ends' requests -- ``openat``, ``stat``, ``close_fd`` -- on both
engine backends: each gives exactly what os.open, os.stat and os.close give
(the worker path, the reference), errors included; on the io_uring backend
each runs on the ring (OPENAT, STATX, CLOSE) and falls back to the pool for
what the kernel lacks; nothing leaks descriptors (cancelled, forked or
1000 times over)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets import awaitable as aw
from threadlets import uring
from threadlets.engine import AioContext, AioRequest
from threadlets.pool import CancelResult

from .conftest import HAVE_RING, wait_until

SRC = str(Path(threadlets.__file__).resolve().parent.parent)

STAT_FIELDS = (
    "st_mode",
    "st_ino",
    "st_dev",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_atime",
    "st_mtime",
    "st_ctime",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
    "st_blksize",
    "st_blocks",
    "st_rdev",
)


@pytest.fixture
def ctx(backend: str) -> Iterator[AioContext]:
    c = AioContext(backend=backend)
    yield c
    assert c.close(timeout=10)


def outcome(ctx: AioContext, req: AioRequest) -> Any:
    """The request's result, or the exception it raised (None: cancelled)."""
    assert ctx.wait(req, timeout=10)
    if req.cancelled():
        return None
    exc = req.exception()
    return exc if exc is not None else req.result()


def os_outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except OSError as e:
        return e


def assert_same_error(got: object, expected: object) -> None:
    assert isinstance(expected, OSError), expected
    assert type(got) is type(expected), (got, expected)
    assert isinstance(got, OSError)
    assert (got.errno, got.strerror, got.filename, got.filename2) == (
        expected.errno,
        expected.strerror,
        expected.filename,
        expected.filename2,
    )


def assert_same_stat(got: object, expected: os.stat_result) -> None:
    assert isinstance(got, os.stat_result), got
    assert tuple(got) == tuple(expected)
    for name in STAT_FIELDS:
        a, b = getattr(got, name), getattr(expected, name)
        assert (type(a), a) == (type(b), b), name


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def on_ring(ctx: AioContext) -> bool:
    return ctx.backend == "io_uring"


# -- openat ------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A file, a directory, a symlink to each, a symlink loop, a FIFO."""
    (tmp_path / "file").write_bytes(b"data")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("file")
    (tmp_path / "dirlink").symlink_to("dir")
    (tmp_path / "loop").symlink_to("loop")
    os.mkfifo(tmp_path / "fifo")
    return tmp_path


NB = os.O_NONBLOCK
OPEN_CASES = [
    ("file", os.O_RDONLY | NB),
    ("file", os.O_RDWR | NB),
    ("file", os.O_RDONLY),  # (no flag for the ring: the pool)
    ("file", os.O_WRONLY | os.O_TRUNC),
    ("new", os.O_WRONLY | os.O_CREAT),
    ("file", os.O_WRONLY | os.O_CREAT | os.O_EXCL),  # EEXIST
    ("missing", os.O_RDONLY | NB),  # ENOENT
    ("dir", os.O_WRONLY | NB),  # EISDIR
    ("dir", os.O_RDONLY | os.O_DIRECTORY | NB),
    ("file", os.O_RDONLY | os.O_DIRECTORY | NB),  # ENOTDIR
    ("link", os.O_RDONLY | os.O_NOFOLLOW | NB),  # ELOOP
    ("loop", os.O_RDONLY | NB),  # ELOOP
    ("file/x", os.O_RDONLY | NB),  # ENOTDIR
    ("fifo", os.O_RDONLY | NB),
    ("fifo", os.O_WRONLY | NB),  # ENXIO: no reader
    ("", os.O_RDONLY | NB),  # ENOENT
]


def _describe(fd: int) -> tuple[int, int, int, bool]:
    st = os.fstat(fd)
    fl = os.get_blocking(fd), os.get_inheritable(fd)
    return st.st_ino, stat.S_IMODE(st.st_mode), fcntl_flags(fd), fl == (fl[0], False)


def _made(new: Path) -> int | None:
    """The mode bits of the file an open made (then removed), or None."""
    if not new.exists():
        return None
    mode = stat.S_IMODE(new.stat().st_mode)
    new.unlink()
    return mode


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


@pytest.mark.parametrize(("name", "flags"), OPEN_CASES)
def test_openat_is_os_open(ctx: AioContext, tree: Path, name: str, flags: int) -> None:
    """Same descriptor (flags, close-on-exec, file) or the same error as
    os.open, by path and through dir_fd; on the ring where the flags let it
    open exactly as open(2) does."""
    dfd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for mode in (0o640, 0o777):
            for dir_fd in (None, dfd):
                path = str(tree / name) if dir_fd is None and name else name
                new = tree / "new"
                before = ctx.stats().ring
                got = outcome(ctx, ctx.openat(path, flags, mode, dir_fd=dir_fd))
                ring_took = ctx.stats().ring - before
                got_fd = _describe(got) if isinstance(got, int) else None
                made = _made(new)
                expected = os_outcome(lambda: os.open(path, flags, mode, dir_fd=dir_fd))  # noqa: B023
                want_fd = _describe(expected) if isinstance(expected, int) else None
                assert made == _made(new)  # (the same mode bits, if it made a file)
                for fd in (got, expected):
                    if isinstance(fd, int):
                        os.close(fd)
                if isinstance(expected, OSError):
                    assert_same_error(got, expected)
                else:
                    assert got_fd is not None, got
                    assert want_fd is not None
                    if made is not None:  # two files made: not the same inode
                        got_fd, want_fd = got_fd[1:], want_fd[1:]
                    assert got_fd == want_fd
                ring_flags = flags & (os.O_NONBLOCK | os.O_CREAT | os.O_TRUNC)
                assert ring_took == (1 if on_ring(ctx) and ring_flags else 0)
    finally:
        os.close(dfd)


def test_openat_takes_what_os_open_takes(ctx: AioContext, tree: Path) -> None:
    """Paths as bytes and PathLike; bad arguments raise at once as os.open's."""
    for path in (os.fsencode(tree / "file"), tree / "file"):
        fd = outcome(ctx, ctx.openat(path, os.O_RDONLY | NB))
        assert isinstance(fd, int)
        os.close(fd)
    missing = tree / "missing"
    got = outcome(ctx, ctx.openat(missing, os.O_RDONLY | NB))
    assert_same_error(got, os_outcome(lambda: os.open(missing, os.O_RDONLY | NB)))
    for bad, args in ((1.5, (0,)), (3, (0,)), ("a\0b", (0,)), ("f", ("r",)), ("f", (0, "x"))):
        with pytest.raises(Exception) as want:
            os.open(bad, *args)  # type: ignore[arg-type]
        with pytest.raises(type(want.value), match=str(want.value)):
            ctx.openat(bad, *args)  # type: ignore[arg-type]
    assert ctx.stats().submitted == 3


def test_openat_of_a_fifo_waits_as_open_does(ctx: AioContext, tree: Path) -> None:
    """Without O_NONBLOCK a FIFO's writer waits for a reader (os.open),
    never ENXIO (the ring's first, non-blocking attempt would say that)."""
    fifo = str(tree / "fifo")
    req = ctx.openat(fifo, os.O_WRONLY)
    wait_until(lambda: ctx.process_completions() > 0 or waiting_for_a_partner())
    assert not req.done(), req.exception()
    reader = os.open(fifo, os.O_RDONLY | NB)
    try:
        fd = outcome(ctx, req)
        assert isinstance(fd, int)
        os.close(fd)
    finally:
        os.close(reader)


def waiting_for_a_partner() -> bool:
    """Some thread of ours (a worker, or the kernel's io-wq worker for the
    ring) waits in a FIFO's open for the other end."""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/wchan") as f:
                if f.read() == "wait_for_partner":
                    return True
        except OSError:
            pass
    return False


# -- stat --------------------------------------------------------------------------------


def test_stat_is_os_stat(ctx: AioContext, tree: Path) -> None:
    """Every field as os.stat gives it: nanosecond and pre-1970 times, the
    float times, st_dev/st_rdev, st_blocks and st_blksize, a large sparse
    size; by fd, path, dir_fd, with and without following symlinks."""
    f = tree / "file"
    os.utime(f, ns=(-1_234_567_890_123_456_789, 1_700_000_000_987_654_321))
    big = tree / "big"
    with open(big, "wb") as b:
        b.truncate(1 << 41)
    dfd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(f, os.O_RDONLY)
    try:
        cases: list[tuple[Any, dict[str, Any]]] = [
            (fd, {}),
            (dfd, {}),
            (str(f), {}),
            (os.fsencode(f), {}),
            (f, {}),
            (tree / "link", {}),
            (tree / "link", {"follow_symlinks": False}),
            (tree / "dirlink", {"follow_symlinks": False}),
            (tree / "dir", {}),
            (tree / "fifo", {}),
            (big, {}),
            ("/dev/null", {}),
            ("/proc/self", {"follow_symlinks": False}),
            ("file", {"dir_fd": dfd}),
            ("link", {"dir_fd": dfd, "follow_symlinks": False}),
        ]
        for target, kw in cases:
            req = ctx.stat(target, **kw)
            got = outcome(ctx, req)
            assert_same_stat(got, os.stat(target, **kw))
        assert ctx.stats().ring == (len(cases) if on_ring(ctx) else 0)
    finally:
        os.close(fd)
        os.close(dfd)


def test_stat_errors_are_os_stats(ctx: AioContext, tree: Path) -> None:
    closed = os.open(tree / "file", os.O_RDONLY)
    os.close(closed)
    cases: list[tuple[Any, dict[str, Any]]] = [
        (str(tree / "missing"), {}),  # ENOENT
        (tree / "missing", {}),
        (os.fsencode(tree / "missing"), {}),
        (tree / "loop", {}),  # ELOOP
        (tree / "file" / "x", {}),  # ENOTDIR
        ("", {}),  # ENOENT
        (closed, {}),  # EBADF (filename: the fd, as os.stat sets it)
        ("file", {"dir_fd": closed}),  # EBADF
    ]
    for target, kw in cases:
        got = outcome(ctx, ctx.stat(target, **kw))
        assert_same_error(got, os_outcome(lambda: os.stat(target, **kw)))  # noqa: B023
    with pytest.raises(TypeError):
        ctx.stat(True)  # type: ignore[arg-type]
    for target, kw in [
        (1.5, {}),
        ("a\0b", {}),
        (3, {"dir_fd": 4}),
        (3, {"follow_symlinks": False}),
    ]:
        with pytest.raises(Exception) as want:
            os.stat(target, **kw)  # type: ignore[arg-type]
        with pytest.raises(type(want.value), match=str(want.value)):
            ctx.stat(target, **kw)  # type: ignore[arg-type]


# -- close -------------------------------------------------------------------------------


def test_close_fd_is_os_close(ctx: AioContext, tree: Path) -> None:
    fd = os.open(tree / "file", os.O_RDONLY)
    ctx.read(fd, 0, bytearray(1)).wait(10)  # the context knows fd now
    before = ctx.stats().ring
    assert outcome(ctx, ctx.close_fd(fd)) == 0
    assert ctx.stats().ring - before == (1 if on_ring(ctx) else 0)
    assert fd not in ctx._files  # forgotten: the number may be reused
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF
    got = outcome(ctx, ctx.close_fd(fd))
    assert_same_error(got, os_outcome(lambda: os.close(fd)))


def test_close_fd_of_a_file_a_request_still_uses(ctx: AioContext, tree: Path) -> None:
    """As after os.close: a request already in flight on the fd finishes
    with the file it started on (a read of an empty pipe: then written)."""
    r, w = os.pipe()
    buf = bytearray(2)
    try:
        req = ctx.read(r, 0, buf)
        wait_until(lambda: req.state is threadlets.ThreadletState.RUNNING)
        rr = os.dup(r)  # (the pipe stays open for the writer's sake)
        assert outcome(ctx, ctx.close_fd(r)) == 0
        os.write(w, b"ok")
        assert outcome(ctx, req) == 2
        assert buf == b"ok"
        os.close(rr)
    finally:
        os.close(w)


# -- the fallback: probe says missing -> the pool -------------------------------------------


@pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")
@pytest.mark.parametrize("opcode", ["OP_OPENAT", "OP_STATX", "OP_CLOSE"])
def test_a_missing_opcode_goes_to_the_pool(
    tree: Path, opcode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    op = getattr(uring, opcode)
    with AioContext(backend="io_uring") as ctx:
        assert ctx._ring is not None
        assert op in ctx._ring.supported
        monkeypatch.setattr(ctx._ring, "supported", ctx._ring.supported - {op})
        fd = outcome(ctx, ctx.openat(tree / "file", os.O_RDONLY | NB))
        st = outcome(ctx, ctx.stat(fd))
        assert_same_stat(st, os.fstat(fd))
        assert outcome(ctx, ctx.close_fd(fd)) == 0
        stats = ctx.stats()
        assert (stats.threaded, stats.ring) == (1, 2)
        with pytest.raises(OSError):
            os.fstat(fd)


# -- no leaks --------------------------------------------------------------------------------


def test_a_thousand_cycles_leave_no_descriptor(ctx: AioContext, tree: Path) -> None:
    f = str(tree / "file")
    start = fd_count()
    for i in range(1000):
        fd = outcome(ctx, ctx.openat(f, os.O_RDONLY | NB if i % 2 else os.O_RDWR | os.O_CREAT))
        assert outcome(ctx, ctx.stat(fd)).st_size == 4
        assert outcome(ctx, ctx.close_fd(fd)) == 0
    assert fd_count() == start


def test_a_cancelled_open_in_flight_leaves_no_descriptor(ctx: AioContext, tree: Path) -> None:
    """An open of a FIFO that waits for a writer (in the kernel's hands on
    the ring: O_CREAT opens in its blocking path), cancelled before it runs
    or while it waits: CANCELED opens nothing; NOTCANCELED finishes with
    the descriptor, which is the caller's."""
    fifo = str(tree / "fifo")
    start = fd_count()
    for waiting in (False, True, False, True):
        req = ctx.openat(fifo, os.O_RDONLY | os.O_CREAT)
        if waiting:
            wait_until(waiting_for_a_partner)
        answer = req.cancel()
        if waiting:
            assert answer is CancelResult.NOTCANCELED
        writer = -1
        if answer is CancelResult.NOTCANCELED:
            writer = _writer_for(fifo, ctx)
        got = outcome(ctx, req)
        if isinstance(got, int):
            os.close(got)
        else:
            assert answer is CancelResult.CANCELED
            assert req.error == errno.ECANCELED
        if writer >= 0:
            os.close(writer)
        assert fd_count() == start


def _writer_for(fifo: str, ctx: AioContext) -> int:
    """Open the FIFO's write end once a reader waits for it.  (The ring
    hands an open interrupted by the cancel to a worker as its completion
    is reaped: the owner reaps meanwhile.)"""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | NB)
        except OSError as e:
            if e.errno != errno.ENXIO:  # (ENXIO: no reader yet)
                raise
            wait_until(lambda: ctx.process_completions() >= 0 and waiting_for_a_partner())


def test_fork_with_an_open_in_flight(backend: str, tmp_path: Path) -> None:
    """The child sees the parent's open CANCELLED at once (no hang) and
    gains no descriptor; the parent's open finishes as usual."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    code = f"""
import os, sys, threadlets
sys.path.insert(0, {os.path.dirname(__file__) + "/.."!r})
from tests.test_ring_fileops import fd_count, waiting_for_a_partner
from tests.conftest import wait_until
start = fd_count()
ctx = threadlets.AioContext(backend={backend!r})
req = ctx.openat({fifo!r}, os.O_RDONLY | os.O_CREAT)
wait_until(waiting_for_a_partner)  # in flight: waiting for a writer
pid = os.fork()
if pid == 0:
    base = fd_count()
    ok = ctx.drain(timeout=5) and req.state is threadlets.ThreadletState.CANCELLED
    ok = ok and ctx.close(timeout=5) and fd_count() <= base
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
w = os.open({fifo!r}, os.O_WRONLY | os.O_NONBLOCK)
assert ctx.wait(req, timeout=10)
os.close(req.result())
os.close(w)
assert ctx.close(timeout=10)
assert fd_count() == start, (fd_count(), start)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, timeout=60, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_eacces_as_os_gives_it(backend: str) -> None:
    """EACCES needs an unprivileged user: a child drops to nobody.  (Its
    files go in a directory it can reach, which root removes after.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    d = tempfile.mkdtemp()
    os.chown(d, 65534, 65534)
    code = f"""
import os, sys, threadlets
ctx = threadlets.AioContext(backend={backend!r})
d = {d!r}
os.setgid(65534); os.setuid(65534)
secret = os.path.join(d, "secret")
os.close(os.open(secret, os.O_CREAT | os.O_WRONLY, 0))
locked = os.path.join(d, "locked"); os.mkdir(locked); os.chmod(locked, 0)
def run(req):
    assert ctx.wait(req, timeout=10)
    return req.exception()
def expect(fn):
    try:
        fn()
    except OSError as e:
        return e
for path, flags in ((secret, os.O_RDONLY | os.O_NONBLOCK), (secret, os.O_WRONLY | os.O_CREAT),
                    (locked + "/x", os.O_RDONLY | os.O_NONBLOCK)):
    got, want = run(ctx.openat(path, flags)), expect(lambda: os.open(path, flags))
    assert type(got) is type(want) is PermissionError, (got, want)
    assert (got.errno, got.filename) == (want.errno, want.filename), (got, want)
got, want = run(ctx.stat(locked + "/x")), expect(lambda: os.stat(locked + "/x"))
assert type(got) is type(want) is PermissionError and got.filename == want.filename
assert ctx.stats().ring == (4 if ctx.backend == "io_uring" else 0), ctx.stats()
ctx.close()
"""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            timeout=60,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": SRC},
        )
    finally:
        shutil.rmtree(d)
    assert proc.returncode == 0, proc.stderr


# -- the front ends ----------------------------------------------------------------------------


@pytest.fixture
def front(backend: str) -> Iterator[str]:
    """New event loops' engine backend (restored after)."""
    aw.configure(backend=backend)
    try:
        yield backend
    finally:
        aw.configure()


async def warm_up(where: Path) -> None:
    """Make the loop's engine context (its eventfd, its ring): descriptors
    that live as long as the loop."""
    await threadlets.Path(where).stat()


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("mode", ["rb", "r+b", "wb", "ab", "xb"])
def test_open_stat_close_on_the_engine(front: str, tmp_path: Path, mode: str, inline: bool) -> None:
    """threadlets.open, stat() and close() give what the built-ins give;
    on the io_uring backend the open (unless it went inline), the stat and
    the close are ring requests."""
    aw.configure(backend=front, inline=inline)
    p, q = tmp_path / "f", tmp_path / "reference"
    if mode != "xb":
        p.write_bytes(b"data")
        q.write_bytes(b"data")

    async def main() -> None:
        await warm_up(tmp_path)
        start = fd_count()
        f = await threadlets.open(p, mode)
        ctx = f._ctx
        before = ctx.stats()
        st = await f.stat()
        assert_same_stat(st, os.fstat(f.fileno()))
        with open(q, mode) as ref:
            assert fcntl_flags(f.fileno()) == fcntl_flags(ref.fileno())
            assert os.get_inheritable(f.fileno()) == os.get_inheritable(ref.fileno())
        await f.close()
        assert fd_count() == start
        after = ctx.stats()
        # (A close with nothing to wait for is done in place.)
        assert after.ring - before.ring == (1 if front == "io_uring" else 0)
        assert after.threaded - before.threaded == (0 if front == "io_uring" else 1)

    asyncio.run(main())


def test_a_close_that_waits_closes_on_the_ring(front: str, tmp_path: Path) -> None:
    """A close that sends the write buffer first closes on the ring too
    (on the threads backend: in place, as before), cancelled or not."""
    aw.configure(backend=front, inline=False)  # (the write: on the ring too)
    p = tmp_path / "f"

    async def main() -> None:
        await warm_up(tmp_path)
        start = fd_count()
        for cancel in (False, True):
            f = await threadlets.open(p, "wb")
            await f.write(b"data")  # held in the write buffer
            ctx = f._ctx
            before = ctx.stats()
            task = asyncio.ensure_future(f.close())
            if cancel:
                await asyncio.sleep(0)  # (one loop iteration: the close is under way)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert f.closed
            assert fd_count() == start
            assert p.read_bytes() == b"data"
            after = ctx.stats()
            assert after.ring - before.ring == (2 if front == "io_uring" else 0)

    asyncio.run(main())


def test_open_errors_are_opens(front: str, tree: Path) -> None:
    """Through the engine (inline off): the errors of the built-in open."""
    aw.configure(backend=front, inline=False)
    cases = [
        (tree / "missing", "rb"),
        (tree / "dir", "rb"),
        (tree / "dir", "wb"),
        (tree / "loop", "rb"),
        (tree / "file" / "x", "rb"),
        (tree / "file", "xb"),
    ]

    async def main() -> None:
        for path, mode in cases:
            with pytest.raises(OSError) as got:
                await threadlets.open(path, mode)
            with pytest.raises(OSError) as want, open(path, mode):
                pass
            assert_same_error(got.value, want.value)

    asyncio.run(main())


def test_a_thousand_front_end_cycles_leave_no_descriptor(front: str, tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"data")

    async def main() -> None:
        await warm_up(tmp_path)
        start = fd_count()
        for i in range(1000):
            f = await threadlets.open(p, "r+b" if i % 2 else "wb")
            await f.stat()
            await f.close()
        assert fd_count() == start

    asyncio.run(main())


def test_cancelled_opens_leave_no_descriptor(front: str, tmp_path: Path) -> None:
    """Opens cancelled at every point of their life (before the request,
    while it is in the kernel or on a worker, after it finished) close
    whatever they opened."""
    aw.configure(backend=front, inline=False)
    p = tmp_path / "f"

    async def main() -> None:
        await warm_up(tmp_path)
        start = fd_count()
        for spins in range(12):
            task = asyncio.ensure_future(threadlets.open(p, "wb"))
            for _ in range(spins):
                await asyncio.sleep(0)  # (loop iterations, not time)
            task.cancel()
            try:
                f = await task
            except asyncio.CancelledError:
                pass
            else:
                await f.close()
            assert fd_count() == start

    asyncio.run(main())


def test_path_stat_and_lstat(front: str, tree: Path) -> None:
    """threadlets.Path.stat/lstat: os.stat's answers, errors included; STATX
    requests on the io_uring backend."""

    async def main() -> None:
        await warm_up(tree)
        ctx = aw.current().ctx
        before = ctx.stats().ring
        for name in ("file", "link", "dirlink", "fifo"):
            p = threadlets.Path(tree / name)
            assert_same_stat(await p.stat(), os.stat(tree / name))
            assert_same_stat(await p.lstat(), os.lstat(tree / name))
            assert_same_stat(await p.stat(follow_symlinks=False), os.lstat(tree / name))
        for name in ("missing", "loop"):
            with pytest.raises(OSError) as got:
                await threadlets.Path(tree / name).stat()
            with pytest.raises(OSError) as want:
                os.stat(tree / name)
            assert_same_error(got.value, want.value)
        assert ctx.stats().ring - before == (14 if front == "io_uring" else 0)

    asyncio.run(main())


def test_a_context_that_delivers_nothing(backend: str, tree: Path) -> None:
    """deliver=False (the ring's reaper thread finishes the requests): the
    same answers, followed through the requests themselves."""
    with AioContext(backend=backend, deliver=False) as ctx:
        start = fd_count()
        req = ctx.openat(tree / "file", os.O_RDONLY | NB)
        fd = req.result(timeout=10)
        req = ctx.stat(fd)
        assert_same_stat(req.result(timeout=10), os.fstat(fd))
        assert ctx.close_fd(fd).result(timeout=10) == 0
        missing = ctx.openat(tree / "missing", os.O_RDONLY | NB)
        with pytest.raises(FileNotFoundError):
            missing.result(timeout=10)
        assert fd_count() == start
        assert ctx.stats().ring == (4 if on_ring(ctx) else 0)


@pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")
def test_ctrl_c_in_an_open_completion_closes_the_fd_it_got(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interrupt lands as the kernel's answer (a new fd) is read: the
    # request fails with EINTR, and nobody will ever see that fd.
    from threadlets import engine

    real = engine._OpenOp.outcome
    armed = [True]

    def interrupted(self: Any, res: int) -> Any:
        if armed and res >= 0:
            armed.clear()
            raise KeyboardInterrupt
        return real(self, res)

    monkeypatch.setattr(engine._OpenOp, "outcome", interrupted)
    with AioContext(backend="io_uring") as ctx:
        start = fd_count()
        req = ctx.openat(str(tree / "file"), os.O_RDONLY | NB)
        with pytest.raises(KeyboardInterrupt):
            ctx.wait(req, timeout=10)
        assert not armed  # it landed on the ring's completion
        assert ctx.wait(req, timeout=10)
        assert req.error == errno.EINTR
        assert fd_count() == start
