#!/usr/bin/env python3
"""Build hearth's test images as OCI image layouts, from Debian packages only.

Images (each an OCI layout directory under OUT/<name>, tag `latest`):
  busybox    one gzip layer: Debian's busybox-static plus its applet links, /etc/passwd, /etc/group
  python     one gzip layer: Debian bookworm minbase with python3 and pip (debootstrap, cached), without
             apt's package lists and caches or docs, man pages and translations; no PEP 668 marker,
             so `pip install` works as in the official python images
  layers     three layers (gzip, zstd, plain tar) exercising whiteouts, opaque directories, hard links,
             symlinks, owners, modes, setuid, device nodes, xattrs (security.capability) and timestamps
  multiarch  an OCI index with linux/amd64 and linux/arm64 manifests; /platform names the platform
  scratch    one gzip layer holding only /bin/busybox (Debian's busybox-static): no /etc at all, no
             User, like an image built FROM scratch around a static binary; Cmd `/bin/busybox id`
  symlinks   a hostile image: busybox with /etc a symlink to `/` and /tmp a symlink to `../../..`,
             so that following them at boot would take the agent's writes out of the workload root

Idempotent: an image whose layout already exists with the same recipe version is left alone.
Usage: build-test-images.py OUT_DIR [NAME...]   (default: every image)
"""

import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

