"""Hostile requests against a real signer over HTTPS: never a 5xx, never a traceback.

SPEC "HTTP API": every body that is not the documented object is 400 bad-request, and
every error is ``{"error": CODE, "message": TEXT}``.  One ``kubecertd-signer serve``
(the module's ``signer``) takes everything here over mutual TLS on 127.0.0.1:

- hypothesis makes well-formed HTTP/1.1 requests with ``requests``: the methods of
  RFC 9110 but CONNECT and TRACE; known, unknown, percent-encoded and long paths, with
  query strings; any headers within the server's limits; any content type; bodies of
  any bytes, any JSON, and the documented objects with fields left out, mutated or
  retyped; with no client certificate, a node identity, or a kubelet certificate.
  Every answer is below 500 and every error is in SPEC's shape with one of its codes;
- raw TLS sockets send what requests will not: broken request lines, bytes no header
  may hold, oversized headers, framing and encodings that do not decode, bodies cut
  short or too slow.  Every answer is below 500 (or there is none);
- the signer's log (its stderr, and its journald entries when journald runs) then
  holds no traceback and no internal error.

Only behaviour on the wire and in the log is asserted, so these tests hold for any
HTTP stack behind the signer.  Hypothesis runs derandomized, with fixed example counts
and no example database: every run makes the same kinds and numbers of requests, only
with this run's fresh keys and tokens.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import socket
import ssl
import string
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kubecertd import pki
from kubecertd.signer import app

from node_harness import journal_entries
from signer_harness import Client, Signer, csr_pem

NODE = "fuzz-node.test.local"
OTHER = "fuzz-other.test.local"
KNOWN_PATHS = ("/v1/ca", "/v1/enroll", "/v1/identity", "/v1/sign", "/healthz", "/metrics")
POSTED = ("/v1/enroll", "/v1/identity", "/v1/sign")  # the endpoints that read a body
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
# SPEC's error codes by status.
CODES = {
    400: {"bad-request", "bad-csr", "weak-key"},
    401: {"unauthenticated"},
    403: {"forbidden-node", "node-revoked", "token-invalid"},
    404: {"not-found"},
    405: {"method-not-allowed"},
    408: {"too-slow"},
    413: {"too-large"},
    429: {"rate-limited"},
}
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
BAD_LOG = re.compile(r"Traceback|internal error|KUBECERTD_CODE=internal")
READ_TIMEOUT = 15.0  # seconds for an answer on a raw socket (the body timeout is 10 s)

FUZZ = settings(
    max_examples=200,
    deadline=None,  # one example is one request to a real server: its time varies
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the signer's log -----------------------------------------------------------------------


class LogWatch:
    """What the signer logs from now on: its stderr file, and journald when it runs."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.offset = signer.log.stat().st_size
        self.since = int(time.time())  # journalctl --since has whole seconds

    def text(self) -> str:
        with self.signer.log.open("rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        if JOURNAL_SOCKET.exists():  # journal.send() writes there, not to stderr
            # --sync returns once everything sent before it is stored.
            subprocess.run(["journalctl", "--sync"], capture_output=True, timeout=30, check=False)
            output = subprocess.run(
                ["journalctl", "--no-pager", "-o", "json", f"_PID={self.signer.process.pid}",
                 f"--since=@{self.since}"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout  # fmt: skip
            for entry in journal_entries(output):
                fields = " ".join(f"{k}={v}" for k, v in sorted(entry.items()) if "KUBECERTD" in k)
                text += f"\n{entry.get('MESSAGE', '')} {fields}"
        return text

    def assert_clean(self) -> None:
        """No traceback and no internal error since this watch began."""
        bad = [line for line in self.text().splitlines() if BAD_LOG.search(line)]
        assert not bad, "the signer logged:\n" + "\n".join(bad[:30])


# -- what the module shares -----------------------------------------------------------------


def make_csr(subject: Any) -> str:
    return csr_pem(pki.build_csr(pki.generate_key("ecdsa-p256"), subject))


@pytest.fixture(scope="module")
def identity(signer: Signer) -> Client:
    """The module's node identity certificate (for NODE)."""
    return signer.enroll(NODE)


@pytest.fixture(scope="module")
def sessions(signer: Signer, identity: Client) -> Iterator[dict[str, requests.Session]]:
    """Keep-alive sessions with no client certificate, NODE's identity, NODE's kubelet cert."""
    kubelet = signer.kubelet_cert(NODE, identity)
    with (
        signer.session() as anonymous,
        signer.session(identity) as as_identity,
        signer.session(kubelet) as as_kubelet,
    ):
        yield {"none": anonymous, "identity": as_identity, "kubelet": as_kubelet}


@pytest.fixture(scope="module")
def material(signer: Signer) -> dict[str, list[str]]:
    """Valid field values to mutate: CSRs for NODE and another node, unspent tokens."""
    return {
        "csr": [
            make_csr(pki.kubelet_subject(NODE)),
            make_csr(pki.identity_subject(NODE)),
            make_csr(pki.kubelet_subject(OTHER)),
            make_csr(pki.identity_subject(OTHER)),
        ],
        "token": [signer.token(NODE), signer.token(OTHER), signer.token(NODE)],
    }


# -- well-formed requests -------------------------------------------------------------------

TCHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"  # RFC 9110 token
# Headers that frame or route the request: requests sets them, the raw tests break them.
FRAMING = {"content-length", "transfer-encoding", "content-encoding", "host", "connection",
           "keep-alive", "expect", "upgrade", "te", "trailer", "proxy-connection"}  # fmt: skip
CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "*/*",
    ";;;=",
)

header_names = st.text(TCHARS, min_size=1, max_size=40).filter(
    lambda name: name.lower() not in FRAMING
)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=200,
).map(str.strip)
long_header_values = st.integers(1000, 8000).map(lambda size: "v" * size)
headers = st.dictionaries(header_names, header_values | long_header_values, max_size=24)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**90, max_value=10**200)
    | st.floats()
    | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)


