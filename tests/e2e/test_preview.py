"""Preview URLs end to end: HTTP through edge -> agent -> origin, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import hashlib
import socket

import httpx
import orjson
import pytest

from .conftest import Stack, raw_request, wait_until
from .origin import pattern, pattern_sha256

pytestmark = pytest.mark.anyio


async def _exposed(stack: Stack, sandbox: str = "sb1"):
    origin = await stack.origin()
    await stack.agent(sandbox)
    exposed = await stack.expose(sandbox, origin.port)
    return origin, exposed


async def test_get_and_post(any_parser_stack: Stack) -> None:
    stack = any_parser_stack
    origin, exposed = await _exposed(stack)
    assert exposed["exposedAt"].startswith(f"http://{origin.port}-sb1-")
    async with stack.client(exposed["exposedAt"]) as client:
        r = await client.get("/")
        assert r.status_code == 200 and r.content == b"hello from origin"
        r = await client.post("/upload", content=b"x" * 100_000)
        assert r.json() == {"length": 100_000, "sha256": hashlib.sha256(b"x" * 100_000).hexdigest()}


async def test_forwarded_headers_and_spoofing(any_parser_stack: Stack) -> None:
    stack = any_parser_stack
    origin, exposed = await _exposed(stack)
    host = stack.host_of(exposed["exposedAt"])
    async with stack.client(exposed["exposedAt"]) as client:
        r = await client.get(
            "/headers",
            headers={
                "X-Tunnel-Internal": "spoof",
                "X-Sandbox-Name": "other",
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Host": "evil.example",
                "Forwarded": "for=6.6.6.6",
                "X-Real-IP": "6.6.6.6",
                "X-Custom": "kept",
            },
        )
    headers = [(n.lower(), v) for n, v in r.json()]
    names = [n for n, _ in headers]
    assert ("host", f"localhost:{origin.port}") in headers
    assert ("x-forwarded-for", "127.0.0.1") in headers
    assert ("x-forwarded-host", host) in headers
    assert ("x-forwarded-proto", "http") in headers
    assert ("x-sandbox-name", "sb1") in headers
    assert ("x-custom", "kept") in headers
    assert (
        "x-tunnel-internal" not in names and "forwarded" not in names and "x-real-ip" not in names
    )
    assert names.count("x-forwarded-for") == 1 and names.count("x-sandbox-name") == 1
    assert "6.6.6.6" not in r.text and "evil.example" not in r.text and "other" not in r.text


async def test_keepalive_100_sequential(any_parser_stack: Stack) -> None:
    stack = any_parser_stack
    origin, exposed = await _exposed(stack)
    async with stack.client(exposed["exposedAt"]) as client:
        for i in range(100):
            r = await client.get("/", params={"i": i})
            assert r.status_code == 200
    assert origin.requests == 100
    assert origin.connections == 1  # one client connection = one stream = one origin connection


async def test_pipelined_requests(any_parser_stack: Stack) -> None:
    stack = any_parser_stack
    _origin, exposed = await _exposed(stack)
    host = stack.host_of(exposed["exposedAt"]).encode()
    one = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    last = b"GET /slow-close HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    data = await raw_request(stack.edge.public_port, one * 5 + last)
    assert data.count(b"HTTP/1.1 200") == 6
    assert data.count(b"hello from origin") == 5


async def test_chunked_request_body(any_parser_stack: Stack) -> None:
    stack = any_parser_stack
    _, exposed = await _exposed(stack)

    async def body():
        for i in range(50):
            yield bytes([i]) * 1000

    expected = b"".join(bytes([i]) * 1000 for i in range(50))
    async with stack.client(exposed["exposedAt"]) as client:
        r = await client.post("/upload", content=body())
        assert r.json() == {"length": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}
        # the connection is still usable after a chunked body: the next head was found correctly
        r = await client.get("/")
        assert r.content == b"hello from origin"


async def test_sse_first_event_before_origin_finishes(stack: Stack) -> None:
    origin, exposed = await _exposed(stack)
    async with stack.client(exposed["exposedAt"]) as client, client.stream("GET", "/sse") as r:
        lines = r.aiter_lines()
        first = await asyncio.wait_for(lines.__anext__(), 5)
        assert first == "data: first"
        assert not origin.sse_finished
        origin.sse_release.set()
        rest = [line async for line in lines if line]
    assert rest == ["data: second", "data: third"]
    assert origin.sse_finished


async def test_200_concurrent_clients(stack: Stack) -> None:
    origin, exposed = await _exposed(stack)
    sizes = [(i * 7919) % 200_000 + 1 for i in range(200)]

    # One client whose pool opens 200 connections at once. (A client per request built 200 SSL
    # contexts synchronously, ~40 ms each: the event loop that also runs the edge and the agent
    # froze for 8-20 s on a busy machine, and the edge rightly declared the agent dead.)
    limits = httpx.Limits(max_connections=len(sizes), max_keepalive_connections=0)
    async with stack.client(exposed["exposedAt"], limits=limits) as client:

        async def one(i: int, n: int) -> None:
            r = await client.get("/bytes", params={"n": n, "seed": i})
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(n, i)

        await asyncio.wait_for(asyncio.gather(*(one(i, n) for i, n in enumerate(sizes))), 120)
    assert origin.connections >= len(sizes)  # one client connection = one stream = one dial


@pytest.mark.slow
async def test_download_1gib_integrity(stack: Stack) -> None:
    _, exposed = await _exposed(stack)
    n = 1 << 30
    h = hashlib.sha256()
    got = 0
    async with stack.client(exposed["exposedAt"], timeout=120) as client:
        async with client.stream("GET", "/bytes", params={"n": n, "seed": 7}) as r:
            async for chunk in r.aiter_raw():
                h.update(chunk)
                got += len(chunk)
    assert got == n
    assert h.hexdigest() == pattern_sha256(n, 7)


@pytest.mark.slow
async def test_upload_256mib_integrity(stack: Stack) -> None:
    _, exposed = await _exposed(stack)
    n = 256 << 20

    async def body():
        for piece in pattern(n, 9):
            yield piece

    async with stack.client(exposed["exposedAt"], timeout=120) as client:
        r = await client.post("/upload", content=body(), headers={"content-length": str(n)})
    assert r.json() == {"length": n, "sha256": pattern_sha256(n, 9)}


async def test_errors_unknown_token_and_unexposed_port_look_the_same(stack: Stack) -> None:
    origin, exposed = await _exposed(stack)
    url = exposed["exposedAt"]
    token = stack.host_of(url).split(".")[0].rsplit("-", 1)[1]
    bad_token = url.replace(token, "wrongtoken")
    unexposed = url.replace(
        f"{origin.port}-", f"{origin.port + 1 if origin.port < 65535 else 1025}-"
    )
    answers = []
    for u in (bad_token, unexposed):
        async with stack.client(u) as client:
            r = await client.get("/")
        answers.append((r.status_code, r.json()))
    assert (
        answers[0]
        == answers[1]
        == (
            404,
            {"error": "Access denied: Invalid token or port not exposed", "code": "INVALID_TOKEN"},
        )
    )


async def test_unknown_host_is_404_json(stack: Stack) -> None:
    async with stack.client("http://example.com/") as client:
        r = await client.get("/")
    assert r.status_code == 404
    assert r.json()["code"] == "UNKNOWN_HOST"


async def test_nothing_listening_is_502(stack: Stack) -> None:
    await stack.agent("sb1")
    # A port bound but not listening refuses connections, and stays ours for the whole test
    # (a closed listener's port could be taken by anyone meanwhile).
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        exposed = await stack.expose("sb1", port)
        async with stack.client(exposed["exposedAt"]) as client:
            r = await client.get("/")
    assert r.status_code == 502
    assert r.json() == {
        "error": f"Nothing is listening on port {port} in sandbox sb1.",
        "code": "UPSTREAM_CONNECT_FAILED",
    }


async def test_agent_stopped_is_503(stack: Stack) -> None:
    _origin, exposed = await _exposed(stack)
    agent, _ = stack.agents[0]
    await agent.stop()
    await wait_until(
        lambda: stack.edge.registry.get("sb1").session is None, 5, "the edge to drop the session"
    )
    async with stack.client(exposed["exposedAt"]) as client:
        r = await client.get("/")
    assert r.status_code == 503
    assert r.json()["code"] == "SANDBOX_NOT_CONNECTED"


async def test_unexpose_closes_url_and_live_connection(stack: Stack) -> None:
    origin, exposed = await _exposed(stack)
    async with stack.client(exposed["exposedAt"]) as client:
        async with client.stream("GET", "/sse") as r:
            lines = r.aiter_lines()
            assert await asyncio.wait_for(lines.__anext__(), 5) == "data: first"
            resp = await stack.admin.delete(f"/v1/sandboxes/sb1/ports/{origin.port}")
            assert resp.status_code == 204

            async def rest() -> None:
                async for _ in lines:
                    pass

            # Cut at once and abnormally: an RST or an incomplete body, not a clean end, and
            # well before the origin would end the response by itself (it waits 30 s).
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                await asyncio.wait_for(rest(), 5)
        r = await client.get("/")
        assert r.status_code == 404 and r.json()["code"] == "INVALID_TOKEN"
    # and the agent's side of the stream (its connection to the service) is gone too
    agent, _ = stack.agents[0]
    await wait_until(lambda: not agent.session.streams, 5, "the agent to drop the stream")
    assert not origin.sse_finished
    origin.sse_release.set()


async def test_reexpose_keeps_url(stack: Stack) -> None:
    origin, exposed = await _exposed(stack)
    again = await stack.expose("sb1", origin.port)
    assert again["exposedAt"] == exposed["exposedAt"]
    await stack.admin.delete(f"/v1/sandboxes/sb1/ports/{origin.port}")
    third = await stack.expose("sb1", origin.port, token="mytoken")
    assert "-mytoken." in third["exposedAt"]


async def test_oversized_head_is_431(any_parser_stack: Stack) -> None:
    stack = any_parser_stack
    _, exposed = await _exposed(stack)
    host = stack.host_of(exposed["exposedAt"]).encode()
    data = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    answer = await raw_request(stack.edge.public_port, data)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "HEADERS_TOO_LARGE"


async def test_malformed_head_is_400(any_parser_stack: Stack) -> None:
    stack = any_parser_stack
    _, exposed = await _exposed(stack)
    host = stack.host_of(exposed["exposedAt"]).encode()
    for data in (
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: "
        + host
        + b"\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET http://other/ HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
    ):
        answer = await raw_request(stack.edge.public_port, data)
        assert answer.startswith(b"HTTP/1.1 400 "), (data, answer)


async def test_head_timeout_is_408() -> None:
    stack = await Stack(head_timeout=0.3).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(b"GET / HTTP/1.1\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
    finally:
        await stack.close()


async def test_second_request_for_other_host_is_refused(stack: Stack) -> None:
    _origin, exposed = await _exposed(stack)
    host = stack.host_of(exposed["exposedAt"]).encode()
    data = (
        b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: 9999-other-tok.localhost\r\n\r\n"
    )
    answer = await raw_request(stack.edge.public_port, data)
    assert answer.count(b"hello from origin") == 1
    assert b"HTTP/1.1 421 " in answer


async def test_later_requests_are_checked_even_when_host_bytes_differ(stack: Stack) -> None:
    """Later requests whose Host equals the first one's skip the parse; any other spelling is
    parsed and must name the same route: upper case is the same URL, another token is not."""
    _origin, exposed = await _exposed(stack)
    host = stack.host_of(exposed["exposedAt"]).encode()
    port, rest = host.split(b"-", 1)
    wrong_token = port + b"-" + rest.rsplit(b"-", 1)[0] + b"-" + b"x" * 16 + b".localhost"
    same = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    upper = b"GET / HTTP/1.1\r\nHost: " + host.upper() + b"\r\n\r\n"
    other = b"GET / HTTP/1.1\r\nHost: " + wrong_token + b"\r\n\r\n"
    answer = await raw_request(stack.edge.public_port, same + upper + same + other + same)
    assert answer.count(b"hello from origin") == 3, answer
    assert answer.count(b"HTTP/1.1 421 ") == 1, answer


async def test_idle_connections_are_closed() -> None:
    stack = await Stack(idle_timeout=1.0).start()
    try:
        origin, exposed = await _exposed(stack)
        host = stack.host_of(exposed["exposedAt"]).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert b"hello from origin" in await asyncio.wait_for(reader.read(4096), 5)
        # then silence: the edge closes the keep-alive connection, and the origin's side too
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await wait_until(lambda: origin.open_connections == 0, 5, "the origin connection to close")
    finally:
        await stack.close()


async def test_stream_limit_answers_503_and_recovers() -> None:
    stack = await Stack(max_streams=2).start()
    try:
        origin, exposed = await _exposed(stack)
        host = stack.host_of(exposed["exposedAt"]).encode()
        held = []
        for _ in range(2):  # two live streams: SSE responses that stay open
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
            writer.write(b"GET /sse HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert b"data: first" in await asyncio.wait_for(reader.readuntil(b"first"), 5)
            held.append(writer)
        answer = await raw_request(
            stack.edge.public_port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "SANDBOX_BUSY"
        for writer in held:
            writer.close()
        origin.sse_release.set()
        for _ in range(100):  # the streams are released, new connections work again
            answer = await raw_request(
                stack.edge.public_port,
                b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
            )
            if answer.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        await stack.close()


async def test_random_garbage_never_crashes_the_listeners(stack: Stack) -> None:
    """Random bytes (and random bytes after a valid head) on every listener: an HTTP error or a
    close, never a traceback in a callback (the autouse fixture fails on those) or a hang."""
    import random

    _, exposed = await _exposed(stack)
    host = stack.host_of(exposed["exposedAt"]).encode()
    rng = random.Random(1234)
    valid = b"POST /upload HTTP/1.1\r\nHost: " + host + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    for i in range(60):
        junk = rng.randbytes(rng.randrange(1, 3000))
        if i % 3 == 1:
            junk = b"GET / HTTP/1.1\r\n" + junk.replace(b"\r\n\r\n", b"") + b"\r\n\r\n"
        elif i % 3 == 2:
            junk = valid + junk
        port = (stack.edge.public_port, stack.edge.agent_port, stack.edge.admin_port)[i % 3]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(junk)
        writer.write_eof()  # an incomplete head would otherwise wait for head_timeout (408)
        try:
            answer = await asyncio.wait_for(reader.read(), 15)
        except ConnectionResetError:
            answer = b""
        writer.close()
        assert not answer or answer.startswith(b"HTTP/1.1 "), answer[:80]
    # still serving
    async with stack.client(exposed["exposedAt"]) as client:
        assert (await client.get("/")).status_code == 200
