"""docs/admin-api.md, error codes: 409 `CONFLICT`, "the port was unexposed by another request
while this expose was being answered; retrying is safe" (`Port 8000 was unexposed meanwhile;
retry.`).

An expose is recorded first, then waits for the agent's acknowledgement; an unexpose that
comes meanwhile removes the record. The agent here is a slow one that holds the expose's
acknowledgement until the edge has sent it the unexpose (which the edge sends only once the
record is gone), so the order is fixed by the messages, not by time."""

from __future__ import annotations

import asyncio

import pytest

from protocol import control
from protocol.events import ControlReceived
from protocol.session import Role, Session
from tests.e2e.conftest import Stack
from tunneld.auth import agent_token

pytestmark = pytest.mark.anyio

WAIT = 15  # seconds: a bound on every wait, never a way to order events


class SlowAgent:
    """An agent link that answers nothing by itself: the test acknowledges each request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session = Session(Role.AGENT)
        self.inbox: list[object] = []

    @classmethod
    async def connect(cls, stack: Stack, sandbox_id: str) -> SlowAgent:
        assert stack.edge is not None
        agent = cls(*await asyncio.open_connection("127.0.0.1", stack.edge.agent_port))
        agent.send(control.Hello(sandbox_id, agent_token(stack.secret, sandbox_id)))
        await agent.next(control.Welcome)
        return agent

    def send(self, message: control.Message) -> None:
        self.session.send_control(message)
        self._flush()

    def _flush(self) -> None:
        self.writer.write(b"".join(bytes(b) for b in self.session.data_to_send()))

    async def next(self, kind: type) -> object:
        """The next control message of ``kind`` the edge sends (others are kept aside)."""
        while True:
            for i, message in enumerate(self.inbox):
                if isinstance(message, kind):
                    return self.inbox.pop(i)
            data = await asyncio.wait_for(self.reader.read(1 << 16), WAIT)
            assert data, "the edge closed the agent link"
            self.session.receive_data(data)
            for event in self.session.events_received():
                if isinstance(event, ControlReceived):
                    self.inbox.append(event.message)
            self._flush()  # PONGs

    def close(self) -> None:
        self.writer.close()


async def test_an_expose_unexposed_before_the_agent_acknowledged_is_409_conflict() -> None:
    stack = await Stack().start()
    agent = None
    try:
        agent = await SlowAgent.connect(stack, "sb1")
        admin = stack.admin
        exposing = asyncio.create_task(admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000}))
        expose = await agent.next(control.Expose)  # recorded, and told to the agent: held
        assert isinstance(expose, control.Expose) and expose.port == 8000
        assert [
            p["port"] for p in (await admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
        ] == [8000]
        unexposing = asyncio.create_task(admin.delete("/v1/sandboxes/sb1/ports/8000"))
        unexpose = await agent.next(control.Unexpose)  # sent once the record is gone
        assert isinstance(unexpose, control.Unexpose) and unexpose.port == 8000
        assert not exposing.done()
        agent.send(control.Ok(expose.id))
        r = await asyncio.wait_for(exposing, WAIT)
        assert r.status_code == 409, r.text
        assert r.json() == {
            "error": "Port 8000 was unexposed meanwhile; retry.",
            "code": "CONFLICT",
        }
        agent.send(control.Ok(unexpose.id))
        assert (await asyncio.wait_for(unexposing, WAIT)).status_code == 204
        assert (await admin.get("/v1/sandboxes/sb1/ports")).json()["ports"] == []
        # "retrying is safe": the same expose again is an ordinary one
        exposing = asyncio.create_task(admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000}))
        expose = await agent.next(control.Expose)
        assert isinstance(expose, control.Expose)
        agent.send(control.Ok(expose.id))
        r = await asyncio.wait_for(exposing, WAIT)
        assert r.status_code == 200 and r.json()["port"] == 8000, r.text
    finally:
        if agent is not None:
            agent.close()
        await stack.close()
