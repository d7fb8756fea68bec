"""Drives `hearth mcp` with the official Python MCP client (`mcp` on PyPI), as an agent's host
would. Run by crates/hearth/tests/mcp.rs; each mode prints one JSON line for the Rust side:

  stdio   `hearth mcp` as a child over stdio against the daemon in HEARTH_HOST/HEARTH_TOKEN: list
          tools, create a sandbox of HEARTH_TEST_IMAGE, run code twice keeping state, write, read
          and list files, exec echo, fork it (pause and resume the copy), destroy it; then
          create one more (not kept) and disconnect. Prints {"destroyed": ID, "left": ID,
          "forked": ID}: the Rust side checks all are gone.
  http    URL of a `hearth mcp --http`: a session (initialize handshake) that lists tools, calls
          one and creates a sandbox, then closes; and a sessionless (2026 protocol) client that
          lists tools, calls one and creates a sandbox. Prints {"left": ID, "sessionless": ID}.
  local   `hearth mcp -- SERVE_FLAGS...` (in-process daemon; flags in argv after `local`): create a
          sandbox of HEARTH_TEST_IMAGE, exec echo in it, disconnect. Prints {"left": ID}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import CallToolResult, TextContent

CORE_TOOLS = {
    "create_sandbox",
    "run_code",
    "exec",
    "write_file",
    "read_file",
    "list_files",
    "destroy_sandbox",
}


def log(*args: Any) -> None:
    print("client.py:", *args, file=sys.stderr, flush=True)


def text(result: CallToolResult) -> str:
    """A result's text content."""
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


