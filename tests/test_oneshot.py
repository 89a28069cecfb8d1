"""threadlets.read_bytes/read_text/write_bytes/write_text: pathlib's
semantics, one request (or none, for a cached read), errors before any
I/O, on asyncio, uvloop and trio and both engine backends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import threadlets
import threadlets.awaitable as aw
from threadlets import oneshot
from threadlets.awaitable import current

from .test_asyncfile import anyio_backend, backend

__all__ = ["anyio_backend", "backend"]  # fixtures used by name

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[True, False], ids=["inline", "worker"])
def inline(request: pytest.FixtureRequest, backend: str) -> Iterator[bool]:
    """New loops read inline where they can, or always on a worker."""
    aw.configure(inline=request.param, backend=backend)
    try:
        yield request.param
    finally:
        aw.configure()


async def test_round_trips_as_pathlib(tmp_path: Path, inline: bool) -> None:
    p = tmp_path / "f"
    data = os.urandom(10_000)
    assert await threadlets.write_bytes(p, data) == len(data)
    assert p.read_bytes() == data
    assert await threadlets.read_bytes(p) == data
    assert await threadlets.read_bytes(str(p).encode()) == data
    text = "héllo\r\nwörld\rend\n"
    assert await threadlets.write_text(p, text, encoding="utf-8") == len(text)
    assert p.read_bytes() == text.encode()
    assert await threadlets.read_text(p, encoding="utf-8") == p.read_text(encoding="utf-8")
    assert await threadlets.read_text(p, "utf-8", newline="") == text
    await threadlets.write_text(p, "a\nb\n", encoding="utf-16", newline="\r\n")
    assert p.read_bytes() == "a\r\nb\r\n".encode("utf-16")
    assert await threadlets.read_text(p, encoding="utf-16") == "a\nb\n"
    p.write_bytes(b"\xff abc")
    assert await threadlets.read_text(p, encoding="utf-8", errors="replace") == "\ufffd abc"
    with pytest.raises(UnicodeDecodeError):
        await threadlets.read_text(p, encoding="utf-8")


async def test_empty_and_large_files(tmp_path: Path, inline: bool) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    assert await threadlets.read_bytes(p) == b""
    big = os.urandom(oneshot.INLINE_MAX + 12345)  # read on a worker
    p.write_bytes(big)
    assert await threadlets.read_bytes(p) == big


async def test_a_cached_read_is_inline_an_uncached_one_request(
    tmp_path: Path, inline: bool
) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    ctx = current().ctx
    before = ctx.stats().threaded
    assert await threadlets.read_bytes(p) == b"x" * 4096
    if inline and oneshot._openat2 is not None:
        assert ctx.stats().threaded == before  # cached: nothing submitted
    else:
        assert ctx.stats().threaded == before + 1  # one hop for open, read, close
    before = ctx.stats().threaded
    await threadlets.write_bytes(p, b"y")
    assert ctx.stats().threaded == before + 1


async def test_errors_as_pathlib_gives_them(tmp_path: Path, inline: bool) -> None:
    with pytest.raises(FileNotFoundError) as e:
        await threadlets.read_bytes(tmp_path / "missing")
    assert e.value.filename == str(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        await threadlets.read_bytes(tmp_path)
    with pytest.raises(IsADirectoryError):
        await threadlets.read_text(tmp_path)


async def test_bad_input_does_nothing(tmp_path: Path, inline: bool) -> None:
    p = tmp_path / "f"
    with pytest.raises(TypeError):
        await threadlets.write_bytes(p, "str")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data must be str"):
        await threadlets.write_text(p, b"bytes")  # type: ignore[arg-type]
    with pytest.raises(LookupError):
        await threadlets.write_text(p, "x", encoding="no-such-codec")
    with pytest.raises(ValueError, match="illegal newline"):
        await threadlets.write_text(p, "x", newline="x")
    with pytest.raises(ValueError, match="illegal newline"):
        await threadlets.read_text(p, newline="x")
    assert not p.exists()
    p.write_text("keep")
    with pytest.raises(UnicodeEncodeError):
        await threadlets.write_text(p, "é", encoding="ascii")
    assert p.read_text() == "keep"  # not truncated


async def test_fifo_is_read_on_a_worker(tmp_path: Path, inline: bool) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    ctx = current().ctx
    before = ctx.stats().threaded

    def feed() -> None:
        with open(fifo, "wb") as w:
            w.write(b"through a pipe")

    import threading

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        assert await threadlets.read_bytes(fifo) == b"through a pipe"
    finally:
        writer.join(timeout=10)
    assert ctx.stats().threaded == before + 1


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    text=st.text(alphabet=st.sampled_from("ab\r\né€\x00"), max_size=40),
    newline=st.sampled_from([None, "", "\n", "\r", "\r\n"]),
    encoding=st.sampled_from(["utf-8", "utf-16", "latin-1", "utf-8-sig"]),
)
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
def test_text_as_pathlib_and_open(
    tmp_path: Path, anyio_backend: Any, text: str, newline: str | None, encoding: str
) -> None:
    import asyncio

    if encoding == "latin-1":
        text = text.replace("€", "e")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    with open(theirs, "w", encoding=encoding, newline=newline) as f:
        f.write(text)
    with open(theirs, encoding=encoding, newline=newline) as f:
        want = f.read()

    async def main() -> str:
        await threadlets.write_text(ours, text, encoding=encoding, newline=newline)
        return await threadlets.read_text(ours, encoding=encoding, newline=newline)

    assert asyncio.run(main()) == want
    assert ours.read_bytes() == theirs.read_bytes()


async def test_cancelled_fifo_read_lets_the_worker_go(tmp_path: Path, backend: str) -> None:
    import anyio

    if oneshot._openat2 is None:
        pytest.skip("no openat2 here: a FIFO is opened by a blocking worker")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    ctx = current().ctx
    with anyio.CancelScope() as scope:

        async def cancel_once_submitted() -> None:
            # The read is on a worker (poll, waiting for a writer) once the
            # context has it outstanding.
            while ctx.stats().outstanding == 0:
                await anyio.lowlevel.checkpoint()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_submitted)
            await threadlets.read_bytes(fifo)
    assert scope.cancelled_caught
    # The worker was woken and finished: nothing outstanding, no descriptor left.
    with anyio.fail_after(10):
        while ctx.stats().outstanding:
            await anyio.lowlevel.checkpoint()  # the loop delivers the completion
    assert not [fd for fd in os.listdir("/proc/self/fd") if _points_to(fd, str(fifo))]


def _points_to(fd: str, target: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == target
    except OSError:
        return False
