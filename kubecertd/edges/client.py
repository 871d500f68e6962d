"""The agent's side of the signer API: mutual TLS with requests (SPEC "HTTP API").

Transport failures and 5xx become ``SignerUnreachable`` (retried with backoff); a
refusal with a SPEC error code becomes ``SignerRefused``.  Nothing here looks at
certificates: the caller verifies every answer before it touches a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import requests

from ..errors import SignerRefused, SignerUnreachable

ClientCert = tuple[str, str]  # (certificate path, key path)


@dataclass(frozen=True)
class Issued:
    certificate: bytes
    ca_bundle: bytes


class SignerClient(Protocol):
    def conversation(self) -> AbstractContextManager[None]:
        """Calls made inside share one connection (a heal: GET /v1/ca, then POST /v1/sign)."""
        ...

    def fetch_ca(self, identity: ClientCert | None = None) -> bytes: ...

    def sign(self, csr_pem: bytes, reason: str, identity: ClientCert) -> Issued: ...

    def enroll(self, token: str, csr_pem: bytes) -> Issued: ...

    def renew_identity(self, csr_pem: bytes, identity: ClientCert) -> Issued: ...


class HttpSignerClient:
    """The real client, the server checked against ``ca``.

    Outside a ``conversation()`` each call has a session of its own; inside one, calls
    with the same client certificate reuse one kept-alive TLS connection, which saves a
    handshake per heal.  Nothing stays open between conversations.
    """

    def __init__(self, url: str, ca: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.ca = ca
        self.timeout = timeout
        self._session: requests.Session | None = None

    @contextmanager
    def conversation(self) -> Iterator[None]:
        with _new_session() as session:
            self._session = session
            try:
                yield
            finally:
                self._session = None

    def fetch_ca(self, identity: ClientCert | None = None) -> bytes:
        # No certificate is needed for /v1/ca; presenting the one the next call uses
        # lets both share a connection.
        return _pem(self._call("GET", "/v1/ca", None, identity), "ca_bundle")

    def sign(self, csr_pem: bytes, reason: str, identity: ClientCert) -> Issued:
        body = {"csr": csr_pem.decode(), "reason": reason}
        return _issued(self._call("POST", "/v1/sign", body, identity))

    def enroll(self, token: str, csr_pem: bytes) -> Issued:
        return _issued(
            self._call("POST", "/v1/enroll", {"token": token, "csr": csr_pem.decode()}, None)
        )

    def renew_identity(self, csr_pem: bytes, identity: ClientCert) -> Issued:
        return _issued(self._call("POST", "/v1/identity", {"csr": csr_pem.decode()}, identity))

    def _call(
        self, method: str, path: str, body: dict[str, str] | None, identity: ClientCert | None
    ) -> dict[str, Any]:
        if not self.url:
            raise SignerUnreachable("no signer configured ([signer] url is empty)")
        where = f"{self.url}{path}"
        try:
            with nullcontext(self._session) if self._session else _new_session() as session:
                response = session.request(
                    method, where, json=body, cert=identity, verify=self.ca, timeout=self.timeout
                )
        except requests.exceptions.SSLError as exc:
            raise SignerUnreachable(f"{where}: TLS failed: {_reason(exc)}") from exc
        except OSError as exc:  # requests' errors derive from IOError; also bad cert/ca files
            raise SignerUnreachable(f"{where}: {_reason(exc)}") from exc
        return _answer(where, response)


def _new_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies or REQUESTS_CA_BUNDLE from the environment
    return session


def _answer(where: str, response: requests.Response) -> dict[str, Any]:
    retry_after = _retry_after(response.headers.get("Retry-After"))
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise SignerUnreachable(
            f"{where}: HTTP {response.status_code} without a JSON body", retry_after
        )
    if response.status_code >= 500 or response.status_code == 429:
        code = str(payload.get("error", "unavailable"))
        if response.status_code == 429:
            raise SignerRefused(429, code, str(payload.get("message", "")), retry_after)
        raise SignerUnreachable(
            f"{where}: {response.status_code} {code}: {payload.get('message', '')}", retry_after
        )
    if response.status_code >= 400:
        raise SignerRefused(
            response.status_code, str(payload.get("error", "?")), str(payload.get("message", ""))
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
        raise SignerUnreachable(f"signer answer lacks a PEM {field}")
    return value.encode()


def _issued(payload: dict[str, Any]) -> Issued:
    return Issued(certificate=_pem(payload, "certificate"), ca_bundle=_pem(payload, "ca_bundle"))


def _reason(exc: BaseException) -> str:
    """The innermost useful message of a requests/urllib3 error chain, on one line."""
    text = str(exc)
    for marker in ("Caused by ", "Failed to establish a new connection: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return " ".join(text.split()).rstrip("'\")")[:200]
