"""Issue 8, acceptance 2: an expose answered 2xx is on disk, whatever happens next.

1,000 exposes (10 sandboxes x 100 ports) are fired concurrently at a real tunneld, which is
killed with SIGKILL once a few hundred have been answered. After a restart on the same state
directory every expose that got a 2xx is there with the token it was answered with, and the
database passes ``PRAGMA integrity_check``. Exposes cut by the kill may or may not be there.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time

from tests.e2e.procs import Processes
from tunneld.store import DB_FILE

from .durable import admin, state_dir

SANDBOXES = 10
PORTS = 100  # per sandbox, below the cap of 128
KILL_AFTER = 300  # 2xx answers seen before the kill
CONNECTIONS = 48  # under admin_max_connections_per_ip (64): all from 127.0.0.1


def token_of(url: str) -> str:
    return url.split("//", 1)[1].split(".", 1)[0].rsplit("-", 1)[1]


async def fire(procs: Processes) -> dict[tuple[str, int], str]:
    """Fire every expose; kill tunneld after KILL_AFTER answers; return the 2xx ones.

    A raw HTTP/1.1 client on CONNECTIONS keep-alive connections (under the per-IP limit):
    httpx's pool spends seconds on 1,000 queued requests on a busy 2-core machine."""
    answered: dict[tuple[str, int], str] = {}
    killed = asyncio.Event()
    jobs = [(f"sb{i % SANDBOXES}", 2000 + i // SANDBOXES) for i in range(SANDBOXES * PORTS)]

    async def connection(mine: list[tuple[str, int]]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", procs.ports["admin"])
        try:
            for sandbox, port in mine:
                body = json.dumps({"port": port}).encode()
                writer.write(
                    f"POST /v1/sandboxes/{sandbox}/ports HTTP/1.1\r\nhost: admin\r\n"
                    f"authorization: Bearer {procs.admin_token}\r\n"
                    f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                reply = json.loads(await reader.readexactly(length))
                if not head.startswith(b"HTTP/1.1 200 "):
                    assert killed.is_set(), (head, reply)  # before the kill, all succeed
                    continue
                answered[(sandbox, port)] = token_of(reply["exposedAt"])
                if len(answered) >= KILL_AFTER and not killed.is_set():
                    killed.set()
                    assert procs.edge is not None
                    procs.edge.send_signal(signal.SIGKILL)
        except (OSError, asyncio.IncompleteReadError):
            assert killed.is_set()  # cut by the kill: that expose's outcome is unknown
        finally:
            writer.close()

    await asyncio.wait_for(
        asyncio.gather(*(connection(jobs[c::CONNECTIONS]) for c in range(CONNECTIONS))), 30
    )
    assert killed.is_set(), f"only {len(answered)} answered: the kill never happened"
    return answered


def test_every_answered_expose_survives_kill_9_midway(tmp_path) -> None:
    started = time.monotonic()
    procs = Processes(tmp_path, "uvloop")
    try:
        procs.start_edge()
        answered = asyncio.run(fire(procs))
        assert procs.edge is not None
        assert procs.edge.wait(10) == -signal.SIGKILL
        assert KILL_AFTER <= len(answered) < SANDBOXES * PORTS

        db = sqlite3.connect(state_dir(procs) / DB_FILE)
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            db.close()

        procs.start_edge()
        stored: dict[tuple[str, int], str] = {}
        with admin(procs) as a:
            for s in range(SANDBOXES):
                for p in a.get(f"/v1/sandboxes/sb{s}/ports").json()["ports"]:
                    stored[(f"sb{s}", p["port"])] = token_of(p["exposedAt"])
        missing = {k: v for k, v in answered.items() if stored.get(k) != v}
        assert not missing, f"{len(missing)} answered exposes lost, e.g. {list(missing)[:5]}"
        assert "Traceback" not in procs.output(procs.edge)
    finally:
        procs.close()
    assert time.monotonic() - started < 45  # CI budget: well under a minute on 2 cores
