"""Session state machine, driven back to back (edge + agent) or with raw frames."""

from __future__ import annotations

import hashlib
import random

import pytest

from protocol import control
from protocol.errors import (
    GoAwayCode,
    LocalProtocolError,
    ProtocolError,
    ResetCode,
    StreamClosedError,
)
from protocol.events import (
    ConnectionTerminated,
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    PingAcknowledged,
    StreamAccepted,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from protocol.frames import (
    DEFAULT_MAX_STREAM_WINDOW,
    HEARTBEAT_INTERVAL,
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_FRAME_PAYLOAD,
    PREFACE,
    encode_frame,
)
from protocol.session import Role, Session, SessionConfig
from tests.protocol.conftest import (
    ACK,
    CONTROL,
    DATA,
    FIN,
    GO_AWAY,
    HELLO,
    PING,
    RST,
    SYN,
    WELCOME,
    WU,
    SessionPair,
    ctrl_frame,
    flatten,
    frames_of,
    meta,
    raw_agent,
    raw_edge,
    sent_frames,
    terminated,
)


def assert_protocol_error(session: Session, code: GoAwayCode) -> None:
    events = session.events_received()
    term = terminated(events)
    assert term.code == code and term.remote is False
    assert session.closed and session.error is not None and session.error.code == code
    frames = sent_frames(session)
    assert frames[-1] == (GO_AWAY, 0, 0, code, b"")
    assert session.get_timer() is None


# --------------------------------------------------------------------------- handshake


def test_agent_sends_preface_then_hello() -> None:
    agent = Session(Role.AGENT)
    agent.send_control(HELLO)
    wire = flatten(agent.data_to_send())
    assert wire.startswith(PREFACE)
    frames = frames_of(wire, preface=True)
    assert [(f[0], f[2]) for f in frames] == [(CONTROL, 0)]
    assert control.decode_message(frames[0][4]) == HELLO


def test_handshake_pair(pair: SessionPair) -> None:
    pair.assert_alive()
    assert pair.edge.role is Role.EDGE and pair.agent.role is Role.AGENT
    assert pair.edge.stream_count == 0


def test_edge_may_refuse_with_error_then_goaway() -> None:
    pair = SessionPair(handshake=False)
    pair.agent.send_control(HELLO)
    pair.pump()
    pair.edge.send_control(control.Error(code="AUTH_FAILED", message="bad token"))
    pair.edge.close(GoAwayCode.AUTH_FAILED)
    pair.pump()
    events = pair.take(pair.agent)
    assert isinstance(events[0], ControlReceived) and isinstance(events[0].message, control.Error)
    assert events[1] == GoAwayReceived(GoAwayCode.AUTH_FAILED)
    assert events[2] == ConnectionTerminated(GoAwayCode.AUTH_FAILED, "peer sent GO_AWAY", True)
    assert terminated(pair.take(pair.edge)).remote is False
    assert pair.edge.closed and pair.agent.closed


def test_goaway_as_first_frame_is_accepted() -> None:
    agent = Session(Role.AGENT)
    agent.send_control(HELLO)
    agent.receive_data(encode_frame(GO_AWAY, length=GoAwayCode.SHUTTING_DOWN))
    events = agent.events_received()
    assert events[0] == GoAwayReceived(GoAwayCode.SHUTTING_DOWN)
    assert terminated(events).remote is True


def test_larger_session_window_is_granted_after_handshake() -> None:
    big = INITIAL_SESSION_WINDOW * 2
    agent = Session(Role.AGENT, SessionConfig(session_window=big))
    agent.send_control(HELLO)
    frames = frames_of(flatten(agent.data_to_send()), preface=True)
    assert [(f[0], f[2], f[3]) for f in frames[1:]] == [(WU, 0, big - INITIAL_SESSION_WINDOW)]


def test_control_messages_after_handshake(pair: SessionPair) -> None:
    pair.agent.send_control(control.Expose(id=1, port=8000, name="api"))
    pair.pump()
    assert pair.take(pair.edge) == [ControlReceived(control.Expose(id=1, port=8000, name="api"))]
    pair.edge.send_control(control.Ok(id=1))
    pair.pump()
    assert pair.take(pair.agent) == [ControlReceived(control.Ok(id=1))]


# --------------------------------------------------------------------------- streams


def test_open_accept_and_data_both_ways(pair: SessionPair) -> None:
    sid = pair.edge.open_stream(8000, "direct", "10.0.0.1:5555")
    assert sid == 2
    assert pair.edge.send_data(sid, b"GET / HTTP/1.1\r\n\r\n") is False  # before the ACK
    pair.pump()
    assert pair.take(pair.agent) == [
        StreamOpened(2, 8000, "direct", "10.0.0.1:5555"),
        DataReceived(2, b"GET / HTTP/1.1\r\n\r\n", False),
    ]
    assert pair.agent.stream_receive_unacked(2) == 18
    pair.agent.acknowledge(2, 18)
    pair.agent.accept_stream(2)
    pair.agent.send_data(2, memoryview(b"HTTP/1.1 200 OK\r\n\r\n"))
    pair.pump()
    assert pair.take(pair.edge) == [
        StreamAccepted(2),
        DataReceived(2, b"HTTP/1.1 200 OK\r\n\r\n", False),
    ]
    assert pair.edge.stream_count == pair.agent.stream_count == 1
    assert pair.edge.open_stream(8001) == 4


def test_agent_may_open_streams_too(pair: SessionPair) -> None:
    sid = pair.agent.open_stream(9000)
    assert sid == 1
    pair.pump()
    assert pair.take(pair.edge) == [StreamOpened(1, 9000, "preview", "")]
    pair.edge.accept_stream(1)
    pair.pump()
    assert pair.take(pair.agent) == [StreamAccepted(1)]
    assert pair.agent.open_stream(9000) == 3


def open_accepted(pair: SessionPair) -> int:
    sid = pair.edge.open_stream(8000)
    pair.pump()
    pair.agent.accept_stream(sid)
    pair.pump()
    pair.take(pair.agent)
    pair.take(pair.edge)
    return sid


@pytest.mark.parametrize("first", ["edge", "agent"])
def test_fin_half_close_each_direction(pair: SessionPair, first: str) -> None:
    sid = open_accepted(pair)
    a = pair.edge if first == "edge" else pair.agent
    b = pair.other(a)
    a.send_data(sid, b"last words", end_stream=True)
    pair.pump()
    assert pair.take(b) == [DataReceived(sid, b"last words", True)]
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"more")
    # the other direction is still open
    b.send_data(sid, b"reply")
    pair.pump()
    assert pair.take(a) == [DataReceived(sid, b"reply", False)]
    assert a.stream_count == b.stream_count == 1
    b.end_stream(sid)
    pair.pump()
    assert pair.take(a) == [DataReceived(sid, b"", True)]
    assert a.stream_count == b.stream_count == 0
    # gone stream: acknowledge/reset are no-ops, send raises StreamClosedError
    a.acknowledge(sid, 5)
    a.reset_stream(sid, ResetCode.CANCEL)
    with pytest.raises(StreamClosedError):
        a.send_data(sid, b"x")
    assert not a.has_data_to_send()


