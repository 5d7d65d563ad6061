"""taskpool: a fault-tolerant task pool on fork() and POSIX message queues.

Data flow of a local run (`taskpool run`; `[ ]` is a POSIX message queue, `=` a pipe,
`{ }` shared memory)::

    cli ──RunConfig──> local.main (main: the recorder)
                         │ fork                              │ fork
                         v                                   v
              local.generator ──JobBatch──> [ready] ──> local.dealer: send thread
              (the job file or stdin)                        │ per pool backlogs; scheduler
                         │=intake (JobAccepted)=>main        v
                                                 {mailbox, one per worker} ──> local.worker
              main <=record (JobRecord, stats)= recv thread <── [result] <──Ack/Result/Heartbeat
                         │                           ^
                         v                           └── WorkerExited ── recovery thread
              core.recorder: --results, --journal       (local.supervisor: forks, reaps,
              (once per job id), exit table, status      deadlines; core.supervision decides)

A `taskpool.Executor` runs the same Dealer and workers in a host process of its own
(`executor.host`, fork+exec'd), fed by frames over pipes from the caller's process
(`executor.client`); `--engine dask` runs the same jobs and records on a Dask cluster
(`dask.engine`), under the same supervision rules (`core.supervision`).

The sub-packages, bottom up (each imports only those below it; `make lint` checks it)::

    model/     pure data: jobs, pools, the policy, outcomes, crash plans, exit statuses
    wire/      one module a channel: queue messages, JSON-line records, Executor frames
    posix/     message queues and their budget; mailboxes; a forked child's set-up
    observe/   the event vocabulary, the log, the live view, the report
    core/      engine-neutral: job file and stdin, supervision rules, recorder, journal
    local/     the local engine's process roles: main, generator, Dealer, supervisor, worker
    dask/      the Dask engine
    executor/  taskpool.Executor: the client (caller's process) and its host process
    cli/       the command line

docs/ARCHITECTURE.md tells the whole story: threads, invariants, and why no job is lost.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what a type checker sees of the lazy names below (py.typed ships)
    from taskpool.executor.client import Executor, ExecutorStats, WorkerCrashed

__version__ = "0.1.0"

if not sys.platform.startswith("linux"):
    # Said at the import, not at the first fork: a pool here needs Linux's POSIX message
    # queues (/dev/mqueue), its process APIs (prctl, pidfd) and fork().
    raise ImportError(
        f"taskpool runs on Linux only (this is {sys.platform}): it is built on Linux's "
        "POSIX message queues, fork() and prctl()")
__all__ = ["Executor", "ExecutorStats", "WorkerCrashed"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI's processes never pay for concurrent.futures and multiprocessing.
    if name in __all__:
        from taskpool.executor import client as executor

        return getattr(executor, name)
    raise AttributeError(f"module 'taskpool' has no attribute {name!r}")
