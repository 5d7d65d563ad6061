"""The recovery thread: it forks every worker, reaps every death, and keeps the pool full.

How a death reaches it: the Dealer blocks SIGCHLD, SIGTERM and SIGUSR1 in all its threads
before starting any, and this thread alone takes them with sigwait(). No handler runs, no
other thread's blocking mq receive is ever interrupted (posix_ipc does not retry after EINTR),
and the thread sleeps in the kernel until a child exits. Several deaths may arrive as one
SIGCHLD, so it reaps with waitpid(-1, WNOHANG) until nothing is left.

What it does with a death: it marks the worker dead (so the send thread stops choosing it),
posts WorkerExited to the result queue, and forks a replacement. Deciding which jobs to resend
is the recv thread's work, not this one's: the dead worker's messages are all in the result
queue ahead of WorkerExited (mq_send is atomic, and the worker is already reaped), so the
recv thread sees its last Ack and Result before it sees the death, and resends exactly the
jobs that have no result.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from dataclasses import dataclass
from typing import NoReturn

import posix_ipc

from taskpool import ipc
from taskpool.pool_state import PoolState, WorkerHandle
from taskpool.protocol import Terminate, WorkerExited
from taskpool.worker import CrashPlan, run_worker

log = logging.getLogger("taskpool.supervisor")

# Signals this thread takes with sigwait(); blocked in every thread of the Dealer.
SUPERVISOR_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1})
NUDGE_SIGNAL = signal.SIGUSR1  # "look at the state again", sent by the recv thread

# Python 3.12+ warns on every fork() from a threaded process; the argument in
# Supervisor.spawn_worker is why ours is safe.
warnings.filterwarnings("ignore", message=".*multi-threaded.*fork.*", category=DeprecationWarning)


@dataclass(frozen=True)
class WorkerSetup:
    """What a forked worker needs, and nothing else: the child touches no other Dealer
    object."""

    result_queue: posix_ipc.MessageQueue
    plan: CrashPlan
    log_fd: int


class Supervisor(threading.Thread):
    """Owns: forking workers, reaping them. Blocks only in sigwait() and, briefly, in a
    send to the result queue (which the recv thread always drains)."""

    def __init__(self, state: PoolState, size: int, setup: WorkerSetup) -> None:
        super().__init__(name="recovery", daemon=True)
        self.state = state
        self.size = size
        self.setup = setup
        self.dealer_pid = os.getpid()
        self.failure: BaseException | None = None
        # Set once the first `size` workers are forked, or the attempt failed (`failure`).
        self.pool_started = threading.Event()

    def run(self) -> None:
        try:
            for _ in range(self.size):
                self.spawn_worker()
            self.pool_started.set()
            while True:
                sig = signal.sigwait(SUPERVISOR_SIGNALS)
                if sig == signal.SIGTERM:
                    log.info("Received SIGTERM: stopping the pool")
                    self.setup.result_queue.send(Terminate(sig).encode())
                self.reap_workers()
                with self.state.lock:
                    if self.state.stopping and self.state.live_workers() == 0:
                        return
        except ipc.QueueLimitError as e:
            log.error("Cannot start a worker: %s", e)
            self.failure = e
        except BaseException as e:  # a bug: say so, and let the Dealer end the run
            log.exception("Recovery thread failed: %s", e)
            self.failure = e
        self.pool_started.set()
        # Without a supervisor the pool cannot go on: ask the recv thread to stop it, and
        # kill the workers ourselves, since nobody will reap and replace them now.
        self.setup.result_queue.send(Terminate(0).encode())
        self.kill_workers()
        self.reap_until_empty()

    def spawn_worker(self) -> int | None:
        """Fork a worker with a queue of its own; None if the pool is stopping."""
        request_queue = ipc.create_queue("worker", self.state.credit)
        with self.state.lock:
            # Checked under the lock that the recv thread holds while it sends Shutdown to
            # every live worker: a worker is either told to shut down or never forked.
            if self.state.stopping:
                request_queue.close()
                return None
            # FORK SAFETY. We fork from a process that runs three threads. The child gets
            # only this thread, and cannot deadlock, because:
            # - the only lock our other threads take is state.lock, and we hold it right
            #   now, so no other thread is inside a critical section at the fork; the child
            #   never touches it anyway;
            # - log lines go through log.FdHandler, one os.write() per line: no buffered
            #   stdio object whose lock another thread could hold (gh-84579); the handler's
            #   lock and logging's module lock are reset in the child by logging's own
            #   os.register_at_fork hooks;
            # - the GIL, the import lock and glibc's malloc locks are reset by CPython and
            #   glibc at fork; posix_ipc holds no locks across its calls;
            # - the child's first acts are to reset its signal mask and handlers and close
            #   every descriptor it does not need; then it runs run_worker(), which uses
            #   only its two queues and the log descriptor, and leaves by os._exit(),
            #   never returning into this stack.
            # PR_SET_PDEATHSIG ties a worker to the thread that forked it, which is why
            # every worker is forked here: this thread lives until the last worker is
            # reaped.
            pid = os.fork()
            if pid == 0:
                self._become_worker(request_queue)
            self.state.workers[pid] = WorkerHandle(pid, request_queue)
            self.state.worker_free.notify()
        return pid

    def _become_worker(self, request_queue: posix_ipc.MessageQueue) -> NoReturn:
        try:
            ipc.set_parent_death_signal(self.dealer_pid)
            ipc.reset_signals_in_child()
            ipc.close_fds_except(
                {0, 1, 2, self.setup.log_fd, request_queue.mqd, self.setup.result_queue.mqd}
            )
            run_worker(request_queue, self.setup.result_queue, self.setup.plan)
        finally:
            os._exit(70)

    def reap_workers(self) -> None:
        """Reap every exited worker; post each death; replace it unless we are stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            with self.state.lock:
                worker = self.state.workers.get(pid)
                if worker is None:
                    continue
                worker.alive = False
                stopping = self.state.stopping
                if not stopping:
                    self.state.crashes += 1
            if not stopping:
                log.info("Worker PID %d %s", pid, ipc.describe_wait_status(status))
            # Post the death before forking, so that the job is resent (to another idle
            # worker, if there is one) without waiting for the new worker to start.
            self.setup.result_queue.send(WorkerExited(pid, status).encode())
            if not stopping:
                self.spawn_worker()

    def kill_workers(self) -> None:
        with self.state.lock:
            pids = [w.pid for w in self.state.workers.values() if w.alive]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap_until_empty(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return
            with self.state.lock:
                worker = self.state.workers.get(pid)
                if worker is not None:
                    worker.alive = False
            self.setup.result_queue.send(WorkerExited(pid, status).encode())
