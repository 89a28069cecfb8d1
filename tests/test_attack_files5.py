"""An outside attacker's regressions for the async file objects (fifth
round), with ``io.open`` as the oracle where it has an answer.  Each test
named for a defect failed on the code before its fix."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import threadlets

from .test_asyncfile import anyio_backend, backend, until
from .test_attack_files4 import CancelAt, no_inline

__all__ = ["anyio_backend", "backend", "no_inline"]  # fixtures used by name

pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]


def _full_pipe() -> tuple[int, int, int]:
    """A pipe whose buffer is full: (reader, writer, bytes in it)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w, filled


def _drain(r: int, n: int) -> bytes:
    got = b""
    while len(got) < n:
        got += os.read(r, n - len(got))
    return got


# -- a: a cancelled partial write to a pipe tells how much it wrote ---------------------------


async def _cancelled_part_way(
    f: Any, r: int, filled: int, write: Callable[[], Awaitable[object]], settled: Callable[[], bool]
) -> tuple[list[int], bytes]:
    """Run ``write()`` on ``f``, the writer of a full pipe: make room once,
    wait until ``settled()``, cancel.  Returns the counts the cancellation
    told and what the pipe holds of the write."""
    scope = anyio.CancelScope()
    told: list[int] = []
    async with anyio.create_task_group() as tg:

        async def writer() -> None:
            with scope:
                try:
                    await write()
                except anyio.get_cancelled_exc_class() as e:
                    told.append(getattr(e, "characters_written", 0))
                    raise

        tg.start_soon(writer)
        await until(lambda: f._lock.busy)
        assert _drain(r, filled) == b"x" * filled  # room for part of the write
        await until(settled)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        scope.cancel()
    os.set_blocking(r, False)
    got = b""
    try:
        while True:
            got += os.read(r, 1 << 20)
    except BlockingIOError:
        pass
    return told, got


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["wb", "w"])
async def test_a_cancelled_partial_pipe_write_tells_the_count_written(
    backend: str, mode: str
) -> None:
    # The write took part of its data (the reader made room once), then
    # waited for more room and was cancelled: the bytes that moved are in
    # the pipe, and the caller could not know how many (io's
    # BlockingIOError carries characters_written; the cancellation now does).
    r, w, filled = _full_pipe()
    kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": "ascii"}
    f = await threadlets.open(w, mode, closefd=False, **kwargs)
    data: Any = b"y" * 300000 if "b" in mode else "y" * 300000
    try:
        told, got = await _cancelled_part_way(
            f, r, filled, lambda: f.write(data), lambda: f._moved > 0
        )
        assert len(told) == 1
        moved = told[0]
        assert 0 < moved < 300000
        assert got == b"y" * moved  # what it said it wrote is what the pipe holds
    finally:
        await f.close()
        os.close(r)
        os.close(w)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["wb", "ab", "w"])
async def test_a_write_cancelled_once_its_request_ran_tells_the_count_written(
    tmp_path: Path, no_inline: str, mode: str
) -> None:
    # A write larger than the buffer is one request; cancelled once it ran,
    # it happened whole: the cancellation says so.
    p = tmp_path / "f"
    p.write_bytes(b"")
    kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": "ascii"}
    data: Any = b"z" * 100000 if "b" in mode else "z" * 100000
    told: list[int] = []
    async with threadlets.open(p, mode, **kwargs) as f:
        with CancelAt(f, 1) as cut:
            try:
                await f.write(data)
            except anyio.get_cancelled_exc_class() as e:
                told.append(getattr(e, "characters_written", 0))
                raise
        assert cut.hit
        assert cut.cancelled
    assert told == [100000]
    assert p.read_bytes() == b"z" * 100000


# -- d: one read of a pipe is up to what was asked, not 64 KiB -----------------------------------


