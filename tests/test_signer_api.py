"""The signer's HTTP API over real mutual TLS on loopback (SPEC "HTTP API", "Issuance policy").

Every test talks to a real ``kubecertd-signer serve`` subprocess (``signer_harness``)
with ``requests`` and, for an independent TLS stack, ``curl`` and ``openssl``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kubecertd import pki

import factories
from signer_harness import Client, Signer, csr_pem, running_signer, signer_env

UTC = dt.timezone.utc
MAX_BODY = 64 * 1024
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
_serial = itertools.count()


def unique(prefix: str) -> str:
    """A node name no other test uses, so that rate limits and audits stay apart."""
    return f"{prefix}-{next(_serial)}.test.local"


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


# -- building requests ----------------------------------------------------------------------


def make_csr(
    subject: x509.Name,
    key: PrivateKeyTypes | None = None,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> str:
    """A CSR PEM for ``subject`` signed by ``key`` (a fresh P-256 key by default)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return csr_pem(builder.sign(key, algorithm))


def kubelet_csr(node: str, key: PrivateKeyTypes | None = None) -> str:
    return make_csr(pki.kubelet_subject(node), key)


def identity_csr(node: str) -> str:
    return make_csr(pki.identity_subject(node))


def openssl_sha1_csr(folder: Path, node: str) -> str:
    """A kubelet CSR signed with ecdsa-with-SHA1 (cryptography refuses to make one)."""
    key = folder / "sha1-key.pem"
    key.write_bytes(pki.private_key_pem(ec.generate_private_key(ec.SECP256R1())))
    return subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-sha1",
         "-subj", f"/O=system:nodes/CN=system:node:{node}"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip


def tampered_csr(node: str) -> str:
    """A kubelet CSR whose signature no longer verifies (proof of possession fails)."""
    der = bytearray(
        x509.load_pem_x509_csr(kubelet_csr(node).encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-3] ^= 0x01  # inside the signature's last INTEGER
    return csr_pem(x509.load_der_x509_csr(bytes(der)))


def load_issuer(cert: Path, key: Path) -> factories.Issued:
    return factories.Issued(
        x509.load_pem_x509_certificate(cert.read_bytes()),
        serialization.load_pem_private_key(key.read_bytes(), password=None),
    )


def write_client(folder: Path, issued: factories.Issued, name: str) -> Client:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    cert.write_bytes(issued.pem)
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)
    return cert, key


def forged_kubelet_cert(
    signer: Signer,
    folder: Path,
    node: str,
    orgs: tuple[str, ...] = (pki.NODES_GROUP,),
    eku: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    not_after: dt.datetime | None = None,
) -> Client:
    """A kubelet-style client certificate made with the cluster CA's key, outside the signer."""
    issued = factories.issue(
        load_issuer(signer.ca, signer.ca_key),
        cn_list=[pki.NODE_PREFIX + node],
        orgs=orgs,
        eku=eku,
        not_before=now() - dt.timedelta(days=2),
        not_after=not_after or now() + dt.timedelta(days=1),
    )
    return write_client(folder, issued, f"forged-{next(_serial)}")


def cert_of(client: Client) -> x509.Certificate:
    return x509.load_pem_x509_certificate(client[0].read_bytes())


# -- checking answers -----------------------------------------------------------------------


def assert_error(
    answer: requests.Response, status: int, code: str, secrets_: Sequence[str] = ()
) -> None:
    """SPEC's error shape: exactly {"error", "message"}, no traceback, no token secret."""
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str)
    assert body["message"]
    assert "Traceback" not in answer.text
    for secret in secrets_:
        assert secret not in answer.text


def curl(
    signer: Signer, path: str, *args: str, client: Client | None = None
) -> tuple[int, str, str]:
    """curl against the signer: (exit status, HTTP status or "000", body)."""
    out = signer.directory / f"curl-{next(_serial)}.out"
    command = ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", "20",
               "--cacert", str(signer.identity_ca), "--output", str(out),
               "--write-out", "%{http_code}", *args]  # fmt: skip
    if client is not None:
        command += ["--cert", str(client[0]), "--key", str(client[1])]
    result = subprocess.run(
        [*command, signer.url + path],
        capture_output=True, text=True, env=signer_env(), timeout=30, check=False,
    )  # fmt: skip
    body = out.read_text() if out.exists() else ""
    return result.returncode, result.stdout, body


# -- plain endpoints ------------------------------------------------------------------------


def test_ca_needs_no_client_certificate(signer: Signer) -> None:
    """GET /v1/ca without a client certificate returns the cluster CA file as ca_bundle."""
    answer = signer.get("/v1/ca")
    assert answer.status_code == 200
    assert answer.json() == {"ca_bundle": signer.ca.read_text()}


def test_healthz_says_ok(signer: Signer) -> None:
    """GET /healthz answers 200 with the body ``ok``."""
    answer = signer.get("/healthz")
    assert (answer.status_code, answer.text) == (200, "ok")


def test_livez_says_ok(signer: Signer) -> None:
    """GET /livez answers 200 ``ok``: the worker's loop is alive, whatever its database does."""
    answer = signer.get("/livez")
    assert (answer.status_code, answer.text) == (200, "ok")


