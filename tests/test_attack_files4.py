"""An outside attacker's regressions for the async file objects (fourth
round): cancellations landing at a chosen await of the text layer, with
``io.open`` as the oracle -- a cancelled call happened whole or not at all,
so what comes after it gives what io gives without it.  Each test named for
a defect failed on the code before its fix."""

from __future__ import annotations

import ast
import asyncio
import codecs
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import threadlets
import threadlets.awaitable as aw

from .test_asyncfile import anyio_backend, backend
from .test_attack_files3 import _calls, _replay_io, aoutcome

__all__ = ["anyio_backend", "backend"]  # fixtures used by name

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture
def no_inline(backend: str) -> Iterator[str]:
    """Every read is a request (none finishes inline): each is an await."""
    aw.configure(inline=False, backend=backend)
    try:
        yield backend
    finally:
        aw.configure()


class CancelAt:
    """Cancel the calling task at the ``n``-th request awaited through ``f``
    (1-based), right after that request finished: the cancellation the
    engine delivers to a call cancelled while its request ran.  Use as
    ``with CancelAt(f, n) as cut: await call()``; ``cut.hit`` says whether
    it landed."""

    def __init__(self, f: Any, n: int = 1) -> None:
        self._f, self._n = f, n
        self.hit = False
        self.count = 0  # requests awaited meanwhile
        self._scope = anyio.CancelScope()

    def __enter__(self) -> CancelAt:
        io_ = self._f._io
        orig = io_._wait
        self._orig = orig

        async def wait(req: Any, detach: bool = False) -> None:
            await orig(req, detach)
            self.count += 1
            if self.count == self._n and not self.hit:
                self.hit = True
                self._scope.cancel()
                await anyio.lowlevel.checkpoint()

        io_._wait = wait
        self._scope.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._f._io._wait = self._orig
        return bool(self._scope.__exit__(*exc))

    @property
    def cancelled(self) -> bool:
        """Whether the call saw the cancellation (it may have finished first)."""
        return bool(self._scope.cancelled_caught)


LINES = "".join(f"line {i:05}\n" for i in range(2000))  # 22000 bytes


# -- T1: a cancelled text read left the buffer past what it decoded ---------------------------


@pytest.mark.parametrize("call", ["readline", "read", "next", "readlines"])
async def test_a_write_after_a_cancelled_text_read_lands_where_ios_does(
    tmp_path: Path, no_inline: str, call: str
) -> None:
    # A read that needs two requests (a line of 90 KB: more than the 64 KiB
    # read-ahead), cancelled at the second: the text it decoded from the
    # first went back as read-ahead, but the binary stream stayed past it,
    # so a write (or truncate) then landed 64 KiB on, where io -- without
    # the read -- writes at the start.
    ref, p = tmp_path / "ref", tmp_path / "ours"
    for q in (ref, p):
        q.write_text("日" * 30000 + "\n" + LINES, encoding="utf-8")
    with open(ref, "r+", encoding="utf-8") as r:
        r.write("XYZ")
        expect_tell = r.tell()
        expect_line = r.readline()
    async with threadlets.open(p, "r+", encoding="utf-8") as f:
        with CancelAt(f, 2) as cut:
            if call == "readline":
                await f.readline()
            elif call == "read":
                await f.read(30000)
            elif call == "readlines":
                await f.readlines()
            else:
                await f.__anext__()
        assert cut.hit
        assert await f.write("XYZ") == 3
        assert await f.tell() == expect_tell
        assert await f.readline() == expect_line
    assert p.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("newline", [None, "", "\r\n"])
