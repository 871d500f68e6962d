"""The signer's pure issuance policy against SPEC "HTTP API" and "Issuance policy".

Every CSR here is made at run time.  SHA-1/MD5 signatures and undecodable subjects are
out of reach of cryptography's CSR builder, so ``signed_request`` assembles the DER by
hand around request info signed with the low-level key API: the signature is genuine,
only the content is hostile.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import ipaddress
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtensionOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubecertd import pki
from kubecertd.signer import policy
from kubecertd.signer.policy import IDENTITY, KUBELET, Decision, Identity, Issuer

from factories import (
    ANY_EKU,
    CERT_NOT_AFTER,
    CERT_NOT_BEFORE,
    CLIENT_AUTH,
    CODE_SIGNING,
    NODE,
    NODE_CN,
    NODES_GROUP,
    NOW,
    OTHER_NODE,
    SERVER_AUTH,
    Issued,
    cached_key,
    issue,
    make_ca,
)

# SPEC allows node names up to 253 characters, past RFC 5280's 64-character CN bound;
# cryptography warns about such CNs each time it builds or parses one.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")

SECOND = dt.timedelta(seconds=1)
LIFETIME = dt.timedelta(days=30)  # SPEC's default cert_lifetime
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
CN = NameOID.COMMON_NAME
O = NameOID.ORGANIZATION_NAME  # noqa: E741 - reads like the RDN it names
OU = NameOID.ORGANIZATIONAL_UNIT_NAME
C = NameOID.COUNTRY_NAME
OTHER_CN = f"system:node:{OTHER_NODE}"
NODE_253 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # the longest valid name
NODE_254 = NODE_253 + "d"
ALLOWED_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
}
UNKNOWN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.7.42")  # an arbitrary private OID
REFUSALS = {(400, "bad-csr"), (400, "weak-key")}

# -- keys ----------------------------------------------------------------------------------

_KEY_MAKERS: dict[str, Callable[[], PrivateKeyTypes]] = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ec-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ec-p224": lambda: ec.generate_private_key(ec.SECP224R1()),
    "ec-secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),  # 256 bits, wrong curve
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
    "rsa-1024": lambda: cached_key("rsa-1024"),
    "rsa-2048": lambda: cached_key("rsa-2048"),
    "rsa-3072": lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
    "rsa-4096": lambda: rsa.generate_private_key(public_exponent=65537, key_size=4096),
    # One bit either side of SPEC's 2048-4096 (OpenSSL rounds odd sizes, so these are
    # assembled from primes); 4097 is as "huge" as 8192 for the rule, in a fraction of the time.
    "rsa-2047": lambda: _rsa_from_primes(_prime("rsa-2046"), _prime("rsa-2048")),
    "rsa-4097": lambda: _rsa_from_primes(_prime("rsa-4098"), _prime("rsa-4096")),
    "rsa-2046": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2046),  # noqa: S505 - a prime for rsa-2047
    "rsa-4098": lambda: rsa.generate_private_key(public_exponent=65537, key_size=4098),
    "rsa-2048-e3": lambda: rsa.generate_private_key(public_exponent=3, key_size=2048),
    "dsa-2048": lambda: cached_key("dsa-2048"),
}
ACCEPTED_KEYS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")


@functools.cache
def key(key_type: str) -> PrivateKeyTypes:
    """One key per type for the whole module (RSA is slow to make)."""
    return _KEY_MAKERS[key_type]()


def _prime(key_type: str) -> int:
    private = key(key_type)
    assert isinstance(private, rsa.RSAPrivateKey)
    return private.private_numbers().p


def _rsa_from_primes(p: int, q: int, e: int = 65537) -> rsa.RSAPrivateKey:
    """An RSA key whose modulus is exactly p*q (FIPS 186-4 primes: its size is the sum)."""
    d = pow(e, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(e, p * q)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q), public
    )
    return numbers.private_key()


# -- names, CSRs and their encodings --------------------------------------------------------


def name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    """A subject with one attribute per RDN, in order, without cryptography's length checks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return x509.Name(
            [x509.NameAttribute(oid, value, _validate=False) for oid, value in attributes]
        )


KUBELET_NAME = name((O, NODES_GROUP), (CN, NODE_CN))
IDENTITY_NAME = name((CN, NODE))


def kubelet_name(node: str) -> x509.Name:
    return name((O, NODES_GROUP), (CN, f"system:node:{node}"))


def make_csr(
    subject: x509.Name = KUBELET_NAME,
    key_type: str = "ec-p256",
    algorithm: hashes.HashAlgorithm | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    pss: bool = False,
) -> x509.CertificateSigningRequest:
    """A CSR signed by the module's key of ``key_type`` (SHA-256 unless told otherwise)."""
    private = key(key_type)
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    if isinstance(private, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return builder.sign(private, None)  # EdDSA hashes internally
    rsa_padding = (
        padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH) if pss else None
    )
    return builder.sign(private, algorithm or hashes.SHA256(), rsa_padding=rsa_padding)  # type: ignore[arg-type]


def csr_pem(**kwargs: object) -> bytes:
    return make_csr(**kwargs).public_bytes(PEM)  # type: ignore[arg-type]


