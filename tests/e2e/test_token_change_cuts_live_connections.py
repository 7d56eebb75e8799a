"""A port's new token closes its old URL for the connections already open too.

docs/admin-api.md: passing a different token to an exposed port changes its URL, and "the old one
then answers 404 INVALID_TOKEN"; docs/architecture.md, step 8, says the same of the live
connections. Before, only new connections were refused: a keep-alive connection opened with the
old token kept reaching the service with it, request after request, so rotating a leaked URL's
token did not shut out whoever held a connection. Now a token change resets the port's live
preview streams as an unexpose does (``UNEXPOSED``): a request still waiting for its answer gets
the 404 ``INVALID_TOKEN`` page a new request to the old URL gets, an idle keep-alive connection
is cut, and nothing more reaches the service through them. Both ways a token changes are
checked: the admin API's expose and the agent's own (its local API). A re-expose with the same
token (an orchestrator's retry) cuts nothing. HTTP/2 streams waiting on a browser's connection
are cut the same way. A ``tls`` exposure's passthrough connections,
routed by a server name that holds the token, are cut the same way. Real sockets on 127.0.0.1,
an in-process edge and agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import orjson
import pytest
import trustme

from . import test_public_tls
from .conftest import Stack, raw_request, read_to_end, wait_until
from .test_http2 import RawH2
from .test_public_tcp import DOMAIN, TOKEN, Passthrough, TlsEcho, passthrough
from .test_public_tls import host_of, tls_stack

__all__ = ["passthrough"]  # the fixture
ca = test_public_tls.ca  # the certificate authority of the HTTPS stack (a fixture)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("by", ["admin", "agent"])
async def test_a_new_token_cuts_the_connections_opened_with_the_old_one(
    stack: Stack, holding_service: int, by: str
) -> None:
    assert stack.edge is not None
    origin = await stack.origin()
    agent = await stack.agent("sb1")
    old = stack.host_of((await stack.expose("sb1", origin.port))["exposedAt"]).encode()
    held = stack.host_of((await stack.expose("sb1", holding_service))["exposedAt"]).encode()

    # an idle keep-alive connection after one answer, and a request its service holds
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    waiting_r, waiting_w = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    try:
        idle_w.write(b"GET / HTTP/1.1\r\nHost: " + old + b"\r\n\r\n")
        await asyncio.wait_for(idle_r.readuntil(b"hello from origin"), 10)
        waiting_w.write(b"GET / HTTP/1.1\r\nHost: " + held + b"\r\n\r\n")
        await waiting_w.drain()
        edge = stack.edge

        def both_open() -> bool:
            state = edge.registry.get("sb1")
            return (
                state is not None and state.session is not None and len(state.session.streams) == 2
            )

        await wait_until(both_open, 10, "both connections' streams")

        if by == "admin":
            await stack.expose("sb1", origin.port, token="fresh")
            await stack.expose("sb1", holding_service, token="fresh2")
        else:
            await agent.expose(origin.port, token="fresh")
            await agent.expose(holding_service, token="fresh2")

        answer = await read_to_end(waiting_r)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404 "), answer
        assert orjson.loads(body)["code"] == "INVALID_TOKEN"
        assert await read_to_end(idle_r) == b""  # cut (before: kept open, and served)
    finally:
        idle_w.close()
        waiting_w.close()
    assert origin.requests == 1
    new = old.replace(old.split(b"-")[2].split(b".")[0], b"fresh")
    request = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
    assert (await raw_request(edge.public_port, request % new)).endswith(b"hello from origin")
    assert (await raw_request(edge.public_port, request % old)).startswith(b"HTTP/1.1 404 ")


async def test_a_re_expose_with_the_same_token_cuts_nothing(stack: Stack) -> None:
    assert stack.edge is not None
    origin = await stack.origin()
    await stack.agent("sb1")
    host = stack.host_of((await stack.expose("sb1", origin.port, token="same"))["exposedAt"])
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await asyncio.wait_for(reader.readuntil(b"hello from origin"), 10)
        await stack.expose("sb1", origin.port, token="same")
        await stack.expose("sb1", origin.port)  # no token: keeps the port's own
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert (await read_to_end(reader)).endswith(b"hello from origin")
    finally:
        writer.close()
    assert (origin.requests, origin.connections) == (2, 1)


async def test_a_new_token_cuts_tls_passthrough_connections_of_the_old_name(
    passthrough: Passthrough,
) -> None:
    """A ``tls`` exposure is routed by the server name, which holds the token: a connection
    opened with the old name is cut when the token changes (before: its TLS session to the
    sandbox went on), one opened with the new name works, the old name no longer routes."""
    stack = passthrough.stack
    assert stack.edge is not None
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    service = await TlsEcho(server_context).start()
    try:
        old, new = (f"{service.port}-sb1-{token}.{DOMAIN}" for token in (TOKEN, "tls1token"))
        passthrough.sandbox_ca.issue_cert(old, new).configure_cert(server_context)
        await stack.agent("sb1")
        await stack.expose("sb1", service.port, protocol="tls", token=TOKEN)
        context = passthrough.client(passthrough.sandbox_ca)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", stack.edge.public_port, ssl=context, server_hostname=old
        )
        try:
            writer.write(b"one\n")
            assert await asyncio.wait_for(reader.readline(), 10) == (
                hashlib.sha256(b"one\n").hexdigest().encode() + b"\n"
            )
            await stack.expose("sb1", service.port, protocol="tls", token="tls1token")
            rest = b""
            try:
                async with asyncio.timeout(10):  # before: the session went on
                    while chunk := await reader.read(65536):
                        rest += chunk
            except (ConnectionResetError, ssl.SSLError):
                pass
            assert rest == b""
        finally:
            writer.close()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", stack.edge.public_port, ssl=context, server_hostname=new
        )
        try:
            writer.write(b"two\n")
            assert await asyncio.wait_for(reader.readline(), 10) == (
                hashlib.sha256(b"two\n").hexdigest().encode() + b"\n"
            )
        finally:
            writer.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # the old name: the edge's own TLS
            await asyncio.open_connection(
                "127.0.0.1", stack.edge.public_port, ssl=context, server_hostname=old
            )
    finally:
        await service.close()


async def test_a_new_token_cuts_the_h2_streams_of_the_old_url(
    ca: trustme.CA, tmp_path: Path, holding_service: int
) -> None:
    """A browser keeps its HTTP/2 connection: a stream of the old URL waiting for its answer
    gets the 404 INVALID_TOKEN page, and a new stream with the old URL on the same connection
    is a 404 that reaches nothing, while the new URL works on it."""
    stack = await tls_stack(ca, tmp_path)
    try:
        origin = await stack.origin()
        await stack.agent("sb1")
        held_port = holding_service
        url = (await stack.expose("sb1", origin.port, token="oldtoken"))["exposedAt"]
        held_url = (await stack.expose("sb1", held_port, token="heldtoken"))["exposedAt"]
        async with RawH2(stack, ca, host_of(url)) as client:
            sid = client.request(b"GET", b"/")
            await client.send()
            headers, body, _ = await client.response(sid)
            assert headers[b":status"] == b"200" and body == b"hello from origin"
            client.host = host_of(held_url)
            waiting = client.request(b"GET", b"/")
            await client.send()
            await wait_until(lambda: _streams("sb1", stack) == 1, 10, "the held stream")
            await stack.expose("sb1", held_port, token="heldtoken2")
            await stack.expose("sb1", origin.port, token="newtoken")
            headers, body, _ = await client.response(waiting)
            assert headers[b":status"] == b"404", (headers, body)
            assert orjson.loads(body)["code"] == "INVALID_TOKEN"
            client.host = host_of(url)
            sid = client.request(b"GET", b"/")
            await client.send()
            headers, body, _ = await client.response(sid)
            assert headers[b":status"] == b"404", (headers, body)
            client.host = host_of(url).replace("oldtoken", "newtoken")
            sid = client.request(b"GET", b"/")
            await client.send()
            headers, body, _ = await client.response(sid)
            assert headers[b":status"] == b"200" and body == b"hello from origin"
        assert origin.requests == 2
    finally:
        await stack.close()


def _streams(sandbox_id: str, stack: Stack) -> int:
    assert stack.edge is not None
    state = stack.edge.registry.get(sandbox_id)
    return len(state.session.streams) if state is not None and state.session is not None else -1
