"""Every API call as data: an :class:`Op` says what to send and how to read the answer, so the sync
(``_sync.py``) and asyncio (``_async.py``) flavours share all request building and answer parsing
and differ only in how they move bytes. Request bodies follow ``crates/hearth/src/serve/api.rs``.
Nothing here does I/O.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar, Union
from urllib.parse import quote

from . import _features
from .errors import InvalidRequest, NotFound, SandboxFailed, ServerError
from .models import (CodeResult, DirEntry, ExecResult, NetworkView, ProcessInfo, ProcessOutput,
                     RunResult, SandboxInfo)

T = TypeVar("T")

#: A command: an argv list, or a shell string run as ``["sh", "-c", string]``.
Command = Union[str, Sequence[str]]
#: A size: bytes as an int, or the daemon's notation (``"512m"``, ``"2g"``).
Size = Union[int, str]
#: An egress policy: a mode (``"none"``, ``"allow"``, ``"open"``) or the full
#: ``{"mode": ..., "allow": [...], "deny": [...]}``.
Policy = Union[str, Mapping[str, Any]]
Data = Union[bytes, str]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise ServerError(f"the daemon answered {self.status} with non-JSON: {e}") from e


@dataclass(frozen=True)
class Op(Generic[T]):
    method: str
    path: str
    what: str
    """What the call does, for error messages."""
    parse: Callable[[Answer], T]
    json: Any = None
    params: Optional[Mapping[str, str]] = None
    content: Optional[bytes] = None
    requires: Optional[_features.Feature] = None


def _sandbox(id: str, rest: str = "") -> str:
    return f"/v1/sandboxes/{quote(id, safe='')}{rest}"


def _none(_: Answer) -> None:
    return None


def _info(answer: Answer) -> SandboxInfo:
    return SandboxInfo.from_json(answer.json())


def _maybe_info(answer: Answer) -> Optional[SandboxInfo]:
    """A sandbox record when the answer carries one (routes being added may answer 204)."""
    if not answer.body:
        return None
    value = answer.json()
    return SandboxInfo.from_json(value) if isinstance(value, dict) and "id" in value else None


def argv(command: Command) -> list[str]:
    if isinstance(command, str):
        return ["sh", "-c", command]
    args = [str(a) for a in command]
    if not args:
        raise InvalidRequest("the command is empty: pass an argv list or a shell string")
    return args


def seconds(value: Optional[float], field: str) -> Optional[int]:
    """Whole seconds for the API's ``*_seconds`` fields (at least 1), rounding up."""
    if value is None:
        return None
    if value <= 0:
        raise InvalidRequest(f"`{field}` must be positive, not {value}")
    return max(1, math.ceil(value))


def size(value: Optional[Size]) -> Optional[str]:
    return None if value is None else str(value)


def data_bytes(data: Data) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def policy(value: Policy, allow: Optional[Sequence[str]] = None,
           deny: Optional[Sequence[str]] = None) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": value} if isinstance(value, str) else dict(value)
    if allow is not None:
        out["allow"] = list(allow)
    if deny is not None:
        out["deny"] = list(deny)
    return out


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None and v != {}}


# --- sandboxes ---------------------------------------------------------------------------------

def create(
    image: str,
    *,
    cpus: Optional[int],
    memory: Optional[Size],
    disk: Optional[Size],
    env: Optional[Mapping[str, str]],
    ttl: Optional[float],
    idle_timeout: Optional[float],
    on_idle: Optional[str],
    network: Optional[Policy],
    cwd: Optional[str],
    user: Optional[str],
    labels: Optional[Mapping[str, str]],
) -> Op[SandboxInfo]:
    body = _drop_none({
        "image": image,
        "cpus": cpus,
        "memory": size(memory),
        "disk": size(disk),
        "ttl_seconds": seconds(ttl, "ttl"),
        "idle_timeout_seconds": seconds(idle_timeout, "idle_timeout"),
        "on_idle": on_idle,
        "env": dict(env or {}),
        "workdir": cwd,
        "user": user,
        "labels": dict(labels or {}),
        "network": None if network is None else policy(network),
        "wait": True,
    })
    return Op("POST", "/v1/sandboxes", f"creating a sandbox of {image}", _info, json=body)


