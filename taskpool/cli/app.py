"""The command line: `taskpool run ...`. Parses and validates, then hands over to main.py.

Errors meant for people are one line, `taskpool: <where>: <reason>`, on stderr, with exit
status 2 for a wrong command line or bad input. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from taskpool.core.engine import DEFAULT_CONNECT_TIMEOUT, ENGINES, Engine, RunConfig
from taskpool.core.jobfile import read_job_file
from taskpool.core.journal import Journal, JournalError
from taskpool.core.stdin import GeneratorInput
from taskpool.model.exits import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_JOBS_NOT_DONE
from taskpool.model.faults import CrashPlan, InjectedFault, Step
from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import JobRecord, Status
from taskpool.model.policy import (
    DEFAULT_GRACE,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_RESTART_WINDOW,
    SupervisionPolicy,
)
from taskpool.model.pools import PoolLayout, PoolSpec, PoolSpecError
from taskpool.observe import log as tplog
from taskpool.posix import mqueue

MAX_WORKERS = 512

# The seed's 12 jobs (fib 40..45), scaled down by 10 so the demo takes seconds, not minutes.
DEMO_FIB_ARGS = (30, 31, 32, 33, 34, 35, 35, 31, 32, 33, 34, 35)
DEMO_WORKERS = 4
DEMO_CRASH_RATE = 0.3
DEMO_SEED = 21  # five crashes, at each of the three steps


def error(message: str) -> None:
    os.write(2, f"taskpool: {message}\n".encode("utf-8", "replace"))


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds > 0")
    return value


def _seconds_or_off(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _seconds(text)


def _fault(text: str) -> InjectedFault:
    try:
        return InjectedFault.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pool_items(text: str) -> list[str]:
    return [item for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskpool",
        description="A fault-tolerant pool of forked workers over POSIX message queues.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
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
    _add_run_options(run_cmd, dispatch=False)
    dispatch_cmd = commands.add_parser(
        "dispatch", help="run jobs on typed pools, one per job type (seed 000's dispatcher)",
        description="Start COUNT workers for each job type (1 3 1: one of type 1, three of "
                    "type 2, one of type 3) and run the jobs of standard input (or --jobs "
                    "FILE), '<job_type> <duration> [priority]' a line, each on a worker of "
                    "its type. The same as 'taskpool run --pools 1,3,1'.")
    dispatch_cmd.add_argument("counts", nargs="+", metavar="COUNT",
                              help="workers of job type 1, 2, ... (or KIND=COUNT)")
    _add_run_options(dispatch_cmd, dispatch=True)
    _add_results_command(commands)
    _add_report_command(commands)
    return parser


def _add_run_options(run_cmd: argparse.ArgumentParser, dispatch: bool) -> None:
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
    run_cmd.add_argument("--jobs", metavar="FILE",
                         help="job file ('fib N', 'sleep SECONDS' or '<job_type> <duration> "
                              "[priority]' a line); '-' or omitted with piped input: standard "
                              "input, read as the pool runs")
    run_cmd.add_argument("--crash-rate", type=_crash_rate, metavar="P",
                         help="simulate crashes: each attempt of a job crashes its worker "
                              "with SIGSEGV with probability P (default 0; --demo: "
                              f"{DEMO_CRASH_RATE})")
    run_cmd.add_argument("--seed", type=int, metavar="S",
                         help="seed of the crash simulation (default: random, printed)")
    run_cmd.add_argument("--results", metavar="OUT.jsonl",
                         help="write one JSON object per job as it is recorded")
    run_cmd.add_argument("--log", metavar="FILE", help="write the log here instead of stderr")
    run_cmd.add_argument("--events", metavar="FILE.jsonl",
                         help="write every event (the log's, ACKs included) as one JSON object "
                              "a line, with a monotonic timestamp; see 'taskpool report'")
    run_cmd.add_argument("--quiet", "-q", action="store_true",
                         help="no live progress view on a terminal (the log still shows)")
    policy = run_cmd.add_argument_group(
        "supervision", "what the Dealer does when workers die, hang or take too long")
    policy.add_argument("--max-attempts", type=_count(0), metavar="N",
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
    policy.add_argument("--max-memory", type=_count(1), metavar="MB",
                        help="cap each worker's address space; a job that exceeds it fails "
                             "the attempt with reason 'memory limit' (default: none)")
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
    run_cmd.add_argument("--verbose", "-v", action="store_true",
                         help="also log each job's ACK (the worker has started it)")
    if not dispatch:
        run_cmd.add_argument("--demo", action="store_true",
                             help="run the demo: the seed's 12 fib jobs, 4 workers, crashes")
    run_cmd.add_argument("--inject-fault", type=_fault, action="append", default=[],
                         metavar="JOB:STEP[:ATTEMPT]",
                         help="testing hook: SIGKILL the worker that reaches STEP "
                              "(before_ack, during_compute, before_result, after_result; "
                              "or hang: stop beating and block) "
                              "of job JOB on attempt ATTEMPT (default 1); or 'at_start': "
                              "every worker dies as it starts; repeatable")


def _add_report_command(commands: Any) -> None:
    report_cmd = commands.add_parser(
        "report", help="draw a run's timeline from its --events file",
        description="Write a self-contained HTML page: one lane per worker slot, a bar per "
                    "job attempt, crashes marked, resends linked, and a summary.")
    report_cmd.add_argument("events", metavar="FILE.jsonl")
    report_cmd.add_argument("-o", "--output", metavar="run.html", default="run.html")


def _make_report(events: str, output: str) -> int:
    from taskpool.observe.report import ReportError, write_report

    try:
        timeline = write_report(events, output)
    except ReportError as e:
        error(str(e))
        return EXIT_BAD_INPUT
    print(f"{output}: {len(timeline.workers)} workers, {len(timeline.attempts)} attempts, "
          f"{len(timeline.links)} resends")
    return 0


def _add_results_command(commands: Any) -> None:
    results_cmd = commands.add_parser(
        "results", help="print what a journal holds",
        description="Print every job of a journal with its outcome (done, failed) or "
                    "not_done, without running anything.")
    results_cmd.add_argument("journal", metavar="RUN.db")
    results_cmd.add_argument("--format", choices=("jsonl", "csv", "table"), default="table")


# What only the local engine does; with --engine dask they are usage errors (README.md,
# "The Dask engine", says why each one has no Dask counterpart here).
LOCAL_ONLY = (("preempt", "--preempt"), ("max_restarts", "--max-restarts"),
              ("restart_window", "--restart-window"), ("heartbeat", "--heartbeat"),
              ("max_tasks_per_child", "--max-tasks-per-child"), ("max_memory", "--max-memory"))
DASK_FAULT_STEPS = (Step.BEFORE_ACK, Step.DURING_COMPUTE, Step.BEFORE_RESULT)


def _check_engine(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Usage errors of --engine and --scheduler; False after saying that the dask extra is
    missing (before any job is read)."""
    if args.engine != "dask" and args.scheduler is not None:
        parser.error("--scheduler is for --engine dask")
    if args.connect_timeout is not None and args.scheduler is None:
        parser.error("--connect-timeout is for --scheduler")
    if args.engine != "dask":
        return True
    for name, flag in LOCAL_ONLY:
        if getattr(args, name) not in (None, False):
            parser.error(f"{flag} is a local engine option: --engine dask does not take it")
    for fault in args.inject_fault:
        if fault.step not in DASK_FAULT_STEPS:
            parser.error(f"--inject-fault {fault.step.value}: --engine dask takes only "
                         + ", ".join(step.value for step in DASK_FAULT_STEPS))
    if args.scheduler is not None and args.workers is not None:
        parser.error("--scheduler runs on that cluster's workers: drop --workers")
    from taskpool.dask.engine import DaskMissing, require_distributed, scheduler_address_error

    try:
        require_distributed()
    except DaskMissing as e:
        error(str(e))
        return False
    if args.scheduler is not None:
        why = scheduler_address_error(args.scheduler)
        if why is not None:
            parser.error(f"--scheduler {args.scheduler!r} is not a scheduler address ({why}): "
                         "give tcp://HOST:PORT")
    return True


