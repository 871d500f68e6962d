"""The tail of auditd's log, read for culprit records (issue 12, SPEC "Who did it").

Only the last ``limit_bytes`` are read, whatever the log's size: the records wanted are
minutes old, and auditd appends.  When auditd has rotated the log lately (``audit.log``
-> ``audit.log.1``, ``max_log_file_action = ROTATE``), the rest of the budget comes from
the tail of ``audit.log.1``, so an event just before the rotation is still found.
``kubecertd.audit_records`` turns the text into records.  A log that is missing,
unreadable or not a regular file gives [], never an error.
"""

from __future__ import annotations

import datetime as dt
import os
import stat

from ..audit_records import parse_log
from ..culprit import Culprit

LIMIT = 1 << 20  # bytes: a few thousand records, minutes to hours of a busy node's log


def recent_records(path: str, since: dt.datetime, limit_bytes: int = LIMIT) -> list[Culprit]:
    """The ``kubecertd`` records in the last ``limit_bytes`` of the log at ``path`` (and
    its rotated predecessor) from ``since`` on, oldest first."""
    current = _tail(path, limit_bytes)
    if current is None:
        return []
    data, whole = current
    if whole and len(data) < limit_bytes:  # the log is short: perhaps rotated lately
        earlier = _tail(f"{path}.1", limit_bytes - len(data))
        if earlier is not None:
            data = earlier[0] + b"\n" + data
    text = data.decode("utf-8", "replace")
    return [r for r in parse_log(text) if r.time >= since]


def _tail(path: str, limit: int) -> tuple[bytes, bool] | None:
    """The last whole lines within ``limit`` bytes of a regular file, and whether that is
    the whole file; None if it cannot be read.

    O_NONBLOCK so that a FIFO named by mistake cannot hang the daemon in open().
    """
    if limit <= 0:
        return b"", False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        start = max(0, info.st_size - limit)
        data = os.pread(fd, info.st_size - start, start)
    except OSError:
        return None
    finally:
        os.close(fd)
    if start > 0:  # the first line is cut: drop it
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    return data, start == 0
