"""Who changed a watched credential: culprit records (pure; issue 12).

A ``Culprit`` is one operation on one file (``create``, ``write``, ``attrib``, ``rename``,
``delete``, ``delete-self``, ``move-self``, or ``lost`` for a queue overflow) and what
could be learned about the process that did it.  ``edges.fanotify`` says which PID
acted; ``edges.culprit_proc`` reads /proc for it the moment the event is read; the
parsers of what it reads, and the record's journal fields and sentences, are here.

How much is known is ``resolved``:

- ``alive``: /proc was read while the pidfd proved the actor had not been reaped, so
  every field is the actor's (a PID number is only reused after its process is reaped);
- ``exited-not-reaped``: the same proof, but the actor was a zombie: comm, uid, cgroup,
  login uid and parents remain; cmdline and exe are gone;
- ``pid-unverified``: /proc was read but the kernel gave no pidfd (< 5.15) to prove
  the PID was not reused meanwhile;
- ``pid-only``: the actor was reaped before anyone could look (or outside our PID
  namespace, pid 0); nothing was read, because /proc would describe someone else;
- ``records-lost``: the kernel's queue overflowed; changes went unattributed.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Protocol

UNSET_ID = 4294967295  # (uid_t)-1 in /proc/PID/loginuid and sessionid: never set
CMDLINE_LIMIT = 300
SUMMARY_LIMIT = 200
PARENTS_LIMIT = 8

ALIVE, ZOMBIE, UNVERIFIED, PID_ONLY, LOST = (
    "alive",
    "exited-not-reaped",
    "pid-unverified",
    "pid-only",
    "records-lost",
)

_VERBS = {
    "create": "created",
    "write": "written",
    "attrib": "changed (owner, mode or times)",
    "delete": "deleted",
    "delete-self": "deleted",
    "move-self": "moved away",
}

_UNIT = re.compile(r"[^/]+\.(service|scope)\Z")
_SESSION_SCOPE = re.compile(r"session-([^/]+)\.scope\Z")


class Stat(NamedTuple):
    """The fields of ``/proc/PID/stat`` a culprit needs."""

    comm: str
    state: str  # R, S, D, Z, ...
    ppid: int
    starttime: int  # clock ticks after boot


class Process(NamedTuple):
    """What /proc said about one process when its event was read."""

    comm: str
    state: str
    ppid: int
    starttime: int
    exe: str = ""
    cmdline: tuple[str, ...] = ()
    uid: int | None = None  # effective uid
    loginuid: int | None = None  # None: unset or unreadable
    session: int | None = None  # audit session (/proc/PID/sessionid)
    unit: str = ""
    parents: tuple[tuple[str, int], ...] = ()  # (comm, pid), nearest first


class LoginSession(NamedTuple):
    """What logind knows about a login session."""

    user: str = ""
    remote_host: str = ""


class Culprit(NamedTuple):
    op: str
    file: str  # full path; "" for lost records and renames from an unwatched folder
    time: dt.datetime
    pid: int
    resolved: str
    new_file: str = ""  # a rename's target
    comm: str = ""
    exe: str = ""
    cmdline: tuple[str, ...] = ()
    uid: int | None = None
    loginuid: int | None = None
    session: int | None = None
    unit: str = ""
    user: str = ""
    remote_host: str = ""
    parents: tuple[tuple[str, int], ...] = ()

    def to_fields(self) -> dict[str, str]:
        """Journal fields without the ``KUBECERTD_`` prefix; unknown ones are left out."""
        fields = {
            "culprit_op": self.op,
            "culprit_file": self.file,
            "culprit_new_file": self.new_file,
            "culprit_time": self.time.isoformat(),
            "culprit_pid": str(self.pid),
            "culprit_comm": self.comm,
            "culprit_exe": self.exe,
            "culprit_cmdline": quote_cmdline(self.cmdline),
            "culprit_uid": _number(self.uid),
            "culprit_loginuid": _number(self.loginuid),
            "culprit_session": _number(self.session),
            "culprit_unit": self.unit,
            "culprit_user": self.user,
            "culprit_remote_host": self.remote_host,
            "culprit_parents": format_parents(self.parents),
            "culprit_resolved": self.resolved,
        }
        return {key: value for key, value in fields.items() if value}

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready, for the state folder; ``from_dict`` reads it back."""
        record = self._asdict()
        record["time"] = self.time.isoformat()
        record["cmdline"] = list(self.cmdline)
        record["parents"] = [list(parent) for parent in self.parents]
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Culprit:
        """The inverse of ``to_dict``; ValueError (or KeyError, TypeError) when malformed."""
        values = dict(record)
        values["time"] = dt.datetime.fromisoformat(values["time"])
        values["pid"] = int(values["pid"])
        for key in ("uid", "loginuid", "session"):
            values[key] = None if values.get(key) is None else int(values[key])
        values["cmdline"] = tuple(str(arg) for arg in values.get("cmdline", ()))
        values["parents"] = tuple((str(c), int(p)) for c, p in values.get("parents", ()))
        return cls(**{key: values[key] for key in cls._fields if key in values})

    def describe(self, now: dt.datetime) -> str:
        """``worker.pem deleted by rm (PID 4242) in session-12.scope, user alice from
        10.1.2.3, 3.2 s before``."""
        ago = f"{format_age((now - self.time).total_seconds())} before"
        if self.op == "lost":
            return f"changes went unattributed: the fanotify queue overflowed (records lost), {ago}"
        parts = [f"{self._what()} by {self._who()}"]
        if self.unit:
            parts[0] += f" in {self.unit}"
        if self.user:
            host = f" from {self.remote_host}" if self.remote_host else ""
            parts.append(f"user {self.user}{host}")
        elif self.loginuid is not None:
            parts.append(f"login uid {self.loginuid}")
        parts.append(ago)
        return ", ".join(parts)

    def summary(self) -> str:
        """One short line (at most 200 characters), e.g. for the signer."""
        if self.op == "lost":
            return "records lost (fanotify queue overflow)"
        name = os.path.basename(self.file) or os.path.basename(self.new_file)
        line = f"{self.op} {name} by {self._who()}"
        if self.unit:
            line += f" in {self.unit}"
        if self.user:
            line += f", user {self.user}{'@' + self.remote_host if self.remote_host else ''}"
        return clip(line, SUMMARY_LIMIT)

    def _what(self) -> str:
        name = os.path.basename(self.file)
        if self.op == "rename":
            if not self.file:
                return f"{os.path.basename(self.new_file)} moved in"
            if not self.new_file:
                return f"{name} moved away"
            same = os.path.dirname(self.file) == os.path.dirname(self.new_file)
            return f"{name} renamed to {os.path.basename(self.new_file) if same else self.new_file}"
        if self.op in ("delete-self", "move-self"):
            name = self.file  # the folder itself: its full path says more
        return f"{name} {_VERBS.get(self.op, self.op)}"

    def _who(self) -> str:
        if self.pid <= 0:
            return "a process outside kubecertd's PID namespace"
        if self.resolved == PID_ONLY or not self.comm:
            return f"PID {self.pid} (gone before it could be identified)"
        unverified = ", not verified" if self.resolved == UNVERIFIED else ""
        return f"{self.comm} (PID {self.pid}{unverified})"


