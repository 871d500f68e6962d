"""Culprit records from the Linux audit log, a second source beside fanotify (pure; issue 12).

Where a site already runs auditd, ``packaging/kubecertd-audit.rules`` has the kernel
record each write or attribute change in kubelet's credential folders under the key
``kubecertd``, and auditd appends the event to ``/var/log/audit/audit.log``, a line
per record, all lines of one event sharing its stamp (``audit(SECONDS.MILLIS:SERIAL)``):

    type=SYSCALL msg=audit(1733230000.123:456): arch=c000003e syscall=263 success=yes
        exit=0 a0=ffffff9c a1=… items=2 ppid=4100 pid=4242 auid=1000 uid=0 … euid=0 …
        ses=3 comm="rm" exe="/usr/bin/rm" subj=unconfined key="kubecertd"
    type=CWD msg=audit(1733230000.123:456): cwd="/root"
    type=PATH msg=audit(1733230000.123:456): item=0 name="/etc/kubernetes/ssl/" … nametype=PARENT …
    type=PATH msg=audit(1733230000.123:456): item=1 name="/etc/kubernetes/ssl/worker.pem" … nametype=DELETE …
    type=PROCTITLE msg=audit(1733230000.123:456): proctitle=726D002F6574632F…

What the parsing relies on (kernel/audit.c, kernel/auditsc.c; audit-userspace auditd):

- A string the process controls (comm, exe, cwd, name, proctitle, key) is "quoted", or
  hex when it holds a space, a quote or a byte outside 0x21-0x7e; ``(null)`` when absent.
  Several keys on one rule are one hex string, joined by 0x01.
- PATH names are as the process passed them: absolute, relative to the CWD, or, for the
  ``*at`` calls, relative to the descriptor in a0 (a2 for a rename's or link's new name,
  a1 for symlinkat's), whose folder no record names.  Such a name stays relative here,
  and ``explaining`` matches it by its last component.
- nametype says which PATH is which: PARENT (the folder), DELETE (the name removed, and
  the target a rename replaced), CREATE (the name made), NORMAL (the object itself).
  A change through a descriptor (fchmod) names no path: it is dropped.
- PROCTITLE is the argv, NUL-separated, cut at 128 bytes by the kernel.
- auditd does not write EOE records to the log (it drops them before writing); with
  ``log_format = ENRICHED`` (the default) each line ends with 0x1D and interpreted
  fields (``SYSCALL=unlinkat``), and with ``name_format`` set it starts with ``node=``.
- Failed calls are recorded too (a watch matches attempts): ``success=no`` changed
  nothing, so it is dropped.

Any text is accepted: lines that are not audit records, cut events (a SYSCALL record
before the start of a tail) and malformed fields give no record, never an exception.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from .culprit import EXPLAINS_FOR, UNSET_ID, Culprit

AUDIT = "audit"  # Culprit.resolved: taken by the kernel at the system call, no race
KEY = "kubecertd"  # the rules' key (packaging/kubecertd-audit.rules)
AT_FDCWD = -100

_TYPES = frozenset({"SYSCALL", "CWD", "PATH", "PROCTITLE"})
_HEADER = re.compile(r"(?:node=\S* )?type=(\w+) msg=audit\((\d+)\.(\d+):(\d+)\): ?")
_FIELD = re.compile(r'([^\s=]+)=("[^"]*"|\S*)')
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")

# Syscall numbers of the two architectures nodes run, for logs without the ENRICHED
# names: AUDIT_ARCH_X86_64 and AUDIT_ARCH_AARCH64 (arch/x86/entry/syscalls/syscall_64.tbl,
# include/uapi/asm-generic/unistd.h).
_X86_64 = {
    2: "open", 76: "truncate", 77: "ftruncate", 82: "rename", 83: "mkdir", 84: "rmdir",
    85: "creat", 86: "link", 87: "unlink", 88: "symlink", 90: "chmod", 91: "fchmod",
    92: "chown", 93: "fchown", 94: "lchown", 133: "mknod", 188: "setxattr",
    189: "lsetxattr", 190: "fsetxattr", 197: "removexattr", 198: "lremovexattr",
    199: "fremovexattr", 257: "openat", 258: "mkdirat", 259: "mknodat", 260: "fchownat",
    263: "unlinkat", 264: "renameat", 265: "linkat", 266: "symlinkat", 268: "fchmodat",
    316: "renameat2", 437: "openat2", 452: "fchmodat2", 463: "setxattrat",
    466: "removexattrat",
}  # fmt: skip
_AARCH64 = {
    5: "setxattr", 6: "lsetxattr", 7: "fsetxattr", 14: "removexattr", 15: "lremovexattr",
    16: "fremovexattr", 33: "mknodat", 34: "mkdirat", 35: "unlinkat", 36: "symlinkat",
    37: "linkat", 38: "renameat", 45: "truncate", 46: "ftruncate", 52: "fchmod",
    53: "fchmodat", 54: "fchownat", 55: "fchown", 56: "openat", 276: "renameat2",
    437: "openat2", 452: "fchmodat2", 463: "setxattrat", 466: "removexattrat",
}  # fmt: skip
SYSCALLS = {"c000003e": _X86_64, "c00000b7": _AARCH64}

_RENAME = frozenset({"rename", "renameat", "renameat2"})
_DELETE = frozenset({"unlink", "unlinkat", "rmdir"})
_OPEN = frozenset({"open", "openat", "openat2", "creat"})  # create, or write when it existed
_CREATE = frozenset({"mkdir", "mkdirat", "mknod", "mknodat", "link", "linkat", "symlink", "symlinkat"})  # fmt: skip
_WRITE = frozenset({"truncate", "ftruncate"})
_ATTRIB = frozenset({
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "setxattrat", "removexattrat",
})  # fmt: skip
_KNOWN = _RENAME | _DELETE | _OPEN | _CREATE | _WRITE | _ATTRIB
# The argument holding the folder descriptor of the *at calls: (old or only name, new name).
_DIRFD = {
    "renameat": ("a0", "a2"), "renameat2": ("a0", "a2"), "linkat": ("a0", "a2"),
    "symlinkat": ("a1", "a1"),
    **dict.fromkeys((
        "openat", "openat2", "unlinkat", "mkdirat", "mknodat", "fchmodat", "fchmodat2",
        "fchownat", "setxattrat", "removexattrat",
    ), ("a0", "a0")),
}  # fmt: skip


class _Path(NamedTuple):
    name: str  # as logged, decoded
    nametype: str


def parse_log(text: str) -> list[Culprit]:
    """Culprit records for the events in ``text`` (audit.log lines) that carry the key
    ``kubecertd``, oldest first."""
    events: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for line in text.split("\n"):  # not splitlines(): it also splits at ENRICHED's 0x1D
        match = _HEADER.match(line)
        if match is not None and match[1] in _TYPES:
            events.setdefault((match[2], match[3], match[4]), []).append(
                (match[1], line[match.end() :])
            )
    records = [r for stamp, lines in events.items() if (r := _event(stamp, lines))]
    return sorted(records, key=lambda r: r.time)


def explaining(
    records: Iterable[Culprit],
    path: str,
    now: dt.datetime,
    own_pid: int | None = None,
    window: float = EXPLAINS_FOR,
) -> Culprit | None:
    """The newest record about the file ``path`` (or ``KUBECONFIG (KEY)``) from the
    ``window`` seconds before ``now``, its old or new name; None when there is none, or
    when the newest is the daemon's own (``own_pid``): the file then holds what kubecertd
    wrote, and earlier changes explain it no more."""
    file = path.split(" (", 1)[0]
    newest: Culprit | None = None
    for record in records:
        recent = 0 <= (now - record.time).total_seconds() <= window
        about = any(_names(name, file) for name in (record.file, record.new_file) if name)
        if recent and about and (newest is None or record.time >= newest.time):
            newest = record
    if newest is None or (own_pid is not None and newest.pid == own_pid):
        return None
    return newest


def _names(recorded: str, file: str) -> bool:
    """Whether a recorded name is ``file``; a relative one (its folder unknown) by its
    last component."""
    if recorded.startswith("/"):
        return recorded == file
    return posixpath.basename(recorded) == posixpath.basename(file)


# -- one event ------------------------------------------------------------------------------


class _Event(NamedTuple):
    """The records of one event this parser reads."""

    syscall: dict[str, str]
    interpreted: dict[str, str]  # ENRICHED fields of the SYSCALL record (SYSCALL=unlinkat)
    cwd: str
    paths: list[_Path]
    cmdline: tuple[str, ...]


def _gather(lines: list[tuple[str, str]]) -> _Event | None:
    """The event's records by type; None without a SYSCALL record (cut off by the tail)."""
    syscall: dict[str, str] | None = None
    interpreted: dict[str, str] = {}
    cwd = ""
    paths: list[_Path] = []
    cmdline: tuple[str, ...] = ()
    for kind, rest in lines:
        raw, _, enriched = rest.partition("\x1d")
        fields = dict(_FIELD.findall(raw))
        if kind == "SYSCALL" and syscall is None:
            syscall, interpreted = fields, dict(_FIELD.findall(enriched))
        elif kind == "CWD":
            cwd = text_of(fields.get("cwd", ""))
        elif kind == "PATH":
            paths.append(_Path(text_of(fields.get("name", "")), fields.get("nametype", "")))
        elif kind == "PROCTITLE":
            cmdline = split_proctitle(fields.get("proctitle", ""))
    return None if syscall is None else _Event(syscall, interpreted, cwd, paths, cmdline)


