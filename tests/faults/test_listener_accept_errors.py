"""A failed ``accept`` never loses a listener: ``tunneld serve`` goes on serving, on both loops.

uvloop's ``UVStreamServer`` closes its listening socket, without a log line, when libuv hands
its listen callback an error (handles/streamserver.pyx, ``_fatal_error``: an ``OSError`` is not
even logged). A public listener lost that way would leave the process and ``/healthz`` looking
fine. What the real process does, with ``accept``/``accept4`` made to fail by an ``LD_PRELOAD``
shim (compiled here with gcc) on the public port only:

- ``ENOBUFS`` (and ``ENOMEM``) once: uvloop 0.23 (libuv 1.52) never hands the error to uvloop's
  callback; libuv tries ``accept`` again at once and the client is served. On the asyncio loop,
  ``relay.accept.guard_accept`` rests the listener 1 s with a warning naming it; the client
  waits in the backlog and is served.
- ``EMFILE`` three times in a row, with ``open("/")`` and ``open("/dev/null")`` failing
  meanwhile, so that libuv cannot reopen the spare descriptor it closes to drop a connection
  (``uv__emfile_trick``): the same; uvloop's callback sees no error (checked under gdb while
  writing this test: ``__uv_streamserver_on_listen`` only ever got status 0).

Either way the listener still listens, a new client is answered, ``/readyz`` stays 200, and no
traceback is logged. docs/operations.md, File descriptors, names this test. If a later uvloop or
libuv did close the listener, ``test_a_failed_accept_keeps_the_listener`` fails (its second,
fresh connection is refused).

One real ``tunneld serve`` per loop (module fixture); raw HTTP clients on 127.0.0.1.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Processes, wait_for

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <netinet/in.h>

/* $ACCEPT_FAIL_FILE holds "PORT COUNT ERRNO": the next COUNT accept()/accept4() calls on the
   listener bound to PORT fail with ERRNO and take no connection; the file goes with the last.
   ERRNO -1: the listener is shut down for reading (it stops listening), accept fails EINVAL.
   While it exists, open() of "/" or "/dev/null" fails with EMFILE. */
static int fail_now(int fd) {
    const char *path = getenv("ACCEPT_FAIL_FILE");
    if (path == NULL) return 0;
    FILE *f = fopen(path, "r");
    if (f == NULL) return 0;
    int port = -1, count = 0, err = 0;
    if (fscanf(f, "%d %d %d", &port, &count, &err) != 3) port = -1;
    fclose(f);
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) return 0;
    int mine = -2;
    if (ss.ss_family == AF_INET) mine = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    else if (ss.ss_family == AF_INET6) mine = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    if (mine != port || count <= 0) return 0;
    if (count == 1) {
        unlink(path);
    } else {
        f = fopen(path, "w");
        if (f == NULL) return 0;
        fprintf(f, "%d %d %d\n", port, count - 1, err);
        fclose(f);
    }
    fprintf(stderr, "shim: accept on port %d fails with errno %d\n", port, err);
    if (err < 0) { /* the listener stops listening (as one closed under the loop would) */
        shutdown(fd, SHUT_RD);
        err = EINVAL;
    }
    errno = err;
    return 1;
}

static int open_fails(const char *name) {
    const char *path = getenv("ACCEPT_FAIL_FILE");
    if (path == NULL || name == NULL) return 0;
    if (strcmp(name, "/") != 0 && strcmp(name, "/dev/null") != 0) return 0;
    if (access(path, F_OK) != 0) return 0;
    fprintf(stderr, "shim: open %s fails with EMFILE\n", name);
    errno = EMFILE;
    return 1;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = dlsym(RTLD_NEXT, "accept4");
    if (fail_now(fd)) return -1;
    return real(fd, addr, len, flags);
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real) real = dlsym(RTLD_NEXT, "accept");
    if (fail_now(fd)) return -1;
    return real(fd, addr, len);
}

#define OPEN(NAME)                                                        \
    int NAME(const char *name, int flags, ...) {                          \
        static int (*real)(const char *, int, ...);                       \
        if (!real) real = dlsym(RTLD_NEXT, #NAME);                        \
        mode_t mode = 0;                                                  \
        if (flags & (O_CREAT | O_TMPFILE)) {                              \
            va_list ap;                                                   \
            va_start(ap, flags);                                          \
            mode = va_arg(ap, int);                                       \
            va_end(ap);                                                   \
        }                                                                 \
        if (open_fails(name)) return -1;                                  \
        return real(name, flags, mode);                                   \
    }
OPEN(open)
OPEN(open64)
"""


