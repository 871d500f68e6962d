#!/usr/bin/env python3
"""``kubecertd --check`` on the layouts it locates, side by side with the import floors.

``bench/check.sh`` (``make bench``) times ``--check`` on today's files layout: ``ssl_dir``
named in the config, three PEM files.  Since layouts, ``--check`` may first locate
kubelet's credentials: read kubelet's unit (its drop-ins and EnvironmentFile=s) for
``--kubeconfig`` and ``--config``, parse the kubeconfig and the KubeletConfiguration with
PyYAML, and read kubelet's certificate store.  This script builds a healthy kubeadm join
node's files in a temporary folder, as kubeadm and kubelet write them (the fixture of
tests/healing_node.py's ``Kubeadm`` shape):

- kubelet.conf with the cluster CA embedded and ``client-certificate``/``client-key``
  naming ``pki/kubelet-client-current.pem``, a symlink (absolute target) to the
  timestamped store file holding the chain and then the key (0600);
- config.yaml, a KubeletConfiguration with ``rotateCertificates: true``;
- kubeadm-flags.env with ``--hostname-override`` (the node's name);
- kubelet.service and kubeadm's 10-kubeadm.conf drop-in
  (tools/node/layouts/kubeadm), whose paths point into the temporary folder;

and times, interleaved (bench/interleave.py: one run of each per round), with the same
interpreter as the kubecertd timed (its shebang):

- ``pass``: ``python -c pass``;
- ``floor``: ``python -c 'import cryptography.x509'``, the floor of ``make bench``;
- ``floor+yaml``: ``python -c 'import cryptography.x509, yaml'``;
- ``files``: ``--check`` on three PEM files named by ``ssl_dir`` (as bench/check.sh),
  with ``[kubelet] unit`` a kubelet unit of that node (flags, no ``--kubeconfig`` or
  ``--config``): kubecertd reads it for kubelet's ``--rotate-certificates``;
- ``kubeconfig``: ``--check`` with ``layout = "kubeconfig"``, ``kubeconfig`` and
  ``[kubelet] config`` set, and no unit to read: PyYAML, both YAML files, the store;
- ``kubeadm``: ``--check`` with ``layout`` left to ``auto``: kubelet.service and its
  drop-in found under /etc/systemd/system, then as ``kubeconfig``;
- ``NAME:files`` and ``NAME:kubeadm`` for every ``--also NAME=KUBECERTD`` (another
  install, e.g. of an older commit; ``NAME:kubeadm`` only if that kubecertd knows
  layouts), so that a change is measured against its parent in the same rounds.

The unit files are found where systemd would look, /etc/systemd/system: the script runs
itself in a private mount namespace (``unshare --mount``) in which the temporary unit
folder is bind-mounted there; nothing outside the namespace sees it, and it ends with
the script.  Every config sets ``[daemon] state_dir`` inside the temporary folder.

``--callgrind`` also counts the instructions of one run of each command under
``valgrind --tool=callgrind`` (whole process, ``PYTHONHASHSEED=0``): deterministic, and
unaffected by how busy the machine is.

Usage: .venv/bin/python bench/check_layouts.py [--kubecertd .bench-venv/bin/kubecertd]
           [--rounds 40] [--warmup 3] [--also NAME=KUBECERTD ...] [--callgrind]
Root only (the mount namespace). Bounded: every command runs to completion or fails.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleave import print_table, run_rounds

ROOT = Path(__file__).resolve().parent.parent
DROPIN = ROOT / "tools" / "node" / "layouts" / "kubeadm" / "kubelet.service.d" / "10-kubeadm.conf"
UNIT_DIR = "/etc/systemd/system"
NODE = "ip-10-0-1-17.ec2.internal"  # kubeadm-flags.env's --hostname-override
IN_NAMESPACE = "KUBECERTD_BENCH_NAMESPACE"

# kubelet.service as the kubernetes packages install it (release/cmd/krel/templates).
KUBELET_SERVICE = """\
[Unit]
Description=kubelet: The Kubernetes Node Agent
Documentation=https://kubernetes.io/docs/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
"""


# Today's (kube-aws) node: kubelet without a kubeconfig or a KubeletConfiguration.
FILES_KUBELET_SERVICE = """\
[Unit]
Description=kubelet
After=containerd.service

[Service]
Environment=KUBELET_OPTS="--container-runtime-endpoint=unix:///run/containerd/containerd.sock --v=2"
ExecStart=/usr/bin/kubelet $KUBELET_OPTS --cert-dir=/etc/kubernetes/ssl
Restart=always