@st.composite
def mutated(draw: st.DrawFn, valid: str) -> str:
    """``valid`` itself (half the time), or cut, spliced, repeated, stained or emptied."""
    if draw(st.booleans()):
        return valid
    # A share, not an index: the draws stay the same whatever the CSR's length, so a
    # derandomized run makes the same choices with this run's fresh keys.
    cut = len(valid) * draw(st.integers(0, 1000)) // 1000
    return draw(
        st.sampled_from(
            [
                valid[:cut],
                valid[:cut] + draw(st.text(max_size=8)) + valid[cut:],
                valid + valid,
                valid[:cut] + "\ud800" + valid[cut:],
                valid.replace("-", "\x00", 1),
                valid.replace("\n", "\r\n"),
                "",
            ]
        )
    )


@st.composite
def documented_bodies(draw: st.DrawFn, material: dict[str, list[str]]) -> bytes:
    """A documented object (csr, token, reason) with fields left out, mutated or retyped."""
    body: dict[str, object] = {}
    for name in ("csr", "token", "reason"):
        if draw(st.integers(0, 4)) == 0:  # left out
            continue
        if name == "reason":
            value: object = draw(st.text(max_size=250) | st.sampled_from(["cert-missing", ""]))
        else:
            value = draw(mutated(draw(st.sampled_from(material[name]))))
        if draw(st.integers(0, 9)) == 0:
            value = draw(json_values)
        body[name] = value
    body.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2)))
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes no UTF-8 has


def nested_body(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + closer * depth


def bodies(material: dict[str, list[str]]) -> st.SearchStrategy[bytes]:
    """Any request body, shaped or not like SPEC's."""
    return st.one_of(
        st.just(b""),
        st.binary(max_size=512),
        json_values.map(lambda value: json.dumps(value).encode()),
        documented_bodies(material),
        documented_bodies(material),
        st.builds(
            nested_body,
            st.integers(1, 20_000),
            st.sampled_from([b"[", b'{"a":[', b'{"":']),
            st.sampled_from([b"]", b"]}", b"}"]),
        ),
        st.integers(app.MAX_BODY - 2, app.MAX_BODY + 1000).map(lambda size: b" " * size),
        st.sampled_from(
            [
                b'{"csr": "a", "csr": "b"}',
                b'{"csr": NaN}',
                b'{"csr": -Infinity}',
                b"\xef\xbb\xbf{}",
                json.dumps({"csr": "x", "token": "y"}).encode("utf-16"),
                b'{"csr": 1' + b"0" * 5000 + b"}",
                b'{"csr": "\\ud800\\udfff\\u0000"}',
            ]
        ),
    )


def check_answer(answer: requests.Response, method: str) -> None:
    """Below 500, and an error is SPEC's ``{"error", "message"}`` with a code of its status."""
    assert answer.status_code < 500, answer.text
    if answer.status_code < 400:
        assert answer.status_code in (200, 201), answer.text
        return
    assert answer.status_code in CODES, answer.text
    if method == "HEAD":  # no body to judge
        return
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer.text
    body = answer.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] in CODES[answer.status_code], body
    assert isinstance(body["message"], str)
    assert body["message"]
    assert "Traceback" not in body["message"]
    if answer.status_code == 405:
        assert answer.headers["Allow"]


