"""Typed exceptions of the SDK, and the mapping from an admin API error response to them.

The admin API answers errors as ``{"error": "<human sentence>", "code": "<UPPER_SNAKE>"}`` with a
fitting HTTP status. :func:`error_from_response` picks the class by ``code`` first, then by status,
and falls back to :class:`TunnelError`; a body that is not that JSON still gives a readable error.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "ConnectionClosed",
    "InvalidPortError",
    "InvalidSandboxIdError",
    "InvalidTokenError",
    "NotFoundError",
    "PortNotReadyError",
    "SandboxNotConnectedError",
    "TunnelConnectionError",
    "TunnelError",
    "TunnelTimeoutError",
    "ValidationError",
    "error_from_response",
]

# How much of a non-JSON error body goes into the message: enough to recognise a proxy's error
# page, short enough to keep tracebacks readable.
_MAX_BODY_IN_MESSAGE: Final = 200


class TunnelError(Exception):
    """Base class of every error the SDK raises about tunneld (except :class:`ConnectionClosed`).

    ``message`` is the server's human sentence (or the SDK's own), ``code`` an ``UPPER_SNAKE``
    string, ``status`` the HTTP status, or ``None`` when no response was involved (client-side
    validation, timeouts, unreachable server).

    Example::

        try:
            await sb.expose_port(8000)
        except TunnelError as exc:
            print(exc.status, exc.code, exc.message)
    """

    default_code: str = "TUNNEL_ERROR"

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.status = status

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code!r}, status={self.status!r})"
        )

    def __reduce__(self) -> tuple[type[TunnelError], tuple[str, str, int | None]]:
        return (type(self), (self.message, self.code, self.status))


class ValidationError(TunnelError, ValueError):
    """A value was refused (client-side before any request, or by the server with 400)."""

    default_code = "VALIDATION_ERROR"


class InvalidPortError(ValidationError):
    """Port not an ``int`` in 1024-65535, or the control-plane port 3000 (400 INVALID_PORT)."""

    default_code = "INVALID_PORT"


class InvalidSandboxIdError(ValidationError):
    """Sandbox id not 1-63 chars of ``[a-z0-9-]``, hyphen at an end, or reserved."""

    default_code = "INVALID_SANDBOX_ID"


class InvalidTokenError(ValidationError):
    """Custom preview token not 1-16 chars of ``[a-z0-9_]`` (400 INVALID_TOKEN_FORMAT)."""

    default_code = "INVALID_TOKEN_FORMAT"


class AuthenticationError(TunnelError):
    """The admin token is missing or wrong (401, or 403)."""

    default_code = "UNAUTHORIZED"


class NotFoundError(TunnelError):
    """Unknown sandbox or resource (404)."""

    default_code = "NOT_FOUND"


class ConflictError(TunnelError):
    """The request conflicts with the current state, e.g. a custom token in use (409)."""

    default_code = "CONFLICT"


class SandboxNotConnectedError(TunnelError):
    """The sandbox's agent is not connected to tunneld (503 SANDBOX_NOT_CONNECTED)."""

    default_code = "SANDBOX_NOT_CONNECTED"


class TunnelTimeoutError(TunnelError, TimeoutError):
    """A wait exceeded the client's ``timeout``, or tunneld timed out waiting for an agent (504)."""

    default_code = "TIMEOUT"


class PortNotReadyError(TunnelTimeoutError):
    """:meth:`Sandbox.wait_for_port` gave up: the port was not ready in time (504
    PORT_NOT_READY). ``last_status`` is the last HTTP status the agent's probe got (``None``: it
    got none, e.g. nothing listened); the message also says why the last probe failed.

    Example::

        try:
            await sb.wait_for_port(8000, path="/health", timeout=30)
        except PortNotReadyError as exc:
            print(exc.last_status, exc.message)   # 503 "Port 8000 was not ready within 30 s ..."
    """

    default_code = "PORT_NOT_READY"

    def __init__(
        self,
        message: str,
        code: str | None = None,
        status: int | None = None,
        last_status: int | None = None,
    ) -> None:
        super().__init__(message, code, status)
        self.last_status = last_status

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.code, self.status, self.last_status))


class TunnelConnectionError(TunnelError, ConnectionError):
    """tunneld cannot be reached, or the connection broke mid-request."""

    default_code = "CONNECTION_ERROR"


class ConnectionClosed(Exception):  # the name websockets and trio-websocket use
    """The WebSocket is closed: raised by ``receive()``/``send()`` after the closing handshake.

    ``code`` and ``reason`` are those of the peer's close frame (1006 and ``""`` when the
    connection was lost without one, 1005 when the close frame carried no code).
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        suffix = f": {self.reason}" if self.reason else ""
        return f"WebSocket closed with code {self.code}{suffix}"


_BY_CODE: Final[dict[str, type[TunnelError]]] = {
    "INVALID_PORT": InvalidPortError,
    "INVALID_SANDBOX_ID": InvalidSandboxIdError,
    "INVALID_SANDBOX_ID_LENGTH": InvalidSandboxIdError,
    "INVALID_SANDBOX_ID_HYPHENS": InvalidSandboxIdError,
    "RESERVED_SANDBOX_ID": InvalidSandboxIdError,
    "INVALID_TOKEN_FORMAT": InvalidTokenError,
    "UNAUTHORIZED": AuthenticationError,
    "SANDBOX_NOT_FOUND": NotFoundError,
    "TOKEN_IN_USE": ConflictError,
    "SANDBOX_NOT_CONNECTED": SandboxNotConnectedError,
    "AGENT_TIMEOUT": TunnelTimeoutError,
    "PORT_NOT_READY": PortNotReadyError,
}

_BY_STATUS: Final[dict[int, type[TunnelError]]] = {
    400: ValidationError,  # any other refused value: INVALID_NAME, INVALID_OPTION, INVALID_PATH...
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    504: TunnelTimeoutError,
}


def error_from_response(status: int, reason: str, body: bytes) -> TunnelError:
    """Build the typed exception for an error response (``status`` >= 400, or an unexpected one)."""
    message: str | None = None
    code: str | None = None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        if isinstance(payload.get("error"), str):
            message = payload["error"]
        if isinstance(payload.get("code"), str):
            code = payload["code"]
    if message is None:
        text = body[:_MAX_BODY_IN_MESSAGE].decode("utf-8", "replace").strip()
        if len(body) > _MAX_BODY_IN_MESSAGE:
            text += "..."
        message = f"tunneld answered HTTP {status} {reason}".rstrip()
        if text:
            message += f": {text}"
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status) or TunnelError
    code = code if code is not None else f"HTTP_{status}"
    if cls is PortNotReadyError:
        assert isinstance(payload, dict)  # the code came from it
        last = payload.get("lastStatus")
        return PortNotReadyError(message, code, status, last if type(last) is int else None)
    return cls(message, code, status)
