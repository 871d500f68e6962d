"""The thin I/O step before diagnosis: what is on disk, read once, as plain data.

``read_material`` never raises for a file's state: a missing, unreadable or huge file
is recorded as such and judged by the pure ``diagnose``.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .layout import Layout

# No certificate, bundle or key of a kubelet comes near this; anything larger is not one.
MAX_FILE_BYTES = 1 << 20


class FileState(NamedTuple):
    path: str
    data: bytes | None = None  # None when missing or unreadable
    missing: bool = False
    error: str | None = None  # why it could not be read (strerror), when it exists
    mode: int | None = None  # permission bits, when stat() worked
    uid: int | None = None
    too_large: bool = False
    not_symlink: bool = False  # a regular file where kubelet's store keeps a symlink


class Material(NamedTuple):
    ca: FileState
    cert: FileState
    key: FileState
    problems: tuple[tuple[str, str], ...] = ()  # (kubeconfig, message): why it cannot be read


def read_file(path: str) -> FileState:
    try:
        # O_NOFOLLOW is not used: ssl_dir entries are often symlinks into a config tree.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return FileState(path, missing=True)
        return _unreadable(path, exc)
    try:
        info = os.fstat(fd)
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return _unreadable(path, exc)
    finally:
        os.close(fd)
    return FileState(
        path,
        data=data[:MAX_FILE_BYTES],
        mode=info.st_mode & 0o7777,
        uid=info.st_uid,
        too_large=len(data) > MAX_FILE_BYTES,
    )


def _unreadable(path: str, exc: OSError) -> FileState:
    """A file that exists but cannot be read; its mode still matters to the diagnosis."""
    reason = exc.strerror or str(exc)
    try:
        info = os.stat(path)
    except OSError:
        return FileState(path, error=reason)
    return FileState(path, error=reason, mode=info.st_mode & 0o7777, uid=info.st_uid)


def read_material(ca: str, cert: str, key: str) -> Material:
    return Material(read_file(ca), read_file(cert), read_file(key))


def read_layout(layout: Layout) -> Material:
    """The CA, certificate and key wherever ``layout`` keeps them, read once.

    Embedded data is decoded from the kubeconfig, which is parsed again on every read
    (it is what kubelet reads at its next start); each embedded credential then carries
    the kubeconfig's mode and owner.  A kubeconfig that cannot be read is a problem for
    the diagnosis (``kubeconfig-invalid``), and what it holds is unreadable.
    """
    problems = layout.problems
    parsed: dict[str, FileState] = {}
    if any(place.embedded for place in (layout.ca, layout.cert, layout.key)):
        parsed, problem = _read_embedded(layout)
        if problem is not None and problem not in problems:
            problems += (problem,)
    states = []
    for place in (layout.ca, layout.cert, layout.key):
        if place.key is not None:
            states.append(parsed[place.key])
        else:
            states.append(read_file(place.path))
    cert = states[1]
    if layout.store is not None and not cert.missing and not os.path.islink(cert.path):
        cert = cert._replace(not_symlink=True)
    return Material(states[0], cert, states[2], problems)


def _read_embedded(layout: Layout) -> tuple[dict[str, FileState], tuple[str, str] | None]:
    """The embedded credentials by kubeconfig key, and the kubeconfig's problem if any."""
    from .kubeconfig import KubeconfigError, read_kubeconfig  # noqa: PLC0415 - yaml

    path = layout.kubeconfig or layout.cert.path
    places = {p.key: p for p in (layout.ca, layout.cert, layout.key) if p.key is not None}
    try:
        _text, credentials = read_kubeconfig(path)
        info = os.stat(path)
    except (KubeconfigError, OSError) as exc:
        reason = str(exc) if isinstance(exc, KubeconfigError) else f"{path}: {exc.strerror}"
        return {key: FileState(p.describe(), error=reason) for key, p in places.items()}, (
            path,
            reason,
        )
    refs = {ref.key: ref for ref in (credentials.ca, credentials.cert, credentials.key) if ref}
    states = {}
    for key, place in places.items():
        ref = refs.get(key)
        if ref is None or ref.data is None:  # the kubeconfig names it otherwise now
            states[key] = FileState(place.describe(), missing=True)
        else:
            mode = info.st_mode & 0o7777
            states[key] = FileState(place.describe(), data=ref.data, mode=mode, uid=info.st_uid)
    return states, None


def read_kubeconfig_text(path: str) -> bytes:
    """The kubeconfig to rewrite, or ``InstallError`` naming it: nothing is written then."""
    state = read_file(path)
    if state.data is None or state.too_large:
        from .errors import InstallError  # noqa: PLC0415

        why = "does not exist" if state.missing else state.error or "is larger than 1 MiB"
        raise InstallError(f"nothing written: the kubeconfig {path} {why}")
    return state.data
