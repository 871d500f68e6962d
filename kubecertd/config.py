"""The agent's configuration: a frozen value from a pure loader (SPEC "Configuration").

Each section is a ``NamedTuple`` whose settings are annotated with a kind of setting,
as in ``ca: NonEmpty = "ca.pem"``.  A kind is ``Annotated[type, converter]``, and a
converter is a small function that takes the raw TOML value and returns the typed one
or raises ``ValueError``.  The loader re-raises that as a ``ConfigError`` naming
``section.key`` and the file, so every mistake in a config file is one line that says
where it is.  A field whose default is itself a section is a nested TOML table; a field
without a converter (``source``) is not a setting.  The signer's configuration is built
from the same pieces (``kubecertd.signer.config``).

NamedTuples and not frozen dataclasses: ``kubecertd --check`` loads this module on
every run, and a dataclass ``exec``s its generated methods and imports ``inspect``,
which cost 20-30 ms of a 120 ms budget (BENCHMARKS.md).  The annotations are evaluated
(no ``from __future__ import annotations``) so that the loader can read them.
"""

import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NamedTuple, TypeVar

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


LAYOUTS = ("auto", "files", "kubeconfig", "kubeadm", "k3s", "rke2")


def layout_name(value: Any) -> str:
    text = string(value)
    if text not in LAYOUTS:
        raise ValueError(f"{text!r} is not one of {', '.join(LAYOUTS)}")
    return text


def restart_mode(value: Any) -> str:
    """``[kubelet] restart``: true, false, or "auto" (restart only when kubelet needs it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "auto":
        return "auto"
    raise ValueError(f'expected true, false or "auto", got {value!r}')


def version_text(value: Any) -> str:
    """A kubelet version such as "1.29.3" or "v1.30", or "" to ask ``kubelet --version``."""
    text = string(value).strip()
    if text and not re.fullmatch(r"v?\d+\.\d+(\.\d+)?([-+][0-9A-Za-z.+-]*)?", text):
        raise ValueError(f"{text!r} is not a version like 1.29.3")
    return text


def url(value: Any) -> str:
    """``https://host[:port][/prefix]``, or "" for none."""
    text = string(value)
    if not text:
        return text
    if not text.startswith("https://"):
        raise ValueError(f"{text!r} must start with https:// (the signer speaks only TLS)")
    from urllib.parse import urlsplit  # noqa: PLC0415 - only a config with a URL pays for it

    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} has a port that is not a number from 1 to 65535") from None
    if not parts.hostname or port == 0:
        raise ValueError(f"{text!r} is not an https://host[:port] URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r} must not carry a query, fragment or user name")
    return text.rstrip("/")


