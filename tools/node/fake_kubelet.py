#!/usr/bin/env python3
"""tools/node/fake-kubelet — a kubelet stand-in that fails where kubelet fails.

Where it finds its credentials:

- ``--kubeconfig PATH`` absent: like a kube-aws/CoreOS kubelet whose kubeconfig names
  ``--ssl-dir``'s ca.pem, worker.pem and worker-key.pem (/etc/kubernetes/ssl).
- ``--kubeconfig PATH``: as kubelet reads it (client-go's clientcmd and certificate
  store). The current context's user gives ``client-certificate``/``client-key`` (files;
  a relative path is joined to the kubeconfig's folder) or ``*-data`` (base64; data wins
  over a file), its cluster ``certificate-authority(-data)`` and ``server`` (unless
  ``--server`` is given). With rotation on (``--rotate-certificates``, or
  ``rotateCertificates: true`` in ``--config``), kubelet's certificate store comes
  first: ``<--cert-dir>/kubelet-client-current.pem`` (chain and key in one file), then
  the kubeconfig's files, then ``<--cert-dir>/kubelet-client.crt``/``.key``, then the
  kubeconfig's data. With ``--bootstrap-kubeconfig`` too, an unusable or expired
  kubeconfig is reported as kubelet's bootstrap code does (``part of the existing
  bootstrap client certificate in … is expired: …``) and, the bootstrap kubeconfig being
  gone (kubeadm deletes it), ends it (``unable to load bootstrap kubeconfig: stat …``);
  the stand-in never bootstraps. Without rotation the store is not read at all, as
  kubelet does not read it then (only through the kubeconfig's file paths).

Then:

1. A missing or unreadable credential, one without PEM data, a key that is not the
   certificate's key, or a certificate outside its validity ends it with status 1 and
   one kubelet-like error line on stderr (``failed to run Kubelet: …``), with kubelet's
   own wording where it has one. With rotation on, a regular file where the store keeps
   its ``kubelet-client-current.pem`` symlink is logged as kubelet's next rotation
   would fail (``expected "…" to be a symlink but it is a file``) and, as in kubelet,
   does not stop it.
2. It updates its node's status over mutual TLS (``PATCH /api/v1/nodes/NAME/status``;
   NAME is ``--hostname-override`` or the lowercased hostname, kubelet's default). A
   refusal is logged as kubelet logs it (``"Unable to register node with API server"
   err=…`` quoting the API server, e.g. ``nodes "A" is forbidden: node "B" is not allowed
   to modify node "A"``) and ends it with status 1, as does a failed handshake or an
   API server unreachable for ``--register-timeout``. On success it prints ``registered
   node NAME with client certificate serial SERIAL`` (the serial as kubecertd writes it:
   lowercase hex).
3. It keeps running: every ``--heartbeat`` it posts a heartbeat. It reads its
   credentials again first where kubelet (>= 1.18) does: files named by its kubeconfig
   (or the ``--ssl-dir`` files) with rotation off. With rotation on, client-go's
   certificate manager keeps the pair it started with in memory, and credentials
   embedded in the kubeconfig are read only at start, so there it goes on with the pair
   it started with. A pair that changed is logged in client-go's words (``certificate
   rotation detected, …``) and, once a heartbeat with it went through, as ``node status
   of NAME updated with client certificate serial SERIAL``. Credentials that can no
   longer be read, or a pair past its validity, end it with status 1 (the in-memory
   pair of a rotating kubelet in kubelet's words: ``The currently active client
   certificate has expired …``). An API server that refuses a heartbeat is logged as
   kubelet logs it (``"Error updating node status, will retry" err="…"``) and, as in
   kubelet, does not stop it at once: only after ``--register-timeout`` of failures in
   a row does it end with status 1 (so a kubelet whose credentials go bad while it runs
   fails in the end, as a restarted one would).

SIGTERM ends it with status 0. Stdlib ssl; the venv's PyYAML reads kubeconfigs and the
venv's cryptography (when importable) adds the validity-date check. Flags kubeadm's
drop-in passes that mean nothing here (``--container-runtime-endpoint``, ``--v``, …) are
accepted and ignored; any other unknown flag is an error, as in kubelet.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import http.client
import json
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

UTC = dt.timezone.utc
STORE_CURRENT = "kubelet-client-current.pem"
# Go's pem.Decode: a block is BEGIN, base64 body and the matching END line.
PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
# OpenSSL's verify codes in Go's crypto/x509 words (x509.UnknownAuthorityError, …).
GO_VERIFY_ERRORS = dict.fromkeys(
    (2, 18, 19, 20, 21), "x509: certificate signed by unknown authority"
) | {
    9: "x509: certificate has expired or is not yet valid",
    10: "x509: certificate has expired or is not yet valid",
}
VERSION = "v1.30.2"  # what --version answers, in kubelet's words
IGNORED_FLAGS = (
    "--container-runtime-endpoint",
    "--pod-infra-container-image",
    "--node-ip",
    "--v",
)


class KubeletError(Exception):
    """The kubelet cannot go on; the message is the error it logs before exiting 1."""


class KubeletExit(KubeletError):
    """An exit kubelet logs in its own words (not as ``failed to run Kubelet: …``)."""


class Refused(KubeletError):
    """The API server answered, and not with 200; the message is its Status message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def klog(level: str, where: str, message: str) -> None:
    """One line in klog's text format (``E1130 03:30:00.123456  PID file.go:N] msg``)."""
    now = dt.datetime.now(UTC)
    stamp = f"{level}{now:%m%d %H:%M:%S.%f}"
    stream = sys.stderr if level in "EF" else sys.stdout
    print(f"{stamp} {os.getpid():7d} {where}] {message}", file=stream, flush=True)


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def go_time(when: dt.datetime) -> str:
    """A time as Go's ``%v`` prints it: ``2026-05-02 10:00:00 +0000 UTC``."""
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M:%S} +0000 UTC"


