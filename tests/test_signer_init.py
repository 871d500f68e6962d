"""``kubecertd-signer init``: who owns what it writes (SPEC "Central signer", ``init``).

The signer's service runs as its own user, so the keys ``init`` writes go to that user
(``--owner``, by default kubecertd-signer when root runs init and the user exists);
certificates and signer.toml, readable by all, stay with whoever ran init.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from kubecertd.signer import authority
from kubecertd.signer.authority import Owner, init_owner
from kubecertd.signer.cli import main

KEYS = ("ca-key.pem", "identity-ca-key.pem", "signer-key.pem")
READABLE = ("ca.pem", "identity-ca.pem", "signer.pem", "signer.toml")
NOBODY = pwd.getpwnam("nobody")  # a user every Debian system has

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")


def init(directory: Path, *extra: str) -> int:
    return main(
        ["init", "--dir", str(directory), "--new-cluster-ca", "--hostname", "localhost", *extra]
    )


def owner_and_mode(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_uid, stat.S_IMODE(info.st_mode)


@as_root
def test_owner_gets_the_keys_and_the_folder(tmp_path: Path) -> None:
    """--owner USER: the keys are USER's (0600), and so is the new folder (0700)."""
    directory = tmp_path / "signer"
    assert init(directory, "--owner", "nobody") == 0
    assert owner_and_mode(directory) == (NOBODY.pw_uid, 0o700)
    for name in KEYS:
        assert owner_and_mode(directory / name) == (NOBODY.pw_uid, 0o600), name
        assert (directory / name).stat().st_gid == NOBODY.pw_gid, name
    for name in READABLE:
        assert owner_and_mode(directory / name) == (0, 0o644), name


@as_root
@pytest.mark.parametrize(
    ("before", "after"),
    [
        pytest.param(0o700, NOBODY.pw_uid, id="closed-folder-handed-over"),
        pytest.param(0o750, NOBODY.pw_uid, id="group-folder-handed-over"),
        pytest.param(0o755, 0, id="open-folder-left-alone"),
    ],
)
def test_owner_of_an_existing_folder(tmp_path: Path, before: int, after: int) -> None:
    """An existing folder goes to the owner, its mode kept, only when others cannot enter it."""
    directory = tmp_path / "signer"
    directory.mkdir()
    directory.chmod(before)
    assert init(directory, "--owner", "nobody") == 0
    assert owner_and_mode(directory) == (after, before)


def test_unknown_owner_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--owner naming no user exits 2 with one line, and writes nothing."""
    directory = tmp_path / "signer"
    assert init(directory, "--owner", "no-such-user-kubecertd") == 2
    assert "--owner 'no-such-user-kubecertd': no such user" in capsys.readouterr().err
    assert not directory.exists()


@pytest.mark.parametrize(
    ("service_user", "name", "euid", "expected"),
    [
        pytest.param("nobody", None, 0, "nobody", id="root-and-the-user-exists"),
        pytest.param("no-such-user-kubecertd", None, 0, None, id="root-without-the-user"),
        pytest.param("nobody", None, 1000, None, id="not-root"),
        pytest.param("no-such-user-kubecertd", "nobody", 1000, "nobody", id="named"),
    ],
)
def test_default_owner(
    monkeypatch: pytest.MonkeyPatch,
    service_user: str,
    name: str | None,
    euid: int,
    expected: str | None,
) -> None:
    """Without --owner, the service's user when root runs init and the user exists."""
    monkeypatch.setattr(authority, "SERVICE_USER", service_user)
    owner = init_owner(name, euid)
    if expected is None:
        assert owner is None
    else:
        entry = pwd.getpwnam(expected)
        assert owner == Owner(expected, entry.pw_uid, entry.pw_gid)
