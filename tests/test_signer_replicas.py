"""Three ``kubecertd-signer serve`` replicas on one PostgreSQL database, under concurrent load.

The replicas are separate processes on their own ports that share the CA, identity-CA
and TLS files of one ``init`` and one ``database_url``.  Requests go to all three at
once from threads, each group of rival requests released together by a barrier, so
that the database, not luck, has to decide the races.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import requests

from kubecertd import pki

from signer_harness import Signer, csr_pem, init_signer_dir, running_signer, set_policy

REPLICAS = 3
LIMIT = 3  # max_issuances_per_node_per_hour
TOKENS = 30
THREADS = 24  # concurrent requests in flight

Decision = tuple[str, str, str | None]  # (endpoint, outcome, code), as the audit has them
T = TypeVar("T")


@pytest.fixture
def replicas(tmp_path: Path, postgres_url: str) -> Iterator[list[Signer]]:
    """Three replicas of one signer setup, sharing a fresh PostgreSQL schema."""
    config = init_signer_dir(tmp_path / "replica0")
    text, count = re.subn(
        r"(?m)^# database_url = .*$", f'database_url = "{postgres_url}"', config.read_text()
    )
    assert count == 1, f"{config}: no commented database_url line to switch on"
    config.write_text(text)
    # Every client here is 127.0.0.1, where a fleet comes from many addresses: the per-address
    # cap (32 per worker, counting connections whose close a busy worker has not read yet)
    # would refuse some of the test's own connections.
    set_policy(config, max_issuances_per_node_per_hour=LIMIT, max_connections_per_address=256)
    for index in range(1, REPLICAS):  # the same files: signer.toml names replica0's CAs
        shutil.copytree(tmp_path / "replica0", tmp_path / f"replica{index}")
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(running_signer(tmp_path / f"replica{index}"))
            for index in range(REPLICAS)
        ]


def rivals(calls: list[list[Callable[[], T]]]) -> list[list[T]]:
    """Run every call on the thread pool; the calls of one group start together."""
    barriers = [threading.Barrier(len(group)) for group in calls]

    def run(group: int, call: Callable[[], T]) -> T:
        barriers[group].wait(timeout=30)
        return call()

    jobs = [(g, call) for g, group in enumerate(calls) for call in group]
    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(lambda job: run(*job), jobs))
    grouped: list[list[T]] = [[] for _group in calls]
    for (group, _call), answer in zip(jobs, answers, strict=True):
        grouped[group].append(answer)
    return grouped


def decision(endpoint: str, answer: requests.Response) -> Decision:
    if answer.status_code == 201:
        return endpoint, "issued", None
    return endpoint, "refused", answer.json()["error"]


def enroll_call(
    signer: Signer, token: str, node: str
) -> Callable[[], tuple[requests.Response, bytes]]:
    """POST /v1/enroll with a fresh key: the answer and that key's PEM."""

    def call() -> tuple[requests.Response, bytes]:
        key = pki.generate_key("ecdsa-p256")
        csr = csr_pem(pki.build_csr(key, pki.identity_subject(node)))
        answer = signer.post("/v1/enroll", {"token": token, "csr": csr})
        return answer, pki.private_key_pem(key)

    return call


def sign_call(
    signer: Signer, identity: tuple[Path, Path], node: str
) -> Callable[[], requests.Response]:
    def call() -> requests.Response:
        key = pki.generate_key("ecdsa-p256")
        csr = csr_pem(pki.build_csr(key, pki.kubelet_subject(node)))
        return signer.post("/v1/sign", {"csr": csr, "reason": "test"}, client=identity)

    return call


def test_replicas_share_tokens_rate_limit_deny_list_and_audit(
    replicas: list[Signer], tmp_path: Path
) -> None:
    """Under concurrent load on three replicas, a token is spent once, the per-node limit
    and the deny list hold on every replica, and the audit has one row per decision."""
    decided: Counter[Decision] = Counter()
    nodes = [f"node-{n:02d}.replicas.test" for n in range(TOKENS)]
    tokens = [replicas[n % REPLICAS].token(node) for n, node in enumerate(nodes)]

    # (a) Each token offered to all three replicas at the same moment: one enrollment.
    groups = rivals(
        [
            [enroll_call(r, token, node) for r in replicas]
            for token, node in zip(tokens, nodes, strict=True)
        ]
    )
    identities: dict[str, tuple[Path, Path]] = {}
    for node, group in zip(nodes, groups, strict=True):
        answers = [answer for answer, _key in group]
        decided.update(decision("enroll", a) for a in answers)
        assert sorted(decision("enroll", a) for a in answers) == sorted(
            [("enroll", "issued", None), *[("enroll", "refused", "token-invalid")] * 2]
        ), f"{node}: {[(a.status_code, a.text) for a in answers]}"
        answer, key_pem = next((a, k) for a, k in group if a.status_code == 201)
        identities[node] = (tmp_path / f"{node}.pem", tmp_path / f"{node}-key.pem")
        identities[node][0].write_text(answer.json()["certificate"])
        identities[node][1].write_bytes(key_pem)
    assert decided[("enroll", "issued", None)] == TOKENS

    # (b) Four times the limit per node, spread over the replicas, all at once.
    limited = nodes[:4]
    signs = rivals(
        [
            [sign_call(replicas[i % REPLICAS], identities[node], node) for i in range(4 * LIMIT)]
            for node in limited
        ]
    )
    for node, answers in zip(limited, signs, strict=True):
        decided.update(decision("sign", a) for a in answers)
        statuses = Counter(a.status_code for a in answers)
        assert statuses == {201: LIMIT, 429: 3 * LIMIT}, f"{node}: {statuses}"
        assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 429)

    # (c) A node revoked through the command line is refused by every replica, and
    # allowed again by every replica: none of them keeps the deny list to itself.
    denied = nodes[10]
    assert replicas[0].cli("node", "revoke", denied).returncode == 0
    calls = [sign_call(r, identities[denied], denied) for r in replicas for _twice in (1, 2)]
    (answers,) = rivals([calls])
    decided.update(decision("sign", a) for a in answers)
    assert [decision("sign", a) for a in answers] == [("sign", "refused", "node-revoked")] * 6
    assert replicas[2].cli("node", "allow", denied).returncode == 0
    (answers,) = rivals([[sign_call(r, identities[denied], denied) for r in replicas]])
    decided.update(decision("sign", a) for a in answers)
    assert [a.status_code for a in answers] == [201] * REPLICAS

    # (d) The audit, as the command line prints it: one row per decision, none lost.
    listed = replicas[1].cli("audit", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    audited = Counter((r["endpoint"], r["outcome"], r["code"]) for r in rows)
    assert audited == decided
    assert sum(decided.values()) == 3 * TOKENS + 4 * 4 * LIMIT + 6 + REPLICAS
    for node in limited:
        issued = [r for r in rows if r["node"] == node and r["outcome"] == "issued"]
        assert len([r for r in issued if r["endpoint"] == "sign"]) == LIMIT