def strerror(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def go_quote(text: str) -> str:
    """Go's ``%q`` of an ASCII string, as klog also quotes structured values (``err="…"``)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- the credentials, wherever they are ----------------------------------------------


class Ref(NamedTuple):
    """One credential as a kubeconfig names it: a file or embedded data."""

    what: str  # clientcmd's word: client-cert, client-key, certificate-authority
    owner: str  # the user (or cluster) that names it
    path: str | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        """Its bytes; KubeletError in clientcmd's words when the file cannot be read."""
        if self.data is not None or self.path is None:
            return self.data or b""
        try:
            return Path(self.path).read_bytes()
        except OSError as exc:
            raise KubeletError(
                f"invalid kubeconfig: unable to read {self.what} {self.path} for {self.owner} "
                f"due to open {self.path}: {strerror(exc)}"
            ) from None


class ClientConfig(NamedTuple):
    """What kubelet's client config holds: server, CA and client certificate and key."""

    source: str  # the kubeconfig (or the --ssl-dir)
    server: str | None
    ca: Ref | None
    cert: Ref | None
    key: Ref | None


class Pair(NamedTuple):
    """A client certificate chain and key, checked the way Go's tls.X509KeyPair does."""

    chain: list[bytes]  # PEM blocks, leaf first
    key: bytes  # one PEM block
    source: str


class Loaded(NamedTuple):
    """A pair in use: the TLS context made from it, and the pair."""

    context: ssl.SSLContext
    pair: Pair


def legacy_config(ssl_dir: Path) -> ClientConfig:
    """The kube-aws kubeconfig: three files of ``ssl_dir``."""
    return ClientConfig(
        str(ssl_dir),
        None,
        Ref("certificate-authority", "default-cluster", str(ssl_dir / "ca.pem")),
        Ref("client-cert", "default-auth", str(ssl_dir / "worker.pem")),
        Ref("client-key", "default-auth", str(ssl_dir / "worker-key.pem")),
    )


def load_kubeconfig(path: str) -> ClientConfig:
    """The current context of the kubeconfig at ``path``; KubeletError as clientcmd says it."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise KubeletError(f"stat {path}: {strerror(exc)}") from None
    import yaml  # noqa: PLC0415 - from the venv; only kubeconfig mode needs it

    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise KubeletError(f'error loading config file "{path}": yaml: {problem}') from None
    if not isinstance(doc, dict):
        raise KubeletError(f'error loading config file "{path}": not a kubeconfig')
    context_name = str(doc.get("current-context") or "")
    context = _named(doc, "contexts", "context", context_name)
    if not context_name or context is None:
        raise KubeletError(
            f"invalid configuration: context was not found for specified context: {context_name}"
        )
    cluster_name, user_name = str(context.get("cluster") or ""), str(context.get("user") or "")
    cluster = _named(doc, "clusters", "cluster", cluster_name)
    if cluster is None:
        raise KubeletError(
            f"invalid configuration: cluster has no server defined ({cluster_name!r} not found)"
        )
    user = _named(doc, "users", "user", user_name) or {}
    folder = os.path.dirname(os.path.abspath(path))

    def ref(spec: dict[str, Any], field: str, what: str, owner: str) -> Ref | None:
        data = spec.get(f"{field}-data")
        if data:  # data wins over a file (clientcmd: "client-cert-data will override")
            try:
                raw = base64.b64decode(str(data).replace("\n", "").replace("\r", ""), validate=True)
            except (binascii.Error, ValueError):
                raise KubeletError(
                    f'error loading config file "{path}": illegal base64 data in {field}-data'
                ) from None
            return Ref(what, owner, None, raw)
        name = spec.get(field)
        if name:
            return Ref(what, owner, os.path.join(folder, str(name)))
        return None

    return ClientConfig(
        path,
        str(cluster.get("server") or "") or None,
        ref(cluster, "certificate-authority", "certificate-authority", cluster_name),
        ref(user, "client-certificate", "client-cert", user_name),
        ref(user, "client-key", "client-key", user_name),
    )


def _named(doc: dict[str, Any], section: str, inner: str, name: str) -> dict[str, Any] | None:
    for entry in doc.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(inner)
            return value if isinstance(value, dict) else {}
    return None


def key_pair(cert_pem: bytes, key_pem: bytes, source: str) -> Pair:
    """Go's ``tls.X509KeyPair`` block rules and messages (the key match is checked later)."""
    chain, skipped = [], []
    for match in PEM_BLOCK.finditer(cert_pem):
        if match[1] == b"CERTIFICATE":
            chain.append(match[0])
        else:
            skipped.append(match[1].decode())
    if not chain:
        if not skipped:
            raise KubeletError("tls: failed to find any PEM data in certificate input")
        if len(skipped) == 1 and skipped[0].endswith("PRIVATE KEY"):
            raise KubeletError(
                "tls: failed to find certificate PEM data in certificate input, but did find "
                "a private key; PEM inputs may have been switched"
            )
        raise KubeletError(
            'tls: failed to find "CERTIFICATE" PEM block in certificate input after skipping '
            f"PEM blocks of the following types: [{' '.join(skipped)}]"
        )
    skipped = []
    for match in PEM_BLOCK.finditer(key_pem):
        kind = match[1].decode()
        if kind == "PRIVATE KEY" or kind.endswith(" PRIVATE KEY"):
            return Pair(chain, match[0], source)
        skipped.append(kind)
    if not skipped:
        raise KubeletError("tls: failed to find any PEM data in key input")
    if skipped == ["CERTIFICATE"]:
        raise KubeletError(
            "tls: found a certificate rather than a key in the PEM for the private key"
        )
    raise KubeletError(
        'tls: failed to find PEM block with type ending in "PRIVATE KEY" in key input after '
        f"skipping PEM blocks of the following types: [{' '.join(skipped)}]"
    )


def not_after(pair: Pair) -> dt.datetime | None:
    """The leaf's notAfter (None without the venv's cryptography)."""
    dates = validity(pair.chain[0])
    return dates[1] if dates else None


def validity(cert_pem: bytes) -> tuple[dt.datetime, dt.datetime] | None:
    try:
        from cryptography import x509  # noqa: PLC0415 - optional, from the venv
    except ImportError:
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise KubeletError(
            "tls: failed to parse certificate from server: x509: malformed certificate"
        ) from None
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def serial_of(pair: Pair) -> str:
    """The leaf's serial as kubecertd writes it (lowercase hex); "unknown" without the
    venv's cryptography."""
    try:
        from cryptography import x509  # noqa: PLC0415 - optional, from the venv
    except ImportError:
        return "unknown"
    try:
        return format(x509.load_pem_x509_certificate(pair.chain[0]).serial_number, "x")
    except ValueError:
        return "unknown"


def check_dates(pair: Pair) -> None:
    dates = validity(pair.chain[0])
    if dates is None:
        return
    now = dt.datetime.now(UTC)
    not_before, after = dates
    if now > after or now < not_before:
        when = "after" if now > after else "before"
        bound = after if now > after else not_before
        raise KubeletError(
            "x509: certificate has expired or is not yet valid: current time "
            f"{now:%Y-%m-%dT%H:%M:%SZ} is {when} {bound:%Y-%m-%dT%H:%M:%SZ}"
        )


def tls_context(ca_pem: bytes | None, ca_where: str, pair: Pair) -> ssl.SSLContext:
    """A client TLS context for ``pair``, trusting ``ca_pem`` (system roots when None)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pem is None:
        context.load_default_certs()
    else:
        if not PEM_BLOCK.search(ca_pem):
            raise KubeletError(
                f"unable to load root certificates: unable to parse bytes as PEM block ({ca_where})"
            )
        try:
            context.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise KubeletError(f"unable to load root certificates: {exc}") from None
    load_pair(context, pair)
    return context


def load_pair(context: ssl.SSLContext, pair: Pair) -> None:
    """The chain and key into ``context``; KubeletError as Go's tls.X509KeyPair says it."""
    # One anonymous file: embedded data never touches the disk.
    fd = os.memfd_create("kubelet-client", os.MFD_CLOEXEC)
    try:
        os.write(fd, b"\n".join([*pair.chain, pair.key]) + b"\n")
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise KubeletError("tls: private key does not match public key") from None
        raise KubeletError(f"tls: failed to parse private key: {exc}") from None
    finally:
        os.close(fd)


def checked_pair(cert_pem: bytes, key_pem: bytes, source: str) -> Pair:
    """``key_pair`` plus the key match, as tls.X509KeyPair checks both."""
    pair = key_pair(cert_pem, key_pem, source)
    load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), pair)
    return pair


