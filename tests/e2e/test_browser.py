"""A real browser through the full tunnel: headless Chromium (the Debian package, installed by
``make ensure-chromium``) loads an HTTPS preview URL, which must be served over HTTP/2, and the
page opens a WebSocket to the sandbox's service that echoes.

The browser trusts only the edge's test certificate (``--ignore-certificate-errors-spki-list``
with its SPKI hash; other certificate errors stay errors), resolves the preview domain to
127.0.0.1 (``--host-resolver-rules``), and reports what it saw with a request back to the
service: ``performance``'s ``nextHopProtocol`` of the page and the WebSocket's echo."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tunneld import h2public

from . import test_public_tls
from .conftest import Stack, wait_until
from .test_public_tls import DOMAIN, TOKEN, host_of

pytestmark = pytest.mark.anyio

PAGE = b"""<!doctype html>
<html><head><title>preview</title></head><body><p id="out">running</p><script>
(async () => {
  const nav = performance.getEntriesByType("navigation")[0];
  await fetch("/ping");  // one more round trip on the HTTP/2 connection before the WebSocket
  let echo = "none";
  try {
    echo = await new Promise((resolve, reject) => {
      const ws = new WebSocket(`wss://${location.host}/ws`);
      ws.onopen = () => ws.send("hello from chromium");
      ws.onmessage = (e) => { resolve(e.data); ws.close(); };
      ws.onerror = () => reject("error");
      setTimeout(() => reject("timeout"), 20000);
    });
  } catch (e) { echo = "failed: " + e; }
  const q = new URLSearchParams({protocol: nav.nextHopProtocol, echo: echo});
  await fetch("/report?" + q.toString());
  document.getElementById("out").textContent = "done";
})();
</script></body></html>
"""


class BrowserOrigin:
    """The sandbox's service: the page, a WebSocket echo on /ws, and /report."""

    def __init__(self) -> None:
        self.reports: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.port = 0

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/ws":
            return None  # the WebSocket handshake goes on
        if url.path == "/":
            return Response(
                200,
                "OK",
                Headers({"content-type": "text/html", "content-length": str(len(PAGE))}),
                PAGE,
            )
        if url.path == "/report":
            self.reports.put_nowait({k: v[0] for k, v in parse_qs(url.query).items()})
            return Response(200, "OK", Headers({"content-length": "0"}), b"")
        return Response(404, "Not Found", Headers({"content-length": "0"}), b"")

    async def echo(self, ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)


# the certificate authority and the HTTPS stack of tests/e2e/test_public_tls.py
ca = test_public_tls.ca
stack = test_public_tls.stack


def _spki_hash(cert_file: str) -> str:
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path is not None, "chromium is missing: `make ensure-chromium` installs it"
    return path


async def test_chromium_loads_a_preview_url_over_h2_and_its_websocket_echoes(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extended_connects: list[bool] = []
    request_head = h2public.request_head

    def recorded(
        headers: list[tuple[bytes, bytes]], ended: bool
    ) -> tuple[bytes, bytes, bool, bool]:
        result = request_head(headers, ended)
        extended_connects.append(result[3])
        return result

    monkeypatch.setattr(h2public, "request_head", recorded)
    origin = BrowserOrigin()
    async with serve(origin.echo, "127.0.0.1", 0, process_request=origin.process_request) as srv:
        origin.port = next(iter(srv.sockets)).getsockname()[1]
        await stack.agent("sb1")
        url = (await stack.expose("sb1", origin.port, token=TOKEN))["exposedAt"]
        assert url.startswith("https://") and host_of(url).endswith(
            f".{DOMAIN}:{stack.edge.public_port}"
        )
        log = tmp_path / "chromium.log"
        with log.open("wb") as out:
            browser = subprocess.Popen(
                [
                    _chromium(),
                    "--headless=new",
                    "--no-sandbox",  # the suite runs as root in CI containers
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-extensions",
                    "--disable-background-networking",
                    f"--user-data-dir={tmp_path / 'profile'}",
                    f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1",
                    f"--ignore-certificate-errors-spki-list={_spki_hash(stack.config.public_tls_cert)}",
                    url,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            report = await asyncio.wait_for(origin.reports.get(), 60)
        except TimeoutError:
            raise AssertionError(
                "the page never reported back; chromium said:\n" + log.read_text(errors="replace")
            ) from None
        finally:
            browser.kill()
            browser.wait(10)
        # the browser's connections, cut by its death, are gone from the edge too
        await wait_until(lambda: not stack.edge.public_connections, 10, "connections closed")
    assert report["protocol"] == "h2", report
    assert report["echo"] == "hello from chromium", report
    # The page, the WebSocket and the report were HTTP/2 streams of the edge, and Chromium
    # opened the WebSocket with an extended CONNECT (RFC 8441) on the same connection.
    assert len(extended_connects) >= 3 and extended_connects.count(True) == 1
