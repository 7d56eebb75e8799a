"""Raw TCP to a sandbox port for orchestrators (issue 11): the admin endpoint
``GET /v1/sandboxes/{id}/ports/{port}/tcp`` (Upgrade: tcp) and ``tunneld port-forward``.

The first part drives the endpoint in process (a real EdgeServer and agent, raw sockets and the
SDK); the second runs ``tunneld``, ``tunnel-agent`` and ``tunneld port-forward`` as processes in
front of a real ``redis-server`` and of tests/e2e/tcpserver.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest
import trustme

from agent.core import AgentSession
from tests.cluster.conftest import RedisServer
from tunneld import admin
from tunneld.client import TunnelClient, TunnelError

from .conftest import Stack, wait_until
from .origin import pattern, pattern_sha256
from .procs import BIN, Processes, is_connected, wait_for
from .tcpserver import HashServer

IO_TIMEOUT = 30.0
MIB = 1 << 20


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def upgrade(stack: Stack, path: str, token: str | None = None, extra: bytes = b"") -> bytes:
    """Send a raw-TCP upgrade request to the admin API; return the response (an error page:
    complete at its Content-Length, or whatever came until the connection ended)."""
    assert stack.edge is not None
    token = stack.admin_token if token is None else token
    head = (
        f"GET {path} HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {token}\r\n".encode()
        + (extra or b"connection: upgrade\r\nupgrade: tcp\r\n")
        + b"\r\n"
    )
    with anyio.fail_after(IO_TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", stack.edge.admin_port) as conn:
            await conn.send(head)
            data = b""
            while True:
                try:
                    data += await conn.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return data
                head, sep, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head.lower())
                if sep and length is not None and len(body) >= int(length.group(1)):
                    return data


def json_body(response: bytes) -> dict:
    return orjson.loads(response.split(b"\r\n\r\n", 1)[1])


# -- the admin endpoint, in process ------------------------------------------------------------
@pytest.mark.anyio
async def test_bytes_both_ways_by_hash_and_half_close(
    stack: Stack, hash_server: HashServer
) -> None:
    """8 MiB up, the client half-closes, 8 MiB down after it: both checked by sha256."""
    await stack.agent("sb1")
    assert stack.edge is not None
    client = TunnelClient(f"http://127.0.0.1:{stack.edge.admin_port}", stack.admin_token)
    size = 8 * MIB
    async with await client.sandbox("sb1").open_tcp(hash_server.port) as tcp:
        with anyio.fail_after(IO_TIMEOUT):
            await tcp.send(b"hash %d\n" % size)
            for piece in pattern(size):
                await tcp.send(piece)
            await tcp.send_eof()  # half-close: the service reads EOF, then answers
            received = bytearray()
            while True:
                try:
                    received += await tcp.receive()
                except anyio.EndOfStream:
                    break
    line, _, rest = bytes(received).partition(b"\n")
    assert line.decode() == pattern_sha256(size)
    assert len(rest) == size
    assert hashlib.sha256(rest).hexdigest() == pattern_sha256(size, seed=2)
    assert hash_server.ends == ["eof"]


@pytest.mark.anyio
async def test_refused_port_is_a_502_page_not_a_101(stack: Stack) -> None:
    await stack.agent("sb1")
    port = free_port()
    response = await upgrade(stack, f"/v1/sandboxes/sb1/ports/{port}/tcp")
    assert response.startswith(b"HTTP/1.1 502 "), response
    assert b" 101 " not in response
    assert json_body(response)["code"] == "UPSTREAM_CONNECT_FAILED"


@pytest.mark.anyio
async def test_wrong_token_is_401(stack: Stack, hash_server: HashServer) -> None:
    await stack.agent("sb1")
    response = await upgrade(stack, f"/v1/sandboxes/sb1/ports/{hash_server.port}/tcp", "wrong")
    assert response.startswith(b"HTTP/1.1 401 "), response
    assert json_body(response)["code"] == "UNAUTHORIZED"


@pytest.mark.anyio
async def test_unknown_sandbox_is_404(stack: Stack, hash_server: HashServer) -> None:
    response = await upgrade(stack, f"/v1/sandboxes/nobody/ports/{hash_server.port}/tcp")
    assert response.startswith(b"HTTP/1.1 404 "), response
    assert json_body(response)["code"] == "SANDBOX_NOT_FOUND"


@pytest.mark.anyio
async def test_without_the_upgrade_headers_is_426(stack: Stack, hash_server: HashServer) -> None:
    await stack.agent("sb1")
    path = f"/v1/sandboxes/sb1/ports/{hash_server.port}/tcp"
    response = await upgrade(stack, path, extra=b"connection: close\r\n")
    assert response.startswith(b"HTTP/1.1 426 "), response
    assert json_body(response)["code"] == "UPGRADE_REQUIRED"
    assert hash_server.ends == []  # nothing was opened


@pytest.mark.anyio
async def test_sdk_raises_the_typed_errors(stack: Stack) -> None:
    await stack.agent("sb1")
    assert stack.edge is not None
    url = f"http://127.0.0.1:{stack.edge.admin_port}"
    with pytest.raises(TunnelError) as refused:
        await TunnelClient(url, stack.admin_token).sandbox("sb1").open_tcp(free_port())
    assert (refused.value.status, refused.value.code) == (502, "UPSTREAM_CONNECT_FAILED")
    with pytest.raises(TunnelError) as unauthorized:
        await TunnelClient(url, "wrong").sandbox("sb1").open_tcp(free_port())
    assert unauthorized.value.status == 401


@pytest.mark.anyio
async def test_the_port_needs_no_exposure_and_101_comes_after_the_connect(
    stack: Stack, hash_server: HashServer
) -> None:
    """The answer to the upgrade is a 101 with Upgrade: tcp; the port was never exposed."""
    await stack.agent("sb1")
    assert stack.edge is not None and stack.admin is not None
    assert (await stack.admin.get("/v1/sandboxes/sb1/ports")).json() == {"ports": []}
    head = (
        f"GET /v1/sandboxes/sb1/ports/{hash_server.port}/tcp HTTP/1.1\r\nhost: admin\r\n"
        f"authorization: Bearer {stack.admin_token}\r\nconnection: Upgrade\r\n"
        "upgrade: tcp\r\n\r\n"
    ).encode()
    with anyio.fail_after(IO_TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", stack.edge.admin_port) as conn:
            await conn.send(head)
            data = b""
            while b"\r\n\r\n" not in data:
                data += await conn.receive()
            status, _, rest = data.partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 101 "), status
            assert b"upgrade: tcp" in status.lower()
            assert rest == b""
            await conn.send(b"hash 5\n" + b"abc")
            await conn.send_eof()
            answer = rest
            while True:
                try:
                    answer += await conn.receive()
                except anyio.EndOfStream:
                    break
    assert answer == hashlib.sha256(b"abc").hexdigest().encode() + b"\n" + next(pattern(5, 2))


@pytest.mark.anyio
async def test_a_service_reset_reaches_the_client_as_a_reset(
    stack: Stack, hash_server: HashServer
) -> None:
    await stack.agent("sb1")
    assert stack.edge is not None
    client = TunnelClient(f"http://127.0.0.1:{stack.edge.admin_port}", stack.admin_token)
    async with await client.sandbox("sb1").open_tcp(hash_server.port) as tcp:
        with anyio.fail_after(IO_TIMEOUT):
            await tcp.send(b"rst %d\n" % MIB)
            with pytest.raises(anyio.BrokenResourceError):
                while True:
                    await tcp.receive()  # EndOfStream (a clean end) would fail the test
    # The service records its end after the close the client already saw (CI once looked
    # first): wait for the record, then check what it is.
    await wait_until(lambda: hash_server.ends, IO_TIMEOUT, "the service's record of its end")
    assert hash_server.ends == ["reset sent"]


@pytest.mark.anyio
async def test_a_sandbox_whose_agent_is_offline_is_503(
    stack: Stack, hash_server: HashServer
) -> None:
    await stack.expose("sb2", 8000)  # known (an exposure), never connected
    response = await upgrade(stack, f"/v1/sandboxes/sb2/ports/{hash_server.port}/tcp")
    assert response.startswith(b"HTTP/1.1 503 "), response
    assert json_body(response)["code"] == "SANDBOX_NOT_CONNECTED"


@pytest.mark.anyio
async def test_the_agents_own_api_port_is_a_502_port_not_allowed(stack: Stack) -> None:
    """The agent refuses its control API's port (a reset before any connect): a page, not a 101."""
    agent = await stack.agent("sb1")
    api = await agent.serve_local_api("127.0.0.1", 0)
    try:
        response = await upgrade(stack, f"/v1/sandboxes/sb1/ports/{api.port}/tcp")
    finally:
        await api.close()
    assert response.startswith(b"HTTP/1.1 502 "), response
    assert json_body(response)["code"] == "PORT_NOT_ALLOWED"


