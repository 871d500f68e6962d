"""Where a node's kubelet credentials live, and in what shape they are written back.

A ``Layout`` is one value: the CA, the certificate and the key, each a ``Place`` (a file
of its own, kubelet's combined file behind its store symlink, or base64 data under a key
of a kubeconfig), the unit that runs kubelet, and what the value was found from.  It is
built by pure functions from what discovery read (``kubecertd.edges.discovery``), and
the edges take it as an argument: reading (``material.read_layout``), installing
(``targets`` below, then ``edges.install``) and watching (``directories``).
``diagnose()`` never sees it: it judges a CA, a chain and a key, wherever they came from.

The shapes (SPEC "Layouts"):

- split files (kube-aws/CoreOS, k3s/RKE2, kubeconfigs naming two files): each file is
  replaced by a rename, as one install with an intent record;
- kubelet's store (kubeadm, kubespray, Typhoon): ``kubelet-client-<time>.pem`` holds the
  chain and then the key, and ``kubelet-client-current.pem`` is a symlink to it with an
  absolute target (client-go's ``certificate_store.go``); a new file is written and a new
  symlink renamed over the old one, so there is never a moment without it and never a
  regular file in its place;
- embedded data (Kubernetes the hard way, kops, old kubeadm control planes): the
  kubeconfig is rewritten as a whole, every other field kept.

Adding a layout is one more preset in ``PRESETS`` and its tests.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # edges.install imports shutil and json, which --check does without
    from .edges.install import Target

STORE_CURRENT = "kubelet-client-current.pem"
STORE_PREFIX = "kubelet-client-"

AUTO, FILES, KUBECONFIG, KUBEADM, K3S, RKE2 = (
    "auto",
    "files",
    "kubeconfig",
    "kubeadm",
    "k3s",
    "rke2",
)
LAYOUTS = (AUTO, FILES, KUBECONFIG, KUBEADM, K3S, RKE2)


class Place(NamedTuple):
    """Where one credential lives: a file, or base64 data under ``key`` in a kubeconfig."""

    path: str  # the file that holds it; for embedded data, the kubeconfig
    key: str | None = (
        None  # the kubeconfig key of embedded data, e.g. users[default-auth].user.client-key-data
    )

    @property
    def embedded(self) -> bool:
        return self.key is not None

    def describe(self) -> str:
        return f"{self.path} ({self.key})" if self.key else self.path


class Layout(NamedTuple):
    name: str  # files | kubeconfig | kubeadm | k3s | rke2
    ca: Place
    cert: Place
    key: Place
    unit: str  # the unit that runs kubelet (k3s and RKE2 run it inside their agent)
    kubeconfig: str | None = None
    found_from: tuple[str, ...] = ()  # what discovery read or fell back to, for the report
    problems: tuple[tuple[str, str], ...] = ()  # (kubeconfig, why discovery could not read it)
    ca_writable: bool = True  # False: kubecertd judges against the CA but never writes it
    rotation: bool = False  # kubelet renews the certificate itself (rotateCertificates)
    rotation_from: str = ""  # what decided that, for the report
    binary: str | None = None  # the program the unit runs (asked for its --version)

    @property
    def store(self) -> str | None:
        """kubelet's store folder when the certificate and key are its symlinked file."""
        if is_store_path(self.cert) and self.key == self.cert:
            return os.path.dirname(self.cert.path)
        return None

    @property
    def shape(self) -> str:
        if self.store is not None:
            return "store"
        if self.cert.embedded or self.key.embedded:
            return "embedded"
        return "files"

    def directories(self) -> list[str]:
        """Every folder a credential (or the kubeconfig naming them) lives in."""
        paths = [self.ca.path, self.cert.path, self.key.path]
        if self.kubeconfig:
            paths.append(self.kubeconfig)
        return sorted({os.path.dirname(os.path.abspath(p)) for p in paths})

    def backup_root(self) -> str:
        """Where earlier copies go: ``.kubecertd-backup`` beside the certificate."""
        return os.path.join(os.path.dirname(self.cert.path), ".kubecertd-backup")

    def to_dict(self) -> dict[str, Any]:
        """SPEC's ``layout`` object of ``--check --json``."""
        return {
            "name": self.name,
            "shape": self.shape,
            "unit": self.unit,
            "kubeconfig": self.kubeconfig,
            "ca": {**_place_dict(self.ca), "written": self.ca_writable},
            "cert": _place_dict(self.cert),
            "key": _place_dict(self.key),
            "found_from": list(self.found_from),
            "rotation": {"on": self.rotation, "from": self.rotation_from},
        }


def _place_dict(place: Place) -> dict[str, str | None]:
    return {"path": place.path, "key": place.key}


def is_store_path(place: Place) -> bool:
    return place.key is None and os.path.basename(place.path) == STORE_CURRENT


class Preset(NamedTuple):
    """A distribution's usual places: its kubeconfig, its unit, and the credentials to
    fall back to when the kubeconfig cannot be read."""

    kubeconfig: str
    unit: str
    ca: str
    cert: str
    key: str
    # The CA that issues the client certificate, when it is not the kubeconfig's
    # certificate-authority (which verifies the API server): k3s and RKE2 sign
    # client-kubelet.crt with their client CA (k3s pkg/server/handlers ClientKubeletCert
    # uses Runtime.ClientCA), and manage both CA files themselves: kubecertd judges the
    # certificate against it and never writes it.
    client_ca: str | None = None


