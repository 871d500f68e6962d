"""Shared by bench/heal_latency.py and bench/idle.py: a HealingNode to measure, the
machine's description, small statistics and journal reading with timestamps.

The node is the one the end-to-end tests use (tests/healing_node.py): a real systemd
252 in fresh namespaces, journald, the system bus, the real ``kubecertd-signer`` on the
node's loopback, the kubelet/API-server stand-ins and the shipped kubecertd.service.
Root only; everything talks over the node's own loopback.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from healing_node import AGENT, KUBELET, HealingNode  # noqa: E402
from node_harness import NODE, Node, journal_entries, unavailable_reason  # noqa: E402

__all__ = ["AGENT", "KUBELET", "HealingNode", "Node", "healing_node"]


@contextlib.contextmanager
def healing_node(**create: Any) -> Iterator[HealingNode]:
    """A booted HealingNode (``HealingNode.create(**create)``), always stopped afterwards."""
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"cannot boot a node here: {reason}")
    nodes: list[Node] = []
    scratch = Path(tempfile.mkdtemp(prefix="kubecertd-bench-node-"))

    def factory(hostname: str = NODE, **kwargs: Any) -> Node:
        node = Node(hostname, scratch / f"node{len(nodes)}", **kwargs)
        nodes.append(node)
        return node.boot()

    try:
        yield HealingNode.create(factory, **create)
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop()
            # HealingNode.create's own scratch folder (kubecertd-e2e-*: the signer's keys,
            # the unit copies) is the parent of the folder it binds as the signer's.
            for bind in node.binds:
                if not isinstance(bind, str) and Path(bind[0]).parent.name.startswith(
                    "kubecertd-e2e-"
                ):
                    shutil.rmtree(Path(bind[0]).parent, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


# -- variants of the agent: drop-ins of kubecertd.service ------------------------------------

AGENT_DROPIN = f"/etc/systemd/system/{AGENT}.d/bench-variant.conf"
# Without CAP_SYS_ADMIN in the bounding set, Daemon._open_witness makes no fanotify group
# (one "witness" warning in the journal) and the agent heals as always.
NO_WITNESS = (
    "[Service]\n"
    "# bench: without CAP_SYS_ADMIN, Daemon._open_witness makes no fanotify group\n"
    "CapabilityBoundingSet=~CAP_SYS_ADMIN\n"
)
NODE_SRC = "/etc/kubecertd/bench-src"  # --agent-src copies (the unit's PrivateTmp hides /tmp)


def parse_agent_src(items: Sequence[str]) -> list[tuple[str, Path]]:
    """``--agent-src NAME=DIR`` arguments: DIR holds a ``kubecertd`` package (e.g. a
    ``git archive`` of an older commit)."""
    out = []
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in ("src", "traced"):
            raise SystemExit(f"--agent-src {item!r}: NAME=DIR, NAME of letters, digits, ._-")
        if not (Path(folder) / "kubecertd" / "__init__.py").is_file():
            raise SystemExit(f"--agent-src {item!r}: {folder}/kubecertd is not a package")
        out.append((name, Path(folder)))
    return out


def copy_agent_src(node: Node, agent_src: Sequence[tuple[str, Path]]) -> None:
    """Each package into the node, where ``src_dropin(name)`` finds it."""
    for name, folder in agent_src:
        shutil.copytree(
            folder / "kubecertd",
            node.path(f"{NODE_SRC}/{name}/kubecertd"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        found = node.python(
            "import kubecertd; print(kubecertd.__file__)",
            env={"PYTHONPATH": f"{NODE_SRC}/{name}"},
            check=True,
        ).stdout.strip()
        if not found.startswith(f"{NODE_SRC}/{name}/"):  # the venv's finder must come after
            raise RuntimeError(f"PYTHONPATH={NODE_SRC}/{name} imports kubecertd from {found}")


def src_dropin(name: str) -> str:
    """The shipped unit running the package ``copy_agent_src`` put under ``name``: first
    on the agent's PYTHONPATH, before the venv's (editable) kubecertd."""
    return f"[Service]\nEnvironment=PYTHONPATH={NODE_SRC}/{name}\n"


def base_dropin(src: Path | None, no_witness: bool = False) -> str | None:
    """The drop-in of the shipped agent (None: the unit as shipped), or of the agent
    without the witness; with ``src`` (``--src``, copied as "src"), running that package."""
    text = (NO_WITNESS if no_witness else "") + (src_dropin("src") if src else "")
    return text or None


def restart_unit(node: Node, unit: str) -> None:
    """``systemctl restart``, up to 3 times: a start can time out on a busy shared machine."""
    for attempt in range(3):
        if node.systemctl("restart", unit, timeout=60).returncode == 0:
            return
        tail = node.run(["journalctl", "--no-pager", "-u", unit, "-n", "15"]).stdout
        print(f"  restarting {unit} failed (attempt {attempt + 1}):\n{tail}", flush=True)
        node.systemctl("reset-failed", unit)
        time.sleep(2)
    raise RuntimeError(f"cannot restart {unit}")


def restart_agent(h: HealingNode, dropin: str | None) -> float:
    """The agent restarted with ``dropin`` as AGENT_DROPIN (None: the shipped unit) and
    healthy; the time (time.time()) just before the restart."""
    node = h.node
    if dropin is None:
        node.path(AGENT_DROPIN).unlink(missing_ok=True)
    else:
        node.write_file(AGENT_DROPIN, dropin)
    node.systemctl("daemon-reload", check=True)
    if (AGENT_DROPIN in node.unit_property(AGENT, "DropInPaths")) != (dropin is not None):
        raise RuntimeError(f"{AGENT_DROPIN} is not as asked after daemon-reload")
    started = time.time()
    restart_unit(node, AGENT)
    wait_healthy(h)
    return started


def node_processes(node: Node) -> Iterator[int]:
    """Host PIDs of the processes in the node's PID namespace (those that vanish skipped)."""
    pidns = node.namespaces["pid"]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino == pidns:
                yield int(entry)
        except OSError:
            continue


