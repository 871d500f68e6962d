"""``kubecertd-signer``'s command line: init, tokens, exit statuses, one-line errors.

Most cases call ``main(argv)`` in-process (the same code the binary runs, without an
interpreter start-up each); a few run the installed binary to pin the real exit
status and output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from kubecertd import pki
from kubecertd.signer.cli import main
from kubecertd.signer.config import read_signer_config
from kubecertd.signer.store import ISSUED, REFUSED, AuditRecord, Commit
from kubecertd.signer.store.sqlite import SqliteStore

import factories
from signer_harness import Signer, csr_pem, free_port, init_signer_dir, run_cli

UTC = dt.timezone.utc
TOKEN = re.compile(r"([0-9a-f]{12})\.([0-9a-f]{32})")  # SPEC: <id>.<secret>, secret >= 128 bits
KEYS = ("ca-key.pem", "identity-ca-key.pem", "signer-key.pem")
CERTS = ("ca.pem", "identity-ca.pem", "signer.pem")


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    """stderr is at most a usage block, then exactly one error line naming ``needles``."""
    assert "Traceback" not in err
    lines = err.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith("kubecertd-signer: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    usage = lines[:-1]
    assert not usage or (
        usage[0].startswith("usage:") and all(line[:1] == " " for line in usage[1:])
    )
    for needle in needles:
        assert needle in errors[0]


def openssl_ca(folder: Path, name: str = "ca") -> tuple[Path, Path]:
    """A kube-aws style cluster CA: ``openssl genrsa`` and a self-signed ``openssl req -x509``."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / f"{name}-key.pem", folder / f"{name}.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-new", "-nodes", "-key", str(key), "-days", "10000",
         "-out", str(cert), "-subj", "/CN=kube-ca"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def kube_aws_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One openssl-made RSA cluster CA (certificate, key) for the module."""
    return openssl_ca(tmp_path_factory.mktemp("kube-aws"))


@pytest.fixture(scope="module")
def signer_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An init-written signer.toml (nothing serving it) for commands that only need the store."""
    return init_signer_dir(tmp_path_factory.mktemp("signer-dir"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- init -----------------------------------------------------------------------------------


def test_init_adopts_openssl_rsa_ca(kube_aws_ca: tuple[Path, Path], tmp_path: Path) -> None:
    """init adopts a kube-aws RSA CA as is and writes the identity CA, TLS pair and config."""
    ca, ca_key = kube_aws_ca
    directory = tmp_path / "signer"
    result = run_cli("init", "--dir", directory, "--cluster-ca", ca, "--cluster-ca-key", ca_key,
                     "--hostname", "signer.example", "--ip", "127.0.0.1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (directory / "ca.pem").read_bytes() == ca.read_bytes()
    adopted = pki.load_private_key((directory / "ca-key.pem").read_bytes())
    original = pki.load_private_key(ca_key.read_bytes())
    assert pki.same_public_key(adopted.public_key(), original.public_key())
    for name in KEYS:
        assert mode(directory / name) == 0o600, name
    for name in (*CERTS, "signer.toml"):
        assert mode(directory / name) & 0o077 in (0o044, 0o000), name  # readable, never writable
    assert mode(directory) & 0o077 == 0

    identity_ca = x509.load_pem_x509_certificate((directory / "identity-ca.pem").read_bytes())
    serving = x509.load_pem_x509_certificate((directory / "signer.pem").read_bytes())
    assert pki.is_ca(identity_ca)
    assert pki.issued_by(serving, identity_ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["signer.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = serving.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    assert f"{directory}/identity-ca.pem" in result.stdout  # what nodes install as [signer] ca

    config = read_signer_config(str(directory / "signer.toml"))
    assert (config.cluster_ca.cert, config.cluster_ca.key) == (
        f"{directory}/ca.pem",
        f"{directory}/ca-key.pem",
    )
    assert (config.identity_ca.cert, config.identity_ca.key) == (
        f"{directory}/identity-ca.pem",
        f"{directory}/identity-ca-key.pem",
    )
    assert (config.tls.cert, config.tls.key) == (
        f"{directory}/signer.pem",
        f"{directory}/signer-key.pem",
    )
    assert config.state == f"{directory}/state.db"
    assert config.policy.cert_lifetime == 30 * 86400
    assert config.policy.max_issuances_per_node_per_hour == 10


def test_adopted_rsa_ca_signs_kubelet_certificates(
    kube_aws_ca: tuple[Path, Path], start_signer: Callable[..., Signer], tmp_path: Path
) -> None:
    """A signer on an adopted openssl RSA CA issues certificates that openssl verifies with it."""
    ca, ca_key = kube_aws_ca
    signer = start_signer(init_args=("--cluster-ca", str(ca), "--cluster-ca-key", str(ca_key)))
    kubelet, _ = signer.kubelet_cert("worker-1", signer.enroll("worker-1"))
    result = subprocess.run(
        ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(ca), str(kubelet)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    cert = x509.load_pem_x509_certificate(kubelet.read_bytes())
    assert cert.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSA_WITH_SHA256


def test_init_refuses_a_key_of_another_ca(
    kube_aws_ca: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A cluster CA key that does not belong to the certificate is one error naming the key file."""
    ca, _ = kube_aws_ca
    _, other_key = openssl_ca(tmp_path / "other")
    directory = tmp_path / "signer"
    status, out, err = run(capsys, "init", "--dir", directory, "--cluster-ca", ca,
                           "--cluster-ca-key", other_key, "--hostname", "localhost")  # fmt: skip
    assert status == 2
    assert out == ""
    assert_one_line_error(err, str(other_key))
    assert not directory.exists()


@pytest.mark.parametrize("constraint", [False, None], ids=["ca-false", "no-basic-constraints"])
def test_init_refuses_a_certificate_that_is_not_a_ca(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, constraint: bool | None
) -> None:
    """A cluster CA file that is not a CA (CA:FALSE, or no basicConstraints) is refused, naming it."""
    issued = factories.make_ca(ca=constraint, not_before=dt.datetime.now(UTC))
    cert, key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    cert.write_bytes(issued.pem)
    key.write_bytes(issued.key_pem)
    status, _, err = run(capsys, "init", "--dir", tmp_path / "signer", "--cluster-ca", cert,
                         "--cluster-ca-key", key, "--hostname", "localhost")  # fmt: skip
    assert status == 2
    assert_one_line_error(err, str(cert), "not a CA")
    assert not (tmp_path / "signer").exists()


def test_init_refuses_to_overwrite_without_force(
    kube_aws_ca: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A second init stops with exit 1 and touches nothing; --force replaces the setup."""
    directory = tmp_path / "signer"
    args = ("init", "--dir", directory, "--new-cluster-ca", "--hostname", "localhost")
    assert run(capsys, *args)[0] == 0
    before = {path.name: path.read_bytes() for path in directory.iterdir()}

    status, out, err = run(capsys, *args)
    assert (status, out) == (1, "")
    assert_one_line_error(err, str(directory), "--force")
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before

    _, other_key = openssl_ca(tmp_path / "other")
    failed = run(capsys, "init", "--dir", directory, "--cluster-ca", kube_aws_ca[0],
                 "--cluster-ca-key", other_key, "--hostname", "localhost", "--force")  # fmt: skip
    assert failed[0] == 2
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before

    assert run(capsys, *args, "--force")[0] == 0
    after = {path.name: path.read_bytes() for path in directory.iterdir()}
    assert after.keys() == before.keys()
    for name in ("ca.pem", "identity-ca.pem", "signer.pem", *KEYS):
        assert after[name] != before[name], name
    for name in KEYS:
        assert mode(directory / name) == 0o600


# -- tokens ---------------------------------------------------------------------------------


def test_token_create_prints_only_the_token(
    signer_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`token create` prints just ``<id>.<secret>`` on stdout, so that TOKEN=$(...) works."""
    status, out, err = run(
        capsys, "token", "create", "--node", "worker-1", "--config", signer_config
    )
    assert (status, err) == (0, "")
    assert TOKEN.fullmatch(out.removesuffix("\n"))
    assert out.count("\n") == 1


def test_token_create_json(signer_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`token create --json` gives id, token, node and the expiry (default 1h, or --ttl)."""
    started = dt.datetime.now(UTC).replace(microsecond=0)
    for ttl, lifetime in ((None, dt.timedelta(hours=1)), ("15m", dt.timedelta(minutes=15))):
        extra = ("--ttl", ttl) if ttl else ()
        status, out, _ = run(capsys, "--config", signer_config, "token", "create",
                             "--node", "worker-2.example", "--json", *extra)  # fmt: skip
        assert status == 0
        body = json.loads(out)
        assert set(body) == {"id", "token", "node", "expires"}
        match = TOKEN.fullmatch(body["token"])
        assert match
        assert match[1] == body["id"]
        assert body["node"] == "worker-2.example"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["expires"])
        expires = dt.datetime.strptime(body["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert started + lifetime <= expires <= dt.datetime.now(UTC) + lifetime


def test_token_list_never_shows_the_secret(
    signer_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`token list` (table and --json) shows each outstanding token's id, node and expiry, no secret."""
    created = []
    for node in ("list-a", "list-b"):
        _, out, _ = run(capsys, "token", "create", "--node", node, "--config", signer_config)
        created.append(out.strip().split("."))
    status, listing, _ = run(capsys, "token", "list", "--json", "--config", signer_config)
    assert status == 0
    entries = {entry["id"]: entry for entry in json.loads(listing)}
    status, table, _ = run(capsys, "token", "list", "--config", signer_config)
    assert status == 0
    assert table.splitlines()[0].split() == ["ID", "NODE", "EXPIRES"]
    for (token_id, secret), node in zip(created, ("list-a", "list-b"), strict=True):
        assert set(entries[token_id]) == {"id", "node", "expires"}
        assert entries[token_id]["node"] == node
        assert token_id in table
        assert secret not in listing
        assert secret not in table


def test_revoked_token_cannot_enroll(signer: Signer, capsys: pytest.CaptureFixture[str]) -> None:
    """`token revoke ID` removes the token from the list, and enrolling with it is token-invalid."""
    token = signer.token("revoked-token")
    token_id = token.split(".")[0]
    status, out, _ = run(capsys, "token", "revoke", token_id, "--config", signer.config)
    assert status == 0
    assert token_id in out
    _, listing, _ = run(capsys, "token", "list", "--json", "--config", signer.config)
    assert token_id not in {entry["id"] for entry in json.loads(listing)}
    csr = pki.build_csr(pki.generate_key("ecdsa-p256"), pki.identity_subject("revoked-token"))
    answer = signer.post("/v1/enroll", {"token": token, "csr": csr_pem(csr)})
    assert answer.status_code == 403
    assert answer.json()["error"] == "token-invalid"
    status, _, err = run(capsys, "token", "revoke", token_id, "--config", signer.config)
    assert status == 1
    assert_one_line_error(err, token_id)


# -- exit statuses --------------------------------------------------------------------------

BAD_FLAGS = {
    "unknown-flag": "--frobnicate",
    "no-command": "",
    "unknown-command": "sign",
    "token-without-action": "token",
    "token-create-without-node": "token create",
    "token-create-invalid-node": "token create --node Worker_1",
    "token-create-bad-ttl": "token create --node worker-1 --ttl 5parsecs",
    "node-revoke-invalid-name": "node revoke Worker_1",
    "serve-zero-workers": "serve --workers 0",
    "serve-workers-not-a-number": "serve --workers two",
    "serve-bad-listen": "serve --listen nowhere",
    "audit-since-not-a-duration": "audit --since yesterday",
    "audit-since-zero": "audit --since 0s",
    "init-without-hostname": "init --dir {tmp}/x --new-cluster-ca",
    "init-without-ca-choice": "init --dir {tmp}/x --hostname localhost",
    "init-both-ca-choices": "init --dir {tmp}/x --hostname localhost --new-cluster-ca"
    " --cluster-ca {tmp}/ca.pem --cluster-ca-key {tmp}/ca-key.pem",
}


@pytest.mark.parametrize("argv", list(BAD_FLAGS.values()), ids=list(BAD_FLAGS))
def test_bad_flag_exits_2_with_one_line(
    signer_config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: str
) -> None:
    """A bad flag or argument exits 2 with the usage and one error line, never a traceback."""
    args = argv.format(tmp=tmp_path).split()
    if args and args[0] in ("token", "node", "serve", "audit"):
        args += ["--config", str(signer_config)]
    status, out, err = run(capsys, *args)
    assert status == 2
    assert out == ""
    assert_one_line_error(err)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(("--ip", "not-an-ip"), id="init-bad-ip"),
        pytest.param(("--cluster-ca", "{tmp}/ca.pem"), id="init-cluster-ca-without-key"),
    ],
)
def test_init_bad_flag_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: tuple[str, ...]
) -> None:
    """init with a bad --ip, or --cluster-ca without its key, is a bad flag: exit 2."""
    args = [arg.format(tmp=tmp_path) for arg in argv]
    if "--cluster-ca" not in args:
        args.append("--new-cluster-ca")
    status, _, err = run(capsys, "init", "--dir", tmp_path / "x", "--hostname", "localhost", *args)
    assert_one_line_error(err)
    assert status == 2


@pytest.mark.parametrize(
    "ttl",
    [
        pytest.param("0s", id="zero"),
        pytest.param("3000000d", id="past-year-9999"),
    ],
)
def test_impossible_token_ttl_exits_2(signer_config: Path, ttl: str) -> None:
    """`token create --ttl` with a zero or impossibly long lifetime is a bad flag: exit 2."""
    result = run_cli(
        "token", "create", "--node", "worker-1", "--ttl", ttl, "--config", signer_config
    )
    assert_one_line_error(result.stderr, "--ttl")
    assert result.returncode == 2


def bad_config(signer_config: Path, tmp_path: Path, line: str, replacement: str) -> Path:
    """A copy of an init-written signer.toml with the one line matching ``line`` replaced."""
    text, count = re.subn(rf"(?m)^{line}$", replacement, signer_config.read_text())
    assert count == 1, line
    path = tmp_path / "signer.toml"
    path.write_text(text)
    return path


BAD_CONFIGS = {
    "policy.cert_lifetime": (r"cert_lifetime = .*", 'cert_lifetime = "forever"'),
    "policy.token_ttl": (r"token_ttl = .*", 'token_ttl = "0s"'),
    "policy.max_issuances_per_node_per_hour": (
        r"max_issuances_per_node_per_hour = .*",
        'max_issuances_per_node_per_hour = "ten"',
    ),
    "policy.max_issuances": (r"max_issuances_per_node_per_hour = .*", "max_issuances = 3"),
    "listen": (r"listen = .*", 'listen = "nowhere"'),
    "database_url": (r"# database_url = .*", 'database_url = "mysql://db/kubecertd"'),
    "tls.cert": (r'cert = ".*/signer\.pem"', "cert = 1"),
    "not valid TOML": (r"\[policy\]", "[policy"),
}


@pytest.mark.parametrize("change", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_key(
    request: pytest.FixtureRequest,
    signer_config: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    change: tuple[str, str],
) -> None:
    """A wrong value, type or unknown key in signer.toml exits 2 with one line naming file and key."""
    config = bad_config(signer_config, tmp_path, *change)
    needle = request.node.callspec.id
    for argv in (("token", "list"), ("serve",), ("audit",)):
        status, out, err = run(capsys, *argv, "--config", config)
        assert (status, out) == (2, "")
        assert_one_line_error(err, str(config), needle)


def test_bad_ca_file_in_config_exits_2_before_listening(
    signer_config: Path, tmp_path: Path
) -> None:
    """`serve` with a cluster CA path that does not exist exits 2 naming that file."""
    missing = tmp_path / "gone" / "ca.pem"
    config = bad_config(signer_config, tmp_path, r'cert = ".*/ca\.pem"', f'cert = "{missing}"')
    listen = f"127.0.0.1:{free_port()}"
    result = run_cli("serve", "--config", config, "--listen", listen, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    assert_one_line_error(result.stderr, str(missing))


def test_impossible_lifetime_in_config_exits_2(signer_config: Path, tmp_path: Path) -> None:
    """A lifetime past the year 9999 in signer.toml is a configuration error naming the key."""
    config = bad_config(signer_config, tmp_path, "token_ttl = .*", 'token_ttl = "3000000d"')
    result = run_cli("token", "create", "--node", "worker-1", "--config", config)
    assert_one_line_error(result.stderr, "policy.token_ttl")
    assert result.returncode == 2


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A --config file that does not exist exits 2 naming it."""
    missing = tmp_path / "nowhere" / "signer.toml"
    for argv in (("token", "list"), ("audit",), ("node", "revoke", "worker-1"), ("serve",)):
        status, out, err = run(capsys, *argv, "--config", missing)
        assert (status, out) == (2, "")
        assert_one_line_error(err, str(missing))


def test_the_binary_exits_2_on_bad_flag_and_missing_config(tmp_path: Path) -> None:
    """The installed kubecertd-signer exits 2 with one error line for a bad flag and a missing config."""
    missing = tmp_path / "signer.toml"
    for argv in (("token", "create", "--frobnicate"), ("token", "list", "--config", str(missing))):
        result = run_cli(*argv)
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert_one_line_error(result.stderr)


def test_node_revoke_and_allow_print_the_state(
    signer_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`node revoke` and `node allow` exit 0 and say what issuance for the node now is."""
    status, out, _ = run(capsys, "node", "revoke", "worker-9", "--config", signer_config)
    assert (status, out) == (0, "node worker-9: issuance refused\n")
    status, out, _ = run(capsys, "node", "allow", "worker-9", "--config", signer_config)
    assert (status, out) == (0, "node worker-9: issuance allowed\n")


def test_audit_json_of_a_fresh_signer_is_an_empty_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit --json` on a signer that decided nothing yet prints []."""
    config = init_signer_dir(tmp_path / "fresh")
    status, out, _ = run(capsys, "audit", "--json", "--config", config)
    assert (status, json.loads(out)) == (0, [])


# -- audit: the nodes' claims ----------------------------------------------------------------


def record(age: dt.timedelta, node: str, serial: str, claim: str | None = None) -> AuditRecord:
    """A /v1/sign issuance ``age`` ago, as the signer audits it."""
    time = dt.datetime.now(UTC) - age
    return AuditRecord(
        time=time, endpoint="sign", node=node, identity="identity:5f0c1e", reason="cert-missing",
        outcome=ISSUED, message="issued", serial=serial, not_before=time,
        not_after=time + dt.timedelta(days=30), peer="10.0.0.7", claim=claim,
    )  # fmt: skip


HEADER = ["TIME", "ENDPOINT", "NODE", "IDENTITY", "OUTCOME", "SERIAL", "REASON"]
AUDIT_FIELDS = [
    "time", "endpoint", "node", "identity", "reason", "outcome", "code", "message",
    "key_fingerprint", "serial", "not_before", "not_after", "peer",
]  # fmt: skip


def audited(tmp_path: Path, *records: AuditRecord) -> Path:
    """A new signer's config whose state database holds ``records``."""
    config = init_signer_dir(tmp_path / "signer")
    store = SqliteStore(read_signer_config(str(config)).state)
    store.open()
    try:
        store.commit_many([Commit(each) for each in records])
    finally:
        store.close()
    return config


HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)
CLAIMS = {
    "a1": "unlink kubelet.key by rm[1] uid 0",
    "b2": "unlink kubelet.key by rm[4242] uid 0\nunlink kubelet.crt by rm[4242] uid 0",
    "c3": None,
    # Nothing like this gets past the API, but the table must not trust the database.
    "d4": "\x1b[2J\u202ewiped\t2024-01-01T00:00:00Z  sign",
}


@pytest.fixture
def claims_config(tmp_path: Path) -> Path:
    """A signer whose audit holds four issuances: 25 h ago (a1) with a claim, 23 h ago (b2)
    with a claim of two lines, 1 h ago (c3) without, 1 min ago (d4) with control characters."""
    ages = (25 * HOUR, 23 * HOUR, HOUR, dt.timedelta(minutes=1))
    nodes = ("node-a", "node-b", "node-c", "node-d")
    records = [
        record(age, node, serial, claim)
        for age, node, (serial, claim) in zip(ages, nodes, CLAIMS.items(), strict=True)
    ]
    return audited(tmp_path, *records)


def test_audit_shows_each_claim_line_under_its_row(
    claims_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The text table shows a claim under its record, one indented `NODE claims:` line per
    line, escaping what cannot be printed; --json has "claim" as it is, or null."""
    status, out, err = run(capsys, "audit", "--config", claims_config)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == HEADER
    assert lines[1].split()[2:] == ["node-a", "identity:5f0c1e", "issued", "a1", "cert-missing"]
    assert lines[2:] == [
        "  node-a claims: unlink kubelet.key by rm[1] uid 0",
        *lines[3:4],
        "  node-b claims: unlink kubelet.key by rm[4242] uid 0",
        "  node-b claims: unlink kubelet.crt by rm[4242] uid 0",
        *lines[6:8],
        "  node-d claims: \\u001b[2J\\u202ewiped\\u00092024-01-01T00:00:00Z  sign",
    ]
    assert [line.split()[5] for line in (lines[3], lines[6], lines[7])] == ["b2", "c3", "d4"]

    status, out, _ = run(capsys, "audit", "--json", "--config", claims_config)
    assert status == 0
    listed = json.loads(out)
    assert {entry["serial"]: entry["claim"] for entry in listed} == CLAIMS
    assert list(listed[2]) == [*AUDIT_FIELDS, "claim", "claimed_node"]


@pytest.mark.parametrize(
    ("flags", "serials"),
    [
        pytest.param((), ["a1", "b2", "c3", "d4"], id="all"),
        pytest.param(("--claims",), ["a1", "b2", "d4"], id="claims"),
        pytest.param(("--since", "24h"), ["b2", "c3", "d4"], id="since-24h"),
        pytest.param(("--claims", "--since", "24h"), ["b2", "d4"], id="claims-since-24h"),
        pytest.param(("--claims", "--since", "1d", "--node", "node-b"), ["b2"], id="and-node"),
        pytest.param(("--since", "30s"), [], id="nothing"),
    ],
)
def test_audit_claims_and_since_filter_records(
    claims_config: Path,
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    serials: list[str],
) -> None:
    """`audit --claims --since 24h` lists the records of the last day that carry a claim."""
    status, out, _ = run(capsys, "audit", *flags, "--json", "--config", claims_config)
    assert status == 0
    assert [entry["serial"] for entry in json.loads(out)] == serials
    status, out, _ = run(capsys, "audit", *flags, "--config", claims_config)
    assert status == 0
    rows = [line for line in out.splitlines()[1:] if not line.startswith(" ")]
    assert [row.split()[5] for row in rows] == serials


def test_audit_shows_the_claim_of_a_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused request's claim is listed too: `--claims` shows every record that carries one."""
    refused = dataclasses.replace(
        record(HOUR, "node-e", "", "unlink kubelet.key"),
        outcome=REFUSED, code="rate-limited", message="too many", serial=None,
    )  # fmt: skip
    config = audited(tmp_path, refused)
    status, out, _ = run(capsys, "audit", "--claims", "--config", config)
    assert status == 0
    assert out.splitlines()[1:] == [
        out.splitlines()[1],
        "  node-e claims: unlink kubelet.key",
    ]
    assert "refused:rate-limited" in out.splitlines()[1]


def test_audit_says_when_older_records_exist_and_pages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Over --limit, audit says on stderr that older records exist and how to see them;
    --offset shows the next page; at or under the limit it says nothing."""
    records = [record(HOUR - n * MINUTE, "node-p", f"p{n}") for n in range(5)]
    config = audited(tmp_path, *records)
    status, out, err = run(capsys, "audit", "--limit", "2", "--json", "--config", config)
    assert status == 0
    assert [entry["serial"] for entry in json.loads(out)] == ["p3", "p4"]
    assert err == (
        "kubecertd-signer: note: showing the newest 2 matching records; older ones exist"
        " (--limit N shows more, --offset 2 the next page)\n"
    )
    status, out, err = run(capsys, "audit", "--limit", "2", "--offset", "2", "--config", config)
    assert status == 0
    assert [row.split()[5] for row in out.splitlines()[1:]] == ["p1", "p2"]
    assert "after the newest 2" in err
    assert "--offset 4 the next page" in err
    status, out, err = run(capsys, "audit", "--limit", "5", "--json", "--config", config)
    assert (status, err, len(json.loads(out))) == (0, "", 5)
    status, out, err = run(capsys, "audit", "--offset", "4", "--json", "--config", config)
    assert (status, err, [e["serial"] for e in json.loads(out)]) == (0, "", ["p0"])


@pytest.mark.parametrize(
    ("flag", "value"), [("--limit", "0"), ("--offset", "-1"), ("--limit", "x")]
)
def test_audit_bad_page_flags_are_usage_errors(
    signer_config: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """A --limit below 1, a negative --offset or a non-number is a usage error (exit 2)."""
    status, _out, err = run(capsys, "audit", flag, value, "--config", signer_config)
    assert status == 2
    assert flag in err


def test_audit_node_finds_what_a_refused_request_claimed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refusal tied to no node is found by `audit --node` through the node its CSR
    claimed, shown apart from the NODE column as the request's unverified word."""
    refused = dataclasses.replace(
        record(HOUR, "x", ""), node=None, endpoint="enroll", identity="token:0123456789ab",
        outcome=REFUSED, code="token-invalid", message="bad token", serial=None,
        claimed_node="node-q",
    )  # fmt: skip
    config = audited(tmp_path, refused, record(MINUTE, "node-r", "r1"))
    status, out, _ = run(capsys, "audit", "--node", "node-q", "--config", config)
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[1].split()[2] == "-"
    assert lines[2] == "  the request claims node node-q (unverified)"
    status, out, _ = run(capsys, "audit", "--node", "node-q", "--json", "--config", config)
    [entry] = json.loads(out)
    assert (entry["node"], entry["claimed_node"]) == (None, "node-q")


def test_init_keys_are_private_from_the_start(signer_config: Path) -> None:
    """Every private key init writes is mode 0600 and parses as an unencrypted PEM key."""
    for name in KEYS:
        path = signer_config.parent / name
        assert mode(path) == 0o600, name
        serialization.load_pem_private_key(path.read_bytes(), password=None)


@pytest.mark.parametrize(
    ("argv", "code", "status"),
    [
        pytest.param(("token", "list", "--json"), "config-error", 2, id="token-list-config"),
        pytest.param(("audit", "--json"), "config-error", 2, id="audit-config"),
        pytest.param(
            ("token", "create", "--node", "Not_A_Node", "--json"), "usage-error", 2, id="bad-node"
        ),
    ],
)
def test_json_commands_print_one_json_object_on_failure(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    code: str,
    status: int,
) -> None:
    """Every --json command prints one JSON object on stdout even when it fails, beside the
    one-line error on stderr."""
    config = tmp_path / "missing.toml"
    if code != "config-error":
        config = init_signer_dir(tmp_path / "signer")
    got, out, err = run(capsys, *argv, "--config", config)
    assert got == status
    assert json.loads(out)["error"]["code"] == code
    assert_one_line_error(err)


def test_json_command_with_the_database_away(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state database that cannot be opened: exit 1, {"error": {"code": "unavailable"}}."""
    config = init_signer_dir(tmp_path / "signer")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    text = re.sub(r'(?m)^state = "[^"]*"', f'state = "{blocker}/state.db"', config.read_text())
    config.write_text(text)
    status, out, err = run(capsys, "audit", "--json", "--config", config)
    assert status == 1 and json.loads(out)["error"]["code"] == "unavailable"
    assert_one_line_error(err, "state database")


@pytest.mark.parametrize("legacy_exists", [False, True], ids=["unit-config", "legacy-first"])
def test_default_config_is_the_one_the_unit_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy_exists: bool
) -> None:
    """Without --config the commands read /etc/kubecertd/signer.toml if it exists, else the
    unit's /etc/kubecertd/signer/signer.toml (so they see the service's database_url)."""
    from kubecertd.signer import config as signer_config

    legacy, unit = tmp_path / "signer.toml", tmp_path / "signer" / "signer.toml"
    unit.parent.mkdir()
    unit.write_text('listen = "127.0.0.1:9001"\n')
    if legacy_exists:
        legacy.write_text('listen = "127.0.0.1:9002"\n')
    monkeypatch.setattr(signer_config, "DEFAULT_CONFIG", str(legacy))
    monkeypatch.setattr(signer_config, "UNIT_CONFIG", str(unit))
    loaded = read_signer_config(None, {})
    assert loaded.listen == ("127.0.0.1:9002" if legacy_exists else "127.0.0.1:9001")
