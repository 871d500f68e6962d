"""kubecertd.kubeconfig: the kubelet kubeconfig's credentials, read and rewritten."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubecertd.kubeconfig import (
    MAX_DEPTH,
    MAX_KUBECONFIG_BYTES,
    Credentials,
    KubeconfigError,
    Ref,
    describe,
    embed,
    parse_kubeconfig,
    read_kubeconfig,
)

import factories

CA, LEAF = factories.healthy_pair()
NEW_CA, NEW_LEAF = factories.healthy_pair()
KUBELET_CONF = "/etc/kubernetes/kubelet.conf"
STORE = "/var/lib/kubelet/pki/kubelet-client-current.pem"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def edit(text: bytes, old: str, new: str) -> bytes:
    """``text`` with ``old`` replaced once; fails loudly when the example drifted."""
    assert old.encode() in text, old
    return text.replace(old.encode(), new.encode(), 1)


# What the kubelet's TLS bootstrap writes on a kubeadm join node (bootstrap.go
# writeKubeconfigFromBootstrapping, serialised by clientcmd.Write: keys sorted).
KUBEADM = f"""\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {b64(CA.pem)}
    server: https://10.0.0.10:6443
  name: default-cluster
contexts:
- context:
    cluster: default-cluster
    namespace: default
    user: default-auth
  name: default-context
current-context: default-context
kind: Config
preferences: {{}}
users:
- name: default-auth
  user:
    client-certificate: {STORE}
    client-key: {STORE}
""".encode()

# Kubernetes The Hard Way: kubectl config set-cluster/set-credentials --embed-certs=true.
KTHW = f"""\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {b64(CA.pem)}
    server: https://server.kubernetes.local:6443
  name: kubernetes-the-hard-way
contexts:
- context:
    cluster: kubernetes-the-hard-way
    user: system:node:node-0
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: system:node:node-0
  user:
    client-certificate-data: {b64(LEAF.pem)}
    client-key-data: {b64(LEAF.key_pem)}
""".encode()

# The k3s agent's kubelet.kubeconfig (k3s-io/k3s deps.KubeConfig template).
K3S_DIR = "/var/lib/rancher/k3s/agent"
K3S = f"""\
apiVersion: v1
clusters:
- cluster:
    server: https://127.0.0.1:6444
    certificate-authority: {K3S_DIR}/server-ca.crt
  name: local
contexts:
- context:
    cluster: local
    namespace: default
    user: user
  name: Default
current-context: Default
kind: Config
preferences: {{}}
users:
- name: user
  user:
    client-certificate: {K3S_DIR}/client-kubelet.crt
    client-key: {K3S_DIR}/client-kubelet.key
""".encode()
K3S_PATH = f"{K3S_DIR}/kubelet.kubeconfig"

# A kubeconfig with more than the kubelet's entry: another user, cluster and context,
# preferences, extensions at three levels.
RICH = f"""\
apiVersion: v1
kind: Config
clusters:
- name: default-cluster
  cluster:
    server: https://10.0.0.10:6443
    certificate-authority: /etc/kubernetes/pki/ca.crt
    extensions:
    - name: example.com/cluster-note
      extension:
        zone: a
- name: other
  cluster:
    certificate-authority-data: {b64(NEW_CA.pem)}
    server: https://other.example:6443
    tls-server-name: api.other
contexts:
- name: other-admin
  context:
    cluster: other
    user: admin
- name: default-context
  context:
    cluster: default-cluster
    namespace: default
    user: default-auth
current-context: default-context
preferences:
  colors: true
users:
- name: admin
  user:
    client-certificate-data: {b64(NEW_LEAF.pem)}
    client-key-data: {b64(NEW_LEAF.key_pem)}
- name: default-auth
  user:
    client-certificate: {STORE}
    client-key: {STORE}
    as-user-extra: {{}}
extensions:
- name: example.com/file-note
  extension:
    written-by: hand
