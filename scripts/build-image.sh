#!/usr/bin/env bash
# Build hearth's OCI image without a Docker daemon, reproducibly, as an OCI image layout; push it if asked.
#
#   scripts/build-image.sh [--profile release|debug | --binary FILE] [--out DIR] [--tag TAG]
#                          [--kernel DIR] [--push REGISTRY/REPO[:TAG]] [--insecure] [--fast]
#
# Two layers, both built from this machine's files:
#   1. runtime: what hearth runs besides itself — qemu-system-x86_64 with its firmware (/usr/share/qemu,
#      /usr/share/seabios), mkfs.ext4 and dumpe2fs, the shared libraries of all of these and of hearth
#      (found with ldd), the CA bundle for registry TLS, a minimal /etc/passwd, /tmp, /var/lib/hearth;
#   2. hearth: /usr/bin/hearth (debug info stripped), the static guest agent from scripts/build-agent.sh
#      at /usr/lib/hearth/hearth-agent, the guest kernel (vmlinuz, release, modules/) at
#      /usr/lib/hearth/kernel; the config's Env points HEARTH_AGENT and HEARTH_KERNEL there.
#
# Reproducible: every entry's mtime is SOURCE_DATE_EPOCH (default: the last commit's time), owners are
# 0:0, entries are sorted, modes normalised, no atime/ctime/xattrs, gzip stores no name or time, and the
# config's created time is SOURCE_DATE_EPOCH too. The same inputs give the same manifest digest.
#
# --profile (default release) picks the cargo build of hearth; --binary takes an already built hearth
# instead (no cargo run); --fast compresses with gzip -1 (tests);
# --push copies the layout to a registry with skopeo, digests preserved (--insecure: plain HTTP, no TLS
# verification). Prints the manifest digest (sha256:...) on stdout; logs go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
out=target/image
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
tag=$version
kernel=${HEARTH_TEST_CACHE:-/var/cache/hearth-test}/kernel
push=
insecure=
binary=
level=6
usage="usage: build-image.sh [--profile release|debug | --binary FILE] [--out DIR] [--tag TAG] [--kernel DIR] [--push REF] [--insecure] [--fast]"
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile=${2:?$usage}; shift 2 ;;
    --binary) binary=${2:?$usage}; shift 2 ;;
    --out) out=${2:?$usage}; shift 2 ;;
    --tag) tag=${2:?$usage}; shift 2 ;;
    --kernel) kernel=${2:?$usage}; shift 2 ;;
    --push) push=${2:?$usage}; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --fast) level=1; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
    esac
done
log() { echo "build-image: $*" >&2; }

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2> /dev/null || echo 0)}
export LC_ALL=C TZ=UTC
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
for tool in tar gzip sha256sum ldd strip; do
    command -v "$tool" > /dev/null || { log "$tool is missing"; exit 1; }
done
for f in vmlinuz release modules; do
    [ -e "$kernel/$f" ] || { log "no $kernel/$f: run scripts/provision.sh (or give --kernel DIR)"; exit 1; }
done
qemu=$(command -v qemu-system-x86_64) || { log "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"; exit 1; }
mkfs=$(PATH=$PATH:/usr/sbin:/sbin command -v mkfs.ext4) || { log "mkfs.ext4 missing (e2fsprogs)"; exit 1; }
dumpe2fs=$(PATH=$PATH:/usr/sbin:/sbin command -v dumpe2fs) || { log "dumpe2fs missing (e2fsprogs)"; exit 1; }

if [ -n "$binary" ]; then
    bin=$binary
else
    case "$profile" in
    release) cargo build --quiet --release -p hearth ;;
    debug) cargo build --quiet -p hearth ;;
    *) echo "$usage" >&2; exit 2 ;;
    esac
    bin=${CARGO_TARGET_DIR:-$PWD/target}/$profile/hearth
fi
agent=$(scripts/build-agent.sh)

work=$(mktemp -d "${TMPDIR:-/tmp}/hearth-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
runtime=$work/runtime
app=$work/hearth
mkdir -p "$runtime" "$app"

# ---- layer 1: runtime ----
copy_file() { # PATH: copy PATH (symlinks followed) to the same path in the runtime tree
    mkdir -p "$runtime$(dirname "$1")"
    cp -L "$1" "$runtime$1"
}
for exe in "$bin" "$qemu" "$mkfs" "$dumpe2fs"; do
    ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}'
done | sort -u | while read -r lib; do copy_file "$lib"; done
for exe in "$qemu" "$mkfs" "$dumpe2fs"; do copy_file "$exe"; done
for dir in /usr/share/qemu /usr/share/seabios; do
    [ -d "$dir" ] || continue
    mkdir -p "$runtime$(dirname "$dir")"
    cp -a "$dir" "$runtime$dir"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then copy_file /etc/ssl/certs/ca-certificates.crt; fi
