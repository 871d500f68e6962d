"""The fanotify witness (kubecertd.edges.fanotify): the parser on buffers recorded from a
real kernel (tests/data/fanotify, see its README), and the real thing on folders under
tmp_path as root.  Every wait is a select() with a bound."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubecertd.edges import fanotify as fan
from kubecertd.edges.fanotify import (
    FAN_ATTRIB,
    FAN_CLOSE_WRITE,
    FAN_CREATE,
    FAN_DELETE,
    FAN_DELETE_SELF,
    FAN_MODIFY,
    FAN_MOVED_FROM,
    FAN_MOVED_TO,
    FAN_ONDIR,
    FAN_Q_OVERFLOW,
    FAN_RENAME,
    Event,
    FileHandle,
    Witness,
    parse_events,
)

DATA = Path(__file__).parent / "data" / "fanotify"
INDEX = json.loads((DATA / "index.json").read_text())
PYTHON = sys.executable

# name -> the events of that recording: (mask, names, pidfd) with names either the entry
# or (old, new); pidfd "fd": a pidfd was made, -1: FAN_NOPIDFD, None: no PIDFD record
RECORDED: dict[str, list[tuple[int, object, object]]] = {
    "delete": [(FAN_DELETE, "kubelet-client.pem", "fd")],
    "delete-nopidfd": [(FAN_DELETE, "kubelet-client.pem", None)],
    "create": [(FAN_CREATE | FAN_ONDIR, "new.d", "fd")],
    "rename": [(FAN_RENAME, ("other-node.pem", "kubelet-client.pem"), "fd")],
    "rename-nopidfd": [(FAN_RENAME, ("other-node.pem", "kubelet-client.pem"), None)],
    "moves": [
        (FAN_MOVED_FROM, "other-node.pem", "fd"),
        (FAN_MOVED_TO, "kubelet-client.pem", "fd"),
    ],
    "modify": [(FAN_MODIFY | FAN_CLOSE_WRITE, "kubelet-client.pem", "fd")],
    "attrib": [(FAN_ATTRIB, "kubelet-client.pem", "fd")],
    "touch": [(FAN_CREATE | FAN_CLOSE_WRITE | FAN_ATTRIB, "new.pem", "fd")],
    # rm -rf ran as sh's child and was reaped before the read: no pidfd could be made
    "delete-self": [
        (FAN_DELETE, "other-node.pem", -1),
        (FAN_DELETE, "kubelet-client.pem", -1),
        (FAN_DELETE_SELF | FAN_ONDIR, ".", -1),
    ],
}


def recorded_handle(name: str) -> FileHandle:
    entry = INDEX[f"{name}.bin"]
    return FileHandle(
        bytes.fromhex(entry["fsid"]), entry["handle_type"], bytes.fromhex(entry["handle"])
    )


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_buffer(name: str) -> None:
    """Each recorded buffer parses to its events: mask, names, pidfd, PID and folder handle."""
    events = parse_events((DATA / f"{name}.bin").read_bytes())
    folder = recorded_handle(name)
    assert [
        (e.mask, e.name if e.name is not None else (e.old_name, e.new_name)) for e in events
    ] == [(mask, names) for mask, names, _ in RECORDED[name]]
    for event, (_mask, _names, pidfd) in zip(events, RECORDED[name], strict=True):
        assert event.fd == fan.FAN_NOFD
        if pidfd == "fd":
            assert event.pidfd is not None and event.pidfd >= 0
        else:
            assert event.pidfd == pidfd
        if event.mask & FAN_RENAME:
            assert event.old_dir == event.new_dir == folder
            assert event.dir is None
        else:
            assert event.dir == folder
    if name != "delete-self":  # there the actor was a child of the recorded sh
        assert {e.pid for e in events} == {INDEX[f"{name}.bin"]["pid"]}


def test_recorded_overflow() -> None:
    """A queue overflow is one event with no name, PID 0 and no pidfd."""
    (event,) = parse_events((DATA / "overflow.bin").read_bytes())
    assert event.mask == FAN_Q_OVERFLOW
    assert (event.pid, event.pidfd, event.dir, event.name) == (0, fan.FAN_NOPIDFD, None, None)


def test_recorded_buffers_concatenate() -> None:
    """One read may return many events: the buffers back to back parse to all of them."""
    names = sorted(RECORDED)
    joined = b"".join((DATA / f"{name}.bin").read_bytes() for name in names)
    assert len(parse_events(joined)) == sum(len(RECORDED[n]) for n in names)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_truncated_buffer_is_value_error(name: str) -> None:
    """A buffer cut anywhere inside an event is a ValueError, never a half event."""
    data = (DATA / f"{name}.bin").read_bytes()
    for cut in range(1, len(data)):
        try:
            events = parse_events(data[:cut])
        except ValueError:
            continue
        # cut exactly between two events: the first ones, whole
        assert len(events) < len(RECORDED[name])


def metadata(
    event_len: int, mask: int = FAN_DELETE, vers: int = 3, metadata_len: int = 24
) -> bytes:
    return struct.pack("=IBBHQii", event_len, vers, 0, metadata_len, mask, -1, 42)


def info(info_type: int, body: bytes) -> bytes:
    return struct.pack("=BBH", info_type, 0, 4 + len(body)) + body


@pytest.mark.parametrize(
    "buffer",
    [
        pytest.param(metadata(24, vers=2), id="version"),
        pytest.param(metadata(20), id="event-shorter-than-metadata"),
        pytest.param(metadata(24, metadata_len=16), id="metadata-too-short"),
        pytest.param(metadata(48), id="event-past-buffer"),
        pytest.param(metadata(28) + b"\x02\x00\x02\x00", id="info-shorter-than-header"),
        pytest.param(metadata(28) + b"\x02\x00\x08\x00", id="info-past-event"),
        pytest.param(metadata(32) + info(4, b"\x01\x00"), id="short-pidfd"),
        pytest.param(metadata(32) + info(2, b"\x00" * 4), id="short-fid"),
        pytest.param(
            metadata(44) + info(2, struct.pack("=8sIi", b"f" * 8, 64, 1) + b"\x00" * 4),
            id="handle-past-record",
        ),
        pytest.param(
            metadata(44) + info(2, struct.pack("=8sIi", b"f" * 8, 4, 1) + b"abcd"),
            id="name-without-nul",
        ),
    ],
)
def test_malformed_buffer(buffer: bytes) -> None:
    """Each way a buffer can be malformed is a ValueError naming the problem."""
    with pytest.raises(ValueError):
        parse_events(buffer)


def test_unknown_info_records_are_skipped() -> None:
    """Info records of other types (error, range, mount) are stepped over."""
    body = struct.pack("=8sIi", b"f" * 8, 4, 1) + b"hand" + b"a.pem\x00\x00\x00"
    records = info(6, b"\x00" * 12) + info(2, body)
    (event,) = parse_events(metadata(24 + len(records)) + records)
    assert (event.name, event.dir) == ("a.pem", FileHandle(b"f" * 8, 1, b"hand"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_any_bytes_parse_or_value_error(data: bytes) -> None:
    """Any bytes give a list of events or a ValueError, never another exception."""
    with contextlib.suppress(ValueError):
        assert isinstance(parse_events(data), list)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 10, 12, 99]), st.binary(max_size=60)),
        max_size=4,
    ),
    st.integers(min_value=0, max_value=8),
)
def test_info_records_parse_or_value_error(records: list[tuple[int, bytes]], slack: int) -> None:
    """Well-framed events with arbitrary info records reach the record parsers: still a
    list or a ValueError."""
    tail = b"".join(info(t, b) for t, b in records) + b"\x00" * slack
    try:
        events = parse_events(metadata(24 + len(tail)) + tail)
    except ValueError:
        return
    assert [e.pid for e in events] == [42]


@pytest.mark.parametrize(
    ("mask", "ops"),
    [
        (FAN_DELETE, ("delete",)),
        (FAN_MODIFY | FAN_CLOSE_WRITE, ("write",)),
        (FAN_CLOSE_WRITE, ("write",)),
        (FAN_CREATE | FAN_CLOSE_WRITE | FAN_ATTRIB, ("create", "write", "attrib")),
        (FAN_RENAME, ("rename",)),
        (FAN_MOVED_FROM, ("rename",)),
        (FAN_DELETE_SELF | FAN_ONDIR, ("delete-self",)),
        (fan.FAN_MOVE_SELF | FAN_ONDIR, ("move-self",)),
        (FAN_CREATE | FAN_DELETE, ("create", "delete")),
    ],
)
def test_event_ops(mask: int, ops: tuple[str, ...]) -> None:
    """A (possibly merged) mask names each operation once, in a fixed order."""
    assert Event(mask, 1, None, "/x").ops == ops


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EPERM, "seccomp"),
        (errno.ENOSYS, "ENOSYS"),
        (errno.EINVAL, "5.9"),
        (errno.EMFILE, "max_user_groups"),
    ],
)
def test_init_reasons(code: int, words: str) -> None:
    """Each fanotify_init failure has a one-line reason that says what to change."""
    reason = fan._init_reason(OSError(code, os.strerror(code)))
    assert words in reason
    assert "\n" not in reason


# ---- the real kernel ---------------------------------------------------------------


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("fanotify with PIDs needs root (make test runs as root)")


@pytest.fixture
def folder(tmp_path: Path, root: None) -> Path:
    """A watched folder with two files, like ssl_dir."""
    ssl = tmp_path / "etc" / "ssl"
    ssl.mkdir(parents=True)
    for name in ("worker.pem", "worker-key.pem"):
        (ssl / name).write_text("x\n")
    return ssl


@pytest.fixture
def witness(folder: Path) -> Iterator[Witness]:
    with Witness([str(folder)]) as made:
        yield made


def read_until(
    witness: Witness, done: Callable[[list[Event]], bool], timeout: float = 5.0
) -> list[Event]:
    """Events until ``done`` says enough, within ``timeout`` seconds."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no such events within {timeout}s; got {events}")
        if select.select([witness], [], [], left)[0]:
            events += witness.read()
    return events


