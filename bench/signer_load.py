#!/usr/bin/env python3
"""Load generator for the central signer, side by side with ``cfssl serve`` (BENCHMARKS.md).

Every request is a fresh TCP connection and a full TLS handshake with a client
certificate (no keep-alive, no session resumption), as a node renewing its kubelet
certificate does.  The CSRs are made before timing and the same ones go to every
server.  Servers (``--servers``; by default kubecertd, cfssl and the two TLS floors),
each at 1, 16 and 256 concurrent clients:

- ``kubecertd``: ``kubecertd-signer serve --workers 2``, POST /v1/sign (201), node
  identities enrolled through ``token create`` + POST /v1/enroll, the per-node rate
  limit raised so that it never refuses;
- ``cfssl``: Debian's ``golang-cfssl`` (``cfssl serve -mutual-tls-ca``), POST
  /api/v1/cfssl/sign with a client-auth profile (200, ``"success":true``), the same
  cluster CA, serving certificate, identity CA and client identities;
- the floors: the signer's certificates and TLS settings (TLS 1.2+, client
  certificates optional but verified against the identity and cluster CAs, no session
  cache), 2 pre-forked workers sharing one listening socket, each reading the request
  and answering a fixed 201 ``{}``: what any signer built that way pays.
  ``tls-floor``: pyOpenSSL, non-blocking connections on the socket fd in one
  single-threaded ``selectors`` loop per worker (the signer's model from issue 13 on);
  ``tls-floor-threads``: pyOpenSSL, blocking connections on 16 threads per worker;
  ``tls-floor-asyncio``: Python's ``ssl`` on a bare asyncio protocol, and
  ``aiohttp-floor``: an aiohttp app run as the aiohttp signer ran its own (the
  signer's model before issue 13).

The clients are 2 processes (both cores), each with ``clients/2`` threads doing
blocking ``socket`` + ``ssl`` I/O; each request wraps a new socket with no session.
Server CPU is utime+stime from /proc of the server process and all its descendants,
read at the start and end of the measured window, divided by the successful
issuances completed in that window.  ``other load`` is the machine's CPU used by
neither the server nor the clients: on a shared machine, read the numbers with it
(and with the ECDSA-sign calibration printed at the end).

Other modes: ``--components N`` times each step of an issuance in-process (CPU per
call); ``--py-spy DIR`` records the Python servers during each level and prints
where each server's samples went; ``--patch tickets0,uvloop`` runs the Python servers
with what-if changes applied from a sitecustomize and OPENSSL_CONF (kubecertd itself
is not edited).

Usage: .venv/bin/python bench/signer_load.py [--quick] [--out results.json]
Needs `cfssl` on PATH (apt-get install golang-cfssl) unless --servers leaves it out.
Listens and connects on 127.0.0.1 only; stops every server it started on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import multiprocessing as mp
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0
LEVELS = (1, 16, 256)
CLIENT_PROCESSES = 2


# --- small helpers ---------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[signer_load] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant (scans /proc: the signer forks its workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stream:
                stat = stream.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def proc_cpu(pid: int, reaped: bool = False) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone.

    ``reaped``: plus cutime + cstime, the CPU of the children it has waited for.
    """
    try:
        with open(f"/proc/{pid}/stat") as stream:
            stat = stream.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(v) for v in fields[11 : 15 if reaped else 13]) / CLK_TCK  # proc(5) 14-17


def tree_cpu(root: int) -> float:
    return sum(proc_cpu(pid) for pid in tree_pids(root))


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as stream:
        values = [int(v) for v in stream.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return float(total - idle), float(total)


def wait_quiet(limit_pct: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the machine is nearly idle; the last busy %.

    Other work on a shared machine steals the cores that both the clients and the
    server need; the table reports what was left over anyway (``other load``).
    """
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_cpu()
        time.sleep(0.5)
        after = machine_cpu()
        total = after[1] - before[1]
        busy = 100.0 * (after[0] - before[0]) / total if total else 0.0
        if busy <= limit_pct or time.monotonic() >= deadline:
            return busy
        log(f"machine {busy:.0f}% busy with other work; waiting for it to settle")


def ecdsa_sign_us(rounds: int = 2000) -> float:
    """CPU microseconds per ECDSA P-256 signature now: how fast this machine is today."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    began = time.process_time()
    for _ in range(rounds):
        key.sign(b"calibration" * 6, ec.ECDSA(hashes.SHA256()))
    return (time.process_time() - began) / rounds * 1e6


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


# --- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    path: str
    process: subprocess.Popen[bytes]
    ok_status: int
    ok_marker: bytes = b""  # a byte string the successful body must contain
    log_path: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # the group we created for it
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def start(
    argv: Sequence[str], log_path: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_stream:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=log_stream,
            start_new_session=True,  # its own process group: stopped as one
            env=env,
        )


def wait_ready(server: Server, probe: ssl.SSLContext, request: bytes, want: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last: object = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited ({server.process.returncode}); see {server.log_path}"
            )
        try:
            status, _body = one_request(probe, server.port, request)
            if status == want:
                return
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(
        f"{server.name} not ready after {READY_TIMEOUT}s ({last}); see {server.log_path}"
    )


def http_request(method: str, path: str, port: int, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def one_request(
    context: ssl.SSLContext, port: int, request: bytes, timeout: float = REQUEST_TIMEOUT
) -> tuple[int, bytes]:
    """One fresh connection, one full handshake (no session passed), one request."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        tls = context.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise
    with tls:
        tls.sendall(request)
        status, body, _ = read_response(tls)
        return status, body


def read_response(tls: ssl.SSLSocket) -> tuple[int, bytes, float]:
    """Status, body and when the body was complete; drains to EOF before returning."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError(
                f"connection closed before the response headers ({len(data)} bytes)"
            )
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None and not chunked:
        while len(body) < length:
            chunk = tls.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside the response body")
            body += chunk
        complete = time.time()
        with contextlib.suppress(OSError):  # let the server close first (no TIME_WAIT here)
            while tls.recv(65536):
                pass
        return status, body, complete
    while True:  # chunked or unknown length: the server closes after the response
        chunk = tls.recv(65536)
        if not chunk:
            return status, body, time.time()
        body += chunk


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


# --- the floor servers (run as a subprocess of this file: --floor-server) --------------------
#
# Each floor is the signer's certificates and TLS settings, a worker model and its
# socket handling, and nothing else: every request is answered with the same fixed
# 201. The TLS contexts are built here, not taken from kubecertd.signer.serve, so that
# the floors of both models stay measurable whatever the signer runs on.

AIOHTTP_KEEPALIVE_TIMEOUT = 15.0  # as the aiohttp signer ran (agents open one per request)
FLOOR_THREADS = 16  # blocking connections per worker in tls-floor-threads, as in issue 13
ACCEPT_BATCH = 100  # accepts per wake-up of a selector floor (asyncio's default backlog)

_FLOOR_RESPONSE = (
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\n{}"
)


def request_complete(data: bytes) -> bool:
    """Whether ``data`` holds one whole HTTP request (headers + Content-Length body)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    return not match or len(body) >= int(match[1])


def stdlib_tls_context(config: Any) -> ssl.SSLContext:
    """As the aiohttp signer's ``serve.tls_context``: TLS 1.2+, client certificates
    optional but verified against the identity and cluster CAs, no session tickets."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert, config.tls.key)
    for ca in (config.identity_ca.cert, config.cluster_ca.cert):
        context.load_verify_locations(cafile=ca)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    return context


def pyopenssl_context(config: Any, verify: bool = True) -> Any:
    """The same settings on pyOpenSSL (the OpenSSL that the cryptography wheel bundles).

    VERIFY_PEER without FAIL_IF_NO_PEER_CERT: a certificate is optional, one that is
    presented must verify. pyOpenSSL has no ``SSL_CTX_set_num_tickets``: OP_NO_TICKET
    with the cache off still sends two stateful TLS 1.3 tickets per handshake
    (``--patch tickets0`` stops them through OPENSSL_CONF's ``NumTickets``).
    """
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate_chain_file(config.tls.cert)
    context.use_privatekey_file(config.tls.key)
    context.check_privatekey()
    for ca in (config.identity_ca.cert, config.cluster_ca.cert):
        context.load_verify_locations(ca)
    if verify:
        context.set_verify(SSL.VERIFY_PEER)
    context.set_options(SSL.OP_NO_TICKET)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def listening_socket(port: int, blocking: bool) -> socket.socket:
    """Bound and listening as ``serve.bind`` does; shared by the pre-forked workers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(4096)
    sock.setblocking(blocking)  # O_NONBLOCK is on the open file: all workers share it
    return sock


class _FloorProtocol(asyncio.Protocol):
    """Reads one HTTP request (headers + Content-Length), answers 201 ``{}``, closes."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # as aiohttp does: no Nagle delay before close_notify
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not request_complete(self.buffer):
            return
        assert self.transport is not None
        self.transport.write(_FLOOR_RESPONSE)
        self.transport.close()


def asyncio_floor(config: Any, sock: socket.socket) -> None:
    """``tls-floor-asyncio``: Python's ``ssl`` under a bare asyncio protocol."""
    context = stdlib_tls_context(config)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_FloorProtocol, sock=sock, ssl=context, backlog=4096)
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        async with server:
            await stopped.wait()

    asyncio.run(serve())


def aiohttp_floor(config: Any, sock: socket.socket) -> None:
    """``aiohttp-floor``: an aiohttp app run as the aiohttp signer ran its own (AppRunner,
    SockSite, no access log), whose one handler reads the body and answers 201 ``{}``."""
    from aiohttp import web

    context = stdlib_tls_context(config)

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({}, status=201)

    async def serve() -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/v1/sign", answer)
        runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=AIOHTTP_KEEPALIVE_TIMEOUT,
            handle_signals=False,
        )
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=context, backlog=4096).start()
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()
        await runner.cleanup()

    asyncio.run(serve())