class ElementError(ValueError):
    """A bad element of an array setting: the loader names it ``key[index]``."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        self.index = index


def urls(value: Any) -> tuple[str, ...]:
    """One ``url`` or an array of them (signer replicas); "" is none, ``()``."""
    if isinstance(value, str):
        text = url(value)
        return (text,) if text else ()
    if not isinstance(value, list):
        raise ValueError(f"expected a string or an array of strings, got {_toml_type(value)}")
    if not value:
        raise ValueError('an empty array: give at least one https:// URL, or "" for none')
    found: list[str] = []
    for index, item in enumerate(value):
        try:
            text = url(item)
        except ValueError as exc:
            raise ElementError(index, str(exc)) from None
        if not text:
            raise ElementError(index, "must not be empty")
        if text in found:
            raise ElementError(index, f"{text!r} is listed twice")
        found.append(text)
    return tuple(found)


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


# The kinds of setting: the type for mypy, the converter for the loader.
String = Annotated[str, string]
NonEmpty = Annotated[str, nonempty]
Boolean = Annotated[bool, boolean]
Duration = Annotated[float, duration]
PositiveDuration = Annotated[float, positive_duration]
Fraction = Annotated[float, fraction]
Count = Annotated[int, count]
PositiveCount = Annotated[int, positive_count]
KeyType = Annotated[str, key_type]
NodeName = Annotated[str, node_name]
Urls = Annotated[tuple[str, ...], urls]
LayoutName = Annotated[str, layout_name]
RestartMode = Annotated[str, restart_mode]
Version = Annotated[str, version_text]


def build(
    cls: type[T], table: Mapping[str, Any], where: str, prefix: str = "", base: T | None = None
) -> T:
    """Fill section ``cls`` (starting from ``base``, else its defaults) from a TOML table.

    Unknown keys and bad values are ``ConfigError``s naming ``section.key`` and the file.
    """
    start: Any = cls() if base is None else base
    values: dict[str, Any] = {}
    for name, raw in table.items():
        dotted = f"{prefix}{name}"
        current = getattr(start, name) if name in start._fields else None
        convert = _converter(cls.__annotations__.get(name))
        if _is_section(current):
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: [{dotted}] must be a table")
            values[name] = build(type(current), raw, where, f"{dotted}.", current)
        elif convert is None:
            raise ConfigError(f"{where}: unknown setting {dotted}")
        elif isinstance(raw, dict):
            raise ConfigError(f"{where}: {dotted} is a setting, not a table")
        else:
            try:
                values[name] = convert(raw)
            except ValueError as exc:
                at = f"[{exc.index}]" if isinstance(exc, ElementError) else ""
                raise ConfigError(f"{where}: {dotted}{at}: {exc}") from exc
    return start._replace(**values)  # type: ignore[no-any-return]


def _converter(kind: Any) -> Converter | None:
    """The converter of a kind of setting (``Annotated[type, converter]``), else None."""
    metadata = getattr(kind, "__metadata__", ())
    return metadata[0] if metadata else None


def _is_section(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


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


class Files(NamedTuple):
    ca: NonEmpty = "ca.pem"
    cert: NonEmpty = "worker.pem"
    key: NonEmpty = "worker-key.pem"


class Policy(NamedTuple):
    key_type: KeyType = "ecdsa-p256"
    renew_fraction: Fraction = 0.7
    warn_fraction: Fraction = 0.8


class Signer(NamedTuple):
    url: Urls = ()  # the replicas; each node tries them in its own order (edges.client)
    ca: NonEmpty = "/etc/kubecertd/signer-ca.pem"
    identity_cert: NonEmpty = "/var/lib/kubecertd/identity.pem"
    identity_key: NonEmpty = "/var/lib/kubecertd/identity-key.pem"
    timeout: PositiveDuration = 10.0


class Kubelet(NamedTuple):
    unit: NonEmpty = "kubelet.service"
    restart: RestartMode = "auto"  # "true", "false" or "auto": only when kubelet needs it
    settle: Duration = 10.0
    max_restarts_per_hour: Count = 4
    config: String = ""  # KubeletConfiguration; "" = the --config of its unit
    version: Version = ""  # "" = ask `kubelet --version` (the unit's own binary)


class Daemon(NamedTuple):
    debounce: Duration = 1.0
    recheck: PositiveDuration = 300.0
    state_dir: NonEmpty = "/var/lib/kubecertd"
    backups: Count = 3
    audit_log: String = ""  # auditd's log, a second source of culprits; "" = not read


class Metrics(NamedTuple):
    textfile: String = ""


class Config(NamedTuple):
    node_name: NodeName = ""
    layout: LayoutName = ""  # "" until loaded: "files" when ssl_dir or [files] is set, else "auto"
    kubeconfig: String = ""  # kubelet's kubeconfig; "" = found from its unit
    ssl_dir: NonEmpty = "/etc/kubernetes/ssl"
    files: Files = Files()
    policy: Policy = Policy()
    signer: Signer = Signer()
    kubelet: Kubelet = Kubelet()
    daemon: Daemon = Daemon()
    metrics: Metrics = Metrics()
    source: str = "(defaults)"  # the file it came from, for messages
    given: frozenset[str] = frozenset()  # the settings the file sets (dotted), e.g. "kubelet.unit"

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
    table = parse_toml(text, where) if text is not None else {}
    config = build(Config, table, where)
    given = frozenset(_dotted(table))
    name = config.node_name or default_node_name(hostname)
    if not is_dns_subdomain(name):
        raise ConfigError(
            f"{where}: node_name: the hostname {hostname!r} is not a valid node name; set node_name"
        )
    # A config that names today's files keeps them (upgrades); otherwise find kubelet's.
    layout = config.layout or ("files" if given & {"ssl_dir", "files"} else "auto")
    return config._replace(node_name=name, source=where, given=given, layout=layout)


def _dotted(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every key a TOML table sets, sections included: ``files``, ``files.ca``, ..."""
    keys = []
    for name, value in table.items():
        keys.append(prefix + name)
        if isinstance(value, dict):
            keys += _dotted(value, f"{prefix}{name}.")
    return keys


def default_node_name(hostname: str) -> str:
    """kubelet's default node name: the hostname, trimmed and lowercased."""
    return hostname.strip().lower()


def read_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The thin I/O shell around ``load_config``."""
    environ = os.environ if env is None else env
    text, where = read_config_text(path, environ, "KUBECERTD_CONFIG", DEFAULT_CONFIG)
    return load_config(text, where, os.uname().nodename)  # what gethostname(2) returns
