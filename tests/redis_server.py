"""A real redis-server for tests (Debian's package; `make unit` installs it).

``RedisServer`` runs ``redis-server`` in a temporary directory with ``appendonly yes`` and
``appendfsync always`` (what docs/operations.md asks of production), on a Unix socket by default
(``--port 0``: no TCP port to pick) or on TCP. It can be stopped and started again on the same
address with the same data (outage tests), and paused with SIGSTOP (a hung server: connections
are accepted by the kernel, nothing answers). With ``tls=True`` it speaks TLS only, on TCP
(``--port 0 --tls-port P``), with a trustme CA and certificate for 127.0.0.1 written to its
directory (``ca_file``); ``url`` is then ``rediss://127.0.0.1:P/0?ssl_ca_certs=<ca_file>``.
``client_certs=True`` makes it demand a client certificate of that CA (``client_cert_file``,
``client_key_file``: the URL's ``ssl_certfile`` and ``ssl_keyfile``).
The cluster tests use it as the shared store, the raw TCP tests as the service in a sandbox
(fixtures ``redis_server``, ``redis_tcp_server``, ``redis_tls_server`` in tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import trustme
from redis.exceptions import ResponseError

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# TCP: ports tried before giving up (a port taken by something else fails the bind).
TCP_ATTEMPTS = 10
START_TIMEOUT = 10.0


class RedisServer:
    def __init__(
        self, directory: Path, *, tcp: bool = False, tls: bool = False, client_certs: bool = False
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls = tls or client_certs
        self.tcp = tcp or self.tls
        self.client_certs = client_certs
        self.ca_file = self.dir / "ca.pem"  # what a client trusts (tls only)
        self.client_cert_file = self.dir / "client.pem"
        self.client_key_file = self.dir / "client.key"
        if self.tls:
            self.ca = trustme.CA()
            client = self.ca.issue_cert("tunneld-node.test")
            client.cert_chain_pems[0].write_to_path(str(self.client_cert_file))
            client.private_key_pem.write_to_path(str(self.client_key_file))
            cert = self.ca.issue_cert("127.0.0.1", "localhost")
            self.ca.cert_pem.write_to_path(str(self.ca_file))
            cert.private_key_pem.write_to_path(str(self.dir / "server.key"))
            cert.cert_chain_pems[0].write_to_path(str(self.dir / "server.pem"))
            for extra in cert.cert_chain_pems[1:]:
                extra.write_to_path(str(self.dir / "server.pem"), append=True)
        self.socket_path = self.dir / "redis.sock"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        if self.tcp:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def _command(self) -> list[str]:
        tls = [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.dir / "server.pem"),
            "--tls-key-file", str(self.dir / "server.key"),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "yes" if self.client_certs else "no",
        ]  # fmt: skip
        return [
            REDIS_SERVER,
            *(tls if self.tls else ["--port", str(self.port)]),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log),
        ]  # fmt: skip

    def start(self) -> RedisServer:
        """Start (again, on the same address and data); wait until it answers PING."""
        if not os.path.exists(REDIS_SERVER):
            pytest.fail("redis-server is not installed: run `make ensure-redis` (apt-get)")
        if not self.tcp:
            self._spawn()
            return self
        if self.port:  # a restart: the same port, taken by us a moment ago
            self._spawn()
            return self
        for _ in range(TCP_ATTEMPTS):
            self.port = random.randint(20000, 60000)
            try:
                self._spawn()
                return self
            except RuntimeError:
                if "Address already in use" not in self.log.read_text(errors="replace"):
                    raise
        raise RuntimeError(f"redis-server found no free TCP port in {TCP_ATTEMPTS} tries")

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
            if self.ping():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT}s")

    def ping(self) -> bool:
        try:
            family = socket.AF_INET if self.tcp else socket.AF_UNIX
            with socket.socket(family) as raw:  # closing it once detached by TLS: no-op
                raw.settimeout(1)
                raw.connect(("127.0.0.1", self.port) if self.tcp else str(self.socket_path))
                conn = raw
                if self.tls:
                    context = ssl.create_default_context(cafile=str(self.ca_file))
                    if self.client_certs:
                        context.load_cert_chain(self.client_cert_file, self.client_key_file)
                    conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
                with conn:
                    conn.sendall(b"PING\r\n")
                    return conn.recv(64).startswith(b"+PONG")
        except OSError:  # ssl.SSLError included
            return False

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits; start() brings the same data back."""
        if self.proc is None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(START_TIMEOUT)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(START_TIMEOUT)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)


async def until_busy(raw: aioredis.Redis, timeout: float = 10.0) -> None:
    """Wait until Redis answers BUSY (another client's script runs past
    ``busy-reply-threshold``), at most ``timeout`` seconds; any other error is raised."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                await raw.ping()
            except ResponseError as exc:
                if str(exc).startswith("BUSY"):
                    return
                raise
            await asyncio.sleep(0.01)