def renice_node(node: Node, nice: int) -> int:
    """Set the nice value of every thread of the node's processes (systemd's children
    inherit it: restarted units too); the number of threads changed."""
    changed = 0
    for pid in node_processes(node):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                changed += 1
        except OSError:
            continue
    return changed


# -- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "loadavg": loadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # without guest (already in user)
    return total - idle, total


def cpu_busy(seconds: float) -> float:
    """Share of the whole machine's CPU time that was busy over the next ``seconds``."""
    busy0, total0 = cpu_times()
    time.sleep(seconds)
    busy1, total1 = cpu_times()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_quiet(threshold: float, timeout: float, window: float = 0.5) -> float:
    """Wait (at most ``timeout`` s) for a ``window`` in which the machine is at most
    ``threshold`` busy; the last busy share seen."""
    deadline = time.monotonic() + timeout
    while True:
        busy = cpu_busy(window)
        if busy <= threshold or time.monotonic() >= deadline:
            return busy


# -- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "min": min(values),
        "max": max(values),
    }


def fmt_row(label: str, stats: dict[str, float], width: int = 44) -> str:
    if not stats.get("n"):
        return f"{label:<{width}} (no data)"
    return (
        f"{label:<{width}} {stats['median']:8.1f} {stats['p90']:8.1f} "
        f"{stats['min']:8.1f} {stats['max']:8.1f}   n={stats['n']}"
    )


def fmt_header(width: int = 44, unit: str = "ms") -> str:
    return f"{'':<{width}} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}   ({unit})"


# -- the journal -----------------------------------------------------------------------------


def journal_since(
    node: Node, since_s: float, *matches: str, unit: str | None = None
) -> list[dict[str, Any]]:
    """Entries (``journalctl -o json``) from ``since_s`` (UNIX seconds, rounded down) on,
    with FIELD=value ``matches`` and/or of ``unit``; each gets ``ts`` (µs): the sender's
    _SOURCE_REALTIME_TIMESTAMP where journald recorded one, else __REALTIME_TIMESTAMP."""
    argv = ["journalctl", "--no-pager", "--all", "-o", "json", f"--since=@{int(since_s) - 1}"]
    if unit:
        argv += ["-u", unit]
    argv += list(matches)
    entries = journal_entries(node.run(argv, check=True, timeout=30).stdout)
    for entry in entries:
        entry["ts"] = int(entry.get("_SOURCE_REALTIME_TIMESTAMP") or entry["__REALTIME_TIMESTAMP"])
        entry["rts"] = int(entry["__REALTIME_TIMESTAMP"])
    entries.sort(key=lambda e: e["ts"])
    return entries


def wait(predicate: Any, timeout: float, interval: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_healthy(h: HealingNode, what: str = "the agent's StatusText healthy") -> None:
    """Until the agent says it is healthy (its sd_notify STATUS=), at most 30 s."""
    wait(lambda: h.node.unit_property(AGENT, "StatusText").startswith("healthy"), 30, 0.2, what)
