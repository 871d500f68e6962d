"""The ``Store`` contract: SQLite and PostgreSQL (a real server) pass the same tests.

Times are explicit inputs; the rate-limit window is tested one second either side of
its edge.  Concurrency is tested the way the signer runs: several store instances on
one database, each called from a thread of its own (the database threads of workers
and replicas) and, for SQLite, several OS processes (workers).  ``commit_many`` is
held to what committing its items one by one gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubecertd.signer.store import (
    ISSUED,
    REFUSED,
    AuditRecord,
    Commit,
    Store,
    StoreError,
    TokenInfo,
    Verdict,
)
from kubecertd.signer.store.postgres import PostgresStore
from kubecertd.signer.store.sqlite import SqliteStore
from kubecertd.signer.tokens import hash_secret, new_token

import pg

T = TypeVar("T")
UTC = dt.timezone.utc
JST = dt.timezone(dt.timedelta(hours=9))
T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SECOND = dt.timedelta(seconds=1)
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
NODE = "server2277z.prod.jp.local"
OTHER = "server2267z.prod.jp.local"
TOKEN_ID = "0123456789ab"
TOKEN_INVALID = Verdict("token-invalid", "the token is unknown, expired or already used")
DOOMED = "192.0.2.66:6666"  # the peer whose audit INSERT fails once db.fail_audit_inserts ran


# --- builders -------------------------------------------------------------------------


def _name(case: Callable[..., Any]) -> str:
    """A parametrised case's test id: its function's name, dashed."""
    return case.__name__.strip("_").replace("_", "-")


def make_token(
    token_id: str = TOKEN_ID,
    node: str = NODE,
    created: dt.datetime = T0,
    ttl: dt.timedelta = HOUR,
    secret: str = "0" * 32,
) -> TokenInfo:
    return TokenInfo(token_id, node, created, created + ttl, hash_secret(secret))


def issued(
    time: dt.datetime = T0, node: str | None = NODE, endpoint: str = "sign", **changes: Any
) -> AuditRecord:
    """An ISSUED record as the signer's handlers write it."""
    record = AuditRecord(
        time=time,
        endpoint=endpoint,
        node=node,
        identity="identity:5f0c1e",
        reason="renewal",
        outcome=ISSUED,
        key_fingerprint="sha256:9a1b",
        serial="7d3e55aa01",
        not_before=time - 5 * MINUTE,
        not_after=time + dt.timedelta(days=30),
        peer="10.0.0.7:50312",
    )
    return dataclasses.replace(record, **changes)


def refused_csr(time: dt.datetime = T0, node: str | None = NODE) -> AuditRecord:
    """A refusal the handler decided before the store (a bad CSR)."""
    return dataclasses.replace(
        issued(time, node),
        outcome=REFUSED,
        code="bad-csr",
        message="not a CSR",
        serial=None,
        not_before=None,
        not_after=None,
    )


def together(*calls: Callable[[], T]) -> list[T]:
    """Run ``calls`` at the same moment, one thread each, as the database threads of
    several workers or replicas would; their results in order."""
    start = threading.Barrier(len(calls))

    def at_once(call: Callable[[], T]) -> T:
        start.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(at_once, call) for call in calls]
        return [future.result(timeout=60) for future in futures]


# --- the two databases ----------------------------------------------------------------

# The tables as the first release's stores created them (kubecertd/signer/store/*.py at
# commit 2974b56), before any migration: a state database from that release.
FIRST_SQLITE_SCHEMA = """
CREATE TABLE tokens (
    id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, node TEXT NOT NULL, created TEXT NOT NULL,
    expires TEXT NOT NULL, spent TEXT, revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, endpoint TEXT NOT NULL,
    node TEXT, identity TEXT NOT NULL, reason TEXT NOT NULL, outcome TEXT NOT NULL, code TEXT,
    message TEXT NOT NULL, key_fingerprint TEXT, serial TEXT, not_before TEXT, not_after TEXT,
    peer TEXT NOT NULL
);
CREATE INDEX audit_rate ON audit (node, endpoint, outcome, time);
CREATE INDEX audit_time ON audit (time);
CREATE TABLE revoked_nodes (node TEXT PRIMARY KEY, since TEXT NOT NULL);
PRAGMA journal_mode = WAL;
"""
FIRST_POSTGRES_SCHEMA = """
CREATE TABLE tokens (
    id text PRIMARY KEY, secret_hash text NOT NULL, node text NOT NULL,
    created timestamptz NOT NULL, expires timestamptz NOT NULL, spent timestamptz,
    revoked boolean NOT NULL DEFAULT false
);
CREATE TABLE audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, time timestamptz NOT NULL,
    endpoint text NOT NULL, node text, identity text NOT NULL, reason text NOT NULL,
    outcome text NOT NULL, code text, message text NOT NULL, key_fingerprint text,
    serial text, not_before timestamptz, not_after timestamptz, peer text NOT NULL
);
CREATE INDEX audit_rate ON audit (node, endpoint, outcome, time);
CREATE INDEX audit_time ON audit (time);
CREATE TABLE revoked_nodes (node text PRIMARY KEY, since timestamptz NOT NULL);
"""
FIRST_AUDIT_COLUMNS = (
    "time", "endpoint", "node", "identity", "reason", "outcome", "code", "message",
    "key_fingerprint", "serial", "not_before", "not_after", "peer",
)  # fmt: skip


def first_release_insert(record: AuditRecord) -> str:
    """The INSERT a signer of the first release makes for ``record`` (no claim), as SQL
    text that both databases read the same way (times in ISO 8601 with a Z)."""

    def literal(value: object) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, dt.datetime):
            value = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return "'" + str(value).replace("'", "''") + "'"

    values = ", ".join(literal(getattr(record, name)) for name in FIRST_AUDIT_COLUMNS)
    return f"INSERT INTO audit ({', '.join(FIRST_AUDIT_COLUMNS)}) VALUES ({values})"  # noqa: S608


def claimed(time: dt.datetime = T0, node: str = NODE, claim: str = "") -> AuditRecord:
    """An ISSUED sign record carrying the node's claim."""
    text = claim or f"{node}: unlink /var/lib/kubelet/pki/kubelet-client-current.pem by rm[4242]"
    return issued(time, node, reason="cert-missing", claim=text)


