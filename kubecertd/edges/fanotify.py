"""Who changed the credential folders: a fanotify witness (ctypes; issue 12).

inotify says *that* a file changed; fanotify also says *who* (the acting process's TGID,
and with ``FAN_REPORT_PIDFD`` a pidfd that proves which process it was).  Detection and
healing never depend on this module: the witness only adds a culprit to a finding.

Kernel facts that shape it (fanotify(7), fanotify_init(2), fanotify_mark(2),
``include/uapi/linux/fanotify.h``; measured on 6.18 in shared/notes/fanotify-culprits.md):

- A group that reports who acted needs CAP_SYS_ADMIN at ``fanotify_init`` only (the
  privilege is a group flag, ``FANOTIFY_UNPRIV``); an unprivileged group (≥ 5.13) gets
  ``pid = 0`` for every actor but the reader, so without the capability we refuse
  rather than fall back.  ``drop_sys_admin()`` afterwards keeps the group working.
- ``FAN_REPORT_DFID_NAME`` (5.9) names the entry in every event by the directory's file
  handle and the entry's name; handles are compared with ``name_to_handle_at`` of the
  marked folders, so no ``open_by_handle_at`` (and no CAP_DAC_READ_SEARCH) is needed.
- ``FAN_REPORT_PIDFD`` (5.15) adds a pidfd made when the event is *read*, only while the
  actor still exists (alive or zombie); a reaped actor gives ``FAN_NOPIDFD``.
- ``FAN_RENAME`` (5.17) is one event with the old and the new name; before that a move
  is ``FAN_MOVED_FROM`` + ``FAN_MOVED_TO``.
- Inode marks, never mount marks: a mount mark made from the unit's private mount
  namespace (``ProtectSystem=``) is blind to writers on the host's mount, and FID
  events are not allowed on mount marks at all.  An inode mark dies with its inode, so
  the folders' parents are marked too (a replaced folder is a dirent event there) and
  the marks are re-armed after ``FAN_DELETE_SELF``/``FAN_MOVE_SELF``.
- Same-pid events on one name merge while queued (``MODIFY|CLOSE_WRITE``), and a full
  queue (``/proc/sys/fs/fanotify/max_queued_events``, 16384) ends in one
  ``FAN_Q_OVERFLOW``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from ..errors import KubecertdError

# fanotify_init flags
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_PIDFD = 0x80
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

# event mask bits
FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000

# fanotify_mark flags
FAN_MARK_ADD = 0x1
FAN_MARK_ONLYDIR = 0x8

# info record types
INFO_FID = 1
INFO_DFID_NAME = 2
INFO_DFID = 3
INFO_PIDFD = 4
INFO_OLD_DFID_NAME = 10
INFO_NEW_DFID_NAME = 12

FAN_NOFD = -1
FAN_NOPIDFD = -1  # the actor was reaped before the event was read
FAN_EPIDFD = -2  # the kernel could not make a pidfd
METADATA_VERSION = 3

CAP_SYS_ADMIN = 21
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_HANDLE_FID = 0x200  # 6.5: the handle fanotify reports (same bytes for a folder on ext4/xfs)
MAX_HANDLE_SZ = 128

_CHANGES = FAN_CREATE | FAN_DELETE | FAN_MODIFY | FAN_CLOSE_WRITE | FAN_ATTRIB
_SELF = FAN_DELETE_SELF | FAN_MOVE_SELF
_MOVES = FAN_MOVED_FROM | FAN_MOVED_TO
# Folders: every change to an entry or to the folder itself.  Parents: the folder's own
# entry only (created, deleted, renamed), filtered by name when read.
DIR_MASK = _CHANGES | _SELF | FAN_EVENT_ON_CHILD | FAN_ONDIR
PARENT_MASK = FAN_CREATE | FAN_DELETE | FAN_ONDIR

# Culprit operations, in the order a merged mask lists them.
OPS = (
    (FAN_CREATE, "create"),
    (FAN_MODIFY | FAN_CLOSE_WRITE, "write"),
    (FAN_ATTRIB, "attrib"),
    (FAN_RENAME | FAN_MOVED_FROM | FAN_MOVED_TO, "rename"),
    (FAN_DELETE, "delete"),
    (FAN_DELETE_SELF, "delete-self"),
    (FAN_MOVE_SELF, "move-self"),
)

_METADATA = struct.Struct("=IBBHQii")
_INFO_HEADER = struct.Struct("=BBH")
_FID = struct.Struct("=8sIi")  # fsid (__kernel_fsid_t, kept raw), handle_bytes, handle_type
_PIDFD = struct.Struct("=i")


class WitnessUnavailable(KubecertdError):
    """fanotify cannot attribute changes here; ``reason`` is one line saying why."""

    code = "witness-unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FileHandle(NamedTuple):
    """A directory's identity as fanotify reports it: the fs id and its file handle."""

    fsid: bytes  # the 8 raw bytes of __kernel_fsid_t
    handle_type: int
    handle: bytes


