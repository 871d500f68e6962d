"""``kubecertd-signer``: the central signer's command line (SPEC "Central signer")."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from .. import __version__, pki
from ..config import is_dns_subdomain, positive_duration
from ..errors import KubecertdError, UsageError
from .config import SignerConfig, listen_address, read_signer_config
from .store import AuditRecord, Store, StoreError, TokenInfo, open_store

T = TypeVar("T")
AUDIT_LIMIT = 1000  # records `audit` shows unless --limit says otherwise


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="default /etc/kubecertd/signer.toml",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _common(
        _Parser(
            prog="kubecertd-signer",
            description="Issues kubelet certificates to nodes, each only for itself.",
        )
    )
    parser.add_argument("--version", action="version", version=f"kubecertd-signer {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    init = _common(
        commands.add_parser("init", help="create the signer's CAs, TLS certificate and config")
    )
    init.add_argument("--dir", required=True, help="where to write the files")
    init.add_argument("--cluster-ca", metavar="PEM", help="the cluster's existing CA certificate")
    init.add_argument("--cluster-ca-key", metavar="PEM", help="its private key")
    init.add_argument(
        "--new-cluster-ca", action="store_true", help="create a new cluster CA instead"
    )
    init.add_argument(
        "--hostname", action="append", required=True, help="DNS name of the signer (repeatable)"
    )
    init.add_argument(
        "--ip", action="append", default=[], help="IP address of the signer (repeatable)"
    )
    init.add_argument("--force", action="store_true", help="replace an existing setup")
    init.add_argument(
        "--owner",
        metavar="USER",
        help="owner of the keys and of DIR (default as root: kubecertd-signer, if that user exists)",
    )

    serve = _common(commands.add_parser("serve", help="run the HTTPS service"))
    serve.add_argument("--listen", metavar="HOST:PORT")
    serve.add_argument(
        "--workers", type=int, metavar="N", help="processes sharing the port (default: one per CPU)"
    )

    token = commands.add_parser("token", help="one-time enrollment tokens")
    token_commands = token.add_subparsers(
        dest="action", metavar="ACTION", required=True, parser_class=_Parser
    )
    create = _common(token_commands.add_parser("create", help="a token bound to one node"))
    create.add_argument("--node", required=True)
    create.add_argument("--ttl", help="lifetime, e.g. 1h (default [policy] token_ttl)")
    create.add_argument("--json", action="store_true")
    listing = _common(token_commands.add_parser("list", help="outstanding tokens"))
    listing.add_argument("--json", action="store_true")
    revoke = _common(token_commands.add_parser("revoke", help="revoke an outstanding token"))
    revoke.add_argument("id")

    node = commands.add_parser("node", help="refuse or allow all issuance for a node")
    node_commands = node.add_subparsers(
        dest="action", metavar="ACTION", required=True, parser_class=_Parser
    )
    for action, text in (("revoke", "refuse all issuance for NAME"), ("allow", "allow NAME again")):
        _common(node_commands.add_parser(action, help=text)).add_argument("name")

    audit = _common(commands.add_parser("audit", help="issuance and refusal history"))
    audit.add_argument("--node")
    audit.add_argument(
        "--claims", action="store_true", help="only records carrying the node's claim (culprits)"
    )
    audit.add_argument("--since", metavar="DURATION", help="only the last DURATION, e.g. 24h")
    audit.add_argument(
        "--limit",
        type=int,
        default=AUDIT_LIMIT,
        metavar="N",
        help=f"at most N records ({AUDIT_LIMIT})",
    )
    audit.add_argument(
        "--offset", type=int, default=0, metavar="N", help="skip the N newest (the next page)"
    )
    audit.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        handler = HANDLERS[args.command]
        return handler(args)
    except KubecertdError as exc:
        return _fail(argv, exc.code, str(exc), exc.exit_code)
    except StoreError as exc:
        return _fail(argv, "unavailable", f"state database: {exc}", 1)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        return 130


def _fail(argv: Sequence[str], code: str, message: str, status: int) -> int:
    """One error line on stderr; under ``--json`` also ``{"error": {"code", "message"}}`` on
    stdout, so that a script reading stdout always gets one JSON document."""
    print(f"kubecertd-signer: error: {message}", file=sys.stderr)
    if "--json" in argv:
        print(json.dumps({"error": {"code": code, "message": message}}, indent=2))
    return status


def _config(args: argparse.Namespace) -> SignerConfig:
    return read_signer_config(getattr(args, "config", None))


def _with_store(config: SignerConfig, work: Callable[[Store], T]) -> T:
    store = open_store(config.state, config.database_url)
    store.open()
    try:
        return work(store)
    finally:
        store.close()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def cmd_init(args: argparse.Namespace) -> int:
    from .authority import InitRequest, init, init_owner  # noqa: PLC0415

    adopting = bool(args.cluster_ca and args.cluster_ca_key)
    if args.new_cluster_ca == adopting or (
        not adopting and (args.cluster_ca or args.cluster_ca_key)
    ):
        raise UsageError("give either --cluster-ca and --cluster-ca-key, or --new-cluster-ca")
    request = InitRequest(
        directory=args.dir,
        hostnames=tuple(args.hostname),
        ips=tuple(args.ip),
        cluster_ca=args.cluster_ca,
        cluster_ca_key=args.cluster_ca_key,
        new_cluster_ca=args.new_cluster_ca,
        force=args.force,
        owner=init_owner(args.owner, os.geteuid()),
    )
    for path in init(request, _now()):
        print(f"wrote {path}")
    directory = os.path.abspath(args.dir)
    print(
        f"nodes trust {directory}/identity-ca.pem as [signer] ca; start with: kubecertd-signer serve --config {directory}/signer.toml"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, serve  # noqa: PLC0415

    config = _config(args)
    try:
        listen = listen_address(args.listen) if args.listen else config.listen
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from exc
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    return serve(config, ServeOptions(listen=listen, workers=workers))


def cmd_token(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.action == "create":
        return _token_create(config, args)
    if args.action == "list":
        tokens = _with_store(config, lambda store: store.list_tokens(_now()))
        if args.json:
            print(json.dumps([_token_json(t) for t in tokens], indent=2))
        else:
            _table(["ID", "NODE", "EXPIRES"], [[t.id, t.node, pki.iso(t.expires)] for t in tokens])
        return 0
    if not _with_store(config, lambda store: store.revoke_token(args.id)):
        raise KubecertdError(f"no outstanding token with id {args.id}")
    print(f"revoked token {args.id}")
    return 0


def _token_create(config: SignerConfig, args: argparse.Namespace) -> int:
    from .tokens import hash_secret, new_token  # noqa: PLC0415

    if not is_dns_subdomain(args.node):
        raise UsageError(
            f"--node {args.node!r} is not a valid node name (lowercase DNS-1123 subdomain)"
        )
    try:
        ttl = positive_duration(args.ttl) if args.ttl else config.policy.token_ttl
    except ValueError as exc:
        raise UsageError(f"--ttl: {exc}") from exc
    token_id, secret = new_token()
    now = _now()
    info = TokenInfo(token_id, args.node, now, now + dt.timedelta(seconds=ttl), hash_secret(secret))
    _with_store(config, lambda store: store.create_token(info))
    token = f"{token_id}.{secret}"
    print(json.dumps({**_token_json(info), "token": token}) if args.json else token)
    return 0


def _token_json(token: TokenInfo) -> dict[str, Any]:
    return {"id": token.id, "node": token.node, "expires": pki.iso(token.expires)}


def cmd_node(args: argparse.Namespace) -> int:
    if not is_dns_subdomain(args.name):
        raise UsageError(f"{args.name!r} is not a valid node name")
    revoked = args.action == "revoke"
    _with_store(_config(args), lambda store: store.set_node_revoked(args.name, revoked, _now()))
    print(f"node {args.name}: issuance {'refused' if revoked else 'allowed'}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    since = None
    if args.since is not None:
        try:
            since = _now() - dt.timedelta(seconds=positive_duration(args.since))
        except ValueError as exc:
            raise UsageError(f"--since: {exc}") from exc
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.offset < 0:
        raise UsageError("--offset must not be negative")
    # One more than asked for says whether older records exist.
    records = _with_store(
        _config(args),
        lambda store: store.audit(
            args.node, args.limit + 1, since=since, claims_only=args.claims, offset=args.offset
        ),
    )
    if len(records) > args.limit:
        records = records[1:]  # oldest first: the extra one is the oldest
        print(
            f"kubecertd-signer: note: showing the newest {args.limit} matching records"
            f"{f' after the newest {args.offset}' if args.offset else ''}; older ones exist"
            f" (--limit N shows more, --offset {args.offset + args.limit} the next page)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps([_record_json(r) for r in records], indent=2))
        return 0
    rows = [
        [
            pki.iso(r.time),
            r.endpoint,
            r.node or "-",
            r.identity,
            r.outcome if r.code is None else f"{r.outcome}:{r.code}",
            r.serial or "-",
            r.reason or "-",
        ]
        for r in records
    ]
    notes = [_claimed_node_lines(r) + _claim_lines(r) for r in records]
    _table(["TIME", "ENDPOINT", "NODE", "IDENTITY", "OUTCOME", "SERIAL", "REASON"], rows, notes)
    return 0


def _claim_lines(record: AuditRecord) -> list[str]:
    """The record's claim under its row, one line per line, each saying whose word it is.

    The indent keeps a claim line from passing for a row of the table; non-printable
    characters (none get past the API, but the database is not the API) are escaped.
    """
    if record.claim is None:
        return []
    who = f"  {record.node or 'the node'} claims: "
    return [who + _printable(line) for line in record.claim.split("\n")]


def _claimed_node_lines(record: AuditRecord) -> list[str]:
    """The node the request's CSR named, when that is not the record's node: its word."""
    if record.claimed_node is None:
        return []
    return [f"  the request claims node {_printable(record.claimed_node)} (unverified)"]


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)


def _record_json(record: AuditRecord) -> dict[str, Any]:
    def when(moment: dt.datetime | None) -> str | None:
        return pki.iso(moment) if moment else None

    return {
        "time": when(record.time),
        "endpoint": record.endpoint,
        "node": record.node,
        "identity": record.identity,
        "reason": record.reason,
        "outcome": record.outcome,
        "code": record.code,
        "message": record.message,
        "key_fingerprint": record.key_fingerprint,
        "serial": record.serial,
        "not_before": when(record.not_before),
        "not_after": when(record.not_after),
        "peer": record.peer,
        "claim": record.claim,
        "claimed_node": record.claimed_node,
    }


def _table(
    header: list[str], rows: list[list[str]], notes: Sequence[list[str]] | None = None
) -> None:
    """Columns two spaces apart, each row followed by its ``notes`` lines as they are."""
    notes = notes or [[] for _row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row, after in zip([header, *rows], [[], *notes], strict=True):
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )
        for line in after:
            print(line)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init": cmd_init,
    "serve": cmd_serve,
    "token": cmd_token,
    "node": cmd_node,
    "audit": cmd_audit,
}

if __name__ == "__main__":
    sys.exit(main())
