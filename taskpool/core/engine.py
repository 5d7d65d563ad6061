"""What runs the jobs: the engine behind `taskpool run`.

    cli/run.py ──RunConfig──> Engine.run()
                           ├─ execute()  the engine's own: run every job, hand each
                           │             outcome to the Recorder, note why it stopped
                           └─ Recorder   (recorder.py) results file, journal, once per job,
                                         not-done records, exit table, exit status

Two engines, one job model (model/jobs.py), one results writer (recorder.py), one main
loop (loop.py: the select() loop, its timers and the SIGINT/SIGTERM ladder), one set of
supervision rules (supervision.py):

    local  local/main.py   fork()ed Dealer and workers over POSIX message queues (default)
    dask   dask/engine.py  a Dask distributed cluster: a LocalCluster it starts, or an
                           existing scheduler (--scheduler); needs the `dask` extra

An engine is picked by name (`make_engine`); the Dask engine's module, and `distributed`
with it, is imported only when asked for, so the local engine never pays for it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Callable

from taskpool.core.journal import Journal
from taskpool.core.recorder import Recorder
from taskpool.core.stdin import GeneratorInput
from taskpool.model.outcome import JobRecord, Status
from taskpool.model.pools import PoolSpec
from taskpool.observe import events as ev
from taskpool.observe.log import event
from taskpool.observe.log import main_log as log

if TYPE_CHECKING:
    from taskpool.observe.live import LiveView

ENGINES = ("local", "dask")
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to reach a --scheduler
DEFAULT_DASK_WAIT = 30.0  # seconds a --scheduler's cluster may have no worker at all


@dataclass
class RunConfig:
    pool: PoolSpec  # the pool layout, crash plan and supervision policy
    source: GeneratorInput
    results: IO[str] | None
    report_error: Callable[[str], None]  # prints "taskpool: ..." to the user
    journal: Journal | None = None
    resumed: dict[int, JobRecord] = field(default_factory=dict)  # the journal's outcomes
    resuming: bool = False  # --resume: the run says how much of it was done already
    live: LiveView | None = None  # the terminal's live view, fed by...
    live_fd: int | None = None  # ...the read end of the children's event pipe
    scheduler: str | None = None  # dask: an existing cluster's address; None: start one
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # dask: seconds to reach `scheduler`
    # --output-dir: each job's output kept as DIR/<job>.out and .err; None: printed
    output_dir: str | None = None
    dask_wait: float = DEFAULT_DASK_WAIT  # dask: seconds `scheduler` may have no worker
    # When the command started (time.monotonic()): the summary's wall time counts from it,
    # so that it covers what comes before the engine (importing distributed, say).
    started_at: float | None = None


class Engine(ABC):
    """Runs a RunConfig's jobs; `run` returns the exit status.

    The engine records each outcome with `self.recorder.record()` (once per job id: a
    second record of a job is dropped there), makes every job it accepts known with
    `accept()`, and sets `interrupted` (the first SIGINT/SIGTERM), `end_reason` (why jobs
    were not done), `cut_short` (a part of the engine was lost) and `bad_setup` (it could
    not start on what the user gave it, an unreachable --scheduler: exit 2, as for bad
    input). The rest is common."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.recorder = Recorder(config.results, config.journal)
        if config.source.jobs is not None:
            self.recorder.known = {job.job_id: job for job in config.source.jobs}
        self.recorder.resume_from(config.resumed)
        if config.live is not None:  # it counts outcomes as they are recorded
            self.recorder.on_outcomes = config.live.on_outcomes
            config.live.recorded = self.recorder.outcomes.__contains__
        self.interrupted: int | None = None
        self.end_reason: str | None = None
        self.cut_short = False
        self.bad_setup = False

    def run(self) -> int:
        started = self.config.started_at or time.monotonic()
        if self.config.resuming:
            self._log_resumed()
        self.execute()
        self.recorder.finish(self.config.pool.layout, self.end_reason,
                             time.monotonic() - started, self.cut_short)
        return self.recorder.exit_status(self.interrupted, self.cut_short, self.bad_setup)

    def _log_resumed(self) -> None:
        """`57 of 80 jobs already done in run.db; running the other 23`: what --resume
        found, before anything runs."""
        resumed = self.config.resumed
        done = sum(1 for r in resumed.values() if r.status == Status.DONE.value)
        failed = len(resumed) - done
        jobs = self.config.source.jobs
        total = None if jobs is None else len(jobs)
        path = self.config.journal.path if self.config.journal is not None else "the journal"
        text = f"{done}{'' if total is None else f' of {total}'} jobs already done in {path}"
        if failed:
            text += f", {failed} failed"
        text += ("; running the rest of standard input" if total is None
                 else f"; running the other {total - len(resumed)}")
        log.info("%s", text, extra=event(ev.RUN_RESUMED, done=done, failed=failed, jobs=total,
                                          journal=path))

    @abstractmethod
    def execute(self) -> None:
        """Run the jobs until each has an outcome or the run is cut short."""