def _event(stamp: tuple[str, str, str], lines: list[tuple[str, str]]) -> Culprit | None:
    event = _gather(lines)
    if event is None or event.syscall.get("success") != "yes":
        return None
    syscall = event.syscall
    if KEY not in text_of(syscall.get("key", "")).split("\x01"):
        return None
    call = event.interpreted.get("SYSCALL") or _syscall_name(syscall)

    def resolve(name: str, new: bool) -> str:
        return _full(name, _dirfd_argument(call, new), syscall, event.cwd)

    time = _time(stamp)
    change = _change(call, event.paths, resolve)
    if time is None or change is None:
        return None
    op, file, new_file = change
    ppid = _number(syscall.get("ppid", ""))
    return Culprit(
        op=op,
        file=file,
        time=time,
        pid=_number(syscall.get("pid", "")) or 0,
        resolved=AUDIT,
        new_file=new_file,
        comm=text_of(syscall.get("comm", "")),
        exe=text_of(syscall.get("exe", "")),
        cmdline=event.cmdline,
        uid=_id(syscall.get("euid", syscall.get("uid", ""))),
        loginuid=_id(syscall.get("auid", "")),
        session=_id(syscall.get("ses", "")),
        parents=(("?", ppid),) if ppid else (),  # the log names the parent's PID only
    )


