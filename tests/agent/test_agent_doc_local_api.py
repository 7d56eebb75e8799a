"""docs/agent.md, 'Local HTTP API' and 'Security', against a real ``tunneld serve`` and a real
``tunnel-agent run`` (one of each for the module): ``--api-port 0`` picks a free port, written to
``TUNNEL_AGENT_PORTS_FILE``, on 127.0.0.1 only; exposing again keeps the URL unless another token
is given; unexposing is idempotent (an unknown port too, on the legacy endpoint as well); the list
is sorted by port; and without an edge, status says so and changes are 503 EDGE_NOT_CONNECTED.

The tests in tests/agent/test_local_api.py run the API over a fake controller; these check what
the agent and the edge do together."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Processes, preview_get, wait_for


@dataclass
class World:
    procs: Processes
    api: str  # the agent's local API base URL


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    procs = Processes(tmp_path_factory.mktemp("agent-doc-api"))
    try:
        procs.start_edge()
        _, api_port = procs.start_agent("sb1")
        api = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: _status(api).get("connected"), 15, "the agent to connect")
        yield World(procs, api)
    finally:
        procs.close()


def _status(api: str) -> dict[str, object]:
    r = httpx.get(f"{api}/v1/status", timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on TCP ``port`` (Linux: /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if width == 8 else socket.AF_INET6
                found.add(socket.inet_ntop(family, words))
    return found


def test_the_api_port_0_is_a_free_port_in_the_ports_file(world: World) -> None:
    """Flag table: '`--api-port` ... `0` picks a free port (written to TUNNEL_AGENT_PORTS_FILE)';
    Security: 'it listens on `127.0.0.1` only, by default'."""
    files = sorted(world.procs.tmp.glob("agent-*.json"))
    assert files, "the agent wrote no ports file"
    port = json.loads(files[0].read_text())["api"]
    assert world.api == f"http://127.0.0.1:{port}"
    assert port not in (0, 3000)
    assert _listening_addresses(port) == {"127.0.0.1"}
    assert _status(world.api) == {"sandboxId": "sb1", "connected": True}


def test_exposing_again_keeps_the_url_unless_another_token_is_given(world: World) -> None:
    """'Exposing again is idempotent (same token, same URL) unless a different `token` is
    given': then the URL carries the new token and the old one no longer routes."""
    with httpx.Client(base_url=world.api, timeout=10) as api:
        first = api.post("/v1/ports", json={"port": 8000, "name": "api"})
        assert first.status_code == 200, first.text
        url = first.json()["exposedAt"]
        again = api.post("/v1/ports", json={"port": 8000, "name": "api"})
        assert again.status_code == 200, again.text
        assert again.json() == first.json() == {"port": 8000, "exposedAt": url, "name": "api"}
        token = url.split("//", 1)[1].split(".", 1)[0].rsplit("-", 1)[1]
        same = api.post("/v1/ports", json={"port": 8000, "name": "api", "token": token})
        assert same.status_code == 200 and same.json()["exposedAt"] == url  # its own token
        other = api.post("/v1/ports", json={"port": 8000, "name": "api", "token": "other_1"})
        assert other.status_code == 200, other.text
        new_url = other.json()["exposedAt"]
        assert new_url != url and "-other_1." in new_url
        kept = api.post("/v1/ports", json={"port": 8000, "name": "api"})  # no token: kept
        assert kept.status_code == 200 and kept.json()["exposedAt"] == new_url
        listed = api.get("/v1/ports").json()["ports"]
        assert [p["exposedAt"] for p in listed if p["port"] == 8000] == [new_url]
    # the old URL is gone at the edge: 404, while the new one routes (to no service: 502)
    old = preview_get(world.procs, url)
    assert old.status_code == 404, old.text
    assert preview_get(world.procs, new_url).status_code == 502


