"""tunneld/sni.py: the ClientHello server-name parser, on real ClientHellos (OpenSSL's, made
with ssl.MemoryBIO), whole, byte by byte, re-split over records, with trailing bytes, and fuzzed:
it must never raise, and never ask for more than MAX_PEEK bytes."""

from __future__ import annotations

import ssl
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.sni import (
    MAX_HELLO_LENGTH,
    MAX_HELLO_RECORDS,
    MAX_PEEK,
    ClientHello,
    NeedMore,
    NotClientHello,
    parse_client_hello,
)


@cache
def client_hello(server_hostname: str | None, *, tls12: bool = False) -> bytes:
    """The bytes OpenSSL sends first as a client (one or more records)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        sslobj.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a client handshake cannot finish without the server")


def records_of(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        out.append(data[pos : pos + 5 + length])
        pos += 5 + length
    return out


def resplit(data: bytes, cuts: list[int]) -> bytes:
    """The same handshake bytes carried by several records, cut at ``cuts``."""
    (record,) = records_of(data)
    header, body = record[:5], record[5:]
    out, start = b"", 0
    for cut in [*sorted(set(c for c in cuts if 0 < c < len(body))), len(body)]:
        piece = body[start:cut]
        out += header[:3] + len(piece).to_bytes(2, "big") + piece
        start = cut
    return out


NAME = "8000-sb1-upzsscvle0dn92cj.preview.example.com"


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_a_real_client_hello_names_its_server(tls12: bool) -> None:
    data = client_hello(NAME, tls12=tls12)
    result = parse_client_hello(data)
    assert result == ClientHello(NAME, len(data))


def test_the_name_is_lowercased_and_loses_a_trailing_dot() -> None:
    data = client_hello("8000-SB1-Tok.Example.COM.")
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello)
    assert result.server_name == "8000-sb1-tok.example.com"


def test_no_sni_is_a_hello_without_a_name() -> None:
    data = client_hello(None)
    assert parse_client_hello(data) == ClientHello(None, len(data))


def test_every_prefix_asks_for_more_and_says_how_much() -> None:
    data = client_hello(NAME)
    prefix_len = 0
    steps = 0
    while True:
        result = parse_client_hello(data[:prefix_len])
        if isinstance(result, ClientHello):
            break
        assert isinstance(result, NeedMore), (prefix_len, result)
        assert prefix_len < result.total <= len(data)
        prefix_len = result.total  # what a caller with SO_RCVLOWAT does
        steps += 1
    assert result.server_name == NAME and prefix_len == len(data)
    assert steps <= 3  # record header, handshake header, the rest
    for n in range(len(data)):  # and byte by byte
        assert isinstance(parse_client_hello(data[:n]), NeedMore), n


def test_trailing_bytes_are_not_read() -> None:
    data = client_hello(NAME)
    result = parse_client_hello(data + b"\x17\x03\x03\x00\x05hello" + bytes(100))
    assert result == ClientHello(NAME, len(data))


@given(st.lists(st.integers(min_value=1, max_value=600), max_size=MAX_HELLO_RECORDS - 1))
@settings(max_examples=200)
def test_a_hello_split_over_records(cuts: list[int]) -> None:
    data = resplit(client_hello(NAME), cuts)
    assert parse_client_hello(data) == ClientHello(NAME, len(data))
    for n in range(0, len(data), 7):
        assert isinstance(parse_client_hello(data[:n]), NeedMore)


def test_too_many_records_are_refused() -> None:
    data = resplit(client_hello(NAME), list(range(1, MAX_HELLO_RECORDS + 1)))
    assert isinstance(parse_client_hello(data), NotClientHello)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x17\x03\x03\x00\x05hello",  # application data, not a handshake
        b"\x16\x02\x00\x00\x05hello",  # not version 3.x
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x16\x03",  # a partial header of the right kind is not refused yet
    ],
    ids=["http", "appdata", "version", "empty", "serverhello", "ssh", "partial"],
)
def test_not_a_client_hello(data: bytes) -> None:
    result = parse_client_hello(data)
    if data == b"\x16\x03":
        assert result == NeedMore(5)
    else:
        assert isinstance(result, NotClientHello)
        assert not result.too_large


def test_a_non_tls_first_byte_is_refused_at_once() -> None:
    assert isinstance(parse_client_hello(b"G"), NotClientHello)
    assert parse_client_hello(b"") == NeedMore(5)


def test_oversized_hellos_are_refused_before_they_arrive() -> None:
    big_record = b"\x16\x03\x01\x40\x01"  # 16385 > 2^14
    result = parse_client_hello(big_record)
    assert isinstance(result, NotClientHello) and result.too_large
    body_length = (MAX_HELLO_LENGTH + 1).to_bytes(3, "big")
    huge_hello = b"\x16\x03\x01\x40\x00\x01" + body_length  # the handshake header says too much
    result = parse_client_hello(huge_hello)
    assert isinstance(result, NotClientHello) and result.too_large


def test_data_after_the_hello_in_its_record_is_refused() -> None:
    (record,) = records_of(client_hello(NAME))
    body = record[5:] + b"\x01\x00\x00\x00"
    data = record[:3] + len(body).to_bytes(2, "big") + body
    assert isinstance(parse_client_hello(data), NotClientHello)


@pytest.mark.parametrize(
    "name", [b"a..b", b"-" * 64 + b".com", b"caf\xc3\xa9.com", b"a b.com", b"", b"x" * 254]
)
def test_an_unusable_host_name_is_no_name(name: bytes) -> None:
    """Rebuild a real hello with a server_name entry the parser must not route on."""
    data = client_hello("placeholder.example")
    result = parse_client_hello(swap_name(data, name))
    assert result == ClientHello(None, len(swap_name(data, name)))


def swap_name(data: bytes, name: bytes) -> bytes:
    """``data`` (a one-record hello naming placeholder.example) naming ``name`` instead."""
    old = b"placeholder.example"
    (record,) = records_of(data)
    body = bytearray(record[5:])
    at = body.index(old)
    delta = len(name) - len(old)
    body[at : at + len(old)] = name
    # lengths to fix: name (2 bytes before), list (5 before), extension (7 before), extensions,
    # handshake; the extensions' length sits right after the compression methods
    for offset in (at - 2, at - 5, at - 7):
        value = int.from_bytes(body[offset : offset + 2], "big") + delta
        body[offset : offset + 2] = value.to_bytes(2, "big")
    pos = 4 + 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    value = int.from_bytes(body[pos : pos + 2], "big") + delta
    body[pos : pos + 2] = value.to_bytes(2, "big")
    body[1:4] = (len(body) - 4).to_bytes(3, "big")
    return record[:3] + len(body).to_bytes(2, "big") + bytes(body)


def test_swap_name_builds_a_hello_the_parser_reads() -> None:
    data = swap_name(client_hello("placeholder.example"), b"other.example.org")
    assert parse_client_hello(data) == ClientHello("other.example.org", len(data))


def test_a_duplicate_extension_is_refused() -> None:
    data = swap_name(client_hello("placeholder.example"), b"placeholder.example")
    (record,) = records_of(data)
    body = bytearray(record[5:])
    # append a second, empty extension of type 0x0017 twice
    extra = b"\x00\x17\x00\x00" * 2
    pos = 4 + 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    value = int.from_bytes(body[pos : pos + 2], "big") + len(extra)
    body[pos : pos + 2] = value.to_bytes(2, "big")
    body += extra
    body[1:4] = (len(body) - 4).to_bytes(3, "big")
    data = record[:3] + len(body).to_bytes(2, "big") + bytes(body)
    assert isinstance(parse_client_hello(data), NotClientHello)


def check_contract(data: bytes) -> None:
    result = parse_client_hello(data)
    if isinstance(result, NeedMore):
        assert len(data) < result.total <= MAX_PEEK
    elif isinstance(result, ClientHello):
        assert result.length <= len(data)
        name = result.server_name
        assert name is None or (name == name.lower() and name.isascii() and len(name) <= 253)
    else:
        assert isinstance(result, NotClientHello)


@given(st.binary(max_size=600))
@settings(max_examples=1000)
def test_fuzz_random_bytes(data: bytes) -> None:
    check_contract(data)
    check_contract(b"\x16\x03\x01" + data)


@given(st.data())
@settings(max_examples=1000)
def test_fuzz_mutated_real_hellos(draw: st.DataObject) -> None:
    data = bytearray(client_hello(NAME))
    for _ in range(draw.draw(st.integers(1, 8))):
        at = draw.draw(st.integers(0, len(data) - 1))
        data[at] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(0, len(data)))
    check_contract(bytes(data[:cut]))
    check_contract(bytes(data))
