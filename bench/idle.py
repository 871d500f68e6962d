#!/usr/bin/env python3
"""Idle footprint of the running agent: RSS, PSS, open files, CPU and wake-ups, with the
fanotify witness and without it, side by side in one run.

Boots one throwaway node the way the end-to-end tests do (tests/healing_node.py: a real
systemd, journald, the system bus, the real signer, the kubelet/API-server stand-ins, the
shipped kubecertd.service with ``WatchdogSec=60s``). Then, for each variant of the agent
(``--rounds`` times, in turn, so that a drift of the machine lands on all of them):

- ``no witness``: a drop-in ``CapabilityBoundingSet=~CAP_SYS_ADMIN``, so that
  ``Daemon._open_witness`` degrades as on a host without the capability (one ``witness``
  warning in the journal, healing as always). The witness's modules are imported all
  the same: the difference to ``witness`` is the group, its marks and its bookkeeping;
  the modules' own share is measured on bare interpreters (step 4);
- ``witness``: the shipped unit as it is;
- ``--agent-src NAME=DIR`` (optional, for history): the shipped unit running the
  ``kubecertd`` package of DIR (e.g. ``git archive`` of an older commit), copied into
  the node and put first on the agent's PYTHONPATH by a drop-in;

``--src DIR`` runs ``witness`` and ``no witness`` from DIR's package the same way (e.g. a
``git archive`` of HEAD, so that what is measured is a commit; by default they run the
venv's kubecertd, i.e. this checkout's working tree);

it restarts the agent with the variant's drop-in, waits until it reports ``healthy``
plus ``--grace`` seconds, finds its MainPID on the host (NSpid) and:

1. samples /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, context switches) and
   /proc/PID/stat (utime+stime) every second for ``--seconds``: nothing attached; then
   /proc/PID/smaps_rollup (PSS), /proc/PID/fd (open files, by kind) and the fanotify
   group's marks (/proc/PID/fdinfo);
2. runs ``strace -f -tt -T -p PID`` for another ``--seconds`` and counts every system
   call, in particular the returns of the main loop's select(): the wake-ups. The
   expected ones are the watchdog (every WatchdogSec/2 = 30 s) and the timers (recheck
   every 5 min; the renewal point is months away); the voluntary context switches of
   step 1 count the same wake-ups without strace attached;

then, on the shipped unit:

3. deletes worker.pem once, waits until the heal is done and the agent is healthy again,
   and samples RSS once more for ``--after-heal`` seconds (10): the steady state after
   the heal path (TLS, key generation, jeepney) has run;
4. measures, the same way (VmRSS after the imports, median of a few samples), bare
   interpreters of the same venv: ``pass``; the brief's ``import cryptography.x509,
   requests, pyinotify, jeepney, systemd.journal``; each of those alone; the agent's own
   import set without and with the witness's modules. Plus the agent's RSS by mapping
   (/proc/PID/smaps).

How busy the machine was is recorded for every window: the load average, and the share
of both CPUs that was busy (/proc/stat), nearly all of it other processes' (the agent
uses ~0).

Usage: .venv/bin/python bench/idle.py [--seconds 60] [--rounds 1] [--src DIR]
           [--agent-src NAME=DIR ...] [--out FILE]
Root only (namespaces, ptrace). Bounded: every wait has a timeout; the node is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _nodebench import (
    AGENT,
    HealingNode,
    base_dropin,
    copy_agent_src,
    cpu_times,
    healing_node,
    journal_since,
    loadavg,
    machine,
    node_processes,
    parse_agent_src,
    percentile,
    restart_agent,
    src_dropin,
    wait,
    wait_healthy,
)

VENV_PYTHON = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BRIEF_IMPORTS = "cryptography.x509, requests, pyinotify, jeepney, systemd.journal"
# What the running agent has imported after start-up (kubecertd.cli run -> daemon, its
# edges, locate's unit reading (discover), the textfile's prometheus_client, the lazily
# imported D-Bus/sd_notify modules), without the witness's modules ...
AGENT_IMPORTS = (
    "kubecertd.cli, kubecertd.daemon, kubecertd.discover, kubecertd.edges.client, "
    "kubecertd.edges.units, kubecertd.edges.watch, kubecertd.edges.textfile, "
    "prometheus_client, jeepney.io.blocking, jeepney.bus_messages, systemd.daemon, "
    "systemd.journal"
)
# ... which Daemon._open_witness imports at start-up, whether or not the group can be made.
WITNESS_IMPORTS = "kubecertd.edges.fanotify, kubecertd.edges.culprit_proc"
# What-ifs: the agent's import set with one dependency replaced by a stub module (its
# attributes are dummies: only importing is measured) plus what would replace it.
STUB_PRELUDE = """\
import sys, types
class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return 1 if name.isupper() else type(name, (), {{}})
for _name in {stubs!r}:
    sys.modules[_name] = _Stub(_name)
