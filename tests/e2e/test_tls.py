"""The agent link over TLS: the agent verifies the edge's certificate."""

from __future__ import annotations

import ssl

import pytest
import trustme

from agent.core import Agent, AgentConfig
from tunneld.auth import agent_token

from .conftest import Stack

pytestmark = pytest.mark.anyio


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def _tls_stack(ca: trustme.CA, tmp_path) -> Stack:
    cert = ca.issue_cert("edge.test", "127.0.0.1")
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return await Stack(tls_cert=str(cert_file), tls_key=str(key_file)).start()


async def test_agent_over_tls_serves_preview_traffic(ca: trustme.CA, tmp_path) -> None:
    stack = await _tls_stack(ca, tmp_path)
    try:
        origin = await stack.origin()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        await stack.agent("sb1", tls=context, server_hostname="edge.test")
        exposed = await stack.expose("sb1", origin.port)
        async with stack.client(exposed["exposedAt"]) as client:
            r = await client.get("/bytes", params={"n": 3_000_000})
        assert r.status_code == 200 and len(r.content) == 3_000_000
        assert (
            stack.edge.registry.get("sb1").session.transport.get_extra_info("ssl_object")
            is not None
        )
    finally:
        await stack.close()


async def test_agent_refuses_an_untrusted_edge(ca: trustme.CA, tmp_path) -> None:
    stack = await _tls_stack(ca, tmp_path)
    try:
        context = ssl.create_default_context()  # does not trust the test CA
        agent = Agent(
            AgentConfig(
                "127.0.0.1",
                stack.edge.agent_port,
                "sb1",
                agent_token(stack.secret, "sb1"),
                tls=context,
                server_hostname="edge.test",
            )
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            await agent.connect_once()
        assert stack.edge.registry.get("sb1") is None
    finally:
        await stack.close()
