# Sourced by bench scripts that need a real `hearth serve`: a temp work dir, the test registry and a
# daemon with a tokens file, all removed on exit.
#
#   bench_daemon_init NAME        work dir /tmp/hearth-bench-NAME.XXXXXX in $work, the test registry in
#                                 $HEARTH_TEST_REGISTRY (started unless given), HEARTH_HOME/KERNEL set
#   bench_daemon_start ARGS...    starts `$hearth serve --listen 127.0.0.1:0 --tokens $work/tokens.toml
#                                 ARGS...`; sets $addr and $daemon_pid
#   bench_release_daemon NAME IMAGE ARGS...
#                                 all of the above for a one-tenant bench: provisions, builds the release
#                                 hearth and the agent, writes a tokens file ($token), starts the daemon
#                                 with ARGS; sets $hearth, $image ($HEARTH_TEST_REGISTRY/hearth-test/IMAGE)
# $hearth must name the binary; tokens.toml is the caller's to write before starting (made 0600 here).

bench_daemon_cleanup() {
    if [ -n "${daemon_pid:-}" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid"; wait "$daemon_pid" || true
    fi
    # VMs of the daemon are detached: kill any left over (their command lines name this work dir).
    for pid in $(pgrep -f -- "$work/home" || true); do kill -KILL "$pid" 2>/dev/null || true; done
    [ -n "${HEARTH_TEST_REGISTRY_OWNED:-}" ] && scripts/test-registry.sh stop "$work/registry"
    rm -rf "$work"
}

bench_daemon_init() {
    work=$(mktemp -d "/tmp/hearth-bench-$1.XXXXXX")
    daemon_pid=""
    trap bench_daemon_cleanup EXIT
    if [ -z "${HEARTH_TEST_REGISTRY:-}" ]; then
        HEARTH_TEST_REGISTRY=$(scripts/test-registry.sh start "$work/registry")
        HEARTH_TEST_REGISTRY_OWNED=1
    fi
    export HEARTH_HOME=$work/home HEARTH_KERNEL=/var/cache/hearth-test/kernel
    export HEARTH_INSECURE_REGISTRIES=$HEARTH_TEST_REGISTRY
}

bench_daemon_start() {
    chmod 600 "$work/tokens.toml"  # the daemon refuses a tokens file others can read
    "$hearth" serve --listen 127.0.0.1:0 --tokens "$work/tokens.toml" "$@" \
        > "$work/daemon.out" 2> "$work/daemon.log" &
    daemon_pid=$!
    for _ in $(seq 100); do grep -q '^listening on ' "$work/daemon.out" && break; sleep 0.1; done
    addr=$(sed -n 's/^listening on //p' "$work/daemon.out")
    [ -n "$addr" ] || { echo "hearth serve did not start:" >&2; cat "$work/daemon.log" >&2; exit 1; }
}

bench_release_daemon() {
    local name=$1 test_image=$2
    shift 2
    scripts/provision.sh > /dev/null
    cargo build --quiet --release -p hearth
    export HEARTH_AGENT
    HEARTH_AGENT=$(scripts/build-agent.sh)
    hearth=${CARGO_TARGET_DIR:-$PWD/target}/release/hearth
    bench_daemon_init "$name"
    image=$HEARTH_TEST_REGISTRY/hearth-test/$test_image
    token=bench-token-$RANDOM$RANDOM
    printf '[[tenants]]\nname = "bench"\ntoken = "%s"\n' "$token" > "$work/tokens.toml"
    bench_daemon_start "$@"
}
