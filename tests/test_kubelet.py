"""Living with kubelet: rotation, restarts and kubelet's own log lines (kubecertd.kubelet)."""

from __future__ import annotations

import pytest

from kubecertd.diagnose import ERROR
from kubecertd.discover import NO_FLAGS, KubeletConfig, KubeletFlags
from kubecertd.edges.clock import ClockState
from kubecertd.kubelet import (
    CLOCK_HINT,
    FINDINGS_OF_KIND,
    INFO,
    KINDS,
    MAX_LINE,
    ROTATION_HINT,
    KubeletLine,
    Restart,
    Rotation,
    agreeing_line,
    clock_finding,
    failure_after,
    match_line,
    parse_version,
    restart_decision,
    rotation_finding,
    rotation_of,
)

CONFIG = "/var/lib/kubelet/config.yaml"
A = "server2277z.prod.jp.local"
B = "server2267z.prod.jp.local"
KLOG = "E1203 12:00:00.000000    1234 "  # klog's header: level, date, time, PID


def flags(rotate: bool | None = None, config: str | None = None) -> KubeletFlags:
    return NO_FLAGS._replace(rotate_certificates=rotate, config=config)


# --- rotation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "config", "error", "expected"),
    [
        pytest.param(
            None,
            None,
            None,
            Rotation(False, "no KubeletConfiguration and no flag: off (kubelet's default)"),
            id="nothing",
        ),
        pytest.param(
            flags(),
            None,
            None,
            Rotation(False, "no KubeletConfiguration and no flag: off (kubelet's default)"),
            id="flags-without-rotation",
        ),
        pytest.param(
            flags(True),
            None,
            None,
            Rotation(True, "--rotate-certificates of kubelet.service"),
            id="flag-on",
        ),
        pytest.param(
            flags(False),
            None,
            None,
            Rotation(False, "--rotate-certificates=false of kubelet.service"),
            id="flag-off",
        ),
        pytest.param(
            flags(config=CONFIG),
            KubeletConfig(CONFIG, True),
            None,
            Rotation(True, f"rotateCertificates: true in {CONFIG}"),
            id="config-on",
        ),
        pytest.param(
            flags(config=CONFIG),
            KubeletConfig(CONFIG, False),
            None,
            Rotation(False, f"rotateCertificates: false in {CONFIG}"),
            id="config-off",
        ),
        pytest.param(
            flags(config=CONFIG),
            KubeletConfig(CONFIG, None),
            None,
            Rotation(False, f"no rotateCertificates in {CONFIG}: off (kubelet's default)"),
            id="config-silent",
        ),
        pytest.param(
            flags(False, CONFIG),
            KubeletConfig(CONFIG, True),
            None,
            Rotation(
                False,
                f"--rotate-certificates=false of kubelet.service (over rotateCertificates: true in {CONFIG}: kubelet's flags win)",
            ),
            id="flag-off-beats-config-on",
        ),
        pytest.param(
            flags(True, CONFIG),
            KubeletConfig(CONFIG, False),
            None,
            Rotation(
                True,
                f"--rotate-certificates of kubelet.service (over rotateCertificates: false in {CONFIG}: kubelet's flags win)",
            ),
            id="flag-on-beats-config-off",
        ),
        pytest.param(
            flags(True, CONFIG),
            KubeletConfig(CONFIG, True),
            None,
            Rotation(True, "--rotate-certificates of kubelet.service"),
            id="flag-and-config-agree",
        ),
        pytest.param(
            flags(config=CONFIG),
            None,
            f"{CONFIG}: not valid YAML or JSON: mapping values are not allowed here",
            Rotation(
                False,
                f"KubeletConfiguration unreadable, taken as off (kubelet would not start): {CONFIG}: not valid YAML or JSON: mapping values are not allowed here",
            ),
            id="config-unreadable",
        ),
        pytest.param(
            flags(True, CONFIG),
            None,
            f"{CONFIG}: the KubeletConfiguration file is empty",
            Rotation(True, "--rotate-certificates of kubelet.service"),
            id="flag-despite-unreadable-config",
        ),
        pytest.param(
            flags(config=CONFIG),
            None,
            None,
            Rotation(False, f"--config {CONFIG} of kubelet.service was not read: taken as off"),
            id="config-not-read",
        ),
    ],
)
def test_rotation_of(
    given: KubeletFlags | None,
    config: KubeletConfig | None,
    error: str | None,
    expected: Rotation,
) -> None:
    """A flag on the command line wins over the KubeletConfiguration, which wins over the default (off)."""
    assert rotation_of(given, config, error, unit="kubelet.service") == expected


