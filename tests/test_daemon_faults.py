"""Faults on a node under a real systemd: the old pair stays, the journal names the fault,
and the agent heals by itself once the fault is gone.

One node (tests/healing_node.py) runs the shipped kubecertd.service, shared by the tests.
Its /etc/kubernetes/ssl is a small tmpfs of its own (bound over the folder before the
agent starts, so the agent's sandbox sees it too), and its ``[signer] url`` names
fault-proxy.service (tools/node/fault-proxy), which passes the TLS connection to the real
signer unless told to misbehave.  Each test puts a fault in place, then renames a pair
past its renewal point into the folder (healthy, so kubelet keeps working with it): the
agent tries a routine renewal, which the fault defeats.  While the fault lasts the pair
must stay byte for byte as it was, with no temporary left beside it, and the journal must
say what failed, where; once the fault is gone, the agent's own retry timer renews.  The
agent is never restarted: its main PID and systemd's restart count stay the same.

Mount faults are made inside the agent's own mount namespace (``nsenter -m``): the
shipped unit's sandbox is a namespace of its own, which later mounts in the node's do
not reach.  A bind of a folder over itself keeps the folder's inode, so the agent's
inotify watch still sees what happens in it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import factories
from healing_node import (
    AGENT,
    FAULT_PROXY,
    FAULT_PROXY_MODE,
    FAULT_PROXY_URL,
    HealingNode,
    matching,
    serial_of,
)
from node_harness import node_factory_fixture

SSL = "/etc/kubernetes/ssl"
SMALL = "/run/small-ssl"  # the tmpfs that is bound over SSL
STAGE = f"{SSL}/.stage"  # on the same file system: renamed into place
STATE = "/var/lib/kubecertd"  # SPEC "Files on disk": state_dir
CONFIG = "/etc/kubecertd/kubecertd.toml"
TIMEOUT = 2  # seconds: [signer] timeout
FILES = ("ca.pem", "worker.pem", "worker-key.pem")
FAILURES = 2  # failed attempts seen while the fault lasts


@pytest.fixture(scope="module")
def healing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealingNode]:
    """The shared node: credentials on a 512 KiB tmpfs, the agent behind the fault proxy."""
    factory = node_factory_fixture(tmp_path_factory)
    make = next(factory)
    try:
        healing = HealingNode.create(make, start_agent=False)
        node = healing.node
        script = (
            f"mkdir -p {SMALL} && mount -t tmpfs -o size=512k,mode=0755 tmpfs {SMALL} && "
            f"cp -a {SSL}/. {SMALL}/ && mount --bind {SMALL} {SSL}"
        )
        node.run(["sh", "-c", script], check=True)
        config = node.read_file(CONFIG).decode()
        config = config.replace('url = "https://127.0.0.1:8443"', f'url = "{FAULT_PROXY_URL}"')
        config = config.replace('timeout = "3s"', f'timeout = "{TIMEOUT}s"')
        assert FAULT_PROXY_URL in config and f'timeout = "{TIMEOUT}s"' in config
        node.write_file(CONFIG, config)
        node.write_file(FAULT_PROXY_MODE, "pass\n")
        node.systemctl("start", FAULT_PROXY, check=True)
        node.wait_for_message(FAULT_PROXY, "listening on")
        healing.start_agent()
        yield healing
    finally:
        with contextlib.suppress(StopIteration):
            next(factory)  # stops the node; a failed stop fails the last test


@pytest.fixture(autouse=True)
def settled(healing: HealingNode) -> None:
    """Each test starts healthy and with the proxy passing bytes, whatever the one before
    it left behind."""
    healing.node.write_file(FAULT_PROXY_MODE, "pass\n")
    healing.node.wait_for(
        lambda: healing.check_json().get("healthy") is True,
        timeout=30,
        what="kubecertd --check healthy before the test",
    )


# -- helpers --------------------------------------------------------------------------------


def due_pair(healing: HealingNode) -> factories.Issued:
    """A pair nine tenths through its life: healthy, and past any renewal point."""
    now = dt.datetime.now(dt.timezone.utc)
    return healing.cluster.kubelet_pair(
        healing.node_name, now - dt.timedelta(days=27), now + dt.timedelta(days=3)
    )


def stage(healing: HealingNode, pair: factories.Issued) -> None:
    """``pair`` written to STAGE, to be renamed into place by ``swap_in`` (no write then)."""
    healing.node.write_file(f"{STAGE}/worker.pem", pair.pem, 0o644)
    healing.node.write_file(f"{STAGE}/worker-key.pem", pair.key_pem, 0o600)


def swap_in(healing: HealingNode) -> None:
    for name in ("worker-key.pem", "worker.pem"):
        os.replace(healing.node.path(f"{STAGE}/{name}"), healing.node.path(f"{SSL}/{name}"))


def credentials(healing: HealingNode) -> dict[str, bytes]:
    return {name: healing.node.read_file(f"{SSL}/{name}") for name in FILES}


def temporaries(healing: HealingNode) -> list[str]:
    return [p.name for p in healing.node.path(SSL).iterdir() if p.name.endswith(".kubecertd-new")]


def in_agent_mounts(healing: HealingNode, script: str) -> None:
    """Runs ``script`` in the agent's own mount namespace (the shipped unit's sandbox)."""
    pid = healing.node.unit_property(AGENT, "MainPID")
    healing.node.run(["nsenter", "-t", pid, "-m", "sh", "-c", script], check=True)


def read_only(path: str) -> tuple[str, str]:
    """The scripts that put a read-only bind of ``path`` over itself and take it away."""
    return f"mount --bind {path} {path} && mount -o remount,bind,ro {path}", f"umount {path}"


def fill(healing: HealingNode) -> None:
    """Fills SSL's tmpfs, after hard links keep the current pair's pages allocated (the
    rename of the staged pair over it then frees nothing)."""
    for name in ("worker.pem", "worker-key.pem"):
        os.link(healing.node.path(f"{SSL}/{name}"), healing.node.path(f"{STAGE}/old-{name}"))
    fd = os.open(healing.node.path(f"{STAGE}/filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1024):  # 4 MiB at most; the tmpfs holds 512 KiB
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(healing.node.path(SSL)).f_bavail == 0


def unstage(healing: HealingNode) -> None:
    healing.node.run(["rm", "-rf", STAGE], check=True)


def agent_state(healing: HealingNode) -> dict[str, str]:
    return healing.node.unit_properties(AGENT, "MainPID", "NRestarts")


def seconds_between(start: dict[str, Any], end: dict[str, Any]) -> float:
    return (int(end["__REALTIME_TIMESTAMP"]) - int(start["__REALTIME_TIMESTAMP"])) / 1e6


def ride_out(
    healing: HealingNode,
    apply: Callable[[], None],
    lift: Callable[[], None],
    kind: str,
    words: tuple[str, ...],
) -> list[dict[str, Any]]:
    """The fault put in place, a pair due for renewal renamed in, FAILURES events of
    ``kind`` whose message matches each of ``words`` (regular expressions) with the pair
    untouched, the fault lifted, and the agent's own renewal; returns the failures."""
    node = healing.node
    before = agent_state(healing)
    due = due_pair(healing)
    since = node.cursor()
    stage(healing, due)
    try:
        apply()
        swap_in(healing)
        old = credentials(healing)  # the old pair the fault must leave alone
        assert old == dict(zip(FILES, (healing.cluster.ca.pem, due.pem, due.key_pem), strict=True))
        failures = [healing.wait_event(kind, after=n, since=since) for n in range(FAILURES)]
        for event in failures:
            assert all(re.search(word, event["MESSAGE"]) for word in words), event["MESSAGE"]
            assert event["KUBECERTD_FINDING"] == "renewal"
        assert credentials(healing) == old
        # An attempt in progress may hold temporaries for an instant; a failed one leaves none.
        node.wait_for(lambda: temporaries(healing) == [], timeout=5, what="no temporaries left")
        assert healing.events("renewed", since) == []
    finally:
        lift()
        unstage(healing)
    renewed = healing.wait_event("renewed", since=since, timeout=30)
    cert, key = healing.pair()
    assert renewed["KUBECERTD_SERIAL"] == serial_of(cert) != serial_of(due.pem)
    assert matching(cert, key)
    assert healing.check_json()["healthy"] is True
    assert agent_state(healing) == before  # healed by itself: never restarted, never crashed
    assert not [m for m in node.messages(AGENT, after=since) if "Traceback" in m]
    return failures


