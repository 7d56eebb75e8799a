"""Stream state table: every legal transition of one stream, in one place (h11 ``_state.py``).

A stream is opened in OPEN. Each direction closes on its own with a FIN (TCP half-close); when
both are closed the stream is CLOSED. RST from either side closes it at once from any state.
``SEND_FIN`` happens when the caller *asks* for the FIN (``end_stream`` / ``send_data(...,
end_stream=True)``), even if the FIN frame waits behind queued data; the session keeps the stream
around until that frame was actually emitted. A (state, event) pair missing from the table is
illegal: a ``LocalProtocolError`` for our caller, a stream reset for the peer.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["CAN_RECEIVE", "CAN_SEND", "TRANSITIONS", "StreamEvent", "StreamState"]


class StreamState(enum.Enum):
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"  # we sent FIN, the peer may still send
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer sent FIN, we may still send
    CLOSED = "closed"


class StreamEvent(enum.Enum):
    SEND_FIN = "send FIN"
    RECV_FIN = "receive FIN"
    RESET = "reset"  # RST sent or received


_S = StreamState
_E = StreamEvent

TRANSITIONS: Final[dict[tuple[StreamState, StreamEvent], StreamState]] = {
    (_S.OPEN, _E.SEND_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _E.RECV_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _E.RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.RESET): _S.CLOSED,
    # both directions finished, but our FIN frame still waits behind queued data: a reset drops it
    (_S.CLOSED, _E.RESET): _S.CLOSED,
}

# Which states allow sending / receiving DATA. The session caches these per stream as booleans
# on every transition, so the DATA hot path does not look anything up.
CAN_SEND: Final = frozenset({_S.OPEN, _S.HALF_CLOSED_REMOTE})
CAN_RECEIVE: Final = frozenset({_S.OPEN, _S.HALF_CLOSED_LOCAL})
