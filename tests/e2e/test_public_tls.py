"""Preview URLs over HTTPS: certificates by SNI, reload without dropping connections, the
redirect listener, the admin API over TLS, and what a bad certificate or plain HTTP gets.

The URLs use a chosen token: OpenSSL clients (curl, Python) refuse a wildcard certificate for
a name whose wildcard label holds "_", which generated tokens may (see docs/operations.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trustme
import websockets
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from tunneld.cli import apply_reload
from tunneld.config import ConfigError, load_config
from tunneld.tls import names_match

from .conftest import Stack, raw_request, wait_until
from .origin import pattern_sha256
from .procs import BIN, Processes

pytestmark = pytest.mark.anyio

DOMAIN = "preview.test"
TOKEN = "tls0token"  # no "_": see the module docstring


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> tuple[str, str]:
    cert = ca.issue_cert(*hosts)
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return str(cert_file), str(key_file)


def serial_of(cert_file: str) -> int:
    return x509.load_pem_x509_certificate(Path(cert_file).read_bytes()).serial_number


def client_context(ca: trustme.CA, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


async def handshake(
    port: int, ca: trustme.CA, server_hostname: str | None, alpn: list[str] | None = None
) -> tuple[int, str | None]:
    """(serial of the certificate the listener presented, ALPN protocol chosen)."""
    context = client_context(ca, alpn)
    if server_hostname is None:
        context.check_hostname = False  # no SNI: the default certificate, whatever its names
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_hostname or ""
        ),
        10,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return int(
            ssl_object.getpeercert()["serialNumber"], 16
        ), ssl_object.selected_alpn_protocol()
    finally:
        writer.close()


def host_of(url: str) -> str:
    return url.split("//", 1)[1].split("/", 1)[0]


def https_client(stack: Stack, ca: trustme.CA, url: str) -> httpx.AsyncClient:
    """A client of the preview URL's host over TLS, dialling 127.0.0.1 (SNI = the preview host)."""
    host = host_of(url)
    return httpx.AsyncClient(
        base_url=f"https://{host}",
        timeout=30,
        transport=_Loopback(stack.edge.public_port, verify=client_context(ca)),
    )


