"""One worker's HTTPS server: pyOpenSSL on a selector loop, HTTP/1.1 by h11.

A worker process runs two threads.  The loop thread owns every connection:

- it accepts from the listening socket the workers share, under ``[limits]``: over a
  cap (``listener.refusal``) a connection is reset at once, before any TLS;
- it creates no TLS state before the client's first byte, so an idle flood costs a
  descriptor per connection and nothing more;
- it drives each connection's non-blocking ``SSL.Connection`` straight on the socket
  (OpenSSL reads and writes the descriptor itself).  The handshake verifies a client
  certificate, when one is sent, against the identity and cluster CAs; one that fails
  gets its TLS alert, and the connection is closed gracefully so that the client reads
  the alert before our FIN (a reset would destroy it in flight);
- it parses requests with h11 and runs ``app.Signer.handle`` as a coroutine that it
  resumes by hand: a handler's awaits are the request body (read here) and the store.

The database thread runs the store.  Every audit record waiting when it wakes is
written in one transaction (``Store.commit_many``): one fsync for a group of
issuances, and no handler resumes before its record is durable.  A handler waits for
the store at most ``[limits] database_timeout`` (a commit 1 s more) and then answers 503
``unavailable``; a commit that comes back later was refused by the database itself
(its ``answer_by``), so nothing is recorded as issued to nobody.

Deadlines, one per connection at a time: the handshake (from accept), the first
request's head (from the handshake), a later request's head (keep-alive idle), the
body (from the head), a stalled answer, and the graceful close.  Nothing here logs a
traceback: what a client got wrong is one ``refused`` journal line at most, and loop
errors go through ``listener.ThrottledLog``.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import os
import selectors
import signal
import socket
import threading
import time
import zlib
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any

import h11
from OpenSSL import SSL

from ..edges import journal
from . import listener, metrics
from .app import BODY_TIMEOUT, MAX_BODY, Refusal, Request, Response, Signer, Wait, _one_line, utcnow
from .config import Limits
from .store import Commit, Store, StoreError

KEEPALIVE_TIMEOUT = 15.0  # seconds between an answer and the next request's head
WRITE_TIMEOUT = 10.0  # seconds for a client to take an answer it stopped reading
LINGER_TIMEOUT = 2.0  # seconds a graceful close waits for the client's FIN
STOP_GRACE = 5.0  # seconds a stopping worker lets answers in progress finish
RECV_SIZE = 65536
RECV_ROUNDS = 8  # recv()s per readiness event, so one client cannot hold the loop
MAX_HEAD = 64 * 1024  # bytes of request line and headers
MAX_LINE = 8190  # bytes of the request line or of one header line
MAX_HEADERS = 128

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

# Connection states, in the order a connection goes through them.
WAITING = "waiting"  # accepted; no TLS until the client's first byte
HANDSHAKE = "handshake"
HEAD = "head"  # waiting for a request line and headers
HANDLING = "handling"  # a handler runs (it may wait for the body or the store)
CLOSING = "closing"  # our answer is out; waiting briefly for the client's FIN


class Connection:
    """One client connection and everything the loop knows about it."""

    __slots__ = (
        "body",
        "body_done",
        "body_error",
        "close_after",
        "coro",
        "deadline",
        "encoding",
        "eof",
        "events",
        "http",
        "key",
        "out",
        "remote",
        "request",
        "sock",
        "starting",
        "state",
        "timer",
        "tls",
        "waiting_body",
    )

    def __init__(self, sock: socket.socket, remote: str, key: str) -> None:
        self.sock = sock
        self.remote = remote
        self.key = key  # what the per-address cap counts it by
        self.state = WAITING
        self.tls: SSL.Connection | None = None
        self.http: h11.Connection | None = None
        self.events = 0  # what it is registered for in the selector
        self.deadline = 0.0
        self.timer = ""  # what happens at the deadline ("" = none)
        self.eof = False  # the client has closed its side
        self.starting = False  # a request's head is in; its handler starts once h11 waits
        self.out = bytearray()  # bytes for TLS to send
        self.close_after = False
        self.request: Request | None = None
        self.coro: Coroutine[Wait, Any, Response] | None = None
        self.body = bytearray()
        self.body_done = False
        self.body_error: Refusal | None = None
        self.waiting_body = False
        self.encoding = ""


class Database:
    """The worker's store on a thread of its own, fed by the loop; group commit.

    ``submit`` queues a ``Wait`` of kind "commit" or "call" for a connection; the thread
    takes everything queued, runs the calls, writes all the commits in one transaction,
    and hands the results back through ``done`` and the loop's wake-up pipe.
    """

    def __init__(self, store: Store, wake: Callable[[], None]) -> None:
        self.store = store
        self.wake = wake
        self.queue: collections.deque[tuple[Connection, Wait]] = collections.deque()
        self.done: collections.deque[tuple[Connection, Any, BaseException | None]] = (
            collections.deque()
        )
        self.ready = threading.Condition()
        self.stopping = False
        self.opened: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kubecertd-signer-db", daemon=True)
        self.started = threading.Event()

    def start(self) -> None:
        """Opens the store on the thread; raises what opening raised."""
        self.thread.start()
        self.started.wait()
        if self.opened is not None:
            raise self.opened

    def stop(self) -> None:
        with self.ready:
            self.stopping = True
            self.ready.notify()
        # A call stuck on a frozen database must not hold the worker's exit; every
        # request waiting for it was answered 503 at its deadline.
        self.thread.join(STOP_GRACE)

    def submit(self, conn: Connection, wait: Wait) -> None:
        with self.ready:
            self.queue.append((conn, wait))
            self.ready.notify()

    def _run(self) -> None:
        try:
            self.store.open()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self.opened = exc
            self.started.set()
            return
        self.started.set()
        try:
            while True:
                with self.ready:
                    while not self.queue and not self.stopping:
                        self.ready.wait()
                    if not self.queue:
                        return
                    batch = list(self.queue)
                    self.queue.clear()
                self._serve(batch)
                self.wake()
        finally:
            with contextlib.suppress(Exception):
                self.store.close()

    def _serve(self, batch: list[tuple[Connection, Wait]]) -> None:
        commits = [(conn, wait) for conn, wait in batch if wait.kind == "commit"]
        for conn, wait in batch:
            if wait.kind == "call":
                try:
                    self.done.append((conn, wait.payload(self.store), None))
                except Exception as exc:  # noqa: BLE001 - thrown into the handler
                    self.done.append((conn, None, exc))
        if not commits:
            return
        # A commit queued past its answer_by was answered 503 and could not commit
        # anyway (store.Commit): do not spend a transaction, or its batch, on it.
        now = utcnow()
        late = [(c, w) for c, w in commits if w.payload.answer_by and w.payload.answer_by < now]
        if late:
            gone = StoreError("the state database did not answer in time")
            self.done.extend((conn, None, gone) for conn, _wait in late)
            commits = [item for item in commits if item not in late]
            if not commits:
                return
        items: list[Commit] = [wait.payload for _conn, wait in commits]
        try:
            verdicts = self.store.commit_many(items)
        except Exception as exc:  # noqa: BLE001 - every handler of the batch gets it
            self.done.extend((conn, None, exc) for conn, _wait in commits)
            return
        self.done.extend(
            (conn, verdict, None) for (conn, _wait), verdict in zip(commits, verdicts, strict=True)
        )


class Server:
    """One worker's loop (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        context: SSL.Context,
        signer: Signer,
        store: Store,
        limits: Limits,
        caps: listener.Caps,
        log: listener.ThrottledLog,
    ) -> None:
        self.sock = sock
        self.context = context
        self.signer = signer
        self.limits = limits
        self.caps = caps
        self.log = log
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.db = Database(store, self._wake)
        signer.db.timeout = limits.database_timeout
        self.connections: set[Connection] = set()
        self.by_address: collections.Counter[str] = collections.Counter()
        self.timers: list[tuple[float, int, Connection]] = []
        self.sequence = itertools.count()
        self.stopping = False
        self.accept_paused_until = 0.0
        self.accepting = False

    # -- life ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Opens the store (raising what that raises) and starts listening."""
        self.db.start()
        self.selector.register(self.wake_r, READ, None)
        self.selector.register(self.sock, READ, self.sock)
        self.accepting = True
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)

    def run(self) -> None:
        """Serves until SIGTERM, then lets answers in progress finish (up to STOP_GRACE)."""
        stop_by = 0.0
        while True:
            if self.stopping and not stop_by:
                stop_by = time.monotonic() + STOP_GRACE
                self._stop_accepting()
                for conn in [c for c in self.connections if c.state in (WAITING, HEAD)]:
                    self._close(conn)
            if stop_by and (not self.connections or time.monotonic() > stop_by):
                break
            timeout = self._next_timeout()
            if stop_by:
                timeout = min(timeout if timeout is not None else 1.0, 0.1)
            for key, mask in self.selector.select(timeout):
                if key.data is None:
                    self._drain_wake()
                elif key.data is self.sock:
                    self._accept()
                else:
                    self._ready(key.data, mask)
            self._expire()
            if self.accept_paused_until and time.monotonic() >= self.accept_paused_until:
                self.accept_paused_until = 0.0
                self._start_accepting()
        for conn in list(self.connections):
            self._close(conn)
        self.db.stop()

    def _stop(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self.wake_w, b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        while self.db.done:
            conn, value, error = self.db.done.popleft()
            if conn.timer == "database":
                conn.timer = ""
            if conn.coro is not None and conn in self.connections:
                self._guarded(conn, self._step, conn, value, error)

    # -- accepting ----------------------------------------------------------------------------

    def _start_accepting(self) -> None:
        if not self.accepting and not self.stopping:
            self.selector.register(self.sock, READ, self.sock)
            self.accepting = True

    def _stop_accepting(self) -> None:
        if self.accepting:
            self.selector.unregister(self.sock)
            self.accepting = False

    def _accept(self) -> None:
        for _ in range(listener.ACCEPT_BATCH):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it, or the backlog is empty
            except OSError as exc:
                self._accept_failed(exc)
                return
            key = listener.address_key(address[0])
            reason = listener.refusal(len(self.connections), self.by_address[key], self.caps)
            if reason is not None:
                self._refuse(sock, key, reason)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, address[0], key)
            self.connections.add(conn)
            self.by_address[key] += 1
            metrics.CONNECTIONS_OPEN.inc()
            self._watch(conn, READ)
            self._set_timer(conn, "handshake", self.limits.handshake_timeout)

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in listener.OUT_OF_RESOURCES:
            # Connections wait in the kernel's backlog; accept again after a pause.
            self._stop_accepting()
            self.accept_paused_until = time.monotonic() + listener.ACCEPT_PAUSE
            self.log(
                "accept",
                f"accept() failed: {exc.strerror}; pausing {listener.ACCEPT_PAUSE:.0f}s "
                f"({len(self.connections)} connections open, RLIMIT_NOFILE "
                f"{listener.soft_nofile()}; lower [limits] max_connections or raise LimitNOFILE=)",
            )
        else:  # ECONNABORTED, EPROTO, EPERM (firewall): that connection is gone, not us
            self.log("accept", f"accept() failed: {exc.strerror}")

    def _refuse(self, sock: socket.socket, key: str, reason: str) -> None:
        with contextlib.suppress(OSError):  # the peer is already gone
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, listener.RESET)
        sock.close()
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        self.log(reason, listener.refusal_message(reason, key, self.caps, self.limits))

    # -- the selector and the deadlines -------------------------------------------------------

    def _watch(self, conn: Connection, events: int) -> None:
        if events == conn.events:
            return
        if not conn.events:
            self.selector.register(conn.sock, events, conn)
        elif not events:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def _set_timer(self, conn: Connection, what: str, seconds: float) -> None:
        conn.timer = what
        conn.deadline = time.monotonic() + seconds
        heapq.heappush(self.timers, (conn.deadline, next(self.sequence), conn))

    def _next_timeout(self) -> float | None:
        while self.timers:
            when, _n, conn = self.timers[0]
            if conn.timer and conn.deadline == when and conn in self.connections:
                return max(0.0, when - time.monotonic())
            heapq.heappop(self.timers)  # stale: that deadline was replaced or is gone
        if self.accept_paused_until:
            return max(0.0, self.accept_paused_until - time.monotonic())
        return None

    def _expire(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            when, _n, conn = heapq.heappop(self.timers)
            if not conn.timer or conn.deadline != when or conn not in self.connections:
                continue
            what, conn.timer = conn.timer, ""
            if what in ("handshake", "header", "write"):
                metrics.CONNECTIONS_TIMED_OUT.labels(what).inc()
                self._close(conn, reset=True)
            elif what == "database":
                # No answer in time: 503 (app.Signer.handle), and the connection closes,
                # so the late result finds no handler (Server._drain_wake).
                late = StoreError(
                    "the state database did not answer in time ([limits] database_timeout)"
                )
                if conn.coro is not None:
                    self._guarded(conn, self._step, conn, None, late)
            elif what == "body" and not conn.body_done:
                conn.body_error = Refusal(
                    408,
                    "too-slow",
                    f"request body not received within {BODY_TIMEOUT:g} s",
                    close=True,
                )
                if conn.waiting_body:
                    self._give_body(conn)
            else:  # "idle" (keep-alive) or "linger" (graceful close): nothing wrong
                self._close(conn)

    # -- one connection -----------------------------------------------------------------------

    def _ready(self, conn: Connection, _mask: int) -> None:
        self._guarded(conn, self._on_ready, conn)

    def _guarded(self, conn: Connection, work: Callable[..., None], *args: Any) -> None:
        """``work(*args)`` for ``conn``; an error in it closes that connection, nothing more."""
        try:
            work(*args)
        except Exception as exc:  # noqa: BLE001 - one connection never takes the loop down
            self.log(
                f"loop:{type(exc).__name__}",
                f"connection from {conn.remote} failed: {type(exc).__name__}: {_one_line(str(exc))}",
            )
            self._close(conn, reset=True)

    def _on_ready(self, conn: Connection) -> None:
        if conn.state == WAITING:
            tls = SSL.Connection(self.context, conn.sock)
            tls.set_accept_state()
            conn.tls = tls
            conn.state = HANDSHAKE
        if conn.state == HANDSHAKE:
            self._handshake(conn)
        elif conn.state == CLOSING:
            self._linger(conn)
        else:
            if conn.out:
                self._flush(conn)
            if conn in self.connections and not conn.out:
                self._receive(conn)

    def _handshake(self, conn: Connection) -> None:
        tls = conn.tls
        if tls is None:
            return
        try:
            tls.do_handshake()
        except SSL.WantReadError:
            self._watch(conn, READ)
            return
        except SSL.WantWriteError:
            self._watch(conn, WRITE)
            return
        except SSL.Error:
            # A client certificate that does not verify, no common protocol, not TLS at
            # all, or the peer gone: OpenSSL has sent the alert where it had one.
            self._close_gracefully(conn)
            return
        chain = tls.get_verified_chain(as_cryptography=True)
        peer = issuer = None
        if chain:
            peer = chain[0]
            issuer = chain[1] if len(chain) > 1 else None
        conn.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        conn.request = Request("", "", conn.remote, peer, issuer)
        conn.state = HEAD
        self._set_timer(conn, "header", self.limits.header_timeout)
        self._receive(conn)  # the request may have come with the client's Finished

    def _receive(self, conn: Connection) -> None:
        """Reads what TLS has for us into h11 and acts on it."""
        tls, http = conn.tls, conn.http
        if tls is None or http is None:
            return
        for _ in range(RECV_ROUNDS):
            if conn.out or conn not in self.connections or conn.state == CLOSING:
                return  # answering (_flush watches the socket) or closing (_linger does)
            if not self._reading(conn):
                self._watch(conn, 0)
                return
            try:
                data = tls.recv(RECV_SIZE)
            except SSL.WantReadError:
                self._watch(conn, READ)
                return
            except SSL.WantWriteError:
                self._watch(conn, WRITE)
                return
            except SSL.ZeroReturnError:
                data = b""
            except SSL.Error:
                data = b""  # reset, or a broken TLS record: as good as gone
            conn.eof = not data
            http.receive_data(data)
            self._advance(conn)
            if conn not in self.connections or not data:
                return
        self._watch(conn, READ)  # more later: let the other connections have the loop

    def _reading(self, conn: Connection) -> bool:
        """Whether the loop reads this connection now: for a head, or a body being read."""
        if conn.eof:
            return False
        if conn.state == HEAD:
            return True
        return conn.state == HANDLING and not conn.body_done and conn.body_error is None

    def _advance(self, conn: Connection) -> None:
        """Acts on h11's events until it needs more bytes or an answer is due."""
        http = conn.http
        if http is None:
            return
        while conn in self.connections:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(conn, exc)
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                self._start(conn, event)
            elif isinstance(event, h11.Data):
                if conn.body_error is None:
                    conn.body += event.data
                    if len(conn.body) > MAX_BODY:
                        conn.body_error = _too_large()
                        conn.body.clear()
                        self._body_settled(conn)
            elif isinstance(event, h11.EndOfMessage):
                conn.body_done = True
                if conn.timer == "body":
                    conn.timer = ""
                self._body_settled(conn)
            elif isinstance(event, h11.ConnectionClosed):
                if conn.state == HEAD:
                    self._close(conn)
                break
        if conn.starting and conn in self.connections:
            # The head and whatever body came with it are in: run the handler (a GET
            # is whole by now, so its answer can keep the connection alive).
            conn.starting = False
            self._step(conn, None, None)

    def _start(self, conn: Connection, event: h11.Request) -> None:
        connected = conn.request  # the connection's peer, from the handshake
        if connected is None:
            return
        problem = _head_problem(event)
        if problem is not None:
            status, message = problem
            self._log_bad_request(conn, message)
            self._answer(conn, Response(status, message.encode(), "text/plain", close=True))
            return
        target = event.target.decode("ascii", "replace")
        conn.state = HANDLING
        conn.request = Request(
            event.method.decode("ascii", "replace"),
            _path(target),
            conn.remote,
            connected.peer,
            connected.issuer,
        )
        conn.body.clear()
        conn.body_done = False
        conn.body_error = None
        conn.waiting_body = False
        headers = dict(event.headers)
        conn.encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
        length = headers.get(b"content-length")
        if length is not None and int(length) > MAX_BODY:
            conn.body_error = _too_large()
        self._set_timer(conn, "body", BODY_TIMEOUT)
        conn.coro = self.signer.handle(conn.request)
        conn.starting = True

    def _step(self, conn: Connection, value: Any, error: BaseException | None) -> None:
        """Resumes the connection's handler with ``value`` (or ``error``) until it waits."""
        coro = conn.coro
        if coro is None:
            return
        try:
            wait = coro.throw(error) if error is not None else coro.send(value)
        except StopIteration as done:
            conn.coro = None
            self._answer(conn, done.value)
            return
        if wait.kind == "body":
            conn.waiting_body = True
            if conn.http is not None and conn.http.they_are_waiting_for_100_continue:
                conn.out += conn.http.send(h11.InformationalResponse(status_code=100, headers=[]))
                self._flush(conn)
            self._body_settled(conn)
        else:
            self.db.submit(conn, wait)
            if wait.timeout is not None:
                self._set_timer(conn, "database", wait.timeout)

    def _body_settled(self, conn: Connection) -> None:
        """Gives the body to a handler waiting for it, once it is whole or refused; or,
        when the answer went out before the body came in, goes on to the next request."""
        if not conn.body_done and conn.body_error is None:
            return
        if conn.waiting_body:
            self._give_body(conn)
        elif conn.coro is None and conn.state == HANDLING and not conn.out:
            self._next_request(conn)

    def _give_body(self, conn: Connection) -> None:
        conn.waiting_body = False
        error = conn.body_error
        body = b""
        if error is None:
            try:
                body = _decode(bytes(conn.body), conn.encoding)
            except Refusal as refusal:
                error = refusal
        conn.body.clear()
        if conn.timer == "body":
            conn.timer = ""
        self._step(conn, body, error)

    def _protocol_error(self, conn: Connection, exc: h11.RemoteProtocolError) -> None:
        """A request h11 cannot follow: 400 before any handler, or a body that broke."""
        message = _one_line(str(exc)) or "malformed request"
        if conn.state == HANDLING:
            # The head was fine and a handler runs: its body is what broke (a framing it
            # cannot follow, or the client left before the end).
            conn.body_error = Refusal(
                400, "bad-request", f"request body cannot be read: {message}", close=True
            )
            conn.body.clear()
            self._body_settled(conn)
            return
        if conn.eof:
            self._close(conn)  # the client left halfway through a head: nobody to answer
            return
        self._log_bad_request(conn, message)
        self._answer(
            conn, Response(400, f"bad request: {message}".encode(), "text/plain", close=True)
        )

    def _log_bad_request(self, conn: Connection, message: str) -> None:
        journal.send(
            "refused",
            f"bad request from the client {conn.remote}: {message}",
            journal.WARNING,
            code="bad-request",
        )

    # -- answering ----------------------------------------------------------------------------

    def _answer(self, conn: Connection, response: Response) -> None:
        http = conn.http
        if http is None or conn.tls is None:
            return
        request = conn.request
        close = response.close or conn.body_error is not None
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            if http.our_state is h11.SEND_RESPONSE:
                reason = _phrase(response.status).encode()
                conn.out += http.send(
                    h11.Response(status_code=response.status, headers=headers, reason=reason)
                )
                if request is None or request.method != "HEAD":
                    conn.out += http.send(h11.Data(data=response.body))
                conn.out += http.send(h11.EndOfMessage())
            else:
                # h11 never got to a request (a broken head): write the answer ourselves.
                conn.out += _raw_response(response.status, headers, response.body)
                close = True
        except h11.LocalProtocolError:
            close = True
        conn.close_after = close
        conn.state = HANDLING
        conn.timer = ""
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        tls = conn.tls
        if tls is None:
            return
        while conn.out:
            try:
                sent = tls.send(bytes(conn.out[:16384]))
            except SSL.WantWriteError:
                self._watch(conn, WRITE)
                if conn.timer != "write":
                    self._set_timer(conn, "write", WRITE_TIMEOUT)
                return
            except SSL.WantReadError:
                self._watch(conn, READ)
                return
            except SSL.Error:
                self._close(conn, reset=True)  # the client is gone
                return
            del conn.out[:sent]
        if conn.timer == "write":
            conn.timer = ""
        if conn.coro is None and conn.state == HANDLING:
            self._next_request(conn)

    def _next_request(self, conn: Connection) -> None:
        """After an answer: close, or wait for the next request on a kept-alive connection."""
        http = conn.http
        if conn.close_after or http is None or http.our_state is not h11.DONE:
            self._close_gracefully(conn)
            return
        if http.their_state is h11.SEND_BODY and conn.body_error is None:
            # Answered before the body was in (a 401, a 405): read the rest of it, at
            # most MAX_BODY and within the body's time, so the connection can go on.
            self._set_timer(conn, "idle", BODY_TIMEOUT)
            self._receive(conn)
            return
        if http.their_state is not h11.DONE:
            self._close_gracefully(conn)
            return
        try:
            http.start_next_cycle()
        except h11.LocalProtocolError:
            self._close_gracefully(conn)
            return
        conn.state = HEAD
        self._set_timer(conn, "idle", KEEPALIVE_TIMEOUT)
        self._advance(conn)  # a pipelined request may be waiting in h11 already
        if conn in self.connections and conn.state == HEAD:
            self._receive(conn)

    # -- closing ------------------------------------------------------------------------------

    def _close_gracefully(self, conn: Connection) -> None:
        """close_notify, our FIN, then a short wait for the client's: what we sent last
        (an answer, a TLS alert) reaches the client even if it sent more meanwhile."""
        if conn.tls is not None:
            with contextlib.suppress(SSL.Error):
                conn.tls.shutdown()
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = CLOSING
        if conn.coro is not None:
            conn.coro.close()
            conn.coro = None
        self._watch(conn, READ)
        self._set_timer(conn, "linger", LINGER_TIMEOUT)

    def _linger(self, conn: Connection) -> None:
        try:
            for _ in range(RECV_ROUNDS):
                if not conn.sock.recv(RECV_SIZE):
                    break
            else:
                return  # still sending: wait for the rest, or the deadline
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: Connection, reset: bool = False) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        conn.timer = ""
        if conn.coro is not None:
            conn.coro.close()
            conn.coro = None
        self._watch(conn, 0)
        if reset:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, listener.RESET)
        conn.sock.close()
        self.by_address[conn.key] -= 1
        if self.by_address[conn.key] <= 0:
            del self.by_address[conn.key]
        metrics.CONNECTIONS_OPEN.dec()


