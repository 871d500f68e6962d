"""Culprit records: the pure parsers and sentences (kubecertd.culprit), the /proc reader
and its proof against reused PIDs (kubecertd.edges.culprit_proc) on a fake /proc, and
real actors (rm, mv, cp, setpriv, a login uid, a session scope) caught by a real witness
as root.  Every wait is bounded."""

from __future__ import annotations

import datetime as dt
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubecertd.culprit import (
    ALIVE,
    EXPLAINS_FOR,
    LOST,
    PID_ONLY,
    STATE_FILE,
    UNVERIFIED,
    ZOMBIE,
    Book,
    Culprit,
    LoginSession,
    Stat,
    claim,
    format_age,
    format_parents,
    is_own,
    login_session_from_properties,
    login_session_of,
    lost,
    parse_id,
    parse_stat,
    parse_uid,
    quote_cmdline,
    split_cmdline,
    unit_of_cgroup,
)
from kubecertd.edges import culprit_proc
from kubecertd.edges.culprit_proc import Attributor, LogindSessions, read_process
from kubecertd.edges.fanotify import (
    FAN_ATTRIB,
    FAN_CLOSE_WRITE,
    FAN_CREATE,
    FAN_DELETE,
    FAN_EPIDFD,
    FAN_MODIFY,
    FAN_NOPIDFD,
    FAN_Q_OVERFLOW,
    Event,
    Witness,
)

import factories

T = dt.datetime(2026, 12, 3, 12, 0, 0, tzinfo=dt.timezone.utc)
ISSUE = Culprit(
    op="delete",
    file="/etc/kubernetes/ssl/worker.pem",
    time=T,
    pid=4242,
    resolved=ALIVE,
    comm="rm",
    exe="/usr/bin/rm",
    cmdline=("rm", "-f", "worker.pem"),
    uid=0,
    loginuid=1000,
    session=12,
    unit="session-12.scope",
    user="alice",
    remote_host="10.1.2.3",
    parents=(("bash", 4200), ("sshd", 4100), ("sshd", 812), ("systemd", 1)),
)

# ---- parsers --------------------------------------------------------------------

STAT_TAIL = "S 4200 4242 4200 34816 4242 4194560 110 0 0 0 0 0 0 0 20 0 1 0 987654 8110080 220 18446744073709551615"


@pytest.mark.parametrize(
    ("text", "stat"),
    [
        pytest.param(f"4242 (rm) {STAT_TAIL}", Stat("rm", "S", 4200, 987654), id="plain"),
        pytest.param(f"4242 (my prog) {STAT_TAIL}", Stat("my prog", "S", 4200, 987654), id="space"),
        pytest.param(f"4242 (a) (b)) {STAT_TAIL}", Stat("a) (b)", "S", 4200, 987654), id="parens"),
        pytest.param(f"4242 (sh) Z{STAT_TAIL[1:]}", Stat("sh", "Z", 4200, 987654), id="zombie"),
    ],
)
def test_parse_stat(text: str, stat: Stat) -> None:
    """comm is whatever lies between the first '(' and the last ')'; state, ppid and
    starttime follow."""
    assert parse_stat(text) == stat


@pytest.mark.parametrize(
    "text", ["", "4242 rm S 1", "4242 (rm) S 1 2 3", "4242 (rm) S x" + " 0" * 30]
)
def test_parse_stat_malformed(text: str) -> None:
    """Anything else is a ValueError."""
    with pytest.raises(ValueError):
        parse_stat(text)


def test_parse_uid() -> None:
    """The effective uid is the second number of ``Uid:``."""
    assert parse_uid("Name:\tsudo\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n") == 0
    assert parse_uid("Name:\tx\n") is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1000", 1000),
        ("0\n", 0),
        ("4294967295", None),
        ("4294967294", 4294967294),
        ("", None),
        ("x", None),
    ],
)
def test_parse_id(text: str, value: int | None) -> None:
    """loginuid and sessionid: 4294967295 means never set."""
    assert parse_id(text) == value


