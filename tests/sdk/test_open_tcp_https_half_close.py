"""SDK raw TCP over an ``https://`` admin URL: what ``send_eof()`` does (docs/sdk.md).

anyio's TLS streams have no half-close, so the raw stream's ``send_eof()`` raises
``NotImplementedError`` there (as anyio documents for a stream that cannot half-close); the
stream is still usable and ``websocket=True`` carries the half-close over the same TLS admin
API. Real EdgeServer with a trustme certificate on its admin listener, a real agent, the
tests' hash service on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import trustme

from tests.e2e.conftest import Stack
from tests.e2e.origin import pattern
from tests.e2e.tcpserver import HashServer
from tunneld.client import TunnelClient

IO_TIMEOUT = 30.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def tls_stack(tmp_path: Path) -> AsyncIterator[tuple[Stack, ssl.SSLContext]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "admin.pem", tmp_path / "admin.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    stack = Stack(admin_tls_cert=str(cert_file), admin_tls_key=str(key_file))
    await stack.start()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        yield stack, context
    finally:
        await stack.close()


async def _hash_both_ways(tcp: object, payload: bytes) -> bytes:
    received = bytearray()
    with anyio.fail_after(IO_TIMEOUT):
        await tcp.send(b"hash 0\n" + payload)  # type: ignore[attr-defined]
        await tcp.send_eof()  # type: ignore[attr-defined]
        while True:
            try:
                received += await tcp.receive()  # type: ignore[attr-defined]
            except anyio.EndOfStream:
                return bytes(received)


@pytest.mark.anyio
async def test_raw_send_eof_over_https_raises_not_implemented_and_websocket_half_closes(
    tls_stack: tuple[Stack, ssl.SSLContext], hash_server: HashServer
) -> None:
    stack, context = tls_stack
    await stack.agent("sb1")
    assert stack.edge is not None
    url = f"https://127.0.0.1:{stack.edge.admin_port}"
    client = TunnelClient(url, stack.admin_token, ssl_context=context)
    payload = b"xyz" * 1000
    digest = hashlib.sha256(payload).hexdigest().encode()

    async with await client.sandbox("sb1").open_tcp(hash_server.port) as raw:
        with anyio.fail_after(IO_TIMEOUT):
            await raw.send(b"hold 1000\n")
            with pytest.raises(NotImplementedError):
                await raw.send_eof()
            # The stream is still whole: the service's bytes keep arriving.
            held = b""
            while len(held) < 1000:
                held += await raw.receive()
    assert held == b"".join(pattern(1000, seed=3))

    async with await client.sandbox("sb1").open_tcp(hash_server.port, websocket=True) as ws:
        answer = await _hash_both_ways(ws, payload)
    assert answer.partition(b"\n")[0] == digest
    assert hash_server.ends[-1] == "eof"  # the WebSocket's empty message reached it as EOF