@st.composite
def paths(draw: st.DrawFn, known: str) -> str:
    """Mostly ``known`` itself, else a variant of it or any path; with a query string or not."""
    kind = draw(st.integers(0, 9))
    if kind < 7:
        path = known
    elif kind == 7:
        path = draw(
            st.sampled_from(
                [
                    known + "/",
                    "/" + known,
                    known.upper(),
                    "/" + quote(known[1:], safe=""),  # its slashes encoded: another path
                    "/%" + known[1:2].encode().hex() + known[2:],  # one byte encoded: the same
                ]
            )
        )
    elif kind == 8:
        parts = draw(st.lists(st.text(max_size=30), max_size=6))
        path = "/" + "/".join(quote(part, safe="") for part in parts)
    else:
        path = known + "/" + "a" * draw(st.integers(100, 4000))
    if draw(st.booleans()):
        path += "?" + quote(draw(st.text(max_size=60)), safe="=&")
    return path


class Request(NamedTuple):
    method: str
    path: str
    client: str  # a key of the ``sessions`` fixture
    headers: dict[str, str]
    body: bytes


@st.composite
def fuzzed_requests(draw: st.DrawFn, known: str, material: dict[str, list[str]]) -> Request:
    """Mostly what the endpoint ``known`` takes (its method, a documented body), else anything."""
    own = "POST" if known in POSTED else "GET"
    method = draw(st.sampled_from(METHODS)) if draw(st.integers(0, 3)) == 3 else own
    extra = draw(headers)
    content_type = draw(st.none() | st.sampled_from(CONTENT_TYPES) | header_values)
    if content_type is not None:
        extra["Content-Type"] = content_type
    documented = known in POSTED and draw(st.integers(0, 3)) < 3
    body = draw(documented_bodies(material) if documented else bodies(material))
    client = draw(st.sampled_from(["identity", "identity", "kubelet", "none"]))
    return Request(method, draw(paths(known)), client, extra, body)


@pytest.mark.parametrize("known", KNOWN_PATHS)
def test_fuzzed_requests_never_get_a_5xx(
    signer: Signer,
    sessions: dict[str, requests.Session],
    material: dict[str, list[str]],
    known: str,
) -> None:
    """Any well-formed request about this endpoint gets a SPEC answer below 500 and logs no traceback."""
    watch = LogWatch(signer)

    @settings(FUZZ, max_examples=500 if known in POSTED else 300)
    @given(request=fuzzed_requests(known, material))
    def one_request(request: Request) -> None:
        answer = sessions[request.client].request(
            request.method,
            signer.url + request.path,
            data=request.body,
            headers=request.headers,
            timeout=30,
            allow_redirects=False,
        )
        check_answer(answer, request.method)

    one_request()
    watch.assert_clean()


# -- raw requests ---------------------------------------------------------------------------


@functools.cache
def tls_context(trust: Path, client: Client | None) -> ssl.SSLContext:
    """A client context trusting ``trust`` and presenting ``client``, made once per pair."""
    context = ssl.create_default_context(cafile=str(trust))
    if client is not None:
        context.load_cert_chain(*client)
    return context


@contextlib.contextmanager
def tls_connection(signer: Signer, client: Client | None = None) -> Iterator[ssl.SSLSocket]:
    """A raw TLS connection to the signer, optionally presenting ``client``."""
    context = tls_context(signer.identity_ca, client)
    with socket.create_connection(("127.0.0.1", signer.port), timeout=READ_TIMEOUT) as raw:
        # As http.client and urllib3 do: else the request waits behind the TLS Finished
        # for the signer's delayed ACK, 40 ms a connection.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            yield tls


def read_until_closed(tls: ssl.SSLSocket) -> bytes:
    """Everything the signer sends until it closes the connection (bounded by the timeout)."""
    chunks = []
    deadline = time.monotonic() + READ_TIMEOUT
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        while time.monotonic() < deadline:
            chunk = tls.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            pytest.fail(f"the signer neither answered nor closed in {READ_TIMEOUT} s")
    return b"".join(chunks)


