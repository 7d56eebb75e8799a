"""The numbers of docs/protocol.md (the preface, the header, flags, codes, windows, timeouts,
limits, versions), each read from the code: a doc phrase and the constant it states are asserted
together, so changing either alone fails here. The behaviour around them is checked by the tests
the doc names next to each claim (checked to exist below), and by the tests of CITED for the
claims the doc does not cite in place: tests/protocol/ hold ``protocol.Session`` to them frame
by frame, tests/faults/test_protocol_doc_edge.py holds a real tunneld to them on the wire.
Tables the doc prints in full are also parsed by tests/protocol/test_doc_tables_protocol.py and
tests/protocol/test_doc_claims_control_bounds.py (the control messages' field bounds)."""

from __future__ import annotations

import inspect
import math
import re
import string
from pathlib import Path

import pytest

from agent import cli as agent_cli
from agent import core as agent_core
from agent.core import AgentConfig
from protocol import control, frames, hostnames, session
from protocol.errors import GoAwayCode, ResetCode
from protocol.frames import Flag, FrameType
from protocol.session import Role, Session, SessionConfig
from relay import mux, wslink
from tests.faults import test_agent_stalled_service_bound, test_isolation
from tests.test_doc_claims_readme import check_cited, check_links
from tunneld import edge, nodelink
from tunneld.config import Config

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
DOC = " ".join(TEXT.split())  # lines joined
KiB = 1024
MiB = 1024 * KiB


def claim(phrase: str) -> None:
    """The doc still says ``phrase`` (whitespace-normalised, so line breaks do not matter)."""
    assert " ".join(phrase.split()) in DOC, f"docs/protocol.md no longer says {phrase!r}"


def test_every_link_of_protocol_md_resolves() -> None:
    assert check_links(ROOT / "docs" / "protocol.md") >= 3


def test_the_link_the_preface_and_the_header() -> None:
    """The WebSocket carriage's path and subprotocol; the 8-byte preface and where its version
    byte is; the edge's 4-byte sniff; the 12-byte big-endian header and its version byte."""
    claim("an upgrade `GET /v1/agent` on the agent port, subprotocol `tunneld.v1`")
    assert (wslink.AGENT_PATH, wslink.SUBPROTOCOL) == ("/v1/agent", "tunneld.v1")
    claim("All integers are big-endian.")
    assert frames.HEADER.format.startswith(">")
    claim("The agent's first 8 bytes are the preface:")
    claim('54 55 4E 4C 0D 0A 01 0A "TUNL" CR LF <version=1> LF')
    assert frames.PREFACE == bytes.fromhex("54554E4C0D0A010A") == b"TUNL\r\n\x01\n"
    claim("Bytes 0\u20135 and 7 wrong → `GO_AWAY(PROTOCOL_ERROR)`;")
    assert frames._PREFACE_VERSION_INDEX == 6 and frames.PREFACE[6] == frames.VERSION == 1
    claim("tunneld's edge judges from the fourth byte on: its first four bytes also tell a raw")
    source = inspect.getsource(mux.MuxProtocol._unwrap)
    assert "if len(self._sniff) < 4:" in source and 'data.startswith(b"GET ")' in source
    claim("Every frame starts with a 12-byte header (`struct` format `>BBHII`)")
    assert frames.HEADER.format == ">BBHII" and frames.HEADER_SIZE == 12
    claim("- `ver`: always 1.")
    assert frames.encode_frame(FrameType.PING)[0] == frames.VERSION == 1


def test_the_flags_and_frame_types_tables() -> None:
    """Each row of the flags table is the Flag's bit and the frame types the reader allows it
    on; each frame type row starts with the type's value; the payload limits are the
    constants; the PING budget is the session's token bucket."""
    for flag in Flag:
        allowed = [t.name for t in FrameType if frames._ALLOWED_FLAGS[t] & flag]
        claim(f"| {flag.name} | {flag.value:#x} | {', '.join(allowed)} |")
    assert [t for t in FrameType if frames._ALLOWED_FLAGS[t]] == [
        FrameType.DATA,
        FrameType.WINDOW_UPDATE,
        FrameType.PING,
    ]
    for ftype in FrameType:
        claim(f"| {ftype.name} | {ftype.value} |")
    claim("payload size, ≤ 65536 (`MAX_FRAME_PAYLOAD`)")
    assert frames.MAX_FRAME_PAYLOAD == 65536
    claim("payload size, ≤ 65536 (`MAX_CONTROL_MESSAGE_SIZE`)")
    assert control.MAX_CONTROL_MESSAGE_SIZE == frames.MAX_CONTROL_PAYLOAD == 65536
    claim("is ≤ 4096 bytes (`MAX_OPEN_METADATA`)")
    claim("Bad JSON, bad types, or > 4096 bytes → `GO_AWAY(PROTOCOL_ERROR)`.")
    assert frames.MAX_OPEN_METADATA == 4096
    claim("up to 10 PINGs a second on average with bursts of 100")
    assert (session._PING_RATE, session._PING_BURST) == (10.0, 100.0)


def test_integrity_numbers_and_switches() -> None:
    """The CRC costs are operations.md's measurement, quoted; the two plaintext switches exist
    and are off by default (the edge's) or opt-in (the agent's flag)."""
    claim(
        "a CRC32C per 64 KiB frame would cost 0.44\u00d7 the frame decode (`zlib.crc32` 2.4\u00d7)"
    )
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "(0.44\u00d7" in operations and "(2.4\u00d7 the decode" in operations
    claim("(the edge's `allow_plaintext_agents`, the agent's `--insecure-plaintext`)")
    assert Config().allow_plaintext_agents is False
    assert '"--insecure-plaintext"' in inspect.getsource(agent_cli)


