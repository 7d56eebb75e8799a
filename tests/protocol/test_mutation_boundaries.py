"""Boundaries and orderings the mutation run (``make mutation``, docs/testing.md) left open.

Each test names the mutants it kills (``mutmut show NAME`` with the prefix
``protocol.session.xǁSessionǁ`` or ``protocol.frames.``). They pin one-byte boundaries of credit,
budget and limits, the round-robin's handling of streams that are gone or out of credit, and a
few lifetime corners; everything is checked through what the session emits (bytes out, events,
errors). No event loop: the edge of a handshaken pair, fed raw frames where the peer would speak.
"""

from __future__ import annotations

import array

import orjson
import pytest

from protocol.errors import GoAwayCode, LocalProtocolError, ResetCode
from protocol.events import (
    ConnectionTerminated,
    DataReceived,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from protocol.frames import (
    HEADER_SIZE,
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_FRAME_PAYLOAD,
    MAX_OPEN_METADATA,
    PREFACE,
    Flag,
    FrameReader,
    FrameType,
    encode_frame,
    pack_header,
)
from protocol.session import Session, SessionConfig
from tests.protocol.conftest import SessionPair, flatten, frames_of

DATA = FrameType.DATA
WINDOW_UPDATE = FrameType.WINDOW_UPDATE
GO_AWAY = FrameType.GO_AWAY


def _edge_streams(pair: SessionPair, count: int) -> list[int]:
    """``count`` streams the edge opened, their SYNs already drained (the edge may send on them
    before the peer's ACK)."""
    sids = [pair.edge.open_stream(8000) for _ in range(count)]
    pair.edge.data_to_send()
    return sids


def _data_frames(session: Session, limit: int | None = None) -> list[tuple[int, int, int]]:
    """(stream id, flags, payload length) of each DATA frame in one ``data_to_send``."""
    frames = frames_of(flatten(session.data_to_send(limit)))
    return [(f[2], f[1], f[3]) for f in frames if f[0] == DATA]


def _window_update(stream_id: int, value: int) -> bytes:
    return pack_header(WINDOW_UPDATE, 0, stream_id, value)


# --------------------------------------------------------------------------- round-robin


def test_a_gone_stream_ahead_in_the_round_robin_does_not_hide_the_next_one() -> None:
    """A stream reset by the peer while its data waited stays in the round-robin (skipped
    lazily); the stream behind it still counts and still goes out. Kills ``has_data_to_send``
    mutmut_5 and ``data_to_send`` mutmut_13 (``continue`` -> ``break`` at a gone stream)."""
    pair = SessionPair()
    gone, live = _edge_streams(pair, 2)
    edge = pair.edge
    edge.send_data(gone, b"g" * 10)
    edge.send_data(live, b"l" * 20)
    edge.receive_data(pack_header(WINDOW_UPDATE, Flag.RST, gone, ResetCode.CANCEL))
    assert edge.events_received() == [StreamReset(gone, ResetCode.CANCEL, True)]
    assert edge.has_data_to_send()
    assert _data_frames(edge) == [(live, 0, 20)]


def test_a_stream_out_of_credit_does_not_block_the_streams_behind_it() -> None:
    """A stream with queued data but no stream credit is not sendable, whatever the session
    credit, and the round-robin steps past it. Kills ``has_data_to_send`` mutmut_8
    (``session_credit or st.send_window > 0``) and mutmut_9 (``st.send_window >= 0``), and
    ``data_to_send`` mutmut_32 (``continue`` -> ``break`` past a stream without credit)."""
    pair = SessionPair()
    blocked, other = _edge_streams(pair, 2)
    edge = pair.edge
    edge.send_data(blocked, b"b" * INITIAL_STREAM_WINDOW)
    assert sum(n for _, _, n in _data_frames(edge)) == INITIAL_STREAM_WINDOW
    edge.send_data(blocked, b"b" * 5)  # queued again, no stream credit left
    assert not edge.has_data_to_send()
    edge.send_data(other, b"o" * 7)  # behind the blocked one
    assert edge.has_data_to_send()
    assert _data_frames(edge) == [(other, 0, 7)]
    edge.receive_data(_window_update(blocked, 5))
    assert _data_frames(edge) == [(blocked, 0, 5)]


def test_one_frame_per_stream_per_round_however_many_send_data_calls() -> None:
    """Several ``send_data`` calls before a drain schedule the stream once: one DATA frame
    gathers them, and no empty frame follows. Kills ``send_data`` mutmut_37
    (``not st.scheduled or (n or end_stream)``) and mutmut_41 (``st.scheduled = False``), which
    queued the stream once per call."""
    pair = SessionPair()
    a, b = _edge_streams(pair, 2)
    edge = pair.edge
    for _ in range(3):
        edge.send_data(a, b"a" * 10)
    edge.send_data(b, b"b" * 10)
    assert _data_frames(edge) == [(a, 0, 30), (b, 0, 10)]
    assert edge.data_to_send() == []


def test_a_session_whose_buffers_were_emitted_holds_no_view_of_them() -> None:
    """Once a frame carrying the whole of a ``send_data`` buffer is emitted and written, the
    caller may reuse the buffer: the session keeps no view of it (a live view would forbid
    resizing a bytearray). Kills ``data_to_send`` mutmut_58 (``size < remaining``), which
    split a chunk of exactly the frame's size and kept its empty tail queued."""
    pair = SessionPair()
    (sid,) = _edge_streams(pair, 1)
    buf = bytearray(b"reused")
    pair.edge.send_data(sid, buf)
    written = flatten(pair.edge.data_to_send())  # what a transport's writelines would copy
    assert frames_of(written) == [(DATA, 0, sid, 6, b"reused")]
    buf += b" and grown"  # BufferError while any memoryview of it is alive
    assert buf == b"reused and grown"


# --------------------------------------------------------------------------- one byte of credit


def test_one_byte_of_session_credit_is_sendable_and_none_is_not() -> None:
    """Session credit at exactly 0 and exactly 1, with stream credit to spare. A stream that
    waits only for *session* credit stays in the round-robin and resumes when the peer's
    session WINDOW_UPDATE arrives (no stream update will come for it). Kills ``has_data_to_send``
    mutmut_3 (``_send_window >= 0``) and mutmut_4 (``> 1``), and ``data_to_send`` mutmut_29
    (``st.send_window <= 1``: a stream with one byte of its own credit dropped from the
    round-robin while only session credit was missing, stranded for good)."""
    pair = SessionPair()
    edge = pair.edge
    count = INITIAL_SESSION_WINDOW // INITIAL_STREAM_WINDOW  # 64 whole windows fill the session
    waiting, one_byte, *fillers = _edge_streams(pair, count + 1)
    # `waiting` spends all but one byte of its stream window first
    edge.send_data(waiting, b"w" * (INITIAL_STREAM_WINDOW - 1))
    assert _data_frames(edge)[-1] == (waiting, 0, MAX_FRAME_PAYLOAD - 1)
    # then the others spend exactly the rest of the session window
    chunk = bytes(INITIAL_STREAM_WINDOW)
    for sid in fillers:
        edge.send_data(sid, chunk)
    edge.send_data(one_byte, b"1")
    sent = _data_frames(edge)
    assert sum(n for _, _, n in sent) == INITIAL_SESSION_WINDOW - (INITIAL_STREAM_WINDOW - 1)
    # session credit 0; `waiting` has 1 byte of stream credit and 5 bytes queued
    edge.send_data(waiting, b"w" * 5)
    assert not edge.has_data_to_send()
    assert _data_frames(edge) == []
    edge.receive_data(_window_update(0, 1))  # one byte of session credit
    assert edge.has_data_to_send()
    assert _data_frames(edge) == [(waiting, 0, 1)]
    assert not edge.has_data_to_send()  # now out of stream credit too
    edge.receive_data(_window_update(0, 100))
    assert not edge.has_data_to_send()
    edge.receive_data(_window_update(waiting, 100))
    assert _data_frames(edge) == [(waiting, 0, 4)]


def test_a_stream_left_with_one_byte_of_credit_stays_scheduled() -> None:
    """A frame that leaves its stream exactly one byte of credit (the caller's limit cut it)
    keeps the stream in the round-robin: the next call sends that byte. Kills ``data_to_send``
    mutmut_90 (``st.send_window > 1``)."""
    pair = SessionPair()
    (sid,) = _edge_streams(pair, 1)
    edge = pair.edge
    edge.send_data(sid, b"x" * (INITIAL_STREAM_WINDOW + 100))
    sent = _data_frames(edge, limit=INITIAL_STREAM_WINDOW - 1)
    assert sum(n for _, _, n in sent) == INITIAL_STREAM_WINDOW - 1
    assert edge.has_data_to_send()
    assert _data_frames(edge) == [(sid, 0, 1)]
    assert not edge.has_data_to_send()


def test_the_last_byte_of_a_limit_goes_to_the_next_stream() -> None:
    """``data_to_send(limit)`` stops when ``limit`` payload bytes are out, not one byte early.
    Kills ``data_to_send`` mutmut_95 (``budget <= 1``)."""
    pair = SessionPair()
    a, b = _edge_streams(pair, 2)
    edge = pair.edge
    edge.send_data(a, b"a" * 10)
    edge.send_data(b, b"b" * 10)
    assert _data_frames(edge, limit=11) == [(a, 0, 10), (b, 0, 1)]
    assert _data_frames(edge) == [(b, 0, 9)]


# --------------------------------------------------------------------------- send-side watermarks


def test_send_data_says_pause_at_exactly_the_high_water_mark() -> None:
    """Kills ``send_data`` mutmut_43 (``st.queued > stream_send_high_water``)."""
    pair = SessionPair(SessionConfig(stream_send_high_water=1000, stream_send_low_water=100))
    (sid,) = _edge_streams(pair, 1)
    assert pair.edge.send_data(sid, b"x" * 999) is False
    assert pair.edge.send_data(sid, b"x") is True


def test_stream_writable_fires_once_at_exactly_the_low_water_mark() -> None:
    """A paused stream gets exactly one StreamWritable, when its queued bytes fall to the
    low-water mark itself (here the stream window cuts the drain exactly there). Kills
    ``data_to_send`` mutmut_77 (``queued < low_water``) and mutmut_79 (``st.paused = True``,
    a StreamWritable for every later frame)."""
    low = 64 * 1024
    pair = SessionPair(
        SessionConfig(stream_send_high_water=INITIAL_STREAM_WINDOW, stream_send_low_water=low)
    )
    (sid,) = _edge_streams(pair, 1)
    edge = pair.edge
    edge.events_received()
    assert edge.send_data(sid, b"x" * (INITIAL_STREAM_WINDOW + low)) is True
    edge.data_to_send()  # one stream window: exactly `low` bytes stay queued
    assert edge.stream_send_buffered(sid) == low
    assert edge.events_received() == [StreamWritable(sid)]
    edge.receive_data(_window_update(sid, 1000))
    edge.data_to_send()
    edge.receive_data(_window_update(sid, low))
    edge.data_to_send()
    assert edge.stream_send_buffered(sid) == 0
    assert edge.events_received() == []


def test_send_data_counts_bytes_of_a_two_byte_item_view() -> None:
    """A view of 2-byte items is sent as its bytes: frame length and flow control count bytes,
    not items. Kills ``send_data`` mutmut_22 (``view.itemsize != 2``: such a view was queued
    uncast, its item count taken for its size)."""
    pair = SessionPair()
    (sid,) = _edge_streams(pair, 1)
    items = array.array("H", range(1000))
    pair.edge.send_data(sid, memoryview(items))
    assert frames_of(flatten(pair.edge.data_to_send())) == [(DATA, 0, sid, 2000, items.tobytes())]


# --------------------------------------------------------------------------- limits


def _meta_of_size(size: int) -> tuple[str, bytes]:
    base = len(orjson.dumps({"port": 8000, "via": "preview", "client": ""}))
    client = "c" * (size - base)
    meta = orjson.dumps({"port": 8000, "via": "preview", "client": client})
    assert len(meta) == size
    return client, meta


def test_open_metadata_of_exactly_the_limit_is_sent_and_accepted() -> None:
    """A real session opens a stream whose metadata is exactly ``MAX_OPEN_METADATA`` bytes and
    its peer accepts it; one byte more is refused locally. Kills ``open_stream`` mutmut_43 and
    ``_on_syn`` mutmut_24 (``>= MAX_OPEN_METADATA`` on either side)."""
    pair = SessionPair()
    client, _ = _meta_of_size(MAX_OPEN_METADATA)
    sid = pair.edge.open_stream(8000, client=client)
    pair.pump()
    pair.assert_alive()
    assert pair.take(pair.agent) == [StreamOpened(sid, 8000, "preview", client)]
    with pytest.raises(LocalProtocolError):
        pair.edge.open_stream(8000, client=client + "c")


def test_epoch_zero_is_a_valid_open_epoch() -> None:
    """Node links send the ownership epoch they saw; 0 is a valid epoch, -1 is not. Kills
    ``open_stream`` mutmut_46 (``epoch <= 0``) and mutmut_47 (``epoch < 1``)."""
    pair = SessionPair()
    sid = pair.edge.open_stream(8000, sandbox="sb-1", epoch=0)
    pair.pump()
    pair.assert_alive()
    assert pair.take(pair.agent) == [StreamOpened(sid, 8000, "preview", "", "sb-1", 0)]
    with pytest.raises(LocalProtocolError):
        pair.edge.open_stream(8000, sandbox="sb-1", epoch=-1)


def test_the_last_stream_id_is_usable() -> None:
    """The agent's last odd id, 2**32 - 1, opens a stream the edge accepts; the next open runs
    out of ids. White-box: the session jumps to the end instead of 2**31 opens (as
    ``test_session.py::test_stream_ids_exhausted`` does). Kills ``open_stream`` mutmut_48
    (``stream_id >= _MAX_STREAM_ID``)."""
    pair = SessionPair()
    last = 2**32 - 1
    pair.agent._next_local_id = last  # white-box, see the docstring
    assert pair.agent.open_stream(8000) == last
    pair.pump()
    pair.assert_alive()
    assert pair.take(pair.edge) == [StreamOpened(last, 8000, "preview", "")]
    with pytest.raises(LocalProtocolError):
        pair.agent.open_stream(8000)


# --------------------------------------------------------------------------- lifetime and clock


def test_close_sends_one_go_away_and_nothing_after_termination() -> None:
    """``close()`` is idempotent while streams drain, and a no-op once the session ended for
    another reason (it must not queue a GO_AWAY behind the one already sent). Kills ``close``
    mutmut_1 (``self._terminated and self._local_goaway is not None``)."""
    pair = SessionPair()
    (sid,) = _edge_streams(pair, 1)
    edge = pair.edge
    edge.close()
    edge.close()
    frames = frames_of(flatten(edge.data_to_send()))
    assert [(f[0], f[3]) for f in frames] == [(GO_AWAY, GoAwayCode.NORMAL)]
    assert not edge.closed  # the stream may still finish
    edge.reset_stream(sid, ResetCode.CANCEL)
    assert edge.closed

    other = SessionPair().edge
    other.receive_data(b"\xff" * HEADER_SIZE)  # garbage from the peer: GO_AWAY(PROTOCOL_ERROR)
    assert other.closed and other.error is not None
    assert [f[0] for f in frames_of(flatten(other.data_to_send()))] == [GO_AWAY]
    other.close()
    assert other.data_to_send() == []


def test_receive_data_without_now_uses_the_clock_of_the_last_timer() -> None:
    """``handle_timer(now)`` advances the session's clock even when nothing is due; input fed
    afterwards without ``now`` is stamped with it. Kills ``handle_timer`` mutmut_1
    (``self._now = None``)."""
    pair = SessionPair()  # handshake at t=0: PING due at 10, dead peer at 15
    edge = pair.edge
    edge.handle_timer(5.0)  # nothing due
    assert edge.data_to_send() == []
    edge.receive_data(pack_header(FrameType.PING, 0, 0, 7))  # no `now`: it is 5.0
    assert frames_of(flatten(edge.data_to_send())) == [(FrameType.PING, Flag.ACK, 0, 7, b"")]
    assert edge.events_received() == []
    edge.handle_timer(10.0)  # our PING
    edge.data_to_send()
    assert edge.get_timer() == 20.0  # dead deadline 5.0 + 15 (not 0 + 15)
    edge.handle_timer(19.0)
    assert not edge.closed
    assert not any(isinstance(e, ConnectionTerminated) for e in edge.events_received())


# --------------------------------------------------------------------------- window growth


@pytest.mark.parametrize(
    ("received", "grows"),
    [
        (INITIAL_STREAM_WINDOW - INITIAL_STREAM_WINDOW // 4 - 1, False),
        (INITIAL_STREAM_WINDOW - INITIAL_STREAM_WINDOW // 4, True),
    ],
)
def test_a_stream_window_grows_only_once_three_quarters_were_used(
    received: int, grows: bool
) -> None:
    """The growth signal counts the bytes received since the last update from zero: one byte
    short of 3/4 of the window, the returned credit is just what was acknowledged; at exactly
    3/4 the window doubles in the same update. Kills ``_Stream.__init__`` mutmut_29
    (``self.recv_used = 1``)."""
    pair = SessionPair()
    sid = pair.edge.open_stream(8000)
    pair.pump()
    pair.agent.accept_stream(sid)
    pair.pump()
    pair.edge.send_data(sid, b"r" * received)
    pair.pump()
    pair.assert_alive()
    got = sum(len(e.data) for e in pair.take(pair.agent) if isinstance(e, DataReceived))
    assert got == received
    pair.agent.acknowledge(sid, received)
    updates = [
        (f[1], f[3])
        for f in frames_of(flatten(pair.agent.data_to_send()))
        if f[0] == WINDOW_UPDATE and f[2] == sid
    ]
    extra = INITIAL_STREAM_WINDOW if grows else 0
    assert updates == [(0, received + extra)]


# --------------------------------------------------------------------------- frames


def test_a_new_reader_has_nothing_buffered() -> None:
    """Kills ``FrameReader.__init__`` mutmut_4 (``self._pos = 1``: ``buffered`` was -1)."""
    for reader in (FrameReader(), FrameReader(expect_preface=True)):
        assert reader.buffered == 0
        assert reader.next_frame() is None
    reader = FrameReader(expect_preface=True)
    reader.feed(PREFACE)
    assert reader.buffered == 0


def test_encode_frame_length_zero_overrides_the_payload_length() -> None:
    """``length=0`` declares an empty frame even with a payload (a test crafting a lying
    header); only a negative ``length`` means "the payload's". Kills ``encode_frame`` mutmut_4
    (``length <= 0``) and mutmut_5 (``length < 1``)."""
    data = encode_frame(DATA, 0, 2, b"abc", length=0)
    assert data == pack_header(DATA, 0, 2, 0) + b"abc"
    reader = FrameReader()
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None and (frame.length, frame.payload) == (0, b"")
    assert reader.buffered == 3