# -- the file system ------------------------------------------------------------------------


def test_no_space_left_on_device(healing: HealingNode) -> None:
    """The credentials' tmpfs full: renew-failed names ENOSPC and the file; heals once freed."""
    ride_out(
        healing,
        apply=lambda: fill(healing),
        lift=lambda: healing.node.path(f"{STAGE}/filler").unlink(missing_ok=True),
        kind="renew-failed",
        words=(f"^renewal failed: cannot install {SSL}/\\.worker", "No space left on device"),
    )


def test_read_only_credentials(healing: HealingNode) -> None:
    """A read-only bind over the credentials' folder: renew-failed says so; heals once gone."""
    ro, rw = read_only(SSL)
    ride_out(
        healing,
        apply=lambda: in_agent_mounts(healing, ro),
        lift=lambda: in_agent_mounts(healing, rw),
        kind="renew-failed",
        words=(f"^renewal failed: cannot install {SSL}/\\.worker", "Read-only file system"),
    )


def test_state_dir_unwritable(healing: HealingNode) -> None:
    """state_dir read-only: the install intent cannot be written, so nothing is renamed;
    renew-failed names the intent's path; heals once writable."""
    ro, rw = read_only(STATE)
    ride_out(
        healing,
        apply=lambda: in_agent_mounts(healing, ro),
        lift=lambda: in_agent_mounts(healing, rw),
        kind="renew-failed",
        words=(
            f"^renewal failed: cannot install {STATE}/\\.install-intent\\.json",
            "Read-only file system",
        ),
    )


