"""The signer's state in one SQLite file, shared by the signer's worker processes.

SQLite serialises writers across processes with file locks: every write here is one
``BEGIN IMMEDIATE`` transaction, which takes the write lock up front, so two workers
checking the same token or rate limit run one after the other and the second sees
what the first committed (https://www.sqlite.org/lang_transaction.html).  WAL mode
lets readers go on meanwhile (https://www.sqlite.org/wal.html).

The store is called from one database thread per worker, so its blocking calls never
hold up a request loop; a lock keeps any other caller out of that thread's
transaction.  A writer can wait for another worker's lock up to the busy timeout.

No answer goes out before its audit record is durable: ``synchronous = FULL`` makes
every COMMIT sync the WAL (NORMAL, WAL's usual setting, can lose the last commits on
power loss; https://www.sqlite.org/pragma.html#pragma_synchronous).  That is one
fsync a transaction, so ``commit_many`` takes all the decisions the database thread
has gathered in one transaction: a busy signer pays one fsync for a batch, not one a
certificate.

The pure pieces of ``commit`` (refusal messages, Retry-After) live here too and are
shared with the PostgreSQL store, so both give byte-identical answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import ISSUED, REFUSED, AuditRecord, Commit, StoreError, TokenInfo, Verdict

UTC = dt.timezone.utc
WINDOW = dt.timedelta(hours=1)  # SPEC: max_issuances_per_node_per_hour
BUSY_TIMEOUT = 5.0  # seconds

TOKEN_INVALID = Verdict("token-invalid", "the token is unknown, expired or already used")

AUDIT_COLUMNS = (
    "time",
    "endpoint",
    "node",
    "identity",
    "reason",
    "outcome",
    "code",
    "message",
    "key_fingerprint",
    "serial",
    "not_before",
    "not_after",
    "peer",
    "claim",
    "claimed_node",
)

# The first release's schema; _MIGRATIONS bring it to this release's.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tokens (
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        node TEXT NOT NULL,
        created TEXT NOT NULL,
        expires TEXT NOT NULL,
        spent TEXT,
        revoked INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        node TEXT,
        identity TEXT NOT NULL,
        reason TEXT NOT NULL,
        outcome TEXT NOT NULL,
        code TEXT,
        message TEXT NOT NULL,
        key_fingerprint TEXT,
        serial TEXT,
        not_before TEXT,
        not_after TEXT,
        peer TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_rate ON audit (node, endpoint, outcome, time)",
    "CREATE INDEX IF NOT EXISTS audit_time ON audit (time)",  # the audit listing
    """CREATE TABLE IF NOT EXISTS revoked_nodes (
        node TEXT PRIMARY KEY,
        since TEXT NOT NULL
    )""",
)
# Migration N brings the schema from version N - 1 to N.  SQLite keeps the version in
# the file header (PRAGMA user_version, 0 in a new file and in the first release's).
# Each only adds, so a signer of the previous release keeps working on a migrated file
# (its INSERTs name their columns): replicas and workers can be upgraded one by one.
_MIGRATIONS = (
    ("ALTER TABLE audit ADD COLUMN claim TEXT",),  # 1: the node's claim (culprits on /v1/sign)
    (  # 2: the node a request's CSR names, for `audit --node` (the answer_by guard is
        # PostgreSQL's alone: here the signer's own thread commits, see commit_many)
        "ALTER TABLE audit ADD COLUMN claimed_node TEXT",
        "CREATE INDEX IF NOT EXISTS audit_claimed_node ON audit (claimed_node)"
        " WHERE claimed_node IS NOT NULL",
    ),
)
_OUTSTANDING = (
    "SELECT id, node, created, expires, secret_hash FROM tokens"
    " WHERE spent IS NULL AND revoked = 0 AND expires > ?"
)
_REVOKED = "SELECT 1 FROM revoked_nodes WHERE node = ?"


# --- pure helpers shared by both stores -------------------------------------------


def node_revoked(node: str) -> Verdict:
    return Verdict(
        "node-revoked",
        f"node {node} is revoked; `kubecertd-signer node allow {node}` lets it in again",
    )


def rate_limited(node: str, limit: int, newest: Sequence[dt.datetime], now: dt.datetime) -> Verdict:
    """The refusal once ``newest`` (the node's last ``limit`` issuances, newest first) fill the hour.

    A slot frees up when the ``limit``-th newest issuance leaves the window, which is the
    oldest one whenever the limit has not been lowered meanwhile.
    """
    if limit < 1 or not newest:
        retry = WINDOW.total_seconds()
    else:
        retry = (newest[limit - 1] + WINDOW - now).total_seconds()
    return Verdict(
        "rate-limited",
        f"node {node} already received {max(limit, 0)} certificates in the last hour",
        retry_after=max(1, math.ceil(retry)),
    )


def refused(record: AuditRecord, verdict: Verdict) -> AuditRecord:
    """What gets audited instead of ``record``: its certificate is never handed out."""
    return dataclasses.replace(
        record,
        outcome=REFUSED,
        code=verdict.code,
        message=verdict.message,
        serial=None,
        not_before=None,
        not_after=None,
    )


def verdict_of(record: AuditRecord) -> Verdict:
    """The verdict for a record as it stands: anything but ISSUED is a refusal."""
    if record.outcome == ISSUED:
        return Verdict()
    return Verdict(record.code or "internal", record.message)  # never None: fail closed


def utc(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC; a naive datetime is a programming error, never guessed at."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: the store takes aware UTC times")
    return value.astimezone(UTC)


# --- SQLite ---------------------------------------------------------------------------


def _text(value: dt.datetime) -> str:
    # Fixed width (4-digit year, always microseconds), so text order is time order.
    return utc(value).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=UTC)


def _opt_text(value: dt.datetime | None) -> str | None:
    return None if value is None else _text(value)


def token_from_row(row: Sequence[Any], to_time: Callable[[Any], dt.datetime]) -> TokenInfo:
    """A ``tokens`` row as both stores select it; ``to_time`` reads that store's times."""
    token_id, node, created, expires, secret_hash = row
    return TokenInfo(token_id, node, to_time(created), to_time(expires), secret_hash)


def record_from_row(row: Sequence[Any], to_time: Callable[[Any], dt.datetime]) -> AuditRecord:
    """An ``audit`` row (AUDIT_COLUMNS) as both stores select it."""
    values = dict(zip(AUDIT_COLUMNS, row, strict=True))
    for name in ("time", "not_before", "not_after"):
        if values[name] is not None:
            values[name] = to_time(values[name])
    return AuditRecord(**values)


def audit_query(
    mark: str,
    node: str | None,
    limit: int,
    since: object | None,
    claims_only: bool,
    offset: int = 0,
) -> tuple[str, list[Any]]:
    """The SELECT of ``Store.audit`` with its parameters, ``mark`` being the placeholder
    (``?`` or ``%s``) and ``since`` already in the store's time form."""
    conditions: list[str] = []
    params: list[Any] = []
    if node is not None:
        conditions.append(f"(node = {mark} OR claimed_node = {mark})")
        params += [node, node]
    if since is not None:
        conditions.append(f"time >= {mark}")
        params.append(since)
    if claims_only:
        conditions.append("claim IS NOT NULL")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    sql = (
        f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit{where}"  # noqa: S608 - fixed names
        f" ORDER BY time DESC, id DESC LIMIT {mark} OFFSET {mark}"
    )
    return sql, [*params, max(limit, 0), max(offset, 0)]


def too_late(answer_by: dt.datetime | None) -> str | None:
    """Why a transaction must not commit now: its ``answer_by`` has passed, else None."""
    if answer_by is None or dt.datetime.now(UTC) <= answer_by:
        return None
    return f"too late to commit: the signer stopped waiting at {_text(answer_by)}"


def earliest_answer_by(items: Sequence[Commit]) -> dt.datetime | None:
    deadlines = [item.answer_by for item in items if item.answer_by is not None]
    return min(deadlines) if deadlines else None


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations this file lacks; inside the caller's write transaction."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    for statements in _MIGRATIONS[version:]:
        for statement in statements:
            conn.execute(statement)
    if version < len(_MIGRATIONS):
        conn.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")


def _use_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL mode (a no-op once the file is in it); the journal mode now in use."""
    # Switching a new file to WAL takes an exclusive lock, and when several workers
    # open the new file together SQLite reports the others' locks at once ("database
    # is locked") instead of through the busy handler.  So wait here, as it would.
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            row = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # only while opening, before the store serves anything
        else:
            return str(row[0]).lower() if row else ""


class SqliteStore:
    """``Store`` on one SQLite file; safe for several processes opening the same path."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._conn: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None
        self._lock = threading.Lock()  # one transaction at a time on the one connection

    def open(self) -> None:
        if self._conn is not None:
            return
        try:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, mode=0o700, exist_ok=True)
            # Create the file ourselves: sqlite3 would use 0644 less the umask, and the
            # WAL and shm files copy the database file's mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StoreError(f"SQLite state database {self.path}: cannot create it: {exc}") from exc
        conn = None
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT,  # sqlite3_busy_timeout: wait out other workers' writes
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,
            )
            mode = _use_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")  # durable at COMMIT: see the docstring
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            _migrate(conn)
            conn.execute("COMMIT")
            info = os.stat(self.path)
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise StoreError(f"SQLite state database {self.path}: cannot open it: {exc}") from exc
        if mode != "wal":
            conn.close()
            raise StoreError(f"SQLite state database {self.path}: cannot use WAL mode ({mode})")
        self._conn, self._inode = conn, (info.st_dev, info.st_ino)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    # --- plumbing ---------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"SQLite state database {self.path}: the store is not open")
        return self._conn

    def _check_file(self) -> None:
        # In WAL mode SQLite keeps writing to a database file that was deleted or
        # replaced under it, and whatever it writes is lost at exit.  The audit must
        # not vanish like that, so writes check that the path is still our file.
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise StoreError(f"SQLite state database {self.path} is gone: {exc}") from exc
        if (info.st_dev, info.st_ino) != self._inode:
            raise StoreError(f"SQLite state database {self.path} was replaced since it was opened")

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; any failure rolls it back as StoreError."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._check_file()
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise StoreError(
                    f"SQLite state database {self.path}: cannot {what}: {exc}"
                ) from exc

    def _read(self, what: str, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(
                    f"SQLite state database {self.path}: cannot {what}: {exc}"
                ) from exc

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
        answer_by = earliest_answer_by(items)
        with self._write(what) as conn:
            verdicts = [self._apply(conn, item) for item in items]
            # The loop answers 503 at answer_by plus a margin (app.ANSWER_MARGIN), which
            # this COMMIT's fsync must fit in; PostgreSQL checks inside its COMMIT.
            late = too_late(answer_by)
            if late is not None:
                raise StoreError(f"SQLite state database {self.path}: cannot {what}: {late}")
            return verdicts

    @classmethod
    def _apply(cls, conn: sqlite3.Connection, item: Commit) -> Verdict:
        """One item of ``commit_many``, inside its transaction."""
        record = item.record
        verdict = verdict_of(record)
        if record.outcome == ISSUED:
            conn.execute("SAVEPOINT checks")
            verdict = cls._check(conn, record, item.spend_token, item.rate_limit)
            if verdict.code is not None:
                # A refusal changes nothing but the audit: the token stays unspent.
                conn.execute("ROLLBACK TO checks")
                record = refused(record, verdict)
            conn.execute("RELEASE checks")
        cls._insert(conn, record)
        return verdict

    @staticmethod
    def _check(
        conn: sqlite3.Connection,
        record: AuditRecord,
        spend_token: str | None,
        rate_limit: int | None,
    ) -> Verdict:
        now = _text(record.time)
        if spend_token is not None:
            # The node too: a token is bound to one node (SPEC), whatever the caller did.
            spent = conn.execute(
                "UPDATE tokens SET spent = ? WHERE id = ? AND node = ?"
                " AND spent IS NULL AND revoked = 0 AND expires > ?",
                (now, spend_token, record.node, now),
            )
            if spent.rowcount != 1:
                return TOKEN_INVALID
        if record.node is None:
            return Verdict()
        if conn.execute(_REVOKED, (record.node,)).fetchone():
            return node_revoked(record.node)
        if rate_limit is not None:
            rows = conn.execute(
                "SELECT time FROM audit WHERE node = ? AND endpoint = 'sign' AND outcome = ?"
                " AND time > ? ORDER BY time DESC LIMIT ?",
                (record.node, ISSUED, _text(record.time - WINDOW), max(rate_limit, 0)),
            ).fetchall()
            if len(rows) >= rate_limit:
                newest = [_time(row[0]) for row in rows]
                return rate_limited(record.node, rate_limit, newest, record.time)
        return Verdict()

    @staticmethod
    def _insert(conn: sqlite3.Connection, record: AuditRecord) -> None:
        values = dict(vars(record))  # shallow: asdict() deep-copies, 0.1 ms an issuance
        for name in ("time", "not_before", "not_after"):
            values[name] = _opt_text(values[name])
        conn.execute(
            f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)})"  # noqa: S608 - fixed names
            f" VALUES ({', '.join('?' * len(AUDIT_COLUMNS))})",
            [values[name] for name in AUDIT_COLUMNS],
        )

    # --- tokens -----------------------------------------------------------------------

    def create_token(self, token: TokenInfo) -> None:
        with self._write(f"create token {token.id}") as conn:
            conn.execute(
                "INSERT INTO tokens (id, secret_hash, node, created, expires)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    token.id,
                    token.secret_hash,
                    token.node,
                    _text(token.created),
                    _text(token.expires),
                ),
            )

    def find_token(self, token_id: str, now: dt.datetime) -> TokenInfo | None:
        rows = self._read("read tokens", _OUTSTANDING + " AND id = ?", (_text(now), token_id))
        return token_from_row(rows[0], _time) if rows else None

    def list_tokens(self, now: dt.datetime) -> list[TokenInfo]:
        rows = self._read("read tokens", _OUTSTANDING + " ORDER BY created, id", (_text(now),))
        return [token_from_row(row, _time) for row in rows]

    def revoke_token(self, token_id: str) -> bool:
        with self._write(f"revoke token {token_id}") as conn:
            cursor = conn.execute(
                "UPDATE tokens SET revoked = 1 WHERE id = ? AND spent IS NULL AND revoked = 0",
                (token_id,),
            )
            return cursor.rowcount == 1

    # --- nodes and audit ----------------------------------------------------------------

    def set_node_revoked(self, node: str, revoked: bool, now: dt.datetime) -> None:
        with self._write(f"{'revoke' if revoked else 'allow'} node {node}") as conn:
            if revoked:  # revoking again keeps the original date
                conn.execute(
                    "INSERT INTO revoked_nodes (node, since) VALUES (?, ?)"
                    " ON CONFLICT (node) DO NOTHING",
                    (node, _text(now)),
                )
            else:
                conn.execute("DELETE FROM revoked_nodes WHERE node = ?", (node,))

    def is_node_revoked(self, node: str) -> bool:
        return bool(self._read("read revocations", _REVOKED, (node,)))

    def ping(self) -> None:
        self._check_file()
        self._read("reach it", "SELECT 1", ())

    def audit(
        self,
        node: str | None = None,
        limit: int = 1000,
        *,
        since: dt.datetime | None = None,
        claims_only: bool = False,
        offset: int = 0,
    ) -> list[AuditRecord]:
        sql, params = audit_query("?", node, limit, _opt_text(since), claims_only, offset)
        rows = self._read("read the audit", sql, params)
        return [record_from_row(row, _time) for row in reversed(rows)]
