"""The agent's fail-over between signer replicas (kubecertd.edges.client), real TLS on loopback.

A replica that is down is a free port; one that hangs is a socket that accepts and then
holds the connection without a word.  Successes and refusals come from a real
``kubecertd-signer serve``; answers it cannot be made to give on demand (503, a
Retry-After on a 5xx, a refusal counted per replica) come from test_client's HTTPS
server.  Which replica a node asks first is chosen by picking a node name whose
``replica_order`` begins the way the test needs.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_client import (
    TIMEOUT,
    LoopbackServer,
    Material,
    Reply,
    Seen,
    always,
    ca_file,
    csr,
    identity_of,
    make_material,
    pem_answer,
    serving,
    subject_cn,
)

from kubecertd import pki
from kubecertd.edges.client import HttpSignerClient, replica_order
from kubecertd.errors import SignerMisconfigured, SignerRefused, SignerUnreachable

from signer_harness import Signer, free_port

Serve = Callable[[Callable[[str, str, list[Seen]], Reply]], LoopbackServer]


@pytest.fixture
def material(tmp_path: Path) -> Material:
    """test_client's: a test CA, a server certificate for 127.0.0.1, a client identity."""
    return make_material(tmp_path)


@pytest.fixture
def serve(material: Material) -> Iterator[Serve]:
    """test_client's: ``serve(script)`` starts one of its HTTPS servers for the test."""
    yield from serving(material)


def node_ordering(urls: Sequence[str], first: Sequence[str]) -> str:
    """A fresh node name whose replica order begins with ``first``."""
    prefix = uuid.uuid4().hex[:8]
    for number in range(10_000):
        node = f"worker-{prefix}-{number}.prod.jp.local"
        if replica_order(urls, node)[: len(first)] == tuple(first):
            return node
    raise AssertionError(f"no node name puts {first} first among {urls}")


def down() -> str:
    """A replica that is down: nothing listens on its port."""
    return f"https://127.0.0.1:{free_port()}"


class Silent:
    """A replica that accepts TCP connections and then never reads or writes.

    The kernel completes each handshake into the listening socket's queue; ``accepted()``
    takes them from there, so a count read after a call returned is exact.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.held: list[socket.socket] = []
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"

    def accepted(self) -> int:
        while True:
            try:
                connection, _ = self.listener.accept()
            except BlockingIOError:
                return len(self.held)
            self.held.append(connection)

    def close(self) -> None:
        for connection in self.held:
            connection.close()
        self.listener.close()


@contextmanager
def silent() -> Iterator[Silent]:
    replica = Silent()
    try:
        yield replica
    finally:
        replica.close()


def error_reply(status: int, code: str, retry_after: str | None = None) -> Reply:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return Reply(status, json.dumps({"error": code, "message": "test"}).encode(), headers)


# -- the order ---------------------------------------------------------------------------------

URL = st.from_regex(r"https://[a-z]{1,8}\.example:[1-9][0-9]{0,3}", fullmatch=True)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(node=st.text(max_size=80), urls=st.lists(URL, min_size=1, max_size=6, unique=True))
def test_order_is_a_stable_permutation_per_node(node: str, urls: list[str]) -> None:
    """Any node and replicas: a permutation of the replicas, whatever order they are listed
    in; dropping one replica keeps the others' order."""
    order = replica_order(urls, node)
    assert sorted(order) == sorted(urls)
    assert replica_order(list(reversed(urls)), node) == order
    for gone in urls:
        rest = [url for url in urls if url != gone]
        assert replica_order(rest, node) == tuple(url for url in order if url != gone)


def test_order_spreads_the_fleet_over_the_replicas() -> None:
    """Over 3,000 node names each of 3 replicas comes first for about a third; removing one
    moves only the nodes that had it first."""
    urls = [f"https://signer-{name}.example:8443" for name in "abc"]
    nodes = [f"worker-{number}.prod.jp.local" for number in range(3000)]
    first = {node: replica_order(urls, node)[0] for node in nodes}
    counts = Counter(first.values())
    assert set(counts) == set(urls)
    assert all(900 <= count <= 1100 for count in counts.values()), counts  # ~4 sd
    without_a = {node: replica_order(urls[1:], node)[0] for node in nodes}
    moved = {node for node in nodes if without_a[node] != first[node]}
    assert moved == {node for node in nodes if first[node] == urls[0]}


