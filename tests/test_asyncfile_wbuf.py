"""threadlets.open's write buffer (issue 14, item 2): ``buffering=`` for
writes.  The same results and bytes as ``io.open`` with the same buffer
size for any sequence of stream and positional calls; one request per
buffer, in binary and text mode; O_APPEND writers whose lines stay whole;
a failed or cancelled flush that keeps what it did not write; close() that
flushes, closes and raises."""

from __future__ import annotations

import errno
import io
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import threadlets
import threadlets.awaitable as aw
from threadlets import AioContext, ThreadletQueue
from threadlets.syscalls import Syscalls

from .test_asyncfile import _have_io_uring, until

pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(params=["threads", "io_uring"])
def engine_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """New loops' engine backend (io_uring skipped where unavailable)."""
    if request.param == "io_uring" and not _have_io_uring():
        pytest.skip("no io_uring here")
    aw.configure(backend=request.param)
    try:
        yield request.param
    finally:
        aw.configure()


# -- against io.open ---------------------------------------------------------------------------

MODES = ["w+b", "r+b", "ab", "a+b"]
DATA = st.binary(max_size=200)

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), DATA),
        st.tuples(st.just("writelines"), st.lists(st.binary(max_size=40), max_size=4)),
        st.tuples(st.just("seek"), st.tuples(st.integers(0, 300), st.just(os.SEEK_SET))),
        st.tuples(st.just("seek"), st.tuples(st.integers(-40, 40), st.just(os.SEEK_CUR))),
        st.tuples(st.just("seek"), st.tuples(st.integers(-40, 0), st.just(os.SEEK_END))),
        st.tuples(st.just("tell"), st.none()),
        st.tuples(st.just("read"), st.one_of(st.none(), st.integers(-1, 100))),
        st.tuples(st.just("readline"), st.one_of(st.none(), st.integers(-1, 60))),
        st.tuples(st.just("flush"), st.none()),
        st.tuples(st.just("truncate"), st.one_of(st.none(), st.integers(0, 300))),
        st.tuples(st.just("pwrite"), st.tuples(st.binary(max_size=60), st.integers(0, 300))),
        st.tuples(st.just("pread"), st.tuples(st.integers(0, 80), st.integers(0, 300))),
    ),
    max_size=25,
)


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except Exception as e:
        return ("raised", type(e))


async def _aoutcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", await fn())
    except Exception as e:
        return ("raised", type(e))


def _call(f: Any, op: str, arg: Any) -> Any:
    """One call on io's file.  io has no pwrite/pread: the model is
    threadlets' (the buffer sent first, the read-ahead dropped after)."""
    if op in ("write", "writelines") and "a" in f.mode:
        # O_APPEND puts the write at the end and leaves the descriptor
        # there; io keeps counting from the position it cached before the
        # write, threadlets goes on from the descriptor, as FileIO does.
        # So io is moved to where the descriptor is (the flush changes
        # nothing else: with O_APPEND the bytes land at the end anyway).
        n = f.write(arg) if op == "write" else f.writelines(arg)
        f.flush()
        f.seek(os.lseek(f.fileno(), 0, os.SEEK_CUR))
        return n
    if op == "write":
        return f.write(arg)
    if op == "writelines":
        return f.writelines(arg)
    if op == "seek":
        return f.seek(*arg)
    if op == "tell":
        if "a" in f.mode:
            # After a seek and a write, io's tell() counts from the position
            # it cached, not from the end where O_APPEND put the write:
            # threadlets says where the descriptor is, as FileIO does.
            f.flush()
            return os.lseek(f.fileno(), 0, os.SEEK_CUR)
        return f.tell()
    if op == "read":
        return f.read(arg)
    if op == "readline":
        return f.readline(arg)
    if op == "flush":
        return f.flush()
    if op == "truncate":
        return f.truncate(arg)
    f.flush()
    pos = os.lseek(f.fileno(), 0, os.SEEK_CUR)  # (after a flush: the position)
    if op == "pwrite":
        n = os.pwrite(f.fileno(), *arg)
        f.seek(0, os.SEEK_END)  # (drops io's read-ahead)
        f.seek(pos)
        return n
    return os.pread(f.fileno(), *arg)