def test_lost_state_file_is_not_ready_and_503_with_retry_after(
    start_signer: Callable[..., Signer],
) -> None:
    """With its SQLite file gone, a worker's /healthz is 503 naming the file, and an issuance
    is 503 `unavailable` with Retry-After on a closed connection; /livez stays 200."""
    running = start_signer()
    identity = running.enroll("node-gone")
    for path in running.directory.glob("state.db*"):
        path.unlink()
    deadline = time.monotonic() + 10
    while (probe := running.get("/healthz")).status_code != 503:  # after the 1 s cache
        assert time.monotonic() < deadline, probe.text
        time.sleep(0.05)  # poll interval, bounded by the deadline
    assert probe.text.startswith("not ready: SQLite state database ")
    assert str(running.state) in probe.text
    assert probe.headers["Retry-After"] == "5"
    answer = running.post("/v1/sign", {"csr": kubelet_csr("node-gone")}, client=identity)
    assert answer.status_code == 503
    assert answer.json()["error"] == "unavailable"
    assert answer.headers["Retry-After"] == "5"
    assert answer.headers["Connection"] == "close"
    assert running.get("/livez").status_code == 200
    if not JOURNAL_SOCKET.exists():  # else the line went to journald
        line = next(x for x in running.log_text().splitlines() if "unavailable" in x)
        assert f"nothing issued: SQLite state database {running.state} is gone" in line


def issued_total(signer: Signer, endpoint: str) -> float:
    answer = signer.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == "kubecertd_signer_issued_total" and sample.labels == {
                "endpoint": endpoint
            }:
                return sample.value
    return 0.0


def test_metrics_count_issuances(signer: Signer) -> None:
    """GET /metrics is Prometheus text whose kubecertd_signer_issued_total counts each issuance."""
    node = unique("metrics")
    identity = signer.enroll(node)
    before = issued_total(signer, "sign")
    signer.kubelet_cert(node, identity)
    assert issued_total(signer, "sign") == before + 1
    assert issued_total(signer, "enroll") >= 1


def test_metrics_are_shared_by_workers(signer_workers2: Signer) -> None:
    """With two workers, every scrape (whichever worker answers) counts every issuance."""
    node = unique("metrics2")
    identity = signer_workers2.enroll(node)
    before = issued_total(signer_workers2, "sign")
    for _ in range(3):
        signer_workers2.kubelet_cert(node, identity)
    assert [issued_total(signer_workers2, "sign") for _ in range(6)] == [before + 3] * 6


def test_method_not_allowed_lists_the_allowed_methods(signer: Signer) -> None:
    """A 405 names the allowed methods in its Allow header (RFC 9110) and in its message."""
    for path, method, allowed in (
        ("/v1/ca", "POST", {"GET", "HEAD"}),
        ("/v1/sign", "GET", {"POST"}),
    ):
        with signer.session() as session:
            answer = session.request(method, signer.url + path, timeout=30)
        assert_error(answer, 405, "method-not-allowed")
        assert set(answer.headers["Allow"].replace(" ", "").split(",")) == allowed
        assert all(name in answer.json()["message"] for name in allowed)


# -- mutual TLS with two independent clients ------------------------------------------------


def test_requests_with_and_without_identity(signer: Signer) -> None:
    """Over requests, /v1/sign issues to a node identity and answers 401 to no client certificate."""
    node = unique("requests")
    identity = signer.enroll(node)
    csr = {"csr": kubelet_csr(node), "reason": "cert-missing"}
    assert signer.post("/v1/sign", csr, client=identity).status_code == 201
    assert_error(signer.post("/v1/sign", csr), 401, "unauthenticated")


def test_curl_with_and_without_identity(signer: Signer) -> None:
    """curl (OpenSSL) gets the CA without a client certificate, 201 with one and 401 without."""
    node = unique("curl")
    identity = signer.enroll(node)
    status, http, body = curl(signer, "/v1/ca")
    assert (status, http) == (0, "200")
    assert json.loads(body)["ca_bundle"] == signer.ca.read_text()
    payload = json.dumps({"csr": kubelet_csr(node), "reason": "renewal"})
    post = ("--header", "Content-Type: application/json", "--data-binary", payload)
    status, http, body = curl(signer, "/v1/sign", *post, client=identity)
    assert (status, http) == (0, "201"), body
    issued = x509.load_pem_x509_certificate(json.loads(body)["certificate"].encode())
    assert issued.subject == pki.kubelet_subject(node)
    status, http, body = curl(signer, "/v1/sign", *post)
    assert (status, http) == (0, "401")
    assert json.loads(body)["error"] == "unauthenticated"


def untrusted_client(signer: Signer, folder: Path, kind: str) -> Client:
    """A client certificate the TLS layer must reject: from an unknown CA, or expired."""
    if kind == "unknown-ca":
        stranger = factories.make_ca(not_before=now() - dt.timedelta(days=1))
        issued = factories.issue(
            stranger,
            cn_list=[pki.NODE_PREFIX + "stranger"],
            not_before=now() - dt.timedelta(days=1),
            not_after=now() + dt.timedelta(days=1),
        )
        return write_client(folder, issued, kind)
    past = now() - dt.timedelta(hours=1)
    if kind == "expired-identity":
        issued = factories.issue(
            load_issuer(signer.identity_ca, signer.identity_ca_key),
            cn_list=["expired-node"],
            orgs=(),
            not_before=past - dt.timedelta(days=30),
            not_after=past,
        )
        return write_client(folder, issued, kind)
    return forged_kubelet_cert(signer, folder, "expired-node", not_after=past)


