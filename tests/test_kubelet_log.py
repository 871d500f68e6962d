"""kubelet's own words from the journal (kubecertd.edges.kubelet_log).

Read for real: one throwaway node (real systemd and journald) runs transient units that
write kubelet's verbatim lines to stderr, as kubelet does, and ``recent_lines`` runs
inside the node with the venv's python.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from kubecertd.edges import kubelet_log
from kubecertd.edges.kubelet_log import recent_lines

from node_harness import Node, node_factory_fixture

A = "server2277z.prod.jp.local"
B = "server2267z.prod.jp.local"
KLOG = "E1203 12:00:00.000000    1234 "

# What the unit writes, oldest first: kubelet's failures amid its ordinary lines and a
# line of someone else's certificate (kubelet as a server).
FIRST = [
    f'I1203 12:00:00.000000    1234 kubelet_node_status.go:70] Attempting to register node "{A}"',
    f'{KLOG}kubelet_node_status.go:96] "Unable to register node with API server" err="nodes \\"{A}\\" is forbidden: node \\"{B}\\" is not allowed to modify node \\"{A}\\"" node="{A}"',
    f'{KLOG}authentication.go:73] "Unable to authenticate the request" err="x509: certificate has expired or is not yet valid"',
    f"{KLOG}reflector.go:178] k8s.io/client-go/informers/factory.go:135: Failed to list *v1.Node: Unauthorized",
]
SECOND = [
    "E1203 12:00:01.000000    1234 bootstrap.go:265] part of the existing bootstrap client certificate in /etc/kubernetes/kubelet.conf is expired: 2024-06-11 17:17:20 +0000 UTC",
    'I1203 12:00:01.000000    1234 server.go:412] "Starting kubelet"',
    f'{KLOG}certificate_manager.go:385] Failed while requesting a signed certificate from the master: expected "/var/lib/kubelet/pki/kubelet-client-current.pem" to be a symlink but it is a file',
]

READ = """
import json, sys
from kubecertd.edges.kubelet_log import recent_lines
lines = recent_lines(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
print(json.dumps([list(line) for line in lines]))
"""


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Node]]:
    yield from node_factory_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def node(nodes: Callable[..., Node]) -> Node:
    """One node for the module: journald and systemd are all these tests need."""
    return nodes()


def log_as(node: Node, unit: str, lines: list[str]) -> None:
    """``unit`` writes ``lines`` to stderr and exits; returns once journald has the last one."""
    node.write_file(f"/etc/{unit}.txt", "\n".join(lines) + "\n")
    node.run(
        ["systemd-run", f"--unit={unit}", "--wait", "--collect", "--quiet",
         "sh", "-c", f"cat /etc/{unit}.txt >&2"],
        check=True,
    )  # fmt: skip
    node.wait_for_message(unit, lines[-1])


def read(node: Node, unit: str, since: float, limit: int = 200) -> list[tuple[str, str]]:
    result = node.python(READ, unit, repr(since), str(limit), check=True)
    return [(kind, line) for kind, line in json.loads(result.stdout)]


def test_kubelets_failures_are_read_from_its_units_journal(node: Node) -> None:
    """Only the unit's failure lines, oldest first, each as kubelet wrote it; other units are not read."""
    started = time.time()
    log_as(node, "other.service", [FIRST[1]])
    log_as(node, "kubelet-lines.service", FIRST)
    assert read(node, "kubelet-lines.service", started) == [
        ("wrong-node", FIRST[1]),
        ("unauthorized", FIRST[3]),
    ]
    assert read(node, "no-such.service", started) == []


def test_since_and_limit_bound_what_is_read(node: Node) -> None:
    """Lines from before ``since`` are left out; ``limit`` counts entries from the newest."""
    log_as(node, "kubelet-window.service", FIRST)
    between = time.time()
    log_as(node, "kubelet-window.service", SECOND)
    assert read(node, "kubelet-window.service", between) == [
        ("bootstrap-expired", SECOND[0]),
        ("not-symlink", SECOND[2]),
    ]
    assert read(node, "kubelet-window.service", 0.0, limit=2) == [("not-symlink", SECOND[2])]
    assert [kind for kind, _ in read(node, "kubelet-window.service", 0.0)] == [
        "wrong-node",
        "unauthorized",
        "bootstrap-expired",
        "not-symlink",
    ]
    assert read(node, "kubelet-window.service", time.time() + 60) == []


def test_no_journal_is_no_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without journald (no /run/systemd/journal) there is nothing to read, and no error."""
    monkeypatch.setattr(kubelet_log, "JOURNAL_DIR", "/nonexistent/journal")
    assert recent_lines("kubelet.service", 0.0) == []
    assert recent_lines("kubelet.service", 0.0, limit=0) == []