PRESETS = {
    KUBEADM: Preset(
        "/etc/kubernetes/kubelet.conf",
        "kubelet.service",
        "/etc/kubernetes/pki/ca.crt",
        "/var/lib/kubelet/pki/kubelet-client-current.pem",
        "/var/lib/kubelet/pki/kubelet-client-current.pem",
    ),
    K3S: Preset(
        "/var/lib/rancher/k3s/agent/kubelet.kubeconfig",
        "k3s-agent.service",
        "/var/lib/rancher/k3s/agent/server-ca.crt",
        "/var/lib/rancher/k3s/agent/client-kubelet.crt",
        "/var/lib/rancher/k3s/agent/client-kubelet.key",
        "/var/lib/rancher/k3s/agent/client-ca.crt",
    ),
    RKE2: Preset(
        "/var/lib/rancher/rke2/agent/kubelet.kubeconfig",
        "rke2-agent.service",
        "/var/lib/rancher/rke2/agent/server-ca.crt",
        "/var/lib/rancher/rke2/agent/client-kubelet.crt",
        "/var/lib/rancher/rke2/agent/client-kubelet.key",
        "/var/lib/rancher/rke2/agent/client-ca.crt",
    ),
}


def files_layout(ssl_dir: str, ca: str, cert: str, key: str, unit: str, why: str) -> Layout:
    """Today's three files in one folder (names relative to ``ssl_dir``, or absolute)."""

    def place(name: str) -> Place:
        return Place(os.path.join(ssl_dir, name))

    return Layout(FILES, place(ca), place(cert), place(key), unit, None, (why,))


def preset_fallback(name: str, why: str) -> Layout:
    """A preset's usual files, for when its kubeconfig cannot be read."""
    preset = PRESETS[name]
    return Layout(
        name,
        Place(preset.client_ca or preset.ca),
        Place(preset.cert),
        Place(preset.key),
        preset.unit,
        preset.kubeconfig,
        (why,),
        ca_writable=preset.client_ca is None,
    )


def store_file_name(now: dt.datetime) -> str:
    """``kubelet-client-2026-12-03-17-05-09.pem``, kubelet's own naming (Go's
    ``2006-01-02-15-04-05`` in local time; kubecertd uses UTC, which sorts the same)."""
    return f"{STORE_PREFIX}{now.astimezone(dt.timezone.utc):%Y-%m-%d-%H-%M-%S}.pem"


def is_store_file(name: str) -> bool:
    """A timestamped file of kubelet's store (not the current or updated symlink)."""
    stamp = name[len(STORE_PREFIX) : -len(".pem")]
    return (
        name.startswith(STORE_PREFIX)
        and name.endswith(".pem")
        and len(stamp) == 19
        and stamp.replace("-", "").isdigit()
    )


class Credentials(NamedTuple):
    """What to write: PEM bytes for each credential, None for one that stays as it is."""

    ca: bytes | None
    cert: bytes
    key: bytes


def plan_install(
    layout: Layout, new: Credentials, now: dt.datetime, kubeconfig: bytes | None = None
) -> list[Target]:
    """The files that put ``new`` in place in the layout's own shape, for one install.

    ``kubeconfig`` is the current text of ``layout.kubeconfig``, needed when anything is
    embedded in it (``kubeconfig.KubeconfigError`` when it no longer has the entries).
    """
    from .edges.install import Target  # noqa: PLC0415 - not on the --check path

    targets: list[Target] = []
    embedded: dict[str, bytes] = {}
    for field, place, data in (("ca", layout.ca, new.ca), ("cert", layout.cert, new.cert)):
        if data is None:
            continue
        if place.embedded:
            embedded[field] = data
        elif field == "cert" and layout.store is not None:
            targets += _store_targets(layout.store, data, new.key, now)
        else:
            targets.append(Target(place.path, data, 0o644))
    if layout.key.embedded:
        embedded["key"] = new.key
    elif layout.store is None:
        targets.append(Target(layout.key.path, new.key, 0o600))
    if embedded:
        if layout.kubeconfig is None or kubeconfig is None:
            raise ValueError("embedded credentials without their kubeconfig")
        from . import kubeconfig as kc  # noqa: PLC0415 - yaml, only for embedded layouts

        parsed = kc.parse_kubeconfig(kubeconfig, layout.kubeconfig)
        text = kc.embed(kubeconfig, layout.kubeconfig, parsed, **embedded)
        targets.append(Target(layout.kubeconfig, text, 0o600))  # it holds a private key
    return targets


def _store_targets(store: str, cert: bytes, key: bytes, now: dt.datetime) -> list[Target]:
    from .edges.install import Target  # noqa: PLC0415

    """kubelet's shape: the timestamped file (chain, then key), then the symlink to it.

    A certificate that already holds the key (the store's own file, put back by a
    rollback) is written as it is.
    """
    combined = cert if cert == key else cert.rstrip(b"\n") + b"\n" + key
    stamped = os.path.join(os.path.abspath(store), store_file_name(now))
    return [
        Target(stamped, combined, 0o600),
        Target(os.path.join(store, STORE_CURRENT), stamped.encode(), 0o777, link=True),
    ]


def describe_layout(layout: Layout) -> str:
    """``CA …, certificate …, key …`` on one line (the certificate and key once if shared)."""
    if layout.cert == layout.key:
        pair = f"certificate and key {layout.cert.describe()}"
    else:
        pair = f"certificate {layout.cert.describe()}, key {layout.key.describe()}"
    return f"CA {layout.ca.describe()}, {pair}"
