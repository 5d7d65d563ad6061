"""The Dask engine's bookkeeping: its tries, the workers seen running them, its counts.

All of it belongs to the engine's main thread (engine.py): the other threads only post to
its inbox, so nothing here takes a lock.
"""

# distributed is typed only in part: its Client, Future and cluster methods are untyped calls
# (as for engine.py, in pyproject.toml).
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskpool.dask.cluster import pool_of_worker
from taskpool.model.jobs import Job
from taskpool.model.pools import PoolLayout

# Job ids below this keep their order within a priority (dask_priority); the largest
# encoded value, 32767 * 2**40, fits the 64-bit integers Dask's messages carry.
ID_SPAN = 2**40


def dask_priority(job: Job) -> int:
    """Dask's priority for a job: its priority, then the older job (lower id) first, as in
    the local engine; a worker runs the tasks it holds in this order."""
    return job.priority * ID_SPAN - job.job_id

if TYPE_CHECKING:
    from distributed import Future


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
    # The process group of its command (sh, exec) on our own cluster, once its worker
    # spawned it: killed if the worker dies first (dask/worker.py).
    command_pgid: int | None = None

    @property
    def running(self) -> bool:
        return self.started_at is not None


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


@dataclass
class ClusterWorkers:
    """A given cluster's workers, as its scheduler describes them (scheduler_info()) and
    announces them (its "add-worker" and "remove-worker" events): for --dask-wait, the
    pre-flight check of each, and the exit table's worker counts."""

    wait: float  # --dask-wait: seconds the cluster may have no worker at all
    present: dict[str, dict[str, Any]] = field(default_factory=dict)  # address: description
    checked: set[str] = field(default_factory=set)  # addresses that passed the pre-flight
    peak: dict[int, int] = field(default_factory=dict)  # pool: most workers for it at once
    empty_since: float | None = None  # time.monotonic() since when it has had no worker

    def describe(self, workers: dict[str, dict[str, Any]], layout: PoolLayout) -> None:
        """The scheduler's description of every worker present now."""
        self.present = dict(workers)
        for pool in layout.pools:
            offering = [w for w in workers.values()
                        if not layout.typed or f"type{pool.number}" in w.get("resources", {})]
            self.peak[pool.number] = max(self.peak.get(pool.number, 0), len(offering))
        self.empty_since = None if workers else (self.empty_since or time.monotonic())

    def removed(self, address: str) -> bool:
        """A worker left; True if the cluster has none left now."""
        self.present.pop(address, None)
        if self.present or self.empty_since is not None:
            return False
        self.empty_since = time.monotonic()
        return True

    def threads(self, address: str) -> int:
        return int(self.present.get(address, {}).get("nthreads", 1))

    def pool_of(self, address: str, layout: PoolLayout) -> int:
        """The pool a worker serves (the first type it offers): its crashes count there."""
        if layout.typed:
            for name in self.present.get(address, {}).get("resources", {}):
                if pool_of_worker(f"{name}-1") is not None:
                    return int(name[len("type"):])
        return layout.pools[0].number

    def seconds_to_give_up(self, now: float) -> float | None:
        return None if self.empty_since is None else self.empty_since + self.wait - now


