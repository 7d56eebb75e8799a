"""Claims of docs/protocol.md that no other test checked, one test each (the doc cites them).

Driven with raw frames against one sans-IO session, or with a back-to-back pair, like
test_session.py.
"""

from __future__ import annotations

import orjson
import pytest

from protocol import control
from protocol.errors import GoAwayCode, ResetCode
from protocol.events import (
    ConnectionTerminated,
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    StreamOpened,
)
from protocol.frames import (
    INITIAL_STREAM_WINDOW,
    MAX_OPEN_METADATA,
    PREFACE,
    encode_frame,
)
from protocol.session import Role, Session
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

# --------------------------------------------------------------------------- frame header


def test_rst_on_stream_zero_is_a_protocol_error() -> None:
    """protocol.md, frame types: ACK/RST on stream 0 -> GO_AWAY(PROTOCOL_ERROR)."""
    edge = raw_edge()
    edge.receive_data(encode_frame(WU, RST, 0, length=ResetCode.CANCEL))
    term = terminated(edge.events_received())
    assert term.code == GoAwayCode.PROTOCOL_ERROR and not term.remote
    assert sent_frames(edge)[-1] == (GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR, b"")


def test_the_edge_sends_no_preface() -> None:
    """protocol.md, preface: the edge's first bytes are a frame (its handshake message)."""
    edge = Session(Role.EDGE)
    edge.receive_data(PREFACE + ctrl_frame(HELLO))
    edge.send_control(WELCOME)
    frames = frames_of(flatten(edge.data_to_send()))  # parses from byte 0: no preface
    assert frames[0][0] == CONTROL


