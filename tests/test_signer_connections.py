"""Connections the signer will not hold: caps, handshake and header timeouts (issue 9).

A real ``kubecertd-signer serve --workers 2`` runs at the file limit systemd gives a
service by default (1,024; set with ``prlimit``), and this process opens thousands of
idle TCP connections to it from loopback addresses of its own choosing (127.0.0.2 and
up, by binding each socket before connecting).  Meanwhile a real agent runs
``kubecertd --check --fix`` from 127.0.0.1.  The pure parts of
``kubecertd.signer.listener`` (caps, refusal, address keys, the throttled log) are
tested first; last, the shipped unit on a throwaway node with a real systemd
(tests/healing_node.py) heals a node through the same flood.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_oneshot import agent_config

from kubecertd.errors import ConfigError
from kubecertd.signer.config import Limits, load_signer_config
from kubecertd.signer.listener import (
    FD_RESERVE,
    Caps,
    ThrottledLog,
    address_key,
    connection_caps,
    refusal,
)

import factories
from healing_node import SIGNER, HealingNode, node_of
from node_harness import Node
from signer_harness import Signer, init_signer_dir, running_signer, signer_env

NOFILE = 1024  # what systemd gives a service without LimitNOFILE= (soft)
HANDSHAKE_TIMEOUT = 5.0  # [limits] handshake_timeout of the signer under test
HEADER_TIMEOUT = 2.0  # [limits] header_timeout
PER_ADDRESS = Limits().max_connections_per_address  # the default, per worker
WORKER_CAP = NOFILE - FD_RESERVE  # what a worker holds at most at this file limit
SLACK = 2.0  # seconds allowed beyond a timeout for the close to arrive
FLOOD = 3000
AGENT = Path(sys.executable).with_name("kubecertd")

# -- the pure parts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "nofile", "expected"),
    [
        pytest.param(512, 65536, Caps(512, PER_ADDRESS), id="configured-below-the-file-limit"),
        pytest.param(100_000, 1024, Caps(1024 - FD_RESERVE, PER_ADDRESS), id="file-limit-wins"),
        pytest.param(100_000, -1, Caps(100_000, PER_ADDRESS), id="unlimited"),
        pytest.param(512, FD_RESERVE + 10, Caps(10, 10), id="per-address-never-above-total"),
        pytest.param(512, 8, Caps(1, 1), id="at-least-one"),
    ],
)
def test_connection_caps(configured: int, nofile: int, expected: Caps) -> None:
    """A worker's cap is the configured one, lowered to what its soft file limit leaves room for."""
    assert connection_caps(Limits(max_connections=configured), nofile) == expected


@pytest.mark.parametrize(
    ("open_total", "from_address", "expected"),
    [
        (0, 0, None),
        (9, 2, None),
        (10, 0, "max-connections"),
        (9, 3, "max-connections-per-address"),
        (10, 3, "max-connections"),
    ],
)
def test_refusal_names_the_cap(open_total: int, from_address: int, expected: str | None) -> None:
    """A connection is refused at a cap (its metric reason), one below it is accepted."""
    assert refusal(open_total, from_address, Caps(10, 3)) == expected


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_address_key(host: str, key: str) -> None:
    """Connections are counted per IPv4 address and per IPv6 /64 (one client's usual share)."""
    assert address_key(host) == key


def test_throttled_log_counts_what_it_leaves_out() -> None:
    """One line per kind per interval; the next line says how many were left out."""
    now = [100.0]
    lines: list[str] = []
    log = ThrottledLog(interval=10.0, clock=lambda: now[0], write=lines.append)
    for _ in range(5):
        log("a", "first kind")
    log("b", "second kind")
    now[0] += 9.99
    log("a", "first kind")
    now[0] += 0.01
    log("a", "first kind")
    assert lines == [
        "kubecertd-signer: first kind",
        "kubecertd-signer: second kind",
        "kubecertd-signer: first kind (5 more like it since the last such line)",
    ]


def test_limits_config() -> None:
    """[limits] takes counts and durations; a bad value is a config error naming the key."""
    text = '[limits]\nmax_connections = 100\nhandshake_timeout = "500ms"\n'
    limits = load_signer_config(text, "signer.toml").limits
    assert limits == Limits(max_connections=100, handshake_timeout=0.5)
    with pytest.raises(ConfigError, match=r"signer\.toml: limits\.max_connections_per_address"):
        load_signer_config("[limits]\nmax_connections_per_address = 0\n", "signer.toml")


# -- a real signer at 1,024 file descriptors ---------------------------------------------


