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
from tests.test_doc_claims_readme import check_cited, check_links
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


# The tests that check each behaviour claim the doc does not cite in place: (the doc's phrase,
# the tests). test_each_cited_test_exists keeps this list true when a test is renamed or moved.
CITED: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "arms the `head_timeout` timer",
        ("tests/e2e/test_preview.py::test_head_timeout_is_408",),
    ),
    (
        "it counts the connection in the limits, arms the timer and takes the first read",
        (
            "tests/cluster/test_landing.py::test_per_ip_limits_count_a_landed_connection_once",
            "tests/cluster/test_landing.py::test_a_head_that_does_not_arrive_in_time_gets_its_408",
        ),
    ),
    ("(≤ 32 KiB)", ("tests/e2e/test_preview.py::test_oversized_head_is_431",)),
    (
        "Failures are small JSON pages (404 `UNKNOWN_HOST`, 404 `INVALID_TOKEN`, 503"
        " `SANDBOX_NOT_CONNECTED`)",
        (
            "tests/e2e/test_preview.py::test_unknown_host_is_404_json",
            "tests/e2e/test_preview.py::test_errors_unknown_token_and_unexposed_port_look_the_same",
            "tests/e2e/test_preview.py::test_agent_stopped_is_503",
        ),
    ),
    (
        'yields `(8000, "sb1", "upzsscvle0dn92cj")`',
        ("tests/e2e/test_doc_claims_architecture_path.py::test_the_routing_example_of_step_3",),
    ),
    (
        'a `DATA|SYN` frame with `{"port":8000,"via":"preview","client":…}`',
        (
            "tests/e2e/test_doc_claims_architecture_path.py::"
            "test_the_head_follows_the_syn_before_the_agent_answers",
        ),
    ),
    (
        "right behind the SYN, without waiting for the agent",
        (
            "tests/e2e/test_doc_claims_architecture_path.py::"
            "test_the_head_follows_the_syn_before_the_agent_answers",
        ),
    ),
    (
        "internal and forwarding headers dropped, `X-Forwarded-For/-Host/-Proto` and"
        " `X-Sandbox-Name` appended",
        ("tests/e2e/test_preview.py::test_forwarded_headers_and_spoofing",),
    ),
    (
        "so even a hostile edge reaches nothing else",
        (
            "tests/faults/test_hostile_edge_2.py::"
            "test_refused_and_failed_streams_leave_nothing_in_the_agent",
            "tests/faults/test_hostile_edge_2.py::test_the_edge_cannot_choose_the_host_the_agent_dials",
            "tests/faults/test_agent_preview_exposures.py::"
            "test_preview_stream_to_an_unexposed_port_is_reset_and_logged",
            "tests/faults/test_agent_api_port.py::"
            "test_hostile_edge_cannot_open_a_stream_to_the_api_port",
        ),
    ),
    (
        "dials `127.0.0.1:8000` (then `::1`)",
        (
            "tests/faults/test_agent_dials_ipv6_loopback.py::"
            "test_a_preview_stream_reaches_a_service_on_ipv6_loopback_only",
        ),
    ),
    (
        "(SSE, chunked, multi-GB downloads stream through)",
        (
            "tests/e2e/test_preview.py::test_sse_first_event_before_origin_finishes",
            "tests/e2e/test_preview.py::test_download_1gib_integrity",
        ),
    ),
    (
        "on `101` the connection becomes a raw two-way tunnel and nothing is parsed any more; on"
        " anything else that response is relayed and the connection ends",
        (
            "tests/faults/test_public_upgrade.py::test_101_makes_a_raw_tunnel_and_early_bytes_arrive",
            "tests/faults/test_public_upgrade.py::test_refused_upgrade_drops_early_bytes_and_closes",
        ),
    ),
    (
        "without changing a byte but one `x-request-id` line per head",
        (
            "tests/test_responses.py::"
            "test_every_byte_passes_and_every_response_ends_where_h11_says",
            "tests/test_speedups.py",
        ),
    ),
    (
        "a stream that dies before any response byte is a 502/503 JSON page",
        ("tests/faults/test_public_upstream_failures.py::test_link_drop_before_answer_is_503",),
    ),
    (
        "so even the kernel's close of a killed edge is an RST",
        ("tests/faults/test_edge_shutdown_cut.py::test_edge_killed_mid_response_is_a_reset",),
    ),
    (
        "the agent resets its connection to the service the same way for a cut upload",
        ("tests/faults/test_agent_upload_reset.py::test_upload_cut_short_through_the_edge",),
    ),
    (
        "Every session end is logged on both sides with its reason.",
        (
            "tests/faults/test_session_end_logged.py::"
            "test_edge_logs_an_agent_link_cut_with_its_reason",
            "tests/faults/test_agent_session_end_log.py::test_link_lost_logs_the_connection_error",
        ),
    ),
    (
        "One client TCP connection is one stream and one TCP connection to the service",
        ("tests/e2e/test_preview.py::test_keepalive_100_sequential",),
    ),
    (
        "A response that ends abnormally is `RST_STREAM`, never `END_STREAM`.",
        ("tests/e2e/test_http2.py::test_cut_response_is_a_stream_reset_never_end_stream",),
    ),
    (
        "request DATA is acknowledged to the client only once the tunnel took it",
        ("tests/e2e/test_http2.py::test_upload_to_a_stalled_service_is_bounded_by_h2_window",),
    ),
    (
        "so it holds the tunnel credit exactly as for a slow socket",
        ("tests/e2e/test_http2.py::test_slow_h2_reader_is_bounded_by_tunnel_credit",),
    ),
    (
        "with half-close passed on and a reset kept a reset",
        (
            "tests/e2e/test_raw_tcp.py::test_bytes_both_ways_by_hash_and_half_close",
            "tests/e2e/test_raw_tcp.py::test_a_service_reset_reaches_the_client_as_a_reset",
            "tests/e2e/test_raw_tcp_ws.py::"
            "test_bytes_both_ways_by_hash_half_close_and_a_clean_close",
            "tests/e2e/test_public_tcp.py::test_half_close_is_honoured_both_ways",
            "tests/e2e/test_public_tcp.py::test_a_reset_stays_a_reset",
        ),
    ),
    (
        "so the TLS session ends in the sandbox",
        ("tests/e2e/test_public_tcp.py::test_tls_is_routed_by_sni_to_the_sandbox_unterminated",),
    ),
    (
        "so the service sees the client's address",
        ("tests/e2e/test_public_tcp.py::test_proxy_protocol_tells_nginx_the_real_client",),
    ),
    (
        "another node answers 409 `WRONG_NODE`",
        (
            "tests/e2e/test_inspect.py::"
            "test_in_a_cluster_records_are_on_the_owner_and_other_nodes_say_so",
        ),
    ),
    (
        "a wrong token is a 404 without any hop",
        (
            "tests/cluster/test_handover_quick.py::test_a_wrong_token_is_refused_by_the_landing_worker",
        ),
    ),
    (
        "then the client gets 502 `NODE_UNREACHABLE`",
        ("tests/cluster/test_forwarding.py::test_an_unreachable_owner_is_a_quick_502",),
    ),
    (
        "a newer one means B is the stale node",
        ("tests/cluster/test_forwarding.py::test_a_stale_owner_refuses_a_stream_of_a_newer_epoch",),
    ),
    (
        "answers 421 to a request for another host",
        ("tests/cluster/test_forwarding.py::test_the_owner_checks_every_forwarded_request",),
    ),
    (
        "so an abnormal end stays abnormal across the hop",
        (
            "tests/cluster/test_forwarding.py::test_an_abnormal_end_stays_abnormal_across_the_hop",
            "tests/cluster/test_forwarding_backpressure.py::"
            "test_a_reset_mid_response_stays_a_reset_across_a_backed_up_hop",
        ),
    ),
    (
        "So a slow client at A slows the link stream, then the agent's stream, then the service.",
        (
            "tests/cluster/test_forwarding_backpressure.py::"
            "test_a_large_download_to_a_slow_client_is_bounded_and_lossless",
        ),
    ),
    (
        "so the newest session wins wherever it is",
        (
            "tests/cluster/test_forwarding.py::test_a_new_session_on_another_node_takes_the_sandbox_over",
        ),
    ),
    (
        "a lease that merely expired meanwhile is claimed again with a new epoch",
        (
            "tests/cluster/test_forwarding.py::"
            "test_an_outage_longer_than_the_lease_ends_with_the_owner_claiming_again",
        ),
    ),
    (
        "released at session end; the newest epoch wins",
        ("tests/cluster/test_forwarding.py::test_a_stopped_node_releases_its_leases_and_record",),
    ),
    (
        "removed at a clean stop; a node id without a record is not dialed",
        (
            "tests/cluster/test_forwarding.py::test_a_stopped_node_releases_its_leases_and_record",
            "tests/cluster/test_route_store_down.py::"
            "test_a_preview_request_is_answered_503_when_the_owners_address_cannot_be_read",
        ),
    ),
    (
        "the link dropping fails the landing node's waits on it at once (502)",
        (
            "tests/cluster/test_wait_cluster.py::"
            "test_a_cut_link_fails_the_wait_and_stops_the_probes_on_the_owner",
        ),
    ),
    (
        "no answer within the wait's timeout + `control_timeout` + `LINK_TIMEOUT` is 504"
        " `NODE_TIMEOUT`",
        (
            "tests/cluster/test_wait_cluster.py::test_an_owner_that_never_answers_is_504_node_timeout",
        ),
    ),
    (
        "an older one is not asked (501 `NODE_TOO_OLD`)",
        (
            "tests/cluster/test_wait_cluster.py::"
            "test_an_owner_from_before_forwarded_waits_is_not_asked",
        ),
    ),
    (
        "the agent cancels that watch's task, which closes any probe connection in flight",
        ("tests/e2e/test_wait_cancel.py::test_client_leaving_mid_wait_stops_the_agents_probes",),
    ),
    (
        "so a refused hand-over loses nothing",
        (
            "tests/cluster/test_handover.py::test_a_refused_hand_over_falls_back_to_the_node_link",
            "tests/cluster/test_handover.py::test_a_stale_owner_refuses_the_socket_and_nothing_is_lost",
        ),
    ),
    (
        "(an error for the client, never a wrong answer)",
        (
            "tests/cluster/test_handover.py::"
            "test_an_owner_that_never_answers_gets_the_socket_and_nobody_serves_it_twice",
        ),
    ),
    (
        "Both sides do this.",
        (
            "tests/faults/test_stalled_agent_close.py::"
            "test_an_agent_that_stops_reading_loses_its_ended_session_s_connection",
            "tests/faults/test_agent_output_cap.py::"
            "test_an_edge_that_never_reads_its_replies_is_held_at_the_cap_then_dropped",
        ),
    ),
    (
        "PINGs go through a token bucket (10/s, burst 100; past it `GO_AWAY(TOO_MANY_REQUESTS)`)",
        (
            "tests/protocol/test_doc_tables_protocol.py::test_the_ping_rate_limit_is_the_documented_one",
        ),
    ),
    (
        "the tunnel socket stops being read and the peer's own sends block",
        (
            "tests/faults/test_bounds_wslink_output.py::"
            "test_a_pre_hello_ping_flood_that_is_never_read_stops_at_the_output_cap",
            "tests/faults/test_agent_output_cap.py::"
            "test_an_edge_that_never_reads_its_replies_is_held_at_the_cap_then_dropped",
        ),
    ),
    (
        "so an interactive stream waits behind at most one frame of each bulk stream",
        ("tests/protocol/test_session.py::test_fairness_small_write_not_stuck_behind_bulk",),
    ),
    (
        "`tests/e2e/test_backpressure.py` checks this bound",
        ("tests/e2e/test_backpressure.py::test_slow_reader_is_bounded_and_does_not_stall_others",),
    ),
    (
        "the buffer is retired (`SHARED.swap()`) and a fresh one takes its place",
        (  # each fails (corrupted bytes) when release_shared never swaps
            "tests/e2e/test_preview.py::test_download_1gib_integrity",
            "tests/e2e/test_preview.py::test_upload_256mib_integrity",
            "tests/e2e/test_backpressure.py::test_slow_reader_is_bounded_and_does_not_stall_others",
        ),
    ),
    (
        "`DataReceived.data` is a `bytes` copy out of the session's receive buffer",
        (  # they fail when FrameReader hands out a view of its buffer instead
            "tests/e2e/test_preview.py::test_upload_256mib_integrity",
            "tests/e2e/test_backpressure.py::test_slow_reader_is_bounded_and_does_not_stall_others",
        ),
    ),
    (
        "survives agent reconnects and edge restarts",
        ("tests/faults/test_durable_restart.py::test_exposures_tokens_and_urls_survive_kill_9",),
    ),
    (
        "`attach` swaps a new session in atomically and returns the old one to close with"
        " `REPLACED`",
        ("tests/e2e/test_admin.py::test_new_session_replaces_old_one",),
    ),
    (
        "so the cap is exact for the cluster",
        (
            "tests/cluster/test_sandbox_cap_redis.py::"
            "test_two_nodes_racing_first_exposes_stop_exactly_at_the_cap",
        ),
    ),
    (
        "the preface `TUNL` means a raw link, `GET ` an HTTP upgrade to `/v1/agent`",
        (
            "tests/e2e/test_wslink.py::test_agent_over_websocket_serves_preview_traffic",
            "tests/e2e/test_wslink.py::test_garbage_on_the_agent_port_is_closed",
        ),
    ),
    (
        "it rewrites the handshake (path, `Host`, no `Authorization`) and relays bytes",
        ("tests/e2e/test_api_claims_ws.py::test_the_handshake_the_sandbox_gets",),
    ),
    (
        "so a wrong peer or version fails at the first bytes",
        ("tests/protocol/test_frames.py::test_bad_preface",),
    ),
    (
        "starts workers as fresh interpreters (not forks: asyncio and fork do not mix), restarts"
        " those that die, relays SIGHUP/SIGTERM",
        ("tests/cluster/test_workers.py::test_workers_serve_restart_reload_and_stop",),
    ),
    (
        "a marker file making a run that did not stop cleanly recoverable and never silently"
        " overwritten",
        (
            "tests/cluster/test_workers_private_store.py::"
            "test_workers_on_sqlite_share_a_private_redis_and_save_at_a_clean_stop",
            "tests/cluster/test_workers_private_store.py::"
            "test_a_killed_supervisor_is_recovered_never_overwritten",
        ),
    ),
    (
        "only peers of the same user, checked with `SO_PEERCRED`",
        (
            "tests/faults/test_bounds_handover_refusals.py::"
            "test_connections_from_another_user_are_refused_and_logged_boundedly",
        ),
    ),
    (
        "At most 1024 hand-over connections are open on a node at once",
        (
            "tests/cluster/test_handover_bounds.py::"
            "test_hand_over_connections_past_the_cap_are_closed_at_once_and_warned_in_bounds",
            "tests/cluster/test_handover_bounds.py::"
            "test_a_connection_that_sends_no_well_formed_hand_over_is_closed_after_the_deadline",
            "tests/cluster/test_handover_bounds.py::"
            "test_a_message_over_the_size_bound_ends_the_connection_and_its_descriptors_are_closed",
            "tests/cluster/test_handover_bounds.py::"
            "test_more_hand_overs_than_a_message_may_list_end_the_connection",
            "tests/cluster/test_handover_bounds.py::"
            "test_more_descriptors_than_a_message_may_carry_end_it_and_none_is_adopted",
        ),
    ),
    (
        "Every descriptor that arrives is adopted or closed, whatever the message",
        (
            "tests/cluster/test_handover_bounds.py::"
            "test_descriptors_of_refused_and_malformed_messages_are_closed",
        ),
    ),
    (
        "each of its connections is refused by id and forwarded instead",
        (
            "tests/cluster/test_handover.py::"
            "test_an_owner_that_loses_the_descriptors_refuses_and_the_node_link_serves",
        ),
    ),
    (
        "at most 10,000 rings: `MAX_INSPECTED_SANDBOXES`",
        (
            "tests/faults/test_bounds_inspect_rings.py::"
            "test_inspection_for_more_sandboxes_than_the_cap_is_refused_409",
        ),
    ),
    (
        "(one task each, at most 4096 per link)",
        (
            "tests/cluster/test_wait_cluster.py::test_the_owner_bounds_the_waits_it_serves_for_a_link",
        ),
    ),
    (
        "`Agent.port_watches` (count, at most 64)",
        (
            "tests/faults/test_agent_edge_watch_bound.py::"
            "test_an_edge_gets_at_most_the_agents_watches_and_loses_them_with_its_session",
        ),
    ),
    (
        "a cache: replaced by `welcome` on every connect",
        (
            "tests/faults/test_agent_preview_exposures.py::"
            "test_exposures_follow_welcome_expose_unexpose_and_list",
        ),
    ),
    (
        "the public port is chosen once (the lowest free one of `public_tcp_ports`) and kept"
        " across re-exposes and restarts",
        (
            "tests/e2e/test_public_tcp.py::"
            "test_the_public_port_is_kept_by_a_re_expose_and_reused_after_unexpose",
            "tests/e2e/test_public_tcp.py::test_the_public_port_survives_an_edge_restart",
        ),
    ),
    (
        "leaves it holding the sandbox's lock until the write's real outcome is known, then the"
        " view follows it",
        (
            "tests/store/test_store_hung_writes.py::"
            "test_a_held_up_write_is_answered_in_time_and_applied_once_it_commits",
            "tests/store/test_store_hung_writes.py::"
            "test_a_held_up_write_that_then_fails_is_in_neither_memory_nor_disk",
            "tests/store/test_store_hung_writes.py::"
            "test_waiting_for_the_writes_at_stop_is_bounded_and_leaves_the_view_settled",
        ),
    ),
    (
        "which the edge applies to the registry with the side effects of a local change",
        (
            "tests/cluster/test_redis_edge.py::test_a_change_missed_while_cut_off_is_applied_by_the_resync",
        ),
    ),
    (
        "fails as `StoreError` -> 503 `STORE_UNAVAILABLE`; routing never waits on Redis",
        (
            "tests/cluster/test_redis_edge.py::"
            "test_a_redis_outage_keeps_previews_refuses_writes_and_converges",
        ),
    ),
    (
        "404 `SANDBOX_NOT_FOUND` is used by WebSocket connect",
        ("tests/e2e/test_doc_claims_admin_api.py::test_ws_connect_refusals_before_the_switch",),
    ),
    (
        'returns `{"ports": []}` rather than 404',
        ("tests/e2e/test_doc_claims_admin_api.py::test_one_sandbox_is_its_list_entry_or_404",),
    ),
)


def test_each_cited_test_exists() -> None:
    """Every phrase of CITED is in the doc, and every test it names is defined in its file."""
    check_cited(CITED, claim)
