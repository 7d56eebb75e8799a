"""HTTP/1.1 transport of the SDK: h11 over an anyio byte stream (TCP, or TLS for ``https://``).

Theory of operation: every request takes an idle keep-alive connection if one is parked, else
dials a new one; it writes the request, reads the response with h11 into one bounded ``bytes``,
and parks the connection again when both sides of h11 are DONE and keep-alive is on (only inside
``async with TunnelClient(...)``, so nothing is left open when the client is used without it).
The server may close a parked connection at any time; a request that fails on a *reused*
connection before any response byte arrived is retried once on a fresh one (every admin call is
idempotent, so a duplicate delivery is harmless). Each wait (connect, write, every read) is
bounded by ``timeout``, as httpx's connect/read/write timeouts are.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11

from ._errors import (
    TunnelConnectionError,
    TunnelError,
    TunnelTimeoutError,
    ValidationError,
    error_from_response,
)

__all__ = ["DEFAULT_MAX_RESPONSE_SIZE", "MAX_CONNECTIONS", "HTTPTransport", "Origin", "Response"]

# Admin responses are small JSON documents; even a list of thousands of sandboxes is well below
# this. The bound keeps a misbehaving server (or a wrong URL) from filling memory.
DEFAULT_MAX_RESPONSE_SIZE: Final = 8 * 1024 * 1024
# Parked keep-alive connections. Admin traffic is low-rate; a few cover concurrent callers.
_MAX_IDLE_CONNECTIONS: Final = 4
# Requests in flight at once, each on its own connection; more wait for one to finish (within
# their timeout). Under tunneld's admin_max_connections_per_ip (64 by default), so that one
# client's burst of calls is queued here instead of being refused with 503 TOO_MANY_CONNECTIONS.
MAX_CONNECTIONS: Final = 32
_READ_SIZE: Final = 64 * 1024
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_USER_AGENT: Final = "tunneld-python/0.1"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where tunneld's admin API is: parsed once from the client's base URL."""

    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix" without a trailing slash

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValidationError(
                f"Invalid tunneld URL: {base_url!r}. Use http://host[:port] or https://host[:port].",
                "INVALID_URL",
            )
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise ValidationError(
                f"Invalid port in tunneld URL: {base_url!r}.", "INVALID_URL"
            ) from None
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == _DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.base_path}"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    body: bytes

    def raise_for_status(self) -> None:
        if not 200 <= self.status < 300:
            raise error_from_response(self.status, self.reason, self.body)


class _Stale(Exception):
    """A reused connection turned out to be closed by the server before it answered."""


class _Connection:
    __slots__ = ("h11", "reused", "stream")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False


