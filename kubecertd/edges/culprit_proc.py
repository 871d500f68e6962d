"""Reading who a PID is, right when its fanotify event is read (issue 12).

The kernel records only a PID; everything else comes from /proc, and a short-lived
``rm`` may be gone by then, its PID free for someone else.  So the order is fixed
(shared/notes/fanotify-culprits.md, 1.5):

1. no pidfd in the event (``FAN_NOPIDFD``): the actor was reaped before the read;
   nothing is read, since /proc/PID would describe whoever has the number now;
2. read /proc/PID/{stat,status,loginuid,sessionid,cgroup,cmdline,exe} and the parents;
3. ``pidfd_send_signal(pidfd, 0)``: success (or EPERM) means the actor is still
   unreaped, alive or zombie, so the number was never free and what was read is its;
   ESRCH means it was reaped meanwhile and the reads are thrown away.

Without pidfds (< 5.15) a record is ``pid-unverified``, except when the process at
that PID started after the event was read: then it is provably someone else.  A
logind session (``session-12.scope``) is looked up over D-Bus for its user and remote
host, once per session; without a bus the record just lacks them.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..culprit import (
    ALIVE,
    PARENTS_LIMIT,
    PID_ONLY,
    UNVERIFIED,
    ZOMBIE,
    Culprit,
    LoginSession,
    Process,
    is_own,
    login_session_from_properties,
    login_session_of,
    lost,
    parse_id,
    parse_stat,
    parse_uid,
    split_cmdline,
    unit_of_cgroup,
)
from .fanotify import FAN_EPIDFD, Event

LOGIN1 = "org.freedesktop.login1"
LOGIN1_PATH = "/org/freedesktop/login1"
LOGIN1_MANAGER = "org.freedesktop.login1.Manager"
LOGIN1_SESSION = "org.freedesktop.login1.Session"

SessionLookup = Callable[[str], LoginSession | None]


def read_process(pid: int, proc: str = "/proc") -> Process | None:
    """What /proc says about ``pid`` now; None when it has no /proc entry."""
    base = f"{proc}/{pid}"
    try:
        stat = parse_stat(_read(f"{base}/stat"))
    except (OSError, ValueError):
        return None
    try:
        exe = os.readlink(f"{base}/exe")  # ENOENT for a zombie, EACCES without CAP_SYS_PTRACE
    except OSError:
        exe = ""
    return Process(
        comm=stat.comm,
        state=stat.state,
        ppid=stat.ppid,
        starttime=stat.starttime,
        exe=exe,
        cmdline=split_cmdline(_read_bytes(f"{base}/cmdline")),
        uid=parse_uid(_read(f"{base}/status")),
        loginuid=parse_id(_read(f"{base}/loginuid")),
        session=parse_id(_read(f"{base}/sessionid")),
        unit=unit_of_cgroup(_read(f"{base}/cgroup")),
        parents=read_parents(stat.ppid, stat.starttime, proc),
    )


def read_parents(ppid: int, started: int, proc: str = "/proc") -> tuple[tuple[str, int], ...]:
    """(comm, pid) of up to 8 ancestors, nearest first.  An ancestor that started after
    its child is a reused PID: the chain stops there."""
    chain: list[tuple[str, int]] = []
    while ppid > 0 and len(chain) < PARENTS_LIMIT:
        try:
            stat = parse_stat(_read(f"{proc}/{ppid}/stat"))
        except (OSError, ValueError):
            break
        if stat.starttime > started:
            break
        chain.append((stat.comm, ppid))
        ppid, started = stat.ppid, stat.starttime
    return tuple(chain)


def unreaped(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` is alive or a zombie (not reaped)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists; we may not signal it
        return True
    return True


class Attributor:
    """Turns fanotify events into culprit records, skipping the daemon's own changes."""

    def __init__(
        self,
        own_pid: int | None = None,
        sessions: SessionLookup | None = None,
        proc: str = "/proc",
    ) -> None:
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.sessions = sessions if sessions is not None else LogindSessions()
        self.proc = proc
        self._ticks = os.sysconf("SC_CLK_TCK")

    def capture(self, events: Iterable[Event], now: dt.datetime) -> list[Culprit]:
        """Records for events just read (call before the witness's next ``read()``)."""
        records: list[Culprit] = []
        seen: set[tuple[str, str, str, int]] = set()
        for event in events:
            if event.overflow:
                records.append(lost(now))
                continue
            if is_own(event, self.own_pid):
                continue
            process, resolved = self.identify(event)
            login = self.login_of(process)
            for op in event.ops:
                record = self.build(op, event, process, resolved, login, now)
                key = (op, record.file, record.new_file, record.pid)
                if key not in seen:  # MODIFY, then MODIFY|CLOSE_WRITE read apart
                    seen.add(key)
                    records.append(record)
        return records

    def identify(self, event: Event) -> tuple[Process | None, str]:
        """/proc's account of the actor, and how far it can be trusted."""
        if event.pid <= 0:
            return None, PID_ONLY
        if event.pidfd is not None and event.pidfd != FAN_EPIDFD:
            if event.pidfd < 0:
                return None, PID_ONLY
            process = read_process(event.pid, self.proc)
            if process is None or not unreaped(event.pidfd):
                return None, PID_ONLY
            return process, ZOMBIE if process.state == "Z" else ALIVE
        process = read_process(event.pid, self.proc)
        if process is None or process.starttime / self._ticks > event.seen + 1 / self._ticks:
            return None, PID_ONLY  # gone, or born after the event: not the actor
        return process, UNVERIFIED

    def login_of(self, process: Process | None) -> LoginSession:
        """logind's user and remote host when the actor ran in a login session's scope."""
        session_id = None if process is None else login_session_of(process.unit)
        found = None if session_id is None else self.sessions(session_id)
        return found or LoginSession()

    @staticmethod
    def build(
        op: str,
        event: Event,
        process: Process | None,
        resolved: str,
        login: LoginSession,
        now: dt.datetime,
    ) -> Culprit:
        record = Culprit(op, event.path, now, event.pid, resolved, new_file=event.new_path or "")
        if process is None:
            return record
        user = login.user or _user_name(process.loginuid)
        return record._replace(
            comm=process.comm,
            exe=process.exe,
            cmdline=process.cmdline,
            uid=process.uid,
            loginuid=process.loginuid,
            session=process.session,
            unit=process.unit,
            user=user,
            remote_host=login.remote_host,
            parents=process.parents,
        )


