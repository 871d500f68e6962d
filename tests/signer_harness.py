"""A real ``kubecertd-signer serve`` for tests: a subprocess on a free loopback port.

The signer is exercised exactly as operators run it: ``kubecertd-signer init`` writes a
signer directory, ``kubecertd-signer serve`` runs as a separate process (one worker, or
several sharing the port), and clients speak mutual TLS to it over 127.0.0.1.  Nothing
is mocked, so the TLS layer, the worker processes, the SQLite store and the command
line are all under test.

Use it through the fixtures in ``conftest.py`` (``signer``, ``signer_workers2``,
``start_signer``) or directly::

    with running_signer(tmp_path / "signer") as signer:
        token = signer.token("node-a")
        cert, key = signer.enroll("node-a")          # a node identity certificate
        kubelet, kubelet_key = signer.kubelet_cert("node-a", (cert, key))
        answer = signer.post("/v1/sign", {"csr": ...}, client=(cert, key))

Readiness is polled on ``GET /healthz`` with a deadline (no fixed sleeps); teardown
sends SIGTERM and insists on exit status 0, as systemd would see it.  The child gets a
scrubbed environment (no ``NOTIFY_SOCKET``, no config or CA overrides from the
developer's shell), and every client here ignores proxy and CA-bundle variables.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from kubecertd import pki

SIGNER_BIN = Path(sys.executable).with_name("kubecertd-signer")
READY_TIMEOUT = 30.0  # seconds for `serve` to answer /healthz
STOP_TIMEOUT = 15.0  # seconds for `serve` to exit after SIGTERM
CLI_TIMEOUT = 60.0

# Variables from the developer's shell that would change what the signer or a client does.
_SCRUBBED = (
    "NOTIFY_SOCKET",
    "KUBECERTD_CONFIG",
    "KUBECERTD_SIGNER_CONFIG",
    "PROMETHEUS_MULTIPROC_DIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)

Client = tuple[Path, Path]  # (certificate, private key) presented as the TLS client identity


class SignerStartError(RuntimeError):
    """``kubecertd-signer serve`` exited or never answered /healthz."""


def signer_env() -> dict[str, str]:
    """The environment for signer processes and curl: the caller's, minus overrides."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _SCRUBBED and not key.lower().endswith("_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "*"  # only ever loopback
    return env


