"""threadlets.open against io.open on real files (issue 12, item 2): the
same arguments, the same random sequence of calls, the same results and
exception types, and the same bytes in the file at the end."""

from __future__ import annotations

import asyncio
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import threadlets
import threadlets.awaitable as aw
from threadlets.probe import probe_io_uring

MODES = ["r", "r+", "w+", "a+", "a", "w", "rb", "r+b", "w+b", "a+b"]
ENCODINGS = ["utf-8", "latin-1", "utf-16", "ascii", "utf-8-sig", "cp1252"]
ERRORS = ["strict", "replace", "ignore", "surrogateescape", "backslashreplace"]
NEWLINES = [None, "", "\n", "\r", "\r\n"]

TEXT = st.text(alphabet=st.sampled_from("ab\n\r\r\né€\x00z"), max_size=30)

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.one_of(st.none(), st.integers(-1, 40))),
        st.tuples(st.just("readline"), st.one_of(st.none(), st.integers(-1, 40))),
        st.tuples(st.just("next"), st.none()),
        st.tuples(st.just("readlines"), st.none()),
        st.tuples(st.just("tell"), st.none()),
        st.tuples(st.just("seek"), st.integers(0, 20)),  # the n-th position told (or 0)
        st.tuples(st.just("seek_end"), st.none()),
        st.tuples(st.just("write"), TEXT),
        st.tuples(st.just("flush"), st.none()),
    ),
    max_size=14,
)


def _outcome(fn: Any) -> Any:
    try:
        return ("ok", fn())
    except Exception as e:
        return ("raised", type(e))


async def _aoutcome(fn: Any) -> Any:
    try:
        return ("ok", await fn())
    except Exception as e:
        return ("raised", type(e))


def _run_both(
    mode: str,
    encoding: str | None,
    errors: str | None,
    newline: str | None,
    content: bytes,
    ops: list[tuple[str, Any]],
) -> None:
    binary = "b" in mode
    if not binary:
        ops = _defined(ops)
    kw: dict[str, Any] = (
        {} if binary else {"encoding": encoding, "errors": errors, "newline": newline}
    )
    with tempfile.TemporaryDirectory() as tmp:
        theirs, ours = Path(tmp, "io"), Path(tmp, "threadlets")
        theirs.write_bytes(content)
        ours.write_bytes(content)
        expected: list[Any] = []
        told: list[Any] = [0]
        with open(theirs, mode, **kw) as f:
            for op, arg in ops:
                expected.append(_outcome(lambda: _call(f, op, arg, binary, told)))  # noqa: B023

        async def main() -> list[Any]:
            got: list[Any] = []
            told: list[Any] = [0]
            async with threadlets.open(ours, mode, **kw) as f:
                for op, arg in ops:
                    got.append(await _aoutcome(lambda: _acall(f, op, arg, binary, told)))  # noqa: B023
            return got

        got = asyncio.run(main())
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            assert g == e, f"call {i} {ops[i]}: io.open gave {e}, threadlets.open {g}"
        assert ours.read_bytes() == theirs.read_bytes()


def _payload(arg: Any, binary: bool) -> Any:
    return arg.encode("utf-8", "surrogateescape") if binary else arg


def _defined(ops: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Text mode: ops without the tell() calls whose answer io leaves
    undefined -- after an iteration and a flush (a write here flushes), io
    decodes a stale snapshot (see tests/test_textio.py's _defined)."""
    kept: list[tuple[str, Any]] = []
    iterating = stale = False
    for name, arg in ops:
        if name in ("next", "readlines"):
            iterating = True
        elif name in ("flush", "write"):
            stale, iterating = stale or iterating, False
        elif name in ("seek", "seek_end"):
            stale = iterating = False
        elif stale and name == "tell":
            continue
        kept.append((name, arg))
    return kept


def _call(f: Any, op: str, arg: Any, binary: bool, told: list[Any]) -> Any:
    if op == "read":
        return f.read(arg)
    if op == "readline":
        return f.readline(arg)
    if op == "next":
        return next(f, "<end>")
    if op == "readlines":
        return f.readlines()
    if op == "tell":
        told.append(f.tell())
        return told[-1]
    if op == "seek":
        return f.seek(told[arg % len(told)])
    if op == "seek_end":
        return f.seek(0, os.SEEK_END)
    if op == "write":
        n = f.write(_payload(arg, binary))
        f.flush()  # see _acall
        return n
    return f.flush()


async def _acall(f: Any, op: str, arg: Any, binary: bool, told: list[Any]) -> Any:
    if op == "read":
        return await f.read(arg)
    if op == "readline":
        return await f.readline(arg)
    if op == "next":
        try:
            return await f.__anext__()
        except StopAsyncIteration:
            return "<end>"
    if op == "readlines":
        return await f.readlines()
    if op == "tell":
        told.append(await f.tell())
        return told[-1]
    if op == "seek":
        return await f.seek(told[arg % len(told)])
    if op == "seek_end":
        return await f.seek(0, os.SEEK_END)
    if op == "write":
        # Flushed at once on both sides: io.TextIOWrapper (the C one) keeps
        # written text until a flush, seek, tell or close, so a read(n)
        # right after a write reads what was there before; AsyncTextWrapper
        # writes through (see threadlets.textio).
        n = await f.write(_payload(arg, binary))
        await f.flush()
        return n
    return await f.flush()


@pytest.fixture(params=["threads", "io_uring"])
def engine_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "io_uring" and not _have_io_uring():
        pytest.skip("no io_uring here")
    aw.configure(backend=request.param)
    yield request.param
    aw.configure()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mode=st.sampled_from(MODES),
    encoding=st.sampled_from(ENCODINGS),
    errors=st.sampled_from(ERRORS),
    newline=st.sampled_from(NEWLINES),
    content=st.one_of(
        st.binary(max_size=60),
        st.tuples(TEXT, st.sampled_from(ENCODINGS)).map(lambda t: t[0].encode(t[1], "replace")),
    ),
    ops=OPS,
)
def test_open_behaves_as_io_open(
    engine_backend: str,
    mode: str,
    encoding: str,
    errors: str,
    newline: str | None,
    content: bytes,
    ops: list[tuple[str, Any]],
) -> None:
    _run_both(mode, encoding, errors, newline, content, ops)


@pytest.mark.parametrize(
    ("mode", "ops"),
    [
        ("a", [("tell", None)]),  # the end of the file, at once
        ("a+", [("read", None), ("tell", None)]),  # '' and the end
        ("a+", [("seek", 0), ("write", "zz"), ("tell", None), ("seek", 0), ("read", None)]),
        ("r", [("next", None), ("tell", None)]),  # telling disabled by iteration
    ],
)
def test_text_mode_cases(mode: str, ops: list[tuple[str, Any]]) -> None:
    _run_both(mode, "utf-8", "strict", None, b"line one\nline two\n", ops)


def _have_io_uring() -> bool:
    # (probe.py leaves a file of /proc for the collector: not our warning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return probe_io_uring().supported
