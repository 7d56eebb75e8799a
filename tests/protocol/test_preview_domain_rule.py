"""One rule for a preview domain: ``build_preview_host`` refuses exactly what ``is_dns_name``
refuses (the rule tunneld/config.py checks the configured domain by).

Found here: ``_normalize_domain`` (build_preview_host) only refused "", a leading ".", ":" and
"/", so it built hosts under "-bad.example", a 64-character label, a 254-character name,
"a..b", "example.com..", a space, a tab, a newline, "*" or "@"; and ``is_dns_name`` itself took
non-ASCII letters that Unicode case-folds into a-z (KELVIN SIGN "K", LONG S "s", dotted and
dotless i: ``re.IGNORECASE`` without ``re.ASCII``), so "\\u212a.example" passed as a DNS name.
"""

from __future__ import annotations

import pytest

from protocol.hostnames import (
    InvalidDomainError,
    PreviewRoute,
    build_preview_host,
    build_preview_url,
    is_dns_name,
    parse_preview_host,
)

LABEL_63 = "a" * 63
NAME_253 = ".".join([LABEL_63, LABEL_63, LABEL_63, "d" * 61])  # 63*3 + 61 + 3 dots
assert len(NAME_253) == 253

# Refused by is_dns_name, and built into a host (a URL no client can use) before.
LOOSE_BEFORE = [
    "-bad.example",  # a label starting with "-"
    "bad-.example",  # ... ending with "-"
    "example.-com",
    "a" * 64 + ".example",  # a label of 64
    NAME_253 + "d",  # 254 characters, no trailing dot
    "a..b",  # an empty label
    "example.com..",  # two trailing dots (rstrip took both)
    "exa mple.com",
    "example.com\n",
    "exam\tple.com",
    "*.example.com",
    "user@example.com",
    "example.com?x=1",
    "example.com#top",
    "[::1]",
    "\u00e9.example",
    "b\u00fccher.example",
]
# Refused by neither before: is_dns_name took them too (Unicode case folding into [a-z]).
FOLDED_INTO_ASCII = [
    "\u212a.example",  # KELVIN SIGN, folds to "k"
    "\u017fite.example",  # LATIN SMALL LETTER LONG S, folds to "s"
    "\u0130x.example",  # LATIN CAPITAL LETTER I WITH DOT ABOVE
    "\u0131x.example",  # LATIN SMALL LETTER DOTLESS I
]
# Refused by both before (kept refused).
REFUSED_BOTH = ["", ".", "..", ".example.com", "example.com:8443", "a/b", "https://example.com"]

# (domain, what the host ends with): taken by both, lowercased, without the trailing dot.
GOOD = [
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("Preview.Example.com.", "preview.example.com"),
    ("localhost", "localhost"),
    ("a_b.example", "a_b.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    (LABEL_63 + ".example", LABEL_63 + ".example"),
    (NAME_253, NAME_253),
    (NAME_253 + ".", NAME_253),  # the trailing dot is not counted
    ("a-b.c-d", "a-b.c-d"),
]


@pytest.mark.parametrize("domain", LOOSE_BEFORE + FOLDED_INTO_ASCII + REFUSED_BOTH)
def test_a_domain_that_is_no_dns_name_builds_no_host(domain: str) -> None:
    assert not is_dns_name(domain)
    with pytest.raises(InvalidDomainError) as info:
        build_preview_host(8000, "abc", "tok", domain)
    assert info.value.code == "INVALID_DOMAIN" and info.value.status == 400
    assert info.value.message.startswith("Invalid preview domain: ")
    with pytest.raises(InvalidDomainError):
        build_preview_host(8000, "abc", None, domain)
    with pytest.raises(InvalidDomainError):
        build_preview_url(8000, "abc", "tok", domain, scheme="http", public_port=8080)


@pytest.mark.parametrize(("domain", "suffix"), GOOD)
def test_a_dns_name_builds_a_host_that_parses_back(domain: str, suffix: str) -> None:
    assert is_dns_name(domain)
    host = build_preview_host(8000, "abc", "tok", domain)
    assert host == f"8000-abc-tok.{suffix}"
    # under a 253-character domain the host is longer than a DNS name: it does not route (and no
    # expose makes one, PREVIEW_HOST_TOO_LONG: tests/protocol/test_preview_host_length.py)
    route = PreviewRoute(8000, "abc", "tok") if len(host) <= 253 else None
    assert parse_preview_host(host, domain) == route
    assert build_preview_host(8000, "abc", None, domain) == f"8000-abc.{suffix}"


@pytest.mark.parametrize("domain", [None, 5, b"example.com"])
def test_a_domain_that_is_no_string_is_invalid_domain_not_a_type_error(domain: object) -> None:
    with pytest.raises(InvalidDomainError):
        build_preview_host(8000, "abc", "tok", domain)  # type: ignore[arg-type]


def test_the_error_echoes_a_bounded_value() -> None:
    with pytest.raises(InvalidDomainError) as info:
        build_preview_host(8000, "abc", "tok", "-" * 10_000)
    assert len(info.value.message) < 400
