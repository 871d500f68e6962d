#!/usr/bin/env python3
"""tools/node/boot DIR HOSTNAME — boots a throwaway node: a real systemd as PID 1 of
fresh PID/mount/network/UTS/IPC/cgroup namespaces, with only our unit files.

Prints the PID of the node's systemd (host view; use ``nsenter -t PID -m -p -n -u``)
and returns once org.freedesktop.systemd1 answers on the node's system bus and
journald is active. Exit status 1 (with the console log on stderr) when it does not
come up within NODE_BOOT_TIMEOUT seconds; 2 on bad arguments.

Environment knobs (all optional):

NODE_EXTRA_UNITS   colon-separated folders whose unit files (and drop-in folders) are
                   copied into the node's unit folder, after tools/node/units/
NODE_WITHOUT_UNITS space-separated unit files of tools/node/units/ the node goes without
                   (e.g. kubelet.service on a node whose kubelet runs in k3s-agent.service)
NODE_WANTS         space-separated units to start at boot (linked into node.target.wants)
NODE_BINDS         newline-separated "SRC:DST[:ro]" bind mounts into the node
NODE_OVERLAYS      extra host folders given a throwaway writable overlay (e.g. /usr/bin);
                   /etc, /var, /opt and /usr/local always are
NODE_OWNER_PID     the node is killed when this process exits (default: boot's parent;
                   0: never, only tools/node/stop ends it)
NODE_BOOT_TIMEOUT  seconds (default 20)
NODE_PROJECT, NODE_VENV  default: this checkout and its .venv
NODE_ROOT          boot this root file system (a host folder, e.g. a throwaway copy of a
                   debootstrapped Debian) instead of the host's /: the node's view is
                   built on it, written in place (no /etc, /var, … overlays), and
                   pivot_root makes it the node's /. Its own /lib/systemd/system stays
                   (dpkg may change it while the node runs); our units come first from
                   /run/systemd/system, with masks for whatever the root's targets
                   want. NODE_VENV is then a folder of that root (e.g. /opt/kubecertd,
                   for @VENV@), not bound from the host; the project is still bound
                   read-only at its own path

Unit files may use @PROJECT@, @VENV@, @TOOLS@ and @HOSTNAME@; they are substituted
when copied.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nodelib
from nodelib import NodeError

BASE_OVERLAYS = ("/etc", "/var", "/opt", "/usr/local")
# Folders that exist only in the node (tmpfs or overlay): binds may create mount points there.
NODE_WRITABLE = (*BASE_OVERLAYS, "/run", "/tmp")  # noqa: S108 - the node's own tmpfs
# Where ProtectHome= would hide an interpreter, and where the node gets its copy instead.
HIDDEN_BY_PROTECT_HOME = ("/root/", "/home/", "/run/user/")
NODE_PYTHON = "/opt/kubecertd-node/python"
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1].startswith("-"):
        print("usage: boot DIR HOSTNAME", file=sys.stderr)
        return 2
    node_dir = Path(argv[1]).absolute()
    hostname = argv[2]
    if not HOSTNAME_RE.match(hostname):
        print(f"boot: invalid hostname {hostname!r}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        pid = boot(node_dir, hostname)
    except NodeError as exc:
        print(f"boot: {exc}", file=sys.stderr)
        _dump_logs(node_dir)
        with contextlib.suppress(Exception):
            nodelib.stop(node_dir, timeout=2.0)
        return 1
    state = nodelib.read_state(node_dir)
    state["NODE_BOOT_SECONDS"] = f"{time.monotonic() - started:.3f}"
    nodelib.write_state(node_dir, state)
    (node_dir / "pid").write_text(f"{pid}\n")
    print(pid)
    return 0


def boot(node_dir: Path, hostname: str) -> int:
    root = _node_root()
    tools = ("unshare", "nsenter") if root else ("unshare", "nsenter", "mount", "ip", "busctl")
    for tool in tools:
        if not shutil.which(tool):
            raise NodeError(f"{tool} not found (install util-linux, iproute2, systemd)")
    if os.geteuid() != 0:
        raise NodeError("must run as root")
    if not root and not Path("/lib/systemd/systemd").exists():
        raise NodeError("/lib/systemd/systemd not found (install systemd)")
    node_dir.mkdir(parents=True, exist_ok=True)
    old = nodelib.read_state(node_dir)
    if old and nodelib.node_alive(old):
        raise NodeError(f"a node is already running in {node_dir} (PID {old['NODE_PID']})")
    if old and not old.get("NODE_STOPPED"):  # an earlier node here was not stopped: clean up
        nodelib.stop(node_dir, timeout=1.0)
    if any(c in str(node_dir) for c in ",: \t\n"):
        raise NodeError(
            f"DIR {node_dir} must not contain commas, colons or blanks (overlay options)"
        )
    base_overlays = () if root else BASE_OVERLAYS
    for folder in base_overlays:
        if node_dir.is_relative_to(folder):
            raise NodeError(f"DIR must not be under {folder} (it holds the overlay layers)")
    if root and (node_dir.is_relative_to(root) or root.is_relative_to(node_dir)):
        raise NodeError(f"DIR {node_dir} and NODE_ROOT {root} must not contain one another")

    project = Path(os.environ.get("NODE_PROJECT") or nodelib.PROJECT).resolve()
    venv = Path(os.environ.get("NODE_VENV") or project / ".venv").absolute()
    overlays = [*base_overlays, *os.environ.get("NODE_OVERLAYS", "").split()]
    for name in ("ssl", "apiserver", "rw"):
        (node_dir / name).mkdir(exist_ok=True)
    (node_dir / "console.log").write_bytes(b"")
    (node_dir / "boot.log").write_bytes(b"")
    _install_units(node_dir, project, venv, hostname)
    if root:
        _mask_root_wants(node_dir, root)
    _write_binds(node_dir, overlays, root)
    env = {
        "NODE_DIR": str(node_dir),
        "NODE_HOSTNAME": hostname,
        "NODE_PROJECT": str(project),
        "NODE_VENV": str(venv),
        "NODE_OVERLAYS": " ".join(overlays),
        "NODE_MACHINE_ID": secrets.token_hex(16),
        "NODE_TRACE": os.environ.get("NODE_TRACE", ""),
        "NODE_ROOT": str(root or ""),
        **({} if root else _python_for_node(node_dir, venv)),
    }

    nodelib.sweep_stale_cgroups()
    short = hostname.split(".", maxsplit=1)[0][:20]
    cgroup = nodelib.cgroup2_root() / f"{nodelib.CGROUP_PREFIX}{short}-{secrets.token_hex(4)}"
    cgroup.mkdir()
    env["NODE_CGROUP"] = str(cgroup)
    state = {"NODE_DIR": str(node_dir), "NODE_HOSTNAME": hostname, "NODE_CGROUP": str(cgroup)}
    if root:
        state["NODE_ROOT"] = str(root)
    nodelib.write_state(node_dir, state)

    owner = int(os.environ.get("NODE_OWNER_PID") or os.getppid())
    keeper, unshare = _spawn(node_dir, env, owner)
    state.update(
        NODE_KEEPER_PID=str(keeper),
        NODE_KEEPER_PID_START=nodelib.start_time(keeper) or "",
        NODE_UNSHARE_PID=str(unshare),
        NODE_UNSHARE_PID_START=nodelib.start_time(unshare) or "",
        NODE_OWNER_PID=str(owner),
    )
    nodelib.write_state(node_dir, state)

    timeout = float(os.environ.get("NODE_BOOT_TIMEOUT") or 20)
    deadline = time.monotonic() + timeout
    pid = _wait_for_pid1(unshare, deadline)
    state.update(
        NODE_PID=str(pid),
        NODE_PIDNS=str(nodelib.ns_inode(pid, "pid")),
        NODE_MNTNS=str(nodelib.ns_inode(pid, "mnt")),
    )
    nodelib.write_state(node_dir, state)
    _wait_until_ready(state, deadline, timeout)
    return pid


def _install_units(node_dir: Path, project: Path, venv: Path, hostname: str) -> None:
    """The node's /lib/systemd/system: ours, then NODE_EXTRA_UNITS, templated."""
    units = node_dir / "units"
    if units.exists():
        shutil.rmtree(units)
    units.mkdir()
    values = {
        "@PROJECT@": str(project),
        "@VENV@": str(venv),
        "@TOOLS@": str(nodelib.TOOLS),
        "@HOSTNAME@": hostname,
    }
    sources = [nodelib.TOOLS / "units"]
    sources += [Path(p) for p in os.environ.get("NODE_EXTRA_UNITS", "").split(":") if p]
    without = set(os.environ.get("NODE_WITHOUT_UNITS", "").split())
    for name in sorted(without):
        if not (sources[0] / name).is_file():
            raise NodeError(f"NODE_WITHOUT_UNITS names {name}, which is not in {sources[0]}")
    for source in sources:
        if not source.is_dir():
            raise NodeError(f"unit folder {source} does not exist")
        for path in sorted(source.rglob("*")):
            target = units / path.relative_to(source)
            if source == sources[0] and path.name in without:
                continue
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            text = path.read_text()
            for key, value in values.items():
                text = text.replace(key, value)
            target.write_text(text)
    wants = os.environ.get("NODE_WANTS", "").split()
    if wants:
        folder = units / "node.target.wants"
        folder.mkdir(exist_ok=True)
        for unit in wants:
            if not (units / unit).exists():
                raise NodeError(f"NODE_WANTS names {unit}, which is not among the node's units")
            (folder / unit).symlink_to(f"../{unit}")


