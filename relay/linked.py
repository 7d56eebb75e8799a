"""A transport over one stream of a session: a protocol served at the far end of a link.

Theory of operation
-------------------
A node of a cluster that receives a preview request for a sandbox whose agent is connected to
another node hands the client's bytes on over a node-to-node link (tunneld/nodelink.py): one
stream per client connection. At the owner node, the stream must be served exactly like a
client socket, by the same ``PublicConnection`` (parsing, routing, limits, error pages). This
module makes that possible without a socket: :class:`LinkedTransport` is at once

- the **stream endpoint** registered in the link's ``MuxProtocol.streams`` (it receives
  ``receive_from_peer`` / ``peer_ended`` / ``peer_writable`` / ``peer_reset``), and
- the **transport** given to the served protocol (``write``, ``close``, ``abort``,
  ``pause_reading``, ``get_extra_info("peername")``, write buffer limits...).

Bytes from the link are copied into the shared read buffer and delivered with the
``BufferedProtocol`` calls, exactly as a socket read would be. Flow control maps one to one:
the served protocol's ``pause_reading`` holds back the stream's credit (the link then stops the
sender), ``write`` returns credit to nobody but reports ``pause_writing`` to the protocol while
the stream is above its send high-water mark and ``resume_writing`` on ``StreamWritable``. An
abnormal end stays abnormal: ``abort()`` resets the stream (the far node then aborts its client
with RST), and a reset from the far side is ``connection_lost(ConnectionResetError)`` here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from protocol.errors import ResetCode

from .buffers import SHARED
from .mux import MuxProtocol

__all__ = ["LinkedTransport"]


class LinkedTransport:
    """Stream ``stream_id`` of ``mux``, seen by ``protocol`` as its transport (see above)."""

    def __init__(
        self,
        mux: MuxProtocol,
        stream_id: int,
        protocol: asyncio.BufferedProtocol,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.mux = mux
        self.stream_id = stream_id
        self.protocol = protocol
        self._extra = extra or {}
        self._closing = False
        self._lost = False
        self._reading = True
        self._held = 0  # credit not returned while reading is paused
        self._pending: deque[bytes] = deque()  # received while paused
        self._eof_pending = False
        self._write_paused = False
        self._eof_written = False

    # -- made / lost -----------------------------------------------------------------------------
    def start(self) -> None:
        """Register with the link and tell the protocol it is connected."""
        self.mux.add_stream(self)  # type: ignore[arg-type]
        self.protocol.connection_made(self)  # type: ignore[arg-type]

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.mux.streams.pop(self.stream_id, None)
        self.protocol.connection_lost(exc)

    # -- the link's side (StreamEndpoint callbacks) ----------------------------------------------
    def receive_from_peer(self, data: bytes) -> None:
        if self._lost:
            return
        if not self._reading or self._pending:
            # Paused: kept (bounded by the stream's window: its credit is not returned) and
            # delivered on resume_reading, as a socket leaves unread bytes in the kernel.
            self._pending.append(data)
            self._held += len(data)
            return
        self._deliver(data)
        if self._reading:
            self.mux.session.acknowledge(self.stream_id, len(data))
            self.mux.schedule_flush()
        else:
            self._held += len(data)

    def _deliver(self, data: bytes | memoryview) -> None:
        size = len(SHARED.view)
        for start in range(0, len(data), size):
            piece = data[start : start + size]
            n = len(piece)
            memoryview(self.protocol.get_buffer(n))[:n] = piece
            self.protocol.buffer_updated(n)
            if self._lost:
                return

    def peer_ended(self) -> None:
        if self._lost:
            return
        if not self._reading or self._pending:
            self._eof_pending = True
            return
        if not self.protocol.eof_received():
            self.close()

    def peer_writable(self) -> None:
        if self._write_paused and not self._lost:
            self._write_paused = False
            self.protocol.resume_writing()

    def peer_reset(self, code: ResetCode) -> None:
        self._lose(ConnectionResetError(f"stream reset by the far node ({code.name})"))

    # -- the protocol's side (asyncio.Transport) -------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self.mux.session.closed:
            return
        if self.mux.session.send_data(self.stream_id, bytes(data)) and not self._write_paused:
            self._write_paused = True
            self.protocol.pause_writing()
        self.mux.schedule_flush()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_written or self._closing or self.mux.session.closed:
            return
        self._eof_written = True
        self.mux.session.end_stream(self.stream_id)
        self.mux.schedule_flush()

    def close(self) -> None:
        """FIN after what was written, then gone (the far node closes its client normally)."""
        if self._closing:
            return
        self._closing = True
        if not self.mux.session.closed:
            if not self._eof_written:
                self._eof_written = True
                self.mux.session.end_stream(self.stream_id)
            self.mux.schedule_flush()
        # Nothing more is read either: a socket's close() drops unread input the same way.
        self.mux.loop.call_soon(self._lose, None)

    def abort(self) -> None:
        """Reset the stream: the far node cuts its client with RST (an abnormal end)."""
        if self._lost:
            return
        if not self.mux.session.closed and self.stream_id in self.mux.streams:
            self.mux.session.reset_stream(self.stream_id, ResetCode.CANCEL)
            self.mux.flush()
        self._lose(None)

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading or self._lost:
            return
        self._reading = True
        while self._pending and self._reading and not self._lost:
            self._deliver(self._pending.popleft())
        if self._lost:
            return
        if self._reading and self._held:
            held, self._held = self._held, 0
            self.mux.session.acknowledge(self.stream_id, held)
            self.mux.schedule_flush()
        if self._reading and self._eof_pending:
            self._eof_pending = False
            self.peer_ended()

    def is_reading(self) -> bool:
        return self._reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The stream's own send high/low-water marks apply (protocol.session)."""

    def get_write_buffer_size(self) -> int:
        return 0
