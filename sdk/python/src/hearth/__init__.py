"""hearth's Python SDK: sandboxes on a ``hearth serve`` daemon, from Python.

Entry points: :class:`Sandbox` (synchronous) and :class:`AsyncSandbox` (asyncio), with the same
shape; :func:`run` / :func:`run_async` for one-shot commands. Configuration comes from the
arguments, else ``HEARTH_HOST`` / ``HEARTH_TOKEN`` like the ``hearth sandbox`` CLI. Every error is
a :class:`HearthError`, mapped from the API's error codes (see :mod:`hearth.errors`).

Layout: ``_ops`` builds every request and parses every answer (shared), ``_sync`` and ``_async``
move the bytes; ``_exec_events`` reads exec output; ``_features`` reads the daemon's OpenAPI
document to tell which optional routes it has.
"""

from ._async import AsyncClient, AsyncExecHandle, AsyncSandbox, run_async
from ._sync import Client, ExecHandle, Sandbox, run
from .errors import (
    Busy,
    CapacityExhausted,
    Conflict,
    ConnectionFailed,
    ExecFailed,
    Forbidden,
    GuestExhausted,
    GuestFailed,
    GuestUnresponsive,
    HearthError,
    ImageError,
    InvalidRequest,
    LimitReached,
    NotFound,
    PortClosed,
    QuotaExceeded,
    SandboxFailed,
    ServerError,
    ShuttingDown,
    TooLarge,
    Unauthorized,
    Unsupported,
)
from .models import (
    CodeError,
    CodeResult,
    DirEntry,
    ExecResult,
    NetworkView,
    ProcessInfo,
    ProcessOutput,
    RunResult,
    SandboxInfo,
)

__all__ = [
    "AsyncClient",
    "AsyncExecHandle",
    "AsyncSandbox",
    "Busy",
    "CapacityExhausted",
    "Client",
    "CodeError",
    "CodeResult",
    "Conflict",
    "ConnectionFailed",
    "DirEntry",
    "ExecFailed",
    "ExecHandle",
    "ExecResult",
    "Forbidden",
    "GuestExhausted",
    "GuestFailed",
    "GuestUnresponsive",
    "HearthError",
    "ImageError",
    "InvalidRequest",
    "LimitReached",
    "NetworkView",
    "NotFound",
    "PortClosed",
    "ProcessInfo",
    "ProcessOutput",
    "QuotaExceeded",
    "RunResult",
    "Sandbox",
    "SandboxFailed",
    "SandboxInfo",
    "ServerError",
    "ShuttingDown",
    "TooLarge",
    "Unauthorized",
    "Unsupported",
    "run",
    "run_async",
]
