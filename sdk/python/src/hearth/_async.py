"""The asyncio flavour: the same calls as :mod:`hearth._sync` (built by :mod:`hearth._ops`) over
``httpx.AsyncClient`` and ``websockets.asyncio``. Background execs read their WebSocket in an
asyncio task, so their callbacks run on the event loop (keep them quick)."""

from __future__ import annotations

import asyncio
import builtins
import json
import signal as signals
import time
from collections.abc import Callable, Coroutine, Generator, Mapping
from types import TracebackType
from typing import Any, Literal, Optional, TypeVar, Union, overload

import httpx
import websockets.asyncio.client
import websockets.exceptions

from . import _ops
from ._config import Config
from ._exec_events import ExecEvents, OutputCallback
from ._features import PORTS, Features
from ._ops import Answer, Command, Data, Op, Policy, Size
from ._shared import (CONNECT_TIMEOUT, CREATE_TIMEOUT, POLL_INTERVAL, RECONNECT_FOR,
                      STDIN_INLINE_LIMIT, WS_MAX_SIZE, Reconnects, port_error, stdin_chunks,
                      ws_error)
from .errors import ConnectionFailed, ExecFailed, HearthError, NotFound, SandboxFailed, from_answer
from .models import (CodeResult, DirEntry, ExecResult, NetworkView, ProcessInfo, ProcessOutput,
                     RunResult, SandboxInfo)

T = TypeVar("T")


class AsyncClient:
    """:class:`hearth.Client` for asyncio."""

    def __init__(self, host: Optional[str] = None, token: Optional[str] = None, *,
                 timeout: Optional[float] = None) -> None:
        self.config = Config.resolve(host, token)
        self._http = httpx.AsyncClient(base_url=self.config.base, headers=self.config.headers,
                                       timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT))
        self._features: Optional[Features] = None

    async def features(self) -> Features:
        """The daemon's optional routes, from its ``/openapi.json`` (read once)."""
        if self._features is None:
            try:
                document = await self._send(_ops.openapi())
            except NotFound:  # a daemon older than its OpenAPI document has none of them
                document = {}
            self._features = Features(document)
        return self._features

    async def call(self, op: Op[T]) -> T:
        if op.requires is not None:
            (await self.features()).require(op.requires)
        return await self._send(op)

    async def _send(self, op: Op[T]) -> T:
        self._check_open(op.what)
        try:
            r = await self._http.request(op.method, op.path, json=op.json, params=op.params,
                                         content=op.content)
        except httpx.TransportError as e:
            raise ConnectionFailed(
                f"{op.what}: cannot reach the daemon at {self.config.base}: {e}") from e
        answer = Answer(r.status_code, r.headers, r.content)
        if r.status_code >= 400:
            raise from_answer(r.status_code, r.content, r.headers.get("retry-after"), op.what)
        return op.parse(answer)

    async def exec(self, op: Op[None], events: ExecEvents) -> ExecResult:
        """Runs an NDJSON exec, feeding ``events`` as lines arrive."""
        self._check_open(op.what)
        try:
            async with self._http.stream(
                    op.method, op.path, json=op.json,
                    timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT)) as r:
                if r.status_code >= 400:
                    body = await r.aread()
                    raise from_answer(r.status_code, body, r.headers.get("retry-after"), op.what)
                async for line in r.aiter_lines():
                    if line.strip() and events.feed(line):
                        break
        except httpx.TransportError as e:
            events.error(f"the connection to the daemon broke: {e}")
        return events.result()

    def _check_open(self, what: str) -> None:
        if self._http.is_closed:
            raise ConnectionFailed(f"{what}: this client is closed (a sandbox used after its "
                                   "`with` block, or after close())")

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self._check_open(f"{method} {path}")
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"{method} {path}: {e}") from e

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _client(host: Optional[str], token: Optional[str],
            client: Optional[AsyncClient]) -> tuple[AsyncClient, bool]:
    return (client, False) if client is not None else (AsyncClient(host, token), True)