def test_rotation_of_without_unit_names_the_command_line() -> None:
    """Without a unit name the source says the flag came from kubelet's command line."""
    assert (
        rotation_of(flags(True), None).source == "--rotate-certificates on kubelet's command line"
    )


@pytest.mark.parametrize(
    ("on", "healthy", "expected"),
    [
        pytest.param(True, True, True, id="rotating-healthy"),
        pytest.param(True, False, False, id="rotating-unhealthy"),
        pytest.param(False, True, False, id="not-rotating"),
    ],
)
def test_rotation_finding(on: bool, healthy: bool, expected: bool) -> None:
    """rotation-managed (info) only when kubelet rotates and the certificate is healthy."""
    rotation = Rotation(on, f"rotateCertificates: true in {CONFIG}")
    finding = rotation_finding(rotation, healthy, "/var/lib/kubelet/pki/kubelet-client-current.pem")
    if not expected:
        assert finding is None
        return
    assert finding is not None
    assert (finding.code, finding.severity, finding.hint) == (
        "rotation-managed",
        INFO,
        ROTATION_HINT,
    )
    assert finding.path == "/var/lib/kubelet/pki/kubelet-client-current.pem"
    assert (
        finding.message
        == f"kubelet rotates this certificate itself (rotateCertificates: true in {CONFIG})"
    )


# --- versions and restarts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Kubernetes v1.29.3", (1, 29, 3), id="kubelet"),
        pytest.param("Kubernetes v1.29.3\n", (1, 29, 3), id="kubelet-newline"),
        pytest.param("v1.18.0-rc.1+k3s1", (1, 18, 0), id="prerelease"),
        pytest.param("1.30", (1, 30, 0), id="two-parts"),
        pytest.param("1.17.16", (1, 17, 16), id="setting"),
        pytest.param(
            "k3s version v1.29.3+k3s1 (2c4f5a6d)\ngo version go1.21.8", (1, 29, 3), id="k3s"
        ),
        pytest.param("rke2 version v1.30.4+rke2r1 (e5b7c4)", (1, 30, 4), id="rke2"),
        pytest.param("Kubernetes v1.31.0-eks-a737599", (1, 31, 0), id="eks"),
        pytest.param("go version go1.21.8 linux/amd64", None, id="go-only"),
        pytest.param("", None, id="empty"),
        pytest.param("kubelet: command not found", None, id="garbage"),
        pytest.param("v1", None, id="major-only"),
        pytest.param("10.0.0.1", None, id="address"),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int] | None) -> None:
    """The first version in kubelet's (or k3s's) --version output, or None."""
    assert parse_version(text) == expected


V129 = (1, 29, 3)


