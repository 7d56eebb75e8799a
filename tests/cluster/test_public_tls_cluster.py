"""A public connection over TLS landing on a node that does not hold the sandbox's agent: its
socket cannot be handed to the owner (the TLS session's state lives in the landing process), so
the landing node relays it over the node link, even where a hand-over would be taken for plain
HTTP."""

from __future__ import annotations

import hashlib
import os
import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from tests.e2e.test_public_tls import _Loopback

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio

DOMAIN = "preview.test"


def _pair(ca: trustme.CA, directory: Path) -> dict[str, object]:
    cert = ca.issue_cert(f"*.{DOMAIN}")
    cert_file, key_file = directory / "wild.pem", directory / "wild.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return {
        "domain": DOMAIN,
        "scheme": "https",
        "public_tls_cert": str(cert_file),
        "public_tls_key": str(key_file),
        "handover": True,
    }


def _https(node: Node, ca: trustme.CA, url: str) -> httpx.AsyncClient:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return httpx.AsyncClient(
        base_url=url.rstrip("/"),
        timeout=10,
        transport=_Loopback(node.edge.public_port, verify=context),
    )


async def test_tls_connection_goes_over_the_node_link_not_a_hand_over(
    cluster: Cluster, tmp_path: Path
) -> None:
    ca = trustme.CA()
    settings = _pair(ca, tmp_path)
    a = await cluster.node("node-a", **settings)
    b = await cluster.node("node-b", **settings)
    origin = await cluster.origin()
    await cluster.agent(b, "sb1")
    # a chosen token: OpenSSL clients refuse a wildcard match on a label holding "_"
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port, "token": "tls0"})
    assert r.status_code == 200, r.text
    url = r.json()["exposedAt"]
    assert url.startswith("https://")
    await wait_for(lambda: a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b", what="owner")
    records = await a.store.nodes()
    assert records["node-b"]["handover"]  # plain HTTP would be handed over
    async with _https(a, ca, url) as client:  # one keep-alive connection to node A
        for _ in range(3):
            r = await client.get("/")
            assert (r.status_code, r.content) == (200, b"hello from origin")
        body = os.urandom(300_000)
        r = await client.post("/upload", content=body)
        assert r.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert (a.edge.handover.sent, b.edge.handover.received) == (0, 0)
    assert "node-b" in a.edge.cluster.links
    assert b"tunneld_connections_forwarded_total 1.0" in a.edge.metrics.render()