@pytest.fixture(scope="module")
def own_nofile() -> Iterator[None]:
    """This process may hold the flood's sockets: soft RLIMIT_NOFILE raised, restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FLOOD + 1000
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError) as exc:
            pytest.fail(f"the flood needs RLIMIT_NOFILE {needed}, hard limit is {hard}: {exc}")
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, own_nofile: None) -> Iterator[Signer]:
    """``serve --workers 2`` at RLIMIT_NOFILE 1024, short timeouts, max_connections far too high."""
    directory = tmp_path_factory.mktemp("limited")
    config = init_signer_dir(directory)
    text = config.read_text()
    for setting, value in (
        ("max_connections", "100000"),  # the file limit must win
        ("handshake_timeout", f'"{HANDSHAKE_TIMEOUT}s"'),
        ("header_timeout", f'"{HEADER_TIMEOUT}s"'),
    ):
        text, count = re.subn(rf"(?m)^{setting} = \S+", f"{setting} = {value}", text)
        assert count == 1, setting
    config.write_text(text)
    with running_signer(directory, workers=2, nofile=NOFILE) as signer:
        yield signer
    log = signer.log_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]


@dataclass
class Idle:
    """A client connection that sends nothing, and when the server closed it."""

    sock: socket.socket
    source: str
    opened: float
    closed: float | None = None


def open_idle(port: int, sources: dict[str, int]) -> list[Idle]:
    """``sources[address]`` TCP connections to the signer from each loopback address."""
    idle = []
    for source, count in sources.items():
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind((source, 0))
            sock.connect_ex(("127.0.0.1", port))  # EINPROGRESS; the kernel completes it
            idle.append(Idle(sock, source, time.monotonic()))
    return idle


def wait_closed(idle: list[Idle], timeout: float) -> list[Idle]:
    """Note when the server closes each connection (EOF or reset); the ones still open."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for connection in idle:
            if connection.closed is None:
                selector.register(connection.sock, selectors.EVENT_READ, connection)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                connection = key.data
                try:
                    data = connection.sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # ECONNRESET: refused at once
                    data = b""
                assert data == b"", f"the server sent {data!r} to a client that said nothing"
                connection.closed = time.monotonic()
                selector.unregister(connection.sock)
    return [connection for connection in idle if connection.closed is None]


def close_all(idle: list[Idle]) -> None:
    for connection in idle:
        connection.sock.close()


def workers(signer: Signer) -> list[int]:
    children = Path(f"/proc/{signer.process.pid}/task/{signer.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(signer: Signer, name: str, **labels: str) -> float:
    """One sample of the signer's /metrics (0 when absent)."""
    text = signer.get("/metrics").text
    want = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "")
    match = re.search(rf"(?m)^{pattern} (\S+)$", text)
    return float(match[1]) if match else 0.0


def enrolled_agent(signer: Signer, tmp_path: Path, node: str) -> Path:
    """An agent config for ``node``, enrolled, with an empty ssl_dir: --fix has all to do."""
    config = agent_config(tmp_path, signer, node)
    factories.write_ssl_dir(tmp_path / "ssl", None, None, None)
    enroll = run_agent("enroll", "--token", signer.token(node), "--config", str(config))
    assert enroll.returncode == 0, enroll.stderr
    return config


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AGENT), *args],
        capture_output=True,
        text=True,
        env=signer_env(),
        timeout=60,
        check=False,
    )


def test_idle_flood_does_not_stop_a_node_getting_its_certificate(
    limited: Signer, tmp_path: Path
) -> None:
    """3,000 idle connections at a 1,024 file limit: a node's --check --fix still heals, the idle ones are closed in time."""
    node = "server2277z.prod.jp.local"
    config = enrolled_agent(limited, tmp_path, node)
    refused_before = metric(
        limited, "kubecertd_signer_connections_refused_total", reason="max-connections"
    )
    # One attacker with 2,000 connections, ten more with 100 each: each over its
    # per-address cap, together below a worker's cap, so 127.0.0.1 keeps its room.
    sources = {"127.0.0.2": 2000} | {f"127.0.0.{n}": 100 for n in range(3, 13)}
    idle = open_idle(limited.port, sources)
    try:
        started = time.monotonic()
        fix = run_agent("--check", "--fix", "--no-restart", "--json", "--config", str(config))
        fix_seconds = time.monotonic() - started
        held = metric(limited, "kubecertd_signer_connections_open")
        fds = {pid: open_fds(pid) for pid in workers(limited)}
        still_open = wait_closed(idle, HANDSHAKE_TIMEOUT + SLACK)
        last_close = max((c.closed or 0) - c.opened for c in idle)
    finally:
        close_all(idle)
    report = json.loads(fix.stdout)
    assert fix.returncode == 0 and report["healthy"] is True, fix.stderr
    assert report["certificate"]["node"] == node
    print(
        f"\n{len(idle)} idle connections; --check --fix took {fix_seconds:.2f}s "
        f"(tries: {report.get('fix', {}).get('tries')}); the signer held {held:.0f} "
        f"(fds per worker {fds}); the last was closed {last_close:.2f}s after it opened"
    )
    # The flood was still held when the fix finished: per address, each worker took its cap.
    assert held >= len(sources) * PER_ADDRESS
    assert all(count < NOFILE for count in fds.values())
    assert not still_open, (
        f"{len(still_open)} idle connections still open after {HANDSHAKE_TIMEOUT + SLACK}s"
    )
    assert last_close <= HANDSHAKE_TIMEOUT + SLACK
    refused_after = metric(
        limited, "kubecertd_signer_connections_refused_total", reason="max-connections"
    )
    assert refused_after == refused_before  # no worker was ever full
    per_address = metric(
        limited, "kubecertd_signer_connections_refused_total", reason="max-connections-per-address"
    )
    assert per_address >= len(idle) - 2 * len(sources) * PER_ADDRESS
    timed_out = metric(limited, "kubecertd_signer_connections_timed_out_total", phase="handshake")
    assert timed_out >= held - 1  # all but the /metrics request that counted them


