"""Every session end is logged by the edge with its reason (issue 7, row 10).

An agent link that is cut (RST, as after a kill -9 or a dropped link) used to end without a line
in the edge's log: the session was torn down without its termination being processed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from .conftest import FaultStack

pytestmark = pytest.mark.anyio


async def _wait_for_record(caplog, needle: str, timeout: float = 10) -> logging.LogRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "tunneld" and needle in record.getMessage():
                return record
        await asyncio.sleep(0.02)
    seen = [r.getMessage() for r in caplog.records if r.name == "tunneld"]
    raise AssertionError(f"no edge log line with {needle!r}; edge said: {seen}")


async def test_edge_logs_an_agent_link_cut_with_its_reason(
    faulty_stack: FaultStack, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="tunneld")
    agent = await faulty_stack.agent("sb1")
    assert agent.connected
    assert faulty_stack.proxy.drop() >= 1  # RST on both sides, as a kill -9 or a cut link
    record = await _wait_for_record(caplog, "sandbox sb1 (agent")
    message = record.getMessage()
    assert record.levelno == logging.WARNING, message
    assert " lost after " in message or "TIMEOUT" in message, message


async def test_edge_logs_an_orderly_end_at_info(faulty_stack: FaultStack, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tunneld")
    agent = await faulty_stack.agent("sb1")
    await agent.stop()  # GO_AWAY(NORMAL) from the agent
    record = await _wait_for_record(caplog, "ended after")
    assert record.levelno == logging.INFO
    assert "NORMAL by the agent" in record.getMessage()
