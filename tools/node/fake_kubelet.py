#!/usr/bin/env python3
"""tools/node/fake-kubelet — a kubelet stand-in that fails where kubelet fails.

Like a kube-aws/CoreOS kubelet whose kubeconfig names /etc/kubernetes/ssl/{ca.pem,
worker.pem,worker-key.pem}:

1. At start it reads the three files. A missing or unreadable file, a file without
   PEM data, or a key that is not the certificate's key ends it with status 1 and one
   kubelet-like error line on stderr (``failed to run Kubelet: …``), as does a
   certificate outside its validity.
2. It updates its node's status over mutual TLS (``PATCH /api/v1/nodes/NAME/status``;
   NAME is ``--hostname-override`` or the lowercased hostname, kubelet's default). A
   refusal (``nodes "A" is forbidden: node "B" cannot modify node "A"``), a failed
   handshake or an API server unreachable for ``--register-timeout`` ends it with
   status 1. On success it prints ``registered node NAME``.
3. It keeps running: every ``--heartbeat`` it re-reads the files, checks them again and
   posts a heartbeat with the current pair; any failure ends it with status 1 (so a
   kubelet whose files go bad while it runs fails, as a restarted one would).

SIGTERM ends it with status 0. Stdlib ssl only; the venv's cryptography (when
importable) adds the validity-date check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

UTC = dt.timezone.utc


class KubeletError(Exception):
    """The kubelet cannot go on; the message is the error it logs before exiting 1."""


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


class Credentials:
    """The kubeconfig's three files, checked the way client-go loads them."""

    def __init__(self, ssl_dir: Path) -> None:
        self.ca = ssl_dir / "ca.pem"
        self.cert = ssl_dir / "worker.pem"
        self.key = ssl_dir / "worker-key.pem"

    def load(self) -> ssl.SSLContext:
        """A client TLS context with the current files, or KubeletError."""
        for path, what, owner in (
            (self.ca, "certificate-authority", "default-cluster"),
            (self.cert, "client-cert", "default-auth"),
            (self.key, "client-key", "default-auth"),
        ):
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise KubeletError(
                    f"invalid kubeconfig: unable to read {what} {path} for {owner} due to "
                    f"open {path}: {(exc.strerror or str(exc)).lower()}"
                ) from None
            if b"-----BEGIN" not in data:
                kind = {"client-cert": "certificate", "client-key": "key"}.get(what)
                if kind:
                    raise KubeletError(f"tls: failed to find any PEM data in {kind} input")
                raise KubeletError(
                    f"unable to load root certificates: unable to parse bytes as PEM block ({path})"
                )
        self._check_dates()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(str(self.ca))
        except (ssl.SSLError, OSError) as exc:
            raise KubeletError(f"unable to load root certificates: {exc}") from None
        try:
            context.load_cert_chain(str(self.cert), str(self.key))
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
                raise KubeletError("tls: private key does not match public key") from None
            raise KubeletError(f"tls: failed to load client certificate/key: {exc}") from None
        except OSError as exc:
            raise KubeletError(f"tls: failed to load client certificate/key: {exc}") from None
        return context

    def _check_dates(self) -> None:
        try:
            from cryptography import x509  # noqa: PLC0415 - optional, from the venv
        except ImportError:
            return
        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        except (ValueError, OSError):
            raise KubeletError(
                "tls: failed to parse certificate from server: x509: malformed certificate"
            ) from None
        now = dt.datetime.now(UTC)
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
        if now > not_after or now < not_before:
            when = "after" if now > not_after else "before"
            bound = not_after if now > not_after else not_before
            raise KubeletError(
                "x509: certificate has expired or is not yet valid: current time "
                f"{now:%Y-%m-%dT%H:%M:%SZ} is {when} {bound:%Y-%m-%dT%H:%M:%SZ}"
            )


class Kubelet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.node = (args.hostname_override or socket.gethostname()).lower()
        self.creds = Credentials(Path(args.ssl_dir))
        url = urlsplit(args.server)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self.server = args.server.rstrip("/")
        self.heartbeat = parse_duration(args.heartbeat)
        self.register_timeout = parse_duration(args.register_timeout)
        self.stopping = threading.Event()

    def update_status(self, context: ssl.SSLContext) -> None:
        """PATCH the node's status with the given credentials; KubeletError when refused."""
        path = f"/api/v1/nodes/{self.node}/status"
        now = dt.datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = json.dumps(
            {
                "status": {
                    "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": now}]
                }
            }
        )
        connection = http.client.HTTPSConnection(self.host, self.port, context=context, timeout=5)
        try:
            connection.request(
                "PATCH",
                path,
                body=body,
                headers={"Content-Type": "application/strategic-merge-patch+json"},
            )
            response = connection.getresponse()
            data = response.read()
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
        raise KubeletError(message)

    def register(self) -> None:
        klog("I", "kubelet_node_status.go:70", f'Attempting to register node "{self.node}"')
        context = self.creds.load()
        deadline = time.monotonic() + self.register_timeout
        while True:
            try:
                self.update_status(context)
                break
            except KubeletError as exc:
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
        klog("I", "kubelet_node_status.go:76", f"registered node {self.node}")

    def run(self) -> int:
        klog("I", "server.go:412", f'Starting kubelet for node "{self.node}"')
        try:
            self.register()
            failing_since = None
            while not self.stopping.wait(self.heartbeat):
                context = self.creds.load()
                try:
                    self.update_status(context)
                    failing_since = None
                except KubeletError as exc:
                    raise KubeletError(
                        f'Unable to update the status of node "{self.node}": {exc}'
                    ) from None
                except (OSError, http.client.HTTPException) as exc:
                    failing_since = failing_since or time.monotonic()
                    klog("E", "kubelet_node_status.go:540", f"Error updating node status: {exc}")
                    if time.monotonic() - failing_since > self.register_timeout:
                        raise KubeletError(f"Unable to update node status: {exc}") from None
        except KubeletError as exc:
            klog("E", "run.go:74", f"command failed: failed to run Kubelet: {exc}")
            return 1
        klog("I", "server.go:1280", "Shutting down kubelet")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake-kubelet", description=__doc__.split("\n")[0])
    parser.add_argument("--ssl-dir", default="/etc/kubernetes/ssl")
    parser.add_argument("--server", default="https://127.0.0.1:6443")
    parser.add_argument("--hostname-override", default="")
    parser.add_argument("--heartbeat", default="2s", help="node status update frequency")
    parser.add_argument("--register-timeout", default="10s")
    args = parser.parse_args(argv)
    kubelet = Kubelet(args)
    signal.signal(signal.SIGTERM, lambda *_: kubelet.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: kubelet.stopping.set())
    return kubelet.run()


if __name__ == "__main__":
    sys.exit(main())
