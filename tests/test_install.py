"""Installing the pair (SPEC "Healing" step 5): atomic files, backups, intent and recovery.

The crash-safety tests kill a real install with SIGKILL at every point it passes
through, twice over: at each of install()'s own checkpoints, and before each
state-changing system call (strace fault injection).  Every install runs in a child
forked from a small ``python -c`` helper that imported kubecertd once, so a kill point
costs a fork, not an interpreter start.  After each kill, recover() runs as the agent
does at start-up, and the ssl directory must hold the complete old set or the complete
new set (CA, certificate and key byte for byte), never a mix, a partial file or a
temporary.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from kubecertd.edges.install import (
    BACKUP_DIR,
    INTENT,
    Target,
    backup_name,
    install,
    is_own_name,
    list_backups,
    recover,
    replace_file,
    temp_path,
    write_file,
)
from kubecertd.errors import InstallError

from factories import NOW, Issued, healthy_pair

BACKUP_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")
FILES = (("ca.pem", 0o644), ("worker.pem", 0o644), ("worker-key.pem", 0o600))
NAMES = tuple(name for name, _ in FILES)
Pair = tuple[bytes, bytes, bytes]  # ca.pem, worker.pem, worker-key.pem


class Crash(Exception):
    """Raised by a checkpoint to stop an install in its tracks, as a crash would."""


def crash_at(step: str) -> Callable[[str], None]:
    """A checkpoint that stops the install when it reaches ``step``."""

    def checkpoint(name: str) -> None:
        if name == step:
            raise Crash(step)

    return checkpoint


def pair_bytes(ca: Issued, leaf: Issued) -> Pair:
    return ca.pem, leaf.pem, leaf.key_pem


def fresh_pair() -> Pair:
    return pair_bytes(*healthy_pair())


@dataclass
class Node:
    """An ssl directory holding a pair, a state directory and the paths install() takes."""

    root: Path
    ssl: str
    state: str
    backups: str

    @classmethod
    def at(cls, root: Path) -> Node:
        return cls(root, str(root / "ssl"), str(root / "state"), str(root / "ssl" / BACKUP_DIR))

    @classmethod
    def make(cls, root: Path, pair: Pair | None = None) -> Node:
        (root / "ssl").mkdir(parents=True)
        (root / "state").mkdir()
        node = cls.at(root)
        if pair is not None:
            node.put(pair)
        return node

    def path(self, name: str) -> str:
        return os.path.join(self.ssl, name)

    def put(self, pair: Pair) -> None:
        for (name, mode), data in zip(FILES, pair, strict=True):
            Path(self.path(name)).write_bytes(data)
            os.chmod(self.path(name), mode)

    def targets(self, pair: Pair) -> list[Target]:
        return [
            Target(self.path(name), data, mode)
            for (name, mode), data in zip(FILES, pair, strict=True)
        ]

    def read(self) -> Pair:
        ca, cert, key = (Path(self.path(name)).read_bytes() for name in NAMES)
        return ca, cert, key

    def entries(self) -> set[str]:
        return set(os.listdir(self.ssl))

    def install(
        self,
        pair: Pair,
        now: dt.datetime = NOW,
        keep: int = 3,
        checkpoint: Callable[[str], None] | None = None,
    ) -> str | None:
        if checkpoint is None:
            return install(self.targets(pair), self.state, self.backups, keep, now)
        return install(self.targets(pair), self.state, self.backups, keep, now, checkpoint)

    def recover(self) -> str | None:
        return recover(self.state, [self.ssl])


def temporaries(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".kubecertd-new"))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    """An ssl directory holding a complete, healthy old pair."""
    return Node.make(tmp_path / "node", fresh_pair())


# -- a successful install ------------------------------------------------------------------


def test_install_writes_contents_modes_and_owner(node: Node) -> None:
    """The new files hold exactly the new bytes, certificates 0644 and the key 0600, owned by root."""
    new = fresh_pair()
    node.install(new)
    assert node.read() == new
    for name, mode in FILES:
        info = os.stat(node.path(name))
        assert stat.S_IMODE(info.st_mode) == mode, name
        assert (info.st_uid, info.st_gid) == (0, 0), name


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o277], ids=["umask000", "umask077", "umask277"])
def test_install_modes_do_not_depend_on_the_umask(node: Node, umask: int) -> None:
    """The modes are 0644 and 0600 whatever the process umask."""
    old = os.umask(umask)
    try:
        node.install(fresh_pair())
    finally:
        os.umask(old)
    assert [stat.S_IMODE(os.stat(node.path(n)).st_mode) for n in NAMES] == [m for _, m in FILES]


def test_install_reclaims_a_stale_temporary(node: Node) -> None:
    """A leftover temporary owned by someone else with a loose mode is truncated, chowned to root and chmodded."""
    new = fresh_pair()
    stale = temp_path(node.path("worker-key.pem"))
    Path(stale).write_bytes(b"x" * 10_000)
    os.chown(stale, 1234, 1234)
    os.chmod(stale, 0o666)  # noqa: S103 - the loose mode install() must take away
    node.install(new)
    info = os.stat(node.path("worker-key.pem"))
    assert node.read() == new
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0)


def test_install_replaces_files_by_rename(node: Node) -> None:
    """Each target becomes a new inode: a reader holding the old file still reads the old bytes."""
    old = node.read()
    inodes = [os.stat(node.path(n)).st_ino for n in NAMES]
    with open(node.path("worker-key.pem"), "rb") as held:
        node.install(fresh_pair())
        assert held.read() == old[2]
    assert all(os.stat(node.path(n)).st_ino != ino for n, ino in zip(NAMES, inodes, strict=True))


def test_install_leaves_no_temporaries_or_intent(node: Node) -> None:
    """After an install the ssl and state directories hold no temporary and no intent record."""
    node.install(fresh_pair())
    assert node.entries() == {*NAMES, BACKUP_DIR}
    assert os.listdir(node.state) == []


def test_install_returns_none_without_previous_files(tmp_path: Path) -> None:
    """Installing into an empty directory makes no backup folder and returns None."""
    empty = Node.make(tmp_path / "empty")
    new = fresh_pair()
    assert empty.install(new) is None
    assert empty.read() == new
    assert empty.entries() == set(NAMES)


def test_install_without_backup_root_makes_no_backup(node: Node) -> None:
    """backup_root=None (the identity files) installs without any backup."""
    new = fresh_pair()
    assert install(node.targets(new), node.state, None, 3, NOW) is None
    assert node.read() == new
    assert node.entries() == set(NAMES)


# -- backups ------------------------------------------------------------------------------------


def test_install_keeps_the_previous_files_in_a_dated_backup(node: Node) -> None:
    """The previous files, byte for byte with their modes, are kept under .kubecertd-backup/<UTC time>/."""
    old = node.read()
    now = dt.datetime(2026, 11, 30, 1, 44, 55, 123456, tzinfo=dt.timezone.utc)
    folder = node.install(fresh_pair(), now=now)
    assert folder == os.path.join(node.backups, "20261130T014455.123456Z")
    assert BACKUP_NAME.match(os.path.basename(folder))
    for (name, mode), data in zip(FILES, old, strict=True):
        path = os.path.join(folder, name)
        assert Path(path).read_bytes() == data, name
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, name
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(node.backups).st_mode) == 0o700


@pytest.mark.parametrize(
    ("now", "name"),
    [
        (dt.datetime(2026, 11, 30, 1, 44, 55, 123456, tzinfo=dt.timezone.utc), "20261130T014455.123456Z"),
        (dt.datetime(2026, 11, 30, 10, 44, 55, tzinfo=dt.timezone(dt.timedelta(hours=9))), "20261130T014455.000000Z"),
        (dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), "20260101T000000.000000Z"),
    ],
    ids=["utc", "jst-converted", "midnight"],
)  # fmt: skip
def test_backup_name_is_utc_to_the_microsecond(now: dt.datetime, name: str) -> None:
    """Backup folders are named by the UTC time to the microsecond, e.g. 20261130T014455.123456Z."""
    assert backup_name(now) == name
    assert BACKUP_NAME.match(name)


def test_backups_are_pruned_to_the_newest_n(node: Node) -> None:
    """After five installs with backups = 3 only the three newest backup folders remain, oldest first."""
    previous = []
    for i in range(5):
        previous.append(node.read())
        node.install(fresh_pair(), now=NOW + dt.timedelta(seconds=i), keep=3)
    names = [os.path.basename(f) for f in list_backups(node.backups)]
    assert names == [backup_name(NOW + dt.timedelta(seconds=i)) for i in (2, 3, 4)]
    for i, folder in zip((2, 3, 4), list_backups(node.backups), strict=True):
        assert tuple(Path(folder, n).read_bytes() for n in NAMES) == previous[i]


def test_pruning_leaves_foreign_entries_alone(node: Node) -> None:
    """Pruning removes only backup folders, not other files an operator put there."""
    os.makedirs(node.backups)
    Path(node.backups, "README").write_text("operator notes\n")
    for i in range(3):
        node.install(fresh_pair(), now=NOW + dt.timedelta(seconds=i), keep=1)
    assert sorted(os.listdir(node.backups)) == sorted(
        [backup_name(NOW + dt.timedelta(seconds=2)), "README"]
    )


def test_install_with_zero_backups_returns_no_folder(node: Node) -> None:
    """With backups = 0 nothing is kept and install() returns None rather than a deleted folder."""
    folder = node.install(fresh_pair(), keep=0)
    assert folder is None or os.path.isdir(folder)


# -- a failed install -----------------------------------------------------------------------------


def block(path: str) -> None:
    """Make ``path`` unwritable and undeletable for the agent: a non-empty directory."""
    os.mkdir(path)
    Path(path, "keep").write_bytes(b"")


def unblock(path: str) -> None:
    shutil.rmtree(path)


def test_failed_install_raises_and_keeps_the_old_files(node: Node) -> None:
    """A temporary that cannot be written raises InstallError naming it; old files, no temporaries, no backup."""
    old = node.read()
    inodes = [os.stat(node.path(n)).st_ino for n in NAMES]
    blocked = temp_path(node.path("worker-key.pem"))
    block(blocked)
    with pytest.raises(InstallError, match=re.escape(blocked)):
        node.install(fresh_pair())
    unblock(blocked)
    assert node.read() == old
    assert [os.stat(node.path(n)).st_ino for n in NAMES] == inodes
    assert node.entries() == set(NAMES)
    assert os.listdir(node.state) == []
    assert node.recover() is None


def test_failed_install_with_an_undeletable_temporary_raises_install_error(node: Node) -> None:
    """A failure whose cleanup also fails still surfaces as InstallError with the old files in place."""
    old = node.read()
    os.mkdir(temp_path(node.path("worker-key.pem")))
    with pytest.raises(InstallError):
        node.install(fresh_pair())
    assert node.read() == old


def test_failed_install_after_an_unfinished_one_leaves_no_temporaries(node: Node) -> None:
    """A failed install leaves no temporaries even when an older intent record is still in state_dir."""
    old = node.read()
    with pytest.raises(Crash):  # an earlier install stopped after its last rename
        node.install(fresh_pair(), checkpoint=crash_at(f"renamed {node.path('worker-key.pem')}"))
    earlier = node.read()  # install() finished the earlier one before starting
    block(temp_path(node.path("worker-key.pem")))
    with pytest.raises(InstallError):
        node.install(fresh_pair())
    unblock(temp_path(node.path("worker-key.pem")))
    assert old != earlier
    node.recover()
    assert node.read() == earlier, "recover() installed half of the failed install"
    assert temporaries(node.ssl) == []


# -- recover() -------------------------------------------------------------------------------------


def test_recover_with_nothing_to_do_returns_none(node: Node) -> None:
    """Without an intent or temporaries recover() changes nothing and returns None."""
    old = node.read()
    assert node.recover() is None
    assert node.read() == old


@pytest.mark.parametrize("renamed", [0, 1, 2, 3], ids=lambda n: f"{n}-renamed")
def test_recover_finishes_a_committed_install(node: Node, renamed: int) -> None:
    """With the intent written and some temporaries already renamed, recover() completes the new set."""
    new = fresh_pair()
    step = "intent" if renamed == 0 else f"renamed {node.path(NAMES[renamed - 1])}"
    with pytest.raises(Crash):
        node.install(new, checkpoint=crash_at(step))
    assert os.path.exists(os.path.join(node.state, INTENT))
    assert len(temporaries(node.ssl)) == 3 - renamed
    message = node.recover()
    assert message is not None
    assert message.startswith("finished an interrupted install of ")
    assert node.path("worker-key.pem") in message
    assert node.read() == new
    assert temporaries(node.ssl) == []
    assert os.listdir(node.state) == []
    assert node.recover() is None


@pytest.mark.parametrize("step", ["written ca.pem", "written worker.pem", "backed up"])
def test_recover_removes_stray_temporaries_without_intent(node: Node, step: str) -> None:
    """Without an intent recover() deletes the temporaries and leaves the old pair intact."""
    old = node.read()
    name = step.removeprefix("written ")
    checkpoint = crash_at(step if step == "backed up" else f"written {node.path(name)}")
    with pytest.raises(Crash):
        node.install(fresh_pair(), checkpoint=checkpoint)
    strays = temporaries(node.ssl)
    assert strays
    message = node.recover()
    assert message is not None
    assert message.startswith("removed unfinished temporary files ")
    assert all(os.path.join(node.ssl, s) in message for s in strays)
    assert node.read() == old
    assert temporaries(node.ssl) == []


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"renames": 5}', b'{"other": []}', b'{"renames": [["only-one"]]}', b"\xff\xfe"],
    ids=["empty", "truncated", "list", "not-a-list", "no-renames", "short-pair", "not-utf8"],
)  # fmt: skip
def test_recover_with_a_corrupt_intent_raises_naming_it(node: Node, content: bytes) -> None:
    """A damaged intent record is an InstallError naming its path, and nothing is changed."""
    old = node.read()
    intent = os.path.join(node.state, INTENT)
    Path(intent).write_bytes(content)
    with pytest.raises(InstallError, match=re.escape(intent)):
        node.recover()
    assert node.read() == old


def test_recover_with_an_unreadable_intent_raises_naming_it(node: Node) -> None:
    """An intent path that cannot be read (a directory) is an InstallError naming it."""
    intent = os.path.join(node.state, INTENT)
    os.mkdir(intent)
    with pytest.raises(InstallError, match=re.escape(intent)):
        node.recover()


def test_recover_removes_a_half_written_intent_temporary(node: Node) -> None:
    """A crash while writing the intent record leaves no temporary in state_dir after recover()."""
    Path(temp_path(os.path.join(node.state, INTENT))).write_bytes(b'{"renames": [["/etc/')
    node.recover()
    assert os.listdir(node.state) == []


# -- helpers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "own"),
    [
        (".worker.pem.kubecertd-new", True),
        (".worker-key.pem.kubecertd-new", True),
        (".install-intent.json.kubecertd-new", True),
        (BACKUP_DIR, True),
        ("worker.pem", False),
        ("worker-key.pem", False),
        (".kubecertd-backup-old", False),
        ("kubecertd-new.pem", False),
    ],
)
def test_is_own_name(name: str, own: bool) -> None:
    """Only the agent's temporaries and its backup folder are its own names."""
    assert is_own_name(name) is own