def run_cli(
    *args: str | os.PathLike[str], timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``kubecertd-signer ARGS`` as a subprocess; never raises on a non-zero exit."""
    return subprocess.run(
        [str(SIGNER_BIN), *map(str, args)],
        capture_output=True,
        text=True,
        env=signer_env(),
        timeout=timeout,
        check=False,
    )


def init_signer_dir(directory: Path, *init_args: str) -> Path:
    """``kubecertd-signer init`` for localhost/127.0.0.1 in ``directory``; its signer.toml.

    Without ``--cluster-ca`` in ``init_args`` a new cluster CA is created.
    """
    args = list(init_args)
    if "--cluster-ca" not in args:
        args.append("--new-cluster-ca")
    result = run_cli(
        "init", "--dir", directory, "--hostname", "localhost", "--ip", "127.0.0.1", *args
    )
    if result.returncode != 0:
        raise SignerStartError(
            f"kubecertd-signer init failed ({result.returncode}): {result.stderr}"
        )
    return directory / "signer.toml"


def set_policy(config: Path, **settings: object) -> None:
    """Rewrite ``[policy]`` settings of an init-written signer.toml (values as TOML)."""
    text = config.read_text()
    for key, value in settings.items():
        toml = f'"{value}"' if isinstance(value, str) else str(value).lower()
        text, count = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {toml}", text)
        if count != 1:
            raise KeyError(f"{config}: no single [policy] {key} line to rewrite")
    config.write_text(text)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def new_session(trust: Path, client: Client | None = None) -> requests.Session:
    """A requests session trusting only ``trust``, presenting ``client`` if given."""
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE silently wins over `verify`
    session.verify = str(trust)
    if client is not None:
        session.cert = (str(client[0]), str(client[1]))
    return session


@dataclass
class Signer:
    """A running ``kubecertd-signer serve`` and the directory ``init`` wrote for it."""

    directory: Path
    config: Path
    port: int
    workers: int
    process: subprocess.Popen[bytes]
    log: Path  # the server's stdout and stderr
    _counter: Iterator[int] = field(default_factory=lambda: iter(range(1_000_000)), repr=False)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        """The cluster CA certificate (what /v1/ca serves and kubelet certs chain to)."""
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def identity_ca(self) -> Path:
        """The identity CA: the trust anchor for the signer's TLS certificate."""
        return self.directory / "identity-ca.pem"

    @property
    def identity_ca_key(self) -> Path:
        return self.directory / "identity-ca-key.pem"

    @property
    def state(self) -> Path:
        return self.directory / "state.db"

    def cli(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        """``kubecertd-signer ARGS --config <this signer's config>``."""
        return run_cli(*args, "--config", self.config)

    def token(self, node: str, ttl: str | None = None) -> str:
        """A fresh one-time enrollment token for ``node`` from ``token create``.

        Runs the command line's ``main`` in this process (same code, same database, no
        interpreter start-up); ``cli("token", "create", ...)`` runs the real binary.
        """
        from kubecertd.signer.cli import main

        argv = ["token", "create", "--node", node, "--config", str(self.config)]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main([*argv, *(("--ttl", ttl) if ttl else ())])
        if status != 0:
            raise RuntimeError(f"token create failed ({status}): {err.getvalue()}")
        return out.getvalue().strip()

    def session(self, client: Client | None = None) -> requests.Session:
        return new_session(self.identity_ca, client)

    def get(self, path: str, client: Client | None = None, **kwargs: Any) -> requests.Response:
        with self.session(client) as session:
            return session.get(self.url + path, timeout=30, **kwargs)

    def post(
        self, path: str, body: object, client: Client | None = None, **kwargs: Any
    ) -> requests.Response:
        """POST ``body``: a dict or list as JSON, anything else (bytes, an iterator) as is."""
        if isinstance(body, dict | list):
            kwargs["json"] = body
        else:
            kwargs["data"] = body
        with self.session(client) as session:
            return session.post(self.url + path, timeout=30, **kwargs)

    def new_files(self, node: str, kind: str) -> Client:
        """Fresh paths for a certificate and its key under ``<dir>/clients/``."""
        folder = self.directory / "clients" / node
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{kind}-{next(self._counter)}"
        return folder / f"{stem}.pem", folder / f"{stem}-key.pem"

    def enroll(self, node: str, key_type: str = "ecdsa-p256") -> Client:
        """Enroll ``node`` with a fresh token: the identity certificate and key paths."""
        key = pki.generate_key(key_type)
        csr = pki.build_csr(key, pki.identity_subject(node))
        answer = self.post("/v1/enroll", {"token": self.token(node), "csr": csr_pem(csr)})
        return self._save(answer, key, self.new_files(node, "identity"))

    def kubelet_cert(self, node: str, client: Client, key_type: str = "ecdsa-p256") -> Client:
        """A kubelet certificate for ``node`` from /v1/sign, asked as ``client``."""
        key = pki.generate_key(key_type)
        csr = pki.build_csr(key, pki.kubelet_subject(node))
        answer = self.post("/v1/sign", {"csr": csr_pem(csr), "reason": "test"}, client=client)
        return self._save(answer, key, self.new_files(node, "kubelet"))

    @staticmethod
    def _save(answer: requests.Response, key: PrivateKeyTypes, paths: Client) -> Client:
        if answer.status_code != 201:
            raise RuntimeError(f"signer refused ({answer.status_code}): {answer.text}")
        cert_path, key_path = paths
        cert_path.write_text(answer.json()["certificate"])
        key_path.write_bytes(pki.private_key_pem(key))
        key_path.chmod(0o600)
        return paths

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then the exit status (killed and reported if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.process)
            raise


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    """A CSR as the PEM text the API's ``csr`` field carries."""
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # The server runs in its own session, so its forked workers go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=STOP_TIMEOUT)


def _launch(
    config: Path, workers: int, log: Path, nofile: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``serve`` on a free port, retrying when another process takes the port first.

    ``nofile`` sets the server's RLIMIT_NOFILE, soft and hard (``prlimit``, which execs
    it: the process is still the server's).
    """
    limit = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile is not None else []
    for _attempt in range(5):
        port = free_port()
        with log.open("ab") as out:
            process = subprocess.Popen(
                [*limit, str(SIGNER_BIN), "serve", "--config", str(config),
                 "--listen", f"127.0.0.1:{port}", "--workers", str(workers)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=signer_env(),
                start_new_session=True,
            )  # fmt: skip
        try:
            _wait_healthy(process, port, config.parent / "identity-ca.pem", log)
        except SignerStartError:
            if process.poll() is None:
                _kill_group(process)
            if "Address already in use" in log.read_text(errors="replace"):
                continue
            raise
        return process, port
    raise SignerStartError("no free port for kubecertd-signer serve after 5 attempts")


def _wait_healthy(process: subprocess.Popen[bytes], port: int, trust: Path, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with new_session(trust) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SignerStartError(
                    f"kubecertd-signer serve exited {process.returncode}: "
                    f"{log.read_text(errors='replace')}"
                )
            try:
                answer = session.get(f"https://127.0.0.1:{port}/healthz", timeout=2)
                if answer.status_code == 200 and answer.text == "ok":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)  # poll interval, bounded by the deadline
    raise SignerStartError(f"kubecertd-signer serve did not answer /healthz in {READY_TIMEOUT}s")


@contextlib.contextmanager
def running_signer(
    directory: Path,
    workers: int = 1,
    policy: Mapping[str, object] | None = None,
    init_args: tuple[str, ...] = (),
    nofile: int | None = None,
) -> Iterator[Signer]:
    """Init ``directory`` (unless it holds a signer.toml), serve it, stop it on exit.

    ``policy`` rewrites ``[policy]`` settings first, e.g.
    ``{"max_issuances_per_node_per_hour": 2}``; ``nofile`` is the server's file limit.
    On exit the server gets SIGTERM and must exit 0; anything else fails the test that
    owns the signer.
    """
    config = directory / "signer.toml"
    if not config.exists():
        init_signer_dir(directory, *init_args)
    if policy:
        set_policy(config, **policy)
    log = directory / "serve.log"
    process, port = _launch(config, workers, log, nofile)
    signer = Signer(directory, config, port, workers, process, log)
    try:
        yield signer
    finally:
        status = signer.stop()  # also when the body failed: never leak a server
    if status != 0:
        raise AssertionError(
            f"kubecertd-signer serve exited {status} on SIGTERM: {signer.log_text()[-2000:]}"
        )