F_SETPIPE_SZ = 1031


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("buffering", "call"),
    [(100, "read1"), (-1, "read1"), (0, "read"), (0, "readinto"), (4096, "peek")],
)
async def test_one_read_of_a_big_pipe_is_as_big_as_ios(
    backend: str, buffering: int, call: str
) -> None:
    # A pipe enlarged to 1 MiB holding 300000 bytes: io's read1(n) (and a
    # raw file's read(n)) is one read(2) of n bytes, which takes them all;
    # ours was one read of at most 64 KiB.
    data = bytes(range(256)) * 1200  # 307200

    def source() -> int:
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            os.close(r)
            os.close(w)
            pytest.skip("cannot enlarge a pipe here")
        os.write(w, data)
        os.close(w)
        return r

    def io_call(f: Any) -> Any:
        if call == "readinto":
            buf = bytearray(1 << 20)
            return bytes(buf[: f.readinto(buf)])
        if call == "peek":
            return f.peek(1 << 20)
        return getattr(f, call)(1 << 20)

    with open(source(), "rb", buffering=buffering) as r:
        expect = [io_call(r), r.read()]
    async with threadlets.open(source(), "rb", buffering=buffering) as f:
        if call == "readinto":
            buf = bytearray(1 << 20)
            first: Any = bytes(buf[: await f.readinto(buf)])
        elif call == "peek":
            first = await f.peek(1 << 20)
        else:
            first = await getattr(f, call)(1 << 20)
        got = [first, await f.read()]
    if call == "peek":  # (peek's count is the buffer's: only its start is io's)
        assert got[0][: len(expect[0])] == expect[0]
        assert got[1] == expect[1] == data
    else:
        assert [len(x) for x in got] == [len(x) for x in expect]
        assert got == expect


# -- a file opened by descriptor leaves the descriptor's offset where the stream is ---------------

_FD_CASES = [
    ("wb", -1, [("write", b"abc")]),
    ("wb", 0, [("write", b"abc")]),
    ("wb", 7, [("write", b"abc"), ("write", b"defghijk")]),
    ("r+b", -1, [("read", 5)]),
    ("r+b", 0, [("read", 5)]),
    ("r+b", -1, [("read", 5), ("write", b"XY")]),
    ("rb", 0, [("seek", 7)]),
    ("rb", -1, [("seek", 7)]),
    ("r+b", -1, [("seek", 7), ("write", b"Q")]),
    ("r+b", 3, [("read", 40)]),
    ("ab", -1, [("write", b"tail")]),
    ("a+b", 0, [("seek", 0), ("read", 2), ("write", b"tail")]),
    ("w", -1, [("write", "hé")]),
    ("r+", -1, [("write", "hé\n"), ("seek", 0), ("readline",)]),
]


@pytest.mark.anyio
@pytest.mark.parametrize("closing", ["close", "flush"])
@pytest.mark.parametrize(("mode", "buffering", "calls"), _FD_CASES)
async def test_a_file_opened_by_descriptor_leaves_its_offset_where_io_does(
    tmp_path: Path, backend: str, closing: str, mode: str, buffering: int, calls: list[Any]
) -> None:
    # open(fd, closefd=False), some calls, close() (or flush()), then the
    # descriptor's owner goes on writing with os.write: io's raw file moved
    # the descriptor's offset, so the owner's bytes land after the stream's;
    # ours used pread/pwrite and left it at 0 (the owner overwrote the start).
    kwargs: dict[str, Any] = {"buffering": buffering, "closefd": False}
    if "b" not in mode:
        kwargs["encoding"] = "utf-8"

    def descriptor(name: str) -> int:
        p = tmp_path / name
        p.write_bytes(b"0123456789" * 3)
        return os.open(p, os.O_RDWR | (os.O_APPEND if "a" in mode else 0))

    ref, ours = descriptor("ref"), descriptor("ours")
    try:
        with open(ref, mode, **kwargs) as r:
            for name, *args in calls:
                getattr(r, name)(*args)
            if closing == "flush":
                r.flush()
                os.write(ref, b"!")
        if closing == "close":
            os.write(ref, b"!")
        async with threadlets.open(ours, mode, **kwargs) as f:
            for name, *args in calls:
                await getattr(f, name)(*args)
            if closing == "flush":
                await f.flush()
                os.write(ours, b"!")
        if closing == "close":
            os.write(ours, b"!")
        assert os.lseek(ours, 0, os.SEEK_CUR) == os.lseek(ref, 0, os.SEEK_CUR)
        assert (tmp_path / "ours").read_bytes() == (tmp_path / "ref").read_bytes()
    finally:
        os.close(ref)
        os.close(ours)