def test_temp_path_is_hidden_beside_its_target() -> None:
    """The temporary of /etc/kubernetes/ssl/worker.pem is /etc/kubernetes/ssl/.worker.pem.kubecertd-new."""
    assert (
        temp_path("/etc/kubernetes/ssl/worker.pem")
        == "/etc/kubernetes/ssl/.worker.pem.kubecertd-new"
    )


def test_write_file_does_not_follow_a_symlink(tmp_path: Path) -> None:
    """write_file refuses a symlink at the path and leaves the link's target untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, tmp_path / "link")
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        write_file(str(tmp_path / "link"), b"attack", 0o600)
    assert victim.read_bytes() == b"precious"


def test_replace_file_swaps_inode_mode_and_content(tmp_path: Path) -> None:
    """replace_file puts a new inode with the new bytes and mode in place and leaves no temporary."""
    path = tmp_path / "kubecertd.json"
    path.write_bytes(b"old contents that are longer")
    os.chmod(path, 0o666)  # noqa: S103 - the loose mode replace_file() must take away
    before = os.stat(path).st_ino
    replace_file(str(path), b"new", 0o600)
    info = os.stat(path)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_ino != before
    assert os.listdir(tmp_path) == ["kubecertd.json"]


# -- crash safety: SIGKILL at every point, in a real child process ------------------------------

HELPER = r"""
import datetime as dt, json, os, signal, sys, traceback
from kubecertd.edges.install import Target, install