class _Creating:
    """What ``AsyncSandbox.create`` returns: ``await`` it for the sandbox, or use it in
    ``async with`` to have the sandbox deleted when the block ends."""

    def __init__(self, coro: Coroutine[Any, Any, AsyncSandbox]) -> None:
        self._coro = coro
        self._sandbox: Optional[AsyncSandbox] = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._coro.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._coro
        return self._sandbox

    async def __aexit__(self, exc_type: Optional[type[BaseException]],
                        exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(exc_type, exc, tb)


class AsyncSandbox:
    """:class:`hearth.Sandbox` for asyncio: the same methods, awaited.
    ``async with AsyncSandbox.create(...) as sb:`` deletes it when the block ends."""

    def __init__(self, info: SandboxInfo, client: AsyncClient, owns_client: bool = False) -> None:
        self.id = info.id
        self.info = info
        self._client = client
        self._owns_client = owns_client
        self.files = AsyncFiles(self)
        self.network = AsyncNetwork(self)
        self.ports = AsyncPorts(self)
        self.processes = AsyncProcesses(self)

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, image={self.info.image!r}, state={self.info.state!r})"

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
        client: Optional[AsyncClient] = None,
    ) -> _Creating:
        """See :meth:`hearth.Sandbox.create`."""
        op = _ops.create(image, cpus=cpus, memory=memory, disk=disk, env=env, ttl=ttl,
                         idle_timeout=idle_timeout, on_idle=on_idle, network=network, cwd=cwd,
                         user=user, labels=labels)
        return _Creating(cls._create(op, boot_timeout, host, token, client))

    @classmethod
    async def _create(cls, op: Op[SandboxInfo], boot_timeout: float, host: Optional[str],
                      token: Optional[str], client: Optional[AsyncClient]) -> AsyncSandbox:
        c, owned = _client(host, token, client)
        try:
            info = await c.call(op)
            deadline = time.monotonic() + boot_timeout
            while not _ops.settled(info) and time.monotonic() < deadline:
                await asyncio.sleep(POLL_INTERVAL)
                info = await c.call(_ops.get(info.id))
            try:
                _ops.check_running(info)
            except SandboxFailed:
                await _quietly(lambda: c.call(_ops.delete(info.id)))
                raise
            return cls(info, c, owned)
        except BaseException:
            if owned:
                await c.aclose()
            raise

    @classmethod
    async def connect(cls, id: str, *, host: Optional[str] = None, token: Optional[str] = None,
                      client: Optional[AsyncClient] = None) -> AsyncSandbox:
        c, owned = _client(host, token, client)
        try:
            return cls(await c.call(_ops.get(id)), c, owned)
        except BaseException:
            if owned:
                await c.aclose()
            raise

    @staticmethod
    async def list(*, host: Optional[str] = None, token: Optional[str] = None,
                   client: Optional[AsyncClient] = None) -> builtins.list[SandboxInfo]:
        c, owned = _client(host, token, client)
        try:
            return await c.call(_ops.list_all())
        finally:
            if owned:
                await c.aclose()

    async def refresh(self) -> SandboxInfo:
        self.info = await self._client.call(_ops.get(self.id))
        return self.info

    async def delete(self) -> None:
        await self._client.call(_ops.delete(self.id))

    kill = delete

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, exc_type: Optional[type[BaseException]],
                        exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        try:
            await self.delete()
        except NotFound:
            pass
        finally:
            await self.close()

    @overload
    async def exec(self, command: Command, *, env: Optional[Mapping[str, str]] = None,
                   cwd: Optional[str] = None, user: Optional[str] = None,
                   timeout: Optional[float] = None, stdin: Optional[Data] = None,
                   on_stdout: Optional[OutputCallback] = None,
                   on_stderr: Optional[OutputCallback] = None,
                   background: Literal[False] = False) -> ExecResult: ...

    @overload
    async def exec(self, command: Command, *, env: Optional[Mapping[str, str]] = None,
                   cwd: Optional[str] = None, user: Optional[str] = None,
                   timeout: Optional[float] = None, stdin: Optional[Data] = None,
                   on_stdout: Optional[OutputCallback] = None,
                   on_stderr: Optional[OutputCallback] = None,
                   background: Literal[True]) -> AsyncExecHandle: ...

    async def exec(self, command: Command, *, env: Optional[Mapping[str, str]] = None,
                   cwd: Optional[str] = None, user: Optional[str] = None,
                   timeout: Optional[float] = None, stdin: Optional[Data] = None,
                   on_stdout: Optional[OutputCallback] = None,
                   on_stderr: Optional[OutputCallback] = None,
                   background: bool = False) -> Union[ExecResult, AsyncExecHandle]:
        """See :meth:`hearth.Sandbox.exec`."""
        events = ExecEvents(on_stdout, on_stderr, f"exec in sandbox {self.id}")
        data = None if stdin is None else _ops.data_bytes(stdin)
        if background or (data is not None and len(data) > STDIN_INLINE_LIMIT):
            body = _ops.exec_body(command, env=env, cwd=cwd, user=user, timeout=timeout)
            handle = await AsyncExecHandle._start(self._client, self.id, body, data, events)
            if background:
                return handle
            async with handle:
                await handle.close_stdin()
                return await handle.wait()
        body = _ops.exec_body(command, env=env, cwd=cwd, user=user, timeout=timeout, stdin=data)
        return await self._client.exec(_ops.exec_stream(self.id, body), events)

    async def pause(self) -> None:
        info = await self._client.call(_ops.pause(self.id))
        self.info = info or await self.refresh()

    async def resume(self) -> None:
        info = await self._client.call(_ops.resume(self.id))
        self.info = info or await self.refresh()

    async def fork(self, count: int = 1) -> builtins.list[AsyncSandbox]:
        return [AsyncSandbox(info, self._client) for info in
                await self._client.call(_ops.fork(self.id, count))]

    async def run_code(self, code: str, language: str = "python", *,
                       timeout: Optional[float] = None) -> CodeResult:
        """Like :meth:`Sandbox.run_code`: code in this sandbox's long-lived interpreter."""
        return await self._client.call(_ops.run_code(self.id, code, language, timeout))

    async def reset_code(self) -> None:
        """Ends this sandbox's interpreter; the next ``run_code`` starts a fresh one."""
        await self._client.call(_ops.reset_code(self.id))