def _node_root() -> Path | None:
    """NODE_ROOT, checked: a root file system with systemd, whose folders the node's view
    is built on all lie inside it (an absolute symlink there would lead to the host's)."""
    value = os.environ.get("NODE_ROOT", "")
    if not value:
        return None
    root = Path(value).resolve()
    if root == Path("/"):
        raise NodeError("NODE_ROOT must not be / (leave it unset to boot the host's root)")
    if any(c in str(root) for c in ",: \t\n"):
        raise NodeError(f"NODE_ROOT {root} must not contain commas, colons or blanks")
    for sub in ("proc", "sys", "dev", "run", "tmp", "etc/systemd", "lib/systemd/system"):
        _inside(root, "/" + sub, must_exist=True)
    if not os.access(_inside(root, "/lib/systemd/systemd", must_exist=True), os.X_OK):
        raise NodeError(f"{root}/lib/systemd/systemd is not executable")
    return root


def _inside(root: Path, node_path: str, must_exist: bool = False) -> Path:
    """The host path of NODE_PATH inside ROOT (symlinks resolved the way the kernel will
    before pivot_root); an error when it leads out of ROOT."""
    host = Path(os.path.realpath(root / node_path.lstrip("/")))
    if not host.is_relative_to(root):
        raise NodeError(f"{node_path} of NODE_ROOT {root} leads out of it (to {host})")
    if must_exist and not host.exists():
        raise NodeError(f"NODE_ROOT {root} has no {node_path}")
    return host