HOST_V1_HYBRID = """9:name=systemd:/
8:pids:/
4:memory:/process_api/4c886d430659e9d0fb404e27d4c8065a
1:cpu:/
0::/
"""


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        pytest.param("0::/system.slice/cron.service\n", "cron.service", id="v2-service"),
        pytest.param(
            "0::/user.slice/user-1000.slice/session-12.scope\n", "session-12.scope", id="v2-session"
        ),
        pytest.param(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo-42.scope\n",
            "app-foo-42.scope",
            id="v2-user-manager",
        ),
        pytest.param(
            "0::/system.slice/containerd.service/payload\n", "containerd.service", id="v2-delegated"
        ),
        pytest.param(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b.slice/cri-containerd-0f3e.scope\n",
            "cri-containerd-0f3e.scope",
            id="v2-pod",
        ),
        pytest.param("0::/init.scope\n", "init.scope", id="v2-init"),
        pytest.param("0::/\n", "", id="v2-root"),
        pytest.param(
            "12:pids:/system.slice/cron.service\n"
            "4:memory:/system.slice/cron.service\n"
            "1:name=systemd:/system.slice/cron.service\n"
            "0::/system.slice/cron.service\n",
            "cron.service",
            id="v1-hybrid",
        ),
        pytest.param(
            "11:devices:/user.slice\n1:name=systemd:/user.slice/user-0.slice/session-3.scope\n",
            "session-3.scope",
            id="v1-legacy",
        ),
        pytest.param(
            "1:name=systemd:/system.slice/puppet.service\n0::/\n",
            "puppet.service",
            id="v1-hybrid-unified-empty",
        ),
        pytest.param(HOST_V1_HYBRID, "", id="this-machine"),
        pytest.param("", "", id="empty"),
        pytest.param("garbage\n::\n0:\n", "", id="garbage"),
    ],
)
def test_unit_of_cgroup(text: str, unit: str) -> None:
    """The innermost .service or .scope of the v2 line, else of v1's name=systemd line."""
    assert unit_of_cgroup(text) == unit


@pytest.mark.parametrize(
    ("unit", "session"),
    [
        ("session-12.scope", "12"),
        ("session-c3.scope", "c3"),
        ("cron.service", None),
        ("user@1000.service", None),
        ("session-12.service", None),
        ("", None),
    ],
)
def test_login_session_of(unit: str, session: str | None) -> None:
    """Only logind's session scopes name a login session."""
    assert login_session_of(unit) == session


@pytest.mark.parametrize(
    ("properties", "session"),
    [
        pytest.param(
            {"Name": ("s", "alice"), "RemoteHost": ("s", "10.1.2.3"), "Id": ("s", "12")},
            LoginSession("alice", "10.1.2.3"),
            id="dbus",
        ),
        pytest.param(
            {"Name": ("s", "root"), "RemoteHost": ("s", "")}, LoginSession("root", ""), id="local"
        ),
        pytest.param({"Name": "bob", "RemoteHost": "h"}, LoginSession("bob", "h"), id="plain"),
        pytest.param({}, LoginSession("", ""), id="empty"),
        pytest.param({"Name": ("u", 7), "RemoteHost": 3}, LoginSession("", ""), id="wrong-types"),
    ],
)
def test_login_session_from_properties(
    properties: dict[str, object], session: LoginSession
) -> None:
    """Name and RemoteHost, whatever shape or type they came in."""
    assert login_session_from_properties(properties) == session


def test_cmdline_split_and_quoted() -> None:
    """NUL-separated argv becomes a shell-quoted line, cut at 300 characters."""
    argv = split_cmdline(b"rm\0-f\0my key.pem\0")
    assert argv == ("rm", "-f", "my key.pem")
    assert quote_cmdline(argv) == "rm -f 'my key.pem'"
    assert split_cmdline(b"") == ()
    long = quote_cmdline(("python3", "x" * 1000))
    assert len(long) == 300
    assert long.endswith("…")


@given(st.lists(st.text(max_size=200), max_size=10))
@settings(max_examples=200, deadline=None)
def test_cmdline_never_longer_than_the_limit(argv: list[str]) -> None:
    """Any argv quotes to at most 300 characters."""
    assert len(quote_cmdline(tuple(argv))) <= 300


def test_format_parents() -> None:
    """Nearest first, joined by '<'."""
    assert format_parents(ISSUE.parents) == "bash(4200) < sshd(4100) < sshd(812) < systemd(1)"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-1, "0.0 s"),
        (3.2, "3.2 s"),
        (59, "59.0 s"),
        (59.96, "59.9 s"),
        (60, "1 min"),
        (61, "1 min"),
        (3599, "59 min"),
        (3600, "1 h"),
        (86399, "23 h"),
        (86400, "1 days"),
    ],
)
def test_format_age(seconds: float, text: str) -> None:
    """Ages one second either side of each unit's boundary."""
    assert format_age(seconds) == text


# ---- records ---------------------------------------------------------------------


def test_describe_the_issue_example() -> None:
    """The sentence of issue 12."""
    assert ISSUE.describe(T + dt.timedelta(seconds=3.2)) == (
        "worker.pem deleted by rm (PID 4242) in session-12.scope, user alice from 10.1.2.3, 3.2 s before"
    )


BASE = Culprit("delete", "/etc/kubernetes/ssl/worker.pem", T, 4242, ALIVE, comm="rm")


