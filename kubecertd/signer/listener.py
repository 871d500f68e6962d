"""Accepting connections: caps per worker and per address, handshake and header timeouts.

``loop.create_server`` accepts whatever arrives until the process runs out of file
descriptors, then logs a traceback for every ``accept()`` that fails with EMFILE; and a
client that connects and sends nothing keeps its descriptor for asyncio's default 60 s
handshake timeout, so a few thousand idle connections took a worker down.  Each worker
therefore accepts on the shared listening socket itself:

- a connection over ``[limits] max_connections`` or ``max_connections_per_address``
  (counted in this worker, an IPv6 client by its /64) is closed at once with a reset,
  before any TLS work; the cap is also kept below the worker's RLIMIT_NOFILE, so
  ``accept()`` never meets EMFILE from connections we hold;
- the TLS handshake must finish within ``handshake_timeout`` (from accept), and the
  first request's line and headers must arrive within ``header_timeout`` after it
  (aiohttp's keep-alive timer bounds later requests; app.py bounds bodies);
- nothing here logs a traceback: refusals and accept errors are one line per kind per
  ``LOG_INTERVAL``, counted in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import resource
import socket
import ssl
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from . import metrics
from .config import Limits

# Descriptors a worker keeps for itself: stdio, the listening socket, epoll, the
# self-pipe, SQLite and its -wal/-shm, PostgreSQL, metrics files, the journal, urandom.
# An idle worker holds about 20 (ls /proc/PID/fd); the rest is headroom.
FD_RESERVE = 64
ACCEPT_BATCH = 32  # accept()s per wake-up, so that one worker does not take a whole burst
ACCEPT_PAUSE = 1.0  # seconds without accept() after EMFILE/ENFILE/ENOBUFS/ENOMEM, as asyncio
LOG_INTERVAL = 10.0  # seconds between two log lines of one kind
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, leaves no TIME_WAIT

ProtocolFactory = Callable[[], asyncio.Protocol]


class Caps(NamedTuple):
    """How many connections one worker holds: in all, and from one address."""

    connections: int
    per_address: int


def connection_caps(limits: Limits, nofile: int) -> Caps:
    """Pure: ``[limits]`` capped by what a soft RLIMIT_NOFILE of ``nofile`` leaves room for."""
    if nofile < 0:  # RLIM_INFINITY
        nofile = sys.maxsize
    connections = max(1, min(limits.max_connections, nofile - FD_RESERVE))
    return Caps(connections, min(limits.max_connections_per_address, connections))


def refusal(open_total: int, open_from_address: int, caps: Caps) -> str | None:
    """Pure: the cap a new connection would exceed (its metric reason), or None to accept."""
    if open_total >= caps.connections:
        return "max-connections"
    if open_from_address >= caps.per_address:
        return "max-connections-per-address"
    return None


def refusal_message(reason: str, key: str, caps: Caps, limits: Limits) -> str:
    """The log line for a refused connection: which cap, and which setting sets it."""
    if reason == "max-connections-per-address":
        return (
            f"refused a connection from {key}: it has {caps.per_address} open in this worker "
            f"([limits] max_connections_per_address = {limits.max_connections_per_address})"
        )
    return (
        f"refused a connection: {caps.connections} open in this worker "
        f"({max_connections_note(limits, caps)})"
    )


def max_connections_note(limits: Limits, caps: Caps) -> str:
    """``[limits] max_connections = N``, and whether the file limit lowered it."""
    note = f"[limits] max_connections = {limits.max_connections}"
    if caps.connections < limits.max_connections:
        note += (
            f", lowered to {caps.connections} by RLIMIT_NOFILE {soft_nofile()}: raise LimitNOFILE="
        )
    return note


def address_key(host: str) -> str:
    """What the per-address cap counts by: the IPv4 address, or an IPv6 client's /64."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def soft_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ThrottledLog:
    """At most one stderr line per kind of event per interval; the rest are counted.

    The next line of that kind says how many were left out, so a flood costs the
    journal one line every ``interval`` seconds and no information about its size.
    """

    def __init__(
        self,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], object] | None = None,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self._last: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def __call__(self, kind: str, message: str) -> None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        more = f" ({skipped} more like it since the last such line)" if skipped else ""
        self.write(f"kubecertd-signer: {message}{more}")


