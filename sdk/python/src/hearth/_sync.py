"""The synchronous flavour: :class:`Client` moves the bytes of the shared :mod:`hearth._ops` calls
over httpx (and exec WebSockets with ``websockets.sync``); :class:`Sandbox` and its parts are thin
shims over those calls. Background execs read their WebSocket on a daemon thread, so their
callbacks run on that thread.
"""

from __future__ import annotations

import builtins
import json
import signal as signals
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Optional, TypeVar, Union, overload

import httpx
import websockets.exceptions
import websockets.sync.client

from . import _ops
from ._config import Config
from ._exec_events import ExecEvents, OutputCallback
from ._features import PORTS, Features
from ._ops import Answer, Command, Data, Op, Policy, Size
from .errors import ConnectionFailed, ExecFailed, HearthError, NotFound, SandboxFailed, from_answer
from .models import (CodeResult, DirEntry, ExecResult, NetworkView, ProcessInfo, ProcessOutput,
                     RunResult, SandboxInfo)
from ._shared import (CONNECT_TIMEOUT, CREATE_TIMEOUT, POLL_INTERVAL, RECONNECT_FOR,
                      STDIN_INLINE_LIMIT, WS_MAX_SIZE, Reconnects, port_error, stdin_chunks,
                      ws_error)

T = TypeVar("T")


