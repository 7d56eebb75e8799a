"""The numbers of docs/agent.md (the in-sandbox agent: install, zipapp, CLI, local API, port
watch, reconnects, proxy egress, limits, descriptors), each read from the code: a doc phrase and
the constant it states are asserted together, so changing either alone fails here. The behaviour
around them is checked by the tests the doc names next to each claim, and, for the claims that
name none, by the tests of CITED below (checked to exist)."""

from __future__ import annotations

import inspect
import re
import resource
from pathlib import Path

import pytest

from agent import cli, core, entry, local_api, portwatch, proxy
from agent.errors import STATUS_BY_CODE
from protocol import frames, hostnames
from protocol.session import SessionConfig
from relay import accept, budget
from tests.agent.test_local_api import FakeController
from tests.test_doc_claims_readme import check_cited, check_links
from tunneld import store as tunneld_store
from tunneld.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOC = " ".join((ROOT / "docs" / "agent.md").read_text(encoding="utf-8").split())  # lines joined
KiB = 1024


def claim(phrase: str) -> None:
    """The doc still says ``phrase`` (whitespace-normalised, so line breaks do not matter)."""
    assert " ".join(phrase.split()) in DOC, f"docs/agent.md no longer says {phrase!r}"


def test_every_link_of_agent_md_resolves() -> None:
    assert check_links(ROOT / "docs" / "agent.md") >= 3


def test_every_file_and_test_the_doc_names_exists() -> None:
    """Each `tests/...py::name` (or a following `::name`, of the file named last), and each file
    under tests/, bench/, tools/, deploy/ or packaging/ the doc names, is there; a `name_*` names
    at least one test."""
    text = (ROOT / "docs" / "agent.md").read_text(encoding="utf-8")
    last: Path | None = None
    seen = 0
    for path, name in re.findall(
        r"`((?:tests|bench|tools|deploy|packaging)/[\w/.-]+)?(::[\w*]+)?`", text
    ):
        if path:
            last = ROOT / path
            assert last.exists(), f"docs/agent.md names {path}, which is gone"
            seen += 1
        if name:
            assert last is not None and last.suffix == ".py", name
            source = last.read_text(encoding="utf-8")
            pattern = re.escape(f"def {name[2:]}").replace(r"\*", r"\w*") + r"\("
            assert re.search(pattern, source), f"{last.name}{name} is gone"
            seen += 1
    assert seen >= 30  # the scan sees the doc's references at all


def test_the_install_numbers() -> None:
    """The zipapp and the wheel: 'python3 >= 3.11', the wheel's file name (its version), the
    older python's message and exit 2, the shebang, what the pyz vendors."""
    claim("python3 >= 3.11, nothing installed")
    pyproject = (ROOT / "packaging" / "agent" / "pyproject.toml").read_text(encoding="utf-8")
    assert 'requires-python = ">=3.11"' in pyproject
    claim("`dist/tunnel_agent-0.1.0-py3-none-any.whl`")
    assert re.search(r'(?m)^version = "0\.1\.0"$', pyproject)
    assert 'tunnel-agent = "agent.entry:main"' in pyproject
    main = (ROOT / "packaging" / "agent" / "zipapp_main.py").read_text(encoding="utf-8")
    claim("`error: tunnel-agent.pyz needs Python >= 3.11; this is 3.10 (...)` and exit 2")
    assert "if sys.version_info < (3, 11):" in main
    assert 'f"error: tunnel-agent.pyz needs Python >= 3.11; this is {major}.{minor}"' in main
    assert "sys.exit(2)" in main
    from tools import build_agent

    claim("It starts with `#!/usr/bin/env python3`")
    assert build_agent.INTERPRETER == "/usr/bin/env python3"
    claim("It holds agent/, protocol/ and relay/ from the checkout, h11 and wsproto")
    assert build_agent.PACKAGES == ("agent", "protocol", "relay")
    assert build_agent.VENDORED == ("h11", "wsproto")


