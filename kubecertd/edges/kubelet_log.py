"""kubelet's recent journal lines that report a credential failure (systemd-python).

kubelet logs to stderr (klog), which systemd hands to journald as a stream, so each line
is an entry of its own with ``_SYSTEMD_UNIT`` naming the unit (from the writer's cgroup,
or the unit name systemd puts in the stream's header).  For k3s and RKE2 the embedded
kubelet logs through the agent's unit.  The journal is read backwards from its tail, so the cost is bounded by
``limit`` whatever its size; ``kubecertd.kubelet.match_line`` decides which lines count.
"""

from __future__ import annotations

import os
from typing import Any

from ..kubelet import KubeletLine, match_line

JOURNAL_DIR = "/run/systemd/journal"


def recent_lines(unit: str, since: float, limit: int = 200) -> list[KubeletLine]:
    """The failure lines ``unit`` logged after ``since`` (a Unix time), oldest first.

    At most ``limit`` entries of the unit are read, newest first.  No journal (no
    journald, systemd-python missing, no permission to read it) gives [], never an error.
    """
    if limit <= 0 or not os.path.isdir(JOURNAL_DIR):
        return []
    try:
        from systemd import journal  # type: ignore[attr-defined]  # noqa: PLC0415 - not on the --check path
    except ImportError:
        return []
    after_us = int(since * 1_000_000)
    found: list[KubeletLine] = []
    try:
        with journal.Reader(converters=_CONVERTERS) as reader:
            reader.add_match(_SYSTEMD_UNIT=unit)
            reader.seek_tail()
            for _ in range(limit):
                entry = reader.get_previous()
                if not entry or entry["__REALTIME_TIMESTAMP"] <= after_us:
                    break
                line = match_line(_text(entry.get("MESSAGE")))
                if line is not None:
                    found.append(line)
    except (OSError, ValueError, KeyError, TypeError):
        # OSError: journal files unreadable or rotated away; the rest: an entry of a shape
        # systemd-python does not promise
        return []
    found.reverse()
    return found


def _text(message: Any) -> str:
    if isinstance(message, bytes):  # not UTF-8: kept as bytes by the reader
        return message.decode("utf-8", "replace")
    if isinstance(message, list):  # the field given twice
        return " ".join(_text(part) for part in message)
    return message if isinstance(message, str) else ""


# The raw microseconds instead of a datetime; messages decoded as the default does.
_CONVERTERS = {"__REALTIME_TIMESTAMP": int}
