"""kubecertd's command line: exit statuses, --json, one-line errors (SPEC "Command line")."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubecertd.cli import main

import factories

UTC = dt.timezone.utc
REAL_NOW = dt.datetime.now(UTC)


def write_config(path: Path, ssl_dir: Path, extra: str = "") -> Path:
    path.write_text(f'node_name = "{factories.NODE}"\nssl_dir = "{ssl_dir}"\n{extra}')
    return path


def current_dir(tmp_path: Path, node: str = factories.NODE) -> Path:
    """A healthy ssl dir (for ``node``) valid around the real clock, as the CLI reads it."""
    ca = factories.make_ca(not_before=REAL_NOW - dt.timedelta(days=1))
    leaf = factories.issue(
        ca,
        cn_list=[f"system:node:{node}"],
        not_before=REAL_NOW - dt.timedelta(days=1),
        not_after=REAL_NOW + dt.timedelta(days=30),
    )
    ssl = tmp_path / "ssl"
    factories.write_ssl_dir(ssl, ca.pem, leaf.pem, leaf.key_pem)
    return ssl


@pytest.fixture
def healthy_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "kubecertd.toml", current_dir(tmp_path))


@pytest.fixture
def seed_config(tmp_path: Path) -> Path:
    """The seed case: another node's pair copied onto this node."""
    return write_config(tmp_path / "kubecertd.toml", current_dir(tmp_path, factories.OTHER_NODE))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_healthy_exits_zero(capsys: pytest.CaptureFixture[str], healthy_config: Path) -> None:
    """A healthy directory is exit 0 with a HEALTHY verdict."""
    status, out, _ = run(capsys, "--check", "--config", str(healthy_config))
    assert status == 0
    assert out.rstrip().splitlines()[-1].startswith("HEALTHY")


def test_seed_case_names_both_nodes(capsys: pytest.CaptureFixture[str], seed_config: Path) -> None:
    """Another node's certificate is exit 1 and the report names both nodes."""
    status, out, _ = run(capsys, "--check", "--config", str(seed_config))
    assert status == 1
    assert "cert-wrong-node" in out
    assert f"belongs to node {factories.OTHER_NODE}, this node is {factories.NODE}" in out


def test_json_matches_spec_schema(capsys: pytest.CaptureFixture[str], seed_config: Path) -> None:
    """--json prints exactly SPEC's object: node, healthy, findings, certificate, layout."""
    status, out, _ = run(capsys, "--check", "--json", "--config", str(seed_config))
    document = json.loads(out)
    assert status == 1
    assert list(document) == ["node", "healthy", "findings", "certificate", "layout", "changes"]
    assert document["changes"] == []  # no daemon runs: nothing it recorded is current
    layout = document["layout"]
    assert (layout["name"], layout["shape"], layout["kubeconfig"]) == ("files", "files", None)
    assert layout["cert"] == {"path": str(seed_config.parent / "ssl" / "worker.pem"), "key": None}
    assert document["node"] == factories.NODE
    assert document["healthy"] is False
    assert [f["code"] for f in document["findings"]] == ["cert-wrong-node"]
    assert list(document["findings"][0]) == [
        "code",
        "severity",
        "path",
        "message",
        "hint",
        "kubelet_line",
    ]
    certificate = document["certificate"]
    assert set(certificate) == {"subject", "serial", "not_before", "not_after", "node"}
    assert certificate["node"] == factories.OTHER_NODE
    assert certificate["subject"] == f"CN=system:node:{factories.OTHER_NODE},O=system:nodes"
    assert certificate["serial"] == certificate["serial"].lower()
    assert certificate["not_after"].endswith("Z")


def test_check_subcommand_and_config_position(
    capsys: pytest.CaptureFixture[str], healthy_config: Path
) -> None:
    """`check` equals `--check`, and --config works before or after the subcommand."""
    assert run(capsys, "check", "--config", str(healthy_config))[0] == 0
    assert run(capsys, "--config", str(healthy_config), "check", "--json")[0] == 0


