"""Behaviour about processes: signals, restarts, the CLIs and the demo (real child processes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from websockets.sync.server import serve as sync_serve

from tunneld.client import TunnelClient

from .origin import OriginThread
from .procs import BIN, Processes, admin_client, is_connected, preview_get, wait_for

LOOPS = [pytest.param("asyncio", id="asyncio"), pytest.param("uvloop", id="uvloop")]


@pytest.fixture(params=LOOPS)
def procs(request, tmp_path):
    p = Processes(tmp_path, request.param)
    try:
        yield p
    finally:
        p.close()


_admin = admin_client
_get = preview_get
_wait = wait_for
_connected = is_connected


@pytest.fixture
def origin():
    o = OriginThread()
    try:
        yield o
    finally:
        o.close()


def test_expose_via_agent_cli_and_serve(procs: Processes, origin: OriginThread) -> None:
    procs.start_edge()
    _, api_port = procs.start_agent("sb1")
    api = f"http://127.0.0.1:{api_port}"
    cli = [str(BIN / "tunnel-agent")]
    _wait(
        lambda: subprocess.run([*cli, "status", "--api", api], capture_output=True).returncode == 0
    )
    out = subprocess.run(
        [*cli, "expose", str(origin.port), "--name", "web", "--api", api],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    url = out.stdout.decode().strip()
    assert url.startswith(f"http://{origin.port}-sb1-")
    r = _get(procs, url)
    assert r.status_code == 200 and r.content == b"hello from origin"
    listed = subprocess.run(
        [*cli, "ports", "--json", "--api", api], capture_output=True, timeout=30
    )
    assert json.loads(listed.stdout)[0]["exposedAt"] == url
    with _admin(procs) as admin:
        assert admin.get("/v1/sandboxes/sb1/ports").json()["ports"][0]["exposedAt"] == url
    bad = subprocess.run([*cli, "expose", "80", "--api", api], capture_output=True, timeout=30)
    assert bad.returncode == 2  # a usage error tunnel-agent knows itself (290cd24)
    assert b"80 is below 1024" in bad.stderr
    assert (
        subprocess.run([*cli, "unexpose", str(origin.port), "--api", api], timeout=30).returncode
        == 0
    )
    assert _get(procs, url).status_code == 404


def test_agent_restart_keeps_url(procs: Processes, origin: OriginThread) -> None:
    procs.start_edge()
    agent, _ = procs.start_agent("sb1")
    _wait(lambda: _connected(procs, "sb1"), what="agent connected")
    with _admin(procs) as admin:
        url = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port}).json()["exposedAt"]
    # started with --public-port 0: the URL carries the port actually bound
    assert url.endswith(f".localhost:{procs.ports['public']}/")
    assert _get(procs, url).status_code == 200
    agent.kill()  # no goodbye: the edge must not hold the sandbox hostage
    agent.wait(10)
    procs.start_agent("sb1")
    _wait(lambda: _get(procs, url).status_code == 200, what="URL served by the new agent")
    with _admin(procs) as admin:
        assert admin.get("/v1/sandboxes/sb1/ports").json()["ports"][0]["exposedAt"] == url


class Forwarder:
    """A loopback TCP forwarder whose target can change: the agent's fixed edge address while the
    edge behind it is replaced. The new edge listens on a port 0 of its own: no port number is
    ever closed and bound again (another process could take it in between)."""

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.closed = False
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                if self.target is None:
                    raise ConnectionRefusedError("no edge behind the forwarder")
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.thread.join(5)
        self.server.close()
        for sock in self.sockets:
            sock.close()


def test_agent_reconnects_after_edge_restart(tmp_path, origin: OriginThread) -> None:
    procs = Processes(tmp_path, "uvloop")
    forwarder = Forwarder(None)
    try:
        procs.start_edge()
        forwarder.target = procs.ports["agent"]
        agent, _ = procs.start_agent_at(f"127.0.0.1:{forwarder.port}", "sb1")
        _wait(lambda: _connected(procs, "sb1"), what="agent connected")
        with _admin(procs) as admin:
            r = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
            assert r.status_code == 200, r.text
        url = r.json()["exposedAt"]
        forwarder.target = None  # the edge is going away
        assert procs.stop(procs.edge) == 0
        # a new edge on a port of its own (same state directory); the agent's backoff finds it
        # through the forwarder, and the exposure (its token, so its URL) is still there
        procs.start_edge()
        forwarder.target = procs.ports["agent"]
        _wait(lambda: _connected(procs, "sb1"), timeout=30, what="agent reconnected")
        assert agent.poll() is None
        with _admin(procs) as admin:
            listed = admin.get("/v1/sandboxes/sb1/ports").json()["ports"]
        label = url.split("//", 1)[1].split(".", 1)[0]  # {port}-{sandbox}-{token}
        assert [p["exposedAt"].split("//", 1)[1].split(".", 1)[0] for p in listed] == [label]
        response = _get(procs, url)  # the old URL, sent to the new edge
        assert response.status_code == 200 and response.content == b"hello from origin"
    finally:
        procs.close()
        forwarder.close()


def test_sigterm_drains_in_flight_requests(procs: Processes, origin: OriginThread) -> None:
    procs.start_edge()
    procs.start_agent("sb1")
    _wait(lambda: _connected(procs, "sb1"), what="agent connected")
    with _admin(procs) as admin:
        url = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port}).json()["exposedAt"]
    host = url.split("//", 1)[1].split("/", 1)[0]
    lines: list[str] = []
    with httpx.Client(timeout=20) as client:
        with client.stream(
            "GET", f"http://127.0.0.1:{procs.ports['public']}/sse", headers={"host": host}
        ) as r:
            it = r.iter_lines()
            lines.append(next(it))
            procs.edge.send_signal(signal.SIGTERM)
            # no new connections once draining
            _wait(lambda: _refused(procs.ports["public"]), what="listener closed")
            origin.release_sse()
            lines.extend(line for line in it if line)
    assert lines == ["data: first", "data: second", "data: third"]
    assert procs.edge.wait(15) == 0
    log = procs.output(procs.edge)
    assert "SIGTERM: draining" in log and "stopped" in log


def test_sigterm_cuts_streams_when_the_grace_period_ends(
    procs: Processes, origin: OriginThread
) -> None:
    """A stream still open when the grace period ends is cut (an error, not a clean end), the
    edge exits 0, and the cut comes at the end of the grace period, not at the signal."""
    grace = 2.0
    procs.start_edge("--grace-period", str(grace))
    procs.start_agent("sb1")
    _wait(lambda: _connected(procs, "sb1"), what="agent connected")
    with _admin(procs) as admin:
        url = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port}).json()["exposedAt"]
    host = url.split("//", 1)[1].split("/", 1)[0]
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "GET", f"http://127.0.0.1:{procs.ports['public']}/sse", headers={"host": host}
        ) as r:
            it = r.iter_lines()
            assert next(it) == "data: first"
            signalled = time.monotonic()
            procs.edge.send_signal(signal.SIGTERM)
            # the origin never finishes this response: only the grace period can end it
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                for _ in it:
                    pass
            cut_after = time.monotonic() - signalled
    assert grace / 2 <= cut_after < grace + 10, cut_after
    assert procs.edge.wait(15) == 0
    assert "SIGTERM: draining" in procs.output(procs.edge)


def test_a_chatty_child_never_blocks_on_its_output(tmp_path) -> None:
    """Children log to a file: 4 MiB of output (far past a pipe's 64 KiB) cannot stall them."""
    procs = Processes(tmp_path)
    try:
        proc = procs._spawn(
            "chatty",
            [sys.executable, "-c", "import sys; sys.stdout.write('x' * (4 << 20))"],
            procs.env(),
        )
        assert proc.wait(30) == 0
        assert len(procs.output(proc)) == 4 << 20
    finally:
        procs.close()


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_systemd_notify_ready_and_stopping(procs: Processes, tmp_path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    try:
        procs.start_edge(
            env=procs.env(
                TUNNELD_ADMIN_TOKEN=procs.admin_token,
                TUNNELD_SECRET=procs.secret,
                NOTIFY_SOCKET=path,
            )
        )
        assert sock.recv(4096).startswith(b"READY=1")
        procs.edge.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert procs.edge.wait(15) == 0
    finally:
        sock.close()


def test_sighup_reloads_admin_token(procs: Processes, tmp_path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("first-token\n")
    procs.start_edge(
        env=procs.env(TUNNELD_ADMIN_TOKEN_FILE=str(token_file), TUNNELD_SECRET=procs.secret)
    )
    base = f"http://127.0.0.1:{procs.ports['admin']}"
    assert (
        httpx.get(
            f"{base}/v1/sandboxes", headers={"authorization": "Bearer first-token"}
        ).status_code
        == 200
    )
    token_file.write_text("second-token\n")
    procs.edge.send_signal(signal.SIGHUP)
    _wait(
        lambda: (
            httpx.get(
                f"{base}/v1/sandboxes", headers={"authorization": "Bearer second-token"}
            ).status_code
            == 200
        ),
        what="new token accepted",
    )
    assert (
        httpx.get(
            f"{base}/v1/sandboxes", headers={"authorization": "Bearer first-token"}
        ).status_code
        == 401
    )


def test_bad_config_is_a_clear_error(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    out = subprocess.run([str(BIN / "tunneld"), "serve"], env=env, capture_output=True, timeout=30)
    assert out.returncode == 2
    assert b"configuration error: no admin token" in out.stderr
    assert b"Traceback" not in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('domian = "x"\n')
    out = subprocess.run(
        [str(BIN / "tunneld"), "serve", "-c", str(bad)], env=env, capture_output=True, timeout=30
    )
    assert out.returncode == 2 and b"unknown setting 'domian'" in out.stderr


def test_agent_refuses_token_in_argv() -> None:
    out = subprocess.run(
        [
            str(BIN / "tunnel-agent"),
            "run",
            "--server",
            "127.0.0.1:1",
            "--sandbox-id",
            "x",
            "--token",
            "secret",
        ],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert b"secret" not in out.stderr


def test_demo_self_test() -> None:
    out = subprocess.run(
        [str(BIN / "tunneld"), "demo", "--self-test", "--public-port", "0", "--service-port", "0"],
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "preview URL:  http://" in text and "-demo-" in text
    assert "self-test: ok" in text


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sdk_on_both_backends_against_real_processes(procs: Processes, backend: str) -> None:
    import anyio

    procs.start_edge()
    procs.start_agent("sb1")
    _wait(lambda: _connected(procs, "sb1"), what="agent connected")

    def echo(ws) -> None:
        for message in ws:
            ws.send(message)

    with sync_serve(echo, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        echo_port = server.socket.getsockname()[1]

        async def main() -> None:
            async with TunnelClient(
                f"http://127.0.0.1:{procs.ports['admin']}", procs.admin_token
            ) as client:
                sandbox = client.sandbox("sb1")
                exposed = await sandbox.expose_port(8000, name="api")
                assert exposed.exposed_at.startswith("http://8000-sb1-")
                assert [p.port for p in await sandbox.get_exposed_ports()] == [8000]
                await sandbox.unexpose_port(8000)
                assert await sandbox.get_exposed_ports() == []
                async with await sandbox.ws_connect(echo_port, path="/x") as ws:
                    await ws.send("hi")
                    assert await ws.receive() == "hi"

        anyio.run(main, backend=backend)
        server.shutdown()


def test_agent_over_websocket_link(procs: Processes, origin: OriginThread) -> None:
    procs.start_edge()
    procs.start_agent("sb1", scheme="ws://")
    _wait(lambda: _connected(procs, "sb1"), what="agent connected over ws://")
    with _admin(procs) as admin:
        url = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port}).json()["exposedAt"]
    r = _get(procs, url, "/bytes?n=2000000")
    assert r.status_code == 200 and len(r.content) == 2_000_000
