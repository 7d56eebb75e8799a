"""The rule that a preview host fits DNS (``check_preview_host_length``, the expose side) and that
a host that does not never routes (``parse_preview_host``, the public side), at its boundaries:
a first label of 63 characters is fine and 64 is not, a host of 253 is fine and 254 is not.
tests/e2e/test_preview_host_length.py has it through the admin API, the SDK and the agent.
"""

from __future__ import annotations

import pytest

from protocol.hostnames import (
    PreviewHostTooLongError,
    PreviewRoute,
    build_preview_host,
    check_preview_host_length,
    parse_preview_host,
)

TOKEN = "t" * 16


def _fits(port: int, sandbox_id: str, token: str | None, domain: str) -> bool:
    try:
        check_preview_host_length(port, sandbox_id, token, domain)
    except PreviewHostTooLongError as exc:
        assert (exc.code, exc.status) == ("PREVIEW_HOST_TOO_LONG", 400)
        return False
    return True


@pytest.mark.parametrize(
    ("port", "token", "longest_id"),
    [(10000, TOKEN, 40), (8000, TOKEN, 41), (10000, None, 57), (8000, None, 58), (8000, "t", 56)],
)
def test_the_longest_sandbox_id_whose_label_fits(port: int, token: str | None, longest_id: int):
    domain = "example.test"
    fitting = build_preview_host(port, "a" * longest_id, token, domain)
    assert len(fitting.split(".")[0]) == 63
    assert _fits(port, "a" * longest_id, token, domain)
    assert not _fits(port, "a" * (longest_id + 1), token, domain)
    tokens = token is not None
    # what fits routes back; one more character in the label does not route at all
    want = PreviewRoute(port, "a" * longest_id, token)
    assert parse_preview_host(fitting, domain, tokens=tokens) == want
    longer = build_preview_host(port, "a" * (longest_id + 1), token, domain)
    assert parse_preview_host(longer, domain, tokens=tokens) is None
    assert parse_preview_host(longer + ":8080", domain, tokens=tokens) is None


def test_the_whole_host_fits_253_characters() -> None:
    label = f"8000-sb1-{TOKEN}"  # 25 characters
    # a domain of labels of 63 and less, 227 characters: the host is 253
    domain = ".".join(["d" * 63] * 3 + ["e" * 35])
    assert len(domain) == 227
    host = build_preview_host(8000, "sb1", TOKEN, domain)
    assert len(host) == 253 and _fits(8000, "sb1", TOKEN, domain)
    assert _fits(8000, "sb1", TOKEN, domain + ".")  # a trailing dot is no character of the name
    assert parse_preview_host(host, domain) == PreviewRoute(8000, "sb1", TOKEN)
    assert parse_preview_host(host + ".", domain) == PreviewRoute(8000, "sb1", TOKEN)
    assert host.startswith(label)
    with pytest.raises(PreviewHostTooLongError) as info:
        check_preview_host_length(8000, "sb12", TOKEN, domain)
    assert info.value.message == (
        "Preview host too long: it would be 254 characters (first label 26, the domain 227, "
        "1 dot), more than the 253 a DNS name holds, so no client could resolve the URL. Use a "
        "shorter sandbox ID or custom token, or a shorter preview domain."
    )
    longer = build_preview_host(8000, "sb12", TOKEN, domain)
    assert len(longer) == 254
    assert parse_preview_host(longer, domain) is None
    assert parse_preview_host(longer + ".", domain) is None


def test_the_message_says_what_would_fit() -> None:
    with pytest.raises(PreviewHostTooLongError) as info:
        check_preview_host_length(8000, "a" * 60, None, "example.test")
    assert info.value.message == (
        "Preview host too long: its first label would be 65 characters (port 4, sandbox ID 60, "
        "1 hyphen), more than the 63 a DNS label holds, so no client could resolve the URL. It "
        "fits with a sandbox ID of at most 58 characters (port 8000)."
    )
    with pytest.raises(PreviewHostTooLongError) as info:
        check_preview_host_length(18000, "a" * 63, TOKEN, "example.test")
    assert info.value.message.endswith(
        "It fits with a sandbox ID of at most 40 characters (port 18000, a 16-character token)."
    )