def _mask_root_wants(node_dir: Path, root: Path) -> None:
    """With NODE_ROOT, the root's own unit folders stay in systemd's search path (below
    our units, which the node gets in /run/systemd/system), and their .wants/,
    .requires/ and .upholds/ folders are merged into our stub targets: mask every unit
    they name that the node does not provide itself, so that the node boots as little
    as a host-root node does (no udev, getty, logind, tmpfiles, timers, …)."""
    units = node_dir / "units"
    for folder in ("/lib/systemd/system", "/usr/local/lib/systemd/system"):
        path = _inside(root, folder)
        if not path.is_dir():
            continue
        for deps in sorted(path.iterdir()):
            if not deps.is_dir() or not deps.name.endswith((".wants", ".requires", ".upholds")):
                continue
            for entry in sorted(deps.iterdir()):
                mask = units / entry.name
                if not os.path.lexists(mask):
                    mask.symlink_to("/dev/null")


def _write_binds(node_dir: Path, overlays: list[str], root: Path | None = None) -> None:
    lines = []
    for spec in os.environ.get("NODE_BINDS", "").splitlines():
        if not spec.strip():
            continue
        parts = spec.strip().split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise NodeError(f"NODE_BINDS entry {spec!r} is not SRC:DST[:ro]")
        src, dst = Path(parts[0]).absolute(), Path(parts[1])
        if not dst.is_absolute():
            raise NodeError(f"NODE_BINDS destination {dst} must be absolute")
        if not src.exists():
            raise NodeError(f"NODE_BINDS source {src} does not exist")
        writable = [*NODE_WRITABLE, *overlays]
        if root:  # a throwaway root: mount points may be made anywhere inside it
            _inside(root, str(dst.parent))
        elif not dst.exists() and not any(dst.is_relative_to(w) for w in writable):
            raise NodeError(
                f"NODE_BINDS destination {dst} does not exist on the host and is not under "
                f"a folder the node owns ({', '.join(writable)}); creating it would change the host"
            )
        mode = parts[2] if len(parts) == 3 else "rw"
        lines.append(f"{src}\t{dst}\t{mode}\n")
    (node_dir / "binds").write_text("".join(lines))