class AsyncProcesses:
    """``sb.processes`` of an :class:`AsyncSandbox`; see :class:`hearth._sync.Processes`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def start(self, command: Command, *, env: Optional[Mapping[str, str]] = None,
                    cwd: Optional[str] = None, user: Optional[str] = None,
                    timeout: Optional[float] = None, stdin: bool = False,
                    tag: Optional[str] = None,
                    keep_awake: bool = False) -> ProcessInfo:
        """Starts ``command``; ``stdin=True`` keeps a pipe open for :meth:`send_stdin`, ``timeout``
        kills it after that many seconds, ``tag`` is a name of yours (at most 64 bytes).
        :class:`LimitReached` when the sandbox already runs 16."""
        body = _ops.process_body(command, env=env, cwd=cwd, user=user, timeout=timeout,
                                 stdin=stdin, tag=tag, keep_awake=keep_awake)
        return await self._sb._client.call(_ops.start_process(self._sb.id, body))

    async def list(self) -> builtins.list[ProcessInfo]:
        """Running and ended ones, oldest first (does not wake a sandbox its idle timeout paused)."""
        return await self._sb._client.call(_ops.list_processes(self._sb.id))

    async def get(self, id: int) -> ProcessInfo:
        return await self._sb._client.call(_ops.get_process(self._sb.id, id))

    async def output(self, id: int, offset: int = 0) -> ProcessOutput:
        """What is kept of its output from ``offset``; read on from the answer's ``end``."""
        return await self._sb._client.call(_ops.process_output(self._sb.id, id, offset, False))

    async def wait(self, id: int, offset: int = 0, *,
                   reconnect: float = RECONNECT_FOR) -> ProcessOutput:
        """Waits for it to end, connecting again through daemon restarts (see
        :meth:`hearth._sync.Processes.wait`)."""
        retry = Reconnects(reconnect)
        while True:
            try:
                return await self._sb._client.call(
                    _ops.process_output(self._sb.id, id, offset, True))
            except HearthError as e:
                pause = retry.after(e)
                if pause is None:
                    raise
                await asyncio.sleep(pause)

    async def send_stdin(self, id: int, data: Data) -> None:
        await self._sb._client.call(_ops.process_stdin(self._sb.id, id, data, False))

    async def close_stdin(self, id: int) -> None:
        await self._sb._client.call(_ops.process_stdin(self._sb.id, id, None, True))

    async def signal(self, id: int, signal: int = signals.SIGTERM) -> None:
        await self._sb._client.call(_ops.signal_process(self._sb.id, id, signal))

    async def kill(self, id: int) -> None:
        """Kills it (its whole process tree) if it runs, and forgets it with its output."""
        await self._sb._client.call(_ops.remove_process(self._sb.id, id))


