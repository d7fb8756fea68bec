#!/usr/bin/env bash
# Provision what hearth's Kubernetes tests need, idempotently: Debian's etcd-server and openssl, a kubectl,
# and a kube-apiserver built from Debian bookworm's `kubernetes` source package (1.20.2), cached at
# $CACHE/kube/kube-apiserver with $CACHE/kube/version. No registry ships a kube-apiserver binary, so it is
# built offline from the source package's vendor/ tree with Debian's golang-1.19-go (about 11 minutes cold
# on two cores); the cached binary makes every later run skip the build.
#
# The vendored modern-go/reflect2 1.0.1 segfaults under Go 1.19 on the first custom-object POST, so the
# build swaps in Debian's golang-github-modern-go-reflect2-dev (1.0.2).
#
# Downloads nothing but Debian packages and Debian source packages. Logs to stderr; stdout stays quiet.
set -euo pipefail

CACHE=${HEARTH_TEST_CACHE:-/var/cache/hearth-test}
out="$CACHE/kube"
log() { echo "provision-kube: $*" >&2; }

packages=(etcd-server openssl)
[ -x "$out/kube-apiserver" ] || packages+=(golang-1.19-go golang-github-modern-go-reflect2-dev dpkg-dev make rsync)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
updated=
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q >&2
    updated=1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# kubectl: any recent one talks to a 1.20 server. Debian's kubernetes-client (1.20) is the fallback.
if ! command -v kubectl > /dev/null 2>&1; then
    log "kubectl is absent; installing Debian's kubernetes-client"
    [ -n "$updated" ] || apt-get update -q >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kubernetes-client >&2; then
        log "WARNING: no kubectl could be installed; the tests that need kubectl will skip"
    fi
fi

if [ -x "$out/kube-apiserver" ]; then
    log "kube-apiserver cached at $out/kube-apiserver ($(cat "$out/version" 2>/dev/null || echo '?'))"
    exit 0
fi

# `apt-get source` needs a deb-src entry for bookworm; add one in our own file if none exists.
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
    log "adding a deb-src entry for bookworm (/etc/apt/sources.list.d/hearth-bookworm-src.sources)"
    cat > /etc/apt/sources.list.d/hearth-bookworm-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -q >&2
fi

mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/kube-build.XXXXXX")
chmod 755 "$work"  # apt-get source downloads as _apt
trap 'rm -rf "$work"' EXIT
log "fetching the kubernetes source package into $work"
(cd "$work" && apt-get source -q kubernetes >&2)
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
[ -n "$src" ] || { log "apt-get source kubernetes left no kubernetes-* directory in $work"; exit 1; }

# Debian's version is e.g. 1.20.5+really1.20.2-1.1+deb12u1: the code is upstream 1.20.2.
debver=$(cd "$src" && dpkg-parsechangelog -S Version)
upstream=${debver%%-*}
upstream=${upstream##*really}
major=${upstream%%.*}
minor=${upstream#*.}
minor=${minor%%.*}

reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -f "$reflect2/reflect2.go" ] || { log "$reflect2 is missing (golang-github-modern-go-reflect2-dev)"; exit 1; }
log "replacing vendor/github.com/modern-go/reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
rm -rf "$src/vendor/github.com/modern-go/reflect2"
mkdir -p "$src/vendor/github.com/modern-go/reflect2"
# The .s files matter: they let the package declare go:linkname functions without bodies.
find "$reflect2" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' -o -name LICENSE \) ! -name '*_test.go' \
    -exec cp {} "$src/vendor/github.com/modern-go/reflect2/" \;

# Without a git tree the build stamps no version; kubectl and clients then see v0.0.0. Stamp the real one.
cat > "$work/version.env" <<VER
KUBE_GIT_COMMIT='0000000000000000000000000000000000000000'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='v$upstream'
KUBE_GIT_MAJOR='$major'
KUBE_GIT_MINOR='$minor'
VER

log "building kube-apiserver v$upstream (debian $debver) with go 1.19; this takes about 11 minutes"
start=$(date +%s)
(
    cd "$src"
    export PATH=/usr/lib/go-1.19/bin:$PATH
    export GOCACHE="$work/gocache" GOPATH="$work/gopath" HOME="$work"
    export CGO_ENABLED=0 GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on
    export KUBE_GIT_VERSION_FILE="$work/version.env"
    make WHAT=cmd/kube-apiserver >&2
)
bin=$(find "$src/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
[ -n "$bin" ] || { log "the build produced no kube-apiserver under $src/_output"; exit 1; }
log "built in $(( $(date +%s) - start )) s"

mkdir -p "$out"
cp "$bin" "$out/kube-apiserver.tmp"
echo "v$upstream (debian kubernetes $debver, reflect2 $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev), $(/usr/lib/go-1.19/bin/go version))" > "$out/version"
mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
log "cached $out/kube-apiserver: $(cat "$out/version")"
