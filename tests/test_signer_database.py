"""The signer with its database away: real ``kubecertd-signer serve`` processes on a real
PostgreSQL, spoken to over real TLS.

The database is taken away the ways a fail-over does it: the server restarts, the
signer's backend is terminated, the database stops accepting connections, or the
backend freezes (SIGSTOP, always resumed in a ``finally``).  Each test polls with a
bound; none sleeps and hopes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import requests

from kubecertd import pki

import pg
import signer_harness
from signer_harness import Client, Signer, csr_pem

DATABASE_TIMEOUT = 2.0  # the signers' [limits] database_timeout here
MARGIN = 1.0  # app.ANSWER_MARGIN
SLACK = 3.0  # seconds for a loaded test machine on top of a bound
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


def kubelet_csr(node: str) -> str:
    return csr_pem(pki.build_csr(pki.generate_key("ecdsa-p256"), pki.kubelet_subject(node)))


@pytest.fixture
def pg_signer(tmp_path: Path, postgres_url: str) -> Iterator[Callable[[], Signer]]:
    """Starts signers (one worker each) on the test's PostgreSQL schema."""
    counter = iter(range(100))
    with contextlib.ExitStack() as stack:

        def start() -> Signer:
            directory = tmp_path / f"signer{next(counter)}"
            config = signer_harness.init_signer_dir(directory)
            text = config.read_text()
            text, n = re.subn(
                r"(?m)^# database_url = .*$", f'database_url = "{postgres_url}"', text
            )
            assert n == 1
            text += f'database_timeout = "{DATABASE_TIMEOUT:g}s"\n'  # [limits] is last
            config.write_text(text)
            return stack.enter_context(signer_harness.running_signer(directory))

        yield start


def backends(url: str) -> list[int]:
    """The server processes of the signers' connections (application_name)."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'kubecertd-signer'"
        ).fetchall()
    return [int(row[0]) for row in rows]


def the_backend(url: str) -> int:
    """The one worker's backend, once the in-process `token create` has left."""
    poll("one signer connection", lambda: len(backends(url)) == 1)
    return backends(url)[0]


def issued_sign_records(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM audit WHERE endpoint = 'sign' AND outcome = 'issued'"
        ).fetchone()
    return int(row[0]) if row else 0


def poll(what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)  # poll interval, bounded by the deadline


def healthz(signer: Signer) -> requests.Response:
    return signer.get("/healthz")


def sign(signer: Signer, node: str, identity: Client) -> requests.Response:
    return signer.post("/v1/sign", {"csr": kubelet_csr(node), "reason": "test"}, client=identity)


@pytest.mark.parametrize("how", ["terminate", "restart"])
def test_database_restart_between_requests_costs_no_503(
    pg_signer: Callable[[], Signer], postgres_cluster: pg.Cluster, postgres_url: str, how: str
) -> None:
    """A worker whose idle connection died (its backend terminated, or the server restarted)
    answers the next request as usual: the call runs once more on a fresh connection."""
    signer = pg_signer()
    identity = signer.enroll("node-a")
    assert sign(signer, "node-a", identity).status_code == 201
    before = the_backend(postgres_url)
    if how == "terminate":
        postgres_cluster.sql(f"SELECT pg_terminate_backend({before})")
    else:
        log = str(postgres_cluster.root / "server.log")  # else pg_ctl's pipe stays open
        data = str(postgres_cluster.data)
        postgres_cluster.run("pg_ctl", "-D", data, "-l", log, "-m", "fast", "-w", "restart")
    poll("the old backend is gone", lambda: before not in backends(postgres_url))
    answer = sign(signer, "node-a", identity)
    assert answer.status_code == 201, answer.text
    assert healthz(signer).status_code == 200
    assert issued_sign_records(postgres_url) == 2


def test_frozen_backend_answers_503_in_time_and_records_nothing(
    pg_signer: Callable[[], Signer], postgres_url: str
) -> None:
    """With the signer's backend frozen (SIGSTOP), a sign request is answered 503
    `unavailable` with Retry-After within database_timeout plus the margin, /healthz says
    not ready, and once the backend resumes nothing is recorded as issued for it."""
    signer = pg_signer()
    identity = signer.enroll("node-f")
    backend = the_backend(postgres_url)
    os.kill(backend, signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = sign(signer, "node-f", identity)
        took = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "unavailable"
        assert answer.headers["Retry-After"] == "5"
        assert DATABASE_TIMEOUT <= took < DATABASE_TIMEOUT + MARGIN + SLACK
        started = time.monotonic()
        probe = healthz(signer)
        assert probe.status_code == 503
        assert probe.text.startswith("not ready: ")
        assert "database_timeout" in probe.text
        assert time.monotonic() - started < DATABASE_TIMEOUT + SLACK
        assert signer.get("/livez").status_code == 200  # the process itself is fine
    finally:
        os.kill(backend, signal.SIGCONT)
    poll("the signer is ready again", lambda: healthz(signer).status_code == 200)
    assert issued_sign_records(postgres_url) == 0
    if not JOURNAL_SOCKET.exists():  # else the line went to journald
        log = signer.log_text()
        assert "state database unavailable; nothing issued: " in log
        assert "KUBECERTD_DATABASE_ERROR=" in log
    assert sign(signer, "node-f", identity).status_code == 201  # and it serves again


def test_unreachable_database_is_not_ready_and_says_why(
    pg_signer: Callable[[], Signer], postgres_cluster: pg.Cluster, postgres_url: str
) -> None:
    """While the database refuses connections, /healthz is 503 naming the database error,
    each request is 503 `unavailable` with Retry-After and a log line naming the error
    (never the URL's password); afterwards the signer is ready again by itself."""
    signer = pg_signer()
    identity = signer.enroll("node-d")
    closed = f'ALTER DATABASE "{pg.DATABASE}" ALLOW_CONNECTIONS '
    with psycopg.connect(postgres_cluster.url(), autocommit=True) as admin:
        admin.execute((closed + "false").encode())
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'kubecertd-signer'"
            )
            poll("the backend is gone", lambda: not _signer_backends(admin))
            poll("/healthz says not ready", lambda: healthz(signer).status_code == 503)
            probe = healthz(signer)
            assert "not currently accepting connections" in probe.text
            assert probe.headers["Retry-After"] == "5"
            answer = sign(signer, "node-d", identity)
            assert answer.status_code == 503
            assert answer.headers["Retry-After"] == "5"
        finally:
            admin.execute((closed + "true").encode())
    poll("the signer is ready again", lambda: healthz(signer).status_code == 200, 10)
    if not JOURNAL_SOCKET.exists():  # else the line went to journald
        log = signer.log_text()
        line = next(x for x in log.splitlines() if "state database unavailable" in x)
        assert "not currently accepting connections" in line
    assert sign(signer, "node-d", identity).status_code == 201


def _signer_backends(admin: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'kubecertd-signer'"
    ).fetchone()
    return bool(row and row[0])
