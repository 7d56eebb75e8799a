"""The admin token offered as a subprotocol (``tunneld.bearer.<base64url>``, tunneld/tcpws.py)
in hostile spellings, on both endpoints that read ``Sec-WebSocket-Protocol``, with real
``websockets`` clients against a real EdgeServer and agent (and a raw socket where the bytes
must be exact).

* wsConnect (``.../ws``, the handshake relayed to the sandbox's server): no item holding
  ``tunneld.bearer.`` in any case, spacing or quoting, on any header line, reaches the service
  (docs/admin-api.md, "WebSocket connect": "any ``tunneld.bearer.`` subprotocol offered" is
  removed); the client's own offers still do, and the service's choice comes back.
* raw TCP over WebSocket (``.../tcp``, the one endpoint that takes the token so): subprotocol
  names are tokens compared case-sensitively (RFC 6455 4.1), so only ``tunneld.bearer.<token>``
  exactly authenticates, found on any line and between any commas and SP/HTAB.

Found here: the relay (tunneld/admin.py) and the check (tunneld/tcpws.py) split the header each
their own way. The relay passed ``chat,<NBSP>tunneld.bearer.<token>``, ``"tunneld.bearer.<token>"``,
``chat tunneld.bearer.<token>`` and ``chat;tunneld.bearer.<token>`` to the sandbox's service
(the admin token in sandbox code); and the check stripped Unicode whitespace, so
``<NBSP>tunneld.bearer.<token>`` authenticated the raw TCP endpoint while the relay kept it.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import anyio
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request

from tunneld.tcpws import BEARER_PREFIX, SUBPROTOCOL

from .conftest import Stack

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Service:
    """The sandbox's WebSocket server: records every handshake's Sec-WebSocket-Protocol lines
    and whole header block as it arrived (``process_request``, before it negotiates), chooses
    "chat" when offered, echoes."""

    def __init__(self) -> None:
        self.offers: list[list[str]] = []
        self.heads: list[str] = []
        self.port = 0

    def record(self, ws: ServerConnection, request: Request) -> None:
        self.offers.append(request.headers.get_all("Sec-WebSocket-Protocol"))
        self.heads.append(str(request.headers))

    async def handler(self, ws: ServerConnection) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    svc = Service()

    def choose(ws: ServerConnection, offered: object) -> str | None:
        return "chat" if isinstance(offered, list) and "chat" in offered else None

    async with serve(
        svc.handler,
        "127.0.0.1",
        0,
        process_request=svc.record,
        select_subprotocol=choose,
        compression=None,
    ) as server:
        svc.port = server.sockets[0].getsockname()[1]
        yield svc


def b64(token: str) -> str:
    return base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def url(stack: Stack, port: int, kind: str) -> str:
    assert stack.edge is not None
    return f"ws://127.0.0.1:{stack.edge.admin_port}/v1/sandboxes/sb1/ports/{port}/{kind}"


async def test_no_spelling_of_the_bearer_offer_reaches_the_service(
    stack: Stack, service: Service
) -> None:
    await stack.agent("sb1")
    secret = b64(stack.admin_token)
    bearer = BEARER_PREFIX + secret
    # (extra Sec-WebSocket-Protocol lines next to the client's own "chat", its offer list)
    cases: list[tuple[list[str], list[str]]] = [
        ([bearer.upper()], ["chat"]),
        (["TUNNELD.BEARER." + secret], ["chat"]),
        (["Tunneld.Bearer." + secret], ["chat"]),
        ([f" {bearer} "], ["chat"]),
        ([f",\t{bearer} ,, ", "other"], ["chat"]),  # two lines, tabs, empty items
        ([bearer, bearer], ["chat"]),
        ([f'"{bearer}"'], ["chat"]),
        ([f"x {bearer}"], ["chat"]),
        ([f"x;{bearer}"], ["chat"]),
        ([f"\u00a0{bearer}"], ["chat"]),  # a no-break space (sent as UTF-8: obs-text)
        ([], ["chat", "TUNNELD.BEARER." + secret]),  # in the client's own offer list
        ([], ["chat", bearer]),
    ]
    problems = []
    for extra, offer in cases:
        headers = [("Authorization", f"Bearer {stack.admin_token}")]
        headers += [("Sec-WebSocket-Protocol", value) for value in extra]
        before = len(service.heads)
        try:
            with anyio.fail_after(IO_TIMEOUT):
                async with connect(
                    url(stack, service.port, "ws"),
                    additional_headers=headers,
                    subprotocols=offer,  # type: ignore[arg-type]
                    compression=None,
                    open_timeout=IO_TIMEOUT,
                    close_timeout=IO_TIMEOUT,
                ) as ws:
                    chosen = ws.subprotocol
                    await ws.send("hi")
                    echoed = await ws.recv()
            outcome = f"chose {chosen}, echoed {echoed!r}"
        except InvalidStatus as exc:  # the service refused the handshake it got
            outcome = f"HTTP {exc.response.status_code}"
        if outcome != "chose chat, echoed 'hi'":
            problems.append((extra, offer, outcome))
        if len(service.heads) != before + 1:
            problems.append((extra, offer, "the service saw no handshake"))
            continue
        head = service.heads[-1]
        if secret in head or "bearer." in head.lower():
            problems.append((extra, offer, f"the service saw {service.offers[-1]}"))
        items = [i.strip() for line in service.offers[-1] for i in line.split(",")]
        if "chat" not in items or ("other" in extra and "other" not in items):
            problems.append((extra, offer, f"an offer was lost: {service.offers[-1]}"))
    assert not problems, "\n".join(map(repr, problems))


async def test_the_raw_tcp_endpoint_takes_the_bearer_offer_as_spelled_exactly(
    stack: Stack,
) -> None:
    """Case-sensitive, on any line, between commas and SP/HTAB; the ``101`` selects
    tunneld.tcp and the service gets the bytes and nothing of the handshake."""
    received = bytearray()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await stack.agent("sb1")
        secret = b64(stack.admin_token)
        bearer = BEARER_PREFIX + secret
        for extra, offer in [
            ([], [SUBPROTOCOL, bearer]),
            ([f" \t{bearer}\t,, "], [SUBPROTOCOL]),
            ([f"x, {bearer}"], [SUBPROTOCOL]),  # on a second line
        ]:
            with anyio.fail_after(IO_TIMEOUT):
                async with connect(
                    url(stack, port, "tcp"),
                    additional_headers=[("Sec-WebSocket-Protocol", v) for v in extra],
                    subprotocols=offer,  # type: ignore[arg-type]
                    compression=None,
                    open_timeout=IO_TIMEOUT,
                    close_timeout=IO_TIMEOUT,
                ) as ws:
                    assert ws.subprotocol == SUBPROTOCOL, extra
                    await ws.send(b"ping\n")
                    assert await ws.recv() == b"ping\n"
        assert bytes(received) == b"ping\n" * 3  # the service saw the payload, nothing else
        for extra, offer in [
            ([], [SUBPROTOCOL, "TUNNELD.BEARER." + secret]),
            ([], [SUBPROTOCOL, bearer.upper()]),
            ([f'"{bearer}"'], [SUBPROTOCOL]),
            ([f"x {bearer}"], [SUBPROTOCOL]),
        ]:
            with pytest.raises(InvalidStatus) as info, anyio.fail_after(IO_TIMEOUT):
                async with connect(
                    url(stack, port, "tcp"),
                    additional_headers=[("Sec-WebSocket-Protocol", v) for v in extra],
                    subprotocols=offer,  # type: ignore[arg-type]
                    compression=None,
                    open_timeout=IO_TIMEOUT,
                ):
                    pass
            assert info.value.response.status_code == 401, (extra, offer)
    finally:
        server.close()
        await server.wait_closed()


async def raw_tcp_handshake(stack: Stack, port: int, protocol: bytes) -> bytes:
    """A handshake whose Sec-WebSocket-Protocol bytes are exactly ``protocol``; the answer's
    status line."""
    assert stack.edge is not None
    head = (
        b"GET /v1/sandboxes/sb1/ports/%d/tcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: tunneld.tcp\r\nSec-WebSocket-Protocol: %s\r\n\r\n"
    ) % (port, protocol)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.admin_port)
    try:
        writer.write(head)
        with anyio.fail_after(IO_TIMEOUT):
            return await reader.readline()
    finally:
        writer.close()


async def test_a_bearer_offer_the_relay_would_keep_does_not_authenticate(stack: Stack) -> None:
    """What authenticates ``.../tcp`` is a subset of what ``.../ws`` removes: a no-break space
    (0xA0, obs-text) is no whitespace of HTTP, so ``<NBSP>tunneld.bearer.<token>`` is no bearer
    offer; SP and HTAB are."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await stack.agent("sb1")
        bearer = (BEARER_PREFIX + b64(stack.admin_token)).encode()
        assert (await raw_tcp_handshake(stack, port, b"\xa0" + bearer)).startswith(b"HTTP/1.1 401 ")
        assert (await raw_tcp_handshake(stack, port, b"\t" + bearer + b" ,")).startswith(
            b"HTTP/1.1 101 "
        )
    finally:
        server.close()
        await server.wait_closed()