def armour(der: bytes, label: str = "CERTIFICATE REQUEST") -> bytes:
    """RFC 7468 armour: 64-character base64 lines between BEGIN and END."""
    b64 = base64.b64encode(der)
    lines = b"".join(b64[i : i + 64] + b"\n" for i in range(0, len(b64), 64))
    return f"-----BEGIN {label}-----\n".encode() + lines + f"-----END {label}-----\n".encode()


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER tag-length-value."""
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    size = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha1": hashes.SHA1(),  # noqa: S303 - the refusal of SHA-1 is under test
    "md5": hashes.MD5(),  # noqa: S303 - the refusal of MD5 is under test
}
# DER AlgorithmIdentifiers: ecdsa-with-SHA256, ecdsa-with-SHA1, sha1/md5WithRSAEncryption.
_SIGNATURE_ALGORITHMS = {
    ("ec", "sha256"): "300a06082a8648ce3d040302",
    ("ec", "sha1"): "300906072a8648ce3d0401",
    ("rsa", "sha1"): "300d06092a864886f70d0101050500",
    ("rsa", "md5"): "300d06092a864886f70d0101040500",
}


def signed_request(tbs: bytes, key_type: str = "ec-p256", hash_name: str = "sha256") -> bytes:
    """A CSR (DER) over any request info with a genuine signature by the module's key."""
    private = key(key_type)
    if isinstance(private, rsa.RSAPrivateKey):
        family, signature = "rsa", private.sign(tbs, padding.PKCS1v15(), _HASHES[hash_name])
    else:
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        family, signature = "ec", private.sign(tbs, ec.ECDSA(_HASHES[hash_name]))
    algorithm = bytes.fromhex(_SIGNATURE_ALGORITHMS[family, hash_name])
    return _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature))


