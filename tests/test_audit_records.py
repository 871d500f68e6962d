"""Culprit records from the audit log: the pure parser and selection
(kubecertd.audit_records), the tail reader (kubecertd.edges.audit_log) and the daemon's
fallback to them in ``Daemon.explain``.  The log is tests/data/audit/audit.log, written
by hand in the kernel's and auditd's formats (its README says how)."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubecertd.audit_records import (
    AUDIT,
    explaining,
    parse_log,
    split_proctitle,
    text_of,
)
from kubecertd.config import load_config
from kubecertd.culprit import EXPLAINS_FOR, Culprit, lost
from kubecertd.daemon import Daemon
from kubecertd.edges.audit_log import recent_records
from kubecertd.layout import files_layout

UTC = dt.timezone.utc
LOG = Path(__file__).parent / "data" / "audit" / "audit.log"
TEXT = LOG.read_text(encoding="utf-8")
LINES = TEXT.split("\n")  # not splitlines(): it splits at ENRICHED's 0x1D too
T0 = dt.datetime(2025, 11, 30, tzinfo=UTC)  # 1764460800, the log's first kubecertd event
SSL = "/etc/kubernetes/ssl"
PKI = "/var/lib/kubelet/pki"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def event(*records: str, stamp: str = "1764460800.123:1201") -> str:
    """Lines of one event: each ``TYPE fields`` becomes ``type=TYPE msg=audit(STAMP): fields``."""
    lines = []
    for record in records:
        kind, _, fields = record.partition(" ")
        lines.append(f"type={kind} msg=audit({stamp}): {fields}")
    return "\n".join(lines) + "\n"


def syscall(number: int = 87, key: str = '"kubecertd"', **fields: str) -> str:
    values = {
        "arch": "c000003e", "syscall": str(number), "success": "yes", "exit": "0",
        "a0": "ffffff9c", "a1": "7ffd2b1c3e8a", "a2": "0", "a3": "0", "items": "2",
        "ppid": "4100", "pid": "4242", "auid": "1000", "uid": "0", "euid": "0", "ses": "3",
        "tty": "pts0", "comm": '"rm"', "exe": '"/usr/bin/rm"', "subj": "unconfined",
    } | fields  # fmt: skip
    return "SYSCALL " + " ".join(f"{k}={v}" for k, v in values.items()) + f" key={key}"


def path(item: int, name: str, nametype: str) -> str:
    return (
        f"PATH item={item} name={name} inode=1835013 dev=fd:01 mode=0100644 ouid=0 ogid=0 "
        f"rdev=00:00 nametype={nametype} cap_fp=0 cap_fi=0 cap_fe=0 cap_fver=0 cap_frootid=0"
    )


# -- the log file ---------------------------------------------------------------------------


def test_log_gives_one_record_per_kubecertd_change() -> None:
    """Every successful event with the key becomes one record, oldest first; failed calls,
    other keys, cut events and changes through a descriptor give none."""
    found = [(r.op, r.file, r.new_file, r.pid, r.comm) for r in parse_log(TEXT)]
    assert found == [
        ("delete", f"{SSL}/worker.pem", "", 4242, "rm"),
        ("rename", f"{SSL}/other-node.pem", f"{SSL}/worker.pem", 4250, "mv"),
        ("write", f"{SSL}/ca.pem", "", 4260, "bash"),
        ("attrib", f"{SSL}/worker-key.pem", "", 5020, "python3"),
        ("delete", "worker-key.pem", "", 4280, "rm"),
        ("delete", SSL, "", 4280, "rm"),
        ("create", f"{PKI}/kubelet-client-2025-11-30-00-00-50.pem", "", 6100, "cert sync"),
        ("rename", f"{PKI}/kubelet-client-current.pem.updated", f"{PKI}/kubelet-client-current.pem", 901, "kubelet"),
        ("rename", f"{SSL}/.worker.pem.kubecertd-new", f"{SSL}/worker.pem", 777, "kubecertd"),
    ]  # fmt: skip


def test_record_carries_what_the_kernel_took() -> None:
    """The rm record: time, process, ids, command line, the parent's PID, resolved audit."""
    assert parse_log(TEXT)[0] == Culprit(
        op="delete",
        file=f"{SSL}/worker.pem",
        time=at(0.123),
        pid=4242,
        resolved=AUDIT,
        comm="rm",
        exe="/usr/bin/rm",
        cmdline=("rm", f"{SSL}/worker.pem"),
        uid=0,
        loginuid=1000,
        session=3,
        parents=(("?", 4100),),
    )