def read_response(tls: ssl.SSLSocket) -> bytes:
    """One whole response (its head and Content-Length bytes of body), bounded by the timeout."""
    data = b""
    deadline = time.monotonic() + READ_TIMEOUT
    while time.monotonic() < deadline:
        head, gap, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if gap and length and len(body) >= int(length[1]):
            return data
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    pytest.fail(f"no whole response in {READ_TIMEOUT} s: {data[:300]!r}")


def statuses(answer: bytes) -> list[int]:
    """The status codes of every response in ``answer``, interim 1xx ones included: each
    response's head, then as many bytes of body as its Content-Length says."""
    codes = []
    while match := re.match(rb"HTTP/1\.[01] (\d{3})[ \r]", answer):
        codes.append(int(match[1]))
        head, _gap, answer = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        answer = answer[int(length[1]) :] if length else answer
    return codes


def exchange(signer: Signer, request: bytes, client: Client | None = None) -> list[int]:
    """Send ``request`` on a new connection; the statuses of the answers.

    Reading ends when the signer closes, or once a final answer has come and nothing
    more follows for a second (the request was broken so that it kept the connection).
    """
    data = b""
    with tls_connection(signer, client) as tls:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError, ssl.SSLError):
            tls.sendall(request)
        deadline = time.monotonic() + READ_TIMEOUT
        with contextlib.suppress(ConnectionResetError, ssl.SSLError, TimeoutError):
            while time.monotonic() < deadline:
                if any(status >= 200 for status in statuses(data)):
                    tls.settimeout(1.0)
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
            else:
                pytest.fail(f"no answer and no close in {READ_TIMEOUT} s to {request[:200]!r}")
    return statuses(data)


def gzip_bytes(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=31)
    return packer.compress(data) + packer.flush()


BROKEN_METHODS = [
    b"CONNECT",
    b"TRACE",
    b"PRI",
    b"PROPFIND",
    b"get",
    b"X-JUNK",
    b"G\x00T",
    b"GET GET",
]
BROKEN_TARGETS = [
    b"*",
    b"https://127.0.0.1/v1/ca",
    b"/v1/%ZZ",
    b"/v1/\xc3\xa9",
    b"/\xff",
    b"//v1/ca",
    b"/v1/ca?%ff=%00",
    b"v1/ca",
    b"/v1/ca#frag",
    b"/v1/ca HTTP/1.1 x",
    b"",
]
BROKEN_VERSIONS = [
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"HTTP/9.9",
    b"HTTP/1.1 x",
    b"http/1.1",
    b"HTTP/1",
    b"",
]
BROKEN_HEADERS = [
    b"X-A: \xff\xfe",
    b"X-A: \x01\x02",
    b"X-\x00: v",
    b"No colon",
    b": empty name",
    b"X-A : space before colon",
    b" folded: line",
    b"Cookie: ;;;=\x7f",
    b"Content-Type: ;;;=\x01",
    b"Expect: 999-bogus",
    b"Expect: 100-continue",
    b"Upgrade: h2c",
    b"Upgrade: websocket",
    b"Host: a",
    b"Transfer-Encoding: identity",
]
# Ways to frame a body; each either works or fails at once (none leaves the signer waiting).
FRAMINGS = [
    "length",
    "chunked",
    "bad-chunk",
    "gzip",
    "deflate",
    "bad-gzip",
    "bad-deflate",
    "br",
    "two-lengths",
    "negative-length",
    "hex-length",
    "length-and-chunked",
    "gzip-chunked",
]


def framed_body(framing: str, payload: bytes) -> tuple[list[bytes], bytes]:
    """The framing headers and the body bytes that carry ``payload`` as ``framing`` says."""
    if framing in ("gzip", "gzip-chunked"):
        payload = gzip_bytes(payload)
    elif framing == "deflate":
        payload = zlib.compress(payload)
    encoding = {"gzip": b"gzip", "gzip-chunked": b"gzip", "bad-gzip": b"gzip", "deflate": b"deflate",
                "bad-deflate": b"deflate", "br": b"br"}.get(framing)  # fmt: skip
    lines = [b"Content-Encoding: " + encoding] if encoding else []
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload) if payload else b"0\r\n\r\n"
    length = b"Content-Length: %d" % len(payload)
    if framing in ("chunked", "gzip-chunked"):
        return [*lines, b"Transfer-Encoding: chunked"], chunked
    if framing == "bad-chunk":
        return [b"Transfer-Encoding: chunked"], b"zz\r\n" + payload + b"\r\n0\r\n\r\n"
    if framing == "two-lengths":
        return [length, b"Content-Length: %d" % (len(payload) + 1)], payload
    if framing == "negative-length":
        return [b"Content-Length: -%d" % len(payload)], payload
    if framing == "hex-length":
        return [b"Content-Length: 0x%x" % len(payload)], payload
    if framing == "length-and-chunked":
        return [length, b"Transfer-Encoding: chunked"], chunked
    return [*lines, length], payload


