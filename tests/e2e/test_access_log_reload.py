"""docs/operations.md, SIGHUP: ``access_log`` changes live for the connections opened after the
reload; a connection already open keeps the setting it started with (as nginx's old workers
finish their connections with the old configuration). bench/e2e/toggle.py relies on it: it
switches the access log between wrk bursts, each on new connections. A real ``tunneld serve``
reloading its TOML file on SIGHUP, raw keep-alive connections through it.
"""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

from .origin import OriginThread
from .procs import Processes, is_connected, wait_for
from .test_doc_claims_operations_2 import _expose, _log, _start_edge

IO_TIMEOUT = 10


class KeptAlive:
    """One client connection to the public listener, kept open across requests."""

    def __init__(self, port: int, host: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
        self.host = host
        self.buf = b""

    def get(self, target: str) -> bytes:
        """GET ``target``; the response's body (Content-Length framed, as the origin sends)."""
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target.encode(), self.host))
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        match = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
        assert match is not None, head
        length = int(match.group(1))
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return body

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the edge closed the connection"
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def _line(procs: Processes, target: str) -> bool:
    return f'tunneld.access: 127.0.0.1 "GET {target}" 200 ' in _log(procs)


def _reload(procs: Processes, config: Path, access_log: bool, count: int) -> None:
    config.write_text(f'access_log = {"true" if access_log else "false"}\nlog_level = "info"\n')
    assert procs.edge is not None
    procs.edge.send_signal(signal.SIGHUP)
    wait_for(
        lambda: _log(procs).count("SIGHUP: configuration reloaded") == count,
        what=f"reload {count}",
    )


def test_access_log_reload_applies_to_connections_opened_after_it(tmp_path: Path) -> None:
    procs = Processes(tmp_path, "asyncio")
    origin = OriginThread()
    config = tmp_path / "tunneld.toml"
    conns: list[KeptAlive] = []
    try:
        config.write_text('access_log = false\nlog_level = "info"\n')
        _start_edge(procs, "-c", str(config))
        procs.start_agent("sb1")
        wait_for(lambda: is_connected(procs, "sb1"), what="agent connected")
        host = _expose(procs, "sb1", origin.port).split("//", 1)[1].split("/", 1)[0].encode()

        def connect() -> KeptAlive:
            conns.append(KeptAlive(procs.ports["public"], host))
            return conns[-1]

        before = connect()
        assert len(before.get("/bytes?n=3&seed=1")) == 3
        _reload(procs, config, True, 1)
        assert len(before.get("/bytes?n=3&seed=2")) == 3  # opened before: not logged
        after = connect()
        assert len(after.get("/bytes?n=3&seed=3")) == 3  # opened after: logged
        wait_for(lambda: _line(procs, "/bytes?n=3&seed=3"), what="the line of seed 3")
        assert not _line(procs, "/bytes?n=3&seed=1")
        assert not _line(procs, "/bytes?n=3&seed=2")

        _reload(procs, config, False, 2)
        later = connect()
        assert len(later.get("/bytes?n=3&seed=4")) == 3  # opened after turning it off
        assert len(after.get("/bytes?n=3&seed=5")) == 3  # still logged: it started with it on
        wait_for(lambda: _line(procs, "/bytes?n=3&seed=5"), what="the line of seed 5")
        assert not _line(procs, "/bytes?n=3&seed=4")
        assert "Traceback" not in _log(procs)
    finally:
        for conn in conns:
            conn.close()
        procs.close()
        origin.close()