@pytest.mark.parametrize("first", ["edge", "agent"])
def test_reset_each_direction(pair: SessionPair, first: str) -> None:
    sid = open_accepted(pair)
    a = pair.edge if first == "edge" else pair.agent
    b = pair.other(a)
    b.send_data(sid, b"x" * 1000)
    pair.pump()
    assert b.stream_count == 1
    a.send_data(sid, b"y" * 1000)  # queued, then dropped by the reset
    a.reset_stream(sid, ResetCode.CONNECT_REFUSED)
    assert a.stream_send_buffered(sid) == 0 and a.stream_count == 0
    frames = sent_frames(a)
    assert frames == [(WU, RST, sid, ResetCode.CONNECT_REFUSED, b"")]
    b.receive_data(b"".join(encode_frame(*f[:3], payload=f[4], length=f[3]) for f in frames))
    assert b.events_received() == [StreamReset(sid, ResetCode.CONNECT_REFUSED, True)]
    assert b.stream_count == 0
    pair.assert_alive()


def test_reset_before_accept_refuses_stream(pair: SessionPair) -> None:
    sid = pair.edge.open_stream(8000)
    pair.edge.send_data(sid, b"early")
    pair.pump()
    pair.take(pair.agent)
    pair.agent.reset_stream(sid, ResetCode.CONNECT_FAILED)
    pair.pump()
    assert pair.take(pair.edge) == [StreamReset(sid, ResetCode.CONNECT_FAILED, True)]
    assert pair.edge.stream_count == pair.agent.stream_count == 0


def test_200_concurrent_streams_sha256(pair: SessionPair) -> None:
    rng = random.Random(1234)
    payloads: dict[int, tuple[bytes, bytes]] = {}
    for _ in range(200):
        sid = pair.edge.open_stream(8000)
        up = rng.randbytes(rng.randrange(0, 40_000))
        down = rng.randbytes(rng.randrange(0, 40_000))
        payloads[sid] = (up, down)
    pair.pump()
    for ev in pair.take(pair.agent):
        assert isinstance(ev, StreamOpened)
        pair.agent.accept_stream(ev.stream_id)
    # write in random-sized pieces, interleaved across streams
    pending = {sid: (0, 0) for sid in payloads}
    got: dict[tuple[str, int], list[bytes]] = {}
    ended: set[tuple[str, int]] = set()

    def drain(side: Session, name: str) -> None:
        for ev in pair.take(side):
            if isinstance(ev, DataReceived):
                got.setdefault((name, ev.stream_id), []).append(ev.data)
                side.acknowledge(ev.stream_id, len(ev.data))
                if ev.end_stream:
                    ended.add((name, ev.stream_id))
            else:
                assert isinstance(ev, StreamAccepted | StreamWritable), ev

    while pending:
        for sid in list(pending):
            up_off, down_off = pending[sid]
            up, down = payloads[sid]
            n = rng.randrange(1, 20_000)
            if up_off <= len(up):
                pair.edge.send_data(sid, up[up_off : up_off + n], end_stream=up_off + n >= len(up))
                up_off += n if up_off + n < len(up) else len(up) + 1 - up_off
            if down_off <= len(down):
                chunk = down[down_off : down_off + n]
                pair.agent.send_data(sid, chunk, end_stream=down_off + n >= len(down))
                down_off += n if down_off + n < len(down) else len(down) + 1 - down_off
            if up_off > len(up) and down_off > len(down):
                del pending[sid]
            else:
                pending[sid] = (up_off, down_off)
        for _ in range(3):
            pair.step(pair.edge, limit=rng.choice([None, 100_000]))
            pair.step(pair.agent, limit=rng.choice([None, 100_000]))
            drain(pair.edge, "edge")
            drain(pair.agent, "agent")
    for _ in range(1000):
        pair.pump()
        drain(pair.edge, "edge")
        drain(pair.agent, "agent")
        if not (pair.edge.has_data_to_send() or pair.agent.has_data_to_send()):
            break
    for sid, (up, down) in payloads.items():
        assert ("agent", sid) in ended and ("edge", sid) in ended
        got_up = b"".join(got.get(("agent", sid), []))
        got_down = b"".join(got.get(("edge", sid), []))
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert pair.edge.stream_count == pair.agent.stream_count == 0
    pair.assert_alive()


# --------------------------------------------------------------------------- flow control


def payload_bytes(events: list[object]) -> int:
    return sum(len(e.data) for e in events if isinstance(e, DataReceived))


