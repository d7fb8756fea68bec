"""A TCP proxy in front of the test registry that the fault injector can take down (refusing new
connections and cutting open ones: a registry gone mid-pull) or slow to a trickle; plus pushing
fresh tags and images to the real registry, so that creates during a fault really pull."""

import gzip
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
import time
import urllib.request

MEDIA = ["application/vnd.oci.image.manifest.v1+json",
         "application/vnd.docker.distribution.manifest.v2+json"]


class RegistryProxy:
    def __init__(self, upstream):
        self.upstream = upstream
        host, port = upstream.rsplit(":", 1)
        self.target = (host, int(port))
        self.mode = "ok"
        self.lock = threading.Lock()
        self.open = set()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self.accept, daemon=True).start()
        self.pushed = 0

    def set_mode(self, mode):
        with self.lock:
            self.mode = mode
            if mode == "down":
                for s in list(self.open):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def accept(self):
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "down":
                client.close()
                continue
            threading.Thread(target=self.relay, args=(client,), daemon=True).start()

    def relay(self, client):
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        with self.lock:
            self.open.update({client, upstream})

        def pump(src, dst):
            try:
                while True:
                    data = src.recv(16384)
                    if not data:
                        break
                    if self.mode == "slow":
                        time.sleep(0.2)  # ~80 KiB/s
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        t.start()
        pump(client, upstream)
        t.join()
        with self.lock:
            self.open.discard(client)
            self.open.discard(upstream)
        client.close()
        upstream.close()

    def close(self):
        self.closed = True
        self.sock.close()

    # ---- pushing variants to the real registry ----------------------------------------------------

    def _req(self, method, path, data=None, headers=None):
        req = urllib.request.Request(f"http://{self.upstream}{path}", data=data, method=method,
                                     headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()

    def _push_blob(self, repo, blob):
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        _, headers, _ = self._req("POST", f"/v2/{repo}/blobs/uploads/")
        location = headers["Location"]
        if location.startswith("http"):
            location = "/" + location.split("/", 3)[3]
        sep = "&" if "?" in location else "?"
        self._req("PUT", f"{location}{sep}digest={digest}", blob,
                  {"Content-Type": "application/octet-stream"})
        return digest

    def push_variant(self, repo, base_tag, extra_bytes):
        """Pushes `repo:<new tag>`: `base_tag`'s image plus (if `extra_bytes`) one layer of that many
        random bytes, so that pulling it fetches a manifest and a fresh blob. Returns the tag."""
        self.pushed += 1
        tag = f"soak-{os.getpid()}-{self.pushed}"
        _, _, body = self._req("GET", f"/v2/{repo}/manifests/{base_tag}",
                               headers={"Accept": ", ".join(MEDIA)})
        manifest = json.loads(body)
        media = manifest.get("mediaType", MEDIA[0])
        if extra_bytes:
            raw = io.BytesIO()
            with tarfile.open(fileobj=raw, mode="w") as tar:
                info = tarfile.TarInfo(f"soak/{tag}.bin")
                info.size = extra_bytes
                tar.addfile(info, io.BytesIO(os.urandom(extra_bytes)))
            layer = gzip.compress(raw.getvalue(), compresslevel=1)
            diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
            _, _, cfg = self._req("GET", f"/v2/{repo}/blobs/{manifest['config']['digest']}")
            config = json.loads(cfg)
            config["rootfs"]["diff_ids"].append(diff_id)
            cfg = json.dumps(config).encode()
            manifest["config"]["digest"] = self._push_blob(repo, cfg)
            manifest["config"]["size"] = len(cfg)
            layer_media = manifest["layers"][0]["mediaType"]
            manifest["layers"].append({"mediaType": layer_media, "size": len(layer),
                                       "digest": self._push_blob(repo, layer)})
        self._req("PUT", f"/v2/{repo}/manifests/{tag}", json.dumps(manifest).encode(),
                  {"Content-Type": media})
        return tag
