"""AsyncTextWrapper is io.TextIOWrapper: same results, same exceptions, same bytes.

Each check runs one sequence of calls on ``io.TextIOWrapper`` over a
``BytesIO`` and on ``AsyncTextWrapper`` over ``_AsyncBytes`` holding the
same bytes, and compares every outcome.  Both buffers answer ``read1`` with
at most the sizes of one shared schedule, so chunk boundaries (where a
strict decoder raises, where a '\\r' waits for its '\\n') fall at the same
places on both sides.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import itertools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadlets.textio import AsyncTextWrapper


class _Limits:
    """Caps successive read1 sizes by a cycled schedule (None: no cap)."""

    def __init__(self, limits: Sequence[int] | None) -> None:
        self._next = itertools.cycle(limits).__next__ if limits else None

    def cap(self, size: int) -> int:
        if self._next is None:
            return size
        n = self._next()
        return n if size < 0 else min(size, n)


class _LimitedBytesIO(io.BytesIO):
    def __init__(self, data: bytes, limits: Sequence[int] | None = None) -> None:
        super().__init__(data)
        self._limits = _Limits(limits)

    def read1(self, size: int | None = -1) -> bytes:
        return super().read1(self._limits.cap(-1 if size is None else size))


class _AsyncBytes:
    """An AsyncBinaryBuffer over io.BytesIO whose read1 follows a schedule."""

    def __init__(
        self,
        data: bytes = b"",
        limits: Sequence[int] | None = None,
        *,
        readable: bool = True,
        writable: bool = True,
        seekable: bool = True,
    ) -> None:
        self.raw = io.BytesIO(data)
        self._limits = _Limits(limits)
        self._readable, self._writable, self._seekable = readable, writable, seekable

    async def read1(self, size: int = -1) -> bytes:
        return self.raw.read1(self._limits.cap(size))

    async def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    async def write(self, data: bytes) -> int:
        return self.raw.write(data)

    async def seek(self, pos: int, whence: int = 0) -> int:
        return self.raw.seek(pos, whence)

    async def tell(self) -> int:
        return self.raw.tell()

    async def flush(self) -> None:
        self.raw.flush()

    async def truncate(self, pos: int | None = None) -> int:
        return self.raw.truncate(pos)

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return self._seekable


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


# -- the differential harness -------------------------------------------------------------

Op = tuple[str, Any]
Outcome = tuple[Any, ...]


def _outcome(call: Callable[[], Any]) -> Outcome:
    try:
        return ("ok", call())
    except StopIteration:
        return ("stop",)
    except Exception as e:
        return ("err", type(e), str(e))


async def _aoutcome(call: Callable[[], Coroutine[Any, Any, Any]]) -> Outcome:
    try:
        return ("ok", await call())
    except StopAsyncIteration:
        return ("stop",)
    except Exception as e:
        return ("err", type(e), str(e))


def _cookie(cookies: list[int], i: int) -> int:
    """The i-th cookie told so far (cycled), or 0."""
    return cookies[i % len(cookies)] if cookies else 0


def _sync_side(
    data: bytes, kwargs: dict[str, Any], ops: Sequence[Op], limits: Any, at_end: bool
) -> tuple[list[Outcome], bytes]:
    raw = _LimitedBytesIO(data, limits)
    if at_end:
        raw.seek(0, 2)
    w = io.TextIOWrapper(raw, **kwargs)
    cookies: list[int] = []
    out = []
    for name, op_arg in ops:
        arg = _cookie(cookies, op_arg) if name == "seek" else op_arg
        call: Callable[[], Any] = {
            "read": lambda a=arg: w.read(a),
            "readline": lambda a=arg: w.readline(a),
            "readlines": lambda a=arg: w.readlines(a),
            "next": lambda: next(w),
            "tell": w.tell,
            "seek": lambda a=arg: w.seek(a),
            "seek_end": lambda: w.seek(0, 2),
            "seek_cur": lambda: w.seek(0, 1),
            "write": lambda a=arg: w.write(a),
            "truncate": lambda a=arg: w.truncate(a),
            "flush": w.flush,
            "newlines": lambda: w.newlines,
        }[name]
        out.append(_outcome(call))
        if name == "tell" and out[-1][0] == "ok":
            cookies.append(out[-1][1])
    w.flush()
    return out, raw.getvalue()


async def _async_side(
    data: bytes, kwargs: dict[str, Any], ops: Sequence[Op], limits: Any, at_end: bool
) -> tuple[list[Outcome], bytes]:
    raw = _AsyncBytes(data, limits)
    if at_end:
        raw.raw.seek(0, 2)
    w = AsyncTextWrapper(raw, **kwargs)
    cookies: list[int] = []
    out = []

    async def newlines() -> Any:
        return w.newlines

    for name, op_arg in ops:
        arg = _cookie(cookies, op_arg) if name == "seek" else op_arg
        call: Callable[[], Coroutine[Any, Any, Any]] = {
            "read": lambda a=arg: w.read(a),
            "readline": lambda a=arg: w.readline(a),
            "readlines": lambda a=arg: w.readlines(a),
            "next": w.__anext__,
            "tell": w.tell,
            "seek": lambda a=arg: w.seek(a),
            "seek_end": lambda: w.seek(0, 2),
            "seek_cur": lambda: w.seek(0, 1),
            "write": lambda a=arg: w.write(a),
            "truncate": lambda a=arg: w.truncate(a),
            "flush": w.flush,
            "newlines": newlines,
        }[name]
        out.append(await _aoutcome(call))
        if name == "tell" and out[-1][0] == "ok":
            cookies.append(out[-1][1])
    await w.flush()
    return out, raw.raw.getvalue()


def _defined(ops: Sequence[Op]) -> list[Op]:
    """ops without the tell() calls whose answer io leaves undefined.

    io takes no snapshot while iterating, so a tell() after an iteration
    stopped early (and a flush) decodes a stale snapshot: it raises or
    answers garbage (C reads past the end of a bytes object).  Such a
    snapshot lasts at least until a seek.  (While iterating, tell() raises
    on both sides.)
    """
    kept: list[Op] = []
    iterating = stale = False
    for name, arg in ops:
        if name in ("next", "readlines"):
            iterating = True
        elif name in ("flush", "truncate"):
            stale, iterating = stale or iterating, False
        elif name in ("seek", "seek_end"):
            stale = iterating = False
        elif stale and name in ("tell", "seek_cur"):
            continue
        kept.append((name, arg))
    return kept


def check_same(
    data: bytes,
    ops: Sequence[Op],
    limits: Sequence[int] | None = None,
    at_end: bool = False,
    **kwargs: Any,
) -> list[Outcome]:
    """Run ops on both sides; assert identical outcomes and bytes; return them."""
    ops = _defined(ops)
    expected = _sync_side(data, kwargs, ops, limits, at_end)
    got = _run(_async_side(data, kwargs, ops, limits, at_end))
    for op, want, have in zip(ops, expected[0], got[0], strict=True):
        assert have == want, f"{op}: {have!r} != {want!r} (all: {got[0]!r})"
    assert got[1] == expected[1]
    return got[0]


# -- the differential property ------------------------------------------------------------

_ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252"]
_BOMS = [b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE]
_BAD = [b"\xff", b"\x80", b"\xc3", b"\x81", b"\xed\xa0\x80", b"\x00", b"\xd8"]
_CHARS = list("ab\r\n é€\U0001d11e")


def _body(text: str, encoding: str) -> bytes:
    """text in the encoding, without a BOM."""
    if encoding in ("utf-16", "utf-32"):
        return text.encode(encoding)[2 if encoding == "utf-16" else 4 :]
    return text.encode("utf-8" if encoding == "utf-8-sig" else encoding, "ignore")


@st.composite
def _files(draw: st.DrawFn) -> tuple[str, bytes]:
    encoding = draw(st.sampled_from(_ENCODINGS))
    pieces = draw(
        st.lists(
            st.one_of(
                st.text(st.sampled_from(_CHARS), max_size=6).map(lambda t: _body(t, encoding)),
                st.sampled_from(_BAD),
            ),
            max_size=8,
        )
    )
    return encoding, draw(st.sampled_from(_BOMS)) + b"".join(pieces)


_SIZES = st.none() | st.integers(-1, 12)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), _SIZES),
        st.tuples(st.just("readline"), st.integers(-1, 12)),
        st.tuples(st.just("readlines"), st.integers(-1, 12)),
        st.tuples(st.sampled_from(["next", "tell", "seek_end", "seek_cur", "flush"]), st.none()),
        st.tuples(st.just("seek"), st.integers(0, 7)),
        st.tuples(st.just("write"), st.text(st.sampled_from([*_CHARS, "\udcff"]), max_size=5)),
        st.tuples(st.just("truncate"), st.none() | st.integers(0, 40)),
    ),
    max_size=12,
).map(lambda ops: [*ops, ("newlines", None)])


@settings(max_examples=150, deadline=None)
@given(
    file=_files(),
    errors=st.sampled_from(["strict", "replace", "ignore", "surrogateescape", "backslashreplace"]),
    newline=st.sampled_from([None, "", "\n", "\r", "\r\n"]),
    ops=_OPS,
    limits=st.none() | st.lists(st.integers(1, 9), min_size=1, max_size=4),
    at_end=st.booleans(),
)
def test_same_as_io(
    file: tuple[str, bytes],
    errors: str,
    newline: str | None,
    ops: list[Op],
    limits: list[int] | None,
    at_end: bool,
) -> None:
    encoding, data = file
    check_same(data, ops, limits, at_end, encoding=encoding, errors=errors, newline=newline)


# -- specific cases -----------------------------------------------------------------------


def test_strict_error_is_raised_where_python_raises_it() -> None:
    out = check_same(b"ab\xffcdef", [("read", 3), ("read", 3)], encoding="utf-8")
    assert out[0][1] is UnicodeDecodeError
    check_same(b"ab\xffcdef", [("read", 2), ("read", 3), ("read", 3)], [2], encoding="utf-8")


def test_replace_gives_one_character_per_bad_byte() -> None:
    out = check_same(b"\xff\xffabc", [("read", 1)] * 3, encoding="utf-8", errors="replace")
    assert [o[1] for o in out] == ["\ufffd", "\ufffd", "a"]


@pytest.mark.parametrize("limits", [None, [1], [3]])
def test_utf16_reads_characters(limits: list[int] | None) -> None:
    out = check_same("abcdef".encode("utf-16"), [("read", 2)] * 3, limits, encoding="utf-16")
    assert [o[1] for o in out] == ["ab", "cd", "ef"]


@pytest.mark.parametrize("limits", [None, [1], [2]])
def test_crlf_is_one_newline(limits: list[int] | None) -> None:
    out = check_same(b"a\r\nbcd", [("read", 2)] * 3 + [("tell", None)], limits, encoding="utf-8")
    assert [o[1] for o in out[:3]] == ["a\n", "bc", "d"]


@pytest.mark.parametrize("limits", [None, [1]])
def test_lone_cr_ends_a_line(limits: list[int] | None) -> None:
    ops: list[Op] = [("readline", -1)] * 4
    out = check_same(b"a\rb\r\nc", ops, limits, encoding="utf-8", newline=None)
    assert [o[1] for o in out] == ["a\n", "b\n", "c", ""]
    out = check_same(b"a\rb\r\nc", ops, limits, encoding="utf-8", newline="\r")
    assert [o[1] for o in out] == ["a\r", "b\r", "\nc", ""]
    out = check_same(b"a\rb\r\nc", ops, limits, encoding="utf-8", newline="")
    assert [o[1] for o in out] == ["a\r", "b\r\n", "c", ""]


@pytest.mark.parametrize("limits", [None, [1], [3]])
def test_readline_utf16(limits: list[int] | None) -> None:
    data = "line1\nlíne2\r\n\U0001d11e".encode("utf-16")
    ops: list[Op] = [("readline", -1), ("tell", None), ("readline", 3), ("readline", -1)]
    ops += [("seek", 0), ("readline", -1), ("readline", -1)]
    out = check_same(data, ops, limits, encoding="utf-16")
    lines = [out[i][1] for i in (0, 2, 3, 5, 6)]
    assert lines == ["line1\n", "lín", "e2\n", "líne2\n", "\U0001d11e"]


def test_tell_during_iteration_is_refused() -> None:
    ops: list[Op] = [("next", None), ("tell", None), ("readlines", 4), ("tell", None)]
    ops += [("next", None), ("next", None), ("tell", None), ("readlines", -1), ("tell", None)]
    out = check_same(b"a\nb\nc\nd\ne\n", ops, encoding="utf-8")
    assert out[1][1] is OSError
    assert out[-1][0] == "ok"


def test_tell_and_seek_mid_character_and_after_cr() -> None:
    data = "é\r\n€x\r".encode() + b"\xe2\x82"
    ops: list[Op] = [(op, None) for op in ("tell",)] * 0
    for n in range(1, 7):
        ops += [("seek", 0), ("read", n), ("tell", None), ("read", 2), ("seek", n), ("read", -1)]
    for errors in ("strict", "replace"):
        for newline in (None, "", "\r\n"):
            check_same(data, ops, [1], encoding="utf-8", errors=errors, newline=newline)


def test_bom_written_only_at_the_start() -> None:
    for encoding in ("utf-16", "utf-32", "utf-8-sig"):
        existing = "ab".encode(encoding)
        check_same(existing, [("write", "cd")], at_end=True, encoding=encoding)
        check_same(b"", [("write", "cd"), ("write", "ef")], encoding=encoding)
        ops: list[Op] = [("write", "cd"), ("seek", 0), ("write", "x"), ("seek_end", None)]
        out = check_same(b"", [*ops, ("write", "y"), ("seek", 0), ("read", -1)], encoding=encoding)
        assert out[-1][1] == "xdy"
        check_same(existing, [("read", 1), ("write", "z")], encoding=encoding)


def test_write_translates_newlines_and_line_buffering_flushes() -> None:
    for newline in (None, "", "\n", "\r", "\r\n"):
        ops: list[Op] = [("write", "a\nb\r\nc\r"), ("seek", 0), ("read", -1)]
        check_same(b"", ops, encoding="utf-8", newline=newline, line_buffering=True)
        check_same(b"", ops, encoding="cp1252", newline=newline, write_through=True)


def test_surrogateescape_round_trips() -> None:
    ops: list[Op] = [("read", -1), ("seek", 0), ("write", "x\udcff\udc80"), ("seek_end", None)]
    check_same(b"a\xffb\x80", ops, encoding="utf-8", errors="surrogateescape")
    check_same(b"a", [("write", "\udcff")], encoding="utf-8", errors="strict")


_BAD_ARGS: list[dict[str, Any]] = [
    {"encoding": "utf-8", "newline": "x"},
    {"encoding": "utf-8", "newline": "\r\r"},
    {"encoding": "utf-8", "newline": 5},
    {"encoding": "utf-8", "newline": "\0"},
    {"encoding": 5},
    {"encoding": b"utf-8"},
    {"encoding": "no-such-codec"},
    {"encoding": "hex"},
    {"encoding": "utf\0-8"},
    {"encoding": "utf-8", "errors": 5},
    {"encoding": "utf-8", "line_buffering": "yes"},
    {"encoding": "utf-8", "write_through": 1.5},
]


@pytest.mark.parametrize("kwargs", _BAD_ARGS)
def test_constructor_refuses_what_io_refuses(kwargs: dict[str, Any]) -> None:
    with pytest.raises(Exception) as want:
        io.TextIOWrapper(io.BytesIO(), **kwargs)
    with pytest.raises(want.type) as got:
        AsyncTextWrapper(_AsyncBytes(), **kwargs)
    assert str(got.value) == str(want.value)


def test_constructor_defaults_are_io_defaults() -> None:
    want = io.TextIOWrapper(io.BytesIO())
    got = AsyncTextWrapper(_AsyncBytes())
    assert (got.encoding, got.errors, got.line_buffering, got.newlines) == (
        want.encoding,
        want.errors,
        want.line_buffering,
        want.newlines,
    )
    got = AsyncTextWrapper(_AsyncBytes(), encoding="UTF8", errors="replace", line_buffering=True)
    assert (got.encoding, got.errors, got.line_buffering) == ("UTF8", "replace", True)
    assert got.buffer is not None
    assert (got.readable(), got.writable(), got.seekable()) == (True, True, True)


@pytest.mark.parametrize(
    "op",
    [
        ("read", "10"),
        ("read", 2.0),
        ("read", 2**64),
        ("readline", "x"),
        ("readline", None),
        ("readline", 2.0),
        ("readlines", "x"),
        ("write", b"x"),
        ("write", None),
        ("truncate", "x"),
    ],
)
def test_argument_types_checked_as_io_does(op: Op) -> None:
    out = check_same(b"abc\n", [op, ("read", -1)], encoding="utf-8")
    assert out[0][1] in (TypeError, OverflowError)


def test_seek_arguments_checked_as_io_does() -> None:
    async def go(w: AsyncTextWrapper, args: tuple[Any, ...]) -> Any:
        return await w.seek(*args)

    for args in [(1, 1), (1, 2), (0, 3), (-1,), ("x",), (0, "x"), (2**170,), (0, 2**40)]:
        with pytest.raises(Exception) as want:
            io.TextIOWrapper(io.BytesIO(b"abc"), encoding="utf-8").seek(*args)
        w = AsyncTextWrapper(_AsyncBytes(b"abc"), encoding="utf-8")
        with pytest.raises(want.type) as got:
            _run(go(w, args))
        assert str(got.value) == str(want.value)


def test_unsupported_operations() -> None:
    async def go() -> None:
        w = AsyncTextWrapper(_AsyncBytes(b"ab", readable=False), encoding="utf-8")
        for call in (w.read, w.readline, w.__anext__, w.readlines):
            with pytest.raises(io.UnsupportedOperation, match="not readable"):
                await call()
        assert not w.readable()
        w = AsyncTextWrapper(_AsyncBytes(b"ab", writable=False), encoding="utf-8")
        with pytest.raises(io.UnsupportedOperation, match="not writable"):
            await w.write("x")
        w = AsyncTextWrapper(_AsyncBytes(b"ab", seekable=False), encoding="utf-8")
        for call in (w.tell, lambda: w.seek(0)):
            with pytest.raises(io.UnsupportedOperation, match="not seekable"):
                await call()
        assert await w.read(1) == "a"

    _run(go())


class _Pipe(_AsyncBytes):
    """A non-blocking source: asking for more once it is drained would block."""

    async def read1(self, size: int = -1) -> bytes:
        data = await super().read1(size)
        if not data:
            raise AssertionError("read1 of a drained pipe would wait for more")
        return data


@pytest.mark.parametrize("newline", [None, "", "\n"])
def test_read_n_of_a_pipe_holding_n_characters_does_not_wait(newline: str | None) -> None:
    async def go() -> None:
        w = AsyncTextWrapper(_Pipe("aé€\n".encode(), [2]), encoding="utf-8", newline=newline)
        assert await w.read(4) == "aé€\n"
        w = AsyncTextWrapper(_Pipe("xy\n".encode("utf-16")), encoding="utf-16", newline=newline)
        assert await w.readline() == "xy\n"

    _run(go())


def test_needs_no_event_loop() -> None:
    """The wrapper only awaits its buffer: it runs without asyncio or trio."""
    w = AsyncTextWrapper(_AsyncBytes(b"x\ny"), encoding="ascii")
    coro = w.readlines()
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    assert done.value.value == ["x\n", "y"]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_chunks_of_a_large_file(encoding: str) -> None:
    data = ("líne €\r\n" * 1500 + "x\r" * 700 + "\U0001d11e").encode(encoding)
    ops: list[Op] = [("read", 5000), ("tell", None), ("readline", -1), ("read", 9000)]
    ops += [("tell", None), ("seek", 0), ("read", 3), ("seek", 1), ("readlines", 20000)]
    ops += [("seek_end", None), ("write", "end\n"), ("seek", 0), ("read", -1), ("tell", None)]
    for newline in (None, "", "\r"):
        check_same(data, ops, encoding=encoding, newline=newline)
        check_same(data, ops, [4096, 1, 8191], encoding=encoding, newline=newline)


def test_tell_after_an_iteration_left_early_is_right() -> None:
    """io answers the buffer's position here (3, past the "b"): its
    snapshot is stale.  The wrapper answers where the next line starts."""

    async def go() -> None:
        w = AsyncTextWrapper(_AsyncBytes("a\nbé\ncd\n".encode(), [3]), encoding="utf-8")
        async for line in w:
            assert line == "a\n"
            break
        with pytest.raises(OSError, match="telling position disabled"):
            await w.tell()
        await w.flush()
        cookie = await w.tell()
        assert cookie == 2
        assert await w.read() == "bé\ncd\n"
        assert await w.seek(cookie) == cookie
        assert await w.read() == "bé\ncd\n"

    _run(go())
