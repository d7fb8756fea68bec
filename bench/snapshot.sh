#!/usr/bin/env bash
# Pause, resume and fork of a live sandbox through a real `hearth serve`, against cold and template
# creates of the same image, in the same run (busybox, 512 MiB guests, TCG).
#
#   create:  template create (`POST /v1/sandboxes` answered `running`; the boot template already
#            built by a warm-up create) and cold create (a second daemon with --no-snapshot).
#   dirty:   the measured sandbox writes ~100 MiB of random bytes to /dev/shm (guest memory).
#   pause:   `POST .../pause` wall time; the snapshot's size on disk (sparse, du, without the link
#            to its template's memory) and its state file's; first of the sandbox idle, then
#            after the dirtying.
#   resume:  `POST .../resume` until its first exec (`true`) has answered (idle, then dirtied).
#   fork:    `POST .../fork {"count": 1}` and `{"count": 10}` wall time (answered with every child
#            running; children start in the daemon's boot slots, --max-boots 2), then the first
#            exec in the first child.
#   code:    (python image) resume until the first code call has answered: the interpreter kept
#            across the pause, against a fresh one started by that call.
#   warm:    a third daemon with --warm-pool IMAGE=20: once all 20 are ready, 20 sequential creates
#            that each take one (p50/p99 at the API).
# Each measured step runs RUNS times (default 3); prints the median and the spread. Everything is
# deleted and stopped at the end.
#
# Usage: bench/snapshot.sh [RUNS]   (root; provisions like scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/daemon.sh
runs=${1:-3}

scripts/provision.sh test > /dev/null
cargo build --quiet --release -p hearth
export HEARTH_AGENT
HEARTH_AGENT=$(scripts/build-agent.sh)
target=${CARGO_TARGET_DIR:-$PWD/target}
hearth=$target/release/hearth

bench_daemon_init snapshot
image=$HEARTH_TEST_REGISTRY/hearth-test/busybox
token=bench-token-$RANDOM$RANDOM
printf '[[tenants]]\nname = "bench"\ntoken = "%s"\n' "$token" > "$work/tokens.toml"
# Twelve 512 MiB sandboxes at once (a parent, ten children and one more) must fit.
daemon_args=(--accel tcg --memory 512m --capacity-cpus 16 --capacity-memory 8g --capacity-disk 1t)