async def call(client: Client, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Calls a tool that must succeed; returns its structured result."""
    result = await client.call_tool(name, args)
    shown = text(result)
    assert not result.is_error, f"{name}({args}) failed: {shown}"
    assert isinstance(result.structured_content, dict), f"{name}: no structured result: {shown}"
    # The text content says the same as the structured one (what models without structured
    # output read).
    assert json.loads(shown) == result.structured_content, shown
    log(name, "->", shown[:300])
    return result.structured_content


async def check_tools(client: Client) -> None:
    listed = await client.list_tools()
    names = {tool.name for tool in listed.tools}
    assert CORE_TOOLS <= names, f"missing tools: {CORE_TOOLS - names}"
    for tool in listed.tools:
        schema = tool.input_schema
        assert schema.get("type") == "object", f"{tool.name}: input schema {schema}"
        assert tool.description and len(tool.description) > 40, f"{tool.name}: no description"
    create = next(t for t in listed.tools if t.name == "create_sandbox").input_schema
    assert "image" in create["properties"] and "keep" in create["properties"], create
    assert "image" in create.get("required", []), create


def server(args: list[str]) -> StdioServerParameters:
    env = {k: v for k, v in os.environ.items() if k.startswith(("HEARTH_", "RUST_"))}
    return StdioServerParameters(command=os.environ["HEARTH_BIN"], args=["mcp", *args], env=env)


async def stdio() -> None:
    image = os.environ["HEARTH_TEST_IMAGE"]
    async with Client(server([])) as client:
        await check_tools(client)
        sb = await call(client, "create_sandbox", {"image": image})
        sid = sb["sandbox_id"]
        assert sb["state"] == "running", sb
        assert "session ends" in sb["lifetime"], sb

        first = await call(client, "run_code", {"sandbox_id": sid, "code": "x = 20\nprint('set')\nx + 1"})
        assert first["stdout"] == "set\n" and first["result"] == "21" and first["error"] is None, first
        second = await call(client, "run_code", {"sandbox_id": sid, "code": "x * 2"})
        assert second["result"] == "40", f"state not kept between calls: {second}"
        boom = await call(client, "run_code", {"sandbox_id": sid, "code": "1/0"})
        assert boom["error"]["name"] == "ZeroDivisionError", boom

        wrote = await call(
            client, "write_file", {"sandbox_id": sid, "path": "/tmp/notes.txt", "content": "héllo\nworld\n"}
        )
        assert wrote["bytes"] == len("héllo\nworld\n".encode()), wrote
        read = await call(client, "read_file", {"sandbox_id": sid, "path": "/tmp/notes.txt"})
        assert read["content"] == "héllo\nworld\n" and not read["truncated"], read
        # At most max_bytes come back, never half a character.
        head = await call(client, "read_file", {"sandbox_id": sid, "path": "/tmp/notes.txt", "max_bytes": 2})
        assert head["content"] == "h" and head["truncated"], head
        listing = await call(client, "list_files", {"sandbox_id": sid, "path": "/tmp"})
        notes = [e for e in listing["entries"] if e["name"] == "notes.txt"]
        assert notes and notes[0]["kind"] == "file" and notes[0]["size"] == wrote["bytes"], listing

        # Binary content is refused as text, and comes back whole as base64.
        await call(client, "write_file", {"sandbox_id": sid, "path": "/tmp/b.bin", "content": "AP8A/w==", "encoding": "base64"})
        refused = await client.call_tool("read_file", {"sandbox_id": sid, "path": "/tmp/b.bin"})
        assert refused.is_error and "base64" in text(refused), refused
        raw = await call(client, "read_file", {"sandbox_id": sid, "path": "/tmp/b.bin", "encoding": "base64"})
        assert raw["content"] == "AP8A/w==", raw

        echo = await call(client, "exec", {"sandbox_id": sid, "command": "echo hello from $(cat /tmp/notes.txt | tail -1)"})
        assert echo == {**echo, "exit_code": 0, "stdout": "hello from world\n", "timed_out": False}, echo
        failed = await call(client, "exec", {"sandbox_id": sid, "argv": ["sh", "-c", "echo oops >&2; exit 3"]})
        assert failed["exit_code"] == 3 and failed["stderr"] == "oops\n", failed
        # Long output comes back as head and tail with a note.
        long = await call(client, "exec", {"sandbox_id": sid, "command": "seq 1 100000"})
        assert long["truncated"] and long["stdout"].startswith("1\n2\n"), long["stdout"][:100]
        assert long["stdout"].endswith("99999\n100000\n") and "left out" in long["stdout"]
        assert len(long["stdout"]) < 40_000, len(long["stdout"])

        # A background process runs on between calls; its output is read from an offset.
        started = await call(client, "start_process", {
            "sandbox_id": sid, "command": "for i in 1 2 3; do echo line $i; done; sleep 600", "tag": "bg"})
        pid = started["process_id"]
        for _ in range(100):
            out = await call(client, "process_output", {"sandbox_id": sid, "process_id": pid})
            if "line 3" in out["stdout"]:
                break
            await asyncio.sleep(0.2)
        assert out["stdout"] == "line 1\nline 2\nline 3\n" and out["running"], out
        assert out["next_offset"] == len(out["stdout"]) and out["skipped"] == 0, out
        since = await call(client, "process_output", {
            "sandbox_id": sid, "process_id": pid, "offset": out["next_offset"]})
        assert since["stdout"] == "" and since["next_offset"] == out["next_offset"], since
        await call(client, "stop_process", {"sandbox_id": sid, "process_id": pid, "signal": 15})
        for _ in range(100):
            ended = await call(client, "process_output", {"sandbox_id": sid, "process_id": pid})
            if not ended["running"]:
                break
            await asyncio.sleep(0.2)
        assert ended["signal"] == 15 and ended["exit_code"] is None, ended
        removed = await call(client, "stop_process", {"sandbox_id": sid, "process_id": pid})
        assert removed["removed"], removed
        gone = await client.call_tool("process_output", {"sandbox_id": sid, "process_id": pid})
        assert gone.is_error and "not_found" in text(gone), gone
        # Waiting instead of polling: the call returns as soon as the process ends...
        async def start_and_wait(command: str, wait: int) -> tuple[Any, Any, float]:
            started = await call(client, "start_process", {"sandbox_id": sid, "command": command})
            began = time.monotonic()
            waited = await call(client, "process_output", {
                "sandbox_id": sid, "process_id": started["process_id"], "wait_seconds": wait})
            return started, waited, time.monotonic() - began

        slow, waited, took = await start_and_wait("sleep 2; echo done; exit 4", 60)
        assert (waited["stdout"], waited["exit_code"], waited["running"]) == ("done\n", 4, False), waited
        assert took < 30, took
        # ...or once the wait passes, with what came meanwhile, still running.
        long_runner, waited, took = await start_and_wait("echo hi; sleep 600", 2)
        assert waited["running"] and waited["exit_code"] is None and 2 <= took < 20, (waited, took)
        await call(client, "stop_process", {"sandbox_id": sid, "process_id": long_runner["process_id"]})
        # Started with a wait: a quick command answers like exec, with its process id.
        quick = await call(client, "start_process", {
            "sandbox_id": sid, "command": "echo quick; exit 2", "wait_seconds": 30})
        assert (quick["stdout"], quick["exit_code"], quick["running"]) == ("quick\n", 2, False), quick
        assert isinstance(quick["process_id"], int), quick
        too_long = await client.call_tool("process_output", {
            "sandbox_id": sid, "process_id": slow["process_id"], "wait_seconds": 61})
        assert too_long.is_error and "at most 60" in text(too_long), too_long

        # The daemon's refusals are tool errors carrying its message.
        missing = await client.call_tool("exec", {"sandbox_id": "no-such-sandbox", "command": "true"})
        assert missing.is_error and "not_found" in text(missing), missing

        # A fork (where the daemon has it) copies the files; the copy ends with the session.
        forked = await call(client, "fork_sandbox", {"sandbox_id": sid})
        child = forked["sandboxes"][0]["sandbox_id"]
        copied = await call(client, "read_file", {"sandbox_id": child, "path": "/tmp/notes.txt"})
        assert copied["content"] == "héllo\nworld\n", copied
        # Pause and resume (the copy): saved to disk and back as it was.
        paused = await call(client, "pause_sandbox", {"sandbox_id": child})
        assert paused["state"] == "paused", paused
        resumed = await call(client, "resume_sandbox", {"sandbox_id": child})
        assert resumed["state"] == "running", resumed
        again = await call(client, "exec", {"sandbox_id": child, "argv": ["cat", "/tmp/notes.txt"]})
        assert again["stdout"] == "héllo\nworld\n", again

        gone = await call(client, "destroy_sandbox", {"sandbox_id": sid})
        assert gone["destroyed"], gone
        after = await client.call_tool("list_files", {"sandbox_id": sid, "path": "/"})
        assert after.is_error, after

        # Not kept: ends with the session.
        left = await call(client, "create_sandbox", {"image": image})
    print(json.dumps({"destroyed": sid, "left": left["sandbox_id"], "forked": child}), flush=True)


async def http(url: str) -> None:
    # A session: the initialize handshake, then requests under its Mcp-Session-Id; the client
    # closes it (DELETE) on exit, which ends the sandbox created in it.
    async with Client(url, mode="legacy") as client:
        assert client.server_info is not None and client.server_info.name == "hearth", client.server_info
        await check_tools(client)
        missing = await client.call_tool("list_files", {"sandbox_id": "no-such-sandbox", "path": "/"})
        assert missing.is_error and "not_found" in text(missing), missing
        sb = await call(client, "create_sandbox", {"image": os.environ["HEARTH_TEST_IMAGE"]})
        assert "session ends" in sb["lifetime"], sb
    # The sessionless protocol (the client's default).
    async with Client(url) as client:
        log("negotiated", client.protocol_version)
        await check_tools(client)
        bad = await client.call_tool("exec", {"sandbox_id": "no-such-sandbox"})
        assert bad.is_error and "exactly one of command" in text(bad), bad
        # No session to end it: it lives until the server stops.
        loose = await call(client, "create_sandbox", {"image": os.environ["HEARTH_TEST_IMAGE"]})
        assert "until this MCP server stops" in loose["lifetime"], loose
    print(json.dumps({"left": sb["sandbox_id"], "sessionless": loose["sandbox_id"]}), flush=True)


async def local(flags: list[str]) -> None:
    image = os.environ["HEARTH_TEST_IMAGE"]
    async with Client(server(["--", *flags])) as client:
        await check_tools(client)
        sb = await call(client, "create_sandbox", {"image": image})
        echo = await call(client, "exec", {"sandbox_id": sb["sandbox_id"], "argv": ["echo", "local"]})
        assert echo["stdout"] == "local\n", echo
    print(json.dumps({"left": sb["sandbox_id"]}), flush=True)


def main() -> None:
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "stdio":
        asyncio.run(stdio())
    elif mode == "http":
        asyncio.run(http(rest[0]))
    elif mode == "local":
        asyncio.run(local(rest))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
