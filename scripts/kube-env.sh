#!/usr/bin/env bash
# A throwaway Kubernetes control plane on loopback for tests, benchmarks and humans: Debian's etcd and the
# kube-apiserver built by scripts/provision-kube.sh, on free 127.0.0.1 ports, with all state in STATE_DIR.
# No controller-manager or scheduler runs: Deployments never get pods and deleted namespaces stay
# Terminating; everything reachable through the API (CRDs, status, watches, Leases, RBAC) works.
#
#   kube-env.sh start STATE_DIR            start etcd + kube-apiserver, wait until ready, print the admin kubeconfig
#   kube-env.sh stop STATE_DIR             stop both and remove STATE_DIR
#   kube-env.sh config STATE_DIR           only write certificates, kubeconfig and the two command lines
#                                          (STATE_DIR/etcd.args, STATE_DIR/kube-apiserver.args, one argument a
#                                          line); print the admin kubeconfig. The caller starts the processes.
#   kube-env.sh wait STATE_DIR             wait until the API server answers /readyz
#   kube-env.sh user STATE_DIR NAME [GROUP...]
#                                          print a kubeconfig for a client certificate with user NAME and
#                                          groups GROUP (signed by STATE_DIR's CA; RBAC decides what it may do)
#
# Every kubeconfig X.kubeconfig has its certificate and key beside it as X.crt and X.key (for curl);
# STATE_DIR/ca.crt is the CA, STATE_DIR/server the server URL. The admin identity is in O=system:masters.
# etcd keeps its data in STATE_DIR/etcd: put STATE_DIR on tmpfs (/dev/shm) for speed.
set -euo pipefail

usage='usage: kube-env.sh start|stop|config|wait STATE_DIR | user STATE_DIR NAME [GROUP...]'
cmd=${1:?$usage}
state=${2:?$usage}
apiserver=${HEARTH_KUBE_APISERVER:-${HEARTH_TEST_CACHE:-/var/cache/hearth-test}/kube/kube-apiserver}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# sign NAME SUBJECT EXTENSIONS: a P-256 key and a certificate signed by the CA, valid for a year.
sign() {
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$2" \
        -keyout "$1.key" -out "$1.csr" 2> /dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$state/ca.crt" -CAkey "$state/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" \
        -days 365 -sha256 -extfile "$1.ext" -out "$1.crt" 2> /dev/null
    rm -f "$1.csr" "$1.ext"
}

# kubeconfig NAME: NAME.kubeconfig for the identity in NAME.crt/NAME.key, all data embedded.
kubeconfig() {
    local server
    server=$(cat "$state/server")
    cat > "$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: hearth-test
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 < "$state/ca.crt")
users:
- name: $(basename "$1")
  user:
    client-certificate-data: $(base64 -w0 < "$1.crt")
    client-key-data: $(base64 -w0 < "$1.key")
contexts:
- name: hearth-test
  context:
    cluster: hearth-test
    user: $(basename "$1")
    namespace: default
current-context: hearth-test
KC
}

client_ext='basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth'

write_config() {
    [ -x "$apiserver" ] || { echo "kube-apiserver missing at $apiserver: run scripts/provision-kube.sh" >&2; exit 1; }
    command -v etcd > /dev/null || { echo "etcd missing: run scripts/provision-kube.sh" >&2; exit 1; }
    command -v openssl > /dev/null || { echo "openssl missing: run scripts/provision-kube.sh" >&2; exit 1; }
    mkdir -p "$state/users"
    chmod 700 "$state"
    local etcd_port peer_port api_port
    etcd_port=$(free_port)
    peer_port=$(free_port)
    api_port=$(free_port)
    echo "https://127.0.0.1:$api_port" > "$state/server"

    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 -sha256 \
        -subj "/CN=hearth-test-ca" -keyout "$state/ca.key" -out "$state/ca.crt" \
        -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' 2> /dev/null
    sign "$state/apiserver" "/CN=kube-apiserver" 'basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc'
    sign "$state/admin" "/O=system:masters/CN=hearth-admin" "$client_ext"
    kubeconfig "$state/admin"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$state/sa.key" 2> /dev/null
    openssl pkey -in "$state/sa.key" -pubout -out "$state/sa.pub" 2> /dev/null

    printf '%s\n' etcd --name=hearth-test --data-dir="$state/etcd" \
        --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
        --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
        --initial-cluster="hearth-test=http://127.0.0.1:$peer_port" --log-level=warn \
        > "$state/etcd.args"
    # Flags for 1.20: no insecure port; RBAC so least privilege is checkable; no endpoint reconciler
    # because nothing else runs; service-account issuer and keys are mandatory since 1.20.
    printf '%s\n' "$apiserver" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
        --secure-port="$api_port" --insecure-port=0 --etcd-servers="http://127.0.0.1:$etcd_port" \
        --tls-cert-file="$state/apiserver.crt" --tls-private-key-file="$state/apiserver.key" \
        --client-ca-file="$state/ca.crt" --authorization-mode=RBAC \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$state/sa.pub" --service-account-signing-key-file="$state/sa.key" \
        --service-cluster-ip-range=10.96.0.0/16 --endpoint-reconciler-type=none --allow-privileged=true \
        --profiling=false --v=0 \
        > "$state/kube-apiserver.args"
    echo "$state/admin.kubeconfig"
}

wait_ready() {
    local server code
    server=$(cat "$state/server")
    for _ in $(seq 600); do
        code=$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$state/ca.crt" \
            --cert "$state/admin.crt" --key "$state/admin.key" "$server/readyz" 2> /dev/null || true)
        [ "$code" = 200 ] && return 0
        sleep 0.1
    done
    echo "kube-apiserver at $server not ready after 60 s; the end of its log:" >&2
    tail -n 30 "$state/kube-apiserver.log" >&2 || true
    echo "etcd's log:" >&2
    tail -n 10 "$state/etcd.log" >&2 || true
    return 1
}

launch() { # NAME: run STATE_DIR/NAME.args in the background, log to NAME.log, pid in NAME.pid
    local args
    mapfile -t args < "$state/$1.args"
    nohup "${args[@]}" > "$state/$1.log" 2>&1 < /dev/null &
    echo $! > "$state/$1.pid"
}

stop_one() { # NAME
    [ -f "$state/$1.pid" ] || return 0
    local pid
    pid=$(cat "$state/$1.pid")
    kill "$pid" 2> /dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2> /dev/null || true
}

case "$cmd" in
config)
    write_config
    ;;
start)
    kc=$(write_config)
    launch etcd
    launch kube-apiserver
    wait_ready
    echo "$kc"
    ;;
wait)
    wait_ready
    ;;
user)
    name=${3:?user needs a NAME}
    [[ "$name" =~ ^[A-Za-z0-9._:@-]+$ ]] || { echo "user name '$name' has characters kube-env.sh does not put in a file name" >&2; exit 2; }
    subject="/CN=$name"
    for group in "${@:4}"; do subject="/O=$group$subject"; done
    # A fresh file per call: tests may ask for the same identity concurrently.
    file=$(mktemp -u "$state/users/${name//:/_}.XXXXXX")
    sign "$file" "$subject" "$client_ext"
    kubeconfig "$file"
    echo "$file.kubeconfig"
    ;;
stop)
    stop_one kube-apiserver
    stop_one etcd
    rm -rf "$state"
    ;;
*)
    echo "$usage" >&2; exit 2 ;;
esac
