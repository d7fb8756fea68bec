#!/usr/bin/env python3
"""Guest-inflicted faults stay inside the guest (issue #17): how much a fork bomb or an out-of-memory
storm in one sandbox delays another sandbox's exec and the daemon's /healthz.

    bench/isolation.py --host http://127.0.0.1:PORT --token TOKEN --image REF [--calls 30]

Two sandboxes of IMAGE (it needs python3): the victim B answers CALLS `exec true`, timed, while
/healthz is sampled on fresh connections; first with the noisy sandbox A idle (the baseline), then
while A runs a fork bomb, then while A's python allocates until its guest's OOM killer fires (again
and again). Prints p50/p99/max per phase and the ratio to the baseline, then deletes both.
"""

import argparse
import http.client
import json
import os
import threading
import time
from hearth_api import Api, percentile

FAULTS = {
    "fork bomb": ["sh", "-c", "f() { f | f & }; f; sleep 3600"],
    "OOM storm": ["sh", "-c", "while true; do python3 -c 'a = []\nwhile True: a.append(bytearray(1 << 20))'; done"],
}


def healthz_sampler(api, stop, samples):
    while not stop.is_set():
        conn = http.client.HTTPConnection(api.host, api.port, timeout=60)
        start = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        samples.append((time.perf_counter() - start) * 1000)
        conn.close()
        time.sleep(0.02)


def phase(api, victim, calls):
    stop, health = threading.Event(), []
    sampler = threading.Thread(target=healthz_sampler, args=(api, stop, health), daemon=True)
    sampler.start()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        api.call("POST", f"/v1/sandboxes/{victim}/exec", {"argv": ["true"]})
        times.append((time.perf_counter() - start) * 1000)
    stop.set()
    sampler.join()
    return times, health


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HEARTH_HOST", "http://127.0.0.1:8420"))
    parser.add_argument("--token", default=os.environ.get("HEARTH_TOKEN", ""))
    parser.add_argument("--image", required=True)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    api = Api(args.host, args.token)
    create = {"image": args.image}
    noisy = json.loads(api.call("POST", "/v1/sandboxes", create, expect=201))["id"]
    victim = json.loads(api.call("POST", "/v1/sandboxes", create, expect=201))["id"]
    try:
        for _ in range(5):
            api.call("POST", f"/v1/sandboxes/{victim}/exec", {"argv": ["true"]})
        print("| phase (victim's `exec true`) | p50 ms | p99 ms | max ms | p50 × base | /healthz p99 ms |")
        print("|---|---|---|---|---|---|")
        base = None
        for name in ["baseline (noisy sandbox idle)", *FAULTS]:
            fault = None
            if name in FAULTS:
                fault = threading.Thread(
                    target=lambda argv=FAULTS[name]: Api(args.host, args.token).call(
                        "POST", f"/v1/sandboxes/{noisy}/exec",
                        {"argv": argv, "timeout_seconds": 3600}),
                    daemon=True)
                fault.start()
                time.sleep(5)  # let the fault take hold
            times, health = phase(api, victim, args.calls)
            p50 = percentile(times, 50)
            base = base or p50
            print(f"| {name} | {p50:.1f} | {percentile(times, 99):.1f} | {max(times):.1f} "
                  f"| {p50 / base:.2f} | {percentile(health, 99):.1f} |", flush=True)
            if fault is not None:
                # End the fault: a fork bomb leaves the guest too busy for a signal to matter, so
                # the noisy sandbox is replaced.
                api.call("DELETE", f"/v1/sandboxes/{noisy}", expect=204)
                noisy = json.loads(api.call("POST", "/v1/sandboxes", create, expect=201))["id"]
    finally:
        for sid in (noisy, victim):
            api.call("DELETE", f"/v1/sandboxes/{sid}", expect=204)


if __name__ == "__main__":
    main()
