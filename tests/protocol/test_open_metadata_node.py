"""Open metadata for node-to-node links: ``sandbox`` and ``epoch`` ride with the SYN."""

from __future__ import annotations

import orjson
import pytest

from protocol.errors import LocalProtocolError
from protocol.events import ConnectionTerminated, StreamOpened
from protocol.frames import FrameType, encode_frame

from .conftest import SessionPair, flatten

_SYN = 1


def test_sandbox_and_epoch_reach_the_acceptor() -> None:
    pair = SessionPair()
    sid = pair.edge.open_stream(8000, "preview", "1.2.3.4:5", sandbox="sb1", epoch=7)
    pair.pump()
    assert pair.take(pair.agent) == [StreamOpened(sid, 8000, "preview", "1.2.3.4:5", "sb1", 7)]


def test_agent_links_carry_neither() -> None:
    pair = SessionPair()
    sid = pair.edge.open_stream(8000)
    wire = flatten(pair.edge.data_to_send())
    assert b"sandbox" not in wire and b"epoch" not in wire
    pair.agent.receive_data(wire, None)
    assert pair.agent.events_received() == [StreamOpened(sid, 8000, "preview", "", None, None)]


@pytest.mark.parametrize(
    ("sandbox", "epoch"), [(5, None), (None, -1), (None, True), (None, "3"), (b"sb", None)]
)
def test_bad_values_are_refused_by_the_opener(sandbox: object, epoch: object) -> None:
    pair = SessionPair()
    with pytest.raises(LocalProtocolError):
        pair.edge.open_stream(8000, sandbox=sandbox, epoch=epoch)  # type: ignore[arg-type]


@pytest.mark.parametrize("extra", [{"sandbox": 5}, {"epoch": -1}, {"epoch": 1.5}, {"epoch": "1"}])
def test_bad_values_from_the_peer_end_the_session(extra: dict[str, object]) -> None:
    pair = SessionPair()
    meta = orjson.dumps({"port": 8000, "via": "preview", "client": "", **extra})
    pair.agent.receive_data(encode_frame(FrameType.DATA, _SYN, 2, meta), None)
    events = pair.agent.events_received()
    assert not any(isinstance(e, StreamOpened) for e in events)
    assert any(isinstance(e, ConnectionTerminated) for e in events)
