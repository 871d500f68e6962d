"""The agent under a real systemd on each kubelet layout: found, healed in its own shape.

One throwaway node per layout (``tests/healing_node.py`` shapes, booted once per module
and shared by that layout's tests, which run one after the other): kubeadm's
kubelet.conf with kubelet's certificate store, a kubeconfig with everything embedded, a
k3s agent (no kubelet.service), and today's kube-aws files found by ``layout = auto``.
kubecertd's config names no credentials in any of them.  Each fault is healed in the
layout's shape, the layout's unit is restarted through D-Bus, and the kubelet stand-in,
which reads its kubeconfig the way kubelet does, registers with the fake API server's
Node-authorizer check.  The last tests run that stand-in by itself (no node) to pin the
kubelet behaviour the node tests rely on, in kubelet's own words.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import factories
from healing_node import (
    SHAPES,
    STORE_CURRENT,
    Embedded,
    HealingNode,
    K3s,
    Kubeadm,
    b64,
    matching,
    node_of,
    serial_of,
)
from node_harness import NODE, OTHER_NODE, TOOLS, VENV_PYTHON, Cluster, node_factory_fixture

LAYOUTS = ("kubeadm", "embedded", "k3s", "files-auto")

# What `kubecertd --check --json` says of each node ("found_from" is checked apart).
EMBEDDED_USER = "users[system:node:server2277z.prod.jp.local].user"
EXPECTED_LAYOUT: dict[str, dict[str, Any]] = {
    "kubeadm": {
        "name": "kubeadm",
        "shape": "store",
        "unit": "kubelet.service",
        "kubeconfig": "/etc/kubernetes/kubelet.conf",
        "ca": {
            "path": "/etc/kubernetes/kubelet.conf",
            "key": "clusters[default-cluster].cluster.certificate-authority-data",
        },
        "cert": {"path": STORE_CURRENT, "key": None},
        "key": {"path": STORE_CURRENT, "key": None},
    },
    "embedded": {
        "name": "kubeconfig",
        "shape": "embedded",
        "unit": "kubelet.service",
        "kubeconfig": "/var/lib/kubelet/kubeconfig",
        "ca": {
            "path": "/var/lib/kubelet/kubeconfig",
            "key": "clusters[kubernetes-the-hard-way].cluster.certificate-authority-data",
        },
        "cert": {
            "path": "/var/lib/kubelet/kubeconfig",
            "key": f"{EMBEDDED_USER}.client-certificate-data",
        },
        "key": {"path": "/var/lib/kubelet/kubeconfig", "key": f"{EMBEDDED_USER}.client-key-data"},
    },
    "k3s": {
        "name": "k3s",
        "shape": "files",
        "unit": "k3s-agent.service",
        "kubeconfig": "/var/lib/rancher/k3s/agent/kubelet.kubeconfig",
        "ca": {"path": "/var/lib/rancher/k3s/agent/client-ca.crt", "key": None},
        "cert": {"path": "/var/lib/rancher/k3s/agent/client-kubelet.crt", "key": None},
        "key": {"path": "/var/lib/rancher/k3s/agent/client-kubelet.key", "key": None},
    },
    "files-auto": {
        "name": "files",
        "shape": "files",
        "unit": "kubelet.service",
        "kubeconfig": None,
        "ca": {"path": "/etc/kubernetes/ssl/ca.pem", "key": None},
        "cert": {"path": "/etc/kubernetes/ssl/worker.pem", "key": None},
        "key": {"path": "/etc/kubernetes/ssl/worker-key.pem", "key": None},
    },
}
# What decided, first entry of found_from: the words that must be in it.
FOUND_FROM = {
    "kubeadm": (
        "--kubeconfig of kubelet.service",
        "kubelet.service.d/10-kubeadm.conf",
        "/var/lib/kubelet/kubeadm-flags.env",
    ),
    "embedded": ("--kubeconfig of kubelet.service", "kubelet.service.d/10-kubeconfig.conf"),
    "k3s": ("k3s-agent.service",),
    "files-auto": ("/etc/kubernetes/ssl exists",),
}


@pytest.fixture(scope="module")
def healing(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HealingNode]:
    """One node of the layout named by the test's parameter, shared by that layout's tests."""
    factory = node_factory_fixture(tmp_path_factory)
    make = next(factory)
    try:
        yield HealingNode.create(make, shape=SHAPES[request.param])
    finally:
        with contextlib.suppress(StopIteration):
            next(factory)  # stops the node; a failed stop fails the last test


@pytest.mark.parametrize("healing", LAYOUTS, indirect=True)
def test_layout_is_found_and_reported(healing: HealingNode) -> None:
    """--check --json shows the layout the node really has, healthy, for kubelet's node name."""
    report = healing.check_json()
    layout = report["layout"]
    expected = EXPECTED_LAYOUT[healing.shape.name]
    assert {key: subset(layout[key], expected[key]) for key in expected} == expected
    found_from = layout["found_from"]
    assert all(word in found_from[0] for word in FOUND_FROM[healing.shape.name]), found_from
    assert report["node"] == healing.node_name
    assert report["healthy"] is True, report["findings"]
    start = healing.events("check")[0]["MESSAGE"]
    assert start.startswith(f"credentials: layout {layout['name']} ({layout['shape']})"), start