@pytest.mark.parametrize(
    ("mode", "shape", "rotation", "version", "ca_changed", "running", "expected"),
    [
        pytest.param(
            "true", "files", False, V129, False, True,
            Restart(True, "[kubelet] restart = true"), id="mode-true",
        ),
        pytest.param(
            "false", "embedded", True, None, True, False,
            Restart(False, "[kubelet] restart = false"), id="mode-false",
        ),
        pytest.param(
            "auto", "files", False, V129, False, True,
            Restart(False, "kubelet 1.29.3 (>= 1.18) reloads client certificate files by itself"),
            id="files-reload",
        ),
        pytest.param(
            "auto", "store", False, (1, 18, 0), False, True,
            Restart(False, "kubelet 1.18.0 (>= 1.18) reloads client certificate files by itself"),
            id="store-rotation-off-at-1.18",
        ),
        pytest.param(
            "auto", "files", False, (1, 17, 99), False, True,
            Restart(True, "kubelet 1.17.99 predates 1.18, the first kubelet to reload client certificate files"),
            id="before-1.18",
        ),
        pytest.param(
            "auto", "files", False, None, False, True,
            Restart(
                True,
                "kubelet's version is unknown (kubelet --version did not answer; set [kubelet] version): only kubelet >= 1.18 reloads client certificate files",
            ),
            id="version-unknown",
        ),
        pytest.param(
            "auto", "embedded", False, V129, False, True,
            Restart(True, "kubelet 1.29.3 reads credentials embedded in its kubeconfig only when it starts"),
            id="embedded",
        ),
        pytest.param(
            "auto", "store", True, V129, False, True,
            Restart(True, "kubelet 1.29.3 with rotation on keeps its certificate in memory"),
            id="rotation-on",
        ),
        pytest.param(
            "auto", "files", False, V129, True, True,
            Restart(True, "kubelet 1.29.3 reads the cluster CA only when it starts, and the CA changed"),
            id="ca-changed",
        ),
        pytest.param(
            "auto", "files", False, V129, False, False,
            Restart(True, "kubelet is not running; starting it is what makes it read the new pair"),
            id="not-running",
        ),
        pytest.param(
            "auto", "mystery", False, V129, False, True,
            Restart(True, "shape 'mystery' is not known to be reloaded by kubelet"),
            id="unknown-shape",
        ),
    ],
)  # fmt: skip
def test_restart_decision(
    mode: str,
    shape: str,
    rotation: bool,
    version: tuple[int, int, int] | None,
    ca_changed: bool,
    running: bool,
    expected: Restart,
) -> None:
    """auto restarts only when kubelet would not pick up the new pair by itself (notes section 4)."""
    assert restart_decision(mode, shape, rotation, version, ca_changed, running) == expected


def test_restart_decision_refuses_an_unknown_mode() -> None:
    """A mode the config loader should have refused is a ValueError naming the setting."""
    with pytest.raises(ValueError, match=r"\[kubelet\] restart is 'sometimes'"):
        restart_decision("sometimes", "files", False, V129, False, True)


# --- kubelet's lines ----------------------------------------------------------------------

