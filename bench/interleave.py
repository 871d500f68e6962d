#!/usr/bin/env python3
"""Wall and CPU time of a few commands, run interleaved: one run of each per round.

On a shared machine the speed drifts over minutes; hyperfine runs all the runs of one
command before the next, so a drift lands on one command alone.  Interleaving puts the
same drift on every command, so their medians can be compared.  Each command must
exit 0 or 1 (`kubecertd --check` on an unhealthy directory is fine).

How busy the machine was: the load average at the end, and the share of both CPUs that
other processes used during the rounds (all CPU time from /proc/stat, less what the
timed commands used).

Usage: bench/interleave.py [--rounds 40] [--warmup 3] [--floor NAME] NAME=COMMAND [...]
Example (BENCHMARKS.md):
    bench/interleave.py --rounds 40 --floor floor \\
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
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Rounds(NamedTuple):
    wall: dict[str, list[float]]  # ms, one per round
    cpu: dict[str, list[float]]  # ms (user + system, from wait4)
    others: float  # share of all CPUs that other processes used during the rounds
    load: float  # 1-minute load average at the end


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


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4], sum(fields[:8])  # less idle, iowait


def run_rounds(commands: dict[str, list[str]], rounds: int, warmup: int) -> Rounds:
    for _ in range(warmup):
        for argv in commands.values():
            run_once(argv)
    wall: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    busy0, total0 = cpu_jiffies()
    for _ in range(rounds):
        for name, argv in commands.items():
            elapsed, used = run_once(argv)
            wall[name].append(elapsed)
            cpu[name].append(used)
    busy1, total1 = cpu_jiffies()
    ours = sum(sum(values) for values in cpu.values()) / 1000 * CLK_TCK
    others = max(0.0, busy1 - busy0 - ours) / max(1, total1 - total0)
    return Rounds(wall, cpu, others, os.getloadavg()[0])


def print_table(result: Rounds, floor: str | None = None) -> None:
    rounds = len(next(iter(result.wall.values())))
    print(
        f"{rounds} interleaved rounds, load {result.load:.2f} at the end; other processes used"
        f" {result.others:.0%} of the CPUs during the rounds"
    )
    width = max(12, *(len(name) for name in result.wall))
    print(
        f"{'command':<{width}} {'wall median':>11} {'p25':>7} {'p75':>7} {'min':>7}"
        f" {'CPU median':>11}" + (f" {'- floor':>8}" if floor else "")
    )
    base = statistics.median(result.wall[floor]) if floor else 0.0
    for name, values in result.wall.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        over = f" {median - base:>8.1f}" if floor and name != floor else ""
        print(
            f"{name:<{width}} {median:>11.1f} {q1:>7.1f} {q3:>7.1f}"
            f" {min(values):>7.1f} {statistics.median(result.cpu[name]):>11.1f}{over}"
        )


def parse_commands(items: list[str], parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    commands = {}
    for item in items:
        name, sep, command = item.partition("=")
        if not sep or not command:
            parser.error(f"{item!r} is not NAME=COMMAND")
        commands[name] = shlex.split(command)
    return commands


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--floor", metavar="NAME", help="also print each median minus this one's")
    parser.add_argument("commands", nargs="+", metavar="NAME=COMMAND")
    args = parser.parse_args()
    commands = parse_commands(args.commands, parser)
    if args.floor is not None and args.floor not in commands:
        parser.error(f"--floor {args.floor}: no command of that name")
    if args.rounds < 2:
        parser.error("--rounds: at least 2")
    print_table(run_rounds(commands, args.rounds, args.warmup), args.floor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