def test_stream_ids_open_metadata_and_the_stream_cap() -> None:
    """Id parity; the open metadata's port range, `via` values and epoch bound; node link
    levels 2, 3 and 4; DEFAULT_MAX_STREAMS, which the edge's config and the session default to."""
    claim("the edge opens even ids (2, 4, …), the agent odd ids (1, 3, …)")
    assert Session(Role.EDGE)._next_local_id == 2 and Session(Role.AGENT)._next_local_id == 1
    claim('`{"port": 1..65535, "via": "preview" | "direct", "client": "<client address>"}`')
    parse = inspect.getsource(session._parse_open_metadata)
    assert "not 1 <= port <= 65535" in parse and session._VIA == ("preview", "direct")
    assert 'obj.get("client", "")' in parse
    claim('`"epoch": <int >= 0>`')
    assert "epoch < 0" in parse
    claim('`limits["version"]` (absent: 1, streams only; 2: forwarded waits')
    claim("3: forwarded admin exposes")
    claim("at 4 it reads `public_port` in an Exposure of that `ok`")
    assert (
        nodelink.WAIT_LINK_VERSION,
        nodelink.EXPOSE_LINK_VERSION,
        nodelink.PUBLIC_PORT_LINK_VERSION,
    ) == (2, 3, 4)
    assert nodelink.LINK_VERSION == 4
    claim("Too many streams (`DEFAULT_MAX_STREAMS` = 32768 by default)")
    assert frames.DEFAULT_MAX_STREAMS == 32768
    assert Config().max_streams == SessionConfig().max_streams == frames.DEFAULT_MAX_STREAMS
    claim("A receiver that takes no streams at all treats any SYN as `GO_AWAY(PROTOCOL_ERROR)`")
    claim("tunneld's edge does so with an agent")
    assert "accept_remote_streams=False" in inspect.getsource(edge.EdgeSession.__init__)


def test_flow_control_numbers() -> None:
    """The two windows; MAX_WINDOW; batching at half a window (stream and session); growth at
    3/4 used, up to 4 MiB, within a 32 MiB budget; the isolation tests' stream counts; one frame
    per stream per round."""
    claim(
        "| per stream, each direction | 262144 (`INITIAL_STREAM_WINDOW`, 256 KiB; yamux/frp"
        " default) |"
    )
    assert frames.INITIAL_STREAM_WINDOW == 262144 == 256 * KiB
    claim("| per session, each direction | 16777216 (`INITIAL_SESSION_WINDOW`, 16 MiB) |")
    assert frames.INITIAL_SESSION_WINDOW == 16777216 == 16 * MiB
    claim(
        "A WINDOW_UPDATE that would take a window above 2^31\u22121 → `GO_AWAY(FLOW_CONTROL_ERROR)`"
    )
    assert frames.MAX_WINDOW == 2**31 - 1
    claim("a stream's WINDOW_UPDATE is sent when its consumed-but-unreturned bytes reach half of")
    claim("the session's (stream 0) likewise with half of the session window")
    assert "st.recv_unreturned >= st.recv_size >> 1" in inspect.getsource(Session.acknowledge)
    returned = inspect.getsource(Session._return_session_credit)
    assert "unreturned >= self._recv_size >> 1" in returned
    claim("the peer used at least 3/4 of the window since the previous update")
    growth = inspect.getsource(Session._send_stream_update)
    assert "not st.recv_unacked and st.recv_used >= size - (size >> 2)" in growth
    claim("(up to `DEFAULT_MAX_STREAM_WINDOW` = 4 MiB;")
    assert frames.DEFAULT_MAX_STREAM_WINDOW == 4 * MiB == SessionConfig().max_stream_window
    claim("(`stream_growth_budget`, 32 MiB by default)")
    assert 32 * MiB == session.DEFAULT_STREAM_GROWTH_BUDGET
    assert SessionConfig().stream_growth_budget == 32 * MiB
    claim("at most `streams \u00d7 256 KiB + 32 MiB`")
    claim("200 stalled downloads do not slow the sandbox's other streams")
    assert test_isolation.STALLED == 200
    claim("nor 72 services that stop reading an edge's uploads (more than the session window")
    assert test_agent_stalled_service_bound.STALLED == 72
    assert 72 * frames.INITIAL_STREAM_WINDOW > frames.INITIAL_SESSION_WINDOW
    claim("one frame (≤ 64 KiB) per stream per round")
    assert 64 * KiB == frames.MAX_FRAME_PAYLOAD


def test_keepalive_numbers() -> None:
    """10 s / 15 s, as the frames module, the session and the edge's config have them; the
    agent's 0.2 s floor and 1.5-interval patience; the edge's 10 s handshake timeout."""
    claim("Each side sends a PING every 10 s (`HEARTBEAT_INTERVAL`) after the handshake")
    claim("nothing at all for 15 s (`DEAD_TIMEOUT`; the handshake included)")
    assert (frames.HEARTBEAT_INTERVAL, frames.DEAD_TIMEOUT) == (10.0, 15.0)
    defaults = SessionConfig()
    assert (defaults.heartbeat_interval, defaults.dead_timeout) == (10.0, 15.0)
    assert (Config().heartbeat_interval, Config().dead_timeout) == (10.0, 15.0)
    claim("(never more often than every 0.2 s)")
    assert agent_core.MIN_HEARTBEAT == 0.2
    claim("then waits at least 1.5 of its own intervals before it declares the edge dead")
    assert "max(own.dead_timeout, 1.5 * interval)" in inspect.getsource(agent_core)
    claim("`handshake_timeout` (10 s,")
    assert Config().handshake_timeout == 10.0
    claim("tunnel-agent likewise waits for the `welcome` at most its connect timeout (10 s,")
    assert agent_core.CONNECT_TIMEOUT == 10.0
    assert AgentConfig("127.0.0.1", 1, "sb1", "t").connect_timeout == agent_core.CONNECT_TIMEOUT