class _Loopback(httpx.AsyncHTTPTransport):
    """Sends every request to 127.0.0.1:port while keeping the URL's host for Host and SNI."""

    def __init__(self, port: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.port = port

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        request.url = request.url.copy_with(host="127.0.0.1", port=self.port)
        request.headers["host"] = host
        request.extensions = {**request.extensions, "sni_hostname": host}
        return await super().handle_async_request(request)


async def tls_stack(ca: trustme.CA, tmp_path: Path, **config: object) -> Stack:
    cert, key = write_pair(ca, tmp_path, "wild", f"*.{DOMAIN}")
    settings: dict[str, object] = {
        "domain": DOMAIN,
        "scheme": "https",
        "public_tls_cert": cert,
        "public_tls_key": key,
    }
    return await Stack(**{**settings, **config}).start()


@asynccontextmanager
async def redirect_stack(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[tuple[Stack, int]]:
    """A TLS stack with the plain-HTTP redirect listener, and that listener's port."""
    # The edge binds the port with SO_REUSEPORT next to this socket, which holds the port
    # without listening, so no connection reaches it.
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        stack = await tls_stack(ca, tmp_path, public_redirect_port=port, reuse_port=True)
        try:
            assert stack.edge.redirect_port == port
            yield stack, port
        finally:
            await stack.close()
    finally:
        holder.close()


@pytest.fixture
async def stack(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[Stack]:
    s = await tls_stack(ca, tmp_path)
    try:
        yield s
    finally:
        await s.close()


async def test_preview_url_over_https_download_upload(stack: Stack, ca: trustme.CA) -> None:
    origin = await stack.origin()
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port, token=TOKEN)
    url = exposed["exposedAt"]
    assert url.startswith("https://") and host_of(url).endswith(
        f".{DOMAIN}:{stack.edge.public_port}"
    )
    async with https_client(stack, ca, url) as client:
        r = await client.get("/bytes", params={"n": 3_000_000})
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == pattern_sha256(
            3_000_000
        )
        body = os.urandom(2_000_000)
        r = await client.post("/upload", content=body)
        assert r.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        r = await client.get("/headers")
        assert dict(r.json())["x-forwarded-proto"] == "https"
    conn = next(iter(stack.edge.public_connections), None)
    assert conn is None or conn.transport.get_extra_info("ssl_object") is not None


async def _echo(ws) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except websockets.ConnectionClosed:
        pass


async def test_websocket_over_wss(stack: Stack, ca: trustme.CA) -> None:
    async with serve(_echo, "127.0.0.1", 0) as echo:
        echo_port = next(iter(echo.sockets)).getsockname()[1]
        await stack.agent("sb1")
        exposed = await stack.expose("sb1", echo_port, token=TOKEN)
        host = host_of(exposed["exposedAt"])
        async with connect(
            f"wss://{host}/chat",
            host="127.0.0.1",
            port=stack.edge.public_port,
            ssl=client_context(ca),
            server_hostname=host.rpartition(":")[0],
            open_timeout=10,
            close_timeout=5,
        ) as ws:
            assert ws.transport.get_extra_info("ssl_object") is not None
            big = os.urandom(300_000)
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 5) == "hello"
            await ws.send(big)
            assert await asyncio.wait_for(ws.recv(), 10) == big


async def test_sni_picks_the_certificate_that_covers_the_name(
    ca: trustme.CA, tmp_path: Path
) -> None:
    other_cert, other_key = write_pair(ca, tmp_path, "other", "*.other.test", "exact.example.test")
    stack = await tls_stack(ca, tmp_path, public_tls_extra=((other_cert, other_key),))
    try:
        port = stack.edge.public_port
        wild = serial_of(str(tmp_path / "wild.pem"))
        other = serial_of(other_cert)
        assert wild != other
        assert (await handshake(port, ca, f"8000-sb1-tok.{DOMAIN}"))[0] == wild
        assert (await handshake(port, ca, "abc.other.test"))[0] == other
        assert (await handshake(port, ca, "EXACT.example.test"))[0] == other
        assert (await handshake(port, ca, None))[0] == wild  # no SNI: the first pair
        # A wildcard covers one label only; a name nobody covers gets the default (and fails
        # verification on the client, as it should).
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(port, ca, "a.b.other.test")
        # ALPN: h2 for a client that offers it (tunneld/h2public.py), http/1.1 for one without
        assert (await handshake(port, ca, f"x.{DOMAIN}", ["h2", "http/1.1"]))[1] == "h2"
        assert (await handshake(port, ca, f"x.{DOMAIN}", ["http/1.1"]))[1] == "http/1.1"
    finally:
        await stack.close()


def test_wildcard_names_cover_exactly_one_label() -> None:
    assert names_match("*.preview.test", "8000-sb-tok.preview.test")
    assert not names_match("*.preview.test", "a.b.preview.test")
    assert not names_match("*.preview.test", "preview.test")
    assert not names_match("*.preview.test", ".preview.test")
    assert names_match("edge.test", "edge.test")
    assert not names_match("edge.test", "x.edge.test")


async def test_reload_new_certificate_keeps_open_connections(
    stack: Stack, ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    origin = await stack.origin()
    await stack.agent("sb1")
    url = (await stack.expose("sb1", origin.port, token=TOKEN))["exposedAt"]
    port = stack.edge.public_port
    name = host_of(url).rpartition(":")[0]
    old_serial = serial_of(stack.config.public_tls_cert)
    assert (await handshake(port, ca, name))[0] == old_serial
    async with https_client(stack, ca, url) as client:  # one keep-alive connection
        r = await client.get("/")
        assert r.content == b"hello from origin"
        new_cert, new_key = write_pair(ca, tmp_path, "renewed", f"*.{DOMAIN}")
        apply_reload(
            stack.edge,
            dataclasses.replace(stack.config, public_tls_cert=new_cert, public_tls_key=new_key),
        )
        new_serial = serial_of(new_cert)
        assert new_serial != old_serial
        assert (await handshake(port, ca, name))[0] == new_serial  # new connections: new cert
        for _ in range(3):
            r = await client.get("/")  # the open connection keeps working
            assert r.content == b"hello from origin"
        assert origin.connections == 1  # ... and it was the same connection all along
        # A bad file on reload: logged, and the certificates in use stay.
        with caplog.at_level(logging.ERROR, logger="tunneld.tls"):
            apply_reload(
                stack.edge,
                dataclasses.replace(stack.config, public_tls_cert=str(tmp_path / "missing.pem")),
            )
        assert any("missing.pem" in r.getMessage() for r in caplog.records if r.levelno >= 40)
        assert (await handshake(port, ca, name))[0] == new_serial
        r = await client.get("/")
        assert r.content == b"hello from origin"


async def test_plain_http_to_the_tls_port_is_closed_cleanly(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack = await tls_stack(ca, tmp_path, head_timeout=0.5)
    try:
        port = stack.edge.public_port
        try:
            answer = await raw_request(port, b"GET / HTTP/1.1\r\nHost: x.preview.test\r\n\r\n")
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/")  # a TLS alert at most, never a plaintext answer
        assert not stack.edge.public_connections
        # A client that connects and never says hello is dropped after head_timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        finally:
            writer.close()
        assert loop.time() - started < 5
        assert (await handshake(port, ca, f"x.{DOMAIN}"))[0]  # still serving
    finally:
        await stack.close()
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in problems if r.exc_info], [r.getMessage() for r in problems]


async def test_redirect_listener(ca: trustme.CA, tmp_path: Path) -> None:
    async with redirect_stack(ca, tmp_path) as (stack, port):
        public = stack.edge.public_port
        answer = await raw_request(
            port, b"GET /a/b?c=d HTTP/1.1\r\nHost: 8000-sb1-tok.Preview.Test:80\r\n\r\n"
        )
        head, _, _body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 308 ")
        assert (
            f"location: https://8000-sb1-tok.preview.test:{public}/a/b?c=d".encode() in head.lower()
        )
        assert b"connection: close" in head.lower()
        for host in (b"evil.example", b"preview.test.evil.example", b"[::1]", b"x.preview.test/"):
            answer = await raw_request(port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404 ") or answer.startswith(b"HTTP/1.1 400 "), (
                host,
                answer,
            )
            assert b'"code":' in answer
        answer = await raw_request(
            port, b"GET http://evil.example/ HTTP/1.1\r\nHost: x.preview.test\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 400 ")
        answer = await raw_request(port, b"garbage\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        answer = await raw_request(
            port, b"GET / HTTP/1.1\r\nHost: x.preview.test\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 431 ")
        stack.edge.config.head_timeout = 0.3
        answer = await raw_request(port, b"GET / HTTP/1.1\r\n")  # never finished
        assert answer.startswith(b"HTTP/1.1 408 ")
        # With url_port set (a load balancer's 443), the port is left out of the location
        stack.edge.config.url_port = 443
        answer = await raw_request(port, b"GET / HTTP/1.1\r\nHost: x.preview.test\r\n\r\n")
        assert b"location: https://x.preview.test/\r\n" in answer.lower()


async def test_admin_api_over_tls(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_pair(ca, tmp_path, "admin", "127.0.0.1")
    stack = await Stack(admin_tls_cert=cert, admin_tls_key=key).start()
    try:
        await stack.admin.aclose()
        stack.admin = httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{stack.edge.admin_port}",
            headers={"authorization": f"Bearer {stack.admin_token}"},
            verify=client_context(ca),
            timeout=30,
        )
        origin = await stack.origin()
        await stack.agent("sb1")
        exposed = await stack.expose("sb1", origin.port, token=TOKEN)  # through the TLS admin API
        assert exposed["exposedAt"].startswith("http://")  # the public side is still plain
        r = await stack.admin.get("/healthz")
        assert r.status_code == 200
        async with stack.client(exposed["exposedAt"]) as client:
            assert (await client.get("/")).content == b"hello from origin"
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient(timeout=5) as plain:
                await plain.get(f"http://127.0.0.1:{stack.edge.admin_port}/healthz")
    finally:
        await stack.close()


# -- configuration ---------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {"TUNNELD_ADMIN_TOKEN": "t", "TUNNELD_SECRET": "s"}


def test_config_loads_pairs_and_defaults_to_https(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_pair(ca, tmp_path, "wild", f"*.{DOMAIN}")
    other_cert, other_key = write_pair(ca, tmp_path, "other", "*.other.test")
    toml = tmp_path / "tunneld.toml"
    toml.write_text(
        f'public_tls_cert = "{cert}"\npublic_tls_key = "{key}"\npublic_redirect_port = 8081\n'
        f'[[public_tls]]\ncert = "{other_cert}"\nkey = "{other_key}"\n'
    )
    config = load_config(str(toml), environ=_env())
    assert config.scheme == "https"
    assert config.public_tls_extra == ((other_cert, other_key),)
    assert config.public_redirect_port == 8081
    assert load_config(str(toml), {"scheme": "http"}, environ=_env()).scheme == "http"
    env = {**_env(), "TUNNELD_PUBLIC_TLS_EXTRA": f"{other_cert}:{other_key}"}
    config = load_config(None, {"public_tls_cert": cert, "public_tls_key": key}, environ=env)
    assert config.public_tls_extra == ((other_cert, other_key),)
    assert load_config(None, environ=_env()).scheme == "http"


def test_config_names_the_bad_file(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_pair(ca, tmp_path, "wild", f"*.{DOMAIN}")
    _, other_key = write_pair(ca, tmp_path, "other", "*.other.test")
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        load_config(None, {"public_tls_cert": missing, "public_tls_key": key}, environ=_env())
    with pytest.raises(ConfigError, match=r"other\.key does not match"):
        load_config(None, {"public_tls_cert": cert, "public_tls_key": other_key}, environ=_env())
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, {"public_tls_cert": cert}, environ=_env())
    with pytest.raises(ConfigError, match=r"admin_tls_key .*does not match"):
        load_config(None, {"admin_tls_cert": cert, "admin_tls_key": other_key}, environ=_env())
    with pytest.raises(ConfigError, match="public_redirect_port"):
        load_config(None, {"public_redirect_port": 8081}, environ=_env())
    toml = tmp_path / "bad.toml"
    toml.write_text(f'public_tls_cert = "{cert}"\npublic_tls_key = "{key}"\n[[public_tls]]\n')
    with pytest.raises(ConfigError, match=r"\[\[public_tls\]\]"):
        load_config(str(toml), environ=_env())


def test_cli_exits_2_naming_the_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    env.update(_env())
    out = subprocess.run(
        [str(BIN / "tunneld"), "serve", "--public-tls-cert", str(tmp_path / "nope.pem"),
         "--public-tls-key", str(tmp_path / "nope.key"), "--public-port", "0"],
        env=env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2, out
    assert b"nope.pem" in out.stderr and b"Traceback" not in out.stderr


# -- a real process: SIGHUP ------------------------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path):
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _wait(predicate, timeout: float = 15, what: str = "condition") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _serial_now(port: int, ca: trustme.CA) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context(ca).wrap_socket(raw, server_hostname=f"x.{DOMAIN}") as tls:
            return int(tls.getpeercert()["serialNumber"], 16)


def test_sighup_reloads_certificates_in_a_real_process(
    procs: Processes, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_pair(ca, tmp_path, "live", f"*.{DOMAIN}")
    first = serial_of(cert)
    ports = procs.start_edge("--domain", DOMAIN, "--public-tls-cert", cert, "--public-tls-key", key)
    public = ports["public"]
    assert _serial_now(public, ca) == first
    # A connection made before the reload, its handshake done, not yet used
    raw = socket.create_connection(("127.0.0.1", public), timeout=10)
    old = client_context(ca).wrap_socket(raw, server_hostname=f"x.{DOMAIN}")
    try:
        write_pair(ca, tmp_path, "live", f"*.{DOMAIN}")  # renewed in place, as certbot does
        second = serial_of(cert)
        assert second != first
        procs.edge.send_signal(signal.SIGHUP)
        _wait(lambda: _serial_now(public, ca) == second, what="the renewed certificate")
        old.sendall(b"GET / HTTP/1.1\r\nHost: 8000-sb1-tok.preview.test\r\n\r\n")
        answer = old.recv(65536)
        assert answer.startswith(b"HTTP/1.1 404 ")  # served on the old session: not dropped
    finally:
        old.close()
    log = procs.logs[procs.edge.pid].read_text()
    assert "Traceback" not in log


async def test_a_client_closing_its_tls_connection_logs_no_asyncio_warning(
    stack: Stack, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS peer's EOF after its response: the stream ends (FIN to the service) and nothing
    else is logged. A relay endpoint answered it "keep the write side open" (TCP half-close),
    which asyncio cannot do on TLS and warned about once per connection."""
    caplog.set_level(logging.WARNING, "asyncio")
    origin = await stack.origin()
    await stack.agent("sb1")
    host = host_of((await stack.expose("sb1", origin.port, token=TOKEN))["exposedAt"])
    assert stack.edge is not None
    for _ in range(3):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            stack.edge.public_port,
            ssl=client_context(ca),
            server_hostname=host.split(":")[0],
        )
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(17), 10) == b"hello from origin"
        writer.close()  # close_notify, then FIN
        await writer.wait_closed()
    await wait_until(lambda: not stack.edge.public_connections, what="the connections closed")
    warnings = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not [w for w in warnings if "eof_received" in w], warnings