def test_client_keeps_the_nodes_order() -> None:
    """The client asks in replica_order for its node; one URL string is one replica."""
    urls = [f"https://signer-{name}.example:8443/" for name in "abc"]
    client = HttpSignerClient(urls, "/nonexistent", TIMEOUT, node="worker-1.prod.jp.local")
    trimmed = [url.rstrip("/") for url in urls]
    assert client.urls == replica_order(trimmed, "worker-1.prod.jp.local")
    assert HttpSignerClient(urls[0], "/nonexistent", TIMEOUT).urls == (trimmed[0],)


# -- against the real signer -------------------------------------------------------------------


def test_down_replica_then_real_signer_heals(
    signer: Signer, serve: Serve, material: Material
) -> None:
    """Replica order down, real signer, recorder: a heal and an enrollment go through the
    real signer, and the replica after it is never asked."""
    recorder = serve(always(pem_answer(material)))
    urls = [down(), signer.url, recorder.url]
    node = node_ordering(urls, urls)
    client = HttpSignerClient(urls, str(signer.identity_ca), TIMEOUT, node=node)
    enrolled = client.enroll(signer.token(node), csr(pki.identity_subject(node)))
    assert subject_cn(enrolled.certificate) == [node]
    identity = identity_of(signer, node)
    with client.conversation():
        bundle = client.fetch_ca(identity)
        issued = client.sign(csr(pki.kubelet_subject(node)), "renewal", identity)
    assert subject_cn(issued.certificate) == [f"system:node:{node}"]
    assert issued.ca_bundle == bundle
    assert client.answered == signer.url
    assert recorder.seen == []


def test_silent_replica_is_left_after_the_timeout(signer: Signer) -> None:
    """A replica that accepts and never answers costs one timeout, then the next answers."""
    with silent() as hung:
        urls = [hung.url, signer.url]
        node = node_ordering(urls, urls)
        client = HttpSignerClient(urls, str(signer.identity_ca), 1.0, node=node)
        start = time.monotonic()
        client.fetch_ca()
        elapsed = time.monotonic() - start
        assert hung.accepted() == 1  # asked first
    assert client.answered == signer.url
    assert 1.0 <= elapsed < 10


def test_real_refusal_does_not_move_on(signer: Signer) -> None:
    """A 403 from the real signer ends the call: the next replica is never connected to."""
    with silent() as other:
        urls = [signer.url, other.url]
        node = node_ordering(urls, urls)
        client = HttpSignerClient(urls, str(signer.identity_ca), TIMEOUT, node=node)
        identity = identity_of(signer, node)
        with pytest.raises(SignerRefused) as refused:
            client.sign(csr(pki.kubelet_subject("someone-else.prod.jp.local")), "x", identity)
        assert (refused.value.status, refused.value.code) == (403, "forbidden-node")
        assert other.accepted() == 0


def test_spent_enrollment_token_is_refused(signer: Signer) -> None:
    """A token spent on one replica is refused (token-invalid), not tried elsewhere."""
    with silent() as other:
        urls = [signer.url, other.url]
        node = node_ordering(urls, urls)
        client = HttpSignerClient(urls, str(signer.identity_ca), TIMEOUT, node=node)
        token = signer.token(node)
        client.enroll(token, csr(pki.identity_subject(node)))
        with pytest.raises(SignerRefused) as refused:
            client.enroll(token, csr(pki.identity_subject(node)))
        assert refused.value.code == "token-invalid"
        assert other.accepted() == 0


# -- answers the real signer does not give on demand -------------------------------------------


def test_503_replica_is_left_for_the_next(serve: Serve, material: Material) -> None:
    """A 503 from the first replica: the second answers."""
    busy = serve(always(error_reply(503, "unavailable", "7")))
    good = serve(always(pem_answer(material)))
    urls = [busy.url, good.url]
    client = HttpSignerClient(urls, material.ca, TIMEOUT, node=node_ordering(urls, urls))
    client.sign(b"CSR", "renewal", material.identity)
    assert [(seen.method, seen.path) for seen in busy.seen] == [("POST", "/v1/sign")]
    assert [(seen.method, seen.path) for seen in good.seen] == [("POST", "/v1/sign")]
    assert client.answered == good.url


