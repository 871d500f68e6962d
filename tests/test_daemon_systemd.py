"""The agent under a real systemd: heals in place, restarts kubelet through D-Bus.

Each test boots a throwaway node (tests/healing_node.py): journald, the system bus,
kubelet and API-server stand-ins, the real signer and the shipped kubecertd.service.
Assertions read real journalctl output, unit state and PIDs, and the files.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from kubecertd.signer.authority import SERVICE_USER

from healing_node import AGENT, SIGNER, HealingNode, matching, node_of, serial_of
from node_harness import PROJECT, VENV, Node

NODE = "server2277z.prod.jp.local"
OTHER = "server2267z.prod.jp.local"


@pytest.fixture
def healing(node_factory: Callable[..., Node]) -> HealingNode:
    return HealingNode.create(node_factory)


def test_deleted_cert_is_healed_and_kubelet_registers(healing: HealingNode) -> None:
    """worker.pem deleted: new pair installed, kubelet restarted through D-Bus and registered."""
    old_pid = healing.kubelet_pid()
    renewed = len(healing.events("renewed"))
    (healing.node.ssl_dir / "worker.pem").unlink()
    event = healing.wait_event("renewed", after=renewed)
    assert event["KUBECERTD_FINDING"] == "cert-missing"
    cert, key = healing.pair()
    assert matching(cert, key) and node_of(cert) == NODE
    assert event["KUBECERTD_SERIAL"] == serial_of(cert)
    new_pid = healing.wait_registered(other_than=old_pid)
    restarted = healing.wait_event("kubelet-restarted")
    assert restarted["KUBECERTD_RESULT"] == "done" and restarted["KUBECERTD_PID"] == str(new_pid)
    assert healing.check_json()["healthy"] is True


def test_seed_case_another_nodes_pair_is_replaced(healing: HealingNode) -> None:
    """Another node's pair copied in: kubelet is refused, kubecertd reports cert-wrong-node and heals."""
    old_pid = healing.kubelet_pid()
    renewed = len(healing.events("renewed"))
    healing.cluster.install_kubelet(healing.node, OTHER)
    finding = healing.wait_event("finding", KUBECERTD_FINDING="cert-wrong-node")
    assert f"certificate belongs to node {OTHER}, this node is {NODE}" in finding["MESSAGE"]
    healing.wait_event("renewed", after=renewed)
    cert, key = healing.pair()
    assert node_of(cert) == NODE and matching(cert, key)
    healing.wait_registered(other_than=old_pid)


def truncate_key(healing: HealingNode) -> None:
    (healing.node.ssl_dir / "worker-key.pem").write_bytes(b"")


def expire_cert(healing: HealingNode) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    pair = healing.cluster.kubelet_pair(
        NODE, now - dt.timedelta(days=31), now - dt.timedelta(seconds=5)
    )
    healing.cluster.install_kubelet(healing.node, pair=pair)


def delete_ca(healing: HealingNode) -> None:
    (healing.node.ssl_dir / "ca.pem").unlink()


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        pytest.param(truncate_key, "key-invalid", id="key-truncated"),
        pytest.param(expire_cert, "cert-expired", id="cert-expired"),
        pytest.param(delete_ca, "ca-missing", id="ca-deleted"),
    ],
)
def test_damage_is_healed(
    healing: HealingNode, damage: Callable[[HealingNode], None], code: str
) -> None:
    """Each kind of damage is diagnosed by its code and healed to a complete, trusted pair."""
    old_pid = healing.kubelet_pid()
    renewed = len(healing.events("renewed"))
    damage(healing)
    assert healing.wait_event("renewed", after=renewed)["KUBECERTD_FINDING"] == code
    assert healing.check_json()["healthy"] is True
    assert (healing.node.ssl_dir / "ca.pem").read_bytes() == healing.cluster.ca.pem
    healing.wait_registered(other_than=old_pid)


