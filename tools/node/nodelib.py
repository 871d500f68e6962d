"""Shared code of tools/node/boot and tools/node/stop (stdlib only, runs on the host).

A node's state lives in its folder DIR:

- ``node.env``   KEY=value lines (shell-quoted) describing the running node: NODE_PID
  (its systemd, as seen from the host), NODE_PIDNS/NODE_MNTNS (namespace inodes, so a
  reused PID is never mistaken for the node), NODE_CGROUP, NODE_KEEPER_PID, …
- ``console.log`` the node's /dev/console; ``boot.log`` stderr of unshare and PID 1
- ``units/``     the node's /lib/systemd/system
- ``ssl/``, ``apiserver/`` the node's /etc/kubernetes/ssl and /etc/kubernetes/apiserver
- ``rw/``        upper layers of the overlays over /etc, /var, … (removed by stop)
- ``python/``    the venv shim and interpreter copy (see README, "Python under ProtectHome")
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
PROJECT = TOOLS.parent.parent
CGROUP_PREFIX = "kubecertd-node-"
STATE = "node.env"


class NodeError(Exception):
    """A node cannot be booted or stopped; the message says why."""


def read_state(node_dir: Path) -> dict[str, str]:
    """The node's state file as a dict ({} when there is none)."""
    path = node_dir / STATE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    state: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            parts = shlex.split(value)
            state[key] = parts[0] if parts else ""
    return state


def write_state(node_dir: Path, state: dict[str, str]) -> None:
    """Atomically (re)writes the state file, sourceable by bash."""
    path = node_dir / STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in state.items()))
    os.replace(tmp, path)


def ns_inode(pid: int, kind: str) -> int | None:
    """The inode of /proc/PID/ns/KIND, or None when the process is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def node_alive(state: dict[str, str]) -> bool:
    """True while the recorded systemd PID still exists and is still in the node's PID ns."""
    pid = int(state.get("NODE_PID") or 0)
    want = int(state.get("NODE_PIDNS") or 0)
    return pid > 0 and want > 0 and ns_inode(pid, "pid") == want


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cgroup2_root() -> Path:
    """Where a fresh cgroup2 folder for a node can be made on this host.

    A hybrid host (v1 controllers, cgroup2 at /sys/fs/cgroup/unified) gives the
    unified hierarchy; a pure cgroup2 host gives /sys/fs/cgroup itself.
    """
    for candidate in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (candidate / "cgroup.procs").exists() and (candidate / "cgroup.controllers").exists():
            return candidate
    raise NodeError("no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified")


def processes_in(state: dict[str, str]) -> list[int]:
    """PIDs (host view) of every process still inside the node's PID or mount namespace."""
    pidns = int(state.get("NODE_PIDNS") or 0)
    mntns = int(state.get("NODE_MNTNS") or 0)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        if (pidns and ns_inode(pid, "pid") == pidns) or (mntns and ns_inode(pid, "mnt") == mntns):
            found.append(pid)
    return found


