#!/usr/bin/env bash
# Provision what one of hearth's commands needs on a fresh Debian 12 machine, idempotently. Caches
# under /var/cache/hearth-test (HEARTH_TEST_CACHE). Downloads nothing but packages from Debian's and
# crates.io's registries.
#
#   provision.sh demo [IMAGE...]   what scripts/demo.sh needs: the Debian packages hearth and the test
#                                  registry use, the guest kernel (Debian's linux-image-cloud-amd64,
#                                  downloaded and unpacked, not installed), the test images busybox and
#                                  python, plus any other test IMAGE named
#   provision.sh [test]            what scripts/test.sh needs: every package the suite uses,
#                                  cargo-nextest, the guest kernel, every test image, then
#                                  scripts/provision-kube.sh (kube-apiserver) and, when present,
#                                  scripts/provision-firecracker.sh (Firecracker and its jailer)
set -euo pipefail

CACHE=${HEARTH_TEST_CACHE:-/var/cache/hearth-test}
here=$(cd "$(dirname "$0")" && pwd)
what=${1:-test}
[ $# -gt 0 ] && shift

# Packages hearth, the test registry and the image builder use (the demo's set); nftables holds each
# sandbox namespace's firewall.
packages=(qemu-system-x86 e2fsprogs docker-registry skopeo debootstrap busybox-static zstd curl
          ca-certificates python3 nftables)
case "$what" in
demo)
    images=(busybox python "$@") ;;
test)
    [ $# -eq 0 ] || { echo "provision: 'test' takes no arguments" >&2; exit 2; }
    # iproute2: the fake internet's namespaces and routes; gcc, libc6-dev: a static attack helper
    # built for the guest; util-linux: nsenter.
    # python3-venv: the suite's Python environment (scripts/python-env.sh).
    packages+=(umoci jq cpio file iproute2 gcc libc6-dev util-linux python3-venv)
    images=() ;;  # build-test-images.py builds every image when given none
*)
    echo "usage: provision.sh demo [IMAGE...] | provision.sh [test]" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "provision: installing ${missing[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if [ "$what" = test ] && ! cargo nextest --version > /dev/null 2>&1; then
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
    mkdir -p "$CACHE"
    work=$(mktemp -d "$CACHE.kernel.XXXXXX")
    (cd "$work" && apt-get download "$pkg" >&2 && dpkg-deb -x ./*.deb x)
    mkdir -p "$work/out"
    cp "$work/x/boot/vmlinuz-$release" "$work/out/vmlinuz"
    cp -a "$work/x/lib/modules/$release" "$work/out/modules"
    echo "$release" > "$work/out/release"
    rm -rf "$kernel"
    mv "$work/out" "$kernel"
    rm -rf "$work"
fi

python3 "$here/build-test-images.py" "$CACHE/images" "${images[@]}"

if [ "$what" = test ]; then
    "$here/python-env.sh" > /dev/null
    "$here/provision-kube.sh"
    if [ -f "$here/provision-firecracker.sh" ]; then
        bash "$here/provision-firecracker.sh"  # skips by itself, saying why, when it cannot build
    fi
fi
