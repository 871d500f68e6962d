"""Layouts: reading and healing the credentials in kubelet's store shape and beside it
(SPEC "Layouts"), with real files, symlinks and installs under tmp_path."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

import pytest
from test_heal import NODE, NOW, FakeSigner, FakeUnits, make_ca, write_identity

from kubecertd import pki
from kubecertd.config import Config, load_config
from kubecertd.diagnose import CheckPolicy, diagnose
from kubecertd.edges.install import install, prune_store, recover
from kubecertd.heal import Healer
from kubecertd.layout import (
    KUBEADM,
    STORE_CURRENT,
    Credentials,
    Layout,
    Place,
    is_store_file,
    plan_install,
    store_file_name,
)
from kubecertd.material import read_layout

import factories

POLICY = CheckPolicy(key_owners=frozenset({0, os.geteuid()}))


def store_layout(tmp_path: Path) -> Layout:
    """kubeadm's shape under tmp_path: a CA file and kubelet's store."""
    current = Place(str(tmp_path / "pki" / STORE_CURRENT))
    ca = Place(str(tmp_path / "ca.crt"))
    return Layout(KUBEADM, ca, current, current, "kubelet.service", None, ("test",))


def config_for(tmp_path: Path, backups: int = 3) -> Config:
    text = f"""
node_name = "{NODE}"
[signer]
identity_cert = "{tmp_path / "state" / "identity.pem"}"
identity_key = "{tmp_path / "state" / "identity-key.pem"}"
[daemon]
state_dir = "{tmp_path / "state"}"
backups = {backups}
[kubelet]
settle = "0s"
"""
    return load_config(text, "test.toml", "host")


def write_store(
    layout: Layout, ca: factories.Issued, node: str = NODE, as_link: bool = True
) -> factories.Issued:
    """kubelet's own way: a timestamped file (chain, then key) and the symlink to it."""
    store = Path(layout.cert.path).parent
    store.mkdir(parents=True, exist_ok=True)
    Path(layout.ca.path).write_bytes(ca.pem)
    leaf = factories.issue(
        ca,
        cn_list=[f"system:node:{node}"],
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=29),
    )
    stamped = store / "kubelet-client-2026-01-02-03-04-05.pem"
    stamped.write_bytes(leaf.pem + leaf.key_pem)
    stamped.chmod(0o600)
    if as_link:
        os.symlink(stamped, layout.cert.path)
    else:
        Path(layout.cert.path).write_bytes(leaf.pem + leaf.key_pem)
        os.chmod(layout.cert.path, 0o600)
    return leaf


def judge(layout: Layout) -> list[str]:
    return [f.code for f in diagnose(read_layout(layout), NODE, NOW, POLICY).findings]


# -- reading ----------------------------------------------------------------------------------


def test_store_file_is_read_as_chain_and_key(tmp_path: Path) -> None:
    """One PEM with the chain and the key behind kubelet's symlink is a healthy pair."""
    layout = store_layout(tmp_path)
    write_store(layout, make_ca())
    assert judge(layout) == []


@pytest.mark.parametrize("key_first", [False, True], ids=["chain-then-key", "key-then-chain"])
def test_store_file_in_any_order(tmp_path: Path, key_first: bool) -> None:
    """The key may stand before or after the certificates in the combined file."""
    layout = store_layout(tmp_path)
    leaf = write_store(layout, make_ca())
    target = Path(os.path.realpath(layout.cert.path))
    target.write_bytes(leaf.key_pem + leaf.pem if key_first else leaf.pem + leaf.key_pem)
    assert judge(layout) == []


def test_regular_file_in_the_store_is_cert_not_symlink(tmp_path: Path) -> None:
    """A regular file where kubelet keeps its symlink is cert-not-symlink, naming the path."""
    layout = store_layout(tmp_path)
    write_store(layout, make_ca(), as_link=False)
    diagnosis = diagnose(read_layout(layout), NODE, NOW, POLICY)
    assert [(f.code, f.path) for f in diagnosis.findings] == [
        ("cert-not-symlink", layout.cert.path)
    ]


def test_dangling_store_symlink_is_cert_missing(tmp_path: Path) -> None:
    """A symlink whose timestamped file is gone is a missing certificate and key."""
    layout = store_layout(tmp_path)
    write_store(layout, make_ca())
    os.unlink(os.path.realpath(layout.cert.path))
    assert judge(layout) == ["cert-missing", "key-missing"]


# -- installing in the store's shape --------------------------------------------------------


def test_plan_for_the_store_is_a_file_then_its_symlink(tmp_path: Path) -> None:
    """The store gets kubelet-client-<time>.pem (0600, chain then key) and an absolute symlink."""
    layout = store_layout(tmp_path)
    targets = plan_install(layout, Credentials(None, b"CERT\n", b"KEY\n"), NOW)
    stamped = str(tmp_path / "pki" / store_file_name(NOW))
    assert [(t.path, t.data, t.mode, t.link) for t in targets] == [
        (stamped, b"CERT\nKEY\n", 0o600, False),
        (layout.cert.path, stamped.encode(), 0o777, True),
    ]
    assert os.path.isabs(stamped) and is_store_file(os.path.basename(stamped))


@pytest.mark.parametrize(
    "name",
    [
        "kubelet-client-2026-12-03-17-05-09.pem",
        "kubelet-client-current.pem",
        "kubelet-client-updated.pem",
        "kubelet-client-2026.pem",
    ],
)
def test_store_file_names(name: str) -> None:
    """Only kubelet's timestamped names count as store files (never current or updated)."""
    assert is_store_file(name) == (name == "kubelet-client-2026-12-03-17-05-09.pem")


