"""The agent's configuration against SPEC "Configuration"."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from kubecertd import config
from kubecertd.config import Config, load_config, read_config
from kubecertd.errors import ConfigError

WHERE = "/etc/kubecertd/kubecertd.toml"
HOST = "Server2277Z.Prod.JP.local"
REPO = Path(__file__).resolve().parent.parent

# SPEC's defaults, copied by hand (node_name is resolved from the hostname separately).
SPEC_DEFAULTS = {
    "layout": "auto",
    "kubeconfig": "",
    "ssl_dir": "/etc/kubernetes/ssl",
    "files": {"ca": "ca.pem", "cert": "worker.pem", "key": "worker-key.pem"},
    "policy": {"key_type": "ecdsa-p256", "renew_fraction": 0.7, "warn_fraction": 0.8},
    "signer": {
        "url": (),  # SPEC's "" (no signer): no replicas
        "ca": "/etc/kubecertd/signer-ca.pem",
        "identity_cert": "/var/lib/kubecertd/identity.pem",
        "identity_key": "/var/lib/kubecertd/identity-key.pem",
        "timeout": 10.0,
    },
    "kubelet": {
        "unit": "kubelet.service",
        "restart": "auto",
        "settle": 10.0,
        "max_restarts_per_hour": 4,
        "config": "",
        "version": "",
    },
    "daemon": {
        "debounce": 1.0,
        "recheck": 300.0,
        "state_dir": "/var/lib/kubecertd",
        "backups": 3,
        "audit_log": "",
    },
    "metrics": {"textfile": ""},
}

# SPEC's example configuration, verbatim.
SPEC_EXAMPLE = """\
node_name = ""                   # "" = kubelet's: --hostname-override, else the hostname
layout = "auto"                  # auto | files | kubeconfig | kubeadm | k3s | rke2
kubeconfig = ""                  # "" = the --kubeconfig of [kubelet] unit

[policy]
key_type = "ecdsa-p256"          # ecdsa-p256 | ecdsa-p384 | rsa-2048 | rsa-3072 | rsa-4096
renew_fraction = 0.7             # renew once this share of the lifetime has passed;
                                 # each node adds its own fixed jitter of up to 0.1
warn_fraction = 0.8              # --check warns (cert-expiring) past this share

[signer]
url = ""                         # e.g. "https://kubecertd-signer.example:8443"
ca = "/etc/kubecertd/signer-ca.pem"      # trust anchor for the signer's TLS certificate
identity_cert = "/var/lib/kubecertd/identity.pem"
identity_key = "/var/lib/kubecertd/identity-key.pem"
timeout = "10s"

[kubelet]
unit = "kubelet.service"
restart = "auto"                 # true | false | "auto": only when kubelet needs it
settle = "10s"                   # kubelet must still be active this long after a restart
max_restarts_per_hour = 4

[daemon]
debounce = "1s"                  # quiet time after the last file event before acting
recheck = "5m"                   # periodic full diagnosis (expiry produces no file event)
state_dir = "/var/lib/kubecertd"
backups = 3                      # earlier pairs kept under <ssl_dir>/.kubecertd-backup/

[metrics]
textfile = ""                    # e.g. "/var/lib/node_exporter/textfile_collector/kubecertd.prom"
"""


def settings_of(cfg: Config) -> dict[str, object]:
    """Every setting of a Config as nested dicts, without node_name and source."""
    values = _as_dicts(cfg)
    del values["node_name"], values["source"], values["given"]
    return values


def _as_dicts(section: tuple[object, ...]) -> dict[str, object]:
    fields = section._asdict()  # type: ignore[attr-defined]
    return {k: _as_dicts(v) if hasattr(v, "_asdict") else v for k, v in fields.items()}


def load(text: str | None, hostname: str = HOST) -> Config:
    return load_config(text, WHERE, hostname)


def config_error(text: str) -> str:
    """The message of the ConfigError that ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value)


# -- defaults ------------------------------------------------------------------------------


def test_defaults_equal_spec() -> None:
    """No config text gives SPEC's default for every key, and nothing else."""
    cfg = load(None)
    assert settings_of(cfg) == SPEC_DEFAULTS
    assert cfg.source == WHERE


def test_empty_file_equals_defaults() -> None:
    """An empty config file means all defaults."""
    assert load("") == load(None)


