"""Frame codec: whole input, byte by byte, random splits, trailing bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import GoAwayCode, RemoteProtocolError
from protocol.frames import (
    HEADER,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_FRAME_PAYLOAD,
    PREFACE,
    Flag,
    Frame,
    FrameReader,
    FrameType,
    encode_frame,
    pack_header,
)

SAMPLE = [
    Frame(FrameType.DATA, Flag.SYN, 2, 10, b'{"port":1}'),
    Frame(FrameType.DATA, 0, 2, 5, b"hello"),
    Frame(FrameType.DATA, Flag.FIN, 2, 0, b""),
    Frame(FrameType.WINDOW_UPDATE, Flag.ACK, 2, 0, b""),
    Frame(FrameType.WINDOW_UPDATE, 0, 0, 1 << 20, b""),
    Frame(FrameType.WINDOW_UPDATE, Flag.RST, 4, 6, b""),
    Frame(FrameType.PING, 0, 0, 0xFFFFFFFF, b""),
    Frame(FrameType.PING, Flag.ACK, 0, 7, b""),
    Frame(FrameType.GO_AWAY, 0, 0, 9, b""),
    Frame(FrameType.CONTROL, 0, 0, 2, b"{}"),
    Frame(FrameType.DATA, 0, 0xFFFFFFFF, MAX_FRAME_PAYLOAD, bytes(MAX_FRAME_PAYLOAD)),
]


def encode(frames: list[Frame]) -> bytes:
    return b"".join(encode_frame(f.type, f.flags, f.stream_id, f.payload, f.length) for f in frames)


def read_all(reader: FrameReader) -> list[Frame]:
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(frame)
    return out


def test_header_layout() -> None:
    assert HEADER.format == ">BBHII" and HEADER_SIZE == 12
    assert pack_header(FrameType.DATA, Flag.FIN, 3, 258) == b"\x01\x00\x00\x04\x00\x00\x00\x03" + (
        b"\x00\x00\x01\x02"
    )
    assert PREFACE == b"TUNL\r\n\x01\n"


def test_whole_input() -> None:
    reader = FrameReader()
    reader.feed(encode(SAMPLE))
    frames = read_all(reader)
    assert frames == SAMPLE
    # Frames, not bare tuples (they compare equal): the decoder builds them with tuple.__new__
    assert all(type(f) is Frame for f in frames)
    assert [(f.type, f.stream_id, f.payload) for f in frames] == [
        (f.type, f.stream_id, f.payload) for f in SAMPLE
    ]
    assert reader.buffered == 0


def test_byte_by_byte_with_preface() -> None:
    reader = FrameReader(expect_preface=True)
    got = []
    for b in PREFACE + encode(SAMPLE):
        reader.feed(bytes([b]))
        got += read_all(reader)
    assert got == SAMPLE


def test_trailing_bytes_stay_buffered() -> None:
    data = encode(SAMPLE[:3])
    extra = encode(SAMPLE[3:4])
    reader = FrameReader()
    reader.feed(data + extra[:5])
    assert read_all(reader) == SAMPLE[:3]
    assert reader.buffered == 5
    reader.feed(memoryview(extra)[5:])
    assert read_all(reader) == SAMPLE[3:4]
    assert reader.buffered == 0


def test_partial_payload_waits() -> None:
    reader = FrameReader()
    frame = encode_frame(FrameType.DATA, 0, 1, b"abcdef")
    reader.feed(frame[:-1])
    assert reader.next_frame() is None
    reader.feed(bytearray(frame[-1:]))
    assert reader.next_frame() == Frame(0, 0, 1, 6, b"abcdef")


def test_preface_then_nothing() -> None:
    reader = FrameReader(expect_preface=True)
    reader.feed(PREFACE[:3])
    assert reader.next_frame() is None
    reader.feed(PREFACE[3:])
    assert reader.next_frame() is None and reader.buffered == 0


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(st.sampled_from(SAMPLE[:-1]), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
)
def test_random_splits(frames: list[Frame], cuts: list[int]) -> None:
    data = PREFACE + encode(frames)
    points = sorted({min(c, len(data)) for c in cuts})
    reader = FrameReader(expect_preface=True)
    got: list[Frame] = []
    prev = 0
    for p in [*points, len(data)]:
        reader.feed(data[prev:p])
        got += read_all(reader)
        prev = p
    assert got == frames and reader.buffered == 0


@settings(max_examples=150, deadline=None)
@given(
    ftype=st.sampled_from(list(FrameType)),
    flags=st.one_of(st.integers(0, 15), st.integers(0, 0xFFFF)),
    sid=st.integers(0, 2**32 - 1),
    length=st.one_of(st.integers(0, 2 * MAX_FRAME_PAYLOAD), st.integers(0, 2**32 - 1)),
)
def test_any_header_parses_or_raises_remote_error(
    ftype: int, flags: int, sid: int, length: int
) -> None:
    """The exact verdict for any header, from the rules in docs/protocol.md: flags outside the
    type's set are a PROTOCOL_ERROR, a DATA/CONTROL length above its cap is FRAME_TOO_LARGE at the
    header (before any payload is buffered), a payload-carrying frame waits for its payload, and
    every other header is a complete frame. "Wait" is only right when the length is allowed."""
    allowed = {
        FrameType.DATA: Flag.SYN | Flag.FIN,
        FrameType.WINDOW_UPDATE: Flag.ACK | Flag.RST,
        FrameType.PING: Flag.ACK,
        FrameType.GO_AWAY: 0,
        FrameType.CONTROL: 0,
    }[FrameType(ftype)]
    cap = {FrameType.DATA: MAX_FRAME_PAYLOAD, FrameType.CONTROL: MAX_CONTROL_PAYLOAD}.get(
        FrameType(ftype)
    )
    reader = FrameReader()
    reader.feed(pack_header(ftype, flags, sid, length))
    if flags & ~int(allowed):
        with pytest.raises(RemoteProtocolError) as info:
            reader.next_frame()
        assert info.value.code == GoAwayCode.PROTOCOL_ERROR
        return
    if cap is not None and length > cap:
        with pytest.raises(RemoteProtocolError) as info:
            reader.next_frame()
        assert info.value.code == GoAwayCode.FRAME_TOO_LARGE
        return
    if cap is not None and length > 0:
        assert reader.next_frame() is None  # waits for the payload...
        payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
        reader.feed(payload)
    else:
        payload = b""
    frame = reader.next_frame()  # ...and is then complete
    assert frame == Frame(ftype, flags, sid, length, payload)
    assert reader.buffered == 0


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x02" + pack_header(0, 0, 1, 0)[1:], GoAwayCode.PROTOCOL_ERROR),
        (pack_header(5, 0, 0, 0), GoAwayCode.PROTOCOL_ERROR),
        (pack_header(255, 0, 0, 0), GoAwayCode.PROTOCOL_ERROR),
        (pack_header(FrameType.PING, Flag.SYN, 0, 0), GoAwayCode.PROTOCOL_ERROR),
        (pack_header(FrameType.DATA, 0x10, 1, 0), GoAwayCode.PROTOCOL_ERROR),
        (pack_header(FrameType.DATA, 0, 1, MAX_FRAME_PAYLOAD + 1), GoAwayCode.FRAME_TOO_LARGE),
        (pack_header(FrameType.CONTROL, 0, 0, 2**32 - 1), GoAwayCode.FRAME_TOO_LARGE),
    ],
)
def test_bad_headers(data: bytes, code: GoAwayCode) -> None:
    reader = FrameReader()
    reader.feed(data)  # the oversized payload is refused before it is buffered
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_frame()
    assert info.value.code == code


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"X", GoAwayCode.PROTOCOL_ERROR),
        (b"TUNL\r\n\x02", GoAwayCode.UNSUPPORTED_VERSION),
        (b"TUNL\r\n\x01\r", GoAwayCode.PROTOCOL_ERROR),
        (b"TUNL\n", GoAwayCode.PROTOCOL_ERROR),
    ],
)
def test_bad_preface(data: bytes, code: GoAwayCode) -> None:
    reader = FrameReader(expect_preface=True)
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(data)
    assert info.value.code == code


def test_reader_keeps_unparsed_input_across_feeds() -> None:
    """Feeding again before parsing everything must keep the earlier bytes, in order."""
    a = encode_frame(FrameType.DATA, 0, 2, b"first")
    b = encode_frame(FrameType.DATA, 0, 2, b"second")
    reader = FrameReader()
    reader.feed(memoryview(a + b[:5]))
    assert reader.buffered == len(a) + 5
    reader.feed(b[5:])  # nothing was parsed in between
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame.payload)
    assert frames == [b"first", b"second"]
    assert reader.buffered == 0


def test_reader_payloads_do_not_alias_the_fed_buffer() -> None:
    """Frames parsed in place from the fed bytes must survive the caller reusing its buffer."""
    shared = bytearray(encode_frame(FrameType.DATA, 0, 2, b"payload") + b"\x01")
    reader = FrameReader()
    reader.feed(memoryview(shared))
    frame = reader.next_frame()
    assert reader.next_frame() is None  # the one-byte tail moved into the reader's buffer
    shared[:] = b"\x00" * len(shared)
    assert frame is not None and frame.payload == b"payload"
    assert reader.buffered == 1