@dataclass(eq=False)
class _Client:
    """One connection of the selector floor and how far it got."""

    sock: socket.socket
    tls: Any  # OpenSSL.SSL.Connection on the socket's fd
    request: bytes = b""
    answer: bytes | None = None  # what is left to send, once the request is complete
    handshaken: bool = False
    waiting: int = 0  # the selector events it is registered for (0: not registered)


def _advance(selector: selectors.BaseSelector, client: _Client) -> None:
    """Take one connection as far as it goes without blocking; wait on the selector for
    what OpenSSL wants next (a TLS 1.3 read may want to write, and the other way round),
    or close it when it is done or failed."""
    from OpenSSL import SSL

    try:
        if not client.handshaken:
            client.tls.do_handshake()
            client.handshaken = True
        while client.answer is None:
            client.request += client.tls.recv(65536)
            if request_complete(client.request):
                client.answer = _FLOOR_RESPONSE
        while client.answer:
            client.answer = client.answer[client.tls.send(client.answer) :]
        client.tls.shutdown()  # our close_notify; the client's is not waited for
    except SSL.WantReadError:
        _wait(selector, client, selectors.EVENT_READ)
        return
    except SSL.WantWriteError:
        _wait(selector, client, selectors.EVENT_WRITE)
        return
    except (SSL.Error, OSError):  # a failed handshake, a reset: the client counts it
        pass
    if client.waiting:
        selector.unregister(client.sock)
    client.sock.close()


def _wait(selector: selectors.BaseSelector, client: _Client, events: int) -> None:
    if not client.waiting:
        selector.register(client.sock, events, client)
    elif client.waiting != events:
        selector.modify(client.sock, events, client)
    client.waiting = events


def selector_floor(config: Any, sock: socket.socket) -> None:
    """``tls-floor``: non-blocking pyOpenSSL connections on the socket fd, served by one
    single-threaded ``selectors`` loop per worker, as the signer serves them."""
    from OpenSSL import SSL

    context = pyopenssl_context(config)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _events in selector.select():
            if key.data is not None:
                _advance(selector, key.data)
                continue
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _address = sock.accept()
                except OSError:  # BlockingIOError: another worker took it
                    break
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = SSL.Connection(context, conn)
                tls.set_accept_state()
                _advance(selector, _Client(conn, tls))  # the ClientHello may be here


def threads_floor(config: Any, sock: socket.socket) -> None:
    """``tls-floor-threads``: blocking pyOpenSSL connections, FLOOR_THREADS threads per
    worker each accepting from the shared socket (the kernel hands a connection to one
    waiting thread), as issue 13's measurement served them."""
    from OpenSSL import SSL

    context = pyopenssl_context(config)
    timeout = struct.pack("ll", int(REQUEST_TIMEOUT), 0)  # struct timeval: a stuck client

    def serve() -> None:
        while True:
            conn, _address = sock.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
                tls = SSL.Connection(context, conn)
                tls.set_accept_state()
                with contextlib.suppress(SSL.Error, OSError):
                    tls.do_handshake()
                    request = b""
                    while not request_complete(request):
                        request += tls.recv(65536)
                    tls.sendall(_FLOOR_RESPONSE)
                    tls.shutdown()

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(FLOOR_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# server name -> (one worker's loop, whether the shared socket blocks)
FLOORS: dict[str, tuple[Callable[[Any, socket.socket], None], bool]] = {
    "tls-floor": (selector_floor, False),
    "tls-floor-threads": (threads_floor, True),
    "tls-floor-asyncio": (asyncio_floor, False),
    "aiohttp-floor": (aiohttp_floor, False),
}
SERVERS = ("kubecertd", "cfssl", *FLOORS)


def floor_server(config_path: str, port: int, workers: int, name: str) -> int:
    """The floor ``name`` in ``workers`` pre-forked processes sharing one socket."""
    sys.path.insert(0, str(REPO))
    from kubecertd.signer.config import read_signer_config

    config = read_signer_config(config_path)
    worker, blocking = FLOORS[name]
    sock = listening_socket(port, blocking)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                worker(config, sock)
            finally:
                os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(c, signal.SIGTERM) for c in children])
    for child in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)
    return 0


# --- setup: CAs, identities, CSRs ------------------------------------------------------------


@dataclass
class Material:
    directory: str
    config: str
    identity_ca: str
    nodes: list[str]
    identity_files: list[tuple[str, str]]  # (cert, key) per node
    csrs: list[tuple[int, str]]  # (node index, kubelet CSR PEM), the same for every server


def signer_cli(*args: str) -> str:
    """``kubecertd-signer ARGS`` in this process (the real CLI code); its stdout."""
    from kubecertd.signer.cli import main as signer_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = signer_main(list(args))
    if status != 0:
        raise RuntimeError(f"kubecertd-signer {' '.join(args)} exited {status}")
    return out.getvalue()


