"""A fake tunneld admin API for the SDK tests: real sockets on 127.0.0.1 port 0, h11 + wsproto.

It implements the admin endpoints with an in-memory registry and the exact JSON shapes, checks
the bearer token, and answers the ws endpoint as a WebSocket echo server (after checking the
``path`` query), so the SDK is tested on the wire before the real admin server exists.
Handler bugs are collected in ``FakeAdmin.errors`` and fail the test at teardown.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import anyio.abc
import h11
import orjson
import pytest
from anyio.streams.tls import TLSListener
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from protocol import hostnames

ADMIN_TOKEN = "admin-secret"


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    if request.param != "trio" and request.param != "asyncio":
        pytest.importorskip("uvloop")
    return request.param


@dataclass
class FakeSandbox:
    connected: bool
    ports: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # port -> (token, name)


class _Reply(Exception):
    def __init__(self, status: int, body: object = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(status: int, code: str, message: str) -> _Reply:
    return _Reply(status, {"error": message, "code": code})


class FakeAdmin:
    def __init__(self) -> None:
        self.port = 0
        self.sandboxes: dict[str, FakeSandbox] = {
            "abc123": FakeSandbox(connected=True),
            "sleepy": FakeSandbox(connected=False),
        }
        # Fault injection: answer the next request with (status, body, content type).
        self.next_error: tuple[int, bytes, str] | None = None
        self.stall = False  # read requests, never answer
        self.close_after_response = False  # drop keep-alive connections silently
        self.connections = 0
        self.closed_connections = 0  # connections this server has finished with
        self.requests: list[tuple[str, str]] = []
        self.ws_paths: list[str] = []
        self.ws_headers: list[dict[str, str]] = []
        self.errors: list[BaseException] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- connection handling -------------------------------------------------------------------

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        async with stream:
            try:
                await self._serve(stream)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            except OSError:
                pass
            except Exception as exc:  # a bug in the fake: fail the test, not the server
                self.errors.append(exc)
        self.closed_connections += 1

    async def _serve(self, stream: anyio.abc.ByteStream) -> None:
        conn = h11.Connection(h11.SERVER)
        raw = bytearray()
        while True:
            if self.stall:
                await stream.receive()
                continue
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive()
                except anyio.EndOfStream:
                    data = b""
                raw += data
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            body = bytearray()
            while True:
                part = conn.next_event()
                if part is h11.NEED_DATA:
                    data = await stream.receive()
                    raw += data
                    conn.receive_data(data)
                elif isinstance(part, h11.Data):
                    body += part.data
                else:
                    assert isinstance(part, h11.EndOfMessage), part
                    break
            method = event.method.decode()
            target = event.target.decode()
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            self.requests.append((method, target))
            status, payload, content_type = self._dispatch(method, target, headers, bytes(body))
            if status == 101:
                await self._websocket(stream, bytes(raw), target)
                return
            response_headers = [("Content-Length", str(len(payload)))]
            if payload:
                response_headers.append(("Content-Type", content_type))
            data = conn.send(h11.Response(status_code=status, headers=response_headers))
            if payload:
                data += conn.send(h11.Data(data=payload))
            data += conn.send(h11.EndOfMessage())
            await stream.send(data)
            if self.close_after_response or conn.our_state is not h11.DONE:
                return
            conn.start_next_cycle()
            raw.clear()

    def _dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str]:
        if self.next_error is not None:
            status, payload, content_type = self.next_error
            self.next_error = None
            return status, payload, content_type
        try:
            self._route(method, target, headers, body)
        except _Reply as reply:
            if reply.status == 101:
                return 101, b"", ""
            payload = b"" if reply.body is None else orjson.dumps(reply.body)
            return reply.status, payload, "application/json"
        raise AssertionError("route did not reply")  # pragma: no cover

    def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        url = urlsplit(target)
        parts = url.path.split("/")[1:]
        if method == "GET" and url.path == "/healthz":
            raise _Reply(200, {"status": "ok"})
        if headers.get("authorization") != f"Bearer {ADMIN_TOKEN}":
            raise _error(401, "UNAUTHORIZED", "Missing or invalid admin token.")
        if method == "GET" and parts == ["v1", "sandboxes"]:
            raise _Reply(
                200,
                {
                    "sandboxes": [
                        {"id": sid, "connected": sb.connected, "ports": self._ports(sid)}
                        for sid, sb in sorted(self.sandboxes.items())
                    ]
                },
            )
        if len(parts) < 4 or parts[:2] != ["v1", "sandboxes"] or parts[3] != "ports":
            raise _error(404, "NOT_FOUND", "No such endpoint.")
        sandbox_id = unquote(parts[2])
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise _error(404, "SANDBOX_NOT_FOUND", f"Sandbox '{sandbox_id}' not found.")
        rest = parts[4:]
        if method == "GET" and not rest:
            raise _Reply(200, {"ports": self._ports(sandbox_id)})
        if method == "POST" and not rest:
            self._expose(sandbox_id, sandbox, orjson.loads(body))
        port = self._port(rest[0] if rest else "")
        if method == "DELETE" and len(rest) == 1:
            sandbox.ports.pop(port, None)
            raise _Reply(204)
        if method == "GET" and rest[1:] == ["ws"]:
            if headers.get("upgrade", "").lower() != "websocket":
                raise _error(400, "UPGRADE_REQUIRED", "Expected a WebSocket upgrade.")
            if not sandbox.connected:
                raise _error(
                    503, "SANDBOX_NOT_CONNECTED", f"Sandbox '{sandbox_id}' is not connected."
                )
            paths = parse_qs(url.query).get("path", ["/"])
            self.ws_paths.append(paths[0])
            self.ws_headers.append(headers)
            raise _Reply(101)
        raise _error(404, "NOT_FOUND", "No such endpoint.")

    def _port(self, text: object) -> int:
        value: object = text
        if isinstance(text, str) and text.isdigit():
            value = int(text)
        try:
            return hostnames.validate_port(value)
        except hostnames.InvalidPortError as exc:
            raise _error(400, exc.code, exc.message) from None

    def _ports(self, sandbox_id: str) -> list[dict[str, object]]:
        sandbox = self.sandboxes[sandbox_id]
        return [
            {"port": port, "exposedAt": self._url(sandbox_id, port, token), "name": name}
            for port, (token, name) in sorted(sandbox.ports.items())
        ]

    @staticmethod
    def _url(sandbox_id: str, port: int, token: str) -> str:
        return f"http://{port}-{sandbox_id}-{token}.localhost:8080/"

    def _expose(self, sandbox_id: str, sandbox: FakeSandbox, body: object) -> None:
        assert isinstance(body, dict)
        port = self._port(body.get("port"))
        name = body.get("name")
        token = body.get("token")
        if token is not None:
            try:
                hostnames.validate_custom_token(token)
            except hostnames.InvalidTokenError as exc:
                raise _error(400, exc.code, exc.message) from None
            for other, (other_token, _) in sandbox.ports.items():
                if other != port and other_token == token:
                    raise _error(
                        409, "TOKEN_IN_USE", f"Token '{token}' is already used by port {other}."
                    )
        elif port in sandbox.ports:
            token = sandbox.ports[port][0]
        else:
            token = hostnames.generate_token()
        assert isinstance(token, str)
        assert name is None or isinstance(name, str)
        sandbox.ports[port] = (token, name)
        raise _Reply(
            200, {"port": port, "exposedAt": self._url(sandbox_id, port, token), "name": name}
        )

    # -- WebSocket echo server -----------------------------------------------------------------

    async def _websocket(self, stream: anyio.abc.ByteStream, raw: bytes, target: str) -> None:
        """Echo server. Text commands: ``path?`` -> the path asked for; ``close:CODE:REASON`` ->
        server-initiated close; ``ping-me`` -> server pings, answers ``got pong``; ``fragments``
        -> a text message in three frames; ``big:N`` -> N bytes in one binary message; ``drop`` ->
        close TCP without a close frame; ``mute`` -> read nothing for a second."""
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(raw)
        request = next(ws.events())
        assert isinstance(request, Request), request
        subprotocol = request.subprotocols[0] if request.subprotocols else None
        accept = ws.send(AcceptConnection(subprotocol=subprotocol))
        if subprotocol == "greet":  # a first message in the same segment as the 101
            accept += ws.send(TextMessage(data="hello"))
        await stream.send(accept)
        text: list[str] = []
        binary = bytearray()
        while True:
            try:
                data: bytes | None = await stream.receive()
            except anyio.EndOfStream:
                data = None
            ws.receive_data(data)
            out = bytearray()
            for event in ws.events():
                if isinstance(event, TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        command = "".join(text)
                        text.clear()
                        if command == "drop":  # vanish without a close frame
                            return
                        if command == "mute":  # stop reading (and answering pings) for a while
                            await anyio.sleep(1.0)
                            continue
                        out += self._ws_command(ws, command)
                elif isinstance(event, BytesMessage):
                    binary += event.data
                    if event.message_finished:
                        out += ws.send(BytesMessage(data=bytes(binary)))
                        binary.clear()
                elif isinstance(event, Ping):
                    out += ws.send(event.response())
                elif isinstance(event, Pong):
                    out += ws.send(TextMessage(data=f"got pong {event.payload.decode()}"))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        out += ws.send(event.response())
                    if out:
                        await stream.send(bytes(out))
                    return
            if out:
                await stream.send(bytes(out))
            if data is None:
                return

    def _ws_command(self, ws: WSConnection, message: str) -> bytes:
        if message == "path?":
            return ws.send(TextMessage(data=self.ws_paths[-1]))
        if message.startswith("close:"):
            _, code, reason = message.split(":", 2)
            return ws.send(CloseConnection(code=int(code), reason=reason))
        if message == "ping-me":
            return ws.send(Ping(payload=b"srv"))
        if message == "fragments":
            return b"".join(
                ws.send(TextMessage(data=piece, message_finished=last))
                for piece, last in (("frag", False), ("men", False), ("ted", True))
            )
        if message.startswith("big:"):
            return ws.send(BytesMessage(data=b"x" * int(message[4:])))
        return ws.send(TextMessage(data=message))


@asynccontextmanager
async def running(admin: FakeAdmin, tls: ssl.SSLContext | None = None) -> AsyncIterator[FakeAdmin]:
    """Serve ``admin`` on 127.0.0.1, port 0 (TLS with ``tls``) until the block exits."""
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    admin.port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    listener: anyio.abc.Listener[Any] = tcp
    if tls is not None:
        listener = TLSListener(tcp, tls, standard_compatible=False)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, admin.handle)
        yield admin
        tg.cancel_scope.cancel()
    assert not admin.errors, admin.errors


@pytest.fixture
async def fake_admin() -> AsyncIterator[FakeAdmin]:
    async with running(FakeAdmin()) as admin:
        yield admin


@dataclass(frozen=True)
class SelfSignedCert:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="session")
def self_signed_cert(tmp_path_factory: pytest.TempPathFactory) -> SelfSignedCert:
    """A certificate for 127.0.0.1/localhost made with the openssl CLI (skipped without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return SelfSignedCert(cert, key)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback URL where nothing listens: the port is bound but not listening (connecting is
    refused) and stays bound for the whole test, so no other process can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def wait_until(predicate: Callable[[], object], timeout: float = 5, what: str = "it") -> None:
    """Poll ``predicate`` (any anyio backend) until true; fail after ``timeout`` seconds."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None