@dataclass
class Db:
    """One database under test, and raw access to it that bypasses the store."""

    new_store: Callable[[], Store]
    dump: Callable[[], bytes]  # everything the database holds, as bytes
    execute: Callable[[str], None]  # raw SQL
    destroy: Callable[[], None]  # the database goes away under the store
    fail_audit_inserts: str  # SQL planting a trigger that aborts audit INSERTs from DOOMED
    first_schema: str  # SQL creating the tables as the first release's store did
    version: Callable[[], int]  # the schema version the database records


def sqlite_db(path: Path) -> Db:
    def dump() -> bytes:
        files = b"".join(p.read_bytes() for p in sorted(path.parent.iterdir()))
        conn = sqlite3.connect(path)
        try:
            return files + "\n".join(conn.iterdump()).encode()
        finally:
            conn.close()

    def execute(sql: str) -> None:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.executescript(sql)
        finally:
            conn.close()

    def version() -> int:
        conn = sqlite3.connect(path)
        try:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()

    return Db(
        new_store=lambda: SqliteStore(path),
        dump=dump,
        execute=execute,
        destroy=lambda: shutil.rmtree(path.parent),
        fail_audit_inserts="CREATE TRIGGER fail_audit BEFORE INSERT ON audit"
        f" WHEN NEW.peer = '{DOOMED}' BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
        first_schema=FIRST_SQLITE_SCHEMA,
        version=version,
    )


