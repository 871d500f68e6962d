"""The signer's API: routes and thin handlers, with no HTTP library in them.

``kubecertd.signer.server`` parses HTTP/1.1 and hands each request to ``Signer.handle``
as a ``Request``; a handler is a coroutine whose only awaits are the request's body
(``Request.read``, served by the connection) and the state store (``Database``, served
by the worker's database thread), and it returns a ``Response``.  Each issuing handler
authenticates from the client certificate the TLS handshake verified, reads the body,
calls the pure policy, writes exactly one audit record through the store, and renders
JSON.  Every error body is ``{"error": CODE, "message": TEXT}`` with SPEC's codes;
nothing else (no traceback, no token secret) ever reaches a client.  A body is read
whole (at most MAX_BODY bytes, within BODY_TIMEOUT) and must be strict JSON
(``parse_body``) before a handler looks at a field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from .. import pki
from ..edges import journal
from . import metrics, policy, tokens
from .authority import Authority
from .config import Policy
from .store import ISSUED, REFUSED, AuditRecord, Commit, StoreError, TokenInfo, Verdict

MAX_BODY = 64 * 1024
BODY_TIMEOUT = 10.0  # seconds to receive a whole request body, from its headers
MAX_DEPTH = 32  # levels of arrays and objects in a body; SPEC's bodies have one
MAX_DIGITS = 100  # digits of a JSON integer; SPEC's bodies have none
MAX_CLAIM = 1024  # bytes of UTF-8 in a sign request's "culprits"
DATABASE_TIMEOUT = 5.0  # seconds; the server sets [limits] database_timeout
# Seconds the server waits for a commit beyond its answer_by: the database refuses to
# commit after answer_by, so an answer given up on is never recorded as issued, unless
# the end of a COMMIT that passed that check (WAL flush, the way back) plus the two
# hosts' clock difference take longer than this (store/postgres.py's docstring).  After
# answer_by, not before it: a COMMIT checked just before answer_by still commits, and
# giving up earlier would leave exactly such a commit unanswered.
ANSWER_MARGIN = 1.0
HEALTH_TIMEOUT = 2.0  # seconds /healthz waits for the database (at most database_timeout)
HEALTH_CACHE = 1.0  # seconds a worker reuses its last readiness probe
RETRY_AFTER_UNAVAILABLE = 5  # seconds, the Retry-After of 503 answers
TEXT = "text/plain; charset=utf-8"
Clock = Callable[[], dt.datetime]


@dataclass(frozen=True)
class Refusal(Exception):
    """An error answer in SPEC's shape; raised by handlers, rendered by ``Signer.handle``."""

    status: int
    code: str
    message: str
    retry_after: int | None = None
    close: bool = False  # the connection cannot carry another request after this one


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- what the server gives a handler, and what it gets back ----------------------------------


class Wait:
    """What a handler awaits: the server resumes it with the result (or throws into it).

    ``kind`` is ``"body"`` (the connection reads the rest of the request), ``"commit"``
    (the database thread writes ``payload``, a ``store.Commit``, in the next group
    commit) or ``"call"`` (the database thread returns ``payload(store)``).  The server
    waits for a database result ``timeout`` seconds at most, then throws StoreError.
    """

    __slots__ = ("kind", "payload", "timeout")

    def __init__(self, kind: str, payload: Any = None, timeout: float | None = None) -> None:
        self.kind = kind
        self.payload = payload
        self.timeout = timeout

    def __await__(self) -> Generator[Wait, Any, Any]:
        return (yield self)


BODY = Wait("body")