def test_window_exhaustion_and_resume(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    blob = bytes(1024 * 1024)
    assert pair.edge.send_data(sid, blob) is True  # above high water
    pair.pump()
    assert payload_bytes(pair.take(pair.agent)) == INITIAL_STREAM_WINDOW
    assert pair.edge.stream_send_buffered(sid) == len(blob) - INITIAL_STREAM_WINDOW
    assert not pair.edge.has_data_to_send()
    assert pair.edge.data_to_send() == []
    # acknowledging less than half the window returns nothing yet (batching)
    pair.agent.acknowledge(sid, INITIAL_STREAM_WINDOW // 2 - 1)
    assert not pair.agent.has_data_to_send()
    pair.agent.acknowledge(sid, 1)
    assert pair.agent.has_data_to_send()
    pair.pump()
    assert payload_bytes(pair.take(pair.agent)) == INITIAL_STREAM_WINDOW // 2
    assert pair.agent.stream_receive_unacked(sid) == INITIAL_STREAM_WINDOW


def transfer(pair: SessionPair, sid: int, total: int, ack_lag: int = 0) -> list[int]:
    """Send ``total`` bytes edge->agent; the agent acknowledges all but ``ack_lag`` bytes.
    Returns the payload sizes of each burst the edge could send without new credit."""
    pair.edge.send_data(sid, bytes(total))
    bursts = []
    received = 0
    while received < total:
        bufs = pair.edge.data_to_send()
        data = flatten(bufs)
        assert data, "stalled"
        pair.agent.receive_data(data)
        n = payload_bytes(pair.agent.events_received())
        bursts.append(n)
        received += n
        ack = pair.agent.stream_receive_unacked(sid) - ack_lag
        if ack > 0:
            pair.agent.acknowledge(sid, ack)
        pair.edge.receive_data(flatten(pair.agent.data_to_send()))
        pair.edge.events_received()
    return bursts


def test_window_grows_to_max_for_fast_consumer(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    bursts = transfer(pair, sid, 40 * 1024 * 1024)
    assert bursts[0] == INITIAL_STREAM_WINDOW
    assert max(bursts) == DEFAULT_MAX_STREAM_WINDOW
    assert bursts[:5] == [INITIAL_STREAM_WINDOW << i for i in range(5)]
    pair.assert_alive()


def test_no_growth_when_consumer_lags(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    bursts = transfer(pair, sid, 4 * 1024 * 1024, ack_lag=1)
    assert max(bursts) <= INITIAL_STREAM_WINDOW


def test_no_credit_without_acknowledge(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    pair.edge.send_data(sid, bytes(4 * 1024 * 1024))
    for _ in range(3):
        pair.pump()
    assert payload_bytes(pair.take(pair.agent)) == INITIAL_STREAM_WINDOW


def test_unread_streams_do_not_strand_session_credit(pair: SessionPair) -> None:
    """Issue 7 row 1: streams whose reader stopped hold their own credit, never the session's.

    More streams than the session window can cover each send a full stream window that nobody
    acknowledges; every byte still arrives (session credit comes back on delivery), and a stream
    opened afterwards is not starved."""
    n_streams = INITIAL_SESSION_WINDOW // INITIAL_STREAM_WINDOW + 4
    sids = [pair.edge.open_stream(8000) for _ in range(n_streams)]
    for sid in sids:
        pair.edge.send_data(sid, bytes(INITIAL_STREAM_WINDOW))
    for _ in range(4):
        pair.pump()
    events = pair.take(pair.agent)
    assert payload_bytes(events) == n_streams * INITIAL_STREAM_WINDOW
    assert all(pair.edge.stream_send_buffered(sid) == 0 for sid in sids)
    # each stalled stream is out of stream credit: more data for it waits at the sender
    pair.edge.send_data(sids[0], b"more")
    pair.pump()
    assert payload_bytes(pair.take(pair.agent)) == 0
    assert pair.edge.stream_send_buffered(sids[0]) == 4
    # ... while a new stream flows at once
    late = open_accepted(pair)
    pair.edge.send_data(late, bytes(1000))
    pair.pump()
    assert payload_bytes(pair.take(pair.agent)) == 1000
    pair.assert_alive()


def test_window_growth_is_capped_per_session() -> None:
    """Grown stream windows cannot be taken back, so their total is bounded per session."""
    budget = 3 * INITIAL_STREAM_WINDOW
    cfg = SessionConfig(stream_growth_budget=budget)
    pair = SessionPair(cfg, cfg)
    sids = [open_accepted(pair) for _ in range(4)]
    grown = []
    for sid in sids:  # the reader keeps up: the window doubles while the budget lasts
        transfer(pair, sid, 24 * 1024 * 1024)
        grown.append(pair.agent._streams[sid].recv_size - INITIAL_STREAM_WINDOW)
    assert sum(grown) == budget  # the first streams took the budget, the others stayed small
    assert grown[0] > 0 and grown[-1] == 0
    # a finished stream gives its growth back
    pair.agent.reset_stream(sids[0], ResetCode.CANCEL)
    pair.pump()
    assert pair.agent._grown == budget - grown[0]
    pair.assert_alive()


def test_fairness_small_write_not_stuck_behind_bulk(pair: SessionPair) -> None:
    bulk = open_accepted(pair)
    small = open_accepted(pair)
    pair.edge.send_data(bulk, memoryview(bytes(100 * 1024 * 1024)))
    pair.edge.send_data(small, b"s" * 100)
    first = frames_of(flatten(pair.edge.data_to_send(limit=MAX_FRAME_PAYLOAD)))
    second = frames_of(flatten(pair.edge.data_to_send(limit=MAX_FRAME_PAYLOAD)))
    assert [(f[2], f[3]) for f in first] == [(bulk, MAX_FRAME_PAYLOAD)]
    assert (second[0][2], second[0][3]) == (small, 100)  # B first, A's next frame after


def test_data_to_send_payloads_are_views_not_copies(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    buf = bytearray(b"a" * 100_000)
    pair.edge.send_data(sid, buf)
    pair.edge.send_data(sid, b"tail")
    out = pair.edge.data_to_send()
    views = [b for b in out if isinstance(b, memoryview)]
    assert views and all(v.obj is buf or v.obj == b"tail" for v in views)
    headers = [b for b in out if isinstance(b, bytes)]
    assert all(len(h) == 12 for h in headers)
    assert sum(len(v) for v in views) == 100_004


def test_stream_writable_after_high_water(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    assert pair.edge.send_data(sid, bytes(400 * 1024)) is True
    pair.pump()
    assert pair.take(pair.edge) == []  # 144 KiB still queued: above low water
    pair.agent.acknowledge(sid, pair.agent.stream_receive_unacked(sid))
    pair.pump()
    assert StreamWritable(sid) in pair.take(pair.edge)


def test_stream_writable_waits_for_low_water() -> None:
    cfg = SessionConfig(stream_send_high_water=1000, stream_send_low_water=10)
    pair = SessionPair(cfg, cfg)
    sid = open_accepted(pair)
    assert pair.edge.send_data(sid, b"x" * 600) is False
    assert pair.edge.send_data(sid, b"x" * 600) is True
    pair.edge.data_to_send(limit=1100)
    assert pair.edge.events_received() == []
    pair.edge.data_to_send(limit=100)
    assert pair.edge.events_received() == [StreamWritable(sid)]


def test_data_on_reset_stream_returns_session_credit() -> None:
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()))
    edge.accept_stream(1)
    edge.reset_stream(1, ResetCode.CANCEL)
    edge.data_to_send()
    edge.events_received()
    # the peer had 256 KiB in flight; it still counts, and comes back as session credit
    for _ in range(INITIAL_STREAM_WINDOW // MAX_FRAME_PAYLOAD):
        edge.receive_data(encode_frame(DATA, 0, 1, bytes(MAX_FRAME_PAYLOAD)))
    assert edge.events_received() == []
    assert not edge.closed and not edge.has_data_to_send()
    # session credit is returned once half the session window is unreturned
    frames: list[tuple[int, int, int, int, bytes]] = []
    for _ in range(INITIAL_SESSION_WINDOW // 2 // MAX_FRAME_PAYLOAD):
        edge.receive_data(encode_frame(DATA, 0, 1, bytes(MAX_FRAME_PAYLOAD)))
        frames += sent_frames(edge)
    assert frames == [(WU, 0, 0, INITIAL_SESSION_WINDOW // 2, b"")]
    assert not edge.closed


def test_closing_stream_returns_unacknowledged_session_credit(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    for _ in range(40):  # 40 streams x 256 KiB > half the session window, never acknowledged
        s = open_accepted(pair)
        pair.edge.send_data(s, bytes(INITIAL_STREAM_WINDOW))
        pair.pump()
        pair.agent.reset_stream(s, ResetCode.CANCEL)
        pair.pump()
    pair.take(pair.agent)
    pair.take(pair.edge)
    pair.edge.send_data(sid, bytes(INITIAL_STREAM_WINDOW))
    pair.pump()
    assert payload_bytes(pair.take(pair.agent)) == INITIAL_STREAM_WINDOW


def test_window_update_on_session_and_overflow() -> None:
    agent = raw_agent()
    agent.receive_data(encode_frame(WU, 0, 0, length=2**31 - INITIAL_SESSION_WINDOW - 1))
    assert not agent.closed
    agent.receive_data(encode_frame(WU, 0, 0, length=1))
    assert_protocol_error(agent, GoAwayCode.FLOW_CONTROL_ERROR)


def test_stream_window_overflow() -> None:
    agent = raw_agent()
    sid = agent.open_stream(9000)
    agent.receive_data(encode_frame(WU, ACK, sid, length=2**31 - 1))
    assert_protocol_error(agent, GoAwayCode.FLOW_CONTROL_ERROR)


# --------------------------------------------------------------------------- keepalive


def test_ping_pong_rtt(pair: SessionPair) -> None:
    pair.edge.ping(1.0)
    pair.step(pair.edge, now=1.1)
    pair.step(pair.agent, now=1.25)
    assert pair.take(pair.edge) == [PingAcknowledged(pytest.approx(0.25))]  # type: ignore[arg-type]
    pair.edge.receive_data(encode_frame(PING, ACK, 0, length=999))  # unknown value: ignored
    assert pair.edge.events_received() == []


def test_outstanding_pings_are_bounded(pair: SessionPair) -> None:
    for i in range(40):
        pair.agent.ping(float(i))
    pair.pump(now=100.0)
    acks = pair.take(pair.agent)
    assert len(acks) == 16 and all(isinstance(e, PingAcknowledged) for e in acks)


def test_keepalive_and_dead_peer_timeout() -> None:
    pair = SessionPair()
    edge = pair.edge
    assert edge.get_timer() == 10.0  # the next PING (handshake was at t=0)
    edge.handle_timer(5.0)  # early wake-up: nothing
    assert not edge.has_data_to_send()
    edge.handle_timer(10.0)
    assert frames_of(flatten(edge.data_to_send())) == [(PING, 0, 0, 1, b"")]
    assert edge.get_timer() == 15.0  # dead deadline comes before the next ping at 20
    edge.handle_timer(15.0)
    term = terminated(edge.events_received())
    assert term.code == GoAwayCode.TIMEOUT and not term.remote
    assert frames_of(flatten(edge.data_to_send()))[-1] == (GO_AWAY, 0, 0, GoAwayCode.TIMEOUT, b"")
    assert edge.get_timer() is None
    edge.handle_timer(100.0)
    edge.receive_data(b"anything")
    assert edge.events_received() == []


def test_live_peer_is_kept_alive() -> None:
    pair = SessionPair()
    now = 0.0
    for _ in range(20):
        for side in (pair.edge, pair.agent):
            timer = side.get_timer()
            assert timer is not None
            now = max(now, min(timer, now + 10))
        for side in (pair.edge, pair.agent):
            side.handle_timer(now)
        pair.pump(now=now + 0.05)
    pair.assert_alive()
    rtts = [e for e in pair.take(pair.edge) if isinstance(e, PingAcknowledged)]
    assert rtts


def test_handshake_timeout() -> None:
    edge = Session(Role.EDGE, now=100.0)
    assert edge.get_timer() == 115.0
    edge.handle_timer(115.0)
    assert terminated(edge.events_received()).code == GoAwayCode.TIMEOUT


# --------------------------------------------------------------------------- go away


def test_goaway_drain(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    pair.edge.close()
    pair.edge.close()  # idempotent
    with pytest.raises(LocalProtocolError):
        pair.edge.open_stream(8000)
    pair.pump()
    assert pair.take(pair.agent) == [GoAwayReceived(GoAwayCode.NORMAL)]
    with pytest.raises(LocalProtocolError):
        pair.agent.open_stream(8000)
    # the existing stream still works both ways
    pair.agent.send_data(sid, b"still here", end_stream=True)
    pair.edge.send_data(sid, b"bye")
    pair.pump()
    assert pair.take(pair.edge) == [DataReceived(sid, b"still here", True)]
    assert not pair.edge.closed
    pair.edge.end_stream(sid)
    pair.pump()
    agent_events = pair.take(pair.agent)
    assert agent_events[:2] == [DataReceived(sid, b"bye", False), DataReceived(sid, b"", True)]
    assert terminated(agent_events) == ConnectionTerminated(
        GoAwayCode.NORMAL, "peer sent GO_AWAY", True
    )
    assert terminated(pair.take(pair.edge)).remote is False
    assert pair.edge.closed and pair.agent.closed
    with pytest.raises(LocalProtocolError):
        pair.edge.send_control(control.Ok(id=1))


def test_syn_refused_while_going_away() -> None:
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()))
    edge.close(GoAwayCode.SHUTTING_DOWN)
    edge.data_to_send()
    edge.receive_data(encode_frame(DATA, SYN, 3, meta()))
    assert [type(e) for e in edge.events_received()] == [StreamOpened]
    assert sent_frames(edge) == [(WU, RST, 3, ResetCode.REFUSED_STREAM, b"")]
    # DATA for the refused stream is dropped quietly
    edge.receive_data(encode_frame(DATA, 0, 3, b"abc"))
    assert edge.events_received() == [] and not edge.closed


def test_ping_flood_ends_the_session() -> None:
    """Each PING costs a reply: a burst of 100 is answered, a flood ends the session; pings
    at an honest pace never do."""
    edge = raw_edge()
    for i in range(100):
        edge.receive_data(encode_frame(PING, 0, 0, length=i), now=0.0)
    assert len(sent_frames(edge)) == 100 and not edge.closed
    for i in range(50):  # 10 per second refill: one every 0.15 s is fine forever
        edge.receive_data(encode_frame(PING, 0, 0, length=i), now=0.15 * (i + 1))
    assert not edge.closed
    edge.receive_data(b"".join(encode_frame(PING, 0, 0, length=i) for i in range(200)), now=8.0)
    assert_protocol_error(edge, GoAwayCode.TOO_MANY_REQUESTS)


def test_syn_is_a_protocol_error_where_streams_are_not_accepted() -> None:
    """The edge takes no streams from agents: a SYN ends the session instead of costing an RST
    reply each (a hostile agent flooding SYNs would make the edge write without reading)."""
    edge = raw_edge(SessionConfig(accept_remote_streams=False))
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()) + encode_frame(DATA, SYN, 3, meta()))
    assert_protocol_error(edge, GoAwayCode.PROTOCOL_ERROR)
    assert edge.error is not None and "may not open streams" in str(edge.error)


def test_syn_refused_beyond_max_streams() -> None:
    edge = raw_edge(SessionConfig(max_streams=2))
    for sid in (1, 3, 5):
        edge.receive_data(encode_frame(DATA, SYN, sid, meta()))
    assert [e.stream_id for e in edge.events_received()] == [1, 3]  # type: ignore[attr-defined]
    assert sent_frames(edge) == [(WU, RST, 5, ResetCode.REFUSED_STREAM, b"")]
    with pytest.raises(LocalProtocolError):
        edge.open_stream(8000)


def test_peer_goaway_with_error_code_terminates_at_once(pair: SessionPair) -> None:
    open_accepted(pair)
    pair.agent.receive_data(encode_frame(GO_AWAY, length=GoAwayCode.REPLACED))
    assert pair.agent.events_received() == [GoAwayReceived(GoAwayCode.REPLACED)]  # drains
    pair.edge.receive_data(encode_frame(GO_AWAY, length=GoAwayCode.PROTOCOL_ERROR))
    events = pair.edge.events_received()
    assert events[0] == GoAwayReceived(GoAwayCode.PROTOCOL_ERROR)
    assert terminated(events).remote is True and pair.edge.stream_count == 0


def test_unknown_codes_are_mapped() -> None:
    agent = raw_agent()
    sid = agent.open_stream(9000)
    agent.receive_data(encode_frame(WU, RST, sid, length=77))
    assert agent.events_received() == [StreamReset(sid, ResetCode.INTERNAL, True)]
    agent.receive_data(encode_frame(GO_AWAY, length=77))
    assert agent.events_received()[0] == GoAwayReceived(GoAwayCode.INTERNAL_ERROR)
    agent.receive_data(encode_frame(GO_AWAY, length=0))  # after termination: ignored
    assert agent.events_received() == []


def test_second_goaway_is_ignored(pair: SessionPair) -> None:
    open_accepted(pair)
    pair.agent.receive_data(encode_frame(GO_AWAY, length=0) + encode_frame(GO_AWAY, length=7))
    assert pair.agent.events_received() == [GoAwayReceived(GoAwayCode.NORMAL)]


# --------------------------------------------------------------------------- peer errors


HELLO_FRAME = ctrl_frame(HELLO)


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"GET / HTTP/1.1\r\n", GoAwayCode.PROTOCOL_ERROR),  # bad preface
        (b"TUNL\r\n\x02\n", GoAwayCode.UNSUPPORTED_VERSION),
        (b"TUNL\r\n\x01X", GoAwayCode.PROTOCOL_ERROR),
        (PREFACE + b"\x02" + HELLO_FRAME[1:], GoAwayCode.PROTOCOL_ERROR),  # bad frame version
        (PREFACE + encode_frame(9), GoAwayCode.PROTOCOL_ERROR),  # unknown type
        (PREFACE + encode_frame(CONTROL, length=64 * 1024 + 1), GoAwayCode.FRAME_TOO_LARGE),
        (PREFACE + encode_frame(DATA, SYN, 1, meta()), GoAwayCode.PROTOCOL_ERROR),  # not hello
        (PREFACE + encode_frame(PING, length=1), GoAwayCode.PROTOCOL_ERROR),  # not hello
        (PREFACE + ctrl_frame(WELCOME), GoAwayCode.PROTOCOL_ERROR),  # wrong message
        (PREFACE + encode_frame(CONTROL, 0, 0, b"{nope"), GoAwayCode.PROTOCOL_ERROR),
        (PREFACE + encode_frame(CONTROL, 0, 1, HELLO_FRAME[12:]), GoAwayCode.PROTOCOL_ERROR),
    ],
)
def test_edge_handshake_errors(wire: bytes, code: GoAwayCode) -> None:
    edge = Session(Role.EDGE)
    edge.receive_data(wire)
    assert_protocol_error(edge, code)


def test_bad_preface_detected_byte_by_byte() -> None:
    edge = Session(Role.EDGE)
    for b in b"TUNL\r\n":
        edge.receive_data(bytes([b]))
        assert not edge.closed
    edge.receive_data(b"\x05")
    assert_protocol_error(edge, GoAwayCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize(
    "wire",
    [
        encode_frame(DATA, SYN, 1, meta()),
        ctrl_frame(HELLO),
        encode_frame(WU, 0, 0, length=5),
    ],
)
def test_agent_first_frame_must_be_welcome(wire: bytes) -> None:
    agent = Session(Role.AGENT)
    agent.send_control(HELLO)
    agent.data_to_send()
    agent.receive_data(wire)
    assert_protocol_error(agent, GoAwayCode.PROTOCOL_ERROR)


FIVE_K = b"x" * 5000


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (encode_frame(DATA, 0, 1, b"abc"), GoAwayCode.PROTOCOL_ERROR),  # never-opened stream
        (encode_frame(DATA, 0, 0, b"abc"), GoAwayCode.PROTOCOL_ERROR),  # stream 0
        (encode_frame(DATA, 0, 2, b"abc"), GoAwayCode.PROTOCOL_ERROR),  # our parity, never opened
        (encode_frame(DATA, SYN, 2, meta()), GoAwayCode.PROTOCOL_ERROR),  # our parity
        (encode_frame(DATA, SYN, 0, meta()), GoAwayCode.PROTOCOL_ERROR),
        (encode_frame(DATA, SYN, 1, b"not json"), GoAwayCode.PROTOCOL_ERROR),
        (encode_frame(DATA, SYN, 1, b"[1]"), GoAwayCode.PROTOCOL_ERROR),
        (encode_frame(DATA, SYN, 1, meta(port=0)), GoAwayCode.PROTOCOL_ERROR),
        (encode_frame(DATA, SYN, 1, meta(via="x")), GoAwayCode.PROTOCOL_ERROR),
        (
            encode_frame(DATA, SYN, 1, b'{"port":1,"via":"direct","client":1}'),
            GoAwayCode.PROTOCOL_ERROR,
        ),
        (encode_frame(DATA, SYN, 1, b'{"port":true,"via":"direct"}'), GoAwayCode.PROTOCOL_ERROR),
        (encode_frame(DATA, SYN, 1, meta(client=FIVE_K.decode())), GoAwayCode.PROTOCOL_ERROR),
        (encode_frame(DATA, 0, 1, length=64 * 1024 + 1), GoAwayCode.FRAME_TOO_LARGE),
        (encode_frame(DATA, ACK, 1, b""), GoAwayCode.PROTOCOL_ERROR),  # flag not allowed
        (encode_frame(WU, FIN, 0, length=1), GoAwayCode.PROTOCOL_ERROR),
        (encode_frame(WU, ACK, 0, length=1), GoAwayCode.PROTOCOL_ERROR),  # ACK on stream 0
        (encode_frame(WU, 0, 7, length=1), GoAwayCode.PROTOCOL_ERROR),  # never-opened
        (encode_frame(PING, 0, 1, length=1), GoAwayCode.PROTOCOL_ERROR),
        (encode_frame(GO_AWAY, 0, 1), GoAwayCode.PROTOCOL_ERROR),
        (encode_frame(CONTROL, 0, 1, b"{}"), GoAwayCode.PROTOCOL_ERROR),
        (ctrl_frame(HELLO), GoAwayCode.PROTOCOL_ERROR),  # hello twice
        (encode_frame(CONTROL, 0, 0, b'{"type":"nope"}'), GoAwayCode.PROTOCOL_ERROR),
    ],
)
def test_session_protocol_errors(wire: bytes, code: GoAwayCode) -> None:
    edge = raw_edge()
    edge.receive_data(wire)
    assert_protocol_error(edge, code)


def test_flow_control_violation_on_stream() -> None:
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()))
    for _ in range(INITIAL_STREAM_WINDOW // MAX_FRAME_PAYLOAD):
        edge.receive_data(encode_frame(DATA, 0, 1, bytes(MAX_FRAME_PAYLOAD)))
    assert not edge.closed
    edge.receive_data(encode_frame(DATA, 0, 1, b"!"))
    assert_protocol_error(edge, GoAwayCode.FLOW_CONTROL_ERROR)


def test_flow_control_violation_on_session() -> None:
    """Session credit comes back as bytes are delivered, so an honest peer never runs out; a
    peer with more in flight than the session still grants is a FLOW_CONTROL_ERROR all the
    same (the remaining credit is forced low here: streaming alone never gets it there)."""
    edge = raw_edge()
    chunk = bytes(MAX_FRAME_PAYLOAD)
    sid = 1
    sent = 0
    while sent < 2 * INITIAL_SESSION_WINDOW:  # twice the window, nothing acknowledged
        edge.receive_data(encode_frame(DATA, SYN, sid, meta()))
        for _ in range(INITIAL_STREAM_WINDOW // MAX_FRAME_PAYLOAD):
            edge.receive_data(encode_frame(DATA, 0, sid, chunk))
            sent += len(chunk)
        sid += 2
    edge.events_received()
    assert not edge.closed
    edge._recv_avail = 10
    edge.receive_data(encode_frame(DATA, SYN, sid, meta()) + encode_frame(DATA, 0, sid, bytes(11)))
    assert_protocol_error(edge, GoAwayCode.FLOW_CONTROL_ERROR)


def test_stream_ids_must_increase() -> None:
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 5, meta()))
    edge.receive_data(encode_frame(DATA, SYN, 3, meta()))
    assert_protocol_error(edge, GoAwayCode.PROTOCOL_ERROR)


def test_syn_before_our_handshake_is_an_error() -> None:
    edge = Session(Role.EDGE)
    edge.receive_data(PREFACE + ctrl_frame(HELLO) + encode_frame(DATA, SYN, 1, meta()))
    events = edge.events_received()
    assert isinstance(events[0], ControlReceived)
    assert terminated(events).code == GoAwayCode.PROTOCOL_ERROR


def test_ack_on_peer_opened_stream_is_an_error() -> None:
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()) + encode_frame(WU, ACK, 1))
    edge.events_received()
    assert edge.closed and edge.error is not None