# -- the signer's connection ----------------------------------------------------------------


def proxy(healing: HealingNode, mode: str) -> Callable[[], None]:
    return lambda: healing.node.write_file(FAULT_PROXY_MODE, f"{mode}\n")


def proxy_said(healing: HealingNode, text: str) -> int:
    """How many of the proxy's journal lines contain ``text``."""
    return sum(text in message for message in healing.node.messages(FAULT_PROXY))


def started(healing: HealingNode, failure: dict[str, Any]) -> dict[str, Any]:
    """The renew-start event of the attempt that ended in ``failure``."""
    stamp = int(failure["__REALTIME_TIMESTAMP"])
    starts = [e for e in healing.events("renew-start") if int(e["__REALTIME_TIMESTAMP"]) < stamp]
    return starts[-1]


def test_slow_signer_is_bounded_by_the_timeout(healing: HealingNode) -> None:
    """Bytes trickling both ways (64 B every 0.25 s: never idle for a whole timeout, yet a
    handshake takes seconds): each attempt gives up after [signer] timeout; heals once fast."""
    mode = "slow 64 0.25"
    said = proxy_said(healing, f"({mode}): closed by the client")
    failures = ride_out(
        healing,
        apply=proxy(healing, mode),
        lift=proxy(healing, "pass"),
        kind="signer-error",
        words=(f"{FAULT_PROXY_URL}/v1/ca: timed out after {TIMEOUT} s", "files left as they were"),
    )
    for failure in failures:
        elapsed = seconds_between(started(healing, failure), failure)
        assert elapsed < TIMEOUT + 2, elapsed  # a trickled handshake alone takes ~10 s
    assert proxy_said(healing, f"({mode}): closed by the client") >= said + FAILURES


# An answer cut inside its TLS record: Python's ssl takes the end of the stream there, FIN
# or RST, for an end without close_notify (suppress_ragged_eofs), so http.client finds no
# answer; a reset seen as such would say so.
CUT = "(Remote end closed connection without response|Connection reset by peer)"


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("truncate 2", id="truncated-answer"),
        pytest.param("reset 2", id="reset-mid-answer"),
    ],
)
def test_answer_cut_mid_way(healing: HealingNode, mode: str) -> None:
    """The signer's answer to the CSR cut in the middle of its body, then the connection
    closed or reset: signer-error names it; heals once the answers come whole."""
    said = proxy_said(healing, f"({mode}): cut answer 2")
    ride_out(
        healing,
        apply=proxy(healing, mode),
        lift=proxy(healing, "pass"),
        kind="signer-error",
        words=(f"{FAULT_PROXY_URL}/v1/sign: {CUT}", "files left as they were"),
    )
    assert proxy_said(healing, f"({mode}): cut answer 2") >= said + FAILURES
