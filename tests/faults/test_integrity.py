"""Row 3 of issue 7: a corrupted byte on the agent link never reaches a client as a success.

The link's integrity comes from TLS (its record MAC), not from a frame checksum (measured in
bench/micro/test_bench_checksum.py; decision in docs/operations.md). So: a TLS link through a
corrupting proxy either delivers the right bytes or fails visibly, and plaintext links are only
accepted between loopback addresses unless explicitly allowed, on both sides.
"""

from __future__ import annotations

import hashlib
import ssl
import time

import httpx
import pytest
import trustme

import agent.cli
import tunneld.auth
from agent.cli import plaintext_refusal as agent_plaintext_refusal
from tests.e2e.origin import pattern, pattern_sha256

from .conftest import FaultStack, Stack, tls_files

pytestmark = pytest.mark.anyio

MiB = 1 << 20


async def _tls_stack(tmp_path, ca: trustme.CA) -> FaultStack:
    _, cert_file, key_file = tls_files(tmp_path, "edge.test", "127.0.0.1", ca=ca)
    return await FaultStack(tls_cert=cert_file, tls_key=key_file).start()


async def _download(client: httpx.AsyncClient, n: int, seed: int) -> str:
    digest = hashlib.sha256()
    try:
        async with client.stream("GET", "/bytes", params={"n": n, "seed": seed}) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            async for chunk in r.aiter_raw():
                digest.update(chunk)
    except httpx.TransportError as exc:  # reset, truncated body: visible failures
        return f"failed ({type(exc).__name__})"
    assert digest.hexdigest() == pattern_sha256(n, seed), "a 200 download with wrong bytes"
    return "ok"


async def _upload(client: httpx.AsyncClient, n: int, seed: int) -> str:
    async def body():
        for piece in pattern(n, seed):
            yield piece

    try:
        r = await client.post("/upload", content=body(), headers={"content-length": str(n)})
    except httpx.TransportError as exc:
        return f"failed ({type(exc).__name__})"
    if r.status_code != 200:
        return f"status {r.status_code}"
    got = r.json()
    assert got == {"length": n, "sha256": pattern_sha256(n, seed)}, "a 200 upload, wrong bytes"
    return "ok"


async def test_corrupted_tls_agent_link_never_delivers_wrong_bytes(tmp_path) -> None:
    ca = trustme.CA()
    stack = await _tls_stack(tmp_path, ca)
    try:
        origin = await stack.origin()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        agent = await stack.agent("sb1", tls=context, server_hostname="edge.test")
        exposed = await stack.expose("sb1", origin.port)
        outcomes: list[str] = []
        async with stack.client(exposed["exposedAt"]) as client:
            for attempt in range(6):  # bounded: 3 downloads of 4 MiB, 3 uploads of 3 MiB
                await stack.proxy.wait_until(lambda: agent.connected, timeout=20)
                stack.proxy.corrupt(within=3 * MiB, direction="both")
                if attempt % 2 == 0:
                    outcomes.append(await _download(client, 4 * MiB, seed=attempt + 1))
                else:
                    outcomes.append(await _upload(client, 3 * MiB, seed=attempt + 1))
            # The fault really happened, and some transfers saw it (as failures, never as 200s).
            assert stack.proxy.corrupted >= 3, outcomes
            assert any(o != "ok" for o in outcomes), outcomes
            # Once the link is clean again, transfers succeed.
            stack.proxy.pass_through()
            await stack.proxy.wait_until(lambda: agent.connected, timeout=20)
            assert await _download(client, 2 * MiB, seed=99) == "ok"
    finally:
        await stack.close()


async def test_edge_refuses_plaintext_agents_from_other_hosts(monkeypatch) -> None:
    # Tests only have loopback: make the edge see every peer as remote.
    monkeypatch.setattr(tunneld.auth, "is_loopback_peer", lambda peer: False)
    stack = await Stack().start()
    try:
        agent = await stack.agent("sb1", wait=False)
        await _wait(lambda: agent.last_refusal is not None)
        assert agent.last_refusal is not None and agent.last_refusal[0] == "PLAINTEXT_REFUSED"
        assert "TLS" in agent.last_refusal[1]
        assert stack.edge.registry.get("sb1") is None
    finally:
        await stack.close()


async def test_edge_accepts_plaintext_agents_from_other_hosts_when_allowed(monkeypatch) -> None:
    monkeypatch.setattr(tunneld.auth, "is_loopback_peer", lambda peer: False)
    stack = await Stack(allow_plaintext_agents=True).start()
    try:
        await stack.agent("sb1")
        assert stack.edge.registry.get("sb1").session is not None
    finally:
        await stack.close()


async def _wait(predicate, timeout: float = 10) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("server", ["10.1.2.3:7000", "ws://10.1.2.3:7000", "edge.example.com:7"])
def test_agent_cli_refuses_plaintext_to_a_remote_edge_without_connecting(
    server: str, monkeypatch, capsys
) -> None:
    def no_agent(args):  # the CLI must stop before it starts the agent that would connect
        raise AssertionError(f"the agent was started for {args.server}")

    monkeypatch.setattr(agent.cli, "run_from_args", no_agent)
    monkeypatch.setenv("TUNNEL_AGENT_TOKEN", "t")
    code = agent.cli.main(["run", "--server", server, "--sandbox-id", "sb1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--insecure-plaintext" in err and "TLS" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("server", "tls", "insecure", "refused"),
    [
        ("10.1.2.3:7000", False, False, True),
        ("ws://10.1.2.3:7000", False, False, True),
        ("edge.example.com:7000", False, False, True),
        ("10.1.2.3:7000", True, False, False),
        ("wss://10.1.2.3:7000", False, False, False),
        ("10.1.2.3:7000", False, True, False),
        ("127.0.0.1:7000", False, False, False),
        ("ws://127.0.0.1:7000", False, False, False),
        ("[::1]:7000", False, False, False),
        ("localhost:7000", False, False, False),
    ],
)
def test_agent_plaintext_rule(server: str, tls: bool, insecure: bool, refused: bool) -> None:
    assert (agent_plaintext_refusal(server, tls=tls, insecure=insecure) is not None) is refused


async def test_reload_that_disallows_plaintext_closes_remote_plaintext_sessions(
    monkeypatch,
) -> None:
    import dataclasses

    from tunneld.cli import apply_reload

    monkeypatch.setattr(tunneld.auth, "is_loopback_peer", lambda peer: False)
    stack = await Stack(allow_plaintext_agents=True).start()
    try:
        await stack.agent("sb1")
        live = stack.edge.registry.get("sb1").session
        apply_reload(stack.edge, dataclasses.replace(stack.config))  # unchanged: stays
        assert not live.session.closed
        apply_reload(stack.edge, dataclasses.replace(stack.config, allow_plaintext_agents=False))
        await _wait(lambda: live.session.closed)
        assert stack.edge.registry.get("sb1") is None or (
            stack.edge.registry.get("sb1").session is not live
        )
    finally:
        await stack.close()
