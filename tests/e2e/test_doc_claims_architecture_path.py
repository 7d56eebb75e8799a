"""docs/architecture.md, steps 3-5 of a request's path, seen from the agent's side of a real
in-process edge (a hand-driven agent session over a real socket on 127.0.0.1, as in
test_doc_claims_architecture.py, that never accepts the stream):

- 3: ``parse_preview_host(Host, domain)`` yields ``(8000, "sb1", "upzsscvle0dn92cj")``;
- 4: ``Session.open_stream(8000, "preview", client)``: a ``DATA|SYN`` frame with
  ``{"port":8000,"via":"preview","client":…}`` (the client's address as the edge saw it);
- 5: the head is forwarded right behind the SYN, without waiting for the agent, rebuilt with
  ``Host: localhost:8000``, ``X-Forwarded-For/-Host/-Proto`` and ``X-Sandbox-Name`` appended.
"""

from __future__ import annotations

import asyncio

import pytest

from protocol.events import DataReceived, StreamOpened
from protocol.hostnames import PreviewRoute, parse_preview_host

from .conftest import Stack
from .test_doc_claims_architecture import raw_agent

pytestmark = pytest.mark.anyio


def test_the_routing_example_of_step_3() -> None:
    host = "8000-sb1-upzsscvle0dn92cj.localhost:8080"
    assert parse_preview_host(host, "localhost") == PreviewRoute(8000, "sb1", "upzsscvle0dn92cj")


async def test_the_head_follows_the_syn_before_the_agent_answers(stack: Stack) -> None:
    agent = await raw_agent(stack)
    try:
        assert stack.edge is not None
        exposed = await stack.expose("sb1", 8000, token="upzsscvle0dn92cj")
        host = stack.host_of(exposed["exposedAt"])
        _reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        try:
            address, client_port = writer.get_extra_info("sockname")[:2]
            client = f"{address}:{client_port}"
            writer.write(
                f"GET /api HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n".encode()
            )
            await writer.drain()
            opened = await agent.wait_for(lambda e: isinstance(e, StreamOpened))
            assert isinstance(opened, StreamOpened)
            assert (opened.port, opened.via, opened.client) == (8000, "preview", client)
            assert (opened.sandbox, opened.epoch) == (None, None)  # an agent link's open
            sid = opened.stream_id

            def relayed() -> bytes:
                return b"".join(
                    e.data
                    for e in agent.events
                    if isinstance(e, DataReceived) and e.stream_id == sid
                )

            await agent.wait_for(lambda _: relayed().endswith(b"\r\n\r\n"))
            head = relayed()  # though the raw agent never accepts a stream (no ACK is sent)
        finally:
            writer.close()
    finally:
        await agent.close()
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /api HTTP/1.1"
    fields = [tuple(line.split(b": ", 1)) for line in lines[1:-2]]
    names = [name.lower() for name, _ in fields]
    assert (b"host", b"localhost:8000") in [(n.lower(), v) for n, v in fields]
    assert dict((n.lower(), v) for n, v in fields)[b"x-forwarded-for"] == b"127.0.0.1"
    for name in (b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-sandbox-name"):
        assert names.count(name) == 1, (name, head)
    assert names[-4:] == [
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-sandbox-name",
    ], head  # appended
