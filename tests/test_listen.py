"""tunneld/listen.py: the listeners that accept by themselves (the TLS agent port, the public port
with TLS passthrough) bind and accept as asyncio's servers do. Real sockets on loopback, on
asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

import tunneld.listen as listen
from tests.e2e.conftest import Stack
from tunneld.listen import Acceptor, bind

LOOPS = ["asyncio", "uvloop"]


def run(kind: str, main: Callable[[], Awaitable[None]]) -> None:
    runner = asyncio.run if kind == "asyncio" else uvloop.run
    runner(asyncio.wait_for(main(), 10))  # type: ignore[operator]


def both_loopbacks(loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dual.test` resolves to 127.0.0.1 and ::1, as a name with an A and an AAAA record does."""
    real = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host != "dual.test":
            return await real(host, port, *args, **kwargs)
        v4 = await real("127.0.0.1", port, *args, **kwargs)
        v6 = await real("::1", port, *args, **kwargs)
        return [*v4, *v6, *v4]  # a duplicate, as some resolvers answer

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)


def families(sockets: Any) -> list[socket.AddressFamily]:
    return sorted(s.family for s in sockets)


@pytest.mark.parametrize("kind", LOOPS)
def test_bind_listens_on_every_address_of_the_host_as_create_server_does(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TLS agent listener once bound only the first address getaddrinfo gave (for "" that is
    0.0.0.0 alone: IPv6 agents could not connect), where the plain one binds them all."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        both_loopbacks(loop, monkeypatch)
        expected = [socket.AF_INET, socket.AF_INET6]
        if kind == "asyncio":  # uvloop's create_server resolves without loop.getaddrinfo
            server = await loop.create_server(asyncio.Protocol, "dual.test", 0)
            assert families(server.sockets) == expected
            server.close()
            await server.wait_closed()
        sockets = await bind(loop, "dual.test", 0, backlog=16, reuse_port=False)
        try:
            assert families(sockets) == expected
            for sock in sockets:
                assert not sock.getblocking()
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
                if sock.family == socket.AF_INET6:
                    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
                # each one takes connections
                host, port = sock.getsockname()[:2]
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
        finally:
            for sock in sockets:
                sock.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_bind_on_a_port_in_use_says_which_address_and_closes_what_it_opened(kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        taken = socket.create_server(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        try:
            with pytest.raises(OSError) as raised:
                await bind(loop, "127.0.0.1", port, backlog=16, reuse_port=False)
            assert raised.value.errno == errno.EADDRINUSE
            assert f"error while attempting to bind on address ('127.0.0.1', {port})" in str(
                raised.value
            )
        finally:
            taken.close()
        # SO_REUSEPORT is asked for: two listeners on one port
        first = await bind(loop, "127.0.0.1", 0, backlog=16, reuse_port=True)
        port = first[0].getsockname()[1]
        second = await bind(loop, "127.0.0.1", port, backlog=16, reuse_port=True)
        for sock in first + second:
            sock.close()

    run(kind, main)


class FlakyListener(socket.socket):
    """A real listening socket whose accept fails with ``error`` while ``error`` is set (only
    once if ``once``), and counts the calls (and notes the loop's time of each)."""

    error: int | None = None
    once = False
    calls = 0
    times: list[float]

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        self.times.append(asyncio.get_running_loop().time())
        if self.error is not None:
            error = self.error
            if self.once:
                self.error = None
            raise OSError(error, "simulated")
        return super().accept()


def flaky_listener() -> FlakyListener:
    sock = FlakyListener(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    sock.times = []
    return sock


@pytest.mark.parametrize("kind", LOOPS)
def test_out_of_descriptors_rests_the_listener_instead_of_spinning(
    kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE leaves the listener readable: accepting again at once would spin on the loop and log
    each time. The listener rests for ACCEPT_RETRY_DELAY, logs once, then takes the waiting
    connection.

    A descriptor is free again as soon as the first accept failed, and the rest is read from the
    loop's clock (its timers', so exact on asyncio and uvloop alike): the next accept came no
    sooner, whatever the host's load. (The test once slept 0.15 s "within the rest" of 0.3 s
    before it freed the descriptor: a wake-up 0.15 s late on a loaded host found a second
    failed accept.)"""
    monkeypatch.setattr(listen, "ACCEPT_RETRY_DELAY", 0.3)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: list[socket.socket] = []
        acceptor = Acceptor(loop, "test listener", lambda sock, _: accepted.append(sock))
        listener = flaky_listener()
        listener.error, listener.once = errno.EMFILE, True
        acceptor.serve([listener])
        writer = None
        try:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            for _ in range(500):
                if accepted:
                    break
                await asyncio.sleep(0.01)
            assert len(accepted) == 1, listener.times
            # the accept after the failed one (it took the connection; the batch's next one
            # found none) came only once the rest was over (1 ms: uvloop's timers count whole
            # milliseconds); spinning would have tried again at once
            assert listener.times[1] - listener.times[0] >= 0.3 - 0.001, listener.times
            assert not accepted[0].getblocking()
            warnings = [r for r in caplog.records if "accept failed" in r.getMessage()]
            assert len(warnings) == 1 and "test listener" in warnings[0].getMessage()
        finally:  # also after a failed assert: uvloop.run then hung in its loop.close()
            if writer is not None:
                writer.close()
            acceptor.close()
            for sock in accepted:
                sock.close()
        assert listener.fileno() == -1  # closed by the acceptor

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_connection_gone_before_accept_is_skipped_and_close_while_resting_is_clean(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listen, "ACCEPT_RETRY_DELAY", 60.0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: list[socket.socket] = []
        acceptor = Acceptor(loop, "test listener", lambda sock, _: accepted.append(sock))
        listener = flaky_listener()
        listener.error = errno.ECONNABORTED
        acceptor.serve([listener])
        _, writer = await asyncio.open_connection(*listener.getsockname())
        for _ in range(100):  # skipped, tried again in the same wake-up, up to the batch
            if listener.calls >= 2:
                break
            await asyncio.sleep(0.01)
        assert listener.calls >= 2 and not accepted
        listener.error = None
        for _ in range(100):
            if accepted:
                break
            await asyncio.sleep(0.01)
        assert len(accepted) == 1
        listener.error = errno.EMFILE  # now resting for a minute
        _, writer2 = await asyncio.open_connection(*listener.getsockname())
        await asyncio.sleep(0.05)
        acceptor.close()  # cancels the retry: nothing runs on a closed socket later
        acceptor.close()
        assert listener.fileno() == -1
        for w in (writer, writer2):
            w.close()
        for sock in accepted:
            sock.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_the_tls_agent_port_and_the_passthrough_port_listen_on_every_address(
    kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Both listeners that accept by themselves, in a real edge: on a host with an IPv4 and an
    IPv6 address each takes TLS connections on both, as the plain listeners do."""
    ca = trustme.CA()
    cert = ca.issue_cert("edge.test", "*.edge.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    client = ssl.create_default_context()
    ca.configure_trust(client)

    async def main() -> None:
        both_loopbacks(asyncio.get_running_loop(), monkeypatch)
        stack = Stack(
            agent_host="dual.test",
            tls_cert=str(cert_file),
            tls_key=str(key_file),
            public_host="dual.test",
            public_tls_cert=str(cert_file),
            public_tls_key=str(key_file),
            public_tls_passthrough=True,
        )
        await stack.start()
        try:
            edge = stack.edge
            assert edge is not None
            agents, public = edge._servers[0], edge._servers[1]
            for listener, name in ((agents, "edge.test"), (public, "x.edge.test")):
                assert families(listener.sockets) == [socket.AF_INET, socket.AF_INET6]
                for sock in listener.sockets:
                    host, port = sock.getsockname()[:2]
                    _, writer = await asyncio.open_connection(
                        host, port, ssl=client, server_hostname=name
                    )
                    assert writer.get_extra_info("ssl_object") is not None  # handshake done
                    writer.close()
        finally:
            await stack.close()

    run(kind, main)
