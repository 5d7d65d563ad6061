"""The Dask engine: the same jobs, results and guarantees on a Dask distributed cluster.

`taskpool run --engine dask` starts a cluster of its own (a LocalCluster: a scheduler in
this process, one nanny per worker here too, each worker a spawned process of one thread)
or connects to one (`--scheduler tcp://HOST:PORT`), submits one Dask task per attempt of a
job, and hands every outcome to the same Recorder as the local engine. Who does what::

    main thread ──submit(run_job, key=taskpool-R-J-A.T, resources, priority)──> scheduler ──> worker
         ^                                                                                  │
         ├── start pipe (our own cluster): a job started, written by its worker <───────────┤
         │  inbox (a deque) + one byte on the wake pipe                                     │
         ├── client's loop thread: a future is done ("done")  <─────────────────────────────┤
         ├── client's loop thread (--scheduler): a job started <── scheduler <── log_event ─┘
         ├── stdin thread: jobs and bad lines read from standard input
         ├── nanny's log (our own cluster): a worker process exited, and how
         └── SIGINT/SIGTERM: their number, written to the pipe by signal.set_wakeup_fd

The main thread owns every piece of state below (tries, attempts, which job runs where, the
Recorder); the other threads only append to the inbox (deque.append is atomic) and wake it,
so no lock is needed.

Attempts are counted here, not by Dask. On our own cluster the scheduler's allowed-failures
is 0: when a worker dies, every task it held errs at once with KilledWorker, and this loop
decides. The job that worker was running is charged an attempt and sent again under a new
key, until --max-attempts; any other is sent again uncharged: one only waiting in that
worker's queue, and one that had completed but whose result died with a worker, before the
scheduler heard of it (a worker goes straight on to its next task; if that one kills it at
once, the report of the last one dies too) or before we fetched it (Dask's run again was
waiting in the dead worker's queue). Which one was running is known for sure on our own
cluster: the last one its one thread started. A job's start is written by its worker to
main's start pipe (dask_worker.py) before anything else, as a local worker's ACK, and that
pipe is read before each death is judged. On a cluster given by --scheduler, starts
come as scheduler events, which a death can overtake: a job with no start seen is sent
again uncharged only if its one-thread worker was known to run another job, else charged.
There, the cluster's own allowed-failures stands: Dask may run a task again by itself
before it errs, and each start we saw counts.

A job's result is recorded once: the Recorder keeps the first outcome of a job id and drops
any other, and every try of a job has its own key, so a late result of an abandoned try
cannot be mistaken for another's.
"""

from __future__ import annotations

import collections
import fcntl
import itertools
import json
import logging
import math
import os
import re
import secrets
import select
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskpool.core.engine import Engine, RunConfig
from taskpool.core.stdin import streamed_jobs
from taskpool.dask.worker import TOPIC, run_job
from taskpool.model.jobs import Job
from taskpool.model.outcome import DealerStats, JobRecord, Status
from taskpool.observe import events as ev
from taskpool.observe.log import event
from taskpool.posix import proc
from taskpool.wire.records import LineRejected

if TYPE_CHECKING:
    from distributed import Client, Future, SpecCluster

log = logging.getLogger("taskpool.dask")
main_log = logging.getLogger("taskpool.main")
supervisor_log = logging.getLogger("taskpool.supervisor")
recovery_log = logging.getLogger("taskpool.recovery")

INSTALL_HINT = "--engine dask needs the dask extra: pip install 'taskpool[dask]'"
STDIN_NAME = "<stdin>"
# Seconds for our cluster to close; distributed's Nanny kills a worker process that has not
# stopped after 0.8 of it (4 s), which README gives as the wait.
CLOSE_TIMEOUT = 5.0
# Job ids below this keep their order within a priority (dask_priority); the largest
# encoded value, 32767 * 2**40, fits the 64-bit integers Dask's messages carry.
ID_SPAN = 2**40
DEATH_REPORT_WAIT = 2.0  # seconds a worker's death waits for its exit status (the nanny's)


class DaskMissing(Exception):
    """`distributed` cannot be imported; the message says how to install it."""


def require_distributed() -> None:
    """Import distributed now, or raise DaskMissing: the CLI checks this before reading any
    job, so that a missing extra is said first and plainly."""
    try:
        import distributed  # noqa: F401
    except ImportError as e:
        raise DaskMissing(f"{INSTALL_HINT} ({e})") from None


