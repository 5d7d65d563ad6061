"""The command line's grammar: the argparse parser of every command, and its value types.

A value type turns a flag's text into its value, or raises argparse.ArgumentTypeError with
the reason argparse prints (`taskpool run: error: argument --workers: 0 is out of range
1..512`, exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any, Callable

from taskpool import __version__
from taskpool.core.engine import DEFAULT_CONNECT_TIMEOUT, DEFAULT_DASK_WAIT, ENGINES
from taskpool.model.faults import InjectedFault
from taskpool.model.outcome import Status
from taskpool.model.policy import (
    DEFAULT_GRACE,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_RESTART_WINDOW,
    HaltPolicy,
)

MAX_WORKERS = 512

# The seed's 12 jobs (fib 40..45), scaled down by 10 so the demo takes seconds, not minutes.
DEMO_FIB_ARGS = (30, 31, 32, 33, 34, 35, 35, 31, 32, 33, 34, 35)
DEMO_WORKERS = 4
DEMO_CRASH_RATE = 0.3
DEMO_SEED = 21  # five crashes, at each of the three steps


# --- Value types ------------------------------------------------------------------------

def _crash_rate(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= p < 1.0:
        raise argparse.ArgumentTypeError(
            f"{text} is out of range: 0 <= P < 1 (at 1 every attempt would crash)")
    return p


def _count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if maximum is not None and not minimum <= n <= maximum:
            raise argparse.ArgumentTypeError(f"{n} is out of range {minimum}..{maximum}")
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{n} is below the minimum of {minimum}")
        return n

    return parse


# Every duration flag's ceiling: 30 days. Longer is surely a unit mistake, and a deadline
# that far would not fit the clocks the pool waits on (sigtimedwait's time_t).
SECONDS_MAX = 30 * 24 * 3600
# A job's attempt travels in 16 bits.
ATTEMPTS_MAX = 65535


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds > 0")
    if value > SECONDS_MAX:
        raise argparse.ArgumentTypeError(
            f"{text} seconds is over the limit of {SECONDS_MAX} (30 days)")
    return value


def _megabytes(text: str) -> int:
    """--max-memory: at most this machine's memory (more would be no cap at all, and
    overflows the address-space limit it sets)."""
    mb = _count(1)(text)
    machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    if mb > machine:
        raise argparse.ArgumentTypeError(
            f"{mb} MB is more than this machine's memory ({machine} MB)")
    return mb


def _seconds_or_off(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _seconds(text)


def _fault(text: str) -> InjectedFault:
    try:
        return InjectedFault.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _halt(text: str) -> HaltPolicy:
    try:
        return HaltPolicy.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pool_items(text: str) -> list[str]:
    return [item for item in text.split(",") if item.strip()]


# --- The parser -------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """The top-level parser. A wrong option of a command is that command's usage error
    (`taskpool run: error: unrecognized arguments: --bogus`, under `run`'s usage): argparse
    alone hands it up to the top level, whose usage says nothing of `run`."""

    commands: dict[str, argparse.ArgumentParser]

    def parse_command_line(self, argv: Sequence[str] | None) -> argparse.Namespace:
        args, extras = self.parse_known_args(argv)
        if extras:
            command = self.commands.get(args.command, self)
            command.error("unrecognized arguments: " + " ".join(extras))
        return args


def build_parser() -> Parser:
    parser = Parser(
        prog="taskpool",
        description="A fault-tolerant pool of forked workers over POSIX message queues.",
    )
    parser.add_argument("--version", action="version", version=f"taskpool {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_run_command(commands)
    _add_dispatch_command(commands)
    _add_results_command(commands)
    _add_report_command(commands)
    parser.commands = dict(commands.choices)
    return parser


def _add_run_command(commands: Any) -> None:
    run_cmd = commands.add_parser(
        "run", help="run jobs on a pool of workers",
        description="Run the jobs of FILE (or standard input) on a pool of forked workers; "
                    "a worker that dies mid-job is replaced and its job sent again.",
    )
    run_cmd.add_argument("--workers", type=_count(1, MAX_WORKERS), metavar="N",
                         help=f"pool size, 1..{MAX_WORKERS} (default: CPU count; --demo: "
                              f"{DEMO_WORKERS})")
    run_cmd.add_argument("--pools", type=_pool_items, metavar="LIST",
                         help="typed pools instead of one: worker counts per job type, "
                              "'1,3,1' (types 1..3), or named for a job kind, 'fib=2,sleep=1'; "
                              "the same as 'taskpool dispatch'")
    run_cmd.add_argument("--cmd", metavar="TEMPLATE",
                         help="each input line is data for one sh command: TEMPLATE with {} "
                              "the whole line, {1} {2} ... its fields, {#} the job id, each "
                              "quoted for the shell ('gzip -9 {}'; no {}: the line is "
                              "appended)")
    _add_run_options(run_cmd, dispatch=False)


def _add_dispatch_command(commands: Any) -> None:
    dispatch_cmd = commands.add_parser(
        "dispatch",
        help="run jobs on typed pools, one per job type (the original design's dispatcher)",
        description="Start COUNT workers for each job type (1 3 1: one of type 1, three of "
                    "type 2, one of type 3) and run the jobs of standard input (or --jobs "
                    "FILE), '<job_type> <duration> [priority]' a line, each on a worker of "
                    "its type. The same as 'taskpool run --pools 1,3,1'.")
    dispatch_cmd.add_argument("counts", nargs="+", metavar="COUNT",
                              help="workers of job type 1, 2, ... (or KIND=COUNT)")
    _add_run_options(dispatch_cmd, dispatch=True)
    # What `run` has flags for and dispatch has not: its pools come from COUNT.
    dispatch_cmd.set_defaults(demo=False, workers=None, cmd=None)


def _add_run_options(run_cmd: argparse.ArgumentParser, dispatch: bool) -> None:
    """The options `run` and `dispatch` share, in the order --help lists them."""
    _add_engine_options(run_cmd)
    _add_input_output_options(run_cmd)
    _add_supervision_options(run_cmd)
    _add_journal_options(run_cmd)
    run_cmd.add_argument("--verbose", "-v", action="store_true",
                         help="also log each job's ACK (the worker has started it); on a "
                              "terminal, show every line of the log above the progress line")
    _add_simulation_options(run_cmd, dispatch)


def _add_simulation_options(run_cmd: argparse.ArgumentParser, dispatch: bool) -> None:
    """Crashes on purpose: the demo's, and the tests' hook."""
    crashes = run_cmd.add_argument_group(
        "simulated crashes", "workers that die on purpose, to watch or test recovery")
    if not dispatch:
        crashes.add_argument("--demo", action="store_true",
                             help="run the demo: the seed's 12 fib jobs, 4 workers, crashes")
    crashes.add_argument("--crash-rate", type=_crash_rate, metavar="P",
                         help="simulate crashes: each attempt of a job crashes its worker "
                              f"with SIGSEGV with probability P (default 0; --demo: "
                              f"{DEMO_CRASH_RATE})")
    crashes.add_argument("--seed", type=int, metavar="S",
                         help="seed of the crash simulation (default: random, printed)")
    crashes.add_argument("--inject-fault", type=_fault, action="append", default=[],
                         metavar="JOB:STEP[:ATTEMPT]",
                         help="testing hook: SIGKILL the worker that reaches STEP "
                              "(before_ack, during_compute, before_result, after_result; "
                              "or hang: stop beating and block) "
                              "of job JOB on attempt ATTEMPT (default 1); or 'at_start': "
                              "every worker dies as it starts; repeatable")


def _add_engine_options(run_cmd: argparse.ArgumentParser) -> None:
    engine = run_cmd.add_argument_group(
        "engine", "what runs the jobs: the local pool of forked workers, or a Dask cluster")
    engine.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: forked workers on this machine (default); dask: a Dask "
                             "distributed cluster, a LocalCluster sized like the pool unless "
                             "--scheduler is given (needs pip install 'taskpool[dask]')")
    engine.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                        help="with --engine dask: run on the existing cluster of this "
                             "scheduler instead of starting one")
    engine.add_argument("--connect-timeout", type=_seconds, metavar="SECONDS",
                        help="with --scheduler: how long to try to reach it before giving "
                             f"up, exit 2 (default {DEFAULT_CONNECT_TIMEOUT:g})")
    engine.add_argument("--dask-wait", type=_seconds, metavar="SECONDS",
                        help="with --scheduler: how long its cluster may have no worker at "
                             "all before the run ends, jobs not done, exit 1 (default "
                             f"{DEFAULT_DASK_WAIT:g})")


def _add_input_output_options(run_cmd: argparse.ArgumentParser) -> None:
    run_cmd.add_argument("--jobs", metavar="FILE",
                         help="job file ('fib N', 'sleep SECONDS' or '<job_type> <duration> "
                              "[priority]' a line); '-' or omitted with piped input: standard "
                              "input, read as the pool runs")
    run_cmd.add_argument("--results", metavar="OUT.jsonl",
                         help="write one JSON object per job as it is recorded; '-': to "
                              "standard output")
    run_cmd.add_argument("--output-dir", metavar="DIR",
                         help="keep each sh/exec/call job's output as DIR/<job>.out and "
                              "DIR/<job>.err (created if missing) instead of printing it")
    run_cmd.add_argument("--log", metavar="FILE",
                         help="write the whole log here instead of stderr (on a terminal, the "
                              "progress line stays)")
    run_cmd.add_argument("--events", metavar="FILE.jsonl",
                         help="write every event (the log's, ACKs included) as one JSON object "
                              "a line, with a monotonic timestamp; see 'taskpool report'")
    run_cmd.add_argument("--quiet", "-q", action="store_true",
                         help="stderr shows only errors and the summary line (no progress "
                              "line; --log FILE still gets the whole log)")


def _add_supervision_options(run_cmd: argparse.ArgumentParser) -> None:
    policy = run_cmd.add_argument_group(
        "supervision", "what the Dealer does when workers die, hang or take too long")
    policy.add_argument("--max-attempts", type=_count(0, ATTEMPTS_MAX), metavar="N",
                        help="a job whose worker died N times is recorded as failed; 0: "
                             f"unlimited (default {DEFAULT_MAX_ATTEMPTS}; --demo: unlimited)")
    policy.add_argument("--max-restarts", type=_count(1), metavar="R",
                        help="stop the pool when more than R workers die without taking a "
                             f"job within --restart-window (default: {DEFAULT_MAX_RESTARTS} "
                             "or the pool size, whichever is larger)")
    policy.add_argument("--restart-window", type=_seconds, metavar="T",
                        help=f"seconds (default {DEFAULT_RESTART_WINDOW:g})")
    policy.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        help="kill a worker whose job runs longer; the job counts an attempt "
                             "(default: none; a job line's timeout= overrides it)")
    policy.add_argument("--heartbeat", type=_seconds_or_off, metavar="SECONDS",
                        help="kill a worker that runs a job and sends no heartbeat for this "
                             f"long (stopped, or wedged); 0: off (default {DEFAULT_HEARTBEAT:g})")
    policy.add_argument("--grace", type=_seconds_or_off, metavar="SECONDS",
                        default=DEFAULT_GRACE,
                        help="on Ctrl-C or SIGTERM, let running jobs finish this long before "
                             f"killing them; a second signal skips it (default {DEFAULT_GRACE:g})")
    policy.add_argument("--max-tasks-per-child", type=_count(1), metavar="N",
                        help="replace a worker after it has done N jobs (default: never)")
    policy.add_argument("--preempt", action="store_true",
                        help="let a queued job stop a running job of lower priority in its "
                             "pool; the stopped job is requeued, not charged an attempt "
                             "(turns off prefetch)")
    policy.add_argument("--max-memory", type=_megabytes, metavar="MB",
                        help="cap each worker's address space; a job that exceeds it fails "
                             "the attempt with reason 'memory limit' (default: none)")
    policy.add_argument("--halt", type=_halt, metavar="WHEN,fail=N",
                        help="stop the run once N jobs (or P%%: fail=P%%) have failed, as GNU "
                             "parallel's --halt: soon takes no new job and lets the running "
                             "ones finish, now also stops them; the rest are not_done, exit 1 "
                             "(default: never)")
    policy.add_argument("--retry-failed", type=_count(1, ATTEMPTS_MAX), nargs="?", const=1,
                        metavar="N",
                        help="run a job that failed (a non-zero exit status, an exception; "
                             "not a crash) up to N more times (default 1 with the flag, else "
                             "0); with --resume, also run again the jobs the journal has as "
                             "failed")


def _add_journal_options(run_cmd: argparse.ArgumentParser) -> None:
    journal = run_cmd.add_argument_group(
        "journal", "make a long run restartable, with exactly-once results across restarts")
    journal.add_argument("--journal", metavar="RUN.db",
                         help="record accepted jobs and every outcome in this SQLite file")
    journal.add_argument("--resume", action="store_true",
                         help="go on with the journal's run: rewrite --results from it and run "
                              "only the jobs it has no outcome for (the same job file, or stdin)")
    journal.add_argument("--force-resume", action="store_true",
                         help="with --resume: accept a job file that differs from the "
                              "journal's (jobs are matched by id, done ones are not run again)")


def _add_results_command(commands: Any) -> None:
    results_cmd = commands.add_parser("results", help="print what a journal holds", description=(
        "Print every job of a journal with its outcome (done, failed) or not_done, without "
        "running anything."))
    results_cmd.add_argument("journal", metavar="RUN.db")
    results_cmd.add_argument("--format", choices=("jsonl", "csv", "table"), default="table")
    results_cmd.add_argument("--status", choices=[status.value for status in Status],
                             action="append",
                             help="only the jobs of this status; repeatable (default: all)")


REPORT_FORMATS = {"html": "run.html", "trace": "run.trace.json"}  # and the default output


def _add_report_command(commands: Any) -> None:
    report_cmd = commands.add_parser(
        "report", help="draw a run's timeline from its --events file",
        description="html: a self-contained page, one lane per worker slot, a bar per job "
                    "attempt (aggregated on large runs), crashes marked, resends linked, and "
                    "a summary. trace: the Chrome/Perfetto Trace Event format, a track per "
                    "worker process and a slice per attempt, to open in Perfetto or "
                    "chrome://tracing.")
    report_cmd.add_argument("events", metavar="FILE.jsonl")
    report_cmd.add_argument("--format", choices=tuple(REPORT_FORMATS), default="html",
                            help="html (default) or trace")
    report_cmd.add_argument("-o", "--output", metavar="OUT",
                            help="where to write it (default: "
                                 + ", ".join(f"{form}: {out}"
                                             for form, out in REPORT_FORMATS.items()) + ")")