async def test_a_cancelled_text_read_leaves_tell_and_the_next_write_as_io(
    tmp_path: Path, no_inline: str, newline: str | None
) -> None:
    ref, p = tmp_path / "ref", tmp_path / "ours"
    data = ("x" * 40000 + "\n" + LINES).replace("\n", "\r\n").encode("utf-16")
    for q in (ref, p):
        q.write_bytes(data)
    with open(ref, "r+", encoding="utf-16", newline=newline) as r:
        first = r.read(3)
        expect_tell = r.tell()
        r.write("Q")
    async with threadlets.open(p, "r+", encoding="utf-16", newline=newline) as f:
        assert await f.read(3) == first
        with CancelAt(f) as cut:
            await f.readline()  # (80 KB: it needs the next 64 KiB)
        assert cut.hit
        assert await f.tell() == expect_tell
        await f.write("Q")
    assert p.read_bytes() == ref.read_bytes()


# -- T2: a cancelled text seek left the position at neither end -------------------------------


async def test_a_cancelled_text_seek_to_a_cookie_stays_where_it_was(
    tmp_path: Path, no_inline: str
) -> None:
    # utf-7 keeps bits in its decoder: the cookie replays bytes, a request.
    # Cancelled there, the position was the replay's start (here 0): neither
    # where the file was (its end) nor the cookie.
    text = "日本語abc" * 2000
    ref, p = tmp_path / "ref", tmp_path / "ours"
    for q in (ref, p):
        q.write_bytes(text.encode("utf-7"))
    with open(ref, "r+", encoding="utf-7") as r:
        r.read(2)
        cookie = r.tell()
        end = r.seek(0, os.SEEK_END)
        r.write("Z")
    async with threadlets.open(p, "r+", encoding="utf-7") as f:
        assert await f.read(2) == "日本"
        assert await f.tell() == cookie
        assert await f.seek(0, os.SEEK_END) == end
        await f.pwrite(b"+", 0)  # (drops the read-ahead; the same byte)
        with CancelAt(f) as cut:
            await f.seek(cookie)
        assert cut.hit
        assert await f.tell() == end
        await f.write("Z")
        # And done again, uncancelled, it goes there.
        assert await f.seek(cookie) == cookie
        assert await f.read(1) == "語"
    assert p.read_bytes() == ref.read_bytes()


async def test_a_cancelled_text_seek_to_the_end_stays_where_it_was(
    tmp_path: Path, no_inline: str
) -> None:
    ref, p = tmp_path / "ref", tmp_path / "ours"
    for q in (ref, p):
        q.write_text(LINES, encoding="utf-8")
    with open(ref, "r+", encoding="utf-8") as r:
        first = r.readline()
        expect_tell = r.tell()
        expect_next = r.readline()
    async with threadlets.open(p, "r+", encoding="utf-8") as f:
        assert await f.readline() == first
        with CancelAt(f) as cut:
            await f.seek(0, os.SEEK_END)  # (its size is a request)
        assert cut.hit
        assert await f.tell() == expect_tell
        assert await f.readline() == expect_next


async def test_a_cancelled_text_seek_leaves_tell_disabled_as_it_was(
    tmp_path: Path, no_inline: str
) -> None:
    # An iteration that failed part-way leaves tell() disabled (as io's);
    # a seek re-enables it by its flush, but one cancelled after that flush
    # did not happen: tell() must still refuse, as io's does without it.
    ref, p = tmp_path / "ref", tmp_path / "ours"
    for q in (ref, p):
        q.write_bytes(b"\xff\xfe\x00")  # (utf-16, truncated)
    with open(ref, encoding="utf-16") as r:
        with pytest.raises(UnicodeDecodeError):
            next(r)
        with pytest.raises(OSError) as expect:
            r.tell()
    async with threadlets.open(p, encoding="utf-16") as f:
        with pytest.raises(UnicodeDecodeError):
            await f.__anext__()
        with CancelAt(f) as cut:
            await f.seek(0, os.SEEK_END)  # (its size is a request)
        assert cut.hit
        with pytest.raises(OSError) as info:
            await f.tell()
        assert str(info.value) == str(expect.value)


# -- T3: a text write cancelled once it ran kept the text decoded before it -------------------


