"""``run_code`` against the real daemon, on one sandbox of the python test image
(``HEARTH_TEST_PYTHON_IMAGE``: the session's shared sandbox is a busybox, which has no python3):
state kept between calls, the last expression's repr, output, exceptions with tracebacks, a
timeout that keeps the state, a crash restarted and said so, the state kept across a pause and
copied by a fork, a reset, the asyncio flavour."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

import hearth


@pytest.fixture(scope="module")
def py() -> Iterator[hearth.Sandbox]:
    image = os.environ.get("HEARTH_TEST_PYTHON_IMAGE")
    if not image:
        raise RuntimeError("HEARTH_TEST_PYTHON_IMAGE is not set: run through `cargo nextest run "
                           "-p hearth --test sdk_python`")
    with hearth.Sandbox.create(image, ttl=1800) as sb:
        yield sb


def test_names_persist_and_the_last_expression_is_the_result(py: hearth.Sandbox) -> None:
    first = py.run_code("x = 41")
    assert (first.result, first.error, first.ok) == (None, None, True), first
    second = py.run_code("x + 1")
    assert second.result == "42", second
    assert second.execution_count == first.execution_count + 1
    assert not second.restarted


def test_output_and_exceptions(py: hearth.Sandbox) -> None:
    out = py.run_code("import sys\nprint('hi')\nprint('err', file=sys.stderr)")
    assert (out.stdout, out.stderr, out.result) == ("hi\n", "err\n", None), out
    bad = py.run_code("def f():\n    raise ValueError('nope')\nf()")
    assert bad.error is not None and not bad.ok, bad
    assert (bad.error.name, bad.error.message) == ("ValueError", "nope")
    assert "raise ValueError('nope')" in bad.error.traceback
    assert bad.error.traceback in bad.text


def test_a_timeout_interrupts_and_keeps_the_state(py: hearth.Sandbox) -> None:
    py.run_code("kept = 'yes'")
    slow = py.run_code("while True:\n    pass", timeout=2)
    assert slow.timed_out and slow.error is not None, slow
    assert slow.error.name == "KeyboardInterrupt"
    after = py.run_code("kept")
    assert (after.result, after.restarted) == ("'yes'", False), after


def test_a_crash_is_restarted_and_said_so(py: hearth.Sandbox) -> None:
    py.run_code("x = 1")
    crash = py.run_code("import os\nos._exit(1)")
    assert crash.error is not None and crash.error.name == "InterpreterExited", crash
    fresh = py.run_code("'x' in dir()")
    assert (fresh.result, fresh.restarted, fresh.execution_count) == ("False", True, 1), fresh


def test_a_pause_keeps_the_interpreter_and_a_fork_copies_it(py: hearth.Sandbox) -> None:
    py.run_code("items = [1]")
    py.pause()
    py.resume()
    kept = py.run_code("items.append(2); items")
    assert (kept.result, kept.restarted) == ("[1, 2]", False), kept
    [child] = py.fork()
    try:
        copied = child.run_code("items.append(3); items")
        assert (copied.result, copied.restarted) == ("[1, 2, 3]", False), copied
    finally:
        child.delete()
    assert py.run_code("items").result == "[1, 2]"


def test_reset_and_languages(py: hearth.Sandbox) -> None:
    py.run_code("gone = 1")
    py.reset_code()
    fresh = py.run_code("'gone' in dir()")
    assert (fresh.result, fresh.restarted) == ("False", False), fresh
    with pytest.raises(hearth.InvalidRequest, match="python"):
        py.run_code("puts 1", language="ruby")


def test_the_async_flavour(py: hearth.Sandbox) -> None:
    async def main() -> tuple[hearth.CodeResult, hearth.CodeResult]:
        sb = await hearth.AsyncSandbox.connect(py.id)
        try:
            await sb.run_code("n = 6")
            return await sb.run_code("n * 7"), await sb.run_code("n * 7")
        finally:
            await sb.close()

    first, second = asyncio.run(main())
    assert (first.result, second.result) == ("42", "42")
    assert second.execution_count == first.execution_count + 1
