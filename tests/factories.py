"""trustme-style certificate factories on pyca/cryptography.

Every key and certificate the tests use is made here at run time; no key material is
committed.  ECDSA P-256 keys are generated fresh (a fraction of a millisecond each);
RSA and DSA keys are slow to make, so each kind is generated once per run and cached.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = dt.timezone.utc
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING
ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE

NODE = "server2277z.prod.jp.local"
OTHER_NODE = "server2267z.prod.jp.local"
NODE_CN = f"system:node:{NODE}"
NODES_GROUP = "system:nodes"

# The fixed clock of the tests, and validity windows that contain it comfortably.
NOW = dt.datetime(2026, 6, 1, tzinfo=UTC)
CA_NOT_BEFORE = dt.datetime(2026, 1, 1, tzinfo=UTC)
CA_NOT_AFTER = dt.datetime(2036, 1, 1, tzinfo=UTC)
CERT_NOT_BEFORE = dt.datetime(2026, 1, 1, tzinfo=UTC)
CERT_NOT_AFTER = dt.datetime(2027, 1, 1, tzinfo=UTC)

_KEY_MAKERS: dict[str, Callable[[], PrivateKeyTypes]] = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ec-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ec-p224": lambda: ec.generate_private_key(ec.SECP224R1()),
    "ec-p192": lambda: ec.generate_private_key(ec.SECP192R1()),
    "rsa-1024": lambda: rsa.generate_private_key(65537, 1024),  # noqa: S505 - key-weak tests need it
    "rsa-2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "dsa-2048": lambda: dsa.generate_private_key(key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}
KEY_TYPES = tuple(_KEY_MAKERS)


@functools.cache
def cached_key(key_type: str, slot: int = 0) -> PrivateKeyTypes:
    """One key per (type, slot) for the whole run; a different slot is a different key."""
    return _KEY_MAKERS[key_type]()


def new_key(key_type: str = "ec-p256") -> PrivateKeyTypes:
    """A fresh key for the fast EC types, the cached one for slow RSA and DSA."""
    if key_type.startswith("ec-") or key_type == "ed25519":
        return _KEY_MAKERS[key_type]()
    return cached_key(key_type)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, with the encodings the files on disk use."""

    cert: x509.Certificate
    key: PrivateKeyTypes

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key_bytes()

    @property
    def key_der(self) -> bytes:
        return self.key_bytes(serialization.Encoding.DER)

    def key_bytes(
        self,
        encoding: serialization.Encoding = serialization.Encoding.PEM,
        fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
        password: bytes | None = None,
    ) -> bytes:
        protection: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(encoding, fmt, protection)


def _hash_for(key: PrivateKeyTypes) -> hashes.HashAlgorithm | None:
    # Ed25519/Ed448 sign without a separate hash; everything else here uses SHA-256.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def make_name(cn_list: Sequence[str] = (), orgs: Sequence[str] = ()) -> x509.Name:
    """Organisations first, then common names, as ``openssl -subj /O=../CN=..`` writes them."""
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs += [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cn_list]
    return x509.Name(attrs)


def make_ca(
    cn: str = "kube-ca",
    not_before: dt.datetime = CA_NOT_BEFORE,
    not_after: dt.datetime = CA_NOT_AFTER,
    ca: bool | None = True,
    key: PrivateKeyTypes | None = None,
) -> Issued:
    """A self-signed CA; ``ca=False`` writes basicConstraints CA:FALSE, ``None`` omits it."""
    key = key or new_key()
    name = make_name([cn])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return Issued(builder.sign(key, _hash_for(key)), key)


def issue(
    ca: Issued,
    cn_list: Sequence[str] = (NODE_CN,),
    orgs: Sequence[str] = (NODES_GROUP,),
    not_before: dt.datetime = CERT_NOT_BEFORE,
    not_after: dt.datetime = CERT_NOT_AFTER,
    eku: Sequence[x509.ObjectIdentifier] | None = (CLIENT_AUTH,),
    key: PrivateKeyTypes | None = None,
    key_type: str = "ec-p256",
    extensions: Sequence[x509.ExtensionType] = (),
    serial: int | None = None,
) -> Issued:
    """A kubelet client certificate signed by ``ca``; ``eku=None`` leaves out the EKU extension."""
    key = key or new_key(key_type)
    builder = (
        x509.CertificateBuilder()
        .subject_name(make_name(cn_list, orgs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return Issued(builder.sign(ca.key, _hash_for(ca.key)), key)


class SslDir(NamedTuple):
    """The three paths of a kubelet ssl directory, as strings (what read_material takes)."""

    ca: str
    cert: str
    key: str


def write_ssl_dir(
    path: Path,
    ca_pem: bytes | None,
    cert_pem: bytes | None,
    key_pem: bytes | None,
    key_mode: int = 0o600,
) -> SslDir:
    """Write ca.pem, worker.pem and worker-key.pem (skipping any whose content is None)."""
    path.mkdir(parents=True, exist_ok=True)
    paths = SslDir(str(path / "ca.pem"), str(path / "worker.pem"), str(path / "worker-key.pem"))
    for target, content, mode in (
        (paths.ca, ca_pem, 0o644),
        (paths.cert, cert_pem, 0o644),
        (paths.key, key_pem, key_mode),
    ):
        if content is not None:
            Path(target).write_bytes(content)
            os.chmod(target, mode)  # explicit: the umask must not decide the mode under test
    return paths


def healthy_pair() -> tuple[Issued, Issued]:
    """A fresh cluster CA and a kubelet certificate for NODE that it signed."""
    ca = make_ca()
    return ca, issue(ca)


def write_healthy(path: Path) -> tuple[SslDir, Issued, Issued]:
    """A complete, healthy ssl directory for NODE at NOW."""
    ca, leaf = healthy_pair()
    return write_ssl_dir(path, ca.pem, leaf.pem, leaf.key_pem), ca, leaf
