"""The diagnosis against SPEC's findings table, on real files and real certificates."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kubecertd.diagnose import CODES, CheckPolicy, Diagnosis, diagnose
from kubecertd.material import FileState, Material, read_material

from factories import (
    ANY_EKU,
    CA_NOT_AFTER,
    CA_NOT_BEFORE,
    CERT_NOT_AFTER,
    CERT_NOT_BEFORE,
    CLIENT_AUTH,
    CODE_SIGNING,
    NODE,
    NODE_CN,
    NOW,
    OTHER_NODE,
    SERVER_AUTH,
    UTC,
    Issued,
    SslDir,
    healthy_pair,
    issue,
    make_ca,
    write_healthy,
    write_ssl_dir,
)

POLICY = CheckPolicy(warn_fraction=0.8, key_owners=frozenset({0, os.geteuid()}))
DAY = dt.timedelta(days=1)
SECOND = dt.timedelta(seconds=1)
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
PKCS8 = serialization.PrivateFormat.PKCS8
TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL

# SPEC "Findings", copied by hand: code -> severity.
SPEC_FINDINGS = {
    "ca-missing": "error",
    "ca-unreadable": "error",
    "ca-invalid": "error",
    "ca-not-ca": "error",
    "ca-expired": "error",
    "cert-missing": "error",
    "cert-unreadable": "error",
    "cert-invalid": "error",
    "cert-expired": "error",
    "cert-not-yet-valid": "error",
    "cert-untrusted": "error",
    "cert-wrong-node": "error",
    "cert-wrong-group": "error",
    "cert-wrong-usage": "error",
    "cert-expiring": "warning",
    "key-missing": "error",
    "key-unreadable": "error",
    "key-invalid": "error",
    "key-mismatch": "error",
    "key-permissions": "warning",
    "key-weak": "warning",
}
# Codes about where the credentials live rather than what they are: tests/test_layout.py.
LAYOUT_FINDINGS = {"cert-not-symlink": "error", "kubeconfig-invalid": "error"}
# About kubelet and the clock, added by kubecertd.evidence: tests/test_evidence.py.
KUBELET_FINDINGS = {"clock-unsynced": "error", "rotation-managed": "info"}


def run(paths: SslDir, node: str = NODE, now: dt.datetime = NOW) -> Diagnosis:
    """Read the three files for real and diagnose them."""
    return diagnose(read_material(*paths), node, now, POLICY)


def iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- one real directory per finding code -------------------------------------------------


@dataclass(frozen=True)
class Case:
    paths: SslDir
    role: str  # "ca", "cert" or "key": the file the finding must name
    also: frozenset[str] = frozenset()  # other codes the setup legitimately produces
    says: tuple[str, ...] = ()  # text the finding's message must contain


CASES: dict[str, Callable[[Path], Case]] = {}


def case(code: str) -> Callable[[Callable[[Path], Case]], Callable[[Path], Case]]:
    def register(build: Callable[[Path], Case]) -> Callable[[Path], Case]:
        CASES[code] = build
        return build

    return register


def make_directory(path: str) -> None:
    """Root reads any file whatever its mode; reading a directory fails (EISDIR) for all."""
    os.mkdir(path, 0o700)


@case("ca-missing")
def _ca_missing(d: Path) -> Case:
    _, leaf = healthy_pair()
    paths = write_ssl_dir(d, None, leaf.pem, leaf.key_pem)
    return Case(paths, "ca", says=(paths.ca,))


@case("ca-unreadable")
def _ca_unreadable(d: Path) -> Case:
    _, leaf = healthy_pair()
    paths = write_ssl_dir(d, None, leaf.pem, leaf.key_pem)
    make_directory(paths.ca)
    return Case(paths, "ca", says=(paths.ca,))


@case("ca-invalid")
def _ca_invalid(d: Path) -> Case:
    _, leaf = healthy_pair()
    return Case(write_ssl_dir(d, b"this is not a certificate\n", leaf.pem, leaf.key_pem), "ca")


@case("ca-not-ca")
def _ca_not_ca(d: Path) -> Case:
    # worker.pem copied over ca.pem; the leaf did not sign itself, hence cert-untrusted too.
    _, leaf = healthy_pair()
    paths = write_ssl_dir(d, leaf.pem, leaf.pem, leaf.key_pem)
    return Case(paths, "ca", also=frozenset({"cert-untrusted"}))


@case("ca-expired")
def _ca_expired(d: Path) -> Case:
    ca = make_ca(not_before=NOW - 3650 * DAY, not_after=NOW - DAY)
    leaf = issue(ca)
    return Case(write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem), "ca")


@case("cert-missing")
def _cert_missing(d: Path) -> Case:
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(d, ca.pem, None, leaf.key_pem)
    return Case(paths, "cert", says=(paths.cert,))


@case("cert-unreadable")
def _cert_unreadable(d: Path) -> Case:
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(d, ca.pem, None, leaf.key_pem)
    make_directory(paths.cert)
    return Case(paths, "cert", says=(paths.cert,))


@case("cert-invalid")
def _cert_invalid(d: Path) -> Case:
    ca, leaf = healthy_pair()
    truncated = leaf.pem[: len(leaf.pem) // 2]
    return Case(write_ssl_dir(d, ca.pem, truncated, leaf.key_pem), "cert")


@case("cert-expired")
def _cert_expired(d: Path) -> Case:
    ca = make_ca(not_before=NOW - 3650 * DAY)
    leaf = issue(ca, not_before=NOW - 365 * DAY, not_after=NOW - DAY)
    paths = write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem)
    return Case(paths, "cert", says=(iso(NOW - DAY),))


@case("cert-not-yet-valid")
def _cert_not_yet_valid(d: Path) -> Case:
    ca = make_ca()
    leaf = issue(ca, not_before=NOW + DAY, not_after=NOW + 366 * DAY)
    return Case(write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem), "cert")


@case("cert-untrusted")
def _cert_untrusted(d: Path) -> Case:
    # Another CA with the same name: the issuer matches, the signature does not verify.
    ca, impostor = make_ca("kube-ca"), make_ca("kube-ca")
    leaf = issue(impostor)
    return Case(write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem), "cert")


@case("cert-wrong-node")
def _cert_wrong_node(d: Path) -> Case:
    # The seed incident: server2277z runs with server2267z's copied certificate.
    ca = make_ca()
    leaf = issue(ca, cn_list=[f"system:node:{OTHER_NODE}"])
    paths = write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem)
    return Case(paths, "cert", says=(OTHER_NODE, NODE))


@case("cert-wrong-group")
def _cert_wrong_group(d: Path) -> Case:
    ca = make_ca()
    leaf = issue(ca, orgs=())
    return Case(write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem), "cert")


@case("cert-wrong-usage")
def _cert_wrong_usage(d: Path) -> Case:
    ca = make_ca()
    leaf = issue(ca, eku=[SERVER_AUTH])
    return Case(write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem), "cert")


@case("cert-expiring")
def _cert_expiring(d: Path) -> Case:
    ca = make_ca()
    leaf = issue(ca, not_before=NOW - 90 * DAY, not_after=NOW + 10 * DAY)  # 90% used
    paths = write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem)
    return Case(paths, "cert", says=(iso(NOW + 10 * DAY),))


@case("key-missing")
def _key_missing(d: Path) -> Case:
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(d, ca.pem, leaf.pem, None)
    return Case(paths, "key", says=(paths.key,))


@case("key-unreadable")
def _key_unreadable(d: Path) -> Case:
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(d, ca.pem, leaf.pem, None)
    make_directory(paths.key)
    return Case(paths, "key", says=(paths.key,))


@case("key-invalid")
def _key_invalid(d: Path) -> Case:
    ca, leaf = healthy_pair()
    return Case(write_ssl_dir(d, ca.pem, leaf.pem, b"\x00garbage\xff" * 10), "key")


@case("key-mismatch")
def _key_mismatch(d: Path) -> Case:
    ca, leaf = healthy_pair()
    other = issue(ca)
    return Case(write_ssl_dir(d, ca.pem, leaf.pem, other.key_pem), "key")


@case("key-permissions")
def _key_permissions(d: Path) -> Case:
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem, key_mode=0o640)
    return Case(paths, "key", says=("0640",))


@case("key-weak")
def _key_weak(d: Path) -> Case:
    ca = make_ca()
    leaf = issue(ca, key_type="rsa-1024")
    return Case(write_ssl_dir(d, ca.pem, leaf.pem, leaf.key_pem), "key", says=("1024",))


def test_every_spec_code_has_a_case() -> None:
    """The parametrised table below covers exactly SPEC's finding codes, in SPEC's order."""
    assert list(CASES) == list(SPEC_FINDINGS)


@pytest.mark.parametrize("code", list(CASES))
def test_finding(code: str, tmp_path: Path) -> None:
    """Each SPEC code is reported once, with SPEC's severity, naming the right file, alone."""
    setup = CASES[code](tmp_path / "ssl")
    diagnosis = run(setup.paths)
    found = [f for f in diagnosis.findings if f.code == code]
    assert len(found) == 1, diagnosis.findings
    (finding,) = found
    assert finding.severity == SPEC_FINDINGS[code]
    assert finding.path == getattr(setup.paths, setup.role)
    assert finding.hint == CODES[code][1]
    assert finding.message
    for text in setup.says:
        assert text in finding.message
    assert set(diagnosis.codes) <= {code} | setup.also, diagnosis.findings
    assert diagnosis.healthy is (SPEC_FINDINGS[code] == "warning")