class HTTPTransport:
    """Sends admin requests; owns the parked keep-alive connections."""

    def __init__(
        self,
        origin: Origin,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
    ) -> None:
        self.origin = origin
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.max_response_size = max_response_size
        self.keepalive = False
        self._idle: list[_Connection] = []
        self._slots: anyio.Semaphore | None = None  # made in the event loop of the first request

    async def open_stream(self) -> anyio.abc.ByteStream:
        """Dial tunneld (TCP or TLS), bounded by ``timeout``; errors become SDK exceptions."""
        tls = self.origin.scheme == "https"
        try:
            with anyio.fail_after(self.timeout):
                if tls:
                    return await anyio.connect_tcp(
                        self.origin.host,
                        self.origin.port,
                        tls=True,
                        ssl_context=self.ssl_context,
                        # HTTP frames its messages; a server closing without close_notify is fine.
                        tls_standard_compatible=False,
                    )
                return await anyio.connect_tcp(self.origin.host, self.origin.port)
        except TimeoutError:
            raise TunnelTimeoutError(
                f"Timed out after {self.timeout:g}s connecting to tunneld at {self.origin}."
            ) from None
        except OSError as exc:
            raise TunnelConnectionError(f"Cannot reach tunneld at {self.origin}: {exc}") from exc

    def request_headers(self, token: str | None) -> list[tuple[str, str]]:
        headers = [("Host", self.origin.host_header), ("User-Agent", _USER_AGENT)]
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> Response:
        """``timeout``: this request's bound on each wait instead of the client's (a call that
        waits on the server, as ``wait_for_port`` does, needs longer for its answer)."""
        headers = self.request_headers(token)
        headers.append(("Accept", "application/json"))
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        target = self.origin.base_path + path
        if self._slots is None:
            self._slots = anyio.Semaphore(MAX_CONNECTIONS)
        wait = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(wait):
                await self._slots.acquire()
        except TimeoutError:
            raise TunnelTimeoutError(
                f"Timed out after {wait:g}s waiting for one of this client's {MAX_CONNECTIONS} "
                f"connections to tunneld ({method} {target})."
            ) from None
        try:
            if self._idle:
                conn = self._idle.pop()
                try:
                    return await self._exchange(conn, method, target, headers, body, timeout)
                except _Stale:
                    pass
            conn = _Connection(await self.open_stream())
            return await self._exchange(conn, method, target, headers, body, timeout)
        finally:
            self._slots.release()

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        timeout: float | None = None,
    ) -> Response:
        done = False
        try:
            response = await self._exchange_inner(conn, method, target, headers, body, timeout)
            done = True
            return response
        finally:
            if (
                done
                and self.keepalive
                and conn.h11.our_state is h11.DONE
                and conn.h11.their_state is h11.DONE
                and len(self._idle) < _MAX_IDLE_CONNECTIONS
            ):
                conn.h11.start_next_cycle()
                conn.reused = True
                self._idle.append(conn)
            else:
                await anyio.aclose_forcefully(conn.stream)

    async def _exchange_inner(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        timeout: float | None = None,
    ) -> Response:
        wait = self.timeout if timeout is None else timeout
        got_bytes = False
        try:
            data = conn.h11.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                data += conn.h11.send(h11.Data(data=body))
            data += conn.h11.send(h11.EndOfMessage())
            with anyio.fail_after(wait):
                await conn.stream.send(data)
            head: h11.Response | None = None
            chunks: list[bytes] = []
            size = 0
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    with anyio.fail_after(wait):
                        try:
                            received = await conn.stream.receive(_READ_SIZE)
                        except anyio.EndOfStream:
                            received = b""
                    if not received and not got_bytes:
                        if conn.reused:
                            raise _Stale
                        raise TunnelConnectionError(
                            f"tunneld at {self.origin} closed the connection without answering."
                        )
                    got_bytes = True
                    conn.h11.receive_data(received)
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > self.max_response_size:
                        raise TunnelError(
                            f"Response from tunneld exceeds {self.max_response_size} bytes.",
                            "RESPONSE_TOO_LARGE",
                        )
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):  # pragma: no cover - h11 raises first
                    raise TunnelConnectionError("tunneld closed the connection mid-response.")
                # h11.InformationalResponse (1xx): nothing to do, the final response follows.
        except TunnelError:
            raise
        except TimeoutError:
            raise TunnelTimeoutError(
                f"Timed out after {wait:g}s waiting for tunneld ({method} {target})."
            ) from None
        except h11.RemoteProtocolError as exc:
            raise TunnelConnectionError(
                f"Invalid or truncated HTTP response from tunneld: {exc}", "BAD_RESPONSE"
            ) from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            if not got_bytes and conn.reused:
                raise _Stale from exc
            raise TunnelConnectionError(
                f"Connection to tunneld at {self.origin} broke: {exc or type(exc).__name__}"
            ) from exc
        assert head is not None  # h11 emits Response before Data/EndOfMessage
        return Response(head.status_code, head.reason.decode("latin-1"), b"".join(chunks))

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await anyio.aclose_forcefully(conn.stream)
