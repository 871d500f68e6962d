#!/usr/bin/env python3
"""Heal latency: ``worker.pem`` deleted -> new pair installed -> kubelet restart job done.

Boots one throwaway node the way the end-to-end tests do (tests/healing_node.py: a real
systemd, journald, the system bus, the real signer on the node's loopback, the
kubelet/API-server stand-ins, the shipped kubecertd.service) with ``[daemon] debounce``
= ``--debounce`` (100ms) and ``[kubelet] settle`` = ``--settle`` (0s: the settle wait
comes after the restart job and is not part of the latency measured here). Then, N
times: wait until the agent is idle (StatusText ``healthy…``, kubelet registered, a
quiet gap), delete ``worker.pem`` on the host side of the bind (the deletion time is
``time.time()`` taken right before ``unlink``), wait for the agent's
``kubelet-restarted`` event, and read the timeline from the journal:

    t0           unlink (host clock == node clock: no time namespace)
    check        the agent's "check (change): unhealthy: cert-missing" event, i.e. the
                 debounce has expired and the diagnosis is taken
    renew-start  renewal begins (SPEC Healing step 1)
    issued       the signer's "issued" event (its own journal entry)
    installed    both files renamed in place, directory fsynced (step 5)
    stopping     systemd: "Stopping kubelet.service" (RestartUnit reached PID 1)
    stopped      systemd: kubelet's old process is gone
    started      systemd: "Started kubelet.service": the restart job is done (JobRemoved)
    restarted    the agent's kubelet-restarted event (after its post-job D-Bus reads)

Timestamps are the journal's _SOURCE_REALTIME_TIMESTAMP (the time the entry reached
journald's socket, µs) where present, else __REALTIME_TIMESTAMP. The configured
debounce is subtracted: "beyond debounce" = what kubecertd and systemd add to the wait
that the operator configured.

Variants, measured in the same run so that they compare: ``--no-witness`` also heals
with the agent restarted without CAP_SYS_ADMIN in its bounding set (a drop-in: no
fanotify group, as on a host without the capability), and ``--agent-src NAME=DIR`` also
with the ``kubecertd`` package of DIR (e.g. ``git archive`` of an older commit) first on
the agent's PYTHONPATH; ``--src DIR`` runs the agent itself (with and without the
witness) from DIR's package the same way, so that what is measured is a commit rather
than this checkout's working tree (the signer runs the venv's). With variants, the runs
of each are split into ``--blocks`` blocks (default 2), taken in turn; every block
restarts the agent and begins with ``--warmup`` heals that are not counted (the first
heal of an agent imports and warms up more).

Every heal must restart kubelet: the node's kubelet stand-in is a Python program, so the
agent cannot ask it ``--version``, and ``[kubelet] restart = "auto"`` restarts when the
version is unknown. A heal whose ``kubelet-restarted`` result is not ``done`` (no
restart, or the hourly budget spent) is reported apart.

Phase 2 (``--trace-runs``, default 10) restarts the agent with bench/agent_trace/
sitecustomize.py on its PYTHONPATH (a drop-in; kubecertd is not edited), which records
spans of the functions a heal goes through (signer round trips down to TCP connect and
TLS handshake, key generation, verification, install and its fsyncs, each D-Bus call)
and logs them as one journal entry per cycle; they give the breakdown.

Usage: .venv/bin/python bench/heal_latency.py [--runs 30] [--trace-runs 10] [--out FILE]
Root only (namespaces). Bounded: every wait has a timeout; the node is always stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _nodebench import (
    AGENT,
    KUBELET,
    HealingNode,
    base_dropin,
    copy_agent_src,
    fmt_header,
    fmt_row,
    healing_node,
    journal_since,
    loadavg,
    machine,
    parse_agent_src,
    renice_node,
    restart_agent,
    restart_unit,
    src_dropin,
    summary,
    wait,
    wait_healthy,
    wait_quiet,
)

SIGNER = "kubecertd-signer.service"
TRACE_DIR = Path(__file__).resolve().parent / "agent_trace"
NODE_TRACE_DIR = "/etc/kubecertd/bench-trace"

# systemd's catalog MESSAGE_IDs (systemd/catalog/systemd.catalog.in)
UNIT_STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"
UNIT_STOPPED = "9d1aaa27d60140bd96365438aad20286"
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"


def parse_duration_ms(text: str) -> float:
    for unit, factor in (("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    raise SystemExit(f"--debounce/--settle: use ms or s, not {text!r}")


# -- one heal ----------------------------------------------------------------------------------


def status(h: HealingNode) -> str:
    return h.node.unit_property(AGENT, "StatusText")


def wait_idle(h: HealingNode, old_kubelet: int, gap: float) -> int:
    """Agent healthy, kubelet (re)started and registered, then a quiet gap; kubelet's PID."""
    wait_healthy(h)
    pid = h.wait_registered(other_than=old_kubelet, timeout=30)
    time.sleep(gap)  # the agent's own-write debounce cycle, kubelet start-up CPU
    if not status(h).startswith("healthy"):
        raise RuntimeError(f"agent not idle after the gap: {status(h)!r}")
    return pid