async def test_a_text_write_cancelled_once_it_ran_drops_the_decoded_text(
    tmp_path: Path, no_inline: str
) -> None:
    # A write larger than the buffer is a request of its own.  Cancelled
    # once it ran, it happened (the README): what follows must be what
    # follows a write in io, which drops the text it had decoded ahead.
    big = "W" * (80 * 1024)
    ref, p = tmp_path / "ref", tmp_path / "ours"
    for q in (ref, p):
        q.write_text(LINES * 8, encoding="utf-8")
    with open(ref, "r+", encoding="utf-8") as r:
        first = r.read(3)
        r.write(big)
        r.seek(0, os.SEEK_CUR)  # (io's BufferedRandom quirk: see test_attack_files3)
        expect_tell = r.tell()
        expect_next = r.readline()
    async with threadlets.open(p, "r+", encoding="utf-8") as f:
        assert await f.read(3) == first
        with CancelAt(f) as cut:
            await f.write(big)
        assert cut.hit
        assert await f.tell() == expect_tell
        assert await f.readline() == expect_next
    assert p.read_bytes() == ref.read_bytes()


# -- T4: encoding="locale" ----------------------------------------------------------------------


async def test_encoding_locale_is_taken_as_io_takes_it(tmp_path: Path) -> None:
    # io.open takes encoding="locale" (3.10+): the locale's encoding.  It
    # was looked up as a codec's name: LookupError.
    ref, p = tmp_path / "ref", tmp_path / "ours"
    with open(ref, "w", encoding="locale") as r:
        r.write("é\n")
        expect = r.encoding
    async with threadlets.open(p, "w", encoding="locale") as f:
        assert f.encoding == expect
        await f.write("é\n")
    assert p.read_bytes() == ref.read_bytes()
    f = threadlets.wrap(os.open(p, os.O_RDONLY), "r", encoding="locale")
    try:
        assert await f.read() == "é\n"
    finally:
        await f.close()


# -- T5: an opener that returns no integer ------------------------------------------------------


@pytest.mark.parametrize("got", ["3", 3.0, None])
async def test_an_opener_returning_no_integer_is_a_type_error_as_io(
    tmp_path: Path, got: object
) -> None:
    p = tmp_path / "o"
    p.write_bytes(b"")
    with pytest.raises(TypeError) as expect:
        open(p, "rb", opener=lambda path, flags: got)  # type: ignore[arg-type,return-value]  # noqa: SIM115
    with pytest.raises(TypeError) as info:
        await threadlets.open(p, "rb", opener=lambda path, flags: got)  # type: ignore[arg-type,return-value]
    assert str(info.value) == str(expect.value)


# -- T6: wrap() of a text file part-read ------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "first"), [("utf-16", 1), ("utf-32", 1), ("utf-7", 1), ("utf-8-sig", 1)]
)
async def test_wrap_of_a_part_read_text_file_goes_on_from_its_cookie(
    tmp_path: Path, backend: str, encoding: str, first: int
) -> None:
    # A text file's tell() is a cookie: a fresh decoder at its byte
    # position misread the rest (utf-16/32 past the BOM: UnicodeError), and
    # a cookie with characters to skip was taken as a byte offset.
    p = tmp_path / "t"
    p.write_text("日本語 line one\nline two\n語 three\n", encoding=encoding)
    with open(p, encoding=encoding) as r:
        for _ in range(first):
            r.read(2) if encoding == "utf-7" else r.readline()
        expect = [r.tell(), r.readline(), r.read()]
    g = open(p, encoding=encoding)  # noqa: SIM115 (the AsyncFile closes it)
    for _ in range(first):
        g.read(2) if encoding == "utf-7" else g.readline()
    f = threadlets.wrap(g)
    try:
        assert [await f.tell(), await f.readline(), await f.read()] == expect
    finally:
        await f.close()
    assert g.closed


# -- T7: seek and tell of a character device ----------------------------------------------------


_DEV_CALLS: list[tuple[Any, ...]] = [
    ("read", 10),
    ("tell",),
    ("seek", 5),
    ("tell",),
    ("read", 3),
    ("seek", 7, os.SEEK_CUR),
    ("tell",),
    ("seek", 0, os.SEEK_END),
    ("tell",),
    ("write", b"abc"),
    ("tell",),
]