@pytest.mark.parametrize("healthy", [False, True], ids=["cert-not-symlink", "renewal"])
def test_heal_in_the_store_swaps_the_symlink(tmp_path: Path, healthy: bool) -> None:
    """A heal writes a new timestamped file and points the symlink at it; the old content
    goes to the backup, and the store is never left with a regular file."""
    layout, config, ca = store_layout(tmp_path), config_for(tmp_path), make_ca()
    write_store(layout, ca, as_link=healthy)
    write_identity(config)
    material = read_layout(layout)
    diagnosis = diagnose(material, NODE, NOW, POLICY)
    reason = "renewal" if healthy else "cert-not-symlink"
    outcome = Healer(config, layout, FakeSigner(ca), FakeUnits()).heal(diagnosis, material, reason)
    current = Path(layout.cert.path)
    assert current.is_symlink() and os.path.isabs(os.readlink(current))
    target = Path(os.readlink(current))
    assert is_store_file(target.name) and target.parent == current.parent
    assert target.stat().st_mode & 0o777 == 0o600
    body = target.read_bytes()
    assert body.index(b"CERTIFICATE") < body.index(b"PRIVATE KEY")
    assert judge(layout) == [] and outcome.restarted is True
    assert outcome.installed == (str(target), layout.cert.path)
    backups = list((tmp_path / "pki" / ".kubecertd-backup").iterdir())
    assert [p.name for p in backups[0].iterdir()] == [STORE_CURRENT]


def test_rollback_in_the_store_points_back_at_the_old_pair(tmp_path: Path) -> None:
    """kubelet does not come back with the new pair: the old one is back, behind a symlink."""
    layout, config, ca = store_layout(tmp_path), config_for(tmp_path), make_ca()
    leaf = write_store(layout, ca)
    write_identity(config)
    material = read_layout(layout)
    diagnosis = diagnose(material, NODE, NOW, POLICY)
    units = FakeUnits(after_restart="failed")
    outcome = Healer(config, layout, FakeSigner(ca), units).heal(diagnosis, material, "renewal")
    assert outcome.rolled_back and Path(layout.cert.path).is_symlink()
    assert Path(layout.cert.path).read_bytes() == leaf.pem + leaf.key_pem


def test_store_symlink_is_never_absent_during_an_install(tmp_path: Path) -> None:
    """A reader polling kubelet-client-current.pem during 30 installs always finds it."""
    layout = store_layout(tmp_path)
    write_store(layout, make_ca())
    state = tmp_path / "state"
    stop, missing = threading.Event(), []

    def watch() -> None:
        while not stop.is_set() and len(missing) < 10:
            if not os.path.lexists(layout.cert.path):
                missing.append(1)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for step in range(30):
            when = NOW + dt.timedelta(seconds=step)
            targets = plan_install(layout, Credentials(None, b"C%d\n" % step, b"K\n"), when)
            install(targets, str(state), None, 0, when)
    finally:
        stop.set()
        reader.join(timeout=10)
    assert missing == []
    assert Path(layout.cert.path).read_bytes() == b"C29\nK\n"


def test_interrupted_store_install_is_finished_at_start(tmp_path: Path) -> None:
    """A crash between the file's rename and the symlink's leaves an intent that recover()
    finishes: the symlink then names the new file."""
    layout = store_layout(tmp_path)
    write_store(layout, make_ca())
    targets = plan_install(layout, Credentials(None, b"NEW\n", b"KEY\n"), NOW)

    class Crash(Exception):
        pass

    def crash(step: str) -> None:
        if step == f"renamed {targets[0].path}":
            raise Crash(step)

    state = str(tmp_path / "state")
    with pytest.raises(Crash):
        install(targets, state, None, 0, NOW, checkpoint=crash)
    assert Path(layout.cert.path).read_bytes() != b"NEW\nKEY\n"  # still the old one
    assert recover(state, layout.directories()) is not None
    assert os.readlink(layout.cert.path) == targets[0].path
    assert Path(layout.cert.path).read_bytes() == b"NEW\nKEY\n"


def test_prune_store_keeps_the_newest_and_the_current(tmp_path: Path) -> None:
    """Old timestamped files are pruned down to `backups`; the symlink's file always stays."""
    store = tmp_path / "pki"
    store.mkdir()
    names = [f"kubelet-client-2026-0{month}-01-00-00-00.pem" for month in range(1, 7)]
    for name in names:
        (store / name).write_bytes(b"x")
    os.symlink(store / names[0], store / STORE_CURRENT)  # the oldest is the current one
    (store / "unrelated.pem").write_bytes(b"y")
    removed = prune_store(str(store), keep=2)
    assert sorted(os.path.basename(p) for p in removed) == names[1:4]
    assert sorted(p.name for p in store.iterdir()) == sorted(
        [names[0], names[4], names[5], STORE_CURRENT, "unrelated.pem"]
    )


def test_store_heal_fingerprint_recognises_own_writes(tmp_path: Path) -> None:
    """What a heal reports as written is what the next read sees (the daemon ignores it)."""
    layout, config, ca = store_layout(tmp_path), config_for(tmp_path), make_ca()
    write_store(layout, ca)
    write_identity(config)
    material = read_layout(layout)
    diagnosis = diagnose(material, NODE, NOW, POLICY)
    outcome = Healer(config, layout, FakeSigner(ca), None).heal(diagnosis, material, "renewal")
    after = read_layout(layout)
    assert outcome.written == tuple((s.path, s.data) for s in (after.ca, after.cert, after.key))
    assert pki.load_certificates(after.cert.data or b"")[0].serial_number == int(outcome.serial, 16)