def get(id: str) -> Op[SandboxInfo]:
    return Op("GET", _sandbox(id), f"sandbox {id}", _info)


def list_all() -> Op[list[SandboxInfo]]:
    def parse(answer: Answer) -> list[SandboxInfo]:
        return [SandboxInfo.from_json(s) for s in answer.json().get("sandboxes", [])]

    return Op("GET", "/v1/sandboxes", "listing sandboxes", parse)


def delete(id: str) -> Op[None]:
    return Op("DELETE", _sandbox(id), f"deleting sandbox {id}", _none)


def settled(info: SandboxInfo) -> bool:
    """Whether ``create`` can stop polling: the sandbox is no longer ``creating``."""
    return info.state != "creating"


def check_running(info: SandboxInfo) -> SandboxInfo:
    if info.state == "creating":
        raise SandboxFailed(f"sandbox {info.id} of {info.image} was still booting when the SDK "
                            "stopped waiting (`boot_timeout`); it was deleted")
    if info.state != "running":
        raise SandboxFailed(
            f"sandbox {info.id} of {info.image} is {info.state}: {info.reason or 'no reason given'}"
        )
    return info


def pause(id: str) -> Op[Optional[SandboxInfo]]:
    return Op("POST", _sandbox(id, "/pause"), f"pausing sandbox {id}", _maybe_info,
              requires=_features.PAUSE)


def resume(id: str) -> Op[Optional[SandboxInfo]]:
    return Op("POST", _sandbox(id, "/resume"), f"resuming sandbox {id}", _maybe_info,
              requires=_features.RESUME)


def fork(id: str, count: int) -> Op[list[SandboxInfo]]:
    if count < 1:
        raise InvalidRequest(f"fork needs a count of at least 1, not {count}")

    def parse(answer: Answer) -> list[SandboxInfo]:
        return [SandboxInfo.from_json(s) for s in answer.json().get("sandboxes", [])]

    return Op("POST", _sandbox(id, "/fork"), f"forking sandbox {id}", parse,
              json={"count": count}, requires=_features.FORK)


def run_code(id: str, code: str, language: str, timeout: Optional[float]) -> Op[CodeResult]:
    body: dict[str, Any] = {"code": code, "language": language}
    if timeout is not None:
        if timeout <= 0:
            raise InvalidRequest(f"run_code needs a positive timeout, not {timeout}")
        body["timeout_seconds"] = max(1, math.ceil(timeout))
    return Op("POST", _sandbox(id, "/code"), f"running code in sandbox {id}",
              lambda answer: CodeResult.from_json(answer.json()), json=body,
              requires=_features.CODE)


def reset_code(id: str) -> Op[None]:
    return Op("DELETE", _sandbox(id, "/code"), f"resetting the code interpreter of sandbox {id}",
              _none, requires=_features.CODE_RESET)


def openapi() -> Op[dict[str, Any]]:
    def parse(answer: Answer) -> dict[str, Any]:
        value = answer.json()
        return value if isinstance(value, dict) else {}

    return Op("GET", "/openapi.json", "reading the daemon's /openapi.json", parse)


# --- background processes ------------------------------------------------------------------

def _process(id: str, n: int, rest: str = "") -> str:
    return _sandbox(id, f"/processes/{int(n)}{rest}")


def start_process(id: str, body: Mapping[str, Any]) -> Op[ProcessInfo]:
    return Op("POST", _sandbox(id, "/processes"), f"starting a background process in sandbox {id}",
              lambda answer: ProcessInfo.from_json(answer.json()), json=body,
              requires=_features.PROCESSES)


