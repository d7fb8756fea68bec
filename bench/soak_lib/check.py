"""The end-of-run proofs: every sandbox the API acknowledged is present with a truthful state
unless it was deleted; the node's allocation equals what its live sandboxes hold; after deleting
everything, no VMM process, run directory, namespace mount, uid lease, cgroup or temp file is
left; the daemon's fds and private memory are back near where its last life started; `/healthz` answered
within 50 ms at p99; no request hung past its deadline; no data came back different."""

import glob
import json
import os
import time

from .stats import ms, percentile

HEALTHZ_P99_LIMIT = 0.050
FD_MARGIN = 16
# The daemon's private (anonymous) memory, not its RSS: see `Daemon.usage`.
PRIVATE_MARGIN = 32 << 20
LEASES = "/run/hearth/vmm-uids"
# Directories under the home whose entries belong to one sandbox each: empty once all are deleted.
PER_SANDBOX = ["run", "sandboxes", "net", "node/net", "node/paused", "tmp"]


class Checker:
    def __init__(self, daemon, api, ledger, rec, baseline, loads):
        self.d, self.api, self.ledger, self.rec = daemon, api, ledger, rec
        self.baseline, self.loads = baseline, loads
        self.failed = []
        self.slow_healthz = []

    def fail(self, text):
        self.failed.append(text)

    def listing(self):
        """Every tenant's sandboxes as the daemon reports them: id -> (tenant, record)."""
        out = {}
        for tenant, token in self.d.tokens.items():
            status, body = self.api.call("other", "GET", "/v1/sandboxes", token)
            if status != 200:
                self.fail(f"listing {tenant}'s sandboxes answered {status}")
                continue
            for s in json.loads(body)["sandboxes"]:
                out[s["id"]] = (tenant, s)
        return out

    def settle(self, limit=180):
        """Waits until nothing is creating or stopping and every ended sandbox's VM is gone: an end
        answers before the VM's clean shutdown finishes (the sandbox shows `stopping` meanwhile), and
        its resources stay allocated until then."""
        deadline = time.monotonic() + limit
        while True:
            listing = self.listing()
            vmms = self.vmm_cmdlines()
            busy = [i for i, (_, s) in listing.items() if s["state"] in ("creating", "stopping")]
            busy += [i for i, (_, s) in listing.items() if s["state"] in ("stopped", "failed")
                     and any(i.encode() in c for c in vmms.values())]
            if not busy:
                return
            if time.monotonic() > deadline:
                self.fail(f"still creating, or an ended sandbox's VM still running, {limit} s "
                          f"after the load stopped: {busy}")
                return
            time.sleep(1)

    def run(self):
        end_usage_before = self.d.usage()
        self.settle()
        present = self.listing()
        lost = []
        with self.ledger.lock:
            acked = dict(self.ledger.acked)
        for sid, v in acked.items():
            if sid not in present and not v["deleted"] and not v.get("delete_unanswered"):
                lost.append(f"{sid} ({v['tenant']}, acknowledged {time.ctime(v['created'])})")
            if sid in present and v["deleted"]:
                self.fail(f"{sid} was deleted (204) but is still listed")
        if lost:
            self.fail(f"{len(lost)} acknowledged sandboxes lost")
        self.truthful(present)
        self.accounting(present)
        self.delete_all(present)
        leaks = self.leaks()
        if leaks:
            self.fail(f"{len(leaks)} leaks")
        start = self.d.life_start
        end = self.d.usage()
        # The daemon trims its heap every 10 s (crates/hearth/src/heap.rs): give it two rounds.
        waited = time.monotonic()
        while end["private"] > start["private"] + PRIVATE_MARGIN and time.monotonic() - waited < 25:
            time.sleep(1)
            end = self.d.usage()
        if end["fds"] > start["fds"] + FD_MARGIN:
            self.fail(f"daemon fds {start['fds']} at start of its life, {end['fds']} at the end")
        if end["private"] > start["private"] + PRIVATE_MARGIN:
            self.fail(f"daemon private memory {start['private'] >> 20} MiB at start of its life, "
                      f"{end['private'] >> 20} MiB at the end")
        # A probe in flight while the daemon was being killed or restarted measures the restart,
        # not the daemon: those are counted apart.
        hz, across_restarts = [], 0
        for at, took in self.rec.healthz_samples:
            if any(ws <= at and at - took <= we for ws, we in self.d.restart_windows()):
                across_restarts += 1
            else:
                hz.append(took)
                if took > 0.05:
                    self.slow_healthz.append(f"{time.strftime('%H:%M:%S', time.localtime(at))} "
                                             f"{took * 1000:.0f} ms")
        p99 = percentile(hz, 99)
        if p99 is not None and p99 > HEALTHZ_P99_LIMIT:
            self.fail(f"/healthz p99 {p99 * 1000:.0f} ms over {HEALTHZ_P99_LIMIT * 1000:.0f} ms")
        if self.rec.hangs:
            self.fail(f"{len(self.rec.hangs)} requests hung past their deadline")
        if self.rec.cuts:
            self.fail(f"{len(self.rec.cuts)} requests dropped while the daemon lived")
        internal = sum(o["status"].get(500, 0) for o in self.rec.ops.values())
        if internal:
            self.fail(f"{internal} answers were 500 (a failure hearth did not classify)")
        mismatches = [m for load in self.loads for m in load.mismatches]
        if mismatches:
            self.fail(f"{len(mismatches)} answers differed from what was sent or asked")
        ops = {}
        for kind, o in self.rec.ops.items():
            ops[kind] = {"count": len(o["lat"]), "p50_ms": ms(percentile(o["lat"], 50)),
                         "p99_ms": ms(percentile(o["lat"], 99)),
                         "status": dict(sorted(o["status"].items(), key=lambda kv: str(kv[0])))}
        probe = self.rec.probe
        return {
            "failed": self.failed,
            "ops": ops,
            "acked": len(acked),
            "lost": lost,
            "leaks": leaks,
            "hangs": self.rec.hangs,
            "cuts": self.rec.cuts,
            "internal": self.rec.internal,
            "mismatches": mismatches,
            "notes": self.rec.notes + [f"slow /healthz answers: {self.slow_healthz}",
                                       f"/healthz probes across a restart: {across_restarts}",
                                       f"daemon unreachable during restarts: {self.rec.down}",
                                       f"probe execs failed: {self.rec.probe_failures}"],
            "daemon_restarts": self.d.restarts,
            "healthz": {"count": len(hz), "p50_ms": ms(percentile(hz, 50)), "p99_ms": ms(p99),
                        "down": self.rec.healthz_down},
            "probe": {"calm_p50_ms": ms(percentile(probe["calm"], 50)),
                      "calm_p99_ms": ms(percentile(probe["calm"], 99)),
                      "fault_p50_ms": ms(percentile(probe["guest_fault"], 50)),
                      "fault_p99_ms": ms(percentile(probe["guest_fault"], 99)),
                      "fault_max_ms": ms(max(probe["guest_fault"], default=None))},
            "daemon": {"start": start, "before_delete": end_usage_before, "end": end,
                       "peak_rss": max(self.rec.peak_rss, end["rss"]),
                       "peak_private": max(self.rec.peak_private, end["private"])},
        }

    def truthful(self, present):
        """A `running` sandbox answers an exec, and so does one its idle timeout paused (the exec
        wakes it); a stopped or failed one has no VMM left."""
        vmm_cmdlines = self.vmm_cmdlines()

        def usable(s):
            return s["state"] == "running" or (s["state"] == "paused" and s.get("reason") == "idle")

        for sid, (tenant, s) in present.items():
            if usable(s):
                for attempt in range(3):
                    status, code, _ = self.api.exec(sid, self.d.tokens[tenant], "true", 30)
                    if code == 0:
                        break
                    time.sleep(5)
                    s = self.api_get(sid, tenant) or s
                    if not usable(s):
                        break
                else:
                    self.fail(f"{sid} says {s['state']} ({s.get('reason')}) but three execs "
                              f"failed (last HTTP {status})")
            if s["state"] in ("stopped", "failed"):
                if not s.get("reason"):
                    self.fail(f"{sid} is {s['state']} without a reason")
                holders = [p for p, c in vmm_cmdlines.items() if sid.encode() in c]
                if holders:
                    self.fail(f"{sid} is {s['state']} but VMM process {holders} still runs")

    def vmm_cmdlines(self):
        found = {}
        for pid in self.d.vmm_pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found[pid] = f.read()
            except OSError:
                pass
        return found

    def api_get(self, sid, tenant):
        status, body = self.api.call("other", "GET", f"/v1/sandboxes/{sid}", self.d.tokens[tenant])
        return json.loads(body) if status == 200 else None

    def accounting(self, present):
        status, body = self.api.call("other", "GET", "/metrics", self.d.tokens["t0"])
        if status != 200:
            self.fail(f"/metrics answered {status}")
            return
        metrics = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split()[:2]
                metrics[name] = float(value)
        self.rec.notes.append(
            f"idle pauses / wakes in the daemon's last life (on_idle: pause): "
            f"{metrics.get('hearth_idle_pauses_total', 0):.0f} / "
            f"{metrics.get('hearth_wakes_total', 0):.0f}")
        holding = [s for _, s in self.listing().values()
                   if s["state"] in ("creating", "running", "stopping")]
        vcpus = sum(s["cpus"] for s in holding)
        memory = sum(s["memory_mib"] for s in holding) << 20
        if metrics.get("hearth_allocated_vcpus") != vcpus:
            self.fail(f"allocated vCPUs {metrics.get('hearth_allocated_vcpus')} in /metrics, "
                      f"{vcpus} held by live sandboxes")
        if metrics.get("hearth_allocated_memory_bytes") != memory:
            self.fail(f"allocated memory {metrics.get('hearth_allocated_memory_bytes')} in "
                      f"/metrics, {memory} held by live sandboxes")

    def delete_all(self, present):
        for sid, (tenant, _) in present.items():
            status, body = self.api.call("delete", "DELETE", f"/v1/sandboxes/{sid}",
                                         self.d.tokens[tenant])
            if status not in (204, 404):
                self.fail(f"deleting {sid} answered {status}: {body[:200]!r}")
        left = self.listing()
        if left:
            self.fail(f"still listed after deleting everything: {sorted(left)}")
        time.sleep(3)  # VMs end asynchronously after the answer

    def leaks(self):
        leaks = [f"VMM process {pid} still runs" for pid in self.d.vmm_pids()]
        leaks += [f"mount {m} left" for m in self.d.mounts_under_home()]
        for sub in PER_SANDBOX:
            for entry in glob.glob(os.path.join(self.d.home, sub, "*")):
                leaks.append(f"{os.path.relpath(entry, self.d.home)} left")
        for path in glob.glob(os.path.join(self.d.home, "**", "*"), recursive=True):
            name = os.path.basename(path)
            if name.endswith((".tmp", ".partial")) or ".tmp." in name or name == "soak-filler":
                leaks.append(f"temp file {os.path.relpath(path, self.d.home)} left")
        ours = []
        for lease in glob.glob(os.path.join(LEASES, "*")):
            try:
                with open(lease) as f:
                    holder = f.read()
            except OSError:
                continue
            if holder.startswith(self.d.home):
                ours.append(os.path.basename(lease))
                leaks.append(f"uid lease {lease} ({holder}) left")
        # Only the uids this daemon's VMMs held: other hearths (the suite's other tests) have theirs.
        for uid in sorted(self.rec.our_uids):
            for cg in glob.glob(f"/sys/fs/cgroup/*/hearth/vmm-{uid}") + \
                    glob.glob(f"/sys/fs/cgroup/hearth/vmm-{uid}"):
                if uid in ours or not os.path.exists(os.path.join(LEASES, uid)):
                    leaks.append(f"cgroup {cg} left")
        return leaks
