#!/usr/bin/env bash
# The attack corpus of issue #12 against a real `hearth serve`: hostile tenants at the API, a hostile
# registry and hostile images (bench/attacks.py serves them), and a hostile root workload inside a
# real guest. One line per attack: refused / contained / OPEN, the time it took, the daemon's peak
# RSS after it. Exits 1 if any attack is OPEN. The daemon is the debug build the tests use (what is
# measured is behaviour and bounds, not speed).
#
# Usage: bench/attacks.sh   (root; provisions like scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/daemon.sh

scripts/provision.sh test > /dev/null
cargo build --quiet -p hearth
export HEARTH_AGENT
HEARTH_AGENT=$(scripts/build-agent.sh)
hearth=${CARGO_TARGET_DIR:-$PWD/target}/debug/hearth

bench_daemon_init attacks
token=attack-token-$RANDOM$RANDOM
other=other-token-$RANDOM$RANDOM
printf '[[tenants]]\nname = "mallory"\ntoken = "%s"\n\n[[tenants]]\nname = "alice"\ntoken = "%s"\n' \
    "$token" "$other" > "$work/tokens.toml"

# Warm-up: pull the image and build the initramfs once, outside the measurements.
"$hearth" run --accel tcg --memory 256m "$HEARTH_TEST_REGISTRY/hearth-test/python" true

# The hostile registry (bench/attacks.py serves it) is reached over plain HTTP, as the test registry
# is, so that its attacks get past TLS to what they attack.
hostile_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export HEARTH_INSECURE_REGISTRIES=$HEARTH_TEST_REGISTRY,127.0.0.1:$hostile_port
# The operator's login for the test registry sits in a Docker credential store, which docker asks
# for every host: the hostile registry's Basic challenge must get nothing from it. The helper logs
# every host it is asked for ($work/docker/asked).
mkdir -p "$work/docker"
cat > "$work/docker/docker-credential-attackstore" <<EOF
#!/bin/sh
read -r server || true
echo "\$server" >> "$work/docker/asked"
if [ "\$server" = "$HEARTH_TEST_REGISTRY" ]; then
  printf '{"ServerURL":"%s","Username":"operator","Secret":"s3cret"}' "\$server"
else
  echo "credentials not found in native keychain"; exit 1
fi
EOF
chmod 755 "$work/docker/docker-credential-attackstore"
echo '{"credsStore": "attackstore"}' > "$work/docker/config.json"
export DOCKER_CONFIG=$work/docker PATH=$work/docker:$PATH
bench_daemon_start --accel tcg --memory 512m --max-upload 1m --max-boots 2 --max-templates 2
python3 bench/attacks.py "$addr" "$token" "$other" "$daemon_pid" "$HEARTH_TEST_REGISTRY" "$work" \
    "$hostile_port"
