"""The signer's aiohttp application: an app factory and thin handlers.

Each issuing handler reads the peer certificate and the body, calls the pure policy,
writes exactly one audit record through the store, and renders JSON.  Every error
body is ``{"error": CODE, "message": TEXT}`` with SPEC's codes; nothing else (no
traceback, no token secret) ever reaches a client.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography import x509

from .. import pki
from ..edges import journal
from . import metrics, policy, tokens
from .authority import Authority
from .config import Policy
from .store import ISSUED, REFUSED, AuditRecord, Store, StoreError

MAX_BODY = 64 * 1024
BODY_TIMEOUT = 10.0  # seconds to receive a whole request body
Clock = Callable[[], dt.datetime]


@dataclass(frozen=True)
class Refusal(Exception):
    """An error answer in SPEC's shape; raised by handlers, rendered by the middleware."""

    status: int
    code: str
    message: str
    retry_after: int | None = None


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


_HTTP_CODES = {413: "too-large", 401: "unauthenticated", 503: "unavailable"}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        return await handler(request)
    except Refusal as refusal:
        return error_body(refusal.status, refusal.code, refusal.message, refusal.retry_after)
    except StoreError:
        journal.send(
            "refused", "state database unavailable; nothing issued", journal.ERR, code="unavailable"
        )
        return error_body(
            503, "unavailable", "the signer's state database is unavailable; try again"
        )
    except web.HTTPException as exc:  # 404, 405, 413 from aiohttp itself
        code = _HTTP_CODES.get(exc.status, "bad-request")
        return error_body(exc.status, code, exc.reason)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: log, answer 500
        journal.send(
            "refused", f"internal error: {type(exc).__name__}: {exc}", journal.ERR, code="internal"
        )
        return error_body(500, "internal", "internal error; see the signer's journal")
    finally:
        metrics.LATENCY.labels(request.path if request.path in _KNOWN_PATHS else "other").observe(
            time.perf_counter() - started
        )


_KNOWN_PATHS = {"/v1/ca", "/v1/enroll", "/v1/identity", "/v1/sign", "/healthz", "/metrics"}


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
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise Refusal(413, "too-large", f"request body is over {MAX_BODY} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise Refusal(413, "too-large", f"request body is over {MAX_BODY} bytes") from exc
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refusal(400, "bad-request", "request body is not JSON") from exc
    if not isinstance(body, dict):
        raise Refusal(400, "bad-request", "request body must be a JSON object")
    return body


def text_field(
    body: dict[str, Any], name: str, required: bool = True, limit: int = MAX_BODY
) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise Refusal(400, "bad-request", f"field {name!r} must be a non-empty string")
    return value


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
        csr=text_field(body, "csr").encode(),
        identity=identity,
        reason=_clean_reason(text_field(body, "reason", required=False, limit=200)),
        rate_limit=request.app[POLICY].max_issuances_per_node_per_hour,
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
    ask = Ask("identity", policy.IDENTITY, text_field(body, "csr").encode(), identity)
    return await _identity_answer(request, ask)


async def post_enroll(request: web.Request) -> web.Response:
    body = await read_json(request)
    csr = text_field(body, "csr").encode()
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