class LogindSessions:
    """logind's ``GetSession`` and the session's ``Name``/``RemoteHost`` over D-Bus
    (jeepney, blocking, bounded); remembered per session id (ids are not reused within
    a boot), and not asked again for a minute after the bus failed."""

    def __init__(self, bus: str = "SYSTEM", timeout: float = 0.5) -> None:
        self.bus = bus
        self.timeout = timeout
        self._known: dict[str, LoginSession | None] = {}
        self._down_until = 0.0

    def __call__(self, session_id: str) -> LoginSession | None:
        if session_id in self._known:
            return self._known[session_id]
        if time.monotonic() < self._down_until:
            return None
        try:
            found = self._ask(session_id)
        except (OSError, TimeoutError, KeyError, ValueError):
            self._down_until = time.monotonic() + 60
            return None
        if len(self._known) >= 256:
            self._known.pop(next(iter(self._known)))
        self._known[session_id] = found
        return found

    def _ask(self, session_id: str) -> LoginSession | None:
        from jeepney import DBusAddress, Properties, new_method_call  # noqa: PLC0415
        from jeepney.io.blocking import open_dbus_connection  # noqa: PLC0415
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg  # noqa: PLC0415

        manager = DBusAddress(LOGIN1_PATH, bus_name=LOGIN1, interface=LOGIN1_MANAGER)
        deadline = time.monotonic() + self.timeout

        def call(conn: Any, message: Any) -> Any:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("logind did not answer in time")
            return unwrap_msg(conn.send_and_get_reply(message, timeout=left))

        with open_dbus_connection(bus=self.bus, auth_timeout=self.timeout) as conn:
            try:
                (path,) = call(conn, new_method_call(manager, "GetSession", "s", (session_id,)))
                session = DBusAddress(path, bus_name=LOGIN1, interface=LOGIN1_SESSION)
                (properties,) = call(conn, Properties(session).get_all())
            except DBusErrorResponse:
                return None  # no such session (it ended), or no logind on this bus
        return login_session_from_properties(properties)


def _user_name(uid: int | None) -> str:
    if uid is None:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""
