"""Background processes (``sb.processes``) against the real daemon, on the session's shared busybox
sandbox: one runs on after its start answered and its output is read later and from an offset;
stdin written and closed; waiting for the end; a signal; kill forgets; the asyncio flavour;
waiting goes on through a connection cut mid-answer (a relay in front of the daemon cuts it, as a
daemon restart does)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import urllib.parse

import pytest

import hearth
from hearth._shared import Reconnects
from hearth.errors import from_answer

COUNTER = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done"


def _output_until(sb: hearth.Sandbox, id: int, needle: str) -> hearth.ProcessOutput:
    deadline = time.monotonic() + 60
    while True:
        out = sb.processes.output(id)
        if needle in out.text or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def test_a_process_runs_on_and_its_output_is_read_later(sandbox: hearth.Sandbox) -> None:
    p = sandbox.processes.start(COUNTER, tag="counter")
    assert (p.running, p.tag, p.argv, p.keep_awake) == (True, "counter", ["sh", "-c", COUNTER],
                                                         False), p
    out = _output_until(sandbox, p.id, "tick 2")
    assert out.text.startswith("tick 0\ntick 1\n"), out
    assert (out.start, out.ended) == (0, False)
    # From the offset reached: only what came since.
    later = sandbox.processes.output(p.id, offset=out.end)
    assert later.start == out.end and not later.text.startswith("tick 0"), later
    assert p.id in [q.id for q in sandbox.processes.list()]
    sandbox.processes.signal(p.id)
    ended = sandbox.processes.wait(p.id, offset=out.end)
    assert (ended.ended, ended.signal) == (True, 15), ended
    assert sandbox.processes.get(p.id).running is False
    sandbox.processes.kill(p.id)
    with pytest.raises(hearth.NotFound):
        sandbox.processes.get(p.id)


def test_stdin_and_the_exit_code(sandbox: hearth.Sandbox) -> None:
    p = sandbox.processes.start(["sh", "-c", "read line; echo got $line; echo err >&2; exit 4"],
                                stdin=True)
    sandbox.processes.send_stdin(p.id, "hello\n")
    sandbox.processes.close_stdin(p.id)
    out = sandbox.processes.wait(p.id)
    assert (out.stdout, out.stderr, out.exit_code) == (b"got hello\n", b"err\n", 4), out
    with pytest.raises(hearth.Conflict):
        sandbox.processes.send_stdin(p.id, "late")
    with pytest.raises(hearth.InvalidRequest):
        sandbox.processes.start("true", tag="x" * 65)


def test_the_async_flavour(sandbox: hearth.Sandbox) -> None:
    async def main() -> hearth.ProcessOutput:
        async with hearth.AsyncClient() as client:
            sb = await hearth.AsyncSandbox.connect(sandbox.id, client=client)
            p = await sb.processes.start("echo async; exit 2")
            return await sb.processes.wait(p.id)

    out = asyncio.run(main())
    assert (out.stdout, out.exit_code) == (b"async\n", 2), out


class _CuttingRelay:
    """A TCP relay to the daemon whose :meth:`cut` breaks every connection open through it, as a
    daemon restart does; new connections go through again."""

    def __init__(self, upstream: str) -> None:
        url = urllib.parse.urlsplit(upstream)
        self._upstream = (url.hostname or "127.0.0.1", url.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cuts = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            open_now, self._open = self._open, []
            self.cuts += 1
        for s in open_now:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()
        self.cut()


def test_waiting_goes_on_through_a_broken_connection(sandbox: hearth.Sandbox) -> None:
    relay = _CuttingRelay(os.environ["HEARTH_HOST"])
    try:
        with hearth.Client(host=relay.url) as client:
            sb = hearth.Sandbox.connect(sandbox.id, client=client)
            script = "echo before; sleep 3; echo after; exit 7"
            p = sb.processes.start(script)
            threading.Timer(1.0, relay.cut).start()
            out = sb.processes.wait(p.id)
            assert relay.cuts == 1
            assert (out.stdout, out.start, out.exit_code) == (b"before\nafter\n", 0, 7), out
            # Without reconnecting, the same cut is an error.
            p = sb.processes.start(script)
            threading.Timer(1.0, relay.cut).start()
            with pytest.raises(hearth.ConnectionFailed):
                sb.processes.wait(p.id, reconnect=0)
            assert relay.cuts == 2
    finally:
        relay.close()


def test_what_a_daemon_restart_looks_like_is_retried_and_nothing_else() -> None:
    retry = Reconnects(60)
    node_down = from_answer(
        502, b'{"error": "node n1 is not answering", "code": "node_unreachable"}')
    assert isinstance(node_down, hearth.ConnectionFailed), node_down
    assert retry.after(node_down) is not None
    stopping = from_answer(503, b'{"error": "stopping", "code": "shutting_down"}')
    assert retry.after(stopping) is not None
    for other in (b'{"error": "no such process", "code": "not_found"}',
                  b'{"error": "full", "code": "capacity"}'):
        assert retry.after(from_answer(404, other)) is None
    assert Reconnects(0).after(node_down) is None
