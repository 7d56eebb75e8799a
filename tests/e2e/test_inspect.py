"""Request inspection (tunneld/inspect.py): records of what a preview URL served, only when
asked, bounded, redacted; read through the admin API, the SDK and the CLI (``tunneld inspect``,
``tunneld replay`` as real processes)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from tunneld.client import NotFoundError, TunnelClient

from .conftest import Stack, wait_until
from .origin import pattern_sha256

pytestmark = pytest.mark.anyio


@pytest.fixture
async def small() -> AsyncIterator[Stack]:
    """A stack keeping 1000 body bytes per request and per response."""
    stack = await Stack(inspect_body_bytes=1000).start()
    try:
        yield stack
    finally:
        await stack.close()


async def _url(stack: Stack, port: int | None = None, **expose: object) -> str:
    if port is None:
        port = (await stack.origin()).port
    if not any(True for _ in stack.agents):
        await stack.agent("sb1")
    return (await stack.expose("sb1", port, **expose))["exposedAt"]


async def _records(stack: Stack, since: int = 0) -> list[dict]:
    assert stack.admin is not None
    r = await stack.admin.get("/v1/sandboxes/sb1/requests", params={"since": since})
    assert r.status_code == 200, r.text
    return r.json()["requests"]


async def _record(stack: Stack, rid: int) -> dict:
    assert stack.admin is not None
    r = await stack.admin.get(f"/v1/sandboxes/sb1/requests/{rid}")
    assert r.status_code == 200, r.text
    return r.json()


async def _inspect(stack: Stack, on: bool = True) -> None:
    assert stack.admin is not None
    if on:
        r = await stack.admin.put("/v1/sandboxes/sb1/inspect")
    else:
        r = await stack.admin.delete("/v1/sandboxes/sb1/inspect")
    assert r.status_code == 200 and r.json()["inspect"] is on, r.text


async def test_records_appear_only_when_inspection_is_on(stack: Stack) -> None:
    url = await _url(stack)
    async with stack.client(url) as client:
        assert (await client.get("/")).status_code == 200
        await _inspect(stack)
        # a connection opened before the switch stays unrecorded (decided once per connection)
        assert (await client.get("/")).status_code == 200
    assert await _records(stack) == []
    async with stack.client(url) as client:  # decided per connection: a new one
        r = await client.get("/headers?x=1", headers={"x-trace": "abc"})
        assert r.status_code == 200
    await wait_until(lambda: stack.edge.inspector.ring("sb1").records, 5, "a record")  # type: ignore[union-attr]
    (summary,) = await _records(stack)
    assert summary["method"] == "GET" and summary["target"] == "/headers?x=1"
    assert summary["status"] == 200 and summary["state"] == "complete"
    assert summary["responseBytes"] == len(r.content)
    full = await _record(stack, summary["id"])
    assert ["x-trace", "abc"] in full["request"]["headers"]
    assert r.headers["x-request-id"] == summary["requestId"]  # the access log's path
    assert dict(r.json())["x-request-id"] == summary["requestId"]  # the service got it
    assert full["response"]["status"] == 200
    assert full["response"]["body"] == r.text and full["response"]["bodyTruncated"] is False
    # off again: new connections are not recorded, the records stay readable
    await _inspect(stack, False)
    async with stack.client(url) as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/")).status_code == 200
    assert [x["id"] for x in await _records(stack)] == [summary["id"]]


async def test_per_exposure_inspection_records_that_port_only(stack: Stack) -> None:
    inspected_origin, plain_origin = await stack.origin(), await stack.origin()
    inspected = await _url(stack, inspected_origin.port, inspect=True)
    plain = await _url(stack, plain_origin.port)
    assert stack.admin is not None
    ports = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
    assert {p["port"]: p.get("inspect", False) for p in ports} == {
        inspected_origin.port: True,
        plain_origin.port: False,
    }
    async with stack.client(plain) as client:
        assert (await client.get("/?plain")).status_code == 200
    async with stack.client(inspected) as client:
        assert (await client.get("/?inspected")).status_code == 200
    await wait_until(lambda: stack.edge.inspector.ring("sb1").records, 5)  # type: ignore[union-attr]
    rows = await _records(stack)
    assert [(r["target"], r["port"]) for r in rows] == [("/?inspected", inspected_origin.port)]
    state = (await stack.admin.get("/v1/sandboxes/sb1/inspect")).json()
    assert state["inspect"] is False  # the sandbox switch stays off
    # the sandbox switch on: every port is recorded
    await _inspect(stack)
    async with stack.client(plain) as client:
        assert (await client.get("/?plain-now")).status_code == 200
    await wait_until(lambda: len(stack.edge.inspector.ring("sb1").records) == 2, 5)  # type: ignore[union-attr]
    assert (await _records(stack))[-1]["target"] == "/?plain-now"


async def test_the_ring_keeps_the_last_100_requests(stack: Stack) -> None:
    url = await _url(stack)
    await _inspect(stack)
    async with stack.client(url) as client:
        for i in range(101):
            assert (await client.get(f"/?n={i}")).status_code == 200
    ring = stack.edge.inspector.ring("sb1")  # type: ignore[union-attr]
    await wait_until(lambda: ring is not None and ring.since(0)[-1].target == "/?n=100", 5)
    rows = await _records(stack)
    assert len(rows) == 100
    assert rows[0]["target"] == "/?n=1" and rows[-1]["target"] == "/?n=100"  # n=0 evicted
    first = rows[0]["id"] - 1
    assert stack.admin is not None
    r = await stack.admin.get(f"/v1/sandboxes/sb1/requests/{first}")
    assert r.status_code == 404 and r.json()["code"] == "REQUEST_NOT_FOUND"
    # since= gives only newer ones (polling)
    assert [x["target"] for x in await _records(stack, rows[-2]["id"])] == ["/?n=100"]


async def test_body_prefixes_are_capped_and_sizes_timings_are_plausible(small: Stack) -> None:
    url = await _url(small)
    await _inspect(small)
    body = os.urandom(5000)
    async with small.client(url) as client:
        r = await client.post("/upload", content=body)
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()  # relayed whole
        r = await client.get("/bytes", params={"n": 300_000, "seed": 2})
        assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(300_000, 2)
    await wait_until(lambda: len(small.edge.inspector.ring("sb1").records) == 2, 5)  # type: ignore[union-attr]
    upload, download = await _records(small)
    up = await _record(small, upload["id"])
    assert up["request"]["bodySize"] == 5000 and up["request"]["bodyCaptured"] == 1000
    assert up["request"]["bodyTruncated"] is True and up["requestBytes"] == 5000
    assert up["request"]["bodyEncoding"] == "base64"
    import base64

    assert base64.b64decode(up["request"]["body"]) == body[:1000]
    down = await _record(small, download["id"])
    assert down["responseBytes"] == 300_000 and down["response"]["bodyCaptured"] == 1000
    assert down["response"]["bodyTruncated"] is True
    for row in (up, down):
        assert row["state"] == "complete" and row["status"] == 200
        assert 0 <= row["ttfbMs"] <= row["durationMs"] < 30_000
        assert row["client"] == "127.0.0.1" and row["port"] > 0 and row["sandbox"] == "sb1"


async def test_credentials_are_redacted(stack: Stack) -> None:
    port = await _raw_origin(
        stack, b"HTTP/1.1 200 OK\r\nset-cookie: sid=SECRET3\r\ncontent-length: 2\r\n\r\nok"
    )
    url = await _url(stack, port)
    await _inspect(stack)
    async with stack.client(url) as client:
        r = await client.get(
            "/",
            headers={
                "authorization": "Bearer SECRET1",
                "cookie": "sid=SECRET2",
                "proxy-authorization": "Basic SECRET4",
                "x-other": "visible",
            },
        )
        assert r.status_code == 200 and r.headers["set-cookie"] == "sid=SECRET3"  # untouched
    await wait_until(lambda: stack.edge.inspector.ring("sb1").records, 5)  # type: ignore[union-attr]
    (row,) = await _records(stack)
    full = await _record(stack, row["id"])
    text = str(full)
    for secret in ("SECRET1", "SECRET2", "SECRET3", "SECRET4"):
        assert secret not in text
    request = dict((n.lower(), v) for n, v in full["request"]["headers"])
    assert request["authorization"] == request["cookie"] == "[redacted]"
    assert request["proxy-authorization"] == "[redacted]" and request["x-other"] == "visible"
    assert ["set-cookie", "[redacted]"] in full["response"]["headers"]


async def test_redaction_can_be_turned_off() -> None:
    stack = await Stack(inspect_redact=False).start()
    try:
        url = await _url(stack)
        await _inspect(stack)
        async with stack.client(url) as client:
            await client.get("/", headers={"authorization": "Bearer SECRET1"})
        await wait_until(lambda: stack.edge.inspector.ring("sb1").records, 5)  # type: ignore[union-attr]
        (row,) = await _records(stack)
        assert ["authorization", "Bearer SECRET1"] in (await _record(stack, row["id"]))["request"][
            "headers"
        ]
    finally:
        await stack.close()


async def test_chunked_request_and_response_are_recorded_complete(stack: Stack) -> None:
    url = await _url(stack)
    await _inspect(stack)

    async def parts() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"part%d-" % i

    async with stack.client(url) as client:
        r = await client.get("/chunked", params={"n": 70_000})
        assert len(r.content) == 70_000
        r = await client.post("/echo", content=parts())
        assert r.content == b"part0-part1-part2-"
    await wait_until(lambda: len(stack.edge.inspector.ring("sb1").records) == 2, 5)  # type: ignore[union-attr]
    chunked, echo = await _records(stack)
    assert chunked["state"] == "complete" and chunked["responseBytes"] >= 70_000
    full = await _record(stack, echo["id"])
    assert full["state"] == "complete" and full["status"] == 200
    assert b"part0-" in full["request"]["body"].encode()  # wire bytes, chunk framing kept
    assert (
        full["request"]["body"].endswith("0\r\n\r\n") and full["request"]["bodyTruncated"] is False
    )
    assert ["transfer-encoding", "chunked"] in [
        [n.lower(), v] for n, v in full["request"]["headers"]
    ]


async def _raw_origin(stack: Stack, response: bytes, *, reset: bool = False) -> int:
    """A one-answer service: reads a request head, writes ``response``, then closes (with RST
    when ``reset``)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
            if reset:
                await asyncio.sleep(0.05)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            await reader.read(65536)  # until the client (the agent) closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    stack.origins.append(_Closer(server))  # type: ignore[arg-type]
    return server.sockets[0].getsockname()[1]