def test_ending_a_session_and_the_code_tables() -> None:
    """The draining codes are the session's; every GO_AWAY and reset code row is the enum's."""
    claim("With `NORMAL`, `SHUTTING_DOWN` or `REPLACED` existing streams may finish")
    assert {
        GoAwayCode.NORMAL,
        GoAwayCode.SHUTTING_DOWN,
        GoAwayCode.REPLACED,
    } == session._DRAINING_CODES
    for code in GoAwayCode:
        claim(f"| {code.name} | {code.value} |")
    for reset in ResetCode:
        claim(f"| {reset.name} | {reset.value} |")


@pytest.mark.parametrize(
    "name",
    [
        "MAX_FRAME_PAYLOAD",
        "MAX_OPEN_METADATA",
        "INITIAL_STREAM_WINDOW",
        "INITIAL_SESSION_WINDOW",
        "DEFAULT_MAX_STREAM_WINDOW",
        "DEFAULT_MAX_STREAMS",
    ],
)
def test_each_row_of_the_limits_table_is_the_constant(name: str) -> None:
    claim(f"| `{name}` | {getattr(frames, name)} |")


def test_the_limits_table_reasons() -> None:
    """The control cap's row, the keepalive row, and the arithmetic of the 'why' column."""
    claim(f"| `MAX_CONTROL_MESSAGE_SIZE` | {control.MAX_CONTROL_MESSAGE_SIZE} |")
    claim("| heartbeat / dead | 10 s / 15 s | ngrok |")
    claim("fairness granularity ~5 ms at 100 Mbit/s")
    assert round(frames.MAX_FRAME_PAYLOAD * 8 / 100e6 * 1000) == 5
    claim("~400 MB/s per stream at 10 ms RTT")
    assert round(frames.DEFAULT_MAX_STREAM_WINDOW / 0.010 / 1e6, -2) == 400
    claim("10k idle WebSockets through one session, with room")
    assert frames.DEFAULT_MAX_STREAMS > 10_000


def test_versions_and_control_message_numbers() -> None:
    """Feature levels 1-3 and what tunnel-agent sends; 501 AGENT_TOO_OLD below 2; the 1000th
    refused request; the 64 KiB cap, 128 exposures with 256-character names, the welcome's
    1024; ids up to 2^31-1; the product port rule; errors echo 64 characters; nine types."""
    claim("1 (`PROTOCOL_VERSION`, the default) is the base protocol; 2 (`WATCH_PORT_VERSION`)")
    claim("3 (`UNWATCH_PORT_VERSION`, what tunnel-agent sends today)")
    versions = (control.PROTOCOL_VERSION, control.WATCH_PORT_VERSION, control.UNWATCH_PORT_VERSION)
    assert versions == (1, 2, 3)
    assert "control.Hello(config.sandbox_id, config.token, control.UNWATCH_PORT_VERSION)" in (
        inspect.getsource(agent_core)
    )
    claim("The preface's version byte stays 1: these levels change no frame.")
    assert frames.PREFACE[frames._PREFACE_VERSION_INDEX] == 1
    claim("answers a wait with 501 `AGENT_TOO_OLD` (no `watch_port`)")
    wait = inspect.getsource(edge.EdgeServer)
    assert "session.agent_version < control.WATCH_PORT_VERSION" in wait
    assert re.search(r"501,\s+\"AGENT_TOO_OLD\"", wait)
    claim("the 1000th refusal ends the session with `GO_AWAY(TOO_MANY_REQUESTS)`")
    assert edge.MAX_REFUSED_REQUESTS == 1000
    claim("`MAX_CONTROL_MESSAGE_SIZE` = 64 KiB.")
    assert 64 * KiB == control.MAX_CONTROL_MESSAGE_SIZE
    claim("(about 150 bytes each, so roughly 400 fit)")
    typical = control.Exposure(
        8000,
        "abcdefghij012345",
        "https://8000-my-sandbox-0123456789-abcdefghij012345.preview.example.com/",
        "the web server of the sandbox",
    )
    assert 100 <= edge._encoded_size(typical) <= 200
    assert 400 <= control.MAX_CONTROL_MESSAGE_SIZE // 150 < 450
    claim("A sandbox may hold up to 128 exposures (the edge's `max_exposures_per_sandbox`)")
    assert Config().max_exposures_per_sandbox == 128
    claim("with names of up to 256 characters")
    assert hostnames.MAX_PORT_NAME_LENGTH == control._MAX_NAME == 256
    claim("`exposures`: list of Exposure (≤ 1024)")
    assert control._MAX_EXPOSURES == 1024
    claim("Request ids (`id`) are ints from 0 to 2³¹\u22121.")
    assert control._MAX_ID == 2**31 - 1
    claim("The product rule (1024\u201365535, not 3000)")
    assert (hostnames.MIN_PORT, hostnames.MAX_PORT, hostnames.CONTROL_PLANE_PORT) == (
        1024,
        65535,
        3000,
    )
    claim("echoes at most 64 characters of the offending value")
    assert "shown = shown[:64]" in inspect.getsource(control)
    claim("`type` is not one of the nine names")
    assert len(control._SCHEMAS) == 9
    claim("encoded and decoded with orjson by `protocol/control.py`")
    assert "orjson.loads" in inspect.getsource(control) and "orjson.dumps" in (
        inspect.getsource(control)
    )


