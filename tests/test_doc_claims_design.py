"""docs/design.md's claims: "Changes from the plan" and the plan's own statements, each checked
against the code (constants, validators, parsers, the systemd unit, pyproject) or, for what the
edge answers, against a real in-process edge (tests/e2e/conftest.py's Stack)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import tomllib
from pathlib import Path

import anyio
import httpx
import pytest

from agent import core as agent_core
from protocol import control, frames, hostnames
from relay import buffers
from tests.e2e.conftest import Stack
from tests.e2e.conftest import no_unhandled_errors as no_unhandled_errors  # autouse there
from tests.test_doc_claims_readme import check_links
from tunneld import auth
from tunneld.config import Config, check_store

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "design.md").read_text()


def test_every_link_of_design_md_resolves() -> None:
    assert check_links(ROOT / "docs" / "design.md") >= 1


def test_the_wire_format_is_the_one_described() -> None:
    """'The byte stream starts with a preface (TUNL\\r\\n\\x01\\n) and the 12-byte frame header
    carries a version byte'; 'type, flags SYN/ACK/FIN/RST, stream id u32, length u32'; 'Types:
    DATA, WINDOW_UPDATE, PING, GO_AWAY, CONTROL'."""
    assert "(`TUNL\\r\\n\\x01\\n`)" in DOC
    assert frames.PREFACE == b"TUNL\r\n\x01\n"
    assert frames.HEADER_SIZE == 12 and frames.HEADER.format == ">BBHII"  # version, type, ...
    header = frames.encode_frame(frames.FrameType.PING)
    assert len(header) == 12 and header[0] == frames.VERSION
    assert [t.name for t in frames.FrameType] == [
        "DATA", "WINDOW_UPDATE", "PING", "GO_AWAY", "CONTROL",
    ]  # fmt: skip
    assert [f.name for f in frames.Flag] == ["SYN", "ACK", "FIN", "RST"]


def test_flow_control_keepalive_and_backoff_numbers() -> None:
    """'Start >= 256 KiB per stream and grow toward >= 4 MiB'; 'PING every ~10 s, a dead link is
    declared after ~15 s'; 'jittered exponential backoff (first retry fast, cap ~20 s)'; 'One
    shared 256 KiB read buffer'; 'preallocated buffers (64-256 KiB)'."""
    assert frames.INITIAL_STREAM_WINDOW >= 256 * 1024
    assert frames.DEFAULT_MAX_STREAM_WINDOW >= 4 * 1024 * 1024
    assert (frames.HEARTBEAT_INTERVAL, frames.DEAD_TIMEOUT) == (10.0, 15.0)
    assert agent_core.BACKOFF_FIRST <= 0.5 and agent_core.BACKOFF_CAP == 20.0
    assert buffers.READ_SIZE == 256 * 1024


def test_hello_and_welcome_carry_the_described_fields() -> None:
    """'agent sends hello {sandbox_id, token, version}; edge replies welcome {session,
    heartbeat_s, limits, exposures}'."""
    assert "`hello {sandbox_id, token, version}`" in DOC
    assert "`welcome {session, heartbeat_s, limits, exposures}`" in DOC
    assert list(control._SCHEMAS["hello"][1]) == ["sandbox_id", "token", "version"]
    assert list(control._SCHEMAS["welcome"][1]) == ["session", "heartbeat_s", "limits", "exposures"]