def test_unexposing_is_idempotent_and_the_list_is_sorted_by_port(world: World) -> None:
    """'`DELETE /v1/ports/{port}` | 204 (idempotent)'; '`GET /v1/ports` ... sorted by port';
    legacy: 'unexposing an unknown port succeeds'."""
    with httpx.Client(base_url=world.api, timeout=10) as api:
        for port in (9001, 8001):  # exposed in reverse order
            r = api.post("/v1/ports", json={"port": port})
            assert r.status_code == 200, r.text
        ports = [p["port"] for p in api.get("/v1/ports").json()["ports"]]
        assert ports == sorted(ports) and {8001, 9001} <= set(ports)
        for _ in range(2):
            r = api.delete("/v1/ports/9001")
            assert (r.status_code, r.content) == (204, b"")
        r = api.delete("/v1/ports/12345")  # never exposed
        assert (r.status_code, r.content) == (204, b"")
        legacy = api.delete("/api/exposed-ports/12346?session=s")
        assert legacy.status_code == 200, legacy.text
        assert legacy.json()["success"] is True and legacy.json()["port"] == 12346
        ports = [p["port"] for p in api.get("/v1/ports").json()["ports"]]
        assert 9001 not in ports and 8001 in ports


def test_without_the_edge_status_says_so_and_changes_are_503_edge_not_connected(
    world: World,
) -> None:
    """'`GET /v1/status` | 200 {"sandboxId":"abc123","connected":true}' and '`EDGE_NOT_CONNECTED`
    | 503 | the agent has no connection to the edge right now': a second agent whose edge
    address has nothing listening."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    proc, api_port = world.procs.start_agent_at(f"127.0.0.1:{dead}", "sb2")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as api:
            assert api.get("/v1/status").json() == {"sandboxId": "sb2", "connected": False}
            for method, path, body in (
                ("POST", "/v1/ports", {"port": 8000}),
                ("DELETE", "/v1/ports/8000", None),
                ("GET", "/v1/ports", None),
            ):
                r = api.request(method, path, json=body)
                assert r.status_code == 503, (method, path, r.text)
                assert r.json()["code"] == "EDGE_NOT_CONNECTED", r.text
                assert r.json()["error"]
        assert proc.poll() is None  # still running, still retrying
    finally:
        world.procs.stop(proc)


def test_a_port_watch_probe_is_get_path_with_host_localhost_and_reads_the_status_line_only(
    world: World,
) -> None:
    """'Waiting for a port': 'an `http` probe sends `GET path` with `Host: localhost:PORT` and
    reads only the status line' (a service that sends nothing after it is ready all the same),
    to a port that is not exposed; the answer is '`200 text/event-stream` (`Cache-Control:
    no-cache`)', 'chunked, then the connection closes'."""
    heads: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(15)
        port = listener.getsockname()[1]

        def serve_one() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(15)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                heads.append(head)
                conn.sendall(b"HTTP/1.1 204 No Content\r\n")  # no headers, no end of head
                conn.recv(1)  # held open until the agent closes it

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        body = {"port": port, "mode": "http", "path": "/health", "timeout": 20_000}
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", f"{world.api}/api/port-watch", json=body) as r,
        ):
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["transfer-encoding"] == "chunked"
            assert r.headers["connection"] == "close"
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        thread.join(15)
    assert [json.loads(e[6:]) for e in events] == [
        {"type": "watching", "port": port},
        {"type": "ready", "port": port, "statusCode": 204},
    ]
    assert heads and heads[0].startswith(
        b"GET /health HTTP/1.1\r\nHost: localhost:%d\r\n" % port
    ), heads


def test_a_port_watch_field_not_in_the_table_is_refused_before_the_stream(world: World) -> None:
    """'Bad input is refused before the stream starts, in the legacy error shape ...; so is a
    field not in the table above (`Unknown field(s): statusmax.`)'."""
    body = {"port": 8000, "mode": "http", "statusmax": 200}  # statusMax, misspelt
    r = httpx.post(f"{world.api}/api/port-watch", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert (answer["code"], answer["httpStatus"]) == ("INVALID_REQUEST", 400)
    assert answer["message"] == "Unknown field(s): statusmax."
    known = {
        "port": 8000, "mode": "tcp", "path": "/", "statusMin": 200, "statusMax": 399,
        "interval": 500, "timeout": 100, "processId": "p1",
    }  # fmt: skip
    with httpx.stream("POST", f"{world.api}/api/port-watch", json=known, timeout=10) as ok:
        assert ok.status_code == 200  # every field of the table is taken