@pytest.mark.parametrize(
    ("record", "sentence"),
    [
        pytest.param(BASE, "worker.pem deleted by rm (PID 4242), 1.0 s before", id="bare"),
        pytest.param(
            BASE._replace(unit="cron.service", loginuid=1000),
            "worker.pem deleted by rm (PID 4242) in cron.service, login uid 1000, 1.0 s before",
            id="cron-with-loginuid",
        ),
        pytest.param(
            BASE._replace(user="alice"),
            "worker.pem deleted by rm (PID 4242), user alice, 1.0 s before",
            id="local-user",
        ),
        pytest.param(
            BASE._replace(op="rename", new_file="/etc/kubernetes/ssl/old.pem", comm="mv"),
            "worker.pem renamed to old.pem by mv (PID 4242), 1.0 s before",
            id="rename",
        ),
        pytest.param(
            BASE._replace(op="rename", new_file="/root/worker.pem", comm="mv"),
            "worker.pem renamed to /root/worker.pem by mv (PID 4242), 1.0 s before",
            id="rename-elsewhere",
        ),
        pytest.param(
            BASE._replace(
                op="rename", file="", new_file="/etc/kubernetes/ssl/worker.pem", comm="mv"
            ),
            "worker.pem moved in by mv (PID 4242), 1.0 s before",
            id="moved-in",
        ),
        pytest.param(
            BASE._replace(op="rename", new_file="", comm="mv"),
            "worker.pem moved away by mv (PID 4242), 1.0 s before",
            id="moved-away",
        ),
        pytest.param(
            BASE._replace(op="write", comm="cp"),
            "worker.pem written by cp (PID 4242), 1.0 s before",
            id="write",
        ),
        pytest.param(
            BASE._replace(op="delete-self", file="/etc/kubernetes/ssl"),
            "/etc/kubernetes/ssl deleted by rm (PID 4242), 1.0 s before",
            id="delete-self",
        ),
        pytest.param(
            BASE._replace(resolved=PID_ONLY, comm=""),
            "worker.pem deleted by PID 4242 (gone before it could be identified), 1.0 s before",
            id="pid-only",
        ),
        pytest.param(
            BASE._replace(resolved=UNVERIFIED),
            "worker.pem deleted by rm (PID 4242, not verified), 1.0 s before",
            id="unverified",
        ),
        pytest.param(
            BASE._replace(pid=0, resolved=PID_ONLY, comm=""),
            "worker.pem deleted by a process outside kubecertd's PID namespace, 1.0 s before",
            id="other-pid-namespace",
        ),
        pytest.param(
            lost(T),
            "changes went unattributed: the fanotify queue overflowed (records lost), 1.0 s before",
            id="lost",
        ),
    ],
)
def test_describe(record: Culprit, sentence: str) -> None:
    """Each kind of record reads as one sentence, leaving out what is not known."""
    assert record.describe(T + dt.timedelta(seconds=1)) == sentence


def test_to_fields() -> None:
    """Every journal field of a fully resolved record, without the prefix."""
    assert ISSUE.to_fields() == {
        "culprit_op": "delete",
        "culprit_file": "/etc/kubernetes/ssl/worker.pem",
        "culprit_time": "2026-12-03T12:00:00+00:00",
        "culprit_pid": "4242",
        "culprit_comm": "rm",
        "culprit_exe": "/usr/bin/rm",
        "culprit_cmdline": "rm -f worker.pem",
        "culprit_uid": "0",
        "culprit_loginuid": "1000",
        "culprit_session": "12",
        "culprit_unit": "session-12.scope",
        "culprit_user": "alice",
        "culprit_remote_host": "10.1.2.3",
        "culprit_parents": "bash(4200) < sshd(4100) < sshd(812) < systemd(1)",
        "culprit_resolved": "alive",
    }


def test_to_fields_leaves_out_the_unknown() -> None:
    """A PID-only record has only what is known; uid 0 is known, not left out."""
    record = Culprit("rename", "/s/a", T, 7, PID_ONLY, new_file="/s/b")
    assert record.to_fields() == {
        "culprit_op": "rename",
        "culprit_file": "/s/a",
        "culprit_new_file": "/s/b",
        "culprit_time": "2026-12-03T12:00:00+00:00",
        "culprit_pid": "7",
        "culprit_resolved": "pid-only",
    }
    assert record._replace(uid=0).to_fields()["culprit_uid"] == "0"


def test_summary() -> None:
    """One short line for the signer."""
    assert (
        ISSUE.summary()
        == "delete worker.pem by rm (PID 4242) in session-12.scope, user alice@10.1.2.3"
    )
    assert lost(T).summary() == "records lost (fanotify queue overflow)"


names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
records = st.builds(
    Culprit,
    op=st.sampled_from(
        ["create", "write", "attrib", "rename", "delete", "delete-self", "move-self", "lost"]
    ),
    file=names,
    time=st.datetimes(timezones=st.just(dt.timezone.utc)),
    pid=st.integers(min_value=0, max_value=4194304),
    resolved=st.sampled_from([ALIVE, ZOMBIE, UNVERIFIED, PID_ONLY, LOST]),
    new_file=names,
    comm=st.text(max_size=15),
    exe=names,
    cmdline=st.lists(names, max_size=5).map(tuple),
    uid=st.none() | st.integers(min_value=0, max_value=2**32 - 2),
    loginuid=st.none() | st.integers(min_value=0, max_value=2**32 - 2),
    session=st.none() | st.integers(min_value=1, max_value=2**32 - 2),
    unit=names,
    user=names,
    remote_host=names,
    parents=st.lists(st.tuples(st.text(max_size=15), st.integers(1, 4194304)), max_size=8).map(
        tuple
    ),
)


