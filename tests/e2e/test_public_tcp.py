"""Public raw TCP exposures, TLS passthrough by SNI and PROXY protocol v2 (tunneld/tcpexpose.py).

Real services in the sandbox: a real ``redis-server`` (binary values both ways, checked by
sha256), a half-close service, a real nginx reading PROXY v2 headers (``listen ...
proxy_protocol``, ``$proxy_protocol_addr``), and a TLS service whose certificate comes from a CA
the edge never saw, so a handshake that verifies proves the edge did not terminate it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import trustme

from tests.redis_server import RedisServer
from tunneld.config import ConfigError, load_config
from tunneld.sni import MAX_HELLO_LENGTH
from tunneld.store import SqliteStore
from tunneld.tcpexpose import parse_port_range

from .conftest import Stack, wait_until
from .procs import BIN, Processes, admin_client, is_connected, wait_for

pytestmark = pytest.mark.anyio

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
IO_TIMEOUT = 30.0


def port_range(size: int) -> str:
    """``size`` ports above the kernel's ephemeral range (61000+): the allocator skips any that
    another process holds, so a busy port makes a test use the next one, never fail."""
    first = random.randint(61000, 65535 - size)
    return f"{first}-{first + size - 1}"


async def tcp_stack(**config: object) -> Stack:
    config.setdefault("public_tcp_ports", port_range(16))
    return await Stack(**config).start()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = await tcp_stack()
    try:
        yield s
    finally:
        await s.close()


async def expose_tcp(stack: Stack, sandbox_id: str, port: int, **body: object) -> int:
    exposure = await stack.expose(sandbox_id, port, protocol="tcp", **body)
    assert exposure["protocol"] == "tcp"
    public_port = exposure["publicPort"]
    assert public_port in stack.edge.tcp.ports  # type: ignore[union-attr]
    return int(public_port)


# -- a real Redis -----------------------------------------------------------------------------


async def test_redis_through_a_public_tcp_port(stack: Stack, redis_tcp_server: RedisServer) -> None:
    await stack.agent("sb1")
    public_port = await expose_tcp(stack, "sb1", redis_tcp_server.port)
    client = aioredis.Redis(host="127.0.0.1", port=public_port, socket_timeout=IO_TIMEOUT)
    try:
        up = os.urandom(3 * 1024 * 1024 + 17)
        assert await client.set(b"blob", up)
        down = await client.get(b"blob")
        assert hashlib.sha256(down).hexdigest() == hashlib.sha256(up).hexdigest()
        # and a value written by the service's own side (APPEND), read back through the tunnel
        await client.append(b"blob", b"\x00\xff" * 1000)
        assert (
            hashlib.sha256(await client.get(b"blob")).digest()
            == hashlib.sha256(up + b"\x00\xff" * 1000).digest()
        )
    finally:
        await client.aclose()
    # the value is in the real server, not in something that merely echoed
    direct = aioredis.Redis(host="127.0.0.1", port=redis_tcp_server.port)
    try:
        assert await direct.strlen(b"blob") == len(up) + 2000
    finally:
        await direct.aclose()


async def test_a_tcp_exposure_is_a_tcp_url_and_no_http_preview(stack: Stack) -> None:
    """exposedAt says where a tcp exposure is reached (its preview host names the edge in
    DNS, the port is its own); its preview URL is no HTTP way into the raw service: 404, as
    for a port that is not exposed, and the service sees nothing."""
    service = await HashService().start()
    try:
        await stack.agent("sb1")
        exposure = await stack.expose("sb1", service.port, protocol="tcp")
        token = stack.edge.registry.get("sb1").exposures[service.port].token
        host = f"{service.port}-sb1-{token}.localhost"
        assert exposure["exposedAt"] == f"tcp://{host}:{exposure['publicPort']}"
        http_url = f"http://{host}:{stack.edge.public_port}/"
        async with stack.client(http_url) as client:
            response = await client.get("/")
        assert response.status_code == 404 and response.json()["code"] == "INVALID_TOKEN"
        assert service.peers == []
    finally:
        await service.close()


# -- half-close, reset, unexpose --------------------------------------------------------------


class HashService:
    """Reads until the client's FIN, answers the sha256 of what it read and ``reply`` bytes,
    then closes normally; ``mode="reset"`` answers a few bytes and then resets (RST)."""

    def __init__(self, reply: bytes = b"", mode: str = "hash") -> None:
        self.reply = reply
        self.mode = mode
        self.server: asyncio.Server | None = None
        self.port = 0
        self.peers: list[tuple[str, int]] = []

    async def start(self) -> HashService:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername"))
        try:
            if self.mode == "reset":
                writer.write(b"partial")
                await writer.drain()
                await reader.read(1)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                writer.transport.abort()
                return
            digest = hashlib.sha256()
            while chunk := await reader.read(65536):
                digest.update(chunk)
            writer.write(digest.hexdigest().encode() + b"\n" + self.reply)
            await writer.drain()
            writer.close()
        except (ConnectionError, asyncio.CancelledError):
            writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_half_close_is_honoured_both_ways(stack: Stack) -> None:
    reply = os.urandom(2 * 1024 * 1024)
    service = await HashService(reply).start()
    try:
        await stack.agent("sb1")
        public_port = await expose_tcp(stack, "sb1", service.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
        up = os.urandom(5 * 1024 * 1024 + 3)
        writer.write(up)
        await writer.drain()
        writer.write_eof()  # our half-close: the service answers only after it
        answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT)  # until its FIN
        line, _, rest = answer.partition(b"\n")
        assert line.decode() == hashlib.sha256(up).hexdigest()
        assert hashlib.sha256(rest).digest() == hashlib.sha256(reply).digest()
        writer.close()
    finally:
        await service.close()


async def test_a_slow_reader_of_a_finished_stream_is_not_idle() -> None:
    """The service sent everything and closed; the client takes the end slowly, for several
    idle timeouts. Bytes reaching the client are not idleness: it gets every byte and a clean
    end, where the sweep used to cut it with RST (and lose the end) once nothing more came
    from the service. A client that takes nothing is still cut."""
    reply = os.urandom(512 * 1024)

    async def send_and_close(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(reply)
        await w.drain()
        w.close()

    service = await asyncio.start_server(send_and_close, "127.0.0.1", 0)
    stack = await tcp_stack(idle_timeout=1.0)
    try:
        await stack.agent("sb1")
        public_port = await expose_tcp(stack, "sb1", service.sockets[0].getsockname()[1])

        def slow_read() -> tuple[bytes, str]:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(IO_TIMEOUT)
            sock.connect(("127.0.0.1", public_port))
            got = bytearray()
            try:
                for _ in range(10_000):  # ~100 KiB/s: 512 KiB take ~5 idle timeouts
                    chunk = sock.recv(8192)
                    if not chunk:
                        return bytes(got), "clean end"
                    got += chunk
                    time.sleep(0.08)
                return bytes(got), "no end"
            except ConnectionResetError:
                return bytes(got), "reset"
            finally:
                sock.close()

        def stalled_read() -> tuple[bytes, str]:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(IO_TIMEOUT)
            sock.connect(("127.0.0.1", public_port))
            time.sleep(3.0)  # takes nothing for 3 idle timeouts: cut meanwhile
            got = bytearray()
            try:
                for _ in range(10_000):
                    chunk = sock.recv(65536)
                    if not chunk:
                        return bytes(got), "clean end"
                    got += chunk
                return bytes(got), "no end"
            except ConnectionResetError:
                return bytes(got), "reset"
            finally:
                sock.close()

        got, end = await asyncio.to_thread(slow_read)
        assert (len(got), end) == (len(reply), "clean end")
        assert hashlib.sha256(got).digest() == hashlib.sha256(reply).digest()
        got, end = await asyncio.to_thread(stalled_read)
        assert end == "reset" and len(got) < len(reply)
    finally:
        await stack.close()
        service.close()


async def test_a_reset_stays_a_reset(stack: Stack) -> None:
    service = await HashService(mode="reset").start()
    try:
        await stack.agent("sb1")
        public_port = await expose_tcp(stack, "sb1", service.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
        assert await asyncio.wait_for(reader.readexactly(7), IO_TIMEOUT) == b"partial"
        writer.write(b"x")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        writer.close()
    finally:
        await service.close()


async def test_nothing_listening_in_the_sandbox_is_a_reset(stack: Stack) -> None:
    await stack.agent("sb1")
    with socket.socket() as holder:  # bound, not listening: connecting is refused
        holder.bind(("127.0.0.1", 0))
        public_port = await expose_tcp(stack, "sb1", holder.getsockname()[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        writer.close()


async def test_unexpose_closes_the_port_and_resets_live_connections(stack: Stack) -> None:
    service = await HashService(b"never").start()
    try:
        await stack.agent("sb1")
        public_port = await expose_tcp(stack, "sb1", service.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
        writer.write(b"live")
        await writer.drain()
        await wait_until(lambda: service.peers, what="the service's connection")
        assert stack.admin is not None
        response = await stack.admin.delete(f"/v1/sandboxes/sb1/ports/{service.port}")
        assert response.status_code == 204
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", public_port)
        assert stack.edge is not None and public_port not in stack.edge.tcp.listeners  # type: ignore[union-attr]
    finally:
        await service.close()


async def test_the_public_port_is_kept_by_a_re_expose_and_reused_after_unexpose(
    stack: Stack,
) -> None:
    await stack.agent("sb1")
    first = await expose_tcp(stack, "sb1", 15001)
    assert await expose_tcp(stack, "sb1", 15001) == first  # idempotent: same port
    second = await expose_tcp(stack, "sb1", 15002)
    assert second != first
    assert stack.admin is not None
    listed = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
    assert {p["port"]: p["publicPort"] for p in listed} == {15001: first, 15002: second}
    await stack.admin.delete("/v1/sandboxes/sb1/ports/15001")
    assert await expose_tcp(stack, "sb2", 15003) in (first, *range(second + 1, 65536))


async def test_an_exhausted_port_range_is_a_clear_error() -> None:
    stack = await tcp_stack(public_tcp_ports=port_range(3))
    try:
        assert stack.admin is not None
        granted = []
        for port in range(15001, 15010):
            response = await stack.admin.post(
                "/v1/sandboxes/sb1/ports", json={"port": port, "protocol": "tcp"}
            )
            if response.status_code != 200:
                break
            granted.append(response.json()["publicPort"])
        assert 1 <= len(granted) <= 3 and len(set(granted)) == len(granted)
        assert response.status_code == 503
        assert response.json()["code"] == "TCP_PORTS_EXHAUSTED"
        assert "public_tcp_ports" in response.json()["error"]
        # the refused exposure was not stored
        listed = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
        assert len(listed) == len(granted)
    finally:
        await stack.close()


async def test_tcp_and_tls_exposures_are_off_by_default() -> None:
    stack = await Stack().start()
    try:
        assert stack.admin is not None
        for protocol, code in (
            ("tcp", "TCP_EXPOSURES_DISABLED"),
            ("tls", "TLS_PASSTHROUGH_DISABLED"),
        ):
            response = await stack.admin.post(
                "/v1/sandboxes/sb1/ports", json={"port": 15001, "protocol": protocol}
            )
            assert response.status_code == 400, response.text
            assert response.json()["code"] == code
        assert (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"] == []
    finally:
        await stack.close()


@pytest.mark.parametrize(
    ("settings", "code"),
    [
        ({"max_connections_per_ip": 2}, "TOO_MANY_CONNECTIONS"),
        ({"max_connections": 2}, "TOO_MANY_CONNECTIONS"),
        ({"stream_rate": 0.001, "stream_burst": 2}, "TOO_MANY_STREAMS"),
    ],
    ids=["per-ip", "total", "stream-rate"],
)
async def test_connection_limits_apply(settings: dict[str, object], code: str) -> None:
    stack = await tcp_stack(**settings)
    service = await HashService(b"ok").start()
    try:
        await stack.agent("sb1")
        public_port = await expose_tcp(stack, "sb1", service.port)
        held = [await asyncio.open_connection("127.0.0.1", public_port) for _ in range(2)]
        await wait_until(lambda: len(service.peers) == 2, what="two connections through")
        reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        writer.close()
        assert len(service.peers) == 2  # the refused one never reached the sandbox
        assert stack.admin is not None
        metrics = (await stack.admin.get("/metrics")).text
        assert f'tunneld_public_refusals_total{{code="{code}"}} 1.0' in metrics
        for _, w in held:
            w.close()
    finally:
        await service.close()
        await stack.close()


async def test_a_port_another_process_holds_is_skipped() -> None:
    with socket.socket() as holder:
        for _ in range(20):
            first = random.randint(61000, 65000)
            try:
                holder.bind(("127.0.0.1", first))
                break
            except OSError:
                continue
        holder.listen()
        stack = await tcp_stack(public_tcp_ports=f"{first}-{first + 5}")
        try:
            public_port = await expose_tcp(stack, "sb1", 15001)
            assert first < public_port <= first + 5
        finally:
            await stack.close()


# -- PROXY protocol v2, read by a real nginx --------------------------------------------------


class Nginx:
    """nginx with one HTTP server that requires PROXY protocol and answers with what the
    header said: ``$proxy_protocol_addr:$proxy_protocol_port``."""

    def __init__(
        self, directory: Path, tls_for: Callable[[int], tuple[str, str]] | None = None
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls_for = tls_for  # port -> (certificate, key) files: the server speaks TLS

    def start(self) -> Nginx:
        if not os.path.exists(NGINX):
            pytest.fail("nginx is not installed: run `make ensure-nginx` (apt-get)")
        for _ in range(10):
            # below the ephemeral range, which port-0 binds of other tests (and of other xdist
            # workers) draw from; and _answers() checks that what listens there is this nginx
            self.port = random.randrange(20000, 32000)
            listen = f"listen 127.0.0.1:{self.port} proxy_protocol;"
            if self.tls_for is not None:
                cert, key = self.tls_for(self.port)
                listen = (
                    f"listen 127.0.0.1:{self.port} ssl proxy_protocol; "
                    f"ssl_certificate {cert}; ssl_certificate_key {key};"
                )
            (self.dir / "nginx.conf").write_text(
                f"""
