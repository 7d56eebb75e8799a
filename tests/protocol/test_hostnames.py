"""Preview hostnames and the validation rules shared with Cloudflare's Sandbox SDK."""

from __future__ import annotations

import enum
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.hostnames import (
    RESERVED_SANDBOX_IDS,
    TOKEN_ALPHABET,
    InvalidDomainError,
    InvalidPortError,
    InvalidSandboxIdError,
    InvalidTokenError,
    PreviewRoute,
    ValidationError,
    build_preview_host,
    build_preview_url,
    generate_token,
    parse_preview_host,
    tokens_equal,
    validate_custom_token,
    validate_port,
    validate_route_token,
    validate_sandbox_id,
)

PORT_TAIL = ". Must be 1024-65535, excluding 3000 (sandbox control plane)."
DOMAIN = "example.com"

# --- ports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (80, "80"),
        (0, "0"),
        (-1, "-1"),
        (1023, "1023"),
        (3000, "3000"),
        (65536, "65536"),
        (70000, "70000"),
        ("8080", "8080"),
        ("", ""),
        (8080.5, "8080.5"),
        (8080.0, "8080.0"),
        (float("nan"), "NaN"),
        (float("inf"), "Infinity"),
        (float("-inf"), "-Infinity"),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        ([8080], "[8080]"),
        pytest.param(10**5000, "a huge integer", id="huge-int"),
        ("x" * 100, "x" * 64 + "..."),
    ],
)
def test_invalid_port_message(value: object, shown: str) -> None:
    with pytest.raises(InvalidPortError) as info:
        validate_port(value)
    err = info.value
    assert err.message == f"Invalid port number: {shown}{PORT_TAIL}"
    assert str(err) == err.message
    assert err.code == "INVALID_PORT"
    assert err.status == 400
    assert isinstance(err, ValidationError)
    assert isinstance(err, ValueError)


def test_unprintable_value_in_message() -> None:
    class Weird:
        def __str__(self) -> str:
            raise RuntimeError("no")

    with pytest.raises(InvalidPortError) as info:
        validate_port(Weird())
    assert info.value.message == f"Invalid port number: <Weird>{PORT_TAIL}"
    assert repr(info.value).startswith("InvalidPortError(code='INVALID_PORT', message=")


def test_invalid_port_exact_reference_message() -> None:
    with pytest.raises(InvalidPortError, match=r"^Invalid port number: 80\. Must be 1024-65535, "):
        validate_port(80)
    with pytest.raises(InvalidPortError) as info:
        validate_port("8080")
    assert info.value.message == (
        "Invalid port number: 8080. Must be 1024-65535, excluding 3000 (sandbox control plane)."
    )


@pytest.mark.parametrize("port", [1024, 2999, 3001, 8000, 8080, 8787, 65535])
def test_valid_ports(port: int) -> None:
    assert validate_port(port) == port
    assert type(validate_port(port)) is int


def test_int_subclass_port_is_accepted_as_plain_int() -> None:
    class P(enum.IntEnum):
        WEB = 8080

    assert validate_port(P.WEB) == 8080
    assert type(validate_port(P.WEB)) is int


@given(st.integers())
@settings(max_examples=200)
def test_port_rule_matches_reference(port: int) -> None:
    ok = 1024 <= port <= 65535 and port != 3000
    if ok:
        assert validate_port(port) == port
    else:
        with pytest.raises(InvalidPortError):
            validate_port(port)


# --- sandbox ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sid", ["a", "abc123", "my-sandbox", "a" * 63, "0", "a-b-c", "wwww", "x--y"]
)
def test_valid_sandbox_ids(sid: str) -> None:
    assert validate_sandbox_id(sid) == sid