@given(records)
@settings(max_examples=200, deadline=None)
def test_record_round_trips_and_renders(record: Culprit) -> None:
    """Any record survives to_dict/JSON/from_dict, and renders without an exception:
    fields are strings, the summary at most 200 characters."""
    assert Culprit.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert all(isinstance(v, str) and v for v in record.to_fields().values())
    assert len(record.summary()) <= 200
    assert record.describe(T)


def test_is_own() -> None:
    """Only the daemon's own PID (its TGID) is its own."""
    assert is_own(Event(FAN_DELETE, 100, None, "/s/a"), 100)
    assert not is_own(Event(FAN_DELETE, 101, None, "/s/a"), 100)


# ---- the /proc reader, on a fake /proc ----------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


def fake_process(
    proc: Path,
    pid: int,
    comm: str,
    ppid: int,
    start: int,
    state: str = "S",
    cgroup: str = "0::/\n",
    cmdline: bytes = b"",
) -> None:
    base = proc / str(pid)
    base.mkdir(parents=True)
    (base / "stat").write_text(
        f"{pid} ({comm}) {state} {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 1 1\n"
    )
    (base / "status").write_text(f"Name:\t{comm}\nUid:\t1000\t0\t0\t0\n")
    (base / "loginuid").write_text("1000")
    (base / "sessionid").write_text("12")
    (base / "cgroup").write_text(cgroup)
    (base / "cmdline").write_bytes(cmdline)
    (base / "exe").symlink_to(f"/usr/bin/{comm}")


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A fake /proc: rm (4242) in session-12.scope under bash < sshd < sshd < systemd."""
    root = tmp_path / "proc"
    fake_process(root, 1, "systemd", 0, 1)
    fake_process(root, 812, "sshd", 1, 500)
    fake_process(root, 4100, "sshd", 812, 90000)
    fake_process(root, 4200, "bash", 4100, 90100)
    fake_process(
        root,
        4242,
        "rm",
        4200,
        90200,
        cgroup="0::/user.slice/user-1000.slice/session-12.scope\n",
        cmdline=b"rm\0-f\0worker.pem\0",
    )
    return root


def sessions(calls: list[str]) -> Callable[[str], LoginSession | None]:
    def lookup(session: str) -> LoginSession | None:
        calls.append(session)
        return LoginSession("alice", "10.1.2.3") if session == "12" else None

    return lookup


@pytest.fixture
def alive_pidfd() -> Iterator[int]:
    """A pidfd of a live process (this one), standing in for an unreaped actor."""
    fd = os.pidfd_open(os.getpid())
    yield fd
    os.close(fd)


@pytest.fixture
def reaped_pidfd() -> Iterator[int]:
    """A pidfd of a process that has been reaped."""
    child = subprocess.Popen(["true"])
    fd = os.pidfd_open(child.pid)
    child.wait(timeout=10)
    yield fd
    os.close(fd)


def attributor(proc: Path, calls: list[str] | None = None) -> Attributor:
    return Attributor(own_pid=1, sessions=sessions([] if calls is None else calls), proc=str(proc))


def delete(pidfd: int | None, pid: int = 4242, seen: float = 1e9) -> Event:
    return Event(FAN_DELETE, pid, pidfd, "/etc/kubernetes/ssl/worker.pem", None, seen)


def test_read_process(proc: Path) -> None:
    """Everything a record needs comes from /proc/PID and its ancestors."""
    process = read_process(4242, str(proc))
    assert process is not None
    assert (process.comm, process.exe, process.cmdline) == (
        "rm",
        "/usr/bin/rm",
        ("rm", "-f", "worker.pem"),
    )
    assert (process.uid, process.loginuid, process.session, process.unit) == (
        0,
        1000,
        12,
        "session-12.scope",
    )
    assert process.parents == ISSUE.parents
    assert read_process(99999, str(proc)) is None


def test_parents_stop_at_a_reused_pid(proc: Path) -> None:
    """An ancestor that started after its child is someone else: the chain ends there."""
    (proc / "4100" / "stat").write_text(
        "4100 (cron) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 95000 1 1\n"
    )
    process = read_process(4242, str(proc))
    assert process is not None
    assert process.parents == (("bash", 4200),)


def test_parents_at_most_eight(tmp_path: Path) -> None:
    """A deep tree gives the eight nearest ancestors."""
    root = tmp_path / "proc"
    for pid in range(1, 21):
        fake_process(root, pid, f"p{pid}", pid - 1, pid)
    process = read_process(20, str(root))
    assert process is not None
    assert [pid for _, pid in process.parents] == list(range(19, 11, -1))


def test_capture_alive_is_the_issue_example(proc: Path, alive_pidfd: int) -> None:
    """With a pidfd that proves the actor unreaped after the reads, the record is complete
    and logind names the user and host."""
    calls: list[str] = []
    (record,) = attributor(proc, calls).capture([delete(alive_pidfd)], T)
    assert record == ISSUE
    assert calls == ["12"]


def test_capture_zombie(proc: Path, alive_pidfd: int) -> None:
    """A zombie's /proc is still its own: exited-not-reaped."""
    (proc / "4242" / "stat").write_text(
        "4242 (rm) Z 4200 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 90200 0 0\n"
    )
    (record,) = attributor(proc).capture([delete(alive_pidfd)], T)
    assert (record.resolved, record.comm) == (ZOMBIE, "rm")


