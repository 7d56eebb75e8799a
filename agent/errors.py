"""Errors the agent core raises to its callers (the local control API, the CLI).

An :class:`AgentError` carries a stable ``code`` (UPPER_SNAKE), a human ``message`` and the HTTP
``status`` the local API answers with. The status comes from one table, :data:`STATUS_BY_CODE`,
so the core raises ``AgentError("EDGE_NOT_CONNECTED", "...")`` and never thinks about HTTP.
The edge's refusals of an expose/unexpose (the registry's rules, its store, its public TCP
ports) are in the table with the status tunneld's admin API gives the same code, so a process in
the sandbox and an orchestrator get the same answer (``tests/agent/test_edge_error_statuses.py``
derives the edge's codes from tunneld's source and fails on one missing here). The shared
validator's codes (:mod:`protocol.hostnames`) carry their own status. A code that is in neither
is an error the edge reported back to us: 502, like any proxy relaying an upstream failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from protocol.hostnames import (
    InvalidNameError,
    InvalidOptionError,
    InvalidPortError,
    InvalidTokenError,
)
from relay.httpapi import ApiError

__all__ = ["DEFAULT_STATUS", "STATUS_BY_CODE", "AgentError", "api_port_error", "status_for"]

# Anything not listed is a failure reported by (or about) the edge, which we only relay.
DEFAULT_STATUS: Final = 502

STATUS_BY_CODE: Final[Mapping[str, int]] = MappingProxyType(
    {
        # The caller sent something we refuse.
        "INVALID_PORT": 400,
        "INVALID_TOKEN_FORMAT": 400,
        "INVALID_NAME": 400,
        "INVALID_JSON": 400,
        "INVALID_REQUEST": 400,
        "BAD_REQUEST": 400,
        "FORBIDDEN": 403,
        "NOT_FOUND": 404,
        "METHOD_NOT_ALLOWED": 405,
        "REQUEST_TIMEOUT": 408,
        # The edge refused the expose: the same status as its admin API's for the code.
        "TCP_EXPOSURES_DISABLED": 400,
        "TLS_PASSTHROUGH_DISABLED": 400,
        "PREVIEW_HOST_TOO_LONG": 400,  # its preview host would not fit DNS
        "TOKEN_IN_USE": 409,
        "TOO_MANY_EXPOSURES": 409,
        "TOO_MANY_SANDBOXES": 409,
        "RATE_LIMITED": 429,
        "TOO_MANY_WATCHES": 429,
        "BODY_TOO_LARGE": 413,
        "HEADERS_TOO_LARGE": 431,
        # Our own bug: never the caller's fault, never the edge's.
        "INTERNAL_ERROR": 500,
        # The edge is unreachable or slow: retrying later may work.
        "EDGE_NOT_CONNECTED": 503,
        "TOO_MANY_CONNECTIONS": 503,
        "STORE_UNAVAILABLE": 503,  # the edge could not save the change; nothing changed
        "TCP_PORTS_EXHAUSTED": 503,  # no public TCP port free on the edge
        "EDGE_TIMEOUT": 504,
        "PORT_NOT_READY": 504,  # a port watch ended without the port becoming ready
    }
)


# The shared validator's codes (the edge checks an agent's expose with it too), each with its
# error class's status (400); the local API checks its input with the same validator first.
_VALIDATOR_STATUS: Final[Mapping[str, int]] = MappingProxyType(
    {
        cls.code: cls.status
        for cls in (
            InvalidPortError,
            InvalidTokenError,
            InvalidNameError,
            InvalidOptionError,
        )
    }
)


def status_for(code: str) -> int:
    """The HTTP status for an error ``code``: :data:`STATUS_BY_CODE`'s, else the shared
    validator's, else 502 (an error the edge reported that neither knows)."""
    status = STATUS_BY_CODE.get(code)
    if status is None:
        status = _VALIDATOR_STATUS.get(code, DEFAULT_STATUS)
    return status


class AgentError(ApiError):
    """A refused or failed agent operation (an :class:`relay.httpapi.ApiError`: the local API
    answers it as is).

    ``status`` defaults to :func:`status_for` ``(code)``; pass it only to override the table.
    """

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(status_for(code) if status is None else status, code, message)

    def __repr__(self) -> str:
        return f"AgentError(code={self.code!r}, message={self.message!r}, status={self.status})"


def api_port_error(port: int) -> AgentError:
    """The refusal to expose ``port``, the port the agent's own control API listens on.

    Worded like ``protocol.hostnames.validate_port``'s (Cloudflare's) message for port 3000: a
    preview URL for the control API would give anyone with the URL every token and port."""
    return AgentError(
        "INVALID_PORT",
        f"Invalid port number: {port}. Must be 1024-65535, excluding 3000 and {port} "
        "(the tunnel agent's control API).",
        400,
    )