def test_data_after_peer_fin_resets_only_that_stream() -> None:
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN | FIN, 1, meta()))
    edge.receive_data(encode_frame(DATA, SYN, 3, meta()))
    assert [type(e) for e in edge.events_received()] == [StreamOpened, DataReceived, StreamOpened]
    edge.receive_data(encode_frame(DATA, 0, 1, b"late"))
    assert edge.events_received() == [StreamReset(1, ResetCode.STREAM_CLOSED, False)]
    assert sent_frames(edge) == [(WU, RST, 1, ResetCode.STREAM_CLOSED, b"")]
    edge.receive_data(encode_frame(DATA, 0, 3, b"ok"))
    assert edge.events_received() == [DataReceived(3, b"ok", False)]
    assert not edge.closed and edge.stream_count == 1


def test_window_update_for_gone_stream_is_ignored() -> None:
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()))
    edge.reset_stream(1, ResetCode.CANCEL)
    edge.receive_data(encode_frame(WU, 0, 1, length=100) + encode_frame(WU, RST, 1))
    assert not edge.closed


def test_empty_data_frame_and_duplicate_ack_are_harmless() -> None:
    agent = raw_agent()
    sid = agent.open_stream(9000)
    agent.receive_data(encode_frame(WU, ACK, sid) + encode_frame(WU, ACK, sid))
    agent.receive_data(encode_frame(DATA, 0, sid, b""))
    assert agent.events_received() == [StreamAccepted(sid)]
    agent.receive_data(b"")
    assert not agent.closed


