"""A node set up the way kubecertd runs in production, for the end-to-end tests.

Inside one throwaway node (node_harness): journald, the system bus, the kubelet and
API-server stand-ins, the real ``kubecertd-signer`` adopting the node's cluster CA,
and the shipped ``systemd/kubecertd.service`` (only ``/usr/bin`` pointed at the test
venv), enrolled with a one-time token.  Everything talks over the node's own
loopback; assertions read real ``journalctl`` output, unit state and the files.

A ``Shape`` says how the node's kubelet keeps its credentials (SPEC "Layouts"): today's
kube-aws files, kubeadm's kubelet.conf and certificate store, a kubeconfig with
everything embedded, or a k3s agent.  It writes the units (tools/node/layouts/), the
kubeconfig and the credentials in that layout, damages them the way the tests need, and
reads them back as kubelet would.
"""

from __future__ import annotations

import atexit
import base64
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubecertd import pki
from kubecertd.signer.authority import SERVICE_USER

import factories
from node_harness import PROJECT, TOOLS, VENV, Cluster, Node

SIGNER_DIR = "/etc/kubecertd/signer"
AGENT = "kubecertd.service"
SIGNER = "kubecertd-signer.service"
KUBELET = "kubelet.service"
TIMEDATED = "dbus-org.freedesktop.timedate1.service"  # tools/node/fake-timedated

AGENT_CONFIG = """\
[signer]
url = "https://127.0.0.1:8443"
ca = "/etc/kubecertd/signer-ca.pem"
timeout = "3s"
[kubelet]
settle = "{settle}"
max_restarts_per_hour = {max_restarts}
{kubelet}[daemon]
debounce = "{debounce}"
[metrics]
textfile = "/var/lib/node_exporter/textfile_collector/kubecertd.prom"
{tables}"""

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
max_issuances_per_node_per_hour = {{max_issuances}}
"""

LYING_SIGNER_UNIT = """\
[Unit]
Description=a signer that lies (tools/node/lying-signer), instance = the lie
[Service]
ExecStart=@VENV@/bin/python @TOOLS@/lying-signer --lie %i
"""


# tools/node/fault-proxy between the agent and the signer: a node whose [signer] url is
# FAULT_PROXY_URL reaches the signer through it; FAULT_PROXY_MODE says how it misbehaves.
FAULT_PROXY = "fault-proxy.service"
FAULT_PROXY_URL = "https://127.0.0.1:9443"
FAULT_PROXY_MODE = "/run/fault-proxy/mode"
FAULT_PROXY_UNIT = f"""\
[Unit]
Description=a TCP proxy before the signer that misbehaves on demand (tools/node/fault-proxy)
[Service]
ExecStart=@VENV@/bin/python @TOOLS@/fault-proxy --listen 127.0.0.1:9443 --upstream 127.0.0.1:8443 --mode-file {FAULT_PROXY_MODE} --max-seconds 30
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
    (directory / FAULT_PROXY).write_text(FAULT_PROXY_UNIT)
    return directory


# -- layouts ------------------------------------------------------------------------------

STORE = "/var/lib/kubelet/pki"
STORE_CURRENT = f"{STORE}/kubelet-client-current.pem"
APISERVER = "https://127.0.0.1:6443"