# -- a descriptor opened with O_APPEND appends, and the position follows --------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "buffering"), [("r+b", 0), ("r+b", -1), ("wb", 7), ("r+", -1)])
async def test_a_descriptor_with_o_append_is_written_at_the_end_and_tells_so(
    tmp_path: Path, backend: str, mode: str, buffering: int
) -> None:
    # open(fd, "r+b") of a descriptor opened O_APPEND: the kernel appends
    # every write (pwrite too); io's raw file then tells the end and reads
    # nothing there, ours went on from where it thought the write landed
    # (tell 3, read b"34" -- bytes before the ones it wrote).  The oracle is
    # io's raw file (its buffered binary file tells 3 but reads b"" there:
    # not one answer); in text mode, io's text file.
    def descriptor(name: str) -> int:
        p = tmp_path / name
        p.write_bytes(b"0123456789")
        return os.open(p, os.O_RDWR | os.O_APPEND)

    data: Any = b"abc" if "b" in mode else "abc"
    calls: list[tuple[Any, ...]] = [
        ("write", data),
        ("tell",),
        ("read", 2),
        ("seek", 0),
        ("read", 2),
        ("write", data),
        ("tell",),
    ]
    ref, ours = descriptor("ref"), descriptor("ours")
    kwargs: dict[str, Any] = {"buffering": 0} if "b" in mode else {"encoding": "ascii"}
    expect = []
    with open(ref, mode, **kwargs) as r:
        for name, *args in calls:
            try:
                expect.append(getattr(r, name)(*args))
            except Exception as e:
                expect.append(type(e))
    got = []
    kwargs["buffering"] = buffering
    async with threadlets.open(ours, mode, **kwargs) as f:
        for name, *args in calls:
            try:
                got.append(await getattr(f, name)(*args))
            except Exception as e:
                got.append(type(e))
    assert got == expect
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "ref").read_bytes()


# -- reconfigure() after a read that decoded nothing (at the end) is refused as io's --------------

_RECONFIGURE_CASES: list[list[tuple[Any, ...]]] = [
    [("read", 2), ("reconfigure", {"encoding": "latin-1"}), ("read", -1)],
    [("read", 1), ("reconfigure", {"errors": "ignore"}), ("tell",), ("read", -1)],
    [("read", 3), ("reconfigure", {"encoding": "ascii", "errors": "replace"}), ("read", -1)],
    [("read", 3), ("reconfigure", {"newline": ""}), ("read", -1)],
    [("read", -1), ("reconfigure", {"encoding": "latin-1"}), ("read", 2)],
    [("readline",), ("reconfigure", {"encoding": "latin-1"}), ("read", 2)],
    [("read", 2), ("seek", 0), ("reconfigure", {"encoding": "latin-1"}), ("read", -1)],
    [("read", 2), ("write", "é"), ("reconfigure", {"encoding": "utf-16"}), ("write", "é")],
    [("reconfigure", {"encoding": "latin-1"}), ("read", -1)],
    [("readline",), ("reconfigure", {"newline": ""}), ("readline",), ("readline",)],
]


@pytest.mark.anyio
@pytest.mark.parametrize("body", [b"", "h\xe9llo\r\nw\xf6rld\rx\ny".encode()])
@pytest.mark.parametrize("calls", _RECONFIGURE_CASES)
async def test_reconfigure_after_reads_answers_as_io(
    tmp_path: Path, backend: str, body: bytes, calls: list[tuple[Any, ...]]
) -> None:
    # At the end of the file read(n) leaves C's decoded text "" (not NULL):
    # io then refuses a new encoding, errors or newline; ours took it (it
    # looked for decoded text, not for a read).
    ref, p = tmp_path / "ref", tmp_path / "ours"
    for q in (ref, p):
        q.write_bytes(body)

    def call(f: Any, name: str, args: tuple[Any, ...]) -> Any:
        return f.reconfigure(**args[0]) if name == "reconfigure" else getattr(f, name)(*args)

    expect: list[Any] = []
    with open(ref, "r+", encoding="utf-8") as r:
        for name, *args in calls:
            try:
                expect.append(call(r, name, tuple(args)))
            except Exception as e:
                expect.append(type(e))
        expect.append((r.encoding, r.errors, r.newlines))
    got: list[Any] = []
    async with threadlets.open(p, "r+", encoding="utf-8") as f:
        for name, *args in calls:
            try:
                got.append(await call(f, name, tuple(args)))
            except Exception as e:
                got.append(type(e))
        got.append((f.encoding, f.errors, f.newlines))
    assert got == expect
    assert p.read_bytes() == ref.read_bytes()


@pytest.mark.anyio
@pytest.mark.parametrize("end", ["close", "reader-gone"])
async def test_a_pipe_write_ended_part_way_by_an_error_tells_the_count_written(
    backend: str, end: str
) -> None:
    # As above, but the write that took part of its data ends with an error:
    # another task closed the file (ValueError), or the reader went
    # (BrokenPipeError).  The count was lost with it.
    r, w, filled = _full_pipe()
    f = await threadlets.open(w, "wb", closefd=False)
    told: list[Any] = []
    got = b""
    try:
        async with anyio.create_task_group() as tg:

            async def writer() -> None:
                try:
                    await f.write(b"y" * 300000)
                except (ValueError, BrokenPipeError) as e:
                    told.append((type(e), getattr(e, "characters_written", 0)))

            tg.start_soon(writer)
            await until(lambda: f._lock.busy)
            assert _drain(r, filled) == b"x" * filled
            await until(lambda: f._moved > 0)
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            os.set_blocking(r, False)
            try:
                while True:
                    got += os.read(r, 1 << 20)
            except BlockingIOError:
                pass
            if end == "close":
                await f.close()
            else:
                os.close(r)
                r = -1
        assert len(told) == 1
        kind, moved = told[0]
        assert kind is (ValueError if end == "close" else BrokenPipeError)
        if end == "close":
            assert moved == len(got)
        else:
            assert moved >= len(got) > 0  # (it may have filled the pipe again first)
    finally:
        await f.close()
        if r >= 0:
            os.close(r)
        os.close(w)


