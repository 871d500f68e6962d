"""The signer's aiohttp application: an app factory and thin handlers.

Each issuing handler reads the peer certificate and the body, calls the pure policy,
writes exactly one audit record through the store, and renders JSON.  Every error
body is ``{"error": CODE, "message": TEXT}`` with SPEC's codes; nothing else (no
traceback, no token secret) ever reaches a client.  A body is read whole (at most
MAX_BODY bytes, within BODY_TIMEOUT) and must be strict JSON (``parse_body``) before a
handler looks at a field.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError
from cryptography import x509

from .. import pki
from ..edges import journal
from . import metrics, policy, tokens
from .authority import Authority
from .config import Policy
from .store import ISSUED, REFUSED, AuditRecord, Store, StoreError

MAX_BODY = 64 * 1024
BODY_TIMEOUT = 10.0  # seconds to receive a whole request body
MAX_DEPTH = 32  # levels of arrays and objects in a body; SPEC's bodies have one
MAX_DIGITS = 100  # digits of a JSON integer; SPEC's bodies have none
MAX_CLAIM = 1024  # bytes of UTF-8 in a sign request's "culprits"
Clock = Callable[[], dt.datetime]


@dataclass(frozen=True)
class Refusal(Exception):
    """An error answer in SPEC's shape; raised by handlers, rendered by the middleware."""

    status: int
    code: str
    message: str
    retry_after: int | None = None
    close: bool = False  # the connection cannot carry another request after this one


STORE = web.AppKey("store", Store)
AUTHORITY = web.AppKey("authority", Authority)
POLICY = web.AppKey("policy", Policy)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_app(
    authority: Authority, store: Store, rules: Policy, clock: Clock = utcnow
) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[error_middleware])
    app[AUTHORITY], app[STORE], app[POLICY], app[CLOCK] = authority, store, rules, clock
    app.cleanup_ctx.append(_store_lifetime)
    app.router.add_get("/v1/ca", get_ca)
    app.router.add_post("/v1/enroll", post_enroll)
    app.router.add_post("/v1/identity", post_identity)
    app.router.add_post("/v1/sign", post_sign)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/metrics", get_metrics)
    return app


async def _store_lifetime(app: web.Application) -> Any:
    await app[STORE].open()
    yield
    await app[STORE].close()


# -- middleware: SPEC's error bodies for everything ------------------------------------------


def error_body(
    status: int, code: str, message: str, retry_after: int | None = None
) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        return await handler(request)
    except Refusal as refusal:
        response = error_body(refusal.status, refusal.code, refusal.message, refusal.retry_after)
        if refusal.close:
            response.force_close()
        return response
    except StoreError:
        journal.send(
            "refused", "state database unavailable; nothing issued", journal.ERR, code="unavailable"
        )
        return error_body(
            503, "unavailable", "the signer's state database is unavailable; try again"
        )
    except web.HTTPException as exc:  # 404 and 405 from aiohttp's router
        return http_error(request, exc)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: log, answer 500
        message = f"internal error: {type(exc).__name__}: {_one_line(str(exc))}"
        journal.send("refused", message, journal.ERR, code="internal")
        return error_body(500, "internal", "internal error; see the signer's journal")
    finally:
        metrics.LATENCY.labels(request.path if request.path in _KNOWN_PATHS else "other").observe(
            time.perf_counter() - started
        )


_KNOWN_PATHS = {"/v1/ca", "/v1/enroll", "/v1/identity", "/v1/sign", "/healthz", "/metrics"}


def http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's router's refusal in SPEC's shape, saying what would work."""
    path = _short(request.path)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        response = error_body(
            405,
            "method-not-allowed",
            f"{_short(request.method)} is not allowed on {path}; allowed: {', '.join(allowed)}",
        )
        response.headers["Allow"] = ", ".join(allowed)  # RFC 9110: a 405 must carry Allow
        return response
    if exc.status == 404:
        paths = ", ".join(sorted(_KNOWN_PATHS))
        return error_body(404, "not-found", f"no endpoint at {path}; the API has {paths}")
    return error_body(exc.status, "bad-request" if exc.status < 500 else "internal", exc.reason)