def test_capture_reaped_meanwhile_keeps_nothing(proc: Path, reaped_pidfd: int) -> None:
    """The pidfd says the actor was reaped: whatever /proc/PID said may be a reused PID's."""
    (record,) = attributor(proc).capture([delete(reaped_pidfd)], T)
    assert record == Culprit("delete", "/etc/kubernetes/ssl/worker.pem", T, 4242, PID_ONLY)


def test_capture_nopidfd_reads_nothing(proc: Path) -> None:
    """FAN_NOPIDFD: reaped before the read, so /proc is not even asked."""
    (record,) = attributor(proc).capture([delete(FAN_NOPIDFD)], T)
    assert (record.resolved, record.comm) == (PID_ONLY, "")


@pytest.mark.parametrize("pidfd", [None, FAN_EPIDFD], ids=["no-pidfd-kernel", "epidfd"])
def test_capture_without_pidfd_is_unverified(proc: Path, pidfd: int | None) -> None:
    """Without a pidfd the data is kept but marked pid-unverified."""
    (record,) = attributor(proc).capture([delete(pidfd)], T)
    assert (record.resolved, record.comm, record.user) == (UNVERIFIED, "rm", "alice")
    assert "not verified" in record.describe(T)


def test_capture_without_pidfd_rejects_a_younger_process(proc: Path) -> None:
    """Without a pidfd, a process that started after the event was read is provably not
    the actor."""
    seen = 90200 / TICKS - 5  # the event was read 5 s before this process started
    (record,) = attributor(proc).capture([delete(None, seen=seen)], T)
    assert (record.resolved, record.comm) == (PID_ONLY, "")


def test_capture_outside_pid_namespace(proc: Path) -> None:
    """PID 0: the actor is not visible from here."""
    (record,) = attributor(proc).capture([delete(FAN_NOPIDFD, pid=0)], T)
    assert record.resolved == PID_ONLY
    assert "outside" in record.describe(T)


def test_capture_overflow_own_and_merged(proc: Path, alive_pidfd: int) -> None:
    """An overflow is a lost record, the daemon's own change none, a merged mask one record
    per operation, and the same operation read twice in a batch one record."""
    events = [
        Event(FAN_Q_OVERFLOW, 0, FAN_NOPIDFD, ""),
        Event(FAN_DELETE, 1, alive_pidfd, "/etc/kubernetes/ssl/mine.pem"),  # own_pid=1
        Event(FAN_CREATE | FAN_CLOSE_WRITE | FAN_ATTRIB, 4242, alive_pidfd, "/s/new.pem"),
        Event(FAN_MODIFY, 4242, alive_pidfd, "/s/new.pem"),
    ]
    records = attributor(proc).capture(events, T)
    assert [(r.op, r.file, r.resolved) for r in records] == [
        ("lost", "", LOST),
        ("create", "/s/new.pem", ALIVE),
        ("write", "/s/new.pem", ALIVE),
        ("attrib", "/s/new.pem", ALIVE),
    ]


def test_capture_without_logind_names_the_login_user(proc: Path, alive_pidfd: int) -> None:
    """No answer from logind: the user is the login uid's name, and there is no host."""
    attributor_ = Attributor(own_pid=1, sessions=lambda _session: None, proc=str(proc))
    (record,) = attributor_.capture([delete(alive_pidfd)], T)
    expected = culprit_proc._user_name(1000)
    assert (record.user, record.remote_host) == (expected, "")


# ---- logind over D-Bus ----------------------------------------------------------