class _Closer:
    def __init__(self, server: asyncio.Server) -> None:
        self.server = server

    async def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n",  # length says more
        b"HTTP/1.1 200 OK\r\n\r\n",  # until close: a reset is not the close that ends it
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n",
    ],
    ids=["length", "until-close", "chunked"],
)
async def test_a_response_cut_by_a_reset_is_recorded_aborted(stack: Stack, head: bytes) -> None:
    port = await _raw_origin(stack, head + b"x" * 100, reset=True)
    url = await _url(stack, port)
    await _inspect(stack)
    async with stack.client(url) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get("/cut")
    await wait_until(lambda: stack.edge.inspector.ring("sb1").records, 5)  # type: ignore[union-attr]
    (row,) = await _records(stack)
    assert row["state"] == "aborted" and row["note"] == "response cut short"
    assert row["status"] == 200  # its head was seen
    full = await _record(stack, row["id"])
    assert full["response"]["status"] == 200


async def test_an_unanswered_request_is_aborted_and_an_edge_error_is_recorded(stack: Stack) -> None:
    port = await _raw_origin(stack, b"", reset=True)
    url = await _url(stack, port)
    await _inspect(stack)
    async with stack.client(url) as client:
        r = await client.get("/nothing")
        assert r.status_code == 502  # the edge's page: closed/reset before any byte
    # a port with nothing listening: the edge answers 502 UPSTREAM_CONNECT_FAILED
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    dead_url = await _url(stack, dead)
    async with stack.client(dead_url) as client:
        assert (await client.get("/dead")).status_code == 502
    await wait_until(lambda: len(stack.edge.inspector.ring("sb1").records) == 2, 5)  # type: ignore[union-attr]
    first, second = await _records(stack)
    assert first["target"] == "/nothing" and first["state"] == "edge" and first["status"] == 502
    assert second["state"] == "edge" and second["note"] == "edge: UPSTREAM_CONNECT_FAILED"