def heal_once(h: HealingNode, trace: bool) -> dict[str, Any]:
    """Delete worker.pem; the timeline of the heal that follows (µs since the epoch)."""
    cert = h.node.ssl_dir / "worker.pem"
    t_before = time.time()
    cert.unlink()
    t_after = time.time()
    # Cheap host-side polling while the agent works (a journalctl every few ms would
    # compete for the 2 CPUs): the new worker.pem appears, then the restart follows.
    wait(cert.exists, 20, 0.002, "a new worker.pem")
    time.sleep(0.5)

    def restarted() -> list[dict[str, Any]]:
        return journal_since(h.node, t_before, "KUBECERTD_EVENT=kubelet-restarted", unit=AGENT)

    wait(restarted, 20, 0.25, "the agent's kubelet-restarted event")
    t0 = int(t_before * 1e6)
    agent = [e for e in journal_since(h.node, t_before, unit=AGENT) if e["ts"] >= t0]
    kubelet = [e for e in journal_since(h.node, t_before, unit=KUBELET) if e["ts"] >= t0]
    signer = [
        e
        for e in journal_since(h.node, t_before, "KUBECERTD_EVENT=issued", unit=SIGNER)
        if e["ts"] >= t0
    ]

    def first(
        entries: list[dict[str, Any]], after: int | None = None, **match: str
    ) -> dict[str, Any] | None:
        for e in entries:
            if (after is None or e["ts"] >= after) and all(e.get(k) == v for k, v in match.items()):
                return e
        return None

    def ts(e: dict[str, Any] | None) -> int | None:
        return e["ts"] if e else None

    marks: dict[str, Any] = {"t0": t0, "unlink_us": int((t_after - t_before) * 1e6)}
    marks["check"] = ts(first(agent, KUBECERTD_EVENT="check"))
    marks["renew_start"] = ts(first(agent, KUBECERTD_EVENT="renew-start"))
    marks["issued"] = ts(first(signer))
    installed = first(agent, KUBECERTD_EVENT="installed")
    marks["installed"] = ts(installed)
    marks["renewed"] = ts(first(agent, KUBECERTD_EVENT="renewed"))
    after = marks["installed"] or t0
    pid1 = [e for e in kubelet if e.get("_PID") == "1"]
    marks["stopping"] = ts(first(pid1, after, MESSAGE_ID=UNIT_STOPPING))
    marks["stopped"] = ts(first(pid1, after, MESSAGE_ID=UNIT_STOPPED))
    started = first(pid1, after, MESSAGE_ID=UNIT_STARTED)
    marks["started"] = ts(started)
    restarted_event = first(agent, KUBECERTD_EVENT="kubelet-restarted")
    marks["restarted"] = ts(restarted_event)
    marks["restart_result"] = restarted_event.get("KUBECERTD_RESULT") if restarted_event else None
    marks["registered"] = ts(
        next((e for e in kubelet if e.get("_PID") != "1" and e["ts"] >= (marks["started"] or t0)
              and "registered node" in str(e.get("MESSAGE"))), None)
    )  # fmt: skip
    # kubelet's heartbeat (every 2 s) may hit the missing file before the heal: it then
    # exits 1 on its own and systemd schedules a restart. Such runs are flagged: any word
    # from PID 1 about kubelet between the deletion and the install.
    marks["kubelet_crashed"] = any(e["ts"] < after for e in pid1)
    marks["journald_lag_us"] = (installed["rts"] - installed["ts"]) if installed else None
    if trace:
        for key, unit in (("spans", AGENT), ("signer_spans", SIGNER)):
            entries: list[dict[str, Any]] = wait(
                lambda unit=unit: journal_since(h.node, t_before, "BENCH_KIND=spans", unit=unit),
                10, 0.2, f"trace spans of {unit}",
            )  # fmt: skip
            marks[key] = [s for e in entries for s in json.loads(e["BENCH_SPANS"]) if s[1] >= t0]
    return marks


