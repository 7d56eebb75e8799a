"""A response the edge cuts at the end of its SIGTERM grace period ends with a reset (issue 7,
rows 2 and 9): a body without a length that just stops would look complete to the client."""

from __future__ import annotations

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


def test_sigterm_cut_of_a_lengthless_response_is_a_reset(tmp_path) -> None:
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
            procs.stop(procs.edge)  # SIGTERM: grace 1 s, then the stream is cut
            ended_by = "clean EOF"
            try:
                while client.recv(65536):
                    pass
            except ConnectionResetError:
                ended_by = "reset"
            assert ended_by == "reset", "a cut response ended like a complete one"
    finally:
        procs.close()
        origin.close()
