#!/usr/bin/env python3
"""What an agent's tool call waits for (issue #15): round trips on one running sandbox, through the
HTTP API and through the Python SDK, against two floors measured in the same run.

    bench/clients.py --host http://127.0.0.1:PORT --token TOKEN --image REF [--calls 50]

(`HEARTH_HOST` / `HEARTH_TOKEN` are the defaults; `bench/clients.sh` starts a daemon and runs this.)
One sandbox of IMAGE (it needs python3). Each row is CALLS timed calls after 5 untimed ones, over one
keep-alive HTTP connection (the SDK keeps its own):

  floor: daemon only      GET /v1/sandboxes/{id} (no guest involved)
  floor: guest round trip GET /v1/sandboxes/{id}/files of a small file (daemon -> agent -> daemon)
  exec true (API)         POST /v1/sandboxes/{id}/exec {"argv": ["true"]}  (goal <= 30 ms p50)
  exec of 10 x /bin/true  one exec whose shell starts /bin/true ten times: the guest's own cost
                          of a process, the floor under any exec
  exec true (SDK)         Sandbox.exec(["true"])                          (goal: < 2 ms over the API)
  exec python3 -c         what a code call would cost without a kept interpreter
  run_code 1+1 (API)      POST /v1/sandboxes/{id}/code {"code": "1+1"}      (goal <= 30 ms p50)
  run_code 1+1 (SDK)      Sandbox.run_code("1+1")

Prints one table row per measure (p50, p99, max in ms) and deletes the sandbox. The SDK rows need the
`hearth` SDK importable (PYTHONPATH=sdk/python/src with httpx and websockets installed).
"""

import argparse
import json
import os
import sys
import time
from hearth_api import Api, percentile


def timed(calls, fn):
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def row(name, times):
    print(f"| {name:<24} | {percentile(times, 50):8.1f} | {percentile(times, 99):8.1f} "
          f"| {max(times):8.1f} |", flush=True)


def exec_ok(api, sid, argv):
    raw = api.call("POST", f"/v1/sandboxes/{sid}/exec", {"argv": argv})
    last = json.loads(raw.splitlines()[-1])
    if last.get("exit_code") != 0:
        sys.exit(f"exec {argv}: {raw[-300:]!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HEARTH_HOST", "http://127.0.0.1:8420"))
    parser.add_argument("--token", default=os.environ.get("HEARTH_TOKEN", ""))
    parser.add_argument("--image", required=True)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()

    api = Api(args.host, args.token, timeout=300)
    sid = json.loads(api.call("POST", "/v1/sandboxes", {"image": args.image}, expect=201))["id"]
    try:
        exec_ok(api, sid, ["sh", "-c", "echo hearth > /tmp/small"])
        print(f"{args.calls} calls each on sandbox {sid} ({args.image})\n")
        print("| measure                  |  p50 ms  |  p99 ms  |  max ms  |")
        print("|--------------------------|----------|----------|----------|")
        n = args.calls
        row("floor: daemon only", timed(n, lambda: api.call("GET", f"/v1/sandboxes/{sid}")))
        row("floor: guest round trip",
            timed(n, lambda: api.call("GET", f"/v1/sandboxes/{sid}/files?path=/tmp/small")))
        row("exec true (API)", timed(n, lambda: exec_ok(api, sid, ["true"])))
        # What one more process costs inside the guest: the same exec running `true` 10 times.
        ten = ["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done"]
        row("exec of 10 x /bin/true", timed(max(n // 5, 5), lambda: exec_ok(api, sid, ten)))
        try:
            import hearth  # noqa: PLC0415 (optional)
        except ImportError as e:
            hearth = None
            print(f"(SDK rows skipped: {e})")
        if hearth is not None:
            sb = hearth.Sandbox.connect(sid, host=args.host, token=args.token)
            row("exec true (SDK)", timed(n, lambda: sb.exec(["true"])))
        row("exec python3 -c",
            timed(max(n // 5, 5), lambda: exec_ok(api, sid, ["python3", "-c", "print(1+1)"])))
        code = {"code": "1+1"}
        row("run_code 1+1 (API)",
            timed(n, lambda: api.call("POST", f"/v1/sandboxes/{sid}/code", code)))
        if hearth is not None:
            row("run_code 1+1 (SDK)", timed(n, lambda: sb.run_code("1+1")))
    finally:
        api.call("DELETE", f"/v1/sandboxes/{sid}", expect=204)


if __name__ == "__main__":
    main()