def test_the_run_defaults_and_ranges() -> None:
    """The flag table: the API's 127.0.0.1:3000, the sandbox id's '1-63 of [a-z0-9-]', the log
    levels, the --max-connections default and its examples."""
    claim("`127.0.0.1:3000` (Cloudflare's sandbox control-plane port")
    assert (local_api.DEFAULT_HOST, local_api.DEFAULT_PORT) == ("127.0.0.1", 3000)
    assert hostnames.CONTROL_PLANE_PORT == 3000
    claim("| (required) | 1\u201363 of `[a-z0-9-]`, no `-` at either end, not a reserved id")
    assert hostnames.MAX_SANDBOX_ID_LENGTH == 63
    assert hostnames.validate_sandbox_id("a" * 63) and hostnames.validate_sandbox_id("a-0")
    reserved = re.search(r"not a reserved id \(([^)]*)\); another is a usage error \(exit 2\)", DOC)
    assert reserved
    assert set(re.findall(r"`([a-z]+)`", reserved.group(1))) == hostnames.RESERVED_SANDBOX_IDS
    claim("| `info` | `debug`, `info`, `warning`, `error` (any case in the variable) |")
    assert cli.LOG_LEVELS == ("debug", "info", "warning", "error")
    claim("soft `RLIMIT_NOFILE` (raised at start) \u2212 160 (\u2265 \u00bc of it, \u2264 4096)")
    claim("minus 160 descriptors kept for the link")
    claim("at least a quarter of the limit and at most 4096 (1024 \u2192 864; 256 \u2192 96;")
    claim("unlimited \u2192 4096)")
    assert (core.FD_RESERVE, core.MAX_CONNECTIONS_CAP) == (160, 4096)
    assert core.default_max_connections(1024) == 864
    assert core.default_max_connections(256) == 96
    assert core.default_max_connections(resource.RLIM_INFINITY) == 4096
    claim("(`at most 3936 local connections at a time (file descriptor limit 4096)`")
    assert core.default_max_connections(4096) == 3936
    claim("`--max-connections` above the limit minus 160 is allowed, with a warning")


