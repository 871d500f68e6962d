"""Is the system clock synchronized?  Asked as ``timedatectl`` asks, read as systemd reads it.

1. systemd-timedated's ``NTPSynchronized`` property (org.freedesktop.timedate1(5)) over
   the system bus with jeepney, as ``edges.units`` talks to systemd.  timedated is
   bus-activated, so a real node answers even when it is not running.
2. Without timedated (not installed, no bus, no answer): the kernel's own answer,
   adjtimex(2) with no modes (read only, no privilege needed), judged exactly as
   timedated judges it.  systemd's ``ntp_synced()`` (src/timedate/timedated.c today,
   src/basic/time-util.c in earlier releases) calls the clock synchronized
   when adjtimex succeeds and the maximum error is under 16 s, and ignores STA_UNSYNC on
   purpose: "it may have been set to prevent the kernel from touching the RTC" (chronyd
   does that).  The kernel itself caps the maximum error at 16 s (NTP_PHASE_LIMIT) and
   sets STA_UNSYNC when nothing has disciplined the clock for a while, so on a clock that
   was never synchronized both say the same.  (Older systemd checked STA_UNSYNC alone.)

``clock_state`` never raises: when neither answers, ``synchronized`` is None.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import threading

TIMEDATE = "org.freedesktop.timedate1"
TIMEDATE_PATH = "/org/freedesktop/timedate1"

# systemd's ntp_synced(): maxerror (microseconds) below this is synchronized.
MAX_ERROR_SYNCED_US = 16_000_000
STA_UNSYNC = 0x0040  # <linux/timex.h>


class ClockState(NamedTuple):
    synchronized: bool | None  # None: could not tell
    source: str  # what said so, for --check and the journal


def clock_state(bus_address: str | None = None, timeout: float = 2.0) -> ClockState:
    """timedated's ``NTPSynchronized``, else the kernel's adjtimex(2) judged as timedated does.

    ``bus_address`` is a D-Bus address (``unix:path=…``); None is the system bus.
    """
    synchronized, why = _ask_timedated(bus_address or "SYSTEM", timeout)
    if synchronized is not None:
        return ClockState(synchronized, f"NTPSynchronized from {TIMEDATE}")
    return _ask_kernel(f"timedated not used: {why}")


def _ask_timedated(bus: str, timeout: float) -> tuple[bool | None, str]:
    """(NTPSynchronized, "") or (None, why not), within ``timeout`` seconds in all."""
    try:
        from jeepney import DBusAddress, Properties  # noqa: PLC0415 - not on every path
        from jeepney.bus import get_bus  # noqa: PLC0415
        from jeepney.io.blocking import DBusConnection, prep_socket  # noqa: PLC0415
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg  # noqa: PLC0415
    except ImportError as exc:
        return None, f"jeepney cannot be imported ({exc})"
    import threading  # noqa: PLC0415 - only when timedated is asked

    where = "the system bus" if bus == "SYSTEM" else bus
    late = f"{TIMEDATE} did not answer on {where} within {timeout:g}s"
    deadline = time.monotonic() + timeout
    try:
        sock = prep_socket(get_bus(bus), timeout=timeout)  # connect and authenticate, bounded
    except TimeoutError:
        return None, late
    except (OSError, KeyError, RuntimeError, ValueError, StopIteration) as exc:
        # KeyError, RuntimeError, ValueError, StopIteration: jeepney on a bad address
        return None, f"cannot reach {where} ({_one_line(exc)})"
    # jeepney waits for the bus's answer to Hello without a time limit; a bus that never
    # answers it (a reply its policy refuses to deliver does that) would hang the
    # diagnosis, so the socket is shut down when the time is up, which ends any wait.
    expired = threading.Event()
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _expire, (sock, expired))
    timer.daemon = True
    timer.start()
    try:
        with DBusConnection(sock) as conn:
            message = Properties(DBusAddress(TIMEDATE_PATH, TIMEDATE, TIMEDATE)).get(
                "NTPSynchronized"
            )
            left = max(0.001, deadline - time.monotonic())
            ((signature, value),) = unwrap_msg(conn.send_and_get_reply(message, timeout=left))
    except DBusErrorResponse as exc:
        name = str(exc.name or "an error")
        if name.endswith((".ServiceUnknown", ".NameHasNoOwner")):
            return None, f"{TIMEDATE} is not on {where} ({name})"
        return None, f"{TIMEDATE} on {where} answered {name}"
    except TimeoutError:
        return None, late
    except (OSError, ValueError) as exc:  # ValueError: an answer of another shape
        return None, late if expired.is_set() else f"{where} failed ({_one_line(exc)})"
    finally:
        timer.cancel()
        sock.close()
    if signature != "b":
        return None, f"{TIMEDATE} answered NTPSynchronized of type {signature!r}"
    return bool(value), ""


def _expire(sock: socket.socket, expired: threading.Event) -> None:
    expired.set()
    with contextlib.suppress(OSError):  # already closed: the answer came in time
        sock.shutdown(socket.SHUT_RDWR)


def _ask_kernel(why_not_timedated: str) -> ClockState:
    try:
        returned, maxerror, status, error = _adjtimex()
    except (ImportError, OSError, AttributeError) as exc:  # no libc, no adjtimex symbol
        return ClockState(
            None, f"could not tell: adjtimex(2) unavailable ({exc}); {why_not_timedated}"
        )
    synchronized, judged = judge_adjtimex(returned, maxerror, status, error)
    return ClockState(synchronized, f"{judged}; {why_not_timedated}")


def judge_adjtimex(
    returned: int, maxerror: int, status: int, error: int = 0
) -> tuple[bool | None, str]:
    """systemd's ``ntp_synced()`` on adjtimex's answer, and the words for it (pure)."""
    if returned < 0:
        return None, f"could not tell: adjtimex(2) failed ({os.strerror(error)})"
    synchronized = maxerror < MAX_ERROR_SYNCED_US
    judged = "under" if synchronized else "not under"
    flag = ", STA_UNSYNC set" if status & STA_UNSYNC else ""
    return (
        synchronized,
        f"adjtimex(2): maximum error {maxerror / 1e6:g} s, {judged} timedated's 16 s{flag}",
    )


def _adjtimex() -> tuple[int, int, int, int]:
    """adjtimex(2) with modes 0: (return value, maxerror, status, errno)."""
    import ctypes  # noqa: PLC0415 - only without timedated

    timex = _timex_type()()
    libc = ctypes.CDLL(None, use_errno=True)  # the process's libc; find_library forks
    returned = int(libc.adjtimex(ctypes.byref(timex)))
    return returned, int(timex.maxerror), int(timex.status), ctypes.get_errno()


def _timex_type() -> Any:
    """glibc's ``struct timex`` (<sys/timex.h>) for the native long size."""
    import ctypes  # noqa: PLC0415

    long = ctypes.c_long

    class Timeval(ctypes.Structure):
        _fields_ = (("tv_sec", long), ("tv_usec", long))

    class Timex(ctypes.Structure):
        _fields_ = (
            ("modes", ctypes.c_uint),
            ("offset", long),
            ("freq", long),
            ("maxerror", long),
            ("esterror", long),
            ("status", ctypes.c_int),
            ("constant", long),
            ("precision", long),
            ("tolerance", long),
            ("time", Timeval),
            ("tick", long),
            ("ppsfreq", long),
            ("jitter", long),
            ("shift", ctypes.c_int),
            ("stabil", long),
            ("jitcnt", long),
            ("calcnt", long),
            ("errcnt", long),
            ("stbcnt", long),
            ("tai", ctypes.c_int),
            ("_reserved", ctypes.c_int * 11),  # the kernel may write into these
        )

    return Timex


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
