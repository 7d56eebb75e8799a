"""docs/operations.md, "Running tunneld": "Configuration errors include a timeout that is
negative, `nan` or `inf` ..." and "`tunneld serve` exits with 2 and one line on stderr for a
configuration error". The settings the tables give as seconds or as a rate per second, checked
for the values a float setting can take that are no number of seconds nor a rate.

Found by these tests: ``nan`` passed the old ``<= 0`` checks of ``keepalive_timeout`` and of the
four rates, and ``inf`` passed them too. A ``nan`` rate refills its token bucket whole at every
take (``min(burst, nan)`` is ``burst``), so ``miss_rate = nan`` switched the token-guessing
limit off without a word (``test_a_nan_miss_rate_would_have_switched_the_404_budget_off``); a
``nan`` or ``inf`` ``keepalive_timeout`` never closes an idle connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunneld.config import ConfigError, load_config
from tunneld.public import PublicLimits

ROOT = Path(__file__).resolve().parent.parent.parent
SECRETS = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "b"}

# (setting, a value no operator means); the rates and keepalive_timeout, as nan and inf
BAD = [
    (key, value)
    for key in ("keepalive_timeout", "control_rate", "miss_rate", "stream_rate", "admin_rate")
    for value in ("nan", "inf", "-inf")
]


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_a_non_finite_rate_or_keepalive_timeout_is_a_configuration_error(
    key: str, value: str, tmp_path: Path
) -> None:
    """From the environment and from the TOML file (where ``nan`` and ``inf`` are floats)."""
    with pytest.raises(ConfigError, match=f"^{key} must be "):
        load_config(None, environ={**SECRETS, f"TUNNELD_{key.upper()}": value})
    toml = tmp_path / "t.toml"
    toml.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError, match=f"{key} must be "):
        load_config(str(toml), environ=SECRETS)


@pytest.mark.parametrize("key", ["keepalive_timeout", "miss_rate", "control_rate"])
def test_finite_values_are_still_taken(key: str) -> None:
    config = load_config(None, environ={**SECRETS, f"TUNNELD_{key.upper()}": "0.5"})
    assert getattr(config, key) == 0.5


def test_a_nan_miss_rate_would_have_switched_the_404_budget_off() -> None:
    """Why nan must be refused: a budget of 2 with a nan rate never runs out."""
    limits = PublicLimits()
    taken = [limits.allow_miss("198.51.100.7", 0.0, float("nan"), 2) for _ in range(10)]
    assert all(taken)  # this is what the configuration check now keeps out


def test_tunneld_serve_exits_2_with_one_line_for_a_nan_rate() -> None:
    """A real ``python -m tunneld serve`` (the tree under test: ``-m`` with this cwd)."""
    out = _tunneld("serve", TUNNELD_MISS_RATE="nan", **SECRETS)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr == (
        "tunneld: configuration error: miss_rate must be > 0 and finite and miss_burst at "
        "least 1, not nan and 50\n"
    )


def _tunneld(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """``python -m tunneld ARGS`` of the tree under test, with only ``environ`` of TUNNELD_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    env.update(environ)
    if args[0] == "serve":  # should it start after all: on ports of its own, nothing kept
        args = (*args, "--store", "memory", "--public-port", "0", "--agent-port", "0")
        args = (*args, "--admin-port", "0")
    try:
        return subprocess.run(
            [sys.executable, "-m", "tunneld", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=30,  # run() kills it then
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"tunneld {' '.join(args)} did not exit") from None


def test_the_config_file_is_dash_c_else_tunneld_config(tmp_path: Path) -> None:
    """ "The config file is `--config/-c FILE` or `$TUNNELD_CONFIG`": each is read (its
    mistake is the one reported), and `-c` wins when both are given. A file that would start
    tunneld is never needed: each file holds an unknown key, which stops the start (exit 2)."""
    from_env, from_flag = tmp_path / "env.toml", tmp_path / "flag.toml"
    from_env.write_text("in_the_env_file = 1\n")
    from_flag.write_text("in_the_flag_file = 1\n")
    out = _tunneld("serve", TUNNELD_CONFIG=str(from_env), **SECRETS)
    assert out.returncode == 2, out.stderr
    assert f"config file {from_env}: unknown setting 'in_the_env_file'" in out.stderr
    out = _tunneld("serve", "-c", str(from_flag), TUNNELD_CONFIG=str(from_env), **SECRETS)
    assert out.returncode == 2, out.stderr
    assert f"config file {from_flag}: unknown setting 'in_the_flag_file'" in out.stderr
    assert "in_the_env_file" not in out.stderr


def test_tunneld_token_reads_secret_file_from_the_config(tmp_path: Path) -> None:
    """`tunneld token sb3 -c /etc/tunneld/tunneld.toml  # reads secret_file from the config`,
    and from `$TUNNELD_CONFIG` alike: the token printed is the one the edge accepts."""
    from tunneld.auth import agent_token

    (tmp_path / "secret").write_text("s3cret-from-file\n")
    toml = tmp_path / "tunneld.toml"
    toml.write_text(f'secret_file = "{tmp_path / "secret"}"\n')
    expected = agent_token("s3cret-from-file", "sb3") + "\n"
    out = _tunneld("token", "sb3", "-c", str(toml))
    assert (out.returncode, out.stdout) == (0, expected), out.stderr
    out = _tunneld("token", "sb3", TUNNELD_CONFIG=str(toml))
    assert (out.returncode, out.stdout) == (0, expected), out.stderr


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_streams", "0", "max_streams must be at least 1, not 0"),
        ("max_streams", "-1", "max_streams must be at least 1, not -1"),
        ("log_level", "bogus", "log_level must be debug, info, warning or error, not 'bogus'"),
        ("log_level", "verbose", "log_level must be debug, info, warning or error, not 'verbose'"),
    ],
)
def test_max_streams_below_1_and_an_unknown_log_level_are_configuration_errors(
    key: str, value: str, message: str
) -> None:
    """`max_streams` (concurrent connections per agent session) of 0 or less started, and
    then failed every agent's session as it connected (the protocol's SessionConfig refuses it:
    no agent could ever connect); a `log_level` other than the four the table names was taken
    as `info` without a word."""
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={**SECRETS, f"TUNNELD_{key.upper()}": value})
    assert str(info.value) == message
    for good in ("1", "32768") if key == "max_streams" else ("debug", "WARNING", "error"):
        load_config(None, environ={**SECRETS, f"TUNNELD_{key.upper()}": good})


