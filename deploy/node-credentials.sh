#!/usr/bin/env bash
# Certificates for hearth on a cluster, made with openssl and kubectl (cluster-admin) — see deploy/README.md.
#
#   deploy/node-credentials.sh pki DIR
#       A hearth CA (DIR/ca.crt, DIR/ca.key; kept if present), the gateway's client certificate (node
#       APIs accept it) and serving certificate, the webhook's serving certificate; creates or updates
#       Secrets hearth-gateway-pki and hearth-webhook-tls in hearth-system and sets the caBundle of the
#       ValidatingWebhookConfiguration hearth-node-confinement (apply the base first).
#   deploy/node-credentials.sh node DIR NODE HOST_IP
#       DIR/nodes/NODE/{kubeconfig,tls.crt,tls.key}: the node agent's own Kubernetes identity (user
#       hearth-node:NODE, group hearth:nodes, a client certificate issued by the cluster through a
#       CertificateSigningRequest for kubernetes.io/kube-apiserver-client) and its API's serving
#       certificate for HOST_IP, signed by the hearth CA. Copy them to NODE's /etc/hearth/node/ (mode 600).
#
# Keys never leave DIR (keep it private: mode 700). Certificates last a year (DAYS to change).
set -euo pipefail

usage='usage: node-credentials.sh pki DIR | node DIR NODE HOST_IP'
cmd=${1:?$usage}
dir=${2:?$usage}
ns=${HEARTH_NAMESPACE:-hearth-system}
days=${DAYS:-365}
mkdir -p "$dir"
chmod 700 "$dir"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2> /dev/null; chmod 600 "$1"; }

# sign NAME SUBJECT EXTENSIONS: DIR/NAME.{key,crt}, signed by the hearth CA.
sign() {
    key "$dir/$1.key"
    openssl req -new -key "$dir/$1.key" -subj "$2" -out "$dir/$1.csr"
    printf '%s\n' "$3" > "$dir/$1.ext"
    openssl x509 -req -in "$dir/$1.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 -extfile "$dir/$1.ext" \
        -out "$dir/$1.crt" 2> /dev/null
    rm -f "$dir/$1.csr" "$dir/$1.ext"
}

server_ext() { # SAN...
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$1"
}

case "$cmd" in
pki)
    if [ ! -f "$dir/ca.key" ]; then
        key "$dir/ca.key"
        openssl req -x509 -new -key "$dir/ca.key" -days $((days * 5)) -sha256 -subj "/CN=hearth-ca" \
            -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' \
            -out "$dir/ca.crt"
    fi
    # Client only (no serverAuth), so it cannot pose as a node; nodes' certificates are server only, so
    # a node cannot call another node's API with its own.
    sign gateway "/CN=hearth-gateway" 'basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth'
    svc="hearth-gateway.$ns.svc"
    sign serving "/CN=$svc" "$(server_ext "DNS:hearth-gateway,DNS:$svc,DNS:$svc.cluster.local")"
    svc="hearth-webhook.$ns.svc"
    sign webhook "/CN=$svc" "$(server_ext "DNS:$svc,DNS:$svc.cluster.local")"

    kubectl -n "$ns" create secret generic hearth-gateway-pki --dry-run=client -o yaml \
        --from-file=ca.crt="$dir/ca.crt" \
        --from-file=gateway.crt="$dir/gateway.crt" --from-file=gateway.key="$dir/gateway.key" \
        --from-file=serving.crt="$dir/serving.crt" --from-file=serving.key="$dir/serving.key" |
        kubectl apply -f -
    kubectl -n "$ns" create secret tls hearth-webhook-tls --dry-run=client -o yaml \
        --cert="$dir/webhook.crt" --key="$dir/webhook.key" | kubectl apply -f -
    bundle=$(base64 -w0 < "$dir/ca.crt")
    patch=$(kubectl get validatingwebhookconfiguration hearth-node-confinement \
        -o jsonpath='{range .webhooks[*]}{.name}{"\n"}{end}' |
        awk -v b="$bundle" 'NF {printf "%s{\"op\":\"add\",\"path\":\"/webhooks/%d/clientConfig/caBundle\",\"value\":\"%s\"}", (n++ ? "," : "["), n-1, b} END {print "]"}')
    kubectl patch validatingwebhookconfiguration hearth-node-confinement --type=json -p "$patch"
    echo "Secrets hearth-gateway-pki and hearth-webhook-tls written; webhook caBundle set" >&2
    ;;
node)
    node=${3:?$usage}
    ip=${4:?$usage}
    [ -f "$dir/ca.key" ] || { echo "no CA in $dir: run '$0 pki $dir' first" >&2; exit 1; }
    out="$dir/nodes/$node"
    mkdir -p "$out"
    # The Kubernetes identity: a CSR the cluster signs, approved here (we are cluster-admin).
    key "$out/client.key"
    csr=$(openssl req -new -key "$out/client.key" -subj "/O=hearth:nodes/CN=hearth-node:$node" | base64 -w0)
    name="hearth-node-$node"
    kubectl delete csr "$name" --ignore-not-found > /dev/null
    kubectl apply -f - <<CSR
apiVersion: certificates.k8s.io/v1
kind: CertificateSigningRequest
metadata:
  name: $name
spec:
  request: $csr
  signerName: kubernetes.io/kube-apiserver-client
  expirationSeconds: $((days * 86400))
  usages: ["client auth"]
CSR
    kubectl certificate approve "$name" > /dev/null
    for _ in $(seq 60); do
        cert=$(kubectl get csr "$name" -o jsonpath='{.status.certificate}')
        [ -n "$cert" ] && break
        sleep 1
    done
    [ -n "${cert:-}" ] || { echo "CSR $name was not signed (is the cluster's signer running?)" >&2; exit 1; }
    server=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
    cluster_ca=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
    umask 077
    cat > "$out/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster:
    server: $server
    certificate-authority-data: $cluster_ca
users:
- name: hearth-node:$node
  user:
    client-certificate-data: $cert
    client-key-data: $(base64 -w0 < "$out/client.key")
contexts:
- name: hearth-node
  context: {cluster: cluster, user: "hearth-node:$node", namespace: $ns}
current-context: hearth-node
KC
    rm -f "$out/client.key"
    # The node API's serving certificate, for the address the gateway dials (HearthNode spec.apiEndpoint).
    sign "nodes/$node/tls" "/CN=$node" "$(server_ext "IP:$ip,DNS:$node")"
    echo "$out: copy kubeconfig, tls.crt, tls.key to $node:/etc/hearth/node/ (mode 600)" >&2
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
