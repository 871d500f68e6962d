"""A node set up the way kubecertd runs in production, for the end-to-end tests.

Inside one throwaway node (node_harness): journald, the system bus, the kubelet and
API-server stand-ins, the real ``kubecertd-signer`` adopting the node's cluster CA,
and the shipped ``systemd/kubecertd.service`` (only ``/usr/bin`` pointed at the test
venv), enrolled with a one-time token.  Everything talks over the node's own
loopback; assertions read real ``journalctl`` output, unit state and the files.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubecertd import pki

from node_harness import PROJECT, VENV, Cluster, Node

SIGNER_DIR = "/etc/kubecertd/signer"
AGENT = "kubecertd.service"
SIGNER = "kubecertd-signer.service"
KUBELET = "kubelet.service"

AGENT_CONFIG = """\
ssl_dir = "/etc/kubernetes/ssl"
[signer]
url = "https://127.0.0.1:8443"
ca = "/etc/kubecertd/signer-ca.pem"
timeout = "3s"
[kubelet]
settle = "{settle}"
max_restarts_per_hour = {max_restarts}
[daemon]
debounce = "{debounce}"
[metrics]
textfile = "/var/lib/node_exporter/textfile_collector/kubecertd.prom"
"""

SIGNER_CONFIG = f"""\
listen = "127.0.0.1:8443"
[cluster_ca]
cert = "{SIGNER_DIR}/ca.pem"
key = "{SIGNER_DIR}/ca-key.pem"
[identity_ca]
cert = "{SIGNER_DIR}/identity-ca.pem"
key = "{SIGNER_DIR}/identity-ca-key.pem"
[tls]
cert = "{SIGNER_DIR}/signer.pem"
key = "{SIGNER_DIR}/signer-key.pem"
[policy]
max_issuances_per_node_per_hour = 1000
"""

LYING_SIGNER_UNIT = """\
[Unit]
Description=a signer that lies (tools/node/lying-signer), instance = the lie
[Service]
ExecStart=@VENV@/bin/python @TOOLS@/lying-signer --lie %i
"""


def shipped_units(directory: Path) -> Path:
    """The project's unit files with /usr/bin pointed at the test venv, plus test units."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("kubecertd.service", "kubecertd-signer.service"):
        text = (PROJECT / "systemd" / name).read_text().replace("/usr/bin/", "@VENV@/bin/")
        if name == "kubecertd-signer.service":  # one worker is plenty inside a test node
            text = text.replace("serve --config", "serve --workers 1 --config")
        (directory / name).write_text(text)
    (directory / "lying-signer@.service").write_text(LYING_SIGNER_UNIT)
    return directory


