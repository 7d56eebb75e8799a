"""docs/architecture.md's routing claims where one sandbox meets another (tenant isolation), and
the request-body framing they rest on (data integrity), against a real in-process edge and two
real agents, each with its own service, over real sockets on 127.0.0.1:

- 'the next request head on the keep-alive connection must be parsed and checked again (same
  route, else 421)'; 'A keep-alive request for another host gets 421 MISDIRECTED_REQUEST after
  the earlier responses finish, rather than being re-routed';
- 'Request bodies are relayed as they arrive while the edge only tracks where they end
  (Content-Length counting or ChunkedScanner)': a body that holds a request head for another
  sandbox is the first service's body, byte for byte, and never a request;
- HTTP/2: 'routing per stream by :authority': the streams of one connection each reach their
  own sandbox's service;
- token-less mode: exposure alone grants access (an unexposed port stays unreachable), and
  switching tokens back on restores the stored URLs and closes the token-less names again (three
  edges in one process: the routes remembered by tunneld/public.py must not leak between modes).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import orjson
import pytest
import trustme

from tunneld.store import SqliteStore

from . import test_public_tls
from .conftest import Stack, raw_request
from .origin import Origin
from .test_http2 import RawH2
from .test_public_tls import host_of, tls_stack

pytestmark = pytest.mark.anyio

ca = test_public_tls.ca  # the module's certificate authority (a fixture)


async def _two_sandboxes(stack: Stack) -> tuple[Origin, bytes, Origin, bytes]:
    """sb1 and sb2 connected, each with its own service exposed: (service, Host) for each."""
    one, two = await stack.origin(), await stack.origin()
    host1 = await stack.preview_host(one.port, "sb1")
    host2 = await stack.preview_host(two.port, "sb2")
    return one, host1, two, host2


def _get(host: bytes, *, close: bool = False) -> bytes:
    last = b"Connection: close\r\n" if close else b""
    return b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n" + last + b"\r\n"


async def test_a_keepalive_request_for_another_sandbox_is_421_after_the_first_response(
    any_parser_stack: Stack,
) -> None:
    """On a connection routed to sb1, a request with sb2's valid preview Host (its own token,
    its agent connected) is answered 421 MISDIRECTED_REQUEST after sb1's response, and reaches
    neither service: sb2's service never sees a connection, sb1's serves only the first."""
    stack = any_parser_stack
    one, host1, two, host2 = await _two_sandboxes(stack)
    assert stack.edge is not None
    answer = await raw_request(
        stack.edge.public_port, _get(host1) + _get(host2) + _get(host1, close=True)
    )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert answer.count(b"HTTP/1.1 ") == 2, answer  # the third request is not served either
    first = answer.index(b"hello from origin")
    misdirected = answer.index(b"HTTP/1.1 421 ")
    assert first < misdirected, answer
    body = answer[misdirected:].split(b"\r\n\r\n", 1)[1]
    assert orjson.loads(body)["code"] == "MISDIRECTED_REQUEST"
    assert (one.requests, two.connections) == (1, 0)
    # sb2's URL itself works: the 421 was the connection's route, not a broken sandbox
    answer = await raw_request(stack.edge.public_port, _get(host2, close=True))
    assert answer.startswith(b"HTTP/1.1 200 ") and two.requests == 1


def _chunked(payload: bytes, size: int, *, odd: bytes = b"") -> bytes:
    """``payload`` in chunks of ``size``; with ``odd`` (a request head), the legal oddities a
    framer must follow: upper-case zero-padded sizes, chunk extensions, and ``odd`` in an
    extension and as a trailer field."""
    out = b""
    for i in range(0, len(payload), size):
        piece = payload[i : i + size]
        if odd:
            out += b'000%X;ext=1;q="%s"\r\n' % (len(piece), odd.split(b"\r\n")[0]) + piece + b"\r\n"
        else:
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    lines = odd.split(b"\r\n")
    trailer = b"X-Trailer: %s\r\n%s\r\n" % (lines[0], lines[1]) if odd else b""  # two fields
    return out + b"0\r\n" + trailer + b"\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked", "chunked-odd"])
async def test_a_body_that_holds_another_sandboxs_request_is_only_a_body(
    any_parser_stack: Stack, framing: str
) -> None:
    """An upload to sb1 whose body is made of request heads for sb2 (and, chunked, of bytes
    that look like the last chunk followed by such a head; with extensions, zero-padded
    upper-case sizes and a trailer) arrives at sb1's service unchanged (its length and
    SHA-256), the request after it is sb1's again, and sb2's service sees nothing: the edge's
    framing (either parser) ends the body exactly where sb1's service does."""
    stack = any_parser_stack
    one, host1, two, host2 = await _two_sandboxes(stack)
    assert stack.edge is not None
    smuggled = _get(host2) + b"POST /upload HTTP/1.1\r\nHost: " + host2 + b"\r\n"
    payload = (b"0\r\n\r\n" + smuggled + b"Content-Length: 4\r\n\r\nabcd") * 50
    head = b"POST /upload HTTP/1.1\r\nHost: " + host1 + b"\r\n"
    if framing.startswith("chunked"):
        body = _chunked(payload, 1000, odd=smuggled if framing == "chunked-odd" else b"")
        head += b"Transfer-Encoding: chunked\r\n\r\n"
    else:
        body = payload
        head += b"Content-Length: %d\r\n\r\n" % len(payload)
    answer = await raw_request(stack.edge.public_port, head + body + _get(host1, close=True))
    responses = answer.split(b"HTTP/1.1 ")[1:]
    assert len(responses) == 2 and all(r.startswith(b"200 ") for r in responses), answer
    upload = orjson.loads(responses[0].split(b"\r\n\r\n", 1)[1])
    assert upload == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    assert responses[1].endswith(b"hello from origin"), answer
    assert (one.requests, two.connections) == (2, 0)


