"""The hand-over between real worker processes (``tunneld serve --workers 2``, uvloop: the
adoption steps ``connect_accepted_socket`` by hand, tunneld/handover.py): heads that arrive in
pieces, pipelined requests and a body that continues after the hand-over, each on a new
connection, so the kernel lands about half of them on the worker that does not hold the agent."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time

import httpx
import orjson

from tests.e2e.origin import OriginThread
from tests.e2e.procs import Processes, admin_client, wait_for

from .conftest import RedisServer
from .test_handover import _responses
from .test_workers import agent_status, origin, previews_answer, start_workers

__all__ = ["origin"]  # the fixture, imported for this module's tests

CONNECTIONS = 16


def _exchange(port: int, host: bytes, body: bytes) -> bytes:
    """A head in 5-byte writes, then two requests and part of a body in one write, then the
    rest of the body: every piece on one connection, read to the end."""
    first = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    rest = (
        b"GET /headers HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        b"POST /upload HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for i in range(0, len(first), 5):
            s.sendall(first[i : i + 5])
            time.sleep(0.002)
        s.sendall(rest + body[:1000])
        time.sleep(0.05)  # by now the connection is the owner's, whichever worker accepted it
        s.sendall(body[1000:])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _handed_over(procs: Processes) -> float:
    """The hand-over counter of whichever worker answers this admin request."""
    with admin_client(procs) as admin:
        text = admin.get("/metrics").text
    m = re.search(r"^tunneld_connections_handed_over_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_pieces_and_pipelines_survive_the_hand_over_between_worker_processes(
    procs: Processes, redis_server: RedisServer, origin: OriginThread
) -> None:
    start_workers(procs, redis_server)
    _, api_port = procs.start_agent("sb1")
    wait_for(lambda: agent_status(api_port)["connected"], what="agent connected")
    r = httpx.post(f"http://127.0.0.1:{api_port}/v1/ports", json={"port": origin.port}, timeout=10)
    assert r.status_code == 200, r.text
    url = r.json()["exposedAt"]
    wait_for(lambda: previews_answer(procs, url, 4), what="the exposure on both workers")
    host = url.split("//", 1)[1].split("/", 1)[0].encode()
    body = os.urandom(100_000)
    digest = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    for _ in range(CONNECTIONS):
        (s1, _, b1), (s2, _, b2), (s3, _, b3) = _responses(
            _exchange(procs.ports["public"], host, body)
        )
        assert (s1, b1) == (200, b"hello from origin")
        assert s2 == 200 and ["x-forwarded-for", "127.0.0.1"] in orjson.loads(b2)
        assert s3 == 200 and orjson.loads(b3) == digest
    # Some of them were handed over (all landing on the agent's worker: 2**-16); the admin port
    # too is shared, so ask until the landing worker answers.
    wait_for(lambda: _handed_over(procs) > 0, timeout=10, what="a handed-over connection")
