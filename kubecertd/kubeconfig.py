"""The kubelet's kubeconfig: where its client certificate, key and CA are, and rewriting
embedded ones.

Pure except ``read_kubeconfig``, the thin shell that reads the file.  What the kubelet
does with a kubeconfig is client-go's ``tools/clientcmd``; the facts this module follows:

- The file is a v1 ``Config``: lists of ``{name, cluster}``, ``{name, user}`` and
  ``{name, context}``; a name given twice makes client-go refuse the whole file
  (``api/v1/conversion.go``: "duplicate name").
- A string field holding a number or a list is a decoding error, since the YAML becomes
  JSON before it meets the Go structs; so is a ``*-data`` value that is not base64.
- ``*-data`` is base64 as Go's ``encoding/json`` decodes ``[]byte``: standard alphabet,
  padded, with CR and LF skipped; a space or a tab is an error.  YAML folds a plain
  scalar wrapped over lines into one with spaces, which the kubelet cannot load.
- An empty field counts as absent, and data wins over a file when both are given
  (``validation.go``: "client-cert-data will override"; ``transport.go``
  ``dataFromSliceOrFile``).
- A relative file path is joined to the kubeconfig's folder (``loader.go``
  ``ResolveLocalPaths``); ``~`` is not expanded there, and not here either: the kubelet
  runs as root and takes ``~/x`` as a folder named ``~``.

PyYAML is imported inside the functions that need it: ``kubecertd --check`` on a layout
without a kubeconfig never pays for it.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from typing import Any, NamedTuple

# Nothing the kubelet needs comes near this; anything larger is not its kubeconfig.
MAX_KUBECONFIG_BYTES = 1 << 20
# A kubeconfig nests about 6 deep (users[].user.exec.env[]).  The bound keeps PyYAML's
# recursive composer, constructor and dumper far from Python's recursion limit (the pure
# loader fails near 1000 levels), and its C composer, which recurses on the C stack, safe
# on a libyaml without its own limit (the bundled one stops at 1000 levels).
MAX_DEPTH = 64
# Folded lines in hand-written files go over 80 columns; keep each value on one line.
_DUMP_WIDTH = 1 << 16


class KubeconfigError(ValueError):
    """A kubeconfig that cannot give the kubelet's credentials; the message is one line
    naming the file and the key, e.g. "/etc/kubernetes/kubelet.conf:
    users[default-auth].user.client-key-data: not valid base64"."""


class Ref(NamedTuple):
    """Where one credential is: a file, or base64 data embedded in the kubeconfig."""

    key: str  # the kubeconfig key that named it: "users[default-auth].user.client-key"
    path: str | None  # a file, joined to the kubeconfig's folder; None when embedded
    data: bytes | None  # embedded data, decoded; None for a file
    kubeconfig: str = ""  # the kubeconfig that named it (for messages)


class Credentials(NamedTuple):
    path: str  # the kubeconfig
    context: str  # current-context
    cluster: str  # the context's cluster name
    user: str  # the context's user (AuthInfo) name
    server: str | None
    ca: Ref | None  # certificate-authority(-data); None when the cluster names neither
    cert: Ref  # client-certificate(-data)
    key: Ref  # client-key(-data)


def describe(ref: Ref) -> str:
    """The file, or for embedded data the kubeconfig and the key: for ``--check``."""
    if ref.path is not None:
        return ref.path
    return f"{ref.kubeconfig} ({ref.key})"


# -- reading ------------------------------------------------------------------------