class AsyncFiles:
    """``sb.files`` of an :class:`AsyncSandbox`; see :class:`hearth._sync.Files`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def write(self, path: str, data: Data, *, mode: Optional[int] = None) -> int:
        return await self._sb._client.call(_ops.write_file(self._sb.id, path, data, mode))

    async def read(self, path: str) -> bytes:
        return await self._sb._client.call(_ops.read_file(self._sb.id, path))

    async def read_text(self, path: str) -> str:
        return (await self.read(path)).decode()

    async def list(self, path: str) -> builtins.list[DirEntry]:
        return await self._sb._client.call(_ops.list_dir(self._sb.id, path))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        _ops.check_removed(path, await self._sb.exec(_ops.remove_argv(path, recursive)))


class AsyncNetwork:
    """``sb.network`` of an :class:`AsyncSandbox`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def get(self) -> NetworkView:
        return await self._sb._client.call(_ops.get_network(self._sb.id))

    async def set(self, policy: Policy, *, allow: Optional[builtins.list[str]] = None,
                  deny: Optional[builtins.list[str]] = None) -> NetworkView:
        body = _ops.policy(policy, allow, deny)
        return await self._sb._client.call(_ops.set_network(self._sb.id, body))


class AsyncPorts:
    """``sb.ports`` of an :class:`AsyncSandbox`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    def url(self, port: int, path: str = "/") -> str:
        return self._sb._client.config.url(_ops.port_path(self._sb.id, port, path))

    async def request(self, port: int, method: str = "GET", path: str = "/",
                      **kwargs: Any) -> httpx.Response:
        client = self._sb._client
        (await client.features()).require(PORTS)
        response = await client.request(method, _ops.port_path(self._sb.id, port, path),
                                        **kwargs)
        error = port_error(response.status_code, response.content,
                           response.headers.get("retry-after"), f"port {port}")
        if error is not None:
            raise error
        return response


class AsyncExecHandle:
    """:class:`hearth.ExecHandle` for asyncio."""

    def __init__(self, ws: websockets.asyncio.client.ClientConnection,
                 events: ExecEvents) -> None:
        self._ws = ws
        self._events = events
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @staticmethod
    async def _start(client: AsyncClient, id: str, body: Mapping[str, Any],
                     stdin: Optional[Data], events: ExecEvents) -> AsyncExecHandle:
        what = f"exec in sandbox {id}"
        try:
            ws = await websockets.asyncio.client.connect(
                client.config.ws_url(_ops.exec_ws_path(id)),
                additional_headers=client.config.headers, max_size=WS_MAX_SIZE,
                open_timeout=CONNECT_TIMEOUT, proxy=None)
        except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as e:
            raise ws_error(e, what, client.config.base) from e
        try:
            await ws.send(json.dumps(body))
        except websockets.exceptions.ConnectionClosed as e:
            raise ExecFailed(f"{what}: the connection closed at once: {e}") from e
        handle = AsyncExecHandle(ws, events)
        if stdin is not None:
            await handle.send_stdin(stdin)
        return handle

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if self._events.feed(message):
                    break
        except (websockets.exceptions.ConnectionClosed, ExecFailed) as e:
            self._events.error(f"the exec's connection broke: {e}")
        finally:
            self._events.error("the exec's connection closed before the command ended")
            await self._ws.close()

    @property
    def done(self) -> bool:
        return self._reader.done()

    async def wait(self, timeout: Optional[float] = None) -> ExecResult:
        """Waits for the command to end (``TimeoutError`` after ``timeout`` seconds, the command
        still running) and returns its result."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the command still runs after {timeout} s") from None
        return self._events.result()

    async def _send(self, message: Union[str, bytes]) -> None:
        try:
            await self._ws.send(message)
        except websockets.exceptions.ConnectionClosed as e:
            raise ExecFailed(f"the command has ended (its connection is closed): {e}") from e

    async def send_stdin(self, data: Data) -> None:
        for chunk in stdin_chunks(_ops.data_bytes(data)):
            await self._send(chunk)

    async def close_stdin(self) -> None:
        await self._send(json.dumps({"close_stdin": True}))

    async def kill(self, signal: int = signals.SIGKILL) -> None:
        await self._send(json.dumps({"signal": int(signal)}))

    async def close(self) -> None:
        await self._ws.close()
        await self._reader

    async def __aenter__(self) -> AsyncExecHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def run_async(
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
    client: Optional[AsyncClient] = None,
) -> RunResult:
    """:func:`hearth.run` for asyncio."""
    c, owned = _client(host, token, client)
    try:
        return await c.call(_ops.run(image, command, env=env, cwd=cwd, user=user,
                                     timeout=timeout, stdin=stdin, cpus=cpus, memory=memory,
                                     disk=disk))
    finally:
        if owned:
            await c.aclose()


async def _quietly(action: Callable[[], Coroutine[Any, Any, object]]) -> None:
    """Runs a clean-up step whose failure must not replace the error in flight."""
    try:
        await action()
    except HearthError:
        pass