daemon off;
master_process off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    server {{
        {listen}
        location / {{ return 200 "$proxy_protocol_addr:$proxy_protocol_port\\n"; }}
    }}
}}
"""
            )
            self.proc = subprocess.Popen(
                [
                    NGINX,
                    "-p",
                    str(self.dir),
                    "-e",
                    str(self.dir / "error.log"),
                    "-c",
                    str(self.dir / "nginx.conf"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if self._answers():
                        return self
                except OSError:
                    pass
                time.sleep(0.02)
            self.stop()
        raise RuntimeError(f"nginx did not start: {self.log()}")

    def _answers(self) -> bool:
        """This nginx listens on the port: it answers a PROXY header with its addresses. (A
        bare connect would also succeed to another process that holds the port, while this
        nginx is about to exit with "address in use".)"""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        try:
            sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 4242 80\r\n")
            if self.tls_for is not None:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(sock)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            answer = b""
            while len(answer) < 4096 and (chunk := sock.recv(4096)):
                answer += chunk
        finally:
            sock.close()
        return b"192.0.2.7:4242" in answer

    def log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx").start()
    try:
        yield server
    finally:
        server.stop()


async def http_get(
    port: int, host: str, *, tls: ssl.SSLContext | None = None
) -> tuple[bytes, tuple]:
    """One HTTP/1.1 GET over a fresh connection; (response bytes, the client's own address)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname=host.partition(":")[0] if tls else None
    )
    try:
        local = writer.get_extra_info("sockname")
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), IO_TIMEOUT), local
    finally:
        writer.close()