[Install]
WantedBy=multi-user.target
"""
FILES_UNIT = "kubelet-files.service"


# -- a healthy kubeadm node, in a folder -------------------------------------------------------


def _name(common: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def issue(node: str) -> tuple[bytes, bytes, bytes, bytes]:
    """(CA PEM, kubelet cert PEM, its key PEM (SEC1, as kubelet writes it), PKCS8 key PEM)."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("kubernetes"))
        .issuer_name(_name("kubernetes"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"system:node:{node}", "system:nodes"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    none = serialization.NoEncryption()
    return (
        ca.public_bytes(pem),
        cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, none),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, none),
    )


def write(path: Path, data: str | bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def build(work: Path) -> dict[str, Path]:
    """The files of both layouts under ``work``; the configs by variant name."""
    ca, cert, sec1_key, pkcs8_key = issue(NODE)
    state = work / "state"
    # Today's files layout (bench/check.sh's healthy directory).
    ssl = work / "files" / "ssl"
    write(ssl / "ca.pem", ca)
    write(ssl / "worker.pem", cert)
    write(ssl / "worker-key.pem", pkcs8_key, 0o600)
    # A kubeadm join node.
    node = work / "kubeadm"
    etc, lib = node / "etc" / "kubernetes", node / "var" / "lib" / "kubelet"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H-%M-%S")
    stored = write(lib / "pki" / f"kubelet-client-{stamp}.pem", cert + sec1_key, 0o600)
    (lib / "pki" / "kubelet-client-current.pem").symlink_to(stored)
    current = str(lib / "pki" / "kubelet-client-current.pem")
    kubeconfig = {  # what kubelet's TLS bootstrap writes (bootstrap.go)
        "apiVersion": "v1",
        "clusters": [
            {
                "cluster": {
                    "certificate-authority-data": base64.b64encode(ca).decode(),
                    "server": "https://10.0.1.10:6443",
                },
                "name": "default-cluster",
            }
        ],
        "contexts": [
            {
                "context": {
                    "cluster": "default-cluster",
                    "namespace": "default",
                    "user": "default-auth",
                },
                "name": "default-context",
            }
        ],
        "current-context": "default-context",
        "kind": "Config",
        "preferences": {},
        "users": [
            {"name": "default-auth", "user": {"client-certificate": current, "client-key": current}}
        ],
    }
    write(etc / "kubelet.conf", yaml.safe_dump(kubeconfig, sort_keys=False), 0o600)
    write(
        lib / "config.yaml",
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
        "authentication:\n  anonymous:\n    enabled: false\n  webhook:\n    enabled: true\n"
        "  x509:\n    clientCAFile: /etc/kubernetes/pki/ca.crt\n"
        "authorization:\n  mode: Webhook\ncgroupDriver: systemd\nclusterDNS:\n- 10.96.0.10\n"
        "clusterDomain: cluster.local\nrotateCertificates: true\nserverTLSBootstrap: false\n"
        "staticPodPath: /etc/kubernetes/manifests\n",
    )
    write(
        lib / "kubeadm-flags.env",
        'KUBELET_KUBEADM_ARGS="--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock '
        f'--pod-infra-container-image=registry.k8s.io/pause:3.10 --hostname-override={NODE}"\n',
    )
    dropin = DROPIN.read_text()
    dropin = dropin.replace("/etc/kubernetes/", f"{etc}/").replace("/var/lib/kubelet/", f"{lib}/")
    dropin = dropin.replace("/etc/default/kubelet", f"{node}/etc/default/kubelet")
    dropin = re.sub(r"^ExecStart=\S+ \S+ ", "ExecStart=/usr/bin/kubelet ", dropin, flags=re.M)
    write(work / "units" / "kubelet.service", KUBELET_SERVICE)
    write(work / "units" / FILES_UNIT, FILES_KUBELET_SERVICE)
    write(work / "units" / "kubelet.service.d" / "10-kubeadm.conf", dropin)
    daemon = f'[daemon]\nstate_dir = "{state}"\n'
    return {
        "files": write(
            work / "files.toml",
            f'ssl_dir = "{ssl}"\nnode_name = "{NODE}"\n[kubelet]\nunit = "{FILES_UNIT}"\n{daemon}',
        ),
        "kubeconfig": write(
            work / "kubeconfig.toml",
            f'layout = "kubeconfig"\nkubeconfig = "{etc}/kubelet.conf"\nnode_name = "{NODE}"\n'
            f'[kubelet]\nunit = "kubecertd-bench-no-such.service"\nconfig = "{lib}/config.yaml"\n'
            f"{daemon}",
        ),
        "kubeadm": write(work / "auto.toml", daemon),
    }


# -- timing ------------------------------------------------------------------------------------


def interpreter(kubecertd: str) -> str:
    """The python of a console script (its shebang), else the one beside it."""
    with open(kubecertd, "rb") as script:
        first = script.readline().decode(errors="replace")
    if first.startswith("#!"):
        candidate = first[2:].split()[0]
        if os.access(candidate, os.X_OK):
            return candidate
    return str(Path(kubecertd).parent / "python")


def check(kubecertd: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubecertd, "--check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def callgrind(argv: list[str], work: Path) -> int:
    """Instructions of one run of ``argv`` (whole process)."""
    out = work / f"callgrind.{os.getpid()}.out"
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        env={**os.environ, "PYTHONHASHSEED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=600,
        check=False,
    )
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            out.unlink()
            return int(line.split()[1])
    raise RuntimeError(f"no instruction count for {argv}")


def run(args: argparse.Namespace) -> int:
    kubecertd = os.path.abspath(args.kubecertd)
    python = interpreter(kubecertd)
    work = Path(tempfile.mkdtemp(prefix="kubecertd-bench-layouts-"))
    try:
        configs = build(work)
        subprocess.run(["mount", "--bind", str(work / "units"), UNIT_DIR], check=True)
        try:
            return measure(args, kubecertd, python, configs, work)
        finally:
            subprocess.run(["umount", UNIT_DIR], check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(
    args: argparse.Namespace, kubecertd: str, python: str, configs: dict[str, Path], work: Path
) -> int:
    version = subprocess.run(
        [python, "-c", "import sys, cryptography, yaml; print(sys.version.split()[0], "
         "cryptography.__version__, yaml.__version__, yaml.__with_libyaml__)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    print(f"kubecertd: {kubecertd}\npython:    {python} (python, cryptography, PyYAML, libyaml: "
          f"{version.stdout.strip() or version.stderr.strip()[-200:]})")  # fmt: skip
    print(f"machine:   {os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    commands = {
        "pass": [python, "-c", "pass"],
        "floor": [python, "-c", "import cryptography.x509"],
        "floor+yaml": [python, "-c", "import cryptography.x509, yaml"],
    }
    installs = [("", kubecertd)] + [
        (name + ":", os.path.abspath(path))
        for name, _, path in (a.partition("=") for a in args.also)
    ]
    for prefix, program in installs:
        layouts = True
        for variant, config in configs.items():
            if not layouts and variant != "files":
                continue
            result = check(program, config)
            if result.returncode == 2 and variant == "kubeconfig" and prefix:
                layouts = "unknown setting layout" not in result.stderr  # older than layouts
                print(f"{prefix[:-1]}: --check exits 2 on the kubeconfig config: "
                      f"{result.stderr.strip()[-120:]}; left out"
                      + ("" if layouts else ", and kubeadm too"))  # fmt: skip
                continue
            if result.returncode not in (0, 1):
                print(result.stdout + result.stderr, file=sys.stderr)
                raise SystemExit(f"{program} --check on {variant} exited {result.returncode}")
            if variant == "kubeconfig" and prefix:
                continue  # the installs compared: files and kubeadm
            commands[prefix + variant] = [program, "--check", "--config", str(config)]
            if not prefix:
                found = [line for line in result.stdout.splitlines() if "layout" in line.lower()]
                print(f"  {variant}: exit {result.returncode}; {' | '.join(found)[:300]}")
    print()
    rounds = run_rounds(commands, args.rounds, args.warmup)
    print_table(rounds, "floor")
    if args.callgrind:
        print("\ninstructions (callgrind, whole process, PYTHONHASHSEED=0, one run each):")
        counts = {name: callgrind(argv, work) for name, argv in commands.items()}
        for name, count in counts.items():
            print(
                f"  {name:<16} {count / 1e6:8.1f}M   {(count - counts['floor']) / 1e6:+8.1f}M over the floor"
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kubecertd", default=str(ROOT / ".bench-venv" / "bin" / "kubecertd"),
        help="the kubecertd to time (default: make bench's .bench-venv)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--also", action="append", default=[], metavar="NAME=KUBECERTD",
        help="another kubecertd to time in the same rounds (files, and kubeadm if it knows layouts)",
    )  # fmt: skip
    parser.add_argument("--callgrind", action="store_true", help="also count instructions")
    args = parser.parse_args()
    if not 2 <= args.rounds <= 1000:
        parser.error("--rounds 2..1000")
    if not os.access(args.kubecertd, os.X_OK):
        parser.error(f"{args.kubecertd} is not an executable kubecertd (make bench builds one)")
    if args.callgrind and shutil.which("valgrind") is None:
        parser.error("--callgrind needs valgrind (apt-get install valgrind)")
    if os.environ.get(IN_NAMESPACE) != "1":
        if os.geteuid() != 0:
            raise SystemExit("bench/check_layouts.py: root only (a private mount namespace)")
        os.environ[IN_NAMESPACE] = "1"
        argv = ["unshare", "--mount", "--propagation", "private", "--"]
        os.execvp("unshare", [*argv, sys.executable, *sys.argv])  # noqa: S606 - the same script
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
