"""Claims of docs/protocol.md that no sans-IO test held the session to, one test each (the doc
or tests/test_doc_claims_protocol.py's CITED table names them). Raw frames against one
``protocol.Session``, as in test_session.py."""

from __future__ import annotations

from protocol import control
from protocol.errors import GoAwayCode
from protocol.events import ControlReceived
from protocol.frames import PREFACE, encode_frame
from protocol.session import Role, Session
from tests.protocol.conftest import (
    ACK,
    CONTROL,
    GO_AWAY,
    HELLO,
    PING,
    WELCOME,
    ctrl_frame,
    frames_of,
    sent_frames,
)


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
