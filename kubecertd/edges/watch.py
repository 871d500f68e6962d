"""Watching ssl_dir with inotify (pyinotify).  An event only means "diagnose again".

Kernel facts that shape this (inotify(7)):

- A watch is on an inode, not a path: when ssl_dir is deleted its watch ends
  (IN_DELETE_SELF, then IN_IGNORED) and a directory re-created under the same name is
  a new inode nobody watches.  So the parent is watched too, and the watches are
  re-armed whenever the parent reports a change of that name.
- Events carry no content and can coalesce or be lost (IN_Q_OVERFLOW when the queue
  fills).  Nothing here relies on one particular event: any relevant event (and an
  overflow) only marks "something changed", and the full diagnosis decides.
- ``truncate(2)`` gives IN_MODIFY without IN_CLOSE_WRITE, hence IN_MODIFY in the mask.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass
class Changes:
    """What one read of the inotify queue saw."""

    relevant: bool = False
    overflow: bool = False
    names: set[str] = field(default_factory=set)


class Watcher:
    """inotify watches on the directories holding the files and on their parents."""

    def __init__(self, directories: Sequence[str]) -> None:
        self.directories = sorted({os.path.abspath(d) for d in directories})
        self.parents = sorted({os.path.dirname(d) for d in self.directories})
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
            wd = self._watched.get(path)
            if wd is not None and self._manager.get_path(wd) == path:
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

    def _on_event(self, event: Any) -> None:
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            self._pending.overflow = self._pending.relevant = True
            return
        if event.mask & pyinotify.IN_IGNORED:
            self._watched = {p: wd for p, wd in self._watched.items() if wd != event.wd}
            self._pending.relevant = True
            return
        path = os.path.abspath(event.pathname)
        directory = os.path.dirname(path)
        if directory in self.parents and path not in self.directories:
            return  # a sibling of ssl_dir changed: not ours
        if is_own_name(os.path.basename(path)) or is_own_name(os.path.basename(directory)):
            return  # our temporaries and backups
        self._pending.relevant = True
        self._pending.names.add(path)