LINES = [
    # NodeRestriction before kubernetes PR #71396 (kubernetes#54482)
    ("wrong-node", f'{KLOG}kubelet_node_status.go:106] Unable to register node "{A}" with API server: nodes "{A}" is forbidden: node "{B}" cannot modify node "{A}"'),
    # NodeRestriction today, unstructured (sealerio/sealer#226) and structured (klog's escaped err=)
    ("wrong-node", f'{KLOG}kubelet_node_status.go:94] Unable to register node "{A}" with API server: nodes "{A}" is forbidden: node "{B}" is not allowed to modify node "{A}"'),
    ("wrong-node", f'{KLOG}kubelet_node_status.go:96] "Unable to register node with API server" err="nodes \\"{A}\\" is forbidden: node \\"{B}\\" is not allowed to modify node \\"{A}\\"" node="{A}"'),
    ("wrong-node", f'{KLOG}kubelet_node_status.go:540] "Error updating node status, will retry" err="error patching node status: nodes \\"{A}\\" is forbidden: node \\"{B}\\" is not allowed to modify node \\"{A}\\""'),
    # The Node authorizer's lease rule
    ("wrong-node", f'{KLOG}controller.go:145] "Failed to ensure lease exists, will retry" err="leases.coordination.k8s.io \\"{A}\\" is forbidden: User \\"system:node:{B}\\" cannot get resource \\"leases\\" in API group \\"coordination.k8s.io\\" in the namespace \\"kube-node-lease\\": can only access node lease with the same name as the requesting node" interval="7s"'),
    # The Node authorizer with CN "system:node:" (kelseyhightower/kubernetes-the-hard-way#228)
    ("unknown-node", f'{KLOG}reflector.go:138] k8s.io/client-go/informers/factory.go:134: Failed to watch *v1.Node: failed to list *v1.Node: nodes "node-0" is forbidden: User "system:node:" cannot list resource "nodes" in API group "" at the cluster scope: unknown node for user "system:node:"'),
    ("unknown-node", f'{KLOG}kubelet_node_status.go:96] "Unable to register node with API server" err="nodes \\"node-0\\" is forbidden: User \\"system:node:\\" cannot create resource \\"nodes\\" in API group \\"\\" at the cluster scope: unknown node for user \\"system:node:\\"" node="node-0"'),
    # 401s (canonical/microk8s#3460, easzlab/kubeasz#547, kubernetes/kubeadm#809)
    ("unauthorized", f'{KLOG}kubelet_node_status.go:92] Unable to register node "{A}" with API server: Unauthorized'),
    ("unauthorized", f"{KLOG}reflector.go:178] k8s.io/client-go/informers/factory.go:135: Failed to list *v1.Node: Unauthorized"),
    ("unauthorized", f'{KLOG}kubelet_node_status.go:96] "Unable to register node with API server" err="Unauthorized" node="{A}"'),
    ("unauthorized", f"{KLOG}certificate_manager.go:471] kubernetes.io/kube-apiserver-client-kubelet: Failed while requesting a signed certificate from the master: cannot create certificate signing request: Unauthorized"),
    ("unauthorized", f'{KLOG}reflector.go:158] "Unhandled Error" err="k8s.io/client-go/informers/factory.go:160: Failed to watch *v1.Node: failed to list *v1.Node: Unauthorized" logger="UnhandledError"'),
    # Go's chain check on kubelet's clock (k3s-io/k3s#5163, kubernetes-sigs/kind#2166)
    ("cert-expired", f'{KLOG}kubelet_node_status.go:96] "Unable to register node with API server" err="Post \\"https://127.0.0.1:6443/api/v1/nodes\\": tls: failed to verify certificate: x509: certificate has expired or is not yet valid: current time 2026-12-03T12:00:00Z is before 2026-12-04T00:00:00Z" node="{A}"'),
    ("cert-expired", f"{KLOG}reflector.go:126] k8s.io/kubernetes/pkg/kubelet/kubelet.go:458: Failed to list *v1.Node: Get https://10.0.0.1:6443/api/v1/nodes?fieldSelector=metadata.name%3D{A}&limit=500: x509: certificate has expired or is not yet valid"),
    # bootstrap.go isClientConfigStillValid, with the path (PR #98230) and before it
    ("bootstrap-expired", "E1203 10:01:21.970450   11127 bootstrap.go:265] part of the existing bootstrap client certificate in /etc/kubernetes/kubelet.conf is expired: 2024-06-11 17:17:20 +0000 UTC"),
    ("bootstrap-expired", "E0427 15:38:51.829964   63737 bootstrap.go:205] Part of the existing bootstrap client certificate is expired: 2020-02-23 15:48:00 +0000 UTC"),
    ("bootstrap-expired", 'E0706 14:14:58.125645    4385 bootstrap.go:266] "Unhandled Error" err="part of the existing bootstrap client certificate in /etc/kubernetes/kubelet.conf is expired: 2026-05-17 12:05:13 +0000 UTC" logger="UnhandledError"'),
    # pkg/kubelet/certificate/transport.go
    ("current-expired", "E1203 12:00:00.000000    1234 transport.go:110] The currently active client certificate has expired and the server is responsive, exiting."),
    ("current-expired", "F1203 12:00:00.000000    1234 transport.go:110] The currently active client certificate has expired and the server is responsive, exiting."),
    ("current-expired", f"{KLOG}transport.go:112] The currently active client certificate has expired, but the server is not responsive. A restart may be necessary to retrieve new initial credentials."),
    # client-go certificate_store.go updateSymlink
    ("not-symlink", f'{KLOG}certificate_manager.go:488] "Failed while requesting a signed certificate from the control plane" err="expected \\"/var/lib/kubelet/pki/kubelet-client-updated.pem\\" to be a symlink but it is a file" logger="kubernetes.io/kube-apiserver-client-kubelet"'),
    ("not-symlink", f'{KLOG}certificate_manager.go:385] Failed while requesting a signed certificate from the master: expected "/var/lib/kubelet/pki/kubelet-client-current.pem" to be a symlink but it is a file'),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "text"), [pytest.param(k, t, id=k) for k, t in LINES])
def test_match_line_recognises_kubelets_words(kind: str, text: str) -> None:
    """Each line kubelet logs when its credentials fail is recognised as its kind and kept
    as written (cut to MAX_LINE characters around the failure when longer)."""
    line = match_line(text)
    assert line is not None and line.kind == kind
    if len(text) <= MAX_LINE:
        assert line.line == text
    else:
        assert len(line.line) <= MAX_LINE and line.line.strip("…") in text


