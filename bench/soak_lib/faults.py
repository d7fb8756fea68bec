"""The fault injector: at random moments, one fault from the menu of issue #17 — the daemon killed
(-9) or terminated, a VMM killed or frozen, a guest that kills everything it sees, exhausts its
memory, forks without limit, fills its disk or floods its console, the home filesystem full, the
registry gone mid-pull or slow. Daemon restarts stop in the run's last third, so that the final
daemon's fd count and RSS are measured over a long life. `undo_all` puts everything back."""

import json
import os
import signal
import subprocess
import threading
import time

GUEST_FAULTS = {
    # A 600 MB line held whole by `tail` in a 256 MiB guest.
    "guest_oom": ("head -c 600000000 /dev/zero | tail -n 1 | wc -c", 40),
    "guest_forkbomb": ("f() { f | f & }; f; sleep 30", 15),
    "guest_fill_disk": ("dd if=/dev/zero of=/soak-fill bs=1M 2>&1 | tail -n 1; sync; "
                        "rm -f /soak-fill", 120),
    "guest_console_flood": ("for c in /dev/console /dev/kmsg /dev/tty0; do "
                            "(while :; do echo floodfloodfloodfloodflood; done > $c) & done; "
                            "sleep 10", 12),
    "guest_kill_all": ("kill -9 -1; sleep 1", 10),
}


class Injector(threading.Thread):
    def __init__(self, daemon, proxy, api, ledger, rec, stop, rng, duration, enabled=True):
        super().__init__(daemon=True, name="injector")
        self.enabled = enabled
        self.daemon_, self.proxy, self.api, self.ledger = daemon, proxy, api, ledger
        self.rec, self.stop, self.rng = rec, stop, rng
        self.quiet_after = time.monotonic() + duration * 2 / 3
        self.counts = {}
        self.guest_fault_until = 0.0
        self.stopped_vmms = set()
        self.filler = os.path.join(daemon.home, "soak-filler")
        self.side = []
        self.shutdowns = []
        self.every = (3.0, 9.0) if duration < 600 else (8.0, 30.0)

    def guest_fault_active(self):
        return time.monotonic() < self.guest_fault_until

    def count(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def run(self):
        menu = ["daemon_kill9", "daemon_sigterm", "vmm_kill9", "vmm_freeze", "home_full",
                "registry_down", "registry_slow"] + list(GUEST_FAULTS)
        while not self.stop.wait(self.rng.uniform(*self.every)):
            if not self.enabled:
                continue
            name = self.rng.choice(menu)
            if name.startswith("daemon_") and time.monotonic() > self.quiet_after:
                continue
            try:
                done = getattr(self, name, None)
                if done is not None:
                    ran = done()
                else:
                    ran = self.guest(name)
                if ran is not False:
                    self.count(name)
                    target = f" ({ran})" if ran else ""
                    print(f"soak: {time.strftime('%H:%M:%S')} fault {name}{target}", flush=True)
            except Exception as e:
                self.rec.note(f"fault {name} could not be injected: {type(e).__name__}: {e}")

    # ---- the daemon -------------------------------------------------------------------------------

    def daemon_kill9(self):
        self.daemon_.kill9()

    def daemon_sigterm(self):
        took = self.daemon_.sigterm()
        self.shutdowns.append(took)
        if took is None:
            self.rec.note("SIGTERM: the daemon did not exit within 60 s and was killed")

    # ---- VMMs -------------------------------------------------------------------------------------

    def victim_vmm(self):
        probe = [s for s, v in self.ledger.snapshot().items() if v["tenant"] == "probe"]
        pids = [p for p in self.daemon_.vmm_pids() if not self.cmdline_names(p, probe)]
        return self.rng.choice(pids) if pids else None

    @staticmethod
    def cmdline_names(pid, ids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            return False
        return any(i.encode() in cmd for i in ids)

    def vmm_kill9(self):
        pid = self.victim_vmm()
        if pid is None:
            return False
        target = self.vmm_of(pid)
        os.kill(pid, signal.SIGKILL)
        return target

    def vmm_of(self, pid):
        """Which sandbox a VMM process runs (its run directory is named after it)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            return f"pid {pid}"
        for part in cmd.split("/run/")[1:]:
            return f"pid {pid}, sandbox {part.split('/')[0]}"
        return f"pid {pid}"

    def vmm_freeze(self):
        """A guest that stops answering: its VMM frozen for 20 s."""
        pid = self.victim_vmm()
        if pid is None:
            return False
        target = self.vmm_of(pid)
        os.kill(pid, signal.SIGSTOP)
        self.stopped_vmms.add(pid)
        self.later(20, lambda: self.thaw(pid))
        return target

    def thaw(self, pid):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        self.stopped_vmms.discard(pid)

    # ---- guests -----------------------------------------------------------------------------------

    def guest(self, name):
        live = [s for s, v in self.ledger.snapshot().items()
                if not v["deleted"] and v["tenant"] != "probe"]
        if not live:
            return False
        sid = self.rng.choice(live)
        tenant = self.ledger.acked[sid]["tenant"]
        script, limit = GUEST_FAULTS[name]
        self.guest_fault_until = max(self.guest_fault_until, time.monotonic() + limit + 5)
        self.side_thread(lambda: self.api.exec(sid, self.daemon_.tokens[tenant], script, limit))
        return sid

    # ---- the host ---------------------------------------------------------------------------------

    def home_full(self):
        st = os.statvfs(self.daemon_.home)
        free = st.f_bavail * st.f_frsize
        if free < 64 << 20:
            return False
        subprocess.run(["fallocate", "-l", str(free - (16 << 20)), self.filler], check=True)
        self.later(20, self.free_home)

    def free_home(self):
        try:
            os.unlink(self.filler)
        except FileNotFoundError:
            pass

    def registry_down(self):
        """The registry gone mid-pull: a create of a fresh image starts, then the registry goes."""
        tag = self.proxy.push_variant("hearth-test/busybox", "latest", 4 << 20)
        self.side_thread(lambda: self.create(tag))
        time.sleep(self.rng.uniform(0.0, 1.0))
        self.proxy.set_mode("down")
        self.later(15, lambda: self.proxy.set_mode("ok"))

    def registry_slow(self):
        tag = self.proxy.push_variant("hearth-test/busybox", "latest", 2 << 20)
        self.proxy.set_mode("slow")
        self.side_thread(lambda: self.create(tag))
        self.later(25, lambda: self.proxy.set_mode("ok"))

    def create(self, tag):
        tenant = self.rng.choice(["t0", "t1", "t2"])
        if len(self.ledger.live(tenant)) >= 4:
            return
        status, body = self.api.call(
            "create", "POST", "/v1/sandboxes", self.daemon_.tokens[tenant],
            {"image": f"{self.proxy.addr}/hearth-test/busybox:{tag}", "wait": True,
             "ttl_seconds": 60})
        if status in (200, 201, 202):
            self.ledger.add(json.loads(body)["id"], tenant, 60)

    # ---- plumbing ---------------------------------------------------------------------------------

    def later(self, seconds, undo):
        t = threading.Timer(seconds, undo)
        t.daemon = True
        t.start()
        self.side.append((t, undo))

    def side_thread(self, fn):
        t = threading.Thread(target=fn, daemon=True)
        t.start()
        self.side.append((t, None))

    def undo_all(self):
        for t, undo in self.side:
            if isinstance(t, threading.Timer) and t.is_alive():
                t.cancel()
                undo()
        for pid in list(self.stopped_vmms):
            self.thaw(pid)
        self.free_home()
        self.proxy.set_mode("ok")
        for t, _ in self.side:
            t.join(timeout=200)
