"""Finding the layout from kubelet's unit and kubeconfig (SPEC "Layouts"), with real unit
files, drop-ins, environment files and kubeconfigs under tmp_path."""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path

import pytest
import yaml
from test_heal import NODE, NOW, FakeSigner, FakeUnits, make_ca, write_identity

from kubecertd import locate
from kubecertd.config import Config, load_config
from kubecertd.diagnose import CheckPolicy, diagnose
from kubecertd.errors import ConfigError
from kubecertd.heal import Healer
from kubecertd.layout import STORE_CURRENT, Place
from kubecertd.material import read_layout

import factories

POLICY = CheckPolicy(key_owners=frozenset({0, os.geteuid()}))
KUBEADM_DROPIN = """\
[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig={kubeconfig}"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
EnvironmentFile=-{flags_env}
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
"""


def config(tmp_path: Path, text: str = "") -> Config:
    """A config whose state lives under tmp_path (the host name is NODE), plus ``text``."""
    return load_config(f'{text}\n[daemon]\nstate_dir = "{tmp_path / "state"}"\n', "test.toml", NODE)


def kubeadm_node(tmp_path: Path, override: str = "") -> tuple[Path, Path]:
    """A kubeadm-shaped node under tmp_path: the unit, its drop-in, kubeadm-flags.env, a
    kubelet.conf naming kubelet's store; returns (unit root, kubeconfig)."""
    root, pki_dir = tmp_path / "root", tmp_path / "pki"
    unit_dir = root / "lib" / "systemd" / "system"
    (unit_dir / "kubelet.service.d").mkdir(parents=True)
    (unit_dir / "kubelet.service").write_text(
        "[Unit]\nDescription=kubelet\n[Service]\nExecStart=/usr/bin/kubelet\n"
    )
    kubeconfig = tmp_path / "kubelet.conf"
    flags_env = root / "var" / "lib" / "kubelet" / "kubeadm-flags.env"  # read under root too
    flags_env.parent.mkdir(parents=True)
    (unit_dir / "kubelet.service.d" / "10-kubeadm.conf").write_text(
        KUBEADM_DROPIN.format(kubeconfig=kubeconfig, flags_env="/var/lib/kubelet/kubeadm-flags.env")
    )
    extra = f" --hostname-override={override}" if override else ""
    flags_env.write_text(
        f'KUBELET_KUBEADM_ARGS="--container-runtime-endpoint=unix:///run/containerd/containerd.sock{extra}"\n'
    )
    ca = make_ca()
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "default-cluster",
                        "cluster": {
                            "server": "https://10.0.0.1:6443",
                            "certificate-authority-data": base64.b64encode(ca.pem).decode(),
                        },
                    }
                ],
                "contexts": [
                    {
                        "name": "default-context",
                        "context": {"cluster": "default-cluster", "user": "default-auth"},
                    }
                ],
                "current-context": "default-context",
                "users": [
                    {
                        "name": "default-auth",
                        "user": {
                            "client-certificate": str(pki_dir / STORE_CURRENT),
                            "client-key": str(pki_dir / STORE_CURRENT),
                        },
                    }
                ],
            }
        )
    )
    return root, kubeconfig


def test_config_naming_files_keeps_them(tmp_path: Path) -> None:
    """layout = files (or ssl_dir set): today's three files, no unit read."""
    found = locate.find_layout(config(tmp_path, f'ssl_dir = "{tmp_path}"'), str(tmp_path / "none"))
    assert found.layout.name == "files"
    assert found.layout.cert == Place(str(tmp_path / "worker.pem"))


def test_auto_reads_kubeadm_unit_and_kubeconfig(tmp_path: Path) -> None:
    """auto: the unit's drop-in and env file give --kubeconfig and --hostname-override;
    the kubeconfig's current context gives kubelet's store and the embedded CA."""
    root, kubeconfig = kubeadm_node(tmp_path, override="Node-A.Example ")
    found = locate.find_layout(config(tmp_path), str(root))
    layout = found.layout
    assert found.node_name == "node-a.example"
    assert (layout.name, layout.shape, layout.unit) == ("kubeconfig", "store", "kubelet.service")
    assert layout.cert == layout.key == Place(str(tmp_path / "pki" / STORE_CURRENT))
    assert layout.ca == Place(
        str(kubeconfig), "clusters[default-cluster].cluster.certificate-authority-data"
    )
    assert "10-kubeadm.conf" in layout.found_from[0] and "kubeadm-flags.env" in layout.found_from[0]