class RawEvent(NamedTuple):
    """One ``struct fanotify_event_metadata`` and its info records, undecoded."""

    mask: int
    pid: int
    fd: int = FAN_NOFD
    pidfd: int | None = None  # None: no PIDFD record; else a pidfd, FAN_NOPIDFD or FAN_EPIDFD
    dir: FileHandle | None = None  # DFID_NAME or DFID
    name: str | None = None  # "." for events on the marked folder itself
    old_dir: FileHandle | None = None  # FAN_RENAME: OLD_DFID_NAME
    old_name: str | None = None
    new_dir: FileHandle | None = None  # FAN_RENAME: NEW_DFID_NAME
    new_name: str | None = None
    fid: FileHandle | None = None  # FID (the child), when the group reports it


class Event(NamedTuple):
    """A change in a watched folder, resolved to paths.  ``pidfd`` belongs to the
    Witness and stays open until its next ``read()``."""

    mask: int
    pid: int
    pidfd: int | None  # None: the kernel has no FAN_REPORT_PIDFD; negative: none made
    path: str  # the entry (the folder itself for delete-self/move-self); "" for overflow
    new_path: str | None = None  # a rename's target
    seen: float = 0.0  # CLOCK_BOOTTIME when read, comparable with /proc/PID/stat starttime

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)

    @property
    def ops(self) -> tuple[str, ...]:
        """The operations a (possibly merged) mask stands for: ``("write",)``."""
        return tuple(name for bits, name in OPS if self.mask & bits)


def parse_events(buffer: bytes) -> list[RawEvent]:
    """Every event in what one ``read()`` of a fanotify fd returned; ValueError if malformed."""
    events = []
    offset = 0
    while offset < len(buffer):
        if len(buffer) - offset < _METADATA.size:
            raise ValueError(f"truncated event metadata at offset {offset}")
        event_len, vers, _reserved, metadata_len, mask, fd, pid = _METADATA.unpack_from(
            buffer, offset
        )
        if vers != METADATA_VERSION:
            raise ValueError(f"fanotify metadata version {vers}, expected {METADATA_VERSION}")
        if metadata_len < _METADATA.size or event_len < metadata_len:
            raise ValueError(f"event at offset {offset}: lengths {event_len}/{metadata_len}")
        end = offset + event_len
        if end > len(buffer):
            raise ValueError(f"event at offset {offset} runs past the buffer ({event_len} bytes)")
        fields = _parse_info(buffer, offset + metadata_len, end)
        events.append(RawEvent(mask=mask, pid=pid, fd=fd, **fields))
        offset = end
    return events


def _parse_info(buffer: bytes, offset: int, end: int) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    while offset < end:
        if end - offset < _INFO_HEADER.size:
            raise ValueError(f"truncated info record at offset {offset}")
        info_type, _pad, length = _INFO_HEADER.unpack_from(buffer, offset)
        if length < _INFO_HEADER.size or offset + length > end:
            raise ValueError(f"info record at offset {offset}: length {length}")
        body = buffer[offset + _INFO_HEADER.size : offset + length]
        if info_type == INFO_PIDFD:
            if len(body) < _PIDFD.size:
                raise ValueError(f"short pidfd record at offset {offset}")
            (fields["pidfd"],) = _PIDFD.unpack_from(body)
        elif info_type in (INFO_FID, INFO_DFID, INFO_DFID_NAME):
            handle, name = _parse_fid(body, named=info_type == INFO_DFID_NAME)
            if info_type == INFO_FID:
                fields["fid"] = handle
            else:
                fields["dir"], fields["name"] = handle, name
        elif info_type in (INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME):
            side = "old" if info_type == INFO_OLD_DFID_NAME else "new"
            fields[f"{side}_dir"], fields[f"{side}_name"] = _parse_fid(body, named=True)
        # other records (error, range, mount) do not concern a folder's entries
        offset += length
    return fields