def test_spec_example_equals_defaults() -> None:
    """SPEC's commented example config loads and equals the defaults."""
    assert settings_of(load(SPEC_EXAMPLE)) == settings_of(load(None))


def test_default_paths() -> None:
    """The default files live in /etc/kubernetes/ssl."""
    cfg = load(None)
    assert (cfg.ca_path, cfg.cert_path, cfg.key_path) == (
        "/etc/kubernetes/ssl/ca.pem",
        "/etc/kubernetes/ssl/worker.pem",
        "/etc/kubernetes/ssl/worker-key.pem",
    )


def test_shipped_config_equals_defaults() -> None:
    """packaging/kubecertd.toml loads and equals the defaults (node_name aside)."""
    shipped = REPO / "packaging" / "kubecertd.toml"
    if not shipped.exists():
        pytest.skip("packaging/kubecertd.toml not written yet")
    cfg = load_config(shipped.read_text(encoding="utf-8"), str(shipped), HOST)
    assert settings_of(cfg) == SPEC_DEFAULTS


# -- node_name -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, 'node_name = ""'], ids=["absent", "empty"])
def test_node_name_defaults_to_lowercased_hostname(text: str | None) -> None:
    """An empty or absent node_name is kubelet's default, the lowercased hostname."""
    assert load(text).node_name == "server2277z.prod.jp.local"


def test_node_name_hostname_is_trimmed() -> None:
    """Surrounding whitespace in the hostname is not part of the node name."""
    assert load(None, hostname=" node-1\n").node_name == "node-1"


def test_node_name_explicit() -> None:
    """An explicit node_name wins over the hostname."""
    assert load('node_name = "worker-7.example"').node_name == "worker-7.example"


@pytest.mark.parametrize("name", ["Worker-7", "worker_7", "-worker", "a..b", "x" * 254])
def test_node_name_invalid(name: str) -> None:
    """A node_name that is not a lowercase DNS-1123 subdomain is an error naming node_name."""
    message = config_error(f'node_name = "{name}"')
    assert "node_name" in message
    assert WHERE in message


def test_node_name_invalid_hostname() -> None:
    """A hostname that cannot be a node name, with node_name unset, is an error naming node_name."""
    with pytest.raises(ConfigError, match="node_name"):
        load(None, hostname="bad_host")


# -- durations -------------------------------------------------------------------------------

DURATION_KEYS = [
    ("signer", "timeout"),
    ("kubelet", "settle"),
    ("daemon", "debounce"),
    ("daemon", "recheck"),
]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("500ms", 0.5), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("1.5s", 1.5)],
)
@pytest.mark.parametrize(("table", "key"), DURATION_KEYS, ids=[".".join(k) for k in DURATION_KEYS])
def test_duration_units(table: str, key: str, text: str, seconds: float) -> None:
    """Durations are a number and a unit (ms, s, m, h, d), converted to seconds."""
    cfg = load(f'[{table}]\n{key} = "{text}"\n')
    assert getattr(getattr(cfg, table), key) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ['"10"', '"10x"', "10", '""', '"-1s"', '"s"', '"1 week"', "true"])
@pytest.mark.parametrize(("table", "key"), DURATION_KEYS, ids=[".".join(k) for k in DURATION_KEYS])
def test_duration_invalid(table: str, key: str, raw: str) -> None:
    """A duration without a unit, with an unknown unit, or of the wrong type names its key."""
    message = config_error(f"[{table}]\n{key} = {raw}\n")
    assert f"{table}.{key}" in message
    assert WHERE in message


@pytest.mark.parametrize("key", ["timeout", "recheck"])
def test_positive_durations_refuse_zero(key: str) -> None:
    """A zero signer timeout or recheck interval is impossible and names its key."""
    table = "signer" if key == "timeout" else "daemon"
    assert f"{table}.{key}" in config_error(f'[{table}]\n{key} = "0s"\n')


# -- fractions and choices -----------------------------------------------------------------


@pytest.mark.parametrize("key", ["renew_fraction", "warn_fraction"])
@pytest.mark.parametrize("value", [0.5, 0.01, 0.99])
def test_fraction_valid(key: str, value: float) -> None:
    """A fraction strictly between 0 and 1 is accepted as given."""
    assert getattr(load(f"[policy]\n{key} = {value}\n").policy, key) == value


