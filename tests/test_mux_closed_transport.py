"""A tunnel connection whose transport is closing writes nothing more.

Frames can still be queued after the transport's close began: the edge's stop closes every
agent session's transport while the public streams it cuts queue their resets, and a session's
own end closes it while streams are still being reset. On Python 3.12 and 3.13.0 asyncio's
``writelines()`` on a transport after its ``close()`` raises TypeError (the close clears the
transport's write callback), which escaped ``MuxProtocol.flush`` into whatever called it (a
``connection_lost``, a timer). Real TCP on 127.0.0.1; the failure shows on 3.12 and 3.13
(``make test-versions``), while 3.11 ignored such writes.
"""

from __future__ import annotations

import asyncio

import pytest

from protocol import control
from protocol.session import Role, Session
from relay.mux import MuxProtocol
from tests.e2e.conftest import anyio_backend, wait_until
from tunneld.auth import agent_token

pytestmark = pytest.mark.anyio
__all__ = ["anyio_backend"]  # asyncio and uvloop


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class _Link(MuxProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(Session(Role.AGENT, now=loop.time()), loop)

    def on_control(self, message: object) -> None:
        pass


async def test_frames_queued_after_the_transport_closed_are_not_written() -> None:
    loop = asyncio.get_running_loop()
    sink = _Sink()
    server = await loop.create_server(lambda: sink, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        transport, link = await loop.create_connection(lambda: _Link(loop), "127.0.0.1", port)
        link.session.send_control(control.Hello("sb1", agent_token("secret", "sb1"), 1))
        link.flush()
        await wait_until(lambda: b"sb1" in sink.received, 10, "the hello arrived")
        sent = len(sink.received)
        transport.close()  # as the edge's stop does
        link.session.ping(loop.time())  # a frame queued after the close began
        assert link.session.has_data_to_send()
        link.flush()  # must neither raise nor write
        await asyncio.wait_for(sink.lost, 10)
        assert len(sink.received) == sent
    finally:
        server.close()
