"""Session edges the mutation run (``make mutation``, docs/testing.md) found unpinned.

Boundaries of the configuration and of stream-open metadata, a stream opened and ended in one
frame, a reused stream id, and ``has_data_to_send`` (the relay's flush loop trusts it). Raw frames
stand in for a peer where the real session would never send them.
"""

from __future__ import annotations

import orjson
import pytest

from protocol.errors import GoAwayCode, LocalProtocolError
from protocol.events import ConnectionTerminated, DataReceived, StreamOpened
from protocol.frames import (
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_WINDOW,
    Flag,
    FrameType,
    encode_frame,
    pack_header,
)
from protocol.session import SessionConfig
from tests.protocol.conftest import SessionPair


@pytest.mark.parametrize(
    "fields",
    [
        {"max_stream_window": INITIAL_STREAM_WINDOW},
        {"max_stream_window": MAX_WINDOW},
        {"session_window": MAX_WINDOW},
        {"max_streams": 1},
        {"heartbeat_interval": 0.5, "dead_timeout": 0.5},
        {"stream_send_low_water": 0},
        {"stream_send_low_water": 4096, "stream_send_high_water": 4096},
    ],
)
def test_config_accepts_its_boundaries(fields: dict[str, float]) -> None:
    SessionConfig(**fields)  # type: ignore[arg-type]


def test_config_accepts_a_zero_growth_budget() -> None:
    assert SessionConfig(stream_growth_budget=0).stream_growth_budget == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"max_stream_window": INITIAL_STREAM_WINDOW - 1},
        {"max_stream_window": MAX_WINDOW + 1},
        {"session_window": INITIAL_SESSION_WINDOW - 1},
        {"session_window": MAX_WINDOW + 1},
        {"max_streams": 0},
        {"heartbeat_interval": 0},
        {"dead_timeout": 0},
        {"stream_send_low_water": -1},
        {"stream_send_low_water": 4097, "stream_send_high_water": 4096},
    ],
)
def test_config_refuses_past_its_boundaries(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SessionConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [1, 65535])
def test_ports_at_both_ends_of_the_range_open_streams(port: int) -> None:
    pair = SessionPair()
    sid = pair.edge.open_stream(port)
    pair.pump()
    opened = [e for e in pair.take(pair.agent) if isinstance(e, StreamOpened)]
    assert [(e.stream_id, e.port) for e in opened] == [(sid, port)]


@pytest.mark.parametrize("port", [0, 65536])
def test_ports_outside_the_range_are_refused_locally(port: int) -> None:
    with pytest.raises(LocalProtocolError):
        SessionPair().edge.open_stream(port)


def _syn(stream_id: int, meta: dict[str, object], flags: int = 0) -> bytes:
    return encode_frame(FrameType.DATA, Flag.SYN | flags, stream_id, orjson.dumps(meta))


def _next_edge_stream_id(pair: SessionPair) -> tuple[int, int]:
    """An edge stream id in use, and the next one the edge would use (same parity)."""
    sid = pair.edge.open_stream(8000)
    pair.pump()
    pair.take(pair.agent)
    return sid, sid + 2


@pytest.mark.parametrize("port", [1, 65535])
def test_a_peer_may_open_ports_at_both_ends_of_the_range(port: int) -> None:
    pair = SessionPair()
    _, sid = _next_edge_stream_id(pair)
    pair.agent.receive_data(_syn(sid, {"port": port, "via": "preview"}))
    events = pair.agent.events_received()
    assert [(e.port, e.client) for e in events if isinstance(e, StreamOpened)] == [(port, "")]
    assert not pair.agent.closed  # a missing "client" is an empty one, not an error


def test_a_stream_opened_and_ended_in_one_frame_ends_at_once() -> None:
    pair = SessionPair()
    _, sid = _next_edge_stream_id(pair)
    pair.agent.receive_data(_syn(sid, {"port": 8000, "via": "preview"}, Flag.FIN))
    events = pair.agent.events_received()
    assert [type(e) for e in events] == [StreamOpened, DataReceived]
    end = events[1]
    assert isinstance(end, DataReceived)
    assert (end.stream_id, end.data, end.end_stream) == (sid, b"", True)


def test_reopening_the_latest_stream_id_is_a_protocol_error() -> None:
    pair = SessionPair()
    sid, _ = _next_edge_stream_id(pair)
    pair.agent.receive_data(_syn(sid, {"port": 8000, "via": "preview"}))
    ended = [e for e in pair.agent.events_received() if isinstance(e, ConnectionTerminated)]
    assert [e.code for e in ended] == [GoAwayCode.PROTOCOL_ERROR]


def test_has_data_to_send_follows_the_credit() -> None:
    pair = SessionPair()
    edge = pair.edge
    sid = edge.open_stream(8000)
    pair.pump()
    edge.send_data(sid, b"q" * (INITIAL_STREAM_WINDOW + 10))
    assert edge.has_data_to_send()  # queued, with stream and session credit
    edge.data_to_send()  # the whole initial window goes out; 10 bytes wait for credit
    assert not edge.has_data_to_send()  # queued, but no stream credit
    edge.receive_data(pack_header(FrameType.WINDOW_UPDATE, 0, sid, 1))
    assert edge.has_data_to_send()  # one byte of credit is enough to send something
    edge.data_to_send()
    assert not edge.has_data_to_send()  # 9 bytes, no credit
    edge.receive_data(pack_header(FrameType.WINDOW_UPDATE, 0, sid, 9))
    edge.data_to_send()
    assert not edge.has_data_to_send()  # nothing queued, no credit left
    edge.end_stream(sid)
    assert edge.has_data_to_send()  # a bare FIN needs no credit


@pytest.mark.parametrize("port", [0, 65536])
def test_a_peer_opening_a_port_outside_the_range_is_a_protocol_error(port: int) -> None:
    pair = SessionPair()
    _, sid = _next_edge_stream_id(pair)
    pair.agent.receive_data(_syn(sid, {"port": port, "via": "preview"}))
    ended = [e for e in pair.agent.events_received() if isinstance(e, ConnectionTerminated)]
    assert [e.code for e in ended] == [GoAwayCode.PROTOCOL_ERROR]