def process_body(command: Command, *, env: Optional[Mapping[str, str]], cwd: Optional[str],
                 user: Optional[str], timeout: Optional[float], stdin: bool,
                 tag: Optional[str], keep_awake: bool) -> dict[str, Any]:
    body = exec_body(command, env=env, cwd=cwd, user=user, timeout=timeout)
    return _drop_none({**body, "open_stdin": stdin, "tag": tag, "keep_awake": keep_awake})


def list_processes(id: str) -> Op[list[ProcessInfo]]:
    def parse(answer: Answer) -> list[ProcessInfo]:
        return [ProcessInfo.from_json(p) for p in answer.json().get("processes", [])]

    return Op("GET", _sandbox(id, "/processes"), f"listing the processes of sandbox {id}", parse,
              requires=_features.PROCESSES)


def get_process(id: str, n: int) -> Op[ProcessInfo]:
    return Op("GET", _process(id, n), f"reading process {n} of sandbox {id}",
              lambda answer: ProcessInfo.from_json(answer.json()), requires=_features.PROCESSES)


def process_output(id: str, n: int, offset: int, follow: bool) -> Op[ProcessOutput]:
    """``GET .../output``: the NDJSON answer read whole (with ``follow``, until the process ends)."""
    if offset < 0:
        raise InvalidRequest(f"an output offset is at least 0, not {offset}")

    def parse(answer: Answer) -> ProcessOutput:
        start = int(answer.headers.get("hearth-output-offset", offset))
        out, err = bytearray(), bytearray()
        last: dict[str, Any] = {}
        for line in answer.body.splitlines():
            if not line.strip():
                continue
            event = json.loads(line)
            if "stdout" in event:
                out += base64.b64decode(event["stdout"])
            elif "stderr" in event:
                err += base64.b64decode(event["stderr"])
            else:
                last = event
        return ProcessOutput(bytes(out), bytes(err), start, start + len(out) + len(err),
                             ended=bool(last), exit_code=last.get("exit_code"),
                             signal=last.get("signal"), error=last.get("error"))

    params = {"offset": str(offset), "follow": "true" if follow else "false"}
    return Op("GET", _process(id, n, "/output"), f"reading the output of process {n} of sandbox {id}",
              parse, params=params, requires=_features.PROCESSES)


def process_stdin(id: str, n: int, data: Optional[Data], close: bool) -> Op[None]:
    body: dict[str, Any] = {"close": close}
    if data is not None:
        body["data"] = base64.b64encode(data_bytes(data)).decode()
    return Op("POST", _process(id, n, "/stdin"), f"writing to process {n} of sandbox {id}", _none,
              json=body, requires=_features.PROCESSES)


def signal_process(id: str, n: int, signal: int) -> Op[None]:
    return Op("POST", _process(id, n, "/signal"), f"signalling process {n} of sandbox {id}", _none,
              json={"signal": int(signal)}, requires=_features.PROCESSES)


def remove_process(id: str, n: int) -> Op[None]:
    return Op("DELETE", _process(id, n), f"removing process {n} of sandbox {id}", _none,
              requires=_features.PROCESSES)


# --- exec --------------------------------------------------------------------------------------

def exec_body(
    command: Command,
    *,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    user: Optional[str],
    timeout: Optional[float],
    stdin: Optional[bytes] = None,
) -> dict[str, Any]:
    return _drop_none({
        "argv": argv(command),
        "env": dict(env or {}),
        "workdir": cwd,
        "user": user,
        "timeout_seconds": seconds(timeout, "timeout"),
        "stdin": None if stdin is None else base64.b64encode(stdin).decode(),
    })


def exec_stream(id: str, body: Mapping[str, Any]) -> Op[None]:
    """``POST .../exec``: an NDJSON stream of exec events (read line by line, not parsed here)."""
    return Op("POST", _sandbox(id, "/exec"), f"exec in sandbox {id}", _none, json=body)


def exec_ws_path(id: str) -> str:
    return _sandbox(id, "/exec/ws")


