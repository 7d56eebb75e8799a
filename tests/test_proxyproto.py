"""tunneld/proxyproto.py: PROXY protocol v2 headers, checked byte for byte against vectors
written out from the specification (HAProxy's proxy-protocol.txt, section 2.2). nginx reads them
end to end in tests/e2e/test_public_tcp.py."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld.proxyproto import LOCAL_HEADER, SIGNATURE, encode_v2, parse_address

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")


def test_the_signature_is_the_specified_one() -> None:
    assert SIGNATURE == SIG


def test_tcp_over_ipv4() -> None:
    header = encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443))
    assert header == SIG + bytes.fromhex("21 11 000c c0000201 c6336407 dc04 01bb")


def test_tcp_over_ipv6() -> None:
    header = encode_v2("[2001:db8::1]:1234", ("2001:db8::2", 80, 0, 0))
    expected = (
        SIG
        + bytes.fromhex("21 21 0024")
        + ipaddress.IPv6Address("2001:db8::1").packed
        + ipaddress.IPv6Address("2001:db8::2").packed
        + bytes.fromhex("04d2 0050")
    )
    assert header == expected


def test_mixed_families_are_written_as_ipv6() -> None:
    header = encode_v2("203.0.113.9:5000", ("::1", 20000, 0, 0))
    assert header[12:16] == bytes.fromhex("21 21 0024")
    assert header[16:32] == ipaddress.IPv6Address("::ffff:203.0.113.9").packed
    assert header[32:48] == ipaddress.IPv6Address("::1").packed


def test_an_unknown_destination_is_the_unspecified_address() -> None:
    assert encode_v2("10.1.2.3:4", None) == SIG + bytes.fromhex(
        "21 11 000c 0a010203 00000000 0004 0000"
    )


@pytest.mark.parametrize(
    "source", ["unknown", "", None, "/run/x.sock", "1.2.3.4", "[fe80::1%eth0]:1", "1.2.3.4:99999"]
)
def test_an_unusable_source_is_a_local_header(source: object) -> None:
    header = encode_v2(source, ("127.0.0.1", 80))
    assert header == LOCAL_HEADER == SIG + bytes.fromhex("20 00 0000")


@given(st.ip_addresses(), st.integers(0, 65535), st.ip_addresses(), st.integers(0, 65535))
def test_any_address_pair_round_trips(src, sport, dst, dport) -> None:
    """Decoded with a reader written from the spec here (not the encoder's code)."""
    text = f"[{src}]:{sport}" if src.version == 6 else f"{src}:{sport}"
    header = encode_v2(text, (str(dst), dport))
    assert header[:12] == SIG and header[12] == 0x21
    length = int.from_bytes(header[14:16], "big")
    assert len(header) == 16 + length
    if header[13] == 0x11:
        assert length == 12 and src.version == dst.version == 4
        s, d = ipaddress.IPv4Address(header[16:20]), ipaddress.IPv4Address(header[20:24])
        ports = header[24:28]
    else:
        assert header[13] == 0x21 and length == 36
        s, d = ipaddress.IPv6Address(header[16:32]), ipaddress.IPv6Address(header[32:48])
        ports = header[48:52]
        s = s.ipv4_mapped or s if src.version == 4 else s
        d = d.ipv4_mapped or d if dst.version == 4 else d
    assert (s, d) == (src, dst)
    assert (int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")) == (sport, dport)


def test_parse_address_forms() -> None:
    assert parse_address(("127.0.0.1", 5)) == (ipaddress.IPv4Address("127.0.0.1"), 5)
    assert parse_address("[::1]:7") == (ipaddress.IPv6Address("::1"), 7)
    assert parse_address("::1") is None  # no port
    assert parse_address(("127.0.0.1", "5")) is None
