"""What another node can make an owner hold with forwarded admin exposes (tunneld/exposefwd.py).

The owner's agent here is a real connection that takes the edge's ``expose`` requests and
answers them only when the test says (:class:`SlowAgent`), so the exposes the owner runs for a
node link pile up, waiting for it, as behind a slow or hostile agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from protocol import control
from protocol.events import ControlReceived
from protocol.session import Role, Session
from tunneld import exposefwd
from tunneld.auth import agent_token

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


class SlowAgent:
    """An agent session that answers PINGs (the session does) and holds every ``expose`` the
    edge sends until :meth:`answer_all`."""

    def __init__(self) -> None:
        self.session = Session(Role.AGENT)
        self.exposes: list[control.Expose] = []
        self.welcomed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def connect(self, node: Node, sandbox_id: str, secret: str) -> None:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", node.edge.agent_port)
        hello = control.Hello(sandbox_id, agent_token(secret, sandbox_id))
        self.session.send_control(hello)
        self._flush()
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))
        await asyncio.wait_for(self.welcomed.wait(), 10)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            self.session.receive_data(data)
            for event in self.session.events_received():
                if isinstance(event, ControlReceived):
                    message = event.message
                    if isinstance(message, control.Welcome):
                        self.welcomed.set()
                    elif isinstance(message, control.Expose):
                        self.exposes.append(message)
            self._flush()

    def _flush(self) -> None:
        assert self._writer is not None
        self._writer.write(b"".join(bytes(b) for b in self.session.data_to_send()))

    def answer_all(self) -> None:
        for message in self.exposes:
            self.session.send_control(control.Ok(message.id))
        self.exposes.clear()
        self._flush()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self._reader_task


async def _slow_agent_on_b(cluster: Cluster) -> tuple[Node, Node, SlowAgent]:
    """node-a and node-b, sb1's agent (a slow one) on node-b, which waits long for it."""
    node_a = await cluster.node("node-a")
    node_b = await cluster.node("node-b", control_timeout=60.0)
    agent = SlowAgent()
    await agent.connect(node_b, "sb1", cluster.secret)
    await wait_for(
        lambda: node_a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b",
        what="node-a to see node-b own sb1",
    )
    return node_a, node_b, agent


def _served(node: Node) -> int:
    cluster = node.edge.cluster
    assert cluster is not None
    return sum(len(link.served_exposes) for link in cluster.server_links)


async def test_the_owner_bounds_the_exposes_it_runs_for_a_link(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_SERVED_EXPOSES in flight for one link the owner answers NODE_BUSY and runs
    nothing more; the landing node then stores the exposure itself (200, as before forwarding
    existed) instead of waiting for the owner."""
    monkeypatch.setattr(exposefwd, "MAX_SERVED_EXPOSES", 1)
    node_a, node_b, agent = await _slow_agent_on_b(cluster)
    try:
        first = asyncio.ensure_future(
            node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
        )
        await wait_for(lambda: [m.port for m in agent.exposes] == [8000], what="node-b to ask")
        assert _served(node_b) == 1  # node-b runs it, waiting for its agent

        second = asyncio.ensure_future(
            node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8001})
        )
        await wait_for(lambda: second.done() or _served(node_b) > 1, what="node-b to answer")
        assert _served(node_b) == 1  # refused, not run
        r = await asyncio.wait_for(second, 10)
        assert r.status_code == 200, r.text  # stored by node-a itself
        assert r.json()["port"] == 8001
        stored = await node_a.store.load_all()
        # 8000 stored by node-b before it asked its agent, 8001 by node-a
        assert sorted((s.sandbox_id, s.port) for s in stored) == [("sb1", 8000), ("sb1", 8001)]
        assert not first.done()

        agent.answer_all()  # the first one went on, and ends as usual
        r = await asyncio.wait_for(first, 10)
        assert r.status_code == 200, r.text
        assert r.json()["port"] == 8000
        await wait_for(lambda: _served(node_b) == 0, what="node-b to forget it")
    finally:
        agent.answer_all()
        await agent.close()


@pytest.mark.parametrize("waiting_for", ["an earlier change", "the agent"])
async def test_a_stop_ends_the_exposes_the_node_runs_for_others(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, waiting_for: str
) -> None:
    """node-b stops while it runs an expose node-a forwarded. One that waits for an earlier
    change of the sandbox (held here: the registry waits up to ``write_timeout``, 30 s, for
    it) is cancelled by the stop (``exposefwd.stop_serving``); one that waits for the agent ends
    when the stop ends the agent's session (node-b then answers it: the change is stored). Either
    way the stop ends promptly, nothing is left pending (a task still pending when the loop
    closes is "Task was destroyed but it is pending"), nothing is logged as an error, and
    node-a answers 200 with the exposure stored."""
    node_a, node_b, agent = await _slow_agent_on_b(cluster)
    registry = node_b.edge.registry
    lock = await registry._lock_for_change("sb1") if waiting_for == "an earlier change" else None
    try:
        call = asyncio.ensure_future(
            node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
        )
        await wait_for(lambda: _served(node_b) == 1, what="node-b to run it")
        if lock is None:
            await wait_for(lambda: agent.exposes, what="node-b to ask its agent")
        cluster_b = node_b.edge.cluster
        assert cluster_b is not None
        (task,) = cluster_b.served_exposes
        cluster.nodes.remove(node_b)
        await node_b.admin.aclose()
        await asyncio.wait_for(node_b.edge.stop(grace=0.2), 10)
        assert task.done()
        assert task.cancelled() == (lock is not None)
        assert not cluster_b.served_exposes
    finally:
        if lock is not None:
            registry._unlock("sb1", lock)
        await agent.close()
    r = await asyncio.wait_for(call, 10)
    assert r.status_code == 200, r.text
    assert [(s.sandbox_id, s.port) for s in await node_a.store.load_all()] == [("sb1", 8000)]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