def remove_argv(path: str, recursive: bool) -> list[str]:
    """There is no remove route: ``files.remove`` runs ``rm`` in the guest. Exit 44 means absent."""
    script = 'if [ ! -e "$2" ] && [ ! -L "$2" ]; then exit 44; fi; exec rm $1 -- "$2"'
    return ["sh", "-c", script, "rm", "-rf" if recursive else "-f", path]


def check_removed(path: str, result: ExecResult) -> None:
    if result.exit_code == 44:
        raise NotFound(f"removing {path}: no such file or directory")
    if not result.ok:
        raise InvalidRequest(f"removing {path}: {result.stderr.strip() or result}")


def run(
    image: str,
    command: Command,
    *,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    user: Optional[str],
    timeout: Optional[float],
    stdin: Optional[Data],
    cpus: Optional[int],
    memory: Optional[Size],
    disk: Optional[Size],
) -> Op[RunResult]:
    body = exec_body(command, env=env, cwd=cwd, user=user, timeout=timeout,
                     stdin=None if stdin is None else data_bytes(stdin))
    body.update(_drop_none({"image": image, "cpus": cpus, "memory": size(memory),
                            "disk": size(disk)}))

    def parse(answer: Answer) -> RunResult:
        v = answer.json()
        out, err = base64.b64decode(v.get("stdout", "")), base64.b64decode(v.get("stderr", ""))
        return RunResult(
            exit_code=v.get("exit_code"),
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            signal=v.get("signal"),
            timed_out=bool(v.get("timed_out")),
            stdout_bytes=out,
            stderr_bytes=err,
            truncated=bool(v.get("truncated")),
            boot_ms=v.get("boot_ms"),
        )

    return Op("POST", "/v1/runs", f"running {body['argv'][0]} in {image}", parse, json=body)


# --- files -------------------------------------------------------------------------------------

def _is_json(answer: Answer) -> bool:
    return answer.headers.get("content-type", "").startswith("application/json")


def write_file(id: str, path: str, data: Data, mode: Optional[int]) -> Op[int]:
    params = {"path": path}
    if mode is not None:
        params["mode"] = format(mode, "o")
    return Op("PUT", _sandbox(id, "/files"), f"writing {path} in sandbox {id}",
              lambda a: int(a.json().get("bytes", 0)), params=params, content=data_bytes(data))


def read_file(id: str, path: str) -> Op[bytes]:
    def parse(answer: Answer) -> bytes:
        if _is_json(answer):
            raise InvalidRequest(f"reading {path}: it is a directory (use files.list)")
        return answer.body

    return Op("GET", _sandbox(id, "/files"), f"reading {path} in sandbox {id}", parse,
              params={"path": path})


def list_dir(id: str, path: str) -> Op[list[DirEntry]]:
    def parse(answer: Answer) -> list[DirEntry]:
        if not _is_json(answer):
            raise InvalidRequest(f"listing {path}: it is a file, not a directory (use files.read)")
        return [DirEntry.from_json(e) for e in answer.json().get("entries", [])]

    return Op("GET", _sandbox(id, "/files"), f"listing {path} in sandbox {id}", parse,
              params={"path": path})


# --- network and ports -------------------------------------------------------------------------

def _network(answer: Answer) -> NetworkView:
    return NetworkView.from_json(answer.json())


def get_network(id: str) -> Op[NetworkView]:
    return Op("GET", _sandbox(id, "/network"), f"reading sandbox {id}'s network", _network,
              requires=_features.NETWORK)


def set_network(id: str, body: Mapping[str, Any]) -> Op[NetworkView]:
    return Op("PUT", _sandbox(id, "/network"), f"setting sandbox {id}'s network policy",
              _network, json=dict(body), requires=_features.NETWORK)


def port_path(id: str, port: int, path: str) -> str:
    return _sandbox(id, f"/ports/{int(port)}/{path.lstrip('/')}")
