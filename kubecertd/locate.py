"""Finding the layout the way an operator would (SPEC "Layouts").

``[kubelet] unit``'s files (``ExecStart=`` with its drop-ins and ``EnvironmentFile=``s)
give kubelet's ``--kubeconfig`` and ``--hostname-override``; the kubeconfig's current
context gives the certificate, the key and the CA.  ``find_layout`` is the thin shell
that reads those files one after the other; what it concludes from them is decided by
the pure functions below it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from .config import Config, default_node_name
from .errors import ConfigError
from .layout import (
    AUTO,
    FILES,
    K3S,
    KUBEADM,
    KUBECONFIG,
    PRESETS,
    RKE2,
    Layout,
    Place,
    files_layout,
    preset_fallback,
)

if TYPE_CHECKING:
    from .discover import KubeletUnit
    from .kubeconfig import Credentials

DEFAULT_SSL_DIR = "/etc/kubernetes/ssl"


class Found(NamedTuple):
    layout: Layout
    node_name: str  # kubelet's: node_name if set, else --hostname-override, else the hostname
    unit: KubeletUnit | None = None  # [kubelet] unit as read on the way, if it was


class LayoutNotFound(ConfigError):
    """``auto`` could not tell where kubelet's credentials are (exit 2)."""

    code = "layout-not-found"


def locate(config: Config, root: str = "/") -> tuple[Config, Layout]:
    """The layout of this node, and the config with kubelet's node name."""
    found = find_layout(config, root)
    read = found.unit if found.unit is not None and found.unit.unit == found.layout.unit else None
    found = found._replace(layout=with_kubelet(found.layout, config, root, read))
    kubelet = config.kubelet._replace(unit=found.layout.unit)  # the unit to restart
    return config._replace(node_name=found.node_name, kubelet=kubelet), found.layout


def find_layout(config: Config, root: str = "/") -> Found:
    """Where this node's kubelet keeps its credentials, and its node name."""
    if config.layout == FILES:
        return Found(configured_files(config), config.node_name)
    unit = (
        _read_unit(config.kubelet.unit, root)
        if config.layout in (AUTO, KUBECONFIG, KUBEADM)
        else None
    )
    return _find(config, root, unit)._replace(unit=unit)


def _find(config: Config, root: str, unit: KubeletUnit | None) -> Found:
    node = _node_name(config, unit)
    looked = [
        f"[kubelet] unit {config.kubelet.unit}: {'read ' + ', '.join(unit.files) if unit else 'no unit file'}"
    ]
    kubeconfig, why = _kubeconfig_path(config, unit)
    if config.layout in PRESETS:
        preset = PRESETS[config.layout]
        path = config.kubeconfig or preset.kubeconfig
        return _from_kubeconfig(
            config, config.layout, path, why or f"layout = {config.layout!r}", node
        )
    if kubeconfig is not None:
        return _from_kubeconfig(config, _name_of(kubeconfig), kubeconfig, why, node)
    if config.layout == KUBECONFIG:
        raise LayoutNotFound(
            f"{config.source}: layout = 'kubeconfig' but no kubeconfig: set kubeconfig, or [kubelet] unit to the unit that runs kubelet with --kubeconfig ({'; '.join(looked)})"
        )
    for name in (K3S, RKE2):  # kubelet inside the k3s or RKE2 agent
        preset = PRESETS[name]
        agent = _read_unit(preset.unit, root)
        looked.append(f"{preset.unit}: {'found' if agent else 'no unit file'}")
        if agent is not None or os.path.exists(preset.kubeconfig):
            return _from_kubeconfig(
                config, name, preset.kubeconfig, f"{preset.unit} or {preset.kubeconfig}", node
            )
    if os.path.isdir(DEFAULT_SSL_DIR):  # today's default: nodes from before layouts existed
        return Found(
            configured_files(
                config, f"{DEFAULT_SSL_DIR} exists (no kubelet unit names a kubeconfig)"
            ),
            node,
        )
    looked.append(f"{DEFAULT_SSL_DIR}: does not exist")
    raise LayoutNotFound(
        f"{config.source}: cannot tell where kubelet's credentials are; looked at: {'; '.join(looked)}. Set layout and kubeconfig (or ssl_dir)"
    )


def configured_files(config: Config, why: str | None = None) -> Layout:
    files = config.files
    reason = why or ("ssl_dir and [files] of " + config.source)
    return files_layout(
        config.ssl_dir, files.ca, files.cert, files.key, config.kubelet.unit, reason
    )


