#!/usr/bin/env python3
"""Fleet storm: every node of a fleet asks the signer for a kubelet certificate at once.

``--nodes`` nodes (10,000 by default), enrolled beforehand, all start within ``--window``
seconds and each needs a kubelet certificate, as after a cluster CA rotation or a fleet
brought up together.  Each simulated node is the agent's own code, imported, driven as
``kubecertd.heal`` and ``kubecertd.daemon`` drive it: ``HttpSignerClient`` (one per node,
its replicas in the node's own order) for GET /v1/ca then POST /v1/sign in one
conversation, a fresh ECDSA P-256 key and CSR from ``kubecertd.pki``, the answer checked
by ``kubecertd.diagnose`` as ``Healer._verify`` checks it (plus: it chains to the cluster
CA file and names the node), and after a failure the daemon's wait,
``schedule.delay_after(attempts, random, error)``: a 429's or 5xx's Retry-After,
else exponential backoff with full jitter.  Nothing is written to a node's disk.

The node identities are issued offline with the identity CA's key and the signer's own
``policy.build_certificate`` (not 10,000 enrollments).  The signer is ``--replicas``
``kubecertd-signer serve`` processes of one ``init`` (the same CA, identity CA and TLS
files), each with one pre-forked worker per core, on one throwaway PostgreSQL cluster
(tests/pg.py).  Policy as shipped; only ``[limits] max_connections_per_address`` is
raised, because every simulated node connects from 127.0.0.1.

The nodes run in ``--procs`` processes, each a heap of next-try times served by
``--threads`` threads: at most procs x threads requests are in flight, and a node that is
due while all threads are busy waits in that queue (its wait counts).  Everything, the
signers, PostgreSQL and the clients, shares this machine's cores.

``--kill-one`` SIGKILLs one replica (its whole process group) once half the nodes hold a
certificate.  Afterwards the audit is read from the database and checked: every node's
certificate is in it, no node has more issuances than max_issuances_per_node_per_hour,
and it has at least one row per decision a node received.

Usage: .venv/bin/python bench/fleet_storm.py [--nodes 500] [--replicas 3] [--kill-one]
Listens and connects on 127.0.0.1 only; stops every server it started on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import heapq
import json
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from kubecertd import pki, schedule
from kubecertd.config import Signer as SignerSettings
from kubecertd.diagnose import ERROR, CheckPolicy, diagnose
from kubecertd.edges.client import ClientCert, HttpSignerClient
from kubecertd.errors import (
    SignerError,
    SignerMisconfigured,
    SignerRefused,
    VerificationError,
)
from kubecertd.material import FileState, Material
from kubecertd.signer import policy
from kubecertd.signer.authority import load_issuer
from kubecertd.signer.config import Policy
from kubecertd.signer.store import ISSUED, open_store

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from signer_load import proc_cpu, tree_pids  # noqa: E402 - bench/: the same /proc readings

import pg  # noqa: E402 - tests/ helpers: the throwaway PostgreSQL and the signer processes
import signer_harness  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
TIMEOUT = SignerSettings().timeout  # the agent's default [signer] timeout
LIMIT = Policy().max_issuances_per_node_per_hour  # as shipped
REASON = "cert-missing"
_FIVE_XX = re.compile(r"https://\S+: (?:HTTP )?(5\d\d)\b")


# -- CPU from /proc ----------------------------------------------------------------------


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants, with the children each reaped.

    utime + stime + cutime + cstime of every live process (proc(5) fields 14-17): the
    PostgreSQL backends that exited are in the postmaster's cutime, and no process is
    counted twice.
    """
    return sum(proc_cpu(pid, reaped=True) for pid in tree_pids(root))


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as stream:
        values = [int(v) for v in stream.readline().split()[1:8]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK  # less idle and iowait


def source_state() -> str:
    """The commit measured, and the files of kubecertd/ changed on top of it."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        [*git, "status", "--short", "--", "kubecertd"], capture_output=True, text=True, check=False
    )
    changed = " ".join(line.split()[-1] for line in dirty.stdout.splitlines())
    return head.stdout.strip() + (f" + working tree: {changed}" if changed else "")


def load_average() -> str:
    with open("/proc/loadavg") as stream:
        return " ".join(stream.read().split()[:3])


# -- setup -------------------------------------------------------------------------------


def init_replicas(work: Path, database_url: str, replicas: int) -> list[Path]:
    """One ``init``, its signer.toml on ``database_url``, copied for each replica."""
    config = signer_harness.init_signer_dir(work / "replica0")
    text, count = re.subn(
        r"(?m)^# database_url = .*$", f'database_url = "{database_url}"', config.read_text()
    )
    if count != 1:
        raise SystemExit(f"{config}: no commented database_url line to switch on")
    config.write_text(text)
    # A fleet connects from as many addresses as it has nodes; here all from 127.0.0.1.
    signer_harness.set_policy(config, max_connections_per_address=100_000)
    for index in range(1, replicas):
        shutil.copytree(work / "replica0", work / f"replica{index}")
    return [work / f"replica{index}" for index in range(replicas)]


def node_name(index: int) -> str:
    return f"node-{index:05d}.storm.test"


def enroll_offline(directory: Path, out: Path, count: int) -> list[ClientCert]:
    """Identity certificates for ``count`` nodes, signed here by the identity CA's key."""
    issuer, _, _ = load_issuer(
        str(directory / "identity-ca.pem"), str(directory / "identity-ca-key.pem"), "identity CA"
    )
    out.mkdir()
    now = dt.datetime.now(dt.timezone.utc)
    identities = []
    for index in range(count):
        name, key = node_name(index), ec.generate_private_key(ec.SECP256R1())
        cert = policy.build_certificate(
            issuer, key.public_key(), name, policy.IDENTITY, dt.timedelta(days=1), now,
            policy.random_serial(),
        )  # fmt: skip
        cert_path, key_path = out / f"{name}.pem", out / f"{name}-key.pem"
        cert_path.write_bytes(pki.certificate_pem(cert))
        key_path.write_bytes(pki.private_key_pem(key))
        identities.append((str(cert_path), str(key_path)))
    return identities


@contextlib.contextmanager
def replica(directory: Path, workers: int) -> Iterator[signer_harness.Signer]:
    """``running_signer``, except that a replica this bench SIGKILLed may exit so."""
    running: signer_harness.Signer | None = None
    try:
        with signer_harness.running_signer(directory, workers) as running:
            yield running
    except AssertionError:
        if running is None or running.process.returncode != -signal.SIGKILL:
            raise


# -- one node ----------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    identity: ClientCert
    start: float  # monotonic time of its first try
    attempts: int = 0  # failures so far, as the daemon counts them
    client: HttpSignerClient | None = None
    answered: int = 0  # its POST /v1/sign that got a decision (201 or 4xx)


@dataclass
class Tally:
    """What one process of nodes saw; merged over processes."""

    waits: list[float] = field(default_factory=list)  # start to verified certificate
    queued: list[float] = field(default_factory=list)  # start to a free thread (first try)
    attempts: Counter[int] = field(default_factory=Counter)  # tries it took -> nodes
    refused: Counter[str] = field(default_factory=Counter)  # SPEC code -> answers
    failures: Counter[str] = field(default_factory=Counter)  # other failed tries, by kind
    examples: dict[str, str] = field(default_factory=dict)  # kind -> its first message
    five_xx: int = 0  # 5xx answers in the errors the client raised
    answered: int = 0  # POST /v1/sign answered with a decision (201 or 4xx)
    replicas: Counter[str] = field(default_factory=Counter)  # which replica issued
    serials: dict[str, str] = field(default_factory=dict)  # node -> serial it holds
    gave_up: list[str] = field(default_factory=list)
    finished: float = 0.0  # monotonic time of the last certificate

    def merge(self, other: Tally) -> None:
        self.finished = max(self.finished, other.finished)
        self.waits += other.waits
        self.queued += other.queued
        self.gave_up += other.gave_up
        self.serials.update(other.serials)
        self.examples = {**other.examples, **self.examples}
        for name in ("attempts", "refused", "failures", "replicas"):
            getattr(self, name).update(getattr(other, name))
        self.five_xx += other.five_xx
        self.answered += other.answered


def verify(name: str, ca_pem: bytes, cert_pem: bytes, key: PrivateKeyTypes) -> x509.Certificate:
    """The answer as ``Healer._verify`` judges it: no error finding for the new pair."""
    material = Material(
        FileState("(signer's CA)", data=ca_pem),
        FileState("(signer's certificate)", data=cert_pem),
        FileState("(new key)", data=pki.private_key_pem(key), mode=0o600, uid=0),
    )
    now = dt.datetime.now(dt.timezone.utc)
    verdict = diagnose(material, name, now, CheckPolicy(key_owners=frozenset({0})))
    errors = [f for f in verdict.findings if f.severity == ERROR]
    if errors or verdict.cert is None:
        reasons = "; ".join(f"{f.code}: {f.message}" for f in errors) or "no certificate"
        raise VerificationError(f"the signer's certificate was refused: {reasons}")
    return verdict.cert


def heal_once(node: Node, cluster_ca: x509.Certificate) -> x509.Certificate:
    """One try, as ``Healer.heal`` talks to the signer; raises what the agent would."""
    assert node.client is not None
    client = node.client
    with client.conversation():  # one TLS connection for both calls
        ca_pem = client.fetch_ca(node.identity)
        key = pki.generate_key("ecdsa-p256")
        csr = pki.csr_pem(pki.build_csr(key, pki.kubelet_subject(node.name)))
        try:
            issued = client.sign(csr, REASON, node.identity)
        except SignerRefused:
            node.answered += 1
            raise
        node.answered += 1
    cert = verify(node.name, ca_pem, issued.certificate, key)
    # Beyond the agent's check: the cluster CA the bench knows, not only the one served.
    if not pki.issued_by(cert, cluster_ca) or pki.node_of(cert) != node.name:
        raise VerificationError(f"{node.name}: not a certificate of the cluster CA for it")
    return cert


def failure_kind(exc: Exception, tally: Tally) -> str:
    if isinstance(exc, SignerRefused):
        tally.refused[exc.code] += 1
        return f"refused:{exc.code}"
    text = str(exc)
    statuses = _FIVE_XX.findall(text)
    tally.five_xx += len(statuses)
    if statuses:
        return "5xx"
    if isinstance(exc, SignerMisconfigured):
        return "misconfigured"
    if isinstance(exc, VerificationError):
        return "verification"
    return "timeout" if "timed out" in text else "unreachable"


@dataclass(frozen=True)
class Shard:
    urls: tuple[str, ...]
    ca: str  # the identity CA: the signer's trust anchor, [signer] ca
    cluster_ca: str
    nodes: tuple[tuple[str, ClientCert, float], ...]  # name, identity, start
    threads: int
    seed: int
    deadline: float  # monotonic: give up on nodes still without a certificate


def run_shard(shard: Shard, done: Any, results: Any) -> None:
    """Serve the shard's nodes from a heap of next-try times; put the Tally on results."""
    rng = random.Random(shard.seed)
    cluster_ca = pki.load_certificates(Path(shard.cluster_ca).read_bytes())[0]
    nodes = [Node(name, identity, start) for name, identity, start in shard.nodes]
    heap = [(node.start, index) for index, node in enumerate(nodes)]
    heapq.heapify(heap)
    tally, cond = Tally(), threading.Condition()
    pending = len(nodes)

    def next_node() -> int | None:
        with cond:
            while pending:
                wait = heap[0][0] - time.monotonic() if heap else None
                if wait is not None and wait <= 0:
                    return heapq.heappop(heap)[1]
                cond.wait(wait)
            return None

    def serve() -> None:
        nonlocal pending
        while (index := next_node()) is not None:
            node = nodes[index]
            if node.client is None:  # the agent builds its client once, at start-up
                with cond:
                    tally.queued.append(time.monotonic() - node.start)
                node.client = HttpSignerClient(list(shard.urls), shard.ca, TIMEOUT, node=node.name)
            try:
                cert = heal_once(node, cluster_ca)
            except (SignerError, VerificationError) as exc:
                with cond:
                    kind = failure_kind(exc, tally)
                    tally.failures[kind] += 1
                    tally.examples.setdefault(kind, str(exc)[:300])
                # The daemon's decision after a failed heal (Daemon._failed).
                delay = schedule.delay_after(node.attempts, rng.random, exc)
                node.attempts += 1
                with cond:
                    if time.monotonic() + delay > shard.deadline:
                        tally.gave_up.append(node.name)
                        pending -= 1
                    else:
                        heapq.heappush(heap, (time.monotonic() + delay, index))
                    cond.notify_all()
                continue
            finished = time.monotonic()
            with cond:
                tally.waits.append(finished - node.start)
                tally.finished = max(tally.finished, finished)
                tally.attempts[node.attempts + 1] += 1
                tally.serials[node.name] = pki.serial_hex(cert)
                tally.replicas[node.client.answered if node.client else "?"] += 1
                node.client = None
                pending -= 1
                cond.notify_all()
            with done.get_lock():
                done.value += 1

    workers = [threading.Thread(target=serve) for _thread in range(shard.threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    tally.answered = sum(node.answered for node in nodes)
    results.put(tally)


# -- the storm -----------------------------------------------------------------------------


def server_5xx(signers: list[signer_harness.Signer]) -> int:
    """5xx answers the replicas logged (503 unavailable, 500 internal)."""
    pattern = re.compile(r"KUBECERTD_CODE=(?:unavailable|internal)\b")
    return sum(len(pattern.findall(s.log_text())) for s in signers)


def read_audit(database_url: str, tally: Tally) -> dict[str, Any]:
    """The audit's /v1/sign rows against what the nodes saw and hold."""
    store = open_store("", database_url)
    store.open()
    try:
        rows = [r for r in store.audit(None, limit=10**9) if r.endpoint == "sign"]
    finally:
        store.close()
    issued = Counter(r.node for r in rows if r.outcome == ISSUED)
    held = {(r.node, r.serial) for r in rows if r.outcome == ISSUED}
    return {
        "rows": len(rows),
        "by_outcome": dict(
            Counter(r.outcome if r.code is None else f"{r.outcome}:{r.code}" for r in rows)
        ),
        "answered_by_nodes": tally.answered,
        "rows_minus_answered": len(rows) - tally.answered,
        "nodes_over_limit": sorted(n or "?" for n, c in issued.items() if c > LIMIT),
        "max_issued_per_node": max(issued.values(), default=0),
        "issued_beyond_one_per_node": sum(c - 1 for c in issued.values()),
        "held_not_in_audit": sorted(n for n, s in tally.serials.items() if (n, s) not in held),
    }


def storm(args: argparse.Namespace, cluster: pg.Cluster, work: Path) -> dict[str, Any]:
    url = cluster.url(pg.DATABASE, schema=cluster.create_schema())
    dirs = init_replicas(work, url, args.replicas)
    began = time.monotonic()
    identities = enroll_offline(dirs[0], work / "identities", args.nodes)
    enrolled = time.monotonic() - began
    print(f"{args.nodes} node identities issued offline in {enrolled:.1f} s", flush=True)
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    with contextlib.ExitStack() as stack:
        signers = [stack.enter_context(replica(d, args.workers)) for d in dirs]
        urls = tuple(s.url for s in signers)
        rng = random.Random(args.seed)
        ctx = mp.get_context("fork")
        done, results = ctx.Value("i", 0), ctx.Queue()
        load_before = load_average()
        cpu_before = [tree_cpu(s.process.pid) for s in signers]
        db_before = tree_cpu(postmaster)
        busy_before = machine_busy()
        clients_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic() + 1.0  # the processes are forked and ready by then
        plan = [
            (node_name(i), identities[i], t0 + rng.uniform(0, args.window))
            for i in range(args.nodes)
        ]
        shards = [
            Shard(urls, str(dirs[0] / "identity-ca.pem"), str(dirs[0] / "ca.pem"),
                  tuple(plan[p :: args.procs]), args.threads, args.seed + p, t0 + args.deadline)
            for p in range(args.procs)
        ]  # fmt: skip
        procs = [ctx.Process(target=run_shard, args=(shard, done, results)) for shard in shards]
        for proc in procs:
            proc.start()
        killed: dict[str, Any] = {}
        if args.kill_one:
            victim = signers[0]
            while done.value < args.nodes // 2 and any(p.is_alive() for p in procs):
                time.sleep(0.01)  # polls the shared counter; bounded by the storm itself
            cpu_before[0] -= tree_cpu(victim.process.pid)  # its CPU up to the kill
            os.killpg(victim.process.pid, signal.SIGKILL)  # replica() reaps it at the end
            killed = {"replica": victim.url, "at_s": round(time.monotonic() - t0, 2),
                      "done_then": done.value}  # fmt: skip
            print(f"SIGKILLed replica {victim.url} at {killed['at_s']} s", flush=True)
        tally = Tally()
        for _proc in procs:
            tally.merge(results.get())
        for proc in procs:
            proc.join()
        clients_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_after = [
            0.0 if killed and i == 0 else tree_cpu(s.process.pid) for i, s in enumerate(signers)
        ]
        db_after = tree_cpu(postmaster)
        busy_after = machine_busy()
        load_after = load_average()
        audit = read_audit(url, tally)
        logged_5xx = server_5xx(signers)
    waits = sorted(tally.waits)
    cuts = statistics.quantiles(waits, n=100, method="inclusive") if len(waits) > 1 else waits * 99
    queued = (
        statistics.quantiles(tally.queued, n=100, method="inclusive") if len(waits) > 1 else cuts
    )
    client_cpu = sum(
        getattr(clients_after, f) - getattr(clients_before, f) for f in ("ru_utime", "ru_stime")
    )
    signer_cpu = sum(a - b for a, b in zip(cpu_after, cpu_before, strict=True))
    ours = signer_cpu + (db_after - db_before) + client_cpu
    return {
        "source": source_state(),
        "nodes": args.nodes,
        "replicas": args.replicas,
        "workers_per_replica": args.workers,
        "kill_one": killed or None,
        "window_s": args.window,
        "in_flight_max": args.procs * args.threads,
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_after,
        "offline_enrollment_s": round(enrolled, 1),
        "all_certified_s": round(tally.finished - t0, 2) if not tally.gave_up else None,
        "certified": len(tally.waits),
        "gave_up": len(tally.gave_up),
        "wait_p50_s": round(cuts[49], 2),
        "wait_p99_s": round(cuts[98], 2),
        "wait_max_s": round(waits[-1], 2) if waits else None,
        "queued_for_a_thread_p50_s": round(queued[49], 2),
        "queued_for_a_thread_p99_s": round(queued[98], 2),
        "tries_per_node": dict(sorted(tally.attempts.items())),
        "refused": dict(tally.refused),
        "failed_tries": dict(tally.failures),
        "failure_examples": tally.examples,
        "five_xx_seen_by_nodes": tally.five_xx,
        "five_xx_logged_by_signers": logged_5xx,
        "issued_by_replica": dict(tally.replicas),
        "signer_cpu_s": round(signer_cpu, 1),
        "database_cpu_s": round(db_after - db_before, 1),
        "clients_cpu_s": round(client_cpu, 1),
        # The machine's busy time in the same span, less the three above: other processes.
        "other_cpu_s": round(busy_after - busy_before - ours, 1),
        "audit": audit,
    }


def check(result: dict[str, Any]) -> list[str]:
    """What must hold after every storm; each broken promise as a line."""
    audit, problems = result["audit"], []
    if result["certified"] != result["nodes"]:
        problems.append(f"{result['nodes'] - result['certified']} nodes without a certificate")
    if audit["nodes_over_limit"]:
        problems.append(f"nodes over {LIMIT} issuances: {audit['nodes_over_limit'][:5]}")
    if audit["held_not_in_audit"]:
        problems.append(f"certificates missing from the audit: {audit['held_not_in_audit'][:5]}")
    if audit["rows_minus_answered"] < 0:
        problems.append("fewer audit rows than decisions the nodes received")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--kill-one", action="store_true", help="SIGKILL one replica mid-storm")
    parser.add_argument("--window", type=float, default=10.0, help="seconds over which nodes start")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="per replica")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=64, help="client threads per process")
    parser.add_argument("--deadline", type=float, default=1800.0, help="give up after (s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.kill_one and args.replicas < 2:
        parser.error("--kill-one needs --replicas 2 or more")
    print(
        f"fleet storm: {args.nodes} nodes within {args.window:g} s, {args.replicas} replica(s) x "
        f"{args.workers} workers, PostgreSQL, {args.procs}x{args.threads} client threads; all on "
        f"this machine's {os.cpu_count()} cores (signers, database and clients share them)",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="kubecertd-storm-"))
    cluster = pg.start()
    try:
        result = storm(args, cluster, work)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    problems = check(result)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
