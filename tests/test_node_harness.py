"""The throwaway-node harness itself, proven against a real systemd 252.

Each test boots its own node (about half a second) and stops it afterwards (a few
tenths of a second); the kubelet tests add the stand-ins' start-up.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node_harness import (
    NODE,
    OTHER_NODE,
    PROJECT,
    TOOLS,
    VENV_PYTHON,
    Cluster,
    Node,
    NodeHarnessError,
    unavailable_reason,
)

pytestmark = pytest.mark.timeout(90)

FORBIDDEN = (
    f'nodes "{NODE}" is forbidden: node "{OTHER_NODE}" is not allowed to modify node "{NODE}"'
)

# Restart a unit the way kubecertd does (SPEC "Healing", step 6), with jeepney's blocking
# API: AddMatch JobRemoved, Subscribe, RestartUnit(unit, "replace"), wait for our job.
RESTART_UNIT = r"""
import json, sys, time
from jeepney import DBusAddress, MatchRule, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

unit = sys.argv[1]
manager = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                      interface="org.freedesktop.systemd1.Manager")
conn = open_dbus_connection(bus="SYSTEM")

def call(address, method, signature=None, body=()):
    reply = conn.send_and_get_reply(new_method_call(address, method, signature, body), timeout=10)
    if reply.header.message_type == MessageType.error:
        raise SystemExit(f"{method}: {reply.body}")
    return reply.body

def main_pid(path):
    props = DBusAddress(path, bus_name="org.freedesktop.systemd1",
                        interface="org.freedesktop.DBus.Properties")
    return call(props, "Get", "ss", ("org.freedesktop.systemd1.Service", "ExecMainPID"))[0][1]

unit_path = call(manager, "GetUnit", "s", (unit,))[0]
old_pid = main_pid(unit_path)
# No sender= in the rule: signals carry systemd's unique name (":1.0"), which jeepney's
# local filter would compare with the well-known name and never match.
rule = MatchRule(type="signal", path="/org/freedesktop/systemd1",
                 interface="org.freedesktop.systemd1.Manager", member="JobRemoved")
call(message_bus, "AddMatch", "s", (rule.serialise(),))
call(manager, "Subscribe")
with conn.filter(rule) as queue:
    started = time.monotonic()
    job = call(manager, "RestartUnit", "ss", (unit, "replace"))[0]
    while True:
        job_id, job_path, job_unit, result = conn.recv_until_filtered(queue, timeout=10).body
        if job_path == job:
            break
    seconds = time.monotonic() - started
print(json.dumps({"job": job, "unit": job_unit, "result": result, "old_pid": old_pid,
                  "new_pid": main_pid(unit_path), "seconds": seconds}))