def test_kernel_has_what_the_witness_needs(witness: Witness) -> None:
    """This kernel makes pidfds (5.15) and one rename event (5.17); the folder and its
    parent are marked."""
    assert witness.pidfds
    assert witness.renames
    assert witness.watching == sorted(
        [str(Path(witness.directories[0]).parent), *witness.directories]
    )


def test_events_resolve_to_paths(witness: Witness, folder: Path) -> None:
    """Changes in the folder come back as paths with the actor's PID; the parent's other
    entries are not reported."""
    (folder.parent / "sibling.conf").write_text("x")
    (folder / "worker.pem").unlink()
    os.rename(folder / "worker-key.pem", folder / "old-key.pem")
    events = read_until(witness, lambda seen: any(e.mask & FAN_RENAME for e in seen))
    assert [(e.ops, e.path, e.new_path, e.pid) for e in events] == [
        (("delete",), str(folder / "worker.pem"), None, os.getpid()),
        (("rename",), str(folder / "worker-key.pem"), str(folder / "old-key.pem"), os.getpid()),
    ]


def test_replaced_folder_is_marked_again(witness: Witness, folder: Path) -> None:
    """A folder moved away and re-created is watched again; the one moved away is not."""
    old = folder.parent / "ssl.old"
    os.rename(folder, old)
    read_until(witness, lambda seen: any("move-self" in e.ops for e in seen))
    assert witness.watching == [str(folder.parent)]
    folder.mkdir()
    read_until(witness, lambda seen: any(e.path == str(folder) for e in seen))
    assert witness.watching == [str(folder.parent), str(folder)]
    (old / "stale.pem").write_text("x")
    (folder / "fresh.pem").write_text("x")
    events = read_until(witness, lambda seen: any("write" in e.ops for e in seen))
    assert {e.path for e in events} == {str(folder / "fresh.pem")}


