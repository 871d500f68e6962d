"""The signer's state in PostgreSQL, shared by several signer replicas (SPEC).

Replicas agree through the database alone.  A token is spent by one conditional
UPDATE: under READ COMMITTED a second UPDATE of the same row waits for the first and
then re-checks its WHERE clause against the committed row, so it matches nothing
(https://www.postgresql.org/docs/current/transaction-iso.html#XACT-READ-COMMITTED).
A count cannot be protected that way, so a commit that issues first takes a
transaction-scoped advisory lock on the node; the next replica's count, a new
statement taken after the lock is granted, sees what the previous one committed.

``commit_many`` takes the locks of all the nodes its batch issues to at its start, in
the order of their keys, so two replicas' batches naming the same nodes in another
order wait for each other instead of deadlocking.  Its one transaction commits with
the server's ``synchronous_commit`` (on by default: durable at COMMIT), which the
store never lowers; one commit a batch is what group commit saves.

One connection per store, used by one thread at a time (a ``threading.Lock``; the
signer calls it from each worker's database thread): the signer's commits are short
and psycopg_pool is not a dependency.  A connection that died while idle (a server
restart, a fail-over, pg_terminate_backend) is noticed by the call that uses it next:
that call runs once more on a fresh connection when its transaction never reached
COMMIT, so nothing can have been written twice; a connection lost during COMMIT leaves
the outcome unknown, and the call fails (the signer answers 503).

Never "issued" to nobody.  The signer waits for a commit until ``answer_by`` plus a
margin (``app.ANSWER_MARGIN``) and then answers 503.  Each audit row carries its
``answer_by``, and a DEFERRABLE INITIALLY DEFERRED constraint trigger, run inside
COMMIT after every statement of the transaction, refuses the COMMIT once
``clock_timestamp()`` is past it (https://www.postgresql.org/docs/current/sql-createtrigger.html).
So a transaction that commits passed that check at or before ``answer_by``; what is
left of COMMIT (the WAL flush) and the way back to the signer must then take longer
than the margin, minus the clock difference of the two hosts, for the signer to have
given up on a commit that happened.  A frozen server (SIGSTOP, a stalled disk) that
resumes later finds every such transaction past its ``answer_by`` and rolls it back.
``statement_timeout`` and ``lock_timeout`` (per connection, not per transaction: a
SET there costs a round trip a batch, a third of a commit on loopback) bound how long
the server works on a doomed transaction; TCP keepalives and ``tcp_user_timeout`` make
a vanished host a failed call instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import ISSUED, AuditRecord, Commit, StoreError, TokenInfo, Verdict
from .sqlite import (
    AUDIT_COLUMNS,
    TOKEN_INVALID,
    WINDOW,
    audit_query,
    earliest_answer_by,
    node_revoked,
    rate_limited,
    record_from_row,
    refused,
    token_from_row,
    too_late,
    utc,
    verdict_of,
)

# Advisory lock keys.  The node lock uses the two-int form, so kubecertd's locks live
# in their own class and cannot collide with another application's one-int locks.
_SCHEMA_LOCK = 0x6B63_6572_7464_0001  # "kcertd" + 1
_NODE_LOCK_CLASS = 0x6B63_6572  # "kcer"

# libpq settings the store adds to database_url when it does not set them
# (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS).
CONNECTION_DEFAULTS = {
    "connect_timeout": "5",  # seconds
    "application_name": "kubecertd-signer",  # names the signer in pg_stat_activity
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",  # ms: unacknowledged data to a vanished host fails the call
}
STATEMENT_TIMEOUT = "10s"  # a statement, or a wait for a lock, the server gives up after
# A signer frozen mid-transaction must not hold its node locks over the other replicas.
IDLE_IN_TRANSACTION_TIMEOUT = "10s"

# The first release's tables and the version table; _MIGRATIONS bring them to this
# release's schema.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tokens (
        id text PRIMARY KEY,
        secret_hash text NOT NULL,
        node text NOT NULL,
        created timestamptz NOT NULL,
        expires timestamptz NOT NULL,
        spent timestamptz,
        revoked boolean NOT NULL DEFAULT false
    )""",
    """CREATE TABLE IF NOT EXISTS audit (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        time timestamptz NOT NULL,
        endpoint text NOT NULL,
        node text,
        identity text NOT NULL,
        reason text NOT NULL,
        outcome text NOT NULL,
        code text,
        message text NOT NULL,
        key_fingerprint text,
        serial text,
        not_before timestamptz,
        not_after timestamptz,
        peer text NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_rate ON audit (node, endpoint, outcome, time)",
    "CREATE INDEX IF NOT EXISTS audit_time ON audit (time)",  # the audit listing
    """CREATE TABLE IF NOT EXISTS revoked_nodes (
        node text PRIMARY KEY,
        since timestamptz NOT NULL
    )""",
    # One row per migration applied; none in the first release's database.
    """CREATE TABLE IF NOT EXISTS kubecertd_schema (
        version integer PRIMARY KEY,
        applied timestamptz NOT NULL DEFAULT now()
    )""",
)
# Migration N brings the schema from version N - 1 to N, as in the SQLite store.  Each
# only adds, so replicas of the previous release keep working on a migrated database
# (their INSERTs name their columns) while the others are upgraded.
_MIGRATIONS = (
    ("ALTER TABLE audit ADD COLUMN claim text",),  # 1: the node's claim (culprits on /v1/sign)
    (  # 2: the node a request's CSR names; each row's answer_by, checked at COMMIT
        "ALTER TABLE audit ADD COLUMN claimed_node text",
        "CREATE INDEX IF NOT EXISTS audit_claimed_node ON audit (claimed_node)"
        " WHERE claimed_node IS NOT NULL",
        "ALTER TABLE audit ADD COLUMN answer_by timestamptz",
        """CREATE OR REPLACE FUNCTION kubecertd_answer_in_time() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF clock_timestamp() > NEW.answer_by THEN
                RAISE EXCEPTION 'too late to commit: the signer stopped waiting at %',
                    NEW.answer_by;
            END IF;
            RETURN NULL;
        END $$""",
        # Rows of the previous release's replicas have no answer_by and pass.
        "CREATE CONSTRAINT TRIGGER audit_answer_in_time AFTER INSERT ON audit"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.answer_by IS NOT NULL)"
        " EXECUTE FUNCTION kubecertd_answer_in_time()",
    ),
)
_OUTSTANDING = (
    "SELECT id, node, created, expires, secret_hash FROM tokens"
    " WHERE spent IS NULL AND NOT revoked AND expires > %s"
)

_INSERT = (
    f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}, answer_by)"  # noqa: S608 - fixed names
    f" VALUES ({', '.join(['%s'] * (len(AUDIT_COLUMNS) + 1))})"
)

Connection = psycopg.Connection[tuple[Any, ...]]
T = TypeVar("T")


class _Attempt:
    """One try of a call: ``committing`` once its COMMIT may have reached the server."""

    committing = False


def _password(url: str) -> str:
    try:
        return str(conninfo_to_dict(url).get("password") or "")
    except psycopg.Error:
        return ""


def describe(url: str) -> str:
    """The database a URL names, for messages: never its password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "(unparsable database_url)"
    host = info.get("host") or "localhost"
    return f"{info.get('dbname') or '?'} on {host}:{info.get('port') or 5432}"


