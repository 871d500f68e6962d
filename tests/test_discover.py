"""How kubelet is run, read from its systemd unit (kubecertd/discover.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubecertd.discover import (
    MAX_FILE_BYTES,
    NO_FLAGS,
    UNIT_DIRS,
    KubeletConfig,
    KubeletFlags,
    UnitSettings,
    expand,
    k3s_flags,
    kubelet_flags,
    node_name,
    parse_environment_file,
    parse_kubelet_config,
    parse_unit,
    read_unit,
)

from node_harness import VENV, Node

# kubernetes/release's kubelet.service, as pkgs.k8s.io installs it in /usr/lib/systemd/system.
KUBELET_SERVICE = """\
[Unit]
Description=kubelet: The Kubernetes Node Agent
Documentation=https://kubernetes.io/docs/home/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
"""

# kubeadm's drop-in, kubernetes/kubernetes build/debs/10-kubeadm.conf (release-1.17 on;
# now shipped by kubernetes/release next to the unit as kubelet.service.d/10-kubeadm.conf).
KUBEADM_DROPIN = """\
# Note: This dropin only works with kubeadm and kubelet v1.11+
[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
# This is a file that "kubeadm init" and "kubeadm join" generate at runtime, populating the KUBELET_KUBEADM_ARGS variable dynamically
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
# This is a file that the user can use for overrides of the kubelet args as a last resort. Preferably, the user should use
# the .NodeRegistration.KubeletExtraArgs object in the configuration files instead. KUBELET_EXTRA_ARGS should be sourced from this file.
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
"""

# As kubeadm writes it: fmt.Sprintf("%s=%q\n", ...) (cmd/kubeadm/app/phases/kubelet/flags.go).
KUBEADM_FLAGS_ENV = (
    'KUBELET_KUBEADM_ARGS="--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock'
    ' --hostname-override=Worker-1.Example --pod-infra-container-image=registry.k8s.io/pause:3.9"\n'
)

# kube-aws <= 0.9 (coreos/kube-aws config/templates/cloud-config-worker), templates filled in;
# cloud-init writes it to /run/systemd/system ("runtime: true").
KUBE_AWS_UNIT = """\
[Unit]
Wants=flanneld.service
[Service]
Environment=KUBELET_VERSION=v1.4.6_coreos.0
Environment=KUBELET_ACI=quay.io/coreos/hyperkube
Environment="RKT_OPTS=--volume dns,kind=host,source=/etc/resolv.conf \\
--mount volume=dns,target=/etc/resolv.conf \\
--volume var-log,kind=host,source=/var/log \\
--mount volume=var-log,target=/var/log"
ExecStartPre=/usr/bin/systemctl is-active flanneld.service
ExecStartPre=/usr/bin/mkdir -p /var/log/containers
ExecStart=/usr/lib/coreos/kubelet-wrapper \\
--api-servers=https://10.0.0.50 \\
--network-plugin-dir=/etc/kubernetes/cni/net.d \\
--network-plugin=cni \\
--container-runtime=docker \\
--register-node=true \\
--allow-privileged=true \\
--config=/etc/kubernetes/manifests \\
--cluster_dns=10.3.0.10 \\
--cluster_domain=cluster.local \\
--cloud-provider=aws \\
--kubeconfig=/etc/kubernetes/worker-kubeconfig.yaml \\
--tls-cert-file=/etc/kubernetes/ssl/worker.pem \\
--tls-private-key-file=/etc/kubernetes/ssl/worker-key.pem
Restart=always
RestartSec=10
[Install]
WantedBy=multi-user.target
"""

# The shape of the unit get.k3s.io writes for an agent.
K3S_AGENT_UNIT = """\
[Service]
Type=notify
EnvironmentFile=-/etc/default/%N
EnvironmentFile=-/etc/sysconfig/%N
EnvironmentFile=-/etc/systemd/system/k3s-agent.service.env
KillMode=process
ExecStartPre=-/sbin/modprobe br_netfilter
ExecStart=/usr/local/bin/k3s \\
    agent \\
\t'--server' \\
\t'https://10.0.0.1:6443' \\
\t'--data-dir' '/srv/k3s' \\
"""


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for path, content in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)


def link(root: Path, path: str, target: str) -> None:
    where = root / path.lstrip("/")
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(target)


def service(command: str, *lines: str) -> str:
    return "\n".join(["[Service]", *lines, f"ExecStart={command}", ""])


# --- read_unit: whole nodes ---------------------------------------------------------------


def test_kubeadm_node(tmp_path: Path) -> None:
    """A kubeadm node's kubelet runs with its drop-in's kubeconfigs and config, then
    kubeadm-flags.env, then /etc/default/kubelet, found through merged-/usr's /lib link."""
    link(tmp_path, "/lib", "usr/lib")
    write(
        tmp_path,
        {
            "/usr/lib/systemd/system/kubelet.service": KUBELET_SERVICE,
            "/usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf": KUBEADM_DROPIN,
            "/var/lib/kubelet/kubeadm-flags.env": KUBEADM_FLAGS_ENV,
            "/etc/default/kubelet": "KUBELET_EXTRA_ARGS=\"--cert-dir='/srv/kubelet pki' --v=2\"\n",
        },
    )
    unit = read_unit("kubelet", str(tmp_path))
    assert unit is not None
    assert unit.unit == "kubelet.service"
    assert unit.files == (
        "/lib/systemd/system/kubelet.service",
        "/lib/systemd/system/kubelet.service.d/10-kubeadm.conf",
        "/var/lib/kubelet/kubeadm-flags.env",
        "/etc/default/kubelet",
    )
    assert unit.argv == (
        "/usr/bin/kubelet",
        "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf",
        "--kubeconfig=/etc/kubernetes/kubelet.conf",
        "--config=/var/lib/kubelet/config.yaml",
        "--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock",
        "--hostname-override=Worker-1.Example",
        "--pod-infra-container-image=registry.k8s.io/pause:3.9",
        "--cert-dir=/srv/kubelet pki",
        "--v=2",
    )
    assert unit.flags == KubeletFlags(
        kubeconfig="/etc/kubernetes/kubelet.conf",
        bootstrap_kubeconfig="/etc/kubernetes/bootstrap-kubelet.conf",
        cert_dir="/srv/kubelet pki",
        config="/var/lib/kubelet/config.yaml",
        hostname_override="Worker-1.Example",
        rotate_certificates=None,
    )
    assert unit.unread == ()
    assert node_name(unit.flags, "ignored") == "worker-1.example"


def test_kubeadm_node_before_join(tmp_path: Path) -> None:
    """Before ``kubeadm join`` neither environment file exists: kubelet still gets the
    drop-in's flags and the missing optional files are not reported."""
    write(
        tmp_path,
        {
            "/lib/systemd/system/kubelet.service": KUBELET_SERVICE,
            "/etc/systemd/system/kubelet.service.d/10-kubeadm.conf": KUBEADM_DROPIN,
        },
    )
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.files == (
        "/lib/systemd/system/kubelet.service",
        "/etc/systemd/system/kubelet.service.d/10-kubeadm.conf",
    )
    assert unit.argv[-1] == "--config=/var/lib/kubelet/config.yaml"
    assert unit.unread == ()


def test_kube_aws_unit(tmp_path: Path) -> None:
    """A kube-aws worker's runtime unit names the shared worker kubeconfig; its old-style
    --config is the static pod folder, reported as given."""
    write(tmp_path, {"/run/systemd/system/kubelet.service": KUBE_AWS_UNIT})
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.files == ("/run/systemd/system/kubelet.service",)
    assert unit.argv[0] == "/usr/lib/coreos/kubelet-wrapper"
    assert "--cluster_dns=10.3.0.10" in unit.argv
    assert unit.flags == KubeletFlags(
        kubeconfig="/etc/kubernetes/worker-kubeconfig.yaml",
        bootstrap_kubeconfig=None,
        cert_dir=None,
        config="/etc/kubernetes/manifests",
        hostname_override=None,
        rotate_certificates=None,
    )


def test_kube_aws_environment_continues_inside_quotes() -> None:
    """A backslash-newline inside a quoted Environment= value joins the lines with a space."""
    settings = parse_unit([("kubelet.service", KUBE_AWS_UNIT)])
    assert dict(settings.environment)["RKT_OPTS"] == (
        "--volume dns,kind=host,source=/etc/resolv.conf "
        " --mount volume=dns,target=/etc/resolv.conf "
        " --volume var-log,kind=host,source=/var/log "
        " --mount volume=var-log,target=/var/log"
    )


def test_k3s_agent_unit(tmp_path: Path) -> None:
    """k3s-agent.service reads %N's environment files and the k3s-.service.d drop-ins, and
    k3s_flags finds its data dir and node name."""
    write(
        tmp_path,
        {
            "/etc/systemd/system/k3s-agent.service": K3S_AGENT_UNIT,
            "/etc/default/k3s-agent": "NODE=from-default\n",
            "/etc/systemd/system/k3s-agent.service.env": "K3S_TOKEN=secret\nNODE=agent-7\n",
            "/etc/systemd/system/k3s-.service.d/50-name.conf": (
                "[Service]\nExecStart=\nExecStart=/usr/local/bin/k3s agent --node-name $NODE\n"
            ),
        },
    )
    unit = read_unit("k3s-agent.service", str(tmp_path))
    assert unit is not None
    assert unit.files == (
        "/etc/systemd/system/k3s-agent.service",
        "/etc/systemd/system/k3s-.service.d/50-name.conf",
        "/etc/default/k3s-agent",
        "/etc/systemd/system/k3s-agent.service.env",
    )
    assert unit.argv == ("/usr/local/bin/k3s", "agent", "--node-name", "agent-7")
    assert k3s_flags(unit.argv) == (None, "agent-7")


def test_k3s_agent_unit_as_installed() -> None:
    """The installer's quoted, tab-indented ExecStart= gives k3s its flags word by word."""
    settings = parse_unit([("k3s-agent.service", K3S_AGENT_UNIT)], "k3s-agent.service")
    assert settings.exec_start == (
        "/usr/local/bin/k3s",
        *("agent", "--server", "https://10.0.0.1:6443", "--data-dir", "/srv/k3s"),
    )
    assert settings.environment_files == (
        ("/etc/default/k3s-agent", True),
        ("/etc/sysconfig/k3s-agent", True),
        ("/etc/systemd/system/k3s-agent.service.env", True),
    )
    assert k3s_flags(settings.exec_start) == ("/srv/k3s", None)


# --- read_unit: precedence, masks, missing files -------------------------------------------


def test_unit_in_etc_overrides_vendor_unit(tmp_path: Path) -> None:
    """The first search directory with the unit file wins; the others' files are not read."""
    write(
        tmp_path,
        {
            "/usr/lib/systemd/system/kubelet.service": service("/usr/bin/kubelet --config=/vendor"),
            "/etc/systemd/system/kubelet.service": service("/opt/bin/kubelet --config=/admin"),
        },
    )
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.files == ("/etc/systemd/system/kubelet.service",)
    assert unit.flags.config == "/admin"


def test_dropins_by_name_across_dirs(tmp_path: Path) -> None:
    """A drop-in in /etc masks the same name in /usr/lib; all drop-ins apply in name order,
    wherever they are, and the top-level service.d comes in by name too."""
    write(
        tmp_path,
        {
            "/usr/lib/systemd/system/kubelet.service": service("/usr/bin/kubelet ${A} ${B} ${C}"),
            "/usr/lib/systemd/system/kubelet.service.d/10-a.conf": "[Service]\nEnvironment=A=vendor B=vendor-10\n",
            "/etc/systemd/system/kubelet.service.d/10-a.conf": "[Service]\nEnvironment=A=admin\n",
            "/usr/lib/systemd/system/kubelet.service.d/30-b.conf": "[Service]\nEnvironment=B=vendor-30\n",
            "/run/systemd/system/kubelet.service.d/20-b.conf": "[Service]\nEnvironment=B=run-20\n",
            "/etc/systemd/system/service.d/15-c.conf": "[Service]\nEnvironment=C=every-service\n",
        },
    )
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.files == (
        "/usr/lib/systemd/system/kubelet.service",
        "/etc/systemd/system/kubelet.service.d/10-a.conf",
        "/etc/systemd/system/service.d/15-c.conf",
        "/run/systemd/system/kubelet.service.d/20-b.conf",
        "/usr/lib/systemd/system/kubelet.service.d/30-b.conf",
    )
    assert unit.argv == ("/usr/bin/kubelet", "admin", "vendor-30", "every-service")


def test_masked_dropin_hides_vendor_dropin(tmp_path: Path) -> None:
    """A drop-in linked to /dev/null in /etc hides the vendor's drop-in of that name."""
    write(
        tmp_path,
        {
            "/lib/systemd/system/kubelet.service": service("/usr/bin/kubelet"),
            "/lib/systemd/system/kubelet.service.d/10-kubeadm.conf": KUBEADM_DROPIN,
        },
    )
    link(tmp_path, "/etc/systemd/system/kubelet.service.d/10-kubeadm.conf", "/dev/null")
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.files == ("/lib/systemd/system/kubelet.service",)
    assert unit.argv == ("/usr/bin/kubelet",)


def test_empty_execstart_resets_in_dropin(tmp_path: Path) -> None:
    """``ExecStart=`` in a drop-in drops the unit's command; without it a second command
    is added and the last one is taken."""
    write(
        tmp_path,
        {
            "/lib/systemd/system/kubelet.service": service("/usr/bin/kubelet --kubeconfig=/a"),
            "/etc/systemd/system/kubelet.service.d/override.conf": (
                "[Service]\nExecStart=\nExecStart=/usr/bin/kubelet --cert-dir=/b\n"
            ),
        },
    )
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.argv == ("/usr/bin/kubelet", "--cert-dir=/b")
    assert unit.flags.kubeconfig is None


@pytest.mark.parametrize("how", ["dev-null-link", "empty-file"])
def test_masked_unit_is_absent(tmp_path: Path, how: str) -> None:
    """A unit file linked to /dev/null, or empty, is masked: as if there were no unit."""
    write(tmp_path, {"/lib/systemd/system/kubelet.service": KUBELET_SERVICE})
    if how == "dev-null-link":
        link(tmp_path, "/etc/systemd/system/kubelet.service", "/dev/null")
    else:
        write(tmp_path, {"/etc/systemd/system/kubelet.service": ""})
    assert read_unit("kubelet.service", str(tmp_path)) is None


def test_no_unit_file(tmp_path: Path) -> None:
    """Drop-ins without a unit file are no unit."""
    write(tmp_path, {"/etc/systemd/system/kubelet.service.d/10-kubeadm.conf": KUBEADM_DROPIN})
    assert read_unit("kubelet.service", str(tmp_path)) is None


def test_absolute_links_resolve_inside_root(tmp_path: Path) -> None:
    """An enabled unit linked by absolute path is followed inside ``root``, not on the host."""
    write(tmp_path, {"/opt/kubelet/kubelet.service": service("/opt/kubelet/bin/kubelet")})
    link(tmp_path, "/etc/systemd/system/kubelet.service", "/opt/kubelet/kubelet.service")
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.argv == ("/opt/kubelet/bin/kubelet",)


def test_missing_environment_files(tmp_path: Path) -> None:
    """A missing optional environment file is skipped; a missing required one is listed in
    ``unread`` (systemd would not start the unit) and the command is expanded without it."""
    write(
        tmp_path,
        {
            "/lib/systemd/system/kubelet.service": service(
                "/usr/bin/kubelet $OPTIONAL $REQUIRED $PRESENT",
                "EnvironmentFile=-/etc/default/kubelet",
                "EnvironmentFile=/etc/kubernetes/kubelet.env",
                "EnvironmentFile=/etc/kubernetes/present.env",
            ),
            "/etc/kubernetes/present.env": "PRESENT=--kubeconfig=/etc/kubernetes/kubelet.conf\n",
        },
    )
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.files == (
        "/lib/systemd/system/kubelet.service",
        "/etc/kubernetes/present.env",
    )
    assert unit.unread == ("/etc/kubernetes/kubelet.env",)
    assert unit.argv == ("/usr/bin/kubelet", "--kubeconfig=/etc/kubernetes/kubelet.conf")


def test_environment_file_globs(tmp_path: Path) -> None:
    """EnvironmentFile= paths are globbed; the matches are read in sorted order."""
    write(
        tmp_path,
        {
            "/lib/systemd/system/kubelet.service": service(
                "/usr/bin/kubelet ${A} ${B}",
                "EnvironmentFile=-/etc/kubelet.d/*.env",
                "EnvironmentFile=-/etc/nothing/*.env",
            ),
            "/etc/kubelet.d/b.env": "B=b\nA=from-b\n",
            "/etc/kubelet.d/a.env": "A=from-a\n",
        },
    )
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.files[1:] == ("/etc/kubelet.d/a.env", "/etc/kubelet.d/b.env")
    assert unit.argv == ("/usr/bin/kubelet", "from-b", "b")
    assert unit.unread == ()


def test_oversized_files_are_unread(tmp_path: Path) -> None:
    """A drop-in or environment file over 1 MiB is left out and listed as unread."""
    big = b"#" * (MAX_FILE_BYTES + 1)
    write(
        tmp_path,
        {
            "/lib/systemd/system/kubelet.service": service(
                "/usr/bin/kubelet", "EnvironmentFile=-/etc/default/kubelet"
            ),
            "/etc/systemd/system/kubelet.service.d/big.conf": big,
            "/etc/default/kubelet": big,
        },
    )
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert unit.files == ("/lib/systemd/system/kubelet.service",)
    assert unit.unread == (
        "/etc/systemd/system/kubelet.service.d/big.conf",
        "/etc/default/kubelet",
    )


def test_oversized_unit_file_is_unread(tmp_path: Path) -> None:
    """A unit file that cannot be read still hides the ones below it: no command, unread."""
    write(
        tmp_path,
        {
            "/etc/systemd/system/kubelet.service": b"#" * (MAX_FILE_BYTES + 1),
            "/lib/systemd/system/kubelet.service": KUBELET_SERVICE,
        },
    )
    unit = read_unit("kubelet.service", str(tmp_path))
    assert unit is not None
    assert (unit.files, unit.argv, unit.flags) == ((), (), NO_FLAGS)
    assert unit.unread == ("/etc/systemd/system/kubelet.service",)


def test_unit_dirs_start_with_admin_dirs() -> None:
    """/etc comes before /run, which comes before the vendor dirs, as in systemd.unit(5)."""
    order = [UNIT_DIRS.index(d) for d in ("/etc/systemd/system", "/run/systemd/system")]
    assert order == sorted(order)
    assert UNIT_DIRS.index("/run/systemd/system") < UNIT_DIRS.index("/lib/systemd/system")


# --- parse_unit ------------------------------------------------------------------------------

EXEC_CASES = [
    ("plain", "/usr/bin/kubelet --a=1  --b", ("/usr/bin/kubelet", "--a=1", "--b")),
    ("double-quotes", '/bin/k "--x=a b" c', ("/bin/k", "--x=a b", "c")),
    ("single-quotes", "/bin/k '--x=\"a\"'", ("/bin/k", '--x="a"')),
    ("quote-mid-word", '/bin/k --x="a b"c', ("/bin/k", "--x=a bc")),
    ("empty-quotes", "/bin/k ''", ("/bin/k", "")),
    ("c-escapes", r"/bin/k a\tb \x41\u00e9 \s", ("/bin/k", "a\tb", "Aé", " ")),
    ("unknown-escape-kept", r"/bin/k \q \$X", ("/bin/k", r"\q", r"\$X")),
    ("escaped-quote", r'/bin/k "a\"b"', ("/bin/k", 'a"b')),
    ("prefixes", "-+/bin/k --x", ("/bin/k", "--x")),
    ("bang-bang", "!!/bin/k", ("/bin/k",)),
    ("at-drops-argv0", "@/bin/k kubelet --x", ("/bin/k", "--x")),
    ("colon-keeps-dollars", ":/bin/k $A ${B}", ("/bin/k", "$$A", "$${B}")),
    ("semicolon-last-wins", "/bin/true ; /bin/k --x", ("/bin/k", "--x")),
    ("escaped-semicolon", r"/bin/k \; ;x", ("/bin/k", ";", ";x")),
    (
        "specifiers",
        "/bin/k %n %N %p %j %% %t %H",
        ("/bin/k", *("k-a.service", "k-a", "k-a", "a", "%", "/run", "%H")),
    ),
    ("unbalanced-ignored", '/bin/k "open', ()),
]


@pytest.mark.parametrize(
    ("command", "expected"), [c[1:] for c in EXEC_CASES], ids=[c[0] for c in EXEC_CASES]
)
def test_exec_start_words(command: str, expected: tuple[str, ...]) -> None:
    """ExecStart= is split and unquoted as systemd.service(5) "COMMAND LINES" says."""
    settings = parse_unit([("k-a.service", f"[Service]\nExecStart={command}\n")], "k-a.service")
    assert settings.exec_start == expected


def test_continuations_and_comments() -> None:
    """A trailing backslash joins lines with a space, comment lines inside are dropped, and
    an even number of backslashes does not continue."""
    text = (
        "[Service]\n"
        "ExecStart=/bin/k --a \\\n"
        "# a comment inside\n"
        "; another\n"
        "   --b\\\n"
        "c --d=\\\\\n"
        "Environment=E=1\n"
    )
    settings = parse_unit([("u", text)])
    assert settings.exec_start == ("/bin/k", "--a", "--b", "c", "--d=\\")
    assert settings.environment == (("E", "1"),)


def test_only_the_service_section_counts() -> None:
    """Keys outside [Service], unknown keys and keys in other letter case are ignored; each
    file starts outside any section."""
    unit = "[Unit]\nExecStart=/bin/unit\n[Service]\nexecstart=/bin/lower\nExecStart=/bin/k\n"
    dropin = "ExecStart=/bin/no-section\n[Install]\nExecStart=/bin/install\n"
    assert parse_unit([("u", unit), ("d", dropin)]).exec_start == ("/bin/k",)


def test_environment_assignments() -> None:
    """Environment= takes quoted NAME=VALUE words, skips invalid ones, keeps what came
    before an unbalanced quote, and an empty assignment resets the list."""
    text = (
        "[Service]\n"
        "Environment=OLD=gone\n"
        "Environment=\n"
        "Environment=A=1 'B=two words' \"C=$HOME\" 1BAD=x NOEQUALS D=\n"
        'Environment=E=5 "F=6\n'
    )
    assert parse_unit([("u", text)]).environment == (
        ("A", "1"),
        ("B", "two words"),
        ("C", "$HOME"),
        ("D", ""),
        ("E", "5"),
    )


def test_environment_files_setting() -> None:
    """EnvironmentFile= keeps its order and '-' flag, ignores relative paths, simplifies
    the path and resets on an empty assignment."""
    text = (
        "[Service]\n"
        "EnvironmentFile=/etc/dropped\n"
        "EnvironmentFile=\n"
        "EnvironmentFile=-/etc//default/./%N\n"
        "EnvironmentFile=etc/relative\n"
        "EnvironmentFile=/var/lib/kubelet/kubeadm-flags.env\n"
    )
    assert parse_unit([("u", text)], "kubelet.service").environment_files == (
        ("/etc/default/kubelet", True),
        ("/var/lib/kubelet/kubeadm-flags.env", False),
    )


def test_no_exec_start() -> None:
    """A unit without ExecStart= has no command."""
    assert parse_unit([("u", "[Service]\nType=oneshot\n")]) == UnitSettings((), (), ())


# --- expand --------------------------------------------------------------------------------

ENV = {"SPLIT": 'one "two three" fo\\ur', "EMPTY": "", "WS": "  a  b  ", "V": "value"}
EXPAND_CASES = [
    ("whole-word-splits", "$SPLIT", ["one", "two three", "four"]),
    ("braces-keep-one-word", "${SPLIT}", ['one "two three" fo\\ur']),
    ("braces-inside-word", "x${V}y", ["xvaluey"]),
    ("dollar-inside-word-literal", "x$V", ["x$V"]),
    ("empty-whole-word-vanishes", "$EMPTY", []),
    ("empty-braces-stay", "${EMPTY}", [""]),
    ("unset-whole-word-vanishes", "$UNSET", []),
    ("unset-braces-empty", "${UNSET}", [""]),
    ("whitespace-split", "$WS", ["a", "b"]),
    ("whitespace-kept", "${WS}", ["  a  b  "]),
    ("double-dollar", "$$", ["$"]),
    ("double-dollar-in-word", "a$$b", ["a$b"]),
    ("double-dollar-name", "$$V", ["$V"]),
    ("double-dollar-braces", "$${V}", ["${V}"]),
    ("triple-dollar", "$$$V", ["$$V"]),
    ("default-syntax-literal", "${V:-x}", ["${V:-x}"]),
    ("invalid-name-braces", "${bad-name}", [""]),
    ("invalid-name-word-vanishes", "$bad/x", []),
    ("two-variables-one-word", "$V$V", []),
    ("lone-dollar-vanishes", "$", []),
    ("unterminated-braces", "${V", ["${V"]),
    ("escaped-dollar", "\\$V", ["\\$V"]),
]


@pytest.mark.parametrize(
    ("word", "expected"), [c[1:] for c in EXPAND_CASES], ids=[c[0] for c in EXPAND_CASES]
)
def test_expand(word: str, expected: list[str]) -> None:
    """Variables expand as systemd 252 expands them (each case checked against it)."""
    assert expand([word], ENV) == expected


# --- parse_environment_file ---------------------------------------------------------------

ENV_FILE_CASES = [
    ("kubeadm", KUBEADM_FLAGS_ENV, {"KUBELET_KUBEADM_ARGS": KUBEADM_FLAGS_ENV[22:-2]}),
    ("spaces-around", "  A = spaced value  \n", {"A": "spaced value"}),
    ("single-quotes-verbatim", "A='x \\ \"y\"'\n", {"A": 'x \\ "y"'}),
    ("double-quote-escapes", 'A="\\$ \\` \\\\ \\" \\x"\n', {"A": '$ ` \\ " \\x'}),
    ("quotes-multi-line", "A='one\ntwo'\nB=3\n", {"A": "one\ntwo", "B": "3"}),
    ("quote-then-unquoted", "A=\"x\"y'z' w  \n", {"A": "xy'z' w"}),
    ("quote-inside-kept", 'A=x "y"\n', {"A": 'x "y"'}),
    ("backslash-continues", "A=a\\\n  b\n", {"A": "a  b"}),
    ("escaped-trailing-space", "A=x\\ \n", {"A": "x "}),
    ("comments", "# A=1\n; B=2\n  #C=3\nD=4 # not a comment\n", {"D": "4 # not a comment"}),
    ("comment-backslash-swallows-line", "# note \\\nA=1\nB=2\n", {"B": "2"}),
    ("no-export", "export A=1\nB=2\n", {"B": "2"}),
    ("invalid-names", "1A=1\nA-B=2\nA B=3\n=4\nOK=5\n", {"OK": "5"}),
    ("no-equals", "JUSTAKEY\nA=1\n", {"A": "1"}),
    ("empty-value", "A=\nB=''\n", {"A": "", "B": ""}),
    ("later-wins", "A=1\nA=2\n", {"A": "2"}),
    ("crlf", "A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
    ("no-final-newline", "A=1", {"A": "1"}),
    ("unterminated-quote", "A='open\n", {"A": "open\n"}),
    ("equals-in-value", "A=1=2\n", {"A": "1=2"}),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in ENV_FILE_CASES], ids=[c[0] for c in ENV_FILE_CASES]
)
def test_parse_environment_file(text: str, expected: dict[str, str]) -> None:
    """EnvironmentFile= contents parse as systemd.exec(5) and env-file.c describe."""
    assert parse_environment_file(text) == expected


# --- kubelet_flags and k3s_flags ------------------------------------------------------------

FLAG_CASES = [
    ("equals", ["kubelet", "--kubeconfig=/k"], {"kubeconfig": "/k"}),
    ("separate-value", ["kubelet", "--kubeconfig", "/k"], {"kubeconfig": "/k"}),
    ("value-starting-with-dash", ["--cert-dir", "-odd"], {"cert_dir": "-odd"}),
    (
        "underscores",
        ["--cert_dir=/c", "--hostname_override=n"],
        {"cert_dir": "/c", "hostname_override": "n"},
    ),
    ("last-wins", ["--config=/a", "--config", "/b"], {"config": "/b"}),
    (
        "all-five",
        [
            "--bootstrap-kubeconfig=/b",
            "--kubeconfig=/k",
            "--cert-dir=/c",
            "--config=/y",
            "--hostname-override=h",
        ],
        {
            "bootstrap_kubeconfig": "/b",
            "kubeconfig": "/k",
            "cert_dir": "/c",
            "config": "/y",
            "hostname_override": "h",
        },
    ),
    ("config-is-not-kubeconfig", ["--config=/y"], {"config": "/y"}),
    ("bool-alone", ["--rotate-certificates"], {"rotate_certificates": True}),
    ("bool-false", ["--rotate-certificates=false"], {"rotate_certificates": False}),
    (
        "bool-go-spellings",
        ["--rotate-certificates=F", "--rotate-certificates=1"],
        {"rotate_certificates": True},
    ),
    ("bool-bad-value", ["--rotate-certificates=yes"], {"rotate_certificates": None}),
    (
        "bool-takes-no-next-word",
        ["--rotate-certificates", "false", "--kubeconfig=/k"],
        {"rotate_certificates": True, "kubeconfig": "/k"},
    ),
    ("unknown-flag-takes-value", ["--node-labels", "a=b", "--kubeconfig=/k"], {"kubeconfig": "/k"}),
    ("unknown-flag-before-flag", ["--register-node", "--kubeconfig", "/k"], {"kubeconfig": "/k"}),
    ("unknown-flag-eats-path", ["--v", "/k"], {}),
    ("single-dash-not-long", ["-kubeconfig=/k", "-config", "/y"], {}),
    (
        "shorthand-v-takes-value",
        ["-v", "--kubeconfig=/not-a-value?", "--config=/y"],
        {"config": "/y"},
    ),
    ("double-dash-ends", ["--", "--kubeconfig=/k"], {}),
    ("bad-syntax", ["---kubeconfig=/k", "--=x"], {}),
    ("empty-value", ["--hostname-override="], {"hostname_override": ""}),
    ("missing-value", ["--kubeconfig"], {}),
    ("hyperkube", ["/usr/bin/hyperkube", "kubelet", "--kubeconfig=/k"], {"kubeconfig": "/k"}),
]


@pytest.mark.parametrize(
    ("argv", "expected"), [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES]
)
def test_kubelet_flags(argv: list[str], expected: dict[str, object]) -> None:
    """kubelet's flags are read as its pflag parser reads them."""
    assert kubelet_flags(argv) == NO_FLAGS._replace(**expected)


K3S_CASES = [
    ("none", ["k3s", "agent"], (None, None)),
    ("long", ["k3s", "agent", "--data-dir", "/d", "--node-name=n"], ("/d", "n")),
    ("short-and-single-dash", ["rke2", "server", "-d=/d", "-node-name", "n"], ("/d", "n")),
    ("last-wins", ["k3s", "agent", "-d", "/a", "--data-dir=/b"], ("/b", None)),
    (
        "unknown-flag-value",
        ["k3s", "agent", "--server", "https://s", "--node-name", "n"],
        (None, "n"),
    ),
    ("kubelet-arg-is-not-ours", ["k3s", "agent", "--kubelet-arg=node-name=x"], (None, None)),
    ("double-dash-ends", ["k3s", "agent", "--", "--node-name=n"], (None, None)),
]


@pytest.mark.parametrize(
    ("argv", "expected"), [c[1:] for c in K3S_CASES], ids=[c[0] for c in K3S_CASES]
)
def test_k3s_flags(argv: list[str], expected: tuple[str | None, str | None]) -> None:
    """k3s and RKE2 take --data-dir/-d and --node-name with one or two dashes."""
    assert k3s_flags(argv) == expected


# --- node_name -----------------------------------------------------------------------------

NODE_NAME_CASES = [
    ("hostname", None, "Worker-1", "worker-1"),
    ("no-override", NO_FLAGS, " Worker-1\n", "worker-1"),
    ("override", NO_FLAGS._replace(hostname_override=" Node-A.Example "), "host", "node-a.example"),
    ("empty-override-ignored", NO_FLAGS._replace(hostname_override=""), "Host", "host"),
    ("blank-override-is-empty", NO_FLAGS._replace(hostname_override=" \t"), "host", ""),
]


@pytest.mark.parametrize(
    ("flags", "hostname", "expected"),
    [c[1:] for c in NODE_NAME_CASES],
    ids=[c[0] for c in NODE_NAME_CASES],
)
def test_node_name(flags: KubeletFlags | None, hostname: str, expected: str) -> None:
    """The node name is a non-empty override, else the hostname, trimmed and lowercased."""
    assert node_name(flags, hostname) == expected


# --- parse_kubelet_config -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            b"apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nrotateCertificates: true\n",
            True,
        ),
        (b'{"kind": "KubeletConfiguration", "rotateCertificates": false}', False),
        (b"kind: KubeletConfiguration\nauthentication: {}\n", None),
        (b"rotateCertificates: yes\n", True),  # YAML 1.1, as sigs.k8s.io/yaml reads it
        (b"{kind: KubeletConfiguration, rotateCertificates: true}", True),
    ],
    ids=["yaml", "json", "absent", "yaml-1.1-bool", "yaml-flow"],
)
def test_parse_kubelet_config(text: bytes, expected: bool | None) -> None:
    """rotateCertificates is read from YAML or JSON."""
    assert parse_kubelet_config(text, "/var/lib/kubelet/config.yaml") == KubeletConfig(
        "/var/lib/kubelet/config.yaml", expected
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "is empty"),
        (b"kind: [unclosed\n", "not valid YAML or JSON"),
        (b'{"kind": ', "not valid YAML or JSON"),
        (b"- a list\n", "not a mapping"),
        (b"kind: Pod\n", "kind is 'Pod'"),
        (b'rotateCertificates: "true"\n', "rotateCertificates is 'true'"),
        (b"created: 2001-13-01\n", "not valid YAML or JSON"),
    ],
    ids=["empty", "yaml-syntax", "json-syntax", "list", "other-kind", "string-bool", "bad-date"],
)
def test_broken_kubelet_config(text: bytes, message: str) -> None:
    """A file kubelet would refuse raises one line naming the file."""
    with pytest.raises(ValueError, match=message) as caught:
        parse_kubelet_config(text, "/var/lib/kubelet/config.yaml")
    assert str(caught.value).startswith("/var/lib/kubelet/config.yaml: ")
    assert "\n" not in str(caught.value)


