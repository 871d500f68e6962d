"""``kubecertd-signer serve``: HTTPS with client certificates, N worker processes.

The parent binds the listening socket once and forks ``workers`` children that all
accept on it (the kernel spreads connections), so every core does TLS handshakes and
signatures.  The parent tells systemd READY=1 once every child is serving, forwards
SIGTERM, and exits non-zero if a child dies on its own (``Restart=on-failure``).  Each
worker accepts through ``listener.Listener``: ``[limits]`` caps its connections below
its file limit and closes the ones that send too little in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import cast

from ..edges.sdnotify import notify
from ..errors import ConfigError, KubecertdError
from .authority import Authority, load_authority
from .config import SignerConfig, split_listen

READY_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 15.0  # between requests on one connection (agents open one per request)


@dataclass(frozen=True)
class ServeOptions:
    listen: str
    workers: int


def tls_context(config: SignerConfig) -> ssl.SSLContext:
    """TLS 1.2+, our serving certificate; client certificates optional but verified.

    CERT_OPTIONAL: /v1/ca and /v1/enroll need none, but a certificate that is
    presented and fails verification (unknown CA, expired) fails the handshake.
    Which CA a valid one must come from is judged per request by the policy.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{config.tls.cert}: cannot load the signer's TLS certificate and key ({exc})"
        ) from exc
    for ca in (config.identity_ca.cert, config.cluster_ca.cert):
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{ca}: cannot load as a trust anchor ({exc})") from exc
    context.verify_mode = ssl.CERT_OPTIONAL
    # No session tickets: agents open a connection per request and never resume, and
    # OpenSSL's two TLS 1.3 tickets per handshake cost ~22% of the signer's CPU per
    # issuance (BENCHMARKS.md, "Signer load").
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    return context


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
        return asyncio.run(_worker(config, authority, context, sock, ready_fd=None))
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
    context: ssl.SSLContext,
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
                status = asyncio.run(_worker(config, authority, context, sock, ready_fd=write_end))
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


async def _worker(
    config: SignerConfig,
    authority: Authority,
    context: ssl.SSLContext,
    sock: socket.socket,
    ready_fd: int | None,
) -> int:
    from aiohttp import web  # noqa: PLC0415

    from . import listener  # noqa: PLC0415 - imports the metrics
    from .app import create_app, http_logger  # noqa: PLC0415 - after PROMETHEUS_MULTIPROC_DIR is set
    from .store import open_store  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    log = listener.ThrottledLog()
    loop.set_exception_handler(listener.exception_handler(log))
    caps = listener.connection_caps(config.limits, listener.soft_nofile())
    if caps.connections < config.limits.max_connections:
        note = listener.max_connections_note(config.limits, caps)
        print(f"kubecertd-signer: worker {os.getpid()}: {note}", file=sys.stderr)
    app = create_app(authority, open_store(config.state, config.database_url), config.policy)
    runner = web.AppRunner(
        app,
        access_log=None,
        logger=http_logger(),  # a request aiohttp cannot parse: one line, never a traceback
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        handle_signals=False,
    )
    await runner.setup()
    server = cast(web.Server, runner.server)  # set by setup(); a protocol factory
    accepting = listener.Listener(sock, server, context, config.limits, caps, log)
    accepting.start()
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    if ready_fd is None:
        notify("READY=1", f"STATUS=serving on {sock.getsockname()[0]}:{sock.getsockname()[1]}")
    else:
        os.write(ready_fd, b".")
        os.close(ready_fd)
    await stopped.wait()
    if ready_fd is None:
        notify("STOPPING=1")
    await accepting.close()
    await runner.cleanup()
    return 0
