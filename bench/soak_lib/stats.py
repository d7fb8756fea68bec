"""What the soak measures while it runs: every API call by kind (status, latency, hung past its
deadline, daemon unreachable), `/healthz` latency every 200 ms, and a probe sandbox's `exec true`
latency with and without a guest fault raging in another sandbox; plus the report's text form."""

import glob
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with getattr(self, "lock", threading.Lock()):
            self.ops = {}  # kind -> {"status": {code: n}, "lat": [s]}
            self.hangs = []
            self.cuts = []
            self.internal = []  # every 500: what was asked and what came back
            self.down = {}
            self.notes = []
            self.healthz_samples = []  # (wall time answered, seconds)
            self.healthz_down = 0
            self.probe = {"calm": [], "guest_fault": []}
            self.probe_failures = 0
            self.peak_rss = 0
            self.peak_private = 0
            self.our_uids = set()

    def op(self, kind, status, took):
        with self.lock:
            o = self.ops.setdefault(kind, {"status": {}, "lat": []})
            o["status"][status] = o["status"].get(status, 0) + 1
            o["lat"].append(took)

    def hung(self, kind, path, took):
        with self.lock:
            self.hangs.append({"kind": kind, "path": path, "after_s": round(took, 1)})

    def cut(self, kind, path, why):
        with self.lock:
            self.cuts.append({"kind": kind, "path": path, "why": why})

    def internal_error(self, kind, method, path, body):
        with self.lock:
            self.internal.append({"kind": kind, "request": f"{method} {path}",
                                  "answer": body[:600].decode(errors="replace")})

    def unreachable(self, kind):
        with self.lock:
            self.down[kind] = self.down.get(kind, 0) + 1

    def note(self, text):
        with self.lock:
            self.notes.append(text)
        print(f"soak: {text}", flush=True)


# Probes `/healthz` from its own process, so that the soak's busy threads (and their GIL) never
# add to the latency measured: one line per probe, seconds or "down".
HEALTHZ_PROBE = """
import sys, time, urllib.request
url = sys.argv[1]
while True:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read()
        print(time.monotonic() - t0, time.time(), flush=True)
    except Exception:
        print("down", flush=True)
    time.sleep(0.2)
"""


class Healthz(threading.Thread):
    def __init__(self, daemon, rec, stop):
        super().__init__(daemon=True, name="healthz")
        self.daemon_, self.rec, self.stop = daemon, rec, stop

    def run(self):
        probe = subprocess.Popen([sys.executable, "-c", HEALTHZ_PROBE, self.daemon_.base + "/healthz"],
                                 stdout=subprocess.PIPE, text=True)
        reader = threading.Thread(target=self.read, args=(probe.stdout,), daemon=True)
        reader.start()
        while not self.stop.wait(1.0):
            self.sample()
        probe.kill()
        probe.wait()

    def read(self, lines):
        for line in lines:
            if line.strip() == "down":
                self.rec.healthz_down += 1
            else:
                took, at = line.split()
                self.rec.healthz_samples.append((float(at), float(took)))

    def sample(self):
        """The daemon's RSS and private memory (for the run's peaks) and the VMM uids its sandboxes hold."""
        try:
            usage = self.daemon_.usage()
            self.rec.peak_rss = max(self.rec.peak_rss, usage["rss"])
            self.rec.peak_private = max(self.rec.peak_private, usage["private"])
        except (OSError, ValueError):
            pass  # between a kill and its restart
        for lease in glob.glob("/run/hearth/vmm-uids/*"):
            try:
                with open(lease) as f:
                    if f.read().startswith(self.daemon_.home):
                        self.rec.our_uids.add(os.path.basename(lease))
            except OSError:
                pass


class Probe(threading.Thread):
    """`exec true` in the probe sandbox every second: how much another sandbox's fault delays it."""

    def __init__(self, api, sid, token, injector, rec, stop):
        super().__init__(daemon=True, name="probe")
        self.api, self.sid, self.token, self.injector = api, sid, token, injector
        self.rec, self.stop = rec, stop
        self.ended = False

    def run(self):
        while not self.stop.wait(1.0):
            during = self.injector.guest_fault_active()
            t0 = time.monotonic()
            status, code, _ = self.api.exec(self.sid, self.token, "true", 30)
            took = time.monotonic() - t0
            if code == 0:
                self.rec.probe["guest_fault" if during else "calm"].append(took)
            elif status is not None:
                self.rec.probe_failures += 1
                if status == 409 and not self.ended:
                    # The probe sandbox itself ended: say how, once (its later execs all fail).
                    got, body = self.api.call("other", "GET", f"/v1/sandboxes/{self.sid}", self.token)
                    if got == 200:
                        s = json.loads(body)
                        self.ended = True
                        self.rec.note(f"the probe sandbox is {s['state']} since "
                                      f"{time.strftime('%H:%M:%S')}: {s.get('reason')}")


def ms(v):
    return "-" if v is None else f"{v * 1000:.0f}"


def render(report):
    lines = ["", "soak report", "===========",
             f"duration {report['duration_s']:.0f} s, seed {report['seed']}, "
             f"daemon restarts {report['daemon_restarts']}", "",
             "operations      count   p50 ms  p99 ms  statuses"]
    for kind, o in sorted(report["ops"].items()):
        lines.append(f"{kind:<14}{o['count']:>7}{o['p50_ms']:>9}{o['p99_ms']:>8}  {o['status']}")
    lines.append("")
    lines.append("faults: " + ", ".join(f"{k} {v}" for k, v in sorted(report["faults"].items())))
    h = report["healthz"]
    lines.append(f"/healthz: {h['count']} answered, p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms; "
                 f"{h['down']} while the daemon was down")
    p = report["probe"]
    lines.append(f"probe exec true: calm p50 {p['calm_p50_ms']} / p99 {p['calm_p99_ms']} ms; "
                 f"during a guest fault elsewhere p50 {p['fault_p50_ms']} / p99 {p['fault_p99_ms']} ms"
                 f" (max {p['fault_max_ms']} ms)")
    d = report["daemon"]
    lines.append(f"daemon (last life, {d['end']['uptime_s']:.0f} s): fds {d['start']['fds']} -> "
                 f"{d['end']['fds']}, private memory {d['start']['private'] >> 20} -> "
                 f"{d['end']['private'] >> 20} MiB (peak of the run {d['peak_private'] >> 20} MiB), "
                 f"RSS {d['start']['rss'] >> 20} -> {d['end']['rss'] >> 20} MiB "
                 f"(peak {d['peak_rss'] >> 20} MiB)")
    lines.append(f"sandboxes acknowledged {report['acked']}, lost {len(report['lost'])}, "
                 f"leaks {len(report['leaks'])}, hung requests {len(report['hangs'])}, "
                 f"requests dropped by a living daemon {len(report['cuts'])}")
    for title, items in (("LOST", report["lost"]), ("LEAK", report["leaks"]),
                         ("HUNG", report["hangs"]), ("CUT", report["cuts"]), ("500", report.get("internal", [])),
                         ("MISMATCH", report["mismatches"]),
                         ("note", report["notes"])):
        for item in items:
            lines.append(f"  {title}: {item}")
    lines.append("")
    lines.append("FAILED: " + "; ".join(report["failed"]) if report["failed"] else "all checks held")
    return "\n".join(lines)