@pytest.mark.parametrize("dev", ["/dev/zero", "/dev/null"])
async def test_seek_and_tell_of_a_character_device_are_the_devices_as_io(
    backend: str, dev: str
) -> None:
    # A character device reads and writes at the descriptor's offset, and
    # its lseek says where that is (/dev/zero's and /dev/null's: always 0).
    # seek only moved a position of the file object's own (tell() said 5
    # where io says 0): on a device whose offset matters, the next read
    # was not where the seek said.  (io's buffered answers here are its
    # own arithmetic -- a negative tell() -- so the oracle is FileIO, and
    # a buffered file answers as lseek does.)
    def answer(fn: Any) -> Any:
        try:
            got = fn()
        except Exception as e:
            return type(e)
        return len(got) if isinstance(got, bytes) else got

    async def aanswer(fn: Any) -> Any:
        try:
            got = await fn()
        except Exception as e:
            return type(e)
        return len(got) if isinstance(got, bytes) else got

    with open(dev, "r+b", buffering=0) as r:
        expect = [answer(lambda c=c: getattr(r, c[0])(*c[1:])) for c in _DEV_CALLS]
    for buffering in (0, -1):
        got = []
        async with threadlets.open(dev, "r+b", buffering=buffering) as f:
            for c in _DEV_CALLS:
                got.append(await aanswer(lambda c=c: getattr(f, c[0])(*c[1:])))
        assert got == expect, buffering


async def test_a_raw_seek_of_an_unseekable_device_is_lseeks_as_fileio(backend: str) -> None:
    # FileIO's seek is lseek's, whatever seekable() says: /dev/kmsg takes
    # SEEK_END (skip the log so far) though not SEEK_CUR.  It was ESPIPE.
    try:
        r = open("/dev/kmsg", "rb", buffering=0)  # noqa: SIM115
    except OSError:
        pytest.skip("no readable /dev/kmsg")
    with r:
        expect = [r.seekable(), r.seek(0, os.SEEK_END)]
    async with threadlets.open("/dev/kmsg", "rb", buffering=0) as f:
        assert [f.seekable(), await f.seek(0, os.SEEK_END)] == expect


# -- T8: reconfigure(), newlines, line_buffering, write_through ----------------------------------

_RECONF: list[tuple[str, list[tuple[Any, ...]]]] = [
    (
        "w+",
        [
            ("write", "a\n"),
            ("reconfigure", {"encoding": "utf-16"}),
            ("write", "b\n"),
            ("seek", 0),
            ("reconfigure", {"encoding": "utf-8", "errors": "replace"}),
            ("read",),
            ("attrs",),
        ],
    ),
    ("r", [("read", 1), ("reconfigure", {"encoding": "latin-1"}), ("attrs",)]),
    ("r", [("read", 1), ("reconfigure", {"line_buffering": True}), ("attrs",)]),
    ("r", [("reconfigure", {"newline": ""}), ("readline",), ("readline",), ("attrs",)]),
    ("r", [("readline",), ("readline",), ("readline",), ("attrs",)]),
    ("r", [("reconfigure", {"newline": 5})]),
    ("r", [("reconfigure", {"newline": "x"})]),
    ("r", [("reconfigure", {"encoding": "hex"})]),
    ("r", [("reconfigure", {"encoding": "locale"}), ("read",), ("attrs",)]),
    ("r+", [("reconfigure", {"newline": "\r\n"}), ("seek", 0, 2), ("write", "z\n"), ("attrs",)]),
    ("w", [("reconfigure", {"line_buffering": True}), ("write", "x\n"), ("disk",), ("attrs",)]),
    ("w", [("reconfigure", {"write_through": 1}), ("attrs",)]),
    ("r+", [("reconfigure", {"encoding": "utf-16"}), ("write", "é"), ("attrs",)]),
]