class Shape:
    """Today's kube-aws/CoreOS node: ca.pem, worker.pem and worker-key.pem in
    /etc/kubernetes/ssl, kubelet.service without a kubeconfig, and ``ssl_dir`` set in
    kubecertd.toml.  The other shapes below change what they must."""

    name = "files"
    config = 'ssl_dir = "/etc/kubernetes/ssl"\n'  # kubecertd.toml lines before its tables
    unit = KUBELET  # the unit that runs the kubelet stand-in (and that kubecertd restarts)
    without: tuple[str, ...] = ()  # units of tools/node/units/ the node goes without
    hostname_override: str | None = None

    def node_name(self, node: Node) -> str:
        """kubelet's node name: its --hostname-override, else the lowercased hostname."""
        return (self.hostname_override or node.hostname).lower()

    def units(self) -> list[Path]:
        """Unit folders of this layout (tools/node/layouts/NAME), copied into the node."""
        folder = TOOLS / "layouts" / self.name
        return [folder] if folder.is_dir() else []

    def prepare(self, node: Node, cluster: Cluster) -> None:
        """What kubelet reads besides the credentials: flags, config, kubeconfig."""

    def install(self, node: Node, cluster: Cluster, pair: factories.Issued) -> None:
        """The cluster CA and ``pair`` where and how this layout keeps them."""
        cluster.install_kubelet(node, pair=pair)

    def pair(self, node: Node) -> tuple[bytes, bytes]:
        """(certificate, key) PEM as kubelet reads them."""
        return node.read_file("/etc/kubernetes/ssl/worker.pem"), node.read_file(
            "/etc/kubernetes/ssl/worker-key.pem"
        )

    def delete(self, node: Node) -> str:
        """Deletes a credential; returns the finding kubecertd heals it for."""
        node.path("/etc/kubernetes/ssl/worker.pem").unlink()
        return "cert-missing"

    def corrupt(self, node: Node) -> str:
        """Truncates a credential to half its size; returns the finding."""
        truncate(node, "/etc/kubernetes/ssl/worker-key.pem")
        return "key-invalid"

    def installed(self, node: Node) -> list[str]:
        """What is wrong with the credentials' shape on disk after a heal ([] when right)."""
        return [
            f"{path} has mode {mode:o}, not {want:o}"
            for path, want in (
                ("/etc/kubernetes/ssl/worker.pem", 0o644),
                ("/etc/kubernetes/ssl/worker-key.pem", 0o600),
            )
            if (mode := node.path(path).lstat().st_mode & 0o7777) != want
        ]


class FilesAuto(Shape):
    """Today's node with the packaged default config: no ssl_dir, so ``layout = auto``
    finds /etc/kubernetes/ssl."""

    name = "files-auto"
    config = ""


