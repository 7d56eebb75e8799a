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
  own sandbox's service.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest
import trustme

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
    stack: Stack,
) -> None:
    """On a connection routed to sb1, a request with sb2's valid preview Host (its own token,
    its agent connected) is answered 421 MISDIRECTED_REQUEST after sb1's response, and reaches
    neither service: sb2's service never sees a connection, sb1's serves only the first."""
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


def _chunked(payload: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(payload), size):
        piece = payload[i : i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_that_holds_another_sandboxs_request_is_only_a_body(
    stack: Stack, framing: str
) -> None:
    """An upload to sb1 whose body is made of request heads for sb2 (and, chunked, of bytes
    that look like the last chunk followed by such a head) arrives at sb1's service unchanged
    (its length and SHA-256), the request after it is sb1's again, and sb2's service sees
    nothing: the edge's framing ends the body exactly where sb1's service does."""
    one, host1, two, host2 = await _two_sandboxes(stack)
    assert stack.edge is not None
    smuggled = _get(host2) + b"POST /upload HTTP/1.1\r\nHost: " + host2 + b"\r\n"
    payload = (b"0\r\n\r\n" + smuggled + b"Content-Length: 4\r\n\r\nabcd") * 50
    head = b"POST /upload HTTP/1.1\r\nHost: " + host1 + b"\r\n"
    if framing == "chunked":
        body = _chunked(payload, 1000)
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
