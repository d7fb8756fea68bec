#!/usr/bin/env python3
"""Chaos soak of a real `hearth serve` (issue #17): a steady mixed load from several tenants while
a fault injector strikes at random moments, then a checker that proves nothing was lost, leaked or
left running. Driven by bench/soak.sh (a long run, results for bench/README.md) and by the suite's
crates/hearth/tests/soak.rs (a few minutes). Standard library only; root (loop mounts, signals).

    soak.py --hearth BIN --registry HOST:PORT --work DIR --duration SECONDS [--report FILE]

The daemon's home is a small loop-mounted ext4 (so "disk full" is a real ENOSPC), its registry is
reached through a proxy this script can take down or slow, and the daemon itself is started,
killed and restarted here. Exit 0 when every check holds; 1 with the failed checks listed.
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak_lib import faults, stats  # noqa: E402
from soak_lib.daemon import Daemon  # noqa: E402
from soak_lib.check import Checker  # noqa: E402
from soak_lib.proxy import RegistryProxy  # noqa: E402

TENANTS = ["t0", "t1", "t2"]
PROBE_TENANT = "probe"
# Client deadlines: an answer later than this is a hung request (a check fails).
DEADLINE = {"create": 180, "exec": 90, "files": 60, "delete": 90, "other": 30}


class Api:
    """Small JSON client with per-call deadlines; every call is recorded in `stats`."""

    def __init__(self, daemon, rec):
        self.daemon, self.base, self.rec = daemon, daemon.base, rec

    def call(self, kind, method, path, token, body=None, raw=None, timeout=None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        req = urllib.request.Request(self.base + path, method=method, data=data, headers=headers)
        deadline = timeout or DEADLINE.get(kind, DEADLINE["other"])
        started, lives = time.monotonic(), self.daemon.restarts
        try:
            with urllib.request.urlopen(req, timeout=deadline) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            took = time.monotonic() - started
            reason = getattr(e, "reason", e)
            if isinstance(reason, socket.timeout) or "timed out" in str(reason):
                self.rec.hung(kind, path, took)
                return None, b"timed out"
            if data is not None and isinstance(reason, (BrokenPipeError, ConnectionResetError)):
                # The daemon answered (an error) before taking the whole body and closed: urllib
                # cannot read that answer, but the daemon did refuse, not drop, the request.
                self.rec.op(kind, "closed-early", took)
            elif self.daemon.restarts == lives and not self.daemon.restarting:
                # Refused or cut while the daemon lived: the daemon dropped a request.
                self.rec.cut(kind, path, f"{type(e).__name__}: {reason}")
            else:
                # The daemon was killed or restarting: not an answer, not a hang.
                self.rec.unreachable(kind)
            return None, str(reason).encode()
        self.rec.op(kind, status, time.monotonic() - started)
        if status == 500:
            self.rec.internal_error(kind, method, path, payload)
        return status, payload

    def exec(self, sid, token, script, timeout=60):
        status, body = self.call("exec", "POST", f"/v1/sandboxes/{sid}/exec", token,
                                 {"argv": ["sh", "-c", script], "timeout_seconds": timeout},
                                 timeout=timeout + 30)
        if status != 200:
            return status, None, b""
        out, code = [], None
        for line in body.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                return status, None, b""
            if "stdout" in event:
                out.append(base64.b64decode(event["stdout"]))
            if "exit_code" in event:
                code = event["exit_code"]
        return status, code, b"".join(out)


class Ledger:
    """Every sandbox the API acknowledged, and what the load did to it since."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = {}  # id -> {"tenant", "ttl", "created", "deleted"}

    def add(self, sid, tenant, ttl):
        with self.lock:
            self.acked[sid] = {"tenant": tenant, "ttl": ttl, "created": time.time(),
                               "deleted": False}

    def deleted(self, sid, answered=True):
        """A delete answered 204/404 (`answered`), or one the daemon died under (it may be gone)."""
        with self.lock:
            self.acked[sid]["deleted" if answered else "delete_unanswered"] = True

    def snapshot(self):
        with self.lock:
            return {s: dict(v) for s, v in self.acked.items()}

    def live(self, tenant):
        with self.lock:
            return [s for s, v in self.acked.items() if v["tenant"] == tenant and not v["deleted"]]


