"""Healing steps 1-6 with plain fakes for the signer and systemd (SPEC "Healing").

The fake signer signs for real with a test CA through the signer's own
``build_certificate``; the end-to-end tests against the real signer and a real
systemd live in test_daemon_systemd.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kubecertd import pki
from kubecertd.cli import check_files
from kubecertd.config import Config, load_config
from kubecertd.diagnose import Diagnosis
from kubecertd.edges.client import ClientCert, Issued
from kubecertd.errors import (
    ConfigError,
    InstallError,
    KubecertdError,
    NoIdentity,
    SignerError,
    SignerMisconfigured,
    SignerRefused,
    SignerUnreachable,
    VerificationError,
)
from kubecertd.heal import Healer, healing_reason, load_restarts
from kubecertd.locate import configured_files
from kubecertd.material import Material, read_material
from kubecertd.oneshot import Retries, with_retries
from kubecertd.signer import policy

import factories

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC)
NODE = factories.NODE


def make_ca() -> factories.Issued:
    return factories.make_ca(
        not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=3650)
    )


class FakeSigner:
    """Signs kubelet CSRs with ``ca``; ``lie`` can rewrite what it answers."""

    def __init__(
        self,
        ca: factories.Issued,
        lie: Callable[[x509.CertificateSigningRequest], bytes] | None = None,
    ):
        self.ca = ca
        self.lie = lie
        self.calls: list[tuple[str, ClientCert]] = []

    def conversation(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def fetch_ca(self, identity: ClientCert | None = None) -> bytes:
        return self.ca.pem

    def sign(
        self, csr_pem: bytes, reason: str, identity: ClientCert, culprits: str | None = None
    ) -> Issued:
        self.calls.append((reason, identity))
        csr = x509.load_pem_x509_csr(csr_pem)
        if self.lie:
            return Issued(self.lie(csr), self.ca.pem)
        return Issued(self._issue(csr.public_key(), NODE, self.ca), self.ca.pem)

    @staticmethod
    def _issue(public_key: object, node: str, ca: factories.Issued) -> bytes:
        issuer = policy.Issuer(ca.cert, ca.key)
        cert = policy.build_certificate(
            issuer,
            public_key,
            node,
            policy.KUBELET,
            dt.timedelta(days=30),
            NOW,
            policy.random_serial(),
        )
        return pki.certificate_pem(cert)

    def enroll(self, token: str, csr_pem: bytes) -> Issued:
        raise NotImplementedError

    def renew_identity(self, csr_pem: bytes, identity: ClientCert) -> Issued:
        raise NotImplementedError


class FakeUnits:
    """systemd as a dict: restart bumps the PID; ``after_restart`` sets the state."""

    def __init__(self, after_restart: str = "active") -> None:
        self.after_restart = after_restart
        self.state, self.pid, self.restarts = "active", 100, 0

    def restart(self, unit: str, timeout: float) -> str:
        self.restarts += 1
        self.pid += 1
        self.state = self.after_restart
        return "done"

    def active_state(self, unit: str) -> str:
        return self.state

    def main_pid(self, unit: str) -> int:
        return self.pid


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """A config for NODE with its ssl_dir and state_dir under tmp_path."""

    def build(**kubelet: object) -> Config:
        settings = {
            "settle": '"0s"',
            **{k: str(v).lower() if isinstance(v, bool) else v for k, v in kubelet.items()},
        }
        lines = "\n".join(f"{k} = {v}" for k, v in settings.items())
        text = f"""