class Database:
    """The store as handlers await it: each call runs on the worker's database thread.

    Commits waiting together are written in one transaction (group commit) and each
    handler resumes only once it is durable.  Every call waits ``timeout`` seconds at
    most; a commit carries its ``answer_by``, after which it can no longer commit.
    """

    def __init__(self, timeout: float = DATABASE_TIMEOUT) -> None:
        self.timeout = timeout

    async def commit(
        self,
        record: AuditRecord,
        *,
        spend_token: str | None = None,
        rate_limit: int | None = None,
    ) -> Verdict:
        # The real clock, not the handler's: the database compares it with its own.
        answer_by = utcnow() + dt.timedelta(seconds=self.timeout)
        item = Commit(record, spend_token, rate_limit, answer_by)
        verdict: Verdict = await Wait("commit", item, self.timeout + ANSWER_MARGIN)
        return verdict

    async def find_token(self, token_id: str, now: dt.datetime) -> TokenInfo | None:
        found: TokenInfo | None = await Wait(
            "call", lambda store: store.find_token(token_id, now), self.timeout
        )
        return found

    async def list_tokens(self, now: dt.datetime) -> list[TokenInfo]:
        listed: list[TokenInfo] = await Wait(
            "call", lambda store: store.list_tokens(now), self.timeout
        )
        return listed

    async def ping(self) -> None:
        await Wait("call", lambda store: store.ping(), min(HEALTH_TIMEOUT, self.timeout))


@dataclass
class Request:
    """One parsed request: what the server knows of it and of its connection."""

    method: str
    path: str  # percent-decoded, without the query
    remote: str  # the client's address
    peer: x509.Certificate | None = None  # the client certificate the handshake verified
    issuer: x509.Certificate | None = None  # the CA that signed it, from the verified chain

    async def read(self) -> bytes:
        """The whole body, decoded from its Content-Encoding; or a Refusal (400, 408, 413)."""
        body: bytes = await BODY
        return body


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False  # close the connection after this answer


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value).encode())


def error_body(status: int, code: str, message: str, retry_after: int | None = None) -> Response:
    answer = json_response({"error": code, "message": message}, status)
    if retry_after is not None:
        answer.headers.append(("Retry-After", str(retry_after)))
    return answer


Handler = Callable[["Signer", Request], Awaitable[Response]]


