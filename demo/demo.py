"""make demo: the seed story, end to end, on a throwaway node with a real systemd.

One machine plays a worker, server2277z.prod.jp.local: systemd as PID 1 in its own
namespaces with journald and the system bus, a kubelet and an API server that behave
like the real ones where it matters, a real kubecertd-signer that adopted a freshly made
cluster CA, and the shipped kubecertd.service enrolled with a one-time token.  Then it
breaks the node three ways and shows kubecertd healing it.  A second throwaway node is a
kubeadm worker (kubelet.conf, kubelet's certificate store, kubeadm's drop-in) that was
powered off past its certificate's end: kubecertd finds that layout by itself and heals
it in kubelet's own shape.

Every step checks what it narrates and the demo exits 1 if anything did not happen.
Without root or namespaces it tells the same story without systemd
(``kubecertd --check --fix --no-restart``, the kubeadm node as a folder tree).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))

from healing_node import (  # noqa: E402
    AGENT,
    KUBELET,
    STORE,
    STORE_CURRENT,
    HealingNode,
    Kubeadm,
    node_of,
    serial_of,
)
from node_harness import Node, unavailable_reason  # noqa: E402

NODE = "server2277z.prod.jp.local"
OTHER = "server2267z.prod.jp.local"
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


class DemoFailed(Exception):
    """A step did not happen as narrated."""


def say(text: str) -> None:
    print(f"\n{BOLD}{text}{RESET}", flush=True)


def note(text: str) -> None:
    print(f"  {text}", flush=True)


def show(command: str, output: str, keep: Callable[[str], bool] = lambda _line: True) -> None:
    print(f"{DIM}  $ {command}{RESET}")
    for line in output.rstrip("\n").splitlines():
        if keep(line):
            print(f"    {line}")
    sys.stdout.flush()


def expect(condition: object, what: str) -> None:
    if not condition:
        raise DemoFailed(what)


# -- the story on a real systemd node ----------------------------------------------------------


class Story:
    def __init__(self, healing: HealingNode) -> None:
        self.healing = healing
        self.node = healing.node

    def settle(self) -> None:
        """Wait until the agent is idle again (its STATUS says healthy)."""
        self.node.wait_for(
            lambda: self.node.unit_property(AGENT, "StatusText").startswith("healthy"), timeout=30
        )

    def check(self, full: bool = False) -> str:
        result = self.healing.cli("kubecertd", "--check", check=False)
        keep = (lambda _line: True) if full else _verdict_lines
        show("kubecertd --check", result.stdout, keep)
        return result.stdout

    def status_line(self) -> None:
        status = self.node.run(
            ["systemctl", "status", AGENT, "--no-pager", "--lines=0"], check=False
        ).stdout
        show("systemctl status kubecertd | grep Status", status, lambda line: "Status:" in line)

    def journal_since(self, started: float, explain: bool = False) -> None:
        # Whole seconds: this scene's events come after the debounce, well past `started`.
        argv = ["journalctl", "-u", AGENT, "--since", f"@{math.ceil(started)}", "--no-pager"]
        argv += ["-x", "-o", "with-unit"] if explain else ["-o", "cat"]
        text = self.node.run(argv, check=False).stdout
        show(f"journalctl -u kubecertd{' -x' if explain else ''} --since ...", _story(text))

    def who_did_it(self, after: int, file: str) -> None:
        """The witness's record of who changed ``file`` (kubecertd's `culprit` event)."""

        def record() -> dict[str, Any] | None:
            found = [
                e
                for e in self.healing.events("culprit")[after:]
                if str(e.get("KUBECERTD_CULPRIT_FILE", "")).endswith(file)
            ]
            return found[-1] if found else None

        event = self.node.wait_for(record, timeout=15, what=f"a culprit record for {file}")
        show("journalctl -u kubecertd KUBECERTD_EVENT=culprit | tail -1", str(event["MESSAGE"]))

    def kubelet_says(self, since: float, needle: str, timeout: float = 15) -> str:
        def failed() -> str | None:
            for entry in self.node.journal(KUBELET):
                message = str(entry.get("MESSAGE", ""))
                if needle in message and float(entry["__REALTIME_TIMESTAMP"]) / 1e6 >= since:
                    return message
            return None

        return self.node.wait_for(failed, timeout=timeout, what=f"kubelet logging {needle!r}")

    # -- scenes -------------------------------------------------------------------------------

    def vanish(self) -> None:
        say("1. The certificates vanish")
        note("Someone cleans up /etc/kubernetes/ssl a little too well: worker.pem and")
        note("worker-key.pem are gone.  kubelet can no longer talk to the API server.")
        started, renewed = time.time(), len(self.healing.events("renewed"))
        restarts = len(self.healing.events("kubelet-restarted"))
        pid = self.healing.kubelet_pid()
        culprits = len(self.healing.events("culprit"))
        # A cleanup job of the node: its rm stays unreaped until the job ends, so the
        # witness can read who it was (a process reaped at once may leave only its PID).
        self.node.run(
            ["systemd-run", "--unit=cleanup.service", "sh", "-c",
             "rm /etc/kubernetes/ssl/worker.pem /etc/kubernetes/ssl/worker-key.pem & exec sleep 30"],
            check=True,
        )  # fmt: skip
        before = self.check()
        expect(
            "cert-missing" in before and "key-missing" in before,
            "--check did not report the missing files",
        )
        message = self.kubelet_says(started, "command failed")
        show("journalctl -u kubelet | tail -1", message)
        note("kubecertd's witness (fanotify) saw who did it:")
        self.who_did_it(culprits, "worker.pem")
        note("kubecertd saw the files go (inotify), waited for the directory to settle,")
        note("made a new key on the node, had the signer sign a CSR for this node only,")
        note("checked the answer, installed the pair atomically and restarted kubelet:")
        event = self.healing.wait_event("renewed", after=renewed, timeout=30)
        new_pid = self.healing.wait_registered(other_than=pid, timeout=30)
        self.healing.wait_event("kubelet-restarted", after=restarts, timeout=30)
        self.journal_since(started)
        after = self.check()
        expect("HEALTHY" in after, "the node is not healthy after the heal")
        note(
            f"kubelet (PID {new_pid}) registered node {NODE} with certificate {event['KUBECERTD_SERIAL'][:12]}..."
        )

    def seed(self) -> None:
        say("2. Another node's certificate is copied in (the case from the field)")
        note(f"A well-meant copy of worker.pem/worker-key.pem from {OTHER}.")
        note("kubelet now authenticates as the other node and the API server says no:")
        started, renewed = time.time(), len(self.healing.events("renewed"))
        pid = self.healing.kubelet_pid()
        culprits = len(self.healing.events("culprit"))
        other = self.healing.cluster.kubelet_pair(OTHER)
        self.node.write_file("/root/from-other/worker.pem", other.pem)
        self.node.write_file("/root/from-other/worker-key.pem", other.key_pem)
        # An operator logged in as uid 1000 (the login uid survives sudo) copies them in.
        self.node.run(
            ["systemd-run", "--scope", "--unit=ops-copy.scope", "sh", "-c",
             "echo 1000 > /proc/self/loginuid && exec cp /root/from-other/worker.pem"
             " /root/from-other/worker-key.pem /etc/kubernetes/ssl/"],
            check=True,
        )  # fmt: skip
        before = self.check(full=True)
        expect(
            f"belongs to node {OTHER}, this node is {NODE}" in before,
            "--check did not name both nodes",
        )
        message = self.kubelet_says(started, "is not allowed to modify node")
        show("journalctl -u kubelet | grep forbidden", message)
        note("Who copied them in, as kubecertd's witness recorded it:")
        self.who_did_it(culprits, "worker.pem")
        expect(  # klog quotes the err= value of kubelet's line
            f'node \\"{OTHER}\\" is not allowed to modify node \\"{NODE}\\"' in message,
            "kubelet did not hit the Node authorizer",
        )
        self.healing.wait_event("renewed", after=renewed, timeout=30)
        self.healing.wait_registered(other_than=pid, timeout=30)
        note("kubecertd explains each step in the journal (with its message catalog):")
        self.journal_since(started, explain=True)
        cert = (self.node.ssl_dir / "worker.pem").read_bytes()
        expect(node_of(cert) == NODE, "the installed certificate is not for this node")
        expect("HEALTHY" in self.check(), "the node is not healthy after the heal")
        self.settle()

    def expiring(self) -> None:
        say("3. A certificate near its end is renewed ahead of time")
        note("A pair with 90% of its lifetime behind it: still valid, kubelet is happy.")
        started, renewed = time.time(), len(self.healing.events("renewed"))
        restarts = len(self.healing.events("kubelet-restarted"))
        now = dt.datetime.now(dt.timezone.utc)
        old = self.healing.cluster.kubelet_pair(
            NODE, now - dt.timedelta(days=27), now + dt.timedelta(days=3)
        )
        self.healing.cluster.install_kubelet(self.node, pair=old)
        event = self.healing.wait_event("renewed", after=renewed, timeout=30)
        expect(event["KUBECERTD_FINDING"] == "renewal", "the renewal was not a routine one")
        self.healing.wait_event("kubelet-restarted", after=restarts, timeout=30)
        self.journal_since(started)
        failures = [
            e
            for e in self.node.journal(KUBELET)
            if "command failed" in str(e.get("MESSAGE"))
            and float(e["__REALTIME_TIMESTAMP"]) / 1e6 > started
        ]
        expect(not failures, "kubelet failed during a routine renewal")
        expect(
            serial_of((self.node.ssl_dir / "worker.pem").read_bytes()) != serial_of(old.pem),
            "not renewed",
        )
        note("Renewed before it expired; kubelet never failed.")
        self.node.wait_for(
            lambda: self.node.unit_property(AGENT, "StatusText").startswith("healthy"), timeout=30
        )
        self.check()
        self.status_line()


class KubeadmScene:
    """A kubeadm worker powered off past its certificate's end, healed in kubelet's shape."""

    def __init__(self, healing: HealingNode) -> None:
        self.healing = healing
        self.node = healing.node
        self.story = Story(healing)
        self.shape = healing.shape

    def run(self) -> None:
        say("4. A kubeadm node comes back after its certificate ran out")
        node, name = self.node, self.healing.node_name
        note("A second worker, set up as `kubeadm join` leaves it: kubeadm's drop-in for")
        note("kubelet.service, /var/lib/kubelet/kubeadm-flags.env (--hostname-override),")
        note("rotateCertificates: true, /etc/kubernetes/kubelet.conf naming kubelet's")
        note("certificate store /var/lib/kubelet/pki, and no bootstrap kubeconfig: kubeadm")
        note("deleted it after the join.  kubecertd.toml says nothing about any of this.")
        expect(
            not node.path("/etc/kubernetes/bootstrap-kubelet.conf").exists(),
            "the node still has a bootstrap kubeconfig",
        )
        node.systemctl("stop", KUBELET, check=True)
        now = dt.datetime.now(dt.timezone.utc)
        written = now - dt.timedelta(hours=23)
        old = self.healing.cluster.kubelet_pair(name, written, now - dt.timedelta(hours=1))
        # The store as kubelet's last rotation before the power-off left it.
        for stale in node.path(STORE).glob("kubelet-client-*.pem"):
            stale.unlink()
        self.healing.install_pair(old)
        os.utime(node.path(node.resolve(STORE_CURRENT)), (written.timestamp(),) * 2)
        note("The VM was deallocated overnight; its certificate (this cluster signs them")
        note("for a day) ran out an hour before it came back.  kubelet rotates its")
        note("certificate only while it is valid, and there is nothing left to bootstrap from:")
        started = time.time()
        node.systemctl("start", KUBELET, check=False)
        first = self.story.kubelet_says(started, "expired")
        show("journalctl -u kubelet", first)
        last = self.story.kubelet_says(started, "command failed")
        if last != first:
            show("journalctl -u kubelet | tail -1", last)
        note("Without kubecertd this node stays NotReady until someone re-joins it.")
        note("kubecertd starts with the node.  What it finds by itself:")
        before = self.story.check(full=True)
        expect(
            "layout: kubeadm (store), kubelet runs in kubelet.service" in before,
            "--check did not find the kubeadm layout",
        )
        expect(f"node {name}" in before, "--check did not take kubelet's --hostname-override")
        expect("cert-expired" in before, "--check did not report the expired certificate")
        note("kubelet's unit, kubeadm's drop-in and kubeadm-flags.env gave kubelet.conf and")
        note(f"the node name {name} (--hostname-override); kubelet.conf gave the store.")
        note("The agent starts (systemctl start kubecertd), heals the store, restarts kubelet:")
        renewed = len(self.healing.events("renewed"))
        restarts = len(self.healing.events("kubelet-restarted"))
        pid = self.healing.kubelet_pid()
        self.healing.start_agent()
        self.healing.wait_event("renewed", after=renewed, timeout=30)
        new_pid = self.healing.wait_registered(other_than=pid, timeout=30)
        self.healing.wait_event("kubelet-restarted", after=restarts, timeout=30)
        self.story.journal_since(started)
        note("A new timestamped file (0600: the chain, then the key) and a new symlink to it,")
        note("renamed over kubelet-client-current.pem: what kubelet's own rotation writes.")
        listing = node.run(
            ["ls", "-l", "--time-style=+%Y-%m-%d %H:%M", "/var/lib/kubelet/pki"], check=True
        ).stdout
        show("ls -l /var/lib/kubelet/pki", listing, lambda line: "kubelet-client" in line)
        problems = self.shape.installed(node)
        expect(not problems, f"the store is not in kubelet's shape: {'; '.join(problems)}")
        cert, _key = self.healing.pair()
        expect(node_of(cert) == name, "the installed certificate is not for this node")
        expect(serial_of(cert) != serial_of(old.pem), "the certificate was not replaced")
        expect("HEALTHY" in self.story.check(), "the node is not healthy after the heal")
        note(f"kubelet (PID {new_pid}) registered node {name}; from here kubelet rotates again.")


def _verdict_lines(line: str) -> bool:
    return line.startswith(("HEALTHY", "UNHEALTHY")) or "ERROR" in line or "WARNING" in line


def _layout_and_verdict(line: str) -> bool:
    return _verdict_lines(line) or line.startswith(("layout:", "    found from"))


def _fix_and_verdict(line: str) -> bool:
    return _verdict_lines(line) or line.startswith("fix:")


def _story(journal: str) -> str:
    """The story's entries: no routine checks or start-up lines, no catalog boilerplate."""
    kept, keep_entry = [], False
    for line in journal.splitlines():
        if "░░" not in line:
            keep_entry = bool(line.strip()) and not any(
                x in line for x in ("check (", "Starting", "Started")
            )
            if keep_entry:
                kept.append(line)
            continue
        text = line.split("░░", 1)[1].strip()
        if (
            keep_entry
            and text
            and not text.startswith(("Defined-By", "Support", "The finding codes", "Show the same"))
        ):
            kept.append(line)
    return "\n".join(kept)


