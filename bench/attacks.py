#!/usr/bin/env python3
"""The attack corpus against a real `hearth serve` (driven by bench/attacks.sh, which starts the
daemon, the test registry and this script). One line per attack:

    ATTACK                        RESULT      TIME   DAEMON-PEAK-RSS

RESULT is `refused` (the daemon or the guest said no at once), `contained` (the attack ran and its
effect stayed inside its bounds: the sandbox, a size cap, a time cap) or `OPEN` (the defence did
not hold; the script exits 1). TIME is how long the attack took to be refused or contained;
DAEMON-PEAK-RSS is the daemon's VmHWM after it. Standard library only.

Usage: attacks.py ADDR TOKEN OTHER_TOKEN DAEMON_PID REGISTRY WORKDIR HOSTILE_PORT
(the daemon must list 127.0.0.1:HOSTILE_PORT as an insecure registry, so the attacks get past TLS)
"""

import base64
import concurrent.futures
import hashlib
import http.server
import io
import json
import os
import re
import socket
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request

ADDR, TOKEN, OTHER_TOKEN, DAEMON_PID, REGISTRY, WORK, HOSTILE_PORT = sys.argv[1:8]
BASE = f"http://{ADDR}"
RESULTS = []


# ---- plumbing -------------------------------------------------------------------------------------

