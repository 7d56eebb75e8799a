"""asyncio shell around one ``protocol.Session``: the tunnel connection and its streams.

Theory of operation
-------------------
``MuxProtocol`` owns the tunnel transport (agent <-> edge). Bytes read from it go into
``session.receive_data``; the session's events are dispatched to the stream endpoints; whatever the
session wants to send goes out with ``transport.writelines`` in ``flush()``. The session decides
everything about the protocol; this file only moves bytes and re-arms the session's timer.

A ``StreamEndpoint`` is the other end of one stream: a local socket (the user's service on the
agent, the browser's connection on the edge). It is itself a ``BufferedProtocol``:

* local bytes in  -> ``session.send_data(sid, view)`` -> ``flush()``. If the session says the stream
  has queued enough (no credit), the local socket stops being read until ``StreamWritable``.
* peer bytes in   -> ``transport.write(data)``; credit goes back with ``session.acknowledge`` only
  while the local transport is below its high-water mark. A paused local transport holds its
  credit until ``resume_writing``, so a slow reader stalls only its own stream.
* the tunnel transport above its high-water mark makes ``flush()`` send control frames only; data
  waits in the session (bounded by the windows) until ``resume_writing``.

Memory is therefore bounded by the flow-control windows, never by how fast anyone reads.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import select
import socket
import struct
import termios
from collections.abc import Callable
from typing import Any, Final, cast

from protocol import control
from protocol import events as ev
from protocol.errors import GoAwayCode, ResetCode
from protocol.frames import MAX_FRAME_PAYLOAD
from protocol.session import Session

from .budget import RateLimitedLog
from .buffers import SHARED
from .requests import OnOk, PendingRequests
from .wslink import LinkClosed, WebSocketLink

log = logging.getLogger("tunnel.mux")

# "agent link closed" (a bad WebSocket upgrade or frame): anyone who reaches the edge's agent
# port can cause one per connection, so it is rate-limited; the edge gives each of its servers a
# RateLimitedLog of its own (``MuxProtocol.link_log``), this one serves the others.
_LINK_CLOSED: Final = "'agent link closed' lines"
_LINK_LOG: Final = RateLimitedLog(log, _LINK_CLOSED, level=logging.INFO)
# Peers that stopped reading before their session's last bytes went out (see _drain_stalled)
_DRAIN_LOG: Final = RateLimitedLog(log, "warnings about peers reset after their session ended")


def link_closed_log(now: float) -> RateLimitedLog:
    """A fresh limiter for "agent link closed" lines (one per listening server)."""
    return RateLimitedLog(log, _LINK_CLOSED, now, level=logging.INFO)


# The tunnel transport queues at most this much before the session stops emitting DATA frames.
# Small enough that a 100-byte write on an interactive stream never waits behind megabytes of a
# bulk stream inside the kernel-side queue, large enough to keep the socket busy between callbacks.
TUNNEL_HIGH_WATER: Final = 256 * 1024
TUNNEL_LOW_WATER: Final = 64 * 1024

# Reads up to this size are copied and their flush deferred to the end of the loop iteration, so
# many small messages (WebSocket frames, small requests) read in one iteration share one tunnel
# write. Larger reads are sent zero-copy and flushed at once (their buffer is reused next read).
COALESCE_MAX: Final = 16 * 1024

# Replies the peer provoked (PING ACKs, RSTs for refused streams, control replies, WebSocket pongs)
# are written even while DATA waits, so a peer that sends without ever reading would make the
# tunnel transport's buffer grow without bound. Past this much unsent output the tunnel socket
# stops being read: the peer's own sends then block in its kernel, and the dead-peer timer ends a
# session that stays that way. An honest peer never gets near it: DATA stops at TUNNEL_HIGH_WATER
# plus one frame, and control frames are tiny.
TUNNEL_OUTPUT_CAP: Final = 4 * TUNNEL_HIGH_WATER

# A local socket may buffer this much written-but-unsent data before credit stops going back.
LOCAL_HIGH_WATER: Final = 256 * 1024
LOCAL_LOW_WATER: Final = 64 * 1024


# TCP_NOTSENT_LOWAT on the tunnel socket: the kernel takes new data only while less than this is
# still unsent, so the queue in front of an interactive stream's frame stays short while data in
# flight (the bandwidth-delay product) is not limited at all. What the kernel refuses stays in
# the transport, then in the session, where streams take turns.
TUNNEL_NOTSENT_LOWAT: Final = 128 * 1024


def peer_hung_up(transport: asyncio.BaseTransport) -> bool:
    """The peer of ``transport``'s socket sent its FIN (or the connection failed), as the kernel
    says it (``POLLRDHUP``), whatever the event loop told the protocol: uvloop's TLS layer ends
    a connection on a FIN without a word to it (no ``eof_received``, ``is_closing()`` false)."""
    sock = transport.get_extra_info("socket")
    try:
        fd = sock.fileno() if sock is not None else -1
    except (OSError, ValueError):  # closed under us
        return False
    if fd < 0:
        return False
    gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    poller = select.poll()
    poller.register(fd, gone)
    return any(events & gone for _, events in poller.poll(0))


def abort_with_reset(transport: asyncio.Transport | None) -> None:
    """Close ``transport`` so that the peer sees a reset (RST), never a clean end of stream.

    ``transport.abort()`` alone sends FIN when nothing is left unread, which a client reading a
    response without a length takes for a complete body: an abnormal end must look abnormal.
    ``SO_LINGER`` with a zero timeout makes the kernel answer the close with RST instead.
    A transport already closing gracefully is reset too while its peer still lacks bytes:
    ``abort()`` drops what the transport holds, so the peer would not get everything. A plain
    one that handed everything to the kernel keeps its clean end (the kernel sends the rest).
    A TLS one is reset while anything is unsent, the kernel's queue included (``unsent_bytes``):
    its own buffer does not show what the TLS layer's TCP transport holds (``abort()`` drops
    that too), and that transport holds bytes only while the kernel's queue is full.
    """
    if transport is None:
        return
    if not transport.is_closing():
        reset = True
    else:
        try:
            tls = transport.get_extra_info("ssl_object") is not None
            reset = bool(unsent_bytes(transport) if tls else transport.get_write_buffer_size())
        except AttributeError:  # asyncio's TLS transport closed twice: it let its connection go
            reset = False
    if reset:
        _set_linger(transport, _LINGER_RESET)
    transport.abort()


# The kernel's send queue of a TCP socket: bytes written and not yet acknowledged by the peer
# (Linux's SIOCOUTQ, the same number as TIOCOUTQ).
_SIOCOUTQ: Final = getattr(termios, "TIOCOUTQ", None)
_INT: Final = struct.Struct("i")


def unsent_bytes(transport: asyncio.Transport | None) -> int:
    """Bytes written to ``transport`` that its peer has not taken yet: the transport's own
    buffer and the kernel's send queue. It shrinks while the peer reads, however slowly, so an
    idle sweep can tell a slow reader from a stalled one. A sweep's cost (an ioctl), not a
    per-chunk one."""
    if transport is None:
        return 0
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and _SIOCOUTQ is not None:
        try:
            unsent += _INT.unpack(fcntl.ioctl(sock.fileno(), _SIOCOUTQ, bytes(4)))[0]
        except (OSError, ValueError):  # closed under us, or not a socket the ioctl knows
            pass
    return unsent


def set_reset_on_close(transport: asyncio.Transport, on: bool) -> None:
    """Arm (or disarm) ``SO_LINGER`` 0: while armed, *any* close of the socket is an RST, the
    kernel's own close of a process that died (kill -9) included. A graceful close must disarm
    it first, or the RST would discard data still in flight. A closing transport is left as it
    is (an abort may have armed it; only ``abort_with_reset`` arms one that is closing)."""
    if transport.is_closing():
        return
    _set_linger(transport, _LINGER_RESET if on else _LINGER_OFF)


def _set_linger(transport: asyncio.Transport, value: bytes) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)
        except (OSError, ValueError):  # closed under us (uvloop: ValueError, fd -1)
            pass


_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_LINGER_OFF: Final = struct.pack("ii", 0, 0)


# Linux's struct tcp_info: tcpi_bytes_acked (u64) at this offset (since 4.1).
_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
_TCP_INFO_LEN: Final = 128
_BYTES_ACKED: Final = struct.Struct("=Q")
_BYTES_ACKED_AT: Final = 120


def bytes_taken(transport: asyncio.BaseTransport | None) -> int | None:
    """How many bytes of ``transport``'s connection its peer has acknowledged so far (Linux's
    ``tcpi_bytes_acked``), None where the kernel does not say. It only grows, and it grows
    exactly when the peer takes bytes, whatever was written meanwhile and whichever buffer the
    rest waits in: the transport's, a TLS layer's (whose own transport's buffer no API
    shows), the kernel's."""
    if transport is None or _TCP_INFO is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError):  # closed under us, not TCP
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    return cast(int, _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0])


