"""The Dealer of a taskpool.Executor: the same Dealer, queues and recovery as a CLI run, in a
process of its own that the Executor starts with fork+exec::

    python -m taskpool.executor.host SUBMIT_FD OUTCOME_FD LIFELINE_FD

Why exec: the Executor lives in someone else's program, which may run threads of its own
(with their locks held at any instant). A fork that went on running Python in the child
could deadlock on one of them; subprocess's fork+exec runs no Python code between the two.
This process then forks the workers itself, as the CLI's Dealer does, with the same
argument for why that is safe (local/supervisor.py, Supervisor.spawn_worker).

Threads, beside the Dealer's own (main, recovery, recv, send: local/dealer.py):

    intake thread    submit pipe read; ready queue send. Turns the Executor's Batch frames
                     into CALL jobs, and its End frame into EndOfJobs.
    lifeline thread  lifeline pipe read. The Executor holds the write end and never writes:
                     EOF means its process is gone (or it gave us up), and the pool ends at
                     once: the recovery thread kills and reaps the workers, then exits
                     between two queue creations (MAIN_LOST_SIGNAL, as in a CLI run).

No parent-death signal here: PR_SET_PDEATHSIG fires when the *thread* that started us exits,
and in a caller's program that may be any short-lived thread. The lifeline does that job.
"""

from __future__ import annotations

import multiprocessing.spawn
import os
import pickle
import signal
import sys
import threading
from typing import Any, NoReturn

from taskpool.core.supervision import Death, Decision
from taskpool.executor.settings import (
    READY_QUEUE_DEPTH,
    REQUEST_MESSAGE_SIZE,
    RESULT_MESSAGE_SIZE,
    ExecutorSettings,
)
from taskpool.local.dealer import Dealer, DealerConfig
from taskpool.local.records import RecordWriter
from taskpool.local.supervisor import MAIN_LOST_SIGNAL, SUPERVISOR_SIGNALS, silence_fork_warning
from taskpool.model.exits import EXIT_STOPPED_EARLY
from taskpool.model.faults import CrashPlan
from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import DealerStats
from taskpool.model.policy import SupervisionPolicy
from taskpool.model.pools import PoolLayout
from taskpool.observe import log as tplog
from taskpool.observe.log import dealer_log as log
from taskpool.posix import mqueue, proc
from taskpool.posix.handoff import PayloadHandoff
from taskpool.posix.handoff import install as install_handoff
from taskpool.wire import ProtocolError
from taskpool.wire.calls import CallBatch
from taskpool.wire.frames import (
    FrameType,
    decode_batch,
    decode_end,
    encode_failed,
    encode_lost,
    encode_outcomes_frame,
    encode_stopped,
    read_frame,
)
from taskpool.wire.queue import EndOfJobs, JobMessage, Result


class FrameWriter(RecordWriter):
    """The recv thread's outcomes, as frames on the Executor's outcome pipe, each written at
    once: a frame answers a whole batch of calls already, and the Executor's feeder sends
    more batches as outcomes come back (a window of batches), so one held back would leave
    workers idle."""

    FLUSH_BYTES = 0

    def done(self, job: Job, result: Result) -> None:
        batch = CallBatch.decode(job.payload)
        self.write(encode_outcomes_frame(batch, float(result.value), result.payload))

    def failed(self, job: Job, pid: int, death: Death, decision: Decision) -> None:
        # The Dealer's reason speaks of jobs, for the log; the caller knows calls.
        attempts = decision.failed_attempts
        times = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        why = f"{times} of this call ended its worker; the last: {death.call_reason}"
        self.write(encode_failed(CallBatch.decode(job.payload), why))

    def worker_lost(self, pid: int, death: Death, resent: int) -> None:
        self.write(encode_lost(pid, death.call_reason, resent))

    def stats(self, stats: DealerStats) -> None:
        if stats.stop_reason is not None:
            self.write(encode_stopped(stats.stop_reason))