def test_preview_hostname_numbers() -> None:
    """validate_port's range and exact message; sandbox ids of 1-63 and the reserved seven;
    custom tokens of 1-16 over 37 characters; generated tokens of 16 over 36 (~82.7 bits);
    hostname ports of 4-5 digits; route tokens up to 63."""
    claim("Validation errors are `ValidationError(ValueError)` with `code`, `message` and `status`")
    claim("(400). They map directly to the admin API's")
    assert issubclass(hostnames.ValidationError, ValueError)
    for error in (hostnames.InvalidPortError, hostnames.InvalidSandboxIdError):
        assert issubclass(error, hostnames.ValidationError) and error.status == 400
    claim("an `int` (not bool, str or float) in 1024\u201365535, not 3000")
    claim(
        "`Invalid port number: {port}. Must be 1024-65535, excluding 3000 (sandbox control plane).`"
    )
    with pytest.raises(hostnames.InvalidPortError) as info:
        hostnames.validate_port(80)
    assert info.value.message == (
        "Invalid port number: 80. Must be 1024-65535, excluding 3000 (sandbox control plane)."
    )
    claim("| `validate_sandbox_id` | 1\u201363 characters of `[a-z0-9-]`")
    assert hostnames.MAX_SANDBOX_ID_LENGTH == 63
    claim("(`www api admin root system cloudflare workers`, in any case)")
    assert (
        set(["www", "api", "admin", "root", "system", "cloudflare", "workers"])
        == hostnames.RESERVED_SANDBOX_IDS
    )
    claim("| `validate_custom_token` | 1\u201316 characters of `[a-z0-9_]` |")
    assert hostnames.MAX_CUSTOM_TOKEN_LENGTH == 16
    assert string.ascii_lowercase + string.digits + "_" == hostnames.TOKEN_ALPHABET
    claim("`generate_token()` returns 16 characters, each one a `secrets.choice` over the 36")
    claim("`[a-z0-9]` (about 83 bits: 16 \u00d7 log2 36 ≈ 82.7)")
    assert hostnames.TOKEN_LENGTH == 16
    assert string.ascii_lowercase + string.digits == hostnames.GENERATED_TOKEN_ALPHABET
    assert round(16 * math.log2(len(hostnames.GENERATED_TOKEN_ALPHABET)), 1) == 82.7
    assert "secrets.choice(GENERATED_TOKEN_ALPHABET)" in inspect.getsource(hostnames.generate_token)
    claim("`tokens_equal` compares with `hmac.compare_digest`")
    assert "hmac.compare_digest" in inspect.getsource(hostnames.tokens_equal)
    claim("The port must be 4\u20135 digits with no leading zero")
    assert "[1-9][0-9]{3,4}" in inspect.getsource(hostnames)
    claim("must match `[a-z0-9_]{1,63}`")
    assert hostnames.MAX_TOKEN_LENGTH == 63


# ----------------------------------------------------------------------------- cited tests

# Tests the doc names in place: `path/test_x.py::name`, `test_x.py::name` (any file of that name
# under tests/), `::name` or a bare `test_name` (the file named last), or a whole file.
_FILE = re.compile(r"((?:[\w.-]+/)*(test_\w+\.py))(?:::(\w+))?")


def _files_named(citation: str) -> list[Path]:
    if "/" in citation:
        return [ROOT / citation]
    return sorted((ROOT / "tests").rglob(citation))


def _defines(paths: list[Path], name: str) -> bool:
    return any(f"def {name}(" in path.read_text(encoding="utf-8") for path in paths)


def test_every_test_the_doc_cites_in_place_exists() -> None:
    current: list[Path] = []
    checked = 0
    for span in re.findall(r"`([^`\n]+)`", TEXT):
        whole = _FILE.fullmatch(span)
        if whole:
            current = _files_named(whole.group(1))
            assert current and all(p.exists() for p in current), f"no file {span!r}"
            name = whole.group(3)
        elif re.fullmatch(r"(?:::)?(test_\w+)", span):
            assert current, f"{span!r} is cited before any test file"
            name = span.removeprefix("::")
        else:
            continue
        if name:
            assert _defines(current, name), f"{span!r}: no test {name} in {current}"
        checked += 1
    assert checked >= 40


