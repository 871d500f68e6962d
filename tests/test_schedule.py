"""When the agent acts: renewal jitter and point, signer backoff, the kubelet restart budget."""

from __future__ import annotations

import datetime as dt
import statistics
from collections import Counter
from collections.abc import Callable
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubecertd.errors import InstallError, SignerRefused, SignerUnreachable
from kubecertd.schedule import (
    BACKOFF_CAP,
    MAX_JITTER,
    backoff,
    delay_after,
    node_jitter,
    prune_history,
    renewal_point,
    restarts_left,
    retry_delay,
)

from factories import CERT_NOT_AFTER, CERT_NOT_BEFORE, NODE, OTHER_NODE, issue, make_ca

SECOND = dt.timedelta(seconds=1)
JUST_BELOW_ONE = 1.0 - 2.0**-53  # the largest float random.random() can return
FLEET = [f"node-{i:04d}.prod.example" for i in range(1000)]
HOUR = 3600.0
NOW_TS = 1_780_000_000.0  # a Unix time in 2026


def constant(value: float) -> Callable[[], float]:
    """A random source that always returns ``value``."""
    return lambda: value


# -- node jitter ----------------------------------------------------------------------------


def test_jitter_is_a_fixed_function_of_the_node_name() -> None:
    """The same name gives the same jitter every time and in every process (pinned values)."""
    assert node_jitter(NODE) == node_jitter(NODE)
    # Pinned: a changed formula would silently reshuffle every node's renewal point.
    assert node_jitter(NODE) == pytest.approx(0.08791502253928973, abs=1e-15)
    assert node_jitter(OTHER_NODE) == pytest.approx(0.09847107166762076, abs=1e-15)


def test_jitter_is_in_zero_to_a_tenth() -> None:
    """Every node's jitter lies in [0, 0.1)."""
    assert all(0.0 <= node_jitter(name) < MAX_JITTER for name in [*FLEET, "", NODE, "x" * 253])
    assert MAX_JITTER == 0.1


def test_jitter_differs_across_names() -> None:
    """A thousand node names get a thousand different jitters."""
    assert len({node_jitter(name) for name in FLEET}) == len(FLEET)


def test_jitter_spreads_a_fleet_roughly_uniformly() -> None:
    """A thousand nodes cover [0, 0.1) evenly: extremes near the ends, mean near 0.05, no empty decile."""
    values = [node_jitter(name) for name in FLEET]
    assert min(values) < 0.005
    assert max(values) > 0.095
    assert statistics.fmean(values) == pytest.approx(0.05, abs=0.005)
    deciles = Counter(int(v / MAX_JITTER * 10) for v in values)
    assert sorted(deciles) == list(range(10))
    assert all(60 <= count <= 140 for count in deciles.values()), deciles


# -- renewal point ----------------------------------------------------------------------------


def _expected_point(
    not_before: dt.datetime, not_after: dt.datetime, fraction: float, node: str
) -> dt.datetime:
    """notBefore + lifetime x (fraction + jitter), computed in exact rational seconds."""
    lifetime = Fraction((not_after - not_before).total_seconds())
    share = min(Fraction(fraction) + Fraction(node_jitter(node)), Fraction(1))
    return not_before + dt.timedelta(seconds=float(lifetime * share))


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        (CERT_NOT_BEFORE, CERT_NOT_AFTER),
        (CERT_NOT_BEFORE, CERT_NOT_BEFORE + dt.timedelta(days=30)),
        (CERT_NOT_BEFORE, CERT_NOT_BEFORE + dt.timedelta(hours=1)),
    ],
    ids=["365d", "30d", "1h"],
)
@pytest.mark.parametrize("fraction", [0.5, 0.7, 0.85])
def test_renewal_point_is_not_before_plus_lifetime_share(
    not_before: dt.datetime, not_after: dt.datetime, fraction: float
) -> None:
    """renewal_point is notBefore + lifetime x (renew_fraction + jitter), within one second either side."""
    leaf = issue(make_ca(), not_before=not_before, not_after=not_after)
    expected = _expected_point(not_before, not_after, fraction, NODE)
    point = renewal_point(leaf.cert, fraction, NODE)
    assert expected - SECOND < point < expected + SECOND
    assert abs(point - expected) <= dt.timedelta(milliseconds=1)
    assert point.tzinfo is not None
    assert not_before < point < not_after


def test_renewal_point_differs_per_node() -> None:
    """Two nodes with certificates issued at the same moment renew at different moments."""
    leaf = issue(make_ca())
    assert renewal_point(leaf.cert, 0.7, NODE) != renewal_point(leaf.cert, 0.7, OTHER_NODE)


def test_renewal_point_never_passes_not_after() -> None:
    """With renew_fraction + jitter above 1 the renewal point is notAfter itself."""
    leaf = issue(make_ca())
    assert node_jitter(NODE) > 0.05
    assert renewal_point(leaf.cert, 0.95, NODE) == CERT_NOT_AFTER


# -- backoff ----------------------------------------------------------------------------------

CEILINGS = [
    (0, 1),
    (1, 2),
    (2, 4),
    (3, 8),
    (4, 16),
    (5, 32),
    (6, 64),
    (7, 128),
    (8, 256),
    (9, 300),
    (10, 300),
    (64, 300),
    (10**6, 300),
]