@pytest.fixture(scope="module")
def login1_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """A private dbus-daemon with a stand-in for logind knowing session 12 (alice from
    10.1.2.3); yields the bus address and the sessions asked for."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("needs dbus-daemon")
    from jeepney import HeaderFields, MessageType, new_error, new_method_return
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    socket_path = tmp_path_factory.mktemp("bus") / "bus"
    daemon = subprocess.Popen(
        [
            "dbus-daemon",
            "--session",
            "--nofork",
            "--print-address=1",
            f"--address=unix:path={socket_path}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert daemon.stdout is not None
    assert select.select([daemon.stdout], [], [], 10)[0], "dbus-daemon printed no address"
    address = daemon.stdout.readline().strip()
    asked: list[str] = []
    stop = threading.Event()
    conn = open_dbus_connection(bus=address)
    conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.login1"), timeout=5)

    def serve() -> None:
        while not stop.is_set():
            try:
                msg = conn.receive(timeout=0.2)
            except (TimeoutError, OSError):
                continue
            if msg.header.message_type != MessageType.method_call:
                continue
            member = msg.header.fields.get(HeaderFields.member)
            if member == "GetSession":
                (session,) = msg.body
                asked.append(session)
                if session == "12":
                    reply = new_method_return(msg, "o", ("/org/freedesktop/login1/session/_312",))
                else:
                    reply = new_error(
                        msg, "org.freedesktop.login1.NoSuchSession", "s", ("no such session",)
                    )
            elif member == "GetAll":
                props = {"Name": ("s", "alice"), "RemoteHost": ("s", "10.1.2.3"), "Id": ("s", "12")}
                reply = new_method_return(msg, "a{sv}", (props,))
            else:
                reply = new_error(
                    msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (str(member),)
                )
            conn.send(reply)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield address, asked
    finally:
        stop.set()
        server.join(timeout=5)
        conn.close()
        daemon.terminate()
        daemon.wait(timeout=10)


def test_logind_session_over_dbus(login1_bus: tuple[str, list[str]]) -> None:
    """GetSession and the session's properties give the user and remote host, asked
    once per session; an unknown session is None."""
    address, asked = login1_bus
    lookup = LogindSessions(bus=address, timeout=5)
    assert lookup("12") == LoginSession("alice", "10.1.2.3")
    assert lookup("12") == LoginSession("alice", "10.1.2.3")
    assert lookup("13") is None
    assert asked.count("12") == 1


def test_logind_absent_is_quick_and_quiet(tmp_path: Path) -> None:
    """No bus: None within the timeout, and the bus is not asked again for a while."""
    lookup = LogindSessions(bus=f"unix:path={tmp_path / 'nobus'}", timeout=0.5)
    started = time.monotonic()
    assert lookup("12") is None
    assert lookup("13") is None
    assert time.monotonic() - started < 1.0
    assert lookup._down_until > time.monotonic()


# ---- real actors, a real witness (root) ---------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A watched folder anyone may write to (for actors under another uid)."""
    if os.geteuid() != 0:
        pytest.skip("fanotify with PIDs needs root (make test runs as root)")
    made = Path(tempfile.mkdtemp(prefix="kubecertd-culprit-", dir="/tmp"))
    made.chmod(0o777)
    for name in ("worker.pem", "other-node.pem"):
        (made / name).write_text("x\n")
        (made / name).chmod(0o666)
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture
def witness(folder: Path) -> Iterator[Witness]:
    with Witness([str(folder)]) as made:
        yield made


def act(
    witness: Witness,
    argv: list[str],
    attributor_: Attributor | None = None,
    reap_first: bool = False,
    **popen: object,
) -> tuple[list[Culprit], int]:
    """Run ``argv`` to its end (unreaped unless ``reap_first``), then read and capture."""
    actor = subprocess.Popen(argv, **popen)  # type: ignore[call-overload]
    exited = os.pidfd_open(actor.pid)
    try:
        assert select.select([exited], [], [], 30)[0], f"{argv} did not finish"
        if reap_first:
            actor.wait(timeout=10)
        assert select.select([witness], [], [], 10)[0], f"no event from {argv}"
        records = (attributor_ or Attributor()).capture(witness.read(), T)
    finally:
        os.close(exited)
        actor.wait(timeout=10)
    return records, actor.pid


def test_rm_is_one_delete_record(witness: Witness, folder: Path) -> None:
    """``rm worker.pem``: one record naming rm, its PID, the file, as a zombie."""
    records, pid = act(witness, ["rm", str(folder / "worker.pem")])
    assert [(r.op, r.file, r.pid, r.comm, r.uid, r.resolved) for r in records] == [
        ("delete", str(folder / "worker.pem"), pid, "rm", 0, ZOMBIE)
    ]
    assert records[0].parents[0] == (Path("/proc/self/comm").read_text().strip(), os.getpid())


def test_reaped_actor_is_pid_only(witness: Witness, folder: Path) -> None:
    """An actor reaped before the event was read: its PID and nothing else."""
    records, pid = act(witness, ["rm", str(folder / "worker.pem")], reap_first=True)
    assert [(r.op, r.pid, r.comm, r.resolved) for r in records] == [("delete", pid, "", PID_ONLY)]


