"""threadlets.open on asyncio, uvloop and trio (anyio's pytest plugin runs
each test on each), the cancellation guarantee at every request state, fd
leak checks, and a loop that closes with requests outstanding."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import threadlets
import threadlets.awaitable as aw
from threadlets import ThreadletQueue
from threadlets.engine import AioRequest
from threadlets.probe import probe_io_uring

from .conftest import Gate

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False

# A file left open warns when collected: a test that closes its files
# properly must see no such warning (the ones that do not use pytest.warns).
pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="uvloop",
        marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed"),
    ),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    # Files are what the tests open; the event loops' own pipes and
    # eventfds live as long as the test runner keeps the loop.
    files = [os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if _is_file(fd)]
    assert not files, files


def fds_on(path: Path) -> list[str]:
    """This process's descriptors open on ``path``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                out.append(fd)
        except OSError:
            pass
    return out


def _is_file(fd: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/")
    except OSError:
        return False


@pytest.fixture
def data_path(tmp_path: Path) -> Path:
    p = tmp_path / "data.bin"
    p.write_bytes(bytes(range(256)) * 256)  # 64 KiB
    return p


DATA = bytes(range(256)) * 256


@pytest.fixture
def gated() -> Iterator[tuple[ThreadletQueue, Gate]]:
    """New loops get a one-worker queue (no inline path), held by a gate:
    everything submitted stays QUEUED until the gate opens."""
    q = ThreadletQueue(max_threads=1)
    gate = Gate()
    q.submit(gate)
    assert gate.started.wait(10)
    aw.configure(queue=q, inline=False, backend="threads")
    try:
        yield q, gate
    finally:
        aw.configure()
        gate.release.set()
        q.close(timeout=10)


async def until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until another thread makes predicate true."""
    with anyio.fail_after(10):
        while not predicate():
            await anyio.sleep(0.001)


# -- the interface -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_positional_io(data_path: Path, no_fd_leak: None) -> None:
    async with threadlets.open(data_path, "r+b") as f:
        assert await f.pread(10, 256) == DATA[:10]
        buf = bytearray(300)
        assert await f.preadinto(buf, 1000) == 300
        assert buf == DATA[1000:1300]
        assert await f.pread(100, len(DATA) - 10) == DATA[-10:]
        assert await f.pread(10, len(DATA) + 5) == b""
        assert await f.pwrite(b"hello", 3) == 5
        bufs = [bytearray(3), bytearray(5)]
        assert await f.preadv(bufs, 0) == 8
        assert bufs == [bytearray(DATA[:3]), bytearray(b"hello")]
        assert await f.pwritev([b"ab", b"cd"], 100) == 4
        assert await f.pread(4, 100) == b"abcd"
        # Many tasks at once on one file: no shared position.
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            results[i] = await f.pread(64, 4096 + i * 64)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        assert all(results[i] == DATA[4096 + i * 64 : 4160 + i * 64] for i in range(50))
        # Sizes that change from call to call (the inline path's scratch
        # buffer is resized), and one past it (always a request).
        sized: dict[int, bytes] = {}

        async def sized_one(i: int) -> None:
            for k in range(40):  # enough reads to pass through the fairness yield
                n = 1 + (i * 37 + k * 101) % 5000 if k % 2 else 64  # sizes shared and not
                off = 8192 + i * 11  # past the bytes written above
                got = await f.pread(n, off)
                sized[i] = got if got != DATA[off : off + n] else sized.get(i, b"ok")

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(sized_one, i)
        assert set(sized.values()) == {b"ok"}
        whole = await f.pread(len(DATA), 0)  # larger than the scratch limit
        assert len(whole) == len(DATA)
        assert whole[8192:] == DATA[8192:]
        assert await f.pread(0, 10) == b""
        for bad, exc in [(-1, ValueError), (True, TypeError), (b"ab", TypeError), (2.0, TypeError)]:
            with pytest.raises(exc):
                await f.pread(bad, 0)  # type: ignore[arg-type]
    assert f.closed
    with pytest.raises(ValueError, match="closed file"):
        await f.pread(1, 0)


@pytest.mark.anyio
async def test_stream_io_like_aiofiles(tmp_path: Path, no_fd_leak: None) -> None:
    p = tmp_path / "lines.txt"
    lines = [f"line {i}\n".encode() for i in range(5000)]
    async with threadlets.open(p, "wb") as f:
        for line in lines:
            await f.write(line)
        assert await f.tell() == sum(map(len, lines))
        await f.flush()
    f = await threadlets.open(p, "rb")
    try:
        assert await f.readline() == lines[0]
        assert await f.read(5) == lines[1][:5]
        assert await f.readline() == lines[1][5:]
        assert [line async for line in f] == lines[2:]
        assert await f.readline() == b""
        assert await f.seek(0) == 0
        assert await f.read() == b"".join(lines)
        assert await f.seek(-7, os.SEEK_END) == p.stat().st_size - 7
        buf = bytearray(7)
        assert await f.readinto(buf) == 7
        assert buf == lines[-1][-7:]
        assert await f.seek(-8, os.SEEK_CUR) == p.stat().st_size - 8
    finally:
        await f.close()


@pytest.mark.anyio
async def test_text_mode_and_append(tmp_path: Path, no_fd_leak: None) -> None:
    p = tmp_path / "text.txt"
    async with threadlets.open(p, "w", encoding="utf-8") as f:
        assert await f.write("héllo\nwörld\r\nend") == 16
    async with threadlets.open(p, "a") as f:
        await f.write("\nmore")
        assert await f.tell() == p.stat().st_size
    async with threadlets.open(p, "r", encoding="utf-8") as f:
        assert await f.readline() == "héllo\n"
        assert await f.read(3) == "wör"
        assert await f.readline() == "ld\n"  # universal newlines
        assert await f.readlines() == ["end\n", "more"]
    async with threadlets.open(p, "r", newline="") as f:
        assert (await f.read()).count("\r\n") == 1
    with pytest.raises(ValueError, match="invalid mode"):
        threadlets.open(p, "rw")
    with pytest.raises(ValueError, match="binary mode"):
        threadlets.open(p, "rb", encoding="utf-8")
    with pytest.raises(LookupError):
        threadlets.open(p, "r", encoding="no-such-codec")


@pytest.mark.anyio
async def test_file_management_calls(data_path: Path, no_fd_leak: None) -> None:
    async with threadlets.open(data_path, "r+b") as f:
        await f.fsync()
        await f.fdatasync()
        await f.discard(4096, 4096)
        assert await f.pread(4096, 4096) == bytes(4096)
        await f.write_zeroes(0, 10)
        assert await f.pread(12, 0) == bytes(10) + DATA[10:12]
        await f.allocate(0, 1 << 20)
        assert (await f.stat()).st_size == 1 << 20
        assert await f.truncate(100) == 100
        assert (await f.stat()).st_size == 100
        with pytest.raises(OSError) as info:  # as the built-in files
            await f.truncate(-1)
        assert info.value.errno == errno.EINVAL
        assert (await f.stat()).st_size == 100


@pytest.mark.anyio
async def test_wrap(data_path: Path, no_fd_leak: None) -> None:
    fd = os.open(data_path, os.O_RDONLY)
    f = threadlets.wrap(fd)
    assert f.mode == "rb"
    assert await f.pread(4, 0) == DATA[:4]
    await f.close()
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    with open(data_path, "rb") as pyfile:
        g = threadlets.wrap(pyfile)
        assert await g.read(3) == DATA[:3]
        await g.close()
        assert pyfile.closed
    with pytest.raises(TypeError):
        threadlets.wrap("not a file")


@pytest.mark.anyio
async def test_errors_come_back_as_oserror(tmp_path: Path, no_fd_leak: None) -> None:
    with pytest.raises(FileNotFoundError):
        await threadlets.open(tmp_path / "missing", "rb")
    async with threadlets.open(tmp_path / "w", "wb") as f:
        with pytest.raises(OSError) as info:
            await f.pread(10, 0)  # a write-only fd
        assert info.value.errno == errno.EBADF
        with pytest.raises(ValueError, match=">= 0"):
            await f.pwrite(b"x", -1)


def test_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="running asyncio or trio"):
        threadlets.wrap(0)


# -- cancellation at every state ----------------------------------------------------------------


@pytest.mark.anyio
async def test_cancel_while_queued_never_happens(
    data_path: Path, gated: tuple[ThreadletQueue, Gate], no_fd_leak: None
) -> None:
    q, gate = gated
    async with _opened(data_path) as f:
        buf = bytearray(b"untouched")
        seen: list[str] = []

        async def reader() -> None:
            try:
                await f.preadinto(buf, 0)
            except anyio.get_cancelled_exc_class():
                seen.append(bytes(buf).decode())
                raise

        async def writer() -> None:
            await f.pwrite(b"NEVER", 0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            tg.start_soon(writer)
            await until(lambda: q.stats().queued == 2)
            tg.cancel_scope.cancel()
        assert seen == ["untouched"]
        gate.release.set()
        assert q.drain(10)
        assert buf == b"untouched"
    assert data_path.read_bytes() == DATA  # the write never happened
    assert q.stats().cancelled >= 2


class _opened:
    """Open a file without the (gated) queue: os.open, then wrap."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def __aenter__(self) -> threadlets.AsyncFile:
        fd = os.open(self.path, os.O_RDWR)
        self.f = threadlets.wrap(fd)
        return self.f

    async def __aexit__(self, *exc: object) -> None:
        await self.f.close()


@pytest.fixture(params=["threads", "io_uring"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """New loops' engine backend (io_uring skipped where unavailable)."""
    if request.param == "io_uring" and not _have_io_uring():
        pytest.skip("no io_uring here")
    aw.configure(backend=request.param)
    try:
        yield request.param
    finally:
        aw.configure()


@pytest.mark.anyio
async def test_cancel_while_running_waits_for_the_request(backend: str, no_fd_leak: None) -> None:
    r, w = os.pipe()
    f = threadlets.wrap(r)
    assert f._ctx.backend == backend
    buf = bytearray(5)
    order: list[str] = []
    scope = anyio.CancelScope()

    async def reader() -> None:
        with scope:
            try:
                await f.preadinto(buf, 0)  # blocks in the kernel
            except anyio.get_cancelled_exc_class():
                order.append(f"cancelled after the read, buffer={bytes(buf)!r}")
                raise
        order.append("left the scope")

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await until(lambda: len(f._outstanding) == 1 and _running(f))  # a worker, or the ring
        if backend == "io_uring":
            # The ring takes a read that moved nothing back: cancelled at
            # once, nothing consumed.
            scope.cancel()
            await until(lambda: len(order) == 2)
            assert order == [f"cancelled after the read, buffer={bytes(5)!r}", "left the scope"]
            os.write(w, b"hello")
            assert os.read(r, 5) == b"hello"
            tg.cancel_scope.cancel()
            await f.close()
            os.close(w)
            return
        scope.cancel()
        for _ in range(20):  # the reader must not give up while it runs
            await anyio.lowlevel.checkpoint()
        assert order == []
        os.write(w, b"hello")
    assert order == ["cancelled after the read, buffer=b'hello'", "left the scope"]
    await f.close()
    os.close(w)


@pytest.mark.anyio
async def test_positional_io_without_the_inline_path(
    data_path: Path, backend: str, no_fd_leak: None
) -> None:
    aw.configure(inline=False, backend=backend)  # every request to the backend
    async with threadlets.open(data_path, "r+b") as f:
        assert f._ctx.backend == backend
        results = {}

        async def one(i: int) -> None:
            results[i] = await f.pread(512, i * 512)
            await f.pwrite(results[i][::-1], i * 512)

        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(one, i)
        assert all(results[i] == DATA[i * 512 : (i + 1) * 512] for i in range(64))
        whole = await f.pread(64 * 512, 0)
        assert whole == b"".join(DATA[i * 512 : (i + 1) * 512][::-1] for i in range(64))
        stats = f._ctx.stats()
        assert stats.inline == 0
        assert (stats.ring > 0) == (backend == "io_uring")


def _running(f: threadlets.AsyncFile) -> bool:
    return all(r.state is threadlets.ThreadletState.RUNNING for r in f._outstanding)


@pytest.mark.anyio
async def test_cancelled_open_closes_the_fd_it_got(tmp_path: Path, no_fd_leak: None) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[str] = []

    async def opener() -> None:
        try:
            await threadlets.open(fifo, "wb")  # blocks until a reader comes
        except anyio.get_cancelled_exc_class():
            got.append("cancelled")
            raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(opener)
        await until(lambda: _fifo_open_pending(fifo))
        tg.cancel_scope.cancel()
    # The cancellation came through at once, and the open was made to
    # finish (given a reader of its own): nothing stays blocked or open.
    assert got == ["cancelled"]
    from threadlets.engine import io_queue

    assert io_queue().drain(10)
    assert not _fifo_open_pending(fifo)
    gc.collect()
    assert fds_on(fifo) == []  # the worker closed what it got


def _fifo_open_pending(fifo: Path) -> bool:
    # A thread of ours sits in openat() on the fifo (x86_64: 257; aarch64: 56).
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "syscall").read_text().split()
        except OSError:
            continue
        if fields and fields[0] in ("257", "56"):
            return True
    return False


@pytest.mark.anyio
async def test_cancelled_queued_open_opens_nothing(
    tmp_path: Path, gated: tuple[ThreadletQueue, Gate], no_fd_leak: None
) -> None:
    q, gate = gated
    target = tmp_path / "never-created"
    with anyio.move_on_after(0.05):
        await threadlets.open(target, "wb")
    gate.release.set()
    assert q.drain(10)
    assert not target.exists()


@pytest.mark.anyio
async def test_close_waits_for_outstanding_requests(no_fd_leak: None) -> None:
    r, w = os.pipe()
    f = threadlets.wrap(r)
    events: list[str] = []

    async def reader() -> None:
        data = await f.pread(3, 0)
        events.append(f"read {data!r}")

    async def closer() -> None:
        (pending,) = f._outstanding
        await f.close()
        # The close returned only once the read had finished.
        events.append(f"closed, read finished={pending.done()}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await until(lambda: len(f._outstanding) == 1 and _running(f))  # a worker, or the ring
        tg.start_soon(closer)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert events == []
        os.write(w, b"xyz")
    # Which task resumes first is the scheduler's choice; both happened.
    assert sorted(events) == ["closed, read finished=True", "read b'xyz'"]
    os.close(w)


@pytest.mark.anyio
async def test_cached_reads_do_not_starve_other_tasks(data_path: Path) -> None:
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with threadlets.open(data_path, "rb") as f:
        await f.pread(len(DATA), 0)  # cached now
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.lowlevel.checkpoint()
            start = ticks
            for i in range(aw.YIELD_EVERY * 10):
                await f.pread(64, (i * 64) % len(DATA))
            done = True
        assert ticks - start >= 9


# -- a loop that closes with requests outstanding ------------------------------------------------


def test_loop_closed_with_requests_outstanding(backend: str) -> None:
    r, w = os.pipe()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    # The task left pending in pread is asyncio's to report when it goes
    # ("Task was destroyed but it is pending!", to the closed loop's
    # exception handler).  Caught here, it shows the task is let go once a
    # later loop has processed its request's completion -- and it no longer
    # reaches the log of whichever later test collects it (or the
    # interpreter's exit).
    reports: list[tuple[str, str]] = []
    loop.set_exception_handler(lambda _, c: reports.append((c["message"], c["task"].get_name())))

    async def start_read() -> tuple[asyncio.Task[bytes], AioRequest]:
        f = threadlets.wrap(r, closefd=False)
        task = asyncio.ensure_future(f.pread(4, 0))
        await asyncio.sleep(0)
        started.set()
        [req] = f._outstanding
        return task, req

    task, req = loop.run_until_complete(start_read())
    assert started.is_set()
    assert not task.done()
    name = task.get_name()
    loop.close()  # the request still runs (on a worker, or in the ring)
    os.write(w, b"late")  # it finishes; nobody processes its completion
    from threadlets.engine import io_queue

    # Finished and handed over for processing, on either backend (a ring
    # request is reaped by this wait: io_queue() never had it), so the next
    # loop's sweep finds it and lets the closed loop's context go.
    assert req.wait(10)
    assert io_queue().drain(10)
    assert not req._processed
    del req
    del task, loop
    gc.collect()

    # A new loop works as before.
    async def again() -> bytes:
        f = threadlets.wrap(r, closefd=False)
        os.write(w, b"next")
        return await f.pread(4, 0)

    assert asyncio.run(again()) == b"next"
    os.close(r)
    os.close(w)
    gc.collect()  # (the task, its coroutine and its file: a cycle)
    assert reports == [("Task was destroyed but it is pending!", name)]


def _have_io_uring() -> bool:
    # (probe.py leaves a file of /proc for the collector: not our warning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return probe_io_uring().supported