# The tests that check each behaviour claim the doc does not cite in place: (the doc's phrase,
# the tests). test_each_cited_test_exists keeps this list true when a test is renamed or moved.
P = "tests/protocol/"
EDGE = "tests/faults/test_protocol_doc_edge.py::"
CITED: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "subprotocol `tunneld.v1`, after which the same byte stream travels in binary messages"
        " whose boundaries carry no meaning",
        (
            EDGE + "test_over_a_websocket_message_boundaries_carry_no_meaning",
            "tests/e2e/test_wslink.py::test_agent_over_websocket_serves_preview_traffic",
            "tests/e2e/test_wslink.py::test_websocket_upgrade_for_another_path_is_refused",
            "tests/faults/test_wslink_hostile.py::test_a_text_message_ends_the_link",
        ),
    ),
    (
        "`ver`: always 1. Anything else → `GO_AWAY(PROTOCOL_ERROR)`.",
        (
            P + "test_frames.py::test_bad_headers",
            EDGE + "test_a_bad_frame_is_goaway_protocol_error_and_nothing_after_it_is_read",
        ),
    ),
    (
        "`type`: see below. Unknown → `GO_AWAY(PROTOCOL_ERROR)`.",
        (
            P + "test_frames.py::test_bad_headers",
            P + "test_frames.py::test_any_header_parses_or_raises_remote_error",
            EDGE + "test_a_bad_frame_is_goaway_protocol_error_and_nothing_after_it_is_read",
        ),
    ),
    (
        "a flag not allowed for the type → `GO_AWAY(PROTOCOL_ERROR)`",
        (
            P + "test_doc_tables_protocol.py::test_flags_table_is_what_the_reader_accepts",
            EDGE + "test_a_bad_frame_is_goaway_protocol_error_and_nothing_after_it_is_read",
        ),
    ),
    (
        "Only DATA and CONTROL carry a payload of exactly `length` bytes.",
        (
            P + "test_doc_tables_protocol.py::test_frame_types_table_values_and_payload_limits",
            P + "test_frames.py::test_partial_payload_waits",
        ),
    ),
    (
        "Oversized `length` is refused as soon as the header is read",
        (EDGE + "test_size_and_window_errors_have_their_own_codes",),
    ),
    (
        "a FIN may ride on the last data frame or on an empty frame",
        (P + "test_session.py::test_fin_half_close_each_direction",),
    ),
    (
        "`SYN|FIN` opens and half-closes at once.",
        (P + "test_session_edges.py::test_a_stream_opened_and_ended_in_one_frame_ends_at_once",),
    ),
    (
        "is not flow-controlled",
        (P + "test_doc_claims_protocol.py::test_open_metadata_is_not_flow_controlled",),
    ),
    (
        "(delta may be 0; it may carry credit too)",
        (
            P + "test_session.py::test_open_accept_and_data_both_ways",
            P + "test_doc_claims_protocol.py::test_window_update_ack_may_carry_credit",
        ),
    ),
    (
        "both sides forget the stream at once",
        (
            P + "test_session.py::test_reset_each_direction",
            P + "test_session.py::test_reset_before_accept_refuses_stream",
        ),
    ),
    (
        "The receiver answers `PING|ACK` with the same value",
        (
            P + "test_session.py::test_ping_pong_rtt",
            EDGE + "test_the_edge_sends_no_preface_and_its_first_frame_is_the_welcome",
        ),
    ),
    (
        "Each side sends a PING every 10 s (`HEARTBEAT_INTERVAL`) after the handshake and answers"
        " every PING",
        (
            "tests/faults/test_protocol_doc_replies.py::"
            "test_the_edge_pings_every_heartbeat_after_the_handshake",
            P + "test_session.py::test_keepalive_and_dead_peer_timeout",
        ),
    ),
    (
        "promptly, up to 10 PINGs a second on average with bursts of 100; past that the session"
        " ends",
        (
            EDGE + "test_a_ping_flood_gets_its_burst_answered_then_goaway_too_many_requests",
            P + "test_doc_tables_protocol.py::test_the_ping_rate_limit_is_the_documented_one",
        ),
    ),
    (
        "the sender will accept no new streams and ends the session",
        (
            P + "test_session.py::test_syn_refused_while_going_away",
            P + "test_session.py::test_goaway_drain",
        ),
    ),
    (
        "plain TCP and `ws://` are accepted between loopback addresses only",
        (
            "tests/faults/test_integrity.py::test_edge_refuses_plaintext_agents_from_other_hosts",
            "tests/faults/test_integrity.py::"
            "test_edge_accepts_plaintext_agents_from_other_hosts_when_allowed",
            "tests/faults/test_integrity.py::"
            "test_agent_cli_refuses_plaintext_to_a_remote_edge_without_connecting",
        ),
    ),
    (
        "The first frame after the agent's preface must be CONTROL `hello`; anything else →",
        (
            P + "test_session.py::test_edge_handshake_errors",
            EDGE + "test_a_first_frame_that_is_not_hello_is_a_protocol_error",
            EDGE + "test_a_goaway_as_the_first_frame_is_answered_with_nothing",
        ),
    ),
    (
        "An `error` followed by GO_AWAY is a refusal. A bare GO_AWAY as the first frame is also"
        " accepted",
        (
            P + "test_session.py::test_edge_may_refuse_with_error_then_goaway",
            P + "test_session.py::test_goaway_as_first_frame_is_accepted",
            P + "test_session.py::test_agent_first_frame_must_be_welcome",
        ),
    ),
    (
        "`hello`/`welcome` after the handshake, or `welcome` sent to the edge / `hello` to the"
        " agent → `GO_AWAY(PROTOCOL_ERROR)`. A control payload that does not decode →",
        (
            P + "test_session.py::test_session_protocol_errors",
            P + "test_doc_claims_protocol.py::"
            "test_hello_and_welcome_are_refused_after_the_handshake_on_the_agent_too",
            EDGE + "test_a_bad_frame_is_goaway_protocol_error_and_nothing_after_it_is_read",
        ),
    ),
    (
        "A SYN received before the receiver sent its own handshake message",
        (P + "test_session.py::test_syn_before_our_handshake_is_an_error",),
    ),
    (
        "A SYN with the receiver's parity, id 0, or an id not above the sender's previous one",
        (
            P + "test_session.py::test_session_protocol_errors",
            P + "test_session.py::test_stream_ids_must_increase",
            P + "test_session_edges.py::test_reopening_the_latest_stream_id_is_a_protocol_error",
            P + "test_doc_claims_protocol.py::test_stream_ids_may_have_gaps",
        ),
    ),
    (
        '(`client` may be absent = `""`; unknown keys are ignored)',
        (
            P + "test_session_edges.py::test_a_peer_may_open_ports_at_both_ends_of_the_range",
            P + "test_protocol_doc_session.py::test_unknown_keys_of_the_open_metadata_are_ignored",
        ),
    ),
    (
        'the opener adds `"sandbox": "<id>"` and `"epoch": <int >= 0>`',
        (
            P + "test_open_metadata_node.py::test_sandbox_and_epoch_reach_the_acceptor",
            P + "test_open_metadata_node.py::test_agent_links_carry_neither",
            P + "test_open_metadata_node.py::test_bad_values_from_the_peer_end_the_session",
        ),
    ),
    (
        "the dialer sends each only to an acceptor at its level or more",
        (
            "tests/cluster/test_wait_cluster.py::"
            "test_an_owner_from_before_forwarded_waits_is_not_asked",
            "tests/cluster/test_api_port_expose_cluster.py::"
            "test_an_owner_from_before_forwarded_exposes_is_not_asked",
            "tests/cluster/test_expose_forward_fallback.py::"
            "test_a_node_from_before_public_port_is_not_sent_it",
        ),
    ),
    (
        "Bad JSON, bad types, or > 4096 bytes → `GO_AWAY(PROTOCOL_ERROR)`.",
        (
            P + "test_session.py::test_session_protocol_errors",
            P + "test_session_edges.py::"
            "test_a_peer_opening_a_port_outside_the_range_is_a_protocol_error",
        ),
    ),
    (
        "The opener may send DATA right after the SYN, before the answer.",
        (
            "tests/e2e/test_doc_claims_architecture_path.py::"
            "test_the_head_follows_the_syn_before_the_agent_answers",
        ),
    ),
    (
        "The receiver answers `WINDOW_UPDATE|ACK` (accepted; the agent dialled the port) or"
        " `WINDOW_UPDATE|RST` with a reason",
        (
            "tests/e2e/test_raw_tcp.py::test_the_port_needs_no_exposure_and_101_comes_after_the_connect",
            "tests/e2e/test_raw_tcp.py::test_refused_port_is_a_502_page_not_a_101",
            "tests/e2e/test_raw_tcp_ws.py::test_nothing_listening_is_a_502_page_not_a_101",
        ),
    ),
    (
        "An ACK for a stream the ACK's sender opened itself → `GO_AWAY(PROTOCOL_ERROR)`; a"
        " duplicate ACK is ignored.",
        (
            P + "test_session.py::test_ack_on_peer_opened_stream_is_an_error",
            P + "test_session.py::test_empty_data_frame_and_duplicate_ack_are_harmless",
        ),
    ),
    (
        "The acceptor sends DATA only after its ACK.",
        (P + "test_session.py::test_local_protocol_errors_leave_state_unchanged",),
    ),
    (
        "On a node-to-node link the owner node accepts a `direct` stream only when its agent"
        " accepted",
        (
            "tests/cluster/test_raw_tcp_cluster.py::"
            "test_nothing_listening_is_a_502_through_another_node",
            "tests/cluster/test_raw_tcp_ws_cluster.py::"
            "test_nothing_listening_is_a_502_through_another_node",
        ),
    ),
    (
        "A stream is gone once both FINs went through, or on RST from either side.",
        (
            P + "test_session.py::test_fin_half_close_each_direction",
            P + "test_session.py::test_every_state_change_goes_through_the_table",
        ),
    ),
    (
        "DATA on a stream id that was never opened → `GO_AWAY(PROTOCOL_ERROR)`.",
        (
            P + "test_session.py::test_session_protocol_errors",
            EDGE + "test_a_bad_frame_is_goaway_protocol_error_and_nothing_after_it_is_read",
        ),
    ),
    (
        "a sender may send at most `min(stream credit, session credit)`",
        (
            P + "test_session.py::test_window_exhaustion_and_resume",
            P + "test_flow_control_edges.py::test_the_session_window_bounds_all_streams_together",
        ),
    ),
    (
        "Receiving more than granted on a stream or on the session →"
        " `GO_AWAY(FLOW_CONTROL_ERROR)`.",
        (
            P + "test_session.py::test_flow_control_violation_on_stream",
            P + "test_session.py::test_flow_control_violation_on_session",
        ),
    ),
    (
        "A WINDOW_UPDATE that would take a window above 2^31\u22121 →"
        " `GO_AWAY(FLOW_CONTROL_ERROR)`.",
        (
            P + "test_session.py::test_window_update_on_session_and_overflow",
            P + "test_session.py::test_stream_window_overflow",
            P + "test_flow_control_edges.py::"
            "test_a_stream_window_may_reach_max_window_but_not_pass_it",
            EDGE + "test_size_and_window_errors_have_their_own_codes",
        ),
    ),
    (
        "A receiver may grant a larger session window right after its handshake message",
        (P + "test_session.py::test_larger_session_window_is_granted_after_handshake",),
    ),
    (
        "Credit counts DATA payload bytes (not headers, not SYN metadata).",
        (P + "test_doc_claims_protocol.py::test_open_metadata_is_not_flow_controlled",),
    ),
    (
        "the session's (stream 0) likewise with half of the session window",
        (
            P + "test_protocol_doc_session.py::"
            "test_session_credit_is_returned_at_half_the_session_window",
        ),
    ),
    (
        "the peer used at least 3/4 of the window since the previous update, the receiver doubles"
        " that stream's window",
        (
            P + "test_session.py::test_window_grows_to_max_for_fast_consumer",
            P + "test_session.py::test_no_growth_when_consumer_lags",
            P + "test_mutation_boundaries.py::"
            "test_a_stream_window_grows_only_once_three_quarters_were_used",
            P + "test_session.py::test_window_growth_is_capped_per_session",
        ),
    ),
    (
        "Fairness (sender side): streams with data are served round-robin",
        (P + "test_session.py::test_fairness_small_write_not_stuck_behind_bulk",),
    ),
    (
        "the sender accepts no new streams (SYNs answered with `RST(REFUSED_STREAM)`) and opens"
        " none.",
        (
            P + "test_session.py::test_syn_refused_while_going_away",
            P
            + "test_protocol_doc_session.py::test_a_side_that_sent_or_got_a_goaway_opens_no_stream",
        ),
    ),
    (
        "the connection is closed once no stream is left",
        (EDGE + "test_a_draining_goaway_lets_the_live_stream_finish_then_the_edge_closes",),
    ),
    (
        "the receiver drops all streams at once",
        (EDGE + "test_any_other_goaway_code_drops_the_live_stream_at_once",),
    ),
    (
        "ignores all further input, and closes the connection",
        (
            EDGE + "test_a_bad_frame_is_goaway_protocol_error_and_nothing_after_it_is_read",
            "tests/faults/test_hostile_edge_3.py::"
            "test_a_malformed_frame_ends_the_session_with_goaway_and_resets_the_live_stream",
        ),
    ),
    (
        "(never sent to an agent, nor to an older node: either would refuse the unknown field)",
        (
            EDGE + "test_an_agent_is_never_sent_a_public_port",
            "tests/cluster/test_expose_forward_fallback.py::"
            "test_a_node_from_before_public_port_is_not_sent_it",
        ),
    ),
    (
        "Unknown codes from a newer peer are treated as `INTERNAL_ERROR` (GO_AWAY) / `INTERNAL`"
        " (RST).",
        (P + "test_session.py::test_unknown_codes_are_mapped",),
    ),
    (
        "or the session's token stopped verifying (secret rotated, token expired)",
        (
            "tests/faults/test_tokens.py::"
            "test_reload_with_rotated_secret_closes_sessions_it_no_longer_verifies",
            "tests/faults/test_tokens.py::test_expiring_token_closes_its_live_session",
        ),
    ),
    (
        "| REPLACED | 6 | a newer session for the same sandbox took over |",
        (EDGE + "test_a_newer_session_for_the_sandbox_replaces_the_older_with_goaway_replaced",),
    ),
    (
        "| SHUTTING_DOWN | 7 | the edge or agent is stopping |",
        ("tests/e2e/test_doc_claims_operations.py::test_sigterm_logs_the_documented_lines",),
    ),
    (
        "the peer kept sending control requests, or PINGs, past the rate limit",
        (
            "tests/e2e/test_doc_claims_architecture.py::"
            "test_1000_refused_control_requests_end_the_session",
            P + "test_session.py::test_ping_flood_ends_the_session",
        ),
    ),
    (
        "| CONNECT_REFUSED | 1 | nothing listens on the port |",
        (
            "tests/e2e/test_doc_claims_architecture.py::"
            "test_a_failed_dial_is_a_502_upstream_connect_failed",
        ),
    ),
    (
        "| UNEXPOSED | 4 | the port was unexposed while the stream was live |",
        (
            "tests/e2e/test_doc_claims_architecture.py::"
            "test_unexpose_resets_a_live_stream_with_unexposed_and_cuts_the_client",
        ),
    ),
    (
        "| PORT_NOT_ALLOWED | 3 | the port may not be dialled (e.g. 3000, the control plane) |",
        (
            "tests/faults/test_attack_surface_2.py::test_streams_to_refused_ports_are_logged_boundedly",
            "tests/faults/test_hostile_edge_2.py::"
            "test_refused_and_failed_streams_leave_nothing_in_the_agent",
            "tests/e2e/test_raw_tcp.py::test_the_agents_own_api_port_is_a_502_port_not_allowed",
        ),
    ),
    (
        "| STREAM_CLOSED | 5 | DATA after FIN |",
        (P + "test_session.py::test_data_after_peer_fin_resets_only_that_stream",),
    ),
    (
        "| TIMEOUT | 8 | the stream timed out |",
        (
            "tests/faults/test_protocol_doc_replies.py::test_an_idle_public_tcp_stream_is_reset_with_timeout",
        ),
    ),
    (
        "the agent's cap on local connections: `--max-connections`",
        (
            "tests/faults/test_agent_fd_limit.py::"
            "test_agent_process_refuses_streams_past_its_connection_limit_and_keeps_serving",
        ),
    ),
    (
        "the edge pushes admin-API changes the same way;",
        (
            "tests/faults/test_ops_agent_timeout.py::"
            "test_an_unacknowledged_change_is_504_agent_timeout_and_recorded",
            "tests/faults/test_agent_preview_exposures.py::"
            "test_exposures_follow_welcome_expose_unexpose_and_list",
        ),
    ),
    (
        "An edge that gets an old agent's level answers a wait with 501 `AGENT_TOO_OLD`",
        (
            "tests/e2e/test_wait_port.py::test_an_agent_without_watch_port_is_told_to_upgrade",
            "tests/e2e/test_wait_cancel.py::test_an_agent_without_unwatch_is_not_sent_it",
        ),
    ),
    (
        "so the edge puts in the `welcome` as many exposures as fit and sends each of the others"
        " right after it as an `expose` request",
        (
            "tests/faults/test_durable_welcome_worst_case.py::test_the_cap_and_the_largest_welcome",
            "tests/faults/test_agent_list_too_large.py::"
            "test_the_largest_set_reaches_the_agent_and_its_list_is_too_large",
        ),
    ),
    (
        "A `list` reply that does not fit is an `error` `TOO_LARGE`.",
        (
            "tests/faults/test_agent_list_too_large.py::"
            "test_the_largest_set_reaches_the_agent_and_its_list_is_too_large",
        ),
    ),
    (
        "Decoding is strict. Booleans are not ints (`true` is not a port). Floats are not ints."
        " Unknown fields are refused at every level, including inside an exposure.",
        (
            P + "test_control.py::test_bad_field",
            P + "test_control.py::test_unknown_field",
        ),
    ),
    (
        "String lengths are counted in characters.",
        (P + "test_doc_claims_protocol.py::test_string_lengths_are_counted_in_characters",),
    ),
    (
        "| `type` | Dataclass | Direction | Fields (wire name: JSON type, bounds).",
        (
            P + "test_doc_claims_control_bounds.py::"
            "test_each_documented_bound_is_the_codecs_at_both_ends",
            P + "test_doc_claims_control_bounds.py::test_welcome_limits_bounds",
            P + "test_doc_claims_control_bounds.py::test_welcome_heartbeat_bounds",
            P + "test_doc_claims_control_bounds.py::"
            "test_the_table_states_no_bound_this_file_does_not_check",
            P + "test_doc_tables_protocol.py::test_the_messages_table_lists_every_message_type",
        ),
    ),
    (
        "| `TOO_LARGE` | more than `MAX_CONTROL_MESSAGE_SIZE` bytes |",
        (P + "test_control.py::test_too_large",),
    ),
    (
        "| `MALFORMED` | not JSON, invalid UTF-8, a number beyond a double's range, nesting too"
        " deep, or not a JSON object |",
        (P + "test_control.py::test_malformed", P + "test_control.py::test_not_an_object"),
    ),
    (
        "| `UNKNOWN_TYPE` | `type` is not one of the nine names (names are case-sensitive) |",
        (P + "test_control.py::test_unknown_type",),
    ),
    (
        '| `MISSING_FIELD` | a required field, or `type` itself, is absent (`"type": null` counts'
        " as absent) |",
        (P + "test_control.py::test_missing_field",),
    ),
    (
        "| `UNKNOWN_FIELD` | a field that the message type does not define |",
        (P + "test_control.py::test_unknown_field",),
    ),
    (
        "| `BAD_FIELD` | wrong JSON type, or a value out of range or too long |",
        (
            P + "test_control.py::test_bad_field",
            P + "test_control.py::test_huge_integers_are_rejected_not_crashing",
        ),
    ),
    (
        "ready / PORT_NOT_READY (status_code: the last",
        (
            "tests/e2e/test_wait_port.py::test_admin_wait_returns_once_the_service_is_healthy",
            "tests/e2e/test_wait_port.py::test_timeout_is_504_with_the_last_status",
            "tests/e2e/test_wait_port.py::test_the_agents_watch_limit_is_429",
            "tests/faults/test_agent_edge_watch_bound.py::"
            "test_an_edge_gets_at_most_the_agents_watches_and_loses_them_with_its_session",
        ),
    ),
    (
        "an id with no live watch is ignored",
        ("tests/e2e/test_wait_cancel.py::test_the_agent_ignores_an_unwatch_for_no_watch",),
    ),
    (
        "`decode_message` raises `ControlError(code, message)` and nothing else.",
        (
            P + "test_control.py::test_fuzz_random_bytes",
            P + "test_control.py::test_fuzz_random_json",
            P + "test_control.py::test_fuzz_mutated_messages",
            P + "test_control.py::test_fuzz_truncated_messages",
        ),
    ),
    (
        "echoes at most 64 characters of the offending value",
        (
            P + "test_control.py::test_bad_field_message_is_bounded",
            P + "test_doc_claims_protocol.py::"
            "test_error_messages_echo_at_most_64_characters_of_the_value",
        ),
    ),
    (
        "`encode_message` runs the same table of checks on the outgoing message.",
        (
            P + "test_control.py::test_encode_refuses_what_the_peer_would_refuse",
            P + "test_control.py::test_encode_too_large",
            P + "test_control.py::test_round_trip",
        ),
    ),
    (
        "The encoder leaves optional fields that are `None` off the wire. `ok` always carries"
        " `exposures`, as `[]` when there are none.",
        (P + "test_control.py::test_wire_form",),
    ),
    (
        "A session that receives a message which fails to decode treats it as a protocol error",
        (P + "test_session.py::test_session_protocol_errors",),
    ),
    (
        "| `validate_port` | an `int` (not bool, str or float) in 1024\u201365535, not 3000 |",
        (
            P + "test_hostnames.py::test_invalid_port_message",
            P + "test_hostnames.py::test_invalid_port_exact_reference_message",
            P + "test_hostnames.py::test_port_rule_matches_reference",
        ),
    ),
    (
        "not a reserved id (`www api admin root system cloudflare workers`, in any case)",
        (
            P + "test_hostnames.py::test_invalid_sandbox_ids",
            P + "test_hostnames.py::test_every_reserved_id_in_every_case",
        ),
    ),
    (
        "| `validate_custom_token` | 1\u201316 characters of `[a-z0-9_]` |",
        (P + "test_hostnames.py::test_invalid_custom_tokens",),
    ),
    (
        "`generate_token()` returns 16 characters",
        (P + "test_hostnames.py::test_generate_token_charset_length_uniqueness",),
    ),
    (
        "`build_preview_host` and `build_preview_url` validate every part. The URL ends with `/`"
        " and includes `:public_port` only when that port is not the scheme's default.",
        (
            P + "test_hostnames.py::test_build_host_and_url",
            P + "test_hostnames.py::test_build_rejects_bad_parts",
        ),
    ),
    (
        "or `None` and never raises. It rejects non-ASCII input, lowercases, and strips `:port`",
        (
            P + "test_hostnames.py::test_parse_accepts",
            P + "test_hostnames.py::test_parse_rejects",
            P + "test_hostnames.py::test_parse_never_raises",
            P + "test_hostnames.py::test_parse_domain_normalization",
        ),
    ),
)


def test_each_cited_test_exists() -> None:
    """Every phrase of CITED is in the doc, and every test it names is defined in its file."""
    check_cited(CITED, claim)