def test_alive_actor_has_cmdline_and_exe(witness: Witness, folder: Path) -> None:
    """An actor still running when its event is read: cmdline and exe too, proven alive."""
    script = "import os, sys; os.unlink(sys.argv[1]); sys.stdin.read()"
    actor = subprocess.Popen(
        [sys.executable, "-c", script, str(folder / "worker.pem")], stdin=subprocess.PIPE
    )
    try:
        assert select.select([witness], [], [], 30)[0]
        (record,) = Attributor().capture(witness.read(), T)
    finally:
        assert actor.stdin is not None
        actor.stdin.close()
        actor.wait(timeout=30)
    assert (record.op, record.pid, record.resolved) == ("delete", actor.pid, ALIVE)
    assert record.cmdline == (sys.executable, "-c", script, str(folder / "worker.pem"))
    assert record.exe == os.path.realpath(sys.executable)


def test_mv_over_the_file_is_one_rename_record(witness: Witness, folder: Path) -> None:
    """``mv other-node.pem worker.pem``: one rename record with both names (FAN_RENAME)."""
    records, pid = act(witness, ["mv", str(folder / "other-node.pem"), str(folder / "worker.pem")])
    assert [(r.op, r.file, r.new_file, r.pid, r.comm) for r in records] == [
        ("rename", str(folder / "other-node.pem"), str(folder / "worker.pem"), pid, "mv")
    ]


def test_cp_over_the_file_is_a_write_record(witness: Witness, folder: Path) -> None:
    """``cp other-node.pem worker.pem`` overwrites in place: a write record."""
    records, pid = act(witness, ["cp", str(folder / "other-node.pem"), str(folder / "worker.pem")])
    assert [(r.op, r.file, r.pid, r.comm) for r in records] == [
        ("write", str(folder / "worker.pem"), pid, "cp")
    ]


def test_own_writes_are_not_recorded(witness: Witness, folder: Path) -> None:
    """The daemon's own changes (this process) give no record."""
    (folder / "worker.pem").write_text("renewed\n")
    assert select.select([witness], [], [], 10)[0]
    events = witness.read()
    assert events and {e.pid for e in events} == {os.getpid()}
    assert Attributor().capture(events, T) == []


def test_other_uid_is_recorded(witness: Witness, folder: Path) -> None:
    """An actor under setpriv as nobody shows uid 65534."""
    nobody = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps=-all",
    ]
    records, pid = act(witness, [*nobody, "rm", str(folder / "worker.pem")])
    assert [(r.op, r.pid, r.comm, r.uid) for r in records] == [("delete", pid, "rm", 65534)]


def test_login_uid_is_recorded(witness: Witness, folder: Path) -> None:
    """A process whose login uid was set (as pam_loginuid does at login) shows it, and
    its new audit session."""
    script = "import os, sys; open('/proc/self/loginuid', 'w').write('1000'); os.execvp('rm', ['rm', sys.argv[1]])"
    records, pid = act(witness, [sys.executable, "-c", script, str(folder / "worker.pem")])
    (record,) = records
    assert (record.op, record.pid, record.comm, record.loginuid) == ("delete", pid, "rm", 1000)
    assert record.session is not None
    assert record.user == culprit_proc._user_name(1000)


def cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    return None


@pytest.fixture
def session_scope() -> Iterator[Path]:
    """A cgroup named like a login session's scope, removed afterwards."""
    root = cgroup2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup2 hierarchy")
    slice_ = root / f"kubecertd-test-{os.getpid()}.slice"
    scope = slice_ / "session-12.scope"
    scope.mkdir(parents=True)
    try:
        yield scope
    finally:
        scope.rmdir()
        slice_.rmdir()


def test_session_scope_names_user_and_host(
    witness: Witness, folder: Path, session_scope: Path
) -> None:
    """An actor in session-12.scope: the unit from /proc/PID/cgroup, the user and remote
    host from logind, in the issue's sentence."""
    script = (
        "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid()));"
        " os.execvp('rm', ['rm', sys.argv[2]])"
    )
    attributor_ = Attributor(sessions=sessions([]))
    argv = [
        sys.executable,
        "-c",
        script,
        str(session_scope / "cgroup.procs"),
        str(folder / "worker.pem"),
    ]
    records, pid = act(witness, argv, attributor_)
    (record,) = records
    assert (record.unit, record.user, record.remote_host) == (
        "session-12.scope",
        "alice",
        "10.1.2.3",
    )
    assert record.describe(T + dt.timedelta(seconds=3.2)) == (
        f"worker.pem deleted by rm (PID {pid}) in session-12.scope, user alice from 10.1.2.3, 3.2 s before"
    )


# -- the daemon's book and what --check shows from it -----------------------------------------


def _record(op: str, file: str, seconds_ago: float, now: dt.datetime, **extra: object) -> Culprit:
    values: dict[str, object] = {"comm": "rm", "resolved": "alive", **extra}
    return Culprit(op, file, now - dt.timedelta(seconds=seconds_ago), 4242, **values)  # type: ignore[arg-type]