async def test_h2_streams_of_one_connection_reach_each_sandboxs_own_service(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """One HTTP/2 connection, a stream for sb1 then one for sb2 (the certificate covers both):
    each is routed by its own :authority to its own sandbox's service; a third stream with sb2's
    port but sb1's token reaches nobody (404 INVALID_TOKEN)."""
    stack = await tls_stack(ca, tmp_path)
    try:
        one, two = await stack.origin(), await stack.origin()
        await stack.agent("sb1")
        await stack.agent("sb2")
        url1 = (await stack.expose("sb1", one.port, token="tokenone"))["exposedAt"]
        url2 = (await stack.expose("sb2", two.port, token="tokentwo"))["exposedAt"]
        async with RawH2(stack, ca, host_of(url1)) as client:
            first = client.request(b"GET", b"/headers")
            await client.send()
            client.host = host_of(url2)
            second = client.request(b"GET", b"/headers")
            await client.send()
            seen = []
            for sid in (first, second):  # RawH2.response drops other streams' events
                headers, body, _ = await client.response(sid)
                assert headers[b":status"] == b"200", (headers, body)
                seen.append(dict((n.lower(), v) for n, v in orjson.loads(body))["x-sandbox-name"])
            assert seen == ["sb1", "sb2"]
            client.host = host_of(url2).replace("tokentwo", "tokenone")
            third = client.request(b"GET", b"/")
            await client.send()
            headers, body, _ = await client.response(third)
            assert headers[b":status"] == b"404" and orjson.loads(body)["code"] == "INVALID_TOKEN"
        assert (one.requests, two.requests) == (1, 1)
    finally:
        await stack.close()


async def test_token_less_mode_opens_only_exposed_ports_and_switching_back_restores_the_urls(
    tmp_path: Path,
) -> None:
    """'Token-less mode is a whole-edge switch (tokens = false). Tokens are still generated and
    stored, so switching back restores the same URLs; with tokens off, exposure alone grants
    access.' Three edges in turn on one sqlite store: tokens on (expose port A), off (A answers
    without a token, an unexposed port B whose service listens does not; expose B), on again
    (A's URL is the one of the first edge, B's has a token, and the token-less names of both
    reach nobody)."""
    a, b = Origin(), Origin()
    await a.start()
    await b.start()

    async def edge(**config: object) -> Stack:
        stack = Stack(**config)
        stack.store = SqliteStore.open(tmp_path)
        await stack.start()
        await stack.agent("sb1")
        return stack

    def label(url: str) -> str:  # the URL's host label: the edge's port differs each time
        return url.split("//", 1)[1].split(".", 1)[0]

    async def status(stack: Stack, host: str) -> int:
        assert stack.edge is not None
        request = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode()
        answer = await raw_request(stack.edge.public_port, request)
        return int(answer.split(b" ", 2)[1])

    try:
        first = await edge()
        try:
            url_a = (await first.expose("sb1", a.port))["exposedAt"]
        finally:
            await first.close()
        assert re.fullmatch(rf"{a.port}-sb1-[a-z0-9]{{16}}", label(url_a)), url_a

        off = await edge(tokens=False)
        try:
            assert await status(off, f"{a.port}-sb1.localhost") == 200
            assert await status(off, f"{b.port}-sb1.localhost") == 404  # not exposed
            assert b.connections == 0
            url_b = (await off.expose("sb1", b.port))["exposedAt"]
            assert label(url_b) == f"{b.port}-sb1", url_b
            assert await status(off, f"{b.port}-sb1.localhost") == 200
        finally:
            await off.close()
        served = (a.requests, b.requests)
        assert served == (1, 1)

        on = await edge()
        try:
            assert on.admin is not None
            listed = (await on.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
            urls = {p["port"]: label(p["exposedAt"]) for p in listed}
            assert urls[a.port] == label(url_a)  # the same URL as before token-less mode
            assert re.fullmatch(rf"{b.port}-sb1-[a-z0-9]{{16}}", urls[b.port]), urls
            for port in (a.port, b.port):
                assert await status(on, f"{port}-sb1.localhost") == 404  # a token is needed
            assert (a.requests, b.requests) == served
            for port in (a.port, b.port):
                assert await status(on, f"{urls[port]}.localhost") == 200
        finally:
            await on.close()
        assert (a.requests, b.requests) == (2, 2)
    finally:
        await a.close()
        await b.close()