# -- readinto1, as io's buffered binary files have it ---------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["rb", "r+b", "wb", "ab"])
async def test_readinto1_answers_as_ios(tmp_path: Path, backend: str, mode: str) -> None:
    # AttributeError: the binary file had read1 and readinto but not
    # readinto1, which io's buffered files (and aiofiles' users) have.
    import array

    def buffers() -> list[Any]:
        return [bytearray(50), array.array("i", [0] * 30), bytearray(0), b"ro", "str"]

    ref, p = tmp_path / "ref", tmp_path / "ours"
    for q in (ref, p):
        q.write_bytes(bytes(range(256)))
    expect: list[Any] = []
    with open(ref, mode, buffering=100) as r:
        for b in buffers():
            try:
                expect.append((r.readinto1(b), bytes(b)))
            except Exception as e:
                expect.append(type(e))
        expect.append(r.tell())
    got: list[Any] = []
    async with threadlets.open(p, mode, buffering=100) as f:
        for b in buffers():
            try:
                got.append((await f.readinto1(b), bytes(b)))
            except Exception as e:
                got.append(type(e))
        got.append(await f.tell())
    assert got == expect


# -- a closed file is no context manager or iterator, as io's --------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["rb", "r"])
async def test_entering_or_iterating_a_closed_file_raises_as_io(
    tmp_path: Path, backend: str, mode: str
) -> None:
    # io: ValueError from `with f` and iter(f) once f is closed; ours entered
    # (and iterated) the closed file without a word.
    p = tmp_path / "f"
    p.write_bytes(b"a\nb\n")
    with open(p, mode) as r:
        pass
    with pytest.raises(ValueError):
        r.__enter__()
    with pytest.raises(ValueError):
        iter(r)
    f = await threadlets.open(p, mode)
    await f.close()
    with pytest.raises(ValueError):
        async with f:
            pass
    with pytest.raises(ValueError):
        aiter(f)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["wb", "w"])
async def test_a_cancelled_writelines_tells_the_count_written(backend: str, mode: str) -> None:
    # writelines: the first line went whole, the second in part, then the
    # cancellation: the count is of both (it was unknown).
    r, w, filled = _full_pipe()
    kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": "ascii"}
    f = await threadlets.open(w, mode, closefd=False, **kwargs)
    lines: list[Any] = [b"y" * 1000, b"z" * 300000]
    if "b" not in mode:
        lines = [x.decode() for x in lines]
    try:
        told, got = await _cancelled_part_way(
            f, r, filled, lambda: f.writelines(lines), lambda: f._moved > 0 and f._wbuf == b""
        )
        assert got.startswith(b"y" * 1000 + b"z")
        assert told == [len(got)]
    finally:
        await f.close()
        os.close(r)
        os.close(w)


@pytest.mark.anyio
@pytest.mark.parametrize(("buffering", "call"), [(0, "read"), (100, "read1"), (0, "readinto")])
async def test_one_read_of_dev_zero_asks_the_size_io_asks(
    backend: str, buffering: int, call: str
) -> None:
    # A character device with no count of bytes waiting (FIONREAD): io's
    # one read(2) asks for the size given (open("/dev/zero", "rb",
    # buffering=0).read(1 << 20) is 1 MiB); ours asked for at most 64 KiB.
    # (The size asked is checked, not the size got: a read of /dev/zero
    # stops short when the CPU is wanted elsewhere, io's too.)
    async with threadlets.open("/dev/zero", "rb", buffering=buffering) as f:
        asked: list[int] = []
        try_read = f._try_read

        def spy(n: int) -> Any:
            asked.append(n)
            return try_read(n)

        f._try_read = spy  # type: ignore[method-assign]
        if call == "readinto":
            buf = bytearray(1 << 20)
            got = bytes(buf[: await f.readinto(buf)])
        else:
            got = await getattr(f, call)(1 << 20)
    assert asked[0] == 1 << 20
    assert 0 < len(got) <= 1 << 20
    assert got == bytes(len(got))


