"""Is the clock synchronized: timedated over a real D-Bus, else adjtimex(2) (kubecertd.edges.clock).

The D-Bus tests run a private ``dbus-daemon`` and a small org.freedesktop.timedate1
stand-in on it (jeepney, in a thread), so the request, the name lookup and the error for
a missing service are the real bus's.
"""

from __future__ import annotations

import contextlib
import selectors
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

from kubecertd.edges.clock import (
    MAX_ERROR_SYNCED_US,
    STA_UNSYNC,
    TIMEDATE,
    TIMEDATE_PATH,
    ClockState,
    clock_state,
    judge_adjtimex,
)

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
{policy}
  </policy>
</busconfig>
"""
OPEN_POLICY = """
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
"""
# Connections are let in but no reply is ever delivered, not even the bus's own answer
# to Hello: a client that waits without a limit waits forever.
MUTE_POLICY = """
    <allow user="*"/>
    <allow send_type="method_call"/>
"""


# --- adjtimex -----------------------------------------------------------------------------


def test_kernel_answers_when_there_is_no_bus(tmp_path: Path) -> None:
    """Without a bus the answer is the kernel's, read for real, and the source says so and why."""
    state = clock_state(bus_address=f"unix:path={tmp_path}/no-bus")
    assert isinstance(state.synchronized, bool)
    assert state.source.startswith("adjtimex(2): maximum error ")
    assert f"timedated not used: cannot reach unix:path={tmp_path}/no-bus" in state.source


@pytest.mark.parametrize(
    ("returned", "maxerror", "status", "synchronized", "words"),
    [
        pytest.param(0, 12_000, 0x2001, True, "adjtimex(2): maximum error 0.012 s, under timedated's 16 s", id="disciplined"),
        pytest.param(0, MAX_ERROR_SYNCED_US - 1, 0, True, "adjtimex(2): maximum error 16 s, under timedated's 16 s", id="just-under-16s"),
        pytest.param(5, MAX_ERROR_SYNCED_US, STA_UNSYNC, False, "adjtimex(2): maximum error 16 s, not under timedated's 16 s, STA_UNSYNC set", id="never-synchronized"),
        pytest.param(0, MAX_ERROR_SYNCED_US, 0, False, "adjtimex(2): maximum error 16 s, not under timedated's 16 s", id="at-16s"),
        # chronyd with rtcsync off keeps STA_UNSYNC set on a synchronized clock; systemd
        # ignores the flag on purpose
        pytest.param(5, 3_000, STA_UNSYNC, True, "adjtimex(2): maximum error 0.003 s, under timedated's 16 s, STA_UNSYNC set", id="unsync-flag-ignored"),
        pytest.param(-1, 0, 0, None, "could not tell: adjtimex(2) failed (Operation not permitted)", id="failed"),
    ],
)  # fmt: skip
def test_judge_adjtimex_is_systemds_rule(
    returned: int, maxerror: int, status: int, synchronized: bool | None, words: str
) -> None:
    """Synchronized means a maximum error under 16 s, as systemd's ntp_synced() decides."""
    assert judge_adjtimex(returned, maxerror, status, error=1) == (synchronized, words)


# --- a real bus ---------------------------------------------------------------------------


@contextlib.contextmanager
def running_bus(folder: Path, policy: str) -> Iterator[str]:
    """A private dbus-daemon with a system-type config and ``policy``; its address."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.skip("dbus-daemon is not installed")
    config = folder / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=folder / "socket", policy=policy))
    process = subprocess.Popen(
        [daemon, f"--config-file={config}", "--nofork", "--nopidfile", "--print-address"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:  # the address, once it listens
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=10):
                pytest.fail("dbus-daemon printed no address within 10 s")
        address = process.stdout.readline().strip()
        assert address.startswith("unix:path="), address
        yield address
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bus that lets everyone own names and call everyone."""
    with running_bus(tmp_path_factory.mktemp("bus"), OPEN_POLICY) as address:
        yield address


class Timedated:
    """org.freedesktop.timedate1 answering Properties.Get for NTPSynchronized."""

    def __init__(self, address: str, synchronized: bool) -> None:
        self.synchronized = synchronized
        self.conn: DBusConnection = open_dbus_connection(bus=address)
        reply = self.conn.send_and_get_reply(message_bus.RequestName(TIMEDATE), timeout=5)
        assert reply.body == (1,), reply.body  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
        self.stop = threading.Event()
        self.asked = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                message = self.conn.receive(timeout=0.05)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = message.header.fields
            if message.header.message_type != MessageType.method_call:
                continue
            if (
                fields.get(HeaderFields.path) == TIMEDATE_PATH
                and fields.get(HeaderFields.member) == "Get"
                and message.body == (TIMEDATE, "NTPSynchronized")
            ):
                self.asked += 1
                self.conn.send(new_method_return(message, "v", (("b", self.synchronized),)))
            else:
                self.conn.send(new_error(message, "org.freedesktop.DBus.Error.UnknownMethod"))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()
        self.conn.close()


@contextlib.contextmanager
def timedated(address: str, synchronized: bool) -> Iterator[Timedated]:
    service = Timedated(address, synchronized)
    try:
        yield service
    finally:
        service.close()


@pytest.mark.parametrize("synchronized", [True, False], ids=["synchronized", "unsynchronized"])
def test_timedated_answers(bus: str, synchronized: bool) -> None:
    """NTPSynchronized from timedate1 on the bus is the answer, and the source names it."""
    with timedated(bus, synchronized) as service:
        state = clock_state(bus_address=bus)
    assert state == ClockState(synchronized, "NTPSynchronized from org.freedesktop.timedate1")
    assert service.asked == 1


def test_without_timedated_the_kernel_answers_and_says_why(bus: str) -> None:
    """A bus without timedate1: the real bus's ServiceUnknown, then adjtimex(2), both named."""
    with timedated(bus, True):
        assert clock_state(bus_address=bus).synchronized is True
    state = clock_state(bus_address=bus)  # the stand-in has left the bus
    assert isinstance(state.synchronized, bool)
    assert state.source.startswith("adjtimex(2): maximum error ")
    assert state.source.endswith(
        f"timedated not used: {TIMEDATE} is not on {bus} (org.freedesktop.DBus.Error.ServiceUnknown)"
    )


def test_timedated_that_does_not_answer_in_time(bus: str) -> None:
    """A timedate1 that holds its name but never answers costs at most the timeout."""
    conn = open_dbus_connection(bus=bus)
    try:
        conn.send_and_get_reply(message_bus.RequestName(TIMEDATE), timeout=5)
        state = clock_state(bus_address=bus, timeout=0.3)
    finally:
        conn.close()
    assert state.source.endswith(
        f"timedated not used: {TIMEDATE} did not answer on {bus} within 0.3s"
    )


def test_a_bus_that_never_answers_costs_at_most_the_timeout(tmp_path: Path) -> None:
    """Even the bus's answer to Hello withheld: the kernel answers once the timeout is up."""
    with running_bus(tmp_path, MUTE_POLICY) as address:
        started = time.monotonic()
        state = clock_state(bus_address=address, timeout=0.3)
        took = time.monotonic() - started
    assert took < 5
    assert state.source.startswith("adjtimex(2): maximum error ")
    assert state.source.endswith(
        f"timedated not used: {TIMEDATE} did not answer on {address} within 0.3s"
    )