def subset(value: object, like: object) -> object:
    """``value`` with only the keys ``like`` has, when both are objects (a place's path
    and key; other fields of --check's JSON are not this module's concern)."""
    if isinstance(value, dict) and isinstance(like, dict):
        return {key: value.get(key) for key in like}
    return value


def expire(healing: HealingNode) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    healing.install_pair(
        healing.cluster.kubelet_pair(
            healing.node_name, now - dt.timedelta(days=31), now - dt.timedelta(seconds=5)
        )
    )
    return "cert-expired"


def another_nodes(healing: HealingNode) -> str:
    healing.install_pair(healing.cluster.kubelet_pair(OTHER_NODE))
    return "cert-wrong-node"


def delete(healing: HealingNode) -> str:
    return healing.shape.delete(healing.node)


def corrupt(healing: HealingNode) -> str:
    return healing.shape.corrupt(healing.node)


FAULTS: dict[str, Callable[[HealingNode], str]] = {
    "deleted": delete,
    "corrupted": corrupt,
    "another-nodes": another_nodes,
    "expired": expire,
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("healing", LAYOUTS, indirect=True)
def test_fault_is_healed_in_the_layouts_shape(healing: HealingNode, fault: str) -> None:
    """Damaged credentials are healed in place, in the layout's shape, and kubelet registers."""
    heal_and_check(healing, FAULTS[fault])


@pytest.mark.parametrize("healing", ["kubeadm"], indirect=True)
def test_regular_file_in_place_of_the_store_symlink_is_healed(healing: HealingNode) -> None:
    """A regular kubelet-client-current.pem (kubelet's rotation would fail) becomes a symlink again."""
    shape = healing.shape
    assert isinstance(shape, Kubeadm)
    heal_and_check(healing, lambda healing: shape.regular_file(healing.node))
    assert healing.node.path(STORE_CURRENT).is_symlink()


def heal_and_check(healing: HealingNode, fault: Callable[[HealingNode], str]) -> None:
    """Does the fault, then waits for its heal and checks every outcome of it."""
    node, shape = healing.node, healing.shape
    old_pid = healing.wait_registered()  # the previous test's kubelet, or the first one
    renewed = len(healing.events("renewed"))
    restarted = len(healing.events("kubelet-restarted"))
    kept = kept_by_heal(healing)
    stamped = store_file(healing)
    code = fault(healing)
    event = healing.wait_event("renewed", after=renewed, timeout=30)
    assert event["KUBECERTD_FINDING"] == code
    restart = healing.wait_event("kubelet-restarted", after=restarted, timeout=30)
    assert restart["KUBECERTD_UNIT"] == shape.unit
    assert restart["KUBECERTD_RESULT"] == "done"
    new_pid = healing.wait_registered(other_than=old_pid)
    assert restart["KUBECERTD_PID"] == str(new_pid)
    cert, key = healing.pair()
    assert matching(cert, key)
    assert node_of(cert) == healing.node_name
    assert serial_of(cert) == event["KUBECERTD_SERIAL"]
    assert shape.installed(node) == []
    if stamped is not None:  # kubelet's store: a new timestamped file, never the old one rewritten
        assert store_file(healing) != stamped
    assert kept_by_heal(healing) == kept
    assert healing.check_json()["healthy"] is True


def store_file(healing: HealingNode) -> str | None:
    """The file kubelet's store symlink names (None for the other layouts)."""
    if not isinstance(healing.shape, Kubeadm):
        return None
    return os.readlink(healing.node.path(STORE_CURRENT))


def kept_by_heal(healing: HealingNode) -> object:
    """What a heal must leave as it was: the kubeconfig but its embedded credentials."""
    if isinstance(healing.shape, Embedded):
        return Embedded.without_credentials(healing.shape.document(healing.node))
    if isinstance(healing.shape, Kubeadm | K3s):
        return healing.node.read_file(healing.shape.kubeconfig)
    return None


# --- the kubelet stand-in reads its credentials as kubelet does (no node needed) ---------


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return Cluster.new()


def kubeconfig(path: Path, user: dict[str, str], ca: dict[str, str]) -> Path:
    """A one-context kubeconfig at ``path`` (a folder is made for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "apiVersion": "v1",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1", **ca}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
        "users": [{"name": "u", "user": user}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def kubelet(*args: str) -> subprocess.CompletedProcess[str]:
    """tools/node/fake-kubelet with ``args``, against an API server that is not there."""
    return subprocess.run(
        [VENV_PYTHON, str(TOOLS / "fake-kubelet"), "--register-timeout", "0s", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def expired_pair(cluster: Cluster) -> factories.Issued:
    now = dt.datetime.now(dt.timezone.utc)
    return cluster.kubelet_pair(NODE, now - dt.timedelta(days=365), now - dt.timedelta(days=1))


def test_stand_in_reports_an_expired_kubeconfig_as_kubelets_bootstrap_does(
    tmp_path: Path, cluster: Cluster
) -> None:
    """kubeadm before 1.17: an expired embedded cert and no bootstrap kubeconfig end kubelet."""
    pair = expired_pair(cluster)
    conf = kubeconfig(
        tmp_path / "kubelet.conf",
        {"client-certificate-data": b64(pair.pem), "client-key-data": b64(pair.key_pem)},
        {"certificate-authority-data": b64(cluster.ca.pem)},
    )
    gone = tmp_path / "bootstrap-kubelet.conf"
    result = kubelet(
        f"--kubeconfig={conf}", f"--bootstrap-kubeconfig={gone}", "--rotate-certificates",
        f"--cert-dir={tmp_path / 'pki'}",
    )  # fmt: skip
    when = pair.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
    assert result.returncode == 1
    assert f"part of the existing bootstrap client certificate in {conf} is expired: {when}" in (
        result.stderr
    )
    assert (
        f"failed to run Kubelet: unable to load bootstrap kubeconfig: stat {gone}: no such file or directory"
        in result.stderr
    )


def test_stand_in_with_rotation_uses_the_store_first(tmp_path: Path, cluster: Cluster) -> None:
    """With rotation on, kubelet-client-current.pem wins over the kubeconfig's own pair."""
    store = tmp_path / "pki"
    store.mkdir()
    mine, other = cluster.kubelet_pair(NODE), cluster.kubelet_pair(OTHER_NODE)
    (store / "kubelet-client-2026-01-01-00-00-00.pem").write_bytes(mine.pem + mine.key_pem[:40])
    (store / "kubelet-client-current.pem").symlink_to(
        store / "kubelet-client-2026-01-01-00-00-00.pem"
    )
    conf = kubeconfig(
        tmp_path / "kubelet.conf",
        {"client-certificate-data": b64(other.pem), "client-key-data": b64(other.key_pem)},
        {"certificate-authority-data": b64(cluster.ca.pem)},
    )
    rotating = kubelet(f"--kubeconfig={conf}", f"--cert-dir={store}", "--rotate-certificates")
    assert rotating.returncode == 1
    assert (
        f'could not convert data from "{store}/kubelet-client-current.pem" into cert/key pair'
        in rotating.stderr
    )
    plain = kubelet(f"--kubeconfig={conf}", f"--cert-dir={store}")  # the store is not read
    assert "could not convert" not in plain.stderr
    assert "Unable to register node" in plain.stderr  # got as far as the API server


def test_stand_in_warns_of_a_regular_file_in_place_of_the_store_symlink(
    tmp_path: Path, cluster: Cluster
) -> None:
    """kubelet's rotation error for a regular current.pem is logged, and kubelet goes on."""
    store = tmp_path / "pki"
    store.mkdir()
    pair = cluster.kubelet_pair(NODE)
    (store / "kubelet-client-current.pem").write_bytes(pair.pem + pair.key_pem)
    conf = kubeconfig(
        tmp_path / "kubelet.conf",
        {"client-certificate": str(store / "kubelet-client-current.pem")}
        | {"client-key": str(store / "kubelet-client-current.pem")},
        {"certificate-authority-data": b64(cluster.ca.pem)},
    )
    result = kubelet(f"--kubeconfig={conf}", f"--cert-dir={store}", "--rotate-certificates")
    assert (
        f'expected \\"{store}/kubelet-client-current.pem\\" to be a symlink but it is a file'
        in result.stderr
    )
    assert "Unable to register node" in result.stderr  # it went on to the API server


def test_stand_in_with_an_expired_store_certificate_exits(tmp_path: Path, cluster: Cluster) -> None:
    """Rotation on, an expired current certificate and no embedded pair to fall back to: exit."""
    store = tmp_path / "pki"
    store.mkdir()
    pair = expired_pair(cluster)
    (store / "kubelet-client-2026-01-01-00-00-00.pem").write_bytes(pair.pem + pair.key_pem)
    (store / "kubelet-client-current.pem").symlink_to(
        store / "kubelet-client-2026-01-01-00-00-00.pem"
    )
    conf = kubeconfig(
        tmp_path / "kubelet.conf",
        {"client-certificate": str(store / "kubelet-client-current.pem")}
        | {"client-key": str(store / "kubelet-client-current.pem")},
        {"certificate-authority-data": b64(cluster.ca.pem)},
    )
    result = kubelet(f"--kubeconfig={conf}", f"--cert-dir={store}", "--rotate-certificates")
    assert result.returncode == 1
    assert (
        "No valid client certificate is found and the server is responsive, exiting."
        in result.stderr
    )


def test_stand_in_resolves_relative_paths_and_prefers_data(
    tmp_path: Path, cluster: Cluster
) -> None:
    """Relative files are the kubeconfig folder's; *-data wins over a file naming nothing."""
    pair = cluster.kubelet_pair(NODE)
    agent = tmp_path / "agent"
    conf = kubeconfig(
        agent / "kubelet.kubeconfig",
        {"client-certificate": "client-kubelet.crt", "client-key": "client-kubelet.key"},
        {"certificate-authority": "server-ca.crt"},
    )
    (agent / "server-ca.crt").write_bytes(cluster.ca.pem)
    (agent / "client-kubelet.crt").write_bytes(pair.pem)
    missing = kubelet(f"--kubeconfig={conf}")
    assert missing.returncode == 1
    assert (
        f"invalid kubeconfig: unable to read client-key {agent}/client-kubelet.key for u due to "
        f"open {agent}/client-kubelet.key: no such file or directory"
    ) in missing.stderr
    doc = yaml.safe_load(conf.read_text())
    doc["users"][0]["user"]["client-key-data"] = b64(pair.key_pem)
    conf.write_text(yaml.safe_dump(doc))
    data = kubelet(f"--kubeconfig={conf}")
    assert "Unable to register node" in data.stderr and "invalid kubeconfig" not in data.stderr