def taken_mark(transport: asyncio.BaseTransport | None) -> int:
    """A number that grows when ``transport``'s peer takes bytes, and only then (as long as
    nothing more is written): ``bytes_taken``, else the bytes still unsent, negated."""
    taken = bytes_taken(transport)
    if taken is not None:
        return taken
    return -unsent_bytes(cast("asyncio.Transport | None", transport))


class StalledCloseWatch:
    """A connection we are closing cleanly whose peer takes none of the bytes still owed to it
    for a whole ``period`` is reset (RST), not kept for ever.

    A clean close waits for the peer to take the rest; one that reads nothing would keep the
    close, its socket and buffers, and whatever table holds it, for ever (the kernel probes a
    zero window without end). So every ``period`` the watch looks at what the peer took
    (``taken_mark``): anything taken since the previous look (a slow reader, however slow)
    keeps the connection for one more period; nothing taken while bytes are still owed
    (``unsent_bytes``) resets it, so the peer, which did not get everything, sees a reset and
    never a clean end. ``on_reset(unsent, stalled)`` is called just before, for the caller's
    log line (``stalled``: the seconds the peer took nothing, None at the deadline).

    ``settle`` is for a TLS close, whose end is the TLS layer's: it sends the rest, then
    ``close_notify``, and waits for the peer's, until its own shutdown timeout
    (``ssl_shutdown_timeout``, counted from ``close()``: a slow reader's progress does not
    extend it) drops what is left and ends with a FIN without ``close_notify``, after which a
    client may take a cut-short response for a complete one. With ``settle`` that timeout is
    only a far backstop and the watch decides: as above while bytes are owed, and once the
    peer has taken everything (``close_notify`` included), ``settle`` more seconds for its
    answer; a close still not over then ends with ``abort()`` (a FIN: the peer lacks nothing).
    The looks then come every ``min(period, settle)`` seconds; a reset still takes a whole
    ``period`` (rounded up to a look) without a byte taken.

    ``deadline`` (seconds from now): the longest the close may take, whatever the progress.
    A connection still owing bytes then is reset; one that owes nothing is closed (``abort``).
    Give it below the TLS layer's shutdown timeout, so that the layer never acts first.

    Nothing is watched when there is nothing to watch: a transport without a socket of its own
    (an HTTP/2 stream: its connection's close decides), or a plain one that holds no byte (it
    closes its socket at once and the kernel sends the rest by itself). Without ``settle``, a
    closing transport whose peer has taken everything stops the watch too. The owner calls
    ``cancel`` from ``connection_lost``.
    """

    __slots__ = (
        "_at_deadline",
        "_deadline",
        "_drained",
        "_loop",
        "_mark",
        "_on_reset",
        "_settle",
        "_settle_looks",
        "_stall_looks",
        "_step",
        "_still",
        "_timer",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        period: float,
        loop: asyncio.AbstractEventLoop,
        on_reset: Callable[[int, float | None], None],
        deadline: float | None = None,
        settle: float | None = None,
    ) -> None:
        self.transport = transport
        self._loop = loop
        self._on_reset = on_reset
        self._settle = settle
        self._step = step = period if settle is None else min(period, settle)
        # looks in a row that must find nothing taken (a period), or nothing owed (settle)
        self._stall_looks = max(1, math.ceil(period / step - 1e-9))
        self._settle_looks = 1 if settle is None else max(1, math.ceil(settle / step - 1e-9))
        self._still = 0  # looks in a row that found bytes owed and none taken
        self._drained = 0  # looks in a row that found nothing owed
        now = loop.time()
        self._deadline = None if deadline is None else now + deadline
        self._mark = taken_mark(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._at_deadline = False
        self._arm(now)

    @classmethod
    def start(
        cls,
        transport: asyncio.Transport | None,
        period: float,
        loop: asyncio.AbstractEventLoop,
        on_reset: Callable[[int, float | None], None],
        deadline: float | None = None,
        settle: float | None = None,
    ) -> StalledCloseWatch | None:
        """A watch of ``transport``, or None when there is nothing to watch (see above)."""
        if transport is None or transport.get_extra_info("socket") is None:
            return None
        if transport.get_extra_info("ssl_object") is None:
            if not transport.get_write_buffer_size():
                return None
        elif settle is None and not unsent_bytes(transport):
            return None
        return cls(transport, period, loop, on_reset, deadline, settle)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def allow_clean_end(self) -> None:
        """The owner vouches that what the transport still holds is the whole rest of what the
        peer is owed: the socket's "reset on close" (``set_reset_on_close``) is disarmed, so
        that the close that ends it by itself (the TLS layer's, once the peer answered
        ``close_notify``) sends the rest and a FIN instead of an RST that drops what the kernel
        still holds. The watch goes on as before: a peer that stops taking the rest is still
        reset. Nothing once the watch has reset or ended the connection (an abort under way
        must stay a reset)."""
        if self._timer is not None:
            _set_linger(self.transport, _LINGER_OFF)

    def _arm(self, now: float) -> None:
        at = now + self._step
        self._at_deadline = self._deadline is not None and self._deadline <= at
        if self._deadline is not None and self._at_deadline:
            at = self._deadline
        self._timer = self._loop.call_at(at, self._check)

    def _check(self) -> None:
        self._timer = None
        transport = self.transport
        unsent = unsent_bytes(transport)
        if self._at_deadline:
            if unsent:
                self._reset(unsent, None)
            else:
                self._end()
            return
        mark = taken_mark(transport)
        if not unsent:
            if self._settle is None:
                if transport.is_closing():
                    return  # all taken: the close completes by itself
            else:
                self._drained += 1
                if self._drained > self._settle_looks:
                    self._end()
                    return
            self._still = 0
        else:
            self._drained = 0
            if mark > self._mark:  # bytes taken since the last look
                self._still = 0
            else:
                self._still += 1
                if self._still >= self._stall_looks:
                    self._reset(unsent, self._still * self._step)
                    return
        self._mark = mark
        self._arm(self._loop.time())

    def _reset(self, unsent: int, stalled: float | None) -> None:
        self._on_reset(unsent, stalled)
        # Not abort_with_reset: a closing plain transport may have handed all it holds to a
        # kernel that cannot send it; the peer lacks it all the same.
        _set_linger(self.transport, _LINGER_RESET)
        self.transport.abort()

    def _end(self) -> None:
        """The peer has taken everything; the close is not over (a TLS peer that does not answer
        ``close_notify``): end it with a FIN."""
        log.debug("a closed connection whose peer took everything did not end; closing it")
        self.transport.abort()


def _pause_if_full(transport: asyncio.Transport) -> None:
    """Have ``transport`` call ``pause_writing`` if ``writelines`` took it past its high-water mark.

    CPython 3.12's selector transport got its own ``writelines`` (``sendmsg``, no copy) that never
    checks the mark (gh-127655, fixed in later 3.12 and 3.13 releases): ``pause_writing`` then
    never comes, ``flush`` keeps granting one more frame per loop until the windows run out (the
    tunnel queue grew past 800 KiB for a 256 KiB mark), and no ``resume_writing`` comes to flush
    what waits in the session. The transport's own check pauses exactly as ``write`` would, so
    ``resume_writing`` follows when it drains; where it is already paused this is a no-op. Only
    for that class: uvloop's transports and asyncio's TLS transport check the mark themselves
    (the TLS one has the method, from ``_FlowControlMixin``, without the mark it reads)."""
    if _SELECTOR_SOCKET is not None and isinstance(transport, _SELECTOR_SOCKET):
        cast(Any, transport)._maybe_pause_protocol()


_SELECTOR_SOCKET: Final[type | None] = getattr(
    asyncio.selector_events, "_SelectorSocketTransport", None
)


def _limit_unsent(transport: asyncio.BaseTransport) -> None:
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    sock = transport.get_extra_info("socket")
    if option is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, TUNNEL_NOTSENT_LOWAT)
    except OSError:  # pragma: no cover - not supported by this kernel
        pass


