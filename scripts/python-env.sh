#!/usr/bin/env bash
# The Python environment the suite's Python-side tests use (the SDK's pytest run, the OpenAPI
# validator and a generated client): a venv at $HEARTH_TEST_CACHE/venv with the packages pinned in
# scripts/test-requirements.txt, from PyPI. Idempotent: reinstalls only when the requirements change.
# Prints the venv's directory.
set -euo pipefail

CACHE=${HEARTH_TEST_CACHE:-/var/cache/hearth-test}
here=$(cd "$(dirname "$0")" && pwd)
venv="$CACHE/venv"
reqs="$here/test-requirements.txt"
stamp="$venv/.requirements"

# Test processes run this at once (nextest runs test binaries in parallel): one installs, the
# others wait for it.
mkdir -p "$CACHE"
exec 9> "$CACHE/venv.lock"
flock 9

if [ ! -x "$venv/bin/python" ]; then
    echo "python-env: creating $venv" >&2
    python3 -m venv "$venv" >&2
fi
if ! cmp -s "$reqs" "$stamp"; then
    echo "python-env: installing $(grep -cv '^\s*\(#\|$\)' "$reqs") packages from PyPI" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$reqs" >&2
    cp "$reqs" "$stamp"
fi
echo "$venv"
