"""The `hearth serve` under soak: its home on a small loop-mounted ext4 kept in /dev/shm (a real
ENOSPC when full, never the machine's disk), its tokens, starting, killing and restarting it on one
fixed port, and reading its fd count and RSS. Everything else lives under the work directory;
`close` removes it all, VMs, mounts and the image included."""

import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, hearth, work, home_size, tenants, registry):
        self.hearth, self.work = hearth, os.path.abspath(work)
        self.home = os.path.join(self.work, "home")
        self.log = os.path.join(self.work, "daemon.log")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.registry = registry
        self.proc = None
        self.proc_count = 0
        self.started_at = None
        self.restarts = 0
        # True from a kill or SIGTERM until the next daemon answers: calls cut then are expected.
        self.restarting = False
        self.windows = []  # (wall start, wall end) of each kill or SIGTERM until the next answer
        self.window_start = None
        os.makedirs(self.home, exist_ok=True)
        # In RAM (/dev/shm), not on the machine's disk: the faults fill this filesystem, and the
        # disk under the suite may have little room (a CI machine had 3 GB free).
        self.image = tempfile.mkstemp(prefix="hearth-soak-", suffix=".img", dir="/dev/shm")[1]
        image = self.image
        subprocess.run(["truncate", "-s", home_size, image], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
        subprocess.run(["mount", "-o", "loop", image, self.home], check=True)
        os.chmod(self.home, 0o700)
        self.tokens = {t: f"soak-{t}-{secrets.token_hex(8)}" for t in tenants}
        self.tokens_file = os.path.join(self.work, "tokens.toml")
        with open(self.tokens_file, "w") as f:
            for t, tok in self.tokens.items():
                f.write(f'[[tenants]]\nname = "{t}"\ntoken = "{tok}"\n'
                        'quota = { sandboxes = 4 }\n\n')
        os.chmod(self.tokens_file, 0o600)

    def argv(self):
        # --capacity-cpus 8: 1-vCPU sandboxes overcommitted 4:1 on two cores (idle ones cost little);
        # --capacity-disk: sparse 1 GiB disks overcommitted on the 3 GiB home, so that filling them
        # really fills the filesystem.
        return [self.hearth, "-v", "serve", "--listen", f"127.0.0.1:{self.port}",
                "--tokens", self.tokens_file, "--accel", "tcg", "--memory", "256m",
                "--disk", "1g", "--capacity-cpus", "8", "--capacity-disk", "64g",
                "--max-boots", "2", "--dns-upstream", "198.51.100.53",
                "--shutdown-grace", "10s"]

    def start(self, timeout=60):
        env = dict(os.environ, HEARTH_HOME=self.home,
                   HEARTH_KERNEL=os.environ.get("HEARTH_KERNEL", "/var/cache/hearth-test/kernel"),
                   HEARTH_INSECURE_REGISTRIES=self.registry)
        log = open(self.log, "ab")
        log.write(f"\n==== start {time.strftime('%H:%M:%S')} ====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.argv(), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hearth serve exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=2) as r:
                    r.read()
                if os.environ.get("SOAK_DAEMON_NICE"):  # experiment: the control plane first
                    os.setpriority(os.PRIO_PROCESS, self.proc.pid, int(os.environ["SOAK_DAEMON_NICE"]))
                    for t in os.listdir(f"/proc/{self.proc.pid}/task"):
                        os.setpriority(os.PRIO_PROCESS, int(t), int(os.environ["SOAK_DAEMON_NICE"]))
                self.started_at = time.monotonic()
                self.life_start = self.usage()
                self.restarts += 0 if self.proc_count == 0 else 1
                self.proc_count += 1
                self.restarting = False
                if self.window_start is not None:
                    self.windows.append((self.window_start, time.time()))
                    self.window_start = None
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"hearth serve did not listen within {timeout} s; see {self.log}")

    def kill9(self):
        self.restarting = True
        self.window_start = time.time()
        self.proc.kill()
        self.proc.wait()
        self.start()

    def sigterm(self, limit=60):
        """SIGTERM and restart; returns how long the shutdown took (None: hung, killed)."""
        t0 = time.monotonic()
        self.restarting = True
        self.window_start = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=limit)
            took = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            took = None
        self.start()
        return took

    def restart_windows(self):
        """The restarts so far, an unfinished one open until now."""
        open_one = [(self.window_start, time.time())] if self.window_start is not None else []
        return self.windows + open_one

    def usage(self):
        pid = self.proc.pid
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssShmem"):
                    status[key] = int(value.split()[0]) * 1024
        # `rss` includes the binary's own pages (37 MiB of text in a debug build, touched as code
        # paths run); `private` is the memory the daemon allocated, which is what must come back.
        return {"fds": fds, "rss": status.get("VmRSS", 0),
                "private": status.get("RssAnon", 0) + status.get("RssShmem", 0),
                "pid": pid, "uptime_s": time.monotonic() - self.started_at}

    def vmm_pids(self):
        """VMM processes of this daemon's sandboxes (their command lines name the home)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.proc.pid:
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if cmd and os.path.basename(cmd[0]).startswith((b"qemu-system", b"firecracker")) \
                    and any(self.home.encode() in a for a in cmd):
                pids.append(int(entry))
        return pids

    def mounts_under_home(self):
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f
                    if line.split()[4].startswith(self.home + "/")]

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in self.vmm_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for mount in sorted(self.mounts_under_home(), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        subprocess.run(["umount", "-l", self.home], check=False)
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass
