"""pki's shortcuts around cryptography's serialization package are cryptography's own objects."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization

from kubecertd import pki


def test_key_loaders_and_encodings_are_the_public_ones() -> None:
    """What pki imports from cryptography's private modules is what the public package exports."""
    assert pki._load_pem_key is serialization.load_pem_private_key
    assert pki._load_der_key is serialization.load_der_private_key
    assert (pki.Encoding, pki.PrivateFormat, pki.PublicFormat, pki.NoEncryption) == (
        serialization.Encoding,
        serialization.PrivateFormat,
        serialization.PublicFormat,
        serialization.NoEncryption,
    )