@pytest.mark.parametrize(
    ("sid", "code", "message"),
    [
        ("", "INVALID_SANDBOX_ID_LENGTH", "Sandbox ID must be 1-63 characters long."),
        ("a" * 64, "INVALID_SANDBOX_ID_LENGTH", "Sandbox ID must be 1-63 characters long."),
        (
            "-abc",
            "INVALID_SANDBOX_ID_HYPHENS",
            "Sandbox ID cannot start or end with hyphens (DNS requirement).",
        ),
        (
            "abc-",
            "INVALID_SANDBOX_ID_HYPHENS",
            "Sandbox ID cannot start or end with hyphens (DNS requirement).",
        ),
        ("-", "INVALID_SANDBOX_ID_HYPHENS", None),
        ("www", "RESERVED_SANDBOX_ID", "Reserved sandbox ID 'www' is not allowed."),
        ("Admin", "RESERVED_SANDBOX_ID", "Reserved sandbox ID 'Admin' is not allowed."),
        ("WORKERS", "RESERVED_SANDBOX_ID", "Reserved sandbox ID 'WORKERS' is not allowed."),
        (
            "My-Sandbox",
            "INVALID_SANDBOX_ID",
            "Sandbox ID must contain only lowercase letters (a-z), numbers (0-9), and hyphens (-)"
            " (DNS requirement). Invalid sandbox ID: 'My-Sandbox'.",
        ),
        ("a_b", "INVALID_SANDBOX_ID", None),
        ("a.b", "INVALID_SANDBOX_ID", None),
        ("caf\u00e9", "INVALID_SANDBOX_ID", None),
        ("a b", "INVALID_SANDBOX_ID", None),
    ],
)
def test_invalid_sandbox_ids(sid: str, code: str, message: str | None) -> None:
    with pytest.raises(InvalidSandboxIdError) as info:
        validate_sandbox_id(sid)
    assert info.value.code == code
    assert info.value.status == 400
    if message is not None:
        assert info.value.message == message


@pytest.mark.parametrize("reserved", sorted(RESERVED_SANDBOX_IDS))
def test_every_reserved_id_in_every_case(reserved: str) -> None:
    for variant in (reserved, reserved.upper(), reserved.capitalize()):
        with pytest.raises(InvalidSandboxIdError) as info:
            validate_sandbox_id(variant)
        assert info.value.code == "RESERVED_SANDBOX_ID"


def test_reserved_list_is_the_reference_list() -> None:
    assert {"www", "api", "admin", "root", "system", "cloudflare", "workers"} == set(
        RESERVED_SANDBOX_IDS
    )


@pytest.mark.parametrize("value", [None, 123, b"abc"])
def test_sandbox_id_must_be_a_string(value: object) -> None:
    with pytest.raises(InvalidSandboxIdError) as info:
        validate_sandbox_id(value)
    assert info.value.code == "INVALID_SANDBOX_ID"


# --- tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["a", "_", "tok_1", "a" * 16, "0123456789abcdef"])
def test_valid_custom_tokens(token: str) -> None:
    assert validate_custom_token(token) == token


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "Custom token cannot be empty."),
        (
            "a" * 17,
            "Custom token too long. Maximum 16 characters allowed. Received: 17 characters.",
        ),
        (
            "a" * 100,
            "Custom token too long. Maximum 16 characters allowed. Received: 100 characters.",
        ),
        (
            "Tok",
            "Custom token must contain only lowercase letters (a-z), numbers (0-9), and "
            "underscores (_). Invalid token provided.",
        ),
        (
            "my-token",
            "Custom token must contain only lowercase letters (a-z), numbers (0-9), and "
            "underscores (_). Invalid token provided.",
        ),
        (
            "a b",
            "Custom token must contain only lowercase letters (a-z), numbers (0-9), and "
            "underscores (_). Invalid token provided.",
        ),
        ("x" * 16 + "-", None),  # length is checked before charset, as in the reference
    ],
)
def test_invalid_custom_tokens(token: str, message: str | None) -> None:
    with pytest.raises(InvalidTokenError) as info:
        validate_custom_token(token)
    assert info.value.code == "INVALID_TOKEN_FORMAT"
    assert info.value.status == 400
    if message is not None:
        assert info.value.message == message
    else:
        assert "too long" in info.value.message


def test_custom_token_must_be_a_string() -> None:
    with pytest.raises(InvalidTokenError):
        validate_custom_token(None)
    with pytest.raises(InvalidTokenError):
        validate_custom_token(12)


def test_route_token_allows_up_to_63() -> None:
    assert validate_route_token("a" * 63) == "a" * 63
    for bad in ["", "a" * 64, "a-b", "A", None]:
        with pytest.raises(InvalidTokenError):
            validate_route_token(bad)


def test_generate_token_charset_length_uniqueness() -> None:
    tokens = [generate_token() for _ in range(1000)]
    assert set(TOKEN_ALPHABET) == set(string.ascii_lowercase + string.digits + "_")
    allowed = set(string.ascii_lowercase + string.digits)  # no "_": wildcard certificates
    for tok in tokens:
        assert len(tok) == 16
        assert set(tok) <= allowed
        assert validate_custom_token(tok) == tok
    assert len(set(tokens)) == 1000
    # 16000 draws over 36 symbols: every symbol shows up (a chance failure is ~36 * e^-450).
    assert set("".join(tokens)) == allowed


