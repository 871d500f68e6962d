"""Living with kubelet: its own rotation, its restarts and its own words (pure).

Nothing here reads a file, the clock or the journal; the edges do
(``edges.clock``, ``edges.kubelet_log``) and pass what they found in.

Facts these decisions follow, read in kubelet's sources (kubernetes/kubernetes):

- Rotation: ``rotateCertificates`` in the ``--config`` KubeletConfiguration, or the
  deprecated ``--rotate-certificates`` flag; off by default.  A flag given on the command
  line wins over the file: cmd/kubelet/app/server.go loads the file, then
  ``kubeletConfigFlagPrecedence`` "re-parses flags over the KubeletConfiguration object"
  (kubernetes issue #56171).  Not modelled: ``--config-dir`` drop-ins (1.28+), which are
  merged before that re-parse and may set ``rotateCertificates`` too.
- Reload (notes "kubelet-layouts" section 4): with rotation on, client-go's certificate
  manager keeps the pair in memory and only its own rotation replaces it; credentials
  embedded in the kubeconfig are static; with rotation off and a kubeconfig naming
  files, kubelet >= 1.18 re-reads them for new connections (kubernetes PR #79083).
  The CA is read once at start (files are re-read only from 1.36, behind a gate).
- The lines kubelet logs when its credentials fail: see ``_PATTERNS``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from .diagnose import ERROR, Finding

if TYPE_CHECKING:  # discover is imported only when a unit is read; the clock is an edge
    from .discover import KubeletConfig, KubeletFlags
    from .edges.clock import ClockState

INFO = "info"  # a fact worth showing that asks nothing of anyone

ROTATION_HINT = "kubecertd only watches; it acts when kubelet cannot recover (expired, another node's, untrusted, missing or corrupt, not a symlink)"
CLOCK_HINT = "fix time synchronization (timedatectl timesync-status); kubecertd requests nothing until it is synchronized"

# Findings an unsynchronized clock can produce by itself.
CLOCK_CODES = ("cert-expired", "cert-not-yet-valid", "ca-expired")

# kubelet >= 1.18 re-reads client certificate files named by its kubeconfig (PR #79083).
RELOADS_FILES_SINCE = (1, 18, 0)

# --- kubelet's own rotation ---------------------------------------------------------------


class Rotation(NamedTuple):
    on: bool
    source: str  # what decided, for --check and the journal


def rotation_of(
    flags: KubeletFlags | None,
    config: KubeletConfig | None,
    config_error: str | None = None,
    unit: str | None = None,
) -> Rotation:
    """Whether kubelet rotates its client certificate itself, and what says so.

    ``flags`` are kubelet's command-line flags (``unit`` names where they were read),
    ``config`` its KubeletConfiguration when read, ``config_error`` why it could not be.
    The flag wins over the file, as in kubelet.  An unreadable file counts as off:
    kubelet refuses to start with it ("failed to load kubelet config file"), so nothing
    rotates.
    """
    where = f"of {unit}" if unit else "on kubelet's command line"
    flag = flags.rotate_certificates if flags is not None else None
    if flag is not None:
        written = "--rotate-certificates" if flag else "--rotate-certificates=false"
        overridden = ""
        if config is not None and config.rotate_certificates not in (None, flag):
            overridden = f" (over rotateCertificates: {_yaml(config.rotate_certificates)} in {config.path}: kubelet's flags win)"
        return Rotation(flag, f"{written} {where}{overridden}")
    if config is not None:
        if config.rotate_certificates is None:
            return Rotation(
                False, f"no rotateCertificates in {config.path}: off (kubelet's default)"
            )
        return Rotation(
            config.rotate_certificates,
            f"rotateCertificates: {_yaml(config.rotate_certificates)} in {config.path}",
        )
    if config_error:
        return Rotation(
            False,
            f"KubeletConfiguration unreadable, taken as off (kubelet would not start): {config_error}",
        )
    if flags is not None and flags.config:
        return Rotation(False, f"--config {flags.config} {where} was not read: taken as off")
    return Rotation(False, "no KubeletConfiguration and no flag: off (kubelet's default)")


def _yaml(value: bool | None) -> str:
    return "true" if value else "false"


def rotation_finding(rotation: Rotation, healthy: bool, cert_path: str) -> Finding | None:
    """``rotation-managed`` (info) when kubelet rotates a healthy certificate itself."""
    if not (rotation.on and healthy):
        return None
    return Finding(
        "rotation-managed",
        INFO,
        cert_path,
        f"kubelet rotates this certificate itself ({rotation.source})",
        ROTATION_HINT,
    )


# --- restarts -----------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int, int] | None:
    """kubelet's version from ``kubelet --version`` (``Kubernetes v1.29.3``), a k3s or RKE2
    ``--version`` (``k3s version v1.29.3+k3s1 (…)``), or a setting (``1.30``); None when
    the text holds no version."""
    found = re.search(_VERSION, text)
    if found is None:
        return None
    major, minor, patch = found.groups()
    return int(major), int(minor), int(patch or 0)


# Not inside a word ("go1.21.8", k3s's second line) nor a longer dotted number (an address).
_VERSION = r"(?<![\w.])v?(\d{1,4})\.(\d{1,4})(?:\.(\d{1,6}))?(?!\.?\d)"


class Restart(NamedTuple):
    needed: bool
    why: str  # one line for the journal


MODES = ("auto", "true", "false")


def restart_decision(
    mode: str,
    shape: str,
    rotation: bool,
    version: tuple[int, int, int] | None,
    ca_changed: bool,
    running: bool,
) -> Restart:
    """Whether kubelet must be restarted to use a newly installed pair.

    ``mode`` is ``[kubelet] restart``; ``shape`` the layout's (``files``, ``store`` or
    ``embedded``).  ``auto`` restarts only when kubelet would not pick the new pair up
    by itself.  The store shape with rotation off is read through the kubeconfig's file
    paths like split files, so it reloads the same way.
    """
    if mode not in MODES:
        raise ValueError(f"[kubelet] restart is {mode!r}, not one of {', '.join(MODES)}")
    if mode == "true":
        return Restart(True, "[kubelet] restart = true")
    if mode == "false":
        return Restart(False, "[kubelet] restart = false")
    named = "kubelet" if version is None else f"kubelet {_dotted(version)}"
    if not running:
        return Restart(
            True, "kubelet is not running; starting it is what makes it read the new pair"
        )
    if shape == "embedded":
        return Restart(
            True, f"{named} reads credentials embedded in its kubeconfig only when it starts"
        )
    if rotation:
        return Restart(True, f"{named} with rotation on keeps its certificate in memory")
    if ca_changed:
        # Files of a CA are re-read from 1.36 only, behind ClientsAllowCARotation: restart anyway.
        return Restart(
            True, f"{named} reads the cluster CA only when it starts, and the CA changed"
        )
    if shape not in ("files", "store"):
        return Restart(True, f"shape {shape!r} is not known to be reloaded by kubelet")
    if version is None:
        return Restart(
            True,
            "kubelet's version is unknown (kubelet --version did not answer; set [kubelet] version): only kubelet >= 1.18 reloads client certificate files",
        )
    if version < RELOADS_FILES_SINCE:
        return Restart(
            True, f"{named} predates 1.18, the first kubelet to reload client certificate files"
        )
    return Restart(False, f"{named} (>= 1.18) reloads client certificate files by itself")


def _dotted(version: tuple[int, int, int]) -> str:
    return ".".join(str(part) for part in version)


# --- kubelet's own words ------------------------------------------------------------------


class KubeletLine(NamedTuple):
    kind: str  # a key of FINDINGS_OF_KIND
    line: str  # as kubelet logged it, trimmed to at most MAX_LINE characters


MAX_LINE = 300

# A quote as %q prints it, or as klog's structured values escape it (err="… \"a\" …").
_Q = r'\\?"'
_NAME = r'[^"\\\s]*'

# kind -> what kubelet logs, in the order they are tried.  Sources (kubernetes/kubernetes
# unless said): client-go util/certificate/certificate_store.go ``updateSymlink``;
# pkg/kubelet/certificate/bootstrap/bootstrap.go ``isClientConfigStillValid`` (with the
# path since PR #98230, "Part … is expired" before); pkg/kubelet/certificate/transport.go
# (exits, or warns when the server is not responsive); Go's crypto/x509
# ``CertificateInvalidError`` for an expired chain; NodeRestriction
# plugin/pkg/admission/noderestriction/admission.go ``admitNode`` ("is not allowed to
# modify node", "cannot modify node" before PR #71396); the Node authorizer
# plugin/pkg/auth/authorizer/node/node_authorizer.go ("unknown node for user", and the
# lease rule); a 401 answer's Status message "Unauthorized" as client-go reports it.
# Plain strings: re compiles (and caches) them at the first line read, not at import.
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("not-symlink", rf"expected {_Q}[^\"\\]*{_Q} to be a symlink but it is a file"),
    (
        "bootstrap-expired",
        r"[Pp]art of the existing bootstrap client certificate (?:in \S+ )?is expired",
    ),
    ("current-expired", r"The currently active client certificate has expired"),
    ("cert-expired", r"x509: certificate has expired or is not yet valid"),
    (
        "wrong-node",
        rf"node {_Q}{_NAME}{_Q} (?:cannot|is not allowed to) modify node {_Q}{_NAME}{_Q}"
        r"|can only access node lease with the same name as the requesting node",
    ),
    ("unknown-node", rf"unknown node for user {_Q}"),
    # The whole error is "Unauthorized": after "…: " or as err="Unauthorized"; not a word
    # inside some other sentence.
    ("unauthorized", r'(?::\s+|\berr=\\?")Unauthorized(?=\\?"|\s*$)'),
)

# kubelet as a server judging *its* clients (the API server, metrics scrapers): a line
# about someone else's certificate, whatever it says.
_NOT_ABOUT_KUBELETS_OWN = "Unable to authenticate the request"

# Which finding codes each kind agrees with, i.e. could be kubelet's view of that finding:
# - wrong-node: NodeRestriction and the lease rule refuse a node writing another's objects;
#   that is a CN naming another node.
# - unknown-node: the Node authorizer saw an identity with O=system:nodes and a CN
#   "system:node:" with nothing after it (nodeidentifier/default.go): a wrong CN.  Not
#   cert-wrong-group: without that group the identity is no node at all, and RBAC
#   refuses it ('User "system:node:a" cannot get resource …') instead.
# - unauthorized: authentication (401) failed, so the API server did not accept the
#   certificate as a client certificate: untrusted, outside its validity (on the API
#   server's clock, so a skewed node clock shows up as either), without clientAuth, or
#   under a CA that has expired.  Not cert-wrong-group (an authenticated user, refused
#   later: 403), not ca-missing/invalid/not-ca (kubelet cannot even load its kubeconfig).
# - cert-expired: Go's chain check failed on kubelet's clock, for the API server's chain:
#   a clock off (as F6 in the notes), an expired CA, or a cluster whose certificates all
#   expired together.  Kubelet does not check its own client certificate this way.
# - bootstrap-expired, current-expired: kubelet's own client certificate expired on its
#   clock.
# - not-symlink: rotation found a regular file where its symlink belongs.
# Every kind that agrees with an expiry also agrees with clock-unsynced, the finding that
# says those expiries may be the clock's.
FINDINGS_OF_KIND: dict[str, frozenset[str]] = {
    "wrong-node": frozenset({"cert-wrong-node"}),
    "unknown-node": frozenset({"cert-wrong-node"}),
    "unauthorized": frozenset(
        {
            "cert-untrusted",
            "cert-expired",
            "cert-not-yet-valid",
            "cert-wrong-usage",
            "ca-expired",
            "clock-unsynced",
        }
    ),
    "cert-expired": frozenset(
        {"cert-expired", "cert-not-yet-valid", "ca-expired", "clock-unsynced"}
    ),
    "bootstrap-expired": frozenset({"cert-expired", "clock-unsynced"}),
    "current-expired": frozenset({"cert-expired", "clock-unsynced"}),
    "not-symlink": frozenset({"cert-not-symlink"}),
}
KINDS = tuple(kind for kind, _pattern in _PATTERNS)


def match_line(text: str) -> KubeletLine | None:
    """The kind of credential failure a kubelet log line reports, or None."""
    if _NOT_ABOUT_KUBELETS_OWN in text:
        return None
    for kind, pattern in _PATTERNS:
        found = re.search(pattern, text)
        if found is not None:
            return KubeletLine(kind, _excerpt(text, found.start(), found.end()))
    return None


def _excerpt(text: str, start: int, end: int) -> str:
    """The line trimmed; when longer than MAX_LINE, a window of it that shows the match."""
    stripped = text.strip()
    if len(stripped) <= MAX_LINE:
        return stripped
    shift = len(text) - len(text.lstrip())
    start, end = start - shift, end - shift
    room = MAX_LINE - 2  # for an ellipsis on either side
    begin = max(0, min(max(start - 60, end - room), start, len(stripped) - room))
    cut = stripped[begin : begin + room]
    return ("…" if begin else "") + cut + ("…" if begin + room < len(stripped) else "")


def agreeing_line(code: str, lines: Sequence[KubeletLine]) -> KubeletLine | None:
    """The newest line (``lines`` are oldest first) that agrees with finding ``code``."""
    for line in reversed(lines):
        if code in FINDINGS_OF_KIND.get(line.kind, frozenset()):
            return line
    return None


def failure_after(lines: Sequence[KubeletLine]) -> KubeletLine | None:
    """The newest failure line: after a heal, kubelet is well when there is none."""
    return lines[-1] if lines else None


# --- the clock ----------------------------------------------------------------------------


def clock_finding(clock: ClockState, codes: Sequence[str], path: str) -> Finding | None:
    """``clock-unsynced`` when the clock is known to be unsynchronized and a finding
    it alone could cause is among ``codes``."""
    if clock.synchronized is not False:
        return None
    suspects = [code for code in CLOCK_CODES if code in codes]
    if not suspects:
        return None
    return Finding(
        "clock-unsynced",
        ERROR,
        path,
        f"the clock is not synchronized ({clock.source}); {', '.join(suspects)} may be the clock's fault, not the certificate's",
        CLOCK_HINT,
    )