def _parse_fid(body: bytes, named: bool) -> tuple[FileHandle, str | None]:
    if len(body) < _FID.size:
        raise ValueError("short file handle record")
    fsid, handle_bytes, handle_type = _FID.unpack_from(body)
    start = _FID.size
    if handle_bytes > len(body) - start:
        raise ValueError(f"file handle of {handle_bytes} bytes in a {len(body)}-byte record")
    handle = FileHandle(fsid, handle_type, body[start : start + handle_bytes])
    if not named:
        return handle, None
    rest = body[start + handle_bytes :]
    nul = rest.find(b"\0")
    if nul < 0:
        raise ValueError("entry name without its NUL")
    return handle, os.fsdecode(rest[:nul])


class Witness:
    """One fanotify group with inode marks on the watched folders and their parents."""

    def __init__(self, directories: Iterable[str] = ()) -> None:
        self.fd, self.pidfds = _init()
        self.renames = True  # FAN_RENAME until the kernel refuses it (< 5.17)
        self.directories: list[str] = []
        self.parents: list[str] = []
        self._marked: dict[str, FileHandle] = {}  # path -> handle of the inode marked there
        self._paths: dict[FileHandle, str] = {}  # and back, to resolve events
        self._open: list[int] = []  # pidfds handed out by the last read()
        try:
            self.mark(directories)
        except BaseException:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def mark(self, paths: Iterable[str]) -> None:
        """Watch these folders (and their parents) from now on."""
        folders = {os.path.abspath(p) for p in paths} | set(self.directories)
        self.directories = sorted(folders)
        self.parents = sorted({os.path.dirname(d) for d in folders} - folders)
        self.rearm()

    def rearm(self) -> None:
        """Mark every watched path whose inode is not marked yet (new, or replaced)."""
        for path in self.parents + self.directories:
            try:
                self._mark_one(path)
            except (FileNotFoundError, NotADirectoryError):
                self._forget(path)  # re-marked when it appears (its parent says so)

    @property
    def watching(self) -> list[str]:
        return sorted(self._marked)

    def read(self) -> list[Event]:
        """Drain the queue without blocking; events outside the watched paths are dropped."""
        self._close_pidfds()
        raw: list[RawEvent] = []
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            try:
                raw.extend(parse_events(chunk))
            except ValueError:  # a kernel we do not understand: say "lost" rather than guess
                raw.append(RawEvent(mask=FAN_Q_OVERFLOW, pid=0))
        seen = time.clock_gettime(time.CLOCK_BOOTTIME)
        events = []
        rearm = False
        for item in raw:
            if item.pidfd is not None and item.pidfd >= 0:
                self._open.append(item.pidfd)
            event = self._resolve(item, seen)
            if event is not None:
                events.append(event)
                rearm = rearm or self._shakes_marks(item, event)
        if rearm:
            self.rearm()
        return events

    def close(self) -> None:
        self._close_pidfds()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Witness:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _mark_one(self, path: str) -> None:
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # The handle and the mark come from one open fd: a folder replaced between
            # the two calls cannot be marked under the old inode's handle.
            handle = handle_of(folder)
            if self._marked.get(path) == handle:
                return
            mask = DIR_MASK if path in self.directories else PARENT_MASK
            self._add_mark(folder, path, mask)
        finally:
            os.close(folder)
        self._forget(path)
        self._marked[path] = handle
        self._paths[handle] = path

    def _add_mark(self, folder: int, path: str, mask: int) -> None:
        if mask & (FAN_CREATE | FAN_DELETE):  # dirent events: renames as well
            mask |= FAN_RENAME if self.renames else _MOVES
        try:
            _fanotify_mark(self.fd, FAN_MARK_ADD | FAN_MARK_ONLYDIR, mask, folder)
        except OSError as exc:
            if exc.errno == errno.EINVAL and self.renames and mask & FAN_RENAME:
                self.renames = False  # < 5.17
                _fanotify_mark(
                    self.fd, FAN_MARK_ADD | FAN_MARK_ONLYDIR, (mask & ~FAN_RENAME) | _MOVES, folder
                )
                return
            raise WitnessUnavailable(_mark_reason(path, exc)) from exc

    def _forget(self, path: str) -> None:
        old = self._marked.pop(path, None)
        if old is not None and self._paths.get(old) == path:
            # The old inode (moved away) may keep its mark; its events no longer resolve.
            del self._paths[old]

    def _resolve(self, item: RawEvent, seen: float) -> Event | None:
        if item.mask & FAN_Q_OVERFLOW:
            return Event(item.mask, item.pid, item.pidfd, "", None, seen)
        if item.mask & FAN_RENAME:
            old = self._entry(item.old_dir, item.old_name)
            new = self._entry(item.new_dir, item.new_name)
            if old is None and new is None:
                return None
            return Event(item.mask, item.pid, item.pidfd, old or "", new, seen)
        path = self._entry(item.dir, item.name)
        if path is None:
            return None
        if item.mask & FAN_MOVED_TO:  # < 5.17: the arriving half of a rename
            return Event(item.mask, item.pid, item.pidfd, "", path, seen)
        return Event(item.mask, item.pid, item.pidfd, path, None, seen)

    def _entry(self, folder: FileHandle | None, name: str | None) -> str | None:
        """The watched path an info record names, or None when it is not ours."""
        if folder is None or name is None:
            return None
        where = self._paths.get(folder)
        if where is None:
            return None
        if name in (".", ""):
            return where if where in self.directories else None
        path = os.path.join(where, name)
        if where in self.directories or path in self.directories:
            return path
        return None  # a sibling of a watched folder in its parent

    def _shakes_marks(self, item: RawEvent, event: Event) -> bool:
        if item.mask & (FAN_Q_OVERFLOW | _SELF):
            return True
        return bool(item.mask & FAN_ONDIR) and (
            event.path in self.directories or event.new_path in self.directories
        )

    def _close_pidfds(self) -> None:
        while self._open:
            os.close(self._open.pop())


