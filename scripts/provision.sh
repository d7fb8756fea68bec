#!/usr/bin/env bash
# Provision everything hearth's tests and demo need on a fresh Debian 12 machine, idempotently:
# Debian packages, cargo-nextest, the guest kernel (Debian's linux-image-cloud-amd64, downloaded and
# unpacked, not installed) and the project's own test images. Caches under /var/cache/hearth-test.
# Downloads nothing but packages from Debian's and crates.io's registries.
set -euo pipefail

CACHE=${HEARTH_TEST_CACHE:-/var/cache/hearth-test}
here=$(cd "$(dirname "$0")" && pwd)

packages=(qemu-system-x86 e2fsprogs docker-registry skopeo umoci debootstrap busybox-static zstd
          curl ca-certificates python3 jq cpio file)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "provision: installing ${missing[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if ! cargo nextest --version > /dev/null 2>&1; then
    echo "provision: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest >&2
fi

# The guest kernel, in the layout of hearth's kernel directory: vmlinuz, release, modules/.
kernel="$CACHE/kernel"
if [ ! -f "$kernel/release" ]; then
    echo "provision: fetching the guest kernel (linux-image-cloud-amd64)" >&2
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$pkg" ] || { apt-get update -q >&2;
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}'); }
    release=${pkg#linux-image-}
    work=$(mktemp -d "$CACHE.kernel.XXXXXX")
    (cd "$work" && apt-get download "$pkg" >&2 && dpkg-deb -x ./*.deb x)
    mkdir -p "$work/out"
    cp "$work/x/boot/vmlinuz-$release" "$work/out/vmlinuz"
    cp -a "$work/x/lib/modules/$release" "$work/out/modules"
    echo "$release" > "$work/out/release"
    rm -rf "$kernel"
    mkdir -p "$CACHE"
    mv "$work/out" "$kernel"
    rm -rf "$work"
fi

python3 "$here/build-test-images.py" "$CACHE/images"

"$here/provision-kube.sh"