""".encode()


# -- layouts ------------------------------------------------------------------------


def test_kubeadm_join_node_points_both_at_the_kubelet_store() -> None:
    """A kubeadm kubelet.conf gives the store's combined PEM for cert and key, and the embedded CA."""
    creds = parse_kubeconfig(KUBEADM, KUBELET_CONF)
    assert creds == Credentials(
        path=KUBELET_CONF,
        context="default-context",
        cluster="default-cluster",
        user="default-auth",
        server="https://10.0.0.10:6443",
        ca=Ref(
            "clusters[default-cluster].cluster.certificate-authority-data",
            None,
            CA.pem,
            KUBELET_CONF,
        ),
        cert=Ref("users[default-auth].user.client-certificate", STORE, None, KUBELET_CONF),
        key=Ref("users[default-auth].user.client-key", STORE, None, KUBELET_CONF),
    )


def test_kthw_embedded_credentials_are_decoded() -> None:
    """Embedded cert, key and CA come back as the PEM bytes they encode."""
    creds = parse_kubeconfig(KTHW, "/var/lib/kubelet/kubeconfig")
    assert (creds.context, creds.cluster, creds.user) == (
        "default",
        "kubernetes-the-hard-way",
        "system:node:node-0",
    )
    assert creds.cert.data == LEAF.pem and creds.cert.path is None
    assert creds.key.data == LEAF.key_pem and creds.key.path is None
    assert creds.ca is not None and creds.ca.data == CA.pem
    assert creds.key.key == "users[system:node:node-0].user.client-key-data"


def test_k3s_kubeconfig_names_three_files() -> None:
    """k3s's kubelet.kubeconfig gives the CA, cert and key as separate files."""
    creds = parse_kubeconfig(K3S, K3S_PATH)
    assert creds.ca == Ref(
        "clusters[local].cluster.certificate-authority", f"{K3S_DIR}/server-ca.crt", None, K3S_PATH
    )
    assert creds.cert.path == f"{K3S_DIR}/client-kubelet.crt"
    assert creds.key.path == f"{K3S_DIR}/client-kubelet.key"
    assert creds.server == "https://127.0.0.1:6444"


def test_relative_paths_resolve_against_the_kubeconfig_folder() -> None:
    """Relative paths are joined to the kubeconfig's folder and cleaned, as client-go's ResolveLocalPaths does."""
    text = edit(
        K3S,
        f"certificate-authority: {K3S_DIR}/server-ca.crt",
        "certificate-authority: ./server-ca.crt",
    )
    text = edit(
        text,
        f"client-certificate: {K3S_DIR}/client-kubelet.crt",
        "client-certificate: pki/../client-kubelet.crt",
    )
    text = edit(
        text,
        f"client-key: {K3S_DIR}/client-kubelet.key",
        "client-key: ../agent/keys//client-kubelet.key",
    )
    creds = parse_kubeconfig(text, K3S_PATH)
    assert creds.ca is not None and creds.ca.path == f"{K3S_DIR}/server-ca.crt"
    assert creds.cert.path == f"{K3S_DIR}/client-kubelet.crt"
    assert creds.key.path == f"{K3S_DIR}/keys/client-kubelet.key"


def test_a_tilde_is_a_folder_name_not_a_home() -> None:
    """``~`` is not expanded, as in client-go: the kubelet runs as root and joins it like any name."""
    text = edit(
        K3S,
        f"client-certificate: {K3S_DIR}/client-kubelet.crt",
        "client-certificate: ~/client-kubelet.crt",
    )
    assert parse_kubeconfig(text, K3S_PATH).cert.path == f"{K3S_DIR}/~/client-kubelet.crt"


def test_data_overrides_a_file_given_beside_it() -> None:
    """With both ``client-certificate`` and ``client-certificate-data``, the data wins (client-go)."""
    text = edit(
        KUBEADM,
        f"    client-certificate: {STORE}\n",
        f"    client-certificate: {STORE}\n    client-certificate-data: {b64(LEAF.pem)}\n",
    )
    creds = parse_kubeconfig(text, KUBELET_CONF)
    assert creds.cert == Ref(
        "users[default-auth].user.client-certificate-data", None, LEAF.pem, KUBELET_CONF
    )
    assert creds.key.path == STORE


def test_empty_data_counts_as_absent() -> None:
    """An empty ``*-data`` leaves the file in charge, as client-go's ``len(data) > 0`` does."""
    text = edit(
        KUBEADM, f"    client-key: {STORE}\n", f"    client-key: {STORE}\n    client-key-data: ''\n"
    )
    assert parse_kubeconfig(text, KUBELET_CONF).key.path == STORE


