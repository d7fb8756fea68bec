"""What the SDK hands back: plain, immutable records built from the API's JSON answers
(``crates/hearth/openapi.json``). ``from_json`` constructors accept unknown fields, so a newer
daemon's additions do not break an older SDK. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) else None


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the daemon describes it. Times are Unix milliseconds."""

    id: str
    image: str
    state: str
    """``creating``, ``running``, ``paused``, ``stopping`` (ended, its VM still being stopped),
    ``stopped`` or ``failed``."""
    reason: Optional[str]
    """Why it stopped or failed (``ttl expired``, ``idle``, ...); ``idle`` on a paused sandbox
    its idle timeout paused (``on_idle="pause"``: its next use resumes it)."""
    cpus: int
    memory_mib: int
    disk_bytes: int
    labels: Mapping[str, str]
    created_at: int
    image_digest: Optional[str] = None
    ready_at: Optional[int] = None
    finished_at: Optional[int] = None
    expires_at: Optional[int] = None
    last_active_at: Optional[int] = None
    boot_ms: Optional[int] = None
    network: Optional[Mapping[str, Any]] = None
    """The egress policy in force (``None`` when the daemon gives sandboxes no network)."""
    on_idle: str = "stop"
    """What its idle timeout does: ``stop`` or ``pause``."""

    @staticmethod
    def from_json(value: Mapping[str, Any]) -> SandboxInfo:
        return SandboxInfo(
            id=str(value["id"]),
            image=str(value.get("image", "")),
            state=str(value.get("state", "")),
            reason=value.get("reason"),
            cpus=int(value.get("cpus", 0)),
            memory_mib=int(value.get("memory_mib", 0)),
            disk_bytes=int(value.get("disk_bytes", 0)),
            labels=dict(value.get("labels") or {}),
            created_at=int(value.get("created_at", 0)),
            image_digest=value.get("image_digest"),
            ready_at=_int(value.get("ready_at")),
            finished_at=_int(value.get("finished_at")),
            expires_at=_int(value.get("expires_at")),
            last_active_at=_int(value.get("last_active_at")),
            boot_ms=_int(value.get("boot_ms")),
            network=value.get("network"),
            on_idle=str(value.get("on_idle") or "stop"),
        )


@dataclass(frozen=True)
class ExecResult:
    """How a command ended and everything it wrote. ``stdout``/``stderr`` are decoded as UTF-8
    (invalid bytes replaced); the exact bytes are in ``stdout_bytes``/``stderr_bytes``."""

    exit_code: Optional[int]
    """The exit status, or ``None`` when a signal killed the command."""
    stdout: str
    stderr: str
    signal: Optional[int] = None
    """The signal that killed the command."""
    timed_out: bool = False
    """The exec's ``timeout`` fired and killed the command (``signal`` says with what)."""
    stdout_bytes: bytes = field(default=b"", repr=False)
    stderr_bytes: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        """Exited with status 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class RunResult(ExecResult):
    """A one-shot run's result (``hearth.run``): an :class:`ExecResult` plus the run's extras."""

    truncated: bool = False
    """Output beyond the daemon's ``--run-output-limit`` was dropped."""
    boot_ms: Optional[int] = None


@dataclass(frozen=True)
class DirEntry:
    """One entry of a directory listing."""

    name: str
    kind: str
    """``file``, ``dir``, ``symlink`` or ``other``."""
    size: int
    mode: int
    uid: int
    gid: int
    mtime: int
    """Seconds since the Unix epoch."""
    link_target: Optional[str] = None

    @staticmethod
    def from_json(value: Mapping[str, Any]) -> DirEntry:
        return DirEntry(
            name=str(value["name"]),
            kind=str(value.get("kind", "other")),
            size=int(value.get("size", 0)),
            mode=int(value.get("mode", 0)),
            uid=int(value.get("uid", 0)),
            gid=int(value.get("gid", 0)),
            mtime=int(value.get("mtime", 0)),
            link_target=value.get("link_target"),
        )


@dataclass(frozen=True)
class NetworkView:
    """A running sandbox's egress policy and what went through its network."""

    policy: Mapping[str, Any]
    """``{"mode": "none"|"allow"|"open", "allow": [...], "deny": [...]}``."""
    stats: Mapping[str, Any]
    refused: list[Mapping[str, Any]]
    """The latest refused connection attempts, oldest first."""

    @staticmethod
    def from_json(value: Mapping[str, Any]) -> NetworkView:
        return NetworkView(
            policy=dict(value.get("policy") or {}),
            stats=dict(value.get("stats") or {}),
            refused=list(value.get("refused") or []),
        )