def test_importing_the_module_stays_light() -> None:
    """``kubecertd --check`` reads the unit without paying for PyYAML, json or glob."""
    code = (
        "import sys, kubecertd.discover; sys.exit(len({'yaml', 'json', 'glob'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- properties ----------------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PIECES = [
    "[Service]",
    "[Unit]",
    "ExecStart=",
    "Environment=",
    "EnvironmentFile=",
    "=",
    "-",
    "@",
    ":",
    "!",
    "+",
    "%",
    "%n",
    "$",
    "${",
    "}",
    "$$",
    "\\",
    "\\;",
    ";",
    "#",
    "'",
    '"',
    " ",
    "\t",
    "\n",
    "\r",
    "\\x4",
    "\\u",
    "/bin/k",
    "A=1",
    "export ",
]
unit_like = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), max_size=40).map(
    "".join
)


@FUZZ
@given(text=st.one_of(st.text(), unit_like))
def test_parse_unit_never_raises(text: str) -> None:
    """Any text as a unit file gives settings, never an exception."""
    settings_ = parse_unit([("u", text), ("d", text)], "k3s-agent.service")
    expand(settings_.exec_start, dict(settings_.environment))


@FUZZ
@given(text=st.one_of(st.text(), unit_like))
def test_parse_environment_file_never_raises(text: str) -> None:
    """Any text as an environment file gives valid names only, never an exception."""
    for name in parse_environment_file(text):
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)