def scheduler_address_error(address: str) -> str | None:
    """Why `address` is not an address Dask can connect to (no port, an unknown scheme), or
    None. The CLI asks before anything runs: given such an address, distributed's Client
    fails in a way that leaves it half built, and its finalizer then hangs the exit."""
    from distributed.comm.addressing import parse_address
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme).get_address_host_port(location)
    except NotImplementedError:
        return None  # a scheme without host:port addresses (ucx): Dask will say at connect
    except (ValueError, TypeError) as e:
        return str(e)
    return None


# --- state ------------------------------------------------------------------------------

@dataclass
class Try:
    """One submission of a job: a Dask task of its own key. It is one attempt, or more on
    a cluster whose scheduler runs a task again after a worker death (allowed-failures)."""

    job: Job
    attempt: int  # the attempt number of this try's first run
    key: str
    future: Future[Any]
    starts: int = 0  # "started" events seen for this key
    pid: int | None = None  # the worker process running it, once started
    address: str | None = None
    started_at: float | None = None  # time.monotonic() when its start reached us
    deadline: float | None = None  # its --timeout, from its start
    timed_out: bool = False


@dataclass
class WorkerSeen:
    """A Dask worker, as its jobs' start events show it."""

    address: str
    pid: int
    pool: int | None  # the pool of our own cluster's worker; None on a given cluster
    nthreads: int
    running: str | None = None  # the key of the try it runs, if it runs one alone


@dataclass
class Counts:
    crashes: int = 0
    resends: int = 0
    per_pool: dict[int, int] = field(default_factory=lambda: collections.defaultdict(int))


_NANNY_EXIT = re.compile(r"^Worker process (\d+) (?:was killed by signal (\d+)|exited with "
                         r"status (\d+))")


class _NannyExits(logging.Handler):
    """distributed has no hook for a worker process's exit status; its nanny (in our
    process, for our own cluster) logs it. This handler turns that line into an inbox item."""

    def __init__(self, engine: DaskEngine) -> None:
        super().__init__(logging.INFO)
        self.engine = engine

    def emit(self, record: logging.LogRecord) -> None:
        match = _NANNY_EXIT.match(record.getMessage())
        if match is None:
            return
        pid = int(match.group(1))
        if match.group(2) is not None:
            how = proc.describe_wait_status(int(match.group(2)))  # a raw status: the signal
        else:
            how = f"exited with status {match.group(3)}"
        self.engine.post(("worker_exited", pid, how))


