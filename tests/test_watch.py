"""Watching ssl_dir with real inotify (SPEC "Watching"): what counts as a change and what not.

inotify queues an event while the system call that causes it runs, so once an
operation has returned its events are already readable; the tests still wait with
select() and a bound rather than read blindly.
"""

from __future__ import annotations

import os
import select
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyinotify
import pytest

from kubecertd.edges.install import BACKUP_DIR, Target, backup_name, install, temp_path
from kubecertd.edges.watch import Changes, Watcher

from factories import NOW

BOUND = 5.0  # seconds to wait for an event that must come
NAMES = ("ca.pem", "worker.pem", "worker-key.pem")


@dataclass
class Layout:
    """<tmp>/kubernetes/ssl holding the three files, and a directory outside the watched tree."""

    parent: Path
    ssl: Path
    outside: Path


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """A kubelet ssl directory with its three files, its parent, and an unwatched directory."""
    parent = tmp_path / "kubernetes"
    ssl = parent / "ssl"
    ssl.mkdir(parents=True)
    for name in NAMES:
        (ssl / name).write_bytes(b"contents of " + name.encode())
    outside = tmp_path / "outside"
    outside.mkdir()
    return Layout(parent, ssl, outside)


@pytest.fixture
def watcher(layout: Layout) -> Iterator[Watcher]:
    """A Watcher on the ssl directory (and so its parent), closed after the test."""
    watching = Watcher([str(layout.ssl)])
    try:
        yield watching
    finally:
        watching.close()


def readable(watcher: Watcher, bound: float) -> bool:
    return bool(select.select([watcher.fileno()], [], [], bound)[0])


def next_changes(watcher: Watcher) -> Changes:
    """The changes of the next batch of events, waiting at most BOUND seconds for it."""
    assert readable(watcher, BOUND), f"no inotify event within {BOUND}s"
    return watcher.read()


def quiet_changes(watcher: Watcher) -> Changes:
    """Everything queued now (events are queued synchronously), or nothing if the queue is empty."""
    return watcher.read() if readable(watcher, 0) else Changes()


def nothing(changes: Changes) -> bool:
    return not changes.relevant and not changes.overflow and not changes.names


def assert_drained(watcher: Watcher) -> None:
    assert not readable(watcher, 0), "events left in the queue"


# -- what is watched ----------------------------------------------------------------------------


def near(watcher: Watcher, expected: list[str]) -> bool:
    """The watches at or below the shallowest expected path (ancestors are watched too)."""
    top = os.path.dirname(min(expected, key=len))
    mine = [path for path in watcher.watching if path.startswith(top + os.sep)]
    return mine == sorted(expected)


def test_watches_ssl_dir_and_its_parent(watcher: Watcher, layout: Layout) -> None:
    """The ssl directory and its parent are both watched from the start."""
    assert near(watcher, sorted([str(layout.parent), str(layout.ssl)]))
    assert_drained(watcher)


def test_missing_ssl_dir_is_watched_once_created(tmp_path: Path) -> None:
    """Started before ssl_dir exists, the watcher arms it when the parent reports its creation."""
    parent = tmp_path / "kubernetes"
    parent.mkdir()
    watcher = Watcher([str(parent / "ssl")])
    try:
        assert near(watcher, [str(parent)])
        (parent / "ssl").mkdir()
        assert next_changes(watcher).relevant
        assert near(watcher, sorted([str(parent), str(parent / "ssl")]))
        (parent / "ssl" / "worker.pem").write_bytes(b"x")
        assert str(parent / "ssl" / "worker.pem") in next_changes(watcher).names
    finally:
        watcher.close()


# -- relevant changes -------------------------------------------------------------------------


def _create(layout: Layout) -> Path:
    (layout.ssl / "new.pem").write_bytes(b"new")
    return layout.ssl / "new.pem"


def _delete(layout: Layout) -> Path:
    (layout.ssl / "worker.pem").unlink()
    return layout.ssl / "worker.pem"


def _truncate(layout: Layout) -> Path:
    os.truncate(layout.ssl / "worker-key.pem", 10)  # IN_MODIFY only: no close-after-write
    return layout.ssl / "worker-key.pem"


def _chmod(layout: Layout) -> Path:
    os.chmod(layout.ssl / "worker-key.pem", 0o644)
    return layout.ssl / "worker-key.pem"


def _chown(layout: Layout) -> Path:
    os.chown(layout.ssl / "worker-key.pem", 1234, 1234)
    return layout.ssl / "worker-key.pem"


def _rewrite(layout: Layout) -> Path:
    with open(layout.ssl / "ca.pem", "r+b") as stream:
        stream.write(b"overwritten in place")
    return layout.ssl / "ca.pem"