async def _acall(f: Any, op: str, arg: Any) -> Any:
    if op == "write":
        return await f.write(arg)
    if op == "writelines":
        return await f.writelines(arg)
    if op == "seek":
        return await f.seek(*arg)
    if op == "tell":
        return await f.tell()
    if op == "read":
        return await f.read(arg)
    if op == "readline":
        return await f.readline(arg)
    if op == "flush":
        return await f.flush()
    if op == "truncate":
        return await f.truncate(arg)
    if op == "pwrite":
        return await f.pwrite(*arg)
    return await f.pread(*arg)


def _run_both(kind: str, mode: str, buffering: int, content: bytes, ops: Any) -> None:
    if mode == "ab":
        # Reading a write-only file is not this test's business (and
        # io.BufferedWriter.readline(0) answers b"" where threadlets raises).
        ops = [(name, arg) for name, arg in ops if name not in ("pread", "read", "readline")]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # buffering=1 in binary mode
        theirs, ours = Path(tmp, "io"), Path(tmp, "threadlets")
        theirs.write_bytes(content)
        ours.write_bytes(content)
        with open(theirs, mode, buffering=buffering) as f:  # the reference: io
            expected = [_outcome(lambda: _call(f, op, arg)) for op, arg in ops]  # noqa: B023

        async def main() -> list[Any]:
            async with threadlets.open(ours, mode, buffering=buffering) as f:
                return [await _aoutcome(lambda: _acall(f, op, arg)) for op, arg in ops]  # noqa: B023

        got = anyio.run(main, backend=kind)
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            assert g == e, f"call {i} {ops[i]}: io.open gave {e}, threadlets.open {g}"
        assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("kind", ["asyncio", "trio"])
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mode=st.sampled_from(MODES),
    buffering=st.one_of(st.integers(1, 64), st.sampled_from([-1, 0])),
    content=st.binary(max_size=100),
    ops=OPS,
)
def test_binary_stream_behaves_as_io_open(
    engine_backend: str, kind: str, mode: str, buffering: int, content: bytes, ops: Any
) -> None:
    _run_both(kind, mode, buffering, content, ops)


@pytest.mark.parametrize(
    ("mode", "ops"),
    [
        # A write that fills the buffer exactly stays buffered; the next
        # one sends it first; a large one goes straight through after it.
        ("w+b", [("write", b"x" * 8), ("write", b"y"), ("pread", (20, 0)), ("write", b"z" * 30)]),
        ("r+b", [("read", 3), ("write", b"AB"), ("tell", None), ("read", 2), ("tell", None)]),
        ("a+b", [("write", b"abc"), ("seek", (0, 0)), ("read", None), ("tell", None)]),
        ("ab", [("write", b"abc"), ("tell", None), ("truncate", 2), ("write", b"d")]),
        ("w+b", [("write", b"abcdef"), ("seek", (-2, 1)), ("write", b"Z"), ("read", None)]),
        ("w+b", [("write", b"abcdef"), ("truncate", None), ("seek", (0, 2)), ("tell", None)]),
        # After an append write the position is the descriptor's, the end
        # (the oracle once compared io's cached position here):
        ("a+b", [("truncate", 3), ("read", 1), ("write", b"\0"), ("seek", (0, 1))]),
        ("a+b", [("seek", (0, 0)), ("read", 1), ("write", b"\0"), ("read", None)]),
        ("a+b", [("seek", (2, 0)), ("write", b"xy"), ("seek", (-3, 1)), ("readline", None)]),
    ],
)
def test_binary_cases(engine_backend: str, mode: str, ops: Any) -> None:
    _run_both("asyncio", mode, 8, b"0123456789", ops)


# -- the requests it costs ---------------------------------------------------------------------


def _submitted(f: threadlets.AsyncFile) -> int:
    return f._ctx.stats().submitted


