"""Record real fanotify buffers from this kernel into tests/data/fanotify (run as root).

    .venv/bin/python tests/data/fanotify/record.py

Each scenario makes its own group on a fresh temporary folder, runs the actor as a child
that is left unreaped until the buffer has been read (so the kernel can still make a
pidfd for it), and saves exactly what one ``read()`` of the group returned.  index.json
says, per file, what the test may expect: the actor's PID and comm, whether the group
reported pidfds, and the marked folder's (fsid, handle) from ``name_to_handle_at``.
"""

from __future__ import annotations

import json
import os
import platform
import select
import subprocess
import sys
import tempfile

from kubecertd.edges import fanotify as fan

HERE = os.path.dirname(os.path.abspath(__file__))
OLD = fan.FAN_CLASS_NOTIF | fan.FAN_CLOEXEC | fan.FAN_NONBLOCK | fan.FAN_REPORT_DFID_NAME
MOVES = fan.FAN_MOVED_FROM | fan.FAN_MOVED_TO
CREATE_DIR = fan.FAN_CREATE | fan.FAN_ONDIR


def group(pidfd: bool) -> int:
    flags = OLD | (fan.FAN_REPORT_PIDFD if pidfd else 0)
    return fan._check(fan._lib().fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC), "init")


def read_one(fd: int) -> bytes:
    if not select.select([fd], [], [], 5)[0]:
        raise SystemExit("no event within 5 s")
    return os.read(fd, 65536)


def scenario(name: str, argv: list[str], pidfd: bool = True, renames: bool = True) -> None:
    folder = tempfile.mkdtemp(prefix="fanotify-record-")
    for entry in ("kubelet-client.pem", "other-node.pem"):
        with open(os.path.join(folder, entry), "w") as f:
            f.write("x\n")
    fd = group(pidfd)
    mask = fan.DIR_MASK | (fan.FAN_RENAME if renames else MOVES)
    dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fan._fanotify_mark(fd, fan.FAN_MARK_ADD | fan.FAN_MARK_ONLYDIR, mask, dirfd)
    handle = fan.handle_of(dirfd)
    os.close(dirfd)
    actor = subprocess.Popen(argv, cwd=folder)
    os.waitid(os.P_PID, actor.pid, os.WEXITED | os.WNOWAIT)  # a zombie: pidfds still possible
    buffer = read_one(fd)
    actor.wait()
    for event in fan.parse_events(buffer):
        if event.pidfd is not None and event.pidfd >= 0:
            os.close(event.pidfd)
    os.close(fd)
    subprocess.run(["rm", "-rf", folder], check=True)
    with open(os.path.join(HERE, f"{name}.bin"), "wb") as out:
        out.write(buffer)
    INDEX[f"{name}.bin"] = {
        "argv": argv,
        "pid": actor.pid,
        "pidfd": pidfd,
        "fsid": handle.fsid.hex(),
        "handle_type": handle.handle_type,
        "handle": handle.handle.hex(),
    }


def overflow() -> None:
    """More events than /proc/sys/fs/fanotify/max_queued_events: the last one read."""
    folder = tempfile.mkdtemp(prefix="fanotify-record-")
    fd = group(True)
    dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fan._fanotify_mark(fd, fan.FAN_MARK_ADD | fan.FAN_MARK_ONLYDIR, CREATE_DIR, dirfd)
    os.close(dirfd)
    with open("/proc/sys/fs/fanotify/max_queued_events") as f:
        limit = int(f.read())
    for i in range(limit + 1):
        os.mkdir(os.path.join(folder, f"d{i}"))
    last = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        last = chunk
    os.close(fd)
    offset = start = 0
    while offset < len(last):  # find the last event: the overflow, queued after the rest
        start, offset = offset, offset + int.from_bytes(last[offset : offset + 4], sys.byteorder)
    (event,) = fan.parse_events(last[start:])
    if not event.mask & fan.FAN_Q_OVERFLOW:
        raise SystemExit(f"no overflow at the end: {event}")
    with open(os.path.join(HERE, "overflow.bin"), "wb") as out:
        out.write(last[start:])
    INDEX["overflow.bin"] = {"events_before": limit}
    subprocess.run(["rm", "-rf", folder], check=True)


INDEX: dict[str, object] = {}

if __name__ == "__main__":
    scenario("delete", ["rm", "kubelet-client.pem"])
    scenario("delete-nopidfd", ["rm", "kubelet-client.pem"], pidfd=False)
    scenario("create", ["mkdir", "new.d"])
    scenario("rename", ["mv", "other-node.pem", "kubelet-client.pem"])
    scenario("rename-nopidfd", ["mv", "other-node.pem", "kubelet-client.pem"], pidfd=False)
    scenario("moves", ["mv", "other-node.pem", "kubelet-client.pem"], renames=False)
    scenario("modify", ["sh", "-c", "echo y >> kubelet-client.pem"])
    scenario("attrib", ["chmod", "600", "kubelet-client.pem"])
    scenario("delete-self", ["sh", "-c", 'd="$PWD"; cd / && rm -rf "$d"'])
    scenario("touch", ["touch", "new.pem"])
    overflow()
    INDEX["kernel"] = platform.release()  # type: ignore[assignment]
    with open(os.path.join(HERE, "index.json"), "w") as out:
        json.dump(INDEX, out, indent=1, sort_keys=True)
        out.write("\n")
