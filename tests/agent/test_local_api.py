"""The local control API over real sockets: httpx (an independent client) and raw bytes."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from agent.errors import AgentError
from agent.local_api import MAX_BODY_BYTES, LocalAPI, start_local_api
from protocol.control import Exposure
from protocol.hostnames import DEFAULT_OPTIONS, ExposureOptions

PORT_MESSAGE = (
    "Invalid port number: {}. Must be 1024-65535, excluding 3000 (sandbox control plane)."
)
ISO_UTC = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


class FakeController:
    """In-memory ExposureController: URLs like the real edge's local default."""

    def __init__(self, sandbox_id: str = "sb1") -> None:
        self._sandbox_id = sandbox_id
        self.is_connected = True
        self.exposures: dict[int, Exposure] = {}
        self.fail_with: BaseException | None = None
        self.calls: list[tuple[Any, ...]] = []

    @property
    def connected(self) -> bool:
        return self.is_connected

    @property
    def sandbox_id(self) -> str:
        return self._sandbox_id

    def last_call(self) -> tuple[Any, ...]:
        return self.calls[-1]

    def _check(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if not self.is_connected:
            raise AgentError("EDGE_NOT_CONNECTED", "The agent is not connected to the edge.")

    async def expose(
        self,
        port: int,
        name: str | None = None,
        token: str | None = None,
        options: ExposureOptions = DEFAULT_OPTIONS,
    ) -> Exposure:
        call: tuple[Any, ...] = ("expose", port, name, token)
        self.calls.append(call if options == DEFAULT_OPTIONS else (*call, options))
        self._check()
        current = self.exposures.get(port)
        tok = token or (current.token if current else f"tok{port}")
        for other in self.exposures.values():
            if other.port != port and other.token == tok:
                raise AgentError(
                    "TOKEN_IN_USE",
                    f"Token '{tok}' is already in use by port {other.port}. "
                    "Please use a different token.",
                )
        exposure = Exposure(
            port, tok, f"http://{port}-{self._sandbox_id}-{tok}.localhost:8080/", name
        )
        self.exposures[port] = exposure
        return exposure

    async def unexpose(self, port: int) -> None:
        self.calls.append(("unexpose", port))
        self._check()
        self.exposures.pop(port, None)

    async def list_exposures(self) -> list[Exposure]:
        self._check()
        # Deliberately unsorted: the API sorts.
        return sorted(self.exposures.values(), key=lambda e: -e.port)


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture
def controller() -> FakeController:
    return FakeController()


@pytest.fixture
async def api(controller: FakeController) -> AsyncIterator[LocalAPI]:
    async with LocalAPI(controller, port=0) as server:
        yield server


@pytest.fixture
async def client(api: LocalAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}") as c:
        yield c


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection; return everything until the server closes."""
    chunks: list[bytes] = []
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        with anyio.fail_after(timeout):
            while True:
                try:
                    chunks.append(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    return b"".join(chunks)


pytestmark = pytest.mark.anyio


# -- native endpoints ------------------------------------------------------------------------


async def test_expose_list_unexpose_roundtrip(
    client: httpx.AsyncClient, controller: FakeController
) -> None:
    r = await client.post("/v1/ports", json={"port": 8000, "name": "api", "token": "t"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "port": 8000,
        "exposedAt": "http://8000-sb1-t.localhost:8080/",
        "name": "api",
    }
    assert controller.last_call() == ("expose", 8000, "api", "t")

    r = await client.post("/v1/ports", json={"port": 5173})
    assert r.json() == {
        "port": 5173,
        "exposedAt": "http://5173-sb1-tok5173.localhost:8080/",
        "name": None,
    }

    r = await client.get("/v1/ports")
    assert r.status_code == 200
    assert [p["port"] for p in r.json()["ports"]] == [5173, 8000]  # sorted
    assert r.json()["ports"][1] == {
        "port": 8000,
        "exposedAt": "http://8000-sb1-t.localhost:8080/",
        "name": "api",
    }

    r = await client.delete("/v1/ports/8000")
    assert r.status_code == 204
    assert r.content == b""
    assert controller.last_call() == ("unexpose", 8000)
    r = await client.get("/v1/ports")
    assert [p["port"] for p in r.json()["ports"]] == [5173]


async def test_status(client: httpx.AsyncClient, controller: FakeController) -> None:
    r = await client.get("/v1/status")
    assert r.status_code == 200
    assert r.json() == {"sandboxId": "sb1", "connected": True}
    controller.is_connected = False
    assert (await client.get("/v1/status")).json() == {"sandboxId": "sb1", "connected": False}


@pytest.mark.parametrize(("port", "shown"), [(80, "80"), (3000, "3000"), (70000, "70000")])
async def test_invalid_port_exact_message(client: httpx.AsyncClient, port: int, shown: str) -> None:
    r = await client.post("/v1/ports", json={"port": port})
    assert r.status_code == 400
    assert r.json() == {"error": PORT_MESSAGE.format(shown), "code": "INVALID_PORT"}
    r = await client.delete(f"/v1/ports/{port}")
    assert r.status_code == 400
    assert r.json() == {"error": PORT_MESSAGE.format(shown), "code": "INVALID_PORT"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"port": "8080"}', PORT_MESSAGE.format("8080")),
        (b'{"port": 8080.5}', PORT_MESSAGE.format("8080.5")),
        (b'{"port": true}', PORT_MESSAGE.format("true")),
        (b'{"port": null}', PORT_MESSAGE.format("null")),
        (b'{"name": "x"}', "Missing required field: port."),
    ],
)
async def test_port_field_types(
    client: httpx.AsyncClient, controller: FakeController, body: bytes, message: str
) -> None:
    r = await client.post("/v1/ports", content=body)
    assert r.status_code == 400
    assert r.json() == {"error": message, "code": "INVALID_PORT"}
    assert controller.calls == []


async def test_delete_non_numeric_port(client: httpx.AsyncClient) -> None:
    r = await client.delete("/v1/ports/abc")
    assert r.status_code == 400
    assert r.json() == {"error": PORT_MESSAGE.format("abc"), "code": "INVALID_PORT"}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "INVALID_JSON"),
        (b"", "INVALID_JSON"),
        (b"[8000]", "INVALID_REQUEST"),
        (b'{"port": 8000, "name": 5}', "INVALID_NAME"),
        (b'{"port": 8000, "name": "' + b"n" * 257 + b'"}', "INVALID_NAME"),
        (b'{"port": 8000, "token": "Bad-Token"}', "INVALID_TOKEN_FORMAT"),
        (b'{"port": 8000, "token": ""}', "INVALID_TOKEN_FORMAT"),
        (b'{"port": 8000, "token": 7}', "INVALID_TOKEN_FORMAT"),
    ],
)
async def test_bad_bodies(
    client: httpx.AsyncClient, controller: FakeController, body: bytes, code: str
) -> None:
    r = await client.post("/v1/ports", content=body)
    assert r.status_code == 400
    assert r.json()["code"] == code
    assert isinstance(r.json()["error"], str)
    assert controller.calls == []


async def test_token_in_use_is_409(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/ports", json={"port": 8000, "token": "abc"})).status_code == 200
    r = await client.post("/v1/ports", json={"port": 8001, "token": "abc"})
    assert r.status_code == 409
    assert r.json() == {
        "error": "Token 'abc' is already in use by port 8000. Please use a different token.",
        "code": "TOKEN_IN_USE",
    }


@pytest.mark.parametrize(
    ("code", "status"),
    [("EDGE_NOT_CONNECTED", 503), ("EDGE_TIMEOUT", 504), ("SANDBOX_LIMIT", 502)],
)
async def test_controller_errors_map_to_status(
    client: httpx.AsyncClient, controller: FakeController, code: str, status: int
) -> None:
    controller.fail_with = AgentError(code, "Edge trouble.")
    for r in (
        await client.post("/v1/ports", json={"port": 8000}),
        await client.get("/v1/ports"),
        await client.delete("/v1/ports/8000"),
    ):
        assert r.status_code == status
        assert r.json() == {"error": "Edge trouble.", "code": code}


async def test_not_connected_is_503(client: httpx.AsyncClient, controller: FakeController) -> None:
    controller.is_connected = False
    r = await client.post("/v1/ports", json={"port": 8000})
    assert r.status_code == 503
    assert r.json()["code"] == "EDGE_NOT_CONNECTED"


async def test_unexpected_exception_is_500_without_traceback(
    client: httpx.AsyncClient, controller: FakeController, caplog: pytest.LogCaptureFixture
) -> None:
    controller.fail_with = RuntimeError("secret internals")
    with caplog.at_level(logging.ERROR, logger="agent.local_api"):
        r = await client.post("/v1/ports", json={"port": 8000})
    assert r.status_code == 500
    assert r.json() == {"error": "Internal error in the tunnel agent.", "code": "INTERNAL_ERROR"}
    assert "secret" not in r.text
    assert any("secret internals" in (rec.exc_text or "") for rec in caplog.records)
    # The connection and the server survive.
    controller.fail_with = None
    assert (await client.get("/v1/status")).status_code == 200


async def test_unknown_path_is_404(client: httpx.AsyncClient) -> None:
    for path in ("/", "/v1/portz", "/v1/ports/8000/extra", "/v2/ports"):
        r = await client.get(path)
        assert r.status_code == 404
        assert r.json()["code"] == "NOT_FOUND"


async def test_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/ports", json={})
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST"
    assert r.json()["code"] == "METHOD_NOT_ALLOWED"
    r = await client.get("/v1/ports/8000")
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE"
    r = await client.head("/v1/status")
    assert r.status_code == 405
    assert r.content == b""


async def test_keep_alive_reuses_one_connection(client: httpx.AsyncClient) -> None:
    peers = set()
    for i in range(5):
        r = await client.post("/v1/ports", json={"port": 8000 + i})
        assert r.status_code == 200
        r = await client.get("/v1/ports")
        assert len(r.json()["ports"]) == i + 1
        peers.add(r.extensions["network_stream"].get_extra_info("client_addr"))
    r = await client.delete("/v1/ports/8000")  # 204: no body, the connection must stay usable
    assert r.status_code == 204
    peers.add(r.extensions["network_stream"].get_extra_info("client_addr"))
    assert (await client.post("/v1/ports", content=b"{")).status_code == 400  # errors keep it too
    assert (await client.get("/nope")).status_code == 404
    peers.add(
        (await client.get("/v1/status")).extensions["network_stream"].get_extra_info("client_addr")
    )
    assert len(peers) == 1


async def test_pipelined_requests_on_one_socket(api: LocalAPI) -> None:
    data = await raw_exchange(
        api.port,
        b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b'POST /v1/ports HTTP/1.1\r\nHost: localhost\r\nContent-Length: 14\r\n\r\n{"port": 8000}'
        b"GET /v1/ports HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.endswith(
        b'{"ports":[{"port":8000,"exposedAt":"http://8000-sb1-tok8000.localhost:8080/","name":null}]}'
    )
    assert b"connection: close" in data.lower()


# -- limits and framing ----------------------------------------------------------------------


async def test_oversized_body_is_413(client: httpx.AsyncClient, controller: FakeController) -> None:
    r = await client.post("/v1/ports", content=b"x" * (MAX_BODY_BYTES + 1))
    assert r.status_code == 413
    assert r.json()["code"] == "BODY_TOO_LARGE"  # one code on both APIs (relay.httpapi)
    assert controller.calls == []
    # A body exactly at the limit is read (and refused as JSON, not as too large).
    r = await client.post("/v1/ports", content=b" " * MAX_BODY_BYTES)
    assert r.status_code == 400


async def test_oversized_chunked_body_is_413(api: LocalAPI) -> None:
    chunk = b"x" * 4096
    body = b"".join(b"1000\r\n" + chunk + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"
    data = await raw_exchange(
        api.port,
        b"POST /v1/ports HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
    )
    assert data.startswith(b"HTTP/1.1 413 ")


async def test_oversized_head_is_431(api: LocalAPI) -> None:
    data = await raw_exchange(
        api.port,
        b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 431 ")
    assert b'"code":"HEADERS_TOO_LARGE"' in data


async def test_malformed_request_is_400(api: LocalAPI) -> None:
    data = await raw_exchange(api.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b'"code":"BAD_REQUEST"' in data  # one code on both APIs (relay.httpapi)


async def test_slow_request_is_408_and_idle_keepalive_closes(controller: FakeController) -> None:
    async with LocalAPI(controller, port=0, request_timeout=0.2) as api:
        data = await raw_exchange(api.port, b"POST /v1/ports HTTP/1.1\r\nHost: localhost\r\n")
        assert data.startswith(b"HTTP/1.1 408 ")
        assert b'"code":"REQUEST_TIMEOUT"' in data
        # Body promised but never sent.
        data = await raw_exchange(
            api.port, b"POST /v1/ports HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n{"
        )
        assert data.startswith(b"HTTP/1.1 408 ")
        # An idle connection is closed without a word.
        assert await raw_exchange(api.port, b"") == b""
        # After a complete request, the idle keep-alive connection is closed quietly too.
        data = await raw_exchange(api.port, b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ")
        assert data.count(b"HTTP/1.1") == 1


async def test_connection_limit(controller: FakeController) -> None:
    async with (
        LocalAPI(controller, port=0, max_connections=1) as api,
        await anyio.connect_tcp("127.0.0.1", api.port) as first,
    ):
        await first.send(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await first.receive()).startswith(b"HTTP/1.1 200 ")
        data = await raw_exchange(api.port, b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 503 ")
        assert b"TOO_MANY_CONNECTIONS" in data


async def test_close_drops_idle_connections(controller: FakeController) -> None:
    api = await start_local_api(controller, port=0)
    try:
        assert api.host == "127.0.0.1"
        async with await anyio.connect_tcp("127.0.0.1", api.port) as stream:
            await stream.send(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")
            with anyio.fail_after(2):
                await api.close()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()
    finally:
        # A server left open hangs the anyio runner's teardown under uvloop: always close.
        await api.close()  # idempotent
    with pytest.raises(RuntimeError):
        _ = api.port


# -- legacy Cloudflare container endpoints ---------------------------------------------------


async def test_legacy_expose_list_unexpose(
    client: httpx.AsyncClient, controller: FakeController
) -> None:
    r = await client.post("/api/expose-port", json={"port": 8080, "name": "web", "sessionId": "s"})
    assert r.status_code == 200
    body = r.json()
    assert body.pop("timestamp") is not None
    assert body == {
        "success": True,
        "port": 8080,
        "url": "http://8080-sb1-tok8080.localhost:8080/",
        "name": "web",
    }
    assert controller.last_call() == ("expose", 8080, "web", None)

    await client.post("/api/expose-port", json={"port": 5173})
    r = await client.get("/api/exposed-ports", params={"session": "whatever"})
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True
    assert body["ports"] == [
        {"port": 5173, "url": "http://5173-sb1-tok5173.localhost:8080/", "status": "active"},
        {"port": 8080, "url": "http://8080-sb1-tok8080.localhost:8080/", "status": "active"},
    ]

    r = await client.delete("/api/exposed-ports/8080", params={"session": "s"})
    assert r.status_code == 200
    body = r.json()
    assert {k: body[k] for k in ("success", "port")} == {"success": True, "port": 8080}
    # Unexposing an unknown port is idempotent (Cloudflare >= 0.8.13).
    r = await client.delete("/api/exposed-ports/9999")
    assert r.status_code == 200
    assert r.json()["success"] is True


async def test_legacy_timestamps_are_iso_utc(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/exposed-ports")
    assert r.json()["ports"] == []
    assert re.match(ISO_UTC, r.json()["timestamp"])


@pytest.mark.parametrize(("port", "shown"), [(80, "80"), (3000, "3000"), (70000, "70000")])
async def test_legacy_invalid_port(client: httpx.AsyncClient, port: int, shown: str) -> None:
    r = await client.post("/api/expose-port", json={"port": port, "name": "web"})
    assert r.status_code == 400
    body = r.json()
    assert body.pop("timestamp")
    assert body == {
        "code": "INVALID_PORT_NUMBER",
        "message": PORT_MESSAGE.format(shown),
        "context": {"port": port},
        "httpStatus": 400,
    }
    r = await client.delete(f"/api/exposed-ports/{port}")
    assert r.status_code == 400
    assert r.json()["code"] == "INVALID_PORT_NUMBER"
    assert r.json()["context"] == {"port": port}


async def test_legacy_string_port(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/expose-port", json={"port": "8080"})
    assert r.status_code == 400
    assert r.json()["message"] == PORT_MESSAGE.format("8080")
    assert r.json()["context"] == {"port": "8080"}


async def test_legacy_errors(client: httpx.AsyncClient, controller: FakeController) -> None:
    r = await client.post("/api/expose-port", content=b"{oops")
    assert r.status_code == 400
    assert r.json()["code"] == "INVALID_JSON"
    assert r.json()["httpStatus"] == 400
    controller.is_connected = False
    r = await client.get("/api/exposed-ports")
    assert r.status_code == 503
    assert r.json()["code"] == "EDGE_NOT_CONNECTED"
    r = await client.post("/api/expose-port", json={"port": 8080})
    assert r.status_code == 503
    assert r.json()["context"] == {"port": 8080}
    r = await client.get("/api/nothing-here")
    assert r.status_code == 404
    assert r.json()["code"] == "NOT_FOUND"
    assert "httpStatus" in r.json()
    r = await client.post("/api/exposed-ports")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"


# -- browser protection ----------------------------------------------------------------------


async def test_browser_requests_are_refused(
    client: httpx.AsyncClient, controller: FakeController
) -> None:
    # A page can POST text/plain cross-origin with no preflight; its Origin header gives it away.
    r = await client.post(
        "/v1/ports",
        content=b'{"port": 8000}',
        headers={"origin": "https://evil.example", "content-type": "text/plain"},
    )
    assert r.status_code == 403
    assert r.json()["code"] == "FORBIDDEN"
    r = await client.post("/api/expose-port", content=b'{"port": 8000}', headers={"origin": "null"})
    assert r.status_code == 403
    assert r.json()["httpStatus"] == 403
    assert controller.calls == []


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 403),  # DNS rebinding: the page's own name
        ("evil.example:3000", 403),
        ("localhost:3000", 200),
        ("LOCALHOST", 200),
        ("127.0.0.1:3000", 200),
        ("[::1]:3000", 200),
        ("agent.localhost", 200),
    ],
)
async def test_host_header_check(client: httpx.AsyncClient, host: str, status: int) -> None:
    r = await client.get("/v1/status", headers={"host": host})
    assert r.status_code == status


async def test_expect_100_continue(api: LocalAPI) -> None:
    body = b'{"port": 8000}'
    async with await anyio.connect_tcp("127.0.0.1", api.port) as stream:
        await stream.send(
            b"POST /v1/ports HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        with anyio.fail_after(5):
            assert (await stream.receive()).startswith(b"HTTP/1.1 100 ")
            await stream.send(body)
            assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")
    # Too large: refused before the client sends the body.
    data = await raw_exchange(
        api.port,
        b"POST /v1/ports HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000000\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 413 ")


async def test_expose_options_reach_the_controller_and_bad_ones_are_400(
    client: httpx.AsyncClient, controller: FakeController
) -> None:
    r = await client.post(
        "/v1/ports", json={"port": 8000, "protocol": "tls", "proxyProtocol": True}
    )
    assert r.status_code == 200, r.text
    assert controller.last_call() == ("expose", 8000, None, None, ExposureOptions("tls", True))
    r = await client.post("/v1/ports", json={"port": 8001, "protocol": "sctp"})
    assert r.status_code == 400
    assert r.json()["code"] == "INVALID_OPTION"
    assert controller.last_call()[1] == 8000  # refused before the edge was asked