def test_agent_tokens_are_hmac_sha256_of_the_sandbox_id() -> None:
    """'Agent tokens are HMAC-SHA256(secret, context + sandbox id)'; 'the edge stores no
    per-sandbox secret' (the token is recomputed from the secret)."""
    assert "HMAC-SHA256(secret, `tunneld agent token v1\\0` + sandbox id)" in DOC
    mac = hmac.new(b"s3cret", b"tunneld agent token v1\x00sb1", hashlib.sha256).digest()
    assert auth.agent_token("s3cret", "sb1") == base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_preview_host_rules() -> None:
    """'Host = {port}-{sandbox_id}-{token}.{domain}' ('{port}-{sandbox_id}.{domain}' without
    tokens); lowercase, strip :port, port 4-5 digits (no leading zero) before the first -, token
    after the last -, sandbox id between (may contain -); ids 1-63 of [a-z0-9-], no leading or
    trailing -, reserved ids refused; auto tokens 16 of [a-z0-9]; constant-time compare."""
    parse = hostnames.parse_preview_host
    route = parse("8000-My-Sand-Box-Tok_1.LOCALHOST:8080", "localhost")
    assert route == hostnames.PreviewRoute(8000, "my-sand-box", "tok_1")
    assert parse("8000-abc123.localhost", "localhost", tokens=False) == hostnames.PreviewRoute(
        8000, "abc123", None
    )
    assert parse("08000-abc-tok.localhost", "localhost") is None  # leading zero
    assert parse("800-abc-tok.localhost", "localhost") is None  # 3 digits
    assert parse("800000-abc-tok.localhost", "localhost") is None  # 6 digits
    assert parse("8000-abc-" + "t" * 64 + ".localhost", "localhost") is None
    assert parse("8000-abc-" + "t" * 54 + ".localhost", "localhost") is not None  # label 63
    assert parse("8000-abc-" + "t" * 55 + ".localhost", "localhost") is None  # label 64
    assert parse("8000-" + "a" * 56 + "-t.localhost", "localhost") is not None  # label 63
    assert parse("8000-" + "a" * 57 + "-t.localhost", "localhost") is None  # label 64
    with pytest.raises(hostnames.ValidationError) as too_long:
        hostnames.check_preview_host_length(10000, "a" * 41, "t" * 16, "localhost")
    assert too_long.value.code == "PREVIEW_HOST_TOO_LONG"
    hostnames.check_preview_host_length(10000, "a" * 40, "t" * 16, "localhost")
    for bad in ("-abc", "abc-", "a" * 64, "", "ab_c"):
        with pytest.raises(hostnames.ValidationError):
            hostnames.validate_sandbox_id(bad)
    assert hostnames.validate_sandbox_id("a" * 63) == "a" * 63
    assert {"www", "api", "admin"} <= hostnames.RESERVED_SANDBOX_IDS
    for reserved in ("www", "api", "admin"):
        with pytest.raises(hostnames.ValidationError) as caught:
            hostnames.validate_sandbox_id(reserved)
        assert caught.value.code == "RESERVED_SANDBOX_ID"
    tokens = {hostnames.generate_token() for _ in range(200)}
    assert all(re.fullmatch("[a-z0-9]{16}", t) for t in tokens) and len(tokens) == 200
    assert "compare_digest" in Path(hostnames.__file__).read_text().split("def tokens_equal")[1]


def test_ports_and_custom_tokens_are_validated_as_described() -> None:
    """'port is an int 1024-65535, not 3000'; 'a custom token is 1-16 of [a-z0-9_]'; the exact
    INVALID_PORT message."""
    for port in (1024, 65535, 8000):
        assert hostnames.validate_port(port) == port
    for port in (1023, 65536, 3000, 80, "8000", 8000.0, True):
        with pytest.raises(hostnames.ValidationError):
            hostnames.validate_port(port)
    with pytest.raises(hostnames.ValidationError) as caught:
        hostnames.validate_port(80)
    assert str(caught.value) == (
        "Invalid port number: 80. Must be 1024-65535, excluding 3000 (sandbox control plane)."
    )
    assert caught.value.code == "INVALID_PORT"
    assert hostnames.validate_custom_token("a" * 16) == "a" * 16
    assert hostnames.validate_custom_token("my_token") == "my_token"
    for bad in ("", "a" * 17, "Abc", "a-b"):
        with pytest.raises(hostnames.ValidationError):
            hostnames.validate_custom_token(bad)


def test_local_defaults_and_the_token_switch() -> None:
    """'Local default: domain localhost, scheme http, public port 8080'; 'Token-less mode is one
    edge-wide switch (tokens = false)'; 'tunneld serve (...; a SQLite store by default)'."""
    config = Config()
    assert (config.domain, config.scheme, config.public_port) == ("localhost", "http", 8080)
    assert config.tokens is True
    assert config.store == "sqlite"
    assert check_store("memory") == "memory"  # 'store = "memory" keeps the in-memory registry'


