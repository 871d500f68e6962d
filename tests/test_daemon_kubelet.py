"""The agent living with kubelet under a real systemd (SPEC "Living with kubelet").

One throwaway node per shape (``tests/healing_node.py``), booted once for the module and
shared by that shape's tests, which run one after the other; each test stops the agent,
writes its own config, installs its own pair and restarts kubelet before it starts the
agent again.  kubelet is tools/node/fake-kubelet: it keeps a rotating or embedded pair in
memory and reloads files named by its kubeconfig, as kubelet does, logs the serial of
the certificate it registers or sends a heartbeat with, and prints kubelet's own lines
when the API server (tools/node/fake-apiserver) refuses it.  The clock's answer comes
from tools/node/fake-timedated on the node's bus.  Assertions read the agent's and the
signer's journal events, kubelet's journal lines and PIDs, ``kubecertd --check`` and the
files; the cursor taken before each step keeps earlier tests' events out of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from kubecertd import pki, schedule

import factories
from healing_node import AGENT, SHAPES, SIGNER, HealingNode, serial_of
from node_harness import OTHER_NODE, node_factory_fixture

SYNCHRONIZED = "/run/fake-timedated/synchronized"  # "no": timedated says NTPSynchronized=false
ALLOWED_SERIALS = "allowed-serials"  # in node.apiserver_dir: the only serials it accepts
ROTATION_FROM = "rotateCertificates: true in /var/lib/kubelet/config.yaml"
RETRYING = '"Error updating node status, will retry"'  # kubelet's heartbeat failure line


@pytest.fixture(scope="module")
def healing(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HealingNode]:
    """One node of the shape named by the test's parameter, its agent not started."""
    factory = node_factory_fixture(tmp_path_factory)
    make = next(factory)
    try:
        yield HealingNode.create(make, shape=SHAPES[request.param], start_agent=False)
    finally:
        with contextlib.suppress(StopIteration):
            next(factory)  # stops the node; a failed stop fails the last test


# --- the node as each test starts it -------------------------------------------------------


def prepare(
    healing: HealingNode,
    pair: factories.Issued,
    settle: str = "1s",
    kubelet: dict[str, str | bool] | None = None,
    tables: str = "",
) -> int:
    """The agent stopped and configured, the clock synchronized, an API server taking any
    certificate, ``pair`` installed and kubelet registered with it; kubelet's PID."""
    node = healing.node
    node.systemctl("stop", AGENT, check=True)
    node.systemctl("reset-failed", AGENT, healing.kubelet_unit)
    healing.write_config(settle=settle, max_restarts=100, kubelet=kubelet, tables=tables)
    node.write_file(SYNCHRONIZED, "yes\n")
    (node.apiserver_dir / ALLOWED_SERIALS).unlink(missing_ok=True)
    healing.install_pair(pair)
    old = healing.kubelet_pid()
    node.systemctl("restart", healing.kubelet_unit, check=True)
    pid = healing.wait_registered(other_than=old)
    assert healing.kubelet_serials(pid) == [serial_of(pair.pem)]
    return pid


def fresh(healing: HealingNode) -> factories.Issued:
    return healing.cluster.kubelet_pair(healing.node_name)


def aged(healing: HealingNode, used: float = 0.85) -> factories.Issued:
    """A healthy 30-day pair with ``used`` of its lifetime gone: past kubecertd's renewal
    point (renew_fraction 0.7 plus a jitter under 0.1)."""
    now, life = dt.datetime.now(dt.timezone.utc), dt.timedelta(days=30)
    pair = healing.cluster.kubelet_pair(
        healing.node_name, now - life * used, now + life * (1 - used)
    )
    assert schedule.renewal_point(pair.cert, 0.7, healing.node_name) < now
    return pair


def expired(healing: HealingNode) -> factories.Issued:
    now = dt.datetime.now(dt.timezone.utc)
    return healing.cluster.kubelet_pair(
        healing.node_name, now - dt.timedelta(days=31), now - dt.timedelta(seconds=5)
    )


# --- reading what happened -----------------------------------------------------------------


def start_agent(healing: HealingNode) -> str:
    """Starts the agent (returns after its READY=1); the journal cursor from just before."""
    mark = healing.node.cursor()
    healing.node.systemctl("start", AGENT, check=True)
    return mark


