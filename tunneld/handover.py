"""Hand-over of a public connection between nodes of one host: the socket itself, not its bytes.

Theory of operation
-------------------
Workers of one host (``tunneld serve --workers N``) share the public port with SO_REUSEPORT, so
the kernel picks the worker that accepts a connection; the sandbox's agent is connected to one
of them, its owner. Between hosts the landing node relays the connection over a node link
(:mod:`tunneld.cluster`); between processes of one kernel it can do better: pass the socket to
the owner (``SCM_RIGHTS``) with the bytes it already read, and step out of the data path. The
owner adopts the socket (``loop.connect_accepted_socket``), feeds it those bytes as if it had
read them, and serves it like any connection it accepted.

Each node listens on an abstract-namespace ``SOCK_SEQPACKET`` Unix socket
(``\\0tunneld-handover-{node id}-{random}``: no file to clean up, gone with the process) and
publishes its name and the host's identity (``/proc/sys/kernel/random/boot_id``) in its node
record. A landing node hands a connection over only when the owner's record names the same
host and a hand-over socket; one message per connection carries a JSON header (sandbox, port,
epoch, id), the bytes read so far (at most ``MAX_PRELUDE``) and the descriptor. The owner
answers ``{"id": .., "ok": true}`` once it adopted the socket, and only then does the landing
node close its own descriptor, so a refused hand-over loses nothing: on ``false`` (not the
owner any more, a stale epoch, anything unexpected) or when the message cannot be sent, the
landing node still holds the connection and falls back to the node link. With no answer within
``ACK_TIMEOUT`` it cannot know whether the owner adopted the socket, and two processes must
never serve one connection: it lets go (logged); a socket nobody adopted then ends without a
response, which the client sees as an error. Closing one of two descriptors of a socket sends
nothing to the client.

Only a process of the same user may hand over (``SO_PEERCRED`` is checked on every accepted
hand-over connection): abstract sockets have no file permissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import secrets
import socket
import struct
from typing import TYPE_CHECKING, Any, Final

import orjson

if TYPE_CHECKING:
    from .edge import EdgeServer

__all__ = ["MAX_PRELUDE", "HandoverServer", "host_identity"]

log = logging.getLogger("tunneld.cluster")

# Bytes read before the hand-over that travel with the socket (a head is at most 32 KiB; one
# read may carry more behind it). Larger: the connection goes over the node link instead.
MAX_PRELUDE: Final = 128 * 1024
_MAX_MESSAGE: Final = MAX_PRELUDE + 4096
ACK_TIMEOUT: Final = 2.0  # the owner answers within this (else the landing node lets go)
_HEADER: Final = struct.Struct("!H")  # length of the JSON header that starts each message
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid


@functools.cache
def host_identity() -> str:
    """The same string for every process of this kernel, another on any other host (read once:
    it is compared for every connection that lands on a non-owner)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return f"{socket.gethostname()}-unknown-boot"