class HasPid(Protocol):
    @property
    def pid(self) -> int: ...


def is_own(event: HasPid, own_pid: int) -> bool:
    """Whether the daemon itself made this change (fanotify reports the TGID, so any of
    its threads)."""
    return event.pid == own_pid


def lost(now: dt.datetime) -> Culprit:
    """The record of a queue overflow."""
    return Culprit("lost", "", now, 0, LOST)


def parse_stat(text: str) -> Stat:
    """``/proc/PID/stat``; comm may hold spaces and parentheses, so split at the last ')'."""
    head, paren, rest = text.rpartition(")")
    _pid, open_paren, comm = head.partition("(")
    fields = rest.split()
    if not paren or not open_paren or len(fields) < 20:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    # fields[0] is field 3 (state); ppid is field 4, starttime field 22
    return Stat(comm, fields[0], int(fields[1]), int(fields[19]))


def parse_uid(status: str) -> int | None:
    """The effective uid from ``/proc/PID/status`` (``Uid: real effective saved fs``)."""
    for line in status.splitlines():
        if line.startswith("Uid:"):
            ids = line.split()[1:]
            return int(ids[1]) if len(ids) > 1 and ids[1].isdigit() else None
    return None


def parse_id(text: str) -> int | None:
    """``/proc/PID/loginuid`` or ``sessionid``: None when unset (4294967295) or not a number."""
    text = text.strip()
    if not text.isdigit() or int(text) == UNSET_ID:
        return None
    return int(text)


def unit_of_cgroup(text: str) -> str:
    """The innermost systemd unit (``*.service`` or ``*.scope``) in ``/proc/PID/cgroup``:
    the cgroup v2 line ``0::/…``, else v1's ``name=systemd`` hierarchy; "" when none."""
    paths = {}
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            paths["unified"] = path
        elif controllers == "name=systemd":
            paths["systemd"] = path
    for key in ("unified", "systemd"):
        for part in reversed(paths.get(key, "").split("/")):
            if _UNIT.fullmatch(part):
                return part
    return ""


def login_session_of(unit: str) -> str | None:
    """``session-12.scope`` -> ``"12"``: logind's session id (its audit session too)."""
    match = _SESSION_SCOPE.fullmatch(unit)
    return match.group(1) if match else None


def login_session_from_properties(properties: Mapping[str, Any]) -> LoginSession:
    """logind's ``org.freedesktop.login1.Session`` properties as D-Bus returns them
    (``{"Name": ("s", "alice"), ...}``) or plain values."""

    def text(name: str) -> str:
        value = properties.get(name, "")
        if isinstance(value, tuple) and len(value) == 2:
            value = value[1]
        return value if isinstance(value, str) else ""

    return LoginSession(text("Name"), text("RemoteHost"))