@pytest.mark.parametrize("key", ["renew_fraction", "warn_fraction"])
@pytest.mark.parametrize(
    "raw", ["0", "1", "0.0", "1.0", "1.5", "-0.1", '"0.5"', "true", "nan", "inf"]
)
def test_fraction_invalid(key: str, raw: str) -> None:
    """0, 1, values outside (0, 1), NaN, strings and booleans are errors naming the key."""
    message = config_error(f"[policy]\n{key} = {raw}\n")
    assert f"policy.{key}" in message
    assert WHERE in message


@pytest.mark.parametrize(
    "key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
)
def test_key_type_choices(key_type: str) -> None:
    """Every SPEC key_type is accepted."""
    assert load(f'[policy]\nkey_type = "{key_type}"\n').policy.key_type == key_type


@pytest.mark.parametrize("key_type", ["rsa-1024", "ECDSA-P256", "ed25519", "ecdsa-p521", ""])
def test_key_type_invalid(key_type: str) -> None:
    """Any other key_type is an error naming policy.key_type."""
    assert "policy.key_type" in config_error(f'[policy]\nkey_type = "{key_type}"\n')


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://kubecertd-signer.example:8443", ("https://kubecertd-signer.example:8443",)),
        ("https://kubecertd-signer.example:8443/", ("https://kubecertd-signer.example:8443",)),
        ("", ()),
    ],
)
def test_signer_url(url: str, expected: tuple[str, ...]) -> None:
    """One signer URL is https (or unset), without a trailing slash: one replica or none."""
    assert load(f'[signer]\nurl = "{url}"\n').signer.url == expected


def test_signer_url_must_be_https() -> None:
    """A plain-http signer URL is an error naming signer.url."""
    assert "signer.url" in config_error('[signer]\nurl = "http://signer.example"\n')


def test_signer_url_array_lists_the_replicas() -> None:
    """An array of URLs keeps them all, in the file's order, each without a trailing slash."""
    text = """\
[signer]
url = [
  "https://signer-a.example:8443",
  "https://signer-b.example:8443/",
  "https://10.0.0.3:8443/kubecertd",
]
"""
    assert load(text).signer.url == (
        "https://signer-a.example:8443",
        "https://signer-b.example:8443",
        "https://10.0.0.3:8443/kubecertd",
    )


def test_signer_url_array_of_one_equals_the_string() -> None:
    """url = ["https://s:8443"] is the same setting as url = "https://s:8443"."""
    one = load('[signer]\nurl = ["https://s.example:8443"]\n').signer
    assert one == load('[signer]\nurl = "https://s.example:8443"\n').signer


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            '["https://a.example", "http://b.example"]',
            "signer.url[1]: 'http://b.example' must start with https://",
        ),
        ('["https://a.example", 8443]', "signer.url[1]: expected a string, got a number"),
        ('[""]', "signer.url[0]: must not be empty"),
        ('["https://a.example:99999"]', "signer.url[0]: 'https://a.example:99999' has a port"),
        ('["https://a.example?x=1"]', "signer.url[0]: 'https://a.example?x=1' must not carry"),
        (
            '["https://a.example", "https://b.example", "https://a.example/"]',
            "signer.url[2]: 'https://a.example' is listed twice",
        ),
        ("[]", "signer.url: an empty array"),
        ("8443", "signer.url: expected a string or an array of strings, got a number"),
    ],
    ids=["http", "number", "empty", "port", "query", "twice", "empty-array", "not-array"],
)
def test_signer_url_array_errors(value: str, message: str) -> None:
    """A bad array or element is one line naming the file, signer.url and the element's index."""
    error = config_error(f"[signer]\nurl = {value}\n")
    assert error.startswith(f"{WHERE}: {message}")
    assert "\n" not in error


def test_whole_numbers_and_booleans() -> None:
    """Counts and booleans take TOML integers and booleans."""
    cfg = load("[kubelet]\nrestart = false\nmax_restarts_per_hour = 0\n[daemon]\nbackups = 10\n")
    assert (cfg.kubelet.restart, cfg.kubelet.max_restarts_per_hour, cfg.daemon.backups) == (
        "false",
        0,
        10,
    )


def test_audit_log_is_off_unless_set() -> None:
    """[daemon] audit_log is "" (not read) by default and takes the log's path."""
    assert load(None).daemon.audit_log == ""
    cfg = load('[daemon]\naudit_log = "/var/log/audit/audit.log"\n')
    assert cfg.daemon.audit_log == "/var/log/audit/audit.log"


