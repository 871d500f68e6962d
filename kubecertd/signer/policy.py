"""The signer's issuance policy: pure functions, no I/O (SPEC "Issuance policy").

``authenticate`` turns a verified TLS peer certificate into an ``Identity``;
``decide`` judges a CSR against that identity and returns a ``Decision``;
``build_certificate`` makes the certificate for an accepted decision.  Nothing in a
CSR is trusted: only its public key ever reaches an issued certificate, and the node
comes from the identity, never from the request.

Rules that need shared state (revocations, rate limits, tokens) live in the store,
inside the same transaction that writes the audit record.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import pki
from ..config import is_dns_subdomain

KUBELET = "kubelet"  # a kubelet client certificate, from the cluster CA (/v1/sign)
IDENTITY = (
    "identity"  # a node identity certificate, from the identity CA (/v1/enroll, /v1/identity)
)

# Who may ask for what (SPEC's API table): a kubelet certificate renews a kubelet
# certificate but never obtains an identity; a token obtains only an identity.
_MAY_ASK = {KUBELET: (IDENTITY, KUBELET), IDENTITY: (IDENTITY, "token")}
BACKDATE = dt.timedelta(minutes=5)
_GOOD_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_CSR_BLOCK = b"-----BEGIN CERTIFICATE REQUEST-----"


@dataclass(frozen=True)
class Identity:
    """Who is asking, as authentication established it."""

    node: str
    via: str  # "identity" certificate, "kubelet" certificate, or "token"
    ref: str  # the client certificate's serial, or the token id

    def describe(self) -> str:
        return f"{self.via}:{self.ref}"


@dataclass(frozen=True)
class Decision:
    """The verdict on one CSR.  A refusal carries SPEC's error code and HTTP status."""

    node: str | None
    status: int = 201
    code: str | None = None
    message: str = "issued"
    public_key: CertificatePublicKeyTypes | None = None
    key_fingerprint: str | None = None

    @property
    def accepted(self) -> bool:
        return self.code is None


def refuse(status: int, code: str, message: str, node: str | None = None) -> Decision:
    return Decision(node=node, status=status, code=code, message=message)


# -- authentication ------------------------------------------------------------------------


def authenticate(
    peer: x509.Certificate | None,
    cluster_cas: Sequence[x509.Certificate],
    identity_ca: x509.Certificate,
    now: dt.datetime,
    issuer: x509.Certificate | None = None,
) -> Identity | None:
    """The node a verified client certificate speaks for, or None.

    Called on every request, resumed TLS sessions included: an identity certificate
    must come from the identity CA with EKU clientAuth and subject ``CN=<node>``; a
    kubelet certificate used as identity must come from the cluster CA with exactly
    ``O=system:nodes`` and ``CN=system:node:<node>``.

    ``issuer`` is the certificate that signed ``peer`` in the chain the TLS handshake
    verified (the chain's second): the handshake has proved that signature, so only
    which CA it is is decided here.  Without it each CA's signature is checked.
    """
    if peer is None or not peer.not_valid_before_utc <= now <= peer.not_valid_after_utc:
        return None
    serial = pki.serial_hex(peer)

    def signed_by(ca: x509.Certificate) -> bool:
        return ca == issuer if issuer is not None else _issued_by(peer, ca)

    if signed_by(identity_ca):
        node = _identity_node(peer.subject)
        ok = node and _has_eku(peer, ExtendedKeyUsageOID.CLIENT_AUTH)
        return Identity(node, IDENTITY, serial) if ok and node else None
    if any(signed_by(ca) for ca in cluster_cas):
        # Judged as the API server judges kubelet certificates (Go: no EKU allows any use).
        node = _kubelet_node(peer.subject)
        return Identity(node, KUBELET, serial) if node and pki.allows_client_auth(peer) else None
    return None


@functools.lru_cache(maxsize=4096)
def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """``pki.issued_by`` remembered per (certificate, CA): a signature over the same
    bytes never changes its verdict, and agents come back with the same identity.
    Certificates hash and compare by their DER encoding."""
    return pki.issued_by(cert, ca)


