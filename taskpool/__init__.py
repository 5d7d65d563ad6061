"""taskpool: a fault-tolerant task pool on fork() and POSIX message queues.

Process roles, one module each:

    engine.py         the engine interface of `taskpool run`, and the RunConfig
    recorder.py       every engine's results file, journal, not-done records, exit status
    main.py           the local engine: forks the TaskGenerator and the Dealer
    dask_engine.py    the Dask engine (--engine dask): a LocalCluster or a given scheduler
    dask_worker.py    a Dask worker's side: run one attempt of one job
    generator.py      TaskGenerator: puts jobs on the ready queue
    dealer.py         Dealer: send and recv threads
    recovery.py       the Dealer's recovery thread: forks, reaps and replaces workers
    worker.py         a worker: ACK, compute, result
    executor.py       taskpool.Executor, in the caller's process: feeder and collector
    executor_host.py  an Executor's Dealer process (fork+exec'd), with its intake thread
    calls.py          a worker's side of the Executor: run pickled calls
    protocol.py       the wire format, the only module that knows the byte layout
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Executor", "WorkerCrashed"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI's processes never pay for concurrent.futures and multiprocessing.
    if name in __all__:
        from taskpool.executor import client as executor

        return getattr(executor, name)
    raise AttributeError(f"module 'taskpool' has no attribute {name!r}")