def test_internal_error_path(monkeypatch: pytest.MonkeyPatch) -> None:
    edge = raw_edge()

    def boom(frame: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(edge, "_handlers", (boom,) * 5)
    edge.receive_data(encode_frame(PING, 0, 0, length=1))
    assert terminated(edge.events_received()).code == GoAwayCode.INTERNAL_ERROR
    assert isinstance(edge.error, ProtocolError) and isinstance(edge.error.__cause__, KeyError)


# --------------------------------------------------------------------------- local misuse


def snapshot(s: Session) -> tuple[object, ...]:
    return (
        s.stream_count,
        s.closed,
        s.has_data_to_send(),
        tuple(s.stream_send_buffered(i) for i in range(1, 8)),
        s.get_timer(),
    )


def test_local_protocol_errors_leave_state_unchanged(pair: SessionPair) -> None:
    edge, agent = pair.edge, pair.agent
    sid = open_accepted(pair)
    other = edge.open_stream(8000)  # not yet accepted by the agent
    pair.pump()
    edge.send_data(sid, b"abc", end_stream=True)
    before_edge, before_agent = snapshot(edge), snapshot(agent)
    cases = [
        lambda: edge.send_data(99, b"x"),
        lambda: edge.send_data(sid, b"x"),  # after end_stream
        lambda: edge.end_stream(sid),
        lambda: edge.accept_stream(sid),  # we opened it
        lambda: agent.accept_stream(sid),  # twice
        lambda: agent.accept_stream(77),
        lambda: agent.send_data(other, b"x"),  # not accepted yet
        lambda: agent.acknowledge(sid, 1),  # nothing received yet on this side
        lambda: agent.acknowledge(99, 1),
        lambda: agent.acknowledge(sid, -1),
        lambda: edge.reset_stream(99, ResetCode.CANCEL),
        lambda: edge.open_stream(0),
        lambda: edge.open_stream(70000),
        lambda: edge.open_stream(8000, via="carrier-pigeon"),
        lambda: edge.open_stream(8000, client=5),  # type: ignore[arg-type]
        lambda: edge.open_stream(8000, client="x" * 5000),
        lambda: edge.open_stream(8000, client="\ud800"),
        lambda: edge.send_control(WELCOME),  # twice
        lambda: agent.send_control(HELLO),  # twice
        lambda: agent.send_control(control.Ok(id=-1)),  # does not encode
    ]
    for case in cases:
        with pytest.raises(LocalProtocolError):
            case()
        assert snapshot(edge) == before_edge
        assert snapshot(agent) == before_agent
    assert edge.events_received() == [] and agent.events_received() == []
    pair.assert_alive()


def test_commands_before_handshake_raise() -> None:
    agent = Session(Role.AGENT)
    edge = Session(Role.EDGE)
    for case in [
        lambda: agent.open_stream(8000),
        lambda: agent.ping(0.0),
        lambda: agent.send_control(control.Ok(id=1)),
        lambda: edge.send_control(control.Ok(id=1)),
        lambda: edge.send_control(WELCOME),  # before the Hello
        lambda: edge.accept_stream(1),
    ]:
        with pytest.raises(LocalProtocolError):
            case()
    assert agent.data_to_send() == [PREFACE]
    assert edge.data_to_send() == []
    agent.send_control(HELLO)
    with pytest.raises(LocalProtocolError):
        agent.open_stream(8000)  # the Welcome has not arrived
    assert agent.get_timer() == 15.0  # no keepalive before the handshake is done


def test_edge_may_send_error_before_hello() -> None:
    edge = Session(Role.EDGE)
    edge.send_control(control.Error(code="SHUTTING_DOWN", message="try later"))
    edge.close(GoAwayCode.SHUTTING_DOWN)
    assert edge.closed
    frames = frames_of(flatten(edge.data_to_send()))
    assert [f[0] for f in frames] == [CONTROL, GO_AWAY]


def test_stream_ids_exhausted() -> None:
    agent = raw_agent()
    agent._next_local_id = 2**32 + 1  # type: ignore[attr-defined]  # white-box: skip 2^31 opens
    with pytest.raises(LocalProtocolError):
        agent.open_stream(8000)


def test_send_data_after_termination_raises(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    pair.edge.receive_data(b"\xff" * 12)
    assert pair.edge.closed
    with pytest.raises(StreamClosedError):
        pair.edge.send_data(sid, b"x")
    pair.edge.acknowledge(sid, 1)  # no-ops after termination
    pair.edge.reset_stream(sid, ResetCode.CANCEL)
    pair.edge.close()
    assert pair.edge.stream_receive_unacked(sid) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_stream_window": 1024},
        {"session_window": 1024},
        {"max_streams": 0},
        {"heartbeat_interval": 0},
        {"dead_timeout": -1},
        {"stream_send_low_water": 10, "stream_send_high_water": 5},
    ],
)
def test_config_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SessionConfig(**kwargs)