def read_kubeconfig(path: str) -> tuple[bytes, Credentials]:
    """The kubeconfig's bytes and what they say; relative paths in it resolve against
    its absolute folder, as client-go's ``filepath.Abs(filepath.Dir(...))`` does."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the agent.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as stream:
            text = stream.read(MAX_KUBECONFIG_BYTES + 1)
    except OSError as exc:
        raise KubeconfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(text) > MAX_KUBECONFIG_BYTES:
        raise KubeconfigError(f"{path}: too large (over 1 MiB); not a kubelet kubeconfig")
    return text, parse_kubeconfig(text, os.path.abspath(path))


def parse_kubeconfig(text: bytes, path: str) -> Credentials:
    """The credentials of ``current-context``; ``path`` names the file in messages and is
    the folder relative paths resolve against."""
    doc = _load(text, path)
    context = _string(doc, "current-context", "current-context", path)
    if not context:
        raise KubeconfigError(f"{path}: current-context: not set")
    found = _find(doc, "contexts", context, path)
    if found is None:
        raise KubeconfigError(
            f"{path}: contexts[{_label(context)}]: not found, but current-context names it"
        )
    where = f"contexts[{_label(context)}].context"
    spec = _inner(found, "context", where, path)
    cluster = _required(spec, "cluster", f"{where}.cluster", path)
    user = _required(spec, "user", f"{where}.user", path)
    cluster_where = f"clusters[{_label(cluster)}].cluster"
    user_where = f"users[{_label(user)}].user"
    cluster_spec = _named(doc, "clusters", "cluster", cluster, f"{where}.cluster", path)
    user_spec = _named(doc, "users", "user", user, f"{where}.user", path)
    cert = _ref(user_spec, user_where, "client-certificate", path)
    key = _ref(user_spec, user_where, "client-key", path)
    if cert is None or key is None:
        missing = "client-certificate" if cert is None else "client-key"
        raise KubeconfigError(
            f"{path}: {user_where}: has neither {missing} nor {missing}-data; kubecertd heals client-certificate credentials only"
        )
    return Credentials(
        path=path,
        context=context,
        cluster=cluster,
        user=user,
        server=_string(cluster_spec, "server", f"{cluster_where}.server", path) or None,
        ca=_ref(cluster_spec, cluster_where, "certificate-authority", path),
        cert=cert,
        key=key,
    )


def _load(text: bytes, path: str) -> dict[Any, Any]:
    """The document as plain data, or KubeconfigError; never RecursionError."""
    import yaml  # noqa: PLC0415 - only layouts with a kubeconfig pay for PyYAML

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        # The event parsers (libyaml's and PyYAML's) keep their own stack, so measuring
        # the depth on events is safe at any depth; building objects recurses per level.
        too_deep = _deeper_than(MAX_DEPTH, yaml.parse(text, Loader=loader))
        doc = None if too_deep else yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader, chosen above
    # Not only YAMLError: the safe constructors leak ValueError, KeyError, IndexError and
    # AttributeError for explicit tags ("!!bool x", "!!int ''", "!!timestamp x").
    except Exception as exc:
        raise KubeconfigError(f"{path}: not YAML: {_yaml_problem(exc)}") from exc
    if too_deep:
        raise KubeconfigError(f"{path}: nested deeper than {MAX_DEPTH} levels; not a kubeconfig")
    if not isinstance(doc, dict):
        raise KubeconfigError(f"{path}: expected a mapping at the top level, got {_kind(doc)}")
    return doc


def _deeper_than(limit: int, events: Iterable[object]) -> bool:
    import yaml  # noqa: PLC0415 - see _load

    depth = 0
    for event in events:
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > limit:
                return True
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return False


def _yaml_problem(exc: Exception) -> str:
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if isinstance(problem, str) and mark is not None:
        return f"{' '.join(problem.split())} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _find(doc: dict[Any, Any], section: str, name: str, path: str) -> dict[Any, Any] | None:
    """The entry of ``section`` called ``name``; every entry must be a named mapping."""
    entries = doc.get(section)
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise KubeconfigError(f"{path}: {section}: expected a list, got {_kind(entries)}")
    found = None
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise KubeconfigError(
                f"{path}: {section}[{index}]: expected a mapping, got {_kind(entry)}"
            )
        entry_name = entry.get("name")
        if not isinstance(entry_name, str):
            raise KubeconfigError(
                f"{path}: {section}[{index}].name: expected a string, got {_kind(entry_name)}"
            )
        if entry_name == name:
            if found is not None:
                raise KubeconfigError(
                    f"{path}: {section}[{_label(name)}]: the name is given twice; client-go refuses the file"
                )
            found = entry
    return found


def _named(
    doc: dict[Any, Any], section: str, field: str, name: str, named_by: str, path: str
) -> dict[Any, Any]:
    """The ``cluster``/``user`` mapping of the entry a context names."""
    found = _find(doc, section, name, path)
    where = f"{section}[{_label(name)}]"
    if found is None:
        raise KubeconfigError(f"{path}: {where}: not found, but {named_by} names it")
    return _inner(found, field, f"{where}.{field}", path)


def _inner(entry: dict[Any, Any], field: str, where: str, path: str) -> dict[Any, Any]:
    value = entry.get(field)
    if value is None:  # "user:" with nothing after it: client-go reads an empty one
        return {}
    if not isinstance(value, dict):
        raise KubeconfigError(f"{path}: {where}: expected a mapping, got {_kind(value)}")
    return value


def _string(mapping: dict[Any, Any], field: str, key: str, path: str) -> str:
    """The field's text; absent and null are the empty string, as in client-go."""
    value = mapping.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise KubeconfigError(f"{path}: {key}: expected a string, got {_kind(value)}")
    return value


def _required(mapping: dict[Any, Any], field: str, key: str, path: str) -> str:
    value = _string(mapping, field, key, path)
    if not value:
        raise KubeconfigError(f"{path}: {key}: not set")
    return value