def resigned_pem(
    key_type: str = "ec-p256",
    hash_name: str = "sha256",
    edit: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """The golden request info, optionally edited, signed again by hand."""
    tbs = make_csr(key_type=key_type).tbs_certrequest_bytes
    if edit is not None:
        edited = edit(tbs)
        assert edited != tbs, "the edit did not apply"
        tbs = edited
    return armour(signed_request(tbs, key_type, hash_name))


_CN_TLV = b"\x0c" + bytes([len(NODE_CN)]) + NODE_CN.encode()  # UTF8String "system:node:…"


def _cn_not_utf8(tbs: bytes) -> bytes:
    return tbs.replace(NODE_CN.encode(), NODE_CN.encode()[:-1] + b"\xff")


def _cn_as_integer(tbs: bytes) -> bytes:
    return tbs.replace(_CN_TLV, b"\x02" + _CN_TLV[1:])


def _cn_as_bit_string(tbs: bytes) -> bytes:
    return tbs.replace(_CN_TLV, b"\x03" + _CN_TLV[1:])


def _with_flipped_signature() -> bytes:
    der = bytearray(make_csr().public_bytes(DER))
    der[-1] ^= 0x01  # the last byte of the signature value
    return armour(bytes(der))


def _with_tampered_subject() -> bytes:
    der = make_csr().public_bytes(DER)
    assert der.count(NODE.encode()) == 1 and len(NODE) == len(OTHER_NODE)
    return armour(der.replace(NODE.encode(), OTHER_NODE.encode()))


def _certificate_pem() -> bytes:
    return make_ca().pem


def _joined(*parts: Callable[[], bytes]) -> Callable[[], bytes]:
    return lambda: b"".join(part() for part in parts)


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _truncated_pem() -> bytes:
    der = make_csr().public_bytes(DER)
    return armour(der[: len(der) // 2])


def _der_csr() -> bytes:
    return make_csr().public_bytes(DER)


def _golden_pem() -> bytes:
    return csr_pem()


def _other_node_pem() -> bytes:
    return csr_pem(subject=kubelet_name(OTHER_NODE))


def _private_key_pem() -> bytes:
    return key("ec-p256").private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ident(node: str = NODE, via: str = IDENTITY) -> Identity:
    return Identity(node, via, "1")


def _csr_public_key(csr: bytes) -> CertificatePublicKeyTypes:
    return x509.load_pem_x509_csr(csr).public_key()


# -- certificate authorities ---------------------------------------------------------------


def make_signing_ca(
    key_type: str = "ec-p256",
    cn: str = "kube-ca",
    not_after: dt.datetime = dt.datetime(2036, 1, 1, tzinfo=dt.timezone.utc),
    ski: bytes | None = None,
) -> Issued:
    """A CA as ``kubecertd-signer init`` would want it: KU, BC and an SKI.

    The SKI defaults to random bytes, so an AKI copied from it cannot be confused with
    one recomputed from the CA's key.
    """
    private = key(key_type) if key_type.startswith("rsa") else _KEY_MAKERS[key_type]()
    subject = name((CN, cn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            pki.key_usage(signs_certificates=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier(ski or os.urandom(20)), critical=False)
    )
    return Issued(builder.sign(private, hashes.SHA256()), private)  # type: ignore[arg-type]


def issuer_of(ca: Issued) -> Issuer:
    return Issuer(ca.cert, ca.key)  # type: ignore[arg-type]


def ski_of(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def build(
    ca: Issued,
    csr: bytes,
    kind: str = KUBELET,
    node: str = NODE,
    lifetime: dt.timedelta = LIFETIME,
    serial: int | None = None,
) -> x509.Certificate:
    """The certificate the signer would make for an accepted CSR."""
    decision = policy.decide(csr, ident(node), kind)
    assert decision.accepted, decision.message
    assert decision.public_key is not None and decision.node is not None
    return policy.build_certificate(
        issuer_of(ca),
        decision.public_key,
        decision.node,
        kind,
        lifetime,
        NOW,
        serial or policy.random_serial(),
    )


def assert_allow_listed(cert: x509.Certificate, public_key: CertificatePublicKeyTypes) -> None:
    """Exactly SPEC's five extensions, each the signer's own choice."""
    oids = [extension.oid for extension in cert.extensions]
    assert len(oids) == len(set(oids)) and set(oids) == ALLOWED_EXTENSIONS
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        CLIENT_AUTH
    ]
    assert ski_of(cert) == x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def check_refused(decision: Decision) -> None:
    assert (decision.status, decision.code) in REFUSALS, decision
    assert not decision.accepted and decision.public_key is None


# -- decide(): kubelet CSRs ----------------------------------------------------------------


def test_golden_csr_is_accepted() -> None:
    """A P-256, SHA-256 CSR for CN=system:node:<node>, O=system:nodes from that node is issued."""
    csr = csr_pem()
    decision = policy.decide(csr, ident(), KUBELET)
    assert decision.accepted and (decision.status, decision.code) == (201, None)
    assert decision.node == NODE
    assert decision.public_key is not None
    assert pki.same_public_key(decision.public_key, key("ec-p256").public_key())
    assert decision.key_fingerprint == pki.key_fingerprint(decision.public_key)


def _ext(extension: x509.ExtensionType, critical: bool = False) -> tuple[x509.ExtensionType, bool]:
    return (extension, critical)


_CA_TRUE = _ext(x509.BasicConstraints(ca=True, path_length=None), critical=True)
_KEY_CERT_SIGN = _ext(
    pki.key_usage(digital_signature=False, signs_certificates=True), critical=True
)
_UNKNOWN_CRITICAL = _ext(x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00"), critical=True)
_SERVER_EKU = _ext(x509.ExtendedKeyUsage([SERVER_AUTH, CODE_SIGNING]))
_CHOSEN_SKI = _ext(x509.SubjectKeyIdentifier(b"\x00" * 20))
_SAN_DNS = _ext(x509.SubjectAlternativeName([x509.DNSName(NODE)]))
_SAN_IP = _ext(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("10.0.0.7"))]))

_P = functools.partial

# (CSR body, identity's node or None, expected status, expected code)
KUBELET_CASES = [
    # accepted, including every key SPEC allows and requested extensions it ignores
    pytest.param(_golden_pem, NODE, 201, None, id="golden"),
    *(
        pytest.param(_P(csr_pem, key_type=kt), NODE, 201, None, id=f"key-{kt}")
        for kt in ACCEPTED_KEYS[1:]
    ),
    pytest.param(_P(csr_pem, algorithm=hashes.SHA384()), NODE, 201, None, id="sha384-signature"),
    pytest.param(_P(csr_pem, algorithm=hashes.SHA512()), NODE, 201, None, id="sha512-signature"),
    pytest.param(_P(csr_pem, key_type="rsa-2048", pss=True), NODE, 201, None, id="rsa-pss-signature"),
    pytest.param(resigned_pem, NODE, 201, None, id="hand-signed-control"),
    pytest.param(
        _P(csr_pem, subject=name((CN, NODE_CN), (O, NODES_GROUP))),
        NODE, 201, None, id="subject-cn-first",
    ),
    pytest.param(_P(csr_pem, extensions=[_CA_TRUE]), NODE, 201, None, id="ignored-basic-constraints-ca"),
    pytest.param(_P(csr_pem, extensions=[_KEY_CERT_SIGN]), NODE, 201, None, id="ignored-key-usage-cert-sign"),
    pytest.param(_P(csr_pem, extensions=[_UNKNOWN_CRITICAL]), NODE, 201, None, id="ignored-unknown-critical"),
    pytest.param(_P(csr_pem, extensions=[_SERVER_EKU]), NODE, 201, None, id="ignored-eku-server-auth"),
    pytest.param(_P(csr_pem, extensions=[_CHOSEN_SKI]), NODE, 201, None, id="ignored-chosen-ski"),
    pytest.param(
        _P(csr_pem, extensions=[_CA_TRUE, _KEY_CERT_SIGN, _UNKNOWN_CRITICAL, _SERVER_EKU, _CHOSEN_SKI]),
        NODE, 201, None, id="ignored-all-together",
    ),
    # authentication and authorisation
    pytest.param(_golden_pem, None, 401, "unauthenticated", id="no-identity"),
    pytest.param(_golden_pem, OTHER_NODE, 403, "forbidden-node", id="identity-other-node"),
    # exactly one CERTIFICATE REQUEST PEM block
    pytest.param(_constant(b"hello, signer\n"), NODE, 400, "bad-csr", id="garbage-body"),
    pytest.param(_constant(b""), NODE, 400, "bad-csr", id="empty-body"),
    pytest.param(_der_csr, NODE, 400, "bad-csr", id="der-not-pem"),
    pytest.param(_truncated_pem, NODE, 400, "bad-csr", id="truncated-csr"),
    pytest.param(_joined(_golden_pem, _certificate_pem), NODE, 400, "bad-csr", id="csr-then-certificate"),
    pytest.param(_joined(_certificate_pem, _golden_pem), NODE, 400, "bad-csr", id="certificate-then-csr"),
    pytest.param(_joined(_golden_pem, _other_node_pem), NODE, 400, "bad-csr", id="two-csrs"),
    pytest.param(_joined(_golden_pem, _private_key_pem), NODE, 400, "bad-csr", id="csr-then-private-key"),
    pytest.param(_certificate_pem, NODE, 400, "bad-csr", id="certificate-not-csr"),
    # proof of possession: a genuine signature, SHA-256 or stronger
    pytest.param(_with_flipped_signature, NODE, 400, "bad-csr", id="bad-signature"),
    pytest.param(_with_tampered_subject, OTHER_NODE, 400, "bad-csr", id="tampered-subject"),
    pytest.param(_P(resigned_pem, "rsa-2048", "sha1"), NODE, 400, "bad-csr", id="sha1-rsa-signature"),
    pytest.param(_P(resigned_pem, "rsa-2048", "md5"), NODE, 400, "bad-csr", id="md5-rsa-signature"),
    pytest.param(_P(resigned_pem, "ec-p256", "sha1"), NODE, 400, "bad-csr", id="sha1-ecdsa-signature"),
    pytest.param(_P(csr_pem, algorithm=hashes.SHA224()), NODE, 400, "bad-csr", id="sha224-signature"),
    # subject: exactly one CN=system:node:<name> and one O=system:nodes
    pytest.param(_P(csr_pem, subject=name((O, NODES_GROUP), (OU, "nodes"), (CN, NODE_CN))), NODE, 400, "bad-csr", id="subject-extra-ou"),
    pytest.param(_P(csr_pem, subject=name((C, "JP"), (O, NODES_GROUP), (CN, NODE_CN))), NODE, 400, "bad-csr", id="subject-extra-c"),
    pytest.param(_P(csr_pem, subject=name((O, NODES_GROUP), (O, NODES_GROUP), (CN, NODE_CN))), NODE, 400, "bad-csr", id="subject-second-o"),
    pytest.param(_P(csr_pem, subject=name((O, NODES_GROUP), (O, "system:masters"), (CN, NODE_CN))), NODE, 400, "bad-csr", id="subject-extra-o-system-masters"),
    pytest.param(_P(csr_pem, subject=name((O, "system:masters"), (CN, NODE_CN))), NODE, 400, "bad-csr", id="subject-o-system-masters"),
    pytest.param(_P(csr_pem, subject=name((O, "System:Nodes"), (CN, NODE_CN))), NODE, 400, "bad-csr", id="subject-o-wrong-case"),
    pytest.param(_P(csr_pem, subject=name((O, NODES_GROUP), (CN, OTHER_CN), (CN, NODE_CN))), NODE, 400, "bad-csr", id="subject-two-cns"),
    pytest.param(_P(csr_pem, subject=name((O, NODES_GROUP), (CN, NODE_CN), (CN, NODE_CN))), NODE, 400, "bad-csr", id="subject-same-cn-twice"),
    pytest.param(_P(csr_pem, subject=name((CN, NODE_CN))), NODE, 400, "bad-csr", id="subject-cn-only"),
    pytest.param(_P(csr_pem, subject=name((O, NODES_GROUP))), NODE, 400, "bad-csr", id="subject-o-only"),
    pytest.param(_P(csr_pem, subject=x509.Name([])), NODE, 400, "bad-csr", id="subject-empty"),
    pytest.param(
        _P(csr_pem, subject=x509.Name([x509.RelativeDistinguishedName([
            x509.NameAttribute(O, NODES_GROUP), x509.NameAttribute(CN, NODE_CN)
        ])])),
        NODE, 400, "bad-csr", id="subject-multi-valued-rdn",
    ),
    pytest.param(_P(csr_pem, subject=name((O, NODES_GROUP), (CN, NODE))), NODE, 400, "bad-csr", id="cn-without-prefix"),
    pytest.param(_P(csr_pem, subject=name((O, NODES_GROUP), (CN, f"System:Node:{NODE}"))), NODE, 400, "bad-csr", id="cn-prefix-wrong-case"),
    pytest.param(_P(csr_pem, subject=kubelet_name(NODE.upper())), NODE.upper(), 400, "bad-csr", id="cn-node-uppercase"),
    pytest.param(_P(csr_pem, subject=kubelet_name(NODE_254)), NODE_254, 400, "bad-csr", id="cn-node-254-chars"),
    pytest.param(_P(csr_pem, subject=kubelet_name("node_1.example")), "node_1.example", 400, "bad-csr", id="cn-node-invalid-dns"),
    pytest.param(_P(csr_pem, subject=kubelet_name("a" * 64 + ".example")), "a" * 64 + ".example", 400, "bad-csr", id="cn-node-label-64-chars"),
    pytest.param(_P(csr_pem, subject=kubelet_name(f"{NODE}.")), f"{NODE}.", 400, "bad-csr", id="cn-node-trailing-dot"),
    pytest.param(_P(csr_pem, subject=kubelet_name("")), "", 400, "bad-csr", id="cn-node-empty"),
    pytest.param(
        _P(resigned_pem, edit=_cn_not_utf8), NODE, 400, "bad-csr", id="cn-not-utf8",
    ),
    pytest.param(
        _P(resigned_pem, edit=_cn_as_integer), NODE, 400, "bad-csr", id="cn-integer",
    ),
    pytest.param(
        _P(resigned_pem, edit=_cn_as_bit_string), NODE, 400, "bad-csr", id="cn-bit-string",
    ),
    # kubelet client certificates carry no SANs
    pytest.param(_P(csr_pem, extensions=[_SAN_DNS]), NODE, 400, "bad-csr", id="san-dns"),
    pytest.param(_P(csr_pem, extensions=[_SAN_IP]), NODE, 400, "bad-csr", id="san-ip"),
    # keys: ECDSA P-256/P-384, RSA 2048-4096 with e=65537, nothing else
    pytest.param(_P(csr_pem, key_type="rsa-1024"), NODE, 400, "weak-key", id="weak-key-rsa-1024"),
    pytest.param(_P(csr_pem, key_type="rsa-2047"), NODE, 400, "weak-key", id="weak-key-rsa-2047"),
    pytest.param(_P(csr_pem, key_type="rsa-4097"), NODE, 400, "weak-key", id="weak-key-rsa-4097"),
    pytest.param(_P(csr_pem, key_type="rsa-2048-e3"), NODE, 400, "weak-key", id="weak-key-rsa-exponent-3"),
    pytest.param(_P(csr_pem, key_type="ec-p521"), NODE, 400, "weak-key", id="weak-key-ec-p521"),
    pytest.param(_P(csr_pem, key_type="ec-p224"), NODE, 400, "weak-key", id="weak-key-ec-p224"),
    pytest.param(_P(csr_pem, key_type="ec-secp256k1"), NODE, 400, "weak-key", id="weak-key-ec-secp256k1"),
    pytest.param(_P(csr_pem, key_type="ed25519"), NODE, 400, "weak-key", id="weak-key-ed25519"),
    pytest.param(_P(csr_pem, key_type="ed448"), NODE, 400, "weak-key", id="weak-key-ed448"),
    pytest.param(_P(csr_pem, key_type="dsa-2048"), NODE, 400, "weak-key", id="weak-key-dsa-2048"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "who", "status", "code"), KUBELET_CASES)
def test_kubelet_csr(
    body: Callable[[], bytes], who: str | None, status: int, code: str | None
) -> None:
    """Each kubelet CSR rule gives SPEC's status and code; accepted CSRs build allow-listed certificates."""
    csr = body()
    decision = policy.decide(csr, ident(who) if who is not None else None, KUBELET)
    assert (decision.status, decision.code) == (status, code), decision.message
    if code is not None:
        assert not decision.accepted and decision.public_key is None and decision.message
        return
    assert decision.accepted and decision.node == who and decision.public_key is not None
    assert pki.same_public_key(decision.public_key, _csr_public_key(csr))
    cert = build(make_signing_ca(), csr, node=who or "")
    assert_allow_listed(cert, decision.public_key)
    assert not any(extension.oid == UNKNOWN_OID for extension in cert.extensions)


@pytest.mark.parametrize(
    ("key_type", "hash_name"),
    [("rsa-2048", "sha1"), ("rsa-2048", "md5"), ("ec-p256", "sha1")],
    ids=["sha1-rsa", "md5-rsa", "sha1-ecdsa"],
)
def test_weak_hash_is_refused_for_the_hash(key_type: str, hash_name: str) -> None:
    """A genuinely signed SHA-1 or MD5 CSR is bad-csr and the message names the hash."""
    der = signed_request(make_csr(key_type=key_type).tbs_certrequest_bytes, key_type, hash_name)
    csr = x509.load_der_x509_csr(der)
    private = key(key_type)
    if isinstance(private, rsa.RSAPrivateKey):  # the fixture's own proof that the signature is real
        private.public_key().verify(
            csr.signature, csr.tbs_certrequest_bytes, padding.PKCS1v15(), _HASHES[hash_name]
        )
    else:
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        private.public_key().verify(
            csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(_HASHES[hash_name])
        )
    decision = policy.decide(armour(der), ident(), KUBELET)
    assert (decision.status, decision.code) == (400, "bad-csr")
    assert hash_name in decision.message


# -- decide(): identity CSRs ---------------------------------------------------------------

IDENTITY_CASES = [
    pytest.param(_P(csr_pem, subject=IDENTITY_NAME), NODE, 201, None, id="identity-subject"),
    pytest.param(_P(csr_pem, subject=name((CN, NODE_253))), NODE_253, 201, None, id="node-name-253-chars"),
    pytest.param(_P(csr_pem, subject=IDENTITY_NAME), None, 401, "unauthenticated", id="no-identity"),
    pytest.param(_P(csr_pem, subject=IDENTITY_NAME), OTHER_NODE, 403, "forbidden-node", id="identity-other-node"),
    pytest.param(_P(csr_pem, subject=KUBELET_NAME), NODE, 400, "bad-csr", id="kubelet-subject"),
    pytest.param(_P(csr_pem, subject=name((O, NODES_GROUP), (CN, NODE))), NODE, 400, "bad-csr", id="extra-o"),
    pytest.param(_P(csr_pem, subject=name((OU, "nodes"), (CN, NODE))), NODE, 400, "bad-csr", id="extra-ou"),
    pytest.param(_P(csr_pem, subject=name((CN, OTHER_NODE), (CN, NODE))), NODE, 400, "bad-csr", id="two-cns"),
    pytest.param(_P(csr_pem, subject=name((O, NODE))), NODE, 400, "bad-csr", id="o-only"),
    pytest.param(_P(csr_pem, subject=x509.Name([])), NODE, 400, "bad-csr", id="subject-empty"),
    pytest.param(_P(csr_pem, subject=name((CN, NODE_CN))), NODE, 400, "bad-csr", id="cn-with-node-prefix"),
    pytest.param(_P(csr_pem, subject=name((CN, NODE.upper()))), NODE.upper(), 400, "bad-csr", id="cn-uppercase"),
    pytest.param(_P(csr_pem, subject=name((CN, NODE_254))), NODE_254, 400, "bad-csr", id="cn-254-chars"),
    pytest.param(_P(csr_pem, subject=name((CN, "node_1.example"))), "node_1.example", 400, "bad-csr", id="cn-invalid-dns"),
    pytest.param(
        _P(csr_pem, subject=x509.Name([x509.RelativeDistinguishedName([
            x509.NameAttribute(OU, "nodes"), x509.NameAttribute(CN, NODE)
        ])])),
        NODE, 400, "bad-csr", id="multi-valued-rdn",
    ),
    pytest.param(_P(csr_pem, subject=IDENTITY_NAME, key_type="ed25519"), NODE, 400, "weak-key", id="weak-key-ed25519"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "who", "status", "code"), IDENTITY_CASES)
def test_identity_csr(
    body: Callable[[], bytes], who: str | None, status: int, code: str | None
) -> None:
    """An identity CSR's subject is exactly CN=<node> of the asking node; anything else is refused."""
    decision = policy.decide(body(), ident(who) if who is not None else None, IDENTITY)
    assert (decision.status, decision.code) == (status, code), decision.message
    assert decision.accepted == (code is None)
    if decision.accepted:
        assert decision.node == who


@pytest.mark.parametrize(
    ("via", "kind", "allowed"),
    [
        pytest.param(IDENTITY, KUBELET, True, id="identity-cert-asks-kubelet"),
        pytest.param(KUBELET, KUBELET, True, id="kubelet-cert-asks-kubelet"),
        pytest.param(IDENTITY, IDENTITY, True, id="identity-cert-asks-identity"),
        pytest.param("token", IDENTITY, True, id="token-asks-identity"),
        pytest.param(
            KUBELET, IDENTITY, False, id="kubelet-cert-asks-identity",
        ),
        pytest.param(
            "token", KUBELET, False, id="token-asks-kubelet",
        ),
    ],
)  # fmt: skip
def test_authentication_kind_may_ask_for(via: str, kind: str, allowed: bool) -> None:
    """Only the authentications SPEC's API table lists may obtain each kind of certificate."""
    subject = KUBELET_NAME if kind == KUBELET else IDENTITY_NAME
    decision = policy.decide(csr_pem(subject=subject), ident(via=via), kind)
    assert decision.accepted == allowed, decision.message


# -- authenticate() ------------------------------------------------------------------------


@pytest.fixture
def authorities() -> dict[str, Issued]:
    """Two cluster CAs (rotation), the identity CA, and strangers named like each of them."""
    return {
        "cluster": make_ca("kube-ca"),
        "second-cluster": make_ca("kube-ca-2027"),
        "identity": make_ca("kubecertd-identity-ca"),
        "stranger-cluster": make_ca("kube-ca"),
        "stranger-identity": make_ca("kubecertd-identity-ca"),
    }


def authenticate(
    peer: x509.Certificate | None, cas: dict[str, Issued], now: dt.datetime = NOW
) -> Identity | None:
    clusters = [cas["cluster"].cert, cas["second-cluster"].cert]
    return policy.authenticate(peer, clusters, cas["identity"].cert, now)


AUTH_CASES = [
    pytest.param("identity", [NODE], [], [CLIENT_AUTH], IDENTITY, id="identity-cert"),
    pytest.param("identity", [NODE], [], [SERVER_AUTH, CLIENT_AUTH], IDENTITY, id="identity-cert-server-and-client"),
    pytest.param("identity", [NODE], [], None, None, id="identity-cert-without-eku"),
    pytest.param("identity", [NODE], [], [SERVER_AUTH], None, id="identity-cert-server-auth-only"),
    pytest.param("identity", [NODE], [NODES_GROUP], [CLIENT_AUTH], None, id="identity-cert-extra-o"),
    pytest.param("identity", [OTHER_NODE, NODE], [], [CLIENT_AUTH], None, id="identity-cert-two-cns"),
    pytest.param("identity", [NODE.upper()], [], [CLIENT_AUTH], None, id="identity-cert-invalid-node"),
    pytest.param("identity", [NODE_CN], [NODES_GROUP], [CLIENT_AUTH], None, id="kubelet-cert-from-identity-ca"),
    pytest.param("stranger-identity", [NODE], [], [CLIENT_AUTH], None, id="identity-cert-from-unknown-ca"),
    pytest.param("cluster", [NODE], [], [CLIENT_AUTH], None, id="identity-cert-from-cluster-ca"),
    pytest.param("cluster", [NODE_CN], [NODES_GROUP], [CLIENT_AUTH], KUBELET, id="kubelet-cert"),
    pytest.param("second-cluster", [NODE_CN], [NODES_GROUP], [CLIENT_AUTH], KUBELET, id="kubelet-cert-from-second-cluster-ca"),
    pytest.param("cluster", [NODE_CN], [NODES_GROUP, "system:masters"], [CLIENT_AUTH], None, id="kubelet-cert-extra-o-system-masters"),
    pytest.param("cluster", [NODE_CN], ["system:masters"], [CLIENT_AUTH], None, id="kubelet-cert-o-system-masters"),
    pytest.param("cluster", [NODE_CN], [], [CLIENT_AUTH], None, id="kubelet-cert-without-o"),
    pytest.param("cluster", [OTHER_CN, NODE_CN], [NODES_GROUP], [CLIENT_AUTH], None, id="kubelet-cert-two-cns"),
    pytest.param("cluster", [NODE], [NODES_GROUP], [CLIENT_AUTH], None, id="kubelet-cert-cn-without-prefix"),
    pytest.param("cluster", [NODE_CN], [NODES_GROUP], [SERVER_AUTH], None, id="kubelet-cert-server-auth-only"),
    pytest.param(
        "cluster", [NODE_CN], [NODES_GROUP], None, KUBELET, id="kubelet-cert-without-eku",
    ),
    pytest.param(
        "cluster", [NODE_CN], [NODES_GROUP], [ANY_EKU], KUBELET, id="kubelet-cert-any-eku",
    ),
    pytest.param("stranger-cluster", [NODE_CN], [NODES_GROUP], [CLIENT_AUTH], None, id="kubelet-cert-from-unknown-ca"),
]  # fmt: skip


@pytest.mark.parametrize(("issuer", "cns", "orgs", "eku", "via"), AUTH_CASES)
def test_authenticate(
    authorities: dict[str, Issued],
    issuer: str,
    cns: list[str],
    orgs: list[str],
    eku: list[x509.ObjectIdentifier] | None,
    via: str | None,
) -> None:
    """A client certificate speaks for a node only from the right CA with the right subject and EKU."""
    peer = issue(authorities[issuer], cn_list=cns, orgs=orgs, eku=eku).cert
    expected = Identity(NODE, via, pki.serial_hex(peer)) if via else None
    assert authenticate(peer, authorities) == expected


def test_authenticate_without_peer(authorities: dict[str, Issued]) -> None:
    """No client certificate is no identity."""
    assert authenticate(None, authorities) is None


@pytest.mark.parametrize("kind", [IDENTITY, KUBELET])
@pytest.mark.parametrize(
    ("moment", "valid"),
    [
        pytest.param(CERT_NOT_BEFORE - SECOND, False, id="before-not-before"),
        pytest.param(CERT_NOT_BEFORE, True, id="at-not-before"),
        pytest.param(CERT_NOT_BEFORE + SECOND, True, id="after-not-before"),
        pytest.param(CERT_NOT_AFTER - SECOND, True, id="before-not-after"),
        pytest.param(CERT_NOT_AFTER, True, id="at-not-after"),
        pytest.param(CERT_NOT_AFTER + SECOND, False, id="after-not-after"),
    ],
)
def test_authenticate_validity(
    authorities: dict[str, Issued], kind: str, moment: dt.datetime, valid: bool
) -> None:
    """A client certificate authenticates exactly within [notBefore, notAfter], to the second."""
    if kind == IDENTITY:
        peer = issue(authorities["identity"], cn_list=[NODE], orgs=[]).cert
    else:
        peer = issue(authorities["cluster"]).cert
    result = authenticate(peer, authorities, now=moment)
    assert result == (Identity(NODE, kind, pki.serial_hex(peer)) if valid else None)


# -- build_certificate() -------------------------------------------------------------------


@pytest.mark.parametrize("kind", [KUBELET, IDENTITY])
@pytest.mark.parametrize("key_type", ACCEPTED_KEYS)
def test_built_certificate(key_type: str, kind: str) -> None:
    """Every field of an issued certificate is the signer's: subject, issuer, dates, serial, extensions."""
    ca = make_signing_ca()
    subject = KUBELET_NAME if kind == KUBELET else IDENTITY_NAME
    csr = csr_pem(subject=subject, key_type=key_type)
    serial = policy.random_serial()
    cert = build(ca, csr, kind=kind, serial=serial)
    public_key = key(key_type).public_key()

    if kind == KUBELET:
        assert cert.subject == pki.kubelet_subject(NODE)
        assert cert.subject.rfc4514_string() == f"O=system:nodes,CN=system:node:{NODE}"  # SPEC
    else:
        assert cert.subject.rfc4514_string() == f"CN={NODE}"
    assert cert.issuer == ca.cert.subject
    assert cert.version == x509.Version.v3
    assert pki.same_public_key(cert.public_key(), public_key)  # type: ignore[arg-type]
    assert_allow_listed(cert, public_key)  # type: ignore[arg-type]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_encipherment == isinstance(public_key, rsa.RSAPublicKey)
    assert not (usage.content_commitment or usage.data_encipherment or usage.key_agreement)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski_of(ca.cert)
    assert cert.serial_number == serial and serial > 0 and serial.bit_length() > 63
    assert cert.not_valid_before_utc == NOW - dt.timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + LIFETIME
    cert.verify_directly_issued_by(ca.cert)


@pytest.mark.parametrize("ca_key", ["ec-p256", "ec-p384", "rsa-3072"])
def test_built_certificate_verifies_under_each_ca_key(ca_key: str) -> None:
    """The certificate's signature verifies under CAs with P-256, P-384 and RSA keys."""
    ca = make_signing_ca(key_type=ca_key)
    build(ca, csr_pem()).verify_directly_issued_by(ca.cert)


def test_aki_of_a_ca_without_ski() -> None:
    """A CA without an SKI still gets an AKI: the SHA-1 key identifier of its public key."""
    ca = make_ca()
    with pytest.raises(x509.ExtensionNotFound):
        ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert = build(ca, csr_pem())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    expected = x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key()).digest  # type: ignore[arg-type]
    assert aki.key_identifier == expected
    cert.verify_directly_issued_by(ca.cert)


@pytest.mark.parametrize("lifetime", [LIFETIME, dt.timedelta(days=365)], ids=["30d", "365d"])
@pytest.mark.parametrize(
    "offset",
    [-SECOND, dt.timedelta(0), SECOND],
    ids=["ca-ends-1s-sooner", "ca-ends-same", "ca-ends-1s-later"],
)
def test_not_after_is_capped_at_the_ca(lifetime: dt.timedelta, offset: dt.timedelta) -> None:
    """notAfter is now + lifetime, or the CA's own notAfter when that comes sooner."""
    ca = make_signing_ca(not_after=NOW + lifetime + offset)
    cert = build(ca, csr_pem(), lifetime=lifetime)
    assert cert.not_valid_after_utc == min(NOW + lifetime, NOW + lifetime + offset)
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc


def node_of_length(length: int) -> str:
    """A valid DNS-1123 subdomain of exactly ``length`` characters (labels of at most 63)."""
    labels, rest = [], length
    while rest > 63:
        labels.append("n" * min(63, rest - 2))
        rest -= len(labels[-1]) + 1
    return ".".join([*labels, "n" * rest])


# (kind, node name length): either side of where the CN reaches 64 characters, and 253.
LONG_NAMES = [
    pytest.param(KUBELET, 52, id="kubelet-52"),
    pytest.param(KUBELET, 53, id="kubelet-53"),
    pytest.param(KUBELET, 253, id="kubelet-253"),
    pytest.param(IDENTITY, 64, id="identity-64"),
    pytest.param(IDENTITY, 65, id="identity-65"),
    pytest.param(IDENTITY, 253, id="identity-253"),
]  # fmt: skip


def _long_name_csr(kind: str, node: str) -> bytes:
    return csr_pem(subject=kubelet_name(node) if kind == KUBELET else name((CN, node)))


@pytest.mark.parametrize(("kind", "length"), [pytest.param(*p.values, id=p.id) for p in LONG_NAMES])
def test_long_node_names_are_accepted(kind: str, length: int) -> None:
    """Node names up to 253 characters are accepted, past RFC 5280's 64-character CN bound."""
    node = node_of_length(length)
    assert len(node) == length
    decision = policy.decide(_long_name_csr(kind, node), ident(node), kind)
    assert decision.accepted and decision.node == node, decision.message


@pytest.mark.parametrize(("kind", "length"), LONG_NAMES)
def test_long_node_names_are_issued(kind: str, length: int) -> None:
    """A certificate is built for node names up to 253 characters, the CN carrying the whole name."""
    node = node_of_length(length)
    ca = make_signing_ca()
    cert = build(ca, _long_name_csr(kind, node), kind=kind, node=node)
    expected = f"system:node:{node}" if kind == KUBELET else node
    assert pki.common_names(cert.subject) == [expected]
    cert.verify_directly_issued_by(ca.cert)


def test_random_serial() -> None:
    """Random serials are positive, below 2**159, at least 64 bits long and distinct."""
    serials = [policy.random_serial() for _ in range(100)]
    assert all(0 < serial < 2**159 for serial in serials)
    assert sum(serial >= 2**64 for serial in serials) >= 99  # each fails with p = 2**-95
    assert len(set(serials)) == len(serials)


# -- the real openssl ----------------------------------------------------------------------

OPENSSL_CASES = [
    pytest.param("ec-p256", "ec-p256", KUBELET, LIFETIME, id="p256-leaf-p256-ca"),
    pytest.param("rsa-2048", "rsa-3072", KUBELET, LIFETIME, id="rsa-leaf-rsa-ca"),
    pytest.param("ec-p384", "ec-p384", KUBELET, LIFETIME, id="p384-leaf-p384-ca"),
    pytest.param("rsa-4096", "ec-p256", IDENTITY, dt.timedelta(days=365), id="identity-cert"),
    pytest.param("ec-p256", "ec-p256", KUBELET, dt.timedelta(days=36500), id="capped-at-ca"),
]


def openssl_verify(
    tmp_path: Path, ca: Issued, cert: x509.Certificate, purpose: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(PEM))
    return subprocess.run(
        [
            "openssl", "verify", "-x509_strict", "-purpose", purpose,
            "-attime", str(int(NOW.timestamp())),
            "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "cert.pem"),
        ],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize(("leaf_key", "ca_key", "kind", "lifetime"), OPENSSL_CASES)
def test_openssl_verifies_for_client_auth(
    tmp_path: Path, leaf_key: str, ca_key: str, kind: str, lifetime: dt.timedelta
) -> None:
    """openssl verify -x509_strict -purpose sslclient accepts issued certificates, sslserver does not."""
    ca = make_signing_ca(key_type=ca_key)
    subject = KUBELET_NAME if kind == KUBELET else IDENTITY_NAME
    cert = build(ca, csr_pem(subject=subject, key_type=leaf_key), kind=kind, lifetime=lifetime)
    client = openssl_verify(tmp_path, ca, cert, "sslclient")
    assert client.returncode == 0, client.stdout + client.stderr
    assert client.stdout.strip().endswith("cert.pem: OK")
    server = openssl_verify(tmp_path, ca, cert, "sslserver")
    assert server.returncode != 0, server.stdout


# -- properties ----------------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PEM_LABELS = [
    "CERTIFICATE REQUEST",
    "NEW CERTIFICATE REQUEST",
    "CERTIFICATE",
    "PRIVATE KEY",
    "PUBLIC KEY",
    "",
]
BASE64_JUNK = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n -", max_size=600
)