class Signer:
    """The API: the routes, what every handler shares, and the error rendering."""

    def __init__(
        self,
        authority: Authority,
        rules: Policy,
        database: Database | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.authority = authority
        self.rules = rules
        self.db = database or Database()
        self.clock = clock
        self.cluster_cas = list(authority.cluster_certs)
        # The answers that never change, rendered once.
        self.ca_answer = json.dumps({"ca_bundle": authority.cluster_bundle}).encode()
        # The last readiness probe: when it started (monotonic) and what it found.
        self.probed_at = -HEALTH_CACHE
        self.not_ready: str | None = None

    async def readiness(self) -> str | None:
        """Why this worker cannot serve issuance now (its database), or None; probed at
        most once per HEALTH_CACHE seconds, so a flood of /healthz is no flood of queries."""
        started = time.monotonic()
        if started - self.probed_at < HEALTH_CACHE:
            return self.not_ready
        self.probed_at = started
        try:
            await self.db.ping()
        except StoreError as exc:
            self.not_ready = _one_line(str(exc), 300)
        else:
            self.not_ready = None
        return self.not_ready

    async def handle(self, request: Request) -> Response:
        """The answer to ``request``: a handler's, or SPEC's error body for what it raised."""
        started = time.perf_counter()
        methods = ROUTES.get(request.path)
        try:
            if methods is None:
                return not_found(request)
            handler = methods.get(request.method)
            if handler is None:
                return method_not_allowed(request, methods)
            return await handler(self, request)
        except Refusal as refusal:
            answer = error_body(refusal.status, refusal.code, refusal.message, refusal.retry_after)
            answer.close = refusal.close
            return answer
        except StoreError as exc:
            why = _one_line(str(exc), 300)  # the store's messages never hold a password
            journal.send(
                "refused",
                f"state database unavailable; nothing issued: {why}",
                journal.ERR,
                code="unavailable",
                database_error=why,
            )
            answer = error_body(
                503,
                "unavailable",
                "the signer's state database is unavailable; try again",
                RETRY_AFTER_UNAVAILABLE,
            )
            # Closed: a retry may reach another replica behind a balancer, and a call that
            # timed out cannot hand its late result to a later request's handler.
            answer.close = True
            return answer
        except Exception as exc:  # noqa: BLE001 - the last line of defence: log, answer 500
            message = f"internal error: {type(exc).__name__}: {_one_line(str(exc))}"
            journal.send("refused", message, journal.ERR, code="internal")
            return error_body(500, "internal", "internal error; see the signer's journal")
        finally:
            path = request.path if methods is not None else "other"
            metrics.LATENCY.labels(path).observe(time.perf_counter() - started)


def not_found(request: Request) -> Response:
    paths = ", ".join(sorted(ROUTES))
    return error_body(
        404, "not-found", f"no endpoint at {_short(request.path)}; the API has {paths}"
    )


def method_not_allowed(request: Request, methods: dict[str, Handler]) -> Response:
    """405, naming what would work in the message and in Allow (RFC 9110 requires it)."""
    allowed = sorted(methods)
    answer = error_body(
        405,
        "method-not-allowed",
        f"{_short(request.method)} is not allowed on {_short(request.path)}; allowed: {', '.join(allowed)}",
    )
    answer.headers.append(("Allow", ", ".join(allowed)))
    return answer


def _short(text: str, limit: int = 100) -> str:
    """Client-chosen text (a path, a method, a field name) cut to fit in a message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(text: str, limit: int = 200) -> str:
    return _short(" ".join(text.split()), limit)


# -- reading a request -----------------------------------------------------------------------


def identify(signer: Signer, request: Request) -> policy.Identity | None:
    return policy.authenticate(
        request.peer,
        signer.cluster_cas,
        signer.authority.identity.cert,
        signer.clock(),
        issuer=request.issuer,
    )


async def require_identity(
    signer: Signer, request: Request, endpoint: str, via: tuple[str, ...]
) -> policy.Identity:
    """The authenticated identity, or an audited 401 before the body is even read."""
    identity = identify(signer, request)
    if identity is not None and identity.via in via:
        return identity
    peer = request.peer
    who = f"certificate:{pki.serial_hex(peer)}" if peer else "anonymous"
    message = "a valid node identity certificate is needed for this request"
    record = AuditRecord(
        time=signer.clock(), endpoint=endpoint, node=None, identity=who, reason="",
        outcome=REFUSED, code="unauthenticated", message=message, peer=request.remote,
    )  # fmt: skip
    await signer.db.commit(record)
    raise _refused(record, 401, "unauthenticated", message)


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; else 413 too-large, 408 too-slow or 400 bad-request."""
    return parse_body(await request.read())


class _Unaccepted(ValueError):
    """JSON that Python's json module reads but RFC 8259 or the signer does not accept."""


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 bad-request ``Refusal`` saying why.

    RFC 8259 JSON in UTF-8 without a byte order mark; no NaN or Infinity, no name twice
    in one object, integers of at most MAX_DIGITS digits, nesting at most MAX_DEPTH deep.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(400, "bad-request", f"request body is not UTF-8 (byte {exc.start})") from exc
    if text.startswith("\ufeff"):
        raise Refusal(400, "bad-request", "request body starts with a byte order mark")
    too_deep = Refusal(
        400, "bad-request", f"request body nests arrays or objects deeper than {MAX_DEPTH} levels"
    )
    if nests_deeper(raw, MAX_DEPTH):
        raise too_deep
    try:
        body = json.loads(
            text, object_pairs_hook=_unique_names, parse_constant=_no_constant, parse_int=_integer
        )
    except _Unaccepted as exc:
        raise Refusal(400, "bad-request", f"request body {exc}") from exc
    except json.JSONDecodeError as exc:
        message = f"request body is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        raise Refusal(400, "bad-request", message) from exc
    except RecursionError as exc:  # nests_deeper() keeps this away; never a 500 if not
        raise too_deep from exc
    if not isinstance(body, dict):
        raise Refusal(400, "bad-request", f"request body must be a JSON object, not {_kind(body)}")
    return body


_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPENERS = frozenset(b"[{")


def nests_deeper(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in the UTF-8 JSON ``raw`` nest more than ``limit`` deep.

    json.loads recurses once per level against the interpreter's recursion limit, which
    it shares with the caller's stack: in this server's handlers about 980 levels of
    ``[`` raised RecursionError.  Counting first, without recursion, lets a fixed limit
    decide.  Brackets in strings do not count.  On text that is not JSON the count can
    be wrong only past the point where json.loads fails anyway.  Linear, and at C speed
    but for one pass over the brackets.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:  # every body an agent sends
        return False
    # Without escaped backslashes, then escaped quotes, every '"' left opens or closes
    # a string (UTF-8 never puts these bytes inside a multi-byte character).
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.split(b'"')[::2])
    depth = 0
    for byte in outside_strings.translate(None, _NOT_BRACKETS):
        if byte in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 8259 leaves a repeated name to the reader; Go keeps the last, some keep the
    # first.  Two readers of one body must never see two different requests.
    seen: set[str] = set()
    for name, _value in pairs:
        if name in seen:
            raise _Unaccepted(f"repeats the name {_short(name, 40)!r} in one object")
        seen.add(name)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise _Unaccepted(f"holds {name}, which is not a JSON number")


def _integer(digits: str) -> int:
    # int() of a long string costs time quadratic in its length; Python's own bound
    # (4300 digits) can be lifted by the environment (PYTHONINTMAXSTRDIGITS).
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise _Unaccepted(
            f"holds a number of {len(digits.lstrip('-'))} digits (at most {MAX_DIGITS})"
        )
    return int(digits)


def _kind(value: object) -> str:
    """The JSON type of a parsed value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def text_field(
    body: dict[str, Any], name: str, required: bool = True, limit: int = MAX_BODY
) -> str:
    """The string field ``name`` of a body; a missing or null optional one is ""."""
    value = body.get(name)
    if value is None and not required:
        return ""
    if name not in body:
        raise Refusal(400, "bad-request", f"field {name!r} is missing")
    if not isinstance(value, str):
        raise Refusal(400, "bad-request", f"field {name!r} must be a string, not {_kind(value)}")
    if required and not value:
        raise Refusal(400, "bad-request", f"field {name!r} must not be empty")
    if len(value) > limit:
        raise Refusal(
            400, "bad-request", f"field {name!r} is {len(value)} characters long (at most {limit})"
        )
    return value


def claim_field(body: dict[str, Any], name: str = "culprits") -> str | None:
    """The node's claim ``name``: None when absent, null or "", else printable text.

    Lines of printable characters (no Unicode control, format, surrogate, private-use,
    unassigned or separator character but the space) joined by "\n", at most MAX_CLAIM
    bytes in UTF-8.  Operators read it in a terminal, so nothing in it can move the
    cursor, reorder text (bidi controls are format characters) or pass for a line of
    the audit table.  Checked characters first: a lone surrogate has no UTF-8 length.
    """
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Refusal(400, "bad-request", f"field {name!r} must be a string, not {_kind(value)}")
    if not all(line.isprintable() for line in value.split("\n")):
        at, char = next(
            (i, ch) for i, ch in enumerate(value) if ch != "\n" and not ch.isprintable()
        )
        raise Refusal(
            400,
            "bad-request",
            f"field {name!r} holds U+{ord(char):04X} at character {at}: only printable text and \\n line breaks",
        )
    size = len(value.encode("utf-8"))
    if size > MAX_CLAIM:
        raise Refusal(
            400, "bad-request", f"field {name!r} is {size} bytes in UTF-8 (at most {MAX_CLAIM})"
        )
    return value


def pem_bytes(text: str) -> bytes:
    """A ``csr`` field as bytes for the policy, which judges any bytes.

    JSON's "\\ud800" escapes decode to lone surrogates, which UTF-8 cannot encode;
    replaced by "?", such text is still no CSR, and the policy answers bad-csr.
    """
    return text.encode("utf-8", "replace")


# -- issuing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One issuance request, as the handler read it."""

    endpoint: str  # "sign", "enroll", "identity"
    kind: str  # policy.KUBELET or policy.IDENTITY
    csr: bytes
    identity: policy.Identity | None
    reason: str = ""
    spend_token: str | None = None
    rate_limit: int | None = None
    claim: str | None = None  # audited as the node's word, never shown to the policy


async def issue(signer: Signer, request: Request, ask: Ask) -> tuple[x509.Certificate, str]:
    """Decide, build, audit; the certificate and the node, or a ``Refusal``."""
    now = signer.clock()
    decision = policy.decide(ask.csr, ask.identity, ask.kind)
    if ask.spend_token and decision.code == "forbidden-node":
        # A token bound to another node gets the same answer as any bad token.
        decision = policy.refuse(
            403, "token-invalid", "the token is unknown, expired or already used", decision.node
        )
    record = AuditRecord(
        time=now,
        endpoint=ask.endpoint,
        # The requester's node, so `audit --node A` shows A asking for B's certificate.
        node=ask.identity.node if ask.identity else decision.node,
        identity=ask.identity.describe() if ask.identity else "anonymous",
        reason=ask.reason,
        outcome=ISSUED if decision.accepted else REFUSED,
        code=decision.code,
        message=decision.message,
        key_fingerprint=decision.key_fingerprint,
        peer=request.remote,
        claim=ask.claim,
    )
    if decision.node is not None and decision.node != record.node:
        # the node the CSR names, when it is not the caller's: a claim, kept for audit --node
        record = dataclasses.replace(record, claimed_node=decision.node)
    if not decision.accepted:
        await signer.db.commit(record)
        raise _refused(record, decision.status, decision.code or "bad-request", decision.message)
    if decision.public_key is None or decision.node is None:  # accepted always carries both
        raise Refusal(500, "internal", "accepted decision without a key")
    kubelet = ask.kind == policy.KUBELET
    issuer = signer.authority.cluster if kubelet else signer.authority.identity
    lifetime = signer.rules.cert_lifetime if kubelet else signer.rules.identity_lifetime
    cert = policy.build_certificate(
        issuer, decision.public_key, decision.node, ask.kind,
        dt.timedelta(seconds=lifetime), now, policy.random_serial(),
    )  # fmt: skip
    record = dataclasses.replace(
        record,
        serial=pki.serial_hex(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )
    verdict = await signer.db.commit(record, spend_token=ask.spend_token, rate_limit=ask.rate_limit)
    if verdict.code is not None:
        status = 429 if verdict.code == "rate-limited" else 403
        raise _refused(record, status, verdict.code, verdict.message, verdict.retry_after)
    metrics.ISSUED.labels(ask.endpoint).inc()
    journal.send(
        "issued",
        f"issued {ask.kind} certificate {record.serial} for node {decision.node} to {record.identity} ({ask.reason or ask.endpoint})",
        node=decision.node, serial=record.serial, not_after=pki.iso(cert.not_valid_after_utc),
        identity=record.identity, reason=ask.reason or None, endpoint=ask.endpoint,
    )  # fmt: skip
    return cert, decision.node


def _refused(
    record: AuditRecord, status: int, code: str, message: str, retry_after: int | None = None
) -> Refusal:
    metrics.REFUSED.labels(code).inc()
    journal.send(
        "refused",
        f"refused {record.endpoint} for node {record.node or '?'} from {record.identity}: {code}: {message}",
        journal.WARNING,
        node=record.node, identity=record.identity, code=code, endpoint=record.endpoint,
    )  # fmt: skip
    return Refusal(status, code, message, retry_after)


# -- handlers --------------------------------------------------------------------------------


async def get_ca(signer: Signer, request: Request) -> Response:
    return Response(200, signer.ca_answer)


async def get_healthz(signer: Signer, request: Request) -> Response:
    """Readiness: 200 while this worker's state database answers, else 503 saying why."""
    problem = await signer.readiness()
    if problem is None:
        return Response(200, b"ok", content_type=TEXT)
    retry = [("Retry-After", str(RETRY_AFTER_UNAVAILABLE))]
    # Closed, as every 503: a probe that timed out may still get its late result, which
    # must find no later request's handler on this connection.
    return Response(503, f"not ready: {problem}".encode(), TEXT, retry, close=True)


async def get_livez(signer: Signer, request: Request) -> Response:
    """Liveness: the worker's loop answers, whatever its database does."""
    return Response(200, b"ok", content_type=TEXT)


async def get_metrics(signer: Signer, request: Request) -> Response:
    outstanding = await signer.db.list_tokens(signer.clock())
    body = metrics.render(len(outstanding), signer.authority)
    return Response(200, body, content_type=TEXT)


async def post_sign(signer: Signer, request: Request) -> Response:
    identity = await require_identity(
        signer, request, "sign", via=(policy.IDENTITY, policy.KUBELET)
    )
    body = await read_json(request)
    ask = Ask(
        endpoint="sign",
        kind=policy.KUBELET,
        csr=pem_bytes(text_field(body, "csr")),
        identity=identity,
        reason=_clean_reason(text_field(body, "reason", required=False, limit=200)),
        rate_limit=signer.rules.max_issuances_per_node_per_hour,
        claim=claim_field(body),
    )
    cert, _node = await issue(signer, request, ask)
    return json_response(
        {
            "certificate": pki.certificate_pem(cert).decode(),
            "ca_bundle": signer.authority.cluster_bundle,
            "serial": pki.serial_hex(cert),
            "not_after": pki.iso(cert.not_valid_after_utc),
        },
        status=201,
    )


async def post_identity(signer: Signer, request: Request) -> Response:
    # Only an identity certificate renews an identity: a kubelet certificate cannot.
    identity = await require_identity(signer, request, "identity", via=(policy.IDENTITY,))
    body = await read_json(request)
    ask = Ask("identity", policy.IDENTITY, pem_bytes(text_field(body, "csr")), identity)
    return await _identity_answer(signer, request, ask)


async def post_enroll(signer: Signer, request: Request) -> Response:
    body = await read_json(request)
    csr = pem_bytes(text_field(body, "csr"))
    parsed = tokens.parse_token(text_field(body, "token", limit=200))
    token = None
    if parsed is not None:
        token = await signer.db.find_token(parsed[0], signer.clock())
        if token is not None and not tokens.secret_matches(token.secret_hash, parsed[1]):
            token = None
    if token is None:
        ref = parsed[0] if parsed else "malformed"
        record = AuditRecord(
            time=signer.clock(), endpoint="enroll", node=None, identity=f"token:{ref}",
            reason="", outcome=REFUSED, code="token-invalid",
            message="unknown, expired, spent or mismatched token", peer=request.remote,
            claimed_node=policy.claimed_node(csr, policy.IDENTITY),
        )  # fmt: skip
        await signer.db.commit(record)
        raise _refused(
            record, 403, "token-invalid", "the token is unknown, expired or already used"
        )
    identity = policy.Identity(token.node, "token", token.id)
    ask = Ask("enroll", policy.IDENTITY, csr, identity, spend_token=token.id)
    return await _identity_answer(signer, request, ask)


async def _identity_answer(signer: Signer, request: Request, ask: Ask) -> Response:
    cert, node = await issue(signer, request, ask)
    return json_response(
        {
            "certificate": pki.certificate_pem(cert).decode(),
            "ca_bundle": signer.authority.cluster_bundle,
            "node": node,
        },
        status=201,
    )


def _clean_reason(reason: str) -> str:
    """The agent's stated reason, made safe for logs (printable, short)."""
    return "".join(ch for ch in reason if ch.isprintable())[:100]


# Path -> method -> handler. A GET route answers HEAD too, without the body (RFC 9110).
ROUTES: dict[str, dict[str, Handler]] = {
    "/v1/ca": {"GET": get_ca, "HEAD": get_ca},
    "/v1/enroll": {"POST": post_enroll},
    "/v1/identity": {"POST": post_identity},
    "/v1/sign": {"POST": post_sign},
    "/healthz": {"GET": get_healthz, "HEAD": get_healthz},
    "/livez": {"GET": get_livez, "HEAD": get_livez},
    "/metrics": {"GET": get_metrics, "HEAD": get_metrics},
}
