"""The one-shot commands that change things: ``--check --fix`` and ``enroll``.

Both hold the agent's lock (so they never race a running daemon), and both try an
unreachable signer at most three times within about 30 s before giving up (SPEC).
Nothing that waiting cannot change is tried again: a configuration error, a refusal,
or a ``SignerMisconfigured`` fails the first try.

``fix`` never raises for a failed heal: it returns the diagnosis as it stands after the
attempt and a ``FixReport`` of what the attempt did, so that ``--check --fix`` prints its
report, text or JSON, whatever happened (SPEC "--check --fix").
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from . import schedule
from .config import Config
from .daemon import Daemon, acquire_lock
from .diagnose import Diagnosis
from .edges import journal
from .edges.client import HttpSignerClient, SignerClient
from .edges.install import recover
from .edges.units import DbusUnitManager, UnitManager
from .errors import (
    ConfigError,
    KubecertdError,
    LockHeld,
    SignerError,
    SignerRefused,
    SignerUnreachable,
)
from .heal import Healer, Outcome, healing_reason, obtain_identity, renewal_for, utcnow
from .layout import Layout

T = TypeVar("T")
ATTEMPTS = 3
BUDGET = 30.0  # seconds for all attempts together


class Retries:
    """Tries an action against the signer: 3 times within ~30 s, counting the tries.

    Only an unreachable signer and a 429 are tried again; anything else (a refusal, a
    configuration error, a verification or install error) ends the first try.
    """

    def __init__(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self.sleep = sleep
        self.tries = 0

    def run(self, action: Callable[[], T]) -> T:
        started = time.monotonic()
        for attempt in range(ATTEMPTS):
            self.tries += 1
            try:
                return action()
            except (SignerUnreachable, SignerRefused) as exc:
                retryable = isinstance(exc, SignerUnreachable) or exc.status == 429
                delay = min(schedule.retry_delay(attempt + 1, random.random, exc.retry_after), 10.0)
                last = attempt == ATTEMPTS - 1 or time.monotonic() - started + delay > BUDGET
                if not retryable or last:
                    if retryable:
                        raise SignerUnreachable(
                            f"gave up after {attempt + 1} attempts: {exc}"
                        ) from exc
                    raise
                self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def with_retries(action: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``action`` under ``Retries``."""
    return Retries(sleep).run(action)


class FixReport(NamedTuple):
    """What ``--check --fix`` did: the ``fix`` object of ``--check --fix --json``."""

    reason: str | None  # why a heal was needed; None: nothing to heal
    tries: int = 0  # heals tried (the signer contacted or about to be)
    outcome: Outcome | None = None  # the heal that went through
    error: KubecertdError | None = None  # why it did not

    @property
    def result(self) -> str:
        if self.reason is None and self.error is None:
            return "not-needed"
        if self.error is not None:
            return "failed"
        return "rolled-back" if self.outcome and self.outcome.rolled_back else "healed"

    def to_dict(self) -> dict[str, Any]:
        outcome = self.outcome
        return {
            "result": self.result,
            "reason": self.reason,
            "tries": self.tries,
            # What is on disk now by our hand: nothing unless a heal went through.
            "written": list(outcome.installed) if outcome else [],
            "restarted": outcome.restarted if outcome else None,
            "serial": outcome.serial if outcome else None,
            "error": error_dict(self.error) if self.error else None,
        }


def error_dict(error: KubecertdError) -> dict[str, str]:
    return {"code": error.code, "message": str(error)}


def client_for(config: Config) -> SignerClient:
    return HttpSignerClient(
        config.signer.url, config.signer.ca, config.signer.timeout, node=config.node_name
    )


def require_signer(config: Config) -> None:
    """A signer URL, or a configuration error naming the setting and the file."""
    if not config.signer.url:
        raise ConfigError(
            f"{config.source}: signer.url is empty: set [signer] url to the signer's https://host:port"
        )


def fix(
    config: Config,
    layout: Layout,
    restart: bool,
    client: SignerClient | None = None,
    units: UnitManager | None = None,
) -> tuple[Diagnosis, FixReport]:
    """Diagnose, heal what can be healed, diagnose again.

    The second diagnosis is returned with what the attempt did.  When another kubecertd
    holds the lock, nothing is touched and the diagnosis is the only one.
    """
    try:
        lock = acquire_lock(config.daemon.state_dir)
    except LockHeld as exc:
        held = LockHeld(
            f"{exc}; it heals this node itself (journalctl -u kubecertd), or stop it first"
        )
        daemon = Daemon(config, layout, client or client_for(config), None)
        return daemon.diagnose_now()[1], FixReport(reason=None, error=held)
    try:
        recover(config.daemon.state_dir, layout.directories())
        unit_manager = (
            (units or DbusUnitManager()) if restart and config.kubelet.restart != "false" else None
        )
        daemon = Daemon(config, layout, client or client_for(config), unit_manager)
        report = _heal_once(config, daemon, unit_manager)
        return daemon.diagnose_now()[1], report
    finally:
        os.close(lock)


def _heal_once(config: Config, daemon: Daemon, units: UnitManager | None) -> FixReport:
    material, diagnosis = daemon.diagnose_now()
    reason = healing_reason(diagnosis, config, utcnow(), daemon.layout.rotation)
    if reason is None:
        return FixReport(reason=None)
    retries = Retries()
    try:
        require_signer(config)
        healer = Healer(config, daemon.layout, daemon.client, units)
        outcome = retries.run(lambda: healer.heal(diagnosis, material, reason))
    except KubecertdError as exc:
        # The daemon's event kinds: signer-error for the signer's side, else renew-failed.
        event = "signer-error" if isinstance(exc, SignerError) else "renew-failed"
        journal.send(
            event,
            f"--fix: {renewal_for(reason)} failed after {retries.tries} tries: {exc}; files left as they were",
            journal.ERR, node=config.node_name, finding=reason, code=exc.code,
        )  # fmt: skip
        return FixReport(reason, retries.tries, error=exc)
    return FixReport(reason, retries.tries, outcome)


def enroll(config: Config, token: str, client: SignerClient | None = None) -> str:
    """Obtain this node's identity certificate with a one-time token; a summary line."""
    require_signer(config)
    lock = acquire_lock(config.daemon.state_dir)
    try:
        signer = client or client_for(config)
        cert = with_retries(lambda: obtain_identity(config, signer, token, utcnow()))
    finally:
        os.close(lock)
    return f"enrolled {config.node_name}: identity certificate in {config.signer.identity_cert}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