@pytest.mark.parametrize("kind", ["unknown-ca", "expired-identity", "expired-kubelet"])
def test_unverifiable_client_certificate_fails_handshake(
    signer: Signer, tmp_path: Path, kind: str
) -> None:
    """A client certificate from an unknown CA, or expired, fails the TLS handshake itself."""
    client = untrusted_client(signer, tmp_path, kind)
    with pytest.raises(requests.ConnectionError):  # SSLError is one; see the xfail below
        signer.get("/v1/ca", client=client)
    for pin in ((), ("--tls-max", "1.2")):
        status, http, _ = curl(signer, "/v1/ca", *pin, client=client)
        assert status != 0
        assert http == "000"  # no HTTP answer at all
    # Under TLS 1.2 the client sees the handshake itself fail.
    context = ssl.create_default_context(cafile=str(signer.identity_ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(*client)
    with (
        socket.create_connection(("127.0.0.1", signer.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1").close()


def test_unknown_ca_is_an_ssl_error_under_tls13(signer: Signer, tmp_path: Path) -> None:
    """A TLS 1.3 client presenting a certificate from an unknown CA gets an SSLError (an alert)."""
    client = untrusted_client(signer, tmp_path, "unknown-ca")
    with pytest.raises(requests.exceptions.SSLError):
        signer.get("/v1/ca", client=client)


# -- the kubelet certificate as identity ----------------------------------------------------


def test_healthy_kubelet_certificate_renews_itself(signer: Signer) -> None:
    """A kubelet certificate issued by /v1/sign is accepted as the client identity for /v1/sign."""
    node = unique("renew")
    kubelet = signer.kubelet_cert(node, signer.enroll(node))
    renewed = signer.kubelet_cert(node, kubelet)
    assert cert_of(renewed).subject == pki.kubelet_subject(node)
    assert cert_of(renewed).serial_number != cert_of(kubelet).serial_number


@pytest.mark.parametrize(
    "orgs",
    [
        ("system:masters", "system:nodes"),
        ("system:nodes", "system:masters"),
        (),
    ],
    ids=["masters-first", "masters-last", "no-group"],
)
def test_kubelet_certificate_with_other_groups_is_unauthenticated(
    signer: Signer, tmp_path: Path, orgs: tuple[str, ...]
) -> None:
    """A cluster-CA kubelet certificate whose O is not exactly system:nodes is refused 401."""
    node = unique("masters")
    client = forged_kubelet_cert(signer, tmp_path, node, orgs=orgs)
    answer = signer.post("/v1/sign", {"csr": kubelet_csr(node)}, client=client)
    assert_error(answer, 401, "unauthenticated")


def test_kubelet_certificate_without_eku_is_an_identity(signer: Signer, tmp_path: Path) -> None:
    """A healthy cluster-CA kubelet certificate with no EKU extension (Go: any usage) may renew."""
    node = unique("no-eku")
    client = forged_kubelet_cert(signer, tmp_path, node, eku=None)
    answer = signer.post("/v1/sign", {"csr": kubelet_csr(node)}, client=client)
    assert answer.status_code == 201, answer.text


def test_copied_certificate_cannot_ask_for_another_node(signer: Signer) -> None:
    """Node B's kubelet certificate and key, asking for node A's certificate, get 403 forbidden-node."""
    node_a, node_b = unique("node-a"), unique("node-b")
    copied = signer.kubelet_cert(node_b, signer.enroll(node_b))
    answer = signer.post("/v1/sign", {"csr": kubelet_csr(node_a)}, client=copied)
    assert_error(answer, 403, "forbidden-node")
    assert node_a in answer.json()["message"]


# -- every SPEC error code ------------------------------------------------------------------


@dataclasses.dataclass
class Ctx:
    """What an error case needs: the shared signer, a way to start its own, and secrets used."""

    signer: Signer
    start_signer: Callable[..., Signer]
    tmp_path: Path
    secrets: list[str] = dataclasses.field(default_factory=list)

    def token(self, node: str, ttl: str | None = None, on: Signer | None = None) -> str:
        token = (on or self.signer).token(node, ttl)
        self.secrets.append(token.split(".", 1)[1])
        return token


def case_bad_request(ctx: Ctx) -> list[requests.Response]:
    identity = ctx.signer.enroll(unique("bad-request"))
    token = ctx.token(unique("bad-request"))
    return [
        ctx.signer.post("/v1/sign", b"{not json", client=identity),
        ctx.signer.post("/v1/sign", b"\xff\xfe\x00", client=identity),
        ctx.signer.post("/v1/sign", [kubelet_csr("x")], client=identity),
        ctx.signer.post("/v1/sign", {"reason": "cert-missing"}, client=identity),
        ctx.signer.post("/v1/sign", {"csr": 42}, client=identity),
        ctx.signer.post("/v1/enroll", {"token": token}),
        ctx.signer.post("/v1/enroll", {"csr": identity_csr("x")}),
        ctx.signer.post("/v1/enroll", {"csr": identity_csr("x"), "token": 7}),
        ctx.signer.post("/v1/sign", {"csr": kubelet_csr("x"), "reason": 7}, client=identity),
        ctx.signer.post(
            "/v1/sign", {"csr": kubelet_csr("x"), "reason": "r" * 201}, client=identity
        ),
        # Two of BAD_CULPRITS (test_bad_culprits_message_names_the_field has them all): a
        # case's answers stay alive, each holding its connection open, and more than 32
        # from one address are refused by [limits] max_connections_per_address.
        ctx.signer.post("/v1/sign", {"csr": kubelet_csr("x"), "culprits": 7}, client=identity),
        ctx.signer.post(
            "/v1/sign", {"csr": kubelet_csr("x"), "culprits": "x" * 1025}, client=identity
        ),
        # Not JSON as RFC 8259 has it: NaN, a repeated name, not UTF-8.
        ctx.signer.post("/v1/sign", b'{"csr": NaN}', client=identity),
        ctx.signer.post("/v1/sign", b'{"csr": "a", "csr": "b"}', client=identity),
        ctx.signer.post("/v1/identity", b'{"csr": 1' + b"0" * 5000 + b"}", client=identity),
        ctx.signer.post("/v1/enroll", json.dumps({"token": token, "csr": "x"}).encode("utf-16")),
        ctx.signer.post("/v1/enroll", b"\xef\xbb\xbf" + json.dumps({"token": token}).encode()),
        # A body whose Content-Encoding does not decode.
        ctx.signer.post(
            "/v1/sign", b"not gzip", client=identity, headers={"Content-Encoding": "gzip"}
        ),
        ctx.signer.post("/v1/enroll", b"not zlib", headers={"Content-Encoding": "deflate"}),
    ]


# SPEC: "culprits" is null, or at most 1024 bytes of UTF-8 in lines of printable text.
BAD_CULPRITS: dict[str, object] = {
    "number": 7,
    "boolean": True,
    "array": ["rm"],
    "object": {"rm": 1},
    "tab": "tab\tseparated",
    "carriage-return": "windows\r\nlines",
    "terminal-escape": "\x1b[31mred\x1b[0m",
    "bidi-override": "\u202edesrever",
    "zero-width-space": "\u200b",  # a format character
    "no-break-space": "no\u00a0break",  # a separator other than the space
    "line-separator": "\u2028",  # a line break other than \n
    "nul": "nul\x00",
    "private-use": "\ue000",
    "lone-surrogate": "\ud800",  # no UTF-8 at all
    "1025-bytes": "x" * 1025,
    "1026-bytes-513-chars": "é" * 513,
}


def case_bad_csr(ctx: Ctx) -> list[requests.Response]:
    node = unique("bad-csr")
    identity = ctx.signer.enroll(node)
    key = ec.generate_private_key(ec.SECP256R1())
    masters = factories.make_name([pki.NODE_PREFIX + node], ["system:masters", "system:nodes"])
    two_cns = factories.make_name(
        [pki.NODE_PREFIX + node, pki.NODE_PREFIX + node], ["system:nodes"]
    )
    sans = x509.SubjectAlternativeName([x509.DNSName(node)])
    csrs = [
        "not a certificate request",
        kubelet_csr(node) + kubelet_csr(node),
        factories.issue(factories.make_ca()).pem.decode() + kubelet_csr(node),
        make_csr(pki.identity_subject(node), key),
        make_csr(masters, key),
        make_csr(two_cns, key),
        make_csr(pki.kubelet_subject(node), key, (sans,)),
        tampered_csr(node),
        openssl_sha1_csr(ctx.tmp_path, node),
    ]
    answers = [ctx.signer.post("/v1/sign", {"csr": csr}, client=identity) for csr in csrs]
    enroll_node = unique("bad-csr")
    answers.append(
        ctx.signer.post(
            "/v1/enroll", {"token": ctx.token(enroll_node), "csr": kubelet_csr(enroll_node)}
        )
    )
    # An unpaired UTF-16 surrogate escape is a JSON string but never PEM text.
    answers += [
        ctx.signer.post("/v1/sign", {"csr": "\ud800"}, client=identity),
        ctx.signer.post("/v1/identity", {"csr": "\udfff-----BEGIN"}, client=identity),
        ctx.signer.post("/v1/enroll", {"token": ctx.token(enroll_node), "csr": "\ud800"}),
    ]
    return answers


def case_weak_key(ctx: Ctx) -> list[requests.Response]:
    node = unique("weak-key")
    identity = ctx.signer.enroll(node)
    keys: list[PrivateKeyTypes] = [
        factories.cached_key("rsa-1024"),
        rsa.generate_private_key(public_exponent=3, key_size=2048),
        factories.cached_key("ec-p224"),
        factories.cached_key("ec-p521"),
        factories.cached_key("ed25519"),
    ]
    return [
        ctx.signer.post("/v1/sign", {"csr": kubelet_csr(node, key)}, client=identity)
        for key in keys
    ]


def case_unauthenticated(ctx: Ctx) -> list[requests.Response]:
    node = unique("unauthenticated")
    identity = ctx.signer.enroll(node)
    kubelet = ctx.signer.kubelet_cert(node, identity)
    return [
        ctx.signer.post("/v1/sign", {"csr": kubelet_csr(node)}),
        ctx.signer.post("/v1/identity", {"csr": identity_csr(node)}),
        ctx.signer.post("/v1/identity", {"csr": identity_csr(node)}, client=kubelet),
    ]


def case_forbidden_node(ctx: Ctx) -> list[requests.Response]:
    node, other = unique("forbidden"), unique("victim")
    identity = ctx.signer.enroll(node)
    kubelet = ctx.signer.kubelet_cert(node, identity)
    return [
        ctx.signer.post("/v1/sign", {"csr": kubelet_csr(other)}, client=identity),
        ctx.signer.post("/v1/sign", {"csr": kubelet_csr(other)}, client=kubelet),
        ctx.signer.post("/v1/identity", {"csr": identity_csr(other)}, client=identity),
    ]


def case_node_revoked(ctx: Ctx) -> list[requests.Response]:
    node = unique("revoked")
    identity = ctx.signer.enroll(node)
    kubelet = ctx.signer.kubelet_cert(node, identity)
    token = ctx.token(node)
    assert ctx.signer.cli("node", "revoke", node).returncode == 0
    answers = [
        ctx.signer.post("/v1/sign", {"csr": kubelet_csr(node)}, client=identity),
        ctx.signer.post("/v1/sign", {"csr": kubelet_csr(node)}, client=kubelet),
        ctx.signer.post("/v1/identity", {"csr": identity_csr(node)}, client=identity),
        ctx.signer.post("/v1/enroll", {"token": token, "csr": identity_csr(node)}),
    ]
    assert ctx.signer.cli("node", "allow", node).returncode == 0
    again = ctx.signer.post("/v1/sign", {"csr": kubelet_csr(node)}, client=identity)
    assert again.status_code == 201, "node allow must restore issuance"
    enrolled = ctx.signer.post("/v1/enroll", {"token": token, "csr": identity_csr(node)})
    assert enrolled.status_code == 201, "a refusal must not spend the token"
    return answers


def wait_until_expired(signer: Signer, token: str, bound: float = 10.0) -> None:
    """Poll ``token list`` until the signer no longer counts ``token`` as outstanding."""
    token_id = token.split(".", 1)[0]
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        listed = json.loads(signer.cli("token", "list", "--json").stdout)
        if token_id not in {entry["id"] for entry in listed}:
            return
    pytest.fail(f"token {token_id} still outstanding after {bound}s")


def case_token_invalid(ctx: Ctx) -> list[requests.Response]:
    node = unique("token")
    unknown = f"{secrets.token_hex(6)}.{secrets.token_hex(16)}"
    ctx.secrets.append(unknown.split(".")[1])
    spent = ctx.token(node)
    assert ctx.signer.post("/v1/enroll", {"token": spent, "csr": identity_csr(node)}).ok
    expired = ctx.token(node, ttl="1ms")
    wait_until_expired(ctx.signer, expired)
    other_node = ctx.token(node)
    wrong_secret = f"{other_node.split('.')[0]}.{secrets.token_hex(16)}"
    answers = [
        ctx.signer.post("/v1/enroll", {"token": token, "csr": identity_csr(node)})
        for token in (unknown, "not-a-token", spent, expired, wrong_secret)
    ]
    answers.append(
        ctx.signer.post("/v1/enroll", {"token": other_node, "csr": identity_csr(unique("x"))})
    )
    after = ctx.signer.post("/v1/enroll", {"token": other_node, "csr": identity_csr(node)})
    assert after.status_code == 201, "a refused token must stay usable for its own node"
    return answers


def case_too_large(ctx: Ctx) -> list[requests.Response]:
    identity = ctx.signer.enroll(unique("too-large"))

    def chunks() -> object:
        for _ in range(8):
            yield b" " * 10_000

    return [
        ctx.signer.post("/v1/enroll", b" " * (MAX_BODY + 1)),
        ctx.signer.post("/v1/enroll", chunks()),  # chunked: no Content-Length to trust
        ctx.signer.post("/v1/sign", {"csr": "x" * MAX_BODY}, client=identity),
    ]


def case_rate_limited(ctx: Ctx) -> list[requests.Response]:
    limited = ctx.start_signer(policy={"max_issuances_per_node_per_hour": 2})
    node = unique("rate")
    identity = limited.enroll(node)
    limited.kubelet_cert(node, identity)
    limited.kubelet_cert(node, identity)
    third = limited.post("/v1/sign", {"csr": kubelet_csr(node)}, client=identity)
    retry_after = third.headers.get("Retry-After", "")
    assert re.fullmatch(r"[1-9][0-9]*", retry_after), retry_after
    assert int(retry_after) <= 3600
    other = unique("rate")
    limited.kubelet_cert(other, limited.enroll(other))  # the limit is per node
    return [third]


def case_unavailable(ctx: Ctx) -> list[requests.Response]:
    broken = ctx.start_signer()
    node = unique("unavailable")
    identity = broken.enroll(node)
    broken.state.rename(broken.state.with_name("moved-away.db"))  # the audit cannot be written
    return [
        broken.post("/v1/sign", {"csr": kubelet_csr(node)}, client=identity),
        broken.post("/v1/enroll", {"token": f"{'0' * 12}.{'0' * 32}", "csr": identity_csr(node)}),
    ]


def case_not_found(ctx: Ctx) -> list[requests.Response]:
    return [
        ctx.signer.get("/v2/nothing-here"),
        ctx.signer.get("/v1/ca/"),
        ctx.signer.post("/v1/signs", {"csr": kubelet_csr("x")}),
        ctx.signer.get("/v1/%ZZ?x=%00"),
    ]


def case_method_not_allowed(ctx: Ctx) -> list[requests.Response]:
    with ctx.signer.session() as session:
        return [
            session.request(method, ctx.signer.url + path, timeout=30)
            for method, path in (
                ("POST", "/v1/ca"),
                ("PUT", "/v1/sign"),
                ("GET", "/v1/enroll"),
                ("DELETE", "/healthz"),
                ("OPTIONS", "/metrics"),
                ("PATCH", "/v1/identity"),
            )
        ]


ERROR_CASES = [
    pytest.param(400, case_bad_request, id="bad-request"),
    pytest.param(400, case_bad_csr, id="bad-csr"),
    pytest.param(400, case_weak_key, id="weak-key"),
    pytest.param(401, case_unauthenticated, id="unauthenticated"),
    pytest.param(403, case_forbidden_node, id="forbidden-node"),
    pytest.param(403, case_node_revoked, id="node-revoked"),
    pytest.param(403, case_token_invalid, id="token-invalid"),
    pytest.param(404, case_not_found, id="not-found"),
    pytest.param(405, case_method_not_allowed, id="method-not-allowed"),
    pytest.param(413, case_too_large, id="too-large"),
    pytest.param(429, case_rate_limited, id="rate-limited"),
    pytest.param(503, case_unavailable, id="unavailable"),
    # 500 internal has no black-box trigger; the middleware's catch-all is a unit-test matter.
]


@pytest.mark.parametrize(("status", "case"), ERROR_CASES)
def test_error_code(
    request: pytest.FixtureRequest,
    signer: Signer,
    start_signer: Callable[..., Signer],
    tmp_path: Path,
    status: int,
    case: Callable[[Ctx], list[requests.Response]],
) -> None:
    """Each way to provoke this SPEC error code gets its status and exactly {"error","message"}."""
    code = request.node.callspec.id
    ctx = Ctx(signer, start_signer, tmp_path)
    answers = case(ctx)
    assert answers
    for answer in answers:
        assert_error(answer, status, code, ctx.secrets)


@pytest.mark.parametrize("size", [MAX_BODY - 1, MAX_BODY, MAX_BODY + 1])
def test_body_limit_is_64_kib(signer: Signer, size: int) -> None:
    """A body of 64 KiB is read (then judged), one byte more is 413 too-large."""
    body = b'{"token": "x", "csr": "' + b"x" * (size - 25) + b'"}'
    assert len(body) == size
    answer = signer.post("/v1/enroll", body)
    if size > MAX_BODY:
        assert_error(answer, 413, "too-large")
    else:
        assert_error(answer, 403, "token-invalid")


MAX_DEPTH = 32  # SPEC: arrays and objects nest at most 32 levels deep


def nested(shape: str, depth: int) -> bytes:
    """A JSON text of ``depth`` arrays (or objects), each inside the one before."""
    if shape == "arrays":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


@pytest.fixture(scope="module")
def nesting_identity(signer: Signer) -> Client:
    """One node identity for the nesting tests, which never get as far as issuing."""
    return signer.enroll(unique("nesting"))


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1, 490, 10_000])
@pytest.mark.parametrize("shape", ["arrays", "objects"])
@pytest.mark.parametrize("path", ["/v1/sign", "/v1/identity", "/v1/enroll"])
def test_deeply_nested_body_is_bad_request(
    signer: Signer, nesting_identity: Client, path: str, shape: str, depth: int
) -> None:
    """JSON nested 32 levels deep is read, one level more (or thousands) is 400 bad-request."""
    body = nested(shape, depth)
    assert len(body) <= MAX_BODY
    answer = signer.post(path, body, client=nesting_identity)
    assert_error(answer, 400, "bad-request")
    too_deep = f"deeper than {MAX_DEPTH} levels" in answer.json()["message"]
    assert too_deep == (depth > MAX_DEPTH), answer.json()


# -- tokens under concurrency ---------------------------------------------------------------


def test_one_token_enrolls_once_across_workers(signer_workers2: Signer) -> None:
    """Two simultaneous enrollments with one token on two workers: one 201, one 403 token-invalid."""
    for _round in range(3):
        node = unique("race")
        token = signer_workers2.token(node)
        barrier = threading.Barrier(2)
        answers: list[requests.Response] = []

        def enroll(
            token: str = token,
            node: str = node,
            barrier: threading.Barrier = barrier,
            answers: list[requests.Response] = answers,
        ) -> None:
            csr = identity_csr(node)
            with signer_workers2.session() as session:
                session.get(signer_workers2.url + "/healthz", timeout=10)  # connect first
                barrier.wait(timeout=10)
                answers.append(
                    session.post(
                        signer_workers2.url + "/v1/enroll",
                        json={"token": token, "csr": csr},
                        timeout=30,
                    )
                )

        threads = [threading.Thread(target=enroll) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(answer.status_code for answer in answers) == [201, 403]
        refused = next(answer for answer in answers if answer.status_code == 403)
        assert_error(refused, 403, "token-invalid", [token.split(".")[1]])


# -- what gets issued -----------------------------------------------------------------------


def openssl_verify(ca: Path, cert_pem: str, folder: Path) -> None:
    cert = folder / f"verify-{next(_serial)}.pem"
    cert.write_text(cert_pem)
    result = subprocess.run(
        ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(ca), str(cert)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{cert}: OK"


def extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_issued_kubelet_certificate_fields(signer: Signer, tmp_path: Path, key_type: str) -> None:
    """A /v1/sign certificate verifies with openssl as sslclient and carries SPEC's fields."""
    node = unique("fields")
    identity = signer.enroll(node)
    key = factories.new_key(key_type)
    before = now()
    answer = signer.post(
        "/v1/sign", {"csr": kubelet_csr(node, key), "reason": "cert-expired"}, client=identity
    )
    after = now()
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert set(body) == {"certificate", "ca_bundle", "serial", "not_after"}
    assert body["ca_bundle"] == signer.ca.read_text()
    openssl_verify(signer.ca, body["certificate"], tmp_path)
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert cert.subject.rfc4514_string() == f"O=system:nodes,CN=system:node:{node}"
    assert pki.same_public_key(cert.public_key(), key.public_key())
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    usage = extension(cert, x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment == key_type.startswith("rsa")
    assert not usage.key_cert_sign
    five_minutes, thirty_days = dt.timedelta(minutes=5), dt.timedelta(days=30)
    slack = dt.timedelta(seconds=1)  # the certificate's times are whole seconds
    assert before - five_minutes - slack <= cert.not_valid_before_utc <= after - five_minutes
    assert before + thirty_days - slack <= cert.not_valid_after_utc <= after + thirty_days
    assert body["not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert body["serial"] == format(cert.serial_number, "x")
    assert re.fullmatch(r"[0-9a-f]+", body["serial"])
    assert cert.serial_number > 0


def test_issued_identity_certificate_fields(signer: Signer, tmp_path: Path) -> None:
    """An enrolled identity certificate is CN=<node>, clientAuth, and verifies against the identity CA."""
    node = unique("identity")
    token = signer.token(node)
    answer = signer.post("/v1/enroll", {"token": token, "csr": identity_csr(node)})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert set(body) == {"certificate", "ca_bundle", "node"}
    assert body["node"] == node
    assert body["ca_bundle"] == signer.ca.read_text()
    openssl_verify(signer.identity_ca, body["certificate"], tmp_path)
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert cert.subject.rfc4514_string() == f"CN={node}"
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []


# -- audit and secrecy ----------------------------------------------------------------------


def audit(signer: Signer, *args: str) -> list[dict[str, object]]:
    result = signer.cli("audit", "--json", *args)
    assert result.returncode == 0, result.stderr
    records: list[dict[str, object]] = json.loads(result.stdout)
    return records


def test_audit_records_every_decision(signer: Signer) -> None:
    """`audit --json` lists each decision with outcome and code; `--node` keeps that node's only."""
    node, other = unique("audited"), unique("audited")
    token = signer.token(node)
    secret = token.split(".")[1]
    key = ec.generate_private_key(ec.SECP256R1())
    csr = pki.build_csr(key, pki.identity_subject(node))
    enrolled = signer.post("/v1/enroll", {"token": token, "csr": csr_pem(csr)})
    assert enrolled.status_code == 201
    identity = signer.new_files(node, "identity")
    identity[0].write_text(enrolled.json()["certificate"])
    identity[1].write_bytes(pki.private_key_pem(key))
    again = signer.post("/v1/enroll", {"token": token, "csr": identity_csr(node)})
    signed = signer.post(
        "/v1/sign", {"csr": kubelet_csr(node), "reason": "renewal"}, client=identity
    )
    stolen = signer.post("/v1/sign", {"csr": kubelet_csr(other)}, client=identity)
    signer.cli("node", "revoke", node)
    revoked = signer.post("/v1/sign", {"csr": kubelet_csr(node)}, client=identity)
    signer.cli("node", "allow", node)
    assert [a.status_code for a in (again, signed, stolen, revoked)] == [403, 201, 403, 403]

    mine = audit(signer, "--node", node)
    # A refusal is filed under the node that asked, so node A asking for B shows under A;
    # the spent token's enrollment, tied to no node, shows by the node its CSR claims.
    assert [(r["node"], r["claimed_node"]) for r in mine] == [
        (node, None), (None, node), (node, None), (node, other), (node, None),
    ]  # fmt: skip
    assert [(r["endpoint"], r["outcome"], r["code"]) for r in mine] == [
        ("enroll", "issued", None),
        ("enroll", "refused", "token-invalid"),
        ("sign", "issued", None),
        ("sign", "refused", "forbidden-node"),
        ("sign", "refused", "node-revoked"),
    ]
    assert mine[2]["serial"] == signed.json()["serial"]
    assert mine[2]["reason"] == "renewal"
    assert mine[3]["identity"] == f"identity:{format(cert_of(identity).serial_number, 'x')}"
    assert other in str(mine[3]["message"])
    assert audit(signer, "--node", other) == [mine[3]]  # B's certificate, asked by A
    everything = signer.cli("audit", "--json")
    assert everything.returncode == 0
    records: list[dict[str, object]] = json.loads(everything.stdout)
    token_id = token.split(".")[0]
    by_token = [r for r in records if r["identity"] == f"token:{token_id}"]
    assert [(r["outcome"], r["code"]) for r in by_token] == [
        ("issued", None),
        ("refused", "token-invalid"),
    ]
    table = signer.cli("audit", "--node", node)
    assert table.returncode == 0
    assert "refused:node-revoked" in table.stdout

    log = signer.log_text()
    assert f"token:{token_id}" in log  # the decisions are logged ...
    for text in (everything.stdout, table.stdout, log):
        assert secret not in text  # ... without the secret
    for path in signer.directory.glob("state.db*"):
        assert secret.encode() not in path.read_bytes(), path


# -- the node's claim (culprits) -------------------------------------------------------------


def sign_answer_and_record(
    signer: Signer, identity: Client, body: dict[str, object]
) -> tuple[requests.Response, dict[str, object]]:
    """POST /v1/sign with ``body``; the answer and the newest audit record of the node."""
    answer = signer.post("/v1/sign", body, client=identity)
    node = pki.common_names(cert_of(identity).subject)[0].removeprefix(pki.NODE_PREFIX)
    return answer, audit(signer, "--node", node)[-1]


def test_culprits_are_audited_as_the_nodes_claim(signer: Signer) -> None:
    """The field "culprits" is audited verbatim as ``claim``, on issuance and refusal alike;
    absent, null or "" is no claim, a malformed one is not audited; it decides nothing,
    and /v1/identity ignores it."""
    node = unique("claims")
    identity = signer.enroll(node)
    kubelet = signer.kubelet_cert(node, identity)
    claim = (
        "unlink /var/lib/kubelet/pki/kubelet-client-current.pem by rm[4242] uid 0 (ssh)\n"
        "unlink /var/lib/kubelet/pki/kubelet-client.key by rm[4242] uid 0 ✓ 日本"
    )
    cases: list[tuple[Client, dict[str, object], int, str | None]] = [
        (identity, {"csr": kubelet_csr(node), "reason": "cert-missing", "culprits": claim}, 201, claim),
        (kubelet, {"csr": kubelet_csr(node), "culprits": "\n"}, 201, "\n"),
        (identity, {"csr": kubelet_csr(node)}, 201, None),
        (identity, {"csr": kubelet_csr(node), "culprits": None}, 201, None),
        (identity, {"csr": kubelet_csr(node), "culprits": ""}, 201, None),
        # A claim naming another node changes nothing: still forbidden-node, still audited.
        (identity, {"csr": kubelet_csr(unique("victim")), "culprits": f"I am {node}"}, 403, f"I am {node}"),
        (identity, {"csr": "not a CSR", "culprits": claim}, 400, claim),
    ]  # fmt: skip
    for client, body, status, stored in cases:
        answer, record = sign_answer_and_record(signer, client, body)
        assert answer.status_code == status, answer.text
        assert record["claim"] == stored, body
        if status == 201:
            assert record["serial"] == answer.json()["serial"]
    malformed = {"csr": kubelet_csr(node), "culprits": "tab\tseparated"}
    before = audit(signer, "--node", node)
    assert_error(signer.post("/v1/sign", malformed, client=identity), 400, "bad-request")
    assert audit(signer, "--node", node) == before  # bad-request is not audited
    renewed = signer.post(
        "/v1/identity", {"csr": identity_csr(node), "culprits": claim}, client=identity
    )
    assert renewed.status_code == 201
    newest = audit(signer, "--node", node)[-1]
    assert (newest["endpoint"], newest["claim"]) == ("identity", None)


@pytest.mark.parametrize(
    ("culprits", "status"),
    [
        pytest.param("x" * 1024, 201, id="1024-ascii"),
        pytest.param("x" * 1025, 400, id="1025-ascii"),
        pytest.param("é" * 512, 201, id="1024-bytes-512-chars"),
        pytest.param("é" * 512 + "x", 400, id="1025-bytes-513-chars"),
        pytest.param("🔑" * 256, 201, id="1024-bytes-256-chars"),
        pytest.param("\n" * 1024, 201, id="1024-newlines"),
    ],
)
def test_culprits_limit_is_1024_bytes_of_utf8(signer: Signer, culprits: str, status: int) -> None:
    """A claim of 1024 bytes in UTF-8 is kept, one byte more is 400 bad-request naming the field."""
    node = unique("claim-limit")
    identity = signer.enroll(node)
    answer = signer.post(
        "/v1/sign", {"csr": kubelet_csr(node), "culprits": culprits}, client=identity
    )
    if status == 201:
        assert answer.status_code == 201, answer.text
        assert audit(signer, "--node", node)[-1]["claim"] == culprits
    else:
        assert_error(answer, 400, "bad-request")
        assert answer.json()["message"] == "field 'culprits' is 1025 bytes in UTF-8 (at most 1024)"


CLAIMS_NODE = "claims.test.local"


@pytest.fixture(scope="module")
def claims_identity(signer: Signer) -> Client:
    """One node identity for the tests that never get as far as issuing."""
    return signer.enroll(CLAIMS_NODE)


@pytest.mark.parametrize("value", list(BAD_CULPRITS.values()), ids=list(BAD_CULPRITS))
def test_bad_culprits_message_names_the_field(
    signer: Signer, claims_identity: Client, value: object
) -> None:
    """Each malformed "culprits" is 400 bad-request whose message names the field."""
    body = {"csr": kubelet_csr(CLAIMS_NODE), "culprits": value}
    answer = signer.post("/v1/sign", body, client=claims_identity)
    assert_error(answer, 400, "bad-request")
    assert "field 'culprits'" in answer.json()["message"]


def kept_claim(value: object) -> tuple[int, str | None]:
    """SPEC's answer to "culprits": ``value``: the status, and the claim audited on a 201.

    Written from SPEC's wording (Unicode categories), independently of the signer's code.
    """
    if value is None or value == "":
        return 201, None
    if not isinstance(value, str):
        return 400, None
    printable = all(char in "\n " or unicodedata.category(char)[0] not in "CZ" for char in value)
    if printable and len(value.encode("utf-8")) <= 1024:
        return 201, value
    return 400, None


PRINTABLE = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"))


def near_limit(start: str, size: int) -> str:
    """``start`` padded with "x" to ``size`` bytes of UTF-8 (``start`` is shorter)."""
    return start + "x" * (size - len(start.encode("utf-8")))


NOT_STRINGS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)  # SPEC: NaN is no JSON
    | st.lists(st.text(max_size=4), max_size=3)
    | st.dictionaries(st.text(max_size=4), st.none(), max_size=2)
)
KINDS = [
    st.text(),  # any characters but surrogates
    st.text(st.characters(categories=("Cs", "Cc", "Cf", "Co", "Zs", "Zl", "Zp")) | PRINTABLE),
    st.text(PRINTABLE | st.sampled_from("\n "), max_size=1100),  # mostly kept
    st.builds(near_limit, st.text(PRINTABLE | st.just("\n"), max_size=20), st.integers(1015, 1030)),
    NOT_STRINGS,
]
CULPRITS = st.sampled_from(KINDS).flatmap(lambda kind: kind)  # each kind as often


@pytest.fixture(scope="module")
def generous_signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signer]:
    """A signer whose rate limit a property test cannot reach."""
    policy = {"max_issuances_per_node_per_hour": 1_000_000}
    with running_signer(tmp_path_factory.mktemp("generous"), policy=policy) as running:
        yield running


def test_any_culprits_is_kept_verbatim_or_bad_request(generous_signer: Signer) -> None:
    """Any JSON value as "culprits" gets 201 or 400 bad-request, never a 5xx; each 201's
    audit record holds exactly the string sent (null for none)."""
    signer, node = generous_signer, "claims-property.test.local"
    identity = signer.enroll(node)
    csr = kubelet_csr(node)
    kept: dict[str, str | None] = {}  # serial -> the claim SPEC says is audited
    session = signer.session(identity)  # one kept-alive connection for every example

    @settings(
        max_examples=300,
        deadline=None,  # each example is a request to a real server
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(CULPRITS)
    def send(value: object) -> None:
        status, claim = kept_claim(value)
        answer = session.post(
            signer.url + "/v1/sign", json={"csr": csr, "culprits": value}, timeout=30
        )
        assert answer.status_code == status, (value, answer.text)
        if status == 201:
            kept[answer.json()["serial"]] = claim
        else:
            assert_error(answer, 400, "bad-request")
            assert "'culprits'" in answer.json()["message"]

    with session:
        send()
    records = [r for r in audit(signer, "--node", node) if r["endpoint"] == "sign"]
    assert {str(r["serial"]): r["claim"] for r in records} == kept
    assert all(r["outcome"] == "issued" for r in records)
    assert "Traceback" not in signer.log_text()


@pytest.mark.skipif(JOURNAL_SOCKET.exists(), reason="journald is running: entries go there")
def test_decisions_are_logged_without_journald(signer: Signer) -> None:
    """Without a journald socket each decision is one line on the signer's stderr."""
    node = unique("logged")
    signer.post("/v1/sign", {"csr": kubelet_csr(node)})  # 401 unauthenticated, audited
    assert "unauthenticated" in signer.log_text()


# -- shutting down --------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_exits_zero_promptly(start_signer: Callable[..., Signer], workers: int) -> None:
    """SIGTERM stops the signer (every worker, an idle keep-alive client open) with status 0 within 5 s."""
    running = start_signer(workers=workers)
    with running.session() as idle:
        assert idle.get(running.url + "/healthz", timeout=10).ok  # keep-alive stays open
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        status = running.process.wait(timeout=10)
    assert status == 0, running.log_text()
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the workers share the server's process group
        try:
            os.killpg(running.process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("a worker outlived the server")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", running.port), timeout=2):
        pass