# -- pure pieces -----------------------------------------------------------------------------


def _too_large() -> Refusal:
    return Refusal(413, "too-large", f"request body is over {MAX_BODY} bytes", close=True)


def _head_problem(event: h11.Request) -> tuple[int, str] | None:
    """What SPEC refuses in a head that h11 accepts: (status, message), or None."""
    if event.http_version not in (b"1.0", b"1.1"):
        return 400, f"HTTP/{event.http_version.decode('ascii', 'replace')} is not supported"
    if len(event.target) + len(event.method) + 10 > MAX_LINE:
        return 400, f"request line is over {MAX_LINE} bytes"
    if len(event.headers) > MAX_HEADERS:
        return 400, f"more than {MAX_HEADERS} headers"
    for name, value in event.headers:
        if len(name) + len(value) + 2 > MAX_LINE:
            return (
                400,
                f"header line {_one_line(name.decode('latin-1'), 40)} is over {MAX_LINE} bytes",
            )
    expect = [value for name, value in event.headers if name == b"expect"]
    if expect and any(value.lower() != b"100-continue" for value in expect):
        return 417, "Expect is not 100-continue"
    return None


def _path(target: str) -> str:
    from urllib.parse import unquote  # noqa: PLC0415 - rare: only a target with '%' needs it

    path = target.partition("?")[0]
    return unquote(path, errors="replace") if "%" in path else path


def _decode(body: bytes, encoding: str) -> bytes:
    """A body decoded from its Content-Encoding, never larger than MAX_BODY."""
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        # gzip: wbits 16+; deflate: zlib-wrapped as RFC 9110 says, or raw as some send.
        wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
        if encoding == "deflate" and body[:1] and (body[0] & 0x0F) != 8:
            wbits = -zlib.MAX_WBITS
        inflater = zlib.decompressobj(wbits)
        try:
            decoded = inflater.decompress(body, MAX_BODY + 1)
        except zlib.error as exc:
            raise Refusal(
                400, "bad-request", f"request body cannot be decoded: {encoding}: {exc}", close=True
            ) from exc
        if len(decoded) > MAX_BODY or inflater.unconsumed_tail:
            raise _too_large()
        if not inflater.eof:
            raise Refusal(
                400, "bad-request", f"request body cannot be decoded: {encoding}: cut short",
                close=True,
            )  # fmt: skip
        return decoded
    raise Refusal(
        400,
        "bad-request",
        f"request body cannot be decoded: Content-Encoding {_one_line(encoding, 40)!r} is not supported (gzip, deflate)",
        close=True,
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _raw_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_phrase(status)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
