#!/usr/bin/env bash
# Density (issue #14): COUNT idle busybox sandboxes of 512 MiB at once on this node, the host memory
# each costs (MemAvailable drop, VMM PSS and RSS) and whether each still answers an exec within 1 s
# (bench/density.py). Starts a daemon (temp HEARTH_HOME, test registry, release build) whose capacity
# is set for the run (--capacity-cpus/--capacity-memory: 100 x 512 MiB of guest memory is more than
# the host has, which is the point of sharing it); everything is deleted at the end.
#
# Usage: bench/density.sh [COUNT]   (default 100; root; provisions like scripts/test.sh)
# HEARTH_TCG_CACHE=MIB sets the daemon's --tcg-cache (translation cache per VM; default 128).
# ON_IDLE=pause: then the same sandboxes all paused by their idle timeout (`on_idle: pause`), and
# each woken by an exec (bench/density.py --on-idle-pause).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/daemon.sh
count=${1:-100}

bench_release_daemon density busybox --accel tcg --memory 512m --capacity-disk 400g \
    --capacity-cpus $((count + 8)) --capacity-memory "$((count * 512 + 4096))m"

python3 bench/density.py --host "http://$addr" --token "$token" --image "$image" \
    --home "$HEARTH_HOME" --count "$count" $([ "${ON_IDLE:-}" = pause ] && echo --on-idle-pause)