def _pool_layout(args: argparse.Namespace, parser: argparse.ArgumentParser) -> PoolLayout:
    items = args.counts if args.command == "dispatch" else args.pools
    if items is None:
        return PoolLayout.single(
            args.workers or (DEMO_WORKERS if args.demo else (os.cpu_count() or 1)))
    if args.command == "run" and args.workers is not None:
        parser.error("--pools gives the worker count of each pool: drop --workers")
    if args.command == "run" and args.demo:
        parser.error("--demo runs its own pool: drop --pools")
    try:
        layout = PoolLayout.parse(items)
    except PoolSpecError as e:
        parser.error(str(e))
    if layout.total_workers > MAX_WORKERS:
        parser.error(f"{layout.total_workers} workers in all: at most {MAX_WORKERS}")
    return layout


def _load_jobs(
    args: argparse.Namespace, parser: argparse.ArgumentParser, layout: PoolLayout
) -> GeneratorInput | None:
    """The validated job list, or None after printing why nothing can run."""
    if args.demo:
        if args.jobs is not None:
            parser.error("--demo brings its own jobs: drop --jobs")
        return GeneratorInput(
            [Job(i, JobKind.FIB, n) for i, n in enumerate(DEMO_FIB_ARGS, start=1)], layout)
    if (args.jobs is None or args.jobs == "-") and sys.stdin is None:
        error("no jobs: standard input is closed; give --jobs FILE, or pipe jobs into it")
        return None
    if args.jobs is None and sys.stdin.isatty():
        parser.print_usage(sys.stderr)
        error("no jobs: give --jobs FILE, or pipe jobs into standard input")
        return None
    if args.jobs is None or args.jobs == "-":
        return GeneratorInput(None, layout)
    try:
        jobs, errors = read_job_file(args.jobs, layout)
    except OSError as e:
        error(f"{args.jobs}: cannot read: {e.strerror}")
        return None
    for line_error in errors:
        error(str(line_error))
    if errors:
        error(f"{args.jobs}: {len(errors)} bad line(s); nothing was run")
        return None
    return GeneratorInput(jobs, layout)