def test_send_data_accepts_wide_memoryviews(pair: SessionPair) -> None:
    import array

    sid = open_accepted(pair)
    arr = array.array("I", [1, 2, 3])
    pair.edge.send_data(sid, memoryview(arr))
    pair.pump()
    assert pair.take(pair.agent) == [DataReceived(sid, arr.tobytes(), False)]


# --------------------------------------------------------------------------- corners


def test_more_data_on_a_window_blocked_stream(pair: SessionPair) -> None:
    sid = open_accepted(pair)
    other = open_accepted(pair)
    pair.edge.send_data(sid, bytes(INITIAL_STREAM_WINDOW))
    pair.pump()
    pair.edge.send_data(sid, b"more")  # no credit: scheduled, then parked by data_to_send
    pair.edge.send_data(other, b"x")
    pair.edge.reset_stream(other, ResetCode.CANCEL)  # gone but still in the round-robin
    assert pair.edge.has_data_to_send() is True  # the RST
    pair.edge.data_to_send()
    assert pair.edge.has_data_to_send() is False
    assert pair.edge.data_to_send() == []
    assert pair.edge.stream_send_buffered(sid) == 4
    pair.agent.acknowledge(sid, 0)
    pair.agent.acknowledge(sid, INITIAL_STREAM_WINDOW)
    pair.pump()
    assert pair.edge.stream_send_buffered(sid) == 0


