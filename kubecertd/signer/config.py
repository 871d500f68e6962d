"""The signer's configuration (SPEC "Central signer"), built like the agent's."""

import os
from collections.abc import Mapping
from typing import Annotated, NamedTuple

from ..config import (
    PositiveCount,
    PositiveDuration,
    String,
    build,
    parse_toml,
    read_config_text,
    string,
)
from ..errors import ConfigError

DEFAULT_CONFIG = "/etc/kubecertd/signer.toml"
DEFAULT_DIR = "/etc/kubecertd/signer"
# Where `init --dir /etc/kubecertd/signer` writes it and the shipped unit reads it: the
# commands read it when DEFAULT_CONFIG does not exist, so `token create` on the signer
# host sees the same database_url as the service without --config.
UNIT_CONFIG = f"{DEFAULT_DIR}/signer.toml"


class Pair(NamedTuple):
    """A certificate and its private key, as two PEM files."""

    cert: String = ""
    key: String = ""


class Policy(NamedTuple):
    cert_lifetime: PositiveDuration = 30 * 86400.0
    identity_lifetime: PositiveDuration = 365 * 86400.0
    token_ttl: PositiveDuration = 3600.0
    max_issuances_per_node_per_hour: PositiveCount = 10


class Limits(NamedTuple):
    """What one worker process spends on connections (``kubecertd.signer.listener``)
    and how long a request may wait for the state database.

    Each worker enforces these on its own, like its file limit: the whole signer holds
    up to ``workers`` times as many.  A worker also never holds more connections than
    its RLIMIT_NOFILE leaves room for, whatever ``max_connections`` says.
    """

    max_connections: PositiveCount = 512
    max_connections_per_address: PositiveCount = 32
    handshake_timeout: PositiveDuration = 10.0
    header_timeout: PositiveDuration = 10.0
    # How long a request waits for the state database (each commit, each read) before
    # the answer is 503 unavailable; a commit given up on is never recorded as issued.
    database_timeout: PositiveDuration = 5.0


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


ListenAddress = Annotated[str, listen_address]
DatabaseUrl = Annotated[str, database_url]


class SignerConfig(NamedTuple):
    listen: ListenAddress = "0.0.0.0:8443"
    state: String = "/var/lib/kubecertd-signer/state.db"
    database_url: DatabaseUrl = ""
    cluster_ca: Pair = _pair("ca")
    identity_ca: Pair = _pair("identity-ca")
    tls: Pair = _pair("signer")
    policy: Policy = Policy()
    limits: Limits = Limits()
    source: str = "(defaults)"  # the file it came from, for messages


def load_signer_config(text: str | None, where: str) -> SignerConfig:
    """Pure: TOML text (None = all defaults) in, a ``SignerConfig`` out."""
    config = build(SignerConfig, parse_toml(text, where) if text is not None else {}, where)
    for name in ("cluster_ca", "identity_ca", "tls"):
        pair: Pair = getattr(config, name)
        if not pair.cert or not pair.key:
            raise ConfigError(f"{where}: [{name}] needs both cert and key")
    return config._replace(source=where)


def read_signer_config(
    path: str | None, env: Mapping[str, str] | None = None, default: str | None = None
) -> SignerConfig:
    """--config, else $KUBECERTD_SIGNER_CONFIG, else DEFAULT_CONFIG, else UNIT_CONFIG."""
    environ = os.environ if env is None else env
    if default is None:
        default = DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else UNIT_CONFIG
    text, where = read_config_text(path, environ, "KUBECERTD_SIGNER_CONFIG", default)
    return load_signer_config(text, where)