@functools.cache
def golden() -> x509.CertificateSigningRequest:
    return make_csr()


@st.composite
def pem_junk(draw: st.DrawFn) -> bytes:
    """PEM armour (sometimes two blocks, sometimes with text around) over undecodable bodies."""
    der = golden().public_bytes(DER)
    body = draw(
        st.one_of(
            st.binary(max_size=600),
            st.binary(max_size=600).map(lambda junk: _tlv(0x30, junk)),  # DER-looking junk
            st.integers(0, len(der) - 1).map(lambda cut: der[:cut]),  # a truncated CSR
        )
    )
    label = draw(st.sampled_from(PEM_LABELS))
    if draw(st.booleans()):
        block = armour(body, label)
    else:
        junk = draw(BASE64_JUNK).encode()
        block = f"-----BEGIN {label}-----\n".encode() + junk + f"\n-----END {label}-----\n".encode()
    before = draw(st.sampled_from([b"", b"junk\n", armour(b"\x30\x00", "CERTIFICATE")]))
    after = draw(st.sampled_from([b"", b"\n\n", b"-----END CERTIFICATE REQUEST-----\n"]))
    return before + block + after


@pytest.mark.parametrize("kind", [KUBELET, IDENTITY])
@FUZZ
@given(data=st.binary(max_size=4096))
def test_any_bytes_are_refused_not_a_crash(kind: str, data: bytes) -> None:
    """Any bytes as a CSR give a 400 refusal, never an exception."""
    check_refused(policy.decide(data, ident(), kind))


