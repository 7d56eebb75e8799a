"""WebSocket echo origin (and its own direct baseline): ``python -m bench.e2e.wsecho``.

nginx cannot echo WebSocket messages, so the WebSocket scenarios use this server. It is a plain
``asyncio.Protocol`` on uvloop: the opening handshake is parsed once, then frames are unmasked
with one big-int XOR and written back unmasked (RFC 6455 forbids masked server frames), several
frames per ``data_received`` answered with one ``write``. No per-message task, no library
framing layer. Measured directly in every run (the ``direct`` column), so whatever it costs is
part of the baseline, not of the tunnel.

Prints ``{"port": N, "pid": N}`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import sys

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


class Echo(asyncio.Protocol):
    __slots__ = ("buf", "open", "transport")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            key = b""
            for line in bytes(buf[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            del buf[: end + 4]
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + _accept(key) + b"\r\n\r\n"
            )
            self.open = True
        out = []
        pos = 0
        n = len(buf)
        close = False
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            hdr = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hdr = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            masked = b1 & 0x80
            mlen = 4 if masked else 0
            total = hdr + mlen + length
            if n - pos < total:
                break
            payload = bytes(buf[pos + hdr + mlen : pos + total])
            if masked and length:
                mask = bytes(buf[pos + hdr : pos + hdr + 4])
                key = (mask * (length // 4 + 1))[:length]
                payload = (
                    int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
                ).to_bytes(length, "little")
            if length < 126:
                out.append(bytes((b0, length)))
            elif length < 65536:
                out.append(bytes((b0, 126)) + length.to_bytes(2, "big"))
            else:
                out.append(bytes((b0, 127)) + length.to_bytes(8, "big"))
            out.append(payload)
            pos += total
            if b0 & 0x0F == 8:
                close = True
                break
        if pos:
            del buf[:pos]
        if out:
            assert self.transport is not None
            self.transport.write(b"".join(out))
        if close and self.transport is not None:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, backlog=4096)
    sock = server.sockets[0]
    print(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}), flush=True)
    await server.serve_forever()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    raise_nofile()
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