def test_a_cluster_without_a_ca_gives_none() -> None:
    """A cluster naming no CA (system roots) gives ``ca=None``, not an error."""
    text = edit(K3S, f"    certificate-authority: {K3S_DIR}/server-ca.crt\n", "")
    assert parse_kubeconfig(text, K3S_PATH).ca is None


def test_the_current_context_picks_among_several() -> None:
    """Of several contexts, users and clusters, the ones current-context leads to are read."""
    creds = parse_kubeconfig(RICH, KUBELET_CONF)
    assert (creds.context, creds.cluster, creds.user) == (
        "default-context",
        "default-cluster",
        "default-auth",
    )
    assert creds.cert.path == STORE
    assert creds.ca is not None and creds.ca.path == "/etc/kubernetes/pki/ca.crt"
    other = parse_kubeconfig(
        edit(RICH, "current-context: default-context", "current-context: other-admin"), KUBELET_CONF
    )
    assert (other.cluster, other.user, other.server) == (
        "other",
        "admin",
        "https://other.example:6443",
    )
    assert other.cert.data == NEW_LEAF.pem


def test_line_breaks_inside_data_are_skipped() -> None:
    """Base64 wrapped in a YAML block scalar decodes, since Go's decoder skips CR and LF."""
    wrapped = "\n".join(b64(LEAF.pem)[i : i + 64] for i in range(0, len(b64(LEAF.pem)), 64))
    block = "client-certificate-data: |\n" + "".join(
        f"      {line}\r\n" for line in wrapped.splitlines()
    )
    text = edit(KTHW, f"client-certificate-data: {b64(LEAF.pem)}\n", block)
    assert parse_kubeconfig(text, KUBELET_CONF).cert.data == LEAF.pem


def test_tokens_and_exec_plugins_beside_a_certificate_are_ignored() -> None:
    """A user with a token and an exec plugin as well as a certificate gives the certificate."""
    extra = "    token: abc.def\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: ./helper\n"
    text = edit(KUBEADM, f"    client-key: {STORE}\n", f"    client-key: {STORE}\n{extra}")
    assert parse_kubeconfig(text, KUBELET_CONF).key.path == STORE


# -- every cause of KubeconfigError, with the key its message names -------------------

