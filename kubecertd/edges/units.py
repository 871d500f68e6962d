"""Restarting kubelet through systemd's D-Bus API with jeepney (SPEC step 6).

systemd's Manager interface (org.freedesktop.systemd1(5)): ``ResetFailedUnit`` clears
a start-limit hit by a kubelet that crash-looped without certificates, then
``RestartUnit(name, "replace")`` returns a job path; the job's ``JobRemoved`` signal
carries its result ("done", "failed", ...).  We subscribe to that signal *before*
asking for the restart so the answer cannot slip past us.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from ..errors import UnitError

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"


class UnitManager(Protocol):
    def restart(self, unit: str, timeout: float) -> str:
        """Reset-failed then restart ``unit``; the job result (``"done"`` on success)."""
        ...

    def active_state(self, unit: str) -> str: ...

    def main_pid(self, unit: str) -> int: ...


class DbusUnitManager:
    """The real thing: the system bus, one connection per call (calls are rare)."""

    def __init__(self, bus: str = "SYSTEM") -> None:
        self.bus = bus

    def restart(self, unit: str, timeout: float) -> str:
        from jeepney import DBusAddress, MatchRule, new_method_call  # noqa: PLC0415
        from jeepney.bus_messages import message_bus  # noqa: PLC0415

        manager = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD, interface=MANAGER)
        # The bus matches the well-known sender name; jeepney's local filter compares
        # header fields literally and signals carry systemd's unique name (":1.0").
        on_bus = MatchRule(
            type="signal", sender=SYSTEMD, interface=MANAGER, member="JobRemoved", path=MANAGER_PATH
        )
        rule = MatchRule(type="signal", interface=MANAGER, member="JobRemoved", path=MANAGER_PATH)
        with self._connect() as conn:
            self._call(conn, message_bus.AddMatch(on_bus), timeout)
            self._call(conn, new_method_call(manager, "Subscribe"), timeout)
            # Not loaded or not failed is fine: the reset is only there for start limits.
            conn.send_and_get_reply(
                new_method_call(manager, "ResetFailedUnit", "s", (unit,)), timeout=timeout
            )
            deadline = time.monotonic() + timeout
            with conn.filter(rule, bufsize=64) as signals:
                (job,) = self._call(
                    conn, new_method_call(manager, "RestartUnit", "ss", (unit, "replace")), timeout
                )
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise UnitError(
                            f"{unit}: restart job {job} did not finish within {timeout:.0f}s"
                        )
                    try:
                        message = conn.recv_until_filtered(signals, timeout=left)
                    except TimeoutError:
                        continue
                    _id, path, _name, result = message.body
                    if path == job:
                        return str(result)

    def active_state(self, unit: str) -> str:
        return str(self._unit_property(unit, UNIT, "ActiveState"))

    def main_pid(self, unit: str) -> int:
        return int(self._unit_property(unit, SERVICE, "MainPID"))

    def _unit_property(self, unit: str, interface: str, name: str) -> Any:
        from jeepney import DBusAddress, Properties, new_method_call  # noqa: PLC0415

        manager = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD, interface=MANAGER)
        with self._connect() as conn:
            # LoadUnit (not GetUnit): answers for a unit that is not loaded right now too.
            (path,) = self._call(conn, new_method_call(manager, "LoadUnit", "s", (unit,)), 5.0)
            address = DBusAddress(path, bus_name=SYSTEMD, interface=interface)
            ((_signature, value),) = self._call(conn, Properties(address).get(name), 5.0)
            return value

    def _connect(self) -> Any:
        from jeepney.io.blocking import open_dbus_connection  # noqa: PLC0415

        try:
            return open_dbus_connection(bus=self.bus)
        except (OSError, KeyError) as exc:
            raise UnitError(f"cannot reach the {self.bus.lower()} D-Bus: {exc}") from exc

    @staticmethod
    def _call(conn: Any, message: Any, timeout: float) -> Any:
        from jeepney.low_level import HeaderFields  # noqa: PLC0415
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg  # noqa: PLC0415

        try:
            return unwrap_msg(conn.send_and_get_reply(message, timeout=timeout))
        except DBusErrorResponse as exc:
            member = message.header.fields.get(HeaderFields.member, "the call")
            raise UnitError(f"systemd refused {member}: {exc}") from exc
        except (TimeoutError, OSError) as exc:
            raise UnitError(f"systemd did not answer: {exc}") from exc
