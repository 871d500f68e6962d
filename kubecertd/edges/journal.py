"""Structured events to journald (systemd-python), shared by the agent and the signer.

Every event carries ``KUBECERTD_EVENT`` and a fixed ``MESSAGE_ID`` per event kind, so
``journalctl -u kubecertd KUBECERTD_EVENT=renewed`` and ``journalctl -x`` (with
``systemd/kubecertd.catalog``) work.  Without a journal socket (a developer's shell,
a container) the event is one line on stderr instead, never an exception.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# One fixed MESSAGE_ID per event kind; systemd/kubecertd.catalog explains each.
MESSAGE_IDS = {
    "check": "6639407f26b2492b90fbf80a0f6b3d3b",
    "finding": "b512c1cda7234253a6b4b08e7be000ab",
    "renew-start": "c444bfe99d6b4c2d8c1794fbdc14aabc",
    "renewed": "248a65b3aff540868eecd68dde5bacb3",
    "renew-failed": "163ca7d97b5746799dc5a8ca3962c435",
    "installed": "1cdcd0cfef7a4f9082188f1bf2b84a95",
    "kubelet-restarted": "b221181627f54b0f811c7f4b7b1db2df",
    "rollback": "484ec0123ed5421098294894bef94ebc",
    "signer-error": "0998064c38ee4dcbb70603e0e35c5d67",
    "issued": "f1a455d6d9fc45e585991e133c894af6",
    "refused": "5670585f3a7d4467b16cf22f0e2938e6",
    "enrolled": "c2b013cfb8ef44c8a81f132771d0dc66",
    "culprit": "4c9513ce0dd24f33a197411fc1d84056",
    "witness": "02fe3644c79142aeaf7deb3d29e4662b",
}

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# syslog priorities
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6


def send(event: str, message: str, priority: int = INFO, **fields: Any) -> None:
    """One journal entry: MESSAGE, MESSAGE_ID, KUBECERTD_EVENT and KUBECERTD_* fields.

    ``fields`` are given without the prefix (``node=...`` becomes ``KUBECERTD_NODE``);
    None values are left out.
    """
    entries = {
        f"KUBECERTD_{key.upper()}": str(value) for key, value in fields.items() if value is not None
    }
    try:
        if not os.path.exists(JOURNAL_SOCKET):  # sd_journal_send() drops entries silently then
            raise FileNotFoundError(JOURNAL_SOCKET)
        from systemd import journal  # type: ignore[attr-defined]  # noqa: PLC0415 - not on the --check path

        journal.send(
            message,
            MESSAGE_ID=MESSAGE_IDS[event],
            PRIORITY=str(priority),
            SYSLOG_IDENTIFIER=_identifier(),
            KUBECERTD_EVENT=event,
            **entries,
        )
    except (ImportError, OSError):
        details = " ".join(f"{k}={v}" for k, v in sorted(entries.items()))
        print(f"{_identifier()}: {event}: {message} {details}".rstrip(), file=sys.stderr)


def _identifier() -> str:
    name = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else ""
    return name if name.startswith("kubecertd") else "kubecertd"
