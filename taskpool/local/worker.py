"""The worker: a forked process that runs one job at a time.

Protocol, per job (`JobLoop`): take it from its own mailbox, send an Ack to the
shared result queue (if the Dealer needs one: wire.queue.is_acked), run it, send the Result.
Each step boundary is a `Step`; simulated crashes (--crash-rate) and injected kills
(--inject-fault, a test hook) happen exactly there, so that a test can kill a worker at
every point of the protocol.

A worker is a child forked by the Dealer's supervisor thread (supervisor.py argues there why
that fork is safe). It ends only through os._exit(), whatever ends it: a Shutdown, its
retirement, a fault of its own.

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
from taskpool.core.commands import Killed, run_attempt
from taskpool.core.loads import execute
from taskpool.model.exits import (
    EXIT_COMMAND_KILLED_BASE,
    EXIT_COMMAND_TIMED_OUT,
    EXIT_INITIALIZER_FAILED,
    EXIT_MEMORY_LIMIT,
    EXIT_RETIRED,
)
from taskpool.model.faults import CrashPlan, Step
from taskpool.model.jobs import COMMAND_KINDS, Arg, Job, JobKind
from taskpool.observe import events as ev
from taskpool.observe.log import event
from taskpool.observe.log import worker_log as log
from taskpool.posix.handoff import pool_handoff
from taskpool.posix.mailbox import Mailbox
from taskpool.posix.spool import Spool, attempt_paths
from taskpool.wire import decoded_or_dropped
from taskpool.wire.queue import (
    Ack,
    Heartbeat,
    JobMessage,
    Result,
    ResultHandedOver,
    Shutdown,
    decode,
    is_acked,
)


def _simulate_crash(job_id: int, step: Step, attempt: int) -> NoReturn:
    log.info("Simulated crash! (job %d, %s, attempt %d)", job_id, step.value, attempt,
             extra=event(ev.SIMULATED_CRASH, job=job_id, step=step.value, attempt=attempt))
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
    timeout: float | None = None  # --timeout: a command past it is ended here
    # Where a command's text waits (posix/spool.py), and the run's directory, where each
    # attempt's output is spooled. None in an Executor's workers, which run no commands.
    spool: Spool | None = None
    run_dir: str | None = None


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
        # As PPE's worker logs it: a handler that the initializer, or its module, attached
        # to `concurrent.futures` sees it; with none, logging's last resort writes it and
        # its traceback to stderr.
        logging.getLogger("concurrent.futures").critical("Exception in initializer:",
                                                         exc_info=True)
        log.info("The initializer raised %s: %s", type(e).__name__, e,
                 extra=event(ev.INITIALIZER_FAILED, reason=f"{type(e).__name__}: {e}"))
        os._exit(EXIT_INITIALIZER_FAILED)


def run_worker(
    mailbox: Mailbox,
    result_queue: posix_ipc.MessageQueue,
    plan: CrashPlan,
    limits: WorkerLimits = WorkerLimits(),
    log_each_job: bool = False,
    initializer: bytes | None = None,
) -> NoReturn:
    """The worker, in the child the supervisor thread forked (supervisor.py argues why that
    fork cannot deadlock). It uses its mailbox, the result queue and the log's descriptors,
    nothing else of the Dealer's, and returns only through os._exit(): never into the
    parent's stack, never by sys.exit(), which would run the Dealer's finally blocks and
    atexit handlers."""
    log.info("Starting up", extra=event(ev.WORKER_STARTED))
    if initializer is not None:
        _run_initializer(initializer)
    if plan.is_injected(0, Step.AT_START, 1):
        os.kill(os.getpid(), signal.SIGKILL)
    heartbeat = None
    if limits.heartbeat is not None:
        heartbeat = HeartbeatThread(result_queue, limits.heartbeat / 3)
        heartbeat.start()  # before the memory cap: a thread's stack is address space too
    if limits.max_memory_mb is not None:
        _cap_address_space(limits.max_memory_mb)
    JobLoop(mailbox, result_queue, plan, limits, log_each_job, heartbeat).serve()


def _cap_address_space(megabytes: int) -> None:
    # On top of what the worker already maps (inherited from the Dealer: 150-250 MB of
    # address space, mostly per-thread malloc arenas), so MB is what a job may use.
    cap = _address_space_bytes() + megabytes * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


class JobLoop:
    """A worker's jobs, one at a time: receive, ack, compute, answer, with the crash plan's
    steps between them, until a Shutdown, its retirement (--max-tasks-per-child) or a fault
    ends the process. The worker's main thread is its only user; it tells the heartbeat
    thread when a job starts and ends.

    This runs once a job, so it stays as cheap as the single loop it replaced: what a job
    needs is in attributes set once, and a job allocates only its messages and its value."""

    def __init__(
        self,
        mailbox: Mailbox,
        result_queue: posix_ipc.MessageQueue,
        plan: CrashPlan,
        limits: WorkerLimits,
        log_each_job: bool,
        heartbeat: HeartbeatThread | None,
    ) -> None:
        self.mailbox = mailbox
        self.result_queue = result_queue
        self.result_message_size = result_queue.max_message_size  # read once: mq_getattr
        self.plan = plan
        self.limits = limits
        self.log_each_job = log_each_job
        self.heartbeat = heartbeat
        self.pid = os.getpid()
        self.jobs_done = 0

    def serve(self) -> NoReturn:
        while True:
            message = self.receive()
            self.run(message.job, message.attempt)
            self.retire_if_due()

    def receive(self) -> JobMessage:
        """The next job from the mailbox; a Shutdown ends the worker here, and anything
        else is logged and dropped."""
        while True:
            data = self.mailbox.receive()
            message = decoded_or_dropped(decode, data, log, "message")
            if message is None:
                continue
            if isinstance(message, JobMessage):
                return message
            if isinstance(message, Shutdown):
                log.info("Received shutdown signal", extra=event(ev.WORKER_SHUTDOWN))
                os._exit(0)
            log.error("Dropped an unexpected %s message", type(message).__name__)

    def run(self, job: Job, attempt: int) -> None:
        """One job's protocol, a `Step` at each of its boundaries."""
        job_id = job.job_id
        crash_at = self.plan.simulated_step(job_id, attempt)
        self.checkpoint(job_id, attempt, Step.BEFORE_ACK, crash_at)
        if is_acked(job, self.limits.ack_every_job):
            self.result_queue.send(Ack(job_id, attempt, self.pid).encode())
        self.checkpoint(job_id, attempt, Step.DURING_COMPUTE, crash_at)
        result = self.compute(job, attempt)
        self.checkpoint(job_id, attempt, Step.BEFORE_RESULT, crash_at)
        self.answer(result)
        self.checkpoint(job_id, attempt, Step.AFTER_RESULT, None)

    def checkpoint(self, job_id: int, attempt: int, step: Step, crash_at: Step | None) -> None:
        """Where the crash plan may end the worker: an injected kill, a hang or a
        simulated crash at `step` of this attempt."""
        if self.plan.is_injected(job_id, step, attempt):
            os.kill(self.pid, signal.SIGKILL)
        if step is Step.DURING_COMPUTE and self.plan.is_injected(job_id, Step.HANG, attempt):
            # A worker wedged where waitpid() cannot see it (not stopped, not dead), as
            # one stuck in C code holding the GIL would be: only the heartbeat tells.
            log.info("Hanging (test hook)")
            os.read(os.pipe()[0], 1)
        if crash_at is step:
            _simulate_crash(job_id, step, attempt)

    def compute(self, job: Job, attempt: int) -> Result:
        """Runs the job, the heartbeat beating meanwhile; running out of memory under
        --max-memory ends the worker (the Dealer fails the attempt: 'memory limit')."""
        heartbeat = self.heartbeat
        if heartbeat is not None:
            heartbeat.job_started()
        payload = b""
        value: Arg
        try:
            if job.kind is JobKind.CALL:
                value, payload = run_calls(job.payload)
            elif job.kind in COMMAND_KINDS:
                value, payload = self.run_command(job, attempt)
            else:
                value = execute(job.kind, job.arg)
        except MemoryError:
            log.info("Job %d ran out of memory (--max-memory %s MB)", job.job_id,
                     self.limits.max_memory_mb)
            os._exit(EXIT_MEMORY_LIMIT)
        if heartbeat is not None:
            heartbeat.job_finished()
        return Result(job.job_id, attempt, self.pid, job.kind, value, payload)

    def run_command(self, job: Job, attempt: int) -> tuple[int, bytes]:
        """A job of real work: its command (or call) run with its output in the run's
        directory; 0 if it succeeded, else 1, and how it ended (wire/commands.py). A command
        killed by a signal, or past its timeout, ends this worker with an exit status that
        says so: the Dealer's rules make that a crash of the attempt (resent, charged), and
        the attempt's output is never delivered."""
        limits = self.limits
        assert limits.spool is not None and limits.run_dir is not None
        text = limits.spool.load(int(job.arg)).decode("utf-8", "replace")
        paths = attempt_paths(limits.run_dir, job.job_id, self.pid)
        ending = run_attempt(job.kind, text, job.timeout or limits.timeout, paths)
        if isinstance(ending, Killed):
            os._exit(EXIT_COMMAND_TIMED_OUT if ending.timed_out
                     else EXIT_COMMAND_KILLED_BASE + ending.signal)
        return (0 if ending.succeeded else 1), ending.encode()

    def answer(self, result: Result) -> None:
        """The result to the Dealer: in one message if it fits; else its payload handed
        over out of the queue where the pool has a handoff (an Executor's: see
        posix/handoff.py), then the message that says so; else in parts."""
        if Result.FIXED_SIZE + len(result.payload) <= self.result_message_size:
            self.result_queue.send(result.encode())
        elif not self.handed_over(result):
            for part in result.encode_in_parts(self.result_message_size):
                self.result_queue.send(part)
        if self.log_each_job:
            log.info("Done job %d", result.job_id,
                     extra=event(ev.JOB_FINISHED, job=result.job_id))

    def handed_over(self, result: Result) -> bool:
        """Whether `result`'s payload went by the pool's handoff, and its message after
        it. Not if the pool has none, nor if the handoff failed (no descriptor or memory
        for a memfd): the parts carry it then, more slowly."""
        handoff = pool_handoff()
        if handoff is None:
            return False
        try:
            handoff.hand_over((self.pid, result.job_id, result.attempt), result.payload)
        except OSError as e:
            log.info("Sending job %d's result in parts: its handoff failed (%s)",
                     result.job_id, e)
            return False
        self.result_queue.send(ResultHandedOver.of(result).encode())
        return True

    def retire_if_due(self) -> None:
        self.jobs_done += 1
        if self.limits.max_tasks is not None and self.jobs_done >= self.limits.max_tasks:
            log.info("Retiring after %d jobs", self.jobs_done)
            os._exit(EXIT_RETIRED)
