"""Healing a node: SPEC "Healing" steps 1-6, and enrollment.

The edges come in as arguments (a ``SignerClient``, a ``UnitManager``), so the
daemon, ``--check --fix`` and the tests drive the same code.  The signer's answer is
judged by ``diagnose()`` itself, the same rules kubelet is judged by, before a
single byte is written.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import pki, schedule
from .config import Config
from .culprit import Culprit, claim
from .diagnose import ERROR, CheckPolicy, Diagnosis, diagnose
from .edges import journal
from .edges.client import ClientCert, SignerClient
from .edges.install import Target, install, prune_store, replace_file
from .edges.units import UnitManager
from .errors import InstallError, NoIdentity, UnitError, VerificationError
from .kubelet import Restart, failure_after, parse_version, restart_decision
from .layout import Credentials, Layout, plan_install
from .material import FileState, Material, read_file, read_kubeconfig_text, read_layout

Clock = Callable[[], dt.datetime]
CA_CODES = frozenset({"ca-missing", "ca-unreadable", "ca-invalid", "ca-not-ca", "ca-expired"})
RESTARTS_FILE = "kubelet-restarts.json"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# Errors a new certificate cannot fix: kubecertd requests nothing for them.
NOT_HEALED_BY_A_CERTIFICATE = frozenset({"kubeconfig-invalid", "clock-unsynced"})


def healing_reason(
    diagnosis: Diagnosis, config: Config, now: dt.datetime, rotation: bool = False
) -> str | None:
    """Why the pair must be replaced now (the first error's code, or "renewal"), or None.

    Nothing while the clock is not synchronized (the certificate's dates may be fine).
    Where kubelet rotates the certificate itself, only what it cannot recover from by
    itself: every error finding is such a state (expired, another node's, untrusted,
    missing or corrupt, not a symlink); the renewal schedule is kubelet's.
    """
    codes = [f.code for f in diagnosis.findings if f.severity == ERROR]
    if "clock-unsynced" in codes:
        return None
    errors = [code for code in codes if code not in NOT_HEALED_BY_A_CERTIFICATE]
    if errors:
        return errors[0]
    if diagnosis.cert is not None and not rotation and not codes:
        due = schedule.renewal_point(diagnosis.cert, config.policy.renew_fraction, config.node_name)
        if now >= due:
            return "renewal"
    return None


def renewal_for(reason: str) -> str:
    """A heal named in a message: "renewal" (routine) or "renewal for CODE"."""
    return "renewal" if reason == "renewal" else f"renewal for {reason}"


class Outcome(NamedTuple):
    """What one healing did."""

    serial: str
    not_after: dt.datetime
    installed: tuple[str, ...]
    restarted: bool | None  # None: no restart was asked for or allowed
    rolled_back: bool = False
    written: tuple[tuple[str, bytes | None], ...] = ()  # the credentials as read after our install


class Healer:
    def __init__(
        self,
        config: Config,
        layout: Layout,
        client: SignerClient,
        units: UnitManager | None,  # None: install without restarting anything
        clock: Clock = utcnow,
        tick: Callable[[], None] = lambda: None,  # called while waiting (watchdog pings)
        explain: Callable[[str], Culprit | None] = lambda _path: None,  # who changed a file
    ) -> None:
        self.config = config
        self.layout = layout
        self.client = client
        self.units = units
        self.clock = clock
        self.tick = tick
        self.explain = explain
        self.restarted_at = 0.0  # when the last restart job finished (time.time())

    def heal(self, diagnosis: Diagnosis, material: Material, reason: str) -> Outcome:
        config, node = self.config, self.config.node_name
        finding = next((f for f in diagnosis.findings if f.code == reason), None)
        said = finding.kubelet_line if finding else None
        culprit = self.explain(finding.path) if finding else None
        journal.send(
            "renew-start",
            f"renewing the kubelet certificate of {node}: {reason}"
            + (f"; {culprit.describe(self.clock())}" if culprit else "")
            + (f"; kubelet says: {said}" if said else ""),
            journal.NOTICE, node=node, finding=reason, kubelet_line=said,
            **(culprit.to_fields() if culprit else {}),
        )  # fmt: skip
        identity = self._identity(diagnosis)
        with self.client.conversation():  # one TLS connection for both calls
            ca_pem = self.client.fetch_ca(
                identity
            )  # step 1: the signer authenticated by [signer] ca
            # The CA is installed only where kubecertd keeps it (not k3s's own CA files).
            ca_changed = self.layout.ca_writable and _needs_ca(diagnosis, material, ca_pem)
            # step 2: the key never leaves the node; where kubelet rotates, kubelet's own
            # template (ECDSA P-256), so that kubelet does not rotate it away at once
            key_type = "ecdsa-p256" if self.layout.rotation else config.policy.key_type
            key = pki.generate_key(key_type)
            csr = pki.csr_pem(pki.build_csr(key, pki.kubelet_subject(node)))
            # step 3; the node's own account of who changed its files, for the audit
            said_by = claim([culprit.summary()]) if culprit else None
            issued = self.client.sign(csr, reason, identity, culprits=said_by)
        cert_pem = issued.certificate
        cert = self._verify(ca_pem, cert_pem, key)  # step 4: nothing written before this passes
        new = Credentials(ca_pem if ca_changed else None, cert_pem, pki.private_key_pem(key))
        targets = self._install(new)  # step 5, in the layout's own shape
        serial, not_after = pki.serial_hex(cert), cert.not_valid_after_utc
        journal.send(
            "installed",
            f"installed {', '.join(t.path for t in targets)} (certificate {serial}, valid until {pki.iso(not_after)})",
            node=node, serial=serial, not_after=pki.iso(not_after),
        )  # fmt: skip
        journal.send(
            "renewed",
            f"kubelet certificate of {node} renewed ({reason}): serial {serial}, valid until {pki.iso(not_after)}",
            journal.NOTICE, node=node, serial=serial, not_after=pki.iso(not_after), finding=reason,
        )  # fmt: skip
        written = self._as_read()
        outcome = Outcome(serial, not_after, tuple(t.path for t in targets), None, written=written)
        if self.units is None or config.kubelet.restart == "false":
            return outcome
        decision = self.restart_decision(self.units, ca_changed)
        since = time.time()  # kubelet's lines from here on speak about the new pair
        if decision.needed:
            came_back = self.restart_kubelet(self.units, decision.why)  # step 6
        else:
            came_back = self._took_it_without_restart(self.units, decision.why)
        if came_back:  # active; and kubelet's own words since agree?
            came_back = self._no_failure_since(since)
        if came_back is False and diagnosis.healthy:
            restored = self._rollback(self.units, material, serial)
            return Outcome(
                serial, not_after, outcome.installed, False, rolled_back=True, written=restored
            )
        return Outcome(serial, not_after, outcome.installed, came_back, written=written)

    # -- steps ------------------------------------------------------------------------

    def _identity(self, diagnosis: Diagnosis) -> ClientCert:
        """The node identity; failing that, the current kubelet pair if fully healthy."""
        signer = self.config.signer
        if usable_identity(
            signer.identity_cert, signer.identity_key, self.config.node_name, self.clock()
        ):
            return signer.identity_cert, signer.identity_key
        if diagnosis.healthy and not (self.layout.cert.embedded or self.layout.key.embedded):
            return self.layout.cert.path, self.layout.key.path
        raise NoIdentity(
            f"no usable node identity at {signer.identity_cert} and the kubelet certificate is not healthy; "
            "enroll this node first: kubecertd enroll --token TOKEN"
        )

    def _verify(self, ca_pem: bytes, cert_pem: bytes, key: PrivateKeyTypes) -> x509.Certificate:
        """The new pair as kubelet would see it: any error finding and the answer is refused."""
        key_pem = pki.private_key_pem(key)
        material = Material(
            FileState("(signer's CA)", data=ca_pem),
            FileState("(signer's certificate)", data=cert_pem),
            FileState("(new key)", data=key_pem, mode=0o600, uid=0),
        )
        verdict = diagnose(
            material, self.config.node_name, self.clock(), CheckPolicy(key_owners=frozenset({0}))
        )
        errors = [f for f in verdict.findings if f.severity == ERROR]
        if errors or verdict.cert is None:
            reasons = "; ".join(f"{f.code}: {f.message}" for f in errors) or "no certificate"
            journal.send(
                "renew-failed",
                f"refused the signer's answer, files left as they were: {reasons}",
                journal.ERR, node=self.config.node_name, finding=errors[0].code if errors else None,
            )  # fmt: skip
            raise VerificationError(f"the signer's certificate was refused: {reasons}")
        return verdict.cert

    def _as_read(self) -> tuple[tuple[str, bytes | None], ...]:
        """The credentials as the next diagnosis reads them, to recognise our own writes."""
        material = read_layout(self.layout)
        return tuple((s.path, s.data) for s in (material.ca, material.cert, material.key))

    def _install(self, new: Credentials) -> list[Target]:
        """Put ``new`` in place as one crash-safe install; the files written."""
        config, layout, now = self.config, self.layout, self.clock()
        text = None
        if layout.kubeconfig and any(p.embedded for p in (layout.ca, layout.cert, layout.key)):
            text = read_kubeconfig_text(layout.kubeconfig)
        try:
            targets = plan_install(layout, new, now, text)
        except ValueError as exc:  # KubeconfigError: the kubeconfig cannot be rewritten
            raise InstallError(f"nothing written: {exc}") from exc
        backups = layout.backup_root()
        install(targets, config.daemon.state_dir, backups, config.daemon.backups, now)
        if layout.store is not None:
            prune_store(layout.store, config.daemon.backups)
        return targets

    def restart_decision(self, units: UnitManager, ca_changed: bool) -> Restart:
        """``[kubelet] restart`` applied to this layout, kubelet's version and state."""
        kubelet = self.config.kubelet
        return restart_decision(
            kubelet.restart,
            self.layout.shape,
            self.layout.rotation,
            kubelet_version(kubelet.version, self.layout.binary),
            ca_changed,
            self._state(units) == "active",
        )

    def _took_it_without_restart(self, units: UnitManager, why: str) -> bool:
        """No restart needed: kubelet is still active after ``settle``."""
        kubelet, node = self.config.kubelet, self.config.node_name
        pid = units.main_pid(kubelet.unit)
        came_back = self._settled(units, pid)
        state = self._state(units)
        journal.send(
            "kubelet-restarted",
            f"not restarting {kubelet.unit}: {why}; after {kubelet.settle:g}s it is {state}",
            journal.INFO if came_back else journal.ERR,
            node=node, unit=kubelet.unit, result="not-needed", pid=pid, active_state=state,
        )  # fmt: skip
        return came_back

    def _no_failure_since(self, since: float) -> bool:
        """kubelet logged none of its credential failures since the install (its journal)."""
        from .edges.kubelet_log import recent_lines  # noqa: PLC0415

        line = failure_after(recent_lines(self.layout.unit, max(since, self.restarted_at)))
        if line is None:
            return True
        journal.send(
            "renew-failed",
            f"kubelet still fails with the new certificate: {line.line}",
            journal.ERR, node=self.config.node_name, unit=self.layout.unit,
            kubelet_line=line.line,
        )  # fmt: skip
        return False

    def restart_kubelet(self, units: UnitManager, why: str = "") -> bool | None:
        """Restart kubelet within the hourly budget; True if it stayed up for ``settle``."""
        kubelet, node = self.config.kubelet, self.config.node_name
        now = time.time()
        history = load_restarts(self.config.daemon.state_dir, now)
        if schedule.restarts_left(history, now, kubelet.max_restarts_per_hour) == 0:
            journal.send(
                "kubelet-restarted",
                f"not restarting {kubelet.unit}: {kubelet.max_restarts_per_hour} restarts in the last hour already "
                "([kubelet] max_restarts_per_hour); the new files are in place",
                journal.WARNING, node=node, unit=kubelet.unit, result="budget-exhausted",
            )  # fmt: skip
            return None
        save_restarts(self.config.daemon.state_dir, [*history, now])
        try:
            result = units.restart(kubelet.unit, timeout=max(30.0, kubelet.settle))
            # From here on only the new kubelet speaks: what the old one logged while
            # it was being stopped is not about the new pair.
            self.restarted_at = time.time()
            pid = units.main_pid(kubelet.unit)
        except UnitError as exc:
            journal.send(
                "kubelet-restarted",
                f"restarting {kubelet.unit} failed: {exc}",
                journal.ERR,
                node=node,
                unit=kubelet.unit,
                result="error",
            )
            return False
        came_back = result == "done" and self._settled(units, pid)
        state = self._state(units)
        journal.send(
            "kubelet-restarted",
            f"restarted {kubelet.unit} (job {result}, PID {pid}{'; ' + why if why else ''}); after {kubelet.settle:g}s it is {state}",
            journal.INFO if came_back else journal.ERR,
            node=node, unit=kubelet.unit, result=result, pid=pid, active_state=state,
        )  # fmt: skip
        return came_back

    def _settled(self, units: UnitManager, pid: int) -> bool:
        """Still active, with the same main PID, ``settle`` seconds after the restart."""
        deadline = time.monotonic() + self.config.kubelet.settle
        while True:
            self.tick()
            state = self._state(units)
            if state == "failed":
                return False
            if time.monotonic() >= deadline:
                return state == "active" and units.main_pid(self.config.kubelet.unit) == pid
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def _state(self, units: UnitManager) -> str:
        try:
            return units.active_state(self.config.kubelet.unit)
        except UnitError:
            return "unknown"

    def _rollback(
        self, units: UnitManager, material: Material, serial: str
    ) -> tuple[tuple[str, bytes | None], ...]:
        """Put the previous (healthy) pair back and restart kubelet once more."""
        node = self.config.node_name
        old = Credentials(material.ca.data, material.cert.data or b"", material.key.data or b"")
        self._install(old)
        journal.send(
            "rollback",
            f"kubelet did not come back with certificate {serial}; the previous pair is back in place",
            journal.ERR, node=node, serial=serial,
        )  # fmt: skip
        self.restart_kubelet(units)
        return self._as_read()


def _needs_ca(diagnosis: Diagnosis, material: Material, signer_ca: bytes) -> bool:
    """Install the signer's CA when ours is unusable or differs from it."""
    if any(f.code in CA_CODES for f in diagnosis.findings):
        return True
    try:  # certificates compare (and hash) by their DER encoding
        ours = set(pki.load_certificates(material.ca.data or b""))
        theirs = set(pki.load_certificates(signer_ca))
    except ValueError:
        return True
    return ours != theirs


def usable_identity(cert_path: str, key_path: str, node: str, now: dt.datetime) -> bool:
    """An identity certificate that exists, is valid now, is for this node and matches its key."""
    cert_state, key_state = read_file(cert_path), read_file(key_path)
    if cert_state.data is None or key_state.data is None:
        return False
    try:
        cert = pki.load_certificates(cert_state.data)[0]
        key = pki.load_private_key(key_state.data)
    except ValueError:
        return False
    return (
        cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
        and pki.common_names(cert.subject) == [node]
        and pki.same_public_key(cert.public_key(), key.public_key())
    )


# -- the restart budget, kept in state_dir so that a restarting agent cannot evade it ------


def load_restarts(state_dir: str, now: float) -> list[float]:
    try:
        with open(os.path.join(state_dir, RESTARTS_FILE), encoding="utf-8") as stream:
            history = [float(x) for x in json.load(stream)]
    except (OSError, ValueError, TypeError):
        return []
    return schedule.prune_history(history, now)


def save_restarts(state_dir: str, history: list[float]) -> None:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    try:
        replace_file(os.path.join(state_dir, RESTARTS_FILE), json.dumps(history).encode(), 0o600)
    except OSError as exc:
        raise InstallError(
            f"{state_dir}: cannot record the kubelet restart: {exc.strerror}"
        ) from exc


# -- identity: enrollment and renewal ------------------------------------------------------


def obtain_identity(
    config: Config, client: SignerClient, token: str | None, now: dt.datetime
) -> x509.Certificate:
    """Enroll with ``token``, or renew with the current identity; install the new pair."""
    signer, node = config.signer, config.node_name
    key = pki.generate_key("ecdsa-p256")
    csr = pki.csr_pem(pki.build_csr(key, pki.identity_subject(node)))
    if token is not None:
        issued = client.enroll(token, csr)
    else:
        issued = client.renew_identity(csr, (signer.identity_cert, signer.identity_key))
    try:
        cert = pki.load_certificates(issued.certificate)[0]
        anchors = pki.load_certificates(read_file(signer.ca).data or b"")
    except ValueError as exc:
        raise VerificationError(
            f"cannot check the identity certificate against {signer.ca}: {exc}"
        ) from exc
    problems = []
    if not any(pki.issued_by(cert, ca) for ca in anchors):
        problems.append(f"not issued by the identity CA in {signer.ca}")
    if pki.common_names(cert.subject) != [node]:
        problems.append(f"subject is {cert.subject.rfc4514_string()}, not CN={node}")
    if not pki.same_public_key(cert.public_key(), key.public_key()):
        problems.append("not for the key this node made")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        problems.append("not valid now")
    if problems:
        raise VerificationError(
            f"the signer's identity certificate was refused: {'; '.join(problems)}"
        )
    targets = [
        Target(signer.identity_cert, pki.certificate_pem(cert), 0o644),
        Target(signer.identity_key, pki.private_key_pem(key), 0o600),
    ]
    for directory in {os.path.dirname(t.path) for t in targets}:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    install(targets, config.daemon.state_dir, None, 0, now)
    journal.send(
        "enrolled",
        f"node identity of {node} {'enrolled' if token else 'renewed'}: serial {pki.serial_hex(cert)}, valid until {pki.iso(cert.not_valid_after_utc)}",
        journal.NOTICE, node=node, serial=pki.serial_hex(cert), not_after=pki.iso(cert.not_valid_after_utc),
    )  # fmt: skip
    return cert


def identity_due(config: Config, now: dt.datetime) -> bool:
    """The identity certificate has passed renew_fraction (+ jitter) of its lifetime."""
    state = read_file(config.signer.identity_cert)
    try:
        cert = pki.load_certificates(state.data or b"")[0]
    except ValueError:
        return False
    return now >= schedule.renewal_point(cert, config.policy.renew_fraction, config.node_name)


# -- kubelet's version ---------------------------------------------------------------------

_VERSIONS: dict[str, tuple[int, int, int] | None] = {}  # binary -> its --version, asked once


def kubelet_version(setting: str, binary: str | None) -> tuple[int, int, int] | None:
    """``[kubelet] version``, else what ``BINARY --version`` says (kubelet, or the k3s or
    RKE2 agent that runs it), else None (unknown: a restart is the safe side)."""
    if setting:
        return parse_version(setting)
    # Only a program that is kubelet (or runs it: k3s, RKE2) is asked: another one (a
    # wrapper script, an interpreter) would answer with its own version.
    if not binary or not os.path.basename(binary).startswith(("kubelet", "k3s", "rke2")):
        return None
    if binary not in _VERSIONS:
        import subprocess  # noqa: PLC0415 - only when a heal decides on a restart

        try:
            answer = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            answer = ""
        _VERSIONS[binary] = parse_version(answer)
    return _VERSIONS[binary]