def test_codes_table_matches_spec() -> None:
    """CODES holds exactly SPEC's 21 codes, each with SPEC's severity and a non-empty hint."""
    assert {code: severity for code, (severity, _) in CODES.items()} == (
        SPEC_FINDINGS | LAYOUT_FINDINGS | KUBELET_FINDINGS
    )
    assert all(hint.strip() for _, hint in CODES.values())


# -- healthy directories -----------------------------------------------------------------


def test_healthy_directory(tmp_path: Path) -> None:
    """A CA, a kubelet certificate for this node and its 0600 root-owned key give no findings."""
    paths, _, leaf = write_healthy(tmp_path)
    diagnosis = run(paths)
    assert diagnosis.findings == ()
    assert diagnosis.healthy is True
    assert diagnosis.cert == leaf.cert


ENCODINGS: dict[str, Callable[[Issued, Issued], tuple[bytes, bytes, bytes]]] = {
    "der-cert": lambda ca, leaf: (ca.pem, leaf.der, leaf.key_pem),
    "der-ca": lambda ca, leaf: (ca.der, leaf.pem, leaf.key_pem),
    "der-key-pkcs8": lambda ca, leaf: (ca.pem, leaf.pem, leaf.key_bytes(DER, PKCS8)),
    "der-key-sec1": lambda ca, leaf: (ca.pem, leaf.pem, leaf.key_bytes(DER, TRADITIONAL)),
    "pem-key-sec1": lambda ca, leaf: (ca.pem, leaf.pem, leaf.key_bytes(PEM, TRADITIONAL)),
    "all-der": lambda ca, leaf: (ca.der, leaf.der, leaf.key_der),
    "crlf": lambda ca, leaf: tuple(
        b.replace(b"\n", b"\r\n") for b in (ca.pem, leaf.pem, leaf.key_pem)
    ),
    "cert-with-chain": lambda ca, leaf: (ca.pem, leaf.pem + ca.pem, leaf.key_pem),
    "cert-and-key-in-one-file": lambda ca, leaf: (
        ca.pem,
        leaf.pem + leaf.key_pem,
        leaf.key_pem + leaf.pem,
    ),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_healthy_in_other_encodings(encoding: str, tmp_path: Path) -> None:
    """DER certificates, CAs and keys (PKCS#8 or SEC1), CRLF PEM and combined files are accepted."""
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(tmp_path, *ENCODINGS[encoding](ca, leaf))
    assert run(paths).findings == ()


@pytest.mark.parametrize("first_is_signer", [False, True], ids=["second", "first"])
def test_ca_bundle_is_trusted(first_is_signer: bool, tmp_path: Path) -> None:
    """A CA file holding two CAs trusts a certificate issued by either of them."""
    signer, other = make_ca("kube-ca-2026"), make_ca("kube-ca-2025")
    bundle = signer.pem + other.pem if first_is_signer else other.pem + signer.pem
    leaf = issue(signer)
    assert run(write_ssl_dir(tmp_path, bundle, leaf.pem, leaf.key_pem)).findings == ()


# -- variants of single codes ------------------------------------------------------------


@pytest.mark.parametrize(
    "cn_list",
    [
        [f"system:node:{OTHER_NODE}"],
        [f"system:node:{OTHER_NODE}", NODE_CN],
        [NODE_CN, f"system:node:{OTHER_NODE}"],
        ["kube-admin"],
        [NODE],
        [f"system:node:{NODE.upper()}"],
        [],
    ],
    ids=[
        "other-node",
        "two-cns-last-right",
        "two-cns-first-right",
        "not-a-node-cn",
        "bare-hostname",
        "uppercase",
        "no-cn",
    ],
)
def test_cert_wrong_node_variants(cn_list: list[str], tmp_path: Path) -> None:
    """Only a subject with exactly one CN, system:node:<this node>, is this node's certificate."""
    ca = make_ca()
    leaf = issue(ca, cn_list=cn_list)
    diagnosis = run(write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem))
    assert diagnosis.codes == ["cert-wrong-node"]
    assert NODE in diagnosis.findings[0].message


