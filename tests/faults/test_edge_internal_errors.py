"""A bug on the edge's side of an agent session must still answer the agent (docs/protocol.md:
`INTERNAL_ERROR` is "a bug in the sender"; a request the edge fails on gets `error {id,
INTERNAL_ERROR}`: tests/faults/test_protocol_doc_replies.py): an exception that escapes an event
handler ends the session with GO_AWAY(INTERNAL_ERROR) and the traceback in the log, where the
event loop's own "Fatal error" used to drop the connection without a word to the agent. A real
in-process edge on 127.0.0.1 with one of its methods made to raise; the agent is a hand-driven
session over a real socket."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from protocol import control
from protocol.errors import GoAwayCode
from protocol.events import GoAwayReceived
from tests.e2e.conftest import Stack
from tests.e2e.test_doc_claims_architecture import raw_agent
from tests.faults.test_protocol_doc_replies import _reply
from tunneld.edge import EdgeSession

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the behaviour is the edge's, not the loop's


async def test_an_exception_in_an_event_handler_ends_the_session_with_go_away_internal_error(
    stack: Stack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = EdgeSession.on_control

    def on_control(self: EdgeSession, message: Any) -> None:
        if isinstance(message, control.ListExposures) and message.id == 7:
            raise RuntimeError("a bug in a handler")
        original(self, message)

    monkeypatch.setattr(EdgeSession, "on_control", on_control)
    agent = await raw_agent(stack)
    try:
        agent.session.send_control(control.ListExposures(6))  # served as usual
        agent.flush()
        await agent.wait_for(_reply(6))
        agent.session.send_control(control.ListExposures(7))
        agent.flush()
        await agent.wait_closed()
        assert GoAwayReceived(GoAwayCode.INTERNAL_ERROR) in agent.events, agent.events[-5:]
    finally:
        await agent.close()
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert any("internal error; closing the session" in r.getMessage() for r in logged), logged
    caplog.clear()  # the traceback is the point here, not a crash of the test's own making
