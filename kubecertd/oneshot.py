"""The one-shot commands that change things: ``--check --fix`` and ``enroll``.

Both hold the agent's lock (so they never race a running daemon), and both try an
unreachable signer at most three times within about 30 s before giving up (SPEC).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from . import schedule
from .config import Config
from .daemon import Daemon, acquire_lock
from .diagnose import Diagnosis
from .edges import journal
from .edges.client import HttpSignerClient, SignerClient
from .edges.install import recover
from .edges.units import DbusUnitManager, UnitManager
from .errors import LockHeld, SignerRefused, SignerUnreachable
from .heal import Healer, healing_reason, obtain_identity, utcnow

T = TypeVar("T")
ATTEMPTS = 3
BUDGET = 30.0  # seconds for all attempts together


def with_retries(action: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``action``; on an unreachable signer (or 429) try again, 3 times within ~30 s."""
    started = time.monotonic()
    for attempt in range(ATTEMPTS):
        try:
            return action()
        except (SignerUnreachable, SignerRefused) as exc:
            retryable = isinstance(exc, SignerUnreachable) or exc.status == 429
            delay = min(schedule.retry_delay(attempt + 1, random.random, exc.retry_after), 10.0)
            last = attempt == ATTEMPTS - 1 or time.monotonic() - started + delay > BUDGET
            if not retryable or last:
                if retryable:
                    raise SignerUnreachable(f"gave up after {attempt + 1} attempts: {exc}") from exc
                raise
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def client_for(config: Config) -> SignerClient:
    return HttpSignerClient(config.signer.url, config.signer.ca, config.signer.timeout)


def fix(
    config: Config,
    restart: bool,
    client: SignerClient | None = None,
    units: UnitManager | None = None,
) -> Diagnosis:
    """Diagnose, heal what can be healed, diagnose again (the second diagnosis is returned)."""
    try:
        lock = acquire_lock(config.daemon.state_dir)
    except LockHeld as exc:
        raise LockHeld(
            f"{exc}; it heals this node itself (journalctl -u kubecertd), or stop it first"
        ) from None
    try:
        recover(config.daemon.state_dir, [config.ssl_dir])
        unit_manager = (units or DbusUnitManager()) if restart and config.kubelet.restart else None
        daemon = Daemon(config, client or client_for(config), unit_manager)
        material, diagnosis = daemon.diagnose_now()
        reason = healing_reason(diagnosis, config, utcnow())
        if reason is not None:
            healer = Healer(config, daemon.client, unit_manager)
            try:
                with_retries(lambda: healer.heal(diagnosis, material, reason))
            except SignerUnreachable as exc:
                journal.send(
                    "signer-error", str(exc), journal.ERR, node=config.node_name, finding=reason
                )
                raise
        return daemon.diagnose_now()[1]
    finally:
        os.close(lock)


def enroll(config: Config, token: str, client: SignerClient | None = None) -> str:
    """Obtain this node's identity certificate with a one-time token; a summary line."""
    lock = acquire_lock(config.daemon.state_dir)
    try:
        signer = client or client_for(config)
        cert = with_retries(lambda: obtain_identity(config, signer, token, utcnow()))
    finally:
        os.close(lock)
    return f"enrolled {config.node_name}: identity certificate in {config.signer.identity_cert}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