def test_ssl_dir_removed_and_recreated_empty(healing: HealingNode) -> None:
    """The whole ssl_dir deleted and re-created empty is watched again and filled."""
    renewed = len(healing.events("renewed"))
    script = "umount /etc/kubernetes/ssl && rm -rf /etc/kubernetes/ssl && sleep 0.3 && mkdir /etc/kubernetes/ssl"
    healing.node.run(["sh", "-c", script], check=True)
    event = healing.wait_event("renewed", after=renewed, timeout=30)
    assert event["KUBECERTD_FINDING"] in {"ca-missing", "cert-missing", "key-missing"}
    files = {
        name: healing.node.read_file(f"/etc/kubernetes/ssl/{name}")
        for name in ("ca.pem", "worker.pem", "worker-key.pem")
    }
    assert matching(files["worker.pem"], files["worker-key.pem"])
    assert node_of(files["worker.pem"]) == NODE


def test_signer_down_backs_off_then_heals(healing: HealingNode) -> None:
    """Signer unreachable: backoff in the journal, files untouched; healed once it is back."""
    healing.node.systemctl("stop", "kubecertd-signer.service", check=True)
    renewed = len(healing.events("renewed"))
    key_before = (healing.node.ssl_dir / "worker-key.pem").read_bytes()
    (healing.node.ssl_dir / "worker.pem").unlink()
    errors = [healing.wait_event("signer-error", after=n, timeout=30) for n in range(3)]
    assert all("retrying in" in e["MESSAGE"] for e in errors)
    assert [e["KUBECERTD_ATTEMPT"] for e in errors] == ["1", "2", "3"]
    assert not (healing.node.ssl_dir / "worker.pem").exists()
    assert (healing.node.ssl_dir / "worker-key.pem").read_bytes() == key_before
    assert "signer unreachable, retrying in" in healing.node.unit_property(AGENT, "StatusText")
    healing.node.systemctl("start", "kubecertd-signer.service", check=True)
    healing.wait_event("renewed", after=renewed, timeout=40)
    assert healing.check_json()["healthy"] is True


def test_signer_serves_as_its_own_user(healing: HealingNode) -> None:
    """The shipped signer unit runs as kubecertd-signer with no capability, on the keys that
    user owns, and its state is that user's (the node enrolled through it)."""
    node = healing.node
    uid = node.run(["id", "-u", SERVICE_USER], check=True).stdout.strip()
    cgroup = node.unit_property(SIGNER, "ControlGroup")
    pids = node.run(["cat", f"/sys/fs/cgroup{cgroup}/cgroup.procs"], check=True).stdout.split()
    assert pids
    for pid in pids:
        lines = node.run(["cat", f"/proc/{pid}/status"], check=True).stdout.splitlines()
        status = dict(line.split(":\t", 1) for line in lines)
        assert status["Uid"].split() == [uid] * 4, pid
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0, pid
    state = "/var/lib/kubecertd-signer"
    owners = node.run(["stat", "-c", "%u %a", state, f"{state}/state.db"], check=True).stdout
    assert owners.splitlines() == [f"{uid} 700", f"{uid} 600"]


@pytest.mark.parametrize(
    ("lie", "code"),
    [
        pytest.param("other-node", "cert-wrong-node", id="another-node"),
        pytest.param("other-key", "key-mismatch", id="another-key"),
        pytest.param("other-ca", "cert-untrusted", id="another-ca"),
    ],
)
def test_lying_signer_is_refused(healing: HealingNode, lie: str, code: str) -> None:
    """A signer answering with a certificate kubelet could not use is refused; files untouched."""
    healing.node.systemctl("stop", "kubecertd-signer.service", check=True)
    healing.node.systemctl("start", f"lying-signer@{lie}.service", check=True)
    healing.node.wait_for(
        lambda: healing.node.wait_for_message(f"lying-signer@{lie}.service", "on 127.0.0.1")
    )
    failed = len(healing.events("renew-failed"))
    before = healing.pair()
    (healing.node.ssl_dir / "worker-key.pem").unlink()
    event = healing.wait_event("renew-failed", after=failed)
    assert event["KUBECERTD_FINDING"] == code
    assert not (healing.node.ssl_dir / "worker-key.pem").exists()
    assert (healing.node.ssl_dir / "worker.pem").read_bytes() == before[0]
    assert healing.events("installed") == []


