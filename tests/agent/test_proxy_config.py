"""Which proxy the agent uses for each edge, how a proxy URL is read, and the CONNECT exchange
(agent/proxy.py), plus the ``tunnel-agent run`` flags. ``open_tunnel`` is driven here against a
scripted proxy on 127.0.0.1 (what a real proxy rarely does: bytes right behind the answer, a
huge head, a hang-up); the agent going through a real proxy is tested in
tests/faults/test_agent_proxy.py."""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import agent_config, main, proxy_choices
from agent.proxy import (
    MAX_RESPONSE_HEAD,
    ProxyConfigError,
    ProxyError,
    ProxyURL,
    connect_request,
    head_bytes_needed,
    no_proxy_matches,
    open_tunnel,
    parse_connect_response,
    parse_proxy_url,
    redact,
    select_proxy,
)

PROXY_VARS = (
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "TUNNEL_AGENT_PROXY",
)


def chosen(host: str = "edge.example", secure: bool = False, port: int = 7000, **kw) -> str:
    """``host:port (source)`` of the chosen proxy, or ``direct (reason)``."""
    choice = select_proxy(host, port, secure, **kw)
    if choice.proxy is None:
        return f"direct ({choice.reason})"
    return f"{choice.proxy} ({choice.proxy.source})"


# -- selection ---------------------------------------------------------------------------------


def test_plain_links_use_http_proxy_and_tls_links_https_proxy() -> None:
    env = {"HTTP_PROXY": "http://plain:3128", "HTTPS_PROXY": "http://secure:3129"}
    assert chosen(secure=False, environ=env) == "plain:3128 (HTTP_PROXY)"
    assert chosen(secure=True, environ=env) == "secure:3129 (HTTPS_PROXY)"


def test_no_variable_means_direct() -> None:
    assert chosen(environ={}) == "direct (no proxy configured)"
    # The other scheme's variable is not a fallback (curl and requests agree).
    assert chosen(secure=True, environ={"HTTP_PROXY": "http://p:1"}).startswith("direct")
    assert chosen(secure=False, environ={"HTTPS_PROXY": "http://p:1"}).startswith("direct")


def test_lowercase_wins_over_uppercase_and_empty_values_are_unset() -> None:
    env = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}
    assert chosen(secure=True, environ=env) == "lower:1 (https_proxy)"
    env = {"https_proxy": "  ", "HTTPS_PROXY": "http://upper:2"}
    assert chosen(secure=True, environ=env) == "upper:2 (HTTPS_PROXY)"


def test_all_proxy_is_the_fallback_for_both_schemes() -> None:
    env = {"ALL_PROXY": "http://every:8080"}
    assert chosen(secure=True, environ=env) == "every:8080 (ALL_PROXY)"
    assert chosen(secure=False, environ=env) == "every:8080 (ALL_PROXY)"
    env["HTTPS_PROXY"] = "http://secure:3129"
    assert chosen(secure=True, environ=env) == "secure:3129 (HTTPS_PROXY)"


def test_explicit_proxy_wins_over_every_variable() -> None:
    env = {"HTTPS_PROXY": "http://secure:3129", "ALL_PROXY": "http://every:8080"}
    assert chosen(secure=True, explicit="http://mine:9", environ=env) == "mine:9 (--proxy)"


def test_explicit_empty_or_disabled_means_direct_whatever_the_environment() -> None:
    env = {"HTTPS_PROXY": "http://secure:3129", "HTTP_PROXY": "http://plain:3128"}
    assert chosen(secure=True, explicit="", environ=env) == "direct (proxies disabled)"
    assert chosen(explicit="http://m:1", disabled=True, environ=env).startswith("direct")


def test_no_proxy_skips_the_proxy_for_matching_edges_only() -> None:
    env = {"HTTP_PROXY": "http://plain:3128", "NO_PROXY": "internal.example, 10.0.0.0/8"}
    matched = chosen("edge.internal.example", environ=env)
    assert matched == "direct (NO_PROXY matches edge.internal.example)"
    assert chosen("10.1.2.3", environ=env).startswith("direct (NO_PROXY")
    assert chosen("edge.example", environ=env) == "plain:3128 (HTTP_PROXY)"


