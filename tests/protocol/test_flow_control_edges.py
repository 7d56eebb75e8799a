"""Flow-control paths the mutation run (``make mutation``, docs/testing.md) found unpinned.

Each test names the mutant it kills: a change to protocol/session.py that the rest of the suite
let through. No event loop: a session pair back to back, and raw frames injected where the peer
would have to misbehave.
"""

from __future__ import annotations

from protocol.errors import GoAwayCode
from protocol.events import ConnectionTerminated, DataReceived
from protocol.frames import (
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_WINDOW,
    Flag,
    FrameType,
    pack_header,
)
from tests.protocol.conftest import SessionPair, flatten, frames_of


def _accepted_stream(pair: SessionPair) -> int:
    sid = pair.edge.open_stream(8000)
    pair.pump()
    pair.agent.accept_stream(sid)
    pair.pump()
    pair.take(pair.edge)
    pair.take(pair.agent)
    return sid


def test_the_acceptor_is_paced_by_plain_window_updates() -> None:
    """The side that accepted a stream sends more than its window and gets plain (not ACK)
    WINDOW_UPDATEs for it. Kills ``if flags | _ACK`` in ``_on_window_update``, which took every
    update for an ACK and failed the session ("ACK for a stream the peer opened itself")."""
    pair = SessionPair()
    sid = _accepted_stream(pair)
    payload = bytes(range(256)) * (4 * INITIAL_STREAM_WINDOW // 256)
    pair.agent.send_data(sid, payload)
    got = bytearray()
    for _ in range(200):
        pair.pump()
        for event in pair.take(pair.edge):
            if isinstance(event, DataReceived):
                got += event.data
                pair.edge.acknowledge(sid, len(event.data))
        if len(got) == len(payload):
            break
    pair.assert_alive()
    assert got == payload


def test_a_stream_window_may_reach_max_window_but_not_pass_it() -> None:
    """Kills ``window >= MAX_WINDOW`` (a legal update to exactly MAX_WINDOW refused)."""
    pair = SessionPair()
    sid = _accepted_stream(pair)
    edge = pair.edge
    room = MAX_WINDOW - INITIAL_STREAM_WINDOW
    edge.receive_data(pack_header(FrameType.WINDOW_UPDATE, 0, sid, room), 0.0)
    assert not edge.closed, edge.error
    edge.receive_data(pack_header(FrameType.WINDOW_UPDATE, 0, sid, 1), 0.0)
    ended = [e for e in edge.events_received() if isinstance(e, ConnectionTerminated)]
    assert [e.code for e in ended] == [GoAwayCode.FLOW_CONTROL_ERROR]


def test_the_session_window_may_reach_max_window_but_not_pass_it() -> None:
    pair = SessionPair()
    edge = pair.edge
    room = MAX_WINDOW - INITIAL_SESSION_WINDOW
    edge.receive_data(pack_header(FrameType.WINDOW_UPDATE, 0, 0, room), 0.0)
    assert not edge.closed, edge.error
    edge.receive_data(pack_header(FrameType.WINDOW_UPDATE, 0, 0, 1), 0.0)
    ended = [e for e in edge.events_received() if isinstance(e, ConnectionTerminated)]
    assert [e.code for e in ended] == [GoAwayCode.FLOW_CONTROL_ERROR]


def test_a_window_update_for_an_idle_stream_sends_nothing() -> None:
    """Credit for a stream with nothing queued must not schedule it. Kills
    ``(st.queued or st.fin_pending) or not st.scheduled``, which emitted an empty DATA frame."""
    pair = SessionPair()
    sid = _accepted_stream(pair)
    edge = pair.edge
    edge.receive_data(pack_header(FrameType.WINDOW_UPDATE, 0, sid, 4096), 0.0)
    assert not edge.has_data_to_send()
    assert frames_of(flatten(edge.data_to_send())) == []
    # and a stream whose data waits for credit is scheduled by it, once
    edge.send_data(sid, b"y" * (INITIAL_STREAM_WINDOW + 4096 + 10))
    sent = frames_of(flatten(edge.data_to_send()))
    assert sum(f[3] for f in sent if f[0] == FrameType.DATA) == INITIAL_STREAM_WINDOW + 4096
    edge.receive_data(pack_header(FrameType.WINDOW_UPDATE, 0, sid, 10), 0.0)
    sent = frames_of(flatten(edge.data_to_send()))
    assert [(f[0], f[2], f[3]) for f in sent] == [(FrameType.DATA, sid, 10)]


def _many_streams_of_one_window(pair: SessionPair) -> tuple[list[int], int]:
    """Enough streams, each sending its whole initial window, to exceed the session window."""
    count = INITIAL_SESSION_WINDOW // INITIAL_STREAM_WINDOW + 6
    chunk = b"z" * INITIAL_STREAM_WINDOW
    sids = []
    for _ in range(count):
        sid = pair.edge.open_stream(8000)
        pair.edge.send_data(sid, chunk)
        sids.append(sid)
    return sids, count * INITIAL_STREAM_WINDOW


def test_the_session_window_bounds_all_streams_together() -> None:
    """A sender never puts more than its session credit on the wire, however many streams have
    stream credit: one batch, before any WINDOW_UPDATE can come back, carries at most the
    initial session window; the rest follows as credit returns. Kills ``min(queued,
    st.send_window, MAX_FRAME_PAYLOAD, budget)`` in ``data_to_send`` (session credit left out)."""
    pair = SessionPair()
    _sids, total = _many_streams_of_one_window(pair)
    assert total > INITIAL_SESSION_WINDOW
    first = flatten(pair.edge.data_to_send())
    frames = frames_of(first)
    in_flight = sum(f[3] for f in frames if f[0] == FrameType.DATA and not f[1] & Flag.SYN)
    assert in_flight <= INITIAL_SESSION_WINDOW
    pair.agent.receive_data(first)
    pair.pump()
    pair.assert_alive()
    delivered = sum(len(e.data) for e in pair.take(pair.agent) if isinstance(e, DataReceived))
    assert delivered == total
