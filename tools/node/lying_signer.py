#!/usr/bin/env python3
"""A signer that lies, for tests: serves kubecertd's API but issues the wrong thing.

It answers ``GET /v1/ca`` honestly (the cluster CA) and ``POST /v1/sign`` with a
certificate the agent must refuse, signed for real:

- ``other-node``: for another node, with the CSR's key, from the cluster CA;
- ``other-key``: for this node, from the cluster CA, but for a key nobody asked for;
- ``other-ca``: for this node and the CSR's key, from a CA the node does not trust.

It uses the signer's own files (``--dir``, as ``kubecertd-signer init`` wrote them)
and its own TLS certificate, so the agent's TLS check passes and only its answer
check stands between the lie and kubelet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kubecertd import pki
from kubecertd.signer import policy

LIES = ("other-node", "other-key", "other-ca")


def make_lie(mode: str, csr: x509.CertificateSigningRequest, cluster: policy.Issuer) -> bytes:
    node = pki.common_names(csr.subject)[-1].removeprefix(pki.NODE_PREFIX)
    now = dt.datetime.now(dt.timezone.utc)
    key = csr.public_key()
    issuer = cluster
    if mode == "other-node":
        node = "server2267z.prod.jp.local" if node != "server2267z.prod.jp.local" else "elsewhere"
    elif mode == "other-key":
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
    elif mode == "other-ca":
        rogue_key = ec.generate_private_key(ec.SECP256R1())
        # Same name as the real CA, different key: only the signature check catches it.
        name = cluster.cert.subject
        rogue = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(rogue_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(rogue_key, hashes.SHA256())
        )
        issuer = policy.Issuer(rogue, rogue_key)
    cert = policy.build_certificate(
        issuer,
        key,
        node,
        policy.KUBELET,
        dt.timedelta(days=30),
        now,
        policy.random_serial(),
    )
    return pki.certificate_pem(cert)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lying-signer", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/etc/kubecertd/signer")
    parser.add_argument("--listen", default="127.0.0.1:8443")
    parser.add_argument("--lie", choices=LIES, required=True)
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    cluster_pem = (directory / "ca.pem").read_bytes()
    cluster = policy.Issuer(
        pki.load_certificates(cluster_pem)[0],
        pki.load_private_key((directory / "ca-key.pem").read_bytes()),  # type: ignore[arg-type]
    )

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *fields: Any) -> None:
            print(f"lying-signer: {format % fields}", file=sys.stderr, flush=True)

        def _send(self, code: int, body: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/ca":
                self._send(200, {"ca_bundle": cluster_pem.decode()})
            else:
                self._send(200 if self.path == "/healthz" else 404, {"status": "ok"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            csr = x509.load_pem_x509_csr(body["csr"].encode())
            lie = make_lie(args.lie, csr, cluster).decode()
            print(
                f"lying-signer: answering {self.path} with {args.lie}", file=sys.stderr, flush=True
            )
            self._send(
                201,
                {
                    "certificate": lie,
                    "ca_bundle": cluster_pem.decode(),
                    "serial": "0",
                    "not_after": "",
                },
            )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "signer.pem", directory / "signer-key.pem")
    context.load_verify_locations(directory / "identity-ca.pem")
    context.verify_mode = ssl.CERT_OPTIONAL
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"lying-signer: {args.lie} on {args.listen}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
