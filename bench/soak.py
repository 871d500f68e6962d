#!/usr/bin/env python3
"""Soak: the running agent heals ``--heals`` times in a row (1,000) and must not grow.

Boots one throwaway node the way the end-to-end tests do (tests/healing_node.py: a real
systemd, journald, the system bus, the real signer on the node's loopback, the
kubelet/API-server stand-ins, the shipped kubecertd.service), with the agent's kubelet
restart budget (``[kubelet] max_restarts_per_hour``) and the signer's
``max_issuances_per_node_per_hour`` raised above the number of heals. Then, heal after
heal: delete ``worker.pem`` (odd heals) or ``worker-key.pem`` (even heals) on the host
side of the bind, wait (bounded) until the pair on disk has changed and the agent
reports ``healthy`` again with kubelet restarted, and go on at once.

After heal 10 and after every 100th heal (and the last), with the agent idle, it reads
the agent's MainPID on the host: VmRSS and RssAnon (/proc/PID/status), malloc's [heap]
(smaps), PSS (smaps_rollup), open files (/proc/PID/fd), threads (/proc/PID/task), plus the backup
folders under ``/etc/kubernetes/ssl/.kubecertd-backup`` (SPEC "Files on disk") and the
renewals the agent counts (``kubecertd_renewals_total`` in its metrics textfile; the
node's volatile journal keeps only the last few hundred heals' events).

Goal (PASS/FAIL, exit status 1 on FAIL): VmRSS after the last heal at most 1 MiB above
VmRSS after heal 10; no more open files or threads than after heal 10; never more
backup folders than ``[daemon] backups``; one successful renewal per heal; the agent's
MainPID the same throughout.

``--tracemalloc`` finds what grows: the agent restarted with a sitecustomize
(TRACEMALLOC_SITE below, on its PYTHONPATH by a drop-in; kubecertd is not edited) that
starts tracemalloc and, on SIGUSR2, dumps a snapshot after a gc.collect(); one at every checkpoint,
and the allocations that grew from the first to the last are printed. Tracing costs
memory of its own: its RSS figures are no verdict.

Usage: .venv/bin/python bench/soak.py [--heals 1000] [--tracemalloc] [--out FILE]
Root only (namespaces). Bounded: every wait has a timeout; the node is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _nodebench import (
    AGENT,
    HealingNode,
    healing_node,
    loadavg,
    machine,
    restart_agent,
    wait,
    wait_healthy,
)
from idle import host_pid, open_files, sample, smaps_by_mapping, smaps_rollup

from kubecertd.config import load_config

SLACK_MIB = 1.0  # the goal: VmRSS after the last heal <= VmRSS after heal 10 + this
BACKUP_DIR = ".kubecertd-backup"
TEXTFILE = "/var/lib/node_exporter/textfile_collector/kubecertd.prom"  # AGENT_CONFIG's
SITE_DIR = "/etc/kubecertd/bench-soak"  # the unit's PrivateTmp hides /tmp
SNAPSHOTS = "/var/lib/kubecertd/soak-heap"  # the StateDirectory: writable for the agent
TRACEMALLOC_SITE = f"""\
import gc, os, signal, tracemalloc
if os.environ.get("KUBECERTD_SOAK_TRACEMALLOC"):
    tracemalloc.start(25)
    _taken = [0]

    def _dump(signum, frame):
        _taken[0] += 1
        os.makedirs("{SNAPSHOTS}", exist_ok=True)
        path = "{SNAPSHOTS}/%d.snap" % _taken[0]
        gc.collect()  # what remains is held, not garbage that a collection would free
        tracemalloc.take_snapshot().dump(path + ".tmp")
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR2, _dump)
"""


def checkpoints(heals: int) -> list[int]:
    """Heal 10, every 100th, and the last."""
    return sorted({n for n in (10, *range(100, heals + 1, 100), heals) if n <= heals})


def heal_once(h: HealingNode, number: int, timeout: float) -> float:
    """Delete one file of the pair; wait until the agent has healed and restarted
    kubelet, and reports healthy; the seconds it took."""
    cert, key = h.node.ssl_dir / "worker.pem", h.node.ssl_dir / "worker-key.pem"
    old = cert.read_bytes(), key.read_bytes()
    kubelet = h.kubelet_pid()
    started = time.monotonic()
    (cert if number % 2 else key).unlink()

    def changed() -> bool:  # cheap host-side reads while the agent works
        try:
            new = cert.read_bytes(), key.read_bytes()
        except FileNotFoundError:
            return False
        return new[0] != old[0] and new[1] != old[1]

    wait(changed, timeout, 0.02, f"heal {number}: a new pair on disk")

    def done() -> bool:
        pid = h.kubelet_pid()
        return pid not in (0, kubelet) and h.node.unit_property(AGENT, "StatusText").startswith(
            "healthy"
        )

    wait(done, timeout, 0.1, f"heal {number}: kubelet restarted and the agent healthy")
    return time.monotonic() - started


def backup_folders(h: HealingNode) -> int:
    folder = h.node.ssl_dir / BACKUP_DIR
    return sum(1 for entry in folder.iterdir() if entry.is_dir()) if folder.is_dir() else 0


def enable_tracemalloc(h: HealingNode) -> None:
    """The agent restarted with TRACEMALLOC_SITE (a drop-in)."""
    h.node.write_file(f"{SITE_DIR}/sitecustomize.py", TRACEMALLOC_SITE)
    restart_agent(h, f"[Service]\nEnvironment=PYTHONPATH={SITE_DIR} KUBECERTD_SOAK_TRACEMALLOC=1\n")


def snapshot(h: HealingNode, number: int) -> tracemalloc.Snapshot:
    """Snapshot ``number`` (1, 2, ...) of the traced agent's heap, asked for by SIGUSR2."""
    h.node.systemctl("kill", "--kill-who=main", "-s", "USR2", AGENT, check=True)
    path = h.node.path(f"{SNAPSHOTS}/{number}.snap")
    wait(path.exists, 60, 0.2, f"the agent's heap snapshot {number}")
    return tracemalloc.Snapshot.load(str(path))