def test_deleted_folder_reports_self(witness: Witness, folder: Path) -> None:
    """``rm -rf`` of the folder: its entries, the folder itself, then its entry in the parent."""
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    events = read_until(
        witness, lambda seen: any(e.mask & FAN_ONDIR and "delete" in e.ops for e in seen)
    )
    assert [(e.ops, e.path) for e in events][-2:] == [
        (("delete-self",), str(folder)),
        (("delete",), str(folder)),
    ]
    assert witness.watching == [str(folder.parent)]


def test_overflow_is_an_event(witness: Witness, folder: Path) -> None:
    """More changes than the queue holds end in one overflow event.  Each name is made and
    removed (one merged CREATE|DELETE event per name), so nothing is left to clean up."""
    limit = int(Path("/proc/sys/fs/fanotify/max_queued_events").read_text())
    for i in range(limit + 1):
        os.mknod(folder / f"f{i}")
        os.unlink(folder / f"f{i}")
    events = read_until(witness, lambda seen: any(e.overflow for e in seen))
    assert events[-1].overflow
    assert len(events) == limit + 1


def child(script: str, *args: str, prefix: tuple[str, ...] = ()) -> dict[str, object]:
    """Run ``script`` in a fresh python (optionally under ``prefix``); its JSON answer."""
    result = subprocess.run(
        [*prefix, PYTHON, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


UNAVAILABLE = """
import json, sys
from kubecertd.edges.fanotify import Witness, WitnessUnavailable
try:
    Witness([sys.argv[1]])
except WitnessUnavailable as exc:
    print(json.dumps({"reason": exc.reason, "code": exc.code}))
else:
    print(json.dumps({"reason": None}))
"""


def test_unavailable_without_root(root: None) -> None:
    """As nobody without capabilities the witness is unavailable, for a clear reason."""
    nobody = (
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps=-all",
    )
    answer = child(UNAVAILABLE, "/", prefix=nobody)
    assert answer["code"] == "witness-unavailable"
    assert "CAP_SYS_ADMIN" in str(answer["reason"])


SECCOMP = (
    """
import ctypes, errno, json, sys
# a filter failing one system call with an errno, as SystemCallFilter= with
# SystemCallErrorNumber= does: ld nr; jeq NR ? errno : allow
nr, code = int(sys.argv[2]), getattr(errno, sys.argv[3])
prog = [(0x20, 0, 0, 0), (0x15, 0, 1, nr), (0x06, 0, 0, 0x00050000 | code), (0x06, 0, 0, 0x7FFF0000)]
class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
filters = (Filter * len(prog))(*[Filter(*p) for p in prog])
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(Prog(len(prog), filters)), 0, 0) == 0  # SECCOMP_MODE_FILTER
"""
    + UNAVAILABLE
)

FANOTIFY_INIT_NR = {"x86_64": 300, "aarch64": 262}


@pytest.mark.parametrize(
    ("code", "words"), [("EPERM", "CAP_SYS_ADMIN is held: a seccomp filter"), ("ENOSYS", "ENOSYS")]
)
def test_unavailable_under_seccomp(folder: Path, code: str, words: str) -> None:
    """Root with CAP_SYS_ADMIN, but a seccomp filter refusing fanotify_init: unavailable,
    and the reason names the filter, not the capability."""
    nr = FANOTIFY_INIT_NR.get(platform.machine())
    if nr is None:
        pytest.skip(f"fanotify_init's number on {platform.machine()} is not in the table")
    answer = child(SECCOMP, str(folder), str(nr), code)
    assert words in str(answer["reason"])


DROPPED = """
import ctypes, json, os, select, subprocess, sys
from kubecertd.edges import fanotify as fan
folder, other = sys.argv[1:3]
witness = fan.Witness([folder])
fan.drop_sys_admin()
status = open("/proc/self/status").read()
bounding = int(status.split("CapBnd:")[1].split()[0], 16)
answer = {
    "sys_admin": fan.has_capability(21), "bounding_sys_admin": bool(bounding >> 21 & 1),
    "kept": [fan.has_capability(c) for c in (0, 1, 3)],  # CHOWN, DAC_OVERRIDE, FOWNER
}
flags = fan.FAN_CLASS_NOTIF | fan.FAN_REPORT_DFID_NAME | fan.FAN_REPORT_PIDFD
answer["init"] = fan._lib().fanotify_init(flags, os.O_RDONLY), ctypes.get_errno()
try:
    fan.Witness([other])
except fan.WitnessUnavailable as exc:
    answer["second"] = exc.reason
witness.mark([other])  # new marks on an existing group still work
answer["watching"] = witness.watching
actor = subprocess.Popen(["rm", os.path.join(other, "f")])
exited = os.pidfd_open(actor.pid)
assert select.select([exited], [], [], 10)[0]  # exited, not reaped: a pidfd is still possible
assert select.select([witness], [], [], 10)[0]
answer["events"] = [(e.ops, e.path, e.pid, e.pidfd is not None and e.pidfd >= 0) for e in witness.read()]
answer["actor"] = actor.pid
actor.wait()
print(json.dumps(answer))
"""


def test_drop_sys_admin_keeps_the_group(folder: Path, tmp_path: Path) -> None:
    """After drop_sys_admin() (in a child): no new group, other capabilities kept, and the
    existing group still marks folders and reports PIDs and pidfds."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("x")
    answer = child(DROPPED, str(folder), str(other))
    assert answer["sys_admin"] is False
    assert answer["bounding_sys_admin"] is False
    assert answer["kept"] == [True, True, True]
    assert answer["init"] == [-1, errno.EPERM]
    assert "CAP_SYS_ADMIN" in str(answer["second"])
    assert str(other) in answer["watching"]  # type: ignore[operator]
    assert answer["events"] == [[["delete"], str(other / "f"), answer["actor"], True]]


def test_pytest_keeps_its_capabilities(root: None) -> None:
    """The drop happened in children only."""
    assert fan.has_capability(fan.CAP_SYS_ADMIN)


def test_close_releases_pidfds(witness: Witness, folder: Path) -> None:
    """Pidfds live until the next read() or close(), then are closed."""
    actor = subprocess.Popen(["rm", str(folder / "worker.pem")])
    exited = os.pidfd_open(actor.pid)
    try:
        assert select.select([exited], [], [], 10)[0]
        (event,) = read_until(witness, bool)
        assert event.pidfd is not None and event.pidfd >= 0
        os.fstat(event.pidfd)
        witness.close()
        with pytest.raises(OSError):
            os.fstat(event.pidfd)
    finally:
        os.close(exited)
        actor.wait(timeout=10)


def test_handle_of_names_the_inode(folder: Path) -> None:
    """name_to_handle_at gives one (fsid, handle) per folder inode, whichever fd asks."""

    def handle(path: Path) -> FileHandle:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return fan.handle_of(fd)
        finally:
            os.close(fd)

    assert handle(folder) == handle(folder)
    assert handle(folder) != handle(folder.parent)
    assert handle(folder).fsid == handle(folder.parent).fsid
    assert len(handle(folder).fsid) == 8


def test_moves_without_fan_rename(folder: Path) -> None:
    """Before 5.17 (forced here): a rename is a moved-away and a moved-in event."""
    with Witness() as witness:
        witness.renames = False
        witness.mark([str(folder)])
        os.rename(folder / "worker-key.pem", folder / "old-key.pem")
        events = read_until(witness, lambda seen: len(seen) >= 2)
    assert [(e.ops, e.path, e.new_path) for e in events] == [
        (("rename",), str(folder / "worker-key.pem"), None),
        (("rename",), "", str(folder / "old-key.pem")),
    ]
