"""`kubecertd enroll` and `kubecertd --check --fix` against a real signer on loopback."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
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


# -- the report always comes (SPEC "--check --fix"), and nothing hopeless is retried --------


def enrolled_with_foreign_pair(tmp_path: Path, signer: Signer, url: str | None = None) -> Path:
    """A node with its identity and another node's pair in ssl_dir; its config file."""
    node = unique_node()
    config = agent_config(tmp_path, signer, node, url=url)
    (tmp_path / "state").mkdir(exist_ok=True)
    identity = factories.issue(factories.make_ca(), cn_list=[node], orgs=[])
    (tmp_path / "state" / "identity.pem").write_bytes(identity.pem)
    (tmp_path / "state" / "identity-key.pem").write_bytes(identity.key_pem)
    cluster = factories.make_ca()
    other = factories.issue(cluster, cn_list=["system:node:someone-else"])
    factories.write_ssl_dir(tmp_path / "ssl", cluster.pem, other.pem, other.key_pem)
    return config


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_check_fix_json_reports_an_unreachable_signer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """--check --json --fix prints one JSON object even when the fix fails: the diagnosis
    after the attempt, the tries, the last error, and that nothing was written."""
    config = enrolled_with_foreign_pair(tmp_path, signer, url="https://127.0.0.1:9")
    before = snapshot(tmp_path / "ssl")
    status, out, err = run(
        capsys, "--check", "--fix", "--json", "--no-restart", "--config", str(config)
    )
    report = json.loads(out)
    assert status == 1 and report["healthy"] is False
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == [
        "cert-wrong-node"
    ]
    fix = report["fix"]
    assert fix["result"] == "failed" and fix["reason"] == "cert-wrong-node"
    assert fix["tries"] == 3 and fix["written"] == [] and fix["restarted"] is None
    assert fix["error"]["code"] == "signer-unreachable"
    assert "gave up after 3 attempts" in fix["error"]["message"]
    assert "gave up after 3 attempts" in err and "Traceback" not in err
    assert snapshot(tmp_path / "ssl") == before


def test_check_fix_text_reports_what_the_fix_did(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """Without --json the text report comes after a successful fix too, with what was written."""
    node = unique_node()
    config = agent_config(tmp_path, signer, node)
    assert run(capsys, "enroll", "--token", signer.token(node), "--config", str(config))[0] == 0
    factories.write_ssl_dir(tmp_path / "ssl", None, None, None)
    status, out, _ = run(capsys, "--check", "--fix", "--no-restart", "--config", str(config))
    assert status == 0
    assert re.search(r"^fix: healed ca-missing in 1 try: wrote .*worker\.pem", out, re.M)
    assert out.rstrip().splitlines()[-1].startswith("HEALTHY")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of its own under tmp_path (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (make test runs as root)")
    mountpoint = tmp_path / "ssl"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)], check=True
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_check_fix_reports_a_file_system_that_refuses(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    signer: Signer,
    small_tmpfs: Path,
    fault: str,
) -> None:
    """A read-only or full file system: the files stay as they were, and the report (text
    and JSON alike) still says what happened, with install-failed."""
    node = unique_node()
    config = agent_config(tmp_path, signer, node)
    assert run(capsys, "enroll", "--token", signer.token(node), "--config", str(config))[0] == 0
    cluster = factories.make_ca()
    other = factories.issue(cluster, cn_list=["system:node:someone-else"])
    factories.write_ssl_dir(small_tmpfs, cluster.pem, other.pem, other.key_pem)
    before = snapshot(small_tmpfs)
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    else:
        filler = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):  # ENOSPC: full, as meant
                for _ in range(1024):  # 4 MiB at most; the tmpfs holds 256 KiB
                    os.write(filler, b"\0" * 4096)
        finally:
            os.close(filler)
        before["filler"] = (small_tmpfs / "filler").read_bytes()
    status, out, err = run(
        capsys, "--check", "--fix", "--no-restart", "--json", "--config", str(config)
    )
    fix = json.loads(out)["fix"]
    assert status == 1 and fix["result"] == "failed" and fix["tries"] == 1
    assert fix["error"]["code"] == "install-failed" and fix["written"] == []
    assert "Traceback" not in err
    status, out, _ = run(capsys, "--check", "--fix", "--no-restart", "--config", str(config))
    assert status == 1 and "fix: failed for cert-wrong-node after 1 try (install-failed)" in out
    assert snapshot(small_tmpfs) == before


