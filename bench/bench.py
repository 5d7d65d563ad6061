"""`make bench`: measured figures, printed as a Markdown table and written to bench/results.md.

A benchmark, not a test: it asserts nothing, and states the machine it ran on. Each figure
is the best of REPEATS runs (the least disturbed by the rest of the machine).

Everything runs in ONE invocation on the same machine, so that every ratio compares figures
taken side by side: dispatch overhead of taskpool (Executor and CLI) against PPE,
multiprocessing.Pool, loky and pebble (optional: `pip install -e '.[bench]'`), with the
two limits (a posix_ipc ping-pong, an in-process Executor); a CPU-bound batch's makespan
(against the machine's own: plain forked processes, no pool);
crash-recovery latency over 200 kills; start-up, memory a worker and queue bytes of 64 and
512 workers, and recovery at 512 (scale.py); the makespan of
typed pools on sleep workloads; the per-job overhead of the two engines of `taskpool run`
(local and, with the dask extra, Dask) on no-op and fib jobs; what watching a run on a
terminal costs; 2,000 `true` commands through `taskpool run --cmd` against xargs -P and GNU
parallel. The measurements are in peers.py, scale.py, engines.py, terminal.py and
commands.py.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
JOBS = 20_000
REPEATS = 3
ROUNDS = 5  # of the dispatch measurements, each pool once a round
BULK_ITEMS = 1_000_000  # through map: Executor.map against multiprocessing.Pool.map
KILLS = 200
SCALE_WORKERS = [64, 512]  # CLI runs measured by scale.py
SCALE_EXECUTOR_WORKERS = [8, 256]
SCALE_KILLS = 50  # at the largest of SCALE_WORKERS
COMMANDS = 2000


def cli_jobs_per_second(workdir: Path, journal: bool) -> tuple[float, float]:
    """Jobs/s of the whole command, and of the run alone (its Summary line's wall time: from
    the fork of the pool to the end, without the interpreter's start-up and the file's
    parse, as the peers' figures are taken with their pools up)."""
    jobs = workdir / "jobs.txt"
    jobs.write_text("sleep 0\n" * JOBS)
    best = best_run = 0.0
    for attempt in range(REPEATS):
        log = workdir / "run.log"
        args = [sys.executable, "-m", "taskpool", "run", "--workers", "2", "--jobs", str(jobs),
                "--log", str(log), "--results", str(workdir / "r.jsonl")]
        if journal:
            db = workdir / f"run{attempt}.db"
            args += ["--journal", str(db)]
        started = time.perf_counter()
        subprocess.run(args, cwd=ROOT, check=True, stdin=subprocess.DEVNULL)
        best = max(best, JOBS / (time.perf_counter() - started))
        run_time = float(log.read_text().rsplit("wall time ", 1)[1].split()[0])
        best_run = max(best_run, JOBS / run_time)
    return best, best_run


# Seed 000's pools: 1, 3, 1, 1 and 1 workers for types 1..5.
POOLS = [1, 3, 1, 1, 1]


def equal_jobs_workload() -> list[tuple[int, float]]:
    """Per type, n equal jobs: the ideal makespan is exact, ceil(n / workers) x duration."""
    return ([(1, 0.5)] * 4 + [(2, 0.5)] * 12 + [(3, 1.0)] * 2 + [(4, 0.25)] * 8
            + [(5, 2.0)])


def random_workload() -> list[tuple[int, float]]:
    rng = random.Random(7)
    return [(rng.randint(1, 5), round(rng.uniform(0, 0.2), 3)) for _ in range(300)]


def ideal_makespan(jobs: list[tuple[int, float]], exact: bool) -> float:
    """The exact optimum for equal jobs per type; otherwise a lower bound on it (no pool
    can beat its total work spread over its workers, nor its longest job)."""
    best = 0.0
    for number, workers in enumerate(POOLS, start=1):
        durations = [d for t, d in jobs if t == number]
        if not durations:
            continue
        if exact:
            best = max(best, math.ceil(len(durations) / workers) * durations[0])
        else:
            best = max(best, sum(durations) / workers, max(durations))
    return best


def dispatch_makespan(workdir: Path, jobs: list[tuple[int, float]]) -> float:
    """The run's own wall time (its Summary line: from the fork of the pool to its end), best of
    REPEATS."""
    path = workdir / "typed.txt"
    path.write_text("".join(f"{t} {d}\n" for t, d in jobs))
    best = math.inf
    for _ in range(REPEATS):
        log = workdir / "typed.log"
        subprocess.run([sys.executable, "-m", "taskpool", "dispatch", *map(str, POOLS),
                        "--jobs", str(path), "--log", str(log)],
                       cwd=ROOT, check=True, stdin=subprocess.DEVNULL)
        found = re.search(r"wall time ([\d.]+) s", log.read_text())
        assert found is not None
        best = min(best, float(found.group(1)))
    return best


def recovery_table(recovery: Any) -> str:
    """peers.recovery_latency's times (a 2-worker run) as bench/results.md shows them."""
    import peers

    def row(label: str, seconds: list[float]) -> str:
        ms = [1000 * v for v in seconds]
        return (f"| {label} | {statistics.median(ms):.2f} ms | {min(ms):.2f}-{max(ms):.2f} ms "
                f"| {peers.percentile(ms, 0.99):.2f} ms |")

    return "\n".join([
        f"Crash recovery: {len(recovery.to_resend)} SIGKILLs of a busy worker of a 2-worker "
        "CLI run; from the kill to its death seen by the Dealer, to its job sent again, and "
        "to the replacement worker up. Target: kill -> job re-sent, median under 5 ms.",
        "",
        "| | median | range | p99 |",
        "| --- | ---: | ---: | ---: |",
        row("kill -> death seen", recovery.to_death_seen),
        row("kill -> job re-sent", recovery.to_resend),
        row("kill -> replacement up", recovery.to_replacement),
    ])


def main() -> None:
    import commands
    import dask_cluster
    import engines
    import peers
    import scale
    import terminal

    n = JOBS
    fib_n, fib_count = 27, 40
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        print("dispatch overhead...", file=sys.stderr)
        # The Executor, the floor and the peers, measured in turn, round after round: a
        # disturbance of the machine falls on all of them alike, and each keeps its best.
        rounds: dict[str, Callable[[], float]] = {
            "floor": lambda: peers.executor_rate(peers.InlineExecutor, n, 1),
            "floor10k": lambda: peers.executor_rate(peers.InlineExecutor, 10_000, 1),
            "executor": lambda: peers.executor_rate(peers.taskpool_executor, n, 1),
            "executor10k": lambda: peers.executor_rate(peers.taskpool_executor, 10_000, 1),
            "ppe": lambda: peers.executor_rate(peers.ppe, n, 1),
            "mp": lambda: peers.mp_pool_rate(n, 1),
        }
        for name, make in (("loky", peers.loky_executor), ("pebble", peers.pebble_executor)):
            try:
                __import__(name)
            except ImportError:
                continue  # optional: `pip install -e '.[bench]'`
            rounds[name] = lambda make=make: peers.executor_rate(make, n, 1)
        rates: dict[str, float] = dict.fromkeys(rounds, 0.0)
        # Per round, the Executor against the floor and mp.Pool of that round, measured a
        # few seconds apart: the machine drifts less within a round than across rounds.
        paired: dict[str, list[float]] = {"floor": [], "mp": []}
        for _ in range(ROUNDS):
            this_round = {name: measure() for name, measure in rounds.items()}
            for name, rate in this_round.items():
                rates[name] = max(rates[name], rate)
            paired["floor"].append(this_round["executor10k"] / this_round["floor10k"])
            paired["mp"].append(this_round["executor10k"] / this_round["mp"])
        rates["cli"], rates["cli_run"] = cli_jobs_per_second(workdir, journal=False)
        rates["cli_journal"], _ = cli_jobs_per_second(workdir, journal=True)
        rates["ping_pong"] = peers.ping_pong_rate(n, REPEATS)
        print("bulk map...", file=sys.stderr)
        bulk = peers.bulk_map_rates(BULK_ITEMS, ROUNDS)
        print("fib batch...", file=sys.stderr)
        # In turn, round after round, best of ROUNDS each, as the dispatch figures: this
        # machine's speed drifts by a third over seconds (fib(27) alone: 22-33 ms), and a
        # sequential time taken in a fast moment against pools timed in a slow one (or the
        # reverse) would say more of the machine than of the pools.
        fib_runs: dict[str, Callable[[], float]] = {
            "sequential": lambda: peers.sequential_fib(fib_n, fib_count, 1),
            "forked": lambda: peers.forked_fib(fib_n, fib_count),
            "cli": lambda: peers.cli_fib_makespan(workdir, fib_count, fib_n, 1),
            "executor": lambda: peers.fib_makespan(peers.taskpool_executor, fib_count, fib_n, 1),
            "ppe": lambda: peers.fib_makespan(peers.ppe, fib_count, fib_n, 1),
        }
        fib_best = dict.fromkeys(fib_runs, float("inf"))
        for _ in range(ROUNDS):
            for name, run in fib_runs.items():
                fib_best[name] = min(fib_best[name], run())
        ideal = fib_best["sequential"] / 2
        fib_cli, fib_executor, fib_ppe = fib_best["cli"], fib_best["executor"], fib_best["ppe"]
        print("recovery latency...", file=sys.stderr)
        recovery = peers.recovery_latency(KILLS)
        typed = []
        for name, jobs, exact in [
            ("27 sleeps, equal within each type (ideal exact: 2.0 s)", equal_jobs_workload(), True),
            ("300 random sleeps 0-0.2 s over 5 types (vs a lower bound)", random_workload(),
             False),
        ]:
            typed.append((name, dispatch_makespan(workdir, jobs), ideal_makespan(jobs, exact)))
    scale_table = scale.scale_table(SCALE_WORKERS, SCALE_EXECUTOR_WORKERS, SCALE_KILLS)
    print("engines...", file=sys.stderr)
    engine_table = engines.overhead_table()
    print("terminal...", file=sys.stderr)
    terminal_table = terminal.terminal_table()
    print("commands...", file=sys.stderr)
    command_table = commands.commands_table(COMMANDS, 2, ROUNDS)
    print("dask on a real cluster...", file=sys.stderr)
    dask_table = (dask_cluster.overhead_table() if "dask" in engines.available_engines()
                  else "(not measured: no dask extra)")
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
               f"Python {platform.python_version()}, {datetime.date.today()}")
    peers_rates = {k: rates[k] for k in ("ppe", "mp", "loky", "pebble") if k in rates}
    best_peer = max(peers_rates.values())

    def row(label: str, key: str) -> str:
        return f"| {label} | {rates[key]:,.0f} | {rates[key] / best_peer:.2f} |"

    table = "\n".join([
        f"Machine: {machine}",
        "",
        f"Dispatch overhead: {n:,} no-op jobs through 2 workers (Executors: `submit` per "
        "job, then every result; pools warmed first; each pool measured once a round, in "
        f"turn, best of {ROUNDS} rounds; the CLI best of {REPEATS}). Ratio to the best peer "
        "(PPE, mp.Pool, loky, pebble).",
        "",
        "| pool | jobs/s | vs best peer |",
        "| --- | ---: | ---: |",
        row("taskpool.Executor", "executor"),
        row("taskpool.Executor, 10,000 submits", "executor10k"),
        row(f"taskpool CLI, {n:,} `sleep 0` jobs, log to a file (whole command)", "cli"),
        row("taskpool CLI, the same, the run alone (its Summary's wall time: no start-up, no "
            "parse)", "cli_run"),
        row("taskpool CLI, the same with `--journal` (whole command)", "cli_journal"),
        row("ProcessPoolExecutor", "ppe"),
        row("multiprocessing.Pool.imap_unordered(chunksize=1)", "mp"),
        *[row(name, name) for name in ("loky", "pebble") if name in rates],
        row("limit: posix_ipc ping-pong between two processes (round trips)", "ping_pong"),
        row("floor: in-process Executor (submit sets the result at once)", "floor"),
        row("floor, 10,000 submits", "floor10k"),
        "",
        "Targets: Executor (10,000 submits) "
        f"{rates['executor10k'] / rates['floor10k']:.0%} of the floor (10,000 submits; "
        ">= 50%), "
        f"{rates['executor10k'] / rates['ppe']:.1f}x PPE (>= 10x), "
        f"{rates['executor10k'] / rates['mp']:.1f}x mp.Pool (>= 2x); "
        f"CLI {rates['cli'] / rates['mp']:.2f}x mp.Pool (>= 1; the run alone "
        f"{rates['cli_run'] / rates['mp']:.2f}x). Paired within each round (the Executor's "
        "10,000 submits against that round's floor and mp.Pool), median of the rounds: "
        f"{statistics.median(paired['floor']):.0%} of the floor "
        f"({min(paired['floor']):.0%}-{max(paired['floor']):.0%}), "
        f"{statistics.median(paired['mp']):.1f}x mp.Pool "
        f"({min(paired['mp']):.1f}-{max(paired['mp']):.1f}x).",
        "",
        f"Bulk map: {BULK_ITEMS:,} no-op items through 2 workers, all results read (pools "
        f"warmed first; each measured once a round, in turn, best of {ROUNDS} rounds).",
        "",
        "| map | items/s | vs mp.Pool.map |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {rate:,.0f} | {rate / bulk['mp.Pool.map']:.2f} |"
          for name, rate in bulk.items()],
        "",
        f"CPU-bound batch: {fib_count} x fib({fib_n}) on 2 workers; ideal = sequential time "
        f"in one process / 2 = {ideal:.2f} s.",
        "",
        "| pool | makespan | vs ideal |",
        "| --- | ---: | ---: |",
        f"| taskpool CLI (the run's own wall time) | {fib_cli:.2f} s | {fib_cli / ideal:.3f} |",
        f"| taskpool.Executor (`map`) | {fib_executor:.2f} s | {fib_executor / ideal:.3f} |",
        f"| ProcessPoolExecutor (`map`) | {fib_ppe:.2f} s | {fib_ppe / ideal:.3f} |",
        f"| no pool: 2 plain forked processes, {fib_count // 2} calls each "
        f"| {fib_best['forked']:.2f} s | {fib_best['forked'] / ideal:.3f} |",
        "",
        recovery_table(recovery),
        "",
        scale_table,
        "",
        "Command: `make bench` (these scale tables alone: `python bench/scale.py`).",
        "",
        f"Typed pools, `taskpool dispatch {' '.join(map(str, POOLS))}`, sleep jobs:",
        "",
        "| workload | makespan | ideal | ratio |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {measured:.2f} s | {ideal_:.2f} s | {measured / ideal_:.3f} |"
          for name, measured, ideal_ in typed],
        "",
        "Engines of `taskpool run` (`--engine local|dask`): each runs the workload, and 10 "
        "jobs of it, through the CLI; the difference gives the cost of one more job (start-up "
        "excluded), the run of 10 the fixed cost. \"Overhead per job\" is the wall time per "
        "extra job x the workers, less the job's own computation.",
        "",
        engine_table,
        "",
        "Watching a run: the live view's cost on a terminal (a pseudo-terminal here), "
        "against the log to a file.",
        "",
        terminal_table,
        "",
        f"Commands: {COMMANDS:,} `true` commands on 2 workers, one a line of input, each "
        "tool's whole command timed (start-up included); the tools in turn, round after "
        f"round, {ROUNDS} rounds: the median and the range. Targets: taskpool at least "
        "xargs's commands/s, and at least 4x GNU parallel's.",
        "",
        command_table,
        "",
        "Command: `make bench` (alone: the engines' table `python bench/engines.py`, the "
        "terminal's `python bench/terminal.py`, the commands' `python bench/commands.py`).",
        "",
        "`--engine dask --scheduler` against raw Dask on the same real cluster (a `dask "
        "scheduler` and `dask worker` processes): the wall time of one more no-op job, "
        "start-up and close excluded.",
        "",
        dask_table,
        "",
        "Command: `make bench` (this table alone: `python bench/dask_cluster.py`).",
    ])
    print(table)
    write_results(ROOT / "bench" / "results.md", table)


# results.md's hand-measured figures follow this line; a run of the bench keeps them.
KEEP_MARKER = ("<!-- make bench rewrites everything above this line "
               "and keeps everything below it -->")


def write_results(path: Path, table: str) -> None:
    kept = path.read_text() if path.exists() else ""
    kept = kept[kept.index(KEEP_MARKER):] if KEEP_MARKER in kept else ""
    path.write_text(table + "\n" + ("\n" + kept if kept else ""))


if __name__ == "__main__":
    main()
