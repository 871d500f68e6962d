#!/bin/bash
# make demo (first part): a few broken ssl directories, built with openssl the way a
# hand-made cluster's were, and what `kubecertd --check` says about each.
set -euo pipefail
KUBECERTD=${KUBECERTD:-$(pwd)/.venv/bin/kubecertd}
work=$(mktemp -d /tmp/kubecertd-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
this=server2277z.prod.jp.local
other=server2267z.prod.jp.local

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ssl() { openssl "$@" 2>/dev/null; }

ssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj /CN=kube-ca -keyout ca-key.pem -out ca.pem
printf 'extendedKeyUsage = clientAuth\nbasicConstraints = CA:FALSE\n' > client.ext
# kubelet_pair NODE DIR: a key and a 30-day kubelet certificate for NODE in DIR
kubelet_pair() {
    mkdir -p "$2"
    ssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/O=system:nodes/CN=system:node:$1" -keyout "$2/worker-key.pem" -out "$2/req.csr"
    ssl x509 -req -in "$2/req.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
        -extfile client.ext -days 30 -out "$2/worker.pem"
    cp ca.pem "$2/ca.pem"; chmod 600 "$2/worker-key.pem"; rm "$2/req.csr"
}
# expire DIR: re-sign DIR's certificate as valid from 33 to 3 days ago (openssl 3.0's
# x509 command cannot backdate, `openssl ca` can)
expire() {
    mkdir -p ca-db; : > ca-db/index.txt
    printf '[ca]\ndefault_ca=d\n[d]\ndatabase=ca-db/index.txt\nnew_certs_dir=ca-db\nserial=ca-db/serial\npolicy=p\ndefault_md=sha256\n[p]\ncommonName=supplied\norganizationName=supplied\n' > ca.cnf
    openssl rand -hex 16 > ca-db/serial
    ssl x509 -x509toreq -in "$1/worker.pem" -signkey "$1/worker-key.pem" -out "$1/req.csr"
    ssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca-key.pem -extfile client.ext \
        -startdate "$(date -u -d '33 days ago' +%Y%m%d%H%M%SZ)" \
        -enddate "$(date -u -d '3 days ago' +%Y%m%d%H%M%SZ)" -in "$1/req.csr" -out "$1/worker.pem"
    rm "$1/req.csr"
}
check() {  # check DIR: run kubecertd --check on DIR as node $this, show its verdict
    printf 'node_name = "%s"\nssl_dir = "%s"\n' "$this" "$work/$1" > "$1.toml"
    echo "\$ kubecertd --check   # ssl_dir=$1"
    set +e; "$KUBECERTD" --check --config "$1.toml"; rc=$?; set -e
    echo "(exit status $rc)"
    [ "$rc" = "$2" ] || { echo "demo: expected exit status $2 from $1" >&2; exit 1; }
}

say "1. A healthy worker: CA, kubelet certificate for $this, its key"
kubelet_pair "$this" healthy
check healthy 0

say "2. The seed case: worker.pem/worker-key.pem copied from $other onto $this"
echo "kubelet would now fail with: node \"$other\" is not allowed to modify node \"$this\""
kubelet_pair "$other" seed
check seed 1
json=$("$KUBECERTD" --check --json --config seed.toml || true)
grep -q "belongs to node $other, this node is $this" <<<"$json"

say "3. Key mismatch: someone restored worker-key.pem from another pair"
kubelet_pair "$this" mismatch
kubelet_pair "$this" spare
cp spare/worker-key.pem mismatch/worker-key.pem
check mismatch 1

say "4. Expired: the certificate ran out three days ago"
kubelet_pair "$this" expired
expire expired
check expired 1

say "5. Truncated key and a world-readable key file"
kubelet_pair "$this" truncated
: > truncated/worker-key.pem; chmod 644 truncated/worker-key.pem
check truncated 1

printf '\nkubecertd --check found what kubelet would have tripped over in each case.\n'
