#!/usr/bin/env python3
"""Idle footprint of the running agent: RSS, CPU and wake-ups.

Boots one throwaway node the way the end-to-end tests do (tests/healing_node.py: a real
systemd, journald, the system bus, the real signer, the kubelet/API-server stand-ins, the
shipped kubecertd.service with ``WatchdogSec=60s``), waits until the agent reports
``healthy`` plus ``--grace`` seconds, finds the agent's MainPID on the host (NSpid) and:

1. samples /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, context switches) and
   /proc/PID/stat (utime+stime) every second for ``--seconds`` (60): nothing attached;
2. runs ``strace -f -tt -T -p PID`` for another ``--seconds`` and counts every system
   call, in particular the returns of the main loop's select(): the expected wake-ups are
   the watchdog (every WatchdogSec/2 = 30 s) and the timers (recheck every 5 min; the
   renewal point is months away);
3. deletes worker.pem once, waits until the heal is done and the agent is healthy again,
   and samples RSS once more for ``--after-heal`` seconds (10): the steady state after
   the heal path (TLS, key generation, jeepney) has run;
4. measures, the same way (VmRSS after the imports, median of a few samples), bare
   interpreters of the same venv: ``pass``; the brief's ``import cryptography.x509,
   requests, pyinotify, jeepney, systemd.journal``; each of those alone; and the agent's
   own import set. Plus the agent's RSS by mapping (/proc/PID/smaps).

Usage: .venv/bin/python bench/idle.py [--seconds 60] [--out FILE]
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
    healing_node,
    journal_since,
    loadavg,
    machine,
    node_processes,
    percentile,
    wait,
    wait_healthy,
)

VENV_PYTHON = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BRIEF_IMPORTS = "cryptography.x509, requests, pyinotify, jeepney, systemd.journal"
# What the running agent has imported after start-up and a heal (kubecertd.cli run ->
# daemon, its edges, and the lazily imported D-Bus/sd_notify modules).
AGENT_IMPORTS = (
    "kubecertd.cli, kubecertd.daemon, kubecertd.edges.client, kubecertd.edges.units, "
    "kubecertd.edges.watch, kubecertd.edges.textfile, jeepney.io.blocking, "
    "jeepney.bus_messages, systemd.daemon, systemd.journal"
)
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


def watch(pid: int, seconds: float, every: float = 1.0) -> list[dict[str, float]]:
    samples = [sample(pid)]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))
        samples.append(sample(pid))
    return samples


def window_summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    span = last["t"] - first["t"]
    return {
        "seconds": round(span, 1),
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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="length of each idle window (default 60)"
    )
    parser.add_argument(
        "--grace", type=float, default=5.0, help="seconds after 'healthy' before measuring"
    )
    parser.add_argument(
        "--after-heal", type=float, default=10.0, help="RSS window after one heal (0: skip)"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 3600 or not 0 <= args.after_heal <= 600:
        parser.error("--seconds 1..3600, --after-heal 0..600")

    info = machine()
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu']}, load average {info['loadavg']} (at start)",
        flush=True,
    )
    result: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    with healing_node(settle="1s", debounce="200ms") as h:
        wait_healthy(h)
        time.sleep(args.grace)
        props = h.node.unit_properties(AGENT, "MainPID", "WatchdogUSec", "StatusText", "NRestarts")
        node_pid = int(props["MainPID"])
        pid = host_pid(h, node_pid)
        watchdog_usec = _usec(props["WatchdogUSec"])
        recheck_s = 300.0  # [daemon] recheck default; the node's config does not set it
        print(f"agent: node PID {node_pid}, host PID {pid}, WatchdogUSec={props['WatchdogUSec']}, "
              f"status {props['StatusText']!r}", flush=True)  # fmt: skip
        result["agent"] = {"node_pid": node_pid, "host_pid": pid, **props}

        print(f"window 1: {args.seconds:.0f} s, /proc only ...", flush=True)
        quiet = window_summary(watch(pid, args.seconds))
        quiet["loadavg"] = loadavg()
        result["idle"] = quiet
        result["smaps_top"] = smaps_by_mapping(pid)

        print(f"window 2: {args.seconds:.0f} s under strace -f ...", flush=True)
        traced = strace_window(pid, args.seconds)
        traced["expected_wakeups"] = round(
            expected_wakeups(args.seconds, watchdog_usec, recheck_s), 2
        )
        traced["loadavg"] = loadavg()
        result["strace"] = traced

        if args.after_heal:
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
            after = window_summary(watch(pid, args.after_heal))
            after["VmHWM_before_heal_MiB"] = before_hwm
            after["loadavg"] = loadavg()
            result["after_heal"] = after
            result["smaps_top_after_heal"] = smaps_by_mapping(pid)

    print("bare interpreters (same venv python, VmRSS after the imports) ...", flush=True)
    bare: dict[str, Any] = {"pass": bare_rss("")}
    bare[f"import {BRIEF_IMPORTS}"] = bare_rss(BRIEF_IMPORTS)
    for module in [m.strip() for m in BRIEF_IMPORTS.split(",")] + ["prometheus_client"]:
        bare[f"import {module}"] = bare_rss(module)
    bare["import <agent's modules>"] = bare_rss(AGENT_IMPORTS)
    bare[f"  + {HEAL_IMPORTS} (a heal)"] = bare_rss(f"{AGENT_IMPORTS}, {HEAL_IMPORTS}")
    for label, (stubs, extra) in WHAT_IFS.items():
        imports = f"{AGENT_IMPORTS}, {extra}" if extra else AGENT_IMPORTS
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


def report(result: dict[str, Any]) -> None:
    idle = result["idle"]
    print("\n== idle agent ==")
    rss = idle["VmRSS_MiB"]
    print(f"VmRSS {rss['start']:.1f} -> {rss['end']:.1f} MiB (max {rss['max']:.1f}) over {idle['seconds']} s; "
          f"VmHWM {idle['VmHWM_MiB']:.1f}; RssAnon {idle['RssAnon_MiB']:.1f}, RssFile {idle['RssFile_MiB']:.1f}; "
          f"threads {idle['threads']}")  # fmt: skip
    print(f"CPU {idle['cpu_ms']} ms; context switches: {idle['voluntary_ctxt_switches']} voluntary, "
          f"{idle['nonvoluntary_ctxt_switches']} involuntary  (load {idle['loadavg']})")  # fmt: skip
    print(f"target RSS <= 40 MB: {'MET' if rss['max'] * 1.048576 <= 40 else 'NOT MET'} "
          f"({rss['max'] * 1.048576:.1f} MB)")  # fmt: skip
    strace = result["strace"]
    print(f"\n== strace -f, {strace['seconds']:.0f} s ==")
    print(f"{strace['total_syscalls']} system calls: {strace['syscalls']}")
    print(f"select() returns: {len(strace['select_returns'])} (expected ≈ {strace['expected_wakeups']}: "
          f"watchdog every WatchdogSec/2, recheck every 5 min)")  # fmt: skip
    for w in strace["select_returns"]:
        print(f"  {w['at']} {w['call']} = {w['result']} after {w['slept_s']} s")
    if "after_heal" in result:
        after = result["after_heal"]
        rss = after["VmRSS_MiB"]
        print(f"\n== after one heal ==\nVmRSS {rss['end']:.1f} MiB (max {rss['max']:.1f}); VmHWM "
              f"{after['VmHWM_before_heal_MiB']:.1f} before the heal -> {after['VmHWM_MiB']:.1f}; "
              f"RssAnon {after['RssAnon_MiB']:.1f}, RssFile {after['RssFile_MiB']:.1f}; CPU {after['cpu_ms']} ms "
              f"and {after['voluntary_ctxt_switches']} voluntary switches in {after['seconds']} s")  # fmt: skip
        print(f"target RSS <= 40 MB after a heal: {'MET' if rss['max'] * 1.048576 <= 40 else 'NOT MET'} "
              f"({rss['max'] * 1.048576:.1f} MB)")  # fmt: skip
    print(
        "\n== agent RSS by mapping (MiB), idle"
        + (" / after heal ==" if "smaps_top_after_heal" in result else " ==")
    )
    after_map = dict(result.get("smaps_top_after_heal", []))
    for name, mib in result["smaps_top"]:
        print(
            f"  {name:<44} {mib:7.2f}"
            + (f" {after_map.get(name, float('nan')):7.2f}" if after_map else "")
        )
    print("\n== bare interpreters (VmRSS MiB, median of 3) ==")
    for label, values in result["bare"].items():
        print(f"  {label:<60} {values['VmRSS_MiB']:7.2f}   (HWM {values['VmHWM_MiB']:.2f})")
    print(f"\nload average at the end: {result['machine']['loadavg_end']}")


if __name__ == "__main__":
    sys.exit(main())