def _ref(mapping: dict[Any, Any], where: str, field: str, path: str) -> Ref | None:
    """``field-data`` if it is there and not empty, else the file ``field``, else None."""
    data_key, file_key = f"{where}.{field}-data", f"{where}.{field}"
    encoded = _string(mapping, f"{field}-data", data_key, path)
    data = _base64(encoded, data_key, path) if encoded else b""
    if data:
        return Ref(data_key, None, data, path)
    name = _string(mapping, field, file_key, path)
    if name:
        return Ref(file_key, _resolve(name, path), None, path)
    return None


def _base64(encoded: str, key: str, path: str) -> bytes:
    """Go's ``base64.StdEncoding``: padded, strict alphabet, CR and LF skipped."""
    compact = encoded.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(compact.encode("ascii"), validate=True)
    except ValueError as exc:  # binascii.Error, UnicodeEncodeError
        why = (
            " (a space or tab inside it: client-go skips only line breaks)"
            if " " in compact or "\t" in compact
            else ""
        )
        raise KubeconfigError(f"{path}: {key}: not valid base64{why}") from exc


def _resolve(name: str, path: str) -> str:
    # Go's filepath.Join cleans "a/../b" and "a//b" as normpath does (they part only on a
    # leading "//", which normpath keeps); absolute paths are left alone, as in client-go.
    if os.path.isabs(name):
        return name
    return os.path.normpath(os.path.join(os.path.dirname(path), name))


def _label(name: str) -> str:
    """A name as it goes between brackets in a key: readable, and on one line."""
    return name if name.isprintable() else repr(name)


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    kinds = {dict: "a mapping", list: "a list", str: "a string", bool: "true or false"}
    kinds.update({int: "a number", float: "a number", bytes: "binary data (!!binary)"})
    return kinds.get(type(value), f"a {type(value).__name__}")


# -- rewriting ----------------------------------------------------------------------


def embed(
    text: bytes,
    path: str,
    credentials: Credentials,
    *,
    cert: bytes | None = None,
    key: bytes | None = None,
    ca: bytes | None = None,
) -> bytes:
    """``text`` with the given PEM written as ``*-data`` under the user and cluster that
    ``credentials`` came from; the file key beside each is dropped (data would win
    anyway, and a stale path misleads).  Everything else is kept but comments."""
    import yaml  # noqa: PLC0415 - only layouts with a kubeconfig pay for PyYAML

    doc = _load(text, path)
    if cert is not None or key is not None:
        pair = [("client-certificate", cert), ("client-key", key)]
        _embed_into(doc, "users", "user", credentials.user, pair, path)
    if ca is not None:
        _embed_into(
            doc, "clusters", "cluster", credentials.cluster, [("certificate-authority", ca)], path
        )
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    out = yaml.dump(
        doc,
        Dumper=dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=_DUMP_WIDTH,
    ).encode("utf-8")
    again = parse_kubeconfig(out, path)
    if (again.context, again.cluster, again.user) != (
        credentials.context,
        credentials.cluster,
        credentials.user,
    ):
        raise KubeconfigError(
            f"{path}: current-context: now leads to {_triple(again)}, not {_triple(credentials)}; the kubeconfig changed since it was read"
        )
    return out


def _triple(credentials: Credentials) -> str:
    return f"context {_label(credentials.context)} (cluster {_label(credentials.cluster)}, user {_label(credentials.user)})"


def _embed_into(
    doc: dict[Any, Any],
    section: str,
    field: str,
    name: str,
    values: list[tuple[str, bytes | None]],
    path: str,
) -> None:
    """Replace the named entry of ``doc[section]`` with a copy holding ``values`` (copies,
    so that a YAML alias shared with another entry keeps its old content)."""
    where = f"{section}[{_label(name)}]"
    found = _find(doc, section, name, path)
    if found is None:
        raise KubeconfigError(f"{path}: {where}: gone; the kubeconfig changed since it was read")
    spec = _inner(found, field, f"{where}.{field}", path)
    for base, data in values:
        if data is not None:
            spec = _with_data(spec, base, data)
    doc[section] = [{**entry, field: spec} if entry is found else entry for entry in doc[section]]


def _with_data(spec: dict[Any, Any], base: str, data: bytes) -> dict[Any, Any]:
    """``spec`` with ``base-data`` set and ``base`` gone; the data takes the place of the
    first of the two, so a rewritten file reads like the one before."""
    encoded = base64.b64encode(data).decode("ascii")
    out: dict[Any, Any] = {}
    for field, value in spec.items():
        if field in (base, f"{base}-data"):
            out.setdefault(f"{base}-data", encoded)
        else:
            out[field] = value
    out.setdefault(f"{base}-data", encoded)
    return out
