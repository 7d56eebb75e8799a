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
publishes its name, the host's identity (``/proc/sys/kernel/random/boot_id``) and the message
format's ``VERSION`` in its node record. A landing node hands a connection over only when the
owner's record names the same host, the same version and a hand-over socket
(``public.send_socket``, synchronous: no task per connection); between versions
(workers restarted from upgraded code beside old ones) the node link carries it. The hand-overs
to one owner of one loop iteration leave together at its end, one message: a JSON header (a
list: sandbox, port, epoch, id and prelude length of each), the bytes read from each connection
so far (at most ``MAX_PRELUDE`` in all; a connection that read more goes over the node link) and
the descriptors (``SCM_RIGHTS``, in the header's order); a connection closed before that message
left is dropped from it. The owner reads up to ``_BATCH`` messages at once, adopts each socket
at once (the synchronous part of ``loop.connect_accepted_socket``, which makes the transport;
the rest runs from the waiter's callback, not in a task) and answers them all in one message of
``(id, adopted)`` pairs: under load several hand-overs share each message and each wake-up.

The landing node closes its own descriptor only on ``adopted``, so a refused hand-over loses
nothing: on false (not the owner any more, a stale epoch, a malformed entry, anything
unexpected) or when the message cannot be sent, the landing node still holds the connection and
what it read, and falls back to the node link. With no answer within ``ACK_TIMEOUT`` it cannot
know whether the owner adopted the socket, and two processes must never serve one connection:
it lets go (logged); a socket nobody adopted then ends without a response, which the client
sees as an error. Closing one of two descriptors of a socket sends nothing to the client.

Only a process of the same user may hand over (``SO_PEERCRED`` is checked on every accepted
hand-over connection): abstract sockets have no file permissions. A process of that user is not
trusted to be a node either (a compromised one must not exhaust the node's descriptors or
memory): at most ``MAX_HANDOVER_CONNECTIONS`` hand-over connections are open at once (past it a
new one is closed at once); one that sends no well-formed message within ``IDENTIFY_TIMEOUT`` is
closed (a node connects to hand over, and does at once); one message is read into
``_MAX_MESSAGE`` bytes and room for ``_BATCH`` descriptors, and one that did not fit
(``MSG_TRUNC``, ``MSG_CTRUNC`` with that room full) or lists more than ``_BATCH`` hand-overs ends
the connection. Every descriptor received is adopted or closed, whatever the message; a message
whose descriptors were cut (``MSG_CTRUNC``) never has one adopted.
"""

from __future__ import annotations

import _socket
import array
import asyncio
import contextlib
import functools
import itertools
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Final

import orjson

from relay.budget import RateLimitedLog

if TYPE_CHECKING:
    from .edge import EdgeServer

__all__ = [
    "IDENTIFY_TIMEOUT",
    "MAX_HANDOVER_CONNECTIONS",
    "MAX_PRELUDE",
    "VERSION",
    "HandoverServer",
    "OpenSocket",
    "host_identity",
]

log = logging.getLogger("tunneld.cluster")
# The hand-over socket is abstract (no file permissions) and its name is in Redis and in
# /proc/net/unix: any local user can connect, and each refusal is a warning: a burst, then one a
# second, the rest counted.
_REFUSED_LOG: Final = RateLimitedLog(log, "warnings about hand-over connections from other users")
# What a process of the same user (let in by SO_PEERCRED, not trusted to be a node) can cause once
# per connection or message: connections past the cap or silent too long, malformed messages.
_PEER_LOG: Final = RateLimitedLog(log, "warnings about refused hand-over connections and messages")

# Hand-over connections accepted and open at once, all peers together. Each is another node of
# this host that hands connections to this one, one per node (--workers is at most 1024:
# config.MAX_WORKERS); past it a new one is closed at once, so a local process of the same user
# cannot hold this node's descriptors without end.
MAX_HANDOVER_CONNECTIONS: Final = 1024
# A node connects to hand a connection over and sends it at once (the same loop iteration): a
# hand-over connection with no well-formed message within this is closed.
IDENTIFY_TIMEOUT: Final = 10.0

# Bytes read before the hand-over that travel with the socket (a head is at most 32 KiB; one
# read may carry more behind it). Larger: the connection goes over the node link instead.
MAX_PRELUDE: Final = 128 * 1024
# The hand-over message format (header, preludes, descriptors, answers). A node hands over only
# to a node that publishes the same version: workers of one host can run different code for a
# while (a crashed worker restarted from an upgraded install beside old ones), and a message the
# owner cannot read would cost the connection (no answer: given up after ACK_TIMEOUT). Between
# versions the node link carries the connection instead. Bump it with any change of the format.
VERSION: Final = 1
# Hand-overs per message at most (and messages read at once); the owner reads room for this many
# descriptors and ends a connection whose message lists or carries more: part of the format.
_BATCH: Final = 32
_HEADER: Final = struct.Struct("!H")  # length of the JSON header that starts each message
_MAX_MESSAGE: Final = _HEADER.size + 0xFFFF + MAX_PRELUDE
ACK_TIMEOUT: Final = 2.0  # the owner answers within this (else the landing node lets go)
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid
_ANSWER: Final = struct.Struct("!I?")  # the owner's answer: request id, adopted (one or more)
_FD: Final = struct.Struct("i")
# recvmsg's flags are a plain int: tested against the enum members of socket, each test would
# make enum objects (several thousand instructions per hand-over message)
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_FD_SPACE: Final = socket.CMSG_SPACE(_FD.size * _BATCH)


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
    its own over to them (``send``)."""

    def __init__(self, server: EdgeServer, node_id: str) -> None:
        self.server = server
        self.loop = server.loop
        self.address = f"\0tunneld-handover-{node_id}-{secrets.token_hex(4)}"
        self._listener: socket.socket | None = None
        # accepted hand-over connections -> the timer that closes it while it has sent no
        # well-formed message (IDENTIFY_TIMEOUT), None once it has
        self._accepted: dict[socket.socket, asyncio.TimerHandle | None] = {}
        self._peers: dict[str, socket.socket] = {}  # address -> our connection to that node
        # request id -> (what to call with the answer, when to stop waiting for it); insertion
        # order is deadline order (one ACK_TIMEOUT for all), so one timer watches them all
        self._waiting: dict[int, tuple[Callable[[bool | None], object], float, str]] = {}
        self._timer: asyncio.TimerHandle | None = None
        # address -> hand-overs of this loop iteration: (header, socket, prelude)
        self._outgoing: dict[str, list[tuple[dict[str, Any], Any, bytes]]] = {}
        self._flush_soon = False
        self._ids = itertools.count(1)
        from .public import PublicConnection  # (public.py imports this module)

        self._connection = PublicConnection
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
        for timer in self._accepted.values():
            if timer is not None:
                timer.cancel()
        self._listener = None
        self._accepted.clear()
        self._peers.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Hand-overs not sent yet are still only ours (False: the caller keeps them); the others
        # may have been adopted (None: let go, as on a timeout)
        unsent = {entry["id"] for batch in self._outgoing.values() for entry, _, _ in batch}
        self._outgoing.clear()
        waiting, self._waiting = self._waiting, {}
        for request_id, (on_answer, _deadline, _address) in waiting.items():
            on_answer(False if request_id in unsent else None)

    def info(self) -> dict[str, Any]:
        """What goes in this node's record for the others."""
        return {
            "host": host_identity(),
            "handover": self.address.replace("\0", "@", 1),
            "handover_version": VERSION,
        }

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
            _REFUSED_LOG.log(
                self.loop.time(), "hand-over socket: refused a connection from uid %d", uid
            )
            conn.close()
            return
        if len(self._accepted) >= MAX_HANDOVER_CONNECTIONS:
            _PEER_LOG.log(
                self.loop.time(),
                "hand-over socket: refused a connection: %d already open "
                "(MAX_HANDOVER_CONNECTIONS)",
                len(self._accepted),
            )
            conn.close()
            return
        conn.setblocking(False)
        self._accepted[conn] = self.loop.call_later(IDENTIFY_TIMEOUT, self._unidentified, conn)
        self.loop.add_reader(conn.fileno(), self._on_message, conn)

    def _unidentified(self, conn: socket.socket) -> None:
        if conn in self._accepted:
            self._accepted[conn] = None  # this timer has run
            _PEER_LOG.log(
                self.loop.time(),
                "hand-over socket: closed a connection that sent no hand-over within %.0fs",
                IDENTIFY_TIMEOUT,
            )
            self._disconnected(conn)

    def _on_message(self, conn: socket.socket) -> None:
        """Messages on a hand-over connection: hand-overs on one a node opened to this one,
        answers on one this node opened. Up to ``_BATCH`` at a time, and the answers to them in
        one message: under load the queue holds several, and each message is a wake-up."""
        accepted = conn in self._accepted
        answers: list[bytes] = []
        end = False
        for _ in range(_BATCH if accepted else 1):  # answers come batched already
            try:
                data, ancdata, flags, _addr = conn.recvmsg(_MAX_MESSAGE, _FD_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data, ancdata, flags = b"", [], 0
            fds = _descriptors(ancdata)
            if not data:  # the other node closed its end (or died)
                _close_all(fds)
                self._disconnected(conn)
                return
            if not accepted:
                self._answer(data, fds)
            elif end := self._receive(conn, data, fds, flags, answers):
                break
        if answers:
            try:
                conn.send(b"".join(answers))
            except OSError:
                pass  # the other node is gone: it learns nothing more from us
        if end:
            self._disconnected(conn)

    def _disconnected(self, conn: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(conn.fileno())
        if conn in self._accepted:
            timer = self._accepted.pop(conn)
            if timer is not None:
                timer.cancel()
            conn.close()
        else:
            for address, peer in list(self._peers.items()):
                if peer is conn:
                    self._drop_peer(address)

    def _receive(
        self, conn: socket.socket, data: bytes, fds: list[int], flags: int, answers: list[bytes]
    ) -> bool:
        """Adopt the sockets of one message, its answers (packed) appended to ``answers``; True
        when the connection must end (a message over the format's bounds: not from a node).
        Synchronous: each socket is in a transport of this process when this returns, so the
        answers can go at once. Every descriptor in ``fds`` is adopted or closed here, whatever
        the message (``_read`` marks those it passed on with -1)."""
        try:
            return self._read(conn, data, fds, flags, answers)
        finally:
            _close_all(fd for fd in fds if fd >= 0)

    def _read(
        self, conn: socket.socket, data: bytes, fds: list[int], flags: int, answers: list[bytes]
    ) -> bool:
        now = self.loop.time()
        ids: list[int] = []
        try:
            (size,) = _HEADER.unpack_from(data)
            entries = orjson.loads(data[_HEADER.size : _HEADER.size + size])
            if type(entries) is not list or not entries:
                raise ValueError("not a list of hand-overs")
            ids = [int(entry["id"]) for entry in entries]
            if not all(0 < i < 1 << 32 for i in ids):
                raise ValueError("a request id out of range")
        except (ValueError, LookupError, TypeError, struct.error) as exc:
            entries, ids = None, []
            error = str(exc)
        # Over what a node ever sends: the connection ends (the descriptors are closed by
        # _receive; the ids are refused, for a node with a bug, when there are not too many)
        if flags & _MSG_TRUNC:
            over = f"a message over {_MAX_MESSAGE} bytes"
        elif flags & _MSG_CTRUNC and len(fds) >= _BATCH:
            over = f"more than {_BATCH} descriptors in one message"
        elif len(ids) > _BATCH:
            over = f"{len(ids)} hand-overs in one message (at most {_BATCH})"
        else:
            over = ""
        if over:
            _PEER_LOG.log(now, "hand-over socket: %s; connection closed", over)
            if len(ids) > _BATCH:
                answers.append(_ANSWER.pack(0, False))
            else:
                answers.extend(_ANSWER.pack(request_id, False) for request_id in ids)
            return True
        if entries is None:
            _PEER_LOG.log(now, "hand-over: refused a malformed hand-over: %s", error)
            answers.append(_ANSWER.pack(0, False))
            return False
        timer = self._accepted.get(conn)
        if timer is not None:  # a well-formed message: the peer is a node (the deadline is off)
            timer.cancel()
            self._accepted[conn] = None
        if len(fds) != len(ids) or flags & _MSG_CTRUNC:
            # Descriptors missing: the kernel drops those this process has no room for
            # (RLIMIT_NOFILE; MSG_CTRUNC). Which connection each belonged to is unknown, so
            # none is adopted, and each is refused by its id: the landing node still holds
            # them all and forwards them over the node link (which needs no new descriptor
            # here), instead of waiting ACK_TIMEOUT and letting them go unserved.
            _PEER_LOG.log(
                now,
                "hand-over: %d descriptor(s) for %d connection(s) (out of file descriptors?); "
                "refused them, the landing node forwards them",
                len(fds),
                len(ids),
            )
            answers.extend(_ANSWER.pack(request_id, False) for request_id in ids)
            return False
        # Every entry read before any socket is adopted: a message is taken whole or refused
        items: list[tuple[str, int | None, bytes]] = []
        offset = _HEADER.size + size
        try:
            for entry in entries:
                end = offset + int(entry["n"])
                sandbox, epoch = entry["sandbox"], entry["epoch"]
                if type(sandbox) is not str:
                    raise TypeError("a sandbox id that is not a string")
                if not offset <= end <= len(data):
                    raise ValueError("bytes missing")
                items.append((sandbox, epoch if type(epoch) is int else None, data[offset:end]))
                offset = end
            if offset != len(data):
                raise ValueError(f"{len(data) - offset} bytes more than announced")
        except (ValueError, LookupError, TypeError) as exc:
            _PEER_LOG.log(now, "hand-over: refused a malformed hand-over: %s", exc)
            answers.extend(_ANSWER.pack(request_id, False) for request_id in ids)
            return False
        adopted = 0
        for i, (request_id, (sandbox, epoch, prelude)) in enumerate(zip(ids, items, strict=True)):
            fd, fds[i] = fds[i], -1
            ok = self._adopt(fd, sandbox, epoch, prelude)  # it closes fd if not ok
            answers.append(_ANSWER.pack(request_id, ok))
            adopted += ok
        if adopted:  # the metrics once per message
            self.received += adopted
            metrics = self.server.metrics
            metrics.public_connections.inc(adopted)
            metrics.adopted.inc(adopted)
        return False

    def _adopt(self, fd: int, sandbox: str, epoch: int | None, prelude: bytes) -> bool:
        """Serve the connection behind ``fd`` (ours to close, whatever happens)."""
        server = self.server
        cluster = server.cluster
        if cluster is None or not cluster.serves(sandbox, epoch):
            os.close(fd)
            return False  # not the owner (any more): the landing node keeps it
        try:  # the kernel says the family and type (protocol 0: one syscall less)
            sock = _AdoptedSocket(-1, -1, 0, fd)
        except OSError:  # not a socket at all
            os.close(fd)
            return False
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_INET,
            socket.AF_INET6,
        ):
            sock.close()
            return False
        # Non-blocking already: O_NONBLOCK belongs to the open file, which the landing node's
        # event loop set (and the loop sets it again when it opens the socket).
        conn = self._connection(server, server.parser)
        conn.adopt(prelude)  # replayed in connection_made, before the first read
        # connect_accepted_socket is a coroutine, but all it does before its only await (for
        # connection_made, scheduled with call_soon) is to make the transport: step it once
        # here, and let the waiter's callback finish it, rather than a task per connection.
        coro = self.loop.connect_accepted_socket(lambda: conn, sock)
        try:
            waiter = coro.send(None)
        except StopIteration:
            pass
        except (OSError, ValueError) as exc:
            _PEER_LOG.log(self.loop.time(), "hand-over: could not adopt a connection: %s", exc)
            sock.close()
            return False
        else:
            waiter.add_done_callback(functools.partial(_finish_adoption, coro))
        return True

    # -- sending (landing node) ------------------------------------------------------------------
    def send(
        self,
        address: str,
        sock: Any,
        header: dict[str, Any],
        prelude: bytes,
        on_answer: Callable[[bool | None], object],
    ) -> bool:
        """Give the socket ``sock`` (and ``prelude``, what was read from it) to the node
        listening on ``address``. False: not possible, the socket is still only ours. True:
        ``on_answer`` is called later with True (the owner adopted it: close ours), False (it
        refused, or the message never left: keep serving it) or None (no answer within
        ``ACK_TIMEOUT``: it may have adopted it, so let go of it too).

        The hand-overs of one loop iteration leave together, one message (``_flush``); the
        socket's descriptor is read then, and one closed meanwhile is not sent (False)."""
        if len(prelude) > MAX_PRELUDE or self._connect(address) is None:
            return False
        batch = self._outgoing.get(address)
        if batch is not None and (
            len(batch) >= _BATCH or sum(len(item[2]) for item in batch) + len(prelude) > MAX_PRELUDE
        ):
            self._send_batch(address)
            batch = None
        if batch is None:
            batch = self._outgoing[address] = []
        request_id = next(self._ids) % 0xFFFFFFFF + 1  # fits the answer's 32 bits, never 0
        batch.append(({**header, "id": request_id, "n": len(prelude)}, sock, prelude))
        self._waiting[request_id] = (on_answer, self.loop.time() + ACK_TIMEOUT, address)
        if not self._flush_soon:
            self._flush_soon = True
            self.loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = self.loop.call_later(ACK_TIMEOUT, self._expire)
        return True

    def _connect(self, address: str) -> socket.socket | None:
        peer = self._peers.get(address)
        if peer is None:
            try:
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
                self._peers[address] = peer  # closed by _drop_peer if anything below fails
                peer.connect(address.replace("@", "\0", 1))
                self.loop.add_reader(peer.fileno(), self._on_message, peer)
            except OSError as exc:  # the owner is gone
                log.debug("hand-over to %s failed: %s", address, exc)
                self._drop_peer(address)
                return None
        return peer

    def _flush(self) -> None:
        self._flush_soon = False
        for address in list(self._outgoing):
            self._send_batch(address)

    def _send_batch(self, address: str) -> None:
        batch = self._outgoing.pop(address, [])
        entries, fds, preludes = [], [], []
        for entry, sock, prelude in batch:
            fd = sock.fileno()
            if fd < 0:  # the connection was closed meanwhile: nothing to hand over
                self._settle(entry["id"], False)
                continue
            entries.append(entry)
            fds.append(fd)
            preludes.append(prelude)
        if not entries:
            return
        head = orjson.dumps(entries)
        peer = self._peers.get(address)
        try:
            if peer is None or len(head) > 0xFFFF:
                raise OSError("no connection to it")
            peer.sendmsg(
                [_HEADER.pack(len(head)), head, *preludes],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
            )
        except OSError as exc:  # the owner is gone, or its queue is full
            log.debug("hand-over to %s failed: %s", address, exc)
            for entry in entries:  # not sent: still only ours
                self._settle(entry["id"], False)
            self._drop_peer(address)

    def _settle(self, request_id: int, answer: bool | None) -> bool:
        """Give ``answer`` to whoever waits for ``request_id``; True: it was adopted."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is None:
            return False
        waiting[0](answer)
        return answer is True

    def _answer(self, data: bytes, fds: list[int]) -> None:
        _close_all(fds)
        if len(data) % _ANSWER.size:
            return
        sent = 0
        for request_id, ok in _ANSWER.iter_unpack(data):
            sent += self._settle(request_id, ok is True)
        if sent:
            self.sent += sent
            self.server.metrics.handed_over.inc(sent)

    def _expire(self) -> None:
        """No answer within ACK_TIMEOUT: the owner may still adopt the socket, so serving it
        here too could put two readers on one connection. The landing node lets go of it; if
        the owner never adopts it, the client sees the connection end without a response (an
        error, not a wrong answer)."""
        self._timer = None
        now = self.loop.time()
        waiting = self._waiting
        while waiting:
            request_id = next(iter(waiting))
            on_answer, deadline, address = waiting[request_id]
            if deadline > now:
                self._timer = self.loop.call_later(deadline - now, self._expire)
                return
            del waiting[request_id]
            log.warning(
                "hand-over to %s: no answer within %.1fs; connection given up", address, ACK_TIMEOUT
            )
            on_answer(None)

    def _drop_peer(self, address: str) -> None:
        """Close our connection to ``address``; hand-overs sent on it and not answered get no
        answer now: the owner may have adopted them (None, as on a timeout, without waiting)."""
        peer = self._peers.pop(address, None)
        if peer is not None:
            if peer.fileno() >= 0:
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(peer.fileno())
            peer.close()
        if address in self._outgoing:
            for entry, _sock, _prelude in self._outgoing.pop(address):
                self._settle(entry["id"], False)  # never sent
        lost = [i for i, (_cb, _deadline, to) in self._waiting.items() if to == address]
        if lost:
            log.warning(
                "hand-over to %s: the connection to it ended; %d unanswered connection(s) given up",
                address,
                len(lost),
            )
            for request_id in lost:
                self._settle(request_id, None)


class OpenSocket:
    """The socket of ``transport`` for ``HandoverServer.send``: its descriptor while the
    transport is open, -1 once it is closing (then it is not sent: the caller hears False).
    uvloop's transport socket reports its descriptor until libuv closes it, later in the loop
    iteration, so a connection closed (a timeout, a stop) after ``send`` and before the batch
    left would still reach the owner, which would serve what this node had given up."""

    __slots__ = ("_sock", "_transport")

    def __init__(self, transport: asyncio.BaseTransport, sock: Any) -> None:
        self._transport = transport
        self._sock = sock

    def fileno(self) -> int:
        return -1 if self._transport.is_closing() else int(self._sock.fileno())


class _AdoptedSocket(socket.socket):
    """A socket object whose ``family`` and ``type`` are the plain ints of ``_socket``: the
    event loop reads them (``connect_accepted_socket``) and socket.socket's properties make an
    enum member on every read."""

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


def _descriptors(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % _FD.size]))
    return fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def _finish_adoption(coro: Coroutine[Any, Any, Any], waiter: asyncio.Future[Any]) -> None:
    """The rest of ``connect_accepted_socket`` once connection_made ran (see ``_adopt``)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    except (Exception, asyncio.CancelledError) as exc:  # it closed the transport itself
        log.warning("hand-over: an adopted connection failed to start: %r", exc)
        return
    coro.close()  # it awaited something else: not the coroutine this was written for