@dataclass(frozen=True)
class Journaled:
    journal: Journal
    source: GeneratorInput  # with what --resume skips
    resumed: dict[int, JobRecord]


def _open_journal(args: argparse.Namespace, source: GeneratorInput) -> Journaled | None:
    """Open the journal, check it against the jobs, and say what to skip; None after
    printing why the run cannot go on."""
    try:
        journal = Journal.open(args.journal, resume=args.resume)
    except JournalError as e:
        error(str(e))
        return None
    resumed = journal.outcomes() if args.resume else {}
    if source.jobs is not None:
        if args.resume and not args.force_resume:
            difference = journal.first_difference(source.jobs, args.jobs or "<demo>")
            if difference is not None:
                error(f"{difference}; the journal belongs to another job file "
                      "(--force-resume runs it anyway, matching jobs by id)")
                journal.close()
                return None
        for job in source.jobs:
            journal.add_job(job)
        journal.commit()  # every job is journaled before any runs
    journal_digests = {job: entry[0] for job, entry in journal.jobs().items()}
    source = GeneratorInput(source.jobs, source.layout, frozenset(resumed), journal_digests)
    return Journaled(journal, source, resumed)


def _print_results(path: str, form: str) -> int:
    try:
        journal = Journal.open(path, resume=True, for_run=False)
    except JournalError as e:
        error(str(e))
        return EXIT_BAD_INPUT
    outcomes = journal.outcomes()
    rows = []
    for job_id, job in journal.all_jobs().items():
        record = outcomes.get(job_id) or JobRecord.of(job, Status.NOT_DONE)
        rows.append(record.to_json())
    journal.close()
    out = sys.stdout
    if form == "jsonl":
        out.write("".join(json.dumps(row) + "\n" for row in rows))
    elif form == "csv":
        fields = ["job", "kind", "arg", "type", "priority", "status", "result", "worker",
                  "attempts", "reason"]
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        out.write(f"{'job':>6}  {'job spec':<18} {'status':<9} {'result':>14}  attempts\n")
        for row in rows:
            spec = f"{row['kind']} {row['arg']}"
            result = "" if row["result"] is None else str(row["result"])
            out.write(f"{row['job']:>6}  {spec:<18} {row['status']:<9} {result:>14}  "
                      f"{row['attempts']}\n")
        counts = {s: sum(1 for r in rows if r["status"] == s)
                  for s in ("done", "failed", "not_done")}
        out.write(f"{len(rows)} jobs: {counts['done']} done, {counts['failed']} failed, "
                  f"{counts['not_done']} not done\n")
    return 0