def test_kubelet_that_does_not_come_back_is_rolled_back(node_factory: Callable[..., Node]) -> None:
    """Routine renewal, kubelet fails with the new pair: the old pair is put back and kubelet restarted."""
    healing = HealingNode.create(node_factory, settle="2s", start_agent=False)
    now = dt.datetime.now(dt.timezone.utc)
    old = healing.cluster.kubelet_pair(
        NODE, now - dt.timedelta(days=27), now + dt.timedelta(days=3)
    )
    healing.cluster.install_kubelet(healing.node, pair=old)
    old_serial = serial_of(old.pem)
    # The API server accepts only the old certificate: kubelet will fail with any new one.
    (healing.node.apiserver_dir / "allowed-serials").write_text(old_serial + "\n")
    healing.node.systemctl("restart", "kubelet.service", check=True)
    healing.wait_registered()
    healing.start_agent()
    rollback = healing.wait_event("rollback", timeout=40)
    assert rollback["KUBECERTD_SERIAL"] != old_serial
    assert healing.pair() == (old.pem, old.key_pem)
    healing.wait_registered(timeout=30)
    assert serial_of(healing.pair()[0]) == old_serial


def test_restart_budget_stops_a_loop(node_factory: Callable[..., Node]) -> None:
    """With max_restarts_per_hour = 1 the second heal installs but does not restart kubelet."""
    healing = HealingNode.create(node_factory, max_restarts=1)
    for round_ in range(2):
        renewed = len(healing.events("renewed"))
        (healing.node.ssl_dir / "worker.pem").unlink()
        healing.wait_event("renewed", after=renewed)
        healing.wait_event("kubelet-restarted", after=round_)
    results = [e["KUBECERTD_RESULT"] for e in healing.events("kubelet-restarted")]
    assert results == ["done", "budget-exhausted"]
    assert "max_restarts_per_hour" in healing.events("kubelet-restarted")[1]["MESSAGE"]


def test_journal_explains_the_seed_scenario(healing: HealingNode) -> None:
    """journalctl -u kubecertd -x shows each step with the catalog's explanation."""
    healing.cluster.install_kubelet(healing.node, OTHER)
    healing.wait_event("kubelet-restarted")
    catalog = (PROJECT / "systemd" / "kubecertd.catalog").read_bytes()
    healing.node.write_file("/usr/lib/systemd/catalog/kubecertd.catalog", catalog)
    healing.node.run(["journalctl", "--update-catalog"], check=True)
    text = healing.node.run(["journalctl", "-u", AGENT, "-x", "--no-pager"], check=True).stdout
    for expected in (
        f"certificate belongs to node {OTHER}, this node is {NODE}",
        "kubecertd found cert-wrong-node on node " + NODE,
        "kubelet certificate of " + NODE + " renewed",
        "kubelet restarted by kubecertd (done)",
        "A new private key was made on this node; it never leaves it.",
    ):
        assert expected in text


CRASH_DROP_IN = """\
[Service]
# Test only: the first start after a spec is armed runs under strace, which SIGKILLs
# the agent at the Nth call of one syscall; systemd then restarts it unarmed.
NotifyAccess=all
WatchdogSec=0
RestartSec=100ms
SystemCallFilter=
ReadWritePaths=/run/kubecertd-crash
ExecStart=
ExecStart=/bin/sh -c 'spec=/run/kubecertd-crash/spec; if [ -s $$spec ]; then inject=$$(cat $$spec); : > $$spec; exec strace -f -qq -o /dev/null -e trace=$${inject%%%%:*} -e inject=$$inject:signal=KILL @VENV@/bin/kubecertd run; fi; exec @VENV@/bin/kubecertd run'
"""

