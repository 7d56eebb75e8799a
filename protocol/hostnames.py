"""Preview hostnames: build, parse, and the validation of ports, sandbox ids and tokens.

A preview host is ``{port}-{sandbox_id}-{token}.{domain}`` (or ``{port}-{sandbox_id}.{domain}``
when tokens are turned off for trusted networks). The rules follow Cloudflare's Sandbox SDK
(``security.ts`` ``validatePort`` / ``sanitizeSandboxId`` / ``validateCustomToken`` and
``request-handler.ts`` ``extractSandboxRoute``) so that users moving over see the same messages,
with deliberate differences:

* sandbox ids are restricted to ``[a-z0-9-]`` (Cloudflare accepts anything and only warns), so a
  built hostname always parses back to the same id;
* a host routes only when everything after the first label is *our* configured domain;
* a port with a leading zero ("08000") does not route, so each route has exactly one host;
* an exposure whose host DNS cannot carry (a first label over 63 or a host over 253 characters:
  a sandbox id past ~40 characters with a 16-character token) is refused when it is made
  (:func:`check_preview_host_length`, ``PREVIEW_HOST_TOO_LONG``), and such a host never routes.
  Cloudflare hands out those URLs, which no resolver will look up.

``parse_preview_host`` is on the per-request hot path: one precompiled ``fullmatch`` per request and
no exceptions on any path. The validators raise :class:`ValidationError` subclasses whose ``code``,
``message`` and ``status`` map straight into the admin API's ``{"error": message, "code": code}``.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CONTROL_PLANE_PORT",
    "DEFAULT_OPTIONS",
    "EXPOSURE_PROTOCOLS",
    "GENERATED_TOKEN_ALPHABET",
    "MAX_CUSTOM_TOKEN_LENGTH",
    "MAX_HOST_LENGTH",
    "MAX_LABEL_LENGTH",
    "MAX_PORT",
    "MAX_PORT_NAME_LENGTH",
    "MAX_SANDBOX_ID_LENGTH",
    "MAX_TOKEN_LENGTH",
    "MIN_PORT",
    "RESERVED_SANDBOX_IDS",
    "TOKEN_ALPHABET",
    "TOKEN_LENGTH",
    "ExposureOptions",
    "InvalidDomainError",
    "InvalidNameError",
    "InvalidOptionError",
    "InvalidPortError",
    "InvalidSandboxIdError",
    "InvalidTokenError",
    "PreviewHostTooLongError",
    "PreviewRoute",
    "ValidationError",
    "build_preview_host",
    "build_preview_url",
    "check_preview_host_length",
    "generate_token",
    "is_dns_name",
    "parse_preview_host",
    "tokens_equal",
    "validate_custom_token",
    "validate_exposure_options",
    "validate_port",
    "validate_port_name",
    "validate_route_token",
    "validate_sandbox_id",
]

# Ports below 1024 are privileged and usually system services; Cloudflare refuses them too.
MIN_PORT: Final = 1024
MAX_PORT: Final = 65535
# The agent's local control API listens here (Cloudflare's sandbox control plane port).
CONTROL_PLANE_PORT: Final = 3000
# A port's display name (Cloudflare's ``name``): free text, bounded so exposures stay small.
MAX_PORT_NAME_LENGTH: Final = 256
# One DNS label holds at most 63 octets, a name at most 253 characters (RFC 1035 §2.3.4; 255
# octets on the wire)
MAX_LABEL_LENGTH: Final = 63
MAX_HOST_LENGTH: Final = 253
MAX_SANDBOX_ID_LENGTH: Final = 63
# Custom tokens: Cloudflare's limit, short enough to leave room for port and id in one label.
MAX_CUSTOM_TOKEN_LENGTH: Final = 16
# Tokens found in a hostname: anything that fits a DNS label (Cloudflare's parser allows 1-63).
MAX_TOKEN_LENGTH: Final = 63
# Generated tokens: 16 chars as Cloudflare's, from its 37-char alphabet less "_" (36, below).
TOKEN_LENGTH: Final = 16
TOKEN_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789_"  # what a custom token may use
# Generated tokens leave out "_": a hostname label with "_" does not match a wildcard certificate
# in OpenSSL-based clients (curl, Python, wget), so an HTTPS preview URL with one would fail.
GENERATED_TOKEN_ALPHABET: Final = TOKEN_ALPHABET.replace("_", "")
RESERVED_SANDBOX_IDS: Final = frozenset(
    {"www", "api", "admin", "root", "system", "cloudflare", "workers"}
)

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# Longest rendering of a rejected value inside an error message: the message goes back in a JSON
# body, and echoing a megabyte of attacker input there helps nobody.
_MAX_SHOWN_VALUE: Final = 64

_SANDBOX_ID_CHARS = re.compile(r"[a-z0-9-]+")
# One label of a host name: 1-63 of a-z, 0-9, "-" (not at either end) and "_" (some internal
# zones use it, though TLS clients refuse it under a wildcard certificate)
DNS_LABEL: Final = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
# re.ASCII: without it, IGNORECASE lets [a-z] match what Unicode case-folds into it (KELVIN SIGN,
# LATIN SMALL LETTER LONG S, dotted and dotless i), so such a "DNS name" would pass.
_DNS_NAME = re.compile(
    rf"(?=.{{1,253}}\.?$){DNS_LABEL}(?:\.{DNS_LABEL})*\.?", re.IGNORECASE | re.ASCII
)
_TOKEN_CHARS = re.compile(r"[a-z0-9_]+")
# First label of a preview host. The id group is greedy, and since a token cannot contain "-",
# the token is exactly what follows the LAST "-" (Cloudflare #352: ids may contain "-").
# The port has no leading zero (Cloudflare's parseInt accepts "08000"): one host per route.
_LABEL_WITH_TOKEN = re.compile(
    r"([1-9][0-9]{3,4})-([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)-([a-z0-9_]{1,63})"
)
_LABEL_WITHOUT_TOKEN = re.compile(r"([1-9][0-9]{3,4})-([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)")


class ValidationError(ValueError):
    """A value from a user or API client was refused.

    Maps straight to the admin API's ``status`` + ``{"error": message, "code": code}``."""

    code: str = "VALIDATION_ERROR"
    status: int = 400

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class InvalidPortError(ValidationError):
    code = "INVALID_PORT"


