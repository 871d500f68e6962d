"""When to act: renewal points, retry backoff and the kubelet restart budget (pure).

Time and randomness are inputs: ``now`` is passed in and the backoff takes a random
source, so every boundary is testable to the second.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Sequence

from cryptography import x509

MAX_JITTER = 0.1
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0


def node_jitter(node: str) -> float:
    """This node's fixed share of extra lifetime before renewal, in [0, 0.1).

    A pure function of the name, so a fleet issued at the same moment spreads its
    renewals instead of hitting the signer together, and a restart changes nothing.
    """
    digest = hashlib.sha256(node.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * MAX_JITTER


def renewal_point(cert: x509.Certificate, renew_fraction: float, node: str) -> dt.datetime:
    """notBefore + lifetime x (renew_fraction + the node's jitter)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    share = min(renew_fraction + node_jitter(node), 1.0)
    return start + (end - start) * share


def backoff(
    attempt: int, random: Callable[[], float], base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP
) -> float:
    """Exponential backoff with full jitter: uniform over [0, min(cap, base x 2^attempt)).

    ``attempt`` counts failures so far, from 0; ``random`` returns a float in [0, 1).
    """
    ceiling = min(cap, base * (1 << min(max(attempt, 0), 32)))
    return random() * ceiling


def retry_delay(attempt: int, random: Callable[[], float], retry_after: float | None) -> float:
    """The wait before the next signer request: a 429's Retry-After wins over backoff."""
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, BACKOFF_CAP)
    return backoff(attempt, random)


def delay_after(attempt: int, random: Callable[[], float], error: BaseException) -> float:
    """The wait after a failed heal: the Retry-After the signer's error carries, else backoff.

    What the daemon decides after every failure, and what ``bench/fleet_storm.py``'s
    simulated nodes decide: only a signer's 429 or 5xx carries a ``retry_after``.
    """
    return retry_delay(attempt, random, getattr(error, "retry_after", None))


def restarts_left(history: Sequence[float], now: float, per_hour: int) -> int:
    """How many kubelet restarts the budget allows now, given past restart times.

    A restart stamped in the future (the clock stepped back) still counts: a clock
    step must never buy extra restarts.
    """
    recent = sum(1 for moment in history if moment > now - 3600)
    return max(0, per_hour - recent)


def prune_history(history: Sequence[float], now: float) -> list[float]:
    return [moment for moment in history if moment > now - 3600]