def _python_for_node(node_dir: Path, venv: Path) -> dict[str, str]:
    """Makes the venv's interpreter usable by units with ProtectHome=.

    The venv's python is a symlink to the pyenv build under /root, whose libpython is
    found through an absolute RUNPATH under /root too. Inside the node the pyenv tree is
    bind-mounted read-only at /opt/kubecertd-node/python, the venv's bin/python* links
    and pyvenv.cfg are overlaid to point there, and the interpreter binary is replaced
    (bind mount) by a copy whose RUNPATH is $ORIGIN-relative, so that it loads the same
    libpython from the new place and never Debian's /usr/lib libpython3.11.
    """
    shim = node_dir / "python"
    if shim.exists():
        shutil.rmtree(shim)
    cfg = venv / "pyvenv.cfg"
    if not cfg.exists():
        return {}
    exe = (venv / "bin" / "python").resolve()
    if not str(exe).startswith(HIDDEN_BY_PROTECT_HOME):
        return {}
    home = Path(_cfg_value(cfg.read_text(), "home") or exe.parent).resolve()
    base = home.parent if home.name == "bin" else home
    if not exe.is_relative_to(base):
        raise NodeError(f"venv interpreter {exe} is not inside its home {base}")
    (shim / "venv-shim" / "bin").mkdir(parents=True)
    env = {"NODE_PY_BASE": str(base), "NODE_PY_NODE": NODE_PYTHON, "NODE_PY_EXE": ""}

    def relocate(text: str) -> str:
        return text.replace(str(base), NODE_PYTHON)

    cfg_text = cfg.read_text()
    raw_home = _cfg_value(cfg_text, "home") or ""
    cfg_text = cfg_text.replace(raw_home, str(Path(NODE_PYTHON) / home.relative_to(base)))
    (shim / "venv-shim" / "pyvenv.cfg").write_text(relocate(cfg_text))
    for entry in (venv / "bin").iterdir():
        if entry.is_symlink():
            target = os.readlink(entry)
            if os.path.isabs(target):
                resolved = Path(target).resolve()
                if resolved.is_relative_to(base):
                    new = Path(NODE_PYTHON) / Path(target).relative_to(base)
                    (shim / "venv-shim" / "bin" / entry.name).symlink_to(new)

    data = exe.read_bytes()
    patched = _relocate_runpath(data, base, exe)
    if patched is not None:
        (shim / "exe").write_bytes(patched)
        (shim / "exe").chmod(0o755)
        env["NODE_PY_EXE"] = str(exe.relative_to(base))
    return env


def _cfg_value(text: str, key: str) -> str | None:
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    return None


