"""Accepting connections: the caps per worker and per address, and the throttled log.

Each worker accepts on the shared listening socket itself (``server.Server``):

- a connection over ``[limits] max_connections`` or ``max_connections_per_address``
  (counted in this worker, an IPv6 client by its /64) is closed at once with a reset,
  before any TLS work; the cap is also kept below the worker's RLIMIT_NOFILE, so
  ``accept()`` never meets EMFILE from connections we hold;
- the TLS handshake must finish within ``handshake_timeout`` (from accept), and the
  first request's line and headers must arrive within ``header_timeout`` after it;
- nothing logs a traceback: refusals and accept errors are one line per kind per
  ``LOG_INTERVAL``, counted in the metrics.

The pure pieces live here; the loop that uses them is ``kubecertd.signer.server``.
"""

from __future__ import annotations

import errno
import ipaddress
import resource
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from .config import Limits

# Descriptors a worker keeps for itself: stdio, the listening socket, epoll, the
# wake-up pipe, SQLite and its -wal/-shm, PostgreSQL, metrics files, the journal, urandom.
# An idle worker holds about 20 (ls /proc/PID/fd); the rest is headroom.
FD_RESERVE = 64
ACCEPT_BATCH = 32  # accept()s per wake-up, so that one worker does not take a whole burst
ACCEPT_PAUSE = 1.0  # seconds without accept() after EMFILE/ENFILE/ENOBUFS/ENOMEM, as asyncio
LOG_INTERVAL = 10.0  # seconds between two log lines of one kind
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, leaves no TIME_WAIT


class Caps(NamedTuple):
    """How many connections one worker holds: in all, and from one address."""

    connections: int
    per_address: int


def connection_caps(limits: Limits, nofile: int) -> Caps:
    """Pure: ``[limits]`` capped by what a soft RLIMIT_NOFILE of ``nofile`` leaves room for."""
    if nofile < 0:  # RLIM_INFINITY
        nofile = sys.maxsize
    connections = max(1, min(limits.max_connections, nofile - FD_RESERVE))
    return Caps(connections, min(limits.max_connections_per_address, connections))


def refusal(open_total: int, open_from_address: int, caps: Caps) -> str | None:
    """Pure: the cap a new connection would exceed (its metric reason), or None to accept."""
    if open_total >= caps.connections:
        return "max-connections"
    if open_from_address >= caps.per_address:
        return "max-connections-per-address"
    return None


def refusal_message(reason: str, key: str, caps: Caps, limits: Limits) -> str:
    """The log line for a refused connection: which cap, and which setting sets it."""
    if reason == "max-connections-per-address":
        return (
            f"refused a connection from {key}: it has {caps.per_address} open in this worker "
            f"([limits] max_connections_per_address = {limits.max_connections_per_address})"
        )
    return (
        f"refused a connection: {caps.connections} open in this worker "
        f"({max_connections_note(limits, caps)})"
    )


def max_connections_note(limits: Limits, caps: Caps) -> str:
    """``[limits] max_connections = N``, and whether the file limit lowered it."""
    note = f"[limits] max_connections = {limits.max_connections}"
    if caps.connections < limits.max_connections:
        note += (
            f", lowered to {caps.connections} by RLIMIT_NOFILE {soft_nofile()}: raise LimitNOFILE="
        )
    return note


def address_key(host: str) -> str:
    """What the per-address cap counts by: the IPv4 address, or an IPv6 client's /64."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def soft_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ThrottledLog:
    """At most one stderr line per kind of event per interval; the rest are counted.

    The next line of that kind says how many were left out, so a flood costs the
    journal one line every ``interval`` seconds and no information about its size.
    """

    def __init__(
        self,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], object] | None = None,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self._last: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def __call__(self, kind: str, message: str) -> None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        more = f" ({skipped} more like it since the last such line)" if skipped else ""
        self.write(f"kubecertd-signer: {message}{more}")
