#!/usr/bin/env bash
# Build a real Firecracker and its jailer once into the test cache, for the tests that talk to the real
# binary (crates/hearth-vm/tests/firecracker_binary.rs; they skip with a reason when the binaries are
# absent). Idempotent: does nothing when both binaries are already cached.
#
# Needs git directories of firecracker-microvm/firecracker and firecracker-microvm/micro-http
# (FIRECRACKER_GIT / MICRO_HTTP_GIT, by default the workplace's mirrors under /work/.mirror) and the
# shared build script beside the repository (../shared/firecracker/build-firecracker.sh). When either
# is missing it says why and exits 0: the real-binary tests then skip.
set -euo pipefail

CACHE=${HEARTH_TEST_CACHE:-/var/cache/hearth-test}
out="$CACHE/firecracker"
fc_git=${FIRECRACKER_GIT:-/work/.mirror/firecracker-microvm+firecracker/repo}
mh_git=${MICRO_HTTP_GIT:-/work/.mirror/firecracker-microvm+micro-http/repo}
build="$(dirname "$0")/../../shared/firecracker/build-firecracker.sh"

if [ -x "$out/firecracker" ] && [ -x "$out/jailer" ]; then
    exit 0
fi
for need in "$fc_git" "$mh_git"; do
    if [ ! -d "$need" ]; then
        echo "provision-firecracker: skipping: no git directory at $need (set FIRECRACKER_GIT / MICRO_HTTP_GIT)" >&2
        exit 0
    fi
done
if [ ! -x "$build" ]; then
    echo "provision-firecracker: skipping: no build script at $build" >&2
    exit 0
fi

echo "provision-firecracker: building Firecracker and jailer into $out (about 5 minutes)" >&2
mkdir -p "$CACHE"
# Build beside the final place and rename, so an interrupted build never leaves half a cache.
tmp=$(mktemp -d "$CACHE/firecracker.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$build" "$fc_git" "$mh_git" "$tmp" >&2
rm -rf "$out"
mv "$tmp" "$out"
chmod 755 "$out"
trap - EXIT
echo "provision-firecracker: $(cat "$out/VERSION")" >&2