class DaskEngine(Engine):
    """`taskpool run --engine dask`: see the module's docstring."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.layout = config.pool.layout
        self.policy = config.pool.policy
        plan = config.pool.plan
        self.plan = plan if plan.rate > 0 or plan.injected else None
        self.own_cluster = config.scheduler is None
        self.run_token = secrets.token_hex(4)  # keys unique on a scheduler shared by runs
        self.try_numbers = itertools.count(1)
        self.inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self.wake_r, self.wake_w = os.pipe()
        # Our own cluster's workers write each job's start here (see dask_worker.py).
        self.start_r, self.start_w = os.pipe() if self.own_cluster else (-1, -1)
        self.start_path = f"/proc/{os.getpid()}/fd/{self.start_w}" if self.own_cluster \
            else None
        self.start_pending = b""
        for fd in (self.wake_r, self.wake_w, self.start_r):
            if fd < 0:
                continue
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.tries: dict[str, Try] = {}  # outstanding, by key
        self.workers: dict[str, WorkerSeen] = {}  # by address
        self.pid_pools: dict[int, int | None] = {}
        self.deaths: dict[int, str] = {}  # worker pid: how it exited (our own cluster)
        self.dead_addresses: set[str] = set()
        self.counts = Counts()
        # Deaths of our own cluster's workers waiting for the nanny's report (see _on_error)
        self.parked: list[tuple[float, Try, Any]] = []
        self.input_open = config.source.jobs is None
        self.stopping_deadline: float | None = None  # the end of --grace after a signal
        self.stop_now = False
        self.cluster: SpecCluster | None = None
        self.client: Client | None = None
        self.scratch: str | None = None  # our own cluster's temporary directory

    def post(self, item: tuple[Any, ...]) -> None:
        """From any thread: hand an item to the main loop and wake it."""
        self.inbox.append(item)
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
        handled = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        # _close runs however _start ends: a cluster it started and then raised past (in
        # submitting, say) is closed and its scratch space removed, not left to our exit.
        try:
            try:
                started = self._start()
            finally:
                signal.set_wakeup_fd(self.wake_w)
                for sig in handled:
                    signal.signal(sig, _note_signal)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
            if started:
                self._loop()
            else:
                # A signal held while we tried to start (up to --connect-timeout): the run
                # was interrupted, as the local engine's would be (128 + the signal).
                self._on_wake()
        finally:
            signal.set_wakeup_fd(-1)
            self._close()
            self._set_stats()

    def _start(self) -> bool:
        """Start or reach the cluster, then submit the file's jobs; False if there is no
        cluster to run on."""
        import dask
        from distributed import Client

        _quiet_distributed(self)
        if self.own_cluster:
            # Attempts are counted here (see the module's docstring); and a worker holds
            # every task assigned to it in its own priority queue, so Dask's priority
            # orders what waits (no queueing on the scheduler, where only some tasks
            # would wait). Its scratch space (distributed's dask-scratch-space: the
            # workers' directories, lock files) is a directory of the run's own, removed
            # at the end. Spawned workers inherit this configuration.
            self.scratch = tempfile.mkdtemp(prefix="taskpool-dask-")
            dask.config.set({"distributed.scheduler.allowed-failures": 0,
                             "distributed.scheduler.worker-saturation": math.inf,
                             "temporary-directory": self.scratch})
            try:
                self.cluster = _local_cluster(self.layout)
                self.client = Client(self.cluster, set_as_default=False)
            except Exception as e:  # noqa: BLE001 - any failure to start is said plainly
                self._no_cluster(f"the LocalCluster could not start ({e})")
                return False
            log.info("Started a LocalCluster: scheduler %s, %d workers of 1 thread%s",
                     self.cluster.scheduler_address, self.layout.total_workers,
                     f" ({self.layout.describe()})" if self.layout.typed else "",
                     extra=event(ev.DASK_STARTED, scheduler=self.cluster.scheduler_address,
                                 workers=self.layout.total_workers, own_cluster=True))
        else:
            log.info("Connecting to the Dask scheduler at %s (for up to %g s)",
                     self.config.scheduler, self.config.connect_timeout,
                     extra=event(ev.DASK_CONNECTING, scheduler=self.config.scheduler,
                                 timeout=self.config.connect_timeout))
            try:
                self.client = Client(self.config.scheduler,
                                     timeout=self.config.connect_timeout,
                                     set_as_default=False)
                workers = cluster_workers(self.client)
            except Exception as e:  # noqa: BLE001
                self._no_cluster(f"the Dask scheduler at {self.config.scheduler} could not "
                                 f"be reached ({e})")
                self.bad_setup = True  # an address the user gave: exit 2
                return False
            threads = sum(w.get("nthreads", 0) for w in workers.values())
            log.info("Connected to the Dask scheduler at %s: %d workers, %d threads",
                     self.config.scheduler, len(workers), threads,
                     extra=event(ev.DASK_STARTED, scheduler=self.config.scheduler,
                                 workers=len(workers), threads=threads, own_cluster=False))
            self._check_resources(workers)
        supervisor_log.info("%s", self._describe_policy())
        if not self.own_cluster:
            self.client.subscribe_topic(TOPIC, lambda ev: self.post(("started", ev[1])))
        if self.config.source.jobs is not None:
            for job in self.config.source.jobs:
                if job.job_id not in self.config.source.done:
                    self._submit(job, attempt=1)
        else:
            threading.Thread(target=self._read_stdin, name="stdin", daemon=True).start()
        return True

    def _no_cluster(self, why: str) -> None:
        self.config.report_error(why)
        self.end_reason = why
        self.cut_short = True

    def _describe_policy(self) -> str:
        policy = self.policy
        attempts = "unlimited" if policy.max_attempts == 0 else str(policy.max_attempts)
        failures = "0" if self.own_cluster else "the cluster's"
        timeout = "none" if policy.timeout is None else f"{policy.timeout:g}s"
        how = "worker killed" if self.own_cluster else "task abandoned, runs on"
        return (f"dask engine, max_attempts={attempts} (counted here; scheduler "
                f"allowed-failures={failures}), timeout={timeout} ({how}), "
                f"grace={policy.grace:g}s")

    def _check_resources(self, workers: dict[str, Any]) -> None:
        if not self.layout.typed:
            return
        offered = {name for w in workers.values() for name in w.get("resources", {})}
        for pool in self.layout.pools:
            if pool.size and resource_name(pool.number) not in offered:
                log.warning("No worker of the cluster offers %s yet: its jobs wait for one "
                            "(dask worker ... --resources %s=1)",
                            resource_name(pool.number), resource_name(pool.number))

    def _loop(self) -> None:
        while not self._finished():
            timeout = self._seconds_to_wait()
            watched = [self.wake_r] + ([self.start_r] if self.own_cluster else [])
            ready, _, _ = select.select(watched, [], [], timeout)
            if self.wake_r in ready:
                self._on_wake()
            # Starts first: every start a worker wrote before it died, or before its
            # result, is in the pipe by the time the death or the result is in the inbox;
            # so only what the inbox held before this read is handled now.
            arrived = len(self.inbox)
            self._read_starts()
            self._drain_inbox(arrived)
            if self.recorder.seconds_to_commit() == 0.0:
                self.recorder.commit()
            self._check_deadlines()
            live = self.config.live
            if live is not None:
                known = len(self.recorder.known)
                live.set_jobs(known, None if self.input_open else known)
                if live.seconds_to_redraw() == 0.0:
                    live.redraw()

    def _finished(self) -> bool:
        if self.stop_now:
            return True
        if self.interrupted is not None:
            return not any(t.started_at is not None for t in self.tries.values())
        return not self.input_open and not self.tries

    def _seconds_to_wait(self) -> float | None:
        """select()'s timeout: the next journal commit, --timeout or end of --grace due;
        None (until something happens) when none is pending."""
        now = time.monotonic()
        waits = [t.deadline - now for t in self.tries.values()
                 if t.deadline is not None and not t.timed_out]
        commit = self.recorder.seconds_to_commit()
        if commit is not None:
            waits.append(commit)
        if self.stopping_deadline is not None:
            waits.append(self.stopping_deadline - now)
        waits += [deadline - now for deadline, _, _ in self.parked]
        redraw = self.config.live.seconds_to_redraw() if self.config.live else None
        if redraw is not None:
            waits.append(redraw)
        return max(0.0, min(waits)) if waits else None

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

    def _on_wake(self) -> None:
        try:
            data = os.read(self.wake_r, 4096)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGINT, signal.SIGTERM):
                self._on_interrupt(signum)

    def _drain_inbox(self, count: int) -> None:
        finished: list[Try] = []
        for _ in range(count):
            item = self.inbox.popleft()
            kind = item[0]
            if kind == "done":
                done = self.tries.get(item[1])
                if done is None:
                    continue  # a try we cancelled, or one already recorded
                status = done.future.status
                if status == "finished":
                    self._off_worker(done)  # now: a death behind it is judged by it
                    finished.append(done)
                elif status == "error":
                    self._on_error(done)
                elif status == "cancelled":
                    self._on_cancelled(done)
                else:
                    # "lost": its result died with its worker before we fetched it; Dask
                    # computes it again, and the future will be done again.
                    self._rearm(done)
            elif kind == "started":
                self._on_started(item[1])
            elif kind == "worker_exited":
                self._on_worker_exited(item[1], item[2])
            elif kind == "job":
                self._on_streamed_job(item[1])
            elif kind == "rejected":
                self.recorder.rejected_lines += 1
                self.config.report_error(item[1])
            elif kind == "input_closed":
                self.input_open = False
        if finished:
            self._record_results(finished)

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
        if self.interrupted is not None:
            return  # read after the signal: never accepted, as with the local engine
        self.recorder.accept(job)
        if job.job_id not in self.config.source.done:
            self._submit(job, attempt=1)

    def _submit(self, job: Job, attempt: int) -> None:
        assert self.client is not None
        key = f"taskpool-{self.run_token}-{job.job_id}-{attempt}.{next(self.try_numbers)}"
        resources = {resource_name(job.pool): 1} if self.layout.typed else None
        future = self.client.submit(
            run_job, job.job_id, int(job.kind), job.arg, attempt, key, self.plan,
            self.start_path,
            key=key, pure=False, priority=dask_priority(job), resources=resources, retries=0)
        self.tries[key] = Try(job, attempt, key, future)
        self._rearm(self.tries[key])
        if log.isEnabledFor(logging.INFO):
            again = f" (attempt {attempt})" if attempt > 1 else ""
            if self.layout.typed:
                text, args = "Job %d (%s, %s%s) -> resource %s%s", [
                    job.job_id, self.layout.pool(job.pool).label, job.describe_typed(),
                    f", priority {job.priority}" if job.priority else "",
                    resource_name(job.pool), again]
            else:
                text, args = "Sent job %d -> %s%s", [job.job_id, job.describe(), again]
            log.info(text, *args, extra=event(
                ev.JOB_SENT, job=job.job_id, worker=None, attempt=attempt, kind=job.kind.label,
                arg=job.arg, type=job.pool, priority=job.priority, key=key))

    # --- what the cluster tells ------------------------------------------------------------

    def _on_started(self, msg: dict[str, Any]) -> None:
        address, pid = str(msg["address"]), int(msg["pid"])
        pool = _pool_of(str(msg.get("name", ""))) if self.own_cluster else None
        worker = self.workers.get(address)
        if worker is None:
            worker = self.workers[address] = WorkerSeen(address, pid, pool,
                                                        int(msg.get("nthreads", 1)))
            self.pid_pools[pid] = pool
        started = self.tries.get(str(msg["key"]))
        worker.running = str(msg["key"]) if worker.nthreads == 1 else None
        if started is None:
            return  # a try already ended here (cancelled, or recorded)
        started.starts += 1
        started.pid, started.address = pid, address
        started.started_at = time.monotonic()
        timeout = started.job.timeout or self.policy.timeout
        if timeout is not None:
            started.deadline = started.started_at + timeout
        if log.isEnabledFor(logging.DEBUG):
            # The attempt this run is charged as: on our own cluster, a second start of a
            # key is the same attempt run again (see _reruns), as its worker ran it.
            attempt = started.attempt + self._reruns(started)
            log.debug("Job %d started by worker PID [%d] at %s (attempt %d)",
                      started.job.job_id, pid, address, attempt,
                      extra=event(ev.JOB_STARTED, job=started.job.job_id, worker=pid,
                                  attempt=attempt,
                                  address=address, key=started.key,
                                  worker_resources=msg.get("resources", {})))

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
            value, pid, address = outcome
            self._forget(done)
            job = done.job
            attempts = done.attempt + self._reruns(done)
            self.recorder.record(JobRecord.of(job, Status.DONE, result=value, worker=pid,
                                              attempts=attempts))
            log.info("Job %d (%s %s) done by worker PID [%d] at %s: %s", job.job_id,
                     job.kind.label, job.arg, pid, address, value,
                     extra=event(ev.JOB_DONE, job=job.job_id, worker=pid, attempt=attempts,
                                 result=value, address=address))

    def _off_worker(self, ended: Try) -> None:
        """A try no longer runs on its worker."""
        if ended.address is not None:
            worker = self.workers.get(ended.address)
            if worker is not None and worker.running == ended.key:
                worker.running = None

    def _forget(self, ended: Try, off_worker: bool = True) -> None:
        """A try has an outcome: drop it here and on the cluster."""
        self.tries.pop(ended.key, None)
        if off_worker:
            self._off_worker(ended)
        ended.future.release()

    def _rearm(self, pending: Try) -> None:
        pending.future.add_done_callback(lambda f: self.post(("done", f.key)))

    def _on_cancelled(self, lost: Try) -> None:
        """A future we did not cancel was cancelled: by the cluster (sent again, not
        charged), or because the client lost its scheduler (the run ends)."""
        assert self.client is not None
        self._forget(lost)
        if self.client.status == "running" and self.interrupted is None:
            log.info("Job %d was cancelled by the cluster: sending it again",
                     lost.job.job_id, extra=event(ev.JOB_REQUEUED, job=lost.job.job_id,
                                                  reason="cancelled"))
            self._submit(lost.job, lost.attempt)
            return
        if self.interrupted is None and not self.cut_short:
            self.cut_short = True
            self.end_reason = "the Dask scheduler was lost"
            log.error("Lost the Dask scheduler: ending the run",
                      extra=event(ev.ROLE_LOST, lost="scheduler"))
        self.stop_now = True

    def _on_error(self, failed: Try) -> None:
        """A try erred: its worker died (KilledWorker) or the job raised. On our own
        cluster, a death is judged once the nanny has said how the process ended (it
        comes at about the same time, by another path), or after DEATH_REPORT_WAIT."""
        from distributed.scheduler import KilledWorker

        error = failed.future.exception()
        if isinstance(error, KilledWorker) and self.own_cluster \
                and self.interrupted is None and error.last_worker.pid not in self.deaths:
            self.parked.append((time.monotonic() + DEATH_REPORT_WAIT, failed, error))
            return
        self._judge(failed, error)

    def _unpark(self, now: float | None = None) -> None:
        """Judge the parked deaths whose report came, or whose wait is over (all of them
        if `now` is None), in the order they came."""
        still = []
        for parked in self.parked:
            deadline, failed, error = parked
            if now is None or deadline <= now or error.last_worker.pid in self.deaths:
                self._judge(failed, error)
            else:
                still.append(parked)
        self.parked = still

    def _judge(self, failed: Try, error: BaseException) -> None:
        from distributed.scheduler import KilledWorker

        if self.interrupted is not None:
            self._forget(failed)
            return  # stopping: the job is reported not done
        job = failed.job
        pid = failed.pid
        if isinstance(error, KilledWorker):
            lost = error.last_worker
            address, pid = lost.address, lost.pid
            # The worker is dead: what it was running stays known, to judge the others.
            self._forget(failed, off_worker=False)
            self._on_worker_lost(address)
            if self.own_cluster:
                ran_here = self._was_running(failed, address, pid)
            else:
                ran_here = failed.starts > 0 or not self._ran_another(address, failed.key)
            if not ran_here:
                if failed.starts == 0:
                    why, text = "unstarted", "it was waiting, unstarted, for %d (%s)"
                else:
                    why, text = "result_lost", ("it had completed, but its result was lost "
                                                "with a worker; it was not running on %d (%s)")
                recovery_log.info("Requeued job %d: " + text, job.job_id, pid, address,
                                  extra=event(ev.JOB_REQUEUED, job=job.job_id, worker=pid,
                                              reason=why, address=address))
                self._submit(job, failed.attempt)
                return
            reason = self._death_reason(failed, pid, address)
        else:
            self._forget(failed)
            address = failed.address or "an unknown worker"
            reason = f"raised {type(error).__name__}: {error}"
        used = failed.attempt + self._reruns(failed)
        if self._failed_for_good(job, used, pid, reason):
            return
        recovery_log.info("Resent job %d after crash of %s (%s): %s", job.job_id, pid, address,
                          reason, extra=event(ev.JOB_RESENT, job=job.job_id, worker=pid,
                                              address=address, reason=reason))
        self._submit(job, used + 1)

    def _failed_for_good(self, job: Job, used: int, pid: int | None, reason: str) -> bool:
        """`used` attempts of `job` have failed, the last one for `reason`. If that is all
        it may use, record it failed (True); else count the resend the caller makes, at
        attempt used + 1 (False)."""
        if self.policy.max_attempts and used >= self.policy.max_attempts:
            self.recorder.record(JobRecord.of(job, Status.FAILED, worker=pid, attempts=used,
                                              reason=f"{reason} on {used} attempts"))
            supervisor_log.info("Job %d failed after %d attempts: %s", job.job_id, used,
                                reason, extra=event(ev.JOB_FAILED, job=job.job_id, worker=pid,
                                                    attempts=used, reason=reason))
            return True
        self.counts.resends += 1
        return False

    def _reruns(self, ended: Try) -> int:
        """Runs of a try after its first that count as attempts. On our own cluster, none:
        a worker death during a run errs at once (allowed-failures 0), so a second start
        of a key is Dask computing again a result lost with its worker before we fetched
        it: the job had completed, and the local engine charges nothing for that either.
        On a given cluster, a second start may be Dask's own retry after a death; the two
        cannot be told apart there, and each counts."""
        return 0 if self.own_cluster else max(0, ended.starts - 1)

    def _was_running(self, failed: Try, address: str, pid: int) -> bool:
        """On our own cluster: whether `failed` is the try the dead worker (`address`,
        `pid`) was running, the last one it started. Its one thread runs one try at a
        time, and every start it wrote was read before its death is judged; so a try that
        it started before another one, or that started only on another worker, had
        completed, and Dask erred it with this death only because its result was lost."""
        worker = self.workers.get(address)
        return worker is not None and worker.running == failed.key and failed.pid == pid

    def _ran_another(self, address: str, key: str) -> bool:
        """Whether the one-thread worker at `address` was running another job when it died:
        then a job it held without a start was only waiting in its queue."""
        worker = self.workers.get(address)
        return worker is not None and worker.nthreads == 1 and worker.running not in (None, key)

    def _death_reason(self, failed: Try, pid: int, address: str) -> str:
        if failed.timed_out:
            return f"ran job {failed.job.job_id} past its timeout of " \
                   f"{failed.job.timeout or self.policy.timeout:g} s"
        return self.deaths.get(pid, f"its worker {address} was lost")

    def _on_worker_lost(self, address: str) -> None:
        """A worker the scheduler removed while it held our tasks; counted once. Our own
        cluster's deaths are counted from the nanny (with their exit status) instead."""
        if address in self.dead_addresses:
            return
        self.dead_addresses.add(address)
        if self.own_cluster:
            return
        self.counts.crashes += 1
        supervisor_log.info("Worker %s lost", address,
                            extra=event(ev.WORKER_EXITED, worker=None, address=address,
                                        reason="lost", crash=True))

    def _on_worker_exited(self, pid: int, how: str) -> None:
        self.deaths[pid] = how
        if self.interrupted is not None:
            return
        if self.parked:
            self._unpark(time.monotonic())
        pool = self.pid_pools.get(pid)
        self.counts.crashes += 1
        if pool is not None:
            self.counts.per_pool[pool] += 1
        supervisor_log.info("Worker PID %d %s", pid, how,
                            extra=event(ev.WORKER_EXITED, worker=pid, pool=pool, reason=how,
                                        crash=True))

    # --- time ----------------------------------------------------------------------------

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if self.parked:
            self._unpark(now)
        for overdue in [t for t in self.tries.values()
                        if t.deadline is not None and not t.timed_out and t.deadline <= now]:
            self._on_timeout(overdue)
        if self.stopping_deadline is not None and self.stopping_deadline <= now:
            running = [t for t in self.tries.values() if t.started_at is not None]
            log.info("Grace period over: %d running jobs not done", len(running),
                     extra=event(ev.GRACE_OVER, running=len(running)))
            self.stop_now = True

    def _on_timeout(self, overdue: Try) -> None:
        """Dask cannot stop one task: on our own cluster its worker process is killed (the
        nanny starts another, the death charges the attempt, as in the local engine); on a
        given cluster the try is abandoned, left to run to its end, and charged."""
        overdue.timed_out = True
        timeout = overdue.job.timeout or self.policy.timeout
        if self.own_cluster and overdue.pid is not None:
            supervisor_log.info("Worker PID %d ran job %d past its timeout of %g s: killed it",
                                overdue.pid, overdue.job.job_id, timeout,
                                extra=event(ev.WORKER_KILLED, worker=overdue.pid,
                                            reason="timeout", job=overdue.job.job_id))
            ipc_kill(overdue.pid)
            return
        assert self.client is not None
        supervisor_log.info("Job %d ran past its timeout of %g s on %s: abandoned it (Dask "
                            "cannot stop one task)", overdue.job.job_id, timeout,
                            overdue.address,
                            extra=event(ev.JOB_ABANDONED, job=overdue.job.job_id,
                                        worker=overdue.pid, reason="timeout"))
        self._forget(overdue)
        self.client.cancel([overdue.future])
        job, used = overdue.job, overdue.attempt + self._reruns(overdue)
        reason = f"ran job {job.job_id} past its timeout of {timeout:g} s"
        if not self._failed_for_good(job, used, overdue.pid, reason):
            self._submit(job, used + 1)

    # --- stopping --------------------------------------------------------------------------

    def _on_interrupt(self, signum: int) -> None:
        """First signal: jobs not started are cancelled (reported not done), running ones
        get --grace to finish. Second: the run ends at once."""
        name = signal.Signals(signum).name
        if self.interrupted is not None:
            main_log.info("Second %s: stopping running jobs now", name)
            self.stop_now = True
            return
        self.interrupted = signum
        self.end_reason = f"interrupted by {name}"
        self._unpark()  # judged now, as not done
        main_log.info("Interrupted by %s: stopping the pool", name,
                      extra=event(ev.INTERRUPTED, signal=name))
        waiting = [t for t in self.tries.values() if t.started_at is None]
        running = len(self.tries) - len(waiting)
        for cancelled in waiting:
            self._forget(cancelled)
        if waiting and self.client is not None:
            self.client.cancel([t.future for t in waiting])
        grace = self.policy.grace
        log.info("Stopping on signal %d: letting %d running jobs finish (grace %g s); "
                 "%d jobs not started", signum, running, grace, len(waiting),
                 extra=event(ev.STOPPING, running=running, grace=grace,
                             not_started=len(waiting)))
        self.stopping_deadline = time.monotonic() + grace

    def _close(self) -> None:
        """Close the client, and our cluster: its workers are asked to stop and killed if
        they do not within CLOSE_TIMEOUT (a job still running after --grace)."""
        if self.client is not None:
            if self.tries:
                try:
                    self.client.cancel([t.future for t in self.tries.values()])
                except Exception:  # noqa: BLE001 - a lost scheduler: nothing to cancel
                    pass
            self.client.close(timeout=CLOSE_TIMEOUT)
        try:
            if self.cluster is not None:
                self.cluster.close(timeout=CLOSE_TIMEOUT)
        finally:
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)
        for fd in (self.wake_r, self.wake_w, self.start_r, self.start_w):
            if fd >= 0:
                os.close(fd)
        log.info("Dask engine closed.", extra=event(ev.DEALER_STOPPED))

    def _set_stats(self) -> None:
        pools = []
        for pool in self.layout.pools:
            crashes = self.counts.per_pool.get(pool.number, 0)
            pools.append({"type": pool.number, "workers": pool.size, "crashes": crashes,
                          "restarts": crashes if self.own_cluster else 0})
        self.recorder.stats = DealerStats(self.counts.crashes, self.counts.resends,
                                          pools=pools)


