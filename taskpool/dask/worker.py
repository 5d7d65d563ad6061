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

A job of real work (sh, exec, call) runs through core/commands.py, as in a local worker
(dask/commands.py); its command's process group is told to main first, which kills it if
the worker dies mid-command (our own cluster).

This module is imported by Dask workers (it is pickled by reference): it imports only the
job model and what runs a job, not the pool.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import threading
from dataclasses import dataclass
from typing import Any

from taskpool.core.loads import execute
from taskpool.dask.commands import run_real_work
from taskpool.model.faults import CrashPlan, Step
from taskpool.model.jobs import COMMAND_KINDS, Arg, JobKind

TOPIC = "taskpool"
# A worker's record, at most: one write of the start pipe under PIPE_BUF stays atomic.
RECORD_MAX = 4000


@dataclass(frozen=True)
class RealWork:
    """How a Dask worker runs a job of real work: its --timeout / timeout= (the worker ends
    the command's process group itself, as a local worker does), and main's run directory,
    where its output goes on our own cluster (None on a given cluster: returned inline)."""

    timeout: float | None
    run_dir: str | None


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


def run_job(job_id: int, kind: int, arg: Arg | str, attempt: int, key: str,
            work: RealWork | None, plan: CrashPlan | None,
            start_path: str | None = None) -> tuple[Any, int, str]:
    """One attempt of a job; (value, worker pid, worker address). A job of real work's
    `arg` is its text, and `work` says how to run it."""
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
    if JobKind(kind) in COMMAND_KINDS:
        assert work is not None and isinstance(arg, str)
        value: Any = run_real_work(
            JobKind(kind), job_id, arg, work.timeout, work.run_dir,
            lambda pgid: _tell_command(worker, start_path, key, pgid))
    else:
        assert not isinstance(arg, str)
        value = execute(JobKind(kind), arg)
    _crash_at(plan, job_id, attempt, Step.BEFORE_RESULT)
    told = {"key": key, "result": value, "pid": pid, "address": worker.address}
    if _fits_a_record(told):
        _tell(worker, start_path, told)
    return value, pid, worker.address


def _tell_command(worker: Any, start_path: str | None, key: str, pgid: int) -> None:
    """On our own cluster: main is told the command's process group, to kill it if this
    worker dies before the command ends (on a given cluster it could not reach it)."""
    if start_path is not None:
        _tell(worker, start_path, {"key": key, "command": pgid})


def _fits_a_record(record: dict[str, Any]) -> bool:
    """Whether a value can go as a worker's record (one atomic write of the start pipe):
    a large one (a call's return value, output inline) is fetched by main instead."""
    try:
        return len(json.dumps(record)) < RECORD_MAX
    except (TypeError, ValueError):
        return False
