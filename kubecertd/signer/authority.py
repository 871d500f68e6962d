"""The signer's CA files: creating them (``init``) and loading them (``serve``).

``init`` adopts the cluster's existing CA (or makes one), makes the identity CA and
the signer's TLS certificate, and writes everything with keys 0600, owned by the user
the service runs as when there is one (SPEC "Central signer", ``init``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import stat
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import pki
from ..errors import ConfigError, KubecertdError, UsageError
from . import policy
from .config import SignerConfig

SERVICE_USER = "kubecertd-signer"  # systemd/kubecertd-signer.sysusers, User= of the unit
CA_LIFETIME = dt.timedelta(days=3650)
TLS_LIFETIME = dt.timedelta(days=1825)  # the signer's own serving certificate


@dataclass(frozen=True)
class Authority:
    """The two CAs the signer signs with, and the cluster CA bundle it hands out."""

    cluster: policy.Issuer
    identity: policy.Issuer
    cluster_bundle: str  # PEM of the cluster CA file, as /v1/ca serves it
    cluster_certs: tuple[x509.Certificate, ...]


def read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc


def load_issuer(
    cert_path: str, key_path: str, what: str
) -> tuple[policy.Issuer, bytes, list[x509.Certificate]]:
    """A CA certificate and its key, checked to be a CA and a matching pair."""
    cert_pem = read_pem(cert_path, f"{what} certificate")
    try:
        certs = pki.load_certificates(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"{cert_path}: {what} certificate is not a PEM certificate") from exc
    try:
        key = pki.load_private_key(read_pem(key_path, f"{what} key"))
    except ValueError as exc:
        raise ConfigError(f"{key_path}: {what} key is not usable: {exc}") from exc
    cert = certs[0]
    if not pki.is_ca(cert):
        raise ConfigError(
            f"{cert_path}: {what} certificate is not a CA (basicConstraints CA:TRUE is missing)"
        )
    if not pki.same_public_key(cert.public_key(), key.public_key()):
        raise ConfigError(
            f"{key_path}: this key does not belong to the {what} certificate {cert_path}"
        )
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"{key_path}: {what} key must be RSA or ECDSA, not {pki.describe_key(key)}"
        )
    return policy.Issuer(cert, key), cert_pem, certs


def load_authority(config: SignerConfig) -> Authority:
    cluster, cluster_pem, cluster_certs = load_issuer(
        config.cluster_ca.cert, config.cluster_ca.key, "cluster CA"
    )
    identity, _, _ = load_issuer(config.identity_ca.cert, config.identity_ca.key, "identity CA")
    return Authority(
        cluster=cluster,
        identity=identity,
        cluster_bundle=cluster_pem.decode(),
        cluster_certs=tuple(cluster_certs),
    )


# -- init --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The user that gets the keys ``init`` writes, and the folder holding them."""

    name: str
    uid: int
    gid: int  # the user's own group


def init_owner(name: str | None, euid: int) -> Owner | None:
    """``--owner NAME``; without it the service's user when running as root (``euid``
    0) and that user exists (the package creates it); else None: whoever runs ``init``."""
    if name is None and euid != 0:
        return None
    try:
        entry = pwd.getpwnam(name or SERVICE_USER)
    except KeyError:
        if name is None:
            return None
        raise UsageError(f"--owner {name!r}: no such user") from None
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)


@dataclass(frozen=True)
class InitRequest:
    directory: str
    hostnames: tuple[str, ...]
    ips: tuple[str, ...] = ()
    cluster_ca: str | None = None  # adopt these two files ...
    cluster_ca_key: str | None = None
    new_cluster_ca: bool = False  # ... or make a new cluster CA
    force: bool = False
    owner: Owner | None = None  # of the keys and DIR; None: whoever runs init


FILES = (
    "ca.pem",
    "ca-key.pem",
    "identity-ca.pem",
    "identity-ca-key.pem",
    "signer.pem",
    "signer-key.pem",
    "signer.toml",
)