@dataclass
class HealingNode:
    node: Node
    cluster: Cluster

    # -- set-up -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        node_factory: Callable[..., Node],
        settle: str = "1s",
        debounce: str = "200ms",
        max_restarts: int = 20,
        start_agent: bool = True,
    ) -> HealingNode:
        cluster = Cluster.new()
        scratch = Path(tempfile.mkdtemp(prefix="kubecertd-e2e-"))
        atexit.register(shutil.rmtree, scratch, True)  # it holds the test cluster's CA keys
        signer_dir = _init_signer(scratch, cluster)
        node = node_factory(
            extra_units=[shipped_units(scratch / "units")],
            wants=["fake-apiserver.service"],
            binds=[(signer_dir, SIGNER_DIR, "ro")],
            overlays=["/usr/lib/systemd/catalog"],  # so a test can install our catalog
        )
        cluster.install(node)
        node.run(["mkdir", "-p", "/var/lib/node_exporter/textfile_collector"], check=True)
        node.write_file(
            "/etc/kubecertd/signer-ca.pem", (signer_dir / "identity-ca.pem").read_bytes()
        )
        config = AGENT_CONFIG.format(settle=settle, debounce=debounce, max_restarts=max_restarts)
        node.write_file("/etc/kubecertd/kubecertd.toml", config.encode())
        healing = cls(node, cluster)
        node.systemctl("start", SIGNER, KUBELET, check=True)
        healing.wait_registered()
        healing.enroll()
        if start_agent:
            healing.start_agent()
        return healing

    def enroll(self) -> None:
        token = self.cli(
            "kubecertd-signer", "token", "create", "--node", self.node.hostname
        ).stdout.strip()
        self.cli("kubecertd", "enroll", "--token", token)

    def start_agent(self) -> None:
        self.node.systemctl("start", AGENT, check=True)  # Type=notify: returns after READY=1
        self.node.wait_for(lambda: self.events("check"), timeout=10)

    def cli(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:

        return self.node.run([f"{VENV}/bin/{program}", *args], check=check, timeout=60)

    # -- observations ------------------------------------------------------------------------

    def events(self, kind: str, **fields: str) -> list[dict[str, Any]]:
        """The agent's journal entries with KUBECERTD_EVENT=kind (and ``fields``)."""
        return self.node.journal(AGENT, KUBECERTD_EVENT=kind, **fields)

    def wait_event(
        self, kind: str, after: int = 0, timeout: float = 20, **fields: str
    ) -> dict[str, Any]:
        """Wait for entry number ``after`` + 1 of that kind; returns it."""

        def nth() -> dict[str, Any] | None:
            entries = self.events(kind, **fields)
            return entries[after] if len(entries) > after else None

        return self.node.wait_for(nth, timeout=timeout, what=f"KUBECERTD_EVENT={kind} #{after + 1}")

    def kubelet_pid(self) -> int:
        return int(self.node.unit_property(KUBELET, "MainPID"))

    def wait_registered(self, other_than: int = 0, timeout: float = 20) -> int:
        """Wait until kubelet runs with a PID other than ``other_than`` and has registered."""

        def registered() -> int | None:
            pid = self.kubelet_pid()
            if (
                pid in (0, other_than)
                or self.node.unit_property(KUBELET, "ActiveState") != "active"
            ):
                return None
            entries = self.node.journal(KUBELET, _PID=str(pid))
            return pid if any("registered node" in str(e.get("MESSAGE")) for e in entries) else None

        return self.node.wait_for(registered, timeout=timeout)  # type: ignore[no-any-return]

    def pair(self) -> tuple[bytes, bytes]:
        """(worker.pem, worker-key.pem) as they are on the node's disk."""
        return (self.node.ssl_dir / "worker.pem").read_bytes(), (
            self.node.ssl_dir / "worker-key.pem"
        ).read_bytes()

    def check_json(self) -> dict[str, Any]:

        result = self.cli("kubecertd", "--check", "--json", check=False)
        return json.loads(result.stdout)  # type: ignore[no-any-return]


def _init_signer(scratch: Path, cluster: Cluster) -> Path:
    """``kubecertd-signer init`` adopting the node's cluster CA, as an operator would."""
    (scratch / "ca.pem").write_bytes(cluster.ca.pem)
    (scratch / "ca-key.pem").write_bytes(cluster.ca.key_pem)
    signer_dir = scratch / "signer"
    subprocess.run(
        [
            str(Path(sys.executable).with_name("kubecertd-signer")),
            "init", "--dir", str(signer_dir),
            "--cluster-ca", str(scratch / "ca.pem"), "--cluster-ca-key", str(scratch / "ca-key.pem"),
            "--hostname", "localhost", "--ip", "127.0.0.1",
        ],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # The node sees this folder as /etc/kubecertd/signer: its config names those paths.
    (signer_dir / "signer.toml").write_text(SIGNER_CONFIG)
    return signer_dir


def serial_of(pem: bytes) -> str:

    return pki.serial_hex(pki.load_certificates(pem)[0])


def matching(cert_pem: bytes, key_pem: bytes) -> bool:

    try:
        cert = pki.load_certificates(cert_pem)[0]
        key = pki.load_private_key(key_pem)
    except ValueError:
        return False
    return pki.same_public_key(cert.public_key(), key.public_key())


def node_of(cert_pem: bytes) -> str | None:

    return pki.node_of(pki.load_certificates(cert_pem)[0])
