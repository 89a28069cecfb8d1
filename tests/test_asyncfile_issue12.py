"""Async files that never lose or invent data (issue 12), and loops that do
not leak their engine (issue 11, item 19): one regression test per defect,
on asyncio, uvloop and trio where the loop matters, on both engine
backends where requests do."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import pty
import threading
import time
import tty
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import threadlets
import threadlets.awaitable as aw
from threadlets import ThreadletQueue

from .conftest import Gate
from .test_asyncfile import HAVE_UVLOOP, anyio_backend, backend, fds_on, gated, until

__all__ = ["anyio_backend", "backend", "gated"]  # fixtures used by name

# A file left open warns when collected: a test that closes its files
# properly must see no such warning (the ones that do not use pytest.warns).
pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

DATA = bytes(range(256)) * 256  # 64 KiB


@pytest.fixture
def data_path(tmp_path: Path) -> Path:
    p = tmp_path / "data.bin"
    p.write_bytes(DATA)
    return p


# -- 1. stream calls are atomic -------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["w", "wb"])
async def test_concurrent_stream_writes_lose_nothing(
    tmp_path: Path, backend: str, mode: str
) -> None:
    p = tmp_path / "lines"
    lines = [f"line {i} {'x' * (i % 37)}\n" for i in range(2001)]
    async with threadlets.open(p, mode) as f:

        async def one(line: str) -> None:
            await f.write(line if "b" not in mode else line.encode())

        async with anyio.create_task_group() as tg:
            for line in lines:
                tg.start_soon(one, line)
    got = p.read_text().splitlines(keepends=True)
    assert sorted(got) == sorted(lines)


@pytest.mark.anyio
async def test_concurrent_stream_reads_are_atomic(data_path: Path, backend: str) -> None:
    # Many readers of one file, each read a request (so it suspends inside
    # the call): every byte is read exactly once.
    aw.configure(inline=False, backend=backend)
    pieces: list[bytes] = []
    async with threadlets.open(data_path, "rb") as f:

        async def reader() -> None:
            while chunk := await f.read(1000):
                pieces.append(chunk)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(reader)
    assert sum(map(len, pieces)) == len(DATA)
    assert all(len(p) == 1000 for p in pieces[:-1] if len(p) != len(DATA) % 1000)


@pytest.mark.anyio
async def test_stream_lock_waiters_cancelled_pass_it_on(data_path: Path) -> None:
    async with threadlets.open(data_path, "rb") as f:
        lock = f._lock
        await lock.acquire()
        got: list[str] = []

        async def waiter(name: str, scope: anyio.CancelScope) -> None:
            with scope:
                await f.read(1)
                got.append(name)

        scopes = [anyio.CancelScope() for _ in range(3)]
        async with anyio.create_task_group() as tg:
            for i, scope in enumerate(scopes):
                tg.start_soon(waiter, str(i), scope)
            await until(lambda: len(lock._waiters) == 3)
            scopes[0].cancel()  # queued: leaves the queue
            lock.release()  # hands the lock to the first still waiting
            scopes[1].cancel()  # handed the lock, cancelled before it runs
        assert got in ([], ["2"], ["1", "2"])
        assert not lock.busy
        assert await f.read(1) != b""


# -- 3. every change of the file drops the read-ahead ------------------------------------------

CHANGES: dict[str, Callable[[threadlets.AsyncFile], Awaitable[object]]] = {
    "pwrite": lambda f: f.pwrite(b"XYZ", 5),
    "pwritev": lambda f: f.pwritev([b"X", b"YZ"], 5),
    "discard": lambda f: f.discard(0, 4096),
    "write_zeroes": lambda f: f.write_zeroes(5, 3),
    "truncate": lambda f: f.truncate(6),
    "allocate": lambda f: f.allocate(0, len(DATA) + 4096),
}


@pytest.mark.anyio
@pytest.mark.parametrize("change", list(CHANGES))
async def test_changes_drop_the_read_ahead(data_path: Path, backend: str, change: str) -> None:
    async with threadlets.open(data_path, "r+b") as f:
        assert await f.read(1) == DATA[:1]
        assert f._rbuf  # the read-ahead holds the start of the file
        await CHANGES[change](f)
        await f.seek(1)
        rest = await f.read()
    assert rest == data_path.read_bytes()[1:]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "change", ["pwrite", "discard", "write_zeroes"]
)  # (truncate waits for the lock)
async def test_a_change_during_a_read_ahead_drops_it(
    data_path: Path, gated: tuple[ThreadletQueue, Gate], change: str
) -> None:
    # One worker, held: the read-ahead's read is queued first and runs
    # first (reading the old bytes), the change runs after it.
    q, gate = gated
    fd = os.open(data_path, os.O_RDWR)
    f = threadlets.wrap(fd)
    first: list[bytes] = []

    async def reader() -> None:
        first.append(await f.read(1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await until(lambda: q.stats().queued == 1)
        tg.start_soon(CHANGES[change], f)
        await until(lambda: q.stats().queued == 2)
        gate.release.set()
    assert first == [DATA[:1]]
    rest = await f.read()
    await f.close()
    assert rest == data_path.read_bytes()[1:]


# -- 4. wrap ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wrap_starts_at_the_files_position(data_path: Path) -> None:
    fd = os.open(data_path, os.O_RDONLY)
    os.lseek(fd, 100, os.SEEK_SET)
    f = threadlets.wrap(fd)
    assert await f.tell() == 100
    assert await f.read(4) == DATA[100:104]
    await f.close()
    with open(data_path, "rb") as pyfile:
        assert pyfile.read(10) == DATA[:10]  # its buffer holds more
        g = threadlets.wrap(pyfile)
        assert await g.read(4) == DATA[10:14]
        await g.close()
    with open(data_path, "r+b") as pyfile:
        pyfile.seek(50)
        pyfile.write(b"written")  # still in its buffer
        g = threadlets.wrap(pyfile)
        assert await g.pread(7, 50) == b"written"
        assert await g.tell() == 57
        await g.close()


@pytest.mark.anyio
async def test_wrap_takes_a_text_files_encoding(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_bytes("é\n".encode("latin-1"))
    with open(p, encoding="latin-1", errors="replace") as pyfile:
        f = threadlets.wrap(pyfile)
        assert (f.encoding, f.errors) == ("latin-1", "replace")
        assert await f.read() == "é\n"
        await f.close()


@pytest.mark.anyio
async def test_wrap_of_a_pipe_is_not_seekable() -> None:
    r, w = os.pipe()
    f = threadlets.wrap(r)
    assert not f.seekable()
    with pytest.raises(OSError) as info:
        await f.tell()
    assert info.value.errno == errno.ESPIPE
    await f.close()
    os.close(w)


# -- 5. a cancelled close still closes ---------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["close", "async with"])
async def test_cancelled_close_closes_the_descriptor(backend: str, how: str) -> None:
    r, w = os.pipe()
    f = threadlets.wrap(r)
    closing = anyio.Event()
    outcome: list[str] = []

    async def reader() -> None:
        await f.pread(3, 0)  # blocks in the kernel until the pipe has data

    async def closer(scope: anyio.CancelScope) -> None:
        with scope:
            try:
                if how == "close":
                    closing.set()
                    await f.close()
                else:
                    async with f:
                        closing.set()
            except anyio.get_cancelled_exc_class():
                outcome.append("cancelled")
                raise

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await until(lambda: len(f._outstanding) == 1)
        tg.start_soon(closer, scope)
        await closing.wait()
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        scope.cancel()
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        os.write(w, b"end")  # the read finishes, so can the close
    assert outcome == ["cancelled"]
    assert f.closed
    with pytest.raises(OSError) as info:
        os.fstat(r)
    assert info.value.errno == errno.EBADF
    os.close(w)


# -- 6. a file is used only in its own loop ------------------------------------------------------


@pytest.mark.parametrize("other", ["asyncio", "trio"])
def test_a_file_from_another_loop_is_refused(data_path: Path, backend: str, other: str) -> None:
    async def opening() -> threadlets.AsyncFile:
        return await threadlets.open(data_path, "rb")

    files = [asyncio.run(opening())]
    errors = _use_from(other, files[0])
    assert len(errors) == 4
    assert all("another event loop" in e for e in errors)
    with pytest.warns(ResourceWarning):
        _drop(files)


def _use_from(other: str, f: threadlets.AsyncFile) -> list[str]:
    """Calls on ``f`` from a new loop of kind ``other``: their errors."""
    import trio

    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: f.pread(10, 0),
        lambda: f.pread(1 << 20, 0),
        lambda: f.read(10),
        f.stat,
    ]
    errors: list[str] = []

    async def use() -> None:
        for call in calls:
            try:
                await call()
            except RuntimeError as e:
                errors.append(str(e))

    runner = threading.Thread(
        target=(lambda: asyncio.run(use())) if other == "asyncio" else (lambda: trio.run(use)),
        daemon=True,
    )
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "a call from another loop hangs"
    return errors


def _drop(objects: list[Any]) -> None:
    objects.clear()
    gc.collect()


# -- 7. reads of pipes, FIFOs and terminals can be cancelled -------------------------------------


async def _check_cancelled_read(f: threadlets.AsyncFile, feed: Callable[[bytes], object]) -> None:
    """Cancel a read that waits for data: it ends at once, consumes nothing,
    and the file still works."""
    scope = anyio.CancelScope()
    returned: list[bytes] = []

    async def reader() -> None:
        with scope:
            returned.append(await f.read(5))

    # Old code: the read blocks on a worker until data comes; this brings
    # it (so the test fails instead of hanging).
    watchdog = threading.Timer(5, feed, (b"late!",))
    watchdog.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await until(lambda: f._lock.busy)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            start = time.monotonic()
            scope.cancel()
        elapsed = time.monotonic() - start
    finally:
        watchdog.cancel()
    assert returned == []
    assert elapsed < 2, f"the cancelled read took {elapsed:.1f} s to end"
    feed(b"hello")
    with anyio.fail_after(10):
        assert await f.read(5) == b"hello"


@pytest.mark.anyio
async def test_cancelled_pipe_read(backend: str) -> None:
    r, w = os.pipe()
    f = threadlets.wrap(r)
    await _check_cancelled_read(f, lambda data: os.write(w, data))
    os.close(w)
    assert await f.read() == b""  # end of file once the writer is gone
    await f.close()


@pytest.mark.anyio
async def test_cancelled_fifo_open_and_read(tmp_path: Path, backend: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writers: list[int] = []

    def feed(data: bytes) -> None:
        if not writers:
            writers.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        os.write(writers[0], data)

    watchdog = threading.Timer(5, lambda: writers.append(os.open(fifo, os.O_WRONLY)))
    watchdog.start()
    try:
        with anyio.fail_after(10):
            start = time.monotonic()
            f = await threadlets.open(fifo, "rb")  # no writer: open() must not wait for one
            elapsed = time.monotonic() - start
    finally:
        watchdog.cancel()
    assert elapsed < 2, f"opening a FIFO with no writer took {elapsed:.1f} s"
    await _check_cancelled_read(f, feed)
    os.close(writers[0])
    assert await f.read() == b""
    await f.close()
    assert fds_on(fifo) == []


@pytest.mark.anyio
async def test_cancelled_pty_read(backend: str) -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)
    f = threadlets.wrap(slave)
    assert f._stream
    assert not f._pipe
    await _check_cancelled_read(f, lambda data: os.write(master, data))
    # What the read-ahead took from the terminal is kept across a write.
    os.write(master, b"abcdef")
    assert await f.read(2) == b"ab"
    assert await f.write(b"x") == 1
    assert os.read(master, 1) == b"x"
    assert await f.read(4) == b"cdef"
    await f.close()
    os.close(master)


@pytest.mark.anyio
async def test_cancelled_pipe_write(backend: str) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    f = threadlets.wrap(w)
    scope = anyio.CancelScope()
    drained = threading.Timer(5, lambda: os.read(r, 1 << 20))  # old code: unblocks it
    drained.start()
    try:
        async with anyio.create_task_group() as tg:

            async def writer() -> None:
                with scope:
                    await f.write(b"y" * 10)

            tg.start_soon(writer)
            await until(lambda: f._lock.busy)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            start = time.monotonic()
            scope.cancel()
        elapsed = time.monotonic() - start
    finally:
        drained.cancel()
    assert elapsed < 2
    assert os.get_blocking(w)  # the descriptor's flags are as they were
    got = b""
    while len(got) < filled:
        got += os.read(r, 1 << 20)
    assert got == b"x" * filled  # the cancelled write wrote nothing
    assert await f.write(b"z") == 1
    assert os.read(r, 10) == b"z"
    await f.close()
    os.close(r)


# -- 8. an unclosed file closes and warns ----------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.filterwarnings("error::ResourceWarning")
def test_closed_files_leave_nothing(data_path: Path) -> None:
    async def main() -> None:
        for _ in range(100):
            f = await threadlets.open(data_path, "rb")
            await f.read(10)
            await f.close()

    asyncio.run(main())
    gc.collect()
    before = _open_fds()
    asyncio.run(main())
    gc.collect()
    assert _open_fds() <= before


def test_unclosed_files_are_closed_with_a_warning(data_path: Path) -> None:
    async def main() -> None:
        for _ in range(100):
            f = await threadlets.open(data_path, "rb")
            await f.read(10)

    async def warm_up() -> None:
        async with threadlets.open(data_path, "rb") as f:
            await f.read(10)

    asyncio.run(warm_up())
    gc.collect()
    before = _open_fds()
    with pytest.warns(ResourceWarning, match="unclosed file"):
        asyncio.run(main())  # each file goes when the next replaces it
    assert _open_fds() <= before


# -- 9. errors as the built-in open() gives them ---------------------------------------------------


@pytest.mark.anyio
async def test_opening_a_directory_for_reading(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError) as ours:
        await threadlets.open(tmp_path, "rb")
    with pytest.raises(IsADirectoryError) as theirs:
        open(tmp_path, "rb")  # noqa: SIM115
    assert ours.value.filename == theirs.value.filename
    assert ours.value.errno == theirs.value.errno


BAD_CALLS: list[tuple[str, str, Any]] = [
    ("rb", "truncate", ()),
    ("rb", "truncate", (0,)),
    ("rb", "write", (b"x",)),
    ("wb", "read", ()),
    ("wb", "readline", ()),
    ("wb", "read1", (1,)),
    ("rb", "read", ("10",)),
    ("rb", "read", (2.0,)),
    ("rb", "read", (-5,)),
    ("rb", "readline", ("x",)),
    ("rb", "readline", (2.0,)),
    ("rb", "readlines", ("x",)),
    ("rb", "read1", ("x",)),
    ("rb", "readinto", (b"ro",)),
    ("rb", "seek", ("x",)),
    ("rb", "seek", (1.0,)),
    ("rb", "seek", (0, 5)),
    ("rb", "seek", (-1,)),
    ("rb", "seek", (-100, 1)),
    ("wb", "write", ("str",)),
    ("wb", "write", (3,)),
    ("wb", "writelines", ([3],)),
    ("r+b", "truncate", (-1,)),
    ("r+b", "truncate", ("x",)),
    ("r", "read", ("10",)),
    ("r", "read", (2.0,)),
    ("r", "readline", ("x",)),
    ("r", "truncate", ()),
    ("r", "write", ("x",)),
    ("w", "write", (b"x",)),
    ("w", "read", ()),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "method", "args"), BAD_CALLS)
async def test_bad_calls_fail_as_the_builtin_files_do(
    data_path: Path, mode: str, method: str, args: Any
) -> None:
    with open(data_path, mode) as pyfile, pytest.raises(Exception) as theirs:
        getattr(pyfile, method)(*args)
    data_path.write_bytes(DATA)
    async with threadlets.open(data_path, mode) as f:
        with pytest.raises(Exception) as ours:
            await getattr(f, method)(*args)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


# -- issue 11, item 19: loops do not leak their engine -------------------------------------------


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_loops_leave_no_engine_behind(data_path: Path, backend: str, loop_kind: str) -> None:
    if loop_kind == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")

    async def main() -> None:
        async with threadlets.open(data_path, "rb") as f:
            await f.read()
            await f.pread(100, 10)

    def cycle() -> None:
        if loop_kind == "asyncio":
            asyncio.run(main())
        else:
            import uvloop

            loop = uvloop.new_event_loop()
            try:
                loop.run_until_complete(main())
            finally:
                loop.close()

    cycle()
    gc.collect()
    fds, threads = _open_fds(), threading.active_count()
    for _ in range(200):
        cycle()
    gc.collect()
    assert _open_fds() <= fds + 2
    assert threading.active_count() <= threads + 4  # the shared pool's workers come and go
    assert not aw._orphans
