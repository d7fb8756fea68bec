"""Reading a running command's events, whichever transport carries them (NDJSON lines from
``POST .../exec`` or WebSocket text messages from ``.../exec/ws``): output is decoded from base64,
handed to the caller's callbacks as text as it arrives and kept for the result; the last event
(``exit_code``, ``signal`` or ``error``) ends it. Shared by both flavours; no I/O.
"""

from __future__ import annotations

import base64
import codecs
import json
from collections.abc import Callable
from typing import Any, Optional, Union

from .errors import ExecFailed
from .models import ExecResult

#: Called with each piece of output as it arrives (text, decoded across chunk boundaries).
OutputCallback = Callable[[str], object]


class _Stream:
    def __init__(self, callback: Optional[OutputCallback]) -> None:
        self.data = bytearray()
        self._callback = callback
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, chunk: bytes, final: bool = False) -> None:
        self.data += chunk
        if self._callback is not None:
            text = self._decoder.decode(chunk, final)
            if text:
                self._callback(text)


class ExecEvents:
    """Feed it events; once :attr:`done`, :meth:`result` gives the outcome."""

    def __init__(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        what: str = "the command",
    ) -> None:
        self._out = _Stream(on_stdout)
        self._err = _Stream(on_stderr)
        self._what = what
        self._end: Optional[dict[str, Any]] = None

    @property
    def done(self) -> bool:
        return self._end is not None

    def feed(self, message: Union[str, bytes]) -> bool:
        """One event as JSON text; returns whether it was the last."""
        if self._end is not None:
            return True
        try:
            event = json.loads(message)
        except ValueError as e:
            raise ExecFailed(f"{self._what}: the daemon sent a malformed event: {e}") from e
        if not isinstance(event, dict):
            raise ExecFailed(f"{self._what}: the daemon sent a malformed event: {event!r}")
        if "stdout" in event:
            self._out.push(base64.b64decode(event["stdout"]))
        if "stderr" in event:
            self._err.push(base64.b64decode(event["stderr"]))
        if "exit_code" in event or "signal" in event or "error" in event:
            self._end = event
            self._out.push(b"", final=True)
            self._err.push(b"", final=True)
        return self._end is not None

    def error(self, message: str) -> None:
        """The transport ended without a last event: the command's outcome is unknown."""
        if self._end is None:
            self._end = {"error": message}

    def result(self) -> ExecResult:
        end = self._end
        if end is None:
            raise ExecFailed(f"{self._what}: the answer ended before the command did")
        if "error" in end:
            raise ExecFailed(f"{self._what}: {end['error']}")
        out, err = bytes(self._out.data), bytes(self._err.data)
        return ExecResult(
            exit_code=end.get("exit_code"),
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            signal=end.get("signal"),
            timed_out=bool(end.get("timed_out")),
            stdout_bytes=out,
            stderr_bytes=err,
        )