CAUSES = [
    ("not-yaml", b"users: [\n  - name: x\n", "not YAML"),
    ("not-text", b"\xff\x00\x01", "not YAML"),
    ("bad-explicit-tag", KUBEADM + b"extra: !!bool maybe\n", "not YAML"),
    ("two-documents", KUBEADM + b"---\n" + KUBEADM, "not YAML"),
    ("empty", b"", "top level"),
    ("not-a-mapping", b"- apiVersion: v1\n", "top level"),
    ("too-deep", b"[" * 10_000, "nest"),
    (
        "no-current-context",
        edit(KUBEADM, "current-context: default-context\n", ""),
        "current-context",
    ),
    (
        "empty-current-context",
        edit(KUBEADM, "current-context: default-context", 'current-context: ""'),
        "current-context",
    ),
    (
        "current-context-not-a-string",
        edit(KUBEADM, "current-context: default-context", "current-context: [a]"),
        "current-context",
    ),
    (
        "context-missing",
        edit(KUBEADM, "name: default-context", "name: other"),
        "contexts[default-context]",
    ),
    (
        "no-contexts-at-all",
        edit(KUBEADM, "contexts:\n", "contexts: []\nunused:\n"),
        "contexts[default-context]",
    ),
    (
        "contexts-not-a-list",
        edit(KUBEADM, "contexts:\n- context:", "contexts:\n  x:\n   context:"),
        "contexts",
    ),
    (
        "context-entry-not-a-mapping",
        edit(KUBEADM, "contexts:\n", "contexts:\n- just-a-name\n"),
        "contexts[0]",
    ),
    (
        "context-entry-without-name",
        edit(KUBEADM, "contexts:\n", "contexts:\n- context: {}\n"),
        "contexts[0].name",
    ),
    (
        "context-spec-not-a-mapping",
        edit(
            KUBEADM,
            "- context:\n    cluster: default-cluster\n    namespace: default\n    user: default-auth\n",
            "- context: default-cluster\n",
        ),
        "contexts[default-context].context",
    ),
    (
        "context-without-cluster",
        edit(KUBEADM, "    cluster: default-cluster\n", ""),
        "contexts[default-context].context.cluster",
    ),
    (
        "context-without-user",
        edit(KUBEADM, "    user: default-auth\n", ""),
        "contexts[default-context].context.user",
    ),
    (
        "context-user-not-a-string",
        edit(KUBEADM, "    user: default-auth\n", "    user: 7\n"),
        "contexts[default-context].context.user",
    ),
    (
        "cluster-missing",
        edit(KUBEADM, "  name: default-cluster", "  name: kubernetes"),
        "clusters[default-cluster]",
    ),
    (
        "user-missing",
        edit(KUBEADM, "- name: default-auth", "- name: system:node:node-0"),
        "users[default-auth]",
    ),
    ("user-given-twice", KUBEADM + b"- name: default-auth\n  user: {}\n", "users[default-auth]"),
    (
        "user-spec-not-a-mapping",
        edit(
            KUBEADM,
            f"  user:\n    client-certificate: {STORE}\n    client-key: {STORE}\n",
            "  user: [x]\n",
        ),
        "users[default-auth].user",
    ),
    (
        "no-client-certificate",
        edit(KUBEADM, f"    client-certificate: {STORE}\n", "    token: abc.def\n"),
        "users[default-auth].user",
    ),
    ("no-client-key", edit(KUBEADM, f"    client-key: {STORE}\n", ""), "users[default-auth].user"),
    (
        "token-only-user",
        edit(
            KUBEADM,
            f"    client-certificate: {STORE}\n    client-key: {STORE}\n",
            "    tokenFile: /var/lib/kubelet/token\n",
        ),
        "users[default-auth].user",
    ),
    (
        "client-certificate-not-a-string",
        edit(KUBEADM, f"client-certificate: {STORE}", "client-certificate: 42"),
        "users[default-auth].user.client-certificate",
    ),
    (
        "cert-data-not-base64",
        edit(KTHW, "client-certificate-data: ", "client-certificate-data: A$"),
        "users[system:node:node-0].user.client-certificate-data",
    ),
    (
        "key-data-bad-padding",
        edit(
            KTHW,
            f"client-key-data: {b64(LEAF.key_pem)}",
            f"client-key-data: {b64(LEAF.key_pem)[:-1]}",
        ),
        "users[system:node:node-0].user.client-key-data",
    ),
    (
        "key-data-folded-with-spaces",
        edit(
            KTHW,
            f"client-key-data: {b64(LEAF.key_pem)}",
            f"client-key-data: {b64(LEAF.key_pem)[:40]}\n      {b64(LEAF.key_pem)[40:]}",
        ),
        "users[system:node:node-0].user.client-key-data",
    ),
    (
        "key-data-not-ascii",
        edit(KTHW, "client-key-data: ", "client-key-data: é"),
        "users[system:node:node-0].user.client-key-data",
    ),
    (
        "key-data-binary-tag",
        edit(KTHW, "client-key-data: ", "client-key-data: !!binary "),
        "users[system:node:node-0].user.client-key-data",
    ),
    (
        "ca-data-not-base64",
        edit(KUBEADM, "certificate-authority-data: ", "certificate-authority-data: -----BEGIN"),
        "clusters[default-cluster].cluster.certificate-authority-data",
    ),
    (
        "server-not-a-string",
        edit(KUBEADM, "server: https://10.0.0.10:6443", "server: {host: x}"),
        "clusters[default-cluster].cluster.server",
    ),
]


@pytest.mark.parametrize(
    ("text", "key"), [pytest.param(text, key, id=cause) for cause, text, key in CAUSES]
)
def test_each_cause_is_one_line_naming_the_file_and_the_key(text: bytes, key: str) -> None:
    """Every kubeconfig that cannot give credentials raises one line naming the file and the key."""
    with pytest.raises(KubeconfigError) as caught:
        parse_kubeconfig(text, KUBELET_CONF)
    message = str(caught.value)
    assert message.startswith(f"{KUBELET_CONF}: ")
    assert key in message
    assert "\n" not in message