def test_node_name_setting_wins_over_hostname_override(tmp_path: Path) -> None:
    """An explicit node_name is kept; kubelet's override only replaces the hostname default."""
    root, _ = kubeadm_node(tmp_path, override="node-b")
    cfg = config(tmp_path)._replace(node_name="node-z", given=frozenset({"node_name"}))
    assert locate.find_layout(cfg, str(root)).node_name == "node-z"


def test_auto_falls_back_to_todays_ssl_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No unit to read: a node upgraded from before layouts keeps healing /etc/kubernetes/ssl."""
    monkeypatch.setattr(locate, "DEFAULT_SSL_DIR", str(tmp_path))
    cfg = config(tmp_path)._replace(ssl_dir=str(tmp_path))
    found = locate.find_layout(cfg, str(tmp_path / "empty-root"))
    assert found.layout.name == "files" and found.layout.cert.path == str(tmp_path / "worker.pem")
    assert "exists" in found.layout.found_from[0]


def test_auto_that_cannot_tell_says_what_it_looked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing to go by: a config error (exit 2) naming each place looked at."""
    monkeypatch.setattr(locate, "DEFAULT_SSL_DIR", str(tmp_path / "absent"))
    with pytest.raises(ConfigError) as error:
        locate.find_layout(config(tmp_path), str(tmp_path / "empty-root"))
    message = str(error.value)
    assert error.value.exit_code == 2 and "\n" not in message
    for needle in ("kubelet.service: no unit file", "k3s-agent.service", str(tmp_path / "absent")):
        assert needle in message


def test_preset_with_an_unreadable_kubeconfig_judges_its_usual_files(tmp_path: Path) -> None:
    """layout = k3s with a broken kubeconfig: kubeconfig-invalid, and the usual files."""
    broken = tmp_path / "kubelet.kubeconfig"
    broken.write_text("current-context: [unclosed\n")
    cfg = config(tmp_path, f'layout = "k3s"\nkubeconfig = "{broken}"')
    found = locate.find_layout(cfg, str(tmp_path / "root"))
    assert found.layout.unit == "k3s-agent.service"
    assert found.layout.cert.path.endswith("/k3s/agent/client-kubelet.crt")
    codes = [f.code for f in diagnose(read_layout(found.layout), NODE, NOW, POLICY).findings]
    assert "kubeconfig-invalid" in codes


def embedded_kubeconfig(tmp_path: Path, node: str) -> tuple[Path, factories.Issued]:
    """A Kubernetes-the-hard-way kubeconfig: everything embedded, plus another user."""
    ca = make_ca()
    leaf = factories.issue(
        ca,
        cn_list=[f"system:node:{node}"],
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=29),
    )
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "preferences": {"colors": True},
                "clusters": [
                    {
                        "name": "kthw",
                        "cluster": {
                            "server": "https://server.kubernetes.local:6443",
                            "certificate-authority-data": base64.b64encode(ca.pem).decode(),
                        },
                    }
                ],
                "contexts": [
                    {"name": "default", "context": {"cluster": "kthw", "user": "kubelet"}}
                ],
                "current-context": "default",
                "users": [
                    {"name": "admin", "user": {"token": "abc"}},
                    {
                        "name": "kubelet",
                        "user": {
                            "client-certificate-data": base64.b64encode(leaf.pem).decode(),
                            "client-key-data": base64.b64encode(leaf.key_pem).decode(),
                        },
                    },
                ],
            },
            sort_keys=False,
        )
    )
    path.chmod(0o600)
    return path, ca