def test_cert_wrong_node_message_names_both_nodes(tmp_path: Path) -> None:
    """The seed incident's message names the certificate's node and this node."""
    ca = make_ca()
    leaf = issue(ca, cn_list=[f"system:node:{OTHER_NODE}"])
    (finding,) = run(write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem)).findings
    assert OTHER_NODE in finding.message
    assert NODE in finding.message.replace(OTHER_NODE, "")


@pytest.mark.parametrize(
    ("orgs", "codes"),
    [
        ([], ["cert-wrong-group"]),
        (["system:masters"], ["cert-wrong-group"]),
        (["System:Nodes"], ["cert-wrong-group"]),
        (["system:nodes", "extra"], []),
    ],
    ids=["no-o", "other-o", "wrong-case", "extra-o"],
)
def test_cert_group_variants(orgs: list[str], codes: list[str], tmp_path: Path) -> None:
    """The subject must carry O=system:nodes exactly; other organisations beside it do no harm."""
    ca = make_ca()
    leaf = issue(ca, orgs=orgs)
    assert run(write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem)).codes == codes


@pytest.mark.parametrize(
    ("eku", "codes"),
    [
        ([SERVER_AUTH], ["cert-wrong-usage"]),
        ([CODE_SIGNING], ["cert-wrong-usage"]),
        ([SERVER_AUTH, CLIENT_AUTH], []),
        ([ANY_EKU], []),
        (None, []),
    ],
    ids=["server-only", "code-signing", "server-and-client", "any", "no-eku-extension"],
)
def test_cert_usage_variants(
    eku: list[x509.ObjectIdentifier] | None, codes: list[str], tmp_path: Path
) -> None:
    """Client authentication is allowed by clientAuth, anyExtendedKeyUsage or no EKU at all."""
    ca = make_ca()
    leaf = issue(ca, eku=eku)
    assert run(write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem)).codes == codes