def test_tunneld_serve_exits_2_for_max_streams_0() -> None:
    out = _tunneld("serve", TUNNELD_MAX_STREAMS="0", **SECRETS)
    assert (out.returncode, out.stderr) == (
        2,
        "tunneld: configuration error: max_streams must be at least 1, not 0\n",
    )


BAD_DOMAINS = [
    "example.com:8080",
    "https://preview.example.com",
    "a b",
    "a..b",
    "-bad.com",
    "é.com",
]


@pytest.mark.parametrize("domain", BAD_DOMAINS)
def test_a_domain_that_is_no_dns_name_is_a_configuration_error(domain: str) -> None:
    """`domain`: "preview domain: hosts are `{port}-{id}-{token}.{domain}`". A value with a port
    or a scheme started and made every expose 400 INVALID_DOMAIN (the orchestrator blamed for the
    operator's setting); one with a space printed URLs no client can use."""
    with pytest.raises(ConfigError, match=r"^invalid domain .*: a DNS name is labels of"):
        load_config(None, environ={**SECRETS, "TUNNELD_DOMAIN": domain})


@pytest.mark.parametrize(
    "domain", ["localhost", "preview.test", "Preview.Example.com.", "xn--bcher-kva.example"]
)
def test_a_dns_name_is_a_domain(domain: str) -> None:
    assert load_config(None, environ={**SECRETS, "TUNNELD_DOMAIN": domain}).domain == domain


def test_tunneld_serve_exits_2_for_a_domain_with_a_port() -> None:
    out = _tunneld("serve", "--domain", "example.com:8080", **SECRETS)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(
        "tunneld: configuration error: invalid domain 'example.com:8080': a DNS name is"
    )
    assert out.stderr.count("\n") == 1