def test_spaces_in_data_are_named_as_the_reason() -> None:
    """Base64 folded over lines (spaces after YAML folding) says client-go skips only line breaks."""
    text = edit(
        KTHW,
        f"client-key-data: {b64(LEAF.key_pem)}",
        f"client-key-data: {b64(LEAF.key_pem)[:40]}\n      {b64(LEAF.key_pem)[40:]}",
    )
    with pytest.raises(KubeconfigError, match="only line breaks"):
        parse_kubeconfig(text, KUBELET_CONF)


def test_a_name_with_a_line_break_stays_on_one_line() -> None:
    """A context name holding a newline is quoted, so that the message stays on one line."""
    text = edit(KUBEADM, "current-context: default-context", 'current-context: "a\\nb"')
    with pytest.raises(KubeconfigError, match=r"contexts\['a\\nb'\]"):
        parse_kubeconfig(text, KUBELET_CONF)


# -- describe ----------------------------------------------------------------------


def test_describe_gives_the_file_or_the_kubeconfig_and_key() -> None:
    """A file ref reads as its path, an embedded one as the kubeconfig and the key."""
    kubeadm = parse_kubeconfig(KUBEADM, KUBELET_CONF)
    kthw = parse_kubeconfig(KTHW, "/var/lib/kubelet/kubeconfig")
    assert describe(kubeadm.cert) == STORE
    assert (
        describe(kthw.key)
        == "/var/lib/kubelet/kubeconfig (users[system:node:node-0].user.client-key-data)"
    )


# -- embed -------------------------------------------------------------------------


def test_embed_keeps_everything_else_and_drops_the_stale_file_keys() -> None:
    """Embedding into one user and cluster keeps every other entry, field and key order."""
    creds = parse_kubeconfig(RICH, KUBELET_CONF)
    out = embed(RICH, KUBELET_CONF, creds, cert=NEW_LEAF.pem, key=NEW_LEAF.key_pem, ca=NEW_CA.pem)
    before, after = yaml.safe_load(RICH), yaml.safe_load(out)
    assert list(after) == list(before)
    for field in ("apiVersion", "kind", "contexts", "current-context", "preferences", "extensions"):
        assert after[field] == before[field], field
    assert after["users"][0] == before["users"][0]
    assert after["clusters"][1] == before["clusters"][1]
    assert after["users"][1]["user"] == {
        "client-certificate-data": b64(NEW_LEAF.pem),
        "client-key-data": b64(NEW_LEAF.key_pem),
        "as-user-extra": {},
    }
    cluster = after["clusters"][0]["cluster"]
    assert list(cluster) == ["server", "certificate-authority-data", "extensions"]
    assert cluster["extensions"] == before["clusters"][0]["cluster"]["extensions"]
    again = parse_kubeconfig(out, KUBELET_CONF)
    assert again._replace(ca=None, cert=None, key=None) == creds._replace(
        ca=None, cert=None, key=None
    )
    assert (again.cert.data, again.key.data) == (NEW_LEAF.pem, NEW_LEAF.key_pem)
    assert again.ca is not None and again.ca.data == NEW_CA.pem


def test_embed_replaces_embedded_data_in_place() -> None:
    """Re-embedding into a KTHW kubeconfig replaces the data and keeps the layout."""
    creds = parse_kubeconfig(KTHW, "/var/lib/kubelet/kubeconfig")
    out = embed(KTHW, creds.path, creds, cert=NEW_LEAF.pem, key=NEW_LEAF.key_pem)
    assert out == KTHW.replace(b64(LEAF.pem).encode(), b64(NEW_LEAF.pem).encode()).replace(
        b64(LEAF.key_pem).encode(), b64(NEW_LEAF.key_pem).encode()
    )


