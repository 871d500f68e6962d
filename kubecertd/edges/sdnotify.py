"""sd_notify(3) for both daemons: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

Does nothing without ``$NOTIFY_SOCKET`` (not started by systemd, or in tests), so
callers never check.
"""

from __future__ import annotations

import os


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, ``"STATUS=..."``) to systemd; False when not under it."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    from systemd import daemon  # type: ignore[attr-defined]  # noqa: PLC0415

    return bool(daemon.notify("\n".join(states)))


def watchdog_interval() -> float | None:
    """Half of ``WatchdogSec=`` in seconds (how often to ping), or None when unset."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