node_name = "{NODE}"
ssl_dir = "{tmp_path / "ssl"}"
[signer]
identity_cert = "{tmp_path / "state" / "identity.pem"}"
identity_key = "{tmp_path / "state" / "identity-key.pem"}"
[daemon]
state_dir = "{tmp_path / "state"}"
[kubelet]
{lines}
"""
        return load_config(text, "test.toml", "host")

    return build


def diagnosis_of(config: Config) -> tuple[Material, Diagnosis]:
    material = read_material(config.ca_path, config.cert_path, config.key_path)
    return material, check_files(config, configured_files(config))


def write_pair(
    config: object, ca: factories.Issued, node: str = NODE, **issue: object
) -> factories.Issued:
    leaf = factories.issue(
        ca,
        cn_list=[f"system:node:{node}"],
        not_before=issue.pop("not_before", NOW - dt.timedelta(days=1)),
        not_after=issue.pop("not_after", NOW + dt.timedelta(days=29)),
    )
    factories.write_ssl_dir(Path(config.ssl_dir), ca.pem, leaf.pem, leaf.key_pem)
    return leaf


def write_identity(config: Config) -> None:
    """A node identity certificate for NODE (from an identity CA) in state_dir."""
    identity = factories.issue(
        make_ca(),
        cn_list=[NODE],
        orgs=[],
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=365),
    )
    state = Path(config.daemon.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    Path(config.signer.identity_cert).write_bytes(identity.pem)
    Path(config.signer.identity_key).write_bytes(identity.key_pem)


def snapshot(directory: str) -> dict[str, bytes]:
    return {
        name: (Path(directory) / name).read_bytes()
        for name in sorted(os.listdir(directory))
        if name.endswith(".pem")
    }


def test_missing_cert_is_healed_and_kubelet_restarted(make_config: Callable[..., Config]) -> None:
    """cert-missing: a new key and certificate are installed and kubelet restarted once."""
    config, ca = make_config(), make_ca()
    write_pair(config, ca)
    write_identity(config)
    os.unlink(config.cert_path)
    material, diagnosis = diagnosis_of(config)
    signer, units = FakeSigner(ca), FakeUnits()
    outcome = Healer(config, configured_files(config), signer, units).heal(
        diagnosis, material, "cert-missing"
    )
    _, after = diagnosis_of(config)
    assert after.healthy and after.findings == ()
    assert outcome.restarted is True and units.restarts == 1
    assert os.stat(config.key_path).st_mode & 0o777 == 0o600
    assert signer.calls[0] == (
        "cert-missing",
        (config.signer.identity_cert, config.signer.identity_key),
    )


def test_seed_case_uses_identity_not_the_copied_cert(make_config: Callable[..., Config]) -> None:
    """Another node's pair is never used as the client identity; without an identity it is an error."""
    config, ca = make_config(), make_ca()
    write_pair(config, ca, node=factories.OTHER_NODE)
    material, diagnosis = diagnosis_of(config)
    assert "cert-wrong-node" in diagnosis.codes
    with pytest.raises(SignerError, match="enroll this node first"):
        Healer(config, configured_files(config), FakeSigner(ca), None).heal(
            diagnosis, material, "cert-wrong-node"
        )


def test_healthy_kubelet_pair_serves_as_identity(make_config: Callable[..., Config]) -> None:
    """Without an identity certificate, a fully healthy kubelet pair authenticates a renewal."""
    config, ca = make_config(), make_ca()
    write_pair(config, ca)
    material, diagnosis = diagnosis_of(config)
    signer = FakeSigner(ca)
    Healer(config, configured_files(config), signer, None).heal(diagnosis, material, "renewal")
    assert signer.calls[0][1] == (config.cert_path, config.key_path)


def other_node(csr: x509.CertificateSigningRequest) -> bytes:
    return FakeSigner._issue(csr.public_key(), factories.OTHER_NODE, CA_FOR_LIES)


def other_key(csr: x509.CertificateSigningRequest) -> bytes:
    return FakeSigner._issue(factories.new_key().public_key(), NODE, CA_FOR_LIES)


def other_ca(csr: x509.CertificateSigningRequest) -> bytes:
    return FakeSigner._issue(csr.public_key(), NODE, make_ca())


def expired(csr: x509.CertificateSigningRequest) -> bytes:
    leaf = factories.issue(
        CA_FOR_LIES, not_before=NOW - dt.timedelta(days=60), not_after=NOW - dt.timedelta(days=1)
    )
    return leaf.pem


def garbage(csr: x509.CertificateSigningRequest) -> bytes:
    return b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"


CA_FOR_LIES = make_ca()


