"""The worker: a forked process that runs one job at a time.

Protocol, per job: receive it from its own request queue, send an Ack to the shared result
queue (if the Dealer needs one: protocol.is_acked), run it, send the Result. Each step
boundary is a `Step`; simulated crashes (--crash-rate) and injected kills (--inject-fault,
a test hook) happen exactly there, so that a test can kill a worker at every point of the
protocol.

"Let it crash": a worker never tries to survive its own faults. Any unexpected error ends
the process; the Dealer notices the death and restores the pool.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import signal
import threading
from dataclasses import dataclass
from typing import NoReturn

import posix_ipc

from taskpool.core.calls import run_calls
from taskpool.core.loads import execute
from taskpool.model.exits import EXIT_INITIALIZER_FAILED, EXIT_MEMORY_LIMIT, EXIT_RETIRED
from taskpool.model.faults import CrashPlan, Step
from taskpool.model.jobs import JobKind
from taskpool.observe import events as ev
from taskpool.observe.log import event
from taskpool.wire import ProtocolError
from taskpool.wire.queue import Ack, Heartbeat, JobMessage, Result, Shutdown, decode, is_acked

log = logging.getLogger("taskpool.worker")


# Exit statuses that say why a worker left on its own.


def _simulate_crash() -> NoReturn:
    log.info("Simulated crash!", extra=event(ev.SIMULATED_CRASH))
    # A simulated segfault should not leave a core file per crash.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    os.kill(os.getpid(), signal.SIGSEGV)
    os._exit(128 + signal.SIGSEGV)  # not reached: SIGSEGV's default action ends us


@dataclass(frozen=True)
class WorkerLimits:
    heartbeat: float | None = None  # seconds; a beat every third of it while a job runs
    max_tasks: int | None = None
    max_memory_mb: int | None = None
    ack_every_job: bool = True  # see protocol.is_acked


class HeartbeatThread(threading.Thread):
    """Sends a Heartbeat every `interval` seconds while a job runs; blocks, untimed, while
    the worker is idle. It stops beating if the worker is stopped (SIGSTOP) or wedged in C
    code holding the GIL, which is how the Dealer tells a hung worker from a slow job.

    Jobs that follow each other do not wake it: a job started wakes it only from its
    untimed sleep, and once woken it runs a whole interval on its timer, whether that job
    is still running or not, before it looks again. (Looking at once would find a short job
    already done, as the thread needs the GIL the job holds: it would sleep untimed again
    and be woken by the next job, a wake-up and two thread switches a job, measured at a
    quarter of a worker's CPU on no-op jobs.) A job's first beat still comes within
    `interval` of its start: the timer was set at or before the job started."""

    def __init__(self, queue: posix_ipc.MessageQueue, interval: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.queue = queue
        self.interval = interval
        self.busy = threading.Condition()
        self.running_job = False
        self.sleeping = False  # untimed: only job_started wakes it
        self.beat = Heartbeat(os.getpid()).encode()

    def run(self) -> None:
        with self.busy:
            while True:
                if not self.running_job:
                    self.sleeping = True
                    self.busy.wait()  # until a job starts
                    self.sleeping = False
                # Timed, and not woken by job_started or job_finished: runs on.
                self.busy.wait(self.interval)
                if self.running_job:
                    self.queue.send(self.beat)

    def job_started(self) -> None:
        with self.busy:
            self.running_job = True
            if self.sleeping:
                self.busy.notify()

    def job_finished(self) -> None:
        with self.busy:
            self.running_job = False


def _address_space_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_initializer(initializer: bytes) -> None:
    """The Executor's initializer(*initargs), once, before any job. If it raises, this
    worker cannot do what the caller asked: exit, and let restart intensity decide."""
    try:
        fn, args = pickle.loads(initializer)
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - whatever it raised, the worker is unusable
        log.error("The initializer raised %s: %s", type(e).__name__, e,
                  extra=event(ev.INITIALIZER_FAILED, reason=f"{type(e).__name__}: {e}"))
        os._exit(EXIT_INITIALIZER_FAILED)


def run_worker(
    request_queue: posix_ipc.MessageQueue,
    result_queue: posix_ipc.MessageQueue,
    plan: CrashPlan,
    limits: WorkerLimits = WorkerLimits(),
    log_each_job: bool = False,
    initializer: bytes | None = None,
) -> NoReturn:
    """The worker loop. Returns only through os._exit()."""
    pid = os.getpid()
    log.info("Starting up", extra=event(ev.WORKER_STARTED))
    if initializer is not None:
        _run_initializer(initializer)
    if plan.is_injected(0, Step.AT_START, 1):
        os.kill(pid, signal.SIGKILL)
    heartbeat = None
    if limits.heartbeat is not None:
        heartbeat = HeartbeatThread(result_queue, limits.heartbeat / 3)
        heartbeat.start()  # before the memory cap: a thread's stack is address space too
    if limits.max_memory_mb is not None:
        # On top of what the worker already maps (inherited from the Dealer: 150-250 MB of
        # address space, mostly per-thread malloc arenas), so MB is what a job may use.
        cap = _address_space_bytes() + limits.max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    jobs_done = 0
    result_message_size = result_queue.max_message_size  # read once: mq_getattr each time

    def checkpoint(job_id: int, attempt: int, step: Step, crash_at: Step | None) -> None:
        if plan.is_injected(job_id, step, attempt):
            os.kill(pid, signal.SIGKILL)
        if step is Step.DURING_COMPUTE and plan.is_injected(job_id, Step.HANG, attempt):
            # A worker wedged where waitpid() cannot see it (not stopped, not dead), as
            # one stuck in C code holding the GIL would be: only the heartbeat tells.
            log.info("Hanging (test hook)")
            os.read(os.pipe()[0], 1)
        if crash_at is step:
            _simulate_crash()

    while True:
        data, _priority = request_queue.receive()
        try:
            message = decode(data)
        except ProtocolError as e:
            log.error("Dropped a malformed message: %s", e)
            continue
        if isinstance(message, Shutdown):
            log.info("Received shutdown signal", extra=event(ev.WORKER_SHUTDOWN))
            os._exit(0)
        if not isinstance(message, JobMessage):
            log.error("Dropped an unexpected %s message", type(message).__name__)
            continue
        job, attempt = message.job, message.attempt
        crash_at = plan.simulated_step(job.job_id, attempt)
        checkpoint(job.job_id, attempt, Step.BEFORE_ACK, crash_at)
        if is_acked(job, limits.ack_every_job):
            result_queue.send(Ack(job.job_id, attempt, pid).encode())
        checkpoint(job.job_id, attempt, Step.DURING_COMPUTE, crash_at)
        if heartbeat is not None:
            heartbeat.job_started()
        payload = b""
        try:
            if job.kind is JobKind.CALL:
                value, payload = run_calls(job.payload)
            else:
                value = execute(job.kind, job.arg)
        except MemoryError:
            log.info("Job %d ran out of memory (--max-memory %s MB)", job.job_id,
                     limits.max_memory_mb)
            os._exit(EXIT_MEMORY_LIMIT)
        if heartbeat is not None:
            heartbeat.job_finished()
        checkpoint(job.job_id, attempt, Step.BEFORE_RESULT, crash_at)
        result = Result(job.job_id, attempt, pid, job.kind, value, payload)
        for encoded in result.encode_in_parts(result_message_size):
            result_queue.send(encoded)
        if log_each_job:
            log.info("Done job %d", job.job_id, extra=event(ev.JOB_FINISHED, job=job.job_id))
        checkpoint(job.job_id, attempt, Step.AFTER_RESULT, None)
        jobs_done += 1
        if limits.max_tasks is not None and jobs_done >= limits.max_tasks:
            log.info("Retiring after %d jobs", jobs_done)
            os._exit(EXIT_RETIRED)