measure() {  # measure MODE: runs the Python driver against the daemon at $addr
    python3 - "$addr" "$token" "$image" "$runs" "$1" "$HEARTH_HOME" <<'PY'
import json, os, statistics, subprocess, sys, time, urllib.error, urllib.request
addr, token, image, runs, mode, home = sys.argv[1:7]
runs = int(runs)
base = f"http://{addr}"

def send(method, path, body=None):
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, method=method,
        data=None if body is None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {path}: {e.code} {e.read().decode()}")

def call(method, path, body=None):
    status, text = send(method, path, body)
    return status, json.loads(text) if text else None

def exec_ok(id, script):
    _, text = send("POST", f"/v1/sandboxes/{id}/exec", {"argv": ["sh", "-c", script]})
    last = json.loads(text.splitlines()[-1])
    assert last == {"exit_code": 0}, (script, last)

def create():
    t = time.perf_counter()
    status, record = call("POST", "/v1/sandboxes", {"image": image})
    assert record["state"] == "running", record
    return record["id"], time.perf_counter() - t

def report(name, samples, unit="s"):
    med = statistics.median(samples)
    print(f"{name:<34} median {med:7.3f} {unit}  (min {min(samples):.3f}, max {max(samples):.3f}, n={len(samples)})")

if mode == "warm":
    # 20 claims from a pool of 20, each answered before the next is sent.
    def metric(name):
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return int(float(line.split()[1]))
    deadline = time.time() + 600
    while metric("hearth_warm_pool_ready") < 20:
        assert time.time() < deadline, "the pool never filled"
        time.sleep(0.5)
    ids, times = [], []
    for _ in range(20):
        t = time.perf_counter()
        status, record = call("POST", "/v1/sandboxes", {"image": image})
        times.append((time.perf_counter() - t) * 1000)
        assert record.get("warm") is True, record
        ids.append(record["id"])
    times.sort()
    print(f"{'warm pool create (20 claims)':<34} p50 {statistics.median(times):7.1f} ms  p99 {times[-1]:.1f} ms  (min {times[0]:.1f})")
    for id in ids:
        call("DELETE", f"/v1/sandboxes/{id}")
    sys.exit(0)

if mode == "cold":
    ids, times = zip(*(create() for _ in range(runs)))
    report("cold create (--no-snapshot)", times)
    for id in ids:
        call("DELETE", f"/v1/sandboxes/{id}")
    sys.exit(0)

create_warm = create()  # builds the boot template
call("DELETE", f"/v1/sandboxes/{create_warm[0]}")
templ = []
for _ in range(runs):
    id, t = create(); templ.append(t); call("DELETE", f"/v1/sandboxes/{id}")
report("template create", templ)

def cycles(id):
    """Pause and resume `id` RUNS times: pause times, snapshot sizes (MiB: on disk without the
    link to the template memory it shares with its template, and its state file), resume times."""
    pause, disk, state, resume = [], [], [], []
    for _ in range(runs):
        t = time.perf_counter(); call("POST", f"/v1/sandboxes/{id}/pause"); pause.append(time.perf_counter() - t)
        snapshot = f"{home}/node/paused/{id}"
        du = subprocess.run(["du", "-sk", "--exclude=memory.base", snapshot], capture_output=True, text=True)
        disk.append(int(du.stdout.split()[0]) / 1024)
        state.append(os.stat(f"{snapshot}/state").st_size / (1 << 20))
        t = time.perf_counter(); call("POST", f"/v1/sandboxes/{id}/resume"); exec_ok(id, "true")
        resume.append(time.perf_counter() - t)
    return pause, disk, state, resume

parent, _ = create()
exec_ok(parent, "true")
pause, disk, state, resume = cycles(parent)
report("pause (idle)", pause)
report("  its saved state", state, "MiB")
report("resume to first exec (idle)", resume)
exec_ok(parent, "dd if=/dev/urandom of=/dev/shm/dirty bs=1M count=100 2>/dev/null")
pause, disk, state, resume = cycles(parent)
report("pause (100 MiB dirtied)", pause)
report("paused sandbox on disk", disk, "MiB")
report("  its saved state", state, "MiB")
report("resume to first exec answered", resume)

for count in (1, 10):
    forks, first = [], []
    for _ in range(runs):
        t = time.perf_counter()
        status, answer = call("POST", f"/v1/sandboxes/{parent}/fork", {"count": count})
        forks.append(time.perf_counter() - t)
        children = [c["id"] for c in answer["sandboxes"]]
        assert status == 201 and len(children) == count, answer
        t = time.perf_counter(); exec_ok(children[0], "test -s /dev/shm/dirty"); first.append(time.perf_counter() - t)
        for id in children:
            call("DELETE", f"/v1/sandboxes/{id}")
    report(f"fork of {count} (all running)", forks)
    report(f"  then first exec in a child", first)
call("DELETE", f"/v1/sandboxes/{parent}")

# The code interpreter across a pause (python image): resume until the first code call has
# answered, with the interpreter kept (its `x` still there) against a fresh one, as every resume
# meant before interpreters were kept: the same resume, then a reset, then the call (timed apart
# and added, the reset left out).
status, record = call("POST", "/v1/sandboxes", {"image": image.rsplit("/", 1)[0] + "/python"})
py = record["id"]
def code(source):
    _, answer = call("POST", f"/v1/sandboxes/{py}/code", {"code": source, "timeout_seconds": 300})
    assert answer["error"] is None, answer
    return answer
code("x = 41")
kept, fresh = [], []
for _ in range(runs):
    call("POST", f"/v1/sandboxes/{py}/pause")
    t = time.perf_counter(); call("POST", f"/v1/sandboxes/{py}/resume"); answer = code("x + 1")
    kept.append(time.perf_counter() - t)
    assert (answer["result"], answer["restarted"]) == ("42", False), answer
    call("POST", f"/v1/sandboxes/{py}/pause")
    t = time.perf_counter(); call("POST", f"/v1/sandboxes/{py}/resume"); resumed = time.perf_counter() - t
    call("DELETE", f"/v1/sandboxes/{py}/code")
    t = time.perf_counter(); answer = code("x = 41"); fresh.append(resumed + time.perf_counter() - t)
    assert answer["execution_count"] == 1, answer
report("resume to first code call, kept", kept)
report("  the same with a fresh interpreter", fresh)
call("DELETE", f"/v1/sandboxes/{py}")
PY
}

bench_daemon_start "${daemon_args[@]}"
measure snapshot
kill -TERM "$daemon_pid"; wait "$daemon_pid"; daemon_pid=""

bench_daemon_start "${daemon_args[@]}" --no-snapshot
measure cold
kill -TERM "$daemon_pid"; wait "$daemon_pid"; daemon_pid=""

# Warm pool: 20 ready VMs (and room for the refill), then 20 claims.
bench_daemon_start --accel tcg --memory 512m --capacity-cpus 40 --capacity-memory 20g \
    --capacity-disk 1t --warm-pool "$image=20"
measure warm
kill -TERM "$daemon_pid"; wait "$daemon_pid"; daemon_pid=""
# The pool's VMs outlive the daemon by design; the next daemon would remove them.
for pid in $(pgrep -f -- "$work/home" || true); do kill -KILL "$pid" 2>/dev/null || true; done
for ns in $(awk -v home="$work/home/" 'index($5, home) == 1 {print $5}' /proc/self/mountinfo); do
    umount -l "$ns" || true
done
