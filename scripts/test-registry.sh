#!/usr/bin/env bash
# Start or stop the test OCI registry (Debian's docker-registry, the distribution registry) on a free
# 127.0.0.1 port with its storage in STATE_DIR, and push the project's test images into it.
#
#   test-registry.sh start STATE_DIR [IMAGES_DIR]   prints the address (127.0.0.1:PORT) on stdout
#   test-registry.sh stop STATE_DIR                 stops it and removes STATE_DIR
#   test-registry.sh config STATE_DIR               only writes the config, prints the address
#   test-registry.sh push STATE_DIR ADDR [IMAGES]   waits for a registry the caller started, pushes
#
# Images are pushed as hearth-test/<name>:latest from the OCI layouts in IMAGES_DIR
# (default /var/cache/hearth-test/images, built by build-test-images.py).
set -euo pipefail

cmd=${1:?usage: test-registry.sh start|stop STATE_DIR [IMAGES_DIR]}
state=${2:?usage: test-registry.sh start|stop STATE_DIR [IMAGES_DIR]}
images=${3:-/var/cache/hearth-test/images}

write_config() { # STATE_DIR -> prints the address
    mkdir -p "$1/data"
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat > "$1/config.yml" <<CFG
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $1/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
CFG
    echo "127.0.0.1:$port"
}

wait_ready() { # ADDR STATE_DIR
    for _ in $(seq 100); do
        if curl -fsS "http://$1/v2/" > /dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    echo "test registry at $1 did not start; its log:" >&2
    cat "$2/registry.log" >&2 || true
    return 1
}

push_images() { # ADDR
    for dir in "$images"/*/; do
        [ -f "$dir/index.json" ] || continue
        skopeo copy --quiet --all --preserve-digests --dest-tls-verify=false \
            "oci:$dir:latest" "docker://$1/hearth-test/$(basename "$dir"):latest" >&2
    done
}

case "$cmd" in
config)  # write STATE_DIR/config.yml only; the caller runs `docker-registry serve` itself
    write_config "$state"
    ;;
push)    # test-registry.sh push STATE_DIR ADDR [IMAGES_DIR]: wait until it answers, push the images
    addr=${3:?push needs the address}
    images=${4:-/var/cache/hearth-test/images}
    wait_ready "$addr" "$state"
    push_images "$addr"
    ;;
start)
    addr=$(write_config "$state")
    docker-registry serve "$state/config.yml" > "$state/registry.log" 2>&1 &
    echo $! > "$state/pid"
    wait_ready "$addr" "$state"
    push_images "$addr"
    echo "$addr"
    ;;
stop)
    if [ -f "$state/pid" ]; then
        pid=$(cat "$state/pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf "$state"
    ;;
*)
    echo "unknown command $cmd" >&2; exit 2 ;;
esac
