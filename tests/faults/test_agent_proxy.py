"""The agent reaches the edge through a real HTTP proxy (issue 10: egress through an HTTP proxy).

The proxy is Debian's tinyproxy, a real process started per test with its own config (``make
unit`` installs it: the Makefile's ensure-tinyproxy). tinyproxy cannot listen on port 0, so the
fixture picks a random port below the kernel's ephemeral range (where no port-0 bind of another
test lands) and tries another one if tinyproxy reports it could not listen. Its log (LogLevel
Info) records every CONNECT it was asked for, which is how a test tells a proxied connection
from a direct one, besides the agent socket's peer address.

Edges and agents run in the test's process (real ``EdgeServer``, real sockets on 127.0.0.1); one
test runs ``tunnel-agent run`` as a process with the proxy in its environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent import cli
from agent.core import Agent, AgentConfig, EdgeAddress
from agent.proxy import ProxyURL
from tests.e2e.origin import OriginThread
from tests.e2e.procs import BIN, Processes, admin_client, is_connected, preview_get, wait_for
from tunneld.auth import agent_token

from .conftest import Stack, tls_files

LOG = "tunnel.agent"
USER, PASSWORD = "alice", "s3cret-Pw"
PROXY_VARS = (
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "TUNNEL_AGENT_PROXY",
)


def _tinyproxy_binary() -> str:
    found = shutil.which("tinyproxy") or (
        "/usr/bin/tinyproxy" if os.access("/usr/bin/tinyproxy", os.X_OK) else None
    )
    if found is None:
        pytest.fail(
            "tinyproxy is missing: `make unit` installs it (apt-get install tinyproxy) for "
            "tests/faults/test_agent_proxy.py"
        )
    return found


def _free_port_candidates() -> Iterator[int]:
    """Random ports below the ephemeral range: port-0 binds (every other test) never get them."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    while True:
        yield rng.randrange(max(1025, low - 12000), low)


class Tinyproxy:
    """A tinyproxy process on 127.0.0.1 allowing CONNECT to ``connect_ports`` only."""

    def __init__(self, tmp: Path, connect_ports: list[int], auth: tuple[str, str] | None) -> None:
        self.tmp = tmp
        self.connect_ports = connect_ports
        self.auth = auth
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "tinyproxy.log"
        self.output = tmp / "tinyproxy.out"

    def _config(self, port: int) -> str:
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Timeout 600",
            f'LogFile "{self.log}"',
            "LogLevel Info",  # Connect lists the CONNECTs; Info adds "Accepting connections"
            "MaxClients 50",
            "Allow 127.0.0.1",
            *(f"ConnectPort {p}" for p in self.connect_ports),
        ]
        if self.auth is not None:
            lines.append(f"BasicAuth {self.auth[0]} {self.auth[1]}")
        return "\n".join(lines) + "\n"

    def start(self) -> Tinyproxy:
        binary = _tinyproxy_binary()
        ports = _free_port_candidates()
        for _ in range(20):
            port = next(ports)
            conf = self.tmp / "tinyproxy.conf"
            conf.write_text(self._config(port))
            self.log.write_text("")
            with self.output.open("wb") as out:
                proc = subprocess.Popen(
                    [binary, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if "Accepting connections" in self.log.read_text(errors="replace"):
                    self.proc, self.port = proc, port
                    return self
                if proc.poll() is not None:
                    break
                time.sleep(0.02)
            else:
                proc.kill()
                proc.wait(10)
                raise AssertionError(f"tinyproxy did not start within 10 s: {self.logs()}")
            said = self.output.read_text(errors="replace")
            if "Could not create listening sockets" not in said:
                raise AssertionError(f"tinyproxy exited {proc.returncode}: {said}{self.logs()}")
            # The port was taken: try another one.
        raise AssertionError("tinyproxy found no free port in 20 tries")

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def connects(self) -> list[str]:
        """The CONNECT targets tinyproxy was asked for, in order."""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+)", self.logs())

    def url(self, host: str = "127.0.0.1", auth: tuple[str, str] | None = None) -> str:
        userinfo = f"{auth[0]}:{auth[1]}@" if auth is not None else ""
        return f"http://{userinfo}{host}:{self.port}"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Callable[..., Tinyproxy]]:
    """``tinyproxy(connect_ports, auth=None)``: a started proxy, stopped after the test."""
    started: list[Tinyproxy] = []

    def make(connect_ports: list[int], auth: tuple[str, str] | None = None) -> Tinyproxy:
        where = tmp_path / f"tinyproxy-{len(started)}"
        where.mkdir()
        proxy = Tinyproxy(where, connect_ports, auth)
        started.append(proxy)
        return proxy.start()

    try:
        yield make
    finally:
        for proxy in started:
            proxy.close()


