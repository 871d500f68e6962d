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
and psycopg_pool is not a dependency.  A broken connection fails its call (the signer
answers 503) and is replaced on the next call.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import ISSUED, AuditRecord, Commit, StoreError, TokenInfo, Verdict
from .sqlite import (
    AUDIT_COLUMNS,
    TOKEN_INVALID,
    WINDOW,
    audit_query,
    node_revoked,
    rate_limited,
    record_from_row,
    refused,
    token_from_row,
    utc,
    verdict_of,
)

# Advisory lock keys.  The node lock uses the two-int form, so kubecertd's locks live
# in their own class and cannot collide with another application's one-int locks.
_SCHEMA_LOCK = 0x6B63_6572_7464_0001  # "kcertd" + 1
_NODE_LOCK_CLASS = 0x6B63_6572  # "kcer"

CONNECT_TIMEOUT = 5  # seconds, unless database_url says otherwise
STATEMENT_TIMEOUT = "10s"  # a hung database fails the request (503) rather than hangs it

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
    "ALTER TABLE audit ADD COLUMN claim text",  # 1: the node's claim (culprits on /v1/sign)
)
_OUTSTANDING = (
    "SELECT id, node, created, expires, secret_hash FROM tokens"
    " WHERE spent IS NULL AND NOT revoked AND expires > %s"
)

Connection = psycopg.Connection[tuple[Any, ...]]


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
    for number, statement in enumerate(_MIGRATIONS[version:], start=version + 1):
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
        with self._session("connect"):
            pass

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with contextlib.suppress(psycopg.Error):
                    conn.close()

    # --- plumbing ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, what: str) -> Iterator[Connection]:
        """The connection, for this thread alone; psycopg errors become StoreError."""
        with self._lock:
            try:
                yield self._connection()
            except psycopg.Error as exc:
                detail = " ".join(str(exc).split())  # libpq's messages span lines
                raise StoreError(
                    f"PostgreSQL state database {describe(self.url)}: cannot {what}: {detail}"
                ) from exc

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
        conninfo = self.url
        if "connect_timeout" not in params:
            conninfo = make_conninfo(conninfo, connect_timeout=CONNECT_TIMEOUT)
        conn = psycopg.connect(conninfo, autocommit=True)
        try:
            conn.execute("SET TIME ZONE 'UTC'")
            conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
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
        with self._session(what) as conn, conn.transaction():
            if nodes:
                # In ascending key order (see the docstring): output expressions not named
                # in ORDER BY are evaluated after the sort
                # (https://www.postgresql.org/docs/current/sql-select.html#SQL-SELECT-LIST).
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, key) FROM"
                    " (SELECT DISTINCT hashtext(node) AS key FROM unnest(%s::text[]) AS node)"
                    " AS keys ORDER BY key",
                    (_NODE_LOCK_CLASS, nodes),
                )
            return [self._apply(conn, item) for item in items]

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
        cls._insert(conn, record)
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
    def _insert(conn: Connection, record: AuditRecord) -> None:
        values = dict(vars(record))  # shallow: asdict() deep-copies, 0.1 ms an issuance
        for name in ("time", "not_before", "not_after"):
            if values[name] is not None:
                values[name] = utc(values[name])
        conn.execute(
            f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)})"  # noqa: S608 - fixed names
            f" VALUES ({', '.join(['%s'] * len(AUDIT_COLUMNS))})",
            [values[name] for name in AUDIT_COLUMNS],
        )

    # --- tokens -----------------------------------------------------------------------

    def create_token(self, token: TokenInfo) -> None:
        with self._session(f"create token {token.id}") as conn:
            conn.execute(
                "INSERT INTO tokens (id, secret_hash, node, created, expires)"
                " VALUES (%s, %s, %s, %s, %s)",
                (token.id, token.secret_hash, token.node, utc(token.created), utc(token.expires)),
            )

    def find_token(self, token_id: str, now: dt.datetime) -> TokenInfo | None:
        with self._session("read tokens") as conn:
            cursor = conn.execute(_OUTSTANDING + " AND id = %s", (utc(now), token_id))
            row = cursor.fetchone()
        return token_from_row(row, utc) if row else None

    def list_tokens(self, now: dt.datetime) -> list[TokenInfo]:
        with self._session("read tokens") as conn:
            cursor = conn.execute(_OUTSTANDING + " ORDER BY created, id", (utc(now),))
            rows = cursor.fetchall()
        return [token_from_row(row, utc) for row in rows]

    def revoke_token(self, token_id: str) -> bool:
        with self._session(f"revoke token {token_id}") as conn:
            cursor = conn.execute(
                "UPDATE tokens SET revoked = true WHERE id = %s AND spent IS NULL AND NOT revoked",
                (token_id,),
            )
            return cursor.rowcount == 1

    # --- nodes and audit ----------------------------------------------------------------

    def set_node_revoked(self, node: str, revoked: bool, now: dt.datetime) -> None:
        with self._session(f"{'revoke' if revoked else 'allow'} node {node}") as conn:
            if revoked:  # revoking again keeps the original date
                conn.execute(
                    "INSERT INTO revoked_nodes (node, since) VALUES (%s, %s)"
                    " ON CONFLICT (node) DO NOTHING",
                    (node, utc(now)),
                )
            else:
                conn.execute("DELETE FROM revoked_nodes WHERE node = %s", (node,))

    def is_node_revoked(self, node: str) -> bool:
        with self._session("read revocations") as conn:
            cursor = conn.execute("SELECT 1 FROM revoked_nodes WHERE node = %s", (node,))
            return cursor.fetchone() is not None

    def audit(
        self,
        node: str | None = None,
        limit: int = 1000,
        *,
        since: dt.datetime | None = None,
        claims_only: bool = False,
    ) -> list[AuditRecord]:
        when = utc(since) if since is not None else None
        sql, params = audit_query("%s", node, limit, when, claims_only)
        with self._session("read the audit") as conn:
            cursor = conn.execute(sql, params)
            rows = cursor.fetchall()
        return [record_from_row(row, utc) for row in reversed(rows)]