def init(request: InitRequest, now: dt.datetime) -> list[str]:
    """Write the signer's files into ``request.directory``; returns the paths written."""
    directory = os.path.abspath(request.directory)
    existing = [name for name in FILES if os.path.exists(os.path.join(directory, name))]
    if existing and not request.force:
        raise KubecertdError(
            f"{directory}: already set up ({', '.join(existing)}); use --force to replace"
        )
    ips = tuple(_ip(value) for value in request.ips)
    if request.new_cluster_ca:
        cluster = _new_ca("kubernetes-ca", now)
        cluster_pem = pki.certificate_pem(cluster.cert)
    else:
        if not request.cluster_ca or not request.cluster_ca_key:
            raise KubecertdError(
                "init needs --cluster-ca and --cluster-ca-key, or --new-cluster-ca"
            )
        cluster, cluster_pem, _ = load_issuer(
            request.cluster_ca, request.cluster_ca_key, "cluster CA"
        )
    identity = _new_ca("kubecertd identity CA", now)
    tls_key = ec.generate_private_key(ec.SECP256R1())
    tls_cert = _serving_certificate(identity, tls_key, request.hostnames, ips, now)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if request.owner and not os.stat(directory).st_mode & stat.S_IXOTH:
        # The service must reach its keys; a folder open to all needs no new owner.
        _chown(directory, request.owner)
    files = {
        "ca.pem": (cluster_pem, 0o644),
        "ca-key.pem": (pki.private_key_pem(cluster.key), 0o600),
        "identity-ca.pem": (pki.certificate_pem(identity.cert), 0o644),
        "identity-ca-key.pem": (pki.private_key_pem(identity.key), 0o600),
        "signer.pem": (pki.certificate_pem(tls_cert), 0o644),
        "signer-key.pem": (pki.private_key_pem(tls_key), 0o600),
        "signer.toml": (render_config(directory).encode(), 0o644),
    }
    written = []
    for name, (data, mode) in files.items():
        path = os.path.join(directory, name)
        # The keys go to the owner; what anyone may read stays with whoever runs init.
        _write(path, data, mode, request.owner if mode == 0o600 else None)
        written.append(path)
    return written


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise UsageError(f"--ip {value!r} is not an IP address") from exc


def _write(path: str, data: bytes, mode: int, owner: Owner | None = None) -> None:
    """Write a file with its final mode and owner from the start (a key is never
    briefly 0644)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        if owner:
            _chown(fd, owner, path)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _chown(target: str | int, owner: Owner, path: str = "") -> None:
    try:
        os.chown(target, owner.uid, owner.gid)
    except OSError as exc:
        raise KubecertdError(
            f"{path or target}: cannot give it to user {owner.name}: {exc.strerror}"
            " (run init as root, or choose another --owner)"
        ) from exc


def _new_ca(common_name: str, now: dt.datetime) -> policy.Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(policy.random_serial())
        .not_valid_before(now - policy.BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            pki.key_usage(signs_certificates=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return policy.Issuer(cert, key)


def _serving_certificate(
    issuer: policy.Issuer,
    key: ec.EllipticCurvePrivateKey,
    hostnames: tuple[str, ...],
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    now: dt.datetime,
) -> x509.Certificate:
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(ip) for ip in ips]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(policy.random_serial())
        .not_valid_before(now - policy.BACKDATE)
        .not_valid_after(min(now + TLS_LIFETIME, issuer.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )


def render_config(directory: str) -> str:
    """The complete, commented ``signer.toml`` that ``init`` writes."""
    state = (
        "/var/lib/kubecertd-signer/state.db"
        if directory.startswith("/etc/")
        else os.path.join(directory, "state.db")
    )
    return f"""\
# kubecertd-signer configuration, written by `kubecertd-signer init`.
# Durations are a number and a unit: ms, s, m, h, d.

listen = "0.0.0.0:8443"            # serve --listen HOST:PORT overrides this
state = "{state}"   # embedded SQLite (default)
# database_url = "postgresql://signer@db/kubecertd"  # shared by several replicas

[cluster_ca]          # signs kubelet certificates
cert = "{directory}/ca.pem"
key = "{directory}/ca-key.pem"

[identity_ca]         # signs node identity certificates; nodes trust it as [signer] ca
cert = "{directory}/identity-ca.pem"
key = "{directory}/identity-ca-key.pem"

[tls]                 # the signer's own serving certificate (from the identity CA)
cert = "{directory}/signer.pem"
key = "{directory}/signer-key.pem"

[policy]
cert_lifetime = "30d"                   # kubelet certificates
identity_lifetime = "365d"              # node identity certificates
token_ttl = "1h"                        # default for `token create`
max_issuances_per_node_per_hour = 10    # /v1/sign, across all replicas

[limits]              # each worker process (docs/SPEC.md "Connections")
max_connections = 512                   # also kept below the worker's file limit
max_connections_per_address = 32        # an IPv6 client counts by its /64
handshake_timeout = "10s"               # from accept to a finished TLS handshake
header_timeout = "10s"                  # then to the end of the first request's headers
"""
