"""X.509 helpers shared by the agent and the signer, all on pyca/cryptography.

Pure functions over bytes and certificate objects: parsing PEM or DER, naming the
node a certificate is for, comparing public keys, generating keys and CSRs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

# cryptography warns each time it parses a CN over 64 characters; such names are legal
# node names (see _common_name), so the warning is noise in both programs' logs.
warnings.filterwarnings("ignore", message="Attribute's length must be", category=UserWarning)

# cryptography.hazmat.primitives.serialization is a package whose __init__ imports its
# SSH module and, through that, dataclasses and inspect: 20-25 ms of every `kubecertd
# --check` and 1.3 MiB of the agent's memory (BENCHMARKS.md).  What kubecertd needs of
# it, the package re-exports from the two modules below (cryptography 42-50; a test pins
# that they are the same objects), so they are imported from there.
try:
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl
    from cryptography.hazmat.primitives._serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    _load_pem_key = _rust_openssl.keys.load_pem_private_key
    _load_der_key = _rust_openssl.keys.load_der_private_key
except (ImportError, AttributeError):  # pragma: no cover - another cryptography layout
    from cryptography.hazmat.primitives import serialization as _serialization
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    _load_pem_key = _serialization.load_pem_private_key
    _load_der_key = _serialization.load_der_private_key

NODE_PREFIX = "system:node:"
NODES_GROUP = "system:nodes"
STRONG_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM file, or the one in a DER file; ValueError if none.

    cryptography checks the outer structure at load time but decodes names,
    extensions and the public key lazily, so a corrupted field would raise later,
    anywhere.  Each certificate is decoded fully here: past this point it is sound.
    """
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
        for cert in certs:
            _decode_fully(cert)
    except ValueError:
        raise
    except Exception as exc:  # InvalidVersion, UnsupportedAlgorithm, ...: all mean "not usable"
        raise ValueError(str(exc) or type(exc).__name__) from exc
    return certs


def _decode_fully(cert: x509.Certificate) -> None:
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    list(cert.extensions)
    cert.public_key()
    cert.not_valid_before_utc  # noqa: B018 - decoding is the point
    cert.not_valid_after_utc  # noqa: B018


def load_private_key(data: bytes) -> PrivateKeyTypes:
    """A PEM or DER private key without a password; ValueError otherwise.

    An encrypted key is refused with its own message: kubelet cannot use it either.
    """
    if b"ENCRYPTED" in data:
        raise ValueError("the key is encrypted; kubelet needs an unencrypted key")
    try:
        load = _load_pem_key if b"-----BEGIN" in data else _load_der_key
        return load(data, None, unsafe_skip_rsa_key_validation=False)
    except TypeError as exc:  # "Password was not given but private key is encrypted"
        raise ValueError("the key is encrypted; kubelet needs an unencrypted key") from exc
    except Exception as exc:  # cryptography raises assorted errors on garbage
        if isinstance(exc, ValueError):
            raise
        raise ValueError(str(exc) or type(exc).__name__) from exc


def common_names(name: x509.Name) -> list[str]:
    return [str(attr.value) for attr in name.get_attributes_for_oid(NameOID.COMMON_NAME)]


def organizations(name: x509.Name) -> list[str]:
    return [str(attr.value) for attr in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]


def node_of(cert: x509.Certificate) -> str | None:
    """The node the API server would see this certificate as (Go keeps the last CN)."""
    names = common_names(cert.subject)
    if names and names[-1].startswith(NODE_PREFIX):
        return names[-1][len(NODE_PREFIX) :]
    return None


def serial_hex(cert: x509.Certificate) -> str:
    """SPEC's serial format: lowercase hexadecimal, no separators."""
    return format(cert.serial_number, "x")


def iso(moment: dt.datetime) -> str:
    """SPEC's time format: UTC ISO 8601 with a ``Z``, whole seconds."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def spki_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def same_public_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    """The same key: cryptography compares public keys by value (and by type)."""
    return a == b


def key_fingerprint(key: PublicKeyTypes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo, lowercase hex (for audit records)."""
    return hashlib.sha256(spki_der(key)).hexdigest()


def describe_key(key: PublicKeyTypes | PrivateKeyTypes) -> str:
    """``"ECDSA P-256"``, ``"RSA 2048"``, ..."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"ECDSA {_CURVE_NAMES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, dsa.DSAPrivateKey | dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    return type(key).__name__.lstrip("_").replace("PrivateKey", "").replace("PublicKey", "")


def weakness(key: PublicKeyTypes | PrivateKeyTypes) -> str | None:
    """Why a key is weak for a kubelet client certificate, or None (SPEC ``key-weak``)."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey) and key.key_size < 2048:
        return f"RSA key of {key.key_size} bits is below 2048"
    if isinstance(key, dsa.DSAPrivateKey | dsa.DSAPublicKey):
        return "DSA keys are deprecated and unsupported by Kubernetes"
    if (
        isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey)
        and key.curve.name not in STRONG_CURVES
    ):
        return f"EC curve {key.curve.name} is not P-256, P-384 or P-521"
    return None


def is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True when ``ca``'s subject is ``cert``'s issuer and ``ca``'s key signed it.

    cryptography's ``verify_directly_issued_by`` checks both; validity dates are
    judged elsewhere, as SPEC's ``cert-untrusted`` asks.
    """
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError all mean "no"
        return False
    return True


def allows_client_auth(cert: x509.Certificate) -> bool:
    """Go's rule: no EKU extension, clientAuth or anyExtendedKeyUsage allow client auth."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    allowed = {
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
        x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    }
    return any(usage in allowed for usage in usages)


def key_usage(
    *,
    digital_signature: bool = True,
    key_encipherment: bool = False,
    signs_certificates: bool = False,
) -> x509.KeyUsage:
    """keyUsage with only the bits named set (CAs: certificates and CRLs)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def generate_key(kind: str) -> PrivateKeyTypes:
    """A fresh private key of a SPEC ``key_type`` (``ecdsa-p256``, ``rsa-3072``, ...)."""
    family, _, size = kind.partition("-")
    if family == "ecdsa":
        curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[size]
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=int(size))


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(Encoding.PEM)


def build_csr(key: PrivateKeyTypes, subject: x509.Name) -> x509.CertificateSigningRequest:
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TypeError(f"cannot sign a CSR with {describe_key(key)}")
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def _common_name(value: str) -> x509.NameAttribute[str]:
    # Kubernetes node names go up to 253 characters, past RFC 5280's 64 for a CN; Go and
    # the API server accept such certificates, so the upper bound check is skipped here.
    return x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=False)


def kubelet_subject(node: str) -> x509.Name:
    """``CN=system:node:<node>, O=system:nodes`` as the Node authorizer wants it."""
    # CN first, so that rfc4514_string() prints "O=system:nodes,CN=system:node:..." as SPEC shows
    return x509.Name(
        [
            _common_name(NODE_PREFIX + node),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, NODES_GROUP),
        ]
    )


def identity_subject(node: str) -> x509.Name:
    return x509.Name([_common_name(node)])
