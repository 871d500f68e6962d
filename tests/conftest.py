"""Fixtures shared by the whole suite."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kubecertd.diagnose import CheckPolicy

import factories
import pg
import signer_harness


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


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[pg.Cluster]:
    """A real PostgreSQL server for the session, stopped at the end even after failures."""
    try:
        cluster = pg.start()
    except (pg.ClusterError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot start a throwaway PostgreSQL cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: pg.Cluster) -> Iterator[str]:
    """A URL of a fresh, empty PostgreSQL schema (first in its search_path), dropped after."""
    name = postgres_cluster.create_schema()
    try:
        yield postgres_cluster.url(pg.DATABASE, schema=name)
    finally:
        postgres_cluster.drop_schema(name)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[signer_harness.Signer]:
    """A real ``kubecertd-signer serve`` (one worker, default policy) shared by one module."""
    with signer_harness.running_signer(tmp_path_factory.mktemp("signer")) as running:
        yield running


@pytest.fixture(scope="module")
def signer_workers2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[signer_harness.Signer]:
    """A real ``kubecertd-signer serve --workers 2`` (two processes on one port), per module."""
    with signer_harness.running_signer(tmp_path_factory.mktemp("signer2"), workers=2) as running:
        yield running


@pytest.fixture
def start_signer(tmp_path: Path) -> Iterator[Callable[..., signer_harness.Signer]]:
    """Starts signers with their own settings (``running_signer``'s) for one test.

    Each is stopped after the test and must exit 0 on SIGTERM.
    """
    counter = iter(range(1_000_000))
    with contextlib.ExitStack() as stack:

        def start(
            workers: int = 1,
            policy: dict[str, object] | None = None,
            init_args: tuple[str, ...] = (),
        ) -> signer_harness.Signer:
            directory = tmp_path / f"signer{next(counter)}"
            running = signer_harness.running_signer(directory, workers, policy, init_args)
            return stack.enter_context(running)

        yield start


# Throwaway nodes: a real systemd as PID 1 in its own namespaces (tests/node_harness.py,
# tools/node/). Skipped only without root or unshare; every node is stopped afterwards.
@pytest.fixture
def node_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., object]]:
    """``node_factory(hostname=..., **Node kwargs)`` boots a node_harness.Node."""
    from node_harness import node_factory_fixture

    yield from node_factory_fixture(tmp_path_factory)


@pytest.fixture
def node(node_factory: Callable[..., object]) -> object:
    """A booted node_harness.Node named server2277z.prod.jp.local."""
    return node_factory()