def expired(pair: Pair) -> bool:
    after = not_after(pair)
    return after is not None and dt.datetime.now(UTC) > after


class Credentials:
    """Where this kubelet takes its client certificate from, and whether it reads it
    again at each load() or keeps the pair it started with, as kubelet does."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.kubeconfig: str | None = args.kubeconfig or None
        self.ssl_dir = Path(args.ssl_dir)
        self.cert_dir = Path(args.cert_dir)
        self.bootstrap: str | None = args.bootstrap_kubeconfig or None
        self.rotate = args.rotate_certificates or rotation_in(args.config)
        self.server: str | None = None
        self.loads = 0
        self.current: Loaded | None = None
        self.reloads = True  # decided at the first load

    def load(self) -> Loaded:
        """The pair to connect with, or KubeletError: read again where kubelet (>= 1.18)
        reads it again (files with rotation off: client-go's cert_rotation.go); else the
        pair it started with, as long as it is within its validity."""
        if self.current is not None and not self.reloads:
            if self.rotate and expired(self.current.pair):  # certificate/transport.go
                raise KubeletExit(
                    "The currently active client certificate has expired and the server is responsive, exiting."
                )
            check_dates(self.current.pair)
            return self.current
        self.current = self._read()
        return self.current

    def _read(self) -> Loaded:
        self.loads += 1
        if self.kubeconfig is None:
            config = legacy_config(self.ssl_dir)
        elif self.rotate:
            self.reloads = False  # client-go's certificate manager keeps its pair in memory
            return self._rotating(self.kubeconfig)
        else:  # server.go: bootstrap.LoadClientCert, then clientcmd alone
            config = self._bootstrapped(self.kubeconfig, "invalid kubeconfig")
            # client-go reloads a client certificate and key named as files; data is static
            self.reloads = all(
                ref is not None and ref.data is None for ref in (config.cert, config.key)
            )
        self.server = config.server
        return self._context(config, self._from_config(config))

    def _bootstrapped(self, kubeconfig: str, wrap: str) -> ClientConfig:
        """The kubeconfig, once bootstrap.go has judged it when --bootstrap-kubeconfig is
        given: unreadable or expired, kubelet turns to the bootstrap kubeconfig, and the
        stand-in ends there (kubeadm has deleted it; the stand-in never bootstraps)."""
        config: ClientConfig | None
        try:
            config = load_kubeconfig(kubeconfig)
        except KubeletError as exc:
            if self.bootstrap is None:
                raise KubeletError(f"{wrap}: {exc}") from None
            config = None
            if os.path.exists(kubeconfig):
                unhandled(
                    f"unable to read existing bootstrap client config from {kubeconfig}: {exc}"
                )
        if config is None or (self.bootstrap and not self._still_valid(config)):
            bootstrap = self.bootstrap or ""  # config is None only with a bootstrap kubeconfig
            if not os.path.exists(bootstrap):
                raise KubeletError(
                    f"unable to load bootstrap kubeconfig: stat {bootstrap}: no such file or directory"
                )
            raise KubeletError(
                f"the kubelet stand-in cannot bootstrap from {bootstrap}; give it credentials"
            )
        return config

    def _from_config(self, config: ClientConfig) -> Pair:
        """clientcmd: the kubeconfig's own certificate and key (files or data)."""
        if config.cert is None or config.key is None:
            raise KubeletError(
                f"invalid kubeconfig: no client certificate and key for the current context of {config.source}"
            )
        for ref in (config.ca, config.cert, config.key):
            if ref is not None:
                ref.read()  # clientcmd's validation reads every file first
        return checked_pair(config.cert.read(), config.key.read(), config.source)

    def _context(self, config: ClientConfig, pair: Pair) -> Loaded:
        check_dates(pair)
        ca = config.ca
        context = tls_context(
            ca.read() if ca else None, (ca.path or config.source) if ca else "", pair
        )
        return Loaded(context, pair)

    def _rotating(self, kubeconfig: str) -> Loaded:
        """kubelet with client rotation: bootstrap's checks, then the certificate store."""
        config = self._bootstrapped(kubeconfig, "unable to load kubeconfig")
        self.server = config.server
        pair = self._store(config)
        if pair is not None and expired(pair):
            pair = None  # certificate_manager.go getCurrentCertificateOrBootstrap
        if pair is None and config.cert and config.cert.data is not None:
            pair = self._from_config(config)  # kubeadm's bootstrap pair, embedded
        if pair is None:
            raise KubeletExit(
                "No valid client certificate is found and the server is responsive, exiting."
            )
        if expired(pair):
            raise KubeletExit(
                "The currently active client certificate has expired and the server is responsive, exiting."
            )
        return self._context(config, pair)

    def _still_valid(self, config: ClientConfig) -> bool:
        """bootstrap.go's ``isClientConfigStillValid``: loadable, and notAfter not passed."""
        try:
            pair = self._from_config(config)
        except KubeletError as exc:
            unhandled(
                f"unable to load TLS configuration from existing bootstrap client config read from {self.kubeconfig}: {exc}"
            )
            return False
        after = not_after(pair)
        if after is not None and dt.datetime.now(UTC) > after:
            unhandled(
                f"part of the existing bootstrap client certificate in {self.kubeconfig} is expired: {go_time(after)}"
            )
            return False
        return True

    def _store(self, config: ClientConfig) -> Pair | None:
        """client-go's ``fileStore.Current``: the store's file, the kubeconfig's files, the
        store's ``kubelet-client.crt``/``.key``; None when it has none (kubelet would then
        copy the kubeconfig's data into the store; the stand-in only uses it)."""
        current = self.cert_dir / STORE_CURRENT
        if current.exists():
            if self.loads == 1:
                if not current.is_symlink():
                    unhandled(
                        f'Unable to store the new cert/key pair: expected "{current}" to be a symlink but it is a file'
                    )
                klog("I", "certificate_store.go:130", f'Loading cert/key pair from "{current}".')
            return self._load_file(current)
        cert, key = config.cert, config.key
        files = [r.path for r in (cert, key) if r is not None and r.path is not None]
        if cert and key and len(files) == 2 and all(os.path.exists(f) for f in files):
            return checked_pair(cert.read(), key.read(), files[0])
        crt, pem_key = self.cert_dir / "kubelet-client.crt", self.cert_dir / "kubelet-client.key"
        if crt.exists() and pem_key.exists():
            return checked_pair(crt.read_bytes(), pem_key.read_bytes(), str(crt))
        return None

    def _load_file(self, path: Path) -> Pair:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KubeletError(
                f'failed to initialize client certificate manager: could not load cert/key pair from "{path}": {strerror(exc)}'
            ) from None
        try:
            return checked_pair(data, data, str(path))
        except KubeletError as exc:
            raise KubeletError(
                f'failed to initialize client certificate manager: could not convert data from "{path}" into cert/key pair: {exc}'
            ) from None


def unhandled(message: str) -> None:
    """utilruntime.HandleError: logged, not fatal."""
    escaped = message.replace('"', '\\"')
    klog("E", "runtime.go:79", f'"Unhandled Error" err="{escaped}"')


def rotation_in(config: str | None) -> bool:
    """``rotateCertificates`` of a KubeletConfiguration file (``--config``)."""
    if not config:
        return False
    try:
        text = Path(config).read_text()
    except OSError as exc:
        raise SystemExit(f"failed to load kubelet config file, path: {config}: {exc}") from None
    import yaml  # noqa: PLC0415 - from the venv

    doc = yaml.safe_load(text) or {}
    return isinstance(doc, dict) and doc.get("rotateCertificates") is True


class Kubelet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.node = (args.hostname_override or socket.gethostname()).lower()
        self.creds = Credentials(args)
        self.server_flag: str | None = args.server
        self.heartbeat = parse_duration(args.heartbeat)
        self.register_timeout = parse_duration(args.register_timeout)
        self.stopping = threading.Event()
        self.loaded_serial = ""  # the pair last loaded
        self.serial = ""  # the pair of the last status update that went through

    @property
    def server(self) -> str:
        return (self.server_flag or self.creds.server or "https://127.0.0.1:6443").rstrip("/")

    def status_patch(self) -> str:
        now = dt.datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {"type": "Ready", "status": "True", "lastHeartbeatTime": now}
        return json.dumps({"status": {"conditions": [condition]}}, separators=(",", ":"))

    def update_status(self, context: ssl.SSLContext, body: str | None = None) -> None:
        """PATCH the node's status with the given credentials; Refused (the API server's
        message) or KubeletError (TLS) when it does not go through."""
        path = f"/api/v1/nodes/{self.node}/status"
        body = body or self.status_patch()
        url = urlsplit(self.server)
        host, port = url.hostname or "127.0.0.1", url.port or 443
        connection = http.client.HTTPSConnection(host, port, context=context, timeout=5)
        try:
            connection.request(
                "PATCH",
                path,
                body=body,
                headers={"Content-Type": "application/strategic-merge-patch+json"},
            )
            response = connection.getresponse()
            data = response.read()
        except ssl.SSLCertVerificationError as exc:
            why = GO_VERIFY_ERRORS.get(exc.verify_code, f"x509: {exc.verify_message}")
            raise KubeletError(
                f'Patch "{self.server}{path}": tls: failed to verify certificate: {why}'
            ) from None
        except ssl.SSLError as exc:
            raise KubeletError(f'Patch "{self.server}{path}": remote error: {exc}') from None
        finally:
            connection.close()
        if response.status == 200:
            return
        try:
            message = json.loads(data).get("message") or data.decode(errors="replace")
        except ValueError:
            message = data.decode(errors="replace")
        raise Refused(response.status, message)

    def heartbeat_error(self, exc: KubeletError, body: str) -> str:
        """kubelet's words for a heartbeat that did not go through
        (kubelet_node_status.go ``tryUpdateNodeStatus``): it reads the node first, which
        an unauthenticated client cannot; the patch is what NodeRestriction refuses."""
        if isinstance(exc, Refused) and exc.status != 401:
            # nodeutil.PatchNodeStatus: "failed to patch status %q for node %q: %v"
            return f"failed to patch status {go_quote(body)} for node {go_quote(self.node)}: {exc}"
        return f"error getting node {go_quote(self.node)}: {exc}"

    def register(self) -> None:
        klog("I", "kubelet_node_status.go:70", f'Attempting to register node "{self.node}"')
        loaded = self.creds.load()
        deadline = time.monotonic() + self.register_timeout
        while True:
            try:
                self.update_status(loaded.context)
                break
            except KubeletError as exc:
                klog(
                    "E",
                    "kubelet_node_status.go:96",
                    f'"Unable to register node with API server" err={go_quote(str(exc))} node={go_quote(self.node)}',
                )
                raise KubeletError(
                    f'Unable to register node "{self.node}" with API server: {exc}'
                ) from None
            except (OSError, http.client.HTTPException) as exc:  # the API server may be starting
                if time.monotonic() > deadline:
                    raise KubeletError(
                        f'Unable to register node "{self.node}" with API server: '
                        f'Patch "{self.server}/api/v1/nodes/{self.node}/status": {exc}'
                    ) from None
                if self.stopping.wait(0.2):
                    return
        self.serial = self.loaded_serial = serial_of(loaded.pair)
        klog(
            "I",
            "kubelet_node_status.go:76",
            f"registered node {self.node} with client certificate serial {self.serial}",
        )

    def heartbeat_once(self) -> bool:
        """One node status update with the credentials as kubelet holds them now; False
        when it did not go through (logged as kubelet logs it)."""
        loaded = self.creds.load()
        serial = serial_of(loaded.pair)
        if serial != self.loaded_serial:
            self.loaded_serial = serial
            klog(
                "I",
                "cert_rotation.go:168",
                "certificate rotation detected, shutting down client connections to start using new credentials",
            )
        body = self.status_patch()
        try:
            self.update_status(loaded.context, body)
        except KubeletError as exc:  # refused or a failed handshake: kubelet retries
            why = go_quote(self.heartbeat_error(exc, body))
            klog(
                "E",
                "kubelet_node_status.go:544",
                f'"Error updating node status, will retry" err={why}',
            )
            return False
        except (OSError, http.client.HTTPException) as exc:
            klog("E", "kubelet_node_status.go:540", f"Error updating node status: {exc}")
            return False
        if serial != self.serial:
            self.serial = serial
            klog(
                "I",
                "kubelet_node_status.go:560",
                f"node status of {self.node} updated with client certificate serial {serial}",
            )
        return True

    def keep_up(self) -> None:
        """Heartbeats until SIGTERM; KubeletError once they have failed for
        ``--register-timeout`` in a row."""
        failing_since = None
        while not self.stopping.wait(self.heartbeat):
            if self.heartbeat_once():
                failing_since = None
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > self.register_timeout:
                raise KubeletError(
                    f'node status updates of "{self.node}" have failed for {self.register_timeout:g}s in a row'
                )

    def run(self) -> int:
        klog("I", "server.go:412", f'Starting kubelet for node "{self.node}"')
        try:
            self.register()
            self.keep_up()
        except KubeletExit as exc:
            klog("E", "transport.go:108", str(exc))
            return 1
        except KubeletError as exc:
            klog("E", "run.go:74", f"command failed: failed to run Kubelet: {exc}")
            return 1
        klog("I", "server.go:1280", "Shutting down kubelet")
        return 0


def go_bool(text: str) -> bool:
    """A Go bool flag's value (``--rotate-certificates`` alone is true)."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake-kubelet", description=__doc__.split("\n")[0])
    parser.add_argument("--ssl-dir", default="/etc/kubernetes/ssl")
    parser.add_argument("--kubeconfig", default="")
    parser.add_argument("--bootstrap-kubeconfig", default="")
    parser.add_argument("--cert-dir", default="/var/lib/kubelet/pki")
    parser.add_argument("--config", default="", help="KubeletConfiguration (rotateCertificates)")
    parser.add_argument("--rotate-certificates", nargs="?", const=True, default=False, type=go_bool)
    parser.add_argument("--server", default=None, help="default: the kubeconfig's server")
    parser.add_argument("--hostname-override", default="")
    parser.add_argument("--heartbeat", default="2s", help="node status update frequency")
    parser.add_argument("--register-timeout", default="10s")
    parser.add_argument("--version", action="version", version=f"Kubernetes {VERSION}")
    for flag in IGNORED_FLAGS:
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    kubelet = Kubelet(args)
    signal.signal(signal.SIGTERM, lambda *_: kubelet.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: kubelet.stopping.set())
    return kubelet.run()


if __name__ == "__main__":
    sys.exit(main())
