"""A signer set up by a root-run version, handed to its user (kubecertd.signer.handover).

Each case starts from what ``init`` wrote before the signer had a user of its own: keys
0600 and their folder 0700, all root's, under a stand-in for /etc/kubecertd in tmp_path.
``nobody`` stands in for the kubecertd-signer user.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from kubecertd.signer.cli import main as signer_main
from kubecertd.signer.handover import main

KEYS = ("ca-key.pem", "identity-ca-key.pem", "signer-key.pem")
CERTS = ("ca.pem", "identity-ca.pem", "signer.pem", "signer.toml")
NOBODY = pwd.getpwnam("nobody")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="handing files over needs root")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """/etc/kubecertd with /etc/kubecertd/signer as a root-run ``init`` left it."""
    etc = tmp_path / "etc" / "kubecertd"
    etc.mkdir(parents=True)
    argv = ["init", "--dir", str(etc / "signer"), "--new-cluster-ca", "--hostname", "localhost"]
    assert signer_main([*argv, "--owner", "root"]) == 0
    return etc


def owner_and_mode(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_uid, stat.S_IMODE(info.st_mode)


def hand_over(root: Path) -> int:
    return main([str(root / "signer" / "signer.toml"), "nobody"], root=str(root))


def test_root_run_signer_is_handed_over(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The folder and the keys go to the user with their modes; what all may read stays root's."""
    assert hand_over(root) == 0
    assert owner_and_mode(root / "signer") == (NOBODY.pw_uid, 0o700)
    for name in KEYS:
        assert owner_and_mode(root / "signer" / name) == (NOBODY.pw_uid, 0o600), name
        assert (root / "signer" / name).stat().st_gid == NOBODY.pw_gid
    for name in CERTS:
        assert owner_and_mode(root / "signer" / name) == (0, 0o644), name
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4 and err == ""
    assert f"{root}/signer/ca-key.pem now belongs to nobody (mode kept)" in out
    assert owner_and_mode(root) == (0, 0o755)  # /etc/kubecertd itself is never handed over


def test_handover_twice_changes_nothing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second run finds everything readable and says nothing."""
    hand_over(root)
    capsys.readouterr()
    assert hand_over(root) == 0
    assert capsys.readouterr() == ("", "")


def key_outside(root: Path) -> str:
    """The cluster CA key moved out of /etc/kubecertd."""
    elsewhere = root.parent.parent / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (root / "signer" / "ca-key.pem").rename(elsewhere / "ca-key.pem")
    rewrite(root, f"{root}/signer/ca-key.pem", f"{elsewhere}/ca-key.pem")
    return f"{elsewhere}/ca-key.pem (root, mode 0600): user nobody cannot read it"


def key_symlinked_outside(root: Path) -> str:
    """The cluster CA key a symlink to a file outside /etc/kubecertd."""
    elsewhere = root.parent.parent / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (root / "signer" / "ca-key.pem").rename(elsewhere / "ca-key.pem")
    (root / "signer" / "ca-key.pem").symlink_to(elsewhere / "ca-key.pem")
    return f"{elsewhere}/ca-key.pem (root, mode 0600): user nobody cannot read it"


def key_of_another_user(root: Path) -> str:
    os.chown(root / "signer" / "ca-key.pem", 12345, 12345)
    return f"{root}/signer/ca-key.pem (uid 12345, mode 0600): user nobody cannot read it"


def closed_root(root: Path) -> str:
    root.chmod(0o700)
    return f"{root} (root, mode 0700): user nobody cannot enter it"


def low_port(root: Path) -> str:
    rewrite(root, 'listen = "0.0.0.0:8443"', 'listen = "0.0.0.0:443"')
    return "listen = '0.0.0.0:443': a port below 1024 needs CAP_NET_BIND_SERVICE"


def rewrite(root: Path, old: str, new: str) -> None:
    config = root / "signer" / "signer.toml"
    config.write_text(config.read_text().replace(old, new))


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(key_outside, id="key-outside"),
        pytest.param(key_symlinked_outside, id="symlink-outside"),
        pytest.param(key_of_another_user, id="another-users-key"),
        pytest.param(closed_root, id="closed-etc-kubecertd"),
        pytest.param(low_port, id="port-443"),
    ],
)
def test_left_for_the_operator(
    root: Path, capsys: pytest.CaptureFixture[str], setup: Callable[[Path], str]
) -> None:
    """What is not root's under /etc/kubecertd (or is outside it) is named, not changed;
    the rest is handed over all the same."""
    note = setup(root)
    assert hand_over(root) == 0
    err = capsys.readouterr().err
    assert note in err, err
    assert owner_and_mode(root / "signer" / "signer-key.pem") == (NOBODY.pw_uid, 0o600)
    elsewhere = root.parent.parent / "elsewhere" / "ca-key.pem"
    if elsewhere.exists():
        assert owner_and_mode(elsewhere) == (0, 0o600)


def test_group_readable_key_is_left_alone(root: Path) -> None:
    """A key the user's group may read already (root:group 0640) keeps its owner."""
    key = root / "signer" / "ca-key.pem"
    os.chown(key, 0, NOBODY.pw_gid)
    key.chmod(0o640)
    assert hand_over(root) == 0
    assert owner_and_mode(key) == (0, 0o640)


def test_no_signer_no_handover(tmp_path: Path) -> None:
    """Without the unit's config (no signer on this host) nothing happens."""
    assert main([str(tmp_path / "signer.toml"), "nobody"], root=str(tmp_path)) == 0


def test_unknown_user(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user that does not exist is one line on stderr and exit 1."""
    config = str(root / "signer" / "signer.toml")
    assert main([config, "no-such-user-kubecertd"], root=str(root)) == 1
    assert capsys.readouterr().err == (
        "kubecertd-signer: not handed over: no user no-such-user-kubecertd\n"
    )
