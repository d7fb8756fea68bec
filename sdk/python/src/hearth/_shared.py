"""Transport details both flavours share: time limits, WebSocket sizes, and turning failed
WebSocket handshakes and proxied answers into the SDK's exceptions. No I/O."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Optional

import httpx
import websockets.exceptions

from .errors import ConnectionFailed, HearthError, ShuttingDown, from_answer, is_error_body

#: Seconds to open a connection to the daemon.
CONNECT_TIMEOUT = 30.0
#: Seconds ``Sandbox.create`` waits for a sandbox to leave ``creating`` (the daemon itself answers
#: within its own create wait, 300 s by default; it answers 202 only past that).
CREATE_TIMEOUT = 600.0
#: Seconds between polls of a sandbox still creating.
POLL_INTERVAL = 0.5
#: Largest exec event accepted from the daemon (output chunks are far smaller).
WS_MAX_SIZE = 16 << 20
#: Largest stdin sent inline (base64 in the JSON body, which the daemon caps at 8 MiB); a
#: larger one goes over the exec WebSocket instead.
STDIN_INLINE_LIMIT = 4 << 20
#: Stdin goes in messages of at most this size (the daemon closes on one over 1 MiB).
STDIN_CHUNK = 256 << 10
#: Seconds ``processes.wait`` goes on making a broken connection again (a daemon restarting).
RECONNECT_FOR = 60.0
#: Longest pause between two of those tries.
RECONNECT_PAUSE = 2.0
#: Statuses at which hearth itself (not the guest's server) answers a proxied request, when the
#: body is hearth's ``{"error", "code"}``.
_PROXY_REFUSALS = frozenset({401, 409, 429, 431, 502, 504})


def stdin_chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), STDIN_CHUNK):
        yield data[start:start + STDIN_CHUNK]


def ws_error(err: Exception, what: str, base: str) -> HearthError:
    """The exception for a WebSocket that did not open: the daemon's refusal (a 404 for an unknown
    sandbox, a 401 for a bad token) mapped like any answer, else a connection failure."""
    if isinstance(err, websockets.exceptions.InvalidStatus):
        r = err.response
        return from_answer(r.status_code, bytes(r.body or b""), r.headers.get("Retry-After"), what)
    return ConnectionFailed(f"{what}: cannot open a WebSocket to the daemon at {base}: {err}")


def port_error(status: int, body: bytes, retry_after: Optional[str],
               what: str) -> Optional[HearthError]:
    """Hearth's own refusal of a proxied request, or ``None`` when the guest answered."""
    if status in _PROXY_REFUSALS and is_error_body(body):
        return from_answer(status, body, retry_after, what)
    return None


class Reconnects:
    """When a call that a daemon restart cut (the connection broke or was refused, the daemon
    answered that it is stopping, or a gateway that it cannot reach the node) is made again: after pauses doubling from 0.25 s up to
    :data:`RECONNECT_PAUSE`, until ``within`` seconds have passed since the break; a connection
    that broke mid-answer (the daemon was up and answering) starts that count again, so a wait may
    outlive several restarts. Only for calls that may be repeated as they are: reading a process's
    output from an offset is (the daemon keeps it, at the same offsets, across its restarts). No
    I/O."""

    def __init__(self, within: float) -> None:
        self._within = within
        self._deadline: Optional[float] = None
        self._pause = 0.0

    def after(self, error: HearthError) -> Optional[float]:
        """Seconds to wait before trying again after ``error``; ``None``: give up and raise it."""
        if not isinstance(error, (ConnectionFailed, ShuttingDown)):
            return None
        cause = error.__cause__
        if isinstance(cause, httpx.ReadTimeout):
            return None  # the client's own bound on a silent read, not a break
        now = time.monotonic()
        answering = isinstance(cause, httpx.TransportError) and not isinstance(
            cause, (httpx.ConnectError, httpx.ConnectTimeout))
        if self._deadline is None or answering:
            self._deadline = now + self._within
        if now >= self._deadline:
            return None
        self._pause = min(max(self._pause * 2, 0.25), RECONNECT_PAUSE)
        return min(self._pause, self._deadline - now)
