"""Fuzz: whatever the peer sends, receive_data never raises, and the session ends up either still
running or terminated with one of the documented codes -- never INTERNAL_ERROR (that would mean
the parser itself has a bug the catch-all wrapper had to hide)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import control
from protocol.errors import GoAwayCode
from protocol.events import ConnectionTerminated
from protocol.frames import PREFACE, FrameType, encode_frame
from protocol.session import Role, Session
from tests.protocol.conftest import HELLO, WELCOME

# what peer garbage may lead to (a peer GO_AWAY can carry any code: those are remote=True)
PEER_FAULT_CODES = {
    GoAwayCode.PROTOCOL_ERROR,
    GoAwayCode.FLOW_CONTROL_ERROR,
    GoAwayCode.FRAME_TOO_LARGE,
    GoAwayCode.UNSUPPORTED_VERSION,
}


class Probe:
    """Checks the invariants after every input, remembering the termination event."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.terms: list[ConnectionTerminated] = []

    def check(self) -> None:
        session = self.session
        events = session.events_received()
        self.terms += [e for e in events if isinstance(e, ConnectionTerminated)]
        assert len(self.terms) <= 1
        if session.closed:
            assert len(self.terms) == 1
            if session.error is not None:
                assert session.error.code in PEER_FAULT_CODES, session.error
                assert self.terms[0].code == session.error.code and not self.terms[0].remote
            else:
                # without an error: a peer GO_AWAY, or our own close() once streams drained
                term = self.terms[0]
                assert term.remote or term == ConnectionTerminated(
                    GoAwayCode.NORMAL, "closed", False
                )
        else:
            assert not self.terms and session.error is None
        session.data_to_send()


def ready_edge() -> Session:
    edge = Session(Role.EDGE)
    edge.receive_data(
        PREFACE + encode_frame(FrameType.CONTROL, payload=control.encode_message(HELLO))
    )
    edge.send_control(WELCOME)
    edge.events_received()
    return edge


def ready_agent() -> Session:
    agent = Session(Role.AGENT)
    agent.send_control(HELLO)
    agent.receive_data(encode_frame(FrameType.CONTROL, payload=control.encode_message(WELCOME)))
    agent.events_received()
    return agent


def frame_strategy() -> st.SearchStrategy[bytes]:
    meta = st.one_of(
        st.just(b'{"port":8000,"via":"preview","client":"x"}'),
        st.binary(max_size=64),
        st.builds(
            lambda p, v: b'{"port":%d,"via":"%s"}' % (p, v.encode()),
            st.integers(-1, 70000),
            st.sampled_from(["preview", "direct", "x"]),
        ),
    )
    ctrl = st.one_of(
        st.just(control.encode_message(control.Ok(id=1))),
        st.just(control.encode_message(HELLO)),
        st.binary(max_size=64),
    )
    return st.one_of(
        st.builds(
            lambda t, f, s, p, ln: encode_frame(t, f, s, p, ln),
            st.integers(0, 6),
            st.sampled_from([0, 1, 2, 4, 5, 8, 10, 16, 0xFFFF]),
            st.integers(0, 9),
            st.one_of(meta, ctrl, st.binary(max_size=300)),
            st.one_of(st.just(-1), st.integers(0, 2**32 - 1)),
        ),
        st.binary(max_size=40),
    )


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=5))
def test_random_bytes_into_fresh_edge(data: bytes, cuts: list[int]) -> None:
    edge = Session(Role.EDGE)
    probe = Probe(edge)
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        edge.receive_data(data[prev:cut])
        prev = max(prev, cut)
        probe.check()


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_after_preface_and_hello(data: bytes) -> None:
    edge = ready_edge()
    edge.receive_data(data)
    Probe(edge).check()


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(frame_strategy(), max_size=12), role=st.sampled_from(["edge", "agent"]))
def test_random_frames_after_handshake(frames: list[bytes], role: str) -> None:
    session = ready_edge() if role == "edge" else ready_agent()
    if role == "agent":
        session.open_stream(8000)
    probe = Probe(session)
    for frame in frames:
        session.receive_data(frame)
        probe.check()
    # whatever happened, the API stays usable
    if not session.closed:
        session.ping(1.0)
        session.close()
    probe.check()


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(frame_strategy(), max_size=8))
def test_random_frames_as_one_buffer_into_agent(frames: list[bytes]) -> None:
    agent = Session(Role.AGENT)
    agent.send_control(HELLO)
    agent.receive_data(b"".join(frames))
    Probe(agent).check()
