"""Span tracing for the running agent, used by bench/heal_latency.py (phase "traced").

bench/heal_latency.py copies this file into the node and points the agent's unit at it
with a drop-in (``Environment=PYTHONPATH=… KUBECERTD_BENCH_TRACE=1``); kubecertd itself
is not edited. It wraps the functions a heal goes through (the signer round trips and
what http.client and ssl do inside them, key generation, verification, the install and its
fsyncs, the D-Bus calls) and records, per call, its start (CLOCK_REALTIME), wall time,
process CPU time and nesting depth. Nothing is written while a cycle runs: the spans are
buffered and sent as ONE journal entry (``BENCH_KIND=spans``, ``BENCH_SPANS`` = JSON)
when ``Daemon.cycle`` returns, so the measured path pays only two clock reads per call.

Inert without ``KUBECERTD_BENCH_TRACE=1``; any failure to patch leaves the agent as it is.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import time
from typing import Any

_spans: list[tuple[str, int, int, int, int]] = []  # name, start µs, wall µs, cpu µs, depth
_depth = [0]  # calls in progress (one thread; the signer serves one request at a time here)


def _flush() -> None:
    if not _spans:
        return
    payload = json.dumps(_spans, separators=(",", ":"))
    _spans.clear()
    with contextlib.suppress(Exception):  # tracing must never break the agent
        from systemd import journal  # type: ignore[attr-defined]

        journal.send(
            f"bench spans ({payload.count('[') - 1})",
            BENCH_KIND="spans",
            BENCH_SPANS=payload,
            SYSLOG_IDENTIFIER="kubecertd-bench",
        )


def _wrap(
    owner: Any, attr: str, name: str | None = None, label: Any = None, flush: bool = False
) -> None:
    # the class's own entry (to see a staticmethod as such), else the inherited attribute
    raw = vars(owner).get(attr) if isinstance(owner, type) else None
    raw = raw if raw is not None else getattr(owner, attr)
    static = isinstance(raw, staticmethod)
    func = raw.__func__ if static else raw
    base = name or attr

    def done(args: Any, kwargs: Any, start: float, wall: float, cpu: float) -> None:
        _depth[0] -= 1
        span = base
        if label is not None:
            with contextlib.suppress(Exception):
                span = f"{base}:{label(args, kwargs)}"
        _spans.append(
            (
                span,
                int(start * 1e6),
                int((time.perf_counter() - wall) * 1e6),
                int((time.process_time() - cpu) * 1e6),
                _depth[0],
            )
        )
        if flush and _depth[0] == 0:
            _flush()

    if inspect.iscoroutinefunction(func):  # the signer's aiohttp handlers (one request at a time)

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            start, wall, cpu = time.time(), time.perf_counter(), time.process_time()
            _depth[0] += 1
            try:
                return await func(*args, **kwargs)
            finally:
                done(args, kwargs, start, wall, cpu)

    else:

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            start, wall, cpu = time.time(), time.perf_counter(), time.process_time()
            _depth[0] += 1
            try:
                return func(*args, **kwargs)
            finally:
                done(args, kwargs, start, wall, cpu)

    setattr(owner, attr, staticmethod(wrapper) if static else wrapper)


def _member(message: Any) -> str:
    from jeepney.low_level import HeaderFields

    return str(message.header.fields.get(HeaderFields.member, "?"))


def _install() -> None:
    import http.client
    import ssl

    from jeepney.io import blocking

    from kubecertd import daemon, heal, pki
    from kubecertd.edges import client, install, journal, units

    # the daemon's cycle (flushes the buffer when the outermost call returns)
    _wrap(daemon.Daemon, "cycle", "Daemon.cycle", label=lambda a, k: a[1], flush=True)
    _wrap(daemon.Daemon, "_on_changes", "Daemon._on_changes")
    _wrap(daemon.Daemon, "diagnose_now", "Daemon.diagnose_now")
    _wrap(daemon.Daemon, "_log_check", "Daemon._log_check")
    _wrap(daemon.Daemon, "_report", "Daemon._report")
    _wrap(daemon.Daemon, "_renew_identity", "Daemon._renew_identity")
    _wrap(daemon, "notify", "sd_notify")
    _wrap(journal, "send", "journal.send", label=lambda a, k: a[0])
    # healing, SPEC steps 1-6
    _wrap(heal.Healer, "heal", "Healer.heal")
    _wrap(heal.Healer, "_identity", "Healer._identity")
    _wrap(heal.Healer, "_verify", "Healer._verify")
    _wrap(heal.Healer, "_install", "Healer._install")
    _wrap(heal.Healer, "restart_kubelet", "Healer.restart_kubelet")
    _wrap(heal.Healer, "_settled", "Healer._settled")
    _wrap(heal, "load_restarts", "load_restarts")
    _wrap(heal, "save_restarts", "save_restarts")
    _wrap(pki, "generate_key", "pki.generate_key")
    _wrap(pki, "build_csr", "pki.build_csr")
    _wrap(pki, "private_key_pem", "pki.private_key_pem")
    # the signer round trips and what http.client/ssl do in them
    _wrap(client.HttpSignerClient, "fetch_ca", "signer.fetch_ca")
    _wrap(client.HttpSignerClient, "sign", "signer.sign")
    _wrap(client.HttpSignerClient, "_context", "tls.context")  # built once per identity
    _wrap(ssl.SSLContext, "load_verify_locations", "tls.load_verify_locations")
    _wrap(ssl.SSLContext, "load_cert_chain", "tls.load_cert_chain")
    # HTTPSConnection.connect: TCP (HTTPConnection.connect), then the handshake in wrap_socket
    _wrap(http.client.HTTPConnection, "connect", "tcp.connect")
    _wrap(ssl.SSLContext, "wrap_socket", "tls.handshake")
    _wrap(
        http.client.HTTPConnection, "getresponse", "http.getresponse",
        label=lambda a, k: a[0]._method,
    )  # fmt: skip
    # the install and its fsyncs
    _wrap(install, "write_file", "install.write_file")
    _wrap(install, "fsync_dir", "install.fsync_dir")
    _wrap(install, "_backup", "install._backup")
    _wrap(install, "recover", "install.recover")
    _wrap(install, "prune_backups", "install.prune_backups")
    _wrap(install, "_write_intent", "install._write_intent")
    _wrap(install, "_finish", "install._finish")
    _wrap(install, "_remove_intent", "install._remove_intent")
    _wrap(os, "fsync", "os.fsync")
    # D-Bus
    _wrap(units.DbusUnitManager, "restart", "dbus.restart")
    _wrap(units.DbusUnitManager, "active_state", "dbus.active_state")
    _wrap(units.DbusUnitManager, "main_pid", "dbus.main_pid")
    _wrap(units.DbusUnitManager, "_connect", "dbus.connect")
    _wrap(
        blocking.DBusConnection, "send_and_get_reply", "dbus.call", label=lambda a, k: _member(a[1])
    )
    _wrap(blocking.DBusConnection, "recv_until_filtered", "dbus.wait_JobRemoved")
    # Since layouts, kubelet facts and the witness (each may be missing in an older agent)
    for args in (
        (
            daemon,
            "observe",
            "evidence.observe",
        ),  # kubelet's journal lines when a finding is an error
        ("kubecertd.edges.kubelet_log", "recent_lines", "kubelet_log.recent_lines"),
        (heal.Healer, "restart_decision", "Healer.restart_decision"),
        (heal, "kubelet_version", "kubelet_version"),
        (heal.Healer, "_no_failure_since", "Healer._no_failure_since"),
        (daemon.Daemon, "_on_witness", "Daemon._on_witness"),
        (daemon.Daemon, "explain", "Daemon.explain"),
        (daemon, "replace_file", "daemon.replace_file"),  # the witness's state file
        ("kubecertd.edges.fanotify", "Witness.read", "Witness.read"),
        ("kubecertd.edges.fanotify", "Witness.rearm", "Witness.rearm"),
        ("kubecertd.edges.culprit_proc", "Attributor.capture", "Attributor.capture"),
    ):
        with contextlib.suppress(Exception):
            owner, attr, name = args
            if isinstance(owner, str):
                import importlib

                owner = importlib.import_module(owner)
                *path, attr = attr.split(".")
                for part in path:
                    owner = getattr(owner, part)
            _wrap(owner, attr, name)


def _install_signer() -> None:
    from kubecertd.edges import journal
    from kubecertd.signer import app, policy
    from kubecertd.signer.store import sqlite

    for handler in ("get_ca", "post_sign"):
        _wrap(app, handler, f"signer.{handler}", flush=True)
    _wrap(app, "require_identity", "signer.require_identity")
    _wrap(app, "read_json", "signer.read_json")
    _wrap(app, "issue", "signer.issue")
    _wrap(policy, "decide", "policy.decide")
    _wrap(policy, "build_certificate", "policy.build_certificate")
    _wrap(sqlite.SqliteStore, "commit", "store.commit")
    _wrap(journal, "send", "journal.send", label=lambda a, k: a[0])


_MODE = os.environ.get("KUBECERTD_BENCH_TRACE")
if _MODE in ("1", "signer"):
    with contextlib.suppress(Exception):  # tracing must never break the agent
        _install() if _MODE == "1" else _install_signer()
