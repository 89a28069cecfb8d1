"""The NBD protocol layer (threadlets.nbd.proto) with plain bytes, and a fuzz
test of the handshake and the transmission parser."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadlets.nbd import proto
from threadlets.nbd.proto import (
    Cmd,
    CmdFlag,
    ExportInfo,
    Handshake,
    Opt,
    ProtocolError,
    Rep,
    Request,
    RequestParser,
    TxFlag,
    check_request,
)

EXPORT = ExportInfo(name="disk", size=1 << 20, description="a disk")
RO = ExportInfo(name="ro", size=1 << 20, read_only=True)


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", proto.IHAVEOPT, option, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, reply type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == proto.OPT_REPLY_MAGIC
        pos += 20
        out.append((option, rep, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def handshake(cflags: int = proto.FLAG_FIXED_NEWSTYLE) -> Handshake:
    hs = Handshake({"disk": EXPORT, "ro": RO}, default="disk")
    assert hs.receive(struct.pack(">I", cflags)) == b""
    return hs


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7) -> bytes:
    return struct.pack(">IHHQQI", proto.REQUEST_MAGIC, flags, cmd, handle, offset, length)


# -- handshake ---------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    assert Handshake.greeting() == b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3)


def test_unknown_client_flags_end_the_connection() -> None:
    hs = Handshake({"disk": EXPORT})
    with pytest.raises(ProtocolError, match="client flags"):
        hs.receive(struct.pack(">I", 4))


def test_bad_option_magic_ends_the_connection() -> None:
    hs = handshake()
    with pytest.raises(ProtocolError, match="magic"):
        hs.receive(b"X" * 16)


def test_list_names_every_export() -> None:
    hs = handshake()
    got = replies(hs.receive(opt(Opt.LIST)))
    assert got == [
        (Opt.LIST, Rep.SERVER, b"\0\0\0\x04disk"),
        (Opt.LIST, Rep.SERVER, b"\0\0\0\x02ro"),
        (Opt.LIST, Rep.ACK, b""),
    ]
    assert replies(hs.receive(opt(Opt.LIST, b"x"))) == [
        (Opt.LIST, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
    ]


def test_go_sends_export_block_size_and_enters_transmission() -> None:
    hs = handshake()
    out = hs.receive(opt(Opt.GO, go_data("disk", proto.Info.NAME)) + b"tail")
    got = replies(out)
    assert got[0] == (
        Opt.GO,
        Rep.INFO,
        struct.pack(">HQH", 0, 1 << 20, proto.transmission_flags(EXPORT, False)),
    )
    assert (Opt.GO, Rep.INFO, b"\0\x01disk") in got
    assert (Opt.GO, Rep.INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20)) in got
    assert got[-1] == (Opt.GO, Rep.ACK, b"")
    assert hs.done
    assert hs.export is EXPORT
    assert hs.leftover == b"tail"
    with pytest.raises(ProtocolError):
        hs.receive(b"")


def test_info_answers_without_entering_transmission_and_empty_name_is_the_default() -> None:
    hs = handshake()
    got = replies(hs.receive(opt(Opt.INFO, go_data("", proto.Info.DESCRIPTION, proto.Info.NAME))))
    assert (Opt.INFO, Rep.INFO, b"\0\x02a disk") in got
    assert (Opt.INFO, Rep.INFO, b"\0\x01disk") in got  # the canonical name
    assert got[-1][1] == Rep.ACK
    assert not hs.done


def test_go_for_an_unknown_export_is_an_error_reply() -> None:
    hs = handshake()
    got = replies(hs.receive(opt(Opt.GO, go_data("nope"))))
    assert [g[1] for g in got] == [Rep.ERR_UNKNOWN]
    assert not hs.done


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0\x09disk",  # name length past the end
        go_data("disk")[:-1],
        go_data("disk") + b"\0",
        struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0",  # not UTF-8
    ],
)
def test_malformed_go_is_invalid(data: bytes) -> None:
    hs = handshake()
    assert [g[1] for g in replies(hs.receive(opt(Opt.GO, data)))] == [Rep.ERR_INVALID]
    assert not hs.done


def test_unknown_options_and_starttls_are_unsupported() -> None:
    hs = handshake()
    for option in (Opt.STARTTLS, Opt.EXTENDED_HEADERS, 4242):
        assert [g[1] for g in replies(hs.receive(opt(option)))] == [Rep.ERR_UNSUP]


def test_abort_is_acknowledged_and_closes() -> None:
    hs = handshake()
    assert replies(hs.receive(opt(Opt.ABORT))) == [(Opt.ABORT, Rep.ACK, b"")]
    assert hs.closed
    assert not hs.done


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name(no_zeroes: bool) -> None:
    cflags = proto.FLAG_FIXED_NEWSTYLE | (proto.FLAG_NO_ZEROES if no_zeroes else 0)
    hs = handshake(cflags)
    out = hs.receive(opt(Opt.EXPORT_NAME, b"ro"))
    flags = proto.transmission_flags(RO, False)
    assert out == struct.pack(">QH", 1 << 20, flags) + (b"" if no_zeroes else bytes(124))
    assert flags & TxFlag.READ_ONLY
    assert not flags & (TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FUA)
    assert hs.done


def test_export_name_for_an_unknown_export_ends_the_connection() -> None:
    hs = handshake()
    with pytest.raises(ProtocolError, match="no such export"):
        hs.receive(opt(Opt.EXPORT_NAME, b"nope"))


def test_meta_context_needs_structured_replies() -> None:
    hs = handshake()
    data = meta_data("disk", proto.BASE_ALLOCATION)
    assert [g[1] for g in replies(hs.receive(opt(Opt.SET_META_CONTEXT, data)))] == [Rep.ERR_INVALID]
    assert replies(hs.receive(opt(Opt.STRUCTURED_REPLY))) == [(Opt.STRUCTURED_REPLY, Rep.ACK, b"")]
    got = replies(hs.receive(opt(Opt.SET_META_CONTEXT, data)))
    assert got == [
        (Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\x01base:allocation"),
        (Opt.SET_META_CONTEXT, Rep.ACK, b""),
    ]
    hs.receive(opt(Opt.GO, go_data("disk")))
    assert hs.meta_context == {1: "base:allocation"}
    assert hs.structured
    assert proto.transmission_flags(EXPORT, True) & TxFlag.SEND_DF


def test_list_meta_context_and_unknown_queries() -> None:
    hs = handshake()
    hs.receive(opt(Opt.STRUCTURED_REPLY))
    got = replies(hs.receive(opt(Opt.LIST_META_CONTEXT, meta_data("disk"))))
    assert got[0] == (Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\0base:allocation")
    got = replies(hs.receive(opt(Opt.SET_META_CONTEXT, meta_data("disk", "qemu:dirty-bitmap:x"))))
    assert [g[1] for g in got] == [Rep.ACK]
    got = replies(hs.receive(opt(Opt.SET_META_CONTEXT, meta_data("nope", "base:allocation"))))
    assert [g[1] for g in got] == [Rep.ERR_UNKNOWN]


def test_meta_context_chosen_for_another_export_is_dropped_at_go() -> None:
    hs = handshake()
    hs.receive(opt(Opt.STRUCTURED_REPLY))
    hs.receive(opt(Opt.SET_META_CONTEXT, meta_data("ro", proto.BASE_ALLOCATION)))
    hs.receive(opt(Opt.GO, go_data("disk")))
    assert hs.meta_context == {}


def test_oversized_option_is_skipped_and_answered_too_big() -> None:
    hs = handshake()
    big = opt(Opt.LIST, bytes(proto.MAX_OPTION + 1))
    out = b"".join(hs.receive(big[i : i + 7000]) for i in range(0, len(big), 7000))
    assert [g[1] for g in replies(out)] == [Rep.ERR_TOO_BIG]
    assert [g[1] for g in replies(hs.receive(opt(Opt.LIST)))][-1] == Rep.ACK


def test_shutting_down_answers_err_shutdown_but_abort_still_works() -> None:
    hs = handshake()
    hs.shutting_down = True
    assert [g[1] for g in replies(hs.receive(opt(Opt.GO, go_data("disk"))))] == [Rep.ERR_SHUTDOWN]
    assert replies(hs.receive(opt(Opt.ABORT)))[0][1] == Rep.ACK


def test_handshake_byte_by_byte_equals_all_at_once() -> None:
    stream = (
        struct.pack(">I", 1)
        + opt(Opt.STRUCTURED_REPLY)
        + opt(Opt.LIST)
        + opt(Opt.SET_META_CONTEXT, meta_data("disk", proto.BASE_ALLOCATION))
        + opt(Opt.GO, go_data("disk", 0, 1, 2, 3))
        + request(Cmd.READ, 0, 512)
    )
    whole = Handshake({"disk": EXPORT})
    expected = whole.receive(stream)
    split = Handshake({"disk": EXPORT})
    got = b""
    for i in range(len(stream)):
        if split.done:
            break
        got += split.receive(stream[i : i + 1])
    assert got == expected
    assert split.done
    assert whole.done
    assert whole.leftover == request(Cmd.READ, 0, 512)


# -- transmission ------------------------------------------------------------------------------


def test_parser_splits_requests_and_keeps_write_payloads() -> None:
    stream = (
        request(Cmd.READ, 4096, 512, handle=1)
        + request(Cmd.WRITE, 0, 5, handle=2)
        + b"hello"
        + request(Cmd.FLUSH, handle=3)
    )
    p = RequestParser()
    got = []
    for i in range(0, len(stream), 3):
        got += p.feed(stream[i : i + 3])
    assert got == [
        Request(Cmd.READ, 0, 1, 4096, 512),
        Request(Cmd.WRITE, 0, 2, 0, 5, b"hello"),
        Request(Cmd.FLUSH, 0, 3, 0, 0),
    ]
    assert p.buffered == 0


def test_parser_drops_an_oversized_write_payload_without_buffering_it() -> None:
    p = RequestParser(max_payload=8)
    got = p.feed(request(Cmd.WRITE, 0, 100, handle=9) + bytes(60))
    assert got == []
    assert p.buffered == 0
    got = p.feed(bytes(40) + request(Cmd.FLUSH, handle=10))
    assert [(r.handle, r.dropped, r.data) for r in got] == [(9, True, None), (10, False, None)]


def test_parser_stops_after_disc_and_rejects_bad_magic() -> None:
    p = RequestParser()
    assert [r.cmd for r in p.feed(request(Cmd.DISC) + b"garbage")] == [Cmd.DISC]
    assert p.feed(b"more") == []
    with pytest.raises(ProtocolError, match="magic"):
        RequestParser().feed(bytes(28))


def req(cmd: int, offset: int = 0, length: int = 512, flags: int = 0) -> Request:
    return Request(cmd, flags, 1, offset, length, b"x" * length if cmd == Cmd.WRITE else None)


META = {1: proto.BASE_ALLOCATION}


@pytest.mark.parametrize(
    ("request_", "export", "want"),
    [
        (req(Cmd.READ), EXPORT, 0),
        (req(Cmd.READ, (1 << 20) - 512), EXPORT, 0),
        (req(Cmd.READ, (1 << 20) - 511), EXPORT, errno.EINVAL),
        (req(Cmd.READ, 2**64 - 1), EXPORT, errno.EINVAL),
        (req(Cmd.WRITE, 1 << 20, 1), EXPORT, errno.ENOSPC),
        (req(Cmd.WRITE_ZEROES, (1 << 20) - 1, 2), EXPORT, errno.ENOSPC),
        (req(Cmd.TRIM, 1 << 20, 1), EXPORT, errno.EINVAL),
        (req(Cmd.CACHE, 0, (1 << 20) + 1), EXPORT, errno.EINVAL),
        (req(99), EXPORT, errno.EINVAL),
        (req(Cmd.WRITE), RO, errno.EPERM),
        (req(Cmd.TRIM), RO, errno.EPERM),
        (req(Cmd.WRITE_ZEROES), RO, errno.EPERM),
        (req(Cmd.READ), RO, 0),
        (req(Cmd.READ, flags=CmdFlag.NO_HOLE), EXPORT, errno.EINVAL),
        (req(Cmd.READ, flags=CmdFlag.DF), EXPORT, 0),
        (req(Cmd.WRITE, flags=CmdFlag.FUA), EXPORT, 0),
        (req(Cmd.WRITE_ZEROES, flags=CmdFlag.FUA | CmdFlag.NO_HOLE), EXPORT, 0),
        (req(Cmd.WRITE_ZEROES, flags=CmdFlag.FAST_ZERO), EXPORT, errno.EINVAL),
        (req(Cmd.READ, flags=0x8000), EXPORT, errno.EINVAL),
        (req(Cmd.FLUSH, 0, 0), EXPORT, 0),
        (req(Cmd.FLUSH, 0, 1), EXPORT, errno.EINVAL),
        (req(Cmd.READ, 0, (32 << 20) + 1), ExportInfo("big", 1 << 30), errno.EINVAL),
        (req(Cmd.TRIM, 0, 1 << 26), ExportInfo("big", 1 << 30), 0),
        (req(Cmd.BLOCK_STATUS, flags=CmdFlag.REQ_ONE), EXPORT, 0),
        (req(Cmd.BLOCK_STATUS, 0, 0), EXPORT, errno.EINVAL),
    ],
)
def test_check_request(request_: Request, export: ExportInfo, want: int) -> None:
    err, message = check_request(request_, export, True, META)
    assert err == want, message
    assert bool(message) == bool(want)


def test_block_status_and_df_need_negotiation() -> None:
    assert check_request(req(Cmd.BLOCK_STATUS), EXPORT, True, {})[0] == errno.EINVAL
    assert check_request(req(Cmd.BLOCK_STATUS), EXPORT, False, META)[0] == errno.EINVAL
    assert check_request(req(Cmd.READ, flags=CmdFlag.DF), EXPORT, False, {})[0] == errno.EINVAL


def test_dropped_write_is_refused() -> None:
    r = Request(Cmd.WRITE, 0, 1, 0, 100, None, dropped=True)
    assert check_request(r, EXPORT, False, {})[0] == errno.EINVAL


def test_replies() -> None:
    assert proto.reply_ok(5) == struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, 5)
    assert proto.reply_error(5, errno.EDQUOT, "full", False) == struct.pack(
        ">IIQ", proto.SIMPLE_REPLY_MAGIC, errno.ENOSPC, 5
    )
    assert (
        proto.reply_error(5, errno.EINVAL, "bad", True)
        == struct.pack(">IHHQIIH", proto.STRUCTURED_REPLY_MAGIC, 1, 0x8001, 5, 9, errno.EINVAL, 3)
        + b"bad"
    )
    assert (
        proto.reply_read(6, 512, b"ab", False)
        == struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, 6) + b"ab"
    )
    assert (
        proto.reply_read(6, 512, b"ab", True)
        == struct.pack(">IHHQIQ", proto.STRUCTURED_REPLY_MAGIC, 1, 1, 6, 10, 512) + b"ab"
    )
    assert proto.reply_read(6, 512, b"", True) == struct.pack(
        ">IHHQI", proto.STRUCTURED_REPLY_MAGIC, 1, 0, 6, 0
    )
    assert proto.reply_block_status(7, 1, [(512, 3), (1024, 0)]) == struct.pack(
        ">IHHQIIIIII", proto.STRUCTURED_REPLY_MAGIC, 1, 5, 7, 20, 1, 512, 3, 1024, 0
    )
    with pytest.raises(ValueError, match="extents"):
        proto.reply_block_status(7, 1, [])


@pytest.mark.parametrize(
    ("err", "want"),
    [
        (errno.EIO, errno.EIO),
        (errno.ENOSPC, errno.ENOSPC),
        (errno.EDQUOT, errno.ENOSPC),
        (errno.EFBIG, errno.ENOSPC),
        (errno.EROFS, errno.EPERM),
        (errno.EOPNOTSUPP, errno.ENOTSUP),
        (errno.EBADF, errno.EIO),
        (errno.ECANCELED, errno.EIO),
    ],
)
def test_nbd_errno(err: int, want: int) -> None:
    assert proto.nbd_errno(err) == want


def test_export_info_validates() -> None:
    with pytest.raises(ValueError, match="size"):
        ExportInfo("x", -1)
    with pytest.raises(ValueError, match="block sizes"):
        ExportInfo("x", 1, min_block=8192, preferred_block=4096)
    with pytest.raises(ValueError, match="name"):
        ExportInfo("a\0b", 1)


# -- fuzz --------------------------------------------------------------------------------------

_valid_handshake = (
    struct.pack(">I", 3)
    + opt(Opt.STRUCTURED_REPLY)
    + opt(Opt.LIST)
    + opt(Opt.INFO, go_data("disk", 1, 2, 3))
    + opt(Opt.SET_META_CONTEXT, meta_data("disk", proto.BASE_ALLOCATION))
    + opt(Opt.GO, go_data("", 3))
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


@st.composite
def mangled(draw: st.DrawFn, valid: bytes) -> bytes:
    """Random bytes, a truncated valid stream, or a valid stream with bytes
    flipped, inserted or cut out."""
    kind = draw(st.sampled_from(["random", "truncated", "mutated", "option"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid)))]
    if kind == "option":
        body = draw(st.binary(max_size=64))
        return valid[:4] + opt(draw(st.integers(0, 2**32 - 1)), body)
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(data=mangled(_valid_handshake), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_fuzz_handshake(data: bytes, cuts: list[int]) -> None:
    """Whatever arrives, in whatever pieces: well-formed replies or a
    ProtocolError, never another exception; and a reached transmission
    phase always has an export."""
    hs = Handshake({"disk": EXPORT, "ro": RO})
    out = b""
    try:
        for piece in _chunks(data, cuts):
            if hs.done or hs.closed:
                break
            out += hs.receive(piece)
    except ProtocolError:
        return
    if hs.done:
        assert hs.export in (EXPORT, RO)
    # Option replies, each well formed, then (only after NBD_OPT_EXPORT_NAME)
    # the export's size and flags, with or without the 124 zero bytes.
    pos = 0
    magic = struct.pack(">Q", proto.OPT_REPLY_MAGIC)
    while pos < len(out):
        if not out.startswith(magic, pos):
            assert hs.done
            assert hs.export is not None
            assert len(out) - pos in (10, 134)
            assert struct.unpack_from(">Q", out, pos)[0] == hs.export.size
            break
        _, _, _, length = struct.unpack_from(">QIII", out, pos)
        pos += 20 + length
        assert pos <= len(out)


_valid_requests = (
    request(Cmd.READ, 0, 512, handle=1)
    + request(Cmd.WRITE, 512, 16, handle=2)
    + bytes(16)
    + request(Cmd.TRIM, 0, 4096, handle=3)
    + request(Cmd.BLOCK_STATUS, 0, 4096, handle=4)
    + request(Cmd.FLUSH, handle=5)
    + request(Cmd.DISC, handle=6)
)


@settings(max_examples=300, deadline=None)
@given(data=mangled(_valid_requests), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_fuzz_requests(data: bytes, cuts: list[int]) -> None:
    """The parser gives the same requests however the bytes are split,
    raises only ProtocolError, buffers at most one request's worth, and
    every request it gives passes or fails check_request cleanly, never
    reaching outside the export."""

    def parse(pieces: list[bytes]) -> list[Request] | str:
        p = RequestParser(max_payload=64)
        got: list[Request] = []
        try:
            for piece in pieces:
                got += p.feed(piece)
                assert p.buffered <= 28 + 64
        except ProtocolError:
            return "error"
        return got

    whole = parse([data])
    split = parse(_chunks(data, cuts))
    if whole != "error" and split != "error":
        assert whole == split
    if isinstance(whole, list):
        for r in whole:
            err, _ = check_request(r, EXPORT, True, META)
            if not err and r.cmd not in (Cmd.FLUSH, Cmd.DISC):
                assert r.offset + r.length <= EXPORT.size
                if r.cmd == Cmd.WRITE:
                    assert r.data is not None
                    assert len(r.data) == r.length