@pytest.mark.parametrize(("attempt", "ceiling"), CEILINGS, ids=[f"attempt{a}" for a, _ in CEILINGS])
def test_backoff_full_jitter_spans_zero_to_the_doubling_ceiling(attempt: int, ceiling: int) -> None:
    """Attempt n waits uniformly in [0, min(300, 2**n)): random()=0 gives 0, random()->1 just under the ceiling."""
    assert backoff(attempt, constant(0.0)) == 0.0
    assert backoff(attempt, constant(0.5)) == ceiling / 2
    top = backoff(attempt, constant(JUST_BELOW_ONE))
    assert top < ceiling
    assert top == pytest.approx(ceiling, rel=1e-12)


def test_backoff_first_attempt_is_below_one_second() -> None:
    """The first retry waits less than one second (SPEC: 1 s doubling to 5 min)."""
    assert 0.0 <= backoff(0, constant(JUST_BELOW_ONE)) < 1.0


def test_backoff_is_capped_at_five_minutes() -> None:
    """No attempt ever waits 300 s or more."""
    assert BACKOFF_CAP == 300.0
    assert max(backoff(a, constant(JUST_BELOW_ONE)) for a in range(200)) < 300.0


def test_backoff_negative_attempt_counts_as_first() -> None:
    """A negative attempt count is treated as attempt 0."""
    assert backoff(-3, constant(0.5)) == 0.5


def test_backoff_calls_the_random_source_once() -> None:
    """Each delay draws exactly one number from the injected random source."""
    draws: list[float] = []

    def source() -> float:
        draws.append(0.25)
        return 0.25

    assert backoff(3, source) == 2.0
    assert draws == [0.25]


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    value=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_backoff_property_stays_in_range(attempt: int, value: float) -> None:
    """For every attempt and every random value in [0, 1), backoff lies in [0, min(300, 2**attempt))."""
    delay = backoff(attempt, constant(value))
    assert 0.0 <= delay < min(300.0, 2.0 ** min(attempt, 64))


# -- retry delay -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(0.0, 0.0), (40.0, 40.0), (299.0, 299.0), (300.0, 300.0), (301.0, 300.0), (86400.0, 300.0)],
    ids=["0s", "40s", "299s", "300s", "301s", "1d"],
)
def test_retry_delay_honours_retry_after_capped_at_300(retry_after: float, expected: float) -> None:
    """A 429's Retry-After is the delay, whatever the attempt and the random source, capped at 300 s."""
    for attempt in (0, 5, 50):
        assert retry_delay(attempt, constant(0.999), retry_after) == expected


def test_retry_delay_without_retry_after_is_backoff() -> None:
    """Without Retry-After the delay is the jittered backoff."""
    assert retry_delay(3, constant(0.5), None) == backoff(3, constant(0.5)) == 4.0


def test_retry_delay_ignores_a_negative_retry_after() -> None:
    """A negative Retry-After is ignored and the backoff applies."""
    assert retry_delay(2, constant(0.5), -10.0) == 2.0


# -- the kubelet restart budget -------------------------------------------------------------


def test_restart_budget_exhausted_by_max_restarts_in_the_last_hour() -> None:
    """Exactly max_restarts_per_hour restarts within the last hour leave none."""
    history = [NOW_TS - 3000, NOW_TS - 2000, NOW_TS - 1000, NOW_TS]
    assert restarts_left(history, NOW_TS, 4) == 0
    assert restarts_left(history[1:], NOW_TS, 4) == 1
    assert restarts_left([], NOW_TS, 4) == 4


def test_restart_budget_never_negative() -> None:
    """More restarts than the budget still leave zero, not a negative count."""
    assert restarts_left([NOW_TS - i for i in range(10)], NOW_TS, 4) == 0


def test_restart_budget_zero_allows_none() -> None:
    """max_restarts_per_hour = 0 never allows a restart."""
    assert restarts_left([], NOW_TS, 0) == 0


@pytest.mark.parametrize(
    ("age", "counts"),
    [(HOUR + 1, False), (HOUR, False), (HOUR - 1, True), (0.0, True)],
    ids=["3601s-ago", "3600s-ago", "3599s-ago", "now"],
)
def test_restart_budget_window_is_one_hour(age: float, counts: bool) -> None:
    """A restart 3599 s ago still counts against the budget; one 3601 s (or exactly 3600 s) ago does not."""
    assert restarts_left([NOW_TS - age], NOW_TS, 1) == (0 if counts else 1)
    assert prune_history([NOW_TS - age], NOW_TS) == ([NOW_TS - age] if counts else [])


def test_prune_history_keeps_recent_restarts_in_order() -> None:
    """prune_history drops restarts older than an hour and keeps the rest in order."""
    history = [NOW_TS - 7200, NOW_TS - HOUR - 1, NOW_TS - 1800, NOW_TS - 60]
    assert prune_history(history, NOW_TS) == [NOW_TS - 1800, NOW_TS - 60]


def test_restart_budget_counts_restarts_from_a_clock_stepped_back() -> None:
    """Restarts stamped a few seconds in the future (clock stepped back) still count against the budget."""
    history = [NOW_TS + 5, NOW_TS + 10, NOW_TS + 15, NOW_TS + 20]
    assert restarts_left(history, NOW_TS, 4) == 0


def test_delay_after_takes_the_signers_retry_after_else_backs_off() -> None:
    busy = SignerUnreachable("https://signer/v1/sign: 503 unavailable: database", 7.0)
    limited = SignerRefused(429, "rate-limited", "too many", 60.0)
    assert delay_after(3, constant(0.5), busy) == 7.0
    assert delay_after(3, constant(0.5), limited) == 60.0
    assert delay_after(3, constant(0.5), SignerUnreachable("refused")) == backoff(3, constant(0.5))
    assert delay_after(3, constant(0.5), InstallError("disk full")) == backoff(3, constant(0.5))
