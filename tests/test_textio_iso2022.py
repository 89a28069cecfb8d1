"""ISO-2022 text files against io.open: the decoder's states, and so the
``tell()`` cookies, are io's, and where io's own decoder crashes the
interpreter (state 0 after a seek to a plain position, then a graphic
byte) threadlets' goes on."""

from __future__ import annotations

import asyncio
import codecs
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets.textio import _Iso2022Guard

from .test_attack_fronts12 import Op, _io_side, _threadlets_side

_ISO2022 = [
    "iso2022_jp",
    "iso2022_jp_1",
    "iso2022_jp_2",
    "iso2022_jp_2004",
    "iso2022_jp_3",
    "iso2022_jp_ext",
    "iso2022_kr",
]


def _same_as_io(
    tmp_path: Path, initial: bytes, mode: str, kwargs: dict[str, Any], ops: list[Op]
) -> None:
    a, b = tmp_path / "io", tmp_path / "threadlets"
    a.write_bytes(initial)
    b.write_bytes(initial)
    expected = _io_side(a, mode, kwargs, ops)
    got = asyncio.run(_threadlets_side(b, mode, kwargs, ops))
    assert got == expected


@pytest.mark.parametrize("encoding", _ISO2022)
@pytest.mark.parametrize("newline", [None, "", "\n"])
def test_tell_after_a_seek_to_a_plain_position_is_ios(
    tmp_path: Path, encoding: str, newline: str | None
) -> None:
    # (hypothesis found it.)  io sets its decoder to state (b"", 0) at a
    # plain position and tell() gives that state back; threadlets reset
    # the decoder there and told its fresh state (1 | 0x848484 << 64).
    ops: list[Op] = [("read", None), ("seek_cur", None), ("read", 1), ("tell", None)]
    kwargs = {"encoding": encoding, "errors": "strict", "newline": newline}
    _same_as_io(tmp_path, b"\x00", "r", kwargs, ops)
    # Control bytes decode in state 0 too (io does not crash there).
    ops = [
        ("read", 1),
        ("seek_cur", None),
        ("read", 1),
        ("tell", None),
        ("read", 1),
        ("tell", None),
    ]
    _same_as_io(tmp_path, b"\x00\n\r\x01", "r", kwargs, ops)
    _same_as_io(tmp_path, b"\x00\n\r\x01", "r+", kwargs, [("write", "\n"), *ops])


@pytest.mark.parametrize("encoding", _ISO2022)
def test_newlines_after_a_seek_to_a_plain_position_are_ios(tmp_path: Path, encoding: str) -> None:
    # io's seek to a plain position sets the newline decoder's state and
    # keeps the newlines seen; threadlets' reset() forgot them.
    (tmp_path / "f").write_bytes(b"a\r\n\x00\x00")

    async def main() -> Any:
        async with await threadlets.open(tmp_path / "f", encoding=encoding) as f:
            await f.read(3)
            await f.seek(3)  # (a plain position: io sets state 0)
            await f.read(1)
            return f.newlines

    with open(tmp_path / "f", encoding=encoding) as f:
        f.read(3)
        f.seek(3)
        f.read(1)
        want = f.newlines
    assert want == "\r\n"
    assert asyncio.run(main()) == want


@pytest.mark.parametrize("encoding", _ISO2022)
def test_where_ios_decoder_crashes_threadlets_goes_on(tmp_path: Path, encoding: str) -> None:
    # CPython's own decoder in io's state 0 crashes at a graphic byte
    # (codecs.getincrementaldecoder("iso2022_jp")(), setstate((b"", 0)),
    # decode(b"a"): a segfault in 3.11), as io.open's file does below.
    data = b"ab\x1b$B\x30\x21\x1b(Bcd\x0e!!\x0fef"
    (tmp_path / "f").write_bytes(data)

    async def main() -> list[Any]:
        out: list[Any] = []
        async with await threadlets.open(
            tmp_path / "f", "r+", encoding=encoding, errors="replace"
        ) as f:
            out.append(await f.read(1))
            await f.seek(1)  # a plain position: state 0
            out.append(await f.read())
            await f.seek(2)
            await f.write("")
            await f.seek(await f.tell())
            out.append(await f.read(3))
            out.append(await f.tell())
        return out

    got = asyncio.run(main())
    assert got[0] == "a"
    # (threadlets designates ASCII there: it reads on as a new decoder.)
    assert got[1] == data[1:].decode(encoding, "replace")


