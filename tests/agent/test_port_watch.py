"""``POST /api/port-watch`` over real sockets: Cloudflare's SSE stream, probes, bounds, cleanup.

The services under watch are real listeners on 127.0.0.1: a socket bound to port 0 but not yet
listening refuses connects (the port is ours, nothing serves it), and starts serving when the
test says so; an HTTP service answers /health with 503 a few times, then 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from agent.local_api import LocalAPI
from agent.portwatch import PortWatches, WatchSpec, spec_from_json, watch_port
from protocol.control import Exposure
from protocol.hostnames import ValidationError

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


class Controller:
    connected = True
    sandbox_id = "sb1"

    async def expose(
        self, port: int, name: str | None = None, token: str | None = None, options: Any = None
    ) -> Exposure:
        raise AssertionError("not used")

    async def unexpose(self, port: int) -> None:
        raise AssertionError("not used")

    async def list_exposures(self) -> list[Exposure]:
        return []


@pytest.fixture
async def api() -> AsyncIterator[LocalAPI]:
    async with LocalAPI(Controller(), port=0) as server:
        yield server


@pytest.fixture
async def client(api: LocalAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}", timeout=20) as c:
        yield c


class Health:
    """An HTTP service: GET /health answers 503 ``failures`` times, then 200; counts requests."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def serve(self, sock: socket.socket) -> None:
        sock.listen()
        self.server = await asyncio.start_server(self._handle, sock=sock)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.requests.append(head.split(b"\r\n", 1)[0])
        ok = head.startswith(b"GET /health ") and len(self.requests) > self.failures
        status = b"200 OK" if ok else b"503 Service Unavailable"
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield orjson.loads(line[6:])