async def test_proxy_protocol_tells_nginx_the_real_client(stack: Stack, nginx: Nginx) -> None:
    await stack.agent("sb1")
    public_port = await expose_tcp(stack, "sb1", nginx.port, proxyProtocol=True)
    answer, local = await http_get(public_port, "anything")
    assert answer.startswith(b"HTTP/1.1 200"), (answer, nginx.log())
    # nginx saw our address and port, not the agent's connection (which comes from another port)
    assert answer.rstrip().endswith(f"\n{local[0]}:{local[1]}".encode()), answer


async def test_without_proxy_protocol_nginx_refuses(stack: Stack, nginx: Nginx) -> None:
    """The control: the same exposure without the option sends no header, and nginx (which
    requires one) closes the connection without an answer."""
    await stack.agent("sb1")
    public_port = await expose_tcp(stack, "sb1", nginx.port)
    answer, _ = await http_get(public_port, "anything")
    assert answer == b""


async def test_proxy_protocol_on_an_http_preview_url(stack: Stack, nginx: Nginx) -> None:
    await stack.agent("sb1")
    exposure = await stack.expose("sb1", nginx.port, proxyProtocol=True)
    assert stack.edge is not None
    answer, local = await http_get(stack.edge.public_port, stack.host_of(exposure["exposedAt"]))
    assert answer.startswith(b"HTTP/1.1 200"), (answer, nginx.log())
    assert answer.rstrip().endswith(f"\n{local[0]}:{local[1]}".encode()), answer