def test_every_kind_has_lines_and_findings() -> None:
    """The table covers every kind, and every kind agrees with at least one finding code."""
    assert {kind for kind, _ in LINES} == set(KINDS) == set(FINDINGS_OF_KIND)
    assert all(FINDINGS_OF_KIND[kind] for kind in KINDS)


NOT_KUBELET_FAILURES = [
    pytest.param(f'I1203 12:00:00.000000    1234 kubelet_node_status.go:76] "Successfully registered node" node="{A}"', id="registered"),
    pytest.param(f'I1203 12:00:00.000000    1234 kubelet_node_status.go:70] Attempting to register node "{A}"', id="attempting"),
    pytest.param(f"certificate belongs to node {B}, this node is {A}", id="kubecertd-finding"),
    pytest.param("fix: failed for cert-wrong-node after 3 tries (signer-unreachable): gave up after 3 attempts: https://signer:8443/v1/ca: Connection refused", id="kubecertd-fix"),
    pytest.param("kubecertd: signer refused: 401 Unauthorized", id="http-status-line"),
    pytest.param('I1203 12:00:00.000000    1234 server.go:123] "Unauthorized requests to the read-only port are rejected"', id="unauthorized-as-a-word"),
    pytest.param('W1203 12:00:00.000000    1234 handler.go:90] "Rejected request" reason="Unauthorized access" code=401', id="unauthorized-in-a-phrase"),
    pytest.param(f"{KLOG}server.go:88] webhook: Unauthorized access attempt from 10.0.0.9", id="unauthorized-followed"),
    # kubelet as a server judging its own clients' certificates
    pytest.param(f'{KLOG}authentication.go:73] "Unable to authenticate the request" err="[x509: certificate has expired or is not yet valid: current time 2026-12-03T12:00:00Z is after 2026-12-01T00:00:00Z, verifying certificate SN=1, SKID=, AKID= failed: x509: certificate has expired or is not yet valid: current time 2026-12-03T12:00:00Z is after 2026-12-01T00:00:00Z]"', id="kubelet-as-server"),
    pytest.param(f'{KLOG}kubelet.go:1900] node "{A}" can only delete pods with spec.nodeName set to itself', id="other-noderestriction"),
    pytest.param(f"{KLOG}certificate_manager.go:356] kubernetes.io/kube-apiserver-client-kubelet: Certificate rotation is enabled", id="rotation-enabled"),
    pytest.param("", id="empty"),
]  # fmt: skip


@pytest.mark.parametrize("text", NOT_KUBELET_FAILURES)
def test_match_line_ignores_other_lines(text: str) -> None:
    """Lines that are not kubelet reporting its own credentials' failure do not match."""
    assert match_line(text) is None


def test_long_line_is_cut_around_what_matched() -> None:
    """A line over MAX_LINE characters is cut to a window that shows the failure, with ellipses."""
    noise = "x" * 500
    line = match_line(f"  {KLOG}reflector.go:1] {noise}: Failed to list *v1.Node: Unauthorized")
    assert line is not None and line.kind == "unauthorized"
    assert len(line.line) <= MAX_LINE
    assert line.line.startswith("…") and line.line.endswith("Unauthorized")
    head = match_line(
        f"{KLOG}transport.go:110] The currently active client certificate has expired, {noise}"
    )
    assert head is not None and len(head.line) <= MAX_LINE
    assert head.line.startswith(KLOG) and head.line.endswith("…")


def test_short_line_is_only_trimmed() -> None:
    """Surrounding whitespace goes; the line is otherwise kept as kubelet wrote it."""
    text = f"{KLOG}reflector.go:178] Failed to list *v1.Node: Unauthorized"
    assert match_line(f"  {text}\n") == KubeletLine("unauthorized", text)


# --- which line agrees with which finding -------------------------------------------------