def test_tokens_equal() -> None:
    assert tokens_equal("abc_123", "abc_123")
    assert not tokens_equal("abc_123", "abc_124")
    assert not tokens_equal("abc", "abcd")
    assert not tokens_equal("", "a")
    assert tokens_equal("", "")
    assert tokens_equal("\u00e9\ud800", "\u00e9\ud800")  # non-ASCII never raises
    assert not tokens_equal("\u00e9", "e")


# --- build ---------------------------------------------------------------------------------------


def test_build_host_and_url() -> None:
    assert build_preview_host(8000, "abc123", "tok_1", DOMAIN) == "8000-abc123-tok_1.example.com"
    assert build_preview_host(8000, "abc123", None, DOMAIN) == "8000-abc123.example.com"
    assert build_preview_host(8080, "my-sandbox", "tok", "Example.COM.") == (
        "8080-my-sandbox-tok.example.com"
    )
    assert build_preview_url(8080, "my-sandbox", "tok_1", DOMAIN) == (
        "https://8080-my-sandbox-tok_1.example.com/"
    )
    assert build_preview_url(
        8000, "abc123", "tok", "localhost", scheme="http", public_port=8080
    ) == ("http://8000-abc123-tok.localhost:8080/")
    assert build_preview_url(8000, "abc123", "tok", "localhost", scheme="http", public_port=80) == (
        "http://8000-abc123-tok.localhost/"
    )
    assert build_preview_url(8000, "abc", "tok", DOMAIN, public_port=443) == (
        "https://8000-abc-tok.example.com/"
    )
    assert build_preview_url(8000, "abc", "tok", DOMAIN, public_port=8443) == (
        "https://8000-abc-tok.example.com:8443/"
    )
    assert build_preview_url(8000, "abc", None, DOMAIN, scheme="http", public_port=443) == (
        "http://8000-abc.example.com:443/"
    )


def test_build_rejects_bad_parts() -> None:
    with pytest.raises(InvalidPortError):
        build_preview_host(3000, "abc", "tok", DOMAIN)
    with pytest.raises(InvalidSandboxIdError):
        build_preview_host(8000, "www", "tok", DOMAIN)
    with pytest.raises(InvalidSandboxIdError):
        build_preview_host(8000, "ABC", "tok", DOMAIN)
    with pytest.raises(InvalidTokenError):
        build_preview_host(8000, "abc", "to-k", DOMAIN)
    for domain in ["", ".", ".example.com", "example.com:8443", "a/b"]:
        with pytest.raises(InvalidDomainError):
            build_preview_host(8000, "abc", "tok", domain)
    with pytest.raises(ValidationError):
        build_preview_url(8000, "abc", "tok", DOMAIN, scheme="ftp")
    for public_port in [0, 65536, True]:
        with pytest.raises(InvalidPortError):
            build_preview_url(8000, "abc", "tok", DOMAIN, public_port=public_port)


# --- parse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "route"),
    [
        ("8000-abc123-tok_1.example.com", PreviewRoute(8000, "abc123", "tok_1")),
        ("8000-ABC123-TOK_1.Example.COM", PreviewRoute(8000, "abc123", "tok_1")),
        ("8000-abc123-tok.example.com:8080", PreviewRoute(8000, "abc123", "tok")),
        ("8000-abc123-tok.example.com:443", PreviewRoute(8000, "abc123", "tok")),
        ("8000-abc123-tok.example.com.", PreviewRoute(8000, "abc123", "tok")),
        ("8080-my-sandbox-tok.example.com", PreviewRoute(8080, "my-sandbox", "tok")),
        (
            "8080-550e8400-e29b-41d4-a716-446655440000-k3x9.example.com",
            PreviewRoute(8080, "550e8400-e29b-41d4-a716-446655440000", "k3x9"),
        ),
        ("1024-a-_.example.com", PreviewRoute(1024, "a", "_")),
        ("65535-a-b.example.com", PreviewRoute(65535, "a", "b")),
        ("8787-a-b.example.com", PreviewRoute(8787, "a", "b")),
        ("8000-x--y-t.example.com", PreviewRoute(8000, "x--y", "t")),
        # the longest token and id in a first label of 63, what one DNS label holds (a longer
        # label never routes: tests/protocol/test_preview_host_length.py)
        ("8000-abc-" + "t" * 54 + ".example.com", PreviewRoute(8000, "abc", "t" * 54)),
        ("8000-" + "a" * 56 + "-t.example.com", PreviewRoute(8000, "a" * 56, "t")),
    ],
)
def test_parse_accepts(host: str, route: PreviewRoute) -> None:
    assert parse_preview_host(host, DOMAIN) == route