# -- TLS passthrough by SNI -------------------------------------------------------------------


class TlsEcho:
    """A TLS service in the sandbox with its own certificate: answers ``sha256(line)`` per line."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TlsEcho:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(hashlib.sha256(line).hexdigest().encode() + b"\n")
                await writer.drain()
            writer.close()
        except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
            writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Passthrough:
    def __init__(self, stack: Stack, edge_ca: trustme.CA, sandbox_ca: trustme.CA) -> None:
        self.stack = stack
        self.edge_ca = edge_ca
        self.sandbox_ca = sandbox_ca

    def client(self, ca: trustme.CA) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context


DOMAIN = "preview.test"
TOKEN = "tls0token"  # no "_": wildcard certificates (tests/e2e/test_public_tls.py)


@pytest.fixture
async def passthrough(tmp_path: Path) -> AsyncIterator[Passthrough]:
    edge_ca = trustme.CA()
    cert = edge_ca.issue_cert(f"*.{DOMAIN}")
    cert_file, key_file = tmp_path / "edge.pem", tmp_path / "edge.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    stack = await Stack(
        domain=DOMAIN,
        scheme="https",
        public_tls_cert=str(cert_file),
        public_tls_key=str(key_file),
        public_tls_passthrough=True,
        head_timeout=2.0,
    ).start()
    try:
        yield Passthrough(stack, edge_ca, trustme.CA())
    finally:
        await stack.close()


async def test_tls_is_routed_by_sni_to_the_sandbox_unterminated(passthrough: Passthrough) -> None:
    stack = passthrough.stack
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    service = await TlsEcho(server_context).start()
    try:
        host = f"{service.port}-sb1-{TOKEN}.{DOMAIN}"
        # the sandbox's own certificate, from a CA the edge never saw
        passthrough.sandbox_ca.issue_cert(host).configure_cert(server_context)
        await stack.agent("sb1")
        exposure = await stack.expose("sb1", service.port, protocol="tls", token=TOKEN)
        assert exposure["protocol"] == "tls" and "publicPort" not in exposure
        assert exposure["exposedAt"].startswith("https://")  # TLS, ended in the sandbox
        assert stack.host_of(exposure["exposedAt"]).partition(":")[0] == host
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            stack.edge.public_port,
            ssl=passthrough.client(passthrough.sandbox_ca),  # only the SANDBOX's CA is trusted
            server_hostname=host,
        )
        try:
            assert ("DNS", host) in writer.get_extra_info("peercert")["subjectAltName"]
            lines = [os.urandom(200).hex().encode() + b"\n" for _ in range(50)]
            writer.write(b"".join(lines))
            await writer.drain()
            for line in lines:
                answer = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
                assert answer == hashlib.sha256(line).hexdigest().encode() + b"\n"
        finally:
            writer.close()
        # the edge's certificate is not the sandbox's: trusting only the edge's CA fails
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1",
                stack.edge.public_port,
                ssl=passthrough.client(passthrough.edge_ca),
                server_hostname=host,
            )
    finally:
        await service.close()


class TlsBulk:
    """A TLS service in the sandbox: reads an 8-byte length and that many bytes, answers their
    sha256, then an 8-byte length and that many bytes of its own (``reply``)."""

    def __init__(self, context: ssl.SSLContext, reply: bytes) -> None:
        self.context = context
        self.reply = reply
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TlsBulk:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(8), "big")
            digest = hashlib.sha256()
            while size:
                chunk = await reader.read(min(size, 1 << 16))
                if not chunk:
                    raise ConnectionError("cut short")
                digest.update(chunk)
                size -= len(chunk)
            writer.write(digest.digest() + len(self.reply).to_bytes(8, "big") + self.reply)
            await writer.drain()
            writer.close()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_binary_bytes_both_ways_through_a_tls_exposure(passthrough: Passthrough) -> None:
    """Megabytes of binary data each way through an SNI-routed exposure, checked by sha256:
    what the service read is what the client sent, and the reverse."""
    stack = passthrough.stack
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    reply = os.urandom(3 * 1024 * 1024 + 5)
    service = await TlsBulk(server_context, reply).start()
    try:
        host = f"{service.port}-sb1-{TOKEN}.{DOMAIN}"
        passthrough.sandbox_ca.issue_cert(host).configure_cert(server_context)
        await stack.agent("sb1")
        await stack.expose("sb1", service.port, protocol="tls", token=TOKEN)
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            stack.edge.public_port,
            ssl=passthrough.client(passthrough.sandbox_ca),
            server_hostname=host,
        )
        try:
            sent = os.urandom(5 * 1024 * 1024 + 3)
            writer.write(len(sent).to_bytes(8, "big") + sent)
            await writer.drain()
            digest = await asyncio.wait_for(reader.readexactly(32), IO_TIMEOUT)
            assert digest == hashlib.sha256(sent).digest()
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(8), IO_TIMEOUT), "big")
            got = await asyncio.wait_for(reader.readexactly(size), IO_TIMEOUT)
            assert hashlib.sha256(got).digest() == hashlib.sha256(reply).digest()
        finally:
            writer.close()
    finally:
        await service.close()


async def test_other_names_on_the_port_get_the_edges_https(passthrough: Passthrough) -> None:
    stack = passthrough.stack
    await stack.agent("sb1")
    origin = await stack.origin()
    exposure = await stack.expose("sb1", origin.port, token=TOKEN)
    assert stack.edge is not None
    edge_trust = passthrough.client(passthrough.edge_ca)
    answer, _ = await http_get(
        stack.edge.public_port, f"{origin.port}-sb1-{TOKEN}.{DOMAIN}", tls=edge_trust
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert stack.host_of(exposure["exposedAt"]).startswith(f"{origin.port}-sb1-{TOKEN}.")
    # a tls exposure's name with a wrong token is not routed: the edge's own TLS answers
    await stack.expose("sb1", 18444, protocol="tls", token="tls1token")
    answer, _ = await http_get(
        stack.edge.public_port, f"18444-sb1-wrongtoken.{DOMAIN}", tls=edge_trust
    )
    assert answer.startswith(b"HTTP/1.1 404"), answer


async def test_a_tls_exposure_of_an_offline_sandbox_is_reset(passthrough: Passthrough) -> None:
    stack = passthrough.stack
    assert stack.edge is not None
    await stack.expose("sb9", 18445, protocol="tls", token=TOKEN)  # no agent for sb9
    with pytest.raises((ConnectionResetError, ssl.SSLError)):
        await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                stack.edge.public_port,
                ssl=passthrough.client(passthrough.sandbox_ca),
                server_hostname=f"18445-sb9-{TOKEN}.{DOMAIN}",
            ),
            IO_TIMEOUT,
        )
    assert stack.admin is not None
    metrics = (await stack.admin.get("/metrics")).text
    assert 'tunneld_public_refusals_total{code="SANDBOX_NOT_CONNECTED"} 1.0' in metrics


async def test_tls_passthrough_with_proxy_protocol_to_nginx(
    passthrough: Passthrough, tmp_path: Path
) -> None:
    """nginx in the sandbox terminates TLS itself and reads the PROXY header the edge sent
    ahead of the client's ClientHello."""
    stack = passthrough.stack

    def tls_for(port: int) -> tuple[str, str]:
        cert = passthrough.sandbox_ca.issue_cert(f"{port}-sb1-{TOKEN}.{DOMAIN}")
        cert_file, key_file = tmp_path / "sandbox.pem", tmp_path / "sandbox.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        return str(cert_file), str(key_file)

    nginx = Nginx(tmp_path / "nginx-tls", tls_for).start()
    try:
        await stack.agent("sb1")
        await stack.expose("sb1", nginx.port, protocol="tls", token=TOKEN, proxyProtocol=True)
        assert stack.edge is not None
        answer, local = await http_get(
            stack.edge.public_port,
            f"{nginx.port}-sb1-{TOKEN}.{DOMAIN}",
            tls=passthrough.client(passthrough.sandbox_ca),
        )
        assert answer.startswith(b"HTTP/1.1 200"), (answer, nginx.log())
        assert answer.rstrip().endswith(f"\n{local[0]}:{local[1]}".encode()), answer
    finally:
        nginx.stop()


