"""The agent's signer client (kubecertd.edges.client) over real TLS on loopback.

Success and refusals come from a real ``kubecertd-signer serve``; answers the signer
never gives (503, 429, junk, oversized bodies, dropped connections) come from a small
HTTPS server here, which also counts the TCP connections it accepts.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import kubecertd
from kubecertd import pki
from kubecertd.edges.client import MAX_ANSWER, ClientCert, HttpSignerClient, Issued
from kubecertd.errors import SignerMisconfigured, SignerRefused, SignerUnreachable

import factories
from signer_harness import Signer, free_port

TIMEOUT = 10.0


def unique_node() -> str:
    return f"worker-{uuid.uuid4().hex[:8]}.prod.jp.local"


def csr(subject: x509.Name) -> bytes:
    """A PEM CSR for ``subject`` with a fresh P-256 key."""
    return pki.build_csr(pki.generate_key("ecdsa-p256"), subject).public_bytes(
        serialization.Encoding.PEM
    )


def real_client(signer: Signer, url: str | None = None) -> HttpSignerClient:
    return HttpSignerClient(url or signer.url, str(signer.identity_ca), TIMEOUT)


def identity_of(signer: Signer, node: str) -> ClientCert:
    cert, key = signer.enroll(node)
    return str(cert), str(key)


def subject_cn(pem: bytes) -> list[str]:
    return pki.common_names(x509.load_pem_x509_certificate(pem).subject)


# -- against the real signer ----------------------------------------------------------------


def test_fetch_ca_returns_the_cluster_ca(signer: Signer) -> None:
    """GET /v1/ca without a client certificate returns the cluster CA the signer serves."""
    bundle = real_client(signer).fetch_ca()
    assert x509.load_pem_x509_certificates(bundle)[0] == x509.load_pem_x509_certificate(
        signer.ca.read_bytes()
    )


def test_enroll_sign_and_renew_identity(signer: Signer) -> None:
    """enroll, sign and renew_identity return certificates for the node, with the CA bundle."""
    node = unique_node()
    client = real_client(signer, url=signer.url + "/")  # a trailing slash is fine
    enrolled = client.enroll(signer.token(node), csr(pki.identity_subject(node)))
    assert isinstance(enrolled, Issued)
    assert subject_cn(enrolled.certificate) == [node]
    identity = identity_of(signer, node)
    signed = client.sign(csr(pki.kubelet_subject(node)), "cert-missing", identity)
    assert subject_cn(signed.certificate) == [f"system:node:{node}"]
    assert signed.ca_bundle == client.fetch_ca(identity)
    renewed = client.renew_identity(csr(pki.identity_subject(node)), identity)
    assert subject_cn(renewed.certificate) == [node]


def test_heal_conversation_against_the_signer(signer: Signer) -> None:
    """A heal's two calls inside one conversation succeed over the kept connection."""
    node = unique_node()
    client, identity = real_client(signer), identity_of(signer, node)
    with client.conversation():
        bundle = client.fetch_ca(identity)
        issued = client.sign(csr(pki.kubelet_subject(node)), "renewal", identity)
    assert issued.ca_bundle == bundle


def test_culprits_reach_the_signers_audit(signer: Signer) -> None:
    """sign(..., culprits=TEXT) lands in the signer's audit as the node's claim."""
    node = unique_node()
    client, identity = real_client(signer), identity_of(signer, node)
    claim = "unlink /var/lib/kubelet/pki/kubelet-client-current.pem by rm[4242] uid 0\n✓"
    issued = client.sign(csr(pki.kubelet_subject(node)), "cert-missing", identity, claim)
    result = signer.cli("audit", "--json", "--node", node)
    assert result.returncode == 0, result.stderr
    [record] = [r for r in json.loads(result.stdout) if r["endpoint"] == "sign"]
    assert (record["claim"], record["reason"]) == (claim, "cert-missing")
    assert record["serial"] == format(
        x509.load_pem_x509_certificate(issued.certificate).serial_number, "x"
    )


def test_csr_for_another_node_is_refused(signer: Signer) -> None:
    """Node A's identity asking for node B's certificate gets 403 forbidden-node."""
    client, identity = real_client(signer), identity_of(signer, unique_node())
    with pytest.raises(SignerRefused) as refused:
        client.sign(csr(pki.kubelet_subject(unique_node())), "test", identity)
    assert (refused.value.status, refused.value.code) == (403, "forbidden-node")
    assert refused.value.retry_after is None


