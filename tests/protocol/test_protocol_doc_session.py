"""Claims of docs/protocol.md that no sans-IO test held the session to, one test each (the doc
or tests/test_doc_claims_protocol.py's CITED table names them). Raw frames against one
``protocol.Session``, as in test_session.py."""

from __future__ import annotations

import orjson
import pytest

from protocol import control
from protocol.errors import GoAwayCode, LocalProtocolError
from protocol.events import ControlReceived, DataReceived, StreamOpened
from protocol.frames import INITIAL_SESSION_WINDOW, INITIAL_STREAM_WINDOW, PREFACE, encode_frame
from protocol.session import Role, Session, SessionConfig
from tests.protocol.conftest import (
    ACK,
    CONTROL,
    DATA,
    GO_AWAY,
    HELLO,
    PING,
    RST,
    SYN,
    WELCOME,
    WU,
    SessionPair,
    ctrl_frame,
    frames_of,
    meta,
    raw_edge,
    sent_frames,
    terminated,
)
from tests.protocol.test_session import open_accepted, transfer


def test_a_ping_behind_the_hello_is_answered_after_the_welcome() -> None:
    """Handshake: 'The first frame the agent receives must be CONTROL `welcome` or `error`';
    Keepalive: every PING is answered with `PING|ACK` and the same value. An agent may ping
    right behind its hello: the edge's answer waits for its welcome (it used to go first, and
    an agent that holds the edge to the rule, as this session does, then lost the link)."""
    edge = Session(Role.EDGE)
    edge.receive_data(PREFACE + ctrl_frame(HELLO) + encode_frame(PING, 0, 0, length=41))
    assert [type(e) for e in edge.events_received()] == [ControlReceived]
    assert sent_frames(edge) == []  # nothing before the handshake message
    edge.send_control(WELCOME)
    out = sent_frames(edge)
    assert [f[0] for f in out] == [CONTROL, PING]
    assert out[1] == (PING, ACK, 0, 41, b"")
    agent = Session(Role.AGENT)
    agent.send_control(HELLO)
    agent.data_to_send()
    agent.receive_data(b"".join(encode_frame(t, fl, s, p, n) for t, fl, s, n, p in out))
    assert not agent.closed, agent.error


def test_a_refusal_also_goes_out_before_the_ping_answer() -> None:
    """The same for a refused hello: `error`, then the PING|ACK, then GO_AWAY."""
    edge = Session(Role.EDGE)
    edge.receive_data(PREFACE + ctrl_frame(HELLO) + encode_frame(PING, 0, 0, length=5))
    edge.events_received()
    edge.send_control(control.Error("AUTH_FAILED", "no", None))
    edge.close(GoAwayCode.AUTH_FAILED)
    out = frames_of(b"".join(bytes(b) for b in edge.data_to_send()))
    assert [(f[0], f[1], f[3]) for f in out] == [
        (CONTROL, 0, out[0][3]),
        (PING, ACK, 5),
        (GO_AWAY, 0, int(GoAwayCode.AUTH_FAILED)),
    ]


def test_unknown_keys_of_the_open_metadata_are_ignored() -> None:
    """Streams: '`client` may be absent = `""`; unknown keys are ignored'."""
    edge = raw_edge()
    payload = orjson.dumps({"port": 8000, "via": "direct", "colour": "blue", "n": [1, {}]})
    edge.receive_data(encode_frame(DATA, SYN, 1, payload))
    assert edge.events_received() == [StreamOpened(1, 8000, "direct", "", None, None)]
    assert not edge.closed


def test_session_credit_is_returned_at_half_the_session_window() -> None:
    """Flow control, batching: 'the session's (stream 0) likewise with half of the session
    window' - and as soon as the bytes are delivered, not when they are acknowledged: 32
    streams each fill their window, nobody acknowledges a byte, and the stream-0 update goes
    out on the frame that makes 8 MiB, with exactly that delta."""
    edge = raw_edge()
    half = INITIAL_SESSION_WINDOW // 2
    chunk = bytes(64 * 1024)
    streams = half // INITIAL_STREAM_WINDOW
    received = 0
    for i in range(streams):
        sid = 2 * i + 1
        edge.receive_data(encode_frame(DATA, SYN, sid, meta()))
        edge.accept_stream(sid)
        for _ in range(INITIAL_STREAM_WINDOW // len(chunk)):
            edge.data_to_send()
            edge.receive_data(encode_frame(DATA, 0, sid, chunk))
            received += len(chunk)
            updates = [f for f in sent_frames(edge) if f[0] == WU and f[2] == 0]
            if received < half:
                assert updates == [], received
    assert received == half
    assert updates == [(WU, 0, 0, half, b"")]
    assert not edge.closed


def test_a_stream_id_the_peer_skipped_counts_as_gone() -> None:
    """Streams: ids increase with gaps allowed, and 'DATA, WINDOW_UPDATE or RST for a stream that
    existed but is gone ... is dropped silently': an id below the peer's latest SYN that it
    skipped is taken as gone too (as HTTP/2 closes the idle streams below a new id), its DATA
    counted against the session window and its credit returned. DATA above the latest id is
    on a stream never opened: GO_AWAY(PROTOCOL_ERROR)."""
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()) + encode_frame(DATA, SYN, 5, meta()))
    assert [e.stream_id for e in edge.events_received() if isinstance(e, StreamOpened)] == [1, 5]
    edge.receive_data(encode_frame(DATA, 0, 3, b"x" * 100) + encode_frame(WU, 0, 3, length=9))
    edge.receive_data(encode_frame(WU, RST, 3, length=0))
    assert edge.events_received() == [] and not edge.closed
    assert edge._recv_unreturned == 100  # counted, and on its way back (batched)
    edge.receive_data(encode_frame(DATA, 0, 7, b"x"))
    assert terminated(edge.events_received()).code == GoAwayCode.PROTOCOL_ERROR


def test_window_growth_takes_what_is_left_of_the_budget() -> None:
    """Flow control, growth: the window doubles while the growth budget lasts, and the last
    growth is what the budget has left (here half a window), after which it stays."""
    budget = INITIAL_STREAM_WINDOW + INITIAL_STREAM_WINDOW // 2
    cfg = SessionConfig(stream_growth_budget=budget)
    pair = SessionPair(cfg, cfg)
    sid = open_accepted(pair)
    transfer(pair, sid, 16 * INITIAL_STREAM_WINDOW)
    assert pair.agent._streams[sid].recv_size == INITIAL_STREAM_WINDOW + budget
    pair.assert_alive()


def test_a_side_that_sent_or_got_a_goaway_opens_no_stream() -> None:
    """Ending a session: 'GO_AWAY(code): the sender accepts no new streams ... and opens none';
    the receiver of a GO_AWAY opens none either ('a GO_AWAY was sent or received'). A live
    stream keeps both sessions up, so this is the going-away state, not a closed session."""
    for goaway_sender in ("edge", "agent"):
        pair = SessionPair()
        sid = open_accepted(pair)
        sender = pair.edge if goaway_sender == "edge" else pair.agent
        sender.close(GoAwayCode.NORMAL)
        pair.pump()
        pair.assert_alive()
        for side in (pair.edge, pair.agent):
            with pytest.raises(LocalProtocolError, match="going away"):
                side.open_stream(8000)
        pair.edge.send_data(sid, b"the live stream still works")
        pair.pump()
        assert any(isinstance(e, DataReceived) for e in pair.take(pair.agent))
