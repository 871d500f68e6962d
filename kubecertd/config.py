"""The agent's configuration: a frozen value from a pure loader (SPEC "Configuration").

Each setting is a dataclass field whose metadata names a converter: a small function
that takes the raw TOML value and returns the typed one or raises ``ValueError``.
The loader re-raises that as a ``ConfigError`` naming ``section.key`` and the file, so
every mistake in a config file is one line that says where it is.  The signer's
configuration is built from the same pieces (``kubecertd.signer.config``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from .errors import ConfigError

DEFAULT_CONFIG = "/etc/kubecertd/kubecertd.toml"
KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")

Converter = Callable[[Any], Any]
T = TypeVar("T")

# -- converters: raw TOML value -> typed value, or ValueError saying what is wrong ------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*")


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_toml_type(value)}")
    return value


def nonempty(value: Any) -> str:
    """A string that must not be empty (a file or unit name)."""
    text = string(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_toml_type(value)}")
    return value


MAX_DURATION = 100 * 365 * 86400.0  # beyond this a date overflows; no setting needs it


def duration(value: Any) -> float:
    """``"1.5s"`` -> 1.5; a number and one of the units ms, s, m, h, d."""
    text = string(value)
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (a number and a unit: ms, s, m, h, d)")
    seconds = float(match[1]) * _UNITS[match[2]]
    if seconds > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than 100 years")
    return seconds


def positive_duration(value: Any) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be longer than zero")
    return seconds


def fraction(value: Any) -> float:
    """A share of a lifetime, strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number between 0 and 1, got {_toml_type(value)}")
    if not 0 < value < 1:
        raise ValueError(f"{value} is not between 0 and 1")
    return float(value)


def count(value: Any) -> int:
    """A whole number, zero or more."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {_toml_type(value)}")
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def positive_count(value: Any) -> int:
    number = count(value)
    if number == 0:
        raise ValueError("must be at least 1")
    return number


def key_type(value: Any) -> str:
    text = string(value)
    if text not in KEY_TYPES:
        raise ValueError(f"{text!r} is not one of {', '.join(KEY_TYPES)}")
    return text


def node_name(value: Any) -> str:
    """A DNS-1123 subdomain, as kubelet's node name must be; "" means the hostname."""
    text = string(value)
    if text and not is_dns_subdomain(text):
        raise ValueError(f"{text!r} is not a valid node name (lowercase DNS-1123 subdomain)")
    return text


def url(value: Any) -> str:
    text = string(value)
    if text and not text.startswith("https://"):
        raise ValueError(f"{text!r} must start with https:// (the signer speaks only TLS)")
    return text.rstrip("/")


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def is_dns_subdomain(name: str) -> bool:
    """Kubernetes' IsDNS1123Subdomain: lowercase labels joined by dots, <= 253 chars."""
    return 0 < len(name) <= 253 and all(
        len(label) <= 63 and _DNS_LABEL.fullmatch(label) for label in name.split(".")
    )


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names |= {dict: "a table", list: "an array"}
    return names.get(type(value), type(value).__name__)


def setting(default: Any, convert: Converter) -> Any:
    """A dataclass field that the loader fills from TOML through ``convert``."""
    return field(default=default, metadata={"convert": convert})


def section(cls: type[T], **defaults: Any) -> Any:
    """A dataclass field holding a nested TOML table (``defaults`` override the class's)."""
    return field(default_factory=lambda: cls(**defaults), metadata={"section": cls})