def test_no_proxy_applies_to_an_explicit_proxy_too() -> None:
    # As curl: NO_PROXY exempts hosts from -x as well.
    assert chosen("a.corp", explicit="http://m:1", environ={"no_proxy": "corp"}).startswith(
        "direct (no_proxy"
    )


def test_a_variable_that_is_not_chosen_is_not_parsed() -> None:
    env = {"HTTP_PROXY": "socks5://nope:1", "HTTPS_PROXY": "http://ok:3128"}
    assert chosen(secure=True, environ=env) == "ok:3128 (HTTPS_PROXY)"
    with pytest.raises(ProxyConfigError, match="HTTP_PROXY"):
        chosen(secure=False, environ=env)


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "matches"),
    [
        ("edge.example.com", 7000, "*", True),
        ("edge.example.com", 7000, "example.com", True),
        ("example.com", 7000, "example.com", True),
        ("edge.example.com", 7000, ".example.com", True),
        ("example.com", 7000, ".example.com", True),
        ("edge.example.com", 7000, "*.example.com", True),
        ("EDGE.Example.COM", 7000, "example.com", True),
        ("edge.example.com.", 7000, "example.com", True),
        ("notexample.com", 7000, "example.com", False),
        ("example.com.evil", 7000, "example.com", False),
        ("edge.example.com", 7000, "other.org,  example.com", True),
        ("edge.example.com", 7000, "other.org example.com", True),
        ("edge.example.com", 7000, "", False),
        ("edge.example.com", 7000, ",,", False),
        ("edge.example.com", 7000, "example.com:7000", True),
        ("edge.example.com", 7001, "example.com:7000", False),
        ("10.1.2.3", 7000, "10.1.2.3", True),
        ("10.1.2.3", 7000, "10.1.2.4", False),
        ("10.1.2.3", 7000, "10.0.0.0/8", True),
        ("11.1.2.3", 7000, "10.0.0.0/8", False),
        ("10.1.2.3", 7000, "10.1.2.3:7000", True),
        ("10.1.2.3", 7000, "10.1.2.3:7001", False),
        ("::1", 7000, "::1", True),
        ("::1", 7000, "[::1]", True),
        ("::1", 7000, "[::1]:7000", True),
        ("::1", 7000, "[::1]:7001", False),
        ("2001:db8::5", 7000, "2001:db8::/32", True),
        ("edge.example.com", 7000, "10.0.0.0/8", False),
        ("edge.example.com", 7000, "bad/cidr", False),
        # Loopback is not implicitly excluded: only when listed.
        ("127.0.0.1", 7000, "example.com", False),
        ("localhost", 7000, "example.com", False),
        ("127.0.0.1", 7000, "127.0.0.0/8", True),
        ("localhost", 7000, "localhost", True),
    ],
)
def test_no_proxy_matching(host: str, port: int, no_proxy: str, matches: bool) -> None:
    assert no_proxy_matches(host, port, no_proxy) is matches


# -- proxy URLs --------------------------------------------------------------------------------


def test_proxy_url_forms() -> None:
    assert parse_proxy_url("http://proxy.corp:3128") == ProxyURL("proxy.corp", 3128)
    assert parse_proxy_url("proxy.corp:3128") == ProxyURL("proxy.corp", 3128)  # as curl
    assert parse_proxy_url("http://proxy.corp") == ProxyURL("proxy.corp", 80)
    assert parse_proxy_url("http://proxy.corp:3128/") == ProxyURL("proxy.corp", 3128)
    assert parse_proxy_url("HTTP://[::1]:3128") == ProxyURL("::1", 3128)
    with_auth = parse_proxy_url("http://al%40ice:p%3Ass%2Fw@proxy:3128")
    assert (with_auth.username, with_auth.password) == ("al@ice", "p:ss/w")
    no_password = parse_proxy_url("http://alice@proxy:3128")
    assert (no_password.username, no_password.password) == ("alice", None)