def _intake(read: Any, ready_queue: Any) -> None:
    """The intake thread (see the module doc)."""
    try:
        while True:
            frame = read_frame(read)
            if frame is None:
                break  # EOF before End: the Executor is gone
            ftype, body = frame
            if ftype is FrameType.BATCH:
                batch = decode_batch(body)
                job = Job(batch.batch, JobKind.CALL, batch.count, payload=body)
                ready_queue.send(JobMessage(job, attempt=1).encode())
            elif ftype is FrameType.END:
                ready_queue.send(EndOfJobs(decode_end(body)).encode())
                return
    except ProtocolError as e:
        log.error("The Executor sent a malformed frame: %s", e)
    os.kill(os.getpid(), MAIN_LOST_SIGNAL)


def _lifeline(fd: int) -> None:
    while os.read(fd, 1):
        pass
    os.kill(os.getpid(), MAIN_LOST_SIGNAL)


def main(argv: list[str]) -> NoReturn:
    code = EXIT_STOPPED_EARLY
    outcome_fd = int(argv[1])
    try:
        code = _serve(*(int(a) for a in argv))
    except mqueue.QueueLimitError as e:
        log.error("Cannot start: %s", e)
        os.write(2, f"taskpool.Executor: cannot start: {e}\n".encode())
        _tell_caller(outcome_fd, f"the Executor's Dealer cannot start: {e}")
    except BaseException as e:
        log.exception("The Executor's Dealer failed")
        _tell_caller(outcome_fd, f"the Executor's Dealer failed: {type(e).__name__}: {e}")
    finally:
        mqueue.exit_between_creations(code)


def _tell_caller(outcome_fd: int, reason: str) -> None:
    """Why we stop, as the reason the caller's futures and submit() give: not only an exit
    status. One small frame, one write (atomic on a pipe, beside the recv thread's)."""
    try:
        os.write(outcome_fd, encode_stopped(reason[:2000]))
    except OSError:
        pass  # the caller is gone


def _serve(submit_fd: int, outcome_fd: int, lifeline_fd: int) -> int:
    """The Dealer, from its settings frame to its exit status."""
    silence_fork_warning()
    # Blocked before any thread starts, so that all inherit the mask: the recovery
    # thread alone takes these signals, with sigwait() (see run_dealer).
    proc.reset_signals_in_child(blocked=SUPERVISOR_SIGNALS)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    proc.redirect_stdin_to_devnull()
    read = os.fdopen(submit_fd, "rb").read  # buffered: exactly n bytes, or fewer at EOF
    frame = read_frame(read)
    if frame is None or frame[0] is not FrameType.SETTINGS:
        raise ProtocolError("the Executor's first frame was not its settings")
    settings: ExecutorSettings = pickle.loads(frame[1])
    tplog.setup(2, settings.log_level)
    # The caller's sys.path, working directory and argv, as multiprocessing's spawn
    # sets them, so that functions pickled by reference import here (and in the workers
    # forked from us) as they did there; not its main module (see settings.py).
    multiprocessing.spawn.prepare(settings.preparation)
    multiprocessing.current_process().authkey = settings.authkey
    return _run_dealer(settings, read, outcome_fd, lifeline_fd)


def _run_dealer(settings: ExecutorSettings, read: Any, outcome_fd: int, lifeline_fd: int
                ) -> int:
    ready_queue = mqueue.create_queue("ready", READY_QUEUE_DEPTH, REQUEST_MESSAGE_SIZE)
    # Made before any worker is forked, which inherits its send end (see handoff.py).
    handoff = PayloadHandoff()
    install_handoff(handoff)
    policy = SupervisionPolicy(
        max_attempts=settings.max_attempts, timeout=settings.timeout, heartbeat=None,
        max_tasks_per_child=settings.max_tasks_per_child,
        max_restarts=max(settings.max_restarts, settings.workers),
        restart_window=settings.restart_window)
    config = DealerConfig(
        PoolLayout.single(settings.workers), CrashPlan(), policy,
        request_message_size=REQUEST_MESSAGE_SIZE, result_message_size=RESULT_MESSAGE_SIZE,
        initializer=settings.initializer, handoff=handoff,
        shared_fds=frozenset(settings.shared_fds))
    dealer = Dealer(config, ready_queue, FrameWriter(outcome_fd))
    for target, args in ((_intake, (read, ready_queue)), (_lifeline, (lifeline_fd,))):
        threading.Thread(target=target, args=args, name=target.__name__[1:],
                         daemon=True).start()
    try:
        return dealer.run()
    finally:
        handoff.close()


if __name__ == "__main__":
    main(sys.argv[1:])