RECIPE_VERSION = "5"  # bump when an image's content changes
# The python image's Debian packages; the cached debootstrap root is rebuilt when this changes.
PYTHON_PACKAGES = "python3,python3-pip"
MTIME = 1700000000
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_GZIP = MT_TAR + "+gzip"
MT_ZSTD = MT_TAR + "+zstd"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A VFS_CAP_REVISION_2 security.capability value granting cap_net_bind_service (bit 10), effective.
CAP_NET_BIND_SERVICE = (
    (0x02000000 | 0x000001).to_bytes(4, "little")
    + (1 << 10).to_bytes(4, "little") + (0).to_bytes(4, "little")
    + (0).to_bytes(4, "little") + (0).to_bytes(4, "little")
)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout being written: content-addressed blobs plus index.json."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)

    def blob(self, data, media_type, **extra):
        digest = sha256(data)
        with open(os.path.join(self.path, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
        desc = {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}
        desc.update(extra)
        return desc

    def image(self, layers, config, arch="amd64"):
        """layers: list of (uncompressed tar bytes, media type). Returns the manifest descriptor."""
        descs, diff_ids = [], []
        for tar_bytes, media_type in layers:
            diff_ids.append("sha256:" + sha256(tar_bytes))
            descs.append(self.blob(compress(tar_bytes, media_type), media_type))
        cfg = {
            "created": "2023-11-14T22:13:20Z",
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "hearth test image"}
                        for _ in layers],
        }
        cfg_desc = self.blob(canonical(cfg), MT_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cfg_desc,
                    "layers": descs}
        return self.blob(canonical(manifest), MT_MANIFEST,
                         platform={"architecture": arch, "os": "linux"})

    def finish(self, top_desc, tag="latest"):
        top_desc = dict(top_desc)
        top_desc.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = tag
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [top_desc]}
        with open(os.path.join(self.path, "index.json"), "wb") as f:
            f.write(canonical(index))
        with open(os.path.join(self.path, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def compress(data, media_type):
    if media_type == MT_GZIP:
        return gzip.compress(data, compresslevel=6, mtime=0)
    if media_type == MT_ZSTD:
        return subprocess.run(["zstd", "-q", "-c", "-3"], input=data, check=True,
                              stdout=subprocess.PIPE).stdout
    return data


class TarBuilder:
    """Builds an uncompressed layer tarball entry by entry (PAX format, so xattrs survive)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name, kind, mode, uid=0, gid=0, xattrs=None):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, MTIME
        ti.uname = ti.gname = ""
        if xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: v.decode("latin-1") for k, v in xattrs.items()}
        return ti

    def dir(self, name, mode=0o755, **kw):
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, **kw))

    def file(self, name, data, mode=0o644, **kw):
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))

    def symlink(self, name, target):
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def hardlink(self, name, target):
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target
        self.tar.addfile(ti)

    def chardev(self, name, major, minor, mode=0o666):
        ti = self._info(name, tarfile.CHRTYPE, mode)
        ti.devmajor, ti.devminor = major, minor
        self.tar.addfile(ti)

    def bytes(self):
        self.tar.close()
        return self.buf.getvalue()


def busybox_layer():
    t = TarBuilder()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "home", "proc", "sys",
              "dev", "run", "var"):
        t.dir(d, 0o700 if d == "root" else 0o755)
    t.dir("tmp", 0o1777)
    with open("/bin/busybox", "rb") as f:
        t.file("bin/busybox", f.read(), 0o755)
    applets = subprocess.run(["/bin/busybox", "--list-full"], check=True, text=True,
                             stdout=subprocess.PIPE).stdout.split()
    for path in sorted(set(applets)):
        if path != "bin/busybox":
            t.symlink(path, os.path.relpath("bin/busybox", os.path.dirname(path)))
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                         b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    t.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return t.bytes()


def build_busybox(layout):
    config = {"Env": [PATH_ENV, "IMAGE_VAR=from-image"], "Cmd": ["sh"], "WorkingDir": "/home"}
    layout.finish(layout.image([(busybox_layer(), MT_GZIP)], config))


def build_python(layout, cache):
    root = os.path.join(os.path.dirname(cache), "python-root")
    stamp = root + ".packages"  # beside the root, so not in the image
    if not (os.path.exists(stamp) and open(stamp).read() == PYTHON_PACKAGES):
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "--include=" + PYTHON_PACKAGES,
                        "bookworm", tmp, "http://deb.debian.org/debian"],
                       check=True, stdout=subprocess.DEVNULL)
        for marker in glob.glob(os.path.join(tmp, "usr/lib/python3*/EXTERNALLY-MANAGED")):
            os.remove(marker)
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
        with open(stamp, "w") as f:
            f.write(PYTHON_PACKAGES)
    # GNU tar keeps owners, modes, hard links and xattrs exactly as debootstrap left them.
    excluded = ["./proc/*", "./sys/*", "./dev/*", "./var/cache/apt/*", "./var/lib/apt/lists/*",
                "./usr/share/doc/*", "./usr/share/man/*", "./usr/share/info/*",
                "./usr/share/locale/*"]
    tar_bytes = subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--sort=name", "--format=pax"]
        + ["--exclude=" + e for e in excluded] + ["-C", root, "-cf", "-", "."],
        check=True, stdout=subprocess.PIPE).stdout
    config = {"Env": [PATH_ENV, "LANG=C.UTF-8"], "Cmd": ["python3"], "WorkingDir": "/"}
    layout.finish(layout.image([(tar_bytes, MT_GZIP)], config))


def build_layers(layout):
    one = TarBuilder()
    for d in ("etc", "opt", "opt/opq", "data", "bin", "srv", "dev"):
        one.dir(d)
    one.file("etc/base.txt", b"base\n")
    one.file("etc/gone.txt", b"to be whited out\n")
    one.file("opt/opq/old.txt", b"hidden by an opaque directory\n")
    one.file("data/hard-a", b"linked\n")
    one.hardlink("data/hard-b", "data/hard-a")
    one.file("bin/tool", b"#!/bin/sh\necho tool\n", 0o755,
             xattrs={"security.capability": CAP_NET_BIND_SERVICE, "user.note": b"hi"})
    one.file("srv/owned", b"owned\n", 0o640, uid=1234, gid=5678)
    one.file("srv/setuid", b"setuid\n", 0o4755)
    one.chardev("dev/null-ish", 1, 3)
    one.symlink("link-rel", "etc/base.txt")

    two = TarBuilder()
    two.dir("etc")
    two.file("etc/.wh.gone.txt", b"")
    two.file("etc/base.txt", b"override\n")
    two.dir("opt/opq")
    two.file("opt/opq/.wh..wh..opq", b"")
    two.file("opt/opq/new.txt", b"new\n")

    three = TarBuilder()
    three.dir("data")
    three.file("data/third.txt", b"3\n")
    three.dir("emptydir", 0o700)

    config = {"Env": [PATH_ENV, "LAYERS=3"], "Cmd": ["/bin/tool"], "WorkingDir": "/data"}
    layers = [(one.bytes(), MT_GZIP), (two.bytes(), MT_ZSTD), (three.bytes(), MT_TAR)]
    layout.finish(layout.image(layers, config))


def build_multiarch(layout):
    manifests = []
    for arch in ("amd64", "arm64"):
        t = TarBuilder()
        t.file("platform", f"linux/{arch}".encode())
        manifests.append(layout.image([(t.bytes(), MT_GZIP)], {"Cmd": ["/platform"]}, arch))
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}
    layout.finish(layout.blob(canonical(index), MT_INDEX))


def build_scratch(layout):
    t = TarBuilder()
    t.dir("bin")
    with open("/bin/busybox", "rb") as f:
        t.file("bin/busybox", f.read(), 0o755)
    layout.finish(layout.image([(t.bytes(), MT_GZIP)], {"Cmd": ["/bin/busybox", "id"]}))


def build_symlinks(layout):
    t = TarBuilder()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "root", "proc", "sys", "dev", "run"):
        t.dir(d)
    t.symlink("etc", "/")
    t.symlink("tmp", "../../..")
    with open("/bin/busybox", "rb") as f:
        t.file("bin/busybox", f.read(), 0o755)
    t.symlink("bin/sh", "busybox")
    config = {"Env": [PATH_ENV], "Cmd": ["sh"]}
    layout.finish(layout.image([(t.bytes(), MT_GZIP)], config))


BUILDERS = {"busybox": build_busybox, "python": build_python, "layers": build_layers,
            "multiarch": build_multiarch, "scratch": build_scratch, "symlinks": build_symlinks}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = os.path.abspath(sys.argv[1])
    names = sys.argv[2:] or list(BUILDERS)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        sys.exit(f"unknown test image {', '.join(unknown)}; known: {', '.join(BUILDERS)}")
    os.makedirs(out, exist_ok=True)
    for name in names:
        build = BUILDERS[name]
        dest = os.path.join(out, name)
        stamp = os.path.join(dest, ".hearth-recipe")
        if os.path.exists(stamp) and open(stamp).read() == RECIPE_VERSION:
            continue
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        layout = Layout(tmp)
        if name == "python":
            build(layout, out)
        else:
            build(layout)
        with open(os.path.join(tmp, ".hearth-recipe"), "w") as f:
            f.write(RECIPE_VERSION)
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)
        print(f"built test image {name} in {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
