"""SDK tests against the fake admin API of conftest.py, on asyncio and trio, over real sockets."""

from __future__ import annotations

import pickle
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import pytest

from tunneld.client import (
    AuthenticationError,
    ConflictError,
    ConnectionClosed,
    ExposedPort,
    InvalidPortError,
    InvalidSandboxIdError,
    InvalidTokenError,
    NotFoundError,
    Sandbox,
    SandboxInfo,
    SandboxNotConnectedError,
    TunnelClient,
    TunnelConnectionError,
    TunnelError,
    TunnelTimeoutError,
    ValidationError,
    WebSocket,
)

from .conftest import ADMIN_TOKEN, FakeAdmin, SelfSignedCert, running, wait_until

pytestmark = pytest.mark.anyio

PORT_MESSAGE = (
    "Invalid port number: {}. Must be 1024-65535, excluding 3000 (sandbox control plane)."
)


@pytest.fixture
async def client(fake_admin: FakeAdmin) -> AsyncIterator[TunnelClient]:
    async with TunnelClient(fake_admin.url, token=ADMIN_TOKEN, timeout=5.0) as c:
        yield c


@pytest.fixture
def sb(client: TunnelClient) -> Sandbox:
    return client.sandbox("abc123")


def _json_error(status: int, code: str, message: str) -> tuple[int, bytes, str]:
    import orjson

    return status, orjson.dumps({"error": message, "code": code}), "application/json"


# -- ports API --------------------------------------------------------------------------------