@pytest.mark.parametrize(
    ("key_type", "weak"),
    [
        ("rsa-1024", True),
        ("dsa-2048", True),
        ("ec-p224", True),
        ("ec-p192", True),
        ("rsa-2048", False),
        ("ec-p256", False),
        ("ec-p384", False),
        ("ec-p521", False),
    ],
)
def test_key_weak_variants(key_type: str, weak: bool, tmp_path: Path) -> None:
    """RSA below 2048 bits, DSA and curves other than P-256/384/521 are key-weak warnings."""
    ca = make_ca()
    leaf = issue(ca, key_type=key_type)
    diagnosis = run(write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem))
    assert diagnosis.codes == (["key-weak"] if weak else [])
    assert diagnosis.healthy is True


@pytest.mark.parametrize(
    ("mode", "owner", "reported"),
    [
        (0o640, 0, True),
        (0o604, 0, True),
        (0o644, 0, True),
        (0o610, 0, True),
        (0o600, 12345, True),
        (0o600, 0, False),
        (0o400, 0, False),
    ],
    ids=["0640", "0604", "0644", "0610", "owner-12345", "0600-root", "0400-root"],
)
def test_key_permissions_variants(mode: int, owner: int, reported: bool, tmp_path: Path) -> None:
    """Any group or other access, or an owner that is neither root nor us, is key-permissions."""
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem, key_mode=mode)
    os.chown(paths.key, owner, -1)
    diagnosis = run(paths)
    assert diagnosis.codes == (["key-permissions"] if reported else [])
    if reported:
        assert diagnosis.findings[0].severity == "warning"
        assert diagnosis.findings[0].path == paths.key


def _encrypted_traditional(leaf: Issued) -> bytes:
    return leaf.key_bytes(PEM, TRADITIONAL, password=b"secret")