def build(
    cls: type[T], table: Mapping[str, Any], where: str, prefix: str = "", base: T | None = None
) -> T:
    """Fill dataclass ``cls`` (starting from ``base``) from a TOML table.

    Unknown keys and bad values are ``ConfigError``s naming ``section.key`` and the file.
    """
    known = {f.name: f for f in fields(cls) if f.metadata}  # type: ignore[arg-type]
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {prefix}{key}")
    start = base if base is not None else cls()
    values: dict[str, Any] = {}
    for name, spec in known.items():
        if name not in table:
            continue
        raw, dotted = table[name], f"{prefix}{name}"
        if "section" in spec.metadata:
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: [{dotted}] must be a table")
            current = getattr(start, name)
            values[name] = build(spec.metadata["section"], raw, where, f"{dotted}.", current)
            continue
        if isinstance(raw, dict):
            raise ConfigError(f"{where}: {dotted} is a setting, not a table")
        try:
            values[name] = spec.metadata["convert"](raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: {dotted}: {exc}") from exc
    return replace(start, **values)  # type: ignore[type-var]


def parse_toml(text: str, where: str) -> dict[str, Any]:
    # Imported here: a node without a config file (all defaults) never pays for it.
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib  # noqa: PLC0415
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc


def read_config_text(
    path: str | None, env: Mapping[str, str], env_var: str, default: str
) -> tuple[str | None, str]:
    """Find and read the config file: ``(text or None for "all defaults", its path)``.

    A missing default file means all defaults; a missing file that the operator named
    (flag or environment) is an error.
    """
    named = path or env.get(env_var) or None
    where = named or default
    try:
        with open(where, encoding="utf-8") as stream:
            return stream.read(), where
    except FileNotFoundError as exc:
        if named is None:
            return None, where
        raise ConfigError(f"{where}: config file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{where}: cannot read config file: {reason}") from exc


# -- the agent's configuration ---------------------------------------------------------


@dataclass(frozen=True)
class Files:
    ca: str = setting("ca.pem", nonempty)
    cert: str = setting("worker.pem", nonempty)
    key: str = setting("worker-key.pem", nonempty)


@dataclass(frozen=True)
class Policy:
    key_type: str = setting("ecdsa-p256", key_type)
    renew_fraction: float = setting(0.7, fraction)
    warn_fraction: float = setting(0.8, fraction)


@dataclass(frozen=True)
class Signer:
    url: str = setting("", url)
    ca: str = setting("/etc/kubecertd/signer-ca.pem", nonempty)
    identity_cert: str = setting("/var/lib/kubecertd/identity.pem", nonempty)
    identity_key: str = setting("/var/lib/kubecertd/identity-key.pem", nonempty)
    timeout: float = setting(10.0, positive_duration)


@dataclass(frozen=True)
class Kubelet:
    unit: str = setting("kubelet.service", nonempty)
    restart: bool = setting(True, boolean)
    settle: float = setting(10.0, duration)
    max_restarts_per_hour: int = setting(4, count)


@dataclass(frozen=True)
class Daemon:
    debounce: float = setting(1.0, duration)
    recheck: float = setting(300.0, positive_duration)
    state_dir: str = setting("/var/lib/kubecertd", nonempty)
    backups: int = setting(3, count)


@dataclass(frozen=True)
class Metrics:
    textfile: str = setting("", string)


@dataclass(frozen=True)
class Config:
    node_name: str = setting("", node_name)
    ssl_dir: str = setting("/etc/kubernetes/ssl", nonempty)
    files: Files = section(Files)
    policy: Policy = section(Policy)
    signer: Signer = section(Signer)
    kubelet: Kubelet = section(Kubelet)
    daemon: Daemon = section(Daemon)
    metrics: Metrics = section(Metrics)
    source: str = field(default="(defaults)", compare=False)

    def _in_ssl_dir(self, name: str) -> str:
        return os.path.join(self.ssl_dir, name)  # an absolute name stays as it is

    @property
    def ca_path(self) -> str:
        return self._in_ssl_dir(self.files.ca)

    @property
    def cert_path(self) -> str:
        return self._in_ssl_dir(self.files.cert)

    @property
    def key_path(self) -> str:
        return self._in_ssl_dir(self.files.key)


def load_config(text: str | None, where: str, hostname: str) -> Config:
    """Pure: TOML text (None = all defaults) and the host name in, a ``Config`` out."""
    config = build(Config, parse_toml(text, where) if text is not None else {}, where)
    name = config.node_name or default_node_name(hostname)
    if not is_dns_subdomain(name):
        raise ConfigError(
            f"{where}: node_name: the hostname {hostname!r} is not a valid node name; set node_name"
        )
    return replace(config, node_name=name, source=where)


def default_node_name(hostname: str) -> str:
    """kubelet's default node name: the hostname, trimmed and lowercased."""
    return hostname.strip().lower()


def read_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The thin I/O shell around ``load_config``."""
    environ = os.environ if env is None else env
    text, where = read_config_text(path, environ, "KUBECERTD_CONFIG", DEFAULT_CONFIG)
    return load_config(text, where, os.uname().nodename)  # what gethostname(2) returns