def _relocate_runpath(data: bytes, base: Path, exe: Path) -> bytes | None:
    """A copy of the ELF executable whose DT_RUNPATH/DT_RPATH entries under BASE are
    rewritten relative to $ORIGIN (in place, NUL-padded); None when nothing points there."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None  # only little-endian ELF64 (x86-64, arm64) is handled
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    loads, dynamic = [], None
    for i in range(phnum):
        ph = data[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        p_type = int.from_bytes(ph[0:4], "little")
        p_offset = int.from_bytes(ph[8:16], "little")
        p_vaddr = int.from_bytes(ph[16:24], "little")
        p_filesz = int.from_bytes(ph[32:40], "little")
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return None
    entries = []
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag = int.from_bytes(data[off : off + 8], "little")
        val = int.from_bytes(data[off + 8 : off + 16], "little")
        if tag == 0:
            break
        entries.append((tag, val))
    strtab = next((val for tag, val in entries if tag == 5), None)  # DT_STRTAB
    if strtab is None:
        return None
    strtab_off = next(
        (off + strtab - vaddr for vaddr, off, size in loads if vaddr <= strtab < vaddr + size),
        None,
    )
    if strtab_off is None:
        return None
    out = bytearray(data)
    changed = False
    for tag, val in entries:
        if tag not in (15, 29):  # DT_RPATH, DT_RUNPATH
            continue
        start = strtab_off + val
        end = data.index(b"\0", start)
        old = data[start:end].decode()
        parts = []
        for part in old.split(":"):
            path = Path(part)
            if path.is_absolute() and path.resolve().is_relative_to(base):
                parts.append("$ORIGIN/" + os.path.relpath(path.resolve(), exe.parent))
                changed = True
            else:
                parts.append(part)
        new = ":".join(parts).encode()
        if len(new) > len(old):
            raise NodeError(f"cannot relocate RUNPATH {old!r} of {exe}: {new!r} is longer")
        out[start:end] = new + b"\0" * (len(old) - len(new))
    return bytes(out) if changed else None


def _spawn(node_dir: Path, env: dict[str, str], owner: int) -> tuple[int, int]:
    """Starts keeper → unshare → inner.py; returns (keeper PID, unshare PID).

    The keeper is a small detached process that is unshare's parent. It SIGKILLs unshare
    when the owner process exits (so a killed test run takes its nodes down), and
    unshare runs with PR_SET_PDEATHSIG=SIGKILL so that killing the keeper does too;
    ``unshare --kill-child`` passes the SIGKILL on to PID 1, which ends the namespace.
    """
    read_fd, write_fd = os.pipe()
    first = os.fork()
    if first == 0:  # intermediate: detach, fork the keeper, report its PIDs, exit
        try:
            os.close(read_fd)
            os.setsid()
            _keeper(node_dir, env, owner, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        answer = pipe.read()
    os.waitpid(first, 0)
    try:
        keeper, unshare = (int(x) for x in answer.split())
    except ValueError:
        raise NodeError(f"could not start the node's keeper: {answer!r}") from None
    return keeper, unshare


def _keeper(node_dir: Path, env: dict[str, str], owner: int, report_fd: int) -> None:
    keeper = os.fork()
    if keeper != 0:
        return  # the intermediate exits; the keeper is adopted by init
    log = os.open(node_dir / "boot.log", os.O_WRONLY | os.O_APPEND)
    null = os.open(os.devnull, os.O_RDWR)
    owner_fd = None
    if owner > 0:
        try:
            owner_fd = os.pidfd_open(owner)
        except ProcessLookupError:
            os._exit(1)
    keeper_pid = os.getpid()
    child = os.fork()
    if child == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != keeper_pid:  # the keeper died before PDEATHSIG was armed
            os._exit(1)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 65536)
        argv = [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--net",
            "--uts",
            "--ipc",
            "--",
            sys.executable,
            "-S",
            str(nodelib.TOOLS / "inner.py"),
        ]
        child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        os.execvpe("unshare", argv, child_env)  # noqa: S606 - an argv, no shell
    os.write(report_fd, f"{os.getpid()} {child}".encode())
    os.close(report_fd)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    keep = {owner_fd} if owner_fd is not None else set()
    for fd in range(3, 1024):
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    child_fd = os.pidfd_open(child)
    poller = select.poll()
    poller.register(child_fd, select.POLLIN)
    if owner_fd is not None:
        poller.register(owner_fd, select.POLLIN)
    while True:
        try:
            ready = [fd for fd, _ in poller.poll()]
        except InterruptedError:
            continue
        if owner_fd in ready:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            owner_fd = None
            poller = select.poll()
            poller.register(child_fd, select.POLLIN)
        if child_fd in ready:
            _, status = os.waitpid(child, 0)
            with contextlib.suppress(OSError):
                (node_dir / "exit-status").write_text(f"{status}\n")
            os._exit(0)


def _wait_for_pid1(unshare: int, deadline: float) -> int:
    """The host PID of unshare's child, PID 1 of the node."""
    children = Path(f"/proc/{unshare}/task/{unshare}/children")
    while time.monotonic() < deadline:
        try:
            text = children.read_text().split()
        except OSError:
            raise NodeError("unshare exited before the node started") from None
        if text:
            return int(text[0])
        time.sleep(0.002)
    raise NodeError("unshare did not start the node's PID 1")


def _wait_until_ready(state: dict[str, str], deadline: float, timeout: float) -> None:
    """Polls (bounded) until systemd1 is on the bus, journald is active, startup is over."""
    pid = int(state["NODE_PID"])
    root = Path(f"/proc/{pid}/root")
    script = (
        "busctl --timeout=2 call org.freedesktop.DBus /org/freedesktop/DBus "
        "org.freedesktop.DBus NameHasOwner s org.freedesktop.systemd1 && "
        "systemctl is-active systemd-journald.service && systemctl is-system-running"
    )
    last = ""
    while time.monotonic() < deadline:
        if not nodelib.node_alive(state):
            raise NodeError("the node's systemd exited during boot")
        if (root / "run/dbus/system_bus_socket").exists():
            result = subprocess.run(
                nodelib.nsenter(state, "sh", "-c", script),
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            last = (result.stdout + result.stderr).strip()
            words = result.stdout.split()
            if words[:2] == ["b", "true"] and words[2:4] in (
                ["active", "running"],
                ["active", "degraded"],
            ):
                return
        time.sleep(0.01)
    raise NodeError(f"node not ready after {timeout:.0f} s (last check: {last or 'no bus yet'})")


def _dump_logs(node_dir: Path) -> None:
    for name in ("boot.log", "console.log"):
        path = node_dir / name
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace").strip()
            if text:
                tail = "\n".join(text.splitlines()[-40:])
                print(f"--- {path} (last lines) ---\n{tail}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