@st.composite
def raw_requests(draw: st.DrawFn, material: dict[str, list[str]]) -> bytes:
    """A request to a known path broken in one place: method, target, version, a header,
    sizes, or the body's framing; or not broken at all.  It asks the signer to close the
    connection after answering, so that every exchange ends."""
    broken = draw(st.sampled_from(["nothing", "method", "target", "version", "header", "sizes",
                                   "framing", "framing", "framing", "bytes"]))  # fmt: skip
    target = draw(st.sampled_from([*KNOWN_PATHS, *POSTED])).encode()
    method = b"POST" if target.decode() in POSTED else b"GET"
    version = b"HTTP/1.1"
    header_lines = [b"Host: 127.0.0.1"]
    payload = (
        draw(documented_bodies(material) | st.binary(max_size=200)) if method == b"POST" else b""
    )
    framing = "length"
    if broken == "method":
        method = draw(st.sampled_from(BROKEN_METHODS) | st.binary(min_size=1, max_size=12))
    elif broken == "target":
        target = draw(st.sampled_from(BROKEN_TARGETS) | st.binary(max_size=40))
    elif broken == "version":
        version = draw(st.sampled_from(BROKEN_VERSIONS) | st.binary(max_size=12))
    elif broken == "header":
        header_lines += draw(
            st.lists(
                st.sampled_from(BROKEN_HEADERS) | st.binary(max_size=60), min_size=1, max_size=3
            )
        )
    elif broken == "sizes":
        size = draw(st.integers(8000, 20000))
        header_lines += draw(st.sampled_from([
            [b"X-Big: " + b"v" * size],
            [b"X-" + b"n" * size + b": v"],
            [b"X-Many-%d: v" % n for n in range(size // 100)],
        ]))  # fmt: skip
        target += draw(st.sampled_from([b"", b"?q=" + b"a" * size]))
    elif broken == "framing":
        framing = draw(st.sampled_from(FRAMINGS))
    framing_lines, body = framed_body(framing, payload)
    lines = [method + b" " + target + b" " + version, *header_lines, *framing_lines]
    request = b"\r\n".join([*lines, b"Connection: close", b"", body])
    if broken == "bytes":  # bytes of the request line or Host overwritten, line ends included
        head = bytearray(request)
        end = len(lines[0]) + len(header_lines[0]) + 4  # not the framing: nothing waits for more
        for at in draw(st.lists(st.integers(0, end - 1), min_size=1, max_size=4)):
            head[at] = draw(st.integers(0, 255))
        request = bytes(head)
    return request


RAW = settings(FUZZ, max_examples=800)


@RAW
@given(data=st.data(), with_identity=st.booleans())
def test_malformed_requests_never_get_a_5xx(
    signer: Signer,
    identity: Client,
    material: dict[str, list[str]],
    data: st.DataObject,
    with_identity: bool,
) -> None:
    """A request broken anywhere, with or without a client certificate, gets no 5xx (or no answer)."""
    request = data.draw(raw_requests(material))
    answered = exchange(signer, request, identity if with_identity else None)
    assert all(status < 500 for status in answered), (answered, request[:300])


# Requests the HTTP layer (h11 and the server's own head checks) refuses before the app,
# two of them on the second request of a kept-alive connection, and a body whose
# Content-Encoding does not decode.
MALFORMED = [
    b"GET /v1/ca HTTP/1.1\r\nHost: x\r\n\r\nG\x00T /v1/ca HTTP/1.1\r\n\r\n",
    b"GET /v1/ca HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/ca HTTP/1.1\r\nX-\x00: v\r\n\r\n",
    b"GET /v1/ca HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/ca HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n"
    b"Connection: close\r\n\r\nhello",
]


def test_malformed_requests_get_a_4xx(signer: Signer) -> None:
    """Each request the HTTP layer refuses before the app gets a 4xx, never a 5xx."""
    for request in MALFORMED:
        answered = exchange(signer, request)
        assert answered, request[:100]
        assert 400 <= answered[-1] < 500, (answered, request[:100])


def test_malformed_requests_leave_no_traceback(signer: Signer) -> None:
    """Requests the HTTP layer refuses are logged as one line each, without a traceback."""
    watch = LogWatch(signer)
    for request in MALFORMED:
        exchange(signer, request)
    watch.assert_clean()


def test_plaintext_and_garbage_instead_of_tls_leave_no_traceback(signer: Signer) -> None:
    """Plain HTTP or garbage on the TLS port ends the connection and logs no traceback."""
    watch = LogWatch(signer)
    for garbage in (
        b"GET /v1/ca HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",
        b"\x00" * 512,
    ):
        with socket.create_connection(("127.0.0.1", signer.port), timeout=READ_TIMEOUT) as raw:
            raw.sendall(garbage)
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(65536):  # a TLS alert at most, then the close
                    pass
    watch.assert_clean()


# -- bodies that never finish ---------------------------------------------------------------


def requests_answered(signer: Signer, path: str) -> float:
    """kubecertd_signer_request_seconds_count for ``path``: requests whose handler is done."""
    answer = signer.get("/metrics")
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == "kubecertd_signer_request_seconds_count" and sample.labels == {
                "path": path
            }:
                return sample.value
    return 0.0


def wait_for(condition: Callable[[], bool], bound: float = 10.0) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)  # poll interval, bounded by the deadline
    pytest.fail(f"not true within {bound} s: {condition.__doc__ or condition}")


@pytest.mark.parametrize("path", ["/v1/sign", "/v1/enroll"])
def test_body_cut_short_is_not_an_internal_error(
    signer: Signer, identity: Client, path: str
) -> None:
    """A client that closes before its body is complete leaves no internal error in the log."""
    watch = LogWatch(signer)
    before = requests_answered(signer, path)
    with tls_connection(signer, identity) as tls:
        tls.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode())
        tls.sendall(b'{"csr": ')
    wait_for(lambda: requests_answered(signer, path) > before)
    watch.assert_clean()


