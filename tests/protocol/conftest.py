"""Test helpers for protocol/: a back-to-back session pair (h11's ConnectionPair), and the raw
frames, open metadata and handshaken single sessions the tests that write frames by hand use."""

from __future__ import annotations

from collections.abc import Iterable

import orjson
import pytest

from protocol import control
from protocol.errors import GoAwayCode
from protocol.events import ConnectionTerminated, ControlReceived, Event
from protocol.frames import PREFACE, FrameReader, FrameType, encode_frame
from protocol.session import Role, Session, SessionConfig

HELLO = control.Hello(sandbox_id="abc123", token="secret-token", version=1)
WELCOME = control.Welcome(session="s-1", heartbeat_s=10.0, limits={}, exposures=())

DATA, WU, PING, GO_AWAY, CONTROL = (int(t) for t in FrameType)
SYN, ACK, FIN, RST = 1, 2, 4, 8


def flatten(bufs: Iterable[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def frames_of(data: bytes, *, preface: bool = False) -> list[tuple[int, int, int, int, bytes]]:
    """Parse bytes a session emitted (sanity-checks what goes on the wire)."""
    if preface:
        assert data.startswith(PREFACE)
        data = data[len(PREFACE) :]
    reader = FrameReader()
    reader.feed(data)
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(tuple(frame))
    assert reader.buffered == 0
    return out  # type: ignore[return-value]


def ctrl_frame(msg: control.Message) -> bytes:
    return encode_frame(CONTROL, payload=control.encode_message(msg))


def meta(port: int = 8000, via: str = "preview", client: str = "1.2.3.4", **extra: object) -> bytes:
    """A SYN's open metadata."""
    return orjson.dumps({"port": port, "via": via, "client": client, **extra})


def raw_edge(config: SessionConfig | None = None) -> Session:
    """An edge that got a valid preface + Hello and answered Welcome; output drained."""
    edge = Session(Role.EDGE, config or SessionConfig())
    edge.receive_data(PREFACE + ctrl_frame(HELLO))
    assert [type(e) for e in edge.events_received()] == [ControlReceived]
    edge.send_control(WELCOME)
    edge.data_to_send()
    return edge


def raw_agent() -> Session:
    """An agent that sent its preface + Hello and got Welcome; output drained."""
    agent = Session(Role.AGENT)
    agent.send_control(HELLO)
    agent.data_to_send()
    agent.receive_data(ctrl_frame(WELCOME))
    assert [type(e) for e in agent.events_received()] == [ControlReceived]
    return agent


def sent_frames(session: Session) -> list[tuple[int, int, int, int, bytes]]:
    """What ``session`` has to send now, parsed."""
    return frames_of(flatten(session.data_to_send()))


class SessionPair:
    """An edge and an agent wired back to back; ``pump()`` moves bytes until both are quiet.

    Events are collected per side in ``edge_events`` / ``agent_events`` (cleared by ``take``)."""

    def __init__(
        self,
        edge_config: SessionConfig | None = None,
        agent_config: SessionConfig | None = None,
        *,
        handshake: bool = True,
    ) -> None:
        self.edge = Session(Role.EDGE, edge_config or SessionConfig())
        self.agent = Session(Role.AGENT, agent_config or SessionConfig())
        self.edge_events: list[Event] = []
        self.agent_events: list[Event] = []
        self.wire_bytes = 0
        if handshake:
            self.handshake()

    def handshake(self) -> None:
        self.agent.send_control(HELLO)
        self.pump()
        assert [type(e).__name__ for e in self.edge_events] == ["ControlReceived"]
        self.edge.send_control(WELCOME)
        self.pump()
        assert [type(e).__name__ for e in self.agent_events] == ["ControlReceived"]
        self.edge_events.clear()
        self.agent_events.clear()

    def other(self, side: Session) -> Session:
        return self.agent if side is self.edge else self.edge

    def events(self, side: Session) -> list[Event]:
        return self.edge_events if side is self.edge else self.agent_events

    def take(self, side: Session) -> list[Event]:
        evs = self.events(side)
        out = list(evs)
        evs.clear()
        return out

    def step(self, src: Session, limit: int | None = None, now: float | None = None) -> int:
        """Move one batch src -> dst. Returns bytes moved."""
        data = flatten(src.data_to_send(limit))
        dst = self.other(src)
        if data:
            dst.receive_data(data, now)
        self.wire_bytes += len(data)
        self.edge_events += self.edge.events_received()
        self.agent_events += self.agent.events_received()
        return len(data)

    def pump(
        self, limit: int | None = None, now: float | None = None, max_rounds: int = 10000
    ) -> None:
        for _ in range(max_rounds):
            moved = self.step(self.agent, limit, now) + self.step(self.edge, limit, now)
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def assert_alive(self) -> None:
        for side in (self.edge, self.agent):
            assert not side.closed, side.error
            assert not any(isinstance(e, ConnectionTerminated) for e in self.events(side))


def terminated(events: list[Event]) -> ConnectionTerminated:
    found = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(found) == 1, events
    return found[0]


@pytest.fixture
def pair() -> SessionPair:
    return SessionPair()


__all__ = [
    "ACK",
    "CONTROL",
    "DATA",
    "FIN",
    "GO_AWAY",
    "HELLO",
    "PING",
    "RST",
    "SYN",
    "WELCOME",
    "WU",
    "GoAwayCode",
    "SessionPair",
    "ctrl_frame",
    "flatten",
    "frames_of",
    "meta",
    "raw_agent",
    "raw_edge",
    "sent_frames",
    "terminated",
]
