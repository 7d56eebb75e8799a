"""The numbers of docs/architecture.md (limits, windows, timeouts, versions), each read from the
code: a doc phrase and the constant it states are asserted together, so changing either alone
fails here. The behaviour around them is checked by the tests the doc names next to each claim
(tests/e2e/test_doc_claims_architecture*.py, tests/faults/, tests/cluster/)."""

from __future__ import annotations

import inspect
import socket
from pathlib import Path

from agent import portwatch
from protocol import control, frames, hostnames, session
from relay import buffers, mux
from tests.faults import test_hostile_agent, test_isolation
from tests.test_doc_claims_readme import check_links
from tunneld import (
    cluster,
    edge,
    exposefwd,
    h2public,
    handover,
    httphead,
    nodelink,
    redis_store,
    waitfwd,
)
from tunneld import inspect as tunneld_inspect
from tunneld.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOC = " ".join((ROOT / "docs" / "architecture.md").read_text().split())  # lines joined
KiB = 1024
MiB = 1024 * KiB


def claim(phrase: str) -> None:
    """The doc still says ``phrase`` (whitespace-normalised, so line breaks do not matter)."""
    assert " ".join(phrase.split()) in DOC, f"docs/architecture.md no longer says {phrase!r}"


def test_every_link_of_architecture_md_resolves() -> None:
    assert check_links(ROOT / "docs" / "architecture.md") >= 1


def test_the_request_path_numbers() -> None:
    """Step 2: a head is read 'until \\r\\n\\r\\n (≤ 32 KiB)'; step 6: the agent dials ports
    '1024-65535, not 3000'; the preface and 12-byte header with a version byte; an agent
    connection's first four bytes choose a raw or a WebSocket link."""
    claim("until `\\r\\n\\r\\n` (≤ 32 KiB)")
    assert 32 * KiB == httphead.MAX_HEAD_SIZE
    claim("validates the port (1024\u201365535, not 3000,")
    assert (hostnames.MIN_PORT, hostnames.MAX_PORT) == (1024, 65535)
    assert hostnames.CONTROL_PLANE_PORT == 3000
    claim("A preface** (`TUNL\\r\\n\\x01\\n`) starts the agent's byte stream, and the 12-byte")
    assert frames.PREFACE == b"TUNL\r\n\x01\n" and frames.HEADER_SIZE == 12
    assert frames.encode_frame(frames.FrameType.PING)[0] == frames.VERSION
    claim("The edge looks at the first four bytes of an agent connection: the preface `TUNL`")
    source = inspect.getsource(mux)
    assert "if len(self._sniff) < 4:" in source and 'data.startswith(b"GET ")' in source
    claim("`TUNNEL_LOOP=asyncio` selects the stock loop")
    claim("(`accept_remote_streams=False`;")
    assert "accept_remote_streams=False" in inspect.getsource(edge)


def test_http2_chains_its_flow_control_at_64_kib() -> None:
    """'past 64 KiB queued the endpoint is told `pause_writing`'."""
    claim("past 64 KiB queued the endpoint is told `pause_writing`")
    assert 64 * KiB == h2public.STREAM_HIGH_WATER


def test_cluster_leases_links_and_versions() -> None:
    """'renews the lease every `lease_s / 3` (15 s lease, every 5 s by default)'; node records
    'with a TTL of `3 x lease_s`, renewed every `lease_s`'; 'within `LINK_TIMEOUT` (3 s)'; the
    link versions of forwarded waits (≥ 2), exposes (≥ 3) and a tcp exposure's public port (≥ 4);
    'an agent whose hello says version ≥ 3 (`UNWATCH_PORT_VERSION`)'; '256 forwarded exposes in
    flight for that link, then `NODE_BUSY`'."""
    claim("it renews the lease every `lease_s / 3` (15 s lease, every 5 s by default)")
    assert Config().lease_s == 15.0
    assert "interval = self.lease_s / 3" in inspect.getsource(cluster.Cluster._renew_leases)
    claim("with a TTL of `3 \u00d7 lease_s`, renewed every `lease_s`")
    assert cluster.NODE_TTL_FACTOR == 3
    assert "await asyncio.sleep(self.lease_s)" in inspect.getsource(cluster.Cluster._renew_node)
    for method in (cluster.Cluster._register, cluster.Cluster._ensure_node):
        assert "self.lease_s * NODE_TTL_FACTOR" in inspect.getsource(method)
    claim("a `welcome`, within `LINK_TIMEOUT` (3 s)")
    assert cluster.LINK_TIMEOUT == 3.0
    claim('An owner says it serves this in its link `welcome` (`limits["version"]` ≥ 2')
    assert nodelink.WAIT_LINK_VERSION == 2
    claim('to an owner whose `welcome` says `limits["version"]` ≥ 3')
    assert nodelink.EXPOSE_LINK_VERSION == 3
    claim("sent only to a dialer whose `hello` says link version ≥ 4")
    assert nodelink.PUBLIC_PORT_LINK_VERSION == 4
    claim(
        "to an agent whose hello says version ≥ 3 (`protocol/control.py`: `UNWATCH_PORT_VERSION`)"
    )
    assert control.UNWATCH_PORT_VERSION == 3
    claim("256 forwarded exposes in flight for that link, then `NODE_BUSY`")
    assert exposefwd.MAX_SERVED_EXPOSES == 256