def postgres_db(cluster: pg.Cluster, url: str) -> Db:
    schema = url.rsplit("%3D", 1)[1]

    def dump() -> bytes:
        argv = [str(cluster.bindir / "pg_dump"), "--data-only", "--inserts", "-n", schema, url]
        return subprocess.run(argv, capture_output=True, check=True, timeout=30).stdout

    def execute(sql: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.encode())

    def version() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('kubecertd_schema')").fetchone() == (None,):
                return 0  # the first release's database has no such table
            row = conn.execute("SELECT max(version) FROM kubecertd_schema").fetchone()
            return int(row[0]) if row and row[0] is not None else 0

    return Db(
        new_store=lambda: PostgresStore(url),
        dump=dump,
        execute=execute,
        destroy=lambda: cluster.drop_schema(schema),
        fail_audit_inserts="CREATE FUNCTION fail_audit() RETURNS trigger LANGUAGE plpgsql"
        " AS $$BEGIN RAISE EXCEPTION 'disk on fire'; END$$;"
        " CREATE TRIGGER fail_audit BEFORE INSERT ON audit"
        f" FOR EACH ROW WHEN (NEW.peer = '{DOOMED}') EXECUTE FUNCTION fail_audit();",
        first_schema=FIRST_POSTGRES_SCHEMA,
        version=version,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    """A fresh database, one of each kind, that no store has opened yet."""
    if request.param == "sqlite":
        return sqlite_db(tmp_path / "state" / "state.db")
    cluster = request.getfixturevalue("postgres_cluster")
    return postgres_db(cluster, request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(fresh_db: Db) -> Iterator[Store]:
    """An open store on a fresh database, one of each kind."""
    opened = fresh_db.new_store()
    opened.open()
    yield opened
    opened.close()


@pytest.fixture
def db(store: Store, fresh_db: Db) -> Db:
    """Raw access to the database behind ``store``."""
    return fresh_db


@pytest.fixture
def another(db: Db) -> Iterator[Callable[[], Store]]:
    """Opens more stores on the same database, as other replicas would."""
    opened: list[Store] = []

    def open_another() -> Store:
        new = db.new_store()
        new.open()
        opened.append(new)
        return new

    yield open_another
    for each in opened:
        each.close()


@pytest.fixture(params=["sqlite", "postgres"])
def new_db(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Db]:
    """Makes fresh databases of one kind, as many as a test needs (one per hypothesis example)."""
    names = itertools.count()
    if request.param == "sqlite":
        return lambda: sqlite_db(tmp_path / f"db{next(names)}" / "state.db")
    cluster = request.getfixturevalue("postgres_cluster")
    return lambda: postgres_db(cluster, cluster.url(pg.DATABASE, schema=cluster.create_schema()))


@contextlib.contextmanager
def opened(db: Db) -> Iterator[Store]:
    """An open store on ``db``; afterwards closed and the database destroyed."""
    store = db.new_store()
    store.open()
    try:
        yield store
    finally:
        store.close()
        db.destroy()


# --- tokens ---------------------------------------------------------------------------


def test_created_token_is_found(store: Store) -> None:
    """A created token is found by id, equal to what was stored."""
    token = make_token()
    store.create_token(token)
    assert store.find_token(token.id, T0) == token


def test_unknown_token_is_not_found(store: Store) -> None:
    """find_token answers None for an id that was never created."""
    assert store.find_token("ffffffffffff", T0) is None


def test_token_times_come_back_in_utc(store: Store) -> None:
    """Times given in another zone come back as the same instants, as aware UTC."""
    token = make_token(created=T0.astimezone(JST))
    store.create_token(token)
    found = store.find_token(token.id, T0)
    assert found == token
    assert found is not None
    assert found.created.utcoffset() == found.expires.utcoffset() == dt.timedelta(0)


def test_duplicate_token_id_is_a_store_error(store: Store) -> None:
    """A second token with an existing id is refused and the first one stays."""
    first = make_token()
    store.create_token(first)
    with pytest.raises(StoreError):
        store.create_token(make_token(node=OTHER))
    assert store.find_token(first.id, T0) == first


def test_list_tokens_outstanding_oldest_first(store: Store) -> None:
    """list_tokens shows unspent, unrevoked, unexpired tokens, oldest first."""
    third = make_token("00000000000c", created=T0 + 2 * MINUTE)
    first = make_token("00000000000a", created=T0)
    second = make_token("00000000000b", created=T0 + MINUTE)
    expired = make_token("0000000000e0", created=T0 - 2 * HOUR)
    spent = make_token("0000000000e1")
    revoked = make_token("0000000000e2")
    for token in (third, first, second, expired, spent, revoked):
        store.create_token(token)
    assert store.commit(issued(endpoint="enroll"), spend_token=spent.id) == Verdict()
    assert store.revoke_token(revoked.id)
    assert store.list_tokens(T0 + 5 * MINUTE) == [first, second, third]


def test_revoke_token_once(store: Store) -> None:
    """revoke_token is True for an outstanding token only, which is then gone."""
    token = make_token()
    store.create_token(token)
    assert store.revoke_token(token.id) is True
    assert store.revoke_token(token.id) is False
    assert store.revoke_token("ffffffffffff") is False
    assert store.find_token(token.id, T0) is None
    assert store.list_tokens(T0) == []


def test_revoking_a_spent_token_is_false(store: Store) -> None:
    """A spent token is no longer outstanding, so it cannot be revoked."""
    token = make_token()
    store.create_token(token)
    store.commit(issued(endpoint="enroll"), spend_token=token.id)
    assert store.revoke_token(token.id) is False


# --- spending -------------------------------------------------------------------------


def test_token_spends_once(store: Store) -> None:
    """The first commit spends the token; the second is refused and audited as such."""
    token = make_token()
    store.create_token(token)
    assert store.commit(issued(endpoint="enroll"), spend_token=token.id) == Verdict()
    again = issued(T0 + SECOND, endpoint="enroll")
    assert store.commit(again, spend_token=token.id) == TOKEN_INVALID
    assert store.find_token(token.id, T0) is None
    assert [(r.outcome, r.code) for r in store.audit()] == [
        (ISSUED, None),
        (REFUSED, "token-invalid"),
    ]


def _unknown(store: Store) -> str:
    return "ffffffffffff"


def _spent(store: Store) -> str:
    store.create_token(make_token())
    store.commit(issued(T0 - MINUTE, endpoint="enroll"), spend_token=TOKEN_ID)
    return TOKEN_ID


def _expired(store: Store) -> str:
    store.create_token(make_token(created=T0 - HOUR))
    return TOKEN_ID


def _revoked(store: Store) -> str:
    store.create_token(make_token())
    store.revoke_token(TOKEN_ID)
    return TOKEN_ID


def _other_nodes(store: Store) -> str:
    store.create_token(make_token(node=OTHER))
    return TOKEN_ID


@pytest.mark.parametrize("prepare", [_unknown, _spent, _expired, _revoked, _other_nodes], ids=_name)
def test_every_bad_token_gets_the_same_answer(
    store: Store, prepare: Callable[[Store], str]
) -> None:
    """Unknown, spent, expired, revoked and other nodes' tokens get one identical refusal."""
    token_id = prepare(store)
    assert store.commit(issued(endpoint="enroll"), spend_token=token_id) == TOKEN_INVALID
    [*_, last] = store.audit()
    assert (last.outcome, last.code, last.message) == (
        REFUSED,
        "token-invalid",
        TOKEN_INVALID.message,
    )


@pytest.mark.parametrize(
    ("offset", "verdict"),
    [(-1, Verdict()), (0, TOKEN_INVALID), (1, TOKEN_INVALID)],
    ids=["second-before-expiry", "at-expiry", "second-after-expiry"],
)
def test_token_expiry_boundary(store: Store, offset: int, verdict: Verdict) -> None:
    """A token is good until one second before ``expires`` and bad from then on."""
    token = make_token()
    store.create_token(token)
    when = token.expires + offset * SECOND
    assert store.commit(issued(when, endpoint="enroll"), spend_token=token.id) == verdict


def test_a_refusal_spends_no_token(store: Store) -> None:
    """A token presented for a revoked node stays unspent and works once the node is allowed."""
    token = make_token()
    store.create_token(token)
    store.set_node_revoked(NODE, True, T0)
    verdict = store.commit(issued(endpoint="enroll"), spend_token=token.id)
    assert verdict.code == "node-revoked"
    assert store.find_token(token.id, T0) == token
    store.set_node_revoked(NODE, False, T0)
    assert store.commit(issued(endpoint="enroll"), spend_token=token.id) == Verdict()


def test_a_refused_record_spends_no_token(store: Store) -> None:
    """A record the handler already refused is written as it is, and spends nothing."""
    token = make_token()
    store.create_token(token)
    record = refused_csr()
    assert store.commit(record, spend_token=token.id) == Verdict("bad-csr", "not a CSR")
    assert store.find_token(token.id, T0) == token
    assert store.audit() == [record]


def test_concurrent_spends_one_wins(store: Store, another: Callable[[], Store]) -> None:
    """Two replicas spending one token at the same moment: exactly one succeeds."""
    token = make_token()
    store.create_token(token)
    record = issued(endpoint="enroll")
    spends = [functools.partial(another().commit, record, spend_token=token.id) for _ in "ab"]
    assert sorted(v.code or "" for v in together(*spends)) == ["", "token-invalid"]
    assert [r.outcome for r in store.audit()].count(ISSUED) == 1


# --- node revocation ------------------------------------------------------------------


def test_node_revoke_and_allow(store: Store) -> None:
    """Revoking is per node and idempotent, and allowing undoes it."""
    assert store.is_node_revoked(NODE) is False
    store.set_node_revoked(NODE, True, T0)
    store.set_node_revoked(NODE, True, T0 + MINUTE)
    assert store.is_node_revoked(NODE) is True
    assert store.is_node_revoked(OTHER) is False
    store.set_node_revoked(NODE, False, T0)
    store.set_node_revoked(NODE, False, T0)
    assert store.is_node_revoked(NODE) is False


@pytest.mark.parametrize("endpoint", ["sign", "enroll", "identity"])
def test_revoked_node_is_refused_and_audited(store: Store, endpoint: str) -> None:
    """Issuance to a revoked node is refused, and the refusal is the audit record."""
    store.set_node_revoked(NODE, True, T0 - HOUR)
    record = issued(endpoint=endpoint)
    verdict = store.commit(record, rate_limit=10)
    assert verdict.code == "node-revoked"
    assert NODE in verdict.message
    expected = dataclasses.replace(
        record,
        outcome=REFUSED,
        code="node-revoked",
        message=verdict.message,
        serial=None,
        not_before=None,
        not_after=None,
    )
    assert store.audit() == [expected]


# --- rate limit -----------------------------------------------------------------------


def _fill(store: Store, times: list[dt.datetime], limit: int = 3) -> None:
    for when in times:
        assert store.commit(issued(when), rate_limit=limit) == Verdict()


@pytest.mark.parametrize(
    ("after_first", "retry_after"),
    [
        (dt.timedelta(minutes=30), 1800),
        (HOUR - SECOND, 1),
        (HOUR, None),
        (HOUR + SECOND, None),
        (HOUR - dt.timedelta(seconds=1.5), 2),
    ],
    ids=["mid-window", "second-before-edge", "at-edge", "second-after-edge", "rounds-up"],
)
def test_rate_limit_window_edge(
    store: Store, after_first: dt.timedelta, retry_after: int | None
) -> None:
    """With the limit reached, the next issuance waits until the oldest leaves the hour."""
    _fill(store, [T0, T0 + 10 * MINUTE, T0 + 20 * MINUTE])
    verdict = store.commit(issued(T0 + after_first), rate_limit=3)
    assert verdict.retry_after == retry_after
    assert verdict.code == (None if retry_after is None else "rate-limited")


def test_rate_limit_allows_exactly_n(store: Store) -> None:
    """N issuances in an hour pass, the N+1th is refused, audited, and counts for nothing."""
    _fill(store, [T0 + n * SECOND for n in range(10)], limit=10)
    verdict = store.commit(issued(T0 + 10 * SECOND), rate_limit=10)
    assert (verdict.code, verdict.retry_after) == ("rate-limited", 3590)
    [*_, last] = store.audit()
    assert (last.outcome, last.code, last.serial) == (REFUSED, "rate-limited", None)
    assert store.commit(issued(T0 + HOUR), rate_limit=10) == Verdict()


def test_refused_records_do_not_count(store: Store) -> None:
    """Refusals (bad CSRs, earlier rate limits) never use up the node's allowance."""
    _fill(store, [T0, T0 + SECOND])
    for n in range(5):
        store.commit(refused_csr(T0 + (2 + n) * SECOND))
    assert store.commit(issued(T0 + 10 * SECOND), rate_limit=3) == Verdict()
    for n in range(3):
        verdict = store.commit(issued(T0 + (11 + n) * SECOND), rate_limit=3)
        assert verdict.code == "rate-limited"
    assert store.commit(issued(T0 + HOUR), rate_limit=3) == Verdict()


def test_rate_limit_counts_this_nodes_signing_only(store: Store) -> None:
    """Other nodes' certificates and identity issuances do not count toward the limit."""
    for n in range(3):
        store.commit(issued(T0 + n * SECOND, node=OTHER))
        store.commit(issued(T0 + n * SECOND, endpoint="identity"))
        store.commit(issued(T0 + n * SECOND, endpoint="enroll"))
    assert store.commit(issued(T0 + 10 * SECOND), rate_limit=1) == Verdict()
    assert store.commit(issued(T0 + 11 * SECOND), rate_limit=1).code == "rate-limited"


def test_lowered_limit_waits_until_enough_have_expired(store: Store) -> None:
    """With more issuances than a lowered limit, Retry-After waits for enough to leave."""
    _fill(store, [T0 + n * MINUTE for n in range(5)], limit=5)
    verdict = store.commit(issued(T0 + 10 * MINUTE), rate_limit=3)
    # Three of five must leave: the third oldest, at T0 + 2 min, leaves at T0 + 62 min.
    assert verdict.retry_after == 52 * 60


def test_rate_limit_holds_across_replicas(store: Store, another: Callable[[], Store]) -> None:
    """Eight replicas committing at once, twice each, issue exactly the limit of five."""

    def twice(replica: Store, n: int) -> list[Verdict]:
        return [replica.commit(issued(T0 + k * SECOND), rate_limit=5) for k in (n, n + 8)]

    bursts = together(*(functools.partial(twice, another(), n) for n in range(8)))
    codes = [v.code for burst in bursts for v in burst]
    assert (codes.count(None), codes.count("rate-limited")) == (5, 11)
    assert [r.outcome for r in store.audit(NODE)].count(ISSUED) == 5


# --- group commit ---------------------------------------------------------------------


def test_empty_batch_writes_nothing(store: Store) -> None:
    """commit_many of no items answers no verdicts and writes nothing."""
    assert store.commit_many([]) == []
    assert store.audit() == []


def test_batch_spends_a_token_once(store: Store) -> None:
    """A token spent by one item of a batch is refused to a later item of the same batch."""
    token = make_token()
    store.create_token(token)
    batch = [
        Commit(issued(endpoint="enroll"), spend_token=token.id),
        Commit(issued(T0 + SECOND, endpoint="enroll"), spend_token=token.id),
    ]
    assert store.commit_many(batch) == [Verdict(), TOKEN_INVALID]
    assert store.find_token(token.id, T0) is None
    assert [(r.outcome, r.code) for r in store.audit()] == [
        (ISSUED, None),
        (REFUSED, "token-invalid"),
    ]


def test_batch_counts_its_own_issuances(store: Store) -> None:
    """Issuances earlier in a batch count toward the limit of later items, refusals do not,
    and Retry-After is computed from them."""
    _fill(store, [T0, T0 + 10 * MINUTE])
    batch = [
        Commit(issued(T0 + 20 * MINUTE), rate_limit=3),
        Commit(refused_csr(T0 + 25 * MINUTE)),
        Commit(issued(T0 + 30 * MINUTE), rate_limit=3),  # T0's leaves the hour at T0 + 60 min
        Commit(issued(T0 + 40 * MINUTE), rate_limit=3),
        Commit(issued(T0 + HOUR), rate_limit=3),  # T0's has left: a slot
        Commit(issued(T0 + HOUR + SECOND), rate_limit=3),  # T0 + 10 min's leaves at T0 + 70 min
    ]
    verdicts = store.commit_many(batch)
    assert [(v.code, v.retry_after) for v in verdicts] == [
        (None, None),
        ("bad-csr", None),
        ("rate-limited", 1800),
        ("rate-limited", 1200),
        (None, None),
        ("rate-limited", 599),
    ]
    assert [r.outcome for r in store.audit(NODE)].count(ISSUED) == 4


def test_refusal_in_a_batch_spends_nothing_for_later_items(store: Store) -> None:
    """A token presented by an item the store refuses is still good for a later item."""
    token = make_token()
    store.create_token(token)
    batch = [
        Commit(issued(), spend_token=token.id, rate_limit=0),
        Commit(issued(T0 + SECOND, endpoint="enroll"), spend_token=token.id),
    ]
    assert [v.code for v in store.commit_many(batch)] == ["rate-limited", None]
    assert store.find_token(token.id, T0) is None


def test_failed_batch_writes_nothing(store: Store, db: Db) -> None:
    """A batch failing at its third write is one StoreError: the records before it and the
    token its first item spent are not written either, and the store goes on."""
    token = make_token()
    store.create_token(token)
    db.execute(db.fail_audit_inserts)
    batch = [
        Commit(issued(endpoint="enroll"), spend_token=token.id),
        Commit(issued(T0 + SECOND), rate_limit=3),
        Commit(issued(T0 + 2 * SECOND, peer=DOOMED), rate_limit=3),
    ]
    with pytest.raises(StoreError, match="disk on fire") as caught:
        store.commit_many(batch)
    assert isinstance(caught.value.__cause__, (sqlite3.Error, psycopg.Error))
    assert store.find_token(token.id, T0) == token
    assert store.audit() == []
    assert store.commit_many(batch[:2]) == [Verdict(), Verdict()]


def test_batches_in_opposite_node_orders_do_not_deadlock(
    store: Store, another: Callable[[], Store]
) -> None:
    """Two replicas committing batches for the same two nodes in opposite orders, ten at
    once each: none fails, and each node gets exactly its limit of fifteen."""

    def batches(replica: Store, nodes: tuple[str, str], offset: int) -> list[Verdict]:
        verdicts = []
        for n in range(10):
            when = T0 + (2 * n + offset) * SECOND
            batch = [Commit(issued(when, node=node), rate_limit=15) for node in nodes]
            verdicts += replica.commit_many(batch)
        return verdicts

    results = together(
        functools.partial(batches, another(), (NODE, OTHER), 0),
        functools.partial(batches, another(), (OTHER, NODE), 1),
    )
    codes = [v.code for verdicts in results for v in verdicts]
    assert (codes.count(None), codes.count("rate-limited")) == (30, 10)
    for node in (NODE, OTHER):
        assert [r.outcome for r in store.audit(node)].count(ISSUED) == 15


REVOKED = "server9999z.prod.jp.local"
GOOD, OTHERS, SHORT = "0000000000a1", "0000000000a2", "0000000000a3"


def seed(store: Store) -> None:
    """The state the generated batches start from: tokens of two nodes, one expiring
    early, a revoked node and one earlier issuance that leaves the hour at T0 + 30 min."""
    store.create_token(make_token(GOOD))  # expires at T0 + 1 h
    store.create_token(make_token(OTHERS, node=OTHER))
    store.create_token(make_token(SHORT, created=T0 - 50 * MINUTE))  # expires at T0 + 10 min
    store.set_node_revoked(REVOKED, True, T0 - HOUR)
    store.commit(issued(T0 - 30 * MINUTE))


@st.composite
def commits(draw: st.DrawFn) -> Commit:
    """An item about the seeded state, with times either side of its boundaries; mostly
    NODE's signing, so that items of one batch meet on its token and its limit."""
    seconds = draw(st.sampled_from([0, 1, 599, 600, 1799, 1800, 1801, 3599, 3600]))
    record = issued(
        T0 + seconds * SECOND,
        node=draw(st.sampled_from([NODE, NODE, NODE, OTHER, REVOKED, None])),
        endpoint=draw(st.sampled_from(["sign", "sign", "sign", "enroll", "identity"])),
    )
    if draw(st.integers(0, 5)) == 0:  # some refused by the handler already
        record = dataclasses.replace(
            refused_csr(record.time, record.node), endpoint=record.endpoint
        )
    token = draw(st.sampled_from([None, None, GOOD, GOOD, OTHERS, SHORT, "ffffffffffff"]))
    return Commit(record, token, draw(st.sampled_from([None, 0, 1, 2, 2, 3])))


@given(batch=st.lists(commits(), min_size=2, max_size=8))
@settings(
    max_examples=40,
    deadline=None,
    # new_db is a factory: every example opens databases of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_batch_equals_commits_one_by_one(new_db: Callable[[], Db], batch: list[Commit]) -> None:
    """commit_many gives the verdicts, audit and tokens that committing its items one by
    one gives."""
    with opened(new_db()) as one_by_one, opened(new_db()) as batched:
        seed(one_by_one)
        seed(batched)
        expected = [
            one_by_one.commit(i.record, spend_token=i.spend_token, rate_limit=i.rate_limit)
            for i in batch
        ]
        assert batched.commit_many(batch) == expected
        assert batched.audit() == one_by_one.audit()
        assert batched.list_tokens(T0 - HOUR) == one_by_one.list_tokens(T0 - HOUR)


# --- audit ----------------------------------------------------------------------------


def test_audit_round_trips_every_field(store: Store) -> None:
    """Every field of a record comes back as written, times as aware UTC."""
    record = issued(T0.astimezone(JST), reason="cert-missing", identity="kubelet:0a1b")
    store.commit(record)
    [back] = store.audit()
    assert back == record
    for when in (back.time, back.not_before, back.not_after):
        assert when is not None
        assert when.utcoffset() == dt.timedelta(0)


def test_audit_filters_by_node_oldest_first(store: Store) -> None:
    """audit(node) lists that node's records only, oldest first whatever the write order."""
    late, early = issued(T0 + MINUTE), issued(T0)
    anonymous = dataclasses.replace(refused_csr(T0, node=None), identity="anonymous")
    for record in (late, issued(T0, node=OTHER), early, anonymous):
        store.commit(record)
    assert store.audit(NODE) == [early, late]
    assert store.audit()[-1] == late
    assert anonymous in store.audit()


def test_audit_offset_pages_back(store: Store) -> None:
    """With an offset, audit skips that many of the newest: pages follow each other."""
    records = [issued(T0 + n * SECOND) for n in range(5)]
    for record in records:
        store.commit(record)
    assert store.audit(limit=2, offset=0) == records[3:]
    assert store.audit(limit=2, offset=2) == records[1:3]
    assert store.audit(limit=2, offset=4) == records[:1]
    assert store.audit(NODE, limit=10, offset=5) == []


def test_audit_node_finds_a_claimed_node(store: Store) -> None:
    """audit(node) also lists records whose request only claimed that node, and the claim
    stays apart from the record's node."""
    unknown = dataclasses.replace(
        refused_csr(T0, node=None), identity="token:0123456789ab", claimed_node=OTHER
    )
    store.commit(unknown)
    store.commit(issued(T0 + SECOND))
    assert store.audit(OTHER) == [unknown]
    [back] = store.audit(OTHER)
    assert back.node is None
    assert back.claimed_node == OTHER


def test_commit_past_its_answer_by_writes_nothing(store: Store) -> None:
    """A batch whose answer_by has passed (the signer answered 503) is a StoreError and
    spends, counts and audits nothing; one in time commits."""
    store.create_token(make_token())
    late = dt.datetime.now(UTC) - SECOND
    batch = [Commit(issued(endpoint="enroll"), spend_token=TOKEN_ID, answer_by=late)]
    with pytest.raises(StoreError, match="too late to commit"):
        store.commit_many(batch)
    assert store.audit() == []
    assert store.find_token(TOKEN_ID, T0) == make_token()
    soon = dt.datetime.now(UTC) + dt.timedelta(seconds=30)
    assert store.commit_many([dataclasses.replace(batch[0], answer_by=soon)]) == [Verdict()]


def test_ping_reaches_the_database(store: Store, db: Db) -> None:
    """ping succeeds on a working database and is a StoreError once it is gone."""
    store.ping()
    db.destroy()
    with pytest.raises(StoreError):
        store.ping()


def test_audit_limit_keeps_the_newest(store: Store) -> None:
    """With a limit, audit gives the newest records, still oldest first."""
    records = [issued(T0 + n * SECOND) for n in range(5)]
    for record in records:
        store.commit(record)
    assert store.audit(limit=2) == records[3:]
    assert store.audit(NODE, limit=3) == records[2:]


CLAIMS = [
    "unlink /var/lib/kubelet/pki/kubelet-client-current.pem by rm[4242] uid 0\nsecond record",
    "é" * 512,  # 1024 bytes of UTF-8
    "x" * 1024,
    "'; DROP TABLE audit; --",
    "a\n\nb\n",
    "\n",
    '日本語 ✓ 🔑 \\ "quoted"',
]


def test_audit_keeps_the_claim_verbatim(store: Store) -> None:
    """A claim comes back exactly as written, whatever its lines or script; none stays None."""
    records = [claimed(T0 + n * SECOND, claim=claim) for n, claim in enumerate(CLAIMS)]
    records.append(issued(T0 + MINUTE))
    for record in records:
        store.commit(record)
    assert store.audit() == records
    assert store.audit()[-1].claim is None


def test_a_refusal_in_the_store_keeps_the_claim(store: Store) -> None:
    """When the store refuses an issuance (node-revoked), the audited refusal keeps the claim."""
    store.set_node_revoked(NODE, True, T0)
    record = claimed()
    assert store.commit(record, rate_limit=10).code == "node-revoked"
    [back] = store.audit()
    assert (back.outcome, back.code, back.claim) == (REFUSED, "node-revoked", record.claim)


def test_audit_since_takes_records_from_that_moment_on(store: Store) -> None:
    """audit(since=T) lists the records at T and after: one second either side of T."""
    records = [claimed(T0 - SECOND), issued(T0), claimed(T0 + SECOND)]
    for record in records:
        store.commit(record)
    assert store.audit(since=T0) == records[1:]
    assert store.audit(since=T0 + SECOND) == records[2:]
    assert store.audit(since=T0 + 2 * SECOND) == []
    assert store.audit(since=(T0 - SECOND).astimezone(JST)) == records


def test_audit_claims_only(store: Store) -> None:
    """claims_only lists the records carrying a claim; node, since and limit apply as well."""
    plain = [issued(T0 + n * MINUTE) for n in range(3)]
    mine = [claimed(T0 + n * MINUTE + SECOND) for n in range(2)]
    other = claimed(T0 + 10 * MINUTE, node=OTHER)
    for record in (*plain, *mine, other):
        store.commit(record)
    assert store.audit(claims_only=True) == [*mine, other]
    assert store.audit(NODE, claims_only=True) == mine
    assert store.audit(claims_only=True, limit=1) == [other]
    assert store.audit(NODE, claims_only=True, since=T0 + MINUTE) == mine[1:]
    assert len(store.audit(NODE)) == 5


SCHEMA_VERSION = 2  # migrations in this release: 1 adds audit.claim, 2 claimed_node (+ answer_by)


def test_new_database_is_at_this_releases_schema(store: Store, db: Db) -> None:
    """A database the store creates records this release's schema version."""
    assert db.version() == SCHEMA_VERSION


def test_first_release_database_is_migrated(fresh_db: Db) -> None:
    """A state database of the first release opens and is migrated once: its records come
    back without a claim, new ones keep theirs, and a first-release signer still writes."""
    old = issued(T0 - MINUTE, reason="cert-missing")
    fresh_db.execute(fresh_db.first_schema + first_release_insert(old) + ";")
    assert fresh_db.version() == 0
    store = fresh_db.new_store()
    store.open()
    try:
        assert fresh_db.version() == SCHEMA_VERSION
        assert store.audit() == [old]
        new = claimed(T0)
        assert store.commit(new) == Verdict()
        later = issued(T0 + SECOND)  # from a replica not yet upgraded
        fresh_db.execute(first_release_insert(later))
        assert store.audit() == [old, new, later]
        assert store.audit(claims_only=True) == [new]
        assert store.commit(issued(T0 + MINUTE), rate_limit=3).code == "rate-limited"
    finally:
        store.close()
    reopened = fresh_db.new_store()
    reopened.open()
    try:
        assert [r.claim for r in reopened.audit()] == [None, new.claim, None, None]
        assert fresh_db.version() == SCHEMA_VERSION
    finally:
        reopened.close()


def test_state_survives_reopening(store: Store, db: Db) -> None:
    """Tokens, revocations and the audit are still there after close and open."""
    store.create_token(make_token())
    store.set_node_revoked(OTHER, True, T0)
    store.commit(issued())
    store.close()
    reopened = db.new_store()
    reopened.open()
    try:
        assert reopened.find_token(TOKEN_ID, T0) == make_token()
        assert reopened.is_node_revoked(OTHER) is True
        assert reopened.audit() == [issued()]
    finally:
        reopened.close()


def test_no_token_secret_in_the_database(store: Store, db: Db) -> None:
    """Only the hash of a token's secret reaches the database, whatever happens to it."""
    token_id, secret = new_token()
    store.create_token(make_token(token_id, secret=secret))
    record = issued(endpoint="enroll", identity=f"token:{token_id}")
    store.commit(record, spend_token=token_id)
    store.commit(record, spend_token=token_id)
    raw = db.dump()
    assert hash_secret(secret).encode() in raw  # the dump is real
    assert secret.encode() not in raw


# --- failures -------------------------------------------------------------------------


def test_failed_commit_leaves_nothing(store: Store, db: Db) -> None:
    """A commit failing at its last write is a StoreError that spends no token and audits nothing."""
    token = make_token()
    store.create_token(token)
    db.execute(db.fail_audit_inserts)
    with pytest.raises(StoreError, match="disk on fire") as caught:
        store.commit(issued(endpoint="enroll", peer=DOOMED), spend_token=token.id)
    assert isinstance(caught.value.__cause__, (sqlite3.Error, psycopg.Error))
    assert store.find_token(token.id, T0) == token
    assert store.audit() == []


def test_vanished_database_is_a_store_error(store: Store, db: Db) -> None:
    """With the database gone, every write is a StoreError: the signer fails closed."""
    store.create_token(make_token())
    db.destroy()
    with pytest.raises(StoreError):
        store.commit(issued(endpoint="enroll"), spend_token=TOKEN_ID)
    with pytest.raises(StoreError):
        store.commit(refused_csr())
    with pytest.raises(StoreError):
        store.commit_many([Commit(refused_csr()), Commit(issued(), rate_limit=3)])
    with pytest.raises(StoreError):
        store.create_token(make_token("00000000000f"))
    with pytest.raises(StoreError):
        store.set_node_revoked(NODE, True, T0)


def _parent_is_a_file(tmp_path: Path) -> Store:
    (tmp_path / "file").write_text("")
    return SqliteStore(tmp_path / "file" / "state.db")


def _not_a_database(tmp_path: Path) -> Store:
    (tmp_path / "state.db").write_bytes(b"certainly not SQLite " * 100)
    return SqliteStore(tmp_path / "state.db")


def _connection_refused(tmp_path: Path) -> Store:
    return PostgresStore("postgresql://signer:hunter2@127.0.0.1:1/kubecertd?connect_timeout=2")


def _bad_url(tmp_path: Path) -> Store:
    return PostgresStore("postgresql://signer:hunter2@[bad/kubecertd?port=x")


@pytest.mark.parametrize(
    "make", [_parent_is_a_file, _not_a_database, _connection_refused, _bad_url], ids=_name
)
def test_unusable_database_is_a_store_error_at_open(
    make: Callable[[Path], Store], tmp_path: Path
) -> None:
    """A database that cannot be opened is a StoreError that names it, never its password."""
    unusable = make(tmp_path)
    with pytest.raises(StoreError) as caught:
        unusable.open()
    unusable.close()
    assert "hunter2" not in str(caught.value)
    assert "state database" in str(caught.value)


def _terminate_others(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


def test_postgres_runs_again_on_a_fresh_connection(postgres_url: str) -> None:
    """A connection killed while idle costs no failure: a read or a batch runs once more on
    a fresh connection, and the batch is written once."""
    replica = PostgresStore(postgres_url)
    replica.open()
    try:
        replica.create_token(make_token())
        _terminate_others(postgres_url)
        assert replica.find_token(TOKEN_ID, T0) == make_token()
        _terminate_others(postgres_url)
        batch = [
            Commit(issued(endpoint="enroll"), spend_token=TOKEN_ID),
            Commit(issued(T0 + SECOND)),
        ]
        assert replica.commit_many(batch) == [Verdict(), Verdict()]
        assert replica.audit() == [batch[0].record, batch[1].record]
        _terminate_others(postgres_url)
        replica.ping()
    finally:
        replica.close()


def test_postgres_lost_single_write_is_not_repeated(postgres_url: str) -> None:
    """An autocommit write whose connection was lost may have committed: it fails once
    (StoreError), is not run again, and the next call reconnects."""
    replica = PostgresStore(postgres_url)
    replica.open()
    try:
        _terminate_others(postgres_url)
        with pytest.raises(StoreError, match="cannot create token"):
            replica.create_token(make_token())
        replica.create_token(make_token())
        assert replica.find_token(TOKEN_ID, T0) == make_token()
    finally:
        replica.close()


def test_postgres_row_past_its_answer_by_cannot_commit(postgres_url: str) -> None:
    """The database itself refuses to COMMIT an audit row whose answer_by has passed (the
    deferred trigger), whoever inserts it; a row without answer_by (an older replica's)
    commits."""
    PostgresStore(postgres_url).open()  # creates and migrates the schema
    with psycopg.connect(postgres_url) as raw:
        raw.execute(
            "INSERT INTO audit (time, endpoint, identity, reason, outcome, message, peer,"
            " answer_by) VALUES (now(), 'sign', 'x', '', 'issued', 'issued', 'p',"
            " clock_timestamp() + interval '200 milliseconds')"
        )
        raw.execute("SELECT pg_sleep(0.4)")  # the statements pass; the COMMIT is late
        with pytest.raises(psycopg.errors.RaiseException, match="too late to commit"):
            raw.commit()
    with psycopg.connect(postgres_url, autocommit=True) as raw:
        raw.execute(
            "INSERT INTO audit (time, endpoint, identity, reason, outcome, message, peer)"
            " VALUES (now(), 'sign', 'x', '', 'issued', 'issued', 'p')"
        )
        assert raw.execute("SELECT count(*) FROM audit").fetchone() == (1,)


def test_postgres_migration_from_version_1_adds_the_guard(postgres_url: str) -> None:
    """A database at version 1 (the claim column) is brought to version 2 with its
    answer_by trigger."""
    with psycopg.connect(postgres_url, autocommit=True) as raw:
        raw.execute(FIRST_POSTGRES_SCHEMA.encode())
        raw.execute(
            "ALTER TABLE audit ADD COLUMN claim text;"
            " CREATE TABLE kubecertd_schema (version integer PRIMARY KEY,"
            " applied timestamptz NOT NULL DEFAULT now());"
            " INSERT INTO kubecertd_schema (version) VALUES (1)"
        )
    replica = PostgresStore(postgres_url)
    replica.open()
    try:
        late = dt.datetime.now(UTC) - SECOND
        with pytest.raises(StoreError, match="too late to commit"):
            replica.commit_many([Commit(issued(), answer_by=late)])
        with psycopg.connect(postgres_url, autocommit=True) as raw:
            row = raw.execute(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'audit_answer_in_time'"
                " AND tgdeferrable AND tginitdeferred"
            ).fetchone()
            assert row == (1,)
    finally:
        replica.close()


def test_postgres_connection_lost_mid_batch_writes_nothing(postgres_url: str) -> None:
    """A server connection lost in the middle of a batch is a StoreError; nothing of the
    batch is written, and the next batch reconnects."""
    replica = PostgresStore(postgres_url)
    replica.open()
    try:
        replica.create_token(make_token())
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "CREATE FUNCTION cut_off() RETURNS trigger LANGUAGE plpgsql AS"
                " $$BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END$$;"
                " CREATE TRIGGER cut_off BEFORE INSERT ON audit"
                f" FOR EACH ROW WHEN (NEW.peer = '{DOOMED}') EXECUTE FUNCTION cut_off();"
            )
        batch = [
            Commit(issued(endpoint="enroll"), spend_token=TOKEN_ID),
            Commit(issued(T0 + SECOND), rate_limit=3),
            Commit(issued(T0 + 2 * SECOND, peer=DOOMED), rate_limit=3),
        ]
        with pytest.raises(StoreError, match="cannot record 3 decisions"):
            replica.commit_many(batch)
        assert replica.audit() == []
        assert replica.find_token(TOKEN_ID, T0) == make_token()
        assert replica.commit_many(batch[:2]) == [Verdict(), Verdict()]
    finally:
        replica.close()


# --- SQLite: files and processes ------------------------------------------------------


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    """A new state directory is 0700 and the database and its WAL files are 0600."""
    path = tmp_path / "new" / "state.db"
    sqlite = SqliteStore(path)
    sqlite.open()
    try:
        sqlite.commit(issued())
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
        assert modes == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}
    finally:
        sqlite.close()


def test_sqlite_open_waits_for_another_worker_creating_the_file(tmp_path: Path) -> None:
    """Opening a new file that another worker holds locked waits for it instead of failing."""
    path = tmp_path / "state.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE early (a)")  # a new file, still in rollback-journal mode
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, other.execute, ("COMMIT",))
    release.start()
    sqlite = SqliteStore(path)
    try:
        sqlite.open()  # SQLite itself reports this lock at once, busy timeout or not
        assert sqlite.commit(issued()) == Verdict()
    finally:
        release.join()
        other.close()
        sqlite.close()


