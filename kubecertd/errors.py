"""The one exception tree of kubecertd; each error carries its exit status and a code.

    KubecertdError                exit 1  (root: main() prints one line and returns .exit_code)
    ├── UsageError                exit 2  a bad flag or argument
    ├── ConfigError               exit 2  a bad config file, key, type or value
    ├── LockHeld                  exit 1  another kubecertd holds the lock in state_dir
    ├── SignerError               exit 1  anything between the agent and the signer
    │   ├── SignerUnreachable             connection, timeout or 5xx; retried with backoff
    │   ├── SignerRefused                 the signer answered with a SPEC error code
    │   ├── NoIdentity                    no node identity, and no healthy kubelet pair to
    │                                     stand in for one: enroll first
    │   └── SignerMisconfigured   exit 2  this node's side cannot work as configured (no URL,
    │                                     a trust anchor or identity that does not load, a
    │                                     signer or identity the other side rejects in the
    │                                     handshake): waiting cannot fix it, never retried
    ├── VerificationError         exit 1  the signer's answer failed our checks; nothing written
    ├── InstallError              exit 1  the files could not be written (the old pair stays)
    └── UnitError                 exit 1  systemd refused or failed a kubelet restart

``code`` is the stable name of the error in ``--json`` output (SPEC "Errors in JSON");
a ``SignerRefused`` carries the signer's own code (``forbidden-node``, ``token-invalid``).
Lower-level exceptions (OSError, ValueError, http.client's and jeepney's) are wrapped once,
at the edge that meets them, with ``raise ... from exc``.
"""

from __future__ import annotations


class KubecertdError(Exception):
    """Root of every error kubecertd reports to a person."""

    exit_code = 1
    code = "error"


class UsageError(KubecertdError):
    exit_code = 2
    code = "usage-error"


class ConfigError(KubecertdError):
    exit_code = 2
    code = "config-error"


class LockHeld(KubecertdError):
    code = "lock-held"


class SignerError(KubecertdError):
    code = "signer-error"


class SignerUnreachable(SignerError):
    code = "signer-unreachable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SignerRefused(SignerError):
    """The signer said no; ``code`` is SPEC's error code (``forbidden-node``, ...)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"signer refused ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.retry_after = retry_after


class NoIdentity(SignerError):
    code = "no-identity"


class SignerMisconfigured(SignerError):
    exit_code = 2
    code = "signer-misconfigured"


class VerificationError(KubecertdError):
    code = "verification-failed"


class InstallError(KubecertdError):
    code = "install-failed"


class UnitError(KubecertdError):
    code = "restart-failed"
