"""What kubelet and the clock say about a diagnosis (SPEC "Living with kubelet").

``judge`` is pure: it adds ``clock-unsynced`` and ``rotation-managed`` to the findings
of ``diagnose()`` and quotes, under each finding, kubelet's newest journal line that
agrees with it.  ``observe`` is the shell around it: it asks the clock only when a
finding depends on the date, and reads kubelet's journal only when something is wrong,
so that a healthy ``kubecertd --check`` costs neither.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .diagnose import ERROR, Diagnosis, Finding
from .kubelet import CLOCK_CODES, Rotation, agreeing_line, clock_finding, rotation_finding
from .layout import Layout

if TYPE_CHECKING:
    from .edges.clock import ClockState
    from .kubelet import KubeletLine

LOOKBACK = 900.0  # seconds of kubelet's journal that may speak for a finding


def judge(
    diagnosis: Diagnosis,
    layout: Layout,
    clock: ClockState | None,
    lines: Sequence[KubeletLine] = (),
) -> Diagnosis:
    """The diagnosis with the clock's and kubelet's findings, and kubelet's lines quoted."""
    findings = list(diagnosis.findings)
    codes = [f.code for f in findings]
    path = layout.cert.describe()
    added: list[Finding | None] = [
        clock_finding(clock, codes, path) if clock is not None else None,
        rotation_finding(Rotation(layout.rotation, layout.rotation_from), diagnosis.healthy, path),
    ]
    findings += [f for f in added if f is not None]
    if lines:
        findings = [_quoted(f, lines) for f in findings]
    return diagnosis._replace(findings=tuple(findings))


def _quoted(finding: Finding, lines: Sequence[KubeletLine]) -> Finding:
    line = agreeing_line(finding.code, lines)
    return finding._replace(kubelet_line=line.line) if line is not None else finding


def observe(diagnosis: Diagnosis, layout: Layout, now: float | None = None) -> Diagnosis:
    """``judge`` with the clock (when a date matters) and kubelet's recent failure lines
    (when the diagnosis has an error)."""
    clock = None
    if any(f.code in CLOCK_CODES for f in diagnosis.findings):
        from .edges.clock import clock_state  # noqa: PLC0415 - D-Bus, only when dates matter

        clock = clock_state()
    lines: list[KubeletLine] = []
    if any(f.severity == ERROR for f in diagnosis.findings):
        from .edges.kubelet_log import recent_lines  # noqa: PLC0415 - the journal

        lines = recent_lines(layout.unit, (now or time.time()) - LOOKBACK)
    return judge(diagnosis, layout, clock, lines)