"""
WHAT_IFS = {
    "prometheus_client -> a hand-written textfile": (["prometheus_client"], ""),
    "pyinotify -> inotify through ctypes": (["pyinotify"], "ctypes"),
    "both": (["prometheus_client", "pyinotify"], "ctypes"),
}
# What a heal adds to the import set: cryptography's first private_bytes() imports its
# serialization package (the SSH key module, dataclasses, inspect).
HEAL_IMPORTS = "cryptography.hazmat.primitives.serialization"
SELECTS = ("select", "pselect6", "poll", "ppoll", "epoll_wait", "epoll_pwait")

CAP_SYS_ADMIN = 21
MB = 1e6 / 2**20  # MiB per MB: the witness's target is 1 MB (10^6 bytes)


# -- /proc ------------------------------------------------------------------------------------


def host_pid(h: HealingNode, node_pid: int) -> int:
    """The host PID of the node's process ``node_pid`` (last NSpid field, same PID ns)."""
    for pid in node_processes(h.node):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^NSpid:\s+(.*)$", status, re.M)
        if match and int(match.group(1).split()[-1]) == node_pid:
            return pid
    raise RuntimeError(f"no host process for the node's PID {node_pid}")


def sample(pid: int) -> dict[str, float]:
    """Memory in MiB, CPU seconds, context switches of ``pid`` now."""
    status = Path(f"/proc/{pid}/status").read_text()
    values: dict[str, float] = {}
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
        match = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
        values[key] = int(match.group(1)) / 1024 if match else float("nan")
    for key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
        match = re.search(rf"^{key}:\s+(\d+)", status, re.M)
        values[key] = int(match.group(1)) if match else 0
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    values["cpu_s"] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    values["threads"] = int(fields[17])
    values["t"] = time.time()
    return values


def watch(pid: int, seconds: float, every: float = 1.0) -> dict[str, Any]:
    """Samples of ``pid`` every ``every`` s for ``seconds``, summarised."""
    busy0, total0 = cpu_times()
    samples = [sample(pid)]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))
        samples.append(sample(pid))
    busy1, total1 = cpu_times()
    return window_summary(samples, (busy1 - busy0) / max(1, total1 - total0))


def window_summary(samples: list[dict[str, float]], busy: float) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    span = last["t"] - first["t"]
    return {
        "seconds": round(span, 1),
        "machine_busy": round(busy, 3),  # share of all CPUs, nearly all other processes'
        "loadavg": loadavg(),
        "VmRSS_MiB": {
            "start": first["VmRSS"],
            "end": last["VmRSS"],
            "max": max(s["VmRSS"] for s in samples),
        },
        "VmHWM_MiB": last["VmHWM"],
        "RssAnon_MiB": last["RssAnon"],
        "RssFile_MiB": last["RssFile"],
        "cpu_ms": round((last["cpu_s"] - first["cpu_s"]) * 1000, 1),
        "voluntary_ctxt_switches": int(
            last["voluntary_ctxt_switches"] - first["voluntary_ctxt_switches"]
        ),
        "nonvoluntary_ctxt_switches": int(
            last["nonvoluntary_ctxt_switches"] - first["nonvoluntary_ctxt_switches"]
        ),
        "threads": int(last["threads"]),
    }