@pytest.mark.parametrize(("mode", "calls"), _RECONF)
async def test_reconfigure_and_the_text_attributes_answer_as_io(
    tmp_path: Path, mode: str, calls: list[tuple[Any, ...]]
) -> None:
    # io's text files have reconfigure() and newlines, line_buffering,
    # write_through: an AsyncFile had none (AttributeError).
    ref, p = tmp_path / "ref", tmp_path / "ours"
    for q in (ref, p):
        q.write_bytes(b"one\r\ntwo\nthree\rfour")

    def attrs(f: Any) -> Any:
        return (f.encoding, f.errors, f.newlines, f.line_buffering, f.write_through)

    expect: list[Any] = []
    with open(ref, mode, encoding="utf-8") as r:
        for name, *args in calls:
            try:
                if name == "attrs":
                    expect.append(attrs(r))
                elif name == "disk":
                    expect.append(ref.read_bytes())
                elif name == "reconfigure":
                    expect.append(r.reconfigure(**args[0]))
                else:
                    expect.append(getattr(r, name)(*args))
            except Exception as e:
                expect.append(type(e))
    got: list[Any] = []
    async with threadlets.open(p, mode, encoding="utf-8") as f:
        for name, *args in calls:
            try:
                if name == "attrs":
                    got.append(attrs(f))
                elif name == "disk":
                    got.append(p.read_bytes())
                elif name == "reconfigure":
                    got.append(await f.reconfigure(**args[0]))
                else:
                    got.append(await getattr(f, name)(*args))
            except Exception as e:
                got.append(type(e))
    assert got == expect
    assert p.read_bytes() == ref.read_bytes()


async def test_a_binary_file_has_no_text_attributes_as_io(tmp_path: Path) -> None:
    p = tmp_path / "b"
    async with threadlets.open(p, "wb") as f:
        for name in ("reconfigure", "newlines", "line_buffering", "write_through"):
            assert not hasattr(f, name)


# -- the differential, with a cancellation at each request in turn ------------------------------
#
# test_attack_files3's random call sequences, replayed with the n-th request
# cancelled once it ran (n = 1, 2, ... until a replay sees no n-th): the
# cancelled call must have happened whole or not at all, so the results of
# the other calls and the bytes left are io's for the sequence with or
# without it.  (A seek that only steers around io's read-after-write quirk
# is not cut: io itself is wrong without it.  No ISO-2022 codec here: io's
# own TextIOWrapper crashes the interpreter on them -- see T10.)


