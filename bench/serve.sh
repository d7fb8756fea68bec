#!/usr/bin/env bash
# hearth serve under a burst of creates, against sequential `hearth run` boots, in the same run.
#
#   serve:  a daemon (temp HEARTH_HOME, test registry, busybox, --max-boots 2) gets N (default 20)
#           concurrent `POST /v1/sandboxes` (each waits until its sandbox runs). Meanwhile /healthz is
#           sampled every ~10 ms on fresh connections; reported: healthz p50/p99/max (target p99 < 50 ms)
#           and the time from the first create until all N sandboxes run.
#   run:    N sequential `hearth run <busybox> true` (image cached), total wall time.
# Prints both and the ratio serve-all-ready / run-total. Everything is deleted and stopped at the end.
#
# Usage: bench/serve.sh [N]   (default 20; root; provisions like scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/daemon.sh
count=${1:-20}

scripts/provision.sh > /dev/null
cargo build --quiet --release -p hearth
export HEARTH_AGENT
HEARTH_AGENT=$(scripts/build-agent.sh)
target=${CARGO_TARGET_DIR:-$PWD/target}
hearth=$target/release/hearth

bench_daemon_init serve
image=$HEARTH_TEST_REGISTRY/hearth-test/busybox
token=bench-token-$RANDOM$RANDOM
printf '[[tenants]]\nname = "bench"\ntoken = "%s"\n' "$token" > "$work/tokens.toml"

# Warm-up: pull the image, build the initramfs, measure the TSC once (all cached in the home).
"$hearth" run --accel tcg --memory 256m "$image" true

# Room for every sandbox and for the boot template's memory copy their restores share.
bench_daemon_start --accel tcg --memory 256m \
    --max-boots 2 --capacity-cpus "$count" --capacity-memory "$((count * 256 + 256))m"

python3 - "$addr" "$token" "$image" "$count" > "$work/serve.txt" <<'PY'
import concurrent.futures, json, statistics, sys, threading, time, urllib.request
addr, token, image, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = f"http://{addr}"
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.status, r.read()
done = threading.Event()
samples = []
def sample():
    while not done.is_set():
        t = time.perf_counter()
        with urllib.request.urlopen(base + "/healthz", timeout=10) as r:
            r.read()
        samples.append(time.perf_counter() - t)
        time.sleep(0.01)
sampler = threading.Thread(target=sample); sampler.start()
start = time.perf_counter()
def create(_):
    status, body = call("POST", "/v1/sandboxes", {"image": image})
    record = json.loads(body)
    return status, record["id"], record["state"], time.perf_counter() - start
with concurrent.futures.ThreadPoolExecutor(count) as pool:
    results = list(pool.map(create, range(count)))
all_ready = time.perf_counter() - start
done.set(); sampler.join()
states = [r[2] for r in results]
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda r: call("DELETE", f"/v1/sandboxes/{r[1]}"), results))
ms = sorted(s * 1000 for s in samples)
p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]
print(f"serve_all_ready {all_ready:.3f}")
print(f"running {states.count('running')} of {count}")
print(f"healthz samples {len(ms)} p50 {p(0.50):.2f} ms p99 {p(0.99):.2f} ms max {ms[-1]:.2f} ms")
print("ready_at " + " ".join(f"{r[3]:.1f}" for r in sorted(results, key=lambda r: r[3])))
PY
kill -TERM "$daemon_pid"; wait "$daemon_pid"; daemon_pid=""
cat "$work/serve.txt"

start=$(date +%s.%N)
for _ in $(seq "$count"); do "$hearth" run --accel tcg --memory 256m "$image" true; done
end=$(date +%s.%N)
python3 - "$work/serve.txt" "$start" "$end" "$count" <<'PY'
import sys
lines = dict(l.split(" ", 1) for l in open(sys.argv[1]).read().splitlines())
serve = float(lines["serve_all_ready"])
run = float(sys.argv[3]) - float(sys.argv[2])
n = int(sys.argv[4])
print(f"serve: {n} concurrent creates (max 2 boots at once) all running after {serve:.3f} s")
print(f"serve: healthz during the boots: {lines['healthz']} (target p99 < 50 ms)")
print(f"run:   {n} sequential `hearth run busybox true` took {run:.3f} s ({run / n:.3f} s each)")
print(f"ratio serve-all-ready / sequential-runs = {serve / run:.3f}")
PY