def make_material(work: str, nodes: int, csrs_per_node: int) -> tuple[Material, list[Any]]:
    from kubecertd import pki

    directory = os.path.join(work, "signer")
    subprocess.run(
        [str(REPO / ".venv/bin/kubecertd-signer"), "init", "--dir", directory,
         "--new-cluster-ca", "--hostname", "localhost", "--ip", HOST],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    config = os.path.join(directory, "signer.toml")
    text = Path(config).read_text()
    # All the load comes from 127.0.0.1 and one node per CSR batch: raise the per-node
    # rate limit and the per-address connection cap, which would otherwise be measured.
    for setting, value in (
        ("max_issuances_per_node_per_hour", "100000000"),
        ("max_connections_per_address", "100000"),
    ):
        text, count = re.subn(rf"(?m)^{setting} = \d+", f"{setting} = {value}", text)
        if count != 1:
            raise RuntimeError(f"{config}: no {setting} line to raise")
    Path(config).write_text(text)
    names = [f"bench-node-{i:04d}" for i in range(nodes)]
    log(f"generating {nodes} identity keys and {nodes * csrs_per_node} kubelet CSRs")
    identity_keys = [pki.generate_key("ecdsa-p256") for _ in names]
    csrs: list[tuple[int, str]] = []
    for _round in range(csrs_per_node):  # node after node, so neighbours differ
        for index, name in enumerate(names):
            csr = pki.build_csr(pki.generate_key("ecdsa-p256"), pki.kubelet_subject(name))
            csrs.append((index, csr.public_bytes(Encoding.PEM).decode()))
    material = Material(
        directory=directory,
        config=config,
        identity_ca=os.path.join(directory, "identity-ca.pem"),
        nodes=names,
        identity_files=[],
        csrs=csrs,
    )
    return material, identity_keys


def enroll_all(material: Material, identity_keys: list[Any], port: int, work: str) -> None:
    """A token per node (the CLI's own code), then POST /v1/enroll with an identity CSR."""
    from kubecertd import pki

    ident_dir = os.path.join(work, "identities")
    os.makedirs(ident_dir, mode=0o700)
    log(f"creating {len(material.nodes)} enrollment tokens")
    tokens = [
        signer_cli("token", "create", "--node", name, "--config", material.config).strip()
        for name in material.nodes
    ]
    anonymous = client_context(material.identity_ca)

    def enroll(index: int) -> tuple[str, str]:
        name, key = material.nodes[index], identity_keys[index]
        csr = pki.build_csr(key, pki.identity_subject(name))
        body = json.dumps(
            {"token": tokens[index], "csr": csr.public_bytes(Encoding.PEM).decode()}
        ).encode()
        status, answer = one_request(
            anonymous, port, http_request("POST", "/v1/enroll", port, body)
        )
        if status != 201:
            raise RuntimeError(f"enroll {name}: {status} {answer[:200]!r}")
        cert_path = os.path.join(ident_dir, f"{name}.pem")
        key_path = os.path.join(ident_dir, f"{name}-key.pem")
        Path(cert_path).write_text(json.loads(answer)["certificate"])
        Path(key_path).write_bytes(pki.private_key_pem(key))
        return cert_path, key_path

    log(f"enrolling {len(material.nodes)} nodes through POST /v1/enroll")
    with ThreadPoolExecutor(16) as pool:
        material.identity_files = list(pool.map(enroll, range(len(material.nodes))))


_PATCHES = """\
# Written by bench/signer_load.py --patch: what-if experiments, never kubecertd itself.
import os

_wanted = set(os.environ.get("SIGNER_LOAD_PATCH", "").split(","))
if "uvloop" in _wanted:
    import asyncio

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
"""

# tickets0: no TLS 1.3 session tickets, through OpenSSL's own configuration, which both
# Debian's OpenSSL (Python's ssl) and the one bundled with cryptography (pyOpenSSL, which
# has no SSL_CTX_set_num_tickets) apply to every new SSL_CTX. It replaces Debian's
# openssl.cnf, whose [openssl_init] is empty.
# https://docs.openssl.org/3.0/man3/SSL_CONF_cmd/ (NumTickets)
_NO_TICKETS_CNF = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
NumTickets = 0
"""


def patch_env(work: str, patches: str, extra_path: str) -> dict[str, str] | None:
    """The environment for a server run with ``--patch`` experiments (sitecustomize,
    OPENSSL_CONF)."""
    if not patches:
        return None
    directory = os.path.join(work, "patches")
    os.makedirs(directory, exist_ok=True)
    Path(directory, "sitecustomize.py").write_text(_PATCHES)
    paths = [directory, *([extra_path] if extra_path else [])]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["SIGNER_LOAD_PATCH"] = patches
    if "tickets0" in patches.split(","):
        Path(directory, "openssl.cnf").write_text(_NO_TICKETS_CNF)
        env["OPENSSL_CONF"] = os.path.join(directory, "openssl.cnf")
    return env


def start_signer(
    material: Material, work: str, workers: int, env: dict[str, str] | None = None
) -> Server:
    port = free_port()
    log_path = os.path.join(work, "kubecertd-signer.log")
    process = start(
        [str(REPO / ".venv/bin/kubecertd-signer"), "serve", "--config", material.config,
         "--listen", f"{HOST}:{port}", "--workers", str(workers)],
        log_path, env,
    )  # fmt: skip
    server = Server("kubecertd", port, "/v1/sign", process, 201, log_path=log_path)
    wait_ready(
        server, client_context(material.identity_ca), http_request("GET", "/healthz", port), 200
    )
    server.notes["workers"] = workers
    if env is not None:
        server.notes["patches"] = env["SIGNER_LOAD_PATCH"]
    return server


def start_cfssl(material: Material, work: str, probe: ssl.SSLContext) -> Server:
    cfssl = shutil.which("cfssl")
    if not cfssl:
        raise RuntimeError("cfssl is not on PATH: apt-get install golang-cfssl")
    config = os.path.join(work, "cfssl.json")
    Path(config).write_text(
        json.dumps(
            {
                "signing": {
                    "default": {
                        "expiry": "720h",
                        "usages": ["signing", "digital signature", "client auth"],
                    },
                    "profiles": {
                        "client": {
                            "expiry": "720h",
                            "usages": ["signing", "digital signature", "client auth"],
                        }
                    },
                }
            }
        )
    )
    d = material.directory
    port = free_port()
    log_path = os.path.join(work, "cfssl.log")
    process = start(
        [cfssl, "serve", "-address", HOST, "-port", str(port),
         "-ca", f"{d}/ca.pem", "-ca-key", f"{d}/ca-key.pem", "-config", config,
         "-tls-cert", f"{d}/signer.pem", "-tls-key", f"{d}/signer-key.pem",
         "-mutual-tls-ca", material.identity_ca],
        log_path,
    )  # fmt: skip
    server = Server("cfssl", port, "/api/v1/cfssl/sign", process, 200, b'"success":true', log_path)
    # the info endpoint answers 200 (or 400 for an empty body) once it serves
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            status, _ = one_request(
                probe, port, http_request("POST", "/api/v1/cfssl/info", port, b"{}")
            )
            if status in (200, 400):
                break
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"cfssl not ready; see {log_path}")
        time.sleep(0.1)
    version = subprocess.run([cfssl, "version"], capture_output=True, text=True, check=False).stdout
    server.notes["version"] = " ".join(version.split())
    return server


def start_floor(
    material: Material, work: str, workers: int, probe: ssl.SSLContext, name: str,
    env: dict[str, str] | None = None,
) -> Server:  # fmt: skip
    port = free_port()
    log_path = os.path.join(work, f"{name}.log")
    process = start(
        [
            sys.executable,
            __file__,
            "--floor-server",
            material.config,
            str(port),
            str(workers),
            name,
        ],
        log_path,
        env,
    )
    server = Server(name, port, "/v1/sign", process, 201, log_path=log_path)
    wait_ready(server, probe, http_request("POST", "/v1/sign", port, b"{}"), 201)
    server.notes["workers"] = workers
    if name in ("tls-floor", "tls-floor-threads"):
        from OpenSSL import SSL

        server.notes["openssl"] = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
        if name == "tls-floor-threads":
            server.notes["threads_per_worker"] = FLOOR_THREADS
    else:
        server.notes["openssl"] = ssl.OPENSSL_VERSION
    return server


# --- the load --------------------------------------------------------------------------------


def build_requests(server: Server, material: Material) -> list[tuple[int, bytes]]:
    """(node index, complete HTTP request bytes) per CSR, made before timing."""
    requests = []
    for node, csr in material.csrs:
        if server.name == "cfssl":
            body = {"certificate_request": csr, "profile": "client"}
        else:
            body = {"csr": csr, "reason": "bench"}
        requests.append(
            (node, http_request("POST", server.path, server.port, json.dumps(body).encode()))
        )
    return requests


def client_process(
    rank: int,
    threads: int,
    port: int,
    requests: list[tuple[int, bytes]],
    contexts: list[ssl.SSLContext],
    ok_status: int,
    ok_marker: bytes,
    start_at: float,
    measure_from: float,
    measure_to: float,
    queue: Any,
) -> None:
    """``threads`` clients, each a loop of fresh connections until ``measure_to``."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    version: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(rank, 1 << 62, CLIENT_PROCESSES))

    def one_client() -> None:
        mine: list[float] = []
        my_errors: dict[str, int] = {}
        my_status: dict[str, int] = {}
        my_version: dict[str, int] = {}
        while True:
            with lock:
                n = next(counter)
            node, request = requests[n % len(requests)]
            began = time.time()
            if began >= measure_to:
                break
            kind = ""
            try:
                sock = socket.create_connection((HOST, port), timeout=REQUEST_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    tls = contexts[node].wrap_socket(sock, server_hostname="localhost")
                except BaseException:
                    sock.close()
                    raise
                with tls:
                    proto = tls.version() or "?"
                    tls.sendall(request)
                    status, body, ended = read_response(tls)
                if status != ok_status or (ok_marker and ok_marker not in body):
                    kind = f"http-{status}"
                    my_status[f"{status}:{body[:120]!r}"] = (
                        my_status.get(f"{status}:{body[:120]!r}", 0) + 1
                    )
            except Exception as exc:  # noqa: BLE001 - every failure is counted, by kind
                ended = time.time()
                kind = type(exc).__name__
                proto = ""
            if not (measure_from <= ended <= measure_to):
                continue  # warm-up, or finished after the window closed
            if kind:
                my_errors[kind] = my_errors.get(kind, 0) + 1
            else:
                mine.append(ended - began)
                my_version[proto] = my_version.get(proto, 0) + 1
        with lock:
            latencies.extend(mine)
            for target, source in (
                (errors, my_errors),
                (statuses, my_status),
                (version, my_version),
            ):
                for key, value in source.items():
                    target[key] = target.get(key, 0) + value

    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    workers = [threading.Thread(target=one_client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=(measure_to - time.time()) + REQUEST_TIMEOUT + 5)
    queue.put(
        {
            "latencies": latencies,
            "errors": errors,
            "bad_answers": statuses,
            "tls_versions": version,
        }
    )


@dataclass
class LevelResult:
    server: str
    clients: int
    seconds: float
    issued: int
    errors: int
    issuances_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float
    server_cpu_ms_per_issuance: float
    server_cores_busy: float
    client_cpu_s: float
    client_cpu_ms_per_request: float
    machine_busy_pct: float
    other_load_pct: float  # CPU used by neither the server nor our clients, % of the machine
    error_kinds: dict[str, int]
    tls_versions: dict[str, int]
    bad_answers: dict[str, int]
    busy_before_pct: float = float("nan")  # the machine just before the level (wait_quiet)


def start_profilers(
    server: Server, clients: int, duration: float, profile_dir: str | None, native: bool
) -> list[subprocess.Popen[bytes]]:
    """py-spy on every process of the server (Python servers only), for the window."""
    if not profile_dir or server.name == "cfssl":
        return []
    spy = shutil.which("py-spy") or str(REPO / ".venv/bin/py-spy")
    os.makedirs(profile_dir, exist_ok=True)
    spies = []
    for pid in tree_pids(server.pid):
        out = os.path.join(profile_dir, f"{server.name}-{clients}-{pid}.txt")
        argv = [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(duration))),
                "--rate", "250", "--format", "raw", "--nonblocking", "--output", out]  # fmt: skip
        if native:
            argv.append("--native")
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def run_level(
    server: Server, contexts: list[ssl.SSLContext], requests: list[tuple[int, bytes]],
    clients: int, warmup: float, duration: float,
    profile_dir: str | None = None, native: bool = False,
) -> LevelResult:  # fmt: skip
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    processes = min(CLIENT_PROCESSES, clients)
    per_process = [
        clients // processes + (1 if i < clients % processes else 0) for i in range(processes)
    ]
    # the client contexts (one per node identity) were loaded before: the forked
    # children inherit them
    start_at = time.time() + 0.5
    measure_from = start_at + warmup
    measure_to = measure_from + duration
    children = [
        ctx.Process(
            target=client_process,
            args=(
                rank,
                per_process[rank],
                server.port,
                requests,
                contexts,
                server.ok_status,
                server.ok_marker,
                start_at,
                measure_from,
                measure_to,
                queue,
            ),
            daemon=True,
        )
        for rank in range(processes)
    ]
    for child in children:
        child.start()
    time.sleep(max(0.0, measure_from - time.time()))
    spies = start_profilers(server, clients, duration, profile_dir, native)
    cpu_before, machine_before = tree_cpu(server.pid), machine_cpu()
    clients_before = sum(proc_cpu(child.pid) for child in children if child.pid)
    time.sleep(max(0.0, measure_to - time.time()))
    cpu_after, machine_after = tree_cpu(server.pid), machine_cpu()
    clients_after = sum(proc_cpu(child.pid) for child in children if child.pid)
    reports = []
    deadline = time.time() + REQUEST_TIMEOUT + 30
    for _ in children:
        reports.append(queue.get(timeout=max(1.0, deadline - time.time())))
    for child in children:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    for spy in spies:
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if server.process.poll() is not None:
        raise RuntimeError(f"{server.name} died during the run; see {server.log_path}")
    latencies = sorted(lat for report in reports for lat in report["latencies"])
    error_kinds: dict[str, int] = {}
    bad: dict[str, int] = {}
    versions: dict[str, int] = {}
    for report in reports:
        for target, source in ((error_kinds, report["errors"]), (bad, report["bad_answers"]),
                               (versions, report["tls_versions"])):  # fmt: skip
            for key, value in source.items():
                target[key] = target.get(key, 0) + value
    issued = len(latencies)
    errors_total = sum(error_kinds.values())
    server_cpu = cpu_after - cpu_before
    busy = machine_after[0] - machine_before[0]
    total = machine_after[1] - machine_before[1]
    client_cpu = clients_after - clients_before
    cores = os.cpu_count() or 1
    others = busy / CLK_TCK - server_cpu - client_cpu  # everything else on the machine
    return LevelResult(
        server=server.name,
        clients=clients,
        seconds=duration,
        issued=issued,
        errors=sum(error_kinds.values()),
        issuances_per_s=issued / duration,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        server_cpu_s=server_cpu,
        server_cpu_ms_per_issuance=(server_cpu / issued * 1000) if issued else float("nan"),
        server_cores_busy=server_cpu / duration,
        client_cpu_s=client_cpu,
        client_cpu_ms_per_request=(client_cpu / (issued + errors_total) * 1000)
        if issued + errors_total
        else float("nan"),
        machine_busy_pct=100.0 * busy / total if total else float("nan"),
        other_load_pct=max(0.0, 100.0 * others / (duration * cores)),
        error_kinds=error_kinds,
        tls_versions=versions,
        bad_answers=bad,
    )


# --- report ----------------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as stream:
        for line in stream:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "pyopenssl_openssl": _pyopenssl_version(),
    }