def test_a_full_worker_refuses_at_once_and_recovers(limited: Signer, tmp_path: Path) -> None:
    """Idle connections from many addresses fill both workers: the excess is reset at once, and the signer serves again after the handshake timeout."""
    # 150 x 20 = 3,000, each address under the per-address cap (32): only the worker cap
    # can refuse, whichever worker the kernel hands each connection to.
    sources = {f"127.0.0.{n}": 20 for n in range(20, 170)}
    idle = open_idle(limited.port, sources)
    try:
        refused = len(idle) - len(wait_closed(idle, 1.0))
        fds = {pid: open_fds(pid) for pid in workers(limited)}
        still_open = wait_closed(idle, HANDSHAKE_TIMEOUT + SLACK)
    finally:
        close_all(idle)
    print(
        f"\n{len(idle)} idle connections from 150 addresses; {refused} reset within 1s; fds per worker {fds}"
    )
    assert refused >= len(idle) - 2 * WORKER_CAP
    assert all(count < NOFILE for count in fds.values())
    assert not still_open
    assert (
        metric(limited, "kubecertd_signer_connections_refused_total", reason="max-connections") > 0
    )
    assert metric(limited, "kubecertd_signer_connections_open") < 10
    config = enrolled_agent(limited, tmp_path, "server2267z.prod.jp.local")
    fix = run_agent("--check", "--fix", "--no-restart", "--config", str(config))
    assert fix.returncode == 0, fix.stderr
    log = limited.log_text()
    assert f"lowered to {WORKER_CAP} by RLIMIT_NOFILE {NOFILE}: raise LimitNOFILE=" in log
    # A few lines per kind and worker, not one per connection.
    assert len(re.findall(r"(?m)^kubecertd-signer: refused", log)) <= 20, log[-3000:]


def test_stalled_handshake_is_closed_after_the_handshake_timeout(limited: Signer) -> None:
    """A client that sends nothing, or the start of a ClientHello and then nothing, is closed at handshake_timeout, not before."""
    before = metric(limited, "kubecertd_signer_connections_timed_out_total", phase="handshake")
    silent, stalled = open_idle(limited.port, {"127.0.0.1": 2})
    try:
        wait_writable(stalled.sock)
        stalled.sock.send(b"\x16\x03\x01\x02\x00")  # a TLS record header: 512 bytes to come
        assert not wait_closed([silent, stalled], HANDSHAKE_TIMEOUT + SLACK)
    finally:
        close_all([silent, stalled])
    for connection in (silent, stalled):
        waited = (connection.closed or 0) - connection.opened
        assert HANDSHAKE_TIMEOUT - 0.5 <= waited <= HANDSHAKE_TIMEOUT + SLACK
    after = metric(limited, "kubecertd_signer_connections_timed_out_total", phase="handshake")
    assert after - before == 2


