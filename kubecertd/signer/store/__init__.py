"""The signer's state behind one small synchronous interface (SPEC: SQLite or PostgreSQL).

Tokens, the audit of every decision, node revocations and the per-node issuance
counter.  The one operation that matters for safety is ``commit_many``: for each
decision it spends a token, applies revocation and rate limit, and writes the audit
record, all in ONE transaction, so two replicas can neither both accept a token nor
both slip under the rate limit.  It returns once that transaction is durable; if it
raises ``StoreError`` nothing of the batch may be issued (503).

The calls block: each signer worker makes them from its one database thread, which
batches the decisions that arrive while a commit is in flight (group commit: one
durable write for many records).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

ISSUED = "issued"
REFUSED = "refused"


class StoreError(Exception):
    """The state database cannot be read or written; the signer fails closed."""


@dataclass(frozen=True)
class TokenInfo:
    id: str
    node: str
    created: dt.datetime
    expires: dt.datetime
    secret_hash: str  # never shown; needed only to verify a presented secret


@dataclass(frozen=True)
class AuditRecord:
    """One decision, issued or refused.  Never holds a token secret."""

    time: dt.datetime
    endpoint: str  # "sign", "enroll", "identity"
    node: str | None  # the node the request is for, when known
    identity: str  # who asked: "identity:<serial>", "kubelet:<serial>", "token:<id>", "anonymous"
    reason: str  # the agent's stated reason ("cert-missing", "renewal", ...) or ""
    outcome: str  # ISSUED or REFUSED
    code: str | None = None  # SPEC error code of a refusal
    message: str = ""
    key_fingerprint: str | None = None
    serial: str | None = None
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    peer: str = ""  # remote address
    # The node's own account of what happened to its files (``culprits`` on /v1/sign):
    # untrusted text, kept verbatim for operators and never used for a decision.
    claim: str | None = None
    # The node a request's CSR names when that is not ``node`` (a refused enrollment,
    # a request for another node): the request's word, never verified.
    claimed_node: str | None = None


@dataclass(frozen=True)
class Verdict:
    """What ``commit`` decided; ``code`` None means the certificate may be handed out."""

    code: str | None = None
    message: str = ""
    retry_after: int | None = None  # seconds, for rate-limited


@dataclass(frozen=True)
class Commit:
    """One decision to commit: the record, and what ``commit`` applies if it is ISSUED."""

    record: AuditRecord
    spend_token: str | None = None
    rate_limit: int | None = None
    # When the signer stops waiting for this commit and answers 503: a transaction
    # holding the item must not commit after it (see the PostgreSQL store).
    answer_by: dt.datetime | None = None


class Store(Protocol):
    def open(self) -> None: ...

    def close(self) -> None: ...

    def commit_many(self, items: Sequence[Commit]) -> list[Verdict]:
        """Write every item's record, in order, in ONE transaction; one verdict per item.

        For an ISSUED record, within that transaction:

        - ``spend_token``: mark that token spent with one conditional UPDATE (unspent,
          unexpired at ``record.time``) that must affect exactly one row, else the
          verdict is ``token-invalid``;
        - a revoked ``record.node`` gives ``node-revoked``;
        - ``rate_limit``: if that many ISSUED ``sign`` records exist for the node in
          the hour before ``record.time``, ``rate-limited`` with ``retry_after``.

        A refusal found here is what gets written (outcome REFUSED with its code) and
        changes nothing else.  Each item sees the earlier ones (a token spent by one is
        refused to the next; earlier issuances count toward the limit), so the verdicts
        are those of committing the items one by one.  Returns once the transaction is
        durable; StoreError means none of it was written.  The transaction does not
        commit after the earliest ``answer_by`` of its items (StoreError instead).
        """
        ...

    def commit(
        self,
        record: AuditRecord,
        *,
        spend_token: str | None = None,
        rate_limit: int | None = None,
    ) -> Verdict:
        """``commit_many`` of one item."""
        ...

    def create_token(self, token: TokenInfo) -> None: ...

    def find_token(self, token_id: str, now: dt.datetime) -> TokenInfo | None:
        """An unspent, unrevoked, unexpired token, else None."""
        ...

    def list_tokens(self, now: dt.datetime) -> list[TokenInfo]:
        """Outstanding tokens (unspent, unrevoked, unexpired), oldest first."""
        ...

    def revoke_token(self, token_id: str) -> bool:
        """True when an outstanding token was revoked."""
        ...

    def set_node_revoked(self, node: str, revoked: bool, now: dt.datetime) -> None: ...

    def is_node_revoked(self, node: str) -> bool: ...

    def ping(self) -> None:
        """Reach the database once (the readiness probe); StoreError if it cannot."""
        ...

    def audit(
        self,
        node: str | None = None,
        limit: int = 1000,
        *,
        since: dt.datetime | None = None,
        claims_only: bool = False,
        offset: int = 0,
    ) -> list[AuditRecord]:
        """The newest ``limit`` records after skipping the ``offset`` newest, oldest
        first: of ``node`` (or claiming it, ``claimed_node``), at or after ``since``,
        carrying a claim when ``claims_only``."""
        ...


def open_store(state: str, database_url: str) -> Store:
    """The store a config names: PostgreSQL when ``database_url`` is set, else SQLite."""
    if database_url:
        from .postgres import PostgresStore  # noqa: PLC0415 - psycopg only when asked

        return PostgresStore(database_url)
    from .sqlite import SqliteStore  # noqa: PLC0415

    return SqliteStore(state)