def intervals(m: dict[str, Any], debounce_us: int) -> dict[str, float | None]:
    """The per-run numbers (ms) the report summarises."""

    def d(a: str | int, b: str) -> float | None:
        start = m[a] if isinstance(a, str) else a
        end = m[b]
        return None if start is None or end is None else (end - start) / 1000

    deb = m["t0"] + debounce_us
    return {
        "detection+debounce (t0 -> check)": d("t0", "check"),
        "  of which beyond debounce": d(deb, "check"),
        "debounce -> installed": d(deb, "installed"),
        "  check -> renew-start": d("check", "renew_start"),
        "  renew-start -> signer issued": d("renew_start", "issued"),
        "  signer issued -> installed": d("issued", "installed"),
        "installed -> restart job done": d("installed", "started"),
        "  installed -> systemd Stopping (agent)": d("installed", "stopping"),
        "  Stopping -> Stopped (kubelet exits)": d("stopping", "stopped"),
        "  Stopped -> Started (kubelet forked)": d("stopped", "started"),
        "TOTAL beyond debounce (-> job done)": d(deb, "started"),
        "  agent's share (excl. Stopping->Started)": (
            None
            if None in (m["started"], m["stopping"], m["check"])
            else (m["stopping"] - deb) / 1000
        ),
        "job done -> kubelet-restarted event": d("started", "restarted"),
        "beyond debounce -> kubelet-restarted event": d(deb, "restarted"),
        "job done -> kubelet registered (info)": d("started", "registered"),
    }


# -- the traced agent ---------------------------------------------------------------------------


def enable_trace(h: HealingNode) -> None:
    """Agent and signer restarted with bench/agent_trace/sitecustomize.py (drop-ins)."""
    node = h.node
    node.write_file(
        f"{NODE_TRACE_DIR}/sitecustomize.py", (TRACE_DIR / "sitecustomize.py").read_bytes()
    )
    for unit, mode in ((AGENT, "1"), (SIGNER, "signer")):
        node.write_file(
            f"/etc/systemd/system/{unit}.d/bench-trace.conf",
            f"[Service]\nEnvironment=PYTHONPATH={NODE_TRACE_DIR} KUBECERTD_BENCH_TRACE={mode}\n",
        )
    node.systemctl("daemon-reload", check=True)
    for unit in (SIGNER, AGENT):
        restart_unit(node, unit)
    wait_healthy(h, "the traced agent healthy")
    for unit, mode in ((AGENT, "1"), (SIGNER, "signer")):
        env = node.unit_property(unit, "Environment")
        if f"KUBECERTD_BENCH_TRACE={mode}" not in env:
            raise RuntimeError(f"the drop-in of {unit} did not apply: Environment={env!r}")


PerName = dict[str, dict[str, list[float]]]


def add_run(
    spans: list[Any], origin: float, per_name: PerName, offsets: dict[str, list[float]]
) -> None:
    """One run's spans, summed per name (wall ms, calls, CPU ms, depth) into ``per_name``;
    each name's start after ``origin`` into ``offsets`` (for the order of the rows)."""
    sums: dict[str, list[float]] = {}
    for name, start, wall, cpu, depth in spans:
        acc = sums.setdefault(name, [0.0, 0, 0.0, depth, start - origin])
        acc[0] += wall / 1000
        acc[1] += 1
        acc[2] += cpu / 1000
    for name, (wall, count, cpu, depth, offset) in sums.items():
        per_name[name]["wall"].append(wall)
        per_name[name]["count"].append(count)
        per_name[name]["cpu"].append(cpu)
        per_name[name]["depth"].append(depth)
        offsets[name].append(offset + depth * 1e-3)  # a parent before its first child


