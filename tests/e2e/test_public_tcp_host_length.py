"""A ``tcp`` exposure's ``exposedAt`` names the edge by the preview host too
(``tcp://{port}-{id}-{token}.{domain}:{publicPort}``: the wildcard DNS record resolves it to the
edge; no token is checked on the port), so its expose is refused with 400
``PREVIEW_HOST_TOO_LONG`` like any other when that host would not fit DNS (a first label over 63
characters), before a public port is bound or anything stored; one that fits gets its port and
a host whose first label fits. docs/operations.md, Public TCP ports and TLS passthrough.

Checked while asking whether raw TCP exposures, which need no preview URL to be reached, should
skip the check: they need the host for the URL the edge hands out, and a URL no resolver looks
up is what the check is for (tests/e2e/test_preview_host_length.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from protocol.hostnames import MAX_LABEL_LENGTH

from .conftest import Stack
from .test_public_tcp import port_range

pytestmark = pytest.mark.anyio

DOMAIN = "example.test"
LONG_ID = "a" * 44 + "z"  # 45 characters: 4 + 1 + 45 + 1 + 16 = 67 with port 6379
FITS_ID = "b" * 39 + "z"  # 40 characters: 62 with port 6379 and a 16-character token


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = await Stack(domain=DOMAIN, public_tcp_ports=port_range(4)).start()
    try:
        yield s
    finally:
        await s.close()


async def test_a_tcp_expose_whose_host_does_not_fit_is_refused_before_a_port(
    stack: Stack,
) -> None:
    assert stack.admin is not None and stack.edge is not None
    tcp = await stack.admin.post(
        f"/v1/sandboxes/{LONG_ID}/ports", json={"port": 6379, "protocol": "tcp"}
    )
    http = await stack.admin.post(f"/v1/sandboxes/{LONG_ID}/ports", json={"port": 6379})
    assert tcp.status_code == 400, tcp.text
    assert tcp.json()["code"] == "PREVIEW_HOST_TOO_LONG"
    assert tcp.json() == http.json()  # the same answer as a preview URL's
    assert stack.edge.tcp.listeners == {}  # no public port bound
    assert stack.edge.registry.get(LONG_ID) is None  # nothing stored

    fits = await stack.expose(FITS_ID, 6379, protocol="tcp")
    assert fits["publicPort"] in stack.edge.tcp.listeners
    label = stack.host_of(fits["exposedAt"]).split(".", 1)[0]
    assert fits["exposedAt"].startswith(f"tcp://{label}.{DOMAIN}:")
    assert len(label) <= MAX_LABEL_LENGTH
