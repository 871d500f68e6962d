#!/usr/bin/env python3
"""tools/node/fake-apiserver — an API-server stand-in for the kubelet stand-in.

HTTPS (stdlib ssl) with a serving certificate from the cluster CA; every client must
present a certificate from that CA (the TLS handshake fails otherwise). It serves

- ``PATCH|PUT /api/v1/nodes/NAME/status`` and ``POST /api/v1/nodes`` (body
  ``{"metadata": {"name": NAME}}``): a node status update / registration,
- ``GET /healthz``,

and enforces the Node authorizer and NodeRestriction: a client certificate with CN
``system:node:B`` and O ``system:nodes`` may act only for node B. Anything else gets 403
and a Kubernetes ``Status`` object whose message is what the real API server says, e.g.
``nodes "A" is forbidden: node "B" is not allowed to modify node "A"`` (NodeRestriction's
words since kubernetes PR #71396; "cannot modify node" before). Every decision is one
line on stdout (the journal, under systemd). ``Type=notify``: READY=1 once listening.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NODE_PATH = re.compile(r"^/api/v1/nodes/(?P<name>[^/?]+)(?P<status>/status)?$")
NODES_GROUP = "system:nodes"
NODE_PREFIX = "system:node:"


def log(message: str) -> None:
    print(message, flush=True)


def sd_notify(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def subject_of(cert: dict[str, Any]) -> tuple[str, list[str]]:
    """(CN, [O, …]) of a certificate as ssl.SSLSocket.getpeercert() returns it."""
    cn, orgs = "", []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
            elif key == "organizationName":
                orgs.append(value)
    return cn, orgs


ALLOWED_SERIALS = "/etc/kubernetes/apiserver/allowed-serials"


def allowed_serials() -> set[str] | None:
    """The serials (lowercase hex) the test allows, or None when every serial is fine."""
    try:
        with open(ALLOWED_SERIALS, encoding="ascii") as stream:
            return {line.strip().lower().lstrip("0") for line in stream if line.strip()}
    except FileNotFoundError:
        return None


def authorize(cn: str, orgs: list[str], node: str, verb: str) -> str | None:
    """None when the user may act for ``node``; otherwise the API server's message."""
    if NODES_GROUP in orgs and cn.startswith(NODE_PREFIX):
        actor = cn[len(NODE_PREFIX) :]
        if actor == node:
            return None
        return f'nodes "{node}" is forbidden: node "{actor}" is not allowed to modify node "{node}"'
    return (
        f'nodes "{node}" is forbidden: User "{cn}" cannot {verb} resource "nodes/status" '
        'in API group "" at the cluster scope'
    )


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-apiserver"
    protocol_version = "HTTP/1.1"
    timeout = 10

    def setup(self) -> None:
        # The handshake runs here, in the request's thread, so that a failed one is
        # logged (a client certificate from another CA, an expired one) and cannot stall
        # the accept loop.
        self.request.settimeout(self.timeout)
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log(f"TLS handshake error from {self.client_address[0]}: {exc}")
            raise
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per decision instead, from the handlers

    def _send(self, code: int, body: dict[str, Any] | str) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(code)
        ctype = "application/json" if isinstance(body, dict) else "text/plain"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str, name: str = "") -> None:
        self._send(
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "details": {"name": name, "kind": "nodes"},
                "code": code,
            },
        )

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, 1 << 20)) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, "ok")
        else:
            self._status(
                404, "NotFound", f"the server could not find the requested resource ({self.path})"
            )

    def do_PATCH(self) -> None:
        self._update("patch")

    def do_PUT(self) -> None:
        self._update("update")

    def do_POST(self) -> None:
        if self.path != "/api/v1/nodes":
            self._status(404, "NotFound", "the server could not find the requested resource")
            return
        body = self._body()
        name = str(body.get("metadata", {}).get("name", ""))
        self._decide(name, "create", body)

    def _update(self, verb: str) -> None:
        match = NODE_PATH.match(self.path)
        if not match:
            self._status(404, "NotFound", "the server could not find the requested resource")
            return
        self._decide(match["name"], verb, self._body())

    def _decide(self, node: str, verb: str, body: dict[str, Any]) -> None:
        cert = self.connection.getpeercert()
        cn, orgs = subject_of(cert or {})
        serial = str((cert or {}).get("serialNumber", "")).lower().lstrip("0")
        allowed = allowed_serials()
        if allowed is not None and serial not in allowed:
            # Tests simulate an API server that stopped accepting a certificate (e.g. a
            # CA bundle without its issuer) by listing the only serials it still takes.
            log(f"401 {verb} node {node} serial {serial}: not in {ALLOWED_SERIALS}")
            self._status(401, "Unauthorized", "Unauthorized", node)
            return
        denied = authorize(cn, orgs, node, verb)
        user = f'user="{cn}" groups={",".join(orgs) or "-"}'
        if denied:
            log(f"403 {verb} node {node} {user}: {denied}")
            self._status(403, "Forbidden", denied, node)
            return
        log(f"200 {verb} node {node} {user}")
        status = body.get("status", {}) if isinstance(body.get("status"), dict) else {}
        self._send(
            200,
            {"kind": "Node", "apiVersion": "v1", "metadata": {"name": node}, "status": status},
        )


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ssl.SSLError, OSError)):  # handshake errors are logged already
            log(f"error while serving {client_address}: {exc!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake-apiserver", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:6443")
    parser.add_argument("--client-ca", default="/etc/kubernetes/apiserver/ca.pem")
    parser.add_argument("--tls-cert", default="/etc/kubernetes/apiserver/apiserver.pem")
    parser.add_argument("--tls-key", default="/etc/kubernetes/apiserver/apiserver-key.pem")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
        context.load_verify_locations(args.client_ca)
    except (OSError, ssl.SSLError) as exc:
        print(f"fake-apiserver: cannot load TLS material: {exc}", file=sys.stderr)
        return 1
    server = Server((host, int(port)), Handler)
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )

    def shutdown(*_: object) -> None:
        sd_notify("STOPPING=1")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    log(f"serving on https://{args.listen}")
    sd_notify("READY=1")
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