class Client:
    """One daemon, one token and a pool of HTTP connections. Sandboxes made without ``client=``
    get their own and close it with themselves; share one to reuse connections."""

    def __init__(self, host: Optional[str] = None, token: Optional[str] = None, *,
                 timeout: Optional[float] = None) -> None:
        """``host``/``token`` default to ``HEARTH_HOST``/``HEARTH_TOKEN``; ``timeout`` bounds each
        read (``None``: wait as long as the daemon takes, e.g. for a slow boot)."""
        self.config = Config.resolve(host, token)
        self._http = httpx.Client(base_url=self.config.base, headers=self.config.headers,
                                  timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT))
        self._features: Optional[Features] = None

    def features(self) -> Features:
        """The daemon's optional routes, from its ``/openapi.json`` (read once)."""
        if self._features is None:
            try:
                document = self._send(_ops.openapi())
            except NotFound:  # a daemon older than its OpenAPI document has none of them
                document = {}
            self._features = Features(document)
        return self._features

    def call(self, op: Op[T]) -> T:
        if op.requires is not None:
            self.features().require(op.requires)
        return self._send(op)

    def _send(self, op: Op[T]) -> T:
        self._check_open(op.what)
        try:
            r = self._http.request(op.method, op.path, json=op.json, params=op.params,
                                   content=op.content)
        except httpx.TransportError as e:
            raise ConnectionFailed(
                f"{op.what}: cannot reach the daemon at {self.config.base}: {e}") from e
        answer = Answer(r.status_code, r.headers, r.content)
        if r.status_code >= 400:
            raise from_answer(r.status_code, r.content, r.headers.get("retry-after"), op.what)
        return op.parse(answer)

    def exec(self, op: Op[None], events: ExecEvents) -> ExecResult:
        """Runs an NDJSON exec, feeding ``events`` as lines arrive."""
        self._check_open(op.what)
        try:
            with self._http.stream(op.method, op.path, json=op.json,
                                   timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT)) as r:
                if r.status_code >= 400:
                    body = r.read()
                    raise from_answer(r.status_code, body, r.headers.get("retry-after"), op.what)
                for line in r.iter_lines():
                    if line.strip() and events.feed(line):
                        break
        except httpx.TransportError as e:
            events.error(f"the connection to the daemon broke: {e}")
        return events.result()

    def _check_open(self, what: str) -> None:
        if self._http.is_closed:
            raise ConnectionFailed(f"{what}: this client is closed (a sandbox used after its "
                                   "`with` block, or after close())")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A raw request with the token (what ``sb.ports`` uses)."""
        self._check_open(f"{method} {path}")
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"{method} {path}: {e}") from e

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _client(host: Optional[str], token: Optional[str],
            client: Optional[Client]) -> tuple[Client, bool]:
    return (client, False) if client is not None else (Client(host, token), True)


class Sandbox:
    """A running sandbox. ``with Sandbox.create(...) as sb:`` deletes it when the block ends."""

    def __init__(self, info: SandboxInfo, client: Client, owns_client: bool = False) -> None:
        self.id = info.id
        self.info = info
        self._client = client
        self._owns_client = owns_client
        self.files = Files(self)
        self.network = Network(self)
        self.ports = Ports(self)
        self.processes = Processes(self)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, image={self.info.image!r}, state={self.info.state!r})"

    @classmethod
    def create(
        cls,
        image: str,
        *,
        cpus: Optional[int] = None,
        memory: Optional[Size] = None,
        disk: Optional[Size] = None,
        env: Optional[Mapping[str, str]] = None,
        ttl: Optional[float] = None,
        idle_timeout: Optional[float] = None,
        on_idle: Optional[str] = None,
        network: Optional[Policy] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        boot_timeout: float = CREATE_TIMEOUT,
        host: Optional[str] = None,
        token: Optional[str] = None,
        client: Optional[Client] = None,
    ) -> Sandbox:
        """Boots a sandbox of ``image`` and returns once it runs (:class:`SandboxFailed` if it
        fails to; it is deleted then). ``ttl``/``idle_timeout`` are seconds (``on_idle="pause"``:
        the idle timeout saves the sandbox to disk instead of ending it, and its next use resumes
        it); ``memory``/``disk``
        bytes or sizes like ``"512m"``; ``network`` a mode or a policy mapping; ``cwd``/``user``/
        ``env`` the defaults of every exec."""
        client, owned = _client(host, token, client)
        try:
            info = client.call(_ops.create(
                image, cpus=cpus, memory=memory, disk=disk, env=env, ttl=ttl,
                idle_timeout=idle_timeout, on_idle=on_idle, network=network, cwd=cwd, user=user,
                labels=labels))
            deadline = time.monotonic() + boot_timeout
            while not _ops.settled(info) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL)
                info = client.call(_ops.get(info.id))
            try:
                _ops.check_running(info)
            except SandboxFailed:
                _quietly(lambda: client.call(_ops.delete(info.id)))
                raise
            return cls(info, client, owned)
        except BaseException:
            if owned:
                client.close()
            raise

    @classmethod
    def connect(cls, id: str, *, host: Optional[str] = None, token: Optional[str] = None,
                client: Optional[Client] = None) -> Sandbox:
        """An existing sandbox by id (:class:`NotFound` if this tenant has none such)."""
        client, owned = _client(host, token, client)
        try:
            return cls(client.call(_ops.get(id)), client, owned)
        except BaseException:
            if owned:
                client.close()
            raise

    @staticmethod
    def list(*, host: Optional[str] = None, token: Optional[str] = None,
             client: Optional[Client] = None) -> builtins.list[SandboxInfo]:
        """This tenant's sandboxes, oldest first."""
        c, owned = _client(host, token, client)
        try:
            return c.call(_ops.list_all())
        finally:
            if owned:
                c.close()

    def refresh(self) -> SandboxInfo:
        """Reads the sandbox's record again (``self.info``) and returns it."""
        self.info = self._client.call(_ops.get(self.id))
        return self.info

    def delete(self) -> None:
        """Stops the sandbox and forgets it."""
        self._client.call(_ops.delete(self.id))

    kill = delete

    def close(self) -> None:
        """Closes the client this sandbox made for itself (the sandbox keeps running)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        try:
            self.delete()
        except NotFound:
            pass
        finally:
            self.close()

    @overload
    def exec(self, command: Command, *, env: Optional[Mapping[str, str]] = None,
             cwd: Optional[str] = None, user: Optional[str] = None,
             timeout: Optional[float] = None, stdin: Optional[Data] = None,
             on_stdout: Optional[OutputCallback] = None,
             on_stderr: Optional[OutputCallback] = None,
             background: Literal[False] = False) -> ExecResult: ...

    @overload
    def exec(self, command: Command, *, env: Optional[Mapping[str, str]] = None,
             cwd: Optional[str] = None, user: Optional[str] = None,
             timeout: Optional[float] = None, stdin: Optional[Data] = None,
             on_stdout: Optional[OutputCallback] = None,
             on_stderr: Optional[OutputCallback] = None,
             background: Literal[True]) -> ExecHandle: ...

    def exec(self, command: Command, *, env: Optional[Mapping[str, str]] = None,
             cwd: Optional[str] = None, user: Optional[str] = None,
             timeout: Optional[float] = None, stdin: Optional[Data] = None,
             on_stdout: Optional[OutputCallback] = None,
             on_stderr: Optional[OutputCallback] = None,
             background: bool = False) -> Union[ExecResult, ExecHandle]:
        """Runs ``command`` (an argv list, or a shell string run by ``sh -c``) and waits for it;
        ``on_stdout``/``on_stderr`` get its output as it comes. With ``background=True`` returns
        at once with an :class:`ExecHandle` (its stdin stays open until ``close_stdin()``).
        ``stdin`` (bytes, or str as UTF-8) is all of the command's input; without it the command
        reads nothing. ``timeout`` (seconds) kills the command's process tree."""
        events = ExecEvents(on_stdout, on_stderr, f"exec in sandbox {self.id}")
        data = None if stdin is None else _ops.data_bytes(stdin)
        if background or (data is not None and len(data) > STDIN_INLINE_LIMIT):
            body = _ops.exec_body(command, env=env, cwd=cwd, user=user, timeout=timeout)
            handle = ExecHandle._start(self._client, self.id, body, data, events)
            if background:
                return handle
            with handle:
                handle.close_stdin()
                return handle.wait()
        body = _ops.exec_body(command, env=env, cwd=cwd, user=user, timeout=timeout, stdin=data)
        return self._client.exec(_ops.exec_stream(self.id, body), events)

    def pause(self) -> None:
        """Pauses the sandbox (:class:`Unsupported` when the daemon cannot)."""
        self.info = self._client.call(_ops.pause(self.id)) or self.refresh()

    def resume(self) -> None:
        """Resumes a paused sandbox (:class:`Unsupported` when the daemon cannot)."""
        self.info = self._client.call(_ops.resume(self.id)) or self.refresh()

    def fork(self, count: int = 1) -> builtins.list[Sandbox]:
        """``count`` copies of this sandbox as it is now, sharing this sandbox's client (delete
        them yourself). :class:`Unsupported` when the daemon cannot fork."""
        return [Sandbox(info, self._client) for info in
                self._client.call(_ops.fork(self.id, count))]

    def run_code(self, code: str, language: str = "python", *,
                 timeout: Optional[float] = None) -> CodeResult:
        """Runs ``code`` in this sandbox's interpreter, which keeps its names between calls (one
        per sandbox, started by the first call; calls queue and run one at a time). The value of a
        trailing expression comes back as ``result`` (its ``repr``), an exception as ``error``.
        ``timeout`` (seconds, default the daemon's 60) interrupts the code with
        ``KeyboardInterrupt`` and keeps earlier state. :class:`Unsupported` on a daemon without
        the interpreter; :class:`InvalidRequest` for a language other than ``python``."""
        return self._client.call(_ops.run_code(self.id, code, language, timeout))

    def reset_code(self) -> None:
        """Ends this sandbox's interpreter; the next ``run_code`` starts a fresh one."""
        self._client.call(_ops.reset_code(self.id))