def test_proxy_url_text_and_repr_never_carry_credentials() -> None:
    proxy = parse_proxy_url("http://alice:s3cret@proxy:3128", "HTTPS_PROXY")
    assert str(proxy) == "proxy:3128"
    assert "s3cret" not in repr(proxy) and "alice" not in repr(proxy)
    assert str(ProxyURL("::1", 3128)) == "[::1]:3128"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://alice:s3cret@proxy:3128", "https:// proxies (TLS to the proxy itself)"),
        ("socks5://alice:s3cret@proxy:1080", "only http:// proxies"),
        ("http://alice:s3cret@:3128", "has no host"),
        ("http://alice:s3cret@proxy:99999", "is not a proxy URL"),
        ("http://alice:s3/cret@proxy:3128", "is not a proxy URL"),
        ("http://alice:s3cret@proxy:3128/path", "has no path"),
        ("http://alice:s3cret@proxy:0", "port 0"),
        ("http://alice:s3%0D%0Acret@proxy:3128", "line break"),
    ],
)
def test_bad_proxy_urls_are_refused_without_showing_credentials(url: str, says: str) -> None:
    with pytest.raises(ProxyConfigError) as caught:
        parse_proxy_url(url, "HTTPS_PROXY")
    message = str(caught.value)
    assert message.startswith("HTTPS_PROXY: ") and says in message, message
    assert "s3" not in message and "cret" not in message and "alice" not in message, message


def test_redact_hides_everything_up_to_the_last_at() -> None:
    assert redact("http://alice:s3cret@proxy:3128") == "http://***@proxy:3128"
    assert redact("alice:p@ss@proxy:3128") == "***@proxy:3128"
    assert redact("http://alice:pa/ss@proxy") == "http://***@proxy"
    assert redact("http://proxy:3128") == "http://proxy:3128"


# -- the CONNECT exchange ------------------------------------------------------------------------


def test_connect_request_names_the_edge_and_carries_basic_auth() -> None:
    proxy = parse_proxy_url("http://alice:s3cret@proxy:3128")
    request = connect_request(proxy, "edge.example", 7000).decode()
    lines = request.split("\r\n")
    assert lines[0] == "CONNECT edge.example:7000 HTTP/1.1"
    assert "Host: edge.example:7000" in lines
    assert f"Proxy-Authorization: Basic {base64.b64encode(b'alice:s3cret').decode()}" in lines
    assert request.endswith("\r\n\r\n")
    plain = connect_request(ProxyURL("proxy", 3128), "::1", 7000).decode()
    assert plain.startswith("CONNECT [::1]:7000 HTTP/1.1\r\nHost: [::1]:7000\r\n")
    assert "Proxy-Authorization" not in plain


@given(
    head=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r\n", b"")), max_size=6).map(
        lambda lines: b"\r\n".join([b"HTTP/1.1 200 OK", *lines]) + b"\r\n\r\n"
    ),
    tail=st.binary(max_size=40),
)
def test_reading_by_head_bytes_needed_stops_exactly_at_the_end_of_the_head(
    head: bytes, tail: bytes
) -> None:
    # The head's first CRLFCRLF ends it: what follows belongs to the tunnel and must stay unread.
    end = head.index(b"\r\n\r\n") + 4
    stream = head + tail
    read = bytearray()
    while needed := head_bytes_needed(read):
        assert len(read) + needed <= end
        read += stream[len(read) : len(read) + needed]
    assert bytes(read) == stream[:end]


def test_head_bytes_needed_counts_down_at_the_end() -> None:
    assert head_bytes_needed(b"") == 4
    assert head_bytes_needed(b"HTTP/1.1 200 OK") == 4
    assert head_bytes_needed(b"HTTP/1.1 200 OK\r") == 3
    assert head_bytes_needed(b"HTTP/1.1 200 OK\r\n") == 2
    assert head_bytes_needed(b"HTTP/1.1 200 OK\r\n\r") == 1
    assert head_bytes_needed(b"HTTP/1.1 200 OK\r\n\r\n") == 0
    assert MAX_RESPONSE_HEAD == 16 * 1024


def response(status_line: str, proxy: ProxyURL | None = None) -> tuple[int, str]:
    head = f"{status_line}\r\nServer: test\r\n\r\n".encode("latin-1")
    return parse_connect_response(head, proxy or ProxyURL("proxy", 3128), "edge", 7000)


def test_a_2xx_answer_opens_the_tunnel() -> None:
    assert response("HTTP/1.0 200 Connection established") == (
        200,
        "HTTP/1.0 200 Connection established",
    )
    assert response("HTTP/1.1 200")[0] == 200


def test_407_without_credentials_says_authentication_is_required() -> None:
    with pytest.raises(ProxyError) as caught:
        response("HTTP/1.0 407 Proxy Authentication Required")
    assert caught.value.status == 407
    assert str(caught.value).startswith(
        "proxy proxy:3128 requires authentication (HTTP/1.0 407 Proxy Authentication Required)"
    )


