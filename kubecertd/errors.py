"""The one exception tree of kubecertd; each error carries the exit status it means.

    KubecertdError                exit 1  (root: main() prints one line and returns .exit_code)
    ├── UsageError                exit 2  a bad flag or argument
    ├── ConfigError               exit 2  a bad config file, key, type or value
    ├── LockHeld                  exit 1  another kubecertd holds the lock in state_dir
    ├── SignerError               exit 1  anything between the agent and the signer
    │   ├── SignerUnreachable             connection, TLS or timeout; retried with backoff
    │   └── SignerRefused                 the signer answered with a SPEC error code
    ├── VerificationError         exit 1  the signer's answer failed our checks; nothing written
    ├── InstallError              exit 1  the files could not be written (the old pair stays)
    └── UnitError                 exit 1  systemd refused or failed a kubelet restart

Lower-level exceptions (OSError, ValueError, http.client's and jeepney's) are wrapped once,
at the edge that meets them, with ``raise ... from exc``.
"""

from __future__ import annotations


class KubecertdError(Exception):
    """Root of every error kubecertd reports to a person."""

    exit_code = 1


class UsageError(KubecertdError):
    exit_code = 2


class ConfigError(KubecertdError):
    exit_code = 2


class LockHeld(KubecertdError):
    pass


class SignerError(KubecertdError):
    pass


class SignerUnreachable(SignerError):
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


class VerificationError(KubecertdError):
    pass


class InstallError(KubecertdError):
    pass


class UnitError(KubecertdError):
    pass
