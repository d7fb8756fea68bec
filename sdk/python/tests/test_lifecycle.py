"""What boots its own VMs: a sandbox deleted by its ``async with`` block (then NotFound, also over
the exec WebSocket), the tenant's quota refusing a second one, tenant isolation, and a one-shot
``hearth.run``."""

from __future__ import annotations

import asyncio

import pytest

import hearth


def test_a_with_block_deletes_its_sandbox_and_quota_refuses_a_second(
        image: str, quota_token: str, sandbox: hearth.Sandbox) -> None:
    async def main() -> str:
        async with hearth.AsyncSandbox.create(image, token=quota_token, ttl=600,
                                              idle_timeout=600, on_idle="pause") as sb:
            assert (sb.info.state, sb.info.on_idle) == ("running", "pause")
            assert (await sb.exec(["echo", "mine"])).stdout == "mine\n"
            # Its quota is one sandbox: the second is refused before anything boots.
            with pytest.raises(hearth.QuotaExceeded):
                await hearth.AsyncSandbox.create(image, token=quota_token)
            # Tenants see only their own sandboxes.
            with pytest.raises(hearth.NotFound):
                await hearth.AsyncSandbox.connect(sandbox.id, token=quota_token)
            with pytest.raises(hearth.NotFound):
                hearth.Sandbox.connect(sb.id)
            return sb.id

    gone = asyncio.run(main())
    with pytest.raises(hearth.NotFound):
        hearth.Sandbox.connect(gone, token=quota_token)
    assert gone not in [s.id for s in hearth.Sandbox.list(token=quota_token)]
    # A handle on a deleted sandbox: every route answers NotFound, the WebSocket's too.
    stale = hearth.Sandbox(hearth.SandboxInfo.from_json({"id": gone}),
                           hearth.Client(token=quota_token), owns_client=True)
    with stale:
        with pytest.raises(hearth.NotFound):
            stale.exec("true")
        with pytest.raises(hearth.NotFound):
            stale.exec("true", background=True)
        with pytest.raises(hearth.NotFound):
            stale.files.read("/etc/hostname")
        with pytest.raises(hearth.NotFound):
            stale.delete()


def test_run_is_a_one_shot(image: str) -> None:
    r = hearth.run(image, "cat; echo to-stderr >&2; exit 7", stdin="piped", env={"A": "b"})
    assert (r.exit_code, r.stdout, r.stderr, r.truncated) == (7, "piped", "to-stderr\n", False)
    assert r.boot_ms is not None
