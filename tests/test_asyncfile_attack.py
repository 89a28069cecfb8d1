"""Async files under attack (second round): close() racing stream calls,
cancelled calls that must consume nothing, cancelled FIFO opens, dropped
loops.  One regression test per finding, on asyncio, uvloop and trio where
the loop matters, on both engine backends where requests do."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import threadlets
import threadlets.awaitable as aw
from threadlets.engine import io_queue

from .conftest import wait_until
from .test_asyncfile import anyio_backend, backend, gated, until

__all__ = ["anyio_backend", "backend", "gated"]  # fixtures used by name

pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

BIG = bytes(range(256)) * (4 << 12)  # 4 MiB


@pytest.fixture
def no_inline(backend: str) -> Any:
    aw.configure(inline=False, backend=backend)
    try:
        yield backend
    finally:
        aw.configure()


# -- S1: close() during a binary stream call -------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("call", ["writelines", "read"])
async def test_close_stops_a_stream_call_in_progress(
    tmp_path: Path, no_inline: str, call: str
) -> None:
    p, victim = tmp_path / "a", tmp_path / "victim"
    p.write_bytes(b"")
    victim.write_bytes(b"v" * len(BIG))
    f = await threadlets.open(p, "r+b")
    # Written after the open: read() then goes chunk by chunk (the size at
    # open, zero, does not cover it), a request at a time.
    p.write_bytes(BIG)
    outcome: list[object] = []

    async def task() -> None:
        try:
            if call == "writelines":
                await f.writelines([b"A" * 65536] * 64)
                outcome.append("done")
            else:
                outcome.append(await f.read())
        except ValueError as e:
            outcome.append(e)

    fd2 = -1
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(task)
            await until(lambda: bool(f._outstanding))
            await f.close()
            fd2 = os.open(victim, os.O_RDWR)  # the number f had, most likely
        [got] = outcome
        if isinstance(got, ValueError):
            assert str(got) == "I/O operation on closed file."
        elif call == "read":
            assert got == BIG  # finished before the close took effect
        os.lseek(fd2, 0, os.SEEK_SET)
        assert os.read(fd2, len(BIG) + 1) == b"v" * len(BIG)
    finally:
        if fd2 >= 0:
            os.close(fd2)


# -- S2/S5: close() while a task waits for readiness ------------------------------------------


@pytest.mark.anyio
async def test_close_wakes_a_pipe_reader_and_frees_the_number() -> None:
    r, w = os.pipe()
    f = threadlets.wrap(r, "rb")
    outcome: list[object] = []

    async def reader() -> None:
        try:
            outcome.append(await f.read(5))
        except ValueError as e:
            outcome.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        await f.close()
        with anyio.fail_after(10):
            while not outcome:
                await anyio.lowlevel.checkpoint()
    [got] = outcome
    assert isinstance(got, ValueError)
    assert "closed file" in str(got)
    # The number, reused, works for a new file on the same loop.
    r2, w2 = os.pipe()
    try:
        g = threadlets.wrap(r2, "rb")
        async with g, anyio.create_task_group() as tg:

            async def read_it() -> None:
                outcome.append(await g.read(5))

            tg.start_soon(read_it)
            await anyio.wait_all_tasks_blocked()
            os.write(w2, b"FOR-B")
        assert outcome[-1] == b"FOR-B"
    finally:
        os.close(w)
        os.close(w2)


@pytest.mark.anyio
async def test_closing_a_text_stream_with_a_blocked_reader_finishes() -> None:
    a, b = socket.socketpair()
    try:
        f = threadlets.wrap(a.fileno(), "r+", encoding="utf-8", closefd=False)
        outcome: list[object] = []

        async def reader() -> None:
            try:
                outcome.append(await f.readline())
            except ValueError as e:
                outcome.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(10):
                await f.close()
        assert f.closed
        assert isinstance(outcome[0], ValueError)
        # closefd=False: the socket still works.
        b.send(b"x")
        assert a.recv(1) == b"x"
    finally:
        a.close()
        b.close()


# -- S3/S7: a cancelled read consumes nothing --------------------------------------------------


async def _read_all(f: threadlets.AsyncFile) -> Any:
    return await f.read()


async def _read_n(f: threadlets.AsyncFile) -> Any:
    return await f.read(100)


async def _readline(f: threadlets.AsyncFile) -> Any:
    return await f.readline()


async def _readlines(f: threadlets.AsyncFile) -> Any:
    return await f.readlines()


async def _anext(f: threadlets.AsyncFile) -> Any:
    return await f.__anext__()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["rb", "r"])
@pytest.mark.parametrize("call", [_read_all, _read_n, _readline, _readlines, _anext])
async def test_a_cancelled_pipe_read_consumes_nothing(mode: str, call: Any) -> None:
    r, w = os.pipe()
    f = threadlets.wrap(r, mode)
    try:
        os.write(w, b"partial ")
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, f)
            await anyio.wait_all_tasks_blocked()
            os.write(w, b"line")  # a second chunk, still no line end
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        os.write(w, b"\nrest")
        os.close(w)
        w = -1
        expect = b"partial line\nrest"
        assert await f.read() == (expect if mode == "rb" else expect.decode())
    finally:
        await f.close()
        if w >= 0:
            os.close(w)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["rb", "r"])
@pytest.mark.parametrize("call", [_read_all, _readline])
async def test_a_cancelled_file_read_keeps_the_position(
    tmp_path: Path, no_inline: str, mode: str, call: Any
) -> None:
    p = tmp_path / "long"
    data = b"0123456789" * 100_000 + b"\nend"
    p.write_bytes(data)
    got: list[Any] = []

    async def run(f: threadlets.AsyncFile) -> None:
        got.append(await call(f))

    async with threadlets.open(p, mode, encoding=None if "b" in mode else "ascii") as f:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, f)
            # Cancelled once the call has taken a chunk and asks for the next.
            await until(
                lambda: bool(got) or ((f._pos > 0 or bool(f._rbuf)) and bool(f._outstanding))
            )
            tg.cancel_scope.cancel()
        done = len(got[0]) if got else 0  # (it may have finished first)
        assert await f.tell() == done
        assert await f.read() == (data if "b" in mode else data.decode())[done:]


# -- S4: a cancelled write leaves the file right -----------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["w+b", "a+b"])
async def test_a_write_cancelled_while_running_moves_the_position(
    tmp_path: Path, no_inline: str, mode: str
) -> None:
    p = tmp_path / "w"
    caught = 0
    async with threadlets.open(p, mode) as f:
        for _ in range(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(f.write, b"X" * (1 << 20))
                await anyio.wait_all_tasks_blocked()
                if f._outstanding:
                    [req] = f._outstanding
                    assert req.wait(10)  # done, its completion not yet processed
                    caught += 1
                tg.cancel_scope.cancel()
            assert await f.tell() == p.stat().st_size
            if caught >= 3:
                break
        await f.write(b"Y")
    data = p.read_bytes()
    assert data.count(b"Y") == 1
    assert data.endswith(b"Y")
    assert set(data[:-1]) == {ord("X")}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
@pytest.mark.parametrize(
    ("encoding", "expect"), [("iso2022_jp", "語\n"), ("utf-16", "語\n"), ("utf-8-sig", "語\n")]
)
async def test_a_text_write_cancelled_while_queued_keeps_the_encoder(
    tmp_path: Path, gated: Any, encoding: str, expect: str
) -> None:
    p = tmp_path / "t"
    # (Opened without the gated queue.)
    f = threadlets.wrap(os.open(p, os.O_WRONLY | os.O_CREAT), "w", encoding=encoding)
    async with anyio.create_task_group() as tg:
        tg.start_soon(f.write, "日本")
        await until(lambda: bool(f._outstanding))  # queued behind the gate
        tg.cancel_scope.cancel()
    _, gate = gated
    gate.release.set()
    await f.write("語\n")
    await f.close()
    assert p.read_bytes() == expect.encode(encoding)


# -- M4: an empty write in append mode -----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "empty"), [("a+b", b""), ("a+", "")])
async def test_an_empty_append_write_leaves_the_position(
    tmp_path: Path, backend: str, mode: str, empty: Any
) -> None:
    p = tmp_path / "a"
    p.write_bytes(b"0123456789")
    with open(p, mode) as ref:  # the reference: io
        ref.seek(3)
        ref.write(empty)
        expect = ref.tell()
    async with threadlets.open(p, mode) as f:
        await f.seek(3)
        assert await f.write(empty) == 0
        assert await f.tell() == expect == 3


# -- S6: a cancelled open of a FIFO for writing ----------------------------------------------------

_OPENAT = {"x86_64": 257, "aarch64": 56}.get(os.uname().machine)


def _threads_in_open() -> int:
    """Threads of this process inside openat(2) now."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:  # the reference: procfs
                first = f.read().split(" ", 1)[0]
        except OSError:
            continue
        n += first == str(_OPENAT)
    return n