def test_open_metadata_is_not_flow_controlled() -> None:
    """protocol.md, flow control: credit counts DATA payload bytes, not SYN metadata. After a
    SYN of the largest metadata the whole stream window is still there for data."""
    edge = raw_edge()
    big = meta(client="x" * (MAX_OPEN_METADATA - len(meta(client=""))))
    assert len(big) == MAX_OPEN_METADATA
    edge.receive_data(encode_frame(DATA, SYN, 1, big))
    edge.receive_data(encode_frame(DATA, 0, 1, bytes(INITIAL_STREAM_WINDOW // 4)) * 4)
    events = edge.events_received()
    assert isinstance(events[0], StreamOpened)
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == INITIAL_STREAM_WINDOW
    assert not edge.closed


def test_window_update_ack_may_carry_credit() -> None:
    """protocol.md, WINDOW_UPDATE: the ACK's delta may be 0, or carry credit too."""
    agent = raw_agent()
    sid = agent.open_stream(9000)
    agent.send_data(sid, bytes(INITIAL_STREAM_WINDOW + 100))
    payload = sum(len(f[4]) for f in sent_frames(agent) if f[0] == DATA and not f[1] & SYN)
    assert payload == INITIAL_STREAM_WINDOW  # the initial window, no more
    agent.receive_data(encode_frame(WU, ACK, sid, length=100))
    assert sum(len(f[4]) for f in sent_frames(agent) if f[0] == DATA) == 100


# --------------------------------------------------------------------------- handshake


def test_a_goaway_as_the_agents_first_frame_is_a_refusal_not_a_protocol_error() -> None:
    """protocol.md, handshake: a GO_AWAY instead of the hello is taken as the agent giving up
    (no GO_AWAY(PROTOCOL_ERROR) back); anything else but hello is a protocol error."""
    edge = Session(Role.EDGE)
    edge.receive_data(PREFACE + encode_frame(GO_AWAY, length=GoAwayCode.SHUTTING_DOWN))
    events = edge.events_received()
    assert events[0] == GoAwayReceived(GoAwayCode.SHUTTING_DOWN)
    assert terminated(events).remote is True
    assert edge.error is None
    assert edge.data_to_send() == []  # nothing sent back


# --------------------------------------------------------------------------- streams


def test_stream_ids_may_have_gaps() -> None:
    """protocol.md, streams: each side's ids strictly increase, gaps allowed."""
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()) + encode_frame(DATA, SYN, 41, meta()))
    assert [e.stream_id for e in edge.events_received()] == [1, 41]  # type: ignore[attr-defined]
    assert not edge.closed


def test_syn_after_a_received_goaway_is_refused_with_refused_stream() -> None:
    """protocol.md, streams: a GO_AWAY sent *or received* makes the receiver answer a SYN with
    RST(REFUSED_STREAM) (the sent case is test_session.py::test_syn_refused_while_going_away)."""
    agent = raw_agent()
    agent.receive_data(encode_frame(DATA, SYN, 2, meta()))  # keeps the session draining
    assert [type(e) for e in agent.events_received()] == [StreamOpened]
    agent.receive_data(encode_frame(GO_AWAY, length=GoAwayCode.NORMAL))
    agent.receive_data(encode_frame(DATA, SYN, 4, meta()))
    assert agent.events_received() == [GoAwayReceived(GoAwayCode.NORMAL)]
    assert sent_frames(agent) == [(WU, RST, 4, ResetCode.REFUSED_STREAM, b"")]
    assert not agent.closed and agent.stream_count == 1


# --------------------------------------------------------------------------- flow control


def test_stream_credit_is_returned_at_half_the_window() -> None:
    """protocol.md, flow control, batching: a stream's WINDOW_UPDATE goes out when its
    consumed-but-unreturned bytes reach half its current window, not before."""
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()))
    edge.accept_stream(1)
    edge.data_to_send()
    half = INITIAL_STREAM_WINDOW // 2
    edge.receive_data(encode_frame(DATA, 0, 1, bytes(half // 2)) * 2)
    assert not edge.closed
    edge.acknowledge(1, half - 1)
    assert sent_frames(edge) == []
    edge.acknowledge(1, 1)
    # half of the window was used (< 3/4), so the window does not grow: the delta is exactly it
    assert sent_frames(edge) == [(WU, 0, 1, half, b"")]


# --------------------------------------------------------------------------- keepalive


def test_the_agent_pings_every_heartbeat_after_the_handshake_too() -> None:
    """protocol.md, keepalive: *each* side sends a PING every 10 s after the handshake (the
    edge's side is test_session.py::test_keepalive_and_dead_peer_timeout)."""
    pair = SessionPair()
    agent = pair.agent
    assert agent.get_timer() == 10.0
    agent.handle_timer(10.0)
    assert frames_of(flatten(agent.data_to_send())) == [(PING, 0, 0, 1, b"")]


# --------------------------------------------------------------------------- ending a session


@pytest.mark.parametrize(
    "code", [GoAwayCode.NORMAL, GoAwayCode.SHUTTING_DOWN, GoAwayCode.REPLACED], ids=str
)
def test_draining_goaway_codes_let_existing_streams_finish(code: GoAwayCode) -> None:
    """protocol.md, ending a session: with NORMAL, SHUTTING_DOWN or REPLACED existing streams
    may finish; the session ends once no stream is left."""
    agent = raw_agent()
    agent.receive_data(encode_frame(DATA, SYN, 2, meta()))
    agent.accept_stream(2)
    agent.events_received()
    agent.receive_data(encode_frame(GO_AWAY, length=code))
    assert agent.events_received() == [GoAwayReceived(code)]
    assert not agent.closed
    agent.receive_data(encode_frame(DATA, FIN, 2, b"late but delivered"))
    assert agent.events_received() == [DataReceived(2, b"late but delivered", True)]
    agent.send_data(2, b"answer", end_stream=True)
    frames = sent_frames(agent)
    assert (DATA, FIN, 2, 6, b"answer") in frames
    assert terminated(agent.events_received()) == ConnectionTerminated(
        code, "peer sent GO_AWAY", True
    )


@pytest.mark.parametrize(
    "code",
    [
        c
        for c in GoAwayCode
        if c not in (GoAwayCode.NORMAL, GoAwayCode.SHUTTING_DOWN, GoAwayCode.REPLACED)
    ],
    ids=str,
)
def test_any_other_goaway_code_drops_all_streams_at_once(code: GoAwayCode) -> None:
    """protocol.md, ending a session: any other code means the sender gave up."""
    agent = raw_agent()
    agent.receive_data(encode_frame(DATA, SYN, 2, meta()))
    agent.events_received()
    agent.receive_data(encode_frame(GO_AWAY, length=code))
    events = agent.events_received()
    assert events[0] == GoAwayReceived(code)
    assert terminated(events).remote is True
    assert agent.closed and agent.stream_count == 0


def test_after_a_protocol_error_all_further_input_is_ignored() -> None:
    """protocol.md, ending a session: the detecting side sends GO_AWAY and ignores all further
    input (here: a valid SYN and a PING that would otherwise be answered)."""
    edge = raw_edge()
    edge.receive_data(encode_frame(DATA, 0, 9, b"never opened"))
    assert terminated(edge.events_received()).code == GoAwayCode.PROTOCOL_ERROR
    assert sent_frames(edge) == [(GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR, b"")]
    edge.receive_data(encode_frame(DATA, SYN, 1, meta()) + encode_frame(PING, 0, 0, length=5))
    assert edge.events_received() == []
    assert edge.data_to_send() == []


# --------------------------------------------------------------------------- control messages


def _exposures(n: int) -> list[dict[str, object]]:
    return [{"port": 1 + i % 65535, "token": "t", "url": "u"} for i in range(n)]


def test_a_welcome_lists_at_most_1024_exposures() -> None:
    """protocol.md, messages: welcome.exposures is a list of at most 1024 Exposure."""
    base = {"type": "welcome", "session": "s", "heartbeat_s": 1, "limits": {}}
    ok = control.decode_message(orjson.dumps({**base, "exposures": _exposures(1024)}))
    assert isinstance(ok, control.Welcome) and len(ok.exposures) == 1024
    with pytest.raises(control.ControlError) as info:
        control.decode_message(orjson.dumps({**base, "exposures": _exposures(1025)}))
    assert info.value.code == "BAD_FIELD" and info.value.message.startswith("welcome.exposures")


def test_string_lengths_are_counted_in_characters() -> None:
    """protocol.md, strictness: a 256-character name is allowed however many bytes it takes."""
    wide = "\u00e9" * 256  # 512 bytes of UTF-8
    msg = control.decode_message(
        orjson.dumps({"type": "expose", "id": 1, "port": 8000, "name": wide})
    )
    assert isinstance(msg, control.Expose) and msg.name == wide
    with pytest.raises(control.ControlError) as info:
        control.decode_message(
            orjson.dumps({"type": "expose", "id": 1, "port": 8000, "name": wide + "\u00e9"})
        )
    assert info.value.code == "BAD_FIELD"


def test_error_messages_echo_at_most_64_characters_of_the_value() -> None:
    """protocol.md, strictness: `message` names the field by path and echoes at most 64
    characters of the offending value."""
    with pytest.raises(control.ControlError) as info:
        control.decode_message(orjson.dumps({"type": "expose", "id": 1, "port": "9" * 5000}))
    assert info.value.message.startswith("expose.port:")
    assert "9" * 63 in info.value.message and "9" * 65 not in info.value.message


def test_an_error_may_carry_only_a_status_code_in_range() -> None:
    """protocol.md, messages: error.status_code is an int 100..599."""
    base = {"type": "error", "code": "PORT_NOT_READY", "message": "m", "id": 1}
    for good in (100, 599):
        msg = control.decode_message(orjson.dumps({**base, "status_code": good}))
        assert isinstance(msg, control.Error) and msg.status_code == good
    for bad in (99, 600, True, 200.0):
        with pytest.raises(control.ControlError) as info:
            control.decode_message(orjson.dumps({**base, "status_code": bad}))
        assert info.value.code == "BAD_FIELD"


def test_hello_and_welcome_are_refused_after_the_handshake_on_the_agent_too() -> None:
    """protocol.md, handshake: hello to the agent, or a second welcome -> PROTOCOL_ERROR."""
    for msg in (HELLO, WELCOME):
        agent = raw_agent()
        agent.receive_data(ctrl_frame(msg))
        events = agent.events_received()
        assert not any(isinstance(e, ControlReceived) for e in events)
        assert terminated(events).code == GoAwayCode.PROTOCOL_ERROR
