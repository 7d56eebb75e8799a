"""The inspection ring buffers and their bounds (tunneld/inspect.py), without sockets."""

from __future__ import annotations

import asyncio

import pytest

from protocol.hostnames import validate_exposure_options
from tunneld.inspect import REDACTED, Inspector, Record, SandboxRing, parse_response_head
from tunneld.registry import ExposureRecord


def _begin(inspector: Inspector, ring: SandboxRing, target: str = "/", **kw: object) -> Record:
    record = inspector.begin(
        ring,
        port=8000,
        client="127.0.0.1",
        method=b"GET",
        target=target.encode(),
        version=b"1.1",
        headers=kw.pop("headers", [(b"host", b"h")]),  # type: ignore[arg-type]
        request_id=b"rid",
    )
    assert record is not None
    return record


def _ring(inspector: Inspector, sandbox_id: str = "sb1") -> SandboxRing:
    inspector.set_enabled(sandbox_id, True)
    ring = inspector.wants(sandbox_id)
    assert ring is not None
    return ring


def test_nothing_is_inspected_unless_asked() -> None:
    inspector = Inspector()
    assert inspector.wants("sb1") is None
    plain = ExposureRecord(8000, "tok")
    assert inspector.wants("sb1", plain) is None
    assert inspector.rings == {}  # asking creates nothing
    # per exposure: that port only, no switch for the sandbox
    inspected = ExposureRecord(8001, "tok", options=validate_exposure_options("http", False, True))
    assert inspector.wants("sb1", inspected) is not None
    assert not inspector.enabled("sb1")
    inspector.set_enabled("sb2", True)
    assert inspector.enabled("sb2") and inspector.wants("sb2") is not None
    inspector.set_enabled("sb2", False)
    assert inspector.wants("sb2") is None and "sb2" not in inspector.rings


def test_the_101st_record_evicts_the_first() -> None:
    inspector = Inspector()
    ring = _ring(inspector)
    ids = []
    for i in range(101):
        record = _begin(inspector, ring, f"/{i}")
        inspector.end(record, 200, "complete")
        ids.append(record.id)
    assert list(ring.records) == ids[1:]
    assert inspector.get("sb1", ids[0]) is None and inspector.get("sb1", ids[1]) is not None
    assert [r.target for r in ring.since(ids[-2])] == ["/100"]


def test_bodies_are_capped_and_sizes_counted() -> None:
    inspector = Inspector(body_bytes=10)
    ring = _ring(inspector)
    record = _begin(inspector, ring)
    record.request_body(b"0123456")
    record.request_body(memoryview(b"789abcdef"))
    record.response_head(200, [(b"content-type", b"text/plain")])
    record.response_body(b"x" * 4)
    inspector.end(record, 200, "complete")
    out = record.to_json()
    assert out["request"]["body"] == "0123456789" and out["request"]["bodyTruncated"]
    assert out["request"]["bodySize"] == 16 and out["requestBytes"] == 16
    assert out["response"]["body"] == "xxxx" and not out["response"]["bodyTruncated"]
    assert out["response"]["bodySize"] == 4
    binary = _begin(inspector, ring)
    binary.request_body(b"\xff\xfe")
    inspector.end(binary, None, "aborted", "no response")
    assert binary.to_json()["request"]["bodyEncoding"] == "base64"
    assert binary.to_json()["response"] is None and binary.summary()["state"] == "aborted"


def test_all_records_together_stay_under_max_bytes() -> None:
    inspector = Inspector(body_bytes=4096, max_bytes=64 * 1024)
    rings = [_ring(inspector, "a"), _ring(inspector, "b")]
    first = None
    for i in range(200):
        record = _begin(inspector, rings[i % 2])
        first = first or record
        record.request_body(b"z" * 4096)
        record.response_head(200, [])
        record.response_body(b"y" * 4096)
        inspector.end(record, 200, "complete")
        assert inspector.used <= inspector.max_bytes
    kept = sum(len(r.records) for r in rings)
    assert 0 < kept < 100  # the budget, not the per-sandbox count, bounds it
    assert first is not None and inspector.get("a", first.id) is None  # oldest went first
    accounted = sum(r.used for ring in rings for r in ring.records.values())
    assert accounted == inspector.used  # nothing leaked


def test_a_live_record_that_does_not_fit_stops_capturing() -> None:
    inspector = Inspector(body_bytes=1 << 20, max_bytes=8192)
    ring = _ring(inspector)
    record = _begin(inspector, ring)
    record.request_body(b"q" * 100_000)
    assert record.req_truncated and inspector.used <= inspector.max_bytes
    assert record.req_size == 100_000
    inspector.end(record, 200, "complete")
    # past the budget with only live records, a new request is skipped, and counted
    live = [inspector.begin(ring, port=1, client="c", method=b"GET", target=b"/" * 3000,
                            version=b"1.1", headers=[]) for _ in range(5)]  # fmt: skip
    assert None in live and ring.skipped >= 1


def test_credentials_headers_are_redacted_when_captured() -> None:
    inspector = Inspector()
    ring = _ring(inspector)
    headers = [(b"Authorization", b"Bearer s"), (b"cookie", b"a=b"), (b"x-ok", b"v")]
    record = _begin(inspector, ring, headers=headers)
    record.response_head(200, [(b"Set-Cookie", b"sid=1"), (b"proxy-authorization", b"p")])
    assert record.req_headers == [("Authorization", REDACTED), ("cookie", REDACTED), ("x-ok", "v")]
    assert record.resp_headers == [("Set-Cookie", REDACTED), ("proxy-authorization", REDACTED)]
    plain = Inspector(redact=False)
    record = _begin(plain, _ring(plain), headers=headers)
    assert record.req_headers[0] == ("Authorization", "Bearer s")


