"""The asyncio flavour against the real daemon, on the session's sandbox (connected by id)."""

from __future__ import annotations

import asyncio

import pytest

import hearth


def test_async_exec_background_and_files(sandbox: hearth.Sandbox) -> None:
    async def main() -> None:
        async with hearth.AsyncClient() as client:
            sb = await hearth.AsyncSandbox.connect(sandbox.id, client=client)
            r = await sb.exec("echo $GREETING; exit 5")
            assert (r.exit_code, r.stdout) == (5, "hello\n")

            lines: list[str] = []
            handle = await sb.exec(["cat"], background=True, on_stdout=lines.append)
            await handle.send_stdin("ping\n")
            await handle.close_stdin()
            r = await handle.wait(timeout=60)
            assert r.exit_code == 0 and r.stdout == "ping\n" == "".join(lines)

            sleeper = await sb.exec("exec sleep 600", background=True)
            with pytest.raises(TimeoutError):
                await sleeper.wait(timeout=1)
            await sleeper.kill(15)
            assert (await sleeper.wait(timeout=60)).signal == 15

            await sb.files.write("/tmp/async.bin", b"\x00\xffasync")
            assert await sb.files.read("/tmp/async.bin") == b"\x00\xffasync"
            assert "async.bin" in [e.name for e in await sb.files.list("/tmp")]
            await sb.files.remove("/tmp/async.bin")
            with pytest.raises(hearth.NotFound):
                await sb.files.read("/tmp/async.bin")
            assert (await sb.network.get()).policy["mode"] in ("none", "allow")
            assert sandbox.id in [s.id for s in await hearth.AsyncSandbox.list(client=client)]

    asyncio.run(main())


def test_async_errors_are_typed(sandbox: hearth.Sandbox) -> None:
    async def main() -> None:
        with pytest.raises(hearth.Unauthorized):
            await hearth.AsyncSandbox.connect(sandbox.id, token="not-a-token")
        with pytest.raises(hearth.NotFound):
            await hearth.AsyncSandbox.connect("0000000000000000")

    asyncio.run(main())
