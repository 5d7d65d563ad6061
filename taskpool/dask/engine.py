"""The Dask engine: the same jobs, results and guarantees on a Dask distributed cluster.

`taskpool run --engine dask` starts a cluster of its own (a LocalCluster: a scheduler in
this process, one nanny per worker here too, each worker a spawned process of one thread)
or connects to one (`--scheduler tcp://HOST:PORT`), submits one Dask task per attempt of a
job, and hands every outcome to the same Recorder as the local engine. Who does what::

    main thread ──map(run_job, keys taskpool-R-J-A.T, resources, priority)──> scheduler ──> worker
         ^                                                                                  │
         ├── start pipe (our own cluster): a job started, its value; written by its worker <┤
         │  inbox (a deque) + one byte on the wake pipe                                     │
         ├── client's loop thread: a future is done ("done"), erred, cancelled <────────────┤
         ├── client's loop thread (--scheduler): a job started, its value <── log_event ────┘
         ├── client's loop thread (--scheduler): a worker joined or was removed (the
         │   scheduler's "all" topic: the tasks it held)
         ├── stdin thread: jobs and bad lines read from standard input
         ├── distributed's log records (any of its threads); the nanny's line (our own
         │   cluster): a worker process exited, and how
         └── SIGINT/SIGTERM: their number, written to the pipe by signal.set_wakeup_fd

The main thread runs the engines' one loop (core/loop.py) and owns every piece of state
below (tries, attempts, which job runs where, the Recorder); the other threads only append
to the inbox (deque.append is atomic) and wake it, so no lock is needed (but the one that
keeps a wake-up from a descriptor closed at the end: post()). The pieces:

    engine.py      the loop's duties: submit, read the starts and the inbox, record, stop
    supervisor.py  what a try that erred, a worker's death, a --timeout mean for the job
    state.py       the bookkeeping: Try, WorkerSeen, Counts, Tries
    cluster.py     starting, reaching and closing the cluster; distributed's logging
    worker.py      what runs in a Dask worker: one attempt of one job
    commands.py    ... and of a job of real work (sh, exec, call), by core/commands.py

Attempts are counted here, not by Dask. On our own cluster the scheduler's allowed-failures
is 0: when a worker dies, every task it held errs at once with KilledWorker, and this loop
decides, by the supervision rules every engine shares (core/supervision.py). The job that
worker was running is charged an attempt and sent again under a new key, until
--max-attempts; any other is sent again uncharged: one only waiting in that worker's queue,
and one that had completed but whose result died with a worker, before the scheduler heard
of it (a worker goes straight on to its next task; if that one kills it at once, the report
of the last one dies too) or before we fetched it (Dask's run again was waiting in the dead
worker's queue). Which one was running is known for sure on our own cluster: the last one
its one thread started. A job's start is written by its worker to main's start pipe
(worker.py) before anything else, as a local worker's ACK, and that pipe is read before
each death is judged. On a cluster given by --scheduler, a scheduler plugin gives our own
tasks the same at-once error (cluster.count_attempts_ourselves), and a loss is judged from
the scheduler's "remove-worker" event, which lists the tasks the worker held: those it had
told us it started, and for its threads left over the ones it would have run first (a start
sent as an event can die with its worker), were running (state.Tries.running_on).

A job of real work (sh, exec, call) is run by its worker with the local workers' code; its
value says how it ended (dask/commands.py), and its output waits in our private run
directory (written there by the command on our own cluster, by us from the value on a given
one) until the Recorder delivers it, once, as it records the job (core/output.py). Its
worker tells us its command's process group, which we kill if the worker dies first.

A job's result is recorded once: the Recorder keeps the first outcome of a job id and drops
any other, and every try of a job has its own key, so a late result of an abandoned try
cannot be mistaken for another's.

One process, four role tags, as the local engine's duties: [Dask] for what the local Dealer
says (jobs sent, started, done; stopping), [Main] for the run's end (interrupted, a lost
scheduler), [Supervisor] for worker deaths and verdicts, [Recovery] for jobs sent again.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import secrets
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from taskpool.core.engine import RunConfig
from taskpool.core.loop import INTERRUPTS, EngineLoop, Rung, set_nonblocking
from taskpool.core.output import JobOutput
from taskpool.core.stdin import streamed_jobs
from taskpool.core.supervision import Again, Halt, halt_due, sent_again_words
from taskpool.dask.cluster import (
    DaskMissing,
    close_cluster,
    cluster_workers,
    configure_own_cluster,
    connect,
    count_attempts_ourselves,
    install_hint,
    local_cluster,
    log_connected,
    log_own_cluster_started,
    quiet_distributed,
    remove_plugin,
    require_distributed,
    resource_name,
    scheduler_address_error,
    taskpool_problems,
    warn_of_missing_resources,
)
from taskpool.dask.state import ClusterWorkers, Tries, Try, dask_priority
from taskpool.dask.supervisor import Supervisor
from taskpool.dask.worker import TOPIC, RealWork, run_job
from taskpool.model.jobs import COMMAND_KINDS, Job
from taskpool.model.outcome import DealerStats, JobRecord, Status
from taskpool.observe import events as ev
from taskpool.observe.log import dask_log as log
from taskpool.observe.log import event, job_event, main_log
from taskpool.posix.spool import (
    attempt_paths,
    make_run_dir,
    remove_run_dir,
    sweep_abandoned_run_dirs,
)
from taskpool.wire.commands import Ending
from taskpool.wire.records import LineRejected

if TYPE_CHECKING:
    from distributed import Client, SpecCluster

# The CLI asks these of the engine's module before it starts one.
__all__ = ["DaskEngine", "DaskMissing", "require_distributed", "scheduler_address_error"]


# A job to submit: (job, attempt, why it is sent again).
Unsent = tuple[Job, int, Again]


class DaskEngine(EngineLoop):
    """`taskpool run --engine dask`: see the module's docstring."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.layout = config.pool.layout
        self.policy = config.pool.policy
        plan = config.pool.plan
        self.plan = plan if plan.rate > 0 or plan.injected else None
        self.own_cluster = config.scheduler is None
        # Our keys, unique on a scheduler shared by runs: taskpool-<run>-<job>-<attempt>.<try>
        self.key_prefix = f"taskpool-{secrets.token_hex(4)}-"
        self.unsent: list[Unsent] = []  # submitted at the end of the loop's turn
        self.done_records: list[JobRecord] = []  # recorded at the end of the loop's turn
        self.try_numbers = itertools.count(1)
        self.inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        # Guards the wake pipe's closing against post()s from distributed's threads.
        self.wake_lock = threading.Lock()
        self.wake_closed = False
        # Our own cluster's workers write each job's start here (see worker.py).
        self.start_r, self.start_w = os.pipe() if self.own_cluster else (-1, -1)
        self.start_path = f"/proc/{os.getpid()}/fd/{self.start_w}" if self.own_cluster \
            else None
        self.start_pending = b""
        if self.start_r >= 0:
            set_nonblocking(self.start_r)
        self.tries = Tries(self.own_cluster)
        self.supervisor = Supervisor(self.tries, self.policy, self.recorder, self._submit,
                                     self._cancel)
        self.input_open = config.source.jobs is None
        self.stopping_deadline: float | None = None  # the end of --grace after a signal
        self.stop_now = False
        self.halted = False  # --halt's condition was met: no job is submitted any more
        self.failures_seen = 0  # the failures --halt has judged so far
        # The jobs this run runs (--halt fail=P%'s base): a file's, or those read so far.
        self.jobs_run = 0 if config.source.jobs is None else sum(
            1 for job in config.source.jobs if job.job_id not in config.source.done)
        self.cluster: SpecCluster | None = None
        self.client: Client | None = None
        self.scratch: str | None = None  # our own cluster's temporary directory
        self.cluster_workers = ClusterWorkers(config.dask_wait)  # a --scheduler's workers
        self.attempts_plugin: str | None = None  # see cluster.count_attempts_ourselves
        # Our private run directory: the output of jobs of real work until it is delivered
        # (dask/commands.py); made with the first such job, removed when the run ends (a
        # SIGKILLed main's is swept by the next run, as the local engine's).
        self.run_dir: str | None = None

    def run(self) -> int:
        # The run's directory goes after the recorder's last outcomes, which deliver output.
        try:
            return super().run()
        finally:
            if self.run_dir is not None:
                remove_run_dir(self.run_dir)

    def post(self, item: tuple[Any, ...]) -> None:
        """From any thread: hand an item to the main loop and wake it. Once the loop's
        wake pipe is closed (distributed's threads may still log as the run ends), the
        item is only kept: its descriptor number may already be another file's."""
        self.inbox.append(item)
        with self.wake_lock:
            if self.wake_closed:
                return
            try:
                os.write(self.wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the loop will see the item

    # --- the run ---------------------------------------------------------------------

    def execute(self) -> None:
        # Our signals are blocked in every thread but this one, from before the cluster's
        # threads start: they inherit the mask, and so do the worker processes they spawn
        # (the mask survives fork and exec). So a Ctrl-C to the process group reaches this
        # thread alone, and the workers go on until we stop them, as the local engine's do.
        # One thing would undo it: multiprocessing starts its resource tracker (with the
        # first spawned process) between a block and an UNBLOCK of these two signals, in
        # whichever thread spawns first; started here, before the block, it never does.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        # _close runs however _start ends: a cluster it started and then raised past (in
        # submitting, say) is closed and its scratch space removed, not left to our exit.
        try:
            with self.signals_held(INTERRUPTS):
                try:
                    started = self._start()
                finally:
                    self.install_signal_handlers(INTERRUPTS)
            if started:
                self.run_loop()
            else:
                # A signal held while we tried to start (up to --connect-timeout): the run
                # was interrupted, as the local engine's would be (128 + the signal).
                self.handle_signals()
        finally:
            self.stop_waking()
            self._close()
            self._set_stats()

    def _start(self) -> bool:
        """Start or reach the cluster, then submit the file's jobs; False if there is no
        cluster to run on."""
        quiet_distributed(self.post)
        if not (self._start_own_cluster() if self.own_cluster else self._connect()):
            return False
        assert self.client is not None
        self.supervisor.log_policy()
        if self.config.source.jobs is not None:
            for job in self.config.source.jobs:
                if job.job_id not in self.config.source.done:
                    self._submit(job, attempt=1)
            self._send_unsent()
        else:
            threading.Thread(target=self._read_stdin, name="stdin", daemon=True).start()
        return True

    def _start_own_cluster(self) -> bool:
        from distributed import Client

        self.scratch = configure_own_cluster()
        try:
            self.cluster = local_cluster(self.layout)
            self.client = Client(self.cluster, set_as_default=False)
        except Exception as e:  # noqa: BLE001 - any failure to start is said plainly
            self._no_cluster(f"the LocalCluster could not start ({e})")
            return False
        log_own_cluster_started(self.cluster, self.layout)
        return True

    def _connect(self) -> bool:
        """Reach the --scheduler, hear of its workers joining and leaving (its "all" topic)
        and of our jobs' starts (our topic), check its workers, and make its scheduler
        leave the counting of attempts to us (cluster.count_attempts_ourselves)."""
        address = self.config.scheduler
        assert address is not None
        try:
            self.client = connect(address, self.config.connect_timeout)
            self.client.subscribe_topic(TOPIC, lambda ev: self.post(("started", ev[1])))
            self.client.subscribe_topic("all", lambda ev: self._on_cluster_event(ev[1]))
            workers = cluster_workers(self.client)
        except Exception as e:  # noqa: BLE001
            self._no_cluster(f"the Dask scheduler at {address} could not be reached ({e})")
            self.bad_setup = True  # an address the user gave: exit 2
            return False
        log_connected(address, workers)
        self.cluster_workers.describe(workers, self.layout)
        if not workers:
            self._wait_for_a_worker()
        elif not self._check_workers():
            return False
        warn_of_missing_resources(self.layout, workers)
        self.attempts_plugin = count_attempts_ourselves(self.client, self.key_prefix)
        self.tries.dask_retries = self.attempts_plugin is None
        return True

    def _check_workers(self) -> bool:
        """The pre-flight: every worker present, not checked yet, imports taskpool at our
        version; else the run cannot work there, a set-up error (exit 2) said plainly."""
        assert self.client is not None
        unchecked = [a for a in self.cluster_workers.present
                     if a not in self.cluster_workers.checked]
        if not unchecked:
            return True
        try:
            problems = taskpool_problems(self.client, unchecked, self.config.connect_timeout)
        except Exception as e:  # noqa: BLE001 - a worker that does not answer in time
            problems = [f"its workers did not all answer within {self.config.connect_timeout:g}"
                        f" s whether they have taskpool ({type(e).__name__}: {e})"]
        if not problems:
            self.cluster_workers.checked.update(unchecked)
            return True
        self._no_cluster(f"the Dask cluster at {self.config.scheduler} cannot run taskpool's "
                         f"jobs: {'; '.join(problems)}; {install_hint()}")
        self.bad_setup = True
        self.stop_now = True
        return False

    def _wait_for_a_worker(self) -> None:
        """The cluster has no worker: jobs wait (on the scheduler) for one to join, up to
        --dask-wait seconds (a timer of the loop), and are then reported not done."""
        wait = self.config.dask_wait
        log.warning("The Dask cluster has no worker: waiting up to %g s for one "
                    "(--dask-wait)", wait, extra=event(ev.DASK_NO_WORKER, wait=wait))

    def _no_cluster(self, why: str) -> None:
        self.config.report_error(why)
        self.end_reason = why
        self.cut_short = True

    # --- the loop's duties (core/loop.py) ------------------------------------------------

    def finished(self) -> bool:
        if self.stop_now:
            return True
        if self.interrupted is not None or self.halted:
            return not self.tries.any_running()
        return not self.input_open and not self.tries and not self.unsent

    def descriptors(self) -> list[int]:
        return [self.start_r] if self.own_cluster else []

    def read_ready(self, ready: list[int]) -> None:
        # Starts first: every start a worker wrote before it died, or before its result,
        # is in the pipe by the time the death or the result is in the inbox; so only what
        # the inbox held before this read is handled now.
        arrived = len(self.inbox)
        self._read_starts()
        self._drain_inbox(arrived)
        self._record_turn()
        self._send_unsent()

    def input_done(self) -> bool:
        return not self.input_open

    def timers(self) -> list[float]:
        """The next --timeout, end of --grace, parked death's wait or --dask-wait due."""
        now = time.monotonic()
        waits = self.tries.seconds_to_deadlines(now) + self.supervisor.seconds_to_parked(now)
        if self.stopping_deadline is not None:
            waits.append(self.stopping_deadline - now)
        give_up = self.cluster_workers.seconds_to_give_up(now)
        if give_up is not None and not self.own_cluster:
            waits.append(give_up)
        return waits

    def check_timers(self) -> None:
        """The deadlines due; and, once a job has failed since the last look, --halt."""
        if self.recorder.failed > self.failures_seen and not (self.halted or self.stop_now
                                                              or self.interrupted):
            self.failures_seen = self.recorder.failed
            halt = halt_due(self.policy.halt, self.recorder.failed, self.jobs_run)
            if halt is not None:
                self._halt(halt)
        now = time.monotonic()
        self.supervisor.check_parked(now)
        for overdue in self.tries.overdue(now):
            self.supervisor.on_timeout(overdue)
        if self.stopping_deadline is not None and self.stopping_deadline <= now:
            running = [t for t in self.tries if t.running]
            log.info("Grace period over: %d running jobs not done", len(running),
                     extra=event(ev.GRACE_OVER, running=len(running)))
            self.stop_now = True
        give_up = self.cluster_workers.seconds_to_give_up(now)
        if give_up is not None and give_up <= 0 and not self.own_cluster:
            self._end_without_workers()
        self._send_unsent()

    def _end_without_workers(self) -> None:
        wait = self.config.dask_wait
        self.cut_short = True
        self.end_reason = f"the Dask cluster had no worker for {wait:g} s (--dask-wait)"
        main_log.error("The Dask cluster at %s had no worker for %g s (--dask-wait): ending "
                       "the run", self.config.scheduler, wait,
                       extra=event(ev.ROLE_LOST, lost="workers", how="none for --dask-wait"))
        self.stop_now = True

    def on_interrupt(self, rung: Rung, signum: int) -> None:
        """First signal: jobs not started are cancelled (reported not done), running ones
        get --grace to finish. Second: the run ends at once (and closing the cluster stops
        what still runs)."""
        if rung is Rung.GRACEFUL:
            self._stop_gracefully(signum)
        else:
            self.stop_now = True

    def _read_starts(self) -> None:
        if not self.own_cluster:
            return
        while True:
            try:
                chunk = os.read(self.start_r, 65536)
            except BlockingIOError:
                return
            lines = (self.start_pending + chunk).split(b"\n")
            self.start_pending = lines.pop()
            for line in lines:
                self._on_started(json.loads(line))

    def _drain_inbox(self, count: int) -> None:
        finished: list[Try] = []
        for _ in range(count):
            kind, *args = self.inbox.popleft()
            if kind == "done":
                done = self._on_done(args[0])
                if done is not None:
                    finished.append(done)
            elif kind == "started":
                self._on_started(args[0])
            elif kind == "worker_exited":
                self.supervisor.on_worker_exited(args[0], args[1])
            elif kind == "job":
                self._on_streamed_job(args[0])
            elif kind == "rejected":
                self.recorder.rejected_lines += 1
                self.config.report_error(args[0])
            elif kind == "input_closed":
                self.input_open = False
            else:
                self._on_cluster_item(kind, args)
        if finished:
            self._record_results(finished)

    # --- a given cluster's workers ----------------------------------------------------------

    def _on_cluster_event(self, msg: dict[str, Any]) -> None:
        """The client's loop thread: an event of the scheduler's "all" topic."""
        action = msg.get("action")
        if action == "add-worker":
            self.post(("worker_added", msg["worker"]))
        elif action == "remove-worker":
            self.post(("worker_removed", msg["worker"], list(msg.get("processing-tasks", ())),
                       bool(msg.get("expected"))))

    def _on_cluster_item(self, kind: str, args: list[Any]) -> None:
        if kind == "their_log":
            log.debug("%s: %s", args[0], args[1])
        elif kind == "worker_added":
            self._on_worker_added(args[0])
        elif kind == "worker_removed":
            address, keys, expected = args
            pool = self.cluster_workers.pool_of(address, self.layout)
            threads = self.cluster_workers.threads(address)
            self.supervisor.on_worker_removed(address, keys, expected, pool, threads)
            if self.cluster_workers.removed(address):
                self._wait_for_a_worker()

    def _on_worker_added(self, address: str) -> None:
        """A worker joined: it is described (for the exit table) and checked, and what
        waited for a checked worker is sent."""
        assert self.client is not None
        was_empty = not self.cluster_workers.present
        try:
            self.cluster_workers.describe(cluster_workers(self.client), self.layout)
        except Exception:  # noqa: BLE001 - a lost scheduler: said by its futures
            return
        if address not in self.cluster_workers.present:
            return  # gone again already
        (log.info if was_empty else log.debug)(
            "Worker %s joined the cluster (%d workers)", address,
            len(self.cluster_workers.present), extra=event(
                ev.DASK_WORKER_JOINED, address=address,
                workers=len(self.cluster_workers.present)))
        self._check_workers()

    # --- jobs in -----------------------------------------------------------------------

    def _read_stdin(self) -> None:
        """The stdin thread: parse each line as it comes, as the local TaskGenerator does;
        the main thread accepts, journals and submits."""
        for item in streamed_jobs(self.config.source):
            if isinstance(item, LineRejected):
                self.post(("rejected", f"{item.where}: {item.reason}"))
            else:
                self.post(("job", item))
        self.post(("input_closed",))

    def _on_streamed_job(self, job: Job) -> None:
        if self.interrupted is not None or self.halted:
            return  # read after the signal: never accepted, as with the local engine
        self.recorder.accept(job)
        if job.job_id not in self.config.source.done:
            self.jobs_run += 1
            self._submit(job, attempt=1)

    def _submit(self, job: Job, attempt: int, again: Again = None) -> None:
        """Send a job at the end of this turn of the loop (`_send_unsent`), with the others
        of the turn; `again`: why it is sent again, for the log."""
        self.unsent.append((job, attempt, again))

    def _send_unsent(self) -> None:
        """Submit the jobs of this turn: one client.map (one graph update, one message to
        the scheduler) for all of them, or one for each priority (and each pool, in typed
        pools): a map gives all its tasks one priority, one resource. Nothing is sent to a
        given cluster before one of its workers passed the pre-flight."""
        if not self.unsent or (not self.own_cluster and not self.cluster_workers.checked):
            return
        groups: dict[tuple[int, int], list[Unsent]] = collections.defaultdict(list)
        for unsent in sorted(self.unsent, key=lambda sent: -dask_priority(sent[0])):
            job = unsent[0]
            groups[job.pool if self.layout.typed else 0, job.priority].append(unsent)
        self.unsent = []
        for (pool, priority), batch in groups.items():
            self._map(batch, priority, {resource_name(pool): 1} if self.layout.typed else None)

    def _map(self, batch: list[Unsent], priority: int,
             resources: dict[str, int] | None) -> None:
        """One client.map of `batch`, in the order a worker should run it (the older job
        first): the scheduler orders one map's tasks by their place in it, and a map after
        the one before (fifo_timeout=0: each map is a generation of its own), after the
        priority."""
        assert self.client is not None
        keys = [f"{self.key_prefix}{job.job_id}-{attempt}.{next(self.try_numbers)}"
                for job, attempt, _ in batch]
        jobs = [job for job, _, _ in batch]
        futures = self.client.map(
            run_job, [j.job_id for j in jobs], [int(j.kind) for j in jobs],
            [j.text if j.kind in COMMAND_KINDS else j.arg for j in jobs],
            [attempt for _, attempt, _ in batch], keys, [self._real_work(j) for j in jobs],
            key=keys, plan=self.plan, start_path=self.start_path, pure=False, retries=0,
            priority=priority, fifo_timeout="0s", resources=resources)
        logged = log.isEnabledFor(logging.INFO)
        for (job, attempt, again), key, future in zip(batch, keys, futures):
            submitted = Try(job, attempt, key, future)
            self.tries.add(submitted)
            self._rearm(submitted)
            if logged:
                self._log_sent(job, attempt, key, again)

    def _real_work(self, job: Job) -> RealWork | None:
        """How a worker runs a job of real work: see dask/commands.py."""
        if job.kind not in COMMAND_KINDS:
            return None
        if self.run_dir is None:  # made for the first one: a run of none leaves nothing
            sweep_abandoned_run_dirs(self.config.output_dir)
            self.run_dir = make_run_dir(self.config.output_dir)
            self.recorder.output = JobOutput(self.run_dir, self.config.output_dir)
        return RealWork(self.supervisor.timeout_of(job),
                        self.run_dir if self.own_cluster else None)

    def _log_sent(self, job: Job, attempt: int, key: str, why: Again) -> None:
        again = sent_again_words(attempt, why)
        if self.layout.typed:
            text, args = "Job %d (%s, %s%s) -> resource %s%s", [
                job.job_id, self.layout.pool(job.pool).label, job.describe_typed(),
                f", priority {job.priority}" if job.priority else "",
                resource_name(job.pool), again]
        else:
            text, args = "Sent job %d -> %s%s", [job.job_id, job.describe(), again]
        fields: dict[str, Any] = {} if why is None else {"again": why[0], "from_worker": why[1]}
        log.info(text, *args, extra=event(
            ev.JOB_SENT, job=job.job_id, worker=None, attempt=attempt, kind=job.kind.label,
            arg=job.arg, type=job.pool, priority=job.priority, key=key, **fields))

    # --- what the cluster tells ------------------------------------------------------------

    def _on_started(self, msg: dict[str, Any]) -> None:
        """A worker's record: a try started, or (with "result") ended with a value."""
        if "result" in msg:
            self._on_result(msg)
            return
        if "command" in msg:
            self.tries.note_command(str(msg["key"]), int(msg["command"]))
            return
        started = self.tries.note_start(msg, self.supervisor.deadline_of)
        if started is None:
            return
        # The attempt this run is charged as: on our own cluster, a second start of a key
        # is the same attempt run again (see Tries.reruns), as its worker ran it.
        attempt = self.tries.attempts_used(started)
        # A DEBUG line, but always an event for the live view: its running jobs.
        job_event(log, ev.JOB_STARTED, "Job %d started by worker PID [%d] at %s (attempt %d)",
                  started.job.job_id, started.pid, started.address, attempt,
                  level=logging.DEBUG, job=started.job.job_id, worker=started.pid,
                  attempt=attempt, address=started.address, key=started.key,
                  worker_resources=msg.get("resources", {}))

    def _on_done(self, key: str) -> Try | None:
        """A future is done: the try, if it finished with a result to fetch."""
        done = self.tries.get(key)
        if done is None:
            return None  # a try we cancelled, or one already recorded
        status = done.future.status
        if status == "finished":
            self.tries.off_worker(done)  # now: a death behind it is judged by it
            return done
        if status == "error":
            self.supervisor.on_error(done)
        elif status == "cancelled":
            self._on_cancelled(done)
        else:
            # "lost": its result died with its worker before we fetched it; Dask computes
            # it again, and the future will be done again.
            self._rearm(done)
        return None

    def _record_results(self, finished: list[Try]) -> None:
        """Fetch the values of finished tries in one round trip, and record each."""
        assert self.client is not None
        try:
            values = self.client.gather([t.future for t in finished])
        except Exception:  # noqa: BLE001 - one of them was lost meanwhile
            values = []
            for done in finished:
                try:
                    values.append(self.client.gather(done.future))
                except Exception:  # noqa: BLE001 - its error or re-run comes next
                    values.append(None)
        for done, outcome in zip(finished, values):
            if outcome is None:
                self._rearm(done)
                continue
            self._record_done(done, *outcome)

    def _on_result(self, msg: dict[str, Any]) -> None:
        """A worker's record of a try's value (worker.py), which comes before the future is
        done (the same worker's stream, or the start pipe read first): recorded now, and
        the future's end finds nothing left to fetch. A try already ended (abandoned,
        cancelled, or recorded, its job run again after its result was lost) is dropped."""
        done = self.tries.get(str(msg["key"]))
        if done is not None:
            self._record_done(done, msg["result"], int(msg["pid"]), str(msg["address"]))

    def _record_done(self, done: Try, value: Any, pid: int, address: str) -> None:
        """A try's value: recorded with the others of this turn (_record_turn)."""
        self.tries.forget(done)
        job = done.job
        if job.kind in COMMAND_KINDS:
            self._record_real_work(done, value, pid, address)
            return
        attempts = self.tries.attempts_used(done)
        self.done_records.append(JobRecord.of(job, Status.DONE, result=value, worker=pid,
                                              attempts=attempts))
        log.info("Job %d (%s %s) done by worker PID [%d] at %s: %s", job.job_id,
                 job.kind.label, job.arg, pid, address, value,
                 extra=event(ev.JOB_DONE, job=job.job_id, worker=pid, attempt=attempts,
                             result=value, address=address))

    def _record_real_work(self, done: Try, value: dict[str, Any], pid: int,
                          address: str) -> None:
        """A job of real work's value (dask/commands.py): a command killed is judged as a
        crash of the attempt; one that ran to its end is done, or failed and perhaps run
        again (--retry-failed); the record carries its exit status and duration, and its
        output is delivered as it is recorded (core/output.py), as in the local engine."""
        assert self.run_dir is not None
        job = done.job
        if "signal" in value or "timed_out" in value:
            self.supervisor.on_command_killed(done, value.get("signal"), pid, address,
                                              self.run_dir)
            return
        ending = Ending(float(value["d"]), value.get("x"), value.get("r"), value.get("e"))
        if "out" in value:  # a given cluster's worker: its output inline
            _spool_inline(self.run_dir, job.job_id, pid, value["out"], value["err"])
        failure = self.supervisor.failed_run(done, job.kind, ending, pid, self.run_dir)
        if failure is False:
            return  # run again
        attempts = self.tries.attempts_used(done)
        status = Status.DONE if failure is None else Status.FAILED
        self.done_records.append(dataclasses.replace(
            JobRecord.of(job, status, result=ending.result, worker=pid, attempts=attempts,
                         reason=None if failure is None else failure.reason),
            exit_status=ending.exit_status, duration=round(ending.duration, 6)))
        if failure is None:
            log.info("Job %d (%s) done by worker PID [%d] at %s: %s", job.job_id,
                     job.describe(), pid, address,
                     ending.exit_status if ending.result is None else ending.result,
                     extra=event(ev.JOB_DONE, job=job.job_id, worker=pid, attempt=attempts,
                                 result=ending.result, exit_status=ending.exit_status,
                                 address=address))
            return
        log.info("Job %d failed: %s", job.job_id, failure.reason,
                 extra=event(ev.JOB_FAILED, job=job.job_id, worker=pid, attempts=attempts,
                             reason=failure.reason, exit_status=ending.exit_status))

    def _record_turn(self) -> None:
        """The values of this turn of the loop, recorded together: one write of their
        results lines (Recorder.record_all), not one a job."""
        if self.done_records:
            records, self.done_records = self.done_records, []
            self.recorder.record_all(records)

    def _cancel(self, tries: list[Try]) -> None:
        assert self.client is not None
        self.client.cancel([t.future for t in tries])

    def _rearm(self, pending: Try) -> None:
        pending.future.add_done_callback(lambda f: self.post(("done", f.key)))

    def _on_cancelled(self, lost: Try) -> None:
        """A future we did not cancel was cancelled: by the cluster (sent again, not
        charged), or because the client lost its scheduler (the run ends)."""
        assert self.client is not None
        self.tries.forget(lost)
        if self.client.status == "running" and self.interrupted is None:
            self.supervisor.on_cancelled_by_cluster(lost)
            return
        if self.interrupted is None and not self.cut_short:
            self.cut_short = True
            self.end_reason = "the Dask scheduler was lost"
            main_log.error("Lost the Dask scheduler: ending the run",
                           extra=event(ev.ROLE_LOST, lost="scheduler"))
        self.stop_now = True

    # --- stopping --------------------------------------------------------------------------

    def _halt(self, halt: Halt) -> None:
        """--halt's condition is met: no job is submitted any more; with `now` the run ends
        at once (closing the cluster stops what runs), with `soon` the running jobs finish
        (a signal then gives them --grace). The jobs left are not done, for this reason."""
        self.halted = True
        self.end_reason = halt.reason
        if halt.policy.kills_running:
            running = sum(1 for t in self.tries if t.running)
            not_started = len(self.tries) - running
            self.stop_now = True
        else:
            running, not_started = self._cancel_waiting()
        what = ("killing %d running jobs" if halt.policy.kills_running
                else "letting %d running jobs finish")
        log.info("Halting: %s; " + what + "; %d jobs not started", halt.reason, running,
                 not_started,
                 extra=event(ev.HALTED, when=halt.policy.when, failed=halt.failed,
                             jobs=halt.jobs, reason=halt.reason, running=running,
                             not_started=not_started))

    def _cancel_waiting(self) -> tuple[int, int]:
        """Cancel the tries not started (reported not done): the running and the cancelled
        ones' counts."""
        self.supervisor.stop()
        self.unsent = []  # not started: not done
        waiting = self.tries.waiting()
        running = len(self.tries) - len(waiting)
        for cancelled in waiting:
            self.tries.forget(cancelled)
        if waiting and self.client is not None:
            self._cancel(waiting)
        return running, len(waiting)

    def _stop_gracefully(self, signum: int) -> None:
        """Cancel the tries not started (reported not done); let the running ones finish
        within --grace."""
        running, not_started = self._cancel_waiting()
        grace = self.policy.grace
        log.info("Stopping on %s: letting %d running jobs finish (grace %g s); "
                 "%d jobs not started", signal.Signals(signum).name, running, grace,
                 not_started,
                 extra=event(ev.STOPPING, running=running, grace=grace,
                             not_started=not_started))
        self.stopping_deadline = time.monotonic() + grace

    def _close(self) -> None:
        """Close the client and our cluster (see cluster.close_cluster), and our pipes."""
        self._record_turn()
        if self.client is not None and not self.own_cluster:
            remove_plugin(self.client, self.attempts_plugin)
        close_cluster(self.client, self.cluster, self.scratch,
                      [t.future for t in self.tries])
        # A command its worker was still running as the cluster closed (--halt now, a
        # second signal, the end of --grace): its process group goes with it.
        for running in self.tries:
            self.supervisor.kill_command(running)
        for fd in (self.start_r, self.start_w):
            if fd >= 0:
                os.close(fd)
        with self.wake_lock:
            self.wake_closed = True
            self.close_wake_pipe()
        # What distributed said as it closed, or after the loop's last turn.
        for kind, *args in list(self.inbox):
            if kind == "their_log":
                log.debug("%s: %s", args[0], args[1])
        log.info("Dask engine closed.", extra=event(ev.DEALER_STOPPED))

    def _set_stats(self) -> None:
        counts = self.supervisor.counts
        pools = []
        for pool in self.layout.pools:
            crashes = counts.per_pool.get(pool.number, 0)
            workers = pool.size if self.own_cluster else \
                self.cluster_workers.peak.get(pool.number, 0)
            pools.append({"type": pool.number, "workers": workers, "crashes": crashes,
                          "restarts": crashes if self.own_cluster else 0})
        self.recorder.stats = DealerStats(counts.crashes, counts.resends, pools=pools)


def _spool_inline(run_dir: str, job_id: int, pid: int, out: bytes, err: bytes) -> None:
    """A given cluster's job output, returned inline, into our run directory, where the
    Recorder delivers it from (a full disk loses it, said, not the run)."""
    for path, data in zip(attempt_paths(run_dir, job_id, pid), (out, err)):
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            main_log.error("Cannot keep the output of job %d (%s): it is not shown", job_id,
                           e.strerror or e)
