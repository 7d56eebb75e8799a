"""An error about no request once the session is up is not a refusal (agent/core.py): tunneld
answers a message it does not serve with `error {code: UNEXPECTED_MESSAGE}` and no id
(docs/protocol.md) and the session goes on; the agent used to log "edge refused the session",
remember it as the edge's refusal and, when the session ended later for any reason, tell that
end as "refused by the edge". A real in-process edge and agent on 127.0.0.1."""

from __future__ import annotations

import logging

import pytest

from protocol import control
from protocol.errors import GoAwayCode

from .conftest import Stack, wait_until

pytestmark = pytest.mark.anyio


async def test_unexpected_message_after_the_welcome_is_no_refusal(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    agent = await stack.agent("sb1")
    session = agent.session
    assert session is not None
    # an edge -> agent message sent the other way: one the edge does not serve
    session.session.send_control(control.UnwatchPort(99))
    session.flush()
    await wait_until(
        lambda: any("did not take a message" in r.getMessage() for r in caplog.records),
        10,
        "the agent to log the edge's UNEXPECTED_MESSAGE",
    )
    assert not any("refused the session" in r.getMessage() for r in caplog.records)
    assert session.refusal is None and agent.last_refusal is None
    # the session goes on: an expose through it is served
    origin = await stack.origin()
    exposed = await agent.expose(origin.port)
    assert exposed.port == origin.port
    # and its end, when it comes, is told as what it is
    assert stack.edge is not None
    edge_session = stack.edge.registry.get("sb1").session
    edge_session.go_away(GoAwayCode.NORMAL)
    await wait_until(lambda: session.end_reason is not None, 10, "the session to end")
    assert session.end_reason is not None and "refused" not in session.end_reason
    assert "NORMAL" in session.end_reason
