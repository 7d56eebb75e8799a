"""The server name of a TLS ClientHello, read without terminating TLS (sans-IO).

Theory of operation
-------------------
TLS passthrough (``public_tls_passthrough``) routes a connection by the name the client asks
for before any TLS byte is answered: the listener peeks at the first bytes (they stay in the
kernel, so whoever serves the connection next still reads the whole ClientHello) and calls
:func:`parse_client_hello` on everything peeked so far. The function is pure and stateless: the
same prefix always gives the same answer, so it is simply called again on a longer prefix.

It answers one of three things:

* :class:`NeedMore` - the prefix is a plausible start of a ClientHello; at least ``total`` bytes
  are needed before anything more can be said (the caller waits for that many: SO_RCVLOWAT);
* :class:`ClientHello` - a complete ClientHello; ``server_name`` is its ``host_name`` (RFC 6066
  section 3) lowercased without a trailing dot, or None when it sent none (or an unusable one);
* :class:`NotClientHello` - not a ClientHello within the bounds below (``reason`` says why;
  ``too_large`` marks the one a caller should refuse rather than pass on).

Layout read (RFC 8446 section 5.1 and 4.1.2; TLS 1.0-1.3 all share it)::

    record:     type=22 (1) | version 3.x (2) | length <= 2^14 (2) | fragment ...
    handshake:  msg_type=1 (1) | length (3) | body: the ClientHello, possibly over several records
    body:       legacy_version (2) | random (32) | session_id <0..32> (1+n)
                | cipher_suites <2..2^16-2> (2+n) | compression_methods <1..2^8-1> (1+n)
                | extensions <0..2^16-1> (2+n, absent in very old hellos)
    extension:  type (2) | length (2) | data          server_name is type 0:
    server_name: list length (2) | name_type=0 (1) | name length (2) | host_name ...

Only what the route needs is checked; the handshake itself is validated by whoever terminates
TLS (the sandbox's service, or the edge on the fallback path). Every length is bounds-checked,
and nothing raises on any input (``tests/test_sni.py`` fuzzes it with Hypothesis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_HELLO_LENGTH",
    "MAX_HELLO_RECORDS",
    "MAX_PEEK",
    "ClientHello",
    "NeedMore",
    "NotClientHello",
    "parse_client_hello",
]

_RECORD_HEADER: Final = 5
_CONTENT_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_EXT_SERVER_NAME: Final = 0
_HOST_NAME: Final = 0
# A TLS record carries at most 2^14 bytes of plaintext (RFC 8446 section 5.1).
_MAX_RECORD: Final = 16384
# The ClientHello (handshake body) may be at most this long. Browsers send 0.5-2 KiB (with a
# post-quantum key share ~1.8 KiB); 16 KiB is one full record, nginx's ssl_preread reads at most
# one, HAProxy's tcp-request inspect-delay buffers about as much.
MAX_HELLO_LENGTH: Final = 16384
# ... spread over at most this many records (clients use one; a few allow for odd splitting, and
# bound the header overhead a hostile client can make us peek at).
MAX_HELLO_RECORDS: Final = 4
# The most bytes a caller ever has to peek before it gets an answer.
MAX_PEEK: Final = MAX_HELLO_LENGTH + 4 + MAX_HELLO_RECORDS * _RECORD_HEADER


@dataclass(frozen=True, slots=True)
class NeedMore:
    total: int  # bytes of input (from the first) needed before the next answer


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None
    length: int  # bytes of input the ClientHello took, record headers included


@dataclass(frozen=True, slots=True)
class NotClientHello:
    reason: str
    too_large: bool = False


Result = NeedMore | ClientHello | NotClientHello


def parse_client_hello(data: bytes | bytearray | memoryview) -> Result:
    """Look for a complete ClientHello at the start of ``data`` (see the module docstring)."""
    buf = bytes(data[:MAX_PEEK])
    handshake = bytearray()
    pos = 0
    records = 0
    needed = -1  # handshake bytes in all (its 4-byte header included), once the header is read
    while needed < 0 or len(handshake) < needed:
        if records == MAX_HELLO_RECORDS:
            return NotClientHello(f"the ClientHello spans more than {MAX_HELLO_RECORDS} records")
        if len(buf) < pos + _RECORD_HEADER:
            return _need_more(buf, pos, pos + _RECORD_HEADER)
        content_type, major = buf[pos], buf[pos + 1]
        length = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if content_type != _CONTENT_HANDSHAKE:
            return NotClientHello("not a TLS handshake record")
        if major != 3:
            return NotClientHello("not a TLS record version")
        if length == 0:
            return NotClientHello("an empty handshake record")
        if length > _MAX_RECORD:
            return NotClientHello("a TLS record over 2^14 bytes", too_large=True)
        end = pos + _RECORD_HEADER + length
        before = len(handshake)
        # What has arrived of this record is looked at at once: a hostile or slow client must
        # not make us wait for bytes we would refuse anyway.
        handshake += buf[pos + _RECORD_HEADER : end]
        records += 1
        if needed < 0 and len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                return NotClientHello("the first handshake message is not a ClientHello")
            body_length = int.from_bytes(handshake[1:4], "big")
            if body_length > MAX_HELLO_LENGTH:
                return NotClientHello(
                    f"a ClientHello over {MAX_HELLO_LENGTH} bytes", too_large=True
                )
            needed = 4 + body_length
        if needed >= 0 and before + length > needed:
            # More in the records than the ClientHello: a second handshake message, which a
            # client must not send before the server's answer. Refusing it here also bounds
            # the input: at most MAX_PEEK bytes are ever needed.
            return NotClientHello("data after the ClientHello in its record")
        if len(buf) < end:
            if needed < 0:
                return NeedMore(min(end, pos + _RECORD_HEADER + 4 - before))
            return NeedMore(end)
        pos = end
    name = _server_name(memoryview(handshake)[4:])
    if isinstance(name, NotClientHello):
        return name
    return ClientHello(name, pos)


def _need_more(buf: bytes, pos: int, total: int) -> Result:
    """``NeedMore`` unless the few bytes of a partial record header already rule TLS out."""
    if len(buf) > pos and buf[pos] != _CONTENT_HANDSHAKE:
        return NotClientHello("not a TLS handshake record")
    if len(buf) > pos + 1 and buf[pos + 1] != 3:
        return NotClientHello("not a TLS record version")
    return NeedMore(total)


class _Short(Exception):
    """A length inside the ClientHello points past its end."""


def _server_name(body: memoryview) -> str | NotClientHello | None:
    try:
        pos = 2 + 32  # legacy_version, random
        pos = _skip(body, pos, 1, max_length=32)  # session id
        pos = _skip(body, pos, 2)  # cipher suites
        pos = _skip(body, pos, 1)  # compression methods
        if pos == len(body):
            return None  # no extensions at all (SSL 3.0-style hello)
        extensions_end = _vector_end(body, pos, 2)
        if extensions_end != len(body):
            return NotClientHello("the extensions do not end where the ClientHello does")
        pos += 2
        seen: set[int] = set()
        name: str | None = None
        while pos < extensions_end:
            if extensions_end - pos < 4:
                raise _Short
            kind = int.from_bytes(body[pos : pos + 2], "big")
            data_end = _vector_end(body, pos + 2, 2, limit=extensions_end)
            if kind in seen:
                return NotClientHello("an extension appears twice")
            seen.add(kind)
            if kind == _EXT_SERVER_NAME:
                name = _host_name(body[pos + 4 : data_end])
            pos = data_end
        return name
    except _Short:
        return NotClientHello("a length inside the ClientHello points past its end")


def _vector_end(body: memoryview, pos: int, width: int, limit: int = -1) -> int:
    """Where the vector whose ``width``-byte length is at ``pos`` ends (``_Short`` past
    ``limit``, default the body's end)."""
    limit = len(body) if limit < 0 else limit
    if pos + width > limit:
        raise _Short
    end = pos + width + int.from_bytes(body[pos : pos + width], "big")
    if end > limit:
        raise _Short
    return end


def _skip(body: memoryview, pos: int, width: int, max_length: int = 1 << 16) -> int:
    end = _vector_end(body, pos, width)
    if end - pos - width > max_length:
        raise _Short
    return end


# A DNS host name as a client may send it: LDH labels of 1-63 characters, at most 253 in all.
_LDH: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _host_name(data: memoryview) -> str | None:
    """The host_name entry of a server_name extension, or None when there is no usable one
    (the connection then falls back to the edge's own TLS, whose name rules apply)."""
    if len(data) < 2 or int.from_bytes(data[0:2], "big") != len(data) - 2:
        return None
    pos = 2
    while pos + 3 <= len(data):
        name_type = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 3], "big")
        end = pos + 3 + length
        if end > len(data):
            return None
        if name_type == _HOST_NAME:
            raw = bytes(data[pos + 3 : end])
            name = raw[:-1] if raw.endswith(b".") else raw
            if not 1 <= len(name) <= 253:
                return None
            labels = name.split(b".")
            if not all(1 <= len(label) <= 63 and set(label) <= _LDH for label in labels):
                return None
            return name.decode("ascii").lower()
        pos = end
    return None
