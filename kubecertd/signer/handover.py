"""A signer that ran as root, handed to the user it runs as now (the package's postinst).

Before issue 13 ``kubecertd-signer.service`` ran as root, and ``init`` left the keys
root's (0600) in a folder only root may enter (0700). The package's postinst runs
``python -m kubecertd.signer.handover`` once, in the configure that creates the
``kubecertd-signer`` user. Of what the unit's config (``UNIT_CONFIG``) names, every file
under /etc/kubecertd that the user could not read, and every folder below /etc/kubecertd
on the way to one that it could not enter, is given to the user when root owns it. Modes
never change, and nothing outside /etc/kubecertd is touched: such a file, and one another
user owns, is only named on stderr with what to do. The state needs nothing here:
systemd hands a ``StateDirectory=`` that another user owns, with all in it, to ``User=``
when the unit starts (systemd.exec(5)).
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import KubecertdError
from .authority import SERVICE_USER
from .config import UNIT_CONFIG, SignerConfig, read_signer_config, split_listen

ROOT = "/etc/kubecertd"
READ, SEARCH = 4, 1  # permission bits of one class: r for a file, x for a folder


@dataclass(frozen=True)
class Handover:
    chown: tuple[str, ...]  # to give to the user, folders before what they hold
    notes: tuple[str, ...]  # what the operator has to do by hand


def allows(info: os.stat_result, uid: int, gid: int, want: int) -> bool:
    """Whether ``uid`` (whose only group is ``gid``) has ``want``, judged by the one class
    of the mode that applies, as the kernel does (ACLs aside)."""
    if info.st_uid == uid:
        return bool(info.st_mode >> 6 & want)
    if info.st_gid == gid:
        return bool(info.st_mode >> 3 & want)
    return bool(info.st_mode & want)


def plan(
    config: SignerConfig,
    user: pwd.struct_passwd,
    lookup: Callable[[str], os.stat_result | None],
    root: str = ROOT,
) -> Handover:
    """What to give to ``user`` so that the signer can read every file ``config`` names.
    Reads the file system only through ``lookup`` (a path's stat, None when it does not
    exist) and ``os.path.realpath``."""
    chown: list[str] = []
    notes: list[str] = []
    seen: set[str] = set()
    pairs = (config.cluster_ca, config.identity_ca, config.tls)
    for path in dict.fromkeys(name for pair in pairs for name in pair):
        if lookup(path) is None:
            continue  # serve names it when it starts; nothing to hand over
        steps = _steps(path, root)
        for step in steps:
            info = lookup(step)
            want = READ if step == steps[-1] else SEARCH
            if info is None or step in seen or allows(info, user.pw_uid, user.pw_gid, want):
                continue
            seen.add(step)
            if info.st_uid == 0 and step.startswith(f"{root}/"):
                chown.append(step)
            else:
                owner = "root" if info.st_uid == 0 else f"uid {info.st_uid}"
                notes.append(
                    f"{step} ({owner}, mode {stat.S_IMODE(info.st_mode):04o}): user "
                    f"{user.pw_name} cannot {'read' if want == READ else 'enter'} it, and it "
                    f"is left as it is; give it to {user.pw_name} (chown) or let it in"
                )
    port = split_listen(config.listen)[1]
    if port < 1024:  # the privileged ports (net.ipv4.ip_unprivileged_port_start)
        notes.append(
            f"{config.source}: listen = {config.listen!r}: a port below 1024 needs "
            "CAP_NET_BIND_SERVICE, which kubecertd-signer.service no longer has; add the "
            "drop-in the unit's comment shows (systemctl edit kubecertd-signer)"
        )
    return Handover(tuple(chown), tuple(notes))


def _steps(path: str, root: str) -> list[str]:
    """The folders from ``root`` down to ``path``, then ``path`` itself; every part is
    resolved first, so that a symlink leads to what it names (outside ``root`` too)."""
    real = os.path.realpath(path)
    steps = [real]
    parent = os.path.dirname(real)
    while parent.startswith(f"{root}/") or parent == root:
        steps.insert(0, parent)
        parent = os.path.dirname(parent)
    return steps


def _lookup(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def main(argv: Sequence[str] | None = None, root: str = ROOT) -> int:
    """``[CONFIG [USER]]`` (default the unit's config and kubecertd-signer); 0 also when
    something is left for the operator (stderr says what), 1 when the config or the user
    cannot be read."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = args[0] if args else UNIT_CONFIG
    name = args[1] if len(args) > 1 else SERVICE_USER
    if not os.path.exists(path):
        return 0  # no signer set up here
    try:
        config = read_signer_config(path)
        user = pwd.getpwnam(name)
    except KeyError:
        print(f"kubecertd-signer: not handed over: no user {name}", file=sys.stderr)
        return 1
    except KubecertdError as exc:
        print(f"kubecertd-signer: not handed over to {name}: {exc}", file=sys.stderr)
        return 1
    handover = plan(config, user, _lookup, root)
    for step in handover.chown:
        try:
            os.chown(step, user.pw_uid, user.pw_gid)
        except OSError as exc:
            print(
                f"kubecertd-signer: warning: {step}: cannot chown: {exc.strerror}", file=sys.stderr
            )
            continue
        print(f"kubecertd-signer: {step} now belongs to {name} (mode kept)")
    for note in handover.notes:
        print(f"kubecertd-signer: warning: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
