"""``kubecertd-signer serve``: HTTPS with client certificates, N worker processes.

The parent binds the listening socket once and forks ``workers`` children that all
accept on it (the kernel spreads connections), so every core does TLS handshakes and
signatures.  The parent tells systemd READY=1 once every child is serving, forwards
SIGTERM, and exits non-zero if a child dies on its own (``Restart=on-failure``).  Each
worker is a ``server.Server``: TLS by pyOpenSSL on the OpenSSL that cryptography
bundles, HTTP/1.1 by h11, ``[limits]`` caps and deadlines on every connection.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from OpenSSL import SSL

from ..edges.sdnotify import notify
from ..errors import ConfigError, KubecertdError
from .authority import Authority, load_authority
from .config import SignerConfig, split_listen

READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class ServeOptions:
    listen: str
    workers: int


def tls_context(config: SignerConfig) -> SSL.Context:
    """TLS 1.2+, our serving certificate; client certificates optional but verified.

    VERIFY_PEER without FAIL_IF_NO_PEER_CERT: /v1/ca and /v1/enroll need none, but a
    certificate that is presented and fails verification (unknown CA, expired) fails
    the handshake with an alert.  Which CA a valid one must come from is judged per
    request by the policy, from the chain the handshake verified.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    try:
        context.use_certificate_chain_file(config.tls.cert)
        context.use_privatekey_file(config.tls.key)
        context.check_privatekey()
    except SSL.Error as exc:
        raise ConfigError(
            f"{config.tls.cert}: cannot load the signer's TLS certificate and key ({_ssl_reason(exc)})"
        ) from exc
    for ca in (config.identity_ca.cert, config.cluster_ca.cert):
        try:
            context.load_verify_locations(ca)
        except SSL.Error as exc:
            raise ConfigError(f"{ca}: cannot load as a trust anchor ({_ssl_reason(exc)})") from exc
    context.set_verify(SSL.VERIFY_PEER)  # no callback: OpenSSL's own chain verification
    # No session resumption: agents open a connection per request and never resume.
    # OpenSSL still sends TLS 1.3 tickets without a cache (no binding exposes
    # SSL_CTX_set_num_tickets), but with OP_NO_TICKET they are stateful ids, not the
    # encrypted tickets that cost ~22% of the signer's CPU per issuance (BENCHMARKS.md).
    context.set_options(
        SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def _ssl_reason(exc: SSL.Error) -> str:
    """OpenSSL's error queue, which pyOpenSSL hands over as (library, function, reason)."""
    queue = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    return "; ".join(str(entry[-1]) for entry in queue if isinstance(entry, tuple)) or str(exc)


def bind(listen: str) -> socket.socket:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise KubecertdError(f"cannot listen on {listen}: {exc.strerror}") from exc
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def serve(config: SignerConfig, options: ServeOptions) -> int:
    authority = load_authority(config)  # bad CA files fail here, before anything listens
    context = tls_context(config)
    sock = bind(options.listen)
    if options.workers == 1:
        return _worker(config, authority, context, sock, ready_fd=None)
    # Counters shared by all workers, so that a scrape of any one is the whole signer;
    # set before kubecertd.signer.metrics is first imported (in the workers).
    metrics_dir = tempfile.mkdtemp(prefix="kubecertd-signer-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _supervise(config, authority, context, sock, options.workers)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(
    config: SignerConfig,
    authority: Authority,
    context: SSL.Context,
    sock: socket.socket,
    workers: int,
) -> int:
    read_end, write_end = os.pipe()
    children: set[int] = set()
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the child: serve until SIGTERM, never return into the parent's code
            os.close(read_end)
            status = 1
            try:
                status = _worker(config, authority, context, sock, ready_fd=write_end)
            finally:
                os._exit(status)
        children.add(pid)
    os.close(write_end)
    sock.close()
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        notify("STOPPING=1")
        for child in children:
            _kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if _wait_ready(read_end, workers):
        notify("READY=1", f"STATUS=serving with {workers} workers")
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        children.discard(pid)
        if not stopping:  # a worker died on its own: take the rest down, let systemd restart us
            print(f"kubecertd-signer: worker {pid} exited ({code}); stopping", file=sys.stderr)
            status = 1
            stop(signal.SIGTERM, None)
    return status


def _wait_ready(read_end: int, workers: int) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    seen = 0
    while seen < workers and time.monotonic() < deadline:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            chunk = os.read(read_end, 64)
            if not chunk:
                return False
            seen += len(chunk)
    return seen >= workers


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, signum)


def _worker(
    config: SignerConfig,
    authority: Authority,
    context: SSL.Context,
    sock: socket.socket,
    ready_fd: int | None,
) -> int:
    from . import listener  # noqa: PLC0415 - imports the metrics
    from .app import Signer  # noqa: PLC0415 - after PROMETHEUS_MULTIPROC_DIR is set
    from .server import Server  # noqa: PLC0415
    from .store import open_store  # noqa: PLC0415

    log = listener.ThrottledLog()
    caps = listener.connection_caps(config.limits, listener.soft_nofile())
    if caps.connections < config.limits.max_connections:
        note = listener.max_connections_note(config.limits, caps)
        print(f"kubecertd-signer: worker {os.getpid()}: {note}", file=sys.stderr)
    server = Server(
        sock,
        context,
        Signer(authority, config.policy),
        open_store(config.state, config.database_url),
        config.limits,
        caps,
        log,
    )
    server.open()  # the store opens here: a database that is not there fails the start
    if ready_fd is None:
        notify("READY=1", f"STATUS=serving on {sock.getsockname()[0]}:{sock.getsockname()[1]}")
    else:
        os.write(ready_fd, b".")
        os.close(ready_fd)
    server.run()
    if ready_fd is None:
        notify("STOPPING=1")
    return 0