class Tries:
    """The tries outstanding (by key), and the workers seen running them (by address).

    `own_cluster`: on our own cluster the scheduler's allowed-failures is 0 and every start
    comes through the start pipe, read before any death is judged; on a given cluster,
    starts are scheduler events that a death can overtake, and Dask may run a task again by
    itself. What a death proves about a try differs accordingly (`ran_on`, `reruns`)."""

    def __init__(self, own_cluster: bool) -> None:
        self.own_cluster = own_cluster
        # Whether the scheduler may run a task again by itself after a worker death: a
        # given cluster whose scheduler refused our plugin (cluster.count_attempts_ourselves)
        self.dask_retries = False
        self.by_key: dict[str, Try] = {}
        # The tries with a --timeout running: the loop's timers look at these alone, not
        # at every try outstanding, at each of its turns.
        self.timed: dict[str, Try] = {}
        self.workers: dict[str, WorkerSeen] = {}
        self.pid_pools: dict[int, int | None] = {}  # worker pid: its pool (our own cluster)

    def __len__(self) -> int:
        return len(self.by_key)

    def __iter__(self) -> Iterator[Try]:
        return iter(list(self.by_key.values()))  # a copy: a caller may forget as it goes

    def add(self, added: Try) -> None:
        self.by_key[added.key] = added

    def get(self, key: str) -> Try | None:
        return self.by_key.get(key)

    def waiting(self) -> list[Try]:
        return [t for t in self.by_key.values() if not t.running]

    def any_running(self) -> bool:
        return any(t.running for t in self.by_key.values())

    def overdue(self, now: float) -> list[Try]:
        return [t for t in self.timed.values()
                if t.deadline is not None and not t.timed_out and t.deadline <= now]

    def seconds_to_deadlines(self, now: float) -> list[float]:
        return [t.deadline - now for t in self.timed.values()
                if t.deadline is not None and not t.timed_out]

    # --- starts -------------------------------------------------------------------------

    def note_start(self, msg: dict[str, Any],
                   timeout: Callable[[Job], float | None]) -> Try | None:
        """A worker's record that it started the try of key msg["key"] (dask/worker.py);
        the try, if it is still outstanding. `timeout`: a job's --timeout, if any."""
        address, pid, key = str(msg["address"]), int(msg["pid"]), str(msg["key"])
        worker = self.workers.get(address)
        if worker is None:
            pool = pool_of_worker(str(msg.get("name", ""))) if self.own_cluster else None
            worker = self.workers[address] = WorkerSeen(address, pid, pool,
                                                        int(msg.get("nthreads", 1)))
            self.pid_pools[pid] = pool
        worker.running = key if worker.nthreads == 1 else None
        started = self.by_key.get(key)
        if started is None:
            return None  # a try already ended here (cancelled, or recorded)
        started.starts += 1
        started.pid, started.address = pid, address
        started.started_at = time.monotonic()
        seconds = timeout(started.job)
        if seconds is not None:
            started.deadline = started.started_at + seconds
            self.timed[key] = started
        return started

    def note_command(self, key: str, pgid: int) -> None:
        """A worker's record that the try of `key` spawned its command, group `pgid`."""
        started = self.by_key.get(key)
        if started is not None:
            started.command_pgid = pgid

    # --- ends ---------------------------------------------------------------------------

    def off_worker(self, ended: Try) -> None:
        """A try no longer runs on its worker."""
        if ended.address is not None:
            worker = self.workers.get(ended.address)
            if worker is not None and worker.running == ended.key:
                worker.running = None

    def forget(self, ended: Try, off_worker: bool = True) -> None:
        """A try has an outcome: drop it here and on the cluster."""
        self.by_key.pop(ended.key, None)
        self.timed.pop(ended.key, None)
        if off_worker:
            self.off_worker(ended)
        ended.future.release()

    def attempts_used(self, ended: Try) -> int:
        """The attempts of its job that `ended` has used, up to and including its last run."""
        return ended.attempt + self.reruns(ended)

    def failed_before(self, failed: Try) -> int:
        """The failed attempts of its job before the last run of `failed`: its attempts
        before this try, and the runs of this try before its last that count."""
        return self.attempts_used(failed) - 1

    def reruns(self, ended: Try) -> int:
        """Runs of a try after its first that count as attempts. On our own cluster, none:
        a worker death during a run errs at once (allowed-failures 0), so a second start
        of a key is Dask computing again a result lost with its worker before we fetched
        it: the job had completed, and the local engine charges nothing for that either.
        So too on a given cluster, whose scheduler errs our tasks at the first death as
        well (cluster.count_attempts_ourselves); unless it refused that, and a second start
        may be Dask's own retry after a death: the two cannot be told apart then, and each
        counts."""
        return max(0, ended.starts - 1) if self.dask_retries else 0

    def ran_on(self, failed: Try, address: str, pid: int) -> bool:
        """Whether `failed` was running on the worker (`address`, `pid`) that died, rather
        than waiting in its queue or done there with its result lost."""
        if self.own_cluster:
            return self._was_running(failed, address, pid)
        return failed.starts > 0 or not self._ran_another(address, failed.key)

    def _was_running(self, failed: Try, address: str, pid: int) -> bool:
        """On our own cluster: whether `failed` is the try the dead worker (`address`,
        `pid`) was running, the last one it started. Its one thread runs one try at a
        time, and every start it wrote was read before its death is judged; so a try that
        it started before another one, or that started only on another worker, had
        completed, and Dask erred it with this death only because its result was lost."""
        worker = self.workers.get(address)
        return worker is not None and worker.running == failed.key and failed.pid == pid

    def running_on(self, address: str, held: list[Try], threads: int) -> list[Try]:
        """Which of `held` (our tries that a given cluster's worker at `address`, of
        `threads` threads, held when it was lost) it was running, rather than holding in
        its queue. Those whose start it sent; and, for its threads left over, those whose
        start it may not have sent before it died (a job that kills its worker at once),
        in the order it runs what it holds: highest priority first."""
        sent = [t for t in held if t.running and t.address == address]
        unsent = sorted((t for t in held if t not in sent),
                        key=lambda t: dask_priority(t.job), reverse=True)
        return sent + unsent[:max(0, threads - len(sent))]

    def pid_at(self, address: str) -> int | None:
        worker = self.workers.get(address)
        return worker.pid if worker is not None else None

    def _ran_another(self, address: str, key: str) -> bool:
        """Whether the one-thread worker at `address` was running another job when it died:
        then a job it held without a start was only waiting in its queue."""
        worker = self.workers.get(address)
        return worker is not None and worker.nthreads == 1 and worker.running not in (None, key)
