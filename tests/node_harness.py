"""Throwaway nodes with a real systemd, for tests: a Python face for tools/node/.

    node = Node("server2277z.prod.jp.local", tmp_path / "node").boot()
    node.run(["hostname"]).stdout            # "server2277z.prod.jp.local\\n"
    node.systemctl("start", "kubelet.service", check=True)
    node.wait_for(lambda: node.journal("kubelet.service", MESSAGE=...))
    node.stop()

Each node is systemd 252 as PID 1 of its own PID/mount/network/UTS/IPC/cgroup
namespaces, with only the units of tools/node/units/ (journald, the system bus, stub
targets, kubelet.service, fake-apiserver.service, the timedated stand-in) but those
left ``without``, plus any ``extra_units``. Its
/etc/kubernetes/ssl is ``node.ssl_dir`` on the host and /etc/kubernetes/apiserver is
``node.apiserver_dir``; any other path of the node is reachable from the host through
``node.path()`` (``/proc/PID/root/…``), which ``read_file``/``write_file`` use.

In tests use the ``node`` / ``node_factory`` fixtures (tests/conftest.py): they skip
only when not root or without ``unshare``, and always stop their nodes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

import factories

PROJECT = Path(__file__).resolve().parent.parent
TOOLS = PROJECT / "tools" / "node"
VENV = Path(os.environ.get("NODE_VENV") or PROJECT / ".venv")
VENV_PYTHON = str(VENV / "bin" / "python")
NODE = factories.NODE
OTHER_NODE = factories.OTHER_NODE

T = TypeVar("T")


class NodeHarnessError(AssertionError):
    """A node did not boot, stop or answer as expected (a failure, never a skip)."""


HIDDEN_FROM_UNITS = ("/tmp/", "/var/tmp/", "/root/", "/home/")  # PrivateTmp=, ProtectHome=


def unavailable_reason() -> str | None:
    """Why nodes cannot run here at all (the only reasons to skip), or None."""
    if os.geteuid() != 0:
        return "throwaway systemd nodes need root (namespaces, mounts, cgroups)"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare/nsenter (util-linux) not available"
    return None


def journal_entries(output: str) -> list[dict[str, Any]]:
    """``journalctl -o json`` output as dicts; binary values (arrays of bytes) decoded."""
    entries = []
    for line in output.splitlines():
        entry = json.loads(line)
        for key, value in entry.items():
            if isinstance(value, list) and all(isinstance(b, int) for b in value):
                entry[key] = bytes(value).decode(errors="replace")
        entries.append(entry)
    return entries


@dataclass
class Node:
    """One throwaway node whose state lives in ``dir`` (a fresh temporary folder)."""

    hostname: str
    dir: Path
    extra_units: Sequence[Path] = ()
    without: Sequence[str] = ()  # units of tools/node/units/ left out (NODE_WITHOUT_UNITS)
    wants: Sequence[str] = ()
    binds: Sequence[str | tuple[Path | str, str] | tuple[Path | str, str, str]] = ()
    overlays: Sequence[str] = ()
    boot_timeout: float = 20.0
    pid: int | None = None
    boot_seconds: float | None = None
    stop_seconds: float | None = None
    _state: dict[str, str] = field(default_factory=dict, repr=False)

    # --- life cycle -------------------------------------------------------------------

    def boot(self) -> Node:
        """Boots the node; returns once systemd1 answers on its bus and journald runs."""
        if self.pid is not None:
            raise NodeHarnessError(f"node {self.hostname} is already booted")
        if f"{PROJECT}/".startswith(HIDDEN_FROM_UNITS):
            raise NodeHarnessError(
                f"the checkout {PROJECT} is under a tree that the shipped units' PrivateTmp= or "
                "ProtectHome= hide from services; run the tests from a copy elsewhere "
                "(.ci/run does this by itself)"
            )
        env = {
            **os.environ,
            "NODE_OWNER_PID": str(os.getpid()),
            "NODE_BOOT_TIMEOUT": str(self.boot_timeout),
            "NODE_EXTRA_UNITS": ":".join(str(p) for p in self.extra_units),
            "NODE_WITHOUT_UNITS": " ".join(self.without),
            "NODE_WANTS": " ".join(self.wants),
            "NODE_BINDS": "\n".join(self._bind_specs()),
            "NODE_OVERLAYS": " ".join(self.overlays),
            "NODE_VENV": str(VENV),
        }
        started = time.monotonic()
        try:
            result = subprocess.run(
                [sys.executable, "-S", str(TOOLS / "boot.py"), str(self.dir), self.hostname],
                capture_output=True,
                text=True,
                env=env,
                timeout=self.boot_timeout + 15,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            self._stop_quietly()
            raise NodeHarnessError(f"boot of {self.hostname} hung: {exc}") from None
        self.boot_seconds = time.monotonic() - started
        if result.returncode != 0:
            raise NodeHarnessError(
                f"boot of {self.hostname} in {self.dir} failed ({result.returncode}):\n"
                f"{result.stderr}"
            )
        self.pid = int(result.stdout.split()[-1])
        self._state = self._read_state()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Powers off (SIGKILL after ``timeout``) and cleans up; idempotent."""
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-S", str(TOOLS / "stop.py"), str(self.dir), str(timeout)],
            capture_output=True,
            text=True,
            timeout=timeout + 30,
            check=False,
        )
        self.stop_seconds = time.monotonic() - started
        if result.returncode != 0:
            raise NodeHarnessError(f"stop of {self.hostname} failed: {result.stderr}")

    def _stop_quietly(self) -> None:
        subprocess.run(
            [sys.executable, "-S", str(TOOLS / "stop.py"), str(self.dir), "2"],
            capture_output=True,
            timeout=40,
            check=False,
        )

    def __enter__(self) -> Node:
        return self if self.pid is not None else self.boot()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        """True while the node's systemd runs (PID and PID namespace as recorded)."""
        if self.pid is None:
            return False
        try:
            return os.stat(f"/proc/{self.pid}/ns/pid").st_ino == int(self._state["NODE_PIDNS"])
        except OSError:
            return False

    @property
    def cgroup(self) -> Path:
        """The node's cgroup2 folder on the host (the node's /sys/fs/cgroup)."""
        return Path(self._state["NODE_CGROUP"])

    @property
    def namespaces(self) -> dict[str, int]:
        """Inodes of the node's PID and mount namespaces, as recorded at boot."""
        return {"pid": int(self._state["NODE_PIDNS"]), "mnt": int(self._state["NODE_MNTNS"])}

    @property
    def ssl_dir(self) -> Path:
        """Host folder that is the node's /etc/kubernetes/ssl."""
        return self.dir / "ssl"

    @property
    def apiserver_dir(self) -> Path:
        """Host folder that is the node's /etc/kubernetes/apiserver (fake-apiserver's TLS)."""
        return self.dir / "apiserver"

    @property
    def console_log(self) -> str:
        return (self.dir / "console.log").read_text(errors="replace")

    # --- commands ---------------------------------------------------------------------

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = False,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``cmd`` (argv, or a string for ``sh -c``) inside the node, text mode.

        The command gets a clean environment (PATH, HOME, LANG) plus ``env``.
        """
        self._require_running()
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if env:
            argv = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
        try:
            result = subprocess.run(
                [str(TOOLS / "run"), str(self.dir), *argv],
                capture_output=True,
                text=True,
                input=input,
                timeout=timeout,
                check=False,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise NodeHarnessError(
                f"{argv} timed out after {timeout} s in {self.hostname}"
            ) from exc
        if result.returncode == 125 and "run:" in result.stderr:
            raise NodeHarnessError(result.stderr.strip())
        if check and result.returncode != 0:
            raise NodeHarnessError(
                f"{argv} failed in {self.hostname} ({result.returncode}):\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Runs ``code`` with the venv's python inside the node."""
        return self.run([VENV_PYTHON, "-c", code, *args], **kwargs)

    def systemctl(
        self, *args: str, check: bool = False, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def unit_property(self, unit: str, prop: str) -> str:
        """``systemctl show -p PROP --value UNIT`` (e.g. ActiveState, ExecMainPID, Result)."""
        return self.systemctl("show", "-p", prop, "--value", unit, check=True).stdout.strip()

    def unit_properties(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props), check=True)
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def journal(
        self, unit: str | None = None, *, after: str | None = None, **fields: str
    ) -> list[dict[str, Any]]:
        """Journal entries (``journalctl -o json``), optionally of ``unit``, after the
        cursor ``after`` (see ``cursor``) and with FIELD=value matches, oldest first.
        Binary values (arrays of bytes) are decoded."""
        argv = ["journalctl", "--no-pager", "-o", "json"]
        if unit:
            argv += ["-u", unit]
        if after:
            # Not --after-cursor: journalctl (252) seeks to the cursor and then skips one
            # entry, which with matches is the first *matching* one after it.
            argv.append(f"--cursor={after}")
        argv += [f"{k}={v}" for k, v in fields.items()]
        entries = journal_entries(self.run(argv, check=True).stdout)
        return [e for e in entries if not after or e.get("__CURSOR") != after]

    def cursor(self) -> str:
        """The cursor of the journal's newest entry: ``journal(after=…)`` then returns only
        what was logged since."""
        entries = journal_entries(
            self.run(["journalctl", "--no-pager", "-o", "json", "-n", "1"], check=True).stdout
        )
        if not entries:
            raise NodeHarnessError(f"the journal of {self.hostname} is empty")
        return str(entries[-1]["__CURSOR"])

    def messages(
        self, unit: str | None = None, *, after: str | None = None, **fields: str
    ) -> list[str]:
        """The MESSAGE of each matching journal entry."""
        return [str(e.get("MESSAGE", "")) for e in self.journal(unit, after=after, **fields)]

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        interval: float = 0.05,
        what: str = "",
    ) -> T:
        """Polls ``predicate`` until it returns something truthy (returned); fails after
        ``timeout`` seconds with ``what`` and the last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise NodeHarnessError(
                    f"timed out after {timeout} s waiting for {what or predicate!r} in "
                    f"{self.hostname} (last value: {value!r})"
                )
            time.sleep(interval)

    def wait_for_message(self, unit: str, text: str, timeout: float = 10.0) -> str:
        """Waits until a journal message of ``unit`` contains ``text``; returns it."""

        def find() -> str:  # "" (falsy) until it is there
            return next((m for m in self.messages(unit) if text in m), "")

        return self.wait_for(find, timeout, what=f"{text!r} in the journal of {unit}")

    # --- files --------------------------------------------------------------------------

    def path(self, node_path: str | os.PathLike[str]) -> Path:
        """The host path of ``node_path`` as the node sees it (via /proc/PID/root).
        Absolute symlinks inside the node are resolved against the host's root, so name
        real paths."""
        self._require_running()
        return Path(f"/proc/{self.pid}/root") / Path(node_path).relative_to("/")

    def write_file(
        self, node_path: str | os.PathLike[str], data: str | bytes, mode: int | None = None
    ) -> None:
        """Writes a file of the node (creating parent folders), e.g. under /etc."""
        target = self.path(node_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        if mode is not None:
            target.chmod(mode)

    def read_file(self, node_path: str | os.PathLike[str]) -> bytes:
        """The content of ``node_path``, symlinks followed as the node sees them."""
        return self.path(self.resolve(node_path)).read_bytes()

    def resolve(self, node_path: str | os.PathLike[str]) -> str:
        """``node_path`` with every symlink followed inside the node: an absolute target
        (kubelet's store symlink has one) names the node's file, not the host's."""
        parts = list(PurePosixPath(node_path).parts[1:])
        done, hops = "/", 0
        while parts:
            part = parts.pop(0)
            candidate = os.path.join(done, part)
            if part in (".", ".."):
                done = os.path.dirname(done) if part == ".." else done
            elif self.path(candidate).is_symlink():
                hops += 1
                if hops > 40:  # the kernel's limit
                    raise NodeHarnessError(f"{node_path}: too many levels of symbolic links")
                target = PurePosixPath(os.readlink(self.path(candidate)))
                done = "/" if target.is_absolute() else done
                parts = [*target.parts[1 if target.is_absolute() else 0 :], *parts]
            else:
                done = candidate
        return done

    # --- internals -------------------------------------------------------------------

    def _bind_specs(self) -> list[str]:
        specs = []
        for bind in self.binds:
            if isinstance(bind, str):
                specs.append(bind)
            else:
                specs.append(":".join(str(part) for part in bind))
        return specs

    def _read_state(self) -> dict[str, str]:
        state = {}
        for line in (self.dir / "node.env").read_text().splitlines():
            key, _, value = line.partition("=")
            state[key] = "".join(shlex.split(value))
        return state

    def _require_running(self) -> None:
        if self.pid is None:
            raise NodeHarnessError(f"node {self.hostname} is not booted")


# --- a cluster CA and the kubelet / API server files it signs --------------------------


@dataclass
class Cluster:
    """A cluster CA valid around the real clock (the node's programs use the real time),
    issuing kubelet pairs and the fake API server's serving certificate."""

    ca: factories.Issued

    @classmethod
    def new(cls) -> Cluster:
        now = dt.datetime.now(dt.timezone.utc)
        return cls(
            factories.make_ca(
                not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=3650)
            )
        )

    def kubelet_pair(
        self,
        node_name: str = NODE,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> factories.Issued:
        now = dt.datetime.now(dt.timezone.utc)
        return factories.issue(
            self.ca,
            cn_list=(f"system:node:{node_name}",),
            orgs=(factories.NODES_GROUP,),
            not_before=not_before or now - dt.timedelta(hours=1),
            not_after=not_after or now + dt.timedelta(days=30),
        )

    def install_apiserver(self, node: Node) -> None:
        """The fake API server's CA, serving certificate (127.0.0.1, localhost) and key."""
        now = dt.datetime.now(dt.timezone.utc)
        serving = factories.issue(
            self.ca,
            cn_list=("kube-apiserver",),
            orgs=(),
            not_before=now - dt.timedelta(hours=1),
            not_after=now + dt.timedelta(days=30),
            eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
            extensions=(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.DNSName("localhost"),
                    ]
                ),
            ),
        )
        _write(node.apiserver_dir / "ca.pem", self.ca.pem, 0o644)
        _write(node.apiserver_dir / "apiserver.pem", serving.pem, 0o644)
        _write(node.apiserver_dir / "apiserver-key.pem", serving.key_pem, 0o600)

    def install_kubelet(
        self, node: Node, node_name: str | None = None, pair: factories.Issued | None = None
    ) -> factories.Issued:
        """ca.pem, worker.pem, worker-key.pem in the node's /etc/kubernetes/ssl: by default
        a healthy pair for the node itself; ``node_name`` makes it another node's."""
        pair = pair or self.kubelet_pair(node_name or node.hostname.lower())
        _write(node.ssl_dir / "ca.pem", self.ca.pem, 0o644)
        _write(node.ssl_dir / "worker.pem", pair.pem, 0o644)
        _write(node.ssl_dir / "worker-key.pem", pair.key_pem, 0o600)
        return pair

    def install(self, node: Node, node_name: str | None = None) -> factories.Issued:
        """Both: the API server's files and a kubelet pair."""
        self.install_apiserver(node)
        return self.install_kubelet(node, node_name)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


# --- pytest fixtures (registered in tests/conftest.py) ----------------------------------


def node_factory_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Node]]:
    """Yields ``make(hostname=NODE, *, boot=True, **Node kwargs) -> Node``; every node
    made is stopped afterwards (and a failed stop fails the test)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    nodes: list[Node] = []

    def make(hostname: str = NODE, *, boot: bool = True, **kwargs: Any) -> Node:
        node = Node(hostname, tmp_path_factory.mktemp("node"), **kwargs)
        nodes.append(node)
        return node.boot() if boot else node

    yield make
    errors = []
    for node in reversed(nodes):
        try:
            node.stop()
        except NodeHarnessError as exc:
            errors.append(str(exc))
    if errors:
        raise NodeHarnessError("; ".join(errors))
