"""Living with kubelet (SPEC "Living with kubelet"): what the clock and kubelet's own lines
add to a diagnosis, when kubecertd acts where kubelet rotates, and when it restarts."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from test_heal import NODE, NOW, FakeSigner, FakeUnits, make_ca, write_identity
from test_layout import config_for, store_layout, write_store

from kubecertd import pki
from kubecertd.diagnose import CheckPolicy, Diagnosis, diagnose
from kubecertd.edges.clock import ClockState
from kubecertd.evidence import judge
from kubecertd.heal import Healer, healing_reason
from kubecertd.kubelet import match_line
from kubecertd.layout import Layout
from kubecertd.material import read_layout

import factories

POLICY = CheckPolicy(key_owners=frozenset({0, os.geteuid()}))
SYNCED = ClockState(True, "NTPSynchronized from org.freedesktop.timedate1")
UNSYNCED = ClockState(False, "NTPSynchronized from org.freedesktop.timedate1")
WRONG_NODE_LINE = (
    'E1203 10:00:00.000000    4242 kubelet_node_status.go:92] "Unable to register node with API '
    'server" err="nodes \\"worker-1\\" is forbidden: node \\"worker-2\\" is not allowed to modify '
    'node \\"worker-1\\"" node="worker-1"'
)


def rotating(layout: Layout, on: bool = True) -> Layout:
    source = "rotateCertificates: true in /var/lib/kubelet/config.yaml"
    return layout._replace(rotation=on, rotation_from=source if on else "off")


def store_node(tmp_path: Path, node: str = NODE, days_left: int = 29) -> tuple[Layout, Diagnosis]:
    """kubelet's store under tmp_path, its certificate for ``node`` ending in ``days_left``."""
    layout = store_layout(tmp_path)
    ca = make_ca()
    write_store(layout, ca, node=node)
    if days_left != 29:
        leaf = factories.issue(
            ca,
            cn_list=[f"system:node:{node}"],
            not_before=NOW - dt.timedelta(days=30),
            not_after=NOW + dt.timedelta(days=days_left),
        )
        Path(os.path.realpath(layout.cert.path)).write_bytes(leaf.pem + leaf.key_pem)
    return layout, diagnose(read_layout(layout), NODE, NOW, POLICY)


def codes(diagnosis: Diagnosis) -> list[str]:
    return [f.code for f in diagnosis.findings]


# -- judge: the clock, rotation, kubelet's lines ----------------------------------------------


def test_rotation_managed_on_a_healthy_rotating_node(tmp_path: Path) -> None:
    """Where kubelet rotates a healthy certificate, --check says so (info, still healthy)."""
    layout, diagnosis = store_node(tmp_path)
    judged = judge(diagnosis, rotating(layout), SYNCED)
    assert codes(judged) == ["rotation-managed"] and judged.healthy
    (finding,) = judged.findings
    assert finding.severity == "info" and "/var/lib/kubelet/config.yaml" in finding.message


def test_no_rotation_finding_when_unhealthy_or_off(tmp_path: Path) -> None:
    """rotation-managed is only for a healthy certificate that kubelet rotates."""
    layout, healthy = store_node(tmp_path)
    assert codes(judge(healthy, rotating(layout, on=False), SYNCED)) == []
    other, wrong = store_node(tmp_path / "other", node="someone-else")
    assert codes(judge(wrong, rotating(other), SYNCED)) == ["cert-wrong-node"]


@pytest.mark.parametrize(
    ("clock", "expected"),
    [
        pytest.param(UNSYNCED, ["cert-expired", "clock-unsynced"], id="unsynced"),
        pytest.param(SYNCED, ["cert-expired"], id="synced"),
        pytest.param(ClockState(None, "no answer"), ["cert-expired"], id="unknown"),
    ],
)
def test_clock_unsynced_only_with_a_date_finding(
    tmp_path: Path, clock: ClockState, expected: list[str]
) -> None:
    """An expired certificate on an unsynchronized clock is also clock-unsynced (an error)."""
    layout, diagnosis = store_node(tmp_path, days_left=-1)
    assert codes(judge(diagnosis, layout, clock)) == expected