@pytest.mark.anyio
@pytest.mark.parametrize(("buffering", "most"), [(-1, 1), (4096, 3), (0, 1000)])
async def test_small_writes_cost_one_request_per_buffer(
    tmp_path: Path, engine_backend: str, buffering: int, most: int
) -> None:
    p = tmp_path / "f"
    async with threadlets.open(p, "wb", buffering=buffering) as f:
        assert f._ctx.backend == engine_backend
        before = _submitted(f)
        for i in range(1000):
            await f.write(b"%09d\n" % i)
        await f.flush()
        cost = _submitted(f) - before
    assert cost <= most
    if buffering == 0:
        assert cost == 1000  # one request per write, as before
    assert p.read_bytes() == b"".join(b"%09d\n" % i for i in range(1000))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "encoding", "newline"),
    [("w", "utf-8", None), ("a", "utf-16", "\r\n"), ("r+", "latin-1", "")],
)
async def test_text_writes_go_through_the_same_buffer(
    tmp_path: Path, engine_backend: str, mode: str, encoding: str, newline: str | None
) -> None:
    theirs, ours = tmp_path / "io", tmp_path / "threadlets"
    for p in (theirs, ours):
        p.write_bytes("début\n".encode(encoding))
    lines = [f"ligne {i} é\n" for i in range(500)]
    with open(theirs, mode, encoding=encoding, newline=newline) as ref:  # the reference: io
        ref.seek(0, os.SEEK_END)
        for line in lines:
            ref.write(line)
    async with threadlets.open(ours, mode, encoding=encoding, newline=newline) as f:
        await f.seek(0, os.SEEK_END)
        before = _submitted(f)
        for line in lines:
            await f.write(line)
        assert _submitted(f) - before <= 2  # (~8 KiB: nothing sent yet, or one buffer)
        await f.flush()
        assert _submitted(f) - before <= 3
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.anyio
async def test_line_buffering_sends_each_line(tmp_path: Path) -> None:
    p = tmp_path / "f"
    async with threadlets.open(p, "w", buffering=1) as f:
        await f.write("no newline")
        assert p.read_bytes() == b""
        await f.write(" then one\n")
        assert p.read_bytes() == b"no newline then one\n"


@pytest.mark.anyio
async def test_pipes_are_not_buffered(engine_backend: str) -> None:
    r, w = os.pipe()
    f = threadlets.wrap(os.dup(w), "wb")
    g = await threadlets.open(w, "wb", closefd=True)
    try:
        await f.write(b"a")
        await g.write(b"b")
        assert os.read(r, 10) == b"ab"  # each at once: a reader may be waiting
    finally:
        await f.close()
        await g.close()
        os.close(r)


# -- O_APPEND: lines stay whole ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("buffering", [-1, 64, 0])
async def test_two_append_files_lose_and_tear_no_line(
    tmp_path: Path, engine_backend: str, buffering: int
) -> None:
    p = tmp_path / "log"
    expected = set()
    async with (
        threadlets.open(p, "ab", buffering=buffering) as a,
        threadlets.open(p, "ab", buffering=buffering) as b,
    ):

        async def writer(f: threadlets.AsyncFile, name: str) -> None:
            for i in range(150):
                # Lines of 10 to ~160 bytes: some fit the buffer, some do not.
                line = f"{name} {i} ".encode() + b"x" * (i % 17 * 9) + b"\n"
                await f.write(line)
                if i % 37 == 0:
                    await f.flush()

        async with anyio.create_task_group() as tg:
            for t in range(4):
                for f, who in ((a, "a"), (b, "b")):
                    name = f"{who}{t}"
                    expected |= {
                        f"{name} {i} ".encode() + b"x" * (i % 17 * 9) + b"\n" for i in range(150)
                    }
                    tg.start_soon(writer, f, name)
    lines = p.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(expected) == 1200
    assert set(lines) == expected


# -- errors ---------------------------------------------------------------------------------------


class _Disk(Syscalls):
    """Writes fail with ENOSPC while ``full``; with ``room`` set, a write
    gets that many bytes in, then ENOSPC; ``gate``, if set, holds each
    write until it is set."""

    def __init__(self) -> None:
        self.full = False
        self.room: int | None = None
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.queue: ThreadletQueue | None = None

    def pwritev(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "no inline writes")
        self.started.set()
        if self.gate is not None and not self.gate.wait(30):
            raise AssertionError("the write was never let through")
        if self.room is not None:
            data = b"".join(bytes(b) for b in buffers)[: self.room]
            if not data:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return os.pwrite(fd, data, offset)
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().pwritev(fd, buffers, offset, flags)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Disk]:
    """New loops' engine: threads, no inline path, writes through a _Disk."""
    sc = _Disk()
    q = sc.queue = ThreadletQueue(max_threads=1)
    monkeypatch.setattr(aw, "_new_context", lambda: AioContext(q, inline=False, syscalls=sc))
    yield sc
    q.close(timeout=10)


