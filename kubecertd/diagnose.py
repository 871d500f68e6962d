"""The diagnosis: a pure function from what is on disk to SPEC's findings.

``diagnose(material, node, now, policy)`` reads nothing and changes nothing; the same
inputs always give the same ``Diagnosis``.  Every code in SPEC's findings table is
produced here and nowhere else.  The values are NamedTuples, not frozen dataclasses,
for ``kubecertd --check``'s start-up time (see ``kubecertd.config``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import pki
from .config import Config
from .material import FileState, Material

ERROR = "error"
WARNING = "warning"
INFO = "info"  # a fact worth showing that asks nothing of anyone

# code -> (severity, hint).  Messages are built where the facts are known.
CODES: dict[str, tuple[str, str]] = {
    "ca-missing": (
        ERROR,
        "install the cluster CA; kubecertd --check --fix fetches it from the signer",
    ),
    "ca-unreadable": (ERROR, "check the file's permissions and the disk; kubecertd runs as root"),
    "ca-invalid": (
        ERROR,
        "the CA file is damaged; kubecertd --check --fix fetches it from the signer",
    ),
    "ca-not-ca": (
        ERROR,
        "the CA file holds a leaf certificate; kubecertd --check --fix fetches the real CA",
    ),
    "ca-expired": (ERROR, "the cluster CA is outside its validity; rotate the cluster CA"),
    "cert-missing": (ERROR, "run kubecertd --check --fix to get a certificate for this node"),
    "cert-unreadable": (ERROR, "check the file's permissions and the disk; kubecertd runs as root"),
    "cert-invalid": (ERROR, "the certificate file is damaged; run kubecertd --check --fix"),
    "cert-expired": (ERROR, "kubelet cannot authenticate; run kubecertd --check --fix"),
    "cert-not-yet-valid": (
        ERROR,
        "check the node's clock (timedatectl), then run kubecertd --check --fix",
    ),
    "cert-untrusted": (ERROR, "the API server will reject it; run kubecertd --check --fix"),
    "cert-wrong-node": (ERROR, "kubelet would act as the other node; run kubecertd --check --fix"),
    "cert-wrong-group": (
        ERROR,
        "the Node authorizer needs O=system:nodes; run kubecertd --check --fix",
    ),
    "cert-wrong-usage": (ERROR, "kubelet needs clientAuth usage; run kubecertd --check --fix"),
    "cert-expiring": (
        WARNING,
        "kubecertd renews it ahead of time; kubecertd --check --fix renews now",
    ),
    "key-missing": (ERROR, "run kubecertd --check --fix to make a new key and certificate"),
    "key-unreadable": (ERROR, "check the file's permissions and the disk; kubecertd runs as root"),
    "key-invalid": (ERROR, "the key file is damaged or encrypted; run kubecertd --check --fix"),
    "key-mismatch": (
        ERROR,
        "certificate and key are from different pairs; run kubecertd --check --fix",
    ),
    "key-permissions": (WARNING, "chmod 0600 the key and chown it to root"),
    "cert-not-symlink": (
        ERROR,
        "kubelet's rotation fails on a regular file here; kubecertd --check --fix writes a timestamped file and the symlink",
    ),
    "kubeconfig-invalid": (
        ERROR,
        "kubelet cannot start with this kubeconfig; fix the key named (kubecertd never rewrites a kubeconfig it cannot read)",
    ),
    # Findings about kubelet and the clock rather than the files (kubecertd.evidence).
    "clock-unsynced": (
        ERROR,
        "fix time synchronization (timedatectl timesync-status); kubecertd requests nothing until it is synchronized",
    ),
    "rotation-managed": (
        INFO,
        "kubecertd only watches; it acts when kubelet cannot recover (expired, another node's, untrusted, missing or corrupt, not a symlink)",
    ),
    "key-weak": (
        WARNING,
        "kubecertd replaces it with a [policy] key_type key at the next renewal; remove worker-key.pem to have it replaced now",
    ),
}


class Finding(NamedTuple):
    code: str
    severity: str
    path: str
    message: str
    hint: str
    kubelet_line: str | None = None  # kubelet's own journal line that agrees, if any

    def to_dict(self) -> dict[str, str | None]:
        return self._asdict()


class CheckPolicy(NamedTuple):
    """What the diagnosis needs from the configuration, and who may own the key."""

    warn_fraction: float = 0.8
    key_owners: frozenset[int] = frozenset({0})

    @classmethod
    def from_config(cls, config: Config, euid: int) -> CheckPolicy:
        """Root and the user running kubecertd may own the key (SPEC ``key-permissions``)."""
        return cls(warn_fraction=config.policy.warn_fraction, key_owners=frozenset({0, euid}))


class FileReport(NamedTuple):
    """What the human report shows about one file besides its findings."""

    role: str  # "CA", "Certificate", "Key"
    path: str
    facts: tuple[tuple[str, str], ...] = ()


class Diagnosis(NamedTuple):
    node: str
    now: dt.datetime
    findings: tuple[Finding, ...]
    files: tuple[FileReport, ...]
    cert: x509.Certificate | None = None
    ca: x509.Certificate | None = None

    @property
    def healthy(self) -> bool:
        return not any(f.severity == ERROR for f in self.findings)

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def certificate_summary(self) -> dict[str, Any] | None:
        if self.cert is None:
            return None
        return summarize(self.cert)

    def to_dict(self) -> dict[str, Any]:
        """SPEC's ``--check --json`` object."""
        return {
            "node": self.node,
            "healthy": self.healthy,
            "findings": [f.to_dict() for f in self.findings],
            "certificate": self.certificate_summary(),
        }


