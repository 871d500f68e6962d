#!/usr/bin/env python3
"""Wall and CPU time of a few commands, run interleaved: one run of each per round.

On a shared machine the speed drifts over minutes; hyperfine runs all the runs of one
command before the next, so a drift lands on one command alone.  Interleaving puts the
same drift on every command, so their medians can be compared.  Each command must
exit 0 or 1 (`kubecertd --check` on an unhealthy directory is fine).

Usage: bench/interleave.py [--rounds 40] [--warmup 3] NAME=COMMAND [NAME=COMMAND ...]
Example (BENCHMARKS.md):
    bench/interleave.py --rounds 40 \\
        old="/opt/old/bin/kubecertd --check --config k.toml" \\
        new="/opt/new/bin/kubecertd --check --config k.toml" \\
        floor="/opt/new/bin/python -c 'import cryptography.x509'"
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time


def run_once(argv: list[str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system, from wait4) of one run, in ms."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if child.returncode not in (0, 1):
        sys.exit(f"interleave.py: {shlex.join(argv)} exited {child.returncode}")
    return elapsed * 1000, (usage.ru_utime + usage.ru_stime) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("commands", nargs="+", metavar="NAME=COMMAND")
    args = parser.parse_args()
    commands = {}
    for item in args.commands:
        name, sep, command = item.partition("=")
        if not sep or not command:
            parser.error(f"{item!r} is not NAME=COMMAND")
        commands[name] = shlex.split(command)
    for _ in range(args.warmup):
        for argv in commands.values():
            run_once(argv)
    wall: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, argv in commands.items():
            elapsed, used = run_once(argv)
            wall[name].append(elapsed)
            cpu[name].append(used)
    print(f"{args.rounds} interleaved rounds, load {os.getloadavg()[0]:.2f} at the end")
    print(
        f"{'command':<12} {'wall median':>11} {'p25':>7} {'p75':>7} {'min':>7} {'CPU median':>11}"
    )
    for name, values in wall.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        print(
            f"{name:<12} {statistics.median(values):>11.1f} {q1:>7.1f} {q3:>7.1f}"
            f" {min(values):>7.1f} {statistics.median(cpu[name]):>11.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