KEY_INVALID: dict[str, Callable[[Issued], bytes]] = {
    "encrypted-pkcs8-pem": lambda leaf: leaf.key_bytes(PEM, PKCS8, password=b"secret"),
    "encrypted-traditional-pem": _encrypted_traditional,
    "encrypted-pkcs8-der": lambda leaf: leaf.key_bytes(DER, PKCS8, password=b"secret"),
    "empty": lambda leaf: b"",
    "whitespace": lambda leaf: b"\n  \n",
    "truncated": lambda leaf: leaf.key_pem[: len(leaf.key_pem) // 2],
    "certificate-in-key-file": lambda leaf: leaf.pem,
    "garbage": lambda leaf: b"not a key",
}


@pytest.mark.parametrize("variant", list(KEY_INVALID))
def test_key_invalid_variants(variant: str, tmp_path: Path) -> None:
    """Encrypted, empty, truncated or wrong-kind key files are key-invalid and nothing else."""
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(tmp_path, ca.pem, leaf.pem, KEY_INVALID[variant](leaf))
    diagnosis = run(paths)
    assert diagnosis.codes == ["key-invalid"]
    assert diagnosis.findings[0].path == paths.key


def test_encrypted_key_message_says_encrypted(tmp_path: Path) -> None:
    """An encrypted key's message tells the operator it is encrypted."""
    ca, leaf = healthy_pair()
    key = leaf.key_bytes(PEM, PKCS8, password=b"secret")
    (finding,) = run(write_ssl_dir(tmp_path, ca.pem, leaf.pem, key)).findings
    assert "encrypted" in finding.message


CERT_INVALID: dict[str, Callable[[Issued], bytes]] = {
    "empty": lambda leaf: b"",
    "whitespace": lambda leaf: b"\n\t \n",
    "truncated-pem": lambda leaf: leaf.pem[: len(leaf.pem) // 2],
    "truncated-der": lambda leaf: leaf.der[:-10],
    "garbage": lambda leaf: b"\x00\x01garbage",
    "key-in-cert-file": lambda leaf: leaf.key_pem,
    "pem-junk-body": lambda leaf: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    "over-1-mib": lambda leaf: leaf.pem + b"\n" * (1 << 20),
}


@pytest.mark.parametrize("role", ["ca", "cert"])
@pytest.mark.parametrize("variant", list(CERT_INVALID))
def test_certificate_invalid_variants(variant: str, role: str, tmp_path: Path) -> None:
    """Empty, truncated, garbage, wrong-kind or oversized certificate files are *-invalid alone."""
    ca, leaf = healthy_pair()
    files = {"ca": ca.pem, "cert": leaf.pem, "key": leaf.key_pem}
    files[role] = CERT_INVALID[variant](ca if role == "ca" else leaf)
    paths = write_ssl_dir(tmp_path, files["ca"], files["cert"], files["key"])
    diagnosis = run(paths)
    assert diagnosis.codes == [f"{role}-invalid"]
    assert diagnosis.findings[0].path == getattr(paths, role)


@pytest.mark.parametrize("ca_flag", [False, None], ids=["ca-false", "no-basic-constraints"])
def test_ca_not_ca_variants(ca_flag: bool | None, tmp_path: Path) -> None:
    """A CA file whose certificate says CA:FALSE, or has no basicConstraints, is ca-not-ca."""
    not_ca = make_ca(ca=ca_flag)
    leaf = issue(not_ca)  # signed by it, so only the CA file is at fault
    assert run(write_ssl_dir(tmp_path, not_ca.pem, leaf.pem, leaf.key_pem)).codes == ["ca-not-ca"]


def test_fifo_is_not_a_crash(tmp_path: Path) -> None:
    """A FIFO in place of the certificate neither blocks nor raises; it reads as empty."""
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(tmp_path, ca.pem, None, leaf.key_pem)
    os.mkfifo(paths.cert)
    diagnosis = run(paths)
    assert diagnosis.codes in (["cert-invalid"], ["cert-unreadable"])


# -- cert-untrusted ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ca_content", "codes"),
    [
        (None, ["ca-missing"]),
        (b"garbage", ["ca-invalid"]),
        (b"", ["ca-invalid"]),
    ],
    ids=["ca-missing", "ca-garbage", "ca-empty"],
)
def test_untrusted_not_reported_without_usable_ca(
    ca_content: bytes | None, codes: list[str], tmp_path: Path
) -> None:
    """With no usable CA file, a foreign certificate is not called untrusted."""
    foreign = issue(make_ca("someone-else"))
    assert run(write_ssl_dir(tmp_path, ca_content, foreign.pem, foreign.key_pem)).codes == codes


def test_untrusted_not_reported_with_unreadable_ca(tmp_path: Path) -> None:
    """With an unreadable CA file, a foreign certificate is not called untrusted."""
    foreign = issue(make_ca("someone-else"))
    paths = write_ssl_dir(tmp_path, None, foreign.pem, foreign.key_pem)
    make_directory(paths.ca)
    assert run(paths).codes == ["ca-unreadable"]


@pytest.mark.parametrize("issuer_cn", ["kube-ca", "other-ca"], ids=["same-name", "other-name"])
def test_untrusted_for_another_ca(issuer_cn: str, tmp_path: Path) -> None:
    """A certificate from another CA is untrusted, even when that CA has the same name."""
    ca = make_ca("kube-ca")
    leaf = issue(make_ca(issuer_cn))
    if issuer_cn == "kube-ca":  # same issuer name: only the signature tells them apart
        assert leaf.cert.issuer == ca.cert.subject
    assert run(write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem)).codes == ["cert-untrusted"]


def test_untrusted_judged_apart_from_ca_dates(tmp_path: Path) -> None:
    """A certificate signed by the (expired) CA in the file is ca-expired, not cert-untrusted."""
    ca = make_ca(not_before=NOW - 3650 * DAY, not_after=NOW - DAY)
    leaf = issue(ca)
    assert run(write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem)).codes == ["ca-expired"]


# -- boundaries, one second either side ----------------------------------------------------


@pytest.fixture
def boundary_dir(tmp_path: Path) -> Callable[..., SslDir]:
    def build(ca: Issued | None = None, **leaf_args: object) -> SslDir:
        ca = ca or make_ca(not_before=dt.datetime(2020, 1, 1, tzinfo=UTC))
        leaf = issue(ca, **leaf_args)
        return write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem)

    return build