def test_embedded_kubeconfig_is_read_and_healed_in_place(tmp_path: Path) -> None:
    """Another node's embedded pair: cert-wrong-node naming the kubeconfig key; a heal
    rewrites the kubeconfig with this node's pair and keeps every other field."""
    path, ca = embedded_kubeconfig(tmp_path, "someone-else")
    cfg = config(
        tmp_path, f'layout = "kubeconfig"\nkubeconfig = "{path}"\n[kubelet]\nsettle = "0s"'
    )
    cfg = cfg._replace(
        node_name=NODE,
        signer=cfg.signer._replace(
            identity_cert=str(tmp_path / "state" / "identity.pem"),
            identity_key=str(tmp_path / "state" / "identity-key.pem"),
        ),
    )
    layout = locate.find_layout(cfg, str(tmp_path / "root")).layout
    assert layout.shape == "embedded"
    material = read_layout(layout)
    diagnosis = diagnose(material, NODE, NOW, POLICY)
    assert [(f.code, f.path) for f in diagnosis.findings] == [
        ("cert-wrong-node", f"{path} (users[kubelet].user.client-certificate-data)")
    ]
    write_identity(cfg)
    units = FakeUnits()
    Healer(cfg, layout, FakeSigner(ca), units).heal(diagnosis, material, "cert-wrong-node")
    assert diagnose(read_layout(layout), NODE, NOW, POLICY).findings == ()
    document = yaml.safe_load(path.read_text())
    assert document["preferences"] == {"colors": True}
    assert document["users"][0] == {"name": "admin", "user": {"token": "abc"}}
    assert os.stat(path).st_mode & 0o777 == 0o600 and units.restarts == 1


def test_k3s_judges_against_its_client_ca_and_never_writes_it(tmp_path: Path) -> None:
    """k3s signs client-kubelet.crt with client-ca.crt, not the kubeconfig's server CA: the
    certificate is judged against the client CA, and a heal writes no CA file."""
    agent = tmp_path / "agent"
    agent.mkdir()
    client_ca, server_ca = make_ca(), make_ca()
    leaf = factories.issue(
        client_ca,
        cn_list=["system:node:someone-else"],
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=29),
    )
    (agent / "client-ca.crt").write_bytes(client_ca.pem)
    (agent / "server-ca.crt").write_bytes(server_ca.pem)
    (agent / "client-kubelet.crt").write_bytes(leaf.pem)
    (agent / "client-kubelet.key").write_bytes(leaf.key_pem)
    (agent / "client-kubelet.key").chmod(0o600)
    kubeconfig = agent / "kubelet.kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {
                            "server": "https://127.0.0.1:6444",
                            "certificate-authority": "server-ca.crt",
                        },
                    }
                ],
                "contexts": [{"name": "local", "context": {"cluster": "local", "user": "kubelet"}}],
                "current-context": "local",
                "users": [
                    {
                        "name": "kubelet",
                        "user": {
                            "client-certificate": "client-kubelet.crt",
                            "client-key": "client-kubelet.key",
                        },
                    }
                ],
            }
        )
    )
    cfg = config(tmp_path, f'layout = "k3s"\nkubeconfig = "{kubeconfig}"\n[kubelet]\nsettle = "0s"')
    cfg = cfg._replace(
        signer=cfg.signer._replace(
            identity_cert=str(tmp_path / "state" / "identity.pem"),
            identity_key=str(tmp_path / "state" / "identity-key.pem"),
        )
    )
    layout = locate.find_layout(cfg, str(tmp_path / "root")).layout
    assert layout.ca == Place(str(agent / "client-ca.crt")) and not layout.ca_writable
    material = read_layout(layout)
    diagnosis = diagnose(material, NODE, NOW, POLICY)
    assert [f.code for f in diagnosis.findings] == ["cert-wrong-node"]
    write_identity(cfg)
    outcome = Healer(cfg, layout, FakeSigner(client_ca), FakeUnits()).heal(
        diagnosis, material, "cert-wrong-node"
    )
    assert outcome.installed == (
        str(agent / "client-kubelet.crt"),
        str(agent / "client-kubelet.key"),
    )
    assert (agent / "server-ca.crt").read_bytes() == server_ca.pem
    assert diagnose(read_layout(layout), NODE, NOW, POLICY).findings == ()