def _change(
    call: str, paths: list[_Path], resolve: Callable[[str, bool], str]
) -> tuple[str, str, str] | None:
    """(op, file, new file) from the system call and the PATH records' nametypes; for a
    call this table does not know, from the nametypes alone."""
    known = call in _KNOWN
    deleted = [p.name for p in paths if p.nametype == "DELETE" and p.name]
    created = [p.name for p in paths if p.nametype == "CREATE" and p.name]
    normal = [p.name for p in paths if p.nametype == "NORMAL" and p.name]
    if call in _RENAME or (not known and deleted and created):
        new = created[0] if created else ""
        # a replaced target is a DELETE too, under the new name
        old = next((name for name in deleted if name != new), "")
        change = ("rename", resolve(old, False), resolve(new, True))
    elif call in _DELETE or (not known and deleted):
        change = ("delete", resolve(deleted[0], False) if deleted else "", "")
    elif call in _CREATE or (call in _OPEN and created) or (not known and created):
        change = ("create", resolve(created[0], True) if created else "", "")
    elif known:  # open without creating, truncate, or an attribute change
        op = "attrib" if call in _ATTRIB else "write"
        change = (op, resolve(normal[0], False) if normal else "", "")
    else:
        return None
    return change if change[1] or change[2] else None


def _dirfd_argument(call: str, new: bool) -> str | None:
    """The argument that holds the folder descriptor a relative name of ``call`` is
    relative to: "" for the CWD (not an *at call), None when unknown."""
    if call not in _KNOWN:
        return None
    return _DIRFD[call][1 if new else 0] if call in _DIRFD else ""


def _full(name: str, argument: str | None, syscall: Mapping[str, str], cwd: str) -> str:
    """A logged name as a full path, when the log says which folder it is relative to."""
    if not name:
        return ""
    if name.startswith("/"):
        return posixpath.normpath(name)
    if argument is None or (argument and _descriptor(syscall.get(argument, "")) != AT_FDCWD):
        return name  # relative to a descriptor no record names
    return posixpath.normpath(posixpath.join(cwd, name)) if cwd else name


# -- fields ---------------------------------------------------------------------------------


def text_of(value: str) -> str:
    """A logged string: "quoted", hex-encoded, or ``(null)`` (and ``(none)``) for none."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    if value in ("(null)", "(none)", "?"):
        return ""
    if _HEX.fullmatch(value):
        return bytes.fromhex(value).decode("utf-8", "surrogateescape")
    return value


def split_proctitle(value: str) -> tuple[str, ...]:
    """PROCTITLE: the argv, NUL-separated (hex, or quoted when it is a single word)."""
    title = text_of(value).rstrip("\0")
    return tuple(title.split("\0")) if title else ()


def _syscall_name(syscall: Mapping[str, str]) -> str:
    number = _number(syscall.get("syscall", ""))
    table = SYSCALLS.get(syscall.get("arch", "").lower(), {})
    return table.get(number, "") if number is not None else ""


def _descriptor(value: str) -> int | None:
    """An int argument as the log prints it (hex of the register): AT_FDCWD is
    ``ffffff9c`` or ``ffffffffffffff9c``."""
    try:
        low = int(value, 16) & 0xFFFFFFFF
    except ValueError:
        return None
    return low - (1 << 32) if low >= 1 << 31 else low


def _number(value: str) -> int | None:
    if not (value.isascii() and value.isdigit()):
        return None
    try:
        return int(value)
    except ValueError:  # more digits than int() takes from a string
        return None


def _id(value: str) -> int | None:
    """auid, ses, uid: None when unset (4294967295, or -1 as old kernels print it)."""
    number = _number(value)
    return None if number is None or number == UNSET_ID else number


def _time(stamp: tuple[str, str, str]) -> dt.datetime | None:
    seconds, millis, _serial = stamp
    try:
        return dt.datetime.fromtimestamp(int(seconds), dt.timezone.utc) + dt.timedelta(
            milliseconds=int(millis[:3].ljust(3, "0"))
        )
    except (OverflowError, ValueError, OSError):  # a year beyond what datetime holds
        return None