class HandoverServer:
    """One node's hand-over socket: receives connections from other nodes of the host, and hands
    its own over to them (``hand_over``)."""

    def __init__(self, server: EdgeServer, node_id: str) -> None:
        self.server = server
        self.loop = server.loop
        self.address = f"\0tunneld-handover-{node_id}-{secrets.token_hex(4)}"
        self._listener: socket.socket | None = None
        self._accepted: set[socket.socket] = set()
        self._peers: dict[str, socket.socket] = {}  # address -> our connection to that node
        self._waiting: dict[int, asyncio.Future[bool | None]] = {}
        self._ids = itertools.count(1)
        self.received = 0  # connections adopted (tests, metrics)
        self.sent = 0  # connections handed over

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
        sock.bind(self.address)
        sock.listen(64)
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        for sock in (self._listener, *self._accepted, *self._peers.values()):
            if sock is not None and sock.fileno() >= 0:
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(sock.fileno())
                sock.close()
        self._listener = None
        self._accepted.clear()
        self._peers.clear()
        for future in self._waiting.values():
            if not future.done():
                future.set_result(False)
        self._waiting.clear()

    def info(self) -> dict[str, Any]:
        """What goes in this node's record for the others."""
        return {"host": host_identity(), "handover": self.address.replace("\0", "@", 1)}

    # -- receiving (owner) -----------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("hand-over socket: accept failed: %s", exc)
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        _pid, uid, _gid = _UCRED.unpack(creds)
        if uid != os.getuid():
            log.warning("hand-over socket: refused a connection from uid %d", uid)
            conn.close()
            return
        conn.setblocking(False)
        self._accepted.add(conn)
        self.loop.add_reader(conn.fileno(), self._on_message, conn)

    def _on_message(self, conn: socket.socket) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, _MAX_MESSAGE, 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data:  # the other node closed its end (or died)
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(conn.fileno())
            if conn in self._accepted:
                self._accepted.discard(conn)
                conn.close()
            else:
                for address, peer in list(self._peers.items()):
                    if peer is conn:
                        self._drop_peer(address)
            return
        if conn in self._accepted:
            task = self.loop.create_task(self._receive(conn, data, fds))
            self.server.background.add(task)
            task.add_done_callback(self.server.background.discard)
        else:  # an answer on a connection we opened
            self._answer(data, fds)

    async def _receive(self, conn: socket.socket, data: bytes, fds: list[int]) -> None:
        """Adopt a handed-over socket, then answer: the landing node lets go only after."""
        request_id = 0
        ok = False
        try:
            (size,) = _HEADER.unpack_from(data)
            header = orjson.loads(data[_HEADER.size : _HEADER.size + size])
            request_id = int(header["id"])
            prelude = data[_HEADER.size + size :]
            if len(fds) != 1:
                raise ValueError("no descriptor")
            ok = await self._adopt(fds[0], header, prelude)
        except (ValueError, KeyError, TypeError, OSError, struct.error) as exc:
            log.warning("hand-over: refused a malformed hand-over: %s", exc)
        finally:
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(OSError):
            conn.send(orjson.dumps({"id": request_id, "ok": ok}))

    async def _adopt(self, fd: int, header: dict[str, Any], prelude: bytes) -> bool:
        from .public import PublicConnection

        server = self.server
        cluster = server.cluster
        epoch = header.get("epoch")
        if cluster is None or not cluster.serves(
            str(header["sandbox"]), epoch if type(epoch) is int else None
        ):
            return False  # not the owner (any more): the landing node keeps it
        sock = socket.socket(fileno=os.dup(fd))  # ours; the caller closes the received fd
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_INET,
            socket.AF_INET6,
        ):
            sock.close()
            return False
        sock.setblocking(False)
        server.metrics.public_connections.inc()
        conn = PublicConnection(server, server.parser)
        conn.adopt(prelude)  # replayed in connection_made, before the first read
        try:
            await self.loop.connect_accepted_socket(lambda: conn, sock)
        except OSError as exc:
            log.warning("hand-over: could not adopt a connection: %s", exc)
            sock.close()
            return False
        self.received += 1
        server.metrics.adopted.inc()
        return True

    # -- sending (landing node) ------------------------------------------------------------------
    async def hand_over(
        self, address: str, sock: socket.socket, header: dict[str, Any], prelude: bytes
    ) -> bool:
        """Give ``sock`` (and ``prelude``) to the node listening on ``address``. True: it is the
        owner's now (it adopted it, or did not answer in time and may have: close ours either
        way); False: it refused, or the message never left (keep serving it)."""
        if len(prelude) > MAX_PRELUDE:
            return False
        peer = self._peers.get(address)
        try:
            if peer is None:
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
                self._peers[address] = peer  # closed by _drop_peer if anything below fails
                peer.connect(address.replace("@", "\0", 1))
                self.loop.add_reader(peer.fileno(), self._on_message, peer)
            request_id = next(self._ids)
            head = orjson.dumps({**header, "id": request_id})
            future: asyncio.Future[bool | None] = self.loop.create_future()
            self._waiting[request_id] = future
            socket.send_fds(peer, [_HEADER.pack(len(head)) + head + prelude], [sock.fileno()])
        except OSError as exc:  # the owner is gone, or its queue is full
            log.debug("hand-over to %s failed: %s", address, exc)
            self._drop_peer(address)
            return False
        # A timer on the future rather than asyncio.wait_for: one per connection on the churn
        # path, and wait_for wraps the future in a task of its own.
        timer = self.loop.call_later(ACK_TIMEOUT, _settle, future, None)
        try:
            answer = await future
        finally:
            timer.cancel()
            self._waiting.pop(request_id, None)
        if answer is None:
            # No answer: the owner may still adopt the socket, so serving it here too could
            # put two readers on one connection. Let go of it; if the owner never adopts it,
            # the client sees the connection end without a response (an error, not a wrong
            # answer).
            log.warning(
                "hand-over to %s: no answer within %.0fs; connection given up", address, ACK_TIMEOUT
            )
            return True
        if answer:
            self.sent += 1
            self.server.metrics.handed_over.inc()
        return answer

    def _answer(self, data: bytes, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        try:
            reply = orjson.loads(data)
            future = self._waiting.get(int(reply["id"]))
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            return
        if future is not None and not future.done():
            future.set_result(reply.get("ok") is True)

    def _drop_peer(self, address: str) -> None:
        peer = self._peers.pop(address, None)
        if peer is not None:
            if peer.fileno() >= 0:
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(peer.fileno())
            peer.close()


def _settle(future: asyncio.Future[bool | None], value: bool | None) -> None:
    if not future.done():
        future.set_result(value)