def write_eof_or_abort(transport: asyncio.WriteTransport) -> bool:
    """``transport.write_eof()``; False, with the transport aborted, when its socket is gone:
    asyncio's ``write_eof`` is a ``shutdown(SHUT_WR)`` at once, which raises ENOTCONN for a socket
    its peer reset before the transport noticed: on the edge a client's RST racing the service's
    FIN, in the agent the service's RST racing the client's. Raised from a stream's end inside the
    tunnel's event dispatch, it ended the whole session, every stream of the sandbox; it ends this
    one connection, abnormally (its ``connection_lost`` resets the stream), and nothing else
    (tests/faults/test_write_eof_reset.py)."""
    try:
        transport.write_eof()
    except OSError:
        transport.abort()
        return False
    return True


class StreamEndpoint(asyncio.BufferedProtocol):
    """One stream of the session, bound to a local socket."""

    __slots__ = (
        "_closed",
        "_held_credit",
        "_local_eof",
        "_peer_eof",
        "_read_paused",
        "_write_paused",
        "mux",
        "stream_id",
        "transport",
    )

    def __init__(self, mux: MuxProtocol, stream_id: int) -> None:
        self.mux = mux
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None
        self._write_paused = False
        self._read_paused = False
        self._held_credit = 0
        self._local_eof = False
        self._peer_eof = False
        self._closed = False

    # -- local socket -> session -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=LOCAL_HIGH_WATER, low=LOCAL_LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return SHARED.view

    def buffer_updated(self, nbytes: int) -> None:
        self.forward(SHARED.view[:nbytes])

    def forward(self, data: memoryview | bytes) -> None:
        """Send local bytes to the peer (``data`` may be a view of the shared read buffer)."""
        mux = self.mux
        if mux.session.closed or self._closed:
            return
        small = len(data) <= COALESCE_MAX
        if small and isinstance(data, memoryview):
            data = data.tobytes()  # a few bytes: copying frees the shared buffer at once
        if mux.session.send_data(self.stream_id, data) and not self._read_paused:
            # Pause before flushing: the flush may already report the stream writable again.
            self._read_paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        if small:
            mux.schedule_flush()
        else:
            mux.flush()
            if isinstance(data, memoryview):
                mux.release_shared(self.stream_id)

    def eof_received(self) -> bool:
        self._local_eof = True
        mux = self.mux
        if not mux.session.closed and not self._closed:
            mux.session.end_stream(self.stream_id)
            mux.schedule_flush()  # with whatever else this loop iteration sends
        self._maybe_finish()
        # Keep the write side open: TCP half-close maps to FIN. TLS has no half-close: asyncio
        # closes its transport after the peer's EOF whatever this returns, and logs a warning
        # for each True, so a TLS connection answers False (the FIN above is all there is).
        transport = self.transport
        try:
            return transport is None or transport.get_extra_info("sslcontext") is None
        except AttributeError:  # asyncio's SSL transport, already closed: TLS all the same
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            mux = self.mux
            if mux.streams.pop(self.stream_id, None) is not None and not mux.session.closed:
                if not (self._local_eof and self._peer_eof):
                    mux.session.reset_stream(self.stream_id, ResetCode.CANCEL)
                mux.schedule_flush()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._held_credit and not self._closed:
            n, self._held_credit = self._held_credit, 0
            self.mux.session.acknowledge(self.stream_id, n)
            self.mux.flush()

    # -- session -> local socket -----------------------------------------------------------------
    def receive_from_peer(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        transport.write(data)
        if self._write_paused:
            self._held_credit += len(data)
        else:
            self.mux.session.acknowledge(self.stream_id, len(data))

    def peer_ended(self) -> None:
        self._peer_eof = True
        transport = self.transport
        if (
            transport is not None
            and not transport.is_closing()
            and transport.can_write_eof()
            and not write_eof_or_abort(transport)
        ):
            return  # the local socket was reset: connection_lost resets the stream
        self._maybe_finish()

    def peer_accepted(self) -> None:
        """The peer accepted a stream we opened (its WINDOW_UPDATE|ACK: the agent connected to
        the port). Bytes flow before it; only a caller that must know waits for it."""

    def peer_writable(self) -> None:
        if self._read_paused and self.transport is not None and not self._closed:
            self._read_paused = False
            self.transport.resume_reading()

    def peer_reset(self, code: ResetCode) -> None:
        """The peer (or the session, on teardown) reset this stream: drop the local connection."""
        self._closed = True
        abort_with_reset(self.transport)

    # -- helpers ---------------------------------------------------------------------------------
    def _maybe_finish(self) -> None:
        if self._local_eof and self._peer_eof and self.transport is not None:
            self.close_gracefully()

    def close_gracefully(self) -> None:
        """Close the local connection normally (FIN after everything written)."""
        if self.transport is not None:
            self.transport.close()


class DeferredFlush:
    """``schedule_flush``: flush once at the end of this loop iteration, so that what many
    callbacks of one iteration send leaves in one write (one syscall), not one each. For a
    protocol with ``loop``, ``flush()`` and ``_flush_scheduled`` (False to start)."""

    loop: asyncio.AbstractEventLoop
    _flush_scheduled: bool

    def flush(self) -> None:
        raise NotImplementedError

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()


class MuxProtocol(DeferredFlush, asyncio.BufferedProtocol):
    """Drives one ``Session`` over the tunnel connection. Subclassed by the edge and the agent."""

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamEndpoint] = {}
        self.closed: asyncio.Future[None] = loop.create_future()
        self.rtt: float | None = None
        self.pending = PendingRequests(loop)  # control requests we sent, waiting for a reply
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._read_paused = False  # the tunnel socket, past TUNNEL_OUTPUT_CAP
        # After the session ended: its last bytes going out to a peer that may not read them
        self._drain_watch: StalledCloseWatch | None = None
        self._draining = False
        # WebSocket carriage of the session (relay/wslink.py): set by the agent before connecting,
        # or by the edge once the first bytes (``_sniff``) turn out to be an HTTP upgrade.
        self.link: WebSocketLink | None = None
        self._sniff: bytearray | None = None
        self.link_log = _LINK_LOG  # "agent link closed" lines, rate-limited
        self._dispatch: dict[type, Callable[[Any], None]] = {
            ev.DataReceived: self._on_data,
            ev.StreamWritable: self._on_writable,
            ev.StreamReset: self._on_reset,
            ev.StreamAccepted: self._on_accepted,
            ev.StreamOpened: self.on_stream_opened,
            ev.ControlReceived: self._on_control,
            ev.PingAcknowledged: self._on_ping,
            ev.GoAwayReceived: self._on_go_away,
            ev.ConnectionTerminated: self._on_terminated,
        }

    # -- tunnel transport ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=TUNNEL_HIGH_WATER, low=TUNNEL_LOW_WATER)
        _limit_unsent(t)
        self.on_connected()
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return SHARED.view

    def buffer_updated(self, nbytes: int) -> None:
        self.receive(SHARED.view[:nbytes])

    def receive(self, data: bytes | memoryview) -> None:
        """Feed tunnel bytes (the session copies them into its own buffer)."""
        if self.link is not None or self._sniff is not None:
            data = self._unwrap(data)
            if not data:
                return
        try:
            self.session.receive_data(data, self.loop.time())
            self.process_events()
        except Exception:
            self._internal_error()
            return
        # Now, not at the end of the iteration: with one request in flight a deferred flush
        # costs a loop iteration more per request (+4 % instructions, bench.e2e.instr).
        self.flush()

    def _internal_error(self) -> None:
        """An exception escaped the session or an event handler: a bug here, not the peer's
        doing. The peer gets GO_AWAY(INTERNAL_ERROR) (docs/protocol.md) and the connection ends,
        its streams reset (connection_lost), with the traceback in the log; left to the event
        loop, its "Fatal error" would drop the connection without a word to the peer."""
        log.exception("%s: internal error; closing the session", self.describe())
        if not self.session.closed:
            self.session.close(GoAwayCode.INTERNAL_ERROR)
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _unwrap(self, data: bytes | memoryview) -> bytes | memoryview:
        """Edge: tell a raw link from a WebSocket one; both: strip the WebSocket framing."""
        if self._sniff is not None:
            self._sniff += data
            if len(self._sniff) < 4:
                return b""
            data, self._sniff = bytes(self._sniff), None
            if not data.startswith(b"GET "):
                return data  # the raw link: preface and frames from the first byte
            self.link = WebSocketLink(client=False)
        link = self.link
        assert link is not None
        was_open = link.open
        try:
            payload, reply = link.receive(data)
        except LinkClosed as exc:
            self.link_log.log(self.loop.time(), "agent link closed: %s", exc)
            if self.transport is not None:
                if exc.reply:
                    self.transport.write(exc.reply)
                self.transport.close()
            return exc.session  # what came before the end still reaches the session
        if reply and self.transport is not None:
            self.transport.write(reply)  # a pong or a close reply: capped like any other output
            self._cap_output(self.transport)
        if link.open and not was_open:
            self.on_link_open()
        return payload

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain_watch is not None:
            self._drain_watch.cancel()
            self._drain_watch = None
        if not self.session.closed:
            # The peer vanished without GO_AWAY: treat as a dead link.
            self.session.close(GoAwayCode.INTERNAL_ERROR)
            self.session.data_to_send()
        for endpoint in list(self.streams.values()):
            endpoint.peer_reset(ResetCode.CANCEL)
        self.streams.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_disconnected(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()
        self.flush()

    def _cap_output(self, transport: asyncio.Transport) -> None:
        """Stop reading a peer that lets our output pile up (see TUNNEL_OUTPUT_CAP)."""
        if not self._read_paused and transport.get_write_buffer_size() > TUNNEL_OUTPUT_CAP:
            self._read_paused = True
            transport.pause_reading()
            log.warning(
                "%s: the peer does not read what it asks for (%d bytes unsent); "
                "reading from it is paused",
                self.describe(),
                transport.get_write_buffer_size(),
            )

    @property
    def output_backlog(self) -> int:
        """Bytes written to the tunnel transport and not yet taken by the kernel."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def describe(self) -> str:
        """How log lines name this connection (the edge adds the sandbox and the peer)."""
        return "tunnel"

    async def request(
        self, message_factory: Callable[[int], Any], timeout: float, on_ok: OnOk | None = None
    ) -> control.Ok:
        """Send the control request ``message_factory(id)`` and wait for its ``Ok``.

        ``Error`` replies raise ``ControlRequestError``, as does the session going away first
        (the subclass calls ``pending.fail_all``); no reply within ``timeout`` is TimeoutError.
        ``on_ok(reply)`` runs as the reply is read (see ``PendingRequests``)."""
        request_id, future = self.pending.new(on_ok)
        self.session.send_control(message_factory(request_id))
        self.flush()
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.pending.forget(request_id)

    # -- session plumbing ------------------------------------------------------------------------
    def flush(self) -> None:
        transport = self.transport
        if transport is None or (self.link is not None and not self.link.open):
            return  # nothing goes out before the transport (and a WebSocket upgrade) is up
        session = self.session
        # Once the transport's close began (the session's own end, the edge's stop), frames
        # queued since (a stream's reset, a PING) cannot go out: taken and dropped, not written
        # (asyncio's writelines() after close() raises TypeError on Python 3.12 and 3.13.0).
        closing = transport.is_closing()
        while True:
            # DATA only up to just past the high-water mark: the rest waits in the session, where
            # it is scheduled fairly across streams, instead of queueing in front of everything
            # in the transport (a 4 MiB window burst ahead of a 100-byte response).
            if self._write_paused:
                budget = 0
            else:
                budget = TUNNEL_HIGH_WATER - transport.get_write_buffer_size()
                budget = (budget if budget > 0 else 0) + MAX_FRAME_PAYLOAD
            data = session.data_to_send(budget)
            if data and not closing:
                if self.link is None:
                    transport.writelines(data)
                    if not self._write_paused:
                        _pause_if_full(transport)
                else:
                    transport.write(self.link.wrap(data))
                if self._write_paused:
                    self._cap_output(transport)
            # Sending can make streams writable again (StreamWritable): act on it now, not at
            # the next read or timer, or a paused source would stall until then.
            events = session.events_received()
            if events:
                self._dispatch_events(events)
                if self.transport is None:
                    return
            elif not data or self._write_paused or not session.has_data_to_send():
                break
        if self.session.closed:
            if not self._draining:
                # Its last bytes (GO_AWAY, the streams' last frames) are still going out. A peer
                # that reads nothing would keep this connection, its buffers and its place in the
                # edge's tables for ever, so a dead_timeout without it taking a byte resets it.
                self._draining = True
                self._drain_watch = StalledCloseWatch.start(
                    transport, self.session.dead_timeout, self.loop, self._drain_stalled
                )
            if not self.session.has_data_to_send():
                transport.close()
                return
        at = self.session.get_timer()
        if at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = None if at is None else self.loop.call_at(at, self._on_timer)

    def _drain_stalled(self, unsent: int, stalled: float | None) -> None:
        """The ``StalledCloseWatch`` resets the connection: say why."""
        _DRAIN_LOG.log(
            self.loop.time(),
            "%s: the peer read nothing for %gs after the session ended (%d bytes unsent); "
            "connection reset",
            self.describe(),
            self.session.dead_timeout,
            unsent,
        )

    def release_shared(self, stream_id: int) -> None:
        """After ``send_data`` with a view of the shared buffer: retire it if still referenced."""
        transport = self.transport
        if self.session.stream_send_buffered(stream_id) or (
            transport is not None and transport.get_write_buffer_size()
        ):
            SHARED.swap()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.session.handle_timer(self.loop.time())
            self.process_events()
        except Exception:
            self._internal_error()
            return
        self.flush()

    def process_events(self) -> None:
        self._dispatch_events(self.session.events_received())

    def _dispatch_events(self, events: list[Any]) -> None:
        dispatch = self._dispatch
        for event in events:
            dispatch[type(event)](event)

    def add_stream(self, endpoint: StreamEndpoint) -> None:
        self.streams[endpoint.stream_id] = endpoint

    def _on_data(self, event: ev.DataReceived) -> None:
        endpoint = self.streams.get(event.stream_id)
        if endpoint is None:
            return
        if event.data:
            endpoint.receive_from_peer(event.data)
        if event.end_stream:
            endpoint.peer_ended()

    def _on_writable(self, event: ev.StreamWritable) -> None:
        endpoint = self.streams.get(event.stream_id)
        if endpoint is not None:
            endpoint.peer_writable()

    def _on_reset(self, event: ev.StreamReset) -> None:
        endpoint = self.streams.pop(event.stream_id, None)
        if endpoint is not None:
            endpoint.peer_reset(event.code)

    def _on_accepted(self, event: ev.StreamAccepted) -> None:
        """The agent dialled the port (bytes already flow behind the SYN)."""
        endpoint = self.streams.get(event.stream_id)
        if endpoint is not None:
            endpoint.peer_accepted()

    def _on_ping(self, event: ev.PingAcknowledged) -> None:
        self.rtt = event.rtt

    def _on_go_away(self, event: ev.GoAwayReceived) -> None:
        self.on_go_away(event.code)

    def _on_terminated(self, event: ev.ConnectionTerminated) -> None:
        for endpoint in list(self.streams.values()):
            endpoint.peer_reset(ResetCode.CANCEL)
        self.streams.clear()
        self.on_terminated(event)

    def _on_control(self, event: ev.ControlReceived) -> None:
        self.on_control(event.message)

    # -- hooks for the edge and the agent --------------------------------------------------------
    def on_connected(self) -> None:
        """The tunnel transport is up (the agent sends its hello here)."""

    def on_link_open(self) -> None:
        """The WebSocket upgrade completed (WebSocket links only)."""

    def on_stream_opened(self, event: ev.StreamOpened) -> None:
        """The peer opened a stream (agent side). Default: refuse it."""
        self.session.reset_stream(event.stream_id, ResetCode.REFUSED_STREAM)

    def on_control(self, message: Any) -> None:
        """A control message arrived."""

    def on_go_away(self, code: GoAwayCode) -> None:
        """The peer is going away; existing streams may finish."""

    def on_terminated(self, event: ev.ConnectionTerminated) -> None:
        """The session is over (it will be closed after its last frames are flushed)."""

    def on_disconnected(self, exc: Exception | None) -> None:
        """The tunnel transport is gone."""