async def test_sdk_reads_records_and_follows(stack: Stack) -> None:
    url = await _url(stack)
    assert stack.edge is not None
    async with TunnelClient(
        f"http://127.0.0.1:{stack.edge.admin_port}", token=stack.admin_token
    ) as client:
        sb = client.sandbox("sb1")
        assert await sb.set_inspection(True) is True
        assert await sb.requests() == []
        waiting = asyncio.ensure_future(sb.requests(since=0, wait=20))
        await asyncio.sleep(0.1)  # a pace: the long-poll is parked before the request
        assert not waiting.done()
        async with stack.client(url) as http:
            assert (await http.get("/?followed")).status_code == 200
        (row,) = await asyncio.wait_for(waiting, 10)
        assert row["target"] == "/?followed"
        full = await sb.request(row["id"])
        assert full["response"]["body"] == "hello from origin"
        with pytest.raises(NotFoundError):
            await sb.request(row["id"] + 1000)
        assert await sb.set_inspection(False) is False


async def test_follow_waits_for_the_next_request(stack: Stack) -> None:
    url = await _url(stack)
    await _inspect(stack)
    assert stack.admin is not None
    polling = asyncio.ensure_future(
        stack.admin.get("/v1/sandboxes/sb1/requests", params={"since": 0, "follow": 1})
    )
    await asyncio.sleep(0.1)  # a pace: parked before the request is made
    assert not polling.done()
    async with stack.client(url) as client:
        assert (await client.get("/?next")).status_code == 200
    r = await asyncio.wait_for(polling, 10)
    assert [x["target"] for x in r.json()["requests"]] == ["/?next"]
    # nothing newer: an empty list once the wait is over
    r = await stack.admin.get(
        "/v1/sandboxes/sb1/requests", params={"since": r.json()["last"], "wait": 0}
    )
    assert r.json()["requests"] == []


