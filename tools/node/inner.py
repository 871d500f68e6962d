"""PID 1 of a throwaway node, before it becomes systemd (started by tools/node/boot).

Runs as ``unshare --pid --fork --kill-child --mount --net --uts --ipc -- python -S
inner.py`` with its settings in NODE_* environment variables. It moves itself into the
node's own cgroup2 folder, enters a new cgroup namespace rooted there, builds the node's
file system view and execs systemd. Everything is done with system calls (no mount(8),
ip(8), … processes: that made boot twice as slow). Nothing here may change the host:
every mount is made in this private mount namespace, every write goes to a tmpfs or to
an overlay whose upper layer lives in $NODE_DIR.

With NODE_ROOT (a throwaway copy of another root file system, say a debootstrapped
Debian) the same view is built on that tree instead of the host's ``/`` (its own
/etc, /var, … written in place, no overlays unless asked for), then ``pivot_root``
makes it the node's ``/`` and systemd is that tree's ``/lib/systemd/systemd``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import socket
import stat
import struct
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
CLONE_NEWCGROUP = 0x02000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
STAGE = "/run/kubecertd-node"

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.syscall.restype = ctypes.c_long
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str = ""
) -> None:
    if libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data or None)) != 0:
        errno = ctypes.get_errno()
        what = fstype or "bind"
        raise OSError(errno, f"mount {source} on {target} ({what}, {data}): {os.strerror(errno)}")


def bind(source: str, target: str, readonly: bool = False) -> None:
    mount(source, target, None, MS_BIND)
    if readonly:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def umount_lazy(target: str) -> None:
    if libc.umount2(_b(target), MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"umount {target}: {os.strerror(errno)}")


def write(path: str, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def lo_up() -> None:
    """ip link set lo up (the kernel then gives it 127.0.0.1/8 and ::1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def pivot_root(new_root: str) -> None:
    """Makes NEW_ROOT (a mount point) this mount namespace's ``/`` and drops the old one."""
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root: unsupported architecture {platform.machine()}")
    os.chdir(new_root)
    if libc.syscall(ctypes.c_long(number), b".", b".") != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"pivot_root {new_root}: {os.strerror(errno)}")
    umount_lazy(".")  # the old root, now stacked on top of the new one
    os.chdir("/")


