"""`taskpool run` and `taskpool dispatch`: from the parsed arguments to a RunConfig, and the
engine that runs it.

In order: usage errors the parser cannot see (flags that go together, or not), the pool
layout, the jobs (a file read and checked whole, or standard input, read as the pool runs),
the journal, the outputs (--log, --events, --results), the log's routing (the live view on
a terminal), the crash plan and the supervision policy; then `make_engine(...).run()`.
Anything the user gave that cannot work ends the command here with one line and exit
status 2 (errors.py), before any process is forked.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import logging
import os
import secrets
import sqlite3
import sys
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from taskpool.cli.errors import error, error_reporter
from taskpool.cli.options import (
    DEMO_CRASH_RATE,
    DEMO_FIB_ARGS,
    DEMO_SEED,
    DEMO_WORKERS,
    MAX_WORKERS,
)
from taskpool.core.engine import DEFAULT_CONNECT_TIMEOUT, DEFAULT_DASK_WAIT, Engine, RunConfig
from taskpool.core.jobfile import read_job_file
from taskpool.core.journal import Journal, JournalError
from taskpool.core.stdin import GeneratorInput
from taskpool.model.exits import EXIT_BAD_INPUT, EXIT_JOBS_NOT_DONE
from taskpool.model.faults import CrashPlan, Step
from taskpool.model.jobs import COMMAND_KINDS, Job, JobKind
from taskpool.model.outcome import JobRecord
from taskpool.model.policy import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_RESTART_WINDOW,
    HaltPolicy,
    SupervisionPolicy,
)
from taskpool.model.pools import PoolLayout, PoolSpec, PoolSpecError
from taskpool.model.template import CommandTemplate, TemplateError
from taskpool.observe import log as tplog
from taskpool.observe.log import main_log
from taskpool.observe.shown import Shown
from taskpool.posix import mqueue

if TYPE_CHECKING:
    from taskpool.observe.live import LiveView

# What only the local engine does; with --engine dask they are usage errors (README.md,
# "The Dask engine", says why each one has no Dask counterpart here).
LOCAL_ONLY = (("preempt", "--preempt"), ("max_restarts", "--max-restarts"),
              ("restart_window", "--restart-window"), ("heartbeat", "--heartbeat"),
              ("max_tasks_per_child", "--max-tasks-per-child"), ("max_memory", "--max-memory"))
DASK_FAULT_STEPS = (Step.BEFORE_ACK, Step.DURING_COMPUTE, Step.BEFORE_RESULT)


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`taskpool run ...` or `taskpool dispatch ...`; returns the exit status."""
    _check_journal_flags(args, parser)
    _check_standard_output(args, parser)
    if not _check_engine(args, parser):
        return EXIT_BAD_INPUT
    layout = _pool_layout(args, parser)
    source = _load_jobs(args, parser, layout)
    if source is None:
        return EXIT_BAD_INPUT
    source = dataclasses.replace(source, refuse_commands=_commands_refused(args))
    if not _commands_allowed(args.jobs, source):
        return EXIT_BAD_INPUT
    journaled = None
    if args.journal is not None:
        journaled = _open_journal(args, source)
        if journaled is None:
            return EXIT_BAD_INPUT
        source = journaled.source
    if not _check_output_dir(args):
        return EXIT_BAD_INPUT
    outputs = _open_outputs(args)
    if outputs is None:
        return EXIT_BAD_INPUT
    live, live_fd = _route_the_log(args, outputs, layout)
    config = RunConfig(
        pool=PoolSpec(layout=layout, plan=_crash_plan(args),
                      policy=_policy(args, layout.total_workers), preempt=args.preempt),
        source=source,
        results=outputs.results,
        report_error=error_reporter(live),
        journal=journaled.journal if journaled else None,
        resumed=journaled.resumed if journaled else {},
        resuming=args.resume,
        live=live,
        live_fd=live_fd,
        scheduler=args.scheduler,
        connect_timeout=args.connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        output_dir=args.output_dir,
        dask_wait=DEFAULT_DASK_WAIT if args.dask_wait is None else args.dask_wait,
        started_at=getattr(args, "started_at", None),
    )
    return _run(args.engine, config)


def make_engine(name: str, config: RunConfig) -> Engine:
    if name == "dask":
        from taskpool.dask.engine import DaskEngine

        return DaskEngine(config)
    from taskpool.local.main import Main

    return Main(config)