@pytest.mark.parametrize(
    ("lie", "code"),
    [
        pytest.param(other_node, "cert-wrong-node", id="another-node"),
        pytest.param(other_key, "key-mismatch", id="another-key"),
        pytest.param(other_ca, "cert-untrusted", id="another-ca"),
        pytest.param(expired, "cert-expired", id="expired"),
        pytest.param(garbage, "cert-invalid", id="garbage"),
    ],
)
def test_lying_signer_is_refused_and_files_untouched(
    make_config: Callable[..., Config],
    lie: Callable[[x509.CertificateSigningRequest], bytes],
    code: str,
) -> None:
    """A signer answer kubelet could not use is refused before any file changes."""
    config = make_config()
    write_pair(config, CA_FOR_LIES)
    os.unlink(config.key_path)
    before = snapshot(config.ssl_dir)
    material, diagnosis = diagnosis_of(config)
    write_identity(config)
    healer = Healer(config, configured_files(config), FakeSigner(CA_FOR_LIES, lie), FakeUnits())
    with pytest.raises(VerificationError, match=code):
        healer.heal(diagnosis, material, "key-missing")
    assert snapshot(config.ssl_dir) == before


def test_rollback_when_kubelet_does_not_come_back(make_config: Callable[..., Config]) -> None:
    """After a routine renewal kubelet fails: the previous healthy pair is restored and restarted."""
    config, ca = make_config(), make_ca()
    write_pair(config, ca)
    before = snapshot(config.ssl_dir)
    material, diagnosis = diagnosis_of(config)
    units = FakeUnits(after_restart="failed")
    outcome = Healer(config, configured_files(config), FakeSigner(ca), units).heal(
        diagnosis, material, "renewal"
    )
    assert outcome.rolled_back is True
    assert snapshot(config.ssl_dir) == before
    assert units.restarts == 2  # the failed one and the one with the old pair


def test_no_rollback_when_old_pair_was_broken(make_config: Callable[..., Config]) -> None:
    """A broken old pair is never put back, even if kubelet fails with the new one."""
    config, ca = make_config(), make_ca()
    write_pair(config, ca)
    write_identity(config)
    os.unlink(config.cert_path)
    material, diagnosis = diagnosis_of(config)
    units = FakeUnits(after_restart="failed")
    outcome = Healer(config, configured_files(config), FakeSigner(ca), units).heal(
        diagnosis, material, "cert-missing"
    )
    assert outcome.rolled_back is False and outcome.restarted is False
    assert Path(config.cert_path).exists()


def test_restart_budget_stops_a_loop(make_config: Callable[..., Config]) -> None:
    """With max_restarts_per_hour = 2, the third heal installs but does not restart kubelet."""
    config, ca = make_config(max_restarts_per_hour=2), make_ca()
    units = FakeUnits()
    outcomes = []
    for _ in range(3):
        write_pair(config, ca)
        write_identity(config)
        os.unlink(config.cert_path)
        material, diagnosis = diagnosis_of(config)
        outcomes.append(
            Healer(config, configured_files(config), FakeSigner(ca), units).heal(
                diagnosis, material, "cert-missing"
            )
        )
    assert [o.restarted for o in outcomes] == [True, True, None]
    assert units.restarts == 2
    assert len(load_restarts(config.daemon.state_dir, time.time())) == 2


def test_restart_false_touches_no_unit(make_config: Callable[..., Config]) -> None:
    """[kubelet] restart = false installs without restarting anything."""
    config, ca = make_config(restart=False), make_ca()
    write_pair(config, ca)
    write_identity(config)
    os.unlink(config.cert_path)
    material, diagnosis = diagnosis_of(config)
    units = FakeUnits()
    outcome = Healer(config, configured_files(config), FakeSigner(ca), units).heal(
        diagnosis, material, "cert-missing"
    )
    assert outcome.restarted is None and units.restarts == 0