# --- helpers -----------------------------------------------------------------------------

def cluster_workers(client: Any) -> dict[str, Any]:
    """The cluster's workers, by address, as its scheduler describes them. Since distributed
    2025.4, scheduler_info() lists every worker only when given n_workers=-1 (at first it
    listed 5 by default); before, it took no n_workers and listed them all."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:
        info = client.scheduler_info()
    return dict(info.get("workers", {}))


def dask_priority(job: Job) -> int:
    """Dask's priority= for a job: its priority, then the older job (lower id) first, as in
    the local engine. Dask itself leaves tasks of one priority submitted together in no
    set order."""
    return job.priority * ID_SPAN - job.job_id


def resource_name(pool: int) -> str:
    """The Dask worker resource a job of type `pool` asks for: ``type2``."""
    return f"type{pool}"


def _pool_of(worker_name: str) -> int | None:
    """Our own cluster names its workers ``type2-1``."""
    match = re.fullmatch(r"type(\d+)-\d+", worker_name)
    return int(match.group(1)) if match else None


def _local_cluster(layout: Any) -> SpecCluster:
    """Our LocalCluster: a scheduler on 127.0.0.1 (no dashboard), and per pool as many
    one-thread worker processes as the pool has workers, each under a nanny that starts a
    new process when one dies; a typed pool's workers offer the resource of its type."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {}
    for pool in layout.pools:
        for i in range(pool.size):
            options: dict[str, Any] = {
                "nthreads": 1, "host": "127.0.0.1", "dashboard": False,
                "memory_limit": 0, "silence_logs": logging.CRITICAL,
                "name": f"type{pool.number}-{i + 1}",
            }
            if layout.typed:
                options["resources"] = {resource_name(pool.number): 1}
            workers[f"type{pool.number}-{i + 1}"] = {"cls": Nanny, "options": options}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0,
                                               "dashboard": False, "dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.CRITICAL,
                       name="taskpool")


def _quiet_distributed(engine: DaskEngine) -> None:
    """distributed logs to stderr, our log; what it says that matters (a worker's death, a
    task's failure) we say ourselves, so its own lines are kept out, but for the nanny's
    line about a worker process's exit, which becomes an inbox item."""
    root = logging.getLogger("distributed")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.NullHandler())
    root.propagate = False
    logging.getLogger("distributed.nanny").addHandler(_NannyExits(engine))


def _note_signal(signum: int, frame: object) -> None:
    pass  # the wake-up fd carries the signal number to the loop


def ipc_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