def test_embed_turns_a_file_entry_into_data() -> None:
    """Embedding into k3s's file-path kubeconfig puts the data where the paths were."""
    creds = parse_kubeconfig(K3S, K3S_PATH)
    out = embed(K3S, K3S_PATH, creds, cert=NEW_LEAF.pem, key=NEW_LEAF.key_pem, ca=NEW_CA.pem)
    doc = yaml.safe_load(out)
    assert doc["users"][0]["user"] == {
        "client-certificate-data": b64(NEW_LEAF.pem),
        "client-key-data": b64(NEW_LEAF.key_pem),
    }
    assert list(doc["clusters"][0]["cluster"]) == ["server", "certificate-authority-data"]
    again = parse_kubeconfig(out, K3S_PATH)
    assert again.cert.path is None and again.key.data == NEW_LEAF.key_pem


def test_embed_writes_only_what_it_is_given() -> None:
    """Embedding the cert alone leaves the key's file and the CA untouched."""
    creds = parse_kubeconfig(K3S, K3S_PATH)
    again = parse_kubeconfig(embed(K3S, K3S_PATH, creds, cert=NEW_LEAF.pem), K3S_PATH)
    assert again.cert.data == NEW_LEAF.pem
    assert (again.key, again.ca) == (creds.key, creds.ca)


def test_embed_adds_a_ca_to_a_cluster_that_had_none() -> None:
    """A cluster without a CA gets ``certificate-authority-data`` after its other fields."""
    text = edit(K3S, f"    certificate-authority: {K3S_DIR}/server-ca.crt\n", "")
    creds = parse_kubeconfig(text, K3S_PATH)
    out = embed(text, K3S_PATH, creds, ca=NEW_CA.pem)
    assert list(yaml.safe_load(out)["clusters"][0]["cluster"]) == [
        "server",
        "certificate-authority-data",
    ]


def test_embed_leaves_a_user_that_shared_the_entry_by_alias() -> None:
    """Two users sharing one ``user`` mapping through a YAML alias are separated, not both rewritten."""
    text = KUBEADM + b"- name: kube-proxy\n  user: *shared\n"
    text = edit(text, "- name: default-auth\n  user:\n", "- name: default-auth\n  user: &shared\n")
    creds = parse_kubeconfig(text, KUBELET_CONF)
    out = embed(text, KUBELET_CONF, creds, cert=NEW_LEAF.pem, key=NEW_LEAF.key_pem)
    users = yaml.safe_load(out)["users"]
    assert users[1] == {
        "name": "kube-proxy",
        "user": {"client-certificate": STORE, "client-key": STORE},
    }


def test_embed_keeps_long_data_on_one_line() -> None:
    """The base64 of a large PEM is written on one line, as kubectl writes it."""
    bundle = NEW_LEAF.pem + NEW_CA.pem * 20
    creds = parse_kubeconfig(KTHW, KUBELET_CONF)
    out = embed(KTHW, KUBELET_CONF, creds, cert=bundle)
    assert f"client-certificate-data: {b64(bundle)}\n".encode() in out


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        pytest.param(
            "- name: default-auth", "- name: renamed", "users[default-auth]", id="user-gone"
        ),
        pytest.param(
            "- name: default-cluster",
            "- name: renamed",
            "clusters[default-cluster]",
            id="cluster-gone",
        ),
        pytest.param(
            "    user: default-auth\n",
            "    user: admin\n",
            "current-context",
            id="context-now-elsewhere",
        ),
    ],
)
def test_embed_refuses_a_kubeconfig_that_changed_since_it_was_read(
    old: str, new: str, key: str
) -> None:
    """When the user, the cluster or where current-context leads changed, embed raises naming it."""
    creds = parse_kubeconfig(RICH, KUBELET_CONF)
    changed = edit(RICH, old, new)
    with pytest.raises(KubeconfigError) as caught:
        embed(changed, KUBELET_CONF, creds, cert=NEW_LEAF.pem, key=NEW_LEAF.key_pem, ca=NEW_CA.pem)
    assert str(caught.value).startswith(f"{KUBELET_CONF}: {key}")


# -- the I/O shell -----------------------------------------------------------------