def test_sqlite_commits_sync_the_wal(tmp_path: Path) -> None:
    """The store's connection runs with synchronous FULL: in WAL mode every COMMIT syncs
    the WAL, so a decision answered survives a power loss (NORMAL would not)."""
    sqlite = SqliteStore(tmp_path / "state.db")
    sqlite.open()
    try:
        conn = sqlite._connection()
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        sqlite.close()


# One signer worker process, kept light (no pytest in it) so that four start quickly.
# It reports on stdout and waits for a line on stdin twice, so the test can make all
# workers open the file together and then commit together.
WORKER = """
import datetime as dt, json, sys
from kubecertd.signer.store import ISSUED, AuditRecord, Commit
from kubecertd.signer.store.sqlite import SqliteStore

def item(job):
    record = AuditRecord(
        time=dt.datetime.fromisoformat(job["time"]), endpoint=job["endpoint"],
        node=job["node"], identity="identity:5f0c1e", reason="", outcome=ISSUED,
    )
    return Commit(record, spend_token=job["token"], rate_limit=job["limit"])

def work(path, jobs, batch):
    print("started", flush=True)
    sys.stdin.readline()
    store = SqliteStore(path)
    store.open()
    print("opened", flush=True)
    sys.stdin.readline()
    codes = []
    for start in range(0, len(jobs), batch):
        codes += [v.code for v in store.commit_many([item(j) for j in jobs[start:start + batch]])]
    store.close()
    print(json.dumps(codes), flush=True)

work(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
"""