@pytest.mark.parametrize(
    ("status", "code"),
    [(403, "forbidden-node"), (400, "bad-csr"), (429, "rate-limited")],
    ids=["403", "400", "429"],
)
def test_refusal_does_not_move_on(serve: Serve, material: Material, status: int, code: str) -> None:
    """Any 4xx, 429 included (the replicas share the rate limit), is the answer."""
    refusing = serve(always(error_reply(status, code, "30")))
    good = serve(always(pem_answer(material)))
    urls = [refusing.url, good.url]
    client = HttpSignerClient(urls, material.ca, TIMEOUT, node=node_ordering(urls, urls))
    with pytest.raises(SignerRefused) as refused:
        client.sign(b"CSR", "renewal", material.identity)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert good.seen == []
    assert client.answered == refusing.url


def test_all_replicas_failing_names_each(serve: Serve, material: Material) -> None:
    """Every replica down, hung or 5xx: one line naming each in the order tried, with the
    longest Retry-After any of them sent."""
    busy = serve(always(error_reply(503, "unavailable", "7")))
    failing = serve(always(error_reply(502, "bad-gateway", "30")))
    with silent() as hung:
        urls = [down(), hung.url, busy.url, failing.url]
        client = HttpSignerClient(urls, material.ca, 1.0, node=node_ordering(urls, urls))
        with pytest.raises(SignerUnreachable) as unreachable:
            client.fetch_ca()
    message = str(unreachable.value)
    assert message.startswith("none of the 4 signer replicas answered: ")
    assert "\n" not in message
    parts = message.split(": ", 1)[1].split("; ")
    assert [part.split("/v1/ca: ")[0] for part in parts] == urls
    assert "refused" in parts[0]
    assert "timed out after 1 s" in parts[1]
    assert parts[2].endswith("503 unavailable: test")
    assert parts[3].endswith("502 bad-gateway: test")
    assert unreachable.value.retry_after == 30.0


def test_misconfigured_does_not_move_on(serve: Serve, material: Material, tmp_path: Path) -> None:
    """A replica whose certificate does not verify against [signer] ca ends the call: a setup
    error, the same for every replica."""
    first = serve(always(pem_answer(material)))
    with silent() as other:
        urls = [first.url, other.url]
        client = HttpSignerClient(
            urls, str(ca_file(tmp_path)), TIMEOUT, node=node_ordering(urls, urls)
        )
        with pytest.raises(SignerMisconfigured, match=r"does not verify against \[signer\] ca"):
            client.fetch_ca()
        assert other.accepted() == 0


def test_no_replica_is_misconfigured() -> None:
    """An empty list of replicas is "no signer configured", before any connection."""
    with pytest.raises(SignerMisconfigured, match=r"url is empty"):
        HttpSignerClient([], "/nonexistent", TIMEOUT, node="worker-1").fetch_ca()


# -- a conversation ----------------------------------------------------------------------------


def test_conversation_sticks_to_the_replica_that_answered(serve: Serve, material: Material) -> None:
    """After the first replica fails a heal's GET, its POST goes to the replica that
    answered the GET, over the same connection; the next call starts from the first again."""
    first = serve(
        lambda method, path, seen: (
            error_reply(503, "unavailable") if not seen else pem_answer(material)
        )
    )
    second = serve(always(pem_answer(material)))
    urls = [first.url, second.url]
    client = HttpSignerClient(urls, material.ca, TIMEOUT, node=node_ordering(urls, urls))
    with client.conversation():
        client.fetch_ca(material.identity)
        client.sign(b"CSR", "renewal", material.identity)  # `first` would answer now
    assert [(seen.connection, seen.method) for seen in second.seen] == [(1, "GET"), (1, "POST")]
    assert [seen.method for seen in first.seen] == ["GET"]
    client.fetch_ca(material.identity)  # outside: the node's own order again
    assert [seen.method for seen in first.seen] == ["GET", "GET"]


def test_conversation_moves_on_when_its_replica_fails(serve: Serve, material: Material) -> None:
    """The replica that answered the GET then failing the POST: the POST moves on."""
    flaky = serve(
        lambda method, path, seen: error_reply(503, "unavailable") if seen else pem_answer(material)
    )
    other = serve(always(pem_answer(material)))
    urls = [flaky.url, other.url]
    client = HttpSignerClient(urls, material.ca, TIMEOUT, node=node_ordering(urls, urls))
    with client.conversation():
        client.fetch_ca(material.identity)
        client.sign(b"CSR", "renewal", material.identity)
    assert [seen.method for seen in flaky.seen] == ["GET", "POST"]
    assert [seen.method for seen in other.seen] == ["POST"]
    assert client.answered == other.url
