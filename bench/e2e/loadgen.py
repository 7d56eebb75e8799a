"""Load generators the bench runs as subprocesses (``python -m bench.e2e.loadgen MODE ...``).

wrk drives the HTTP scenarios; these cover what wrk cannot:

``ws``        N WebSocket connections, each a closed loop: send one 64-byte masked message,
              wait for its echo, record the round trip, send the next. One precomputed masked
              frame is written every time (no per-message masking, no framing library); the echo
              is counted by bytes (66 per message), so the client's per-message work is one
              ``write`` plus a counter. Raw ``asyncio.Protocol`` on uvloop.
``ws-idle``   open N WebSocket connections, print ``ready``, then hold them until stdin closes.
``download``  one GET of a multi-GB file on one connection, read with ``recv_into`` into a
              reused 1 MiB buffer for a fixed time: single-stream MiB/s.
``upload``    one POST with a multi-GB Content-Length, written from a reused 1 MiB buffer for a
              fixed time: single-stream MiB/s (socket buffers in flight bias it by < 1 %).
``probe``     small GETs at a fixed low rate on a few keep-alive connections: latency while
              something else loads the tunnel (head-of-line scenario). Fixed rate, not closed
              loop, so the probe measures queueing behind other traffic, not its own throughput.

Every mode prints one JSON object on stdout. Latency samples are in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import sys
import time
from array import array

WS_PAYLOAD = 64
_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
_MASK = b"\x37\xfa\x21\x3d"
_PAYLOAD = bytes(range(WS_PAYLOAD))
_MASKED = bytes(b ^ _MASK[i % 4] for i, b in enumerate(_PAYLOAD))
WS_FRAME = bytes((0x82, 0x80 | WS_PAYLOAD)) + _MASK + _MASKED
WS_ECHO_SIZE = 2 + WS_PAYLOAD


def ws_handshake(host_header: str) -> bytes:
    return (
        (
            f"GET / HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        ).encode()
        + _KEY
        + b"\r\n\r\n"
    )


def percentiles(samples: array | list[float], ps: tuple[float, ...] = (50, 99)) -> dict[str, float]:
    if not samples:
        return {f"p{p:g}": float("nan") for p in ps}
    s = sorted(samples)
    return {f"p{p:g}": s[min(len(s) - 1, int(len(s) * p / 100))] for p in ps}


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run(coro):  # type: ignore[no-untyped-def]
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


# -- WebSocket echo load ---------------------------------------------------------------------------
class WsClient(asyncio.Protocol):
    def __init__(self, state: dict, handshake: bytes, ready: asyncio.Future) -> None:
        self.state = state
        self.handshake = handshake
        self.ready = ready
        self.open = False
        self.pending = 0
        self.head = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        transport.write(self.handshake)

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(RuntimeError(self.head[:200].decode("latin-1")))
                return
            data = self.head[end + 4 :]
            self.open = True
            if not self.ready.done():
                self.ready.set_result(None)
            if not data:
                return
        self.pending += len(data)
        st = self.state
        while self.pending >= WS_ECHO_SIZE:
            self.pending -= WS_ECHO_SIZE
            now = time.perf_counter()
            if st["measuring"]:
                st["lat"].append((now - self.sent_at) * 1000.0)
            if st["running"]:
                self.sent_at = now
                self.transport.write(WS_FRAME)  # type: ignore[union-attr]

    def start(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.write(WS_FRAME)  # type: ignore[union-attr]


async def _open_ws(
    host: str, port: int, handshake: bytes, n: int, state: dict, batch: int = 200
) -> list[WsClient]:
    loop = asyncio.get_running_loop()
    clients: list[WsClient] = []
    for i in range(0, n, batch):
        futs = []
        for _ in range(min(batch, n - i)):
            ready = loop.create_future()
            _, proto = await loop.create_connection(
                lambda ready=ready: WsClient(state, handshake, ready), host, port
            )
            clients.append(proto)
            futs.append(ready)
        await asyncio.wait_for(asyncio.gather(*futs), 60)
    return clients


async def ws_load(args: argparse.Namespace) -> dict:
    state: dict = {"measuring": False, "running": True, "lat": array("d")}
    clients = await _open_ws(
        args.host, args.port, ws_handshake(args.host_header), args.conns, state
    )
    cpu0 = time.process_time()
    for c in clients:
        c.start()
    await asyncio.sleep(args.warmup)
    state["measuring"] = True
    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.sleep(args.duration)
    state["measuring"] = False
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    state["running"] = False
    await asyncio.sleep(0.2)
    lat = state["lat"]
    for c in clients:
        c.transport.abort()  # type: ignore[union-attr]
    del cpu0
    return {
        "msgs": len(lat),
        "elapsed": elapsed,
        "msgs_per_s": len(lat) / elapsed,
        **percentiles(lat),
        "client_cpu_share": cpu / elapsed,
    }


async def ws_idle(args: argparse.Namespace) -> dict:
    state: dict = {"measuring": False, "running": False, "lat": array("d")}
    t0 = time.perf_counter()
    clients = await _open_ws(
        args.host, args.port, ws_handshake(args.host_header), args.conns, state, batch=500
    )
    print(json.dumps({"ready": len(clients), "open_s": time.perf_counter() - t0}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for c in clients:
        c.transport.abort()  # type: ignore[union-attr]
    return {"closed": len(clients)}


# -- single-stream transfers -----------------------------------------------------------------------
def _connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def download(args: argparse.Namespace) -> dict:
    s = _connect(args.host, args.port)
    s.sendall(f"GET {args.path} HTTP/1.1\r\nHost: {args.host_header}\r\n\r\n".encode())
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    n = s.recv_into(view)  # first bytes (head) start the clock
    head_end = bytes(buf[:n]).find(b"\r\n\r\n")
    m = re.search(rb"content-length:\s*(\d+)", bytes(buf[:head_end]).lower())
    # keep-alive: the origin keeps the connection open after the body, so stop at its end
    left = (int(m.group(1)) if m else 1 << 62) - (n - head_end - 4)
    t0 = time.perf_counter()
    deadline = t0 + args.duration
    total = 0
    recv_into = s.recv_into
    pace = args.rate_mib * 2**20
    i = 0
    while True:
        n = recv_into(view)
        if not n:
            break
        total += n
        if total >= left:
            break
        i += 1
        if i % 16 == 0:
            now = time.perf_counter()
            if now >= deadline:
                break
            if pace:  # reader-paced: sleep until the byte count is back on schedule
                ahead = total / pace - (now - t0)
                if ahead > 0:
                    time.sleep(ahead)
    elapsed = time.perf_counter() - t0
    s.close()
    return {"bytes": total, "elapsed": elapsed, "mib_per_s": total / elapsed / 2**20}


def upload(args: argparse.Namespace) -> dict:
    s = _connect(args.host, args.port)
    size = 64 << 30
    s.sendall(
        f"POST {args.path} HTTP/1.1\r\nHost: {args.host_header}\r\n"
        f"Content-Length: {size}\r\n\r\n".encode()
    )
    buf = memoryview(bytearray(b"u" * (1 << 20)))
    t0 = time.perf_counter()
    deadline = t0 + args.duration
    total = 0
    send = s.send
    i = 0
    error = None
    try:
        while True:
            total += send(buf)
            i += 1
            if i % 8 == 0 and time.perf_counter() >= deadline:
                break
    except OSError as exc:  # the origin answered early and closed: report what was sent
        error = repr(exc)
    elapsed = time.perf_counter() - t0
    s.close()
    return {
        "bytes": total,
        "elapsed": elapsed,
        "mib_per_s": total / elapsed / 2**20,
        "error": error,
    }


# -- fixed-rate latency probe ----------------------------------------------------------------------
class HttpConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1
        self.done: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
            self.need = end + 4 + length
        if len(buf) >= self.need:
            del buf[: self.need]
            self.need = -1
            if self.done is not None and not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc):  # type: ignore[no-untyped-def]
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))


async def probe(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    req = f"GET {args.path} HTTP/1.1\r\nHost: {args.host_header}\r\n\r\n".encode()
    lat: list[float] = []
    when: list[float] = []  # send time of each sample, s after the warm-up
    errors = 0
    interval = args.conns / args.rate
    start = time.perf_counter() + args.warmup

    async def one(k: int) -> None:
        nonlocal errors
        _, conn = await loop.create_connection(HttpConn, args.host, args.port)
        sock = conn.transport.get_extra_info("socket")  # type: ignore[union-attr]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t_next = time.perf_counter() + k * interval / args.conns
        end = start + args.duration
        while t_next < end:
            delay = t_next - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            conn.done = loop.create_future()
            t0 = time.perf_counter()
            conn.transport.write(req)  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(conn.done, 10)
            except (TimeoutError, ConnectionError):
                errors += 1
                return
            if t0 >= start:
                lat.append((time.perf_counter() - t0) * 1000.0)
                when.append(t0 - start)
            t_next += interval
        conn.transport.close()  # type: ignore[union-attr]

    await asyncio.gather(*(one(k) for k in range(args.conns)))
    return {
        "requests": len(lat),
        "errors": errors,
        **percentiles(lat, (50, 90, 99)),
        "max": max(lat, default=float("nan")),
        # the 10 slowest requests as [s after the warm-up, ms]: when the tail happened
        "slowest": sorted(zip(when, lat, strict=True), key=lambda x: -x[1])[:10],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["ws", "ws-idle", "download", "upload", "probe"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host-header", default="localhost")
    ap.add_argument("--path", default="/")
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--rate-mib", type=float, default=0.0, help="download: pace the reader")
    args = ap.parse_args(argv)
    raise_nofile()
    if args.mode == "ws":
        result = _run(ws_load(args))
    elif args.mode == "ws-idle":
        result = _run(ws_idle(args))
    elif args.mode == "download":
        result = download(args)
    elif args.mode == "upload":
        result = upload(args)
    else:
        result = _run(probe(args))
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