# -- running it --------------------------------------------------------------------------------


@contextmanager
def throwaway_nodes() -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []
    scratch = Path(tempfile.mkdtemp(prefix="kubecertd-demo-"))

    def factory(**kwargs: Any) -> Node:
        node = Node(NODE, scratch / f"node{len(nodes)}", **kwargs)
        nodes.append(node)
        return node.boot()

    try:
        yield factory
    except BaseException:
        for node in nodes:  # what the agent saw, for whoever reads a failed demo
            tail = node.run(
                ["journalctl", "-u", AGENT, "-n", "25", "--no-pager", "-o", "short-precise"],
                check=False,
            )
            print(f"\n--- last journal lines of {AGENT} ---\n{tail.stdout}", file=sys.stderr)
        raise
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        for leftover in Path(tempfile.gettempdir()).glob("kubecertd-e2e-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def with_systemd() -> None:
    say(f"Setting up a throwaway worker, {NODE}")
    note("systemd as PID 1 in its own namespaces, journald, the system bus, a kubelet and")
    note("an API server stand-in, kubecertd-signer adopting the cluster CA, and the")
    note("shipped kubecertd.service enrolled with a one-time token.")
    with throwaway_nodes() as factory:
        started = time.monotonic()
        healing = HealingNode.create(factory, settle="2s", debounce="2s")
        catalog = (PROJECT / "systemd" / "kubecertd.catalog").read_bytes()
        healing.node.write_file("/usr/lib/systemd/catalog/kubecertd.catalog", catalog)
        healing.node.run(["journalctl", "--update-catalog"], check=True)
        note(f"ready in {time.monotonic() - started:.1f}s; kubelet registered, kubecertd active:")
        story = Story(healing)
        story.status_line()
        story.vanish()
        story.seed()
        story.expiring()
        healing.node.stop()  # its story is told; the machine has two cores
        say("Setting up a second throwaway worker: a kubeadm node")
        started = time.monotonic()
        kubeadm = HealingNode.create(
            factory, settle="2s", debounce="2s", shape=Kubeadm(), start_agent=False
        )
        note(
            f"ready in {time.monotonic() - started:.1f}s; enrolled, kubecertd.service not started yet."
        )
        KubeadmScene(kubeadm).run()


def without_systemd(reason: str) -> None:
    """The same story with `kubecertd --check --fix --no-restart` and a local signer."""
    from kubecertd import pki  # noqa: PLC0415

    import factories  # noqa: PLC0415 - test helpers, only for this fallback
    from signer_harness import running_signer  # noqa: PLC0415

    say(f"No throwaway systemd here ({reason}); the same story without systemd")
    with (
        tempfile.TemporaryDirectory(prefix="kubecertd-demo-") as scratch,
        running_signer(Path(scratch) / "signer") as signer,
    ):
        root = Path(scratch)
        config = root / "kubecertd.toml"
        config.write_text(
            f'node_name = "{NODE}"\nssl_dir = "{root / "ssl"}"\n[signer]\nurl = "{signer.url}"\n'
            f'ca = "{signer.identity_ca}"\nidentity_cert = "{root / "id.pem"}"\nidentity_key = "{root / "id-key.pem"}"\n'
            f'[daemon]\nstate_dir = "{root / "state"}"\n'
        )
        kubecertd = str(Path(sys.executable).with_name("kubecertd"))

        def run(
            *args: str, config: Path = config, keep: Callable[[str], bool] = _verdict_lines
        ) -> subprocess.CompletedProcess[str]:
            result = subprocess.run(
                [kubecertd, *args, "--config", str(config)],
                capture_output=True,
                text=True,
                check=False,
            )
            show("kubecertd " + " ".join(args), result.stdout + result.stderr, keep)
            return result

        expect(run("enroll", "--token", signer.token(NODE)).returncode == 0, "enroll failed")
        (root / "ssl").mkdir()
        say("1. The certificates vanish")
        expect(run("--check").returncode == 1, "--check did not fail")
        expect(run("--check", "--fix", "--no-restart").returncode == 0, "--fix did not heal")
        say("2. Another node's certificate is copied in")
        cert, key = signer.enroll(OTHER)
        kubelet_cert, kubelet_key = signer.kubelet_cert(OTHER, (cert, key))
        shutil.copy(kubelet_cert, root / "ssl" / "worker.pem")
        shutil.copy(kubelet_key, root / "ssl" / "worker-key.pem")
        expect(
            f"belongs to node {OTHER}" in run("--check").stdout, "--check did not name both nodes"
        )
        expect(run("--check", "--fix", "--no-restart").returncode == 0, "--fix did not heal")
        say("3. A certificate near its end is renewed ahead of time")
        cluster = factories.Issued(
            pki.load_certificates(signer.ca.read_bytes())[0],
            pki.load_private_key(signer.ca_key.read_bytes()),
        )
        now = dt.datetime.now(dt.timezone.utc)
        old = factories.issue(
            cluster,
            cn_list=[f"system:node:{NODE}"],
            not_before=now - dt.timedelta(days=27),
            not_after=now + dt.timedelta(days=3),
        )
        factories.write_ssl_dir(root / "ssl", cluster.pem, old.pem, old.key_pem)
        expect("cert-expiring" in run("--check").stdout, "--check did not warn")
        run("--check", "--fix", "--no-restart")
        renewed = (root / "ssl" / "worker.pem").read_bytes()
        expect(serial_of(renewed) != serial_of(old.pem), "the certificate was not renewed")

        say("4. A kubeadm node comes back after its certificate ran out")
        note("A kubeadm worker's files in a folder of their own: kubelet.conf naming kubelet's")
        note("certificate store, whose kubelet-client-current.pem ran out an hour ago, and no")
        note("bootstrap kubeconfig.  With no kubelet unit to read here, the config names")
        note(
            'the kubeconfig: layout = "kubeconfig", kubeconfig = ".../etc/kubernetes/kubelet.conf".'
        )
        tree = root / "kubeadm"
        expired = factories.issue(
            cluster,
            cn_list=[f"system:node:{NODE}"],
            not_before=now - dt.timedelta(hours=23),
            not_after=now - dt.timedelta(hours=1),
        )
        kubeconfig, store = _kubeadm_tree(tree, cluster.pem, expired.pem + expired.key_pem, now)
        kubeadm_config = root / "kubeadm.toml"
        kubeadm_config.write_text(
            config.read_text().replace(
                f'ssl_dir = "{root / "ssl"}"\n',
                f'layout = "kubeconfig"\nkubeconfig = "{kubeconfig}"\n',
            )
        )
        before = run("--check", config=kubeadm_config, keep=_layout_and_verdict).stdout
        expect("layout: kubeconfig (store)" in before, "--check did not find kubelet's store")
        expect("cert-expired" in before, "--check did not report the expired certificate")
        fixed = run(
            "--check", "--fix", "--no-restart", config=kubeadm_config, keep=_fix_and_verdict
        )
        expect(fixed.returncode == 0, "--fix did not heal")
        listing = subprocess.run(
            ["ls", "-l", "--time-style=+%Y-%m-%d %H:%M", str(store)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        show(f"ls -l {store}", listing, lambda line: "kubelet-client" in line)
        current = store / "kubelet-client-current.pem"
        expect(current.is_symlink(), "kubelet-client-current.pem is not a symlink")
        target = Path(os.readlink(current))
        expect(
            target.is_absolute() and target.parent == store,
            f"kubelet-client-current.pem points at {target}, not at a file of the store",
        )
        expect(target.stat().st_mode & 0o777 == 0o600, f"{target} is not 0600")
        cert = current.read_bytes()
        expect(node_of(cert) == NODE, "the installed certificate is not for this node")
        expect(serial_of(cert) != serial_of(expired.pem), "the certificate was not replaced")


def _kubeadm_tree(
    tree: Path, ca_pem: bytes, combined: bytes, now: dt.datetime
) -> tuple[Path, Path]:
    """kubelet.conf and kubelet's store under ``tree``, as `kubeadm join` and kubelet's
    rotation leave them (the store's file named after ``now``, its symlink absolute)."""
    import base64  # noqa: PLC0415

    store = tree / "var/lib/kubelet/pki"
    store.mkdir(parents=True)
    written = now - dt.timedelta(hours=23)
    stamped = store / f"kubelet-client-{written:%Y-%m-%d-%H-%M-%S}.pem"
    stamped.write_bytes(combined)
    stamped.chmod(0o600)
    os.utime(stamped, (written.timestamp(), written.timestamp()))
    (store / "kubelet-client-current.pem").symlink_to(stamped)
    kubeconfig = tree / "etc/kubernetes/kubelet.conf"
    kubeconfig.parent.mkdir(parents=True)
    current = store / "kubelet-client-current.pem"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n"
        f"    certificate-authority-data: {base64.b64encode(ca_pem).decode()}\n"
        "    server: https://10.0.0.10:6443\n  name: default-cluster\n"
        "contexts:\n- context:\n    cluster: default-cluster\n    namespace: default\n"
        "    user: default-auth\n  name: default-context\ncurrent-context: default-context\n"
        f"users:\n- name: default-auth\n  user:\n    client-certificate: {current}\n"
        f"    client-key: {current}\n"
    )
    kubeconfig.chmod(0o600)
    return kubeconfig, store


def main() -> int:
    started = time.monotonic()
    reason = (
        "asked for with --without-systemd"
        if "--without-systemd" in sys.argv[1:]
        else unavailable_reason()
    )
    try:
        if reason is None:
            with_systemd()
        else:
            without_systemd(reason)
    except DemoFailed as exc:
        print(f"\ndemo: FAILED: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a demo reports, it does not crash
        print(f"\ndemo: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    say(
        f"Every scene healed as narrated, in {time.monotonic() - started:.0f}s. Nothing is left running."
    )
    return 0


if __name__ == "__main__":
    os.environ.pop("NOTIFY_SOCKET", None)
    sys.exit(main())