def _rename_into(layout: Layout) -> Path:
    (layout.outside / "copied.pem").write_bytes(b"from another node")
    os.rename(layout.outside / "copied.pem", layout.ssl / "worker.pem")
    return layout.ssl / "worker.pem"


def _rename_out(layout: Layout) -> Path:
    os.rename(layout.ssl / "worker.pem", layout.outside / "worker.pem")
    return layout.ssl / "worker.pem"


def _rename_within(layout: Layout) -> Path:
    os.rename(layout.ssl / "worker.pem", layout.ssl / "worker.pem.bak")
    return layout.ssl / "worker.pem"


RELEVANT: dict[str, Callable[[Layout], Path]] = {
    "create": _create,
    "delete": _delete,
    "truncate": _truncate,
    "chmod": _chmod,
    "chown": _chown,
    "write-in-place": _rewrite,
    "rename-into": _rename_into,
    "rename-out": _rename_out,
    "rename-within": _rename_within,
}


@pytest.mark.parametrize("operation", RELEVANT.values(), ids=RELEVANT.keys())
def test_file_operation_is_a_relevant_change(
    watcher: Watcher, layout: Layout, operation: Callable[[Layout], Path]
) -> None:
    """Creating, deleting, truncating, chmod/chown, rewriting or renaming a file in ssl_dir is a change naming it."""
    path = operation(layout)
    changes = next_changes(watcher)
    assert changes.relevant
    assert not changes.overflow
    assert str(path) in changes.names
    assert_drained(watcher)


def test_own_install_reports_only_the_targets(
    watcher: Watcher, layout: Layout, tmp_path: Path
) -> None:
    """An install() shows up as changes of the three targets, never of its temporaries or backups."""
    targets = [Target(str(layout.ssl / name), b"new " + name.encode(), 0o644) for name in NAMES]
    install(targets, str(tmp_path / "state"), str(layout.ssl / BACKUP_DIR), 3, NOW)
    changes = next_changes(watcher)
    assert changes.relevant
    assert changes.names == {str(layout.ssl / name) for name in NAMES}


# -- ignored changes --------------------------------------------------------------------------


def test_own_temporary_is_ignored(watcher: Watcher, layout: Layout) -> None:
    """Creating, writing, chmodding and deleting .worker.pem.kubecertd-new is not a change."""
    temp = Path(temp_path(str(layout.ssl / "worker.pem")))
    temp.write_bytes(b"half a certificate")
    os.chmod(temp, 0o600)
    os.truncate(temp, 4)
    temp.unlink()
    assert readable(watcher, BOUND)  # the kernel did report them ...
    changes = watcher.read()  # ... and the watcher dropped them
    assert nothing(changes), changes
    assert_drained(watcher)


def test_backup_folder_is_ignored(watcher: Watcher, layout: Layout) -> None:
    """Creating .kubecertd-backup and writing a backup set into it is not a change."""
    folder = layout.ssl / BACKUP_DIR / backup_name(NOW)
    folder.mkdir(parents=True)
    for name in NAMES:
        (folder / name).write_bytes(b"old " + name.encode())
    shutil.rmtree(folder)
    assert nothing(quiet_changes(watcher))
    assert_drained(watcher)


def test_sibling_of_ssl_dir_is_ignored(watcher: Watcher, layout: Layout) -> None:
    """Files and directories appearing or vanishing beside ssl_dir in its parent are not a change."""
    (layout.parent / "manifests").mkdir()
    (layout.parent / "kubeconfig").write_bytes(b"apiVersion: v1\n")
    os.rename(layout.parent / "kubeconfig", layout.parent / "kubeconfig.old")
    (layout.parent / "kubeconfig.old").unlink()
    (layout.parent / "manifests").rmdir()
    assert readable(watcher, BOUND)
    assert nothing(watcher.read())
    assert_drained(watcher)


def test_ignored_events_do_not_hide_a_real_change(watcher: Watcher, layout: Layout) -> None:
    """A real change in the same batch as ignored ones is still reported, and only it is named."""
    Path(temp_path(str(layout.ssl / "worker.pem"))).write_bytes(b"temp")
    (layout.parent / "sibling").write_bytes(b"x")
    os.chmod(layout.ssl / "worker-key.pem", 0o640)
    changes = next_changes(watcher)
    assert changes.relevant
    assert changes.names == {str(layout.ssl / "worker-key.pem")}


# -- ssl_dir itself deleted, re-created or moved ------------------------------------------------


