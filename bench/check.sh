#!/usr/bin/env bash
# Startup benchmark for `kubecertd --check` on a healthy ssl directory (BENCHMARKS.md).
#
# Builds a throwaway healthy ssl dir (CA + kubelet cert for this node) with openssl,
# then times with hyperfine:
#   (a) kubecertd --check --config CFG                     (target: median <= floor (d) + 48 ms)
#   (b) openssl verify + openssl x509 -checkend, in sh      (what a shell script would do)
#   (c) python -c pass                                      (the interpreter's own floor)
#   (d) python -c 'import cryptography.x509'                (the floor our dependency adds)
# and prints their medians in ms.  Exits non-zero if kubecertd --check does not exit 0.
#
# Environment:
#   KUBECERTD     kubecertd to time (default .venv/bin/kubecertd, relative to the repo)
#   BENCH_RUNS    hyperfine runs per command (default 30, at least 20)
#   BENCH_JSON    keep hyperfine's JSON export at this path (default: a temp file)
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
KUBECERTD=${KUBECERTD:-$REPO/.venv/bin/kubecertd}   # a relative $KUBECERTD is from the caller's cwd
RUNS=${BENCH_RUNS:-30}
if [ "$RUNS" -lt 20 ]; then
    RUNS=20
fi

if [ ! -x "$KUBECERTD" ]; then
    echo "bench/check.sh: $KUBECERTD is not an executable kubecertd (make venv, or set KUBECERTD)" >&2
    exit 2
fi
KUBECERTD=$(cd "$(dirname "$KUBECERTD")" && pwd)/$(basename "$KUBECERTD")

# The interpreter kubecertd's console script runs under (its shebang), for (c) and (d).
PYTHON=$(head -n 1 "$KUBECERTD" | sed -n 's/^#![[:space:]]*//p' | cut -d ' ' -f 1)
if [ -z "$PYTHON" ] || [ ! -x "$PYTHON" ]; then
    PYTHON=$(dirname "$KUBECERTD")/python
fi

if ! command -v hyperfine >/dev/null 2>&1; then
    echo "bench/check.sh: installing hyperfine" >&2
    apt-get install -y hyperfine >/dev/null 2>&1 || {
        apt-get update >/dev/null
        apt-get install -y hyperfine >/dev/null
    }
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kubecertd-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SSL=$WORK/ssl
mkdir -m 0755 "$SSL"

NODE=$(hostname | tr '[:upper:]' '[:lower:]')

# A healthy directory: cluster CA, and a kubelet client certificate for this node,
# ECDSA P-256 (the default [policy] key_type), key mode 0600.
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/ca-key.pem" -out "$SSL/ca.pem" -days 3650 -subj "/CN=kubecertd-bench-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
(umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -out "$SSL/worker-key.pem" 2>/dev/null)
chmod 0600 "$SSL/worker-key.pem"
openssl req -new -key "$SSL/worker-key.pem" -out "$WORK/worker.csr" \
    -subj "/O=system:nodes/CN=system:node:$NODE" 2>/dev/null
cat >"$WORK/worker.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
EOF
openssl x509 -req -in "$WORK/worker.csr" -CA "$SSL/ca.pem" -CAkey "$WORK/ca-key.pem" \
    -CAcreateserial -out "$SSL/worker.pem" -days 365 -extfile "$WORK/worker.ext" 2>/dev/null

CFG=$WORK/kubecertd.toml
printf 'ssl_dir = "%s"\n' "$SSL" >"$CFG"

# Fail early, with kubecertd's own words, if the directory is not healthy to it.
if ! "$KUBECERTD" --check --config "$CFG" >"$WORK/check.out" 2>&1; then
    echo "bench/check.sh: kubecertd --check did not exit 0 on a healthy directory:" >&2
    cat "$WORK/check.out" >&2
    exit 1
fi

JSON=${BENCH_JSON:-$WORK/hyperfine.json}
case $JSON in /*) ;; *) JSON=$PWD/$JSON ;; esac
echo "kubecertd: $KUBECERTD"
echo "python:    $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
echo "crypto:    cryptography $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("cryptography"))')"
echo "machine:   $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), load $(cut -d ' ' -f 1-3 /proc/loadavg)"
echo

# hyperfine's default (without --ignore-failure) aborts if any run exits non-zero.
(cd "$SSL" && hyperfine -N --warmup 3 --runs "$RUNS" --style basic --export-json "$JSON" \
    -n "kubecertd --check" "$KUBECERTD --check --config $CFG" \
    -n "openssl baseline" "sh -c 'openssl verify -CAfile ca.pem worker.pem && openssl x509 -checkend 0 -noout -in worker.pem'" \
    -n "python -c pass" "$PYTHON -c pass" \
    -n "import cryptography.x509" "$PYTHON -c 'import cryptography.x509'")

echo
echo "load average after: $(cut -d ' ' -f 1-3 /proc/loadavg)"
"$PYTHON" - "$JSON" <<'EOF'
import json
import sys

with open(sys.argv[1]) as f:
    results = json.load(f)["results"]
print(f"{'command':<28} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'runs':>5}")
for r in results:
    print(
        f"{r['command']:<28} {r['median'] * 1000:>10.1f} {r['min'] * 1000:>8.1f}"
        f" {r['max'] * 1000:>8.1f} {len(r['times']):>5}"
    )
check = results[0]
codes = set(check.get("exit_codes") or [0])
if codes != {0}:
    print(f"kubecertd --check exit codes: {sorted(codes)}", file=sys.stderr)
    sys.exit(1)
# The target is judged against the cryptography import floor of this same run: the
# machine's speed drifts by up to 50% within minutes, so an absolute figure measures the
# machine.  48 ms is what the original 120 ms target left above a 72 ms floor.
floor = next(r for r in results if r["command"] == "import cryptography.x509")
over = (check["median"] - floor["median"]) * 1000
verdict = "meets" if over <= 48 else "MISSES"
print(
    f"\nkubecertd --check median {check['median'] * 1000:.1f} ms, {over:.1f} ms above the"
    f" import floor of this run ({floor['median'] * 1000:.1f} ms): {verdict} the floor + 48 ms target"
)
EOF