def summarize(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": pki.serial_hex(cert),
        "not_before": pki.iso(cert.not_valid_before_utc),
        "not_after": pki.iso(cert.not_valid_after_utc),
        "node": pki.node_of(cert),
    }


def finding(code: str, path: str, message: str) -> Finding:
    severity, hint = CODES[code]
    return Finding(code, severity, path, message, hint)


def diagnose(material: Material, node: str, now: dt.datetime, policy: CheckPolicy) -> Diagnosis:
    """Judge the CA, certificate and key files against SPEC's findings table."""
    findings: list[Finding] = []
    ca_certs, ca_report = _judge_ca(material.ca, now, findings)
    cert, cert_report = _judge_cert(material.cert, ca_certs, node, now, policy, findings)
    _key, key_report = _judge_key(material.key, cert, policy, findings)
    for path, message in material.problems:  # what made the layout unreadable
        findings.append(finding("kubeconfig-invalid", path, message))
    return Diagnosis(
        node=node,
        now=now,
        findings=tuple(findings),
        files=(ca_report, cert_report, key_report),
        cert=cert,
        ca=ca_certs[0] if ca_certs else None,
    )


def _read_data(state: FileState, prefix: str, what: str) -> bytes | Finding:
    """The file's bytes, or its missing / unreadable / empty / oversized finding."""
    if state.missing:
        return finding(f"{prefix}-missing", state.path, f"{what} {state.path} does not exist")
    if state.data is None:
        return finding(
            f"{prefix}-unreadable", state.path, f"cannot read {what} {state.path}: {state.error}"
        )
    if state.too_large:
        return finding(f"{prefix}-invalid", state.path, f"{what} {state.path} is larger than 1 MiB")
    if not state.data.strip():
        return finding(f"{prefix}-invalid", state.path, f"{what} {state.path} is empty")
    return state.data


def _parse_certs(
    state: FileState, prefix: str, what: str, out: list[Finding]
) -> list[x509.Certificate]:
    data = _read_data(state, prefix, what)
    if isinstance(data, Finding):
        out.append(data)
        return []
    try:
        return pki.load_certificates(data)
    except ValueError as exc:
        out.append(
            finding(
                f"{prefix}-invalid",
                state.path,
                f"{what} {state.path} is not a PEM or DER certificate ({_short(exc)})",
            )
        )
        return []


def _validity(cert: x509.Certificate) -> tuple[tuple[str, str], ...]:
    return (
        ("subject", cert.subject.rfc4514_string() or "(empty)"),
        ("serial", pki.serial_hex(cert)),
        ("valid", f"{pki.iso(cert.not_valid_before_utc)} to {pki.iso(cert.not_valid_after_utc)}"),
    )


def _judge_ca(
    state: FileState, now: dt.datetime, out: list[Finding]
) -> tuple[list[x509.Certificate], FileReport]:
    certs = _parse_certs(state, "ca", "CA file", out)
    if not certs:
        return [], FileReport("CA", state.path)
    ca = certs[0]
    if not pki.is_ca(ca):
        out.append(
            finding(
                "ca-not-ca",
                state.path,
                f"{ca.subject.rfc4514_string()} in {state.path} is not a CA certificate (basicConstraints CA:FALSE or absent)",
            )
        )
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        out.append(
            finding(
                "ca-expired",
                state.path,
                f"the CA certificate is valid only from {pki.iso(ca.not_valid_before_utc)} to {pki.iso(ca.not_valid_after_utc)}",
            )
        )
    facts = _validity(ca)
    if len(certs) > 1:
        facts += (("bundle", f"{len(certs)} certificates"),)
    return certs, FileReport("CA", state.path, facts)