def _run(engine: str, config: RunConfig) -> int:
    """Run the engine, and close what the run used however it ends."""
    try:
        return make_engine(engine, config).run()
    except mqueue.QueueLimitError as e:
        config.report_error(str(e))
        return EXIT_JOBS_NOT_DONE
    finally:
        if config.live is not None:
            config.live.stop()
        if config.results is not None:
            config.results.close()
        if config.journal is not None:
            config.journal.close()


# --- What the parser cannot check -------------------------------------------------------

def _check_standard_output(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """With `--results -`, standard output carries the results and nothing else: another
    output of the run that is the same file would mix its lines into them."""
    if args.results != "-":
        return
    for flag, path in (("--log", args.log), ("--events", args.events)):
        if path is not None and _is_standard_output(path):
            parser.error(f"{flag} {path} is standard output, where --results - writes the "
                         f"results: give {flag} a file of its own")


def _is_standard_output(path: str) -> bool:
    """`path` is the file standard output writes to. A terminal is not counted: there the
    results and the log share a screen, as they do by default, not a file."""
    try:
        return not os.isatty(1) and os.path.samestat(os.stat(path), os.fstat(1))
    except OSError:  # no such file yet (then it is not stdout), or stdout closed
        return False


def _check_journal_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.force_resume and not args.resume:
        parser.error("--force-resume goes with --resume (it lets --resume accept a changed "
                     "job file): add --resume, or drop --force-resume")
    if args.resume and args.journal is None:
        parser.error("--resume goes on with a journal: give it with --journal RUN.db")


def _check_engine(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Usage errors of --engine and --scheduler; False after saying that the dask extra is
    missing (before any job is read)."""
    if args.engine != "dask" and args.scheduler is not None:
        parser.error("--scheduler is for --engine dask")
    if args.connect_timeout is not None and args.scheduler is None:
        parser.error("--connect-timeout is for --scheduler")
    if args.dask_wait is not None and args.scheduler is None:
        parser.error("--dask-wait is for --scheduler")
    if args.engine != "dask":
        return True
    _check_dask_usage(args, parser)
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


def _check_dask_usage(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name, flag in LOCAL_ONLY:
        if getattr(args, name) not in (None, False):
            parser.error(f"{flag} is a local engine option: --engine dask does not take it")
    for fault in args.inject_fault:
        if fault.step not in DASK_FAULT_STEPS:
            parser.error(f"--inject-fault {fault.step.value}: --engine dask takes only "
                         + ", ".join(step.value for step in DASK_FAULT_STEPS))
    if args.scheduler is not None and args.workers is not None:
        parser.error("--scheduler runs on that cluster's workers: drop --workers")


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


# --- The jobs and the journal -----------------------------------------------------------

def _load_jobs(
    args: argparse.Namespace, parser: argparse.ArgumentParser, layout: PoolLayout
) -> GeneratorInput | None:
    """The validated job list, or None after printing why nothing can run."""
    if args.demo:
        if args.jobs is not None or args.cmd is not None:
            parser.error("--demo brings its own jobs: drop --jobs and --cmd")
        return GeneratorInput(
            [Job(i, JobKind.FIB, n) for i, n in enumerate(DEMO_FIB_ARGS, start=1)], layout)
    if (args.jobs is None or args.jobs == "-") and sys.stdin is None:
        error("no jobs: standard input is closed; give --jobs FILE, or pipe jobs into it")
        return None
    if args.jobs is None and sys.stdin.isatty():
        parser.print_usage(sys.stderr)
        error("no jobs: give --jobs FILE, or pipe jobs into standard input")
        return None
    template = _template(args, parser, layout)
    if args.jobs is None or args.jobs == "-":
        return GeneratorInput(None, layout, template=template)
    return _read_job_file(args.jobs, layout, template)


def _template(args: argparse.Namespace, parser: argparse.ArgumentParser,
              layout: PoolLayout) -> CommandTemplate | None:
    """--cmd's template, checked; None without --cmd."""
    if args.cmd is None:
        return None
    if isinstance(layout.pool_for_kind(JobKind.SH), str):
        parser.error("--cmd makes sh jobs, and no pool is named for them: name one sh=N "
                     "in --pools")
    try:
        return CommandTemplate.parse(args.cmd)
    except TemplateError as e:
        parser.error(f"--cmd: {e}")


def _read_job_file(path: str, layout: PoolLayout,
                   template: CommandTemplate | None = None) -> GeneratorInput | None:
    """The jobs of the file, each line checked; None after printing every bad line."""
    try:
        jobs, errors = read_job_file(path, layout, template)
    except OSError as e:
        error(f"{path}: cannot read: {e.strerror}")
        return None
    for line_error in errors:
        error(str(line_error))
    if errors:
        error(f"{path}: {len(errors)} bad line(s); nothing was run")
        return None
    return GeneratorInput(jobs, layout, template=template)


def _commands_refused(args: argparse.Namespace) -> str | None:
    """Why this run cannot take sh, exec and call jobs, if it cannot: with --results -
    their output would mix with the results on standard output."""
    if args.results == "-" and args.output_dir is None:
        return ("with --results -, a command's output would mix with the results on standard "
                "output: keep it in files with --output-dir DIR")
    return None


def _commands_allowed(path: str | None, source: GeneratorInput) -> bool:
    """False after naming the first command of a job file this run cannot take (standard
    input's are refused line by line: core/stdin.py)."""
    if source.refuse_commands is None or source.jobs is None:
        return True
    command = next((job for job in source.jobs if job.kind in COMMAND_KINDS), None)
    if command is None:
        return True
    error(f"{path}:{command.line}: {source.refuse_commands}")
    error(f"{path}: nothing was run")
    return False


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
    try:
        return _journaled(journal, args, source)
    except JournalError as e:
        error(str(e))
    except sqlite3.Error as e:  # a full disk, as the jobs are journaled
        error(f"{args.journal}: cannot write the journal ({e})")
    journal.close()
    return None


def _journaled(journal: Journal, args: argparse.Namespace,
               source: GeneratorInput) -> Journaled:
    resumed = journal.outcomes() if args.resume else {}
    if args.resume and args.retry_failed:
        resumed = journal.failed_to_run_again(resumed)
        if journal.rerunning:
            main_log.info("Resuming: running again the %d jobs the journal has as failed "
                          "(--retry-failed)", len(journal.rerunning))
    if source.jobs is not None:
        if args.resume and not args.force_resume:
            difference = journal.first_difference(source.jobs, args.jobs or "<demo>")
            if difference is not None:
                raise JournalError(f"{difference}; the journal belongs to another job file "
                                   "(--force-resume runs it anyway, matching jobs by id)")
        for job in source.jobs:
            journal.add_job(job)
        journal.commit()  # every job is journaled before any runs
    journal_digests = {job: entry[0] for job, entry in journal.jobs().items()}
    source = dataclasses.replace(source, done=frozenset(resumed),
                                 journal_digests=journal_digests)
    return Journaled(journal, source, resumed)


# --- Outputs and the log ----------------------------------------------------------------

def _check_output_dir(args: argparse.Namespace) -> bool:
    """--output-dir, made if missing."""
    if args.output_dir is None:
        return True
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        error(f"{args.output_dir}: cannot make the output directory: {e.strerror}")
        return False
    if not os.access(args.output_dir, os.W_OK | os.X_OK):
        error(f"{args.output_dir}: cannot write the output directory")
        return False
    return True


@dataclass(frozen=True)
class Outputs:
    log_fd: int  # the text log: stderr, or --log
    events_fd: int | None  # --events
    results: IO[str] | None  # --results


def _open_outputs(args: argparse.Namespace) -> Outputs | None:
    """--log, --events and --results, opened; None after saying which cannot be."""
    log_fd = _open_for_append(args.log, "the log") if args.log is not None else 2
    events_fd = _open_for_append(args.events, "events") if args.events is not None else None
    if log_fd is None or (args.events is not None and events_fd is None):
        return None
    results = None
    if args.results == "-":
        # Standard output as it is (closefd=False: closing the run's results leaves fd 1
        # open); only main writes to it, as it would to a results file.
        results = open(1, "w", encoding="utf-8", closefd=False)
    elif args.results is not None:
        try:
            results = open(args.results, "w", encoding="utf-8")
        except OSError as e:
            error(f"{args.results}: cannot write results: {e.strerror}")
            return None
    return Outputs(log_fd, events_fd, results)


def _open_for_append(path: str, what: str) -> int | None:
    """A descriptor every process of the run writes whole lines to (O_APPEND: one write()
    is one line, whoever writes it); None after saying why it cannot be opened."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    except OSError as e:
        error(f"{path}: cannot write {what}: {e.strerror}")
        return None


def _route_the_log(
    args: argparse.Namespace, outputs: Outputs, layout: PoolLayout
) -> tuple[LiveView | None, int | None]:
    """Set up the log (what stderr shows: observe/shown.py). On a terminal without -q, the
    live view, started, and the read end of the pipe the children write their events to;
    else (None, None). --log FILE gets the whole log whatever stderr shows."""
    text_level = logging.DEBUG if args.verbose else logging.INFO
    on_terminal = sys.stderr.isatty()
    if args.quiet or not on_terminal or _results_to_the_terminal(args):
        shown = _shown_without_a_view(args, on_terminal)
        if args.log is None:
            tplog.setup(outputs.log_fd, text_level, outputs.events_fd, shown=shown)
        else:  # the whole log to the file; stderr what -q or the terminal lets through
            tplog.setup(outputs.log_fd, text_level, outputs.events_fd,
                        stderr_shown=shown if args.quiet or on_terminal else None)
        return None, None
    from taskpool.observe.live import LiveView

    # The demo's crash-recovery log is the point of watching it; -v asks for every line.
    shown = Shown.EVERYTHING if args.verbose or args.demo else Shown.WATCHED
    pools = {pool.number: pool.label for pool in layout.pools} if layout.typed else None
    live = LiveView(shown, text_level, outputs.events_fd, pools)
    live_fd, live_w = _event_pipe()
    handler = tplog.LiveHandler(live_w, os.getpid(), live.on_event, live.wants_job_lines)
    tplog.setup(outputs.log_fd if args.log is not None else None, text_level,
                outputs.events_fd, live=handler)
    live.start()
    return live, live_fd


def _event_pipe() -> tuple[int, int]:
    """The children's events to main's live view: main reads it when it draws, up to ten
    times a second, so it is made to hold more than the default 64 KiB (~1,600 events) if
    the system lets it (fs.pipe-max-size); else a writer waits for the next drawing. Its
    read end does not block: main reads it through, to the end."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    fcntl.fcntl(read_end, fcntl.F_SETFL, fcntl.fcntl(read_end, fcntl.F_GETFL) | os.O_NONBLOCK)
    return read_end, write_end


def _results_to_the_terminal(args: argparse.Namespace) -> bool:
    """`--results -` on a terminal: the results lines would tear the live view's redraws
    apart, so there is no progress line (stderr shows what it would have shown above it)."""
    return args.results == "-" and sys.stdout is not None and sys.stdout.isatty()


def _shown_without_a_view(args: argparse.Namespace, on_terminal: bool) -> Shown:
    """What stderr shows with no live view: -q's errors and summary; on a terminal that
    --results - writes to as well (no progress line there, see above), what the view would
    show above it; into a pipe or a file, every line."""
    if args.quiet:
        return Shown.QUIET
    if on_terminal and not (args.verbose or args.demo):
        return Shown.WATCHED
    return Shown.EVERYTHING


# --- The pool's crash plan and policy ---------------------------------------------------

def _crash_plan(args: argparse.Namespace) -> CrashPlan:
    """Simulated crashes (logged, with the seed that repeats them) and injected faults."""
    crash_rate = args.crash_rate
    if crash_rate is None:
        crash_rate = DEMO_CRASH_RATE if args.demo else 0.0
    seed = args.seed
    if seed is None:
        seed = DEMO_SEED if args.demo else secrets.randbits(32)
    if crash_rate > 0:
        main_log.info(
            "Simulating crashes: rate %g, seed %d (repeat with --seed %d)",
            crash_rate, seed, seed)
    return CrashPlan(crash_rate, seed, frozenset(args.inject_fault))


def _policy(args: argparse.Namespace, workers: int) -> SupervisionPolicy:
    max_attempts = args.max_attempts
    if max_attempts is None:
        max_attempts = 0 if args.demo else DEFAULT_MAX_ATTEMPTS
    return SupervisionPolicy(
        max_attempts=max_attempts,
        max_restarts=args.max_restarts or max(DEFAULT_MAX_RESTARTS, workers),
        restart_window=args.restart_window or DEFAULT_RESTART_WINDOW,
        timeout=args.timeout,
        heartbeat=DEFAULT_HEARTBEAT if args.heartbeat is None else args.heartbeat or None,
        grace=args.grace,
        max_tasks_per_child=args.max_tasks_per_child,
        max_memory_mb=args.max_memory,
        halt=args.halt or HaltPolicy(),
        retry_failed=args.retry_failed or 0,
    )
