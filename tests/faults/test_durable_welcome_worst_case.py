"""Issue 8, acceptance 3: the per-sandbox cap, and the largest welcome it allows.

A sandbox with the longest id whose preview hosts fit DNS (40 characters with a 5-digit port and a
16-character token: PREVIEW_HOST_TOO_LONG past that) exposes the maximum number of ports (the cap,
128) with the longest names (256 control characters: 6 bytes each once JSON-escaped) and
16-character custom tokens, on a domain that makes its hosts up to 253 characters, the DNS maximum.
Expose number 129 is a 409 TOO_MANY_EXPOSURES. The welcome of
that set does not fit one 64 KiB control message: the edge sends what fits and the rest as
Expose requests, so the agent (re)connects and learns every port; before, `_on_hello` raised
and the agent looped on "connection closed before welcome". No traceback on either side.
"""

from __future__ import annotations

import httpx

from tests.e2e.procs import Processes
from tunneld.config import Config

from .durable import Service, admin, connected, wait

DOMAIN = ".".join(["a" * 63, "b" * 63, "c" * 61])  # 189: with a label of 63, a host of 253
SANDBOX = "s" * 40  # 5-40-16 and 2 hyphens: a first label of 63, the DNS maximum
NAME = "\u0001" * 256
CAP = Config().max_exposures_per_sandbox


def test_the_cap_and_the_largest_welcome(tmp_path) -> None:
    assert len(DOMAIN) == 189 and CAP == 128
    procs = Processes(tmp_path, "uvloop")
    service = Service()
    try:
        procs.start_edge("--domain", DOMAIN)
        ports = [*range(1100, 1100 + CAP - 1), service.port]  # the service's port sorts last
        assert service.port > ports[-2]
        with admin(procs) as a:
            for i, port in enumerate(ports):
                r = a.post(
                    f"/v1/sandboxes/{SANDBOX}/ports",
                    json={"port": port, "name": NAME, "token": f"t{i:015d}"},
                )
                assert r.status_code == 200, r.text
            over = a.post(f"/v1/sandboxes/{SANDBOX}/ports", json={"port": 9999})
            assert over.status_code == 409
            assert over.json()["code"] == "TOO_MANY_EXPOSURES"
            assert "128" in over.json()["error"]
            again = a.post(f"/v1/sandboxes/{SANDBOX}/ports", json={"port": 1100, "name": "x"})
            assert again.status_code == 200, again.text  # an exposed port: not a new one
            listed = a.get(f"/v1/sandboxes/{SANDBOX}/ports").json()["ports"]
        assert len(listed) == CAP

        for attempt in range(2):  # first connect, then a reconnect of a new agent process
            agent, _ = procs.start_agent(SANDBOX)
            wait(lambda: connected(procs, SANDBOX), what=f"agent connected ({attempt})")
            public = httpx.Client(base_url=f"http://127.0.0.1:{procs.ports['public']}", timeout=10)
            for p in listed:
                # 200 from the service, 502 UPSTREAM_CONNECT_FAILED where nothing listens:
                # both mean the agent knew the port (an unknown one is reset: UPSTREAM_RESET)
                r = wait(
                    lambda p=p, public=public: _preview_known(public, p["exposedAt"]),
                    timeout=10,
                    what=f"agent knows port {p['port']}",
                )
                if p["port"] == service.port:
                    assert r.status_code == 200 and r.text == f"port {service.port}"
            public.close()
            agent.kill()
            agent.wait(10)
            assert "Traceback" not in procs.output(agent)
        edge_log = procs.output(procs.edge)
        assert "follow as expose requests" in edge_log
        assert "Traceback" not in edge_log
    finally:
        procs.close()
        service.close()


def _preview_known(public: httpx.Client, url: str) -> httpx.Response | None:
    host = url.split("//", 1)[1].split("/", 1)[0]
    r = public.get("/", headers={"host": host})
    if r.status_code == 200:
        return r
    if r.status_code == 502 and r.json()["code"] == "UPSTREAM_CONNECT_FAILED":
        return r
    return None
