"""The least a landing worker on uvloop does per handed-over connection, for
``python -m bench.e2e.cluster N floor``: what tunneld's landing node is measured against.

``landing OWNER_ADDR PORTS_FILE``: a uvloop server whose protocol does only what any landing
worker must: accept (uvloop makes the transport), read the peer address and count it per IP, arm
and cancel a head timer, take one read, find the Host, pause reading, pass the descriptor and the
bytes over a ``SOCK_SEQPACKET`` Unix socket (``SCM_RIGHTS``), read the answer and close its
descriptor. No routing table, no limits beyond the count, no metrics, no batching.

``owner OWNER_ADDR``: the other end, outside the measurement (plain blocking Python): for each
descriptor it answers, writes a canned 1 KiB response to the client and closes it.
"""

from __future__ import annotations

import array
import asyncio
import collections
import json
import os
import socket
import struct
import sys
from typing import Any

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nConnection: close\r\n\r\n" + b"x" * 1024


def landing(owner_addr: str, ports_file: str) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer.connect(owner_addr)
    peer.setblocking(False)
    pending: collections.deque[Landing] = collections.deque()
    per_ip: dict[str, int] = {}

    class Landing(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.ip = transport.get_extra_info("peername")[0]
            per_ip[self.ip] = per_ip.get(self.ip, 0) + 1
            self.timer = loop.call_later(10, transport.abort)

        def data_received(self, data: bytes) -> None:
            self.timer.cancel()
            start = data.find(b"\r\nHost:") + 7
            if data[start : data.find(b"\r\n", start)].strip():
                self.transport.pause_reading()
                fd = self.transport.get_extra_info("socket").fileno()
                rights = array.array("i", [fd]).tobytes()
                peer.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
                pending.append(self)

        def connection_lost(self, exc: Exception | None) -> None:
            left = per_ip[self.ip] - 1
            if left:
                per_ip[self.ip] = left
            else:
                del per_ip[self.ip]

    def answers() -> None:
        while True:
            try:
                data = peer.recv(4096)
            except BlockingIOError:
                return
            for _ in range(len(data) // 5):
                pending.popleft().transport.abort()

    async def main() -> None:
        loop.add_reader(peer.fileno(), answers)
        server: Any = await loop.create_server(Landing, "127.0.0.1", 0)
        with open(ports_file + ".tmp", "w") as f:
            json.dump({"public": server.sockets[0].getsockname()[1]}, f)
        os.replace(ports_file + ".tmp", ports_file)
        await asyncio.Event().wait()

    loop.run_until_complete(main())


def owner(owner_addr: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(owner_addr)
    listener.listen(1)
    conn, _ = listener.accept()
    while True:
        data, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4))
        if not data:
            return
        (fd,) = array.array("i", ancdata[0][2])
        conn.send(struct.pack("!I?", 1, True))
        os.write(fd, _RESPONSE)
        os.close(fd)


if __name__ == "__main__":
    if sys.argv[1] == "landing":
        landing(sys.argv[2], sys.argv[3])
    else:
        owner(sys.argv[2])