def test_clock_unsynced_not_without_a_date_finding(tmp_path: Path) -> None:
    """A healthy certificate on an unsynchronized clock is no finding at all."""
    layout, diagnosis = store_node(tmp_path)
    assert codes(judge(diagnosis, layout, UNSYNCED)) == []


def test_kubelet_line_is_quoted_under_the_finding_it_agrees_with(tmp_path: Path) -> None:
    """kubelet's NodeRestriction refusal is quoted under cert-wrong-node."""
    layout, diagnosis = store_node(tmp_path, node="worker-2")
    line = match_line(WRONG_NODE_LINE)
    assert line is not None
    (finding,) = judge(diagnosis, layout, SYNCED, [line]).findings
    assert finding.code == "cert-wrong-node"
    assert (
        finding.kubelet_line is not None and "is not allowed to modify node" in finding.kubelet_line
    )


# -- healing_reason: when kubecertd acts -----------------------------------------------------


@pytest.mark.parametrize(
    ("node", "days_left", "rotation", "clock", "reason"),
    [
        pytest.param(NODE, 29, True, SYNCED, None, id="rotating-healthy"),
        pytest.param(NODE, 2, True, SYNCED, None, id="rotating-due-is-kubelets"),
        pytest.param(NODE, 2, False, SYNCED, "renewal", id="not-rotating-due"),
        pytest.param(NODE, -1, True, SYNCED, "cert-expired", id="rotating-expired"),
        pytest.param("someone-else", 29, True, SYNCED, "cert-wrong-node", id="rotating-other-node"),
        pytest.param(NODE, -1, False, UNSYNCED, None, id="clock-unsynced"),
    ],
)
def test_when_kubecertd_acts(
    tmp_path: Path, node: str, days_left: int, rotation: bool, clock: ClockState, reason: str | None
) -> None:
    """Where kubelet rotates, only what it cannot recover from; nothing on an unsynced clock."""
    layout, diagnosis = store_node(tmp_path, node=node, days_left=days_left)
    judged = judge(diagnosis, rotating(layout, rotation), clock)
    assert healing_reason(judged, config_for(tmp_path), NOW, rotation) == reason


# -- restarts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "rotation", "restarts"),
    [
        pytest.param("1.29.3", False, 0, id="files-1.29-no-restart"),
        pytest.param("1.17.4", False, 1, id="files-1.17-restart"),
        pytest.param("1.29.3", True, 1, id="rotation-restart"),
        pytest.param("", False, 1, id="unknown-version-restart"),
    ],
)
def test_restart_auto_per_mode(tmp_path: Path, version: str, rotation: bool, restarts: int) -> None:
    """[kubelet] restart = "auto" restarts kubelet only when it would not reload the pair."""
    config = config_for(tmp_path)
    config = config._replace(kubelet=config.kubelet._replace(version=version))
    layout = rotating(store_layout(tmp_path), rotation)
    ca = make_ca()
    write_store(layout, ca)
    write_identity(config)
    material = read_layout(layout)
    diagnosis = diagnose(material, NODE, NOW, POLICY)
    units = FakeUnits()
    outcome = Healer(config, layout, FakeSigner(ca), units).heal(diagnosis, material, "renewal")
    assert units.restarts == restarts and outcome.restarted is True
    assert not outcome.rolled_back


def test_rotating_node_gets_kubelets_template_key(tmp_path: Path) -> None:
    """Where kubelet rotates, the new key is ECDSA P-256 whatever [policy] key_type says."""
    config = config_for(tmp_path)
    config = config._replace(policy=config.policy._replace(key_type="rsa-2048"))
    layout = rotating(store_layout(tmp_path))
    ca = make_ca()
    write_store(layout, ca)
    write_identity(config)
    material = read_layout(layout)
    diagnosis = diagnose(material, NODE, NOW, POLICY)
    Healer(config, layout, FakeSigner(ca), None).heal(diagnosis, material, "cert-expired")
    key = read_layout(layout).key.data or b""
    assert pki.describe_key(pki.load_private_key(key)) == "ECDSA P-256"
