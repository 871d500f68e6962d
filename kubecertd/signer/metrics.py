"""The signer's Prometheus metrics (``GET /metrics``).

With several worker processes the counters live in prometheus_client's multiprocess
files (``PROMETHEUS_MULTIPROC_DIR``, set by ``serve`` before this module is
imported), so any worker answering a scrape reports the whole signer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .authority import Authority

_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_REGISTRY = None if _MULTIPROCESS else CollectorRegistry()

ISSUED = Counter(
    "kubecertd_signer_issued_total",
    "Certificates issued, by endpoint",
    ["endpoint"],
    registry=_REGISTRY,
)
REFUSED = Counter(
    "kubecertd_signer_refused_total",
    "Requests refused, by SPEC error code",
    ["code"],
    registry=_REGISTRY,
)
LATENCY = Histogram(
    "kubecertd_signer_request_seconds",
    "Time to answer a request, by path",
    ["path"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=_REGISTRY,
)

# Connections (kubecertd.signer.listener): what the [limits] caps and timeouts did.
CONNECTIONS_OPEN = Gauge(
    "kubecertd_signer_connections_open",
    "Connections accepted and not yet closed, TLS handshakes included",
    registry=_REGISTRY,
    multiprocess_mode="livesum",
)
CONNECTIONS_REFUSED = Counter(
    "kubecertd_signer_connections_refused_total",
    "Connections closed at once when accepted, before TLS, by the [limits] cap reached",
    ["reason"],
    registry=_REGISTRY,
)
CONNECTIONS_TIMED_OUT = Counter(
    "kubecertd_signer_connections_timed_out_total",
    "Connections closed for sending too little in time, by phase (handshake, header)",
    ["phase"],
    registry=_REGISTRY,
)


def render(tokens_outstanding: int, authority: Authority) -> bytes:
    """The exposition text: the counters plus gauges computed now."""
    if _MULTIPROCESS:
        from prometheus_client import multiprocess  # noqa: PLC0415

        counters = CollectorRegistry()
        multiprocess.MultiProcessCollector(counters)  # type: ignore[no-untyped-call]
    else:
        counters = _REGISTRY  # type: ignore[assignment]
    gauges = CollectorRegistry()
    gauges.register(_Snapshot(tokens_outstanding, authority))
    return generate_latest(counters) + generate_latest(gauges)


class _Snapshot(Collector):
    """Gauges computed at scrape time (kept out of the multiprocess files)."""

    def __init__(self, tokens_outstanding: int, authority: Authority) -> None:
        self.tokens = tokens_outstanding
        self.authority = authority

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "kubecertd_signer_tokens_outstanding",
            "Enrollment tokens not yet used or expired",
            value=self.tokens,
        )
        expiry = GaugeMetricFamily(
            "kubecertd_signer_ca_not_after_seconds",
            "notAfter of each CA, as a Unix time",
            labels=["ca"],
        )
        expiry.add_metric(["cluster"], self.authority.cluster.cert.not_valid_after_utc.timestamp())
        expiry.add_metric(
            ["identity"], self.authority.identity.cert.not_valid_after_utc.timestamp()
        )
        yield expiry
