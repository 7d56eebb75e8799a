"""Events returned by ``Session.events_received()``: frozen, slotted dataclasses.

Peer FIN is folded into :class:`DataReceived` (``end_stream=True``, possibly with empty ``data``):
there is no separate ``StreamEnded`` event, so a shell handles "bytes then EOF" in one place and
cannot see them out of order.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.control import Message
from protocol.errors import GoAwayCode, ResetCode

__all__ = [
    "ConnectionTerminated",
    "ControlReceived",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "PingAcknowledged",
    "StreamAccepted",
    "StreamOpened",
    "StreamReset",
    "StreamWritable",
]


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every session event."""


@dataclass(frozen=True, slots=True)
class ControlReceived(Event):
    """A control message arrived on stream 0 (including the handshake ``Hello``/``Welcome``)."""

    message: Message


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream (DATA|SYN). Answer with ``accept_stream`` or ``reset_stream``."""

    stream_id: int
    port: int
    via: str
    client: str
    # Node-to-node links only (tunneld/nodelink.py): the sandbox the stream is for, and the
    # ownership epoch the opener saw. None on an agent link.
    sandbox: str | None = None
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class StreamAccepted(Event):
    """The peer accepted a stream we opened (WINDOW_UPDATE|ACK)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Stream bytes. ``data`` is a ``bytes`` copy out of the session's receive buffer: that buffer
    is compacted and refilled on the next ``receive_data``, and the shell hands ``data`` to a
    transport that may keep a reference (uvloop does) long after, so a view would be overwritten.
    One copy per frame is the price of a reusable receive buffer. Call ``acknowledge`` once the
    bytes left your hands; ``end_stream`` is the peer's FIN (half-close)."""

    stream_id: int
    data: bytes
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """A stream was aborted. ``remote=True``: the peer sent RST; ``remote=False``: the session
    reset it by itself (a fault confined to that stream). ``reset_stream()`` calls emit nothing."""

    stream_id: int
    code: ResetCode
    remote: bool


@dataclass(frozen=True, slots=True)
class StreamWritable(Event):
    """Queued send bytes of the stream fell to ``stream_send_low_water`` after ``send_data``
    returned True: resume reading its source."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged(Event):
    """Our PING came back; ``rtt`` in the same unit as the ``now`` values given to the session."""

    rtt: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer will accept no new streams; existing ones may finish."""

    code: GoAwayCode


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(Event):
    """The session is over (emitted exactly once). ``remote=True``: the peer sent GO_AWAY and every
    stream finished; ``remote=False``: we ended it (``close()`` drained, a protocol error by the
    peer, a dead-peer timeout). Flush ``data_to_send()`` then close the transport."""

    code: GoAwayCode
    reason: str
    remote: bool