def in_start_order(offsets: dict[str, list[float]]) -> list[str]:
    return sorted(offsets, key=lambda n: sorted(offsets[n])[len(offsets[n]) // 2])


def signer_breakdown(runs: list[dict[str, Any]]) -> tuple[list[str], PerName]:
    """The signer's spans per heal (GET /v1/ca + POST /v1/sign), summed per name; names in
    the order they start."""
    offsets: dict[str, list[float]] = defaultdict(list)
    per_name: PerName = defaultdict(lambda: defaultdict(list))
    for run in runs:
        add_run(run.get("signer_spans", []), run["t0"], per_name, offsets)
    return in_start_order(offsets), per_name


def print_spans(
    title: str, order: list[str], per_name: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    print(f"\n== {title} ==")
    print(f"{'span (indent = nesting)':<52} {'wall med':>8} {'p90':>7} {'calls':>5} {'cpu med':>8}")
    rows = {}
    for name in order:
        data = per_name.get(name)
        if not data:
            continue
        wall = summary(data["wall"])
        calls = summary(data["count"]) if data.get("count") else {"median": float("nan")}
        cpu = summary(data["cpu"]) if data.get("cpu") else {"median": float("nan")}
        depth = int(summary(data["depth"])["median"]) if data.get("depth") else 0
        rows[name] = {"wall": wall, "calls": calls, "cpu": cpu, "depth": depth}
        print(f"{'  ' * depth + name:<52} {wall['median']:8.2f} {wall['p90']:7.2f} "
              f"{calls['median']:5.0f} {cpu['median']:8.2f}")  # fmt: skip
    return rows


def span_breakdown(runs: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Per span name: per-run total wall ms, calls per run, CPU ms, nesting depth; names in
    the order they start within the heal cycle."""
    offsets: dict[str, list[float]] = defaultdict(list)
    per_name: PerName = defaultdict(lambda: defaultdict(list))
    for run in runs:
        spans = run["spans"]
        # The heal cycle: the "Daemon.cycle:change" span that contains Healer.heal.
        heals = [s for s in spans if s[0] == "Healer.heal"]
        heal_cycle = next(
            (
                c
                for c in spans
                if c[0] == "Daemon.cycle:change" and any(c[1] <= s[1] <= c[1] + c[2] for s in heals)
            ),
            None,
        )
        if heal_cycle is None:
            continue
        lo, hi = heal_cycle[1], heal_cycle[1] + heal_cycle[2]
        add_run([s for s in spans if lo <= s[1] <= hi], lo, per_name, offsets)
        # the witness: its events are read (and their actors captured) before inotify's
        witnessed = [s for s in spans if s[0] == "Daemon._on_witness" and run["t0"] <= s[1] < lo]
        if witnessed:
            per_name["(Daemon._on_witness between t0 and the cycle)"]["wall"].append(
                sum(s[2] for s in witnessed) / 1000
            )
        # detection: the inotify read after the unlink, then the debounce timer
        changes = [s for s in spans if s[0] == "Daemon._on_changes" and run["t0"] <= s[1] < lo]
        if changes:
            per_name["(t0 -> inotify event read)"]["wall"].append(
                (changes[0][1] - run["t0"]) / 1000
            )
            last = changes[-1]
            per_name["(last inotify read -> cycle start: the debounce)"]["wall"].append(
                (lo - (last[1] + last[2])) / 1000
            )
    return in_start_order(offsets), per_name


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30, help="measured heals (default 30)")
    parser.add_argument(
        "--trace-runs", type=int, default=10, help="heals with the traced agent (0: skip)"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="heals before each phase, not counted"
    )
    parser.add_argument("--debounce", default="100ms")
    parser.add_argument("--settle", default="0s")
    parser.add_argument("--gap", type=float, default=1.5, help="quiet seconds between heals")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.5,
        help="before each heal, wait for a 0.5 s window with at most this share of the "
        "machine's CPU busy (default 0.5; the machine may be shared) ...",
    )
    parser.add_argument(
        "--quiet-timeout", type=float, default=20.0, help="... but at most this long (s)"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=None,
        help="renice every process of the node (systemd, so restarted units too) to this "
        "value, e.g. -10, so that other tenants of a shared machine get less in the way",
    )
    parser.add_argument(
        "--no-witness",
        action="store_true",
        help="also heal with the agent restarted without CAP_SYS_ADMIN (no fanotify witness)",
    )
    parser.add_argument(
        "--agent-src",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also heal with the kubecertd package of DIR (e.g. git archive of an older "
        "commit) under the shipped unit; repeatable",
    )
    parser.add_argument(
        "--src",
        type=Path,
        help="the directory of the kubecertd package that the agent runs, with and without "
        "the witness (e.g. git archive of HEAD; default: the venv's, i.e. this checkout's "
        "working tree); the signer runs the venv's",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="with variants: each variant's runs in this many blocks, taken in turn (default 2)",
    )
    parser.add_argument(
        "--out", type=Path, help="write every run's timeline and the summary as JSON"
    )
    args = parser.parse_args()
    if args.runs < 1 or args.runs > 500 or args.trace_runs < 0 or args.trace_runs > 200:
        parser.error("--runs 1..500, --trace-runs 0..200")
    debounce_us = int(parse_duration_ms(args.debounce) * 1000)
    agent_src = parse_agent_src(args.agent_src)
    if args.src and not (args.src / "kubecertd" / "__init__.py").is_file():
        parser.error(f"--src {args.src}: no kubecertd package there")
    if args.src and args.trace_runs:
        parser.error("--src: the traced phase runs the venv's package; use --trace-runs 0")
    variants: list[tuple[str, str | None]] = [("plain", base_dropin(args.src))]
    if args.no_witness:
        variants.append(("plain, no witness", base_dropin(args.src, no_witness=True)))
    variants += [(f"plain, {name}", src_dropin(name)) for name, _ in agent_src]
    blocks = args.blocks or (2 if len(variants) > 1 else 1)
    if not 1 <= blocks <= args.runs:
        parser.error("--blocks 1..--runs")
    sizes = [args.runs // blocks + (1 if i < args.runs % blocks else 0) for i in range(blocks)]
    # (phase, drop-in, heals counted, restart the agent first)
    restart = len(variants) > 1 or args.src is not None
    schedule = [(name, dropin, size, restart) for size in sizes for name, dropin in variants]
    heals = (args.runs + blocks * args.warmup) * len(variants) + args.trace_runs + args.warmup
    budget = heals + 10

    info = machine()
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu']}, load average {info['loadavg']} (at start)"
    )
    print(f"debounce {args.debounce}, settle {args.settle}, {args.runs} runs (+{args.warmup} warm-up) "
          f"of {', '.join(name for name, _ in variants)} in {blocks} block(s), "
          f"{args.trace_runs} traced runs", flush=True)  # fmt: skip
    result: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    started = time.monotonic()
    with healing_node(settle=args.settle, debounce=args.debounce, max_restarts=budget) as h:
        print(f"node up in {time.monotonic() - started:.1f} s", flush=True)
        if args.nice is not None:
            threads = renice_node(h.node, args.nice)
            print(f"reniced {threads} threads of the node to {args.nice}", flush=True)
        copy_agent_src(h.node, agent_src + ([("src", args.src)] if args.src else []))
        kubelet = wait_idle(h, 0, args.gap)
        phases = [
            (name, count, False, dropin, restart) for name, dropin, count, restart in schedule
        ]
        if args.trace_runs:
            phases.append(("traced", args.trace_runs, True, None, False))
        for phase, count, trace, dropin, restart in phases:
            if trace:
                if len(variants) > 1:
                    restart_agent(h, None)  # the shipped unit, then the trace drop-ins
                enable_trace(h)
                kubelet = wait_idle(h, 0, args.gap)
            elif restart:
                print(f"{phase}: the agent restarted with its drop-in", flush=True)
                restart_agent(h, dropin)
                kubelet = wait_idle(h, 0, args.gap)
            runs = []
            for i in range(args.warmup + count):
                busy = wait_quiet(args.quiet, args.quiet_timeout)
                marks = heal_once(h, trace)
                marks["busy_before"] = round(busy, 3)
                kubelet = wait_idle(h, kubelet, args.gap)
                if i < args.warmup:
                    continue
                marks["loadavg"] = loadavg()
                runs.append(marks)
                total = intervals(marks, debounce_us)["TOTAL beyond debounce (-> job done)"]
                print(f"  {phase} run {len(runs):2d}: beyond debounce -> job done "
                      f"{total if total is None else round(total, 1)} ms, machine {busy:.0%} busy before"
                      f"{' (kubelet had crashed on its own)' if marks['kubelet_crashed'] else ''}"
                      f"  load {marks['loadavg']}", flush=True)  # fmt: skip
            result.setdefault(phase, []).extend(runs)
    result["machine"]["loadavg_end"] = loadavg()

    names = [name for name, _ in variants] + ["traced"]
    for phase in names:
        runs = result.get(phase)
        if not runs:
            continue
        per_run = [intervals(m, debounce_us) for m in runs]
        results = Counter(str(m["restart_result"]) for m in runs)
        if set(results) != {"done"}:
            print(f"\n   {phase}: kubelet-restarted results {dict(results)}: only 'done' is a restart; "
                  "the others have no restart job and are left out")  # fmt: skip
        clean = [
            r
            for r, m in zip(per_run, runs, strict=True)
            if not m["kubelet_crashed"] and m["restart_result"] in ("done", None)
        ]
        crashed = [
            r["TOTAL beyond debounce (-> job done)"]
            for r, m in zip(per_run, runs, strict=True)
            if m["kubelet_crashed"]
        ]
        print(f"\n== {phase}: {len(clean)} heals with kubelet running (debounce {args.debounce} "
              f"subtracted) ==")  # fmt: skip
        if crashed:
            print(f"   left out: {len(crashed)} heal(s) where kubelet's heartbeat had hit the missing file "
                  f"and it had exited before the restart (no stop to wait for): totals "
                  f"{[round(t, 1) for t in crashed if t is not None]} ms")  # fmt: skip
        print(fmt_header(46))
        table = {}
        for key in per_run[0]:
            stats = summary([r[key] for r in clean if r[key] is not None])
            table[key] = stats
            print(fmt_row(key, stats, 46))
        result[f"{phase}_summary"] = table
        key = "TOTAL beyond debounce (-> job done)"
        quiet_runs = [
            r[key]
            for r, m in zip(per_run, runs, strict=True)
            if not m["kubelet_crashed"] and m["busy_before"] <= args.quiet and r[key] is not None
        ]
        table["TOTAL, quiet runs only"] = summary(quiet_runs)
        print(fmt_row(f"TOTAL, runs <= {args.quiet:.0%} busy before", summary(quiet_runs), 46))
        busy = [m["busy_before"] * 100 for m in runs]
        print(fmt_row("(machine CPU busy % just before each heal)", summary(busy), 46))
        print(
            fmt_row(
                "(unlink() duration, in t0 -> check)",
                summary([m["unlink_us"] / 1000 for m in runs]),
                46,
            )
        )
        lags = [m["journald_lag_us"] / 1000 for m in runs if m["journald_lag_us"] is not None]
        print(fmt_row("(journald receive lag, installed entry)", summary(lags), 46))
        met = table["TOTAL beyond debounce (-> job done)"].get("median", float("inf")) <= 100
        print(f"target median <= 100 ms beyond debounce: {'MET' if met else 'NOT MET'}")

    if len(variants) > 1:
        print(f"\n== side by side: the same node, {blocks} block(s) per variant, in turn ==")
        print(fmt_header(46))
        for key in (
            "TOTAL beyond debounce (-> job done)",
            "debounce -> installed",
            "  installed -> systemd Stopping (agent)",
            "  agent's share (excl. Stopping->Started)",
            "installed -> restart job done",
        ):
            print(key.strip())
            for name, _ in variants:
                print(fmt_row(f"  {name}", result.get(f"{name}_summary", {}).get(key, {}), 46))

    traced = result.get("traced")
    if traced:
        order, per_name = span_breakdown(traced)
        head = [
            "(t0 -> inotify event read)",
            "(Daemon._on_witness between t0 and the cycle)",
            "(last inotify read -> cycle start: the debounce)",
        ]
        result["traced_spans"] = print_spans(
            "where the heal cycle's time goes (traced agent; per heal: wall ms, calls, CPU ms)",
            head + order, per_name,
        )  # fmt: skip
        signer_order, signer = signer_breakdown(traced)
        result["traced_signer_spans"] = print_spans(
            "the signer's side of the same heals (GET /v1/ca + POST /v1/sign; after the TLS handshake)",
            signer_order, signer,
        )  # fmt: skip
    print(f"\nload average at the end: {result['machine']['loadavg_end']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