class InvalidSandboxIdError(ValidationError):
    """``code`` is one of INVALID_SANDBOX_ID_LENGTH, INVALID_SANDBOX_ID_HYPHENS,
    RESERVED_SANDBOX_ID, INVALID_SANDBOX_ID (type or character set)."""

    code = "INVALID_SANDBOX_ID"


class InvalidTokenError(ValidationError):
    # Not "INVALID_TOKEN": that code is the preview listener's 404 for a wrong token.
    code = "INVALID_TOKEN_FORMAT"


class InvalidDomainError(ValidationError):
    code = "INVALID_DOMAIN"


class InvalidNameError(ValidationError):
    code = "INVALID_NAME"


class InvalidOptionError(ValidationError):
    code = "INVALID_OPTION"


class PreviewHostTooLongError(ValidationError):
    """The exposure's preview host would not fit DNS (:func:`check_preview_host_length`)."""

    code = "PREVIEW_HOST_TOO_LONG"


# What an exposure carries: "http" (a preview URL, the default), "tcp" (a public TCP port, raw
# bytes), "tls" (routed by SNI on the public TLS port, TLS ended in the sandbox).
EXPOSURE_PROTOCOLS: Final = ("http", "tcp", "tls")


@dataclass(frozen=True, slots=True)
class ExposureOptions:
    """How an exposure is served, beyond port/name/token. The defaults are a plain preview URL,
    and a message or record that carries only defaults leaves the fields out (older peers)."""

    protocol: str = "http"
    proxy_protocol: bool = False  # send a PROXY protocol v2 header to the service first
    inspect: bool = False  # record requests in the sandbox's inspection buffer


DEFAULT_OPTIONS: Final = ExposureOptions()


def validate_exposure_options(
    protocol: object = "http", proxy_protocol: object = False, inspect: object = False
) -> ExposureOptions:
    """The options from untrusted values (JSON ``null`` = the default); InvalidOptionError."""
    if protocol is None:
        protocol = "http"
    if protocol not in EXPOSURE_PROTOCOLS or not isinstance(protocol, str):
        raise InvalidOptionError(
            f"protocol must be one of {', '.join(EXPOSURE_PROTOCOLS)}; got {_js_str(protocol)}."
        )
    for field_name, value in (("proxyProtocol", proxy_protocol), ("inspect", inspect)):
        if value is not None and not isinstance(value, bool):
            raise InvalidOptionError(f"{field_name} must be true or false.")
    if inspect and protocol != "http":
        raise InvalidOptionError("inspect records HTTP requests: only for protocol http.")
    if protocol == DEFAULT_OPTIONS.protocol and not proxy_protocol and not inspect:
        return DEFAULT_OPTIONS
    return ExposureOptions(str(protocol), bool(proxy_protocol), bool(inspect))