def diagnoses(healing: HealingNode, since: str, count: int) -> list[str]:
    """The messages of the agent's first ``count`` diagnoses (``check (WHY): …``) after
    the cursor ``since``, once there are that many."""

    def found() -> list[str]:  # [] (falsy) until there are enough
        messages = [str(e["MESSAGE"]) for e in healing.events("check", since)]
        checks = [m for m in messages if m.startswith("check (")]
        return checks[:count] if len(checks) >= count else []

    return healing.node.wait_for(found, timeout=20, what=f"{count} check events")


def signed(healing: HealingNode, since: str) -> list[dict[str, Any]]:
    """The signer's ``issued`` events for kubelet certificates (POST /v1/sign) since the cursor."""
    return healing.node.journal(
        SIGNER, after=since, KUBECERTD_EVENT="issued", KUBECERTD_ENDPOINT="sign"
    )


def quotes(line: str, messages: list[str]) -> bool:
    """``line`` is one of kubelet's ``messages`` as kubecertd quotes it: the whole line, or
    a window of a long one between ellipses."""
    window = line.removeprefix("…").removesuffix("…")
    return any(line == m.strip() or (window != line and window in m) for m in messages)


def quoted_under(text: str, code: str) -> str:
    """The ``kubelet: …`` line that ``kubecertd --check`` prints under finding ``code``."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if f"  {code}: " in line)
    hint, quote = lines[at + 1].strip(), lines[at + 2].strip()
    assert hint.startswith("hint: ") and quote.startswith("kubelet: "), lines[at : at + 3]
    return quote.removeprefix("kubelet: ")


# --- kubelet's own rotation -----------------------------------------------------------------


@pytest.mark.parametrize("healing", ["kubeadm"], indirect=True)
def test_rotation_on_leaves_a_healthy_certificate_to_kubelet_and_heals_an_expired_one(
    healing: HealingNode,
) -> None:
    """Rotation on: a healthy certificate past the renewal point is only watched; an expired one is healed and kubelet restarted."""
    node = healing.node
    old = aged(healing)
    pid = prepare(healing, old, tables='[policy]\nkey_type = "rsa-2048"\n')
    store = '"/var/lib/kubelet/pki/kubelet-client-current.pem"'
    assert any(  # the stand-in rotates too: it took its pair from the store
        f"Loading cert/key pair from {store}" in m
        for m in node.messages(healing.kubelet_unit, _PID=str(pid))
    )
    mark = start_agent(healing)
    healing.sighup()  # diagnose again, twice: the same decision every time
    diagnoses(healing, mark, 2)
    healing.sighup()
    checks = diagnoses(healing, mark, 3)
    assert [c.partition(":")[0] for c in checks] == ["check (start)"] + ["check (recheck)"] * 2
    assert all(c.startswith(("check (start): healthy", "check (recheck): healthy")) for c in checks)
    assert healing.events("renew-start", mark) == []
    assert signed(healing, mark) == []
    assert healing.pair()[0] == old.pem + old.key_pem  # the store's file: chain, then key
    text = healing.cli("kubecertd", "--check").stdout
    assert (
        f"INFO     rotation-managed: kubelet rotates this certificate itself ({ROTATION_FROM})"
        in text
    )
    report = healing.check_json()
    assert report["layout"]["rotation"] == {"on": True, "from": ROTATION_FROM}
    assert report["healthy"] is True
    assert "rotation-managed" in {f["code"] for f in report["findings"]}

    mark = node.cursor()
    healing.install_pair(expired(healing))
    start = healing.wait_event("renew-start", since=mark)
    assert start["KUBECERTD_FINDING"] == "cert-expired"
    installed = healing.wait_event("installed", since=mark)
    restart = healing.wait_event("kubelet-restarted", since=mark, timeout=30)
    assert restart["KUBECERTD_RESULT"] == "done"
    assert "kubelet with rotation on keeps its certificate in memory" in restart["MESSAGE"]
    new_pid = healing.wait_registered(other_than=pid)
    assert restart["KUBECERTD_PID"] == str(new_pid)
    assert healing.kubelet_serials(new_pid) == [installed["KUBECERTD_SERIAL"]]
    key = pki.load_private_key(healing.pair()[1])  # kubelet's template, whatever key_type says
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert healing.check_json()["healthy"] is True


# --- the clock --------------------------------------------------------------------------------


@pytest.mark.parametrize("healing", ["files"], indirect=True)
def test_unsynchronized_clock_requests_nothing_until_it_is_synchronized(
    healing: HealingNode,
) -> None:
    """Expired on an unsynchronized clock: clock-unsynced, nothing requested; healed once timedated says synchronized."""
    node = healing.node
    prepare(healing, fresh(healing))
    node.write_file(SYNCHRONIZED, "no\n")
    healing.install_pair(expired(healing))
    mark = start_agent(healing)
    healing.sighup()
    checks = diagnoses(healing, mark, 2)
    assert all("unhealthy: cert-expired, clock-unsynced" in c for c in checks), checks
    why = healing.wait_event("finding", since=mark, KUBECERTD_FINDING="clock-unsynced")
    message = why["MESSAGE"]  # the finding, its message naming timedated, and its hint
    assert (
        "the clock is not synchronized (NTPSynchronized from org.freedesktop.timedate1)" in message
    )
    assert "kubecertd requests nothing until it is synchronized" in message
    assert healing.events("renew-start", mark) == []
    assert signed(healing, mark) == []
    report = healing.check_json()
    severities = {f["code"]: f["severity"] for f in report["findings"]}
    assert severities["clock-unsynced"] == "error" and severities["cert-expired"] == "error"
    text = healing.cli("kubecertd", "--check", check=False).stdout
    assert "ERROR    clock-unsynced: the clock is not synchronized" in text

    node.write_file(SYNCHRONIZED, "yes\n")
    healing.sighup()
    start = healing.wait_event("renew-start", since=mark)
    assert start["KUBECERTD_FINDING"] == "cert-expired"
    renewed = healing.wait_event("renewed", since=mark)
    serial = renewed["KUBECERTD_SERIAL"]
    assert [e["KUBECERTD_SERIAL"] for e in signed(healing, mark)] == [serial]
    node.wait_for(lambda: serial in healing.kubelet_serials(), what=f"kubelet using {serial}")
    assert healing.check_json()["healthy"] is True


# --- restarts -----------------------------------------------------------------------------------

RESTARTS = [
    pytest.param(
        "files", {"version": "1.29.3"}, "not-needed",
        "kubelet 1.29.3 (>= 1.18) reloads client certificate files by itself",
        id="files-1.29-reloads",
    ),
    pytest.param(
        "files", {"version": "1.17.0"}, "done",
        "kubelet 1.17.0 predates 1.18, the first kubelet to reload client certificate files",
        id="files-1.17-restarted",
    ),
    pytest.param("files", {"version": "1.17.0", "restart": False}, None, "", id="restart-false"),
    pytest.param(
        "embedded", {"version": "1.29.3"}, "done",
        "kubelet 1.29.3 reads credentials embedded in its kubeconfig only when it starts",
        id="embedded-restarted",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("healing", "kubelet", "result", "why"), RESTARTS, indirect=["healing"])
def test_routine_renewal_restarts_kubelet_only_when_it_would_not_reload(
    healing: HealingNode, kubelet: dict[str, str | bool], result: str | None, why: str
) -> None:
    """restart = "auto" restarts kubelet only where it would not take the new pair by itself; false never does."""
    node = healing.node
    pid = prepare(healing, aged(healing), kubelet=kubelet)
    mark = start_agent(healing)
    renewed = healing.wait_event("renewed", since=mark)
    assert renewed["KUBECERTD_FINDING"] == "renewal"
    serial = renewed["KUBECERTD_SERIAL"]
    if result is None:  # restart = false: nothing restarted; kubelet reloads the files itself
        node.wait_for(
            lambda: serial in healing.kubelet_serials(pid), what=f"kubelet using {serial}"
        )
        assert healing.events("kubelet-restarted", mark) == []
        assert healing.kubelet_pid() == pid
        return
    restart = healing.wait_event("kubelet-restarted", since=mark, timeout=30)
    assert restart["KUBECERTD_RESULT"] == result
    assert why in restart["MESSAGE"]
    if result == "not-needed":  # the same kubelet, still active, now with the new pair
        assert restart["KUBECERTD_PID"] == str(pid)
        node.wait_for(
            lambda: serial in healing.kubelet_serials(pid), what=f"kubelet using {serial}"
        )
        assert healing.kubelet_pid() == pid
    else:
        new_pid = healing.wait_registered(other_than=pid)
        assert restart["KUBECERTD_PID"] == str(new_pid)
        assert healing.kubelet_serials(new_pid) == [serial]
    assert healing.check_json()["healthy"] is True


# --- kubelet's own words ------------------------------------------------------------------------


@pytest.mark.parametrize("healing", ["files"], indirect=True)
def test_kubelets_own_line_is_quoted_by_check_and_by_the_heal(healing: HealingNode) -> None:
    """Another node's certificate: kubelet's NodeRestriction line is quoted under cert-wrong-node by --check and in renew-start."""
    node = healing.node
    pid = prepare(healing, fresh(healing))
    mark = node.cursor()
    healing.install_pair(healing.cluster.kubelet_pair(OTHER_NODE))
    # NodeRestriction's words, in kubelet's line as klog quotes its err= value
    refused = f'is forbidden: node \\"{OTHER_NODE}\\" is not allowed to modify node \\"{healing.node_name}\\"'

    def kubelets() -> list[str]:  # kubelet's lines since the wrong pair went in
        return node.messages(healing.kubelet_unit, after=mark)

    said = node.wait_for(
        lambda: [m for m in kubelets() if refused in m], what="kubelet refused by NodeRestriction"
    )
    assert RETRYING in said[0]  # the same kubelet, still running and retrying
    finding = next(f for f in healing.check_json()["findings"] if f["code"] == "cert-wrong-node")
    assert refused in finding["kubelet_line"] and quotes(finding["kubelet_line"], kubelets())
    text = healing.cli("kubecertd", "--check", check=False).stdout
    line = quoted_under(text, "cert-wrong-node")
    assert refused in line and quotes(line, kubelets())

    node.systemctl("start", AGENT, check=True)
    start = healing.wait_event("renew-start", since=mark)
    assert start["KUBECERTD_FINDING"] == "cert-wrong-node"
    said_then = start["KUBECERTD_KUBELET_LINE"]
    assert refused in said_then and quotes(said_then, kubelets())
    assert start["MESSAGE"].endswith(f"cert-wrong-node; kubelet says: {said_then}")
    renewed = healing.wait_event("renewed", since=mark)
    new_pid = healing.wait_registered(other_than=pid)
    assert healing.kubelet_serials(new_pid) == [renewed["KUBECERTD_SERIAL"]]


@pytest.mark.parametrize("healing", ["files"], indirect=True)
def test_kubelet_refused_with_the_new_pair_fails_the_heal_and_the_old_pair_comes_back(
    healing: HealingNode,
) -> None:
    """Routine renewal, kubelet active but refused with the new pair: renew-failed quotes its line and the old pair is rolled back."""
    node = healing.node
    old = aged(healing)
    # settle longer than the stand-in's 2 s heartbeat: kubelet speaks up within it
    pid = prepare(healing, old, settle="3s", kubelet={"version": "1.29.3"})
    # From now on the API server takes only the old certificate (a new CA it does not
    # trust yet, say): kubelet reloads the new files, is refused and retries.
    (node.apiserver_dir / ALLOWED_SERIALS).write_text(serial_of(old.pem) + "\n")
    mark = start_agent(healing)
    failed = healing.wait_event("renew-failed", since=mark, timeout=30)
    rollback = healing.wait_event("rollback", since=mark, timeout=30)
    node.systemctl("stop", AGENT, check=True)  # it finishes the rollback, then tries no more
    renewed = healing.events("renewed", mark)[0]
    said = failed["KUBECERTD_KUBELET_LINE"]
    assert RETRYING in said and "Unauthorized" in said
    assert quotes(said, node.messages(healing.kubelet_unit, after=mark, _PID=str(pid)))
    assert failed["MESSAGE"] == f"kubelet still fails with the new certificate: {said}"
    took = healing.events("kubelet-restarted", mark)[0]  # kubelet was not restarted, and ran on
    assert (took["KUBECERTD_RESULT"], took["KUBECERTD_PID"]) == ("not-needed", str(pid))
    assert rollback["KUBECERTD_SERIAL"] == renewed["KUBECERTD_SERIAL"]
    assert healing.pair() == (old.pem, old.key_pem)
    new_pid = healing.wait_registered(other_than=pid)  # restarted once more, with the old pair
    assert healing.kubelet_serials(new_pid) == [serial_of(old.pem)]