# Every rename (intent, worker.pem, worker-key.pem, restart record), the fsyncs of the
# temporaries and backups, and the intent's removal: the points where a crash can split
# an install.
KILL_POINTS = [f"rename:when={n}" for n in (1, 2, 3, 4)]
KILL_POINTS += [f"fsync:when={n}" for n in (1, 2, 4, 6)]
KILL_POINTS += ["unlink:when=1"]


def test_sigkill_during_install_leaves_a_complete_pair(node_factory: Callable[..., Node]) -> None:
    """SIGKILL at each syscall of an install: after systemd restarts the agent the pair is complete."""
    healing = HealingNode.create(node_factory, start_agent=False)
    drop_in = healing.node.path("/etc/systemd/system/kubecertd.service.d")
    drop_in.mkdir(parents=True, exist_ok=True)
    (drop_in / "crash.conf").write_text(CRASH_DROP_IN.replace("@VENV@", str(VENV)))
    healing.node.run(["mkdir", "-p", "/run/kubecertd-crash"], check=True)
    healing.node.systemctl("daemon-reload", check=True)
    now = dt.datetime.now(dt.timezone.utc)
    for point in KILL_POINTS:
        healing.node.systemctl("stop", AGENT, check=True)
        old = healing.cluster.kubelet_pair(
            NODE, now - dt.timedelta(days=27), now + dt.timedelta(days=3)
        )
        healing.cluster.install_kubelet(healing.node, pair=old)  # healthy, past its renewal point
        healing.node.write_file("/run/kubecertd-crash/spec", point.encode())
        restarts = int(healing.node.unit_property(AGENT, "NRestarts"))
        starts = len(start_checks(healing))
        healing.node.systemctl("start", AGENT)
        healing.node.wait_for(
            lambda r=restarts: int(healing.node.unit_property(AGENT, "NRestarts")) > r,
            timeout=30, what=f"a restart after SIGKILL at {point}",
        )  # fmt: skip
        # The restarted agent finished or undid the install, judged the files, and (if
        # it found the old pair) renewed again; either way it ends idle and healthy.
        healing.node.wait_for(lambda n=starts: len(start_checks(healing)) >= n + 2, timeout=30)
        healing.node.wait_for(
            lambda: healing.node.unit_property(AGENT, "StatusText").startswith("healthy"),
            timeout=30,
        )
        cert, key = healing.pair()
        assert matching(cert, key), point
        assert serial_of(cert) != serial_of(old.pem)  # old pair kept or not, it was renewed
        assert not [p for p in healing.node.ssl_dir.iterdir() if p.name.endswith(".kubecertd-new")]
    codes = {e.get("KUBECERTD_FINDING") for e in healing.events("finding")}
    assert not codes & {
        "key-mismatch",
        "cert-invalid",
        "key-invalid",
        "cert-missing",
        "key-missing",
    }
    starts = start_checks(healing)
    assert len(starts) == 2 * len(KILL_POINTS)
    assert all(message.startswith("check (start): healthy") for message in starts), starts


def start_checks(healing: HealingNode) -> list[str]:
    return [e["MESSAGE"] for e in healing.events("check") if "(start)" in e["MESSAGE"]]


def test_lifecycle_under_systemd(healing: HealingNode) -> None:
    """READY, STATUS and WATCHDOG reach systemd; a second instance is refused; SIGTERM exits 0."""
    status = healing.node.unit_property(AGENT, "StatusText")
    assert status.startswith("healthy, cert valid until ")
    assert int(healing.node.unit_property(AGENT, "WatchdogTimestampMonotonic")) > 0
    pid = healing.node.unit_property(AGENT, "MainPID")
    second = healing.cli("kubecertd", "run", check=False)
    assert second.returncode == 1
    assert f"another kubecertd (PID {pid}) is running" in second.stderr
    healing.node.systemctl("stop", AGENT, check=True)
    assert healing.node.unit_properties(AGENT, "Result", "ExecMainStatus") == {
        "Result": "success",
        "ExecMainStatus": "0",
    }