def test_unset_login_uid_and_session_are_none() -> None:
    """auid and ses 4294967295 (a service, never logged in) are unknown, not numbers."""
    kubelet = parse_log(TEXT)[7]
    assert (kubelet.loginuid, kubelet.session, kubelet.uid) == (None, None, 0)


def test_hex_fields_and_two_keys() -> None:
    """comm and exe with a space are hex; a rule with two keys logs them hex, joined by 0x01."""
    record = parse_log(TEXT)[6]
    assert (record.comm, record.exe) == ("cert sync", "/opt/cert sync/bin/cert sync")
    assert record.cmdline == ("/opt/cert sync/bin/cert sync", "--once")


def test_sentence_names_file_process_and_login() -> None:
    """The record reads like the witness's: what, by whom, the login uid, how long ago."""
    record = parse_log(TEXT)[1]
    assert record.describe(at(13.501)) == (
        "other-node.pem renamed to worker.pem by mv (PID 4250), login uid 1000, 3.0 s before"
    )
    assert record.to_fields()["culprit_resolved"] == "audit"


# -- one event at a time ----------------------------------------------------------------------


CASES = {
    "unlink-absolute": (
        event(syscall(87), path(0, f'"{SSL}/"', "PARENT"), path(1, f'"{SSL}/worker.pem"', "DELETE")),
        ("delete", f"{SSL}/worker.pem", ""),
    ),
    "unlink-relative-to-cwd": (
        event(syscall(87), f'CWD cwd="{SSL}"', path(0, f'"{SSL}"', "PARENT"), path(1, '"./worker.pem"', "DELETE")),
        ("delete", f"{SSL}/worker.pem", ""),
    ),
    "unlinkat-relative-to-a-descriptor": (
        event(syscall(263, a0="5"), 'CWD cwd="/root"', path(0, '"/root"', "PARENT"), path(1, '"worker.pem"', "DELETE")),
        ("delete", "worker.pem", ""),
    ),
    "rmdir": (
        event(syscall(84), path(0, '"/etc/kubernetes/"', "PARENT"), path(1, f'"{SSL}"', "DELETE")),
        ("delete", SSL, ""),
    ),
    "renameat-new-name-relative-to-a-descriptor": (
        event(syscall(264, a2="4"), 'CWD cwd="/"', path(0, '"/tmp/"', "PARENT"), path(1, '"x"', "PARENT"),
              path(2, '"/tmp/other.pem"', "DELETE"), path(3, '"worker.pem"', "CREATE")),
        ("rename", "/tmp/other.pem", "worker.pem"),
    ),
    "renameat2-no-target": (
        event(syscall(316, a2="ffffff9c"), f'CWD cwd="{SSL}"', path(0, '"."', "PARENT"),
              path(1, '"."', "PARENT"), path(2, '"new.pem"', "DELETE"), path(3, '"worker.pem"', "CREATE")),
        ("rename", f"{SSL}/new.pem", f"{SSL}/worker.pem"),
    ),
    "open-creates": (
        event(syscall(2), path(0, f'"{SSL}/"', "PARENT"), path(1, f'"{SSL}/new.pem"', "CREATE")),
        ("create", f"{SSL}/new.pem", ""),
    ),
    "creat-truncates": (
        event(syscall(85), path(0, f'"{SSL}/"', "PARENT"), path(1, f'"{SSL}/ca.pem"', "NORMAL")),
        ("write", f"{SSL}/ca.pem", ""),
    ),
    "truncate": (
        event(syscall(76), path(0, f'"{SSL}/ca.pem"', "NORMAL")),
        ("write", f"{SSL}/ca.pem", ""),
    ),
    "symlinkat-new-name": (
        event(syscall(266, a1="ffffff9c"), f'CWD cwd="{PKI}"', path(0, f'"{PKI}"', "PARENT"),
              path(1, '"kubelet-client-current.pem"', "CREATE")),
        ("create", f"{PKI}/kubelet-client-current.pem", ""),
    ),
    "chown": (
        event(syscall(92), path(0, f'"{SSL}/worker-key.pem"', "NORMAL")),
        ("attrib", f"{SSL}/worker-key.pem", ""),
    ),
    "setxattr": (
        event(syscall(188), path(0, f'"{SSL}/worker-key.pem"', "NORMAL")),
        ("attrib", f"{SSL}/worker-key.pem", ""),
    ),
    "aarch64-unlinkat": (
        event(syscall(35, arch="c00000b7", a0="ffffffffffffff9c"), path(0, f'"{PKI}/"', "PARENT"),
              path(1, f'"{PKI}/kubelet-client-current.pem"', "DELETE")),
        ("delete", f"{PKI}/kubelet-client-current.pem", ""),
    ),
    "enriched-name-wins-over-an-unknown-arch": (
        event(syscall(10, arch="40000003") + "\x1dARCH=i386 SYSCALL=unlink AUID=\"alice\"",
              path(0, f'"{SSL}/"', "PARENT"), path(1, f'"{SSL}/worker.pem"', "DELETE")),
        ("delete", f"{SSL}/worker.pem", ""),
    ),
    "unknown-call-renames-by-nametypes": (
        event(syscall(9999), path(0, f'"{SSL}/a"', "DELETE"), path(1, f'"{SSL}/b"', "CREATE")),
        ("rename", f"{SSL}/a", f"{SSL}/b"),
    ),
    "hex-name": (
        event(syscall(87), path(0, '2F6574632F6B756265726E657465732F73736C2F6D7920636572742E70656D', "DELETE")),
        ("delete", f"{SSL}/my cert.pem", ""),
    ),
    "node-prefix": (
        "node=worker-7 " + event(syscall(87), path(0, f'"{SSL}/worker.pem"', "DELETE")),
        ("delete", f"{SSL}/worker.pem", ""),
    ),
}  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), list(CASES.values()), ids=list(CASES))
def test_change_from_call_and_nametypes(text: str, expected: tuple[str, str, str]) -> None:
    """The op comes from the system call, the file from the PATH records' nametypes; a
    relative name is joined to the CWD unless it is relative to a descriptor."""
    (record,) = parse_log(text)
    assert (record.op, record.file, record.new_file) == expected


