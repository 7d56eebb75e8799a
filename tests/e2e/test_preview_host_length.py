"""Preview hosts DNS cannot carry: an expose whose ``{port}-{id}-{token}`` label would pass 63
characters is refused (400 ``PREVIEW_HOST_TOO_LONG``) the same way from the admin API, the SDK and
the agent's local API, where Cloudflare hands out a URL no resolver looks up; a 40-character id
with a generated token (a 63-character label with a 5-digit port) works end to end; a Host whose
first label is over 63 characters is the public side's plain 404 ``UNKNOWN_HOST``; and a stored
exposure that no longer fits is kept, listed and named in one start-up warning, not a failed start.

Found here: tunneld answered ``POST /v1/sandboxes/<45 chars>/ports`` with 200 and a preview URL
whose first label was 67 characters, and routed such Host headers.
tests/protocol/test_preview_host_length.py has the rule's boundaries.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from protocol.hostnames import MAX_LABEL_LENGTH
from tunneld.client import TunnelClient
from tunneld.client import ValidationError as SdkValidationError
from tunneld.store import StoredExposure, open_store

from .conftest import Stack, raw_request

pytestmark = pytest.mark.anyio

DOMAIN = "example.test"
LONG_ID = "a" * 44 + "z"  # 45 characters: 4 + 1 + 45 + 1 + 16 = 67 with port 8000
FITS_ID = "b" * 39 + "z"  # 40 characters: 63 with a 5-digit port and a 16-character token
TOKEN16 = "t" * 16
UNREACHABLE = "stored exposure(s) have a preview host DNS cannot carry"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["code"], body.get("error", body.get("message"))


async def _public(stack: Stack, host: str) -> tuple[int, bytes]:
    """A raw request for ``host`` on the public port (connection: close): status and body."""
    assert stack.edge is not None
    raw = await raw_request(
        stack.edge.public_port,
        f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def _refused(stack: Stack, host: str) -> tuple[int, str, str]:
    status, body = await _public(stack, host)
    page = orjson.loads(body)
    return status, page["code"], page["error"]


async def test_a_45_character_id_is_refused_alike_everywhere_and_40_serves() -> None:
    stack = await Stack(domain=DOMAIN).start()
    try:
        assert stack.admin is not None and stack.edge is not None
        # the admin API
        r = await stack.admin.post(f"/v1/sandboxes/{LONG_ID}/ports", json={"port": 8000})
        admin = _error_of(r)
        assert admin[:2] == (400, "PREVIEW_HOST_TOO_LONG"), r.text
        assert admin[2] == (
            "Preview host too long: its first label would be 67 characters (port 4, sandbox ID "
            "45, token 16, 2 hyphens), more than the 63 a DNS label holds, so no client could "
            "resolve the URL. It fits with a sandbox ID of at most 41 characters (port 8000, a "
            "16-character token), or with this sandbox ID and a custom token of at most 12."
        )
        # the SDK
        url = f"http://127.0.0.1:{stack.edge.admin_port}"
        async with TunnelClient(url, token=stack.admin_token, timeout=10) as client:
            with pytest.raises(SdkValidationError) as info:
                await client.sandbox(LONG_ID).expose_port(8000)
        assert (info.value.status, info.value.code, info.value.message) == admin
        # the agent's local API (its native and its legacy endpoint), the edge refusing it
        agent = await stack.agent(LONG_ID)
        api = await agent.serve_local_api("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}") as local:
                native = await local.post("/v1/ports", json={"port": 8000}, timeout=10)
                legacy = await local.post("/api/expose-port", json={"port": 8000}, timeout=10)
        finally:
            await api.close()
        assert _error_of(native) == admin, native.text
        assert _error_of(legacy) == admin and legacy.json()["httpStatus"] == 400, legacy.text
        # nothing was stored, and a custom token short enough fits
        r = await stack.admin.get(f"/v1/sandboxes/{LONG_ID}/ports")
        assert r.json() == {"ports": []}, r.text
        short = await stack.expose(LONG_ID, 8000, token="t" * 12)
        assert len(stack.host_of(short["exposedAt"]).split(".")[0]) == MAX_LABEL_LENGTH

        # 40 characters with a generated token: served, through the public port
        origin = await stack.origin()
        await stack.agent(FITS_ID)
        exposed = await stack.expose(FITS_ID, origin.port)
        host = stack.host_of(exposed["exposedAt"]).rsplit(":", 1)[0]
        assert len(host.split(".")[0]) == 62 + (origin.port >= 10000)
        status, body = await _public(stack, host)
        assert (status, body) == (200, b"hello from origin"), body

        # a first label over 63: the same 404 as any unknown host, never routed
        unknown = await _refused(stack, f"nosuch.{DOMAIN}")
        assert unknown[:2] == (404, "UNKNOWN_HOST")
        token = host.split(".")[0].rsplit("-", 1)[1]
        over = [
            f"8000-{LONG_ID}-{TOKEN16}.{DOMAIN}",  # what Cloudflare would have handed out
            f"{origin.port}-{FITS_ID}-{token}x.{DOMAIN}",  # 64: the served one's, one more
            f"{origin.port}-{'c' * 63}-{TOKEN16}.{DOMAIN}",  # 86, the longest parts
            f"{origin.port}-{'d' * 300}-{TOKEN16}.{DOMAIN}",
        ]
        for long_host in over:
            said = f"No preview URL matches host {long_host!r}."
            assert await _refused(stack, long_host) == (*unknown[:2], said)
    finally:
        await stack.close()


async def test_stored_exposures_that_no_longer_fit_are_kept_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The restart path: a durable store (SQLite) holding what tunneld handed out before the
    check, two that do not fit and one that does. The start does not fail; they are kept."""
    store = open_store("sqlite", str(tmp_path))
    too_long = [
        StoredExposure(LONG_ID, 8000, TOKEN16, None, 1.0),
        StoredExposure("c" * 63, 18001, TOKEN16, "api", 2.0),
    ]
    for record in [*too_long, StoredExposure(FITS_ID, 8002, TOKEN16, None, 3.0)]:
        await store.put(record)
    await store.close()

    stack = Stack(domain=DOMAIN)
    stack.store = open_store("sqlite", str(tmp_path))
    await stack.start()
    try:
        assert stack.admin is not None
        warnings = [r.getMessage() for r in caplog.records if UNREACHABLE in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"2 {UNREACHABLE}: kept (listed, stored)"), warnings[0]
        assert (
            f"{LONG_ID} port 8000: Preview host too long: its first label would be 67"
            in (warnings[0])
        )
        assert (
            f"{'c' * 63} port 18001: Preview host too long: its first label would be 86"
            in (warnings[0])
        )
        assert FITS_ID not in warnings[0]
        for record in too_long:
            r = await stack.admin.get(f"/v1/sandboxes/{record.sandbox_id}/ports")
            (port,) = r.json()["ports"]
            assert port["port"] == record.port, r.text
            host = stack.host_of(port["exposedAt"])
            refusal = (404, "UNKNOWN_HOST", f"No preview URL matches host {host!r}.")
            assert await _refused(stack, host) == refusal
        # its agent connects and is welcomed with it (its URL is built, as listed)
        agent = await stack.agent(LONG_ID)
        assert agent.exposures == {8000}
        r = await stack.admin.get(f"/v1/sandboxes/{FITS_ID}/ports")
        (port,) = r.json()["ports"]
        # routed: an offline sandbox's answer, not a 404
        status, code, _ = await _refused(stack, stack.host_of(port["exposedAt"]))
        assert (status, code) == (503, "SANDBOX_NOT_CONNECTED")
    finally:
        await stack.close()
    assert [r.sandbox_id for r in await _stored(tmp_path)] == sorted([LONG_ID, "c" * 63, FITS_ID])