# ---- the system calls ------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_LOWER = 3

_libc: Any = None


def _lib() -> Any:
    global _libc  # noqa: PLW0603 - one CDLL per process, made on first use
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_init.argtypes = (ctypes.c_uint, ctypes.c_uint)
        libc.fanotify_mark.argtypes = (
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        )
        libc.name_to_handle_at.argtypes = (
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        )
        libc.fstatfs64.argtypes = (ctypes.c_int, ctypes.c_void_p)
        libc.capget.argtypes = libc.capset.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
        _libc = libc
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def _init() -> tuple[int, bool]:
    """A new group and whether it reports pidfds; WitnessUnavailable with the reason."""
    if not has_capability(CAP_SYS_ADMIN):
        raise WitnessUnavailable(
            "fanotify needs CAP_SYS_ADMIN to see who acted (the unit's CapabilityBoundingSet= or the user lacks it)"
        )
    base = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME
    event_flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        try:
            return _check(_lib().fanotify_init(base | FAN_REPORT_PIDFD, event_flags), "init"), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        # < 5.15: no pidfds; what /proc says about a PID cannot be proven then
        return _check(_lib().fanotify_init(base, event_flags), "fanotify_init"), False
    except OSError as exc:
        raise WitnessUnavailable(_init_reason(exc)) from exc


