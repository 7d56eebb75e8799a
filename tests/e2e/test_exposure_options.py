"""Exposure options (protocol, proxyProtocol, inspect) end to end: admin API and SDK in, the agent's
local API in (the control channel's agent -> edge direction), the store and back out, with clear
400s for values the edge refuses; and the wire rule that keeps older peers working: a plain
expose carries no option field at all."""

from __future__ import annotations

import httpx
import pytest

from agent.local_api import start_local_api
from protocol import control
from protocol.hostnames import (
    DEFAULT_OPTIONS,
    ExposureOptions,
    InvalidOptionError,
    validate_exposure_options,
)
from tunneld.client import TunnelClient, ValidationError
from tunneld.registry import Registry
from tunneld.store import SqliteStore

from .conftest import Stack

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "body, message",
    [
        ({"protocol": "udp"}, "protocol must be one of http, tcp, tls"),
        ({"protocol": 1}, "protocol must be one of http, tcp, tls"),
        ({"protocol": "HTTP"}, "protocol must be one of http, tcp, tls"),
        ({"proxyProtocol": "yes"}, "proxyProtocol must be true or false"),
        ({"proxyProtocol": 1}, "proxyProtocol must be true or false"),
        ({"inspect": 0}, "inspect must be true or false"),
        ({"protocol": "tcp", "inspect": True}, "inspect records HTTP requests"),
    ],
)
async def test_bad_options_are_a_400_naming_the_field(
    stack: Stack, body: dict, message: str
) -> None:
    r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000, **body})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "INVALID_OPTION"
    assert message in r.json()["error"]
    listed = await stack.admin.get("/v1/sandboxes/sb1/ports")
    assert listed.json()["ports"] == []  # nothing half-applied


async def test_options_round_trip_through_the_admin_api_and_replace_on_reexpose(
    stack: Stack,
) -> None:
    plain = await stack.expose("sb1", 8000)
    assert set(plain) == {"port", "exposedAt", "name"}  # Cloudflare's shape, unchanged
    shown = await stack.expose("sb1", 8001, proxyProtocol=True, inspect=True, name="api")
    assert shown["proxyProtocol"] is True and shown["inspect"] is True
    assert "protocol" not in shown  # http is the default: not shown
    ports = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
    assert ports == [plain, shown]
    # Re-exposing keeps the URL and replaces name and options, as Cloudflare's name rule.
    again = await stack.expose("sb1", 8001)
    assert again == {"port": 8001, "exposedAt": shown["exposedAt"], "name": None}
    assert stack.edge.registry.get("sb1").exposures[8001].options == DEFAULT_OPTIONS


async def test_the_sdk_sends_options_and_reads_them_back(stack: Stack) -> None:
    async with TunnelClient(
        f"http://127.0.0.1:{stack.edge.admin_port}", stack.admin_token
    ) as client:
        sandbox = client.sandbox("sb1")
        port = await sandbox.expose_port(8000, proxy_protocol=True, inspect=True)
        assert (port.protocol, port.proxy_protocol, port.inspect) == ("http", True, True)
        listed = await sandbox.get_exposed_ports()
        assert listed == [port]
        with pytest.raises(ValidationError, match="protocol must be one of"):
            await sandbox.expose_port(8001, protocol="udp")
        with pytest.raises(ValidationError, match="inspect records HTTP"):
            await sandbox.expose_port(8001, protocol="tls", inspect=True)
    assert [p for p in stack.edge.registry.get("sb1").exposures] == [8000]


async def test_an_agent_exposes_with_options_through_its_local_api(stack: Stack) -> None:
    agent = await stack.agent("sb1")
    api = await start_local_api(agent, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}") as local:
            r = await local.post("/v1/ports", json={"port": 8000, "proxyProtocol": True})
            assert r.status_code == 200, r.text
            r = await local.post("/v1/ports", json={"port": 8001, "inspect": "no"})
            assert r.status_code == 400 and r.json()["code"] == "INVALID_OPTION"
    finally:
        await api.close()
    ports = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
    assert [(p["port"], p.get("proxyProtocol")) for p in ports] == [(8000, True)]


async def test_options_survive_an_edge_restart_on_sqlite(tmp_path) -> None:
    first = Stack()
    first.store = SqliteStore.open(tmp_path)
    await first.start()
    try:
        shown = await first.expose("sb1", 8000, inspect=True)
    finally:
        await first.close()
    second = Stack()
    second.store = SqliteStore.open(tmp_path)
    await second.start()
    try:
        ports = (await second.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
    finally:
        await second.close()
    # the same record; only the URL's port differs (each edge listened on a fresh one)
    (again,) = ports
    assert again.pop("exposedAt").split(".")[0] == shown.pop("exposedAt").split(".")[0]
    assert again == shown == {"port": 8000, "name": None, "inspect": True}


def test_a_plain_expose_carries_no_option_fields_and_options_round_trip() -> None:
    plain = control.encode_message(control.Expose(1, 8000))
    assert plain == b'{"type":"expose","id":1,"port":8000}'  # what a version-1 edge reads
    rich = control.Expose(2, 8000, None, None, "tcp", True, False)
    wire = control.encode_message(rich)
    assert b'"protocol":"tcp"' in wire and b'"proxy_protocol":true' in wire
    assert b"inspect" not in wire
    assert control.decode_message(wire) == rich
    for bad in (b'"protocol":"udp"', b'"inspect":1', b'"proxy_protocol":null,"x":1'):
        with pytest.raises(control.ControlError):
            control.decode_message(b'{"type":"expose","id":1,"port":8000,' + bad + b"}")


def test_validation_returns_the_shared_default_and_refuses_non_bools() -> None:
    assert validate_exposure_options() is DEFAULT_OPTIONS
    assert validate_exposure_options(None, None, None) is DEFAULT_OPTIONS
    assert validate_exposure_options("tls", True) == ExposureOptions("tls", True, False)
    for args in (("tcp", 1), ("http", False, "true"), (["http"],)):
        with pytest.raises(InvalidOptionError):
            validate_exposure_options(*args)


def test_a_reexpose_with_the_same_protocol_keeps_the_assigned_public_port() -> None:
    registry = Registry()
    tcp = ExposureOptions("tcp")
    first = registry.expose("sb1", 8000, options=tcp)
    registry.get("sb1").exposures[8000] = first = type(first)(
        first.port, first.token, first.name, first.created_at, tcp, 20001
    )
    assert registry.expose("sb1", 8000, options=tcp).public_port == 20001
    assert registry.expose("sb1", 8000).public_port is None  # back to http: no TCP port


async def test_a_version_1_database_is_migrated_with_default_options(tmp_path) -> None:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "exposures.db")
    conn.executescript(
        "CREATE TABLE exposures (sandbox_id TEXT NOT NULL, port INTEGER NOT NULL, "
        "token TEXT NOT NULL, name TEXT, created_at REAL NOT NULL, "
        "PRIMARY KEY (sandbox_id, port)) WITHOUT ROWID;"
        "INSERT INTO exposures VALUES ('sb1', 8000, 'tok_a', 'api', 1.5);"
        "PRAGMA user_version = 1;"
    )
    conn.close()
    store = SqliteStore.open(tmp_path)
    try:
        (record,) = await store.load_all()
    finally:
        await store.close()
    assert tuple(record) == ("sb1", 8000, "tok_a", "api", 1.5, "http", False, False, None)
