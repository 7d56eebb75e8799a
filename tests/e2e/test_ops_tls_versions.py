"""docs/operations.md, "HTTPS on the public listener": "TLS 1.2 and 1.3 only; ALPN offers `h2`,
then `http/1.1`".

A TLS 1.1 client is refused even with its own side made as permissive as an old client's
library (security level 0): the edge refuses it, by its minimum version (tunneld/tls.py) and,
on OpenSSL 3, its default security level too, which the test cannot tell apart (lowering only
the minimum still refuses; lowering both lets the client in, and fails this test). TLS 1.2 and
1.3 clients get in. ALPN is the edge's
preference, not the client's: a client listing `http/1.1` before `h2` still gets `h2`.
"""

from __future__ import annotations

import asyncio
import ssl
import warnings
from pathlib import Path

import pytest
import trustme

from .conftest import Stack

pytestmark = pytest.mark.anyio

DOMAIN = "preview.test"


async def _tls_stack(ca: trustme.CA, tmp_path: Path) -> Stack:
    cert = ca.issue_cert(f"*.{DOMAIN}")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    return await Stack(
        domain=DOMAIN,
        public_tls_cert=str(tmp_path / "c.pem"),
        public_tls_key=str(tmp_path / "c.key"),
    ).start()


def _client(
    ca: trustme.CA, version: ssl.TLSVersion, alpn: list[str] | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    with warnings.catch_warnings():  # TLSv1_1 is deprecated: this client is the old one
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # whatever the version needs, on this side
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


async def _handshake(port: int, context: ssl.SSLContext) -> tuple[str | None, str | None]:
    """(TLS version, ALPN protocol) agreed, or raises ssl.SSLError."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=f"8000-sb1-tok.{DOMAIN}"
        ),
        10,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return ssl_object.version(), ssl_object.selected_alpn_protocol()
    finally:
        writer.close()


async def test_tls_1_2_and_1_3_only_and_h2_first(tmp_path: Path) -> None:
    ca = trustme.CA()
    stack = await _tls_stack(ca, tmp_path)
    try:
        assert stack.edge is not None
        port = stack.edge.public_port
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old = ssl.TLSVersion.TLSv1_1
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _handshake(port, _client(ca, old))
        assert (await _handshake(port, _client(ca, ssl.TLSVersion.TLSv1_2)))[0] == "TLSv1.2"
        assert (await _handshake(port, _client(ca, ssl.TLSVersion.TLSv1_3)))[0] == "TLSv1.3"
        for offer in (["h2", "http/1.1"], ["http/1.1", "h2"]):
            agreed = await _handshake(port, _client(ca, ssl.TLSVersion.TLSv1_3, offer))
            assert agreed[1] == "h2", offer
        agreed = await _handshake(port, _client(ca, ssl.TLSVersion.TLSv1_3, ["http/1.1"]))
        assert agreed[1] == "http/1.1"
    finally:
        await stack.close()