@pytest.fixture
def agent_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOG)
    return caplog


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG]


async def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        yield agent
    finally:
        await agent.stop()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def agent_for(stack: Stack, edge: EdgeAddress, sandbox: str = "sb1", **options: Any) -> Agent:
    token = agent_token(stack.secret, sandbox)
    return Agent(AgentConfig(edge.host, edge.port, sandbox, token, servers=(edge,), **options))


def peer_port(agent: Agent) -> int:
    """The port the agent's link socket is connected to: the proxy's, or the edge's if direct."""
    assert agent.session is not None and agent.session.transport is not None
    return int(agent.session.transport.get_extra_info("peername")[1])


async def preview_status(stack: Stack, sandbox: str) -> tuple[int, bytes]:
    origin = await stack.origin()
    exposed = await stack.expose(sandbox, origin.port)
    async with stack.client(exposed["exposedAt"]) as client:
        r = await client.get("/")
    return r.status_code, r.content


# -- through the proxy -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("link", ["tcp", "tls", "ws", "wss"])
async def test_the_agent_reaches_the_edge_through_the_proxy_and_serves_a_preview(
    link: str,
    tmp_path: Path,
    tinyproxy: Callable[..., Tinyproxy],
    agent_log: pytest.LogCaptureFixture,
) -> None:
    secure = link in ("tls", "wss")
    options: dict[str, Any] = {}
    if secure:
        ca, cert, key = tls_files(tmp_path, "127.0.0.1")  # the IP only, not ``localhost``
        stack = await Stack(tls_cert=cert, tls_key=key).start()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        options["tls"] = context
    else:
        stack = await Stack().start()
    try:
        assert stack.edge is not None
        port = stack.edge.agent_port
        proxy = tinyproxy([port])
        # The proxy is named "localhost" and the edge "127.0.0.1", whose name alone the
        # certificate carries: TLS must check the edge's name, not the proxy's.
        via = ProxyURL("localhost", proxy.port)
        edge = EdgeAddress(
            "127.0.0.1", port, tls=secure, websocket=link in ("ws", "wss"), proxy=via
        )
        async with running(agent_for(stack, edge, **options)) as agent:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            assert peer_port(agent) == proxy.port  # the link socket goes to the proxy
            session = stack.edge.registry.get("sb1").session
            assert session is not None and session.transport is not None
            assert (session.transport.get_extra_info("ssl_object") is not None) is secure
            assert await preview_status(stack, "sb1") == (200, b"hello from origin")
    finally:
        await stack.close()
    assert proxy.connects() == [f"127.0.0.1:{port}"]
    logged = messages(agent_log)
    label = f"edge 127.0.0.1:{port} via proxy localhost:{proxy.port}"
    assert f"connecting to {label}" in logged
    assert any(m.startswith(f"connected to {label} as sandbox sb1") for m in logged), logged


