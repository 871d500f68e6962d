"""The shipped systemd units as systemd itself judges them, and the signer's system user.

``systemd-analyze security --offline=true`` rates a unit file's sandbox from 0 (locked
down) to 10 without loading it; the lines it prints are in systemd-analyze(1).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from kubecertd.signer.authority import SERVICE_USER

PROJECT = Path(__file__).resolve().parent.parent
UNITS = PROJECT / "systemd"
SYSUSERS = UNITS / "kubecertd-signer.sysusers"
OVERALL = re.compile(r"Overall exposure level for \S+: (\d+\.\d+) ")


def exposure(unit: Path) -> float:
    """The "Overall exposure level" systemd-analyze gives ``unit``'s file."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    found = OVERALL.search(result.stdout + result.stderr)
    assert found, f"no exposure level for {unit}: {result.stdout}{result.stderr}"
    return float(found[1])


def settings(unit: Path, key: str) -> list[str]:
    """Every value ``key=`` takes in ``unit``'s file, in order."""
    prefix = f"{key}="
    lines = unit.read_text().splitlines()
    return [line[len(prefix) :] for line in lines if line.startswith(prefix)]


@pytest.mark.parametrize(
    ("name", "ceiling"),
    [
        # Runs as its own user with no capability (issue 13); was 2.3 as root.
        pytest.param("kubecertd-signer.service", 1.5, id="signer"),
        # Root with four capabilities to rewrite kubelet's files; 2.8 today, never worse.
        pytest.param("kubecertd.service", 2.8, id="agent"),
    ],
)
def test_unit_exposure(name: str, ceiling: float) -> None:
    """systemd-analyze rates each shipped unit at or below its ceiling."""
    assert exposure(UNITS / name) <= ceiling


def test_signer_runs_as_the_user_the_package_creates() -> None:
    """The signer unit's User= and Group= are the sysusers.d entry's, which init defaults to."""
    service = UNITS / "kubecertd-signer.service"
    entries = [line.split() for line in SYSUSERS.read_text().splitlines() if line[:2] == "u "]
    assert [entry[1] for entry in entries] == [SERVICE_USER]
    assert settings(service, "User") == settings(service, "Group") == [SERVICE_USER]


def test_sysusers_entry_creates_the_user(tmp_path: Path) -> None:
    """systemd-sysusers makes a nologin system user and group homed in the state directory."""
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        (tmp_path / "etc" / name).touch()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    user, _, uid, gid, _, home, shell = passwd[0].split(":")
    assert (user, home, shell) == (SERVICE_USER, "/var/lib/kubecertd-signer", "/usr/sbin/nologin")
    assert 0 < int(uid) < 1000  # a system user
    assert (tmp_path / "etc/group").read_text() == f"{SERVICE_USER}:x:{gid}:\n"
    state = settings(UNITS / "kubecertd-signer.service", "StateDirectory")
    assert [f"/var/lib/{name}" for name in state] == [home]