def _pyopenssl_version() -> str:
    try:
        from OpenSSL import SSL, __version__
    except ImportError:
        return "-"
    return f"pyOpenSSL {__version__} on {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}"


def quiet_line(results: list[LevelResult], limit_pct: float, max_wait: float) -> str:
    """Whether every level started on a quiet machine (``--quiet-pct``)."""
    loud = [r for r in results if r.busy_before_pct > limit_pct]
    if not loud:
        return (
            f"Quiet wait: all {len(results)} levels started with the machine at most "
            f"{limit_pct:g}% busy."
        )
    named = ", ".join(f"{r.server} {r.clients} ({r.busy_before_pct:.0f}%)" for r in loud)
    return (
        f"Quiet wait: {len(loud)} of {len(results)} levels started after {max_wait:g} s "
        f"without the machine falling to {limit_pct:g}% busy: {named}."
    )


def markdown_table(results: list[LevelResult]) -> str:
    lines = [
        "| server | clients | issuances/s | p50 ms | p99 ms | errors | server CPU ms/issuance | server cores busy | client CPU ms/request | other load % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(results, key=lambda r: (r.clients, r.server)):
        lines.append(
            f"| {r.server} | {r.clients} | {r.issuances_per_s:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f}"
            f" | {r.errors} | {r.server_cpu_ms_per_issuance:.3f} | {r.server_cores_busy:.2f}"
            f" | {r.client_cpu_ms_per_request:.3f} | {r.other_load_pct:.0f} |"
        )
    return "\n".join(lines)


def ab_table(results: list[LevelResult]) -> str:
    """Median (min-max) over the interleaved rounds of each signer variant."""
    lines = [
        "| variant | clients | rounds | server CPU ms/issuance, median (min-max) | issuances/s, median | other load %, median |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    groups: dict[tuple[str, int], list[LevelResult]] = {}
    for r in results:
        groups.setdefault((r.server, r.clients), []).append(r)
    for (name, clients), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cpu = sorted(r.server_cpu_ms_per_issuance for r in rows)
        lines.append(
            f"| {name} | {clients} | {len(rows)} | {statistics.median(cpu):.3f} ({cpu[0]:.3f}-{cpu[-1]:.3f})"
            f" | {statistics.median(r.issuances_per_s for r in rows):.0f}"
            f" | {statistics.median(r.other_load_pct for r in rows):.0f} |"
        )
    return "\n".join(lines)


def ratio_lines(results: list[LevelResult]) -> list[str]:
    """Per level: kubecertd against cfssl, and kubecertd and cfssl against each floor."""
    by = {(r.server, r.clients): r for r in results}
    lines = []
    for clients in sorted({r.clients for r in results}):
        ours, theirs = by.get(("kubecertd", clients)), by.get(("cfssl", clients))
        parts = []
        if ours and theirs and theirs.issuances_per_s:
            parts.append(
                f"throughput kubecertd/cfssl {ours.issuances_per_s / theirs.issuances_per_s:.2f}"
            )
            parts.append(
                "CPU/issuance kubecertd/cfssl "
                f"{ours.server_cpu_ms_per_issuance / theirs.server_cpu_ms_per_issuance:.2f}"
            )
        for name in FLOORS:
            floor = by.get((name, clients))
            if not floor:
                continue
            if ours:
                above = ours.server_cpu_ms_per_issuance - floor.server_cpu_ms_per_issuance
                parts.append(f"kubecertd above {name} {above:.3f} ms")
            if theirs:
                ratio = floor.server_cpu_ms_per_issuance / theirs.server_cpu_ms_per_issuance
                parts.append(f"CPU/request {name}/cfssl {ratio:.2f}")
        if parts:
            lines.append(f"- {clients} clients: " + "; ".join(parts))
    return lines


def verdict(results: list[LevelResult]) -> list[str]:
    """Issue 13's targets: at 256 clients, kubecertd's server CPU per issuance at most
    cfssl's and its issuances/s at least cfssl's, measured in the same run; no errors."""
    ours = {r.clients: r for r in results if r.server == "kubecertd"}
    theirs = {r.clients: r for r in results if r.server == "cfssl"}
    out = []
    if 256 in ours and 256 in theirs:
        r, c = ours[256], theirs[256]
        cpu, cpu_c = r.server_cpu_ms_per_issuance, c.server_cpu_ms_per_issuance
        rate, rate_c = r.issuances_per_s, c.issuances_per_s
        out.append(
            f"target server CPU/issuance at 256 clients <= cfssl's: {cpu:.3f} ms against "
            f"{cpu_c:.3f} ms -> {'met' if cpu <= cpu_c else 'NOT met'}"
        )
        out.append(
            f"target issuances/s at 256 clients >= cfssl's: {rate:,.0f}/s against "
            f"{rate_c:,.0f}/s -> {'met' if rate >= rate_c else 'NOT met'}"
        )
    elif 256 in ours:
        out.append("targets against cfssl at 256 clients: not judged (cfssl not in this run)")
    errors = sum(r.errors for r in ours.values())
    out.append(f"target no errors: {errors} errors -> {'met' if errors == 0 else 'NOT met'}")
    return out


# --- py-spy summary ---------------------------------------------------------------------------

# (category, substrings of a frame); each sample goes to the first category one of its
# frames matches, innermost frame first, so a socket send inside aiohttp counts as a send.
# pyOpenSSL's connections do their socket I/O inside OpenSSL: it counts as TLS there.
_PYOPENSSL = "(OpenSSL/SSL.py"
PROFILE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle (epoll wait)", ("EpollSelector.select",)),
    ("TLS handshake (OpenSSL: ssl's SSLObject / pyOpenSSL's Connection do_handshake)",
     ("SSLObject.do_handshake", f"do_handshake {_PYOPENSSL}")),
    ("TLS records + shutdown (SSLObject read/write/unwrap; Connection recv/send/shutdown)",
     ("SSLObject.read ", "SSLObject.write ", "SSLObject.unwrap", "SSLObject._create", "wrap_bio",
      *(f"{name} {_PYOPENSSL}" for name in ("recv", "recv_into", "send", "sendall", "shutdown",
                                            "__init__", "set_accept_state")))),
    ("socket syscalls (send, recv, accept, close)",
     ("_SelectorSocketTransport.write ", "_read_ready__get_buffer (asyncio/selector_events.py:970)",
      "socket.accept", "socket._real_close", "_accept_connection ")),
    ("SQLite store.commit", ("signer/store/",)),
    ("journal.send", ("journal.py",)),
    ("prometheus metrics", ("prometheus_client",)),
    ("authenticate (peer cert parse + issued_by)",
     ("peer_certificate", "authenticate (", "issued_by", "_has_eku", "_identity_node")),
    ("policy.decide (CSR parse, key, signature)", ("decide (", "_parse_csr", "_signature_problem",
     "_key_problem", "_extensions_problem", "_kubelet_node", "key_fingerprint")),
    ("build_certificate (builder + ECDSA sign)", ("build_certificate", "random_serial")),
    ("JSON + response body", ("json", "certificate_pem", "serial_hex", "iso (")),
    ("other kubecertd code", ("kubecertd/",)),
    ("aiohttp", ("aiohttp/",)),
    ("h11", ("h11/",)),
    ("event loop: asyncio + SSLProtocol, selectors (pure Python)", ("asyncio/", "selectors.py")),
)  # fmt: skip


def summarize_profiles(paths: Sequence[str]) -> list[tuple[str, float, float]]:
    """(category, % of all samples, % of non-idle samples) over py-spy raw files."""
    counts: dict[str, int] = {}
    for path in paths:
        with open(path) as stream:
            for line in stream:
                stack, _, number = line.rstrip().rpartition(" ")
                if not stack or not number.isdigit():
                    continue
                frames = stack.split(";")[::-1]
                category = "other"
                for frame in frames:
                    hit = next(
                        (name for name, keys in PROFILE_RULES if any(k in frame for k in keys)),
                        None,
                    )
                    if hit:
                        category = hit
                        break
                counts[category] = counts.get(category, 0) + int(number)
    total = sum(counts.values()) or 1
    busy = total - counts.get("idle (epoll wait)", 0) or 1
    order = [name for name, _ in PROFILE_RULES] + ["other"]
    return [
        (name, 100.0 * counts[name] / total,
         0.0 if name.startswith("idle") else 100.0 * counts[name] / busy)
        for name in order if name in counts
    ]  # fmt: skip


def profile_files(directory: str, server: str, clients: int) -> list[str]:
    """The py-spy raw files of ``server`` at ``clients`` (one per process of its tree)."""
    prefix = f"{server}-{clients}-"
    return sorted(
        str(path)
        for path in Path(directory).iterdir()
        if path.name.startswith(prefix) and path.name[len(prefix) : -4].isdigit()
    )


# --- components: the CPU of each step of one issuance, in this process --------------------


def components(work: str, iterations: int) -> list[tuple[str, float]]:
    """Server-side CPU (process_time) per call of each step /v1/sign takes, in ms.

    The same functions the handler calls, on the same kind of input, without the
    network, the event loop or aiohttp: what is left of the load test's CPU/issuance
    once these are subtracted is asyncio, aiohttp and the kernel's socket work.
    """
    import datetime as dt

    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(dir=work))
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from kubecertd import pki
    from kubecertd.signer import app as signer_app
    from kubecertd.signer import metrics, policy
    from kubecertd.signer.authority import load_authority
    from kubecertd.signer.config import read_signer_config
    from kubecertd.signer.store import ISSUED, AuditRecord, Commit, open_store

    material, _keys = make_material(work, 64, 1)
    config = read_signer_config(material.config)
    authority = load_authority(config)
    now = dt.datetime.now(dt.timezone.utc)
    nodes = material.nodes
    identity_keys = [pki.generate_key("ecdsa-p256") for _ in nodes]
    identity_certs = [
        policy.build_certificate(
            authority.identity,
            key.public_key(),
            node,
            policy.IDENTITY,
            dt.timedelta(days=365),
            now,
            policy.random_serial(),
        )
        for node, key in zip(nodes, identity_keys, strict=True)
    ]
    ident_dir = os.path.join(work, "component-identities")
    os.makedirs(ident_dir)
    for node, key, cert in zip(nodes, identity_keys, identity_certs, strict=True):
        Path(ident_dir, f"{node}.pem").write_bytes(pki.certificate_pem(cert))
        Path(ident_dir, f"{node}-key.pem").write_bytes(pki.private_key_pem(key))
    csrs = [csr.encode() for _node, csr in material.csrs]
    bodies = [json.dumps({"csr": csr, "reason": "bench"}).encode() for _n, csr in material.csrs]
    results: list[tuple[str, float]] = []

    def timed(name: str, action: Any, n: int = iterations) -> None:
        action(0)  # warm
        began = time.process_time()
        for i in range(n):
            action(i)
        results.append((name, (time.process_time() - began) / n * 1000))

    # TLS: a full handshake in memory, the server side only, on each TLS library
    clients = [
        client_context(
            material.identity_ca, f"{ident_dir}/{node}.pem", f"{ident_dir}/{node}-key.pem"
        )
        for node in nodes[:8]
    ]
    n_tls = max(100, iterations // 2)

    def stdlib_handshake(server: ssl.SSLContext, label: str) -> None:
        spent = 0.0
        for i in range(n_tls):
            c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
            client = clients[i % len(clients)].wrap_bio(c_in, c_out, server_hostname="localhost")
            began = time.process_time()
            srv = server.wrap_bio(s_in, s_out, server_side=True)
            spent += time.process_time() - began
            done_c = done_s = False
            for _round in range(10):
                if not done_c:
                    with contextlib.suppress(ssl.SSLWantReadError):
                        client.do_handshake()
                        done_c = True
                s_in.write(c_out.read())
                began = time.process_time()
                if not done_s:
                    with contextlib.suppress(ssl.SSLWantReadError):
                        srv.do_handshake()
                        done_s = True
                spent += time.process_time() - began
                c_in.write(s_out.read())
                if done_c and done_s:
                    break
            began = time.process_time()
            srv.write(b"x" * 1500)  # an answer: TLS 1.3 tickets go out by now
            srv.getpeercert(binary_form=True)
            spent += time.process_time() - began
        results.append((label, spent / n_tls * 1000))

    def pyopenssl_handshake(server: Any, label: str) -> None:
        spent = 0.0
        for i in range(n_tls):
            c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            client = clients[i % len(clients)].wrap_bio(c_in, c_out, server_hostname="localhost")
            began = time.process_time()
            srv = SSL.Connection(server, None)  # memory BIOs
            srv.set_accept_state()
            spent += time.process_time() - began
            done_c = done_s = False
            for _round in range(10):
                if not done_c:
                    with contextlib.suppress(ssl.SSLWantReadError):
                        client.do_handshake()
                        done_c = True
                hello = c_out.read()
                began = time.process_time()
                if hello:
                    srv.bio_write(hello)
                if not done_s:
                    with contextlib.suppress(SSL.WantReadError):
                        srv.do_handshake()
                        done_s = True
                answer = _bio_drain(srv)
                spent += time.process_time() - began
                c_in.write(answer)
                if done_c and done_s:
                    break
            began = time.process_time()
            srv.send(b"x" * 1500)
            srv.get_peer_certificate(as_cryptography=True)
            _bio_drain(srv)
            spent += time.process_time() - began
        results.append((label, spent / n_tls * 1000))

    system = " ".join(ssl.OPENSSL_VERSION.split()[:2])
    stdlib_handshake(stdlib_tls_context(config), f"TLS handshake, ssl on {system}")
    no_client = stdlib_tls_context(config)
    no_client.verify_mode = ssl.CERT_NONE
    stdlib_handshake(no_client, f"TLS handshake, ssl on {system}, no client certificate")
    from OpenSSL import SSL

    bundled = " ".join(SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode().split()[:2])
    pyopenssl_handshake(
        pyopenssl_context(config), f"TLS handshake, pyOpenSSL on {bundled} (2 stateful tickets)"
    )
    pyopenssl_handshake(
        pyopenssl_context(config, verify=False),
        f"TLS handshake, pyOpenSSL on {bundled}, no client certificate",
    )

    ders = [pki.certificate_pem(c) for c in identity_certs]
    ders = [x509.load_pem_x509_certificate(p).public_bytes(Encoding.DER) for p in ders]
    cluster_certs = list(authority.cluster_certs)

    def authenticate(i: int) -> None:
        peer = x509.load_der_x509_certificate(ders[i % len(ders)])
        assert policy.authenticate(peer, cluster_certs, authority.identity.cert, now)

    timed("peer certificate + policy.authenticate", authenticate)

    def read_body(i: int) -> None:
        body = json.loads(bodies[i % len(bodies)])
        signer_app.text_field(body, "csr").encode()
        signer_app._clean_reason(signer_app.text_field(body, "reason", required=False, limit=200))

    timed("json.loads + text_field + _clean_reason", read_body)
    identities = [policy.Identity(node, policy.IDENTITY, "1") for node in nodes]
    index_of = {node: i for i, node in enumerate(nodes)}
    owners = [identities[index_of[material.nodes[node]]] for node, _ in material.csrs]
    decisions = []

    def decide(i: int) -> None:
        decision = policy.decide(csrs[i % len(csrs)], owners[i % len(csrs)], policy.KUBELET)
        assert decision.accepted, decision
        if len(decisions) < len(csrs):
            decisions.append(decision)

    timed("policy.decide (CSR parse, key, signature, subject)", decide)
    certs: list[x509.Certificate] = []

    def build(i: int) -> None:
        d = decisions[i % len(decisions)]
        cert = policy.build_certificate(
            authority.cluster, d.public_key, d.node, policy.KUBELET,
            dt.timedelta(days=30), now, policy.random_serial(),
        )  # fmt: skip
        if len(certs) < 64:
            certs.append(cert)

    timed("policy.build_certificate (+ random_serial, ECDSA sign)", build)

    # What no implementation can skip: the floor under decide and build_certificate.
    parsed = [x509.load_pem_x509_csr(pem) for pem in csrs]
    cluster_key = authority.cluster.key
    assert isinstance(cluster_key, ec.EllipticCurvePrivateKey), "the bench's CA is P-256"
    timed(
        "floor: the CSR's signature check alone",
        lambda i: parsed[i % len(parsed)].is_signature_valid,
    )
    timed(
        "floor: one ECDSA P-256 signature alone",
        lambda i: cluster_key.sign(b"%d" % i, ec.ECDSA(hashes.SHA256())),
    )

    def record_for(i: int) -> AuditRecord:
        d = decisions[i % len(decisions)]
        return AuditRecord(
            time=dt.datetime.now(dt.timezone.utc), endpoint="sign", node=d.node,
            identity="identity:1", reason="bench", outcome=ISSUED, code=None,
            message="issued", key_fingerprint=d.key_fingerprint, peer="127.0.0.1",
        )  # fmt: skip

    def with_certificate(record: AuditRecord, cert: Any) -> AuditRecord:
        return dataclasses.replace(
            record,
            serial=pki.serial_hex(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    timed(
        "AuditRecord + its certificate's fields",
        lambda i: with_certificate(record_for(i), certs[i % len(certs)]),
    )
    store = open_store(os.path.join(work, "component-state.db"), "")
    store.open()
    records = [with_certificate(record_for(i), certs[i % len(certs)]) for i in range(64)]
    timed(
        "store.commit, 1 record (SQLite FULL: BEGIN IMMEDIATE, rate-limit query, INSERT, COMMIT)",
        lambda i: store.commit(records[i % len(records)], rate_limit=100_000_000),
    )
    batch = [Commit(record, None, 100_000_000) for record in records[:8]]
    timed(
        "store.commit_many, a group of 8 (divide by 8 for one record's share)",
        lambda i: store.commit_many(batch),
        n=max(1, iterations // 8),
    )
    store.close()
    saved = sys.stderr
    with open(os.path.join(work, "journal.log"), "w") as sys.stderr:  # as the server's log
        timed(
            "journal.send 'issued' (no journald here: stat + a line to stderr)",
            lambda i: signer_app.journal.send(
                "issued",
                f"issued kubelet certificate {i:x} for node n to identity:1 (bench)",
                node="n",
                serial=f"{i:x}",
                not_after="2030-01-01T00:00:00Z",
                identity="identity:1",
                reason="bench",
                endpoint="sign",
            ),
        )
    sys.stderr = saved

    def count(_i: int) -> None:
        metrics.ISSUED.labels("sign").inc()
        metrics.LATENCY.labels("/v1/sign").observe(0.003)

    timed("metrics: ISSUED.inc + LATENCY.observe (multiprocess files)", count)

    def answer(i: int) -> None:
        cert = certs[i % len(certs)]
        signer_app.json_response(
            {
                "certificate": pki.certificate_pem(cert).decode(),
                "ca_bundle": authority.cluster_bundle,
                "serial": pki.serial_hex(cert),
                "not_after": pki.iso(cert.not_valid_after_utc),
            },
            status=201,
        )

    timed("response: certificate_pem + json_response", answer)
    return results


def _bio_drain(tls: Any) -> bytes:
    """Everything a memory-BIO pyOpenSSL connection has to send now."""
    from OpenSSL import SSL

    out = b""
    with contextlib.suppress(SSL.WantReadError):
        while True:
            out += tls.bio_read(65536)
    return out


# --- main ------------------------------------------------------------------------------------


@contextlib.contextmanager
def servers_stopped(servers: list[Server]) -> Iterator[None]:
    """Stop every started server on the way out, also on an error or a signal."""

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per level")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--duration", type=float, help="measured seconds per level (default 10; --quick 3)"
    )
    parser.add_argument(
        "--warmup", type=float, help="seconds before measuring (default 1.5; --quick 0.5)"
    )
    parser.add_argument(
        "--levels", default=",".join(map(str, LEVELS)), help="concurrent clients, comma-separated"
    )
    parser.add_argument(
        "--servers",
        default="kubecertd,cfssl,tls-floor-asyncio,tls-floor",
        help=f"which servers, comma-separated, of: {', '.join(SERVERS)}",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="signer (and floor) worker processes"
    )
    parser.add_argument("--nodes", type=int, help="node identities (default 1024; --quick 128)")
    parser.add_argument("--csrs-per-node", type=int, default=4)
    parser.add_argument(
        "--quiet-pct",
        type=float,
        default=10.0,
        help="before each level, wait until the machine is at most this busy",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=120.0, help="... but at most this many seconds"
    )
    parser.add_argument(
        "--keep", metavar="DIR", help="work in DIR and keep it (default: a temp dir, removed)"
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="after setup, print the ports and wait (for profiling by hand)",
    )
    parser.add_argument(
        "--py-spy", metavar="DIR", help="record py-spy raw profiles of the Python servers here"
    )
    parser.add_argument(
        "--components", type=int, metavar="N",
        help="instead of the load: time each step of an issuance in-process, N times",
    )  # fmt: skip
    parser.add_argument(
        "--patch", default="",
        help="what-if experiments for the Python servers, comma-separated: tickets0 (no "
        "TLS 1.3 session tickets, through OPENSSL_CONF), uvloop (needs uvloop importable, "
        "see --patch-path)",
    )  # fmt: skip
    parser.add_argument(
        "--ab", default="", metavar="VARIANTS",
        help="A/B the signer under --patch variants (none,tickets0,uvloop,tickets0+uvloop), "
        "in interleaved rounds (--rounds) so that drifting machine load hits all alike",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="rounds per variant for --ab")
    parser.add_argument("--patch-path", default="", help="extra PYTHONPATH for --patch")
    parser.add_argument(
        "--summarize", nargs="+", metavar="RAW", help="summarize py-spy raw files and exit"
    )
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument(
        "--floor-server",
        nargs=4,
        metavar=("CONFIG", "PORT", "WORKERS", "NAME"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)
    if args.components:
        sys.path.insert(0, str(REPO))
        with tempfile.TemporaryDirectory(prefix="signer-components-") as work:
            rows = components(work, args.components)
        print("| step of one /v1/sign (server side, in-process) | CPU ms per call |")
        print("| --- | ---: |")
        for name, ms in rows:
            print(f"| {name} | {ms:.3f} |")
        if args.out:
            Path(args.out).write_text(json.dumps(dict(rows), indent=2) + "\n")
        return 0
    if args.summarize:
        print("| where | % of samples | % of non-idle samples |\n| --- | ---: | ---: |")
        for name, share, busy_share in summarize_profiles(args.summarize):
            print(f"| {name} | {share:.1f} | {busy_share:.1f} |")
        return 0
    if args.floor_server:
        config, port, workers, name = args.floor_server
        return floor_server(config, int(port), int(workers), name)

    sys.path.insert(0, str(REPO))
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.5)
    nodes = args.nodes or (128 if args.quick else 1024)
    levels = [int(v) for v in args.levels.split(",") if v]
    wanted = [v for v in args.servers.split(",") if v]
    unknown = sorted(set(wanted) - set(SERVERS))
    if unknown:
        parser.error(f"--servers: unknown {', '.join(unknown)}; known: {', '.join(SERVERS)}")
    work = args.keep or tempfile.mkdtemp(prefix="signer-load-")
    if args.keep:
        os.makedirs(work, exist_ok=True)
    servers: list[Server] = []
    results: list[LevelResult] = []
    try:
        with servers_stopped(servers):
            material, identity_keys = make_material(work, nodes, args.csrs_per_node)
            env = patch_env(work, args.patch, args.patch_path)
            ours = start_signer(material, work, args.workers, env)
            servers.append(ours)
            enroll_all(material, identity_keys, ours.port, work)
            probe = client_context(material.identity_ca, *material.identity_files[0])
            if "cfssl" in wanted:
                servers.append(start_cfssl(material, work, probe))
            for name in FLOORS:
                if name in wanted:
                    servers.append(start_floor(material, work, args.workers, probe, name, env))
            active = [s for s in servers if s.name in wanted]
            variants = [v for v in args.ab.split(",") if v]
            for variant in variants:
                if variant == "none":
                    continue
                extra = start_signer(
                    material, work, args.workers,
                    patch_env(work, variant.replace("+", ","), args.patch_path),
                )  # fmt: skip
                extra.name = f"kubecertd[{variant}]"
                servers.append(extra)
            if variants:  # interleaved rounds of the signer variants only
                active = [s for s in servers if s.name.startswith("kubecertd")]
                if "none" in variants:
                    ours.name = "kubecertd[none]"
                else:
                    active.remove(ours)
            if args.hold:
                for server in active:
                    print(
                        f"{server.name}: port {server.port} pid {server.pid} tree {tree_pids(server.pid)}",
                        flush=True,
                    )
                print(f"work dir {work}; Ctrl-C to stop", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
                return 0
            calibration = [ecdsa_sign_us()]
            prepared = {server.name: build_requests(server, material) for server in active}
            contexts = [  # one per node identity, inherited by the forked clients
                client_context(material.identity_ca, cert, key)
                for cert, key in material.identity_files
            ]
            log(
                f"{len(material.csrs)} CSRs prepared; {duration:g}s per level after {warmup:g}s warm-up"
            )
            for clients in levels:
                for server in active * (args.rounds if variants else 1):
                    busy_before = wait_quiet(args.quiet_pct, args.quiet_wait)
                    if busy_before > args.quiet_pct:
                        log(f"gave up waiting after {args.quiet_wait:g}s: {busy_before:.0f}% busy")
                    result = run_level(
                        server, contexts, prepared[server.name], clients, warmup, duration,
                        args.py_spy, args.native,
                    )  # fmt: skip
                    result.busy_before_pct = busy_before
                    results.append(result)
                    log(
                        f"{server.name:>17} {clients:>4} clients: {result.issuances_per_s:8.1f}/s "
                        f"p50 {result.p50_ms:7.1f} ms p99 {result.p99_ms:7.1f} ms errors {result.errors} "
                        f"server CPU {result.server_cpu_ms_per_issuance:.3f} ms/issuance "
                        f"client CPU {result.client_cpu_ms_per_request:.3f} ms/req, others {result.other_load_pct:.0f}% {result.error_kinds or ''}"
                    )
            notes = {s.name: s.notes for s in servers}
            calibration.append(ecdsa_sign_us())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nMachine: {machine_description()}")
    print(
        f"Each level: {duration:g} s measured after {warmup:g} s warm-up; {CLIENT_PROCESSES} client processes; "
        f"{nodes} node identities, {len(material.csrs)} CSRs; a fresh TLS connection per request.\n"
    )
    print(markdown_table(results))
    print("\n" + quiet_line(results, args.quiet_pct, args.quiet_wait))
    if args.ab:
        print("\n" + ab_table(results))
    print(
        f"\nCalibration: ECDSA P-256 sign {calibration[0]:.0f} us CPU before the run, "
        f"{calibration[1]:.0f} us after (compare runs on the same machine with it)."
    )
    if args.py_spy:
        for level in levels:
            for server in active:
                files = profile_files(args.py_spy, server.name, level)
                if not files:
                    continue
                print(f"\npy-spy, {server.name} at {level} clients (share of non-idle samples):\n")
                print("| where | % |\n| --- | ---: |")
                for where, _share, busy_share in summarize_profiles(files):
                    if busy_share:
                        print(f"| {where} | {busy_share:.1f} |")
    print()
    for line in ratio_lines(results) + verdict(results):
        print(line)
    if args.out:
        payload = {
            "machine": machine_description(),
            "settings": {
                "duration_s": duration,
                "warmup_s": warmup,
                "levels": levels,
                "nodes": nodes,
                "csrs": len(material.csrs),
                "client_processes": CLIENT_PROCESSES,
                "workers": args.workers,
                "quick": args.quick,
            },
            "servers": notes,
            "ecdsa_sign_us": calibration,
            "results": [asdict(r) for r in results],
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.out}")
    return 0 if all(r.errors == 0 for r in results if r.server == "kubecertd") else 1


if __name__ == "__main__":
    sys.exit(main())