def _migrate(conn: Connection) -> None:
    """Apply the migrations the database lacks; inside the caller's transaction, which
    holds the schema lock."""
    cursor = conn.execute("SELECT coalesce(max(version), 0) FROM kubecertd_schema")
    row = cursor.fetchone()
    version = int(row[0]) if row else 0
    for number, statements in enumerate(_MIGRATIONS[version:], start=version + 1):
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO kubecertd_schema (version) VALUES (%s)", (number,))


class PostgresStore:
    """``Store`` on a PostgreSQL database shared by every signer replica."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._schema_ready = False

    def open(self) -> None:
        self._call("connect", lambda _conn, _attempt: None)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with contextlib.suppress(psycopg.Error):
                    conn.close()

    # --- plumbing ---------------------------------------------------------------------

    def _call(self, what: str, work: Callable[[Connection, _Attempt], T]) -> T:
        """``work(connection, attempt)`` for this thread alone; psycopg errors become
        StoreError.  Run once more on a fresh connection when the connection broke
        before ``work`` set ``attempt.committing`` (see the module docstring)."""
        with self._lock:
            for retry in (False, True):
                attempt = _Attempt()
                conn = None
                try:
                    conn = self._connection()
                    return work(conn, attempt)
                except psycopg.Error as exc:
                    lost = conn is not None and conn.closed  # closed includes broken
                    if lost and not attempt.committing and not retry:
                        continue
                    raise self._error(what, exc) from exc
            raise AssertionError("unreachable")  # the second attempt returns or raises

    def _error(self, what: str, exc: BaseException) -> StoreError:
        detail = " ".join(str(exc).split())  # libpq's messages span lines
        password = _password(self.url)
        if password:
            detail = detail.replace(password, "***")
        return StoreError(
            f"PostgreSQL state database {describe(self.url)}: cannot {what}: {detail}"
        )

    def _connection(self) -> Connection:
        if self._conn is not None and not self._conn.closed:  # closed includes broken
            return self._conn
        self._conn = None
        try:
            params = conninfo_to_dict(self.url)
        except psycopg.Error:
            # libpq's parse errors quote the URL, password and all: keep them out of
            # the message and the traceback.
            raise StoreError(
                "PostgreSQL state database: database_url is not a valid connection URL"
            ) from None
        missing = {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in params}
        conn = psycopg.connect(make_conninfo(self.url, **missing), autocommit=True)
        try:
            conn.execute("SET TIME ZONE 'UTC'")
            conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
            conn.execute(f"SET lock_timeout = '{STATEMENT_TIMEOUT}'")
            conn.execute(
                f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'"
            )
            if not self._schema_ready:
                with conn.transaction():
                    # Replicas starting together would race CREATE ... IF NOT EXISTS
                    # into a unique violation on the catalog; one at a time instead.
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    _migrate(conn)
                self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    # --- the decision -----------------------------------------------------------------

    def commit(
        self,
        record: AuditRecord,
        *,
        spend_token: str | None = None,
        rate_limit: int | None = None,
    ) -> Verdict:
        return self.commit_many([Commit(record, spend_token, rate_limit)])[0]

    def commit_many(self, items: Sequence[Commit]) -> list[Verdict]:
        if not items:
            return []
        what = "record the decision" if len(items) == 1 else f"record {len(items)} decisions"
        nodes = [
            i.record.node for i in items if i.record.outcome == ISSUED and i.record.node is not None
        ]
        answer_by = earliest_answer_by(items)

        def work(conn: Connection, attempt: _Attempt) -> list[Verdict]:
            with conn.transaction():
                late = too_late(answer_by)
                if late is not None:  # queued past it: not worth a round trip
                    raise StoreError(
                        f"PostgreSQL state database {describe(self.url)}: cannot {what}: {late}"
                    )
                if nodes:
                    # In ascending key order (see the docstring): output expressions not
                    # named in ORDER BY are evaluated after the sort
                    # (https://www.postgresql.org/docs/current/sql-select.html#SQL-SELECT-LIST).
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, key) FROM"
                        " (SELECT DISTINCT hashtext(node) AS key FROM unnest(%s::text[]) AS node)"
                        " AS keys ORDER BY key",
                        (_NODE_LOCK_CLASS, nodes),
                    )
                verdicts = [self._apply(conn, item) for item in items]
                attempt.committing = True  # leaving the block sends COMMIT
            return verdicts

        return self._call(what, work)

    @classmethod
    def _apply(cls, conn: Connection, item: Commit) -> Verdict:
        """One item of ``commit_many``, inside its transaction, its node's lock held."""
        record = item.record
        verdict = verdict_of(record)
        if record.outcome == ISSUED:
            conn.execute("SAVEPOINT checks")
            verdict = cls._check(conn, record, item.spend_token, item.rate_limit)
            if verdict.code is not None:
                # A refusal changes nothing but the audit: the token stays unspent.
                conn.execute("ROLLBACK TO SAVEPOINT checks")
                record = refused(record, verdict)
            conn.execute("RELEASE SAVEPOINT checks")
        cls._insert(conn, record, item.answer_by)
        return verdict

    @staticmethod
    def _check(
        conn: Connection,
        record: AuditRecord,
        spend_token: str | None,
        rate_limit: int | None,
    ) -> Verdict:
        now = utc(record.time)
        if spend_token is not None:
            # The node too: a token is bound to one node (SPEC), whatever the caller did.
            spent = conn.execute(
                "UPDATE tokens SET spent = %s WHERE id = %s AND node = %s"
                " AND spent IS NULL AND NOT revoked AND expires > %s",
                (now, spend_token, record.node, now),
            )
            if spent.rowcount != 1:
                return TOKEN_INVALID
        if record.node is None:
            return Verdict()
        revoked = conn.execute("SELECT 1 FROM revoked_nodes WHERE node = %s", (record.node,))
        if revoked.fetchone():
            return node_revoked(record.node)
        if rate_limit is not None:
            cursor = conn.execute(
                "SELECT time FROM audit WHERE node = %s AND endpoint = 'sign' AND outcome = %s"
                " AND time > %s ORDER BY time DESC LIMIT %s",
                (record.node, ISSUED, now - WINDOW, max(rate_limit, 0)),
            )
            rows = cursor.fetchall()
            if len(rows) >= rate_limit:
                return rate_limited(record.node, rate_limit, [utc(r[0]) for r in rows], now)
        return Verdict()

    @staticmethod
    def _insert(conn: Connection, record: AuditRecord, answer_by: dt.datetime | None) -> None:
        values = dict(vars(record))  # shallow: asdict() deep-copies, 0.1 ms an issuance
        for name in ("time", "not_before", "not_after"):
            if values[name] is not None:
                values[name] = utc(values[name])
        conn.execute(_INSERT, [*(values[name] for name in AUDIT_COLUMNS), answer_by])

    def _rows(self, what: str, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """A read: safe to run again on a fresh connection."""
        return self._call(what, lambda conn, _attempt: conn.execute(sql, params).fetchall())

    def _change(self, what: str, sql: str, params: Sequence[Any]) -> int:
        """One autocommit write; its row count.  Never run twice: a connection lost during
        it leaves unknown whether it committed."""

        def work(conn: Connection, attempt: _Attempt) -> int:
            attempt.committing = True
            return conn.execute(sql, params).rowcount

        return self._call(what, work)

    # --- tokens -----------------------------------------------------------------------

    def create_token(self, token: TokenInfo) -> None:
        self._change(
            f"create token {token.id}",
            "INSERT INTO tokens (id, secret_hash, node, created, expires)"
            " VALUES (%s, %s, %s, %s, %s)",
            (token.id, token.secret_hash, token.node, utc(token.created), utc(token.expires)),
        )

    def find_token(self, token_id: str, now: dt.datetime) -> TokenInfo | None:
        rows = self._rows("read tokens", _OUTSTANDING + " AND id = %s", (utc(now), token_id))
        return token_from_row(rows[0], utc) if rows else None

    def list_tokens(self, now: dt.datetime) -> list[TokenInfo]:
        rows = self._rows("read tokens", _OUTSTANDING + " ORDER BY created, id", (utc(now),))
        return [token_from_row(row, utc) for row in rows]

    def revoke_token(self, token_id: str) -> bool:
        changed = self._change(
            f"revoke token {token_id}",
            "UPDATE tokens SET revoked = true WHERE id = %s AND spent IS NULL AND NOT revoked",
            (token_id,),
        )
        return changed == 1

    # --- nodes and audit ----------------------------------------------------------------

    def set_node_revoked(self, node: str, revoked: bool, now: dt.datetime) -> None:
        what = f"{'revoke' if revoked else 'allow'} node {node}"
        if revoked:  # revoking again keeps the original date
            self._change(
                what,
                "INSERT INTO revoked_nodes (node, since) VALUES (%s, %s)"
                " ON CONFLICT (node) DO NOTHING",
                (node, utc(now)),
            )
        else:
            self._change(what, "DELETE FROM revoked_nodes WHERE node = %s", (node,))

    def is_node_revoked(self, node: str) -> bool:
        rows = self._rows(
            "read revocations", "SELECT 1 FROM revoked_nodes WHERE node = %s", (node,)
        )
        return bool(rows)

    def ping(self) -> None:
        self._rows("reach it", "SELECT 1 FROM kubecertd_schema LIMIT 1", ())  # and its tables

    def audit(
        self,
        node: str | None = None,
        limit: int = 1000,
        *,
        since: dt.datetime | None = None,
        claims_only: bool = False,
        offset: int = 0,
    ) -> list[AuditRecord]:
        when = utc(since) if since is not None else None
        sql, params = audit_query("%s", node, limit, when, claims_only, offset)
        rows = self._rows("read the audit", sql, params)
        return [record_from_row(row, utc) for row in reversed(rows)]
