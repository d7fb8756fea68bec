#!/usr/bin/env bash
# hearth's main job end to end on a fresh Debian 12 machine: provision what the demo needs (packages,
# the guest kernel, the test images it runs; not the test suite's extras), build hearth and its static
# guest agent, serve the project's test images from a local registry, then run commands inside a
# microVM booted from an OCI image. Extra arguments replace the demo command:
#   scripts/demo.sh                         # python3 -c 'print(6*7)' and uname -r in the python image
#   scripts/demo.sh busybox uname -a        # any test image (busybox, python, layers, scratch) and command
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/provision.sh demo ${1:+"$1"}
cargo build --quiet --release -p hearth
HEARTH_AGENT=$(scripts/build-agent.sh)
export HEARTH_AGENT
export HEARTH_HOME=${HEARTH_HOME:-/var/lib/hearth}
hearth=target/release/hearth

state=$(mktemp -d /tmp/hearth-demo-registry.XXXXXX)
trap 'scripts/test-registry.sh stop "$state"' EXIT
registry=$(scripts/test-registry.sh start "$state")
export HEARTH_INSECURE_REGISTRIES=$registry

"$hearth" setup
if [ $# -gt 0 ]; then
    image=$1; shift
    "$hearth" run "$registry/hearth-test/$image" "$@"
else
    echo "+ hearth run $registry/hearth-test/python python3 -c 'print(6*7)'" >&2
    "$hearth" run "$registry/hearth-test/python" python3 -c 'print(6*7)'
    echo "+ hearth run $registry/hearth-test/python uname -r   (the guest's kernel; the host runs $(uname -r))" >&2
    "$hearth" run "$registry/hearth-test/python" uname -r
fi
