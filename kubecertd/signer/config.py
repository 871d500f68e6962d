"""The signer's configuration (SPEC "Central signer"), built like the agent's."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..config import (
    build,
    parse_toml,
    positive_count,
    positive_duration,
    read_config_text,
    section,
    setting,
    string,
)
from ..errors import ConfigError

DEFAULT_CONFIG = "/etc/kubecertd/signer.toml"
DEFAULT_DIR = "/etc/kubecertd/signer"


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as two PEM files."""

    cert: str = setting("", string)
    key: str = setting("", string)


@dataclass(frozen=True)
class Policy:
    cert_lifetime: float = setting(30 * 86400.0, positive_duration)
    identity_lifetime: float = setting(365 * 86400.0, positive_duration)
    token_ttl: float = setting(3600.0, positive_duration)
    max_issuances_per_node_per_hour: int = setting(10, positive_count)


def _pair(name: str) -> Pair:
    return Pair(cert=f"{DEFAULT_DIR}/{name}.pem", key=f"{DEFAULT_DIR}/{name}-key.pem")


def listen_address(value: object) -> str:
    """``HOST:PORT`` (``[::1]:8443`` for IPv6), port 1-65535."""
    text = string(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return text


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def database_url(value: object) -> str:
    text = string(value)
    if text and not text.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"{text!r} is not a postgresql:// URL")
    return text


@dataclass(frozen=True)
class SignerConfig:
    listen: str = setting("0.0.0.0:8443", listen_address)
    state: str = setting("/var/lib/kubecertd-signer/state.db", string)
    database_url: str = setting("", database_url)
    cluster_ca: Pair = section(Pair, **vars(_pair("ca")))
    identity_ca: Pair = section(Pair, **vars(_pair("identity-ca")))
    tls: Pair = section(Pair, **vars(_pair("signer")))
    policy: Policy = section(Policy)
    source: str = field(default="(defaults)", compare=False)


def load_signer_config(text: str | None, where: str) -> SignerConfig:
    """Pure: TOML text (None = all defaults) in, a ``SignerConfig`` out."""
    config = build(SignerConfig, parse_toml(text, where) if text is not None else {}, where)
    for name in ("cluster_ca", "identity_ca", "tls"):
        pair: Pair = getattr(config, name)
        if not pair.cert or not pair.key:
            raise ConfigError(f"{where}: [{name}] needs both cert and key")
    return replace(config, source=where)


def read_signer_config(path: str | None, env: Mapping[str, str] | None = None) -> SignerConfig:
    environ = os.environ if env is None else env
    text, where = read_config_text(path, environ, "KUBECERTD_SIGNER_CONFIG", DEFAULT_CONFIG)
    return load_signer_config(text, where)
