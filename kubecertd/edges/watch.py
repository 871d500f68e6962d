"""Watching ssl_dir with inotify (pyinotify).  An event only means "diagnose again".

Kernel facts that shape this (inotify(7)):

- A watch is on an inode, not a path: when ssl_dir is deleted its watch ends
  (IN_DELETE_SELF, then IN_IGNORED) and a directory re-created under the same name is
  a new inode nobody watches; a directory moved away keeps its watch under its new
  name.  So every ancestor is watched too (for entries on the path only), watches of
  directories that moved away are dropped, and the watches are re-armed whenever an
  ancestor reports a change on the path.
- Events carry no content and can coalesce or be lost (IN_Q_OVERFLOW when the queue
  fills).  Nothing here relies on one particular event: any relevant event (and an
  overflow) only marks "something changed", and the full diagnosis decides.
- ``truncate(2)`` gives IN_MODIFY without IN_CLOSE_WRITE, hence IN_MODIFY in the mask.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import pyinotify

from .install import is_own_name

DIR_MASK = (
    pyinotify.IN_CREATE
    | pyinotify.IN_DELETE
    | pyinotify.IN_MOVED_FROM
    | pyinotify.IN_MOVED_TO
    | pyinotify.IN_CLOSE_WRITE
    | pyinotify.IN_ATTRIB
    | pyinotify.IN_MODIFY
    | pyinotify.IN_DELETE_SELF
    | pyinotify.IN_MOVE_SELF
)
PARENT_MASK = (
    pyinotify.IN_CREATE | pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM | pyinotify.IN_MOVED_TO
)

# pyinotify logs every failed add_watch at WARNING on stderr; we report state ourselves.
logging.getLogger("pyinotify").setLevel(logging.CRITICAL)


class Changes:
    """What one read of the inotify queue saw."""

    __slots__ = ("names", "overflow", "relevant")

    def __init__(self, relevant: bool = False, overflow: bool = False, names: Iterable[str] = ()):
        self.relevant = relevant
        self.overflow = overflow
        self.names = set(names)

    def __repr__(self) -> str:
        return f"Changes(relevant={self.relevant}, overflow={self.overflow}, names={self.names})"


class Watcher:
    """inotify watches on the directories holding the files and on their parents."""

    def __init__(self, directories: Sequence[str]) -> None:
        self.directories = sorted({os.path.abspath(d) for d in directories})
        self.parents = sorted(
            {a for d in self.directories for a in _ancestors(d)} - set(self.directories)
        )
        self._manager = pyinotify.WatchManager()
        self._notifier = pyinotify.Notifier(self._manager, default_proc_fun=self._on_event)
        self._pending = Changes()
        self._watched: dict[str, int] = {}
        self.rearm()

    def fileno(self) -> int:
        return int(self._manager.get_fd())

    def rearm(self) -> None:
        """(Re)add a watch for every directory that exists now and is not watched."""
        for path, mask in [(p, PARENT_MASK) for p in self.parents] + [
            (d, DIR_MASK) for d in self.directories
        ]:
            if path in self._watched:
                continue
            if os.path.isdir(path):
                added = self._manager.add_watch(path, mask, quiet=True)
                if added.get(path, -1) >= 0:
                    self._watched[path] = added[path]

    @property
    def watching(self) -> list[str]:
        return sorted(self._watched)

    def read(self) -> Changes:
        """Drain the queue (call when ``fileno()`` is readable)."""
        self._notifier.read_events()
        self._notifier.process_events()
        changes, self._pending = self._pending, Changes()
        if changes.relevant:
            self.rearm()
        return changes

    def close(self) -> None:
        self._notifier.stop()

    def _forget(self, wd: int) -> None:
        for path, watched in list(self._watched.items()):
            if watched == wd:
                del self._watched[path]
                self._manager.rm_watch(wd, quiet=True)

    def _on_event(self, event: Any) -> None:
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            self._pending.overflow = self._pending.relevant = True
            return
        if event.mask & (pyinotify.IN_IGNORED | pyinotify.IN_MOVE_SELF):
            # Gone, or moved away (its watch would follow it under the new name).
            self._forget(event.wd)
            self._pending.relevant = True
            return
        path = os.path.abspath(event.pathname)
        directory = os.path.dirname(path)
        if directory in self.parents and path not in self.parents and path not in self.directories:
            return  # an entry beside the path (a sibling of ssl_dir, another file in /etc)
        if is_own_name(os.path.basename(path)) or is_own_name(os.path.basename(directory)):
            return  # our temporaries and backups
        self._pending.relevant = True
        self._pending.names.add(path)


def _ancestors(path: str) -> list[str]:
    """``/etc/kubernetes/ssl`` -> ``["/etc/kubernetes", "/etc", "/"]``."""
    found = []
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        found.append(path)
    return found