# -- unknown keys and wrong types ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "dotted"),
    [
        ('nodename = "x"\n', "nodename"),
        ("[policy]\nrenew_frac = 0.5\n", "policy.renew_frac"),
        ('[metric]\ntextfile = ""\n', "metric"),
        ('[kubelet]\nunits = "x"\n', "kubelet.units"),
        ("[policy.extra]\nx = 1\n", "policy.extra"),
    ],
    ids=["top-level", "in-section", "unknown-section", "typo-in-kubelet", "nested-table"],
)
def test_unknown_key(text: str, dotted: str) -> None:
    """An unknown key is an error naming the dotted key and the file."""
    message = config_error(text)
    assert dotted in message
    assert WHERE in message


def test_source_is_not_a_setting() -> None:
    """'source' (the Config's own bookkeeping field) is an unknown setting in a file."""
    assert "source" in config_error('source = "/tmp/x"\n')


@pytest.mark.parametrize(
    ("text", "dotted"),
    [
        ("ssl_dir = 5\n", "ssl_dir"),
        ("node_name = 7\n", "node_name"),
        ('[kubelet]\nrestart = "yes"\n', "kubelet.restart"),
        ("[kubelet]\nmax_restarts_per_hour = 1.5\n", "kubelet.max_restarts_per_hour"),
        ("[kubelet]\nmax_restarts_per_hour = true\n", "kubelet.max_restarts_per_hour"),
        ("[daemon]\nbackups = -1\n", "daemon.backups"),
        ('[daemon]\nbackups = "3"\n', "daemon.backups"),
        ('[files]\ncert = ["a.pem"]\n', "files.cert"),
        ('files = "worker.pem"\n', "files"),
        ("ssl_dir = {path = '/x'}\n", "ssl_dir"),
        ("[metrics]\ntextfile = 1979-05-27\n", "metrics.textfile"),
        ("[daemon]\naudit_log = true\n", "daemon.audit_log"),
    ],
    ids=[
        "string-got-number",
        "node-name-number",
        "bool-got-string",
        "count-got-float",
        "count-got-bool",
        "count-negative",
        "count-got-string",
        "string-got-array",
        "section-got-string",
        "setting-got-table",
        "string-got-date",
        "audit-log-got-bool",
    ],
)
def test_wrong_type(text: str, dotted: str) -> None:
    """A value of the wrong type or an impossible value is an error naming the key and file."""
    message = config_error(text)
    assert dotted in message
    assert WHERE in message


def test_empty_ssl_dir() -> None:
    """An empty ssl_dir is impossible and names ssl_dir."""
    assert "ssl_dir" in config_error('ssl_dir = ""\n')


@pytest.mark.parametrize("key", ["ca", "cert", "key"])
def test_empty_file_name(key: str) -> None:
    """An empty [files] name is impossible and names the key."""
    assert f"files.{key}" in config_error(f'[files]\n{key} = ""\n')


@pytest.mark.parametrize(
    "text", ["node_name = \n", "[policy\n", 'ssl_dir = "a"\nssl_dir = "b"\n', "\x00"]
)
def test_bad_toml_names_file(text: str) -> None:
    """Text that is not TOML is an error naming the file."""
    assert WHERE in config_error(text)


def test_config_error_exit_code() -> None:
    """A configuration error means exit status 2."""
    with pytest.raises(ConfigError) as info:
        load("[policy\n")
    assert info.value.exit_code == 2


# -- file paths ------------------------------------------------------------------------------


def test_files_relative_to_ssl_dir() -> None:
    """Relative [files] names are taken inside ssl_dir."""
    cfg = load('ssl_dir = "/srv/ssl"\n[files]\nca = "c.pem"\ncert = "w.pem"\nkey = "sub/k.pem"\n')
    assert (cfg.ca_path, cfg.cert_path, cfg.key_path) == (
        "/srv/ssl/c.pem",
        "/srv/ssl/w.pem",
        "/srv/ssl/sub/k.pem",
    )


def test_files_absolute() -> None:
    """Absolute [files] names stay as they are, whatever ssl_dir is."""
    cfg = load('ssl_dir = "/srv/ssl"\n[files]\ncert = "/var/lib/kubelet/pki/kubelet.crt"\n')
    assert cfg.cert_path == "/var/lib/kubelet/pki/kubelet.crt"
    assert cfg.ca_path == "/srv/ssl/ca.pem"


