"""Stopping the pool: when all is done, on SIGTERM (within a grace period), at once, when
--halt's condition is met (soon: the running jobs finish; now: they are stopped), or when
the supervisor gives up.

Every stop runs in the recv thread: main's SIGTERM reaches it as a Terminate message from
the recovery thread (which alone takes signals), the all-done decision is its own, and so
is a death that exhausts the restart intensity (recovery.py). `state.stopping` is set once,
under the lock, and never cleared; from then on nothing is handed out or sent again, and
the recv thread ends once every worker's exit has been seen.
"""

from __future__ import annotations

import os
import signal
import time

import posix_ipc

from taskpool.core.supervision import Cause, Death, Halt
from taskpool.local.state import NUDGE_SIGNAL, Deadline, PoolState
from taskpool.model.jobs import PRIORITY_MAX
from taskpool.observe import events as ev
from taskpool.observe.log import dealer_log as log
from taskpool.observe.log import event, supervisor_log
from taskpool.wire.queue import Shutdown, Stop


class Stopper:
    """Ends the pool. Its methods run in the recv thread; `terminated` and `stop_reason`
    are written there and read by the main thread once the other threads have ended."""

    def __init__(self, state: PoolState, grace: float,
                 ready_queue: posix_ipc.MessageQueue) -> None:
        self.state = state
        self.grace = grace
        self.ready_queue = ready_queue  # to tell the send thread to stop
        self.terminated = False  # stopped before all jobs were done
        self.stop_reason: str | None = None  # why, if not on a signal
        # --halt soon: no job is taken, the running ones finish, with no time limit until
        # a signal comes (which then gives them the grace period).
        self.halting_soon = False

    def terminate(self, signum: int) -> None:
        """SIGTERM (from main, on Ctrl-C or SIGTERM): take back the jobs not started, let
        the running ones finish within the grace period, then kill what is left. A second
        SIGTERM, or a supervisor that cannot go on (signum 0), kills at once. After a
        --halt soon, the first SIGTERM starts the grace period."""
        if signum == 0 or (self.terminated and not self.halting_soon):
            self._stop_now(signum)
        elif self.halting_soon:
            self.halting_soon = False  # the next one stops at once
            self._stop_within_grace(signum)
        elif not self.state.stopping:  # else all jobs are done and the workers shutting down
            self._stop_within_grace(signum)

    def halt(self, halt: Halt) -> None:
        """--halt's condition is met: take no new job; with `now`, kill the running ones
        (their jobs are not done, uncharged), with `soon`, let them finish. The jobs left
        are reported not done, with the halt's reason."""
        self.stop_reason = halt.reason
        self.terminated = True
        if halt.policy.kills_running:
            running, not_started = self.stop_pool(kill=True)
            self._log_halt(halt, running, not_started)
            return
        self.halting_soon = True
        running, not_started = self._take_jobs_back(grace=None)
        self._log_halt(halt, running, not_started)

    @staticmethod
    def _log_halt(halt: Halt, running: int, not_started: int) -> None:
        what = ("killing %d running jobs" if halt.policy.kills_running
                else "letting %d running jobs finish")
        log.info("Halting: %s; " + what + "; %d jobs not started", halt.reason,
                 running, not_started,
                 extra=event(ev.HALTED, when=halt.policy.when, failed=halt.failed,
                             jobs=halt.jobs, reason=halt.reason, running=running,
                             not_started=not_started))

    def give_up(self, reason: str) -> None:
        """The pool cannot work (restart intensity): stop it, killing what runs."""
        self.stop_reason = reason
        supervisor_log.error("Giving up: %s", reason, extra=event(ev.GAVE_UP, reason=reason))
        self.terminated = True
        self.stop_pool(kill=True)

    def stop_pool(self, kill: bool) -> tuple[int, int]:
        """Set stopping, and end every worker: a Shutdown message when all jobs are done,
        SIGKILL when terminated (a Shutdown would wait behind queued jobs). Returns the
        jobs that were running, and the others not recorded."""
        state = self.state
        with state.lock:
            state.stopping = True
            running, not_started = _unfinished(state)
            for worker in state.workers.values():
                # Not reaped yet (reaping moves a worker out of `workers` under this lock),
                # so the pid is still this worker's.
                if kill:
                    state.kill_reasons[worker.pid] = Death.of(Cause.STOPPED_WITH_POOL)
                    os.kill(worker.pid, signal.SIGKILL)
                else:
                    # A mailbox has a place for a Shutdown beyond the jobs it may hold.
                    worker.mailbox.send(Shutdown().encode())
            state.backlog_room.notify_all()
        self._stop_send_thread()
        # The recovery thread may be waiting with no worker left to wake it.
        os.kill(os.getpid(), NUDGE_SIGNAL)
        return running, not_started

    def _stop_now(self, signum: int) -> None:
        self.terminated = True
        self.stop_reason = self.stop_reason or (
            None if signum else "the pool could not keep its workers")
        running, _ = self.stop_pool(kill=True)
        log.info("Stopping now: killing %d running jobs", running,
                 extra=event(ev.STOPPING, running=running, grace=0))

    def _stop_within_grace(self, signum: int) -> None:
        self.terminated = True
        grace = self.grace
        running, not_started = self._take_jobs_back(grace)
        # main's SIGTERM, whatever main itself was sent (its "Interrupted by SIGINT" line
        # says which): not a signal to name here.
        log.info("Stopping: letting %d running jobs finish (grace %g s); "
                 "%d jobs not started", running, grace, not_started,
                 extra=event(ev.STOPPING, running=running, grace=grace,
                             not_started=not_started))

    def _take_jobs_back(self, grace: float | None) -> tuple[int, int]:
        """Set stopping, take back every job not started and tell each worker to shut down
        after the job it runs; kill what still runs `grace` seconds from now (None: let
        it run). Returns the jobs running, and those not started. Called again (by a
        signal after a --halt soon), it only sets the grace deadline."""
        state = self.state
        with state.lock:
            if not state.stopping:
                state.stopping = True
                for worker in state.workers.values():
                    taken_back = {job.job_id for job in worker.take_back_waiting()}
                    worker.outstanding = [j for j in worker.outstanding
                                          if j not in taken_back]
                    if not worker.outstanding:
                        state.heartbeat_deadlines.pop(worker.pid, None)  # idle: owes no beat
                    # The worker reads it after its job.
                    worker.mailbox.send(Shutdown().encode())
            running, not_started = _unfinished(state)
            if grace is not None:
                state.grace_deadline = Deadline(time.monotonic() + grace,
                                                Death.of(Cause.GRACE_OVER, grace=grace))
            state.backlog_room.notify_all()
        self._stop_send_thread()
        os.kill(os.getpid(), NUDGE_SIGNAL)  # to set its timer for the grace deadline
        return running, not_started

    def _stop_send_thread(self) -> None:
        """Stop, to the send thread: at the top priority, so that it comes before any job.
        If the ready queue is full, the send thread is not blocked in receive: it sees
        `stopping` at the top of its loop, after its next message."""
        try:
            self.ready_queue.send(Stop().encode(), timeout=0, priority=PRIORITY_MAX)
        except posix_ipc.BusyError:
            pass


def _unfinished(state: PoolState) -> tuple[int, int]:
    """The jobs running (held by a worker), and the other jobs not recorded. Called with
    the lock held."""
    running = sum(1 for w in state.workers.values() if w.outstanding)
    return running, sum(1 for s in state.jobs.values() if not s.recorded) - running