FILES = (("ca.pem", 0o644), ("worker.pem", 0o644), ("worker-key.pem", 0o600))

def child(request):
    run = request["dir"]
    ssl = os.path.join(run, "ssl")
    targets = []
    for name, mode in FILES:
        with open(os.path.join(run, "new", name), "rb") as stream:
            targets.append(Target(os.path.join(ssl, name), stream.read(), mode))
    record = None
    if request["record"]:
        record = os.open(os.path.join(run, "steps"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    passed = []

    def checkpoint(step):
        passed.append(step)
        if record is not None:
            os.write(record, (step + "\n").encode())
        if len(passed) == request["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)

    now = dt.datetime.fromisoformat(request["now"])
    backups = os.path.join(ssl, ".kubecertd-backup")
    state = os.path.join(run, "state")
    if request["stop"]:
        os.kill(os.getpid(), signal.SIGSTOP)  # strace attaches while we are stopped
        os.getppid()  # marker: the first system call strace must see
    install(targets, state, backups, request["keep"], now, checkpoint)

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child(request)
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
"""

BOUND = 30.0  # seconds any one step of the helper may take before the test gives up
KEEP = 3
# The system calls that change files or directories; a kill before each occurrence of
# each of them visits every state the install passes through.
MUTATING = frozenset({
    "open", "openat", "openat2", "creat", "mkdir", "mkdirat",
    "fchmod", "fchmodat", "chmod", "fchown", "fchownat", "chown",
    "write", "pwrite64", "writev", "pwritev", "pwritev2",
    "fsync", "fdatasync", "sync_file_range", "close",
    "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir",
    "link", "linkat", "symlink", "symlinkat", "truncate", "ftruncate", "fallocate",
})  # fmt: skip


def wait_for(condition: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    """Poll ``condition`` until it holds, failing after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {bound:g}s waiting for {what}")
        time.sleep(0.0005)


class Helper:
    """The ``python -c`` helper: forks one install child per request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HELPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self._buffer = b""

    def start(self, request: dict[str, object]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        return int(self._line()["pid"])

    def status(self) -> int:
        return int(self._line()["status"])

    def _line(self) -> dict[str, int]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + BOUND
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                pytest.fail("the install helper did not answer")
            chunk = os.read(fd, 4096)
            if not chunk:
                pytest.fail(f"the install helper exited with {self.proc.wait()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, int] = json.loads(line)
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=BOUND)


@dataclass(frozen=True)
class CrashSets:
    """The pairs of a crash run: older (already in backups), old (in place), new (installed)."""

    older: Pair
    old: Pair
    new: Pair

    def known_backup(self, name: str) -> set[bytes]:
        index = NAMES.index(name)
        return {self.older[index], self.old[index]}


@dataclass
class Outcome:
    """What one killed (or completed) install left after recover()."""

    point: str
    status: int
    state: str = ""  # "old", "new" or a description of the damage
    problems: list[str] = field(default_factory=list)
    backup_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def material() -> CrashSets:
    """Three distinct CA + certificate + key sets, each under its own CA."""
    return CrashSets(fresh_pair(), fresh_pair(), fresh_pair())


@pytest.fixture(scope="module")
def helper() -> Iterator[Helper]:
    """One install helper process for the module."""
    running = Helper()
    try:
        yield running
    finally:
        running.close()


def prepare(run: Path, material: CrashSets) -> Node:
    """An ssl dir holding the old set, KEEP older backups (so pruning runs), and the new set to install."""
    node = Node.make(run, material.old)
    (run / "new").mkdir()
    for name, data in zip(NAMES, material.new, strict=True):
        (run / "new" / name).write_bytes(data)
    for days in range(KEEP, 0, -1):
        folder = Path(node.backups, backup_name(NOW - dt.timedelta(days=days)))
        folder.mkdir(parents=True)
        for (name, mode), data in zip(FILES, material.older, strict=True):
            (folder / name).write_bytes(data)
            os.chmod(folder / name, mode)
    return node


def request(run: Path, kill_at: int | None = None, stop: bool = False) -> dict[str, object]:
    return {
        "dir": str(run),
        "now": NOW.isoformat(),
        "keep": KEEP,
        "kill_at": kill_at,
        "record": not stop,
        "stop": stop,
    }


def spki(holder: x509.Certificate | PrivateKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate's or a private key's public key."""
    return holder.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def judge(node: Node, material: CrashSets, outcome: Outcome) -> Outcome:
    """Run recover() as the agent does at start, then check the old-or-new invariant."""
    try:
        node.recover()
    except InstallError as exc:
        outcome.problems.append(f"recover() failed: {exc}")
        return outcome
    entries = node.entries() - {BACKUP_DIR}
    if entries != set(NAMES):
        outcome.problems.append(f"ssl dir holds {sorted(entries)}")
    try:
        current = node.read()
    except FileNotFoundError as exc:
        outcome.problems.append(f"missing: {exc.filename}")
        return outcome
    if current == material.old:
        outcome.state = "old"
    elif current == material.new:
        outcome.state = "new"
    else:
        which = [
            "old" if data == o else "new" if data == n else f"foreign({len(data)} bytes)"
            for data, o, n in zip(current, material.old, material.new, strict=True)
        ]
        outcome.state = "mixed"
        outcome.problems.append(f"mixed set: ca/cert/key = {'/'.join(which)}")
    try:  # the same verdict the way kubelet would see it: key matches cert, cert from the CA
        ca = x509.load_pem_x509_certificate(current[0])
        cert = x509.load_pem_x509_certificate(current[1])
        key = serialization.load_pem_private_key(current[2], password=None)
        if spki(cert) != spki(key):
            outcome.problems.append("certificate and key do not match")
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        outcome.problems.append(f"unusable set: {exc!r}")
    modes = [stat.S_IMODE(os.stat(node.path(n)).st_mode) for n in NAMES]
    if modes != [m for _, m in FILES]:
        outcome.problems.append(f"modes {[oct(m) for m in modes]}")
    if os.path.exists(os.path.join(node.state, INTENT)):
        outcome.problems.append("intent left after recover()")
    if node.recover() is not None:
        outcome.problems.append("a second recover() still had work to do")
    if leftovers := os.listdir(node.state):
        outcome.notes.append(f"state_dir holds {leftovers}")
    for folder in list_backups(node.backups):
        present = sorted(os.listdir(folder))
        if present != sorted(NAMES):
            outcome.notes.append(f"backup {os.path.basename(folder)} holds only {present}")
        for name in present:
            data = Path(folder, name).read_bytes()
            if data not in material.known_backup(name):
                outcome.backup_problems.append(
                    f"half-written backup {os.path.basename(folder)}/{name} ({len(data)} bytes)"
                )
    if len(list_backups(node.backups)) > KEEP:
        outcome.notes.append(f"{len(list_backups(node.backups))} backup folders (keep {KEEP})")
    return outcome


def summary(outcomes: list[Outcome]) -> str:
    states = {s: sum(1 for o in outcomes if o.state == s) for s in ("old", "new", "mixed")}
    return f"{len(outcomes)} runs, after recover(): {states}"


def failures(outcomes: list[Outcome], attribute: str) -> list[str]:
    return [f"{o.point}: {p}" for o in outcomes for p in getattr(o, attribute)]


@pytest.fixture(scope="module")
def checkpoint_sweep(
    tmp_path_factory: pytest.TempPathFactory, helper: Helper, material: CrashSets
) -> list[Outcome]:
    """One killed install per checkpoint install() passes through, plus one that completes."""
    root = tmp_path_factory.mktemp("checkpoints")
    dry = root / "complete"
    prepare(dry, material)
    helper.start(request(dry))
    assert helper.status() == 0
    steps = (dry / "steps").read_text().replace(str(dry), "<run>").splitlines()
    outcomes = []
    for number, step in enumerate(steps, start=1):
        run = root / f"kill{number}"
        node = prepare(run, material)
        helper.start(request(run, kill_at=number))
        outcome = Outcome(f"checkpoint {number} ({step})", helper.status())
        if outcome.status != -signal.SIGKILL:
            outcome.problems.append(f"not killed: exit status {outcome.status}")
        passed = (run / "steps").read_text().replace(str(run), "<run>").splitlines()
        if passed != steps[:number]:
            outcome.problems.append(f"passed {passed}, expected {steps[:number]}")
        outcomes.append(judge(node, material, outcome))
    outcomes.append(judge(Node.at(dry), material, Outcome("completed", 0)))
    return outcomes


def require_strace() -> str:
    """The strace binary; its absence fails the test (it is a test dependency, not optional)."""
    path = shutil.which("strace")
    if path is None:
        pytest.fail(
            "strace is not installed, and the system-call level crash test needs it: "
            "apt-get install strace (and add strace to DEBIAN_PACKAGES in the Makefile)",
            pytrace=False,
        )
    return path


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stream:
        return stream.read().rsplit(")", 1)[1].split()[0]


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as stream:
        for line in stream:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def traced_run(helper: Helper, strace: str, run: Path, options: list[str]) -> tuple[int, list[str]]:
    """One install in a stopped child, strace attached with ``options``; exit status and trace."""
    pid = helper.start(request(run, stop=True))
    wait_for(lambda: proc_state(pid) in "tT", "the install child to stop itself")
    log = run / "strace.log"
    tracer = subprocess.Popen(
        [strace, "-qq", "-p", str(pid), "-o", str(log), *options],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: tracer.poll() is not None or tracer_of(pid) == tracer.pid, "strace")
        if tracer.poll() is not None:
            os.kill(pid, signal.SIGKILL)
            helper.status()
            assert tracer.stderr is not None
            pytest.fail(f"strace could not attach: {tracer.stderr.read().decode()}", pytrace=False)
        os.kill(pid, signal.SIGCONT)
        status = helper.status()
        tracer.wait(timeout=BOUND)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    lines = log.read_text().splitlines()
    return status, lines


def syscalls(lines: list[str]) -> list[str]:
    """The system calls of a trace after the getppid() marker, in order."""
    names = [m.group(1) for line in lines if (m := re.match(r"(\w+)\(", line))]
    if "getppid" not in names:
        pytest.fail("strace did not see the install from its start (no getppid() marker)")
    return names[names.index("getppid") + 1 :]


def strace_sweep_run(root: Path, helper: Helper, material: CrashSets, strace: str) -> list[Outcome]:
    """A kill before each occurrence of each mutating system call of a complete install."""
    dry = root / "complete"
    prepare(dry, material)
    status, lines = traced_run(helper, strace, dry, [])
    assert status == 0, lines[-5:]
    calls = [name for name in syscalls(lines) if name in MUTATING]
    counts = {name: calls.count(name) for name in sorted(set(calls))}
    outcomes = []
    for name, count in counts.items():
        for k in range(1, count + 2):  # count + 1: the install must now complete unharmed
            run = root / f"{name}-{k}"
            node = prepare(run, material)
            options = ["-e", f"trace={name},getppid", "-e", f"inject={name}:signal=KILL:when={k}"]
            status, lines = traced_run(helper, strace, run, options)
            outcome = Outcome(
                f"before {name} #{k}" if k <= count else f"all {count} {name}", status
            )
            seen = syscalls(lines).count(name)
            if k <= count and (status != -signal.SIGKILL or seen != k):
                outcome.problems.append(
                    f"expected a kill at {name} #{k}: status {status}, saw {seen}"
                )
            if k > count and status != 0:
                outcome.problems.append(f"expected completion, got status {status}")
            outcomes.append(judge(node, material, outcome))
    outcomes.append(judge(Node.at(dry), material, Outcome("completed", 0)))
    return outcomes


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scratch directory on tmpfs when there is one: a process kill does not depend on the
    disk, and fsync there costs nothing (about 6 ms a call on this ext4, ~80 calls a run)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="kubecertd-crash-", dir="/dev/shm"))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module")
def strace_sweep(
    memory_dir: Path, helper: Helper, material: CrashSets
) -> Callable[[str], list[Outcome]]:
    """The strace sweep, run once per module the first time a test asks for it."""
    done: list[list[Outcome]] = []

    def sweep(strace: str) -> list[Outcome]:
        if not done:
            done.append(strace_sweep_run(memory_dir, helper, material, strace))
        return done[0]

    return sweep


def test_sigkill_at_every_checkpoint_leaves_old_or_new_set(checkpoint_sweep: list[Outcome]) -> None:
    """A SIGKILL at any checkpoint of install(), then recover(), leaves the complete old or new set."""
    print(f"checkpoint kills: {summary(checkpoint_sweep)}")
    assert failures(checkpoint_sweep, "problems") == []
    assert {o.state for o in checkpoint_sweep} == {"old", "new"}
    assert len(checkpoint_sweep) >= 9  # 3 written, backed up, intent, 3 renamed, done; + completed


def test_sigkill_at_every_checkpoint_leaves_backups_whole(checkpoint_sweep: list[Outcome]) -> None:
    """A SIGKILL at any checkpoint leaves no half-written file in the backup folders."""
    assert failures(checkpoint_sweep, "backup_problems") == []


def test_sigkill_before_every_mutating_syscall_leaves_old_or_new_set(
    strace_sweep: Callable[[str], list[Outcome]],
) -> None:
    """A SIGKILL before any file-changing system call of install(), then recover(), leaves the complete old or new set."""
    outcomes = strace_sweep(require_strace())
    kills = [o for o in outcomes if o.point.startswith("before ")]
    print(f"strace kills: {len(kills)} kill points; {summary(outcomes)}")
    for note in sorted({n for o in outcomes for n in o.notes}):
        print(f"  note: {note}")
    assert failures(outcomes, "problems") == []
    assert {o.state for o in outcomes} == {"old", "new"}
    assert len(kills) >= 60


def test_sigkill_before_every_mutating_syscall_leaves_backups_whole(
    strace_sweep: Callable[[str], list[Outcome]],
) -> None:
    """A SIGKILL at any system call leaves no half-written file in the backup folders."""
    outcomes = strace_sweep(require_strace())
    assert failures(outcomes, "backup_problems") == []
