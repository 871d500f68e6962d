"""``kubecertd run``: the daemon's main loop (SPEC "Watching", "systemd and journald").

One thread, one ``select()`` over the inotify descriptor and a signal wake-up pipe,
with a timeout that is the nearest of: the end of the debounce window, the periodic
recheck, the certificate's renewal point, a signer retry and the watchdog.  Between
those the process sleeps: an idle agent wakes only for the watchdog and its timers.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import random
import select
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import pki, schedule
from .config import Config
from .culprit import STATE_FILE, Book, Culprit
from .diagnose import CheckPolicy, Diagnosis, diagnose
from .edges import journal
from .edges.client import SignerClient
from .edges.install import recover, replace_file
from .edges.sdnotify import notify, watchdog_interval
from .edges.textfile import AgentCounters
from .edges.textfile import write as write_textfile
from .edges.units import UnitManager
from .edges.watch import Watcher
from .errors import (
    InstallError,
    KubecertdError,
    LockHeld,
    NoIdentity,
    SignerError,
    SignerRefused,
    SignerUnreachable,
    VerificationError,
)
from .evidence import observe
from .heal import Healer, healing_reason, identity_due, obtain_identity, renewal_for, utcnow
from .layout import Layout, describe_layout
from .material import Material, read_layout

if TYPE_CHECKING:  # the witness's modules load only when the daemon runs
    from .edges.culprit_proc import Attributor
    from .edges.fanotify import Witness

LOCK_FILE = "kubecertd.lock"


def acquire_lock(state_dir: str) -> int:
    """Hold ``state_dir/kubecertd.lock`` for the life of the process (one agent per node)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LockHeld(f"another kubecertd (PID {holder}) is running: it holds {path}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def fingerprint(material: Material) -> tuple[object, ...]:
    """What the files are, cheaply: bytes and mode, to recognise our own writes.  Whether
    the store's current file is a symlink too: a copy of our file put in its place has
    the same bytes and mode, and is still kubelet's failure (cert-not-symlink)."""
    return tuple(
        (s.path, s.data, s.mode, s.uid, s.missing, s.not_symlink)
        for s in (material.ca, material.cert, material.key)
    )


class Timers:
    """Monotonic deadlines; None means not set."""

    def __init__(self) -> None:
        self.debounce: float | None = None
        self.recheck = 0.0
        self.renewal: float | None = None
        self.retry: float | None = None
        self.watchdog: float | None = None

    def nearest(self) -> float:
        return min(
            t
            for t in (self.debounce, self.recheck, self.renewal, self.retry, self.watchdog)
            if t is not None
        )


class Daemon:
    def __init__(
        self,
        config: Config,
        layout: Layout,
        client: SignerClient,
        units: UnitManager | None,
        clock: Callable[[], dt.datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.layout = layout
        self.client = client
        self.units = units
        self.clock = clock
        self.monotonic = monotonic
        self.random = random
        self.timers = Timers()
        self.counters = AgentCounters()
        self.attempts = 0
        self.own: tuple[object, ...] | None = None
        self.last_codes: tuple[str, ...] | None = None
        self.stopping = False
        self.book = Book()  # recent culprit records (the fanotify witness)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        config = self.config
        lock = acquire_lock(config.daemon.state_dir)
        try:
            done = recover(config.daemon.state_dir, self._directories())
            if done:
                journal.send(
                    "installed", f"start-up: {done}", journal.NOTICE, node=config.node_name
                )
            watcher = Watcher(self.layout.directories())
            witness = self._open_witness()
            wakeup = self._install_signals()
            self.cycle("start")  # sends READY=1 as soon as the first diagnosis is taken
            interval = watchdog_interval()
            while not self.stopping:
                if interval is not None and (
                    self.timers.watchdog is None or self.monotonic() >= self.timers.watchdog
                ):
                    notify("WATCHDOG=1")
                    self.timers.watchdog = self.monotonic() + interval
                timeout = max(0.0, self.timers.nearest() - self.monotonic())
                sources = [watcher.fileno(), wakeup] + ([witness[0].fileno()] if witness else [])
                readable, _, _ = select.select(sources, [], [], timeout)
                if wakeup in readable:
                    os.read(wakeup, 512)  # the signal handlers already set the flags
                if witness and witness[0].fileno() in readable:
                    self._on_witness(*witness)  # before the inotify events it explains
                if watcher.fileno() in readable:
                    self._on_changes(watcher)
                    if witness:
                        witness[0].rearm()  # a folder re-created: mark it again
                self._on_timers()
            notify("STOPPING=1", "STATUS=stopping")
            watcher.close()
            if witness:
                witness[0].close()
            return 0
        finally:
            os.close(lock)

    # -- who did it: the fanotify witness ---------------------------------------------------

    def _open_witness(self) -> tuple[Witness, Attributor] | None:
        """The witness on every folder involved, then CAP_SYS_ADMIN dropped: it is needed
        only to create the group (its marks and PIDs keep working).  Without it, one
        warning, and healing as always."""
        from .edges.culprit_proc import Attributor  # noqa: PLC0415
        from .edges.fanotify import Witness, WitnessUnavailable, drop_sys_admin  # noqa: PLC0415

        try:
            witness: Witness | None = Witness(self.layout.directories())
        except WitnessUnavailable as exc:
            witness = None
            journal.send(
                "witness",
                f"culprit attribution unavailable: {exc.reason}",
                journal.WARNING,
                node=self.config.node_name,
            )
        try:
            drop_sys_admin()
        except OSError as exc:  # not fatal: the unit's bounding set still limits it
            journal.send(
                "witness", f"could not drop CAP_SYS_ADMIN: {exc}", journal.WARNING,
                node=self.config.node_name,
            )  # fmt: skip
        return (witness, Attributor(own_pid=os.getpid())) if witness is not None else None

    def _on_witness(self, witness: Witness, attributor: Attributor) -> None:
        now = self.clock()
        records = attributor.capture(witness.read(), now)
        if not records:
            return
        self.book.add(records)
        for record in records:
            journal.send(
                "culprit", record.describe(now), journal.NOTICE,
                node=self.config.node_name, **record.to_fields(),
            )  # fmt: skip
        state_dir = self.config.daemon.state_dir
        try:
            replace_file(
                os.path.join(state_dir, STATE_FILE), self.book.to_json(os.getpid(), now), 0o600
            )
        except OSError as exc:
            journal.send(
                "witness", f"cannot write {state_dir}/{STATE_FILE}: {exc.strerror}", journal.WARNING
            )

    def explain(self, path: str) -> Culprit | None:
        """The recent record that explains a finding on ``path``: the witness's, else, with
        ``[daemon] audit_log`` set, the newest audit record about that file."""
        now = self.clock()
        found = self.book.explaining(path, now)
        audit_log = self.config.daemon.audit_log
        if audit_log and (found is None or found.op == "lost"):
            from .audit_records import explaining  # noqa: PLC0415 - only when configured
            from .culprit import EXPLAINS_FOR  # noqa: PLC0415
            from .edges.audit_log import recent_records  # noqa: PLC0415

            records = recent_records(audit_log, now - dt.timedelta(seconds=EXPLAINS_FOR))
            found = explaining(records, path, now, own_pid=os.getpid()) or found
        return found

    def _install_signals(self) -> int:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end)

        def stop(_signum: int, _frame: object) -> None:
            self.stopping = True

        def recheck(_signum: int, _frame: object) -> None:
            self.timers.recheck = 0.0

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, recheck)  # `systemctl reload`-style: diagnose now
        return read_end

    def _directories(self) -> list[str]:
        return self.layout.directories()

    def _on_changes(self, watcher: Watcher) -> None:
        changes = watcher.read()
        if changes.overflow:
            self.timers.debounce = self.monotonic()  # the queue overflowed: look at everything now
        elif changes.relevant:
            self.timers.debounce = self.monotonic() + self.config.daemon.debounce

    def _on_timers(self) -> None:
        now = self.monotonic()
        if self.timers.debounce is not None and now >= self.timers.debounce:
            self.timers.debounce = None
            self.cycle("change")
        elif now >= self.timers.recheck:
            self.cycle("recheck")
        elif self.timers.renewal is not None and now >= self.timers.renewal:
            self.cycle("renewal point")
        elif self.timers.retry is not None and now >= self.timers.retry:
            self.cycle("retry")

    # -- one cycle: diagnose, heal if needed, report ----------------------------------------

    def diagnose_now(self) -> tuple[Material, Diagnosis]:
        config = self.config
        material = read_layout(self.layout)
        policy = CheckPolicy.from_config(config, os.geteuid())
        diagnosis = diagnose(material, config.node_name, self.clock(), policy)
        return material, observe(diagnosis, self.layout)

    def cycle(self, why: str) -> Diagnosis:
        material, diagnosis = self.diagnose_now()
        self.timers.recheck = self.monotonic() + self.config.daemon.recheck
        if why == "change" and fingerprint(material) == self.own:
            return diagnosis  # our own install, already judged
        self._log_check(diagnosis, why)
        if why == "start":
            notify("READY=1")  # after the first diagnosis, before any healing (SPEC)
        reason = healing_reason(diagnosis, self.config, self.clock(), self.layout.rotation)
        waiting = self.timers.retry is not None and self.monotonic() < self.timers.retry
        if reason and not waiting:
            diagnosis = self._heal(diagnosis, material, reason)
        elif not reason:
            self.timers.retry, self.attempts = None, 0
        self._renew_identity()
        self._report(diagnosis)
        return diagnosis

    def _heal(self, diagnosis: Diagnosis, material: Material, reason: str) -> Diagnosis:
        notify(f"STATUS=renewing: {reason}")
        healer = Healer(
            self.config,
            self.layout,
            self.client,
            self.units,
            self.clock,
            tick=self._tick,
            explain=self.explain,
        )
        try:
            outcome = healer.heal(diagnosis, material, reason)
        except (SignerError, VerificationError, InstallError) as exc:
            return self._failed(diagnosis, reason, exc)
        self.book.rewrote(outcome.installed, self.clock())  # earlier records explain them no more
        if outcome.restarted is not None:
            self.counters.kubelet_restarts += 1 + int(outcome.rolled_back)
        material, diagnosis = self.diagnose_now()
        # The files as healed are the previous diagnosis now: the same fault again logs its
        # findings (and who caused them) again, although this diagnosis is not logged.
        self.last_codes = tuple(diagnosis.codes)
        if _is_as_written(material, outcome.written):
            self.own = fingerprint(material)  # the events of our own renames change nothing
        else:  # someone changed the files while we installed or waited for kubelet
            self.own = None
            self.timers.debounce = self.monotonic() + self.config.daemon.debounce
        if outcome.rolled_back:  # the old pair is back: try the renewal again later, not now
            self.counters.renewals["failure"] += 1
            self.attempts += 1
            self.timers.retry = self.monotonic() + schedule.backoff(self.attempts, self.random)
            notify(
                f"STATUS=rolled back to the previous certificate, retrying in {self.timers.retry - self.monotonic():.0f}s"
            )
            return diagnosis
        self.counters.renewals["success"] += 1
        self.timers.retry, self.attempts = None, 0
        return diagnosis

    def _failed(self, diagnosis: Diagnosis, reason: str, exc: KubecertdError) -> Diagnosis:
        self.counters.renewals["failure"] += 1
        delay = schedule.delay_after(self.attempts, self.random, exc)
        self.attempts += 1
        self.timers.retry = self.monotonic() + delay
        node = self.config.node_name
        if isinstance(exc, SignerError):
            journal.send(
                "signer-error",
                f"{exc}; files left as they were, retrying in {delay:.0f}s",
                journal.WARNING, node=node, finding=reason, retry_in=f"{delay:.0f}s", attempt=self.attempts,
            )  # fmt: skip
            notify(f"STATUS={_status_of(exc)}, retrying in {delay:.0f}s")
        else:
            journal.send(
                "renew-failed",
                f"{renewal_for(reason)} failed: {exc}; retrying in {delay:.0f}s",
                journal.ERR, node=node, finding=reason, retry_in=f"{delay:.0f}s",
            )  # fmt: skip
            notify(f"STATUS=renewal failed ({reason}), retrying in {delay:.0f}s")
        return diagnosis

    def _renew_identity(self) -> None:
        if not self.config.signer.url or not identity_due(self.config, self.clock()):
            return
        try:
            obtain_identity(self.config, self.client, None, self.clock())
        except KubecertdError as exc:
            journal.send(
                "signer-error",
                f"renewing the node identity failed: {exc}",
                journal.WARNING,
                node=self.config.node_name,
            )

    def _tick(self) -> None:
        notify("WATCHDOG=1")

    def _log_check(self, diagnosis: Diagnosis, why: str) -> None:
        node = self.config.node_name
        verdict = "healthy" if diagnosis.healthy else "unhealthy"
        codes = tuple(diagnosis.codes)
        journal.send(
            "check",
            f"check ({why}): {verdict}" + (f": {', '.join(codes)}" if codes else ""),
            journal.INFO if diagnosis.healthy else journal.WARNING,
            node=node, **_cert_fields(diagnosis),
        )  # fmt: skip
        if codes != self.last_codes:  # each finding once when it appears, not every recheck
            for item in diagnosis.findings:
                culprit = self.explain(item.path) if item.severity == "error" else None
                who = f"; {culprit.describe(self.clock())}" if culprit else ""
                journal.send(
                    "finding",
                    f"{item.code}: {item.message}{who} (hint: {item.hint})",
                    journal.ERR if item.severity == "error" else journal.WARNING,
                    node=node, finding=item.code, path=item.path,
                    kubelet_line=item.kubelet_line, **(culprit.to_fields() if culprit else {}),
                )  # fmt: skip
        self.last_codes = codes

    def _report(self, diagnosis: Diagnosis) -> None:
        cert = diagnosis.cert
        self.timers.renewal = None
        if cert is not None and diagnosis.healthy:
            due = schedule.renewal_point(
                cert, self.config.policy.renew_fraction, self.config.node_name
            )
            seconds = (due - self.clock()).total_seconds()
            # A renewal point already passed is the retry timer's business, not a busy loop.
            self.timers.renewal = (
                self.monotonic() + seconds if 0 < seconds < 10 * 365 * 86400 else None
            )
            if self.timers.retry is None:
                notify(f"STATUS=healthy, cert valid until {pki.iso(cert.not_valid_after_utc)}")
        if self.config.metrics.textfile:
            try:
                write_textfile(self.config.metrics.textfile, diagnosis, self.counters, time.time())
            except OSError as exc:
                journal.send(
                    "check",
                    f"cannot write {self.config.metrics.textfile}: {exc.strerror}",
                    journal.WARNING,
                )


def _status_of(exc: SignerError) -> str:
    """The STATUS= words for a signer problem."""
    if isinstance(exc, SignerUnreachable):
        return "signer unreachable"
    if isinstance(exc, SignerRefused):
        return f"signer refused ({exc.code})"
    if isinstance(exc, NoIdentity):
        return "no usable node identity (kubecertd enroll --token ...)"
    return f"cannot reach the signer as configured ({exc.code})"


def _is_as_written(material: Material, written: tuple[tuple[str, bytes | None], ...]) -> bool:
    on_disk = {s.path: s.data for s in (material.ca, material.cert, material.key)}
    return all(on_disk.get(path) == data for path, data in written)


def _cert_fields(diagnosis: Diagnosis) -> dict[str, str]:
    cert = diagnosis.cert
    if cert is None:
        return {}
    return {"serial": pki.serial_hex(cert), "not_after": pki.iso(cert.not_valid_after_utc)}


def run_daemon(config: Config) -> int:
    from .edges.client import HttpSignerClient  # noqa: PLC0415
    from .edges.units import DbusUnitManager  # noqa: PLC0415
    from .locate import locate  # noqa: PLC0415

    config, layout = locate(config)
    journal.send(
        "check",
        f"credentials: layout {layout.name} ({layout.shape}), {describe_layout(layout)}; found from {'; '.join(layout.found_from)}",
        node=config.node_name,
    )
    client = HttpSignerClient(
        config.signer.url, config.signer.ca, config.signer.timeout, node=config.node_name
    )
    units = DbusUnitManager() if config.kubelet.restart != "false" else None
    return Daemon(config, layout, client, units).run()