def build_shim(tmp: Path) -> Path:
    """The accept() shim (SHIM) built with gcc into ``tmp``: its shared object, for LD_PRELOAD."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the accept() shim")
    shim = tmp / "acceptshim.so"
    (tmp / "acceptshim.c").write_text(SHIM)
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O1", "-o", str(shim), str(tmp / "acceptshim.c"), "-ldl"],
        check=True,
        timeout=60,
    )
    return shim


def shimmed_edge(tmp: Path, loop: str) -> tuple[Processes, Path]:
    """A real tunneld on ``loop`` under the accept() shim (build_shim), its public listener on
    127.0.0.1; the file that arms the shim (``PORT COUNT ERRNO``)."""
    shim = build_shim(tmp)
    procs = Processes(tmp, loop)
    trigger = tmp / "fail-accepts"
    env = procs.env(
        TUNNELD_ADMIN_TOKEN=procs.admin_token,
        TUNNELD_SECRET=procs.secret,
        LD_PRELOAD=str(shim),
        ACCEPT_FAIL_FILE=str(trigger),
    )
    try:
        procs.start_edge("--public-host", "127.0.0.1", env=env)
    except BaseException:
        procs.close()
        raise
    return procs, trigger


class Edge:
    def __init__(self, procs: Processes, trigger: Path) -> None:
        self.procs = procs
        self.trigger = trigger

    def fail_accepts(self, port: int, count: int, err: int) -> None:
        self.trigger.write_text(f"{port} {count} {err}\n")

    def public_answers(self) -> int:
        answer = httpx.get(
            f"http://127.0.0.1:{self.procs.ports['public']}/",
            headers={"host": "nothing.localhost"},
            timeout=15,  # asyncio: up to COUNT rests of 1 s before the accept
        )
        return answer.status_code

    def output(self) -> str:
        assert self.procs.edge is not None
        return self.procs.output(self.procs.edge)


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def edge(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp(f"accept-errors-{request.param}")
    procs, trigger = shimmed_edge(tmp, request.param)
    try:
        yield Edge(procs, trigger)
    finally:
        procs.close()


@pytest.mark.parametrize(
    ("err", "count"),
    [
        pytest.param(errno.ENOBUFS, 1, id="ENOBUFS"),
        pytest.param(errno.EMFILE, 3, id="EMFILE-no-spare"),
    ],
)
def test_a_failed_accept_keeps_the_listener(edge: Edge, err: int, count: int) -> None:
    public_port = edge.procs.ports["public"]
    edge.fail_accepts(public_port, count, err)
    assert edge.public_answers() == 404  # the client that met the failures, served
    assert not edge.trigger.exists(), "the shim failed fewer accepts than asked"
    wait_for(
        lambda: edge.output().count(f"shim: accept on port {public_port} fails") >= count,
        what="the shim's lines",
    )
    # a fresh connection: the listener still listens (a closed one would refuse it)
    assert edge.public_answers() == 404
    ready = httpx.get(f"http://127.0.0.1:{edge.procs.ports['admin']}/readyz", timeout=10)
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    assert edge.procs.edge is not None and edge.procs.edge.poll() is None
    output = edge.output()
    assert "Traceback" not in output
    if edge.procs.loop == "uvloop":  # nothing said: nothing lost
        assert [
            line for line in output.splitlines() if " WARNING " in line or " ERROR " in line
        ] == []
        if err == errno.EMFILE:  # libuv's spare descriptor was not reopened
            assert "shim: open / fails with EMFILE" in output
    if edge.procs.loop == "asyncio":  # guard_accept: rested, said so, naming the listener
        assert f"listener 127.0.0.1:{public_port}: accept failed: {os.strerror(err)}" in output