def _short(text: str, limit: int = 100) -> str:
    """Client-chosen text (a path, a method, a field name) cut to fit in a message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(text: str, limit: int = 200) -> str:
    return _short(" ".join(text.split()), limit)


def _reason(exc: BaseException) -> str:
    """What aiohttp says is wrong with a request, on one line."""
    for error in (exc, exc.__cause__):
        if isinstance(error, HttpProcessingError):
            return _one_line(error.message)
    return _one_line(str(exc))


class _JournalHandler(logging.Handler):
    """aiohttp's server log as one journal line per event, never a traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        what = record.getMessage()
        # A request aiohttp could not parse, or a body it could not decode (which it
        # meets again when it drains the body after our answer): the client's doing.
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            message = f"{what}: bad request from the client: {_reason(exc)}"
            journal.send("refused", message, journal.WARNING, code="bad-request")
        else:
            detail = f": {type(exc).__name__}: {_one_line(str(exc))}" if exc else ""
            journal.send("refused", f"internal error: {what}{detail}", journal.ERR, code="internal")


def http_logger() -> logging.Logger:
    """The logger for aiohttp's server, ``web.AppRunner(app, logger=http_logger())``.

    aiohttp logs every request it cannot parse (a bad request line, a header line over
    8190 bytes, a body framing it cannot follow) with ``logger.exception``: a traceback
    of its own parser, on stderr when nothing else is set up.  This logger makes each
    one a journal line instead (debug messages are dropped), in no global registry.
    """
    logger = logging.Logger("kubecertd-signer.http", logging.INFO)
    logger.addHandler(_JournalHandler())
    return logger


# -- reading a request -----------------------------------------------------------------------


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The client certificate of this connection (already verified by the TLS layer)."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return x509.load_der_x509_certificate(der) if der else None


def identify(request: web.Request) -> policy.Identity | None:
    authority = request.app[AUTHORITY]
    return policy.authenticate(
        peer_certificate(request),
        list(authority.cluster_certs),
        authority.identity.cert,
        request.app[CLOCK](),
    )