def main() -> None:
    env = os.environ
    os.umask(0o022)
    # The node's root as seen now: "" for the host's /, else NODE_ROOT (pivoted to at the
    # end). p() turns a path of the node into the path to use until then.
    root = env.get("NODE_ROOT", "")

    def p(path: str) -> str:
        return root + path

    trace = bool(env.get("NODE_TRACE"))
    if trace:
        print(f"inner start {time.time():.6f}", file=sys.stderr, flush=True)
    binds = []
    with open(os.path.join(env["NODE_DIR"], "binds")) as f:
        for line in f:
            if line.strip():
                src, dst, mode = line.rstrip("\n").split("\t")
                binds.append((src, dst, mode == "ro"))

    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Our own cgroup2 folder becomes the node's cgroup root ("0::/" inside).
    with open(os.path.join(env["NODE_CGROUP"], "cgroup.procs"), "w") as f:
        f.write("0")
    if libc.unshare(CLONE_NEWCGROUP) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWCGROUP)")
    if root:  # pivot_root wants a mount point; every mount below is made on this one
        mount(root, root, None, MS_BIND | MS_REC)

    # --- kernel file systems ---------------------------------------------------------
    # A /proc of this PID namespace; the host's sysctls stay read-only.
    if not root:
        umount_lazy("/proc")
    mount("proc", p("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    bind(p("/proc/sys"), p("/proc/sys"), readonly=True)
    # A sysfs of this network namespace (read-only, as systemd-nspawn does) without the
    # host's v1 cgroup hierarchies, and cgroup2 rooted at the node's folder.
    if not root:
        umount_lazy("/sys")
    mount("sysfs", p("/sys"), "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("cgroup2", p("/sys/fs/cgroup"), "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)

    mount("tmpfs", p("/run"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64m")
    # $NODE_DIR and the bind sources are usually under /tmp, which the node gets a
    # private tmpfs for: reach them through staging binds under /run (dropped below).
    # (With NODE_ROOT the host's /tmp stays in sight, but a bind into the root may hide
    # the source of a later one: staging first is right there too.)
    stage = p(STAGE)
    for sub in ("dir", "empty", "src", "project", "venv"):
        os.makedirs(f"{stage}/{sub}")
    bind(env["NODE_DIR"], f"{stage}/dir")
    # The project (a CI clone may well live under /tmp) and the venv, staged the same way.
    project, venv = env["NODE_PROJECT"], env["NODE_VENV"]
    bind(project, f"{stage}/project")
    if not root:  # (with NODE_ROOT, NODE_VENV is a folder of that root)
        bind(venv, f"{stage}/venv")
    d = f"{stage}/dir"
    is_dir = []  # decided now: once /tmp is the node's, a source under /tmp is out of sight
    for i, (src, _dst, _ro) in enumerate(binds):
        staged = f"{stage}/src/{i}"
        is_dir.append(os.path.isdir(src))
        if is_dir[i]:
            os.mkdir(staged)
        else:
            touch(staged)
        bind(src, staged)
    # A private /tmp: PrivateTmp= units put /tmp/systemd-private-* here, not on the host.
    mount("tmpfs", p("/tmp"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=256m")  # noqa: S108

    # --- /dev: a minimal private one; /dev/console is $NODE_DIR/console.log ----------
    if not root:
        umount_lazy("/dev")
    mount("tmpfs", p("/dev"), "tmpfs", MS_NOSUID, "mode=0755,size=4m")
    for name, major, minor in (
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ):
        os.mknod(p(f"/dev/{name}"), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(p(f"/dev/{name}"), 0o666)  # noqa: S103 - as on every Linux system
    for sub in ("pts", "shm", "mqueue", "net"):
        os.mkdir(p(f"/dev/{sub}"), 0o755)
    mount(
        "devpts",
        p("/dev/pts"),
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    mount("tmpfs", p("/dev/shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")  # noqa: S108
    for link, target in (
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("log", "/run/systemd/journal/dev-log"),
    ):
        os.symlink(target, p(f"/dev/{link}"))
    touch(p("/dev/console"))
    bind(f"{d}/console.log", p("/dev/console"))

    # --- writable layers over host folders ------------------------------------------
    for folder in env["NODE_OVERLAYS"].split():
        name = folder.strip("/").replace("/", "_")
        upper, work = f"{d}/rw/{name}/upper", f"{d}/rw/{name}/work"
        os.makedirs(upper, exist_ok=True)
        os.makedirs(work, exist_ok=True)
        lower = p(folder)
        mount("overlay", lower, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")

    # --- /etc of the node ------------------------------------------------------------
    hostname = env["NODE_HOSTNAME"]
    write(p("/etc/hostname"), hostname + "\n")
    write(
        p("/etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1 {hostname} {hostname.split('.', maxsplit=1)[0]}\n",
    )
    if os.path.lexists(p("/etc/machine-id")):
        os.unlink(p("/etc/machine-id"))
    write(p("/etc/machine-id"), env["NODE_MACHINE_ID"] + "\n", 0o444)
    os.makedirs(p("/etc/systemd/journald.conf.d"), exist_ok=True)
    os.makedirs(p("/etc/systemd/system.conf.d"), exist_ok=True)
    write(
        p("/etc/systemd/journald.conf.d/50-node.conf"),
        "[Journal]\nStorage=volatile\nRateLimitBurst=0\nReadKMsg=no\n"
        "ForwardToSyslog=no\nForwardToWall=no\nForwardToConsole=no\n",
    )
    write(p("/etc/systemd/system.conf.d/50-node.conf"), "[Manager]\nShowStatus=no\nLogColor=no\n")
    # systemd sees only our units: no host unit files, no host enablement symlinks.
    mount("tmpfs", p("/etc/systemd/system"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    if root:
        # The root's /lib/systemd/system stays its own (dpkg may install and remove
        # units there while the node runs); ours come first, from /run/systemd/system,
        # with masks for what the root's targets want (made by boot).
        os.makedirs(p("/run/systemd/system"))
        bind(f"{d}/units", p("/run/systemd/system"), readonly=True)
    else:
        bind(f"{d}/units", p("/lib/systemd/system"), readonly=True)

    # --- the project and the venv, read-only at their own paths ----------------------
    # (With NODE_ROOT, NODE_VENV is a folder of that root: nothing to bind.)
    os.makedirs(p(project), exist_ok=True)
    bind(f"{stage}/project", p(project), readonly=True)
    if not root and not (venv + "/").startswith(project + "/"):
        os.makedirs(venv, exist_ok=True)
        bind(f"{stage}/venv", venv, readonly=True)
    # The venv's interpreter lives under /root (pyenv), which ProtectHome= hides from
    # sandboxed units: the node gets the same tree outside /root and the venv points
    # there (tools/node/README.md, "Python under ProtectHome").
    py_node = env.get("NODE_PY_NODE")
    if py_node and not root:
        os.makedirs(py_node, exist_ok=True)
        bind(env["NODE_PY_BASE"], py_node, readonly=True)
        if env.get("NODE_PY_EXE"):
            bind(f"{d}/python/exe", f"{py_node}/{env['NODE_PY_EXE']}", readonly=True)
        mount("overlay", venv, "overlay", MS_RDONLY, f"lowerdir={d}/python/venv-shim:{venv}")

    # --- the kubelet's files, reachable from outside as $NODE_DIR/ssl, …/apiserver ----
    for sub in ("ssl", "apiserver"):
        os.makedirs(p(f"/etc/kubernetes/{sub}"), exist_ok=True)
        bind(f"{d}/{sub}", p(f"/etc/kubernetes/{sub}"))
    for i, (_src, dst, readonly) in enumerate(binds):
        if is_dir[i]:
            os.makedirs(p(dst), exist_ok=True)
        else:
            os.makedirs(os.path.dirname(p(dst)), exist_ok=True)
            if not os.path.exists(p(dst)):
                touch(p(dst))
        bind(f"{stage}/src/{i}", p(dst), readonly)
    # Drop the staging binds (never delete recursively there: they are host folders).
    for sub in ("dir", "project", "venv"):
        if os.path.ismount(f"{stage}/{sub}"):
            umount_lazy(f"{stage}/{sub}")
        os.rmdir(f"{stage}/{sub}")
    for i in range(len(binds)):
        staged = f"{stage}/src/{i}"
        umount_lazy(staged)
        if is_dir[i]:
            os.rmdir(staged)
        else:
            os.unlink(staged)
    os.rmdir(f"{stage}/src")

    socket.sethostname(hostname)
    lo_up()
    if root:
        pivot_root(root)

    if trace:
        print(f"inner exec {time.time():.6f}", file=sys.stderr, flush=True)
    null = os.open("/dev/null", os.O_RDONLY)
    console = os.open("/dev/console", os.O_WRONLY | os.O_APPEND)
    os.dup2(null, 0)
    os.dup2(console, 1)
    os.dup2(console, 2)
    os.closerange(3, 65536)
    os.chdir("/")
    os.execve(  # noqa: S606 - an argv, no shell
        "/lib/systemd/systemd",
        [
            "/lib/systemd/systemd",
            "--system",
            "--unit=node.target",
            "--log-target=journal",
            "--log-color=no",
        ],
        {
            "container": "other",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "SYSTEMD_GENERATOR_PATH": f"{STAGE}/empty",
            "SYSTEMD_ENVIRONMENT_GENERATOR_PATH": f"{STAGE}/empty",
        },
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - PID 1: one clear line in boot.log, then die
        print(f"inner: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