async def watch(client: httpx.AsyncClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with client.stream("POST", "/api/port-watch", json=body) as r:
        assert r.status_code == 200
        return [e async for e in events(r)]


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- the stream --------------------------------------------------------------------------------


async def test_tcp_watch_reports_watching_then_ready_once_the_port_listens(
    client: httpx.AsyncClient, api: LocalAPI, reserved: socket.socket
) -> None:
    port = reserved.getsockname()[1]
    body = {"port": port, "mode": "tcp", "interval": 100}
    async with client.stream("POST", "/api/port-watch", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["cache-control"] == "no-cache"
        stream = events(r)
        assert await anext(stream) == {"type": "watching", "port": port}
        assert api.watches.active == 1
        server = Health(0)
        await server.serve(reserved)  # the service comes up after the watch began
        try:
            assert await anext(stream) == {"type": "ready", "port": port}
            assert [e async for e in stream] == []  # the stream ends after the last event
        finally:
            await server.close()
    await wait_until(lambda: api.watches.active == 0)


async def test_http_watch_waits_for_a_status_in_range(
    client: httpx.AsyncClient, reserved: socket.socket
) -> None:
    port = reserved.getsockname()[1]
    server = Health(failures=2)
    await server.serve(reserved)
    try:
        got = await watch(
            client, {"port": port, "mode": "http", "path": "/health", "interval": 100}
        )
    finally:
        await server.close()
    assert got == [
        {"type": "watching", "port": port},
        {"type": "ready", "port": port, "statusCode": 200},
    ]
    assert server.requests == [b"GET /health HTTP/1.1"] * 3


async def test_http_status_range_is_the_callers(
    client: httpx.AsyncClient, reserved: socket.socket
) -> None:
    port = reserved.getsockname()[1]
    server = Health(failures=1000)  # always 503
    await server.serve(reserved)
    try:
        body = {"port": port, "path": "/health", "statusMin": 500, "statusMax": 503}
        got = await watch(client, body)
    finally:
        await server.close()
    assert got[-1] == {"type": "ready", "port": port, "statusCode": 503}


async def test_timeout_ends_with_an_error_carrying_the_last_status(
    client: httpx.AsyncClient, api: LocalAPI, reserved: socket.socket
) -> None:
    port = reserved.getsockname()[1]
    server = Health(failures=1000)
    await server.serve(reserved)
    try:
        # 1.5 s: a second check is due even if this process stalls for a second meanwhile
        body = {"port": port, "path": "/health", "interval": 100, "timeout": 1500}
        got = await watch(client, body)
    finally:
        await server.close()
    assert got[0] == {"type": "watching", "port": port}
    assert got[1]["type"] == "error" and got[1]["statusCode"] == 503
    assert "HTTP 503" in got[1]["error"] and "within 1.5 s" in got[1]["error"]
    assert len(got) == 2
    assert 2 <= len(server.requests) <= 17  # every ~100 ms for 1.5 s, never faster
    assert api.watches.active == 0


async def test_nobody_listening_times_out_with_the_connect_error(
    client: httpx.AsyncClient, reserved: socket.socket
) -> None:
    port = reserved.getsockname()[1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = await watch(client, {"port": port, "mode": "tcp", "interval": 100, "timeout": 400})
    assert 0.35 <= loop.time() - started < 3
    assert [e["type"] for e in got] == ["watching", "error"]
    assert "statusCode" not in got[1]
    assert "connection refused" in got[1]["error"]


async def test_interval_is_clamped_to_100_ms(
    client: httpx.AsyncClient, reserved: socket.socket
) -> None:
    port = reserved.getsockname()[1]
    server = Health(failures=1000)
    await server.serve(reserved)
    try:
        await watch(client, {"port": port, "path": "/health", "interval": 1, "timeout": 500})
    finally:
        await server.close()
    # Unclamped, 1 ms apart, that would be hundreds of requests.
    assert 2 <= len(server.requests) <= 7


async def test_client_disconnect_stops_the_watch(
    client: httpx.AsyncClient, api: LocalAPI, reserved: socket.socket
) -> None:
    port = reserved.getsockname()[1]
    async with client.stream("POST", "/api/port-watch", json={"port": port, "mode": "tcp"}) as r:
        assert await anext(events(r)) == {"type": "watching", "port": port}
        assert api.watches.active == 1
    # httpx closed the connection without reading to the end: the watch (5 min) must stop now.
    await wait_until(lambda: api.watches.active == 0 and not api._watch_tasks)


async def test_closing_the_api_stops_its_watches(reserved: socket.socket) -> None:
    port = reserved.getsockname()[1]
    api = LocalAPI(Controller(), port=0)
    await api.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    body = orjson.dumps({"port": port, "mode": "tcp"})
    writer.write(
        b"POST /api/port-watch HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding: chunked" in head
        assert b"watching" in await reader.readuntil(b"\n\n")
    assert api.watches.active == 1
    await api.close()
    assert api.watches.active == 0 and not api._watch_tasks
    async with asyncio.timeout(5):
        rest = await reader.read()  # the end of the chunk, then EOF
    assert rest == b"\r\n"  # no terminating chunk and no result event: the watch was cut
    writer.close()


async def test_too_many_watches_is_429(reserved: socket.socket) -> None:
    port = reserved.getsockname()[1]
    async with LocalAPI(Controller(), port=0, watches=PortWatches(limit=1)) as api:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}", timeout=10) as c:
            async with c.stream("POST", "/api/port-watch", json={"port": port, "mode": "tcp"}) as r:
                assert await anext(events(r)) == {"type": "watching", "port": port}
                second = await c.post("/api/port-watch", json={"port": port, "mode": "tcp"})
                assert second.status_code == 429
                assert second.headers["content-type"] == "application/json"
                assert second.json()["code"] == "TOO_MANY_WATCHES"
                assert "limit is 1" in second.json()["message"]
            await wait_until(lambda: api.watches.active == 0)
            # The slot is free again.
            got = await watch(c, {"port": port, "mode": "tcp", "timeout": 100})
            assert got[-1]["type"] == "error"


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({}, "INVALID_PORT", "port"),
        ({"port": 3000}, "INVALID_PORT", "excluding 3000"),
        ({"port": 80}, "INVALID_PORT", "1024-65535"),
        ({"port": "8000"}, "INVALID_PORT", "8000"),
        ({"port": 8000, "mode": "udp"}, "INVALID_REQUEST", "mode"),
        ({"port": 8000, "path": "health"}, "INVALID_REQUEST", "path"),
        ({"port": 8000, "path": "/a b"}, "INVALID_REQUEST", "path"),
        ({"port": 8000, "statusMin": 400, "statusMax": 200}, "INVALID_REQUEST", "statusMin"),
        ({"port": 8000, "statusMin": 99}, "INVALID_REQUEST", "statusMin"),
        ({"port": 8000, "statusMax": True}, "INVALID_REQUEST", "statusMax"),
        ({"port": 8000, "interval": "fast"}, "INVALID_REQUEST", "interval"),
        ({"port": 8000, "interval": -5}, "INVALID_REQUEST", "interval"),
        ({"port": 8000, "timeout": 300_001}, "INVALID_REQUEST", "timeout"),
        ({"port": 8000, "colour": "red"}, "INVALID_REQUEST", "colour"),
    ],
)
async def test_bad_input_is_400_json(
    client: httpx.AsyncClient, api: LocalAPI, body: dict[str, Any], code: str, words: str
) -> None:
    r = await client.post("/api/port-watch", json=body)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    data = r.json()
    assert data["code"] == code and data["httpStatus"] == 400
    assert words in data["message"]
    assert api.watches.active == 0


async def test_bad_json_and_own_port_are_refused(client: httpx.AsyncClient, api: LocalAPI) -> None:
    r = await client.post("/api/port-watch", content=b"{nope")
    assert r.status_code == 400 and r.json()["code"] == "INVALID_JSON"
    r = await client.post("/api/port-watch", json={"port": api.port})
    assert r.status_code == 400 and "control API" in r.json()["message"]
    # The code `expose` gives for it (POST /v1/ports), not the legacy container's: Cloudflare's
    # port watch never refused a port, and only its old expose/unexpose said INVALID_PORT_NUMBER.
    assert r.json()["code"] == "INVALID_PORT"
    exposed = await client.post("/v1/ports", json={"port": api.port})
    assert (exposed.status_code, exposed.json()["code"]) == (400, "INVALID_PORT")
    legacy = await client.post("/api/expose-port", json={"port": api.port})
    assert (legacy.status_code, legacy.json()["code"]) == (400, "INVALID_PORT_NUMBER")
    r = await client.get("/api/port-watch")
    assert r.status_code == 405


async def test_process_id_is_accepted_and_ignored(
    client: httpx.AsyncClient, reserved: socket.socket
) -> None:
    port = reserved.getsockname()[1]
    got = await watch(client, {"port": port, "mode": "tcp", "processId": "p1", "timeout": 100})
    assert [e["type"] for e in got] == ["watching", "error"]


async def test_browser_requests_are_refused(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/api/port-watch", json={"port": 8000}, headers={"origin": "http://evil.example"}
    )
    assert r.status_code == 403


# -- the probe on its own ----------------------------------------------------------------------


def test_spec_defaults_are_cloudflares() -> None:
    spec = spec_from_json({"port": 8000})
    assert spec == WatchSpec(8000, "http", "/", 200, 399, 0.5, 300.0)
    assert spec_from_json({"port": 8000, "interval": 60_000}).interval == 10.0
    with pytest.raises(ValidationError):
        spec_from_json({"port": 8000, "timeout": 0})


async def test_a_service_that_is_not_http_is_not_ready(reserved: socket.socket) -> None:
    reserved.listen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, sock=reserved)
    try:
        # 2 s: room for whole probes on a loaded machine (a probe the deadline cuts short does
        # not replace the last real observation)
        spec = WatchSpec(reserved.getsockname()[1], "http", "/", interval=0.1, timeout=2.0)
        result = await watch_port(spec)
    finally:
        server.close()
        await server.wait_closed()
    assert not result.ready
    assert result.last is not None and result.last.error == "not an HTTP response"