@pytest.mark.parametrize("line", ["HTTP/1.0 407 Proxy Authentication Required", "HTTP/1.0 401 X"])
def test_407_or_401_with_credentials_says_authentication_failed(line: str) -> None:
    proxy = parse_proxy_url("http://alice:s3cret@proxy:3128")
    with pytest.raises(ProxyError) as caught:
        response(line, proxy)
    text = str(caught.value)
    assert text.startswith(f"proxy authentication failed at proxy proxy:3128 ({line})")
    assert "s3cret" not in text and "alice" not in text


def test_a_refusal_names_the_proxy_the_edge_and_the_status_line() -> None:
    with pytest.raises(ProxyError) as caught:
        response("HTTP/1.1 403 Access violation")
    assert str(caught.value) == (
        "proxy proxy:3128 refused CONNECT to edge:7000: HTTP/1.1 403 Access violation"
    )
    assert caught.value.status == 403


def test_a_non_http_answer_is_an_error_with_a_printable_excerpt() -> None:
    with pytest.raises(ProxyError, match="did not answer CONNECT with HTTP") as caught:
        parse_connect_response(b"SSH-2.0-OpenSSH\x1b[31m\r\n\r\n", ProxyURL("p", 1), "e", 2)
    assert "\x1b" not in str(caught.value)
    long = "HTTP/1.1 502 " + "x" * 1000
    with pytest.raises(ProxyError) as caught:
        response(long)
    assert len(str(caught.value)) < 300