def test_check_fix_json_while_the_daemon_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """With the lock held, --json still prints the (read-only) diagnosis and lock-held."""
    config = enrolled_with_foreign_pair(tmp_path, signer)
    lock = acquire_lock(str(tmp_path / "state"))
    try:
        status, out, _ = run(capsys, "--check", "--fix", "--json", "--config", str(config))
    finally:
        os.close(lock)
    report = json.loads(out)
    assert status == 1 and report["fix"]["error"]["code"] == "lock-held"
    assert report["fix"]["tries"] == 0 and report["healthy"] is False


def test_json_config_error_is_still_one_json_object(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A config error under --json: exit 2, the one-line error on stderr, a JSON object on stdout."""
    config = tmp_path / "bad.toml"
    config.write_text('[signer]\nurl = "http://plain"\n')
    status, out, err = run(capsys, "--check", "--json", "--config", str(config))
    report = json.loads(out)
    assert status == 2 and report["healthy"] is None
    assert report["error"]["code"] == "config-error"
    assert f"{config}: signer.url" in report["error"]["message"]
    assert err.count("\n") == 1 and f"{config}: signer.url" in err


def test_enroll_without_signer_url_fails_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """enroll with no [signer] url: exit 2 at once, one line naming signer.url and the file."""
    config = tmp_path / "kubecertd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    status, out, err = run(capsys, "enroll", "--token", "abc.def", "--config", str(config))
    assert status == 2 and out == ""
    assert (
        err
        == f"kubecertd: error: {config}: signer.url is empty: set [signer] url to the signer's https://host:port\n"
    )


def test_check_fix_without_signer_url_fails_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """--check --fix that needs the signer but has no URL: exit 2, no try, the report all the same."""
    config = enrolled_with_foreign_pair(tmp_path, signer)
    config.write_text(config.read_text().replace(f'url = "{signer.url}"', 'url = ""'))
    status, out, err = run(capsys, "--check", "--fix", "--json", "--config", str(config))
    fix = json.loads(out)["fix"]
    assert status == 2 and fix["tries"] == 0 and fix["error"]["code"] == "config-error"
    assert "signer.url is empty" in err and "gave up" not in err


def test_enroll_with_a_bad_trust_anchor_fails_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """A [signer] ca that is not a certificate: exit 2 on the first try, naming the file."""
    node = unique_node()
    config = agent_config(tmp_path, signer, node)
    anchor = tmp_path / "garbage-ca.pem"
    anchor.write_bytes(b"not a certificate\n")
    config.write_text(config.read_text().replace(str(signer.identity_ca), str(anchor)))
    status, _, err = run(capsys, "enroll", "--token", signer.token(node), "--config", str(config))
    assert status == 2 and f"cannot load the signer CA {anchor}" in err
    assert "gave up" not in err and "Traceback" not in err


def test_check_fix_with_another_nodes_identity_is_refused_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, signer: Signer
) -> None:
    """An identity the signer does not know (another CA) is rejected in the handshake: exit 2,
    one try, and the report says signer-misconfigured."""
    config = enrolled_with_foreign_pair(tmp_path, signer)
    status, out, err = run(
        capsys, "--check", "--fix", "--no-restart", "--json", "--config", str(config)
    )
    fix = json.loads(out)["fix"]
    assert (status, fix["tries"]) == (2, 1), err
    assert fix["error"]["code"] == "signer-misconfigured"
    assert "identity.pem" in fix["error"]["message"]