def test_read_kubeconfig_resolves_against_the_absolute_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kubeconfig read by a relative name still gives absolute paths."""
    (tmp_path / "kubelet.conf").write_bytes(
        edit(K3S, f"client-key: {K3S_DIR}/client-kubelet.key", "client-key: key.pem")
    )
    monkeypatch.chdir(tmp_path)
    text, creds = read_kubeconfig("kubelet.conf")
    assert text.startswith(b"apiVersion: v1\n")
    assert creds.path == str(tmp_path / "kubelet.conf")
    assert creds.key.path == str(tmp_path / "key.pem")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda p: None, "No such file or directory", id="missing"),
        pytest.param(lambda p: p.mkdir(), "Is a directory", id="directory"),
        pytest.param(os.mkfifo, "top level", id="empty-fifo"),
        pytest.param(
            lambda p: p.write_bytes(b"#" * (MAX_KUBECONFIG_BYTES + 1)), "too large", id="too-large"
        ),
    ],
)
def test_read_kubeconfig_names_the_file_and_why(
    tmp_path: Path, make: Callable[[Path], object], reason: str
) -> None:
    """A missing, unreadable or huge kubeconfig is one KubeconfigError naming the file; a FIFO never blocks."""
    path = tmp_path / "kubelet.conf"
    make(path)
    with pytest.raises(KubeconfigError) as caught:
        read_kubeconfig(str(path))
    assert str(caught.value).startswith(f"{path}: ")
    assert reason in str(caught.value)


def test_importing_the_module_does_not_import_yaml() -> None:
    """``kubecertd --check`` pays for PyYAML only when it reads a kubeconfig."""
    code = "import sys, kubecertd.kubeconfig; sys.exit('yaml' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- properties --------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = st.sampled_from(["a", "b"])
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | NAMES
    | st.text(max_size=8)
    | st.sampled_from(["pki/x.pem", "/abs/k.pem", "", "A$", "QQ=", "QQ==\n", "a b"])
)
YAMLISH = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=30,
)


def mostly(valid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """``valid`` nine times in ten, else any YAML-ish value or nesting."""
    return st.sampled_from(range(10)).flatmap(lambda pick: YAMLISH if pick == 9 else valid)


def fields(
    required: dict[str, st.SearchStrategy[object]], optional: dict[str, st.SearchStrategy[object]]
) -> st.SearchStrategy[object]:
    """A mapping whose every value, and the mapping itself, may be junk."""
    return mostly(
        st.fixed_dictionaries(
            {name: mostly(value) for name, value in required.items()},
            optional={name: mostly(value) for name, value in optional.items()},
        )
    )


def section(field: str, spec: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    entry = mostly(st.fixed_dictionaries({"name": mostly(NAMES), field: spec}))
    return mostly(st.lists(entry, min_size=1, max_size=3, unique_by=repr))


DATA = st.binary(min_size=1, max_size=32).map(b64)
FILES = st.sampled_from(["pki/x.pem", "/abs/k.pem", "../up.pem", "~/home.pem"])


def credential(base: str) -> st.SearchStrategy[dict[str, object]]:
    """``base``, ``base-data`` or both, as kubeconfigs name a credential."""
    file = st.fixed_dictionaries({base: mostly(FILES)})
    data = st.fixed_dictionaries({f"{base}-data": mostly(DATA)})
    return st.one_of(file, data, st.tuples(file, data).map(lambda pair: {**pair[0], **pair[1]}))


USER = st.tuples(
    credential("client-certificate"), credential("client-key"), fields({}, {"token": NAMES})
).map(
    lambda parts: {**parts[0], **parts[1], **parts[2]} if isinstance(parts[2], dict) else parts[2]
)
# Documents shaped like kubeconfigs, with junk anywhere: the paths that reach Credentials.
KUBECONFIGISH = st.fixed_dictionaries(
    {
        "current-context": mostly(NAMES),
        "contexts": section(
            "context", fields({"cluster": NAMES, "user": NAMES}, {"namespace": NAMES})
        ),
        "clusters": section(
            "cluster",
            fields(
                {},
                {
                    "server": st.just("https://10.0.0.10:6443"),
                    "certificate-authority": FILES,
                    "certificate-authority-data": DATA,
                },
            ),
        ),
        "users": section("user", mostly(USER)),
    },
    optional={"preferences": YAMLISH, "extensions": YAMLISH, "apiVersion": st.just("v1")},
)


def parses_or_refuses(text: bytes) -> Credentials | None:
    """The only two outcomes allowed: credentials, or KubeconfigError naming the file."""
    try:
        return parse_kubeconfig(text, KUBELET_CONF)
    except KubeconfigError as exc:
        assert str(exc).startswith(f"{KUBELET_CONF}: ")
        assert "\n" not in str(exc)
        return None


@FUZZ
@given(text=st.binary(max_size=2048))
def test_any_bytes_give_credentials_or_kubeconfig_error(text: bytes) -> None:
    """Any bytes as a kubeconfig give Credentials or KubeconfigError, never another exception."""
    parses_or_refuses(text)


@FUZZ
@given(data=st.data())
def test_damaged_kubeconfigs_give_credentials_or_kubeconfig_error(data: st.DataObject) -> None:
    """A real kubeconfig with a slice replaced by junk gives Credentials or KubeconfigError."""
    text = data.draw(st.sampled_from([KUBEADM, KTHW, K3S, RICH]))
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 64)))
    junk = data.draw(
        st.binary(max_size=16) | st.text("[]{}-:,&*!|>'\"\n #", max_size=16).map(str.encode)
    )
    parses_or_refuses(text[:start] + junk + text[end:])


@FUZZ
@given(doc=KUBECONFIGISH | YAMLISH, cert=st.binary(min_size=1, max_size=64))
def test_yamlish_documents_parse_or_refuse_and_embed_round_trips(doc: object, cert: bytes) -> None:
    """Any nesting of kubeconfig-like keys gives Credentials or KubeconfigError; what parses, embed rewrites so that it parses back."""
    text = yaml.safe_dump(doc).encode()
    creds = parses_or_refuses(text)
    if creds is not None:
        out = embed(text, KUBELET_CONF, creds, cert=cert, key=cert[::-1], ca=cert)
        again = parse_kubeconfig(out, KUBELET_CONF)
        assert (again.context, again.cluster, again.user) == (
            creds.context,
            creds.cluster,
            creds.user,
        )
        assert again.cert.data == cert and again.key.data == cert[::-1]
        assert again.ca is not None and again.ca.data == cert


@FUZZ
@given(
    depth=st.integers(MAX_DEPTH + 1, 20_000),
    opener=st.sampled_from(["[", "{a: ", "- ", "a:\n"]),
    closed=st.booleans(),
)
def test_deep_nesting_is_a_kubeconfig_error(depth: int, opener: str, closed: bool) -> None:
    """Documents nested past MAX_DEPTH, closed or not, give KubeconfigError, never RecursionError."""
    if opener == "a:\n":  # block mappings nest by indentation
        text = "".join(" " * i + "a:\n" for i in range(min(depth, 400))) + " " * 400 + "x\n"
    else:
        text = opener * depth + ("]" * depth if closed and opener == "[" else "")
    with pytest.raises(KubeconfigError):
        parse_kubeconfig(text.encode(), KUBELET_CONF)


@pytest.mark.parametrize("libyaml", [True, False], ids=["libyaml", "pure-python"])
@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"[" * 10_000, id="open-brackets"),
        pytest.param(b"[" * 999 + b"]" * 999, id="closed-brackets"),
        pytest.param(b"- " * 10_000 + b"x", id="block-sequence"),
        pytest.param(b"users: " + b"{a: " * 5_000, id="open-braces"),
    ],
)
def test_deep_nesting_is_refused_with_either_parser(
    libyaml: bool, text: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The depth bound holds with libyaml and with PyYAML's pure-Python fallback alike."""
    if not libyaml:
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
        monkeypatch.delattr(yaml, "CSafeDumper", raising=False)
    with pytest.raises(KubeconfigError, match="nest"):
        parse_kubeconfig(text, KUBELET_CONF)


@pytest.mark.parametrize("libyaml", [True, False], ids=["libyaml", "pure-python"])
def test_both_parsers_read_and_embed_alike(libyaml: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libyaml, the pure-Python loader and dumper give the same credentials and output."""
    expected = embed(RICH, KUBELET_CONF, parse_kubeconfig(RICH, KUBELET_CONF), cert=NEW_LEAF.pem)
    if not libyaml:
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
        monkeypatch.delattr(yaml, "CSafeDumper", raising=False)
    creds = parse_kubeconfig(RICH, KUBELET_CONF)
    assert embed(RICH, KUBELET_CONF, creds, cert=NEW_LEAF.pem) == expected
