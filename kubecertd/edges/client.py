"""The agent's side of the signer API: mutual TLS over http.client + ssl (SPEC "HTTP API").

Transport failures and 5xx become ``SignerUnreachable`` (retried with backoff); a
refusal with a SPEC error code becomes ``SignerRefused``.  What waiting cannot change
becomes ``SignerMisconfigured`` and is never retried: no URL, a trust anchor or client
identity that does not load, a signer certificate that does not verify against
``[signer] ca``, or a TLS alert by which the signer rejects the client certificate.
Nothing here looks at certificates: the caller verifies every answer before it
touches a file.  With several replicas in ``[signer] url``, an unreachable one hands the
call to the next (SPEC "Fail-over"); nothing else does.

The standard library rather than requests: importing requests costs the idle agent
6.4 MiB (urllib3, charset_normalizer, idna), http.client and ssl 1.8 MiB.  Nothing from
the environment is honoured (no proxies, no SSL_CERT_FILE): the signer is checked
against ``[signer] ca`` alone, its host name included.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any, NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit

from .. import __version__
from ..errors import SignerMisconfigured, SignerRefused, SignerUnreachable

ClientCert = tuple[str, str]  # (certificate path, key path)

MAX_ANSWER = 1 << 20  # bytes; the signer's answers are a few KiB
_HEADERS = {"Accept": "application/json", "User-Agent": f"kubecertd/{__version__}"}
# What reusing a connection the server has closed in the meantime raises.
_DEAD_CONNECTION = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    ssl.SSLEOFError,
)

# TLS alerts by which the signer says it will not accept the client certificate: a
# certificate from another CA, expired, revoked, or none where one is required.
_REJECTED_CLIENT = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)

_Stamp = tuple[tuple[int, int, int] | None, ...]
_T = TypeVar("_T")
_Kept = tuple[str, ClientCert | None]  # (replica, identity) of a kept connection


class Issued(NamedTuple):
    certificate: bytes
    ca_bundle: bytes


class SignerClient(Protocol):
    def conversation(self) -> AbstractContextManager[None]:
        """Calls made inside share one connection (a heal: GET /v1/ca, then POST /v1/sign)."""
        ...

    def fetch_ca(self, identity: ClientCert | None = None) -> bytes: ...

    def sign(
        self, csr_pem: bytes, reason: str, identity: ClientCert, culprits: str | None = None
    ) -> Issued:
        """``culprits``: the node's summary of who changed its files (SPEC: at most 1024
        bytes of printable lines), sent only when given; the signer only audits it."""
        ...

    def enroll(self, token: str, csr_pem: bytes) -> Issued: ...

    def renew_identity(self, csr_pem: bytes, identity: ClientCert) -> Issued: ...


class HttpSignerClient:
    """The real client, the server checked against ``ca``.

    ``urls`` are the signer's replicas (one URL or several).  Each node tries them in
    its own order (``replica_order``); a replica that cannot be reached, times out or
    answers 5xx (``SignerUnreachable``) hands the call to the next one.  A refusal
    (any 4xx, 429 included: the replicas share the rate limit through their database)
    and a ``SignerMisconfigured`` end the call at once.  Inside a ``conversation()``
    the replica that answered first is asked first again.

    Outside a ``conversation()`` each call opens a connection of its own and closes it;
    inside one, calls with the same replica and client certificate reuse one kept-alive
    TLS connection, which saves a handshake per heal.  Nothing stays open between
    conversations.  The ``SSLContext`` of each client certificate is kept and built
    again only when the CA, certificate or key file changes (a renewed identity).
    """

    def __init__(self, urls: str | Sequence[str], ca: str, timeout: float, node: str = "") -> None:
        given = [urls] if isinstance(urls, str) else urls
        self.urls = replica_order([url.rstrip("/") for url in given if url], node)
        self.ca = ca
        self.timeout = timeout
        self.answered = ""  # the replica that gave the last answer, "" before any
        self._contexts: dict[ClientCert | None, tuple[_Stamp, ssl.SSLContext]] = {}
        self._kept: dict[_Kept, http.client.HTTPSConnection] | None = None
        self._sticky = ""  # in a conversation: the replica that answered in it

    @contextmanager
    def conversation(self) -> Iterator[None]:
        if self._kept is not None:  # nested: the outer conversation's connections
            yield
            return
        self._kept = {}
        try:
            yield
        finally:
            kept, self._kept, self._sticky = self._kept, None, ""
            for connection in kept.values():
                connection.close()

    def fetch_ca(self, identity: ClientCert | None = None) -> bytes:
        # No certificate is needed for /v1/ca; presenting the one the next call uses
        # lets both share a connection.
        return self._call("GET", "/v1/ca", None, identity, _ca_bundle)

    def sign(
        self, csr_pem: bytes, reason: str, identity: ClientCert, culprits: str | None = None
    ) -> Issued:
        body = {"csr": csr_pem.decode(), "reason": reason}
        if culprits is not None:
            body["culprits"] = culprits
        return self._call("POST", "/v1/sign", body, identity, _issued)

    def enroll(self, token: str, csr_pem: bytes) -> Issued:
        body = {"token": token, "csr": csr_pem.decode()}
        return self._call("POST", "/v1/enroll", body, None, _issued)

    def renew_identity(self, csr_pem: bytes, identity: ClientCert) -> Issued:
        return self._call("POST", "/v1/identity", {"csr": csr_pem.decode()}, identity, _issued)

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, str] | None,
        identity: ClientCert | None,
        read: Callable[[dict[str, Any]], _T],
    ) -> _T:
        """Ask the replicas in turn until one answers; ``read`` takes the answer apart.

        When none answers, one ``SignerUnreachable`` names each replica and why, with
        the longest Retry-After any of them sent.
        """
        targets = {url: _target(url) for url in self.urls}  # every URL checked first
        if not targets:
            raise SignerMisconfigured("no signer configured: [signer] url is empty")
        order = sorted(self.urls, key=lambda url: url != self._sticky)  # stable
        failures: list[SignerUnreachable] = []
        for url in order:
            try:
                answer = self._ask(url, targets[url], method, path, body, identity, read)
            except SignerUnreachable as exc:
                failures.append(exc)
                continue
            except SignerRefused:
                self.answered = url
                raise
            self.answered = url
            if self._kept is not None:
                self._sticky = url
            return answer
        if len(failures) == 1:
            raise failures[0]
        waits = [f.retry_after for f in failures if f.retry_after is not None]
        raise SignerUnreachable(
            f"none of the {len(failures)} signer replicas answered: "
            + "; ".join(str(f) for f in failures),
            max(waits, default=None),
        ) from failures[-1]

    def _ask(
        self,
        url: str,
        target: tuple[str, int | None, str],
        method: str,
        path: str,
        body: dict[str, str] | None,
        identity: ClientCert | None,
        read: Callable[[dict[str, Any]], _T],
    ) -> _T:
        """One request to one replica: its answer taken apart, or the error it comes to."""
        where = f"{url}{path}"
        host, port, prefix = target
        headers = dict(_HEADERS)
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        kept = self._kept
        connection = kept.get((url, identity)) if kept is not None else None
        if connection is None:
            context = self._context(where, identity)
            connection = http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=context
            )
            if kept is not None:
                kept[url, identity] = connection
        try:
            status, retry_after, answer = _exchange(
                connection, method, prefix + path, payload, headers
            )
        except ssl.SSLCertVerificationError as exc:
            raise SignerMisconfigured(
                f"{where}: the signer's certificate does not verify against [signer] ca {self.ca}: {exc.verify_message}"
            ) from exc
        except ssl.SSLError as exc:
            if exc.reason in _REJECTED_CLIENT:
                who = identity[0] if identity else "(none presented)"
                raise SignerMisconfigured(
                    f"{where}: the signer rejected the client certificate {who} in the TLS handshake ({exc.reason}); enroll again: kubecertd enroll --token TOKEN"
                ) from exc
            raise SignerUnreachable(f"{where}: TLS failed: {_reason(exc)}") from exc
        except TimeoutError as exc:
            raise SignerUnreachable(f"{where}: timed out after {self.timeout:g} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise SignerUnreachable(f"{where}: {_reason(exc)}") from exc
        finally:
            if kept is None:
                connection.close()
        if answer is None:
            raise SignerUnreachable(f"{where}: answer too large (over {MAX_ANSWER} bytes)")
        try:
            return read(_answer(where, status, retry_after, answer))
        except ValueError as exc:  # a 2xx without the fields the call needs
            raise SignerUnreachable(f"{where}: {exc}") from exc

    def _context(self, where: str, identity: ClientCert | None) -> ssl.SSLContext:
        """The TLS settings for ``identity``, built again when one of its files changed."""
        files = (self.ca, *identity) if identity else (self.ca,)
        stamp = tuple(_stamp(path) for path in files)
        cached = self._contexts.get(identity)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            context = ssl.create_default_context(cafile=self.ca)
        except OSError as exc:  # ssl.SSLError too: no certificate in the file
            raise SignerMisconfigured(
                f"{where}: cannot load the signer CA {self.ca} ([signer] ca): {_reason(exc)}"
            ) from exc
        if identity is not None:
            try:
                # A password (never used: our keys are not encrypted) so that OpenSSL
                # does not prompt on a terminal for one.
                context.load_cert_chain(*identity, password=b"")
            except OSError as exc:
                raise SignerMisconfigured(
                    f"{where}: cannot load the client identity {_culprit(*identity)}: {_reason(exc)}"
                ) from exc
        self._contexts[identity] = (stamp, context)
        return context


def replica_order(urls: Sequence[str], node: str) -> tuple[str, ...]:
    """The replicas in the order ``node`` tries them: rendezvous hashing.

    Each replica's weight for a node is sha256(node NUL url); the heaviest comes first.
    The fleet spreads evenly over the replicas, and removing one moves only the nodes
    that had it first (https://en.wikipedia.org/wiki/Rendezvous_hashing).  A URL given
    twice is asked once.
    """

    def weight(url: str) -> bytes:
        return hashlib.sha256(f"{node}\0{url}".encode()).digest()

    return tuple(sorted(dict.fromkeys(urls), key=weight, reverse=True))


def _target(url: str) -> tuple[str, int | None, str]:
    """Host, port and path prefix of ``url``: https://host[:port][/prefix]."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number or out of range
        host = port = None
    if parts.scheme != "https" or not host:
        raise SignerMisconfigured(f"[signer] url {url}: not an https://host[:port] URL")
    return host, port, parts.path.rstrip("/")


def _exchange(
    connection: http.client.HTTPSConnection,
    method: str,
    target: str,
    payload: bytes | None,
    headers: dict[str, str],
) -> tuple[int, float | None, bytes | None]:
    """One request: the status, Retry-After and the body (None when over MAX_ANSWER).

    A kept connection the server has closed since its last answer is opened again
    before the request; one found dead while a GET is sent is retried once on a new one.
    A POST is never sent twice to one replica: it may have acted on the first.

    The connection's timeout bounds the whole exchange, not only each read: a signer
    (or anything between) that trickles its answer a few bytes at a time is cut off
    when the time is up, and that is a ``TimeoutError`` like any other.
    """
    reused = connection.sock is not None
    if reused and _closed_by_peer(connection.sock):
        connection.close()  # request() opens a new one
        reused = False
    with _cut_after(connection) as cut:
        try:
            try:
                connection.request(method, target, payload, headers)
                response = connection.getresponse()
            except _DEAD_CONNECTION:
                if not reused or method != "GET":
                    raise
                connection.close()
                connection.request(method, target, payload, headers)
                response = connection.getresponse()
            retry_after = _retry_after(response.getheader("Retry-After"))
            body = _read(response)
        except BaseException as exc:
            connection.close()  # in an unknown state: a kept one starts afresh next time
            if cut.is_set():
                raise TimeoutError("the whole exchange took too long") from exc
            raise
    if cut.is_set():  # cut just as the last byte came: nothing lost, but a short answer
        connection.close()
        raise TimeoutError("the whole exchange took too long")
    if body is None:
        connection.close()  # the rest of the answer is still on the wire
    return response.status, retry_after, body


@contextmanager
def _cut_after(connection: http.client.HTTPSConnection) -> Iterator[threading.Event]:
    """Shuts the connection's socket down once ``connection.timeout`` has passed.

    The shutdown (the socket's own, not TLS's) wakes a read blocked in another thread
    at once; the event says that it happened.  One short-lived timer thread per request.
    """
    cut = threading.Event()

    def shut() -> None:
        cut.set()
        sock = connection.sock
        if sock is not None:
            with suppress(OSError):  # already closed
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    if not isinstance(connection.timeout, int | float):  # none given: no deadline either
        yield cut
        return
    timer = threading.Timer(connection.timeout, shut)
    timer.daemon = True
    timer.start()
    try:
        yield cut
    finally:
        timer.cancel()
        timer.join()  # no shutdown once the exchange is over


def _closed_by_peer(sock: Any) -> bool:
    """Whether an idle connection has something to read: the server's close, or junk."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _read(response: http.client.HTTPResponse) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed MAX_ANSWER."""
    if response.length is not None and response.length > MAX_ANSWER:
        return None
    chunks, size = [], 0
    while chunk := response.read(65536):
        size += len(chunk)
        if size > MAX_ANSWER:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(where: str, status: int, retry_after: float | None, body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        payload = None
    if not isinstance(payload, dict):
        raise SignerUnreachable(f"{where}: HTTP {status} without a JSON body", retry_after)
    if status >= 500 or status in (408, 429):  # 408: the body came too slowly; try again
        code = str(payload.get("error", "unavailable"))
        if status == 429:
            raise SignerRefused(429, code, _line(payload.get("message", "")), retry_after)
        raise SignerUnreachable(
            f"{where}: {status} {code}: {_line(payload.get('message', ''))}", retry_after
        )
    if status >= 400:
        raise SignerRefused(
            status, _line(payload.get("error", "?")), _line(payload.get("message", ""))
        )
    return payload


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _pem(payload: dict[str, Any], field: str) -> bytes:
    value = payload.get(field)
    if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
        raise ValueError(f"answer lacks a PEM {field}")
    return value.encode()


def _ca_bundle(payload: dict[str, Any]) -> bytes:
    return _pem(payload, "ca_bundle")


def _issued(payload: dict[str, Any]) -> Issued:
    return Issued(certificate=_pem(payload, "certificate"), ca_bundle=_pem(payload, "ca_bundle"))


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None  # loading it reports the problem
    return info.st_ino, info.st_mtime_ns, info.st_size


def _culprit(cert: str, key: str) -> str:
    """Which file of an identity OpenSSL rejected (its errors do not say).

    The first that cannot be opened; else the certificate if OpenSSL finds no
    certificate in it; else the key (not a key, or not the certificate's).
    """
    for path in (cert, key):
        try:
            with open(path, "rb"):
                pass
        except OSError:
            return path
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except OSError:
        return cert
    return key


def _reason(exc: BaseException) -> str:
    """An exception's message on one line, without OpenSSL's source positions."""
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return _line(exc.strerror)
    return _line(str(exc).split(" (_ssl.c:", 1)[0] or type(exc).__name__)


def _line(value: object) -> str:
    return " ".join(str(value).split())[:200]