@pytest.mark.anyio
async def test_an_agent_that_never_connects_is_a_504(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer from the agent within TCP_CONNECT_TIMEOUT (shortened here): 504, no hang."""

    async def never(self: AgentSession, endpoint: object, port: int) -> None:
        await asyncio.sleep(3600)  # cancelled when the agent's session ends

    monkeypatch.setattr(AgentSession, "_dial", never)
    monkeypatch.setattr(admin, "TCP_CONNECT_TIMEOUT", 0.5)
    await stack.agent("sb1")
    response = await upgrade(stack, f"/v1/sandboxes/sb1/ports/{free_port()}/tcp")
    assert response.startswith(b"HTTP/1.1 504 "), response
    assert json_body(response)["code"] == "UPSTREAM_CONNECT_TIMEOUT"


# -- tunneld port-forward, as processes ---------------------------------------------------------
@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a TCP port: the service inside the sandbox."""
    server = RedisServer(tmp_path / "redis-sandbox", tcp=True).start()
    try:
        yield server
    finally:
        server.stop()


def start_port_forward(
    procs: Processes, sandbox: str, ports: str, **env: str
) -> tuple[subprocess.Popen[bytes], int]:
    """``tunneld port-forward`` as a process; returns it and the local port it printed."""
    environ = procs.env(
        TUNNELD_ADMIN_URL=f"http://127.0.0.1:{procs.ports['admin']}",
        TUNNELD_ADMIN_TOKEN=procs.admin_token,
    )
    environ.update(env)
    proc = procs._spawn(
        "port-forward", [str(BIN / "tunneld"), "port-forward", sandbox, ports], environ
    )

    def printed() -> int | None:
        match = re.search(r"Forwarding from 127\.0\.0\.1:(\d+) -> ", procs.output(proc))
        if match is None and proc.poll() is not None:
            raise AssertionError(f"port-forward exited: {procs.output(proc)}")
        return int(match.group(1)) if match else None

    return proc, wait_for(printed, what="port-forward's listening line")


def run_port_forward(procs: Processes, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = procs.env(
        TUNNELD_ADMIN_URL=f"http://127.0.0.1:{procs.ports['admin']}",
        TUNNELD_ADMIN_TOKEN=procs.admin_token,
    )
    environ.update(env)
    return subprocess.run(
        [str(BIN / "tunneld"), "port-forward", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT,
    )


def resp(*parts: bytes) -> bytes:
    """A Redis command in RESP (what redis-cli sends)."""
    out = b"*%d\r\n" % len(parts)
    for part in parts:
        out += b"$%d\r\n%s\r\n" % (len(part), part)
    return out


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(min(n - len(data), 1 << 20))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def recv_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = conn.recv(1)
        assert chunk, f"EOF in a line: {line!r}"
        line += chunk
    return line


def recv_all(conn: socket.socket) -> bytes:
    data = bytearray()
    while chunk := conn.recv(1 << 20):
        data += chunk
    return bytes(data)


def test_port_forward_to_a_real_redis(procs: Processes, redis: RedisServer) -> None:
    """redis-cli and raw RESP through port-forward: a binary value of 4 MiB goes in and comes
    back identical (sha256), and pipelined commands sent before a half-close are all answered."""
    procs.start_edge()
    procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    forward, local = start_port_forward(procs, "sb1", f"0:{redis.port}")

    cli = subprocess.run(
        ["redis-cli", "-p", str(local), "PING"], capture_output=True, timeout=IO_TIMEOUT
    )
    assert cli.stdout.strip() == b"PONG", cli

    value = b"".join(pattern(4 * MIB, seed=7)) + bytes(range(256))  # every byte value
    with socket.create_connection(("127.0.0.1", local), timeout=IO_TIMEOUT) as conn:
        conn.sendall(resp(b"SET", b"blob", value))
        assert recv_line(conn) == b"+OK\r\n"
        conn.sendall(resp(b"GET", b"blob"))
        assert recv_line(conn) == b"$%d\r\n" % len(value)
        got = recv_exactly(conn, len(value) + 2)
    assert hashlib.sha256(got[:-2]).hexdigest() == hashlib.sha256(value).hexdigest()

    # The same value as redis itself holds it (not an artefact of the tunnel both ways).
    direct = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "STRLEN", "blob"], capture_output=True, timeout=30
    )
    assert direct.stdout.strip() == str(len(value)).encode()

    with socket.create_connection(("127.0.0.1", local), timeout=IO_TIMEOUT) as conn:
        conn.sendall(resp(b"PING") * 100)
        conn.shutdown(socket.SHUT_WR)  # half-close: redis still answers what it read
        answers = recv_all(conn)
    assert answers == b"+PONG\r\n" * 100
    assert procs.stop(forward, signal.SIGINT) == 0
    log = procs.output(forward)
    assert "connection 1 from 127.0.0.1:" in log and ": closed (" in log


def test_port_forward_bytes_by_hash_and_half_close(
    procs: Processes, hash_server: HashServer
) -> None:
    """8 MiB each way through the process; the client's half-close reaches the service."""
    procs.start_edge()
    procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    _, local = start_port_forward(procs, "sb1", str(hash_server.port))
    size = 8 * MIB
    with socket.create_connection(("127.0.0.1", local), timeout=IO_TIMEOUT) as conn:
        conn.sendall(b"hash %d\n" % size)
        for piece in pattern(size):
            conn.sendall(piece)
        conn.shutdown(socket.SHUT_WR)
        received = recv_all(conn)  # ends with a clean EOF: the service closed normally
    line, _, rest = received.partition(b"\n")
    assert line.decode() == pattern_sha256(size)
    assert hashlib.sha256(rest).hexdigest() == pattern_sha256(size, seed=2)
    assert len(rest) == size


def test_port_forward_refused_port_resets_the_client(procs: Processes) -> None:
    procs.start_edge()
    procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    forward, local = start_port_forward(procs, "sb1", str(free_port()))
    with socket.create_connection(("127.0.0.1", local), timeout=IO_TIMEOUT) as conn:
        with pytest.raises(ConnectionResetError):
            recv_all(conn)
    wait_for(lambda: "UPSTREAM_CONNECT_FAILED" in procs.output(forward), what="the logged refusal")


def test_port_forward_agent_killed_mid_stream_is_a_reset(
    procs: Processes, hash_server: HashServer
) -> None:
    """The sandbox side dies in the middle of a stream: the local client sees RST, not EOF."""
    procs.start_edge()
    agent, _ = procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    forward, local = start_port_forward(procs, "sb1", str(hash_server.port))
    with socket.create_connection(("127.0.0.1", local), timeout=IO_TIMEOUT) as conn:
        conn.sendall(b"hold %d\n" % (16 * MIB))
        assert len(recv_exactly(conn, MIB)) == MIB  # the stream is flowing
        agent.kill()
        agent.wait(IO_TIMEOUT)
        with pytest.raises(ConnectionResetError):
            recv_all(conn)  # a clean EOF (b"") would end without raising
    wait_for(
        lambda: "reset both ways" in procs.output(forward),
        what=f"the logged reset: {procs.output(forward)}",
    )


def test_port_forward_sigterm_stops_cleanly(procs: Processes, hash_server: HashServer) -> None:
    procs.start_edge()
    procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    forward, local = start_port_forward(procs, "sb1", f"0:{hash_server.port}")
    assert procs.stop(forward, signal.SIGTERM) == 0
    log = procs.output(forward)
    assert "SIGTERM: stopping" in log and "stopped after 0 connection(s)" in log
    assert "Traceback" not in log
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", local), timeout=IO_TIMEOUT)


def test_port_forward_reads_the_token_from_a_file(
    procs: Processes, hash_server: HashServer, tmp_path: Path
) -> None:
    procs.start_edge()
    procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    token_file = tmp_path / "admin-token"
    token_file.write_text(procs.admin_token + "\n")
    _, local = start_port_forward(
        procs, "sb1", str(hash_server.port), TUNNELD_ADMIN_TOKEN="",
        TUNNELD_ADMIN_TOKEN_FILE=str(token_file),
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", local), timeout=IO_TIMEOUT) as conn:
        conn.sendall(b"hash 3\nxyz")
        conn.shutdown(socket.SHUT_WR)
        answer = recv_all(conn)
    assert answer == hashlib.sha256(b"xyz").hexdigest().encode() + b"\n" + next(pattern(3, 2))


def test_port_forward_errors_exit_with_a_message(procs: Processes) -> None:
    procs.start_edge()
    procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    wrong = run_port_forward(procs, "sb1", "6379", TUNNELD_ADMIN_TOKEN="wrong")
    assert wrong.returncode == 1 and "refused the admin token (401)" in wrong.stderr
    unknown = run_port_forward(procs, "nobody", "6379")
    assert unknown.returncode == 1 and "SANDBOX_NOT_FOUND" in unknown.stderr
    bad_port = run_port_forward(procs, "sb1", "80")
    assert bad_port.returncode == 2 and "Invalid port number: 80" in bad_port.stderr
    bad_local = run_port_forward(procs, "sb1", "x:6379")
    assert bad_local.returncode == 2 and "LOCAL must be a port number" in bad_local.stderr
    no_token = run_port_forward(procs, "sb1", "6379", TUNNELD_ADMIN_TOKEN="")
    assert no_token.returncode == 2 and "no admin token" in no_token.stderr
    bad_url = run_port_forward(procs, "sb1", "6379", TUNNELD_ADMIN_URL="ftp://x")
    assert bad_url.returncode == 2 and "invalid admin URL 'ftp://x'" in bad_url.stderr
    unreachable = run_port_forward(
        procs, "sb1", "6379", TUNNELD_ADMIN_URL=f"http://127.0.0.1:{free_port()}"
    )
    assert unreachable.returncode == 1 and "Cannot reach tunneld" in unreachable.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run_port_forward(procs, "sb1", f"{taken.getsockname()[1]}:6379")
    assert busy.returncode == 1 and "cannot listen on 127.0.0.1:" in busy.stderr
    for result in (wrong, unknown, bad_port, bad_local, no_token, bad_url, unreachable, busy):
        assert "Traceback" not in result.stderr


def test_port_forward_over_an_https_admin_api(
    procs: Processes, redis: RedisServer, tmp_path: Path
) -> None:
    """--admin-url https://... with --cacert: the admin API's certificate is verified."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = (
        tmp_path / "admin.pem",
        tmp_path / "admin.key",
        tmp_path / "ca.pem",
    )
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    procs.start_edge("--admin-tls-cert", str(cert_file), "--admin-tls-key", str(key_file))
    procs.start_agent("sb1")
    https = f"https://127.0.0.1:{procs.ports['admin']}"
    unverified = run_port_forward(procs, "sb1", "6379", TUNNELD_ADMIN_URL=https)
    assert unverified.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in unverified.stderr
    proc = procs._spawn(
        "port-forward",
        [str(BIN / "tunneld"), "port-forward", "sb1", str(redis.port), "--cacert", str(ca_file),
         "--admin-url", https],
        procs.env(TUNNELD_ADMIN_TOKEN=procs.admin_token),
    )  # fmt: skip
    match = wait_for(
        lambda: re.search(r"Forwarding from 127\.0\.0\.1:(\d+) -> ", procs.output(proc)),
        what=f"port-forward's listening line: {procs.output(proc)}",
    )
    cli = subprocess.run(
        ["redis-cli", "-p", match.group(1), "PING"], capture_output=True, timeout=IO_TIMEOUT
    )
    assert cli.stdout.strip() == b"PONG", cli
    wait_for(lambda: "TLS to tunneld has no half-close" in procs.output(proc), what="the close")