def call(method, path, body=None, token=TOKEN, raw=None, timeout=600, headers=None):
    """(status, bytes) of one API call; HTTP errors are answers, not exceptions."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    req = urllib.request.Request(BASE + path, method=method, data=data, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except urllib.error.URLError as e:
        # The daemon answered and closed before taking the whole body (a refused upload).
        if isinstance(e.reason, (BrokenPipeError, ConnectionResetError)):
            return 0, f"connection closed mid-body: {e.reason}".encode()
        raise


def python_in(sid, source, timeout=120):
    """Runs a Python program in sandbox `sid` (shipped base64, so any quoting survives)."""
    b64 = base64.b64encode(source.encode()).decode()
    return exec_in(sid, f"echo {b64} | base64 -d > /tmp/attack.py && python3 /tmp/attack.py", timeout)


def exec_in(sid, script, timeout=120, token=TOKEN):
    """Runs `sh -c script` in sandbox `sid`: (exit code or None, stdout+stderr text)."""
    status, body = call("POST", f"/v1/sandboxes/{sid}/exec",
                        {"argv": ["sh", "-c", script], "timeout_seconds": timeout}, token=token,
                        timeout=timeout + 30)
    if status != 200:
        return None, f"HTTP {status}: {body[:300]!r}"
    out, code = [], None
    for line in body.splitlines():
        event = json.loads(line)
        for stream in ("stdout", "stderr"):
            if stream in event:
                out.append(base64.b64decode(event[stream]).decode(errors="replace"))
        if "exit_code" in event:
            code = event["exit_code"]
        if "signal" in event:
            code = 128 + event["signal"]
    return code, "".join(out)


def peak_rss_mib():
    with open(f"/proc/{DAEMON_PID}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def healthy():
    return call("GET", "/healthz", token=None, timeout=10)[0] == 200


def tame(text):
    """An error message a tenant may see: short and printable."""
    return len(text) < 2000 and all(32 <= ord(c) < 127 or c in "\n\t" for c in text)


def attack(name):
    """Decorator: runs the attack, which returns (result, detail); prints its line."""
    def wrap(fn):
        start = time.perf_counter()
        try:
            result, detail = fn()
        except Exception as e:  # an attack that breaks the driver is a finding, not a pass
            result, detail = "OPEN", f"driver error: {e!r}"
        took = time.perf_counter() - start
        if result != "OPEN" and not healthy():
            result, detail = "OPEN", "the daemon stopped answering /healthz"
        RESULTS.append(result)
        print(f"{name:<30} {result:<10} {took * 1000:>8.0f} ms {peak_rss_mib():>8.1f} MiB  {detail}",
              flush=True)
        return fn
    return wrap


def create(image, token=TOKEN, **extra):
    return call("POST", "/v1/sandboxes", {"image": image, **extra}, token=token)


# ---- a hostile registry ---------------------------------------------------------------------------

def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def gnu_sparse_layer():
    """One GNU sparse member (type 'S') claiming a 1 TiB file from 512 stored bytes."""
    h = bytearray(512)
    h[0:6] = b"bomb\0\0"
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"00000001000\0"   # 512 bytes stored
    h[136:148] = b"00000000000\0"
    h[156:157] = b"S"
    h[257:263] = b"ustar "
    h[263:265] = b" \0"
    h[386:398] = b"17777777000\0"   # one chunk: offset near 1 TiB...
    h[398:410] = b"00000001000\0"   # ...of 512 bytes
    h[483:495] = b"20000000000\0"   # real size: 1 TiB
    h[148:156] = b"        "
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h) + b"x" * 512 + b"\0" * 1024


class HostileRegistry(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", int(HOSTILE_PORT)), Handler)
        self.blobs, self.manifests = {}, {}
        self.authorizations = []  # what the "collector" repository was sent
        self.add_image("paxbomb", [tar_bytes([(self.pax_info(), b"")])])
        self.add_image("sparse", [gnu_sparse_layer()])
        self.add_image("manylayers", [tar_bytes([(tarfile.TarInfo(f"f{i}"), b"")]) for i in range(300)])
        self.manifests["escapes"] = json.dumps({
            "schemaVersion": 2, "mediaType": "\x1b[2J\x1b]0;pwned\x07" + "A" * 100000}).encode()

    @staticmethod
    def pax_info():
        info = tarfile.TarInfo("f")
        info.pax_headers = {"comment": "x" * (4 << 20)}
        return info

    def add_image(self, name, layers, media_type="application/vnd.oci.image.layer.v1.tar"):
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [sha(layer) for layer in layers]},
                             "config": {}}).encode()
        self.blobs[sha(config)] = config
        descs = []
        for layer in layers:
            self.blobs[sha(layer)] = layer
            descs.append({"mediaType": media_type, "digest": sha(layer), "size": len(layer)})
        self.manifests[name] = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha(config), "size": len(config)},
            "layers": descs}).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        reg = self.server
        m = re.match(r"^/v2/([^/]+)/(manifests|blobs)/(.+)$", self.path)
        if self.path in ("/v2/", "/v2"):
            return self.send(200, b"{}")
        if not m:
            return self.send(404)
        name, kind, ref = m.groups()
        if name == "endless":  # a manifest that never ends
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b" " * 65536)
            except OSError:
                return
        if name == "metadata":  # a redirect to the cloud metadata service
            return self.send(307, headers=[("Location", "https://169.254.169.254/latest/meta-data/")])
        if name == "realm":  # a token realm on a private address
            return self.send(401, headers=[("WWW-Authenticate",
                                            'Bearer realm="https://10.0.0.1/token",service="x"')])
        if name == "collector":  # asks for Basic credentials, to collect whatever it is sent
            auth = self.headers.get("Authorization")
            if auth:
                reg.authorizations.append(auth)
            return self.send(401, b"{}", [("WWW-Authenticate", 'Basic realm="x"')])
        if name == "errbody":  # a 10 MB error body full of escape codes
            return self.send(500, b"\x1b[31m" * ((10 << 20) // 5))
        if kind == "manifests" and name in reg.manifests:
            body = reg.manifests[name]
            return self.send(200, body, [("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
                                         ("Docker-Content-Digest", sha(body))])
        if kind == "blobs" and ref in reg.blobs:
            return self.send(200, reg.blobs[ref], [("Content-Type", "application/octet-stream")])
        return self.send(404)


# ---- the corpus -----------------------------------------------------------------------------------

def main():
    hostile = HostileRegistry()
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    evil = f"127.0.0.1:{hostile.server_address[1]}"
    print(f"{'ATTACK':<30} {'RESULT':<10} {'TIME':>11} {'PEAK RSS':>12}  DETAIL", flush=True)

    # Hostile tenants at the API.
    @attack("api: no token")
    def _():
        status, _ = call("GET", "/v1/sandboxes", token=None)
        return ("refused", "401") if status == 401 else ("OPEN", f"HTTP {status}")

    @attack("api: 16 MiB JSON body")
    def _():
        status, body = call("POST", "/v1/sandboxes", raw=b'{"image":"' + b"a" * (16 << 20) + b'"}')
        if status in (413, 0):
            return "refused", f"{status or 'closed'} {body[:60].decode(errors='replace')}"
        return "OPEN", f"HTTP {status}"

    for path in ["oci-layout:/etc", "oci-archive:/dev/zero", "oci-layout:/nonexistent"]:
        @attack(f"image: host path {path.split(':')[1]}")
        def _():
            status, body = create(path)
            return ("refused", body.decode()[:60]) if status == 400 else ("OPEN", f"HTTP {status}")

    # Hostile registries and images.
    # Each must fail for its own reason (the regex), not for a generic one like TLS.
    for name, what, why in [
            ("endless", "endless manifest", r"too large|larger|limit|exceed|cap"),
            ("metadata", "redirect to 169.254.169.254", r"refuses.*(link-local|metadata|private)"),
            ("realm", "token realm on 10.0.0.1", r"refuses.*(private|link-local)"),
            ("errbody", "10 MB error body", r"500"),
            ("escapes", "escape codes in manifest", r"media type"),
            ("paxbomb", "4 MiB PAX header", r"(?i)extension|pax|header"),
            ("sparse", "GNU sparse 1 TiB member", r"(?i)sparse"),
            ("manylayers", "300 layers", r"layers")]:
        @attack(f"registry: {what}")
        def _():
            status, body = create(f"{evil}/{name}:latest")
            text = body.decode(errors="replace")
            answer = json.loads(text) if text.startswith("{") else {}
            # Refused at admission (4xx/502), or created and failed at once with the reason.
            reason = answer.get("error") or (answer.get("state") == "failed" and answer.get("reason"))
            if reason and tame(text) and re.search(why, reason):
                return "refused", f"{status} {reason[-90:]}"
            return "OPEN", f"HTTP {status} {text[-160:]!r}"

    @attack("registry: collect credentials")
    def _():
        status, body = create(f"{evil}/collector:latest")
        asked_file = os.path.join(WORK, "docker", "asked")
        asked = open(asked_file).read().split() if os.path.exists(asked_file) else []
        if hostile.authorizations:
            return "OPEN", f"sent {len(hostile.authorizations)} Authorization header(s)"
        if asked != [evil]:
            return "OPEN", f"credential store asked for {asked} (expected only {evil})"
        return "refused", f"{status}; no credentials sent, the store was asked for {evil} only"

    # One sandbox of the python image for the guest attacks (the busybox image lacks python).
    status, body = create(f"{REGISTRY}/hearth-test/python:latest", ttl_seconds=1800)
    assert status == 201, (status, body)
    sid = json.loads(body)["id"]

    @attack("api: other tenant's sandbox")
    def _():
        codes = [call("GET", f"/v1/sandboxes/{sid}", token=OTHER_TOKEN)[0],
                 call("POST", f"/v1/sandboxes/{sid}/exec", {"argv": ["true"]}, token=OTHER_TOKEN)[0],
                 call("DELETE", f"/v1/sandboxes/{sid}", token=OTHER_TOKEN)[0]]
        return ("refused", f"{codes}") if codes == [404] * 3 else ("OPEN", f"{codes}")

    @attack("api: 100 concurrent execs")
    def _():
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            codes = list(pool.map(lambda _: call("POST", f"/v1/sandboxes/{sid}/exec",
                                                 {"argv": ["sleep", "3"]})[0], range(100)))
        busy = codes.count(429)
        return ("refused", f"{busy} answered 429, {codes.count(200)} ran") if busy else ("OPEN", f"{codes}")

    @attack("api: 256 MiB exec output")
    def _():
        before = peak_rss_mib()
        code, _ = exec_in(sid, "head -c 268435456 /dev/zero | tr '\\0' a >/dev/null; "
                               "head -c 33554432 /dev/urandom | base64", timeout=300)
        grew = peak_rss_mib() - before
        return ("contained", f"peak RSS grew {grew:.1f} MiB") if grew < 256 else ("OPEN", f"+{grew:.0f} MiB")

    @attack("api: a template per memory size")
    def _():
        # Each VM size has its own boot template on disk; a tenant cycling sizes must not add one
        # per request (the daemon runs with --max-templates 2; the python sandbox holds one).
        templates = os.path.join(WORK, "home", "templates")
        codes = []
        for mib in range(200, 206):
            status, body = create(f"{REGISTRY}/hearth-test/busybox:latest", memory=f"{mib}m")
            codes.append(status)
            if status == 201:
                call("DELETE", f"/v1/sandboxes/{json.loads(body)['id']}")
        kept = [d for d in os.listdir(templates) if os.path.isdir(os.path.join(templates, d))]
        detail = f"{len(kept)} templates on disk after 6 sizes (creates answered {sorted(set(codes))})"
        return ("contained", detail) if len(kept) <= 2 and codes == [201] * 6 else ("OPEN", detail)

    # Hostile guests (a root workload inside a real VM).
    @attack("guest: load a kernel module")
    def _():
        code, out = python_in(sid, "import ctypes, os\nl = ctypes.CDLL(None, use_errno=True)\n"
                                   "r = l.init_module(b'\\0' * 64, 64, b'')\n"
                                   "print(r, os.strerror(ctypes.get_errno()))\n")
        return ("refused", out.strip()) if "not permitted" in out else ("OPEN", out.strip()[:80])

    @attack("guest: read a block device")
    def _():
        code, out = exec_in(sid, "ls /dev | tr '\\n' ' '; mknod /tmp/vda b 254 0 2>&1; "
                                 "head -c 512 /tmp/vda >/dev/null 2>&1 && echo READ || echo denied")
        return ("refused", "no block device, mknod'd node unreadable") if out.strip().endswith("denied") \
            else ("OPEN", out.strip()[-120:])

    @attack("guest: open the agent channel")
    def _():
        code, out = exec_in(sid, "for d in /dev/vport* /dev/hvc* /dev/vsock /dev/ttyS0 /dev/kmsg /dev/mem; do "
                                 "[ -e $d ] && echo FOUND $d; done; echo checked")
        return ("refused", "no channel, console or memory device") if "FOUND" not in out else ("OPEN", out.strip())

    @attack("guest: chroot escape")
    def _():
        script = ("import os\nos.makedirs('/tmp/x', exist_ok=True)\nfd = os.open('/', os.O_RDONLY)\n"
                  "before = sorted(os.listdir('/'))\n"
                  "try:\n  os.chroot('/tmp/x'); os.fchdir(fd)\n  [os.chdir('..') for _ in range(50)]\n"
                  "  os.chroot('.')\nexcept OSError as e:\n  print('chroot refused', e); raise SystemExit\n"
                  "print('same root' if sorted(os.listdir('/')) == before else 'ESCAPED', sorted(os.listdir('/')))\n")
        code, out = python_in(sid, script)
        return ("refused", out.strip()[:80]) if "ESCAPED" not in out and ("same root" in out or "refused" in out) \
            else ("OPEN", out.strip()[:120])

    @attack("guest: kill -9 -1")
    def _():
        exec_in(sid, "kill -9 -1; sleep 1", timeout=30)
        code, out = exec_in(sid, "echo alive")
        return ("contained", "the next exec still runs") if out.strip() == "alive" else ("OPEN", out[:80])

    @attack("guest: fork bomb")
    def _():
        python_in(sid, "import os\nwhile True:\n  try: os.fork()\n  except OSError: pass\n", timeout=10)
        code, out = exec_in(sid, "echo alive", timeout=60)
        if out.strip() != "alive" or not healthy():
            return "OPEN", f"the sandbox did not survive its own fork bomb: {out.strip()[:120]}"
        return "contained", "daemon healthy, the sandbox answers the next exec"

    @attack("guest: memory bomb")
    def _():
        code, out = python_in(sid, "b = [bytearray(1 << 20) for _ in range(100000)]\n", timeout=120)
        _, alive = exec_in(sid, "echo alive", timeout=60)
        if alive.strip() != "alive":
            return "OPEN", f"the sandbox did not survive its own memory bomb: {alive.strip()[:120]}"
        return "contained", f"killed inside the guest (exit {code}); the sandbox answers the next exec"

    @attack("guest: flood the console")
    def _():
        code, out = exec_in(sid, "for d in /dev/console /dev/ttyS0 /dev/kmsg /dev/hvc0; do "
                                 "[ -c $d ] && echo DEVICE $d; done; mknod /tmp/con c 5 1 && "
                                 "(head -c 1048576 /dev/zero > /tmp/con 2>/dev/null && echo WROTE || echo denied)")
        if "DEVICE" in out or "WROTE" in out:
            return "OPEN", out.strip()[:100]
        return "refused", "no console device; a mknod'd console cannot be opened"

    @attack("guest: network egress")
    def _():
        code, out = python_in(sid, "import socket, time\nt = time.time()\ntry:\n"
                                   "  socket.create_connection(('198.51.100.10', 80), timeout=5); print('CONNECTED')\n"
                                   "except OSError as e: print('refused', e, round(time.time() - t, 3))\n")
        return ("refused", out.strip()[:80]) if "CONNECTED" not in out else ("OPEN", out.strip())

    # The host side of the VM.
    @attack("vmm: runs unprivileged")
    def _():
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        for pid in pids:
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if sid.encode() in cmd and (b"qemu" in cmd or b"firecracker" in cmd):
                status = open(f"/proc/{pid}/status").read()
                uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
                seccomp = re.search(r"^Seccomp:\s+(\d+)", status, re.M).group(1)
                detail = f"uid {uid}, Seccomp {seccomp}"
                return ("contained", detail) if uid != "0" and seccomp == "2" else ("OPEN", detail)
        return "OPEN", "VMM process not found"

    call("DELETE", f"/v1/sandboxes/{sid}")
    hostile.shutdown()
    opened = RESULTS.count("OPEN")
    print(f"{len(RESULTS)} attacks: {RESULTS.count('refused')} refused, {RESULTS.count('contained')} contained, "
          f"{opened} open", flush=True)
    return 1 if opened else 0


if __name__ == "__main__":
    sys.exit(main())