class Processes:
    """``sb.processes``: background processes, which run on after :meth:`start` answered; the
    daemon keeps the last 1 MiB of each one's output to read later (:meth:`output`) and keeps them
    across pauses, forks (each child gets its own copies) and daemon restarts."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def start(self, command: Command, *, env: Optional[Mapping[str, str]] = None,
              cwd: Optional[str] = None, user: Optional[str] = None,
              timeout: Optional[float] = None, stdin: bool = False,
              tag: Optional[str] = None,
              keep_awake: bool = False) -> ProcessInfo:
        """Starts ``command``; ``stdin=True`` keeps a pipe open for :meth:`send_stdin`, ``timeout``
        kills it after that many seconds, ``tag`` is a name of yours (at most 64 bytes).
        ``keep_awake=True`` keeps the sandbox from its idle timeout while it runs (a build you
        wait for; by default a background process does not, and reading it does).
        :class:`LimitReached` when the sandbox already runs 16."""
        body = _ops.process_body(command, env=env, cwd=cwd, user=user, timeout=timeout,
                                 stdin=stdin, tag=tag, keep_awake=keep_awake)
        return self._sb._client.call(_ops.start_process(self._sb.id, body))

    def list(self) -> builtins.list[ProcessInfo]:
        """Running and ended ones, oldest first (does not wake a sandbox its idle timeout paused)."""
        return self._sb._client.call(_ops.list_processes(self._sb.id))

    def get(self, id: int) -> ProcessInfo:
        return self._sb._client.call(_ops.get_process(self._sb.id, id))

    def output(self, id: int, offset: int = 0) -> ProcessOutput:
        """What is kept of its output from ``offset``; read on from the answer's ``end``."""
        return self._sb._client.call(_ops.process_output(self._sb.id, id, offset, False))

    def wait(self, id: int, offset: int = 0, *,
             reconnect: float = RECONNECT_FOR) -> ProcessOutput:
        """Waits for it to end; its output from ``offset`` on, and how it ended. A connection
        that breaks meanwhile (the daemon restarting) is made again for up to ``reconnect``
        seconds, reading from ``offset`` again: the daemon keeps the output across its restarts,
        so nothing is lost or read twice (0 raises :class:`ConnectionFailed` at the first break)."""
        retry = Reconnects(reconnect)
        while True:
            try:
                return self._sb._client.call(
                    _ops.process_output(self._sb.id, id, offset, True))
            except HearthError as e:
                pause = retry.after(e)
                if pause is None:
                    raise
                time.sleep(pause)

    def send_stdin(self, id: int, data: Data) -> None:
        self._sb._client.call(_ops.process_stdin(self._sb.id, id, data, False))

    def close_stdin(self, id: int) -> None:
        self._sb._client.call(_ops.process_stdin(self._sb.id, id, None, True))

    def signal(self, id: int, signal: int = signals.SIGTERM) -> None:
        self._sb._client.call(_ops.signal_process(self._sb.id, id, signal))

    def kill(self, id: int) -> None:
        """Kills it (its whole process tree) if it runs, and forgets it with its output."""
        self._sb._client.call(_ops.remove_process(self._sb.id, id))


class Files:
    """``sb.files``: files in and out of the sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def write(self, path: str, data: Data, *, mode: Optional[int] = None) -> int:
        """Writes ``data`` (str as UTF-8) to absolute ``path``, replacing it whole; returns the
        bytes written. ``mode`` is the permission bits (e.g. ``0o755``; default 0o644)."""
        return self._sb._client.call(_ops.write_file(self._sb.id, path, data, mode))

    def read(self, path: str) -> bytes:
        return self._sb._client.call(_ops.read_file(self._sb.id, path))

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def list(self, path: str) -> builtins.list[DirEntry]:
        return self._sb._client.call(_ops.list_dir(self._sb.id, path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file (a directory with ``recursive=True``); :class:`NotFound` if absent. The
        API has no remove route: this runs ``rm`` in the sandbox."""
        _ops.check_removed(path, self._sb.exec(_ops.remove_argv(path, recursive)))


class Network:
    """``sb.network``: the sandbox's egress policy (:class:`Unsupported` on a daemon without it)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def get(self) -> NetworkView:
        return self._sb._client.call(_ops.get_network(self._sb.id))

    def set(self, policy: Policy, *, allow: Optional[builtins.list[str]] = None,
            deny: Optional[builtins.list[str]] = None) -> NetworkView:
        """Replaces the policy while the sandbox runs: ``set("allow", allow=["pypi.org"])``."""
        body = _ops.policy(policy, allow, deny)
        return self._sb._client.call(_ops.set_network(self._sb.id, body))


class Ports:
    """``sb.ports``: HTTP to a port inside the sandbox, through the daemon (no guest network)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def url(self, port: int, path: str = "/") -> str:
        """The proxy URL of ``path`` on ``port``; requests to it need the token
        (``Authorization: Bearer``)."""
        return self._sb._client.config.url(_ops.port_path(self._sb.id, port, path))

    def request(self, port: int, method: str = "GET", path: str = "/",
                **kwargs: Any) -> httpx.Response:
        """One request to the guest's server (httpx keyword arguments: ``content``, ``json``,
        ``params``, ``headers``...); its answer as it came, whatever the status. Hearth's own
        refusals raise: :class:`PortClosed` when nothing listens, :class:`Conflict`, ..."""
        client = self._sb._client
        client.features().require(PORTS)
        response = client.request(method, _ops.port_path(self._sb.id, port, path), **kwargs)
        error = port_error(response.status_code, response.content,
                           response.headers.get("retry-after"), f"port {port}")
        if error is not None:
            raise error
        return response