def test_book_explains_a_path_by_file_then_folder_then_lost() -> None:
    """A finding is explained by a recent record on its file, else on its folder, else a
    lost-records note; nothing older than EXPLAINS_FOR."""
    now = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.timezone.utc)
    on_file = _record("delete", "/etc/kubernetes/ssl/worker.pem", 5, now)
    in_folder = _record("create", "/var/lib/kubelet/pki/kubelet-client-x.pem", 3, now)
    old = _record("delete", "/etc/kubernetes/ssl/worker-key.pem", EXPLAINS_FOR + 1, now)
    book = Book((on_file, in_folder, old))
    assert book.explaining("/etc/kubernetes/ssl/worker.pem", now) == on_file
    assert book.explaining("/var/lib/kubelet/pki/kubelet-client-current.pem", now) == in_folder
    assert book.explaining("/etc/kubernetes/ssl/worker-key.pem", now) == on_file  # same folder
    assert book.explaining("/srv/other.pem", now) is None
    book.add([lost(now)])
    assert book.explaining("/srv/other.pem", now) is not None


def test_book_does_not_explain_by_records_kubecertd_has_written_over() -> None:
    """A record on a file kubecertd rewrote since explains nothing (a newer one in the
    folder does); --check still shows it as the file's last recorded change."""
    now = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.timezone.utc)
    key, cert = "/etc/kubernetes/ssl/worker-key.pem", "/etc/kubernetes/ssl/worker.pem"
    cp = _record("write", key, 60, now, comm="cp")
    book = Book((cp,))
    assert book.explaining(key, now) == cp
    book.rewrote([cert, key], now - dt.timedelta(seconds=30))
    assert book.explaining(key, now) is None
    mv = _record("rename", "/etc/kubernetes/ssl/other.pem", 5, now, new_file=cert)
    book.add([mv])
    assert book.explaining(key, now) == mv
    assert book.latest(key) == cp


def test_book_round_trips_through_its_state_file() -> None:
    """What the daemon writes to its state folder reads back as the same records."""
    now = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.timezone.utc)
    record = _record(
        "rename",
        "/etc/kubernetes/ssl/other.pem",
        2,
        now,
        new_file="/etc/kubernetes/ssl/worker.pem",
        parents=(("bash", 10),),
        cmdline=("mv", "a", "b"),
    )
    assert Book.from_json(Book((record,)).to_json(1, now)).records == [record]
    with pytest.raises(ValueError):
        Book.from_json(b'{"records": 3}')


def test_check_shows_the_last_change_while_the_daemon_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check shows the witness's last record for a file only while the daemon holds its lock."""
    from kubecertd.cli import main
    from kubecertd.daemon import acquire_lock

    ssl, state = tmp_path / "ssl", tmp_path / "state"
    factories.write_ssl_dir(ssl, None, None, None)
    config = tmp_path / "kubecertd.toml"
    config.write_text(f'ssl_dir = "{ssl}"\n[daemon]\nstate_dir = "{state}"\n')
    now = dt.datetime.now(dt.timezone.utc)
    record = _record("delete", str(ssl / "worker.pem"), 3, now, unit="cleanup.service")
    state.mkdir()
    (state / STATE_FILE).write_bytes(Book((record,)).to_json(1, now))
    main(["--check", "--config", str(config)])
    assert "last change" not in capsys.readouterr().out  # no daemon: not current
    lock = acquire_lock(str(state))
    try:
        main(["--check", "--config", str(config)])
        out = capsys.readouterr().out
        main(["--check", "--json", "--config", str(config)])
        changes = json.loads(capsys.readouterr().out)["changes"]
    finally:
        os.close(lock)
    assert "last change: worker.pem deleted by rm (PID 4242) in cleanup.service" in out
    assert [(c["path"], c["op"], c["unit"]) for c in changes] == [
        (str(ssl / "worker.pem"), "delete", "cleanup.service")
    ]


@pytest.mark.parametrize(
    ("summaries", "expected"),
    [
        pytest.param(
            ["delete worker.pem by rm (PID 1)"], "delete worker.pem by rm (PID 1)", id="plain"
        ),
        pytest.param(["a\tb\x1b[31m"], "a?b?[31m", id="control-characters"),
        pytest.param(["bad \udcff name"], "bad ? name", id="surrogate"),
        pytest.param(["x" * 1000, "y" * 30], "x" * 1000, id="whole-lines-within-1024-bytes"),
        pytest.param(["é" * 600], None, id="one-line-over-the-limit"),
        pytest.param([], None, id="nothing"),
    ],
)
def test_claim_is_what_the_signer_takes(summaries: list[str], expected: str | None) -> None:
    """The claim sent to the signer is printable lines, at most 1024 bytes of UTF-8."""
    text = claim(summaries)
    assert text == expected
    if text is not None:
        assert len(text.encode()) <= 1024 and all(ch == "\n" or ch.isprintable() for ch in text)
