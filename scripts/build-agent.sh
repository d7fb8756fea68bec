#!/usr/bin/env bash
# Build the guest agent as a static binary (static-pie, glibc) that runs as PID 1 in an empty root.
# The explicit --target keeps RUSTFLAGS away from build scripts and proc macros. Symbols are
# stripped: a smaller initramfs unpacks faster at every boot.
# Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS='-C target-feature=+crt-static -C strip=symbols' cargo build --quiet --release \
    --target x86_64-unknown-linux-gnu -p hearth-agent
target=${CARGO_TARGET_DIR:-$PWD/target}
echo "$target/x86_64-unknown-linux-gnu/release/hearth-agent"