@pytest.mark.parametrize(
    "host",
    [
        "",
        ".",
        "example.com",
        "8000-abc-tok",  # no dot
        "8000-abc-tok.other.com",  # not our domain
        "8000-abc-tok.sub.example.com",  # deeper than our domain
        "8000-abc-tok.example.com.evil.net",
        "8000-abc-tok.notexample.com",
        "x.8000-abc-tok.example.com",  # preview label must be the first one
        "3000-abc-tok.example.com",  # control plane
        "0080-abc-tok.example.com",
        "1023-abc-tok.example.com",
        "65536-abc-tok.example.com",
        "99999-abc-tok.example.com",
        "800-abc-tok.example.com",  # 3 digits
        "123456-abc-tok.example.com",  # 6 digits
        "08000-abc-tok.example.com",  # leading zero: not canonical
        "\uff18\uff10\uff10\uff10-abc-tok.example.com",  # fullwidth digits
        "abcd-abc-tok.example.com",
        "8000abc-tok.example.com",
        "8000.example.com",
        "8000-.example.com",
        "8000-abc.example.com",  # token mode needs a token
        "8000-abc-.example.com",  # empty token
        "8000--tok.example.com",  # empty id
        "8000-abc--tok.example.com",  # id ends with "-"
        "8000--abc-tok.example.com",  # id starts with "-"
        "8000-www-tok.example.com",  # reserved
        "8000-admin-tok.example.com",
        "8000-WORKERS-tok.example.com",  # reserved after lowercasing
        "8000-ab_c-tok.example.com",  # "_" not allowed in ids
        "8000-abc-to.k.example.com",
        "8000-abc-" + "t" * 64 + ".example.com",  # token too long
        "8000-" + "a" * 64 + "-t.example.com",  # id too long
        "8000-abc-tok.example.com:",
        "8000-abc-tok.example.com:abc",
        "8000-abc-tok.example.com:80:80",
        "[::1]:8080",
        "[::1]",
        "::1",
        "8000-abc-t\u212aok.example.com",  # KELVIN SIGN lowercases to "k": refused as non-ASCII
        "8000-caf\u00e9-tok.example.com",
        "8000-abc-tok.example.com\x00",
        " 8000-abc-tok.example.com",
    ],
)
def test_parse_rejects(host: str) -> None:
    assert parse_preview_host(host, DOMAIN) is None


def test_token_with_hyphen_is_impossible() -> None:
    # "tok-en" can never be a token: the last "-" starts the token, the rest is the id.
    assert parse_preview_host("8000-abc-tok-en.example.com", DOMAIN) == PreviewRoute(
        8000, "abc-tok", "en"
    )


def test_parse_domain_normalization() -> None:
    assert parse_preview_host("8000-abc-tok.example.com", "Example.Com.") == PreviewRoute(
        8000, "abc", "tok"
    )
    assert parse_preview_host("8000-abc-tok.localhost:8080", "localhost") == PreviewRoute(
        8000, "abc", "tok"
    )
    assert parse_preview_host("8000-abc-tok.localhost", "example.com") is None


def test_parse_tokenless_mode() -> None:
    parse = parse_preview_host
    assert parse("8000-abc.example.com", DOMAIN, tokens=False) == PreviewRoute(8000, "abc", None)
    # without tokens, every "-" after the port belongs to the id
    assert parse("8000-my-sandbox-tok.example.com", DOMAIN, tokens=False) == PreviewRoute(
        8000, "my-sandbox-tok", None
    )
    assert parse("8000-abc.example.com:8080", DOMAIN, tokens=False) == PreviewRoute(
        8000, "abc", None
    )
    for host in [
        "8000-www.example.com",
        "3000-abc.example.com",
        "8000-abc_tok.example.com",
        "8000-abc-.example.com",
        "8000-.example.com",
        "8000-abc.other.com",
        "8000.example.com",
    ]:
        assert parse(host, DOMAIN, tokens=False) is None, host