async def test_admin_errors_are_clear(stack: Stack) -> None:
    assert stack.admin is not None
    r = await stack.admin.get("/v1/sandboxes/sb1/requests", params={"since": "x"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST"
    r = await stack.admin.post("/v1/sandboxes/sb1/inspect")
    assert r.status_code == 405 and r.json()["code"] == "METHOD_NOT_ALLOWED"
    r = await stack.admin.get("/v1/sandboxes/sb1/requests/abc")
    assert r.status_code == 404 and r.json()["code"] == "REQUEST_NOT_FOUND"
    r = await stack.admin.get("/v1/sandboxes/BAD!/requests")
    assert r.status_code == 400
    assert stack.edge is not None
    async with httpx.AsyncClient() as anonymous:
        r = await anonymous.get(
            f"http://127.0.0.1:{stack.edge.admin_port}/v1/sandboxes/sb1/requests"
        )
    assert r.status_code == 401


# -- the CLI, as real processes ----------------------------------------------------------------


def _env(stack: Stack) -> dict[str, str]:
    assert stack.edge is not None
    env = dict(os.environ)
    env.pop("TUNNELD_ADMIN_TOKEN_FILE", None)
    env["TUNNELD_ADMIN_TOKEN"] = stack.admin_token
    env["TUNNELD_ADMIN_URL"] = f"http://127.0.0.1:{stack.edge.admin_port}"
    return env


async def _cli(stack: Stack, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tunneld.cli",
        *args,
        env=env or _env(stack),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_inspect_prints_one_line_per_request(stack: Stack) -> None:
    url = await _url(stack)
    await _inspect(stack)
    async with stack.client(url) as client:
        await client.get("/")
        await client.post("/upload", content=b"abc")
    await wait_until(lambda: len(stack.edge.inspector.ring("sb1").records) == 2, 5)  # type: ignore[union-attr]
    ids = [r["id"] for r in await _records(stack)]
    code, out, err = await _cli(stack, "inspect", "sb1")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert " GET / 200 in=0B out=17B " in lines[0] and lines[0].endswith(f"id={ids[0]}")
    assert " POST /upload 200 in=3B " in lines[1] and lines[1].endswith(f"id={ids[1]}")
    code, out, err = await _cli(stack, "inspect", "sb1", "--since", str(ids[0]))
    assert code == 0 and out.splitlines() == lines[1:], err
    code, out, err = await _cli(stack, "inspect", "sb1", "--json")
    assert code == 0, err
    import orjson

    assert [orjson.loads(line)["id"] for line in out.splitlines()] == ids
    # no token: a message and exit 2, no traceback
    env = _env(stack)
    del env["TUNNELD_ADMIN_TOKEN"]
    code, out, err = await _cli(stack, "inspect", "sb1", env=env)
    assert code == 2 and "no admin token" in err and "Traceback" not in err
    env = _env(stack)
    env["TUNNELD_ADMIN_TOKEN"] = "wrong"
    code, out, err = await _cli(stack, "inspect", "sb1", env=env)
    assert code == 1 and "Traceback" not in err and err.startswith("tunneld inspect:")


async def test_cli_inspect_follow_sees_a_new_request(stack: Stack) -> None:
    url = await _url(stack)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tunneld.cli",
        "inspect",
        "sb1",
        "--follow",
        "--enable",
        env=_env(stack),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert stack.edge is not None
        await wait_until(lambda: stack.edge.inspector.enabled("sb1"), 20, "--enable")  # type: ignore[union-attr]
        async with stack.client(url) as client:
            assert (await client.get("/?seen-by-follow")).status_code == 200
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert " GET /?seen-by-follow 200 " in line
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_cli_replay_sends_the_request_again(small: Stack) -> None:
    origin = await small.origin()
    url = await _url(small, origin.port)
    await _inspect(small)
    async with small.client(url) as client:
        r = await client.post("/upload", content=b"replay me", headers={"authorization": "x"})
        assert r.json()["length"] == 9
        r = await client.post("/upload", content=b"y" * 3000)
    await wait_until(lambda: len(small.edge.inspector.ring("sb1").records) == 2, 5)  # type: ignore[union-attr]
    whole, cut = await _records(small)
    assert small.edge is not None
    connect = f"127.0.0.1:{small.edge.public_port}"
    before = origin.requests
    code, out, err = await _cli(small, "replay", "sb1", str(whole["id"]), "--connect", connect)
    assert code == 0, err
    assert f"replayed {whole['id']}: POST /upload -> 200 (" in out
    assert "authorization was redacted" in err
    assert origin.requests == before + 1
    await wait_until(lambda: len(small.edge.inspector.ring("sb1").records) == 3, 5)  # type: ignore[union-attr]
    again = await _record(small, (await _records(small))[-1]["id"])
    assert again["request"]["body"] == "replay me" and again["status"] == 200
    assert '"length":9' in again["response"]["body"]
    # a truncated body is refused, and says why; --force sends the recorded part
    code, out, err = await _cli(small, "replay", "sb1", str(cut["id"]), "--connect", connect)
    assert code == 2 and "truncated" in err and "--force" in err and origin.requests == before + 1
    code, out, err = await _cli(
        small, "replay", "sb1", str(cut["id"]), "--connect", connect, "--force"
    )
    assert code == 0 and "-> 200" in out, err
    await wait_until(lambda: len(small.edge.inspector.ring("sb1").records) == 4, 5)  # type: ignore[union-attr]
    forced = await _record(small, (await _records(small))[-1]["id"])
    assert '"length":1000' in forced["response"]["body"]
    code, out, err = await _cli(small, "replay", "sb1", "999999", "--connect", connect)
    assert code == 1 and "Traceback" not in err


# -- a cluster: the records live on the owner node --------------------------------------------


async def test_in_a_cluster_records_are_on_the_owner_and_other_nodes_say_so(
    redis_server: object,
) -> None:
    from tests.cluster.nodes import Cluster, wait_for

    cluster = Cluster(redis_server)  # type: ignore[arg-type]
    try:
        a, b = await cluster.node("node-a"), await cluster.node("node-b")
        origin = await cluster.origin()
        await cluster.agent(b, "sb1")
        r = await a.admin.post(
            "/v1/sandboxes/sb1/ports", json={"port": origin.port, "inspect": True}
        )
        assert r.status_code == 200, r.text
        url = r.json()["exposedAt"]
        for node in (a, b):
            await wait_for(lambda n=node: n.edge.registry.exposures("sb1"), what="the exposure")
            await wait_for(
                lambda n=node: n.edge.cluster.owners.get("sb1", ("",))[0] == "node-b",
                what="the owner",
            )
        async with a.public(url) as client:  # lands on A, served (and parsed) by B
            assert (await client.get("/?via-a")).status_code == 200
        await wait_for(
            lambda: b.edge.inspector.ring("sb1") and b.edge.inspector.ring("sb1").records
        )
        r = await b.admin.get("/v1/sandboxes/sb1/requests")
        assert [x["target"] for x in r.json()["requests"]] == ["/?via-a"]
        assert a.edge.inspector.ring("sb1") is None  # nothing recorded on the landing node
        for method in ("GET", "PUT"):
            path = "/v1/sandboxes/sb1/requests" if method == "GET" else "/v1/sandboxes/sb1/inspect"
            r = await a.admin.request(method, path)
            assert r.status_code == 409 and r.json()["code"] == "WRONG_NODE", r.text
            assert "node-b" in r.json()["error"]
    finally:
        await cluster.close()