async def closed_within(port: int, data: bytes, bound: float, *, eof: bool = False) -> None:
    """Send ``data`` (then FIN with ``eof``) and expect the edge to end the connection within
    ``bound`` seconds (EOF or RST), whatever it answers first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        await writer.drain()
        async with asyncio.timeout(bound):
            try:
                while await reader.read(65536):
                    pass
            except ConnectionResetError:
                pass
    finally:
        writer.close()


async def test_hostile_client_hellos_are_closed_promptly(passthrough: Passthrough) -> None:
    stack = passthrough.stack
    assert stack.edge is not None
    port = stack.edge.public_port
    hello = _client_hello(f"8000-sb1-{TOKEN}.{DOMAIN}")
    head_timeout = stack.config.head_timeout
    # garbage: the edge's TLS answers it with an alert at once
    await closed_within(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", head_timeout)
    await closed_within(port, os.urandom(3000), head_timeout + 5)
    # oversized: refused as soon as its header says so
    huge = b"\x16\x03\x01\x40\x00\x01" + (MAX_HELLO_LENGTH + 1).to_bytes(3, "big")
    await closed_within(port, huge + bytes(100), head_timeout)
    # truncated and then silent: the peek's timer (head_timeout)
    await closed_within(port, hello[: len(hello) // 2], head_timeout + 5)
    # truncated and then FIN
    await closed_within(port, hello[:20], head_timeout, eof=True)
    assert stack.edge.tcp.peeking == 0  # type: ignore[union-attr]
    # and the listener still serves
    origin = await stack.origin()
    await stack.agent("sb1")
    await stack.expose("sb1", origin.port, token=TOKEN)
    answer, _ = await http_get(
        port, f"{origin.port}-sb1-{TOKEN}.{DOMAIN}", tls=passthrough.client(passthrough.edge_ca)
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer


def _client_hello(server_hostname: str) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        sslobj.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("unreachable")


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"public_tcp_ports": "20000-"}, "public_tcp_ports: expected a port or a range"),
        ({"public_tcp_ports": "30000-20000"}, "FIRST <= LAST"),
        ({"public_tcp_ports": "0-10"}, "ports 1-65535"),
        ({"public_tcp_ports": "7000-7100"}, "must not include agent_port"),
        ({"public_tls_passthrough": True}, "set public_tls_cert"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    environ = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s"}
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, environ)


def test_the_settings_from_the_command_line() -> None:
    from tunneld.cli import _overrides, build_parser

    args = build_parser().parse_args(
        ["serve", "--public-tcp-ports", "20000-20009", "--public-tls-passthrough"]
    )
    config = load_config(
        None,
        {**_overrides(args), "public_tls_passthrough": None},
        {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s"},
    )
    assert config.public_tcp_ports == "20000-20009"
    assert parse_port_range(config.public_tcp_ports) == range(20000, 20010)
    assert _overrides(args)["public_tls_passthrough"] is True


# -- restarts, idle, a cluster ----------------------------------------------------------------


async def test_the_public_port_survives_an_edge_restart(tmp_path: Path) -> None:
    service = await HashService(b"again").start()
    ports = port_range(16)
    try:
        first = Stack(public_tcp_ports=ports)
        first.store = SqliteStore.open(tmp_path)
        await first.start()
        try:
            await first.agent("sb1")
            public_port = await expose_tcp(first, "sb1", service.port)
        finally:
            await first.close()
        with pytest.raises(ConnectionRefusedError):  # nobody listens while the edge is down
            await asyncio.open_connection("127.0.0.1", public_port)
        second = Stack(public_tcp_ports=ports)
        second.store = SqliteStore.open(tmp_path)
        await second.start()
        try:
            assert second.edge is not None and public_port in second.edge.tcp.listeners
            await second.agent("sb1")
            reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
            writer.write(b"after a restart")
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
            assert answer == hashlib.sha256(b"after a restart").hexdigest().encode() + b"\nagain"
            writer.close()
        finally:
            await second.close()
    finally:
        await service.close()


async def test_an_idle_connection_is_reset() -> None:
    stack = await tcp_stack(idle_timeout=0.5)
    service = await HashService(b"").start()
    try:
        await stack.agent("sb1")
        public_port = await expose_tcp(stack, "sb1", service.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
        writer.write(b"x")
        await writer.drain()
        with pytest.raises(ConnectionResetError):  # within 1x-1.5x the timeout; bound generous
            await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        writer.close()
    finally:
        await service.close()
        await stack.close()


async def test_a_node_without_the_agent_forwards_to_its_owner(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two nodes on one Redis, the agent on A; B (on 127.0.0.2, same port numbers) opens the
    exposure's public port from the shared store and relays its connections over the node
    link, PROXY header included."""
    from tests.cluster.nodes import Cluster

    cluster = Cluster(redis_server)
    ports = port_range(16)
    nginx = Nginx(tmp_path / "nginx").start()
    service = await HashService(os.urandom(100_000)).start()
    try:
        a = await cluster.node("node-a", public_tcp_ports=ports)
        b = await cluster.node("node-b", public_tcp_ports=ports, public_host="127.0.0.2")
        await cluster.agent(a, "sb1")
        response = await a.admin.post(
            "/v1/sandboxes/sb1/ports", json={"port": service.port, "protocol": "tcp"}
        )
        assert response.status_code == 200, response.text
        public_port = response.json()["publicPort"]
        await wait_until(lambda: public_port in b.edge.tcp.listeners, what="B's listener")
        reader, writer = await asyncio.open_connection("127.0.0.2", public_port)
        up = os.urandom(1024 * 1024)
        writer.write(up)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        line, _, rest = answer.partition(b"\n")
        assert line.decode() == hashlib.sha256(up).hexdigest()
        assert hashlib.sha256(rest).digest() == hashlib.sha256(service.reply).digest()
        writer.close()
        metrics = (await b.admin.get("/metrics")).text  # it went over the node link
        assert "tunneld_connections_forwarded_total 1.0" in metrics
        # PROXY v2 across the hop: nginx sees the client of B
        response = await a.admin.post(
            "/v1/sandboxes/sb1/ports",
            json={"port": nginx.port, "protocol": "tcp", "proxyProtocol": True},
        )
        nginx_public = response.json()["publicPort"]
        await wait_until(lambda: nginx_public in b.edge.tcp.listeners, what="B's listener")
        reader, writer = await asyncio.open_connection("127.0.0.2", nginx_public)
        local = writer.get_extra_info("sockname")
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        writer.close()
        assert answer.rstrip().endswith(f"\n{local[0]}:{local[1]}".encode()), answer
        # unexposed on A: B closes its listener too
        await a.admin.delete(f"/v1/sandboxes/sb1/ports/{service.port}")
        await wait_until(lambda: public_port not in b.edge.tcp.listeners, what="B to close")
    finally:
        await cluster.close()
        await service.close()
        nginx.stop()