@pytest.mark.parametrize(("offset", "codes"), [(-1, ["cert-not-yet-valid"]), (0, []), (1, [])])
def test_not_before_boundary(
    offset: int, codes: list[str], boundary_dir: Callable[..., SslDir]
) -> None:
    """A certificate is not yet valid one second before notBefore and valid at notBefore."""
    paths = boundary_dir()
    assert run(paths, now=CERT_NOT_BEFORE + offset * SECOND).codes == codes


@pytest.mark.parametrize(
    ("offset", "codes"),
    [(-1, ["cert-expiring"]), (0, ["cert-expiring"]), (1, ["cert-expired"])],
)
def test_not_after_boundary(
    offset: int, codes: list[str], boundary_dir: Callable[..., SslDir]
) -> None:
    """A certificate is still valid (if expiring) at notAfter and expired one second later."""
    paths = boundary_dir()
    assert run(paths, now=CERT_NOT_AFTER + offset * SECOND).codes == codes


def test_expired_message_gives_date(boundary_dir: Callable[..., SslDir]) -> None:
    """The cert-expired message gives notAfter."""
    paths = boundary_dir()
    (finding,) = run(paths, now=CERT_NOT_AFTER + SECOND).findings
    assert iso(CERT_NOT_AFTER) in finding.message


@pytest.mark.parametrize(("offset", "codes"), [(-1, []), (0, []), (1, ["cert-expiring"])])
def test_warn_fraction_boundary(
    offset: int, codes: list[str], boundary_dir: Callable[..., SslDir]
) -> None:
    """cert-expiring appears only once more than warn_fraction (0.8) of the lifetime has passed."""
    # 100 days make 80% an exact second: notBefore + 80 days.
    paths = boundary_dir(not_before=CERT_NOT_BEFORE, not_after=CERT_NOT_BEFORE + 100 * DAY)
    threshold = CERT_NOT_BEFORE + 80 * DAY
    assert run(paths, now=threshold + offset * SECOND).codes == codes


def test_warn_fraction_follows_policy(boundary_dir: Callable[..., SslDir]) -> None:
    """The warning threshold is the policy's warn_fraction, not a constant."""
    paths = boundary_dir(not_before=CERT_NOT_BEFORE, not_after=CERT_NOT_BEFORE + 100 * DAY)
    material = read_material(*paths)
    at = CERT_NOT_BEFORE + 50 * DAY + SECOND
    assert diagnose(material, NODE, at, POLICY._replace(warn_fraction=0.5)).codes == [
        "cert-expiring"
    ]
    assert diagnose(material, NODE, at, POLICY).codes == []


@pytest.mark.parametrize(
    ("now", "codes"),
    [
        (CA_NOT_BEFORE - SECOND, ["ca-expired"]),
        (CA_NOT_BEFORE, []),
        (CA_NOT_AFTER, []),
        (CA_NOT_AFTER + SECOND, ["ca-expired"]),
    ],
    ids=["before-not-before", "at-not-before", "at-not-after", "after-not-after"],
)
def test_ca_validity_boundaries(
    now: dt.datetime, codes: list[str], boundary_dir: Callable[..., SslDir]
) -> None:
    """The CA is outside its validity one second before notBefore and one second after notAfter."""
    ca = make_ca()  # CA_NOT_BEFORE .. CA_NOT_AFTER
    long_lived = dt.datetime(2000, 1, 1, tzinfo=UTC), dt.datetime(2100, 1, 1, tzinfo=UTC)
    paths = boundary_dir(ca, not_before=long_lived[0], not_after=long_lived[1])
    assert run(paths, now=now).codes == codes


# -- the --json object -------------------------------------------------------------------

FINDING_KEYS = {"code", "severity", "path", "message", "hint", "kubelet_line"}
CERTIFICATE_KEYS = {"subject", "serial", "not_before", "not_after", "node"}
ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_to_dict_matches_spec_example(tmp_path: Path) -> None:
    """The seed incident serialises to SPEC's --json shape, keys and types."""
    ca = make_ca()
    leaf = issue(ca, cn_list=[f"system:node:{OTHER_NODE}"], serial=0xABCDEF0123456789)
    paths = write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem)
    report = json.loads(json.dumps(run(paths).to_dict()))
    assert set(report) == {"node", "healthy", "findings", "certificate"}
    assert report["node"] == NODE
    assert report["healthy"] is False
    (finding,) = report["findings"]
    assert set(finding) == FINDING_KEYS
    assert finding["kubelet_line"] is None  # diagnose() reads no journal (kubecertd.evidence)
    assert all(isinstance(finding[key], str) for key in FINDING_KEYS - {"kubelet_line"})
    assert finding["code"] == "cert-wrong-node"
    assert finding["severity"] == "error"
    assert finding["path"] == paths.cert
    assert finding["hint"] == CODES["cert-wrong-node"][1]
    assert report["certificate"] == {
        "subject": leaf.cert.subject.rfc4514_string(),
        "serial": "abcdef0123456789",
        "not_before": "2026-01-01T00:00:00Z",
        "not_after": "2027-01-01T00:00:00Z",
        "node": OTHER_NODE,
    }