@pytest.mark.anyio
@pytest.mark.skipif(_OPENAT is None, reason="openat's number unknown here")
@pytest.mark.parametrize("mode", ["wb", "w"])
async def test_a_cancelled_fifo_open_leaves_no_blocked_writer(tmp_path: Path, mode: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    aw.current()  # (the loop's own descriptors, trio's after a checkpoint)
    await anyio.sleep(0)
    fds = len(os.listdir("/proc/self/fd"))

    async def opener() -> None:
        await threadlets.open(fifo, mode)

    async with anyio.create_task_group() as tg:
        tg.start_soon(opener)
        await until(lambda: _threads_in_open() > 0)  # a worker waits for a reader
        tg.cancel_scope.cancel()
    assert io_queue().drain(10)  # the abandoned open finished
    assert _threads_in_open() == 0
    assert len(os.listdir("/proc/self/fd")) <= fds
    # No phantom writer: a reader opened now sees no writer come (and go:
    # that would make it readable, at end of file).
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert select.select([r], [], [], 0.05)[0] == []
    finally:
        os.close(r)


@pytest.mark.anyio
async def test_a_fifo_opened_for_writing_works_once_a_reader_comes(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[threadlets.AsyncFile] = []

    async def opener() -> None:
        got.append(await threadlets.open(fifo, "wb"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(opener)
        await until(lambda: _threads_in_open() > 0)
        r = os.open(fifo, os.O_RDONLY)
    try:
        async with got[0] as f:
            await f.write(b"through")
        assert os.read(r, 100) == b"through"
    finally:
        os.close(r)


# -- M7: a loop dropped with an unprocessed completion -------------------------------------------


def _until_handed_over(ctx: Any, req: Any) -> None:
    """Until a finished request sits in its context's ready queue (a worker,
    or the ring's reap, hands it over just after it reads DONE)."""

    def there() -> bool:
        if ctx._ring is not None:
            ctx._ring.reap()
        return req in ctx._cq.ready

    wait_until(there)


_DROPPED_LOOP = r"""
import asyncio, gc, os, sys, threading, time, warnings, weakref
import threadlets
import threadlets.awaitable as aw

path, backend = sys.argv[1], sys.argv[2]


async def opener():
    return await threadlets.open(path, "rb")


# The loop's requests go to a queue whose one worker is held: the read
# stays queued until released, so it is seen outstanding (no timing).
q = threadlets.ThreadletQueue(max_threads=1)
gate = threading.Event()
aw.configure(queue=q, inline=False, backend=backend)
loop = asyncio.new_event_loop()
f = loop.run_until_complete(opener())
held = q.submit(gate.wait, 10)  # (after the open, which may use the queue)
task = loop.create_task(f.read())
for _ in range(100):  # until the read is submitted (a few loop passes)
    loop.run_until_complete(asyncio.sleep(0))
    if f._outstanding:
        break
[req] = f._outstanding
gate.set()
assert held.result(10)
assert req.wait(10)  # finished; its completion never processed
ctx = req._ctx
deadline = time.monotonic() + 60
while req not in ctx._cq.ready:  # handed over just after it reads DONE
    assert time.monotonic() < deadline, "never handed over"
    time.sleep(0.001)
ref = weakref.ref(loop)
fd = f._fd
f._closed = True  # (no unclosed-file warning: closed by hand below)
os.close(fd)
del loop, task, f, req, ctx
# (The worker that handed the request over may hold it, and through its
# callback the loop, a moment longer on its way out: collect until then.)
deadline = time.monotonic() + 60
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Task was destroyed but it is pending"
    while gc.collect() is not None and ref() is not None:
        assert time.monotonic() < deadline, "the dropped loop was not collected"
        time.sleep(0.001)
assert q.close(timeout=10)
print("collected")
"""


def test_a_dropped_loop_with_an_unprocessed_completion_is_collected(
    tmp_path: Path, backend: str
) -> None:
    # In a process of its own: the dropped loop's garbage (its self-pipe
    # sockets, "unclosed event loop") must not reach later tests.
    if backend == "io_uring":
        pytest.skip("a ring read is reaped and delivered within the loop's pass: no window")
    p = tmp_path / "f"
    p.write_bytes(BIG)
    proc = subprocess.run(
        [sys.executable, "-c", _DROPPED_LOOP, str(p), backend],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "collected"


# -- M6: a positional write drops the text layer's decoded text too ------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["readline", "iterate", "read"])
async def test_text_reads_after_a_pwrite_see_it(tmp_path: Path, backend: str, how: str) -> None:
    p = tmp_path / "t"
    p.write_bytes("lïne1\nlïne2\nlïne3\n".encode())
    async with threadlets.open(p, "r+", encoding="utf-8") as f:
        assert await f.readline() == "lïne1\n"
        await f.pwrite("LÏNE2".encode(), 7)
        if how == "readline":
            assert await f.readline() == "LÏNE2\n"
        elif how == "iterate":
            assert [line async for line in f] == ["LÏNE2\n", "lïne3\n"]
        else:
            assert await f.read(3) == "LÏN"
        await f.seek(0)
        assert await f.read() == "lïne1\nLÏNE2\nlïne3\n"
