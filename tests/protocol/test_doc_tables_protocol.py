"""The numbers and tables of docs/protocol.md, read from the doc and compared with the code.

Each test parses one table or sentence of the doc and checks it against protocol/ (its constants,
or the session's behaviour where the claim is about what a peer sees), so that changing a value
on either side without the other fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from protocol import control, frames
from protocol.errors import GoAwayCode, RemoteProtocolError, ResetCode
from protocol.frames import Flag, FrameReader, FrameType, pack_header
from protocol.session import SessionConfig
from tests.protocol.conftest import PING, raw_edge, sent_frames, terminated

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text under the heading ``title`` up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", DOC, re.M | re.S)
    assert match, f"no section {title!r} in docs/protocol.md"
    return match.group(1)


def rows(text: str) -> list[list[str]]:
    """The cells of every table body row in ``text`` (header and separator rows left out)."""
    out = []
    lines = [line for line in text.splitlines() if line.startswith("|")]
    for line in lines[2:] if lines else []:
        out.append([cell.strip() for cell in line.strip("|").split("|")])
    return out


def flat(text: str) -> str:
    return " ".join(text.split())


def number(cell: str) -> int:
    match = re.match(r"`?(\d+)", cell)
    assert match, cell
    return int(match.group(1))


# --------------------------------------------------------------------------- preface and header


def test_the_preface_bytes_are_the_documented_ones() -> None:
    hex_bytes = re.search(r"^((?:[0-9A-F]{2} ){7}[0-9A-F]{2})\s", section("Preface"), re.M)
    assert hex_bytes
    assert bytes.fromhex(hex_bytes.group(1)) == frames.PREFACE
    assert "The agent's first 8 bytes" in DOC and len(frames.PREFACE) == 8


def test_the_header_is_the_documented_struct() -> None:
    text = section("Frame header")
    match = re.search(r"(\d+)-byte header \(`struct` format `([^`]+)`\)", text)
    assert match
    assert int(match.group(1)) == frames.HEADER_SIZE == frames.HEADER.size
    assert match.group(2) == frames.HEADER.format


def test_flags_table_is_what_the_reader_accepts() -> None:
    """| flag | bit | allowed on |: the bit is the Flag's value, and a header of each type is
    accepted with exactly the flags listed for it (any other flag: PROTOCOL_ERROR)."""
    table = rows(section("Flags"))
    assert {r[0] for r in table} == {f.name for f in Flag}
    allowed: dict[FrameType, int] = dict.fromkeys(FrameType, 0)
    for name, bit, types in table:
        assert int(bit, 16) == Flag[name]
        for type_name in types.split(", "):
            allowed[FrameType[type_name]] |= int(bit, 16)
    for ftype in FrameType:
        for flag in Flag:
            reader = FrameReader()
            reader.feed(pack_header(ftype, flag, 0 if ftype >= FrameType.PING else 1, 0))
            if allowed[ftype] & flag:
                assert reader.next_frame() is not None, (ftype, flag)
            else:
                with pytest.raises(RemoteProtocolError) as info:
                    reader.next_frame()
                assert info.value.code == GoAwayCode.PROTOCOL_ERROR, (ftype, flag)


def test_frame_types_table_values_and_payload_limits() -> None:
    table = rows(section("Frame types"))
    assert {r[0]: int(r[1]) for r in table} == {t.name: t.value for t in FrameType}
    limits = {r[0]: re.search(r"≤ (\d+) \(`(\w+)`\)", r[3]) for r in table}
    data, ctrl = limits["DATA"], limits["CONTROL"]
    assert data and ctrl
    assert int(data.group(1)) == getattr(frames, data.group(2)) == frames.MAX_FRAME_PAYLOAD
    assert int(ctrl.group(1)) == getattr(control, ctrl.group(2)) == frames.MAX_CONTROL_PAYLOAD
    # the other types carry no payload: `length` is their value
    assert [r[0] for r in table if r[4] != "none"] == ["DATA", "CONTROL"]


def test_syn_metadata_limit_is_the_documented_one() -> None:
    match = re.search(r"is ≤ (\d+) bytes\s+\(`MAX_OPEN_METADATA`\)", section("Frame types"))
    assert match and int(match.group(1)) == frames.MAX_OPEN_METADATA
    assert "> 4096 bytes →" in section("Streams") and frames.MAX_OPEN_METADATA == 4096


# --------------------------------------------------------------------------- code tables


@pytest.mark.parametrize(
    ("title", "enum"), [("GO_AWAY codes", GoAwayCode), ("Reset codes", ResetCode)], ids=str
)
def test_code_tables_are_the_enums(title: str, enum: type[GoAwayCode] | type[ResetCode]) -> None:
    table = rows(section(title))
    assert {r[0]: int(r[1]) for r in table} == {c.name: c.value for c in enum}


# --------------------------------------------------------------------------- limits


def test_limits_table_is_the_constants() -> None:
    seen = set()
    for name, value, _why in rows(section("Limits")):
        if name.startswith("`"):
            const = name.strip("`")
            module = control if const == "MAX_CONTROL_MESSAGE_SIZE" else frames
            assert getattr(module, const) == int(value), const
            seen.add(const)
        else:
            assert name == "heartbeat / dead"
            beat, dead = (float(v) for v in re.findall(r"(\d+) s", value))
            assert (beat, dead) == (frames.HEARTBEAT_INTERVAL, frames.DEAD_TIMEOUT)
    assert "DEFAULT_MAX_STREAMS" in seen and "INITIAL_SESSION_WINDOW" in seen


def test_the_same_numbers_where_the_prose_repeats_them() -> None:
    flow = section("Flow control")
    windows = {r[0]: r[1] for r in rows(flow)}
    assert number(windows["per stream, each direction"]) == frames.INITIAL_STREAM_WINDOW
    assert number(windows["per session, each direction"]) == frames.INITIAL_SESSION_WINDOW
    assert "256 KiB" in windows["per stream, each direction"]
    assert frames.INITIAL_STREAM_WINDOW == 256 * 1024
    assert "16 MiB" in windows["per session, each direction"]
    assert frames.INITIAL_SESSION_WINDOW == 16 * 2**20
    flow = flat(flow)  # prose: line breaks are spaces
    assert "`DEFAULT_MAX_STREAM_WINDOW` = 4 MiB" in flow
    assert frames.DEFAULT_MAX_STREAM_WINDOW == 4 * 2**20
    budget = re.search(r"`stream_growth_budget`, (\d+) MiB by default", flow)
    assert budget
    assert SessionConfig().stream_growth_budget == int(budget.group(1)) * 2**20
    assert "above 2^31\u22121" in flow and frames.MAX_WINDOW == 2**31 - 1
    streams = re.search(r"`DEFAULT_MAX_STREAMS` = (\d+) by\s+default", section("Streams"))
    assert streams and int(streams.group(1)) == frames.DEFAULT_MAX_STREAMS
    assert SessionConfig().max_streams == frames.DEFAULT_MAX_STREAMS
    keepalive = flat(section("Keepalive"))
    beat = re.search(r"a PING every (\d+) s \(`HEARTBEAT_INTERVAL`\)", keepalive)
    dead = re.search(r"for (\d+) s \(`DEAD_TIMEOUT`", keepalive)
    assert beat and dead
    documented = (float(beat.group(1)), float(dead.group(1)))
    assert documented == (frames.HEARTBEAT_INTERVAL, frames.DEAD_TIMEOUT)
    assert (SessionConfig().heartbeat_interval, SessionConfig().dead_timeout) == documented
    strict = flat(section("Limits and strictness"))
    assert "`MAX_CONTROL_MESSAGE_SIZE` = 64 KiB" in strict
    assert control.MAX_CONTROL_MESSAGE_SIZE == 64 * 1024


def test_the_ping_rate_limit_is_the_documented_one() -> None:
    """'up to 10 PINGs a second on average with bursts of 100; past that the session ends with
    GO_AWAY(TOO_MANY_REQUESTS)': the burst is answered, one more at the same instant is not, and
    a second later 10 more are answered."""
    match = re.search(r"up to (\d+) PINGs a second on average with bursts of (\d+)", flat(DOC))
    assert match
    rate, burst = int(match.group(1)), int(match.group(2))
    edge = raw_edge()
    for i in range(burst):
        edge.receive_data(pack_header(PING, 0, 0, i), now=0.0)
    assert len(sent_frames(edge)) == burst and not edge.closed
    for i in range(rate):  # one second refills `rate` tokens
        edge.receive_data(pack_header(PING, 0, 0, i), now=1.0)
    assert len(sent_frames(edge)) == rate and not edge.closed
    edge.receive_data(pack_header(PING, 0, 0, 0), now=1.0)
    assert terminated(edge.events_received()).code == GoAwayCode.TOO_MANY_REQUESTS


# --------------------------------------------------------------------------- control messages


def test_the_messages_table_lists_every_message_type() -> None:
    types = {r[0].strip("`"): r[1].strip("`") for r in rows(section("Messages"))}
    assert types == {name: cls.__name__ for cls, name in control._TYPE_NAMES.items()}
    words = {"nine": 9, "ten": 10, "eight": 8}
    count = re.search(r"is not one of the (\w+) names", section("Limits and strictness"))
    assert count and words[count.group(1)] == len(types)


def test_the_versions_are_the_documented_ones() -> None:
    versions = section("Conversation")
    found = {
        name: int(level)
        for level, name in re.findall(r"(\d)\s+\(`(\w+_VERSION)`", versions.replace("\n", " "))
    }
    assert found == {
        "PROTOCOL_VERSION": control.PROTOCOL_VERSION,
        "WATCH_PORT_VERSION": control.WATCH_PORT_VERSION,
        "UNWATCH_PORT_VERSION": control.UNWATCH_PORT_VERSION,
    }
    assert control.Hello("s", "t").version == control.PROTOCOL_VERSION == 1
    assert "The\npreface's version byte stays 1" in versions and frames.PREFACE[6] == 1


def _control_error_codes() -> set[str]:
    """Every code protocol/control.py raises a ControlError with (``_bad`` is BAD_FIELD)."""
    tree = ast.parse((ROOT / "protocol" / "control.py").read_text(encoding="utf-8"))
    codes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            first = node.args[0] if node.args else None
            if node.func.id == "ControlError" and isinstance(first, ast.Constant):
                codes.add(str(first.value))
    return codes


def test_the_control_error_table_is_every_code_the_codec_raises() -> None:
    table = {r[0].strip("`") for r in rows(section("Limits and strictness"))}
    raised = _control_error_codes()
    assert "BAD_FIELD" in raised and "TOO_LARGE" in raised  # the scan sees them at all
    assert table == raised
    docstring = control.ControlError.__doc__ or ""
    assert all(code in docstring for code in table)


def test_agent_tokens_are_the_documented_hmacs() -> None:
    """'A token is either v1, base64url(HMAC-SHA256(secret, "tunneld agent token v1\\0" +
    sandbox_id)), or v2 ... base64url without = padding': computed from the doc's formula here,
    the edge's tokens are those (a peer in another language mints them the same way)."""
    import base64
    import hashlib
    import hmac

    from tunneld.auth import agent_token, verify_agent_token

    text = flat(section("Conversation"))
    v1 = re.search(r'HMAC-SHA256\(secret, "(tunneld agent token v1)\\0" \+ sandbox_id\)', text)
    v2 = re.search(
        r'`v2\.<unix seconds>\.<base64url\(HMAC-SHA256\(secret, "(tunneld agent token v2)\\0" '
        r'\+ sandbox_id \+ "\\0" \+ expiry\)\)>`, base64url without `=` padding',
        text,
    )
    assert v1 and v2

    def mac(message: bytes) -> str:
        digest = hmac.new(b"s3cret", message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    context1, context2 = v1.group(1).encode() + b"\0", v2.group(1).encode() + b"\0"
    assert agent_token("s3cret", "sb1") == mac(context1 + b"sb1")
    expiry = 4102444800
    assert agent_token("s3cret", "sb1", expires_at=expiry) == (
        f"v2.{expiry}." + mac(context2 + b"sb1\0" + str(expiry).encode())
    )
    assert verify_agent_token("s3cret", "sb1", mac(context1 + b"sb1"))
    assert not verify_agent_token("s3cret", "sb1", mac(context1 + b"sb1") + "=")  # padded: no
