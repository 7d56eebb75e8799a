"""PROXY protocol version 2 headers: the real client address, told to the sandbox's service.

An exposure with ``proxy_protocol`` on gets this header as the first bytes of every stream the
edge opens to it (before the client's first byte), so a service behind the tunnel (nginx with
``listen ... proxy_protocol``, HAProxy, PostgreSQL poolers, ...) sees the client's address
instead of the agent's 127.0.0.1. Only the binary version 2 is written (HAProxy's
``proxy-protocol.txt``, section 2.2); the text version 1 is not.

Layout (all integers big-endian)::

     0                   1                   2                   3
    +-------------------------------------------------------------------+
    |  signature: \\r\\n\\r\\n\\0\\r\\nQUIT\\n (12 bytes)                           |
    +----------------+----------------+---------------------------------+
    | ver_cmd 0x21   | fam 0x11/0x21  | length of the addresses (2)     |
    +----------------+----------------+---------------------------------+
    | TCP over IPv4 (fam 0x11, length 12): src addr (4) dst addr (4)    |
    |                                      src port (2) dst port (2)    |
    | TCP over IPv6 (fam 0x21, length 36): src addr (16) dst addr (16)  |
    |                                      src port (2) dst port (2)    |
    +-------------------------------------------------------------------+

``ver_cmd`` 0x21 is version 2, command PROXY; an address the edge cannot express (no client
address, a Unix socket) is sent as command LOCAL (0x20) with family UNSPEC and no addresses,
which a receiver must accept and treat as "use the connection's own addresses". An IPv4 address
paired with an IPv6 one is written as both IPv6 (``::ffff:a.b.c.d``).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

__all__ = ["LOCAL_HEADER", "SIGNATURE", "encode_v2", "parse_address"]

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_VERSION_PROXY: Final = 0x21
_VERSION_LOCAL: Final = 0x20
_TCP4: Final = 0x11
_TCP6: Final = 0x21
_UNSPEC: Final = 0x00
# signature, ver_cmd, family, length of what follows
_HEADER: Final = struct.Struct("!12sBBH")
_TCP4_ADDRESSES: Final = struct.Struct("!4s4sHH")
_TCP6_ADDRESSES: Final = struct.Struct("!16s16sHH")

LOCAL_HEADER: Final = _HEADER.pack(SIGNATURE, _VERSION_LOCAL, _UNSPEC, 0)

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def parse_address(value: object) -> Address | None:
    """An ``(ip, port)`` from a socket's peername/sockname tuple or from ``"ip:port"`` /
    ``"[ip]:port"`` (how the edge writes a client in stream metadata); None when it is neither
    (``"unknown"``, a Unix socket path, a scoped IPv6 address, a bad port)."""
    if isinstance(value, tuple) and len(value) >= 2:
        host, port = value[0], value[1]
    elif isinstance(value, str):
        host, sep, port_text = value.rpartition(":")
        if not sep or not port_text.isdigit() or not port_text.isascii():
            return None
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        port = int(port_text)
    else:
        return None
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return None
    return ip, port


def encode_v2(source: object, destination: object) -> bytes:
    """The header for a TCP connection from ``source`` to ``destination`` (anything
    :func:`parse_address` reads). Without a usable source: the LOCAL header. Without a usable
    destination: the unspecified address of the source's family, port 0."""
    src = parse_address(source)
    if src is None:
        return LOCAL_HEADER
    dst = parse_address(destination)
    if dst is None:
        unspecified = "0.0.0.0" if src[0].version == 4 else "::"
        dst = (ipaddress.ip_address(unspecified), 0)
    if src[0].version == 4 and dst[0].version == 4:
        addresses = _TCP4_ADDRESSES.pack(src[0].packed, dst[0].packed, src[1], dst[1])
        family = _TCP4
    else:
        addresses = _TCP6_ADDRESSES.pack(_v6(src[0]), _v6(dst[0]), src[1], dst[1])
        family = _TCP6
    return _HEADER.pack(SIGNATURE, _VERSION_PROXY, family, len(addresses)) + addresses


def _v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed).packed
    return ip.packed
