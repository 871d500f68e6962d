"""The node_exporter textfile (SPEC "systemd and journald", ``[metrics] textfile``).

Rewritten whole after every check with a temporary file, fsync and rename, so
node_exporter never reads half a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..diagnose import CODES, Diagnosis
from .install import replace_file

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


class AgentCounters:
    """Counts since the agent started (Prometheus resets are normal on restart)."""

    def __init__(self, renewals: dict[str, int] | None = None, kubelet_restarts: int = 0) -> None:
        self.renewals = renewals if renewals is not None else {"success": 0, "failure": 0}
        self.kubelet_restarts = kubelet_restarts


def render(diagnosis: Diagnosis, counters: AgentCounters, checked_at: float) -> CollectorRegistry:
    # Imported here: an agent without [metrics] textfile never loads prometheus_client
    # (~1.7 MiB of its idle RSS, BENCHMARKS.md).
    from prometheus_client import (  # noqa: PLC0415
        CollectorRegistry,
        Counter,
        Gauge,
        disable_created_metrics,
    )

    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series mean nothing in a textfile rewritten each check
    registry = CollectorRegistry()
    not_after = Gauge(
        "kubecertd_certificate_not_after_seconds",
        "notAfter of the kubelet certificate as a Unix time (0: no readable certificate)",
        registry=registry,
    )
    not_after.set(diagnosis.cert.not_valid_after_utc.timestamp() if diagnosis.cert else 0)
    Gauge(
        "kubecertd_healthy", "1 when the last diagnosis had no error finding", registry=registry
    ).set(1 if diagnosis.healthy else 0)
    findings = Gauge(
        "kubecertd_findings", "Findings of the last diagnosis, by code", ["code"], registry=registry
    )
    present = _count_codes(diagnosis)
    for code in CODES:
        findings.labels(code).set(present.get(code, 0))
    renewals = Counter(
        "kubecertd_renewals",
        "Renewals since the agent started, by result",
        ["result"],
        registry=registry,
    )
    for result, value in counters.renewals.items():
        renewals.labels(result).inc(value)
    Counter(
        "kubecertd_kubelet_restarts",
        "kubelet restarts by kubecertd since it started",
        registry=registry,
    ).inc(counters.kubelet_restarts)
    Gauge(
        "kubecertd_last_check_timestamp_seconds",
        "Unix time of the last diagnosis",
        registry=registry,
    ).set(checked_at)
    return registry


def _count_codes(diagnosis: Diagnosis) -> Mapping[str, int]:
    counts: dict[str, int] = {}
    for item in diagnosis.findings:
        counts[item.code] = counts.get(item.code, 0) + 1
    return counts


def write(path: str, diagnosis: Diagnosis, counters: AgentCounters, checked_at: float) -> None:
    """Replace the textfile atomically, mode 0644 whatever the umask: node_exporter runs
    as its own user and must be able to read it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    from prometheus_client import generate_latest  # noqa: PLC0415

    replace_file(path, generate_latest(render(diagnosis, counters, checked_at)), 0o644)