# -- reading the file ------------------------------------------------------------------------


def test_missing_default_file_means_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no --config and no $KUBECERTD_CONFIG, a missing default file means all defaults."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    cfg = read_config(None, {})
    assert settings_of(cfg) == SPEC_DEFAULTS
    assert cfg.node_name == config.default_node_name(socket.gethostname())


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    """A missing file named by --config is an error naming it."""
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=re.escape(missing)) as info:
        read_config(missing, {})
    assert info.value.exit_code == 2


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    """A missing file named by $KUBECERTD_CONFIG is an error naming it."""
    missing = str(tmp_path / "from-env.toml")
    with pytest.raises(ConfigError, match=re.escape(missing)):
        read_config(None, {"KUBECERTD_CONFIG": missing})


def test_env_from_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without an explicit env mapping, $KUBECERTD_CONFIG is read from the process environment."""
    path = tmp_path / "k.toml"
    path.write_text('ssl_dir = "/from/env"\n', encoding="utf-8")
    monkeypatch.setenv("KUBECERTD_CONFIG", str(path))
    cfg = read_config()
    assert cfg.ssl_dir == "/from/env"
    assert cfg.source == str(path)


def test_path_beats_env(tmp_path: Path) -> None:
    """--config wins over $KUBECERTD_CONFIG."""
    flag, env = tmp_path / "flag.toml", tmp_path / "env.toml"
    flag.write_text('ssl_dir = "/from/flag"\n', encoding="utf-8")
    env.write_text('ssl_dir = "/from/env"\n', encoding="utf-8")
    assert read_config(str(flag), {"KUBECERTD_CONFIG": str(env)}).ssl_dir == "/from/flag"


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    """A bad key in a real file is reported with that file's path."""
    path = tmp_path / "bad.toml"
    path.write_text("[policy]\nrenew_frac = 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_config(str(path), {})
    assert str(path) in str(info.value)
    assert "policy.renew_frac" in str(info.value)


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
def test_unreadable_config_file(kind: str, tmp_path: Path) -> None:
    """A config path that is a directory or not UTF-8 text is an error naming it."""
    path = tmp_path / "k.toml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b'ssl_dir = "\xff"\n')
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        read_config(str(path), {})


# -- layout --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "layout"),
    [
        pytest.param(None, "auto", id="no-config"),
        pytest.param('ssl_dir = "/srv/ssl"', "files", id="ssl_dir-set"),
        pytest.param('[files]\ncert = "kubelet.pem"', "files", id="files-set"),
        pytest.param('layout = "kubeadm"\nssl_dir = "/srv/ssl"', "kubeadm", id="layout-wins"),
        pytest.param('kubeconfig = "/etc/kubernetes/kubelet.conf"', "auto", id="kubeconfig-only"),
    ],
)
def test_layout_is_files_when_a_config_names_files(text: str | None, layout: str) -> None:
    """Without layout, a config that sets ssl_dir or [files] keeps today's files; else auto."""
    assert load(text).layout == layout


def test_unknown_layout_names_the_setting() -> None:
    """A layout that is not one of the six is a config error naming layout."""
    assert config_error('layout = "kops"') == (
        f"{WHERE}: layout: 'kops' is not one of auto, files, kubeconfig, kubeadm, k3s, rke2"
    )


@pytest.mark.parametrize(
    ("value", "mode"), [("true", "true"), ("false", "false"), ('"auto"', "auto")]
)
def test_restart_modes(value: str, mode: str) -> None:
    """[kubelet] restart takes true, false or "auto"."""
    assert load(f"[kubelet]\nrestart = {value}\n").kubelet.restart == mode


@pytest.mark.parametrize("value", ['"1.29.3"', '"v1.30"', '"1.29.3+k3s1"', '""'])
def test_kubelet_version_setting(value: str) -> None:
    """[kubelet] version takes a version like 1.29.3 (or "" for kubelet --version)."""
    assert load(f"[kubelet]\nversion = {value}\n").kubelet.version == value.strip('"')


def test_bad_kubelet_version_names_the_setting() -> None:
    """A version that is not one is a config error naming kubelet.version."""
    assert "kubelet.version: 'latest' is not a version" in config_error(
        '[kubelet]\nversion = "latest"\n'
    )
