#!/usr/bin/env python3
"""A TCP proxy that misbehaves on demand, for tests: between the agent and the signer.

It passes TLS through untouched (the agent still checks the signer's certificate and
the signer the agent's), so it sees only the TLS record layer: a 5-byte header (content
type, version, length) before each encrypted record.  That is enough to find "an
answer": once the client has sent its first application-data record (type 23), the
server has sent its whole handshake flight, and every later server record of type 23
longer than ``TICKET`` bytes is an HTTP answer (the signer writes each answer, headers
and body, as one record; its TLS 1.3 session tickets are shorter).

The mode is read from ``--mode-file`` for each new connection (missing or empty: pass):

- ``pass``: bytes go through as they come.
- ``slow CHUNK INTERVAL``: a slow reader and a slow writer on either side: CHUNK bytes
  at most are read from each side, and written to the other, every INTERVAL seconds.
- ``truncate N``: the connection's N-th answer is cut in the middle (its first half is
  sent), then the connection is closed (FIN).
- ``reset N``: the same, then the connection is reset (RST: SO_LINGER 0).

Every connection lasts at most ``--max-seconds``.  One line per connection on stderr
says what was done, e.g. ``fault-proxy: connection 3 (truncate 2): cut answer 2 (1902
bytes) after 951 bytes, closed``.
"""

from __future__ import annotations

import argparse
import select
import socket
import struct
import sys
import threading
import time
from typing import NamedTuple

APPLICATION_DATA = 23
TICKET = 200  # bytes: a record of the server longer than this after the handshake is an answer
HEADER = 5


class Mode(NamedTuple):
    name: str  # pass, slow, truncate, reset
    chunk: int = 0  # slow: bytes per step
    interval: float = 0.0  # slow: seconds per step
    answer: int = 0  # truncate, reset: which answer of the connection is cut (from 1)

    def __str__(self) -> str:
        if self.name == "slow":
            return f"slow {self.chunk} {self.interval:g}"
        return f"{self.name} {self.answer}" if self.answer else self.name


def parse_mode(text: str) -> Mode:
    """The mode file's words; ValueError naming what is wrong."""
    words = text.split()
    if not words or words == ["pass"]:
        return Mode("pass")
    if words[0] == "slow" and len(words) == 3:
        chunk, interval = int(words[1]), float(words[2])
        if chunk < 1 or not 0 < interval <= 10:
            raise ValueError(f"slow {chunk} {interval}: want CHUNK >= 1 and 0 < INTERVAL <= 10")
        return Mode("slow", chunk=chunk, interval=interval)
    if words[0] in ("truncate", "reset") and len(words) in (1, 2):
        answer = int(words[1]) if len(words) == 2 else 1
        if answer < 1:
            raise ValueError(f"{words[0]} {answer}: the answer number counts from 1")
        return Mode(words[0], answer=answer)
    raise ValueError(f"{text.strip()!r}: not pass, slow CHUNK INTERVAL, truncate N or reset N")


def read_mode(path: str) -> Mode:
    try:
        with open(path, encoding="utf-8") as stream:
            return parse_mode(stream.read())
    except FileNotFoundError:
        return Mode("pass")
    except (OSError, ValueError) as exc:
        log(f"{path}: {exc}; passing bytes through")
        return Mode("pass")


def log(message: str) -> None:
    print(f"fault-proxy: {message}", file=sys.stderr, flush=True)


class Records:
    """Splits one direction's bytes into whole TLS records."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        records = []
        while len(self.buffer) >= HEADER:
            (length,) = struct.unpack("!H", self.buffer[3:5])
            if len(self.buffer) < HEADER + length:
                break
            records.append(self.buffer[: HEADER + length])
            self.buffer = self.buffer[HEADER + length :]
        return records


class Relay:
    """One connection, start to end: what it forwards, cuts or slows down."""

    def __init__(self, number: int, client: socket.socket, server: socket.socket, mode: Mode):
        self.number, self.client, self.server, self.mode = number, client, server, mode
        self.to_client, self.to_server = Records(), Records()
        self.client_spoke = False  # the client has sent application data: handshake over
        self.answers = 0
        self.sent = {"to client": 0, "to server": 0}
        self.outcome = ""  # set when the connection is to end

    def run(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        peers = {self.client: self.server, self.server: self.client}
        size = self.mode.chunk if self.mode.name == "slow" else 65536
        try:
            while not self.outcome and time.monotonic() < deadline:
                wait = min(1.0, deadline - time.monotonic())
                readable, _, _ = select.select(list(peers), [], [], wait)
                for source in readable:
                    data = source.recv(size)
                    if not data:
                        side = "client" if source is self.client else "server"
                        self.outcome = f"closed by the {side}"
                        break
                    self.forward(source is self.client, data)
                    if self.outcome:
                        break
                if self.mode.name == "slow":
                    time.sleep(self.mode.interval)
            self.outcome = self.outcome or f"ended after {limit:g} s (--max-seconds)"
        except OSError as exc:
            self.outcome = f"ended: {exc.strerror or exc}"
        finally:
            self.client.close()
            self.server.close()
            log(
                f"connection {self.number} ({self.mode}): {self.outcome}; {self.sent['to server']} "
                f"bytes to the server, {self.sent['to client']} to the client"
            )

    def forward(self, from_client: bool, data: bytes) -> None:
        if self.mode.name in ("pass", "slow"):
            self.send(from_client, data)
            return
        if from_client:
            for record in self.to_server.feed(data):
                self.client_spoke = self.client_spoke or record[0] == APPLICATION_DATA
                self.send(True, record)
            return
        for record in self.to_client.feed(data):
            if self.client_spoke and record[0] == APPLICATION_DATA and len(record) > TICKET:
                self.answers += 1
                if self.answers == self.mode.answer:
                    self.cut(record)
                    return
            self.send(False, record)

    def send(self, from_client: bool, data: bytes) -> None:
        (self.server if from_client else self.client).sendall(data)
        self.sent["to server" if from_client else "to client"] += len(data)

    def cut(self, record: bytes) -> None:
        """Half of ``record`` to the client, then a close (FIN), or a reset (RST)."""
        half = len(record) // 2
        self.send(False, record[:half])
        if self.mode.name == "reset":  # close() then sends RST instead of FIN
            linger = struct.pack("ii", 1, 0)
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        how = "reset (RST)" if self.mode.name == "reset" else "closed"
        self.outcome = f"cut answer {self.answers} ({len(record)} bytes) after {half} bytes, {how}"


def relay(
    number: int, client: socket.socket, upstream: tuple[str, int], mode: Mode, limit: float
) -> None:
    """One connection within ``limit`` seconds (a thread of its own)."""
    try:
        server = socket.create_connection(upstream, timeout=5)
    except OSError as exc:
        log(f"connection {number} ({mode}): cannot reach {upstream[0]}:{upstream[1]}: {exc}")
        client.close()
        return
    Relay(number, client, server, mode).run(limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fault-proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:9443")
    parser.add_argument("--upstream", default="127.0.0.1:8443")
    parser.add_argument("--mode-file", default="/run/fault-proxy/mode")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    up_host, _, up_port = args.upstream.rpartition(":")
    listener = socket.create_server((host, int(port)))
    log(f"listening on {args.listen}, forwarding to {args.upstream}, mode from {args.mode_file}")
    number = 0
    while True:
        client, _ = listener.accept()
        number += 1
        mode = read_mode(args.mode_file)
        threading.Thread(
            target=relay,
            args=(number, client, (up_host, int(up_port)), mode, args.max_seconds),
            daemon=True,
        ).start()


if __name__ == "__main__":
    sys.exit(main())
