"""An edge that never answers the agent's requests: 504 ``EDGE_TIMEOUT``, and nothing kept.

docs/agent.md, Local HTTP API: ``EDGE_TIMEOUT`` 504 "the edge did not answer in time" (the
agent's request timeout, agent/core.py ``REQUEST_TIMEOUT``, 35 s; 0.5 s here).
tests/agent/test_local_api.py checks the mapping with a fake controller; here a real agent and
its local API face a scripted edge that reads the ``expose`` and says nothing: the process in
the sandbox gets 504 ``EDGE_TIMEOUT``, the agent keeps no pending request for it (a mute edge
cannot make it hold one per call), does not count the port as exposed, ignores the reply if it
comes later, and its session stays up.

Real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

import agent.core
from protocol import control
from protocol.events import ControlReceived
from tests.e2e.conftest import raw_request

from .hostile_edge import HostileEdge, hostile_edge

pytestmark = pytest.mark.anyio

CALLS = 5


class MuteEdge(HostileEdge):
    """Welcomes the agent, then never answers an ``expose``; keeps the ids it got."""

    def __init__(self) -> None:
        super().__init__()
        self.unanswered: list[int] = []

    def _answer(self, message: object) -> None:
        if isinstance(message, control.Expose):
            self.unanswered.append(message.id)
            return
        super()._answer(message)


async def test_an_edge_that_never_answers_is_504_edge_timeout_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agent.core, "REQUEST_TIMEOUT", 0.5)
    async with hostile_edge(edge=MuteEdge()) as (edge, agent_):
        assert isinstance(edge, MuteEdge)
        session = agent_.session
        assert session is not None
        api = await agent_.serve_local_api("127.0.0.1", 0)
        try:
            body = orjson.dumps({"port": 8000})
            request = (
                b"POST /v1/ports HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            answers = await asyncio.gather(
                *(raw_request(api.port, request, timeout=10) for _ in range(CALLS))
            )
            for answer in answers:
                head, _, payload = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 504 "), answer[:300]
                assert orjson.loads(payload)["code"] == "EDGE_TIMEOUT", payload
            assert len(edge.unanswered) == CALLS  # each call did reach the edge
            assert len(session.pending) == 0  # none is kept once it timed out
            assert 8000 not in agent_.exposures

            # The edge's reply, too late: ignored, the port still not counted, the session up.
            for request_id in edge.unanswered:
                edge.session.send_control(
                    control.Ok(request_id, (control.Exposure(8000, "t", "http://u/"),))
                )
            edge.session.send_control(control.Unexpose(99, 9000))  # a marker the agent answers
            edge.flush()
            async with asyncio.timeout(10):
                while True:
                    event = await edge.events.get()
                    if isinstance(event, ControlReceived) and getattr(event.message, "id", 0) == 99:
                        break
            assert 8000 not in agent_.exposures
            assert not session.session.closed
        finally:
            await api.close()