def test_config_from_environment(
    capsys: pytest.CaptureFixture[str], seed_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$KUBECERTD_CONFIG names the config when --config does not."""
    monkeypatch.setenv("KUBECERTD_CONFIG", str(seed_config))
    assert run(capsys, "--check")[0] == 1


def test_warnings_alone_exit_zero(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Warnings (here key-permissions) are allowed: exit 0."""
    ssl = current_dir(tmp_path)
    os.chmod(ssl / "worker-key.pem", 0o644)
    status, out, _ = run(capsys, "--check", "--config", str(write_config(tmp_path / "c.toml", ssl)))
    assert status == 0
    assert "key-permissions" in out


def test_missing_ssl_dir_is_findings_not_a_crash(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A missing ssl_dir gives the three *-missing findings and exit 1."""
    config = write_config(tmp_path / "c.toml", tmp_path / "nowhere")
    status, out, _ = run(capsys, "--check", "--json", "--config", str(config))
    assert status == 1
    codes = [f["code"] for f in json.loads(out)["findings"]]
    assert codes == ["ca-missing", "cert-missing", "key-missing"]
    assert json.loads(out)["certificate"] is None


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        pytest.param(["--check", "--bogus"], "unrecognized arguments: --bogus", id="unknown-flag"),
        pytest.param(["--fix"], "--fix goes with --check", id="fix-without-check"),
        pytest.param(
            ["--check", "--no-restart"],
            "--no-restart goes with --check --fix",
            id="no-restart-without-fix",
        ),
        pytest.param(["enroll"], "--token", id="enroll-without-token"),
        pytest.param(
            ["--check", "--config", "/nonexistent/k.toml"],
            "/nonexistent/k.toml: config file not found",
            id="missing-named-config",
        ),
    ],
)
def test_usage_errors_exit_two(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    """Bad flags and a missing named config exit 2 with one error line naming the problem."""
    status, _, err = run(capsys, *argv)
    assert status == 2
    error_lines = [line for line in err.splitlines() if line.startswith("kubecertd: error:")]
    assert len(error_lines) == 1
    assert needle in error_lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        pytest.param("[policy]\nrenew_frac = 0.5\n", "policy.renew_frac", id="unknown-key"),
        pytest.param("[daemon]\ndebounce = 5\n", "daemon.debounce", id="wrong-type"),
        pytest.param("[policy]\nkey_type = 'rsa-1024'\n", "policy.key_type", id="bad-value"),
        pytest.param("ssl_dir = \n", "not valid TOML", id="bad-toml"),
    ],
)
def test_bad_config_exits_two(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, body: str, needle: str
) -> None:
    """A bad config is exit 2 with one line naming the file and the key."""
    config = tmp_path / "bad.toml"
    config.write_text(body)
    status, out, err = run(capsys, "--check", "--config", str(config))
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert str(config) in err
    assert needle in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version and exits 0."""
    from kubecertd import __version__

    status, out, _ = run(capsys, "--version")
    assert status == 0
    assert __version__ in out


def test_check_changes_nothing_on_disk(
    capsys: pytest.CaptureFixture[str], seed_config: Path, tmp_path: Path
) -> None:
    """--check never writes: contents, modes and mtimes are as before."""
    ssl = tmp_path / "ssl"

    def snapshot() -> dict[str, tuple[bytes, int, int]]:
        return {
            p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(ssl.iterdir())
        }

    before = snapshot()
    run(capsys, "--check", "--config", str(seed_config))
    assert snapshot() == before


def test_real_subprocess_json(seed_config: Path) -> None:
    """The installed console script runs for real: exit 1 and parseable JSON."""
    script = Path(sys.executable).with_name("kubecertd")
    result = subprocess.run(
        [str(script), "--check", "--json", "--config", str(seed_config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["findings"][0]["code"] == "cert-wrong-node"
    assert result.stderr == ""


def test_real_subprocess_bad_config_has_no_traceback(tmp_path: Path) -> None:
    """A garbage config file through the real script: exit 2, one line, no traceback."""
    config = tmp_path / "garbage.toml"
    config.write_bytes(b"\xff\xfe\x00garbage")
    script = Path(sys.executable).with_name("kubecertd")
    result = subprocess.run(
        [str(script), "--check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert str(config) in result.stderr


# Modules `--check` must not load: the daemon's edges (HTTP, D-Bus, inotify, metrics) and
# the start-up costs measured in BENCHMARKS.md (dataclasses pulls in inspect; the
# serialization package its SSH module; shutil bz2 and lzma).
NOT_FOR_CHECK = (
    "requests",
    "http.client",
    "ssl",
    "jeepney",
    "pyinotify",
    "systemd",
    "prometheus_client",
    "dataclasses",
    "inspect",
    "cryptography.hazmat.primitives.serialization",
    "shutil",
)


def test_check_imports_only_what_checking_needs(healthy_config: Path) -> None:
    """A real `--check` run in a fresh interpreter loads none of the daemon's or avoidable modules."""
    code = (
        "import sys\n"
        "from kubecertd.cli import main\n"
        f"status = main(['--check', '--config', {str(healthy_config)!r}])\n"
        "print(status, *sorted(sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    status, *modules = result.stderr.split()
    assert status == "0", result.stderr
    assert "cryptography.x509" in modules  # the check did run
    assert sorted(set(modules) & set(NOT_FOR_CHECK)) == []


def test_console_script_with_a_reader_gone_exits_quietly(healthy_config: Path) -> None:
    """stdout is a pipe nobody reads any more (`| head` gone): exit 1, no traceback."""
    script = Path(sys.executable).with_name("kubecertd")
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        result = subprocess.run(
            [str(script), "--check", "--config", str(healthy_config)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""