@dataclass(frozen=True, slots=True)
class PreviewRoute:
    port: int
    sandbox_id: str
    token: str | None


def _js_str(value: object) -> str:
    """Render a value as a JavaScript template literal would (``${port}``), bounded in length."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        if value != value:
            text = "NaN"
        elif value in (float("inf"), float("-inf")):
            text = "Infinity" if value > 0 else "-Infinity"
        else:
            # 8080.5 -> "8080.5". An integral float keeps its ".0" (JS would print 8080 and accept
            # it); we refuse floats, and "8080" in the message would hide why.
            text = repr(value)
    elif isinstance(value, int) and value.bit_length() > 256:
        text = "a huge integer"  # str() of a 4300+ digit int raises ValueError
    else:
        try:
            text = str(value)
        except Exception:
            text = f"<{type(value).__name__}>"
    if len(text) > _MAX_SHOWN_VALUE:
        text = text[:_MAX_SHOWN_VALUE] + "..."
    return text


def _port_ok(port: int) -> bool:
    return MIN_PORT <= port <= MAX_PORT and port != CONTROL_PLANE_PORT


def validate_port(port: object) -> int:
    """Return ``port`` if it is an ``int`` (not bool/str/float) in 1024-65535 other than 3000."""
    # bool is an int subclass in Python but not a port; IntEnum and other int subclasses are.
    if isinstance(port, int) and not isinstance(port, bool) and _port_ok(port):
        return int(port)
    raise InvalidPortError(
        f"Invalid port number: {_js_str(port)}. "
        "Must be 1024-65535, excluding 3000 (sandbox control plane)."
    )


def validate_port_name(name: object) -> str | None:
    """Return ``name`` if it is None or a string of at most 256 characters (the one rule, used
    by the admin API, the agent's local API and the control codec)."""
    if name is None or (isinstance(name, str) and len(name) <= MAX_PORT_NAME_LENGTH):
        return name
    raise InvalidNameError(
        f"Port name must be a string of at most {MAX_PORT_NAME_LENGTH} characters."
    )


def validate_sandbox_id(sandbox_id: object) -> str:
    """Return ``sandbox_id`` if it is 1-63 chars of ``[a-z0-9-]``, hyphen-free at both ends and
    not reserved. Checks run in Cloudflare's order (length, hyphens, reserved), then the charset."""
    if not isinstance(sandbox_id, str):
        raise InvalidSandboxIdError(
            f"Sandbox ID must be a string, got {type(sandbox_id).__name__}.", "INVALID_SANDBOX_ID"
        )
    if not sandbox_id or len(sandbox_id) > MAX_SANDBOX_ID_LENGTH:
        raise InvalidSandboxIdError(
            "Sandbox ID must be 1-63 characters long.", "INVALID_SANDBOX_ID_LENGTH"
        )
    if sandbox_id[0] == "-" or sandbox_id[-1] == "-":
        raise InvalidSandboxIdError(
            "Sandbox ID cannot start or end with hyphens (DNS requirement).",
            "INVALID_SANDBOX_ID_HYPHENS",
        )
    if sandbox_id.lower() in RESERVED_SANDBOX_IDS:
        raise InvalidSandboxIdError(
            f"Reserved sandbox ID '{sandbox_id}' is not allowed.", "RESERVED_SANDBOX_ID"
        )
    if _SANDBOX_ID_CHARS.fullmatch(sandbox_id) is None:
        raise InvalidSandboxIdError(
            "Sandbox ID must contain only lowercase letters (a-z), numbers (0-9), and hyphens (-)"
            f" (DNS requirement). Invalid sandbox ID: '{_js_str(sandbox_id)}'.",
            "INVALID_SANDBOX_ID",
        )
    return sandbox_id


def validate_custom_token(token: object) -> str:
    """Return ``token`` if it is 1-16 chars of ``[a-z0-9_]`` (Cloudflare: validateCustomToken)."""
    if not isinstance(token, str):
        raise InvalidTokenError(f"Custom token must be a string, got {type(token).__name__}.")
    if not token:
        raise InvalidTokenError("Custom token cannot be empty.")
    if len(token) > MAX_CUSTOM_TOKEN_LENGTH:
        raise InvalidTokenError(
            f"Custom token too long. Maximum {MAX_CUSTOM_TOKEN_LENGTH} characters allowed. "
            f"Received: {len(token)} characters."
        )
    if _TOKEN_CHARS.fullmatch(token) is None:
        raise InvalidTokenError(
            "Custom token must contain only lowercase letters (a-z), numbers (0-9), "
            "and underscores (_). Invalid token provided."
        )
    return token


def validate_route_token(token: object) -> str:
    """Return ``token`` if it can appear in a preview hostname: 1-63 chars of ``[a-z0-9_]``.

    Looser than :func:`validate_custom_token` (which is what users may *choose*); used when
    building hostnames so any token the parser accepts can be built."""
    if (
        isinstance(token, str)
        and 0 < len(token) <= MAX_TOKEN_LENGTH
        and _TOKEN_CHARS.fullmatch(token) is not None
    ):
        return token
    raise InvalidTokenError(
        "Token must be 1-63 characters of lowercase letters (a-z), numbers (0-9), "
        "and underscores (_)."
    )


def generate_token() -> str:
    """A fresh preview token: 16 chars of ``[a-z0-9]`` (no ``_``: see GENERATED_TOKEN_ALPHABET).

    Each char is an independent ``secrets.choice`` over 36 symbols: 16 * log2(36) ~ 82.7 bits,
    uniformly spread. Cloudflare base64-encodes 12 random bytes and then lowercases, which folds
    letter pairs together and skews the distribution ("fewer than 96 bits" and uneven)."""
    return "".join([secrets.choice(GENERATED_TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH)])


def tokens_equal(a: str, b: str) -> bool:
    """Constant-time token comparison (no timing oracle for guessing a token char by char)."""
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


def is_dns_name(name: str) -> bool:
    """``name`` is a host name: labels (``DNS_LABEL``, any case) joined by dots, at most 253
    characters, a trailing dot allowed; no port, scheme, path or space."""
    return _DNS_NAME.fullmatch(name) is not None


def _normalize_domain(domain: str) -> str:
    """``domain`` lowercased, without its trailing dot, if :func:`is_dns_name` (the rule the
    configured domain is checked by, tunneld/config.py); else InvalidDomainError."""
    if not isinstance(domain, str) or not is_dns_name(domain):
        raise InvalidDomainError(
            f"Invalid preview domain: '{_js_str(domain)}'. A domain is labels of a-z, 0-9, '-' "
            "and '_' (1-63 each, not starting or ending with '-') joined by dots, at most 253 "
            "characters, with no port, scheme or path."
        )
    return domain.lower().removesuffix(".")


def build_preview_host(port: int, sandbox_id: str, token: str | None, domain: str) -> str:
    """``{port}-{sandbox_id}-{token}.{domain}``, or ``{port}-{sandbox_id}.{domain}`` if ``token``
    is None. Validates every part, so the result parses back to the same route when it fits DNS
    (:func:`check_preview_host_length`, which every expose passes; a longer one never routes)."""
    port = validate_port(port)
    validate_sandbox_id(sandbox_id)
    host_domain = _normalize_domain(domain)
    if token is None:
        return f"{port}-{sandbox_id}.{host_domain}"
    validate_route_token(token)
    return f"{port}-{sandbox_id}-{token}.{host_domain}"


def check_preview_host_length(port: int, sandbox_id: str, token: str | None, domain: str) -> None:
    """PreviewHostTooLongError if the host :func:`build_preview_host` makes of these (valid)
    parts does not fit DNS: its first label over ``MAX_LABEL_LENGTH`` (63) or the whole host over
    ``MAX_HOST_LENGTH`` (253) characters. No resolver looks such a name up, so its URL could never
    be used. Lengths only, no string built: it runs for every stored exposure at start-up."""
    port_len = len(str(port))
    token_len = 0 if token is None else len(token)
    label = port_len + 1 + len(sandbox_id) + (0 if token is None else 1 + token_len)
    if label > MAX_LABEL_LENGTH:
        if token is None:
            parts = f"port {port_len}, sandbox ID {len(sandbox_id)}, 1 hyphen"
            fits = (
                f"It fits with a sandbox ID of at most {MAX_LABEL_LENGTH - port_len - 1} "
                f"characters (port {port})."
            )
        else:
            parts = f"port {port_len}, sandbox ID {len(sandbox_id)}, token {token_len}, 2 hyphens"
            id_room = MAX_LABEL_LENGTH - port_len - 2 - token_len
            fits = (
                f"It fits with a sandbox ID of at most {id_room} characters (port {port}, a "
                f"{token_len}-character token)"
            )
            token_room = MAX_LABEL_LENGTH - port_len - 2 - len(sandbox_id)
            if token_room >= 1:
                fits += f", or with this sandbox ID and a custom token of at most {token_room}"
            fits += "."
        raise PreviewHostTooLongError(
            f"Preview host too long: its first label would be {label} characters ({parts}), "
            f"more than the {MAX_LABEL_LENGTH} a DNS label holds, so no client could resolve "
            f"the URL. {fits}"
        )
    domain_len = len(domain) - domain.endswith(".")
    host = label + 1 + domain_len
    if host > MAX_HOST_LENGTH:
        raise PreviewHostTooLongError(
            f"Preview host too long: it would be {host} characters (first label {label}, the "
            f"domain {domain_len}, 1 dot), more than the {MAX_HOST_LENGTH} a DNS name holds, so "
            "no client could resolve the URL. Use a shorter sandbox ID or custom token, or a "
            "shorter preview domain."
        )


def build_preview_url(
    port: int,
    sandbox_id: str,
    token: str | None,
    domain: str,
    *,
    scheme: str = "https",
    public_port: int | None = None,
) -> str:
    """The preview URL with a trailing ``/`` (as WHATWG ``URL.toString()``); ``:public_port`` only
    when it is not the scheme's default, e.g. ``http://8000-abc123-tok.localhost:8080/``."""
    if scheme not in _DEFAULT_PORTS:
        raise ValidationError(f"Invalid scheme: '{_js_str(scheme)}'. Use http or https.")
    host = build_preview_host(port, sandbox_id, token, domain)
    if public_port is None or public_port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}/"
    if type(public_port) is not int or not 1 <= public_port <= MAX_PORT:
        raise InvalidPortError(f"Invalid public port: {_js_str(public_port)}. Must be 1-65535.")
    return f"{scheme}://{host}:{public_port}/"


