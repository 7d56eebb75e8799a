"""A landing worker hands a first head over on a look at its one Host header, unparsed
(``PublicConnection._quick_hand_over``): the owner still parses and validates all of it and
answers, and the landing worker still refuses itself what the full parse and routing refuse
before a hand-over (an unknown token, two Host headers)."""

from __future__ import annotations

import orjson
import pytest

from .nodes import Cluster, Node, wait_for
from .test_forwarding import raw_exchange
from .test_handover import _responses, _two_nodes_agent_on_b

pytestmark = pytest.mark.anyio


def _host(url: str) -> bytes:
    return url.split("//", 1)[1].split("/", 1)[0].encode()


def _refusals(node: Node, code: str) -> bool:
    line = f'tunneld_public_refusals_total{{code="{code}"}} 1.0'.encode()
    return line in node.edge.metrics.render()


async def test_a_plain_head_goes_over_unparsed_and_the_owner_validates_it(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    # Conflicting lengths: a full parse refuses this head (400). The landing worker A does not
    # parse it: B gets the socket, parses it and answers the 400 A would have answered.
    head = b"GET / HTTP/1.1\r\nHost: " + _host(url) + b"\r\nContent-Length: 1, 2\r\n\r\n"
    data = await raw_exchange(a.edge.public_port, head)
    ((status, headers, body),) = _responses(data)
    assert (status, orjson.loads(body)["code"]) == (400, "BAD_REQUEST")
    assert headers[b"connection"] == b"close"
    await wait_for(lambda: a.edge.handover.sent == 1, what="B's answer to the hand-over")
    assert b.edge.handover.received == 1
    assert _refusals(b, "BAD_REQUEST") and not _refusals(a, "BAD_REQUEST")
    # and a valid one the same way is served
    head = b"GET /headers HTTP/1.1\r\nHost: " + _host(url) + b"\r\nConnection: close\r\n\r\n"
    ((status, _headers, body),) = _responses(await raw_exchange(a.edge.public_port, head))
    assert status == 200 and ["x-forwarded-for", "127.0.0.1"] in orjson.loads(body)
    await wait_for(lambda: a.edge.handover.sent == 2, what="B's answer to the hand-over")
    assert b.edge.handover.received == 2


@pytest.mark.parametrize(
    "extra",
    [b"X-Folded: a\r\n b\r\n", b"X-Bare: a\nHost: other.example\r\n"],  # obs-fold, bare LF
)
async def test_a_malformed_head_with_one_host_line_is_refused_by_the_owner(
    cluster: Cluster, extra: bytes
) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    head = b"GET / HTTP/1.1\r\nHost: " + _host(url) + b"\r\n" + extra + b"\r\n"
    ((status, _headers, body),) = _responses(await raw_exchange(a.edge.public_port, head))
    assert (status, orjson.loads(body)["code"]) == (400, "BAD_REQUEST")
    await wait_for(lambda: a.edge.handover.sent == 1, what="B's answer to the hand-over")
    assert b.edge.handover.received == 1 and _refusals(b, "BAD_REQUEST")


async def test_two_host_headers_are_parsed_and_refused_where_they_landed(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    for second in (b"HOST: other.example", b"host: " + _host(url)):
        head = b"GET / HTTP/1.1\r\nHost: " + _host(url) + b"\r\n" + second + b"\r\n\r\n"
        ((status, _headers, body),) = _responses(await raw_exchange(a.edge.public_port, head))
        assert (status, orjson.loads(body)["code"]) == (400, "BAD_REQUEST")
    assert (a.edge.handover.sent, b.edge.handover.received) == (0, 0)
    assert b'tunneld_public_refusals_total{code="BAD_REQUEST"} 2.0' in a.edge.metrics.render()


async def test_a_wrong_token_is_refused_by_the_landing_worker(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    label, _, rest = _host(url).partition(b".")
    wrong = label.rpartition(b"-")[0] + b"-wrongtoken." + rest
    head = b"GET / HTTP/1.1\r\nHost: " + wrong + b"\r\nConnection: close\r\n\r\n"
    ((status, _headers, body),) = _responses(await raw_exchange(a.edge.public_port, head))
    assert (status, orjson.loads(body)["code"]) == (404, "INVALID_TOKEN")
    assert (a.edge.handover.sent, b.edge.handover.received) == (0, 0)
    assert _refusals(a, "INVALID_TOKEN")