async def require_identity(
    request: web.Request, endpoint: str, via: tuple[str, ...]
) -> policy.Identity:
    """The authenticated identity, or an audited 401 before the body is even read."""
    identity = identify(request)
    if identity is not None and identity.via in via:
        return identity
    peer = peer_certificate(request)
    who = f"certificate:{pki.serial_hex(peer)}" if peer else "anonymous"
    message = "a valid node identity certificate is needed for this request"
    record = AuditRecord(
        time=request.app[CLOCK](), endpoint=endpoint, node=None, identity=who, reason="",
        outcome=REFUSED, code="unauthenticated", message=message, peer=request.remote or "",
    )  # fmt: skip
    await request.app[STORE].commit(record)
    raise _refused(record, 401, "unauthenticated", message)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; else 413 too-large, 408 too-slow or 400 bad-request."""
    return parse_body(await read_body(request))


async def read_body(request: web.Request) -> bytes:
    too_large = Refusal(413, "too-large", f"request body is over {MAX_BODY} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    try:
        return await asyncio.wait_for(request.read(), BODY_TIMEOUT)
    except web.HTTPRequestEntityTooLarge as exc:
        raise too_large from exc
    except asyncio.TimeoutError as exc:
        raise Refusal(
            408, "too-slow", f"request body not received within {BODY_TIMEOUT:g} s", close=True
        ) from exc
    except web.RequestPayloadError as exc:  # a Content-Encoding or chunked framing that fails
        message = f"request body cannot be decoded: {_reason(exc)}"
        raise Refusal(400, "bad-request", message, close=True) from exc
    except ConnectionError as exc:  # the client left mid-body; nobody reads the answer
        raise Refusal(400, "bad-request", "request body cut short", close=True) from exc


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


async def issue(request: web.Request, ask: Ask) -> tuple[x509.Certificate, str]:
    """Decide, build, audit; the certificate and the node, or a ``Refusal``."""
    app, now = request.app, request.app[CLOCK]()
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
        peer=request.remote or "",
        claim=ask.claim,
    )
    if not decision.accepted:
        await app[STORE].commit(record)
        raise _refused(record, decision.status, decision.code or "bad-request", decision.message)
    if decision.public_key is None or decision.node is None:  # accepted always carries both
        raise Refusal(500, "internal", "accepted decision without a key")
    issuer = app[AUTHORITY].cluster if ask.kind == policy.KUBELET else app[AUTHORITY].identity
    lifetime = (
        app[POLICY].cert_lifetime if ask.kind == policy.KUBELET else app[POLICY].identity_lifetime
    )
    cert = policy.build_certificate(
        issuer, decision.public_key, decision.node, ask.kind,
        dt.timedelta(seconds=lifetime), now, policy.random_serial(),
    )  # fmt: skip
    record = _with_certificate(record, cert)
    verdict = await app[STORE].commit(
        record, spend_token=ask.spend_token, rate_limit=ask.rate_limit
    )
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


def _with_certificate(record: AuditRecord, cert: x509.Certificate) -> AuditRecord:
    from dataclasses import replace  # noqa: PLC0415

    return replace(
        record,
        serial=pki.serial_hex(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


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


async def get_ca(request: web.Request) -> web.Response:
    return web.json_response({"ca_bundle": request.app[AUTHORITY].cluster_bundle})


async def get_healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def get_metrics(request: web.Request) -> web.Response:
    outstanding = await request.app[STORE].list_tokens(request.app[CLOCK]())
    body = metrics.render(len(outstanding), request.app[AUTHORITY])
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def post_sign(request: web.Request) -> web.Response:
    identity = await require_identity(request, "sign", via=(policy.IDENTITY, policy.KUBELET))
    body = await read_json(request)
    ask = Ask(
        endpoint="sign",
        kind=policy.KUBELET,
        csr=pem_bytes(text_field(body, "csr")),
        identity=identity,
        reason=_clean_reason(text_field(body, "reason", required=False, limit=200)),
        rate_limit=request.app[POLICY].max_issuances_per_node_per_hour,
        claim=claim_field(body),
    )
    cert, _node = await issue(request, ask)
    return web.json_response(
        {
            "certificate": pki.certificate_pem(cert).decode(),
            "ca_bundle": request.app[AUTHORITY].cluster_bundle,
            "serial": pki.serial_hex(cert),
            "not_after": pki.iso(cert.not_valid_after_utc),
        },
        status=201,
    )


async def post_identity(request: web.Request) -> web.Response:
    # Only an identity certificate renews an identity: a kubelet certificate cannot.
    identity = await require_identity(request, "identity", via=(policy.IDENTITY,))
    body = await read_json(request)
    ask = Ask("identity", policy.IDENTITY, pem_bytes(text_field(body, "csr")), identity)
    return await _identity_answer(request, ask)


async def post_enroll(request: web.Request) -> web.Response:
    body = await read_json(request)
    csr = pem_bytes(text_field(body, "csr"))
    parsed = tokens.parse_token(text_field(body, "token", limit=200))
    token = None
    if parsed is not None:
        token = await request.app[STORE].find_token(parsed[0], request.app[CLOCK]())
        if token is not None and not tokens.secret_matches(token.secret_hash, parsed[1]):
            token = None
    if token is None:
        ref = parsed[0] if parsed else "malformed"
        record = AuditRecord(
            time=request.app[CLOCK](), endpoint="enroll", node=None, identity=f"token:{ref}",
            reason="", outcome=REFUSED, code="token-invalid",
            message="unknown, expired, spent or mismatched token", peer=request.remote or "",
        )  # fmt: skip
        await request.app[STORE].commit(record)
        raise _refused(
            record, 403, "token-invalid", "the token is unknown, expired or already used"
        )
    identity = policy.Identity(token.node, "token", token.id)
    ask = Ask("enroll", policy.IDENTITY, csr, identity, spend_token=token.id)
    return await _identity_answer(request, ask)


async def _identity_answer(request: web.Request, ask: Ask) -> web.Response:
    cert, node = await issue(request, ask)
    return web.json_response(
        {
            "certificate": pki.certificate_pem(cert).decode(),
            "ca_bundle": request.app[AUTHORITY].cluster_bundle,
            "node": node,
        },
        status=201,
    )


def _clean_reason(reason: str) -> str:
    """The agent's stated reason, made safe for logs (printable, short)."""
    return "".join(ch for ch in reason if ch.isprintable())[:100]