def test_slow_body_is_408_too_slow(signer: Signer) -> None:
    """A body still incomplete 10 s after its headers gets 408 too-slow and Connection: close."""
    watch = LogWatch(signer)
    with tls_connection(signer) as tls:
        tls.sendall(b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        answer = read_response(tls)
        waited = time.monotonic() - started
        assert re.search(rb"(?i)\r\nconnection: *close\r\n", answer), answer
    assert statuses(answer) == [408], answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "too-slow"
    assert app.BODY_TIMEOUT - 0.5 < waited < app.BODY_TIMEOUT + 3
    watch.assert_clean()


def test_slow_but_complete_body_is_read(signer: Signer) -> None:
    """A body that arrives in pieces, a second apart, well within 10 s, is read and judged."""
    body = b'{"token": "not-a-token", "csr": "x"}'
    with tls_connection(signer) as tls:
        tls.sendall(b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])  # fmt: skip
        tls.settimeout(1.0)
        with pytest.raises(TimeoutError):  # the signer waits for the rest ...
            tls.recv(1)
        tls.settimeout(READ_TIMEOUT)
        tls.sendall(body[10:])
        answer = read_until_closed(tls)
    assert statuses(answer) == [403], answer  # ... and judges the token
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "token-invalid"


# -- the body parser on its own -------------------------------------------------------------


def json_depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(json_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    return 0


deep_json = st.recursive(
    st.none() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text('[]{}"\\', max_size=3), inner, max_size=3)
    ),
    max_leaves=80,
)


@settings(FUZZ, max_examples=500)
@given(value=deep_json, ensure_ascii=st.booleans())
def test_nesting_is_counted_as_json_nests(value: object, ensure_ascii: bool) -> None:
    """The pre-scan's depth is the JSON value's, brackets and escapes in strings ignored."""
    raw = json.dumps(value, ensure_ascii=ensure_ascii).encode()
    for limit in (0, 1, 2, 5, app.MAX_DEPTH):
        assert app.nests_deeper(raw, limit) == (json_depth(value) > limit)


@settings(FUZZ, max_examples=500)
@given(raw=st.binary(max_size=300) | json_values.map(lambda value: json.dumps(value).encode()))
def test_any_bytes_are_an_object_or_bad_request(raw: bytes) -> None:
    """parse_body gives a JSON object or a 400 bad-request Refusal for any bytes, nothing else."""
    try:
        body = app.parse_body(raw)
    except app.Refusal as refusal:
        assert (refusal.status, refusal.code) == (400, "bad-request")
        assert refusal.message.startswith("request body ")
    else:
        assert isinstance(body, dict)