def test_wrong_server_ca_is_misconfigured(signer: Signer) -> None:
    """A signer whose certificate does not chain to [signer] ca is a setup error naming that file."""
    client = HttpSignerClient(signer.url, str(signer.ca), TIMEOUT)  # the cluster CA
    with pytest.raises(
        SignerMisconfigured, match=rf"/v1/ca: .*does not verify against \[signer\] ca {signer.ca}"
    ):
        client.fetch_ca()


# -- transport failures ----------------------------------------------------------------------


def test_connection_refused_is_unreachable(tmp_path: Path) -> None:
    """Nothing listening on the port: SignerUnreachable naming the URL."""
    client = HttpSignerClient(f"https://127.0.0.1:{free_port()}", str(ca_file(tmp_path)), TIMEOUT)
    with pytest.raises(SignerUnreachable, match=r"^https://127\.0\.0\.1:\d+/v1/ca: .*refused"):
        client.fetch_ca()


def test_silent_server_times_out(tmp_path: Path) -> None:
    """A server that accepts the connection and never answers is unreachable within the timeout."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody reads
        client = HttpSignerClient(
            f"https://127.0.0.1:{silent.getsockname()[1]}", str(ca_file(tmp_path)), 0.5
        )
        start = time.monotonic()
        with pytest.raises(SignerUnreachable, match=r"/v1/ca: timed out after 0\.5 s"):
            client.fetch_ca()
    assert time.monotonic() - start < 5


def test_a_trickled_answer_is_cut_off_at_the_timeout(
    serve: Callable[..., LoopbackServer], material: Material
) -> None:
    """Each byte comes well within the timeout, the whole answer never would: the
    timeout bounds the exchange, so a slow signer cannot hold a heal for minutes."""
    server = serve(always(pem_answer(material)._replace(trickle=0.05)))
    client = HttpSignerClient(server.url, material.ca, 0.5)
    start = time.monotonic()
    with pytest.raises(SignerUnreachable, match=r"/v1/ca: timed out after 0\.5 s"):
        client.fetch_ca()
    assert time.monotonic() - start < 3  # the whole answer takes over 30 s


def test_empty_url_is_misconfigured() -> None:
    """No [signer] url configured: SignerMisconfigured saying so, before any connection."""
    with pytest.raises(SignerMisconfigured, match=r"url is empty"):
        HttpSignerClient("", "/nonexistent", TIMEOUT).fetch_ca()


# -- a hand-made HTTPS server ----------------------------------------------------------------


class Reply(NamedTuple):
    """What the test server answers; ``status=None`` drops the connection without a word."""

    status: int | None
    body: bytes = b"{}"
    headers: dict[str, str] = {}  # noqa: RUF012 - never mutated
    close: bool = False  # close the connection after answering, without saying so
    length: bool = True  # send Content-Length (else the body ends with the connection)
    trickle: float = 0.0  # seconds between the bytes of the answer (0: all at once)


class Seen(NamedTuple):
    connection: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: list[str]  # the client certificate's common names


class LoopbackServer(http.server.ThreadingHTTPServer):
    """HTTPS on 127.0.0.1 answering each request with ``script(method, path, seen so far)``."""

    daemon_threads = True

    def __init__(self, material: Material, script: Callable[[str, str, list[Seen]], Reply]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(material.server_cert, material.server_key)
        self.context.load_verify_locations(material.ca)
        self.context.verify_mode = ssl.CERT_OPTIONAL  # to see which identity was presented
        self.script = script
        self.seen: list[Seen] = []
        self.accepted = 0
        self.numbers: dict[socket.socket, int] = {}  # accepted connection -> its number
        self.closed = 0
        self.lock = threading.Condition()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept (counted and numbered); the handshake is left to the handler's thread."""
        sock, address = self.socket.accept()
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.lock:
            self.accepted += 1
            self.numbers[tls] = self.accepted
        return tls, address

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with self.lock:
            self.closed += 1
            self.lock.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client giving up mid-handshake is part of some tests

    def wait_closed(self, count: int) -> None:
        """Wait until ``count`` connections have been closed (by either side)."""
        with self.lock:
            assert self.lock.wait_for(lambda: self.closed >= count, timeout=5), (
                f"{self.closed} of {count} connections closed"
            )


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # no test leaves a thread waiting longer
    server: LoopbackServer

    def setup(self) -> None:
        super().setup()
        self.connection.do_handshake()

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.answer()

    def answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        peer = self.connection.getpeercert()
        names = [
            value
            for rdn in (peer or {}).get("subject", ())
            for key, value in rdn
            if key == "commonName"
        ]
        with self.server.lock:
            reply = self.server.script(self.command, self.path, list(self.server.seen))
            self.server.seen.append(
                Seen(
                    self.server.numbers[self.request],
                    self.command,
                    self.path,
                    dict(self.headers),
                    body,
                    names,
                )
            )
        if reply.status is None:
            self.close_connection = True
            return
        if reply.trickle:
            self.close_connection = True
            self.trickle(reply)
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.length:
            self.send_header("Content-Length", str(len(reply.body)))
        else:
            self.send_header("Connection", "close")  # the body ends with the connection
        self.close_connection = reply.close or not reply.length
        self.end_headers()
        self.wfile.write(reply.body)

    def trickle(self, reply: Reply) -> None:
        """The answer one byte at a time, each in time for any per-read timeout."""
        head = f"HTTP/1.1 {reply.status} X\r\nContent-Length: {len(reply.body)}\r\n\r\n"
        answer = head.encode() + reply.body
        for i in range(len(answer)):
            try:
                self.wfile.write(answer[i : i + 1])
            except OSError:
                return  # the client has given up
            time.sleep(reply.trickle)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Material(NamedTuple):
    ca: str  # the test CA: the server's trust anchor and the issuer of both certificates
    server_cert: str
    server_key: str
    identity: ClientCert  # a client certificate for factories.NODE
    issuer: factories.Issued  # the test CA with its key