def smaps_rollup(pid: int) -> dict[str, float]:
    """Rss and the proportional set sizes (MiB) of ``pid``: a page shared by n processes
    counts 1/n (the node's other Python processes share libpython, libcrypto ...)."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def open_files(pid: int) -> dict[str, int]:
    """The open file descriptors of ``pid``, counted by kind: anon_inode:[fanotify],
    anon_inode:inotify, socket, pipe, or the file's path."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[re.sub(r":\[\d+\]$", "", target)] += 1
    return dict(sorted(kinds.items()))


def fanotify_marks(pid: int) -> int | None:
    """Inode marks of the agent's fanotify group (its fdinfo); None without a group."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[fanotify]":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        return sum(1 for line in info.splitlines() if line.startswith("fanotify ino:"))
    return None


def has_sys_admin(pid: int) -> dict[str, bool]:
    """Whether CAP_SYS_ADMIN is in the process's effective and bounding sets."""
    status = Path(f"/proc/{pid}/status").read_text()
    out = {}
    for key in ("CapEff", "CapBnd"):
        match = re.search(rf"^{key}:\s+([0-9a-f]+)$", status, re.M)
        out[key] = bool(match and int(match.group(1), 16) >> CAP_SYS_ADMIN & 1)
    return out


def smaps_by_mapping(pid: int, top: int = 12) -> list[tuple[str, float]]:
    """RSS (MiB) per mapped file (basename) / [heap] / anonymous, largest first."""
    totals: Counter[str] = Counter()
    current = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            current = os.path.basename(head[5]) if len(head) > 5 else "[anonymous]"
        elif head and head[0] == "Rss:":
            totals[current] += int(head[1]) / 1024
    return [(name, round(mib, 2)) for name, mib in totals.most_common(top)]


# -- strace ------------------------------------------------------------------------------------

LINE = re.compile(
    r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\d+:\d+:\d+\.\d+)\s+(\w+)\((.*)\)\s+=\s+(.+?)(?:\s+<([\d.]+)>)?$"
)


