"""tunneld's sans-IO protocol core, shared by the agent and the edge.

Bytes in, events out; calls in, bytes to send out. Nothing here does I/O or reads a clock
(``tests/test_layering.py`` enforces it): time comes in as ``now`` arguments and timers go out
through ``Session.get_timer()`` / ``Session.handle_timer(now)``.

    from protocol import Session, Role
    edge = Session(Role.EDGE, now=loop.time())
    edge.receive_data(data, now=loop.time())
    for event in edge.events_received(): ...
    transport.writelines(edge.data_to_send())
"""

from __future__ import annotations

from . import control, events, hostnames
from .control import ControlError, Message
from .errors import (
    GoAwayCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ResetCode,
    StreamClosedError,
)
from .events import (
    ConnectionTerminated,
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    PingAcknowledged,
    StreamAccepted,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from .frames import PREFACE, FrameType
from .hostnames import PreviewRoute, ValidationError, parse_preview_host
from .session import Role, Session, SessionConfig

__all__ = [
    "PREFACE",
    "ConnectionTerminated",
    "ControlError",
    "ControlReceived",
    "DataReceived",
    "Event",
    "FrameType",
    "GoAwayCode",
    "GoAwayReceived",
    "LocalProtocolError",
    "Message",
    "PingAcknowledged",
    "PreviewRoute",
    "ProtocolError",
    "RemoteProtocolError",
    "ResetCode",
    "Role",
    "Session",
    "SessionConfig",
    "StreamAccepted",
    "StreamClosedError",
    "StreamOpened",
    "StreamReset",
    "StreamWritable",
    "ValidationError",
    "control",
    "events",
    "hostnames",
    "parse_preview_host",
]
