"""The tunnel session: a sans-IO multiplexer of streams over one byte pipe.

Theory of operation
-------------------
A :class:`Session` is one end (EDGE or AGENT) of one agent connection. It never touches a socket
or a clock: the shell feeds peer bytes to :meth:`Session.receive_data`, drains
:meth:`Session.events_received`, calls commands (``open_stream``, ``send_data``, ``acknowledge``,
...), writes :meth:`Session.data_to_send` to its transport with ``writelines``, and re-arms one
timer from :meth:`Session.get_timer` (calling :meth:`Session.handle_timer` when it fires).

Input. :class:`protocol.frames.FrameReader` owns the receive buffer and yields whole frames; each
frame goes to a handler chosen by indexing a tuple with the frame type. Anything the peer gets
wrong raises :class:`RemoteProtocolError` inside the parser; ``receive_data`` catches it, queues
GO_AWAY with its code, emits :class:`ConnectionTerminated` once, and ignores all later input. A
fault confined to one stream (DATA after that stream's FIN) resets only that stream.

Handshake. The agent's first bytes are :data:`PREFACE`, queued at construction. The first frame
each side sends must be CONTROL: ``Hello`` from the agent, ``Welcome`` or ``Error`` from the edge
(``send_control`` enforces this locally; other commands raise until then), and the same is
checked on input. A GO_AWAY is also accepted as a peer's first frame (a refusal without words).

Output. Two queues: ``_ctrl`` (a flat list of ready buffers: control messages, SYNs, window
updates, ACKs, RSTs, PINGs, GO_AWAY) and ``_active``, a round-robin deque of streams with queued
DATA or a pending FIN. ``data_to_send`` returns all of ``_ctrl`` then one DATA frame per active
stream per round, each frame as a header ``bytes`` followed by ``memoryview`` slices of the
caller's buffers (a frame may gather several small ``send_data`` buffers; nothing is copied).
The round-robin position survives between calls, so ``data_to_send(limit)`` is fair across calls.

Flow control. Two levels of credit, both counted in DATA payload bytes (SYN metadata is free):
per stream (initial :data:`INITIAL_STREAM_WINDOW`, assumed by both sides) and per session
(initial :data:`INITIAL_SESSION_WINDOW`; a larger ``SessionConfig.session_window`` is granted by a
WINDOW_UPDATE on stream 0 right after our handshake message). We never send beyond
``min(stream credit, session credit)``; the peer doing so is FLOW_CONTROL_ERROR. Received bytes
leave the session at once as ``DataReceived`` events, so their *session* credit is returned as
soon as they are delivered: the session window bounds the bytes in flight on the link, nothing
more. *Stream* credit comes back only when the application calls :meth:`Session.acknowledge`
(the shell does once the bytes are handed to a socket below its high-water mark), so a stream
whose reader stopped holds its own credit and never strands the session's: one stalled reader
(or 200) cannot freeze the other streams. Credit is batched: a stream's WINDOW_UPDATE goes out
when its acknowledged-but-unreturned bytes reach half its window (the session's likewise on
stream 0). When that update goes out, the application holds nothing (``unacked == 0``) and the
peer used at least 3/4 of the window since the last update, the window doubles (up to
``max_stream_window``, and while the session's growth budget ``stream_growth_budget`` lasts) and
the increase rides in the same update. The receiver's memory is therefore bounded by
``streams x INITIAL_STREAM_WINDOW + stream_growth_budget`` plus what the shell buffers per stream.
DATA still arriving for streams that are gone is counted against the session window and its
credit returned.

Lifetime. ``close()`` sends GO_AWAY: no new streams either way (peer SYNs are refused with
REFUSED_STREAM), existing streams finish. The session terminates (``ConnectionTerminated``,
``closed`` becomes True) when a GO_AWAY was sent or received and no stream is left; a peer
GO_AWAY with an error code terminates at once; so do protocol errors and the dead-peer timeout
(nothing received for ``dead_timeout``; a PING goes out every ``heartbeat_interval`` once the
handshake is done).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Final

import orjson

from protocol import control
from protocol._state import CAN_RECEIVE, CAN_SEND, TRANSITIONS, StreamEvent, StreamState
from protocol.errors import (
    GoAwayCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ResetCode,
    StreamClosedError,
)
from protocol.events import (
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
from protocol.frames import (
    DEAD_TIMEOUT,
    DEFAULT_MAX_STREAM_WINDOW,
    DEFAULT_MAX_STREAMS,
    HEADER,
    HEARTBEAT_INTERVAL,
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_FRAME_PAYLOAD,
    MAX_OPEN_METADATA,
    MAX_WINDOW,
    PREFACE,
    VERSION,
    Frame,
    FrameReader,
    FrameType,
)

__all__ = ["DEFAULT_STREAM_GROWTH_BUDGET", "Role", "Session", "SessionConfig"]

# Stream windows start at INITIAL_STREAM_WINDOW and double for streams whose reader keeps up. A
# window cannot be taken back once granted, so a stream that then stalls keeps what it was given;
# this caps what all of one session's streams together may have been granted beyond the initial
# window (8 streams at the 4 MiB maximum), which bounds the receiver's memory at
# streams x INITIAL_STREAM_WINDOW + this, whatever the readers do (docs/architecture.md).
DEFAULT_STREAM_GROWTH_BUDGET: Final = 32 * 1024 * 1024


class Role(enum.Enum):
    EDGE = "edge"
    AGENT = "agent"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    max_stream_window: int = DEFAULT_MAX_STREAM_WINDOW
    session_window: int = INITIAL_SESSION_WINDOW  # receive window we grant at session level
    max_streams: int = DEFAULT_MAX_STREAMS
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    dead_timeout: float = DEAD_TIMEOUT
    stream_send_high_water: int = 256 * 1024  # send_data() says "pause your source" above this
    stream_send_low_water: int = 64 * 1024  # StreamWritable once queued bytes fall to this
    # False: a SYN from the peer is a protocol error (the edge: agents never open streams, and
    # refusing each SYN with an RST would let an agent make the edge write without reading)
    accept_remote_streams: bool = True
    # what all streams together may be granted beyond INITIAL_STREAM_WINDOW (window growth)
    stream_growth_budget: int = DEFAULT_STREAM_GROWTH_BUDGET

    def __post_init__(self) -> None:
        if not INITIAL_STREAM_WINDOW <= self.max_stream_window <= MAX_WINDOW:
            raise ValueError("max_stream_window must be in INITIAL_STREAM_WINDOW..MAX_WINDOW")
        # The peer starts with INITIAL_SESSION_WINDOW of credit; credit cannot be taken back.
        if not INITIAL_SESSION_WINDOW <= self.session_window <= MAX_WINDOW:
            raise ValueError("session_window must be in INITIAL_SESSION_WINDOW..MAX_WINDOW")
        if self.max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if self.heartbeat_interval <= 0 or self.dead_timeout <= 0:
            raise ValueError("heartbeat_interval and dead_timeout must be > 0")
        if not 0 <= self.stream_send_low_water <= self.stream_send_high_water:
            raise ValueError("need 0 <= stream_send_low_water <= stream_send_high_water")
        if self.stream_growth_budget < 0:
            raise ValueError("stream_growth_budget must be >= 0")


_DEFAULT_CONFIG: Final = SessionConfig()

# Plain ints for the hot path: comparing and packing IntEnum members costs a lookup each time.
_DATA: Final = int(FrameType.DATA)
_WINDOW_UPDATE: Final = int(FrameType.WINDOW_UPDATE)
_PING: Final = int(FrameType.PING)
_GO_AWAY: Final = int(FrameType.GO_AWAY)
_CONTROL: Final = int(FrameType.CONTROL)
_SYN: Final = 1
_ACK: Final = 2
_FIN: Final = 4
_RST: Final = 8
_MAX_STREAM_ID: Final = 0xFFFFFFFF
# PINGs from the peer, each of which costs a PING|ACK: a token bucket, as gRPC's keepalive
# enforcement and the HTTP/2 ping-flood fixes (CVE-2019-9512) do. An honest peer pings every
# HEARTBEAT_INTERVAL; past the bucket the session ends with GO_AWAY(TOO_MANY_REQUESTS).
_PING_RATE: Final = 10.0  # per second, sustained
_PING_BURST: Final = 100.0
# Unanswered PINGs remembered for RTT; older ones are forgotten (their PONG is then ignored).
_MAX_OUTSTANDING_PINGS: Final = 16
# Peer GO_AWAY codes after which existing streams may still finish; any other code means the peer
# has given up on the connection, so the session ends at once.
_DRAINING_CODES: Final = frozenset(
    {GoAwayCode.NORMAL, GoAwayCode.SHUTTING_DOWN, GoAwayCode.REPLACED}
)
_VIA: Final = ("preview", "direct")

_pack = HEADER.pack


class _Stream:
    __slots__ = (
        "accepted",
        "chunks",
        "fin_pending",
        "gone",
        "id",
        "local",
        "paused",
        "queued",
        "recv_avail",
        "recv_open",
        "recv_size",
        "recv_unacked",
        "recv_unreturned",
        "recv_used",
        "scheduled",
        "send_open",
        "send_window",
        "state",
    )

    def __init__(self, stream_id: int, local: bool) -> None:
        self.id = stream_id
        self.local = local  # opened by us
        self.accepted = False  # local: the peer ACKed; remote: we accepted
        self.state = StreamState.OPEN
        self.send_open = True
        self.recv_open = True
        # send side
        self.chunks: deque[memoryview] = deque()
        self.queued = 0  # bytes in chunks
        self.fin_pending = False  # FIN asked for, frame not emitted yet
        self.scheduled = False  # in Session._active
        self.paused = False  # send_data returned True, StreamWritable owed
        self.gone = False  # removed from the table; skip lazily in _active
        self.send_window = INITIAL_STREAM_WINDOW
        # receive side: recv_avail + recv_unacked + recv_unreturned == recv_size while open
        self.recv_size = INITIAL_STREAM_WINDOW
        self.recv_avail = INITIAL_STREAM_WINDOW
        self.recv_unacked = 0  # delivered, not yet acknowledged by the application
        self.recv_unreturned = 0  # acknowledged, credit not yet sent back
        self.recv_used = 0  # received since our last WINDOW_UPDATE (growth signal)


def _parse_open_metadata(payload: bytes) -> tuple[int, str, str, str | None, int | None]:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise RemoteProtocolError("stream open metadata is not JSON") from None
    if type(obj) is not dict:
        raise RemoteProtocolError("stream open metadata is not an object")
    port = obj.get("port")
    via = obj.get("via")
    client = obj.get("client", "")
    sandbox = obj.get("sandbox")
    epoch = obj.get("epoch")
    if type(port) is not int or not 1 <= port <= 65535:
        raise RemoteProtocolError("stream open metadata: bad port")
    if type(via) is not str or via not in _VIA:
        raise RemoteProtocolError("stream open metadata: bad via")
    if type(client) is not str:
        raise RemoteProtocolError("stream open metadata: bad client")
    if sandbox is not None and type(sandbox) is not str:
        raise RemoteProtocolError("stream open metadata: bad sandbox")
    if epoch is not None and (type(epoch) is not int or epoch < 0):
        raise RemoteProtocolError("stream open metadata: bad epoch")
    return port, via, client, sandbox, epoch


class Session:
    """One end of a tunnel connection. See the module docstring."""

    __slots__ = (
        "_active",
        "_config",
        "_ctrl",
        "_dead_timeout",
        "_early_pongs",
        "_events",
        "_grown",
        "_handlers",
        "_heartbeat",
        "_highest_remote_id",
        "_initial_update",
        "_last_activity",
        "_local_goaway",
        "_next_local_id",
        "_next_ping",
        "_now",
        "_ping_at",
        "_ping_counter",
        "_ping_tokens",
        "_pings",
        "_reader",
        "_received_first",
        "_recv_avail",
        "_recv_size",
        "_recv_unreturned",
        "_remote_goaway",
        "_role",
        "_send_window",
        "_sent_first",
        "_streams",
        "_terminated",
        "error",
    )

    def __init__(
        self, role: Role, config: SessionConfig = _DEFAULT_CONFIG, *, now: float = 0.0
    ) -> None:
        self._role = role
        self._config = config
        self._now = now
        agent = role is Role.AGENT
        self._reader = FrameReader(expect_preface=not agent)
        self._ctrl: list[bytes | memoryview] = [PREFACE] if agent else []
        self._events: list[Event] = []
        self._streams: dict[int, _Stream] = {}
        self._active: deque[_Stream] = deque()
        self._next_local_id = 1 if agent else 2
        self._highest_remote_id = 0
        self._send_window = INITIAL_SESSION_WINDOW  # credit the peer granted us
        self._recv_size = config.session_window  # credit we grant (once _initial_update is sent)
        self._recv_avail = INITIAL_SESSION_WINDOW  # what the peer may still send us
        self._recv_unreturned = 0
        self._grown = 0  # sum over live streams of recv_size - INITIAL_STREAM_WINDOW
        self._initial_update = config.session_window - INITIAL_SESSION_WINDOW
        self._sent_first = False
        self._received_first = False
        self._local_goaway: GoAwayCode | None = None
        self._remote_goaway: GoAwayCode | None = None
        self._terminated = False
        #: Why the session ended badly (the peer's fault, a timeout, or an internal bug), or None.
        self.error: ProtocolError | None = None
        self._last_activity = now
        self._next_ping: float | None = None
        self._pings: dict[int, float] = {}
        self._ping_counter = 0
        self._heartbeat = config.heartbeat_interval
        self._dead_timeout = config.dead_timeout
        self._ping_tokens = _PING_BURST
        self._ping_at = now
        # PINGs the peer sent before our handshake message: answered right after it, since the
        # first frame a peer receives must be the handshake message (bounded by the ping bucket)
        self._early_pongs: list[int] = []
        self._handlers = (
            self._on_data,
            self._on_window_update,
            self._on_ping,
            self._on_go_away,
            self._on_control,
        )

    # ------------------------------------------------------------------ introspection

    @property
    def role(self) -> Role:
        return self._role

    @property
    def closed(self) -> bool:
        """True once ConnectionTerminated was emitted."""
        return self._terminated

    @property
    def dead_timeout(self) -> float:
        """Seconds without a byte from the peer after which the session is over."""
        return self._dead_timeout

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def stream_send_buffered(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return st.queued if st is not None else 0

    def stream_receive_unacked(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return st.recv_unacked if st is not None else 0

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview, now: float | None = None) -> None:
        """Feed bytes from the peer. Never raises because of what the peer sent."""
        if now is not None:
            self._now = now
        if self._terminated or not data:
            return
        self._last_activity = self._now
        try:
            reader = self._reader
            reader.feed(data)
            next_frame = reader.next_frame
            handlers = self._handlers
            while not self._terminated:
                frame = next_frame()
                if frame is None:
                    break
                if self._received_first:
                    handlers[frame.type](frame)
                else:
                    self._on_first_frame(frame)
        except RemoteProtocolError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug here, not peer garbage: end the session, keep the cause
            err = ProtocolError(f"internal error: {exc!r}", GoAwayCode.INTERNAL_ERROR)
            err.__cause__ = exc
            self._fail(err)

    def events_received(self) -> list[Event]:
        events = self._events
        self._events = []
        return events

    # ------------------------------------------------------------------ output

    def has_data_to_send(self) -> bool:
        if self._ctrl:
            return True
        session_credit = self._send_window > 0
        for st in self._active:
            if st.gone:
                continue
            if not st.queued or (session_credit and st.send_window > 0):
                return True
        return False

    def data_to_send(self, limit: int | None = None) -> list[bytes | memoryview]:
        """Buffers to write, in order: every queued non-DATA frame, then DATA frames round-robin
        (one per stream per round) until ``limit`` payload bytes were emitted or nothing more is
        sendable. Payloads are ``memoryview`` slices of the ``send_data`` buffers."""
        out = self._ctrl
        self._ctrl = []
        active = self._active
        if not active:
            return out
        budget = MAX_WINDOW if limit is None else limit
        append = out.append
        low_water = self._config.stream_send_low_water
        while active:
            st = active[0]
            if st.gone:
                active.popleft()
                continue
            queued = st.queued
            if queued:
                n = min(queued, st.send_window, self._send_window, MAX_FRAME_PAYLOAD, budget)
                if n <= 0:
                    if st.send_window <= 0:  # wait for this stream's WINDOW_UPDATE
                        active.popleft()
                        st.scheduled = False
                        continue
                    break  # session credit or the caller's budget is exhausted
            else:
                n = 0  # a bare FIN
            fin = st.fin_pending and n == queued
            append(_pack(VERSION, _DATA, _FIN if fin else 0, st.id, n))
            if n:
                chunks = st.chunks
                remaining = n
                while remaining:
                    head = chunks[0]
                    size = len(head)
                    if size <= remaining:
                        append(head)
                        chunks.popleft()
                        remaining -= size
                    else:
                        append(head[:remaining])
                        chunks[0] = head[remaining:]
                        remaining = 0
                queued -= n
                st.queued = queued
                st.send_window -= n
                self._send_window -= n
                budget -= n
                if st.paused and queued <= low_water:
                    st.paused = False
                    self._events.append(StreamWritable(st.id))
            active.popleft()
            if fin:
                st.fin_pending = False
                st.scheduled = False
                if st.state is StreamState.CLOSED:
                    self._remove(st)
            elif queued and st.send_window > 0:
                active.append(st)
            else:
                st.scheduled = False
            if budget <= 0:
                break
        return out

    # ------------------------------------------------------------------ commands

    def send_control(self, msg: control.Message) -> None:
        if self._terminated:
            raise LocalProtocolError("session is closed")
        edge = self._role is Role.EDGE
        if not self._sent_first:
            if edge:
                if not isinstance(msg, control.Welcome | control.Error):
                    raise LocalProtocolError("the edge's first message must be Welcome or Error")
                if isinstance(msg, control.Welcome) and not self._received_first:
                    raise LocalProtocolError("Welcome before the agent's Hello")
            elif not isinstance(msg, control.Hello):
                raise LocalProtocolError("the agent's first message must be Hello")
        elif isinstance(msg, control.Hello | control.Welcome):
            raise LocalProtocolError("handshake message sent twice")
        try:
            payload = control.encode_message(msg)
        except control.ControlError as exc:
            raise LocalProtocolError(f"cannot encode control message: {exc}") from exc
        self._ctrl += (_pack(VERSION, _CONTROL, 0, 0, len(payload)), payload)
        if not self._sent_first:
            self._sent_first = True
            if self._initial_update:
                self._ctrl.append(_pack(VERSION, _WINDOW_UPDATE, 0, 0, self._initial_update))
                self._recv_avail += self._initial_update
                self._initial_update = 0
            for value in self._early_pongs:
                self._ctrl.append(_pack(VERSION, _PING, _ACK, 0, value))
            self._early_pongs.clear()
            self._maybe_start_keepalive()

    def open_stream(
        self,
        port: int,
        via: str = "preview",
        client: str = "",
        *,
        sandbox: str | None = None,
        epoch: int | None = None,
    ) -> int:
        """Open a stream (DATA|SYN). Data may be sent at once, before the peer's ACK.

        ``sandbox`` and ``epoch`` are for node-to-node links (the stream's sandbox and the
        ownership epoch the opener saw); an agent link leaves them out."""
        self._require_handshake()
        if not self._received_first:
            raise LocalProtocolError("cannot open streams before the peer's handshake message")
        if self._local_goaway is not None or self._remote_goaway is not None:
            raise LocalProtocolError("session is going away: no new streams")
        if len(self._streams) >= self._config.max_streams:
            raise LocalProtocolError("too many streams")
        if type(port) is not int or not 1 <= port <= 65535:
            raise LocalProtocolError(f"bad port {port!r}")
        if via not in _VIA:
            raise LocalProtocolError(f"bad via {via!r}")
        if type(client) is not str:
            raise LocalProtocolError("client must be a str")
        if sandbox is not None and type(sandbox) is not str:
            raise LocalProtocolError("sandbox must be a str")
        if epoch is not None and (type(epoch) is not int or epoch < 0):
            raise LocalProtocolError("epoch must be an int >= 0")
        fields: dict[str, object] = {"port": port, "via": via, "client": client}
        if sandbox is not None:
            fields["sandbox"] = sandbox
        if epoch is not None:
            fields["epoch"] = epoch
        try:
            meta = orjson.dumps(fields)
        except orjson.JSONEncodeError as exc:
            raise LocalProtocolError(f"cannot encode open metadata: {exc}") from exc
        if len(meta) > MAX_OPEN_METADATA:
            raise LocalProtocolError("open metadata too large")
        stream_id = self._next_local_id
        if stream_id > _MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted")
        self._next_local_id = stream_id + 2
        self._streams[stream_id] = _Stream(stream_id, local=True)
        self._ctrl += (_pack(VERSION, _DATA, _SYN, stream_id, len(meta)), meta)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Accept a stream the peer opened (WINDOW_UPDATE|ACK, delta 0)."""
        self._require_handshake()
        st = self._get_stream(stream_id)
        if st.local:
            raise LocalProtocolError("cannot accept a stream we opened")
        if st.accepted:
            raise LocalProtocolError("stream already accepted")
        st.accepted = True
        self._ctrl.append(_pack(VERSION, _WINDOW_UPDATE, _ACK, stream_id, 0))

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> bool:
        """Queue a reference to ``data`` (do not mutate it until emitted and written). Returns True
        when the stream's queued bytes reached ``stream_send_high_water``: pause the source until
        StreamWritable."""
        if self._terminated:
            raise StreamClosedError("session is closed")
        st = self._streams.get(stream_id)
        if st is None:
            st = self._get_stream(stream_id)  # raises the right error
        if not st.send_open:
            raise LocalProtocolError("send after end_stream")
        if not (st.local or st.accepted):
            raise LocalProtocolError("accept the stream before sending on it")
        view = memoryview(data)
        if view.itemsize != 1:
            view = view.cast("B")
        n = len(view)
        if n:
            st.chunks.append(view)
            st.queued += n
        if end_stream:
            st.fin_pending = True  # before the transition: a CLOSED stream stays until FIN is out
            self._transition(st, StreamEvent.SEND_FIN)
        if not st.scheduled and (n or end_stream):
            st.scheduled = True
            self._active.append(st)
        if st.queued >= self._config.stream_send_high_water:
            st.paused = True
            return True
        return False

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction: FIN after the queued data."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: ResetCode) -> None:
        """Abort a stream: queued data is dropped, RST is sent, the stream is gone at once.
        A stream that is already gone is a no-op (racing the peer's reset is normal)."""
        st = self._streams.get(stream_id)
        if st is None:
            if self._terminated or self._known_closed(stream_id):
                return
            raise LocalProtocolError(f"unknown stream {stream_id}")
        self._reset(st, ResetCode(code))

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` received bytes of the stream: return their credit.
        No-op for a stream that is already gone."""
        st = self._streams.get(stream_id)
        if st is None:
            if self._terminated or self._known_closed(stream_id):
                return
            raise LocalProtocolError(f"unknown stream {stream_id}")
        if not 0 <= n <= st.recv_unacked:
            raise LocalProtocolError(
                f"acknowledge({n}) but only {st.recv_unacked} bytes are unacknowledged"
            )
        if not n:
            return
        st.recv_unacked -= n
        if st.recv_open:
            st.recv_unreturned += n
            if st.recv_unreturned >= st.recv_size >> 1:
                self._send_stream_update(st)

    def ping(self, now: float) -> None:
        self._require_handshake()
        self._now = now
        value = self._ping_counter = (self._ping_counter + 1) & 0xFFFFFFFF
        pings = self._pings
        if len(pings) >= _MAX_OUTSTANDING_PINGS:
            del pings[next(iter(pings))]
        pings[value] = now
        self._next_ping = now + self._heartbeat
        self._ctrl.append(_pack(VERSION, _PING, 0, 0, value))

    def set_keepalive(self, heartbeat_interval: float, dead_timeout: float) -> None:
        """Change the keepalive timing mid-session (the agent adopts the edge's ``heartbeat_s``
        from the welcome). The next PING is brought forward if the new interval is shorter."""
        if heartbeat_interval <= 0 or dead_timeout <= 0:
            raise LocalProtocolError("heartbeat_interval and dead_timeout must be > 0")
        self._heartbeat = heartbeat_interval
        self._dead_timeout = dead_timeout
        if self._next_ping is not None:
            self._next_ping = min(self._next_ping, self._now + heartbeat_interval)

    def close(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        """Send GO_AWAY: no new streams; existing ones may finish. Idempotent."""
        if self._terminated or self._local_goaway is not None:
            return
        code = GoAwayCode(code)
        self._local_goaway = code
        self._ctrl.append(_pack(VERSION, _GO_AWAY, 0, 0, code))
        self._check_done()

    def get_timer(self) -> float | None:
        if self._terminated:
            return None
        deadline = self._last_activity + self._dead_timeout
        next_ping = self._next_ping
        if next_ping is not None and next_ping < deadline:
            return next_ping
        return deadline

    def handle_timer(self, now: float) -> None:
        if self._terminated:
            return
        self._now = now
        if now >= self._last_activity + self._dead_timeout:
            self._fail(
                RemoteProtocolError(
                    "nothing received from the peer within dead_timeout", GoAwayCode.TIMEOUT
                )
            )
            return
        if self._next_ping is not None and now >= self._next_ping:
            self.ping(now)

    # ------------------------------------------------------------------ helpers

    def _require_handshake(self) -> None:
        if self._terminated:
            raise LocalProtocolError("session is closed")
        if not self._sent_first:
            raise LocalProtocolError("send the handshake message (send_control) first")

    def _known_closed(self, stream_id: int) -> bool:
        """True if ``stream_id`` was opened once (by either side) and is gone now."""
        if stream_id <= 0 or stream_id in self._streams:
            return False
        if (stream_id & 1) == (self._role is Role.AGENT):
            return stream_id < self._next_local_id
        return stream_id <= self._highest_remote_id

    def _get_stream(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None:
            if self._known_closed(stream_id):
                raise StreamClosedError(f"stream {stream_id} is closed")
            raise LocalProtocolError(f"unknown stream {stream_id}")
        return st

    def _maybe_start_keepalive(self) -> None:
        if self._sent_first and self._received_first and self._next_ping is None:
            self._next_ping = self._now + self._heartbeat

    def _transition(self, st: _Stream, event: StreamEvent) -> None:
        """Every state change of a stream goes through the table (protocol/_state.py)."""
        new = TRANSITIONS.get((st.state, event))
        if new is None:  # callers check legality first (send_open/recv_open): this is a bug
            raise LocalProtocolError(f"stream {st.id}: {event.value} in state {st.state.value}")
        st.state = new
        st.send_open = new in CAN_SEND
        st.recv_open = new in CAN_RECEIVE
        if new is StreamState.CLOSED and not st.fin_pending:
            self._remove(st)

    def _remove(self, st: _Stream) -> None:
        st.gone = True
        st.chunks.clear()
        st.queued = 0
        del self._streams[st.id]
        st.recv_unacked = 0
        self._grown -= st.recv_size - INITIAL_STREAM_WINDOW
        self._check_done()

    def _reset(self, st: _Stream, code: ResetCode, *, emit: bool = False) -> None:
        self._ctrl.append(_pack(VERSION, _WINDOW_UPDATE, _RST, st.id, code))
        st.fin_pending = False
        if emit:
            self._events.append(StreamReset(st.id, code, False))
        self._transition(st, StreamEvent.RESET)  # CLOSED, and removed

    def _send_stream_update(self, st: _Stream) -> None:
        delta = st.recv_unreturned
        size = st.recv_size
        limit = self._config.max_stream_window
        if size < limit and not st.recv_unacked and st.recv_used >= size - (size >> 2):
            extra = min(size, limit - size, self._config.stream_growth_budget - self._grown)
            if extra > 0:
                delta += extra
                st.recv_size = size + extra
                self._grown += extra
        st.recv_unreturned = 0
        st.recv_used = 0
        st.recv_avail += delta
        self._ctrl.append(_pack(VERSION, _WINDOW_UPDATE, 0, st.id, delta))

    def _return_session_credit(self, n: int) -> None:
        unreturned = self._recv_unreturned + n
        if unreturned >= self._recv_size >> 1:
            self._recv_avail += unreturned
            self._recv_unreturned = 0
            self._ctrl.append(_pack(VERSION, _WINDOW_UPDATE, 0, 0, unreturned))
        else:
            self._recv_unreturned = unreturned

    def _check_done(self) -> None:
        if self._terminated or self._streams:
            return
        if self._remote_goaway is not None:
            self._terminate(self._remote_goaway, "peer sent GO_AWAY", remote=True)
        elif self._local_goaway is not None:
            self._terminate(self._local_goaway, "closed", remote=False)

    def _terminate(self, code: GoAwayCode, reason: str, *, remote: bool) -> None:
        self._terminated = True
        for st in self._streams.values():
            st.gone = True
            st.chunks.clear()
        self._streams.clear()
        self._active.clear()
        self._next_ping = None
        self._events.append(ConnectionTerminated(code, reason, remote))

    def _fail(self, exc: ProtocolError) -> None:  # callers check that we are not terminated
        self.error = exc
        self._ctrl.append(_pack(VERSION, _GO_AWAY, 0, 0, exc.code))
        self._terminate(exc.code, str(exc), remote=False)

    # ------------------------------------------------------------------ frame handlers

    def _on_first_frame(self, frame: Frame) -> None:
        if frame.type == _GO_AWAY:
            self._on_go_away(frame)
            return
        if frame.type != _CONTROL:
            raise RemoteProtocolError("the first frame must be a CONTROL handshake message")
        msg = self._decode_control(frame)
        if self._role is Role.EDGE:
            if not isinstance(msg, control.Hello):
                raise RemoteProtocolError("the agent's first message must be Hello")
        elif not isinstance(msg, control.Welcome | control.Error):
            raise RemoteProtocolError("the edge's first message must be Welcome or Error")
        self._received_first = True
        self._events.append(ControlReceived(msg))
        self._maybe_start_keepalive()

    def _decode_control(self, frame: Frame) -> control.Message:
        if frame.stream_id:
            raise RemoteProtocolError("CONTROL frame on a non-zero stream")
        try:
            return control.decode_message(frame.payload)
        except control.ControlError as exc:
            raise RemoteProtocolError(f"invalid control message: {exc}") from exc

    def _on_control(self, frame: Frame) -> None:
        msg = self._decode_control(frame)
        if isinstance(msg, control.Hello | control.Welcome):
            raise RemoteProtocolError("handshake message after the handshake")
        self._events.append(ControlReceived(msg))

    def _on_data(self, frame: Frame) -> None:
        flags = frame.flags
        if flags & _SYN:
            self._on_syn(frame)
            return
        stream_id = frame.stream_id
        n = frame.length
        if n:
            if n > self._recv_avail:
                raise RemoteProtocolError("session window exceeded", GoAwayCode.FLOW_CONTROL_ERROR)
            self._recv_avail -= n
        st = self._streams.get(stream_id)
        if st is None:
            if not self._known_closed(stream_id):
                raise RemoteProtocolError("DATA on a stream that was never opened")
            # in flight when we reset it: drop, but give the session credit back
            if n:
                self._return_session_credit(n)
            return
        if not st.recv_open:
            # DATA after the peer's FIN: that stream's fault only
            if n:
                self._return_session_credit(n)
            self._reset(st, ResetCode.STREAM_CLOSED, emit=True)
            return
        if n:
            if n > st.recv_avail:
                raise RemoteProtocolError("stream window exceeded", GoAwayCode.FLOW_CONTROL_ERROR)
            st.recv_avail -= n
            st.recv_unacked += n
            st.recv_used += n
            self._return_session_credit(n)  # delivered: only the stream's credit is held
        fin = flags & _FIN
        if fin:
            self._events.append(DataReceived(stream_id, frame.payload, True))
            self._transition(st, StreamEvent.RECV_FIN)
        elif n:
            self._events.append(DataReceived(stream_id, frame.payload, False))

    def _on_syn(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if not self._sent_first:
            raise RemoteProtocolError("stream opened before the handshake completed")
        if stream_id == 0 or (stream_id & 1) == (self._role is Role.AGENT):
            raise RemoteProtocolError("peer opened a stream with an id of our parity")
        if stream_id <= self._highest_remote_id:
            raise RemoteProtocolError("stream id reused or not increasing")
        if not self._config.accept_remote_streams:
            raise RemoteProtocolError("the peer may not open streams")
        if frame.length > MAX_OPEN_METADATA:
            raise RemoteProtocolError("stream open metadata too large")
        port, via, client, sandbox, epoch = _parse_open_metadata(frame.payload)
        self._highest_remote_id = stream_id
        if (
            self._local_goaway is not None
            or self._remote_goaway is not None
            or len(self._streams) >= self._config.max_streams
        ):
            self._ctrl.append(
                _pack(VERSION, _WINDOW_UPDATE, _RST, stream_id, ResetCode.REFUSED_STREAM)
            )
            return
        st = _Stream(stream_id, local=False)
        self._streams[stream_id] = st
        self._events.append(StreamOpened(stream_id, port, via, client, sandbox, epoch))
        if frame.flags & _FIN:
            self._events.append(DataReceived(stream_id, b"", True))
            self._transition(st, StreamEvent.RECV_FIN)

    def _on_window_update(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        flags = frame.flags
        value = frame.length
        if stream_id == 0:
            if flags:
                raise RemoteProtocolError("ACK/RST on stream 0")
            window = self._send_window + value
            if window > MAX_WINDOW:
                raise RemoteProtocolError("session window overflow", GoAwayCode.FLOW_CONTROL_ERROR)
            self._send_window = window
            return
        st = self._streams.get(stream_id)
        if st is None:
            if not self._known_closed(stream_id):
                raise RemoteProtocolError("WINDOW_UPDATE on a stream that was never opened")
            return
        if flags & _RST:
            try:
                code = ResetCode(value)
            except ValueError:
                code = ResetCode.INTERNAL  # a newer peer's code: still a reset
            st.fin_pending = False
            self._events.append(StreamReset(stream_id, code, True))
            self._transition(st, StreamEvent.RESET)  # CLOSED, and removed
            return
        if flags & _ACK:
            if not st.local:
                raise RemoteProtocolError("ACK for a stream the peer opened itself")
            if not st.accepted:
                st.accepted = True
                self._events.append(StreamAccepted(stream_id))
        if value:
            window = st.send_window + value
            if window > MAX_WINDOW:
                raise RemoteProtocolError("stream window overflow", GoAwayCode.FLOW_CONTROL_ERROR)
            st.send_window = window
            if (st.queued or st.fin_pending) and not st.scheduled:
                st.scheduled = True
                self._active.append(st)

    def _on_ping(self, frame: Frame) -> None:
        if frame.stream_id:
            raise RemoteProtocolError("PING on a non-zero stream")
        value = frame.length
        if frame.flags & _ACK:
            sent = self._pings.pop(value, None)
            if sent is not None:
                self._events.append(PingAcknowledged(self._now - sent))
        else:
            now = self._now
            tokens = min(_PING_BURST, self._ping_tokens + (now - self._ping_at) * _PING_RATE)
            self._ping_at = now
            if tokens < 1.0:
                raise RemoteProtocolError("too many pings", GoAwayCode.TOO_MANY_REQUESTS)
            self._ping_tokens = tokens - 1.0
            if self._sent_first:
                self._ctrl.append(_pack(VERSION, _PING, _ACK, 0, value))
            else:  # a PING right behind the Hello: our Welcome (or Error) goes out first
                self._early_pongs.append(value)

    def _on_go_away(self, frame: Frame) -> None:
        if frame.stream_id:
            raise RemoteProtocolError("GO_AWAY on a non-zero stream")
        if self._remote_goaway is not None:
            return
        try:
            code = GoAwayCode(frame.length)
        except ValueError:
            code = GoAwayCode.INTERNAL_ERROR  # a newer peer's code
        self._remote_goaway = code
        self._events.append(GoAwayReceived(code))
        if code not in _DRAINING_CODES:
            self._terminate(code, "peer sent GO_AWAY", remote=True)
        else:
            self._check_done()