def _has_eku(cert: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    try:
        return usage in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return False


def _single_attributes(name: x509.Name) -> list[x509.NameAttribute[str | bytes]] | None:
    """The subject's attributes when every RDN holds exactly one, else None."""
    rdns = list(name.rdns)
    if any(len(rdn) != 1 for rdn in rdns):
        return None
    return [next(iter(rdn)) for rdn in rdns]


def _identity_node(subject: x509.Name) -> str | None:
    """``CN=<node>`` and nothing else."""
    attrs = _single_attributes(subject)
    if not attrs or len(attrs) != 1 or attrs[0].oid != NameOID.COMMON_NAME:
        return None
    node = str(attrs[0].value)
    return node if is_dns_subdomain(node) else None


def _kubelet_node(subject: x509.Name) -> str | None:
    """``CN=system:node:<node>, O=system:nodes`` and nothing else (either order)."""
    attrs = _single_attributes(subject)
    if not attrs or len(attrs) != 2:
        return None
    by_oid = {attr.oid: str(attr.value) for attr in attrs}
    cn, org = by_oid.get(NameOID.COMMON_NAME), by_oid.get(NameOID.ORGANIZATION_NAME)
    if cn is None or org != pki.NODES_GROUP or not cn.startswith(pki.NODE_PREFIX):
        return None
    node = cn[len(pki.NODE_PREFIX) :]
    return node if is_dns_subdomain(node) else None


# -- the decision --------------------------------------------------------------------------


def decide(csr_pem: bytes, identity: Identity | None, kind: str) -> Decision:
    """Judge a CSR for a ``kind`` certificate (KUBELET or IDENTITY) asked by ``identity``."""
    if identity is None or identity.via not in _MAY_ASK[kind]:
        return refuse(
            401,
            "unauthenticated",
            f"a {' or '.join(_MAY_ASK[kind])} credential is needed for this request",
        )
    parsed = _parse_csr(csr_pem)
    if isinstance(parsed, Decision):
        return parsed
    csr = parsed
    public_key = csr.public_key()
    weak = _key_problem(public_key)
    if weak:
        return refuse(400, "weak-key", weak)
    signature = _signature_problem(csr)
    if signature:
        return refuse(400, "bad-csr", signature)
    node = _kubelet_node(csr.subject) if kind == KUBELET else _identity_node(csr.subject)
    if node is None:
        wanted = "CN=system:node:<node>, O=system:nodes" if kind == KUBELET else "CN=<node>"
        return refuse(
            400, "bad-csr", f"CSR subject must be exactly {wanted} with a valid node name"
        )
    extensions = _extensions_problem(csr)
    if extensions:
        return refuse(400, "bad-csr", extensions, node)
    if identity.node != node:
        return refuse(
            403,
            "forbidden-node",
            f"identity is node {identity.node}, the CSR asks for node {node}",
            node,
        )
    return Decision(
        node=node, public_key=public_key, key_fingerprint=pki.key_fingerprint(public_key)
    )


def claimed_node(csr_pem: bytes, kind: str) -> str | None:
    """The node a CSR's subject names, if it names a valid one: what the request claims,
    for the audit of a refusal, with nothing checked (not even the signature)."""
    parsed = _parse_csr(csr_pem)
    if isinstance(parsed, Decision):
        return None
    return _kubelet_node(parsed.subject) if kind == KUBELET else _identity_node(parsed.subject)


def _parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest | Decision:
    # Exactly one PEM block, and it is a CSR: a second block (a certificate, another
    # CSR) is a request to guess which one counts.
    if csr_pem.count(b"-----BEGIN ") != 1 or csr_pem.count(_CSR_BLOCK) != 1:
        return refuse(400, "bad-csr", "csr must hold exactly one CERTIFICATE REQUEST PEM block")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        csr.public_key()  # cryptography decodes these lazily: decode them here, where
        csr.subject.rfc4514_string()  # a malformed field is still bad-csr, not a crash
    except Exception as exc:  # noqa: BLE001 - any parse failure of hostile input is bad-csr
        return refuse(400, "bad-csr", f"csr is not a valid PKCS#10 request ({type(exc).__name__})")
    return csr


def _key_problem(key: object) -> str | None:
    """SPEC's key allow-list: ECDSA P-256/P-384, RSA 2048-4096 with e=65537."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in ("secp256r1", "secp384r1"):
            return None
        return f"EC curve {key.curve.name} is not allowed (P-256 or P-384)"
    if isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 4096:
            return f"RSA keys must be 2048 to 4096 bits, not {key.key_size}"
        if key.public_numbers().e != 65537:
            return "RSA keys must use the public exponent 65537"
        return None
    return f"{pki.describe_key(key)} keys are not allowed (ECDSA P-256/P-384 or RSA 2048-4096)"  # type: ignore[arg-type]


def _signature_problem(csr: x509.CertificateSigningRequest) -> str | None:
    """Proof of possession: a valid signature made with SHA-256 or stronger."""
    try:
        algorithm = csr.signature_hash_algorithm
    except Exception:  # noqa: BLE001 - UnsupportedAlgorithm and friends
        return "csr is signed with an unsupported algorithm"
    if not isinstance(algorithm, _GOOD_HASHES):
        name = algorithm.name if algorithm else "none"
        return f"csr is signed with {name}; SHA-256 or stronger is required"
    try:
        valid = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - a malformed signature is simply not valid
        valid = False
    return None if valid else "csr signature does not verify (proof of possession failed)"


def _extensions_problem(csr: x509.CertificateSigningRequest) -> str | None:
    try:
        extensions = csr.extensions
    except Exception as exc:  # noqa: BLE001 - duplicate or malformed extensions
        return f"csr extensions cannot be parsed ({type(exc).__name__})"
    for extension in extensions:
        if extension.oid == x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            return "csr carries subjectAltNames; kubelet client certificates have none"
    return None  # every other requested extension is ignored, never copied


# -- the certificate -----------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """A CA that signs: its certificate and private key."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes


def build_certificate(
    issuer: Issuer,
    public_key: CertificatePublicKeyTypes,
    node: str,
    kind: str,
    lifetime: dt.timedelta,
    now: dt.datetime,
    serial: int,
) -> x509.Certificate:
    """The certificate for an accepted decision; every field is the signer's choice.

    Extensions are an exact allow-list: basicConstraints CA:FALSE (critical), keyUsage
    digitalSignature (+ keyEncipherment for RSA), extKeyUsage clientAuth, SKI, AKI.
    """
    subject = pki.kubelet_subject(node) if kind == KUBELET else pki.identity_subject(node)
    not_after = min(now + lifetime, issuer.cert.not_valid_after_utc)
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            pki.key_usage(key_encipherment=rsa_key),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_id(issuer.cert), critical=False)
    )
    return builder.sign(issuer.key, _hash_for(issuer.key))


def random_serial() -> int:
    """A random positive serial of 159 bits (SPEC: at least 64)."""
    return x509.random_serial_number()


def _authority_key_id(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()