def print_growth(snapshots: list[tracemalloc.Snapshot], rows: list[dict[str, Any]]) -> None:
    """The traced heap at each checkpoint; what grew between the first and the last
    snapshot: by line, then the largest by traceback."""
    print("\n== tracemalloc: live Python allocations after gc.collect(), MiB ==")
    for row, snap in zip(rows, snapshots, strict=False):
        total = sum(stat.size for stat in snap.statistics("filename")) / 2**20
        print(f"  after heal {row['heal']:>5}: {total:.3f}")
    first, last = snapshots[0], snapshots[-1]
    print("\n== tracemalloc: grown from the first checkpoint to the last, by line ==")
    for stat in last.compare_to(first, "lineno")[:15]:
        print(f"  {stat}")
    print("== the 3 largest by traceback ==")
    for stat in last.compare_to(first, "traceback")[:3]:
        print(f"  {stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks")
        for line in stat.traceback.format()[-12:]:
            print(f"    {line}")


def renewals(h: HealingNode) -> int:
    """The agent's count of successful renewals, from its metrics textfile."""
    text = h.node.read_file(TEXTFILE).decode()
    found = re.search(r'^kubecertd_renewals_total\{result="success"\} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else -1


def measure(h: HealingNode, pid: int, heal: int, seconds: list[float]) -> dict[str, Any]:
    """The agent's footprint after ``heal`` heals, once it is idle."""
    time.sleep(1.0)  # the cycle for the agent's own renames (debounce) is over
    wait_healthy(h)
    status = sample(pid)
    window = seconds[-100:]
    return {
        "heal": heal,
        "VmRSS_MiB": round(status["VmRSS"], 2),
        "RssAnon_MiB": round(status["RssAnon"], 2),
        "heap_MiB": dict(smaps_by_mapping(pid, top=100)).get("[heap]", 0.0),  # malloc's brk
        "Pss_MiB": round(smaps_rollup(pid).get("Pss", float("nan")), 2),
        "fds": sum(open_files(pid).values()),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "backups": backup_folders(h),
        "renewed": renewals(h),
        "heal_s_median": round(sorted(window)[len(window) // 2], 3) if window else None,
        "loadavg": loadavg(),
    }


def verdict(rows: list[dict[str, Any]], heals: int, backups: int, pid_kept: bool) -> list[str]:
    """What fails the goal ([] when it is met)."""
    first, last = rows[0], rows[-1]
    problems = []
    if last["VmRSS_MiB"] > first["VmRSS_MiB"] + SLACK_MIB:
        problems.append(
            f"VmRSS {last['VmRSS_MiB']:.2f} MiB after heal {last['heal']} > "
            f"{first['VmRSS_MiB']:.2f} + {SLACK_MIB} MiB after heal {first['heal']}"
        )
    for key in ("fds", "threads"):
        if last[key] > first[key]:
            problems.append(f"{key}: {first[key]} after heal {first['heal']}, {last[key]} now")
    if any(row["backups"] > backups for row in rows):
        problems.append(f"more backup folders than backups = {backups}")
    if last["renewed"] != heals:
        problems.append(f"{last['renewed']} successful renewals for {heals} heals")
    if not pid_kept:
        problems.append("the agent's MainPID changed during the soak")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heals", type=int, default=1000, help="heals in a row (default 1000)")
    parser.add_argument("--debounce", default="100ms", help="[daemon] debounce (default 100ms)")
    parser.add_argument("--settle", default="0s", help="[kubelet] settle (default 0s)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds one heal may take (default 60)"
    )
    parser.add_argument(
        "--tracemalloc", action="store_true", help="trace the agent's heap (see above)"
    )
    parser.add_argument("--out", type=Path, help="write the samples as JSON")
    args = parser.parse_args()
    if not 10 <= args.heals <= 5000:
        parser.error("--heals 10..5000")
    marks = checkpoints(args.heals)
    budget = args.heals + 20  # heals, and a margin for the start-up's own

    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}, load average {info['loadavg']} "
          f"(at start); {args.heals} heals, debounce {args.debounce}, settle {args.settle}",
          flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    seconds: list[float] = []
    started = time.monotonic()
    with healing_node(
        settle=args.settle, debounce=args.debounce, max_restarts=budget, max_issuances=budget
    ) as h:
        wait_healthy(h)
        h.wait_registered()
        if args.tracemalloc:
            enable_tracemalloc(h)
        snapshots: list[tracemalloc.Snapshot] = []
        config_path = "/etc/kubecertd/kubecertd.toml"
        text = h.node.read_file(config_path).decode()
        backups = load_config(text, config_path, h.node.hostname).daemon.backups
        node_pid = int(h.node.unit_property(AGENT, "MainPID"))
        pid = host_pid(h, node_pid)
        print(f"node up in {time.monotonic() - started:.1f} s; agent: node PID {node_pid}, "
              f"host PID {pid}; backups = {backups}", flush=True)  # fmt: skip
        header = (
            f"{'heal':>6} {'VmRSS MiB':>10} {'RssAnon':>8} {'[heap]':>7} {'Pss':>7} {'fds':>4} "
            f"{'threads':>7} {'backups':>7} {'renewed':>7} {'heal s':>7}  load"
        )
        print(header, flush=True)
        soak_started = time.monotonic()
        for number in range(1, args.heals + 1):
            seconds.append(heal_once(h, number, args.timeout))
            if number in marks:
                row = measure(h, pid, number, seconds)
                rows.append(row)
                if args.tracemalloc:
                    snapshots.append(snapshot(h, len(snapshots) + 1))
                print(f"{row['heal']:>6} {row['VmRSS_MiB']:>10.2f} {row['RssAnon_MiB']:>8.2f} "
                      f"{row['heap_MiB']:>7.2f} {row['Pss_MiB']:>7.2f} {row['fds']:>4} {row['threads']:>7} "
                      f"{row['backups']:>7} {row['renewed']:>7} {row['heal_s_median']:>7.3f}  "
                      f"{row['loadavg']}", flush=True)  # fmt: skip
        soak_s = time.monotonic() - soak_started
        pid_kept = int(h.node.unit_property(AGENT, "MainPID")) == node_pid
        restarts = h.node.unit_property(AGENT, "NRestarts")

    if len(snapshots) > 1:
        print_growth(snapshots, rows)
    problems = verdict(rows, args.heals, backups, pid_kept)
    first, last = rows[0], rows[-1]
    print(f"\n{args.heals} heals in {soak_s:.0f} s ({soak_s / args.heals:.2f} s each; "
          f"median heal {sorted(seconds)[len(seconds) // 2]:.3f} s); agent NRestarts {restarts}")  # fmt: skip
    print(f"VmRSS {first['VmRSS_MiB']:.2f} MiB after heal {first['heal']} -> "
          f"{last['VmRSS_MiB']:.2f} after heal {last['heal']} "
          f"({last['VmRSS_MiB'] - first['VmRSS_MiB']:+.2f}; goal <= +{SLACK_MIB}); "
          f"fds {first['fds']} -> {last['fds']}; threads {first['threads']} -> {last['threads']}; "
          f"backup folders at most {max(r['backups'] for r in rows)} (backups = {backups})")  # fmt: skip
    print(f"load average at the end: {loadavg()}")
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    if args.out:
        result = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                  "backups": backups, "rows": rows, "heal_seconds": seconds,
                  "problems": problems}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