@FUZZ
@given(text=st.binary(max_size=512))
def test_parse_kubelet_config_raises_only_value_error(text: bytes) -> None:
    """Any bytes as a KubeletConfiguration give a result or a ValueError."""
    try:
        parse_kubelet_config(text, "/c")
    except ValueError as exc:
        assert str(exc).startswith("/c: ")


# --- against the real systemd ----------------------------------------------------------------

DUMP = "import json, os, sys\nopen('/run/argv-' + os.environ['OUT'], 'w').write(json.dumps(sys.argv[1:]))\n"


def test_agrees_with_systemd(node: Node) -> None:
    """A node's systemd 252 runs exactly the command read_unit reads, for kubeadm's layout
    and for quoting, specifier and expansion corner cases."""
    python = f"{VENV}/bin/python"
    units = {
        "kubeadm-like": {
            "/etc/systemd/system/kubeadm-like.service": service(
                f"{python} /run/dump.py", "Type=oneshot"
            ),
            "/etc/systemd/system/kubeadm-like.service.d/10-kubeadm.conf": KUBEADM_DROPIN.replace(
                "/usr/bin/kubelet", f"{python} /run/dump.py"
            ).replace("[Service]", "[Service]\nEnvironment=OUT=kubeadm-like"),
            "/var/lib/kubelet/kubeadm-flags.env": KUBEADM_FLAGS_ENV,
            "/etc/default/kubelet": "# extra \\\nKUBELET_EXTRA_ARGS=swallowed\nKUBELET_EXTRA_ARGS='--a=\"q q\"' x\\ y\n",
        },
        "corners": {
            "/etc/systemd/system/corners.service": (
                "[Service]\nType=oneshot\n"
                'Environment=OUT=corners \'SPLIT=one "two three" fo\\\\ur\' EMPTY= "WS=  a  b  "\n'
                f"ExecStart=-{python} /run/dump.py $SPLIT ${{SPLIT}} x$SPLIT x${{SPLIT}}y $EMPTY \\\n"
                "# comment in a continuation\n"
                '  ${EMPTY} $UNSET $$ a$$b ${A:-b} "q $SPLIT" \'q ${WS}\' $WS mid"dle quo"te \\\n'
                "  \\x41\\u00e9\\s\\q %% %n %N %p %j \\; $ $1x $bad/x\n"
            ),
        },
    }
    node.write_file("/run/dump.py", DUMP)
    for files in units.values():
        for path, text in files.items():
            node.write_file(path, text)
    node.systemctl("daemon-reload", check=True)

    def ran_by(name: str) -> list[str]:
        return list(json.loads(node.read_file(f"/run/argv-{name}")))

    for name in units:
        node.systemctl("start", f"{name}.service", check=True)
        ran = ran_by(name)
        unit = read_unit(f"{name}.service", os.fspath(node.path("/")))
        assert unit is not None, name
        assert list(unit.argv[2:]) == ran, name
    assert "--kubeconfig=/etc/kubernetes/kubelet.conf" in ran_by("kubeadm-like")
    assert "Aé \\q" in ran_by("corners")
