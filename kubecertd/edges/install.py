"""Installing files so that a crash at any instant leaves a complete pair (SPEC step 5).

One ``rename(2)`` is atomic; two are not.  So an install goes:

1. every new file is written to ``.<name>.kubecertd-new`` beside its target,
   fchmod'ed, fchown'ed and fsync'ed;
2. the current files are copied to ``.kubecertd-backup/<UTC time>/``;
3. the intent (which temporaries go where) is written to ``state_dir`` with its own
   write-fsync-rename, and the directory fsync'ed: from here on the install is
   committed;
4. each temporary is renamed over its target and the directories fsync'ed;
5. the intent is removed.

``recover`` runs when the agent starts: with an intent present it finishes the
renames (every temporary it names was complete before the intent existed); without
one it deletes stray temporaries (the install never committed, the old files are
untouched).  Either way the result is the whole old set or the whole new set.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..errors import InstallError

TMP_SUFFIX = ".kubecertd-new"
BACKUP_DIR = ".kubecertd-backup"
INTENT = "install-intent.json"
PARTIAL = ".partial"  # a backup folder being written

Checkpoint = Callable[[str], None]


def _no_checkpoint(_step: str) -> None:
    return None


class Target(NamedTuple):
    path: str
    data: bytes  # for a symlink: its target
    mode: int  # 0o600 for keys, 0o644 for certificates
    link: bool = False  # a symlink (kubelet's store), replaced by a rename like a file


def temp_path(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}{TMP_SUFFIX}")


def is_own_name(name: str) -> bool:
    """Names the agent itself creates in ssl_dir (the watcher ignores their events)."""
    return name.endswith(TMP_SUFFIX) or name == BACKUP_DIR


def install(
    targets: Sequence[Target],
    state_dir: str,
    backup_root: str | None,
    keep_backups: int,
    now: dt.datetime,
    checkpoint: Checkpoint = _no_checkpoint,
) -> str | None:
    """Replace ``targets`` as one unit; returns the backup directory of the old files.

    An install interrupted earlier (an intent still in ``state_dir``) is finished
    first, so two installs never mix.
    """
    directories = sorted({os.path.dirname(t.path) for t in targets})
    recover(state_dir, directories)
    committed = False
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        for target in targets:
            if target.link:
                write_link(temp_path(target.path), os.fsdecode(target.data))
            else:
                write_file(temp_path(target.path), target.data, target.mode)
            checkpoint(f"written {target.path}")
        keep = backup_root is not None and keep_backups > 0
        backup = (
            _backup([t.path for t in targets], backup_root, now) if keep and backup_root else None
        )
        checkpoint("backed up")
        renames = [(temp_path(t.path), t.path) for t in targets]
        _write_intent(state_dir, renames)
        committed = True
        checkpoint("intent")
        _finish(renames, checkpoint)
        _remove_intent(state_dir)
        checkpoint("done")
    except OSError as exc:
        if not committed:  # the old files are untouched: drop what this install wrote
            for target in targets:
                with contextlib.suppress(OSError):
                    os.unlink(temp_path(target.path))
        # (a committed install is finished by the next install() or recover())
        raise InstallError(f"cannot install {exc.filename or 'files'}: {exc.strerror}") from exc
    if backup_root is not None:
        prune_backups(backup_root, keep_backups)
    return backup


def recover(state_dir: str, directories: Sequence[str]) -> str | None:
    """Finish or undo an interrupted install; returns what was done, or None."""
    intent = os.path.join(state_dir, INTENT)
    try:
        with open(intent, encoding="utf-8") as stream:
            renames = [(str(a), str(b)) for a, b in json.load(stream)["renames"]]
    except FileNotFoundError:
        removed = [path for path in _stray_temps([*directories, state_dir]) if _unlink(path)]
        return f"removed unfinished temporary files {', '.join(removed)}" if removed else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InstallError(f"{intent}: cannot read the install intent: {exc}") from exc
    try:
        _finish(renames, _no_checkpoint)
        _remove_intent(state_dir)
    except OSError as exc:
        raise InstallError(f"cannot finish the interrupted install: {exc}") from exc
    return f"finished an interrupted install of {', '.join(target for _, target in renames)}"


def write_file(path: str, data: bytes, mode: int, durable: bool = True) -> None:
    """Create or truncate ``path`` with ``mode`` from the first instant, owner root,
    fsync'ed unless ``durable`` is False."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; this is not
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except OSError as exc:  # os.write and os.fsync name no file: ENOSPC would say no path
        exc.filename = exc.filename or path
        raise
    finally:
        os.close(fd)