class Kubeadm(Shape):
    """A kubeadm join node: kubelet.conf naming kubelet's certificate store, the store's
    ``kubelet-client-current.pem`` symlink, kubeadm's drop-in and kubeadm-flags.env (with
    --hostname-override), rotation on, and the bootstrap kubeconfig gone."""

    name = "kubeadm"
    config = ""
    hostname_override = "ip-10-0-1-17.ec2.internal"
    kubeconfig = "/etc/kubernetes/kubelet.conf"

    def prepare(self, node: Node, cluster: Cluster) -> None:
        flags = (
            "--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock "
            f"--pod-infra-container-image=registry.k8s.io/pause:3.10 --hostname-override={self.hostname_override}"
        )
        node.write_file("/var/lib/kubelet/kubeadm-flags.env", f'KUBELET_KUBEADM_ARGS="{flags}"\n')
        node.write_file(
            "/var/lib/kubelet/config.yaml",
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
            "rotateCertificates: true\nserverTLSBootstrap: false\n",
        )
        # What kubelet's TLS bootstrap writes (bootstrap.go writeKubeconfigFromBootstrapping).
        conf = {
            "apiVersion": "v1",
            "clusters": [
                {
                    "cluster": {
                        "certificate-authority-data": b64(cluster.ca.pem),
                        "server": APISERVER,
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
                {
                    "name": "default-auth",
                    "user": {"client-certificate": STORE_CURRENT, "client-key": STORE_CURRENT},
                }
            ],
        }
        write_yaml(node, self.kubeconfig, conf)

    def install(self, node: Node, cluster: Cluster, pair: factories.Issued) -> None:
        """As kubelet's store writes it: a timestamped file (chain, then key; 0600) and the
        current symlink to it (absolute target), renamed into place."""
        stamp = pair.cert.not_valid_before_utc.strftime("%Y-%m-%d-%H-%M-%S")
        stamped = f"{STORE}/kubelet-client-{stamp}.pem"
        node.write_file(stamped, pair.pem + pair.key_pem, 0o600)
        temporary = node.path(f"{STORE}/kubelet-client-updated.pem")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(stamped)
        os.replace(temporary, node.path(STORE_CURRENT))

    def pair(self, node: Node) -> tuple[bytes, bytes]:
        data = node.read_file(STORE_CURRENT)
        return data, data

    def delete(self, node: Node) -> str:
        node.path(STORE_CURRENT).unlink()
        return "cert-missing"

    def corrupt(self, node: Node) -> str:
        truncate(node, node.resolve(STORE_CURRENT))
        return "cert-invalid"

    def regular_file(self, node: Node) -> str:
        """The store's symlink replaced by a regular file with the same (healthy) content,
        as a copy with ``cp -L`` or an old backup script leaves it."""
        data = node.read_file(STORE_CURRENT)
        temporary = node.path(f"{STORE}/.copy")
        temporary.write_bytes(data)
        temporary.chmod(0o600)
        os.replace(temporary, node.path(STORE_CURRENT))
        return "cert-not-symlink"

    def installed(self, node: Node) -> list[str]:
        current = node.path(STORE_CURRENT)
        if not current.is_symlink():
            return [f"{STORE_CURRENT} is not a symlink"]
        target = os.readlink(current)
        name = os.path.basename(target)
        problems = []
        if os.path.dirname(target) != STORE:
            problems.append(f"{STORE_CURRENT} points at {target}, not an absolute path in {STORE}")
        stamp = name.removeprefix("kubelet-client-").removesuffix(".pem")
        try:
            dt.datetime.strptime(stamp, "%Y-%m-%d-%H-%M-%S")
        except ValueError:
            problems.append(f"{target} is not named kubelet-client-<YYYY-MM-DD-HH-MM-SS>.pem")
        mode = node.path(target).stat().st_mode & 0o7777
        if mode != 0o600:
            problems.append(f"{target} has mode {mode:o}, not 600")
        data = node.read_file(target)
        if not data.startswith(b"-----BEGIN CERTIFICATE-----") or b"PRIVATE KEY-----" not in data:
            problems.append(f"{target} does not hold the chain, then the key")
        return problems


class Embedded(Shape):
    """Kubernetes the Hard Way (or kops): /var/lib/kubelet/kubeconfig embeds the CA, the
    certificate and the key as ``*-data``; kubelet.service names it; no rotation."""

    name = "embedded"
    config = ""
    kubeconfig = "/var/lib/kubelet/kubeconfig"

    def user(self, node: Node) -> str:
        return f"system:node:{self.node_name(node)}"

    def install(self, node: Node, cluster: Cluster, pair: factories.Issued) -> None:
        try:
            doc = self.document(node)
        except FileNotFoundError:
            doc = {
                "apiVersion": "v1",
                "clusters": [{"cluster": {"server": APISERVER}, "name": "kubernetes-the-hard-way"}],
                "contexts": [
                    {
                        "context": {
                            "cluster": "kubernetes-the-hard-way",
                            "namespace": "kube-system",
                            "user": self.user(node),
                        },
                        "name": "default",
                    }
                ],
                "current-context": "default",
                "kind": "Config",
                "preferences": {},
                "users": [{"name": self.user(node), "user": {}}],
            }
        doc["clusters"][0]["cluster"]["certificate-authority-data"] = b64(cluster.ca.pem)
        doc["users"][0]["user"]["client-certificate-data"] = b64(pair.pem)
        doc["users"][0]["user"]["client-key-data"] = b64(pair.key_pem)
        write_yaml(node, self.kubeconfig, doc)

    def document(self, node: Node) -> dict[str, Any]:
        doc: dict[str, Any] = yaml.safe_load(node.read_file(self.kubeconfig))
        return doc

    def pair(self, node: Node) -> tuple[bytes, bytes]:
        user = self.document(node)["users"][0]["user"]
        return unb64(user["client-certificate-data"]), unb64(user["client-key-data"])

    def delete(self, node: Node) -> str:
        """The kubeconfig's CA data deleted: the credential that can go while the
        kubeconfig still says whose it is (without client-*-data, kubeconfig-invalid)."""
        doc = self.document(node)
        del doc["clusters"][0]["cluster"]["certificate-authority-data"]
        write_yaml(node, self.kubeconfig, doc)
        return "ca-missing"

    def corrupt(self, node: Node) -> str:
        doc = self.document(node)
        user = doc["users"][0]["user"]
        pem = unb64(user["client-certificate-data"])
        user["client-certificate-data"] = b64(pem[: len(pem) // 2])
        write_yaml(node, self.kubeconfig, doc)
        return "cert-invalid"

    def installed(self, node: Node) -> list[str]:
        mode = node.path(self.kubeconfig).stat().st_mode & 0o7777
        problems = [] if mode == 0o600 else [f"{self.kubeconfig} has mode {mode:o}, not 600"]
        user = self.document(node)["users"][0]["user"]
        if set(user) != {"client-certificate-data", "client-key-data"}:
            problems.append(f"{self.kubeconfig}: the user holds {sorted(user)}")
        return problems

    @staticmethod
    def without_credentials(doc: dict[str, Any]) -> dict[str, Any]:
        """The kubeconfig with its embedded credentials left out: what a heal must keep."""
        copy = json.loads(json.dumps(doc))
        copy["clusters"][0]["cluster"].pop("certificate-authority-data", None)
        for key in ("client-certificate-data", "client-key-data"):
            copy["users"][0]["user"].pop(key, None)
        return copy  # type: ignore[no-any-return]


class K3s(Shape):
    """A k3s agent: kubelet runs inside k3s-agent.service (no kubelet.service), its
    kubelet.kubeconfig names client-kubelet.crt, client-kubelet.key and server-ca.crt
    beside it (relative names, resolved against the kubeconfig's folder).  k3s keeps the
    issuer of client certificates beside them as client-ca.crt; in this cluster one CA
    signs the API server's certificate and the kubelet's, so both files hold it."""

    name = "k3s"
    config = ""
    unit = "k3s-agent.service"
    without = (KUBELET,)
    agent = "/var/lib/rancher/k3s/agent"
    kubeconfig = f"{agent}/kubelet.kubeconfig"

    def prepare(self, node: Node, cluster: Cluster) -> None:
        conf = {
            "apiVersion": "v1",
            "clusters": [
                {
                    "cluster": {"certificate-authority": "server-ca.crt", "server": APISERVER},
                    "name": "local",
                }
            ],
            "contexts": [
                {
                    "context": {"cluster": "local", "namespace": "default", "user": "user"},
                    "name": "Default",
                }
            ],
            "current-context": "Default",
            "kind": "Config",
            "preferences": {},
            "users": [
                {
                    "name": "user",
                    "user": {
                        "client-certificate": "client-kubelet.crt",
                        "client-key": "client-kubelet.key",
                    },
                }
            ],
        }
        write_yaml(node, self.kubeconfig, conf)

    def install(self, node: Node, cluster: Cluster, pair: factories.Issued) -> None:
        node.write_file(f"{self.agent}/server-ca.crt", cluster.ca.pem, 0o644)
        node.write_file(f"{self.agent}/client-ca.crt", cluster.ca.pem, 0o644)
        node.write_file(f"{self.agent}/client-kubelet.crt", pair.pem, 0o644)
        node.write_file(f"{self.agent}/client-kubelet.key", pair.key_pem, 0o600)

    def pair(self, node: Node) -> tuple[bytes, bytes]:
        return node.read_file(f"{self.agent}/client-kubelet.crt"), node.read_file(
            f"{self.agent}/client-kubelet.key"
        )

    def delete(self, node: Node) -> str:
        node.path(f"{self.agent}/client-kubelet.key").unlink()
        return "key-missing"

    def corrupt(self, node: Node) -> str:
        truncate(node, f"{self.agent}/client-kubelet.crt")
        return "cert-invalid"

    def installed(self, node: Node) -> list[str]:
        return [
            f"{path} has mode {mode:o}, not {want:o}"
            for path, want in (
                (f"{self.agent}/client-kubelet.crt", 0o644),
                (f"{self.agent}/client-kubelet.key", 0o600),
            )
            if (mode := node.path(path).lstat().st_mode & 0o7777) != want
        ]


SHAPES = {shape.name: shape for shape in (Shape(), FilesAuto(), Kubeadm(), Embedded(), K3s())}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def write_yaml(node: Node, path: str, doc: dict[str, Any]) -> None:
    """A kubeconfig (0600), replaced by a rename as kubectl and kubelet write it."""
    target = node.path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.test")
    temporary.write_text(yaml.safe_dump(doc, sort_keys=False))
    temporary.chmod(0o600)
    os.replace(temporary, target)


def truncate(node: Node, path: str) -> None:
    """Cuts the node's file at ``path`` to half its size, in place."""
    target = node.path(path)
    with target.open("r+b") as stream:
        stream.truncate(target.stat().st_size // 2)


# -- the node ------------------------------------------------------------------------------


@dataclass
class HealingNode:
    node: Node
    cluster: Cluster
    shape: Shape = field(default_factory=Shape)

    # -- set-up -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        node_factory: Callable[..., Node],
        settle: str = "1s",
        debounce: str = "200ms",
        max_restarts: int = 20,
        start_agent: bool = True,
        shape: Shape | None = None,
        max_issuances: int = 1000,
    ) -> HealingNode:
        """``max_issuances``: the signer's ``max_issuances_per_node_per_hour``."""
        shape = shape or Shape()
        cluster = Cluster.new()
        scratch = Path(tempfile.mkdtemp(prefix="kubecertd-e2e-"))
        atexit.register(shutil.rmtree, scratch, True)  # it holds the test cluster's CA keys
        signer_dir = _init_signer(scratch, cluster, max_issuances)
        node = node_factory(
            extra_units=[shipped_units(scratch / "units"), *shape.units()],
            without=shape.without,
            # timedated's stand-in up before the agent asks it whether the clock is synchronized
            wants=["fake-apiserver.service", TIMEDATED],
            binds=[(signer_dir, SIGNER_DIR, "ro")],
            overlays=["/usr/lib/systemd/catalog"],  # so a test can install our catalog
        )
        _hand_over_signer(node, signer_dir)
        cluster.install_apiserver(node)
        shape.prepare(node, cluster)
        shape.install(node, cluster, cluster.kubelet_pair(shape.node_name(node)))
        node.run(["mkdir", "-p", "/var/lib/node_exporter/textfile_collector"], check=True)
        node.write_file(
            "/etc/kubecertd/signer-ca.pem", (signer_dir / "identity-ca.pem").read_bytes()
        )
        healing = cls(node, cluster, shape)
        healing.write_config(settle=settle, debounce=debounce, max_restarts=max_restarts)
        node.systemctl("start", SIGNER, shape.unit, check=True)
        healing.wait_registered()
        healing.enroll()
        if start_agent:
            healing.start_agent()
        return healing

    def write_config(
        self,
        settle: str = "1s",
        debounce: str = "200ms",
        max_restarts: int = 20,
        kubelet: Mapping[str, str | bool] | None = None,
        tables: str = "",
    ) -> None:
        """/etc/kubecertd/kubecertd.toml for this node's shape: the signer, ``settle``,
        ``max_restarts``, more ``[kubelet]`` settings (``{"version": "1.29.3"}``), and
        whole ``tables`` (TOML text) at the end."""
        extra = "".join(f"{key} = {toml_value(value)}\n" for key, value in (kubelet or {}).items())
        config = AGENT_CONFIG.format(
            settle=settle,
            debounce=debounce,
            max_restarts=max_restarts,
            kubelet=extra,
            tables=tables,
        )
        self.node.write_file("/etc/kubecertd/kubecertd.toml", (self.shape.config + config).encode())

    @property
    def node_name(self) -> str:
        """The node kubelet registers as (and kubecertd must issue for)."""
        return self.shape.node_name(self.node)

    @property
    def kubelet_unit(self) -> str:
        return self.shape.unit

    def install_pair(self, pair: factories.Issued) -> None:
        """The cluster CA and ``pair`` in the node's layout, as an operator would copy them."""
        self.shape.install(self.node, self.cluster, pair)

    def enroll(self) -> None:
        token = self.cli(
            "kubecertd-signer", "token", "create", "--node", self.node_name
        ).stdout.strip()
        self.cli("kubecertd", "enroll", "--token", token)

    def start_agent(self) -> None:
        self.node.systemctl("start", AGENT, check=True)  # Type=notify: returns after READY=1
        self.node.wait_for(lambda: self.events("check"), timeout=10)

    def cli(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:

        return self.node.run([f"{VENV}/bin/{program}", *args], check=check, timeout=60)

    # -- observations ------------------------------------------------------------------------

    def events(self, kind: str, since: str | None = None, **fields: str) -> list[dict[str, Any]]:
        """The agent's journal entries with KUBECERTD_EVENT=kind (and ``fields``), only
        those after the journal cursor ``since`` (``node.cursor()``) when given."""
        return self.node.journal(AGENT, after=since, KUBECERTD_EVENT=kind, **fields)

    def wait_event(
        self,
        kind: str,
        after: int = 0,
        timeout: float = 20,
        since: str | None = None,
        **fields: str,
    ) -> dict[str, Any]:
        """Wait for entry number ``after`` + 1 of that kind (counted from ``since``); returns it."""

        def nth() -> dict[str, Any]:  # {} (falsy) until it is there
            entries = self.events(kind, since, **fields)
            return entries[after] if len(entries) > after else {}

        return self.node.wait_for(nth, timeout=timeout, what=f"KUBECERTD_EVENT={kind} #{after + 1}")

    def kubelet_pid(self) -> int:
        return int(self.node.unit_property(self.kubelet_unit, "MainPID"))

    def wait_registered(self, other_than: int = 0, timeout: float = 20) -> int:
        """Wait until kubelet runs with a PID other than ``other_than`` and has registered."""

        def registered() -> int:  # 0 (falsy) until it has
            pid = self.kubelet_pid()
            unit = self.kubelet_unit
            if pid in (0, other_than) or self.node.unit_property(unit, "ActiveState") != "active":
                return 0
            entries = self.node.journal(unit, _PID=str(pid))
            return pid if any("registered node" in str(e.get("MESSAGE")) for e in entries) else 0

        return self.node.wait_for(
            registered, timeout=timeout, what=f"{self.kubelet_unit} registered"
        )

    def kubelet_serials(self, pid: int | None = None) -> list[str]:
        """The serials of the client certificates the kubelet stand-in registered or sent a
        heartbeat with, oldest first (as it logs them: tools/node/fake_kubelet.py), of the
        process ``pid`` only when given."""
        fields = {"_PID": str(pid)} if pid else {}
        messages = self.node.messages(self.kubelet_unit, **fields)
        return [found[1] for text in messages if (found := KUBELET_SERIAL.search(text))]

    def sighup(self) -> None:
        """``systemctl kill -s HUP`` to the agent: diagnose now (SPEC "Watching")."""
        self.node.systemctl("kill", "--kill-who=main", "-s", "HUP", AGENT, check=True)

    def pair(self) -> tuple[bytes, bytes]:
        """(certificate, key) as kubelet reads them from the node's disk."""
        return self.shape.pair(self.node)

    def check_json(self) -> dict[str, Any]:

        result = self.cli("kubecertd", "--check", "--json", check=False)
        return json.loads(result.stdout)  # type: ignore[no-any-return]


# What the kubelet stand-in logs when it registers or its heartbeat uses a new pair.
KUBELET_SERIAL = re.compile(r"with client certificate serial ([0-9a-f]+)$")


def toml_value(value: str | bool) -> str:
    """A TOML string or boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a JSON string of plain text is a TOML basic string


def _init_signer(scratch: Path, cluster: Cluster, max_issuances: int = 1000) -> Path:
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
    (signer_dir / "signer.toml").write_text(SIGNER_CONFIG.format(max_issuances=max_issuances))
    return signer_dir


def _hand_over_signer(node: Node, signer_dir: Path) -> None:
    """The signer's system user in the node, made from the shipped sysusers.d file as the
    package's postinst makes it, gets the keys and the folder that ``init`` would have
    given it had the host such a user: the shipped unit runs the signer as that user."""
    sysusers = PROJECT / "systemd" / "kubecertd-signer.sysusers"
    node.run(["systemd-sysusers", str(sysusers)], check=True)
    entry = node.run(["getent", "passwd", SERVICE_USER], check=True).stdout.split(":")
    uid, gid = int(entry[2]), int(entry[3])
    for path in (signer_dir, *signer_dir.glob("*-key.pem")):
        os.chown(path, uid, gid)


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
