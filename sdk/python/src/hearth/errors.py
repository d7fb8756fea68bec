"""The SDK's exceptions, one class per kind of failure the daemon reports.

Every error answer of the API is ``{"error": "...", "code": "..."}`` with one HTTP status per
code (see ``crates/hearth/src/serve/error.rs``); :func:`from_answer` turns such an answer into the
matching exception, keeping the daemon's own message. Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Optional


class HearthError(Exception):
    """Base of every error the SDK raises. ``status`` and ``code`` are the API's, when it
    answered."""

    def __init__(
        self, message: str, *, status: Optional[int] = None, code: Optional[str] = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class InvalidRequest(HearthError):
    """400/415/422: the request was malformed or named something impossible (the message says
    what)."""


class Unauthorized(HearthError):
    """401: no token, or one the daemon's tokens file does not hold."""


class Forbidden(HearthError):
    """403: not allowed for this tenant (a network policy above its ceiling, a guest permission)."""


class NotFound(HearthError):
    """404: no such sandbox for this tenant, or no such file in it."""


class Conflict(HearthError):
    """409: the sandbox is not running, or the target already exists."""


class TooLarge(HearthError):
    """413/431: a body or headers over the daemon's limit."""


class QuotaExceeded(HearthError):
    """429 ``quota``: the tenant's quota is used up; delete a sandbox first."""


class LimitReached(HearthError):
    """429 ``limit``: a per-sandbox bound is reached (16 running background processes); remove
    one first."""


class _RetryLater(HearthError):
    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        code: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        #: Seconds the daemon asks the client to wait before retrying (its ``Retry-After``).
        self.retry_after = retry_after


class Busy(_RetryLater):
    """429 ``busy``: the sandbox already has its maximum of requests open; retry after
    ``retry_after`` seconds."""


class CapacityExhausted(_RetryLater):
    """503 ``capacity``: the node is full; retry after ``retry_after`` seconds."""


class ShuttingDown(HearthError):
    """503 ``shutting_down``: the daemon is stopping."""


class ImageError(HearthError):
    """502 ``image``: the image could not be pulled or unpacked."""


class PortClosed(HearthError):
    """502 ``port_closed``/``bad_gateway``: nothing (or nothing speaking HTTP/1.1) listens on the
    guest port."""


class GuestUnresponsive(HearthError):
    """504 ``guest_unresponsive``: the sandbox's agent did not answer in time (hung or
    misbehaving)."""


class GuestFailed(HearthError):
    """502 ``guest_failed``: the sandbox's guest went away mid-request (its VM died); the sandbox
    turns ``failed``."""


class GuestExhausted(HearthError):
    """503 ``guest_exhausted``: the sandbox's own workload holds every process slot, its memory or
    its disk (a fork bomb, say); the request may succeed once the guest frees them."""


class ServerError(HearthError):
    """500 and any other answer the SDK does not know: a failure on the daemon's side."""


class ExecFailed(HearthError):
    """A command started but hearth lost it (the sandbox stopped, the channel broke): there is no
    exit status."""


class SandboxFailed(HearthError):
    """The sandbox did not come up (``state`` is ``failed``); the message holds the daemon's
    reason."""


class Unsupported(HearthError):
    """The daemon has no route for this feature (it is older, or built without it)."""


class ConnectionFailed(HearthError):
    """The daemon could not be reached, or the connection broke mid-answer."""


_BY_CODE: Mapping[str, type[HearthError]] = {
    "invalid": InvalidRequest,
    "unprocessable": InvalidRequest,
    "unsupported_media_type": InvalidRequest,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "too_large": TooLarge,
    "quota": QuotaExceeded,
    "busy": Busy,
    "limit": LimitReached,
    "capacity": CapacityExhausted,
    "shutting_down": ShuttingDown,
    "image": ImageError,
    "port_closed": PortClosed,
    "bad_gateway": PortClosed,
    # The gateway could not reach the sandbox's node (its daemon restarting, or the node gone).
    "node_unreachable": ConnectionFailed,
    "guest_unresponsive": GuestUnresponsive,
    "guest_failed": GuestFailed,
    "guest_exhausted": GuestExhausted,
    "internal": ServerError,
}

_BY_STATUS: Mapping[int, type[HearthError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    415: InvalidRequest,
    422: InvalidRequest,
    431: TooLarge,
    429: QuotaExceeded,
    502: PortClosed,
    503: CapacityExhausted,
    504: GuestUnresponsive,
}


def is_error_body(body: bytes) -> bool:
    """Whether ``body`` is hearth's own ``{"error", "code"}`` answer (not, say, a guest
    server's)."""
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("error"), str) and isinstance(
        value.get("code"), str
    )


def from_answer(
    status: int, body: bytes, retry_after: Optional[str] = None, what: str = ""
) -> HearthError:
    """The exception for an error answer: by its ``code`` when the body is hearth's, else by
    status."""
    code: Optional[str] = None
    message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, dict):
        if isinstance(value.get("code"), str):
            code = value["code"]
        if isinstance(value.get("error"), str):
            message = value["error"]
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status, ServerError)
    if what:
        message = f"{what}: {message}"
    if issubclass(cls, _RetryLater):
        return cls(message, status=status, code=code, retry_after=_seconds(retry_after))
    return cls(message, status=status, code=code)


def _seconds(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