# -- open_tunnel against a scripted proxy ----------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@asynccontextmanager
async def scripted_proxy(
    answer: Callable[[bytes], list[bytes]],
) -> AsyncIterator[tuple[ProxyURL, list[bytes]]]:
    """A proxy on 127.0.0.1 that reads a request head, writes ``answer(head)`` (each item one
    write) and then closes; yields its URL and the heads it received."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            for piece in answer(head):
                writer.write(piece)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield ProxyURL("127.0.0.1", server.sockets[0].getsockname()[1], "alice", "s3cret"), heads
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.anyio
async def test_bytes_right_behind_the_answer_stay_in_the_socket_for_the_edge() -> None:
    # The edge's first bytes may arrive in the same segment as the 200: they are the tunnel's.
    answer = [b"HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\nEDGE-SPEAKS-FIRST"]
    async with scripted_proxy(lambda head: answer) as (proxy, heads):
        sock = await asyncio.wait_for(open_tunnel(proxy, "edge.example", 7000), 10)
        try:
            loop = asyncio.get_running_loop()
            received = b""
            while len(received) < len(b"EDGE-SPEAKS-FIRST"):
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 100), 10)
                assert chunk, "the proxy closed before the edge's bytes were read"
                received += chunk
        finally:
            sock.close()
    assert received == b"EDGE-SPEAKS-FIRST"
    (head,) = heads
    assert head.startswith(b"CONNECT edge.example:7000 HTTP/1.1\r\n")
    basic = base64.b64encode(b"alice:s3cret")
    assert b"\r\nProxy-Authorization: Basic " + basic + b"\r\n" in head


@pytest.mark.anyio
async def test_a_status_line_split_over_many_writes_is_read() -> None:
    line = b"HTTP/1.1 200 OK\r\n\r\n"
    async with scripted_proxy(lambda head: [line[i : i + 1] for i in range(len(line))]) as (
        proxy,
        _,
    ):
        sock = await asyncio.wait_for(open_tunnel(proxy, "edge.example", 7000), 10)
        sock.close()


@pytest.mark.anyio
async def test_a_response_head_over_16_kib_is_refused() -> None:
    huge = [b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * MAX_RESPONSE_HEAD + b"\r\n\r\n"]
    async with scripted_proxy(lambda head: huge) as (proxy, _):
        with pytest.raises(ProxyError, match="a head over 16 KiB"):
            await asyncio.wait_for(open_tunnel(proxy, "edge.example", 7000), 10)


@pytest.mark.anyio
async def test_a_proxy_that_hangs_up_before_answering_is_named() -> None:
    async with scripted_proxy(lambda head: [b"HTTP/1.1 20"]) as (proxy, _):
        with pytest.raises(ProxyError) as caught:
            await asyncio.wait_for(open_tunnel(proxy, "edge.example", 7000), 10)
    assert str(caught.value) == (
        f"proxy {proxy} closed the connection before answering CONNECT to edge.example:7000"
    )


@pytest.mark.anyio
async def test_a_non_2xx_answer_closes_the_socket_and_says_why() -> None:
    answer = [b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"]
    async with scripted_proxy(lambda head: answer) as (proxy, _):
        refused = re.escape("refused CONNECT to edge.example:7000: HTTP/1.1 502")
        with pytest.raises(ProxyError, match=refused):
            await asyncio.wait_for(open_tunnel(proxy, "edge.example", 7000), 10)


# -- tunnel-agent run --------------------------------------------------------------------------


@pytest.fixture
def started(
    fake_core: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> list[argparse.Namespace]:
    """The arguments ``run`` would start the agent with (it is not started); no proxy env."""
    monkeypatch.setenv("TUNNEL_AGENT_TOKEN", "t0ken")
    monkeypatch.delenv("TUNNEL_AGENT_SERVER", raising=False)
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return fake_core


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["run", "--sandbox-id", "sb1", *argv])
    return code, capsys.readouterr().err


def proxies(args: argparse.Namespace, env: dict[str, str] | None = None) -> list[str | None]:
    return [None if e.proxy is None else str(e.proxy) for e in agent_config(args, env).servers]


def test_run_picks_a_proxy_per_edge_from_the_environment(
    started: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://plain:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://alice:s3cret@secure:3129")
    monkeypatch.setenv("NO_PROXY", "near.example")
    server = "a.example:7000,wss://b.example:443,near.example:7000"
    assert main(["run", "--sandbox-id", "sb1", "--insecure-plaintext", "--server", server]) == 0
    (args,) = started
    config = agent_config(args)
    assert proxies(args) == ["plain:3128", "secure:3129", None]
    assert config.servers[1].proxy is not None
    assert config.servers[1].proxy.authorization == (
        "Basic " + base64.b64encode(b"alice:s3cret").decode()
    )
    reasons = [c.reason for c in proxy_choices(args)]
    assert reasons == ["from HTTP_PROXY", "from HTTPS_PROXY", "NO_PROXY matches near.example"]


def test_run_with_tls_uses_https_proxy_for_every_entry(
    started: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://plain:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://secure:3129")
    assert main(["run", "--sandbox-id", "sb1", "--tls", "--server", "a:7000,ws://b:7001"]) == 0
    assert proxies(started[0]) == ["secure:3129", "secure:3129"]


def test_run_proxy_flag_and_its_environment_variable(
    started: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://secure:3129")
    monkeypatch.setenv("TUNNEL_AGENT_PROXY", "http://from-env:1")
    base = ["run", "--sandbox-id", "sb1", "--tls", "--server", "a:7000"]
    assert main(base) == 0
    assert main([*base, "--proxy", "http://flag:2"]) == 0
    assert main([*base, "--proxy", ""]) == 0
    assert main([*base, "--no-proxy"]) == 0
    assert [proxies(args) for args in started] == [["from-env:1"], ["flag:2"], [None], [None]]


def test_run_refuses_proxy_with_no_proxy(
    started: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, "--server", "127.0.0.1:7000", "--proxy", "http://p:1", "--no-proxy")
    assert code == 2
    assert "not allowed with argument" in err
    assert started == []


@pytest.mark.parametrize("where", ["flag", "env"])
def test_run_refuses_an_unusable_proxy_url_without_echoing_credentials(
    where: str,
    started: list[argparse.Namespace],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "https://alice:s3cret@proxy:3128"
    if where == "env":
        monkeypatch.setenv("HTTP_PROXY", url)
        code, err = run(capsys, "--server", "127.0.0.1:7000")
        assert "HTTP_PROXY: 'https://***@proxy:3128'" in err
    else:
        code, err = run(capsys, "--server", "127.0.0.1:7000", "--proxy", url)
        assert "--proxy: 'https://***@proxy:3128'" in err
    assert code == 2
    assert "https:// proxies (TLS to the proxy itself) are not supported" in err
    assert "s3cret" not in err and "alice" not in err
    assert started == []


def test_run_help_explains_the_proxy_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--proxy URL", "--no-proxy", "HTTPS_PROXY", "NO_PROXY", "loopback is not"):
        assert text in out, text
