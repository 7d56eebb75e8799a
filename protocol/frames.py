"""Frame header codec: the preface, the 12-byte header, limits, and an incremental reader.

Everything here is stateless except :class:`FrameReader`, which owns the receive buffer (one
``bytearray`` plus a read offset, compacted once per :meth:`FrameReader.feed`, as wsproto's
``Buffer`` and h11's ``ReceiveBuffer`` do) and yields whole frames however the bytes were split.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple

from protocol.errors import GoAwayCode, RemoteProtocolError

__all__ = [
    "DEAD_TIMEOUT",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_MAX_STREAM_WINDOW",
    "HEADER",
    "HEADER_SIZE",
    "HEARTBEAT_INTERVAL",
    "INITIAL_SESSION_WINDOW",
    "INITIAL_STREAM_WINDOW",
    "MAX_CONTROL_PAYLOAD",
    "MAX_FRAME_PAYLOAD",
    "MAX_OPEN_METADATA",
    "MAX_WINDOW",
    "PREFACE",
    "VERSION",
    "Flag",
    "Frame",
    "FrameReader",
    "FrameType",
    "encode_frame",
    "pack_header",
]

VERSION: Final = 1

# Sent once by the agent before its first frame: magic "TUNL\r\n", the version byte, "\n".
# The CR LF makes an HTTP server or a TLS endpoint that got this by mistake fail fast and loudly.
PREFACE: Final = b"TUNL\r\n\x01\n"
_PREFACE_VERSION_INDEX: Final = 6

#  0       1       2               4                               8                              12
#  +-------+-------+---------------+-------------------------------+-------------------------------+
#  | ver=1 | type  |     flags     |           stream id           |            length             |
#  +-------+-------+---------------+-------------------------------+-------------------------------+
#  big-endian; `length` is the payload size for DATA and CONTROL, and a value for the other types.
HEADER: Final = struct.Struct(">BBHII")
HEADER_SIZE: Final = HEADER.size  # 12


class FrameType(enum.IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3
    CONTROL = 4


class Flag(enum.IntFlag):
    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


# Largest DATA payload. Per-frame cost (a 12-byte header, one parse, one event, one copy call) is
# amortised over 64 KiB to noise (0.02% overhead), while the round-robin scheduler interleaves
# streams at this granularity: an interactive stream waits behind at most one 64 KiB frame of a
# bulk stream per active stream, ~5 ms at 100 Mbit/s. 16 KiB (TLS record, HTTP/2 default) halves
# the latency but quadruples per-frame Python work; 256 KiB would equal a whole initial window.
MAX_FRAME_PAYLOAD: Final = 64 * 1024
# CONTROL payload cap as the frame layer enforces it; equals control.MAX_CONTROL_MESSAGE_SIZE
# (kept separate so this module does not depend on the message layer).
MAX_CONTROL_PAYLOAD: Final = 64 * 1024
# Initial per-stream window, both directions, assumed by both sides without negotiation:
# yamux's and frp's default. Small enough that 10k idle streams commit nothing real.
INITIAL_STREAM_WINDOW: Final = 256 * 1024
# Initial session-level window (stream 0), assumed by both sides. Bounds the bytes in flight over
# the whole connection, i.e. the receiver's worst-case buffering, independently of stream count.
INITIAL_SESSION_WINDOW: Final = 16 * 1024 * 1024
# A busy stream's window grows up to this. yamux's fixed 256 KiB capped frp at ~25 MB/s on a
# 10 ms link (window/RTT); frp raised it to 6 MiB. 4 MiB fills ~400 MB/s at 10 ms RTT.
DEFAULT_MAX_STREAM_WINDOW: Final = 4 * 1024 * 1024
# Streams per session. The bench holds 10k idle WebSockets through one session; 32768 leaves room
# and still bounds the per-stream state (~1 KiB each) a peer can make us allocate.
DEFAULT_MAX_STREAMS: Final = 32768
# Stream open metadata ({"port","via","client"}) is tiny; 4 KiB bounds a hostile SYN.
MAX_OPEN_METADATA: Final = 4096
# No window may exceed this (as in HTTP/2): keeps every credit sum within a signed 32-bit int.
MAX_WINDOW: Final = 2**31 - 1
# Keepalive: ngrok's numbers. PING every 10 s; a peer silent for 15 s is dead.
HEARTBEAT_INTERVAL: Final = 10.0
DEAD_TIMEOUT: Final = 15.0

# Flags each frame type may carry; anything else is a protocol error (leaves room to extend).
_ALLOWED_FLAGS: Final = (  # plain ints: ~ on an IntFlag only inverts within the known bits
    int(Flag.SYN | Flag.FIN),  # DATA
    int(Flag.ACK | Flag.RST),  # WINDOW_UPDATE
    int(Flag.ACK),  # PING
    0,  # GO_AWAY
    0,  # CONTROL
)
_MAX_TYPE: Final = len(_ALLOWED_FLAGS) - 1
_DATA: Final = int(FrameType.DATA)
_CONTROL: Final = int(FrameType.CONTROL)


class Frame(NamedTuple):
    """One parsed frame. ``payload`` is empty for types without one (``length`` is their value)."""

    type: int
    flags: int
    stream_id: int
    length: int
    payload: bytes


# ``Frame(...)`` runs NamedTuple's generated ``__new__``, a Python function called through the
# type slot; ``_new_frame(Frame, fields)`` makes the same Frame in C. One per frame decoded, the
# hot path of every relayed chunk: ~0.8k instructions fewer per small request on 3.11, in the
# edge and in the agent each (``python -m bench.e2e.instr``).
_new_frame: Final = tuple.__new__


def pack_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(VERSION, frame_type, flags, stream_id, length)


def encode_frame(
    frame_type: int, flags: int = 0, stream_id: int = 0, payload: bytes = b"", length: int = -1
) -> bytes:
    """Whole frame as one ``bytes`` (tests and tools; the session writes header and payload
    separately). ``length`` defaults to ``len(payload)``."""
    if length < 0:
        length = len(payload)
    return HEADER.pack(VERSION, frame_type, flags, stream_id, length) + payload


class FrameReader:
    """Incremental frame parser. ``feed()`` bytes in any split, then call ``next_frame()`` until
    it returns None. Invalid input raises :class:`RemoteProtocolError` as soon as the offending
    header (or preface byte) is in the buffer, so a hostile length is refused before buffering."""

    __slots__ = ("_buf", "_need_preface", "_pos", "_view")

    def __init__(self, *, expect_preface: bool = False) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._view: memoryview | None = None
        self._need_preface = expect_preface

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed into a frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._view is not None:
            # a live export would forbid resizing the bytearray
            self._view.release()
            self._view = None
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        if self._need_preface:
            self._check_preface()

    def _check_preface(self) -> None:
        got = bytes(self._buf[: len(PREFACE)])
        if PREFACE.startswith(got):
            if len(got) == len(PREFACE):
                self._pos = len(PREFACE)
                self._need_preface = False
            return
        n = len(got)
        if (
            n > _PREFACE_VERSION_INDEX
            and got[:_PREFACE_VERSION_INDEX] == PREFACE[:_PREFACE_VERSION_INDEX]
            and got[_PREFACE_VERSION_INDEX] != VERSION
        ):
            raise RemoteProtocolError(
                f"unsupported protocol version {got[_PREFACE_VERSION_INDEX]}",
                GoAwayCode.UNSUPPORTED_VERSION,
            )
        raise RemoteProtocolError("bad preface", GoAwayCode.PROTOCOL_ERROR)

    def next_frame(self) -> Frame | None:
        if self._need_preface:
            return None
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            return None
        version, ftype, flags, stream_id, length = HEADER.unpack_from(buf, pos)
        if version != VERSION:
            raise RemoteProtocolError("bad frame version", GoAwayCode.PROTOCOL_ERROR)
        if ftype > _MAX_TYPE:
            raise RemoteProtocolError("unknown frame type", GoAwayCode.PROTOCOL_ERROR)
        if flags & ~_ALLOWED_FLAGS[ftype]:
            raise RemoteProtocolError("flags not allowed on this frame type")
        if ftype in (_DATA, _CONTROL):
            if length > (MAX_FRAME_PAYLOAD if ftype == _DATA else MAX_CONTROL_PAYLOAD):
                raise RemoteProtocolError("frame too large", GoAwayCode.FRAME_TOO_LARGE)
            end = pos + HEADER_SIZE + length
            if avail < HEADER_SIZE + length:
                return None
            if length:
                view = self._view
                if view is None:
                    view = self._view = memoryview(buf)
                payload = bytes(view[pos + HEADER_SIZE : end])
            else:
                payload = b""
        else:
            end = pos + HEADER_SIZE
            payload = b""
        self._pos = end
        return _new_frame(Frame, (ftype, flags, stream_id, length, payload))