"""


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return Cluster.new()


def start_kubelet(node: Node, cluster: Cluster, node_name: str | None = None) -> None:
    cluster.install(node, node_name)
    node.systemctl("start", "kubelet.service", check=True)


# --- booting --------------------------------------------------------------------------


def test_node_has_its_hostname_and_only_our_units(node: Node) -> None:
    assert node.run(["hostname"], check=True).stdout.strip() == NODE
    assert node.read_file("/etc/hostname").decode().strip() == NODE
    assert node.systemctl("is-system-running").stdout.strip() == "running"
    services = node.systemctl(
        "list-units", "--all", "--plain", "--no-legend", "--type=service", check=True
    ).stdout.split()
    assert {"systemd-journald.service", "dbus.service"} <= set(services)
    assert "cron.service" not in services
    # systemd runs in unified mode at the root of the node's own cgroup2 folder.
    assert "0::/init.scope" in node.run(["cat", "/proc/1/cgroup"], check=True).stdout.splitlines()
    assert (node.cgroup / "init.scope").is_dir()
    assert node.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"]).stdout.strip() == "cgroup2fs"
    # PID 1 is systemd; the network namespace has only a loopback, which is up.
    assert node.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    links = node.run(["ip", "-o", "link"], check=True).stdout.splitlines()
    assert len(links) == 1
    assert "lo:" in links[0]
    assert "UP" in links[0]


def test_node_cannot_change_the_host_disk(node: Node) -> None:
    marker = f"/etc/kubecertd-node-{secrets.token_hex(4)}"
    node.run(["touch", marker, "/var/tmp/node-was-here", "/opt/node-was-here"], check=True)
    assert node.run(["test", "-e", marker]).returncode == 0
    assert not Path(marker).exists()
    assert not Path("/opt/node-was-here").exists()
    # The project and the venv are read-only inside.
    denied = node.run(["touch", str(PROJECT / ".node-was-here")])
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr


def test_ssl_dir_is_shared_with_the_host(node: Node) -> None:
    (node.ssl_dir / "from-host").write_text("hello")
    assert node.run(["cat", "/etc/kubernetes/ssl/from-host"], check=True).stdout == "hello"
    node.run(["sh", "-c", "echo bye > /etc/kubernetes/ssl/from-node"], check=True)
    assert (node.ssl_dir / "from-node").read_text() == "bye\n"
    node.write_file("/etc/kubecertd/kubecertd.toml", 'node_name = ""\n', mode=0o600)
    assert node.run(["cat", "/etc/kubecertd/kubecertd.toml"]).stdout == 'node_name = ""\n'
    assert node.read_file("/etc/kubecertd/kubecertd.toml") == b'node_name = ""\n'


def test_extra_units_wants_and_binds(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    units = tmp_path / "units"
    (units / "kubelet.service.d").mkdir(parents=True)
    (units / "hello.service").write_text(
        "[Unit]\nDescription=hello\n[Service]\n"
        "ExecStart=/bin/sh -c 'echo hello from @HOSTNAME@; exec sleep infinity'\n"
    )
    (units / "kubelet.service.d" / "10-test.conf").write_text("[Service]\nEnvironment=FOO=bar\n")
    state = tmp_path / "state"
    state.mkdir()
    anchor = tmp_path / "signer-ca.pem"
    anchor.write_text("not really a CA\n")
    node = node_factory(
        extra_units=[units],
        wants=["hello.service"],
        binds=[(state, "/var/lib/kubecertd"), (anchor, "/etc/kubecertd/signer-ca.pem", "ro")],
    )
    assert node.unit_property("hello.service", "ActiveState") == "active"
    node.wait_for_message("hello.service", f"hello from {NODE}")
    assert node.unit_property("kubelet.service", "Environment") == "FOO=bar"
    node.run(["touch", "/var/lib/kubecertd/lock"], check=True)
    assert (state / "lock").exists()
    assert node.run(["cat", "/etc/kubecertd/signer-ca.pem"]).stdout == "not really a CA\n"
    assert node.run(["sh", "-c", "echo x > /etc/kubecertd/signer-ca.pem"]).returncode != 0


# --- journald and the system bus ------------------------------------------------------


def test_journald_takes_logger_and_systemd_cat(node: Node) -> None:
    token = secrets.token_hex(6)
    node.run(["logger", "-t", "harness-logger", f"logger {token}"], check=True)
    node.run(["systemd-cat", "-t", "harness-cat", "echo", f"cat {token}"], check=True)
    node.wait_for_message("", f"logger {token}")
    entries = node.wait_for(lambda: node.journal(SYSLOG_IDENTIFIER="harness-cat"))
    assert entries[0]["MESSAGE"] == f"cat {token}"
    assert entries[0]["_HOSTNAME"] == NODE


def test_python_journal_send_keeps_structured_fields(node: Node) -> None:
    code = (
        "from systemd import journal\n"
        "journal.send(MESSAGE='certificate renewed', KUBECERTD_EVENT='renewed',"
        " KUBECERTD_NODE='server2277z.prod.jp.local', KUBECERTD_SERIAL='5f0c')\n"
    )
    node.python(code, check=True)
    entries = node.wait_for(lambda: node.journal(KUBECERTD_EVENT="renewed"))
    assert len(entries) == 1
    assert entries[0]["MESSAGE"] == "certificate renewed"
    assert entries[0]["KUBECERTD_NODE"] == NODE
    assert entries[0]["KUBECERTD_SERIAL"] == "5f0c"
    # The raw command the brief names, too.
    raw = node.run(["journalctl", "KUBECERTD_EVENT=renewed", "-o", "json"], check=True).stdout
    assert json.loads(raw.splitlines()[0])["KUBECERTD_EVENT"] == "renewed"


def test_system_bus_answers_for_systemd(node: Node) -> None:
    version = node.run(
        [
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.DBus.Properties",
            "Get",
            "ss",
            "org.freedesktop.systemd1.Manager",
            "Version",
        ],
        check=True,
    ).stdout
    assert version.startswith('v s "252')
    unit = node.run(
        [
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "GetUnit",
            "s",
            "dbus.service",
        ],
        check=True,
    ).stdout
    assert unit.strip() == 'o "/org/freedesktop/systemd1/unit/dbus_2eservice"'


def test_venv_python_works_under_protect_home(node: Node) -> None:
    code = (
        "import os, sys, cryptography, jeepney, systemd.journal\n"
        "maps = [l.split()[-1] for l in open('/proc/self/maps') if 'libpython' in l]\n"
        "print(sys.version.split()[0], os.listdir('/root'), maps[0], sep='|')\n"
    )
    result = node.run(
        [
            "systemd-run",
            "--quiet",
            "--wait",
            "--pipe",
            "-p",
            "ProtectHome=yes",
            "-p",
            "PrivateTmp=yes",
            "-p",
            "ProtectSystem=strict",
            VENV_PYTHON,
            "-c",
            code,
        ],
        check=True,
    )
    version, root_listing, libpython = result.stdout.strip().split("|")
    assert version == sys.version.split()[0]  # the venv's own interpreter, not Debian's
    assert root_listing == "[]"  # /root is hidden, and it still runs
    assert not libpython.startswith("/root/")
    assert not libpython.startswith("/usr/lib/")


# --- the kubelet and API server stand-ins --------------------------------------------


def test_healthy_kubelet_registers_and_stays_active(node: Node, cluster: Cluster) -> None:
    start_kubelet(node, cluster)
    node.wait_for_message("kubelet.service", f"registered node {NODE}", timeout=20)
    # Two heartbeats later it is still the same, active process.
    pid = node.unit_property("kubelet.service", "ExecMainPID")
    node.wait_for(
        lambda: (
            sum(f"200 patch node {NODE}" in m for m in node.messages("fake-apiserver.service")) >= 3
        ),
        timeout=10,
        what="two heartbeats",
    )
    props = node.unit_properties("kubelet.service", "ActiveState", "NRestarts", "ExecMainPID")
    assert props == {"ActiveState": "active", "NRestarts": "0", "ExecMainPID": pid}


def test_restart_unit_through_dbus_with_jeepney(node: Node, cluster: Cluster) -> None:
    start_kubelet(node, cluster)
    node.wait_for_message("kubelet.service", f"registered node {NODE}", timeout=20)
    result = node.python(RESTART_UNIT, "kubelet.service", check=True, timeout=30)
    answer = json.loads(result.stdout)
    assert answer["result"] == "done"
    assert answer["unit"] == "kubelet.service"
    assert answer["old_pid"] > 0
    assert answer["new_pid"] not in (0, answer["old_pid"])
    assert node.unit_property("kubelet.service", "ExecMainPID") == str(answer["new_pid"])
    node.wait_for(
        lambda: len([m for m in node.messages("kubelet.service") if "registered node" in m]) == 2,
        timeout=20,
        what="the restarted kubelet registering again",
    )


def test_kubelet_with_another_nodes_pair_is_forbidden(node: Node, cluster: Cluster) -> None:
    start_kubelet(node, cluster, node_name=OTHER_NODE)
    message = node.wait_for_message("kubelet.service", FORBIDDEN, timeout=20)
    assert f'Unable to register node "{NODE}" with API server' in message
    node.wait_for(
        lambda: node.unit_property("kubelet.service", "ExecMainStatus") == "1",
        what="kubelet's exit status 1",
    )
    assert node.unit_property("kubelet.service", "Result") == "exit-code"
    denials = [m for m in node.messages("fake-apiserver.service") if m.startswith("403")]
    assert FORBIDDEN in denials[0]
    assert f'user="system:node:{OTHER_NODE}"' in denials[0]


def _delete(name: str) -> Callable[[Node, Cluster], None]:
    def mutate(node: Node, cluster: Cluster) -> None:
        (node.ssl_dir / name).unlink()

    return mutate


def _mismatch(node: Node, cluster: Cluster) -> None:
    other = cluster.kubelet_pair(NODE)
    (node.ssl_dir / "worker-key.pem").write_bytes(other.key_pem)


def _directory(node: Node, cluster: Cluster) -> None:
    (node.ssl_dir / "worker.pem").unlink()
    (node.ssl_dir / "worker.pem").mkdir()


def _truncate(node: Node, cluster: Cluster) -> None:
    (node.ssl_dir / "worker.pem").write_bytes(b"")


def _expired(node: Node, cluster: Cluster) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    pair = cluster.kubelet_pair(
        NODE, not_before=now - dt.timedelta(days=60), not_after=now - dt.timedelta(days=1)
    )
    cluster.install_kubelet(node, pair=pair)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_delete("worker.pem"), "unable to read client-cert /etc/kubernetes/ssl/worker.pem"),
        (_delete("worker-key.pem"), "unable to read client-key /etc/kubernetes/ssl/worker-key.pem"),
        (_delete("ca.pem"), "unable to read certificate-authority /etc/kubernetes/ssl/ca.pem"),
        (
            _directory,
            "worker.pem for default-auth due to open /etc/kubernetes/ssl/worker.pem: is a directory",
        ),
        (_mismatch, "tls: private key does not match public key"),
        (_truncate, "tls: failed to find any PEM data in certificate input"),
        (_expired, "x509: certificate has expired or is not yet valid"),
    ],
    ids=[
        "cert-deleted",
        "key-deleted",
        "ca-deleted",
        "cert-unreadable",
        "key-mismatch",
        "cert-empty",
        "expired",
    ],
)
def test_kubelet_without_a_usable_pair_exits_non_zero(
    node: Node, cluster: Cluster, mutate: Callable[[Node, Cluster], None], expected: str
) -> None:
    cluster.install(node)
    mutate(node, cluster)
    node.systemctl("start", "kubelet.service", check=True)
    message = node.wait_for_message("kubelet.service", expected, timeout=20)
    assert "failed to run Kubelet" in message
    node.wait_for(
        lambda: node.unit_property("kubelet.service", "ExecMainStatus") == "1",
        what="kubelet's exit status 1",
    )
    assert not any("registered node" in m for m in node.messages("kubelet.service"))


def test_crash_looping_kubelet_hits_its_start_limit(node: Node, cluster: Cluster) -> None:
    """What kubecertd finds on a node whose files went missing: a failed kubelet that a
    plain RestartUnit cannot bring back until ResetFailedUnit (SPEC, Healing step 6)."""
    cluster.install(node)
    (node.ssl_dir / "worker.pem").unlink()
    node.systemctl("start", "kubelet.service", check=True)
    node.wait_for(
        lambda: node.unit_property("kubelet.service", "ActiveState") == "failed",
        timeout=30,
        what="kubelet failed after its start limit",
    )
    assert any("Start request repeated too quickly" in m for m in node.messages("kubelet.service"))
    assert node.systemctl("restart", "kubelet.service").returncode != 0
    cluster.install_kubelet(node)
    node.systemctl("reset-failed", "kubelet.service", check=True)
    node.systemctl("restart", "kubelet.service", check=True)
    node.wait_for_message("kubelet.service", f"registered node {NODE}", timeout=20)


def test_kubelet_whose_pair_goes_bad_while_running_fails(node: Node, cluster: Cluster) -> None:
    start_kubelet(node, cluster)
    node.wait_for_message("kubelet.service", f"registered node {NODE}", timeout=20)
    cluster.install_kubelet(node, OTHER_NODE)
    # kubelet's own line (klog quotes the err= value) while it retries, then the exit
    quoted = FORBIDDEN.replace('"', '\\"')
    message = node.wait_for_message("kubelet.service", quoted, timeout=15)
    assert '"Error updating node status, will retry"' in message
    node.wait_for(
        lambda: node.unit_property("kubelet.service", "ExecMainStatus") == "1", timeout=30
    )


# --- several nodes, stopping, cleaning up ---------------------------------------------


def test_two_nodes_run_at_once(node_factory: Callable[..., Node], cluster: Cluster) -> None:
    # kubelet's node name is the lowercased hostname.
    first, second = node_factory(NODE), node_factory("Server2267Z.Prod.JP.local")
    assert first.dir != second.dir
    assert first.cgroup != second.cgroup
    assert first.namespaces != second.namespaces
    for each in (first, second):
        # Each has its own API server on 127.0.0.1:6443 (its own network namespace).
        start_kubelet(each, cluster)
    for each in (first, second):
        assert each.run(["hostname"]).stdout.strip() == each.hostname
        name = each.hostname.lower()
        each.wait_for_message("kubelet.service", f"registered node {name}", timeout=20)
    machine_ids = {each.read_file("/etc/machine-id") for each in (first, second)}
    assert len(machine_ids) == 2


def _mounts_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                lines = Path(entry.path, "mountinfo").read_text().splitlines()
            except OSError:
                continue
            found += [line for line in lines if text in line]
    return found


def _in_namespaces(namespaces: dict[str, int]) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            for kind, inode in namespaces.items():
                try:
                    if os.stat(f"/proc/{entry.name}/ns/{kind}").st_ino == inode:
                        pids.append(int(entry.name))
                except OSError:
                    continue
    return pids


def test_stop_leaves_nothing_behind(node_factory: Callable[..., Node], cluster: Cluster) -> None:
    private_before = set(Path("/tmp").glob("systemd-private-*"))
    node = node_factory()
    start_kubelet(node, cluster)  # fake-apiserver.service has PrivateTmp=yes
    node.wait_for_message("kubelet.service", "registered node", timeout=20)
    assert node.run("ls -d /tmp/systemd-private-*", check=True).stdout.strip()
    assert set(Path("/tmp").glob("systemd-private-*")) == private_before
    pid, cgroup, namespaces = node.pid, node.cgroup, node.namespaces
    assert _in_namespaces(namespaces)
    assert _mounts_mentioning(str(node.dir))

    node.stop()
    assert node.stop_seconds is not None
    assert node.stop_seconds < 10
    assert not Path(f"/proc/{pid}").exists()
    assert not node.alive
    assert _in_namespaces(namespaces) == []
    assert _mounts_mentioning(str(node.dir)) == []
    assert not cgroup.exists()
    assert not (node.dir / "rw").exists()
    assert set(Path("/tmp").glob("systemd-private-*")) == private_before
    node.stop()  # idempotent
    with pytest.raises(NodeHarnessError, match="not running"):
        node.run(["true"])


def test_a_dead_owner_takes_its_node_down(tmp_path: Path) -> None:
    """A killed test run must not leave nodes behind: the node dies with its owner."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    owner = subprocess.Popen(["sleep", "60"])
    node_dir = tmp_path / "n"
    try:
        env = {**os.environ, "NODE_OWNER_PID": str(owner.pid)}
        booted = subprocess.run(
            [sys.executable, "-S", str(TOOLS / "boot.py"), str(node_dir), NODE],
            capture_output=True,
            text=True,
            env=env,
            timeout=40,
            check=True,
        )
        pid = int(booted.stdout)
        assert Path(f"/proc/{pid}").exists()
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not Path(f"/proc/{pid}").exists()
    finally:
        owner.kill()
        owner.wait()
        subprocess.run(
            [sys.executable, "-S", str(TOOLS / "stop.py"), str(node_dir)], check=True, timeout=30
        )
    state = dict(line.split("=", 1) for line in (node_dir / "node.env").read_text().splitlines())
    assert not Path(state["NODE_CGROUP"]).exists()


def test_boot_refuses_what_would_change_the_host(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "NODE_BINDS": f"{tmp_path}:/srv/not-on-this-host/x"}
    result = subprocess.run(
        [sys.executable, "-S", str(TOOLS / "boot.py"), str(tmp_path / "n"), NODE],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "would change the host" in result.stderr
    assert not Path("/srv/not-on-this-host").exists()