class Load(threading.Thread):
    """One tenant's steady mixed load until `stop` is set."""

    def __init__(self, api, tenant, token, image, ledger, features, stop, seed):
        super().__init__(daemon=True, name=f"load-{tenant}")
        self.api, self.tenant, self.token, self.image = api, tenant, token, image
        self.ledger, self.features, self.stop, self.rng = ledger, features, stop, random.Random(seed)
        self.mismatches = []

    def run(self):
        ops = [(self.create, 3), (self.exec_big, 4), (self.files, 3), (self.delete, 1),
               (self.network, 1), (self.pause_resume, 1), (self.fork, 1)]
        while not self.stop.is_set():
            op = self.rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
            try:
                op()
            except Exception as e:  # a bug in the load itself must not end the run silently
                self.mismatches.append(f"{op.__name__}: {type(e).__name__}: {e}")
            self.stop.wait(self.rng.uniform(0.05, 0.4))

    def pick(self):
        live = self.ledger.live(self.tenant)
        return self.rng.choice(live) if live else None

    def create(self):
        if len(self.ledger.live(self.tenant)) >= 3:
            return self.delete()
        ttl = self.rng.choice([None, None, 30, 60, 120])
        body = {"image": self.image, "wait": True, "labels": {"soak": self.tenant}}
        if ttl:
            body["ttl_seconds"] = ttl
        if self.features.get("on_idle") and self.rng.random() < 0.3:
            # Sleeps whenever its uses pause for 2 s, and each next use wakes it: many pause and
            # resume cycles under the faults.
            body.update({"idle_timeout_seconds": 2, "on_idle": "pause"})
        elif self.rng.random() < 0.3:
            body["idle_timeout_seconds"] = self.rng.choice([20, 45])
        status, payload = self.api.call("create", "POST", "/v1/sandboxes", self.token, body)
        if status in (200, 201, 202):
            self.ledger.add(json.loads(payload)["id"], self.tenant, ttl)

    def exec_big(self):
        sid = self.pick()
        if not sid:
            return
        size = self.rng.choice([1, 64 << 10, 1 << 20, 4 << 20])
        status, code, out = self.api.exec(sid, self.token, f"head -c {size} /dev/zero | tr '\\0' x")
        if code == 0 and len(out) != size:
            self.mismatches.append(f"exec in {sid}: asked {size} bytes of output, got {len(out)}")

    def files(self):
        sid = self.pick()
        if not sid:
            return
        data = os.urandom(self.rng.choice([1 << 10, 256 << 10, 1 << 20]))
        path = f"/tmp/soak-{self.rng.randrange(1 << 30)}"
        status, _ = self.api.call("files", "PUT", f"/v1/sandboxes/{sid}/files?path={path}",
                                  self.token, raw=data)
        if status != 200:
            return
        status, back = self.api.call("files", "GET", f"/v1/sandboxes/{sid}/files?path={path}",
                                     self.token)
        if status == 200 and hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
            self.mismatches.append(f"file {path} in {sid}: {len(data)} bytes up, "
                                   f"{len(back)} different bytes down")

    def delete(self):
        sid = self.pick()
        if not sid:
            return
        status, _ = self.api.call("delete", "DELETE", f"/v1/sandboxes/{sid}", self.token)
        if status in (204, 404):
            self.ledger.deleted(sid)
        elif status is None:
            self.ledger.deleted(sid, answered=False)

    def network(self):
        sid = self.pick()
        if not sid or not self.features.get("network"):
            return
        policy = self.rng.choice([{"mode": "none"}, {"mode": "allow", "allow": ["example.com"]},
                                  {"mode": "allow", "allow": ["198.51.100.0/24:443"]}])
        status, _ = self.api.call("other", "PUT", f"/v1/sandboxes/{sid}/network", self.token,
                                  policy)
        if status != 200:
            return
        status, back = self.api.call("other", "GET", f"/v1/sandboxes/{sid}/network", self.token)
        if status == 200:
            got = json.loads(back).get("policy", json.loads(back))
            if got.get("mode") != policy["mode"]:
                self.mismatches.append(f"network of {sid}: set {policy}, read back {got}")

    def pause_resume(self):
        sid = self.pick()
        if not sid or not self.features.get("pause"):
            return
        status, _ = self.api.call("other", "POST", f"/v1/sandboxes/{sid}/pause", self.token,
                                  {"force": True}, timeout=120)
        if status == 200:
            self.stop.wait(self.rng.uniform(0.5, 3))
            self.api.call("other", "POST", f"/v1/sandboxes/{sid}/resume", self.token, {},
                          timeout=120)

    def fork(self):
        sid = self.pick()
        if not sid or not self.features.get("fork") or len(self.ledger.live(self.tenant)) >= 3:
            return
        status, payload = self.api.call("other", "POST", f"/v1/sandboxes/{sid}/fork", self.token,
                                        {"count": 1}, timeout=120)
        if status in (200, 201):
            for child in json.loads(payload)["sandboxes"]:
                self.ledger.add(child["id"], self.tenant, None)


