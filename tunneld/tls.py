"""TLS for the public listener and the admin API: certificates chosen by SNI, reloaded live, and
the plain-HTTP listener that redirects to HTTPS.

Theory of operation
-------------------
A ``CertificateSet`` holds one ``ssl.SSLContext`` per certificate + key pair, each with the names
its certificate covers (subjectAltName DNS entries, else the subject's commonName). The listener
is created once with a *front* context whose ``sni_callback`` runs for every ClientHello (with the
server name, or None when the client sent none) and moves the handshake to the context of the
current set that covers the name: an exact name first, then a wildcard one level deep
(``*.preview.example.com`` covers ``8000-sb-tok.preview.example.com``, not ``a.b.preview...``),
else the first pair. The front context's own certificate is never what a client sees after a
reload, since the callback always switches.

``reload`` builds a whole new list of contexts first and swaps it in only if every pair loaded:
new handshakes use the new certificates, connections already established keep the context they
were made with (an ``SSLObject`` holds its own reference), so nothing is dropped.

The public listener's contexts offer ALPN ``h2`` then ``http/1.1`` (``public_h2 = false``:
``http/1.1`` only; HTTP/2 is served by tunneld/h2public.py), the admin API's ``http/1.1`` only;
all of them TLS 1.2 or later. Every context of a set offers the same list: after the SNI switch
OpenSSL negotiates ALPN with the context the handshake moved to.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import h11
import orjson

from .config import ConfigError

if TYPE_CHECKING:
    from .edge import EdgeServer

log = logging.getLogger("tunneld.tls")

__all__ = [
    "TLS_CLOSE_DEADLINE",
    "TLS_NOTIFY_WAIT",
    "TLS_SHUTDOWN_TIMEOUT",
    "CertificateSet",
    "RedirectServer",
    "load_pair",
    "names_match",
]

# ALPN offered: HTTP/1.1 only (the admin API), or h2 first (the public listener, unless public_h2
# is off: public_alpn).
ALPN: Final = ("http/1.1",)
ALPN_H2: Final = ("h2", "http/1.1")
# The longest a public TLS connection's clean close may take, from its start: a client still
# lacking bytes then is reset (RST), one that has everything but has not finished the close is
# closed (``StalledCloseWatch``'s deadline, started by ``PublicConnection._watch_close``). Far
# longer than any close of a client that keeps reading needs: the rest is what the edge's
# buffers and the kernel's hold (a few MiB), so 10 min is a client below a few KiB/s.
TLS_CLOSE_DEADLINE: Final = 600.0
# The TLS layer's own shutdown timeout (``ssl_shutdown_timeout`` of the public listener),
# counted from ``close()`` whatever the client takes meanwhile: when it fires, the layer drops
# what it still holds and ends with a FIN without ``close_notify``, which a client may take for
# the end of a complete response. So it is only a backstop, after TLS_CLOSE_DEADLINE: the
# public connection's StalledCloseWatch always ends the close first.
TLS_SHUTDOWN_TIMEOUT: Final = TLS_CLOSE_DEADLINE + 60.0
# Seconds a closing public TLS connection whose client has taken everything (``close_notify``
# included) waits for the client's ``close_notify`` (or its close) before closing the socket
# (FIN) anyway (``StalledCloseWatch``'s ``settle``).
TLS_NOTIFY_WAIT: Final = 5.0
# The redirect listener reads one request head of at most this many bytes (browsers send < 2 KiB;
# nginx's large_client_header_buffers default is 8 KiB).
REDIRECT_MAX_HEAD: Final = 8192


@dataclass(frozen=True, slots=True)
class _Entry:
    cert: str
    key: str
    names: tuple[str, ...]  # lower-case DNS names the certificate covers; "*.x" = wildcard
    serial: str
    context: ssl.SSLContext


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None


def _context(alpn: Sequence[str] = ALPN) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(list(alpn))
    return context


def public_alpn(config: Any) -> tuple[str, ...]:
    """The ALPN list of the public listener."""
    return ALPN_H2 if config.public_h2 else ALPN


def load_pair(cert: str, key: str, what: str = "public_tls", alpn: Sequence[str] = ALPN) -> _Entry:
    """Load one certificate + key; ConfigError naming the file when unreadable or mismatched."""
    _readable(cert, f"{what}_cert")
    _readable(key, f"{what}_key")
    context = _context(alpn)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{what}_key {key} does not match the certificate {cert}") from None
        raise ConfigError(
            f"{what}: cannot load certificate {cert} with key {key} ({exc.reason or exc})"
        ) from None
    try:
        # The only stdlib way to read a certificate file's names; CPython's own tests use it.
        decoded: dict[str, Any] = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except (ssl.SSLError, AttributeError):  # pragma: no cover - load_cert_chain read it already
        decoded = {}
    names = [v.lower() for k, v in decoded.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        names = [
            v.lower() for rdn in decoded.get("subject", ()) for k, v in rdn if k == "commonName"
        ]
    return _Entry(cert, key, tuple(names), str(decoded.get("serialNumber", "")), context)


def names_match(pattern: str, name: str) -> bool:
    """``pattern`` (a certificate name) covers ``name``: equal, or ``*.rest`` and ``name`` is one
    label followed by ``.rest`` (RFC 6125: the wildcard stands for exactly one label)."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return False