def test_missing_ca_is_installed_from_the_signer(make_config: Callable[..., Config]) -> None:
    """ca-missing: the signer's CA is installed together with the new pair."""
    config, ca = make_config(), make_ca()
    write_pair(config, ca)
    os.unlink(config.ca_path)
    material, diagnosis = diagnosis_of(config)
    write_identity(config)
    outcome = Healer(config, configured_files(config), FakeSigner(ca), None).heal(
        diagnosis, material, "ca-missing"
    )
    assert config.ca_path in outcome.installed
    assert Path(config.ca_path).read_bytes() == ca.pem


@pytest.mark.parametrize(
    ("elapsed_days", "due"),
    [pytest.param(20, False, id="before-point"), pytest.param(29, True, id="past-point")],
)
def test_healing_reason_at_the_renewal_point(
    make_config: Callable[..., Config], elapsed_days: int, due: bool
) -> None:
    """A healthy certificate is renewed once it passes renew_fraction plus the node's jitter."""
    config, ca = make_config(), make_ca()
    start = NOW - dt.timedelta(days=elapsed_days)
    write_pair(config, ca, not_before=start, not_after=start + dt.timedelta(days=30))
    _, diagnosis = diagnosis_of(config)
    assert healing_reason(diagnosis, config, NOW) == ("renewal" if due else None)


def test_unreachable_signer_is_tried_three_times() -> None:
    """--check --fix and enroll try an unreachable signer at most three times, then say so."""
    calls, sleeps = [], []

    def action() -> None:
        calls.append(1)
        raise SignerUnreachable("connection refused")

    with pytest.raises(SignerUnreachable, match="gave up after 3 attempts"):
        with_retries(action, sleep=sleeps.append)
    assert len(calls) == 3 and len(sleeps) == 2
    assert sum(sleeps) <= 30


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(SignerMisconfigured("no signer configured"), id="signer-misconfigured"),
        pytest.param(SignerRefused(403, "token-invalid", "spent"), id="token-invalid"),
        pytest.param(SignerRefused(403, "forbidden-node", "node B"), id="forbidden-node"),
        pytest.param(NoIdentity("enroll first"), id="no-identity"),
        pytest.param(ConfigError("kubecertd.toml: signer.url is empty"), id="config-error"),
        pytest.param(VerificationError("not this node's"), id="verification-failed"),
        pytest.param(InstallError("read-only file system"), id="install-failed"),
    ],
)
def test_what_waiting_cannot_change_is_tried_once(error: KubecertdError) -> None:
    """A refusal or a setup error ends the first try: no second try, no sleep."""
    sleeps: list[float] = []
    retries = Retries(sleep=sleeps.append)

    def action() -> None:
        raise error

    with pytest.raises(type(error)):
        retries.run(action)
    assert retries.tries == 1 and sleeps == []


def test_rate_limit_is_tried_again_after_retry_after() -> None:
    """A 429 is worth waiting for: the next try comes after its Retry-After (capped at 10 s)."""
    sleeps: list[float] = []
    retries = Retries(sleep=sleeps.append)
    answers = iter([SignerRefused(429, "rate-limited", "slow down", retry_after=7.0), None])

    def action() -> str:
        error = next(answers)
        if error is not None:
            raise error
        return "issued"

    assert retries.run(action) == "issued"
    assert retries.tries == 2 and sleeps == [7.0]


def test_identity_key_never_leaves_the_node(make_config: Callable[..., Config]) -> None:
    """What goes to the signer is a CSR: no private key material in the request."""
    config, ca = make_config(), make_ca()
    write_pair(config, ca)
    material, diagnosis = diagnosis_of(config)
    seen: list[bytes] = []

    class Recording(FakeSigner):
        def sign(
            self, csr_pem: bytes, reason: str, identity: ClientCert, culprits: str | None = None
        ) -> Issued:
            seen.append(csr_pem)
            return super().sign(csr_pem, reason, identity, culprits)

    Healer(config, configured_files(config), Recording(ca), None).heal(
        diagnosis, material, "renewal"
    )
    assert b"PRIVATE KEY" not in seen[0]
    installed_key = serialization.load_pem_private_key(Path(config.key_path).read_bytes(), None)
    assert pki.same_public_key(
        x509.load_pem_x509_csr(seen[0]).public_key(), installed_key.public_key()
    )