async def _stored(state_dir: Path) -> list[StoredExposure]:
    store = open_store("sqlite", str(state_dir))
    try:
        return sorted(await store.load_all())
    finally:
        await store.close()


async def test_an_edge_refuses_a_config_whose_preview_urls_cannot_be_built() -> None:
    """An embedder's Config that skipped validate(): before, the edge started, stored an
    expose, then failed to build its URL, and every agent that connected failed in its welcome
    (InvalidDomainError, a traceback) and reconnected in a loop."""
    from tunneld.config import ConfigError

    for settings, said in [
        ({"domain": "-bad.example"}, "Invalid preview domain: '-bad.example'."),
        ({"domain": "a..b"}, "Invalid preview domain: 'a..b'."),
        ({"scheme": "ftp"}, "Invalid scheme: 'ftp'. Use http or https."),
        ({"url_port": 70000}, "Invalid public port: 70000. Must be 1-65535."),
    ]:
        stack = Stack(**settings)
        with pytest.raises(ConfigError) as info:
            await stack.start()
        assert str(info.value).startswith(f"cannot build preview URLs: {said}"), info.value
        assert stack.edge is None


async def test_without_tokens_the_label_has_room_for_a_58_character_id() -> None:
    """tokens = false (trusted networks): the host is ``{port}-{id}.{domain}``, so the rule
    counts no token: 4 + 1 + 58 = 63 fits, 59 does not."""
    stack = await Stack(domain=DOMAIN, tokens=False).start()
    try:
        exposed = await stack.expose("e" * 58, 8000)
        assert stack.host_of(exposed["exposedAt"]).split(":")[0] == f"8000-{'e' * 58}.{DOMAIN}"
        assert stack.admin is not None
        r = await stack.admin.post(f"/v1/sandboxes/{'e' * 59}/ports", json={"port": 8000})
        assert _error_of(r) == (
            400,
            "PREVIEW_HOST_TOO_LONG",
            "Preview host too long: its first label would be 64 characters (port 4, sandbox ID "
            "59, 1 hyphen), more than the 63 a DNS label holds, so no client could resolve the "
            "URL. It fits with a sandbox ID of at most 58 characters (port 8000).",
        )
    finally:
        await stack.close()