NONE = {
    "failed": event(syscall(87, success="no", exit="-13"), path(0, f'"{SSL}/worker.pem"', "DELETE")),
    "other-key": event(syscall(87, key='"identity"'), path(0, f'"{SSL}/worker.pem"', "DELETE")),
    "no-key": event(syscall(87, key="(null)"), path(0, f'"{SSL}/worker.pem"', "DELETE")),
    "key-prefix-only": event(syscall(87, key='"kubecertd-old"'), path(0, f'"{SSL}/worker.pem"', "DELETE")),
    "no-syscall-record": event(path(0, f'"{SSL}/worker.pem"', "DELETE")),
    "fchmod-names-no-path": event(syscall(91), path(0, "(null)", "NORMAL")),
    "unknown-call-normal-path": event(syscall(9999), path(0, f'"{SSL}/worker.pem"', "NORMAL")),
    "execve": event(syscall(59), path(0, '"/usr/bin/ls"', "NORMAL")),
    "year-beyond-datetime": event(syscall(87), path(0, f'"{SSL}/w"', "DELETE"), stamp="99999999999999.000:1"),
    "not-audit": "Nov 30 00:00:00 worker-7 kernel: audit: type=1400 audit(1764460800.123:1201): x\n",
}  # fmt: skip


@pytest.mark.parametrize("text", list(NONE.values()), ids=list(NONE))
def test_no_record(text: str) -> None:
    """Events that changed nothing, or nothing nameable, or not under the key: no record."""
    assert parse_log(text) == []


def test_records_of_one_event_may_interleave_with_others() -> None:
    """Lines are grouped by the event stamp, not by their order."""
    one = event(syscall(87), stamp="1764460800.123:1").splitlines()
    two = event(syscall(87, pid="9"), path(0, '"/x/b"', "DELETE"), stamp="1764460800.124:2")
    text = f"{one[0]}\n{two}" + event(path(0, '"/x/a"', "DELETE"), stamp="1764460800.123:1")
    assert [(r.file, r.pid) for r in parse_log(text)] == [("/x/a", 4242), ("/x/b", 9)]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ('"/usr/bin/rm"', "/usr/bin/rm"),
        ("2F6F70742F63C3A972742070656D", "/opt/c\u00e9rt pem"),
        ("(null)", ""),
        ("unconfined", "unconfined"),
        ('""', ""),
        ("FF", "\udcff"),  # not UTF-8: kept as a surrogate, as os.fsdecode does
    ],
    ids=["quoted", "hex-utf8", "null", "bare", "empty", "hex-not-utf8"],
)
def test_text_of(value: str, text: str) -> None:
    """A logged string is quoted or hex; (null) is none."""
    assert text_of(value) == text


@pytest.mark.parametrize(
    ("value", "argv"),
    [
        ("726D002D7266002F6574632F6B756265726E657465732F73736C", ("rm", "-rf", SSL)),
        ('"-bash"', ("-bash",)),
        ("6C7300", ("ls",)),
        ("", ()),
    ],
    ids=["hex-argv", "quoted-single-word", "trailing-nul", "empty"],
)
def test_split_proctitle(value: str, argv: tuple[str, ...]) -> None:
    """PROCTITLE is the argv, NUL-separated."""
    assert split_proctitle(value) == argv