def split_cmdline(raw: bytes) -> tuple[str, ...]:
    """``/proc/PID/cmdline``: NUL-separated, usually NUL-terminated."""
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return tuple(os.fsdecode(arg) for arg in raw.split(b"\0")) if raw else ()


def quote_cmdline(argv: tuple[str, ...], limit: int = CMDLINE_LIMIT) -> str:
    return clip(shlex.join(argv), limit)


def format_parents(parents: tuple[tuple[str, int], ...]) -> str:
    """``bash(4200) < sshd(4100) < systemd(1)``, nearest first."""
    return " < ".join(f"{comm}({pid})" for comm, pid in parents)


def format_age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{int(seconds * 10) / 10:.1f} s"  # 59.96 s is not "60.0 s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} days"


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(value: int | None) -> str:
    return "" if value is None else str(value)


# -- the daemon's book of recent records, and the state file --check reads ------------------

BOOK_SIZE = 64  # records kept; a node's credentials change a few times a day at most
EXPLAINS_FOR = 600.0  # seconds a record may explain a finding or a heal
STATE_FILE = "culprits.json"


class Book:
    """The newest records, to explain findings and heals, and to hand to ``--check``."""

    def __init__(self, records: tuple[Culprit, ...] = ()) -> None:
        self.records = list(records)[-BOOK_SIZE:]
        self.rewritten: dict[str, dt.datetime] = {}  # file -> when kubecertd last wrote it

    def add(self, records: list[Culprit]) -> None:
        self.records = (self.records + records)[-BOOK_SIZE:]

    def rewrote(self, paths: Iterable[str], now: dt.datetime) -> None:
        """kubecertd itself wrote these files at ``now``.  Its own changes are never
        recorded, so without this an earlier record (``cp`` over the key, healed since)
        would go on explaining findings on a file that no longer holds what it wrote."""
        self.rewritten = {
            p: t for p, t in self.rewritten.items() if (now - t).total_seconds() <= EXPLAINS_FOR
        }
        self.rewritten.update((path.split(" (", 1)[0], now) for path in paths)

    def _current(self, record: Culprit) -> bool:
        """Whether kubecertd has not rewritten the record's file since."""
        return all(
            record.time >= self.rewritten[p]
            for p in (record.file, record.new_file)
            if p in self.rewritten
        )

    def explaining(self, path: str, now: dt.datetime) -> Culprit | None:
        """The newest recent record about ``path`` (a file, or ``KUBECONFIG (KEY)``): on
        that very file, else on another entry of its folder (kubelet's store renames a
        timestamped file behind the symlink), else a lost-records note.  A record on a
        file kubecertd has rewritten since explains nothing."""
        file = path.split(" (", 1)[0]
        folder = os.path.dirname(file)
        recent = [
            r
            for r in reversed(self.records)
            if 0 <= (now - r.time).total_seconds() <= EXPLAINS_FOR and self._current(r)
        ]
        for matches in (
            lambda r: file in (r.file, r.new_file),
            lambda r: folder in (os.path.dirname(r.file), os.path.dirname(r.new_file)),
            lambda r: r.op == "lost",
        ):
            found = next((r for r in recent if matches(r)), None)
            if found is not None:
                return found
        return None

    def latest(self, path: str) -> Culprit | None:
        """The newest record on the file ``path`` (or ``KUBECONFIG (KEY)``), however old."""
        file = path.split(" (", 1)[0]
        return next((r for r in reversed(self.records) if file in (r.file, r.new_file)), None)

    def to_json(self, pid: int, now: dt.datetime) -> bytes:
        import json  # noqa: PLC0415

        document = {
            "pid": pid,
            "updated": now.isoformat(),
            "records": [r.to_dict() for r in self.records],
        }
        return json.dumps(document).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Book:
        """A book from the state file; ValueError when it is not one."""
        import json  # noqa: PLC0415

        try:
            document = json.loads(data)
            return cls(tuple(Culprit.from_dict(r) for r in document["records"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a culprit record file: {exc}") from exc


CLAIM_LIMIT = 1024  # bytes of UTF-8: the signer's limit on a sign request's `culprits`


def claim(summaries: list[str]) -> str | None:
    """The summaries as the signer takes them: one line each, every character that is not
    printable (a tab or escape in a comm, a surrogate from an undecodable file name) as
    ``?``, whole lines only within CLAIM_LIMIT bytes; None when nothing is left."""
    lines: list[str] = []
    size = 0
    for summary in summaries:
        line = "".join(ch if ch == " " or ch.isprintable() else "?" for ch in summary)
        line = line.encode("utf-8", "replace").decode("utf-8")
        cost = len(line.encode()) + (1 if lines else 0)
        if not line or size + cost > CLAIM_LIMIT:
            break
        lines.append(line)
        size += cost
    return "\n".join(lines) or None