def wait_writable(sock: socket.socket, timeout: float = 5.0) -> None:
    """Until a non-blocking connect has completed."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        assert selector.select(timeout), f"connect did not complete in {timeout}s"


def tls_client(signer: Signer) -> ssl.SSLSocket:
    """A TLS connection to the signer with the handshake done (no client certificate)."""
    context = ssl.create_default_context(cafile=str(signer.identity_ca))
    sock = socket.create_connection(("127.0.0.1", signer.port), timeout=10)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def seconds_until_closed(sock: ssl.SSLSocket, timeout: float) -> float:
    """How long until the server closes ``sock`` (EOF or reset); fails after ``timeout``."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        pytest.fail(f"the signer kept a silent connection open for {timeout}s")
    except (ConnectionResetError, ssl.SSLError):
        data = b""
    assert data == b"", data
    return time.monotonic() - started


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", id="half-a-head"),
    ],
)
def test_silent_tls_client_is_closed_after_the_header_timeout(limited: Signer, sent: bytes) -> None:
    """A client that finishes the handshake and then sends nothing, or half a request head, is closed within header_timeout."""
    with tls_client(limited) as sock:
        sock.sendall(sent)
        waited = seconds_until_closed(sock, HEADER_TIMEOUT + SLACK)
    assert HEADER_TIMEOUT - 0.5 <= waited <= HEADER_TIMEOUT + SLACK


def test_a_prompt_request_outlives_the_header_timeout(limited: Signer) -> None:
    """A whole request head in time turns the header timer off: the answer arrives and the connection stays for keep-alive."""
    with tls_client(limited) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.settimeout(HEADER_TIMEOUT + 1.0)
        with pytest.raises(TimeoutError):
            sock.recv(4096)  # still open past the header timeout (keep-alive is 15 s)


# -- the shipped unit on a real node --------------------------------------------------------

CLONE_NEWNET = 0x40000000


def enter_netns(pid: int) -> None:
    """Move the calling thread (only it) into the network namespace of ``pid``."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/proc/{pid}/ns/net") as netns:
        if libc.setns(netns.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into /proc/{pid}/ns/net")


def open_idle_in_node(node: Node, port: int, sources: dict[str, int]) -> list[Idle]:
    """``open_idle`` from inside the node's network namespace (a thread that enters it)."""
    pid = node.pid
    assert pid is not None, "the node is not running"
    opened: list[list[Idle]] = []
    failed: list[BaseException] = []

    def enter_and_open() -> None:
        try:
            enter_netns(pid)
            opened.append(open_idle(port, sources))  # sockets stay in the node's namespace
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failed.append(exc)

    thread = threading.Thread(target=enter_and_open)
    thread.start()
    thread.join(timeout=60)
    if failed:
        raise failed[0]
    assert opened, "the flood thread did not finish in 60s"
    return opened[0]


def test_shipped_unit_heals_a_node_through_an_idle_flood(
    node_factory: Callable[..., Node], own_nofile: None
) -> None:
    """The shipped unit sets LimitNOFILE=65536; even at 1024 the node's kubecertd heals through 3,000 idle connections."""
    healing = HealingNode.create(node_factory)
    node = healing.node

    def nofile(pid: str) -> tuple[int, int]:
        """(soft, hard) RLIMIT_NOFILE of a process of the node."""
        limits = node.run(["cat", f"/proc/{pid}/limits"], check=True).stdout
        match = re.search(r"(?m)^Max open files +(\d+) +(\d+)", limits)
        assert match, limits
        return int(match[1]), int(match[2])

    unit = node.unit_properties(SIGNER, "LimitNOFILE", "LimitNOFILESoft")
    assert unit == {"LimitNOFILE": "65536", "LimitNOFILESoft": "65536"}
    # systemd lowers it to its own hard limit where it lacks CAP_SYS_RESOURCE (a container).
    expected = min(65536, nofile("1")[1])
    assert nofile(node.unit_property(SIGNER, "MainPID")) == (expected, expected)
    # What the unit had before: systemd's default (soft 1024; the hard limit too here).
    node.write_file(f"/etc/systemd/system/{SIGNER}.d/nofile.conf", "[Service]\nLimitNOFILE=1024\n")
    node.systemctl("daemon-reload", check=True)
    node.systemctl("restart", SIGNER, check=True)  # Type=notify: back once it serves
    assert nofile(node.unit_property(SIGNER, "MainPID")) == (NOFILE, NOFILE)
    renewed = len(healing.events("renewed"))
    sources = {"127.0.0.2": 2000} | {f"127.0.0.{n}": 100 for n in range(3, 13)}
    idle = open_idle_in_node(node, 8443, sources)
    try:
        started = time.monotonic()
        (node.ssl_dir / "worker.pem").unlink()
        healing.wait_event("renewed", after=renewed, timeout=30)
        healed = time.monotonic() - started
        still_open = wait_closed(idle, Limits().handshake_timeout + SLACK)
        last_close = max((c.closed or 0) - c.opened for c in idle)
    finally:
        close_all(idle)
    print(
        f"\nnode: healed in {healed:.2f}s under {len(idle)} idle connections; last closed after {last_close:.2f}s"
    )
    assert node_of(healing.pair()[0]) == node.hostname
    assert not still_open
    log = "\n".join(node.messages(SIGNER))
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
    assert "refused a connection from 127.0.0.2" in log