@pytest.mark.parametrize("encoding", _ISO2022)
def test_guard_decodes_as_the_codec_in_every_state_io_reaches(encoding: str) -> None:
    # Where the state is one io's decoder survives, the guard gives the
    # codec's text and state, whole or byte by byte.
    data = "aé日\n本 b".encode(encoding, "replace") + b"\x0e!!\x0f\x01"
    for state in (None, 0, 0x42):
        for size in (1, 2, len(data)):
            plain = codecs.getincrementaldecoder(encoding)("replace")
            guard = _Iso2022Guard(codecs.getincrementaldecoder(encoding)("replace"))
            if state is not None:
                plain.setstate((b"", state))
                guard.setstate((b"", state))
            chunks = [data[i : i + size] for i in range(0, len(data), size)]
            got = "".join(guard.decode(c) for c in chunks) + guard.decode(b"", True)
            if state is None:
                want = "".join(plain.decode(c) for c in chunks) + plain.decode(b"", True)
                assert got == want
                assert guard.getstate() == plain.getstate()
            else:
                assert got.replace("\ufffd", "").startswith("a")


@pytest.mark.parametrize("encoding", ["iso2022_jp", "iso2022_kr"])
@pytest.mark.parametrize("newline", [None, "\n"])
def test_tell_of_a_state_wider_than_a_c_int_is_an_overflow_error(
    tmp_path: Path, encoding: str, newline: str | None
) -> None:
    # (hypothesis found it.)  An ESC the codec does not know puts the
    # decoder in "ESC throughout" mode, bit 33 of its state (34 under the
    # newline decoder), which reset() keeps.  io's tell() reads the flags as
    # a C int and raises OverflowError; threadlets cut them to 32 bits.
    kwargs = {"encoding": encoding, "errors": "strict", "newline": newline}
    ops: list[Op] = [("read", None), ("seek", 0), ("readline", 0), ("tell", None)]
    _same_as_io(tmp_path, b"\x1b\x00", "r", kwargs, ops)
    # (the same flags met while tell() replays bytes)
    ops = [("read", 1), ("tell", None), ("read", 1), ("tell", None), ("seek_cur", None)]
    _same_as_io(tmp_path, b"a\x1b\x00bc", "r", kwargs, ops)
    _same_as_io(tmp_path, b"a\x1b\x00bc", "r", kwargs, [("read", 3), *ops])


@pytest.mark.parametrize(
    ("encoding", "mode", "initial", "ops"),
    [
        # (hypothesis found it.)  A truncate (any change through the binary
        # file) makes the next read decode afresh from tell(): that seek
        # reset the encoder, so utf-16 wrote its BOM again after a failed
        # write had used up io's start of stream...
        (
            "utf-16",
            "w",
            b"",
            [
                ("truncate", None),
                ("seek0", None),
                ("write", "\udcff"),
                ("read", None),
                ("write", ""),
            ],
        ),
        ("utf-32", "w", b"", [("truncate", 0), ("seek0", None), ("write", "\udcff"), ("read", 1)]),
        # ... and an ISO-2022 encoder dropped its shift.
        (
            "iso2022_jp",
            "w+",
            b"",
            [("write", "日"), ("read", 1), ("truncate", None), ("read", 1), ("write", "本a")],
        ),
        # (and there a state wider than a C int made the read fail)
        (
            "iso2022_jp",
            "r+",
            b"\x1b\x00abc",
            [("read", None), ("seek0", None), ("read", 1), ("truncate", 5), ("read", 2)],
        ),
    ],
)
@pytest.mark.parametrize("newline", [None, ""])
def test_decoding_afresh_after_a_change_keeps_the_encoders_state(
    tmp_path: Path, encoding: str, mode: str, initial: bytes, ops: list[Op], newline: str | None
) -> None:
    kwargs = {"encoding": encoding, "errors": "strict", "newline": newline}
    _same_as_io(
        tmp_path, initial, mode, kwargs, [*ops, ("write", "x"), ("seek0", None), ("read", None)]
    )