def cgroup_populated(cgroup: Path) -> bool:
    try:
        events = (cgroup / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "populated 1" in events


def remove_cgroup(cgroup: Path, timeout: float = 5.0) -> None:
    """Kills whatever is left in the node's cgroup folder and removes it, children first."""
    if not cgroup.is_dir():
        return
    deadline = time.monotonic() + timeout
    while cgroup_populated(cgroup):
        with contextlib.suppress(OSError):
            (cgroup / "cgroup.kill").write_text("1")
        if time.monotonic() > deadline:
            raise NodeError(f"cgroup {cgroup} still has processes after {timeout:.0f} s")
        time.sleep(0.01)
    for dirpath, _dirnames, _files in sorted(
        os.walk(cgroup, topdown=False), key=lambda w: -len(w[0])
    ):
        for _ in range(100):
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY while the kernel finishes tearing down a child
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def sweep_stale_cgroups(min_age: float = 120.0) -> None:
    """Removes empty node cgroup folders left by runs that died before cleaning up."""
    try:
        root = cgroup2_root()
    except NodeError:
        return
    now = time.time()
    for entry in root.glob(CGROUP_PREFIX + "*"):
        try:
            if now - entry.stat().st_mtime < min_age or cgroup_populated(entry):
                continue
            remove_cgroup(entry, timeout=0.5)
        except OSError:
            continue


def nsenter(state: dict[str, str], *cmd: str) -> list[str]:
    """The argv running CMD inside the node (mount, PID, net, UTS, IPC, cgroup namespaces)."""
    return [
        "nsenter",
        "-t",
        state["NODE_PID"],
        "-m",
        "-p",
        "-n",
        "-u",
        "-i",
        "-C",
        "--",
        "env",
        "-i",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "LANG=C.UTF-8",
        "SYSTEMD_PAGER=",
        "SYSTEMD_COLORS=0",
        *cmd,
    ]


def stop(node_dir: Path, timeout: float = 10.0) -> dict[str, float]:
    """Powers the node off (SIGKILL after ``timeout``) and removes what it left behind.

    Idempotent: stopping a stopped, half-booted or never-booted node is fine.
    Returns timings (seconds) for the report.
    """
    started = time.monotonic()
    state = read_state(node_dir)
    timings: dict[str, float] = {}
    if not state:
        return timings
    pid = int(state.get("NODE_PID") or 0)
    # Namespace inode numbers are recycled as soon as a namespace is freed: once the node
    # is gone, a new namespace anywhere on the host (another node's sandboxed service, a
    # chroot in `unshare -m`) may get the same number, and the scan below would kill its
    # processes. Holding the node's namespaces open keeps their numbers its own.
    pinned = _pin_namespaces(state)
    try:
        _power_off(state, pid, timeout, started, timings, scan=bool(pinned))
    finally:
        for fd in pinned:
            os.close(fd)
    if state.get("NODE_CGROUP"):
        remove_cgroup(Path(state["NODE_CGROUP"]))
    _remove_tree(node_dir / "rw")
    (node_dir / "pid").unlink(missing_ok=True)  # would name a PID the kernel may reuse
    state["NODE_STOPPED"] = "1"
    write_state(node_dir, state)
    timings["total"] = time.monotonic() - started
    return timings


def _pin_namespaces(state: dict[str, str]) -> list[int]:
    """Open file descriptors on the running node's PID and mount namespaces (checked
    against the recorded inodes), or [] when the node is not running."""
    pid = int(state.get("NODE_PID") or 0)
    fds: list[int] = []
    if not node_alive(state):
        return fds
    for kind, key in (("pid", "NODE_PIDNS"), ("mnt", "NODE_MNTNS")):
        try:
            fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            break
        fds.append(fd)
        if os.fstat(fd).st_ino != int(state.get(key) or 0):
            break
    else:
        return fds
    for fd in fds:  # the node ended meanwhile: nothing pinned
        os.close(fd)
    return []


def _power_off(
    state: dict[str, str],
    pid: int,
    timeout: float,
    started: float,
    timings: dict[str, float],
    scan: bool,
) -> None:
    if node_alive(state):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                # `systemctl poweroff` without asking logind first (the node has none)
                nsenter(
                    state,
                    "systemctl",
                    "start",
                    "poweroff.target",
                    "--job-mode=replace-irreversibly",
                    "--no-block",
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=min(5.0, timeout),
                check=False,
            )
        deadline = time.monotonic() + timeout
        while node_alive(state) and time.monotonic() < deadline:
            time.sleep(0.01)
        timings["poweroff"] = time.monotonic() - started
        if node_alive(state):
            timings["killed"] = 1.0
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # The unshare parent and the keeper exit on their own once PID 1 is gone (the keeper
    # records the exit status); give them a moment, then make sure.
    helpers = []
    for key in ("NODE_UNSHARE_PID", "NODE_KEEPER_PID"):
        other = int(state.get(key) or 0)
        if other and start_time(other) == state.get(key + "_START"):
            helpers.append(other)
    deadline = time.monotonic() + 1.0
    while helpers and time.monotonic() < deadline:
        helpers = [p for p in helpers if start_time(p) == _start_of(state, p)]
        time.sleep(0.005)
    for other in helpers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(other, signal.SIGKILL)
    # Anything still in the node's namespaces (say, a process that entered only its
    # mount namespace) would keep the node's mounts alive. Only while they are pinned:
    # a node that had already ended leaves only what its cgroup holds (killed below).
    deadline = time.monotonic() + 5.0
    while scan:
        left = processes_in(state)
        if not left:
            break
        if time.monotonic() > deadline:
            raise NodeError(f"processes {left} are still in the node's namespaces")
        for other in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGKILL)
        time.sleep(0.01)


def _start_of(state: dict[str, str], pid: int) -> str | None:
    for key in ("NODE_UNSHARE_PID", "NODE_KEEPER_PID"):
        if state.get(key) == str(pid):
            return state.get(key + "_START")
    return None


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): with the
    PID it names one process for good, so a reused PID is never signalled. None once
    the process has exited (also while it is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):  # exited, not reaped yet: gone for our purposes
        return None
    return fields[19]


def _remove_tree(path: Path) -> None:
    """rm -rf of the overlays' layers (root may remove their mode-000 work folders).
    They hold no mount points on the host: the node's mounts live in its own namespace."""
    shutil.rmtree(path, ignore_errors=True)