def strace_window(pid: int, seconds: float) -> dict[str, Any]:
    """Every system call of ``pid`` (all threads) for ``seconds``."""
    busy0, total0 = cpu_times()
    with tempfile.NamedTemporaryFile("r", prefix="kubecertd-idle-strace-", suffix=".txt") as out:
        proc = subprocess.Popen(
            ["strace", "-f", "-tt", "-T", "-qq", "-o", out.name, "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(seconds)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        lines = Path(out.name).read_text().splitlines()
    busy1, total1 = cpu_times()
    calls: Counter[str] = Counter()
    wakeups = []
    unparsed = []
    for line in lines:
        match = LINE.match(line)
        if not match:
            if "resumed>" in line or "<unfinished" in line or "+++" in line or "---" in line:
                unparsed.append(line)
            else:
                unparsed.append(line)
            continue
        clock, name, arguments, result, elapsed = match.groups()
        if result.startswith("?"):  # interrupted by the attach/detach, restarted by the kernel
            continue
        calls[name] += 1
        if name in SELECTS:
            wakeups.append(
                {
                    "at": clock,
                    "call": name,
                    "result": result,
                    "slept_s": float(elapsed) if elapsed else None,
                    "timeout": arguments.rsplit(",", 2)[-2:]
                    if name == "select"
                    else arguments[-40:],
                }
            )
    return {
        "seconds": seconds,
        "machine_busy": round((busy1 - busy0) / max(1, total1 - total0), 3),
        "loadavg": loadavg(),
        "strace_stderr": err.strip()[-500:],
        "syscalls": dict(calls.most_common()),
        "total_syscalls": sum(calls.values()),
        "select_returns": wakeups,
        "unparsed": unparsed[:20],
        "raw": lines[:200],
    }


# -- bare interpreters, measured the same way ------------------------------------------------


def bare_rss(imports: str, repeats: int = 3, stubs: list[str] | None = None) -> dict[str, float]:
    """VmRSS/VmHWM (MiB) of the venv's python after ``import <imports>``; median of repeats."""
    code = (
        (STUB_PRELUDE.format(stubs=stubs) if stubs else "")
        + (f"import {imports}\n" if imports else "")
        + "import sys\nprint('ready', flush=True)\nsys.stdin.read()\n"
    )
    rss, hwm = [], []
    for _ in range(repeats):
        proc = subprocess.Popen(
            [VENV_PYTHON, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError(
                    f"python -c 'import {imports}' failed: {proc.stderr.read() if proc.stderr else ''}"
                )
            time.sleep(0.3)
            values = [sample(proc.pid) for _ in range(3)]
            rss.append(percentile([v["VmRSS"] for v in values], 0.5))
            hwm.append(values[-1]["VmHWM"])
        finally:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "VmRSS_MiB": round(percentile(rss, 0.5), 2),
        "VmHWM_MiB": round(percentile(hwm, 0.5), 2),
    }


# -- main ------------------------------------------------------------------------------------


def expected_wakeups(seconds: float, watchdog_usec: int, recheck_s: float) -> float:
    per_s = 0.0
    if watchdog_usec:
        per_s += 1 / (watchdog_usec / 2e6)
    per_s += 1 / recheck_s
    return seconds * per_s


# -- the variants ------------------------------------------------------------------------------


def variants(agent_src: list[tuple[str, Path]], src: Path | None) -> list[tuple[str, str | None]]:
    """(name, drop-in) in the order each round measures them: older sources, then no
    witness, then the shipped unit (last, so that the heal runs on it)."""
    older = [(name, src_dropin(name)) for name, _ in agent_src]
    return [*older, ("no witness", base_dropin(src, True)), ("witness", base_dropin(src))]


def measure(
    h: HealingNode, name: str, dropin: str | None, args: argparse.Namespace
) -> dict[str, Any]:
    """One variant: restarted, then the /proc window and the strace window."""
    started = restart_agent(h, dropin)
    time.sleep(args.grace)
    props = h.node.unit_properties(
        AGENT, "MainPID", "WatchdogUSec", "StatusText", "NRestarts", "Environment"
    )
    node_pid = int(props["MainPID"])
    pid = host_pid(h, node_pid)
    warnings = [
        str(e.get("MESSAGE"))
        for e in journal_since(h.node, started, "KUBECERTD_EVENT=witness", unit=AGENT)
        if e["ts"] >= started * 1e6
    ]
    out: dict[str, Any] = {
        "variant": name,
        "dropin": dropin,
        "node_pid": node_pid,
        "host_pid": pid,
        **props,
        "witness_warnings": warnings,
        "fanotify_marks": fanotify_marks(pid),
        "sys_admin": has_sys_admin(pid),
    }
    print(f"  agent: node PID {node_pid}, host PID {pid}, status {props['StatusText']!r}; "
          f"fanotify marks {out['fanotify_marks']}; witness warnings {len(warnings)}", flush=True)  # fmt: skip
    if name == "witness" and (out["fanotify_marks"] is None or warnings):
        raise RuntimeError(f"the shipped agent has no witness: {warnings}")
    if name == "no witness" and (out["fanotify_marks"] is not None or not warnings):
        raise RuntimeError("the agent without CAP_SYS_ADMIN still made a fanotify group")
    print(f"  {args.seconds:.0f} s, /proc only ...", flush=True)
    out["idle"] = watch(pid, args.seconds)
    out["rollup"] = smaps_rollup(pid)
    out["fds"] = open_files(pid)
    out["smaps_top"] = smaps_by_mapping(pid)
    print(f"  {args.seconds:.0f} s under strace -f ...", flush=True)
    traced = strace_window(pid, args.seconds)
    traced["expected_wakeups"] = round(
        expected_wakeups(args.seconds, _usec(props["WatchdogUSec"]), RECHECK_S), 2
    )
    out["strace"] = traced
    if int(h.node.unit_property(AGENT, "MainPID")) != node_pid:
        raise RuntimeError(f"the agent ({name}) restarted while it was measured")
    return out


RECHECK_S = 300.0  # [daemon] recheck default; the node's config does not set it


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="length of each idle window (default 60)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every variant this many times, in turn"
    )
    parser.add_argument(
        "--grace", type=float, default=5.0, help="seconds after 'healthy' before measuring"
    )
    parser.add_argument(
        "--after-heal", type=float, default=10.0, help="RSS window after one heal (0: skip)"
    )
    parser.add_argument(
        "--agent-src",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also measure the kubecertd package of DIR (e.g. git archive of an older "
        "commit) under the shipped unit; repeatable",
    )
    parser.add_argument(
        "--src",
        type=Path,
        help="the directory of the kubecertd package that the witness and no-witness "
        "variants run (e.g. git archive of HEAD; default: the venv's, i.e. this checkout's "
        "working tree)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 3600 or not 0 <= args.after_heal <= 600:
        parser.error("--seconds 1..3600, --after-heal 0..600")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds 1..10")
    agent_src = parse_agent_src(args.agent_src)
    if args.src and not (args.src / "kubecertd" / "__init__.py").is_file():
        parser.error(f"--src {args.src}: no kubecertd package there")

    info = machine()
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu']}, load average {info['loadavg']} (at start)",
        flush=True,
    )
    result: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    with healing_node(settle="1s", debounce="200ms") as h:
        wait_healthy(h)
        copy_agent_src(h.node, agent_src + ([("src", args.src)] if args.src else []))
        runs = []
        for round_ in range(args.rounds):
            for name, dropin in variants(agent_src, args.src):
                print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
                runs.append(measure(h, name, dropin, args))
        result["runs"] = runs

        if args.after_heal:
            pid, node_pid = runs[-1]["host_pid"], runs[-1]["node_pid"]  # the shipped unit
            print(f"heal once, then {args.after_heal:.0f} s /proc only ...", flush=True)
            t = time.time()
            before_hwm = sample(pid)["VmHWM"]
            (h.node.ssl_dir / "worker.pem").unlink()
            wait(
                lambda: journal_since(h.node, t, "KUBECERTD_EVENT=kubelet-restarted", unit=AGENT),
                60, 0.5, "the heal's kubelet-restarted event",
            )  # fmt: skip
            wait_healthy(h)
            time.sleep(args.grace)
            if int(h.node.unit_property(AGENT, "MainPID")) != node_pid:
                raise RuntimeError("the agent restarted during the heal")
            after = watch(pid, args.after_heal)
            after["VmHWM_before_heal_MiB"] = before_hwm
            after["rollup"] = smaps_rollup(pid)
            result["after_heal"] = after
            result["smaps_top_after_heal"] = smaps_by_mapping(pid)

    print("bare interpreters (same venv python, VmRSS after the imports) ...", flush=True)
    bare: dict[str, Any] = {"pass": bare_rss("")}
    bare[f"import {BRIEF_IMPORTS}"] = bare_rss(BRIEF_IMPORTS)
    for module in [m.strip() for m in BRIEF_IMPORTS.split(",")] + ["prometheus_client"]:
        bare[f"import {module}"] = bare_rss(module)
    bare["import <agent's modules>"] = bare_rss(AGENT_IMPORTS)
    bare["  + the witness's modules"] = bare_rss(f"{AGENT_IMPORTS}, {WITNESS_IMPORTS}")
    bare[f"  + the witness's + {HEAL_IMPORTS} (a heal)"] = bare_rss(
        f"{AGENT_IMPORTS}, {WITNESS_IMPORTS}, {HEAL_IMPORTS}"
    )
    for label, (stubs, extra) in WHAT_IFS.items():
        imports = f"{AGENT_IMPORTS}, {WITNESS_IMPORTS}" + (f", {extra}" if extra else "")
        bare[f"  what-if: {label}"] = bare_rss(imports, stubs=stubs)
    result["bare"] = bare
    result["machine"]["loadavg_end"] = loadavg()

    report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


def _usec(text: str) -> int:
    """systemctl show's WatchdogUSec ('1min', '30s', '0') in µs."""
    units = {"us": 1, "ms": 1000, "s": 1_000_000, "min": 60_000_000, "h": 3_600_000_000}
    total = 0
    for number, unit in re.findall(r"([\d.]+)\s*(us|ms|min|s|h)", text):
        total += int(float(number) * units[unit])
    return total


def _median(values: list[float]) -> float:
    return percentile(values, 0.5)


def side_by_side(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """metric -> variant -> one value per round."""
    rows: dict[str, dict[str, list[float]]] = {}

    def add(metric: str, variant: str, value: float) -> None:
        rows.setdefault(metric, {}).setdefault(variant, []).append(value)

    for run in runs:
        name, idle, strace = run["variant"], run["idle"], run["strace"]
        add("VmRSS MiB (end of the /proc window)", name, idle["VmRSS_MiB"]["end"])
        add("  VmRSS MB", name, idle["VmRSS_MiB"]["end"] / MB)
        add("  RssAnon MiB", name, idle["RssAnon_MiB"])
        add("  RssFile MiB", name, idle["RssFile_MiB"])
        add(
            "  VmRSS growth in the window MiB",
            name,
            idle["VmRSS_MiB"]["end"] - idle["VmRSS_MiB"]["start"],
        )
        add("Pss MiB (smaps_rollup)", name, run["rollup"].get("Pss", float("nan")))
        add("  Pss_Anon MiB", name, run["rollup"].get("Pss_Anon", float("nan")))
        add("  Pss_File MiB", name, run["rollup"].get("Pss_File", float("nan")))
        add("open fds", name, sum(run["fds"].values()))
        add("fanotify inode marks", name, run["fanotify_marks"] or 0)
        add("threads", name, idle["threads"])
        add("/proc window: CPU ms", name, idle["cpu_ms"])
        add("/proc window: voluntary switches (wake-ups)", name, idle["voluntary_ctxt_switches"])
        add("strace window: select() returns (wake-ups)", name, len(strace["select_returns"]))
        add("  expected (watchdog + recheck)", name, strace["expected_wakeups"])
        add("strace window: system calls", name, strace["total_syscalls"])
        add("machine busy % (/proc window)", name, idle["machine_busy"] * 100)
        add("machine busy % (strace window)", name, strace["machine_busy"] * 100)
    return rows


def report(result: dict[str, Any]) -> None:
    runs = result["runs"]
    names = list(dict.fromkeys(run["variant"] for run in runs))
    rows = side_by_side(runs)
    result["side_by_side"] = rows
    seconds = runs[0]["strace"]["seconds"]
    rounds = len(runs) // len(names)
    print(f"\n== idle agent, side by side: {rounds} round(s), {seconds:.0f} s per window; "
          f"each cell: the median of the rounds (every round's value in the JSON) ==")  # fmt: skip
    width = 46
    head = "".join(f"{n:>14}" for n in names) + f"{'witness - no':>14}"
    print(f"{'':<{width}}{head}")

    def cell(values: list[float]) -> str:
        return f"{_median(values):14.2f}" if values else f"{'':>14}"

    for metric, per in rows.items():
        line = "".join(cell(per.get(n, [])) for n in names)
        if "witness" in per and "no witness" in per:
            line += f"{_median(per['witness']) - _median(per['no witness']):+14.2f}"
        print(f"{metric:<{width}}{line}")
    for metric in (
        "VmRSS MiB (end of the /proc window)",
        "strace window: select() returns (wake-ups)",
    ):
        per = rows[metric]
        print(f"  per round, {metric.split(' (')[0]}: "
              + "; ".join(f"{n} {per[n]}" for n in names))  # fmt: skip

    if "witness" in names and "no witness" in names:
        rss = _median(rows["VmRSS MiB (end of the /proc window)"]["witness"]) - _median(
            rows["VmRSS MiB (end of the /proc window)"]["no witness"]
        )
        pss = _median(rows["Pss MiB (smaps_rollup)"]["witness"]) - _median(
            rows["Pss MiB (smaps_rollup)"]["no witness"]
        )
        bare = result.get("bare", {})
        modules = (
            bare["  + the witness's modules"]["VmRSS_MiB"]
            - bare["import <agent's modules>"]["VmRSS_MiB"]
            if "  + the witness's modules" in bare
            else float("nan")
        )
        shipped = _median(rows["VmRSS MiB (end of the /proc window)"]["witness"])
        print(f"\nthe shipped agent idles at {shipped:.2f} MiB = {shipped / MB:.2f} MB: "
              f"{'MET' if shipped / MB <= 40 else 'NOT MET'} (<= 40 MB)")  # fmt: skip
        wake = rows["strace window: select() returns (wake-ups)"]
        extra_wakeups = _median(wake["witness"]) - _median(wake["no witness"])
        total = rss + modules
        print("\n== the witness against issue 12 (at most 1 MB of RSS, no wake-ups while idle) ==")
        print(f"RSS, witness - no witness (the group, its marks, its bookkeeping): {rss:+.2f} MiB = {rss / MB:+.2f} MB"
              f" (PSS {pss:+.2f} MiB)")  # fmt: skip
        print(
            f"RSS of the witness's modules (imported in both variants; bare interpreters): {modules:+.2f} MiB"
        )
        print(f"together: {total:+.2f} MiB = {total / MB:+.2f} MB -> "
              f"{'MET' if total / MB <= 1 else 'NOT MET'} (<= 1 MB)")  # fmt: skip
        print(f"wake-ups, witness - no witness: {extra_wakeups:+.1f} -> "
              f"{'MET' if extra_wakeups <= 0 else 'NOT MET'} (no extra wake-ups)")  # fmt: skip

    print("\n== open files by kind ==")
    last = {run["variant"]: run for run in runs}
    for name in names:
        print(f"  {name}: {last[name]['fds']}")
    print(
        "\n== capabilities (CAP_SYS_ADMIN effective / in the bounding set) and witness warnings =="
    )
    for name in names:
        run = last[name]
        print(f"  {name}: {run['sys_admin']}; {run['witness_warnings'] or 'none'}")

    print(f"\n== wake-ups of the last round (strace -f, {seconds:.0f} s) ==")
    for name in names:
        strace = last[name]["strace"]
        print(f"  {name}: {strace['total_syscalls']} system calls {strace['syscalls']}")
        for w in strace["select_returns"]:
            print(f"    {w['at']} {w['call']} = {w['result']} after {w['slept_s']} s")

    if "after_heal" in result:
        after = result["after_heal"]
        rss = after["VmRSS_MiB"]
        print(f"\n== after one heal (witness) ==\nVmRSS {rss['end']:.1f} MiB (max {rss['max']:.1f}); VmHWM "
              f"{after['VmHWM_before_heal_MiB']:.1f} before the heal -> {after['VmHWM_MiB']:.1f}; "
              f"RssAnon {after['RssAnon_MiB']:.1f}, RssFile {after['RssFile_MiB']:.1f}; "
              f"Pss {after['rollup'].get('Pss', float('nan')):.1f}; CPU {after['cpu_ms']} ms "
              f"and {after['voluntary_ctxt_switches']} voluntary switches in {after['seconds']} s")  # fmt: skip
    print("\n== agent RSS by mapping (MiB), last round: " + " / ".join(names)
          + (" / witness after a heal ==" if "smaps_top_after_heal" in result else " =="))  # fmt: skip
    maps = [dict(last[name]["smaps_top"]) for name in names]
    if "smaps_top_after_heal" in result:
        maps.append(dict(result["smaps_top_after_heal"]))
    for mapping in dict.fromkeys(k for m in maps for k in m):
        print(f"  {mapping:<40}" + "".join(f" {m.get(mapping, float('nan')):7.2f}" for m in maps))
    print("\n== bare interpreters (VmRSS MiB, median of 3) ==")
    for label, values in result["bare"].items():
        print(f"  {label:<66} {values['VmRSS_MiB']:7.2f}   (HWM {values['VmHWM_MiB']:.2f})")
    print(
        f"\nload average at the start {result['machine']['loadavg']}, at the end: {result['machine']['loadavg_end']}"
    )


if __name__ == "__main__":
    sys.exit(main())