def test_to_dict_healthy(tmp_path: Path) -> None:
    """A healthy diagnosis is healthy, has no findings and describes the certificate."""
    paths, _, leaf = write_healthy(tmp_path)
    report = run(paths).to_dict()
    assert report["healthy"] is True
    assert report["findings"] == []
    certificate = report["certificate"]
    assert set(certificate) == CERTIFICATE_KEYS
    assert certificate["subject"] == leaf.cert.subject.rfc4514_string()
    assert re.fullmatch(r"[0-9a-f]+", certificate["serial"])
    assert int(certificate["serial"], 16) == leaf.cert.serial_number
    assert ISO_Z.fullmatch(certificate["not_before"])
    assert ISO_Z.fullmatch(certificate["not_after"])
    assert certificate["node"] == NODE


def test_to_dict_warning_only_is_healthy(tmp_path: Path) -> None:
    """Warnings alone leave healthy true, and the warning is listed."""
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem, key_mode=0o644)
    report = run(paths).to_dict()
    assert report["healthy"] is True
    assert [f["severity"] for f in report["findings"]] == ["warning"]


@pytest.mark.parametrize("state", ["missing", "unreadable", "invalid"])
def test_to_dict_certificate_null_without_readable_cert(state: str, tmp_path: Path) -> None:
    """certificate is null when there is no readable certificate."""
    ca, leaf = healthy_pair()
    paths = write_ssl_dir(tmp_path, ca.pem, b"junk" if state == "invalid" else None, leaf.key_pem)
    if state == "unreadable":
        make_directory(paths.cert)
    report = run(paths).to_dict()
    assert report["certificate"] is None
    assert report["healthy"] is False
    assert json.loads(json.dumps(report)) == report


def test_to_dict_describes_an_expired_certificate(tmp_path: Path) -> None:
    """A readable but expired certificate is still described, times in UTC with a Z."""
    ca = make_ca(not_before=NOW - 3650 * DAY)
    nb = dt.datetime(2025, 1, 1, 12, 30, 5, tzinfo=UTC)
    leaf = issue(ca, not_before=nb, not_after=nb + 30 * DAY)
    report = run(write_ssl_dir(tmp_path, ca.pem, leaf.pem, leaf.key_pem)).to_dict()
    assert report["certificate"]["not_before"] == "2025-01-01T12:30:05Z"
    assert report["certificate"]["not_after"] == "2025-01-31T12:30:05Z"


# -- any bytes, never an exception -------------------------------------------------------

_CA, _LEAF = healthy_pair()
GOOD = {"ca": _CA.pem, "cert": _LEAF.pem, "key": _LEAF.key_pem}
ROLES = ["ca", "cert", "key"]
MEMORY_PATHS = {"ca": "/ssl/ca.pem", "cert": "/ssl/worker.pem", "key": "/ssl/worker-key.pem"}


def material_with(role: str, data: bytes) -> Material:
    """A healthy Material, in memory, with one file's bytes replaced."""
    states = {
        name: FileState(MEMORY_PATHS[name], data=GOOD[name], mode=0o600, uid=0) for name in ROLES
    }
    states[role] = states[role]._replace(data=data)
    return Material(**states)


def check_any_bytes(role: str, data: bytes) -> None:
    diagnosis = diagnose(material_with(role, data), NODE, NOW, POLICY)
    json.dumps(diagnosis.to_dict())
    if f"{role}-invalid" in diagnosis.codes:
        assert diagnosis.codes == [f"{role}-invalid"]
    else:  # the bytes were a certificate or key after all: judged, not rejected
        parsed = {"ca": diagnosis.ca, "cert": diagnosis.cert, "key": diagnosis.files[2].facts}
        assert parsed[role]


PEM_LABELS = [
    b"CERTIFICATE",
    b"PRIVATE KEY",
    b"EC PRIVATE KEY",
    b"RSA PRIVATE KEY",
    b"ENCRYPTED PRIVATE KEY",
    b"X509 CRL",
]
BASE64_JUNK = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n",
    max_size=600,
).map(str.encode)
PEM_BODIES = st.one_of(st.binary(max_size=600).map(base64.encodebytes), BASE64_JUNK)


