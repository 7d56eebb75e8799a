"""The SDK surface: :class:`TunnelClient`, :class:`Sandbox`, :class:`ExposedPort`.

Mirrors Cloudflare Sandbox SDK's "Ports" API (``exposePort``, ``unexposePort``,
``getExposedPorts``, ``wsConnect``) over tunneld's admin HTTP API. Arguments are validated with
the same rules and messages as the server (``protocol.hostnames``) before any network call.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import orjson

from protocol import hostnames as _hostnames

from ._errors import (
    InvalidPortError,
    InvalidSandboxIdError,
    InvalidTokenError,
    TunnelError,
    ValidationError,
)
from ._http import DEFAULT_MAX_RESPONSE_SIZE, HTTPTransport, Origin, Response
from ._tcp import TCP_SUBPROTOCOL, TcpStream, WebSocketTcpStream, open_tcp_stream
from ._websocket import DEFAULT_MAX_MESSAGE_SIZE, WebSocket

__all__ = ["ExposedPort", "RequestList", "Sandbox", "SandboxInfo", "TunnelClient"]

DEFAULT_BASE_URL = "http://127.0.0.1:7070"
DEFAULT_TIMEOUT = 10.0
# The longest wait_for_port tunneld's agents run (protocol.control.MAX_WATCH_TIMEOUT_S).
MAX_WAIT_SECONDS = 300.0


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True, slots=True)
class ExposedPort:
    """An exposed port and its preview URL.

    Example::

        p = await sb.expose_port(8000, name="api")
        p.port, p.exposed_at, p.name   # 8000, "http://8000-abc123-<token>.localhost:8080/", "api"
    """

    port: int
    exposed_at: str
    name: str | None = None
    protocol: str = "http"  # "tcp": exposed_at is tcp://host:public_port; "tls": SNI-routed
    public_port: int | None = None
    proxy_protocol: bool = False
    inspect: bool = False

    @property
    def url(self) -> str:
        """The preview URL (alias of ``exposed_at``; Cloudflare's ``exposePort`` calls it url)."""
        return self.exposed_at

    @classmethod
    def _from_json(cls, data: object) -> ExposedPort:
        if not isinstance(data, dict):
            raise _bad_response(f"expected an object for an exposed port, got {data!r:.100}")
        port, exposed_at, name = data.get("port"), data.get("exposedAt"), data.get("name")
        if type(port) is not int or not isinstance(exposed_at, str):
            raise _bad_response(f"malformed exposed port {data!r:.200}")
        if name is not None and not isinstance(name, str):
            raise _bad_response(f"malformed port name {name!r:.100}")
        protocol, public_port = data.get("protocol", "http"), data.get("publicPort")
        proxy_protocol, inspect = data.get("proxyProtocol", False), data.get("inspect", False)
        if (
            not isinstance(protocol, str)
            or (public_port is not None and type(public_port) is not int)
            or type(proxy_protocol) is not bool
            or type(inspect) is not bool
        ):
            raise _bad_response(f"malformed exposure options {data!r:.200}")
        return cls(port, exposed_at, name, protocol, public_port, proxy_protocol, inspect)


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """One entry of :meth:`TunnelClient.list_sandboxes`: id, whether its agent is connected, and
    its exposed ports (sorted by port)."""

    id: str
    connected: bool
    ports: tuple[ExposedPort, ...] = ()

    @classmethod
    def _from_json(cls, data: object) -> SandboxInfo:
        if not isinstance(data, dict):
            raise _bad_response(f"expected an object for a sandbox, got {data!r:.100}")
        sandbox_id, connected, ports = data.get("id"), data.get("connected"), data.get("ports", [])
        if not isinstance(sandbox_id, str) or not isinstance(connected, bool):
            raise _bad_response(f"malformed sandbox {data!r:.200}")
        if not isinstance(ports, list):
            raise _bad_response(f"malformed port list {ports!r:.100}")
        parsed = sorted((ExposedPort._from_json(p) for p in ports), key=lambda p: p.port)
        return cls(id=sandbox_id, connected=connected, ports=tuple(parsed))


class RequestList(list[dict[str, Any]]):
    """What :meth:`Sandbox.requests` returns: the recorded requests (summaries, oldest first;
    a plain list in every other way) and the inspection state the edge answered with them.

    ``inspect`` is whether the sandbox's inspection switch is on (:meth:`Sandbox.set_inspection`);
    an exposure's ``inspect=True`` records its port whatever the switch says, so with the switch
    off and no such exposure nothing is being recorded. ``last`` is the newest id kept (0: none),
    ``skipped`` how many requests were not recorded.

    Example::

        rows = await sb.requests()
        if not rows and not rows.inspect:
            print("inspection is off")
    """

    __slots__ = ("inspect", "last", "skipped")

    def __init__(
        self, records: Sequence[dict[str, Any]] = (), *, inspect: bool, last: int, skipped: int
    ) -> None:
        super().__init__(records)
        self.inspect = inspect
        self.last = last
        self.skipped = skipped

    @classmethod
    def _from_json(cls, data: object) -> RequestList:
        if not isinstance(data, dict) or not isinstance(data.get("requests"), list):
            raise _bad_response(f"expected {{'requests': [...]}}, got {data!r:.100}")
        inspect, last, skipped = data.get("inspect"), data.get("last"), data.get("skipped")
        if type(inspect) is not bool or type(last) is not int or type(skipped) is not int:
            raise _bad_response(f"malformed inspection state {data!r:.200}")
        return cls(data["requests"], inspect=inspect, last=last, skipped=skipped)


def _bad_response(detail: str, status: int | None = None) -> TunnelError:
    return TunnelError(f"Unexpected response from tunneld: {detail}", "BAD_RESPONSE", status)


def _json_body(response: Response) -> Any:
    try:
        return orjson.loads(response.body)
    except orjson.JSONDecodeError:
        raise _bad_response(f"invalid JSON {response.body[:100]!r}", response.status) from None


def _check_port(port: object) -> int:
    try:
        return _hostnames.validate_port(port)
    except _hostnames.InvalidPortError as exc:
        raise InvalidPortError(exc.message, exc.code) from None


def _check_sandbox_id(sandbox_id: object) -> str:
    try:
        return _hostnames.validate_sandbox_id(sandbox_id)
    except _hostnames.InvalidSandboxIdError as exc:
        raise InvalidSandboxIdError(exc.message, exc.code) from None


def _check_token(token: object) -> str:
    try:
        return _hostnames.validate_custom_token(token)
    except _hostnames.InvalidTokenError as exc:
        raise InvalidTokenError(exc.message, exc.code) from None


class TunnelClient:
    """Client of tunneld's admin API.

    ``base_url`` is the admin listener (``https://`` uses TLS, with ``ssl_context`` if given);
    ``token`` the admin bearer token; ``timeout`` (seconds) bounds every connect, write and read.
    Use it as an async context manager: inside, idle connections are kept alive and reused;
    outside, each request uses its own connection.

    Example::

        async with TunnelClient("http://127.0.0.1:7070", token="admin-secret") as client:
            sb = client.sandbox("abc123")
            preview = await sb.expose_port(8000, name="api")
            print(preview.url)
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self._origin = Origin.parse(base_url)
        self._token = token
        self._transport = HTTPTransport(
            self._origin,
            timeout=timeout,
            ssl_context=ssl_context,
            max_response_size=max_response_size,
        )

    @property
    def base_url(self) -> str:
        return str(self._origin)

    @property
    def timeout(self) -> float:
        return self._transport.timeout

    def __repr__(self) -> str:
        return f"TunnelClient({self.base_url!r})"

    async def __aenter__(self) -> TunnelClient:
        self._transport.keepalive = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close idle keep-alive connections (``async with`` does this on exit)."""
        self._transport.keepalive = False
        await self._transport.aclose()

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle on sandbox ``sandbox_id`` (validated now; no network call).

        Example::

            sb = client.sandbox("abc123")
        """
        return Sandbox(self, _check_sandbox_id(sandbox_id))

    async def list_sandboxes(self) -> list[SandboxInfo]:
        """Every sandbox tunneld knows: ``GET /v1/sandboxes``.

        Example::

            for info in await client.list_sandboxes():
                print(info.id, info.connected, [p.port for p in info.ports])
        """
        body = await self._request_json("GET", "/v1/sandboxes")
        if not isinstance(body, dict) or not isinstance(body.get("sandboxes"), list):
            raise _bad_response(f"expected {{'sandboxes': [...]}}, got {body!r:.100}")
        return [SandboxInfo._from_json(item) for item in body["sandboxes"]]

    async def health(self) -> dict[str, Any]:
        """tunneld's health document (``GET /healthz``), e.g. ``{"status": "ok"}``."""
        body = await self._request_json("GET", "/healthz")
        if not isinstance(body, dict):
            raise _bad_response(f"expected an object, got {body!r:.100}")
        return body

    async def _request(
        self, method: str, path: str, body: object = None, timeout: float | None = None
    ) -> Response:
        payload = None if body is None else orjson.dumps(body)
        response = await self._transport.request(
            method, path, token=self._token, body=payload, timeout=timeout
        )
        response.raise_for_status()
        return response

    async def _request_json(
        self, method: str, path: str, body: object = None, timeout: float | None = None
    ) -> Any:
        return _json_body(await self._request(method, path, body, timeout))

    async def _ws_connect(
        self,
        target: str,
        *,
        headers: Mapping[str, str] | None,
        subprotocols: Sequence[str],
        max_message_size: int,
        timeout: float | None = None,
    ) -> WebSocket:
        stream = await self._transport.open_stream()
        timeout = self._transport.timeout if timeout is None else timeout
        ws = WebSocket(stream, timeout=timeout, max_message_size=max_message_size)
        request_headers = [
            (k, v) for k, v in self._transport.request_headers(self._token) if k != "Host"
        ]
        if headers:
            request_headers += list(headers.items())
        try:
            await ws._handshake(
                host=self._origin.host_header,
                target=self._origin.base_path + target,
                headers=request_headers,
                subprotocols=subprotocols,
            )
        except BaseException:
            await ws._abort()
            raise
        return ws


class Sandbox:
    """One sandbox's ports. Get it with :meth:`TunnelClient.sandbox`.

    Method names follow PEP 8; the Cloudflare TypeScript names are aliases:
    ``exposePort``, ``unexposePort``, ``getExposedPorts``, ``wsConnect``.
    """

    __slots__ = ("_client", "_path", "id")

    def __init__(self, client: TunnelClient, sandbox_id: str) -> None:
        self._client = client
        self.id = sandbox_id
        self._path = f"/v1/sandboxes/{quote(sandbox_id, safe='')}"

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r})"

    async def expose_port(
        self,
        port: int,
        *,
        name: str | None = None,
        token: str | None = None,
        wait: bool | float | Mapping[str, Any] | None = None,
        protocol: str = "http",
        proxy_protocol: bool = False,
        inspect: bool = False,
    ) -> ExposedPort:
        """Expose ``port`` at a preview URL. Idempotent: re-exposing keeps the token and URL
        (name and options become the ones given).

        ``token`` picks a custom URL token (1-16 of ``[a-z0-9_]``, unique in the sandbox).
        ``protocol`` "tcp" exposes the port as raw TCP on a public port of the edge's range,
        "tls" routes TLS by SNI to the sandbox without ending it (both when the edge enables
        them); ``proxy_protocol`` sends the service a PROXY protocol v2 header with the client's
        address; ``inspect`` records requests for :meth:`requests` (HTTP only).
        ``wait`` first waits for the port to be ready (:meth:`wait_for_port`), so the URL works
        the moment it is returned: ``True`` (its defaults), a number (its ``timeout``), or a
        mapping of its keyword arguments. If the port is not ready, nothing is exposed and
        :class:`PortNotReadyError` is raised.

        Example::

            p = await sb.expose_port(8000, name="api")
            p.exposed_at   # "http://8000-abc123-k3x9q2m7p4w8z1c5.localhost:8080/"
            await sb.exposePort(8001, token="my_token")
            await sb.expose_port(8002, wait={"path": "/health", "timeout": 60})
        """
        body: dict[str, object] = {"port": _check_port(port)}
        if name is not None:
            if not isinstance(name, str):
                raise ValidationError(f"Port name must be a string, got {type(name).__name__}.")
            body["name"] = name
        if token is not None:
            body["token"] = _check_token(token)
        try:  # the edge's rule, checked here first: a clear error without a round trip
            checked = _hostnames.validate_exposure_options(protocol, proxy_protocol, inspect)
        except _hostnames.ValidationError as exc:
            raise ValidationError(exc.message) from None
        if checked.protocol != "http":
            body["protocol"] = checked.protocol
        if checked.proxy_protocol:
            body["proxyProtocol"] = True
        if checked.inspect:
            body["inspect"] = True
        if wait is not None and wait is not False:
            if wait is True:
                options: Mapping[str, Any] = {}
            elif isinstance(wait, int | float) and not isinstance(wait, bool):
                options = {"timeout": wait}
            elif isinstance(wait, Mapping):
                options = wait
            else:
                raise ValidationError(
                    f"wait must be True, a timeout in seconds or a mapping of wait_for_port "
                    f"options, got {type(wait).__name__}."
                )
            await self.wait_for_port(port, **options)
        data = await self._client._request_json("POST", f"{self._path}/ports", body)
        return ExposedPort._from_json(data)

    async def wait_for_port(
        self,
        port: int,
        *,
        mode: str = "http",
        path: str = "/",
        status: int | tuple[int, int] = (200, 399),
        interval: float = 0.5,
        timeout: float = 30.0,
    ) -> None:
        """Wait until ``port`` is ready inside the sandbox (Cloudflare's ``waitForPort``).

        The agent probes ``127.0.0.1:port`` every ``interval`` seconds (clamped to 0.1-10):
        ``mode="http"`` until ``GET path`` answers with ``status`` (one code, or an inclusive
        ``(min, max)`` range; default 200-399), ``mode="tcp"`` until a connect succeeds. Returns
        once ready. ``timeout`` (seconds, at most 300) bounds the wait: then
        :class:`PortNotReadyError` with ``last_status``. :class:`SandboxNotConnectedError` when
        the agent is not connected, or leaves while waiting. The port needs no exposure.

        Example::

            await sb.wait_for_port(8000, path="/health", timeout=30)
            await sb.waitForPort(5432, mode="tcp")
        """
        port = _check_port(port)
        if mode not in ("http", "tcp"):
            raise ValidationError(f"mode must be 'http' or 'tcp', got {mode!r:.64}.")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValidationError(
                f"path must be a string starting with '/', got {path!r:.100}.", "INVALID_PATH"
            )
        if isinstance(status, int) and not isinstance(status, bool):
            low = high = status
        elif isinstance(status, tuple) and len(status) == 2 and all(type(s) is int for s in status):
            low, high = status
        else:
            raise ValidationError(
                f"status must be an int or a (min, max) pair, got {status!r:.64}."
            )
        if not 100 <= low <= high <= 599:
            raise ValidationError(f"status must be HTTP statuses with min <= max, got {status!r}.")
        if not _positive(interval):
            raise ValidationError(
                f"interval must be a positive number of seconds, got {interval!r}."
            )
        if not _positive(timeout) or timeout > MAX_WAIT_SECONDS:
            raise ValidationError(
                f"timeout must be a number of seconds in (0, {MAX_WAIT_SECONDS:g}], "
                f"got {timeout!r}."
            )
        body = {
            "mode": mode,
            "path": path,
            "statusMin": low,
            "statusMax": high,
            "interval": round(min(max(interval * 1000, 100), 10_000)),
            "timeout": timeout,
        }
        client = self._client
        # tunneld answers within timeout + its control timeout (5 s by default); wait that long.
        await client._request(
            "POST", f"{self._path}/ports/{port}/wait", body, timeout + client.timeout
        )

    async def unexpose_port(self, port: int) -> None:
        """Close the preview URL of ``port`` and reset its live connections. Idempotent.

        Example::

            await sb.unexpose_port(8000)
        """
        await self._client._request("DELETE", f"{self._path}/ports/{_check_port(port)}")

    async def get_exposed_ports(self) -> list[ExposedPort]:
        """The sandbox's exposed ports, sorted by port.

        Example::

            for p in await sb.get_exposed_ports():
                print(p.port, p.url, p.name)
        """
        data = await self._client._request_json("GET", f"{self._path}/ports")
        if not isinstance(data, dict) or not isinstance(data.get("ports"), list):
            raise _bad_response(f"expected {{'ports': [...]}}, got {data!r:.100}")
        ports = [ExposedPort._from_json(item) for item in data["ports"]]
        ports.sort(key=lambda p: p.port)
        return ports

    async def ws_connect(
        self,
        port: int,
        path: str = "/",
        *,
        headers: Mapping[str, str] | None = None,
        subprotocols: Sequence[str] = (),
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> WebSocket:
        """Open a WebSocket to ``ws://localhost:{port}{path}`` inside the sandbox, via tunneld.

        Needs no exposure (the admin token authorises it); the handshake goes end to end to the
        sandbox's server, so ``headers`` and ``subprotocols`` reach it.

        Example::

            async with await sb.ws_connect(8000, path="/ws") as ws:
                await ws.send("hi")
                print(await ws.receive())
        """
        port = _check_port(port)
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValidationError(
                f"WebSocket path must be a string starting with '/', got {path!r:.100}.",
                "INVALID_PATH",
            )
        target = f"{self._path}/ports/{port}/ws?path={quote(path, safe='/')}"
        return await self._client._ws_connect(
            target,
            headers=headers,
            subprotocols=subprotocols,
            max_message_size=max_message_size,
        )

    async def open_tcp(
        self, port: int, *, timeout: float | None = None, websocket: bool = False
    ) -> TcpStream:
        """A raw TCP connection to ``127.0.0.1:{port}`` inside the sandbox, via tunneld: an anyio
        byte stream (``send``, ``receive``, ``send_eof``, ``aclose``; ``abort`` resets).

        Needs no exposure (the admin token authorises it). Returns once the agent has connected
        to the port, waiting at most ``timeout`` (default: the client's); nothing listening is
        :class:`TunnelError` with code ``UPSTREAM_CONNECT_FAILED`` (HTTP 502). A reset anywhere
        on the path is ``anyio.BrokenResourceError`` from ``receive``, never a clean EOF.
        ``websocket=True`` carries the same stream in WebSocket binary messages (a
        :class:`WebSocketTcpStream`), for a path that passes only WebSockets.

        Example::

            async with await sb.open_tcp(6379) as redis:
                await redis.send(b"PING\\r\\n")
                print(await redis.receive())   # b"+PONG\\r\\n"
        """
        port = _check_port(port)
        client = self._client
        if timeout is not None and not _positive(timeout):
            raise ValidationError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        if websocket:
            ws = await client._ws_connect(
                f"{self._path}/ports/{port}/tcp",
                headers=None,
                subprotocols=[TCP_SUBPROTOCOL],
                max_message_size=DEFAULT_MAX_MESSAGE_SIZE,
                timeout=timeout,
            )
            return WebSocketTcpStream(ws)
        return await open_tcp_stream(
            client._transport,
            client._origin.base_path + f"{self._path}/ports/{port}/tcp",
            client._token,
            client.timeout if timeout is None else timeout,
        )

    # -- request inspection (docs/sdk.md#request-inspection) -------------------------------------
    async def set_inspection(self, on: bool = True) -> bool:
        """Record this sandbox's preview requests (``on``) or stop (``False``); returns the new
        state. Runtime state of the node that holds the sandbox's agent (an exposure's
        ``inspect=True`` is the durable alternative, for one port).

        Example::

            await sb.set_inspection(True)
        """
        method = "PUT" if on else "DELETE"
        data = await self._client._request_json(method, f"{self._path}/inspect")
        if not isinstance(data, dict) or type(data.get("inspect")) is not bool:
            raise _bad_response(f"expected {{'inspect': bool}}, got {data!r:.100}")
        return bool(data["inspect"])

    async def requests(self, *, since: int = 0, wait: float = 0) -> RequestList:
        """Recorded requests, oldest first (summaries: ``id``, ``time``, ``method``, ``target``,
        ``status``, ``state``, ``requestBytes``, ``responseBytes``, ``durationMs``, ...), those
        with an ``id`` above ``since``; ``wait`` (seconds, at most 30) waits for a new one when
        there is none yet (long-poll). The list also carries the edge's ``inspect`` (the
        sandbox's switch), ``last`` and ``skipped`` (:class:`RequestList`).

        Example::

            for r in await sb.requests():
                print(r["id"], r["method"], r["target"], r["status"])
        """
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:
            raise ValidationError(f"since must be a request id (int >= 0), got {since!r:.32}.")
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 30:
            raise ValidationError(f"wait must be 0-30 seconds, got {wait!r:.32}.")
        query = f"?since={since}" + (f"&wait={math.ceil(wait)}" if wait else "")
        client = self._client
        data = await client._request_json(
            "GET", f"{self._path}/requests{query}", timeout=math.ceil(wait) + client.timeout
        )
        return RequestList._from_json(data)

    async def request(self, request_id: int) -> dict[str, Any]:
        """One recorded request in full: ``request`` and ``response`` with headers (credentials
        ``[redacted]``) and the first bytes of each body. :class:`NotFoundError` when it was
        never recorded or was evicted.

        Example::

            r = await sb.request(42)
            print(r["response"]["status"], r["response"]["body"])
        """
        if not isinstance(request_id, int) or isinstance(request_id, bool) or request_id < 0:
            raise ValidationError(f"request_id must be an int >= 0, got {request_id!r:.32}.")
        data = await self._client._request_json("GET", f"{self._path}/requests/{request_id}")
        if not isinstance(data, dict):
            raise _bad_response(f"expected a request record, got {data!r:.100}")
        return data

    exposePort = expose_port  # Cloudflare Sandbox SDK names
    waitForPort = wait_for_port
    unexposePort = unexpose_port
    getExposedPorts = get_exposed_ports
    wsConnect = ws_connect