def test_empty_frames_on_gone_and_finished_streams() -> None:
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()) + encode_frame(DATA, SYN | FIN, 3, meta()))
    edge.reset_stream(1, ResetCode.CANCEL)
    edge.receive_data(encode_frame(DATA, 0, 1, b""))  # gone: dropped
    edge.receive_data(encode_frame(DATA, 0, 3, b""))  # after FIN: still a stream fault
    assert edge.events_received()[-1] == StreamReset(3, ResetCode.STREAM_CLOSED, False)
    assert not edge.closed


def test_timer_and_errors_after_termination() -> None:
    edge = Session(Role.EDGE)
    edge.receive_data(b"x")
    assert edge.closed
    edge.handle_timer(1e9)
    edge.close()
    with pytest.raises(LocalProtocolError):
        edge.ping(1.0)
    assert [type(e) for e in edge.events_received()] == [ConnectionTerminated]


def test_close_with_open_streams_waits() -> None:
    pair = SessionPair()
    sid = open_accepted(pair)
    pair.agent.close()
    assert not pair.agent.closed
    pair.agent.reset_stream(sid, ResetCode.CANCEL)
    assert pair.agent.closed


def test_peer_reset_of_a_stream_with_queued_data() -> None:
    agent = raw_agent()
    sid = agent.open_stream(9000)
    agent.send_data(sid, b"queued")
    agent.data_to_send(limit=0)  # the SYN goes, the data waits
    agent.receive_data(encode_frame(WU, RST, sid, length=ResetCode.PORT_NOT_ALLOWED))
    assert agent.events_received() == [StreamReset(sid, ResetCode.PORT_NOT_ALLOWED, True)]
    assert agent.has_data_to_send() is False
    assert agent.data_to_send() == []