# -- real processes ---------------------------------------------------------------------------


def test_real_processes_redis_cli_through_an_agent_made_tcp_exposure(
    procs: Processes, redis_tcp_server: RedisServer
) -> None:
    """`tunneld serve --public-tcp-ports`, `tunnel-agent run`, `tunnel-agent expose --protocol
    tcp`, then redis-cli against the public port the edge chose."""
    ports = port_range(16)
    procs.start_edge("--public-tcp-ports", ports)
    _, api_port = procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    exposed = subprocess.run(
        [
            str(BIN / "tunnel-agent"),
            "expose",
            str(redis_tcp_server.port),
            "--protocol",
            "tcp",
            "--api",
            f"http://127.0.0.1:{api_port}",
        ],
        capture_output=True,
        timeout=IO_TIMEOUT,
    )
    assert exposed.returncode == 0, exposed
    with admin_client(procs) as admin:
        (listed,) = admin.get("/v1/sandboxes/sb1/ports").json()["ports"]
    assert listed["protocol"] == "tcp"
    public_port = listed["publicPort"]
    assert public_port in parse_port_range(ports)
    cli = subprocess.run(
        ["redis-cli", "-p", str(public_port), "SET", "k", "through the public port"],
        capture_output=True,
        timeout=IO_TIMEOUT,
    )
    assert cli.stdout.strip() == b"OK", cli
    direct = subprocess.run(
        ["redis-cli", "-p", str(redis_tcp_server.port), "GET", "k"],
        capture_output=True,
        timeout=IO_TIMEOUT,
    )
    assert direct.stdout.strip() == b"through the public port"
    assert f"port {redis_tcp_server.port} on public TCP port {public_port}" in procs.output(
        procs.edge  # type: ignore[arg-type]
    )


