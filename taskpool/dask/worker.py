"""The Dask engine's side in a Dask worker process: run one attempt of one job.

`run_job` is what the Dask engine submits, once per attempt, under a key of its own
(`taskpool-<run>-<job>-<attempt>.<try>`). It tells the client it has started (the job's
ACK: see `_tell`), then computes with the same `jobs.execute` as a local worker, tells the
client the value the same way (so that the client need not fetch it from the worker: one
message instead of a round trip through the scheduler), and returns it with who computed
it. A job has started, for taskpool, when `run_job`
has begun: a simulated crash "before the ACK" comes after that record, where a local
worker's comes after it has taken the job, and is charged as that one is. A simulated crash
(`--crash-rate`, `--inject-fault`) kills the worker process with a signal, as a local
worker does: Dask's nanny then starts a new one.

This module is imported by Dask workers (it is pickled by reference): it imports only the
job model, not the pool.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import threading
from typing import Any

from taskpool.core.loads import execute
from taskpool.model.faults import CrashPlan, Step
from taskpool.model.jobs import Arg, JobKind

TOPIC = "taskpool"


def _crash(sig: int) -> None:
    # A simulated segfault should not leave a core file per crash.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    os.kill(os.getpid(), sig)
    threading.Event().wait()  # not reached: the signal's default action ends the process


def _crash_at(plan: CrashPlan | None, job_id: int, attempt: int, step: Step) -> None:
    """Die here if the plan says so: SIGSEGV for a simulated crash, SIGKILL for an injected
    fault, as in a local worker."""
    if plan is None:
        return
    if plan.is_injected(job_id, step, attempt):
        _crash(signal.SIGKILL)
    if plan.simulated_step(job_id, attempt) is step:
        _crash(signal.SIGSEGV)


_start_fds: dict[str, int] = {}


def _tell(worker: Any, start_path: str | None, record: dict[str, Any]) -> None:
    """On taskpool's own cluster (same machine, same user), through the write end of main's
    start pipe, reached as /proc/MAIN/fd/N: once write() returns, the record is main's even
    if this process dies the next instant, as a local worker's ACK is. On a given cluster,
    as an event through the scheduler, which a death right after may lose."""
    if start_path is None:
        worker.log_event(TOPIC, record)
        return
    fd = _start_fds.get(start_path)
    if fd is None:
        fd = _start_fds[start_path] = os.open(start_path, os.O_WRONLY | os.O_CLOEXEC)
    os.write(fd, json.dumps(record).encode() + b"\n")  # < PIPE_BUF: one atomic write


def run_job(job_id: int, kind: int, arg: Arg, attempt: int, key: str,
            plan: CrashPlan | None, start_path: str | None = None) -> tuple[Arg, int, str]:
    """One attempt of a job; (value, worker pid, worker address)."""
    from distributed import get_worker

    worker = get_worker()
    pid = os.getpid()
    started: dict[str, Any] = {"job": job_id, "attempt": attempt, "key": key, "pid": pid,
                               "address": worker.address, "name": str(worker.name),
                               "nthreads": worker.state.nthreads,
                               "resources": dict(worker.state.total_resources)}
    _tell(worker, start_path, started)
    _crash_at(plan, job_id, attempt, Step.BEFORE_ACK)
    _crash_at(plan, job_id, attempt, Step.DURING_COMPUTE)
    value = execute(JobKind(kind), arg)
    _crash_at(plan, job_id, attempt, Step.BEFORE_RESULT)
    _tell(worker, start_path, {"key": key, "result": value, "pid": pid,
                               "address": worker.address})
    return value, pid, worker.address