@pytest.mark.anyio
async def test_proxy_credentials_open_the_tunnel_and_never_reach_the_log(
    stack: Stack, tinyproxy: Callable[..., Tinyproxy], agent_log: pytest.LogCaptureFixture
) -> None:
    assert stack.edge is not None
    port = stack.edge.agent_port
    proxy = tinyproxy([port], auth=(USER, PASSWORD))
    via = ProxyURL("127.0.0.1", proxy.port, USER, PASSWORD)
    async with running(agent_for(stack, EdgeAddress("127.0.0.1", port, proxy=via))) as agent:
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        assert peer_port(agent) == proxy.port
        assert await preview_status(stack, "sb1") == (200, b"hello from origin")
    text = "\n".join(f"{r.getMessage()} {r.args!r}" for r in agent_log.records)
    assert f"via proxy 127.0.0.1:{proxy.port}" in text
    assert PASSWORD not in text and USER not in text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("credentials", "expected"),
    [
        (None, "requires authentication (HTTP/1.0 407 Proxy Authentication Required)"),
        ((USER, "wrong-pw"), "proxy authentication failed at proxy 127.0.0.1:"),
    ],
    ids=["missing", "wrong"],
)
async def test_refused_proxy_credentials_are_logged_clearly_and_retried_with_backoff(
    credentials: tuple[str, str] | None,
    expected: str,
    stack: Stack,
    tinyproxy: Callable[..., Tinyproxy],
    agent_log: pytest.LogCaptureFixture,
) -> None:
    assert stack.edge is not None
    port = stack.edge.agent_port
    proxy = tinyproxy([port], auth=(USER, PASSWORD))
    user, password = credentials or (None, None)
    via = ProxyURL("127.0.0.1", proxy.port, user, password)
    label = f"edge 127.0.0.1:{port} via proxy 127.0.0.1:{proxy.port}"

    def failures() -> list[str]:
        return [m for m in messages(agent_log) if m.startswith(f"cannot connect to {label}: ")]

    async with running(agent_for(stack, EdgeAddress("127.0.0.1", port, proxy=via))) as agent:
        await wait_until(lambda: len(failures()) >= 3, 15, "three refused attempts")
        assert not agent.connected
    assert stack.edge.registry.get("sb1") is None or stack.edge.registry.get("sb1").session is None
    for line in failures()[:3]:
        assert expected in line, line
        assert re.search(r"; retrying in [0-9.]+ s$", line), line
    # Backoff as for any failed connect: ~0.1 s, then doubling (jitter: half to all of it).
    delays = [float(re.findall(r"retrying in ([0-9.]+) s$", m)[0]) for m in failures()[:3]]
    for n, delay in enumerate(delays):
        assert 0.1 * 2**n / 2 - 0.05 <= delay <= 0.1 * 2**n + 0.05, delays
    assert all(r.exc_info is None for r in agent_log.records), "a traceback was logged"
    text = "\n".join(r.getMessage() for r in agent_log.records)
    assert "wrong-pw" not in text and PASSWORD not in text


@pytest.mark.anyio
async def test_a_proxy_that_refuses_the_edge_port_is_a_clear_failed_attempt(
    stack: Stack, tinyproxy: Callable[..., Tinyproxy], agent_log: pytest.LogCaptureFixture
) -> None:
    assert stack.edge is not None
    port = stack.edge.agent_port
    proxy = tinyproxy([stack.edge.public_port])  # CONNECT allowed to another port only
    via = ProxyURL("127.0.0.1", proxy.port)
    expected = (
        f"cannot connect to edge 127.0.0.1:{port} via proxy 127.0.0.1:{proxy.port}: proxy "
        f"127.0.0.1:{proxy.port} refused CONNECT to 127.0.0.1:{port}: "
        "HTTP/1.1 403 Access violation; retrying in "
    )
    async with running(agent_for(stack, EdgeAddress("127.0.0.1", port, proxy=via))) as agent:
        await wait_until(
            lambda: sum(m.startswith(expected) for m in messages(agent_log)) >= 2,
            15,
            "two refused CONNECTs",
        )
        assert not agent.connected
    assert proxy.connects()[:2] == [f"127.0.0.1:{port}"] * 2
    assert all(r.exc_info is None for r in agent_log.records)