@st.composite
def pem_armoured(draw: st.DrawFn) -> bytes:
    label = draw(st.sampled_from(PEM_LABELS))
    block = b"-----BEGIN %s-----\n%s-----END %s-----\n" % (label, draw(PEM_BODIES), label)
    return draw(st.sampled_from([b"", b"junk\n"])) + block


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("role", ROLES)
@FUZZ
@given(data=st.binary(max_size=2048))
def test_any_bytes_are_invalid_not_a_crash(role: str, data: bytes) -> None:
    """Any bytes as a CA, certificate or key file give its *-invalid finding, never an exception."""
    check_any_bytes(role, data)


@pytest.mark.parametrize("role", ROLES)
@FUZZ
@given(data=pem_armoured())
def test_pem_armoured_garbage_is_invalid_not_a_crash(role: str, data: bytes) -> None:
    """PEM armour around junk, as any of the three files, is *-invalid, never an exception."""
    check_any_bytes(role, data)


# -- certificates that parse but hold undecodable fields ----------------------------------
# cryptography decodes extensions, names and public keys lazily, so a certificate can
# load and still raise later; pki.load_certificates decodes every field up front.

P256_OID = bytes.fromhex("06082a8648ce3d030107")  # 1.2.840.10045.3.1.7 in DER
V3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2: the version field of a v3 TBS


def _with_version_5(cert: Issued) -> bytes:
    assert cert.der.count(V3) >= 1
    return cert.der.replace(V3, b"\xa0\x03\x02\x01\x05", 1)


def _subject_not_utf8(leaf: Issued) -> bytes:
    cn = NODE_CN.encode()
    assert leaf.der.count(cn) == 1
    return leaf.der.replace(cn, cn[:-1] + b"\xff")


def _unknown_curve(leaf: Issued) -> bytes:
    assert leaf.der.count(P256_OID) == 1
    return leaf.der.replace(P256_OID, P256_OID[:-1] + b"\x3f")


def _point_off_curve(leaf: Issued) -> bytes:
    point = leaf.cert.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    broken = bytearray(point)
    broken[10] ^= 1
    return leaf.der.replace(point, bytes(broken))


def _ca_with_malformed_basic_constraints() -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_CA.cert.subject)
        .issuer_name(_CA.cert.subject)
        .public_key(_CA.key.public_key())
        .serial_number(1)
        .not_valid_before(CA_NOT_BEFORE)
        .not_valid_after(CA_NOT_AFTER)
        .add_extension(
            x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x01\x02junk"), False
        )
    )
    return builder.sign(_CA.key, _CA.cert.signature_hash_algorithm).public_bytes(DER)


def _cert_with_malformed_eku() -> bytes:
    extension = x509.UnrecognizedExtension(ExtensionOID.EXTENDED_KEY_USAGE, b"\x30\x03\x06\x01")
    return issue(_CA, key=_LEAF.key, eku=None, extensions=[extension]).der


UNDECODABLE = [
    pytest.param("ca", lambda: _with_version_5(_CA), id="ca-version-5"),
    pytest.param("cert", lambda: _with_version_5(_LEAF), id="cert-version-5"),
    pytest.param("ca", _ca_with_malformed_basic_constraints, id="ca-basic-constraints-malformed"),
    pytest.param("cert", _cert_with_malformed_eku, id="cert-eku-malformed"),
    pytest.param("cert", lambda: _subject_not_utf8(_LEAF), id="cert-subject-not-utf8"),
    pytest.param("cert", lambda: _unknown_curve(_LEAF), id="cert-key-unknown-curve"),
    pytest.param("cert", lambda: _point_off_curve(_LEAF), id="cert-key-point-off-curve"),
]


@pytest.mark.parametrize(("role", "build"), UNDECODABLE)
def test_undecodable_certificate_fields_are_findings(role: str, build: Callable[[], bytes]) -> None:
    """A certificate that loads but holds undecodable fields is an error finding, not a crash."""
    diagnosis = diagnose(material_with(role, build()), NODE, NOW, POLICY)
    json.dumps(diagnosis.to_dict())
    assert not diagnosis.healthy
    assert any(f.path == MEMORY_PATHS[role] for f in diagnosis.findings)


@pytest.mark.parametrize("role", ["ca", "cert"])
# No shrinking: the first corrupted certificate that raises is enough to show the bug.
@settings(max_examples=200, deadline=None, derandomize=True, phases=[Phase.generate])
@given(data=st.data())
def test_corrupted_certificate_is_not_a_crash(role: str, data: st.DataObject) -> None:
    """Valid DER certificates with a few bytes changed never make the diagnosis raise."""
    der = bytearray((_CA if role == "ca" else _LEAF).der)
    for _ in range(data.draw(st.integers(1, 3))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    diagnosis = diagnose(material_with(role, bytes(der)), NODE, NOW, POLICY)
    json.dumps(diagnosis.to_dict())
