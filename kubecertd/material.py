"""The thin I/O step before diagnosis: what is on disk, read once, as plain data.

``read_material`` never raises for a file's state: a missing, unreadable or huge file
is recorded as such and judged by the pure ``diagnose``.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

# No certificate, bundle or key of a kubelet comes near this; anything larger is not one.
MAX_FILE_BYTES = 1 << 20


class FileState(NamedTuple):
    path: str
    data: bytes | None = None  # None when missing or unreadable
    missing: bool = False
    error: str | None = None  # why it could not be read (strerror), when it exists
    mode: int | None = None  # permission bits, when stat() worked
    uid: int | None = None
    too_large: bool = False


class Material(NamedTuple):
    ca: FileState
    cert: FileState
    key: FileState


def read_file(path: str) -> FileState:
    try:
        # O_NOFOLLOW is not used: ssl_dir entries are often symlinks into a config tree.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return FileState(path, missing=True)
        return _unreadable(path, exc)
    try:
        info = os.fstat(fd)
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return _unreadable(path, exc)
    finally:
        os.close(fd)
    return FileState(
        path,
        data=data[:MAX_FILE_BYTES],
        mode=info.st_mode & 0o7777,
        uid=info.st_uid,
        too_large=len(data) > MAX_FILE_BYTES,
    )


def _unreadable(path: str, exc: OSError) -> FileState:
    """A file that exists but cannot be read; its mode still matters to the diagnosis."""
    reason = exc.strerror or str(exc)
    try:
        info = os.stat(path)
    except OSError:
        return FileState(path, error=reason)
    return FileState(path, error=reason, mode=info.st_mode & 0o7777, uid=info.st_uid)


def read_material(ca: str, cert: str, key: str) -> Material:
    return Material(read_file(ca), read_file(cert), read_file(key))