def _judge_cert(
    state: FileState,
    ca_certs: list[x509.Certificate],
    node: str,
    now: dt.datetime,
    policy: CheckPolicy,
    out: list[Finding],
) -> tuple[x509.Certificate | None, FileReport]:
    if state.not_symlink:
        out.append(
            finding(
                "cert-not-symlink",
                state.path,
                f"{state.path} is a regular file where kubelet's certificate store keeps a symlink",
            )
        )
    certs = _parse_certs(state, "cert", "certificate", out)
    if not certs:
        return None, FileReport("Certificate", state.path)
    cert, path = certs[0], state.path
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now > not_after:
        out.append(finding("cert-expired", path, f"certificate expired on {pki.iso(not_after)}"))
    elif now < not_before:
        out.append(
            finding(
                "cert-not-yet-valid",
                path,
                f"certificate is valid only from {pki.iso(not_before)}; the node's clock says {pki.iso(now)}",
            )
        )
    anchors = [ca for ca in ca_certs if pki.is_ca(ca)]  # a leaf in the CA file is ca-not-ca alone
    if anchors and not any(pki.issued_by(cert, ca) for ca in anchors):
        out.append(
            finding(
                "cert-untrusted",
                path,
                f"certificate was not issued by the CA in the CA file (issuer {cert.issuer.rfc4514_string()})",
            )
        )
    wrong_node = _wrong_node_message(cert, node)
    if wrong_node:
        out.append(finding("cert-wrong-node", path, wrong_node))
    if pki.NODES_GROUP not in pki.organizations(cert.subject):
        out.append(
            finding(
                "cert-wrong-group",
                path,
                f"certificate subject {cert.subject.rfc4514_string()} lacks O={pki.NODES_GROUP}",
            )
        )
    if not pki.allows_client_auth(cert):
        out.append(
            finding(
                "cert-wrong-usage",
                path,
                "certificate's extended key usage does not allow client authentication",
            )
        )
    lifetime = not_after - not_before
    if not_before <= now <= not_after and now > not_before + lifetime * policy.warn_fraction:
        used = (now - not_before) / lifetime if lifetime else 1.0
        out.append(
            finding(
                "cert-expiring",
                path,
                f"certificate expires on {pki.iso(not_after)} ({used:.0%} of its lifetime has passed)",
            )
        )
    return cert, FileReport("Certificate", path, _validity(cert))


def _wrong_node_message(cert: x509.Certificate, node: str) -> str | None:
    names = pki.common_names(cert.subject)
    expected = pki.NODE_PREFIX + node
    if names == [expected]:
        return None
    if not names:
        return f"certificate has no CN; this node is {node}"
    seen = pki.node_of(cert)
    if len(names) > 1:
        return f"certificate has {len(names)} CNs ({', '.join(names)}); the API server would see {names[-1]}, this node is {node}"
    if seen is None:
        return (
            f"certificate CN is {names[-1]}, not a node (system:node:<name>); this node is {node}"
        )
    return f"certificate belongs to node {seen}, this node is {node}"


def _judge_key(
    state: FileState,
    cert: x509.Certificate | None,
    policy: CheckPolicy,
    out: list[Finding],
) -> tuple[PrivateKeyTypes | None, FileReport]:
    key, facts = _parse_key(state, out)
    if key is not None:
        facts = (("type", pki.describe_key(key)), *facts)
        if cert is not None and not pki.same_public_key(cert.public_key(), key.public_key()):
            out.append(
                finding(
                    "key-mismatch",
                    state.path,
                    f"the key in {state.path} is not the key of certificate {pki.serial_hex(cert)}",
                )
            )
        weak = pki.weakness(key)
        if weak:
            out.append(finding("key-weak", state.path, weak))
    if state.mode is not None:
        facts += (("mode", f"{state.mode:04o}, owner uid {state.uid}"),)
        if state.mode & 0o077 or state.uid not in policy.key_owners:
            out.append(
                finding(
                    "key-permissions",
                    state.path,
                    f"key {state.path} has mode {state.mode:04o} and owner uid {state.uid}; only root (or kubecertd's user) should read it",
                )
            )
    return key, FileReport("Key", state.path, facts)


def _parse_key(
    state: FileState, out: list[Finding]
) -> tuple[PrivateKeyTypes | None, tuple[tuple[str, str], ...]]:
    data = _read_data(state, "key", "key file")
    if isinstance(data, Finding):
        out.append(data)
        return None, ()
    try:
        return pki.load_private_key(data), ()
    except ValueError as exc:
        out.append(
            finding(
                "key-invalid",
                state.path,
                f"key file {state.path} is not a usable private key ({_short(exc)})",
            )
        )
        return None, ()


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