async def test_a_silent_service_times_out_within_the_watch(reserved: socket.socket) -> None:
    reserved.listen()  # accepts (kernel backlog) but never answers
    spec = WatchSpec(reserved.getsockname()[1], "http", "/", interval=0.1, timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await watch_port(spec)
    assert loop.time() - started < 2  # the 5 s probe timeout is cut to the watch's end
    assert not result.ready
    assert result.last is not None and result.last.error == "timed out"


# -- `tunnel-agent wait` as a real process, against a real `tunnel-agent run` ----------------------

REPO = Path(__file__).resolve().parents[2]


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    failures = 0  # set per server class
    count = 0

    def do_GET(self) -> None:
        cls = type(self)
        cls.count += 1
        ok = self.path == "/health" and cls.count > cls.failures
        self.send_response(200 if ok else 503)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def health_server(failures: int) -> Iterator[tuple[int, type[_HealthHandler]]]:
    handler = type("Health", (_HealthHandler,), {"failures": failures, "count": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def agent_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``tunnel-agent run`` with its local API on a free port (no edge: it keeps retrying, the
    local API serves regardless). Yields the API's URL."""
    tmp = tmp_path_factory.mktemp("agent")
    ports_file = tmp / "ports.json"
    with socket.socket() as closed:  # an edge address that refuses: nothing listens there
        closed.bind(("127.0.0.1", 0))
        edge = f"127.0.0.1:{closed.getsockname()[1]}"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "TUNNEL_AGENT_TOKEN": "t",
            "TUNNEL_AGENT_PORTS_FILE": str(ports_file),
        }
        argv = ["run", "--server", edge, "--sandbox-id", "sb1", "--api-port", "0"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *argv, "--log-level", "error"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while not ports_file.exists():
                assert proc.poll() is None, "tunnel-agent run exited"
                assert time.monotonic() < deadline, "tunnel-agent run wrote no ports file"
                time.sleep(0.02)
            api = json.loads(ports_file.read_text())["api"]
            yield f"http://127.0.0.1:{api}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def tunnel_agent(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TUNNEL_AGENT_API", None)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def test_cli_wait_exits_0_once_ready(agent_process: str) -> None:
    with health_server(failures=2) as (port, handler):
        done = tunnel_agent(
            "wait", str(port), "--http", "/health", "--interval", "0.1", "--api", agent_process
        )
        assert handler.count == 3
    assert (done.returncode, done.stdout, done.stderr) == (0, f"port {port} is ready\n", "")
    with health_server(failures=1000) as (port, _):
        done = tunnel_agent("wait", str(port), "--api", agent_process)  # tcp: any listener
    assert done.returncode == 0


def test_cli_wait_exits_1_with_the_last_status(agent_process: str) -> None:
    with health_server(failures=1000) as (port, _):
        done = tunnel_agent(
            "wait", str(port), "--http", "/health", "--status", "200-299", "--timeout", "0.5",
            "--interval", "0.1", "--api", agent_process,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: Port {port} was not ready within 0.5 s")
    assert "HTTP 503" in done.stderr


def test_cli_wait_nobody_listening(agent_process: str, reserved: socket.socket) -> None:
    port = reserved.getsockname()[1]
    done = tunnel_agent("wait", str(port), "--timeout", "0.3", "--api", agent_process)
    assert done.returncode == 1
    assert "connection refused" in done.stderr


def test_cli_wait_usage_and_unreachable(agent_process: str, reserved: socket.socket) -> None:
    for argv in (
        ["wait"],
        ["wait", "8000", "--status", "200-399"],  # --status without --http
        ["wait", "8000", "--http", "/", "--status", "abc"],
        ["wait", "8000", "--timeout", "0"],
        ["wait", "8000", "--timeout", "301"],
        ["wait", "3000"],  # refused by tunnel-agent itself (exit 2, 290cd24)
        ["wait", "8000", "--http", "no-slash"],
    ):
        done = tunnel_agent(*argv, "--api", agent_process)
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr
    dead = f"http://127.0.0.1:{reserved.getsockname()[1]}"
    done = tunnel_agent("wait", "8000", "--api", dead)
    assert done.returncode == 3
    assert "cannot reach the tunnel agent" in done.stderr