def test_preview_route_is_frozen_and_slotted() -> None:
    route = PreviewRoute(8000, "abc", "tok")
    with pytest.raises(AttributeError):
        route.port = 9000  # type: ignore[misc]
    assert not hasattr(route, "__dict__")


# --- round trip ----------------------------------------------------------------------------------

_alnum = st.sampled_from(string.ascii_lowercase + string.digits)
sandbox_ids = (
    st.tuples(_alnum, st.text(alphabet=string.ascii_lowercase + string.digits + "-", max_size=61))
    .map(lambda t: t[0] + t[1])
    .filter(lambda s: not s.endswith("-"))
    .filter(lambda s: s not in RESERVED_SANDBOX_IDS)
)
tokens = st.text(alphabet=TOKEN_ALPHABET, min_size=1, max_size=63)
ports = st.integers(1024, 65535).filter(lambda p: p != 3000)
domains = st.sampled_from(["example.com", "localhost", "preview.sandbox.dev", "a.b.c.d"])


@given(ports, sandbox_ids, tokens, domains)
@settings(max_examples=200)
def test_build_parse_round_trip(port: int, sid: str, token: str, domain: str) -> None:
    host = build_preview_host(port, sid, token, domain)
    route = _route_if_it_fits(port, sid, token, domain)
    assert parse_preview_host(host, domain) == route
    assert parse_preview_host(host.upper() + ":8080", domain) == route
    url = build_preview_url(port, sid, token, domain, scheme="http", public_port=8080)
    assert url == f"http://{host}:8080/"


@given(ports, sandbox_ids, domains)
@settings(max_examples=100)
def test_build_parse_round_trip_tokenless(port: int, sid: str, domain: str) -> None:
    host = build_preview_host(port, sid, None, domain)
    route = _route_if_it_fits(port, sid, None, domain)
    assert parse_preview_host(host, domain, tokens=False) == route


def _route_if_it_fits(port: int, sid: str, token: str | None, domain: str) -> PreviewRoute | None:
    """The route of the host built of these, or None when DNS cannot carry it (such a host does
    not route, and no expose makes one)."""
    from protocol.hostnames import PreviewHostTooLongError, check_preview_host_length

    try:
        check_preview_host_length(port, sid, token, domain)
    except PreviewHostTooLongError:
        return None
    return PreviewRoute(port, sid, token)


@given(st.text(max_size=120), st.booleans())
@settings(max_examples=200)
def test_parse_never_raises(host: str, with_tokens: bool) -> None:
    route = parse_preview_host(host, DOMAIN, tokens=with_tokens)
    if route is not None:
        # anything that routes is made of valid parts and rebuilds to the same route
        validate_port(route.port)
        validate_sandbox_id(route.sandbox_id)
        rebuilt = build_preview_host(route.port, route.sandbox_id, route.token, DOMAIN)
        assert parse_preview_host(rebuilt, DOMAIN, tokens=with_tokens) == route


@given(
    st.from_regex(r"[0-9]{4,5}-[a-z0-9_-]{1,20}(-[a-z0-9_]{1,5})?\.example\.com", fullmatch=True)
)
@settings(max_examples=200)
def test_parse_near_miss_hosts(host: str) -> None:
    route = parse_preview_host(host, DOMAIN)
    if route is not None:
        assert build_preview_host(route.port, route.sandbox_id, route.token, DOMAIN) == host


def test_port_name_rule_is_one_rule() -> None:
    """256 characters, or None: the admin API, the local API and the control codec share it."""
    from protocol import control
    from protocol.hostnames import MAX_PORT_NAME_LENGTH, InvalidNameError, validate_port_name

    assert validate_port_name(None) is None
    assert validate_port_name("n" * MAX_PORT_NAME_LENGTH) == "n" * MAX_PORT_NAME_LENGTH
    for bad in ("n" * (MAX_PORT_NAME_LENGTH + 1), 5, b"api"):
        with pytest.raises(InvalidNameError) as err:
            validate_port_name(bad)
        assert err.value.code == "INVALID_NAME"
    longest = control.Expose(1, 8000, name="n" * MAX_PORT_NAME_LENGTH)
    assert control.decode_message(control.encode_message(longest)) == longest
    with pytest.raises(control.ControlError):
        control.decode_message(
            control.encode_message(longest).replace(b'"n', b'"nn', 1)  # one character more
        )