# -- a terminal's text is line-buffered by default, as io's ---------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("buffering", [-1, 1, 5])
async def test_a_terminals_text_is_line_buffered_by_default_as_ios(
    backend: str, buffering: int
) -> None:
    # io.open of a terminal in text mode with the default buffering is
    # line-buffered (line_buffering True); ours said False.
    import pty

    master, slave = pty.openpty()
    try:
        name = os.ttyname(slave)
        with open(name, "w", buffering=buffering) as r:
            expect = (r.line_buffering, r.write_through)
        async with threadlets.open(name, "w", buffering=buffering) as f:
            got = (f.line_buffering, f.write_through)
            assert await f.write("hi\n") == 3
        assert got == expect
        assert os.read(master, 100) == b"hi\r\n"
    finally:
        os.close(master)
        os.close(slave)


# -- a binary file's mode is its FileIO's, as io's ------------------------------------------------

_MODES = ["rb", "r+b", "w+b", "wb", "ab", "a+b", "xb", "x+b", "br", "+rb", "b+a", "r", "w+", "rt"]


@pytest.mark.anyio
@pytest.mark.parametrize("buffering", [0, -1])
async def test_the_mode_attribute_is_ios(tmp_path: Path, backend: str, buffering: int) -> None:
    # io: a binary file's mode is its FileIO's ("r+b" reads "rb+"); ours
    # echoed the argument.
    for mode in _MODES:
        if buffering == 0 and "b" not in mode:
            continue  # (no unbuffered text)
        ref, p = tmp_path / "ref", tmp_path / "ours"
        for q in (ref, p):
            q.unlink(missing_ok=True)
            if "x" not in mode:
                q.write_bytes(b"abc")
        with open(ref, mode, buffering=buffering) as r:
            expect = r.mode
        async with threadlets.open(p, mode, buffering=buffering) as f:
            assert (mode, f.mode) == (mode, expect)


# -- the aiofiles drop-in closes its files even when the closer is cancelled -----------------------


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["async-with", "close", "tempfile"])
async def test_an_aiofiles_file_left_in_a_cancelled_scope_is_closed(
    tmp_path: Path, backend: str, how: str
) -> None:
    # `async with aiofiles.open(...)` whose body's scope was cancelled (a
    # timeout): the exit's close was refused at once on trio (the scope is
    # still cancelled), so the file stayed open and what it buffered
    # unwritten until the garbage collector came; so did a close() awaited
    # in a cancelled scope.  threadlets.open's files close anyway, as these
    # now do.
    from threadlets import aiofiles

    p = tmp_path / "f"
    held: list[Any] = []
    with anyio.CancelScope() as scope:
        if how == "async-with":
            async with aiofiles.open(p, "w") as f:
                held.append(f)
                await f.write("hello")
                scope.cancel()
                await anyio.lowlevel.checkpoint()
        elif how == "tempfile":
            async with aiofiles.tempfile.TemporaryFile("w+") as f:
                held.append(f)
                await f.write("hello")
                scope.cancel()
                await anyio.lowlevel.checkpoint()
        else:
            f = await aiofiles.open(p, "w")
            held.append(f)
            await f.write("hello")
            scope.cancel()
            await f.close()
    assert scope.cancelled_caught
    assert held[0].closed
    if how != "tempfile":
        assert p.read_text() == "hello"


# -- open(fd, "a") starts at the end, as FileIO seeks it there -------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "encoding"), [("a", "utf-16"), ("a", "utf-8-sig"), ("a+", "utf-32"), ("ab", None)]
)
async def test_a_descriptor_opened_for_appending_starts_at_the_end_as_io(
    tmp_path: Path, backend: str, mode: str, encoding: str | None
) -> None:
    # open(fd, "a") of a descriptor at offset 0 of a file that has text:
    # FileIO seeks to the end, so the text layer knows it is not at the
    # start and writes no BOM; ours started at 0 and wrote a BOM mid-file
    # (and tell() counted it).
    body = "hello\n".encode(encoding or "ascii")

    def descriptor(name: str) -> int:
        p = tmp_path / name
        p.write_bytes(body)
        return os.open(p, os.O_RDWR | os.O_APPEND)

    data: Any = b"Z" if encoding is None else "Z"
    ref, ours = descriptor("ref"), descriptor("ours")
    with open(ref, mode, encoding=encoding) as r:
        expect = [r.tell(), r.write(data), r.tell()]
    async with threadlets.open(ours, mode, encoding=encoding) as f:
        got = [await f.tell(), await f.write(data), await f.tell()]
    assert got == expect
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "ref").read_bytes()