@given(st.text(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_any_text_gives_records_or_nothing(text: str) -> None:
    """Any text parses to a list of records, never an exception."""
    assert all(isinstance(r, Culprit) for r in parse_log(text))


FIELD_VALUES = st.one_of(
    st.sampled_from(['"kubecertd"', "(null)", "ffffff9c", "-1", "9" * 5000, '"', ""]),
    st.text(alphabet='0123456789ABCDEFabcdef"=() \x01\x1d', max_size=30),
)


@given(
    st.lists(st.sampled_from(LINES), min_size=1, max_size=30),
    st.lists(st.tuples(st.integers(0, 40), FIELD_VALUES), max_size=5),
)
@settings(max_examples=300, deadline=None)
def test_mangled_real_lines_give_records_or_nothing(
    lines: list[str], edits: list[tuple[int, str]]
) -> None:
    """Real lines shuffled, with field values replaced by odd ones: records or nothing."""
    mangled = []
    for line in lines:
        words = line.split(" ")
        for index, value in edits:
            if index < len(words) and "=" in words[index]:
                words[index] = words[index].split("=", 1)[0] + "=" + value
        mangled.append(" ".join(words))
    assert all(isinstance(r, Culprit) for r in parse_log("\n".join(mangled)))


# -- which record explains a file ---------------------------------------------------------------


def record(seconds: float, file: str, pid: int = 4242, new_file: str = "") -> Culprit:
    return Culprit("delete", file, at(seconds), pid, AUDIT, new_file=new_file, comm="rm")


@pytest.mark.parametrize(
    ("age", "explains"),
    [(0.0, True), (EXPLAINS_FOR - 1, True), (EXPLAINS_FOR, True), (EXPLAINS_FOR + 1, False), (-1.0, False)],
    ids=["now", "a-second-inside", "at-the-edge", "a-second-beyond", "in-the-future"],
)  # fmt: skip
def test_window_is_ten_minutes(age: float, explains: bool) -> None:
    """A record explains a file for 10 minutes, up to the second, and never from the future."""
    found = explaining([record(0, f"{SSL}/worker.pem")], f"{SSL}/worker.pem", at(age))
    assert (found is not None) == explains


def test_newest_record_about_the_file_wins() -> None:
    """Of several records, the newest on that file (old or new name), not another file's."""
    records = [
        record(1, f"{SSL}/worker.pem"),
        record(2, f"{SSL}/other.pem", new_file=f"{SSL}/worker.pem"),
        record(3, f"{SSL}/ca.pem"),
    ]
    assert explaining(records, f"{SSL}/worker.pem", at(10)) == records[1]
    assert explaining(records, f"{SSL}/worker-key.pem", at(10)) is None


def test_relative_name_matches_by_last_component() -> None:
    """A name relative to a descriptor matches the file of the same name."""
    found = explaining([record(1, "worker-key.pem")], f"{SSL}/worker-key.pem", at(5))
    assert found is not None and found.file == "worker-key.pem"


def test_kubeconfig_key_path() -> None:
    """A finding on ``KUBECONFIG (KEY)`` is about the kubeconfig file."""
    kubeconfig = "/etc/kubernetes/kubelet.conf"
    assert explaining([record(1, kubeconfig)], f"{kubeconfig} (client-key-data)", at(5))


def test_kubecertd_own_change_ends_the_explanation() -> None:
    """After kubecertd rewrote the file, an earlier change explains it no more; a later
    one does."""
    records = parse_log(TEXT)
    assert explaining(records, f"{SSL}/worker.pem", at(75), own_pid=777) is None
    later = [*records, record(80, f"{SSL}/worker.pem", pid=4300)]
    found = explaining(later, f"{SSL}/worker.pem", at(85), own_pid=777)
    assert found is not None and found.pid == 4300
    mv = explaining(records, f"{SSL}/worker.pem", at(75), own_pid=1)
    assert mv is not None and mv.pid == 777  # not the daemon's PID: any other writer


# -- the tail reader ---------------------------------------------------------------------------


def test_reads_records_since(tmp_path: Path) -> None:
    """Records from ``since`` on, oldest first."""
    log = tmp_path / "audit.log"
    log.write_text(TEXT, encoding="utf-8")
    found = recent_records(str(log), at(40))
    assert [r.pid for r in found] == [4280, 4280, 6100, 901, 777]


def test_reads_only_the_tail(tmp_path: Path) -> None:
    """Only the last ``limit_bytes`` are read; the line cut by the limit is dropped."""
    log = tmp_path / "audit.log"
    log.write_text(TEXT, encoding="utf-8")
    tail = TEXT.encode()[-3000:]
    cut = tail.index(b"\n")
    found = recent_records(str(log), T0, limit_bytes=3000)
    assert [r.pid for r in found] == [r.pid for r in parse_log(tail[cut + 1 :].decode())]
    assert [r.pid for r in found] == [777]


def test_rotated_log_is_read_too(tmp_path: Path) -> None:
    """Just after a rotation the rest of the budget comes from audit.log.1, even for an
    event split between the two files."""
    log = tmp_path / "audit.log"
    lines = TEXT.encode().splitlines(keepends=True)
    split = next(i for i, line in enumerate(lines) if b"1764460800.123:1201" in line) + 2
    (tmp_path / "audit.log.1").write_bytes(b"".join(lines[:split]))
    log.write_bytes(b"".join(lines[split:]))
    assert [r.pid for r in recent_records(str(log), T0)] == [r.pid for r in parse_log(TEXT)]


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo", "garbage"])
def test_unreadable_log_gives_nothing(tmp_path: Path, kind: str) -> None:
    """A missing log, a folder, a FIFO (without hanging) or garbage: [], never an error."""
    target = tmp_path / "audit.log"
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "garbage":
        target.write_bytes(bytes(range(256)) * 16 + b"type=SYSCALL msg=audit(1.0:1): \xff\x1d\n")
    assert recent_records(str(target), T0) == []


@given(st.binary(max_size=4000), st.integers(-1, 5000))
@settings(max_examples=200, deadline=None)
def test_any_bytes_in_the_log_give_records_or_nothing(data: bytes, limit: int) -> None:
    """Whatever the file holds and however little may be read: a list, never an error."""
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "audit.log"
        log.write_bytes(data)
        assert isinstance(recent_records(str(log), T0, limit_bytes=limit), list)


# -- Daemon.explain falls back to the audit log --------------------------------------------------


class NoSigner:
    """explain never talks to the signer."""


def daemon(tmp_path: Path, audit_log: str, now: dt.datetime) -> Daemon:
    text = f"""
node_name = "worker-7"
ssl_dir = "{SSL}"
[daemon]
state_dir = "{tmp_path / "state"}"
audit_log = "{audit_log}"
"""
    config = load_config(text, "test.toml", "host")
    layout = files_layout(SSL, "ca.pem", "worker.pem", "worker-key.pem", "kubelet.service", "test")
    return Daemon(config, layout, NoSigner(), None, clock=lambda: now)


def test_explain_falls_back_to_the_audit_log(tmp_path: Path) -> None:
    """Without a witness record, the newest audit record about the file explains it."""
    log = tmp_path / "audit.log"
    log.write_text(TEXT, encoding="utf-8")
    found = daemon(tmp_path, str(log), at(25)).explain(f"{SSL}/ca.pem")
    assert found is not None and (found.op, found.comm, found.resolved) == ("write", "bash", AUDIT)


def test_explain_prefers_the_witness(tmp_path: Path) -> None:
    """A witness record wins; a lost-records note gives way to an audit record."""
    log = tmp_path / "audit.log"
    log.write_text(TEXT, encoding="utf-8")
    agent = daemon(tmp_path, str(log), at(25))
    witnessed = Culprit("write", f"{SSL}/ca.pem", at(24), 4260, "alive", comm="bash")
    agent.book.add([witnessed])
    assert agent.explain(f"{SSL}/ca.pem") == witnessed
    agent.book.records = [lost(at(24))]
    found = agent.explain(f"{SSL}/ca.pem")
    assert found is not None and found.resolved == AUDIT


def test_explain_without_the_setting_reads_no_log(tmp_path: Path) -> None:
    """audit_log = "" (the default): only the witness explains; the log is not read."""
    log = tmp_path / "audit.log"
    log.write_text(TEXT, encoding="utf-8")
    assert daemon(tmp_path, "", at(25)).explain(f"{SSL}/ca.pem") is None


def test_explain_ignores_old_audit_records(tmp_path: Path) -> None:
    """An audit record older than 10 minutes explains nothing."""
    log = tmp_path / "audit.log"
    log.write_text(TEXT, encoding="utf-8")
    assert daemon(tmp_path, str(log), at(20 + EXPLAINS_FOR + 1)).explain(f"{SSL}/ca.pem") is None