class Listener:
    """One worker's accept loop on the shared listening socket (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: ProtocolFactory,
        context: ssl.SSLContext,
        limits: Limits,
        caps: Caps,
        log: ThrottledLog,
    ) -> None:
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.context = context
        self.limits = limits
        self.caps = caps
        self.log = log
        self.open = 0
        self.by_address: Counter[str] = Counter()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._paused: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._accept)

    async def close(self) -> None:
        """Stop accepting and drop handshakes in progress (aiohttp closes the rest)."""
        if self._paused is not None:
            self._paused.cancel()
        self._loop.remove_reader(self.sock.fileno())
        for task in self._handshakes:
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it, or the backlog is empty
            except OSError as exc:
                self._accept_failed(exc)
                return
            key = address_key(peer[0])
            reason = refusal(self.open, self.by_address[key], self.caps)
            if reason is not None:
                self._refuse(conn, key, reason)
                continue
            self._admit(conn, key)

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in _OUT_OF_RESOURCES:
            # Connections wait in the kernel's backlog; accept again after a pause.
            self._loop.remove_reader(self.sock.fileno())
            self._paused = self._loop.call_later(ACCEPT_PAUSE, self._resume)
            self.log(
                "accept",
                f"accept() failed: {exc.strerror}; pausing {ACCEPT_PAUSE:.0f}s "
                f"({self.open} connections open, RLIMIT_NOFILE {soft_nofile()}; "
                "lower [limits] max_connections or raise LimitNOFILE=)",
            )
        else:  # ECONNABORTED, EPROTO, EPERM (firewall): that connection is gone, not us
            self.log("accept", f"accept() failed: {exc.strerror}")

    def _resume(self) -> None:
        self._paused = None
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def _refuse(self, conn: socket.socket, key: str, reason: str) -> None:
        with contextlib.suppress(OSError):  # the peer is already gone
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        conn.close()
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        self.log(reason, refusal_message(reason, key, self.caps, self.limits))

    def _admit(self, conn: socket.socket, key: str) -> None:
        self.open += 1
        self.by_address[key] += 1
        metrics.CONNECTIONS_OPEN.inc()
        slot = _Slot(self, key)
        task = self._loop.create_task(self._handshake(conn, slot))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _release(self, key: str) -> None:
        self.open -= 1
        self.by_address[key] -= 1
        if self.by_address[key] <= 0:
            del self.by_address[key]
        metrics.CONNECTIONS_OPEN.dec()

    async def _handshake(self, conn: socket.socket, slot: _Slot) -> None:
        deadline = self._loop.time() + self.limits.handshake_timeout

        def protocol() -> asyncio.Protocol:
            return _Guarded(self.protocol_factory(), slot, self.limits.header_timeout)

        try:
            # No TLS state before the client speaks: asyncio's SSLProtocol allocates a
            # 256 KiB read buffer per connection, and an idle flood would pay it for each.
            if not await self._readable(conn, deadline) or self._loop.time() >= deadline:
                metrics.CONNECTIONS_TIMED_OUT.labels("handshake").inc()
                conn.close()
                slot.release()
                return
            await self._loop.connect_accepted_socket(
                protocol, conn, ssl=self.context, ssl_handshake_timeout=deadline - self._loop.time()
            )
        except OSError:
            # Too slow, reset, or a TLS alert (unknown CA, expired client certificate):
            # the client's problem; the transport has closed the socket.
            if self._loop.time() >= deadline:
                metrics.CONNECTIONS_TIMED_OUT.labels("handshake").inc()
            conn.close()
            slot.release()
        except BaseException:  # cancelled at shutdown
            conn.close()
            slot.release()
            raise

    async def _readable(self, conn: socket.socket, deadline: float) -> bool:
        """Wait until ``conn`` has bytes (or EOF) to read: True, or False at ``deadline``."""
        waiter: asyncio.Future[bool] = self._loop.create_future()
        fd = conn.fileno()
        self._loop.add_reader(fd, _resolve, waiter, True)
        timer = self._loop.call_at(deadline, _resolve, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._loop.remove_reader(fd)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


class _Slot:
    """One admitted connection's place in the counts, given back exactly once."""

    __slots__ = ("key", "listener")

    def __init__(self, listener: Listener, key: str) -> None:
        self.listener: Listener | None = listener
        self.key = key

    def release(self) -> None:
        if self.listener is not None:
            self.listener._release(self.key)
            self.listener = None


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol, closed when the first request's head is late; frees its slot.

    The head ends at the first empty line (CRLF CRLF, or LF LF as lenient parsers take
    it); only the bytes before it are looked at, once per connection.
    """

    __slots__ = ("inner", "slot", "tail", "timeout", "timer", "transport")

    def __init__(self, inner: asyncio.Protocol, slot: _Slot, timeout: float) -> None:
        self.inner = inner
        self.slot = slot
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream's
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self._late)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            seen = self.tail + data
            if b"\n\r\n" in seen or b"\n\n" in seen:
                self.timer.cancel()
                self.timer = None
                self.tail = b""
            else:
                self.tail = seen[-2:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.slot.release()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _late(self) -> None:
        self.timer = None
        metrics.CONNECTIONS_TIMED_OUT.labels("header").inc()
        if self.transport is not None:
            self.transport.abort()


def exception_handler(
    log: ThrottledLog,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """A loop exception handler that logs one line per kind, never a traceback."""

    def handle(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "unexpected error")
        exc = context.get("exception")
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        log(f"loop:{message}", f"{message}{detail}")

    return handle