def _job(
    time: dt.datetime, endpoint: str = "sign", token: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    return {
        "time": time.isoformat(),
        "endpoint": endpoint,
        "node": NODE,
        "token": token,
        "limit": limit,
    }


def _run_workers(
    path: Path, logs: Path, jobs: list[list[dict[str, Any]]], batch: int = 1
) -> list[str | None]:
    """Run one worker process per job list, in lockstep, each committing ``batch`` jobs
    at a time; all their verdict codes."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [sys.executable, "-c", WORKER, os.fspath(path)]
    stderr = [logs / f"worker{n}.stderr" for n in range(len(jobs))]
    workers = []
    for job, log in zip(jobs, stderr, strict=True):
        with log.open("w") as sink:
            workers.append(
                subprocess.Popen(
                    [*argv, json.dumps(job), str(batch)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=sink,
                    text=True,
                    env=env,
                )
            )
    try:
        for step in ("started", "opened"):
            for worker, log in zip(workers, stderr, strict=True):
                assert worker.stdout is not None
                line = worker.stdout.readline().strip()
                assert line == step, f"worker {worker.pid}: {log.read_text()}"
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.write("go\n")
                worker.stdin.flush()
        outputs = [worker.communicate(timeout=30)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert [w.returncode for w in workers] == [0] * len(workers), [
        log.read_text() for log in stderr
    ]
    return [code for output in outputs for code in json.loads(output)]


def test_sqlite_token_spent_once_across_processes(tmp_path: Path) -> None:
    """Four worker processes presenting one token at once: exactly one is accepted."""
    path = tmp_path / "state.db"
    sqlite = SqliteStore(path)
    sqlite.open()
    sqlite.create_token(make_token())
    sqlite.close()
    job = [_job(T0, "enroll", token=TOKEN_ID)]
    codes = _run_workers(path, tmp_path, [job] * 4)
    assert sorted(code or "" for code in codes) == ["", *["token-invalid"] * 3]


def test_sqlite_rate_limit_holds_across_processes(tmp_path: Path) -> None:
    """Four worker processes opening a new file together issue exactly the limit between them."""
    path = tmp_path / "fresh" / "state.db"
    job = [_job(T0 + n * SECOND, limit=10) for n in range(5)]
    codes = _run_workers(path, tmp_path, [job] * 4)
    assert (codes.count(None), codes.count("rate-limited")) == (10, 10)
    sqlite = SqliteStore(path)
    sqlite.open()
    try:
        assert [r.outcome for r in sqlite.audit()].count(ISSUED) == 10
    finally:
        sqlite.close()


def test_sqlite_batches_hold_across_processes(tmp_path: Path) -> None:
    """Four worker processes committing a batch of five at once, each presenting one token
    and four issuances: the token is spent once and the limit of ten holds."""
    path = tmp_path / "state.db"
    sqlite = SqliteStore(path)
    sqlite.open()
    sqlite.create_token(make_token())
    sqlite.close()
    job = [_job(T0, "enroll", token=TOKEN_ID), *(_job(T0 + n * SECOND, limit=10) for n in range(4))]
    codes = _run_workers(path, tmp_path, [job] * 4, batch=5)
    enrolls = codes[0::5]
    signs = [code for n, code in enumerate(codes) if n % 5]
    assert sorted(code or "" for code in enrolls) == ["", *["token-invalid"] * 3]
    assert (signs.count(None), signs.count("rate-limited")) == (10, 6)