def test_dependencies_are_the_ones_listed() -> None:
    """'Dependencies and why': runtime and test dependencies in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[<>=;\[ ]", d)[0] for d in project["dependencies"]}
    assert runtime == {
        "uvloop", "h11", "httptools", "wsproto", "h2", "anyio", "orjson", "prometheus-client",
        "redis",
    }  # fmt: skip
    test = {re.split(r"[<>=;\[ ]", d)[0] for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "pytest-benchmark", "hypothesis", "httpx", "websockets"} <= test
    plan = DOC.split("## Dependencies and why")[1].split("##")[0]
    changes = DOC.split("## Changes from the plan")[1].split("\n## ")[0]
    for name in runtime:
        assert name in plan or f"** {name} (" in changes or f" and {name} (" in changes, name


def test_systemd_notify_and_reload_as_described() -> None:
    """'systemd: Type=notify (READY=1, WATCHDOG=1, STOPPING=1 over $NOTIFY_SOCKET), ... SIGHUP
    reloads config' (the behaviour is tests/e2e/test_processes.py's)."""
    unit = (ROOT / "deploy" / "tunneld.service").read_text()
    assert re.search(r"^Type=notify$", unit, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", unit, re.M)
    cli = (ROOT / "tunneld" / "cli.py").read_text()
    for message in ("READY=1", "WATCHDOG=1", "STOPPING=1"):
        assert f'notify("{message}' in cli
    assert "NOTIFY_SOCKET" in (ROOT / "tunneld" / "systemd.py").read_text()


def test_the_not_built_yet_line_is_gone_and_the_store_is_described() -> None:
    """The store and scale-out exist (tests/store/, tests/cluster/): the changes list says so
    rather than 'Not built yet'."""
    changes = DOC.split("## Changes from the plan")[1].split("\n## ")[0]
    assert "Not built yet" not in changes
    assert "persistent store" in changes and "--workers" in changes
    assert (ROOT / "tests" / "store" / "test_sqlite.py").exists()
    assert (ROOT / "tests" / "cluster" / "test_workers.py").exists()


# -- what the edge answers -------------------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_edge_answers_as_the_plan_and_its_changes_say() -> None:
    """Public API table, errors and preview URLs, against a real edge, agent and origin."""
    stack = await Stack().start()
    try:
        origin = await stack.origin()
        assert stack.admin is not None and stack.edge is not None
        admin = stack.admin
        await stack.agent("sb1")

        # GET ports of an unknown sandbox: {"ports": []}; ws connect to it: 404 SANDBOX_NOT_FOUND
        r = await admin.get("/v1/sandboxes/nobody/ports")
        assert (r.status_code, r.json()) == (200, {"ports": []})
        r = await admin.get(
            "/v1/sandboxes/nobody/ports/8000/ws?path=/",
            headers={
                "connection": "upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        assert (r.status_code, r.json()["code"]) == (404, "SANDBOX_NOT_FOUND")

        # invalid port: 400 INVALID_PORT with the message
        r = await admin.post("/v1/sandboxes/sb1/ports", json={"port": 80})
        assert r.status_code == 400
        assert r.json() == {
            "error": "Invalid port number: 80. Must be 1024-65535, excluding 3000 (sandbox "
            "control plane).",
            "code": "INVALID_PORT",
        }

        # expose: 200 {port, exposedAt, name}; idempotent: same URL again
        first = await stack.expose("sb1", origin.port, name="api")
        assert set(first) == {"port", "exposedAt", "name"} and first["name"] == "api"
        again = await stack.expose("sb1", origin.port, name="api")
        assert again["exposedAt"] == first["exposedAt"]
        # a custom token is unique per sandbox: 409 for another port
        await stack.expose("sb1", 9001, token="mine")
        r = await admin.post("/v1/sandboxes/sb1/ports", json={"port": 9002, "token": "mine"})
        assert (r.status_code, r.json()["code"]) == (409, "TOKEN_IN_USE")
        # the list is sorted by port
        await stack.expose("sb1", 1025)
        listed = (await admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
        assert [p["port"] for p in listed] == sorted(p["port"] for p in listed)
        assert set(listed[0]) == {"port", "exposedAt", "name"}

        async def get(host: str, path: str = "/", **headers: str) -> httpx.Response:
            """A request on a connection of its own (a second host on one keep-alive connection
            is the 421 case below)."""
            assert stack.edge is not None
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{stack.edge.public_port}", timeout=10
            ) as public:
                return await public.get(path, headers={"host": host, **headers})

        host = stack.host_of(first["exposedAt"])
        # forwarded: Host rewritten, X-Forwarded-*, X-Sandbox-Name set; the client's dropped
        r = await get(
            host,
            "/headers",
            **{
                "x-forwarded-for": "6.6.6.6",
                "x-tunnel-secret": "1",
                "x-real-ip": "6.6.6.6",
                "forwarded": "for=6.6.6.6",
                "x-sandbox-id": "evil",
            },
        )
        assert r.status_code == 200
        seen: dict[str, list[str]] = {}
        for name, value in r.json():
            seen.setdefault(name.lower(), []).append(value)
        assert seen["host"] == [f"localhost:{origin.port}"]
        assert seen["x-forwarded-for"] == ["127.0.0.1"]
        assert seen["x-forwarded-host"] == [host]
        assert seen["x-forwarded-proto"] == ["http"]
        assert seen["x-sandbox-name"] == ["sb1"]
        for dropped in ("x-tunnel-secret", "x-real-ip", "forwarded", "x-sandbox-id"):
            assert dropped not in seen, dropped

        # bad token and unexposed port: the same 404 INVALID_TOKEN
        port, _, token = host.split(".")[0].partition("-sb1-")
        bad_token = await get(host.replace(token, "x" * 16))
        unexposed = await get(host.replace(port, "9999", 1))
        for r in (bad_token, unexposed):
            assert (r.status_code, r.json()["code"]) == (404, "INVALID_TOKEN")
        assert bad_token.json()["error"] == unexposed.json()["error"].replace("9999", port)
        # unknown host: 404
        assert (await get("example.org")).status_code == 404
        # nothing listening on the port: 502 UPSTREAM_CONNECT_FAILED naming the port
        r = await get(stack.host_of((await stack.expose("sb1", 1025))["exposedAt"]))
        assert (r.status_code, r.json()["code"]) == (502, "UPSTREAM_CONNECT_FAILED")
        assert "1025" in r.json()["error"]

        # a keep-alive request naming another preview host: 421 MISDIRECTED_REQUEST
        other = stack.host_of((await stack.expose("sb1", 9001, token="mine"))["exposedAt"])
        async with stack.client(first["exposedAt"]) as client:
            assert (await client.get("/")).status_code == 200
            r = await client.get("/", headers={"host": other})
            assert (r.status_code, r.json()["code"]) == (421, "MISDIRECTED_REQUEST")

        # unexpose: 204, idempotent
        for _ in range(2):
            r = await admin.delete(f"/v1/sandboxes/sb1/ports/{origin.port}")
            assert r.status_code == 204

        # sandbox offline: an exposed port answers 503, expose still succeeds
        for agent, _task in stack.agents:
            await agent.stop()

        async def offline() -> bool:
            sandboxes = (await admin.get("/v1/sandboxes")).json()["sandboxes"]
            return not any(s["id"] == "sb1" and s["connected"] for s in sandboxes)

        deadline = anyio.current_time() + 10
        while not await offline():
            assert anyio.current_time() < deadline, "the stopped agent still listed as connected"
            await anyio.sleep(0.02)
        offline_url = (await stack.expose("sb1", origin.port))["exposedAt"]
        r = await get(stack.host_of(offline_url))
        assert (r.status_code, r.json()["code"]) == (503, "SANDBOX_NOT_CONNECTED")
    finally:
        await stack.close()
