"""One authenticated (or not yet authenticated) agent cannot exhaust the edge (issue 7, row 4).

Hostile agents that never read what the edge sends flood it with PINGs (each answered), `list`
requests (each answered with every exposure: ~1000x amplification), stream opens toward the edge
(each refused with an RST), and, before any token, WebSocket pings on the agent port (each
answered with a pong). Every reply path is capped: past the cap the edge stops reading that link,
control requests are rate-limited per session, and a peer that stays silent is dropped by the
dead-peer timer. Meanwhile another sandbox keeps answering. Real edge process, so its RSS is real.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
import wsproto
import wsproto.events as wse

from protocol import control
from protocol.events import ControlReceived
from protocol.frames import FrameType, encode_frame
from protocol.session import Role, Session
from tests.e2e.origin import Origin
from tests.e2e.procs import Processes

FLOOD_SECONDS = 10.0
MiB = 1024 * 1024


@pytest.fixture
def anyio_backend():
    return "asyncio"


def rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0  # gone: the test then says the process died
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie: the process died (the test then says so)


class HostileAgent:
    """Authenticates like an agent, then sends whatever it likes and never reads again."""

    def __init__(self, port: int, sandbox_id: str, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.session = Session(Role.AGENT)
        self.session.send_control(control.Hello(sandbox_id, token))
        self._send()
        self._until(lambda m: isinstance(m, control.Welcome), 1)

    def _send(self) -> None:
        self.sock.sendall(b"".join(bytes(b) for b in self.session.data_to_send()))

    def _until(self, done, count: int) -> None:
        seen = 0
        deadline = time.monotonic() + 15
        while seen < count:
            assert time.monotonic() < deadline, "the edge did not answer the setup"
            data = self.sock.recv(1 << 16)
            assert data, "the edge closed the setup connection"
            self.session.receive_data(data)
            for event in self.session.events_received():
                if isinstance(event, ControlReceived) and done(event.message):
                    seen += 1
            self._send()

    def expose_many(self, n: int) -> None:
        """Exposures with long names, so that one 40-byte `list` costs the edge ~25 KiB."""
        for i in range(n):
            self.session.send_control(control.Expose(i + 1, 2000 + i, name="n" * 200))
        self._send()
        self._until(lambda m: isinstance(m, control.Ok), n)

    def flood(self, make_batch, seconds: float) -> int:
        """Send batches until ``seconds`` passed; a full socket (the edge stopped reading) or
        a closed one is what a capped edge does, so both just end or pause the flood."""
        self.sock.settimeout(0.2)
        sent = 0
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            batch = make_batch(i)
            i += 1
            view = memoryview(batch)
            while view and time.monotonic() < deadline:
                try:
                    n = self.sock.send(view)
                except TimeoutError:
                    continue
                except OSError:
                    return sent  # the edge dropped us: fine
                sent += n
                view = view[n:]
        return sent

    def close(self) -> None:
        self.sock.close()


def ping_batch(i: int) -> bytes:
    return b"".join(
        encode_frame(FrameType.PING, 0, 0, length=(i * 1000 + k) & 0xFFFF) for k in range(1000)
    )


_LIST = encode_frame(FrameType.CONTROL, 0, 0, orjson.dumps({"type": "list", "id": 7}))


def list_batch(i: int) -> bytes:
    return _LIST * 1000


def syn_batch(i: int) -> bytes:
    meta = orjson.dumps({"port": 8000, "via": "preview"})
    first = 1001 + 2000 * i
    return b"".join(encode_frame(FrameType.DATA, 1, first + 2 * k, meta) for k in range(1000))


def websocket_ping_flood(port: int, seconds: float) -> int:
    """No token at all: a WebSocket agent link whose pings ask for pongs nobody reads."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    sock.sendall(ws.send(wse.Request(host="edge", target="/v1/agent")))
    deadline = time.monotonic() + 10
    accepted = False
    while not accepted:
        assert time.monotonic() < deadline, "no WebSocket handshake answer"
        ws.receive_data(sock.recv(4096))
        accepted = any(isinstance(e, wse.AcceptConnection) for e in ws.events())
    ping = ws.send(wse.Ping(payload=b"p" * 125))
    sock.settimeout(0.2)
    batch = memoryview(ping * 500)
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                sent += sock.send(batch)
            except TimeoutError:
                continue
            except OSError:
                break
    finally:
        sock.close()
    return sent


@pytest.mark.anyio
async def test_hostile_agents_cannot_exhaust_the_edge(tmp_path: Path) -> None:
    procs = Processes(tmp_path, "uvloop")
    origin = await Origin().start()
    hostiles: list[HostileAgent] = []
    try:
        ports = procs.start_edge()
        procs.start_agent("good")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{ports['admin']}",
            headers={"authorization": f"Bearer {procs.admin_token}"},
            timeout=10,
        ) as admin:
            deadline = time.monotonic() + 15
            while True:
                r = await admin.post("/v1/sandboxes/good/ports", json={"port": origin.port})
                if r.status_code == 200:
                    break
                assert time.monotonic() < deadline, r.text
                await asyncio.sleep(0.1)
        host = r.json()["exposedAt"].split("//", 1)[1].split("/", 1)[0]

        for name in ("h-ping", "h-list", "h-syn"):
            hostiles.append(HostileAgent(ports["agent"], name, procs.token(name)))
        hostiles[1].expose_many(100)

        edge_pid = procs.edge.pid
        baseline = rss(edge_pid)
        peak = baseline
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.05):
                peak = max(peak, rss(edge_pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        floods = [
            (hostiles[0].flood, ping_batch, FLOOD_SECONDS),
            (hostiles[1].flood, list_batch, FLOOD_SECONDS),
            (hostiles[2].flood, syn_batch, FLOOD_SECONDS),
            (websocket_ping_flood, ports["agent"], FLOOD_SECONDS),
        ]
        flood_task = asyncio.gather(*(asyncio.to_thread(*f) for f in floods))

        latencies: list[float] = []
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{ports['public']}", headers={"host": host}, timeout=10
        ) as client:
            end = time.monotonic() + FLOOD_SECONDS
            while time.monotonic() < end:
                started = time.monotonic()
                r = await client.get("/")
                latencies.append(time.monotonic() - started)
                assert r.status_code == 200 and r.content == b"hello from origin"
                await asyncio.sleep(0.1)
        sent = await asyncio.wait_for(flood_task, FLOOD_SECONDS + 10)
        stop.set()
        sampler.join(5)

        assert procs.edge.poll() is None, "the edge died:\n" + procs.output(procs.edge)[-3000:]
        assert all(n > 0 for n in sent), sent
        assert len(latencies) >= 10
        assert max(latencies) < 1.0, f"another sandbox waited {max(latencies):.2f}s"
        growth = peak - baseline
        print(f"edge RSS growth {growth / MiB:.1f} MiB, slowest request {max(latencies):.3f}s")
        assert growth <= 64 * MiB, f"edge RSS grew {growth / MiB:.0f} MiB under the floods"
        assert procs.edge.poll() is None, "the edge died"
    finally:
        for h in hostiles:
            h.close()
        procs.close()
        deadline = time.monotonic() + 15
        while origin.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await origin.close()
