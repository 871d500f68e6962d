#!/usr/bin/env python3
"""tools/node/fake-timedated — systemd-timedated's clock answer, for a node.

A real node keeps its clock with NTP and systemd-timedated says so
(``NTPSynchronized`` of org.freedesktop.timedate1, what ``timedatectl`` shows).  A test
node shares the host's clock, whose discipline the tests cannot choose (the real
timedated judges the host's adjtimex(2) state), so the node's bus gets this stand-in
instead, bus-activated as ``dbus-org.freedesktop.timedate1.service`` like the real one.

It owns org.freedesktop.timedate1 on the system bus and answers
``org.freedesktop.DBus.Properties.Get``/``GetAll`` of /org/freedesktop/timedate1:
``NTPSynchronized`` is true unless /run/fake-timedated/synchronized holds ``no`` (read
at every call, so a test can unsynchronize the clock); ``NTP`` and ``CanNTP`` are true,
``Timezone`` is UTC, ``LocalRTC`` false, ``TimeUSec``/``RTCTimeUSec`` the real time.
Setting anything is refused (``org.freedesktop.DBus.Error.AccessDenied``).  Every
answer is one line on stdout (the journal, under systemd).  Stdlib and the venv's
jeepney.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

NAME = "org.freedesktop.timedate1"
PATH = "/org/freedesktop/timedate1"
PROPERTIES = "org.freedesktop.DBus.Properties"
SWITCH = Path("/run/fake-timedated/synchronized")
DBUS_NAME_FLAG_DO_NOT_QUEUE = 4


def properties() -> dict[str, tuple[str, Any]]:
    """timedated's properties as (signature, value) now."""
    now = time.time_ns() // 1000
    try:
        synchronized = SWITCH.read_text().strip() != "no"
    except FileNotFoundError:
        synchronized = True
    return {
        "Timezone": ("s", "UTC"),
        "LocalRTC": ("b", False),
        "CanNTP": ("b", True),
        "NTP": ("b", True),
        "NTPSynchronized": ("b", synchronized),
        "TimeUSec": ("t", now),
        "RTCTimeUSec": ("t", now),
    }


def answer(msg: Any) -> Any:
    """The reply to one method call."""
    header = msg.header.fields
    interface, member = header.get(HeaderFields.interface), header.get(HeaderFields.member)
    if header.get(HeaderFields.path) != PATH or interface != PROPERTIES:
        return new_error(
            msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (f"{interface}.{member}",)
        )
    values = properties()
    if member == "Get":
        _interface, prop = msg.body
        if prop not in values:
            return new_error(msg, "org.freedesktop.DBus.Error.UnknownProperty", "s", (prop,))
        print(f"Get {prop} = {values[prop][1]}", flush=True)
        return new_method_return(msg, "v", (values[prop],))
    if member == "GetAll":
        print("GetAll", flush=True)
        return new_method_return(msg, "a{sv}", (values,))
    return new_error(
        msg, "org.freedesktop.DBus.Error.AccessDenied", "s", ("the clock is the host's",)
    )


def main() -> int:
    with open_dbus_connection(bus="SYSTEM") as conn:
        reply = conn.send_and_get_reply(message_bus.RequestName(NAME, DBUS_NAME_FLAG_DO_NOT_QUEUE))
        if reply.body != (1,):  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
            print(f"fake-timedated: cannot own {NAME}: {reply.body}", file=sys.stderr)
            return 1
        print(f"owning {NAME}", flush=True)
        while True:
            msg = conn.receive()
            if msg.header.message_type == MessageType.method_call:
                conn.send(answer(msg))


if __name__ == "__main__":
    sys.exit(main())