def test_hand_over_limits() -> None:
    """The hand-over socket's numbers: preludes 'at most 128 KiB in all', 'up to 32 messages',
    'no answer within 2 s', 'At most 1024 hand-over connections', 'within 10 s
    (`IDENTIFY_TIMEOUT`', a message read into '2 + 65,535 + 131,072 bytes ... with room for 32
    descriptors', 'more than 32 hand-overs ends the connection', warnings 'a burst of 10, then
    one a second'."""
    claim("the preludes, at most 128 KiB in all")
    assert 128 * KiB == handover.MAX_PRELUDE
    claim("The owner reads what is queued (up to 32 messages)")
    claim("or lists more than 32 hand-overs ends the connection")
    assert handover._BATCH == 32
    claim("With no answer within 2 s")
    assert handover.ACK_TIMEOUT == 2.0
    claim("At most 1024 hand-over connections are open on a node at once")
    assert handover.MAX_HANDOVER_CONNECTIONS == 1024
    claim("within 10 s (`IDENTIFY_TIMEOUT`")
    assert handover.IDENTIFY_TIMEOUT == 10.0
    claim("A message is read into 2 + 65,535 + 131,072 bytes")
    assert handover._MAX_MESSAGE == 2 + 65_535 + 131_072
    claim("with room for 32 descriptors")
    assert socket.CMSG_SPACE(handover._FD.size * 32) == handover._FD_SPACE
    claim("Warnings about these are a burst of 10, then one a second.")
    for log in (handover._REFUSED_LOG, handover._PEER_LOG):
        assert (log._budget._burst, log._budget._rate) == (10, 1.0)


def test_windows_and_water_marks() -> None:
    """'256 KiB per stream initially, doubling up to 4 MiB ..., 16 MiB per session'; the local
    high-water mark (256 KiB) and `resume_writing()` (at 64 KiB); 'capped at 32 MiB
    (`stream_growth_budget`'; send_data says pause 'once the stream has 256 KiB or more queued'
    and `StreamWritable` 'at 64 KiB queued'; the tunnel's high-water mark (256 KiB),
    `TCP_NOTSENT_LOWAT` = 128 KiB; reads 'of at most 16 KiB' coalesced; 'one frame (≤ 64 KiB)'
    per stream per round; 'one 256 KiB buffer per process'."""
    claim("256 KiB per stream initially, doubling up to 4 MiB")
    claim("16 MiB per session.")
    assert 256 * KiB == frames.INITIAL_STREAM_WINDOW
    assert 4 * MiB == frames.DEFAULT_MAX_STREAM_WINDOW
    assert 16 * MiB == frames.INITIAL_SESSION_WINDOW
    claim("only while the local transport is below its high-water mark (256 KiB)")
    claim("`resume_writing()` (at 64 KiB) returns it")
    assert (256 * KiB, 64 * KiB) == (mux.LOCAL_HIGH_WATER, mux.LOCAL_LOW_WATER)
    claim("beyond 256 KiB is capped at 32 MiB (`stream_growth_budget`")
    assert 32 * MiB == session.DEFAULT_STREAM_GROWTH_BUDGET
    assert session.SessionConfig().stream_growth_budget == 32 * MiB
    claim('answers "pause" once the stream has 256 KiB or more queued')
    claim("the `StreamWritable` event (at 64 KiB queued)")
    defaults = session.SessionConfig()
    assert (defaults.stream_send_high_water, defaults.stream_send_low_water) == (
        256 * KiB,
        64 * KiB,
    )
    claim("up to just past the tunnel transport's high-water mark (256 KiB)")
    assert 256 * KiB == mux.TUNNEL_HIGH_WATER
    claim("The tunnel socket has `TCP_NOTSENT_LOWAT` = 128 KiB")
    assert 128 * KiB == mux.TUNNEL_NOTSENT_LOWAT
    claim("A local read of at most 16 KiB is copied")
    assert 16 * KiB == mux.COALESCE_MAX
    claim("one frame (≤ 64 KiB) per stream per round")
    assert 64 * KiB == frames.MAX_FRAME_PAYLOAD
    claim("returns one 256 KiB buffer per process")
    assert 256 * KiB == buffers.READ_SIZE


