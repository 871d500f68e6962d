"""Fixtures shared by the whole suite."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kubecertd.diagnose import CheckPolicy

import factories


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's systemd socket, config override or CA bundle."""
    for name in ("NOTIFY_SOCKET", "KUBECERTD_CONFIG", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def now() -> dt.datetime:
    """The fixed, aware UTC clock of the tests."""
    return factories.NOW


@pytest.fixture
def policy() -> CheckPolicy:
    """The diagnosis policy the agent uses by default, with the test runner as a key owner."""
    return CheckPolicy(warn_fraction=0.8, key_owners=frozenset({0, os.geteuid()}))


@pytest.fixture
def healthy_ssl_dir(
    tmp_path: Path,
) -> Callable[[], tuple[factories.SslDir, factories.Issued, factories.Issued]]:
    """A builder of complete, healthy ssl directories (CA, kubelet cert, key) under tmp_path."""
    counter = iter(range(1_000_000))

    def build() -> tuple[factories.SslDir, factories.Issued, factories.Issued]:
        return factories.write_healthy(tmp_path / f"ssl{next(counter)}")

    return build