def _open_for_append(path: str, what: str) -> int | None:
    """A descriptor every process of the run writes whole lines to (O_APPEND: one write()
    is one line, whoever writes it); None after saying why it cannot be opened."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    except OSError as e:
        error(f"{path}: cannot write {what}: {e.strerror}")
        return None


def make_engine(name: str, config: RunConfig) -> Engine:
    if name == "dask":
        from taskpool.dask.engine import DaskEngine

        return DaskEngine(config)
    from taskpool.local.main import Main

    return Main(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "results":
        return _print_results(args.journal, args.format)
    if args.command == "report":
        return _make_report(args.events, args.output)
    if (args.resume or args.force_resume) and args.journal is None:
        parser.error("--resume needs --journal")
    if not hasattr(args, "demo"):
        args.demo = False
    if not hasattr(args, "workers"):
        args.workers = None
    if not _check_engine(args, parser):
        return EXIT_BAD_INPUT
    layout = _pool_layout(args, parser)
    source = _load_jobs(args, parser, layout)
    if source is None:
        return EXIT_BAD_INPUT
    journaled = None
    if args.journal is not None:
        journaled = _open_journal(args, source)
        if journaled is None:
            return EXIT_BAD_INPUT
        source = journaled.source

    log_fd = _open_for_append(args.log, "the log") if args.log is not None else 2
    events_fd = _open_for_append(args.events, "events") if args.events is not None else None
    if log_fd is None or (args.events is not None and events_fd is None):
        return EXIT_BAD_INPUT
    results = None
    if args.results is not None:
        try:
            results = open(args.results, "w", encoding="utf-8")
        except OSError as e:
            error(f"{args.results}: cannot write results: {e.strerror}")
            return EXIT_BAD_INPUT
    text_level = logging.DEBUG if args.verbose else logging.INFO
    live = live_fd = None
    report_error = error
    if not args.quiet and args.log is None and sys.stderr.isatty():
        from taskpool.observe.live import LiveView

        live = LiveView(text_level, events_fd)
        live_fd, live_w = os.pipe()
        tplog.setup(None, live=tplog.LiveHandler(live_w, os.getpid(), live.on_event))

        def report_error(message: str) -> None:
            live.console.print(f"taskpool: {message}", markup=False)

        live.start()
    else:
        tplog.setup(log_fd, text_level, events_fd)

    crash_rate = args.crash_rate
    if crash_rate is None:
        crash_rate = DEMO_CRASH_RATE if args.demo else 0.0
    seed = args.seed
    if seed is None:
        seed = DEMO_SEED if args.demo else secrets.randbits(32)
    workers = layout.total_workers
    main_log = logging.getLogger("taskpool.main")
    if crash_rate > 0:
        main_log.info("Simulating crashes: rate %g, seed %d (repeat with --seed %d)",
                      crash_rate, seed, seed)
    max_attempts = args.max_attempts
    if max_attempts is None:
        max_attempts = 0 if args.demo else DEFAULT_MAX_ATTEMPTS
    policy = SupervisionPolicy(
        max_attempts=max_attempts,
        max_restarts=args.max_restarts or max(DEFAULT_MAX_RESTARTS, workers),
        restart_window=args.restart_window or DEFAULT_RESTART_WINDOW,
        timeout=args.timeout,
        heartbeat=DEFAULT_HEARTBEAT if args.heartbeat is None else args.heartbeat or None,
        grace=args.grace,
        max_tasks_per_child=args.max_tasks_per_child,
        max_memory_mb=args.max_memory,
    )
    config = RunConfig(
        pool=PoolSpec(
            layout=layout,
            plan=CrashPlan(crash_rate, seed, frozenset(args.inject_fault)),
            policy=policy,
            preempt=args.preempt,
        ),
        source=source,
        results=results,
        report_error=error,
        journal=journaled.journal if journaled else None,
        resumed=journaled.resumed if journaled else {},
        live=live,
        live_fd=live_fd,
        scheduler=args.scheduler,
        connect_timeout=args.connect_timeout or DEFAULT_CONNECT_TIMEOUT,
    )
    try:
        return make_engine(args.engine, config).run()
    except mqueue.QueueLimitError as e:
        error(str(e))
        return EXIT_JOBS_NOT_DONE
    finally:
        if live is not None:
            live.stop()
        if results is not None:
            results.close()
        if journaled is not None:
            journaled.journal.close()


# 128 + SIGINT: the status of a run interrupted by Ctrl-C (recorder.exit_status's).


def entry_point() -> None:
    try:
        code = main()
    except KeyboardInterrupt:
        # Ctrl-C before main's handlers are in place (they turn it into a graceful stop,
        # and no pool runs before they are): the status a run interrupted later gives,
        # without a traceback.
        code = EXIT_INTERRUPTED
    sys.exit(code)
