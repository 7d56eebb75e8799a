"""Error classes and wire error codes.

``ProtocolError`` splits the way h11 and wsproto split it: :class:`LocalProtocolError` means *our
caller* misused the API (raised at once, the session state is unchanged), and
:class:`RemoteProtocolError` means *the peer* misbehaved. The latter is never raised out of
``Session.receive_data``: the session queues a GO_AWAY carrying ``code``, emits
``ConnectionTerminated`` and keeps the exception as ``Session.error``.
"""

from __future__ import annotations

import enum

__all__ = [
    "GoAwayCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "ResetCode",
    "StreamClosedError",
]


class GoAwayCode(enum.IntEnum):
    """Why a session ends (GO_AWAY ``length`` field)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    FLOW_CONTROL_ERROR = 2
    INTERNAL_ERROR = 3
    TIMEOUT = 4
    AUTH_FAILED = 5
    REPLACED = 6  # a newer session for the same sandbox took over
    SHUTTING_DOWN = 7
    FRAME_TOO_LARGE = 8
    UNSUPPORTED_VERSION = 9
    TOO_MANY_REQUESTS = 10  # control requests far past the rate limit


class ResetCode(enum.IntEnum):
    """Why one stream was aborted (WINDOW_UPDATE|RST ``length`` field)."""

    CANCEL = 0  # normal abort
    CONNECT_REFUSED = 1
    CONNECT_FAILED = 2
    PORT_NOT_ALLOWED = 3
    UNEXPOSED = 4
    STREAM_CLOSED = 5
    REFUSED_STREAM = 6  # too many streams / going away
    INTERNAL = 7
    TIMEOUT = 8


class ProtocolError(Exception):
    """Base class; ``code`` is the GO_AWAY code that describes the fault."""

    def __init__(self, message: str, code: GoAwayCode = GoAwayCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """The caller misused the API. Raised immediately; the session state is unchanged."""


class StreamClosedError(LocalProtocolError):
    """The stream existed but is gone (reset, or both sides finished). Shells racing a
    ``StreamReset`` event may catch exactly this."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol. Never raised out of ``receive_data``; kept on
    ``Session.error`` after the session terminated."""
