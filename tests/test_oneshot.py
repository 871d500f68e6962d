"""`kubecertd enroll` and `kubecertd --check --fix` against a real signer on loopback."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from pathlib import Path

import pytest

from kubecertd import pki
from kubecertd.cli import main
from kubecertd.config import load_config
from kubecertd.daemon import acquire_lock
from kubecertd.edges.client import HttpSignerClient
from kubecertd.heal import identity_due, obtain_identity

import factories
from signer_harness import Signer

UTC = dt.timezone.utc


def agent_config(tmp_path: Path, signer: Signer, node: str, url: str | None = None) -> Path:
    """An agent config for ``node`` whose files all live under tmp_path."""
    path = tmp_path / "kubecertd.toml"
    path.write_text(
        f"""
node_name = "{node}"
ssl_dir = "{tmp_path / "ssl"}"
[signer]
url = "{url or signer.url}"
ca = "{signer.identity_ca}"
identity_cert = "{tmp_path / "state" / "identity.pem"}"
identity_key = "{tmp_path / "state" / "identity-key.pem"}"
timeout = "2s"
[daemon]
state_dir = "{tmp_path / "state"}"
"""
    )
    return path


def unique_node() -> str:
    return f"worker-{uuid.uuid4().hex[:8]}.prod.jp.local"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_enroll_writes_the_identity(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """enroll with a one-time token writes a 0600 identity key and a certificate for this node."""
    node = unique_node()
    config = agent_config(tmp_path, signer, node)
    status, out, _ = run(capsys, "enroll", "--token", signer.token(node), "--config", str(config))
    assert status == 0 and f"enrolled {node}" in out
    cert = pki.load_certificates((tmp_path / "state" / "identity.pem").read_bytes())[0]
    assert pki.common_names(cert.subject) == [node]
    assert os.stat(tmp_path / "state" / "identity-key.pem").st_mode & 0o777 == 0o600


def test_enroll_with_a_spent_token_exits_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """A token used twice is refused: exit 1 and the signer's reason, no traceback."""
    node = unique_node()
    config = agent_config(tmp_path, signer, node)
    token = signer.token(node)
    assert run(capsys, "enroll", "--token", token, "--config", str(config))[0] == 0
    status, _, err = run(capsys, "enroll", "--token", token, "--config", str(config))
    assert status == 1
    assert "token-invalid" in err and "Traceback" not in err
    assert token.split(".")[1] not in err


def test_check_fix_heals_the_seed_case(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """--check --fix --no-restart replaces another node's pair and judges on the second diagnosis."""
    node = unique_node()
    config = agent_config(tmp_path, signer, node)
    assert run(capsys, "enroll", "--token", signer.token(node), "--config", str(config))[0] == 0
    cluster = factories.Issued(
        pki.load_certificates(signer.ca.read_bytes())[0],
        pki.load_private_key(signer.ca_key.read_bytes()),
    )
    now = dt.datetime.now(UTC)
    other = factories.issue(
        cluster,
        cn_list=["system:node:someone-else"],
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=9),
    )
    factories.write_ssl_dir(tmp_path / "ssl", cluster.pem, other.pem, other.key_pem)
    assert run(capsys, "--check", "--config", str(config))[0] == 1
    status, out, _ = run(
        capsys, "--check", "--fix", "--no-restart", "--json", "--config", str(config)
    )
    report = json.loads(out)
    assert status == 0 and report["healthy"] is True
    assert report["certificate"]["node"] == node


def test_check_fix_with_unreachable_signer_gives_up(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """An unreachable signer: three tries, exit 1 saying so, files untouched."""
    node = unique_node()
    config = agent_config(tmp_path, signer, node, url="https://127.0.0.1:9")
    factories.write_ssl_dir(tmp_path / "ssl", None, None, None)
    now = dt.datetime.now(UTC)
    identity = factories.issue(
        factories.make_ca(),
        cn_list=[node],
        orgs=[],
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=1),
    )
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "identity.pem").write_bytes(identity.pem)
    (tmp_path / "state" / "identity-key.pem").write_bytes(identity.key_pem)
    status, _, err = run(capsys, "--check", "--fix", "--no-restart", "--config", str(config))
    assert status == 1
    assert "gave up after 3 attempts" in err and "Traceback" not in err
    assert list((tmp_path / "ssl").iterdir()) == []


def test_check_fix_refuses_while_the_daemon_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """Only one kubecertd per node: --fix names the PID holding the lock and exits 1."""
    config = agent_config(tmp_path, signer, unique_node())
    lock = acquire_lock(str(tmp_path / "state"))
    try:
        status, _, err = run(capsys, "--check", "--fix", "--no-restart", "--config", str(config))
    finally:
        os.close(lock)
    assert status == 1
    assert f"another kubecertd (PID {os.getpid()})" in err


def test_identity_is_renewed_through_v1_identity(tmp_path: Path, signer: Signer) -> None:
    """The agent renews its own identity with the current one (POST /v1/identity)."""
    node = unique_node()
    config = load_config(agent_config(tmp_path, signer, node).read_text(), "test.toml", "host")
    client = HttpSignerClient(config.signer.url, config.signer.ca, config.signer.timeout)
    first = obtain_identity(config, client, signer.token(node), dt.datetime.now(UTC))
    later = dt.datetime.now(UTC) + dt.timedelta(days=360)
    assert identity_due(config, later) and not identity_due(config, dt.datetime.now(UTC))
    second = obtain_identity(config, client, None, dt.datetime.now(UTC))
    assert second.serial_number != first.serial_number
    assert pki.common_names(second.subject) == [node]