class CertificateSet:
    """The pairs of one TLS listener; ``context`` is what the listener is created with."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        what: str = "public_tls",
        alpn: Sequence[str] = ALPN,
    ) -> None:
        if not pairs:
            raise ConfigError(f"{what}: no certificate")
        self.what = what
        self.alpn = tuple(alpn)
        self._entries = self._load(pairs)
        first = self._entries[0]
        self.context = _context(self.alpn)
        self.context.load_cert_chain(first.cert, first.key)
        self.context.sni_callback = self._on_sni

    def _load(self, pairs: Sequence[tuple[str, str]]) -> list[_Entry]:
        return [load_pair(cert, key, self.what, self.alpn) for cert, key in pairs]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(e.cert, e.key) for e in self._entries]

    @property
    def serials(self) -> list[str]:
        return [e.serial for e in self._entries]

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a ClientHello naming ``server_name`` (None: no SNI)."""
        entries = self._entries
        if server_name:
            name = server_name.lower().rstrip(".")
            for entry in entries:
                if name in entry.names:
                    return entry.context
            for entry in entries:
                if any(names_match(p, name) for p in entry.names if p.startswith("*.")):
                    return entry.context
        return entries[0].context

    def _on_sni(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        ssl_object.context = self.select(server_name)

    def reload(self, pairs: Sequence[tuple[str, str]] | None = None) -> bool:
        """Re-read the certificate files (``pairs``, default the current ones) for new
        handshakes; on any error keep the old contexts, log it and return False."""
        try:
            entries = self._load(self.pairs if pairs is None else pairs)
        except ConfigError as exc:
            log.error("%s: certificates not reloaded, the old ones stay in use: %s", self.what, exc)
            return False
        if not entries:
            log.error("%s: certificates not reloaded: no certificate", self.what)
            return False
        self._entries = entries
        log.info(
            "%s: %d certificate%s loaded (serial %s)",
            self.what,
            len(entries),
            "" if len(entries) == 1 else "s",
            ", ".join(e.serial for e in entries),
        )
        return True


def public_pairs(config: Any) -> list[tuple[str, str]]:
    """The public listener's pairs in order: ``public_tls_cert/key`` first (the default), then
    the ``[[public_tls]]`` tables."""
    pairs: list[tuple[str, str]] = []
    if config.public_tls_cert:
        pairs.append((config.public_tls_cert, config.public_tls_key))
    pairs.extend(config.public_tls_extra)
    return pairs


# -- the plain-HTTP listener that redirects to HTTPS ------------------------------------------


def _json_page(status: int, reason: str, code: str, message: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps({"error": message, "code": code})
    return (
        b"HTTP/1.1 %d %s\r\n%scontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\ncache-control: no-store\r\n\r\n"
        % (status, reason.encode(), extra, len(body))
    ) + body


class _RedirectConnection(asyncio.Protocol):
    """One plain-HTTP connection: read one head (bounded in size and time), answer, close."""

    def __init__(self, server: RedirectServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn = h11.Connection(h11.SERVER)
        self.head = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        edge = self.server.edge
        self.timer = edge.loop.call_later(edge.config.head_timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self.timer = None
        self._answer(
            "REQUEST_TIMEOUT",
            _json_page(
                408, "Request Timeout", "REQUEST_TIMEOUT", "The request head did not arrive."
            ),
        )

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if (end < 0 and len(self.head) > REDIRECT_MAX_HEAD) or end + 4 > REDIRECT_MAX_HEAD:
            self._answer(
                "HEADERS_TOO_LARGE",
                _json_page(
                    431,
                    "Request Header Fields Too Large",
                    "HEADERS_TOO_LARGE",
                    f"The request head is over {REDIRECT_MAX_HEAD} bytes.",
                ),
            )
            return
        if end < 0:
            return
        try:
            self.conn.receive_data(bytes(self.head[: end + 4]))
            event = self.conn.next_event()
        except h11.RemoteProtocolError:
            event = None
        if isinstance(event, h11.Request):
            self._answer(*self.server.answer(event))
        else:
            page = _json_page(400, "Bad Request", "BAD_REQUEST", "Malformed HTTP request.")
            self._answer("BAD_REQUEST", page)

    def eof_received(self) -> bool:
        return False

    def _answer(self, code: str, response: bytes) -> None:
        """Send ``response`` and close; a refusal (anything but the redirect) is counted in
        ``tunneld_public_refusals_total{code}`` like the public listener's (``code`` is one of
        a fixed set, so the label stays bounded)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if code != "REDIRECT":
                self.server.edge.metrics.public_refusals.labels(code).inc()
            transport.write(response)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None


class RedirectServer:
    """``public_redirect_port``: answers every request with 308 to the same URL over HTTPS, for
    hosts under the preview domain only (anything else is 404: no open redirect)."""

    def __init__(self, edge: EdgeServer) -> None:
        self.edge = edge
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
        self.server = await self.edge.loop.create_server(
            lambda: _RedirectConnection(self), host, port, reuse_port=reuse_port
        )
        return self.server

    def answer(self, request: h11.Request) -> tuple[str, bytes]:
        """(code, response): ``REDIRECT`` for the 308, else the refusal's code."""
        config = self.edge.config
        domain = config.domain.lower()
        host = b""
        for name, value in request.headers:
            if name == b"host":
                host = value
        hostname = host.decode("latin-1").lower()
        if hostname.startswith("["):
            hostname = ""  # an IP literal is never under the preview domain
        hostname = hostname.rpartition(":")[0] if ":" in hostname else hostname
        target = request.target
        if not (hostname == domain or hostname.endswith("." + domain)) or not all(
            c.isalnum() or c in "-." for c in hostname
        ):
            return "UNKNOWN_HOST", _json_page(
                404, "Not Found", "UNKNOWN_HOST", f"No preview URL matches host {hostname!r}."
            )
        if not target.startswith(b"/") or any(c < 0x21 or c == 0x7F for c in target):
            return "BAD_REQUEST", _json_page(
                400, "Bad Request", "BAD_REQUEST", "Bad request target."
            )
        port = self.edge.public_port if config.url_port is None else config.url_port or None
        authority = hostname if port in (None, 443) else f"{hostname}:{port}"
        location = b"https://" + authority.encode() + target
        return "REDIRECT", _json_page(
            308,
            "Permanent Redirect",
            "REDIRECT",
            "This preview URL is served over HTTPS.",
            b"location: " + location + b"\r\n",
        )
