"""Reaching the edge through an HTTP proxy: which proxy (if any) for each edge, and the CONNECT.

Theory of operation
-------------------
Choosing (:func:`select_proxy`, no I/O): for one edge address, as curl and requests do,
``--proxy URL`` (or ``TUNNEL_AGENT_PROXY``) wins; else ``https_proxy``/``HTTPS_PROXY`` for a TLS or
``wss://`` link and ``http_proxy``/``HTTP_PROXY`` for a plain one, then ``all_proxy``/``ALL_PROXY``
(the lowercase name first; an empty value is unset). Whichever was chosen is skipped when the
edge's host matches ``no_proxy``/``NO_PROXY``: a comma-separated list of ``*``, domains
(``example.com`` and ``.example.com`` both match the domain and every name under it), IP
addresses, CIDR blocks, each optionally with ``:PORT``. Loopback is not excluded unless listed:
the edge is matched by the name written in ``--server``, never by what it resolves to.
``--no-proxy`` or ``--proxy ""`` turns proxies off.

Tunnelling (:func:`open_tunnel`): TCP to the proxy, ``CONNECT host:port HTTP/1.1`` (with
``Proxy-Authorization: Basic`` when the proxy URL has credentials), then the response head is read
without reading one byte past it (the bytes after it belong to the edge: TLS, the WebSocket
handshake or the session). A 2xx answer leaves a connected socket that the caller hands to
``loop.create_connection(sock=...)`` exactly as if it had dialled the edge; the edge's name is
resolved by the proxy. Anything else is a :class:`ProxyError` naming the proxy and its status line.

Credentials never leave this module in text: ``str(ProxyURL)`` is ``host:port`` and every error
message is built from that, so log lines and exceptions cannot carry a password.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote, urlsplit

__all__ = [
    "MAX_RESPONSE_HEAD",
    "ProxyChoice",
    "ProxyConfigError",
    "ProxyError",
    "ProxyURL",
    "connect_request",
    "head_bytes_needed",
    "no_proxy_matches",
    "open_tunnel",
    "parse_connect_response",
    "parse_proxy_url",
    "redact",
    "select_proxy",
]

# A CONNECT answer is a status line and a few headers; squid's own limit for a request head is
# 64 KiB, tinyproxy's answers are ~100 bytes. 16 KiB bounds what a hostile proxy makes us buffer.
MAX_RESPONSE_HEAD: Final = 16 * 1024
# The status line as it appears in messages: the proxy chooses the reason phrase.
_MAX_STATUS_TEXT: Final = 200
_DEFAULT_PORT: Final = 80  # http:// without a port, as requests/urllib3 (curl would say 1080)

ENV_PROXY: Final = "TUNNEL_AGENT_PROXY"


class ProxyConfigError(ValueError):
    """A proxy setting cannot be used (malformed URL, unsupported scheme); the text is redacted."""


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """An ``http://[user:password@]host:port`` proxy. ``str()`` is ``host:port``: safe to log."""

    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    source: str = field(default="", compare=False)  # where it came from: "--proxy", "HTTPS_PROXY"

    def __str__(self) -> str:
        return _host_port(self.host, self.port)

    def __repr__(self) -> str:
        auth = " with credentials" if self.username is not None else ""
        return f"ProxyURL({self}{auth}, source={self.source!r})"

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value, or None without credentials."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redact(url: str) -> str:
    """``url`` with everything between ``scheme://`` and the last ``@`` replaced by ``***``.

    The last ``@``, not the first: an unencoded ``@`` or ``/`` in a password must not leak a part
    of it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"


def parse_proxy_url(text: str, source: str = "--proxy") -> ProxyURL:
    """``http://[user:password@]host[:port]`` (the scheme may be left out, as curl allows)."""
    shown = redact(text.strip())
    value = text.strip()
    if "://" not in value:
        value = "http://" + value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # its text may quote a piece of the password: not shown
        raise ProxyConfigError(
            f"{source}: {shown!r} is not a proxy URL (expected http://[USER:PASSWORD@]HOST:PORT)"
        ) from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ProxyConfigError(
            f"{source}: {shown!r}: https:// proxies (TLS to the proxy itself) are not supported; "
            "use an http:// proxy (the link to the edge is still TLS inside the tunnel when "
            "--tls or wss:// is used)"
        )
    if scheme != "http":
        raise ProxyConfigError(
            f"{source}: {shown!r}: only http:// proxies are supported (CONNECT), not {scheme}://"
        )
    if not parts.hostname:
        raise ProxyConfigError(f"{source}: {shown!r} has no host (expected http://HOST:PORT)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProxyConfigError(f"{source}: {shown!r}: a proxy URL has no path (http://HOST:PORT)")
    if port == 0:
        raise ProxyConfigError(f"{source}: {shown!r}: port 0 is not a proxy port")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    for part in (username, password):
        if part is not None and any(c in part for c in "\r\n"):
            raise ProxyConfigError(f"{source}: {shown!r}: credentials contain a line break")
    return ProxyURL(parts.hostname, port or _DEFAULT_PORT, username, password, source)


# -- choosing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyChoice:
    """The proxy for one edge address (None: direct) and why, for the log."""

    proxy: ProxyURL | None
    reason: str


def _env(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) of ``name`` in lowercase, else uppercase; empty values are unset."""
    for variable in (name.lower(), name.upper()):
        value = environ.get(variable, "").strip()
        if value:
            return variable, value
    return None


def select_proxy(
    host: str,
    port: int,
    secure: bool,
    *,
    explicit: str | None = None,
    explicit_source: str = "--proxy",
    disabled: bool = False,
    environ: Mapping[str, str],
) -> ProxyChoice:
    """The proxy to reach the edge ``host:port`` through (``secure``: a TLS or wss:// link).

    ``explicit`` is ``--proxy`` (or ``TUNNEL_AGENT_PROXY``, named by ``explicit_source`` in the
    log and in errors): "" turns proxies off, as ``disabled`` (``--no-proxy``) does. Raises
    ProxyConfigError for an unusable chosen URL (a variable that is not chosen is never parsed).
    """
    if disabled or explicit == "":
        return ProxyChoice(None, "proxies disabled")
    if explicit is not None:
        found: tuple[str, str] | None = (explicit_source, explicit)
    else:
        found = _env(environ, "https_proxy" if secure else "http_proxy") or _env(
            environ, "all_proxy"
        )
    if found is None:
        return ProxyChoice(None, "no proxy configured")
    source, value = found
    proxy = parse_proxy_url(value, source)
    no_proxy = _env(environ, "no_proxy")
    if no_proxy is not None and no_proxy_matches(host, port, no_proxy[1]):
        return ProxyChoice(None, f"{no_proxy[0]} matches {host}")
    return ProxyChoice(proxy, f"from {source}")


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port``, a bare IPv6 address or a CIDR."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    """Does ``host:port`` match the ``NO_PROXY`` list ``no_proxy``?"""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if "/" in name:
            try:
                network = ipaddress.ip_network(name, strict=False)
            except ValueError:
                continue
            if address is not None and address in network:
                return True
            continue
        try:
            entry_address = ipaddress.ip_address(name)
        except ValueError:
            entry_address = None
        if entry_address is not None:
            if address == entry_address:
                return True
            continue
        domain = name.removeprefix("*").lstrip(".").rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


# -- the CONNECT exchange (sans-IO parts) --------------------------------------------------------


class ProxyError(ConnectionError):
    """The proxy could not be reached or did not open the tunnel; the message names the proxy."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])


def connect_request(proxy: ProxyURL, host: str, port: int) -> bytes:
    """The ``CONNECT`` request head for the edge ``host:port``."""
    target = _host_port(host, port)
    lines = [
        f"CONNECT {target} HTTP/1.1",
        f"Host: {target}",
        "User-Agent: tunnel-agent",
    ]
    authorization = proxy.authorization
    if authorization is not None:
        lines.append(f"Proxy-Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def head_bytes_needed(head: bytes | bytearray) -> int:
    """How many bytes may be read without passing the end of the head (0: it is complete).

    The head ends at the first CRLFCRLF; reading at most the bytes that are certainly still part
    of it never takes a byte that belongs to the tunnel.
    """
    if head.endswith(b"\r\n\r\n"):
        return 0
    for suffix, needed in ((b"\r\n\r", 1), (b"\r\n", 2), (b"\r", 3)):
        if head.endswith(suffix):
            return needed
    return 4


def _printable(line: bytes) -> str:
    text = line.decode("latin-1")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:_MAX_STATUS_TEXT] + ("..." if len(text) > _MAX_STATUS_TEXT else "")


_STATUS_LINE: Final = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: .*)?")


def parse_connect_response(head: bytes, proxy: ProxyURL, host: str, port: int) -> tuple[int, str]:
    """(status, status line) of a complete response head; ProxyError unless it is 2xx."""
    line = head.split(b"\r\n", 1)[0]
    status_text = _printable(line)
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ProxyError(f"proxy {proxy} did not answer CONNECT with HTTP: {status_text!r}")
    status = int(match.group(1))
    if 200 <= status < 300:
        return status, status_text
    target = _host_port(host, port)
    if status == 407 and proxy.authorization is None:
        raise ProxyError(
            f"proxy {proxy} requires authentication ({status_text}); give credentials in the "
            "proxy URL: http://USER:PASSWORD@HOST:PORT",
            status,
        )
    if status in (401, 407):
        # tinyproxy answers wrong credentials with 401, not 407.
        raise ProxyError(
            f"proxy authentication failed at proxy {proxy} ({status_text}); check the user "
            "and password in the proxy URL",
            status,
        )
    raise ProxyError(f"proxy {proxy} refused CONNECT to {target}: {status_text}", status)


# -- the CONNECT exchange (sockets) ---------------------------------------------------------------


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _dial(loop: asyncio.AbstractEventLoop, proxy: ProxyURL) -> socket.socket:
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProxyError(f"cannot resolve proxy {proxy}: {_why(exc)}") from None
    error: OSError | None = None
    for family, type_, proto, _name, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise ProxyError(f"cannot connect to proxy {proxy}: {_why(error or OSError('no address'))}")


async def open_tunnel(proxy: ProxyURL, host: str, port: int) -> socket.socket:
    """A socket connected to the edge ``host:port`` through ``proxy`` (CONNECT answered 2xx).

    The caller bounds the time (the agent's connect timeout). Raises ProxyError.
    """
    loop = asyncio.get_running_loop()
    sock = await _dial(loop, proxy)
    try:
        try:
            await loop.sock_sendall(sock, connect_request(proxy, host, port))
            head = bytearray()
            while needed := head_bytes_needed(head):
                if len(head) + needed > MAX_RESPONSE_HEAD:
                    raise ProxyError(
                        f"proxy {proxy} answered CONNECT with a head over "
                        f"{MAX_RESPONSE_HEAD // 1024} KiB"
                    )
                chunk = await loop.sock_recv(sock, needed)
                if not chunk:
                    raise ProxyError(
                        f"proxy {proxy} closed the connection before answering CONNECT to "
                        f"{_host_port(host, port)}"
                    )
                head += chunk
        except OSError as exc:
            if isinstance(exc, ProxyError):
                raise
            raise ProxyError(f"connection to proxy {proxy} failed: {_why(exc)}") from None
        parse_connect_response(bytes(head), proxy, host, port)
    except BaseException:
        sock.close()
        raise
    return sock
