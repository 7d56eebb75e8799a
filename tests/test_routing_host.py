"""``routing_host``: the Host of a plain head without parsing it (a cluster node's quick look,
tunneld/public.py ``_quick_hand_over``), and the route cache of the public listener. What the
quick look returns must be what a full parse finds whenever that parse accepts the head."""

from __future__ import annotations

import pytest

import tunneld.public as public
from protocol.hostnames import PreviewRoute, parse_preview_host
from tunneld.httphead import H11HeadParser, HeadError, HttptoolsHeadParser, routing_host

HOST = b"8000-sb1-tok.localhost:8080"

PLAIN = [
    b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n",
    b"GET /x?y=1 HTTP/1.1\r\nUser-Agent: a\r\nhOsT:\t" + HOST + b" \t\r\nAccept: */*\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: " + HOST + b"\r\nContent-Length: 1, 2\r\n\r\n",  # parse: 400
    b"GET / HTTP/1.1\r\nX-Host: other\r\nHost: " + HOST + b"\r\nX-Forwarded-Host: o\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost:" + HOST + b"\r\n\r\n",
]
NO_HOST = [
    b"GET / HTTP/1.1\r\n\r\n",  # none
    b"GET / HTTP/1.1\r\nHost: \r\n\r\n",  # an empty one
    b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\nHOST: other\r\n\r\n",  # two (any case)
    b"GET / HTTP/1.1\r\nhost: other\r\nHost: " + HOST + b"\r\n\r\n",
    b"GET / HTTP/1.1\nHost: " + HOST + b"\n\n",  # no CRLF line ends
]
# Heads a parser refuses: the quick look may still find a Host (the owner answers the 400), but
# a value that a bare CR or LF made is no preview host.
REFUSED = [
    b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\n folded\r\n\r\n",  # obs-fold
    b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\nX: a\nHost: other\r\n\r\n",  # bare LF
    b"GET / HTTP/1.1\r\nHost: " + HOST + b"\nX: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: " + HOST + b"\rX: a\r\n\r\n",  # bare CR
    b"GET / HTTP/1.1\r\nHost: other\nHost: " + HOST + b"\r\n\r\n",
]


@pytest.mark.parametrize("head", PLAIN)
def test_a_head_with_one_host_gives_it(head: bytes) -> None:
    assert routing_host(head) == HOST
    assert routing_host(bytearray(head)) == HOST  # the landing node's prelude


@pytest.mark.parametrize("head", NO_HOST)
def test_no_host_or_more_than_one_gives_none(head: bytes) -> None:
    assert routing_host(head) is None


@pytest.mark.parametrize("head", REFUSED)
def test_a_host_a_bare_line_end_made_routes_nowhere(head: bytes) -> None:
    host = routing_host(head)
    if host != HOST:
        assert host is None or parse_preview_host(host.decode(), "localhost") is None


@pytest.mark.parametrize("parser", [HttptoolsHeadParser(), H11HeadParser()], ids=lambda p: p.name)
@pytest.mark.parametrize("head", PLAIN + NO_HOST + REFUSED)
def test_a_parser_that_accepts_the_head_finds_the_same_routing_host(
    parser: object, head: bytes
) -> None:
    quick = routing_host(head)
    try:
        parsed = parser.parse(head)  # type: ignore[attr-defined]
    except HeadError:
        return  # refused by the owner's full parse: the client gets that answer
    # h11 ends a line at a bare LF too: the value found here then holds it, and routes nowhere
    routes = quick is not None and parse_preview_host(quick.decode(), "localhost") is not None
    assert parsed.host == quick if routes else quick is None or b"\n" in quick or b"\r" in quick


def test_routes_are_remembered_for_hosts_that_route_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(public, "_ROUTES", {})
    monkeypatch.setattr(public, "_MAX_ROUTES", 3)
    route = public._preview_route(HOST, "localhost", True)
    assert route == parse_preview_host(HOST.decode(), "localhost", tokens=True)
    assert route is not None and public._preview_route(HOST, "localhost", True) is route
    # the domain and the token mode are part of the key (a reload may change them)
    assert public._preview_route(HOST, "example.com", True) is None
    assert public._preview_route(HOST, "localhost", False) == PreviewRoute(8000, "sb1-tok", None)
    assert public._preview_route(b"nothing.localhost", "localhost", True) is None
    # misses are not kept
    assert list(public._ROUTES) == [(HOST, "localhost", True), (HOST, "localhost", False)]
    for port in range(8001, 8006):
        host = b"%d-sb1-tok.localhost" % port
        assert public._preview_route(host, "localhost", True) is not None
        assert len(public._ROUTES) <= 3
    long = b"8000-sb1-" + b"t" * 54 + b".localhost:" + b"0" * 300 + b"8080"  # a label of 63
    assert public._preview_route(long, "localhost", True) is not None
    assert (long, "localhost", True) not in public._ROUTES  # too long to keep