def _io_results(
    path: Path, initial: bytes | None, mode: str, kwargs: dict[str, Any], calls: Any, append: bool
) -> tuple[list[Any], bytes]:
    path.unlink(missing_ok=True)
    if initial is not None:
        path.write_bytes(initial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with open(path, mode, **kwargs) as r:
            out = _replay_io(r, calls, append)
    return out, path.read_bytes()


async def _replay_cut(f: Any, calls: Any, append: bool, n: int) -> tuple[list[Any], int | None]:
    out: list[Any] = []
    cookies = [0]
    cut = None

    async def anext_or_eof() -> Any:
        try:
            return await f.__anext__()
        except StopAsyncIteration:
            return "EOF"

    for i, (name, *raw) in enumerate(calls):
        args = [cookies[-1]] if raw[:1] == ["cookie"] else raw
        with CancelAt(f, n) as c:
            if name == "next":
                res = await aoutcome(anext_or_eof)
            else:
                res = await aoutcome(lambda n=name, a=args: getattr(f, n)(*a))  # type: ignore[misc]
                if name == "tell":
                    if res[0] == "ok":
                        cookies.append(res[1])
                    if append:
                        res = ("unknown", None)
        if c.hit:
            if c.cancelled:
                cut, res = i, ("cancelled",)
            n = 0  # (it finished before the cancellation came: no cut)
        else:
            n -= c.count
        out.append(res)
    return out, cut


def _cancel_differential(
    tmp_path: Path, mode: str, kwargs: dict[str, Any], initial: bytes | None, calls: Any
) -> None:
    append = mode.startswith("a")
    p = tmp_path / "ours"
    for n in range(1, 40):
        p.unlink(missing_ok=True)
        if initial is not None:
            p.write_bytes(initial)

        async def main() -> tuple[list[Any], int | None]:
            async with threadlets.open(p, mode, **kwargs) as f:
                return await _replay_cut(f, calls, append, n)  # noqa: B023

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got, k = asyncio.run(main())
        if k is None:
            return
        if k and calls[k - 1][0] == "write" and calls[k][0] == "seek":
            continue
        candidates = []
        for variant in (calls[:k] + calls[k + 1 :], calls):
            expect, data = _io_results(tmp_path / "ref", initial, mode, kwargs, variant, append)
            if _unsteered(variant, expect):
                return
            if variant is calls:
                expect = [*expect[:k], ("cancelled",), *expect[k + 1 :]]
            else:
                expect = [*expect[:k], ("cancelled",), *expect[k:]]
            candidates.append((expect, data))
        assert (got, p.read_bytes()) in candidates, (n, k, calls[k], got)


def _unsteered(calls: Any, results: list[Any]) -> bool:
    """Whether a seek that steers around io's read-after-write quirk failed
    in io (tell() disabled by an iteration): io's answers after it are its
    quirk's, not an oracle."""
    if any(
        name == "write" and nxt[0] == "seek" and res[0] == "raised"
        for (name, *_), nxt, res in zip(calls, calls[1:], results[1:], strict=False)
    ):
        return True
    # After an iteration io disables tell(): where the buffer stands then is
    # how far it read ahead, which is not a promise (a cancelled read's
    # bytes, served again from the read-ahead, make one read1 shorter than
    # io's).  A truncate() to "the position" or a write before the next seek
    # lands there.
    iterated = False
    for name, *args in calls:
        if name == "next":
            iterated = True
        elif name == "seek":
            iterated = False
        elif iterated and (name == "write" or (name == "truncate" and args[:1] in ([], [None]))):
            return True
    return False


_CUT_PIECES = ["a", "\n", "\r\n", "é", "日本", "xyz"]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_calls_cancelled_at_any_request_happen_whole_or_not_at_all(
    tmp_path: Path, no_inline: str, data: st.DataObject
) -> None:
    text = data.draw(st.booleans())
    mode = data.draw(st.sampled_from(["r", "w", "a"])) + data.draw(st.sampled_from(["+", ""]))
    if text:
        encoding = data.draw(st.sampled_from(["utf-8", "utf-16", "gb18030", "utf-7"]))
        kwargs: dict[str, Any] = {
            "encoding": encoding,
            "newline": data.draw(st.sampled_from([None, "", "\r\n"])),
            "buffering": data.draw(st.sampled_from([-1, 1, 5, 64])),
        }
        pieces = data.draw(st.lists(st.sampled_from(_CUT_PIECES), max_size=10))
        initial = "".join(pieces).encode(encoding, "replace")
    else:
        mode += "b"
        kwargs = {"buffering": data.draw(st.sampled_from([-1, 0, 2, 5, 64]))}
        initial = data.draw(st.binary(max_size=20))
    calls = data.draw(_calls(text=text, append=mode.startswith("a")))
    _cancel_differential(tmp_path, mode, kwargs, initial, calls)


# -- T9: open(fd) that fails closes fd where io's does --------------------------------------------

_OPEN_FD_CASES: list[dict[str, Any]] = [
    {"mode": "w", "encoding": "hex"},
    {"mode": "w", "encoding": "no-such-codec"},
    {"mode": "r", "newline": "x"},
    {"mode": "r", "buffering": 0},
    {"mode": "r", "newline": 5},
    {"mode": "rb", "encoding": "utf-8"},
    {"mode": "rb", "encoding": 5},
    {"mode": "rz"},
    {"mode": "r", "buffering": "x"},
    {"mode": "r", "errors": 5},
    {"mode": "r", "encoding": "utf-8\0"},
    {"mode": "r", "opener": 5},
    {"mode": "w", "encoding": "hex", "closefd": False},
]


@pytest.mark.parametrize("kwargs", _OPEN_FD_CASES)
async def test_an_open_of_a_descriptor_that_fails_closes_it_where_io_does(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    # io.open(fd) owns fd once its FileIO is made: what fails after that
    # (the codec, the newline value, unbuffered text) closes it.  Ours left
    # it open (a leak for a caller that trusts io's rule).
    p = tmp_path / "f"
    p.write_bytes(b"x")

    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True

    def answer(call: Any) -> tuple[Any, str, bool]:
        fd = os.open(p, os.O_RDWR)
        try:
            f = call(fd)
        except Exception as e:
            got: tuple[Any, str] = (type(e), str(e))
        else:
            got = ("ok", "")
            f.close()
        alive = is_open(fd)
        if alive:
            os.close(fd)
        return (*got, alive)

    expect = answer(lambda fd: open(fd, **kwargs))  # noqa: SIM115
    fd = os.open(p, os.O_RDWR)
    try:
        f = await threadlets.open(fd, **kwargs)
    except Exception as e:
        got: tuple[Any, str] = (type(e), str(e))
    else:
        got = ("ok", "")
        await f.close()
    alive = is_open(fd)
    if alive:
        os.close(fd)
    assert (*got, alive) == expect


# -- T10: an ISO-2022 decoder set to state 0 crashed the interpreter ------------------------------


_ISO2022_CRASH = """
import asyncio, sys
import threadlets
import threadlets.awaitable as aw

aw.configure(backend=sys.argv[2])

async def main():
    async with threadlets.open(sys.argv[1], "r+", encoding=sys.argv[3]) as f:
        await f.write("b")
        print(await f.seek(0, 1))  # (a plain position: the cookie's state is 0)
        print(repr(await f.readline()))

asyncio.run(main())
"""


@pytest.mark.parametrize("encoding", ["iso-2022-jp", "iso2022_jp_2", "iso-2022-kr"])
def test_a_seek_after_a_write_in_iso_2022_does_not_crash_the_interpreter(
    tmp_path: Path, backend: str, encoding: str
) -> None:
    # tell() after a write is a plain position (decoder state 0); seek()
    # set the decoder to it, and CPython's ISO-2022 decoders, whose state 0
    # is no state at all, then call a NULL pointer at the next decode: a
    # segmentation fault (io.open's TextIOWrapper does it too).  Run in a
    # child, so that the crash is a failure, not the end of the test run.
    p = tmp_path / "j"
    ku = "日".encode(encoding)
    p.write_bytes(ku * 2)
    child = subprocess.run(
        [sys.executable, "-c", _ISO2022_CRASH, str(p), backend, encoding],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    pos, line = child.stdout.split("\n")[:2]
    assert pos == "1"
    # Read on from byte 1 as from a fresh decoder: what the bytes say there.
    tail = p.read_bytes()[1:]
    assert ast.literal_eval(line) == codecs.getincrementaldecoder(encoding)().decode(tail, True)


# -- T11: read1() with no size reads at most the buffer's size -----------------------------------


@pytest.mark.parametrize("buffering", [3, 100, 5000])
@pytest.mark.parametrize("kind", ["file", "pipe"])
async def test_read1_of_no_size_is_at_most_the_buffer_as_io(
    tmp_path: Path, backend: str, buffering: int, kind: str
) -> None:
    # io's read1(-1) is at most the buffer's size; it read 64 KiB whatever
    # buffering said.
    data = bytes(range(256)) * 40

    def source() -> Any:
        if kind == "file":
            p = tmp_path / "f"
            p.write_bytes(data)
            return p
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        return r

    with open(source(), "rb", buffering=buffering) as r:
        expect = [r.read1(), r.read1(-1), r.read()]
    async with threadlets.open(source(), "rb", buffering=buffering) as f:
        assert [await f.read1(), await f.read1(-1), await f.read()] == expect