def parse_preview_host(host: str, domain: str, *, tokens: bool = True) -> PreviewRoute | None:
    """Route a ``Host`` header to ``(port, sandbox_id, token)``, or None if it is no preview host.

    Lowercases, strips ``:port``, and requires everything after the first label to equal
    ``domain`` (so only our own domain routes). None for: IPv6 literals, no dot, a port that is not
    4-5 digits or fails :func:`validate_port`, a first label over 63 or a name over 253
    characters (no DNS name: :func:`check_preview_host_length`), a token outside
    ``[a-z0-9_]{1,63}``, a sandbox id that fails :func:`validate_sandbox_id`, non-ASCII input.
    Never raises."""
    if not host.isascii():
        return None  # also stops str.lower() folding e.g. KELVIN SIGN into "k"
    host = host.lower()
    name, colon, host_port = host.partition(":")
    if colon and not host_port.isdigit():  # input is ASCII here, so isdigit() means [0-9]+
        return None  # "[::1]:8080", "a:b:c", "host:" - nothing we serve
    label, dot, rest = name.partition(".")
    if not dot or len(label) > MAX_LABEL_LENGTH:
        return None  # no DNS label (check_preview_host_length keeps exposures from such hosts)
    if len(name) > MAX_HOST_LENGTH and len(name.removesuffix(".")) > MAX_HOST_LENGTH:
        return None  # no DNS name, as above
    # Second test is the rare path: a domain configured with capitals or a trailing dot, or an FQDN
    # Host header ("...example.com.").
    if rest != domain and rest.rstrip(".") != domain.lower().rstrip("."):
        return None
    if tokens:
        m = _LABEL_WITH_TOKEN.fullmatch(label)
        if m is None:
            return None
        port_text, sandbox_id, token = m.groups()
    else:
        m = _LABEL_WITHOUT_TOKEN.fullmatch(label)
        if m is None:
            return None
        port_text, sandbox_id = m.groups()
        token = None
    port = int(port_text)
    if not _port_ok(port) or sandbox_id in RESERVED_SANDBOX_IDS:
        return None
    return PreviewRoute(port, sandbox_id, token)