def features_of(api, token):
    """Which optional routes the daemon offers, from its OpenAPI document."""
    status, body = api.call("other", "GET", "/openapi.json", token)
    doc = json.loads(body) if status == 200 else {}
    paths = doc.get("paths", {})
    create = doc.get("components", {}).get("schemas", {}).get("CreateSandbox", {})
    return {"on_idle": "on_idle" in create.get("properties", {}),
            "network": "/v1/sandboxes/{id}/network" in paths,
            "pause": "/v1/sandboxes/{id}/pause" in paths,
            "fork": "/v1/sandboxes/{id}/fork" in paths}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hearth", required=True)
    ap.add_argument("--registry", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--home-size", default="3G")
    ap.add_argument("--report")
    ap.add_argument("--no-faults", action="store_true",
                    help="the same load without the fault injector (the baseline)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    if not os.environ.get("HEARTH_AGENT"):
        raise SystemExit("soak: set HEARTH_AGENT (HEARTH_AGENT=$(scripts/build-agent.sh))")
    print(f"soak: seed {args.seed}, {args.duration:.0f} s", flush=True)

    rec = stats.Recorder()
    proxy = RegistryProxy(args.registry)
    daemon = Daemon(args.hearth, args.work, args.home_size, TENANTS + [PROBE_TENANT], proxy.addr)
    try:
        daemon.start()
        api = Api(daemon, rec)
        image = f"{proxy.addr}/hearth-test/busybox:latest"
        feats = features_of(api, daemon.tokens[TENANTS[0]])
        print(f"soak: daemon at {daemon.base}; optional routes: {feats}", flush=True)
        # Warm-up outside the measurements: the image pulled, the boot template built.
        status, body = api.call("create", "POST", "/v1/sandboxes", daemon.tokens[PROBE_TENANT],
                                {"image": image, "wait": True, "labels": {"soak": "probe"}})
        if status not in (200, 201) or json.loads(body)["state"] != "running":
            raise SystemExit(f"soak: the probe sandbox did not start: {status} {body[:600]!r}")
        probe = json.loads(body)["id"]
        rec.reset()
        baseline = daemon.usage()

        stop = threading.Event()
        ledger = Ledger()
        ledger.add(probe, PROBE_TENANT, None)
        loads = [Load(api, t, daemon.tokens[t], image, ledger, feats, stop, rng.random())
                 for t in TENANTS]
        injector = faults.Injector(daemon, proxy, api, ledger, rec, stop, rng, args.duration,
                                   enabled=not args.no_faults)
        watchers = [stats.Healthz(daemon, rec, stop),
                    stats.Probe(api, probe, daemon.tokens[PROBE_TENANT], injector, rec, stop)]
        for t in loads + watchers + [injector]:
            t.start()
        stop.wait(args.duration)
        stop.set()
        for t in loads + [injector]:
            t.join(timeout=300)
        injector.undo_all()
        for t in watchers:
            t.join(timeout=30)

        checker = Checker(daemon, api, ledger, rec, baseline, loads)
        report = checker.run()
        report["seed"] = args.seed
        report["duration_s"] = args.duration
        report["faults"] = injector.counts
        report["with_faults"] = not args.no_faults
        print(stats.render(report), flush=True)
        if args.report:
            with open(args.report, "w") as f:
                json.dump(report, f, indent=2)
        return 0 if not report["failed"] else 1
    finally:
        daemon.close()
        proxy.close()


if __name__ == "__main__":
    sys.exit(main())
