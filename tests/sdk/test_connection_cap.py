"""The SDK keeps at most MAX_CONNECTIONS requests (so connections) in flight per client: a burst
of calls queues in the client instead of meeting tunneld's admin_max_connections_per_ip (64 by
default) and its 503 TOO_MANY_CONNECTIONS. A real server on 127.0.0.1 holds every request until
the test lets it answer, and counts the connections open at once."""

from __future__ import annotations

import anyio
import anyio.abc
import h11
import pytest

from tunneld.client import TunnelClient, TunnelTimeoutError
from tunneld.client._http import MAX_CONNECTIONS
from tunneld.config import Config

from .conftest import ADMIN_TOKEN, wait_until

pytestmark = pytest.mark.anyio


class HoldingServer:
    """Answers GET /healthz with {"status":"ok"} once ``release`` is set."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.open = 0
        self.most_open = 0
        self.port = 0

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            async with stream:
                conn = h11.Connection(h11.SERVER)
                while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive())
                await self.release.wait()
                body = b'{"status":"ok"}'
                await stream.send(
                    conn.send(
                        h11.Response(
                            status_code=200,
                            headers=[
                                ("content-type", "application/json"),
                                ("content-length", str(len(body))),
                                ("connection", "close"),
                            ],
                        )
                    )
                    + conn.send(h11.Data(data=body))
                    + conn.send(h11.EndOfMessage())
                )
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            self.open -= 1


def test_the_cap_is_below_the_edges_per_ip_default() -> None:
    assert Config().admin_max_connections_per_ip > MAX_CONNECTIONS


async def test_a_burst_of_calls_waits_for_the_clients_connections() -> None:
    server = HoldingServer()
    calls = MAX_CONNECTIONS + 8
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    answers: list[dict[str, object]] = []
    async with (
        listener,
        TunnelClient(f"http://127.0.0.1:{server.port}", token=ADMIN_TOKEN, timeout=20) as c,
    ):

        async def one() -> None:
            answers.append(await c.health())

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, server.handle)
            for _ in range(calls):
                tg.start_soon(one)
            await wait_until(lambda: server.open == MAX_CONNECTIONS, what="the cap's connections")
            await anyio.sleep(0.2)  # the others had the time to connect, were they allowed to
            assert server.open == MAX_CONNECTIONS
            server.release.set()
            await wait_until(lambda: len(answers) == calls, what="every call answered")
            tg.cancel_scope.cancel()
    assert answers == [{"status": "ok"}] * calls
    assert server.most_open == MAX_CONNECTIONS


async def test_a_call_that_gets_no_connection_in_time_is_a_timeout() -> None:
    server = HoldingServer()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with (
        listener,
        TunnelClient(f"http://127.0.0.1:{server.port}", token=ADMIN_TOKEN, timeout=30) as c,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, server.handle)
            for _ in range(MAX_CONNECTIONS):
                tg.start_soon(c.health)
            await wait_until(lambda: server.open == MAX_CONNECTIONS, what="the cap's connections")
            with pytest.raises(TunnelTimeoutError, match=f"one of this client's {MAX_CONNECTIONS}"):
                await c._transport.request("GET", "/healthz", token=None, timeout=0.3)
            assert server.open == MAX_CONNECTIONS
            server.release.set()
            await wait_until(lambda: server.open == 0, what="the held calls answered")
            tg.cancel_scope.cancel()