@pytest.mark.parametrize("kind", [KUBELET, IDENTITY])
@FUZZ
@given(data=pem_junk())
def test_pem_armoured_junk_is_refused_not_a_crash(kind: str, data: bytes) -> None:
    """PEM armour around junk, truncated CSRs or extra blocks gives a 400 refusal, never an exception."""
    check_refused(policy.decide(data, ident(), kind))


@st.composite
def flipped_golden(draw: st.DrawFn) -> bytes:
    """The golden CSR with one byte of its signed request info or its signature value changed.

    The BIT STRING's unused-bits byte is left alone: cryptography accepts 1 or 2 there
    when the signature's last bits are zero, and the signed bytes are then unchanged.
    """
    csr = golden()
    der = csr.public_bytes(DER)
    start, signature = der.index(csr.tbs_certrequest_bytes), len(der) - len(csr.signature)
    positions = [*range(start, start + len(csr.tbs_certrequest_bytes)), *range(signature, len(der))]
    position = draw(st.sampled_from(positions))
    changed = bytearray(der)
    changed[position] ^= draw(st.integers(1, 255))
    return armour(bytes(changed))


@FUZZ
@given(data=flipped_golden())
def test_one_changed_byte_is_never_accepted(data: bytes) -> None:
    """Changing any one byte of what the golden CSR's signature covers, or of the signature, is refused."""
    check_refused(policy.decide(data, ident(), KUBELET))


@st.composite
def resigned_golden(draw: st.DrawFn) -> bytes:
    """The golden request info with one byte changed, validly signed again by the same key."""
    tbs = bytearray(golden().tbs_certrequest_bytes)
    tbs[draw(st.integers(0, len(tbs) - 1))] ^= draw(st.integers(1, 255))
    return armour(signed_request(bytes(tbs)))


@settings(FUZZ, derandomize=True)
@given(data=resigned_golden())
def test_validly_signed_odd_requests_never_crash(data: bytes) -> None:
    """A genuinely signed CSR with any one byte of its request info changed gets a Decision, never an exception."""
    decision = policy.decide(data, ident(), KUBELET)
    assert (decision.status, decision.code) in {*REFUSALS, (201, None), (403, "forbidden-node")}