def _read_unit(unit: str, root: str) -> KubeletUnit | None:
    from .discover import read_unit  # noqa: PLC0415 - only when a unit is to be read

    return read_unit(unit, root)


def _node_name(config: Config, unit: KubeletUnit | None) -> str:
    """kubelet's node name: node_name if set, else its --hostname-override, else the host."""
    if "node_name" in config.given or unit is None or not unit.flags.hostname_override:
        return config.node_name
    return default_node_name(unit.flags.hostname_override) or config.node_name


def _kubeconfig_path(config: Config, unit: KubeletUnit | None) -> tuple[str | None, str]:
    if config.kubeconfig:
        return config.kubeconfig, f"kubeconfig of {config.source}"
    if unit is not None and unit.flags.kubeconfig:
        return unit.flags.kubeconfig, f"--kubeconfig of {unit.unit} ({', '.join(unit.files)})"
    return None, ""


def _name_of(kubeconfig: str) -> str:
    for name, preset in PRESETS.items():
        if os.path.normpath(kubeconfig) == preset.kubeconfig:
            return name
    return KUBECONFIG


def _from_kubeconfig(config: Config, name: str, path: str, why: str, node: str) -> Found:
    from .kubeconfig import KubeconfigError, read_kubeconfig  # noqa: PLC0415 - yaml

    unit = _unit_for(config, name)
    try:
        _text, credentials = read_kubeconfig(path)
    except KubeconfigError as exc:
        problem = (path, str(exc))
        if name in PRESETS:  # its usual files can still be judged and healed
            fallback = preset_fallback(name, f"{why}; {path} unreadable, {name}'s usual files")
            return Found(fallback._replace(unit=unit, problems=(problem,)), node)
        return Found(_unreadable(name, path, unit, why)._replace(problems=(problem,)), node)
    layout = layout_from_credentials(name, credentials, unit, why)
    client_ca = PRESETS[name].client_ca if name in PRESETS else None
    if client_ca is not None:  # k3s, RKE2: the client certificate's issuer, never written
        beside = os.path.join(os.path.dirname(path), os.path.basename(client_ca))
        layout = layout._replace(ca=Place(beside), ca_writable=False)
    return Found(layout, node)


def _unit_for(config: Config, name: str) -> str:
    if "kubelet.unit" in config.given or name not in PRESETS:
        return config.kubelet.unit
    return PRESETS[name].unit


def _unreadable(name: str, path: str, unit: str, why: str) -> Layout:
    """A kubeconfig that names nothing readable: its credentials are unknown, nothing is written."""
    place = Place(path, "(unreadable)")
    return Layout(name, place, place, place, unit, path, (why,))


def layout_from_credentials(name: str, credentials: Credentials, unit: str, why: str) -> Layout:
    """The places a kubeconfig's current context names (pure)."""
    path = credentials.path

    def place(ref_key: str, ref_path: str | None) -> Place:
        return Place(ref_path) if ref_path is not None else Place(path, ref_key)

    cert, key = credentials.cert, credentials.key
    if credentials.ca is not None:
        ca = place(credentials.ca.key, credentials.ca.path)
    else:  # no CA named: kubecertd would embed the cluster CA
        ca = Place(path, f"clusters[{credentials.cluster}].cluster.certificate-authority-data")
    return Layout(
        name,
        ca,
        place(cert.key, cert.path),
        place(key.key, key.path),
        unit,
        path,
        (why, f"current context {credentials.context} of {path}"),
    )


def with_kubelet(
    layout: Layout, config: Config, root: str = "/", unit: KubeletUnit | None = None
) -> Layout:
    """The layout with what kubelet's unit says about it: whether kubelet rotates the
    certificate itself (its --rotate-certificates, else rotateCertificates in the
    KubeletConfiguration of [kubelet] config or its --config) and its program."""
    from .discover import parse_kubelet_config  # noqa: PLC0415
    from .kubelet import rotation_of  # noqa: PLC0415

    unit = unit or _read_unit(layout.unit, root)  # read once: --check pays for each file
    flags = unit.flags if unit is not None else None
    path = config.kubelet.config or (flags.config if flags else None)
    kubelet_config, error = None, None
    if path:
        try:
            with open(path, "rb") as stream:
                kubelet_config = parse_kubelet_config(stream.read(1 << 20), path)
        except OSError as exc:
            error = f"{path}: {exc.strerror}"
        except ValueError as exc:
            error = str(exc)
    rotation = rotation_of(flags, kubelet_config, error, unit=layout.unit if unit else None)
    binary = unit.argv[0] if unit is not None and unit.argv else None
    return layout._replace(rotation=rotation.on, rotation_from=rotation.source, binary=binary)