def test_real_workers_share_the_public_tcp_port(
    procs: Processes, redis_tcp_server: RedisServer
) -> None:
    """`--workers 2`: both workers listen on the public TCP port (SO_REUSEPORT); the kernel
    spreads connections over them, and the worker without the agent relays over its node link."""
    ports = port_range(16)
    procs.start_edge("--workers", "2", "--public-tcp-ports", ports)
    supervisor = procs.edge
    assert supervisor is not None
    procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    with admin_client(procs) as admin:
        response = admin.post(
            "/v1/sandboxes/sb1/ports", json={"port": redis_tcp_server.port, "protocol": "tcp"}
        )
        assert response.status_code == 200, response.text
    public_port = response.json()["publicPort"]
    line = f"port {redis_tcp_server.port} on public TCP port {public_port}"
    wait_for(lambda: procs.output(supervisor).count(line) == 2, what="both workers' listeners")
    for i in range(20):
        value = os.urandom(64).hex()
        cli = subprocess.run(
            ["redis-cli", "-p", str(public_port), "SET", f"k{i}", value],
            capture_output=True,
            timeout=IO_TIMEOUT,
        )
        assert cli.stdout.strip() == b"OK", (cli, procs.output(supervisor)[-3000:])
        cli = subprocess.run(
            ["redis-cli", "-p", str(public_port), "GET", f"k{i}"],
            capture_output=True,
            timeout=IO_TIMEOUT,
        )
        assert cli.stdout.strip() == value.encode(), cli