async def test_expose_list_unexpose_round_trip(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    p = await sb.expose_port(8000, name="api")
    assert isinstance(p, ExposedPort)
    assert p.port == 8000 and p.name == "api"
    token = fake_admin.sandboxes["abc123"].ports[8000][0]
    assert p.exposed_at == f"http://8000-abc123-{token}.localhost:8080/"
    assert p.url == p.exposed_at
    assert await sb.get_exposed_ports() == [p]

    # Idempotent: the same URL again.
    assert await sb.expose_port(8000, name="api") == p

    await sb.unexpose_port(8000)
    assert await sb.get_exposed_ports() == []
    await sb.unexpose_port(8000)  # idempotent
    assert fake_admin.requests[-1] == ("DELETE", "/v1/sandboxes/abc123/ports/8000")


async def test_typescript_aliases(sb: Sandbox) -> None:
    p = await sb.exposePort(8000)
    assert await sb.getExposedPorts() == [p]
    await sb.unexposePort(8000)
    assert await sb.getExposedPorts() == []
    assert Sandbox.wsConnect is Sandbox.ws_connect


async def test_custom_token_and_name_none(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    p = await sb.expose_port(8001, token="my_token")
    assert p == ExposedPort(8001, "http://8001-abc123-my_token.localhost:8080/", None)
    assert p.name is None


async def test_request_body_omits_none_fields(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    import orjson

    seen: list[bytes] = []
    original = fake_admin._expose

    def spy(sandbox_id: str, sandbox: object, body: object) -> None:
        seen.append(orjson.dumps(body))
        original(sandbox_id, sandbox, body)  # type: ignore[arg-type]

    fake_admin._expose = spy  # type: ignore[method-assign]
    await sb.expose_port(8000)
    await sb.expose_port(8001, name="web", token="tok")
    assert seen == [b'{"port":8000}', b'{"port":8001,"name":"web","token":"tok"}']


async def test_list_is_sorted_by_port(sb: Sandbox) -> None:
    for port in (9000, 8000, 65535, 1024):
        await sb.expose_port(port)
    assert [p.port for p in await sb.get_exposed_ports()] == [1024, 8000, 9000, 65535]


async def test_list_sorted_even_if_server_is_not(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    body = (
        b'{"ports":[{"port":9000,"exposedAt":"http://b/","name":null},'
        b'{"port":8000,"exposedAt":"http://a/"}]}'
    )
    fake_admin.next_error = (200, body, "application/json")
    ports = await sb.get_exposed_ports()
    assert ports == [ExposedPort(8000, "http://a/"), ExposedPort(9000, "http://b/")]


async def test_list_sandboxes_and_health(client: TunnelClient) -> None:
    p = await client.sandbox("abc123").expose_port(8000, name="api")
    sandboxes = await client.list_sandboxes()
    assert sandboxes == [
        SandboxInfo("abc123", True, (p,)),
        SandboxInfo("sleepy", False, ()),
    ]
    assert await client.health() == {"status": "ok"}


async def test_keepalive_reuses_one_connection(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    for _ in range(5):
        await sb.get_exposed_ports()
    assert fake_admin.connections == 1


async def test_without_context_manager_no_connection_is_kept(fake_admin: FakeAdmin) -> None:
    client = TunnelClient(fake_admin.url, token=ADMIN_TOKEN)
    await client.health()
    await client.health()
    assert fake_admin.connections == 2
    await client.aclose()


async def test_stale_keepalive_connection_is_retried(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    fake_admin.close_after_response = True  # closes without "Connection: close"
    await sb.expose_port(8000)
    await wait_until(lambda: fake_admin.closed_connections == 1, what="the server to close")
    assert [p.port for p in await sb.get_exposed_ports()] == [8000]
    await sb.unexpose_port(8000)
    assert fake_admin.connections == 3


async def test_concurrent_requests(sb: Sandbox) -> None:
    async with anyio.create_task_group() as tg:
        for port in range(8000, 8020):
            tg.start_soon(sb.expose_port, port)
    assert [p.port for p in await sb.get_exposed_ports()] == list(range(8000, 8020))


# -- errors -----------------------------------------------------------------------------------


async def test_server_invalid_port_400(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    message = PORT_MESSAGE.format(80)
    fake_admin.next_error = _json_error(400, "INVALID_PORT", message)
    with pytest.raises(InvalidPortError) as info:
        await sb.expose_port(8000)
    assert info.value.message == message and str(info.value) == message
    assert info.value.code == "INVALID_PORT" and info.value.status == 400
    assert isinstance(info.value, ValueError)


async def test_unauthorized_401(fake_admin: FakeAdmin) -> None:
    async with TunnelClient(fake_admin.url, token="wrong") as client:
        with pytest.raises(AuthenticationError) as info:
            await client.sandbox("abc123").get_exposed_ports()
    assert info.value.status == 401 and info.value.code == "UNAUTHORIZED"
    assert info.value.message == "Missing or invalid admin token."


async def test_unknown_sandbox_404(client: TunnelClient) -> None:
    with pytest.raises(NotFoundError) as info:
        await client.sandbox("nope").expose_port(8000)
    assert info.value.status == 404 and info.value.code == "SANDBOX_NOT_FOUND"
    assert info.value.message == "Sandbox 'nope' not found."


async def test_token_in_use_409(sb: Sandbox) -> None:
    await sb.expose_port(8000, token="shared")
    with pytest.raises(ConflictError) as info:
        await sb.expose_port(8001, token="shared")
    assert info.value.status == 409 and info.value.code == "TOKEN_IN_USE"


async def test_not_connected_503(client: TunnelClient, fake_admin: FakeAdmin) -> None:
    with pytest.raises(SandboxNotConnectedError) as info:
        await client.sandbox("sleepy").ws_connect(8000)
    assert info.value.status == 503 and info.value.code == "SANDBOX_NOT_CONNECTED"
    fake_admin.next_error = _json_error(503, "SANDBOX_NOT_CONNECTED", "offline")
    with pytest.raises(SandboxNotConnectedError):
        await client.sandbox("sleepy").expose_port(8000)


async def test_agent_timeout_504_is_a_timeout(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    fake_admin.next_error = _json_error(504, "AGENT_TIMEOUT", "The agent did not answer.")
    with pytest.raises(TunnelTimeoutError) as info:
        await sb.expose_port(8000)
    assert info.value.status == 504 and isinstance(info.value, TimeoutError)


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (418, "SOMETHING_NEW", TunnelError),
        (503, "DRAINING", TunnelError),
        (404, "SOMETHING_NEW", NotFoundError),
        (400, "INVALID_SANDBOX_ID_HYPHENS", InvalidSandboxIdError),
        (400, "INVALID_TOKEN_FORMAT", InvalidTokenError),
    ],
)
async def test_error_mapping(
    sb: Sandbox,
    fake_admin: FakeAdmin,
    status: int,
    code: str,
    expected: type[TunnelError],
) -> None:
    fake_admin.next_error = _json_error(status, code, "Something happened.")
    with pytest.raises(TunnelError) as info:
        await sb.get_exposed_ports()
    assert type(info.value) is expected
    assert (info.value.status, info.value.code, info.value.message) == (
        status,
        code,
        "Something happened.",
    )


async def test_non_json_error_body(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    fake_admin.next_error = (502, b"<html>Bad Gateway</html>", "text/html")
    with pytest.raises(TunnelError) as info:
        await sb.get_exposed_ports()
    assert type(info.value) is TunnelError
    assert info.value.status == 502 and info.value.code == "HTTP_502"
    assert "502" in info.value.message and "Bad Gateway" in info.value.message


async def test_malformed_success_body(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    fake_admin.next_error = (200, b"not json", "text/plain")
    with pytest.raises(TunnelError) as info:
        await sb.get_exposed_ports()
    assert info.value.code == "BAD_RESPONSE"
    fake_admin.next_error = (200, b'{"ports": [{"port": "x"}]}', "application/json")
    with pytest.raises(TunnelError, match="malformed exposed port"):
        await sb.get_exposed_ports()


async def test_response_size_is_bounded(fake_admin: FakeAdmin) -> None:
    async with TunnelClient(fake_admin.url, token=ADMIN_TOKEN, max_response_size=1000) as client:
        fake_admin.next_error = (200, b" " * 2000 + b"{}", "application/json")
        with pytest.raises(TunnelError) as info:
            await client.health()
        assert info.value.code == "RESPONSE_TOO_LARGE"
        assert await client.health() == {"status": "ok"}  # the client is still usable


@pytest.mark.parametrize(
    ("port", "shown"),
    [
        (80, "80"),
        (3000, "3000"),
        (70000, "70000"),
        ("8080", "8080"),
        (8080.0, "8080.0"),
        (True, "true"),
        (None, "null"),
    ],
)
async def test_client_side_port_validation(
    client: TunnelClient, fake_admin: FakeAdmin, port: Any, shown: str
) -> None:
    sb = client.sandbox("abc123")
    for call in (sb.expose_port, sb.unexpose_port, sb.ws_connect):
        with pytest.raises(InvalidPortError) as info:
            await call(port)
        assert info.value.message == PORT_MESSAGE.format(shown)
        assert info.value.code == "INVALID_PORT" and info.value.status is None
    assert fake_admin.connections == 0 and fake_admin.requests == []


async def test_client_side_id_and_token_validation(
    client: TunnelClient, fake_admin: FakeAdmin
) -> None:
    for bad_id in ("", "-abc", "www", "a/b", "ABC", "x" * 64):
        with pytest.raises(InvalidSandboxIdError):
            client.sandbox(bad_id)
    sb = client.sandbox("abc123")
    for bad_token in ("", "UPPER", "x" * 17, "a-b"):
        with pytest.raises(InvalidTokenError) as info:
            await sb.expose_port(8000, token=bad_token)
        assert info.value.code == "INVALID_TOKEN_FORMAT"
    with pytest.raises(ValidationError):
        await sb.ws_connect(8000, path="no-slash")
    assert fake_admin.connections == 0


async def test_sandbox_id_with_hyphen_is_fine(client: TunnelClient, fake_admin: FakeAdmin) -> None:
    fake_admin.sandboxes["my-box-1"] = type(fake_admin.sandboxes["abc123"])(connected=True)
    p = await client.sandbox("my-box-1").expose_port(8000)
    assert p.exposed_at.startswith("http://8000-my-box-1-")


async def test_timeout_against_a_server_that_never_answers(fake_admin: FakeAdmin) -> None:
    fake_admin.stall = True
    async with TunnelClient(fake_admin.url, token=ADMIN_TOKEN, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(TunnelTimeoutError) as info:
            await client.sandbox("abc123").get_exposed_ports()
        elapsed = time.monotonic() - start
    # not before the timeout; and it does fire (a generous bound: the machine may be busy)
    assert 0.45 <= elapsed < 15, elapsed
    assert info.value.status is None and isinstance(info.value, TimeoutError)
    with pytest.raises(TunnelTimeoutError):
        await client.sandbox("abc123").ws_connect(8000)


async def test_connection_refused(refused_url: str) -> None:
    async with TunnelClient(refused_url, token=ADMIN_TOKEN, timeout=2.0) as client:
        with pytest.raises(TunnelConnectionError) as info:
            await client.health()
        assert isinstance(info.value, ConnectionError)
        assert refused_url.removeprefix("http://") in info.value.message
        with pytest.raises(TunnelConnectionError):
            await client.sandbox("abc123").ws_connect(8000)


def test_invalid_base_url_and_timeout() -> None:
    for url in ("ftp://x", "127.0.0.1:7070", "http://", "http://h:99999"):
        with pytest.raises(ValidationError):
            TunnelClient(url)
    with pytest.raises(ValueError):
        TunnelClient("http://h", timeout=0)
    assert TunnelClient("https://h/prefix/").base_url == "https://h/prefix"
    assert TunnelClient("http://[::1]:7070").base_url == "http://[::1]:7070"


def test_errors_pickle_and_repr() -> None:
    exc = ConflictError("Token in use.", "TOKEN_IN_USE", 409)
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is ConflictError and repr(clone) == repr(exc)
    assert repr(exc) == "ConflictError('Token in use.', code='TOKEN_IN_USE', status=409)"
    assert TunnelTimeoutError("t").code == "TIMEOUT"
    assert str(ConnectionClosed(1000, "bye")) == "WebSocket closed with code 1000: bye"


def test_exposed_port_is_frozen_and_slotted() -> None:
    p = ExposedPort(8000, "http://x/", "api")
    with pytest.raises(AttributeError):
        p.port = 1  # type: ignore[misc]
    assert not hasattr(p, "__dict__")


# -- WebSocket --------------------------------------------------------------------------------


async def test_ws_text_binary_and_path(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    async with await sb.ws_connect(8000, path="/ws?room=1&x=a b") as ws:
        assert isinstance(ws, WebSocket)
        await ws.send("hi")
        assert await ws.receive() == "hi"
        await ws.send(b"\x00bin")
        assert await ws.receive() == b"\x00bin"
        await ws.send("path?")
        assert await ws.receive() == "/ws?room=1&x=a b"
    assert fake_admin.requests[-1][1] == (
        "/v1/sandboxes/abc123/ports/8000/ws?path=/ws%3Froom%3D1%26x%3Da%20b"
    )
    assert fake_admin.ws_headers[-1]["authorization"] == f"Bearer {ADMIN_TOKEN}"
    assert ws.closed and ws.close_code == 1000


async def test_ws_alias_headers_and_subprotocol(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    ws = await sb.wsConnect(8000, headers={"X-Trace": "t1"}, subprotocols=["chat"])
    try:
        assert ws.subprotocol == "chat"
        assert fake_admin.ws_headers[-1]["x-trace"] == "t1"
        assert fake_admin.ws_paths[-1] == "/"
    finally:
        await ws.close()


async def test_ws_large_message(sb: Sandbox) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    async with await sb.ws_connect(8000) as ws:
        await ws.send(payload)
        assert await ws.receive() == payload
        text = "é" * (512 * 1024)
        await ws.send(text)
        assert await ws.receive() == text


async def test_ws_fragmented_message_is_assembled(sb: Sandbox) -> None:
    async with await sb.ws_connect(8000) as ws:
        await ws.send("fragments")
        assert await ws.receive() == "fragmented"


async def test_ws_message_too_big_closes_1009(sb: Sandbox) -> None:
    ws = await sb.ws_connect(8000, max_message_size=1000)
    await ws.send("big:2000")
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()
    assert info.value.code == 1009
    await ws.close()
    assert ws.closed


async def test_ws_ping_pong(sb: Sandbox) -> None:
    async with await sb.ws_connect(8000) as ws:
        await ws.ping(b"x")
        await ws.ping()
        # A message arriving while ping() waits is kept for receive().
        await ws.send("before")
        await ws.ping(b"y")
        assert await ws.receive() == "before"


async def test_ws_answers_server_pings(sb: Sandbox) -> None:
    async with await sb.ws_connect(8000) as ws:
        await ws.send("ping-me")
        assert await ws.receive() == "got pong srv"


async def test_ws_concurrent_ping_and_receive(sb: Sandbox) -> None:
    async with await sb.ws_connect(8000) as ws:
        received: list[str | bytes] = []

        async def reader() -> None:
            received.append(await ws.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await wait_until(ws._read_lock.locked, what="the reader to hold the read lock")
            await ws.ping(b"p")  # answered through the reader's read
            await ws.send("later")
        assert received == ["later"]


async def test_ws_close_code_preserved(sb: Sandbox) -> None:
    ws = await sb.ws_connect(8000)
    await ws.close(1000, "bye")
    assert (ws.close_code, ws.close_reason) == (1000, "bye")
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()
    assert (info.value.code, info.value.reason) == (1000, "bye")
    with pytest.raises(ConnectionClosed):
        await ws.send("x")
    await ws.close()  # idempotent


async def test_ws_server_initiated_close(sb: Sandbox) -> None:
    async with await sb.ws_connect(8000) as ws:
        await ws.send("close:4001:custom reason")
        with pytest.raises(ConnectionClosed) as info:
            await ws.receive()
        assert (info.value.code, info.value.reason) == (4001, "custom reason")
        assert (ws.close_code, ws.close_reason) == (4001, "custom reason")
        with pytest.raises(ConnectionClosed):
            await ws.ping()


async def test_ws_async_iteration(sb: Sandbox) -> None:
    async with await sb.ws_connect(8000) as ws:
        for message in ("a", "b", "close:1000:done"):
            await ws.send(message)
        assert [m async for m in ws] == ["a", "b"]
    ws = await sb.ws_connect(8000)
    await ws.send("close:4002:oops")
    with pytest.raises(ConnectionClosed) as info:
        async for _ in ws:
            pass
    assert info.value.code == 4002
    await ws.close()


async def test_ws_rejected_handshake_is_typed(client: TunnelClient, fake_admin: FakeAdmin) -> None:
    with pytest.raises(NotFoundError):
        await client.sandbox("nope").ws_connect(8000)
    async with TunnelClient(fake_admin.url, token="wrong") as bad:
        with pytest.raises(AuthenticationError):
            await bad.sandbox("abc123").ws_connect(8000)


async def test_ws_message_in_same_segment_as_handshake(sb: Sandbox) -> None:
    async with await sb.ws_connect(8000, subprotocols=["greet"]) as ws:
        assert ws.subprotocol == "greet"
        assert await ws.receive() == "hello"


# -- TLS --------------------------------------------------------------------------------------


async def test_https_with_custom_ssl_context(self_signed_cert: SelfSignedCert) -> None:
    async with running(FakeAdmin(), tls=self_signed_cert.server_context()) as admin:
        url = f"https://127.0.0.1:{admin.port}"
        ctx = self_signed_cert.client_context()
        async with TunnelClient(url, token=ADMIN_TOKEN, ssl_context=ctx) as client:
            assert await client.health() == {"status": "ok"}
            sb = client.sandbox("abc123")
            await sb.expose_port(8000)
            assert [p.port for p in await sb.get_exposed_ports()] == [8000]
            async with await sb.ws_connect(8000) as ws:
                await ws.send("over tls")
                assert await ws.receive() == "over tls"
        assert admin.connections == 2  # one keep-alive HTTP connection, one WebSocket
        # The default context does not trust a self-signed certificate.
        async with TunnelClient(url, token=ADMIN_TOKEN, timeout=2.0) as client:
            with pytest.raises(TunnelConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.health()


async def test_cancelled_request_leaves_client_usable(sb: Sandbox, fake_admin: FakeAdmin) -> None:
    fake_admin.stall = True
    with anyio.move_on_after(0.1):
        await sb.get_exposed_ports()
    fake_admin.stall = False
    assert await sb.get_exposed_ports() == []


async def test_cancelled_ws_receive_keeps_connection(sb: Sandbox) -> None:
    async with await sb.ws_connect(8000) as ws:
        with anyio.move_on_after(0.05):
            await ws.receive()
        await ws.send("still here")
        assert await ws.receive() == "still here"


async def test_ws_connection_lost_is_1006(sb: Sandbox) -> None:
    ws = await sb.ws_connect(8000)
    await ws.send("drop")
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()
    assert info.value.code == 1006 and ws.close_code == 1006 and ws.closed
    with pytest.raises(ConnectionClosed):
        await ws.send("x")
    await ws.close()


async def test_ws_ping_timeout(fake_admin: FakeAdmin) -> None:
    client = TunnelClient(fake_admin.url, token=ADMIN_TOKEN, timeout=0.3)
    async with client, await client.sandbox("abc123").ws_connect(8000) as ws:
        await ws.send("mute")
        with pytest.raises(TunnelTimeoutError) as info:
            await ws.ping(b"late")
        assert info.value.code == "PING_TIMEOUT"
        await ws.send("after")  # the connection survives; the late pong is ignored
        assert await ws.receive() == "after"
        await ws.ping(b"late")  # the payload is free again
