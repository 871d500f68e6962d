"""CPU per thread of running processes, over a window (BENCHMARKS.md, "Signer load").

    .venv/bin/python bench/thread_cpu.py kubecertd-signer --window 10

Finds every process whose command line contains PATTERN, reads utime+stime of each
of its threads from /proc, waits WINDOW seconds and prints what each thread spent in
between, busiest first.  Run it beside ``bench/signer_load.py`` while a level is being
measured: it splits the signer's CPU between each worker's loop thread and its database
thread, which the load generator's whole-tree figure cannot.
"""

from __future__ import annotations

import argparse
import os
import time

TICK = os.sysconf("SC_CLK_TCK")


def threads(pattern: str) -> dict[tuple[int, int], tuple[str, int]]:
    """(pid, tid) -> (Python thread name or comm, utime + stime in ticks)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as stream:
                command = stream.read().replace(b"\0", b" ").decode(errors="replace")
            if pattern not in command:
                continue
            tids = os.listdir(f"/proc/{entry}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{entry}/task/{tid}/stat") as stream:
                    fields = stream.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            role = "main" if tid == entry else "other"
            found[int(entry), int(tid)] = (role, int(fields[11]) + int(fields[12]))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pattern", help="a substring of the processes' command lines")
    parser.add_argument("--window", type=float, default=10.0, help="seconds to measure")
    args = parser.parse_args()
    before = threads(args.pattern)
    time.sleep(args.window)
    after = threads(args.pattern)
    spent = {
        key: (role, (ticks - before[key][1]) / TICK)
        for key, (role, ticks) in after.items()
        if key in before
    }
    total = sum(seconds for _role, seconds in spent.values()) or 1.0
    print(f"{'pid':>8} {'tid':>8} {'thread':>6} {'CPU s':>7} {'share':>6}")
    for (pid, tid), (role, seconds) in sorted(spent.items(), key=lambda item: -item[1][1]):
        if seconds:
            print(f"{pid:>8} {tid:>8} {role:>6} {seconds:>7.2f} {seconds / total:>6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
