# The C extension's functions (tunneld/_speedups.c); each has the signature and results of its
# pure-Python reference named in the comment.
from collections.abc import Iterable, Iterator
from typing import Any

def simple_head(data: bytes, /) -> tuple[int, int] | None: ...  # responses.simple_head_py
def whole_response(  # accesslog.whole_response_py
    framer: Any, data: bytes, request: list[Any], now: int, kept: Tally | None, /
) -> bytes | None: ...
def text_line(  # accesslog.text_line_py
    pending: list[bytes],
    stamp: bytes,
    sec: int,
    now: int,
    lead: bytes,
    request: list[Any],
    site: bytes,
    /,
) -> int: ...
def request_ids(  # accesslog.request_ids_py
    headers: Iterable[tuple[bytes, bytes]], counter: Iterator[int], prefix: bytes, /
) -> tuple[bytes, bytes]: ...
def begin_request(  # accesslog.begin_request_py
    head: Any, counter: Iterator[int], prefix: bytes, now: int, requests: Any, framer: Any, /
) -> list[Any]: ...
def log_response(  # accesslog.log_response_py
    state: list[Any], conn: Any, data: bytes, /
) -> bytes | None: ...
def log_request(state: list[Any], head: Any, /) -> bytes: ...  # accesslog.log_request_py

class Tally:  # metrics.Tally
    def __len__(self) -> int: ...
    def add(self, ns: int, status: int, body_in: int, body_out: int, /) -> None: ...
    def take(self) -> tuple[list[int], float, list[int], int, int]: ...

def tally(bounds: tuple[float, ...], /) -> Tally: ...  # metrics.tally_py

class IdCounter(Iterator[int]):  # itertools.count
    def __next__(self) -> int: ...

def id_counter(start: int, /) -> IdCounter: ...  # itertools.count