@dataclass(frozen=True)
class CodeError:
    """An exception raised by code run with ``run_code`` (or how its interpreter was lost:
    ``InterpreterExited``, or ``TimeoutError`` when it ignored the interrupt and was killed)."""

    name: str
    """The exception's class name, e.g. ``ZeroDivisionError``."""
    message: str
    traceback: str
    """Formatted as Python prints it."""

    @staticmethod
    def from_json(value: Mapping[str, Any]) -> CodeError:
        return CodeError(
            name=str(value.get("name", "")),
            message=str(value.get("message", "")),
            traceback=str(value.get("traceback", "")),
        )


@dataclass(frozen=True)
class CodeResult:
    """What one ``run_code`` call produced, in the sandbox's long-lived interpreter."""

    stdout: str
    stderr: str
    result: Optional[str]
    """``repr()`` of the last line's value when it is an expression that is not ``None``."""
    error: Optional[CodeError]
    """The exception the code raised, if any."""
    timed_out: bool
    """The timeout interrupted the code (``KeyboardInterrupt``; earlier names are kept)."""
    restarted: bool
    """This call ran in a fresh interpreter because the previous one was lost (crash, kill after a
    timeout, a call cut short by a forced pause or a daemon stop): names defined before are gone. A
    pause and resume and a daemon restart keep the interpreter; a fork's children get copies."""
    execution_count: int
    """Calls run by this interpreter, this one included."""
    truncated: bool = False
    """Output beyond 1 MiB per stream was dropped."""

    @property
    def ok(self) -> bool:
        """The code ran without raising."""
        return self.error is None

    @property
    def text(self) -> str:
        """What a notebook cell would show: the output, then the result or the traceback."""
        shown = self.result if self.error is None else self.error.traceback
        return self.stdout + self.stderr + (shown or "")

    @staticmethod
    def from_json(value: Mapping[str, Any]) -> CodeResult:
        error = value.get("error")
        result = value.get("result")
        return CodeResult(
            stdout=str(value.get("stdout", "")),
            stderr=str(value.get("stderr", "")),
            result=result if isinstance(result, str) else None,
            error=CodeError.from_json(error) if isinstance(error, dict) else None,
            timed_out=bool(value.get("timed_out", False)),
            restarted=bool(value.get("restarted", False)),
            execution_count=int(value.get("execution_count", 0)),
            truncated=bool(value.get("truncated", False)),
        )


@dataclass(frozen=True)
class ProcessInfo:
    """A background process (``sb.processes``): a command that runs on after the call that
    started it, kept across pauses, forks and daemon restarts."""

    id: int
    """Its id in the sandbox, from 1."""
    pid: int
    """Its PID in the guest."""
    argv: list[str]
    tag: Optional[str]
    started_at: int
    """Unix milliseconds."""
    running: bool
    keep_awake: bool
    """Started with ``keep_awake``: a use of its sandbox while it runs."""
    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    lost: Optional[str]
    """Why it is lost, its exit status unknown (gone when its sandbox came back)."""
    output_bytes: int
    """Bytes of output produced, stdout and stderr together: the offset after the last byte."""
    output_dropped: int
    """Of those, bytes no longer kept (the daemon keeps the last 1 MiB)."""

    @staticmethod
    def from_json(value: Mapping[str, Any]) -> ProcessInfo:
        tag, lost = value.get("tag"), value.get("lost")
        return ProcessInfo(
            id=int(value.get("id", 0)),
            pid=int(value.get("pid", 0)),
            argv=[str(a) for a in value.get("argv") or []],
            tag=tag if isinstance(tag, str) else None,
            started_at=int(value.get("started_at", 0)),
            running=bool(value.get("running", False)),
            keep_awake=bool(value.get("keep_awake", False)),
            exit_code=_int_or_none(value.get("exit_code")),
            signal=_int_or_none(value.get("signal")),
            timed_out=bool(value.get("timed_out", False)),
            lost=lost if isinstance(lost, str) else None,
            output_bytes=int(value.get("output_bytes", 0)),
            output_dropped=int(value.get("output_dropped", 0)),
        )


@dataclass(frozen=True)
class ProcessOutput:
    """Output of a background process read from an offset (``sb.processes.output``)."""

    stdout: bytes
    stderr: bytes
    start: int
    """The offset of the first byte read: past the one asked for when those bytes were dropped."""
    end: int
    """The offset after the last byte read: ask from here next time."""
    ended: bool
    """The process has ended (or is lost); then ``exit_code``/``signal``/``error`` say how."""
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    error: Optional[str] = None

    @property
    def text(self) -> str:
        """stdout and stderr, each decoded as UTF-8 (invalid bytes replaced), one after the other."""
        return (self.stdout.decode(errors="replace") + self.stderr.decode(errors="replace"))


def _int_or_none(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