def write_link(path: str, target: str) -> None:
    """A symlink at ``path`` (replacing a stale temporary), owned by root as its folder."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.symlink(target, path)
    if os.geteuid() == 0:
        os.lchown(path, 0, 0)


def replace_file(path: str, data: bytes, mode: int) -> None:
    """Atomically replace one file: temporary, fsync, rename, fsync the directory."""
    tmp = temp_path(path)
    write_file(tmp, data, mode)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish(renames: Sequence[tuple[str, str]], checkpoint: Checkpoint) -> None:
    for tmp, target in renames:
        if os.path.lexists(tmp):  # already renamed when a crash interrupted an earlier run
            os.replace(tmp, target)
            checkpoint(f"renamed {target}")
    for directory in sorted({os.path.dirname(target) for _, target in renames}):
        fsync_dir(directory)


def _write_intent(state_dir: str, renames: Sequence[tuple[str, str]]) -> None:
    replace_file(os.path.join(state_dir, INTENT), json.dumps({"renames": renames}).encode(), 0o600)


def _remove_intent(state_dir: str) -> None:
    # No fsync: an intent that comes back after a power loss names temporaries that are
    # gone, so replaying it renames nothing.
    os.unlink(os.path.join(state_dir, INTENT))


def _stray_temps(directories: Sequence[str]) -> list[str]:
    found = []
    for directory in directories:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        found += [os.path.join(directory, n) for n in names if n.endswith(TMP_SUFFIX)]
    return sorted(found)


def _unlink(path: str) -> bool:
    """Best effort: False when the file is gone already or cannot be removed."""
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


def backup_name(now: dt.datetime) -> str:
    """``20261130T014455.123456Z``: sorts by time as text."""
    return now.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _backup(paths: Sequence[str], backup_root: str, now: dt.datetime) -> str | None:
    """Copy the current files into ``<root>/<UTC time>/``, which appears only when complete."""
    existing = [p for p in paths if os.path.isfile(p)]
    if not existing:
        return None
    os.makedirs(backup_root, mode=0o700, exist_ok=True)
    folder = os.path.join(backup_root, backup_name(now))
    partial = folder + PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial, mode=0o700)
    for path in existing:
        with open(path, "rb") as stream:
            data = stream.read()
        # Not fsync'ed: a backup is whole after any crash of the agent (it appears by a
        # rename), and only a power loss in the next seconds could empty it, while the
        # live pair it copies is intact; three fsyncs are a third of an install's time.
        mode = os.stat(path).st_mode & 0o777
        write_file(os.path.join(partial, os.path.basename(path)), data, mode, durable=False)
    os.replace(partial, folder)
    return folder


def list_backups(backup_root: str) -> list[str]:
    """Backup folders, oldest first."""
    try:
        names = sorted(n for n in os.listdir(backup_root) if n.endswith("Z"))
    except FileNotFoundError:
        return []
    return [os.path.join(backup_root, n) for n in names]


def prune_backups(backup_root: str, keep: int) -> None:
    """Keep the newest ``keep`` complete backups; drop the rest and any partial one."""
    folders = list_backups(backup_root)
    for folder in folders[: max(0, len(folders) - keep)]:
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(backup_root):
            if name.endswith(PARTIAL):
                shutil.rmtree(os.path.join(backup_root, name), ignore_errors=True)


def prune_store(store: str, keep: int) -> list[str]:
    """Keep the ``keep`` newest timestamped files of kubelet's store besides the one its
    symlink points at; remove the older ones (kubelet itself never does).  Best effort."""
    from ..layout import STORE_CURRENT, is_store_file  # noqa: PLC0415

    current = os.path.realpath(os.path.join(store, STORE_CURRENT))
    try:
        names = sorted(n for n in os.listdir(store) if is_store_file(n))
    except OSError:
        return []
    older = [
        os.path.join(store, n) for n in names if os.path.realpath(os.path.join(store, n)) != current
    ]
    removed = [path for path in older[: max(0, len(older) - keep)] if _unlink(path)]
    return removed
