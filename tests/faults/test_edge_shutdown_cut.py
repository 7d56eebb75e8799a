"""A response the edge cuts ends with a reset, never a clean end (issue 7, rows 2 and 9): a body
without a length that just stops would look complete to the client. The cut here comes from the
edge itself: the end of its SIGTERM grace period, or its death (kill -9)."""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx

from tests.e2e.procs import Processes


class HangingOrigin:
    """Answers every request with a length-less body (read until close), then never ends it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 1000)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def _wait(predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _lengthless_response_then(tmp_path, cut) -> str:
    """Start edge + agent, stream a length-less response, ``cut(procs)``; how did it end?"""
    procs = Processes(tmp_path, "uvloop")
    origin = HangingOrigin()
    try:
        ports = procs.start_edge("--grace-period", "1")
        procs.start_agent("sb1")
        admin = httpx.Client(
            base_url=f"http://127.0.0.1:{ports['admin']}",
            headers={"authorization": f"Bearer {procs.admin_token}"},
            timeout=10,
        )
        with admin:

            def exposed() -> bool:
                r = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
                return r.status_code == 200

            _wait(exposed)
            url = admin.get("/v1/sandboxes/sb1/ports").json()["ports"][0]["exposedAt"]
        host = url.split("//", 1)[1].split("/", 1)[0]
        client = socket.create_connection(("127.0.0.1", ports["public"]), timeout=15)
        with client:
            client.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            received = b""
            while len(received) < 1000:
                received += client.recv(65536)
            assert received.startswith(b"HTTP/1.1 200 OK")
            cut(procs)
            try:
                while client.recv(65536):
                    pass
            except ConnectionResetError:
                return "reset"
            return "clean EOF"
    finally:
        procs.close()
        origin.close()


def test_sigterm_cut_of_a_lengthless_response_is_a_reset(tmp_path) -> None:
    ended = _lengthless_response_then(tmp_path, lambda p: p.stop(p.edge))  # grace 1 s, then cut
    assert ended == "reset", "a cut response ended like a complete one"


def test_edge_killed_mid_response_is_a_reset(tmp_path) -> None:
    """The kernel closes a dead process's sockets; with SO_LINGER 0 armed on every public
    connection while it may carry a response, that close is an RST, not a FIN."""
    ended = _lengthless_response_then(tmp_path, lambda p: p.stop(p.edge, signal.SIGKILL))
    assert ended == "reset", "a cut response ended like a complete one"


def test_normal_close_delivers_everything(tmp_path) -> None:
    """The other side of arming SO_LINGER 0: a graceful close must disarm it, or the RST would
    discard data still in flight. A length-less response that the service ends normally
    arrives whole and ends with a clean EOF."""
    procs = Processes(tmp_path, "uvloop")
    big = b"y" * (8 << 20)

    def serve(sock: socket.socket) -> None:
        conn, _ = sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + big)

    server = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=serve, args=(server,), daemon=True)
    thread.start()
    try:
        ports = procs.start_edge()
        procs.start_agent("sb1")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{ports['admin']}",
            headers={"authorization": f"Bearer {procs.admin_token}"},
            timeout=10,
        ) as admin:
            port = server.getsockname()[1]
            _wait(lambda: admin.post("/v1/sandboxes/sb1/ports", json={"port": port}).is_success)
            url = admin.get("/v1/sandboxes/sb1/ports").json()["ports"][0]["exposedAt"]
        host = url.split("//", 1)[1].split("/", 1)[0]
        with socket.create_connection(("127.0.0.1", ports["public"]), timeout=15) as client:
            client.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            time.sleep(1.0)  # a slow reader: the edge finishes and closes before we read
            chunks = []
            while chunk := client.recv(1 << 20):
                chunks.append(chunk)
        body = b"".join(chunks).split(b"\r\n\r\n", 1)[1]
        assert len(body) == len(big) and body == big
    finally:
        procs.close()
        server.close()