def test_deleted_and_recreated_ssl_dir_is_watched_again(watcher: Watcher, layout: Layout) -> None:
    """Deleting ssl_dir is a change; once re-created it is watched again and a new file in it is seen."""
    shutil.rmtree(layout.ssl)
    assert next_changes(watcher).relevant
    assert near(watcher, [str(layout.parent)])
    layout.ssl.mkdir()
    changes = next_changes(watcher)
    assert changes.relevant
    assert str(layout.ssl) in changes.names
    assert near(watcher, sorted([str(layout.parent), str(layout.ssl)]))
    (layout.ssl / "worker.pem").write_bytes(b"restored")
    changes = next_changes(watcher)
    assert changes.relevant
    assert str(layout.ssl / "worker.pem") in changes.names


def test_replaced_ssl_dir_is_watched_again(watcher: Watcher, layout: Layout) -> None:
    """ssl_dir moved aside and a new one put in its place: the new directory is watched."""
    os.rename(layout.ssl, layout.parent / "ssl.old")
    assert next_changes(watcher).relevant
    layout.ssl.mkdir()
    assert next_changes(watcher).relevant
    (layout.ssl / "worker.pem").write_bytes(b"restored")
    assert str(layout.ssl / "worker.pem") in next_changes(watcher).names


def test_ssl_dir_created_by_rename_is_watched(watcher: Watcher, layout: Layout) -> None:
    """A complete directory renamed into place as ssl_dir (a restore) is watched afterwards."""
    shutil.rmtree(layout.ssl)
    next_changes(watcher)
    staged = layout.parent / "ssl.staged"
    staged.mkdir()
    (staged / "worker.pem").write_bytes(b"restored")
    os.rename(staged, layout.ssl)
    assert next_changes(watcher).relevant
    assert str(layout.ssl) in watcher.watching
    (layout.ssl / "worker-key.pem").write_bytes(b"key")
    assert str(layout.ssl / "worker-key.pem") in next_changes(watcher).names


# -- queue overflow -------------------------------------------------------------------------------


def test_overflow_event_marks_overflow_and_relevant(watcher: Watcher, layout: Layout) -> None:
    """An IN_Q_OVERFLOW event (as pyinotify hands it over) makes the next read report overflow, once."""
    watcher._on_event(pyinotify.Event({"mask": pyinotify.IN_Q_OVERFLOW}))
    # read() must only be called when the descriptor is readable, so queue a real event too.
    Path(temp_path(str(layout.ssl / "worker.pem"))).write_bytes(b"ignored")
    changes = next_changes(watcher)
    assert changes.overflow
    assert changes.relevant
    os.chmod(layout.ssl / "ca.pem", 0o600)
    assert not next_changes(watcher).overflow


def test_real_queue_overflow_is_reported(watcher: Watcher, layout: Layout) -> None:
    """More events than fs.inotify.max_queued_events (read, never changed) give an overflow."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1 << 18:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to queue quickly")
    files = [layout.ssl / "ca.pem", layout.ssl / "worker.pem"]
    for i in range(limit + 100):  # alternating files: identical consecutive events coalesce
        os.chmod(files[i % 2], 0o600 | (i & 0o044))
    changes = next_changes(watcher)
    while readable(watcher, 0):
        later = watcher.read()
        changes.overflow |= later.overflow
    assert changes.overflow
    assert changes.relevant


# -- lifecycle ------------------------------------------------------------------------------------


def test_close_releases_the_inotify_descriptor(layout: Layout) -> None:
    """close() closes the inotify file descriptor."""
    watcher = Watcher([str(layout.ssl)])
    fd = watcher.fileno()
    os.fstat(fd)
    watcher.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


# -- known bugs -------------------------------------------------------------------------------------


def test_recreated_parent_and_ssl_dir_are_watched_again(watcher: Watcher, layout: Layout) -> None:
    """Deleting ssl_dir's parent too, then re-creating both: a new file in ssl_dir is still seen."""
    shutil.rmtree(layout.parent)
    assert next_changes(watcher).relevant
    layout.ssl.mkdir(parents=True)
    (layout.ssl / "worker.pem").write_bytes(b"re-provisioned")
    assert readable(watcher, 0.3), "nothing watches the re-created directories"


def test_moved_aside_ssl_dir_is_no_longer_watched(watcher: Watcher, layout: Layout) -> None:
    """After ssl_dir is renamed to ssl.old, changes inside ssl.old are not changes of ssl_dir."""
    os.rename(layout.ssl, layout.parent / "ssl.old")
    next_changes(watcher)
    assert near(watcher, [str(layout.parent)])
    (layout.parent / "ssl.old" / "worker.pem").write_bytes(b"old node's copy")
    assert nothing(quiet_changes(watcher))
