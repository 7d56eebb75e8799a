"""A raw TCP service for the raw-TCP tests (the "database in the sandbox" that is not Redis).

One thread per connection. The client's first line is a command:

- ``hash N\\n``: read everything up to the client's EOF (its half-close), then answer the sha256
  of those bytes (hex, ``\\n``) followed by ``N`` bytes of ``origin.pattern`` and close normally.
  A tunnel that does not honour the half-close never gets the answer.
- ``hold N\\n``: send ``N`` pattern bytes, then keep the connection open, reading until it ends;
  used to cut a stream in the middle (an agent killed).
- ``rst N\\n``: send ``N`` pattern bytes, then close with a reset (``SO_LINGER`` 0): the service
  itself ends abnormally.

``ends`` records how each connection ended on the service's side ("eof", "reset"), so a test can
tell that an abnormal end reached the service as one.
"""

from __future__ import annotations

import hashlib
import socket
import socketserver
import struct
import threading
from typing import Final

from .origin import pattern

# Every socket operation of the service is bounded: a hung test must not hang the thread forever.
IO_TIMEOUT: Final = 30.0


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(IO_TIMEOUT)
        end = "eof"
        try:
            command, rest = self._first_line(sock)
            mode, _, count = command.partition(b" ")
            n = int(count)
            if mode == b"hash":
                digest = hashlib.sha256(rest)
                while chunk := sock.recv(65536):
                    digest.update(chunk)
                sock.sendall(digest.hexdigest().encode() + b"\n")
                for piece in pattern(n, seed=2):
                    sock.sendall(piece)
            elif mode == b"rst":
                for piece in pattern(n, seed=3):
                    sock.sendall(piece)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # now: socketserver would shut the write side (a FIN) first
                end = "reset sent"
            elif mode == b"hold":
                for piece in pattern(n, seed=3):
                    sock.sendall(piece)
                while sock.recv(65536):
                    pass
        except ConnectionResetError:
            end = "reset"
        except (OSError, ValueError) as exc:
            end = f"error: {exc}"
        finally:
            with self.server.lock:
                self.server.ends.append(end)

    @staticmethod
    def _first_line(sock: socket.socket) -> tuple[bytes, bytes]:
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(1024)
            if not chunk or len(data) > 1024:
                raise ValueError("no command line")
            data += chunk
        line, _, rest = data.partition(b"\n")
        return line.strip(), rest


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.ends: list[str] = []


class HashServer:
    """The service above on 127.0.0.1:``port``, in a thread; ``close()`` stops it."""

    def __init__(self) -> None:
        self._server = _Server()
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def ends(self) -> list[str]:
        with self._server.lock:
            return list(self._server.ends)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