class ExecHandle:
    """A command running in the background (``sb.exec(..., background=True)``), over the exec
    WebSocket. Closing it (or leaving its ``with`` block) before it ends kills the command."""

    def __init__(self, ws: websockets.sync.client.ClientConnection, events: ExecEvents) -> None:
        self._ws = ws
        self._events = events
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name="hearth-exec-reader")
        self._reader.start()

    @staticmethod
    def _start(client: Client, id: str, body: Mapping[str, Any], stdin: Optional[Data],
               events: ExecEvents) -> ExecHandle:
        what = f"exec in sandbox {id}"
        try:
            ws = websockets.sync.client.connect(
                client.config.ws_url(_ops.exec_ws_path(id)),
                additional_headers=client.config.headers, max_size=WS_MAX_SIZE,
                open_timeout=CONNECT_TIMEOUT, proxy=None).__enter__()
            # (entered, not used as a block: websockets >= 17.1 warns about the plain connection;
            # this handle closes it in `close()` or once the command ended)
        except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as e:
            raise ws_error(e, what, client.config.base) from e
        try:
            ws.send(json.dumps(body))
        except websockets.exceptions.ConnectionClosed as e:
            raise ExecFailed(f"{what}: the connection closed at once: {e}") from e
        handle = ExecHandle(ws, events)
        if stdin is not None:
            handle.send_stdin(stdin)
        return handle

    def _read(self) -> None:
        try:
            for message in self._ws:
                if self._events.feed(message):
                    break
        except (websockets.exceptions.ConnectionClosed, ExecFailed) as e:
            self._events.error(f"the exec's connection broke: {e}")
        finally:
            self._events.error("the exec's connection closed before the command ended")
            self._ws.close()

    @property
    def done(self) -> bool:
        return not self._reader.is_alive()

    def wait(self, timeout: Optional[float] = None) -> ExecResult:
        """Waits for the command to end (``TimeoutError`` after ``timeout`` seconds, the command
        still running) and returns its result."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise TimeoutError(f"the command still runs after {timeout} s")
        return self._events.result()

    def _send(self, message: Union[str, bytes]) -> None:
        try:
            self._ws.send(message)
        except websockets.exceptions.ConnectionClosed as e:
            raise ExecFailed(f"the command has ended (its connection is closed): {e}") from e

    def send_stdin(self, data: Data) -> None:
        """Writes to the command's stdin (str as UTF-8)."""
        for chunk in stdin_chunks(_ops.data_bytes(data)):
            self._send(chunk)

    def close_stdin(self) -> None:
        """Closes the command's stdin: it reads end of file."""
        self._send(json.dumps({"close_stdin": True}))

    def kill(self, signal: int = signals.SIGKILL) -> None:
        """Sends ``signal`` (default SIGKILL) to the command."""
        self._send(json.dumps({"signal": int(signal)}))

    def close(self) -> None:
        self._ws.close()
        self._reader.join()

    def __enter__(self) -> ExecHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run(
    image: str,
    command: Command,
    *,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    user: Optional[str] = None,
    timeout: Optional[float] = None,
    stdin: Optional[Data] = None,
    cpus: Optional[int] = None,
    memory: Optional[Size] = None,
    disk: Optional[Size] = None,
    host: Optional[str] = None,
    token: Optional[str] = None,
    client: Optional[Client] = None,
) -> RunResult:
    """One command in a throwaway sandbox (``POST /v1/runs``): boots ``image``, runs ``command``
    (argv list or shell string), deletes the sandbox, returns the output."""
    c, owned = _client(host, token, client)
    try:
        return c.call(_ops.run(image, command, env=env, cwd=cwd, user=user, timeout=timeout,
                               stdin=stdin, cpus=cpus, memory=memory, disk=disk))
    finally:
        if owned:
            c.close()


def _quietly(action: Callable[[], object]) -> None:
    """Runs a clean-up step whose failure must not replace the error in flight."""
    try:
        action()
    except HearthError:
        pass