@pytest.mark.parametrize(
    "sandbox_id", ["a" * 64, "-abc", "abc-", "api", "Workers", "ab_c", "ab.c"], ids=repr
)
def test_a_sandbox_id_outside_the_rule_is_a_usage_error(
    sandbox_id: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flag table: an id outside '1-63 of [a-z0-9-], no - at either end, not a reserved id'
    is 'a usage error (exit 2)', before anything starts (no token is even looked for)."""
    monkeypatch.delenv("TUNNEL_AGENT_TOKEN", raising=False)  # were the id taken, no agent runs
    argv = ["run", "--server", "127.0.0.1:7000", f"--sandbox-id={sandbox_id}"]
    assert cli.main(argv) == cli.EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert "tunnel-agent run: error: argument --sandbox-id: " in err and "Traceback" not in err


def test_the_descriptor_limit_numbers() -> None:
    """'up to its session's stream limit (32768)'; the raise stops at the hard limit, 'not past
    65536 (16 times the default cap of 4096 ...: N + 160)'; the reserve covers the local API's
    64 connections and 64 port watches."""
    claim("up to its session's stream limit (32768) at once")
    assert frames.DEFAULT_MAX_STREAMS == 32768 == Config().max_streams
    assert SessionConfig().max_streams == 32768
    claim("not past 65536 (16 times the default cap of 4096;")
    assert core.FD_LIMIT_CEILING == 65536 == 16 * core.MAX_CONNECTIONS_CAP
    claim("needs it: N + 160)")
    assert core.fd_limit_target(256, 1 << 20) == 65536  # the ceiling, below the hard limit
    assert core.fd_limit_target(256, 1 << 20, 100_000) == 100_160  # N + 160 past it
    assert core.fd_limit_target(256, 4096) == 4096  # at most the hard limit
    assert core.fd_limit_target(8192, 4096) is None  # never lowered
    claim("the local API (its listener and 64 connections), port watches (64)")
    assert local_api.MAX_CONNECTIONS == 64 == portwatch.MAX_WATCHES
    claim("`accept failed: Too many open files; not accepting for 1 s`")
    assert accept.ACCEPT_RETRY_DELAY == 1.0
    assert "accept failed: %s; not accepting for %.0f s" in inspect.getsource(accept)


def test_the_reconnect_and_link_numbers() -> None:
    """Reconnects: '~0.1 s, doubling with jitter up to 20 s', 'a 10 s connect timeout' for the
    connect and again for the welcome, 'REPLACED ... waits 20-40 s'; the stalled close after
    'dead_timeout (15 s by default)'."""
    claim("first after ~0.1 s, doubling with jitter up to 20 s while connects fail")
    assert (core.BACKOFF_FIRST, core.BACKOFF_CAP) == (0.1, 20.0)
    run = inspect.getsource(core.Agent.run)
    assert "sleep = self._rng.uniform(delay / 2, delay)" in run  # the jitter: ~delay
    assert "delay = min(delay * 2, BACKOFF_CAP)" in run
    claim("and back to ~0.1 s after every successful welcome")
    assert run.count("delay = BACKOFF_FIRST") == 2  # at start, and after every welcome
    claim("is bounded by a 10 s connect timeout")
    claim("(one for the TCP/TLS connect, one for the welcome)")
    assert core.CONNECT_TIMEOUT == 10.0 == core.AgentConfig("h", 1, "s", "t").connect_timeout
    once = inspect.getsource(core.Agent.connect_once)
    assert "asyncio.wait_for(self._connect(target), config.connect_timeout)" in once
    assert "asyncio.shield(session.welcomed), config.connect_timeout" in once
    claim("(`GO_AWAY REPLACED`) it waits 20\u201340 s")
    assert "delay = BACKOFF_CAP * 2" in run  # uniform(delay / 2, delay): 20-40 s
    claim("gives the streams in flight up to 2 s to finish")
    stop = inspect.getsource(core.Agent.stop)
    assert "session.session.close(GoAwayCode.NORMAL)" in stop
    assert "await asyncio.wait_for(asyncio.shield(session.closed), 2.0)" in stop
    claim("once the session's `dead_timeout` (15 s by default) passes")
    assert frames.DEAD_TIMEOUT == 15.0 == SessionConfig().dead_timeout


def test_the_proxy_numbers() -> None:
    """'reads the answer head (at most 16 KiB, within the 10 s connect timeout'; 'the port
    defaults to 80'."""
    claim("reads the answer head (at most 16 KiB, within the 10 s connect timeout")
    assert 16 * KiB == proxy.MAX_RESPONSE_HEAD
    claim("the port defaults to 80")
    assert proxy._DEFAULT_PORT == 80
    assert proxy.parse_proxy_url("http://proxy.internal").port == 80
    claim("`--proxy URL` | `TUNNEL_AGENT_PROXY`")
    assert proxy.ENV_PROXY == cli.ENV_PROXY == "TUNNEL_AGENT_PROXY"


def test_the_dial_and_warning_numbers() -> None:
    """'ports outside 1024-65535, port 3000'; warnings 'a burst of 10, then one a second', with
    the agent's limiters at those defaults."""
    claim("ports outside 1024\u201365535, port 3000, its own local API port")
    assert (hostnames.MIN_PORT, hostnames.MAX_PORT) == (1024, 65535)
    claim("a warning in its log (a burst of 10, then one a second, the others counted in one")
    assert (budget.LOG_BURST, budget.LOG_RATE) == (10, 1.0)
    agent = core.Agent(core.AgentConfig("127.0.0.1", 7000, "sb1", "t"))
    for limiter in (agent.refused_streams, agent.busy_refusals, agent.refused_exposes):
        assert (limiter._budget._burst, limiter._budget._rate) == (10, 1.0)


def test_the_cli_numbers() -> None:
    """The client commands' default API URL and 10 s timeout (wait: its --timeout + 10), the
    path bound of `wait`, its defaults, and the exit codes table."""
    claim("env `TUNNEL_AGENT_API`, default `http://127.0.0.1:3000`")
    assert cli.ENV_API == "TUNNEL_AGENT_API" and cli.DEFAULT_API == "http://127.0.0.1:3000"
    claim("with a 10 s timeout to connect and for `status`'s answer;")
    assert cli.CLIENT_TIMEOUT == 10.0
    claim("`expose`, `unexpose` and `ports` wait 45 s for theirs, 10 s more than the agent waits")
    assert cli.EDGE_CLIENT_TIMEOUT == 45.0 == core.REQUEST_TIMEOUT + 10
    claim("`wait` waits its `--timeout` plus 10 s")
    claim("no answer within its timeout (10 s; 45 s for `expose`, `unexpose` and `ports`) exits 1")
    claim("absolute ASCII path without spaces of at most 2048 characters")
    assert cli.WAIT_MAX_PATH == portwatch.MAX_PATH_LENGTH == 2048
    claim("`--timeout` defaults to 30 s (at most 300), `--interval` to 0.5 s")
    assert cli.WAIT_MAX_SECONDS == portwatch.MAX_WATCH_SECONDS == 300.0
    claim("default `200-399`")
    assert (portwatch.DEFAULT_STATUS_MIN, portwatch.DEFAULT_STATUS_MAX) == (200, 399)
    for code, name in ((0, "ok"), (1, "the agent refused or failed the request")):
        claim(f"| {code} | {name} |")
    assert (cli.EXIT_OK, cli.EXIT_API_ERROR, cli.EXIT_USAGE, cli.EXIT_UNREACHABLE) == (0, 1, 2, 3)
    claim("| 2 | usage error |")
    claim("| 3 | nothing answers at the API address |")
    claim("| 130 | interrupted (Ctrl-C, SIGINT)")
    assert entry.EXIT_INTERRUPTED == 130


def test_the_local_api_numbers() -> None:
    """The error table's bounds (token 1-16 of [a-z0-9_], name at most 256, a DNS label of 63 and
    a host of 253: a sandbox id over 40 with a 5-digit port and a generated token), the edge's
    defaults the table quotes (128 exposures, 100000 sandboxes, 20/s bursts of 100), the 64
    watches and connections, 64 KiB / 16 KiB, 10 s."""
    claim("token not 1\u201316 of `[a-z0-9_]`")
    assert hostnames.MAX_CUSTOM_TOKEN_LENGTH == 16
    assert hostnames.TOKEN_ALPHABET == "abcdefghijklmnopqrstuvwxyz0123456789_"
    claim("name not a string of at most 256 characters")
    assert hostnames.MAX_PORT_NAME_LENGTH == 256
    claim("(`{port}-{id}-{token}` over 63 characters: a sandbox id over 40 with a 5-digit port")
    claim("and a generated token; or the host over 253)")
    assert (hostnames.MAX_LABEL_LENGTH, hostnames.MAX_HOST_LENGTH) == (63, 253)
    assert 5 + 1 + 40 + 1 + hostnames.TOKEN_LENGTH == 63  # 41 characters would not fit
    claim("`max_exposures_per_sandbox` ports (128)")
    assert Config().max_exposures_per_sandbox == 128
    claim("`max_sandboxes` sandboxes (100000)")
    assert Config().max_sandboxes == 100_000
    claim("`control_rate` (20/s, bursts of 100)")
    assert (Config().control_rate, Config().control_burst) == (20.0, 100)
    claim("| `TOO_MANY_WATCHES` | 429 | 64 [port watches]")
    assert portwatch.MAX_WATCHES == 64 and STATUS_BY_CODE["TOO_MANY_WATCHES"] == 429
    claim("| `TOO_MANY_CONNECTIONS` | 503 | more than 64 concurrent clients |")
    assert local_api.MAX_CONNECTIONS == 64
    claim("| `BODY_TOO_LARGE` | 413 | body over 64 KiB |")
    claim("| `HEADERS_TOO_LARGE` | 431 | request head over 16 KiB |")
    claim("Head \u2264 16 KiB (431, also when it arrives complete), body \u2264 64 KiB (413,")
    api = local_api.LocalAPI(FakeController(), port=0)
    limits = api.http.limits
    assert (limits.max_head_bytes, limits.max_body_bytes) == (16 * KiB, 64 * KiB)
    claim(
        "| `EDGE_TIMEOUT` | 504 | the edge did not answer within 35 s (longer than the edge's own"
    )
    claim("30 s bound on a store write")
    assert core.REQUEST_TIMEOUT == 35.0
    assert tunneld_store.WRITE_TIMEOUT == 30.0
    claim(
        "| `REQUEST_TIMEOUT` | 408 | the request was not received within 10 s of its first byte |"
    )
    claim("an idle keep-alive connection is simply closed after 10 s")
    assert local_api.REQUEST_TIMEOUT == 10.0
    assert (limits.request_timeout, limits.idle_timeout) == (10.0, 10.0)
    claim("half-closes and drains for up to 1 s")
    assert limits.linger_seconds == 1.0


def test_the_port_watch_numbers() -> None:
    """'Waiting for a port': the defaults and bounds of the field table, the 5 s probe."""
    claim("| `interval` | 500 | milliseconds between probes, clamped to 100-10,000")
    assert (portwatch.DEFAULT_INTERVAL_MS, portwatch.MIN_INTERVAL_MS) == (500, 100)
    assert portwatch.MAX_INTERVAL_MS == 10_000
    claim("| `timeout` | 300,000 | milliseconds, at most 300,000")
    claim("the whole watch ends after `timeout`** (default and maximum 5 min)")
    assert portwatch.MAX_WATCH_SECONDS * 1000 == 300_000
    assert portwatch.spec_from_json({"port": 8000}).timeout == 300.0
    claim("| `statusMin`, `statusMax` | 200, 399 |")
    claim("with a 5 s timeout (Cloudflare's)")
    assert portwatch.PROBE_TIMEOUT == 5.0
    claim("at most 64 watches run at once per agent")
    assert portwatch.PortWatches().limit == portwatch.MAX_WATCHES == 64
    claim("`Host: localhost:PORT`")
    assert "Host: localhost:" in inspect.getsource(portwatch)


def test_the_embedding_signatures_are_the_codes() -> None:
    """'Embedding': ``start_local_api(controller, host=..., port=...)``, ``agent.serve_local_api(
    host, port)`` and the ExposureController's methods, as the code declares them. The doc had
    ``expose(port, name=None, token=None)``: a controller written to it failed every
    ``POST /v1/ports`` (the API passes ``options=``) with a 500."""
    claim("api = await start_local_api(controller, host=args.api_host, port=args.api_port)")
    assert list(inspect.signature(local_api.start_local_api).parameters)[:3] == [
        "controller",
        "host",
        "port",
    ]
    claim("`await agent.serve_local_api(host, port)`")
    assert list(inspect.signature(core.Agent.serve_local_api).parameters)[1:3] == ["host", "port"]
    claim(
        "`async expose(port, name=None, token=None, options=DEFAULT_OPTIONS) ->"
        " protocol.control.Exposure` (`options`: a `protocol.hostnames.ExposureOptions`"
    )
    controller = local_api.ExposureController
    expose = inspect.signature(controller.expose).parameters
    assert [(p.name, p.default) for p in list(expose.values())[1:]] == [
        ("port", inspect.Parameter.empty),
        ("name", None),
        ("token", None),
        ("options", hostnames.DEFAULT_OPTIONS),
    ]
    assert hostnames.ExposureOptions() == hostnames.DEFAULT_OPTIONS
    assert "options=options" in inspect.getsource(local_api.LocalAPI._expose)
    claim("`async unexpose(port)`, `async list_exposures() -> list[Exposure]`")
    assert list(inspect.signature(controller.unexpose).parameters) == ["self", "port"]
    assert list(inspect.signature(controller.list_exposures).parameters) == ["self"]
    for name in ("expose", "unexpose", "list_exposures"):
        assert inspect.iscoroutinefunction(getattr(controller, name)), name
        assert inspect.iscoroutinefunction(getattr(core.Agent, name)), name


# The tests that check each behaviour claim the doc does not cite in place: (the doc's phrase,
# the tests). test_each_cited_test_exists keeps this list true when a test is renamed or moved.
CITED: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "The build refuses to vendor a distribution with compiled files, or one that needs a"
        " distribution not vendored.",
        (
            "tests/agent/test_agent_doc_build.py::test_the_build_refuses_a_distribution_with_compiled_files",
            "tests/agent/test_agent_doc_build.py::"
            "test_the_build_refuses_a_distribution_that_needs_one_not_vendored",
        ),
    ),
    (
        "The pyz uses them when the python that runs it can import them",
        (
            "tests/agent/test_packaging.py::"
            "test_isolated_python_sees_no_installed_package_and_main_uses_the_fallback",
        ),
    ),
    (
        "The pyz is about 165 KiB (169,328 bytes",
        ("tests/agent/test_packaging.py::test_the_pyz_size_in_the_agent_docs_is_the_built_ones",),
    ),
    (
        "`tunnel-agent.pyz` (`make agent`: `dist/tunnel-agent.pyz`)",
        (
            "tests/agent/test_packaging.py::test_pyz_holds_the_agent_and_pure_python_dependencies_only",
            "tests/agent/test_packaging.py::test_pyz_agent_serves_a_preview_request",
        ),
    ),
    (
        "A python3 older than 3.11 gets",
        ("tests/agent/test_packaging.py::test_an_older_python_is_told_why",),
    ),
    (
        "`deploy/sandbox-image/Dockerfile` copies the pyz to",
        (
            "tests/agent/test_sandbox_image.py",
            "tests/agent/test_packaging.py::test_sandbox_image_entrypoint_starts_the_pyz_agent_over_tls",
        ),
    ),
    (
        "A missing `--server` or `--sandbox-id`, a missing or empty token, a `--token-file` that"
        " is not UTF-8 text",
        (
            "tests/agent/test_cli.py::test_run_usage_errors",
            "tests/agent/test_cli_ux.py::test_a_token_file_that_is_not_text_is_a_usage_error",
        ),
    ),
    (
        "`0` picks a free port (written to `TUNNEL_AGENT_PORTS_FILE`)",
        (
            "tests/agent/test_agent_doc_local_api.py::test_the_api_port_0_is_a_free_port_in_the_ports_file",
        ),
    ),
    (
        "A local API address it cannot listen on (`--api-port` in use, an `--api-host` that is not"
        " an address of the machine) is one error line and exit 1",
        (
            "tests/agent/test_agent_doc_run.py::"
            "test_a_local_api_address_it_cannot_listen_on_is_one_error_line_and_exit_1",
        ),
    ),
    (
        "cuts the rest (their clients get 503 `SANDBOX_NOT_CONNECTED`), closes the local API and"
        " exits 0",
        (
            "tests/agent/test_agent_doc_run.py::"
            "test_a_signal_stops_the_agent_after_its_request_in_flight_and_it_exits_0",
            "tests/agent/test_agent_doc_run.py::"
            "test_a_request_that_outlasts_the_drain_is_cut_and_the_agent_exits_0",
        ),
    ),
    (
        "The agent reconnects after any loss",
        (
            "tests/e2e/test_processes.py::test_agent_reconnects_after_edge_restart",
            "tests/faults/test_agent_flapping_link.py::"
            "test_agent_reconnects_within_2s_of_each_drop_and_requests_mostly_succeed",
        ),
    ),
    (
        "doubling with jitter up to 20 s while connects fail",
        (
            "tests/faults/test_agent_failover.py::"
            "test_edge_down_then_back_retries_in_order_with_backoff_bounded_by_the_cap",
        ),
    ),
    (
        "each attempt (the TCP/TLS connect, then the welcome) is bounded by a 10 s connect timeout",
        (
            "tests/faults/test_agent_failover.py::test_silent_address_costs_at_most_the_connect_timeout",
        ),
    ),
    (
        "Each other failed connect and session end is one warning line with its reason",
        (
            "tests/faults/test_agent_session_end_log.py::test_tls_failure_logs_the_ssl_reason",
            "tests/faults/test_agent_session_end_log.py::test_link_lost_logs_the_connection_error",
            "tests/faults/test_agent_session_end_log.py::test_edge_going_away_logs_the_go_away_code",
            "tests/faults/test_agent_session_end_log.py::test_dead_link_logs_the_timeout",
            "tests/faults/test_agent_session_end_log.py::test_refused_token_logs_the_refusal",
        ),
    ),
    (
        "Every entry is checked before the agent starts: a malformed, empty or repeated entry",
        (
            "tests/agent/test_failover_config.py::test_every_entry_is_validated_and_the_bad_one_named",
            "tests/agent/test_failover_config.py::test_the_cli_names_the_plaintext_entry_and_does_not_start",
        ),
    ),
    (
        "Each host is looked up again at every connect round (DNS may change)",
        (
            "tests/faults/test_agent_failover.py::"
            "test_a_name_with_several_addresses_tries_them_in_order_and_is_resolved_each_round",
        ),
    ),
    (
        "A failed connect or handshake moves on to the next address at once",
        (
            "tests/faults/test_agent_failover.py::"
            "test_refusing_first_address_fails_over_to_the_second_without_backoff",
        ),
    ),
    (
        "A session that ends after a welcome starts the next round with the same edge",
        (
            "tests/faults/test_agent_failover.py::test_a_lost_session_retries_the_same_edge_first",
            "tests/faults/test_agent_failover_order.py::test_a_draining_edge_is_tried_last_and_a_lost_one_first",
        ),
    ),
    (
        "After `GO_AWAY SHUTTING_DOWN` (that edge is draining) the round starts with the next"
        " address and tries the draining one last.",
        (
            "tests/faults/test_agent_failover.py::test_go_away_from_the_edge_moves_the_agent_to_the_next_edge",
            "tests/faults/test_agent_failover_order.py::test_a_draining_edge_is_tried_last_and_a_lost_one_first",
        ),
    ),
    (
        "Exposures are whatever the edge the agent lands on knows (its welcome brings them)",
        (
            "tests/faults/test_agent_preview_exposures.py::"
            "test_exposures_follow_welcome_expose_unexpose_and_list",
            "tests/e2e/test_admin.py::test_expose_offline_then_agent_gets_it_in_welcome",
        ),
    ),
    (
        "`run --token …` is refused with an explanation",
        ("tests/e2e/test_processes.py::test_agent_refuses_token_in_argv",),
    ),
    (
        "`--proxy` and `--no-proxy` together are a usage error",
        ("tests/agent/test_proxy_config.py::test_run_refuses_proxy_with_no_proxy",),
    ),
    (
        "the lowercase name wins when both are set, and an empty value counts as unset",
        (
            "tests/agent/test_proxy_config.py::"
            "test_lowercase_wins_over_uppercase_and_empty_values_are_unset",
        ),
    ),
    (
        "a variable that no edge uses is not read",
        ("tests/agent/test_proxy_config.py::test_a_variable_that_is_not_chosen_is_not_parsed",),
    ),
    (
        "**Failures** count as a failed attempt of that address",
        (
            "tests/faults/test_agent_proxy.py::test_an_unreachable_proxy_fails_over_to_the_next_edge",
            "tests/faults/test_agent_proxy_timeout.py::"
            "test_an_unfinished_connect_answer_is_one_timed_out_attempt_then_the_next_edge",
        ),
    ),
    (
        "**preview streams to a port that is not exposed**",
        (
            "tests/faults/test_agent_preview_exposures.py::"
            "test_preview_stream_to_an_unexposed_port_is_reset_and_logged",
        ),
    ),
    (
        "Direct streams (admin `connect`, authorised by the admin token at the edge) may reach any"
        " port the agent would dial.",
        (
            "tests/faults/test_agent_preview_exposures.py::"
            "test_direct_streams_stay_allowed_for_any_valid_port",
        ),
    ),
    (
        "the agent connects it to `127.0.0.1:PORT` (then `[::1]:PORT`)",
        (
            "tests/faults/test_agent_dials_ipv6_loopback.py::"
            "test_a_preview_stream_reaches_a_service_on_ipv6_loopback_only",
        ),
    ),
    (
        "resets a stream past the cap with `REFUSED_STREAM` **before dialling**",
        (
            "tests/faults/test_agent_fd_limit.py::"
            "test_the_limit_counts_dials_and_open_connections_and_frees_a_slot_as_each_ends",
            "tests/faults/test_agent_fd_limit.py::test_a_public_request_past_the_cap_gets_503_sandbox_busy",
        ),
    ),
    (
        "a limit it cannot raise is one info line, never a failed start",
        (
            "tests/faults/test_agent_fd_raise.py::"
            "test_a_limit_that_cannot_be_raised_is_one_info_line_not_a_failure",
        ),
    ),
    (
        '| `POST /v1/ports` `{"port":8000,"name":"api","token":"t"}` (name, token optional)',
        (
            "tests/agent/test_local_api.py::test_expose_list_unexpose_roundtrip",
            "tests/e2e/test_admin.py::test_agent_local_api_and_admin_agree",
        ),
    ),
    (
        "Exposing again is idempotent (same token, same URL) unless a different `token` is given.",
        (
            "tests/agent/test_agent_doc_local_api.py::"
            "test_exposing_again_keeps_the_url_unless_another_token_is_given",
        ),
    ),
    (
        "| `DELETE /v1/ports/{port}` | 204 (idempotent) |",
        (
            "tests/agent/test_agent_doc_local_api.py::"
            "test_unexposing_is_idempotent_and_the_list_is_sorted_by_port",
        ),
    ),
    (
        '| `GET /v1/status` | 200 `{"sandboxId":"abc123","connected":true}` |',
        (
            "tests/agent/test_agent_doc_local_api.py::"
            "test_without_the_edge_status_says_so_and_changes_are_503_edge_not_connected",
        ),
    ),
    (
        "| `EDGE_NOT_CONNECTED` | 503 | the agent has no connection to the edge right now |",
        (
            "tests/agent/test_agent_doc_local_api.py::"
            "test_without_the_edge_status_says_so_and_changes_are_503_edge_not_connected",
        ),
    ),
    (
        "| `EDGE_TIMEOUT` | 504 | the edge did not answer within 35 s",
        (
            "tests/faults/test_agent_edge_timeout.py::"
            "test_an_edge_that_never_answers_is_504_edge_timeout_and_leaves_nothing",
        ),
    ),
    (
        "| `INTERNAL_ERROR` | 500 | a bug in the agent (logged; no traceback is sent) |",
        ("tests/agent/test_local_api.py::test_unexpected_exception_is_500_without_traceback",),
    ),
    (
        "| `METHOD_NOT_ALLOWED` | 405 | with an `Allow` header |",
        ("tests/agent/test_local_api.py::test_wrong_method_is_405_with_allow",),
    ),
    (
        "HTTP/1.1 with keep-alive and pipelining",
        (
            "tests/agent/test_local_api.py::test_keep_alive_reuses_one_connection",
            "tests/agent/test_local_api.py::test_pipelined_requests_on_one_socket",
        ),
    ),
    (
        "checked against `Content-Length` before reading and before `100 Continue` is sent",
        (
            "tests/agent/test_local_api.py::test_expect_100_continue",
            "tests/agent/test_local_api.py::test_oversized_body_is_413",
        ),
    ),
    (
        "(408; an idle keep-alive connection is simply closed after 10 s)",
        ("tests/agent/test_local_api.py::test_slow_request_is_408_and_idle_keepalive_closes",),
    ),
    (
        "at most 64 connections (503 `TOO_MANY_CONNECTIONS`;",
        ("tests/agent/test_local_api.py::test_connection_limit",),
    ),
    (
        "`statusCode` is the last HTTP status the probe got, when it got one.",
        (
            "tests/agent/test_port_watch.py::test_timeout_ends_with_an_error_carrying_the_last_status",
            "tests/agent/test_port_watch.py::test_http_watch_waits_for_a_status_in_range",
        ),
    ),
    (
        "The answer is `200 text/event-stream` (`Cache-Control: no-cache`)",
        (
            "tests/agent/test_port_watch.py::"
            "test_tcp_watch_reports_watching_then_ready_once_the_port_listens",
        ),
    ),
    (
        "Bad input is refused before the stream starts, in the legacy error shape",
        (
            "tests/agent/test_port_watch.py::test_bad_input_is_400_json",
            "tests/agent/test_port_watch.py::test_bad_json_and_own_port_are_refused",
        ),
    ),
    (
        "a client that closes (or half-closes) its connection stops its watch",
        (
            "tests/agent/test_port_watch.py::test_client_disconnect_stops_the_watch",
            "tests/agent/test_port_watch_bounds.py::test_a_client_that_half_closes_stops_its_watch",
        ),
    ),
    (
        "so is a field not in the table above (`Unknown field(s): statusmax.`)",
        (
            "tests/agent/test_agent_doc_local_api.py::"
            "test_a_port_watch_field_not_in_the_table_is_refused_before_the_stream",
        ),
    ),
    (
        "an `http` probe sends `GET path` with `Host: localhost:PORT` and reads only the status"
        " line",
        (
            "tests/agent/test_agent_doc_local_api.py::"
            "test_a_port_watch_probe_is_get_path_with_host_localhost_and_reads_the_status_line_only",
        ),
    ),
    (
        "1. `--proxy URL`, else `TUNNEL_AGENT_PROXY`, if set, is used for every edge;",
        (
            "tests/agent/test_proxy_config.py::test_explicit_proxy_wins_over_every_variable",
            "tests/agent/test_proxy_config.py::test_run_proxy_flag_and_its_environment_variable",
        ),
    ),
    (
        "`http_proxy` / `HTTP_PROXY` for a plain TCP or `ws://` one (the other variable is never a"
        " fallback), then `all_proxy` / `ALL_PROXY`;",
        (
            "tests/agent/test_proxy_config.py::test_plain_links_use_http_proxy_and_tls_links_https_proxy",
            "tests/agent/test_proxy_config.py::test_all_proxy_is_the_fallback_for_both_schemes",
        ),
    ),
    (
        "the chosen proxy is skipped, and the edge dialled directly, when the entry's host matches",
        (
            "tests/agent/test_proxy_config.py::test_no_proxy_matching",
            "tests/agent/test_proxy_config.py::test_no_proxy_applies_to_an_explicit_proxy_too",
            "tests/faults/test_agent_proxy.py::test_no_proxy_sends_the_agent_straight_to_the_edge",
        ),
    ),
    (
        "`https://` proxies (TLS to the proxy itself) and `socks5://` are not supported: the agent"
        " exits 2 naming the variable or flag.",
        (
            "tests/agent/test_proxy_config.py::"
            "test_bad_proxy_urls_are_refused_without_showing_credentials",
            "tests/agent/test_proxy_credentials_warning.py::"
            "test_an_unusable_proxy_from_the_environment_is_named_by_its_variable",
        ),
    ),
    (
        "On a 2xx the socket carries exactly what a direct one would",
        (
            "tests/agent/test_proxy_config.py::"
            "test_bytes_right_behind_the_answer_stay_in_the_socket_for_the_edge",
            "tests/faults/test_agent_proxy.py::"
            "test_the_agent_reaches_the_edge_through_the_proxy_and_serves_a_preview",
        ),
    ),
    (
        "accepted and ignored: the agent does not start processes",
        ("tests/agent/test_port_watch.py::test_process_id_is_accepted_and_ignored",),
    ),
    (
        "(or `connection refused`, `timed out`, `not an HTTP response`)",
        (
            "tests/agent/test_port_watch.py::test_nobody_listening_times_out_with_the_connect_error",
            "tests/agent/test_port_watch.py::test_a_silent_service_times_out_within_the_watch",
            "tests/agent/test_port_watch.py::test_a_service_that_is_not_http_is_not_ready",
        ),
    ),
    (
        "`timestamp` is ISO 8601 UTC, as JavaScript's `toISOString()`",
        ("tests/agent/test_local_api.py::test_legacy_timestamps_are_iso_utc",),
    ),
    (
        "`INVALID_PORT` is reported as `INVALID_PORT_NUMBER` (the old container's code) by these"
        " three endpoints only",
        ("tests/agent/test_local_api.py::test_legacy_invalid_port",),
    ),
    (
        "unexposing an unknown port succeeds (as Cloudflare ≥ 0.8.13 does)",
        (
            "tests/agent/test_agent_doc_local_api.py::"
            "test_unexposing_is_idempotent_and_the_list_is_sorted_by_port",
        ),
    ),
    (
        "Requests carrying an `Origin` header are refused",
        (
            "tests/agent/test_local_api.py::test_browser_requests_are_refused",
            "tests/agent/test_port_watch.py::test_browser_requests_are_refused",
        ),
    ),
    (
        "it listens on `127.0.0.1` only, by default;",
        (
            "tests/agent/test_agent_doc_local_api.py::test_the_api_port_0_is_a_free_port_in_the_ports_file",
        ),
    ),
    (
        "They talk to `--api URL` (env `TUNNEL_AGENT_API`",
        (
            "tests/agent/test_cli.py::test_api_from_env",
            "tests/agent/test_cli.py::test_client_commands_do_not_load_the_core",
        ),
    ),
    (
        "$ tunnel-agent ports PORT NAME URL",
        ("tests/agent/test_cli.py::test_ports_table_and_json",),
    ),
    (
        "$ tunnel-agent status sandbox abc123 edge connected",
        ("tests/agent/test_cli.py::test_status",),
    ),
)


def test_each_cited_test_exists() -> None:
    """Every phrase of CITED is in the doc, and every test it names is defined in its file."""
    check_cited(CITED, claim)