@pytest.mark.anyio
async def test_a_failed_flush_keeps_the_buffer(tmp_path: Path, disk: _Disk) -> None:
    p = tmp_path / "f"
    async with threadlets.open(p, "w+b", buffering=16) as f:
        await f.write(b"a" * 10)
        disk.full = True
        with pytest.raises(OSError) as e:
            await f.write(b"b" * 10)  # does not fit: the buffer is sent, and fails
        assert e.value.errno == errno.ENOSPC
        assert await f.tell() == 10  # the b's were not taken
        with pytest.raises(OSError):
            await f.flush()
        with pytest.raises(OSError):
            await f.read()  # a read sends the buffer first
        disk.full = False
        assert await f.read() == b""
        assert p.read_bytes() == b"a" * 10
        # Part written, then ENOSPC: what went in leaves the buffer.
        await f.write(b"0123456789")
        disk.room = 4
        with pytest.raises(OSError):
            await f.flush()
        assert p.read_bytes() == b"a" * 10 + b"0123"
        assert bytes(f._wbuf) == b"456789"
        assert await f.tell() == 20
        disk.room = None
        await f.seek(0)
        assert await f.read() == b"a" * 10 + b"0123456789"


@pytest.mark.anyio
async def test_close_flushes_closes_then_raises(tmp_path: Path, disk: _Disk) -> None:
    p = tmp_path / "f"
    f = await threadlets.open(p, "wb")
    await f.write(b"lost")
    fd = f.fileno()
    disk.full = True
    with pytest.raises(OSError) as e:
        await f.close()
    assert e.value.errno == errno.ENOSPC
    assert f.closed
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor is gone
    await f.close()  # (once closed, closed)


# -- cancellation -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_buffered_write_is_not_cancelled_half_way(tmp_path: Path) -> None:
    p = tmp_path / "f"
    async with threadlets.open(p, "wb") as f:
        with anyio.CancelScope() as scope:
            scope.cancel()
            try:
                await f.write(b"abc")
            except anyio.get_cancelled_exc_class():
                assert not f._wbuf  # cancelled before it began: nothing taken
                raise
        await f.write(b"d")
    assert p.read_bytes() in (b"abcd", b"d")


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["queued", "running"])
async def test_a_cancelled_flush_keeps_what_it_did_not_write(
    tmp_path: Path, disk: _Disk, where: str
) -> None:
    p = tmp_path / "f"
    async with threadlets.open(p, "w+b", buffering=16) as f:
        gate = threading.Event()
        if where == "queued":
            # The only worker is held: the flush's request waits in the queue.
            assert disk.queue is not None
            hold = disk.queue.submit(gate.wait, 30)
        else:
            disk.gate = gate
        await f.write(b"hello")
        scope = anyio.CancelScope()
        left: list[bool] = []

        async def flusher() -> None:
            with scope:
                await f.flush()
            left.append(scope.cancelled_caught)

        async with anyio.create_task_group() as tg:
            tg.start_soon(flusher)
            try:
                await until(lambda: bool(f._outstanding))
                if where == "running":
                    await anyio.to_thread.run_sync(disk.started.wait, 10)
                scope.cancel()
                if where == "running":
                    for _ in range(20):  # the flush must not give up while it runs
                        await anyio.lowlevel.checkpoint()
                    assert f._outstanding
                    assert not left
                else:
                    await until(lambda: bool(left))  # gone without its request
            finally:
                gate.set()
        assert left == [True]
        if where == "queued":
            assert hold.result(10)
            assert p.read_bytes() == b"", p.read_bytes()
            assert bytes(f._wbuf) == b"hello", (f._wbuf, f._wbuf_pos)
        else:
            assert not f._wbuf
            assert p.read_bytes() == b"hello"
        assert await f.tell() == 5
        await f.write(b"!")
    assert p.read_bytes() == b"hello!"


@pytest.mark.anyio
async def test_a_cancelled_close_still_flushes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    f = await threadlets.open(p, "wb")
    await f.write(b"kept")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await f.close()
    assert f.closed
    assert p.read_bytes() == b"kept"


def test_an_unclosed_file_warns_and_writes_its_buffer(tmp_path: Path) -> None:
    # As io's finalizer: the buffer is written before the file is closed.
    p = tmp_path / "f"

    async def main() -> None:
        f = await threadlets.open(p, "wb")
        await f.write(b"never sent")
        with pytest.warns(ResourceWarning):
            del f  # (its last reference)

    anyio.run(main)
    assert p.read_bytes() == b"never sent"


def test_io_agrees_on_the_flush_rule() -> None:
    # (The reference: a write that fills io's buffer exactly is kept.)
    raw = io.BytesIO()
    f = io.BufferedWriter(raw, buffer_size=8)
    f.write(b"x" * 8)
    assert raw.getvalue() == b""
    f.write(b"y")
    assert raw.getvalue() == b"x" * 8