def _init_reason(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return "fanotify_init was refused (EPERM) although CAP_SYS_ADMIN is held: a seccomp filter (SystemCallFilter= with SystemCallErrorNumber=EPERM) forbids it; allow fanotify_init fanotify_mark"
    if exc.errno == errno.ENOSYS:
        return "fanotify_init is not available (ENOSYS): a kernel without CONFIG_FANOTIFY, or a seccomp filter forbids it; allow fanotify_init fanotify_mark"
    if exc.errno == errno.EINVAL:
        return "the kernel lacks FAN_REPORT_DFID_NAME (EINVAL; needs Linux 5.9 or later)"
    if exc.errno == errno.EMFILE:
        return "too many fanotify groups (EMFILE; /proc/sys/fs/fanotify/max_user_groups)"
    return f"fanotify_init failed: {os.strerror(exc.errno or 0)}"


def _mark_reason(path: str, exc: OSError) -> str:
    if exc.errno in (errno.ENODEV, errno.EOPNOTSUPP, errno.EXDEV):
        return f"{path}: its filesystem gives no file handles for fanotify ({errno.errorcode.get(exc.errno or 0, '?')})"
    if exc.errno == errno.ENOSPC:
        return f"{path}: too many fanotify marks (ENOSPC; /proc/sys/fs/fanotify/max_user_marks)"
    if exc.errno in (errno.EPERM, errno.ENOSYS):
        return f"{path}: fanotify_mark was refused ({errno.errorcode[exc.errno]}): a seccomp filter forbids it; allow fanotify_mark"
    return f"{path}: fanotify_mark failed: {os.strerror(exc.errno or 0)}"


def _fanotify_mark(fd: int, flags: int, mask: int, folder: int) -> None:
    # pathname NULL: mark the inode of ``folder`` itself (fanotify_mark(2))
    _check(_lib().fanotify_mark(fd, flags, mask, folder, None), "fanotify_mark")


def handle_of(folder: int) -> FileHandle:
    """``(fsid, handle)`` of an open folder, as fanotify's DFID records carry it."""

    class Handle(ctypes.Structure):
        _fields_ = (
            ("handle_bytes", ctypes.c_uint),
            ("handle_type", ctypes.c_int),
            ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
        )

    libc = _lib()
    buf = Handle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    flags = AT_EMPTY_PATH | AT_HANDLE_FID
    if libc.name_to_handle_at(folder, b"", ctypes.byref(buf), ctypes.byref(mount_id), flags) < 0:
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: < 6.5, no AT_HANDLE_FID
            _check(-1, "name_to_handle_at")
        buf.handle_bytes = MAX_HANDLE_SZ
        flags = AT_EMPTY_PATH
        _check(
            libc.name_to_handle_at(folder, b"", ctypes.byref(buf), ctypes.byref(mount_id), flags),
            "name_to_handle_at",
        )
    handle = bytes(buf.f_handle[: buf.handle_bytes])
    return FileHandle(_fsid_of(folder), buf.handle_type, handle)


def _fsid_of(folder: int) -> bytes:
    """The raw f_fsid of ``fstatfs`` (``os.statvfs`` folds its two ints into one,
    sign-extending the first)."""

    class StatFs(ctypes.Structure):
        _fields_ = (
            ("f_type", ctypes.c_long),
            ("f_bsize", ctypes.c_long),
            ("counts", ctypes.c_uint64 * 5),
            ("f_fsid", ctypes.c_int * 2),
            ("rest", ctypes.c_long * 12),
        )

    buf = StatFs()
    _check(_lib().fstatfs64(folder, ctypes.byref(buf)), "fstatfs")
    return struct.pack("=ii", buf.f_fsid[0], buf.f_fsid[1])


def has_capability(cap: int) -> bool:
    """Whether this thread has ``cap`` in its effective set."""
    with open("/proc/thread-self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def drop_sys_admin() -> None:
    """Give up CAP_SYS_ADMIN (bounding, ambient, effective, permitted, inheritable) and
    keep every other capability.  An existing fanotify group keeps reporting PIDs and
    pidfds, and marks can still be added.

    Capabilities are per thread (capset(2)): call this before any other thread starts.
    """
    libc = _lib()
    # Bounding first: PR_CAPBSET_DROP needs CAP_SETPCAP, held now perhaps, not later.  Without
    # it the bounding set keeps the bit, which matters only to a later exec of a file with
    # capabilities; permitted is what this process could take back, and that goes below.
    libc.prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_LOWER, CAP_SYS_ADMIN, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capget(ctypes.byref(header), data), "capget")
    word, bit = divmod(CAP_SYS_ADMIN, 32)
    keep = ~(1 << bit) & 0xFFFFFFFF
    data[word].effective &= keep
    data[word].permitted &= keep
    data[word].inheritable &= keep
    _check(libc.capset(ctypes.byref(header), data), "capset")
