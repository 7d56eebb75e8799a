"""Hypothesis stateful test: a session pair against a simple model.

The model: per stream and direction, the bytes the sender queued and the bytes the receiver
acknowledged. The properties: the receiver gets a prefix of them, in order, and after a final drain
exactly all of them (unless the stream was reset); FIN arrives once and last; a receiver never holds
more unacknowledged bytes of one stream than the largest stream window allows; no window is ever
negative; neither side ever terminates.

Flow control is on the path: ``send_bulk`` queues more than the initial stream window in one call,
so those bytes can only arrive through WINDOW_UPDATE frames, and ``drain`` acknowledges and pumps in
bounded steps (a receiver that reads a little at a time), never all at once. The properties hold
whenever session-level credit comes back (with the per-stream acknowledge or on delivery).
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol.errors import ResetCode
from protocol.events import (
    DataReceived,
    PingAcknowledged,
    StreamAccepted,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from protocol.frames import INITIAL_STREAM_WINDOW
from protocol.session import Session, SessionConfig
from tests.protocol.conftest import SessionPair, flatten

SIDES = st.sampled_from(["edge", "agent"])
SMALL = SessionConfig(
    max_stream_window=1024 * 1024,
    stream_send_high_water=64 * 1024,
    stream_send_low_water=16 * 1024,
)
# drain(): what a receiver acknowledges per stream and what one side emits, per round.
DRAIN_ACK_STEP = 48 * 1024
DRAIN_PUMP_STEP = 96 * 1024


class PairMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = SessionPair(SMALL, SMALL)
        self.sent: dict[tuple[str, int], bytearray] = {}  # (sender, sid) -> bytes queued
        self.got: dict[tuple[str, int], bytearray] = {}  # (receiver, sid) -> bytes delivered
        self.acked: dict[tuple[str, int], int] = {}  # (receiver, sid) -> bytes acknowledged
        self.fin_sent: set[tuple[str, int]] = set()
        self.fin_got: set[tuple[str, int]] = set()
        self.reset: set[int] = set()
        self.opened: dict[int, str] = {}  # sid -> opener
        self.accepted: set[int] = set()  # acceptor called accept_stream
        self.seen_open: set[int] = set()  # the acceptor saw StreamOpened
        self.counter = 0

    def side(self, name: str) -> Session:
        return self.pair.edge if name == "edge" else self.pair.agent

    @staticmethod
    def peer(name: str) -> str:
        return "agent" if name == "edge" else "edge"

    def process(self) -> None:
        for name in ("edge", "agent"):
            for ev in self.pair.take(self.side(name)):
                if isinstance(ev, DataReceived):
                    key = (name, ev.stream_id)
                    assert key not in self.fin_got, "data after FIN"
                    self.got.setdefault(key, bytearray()).extend(ev.data)
                    if ev.end_stream:
                        self.fin_got.add(key)
                elif isinstance(ev, StreamOpened):
                    self.seen_open.add(ev.stream_id)
                elif isinstance(ev, StreamReset):
                    assert ev.remote
                    self.reset.add(ev.stream_id)
                else:
                    assert isinstance(ev, StreamAccepted | StreamWritable | PingAcknowledged), ev

    def can_send(self, name: str, sid: int) -> bool:
        if sid in self.reset or (name, sid) in self.fin_sent:
            return False
        return self.opened[sid] == name or sid in self.accepted

    @rule(name=SIDES, port=st.integers(1024, 65535))
    def open_stream(self, name: str, port: int) -> None:
        if len(self.opened) >= 40:
            return
        sid = self.side(name).open_stream(port)
        self.opened[sid] = name

    @rule(name=SIDES, port=st.integers(1024, 65535))
    def open_and_accept(self, name: str, port: int) -> None:
        """Open, deliver the SYN and accept in one step, so that both directions of a stream
        (the acceptor's replies too, and the window updates that pace them) are common."""
        if len(self.opened) >= 40:
            return
        sid = self.side(name).open_stream(port)
        self.opened[sid] = name
        self.pair.step(self.side(name))
        self.process()
        if sid in self.seen_open and sid not in self.reset:
            self.side(self.peer(name)).accept_stream(sid)
            self.accepted.add(sid)

    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        candidates = sorted(self.seen_open - self.accepted - self.reset)
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates))
        self.side(self.peer(self.opened[sid])).accept_stream(sid)
        self.accepted.add(sid)

    @rule(data=st.data(), name=SIDES, size=st.integers(0, 150_000), fin=st.booleans())
    def send(self, data: st.DataObject, name: str, size: int, fin: bool) -> None:
        self._send(data, name, size, fin)

    @rule(
        data=st.data(),
        name=SIDES,
        size=st.integers(INITIAL_STREAM_WINDOW + 1, 3 * INITIAL_STREAM_WINDOW),
        fin=st.booleans(),
    )
    def send_bulk(self, data: st.DataObject, name: str, size: int, fin: bool) -> None:
        """More than the initial window at once: only window updates can deliver all of it."""
        self._send(data, name, size, fin)

    def _send(self, data: st.DataObject, name: str, size: int, fin: bool) -> None:
        candidates = [sid for sid in sorted(self.opened) if self.can_send(name, sid)]
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates))
        self.counter += 1
        # a counter byte plus the offset: a reordered or duplicated chunk cannot look right
        payload = bytes((self.counter + i // 4096) & 0xFF for i in range(0, size, 4096))
        payload = b"".join(bytes([b]) * 4096 for b in payload)[:size]
        self.side(name).send_data(sid, payload, end_stream=fin)
        self.sent.setdefault((name, sid), bytearray()).extend(payload)
        if fin:
            self.fin_sent.add((name, sid))

    @rule(data=st.data(), name=SIDES, code=st.sampled_from(list(ResetCode)))
    def reset_stream(self, data: st.DataObject, name: str, code: ResetCode) -> None:
        candidates = [
            s
            for s in sorted(self.opened)
            if s not in self.reset and (self.opened[s] == name or s in self.seen_open)
        ]
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates))
        self.side(name).reset_stream(sid, code)
        self.reset.add(sid)

    @rule(name=SIDES, limit=st.one_of(st.none(), st.integers(0, 200_000)))
    def step(self, name: str, limit: int | None) -> None:
        self.pair.step(self.side(name), limit)
        self.process()

    @rule(data=st.data(), name=SIDES, fraction=st.floats(0, 1))
    def acknowledge(self, data: st.DataObject, name: str, fraction: float) -> None:
        session = self.side(name)
        candidates = [s for s in sorted(self.opened) if session.stream_receive_unacked(s)]
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates))
        self._acknowledge(name, sid, int(session.stream_receive_unacked(sid) * fraction))

    def _acknowledge(self, name: str, sid: int, n: int) -> None:
        self.side(name).acknowledge(sid, n)
        self.acked[(name, sid)] = self.acked.get((name, sid), 0) + n

    @rule(name=SIDES)
    def ping(self, name: str) -> None:
        self.side(name).ping(0.0)

    @precondition(lambda self: bool(self.opened))
    @rule()
    def drain(self) -> None:
        """A receiver that reads a little at a time: acknowledge and pump in bounded steps until
        quiet; then every byte must have arrived (past the initial window only through updates)."""
        for _ in range(5000):
            for name in ("edge", "agent"):
                session = self.side(name)
                for sid in list(self.opened):
                    n = min(session.stream_receive_unacked(sid), DRAIN_ACK_STEP)
                    if n:
                        self._acknowledge(name, sid, n)
            moved = self.pair.step(self.pair.edge, DRAIN_PUMP_STEP) + self.pair.step(
                self.pair.agent, DRAIN_PUMP_STEP
            )
            self.process()
            unacked = any(
                self.side(name).stream_receive_unacked(sid)
                for name in ("edge", "agent")
                for sid in self.opened
            )
            if not moved and not unacked:
                break
        else:
            raise AssertionError("drain did not settle")
        for (name, sid), sent in self.sent.items():
            if sid in self.reset:
                continue
            got = self.got.get((self.peer(name), sid), bytearray())
            assert got == sent, (name, sid, len(got), len(sent))
        for name, sid in self.fin_sent:
            if sid not in self.reset:
                assert (self.peer(name), sid) in self.fin_got

    @invariant()
    def delivered_in_order(self) -> None:
        for (name, sid), got in self.got.items():
            sent = self.sent.get((self.peer(name), sid), bytearray())
            assert sent[: len(got)] == got

    @invariant()
    def never_more_unacknowledged_than_a_window(self) -> None:
        """What a receiver holds unacknowledged for one stream fits in the largest stream window."""
        for (name, sid), got in self.got.items():
            if sid in self.reset:
                continue
            held = len(got) - self.acked.get((name, sid), 0)
            assert 0 <= held <= SMALL.max_stream_window, (name, sid, held)

    @invariant()
    def windows_never_negative(self) -> None:
        for session in (self.pair.edge, self.pair.agent):
            assert not session.closed, session.error
            assert session._send_window >= 0  # type: ignore[attr-defined]
            assert session._recv_avail >= 0  # type: ignore[attr-defined]
            for stream in session._streams.values():  # type: ignore[attr-defined]
                assert stream.send_window >= 0
                assert stream.recv_avail >= 0
                if stream.recv_open:
                    total = stream.recv_avail + stream.recv_unacked + stream.recv_unreturned
                    assert total == stream.recv_size
                assert stream.queued == sum(len(c) for c in stream.chunks)


PairMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPair = PairMachine.TestCase


def test_flatten_helper() -> None:  # keeps the helper import honest under ruff
    assert flatten([b"a", memoryview(b"b")]) == b"ab"
