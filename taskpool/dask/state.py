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


class Tries:
    """The tries outstanding (by key), and the workers seen running them (by address).

    `own_cluster`: on our own cluster the scheduler's allowed-failures is 0 and every start
    comes through the start pipe, read before any death is judged; on a given cluster,
    starts are scheduler events that a death can overtake, and Dask may run a task again by
    itself. What a death proves about a try differs accordingly (`ran_on`, `reruns`)."""

    def __init__(self, own_cluster: bool) -> None:
        self.own_cluster = own_cluster
        self.by_key: dict[str, Try] = {}
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
        return [t for t in self.by_key.values()
                if t.deadline is not None and not t.timed_out and t.deadline <= now]

    def seconds_to_deadlines(self, now: float) -> list[float]:
        return [t.deadline - now for t in self.by_key.values()
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
        return started

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
        On a given cluster, a second start may be Dask's own retry after a death; the two
        cannot be told apart there, and each counts."""
        return 0 if self.own_cluster else max(0, ended.starts - 1)

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

    def _ran_another(self, address: str, key: str) -> bool:
        """Whether the one-thread worker at `address` was running another job when it died:
        then a job it held without a start was only waiting in its queue."""
        worker = self.workers.get(address)
        return worker is not None and worker.nthreads == 1 and worker.running not in (None, key)