WRONG = KubeletLine("wrong-node", "wrong 1")
UNAUTHORIZED = KubeletLine("unauthorized", "unauthorized")
EXPIRED = KubeletLine("current-expired", "current expired")
WRONG_AGAIN = KubeletLine("wrong-node", "wrong 2")
HISTORY = [WRONG, UNAUTHORIZED, EXPIRED, WRONG_AGAIN]  # oldest first


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        pytest.param("cert-wrong-node", WRONG_AGAIN, id="cert-wrong-node"),
        pytest.param("cert-expired", EXPIRED, id="cert-expired"),
        pytest.param("clock-unsynced", EXPIRED, id="clock-unsynced"),
        pytest.param("cert-untrusted", UNAUTHORIZED, id="cert-untrusted"),
        pytest.param("cert-wrong-usage", UNAUTHORIZED, id="cert-wrong-usage"),
        pytest.param("cert-wrong-group", None, id="cert-wrong-group"),
        pytest.param("key-mismatch", None, id="key-mismatch"),
        pytest.param("cert-not-symlink", None, id="cert-not-symlink"),
    ],
)
def test_agreeing_line_is_the_newest_that_agrees(code: str, expected: KubeletLine | None) -> None:
    """The newest line whose kind agrees with the finding, or None."""
    assert agreeing_line(code, HISTORY) == expected


def test_agreeing_line_of_nothing() -> None:
    """No lines, no agreement."""
    assert agreeing_line("cert-expired", []) is None


@pytest.mark.parametrize(
    ("kind", "codes"),
    [
        pytest.param("wrong-node", {"cert-wrong-node"}, id="wrong-node"),
        pytest.param("unknown-node", {"cert-wrong-node"}, id="unknown-node"),
        pytest.param("unauthorized", {"cert-untrusted", "cert-expired", "cert-not-yet-valid", "cert-wrong-usage", "ca-expired", "clock-unsynced"}, id="unauthorized"),
        pytest.param("cert-expired", {"cert-expired", "cert-not-yet-valid", "ca-expired", "clock-unsynced"}, id="cert-expired"),
        pytest.param("bootstrap-expired", {"cert-expired", "clock-unsynced"}, id="bootstrap-expired"),
        pytest.param("current-expired", {"cert-expired", "clock-unsynced"}, id="current-expired"),
        pytest.param("not-symlink", {"cert-not-symlink"}, id="not-symlink"),
    ],
)  # fmt: skip
def test_findings_of_kind(kind: str, codes: set[str]) -> None:
    """Each kind agrees with exactly the findings kubelet's failure can stand for."""
    assert FINDINGS_OF_KIND[kind] == codes


def test_failure_after_is_the_newest_line() -> None:
    """After a heal any failure line counts; the newest is the one quoted."""
    assert failure_after(HISTORY) == WRONG_AGAIN
    assert failure_after([]) is None


# --- the clock ----------------------------------------------------------------------------

UNSYNCED = ClockState(False, "NTPSynchronized from org.freedesktop.timedate1")


@pytest.mark.parametrize(
    ("clock", "codes", "suspects"),
    [
        pytest.param(UNSYNCED, ["cert-expired"], "cert-expired", id="cert-expired"),
        pytest.param(UNSYNCED, ["cert-not-yet-valid"], "cert-not-yet-valid", id="cert-not-yet-valid"),
        pytest.param(UNSYNCED, ["ca-expired", "cert-expired"], "cert-expired, ca-expired", id="ca-expired"),
        pytest.param(UNSYNCED, ["cert-wrong-node"], None, id="not-a-clock-finding"),
        pytest.param(UNSYNCED, [], None, id="healthy"),
        pytest.param(ClockState(True, "NTPSynchronized from org.freedesktop.timedate1"), ["cert-expired"], None, id="synchronized"),
        pytest.param(ClockState(None, "could not tell"), ["cert-expired"], None, id="unknown"),
    ],
)  # fmt: skip
def test_clock_finding(clock: ClockState, codes: list[str], suspects: str | None) -> None:
    """clock-unsynced (error) only on a clock known to be unsynchronized and a finding it could cause."""
    finding = clock_finding(clock, codes, "/etc/kubernetes/ssl/worker.pem")
    if suspects is None:
        assert finding is None
        return
    assert finding is not None
    assert (finding.code, finding.severity, finding.hint) == ("clock-unsynced", ERROR, CLOCK_HINT)
    assert finding.path == "/etc/kubernetes/ssl/worker.pem"
    assert finding.message == (
        "the clock is not synchronized (NTPSynchronized from org.freedesktop.timedate1); "
        f"{suspects} may be the clock's fault, not the certificate's"
    )
