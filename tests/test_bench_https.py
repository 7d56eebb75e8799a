"""The HTTPS bench scenario (bench/e2e/https.py, issue 10) runs: real nginx (the origin and the TLS
baseline), a real tunneld with its public HTTPS listener and a real tunnel-agent, wrk (h1) and
h2load (h2) for one 1 s round. Checks that every path served the requests and how they are
counted, never how fast (speed claims are ratios in docs/performance.md). `make ensure-nginx
ensure-bench-tools` installs nginx, wrk and h2load (Debian's nghttp2-client)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from bench.e2e.https import DOMAIN, https, parse_h2load
from bench.e2e.scenarios import Settings
from bench.e2e.stack import Stack, _wait_port, find_nginx, free_port, origin_conf

# Real h2load 1.52 output (against the bench's TLS nginx): every request answered 2xx ...
H2LOAD_OK = """\
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: h2
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 1.00s, 19130.00 req/s, 21.14MB/s
requests: 19130 total, 19134 started, 19130 done, 19130 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 19130 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 21.14MB (22171768) total, 2.13MB (2238210) headers (space savings 39.38%), 18.68MB
                     min         max         mean         sd        +/- sd
time for request:       47us      5.83ms       191us       228us    98.60%
time for connect:     2.09ms      3.10ms      2.60ms       714us   100.00%
"""
# ... and every request a 404 (h2load counts 4xx and 5xx as failed).
H2LOAD_404 = """\
Application protocol: h2
finished in 5.09ms, 3932.36 req/s, 867.50KB/s
requests: 20 total, 20 started, 20 done, 0 succeeded, 20 failed, 0 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 20 4xx, 0 5xx
time for request:       57us       334us      1.77ms        85us    70.00%
"""


def test_parse_h2load_counts_successes_failures_and_protocol() -> None:
    ok = parse_h2load(H2LOAD_OK)
    assert ok == {
        "req_s": 19130.0,
        "requests": 19130,
        "failed": 0,
        "mean_ms": pytest.approx(0.191),
        "proto": "h2",
    }
    bad = parse_h2load(H2LOAD_404)
    assert (bad["requests"], bad["failed"], bad["mean_ms"]) == (0, 20, pytest.approx(1.77))
    # h2load that could not negotiate h2 prints no protocol line: the scenario refuses the run
    failed = parse_h2load("No protocol negotiated. Fallback behaviour may be activated")
    assert failed["proto"] == "" and failed["requests"] == 0


@pytest.fixture
def origin_stack() -> Iterator[Stack]:
    """A Stack with only the origin nginx (the 1 KiB file): what the HTTPS scenario uses of it
    (the full Stack.start() writes the 4 GiB single-stream file)."""
    stack = Stack()
    try:
        stack.dir.chmod(0o755)
        (stack.dir / "www").mkdir()
        (stack.dir / "www" / "1k").write_bytes(os.urandom(1024))
        stack.origin_port = free_port()
        (stack.dir / "origin.conf").write_text(origin_conf(stack.dir, stack.origin_port))
        conf = str(stack.dir / "origin.conf")
        stack.origin = stack.spawn("origin", [find_nginx(), "-c", conf, "-e", "stderr"])
        _wait_port(stack.origin_port)
        yield stack
    finally:
        stack.close()


def test_https_scenario_runs_h1_and_h2_direct_and_through_the_tunnel(origin_stack: Stack) -> None:
    res = https(origin_stack, Settings(duration=1.0, repeat=1))
    for path in ("direct", "tunnel"):
        (run,) = res.runs[path]
        for proto in ("h1", "h2"):  # h2 runs raise unless ALPN chose h2
            assert run[f"{proto}_requests"] > 0, (path, proto, run)
            assert run[f"{proto}_failed"] == 0, (path, proto, run)
            assert run[f"{proto}_cpu_us"] > 0, (path, proto, run)
    tunnel = res.runs["tunnel"][0]
    assert tunnel["h1_tunneld_us"] > 0 and tunnel["h2_agent_us"] > 0
    assert res.metrics["h2_req_s"].keys() == {"direct", "tunnel"}
    assert res.memory["tunneld"] > 0 and res.memory["agent"] > 0
    assert [n.split(" tunnel/direct")[0] for n in res.notes[:2]] == ["h1", "h2"]
    assert not any("failed" in n for n in res.notes), res.notes
    # the scenario stopped the processes it started (TLS nginx, tunneld, agent)
    names = {"nginx-https", "tunneld-https", "agent-https"}
    started = [p for p in origin_stack.procs if p.name in names]
    assert {p.name for p in started} == names
    assert all(p.popen.poll() is not None for p in started)
    # the certificate the tunnel and nginx served covers the preview names
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName"],
        input=(origin_stack.dir / "https-cert.pem").read_bytes(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert f"DNS:*.{DOMAIN}" in text