def test_parse_response_head() -> None:
    status, reason, headers = parse_response_head(
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\nx-a:  b \r\n\r\n"
    )
    assert (status, reason) == (404, "Not Found")
    assert headers == [(b"content-length", b"3"), (b"x-a", b"b")]
    assert parse_response_head(b"HTTP/1.1 200\r\n\r\n")[:2] == (200, "")


def test_a_waiter_is_woken_by_a_new_record() -> None:
    async def main() -> None:
        inspector = Inspector()
        waiting = asyncio.ensure_future(inspector.wait_newer("sb1", 0, 10))
        await asyncio.sleep(0)
        assert not waiting.done() and "sb1" in inspector.rings  # parked in a ring
        ring = _ring(inspector)
        inspector.end(_begin(inspector, ring, "/new"), 200, "complete")
        (record,) = await asyncio.wait_for(waiting, 5)
        assert record.target == "/new"
        assert await inspector.wait_newer("sb1", record.id, 0) == []
        # a waiter on a sandbox with nothing leaves no ring behind
        assert await inspector.wait_newer("sb9", 0, 0.01) == []
        assert "sb9" not in inspector.rings

    asyncio.run(main())


@pytest.mark.parametrize("outcome", ["complete", "aborted", "edge", "unfollowed"])
def test_outcomes_are_kept(outcome: str) -> None:
    inspector = Inspector()
    ring = _ring(inspector)
    record = _begin(inspector, ring)
    inspector.end(record, 502 if outcome == "edge" else None, outcome, "n")
    assert record.summary()["state"] == outcome and record.summary()["note"] == "n"
    inspector.end(record, 200, "complete")  # a second end changes nothing
    assert record.summary()["state"] == outcome


def test_settings_are_checked() -> None:
    from tunneld.config import ConfigError, load_config

    env = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s"}
    config = load_config(None, environ=env)
    assert (config.inspect_max_requests, config.inspect_body_bytes) == (100, 16 * 1024)
    assert config.inspect_max_bytes == 64 * 1024 * 1024 and config.inspect_redact is True
    config = load_config(
        None, environ={**env, "TUNNELD_INSPECT_MAX_REQUESTS": "500", "TUNNELD_INSPECT_REDACT": "0"}
    )
    assert config.inspect_max_requests == 500 and config.inspect_redact is False
    for name, value in (
        ("INSPECT_MAX_REQUESTS", "0"),
        ("INSPECT_BODY_BYTES", "-1"),
        ("INSPECT_MAX_BYTES", "1000"),
    ):
        with pytest.raises(ConfigError, match=name.lower()):
            load_config(None, environ={**env, f"TUNNELD_{name}": value})


def test_one_connection_has_at_most_16_unanswered_records() -> None:
    from tunneld.httphead import H11HeadParser
    from tunneld.inspect import MAX_LIVE_PER_CONNECTION, ConnectionRecorder

    inspector = Inspector()
    ring = _ring(inspector)
    recorder = ConnectionRecorder(inspector, ring, 8000, "127.0.0.1", "http")
    head = H11HeadParser().parse(b"GET /p HTTP/1.1\r\nhost: h\r\n\r\n")
    records = [recorder.begin(head, b"id") for _ in range(MAX_LIVE_PER_CONNECTION + 3)]
    assert MAX_LIVE_PER_CONNECTION == 16
    assert all(r is not None for r in records[:16]) and records[16:] == [None] * 3
    assert ring.skipped == 3
    first = records[0]
    assert first is not None
    recorder.end(first, 200, None)  # answered: room for one more
    assert recorder.begin(head, b"id") is not None
    assert first.summary()["state"] == "complete"


def test_replay_builds_the_request_and_refuses_what_it_cannot_send_as_recorded() -> None:
    from tunneld.inspect_cli import CliError, dechunk, replay_request

    def record(headers: list[list[str]], body: str, truncated: bool = False) -> dict:
        return {
            "id": 7,
            "request": {
                "method": "POST",
                "target": "/x?y=1",
                "headers": headers,
                "body": body,
                "bodyEncoding": "utf-8",
                "bodySize": 99 if truncated else len(body),
                "bodyCaptured": len(body),
                "bodyTruncated": truncated,
            },
        }

    data, notes = replay_request(
        record([["Host", "h"], ["cookie", REDACTED], ["transfer-encoding", "chunked"]],
               "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
        force=False,
    )  # fmt: skip
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"POST /x?y=1 HTTP/1.1", b"Host: h", b"content-length: 5", b"connection: close",
    ]  # fmt: skip
    assert body == b"abcde" and notes == ["header cookie was redacted when recorded: left out"]
    with pytest.raises(CliError, match="truncated") as refused:
        replay_request(record([["Host", "h"]], "abc", truncated=True), force=False)
    assert refused.value.status == 2
    data, notes = replay_request(record([["Host", "h"]], "abc", truncated=True), force=True)
    assert data.endswith(b"content-length: 3\r\nconnection: close\r\n\r\nabc") and notes
    with pytest.raises(CliError, match="upgrade"):
        replay_request(record([["Host", "h"], ["Upgrade", "websocket"]], ""), force=True)
    assert dechunk(b"3\r\nabc\r\n5;ext=1\r\nde") == b"abcde"  # a cut-short one, as far as it goes
