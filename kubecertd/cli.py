"""``kubecertd``: the node agent's command line (SPEC "Command line").

Only what ``--check`` needs is imported at the top: the daemon's HTTP client, D-Bus and
inotify modules load inside the commands that use them, so a provisioning script's
``kubecertd --check`` stays fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from .config import Config, read_config
from .diagnose import CheckPolicy, Diagnosis, diagnose
from .errors import KubecertdError, UsageError
from .evidence import observe
from .layout import Layout
from .locate import locate
from .material import read_layout


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, sized without ``shutil``, whose import (bz2, lzma) would
    cost ``--check`` a few milliseconds on every run: argparse makes a formatter for
    each argument it adds."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size().columns
        except (ValueError, OSError):
            columns = 80
        super().__init__(prog, width=max(columns, 40) - 2)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` owns every exit status."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_Formatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _add_common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS lets --config stand before or after the subcommand without one
    # position's default overwriting the other's value.
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default $KUBECERTD_CONFIG or /etc/kubecertd/kubecertd.toml)",
    )


def _add_check_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fix",
        action="store_true",
        default=argparse.SUPPRESS,
        help="heal what can be healed, then diagnose again",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the diagnosis as one JSON object",
    )
    parser.add_argument(
        "--no-restart",
        action="store_true",
        default=argparse.SUPPRESS,
        help="with --fix: do not restart kubelet",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kubecertd", description="Keeps this node's kubelet certificate healthy.")
    parser.add_argument("--version", action="version", version=f"kubecertd {__version__}")
    parser.add_argument(
        "--check", action="store_true", help="diagnose the certificate files once and exit"
    )
    _add_check_flags(parser)
    _add_common(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_common(commands.add_parser("run", help="run the daemon in the foreground (the default)"))
    check = commands.add_parser("check", help="the same as --check")
    _add_check_flags(check)
    _add_common(check)
    enroll = commands.add_parser(
        "enroll", help="get this node's identity certificate with a one-time token"
    )
    enroll.add_argument(
        "--token", required=True, help="the token from kubecertd-signer token create"
    )
    _add_common(enroll)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.check:
        if args.command not in (None, "check"):
            raise UsageError(f"--check cannot be combined with the {args.command} command")
        args.command = "check"
    args.command = args.command or "run"
    for flag in ("fix", "json", "no_restart"):
        if getattr(args, flag, False) and args.command != "check":
            raise UsageError(f"--{flag.replace('_', '-')} goes with --check")
    if getattr(args, "no_restart", False) and not getattr(args, "fix", False):
        raise UsageError("--no-restart goes with --check --fix")
    return args


def load(args: argparse.Namespace) -> Config:
    return read_config(getattr(args, "config", None))


def check_files(config: Config, layout: Layout, now: dt.datetime | None = None) -> Diagnosis:
    """Read the credentials where ``layout`` keeps them and diagnose them (never changes
    anything on disk)."""
    material = read_layout(layout)
    when = now or dt.datetime.now(dt.timezone.utc)
    policy = CheckPolicy.from_config(config, os.geteuid())
    return observe(diagnose(material, config.node_name, when, policy), layout)


def cmd_check(args: argparse.Namespace) -> int:
    """The report always reaches stdout, also when ``--fix`` failed (then exit 1 or 2)."""
    config, layout = locate(load(args))
    report = None
    if getattr(args, "fix", False):
        from .oneshot import fix  # noqa: PLC0415 - the healing stack is not for plain --check

        diagnosis, report = fix(config, layout, restart=not getattr(args, "no_restart", False))
    else:
        diagnosis = check_files(config, layout)
    changes = recorded_changes(config.daemon.state_dir, [f.path for f in diagnosis.files])
    if getattr(args, "json", False):
        from .report import render_json  # noqa: PLC0415

        print(render_json(diagnosis, layout, report, changes))
    else:
        from .report import render_text  # noqa: PLC0415

        print(render_text(diagnosis, layout, report, changes))
    if report is not None and report.error is not None:
        print(f"kubecertd: error: {report.error}", file=sys.stderr)
        return report.error.exit_code
    return 0 if diagnosis.healthy else 1


def recorded_changes(state_dir: str, paths: list[str]) -> dict[str, Any]:
    """While the daemon runs, the last change its witness recorded to each of ``paths``
    (``{path: Culprit}``); {} when it does not run or recorded none."""
    import fcntl  # noqa: PLC0415

    try:
        lock = os.open(os.path.join(state_dir, "kubecertd.lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        running = False  # nobody holds it: no daemon, so nothing it recorded is current
    except BlockingIOError:
        running = True
    finally:
        os.close(lock)
    if not running:
        return {}
    from .culprit import STATE_FILE, Book  # noqa: PLC0415 - only while the daemon runs
    from .material import read_file  # noqa: PLC0415

    state = read_file(os.path.join(state_dir, STATE_FILE))
    try:
        book = Book.from_json(state.data or b"")
    except ValueError:
        return {}
    found = {path: book.latest(path) for path in paths}
    return {path: record for path, record in found.items() if record is not None}


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import run_daemon  # noqa: PLC0415

    return run_daemon(load(args))


def cmd_enroll(args: argparse.Namespace) -> int:
    import contextlib  # noqa: PLC0415

    from .locate import LayoutNotFound  # noqa: PLC0415
    from .oneshot import enroll  # noqa: PLC0415

    # The identity is for the node name the daemon uses: kubelet's --hostname-override
    # when its unit has one.  A node whose kubelet is not set up yet may enroll all the same.
    config = load(args)
    with contextlib.suppress(LayoutNotFound):
        config, _layout = locate(config)
    print(enroll(config, args.token))
    return 0


COMMANDS = {"check": cmd_check, "run": cmd_run, "enroll": cmd_enroll}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        return COMMANDS[args.command](args)
    except KubecertdError as exc:
        print(f"kubecertd: error: {exc}", file=sys.stderr)
        if "--json" in argv:  # a script reading stdout gets its one JSON object all the same
            from .report import render_json_error  # noqa: PLC0415

            print(render_json_error(exc))
        return exc.exit_code
    except SystemExit as exc:  # --version and --help end through argparse's exit()
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`kubecertd --check | head`): silence the flush at exit.
        # https://docs.python.org/3/library/signal.html#note-on-sigpipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def entry() -> NoReturn:
    """The console script: ``main()``, then an exit that skips the interpreter's teardown.

    Tearing down cryptography's and the standard library's modules is 8% of the
    instructions of a ``kubecertd --check``, about 20 ms (BENCHMARKS.md), and kubecertd
    needs none of it: ``main`` closes its locks and files on the way out, and the output
    is flushed here.  Instagram's uWSGI workers skip it the same way:
    https://instagram-engineering.com/dismissing-python-garbage-collection-at-instagram-4dca40b29172
    """
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the reader went away (`kubecertd --check | head -1`)
        status = status or 1
    os._exit(status)


if __name__ == "__main__":
    entry()