def test_every_state_change_goes_through_the_table(pair: SessionPair) -> None:
    """A (state, event) pair missing from protocol/_state.py is a LocalProtocolError (a bug in
    the caller), never a KeyError; RST from any live state is in the table."""
    from protocol._state import TRANSITIONS, StreamEvent, StreamState

    assert all((state, StreamEvent.RESET) in TRANSITIONS for state in StreamState)
    sid = open_accepted(pair)
    pair.edge.end_stream(sid)
    stream = pair.edge._streams[sid]
    assert stream.state is StreamState.HALF_CLOSED_LOCAL
    with pytest.raises(LocalProtocolError, match="send FIN in state half-closed"):
        pair.edge._transition(stream, StreamEvent.SEND_FIN)
    assert stream.state is StreamState.HALF_CLOSED_LOCAL  # unchanged
    pair.edge.reset_stream(sid, ResetCode.CANCEL)
    assert stream.state is StreamState.CLOSED and sid not in pair.edge._streams


def test_set_keepalive_changes_the_pace_mid_session(pair: SessionPair) -> None:
    """The agent adopts the edge's heartbeat from the welcome: the next PING comes sooner."""
    agent = pair.agent  # the pair's clock is at 0: the default PING is due at 10 s
    assert agent.get_timer() == HEARTBEAT_INTERVAL
    agent.set_keepalive(0.5, 20.0)
    assert agent.get_timer() == 0.5
    agent.handle_timer(0.5)
    assert frames_of(flatten(agent.data_to_send()))[-1][0] == PING
    # the dead timeout follows too: silent for 15 s is not dead any more, 20 s is
    agent.handle_timer(15.0)
    assert not agent.closed
    agent.handle_timer(20.0)
    assert_protocol_error(agent, GoAwayCode.TIMEOUT)
    with pytest.raises(LocalProtocolError):
        pair.edge.set_keepalive(0, 1)