def ca_file(tmp_path: Path) -> Path:
    """A CA certificate file that signed nothing the tests talk to."""
    path = tmp_path / "other-ca.pem"
    path.write_bytes(factories.make_ca().pem)
    return path


@pytest.fixture
def material(tmp_path: Path) -> Material:
    """A test CA, a server certificate for 127.0.0.1 and a client identity, as files."""
    return make_material(tmp_path)


@pytest.fixture
def serve(material: Material) -> Iterator[Callable[..., LoopbackServer]]:
    """``serve(script)`` starts a LoopbackServer in a thread; each is shut down after the test."""
    yield from serving(material)


def make_material(tmp_path: Path) -> Material:
    """The ``material`` fixture's files, for other test modules."""
    ca = factories.make_ca()
    server = factories.issue(
        ca,
        cn_list=["127.0.0.1"],
        orgs=(),
        eku=(factories.SERVER_AUTH,),
        extensions=[
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        ],
    )
    client = factories.issue(ca, cn_list=[factories.NODE], orgs=())
    files = {
        "ca.pem": ca.pem,
        "server.pem": server.pem,
        "server-key.pem": server.key_pem,
        "identity.pem": client.pem,
        "identity-key.pem": client.key_pem,
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    paths = {name: str(tmp_path / name) for name in files}
    return Material(
        paths["ca.pem"],
        paths["server.pem"],
        paths["server-key.pem"],
        (paths["identity.pem"], paths["identity-key.pem"]),
        ca,
    )


def serving(material: Material) -> Iterator[Callable[..., LoopbackServer]]:
    """The ``serve`` fixture's body, for other test modules."""
    servers: list[LoopbackServer] = []

    def start(script: Callable[[str, str, list[Seen]], Reply]) -> LoopbackServer:
        server = LoopbackServer(material, script)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def pem_answer(material: Material) -> Reply:
    """A 200 carrying the test CA as certificate and bundle (what fetch_ca and sign read)."""
    pem = Path(material.ca).read_text()
    return Reply(200, json.dumps({"ca_bundle": pem, "certificate": pem}).encode())


def always(reply: Reply) -> Callable[[str, str, list[Seen]], Reply]:
    return lambda method, path, seen: reply


def client_for(server: LoopbackServer, material: Material, suffix: str = "") -> HttpSignerClient:
    return HttpSignerClient(server.url + suffix, material.ca, TIMEOUT)


def test_requests_carry_json_headers_and_the_path_prefix(
    serve: Callable[..., LoopbackServer], material: Material
) -> None:
    """A POST sends JSON with its content type, Accept and User-Agent under the URL's path prefix."""
    server = serve(always(pem_answer(material)))
    client = client_for(server, material, "/prefix/")
    issued = client.sign(b"CSR", "cert-missing", material.identity)
    assert issued.certificate == Path(material.ca).read_bytes()
    (seen,) = server.seen
    assert (seen.method, seen.path) == ("POST", "/prefix/v1/sign")
    assert json.loads(seen.body) == {"csr": "CSR", "reason": "cert-missing"}  # no culprits
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["Accept"] == "application/json"
    assert seen.headers["User-Agent"] == f"kubecertd/{kubecertd.__version__}"
    assert seen.peer == [factories.NODE]


@pytest.mark.parametrize("culprits", ["rm[4242] unlinked kubelet.key\nand kubelet.crt", ""])
def test_sign_sends_culprits_when_given(
    serve: Callable[..., LoopbackServer], material: Material, culprits: str
) -> None:
    """sign(..., culprits) puts the text in the body as "culprits", as it is."""
    server = serve(always(pem_answer(material)))
    client_for(server, material).sign(b"CSR", "cert-missing", material.identity, culprits)
    (seen,) = server.seen
    body = {"csr": "CSR", "reason": "cert-missing", "culprits": culprits}
    assert json.loads(seen.body) == body


def test_503_is_unreachable_with_retry_after(
    serve: Callable[..., LoopbackServer], material: Material
) -> None:
    """A 503 with Retry-After is SignerUnreachable carrying the delay and the signer's message."""
    body = json.dumps({"error": "unavailable", "message": "store\nbusy"}).encode()
    server = serve(always(Reply(503, body, {"Retry-After": "7"})))
    with pytest.raises(SignerUnreachable) as unreachable:
        client_for(server, material).fetch_ca()
    assert unreachable.value.retry_after == 7.0
    assert str(unreachable.value) == f"{server.url}/v1/ca: 503 unavailable: store busy"


def test_408_too_slow_is_unreachable(
    serve: Callable[..., LoopbackServer], material: Material
) -> None:
    """A 408 (the body came too slowly) is worth another try: SignerUnreachable, not a refusal."""
    body = json.dumps({"error": "too-slow", "message": "body not whole in 10 s"}).encode()
    server = serve(always(Reply(408, body)))
    with pytest.raises(SignerUnreachable, match=r"/v1/sign: 408 too-slow: body not whole"):
        client_for(server, material).sign(b"CSR", "renewal", material.identity)


def test_429_is_refused_with_retry_after(
    serve: Callable[..., LoopbackServer], material: Material
) -> None:
    """A 429 is SignerRefused with the SPEC code and Retry-After."""
    body = json.dumps({"error": "rate-limited", "message": "3 this hour"}).encode()
    server = serve(always(Reply(429, body, {"Retry-After": "30"})))
    with pytest.raises(SignerRefused) as refused:
        client_for(server, material).sign(b"CSR", "renewal", material.identity)
    assert (refused.value.status, refused.value.code) == (429, "rate-limited")
    assert refused.value.retry_after == 30.0


@pytest.mark.parametrize("status", [200, 502])
def test_answer_without_json_is_unreachable(
    serve: Callable[..., LoopbackServer], material: Material, status: int
) -> None:
    """An answer whose body is not a JSON object is SignerUnreachable naming the status."""
    server = serve(always(Reply(status, b"<html>bad gateway</html>")))
    with pytest.raises(SignerUnreachable, match=rf"/v1/ca: HTTP {status} without a JSON body$"):
        client_for(server, material).fetch_ca()


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "until-close"])
def test_oversized_answer_is_unreachable(
    serve: Callable[..., LoopbackServer], material: Material, length: bool
) -> None:
    """An answer over MAX_ANSWER is refused as too large, with or without a Content-Length."""
    body = b"[" + b"0," * (MAX_ANSWER // 2) + b"0]"
    server = serve(always(Reply(200, body, length=length)))
    with pytest.raises(SignerUnreachable, match=r"/v1/ca: answer too large"):
        client_for(server, material).fetch_ca()


def test_conversation_shares_one_connection(
    serve: Callable[..., LoopbackServer], material: Material
) -> None:
    """Inside a conversation both calls use one connection; outside, each call has its own."""
    server = serve(always(pem_answer(material)))
    client = client_for(server, material)
    with client.conversation():
        client.fetch_ca(material.identity)
        client.sign(b"CSR", "renewal", material.identity)
    server.wait_closed(1)  # nothing stays open after the conversation
    assert server.accepted == 1
    client.fetch_ca(material.identity)
    client.sign(b"CSR", "renewal", material.identity)
    server.wait_closed(3)
    assert server.accepted == 3
    assert [seen.connection for seen in server.seen] == [1, 1, 2, 3]
    assert all(seen.peer == [factories.NODE] for seen in server.seen)


def test_conversation_keeps_one_connection_per_identity(
    serve: Callable[..., LoopbackServer], material: Material
) -> None:
    """Calls without a client certificate do not share the identity's connection."""
    server = serve(always(pem_answer(material)))
    client = client_for(server, material)
    with client.conversation():
        client.fetch_ca()
        client.sign(b"CSR", "renewal", material.identity)
        client.fetch_ca()
    server.wait_closed(2)
    assert [(seen.connection, seen.peer) for seen in server.seen] == [
        (1, []),
        (2, [factories.NODE]),
        (1, []),
    ]


def test_kept_connection_closed_by_the_server_is_reopened(
    serve: Callable[..., LoopbackServer], material: Material
) -> None:
    """A kept connection the server closed after its answer is replaced before the next call."""
    server = serve(always(pem_answer(material)._replace(close=True)))
    client = client_for(server, material)
    with client.conversation():
        client.fetch_ca(material.identity)
        server.wait_closed(1)
        client.sign(b"CSR", "renewal", material.identity)
    assert [(seen.connection, seen.method) for seen in server.seen] == [(1, "GET"), (2, "POST")]


def test_dead_kept_connection_resends_a_get_but_not_a_post(
    serve: Callable[..., LoopbackServer], material: Material
) -> None:
    """A kept connection dying unanswered: a POST is unreachable, a GET is sent once more."""
    dropped = (1, 3)  # the second and fourth requests get no answer
    server = serve(
        lambda method, path, seen: Reply(None) if len(seen) in dropped else pem_answer(material)
    )
    client = client_for(server, material)
    with client.conversation():
        client.fetch_ca(material.identity)
        with pytest.raises(SignerUnreachable, match=r"/v1/sign: Remote end closed connection"):
            client.sign(b"CSR", "renewal", material.identity)
        client.fetch_ca(material.identity)  # a new connection: the dead one was dropped
        client.fetch_ca(material.identity)  # dies, and is sent again on a third
    assert [(seen.connection, seen.method) for seen in server.seen] == [
        (1, "GET"),
        (1, "POST"),
        (2, "GET"),
        (2, "GET"),
        (3, "GET"),
    ]


# -- TLS files that cannot be loaded ---------------------------------------------------------


@pytest.mark.parametrize(
    ("broken", "content"),
    [
        ("key", None),
        ("key", b"garbage\n"),
        ("cert", None),
        ("cert", b"garbage\n"),
    ],
    ids=["key-missing", "key-garbage", "cert-missing", "cert-garbage"],
)
def test_unloadable_identity_names_the_file(
    material: Material, tmp_path: Path, broken: str, content: bytes | None
) -> None:
    """A missing or garbage identity file is SignerMisconfigured naming that file, on one line."""
    cert, key = material.identity
    path = Path(key if broken == "key" else cert)
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    client = HttpSignerClient(f"https://127.0.0.1:{free_port()}", material.ca, TIMEOUT)
    with pytest.raises(SignerMisconfigured) as unreachable:
        client.sign(b"CSR", "renewal", (cert, key))
    message = str(unreachable.value)
    assert f"cannot load the client identity {path}: " in message
    assert "\n" not in message and len(message) < 250


def test_key_of_another_certificate_names_the_key(material: Material, tmp_path: Path) -> None:
    """A key that does not match the certificate is reported against the key file."""
    cert, key = material.identity
    Path(key).write_bytes(factories.issue(factories.make_ca()).key_pem)
    client = HttpSignerClient(f"https://127.0.0.1:{free_port()}", material.ca, TIMEOUT)
    with pytest.raises(SignerMisconfigured, match=rf"identity {key}: .*mismatch"):
        client.fetch_ca((cert, key))


@pytest.mark.parametrize("content", [None, b"garbage\n"], ids=["missing", "garbage"])
def test_unloadable_server_ca_names_the_file(tmp_path: Path, content: bytes | None) -> None:
    """A missing or garbage [signer] ca is SignerMisconfigured naming the file."""
    path = tmp_path / "signer-ca.pem"
    if content is not None:
        path.write_bytes(content)
    client = HttpSignerClient(f"https://127.0.0.1:{free_port()}", str(path), TIMEOUT)
    with pytest.raises(SignerMisconfigured, match=rf"cannot load the signer CA {path} "):
        client.fetch_ca()


def test_renewed_identity_files_are_loaded_again(
    serve: Callable[..., LoopbackServer], material: Material, tmp_path: Path
) -> None:
    """After the identity files are replaced (renewal), the next call presents the new one."""
    server = serve(always(pem_answer(material)))
    client = client_for(server, material)
    client.fetch_ca(material.identity)
    renewed = factories.issue(material.issuer, cn_list=[factories.OTHER_NODE], orgs=())
    cert, key = material.identity
    for path, content in ((cert, renewed.pem), (key, renewed.key_pem)):
        Path(path + ".new").write_bytes(content)
        Path(path + ".new").rename(path)
    client.fetch_ca(material.identity)
    assert [seen.peer for seen in server.seen] == [[factories.NODE], [factories.OTHER_NODE]]