def test_the_memory_bound_is_the_one_derived_and_the_one_tested() -> None:
    """'at most `streams x (256 KiB + 256 KiB + 64 KiB) + 32 MiB` ...: for 200 stalled readers,
    144 MiB', the terms being the stream window, the local high-water mark and one frame; the
    isolation test runs 200 stalled readers against that bound plus 32 MiB of slack."""
    claim("`streams \u00d7 (256 KiB + 256 KiB + 64 KiB) + 32 MiB`")
    claim("for 200 stalled readers, 144 MiB")
    per_stream = frames.INITIAL_STREAM_WINDOW + mux.LOCAL_HIGH_WATER + frames.MAX_FRAME_PAYLOAD
    assert per_stream == (256 + 256 + 64) * KiB
    assert (200 * per_stream + session.DEFAULT_STREAM_GROWTH_BUDGET) // MiB == 144
    claim("plus 32 MiB of slack for the process itself")
    assert test_isolation.STALLED == 200
    source = inspect.getsource(test_isolation)
    assert "bound = STALLED * per_stream + DEFAULT_STREAM_GROWTH_BUDGET + 32 * MiB" in source


def test_reply_paths_are_capped_at_the_stated_values() -> None:
    """'past 1 MiB of unsent output (`TUNNEL_OUTPUT_CAP`)'; PINGs 'token bucket (10/s, burst
    100'; 'the 1000th refusal closes the session'; the flood test's 'RSS growth stays under
    64 MiB'."""
    claim("past 1 MiB of unsent output (`TUNNEL_OUTPUT_CAP`)")
    assert 1 * MiB == mux.TUNNEL_OUTPUT_CAP
    claim("PINGs go through a token bucket (10/s, burst 100;")
    assert (session._PING_RATE, session._PING_BURST) == (10.0, 100.0)
    claim("the 1000th refusal closes the session")
    assert edge.MAX_REFUSED_REQUESTS == 1000
    claim("floods a real edge with all four for 10 s: RSS growth stays under 64 MiB")
    assert test_hostile_agent.FLOOD_SECONDS == 10.0
    assert "assert growth <= 64 * MiB" in inspect.getsource(test_hostile_agent)


def test_where_state_lives_bounds() -> None:
    """'at most 10,000 rings: `MAX_INSPECTED_SANDBOXES`'; forwarded waits 'at most 4096 per
    link'; the agent's port watches 'at most 64'; Redis calls 'socket timeout 2 s, one retry on
    a dead pooled connection'."""
    claim("at most 10,000 rings: `MAX_INSPECTED_SANDBOXES`")
    assert tunneld_inspect.MAX_INSPECTED_SANDBOXES == 10_000
    claim("(one task each, at most 4096 per link)")
    assert waitfwd.MAX_SERVED_WAITS == 4096
    claim("`Agent.port_watches` (count, at most 64)")
    assert portwatch.MAX_WATCHES == 64
    claim("(socket timeout 2 s, one retry on a dead pooled connection)")
    assert redis_store.DEFAULT_TIMEOUT == 2.0
    source = inspect.getsource(redis_store.RedisStore)
    assert "retry=_Retry(NoBackoff(), 1, (RedisConnectionError,))" in source