mkdir -p "$runtime/etc" "$runtime/tmp" "$runtime/var/lib/hearth" "$runtime/usr/bin"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin\n' > "$runtime/etc/passwd"
printf 'root:x:0:\nkvm:x:108:\nnogroup:x:65534:\nnonroot:x:65532:\n' > "$runtime/etc/group"

# ---- layer 2: hearth ----
mkdir -p "$app/usr/bin" "$app/usr/lib/hearth/kernel"
strip --strip-debug -o "$app/usr/bin/hearth" "$bin"
cp "$agent" "$app/usr/lib/hearth/hearth-agent"
cp "$kernel/vmlinuz" "$kernel/release" "$app/usr/lib/hearth/kernel/"
cp -a "$kernel/modules" "$app/usr/lib/hearth/kernel/modules"

# ---- layout ----
rm -rf "$out"
mkdir -p "$out/blobs/sha256"
blob() { # FILE -> moves FILE into the layout, prints its digest (sha256:...)
    local sum
    sum=$(sha256sum "$1" | cut -d' ' -f1)
    mv "$1" "$out/blobs/sha256/$sum"
    echo "sha256:$sum"
}
size() { stat -c %s "$out/blobs/sha256/${1#sha256:}"; }
layer() { # TREE NAME -> sets LAYER_DIGEST, LAYER_SIZE, LAYER_DIFF_ID
    local tree=$1
    chmod -R u+rwX,go+rX,go-w "$tree"
    chmod 1777 "$tree/tmp" 2> /dev/null || true
    local entries
    mapfile -t entries < <(cd "$tree" && ls -A | sort)
    tar --create --directory "$tree" --sort=name --mtime="@$SOURCE_DATE_EPOCH" \
        --owner=0 --group=0 --numeric-owner --format=posix \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        --no-acls --no-xattrs --no-selinux "${entries[@]}" > "$work/$2.tar"
    LAYER_DIFF_ID="sha256:$(sha256sum "$work/$2.tar" | cut -d' ' -f1)"
    gzip -n "-$level" "$work/$2.tar"
    LAYER_DIGEST=$(blob "$work/$2.tar.gz")
    LAYER_SIZE=$(size "$LAYER_DIGEST")
    log "layer $2: $LAYER_DIGEST ($LAYER_SIZE bytes)"
}
layer "$runtime" runtime
l1=("$LAYER_DIGEST" "$LAYER_SIZE" "$LAYER_DIFF_ID")
layer "$app" hearth
l2=("$LAYER_DIGEST" "$LAYER_SIZE" "$LAYER_DIFF_ID")

cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","created":"$created","config":{"Entrypoint":["/usr/bin/hearth"],"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","HEARTH_HOME=/var/lib/hearth","HEARTH_AGENT=/usr/lib/hearth/hearth-agent","HEARTH_KERNEL=/usr/lib/hearth/kernel"],"Labels":{"org.opencontainers.image.title":"hearth","org.opencontainers.image.version":"$version"}},"rootfs":{"type":"layers","diff_ids":["${l1[2]}","${l2[2]}"]},"history":[{"created":"$created","created_by":"scripts/build-image.sh: runtime"},{"created":"$created","created_by":"scripts/build-image.sh: hearth"}]}
JSON
config=$(blob "$work/config.json")
cat > "$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$config","size":$(size "$config")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"${l1[0]}","size":${l1[1]}},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"${l2[0]}","size":${l2[1]}}],"annotations":{"org.opencontainers.image.created":"$created","org.opencontainers.image.version":"$version"}}
JSON
manifest=$(blob "$work/manifest.json")
printf '{"imageLayoutVersion":"1.0.0"}\n' > "$out/oci-layout"
cat > "$out/index.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"$manifest","size":$(size "$manifest"),"annotations":{"org.opencontainers.image.ref.name":"$tag"}}]}
JSON
log "OCI layout $out, tag $tag, manifest $manifest"

if [ -n "$push" ]; then
    command -v skopeo > /dev/null || { log "skopeo missing (apt-get install skopeo)"; exit 1; }
    case "${push##*/}" in *:*) ;; *) push="$push:$tag" ;; esac
    tls=()
    [ -z "$insecure" ] || tls=(--dest-tls-verify=false)
    skopeo copy --quiet --preserve-digests "${tls[@]}" "oci:$out:$tag" "docker://$push" >&2
    log "pushed docker://$push"
fi
echo "$manifest"