@pytest.mark.anyio
async def test_an_unreachable_proxy_fails_over_to_the_next_edge(
    stack: Stack, agent_log: pytest.LogCaptureFixture
) -> None:
    """A proxy that refuses the TCP connect is a failed attempt of that address, nothing more."""
    assert stack.edge is not None
    port = stack.edge.agent_port
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    try:
        via = ProxyURL("127.0.0.1", closed.getsockname()[1])
        servers = (EdgeAddress("127.0.0.1", port, proxy=via), EdgeAddress("127.0.0.1", port))
        token = agent_token(stack.secret, "sb1")
        config = AgentConfig("127.0.0.1", port, "sb1", token, servers=servers)
        async with running(Agent(config)) as agent:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            assert peer_port(agent) == port
    finally:
        closed.close()
    logged = messages(agent_log)
    assert any(
        m.startswith(f"cannot connect to edge 127.0.0.1:{port} (1 of 2) via proxy 127.0.0.1:")
        and ": cannot connect to proxy 127.0.0.1:" in m
        and "ConnectionRefusedError" in m
        for m in logged
    ), logged
    assert not any("retrying in" in m for m in logged), logged


# -- choosing the proxy from the environment -------------------------------------------------------


@pytest.mark.anyio
async def test_no_proxy_sends_the_agent_straight_to_the_edge(
    stack: Stack, tinyproxy: Callable[..., Tinyproxy], agent_log: pytest.LogCaptureFixture
) -> None:
    """With NO_PROXY matching, the proxy sees nothing; without it, the same setup goes through it
    (so the proxy's log is shown to record the agent's CONNECT)."""
    assert stack.edge is not None
    port = stack.edge.agent_port
    proxy = tinyproxy([port])

    def config_from_environment(sandbox: str, **env: str) -> AgentConfig:
        args = cli.build_parser().parse_args(
            ["run", "--server", f"127.0.0.1:{port}", "--sandbox-id", sandbox]
        )
        args.token = agent_token(stack.secret, sandbox)
        return cli.agent_config(args, {"HTTP_PROXY": proxy.url(), **env})

    direct = config_from_environment("sb1", NO_PROXY="localhost,127.0.0.1")
    assert direct.servers[0].proxy is None
    async with running(Agent(direct)) as agent:
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        assert peer_port(agent) == port
        assert await preview_status(stack, "sb1") == (200, b"hello from origin")
    assert proxy.connects() == []

    proxied = config_from_environment("sb2", NO_PROXY="example.com")
    assert proxied.servers[0].proxy == ProxyURL("127.0.0.1", proxy.port)
    async with running(Agent(proxied)) as agent:
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        assert peer_port(agent) == proxy.port
    assert proxy.connects() == [f"127.0.0.1:{port}"]


# -- a real agent process ----------------------------------------------------------------------


def test_the_agent_process_takes_the_proxy_from_its_environment(
    tmp_path: Path, tinyproxy: Callable[..., Tinyproxy]
) -> None:
    procs = Processes(tmp_path, "uvloop")
    service = OriginThread()  # the sandbox's service
    try:
        ports = procs.start_edge()
        proxy = tinyproxy([ports["agent"]], auth=(USER, PASSWORD))
        env = {k: v for k, v in procs.env().items() if k not in PROXY_VARS}
        env.update(
            TUNNEL_AGENT_TOKEN=procs.token("sb1"),
            HTTP_PROXY=proxy.url(auth=(USER, PASSWORD)),
            HTTPS_PROXY="http://unused.invalid:1",
        )
        server = f"ws://127.0.0.1:{ports['agent']}"
        argv = [str(BIN / "tunnel-agent"), "run", "--server", server, "--sandbox-id", "sb1"]
        agent = procs._spawn("agent", [*argv, "--api-port", "0"], env)
        wait_for(lambda: is_connected(procs, "sb1"), 15, "the agent connected via the proxy")
        with admin_client(procs) as admin:
            r = admin.post("/v1/sandboxes/sb1/ports", json={"port": service.port})
            assert r.status_code == 200, r.text
            url = r.json()["exposedAt"]
        answer = preview_get(procs, url)
        assert (answer.status_code, answer.content) == (200, b"hello from origin")
        assert procs.stop(agent) == 0
    finally:
        procs.close()
        service.close()
    out = procs.output(agent)
    edge = f"127.0.0.1:{ports['agent']}"
    assert f"edge {edge}: via proxy 127.0.0.1:{proxy.port} (from HTTP_PROXY)" in out, out
    assert f"connecting to edge {edge} via proxy 127.0.0.1:{proxy.port}" in out, out
    assert PASSWORD not in out and USER not in out
    assert proxy.connects() == [edge]
