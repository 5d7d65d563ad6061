"""The recovery thread: it forks every worker, reaps every death, and keeps the pool full.

How a death reaches it: the Dealer blocks SIGCHLD, SIGTERM and SIGUSR1 in all its threads
before starting any, and this thread alone takes them with sigwait(). No handler runs, no
other thread's blocking mq receive is ever interrupted (posix_ipc does not retry after EINTR),
and the thread sleeps in the kernel until a child exits. Several deaths may arrive as one
SIGCHLD, so it reaps with waitpid(-1, WNOHANG) until nothing is left. Each reap moves the
worker out of `workers` under the lock, so no thread ever signals a reaped pid.

What it does with a death: it marks the worker dead (so the send thread stops choosing it),
posts WorkerExited to the result queue, and forks a replacement.

Timers without polling: it sleeps in sigtimedwait() until the earliest deadline (a job's
--timeout, a missed heartbeat, the end of the grace period), and not at all while none is
set; a thread that sets an earlier deadline nudges it with SIGUSR1. A worker stopped by
SIGSTOP is reported by waitpid(WUNTRACED) at once, through the same SIGCHLD.

Deciding which jobs to resend is the recv thread's work (recovery.py), not this one's: the
dead worker's messages are all in the result queue ahead of WorkerExited (mq_send is atomic,
and the worker is already reaped), so the recv thread sees its last Ack and Result before it
sees the death, and resends exactly the jobs that have no result.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from typing import NoReturn

import posix_ipc

from taskpool.core.supervision import Cause, Death, StartBackoff
from taskpool.local.scheduler import Schedule, assign
from taskpool.local.state import NUDGE_SIGNAL, Deadline, PoolState, WorkerHandle
from taskpool.local.worker import WorkerLimits, run_worker
from taskpool.model.exits import (
    EXIT_COMMAND_TIMED_OUT,
    EXIT_MAIN_LOST,
    EXIT_MEMORY_LIMIT,
    EXIT_RETIRED,
    EXIT_WORKER_FAILED,
    command_signal,
)
from taskpool.model.faults import CrashPlan
from taskpool.model.policy import SupervisionPolicy
from taskpool.model.pools import PoolLayout
from taskpool.observe import events as ev
from taskpool.observe import log as tplog
from taskpool.observe.log import event
from taskpool.observe.log import supervisor_log as log
from taskpool.posix import mqueue, proc
from taskpool.posix.mailbox import Mailbox
from taskpool.posix.spool import Spool
from taskpool.wire.queue import Terminate, WorkerExited

# The Dealer's parent-death signal. Not SIGKILL, which could land between a queue's mq_open
# and mq_unlink and leave its name behind with nobody alive to sweep it (ipc's module doc).
MAIN_LOST_SIGNAL = signal.SIGUSR2
# Signals this thread takes with sigwait(); blocked in every thread of the Dealer.
SUPERVISOR_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM, NUDGE_SIGNAL, MAIN_LOST_SIGNAL})
HOLD_OFF = 0.25  # seconds a due deadline waits while the recv thread has messages to read


class ForkFailed(Exception):
    """fork() itself failed (not what followed it, which never frees a worker's mailbox)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class ForkRefused(RuntimeError):
    """The kernel kept refusing to fork a worker for a pool that has none left."""


def _why_fork_failed(error: OSError) -> str:
    if error.errno == errno.EAGAIN:
        soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
        return (f"fork() refused: this user's processes reached `ulimit -u` ({limit}), or "
                "the system's; raise it with `ulimit -u`")
    return "fork() refused: not enough memory"



def silence_fork_warning() -> None:
    """Python 3.12+ warns on every fork() from a threaded process; the argument in
    Supervisor.spawn_worker is why ours is safe. Called by the entry point of a Dealer
    process (ours alone: never at import, which would silence it in a caller's program)."""
    warnings.filterwarnings("ignore", message=".*multi-threaded.*fork.*",
                            category=DeprecationWarning)


def _how_it_ended(status: int) -> str:
    """A dead worker's wait status in words, our exit statuses for a command by name."""
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if code == EXIT_COMMAND_TIMED_OUT:
        return "ended its command at its timeout"
    sig = command_signal(code)
    if sig is not None:
        how = proc.describe_wait_status(sig)  # a raw status of "killed by signal sig"
        return f"exited: its command was {how}"
    return proc.describe_wait_status(status)


def _kill_and_reap_all_children() -> None:
    """Every child killed and reaped: the workers, and the commands each one orphans as it
    dies (reparented to us, a subreaper, before its death can be reaped: so the next
    round of the loop finds them)."""
    while True:
        proc.kill_orphans(set())
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


@dataclass(frozen=True)
class WorkerSetup:
    """What a forked worker needs, and nothing else: the child touches no other Dealer
    object."""

    result_queue: posix_ipc.MessageQueue
    plan: CrashPlan
    policy: SupervisionPolicy
    layout: PoolLayout
    initializer: bytes | None = None  # the Executor's pickled (initializer, initargs)
    ack_every_job: bool = True  # see protocol.is_acked
    shared_fds: frozenset[int] = frozenset()  # the Executor's initargs' (DealerConfig)
    spool: Spool | None = None  # the commands' texts (posix/spool.py); None: no commands
    run_dir: str | None = None  # where the commands' output is spooled


class Supervisor(threading.Thread):
    """Owns: forking workers, reaping them. Blocks only in sigwait() and, briefly, in a
    send to the result queue (which the recv thread always drains)."""

    def __init__(self, state: PoolState, setup: WorkerSetup) -> None:
        super().__init__(name="recovery", daemon=True)
        self.state = state
        self.setup = setup
        self.layout = setup.layout
        self.dealer_pid = os.getpid()
        self.failure: BaseException | None = None
        # When to fork again after the kernel refused one (this thread's alone).
        self.backoff = StartBackoff()
        # Set once the first `size` workers are forked, or the attempt failed (`failure`).
        self.pool_started = threading.Event()

    def run(self) -> None:
        try:
            self.fill_pool()
            self.pool_started.set()
            while True:
                sig = self.wait_for_signal_or_deadline()
                if sig == MAIN_LOST_SIGNAL:
                    # Nobody can record a result now. Kill and reap the workers ourselves:
                    # left to their parent-death signal they would be zombies of whatever
                    # process adopts them, and that one may never reap.
                    self.kill_workers()
                    _kill_and_reap_all_children()
                    mqueue.exit_between_creations(EXIT_MAIN_LOST)
                if sig == signal.SIGTERM:
                    self.setup.result_queue.send(Terminate(sig).encode())
                self.reap_workers()
                self.kill_overdue_workers()
                self.fill_pool()
                with self.state.lock:
                    if self.state.stopping and not self.state.workers:
                        return
        except ForkRefused as e:
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

    def wait_for_signal_or_deadline(self) -> int | None:
        """Block until a signal comes or the earliest deadline passes (None then)."""
        with self.state.lock:
            wake_at = self.state.wake_at = self.state.next_deadline()
        if wake_at == float("inf"):
            return signal.sigwait(SUPERVISOR_SIGNALS)
        info = signal.sigtimedwait(SUPERVISOR_SIGNALS, max(0.0, wake_at - time.monotonic()))
        return None if info is None else info.si_signo

    def kill_overdue_workers(self) -> None:
        """SIGKILL every worker past a deadline, noting why for the recv thread.

        A deadline is pushed back only when the recv thread reads a Heartbeat or a Result
        (an Ack, or a job sent to an idle worker, starts one). While it
        is behind (messages wait in the result queue: it may be blocked writing the log to
        a paused terminal), a due job or heartbeat deadline may be met by a message not yet
        read: it is put off by HOLD_OFF rather than kill a healthy worker."""
        now = time.monotonic()
        overdue: list[tuple[int, Deadline]] = []
        recv_is_behind = self.setup.result_queue.current_messages > 0
        with self.state.lock:
            state = self.state
            for pid in state.workers:
                for table in (state.job_deadlines, state.heartbeat_deadlines):
                    deadline = table.get(pid)
                    if deadline is not None and deadline.at <= now:
                        if recv_is_behind:
                            table[pid] = Deadline(now + HOLD_OFF, deadline.death)
                            break
                        overdue.append((pid, deadline))
                        break
                else:
                    grace = state.grace_deadline
                    if grace is not None and grace.at <= now:
                        overdue.append((pid, grace))
            for pid, deadline in overdue:
                state.forget_deadlines(pid)
                state.kill_reasons[pid] = deadline.death
                os.kill(pid, signal.SIGKILL)  # still in `workers`: not reaped, still ours
            if state.grace_deadline is not None and state.grace_deadline.at <= now:
                state.grace_deadline = None
        for pid, deadline in overdue:
            self._log_killed(pid, deadline.death)

    def fill_pool(self) -> None:
        """Fork workers until every pool has its size again (unless stopping).

        Each worker takes a free mailbox. If none is free (dead workers' mailboxes not yet
        drained: a crash loop outrunning the recv thread), wait for the recv thread, which
        nudges us as it frees one. If the kernel refuses the fork, the pool runs smaller
        and tries again later (`_fork_refused`)."""
        self.state.fork_retry_at = None  # this is the try
        while True:
            with self.state.lock:
                pool = self._pool_short_of_workers()
                if self.state.stopping or pool is None:
                    self.state.short_of_workers = False
                    return
                mailbox = self.state.mailboxes.allocate()
                self.state.short_of_workers = mailbox is None
                if mailbox is None:
                    return
            try:
                pid = self.spawn_worker(mailbox, pool)
            except ForkFailed as e:
                self._release(mailbox)
                if e.error.errno not in (errno.EAGAIN, errno.ENOMEM):
                    raise e.error from None
                self._fork_refused(e.error)
                return
            if pid is None:
                self._release(mailbox)
            else:
                self._fork_accepted()

    def _release(self, mailbox: Mailbox) -> None:
        with self.state.lock:
            self.state.mailboxes.release(mailbox)

    def _fork_refused(self, error: OSError) -> None:
        """The kernel refused a fork: the pool runs smaller, says so once, and tries again
        after the backoff (a timed wait of this thread: fork_retry_at); it gives up only
        when a pool has no worker left and none could be started for a while."""
        now = time.monotonic()
        with self.state.lock:
            live = len(self.state.workers)
            stranded = self._a_pool_has_no_worker()
        first = self.backoff.failing_since is None
        self.state.fork_retry_at = now + self.backoff.refused(now)
        why = _why_fork_failed(error)
        if self.backoff.gives_up(now, stranded):
            raise ForkRefused(f"{why}; a pool has had no worker for "
                              f"{self.backoff.give_up_after:g} s")
        if first:
            log.warning("Cannot fork a worker (%s): running with %d of %d workers, trying "
                        "again in %g s, then less and less often", why, live,
                        self.layout.total_workers, self.backoff.delay,
                        extra=event(ev.FORK_REFUSED, live=live,
                                    size=self.layout.total_workers, reason=why))

    def _fork_accepted(self) -> None:
        if self.backoff.worked():
            log.info("Forked a worker again: the pool grows back to its size")

    def _a_pool_has_no_worker(self) -> bool:
        """Called with the lock."""
        live = {worker.pool for worker in self.state.workers.values()}
        return any(pool.size and pool.number not in live for pool in self.layout.pools)

    def _pool_short_of_workers(self) -> int | None:
        """The first pool with fewer live workers than its size. Called with the lock."""
        live = [0] * (len(self.layout.pools) + 1)
        for worker in self.state.workers.values():
            live[worker.pool] += 1
        for pool in self.layout.pools:
            if live[pool.number] < pool.size:
                return pool.number
        return None

    def spawn_worker(self, mailbox: Mailbox, pool: int) -> int | None:
        """Fork a worker of `pool` with `mailbox`, and give it work; None if the pool is
        stopping."""
        schedule = Schedule()
        with self.state.lock:
            # Checked under the lock that the recv thread holds while it sends Shutdown to
            # every live worker: a worker is either told to shut down or never forked.
            if self.state.stopping:
                return None
            try:
                pid = self._fork(mailbox, pool)  # FORK SAFETY: see there
            except OSError as e:
                raise ForkFailed(e) from None  # no worker has this mailbox: it goes back
            self.state.workers[pid] = WorkerHandle(pid, pool, mailbox)
            self.state.pools[pool].forked += 1
            assign(self.state, pool, schedule)
        schedule.log(self.layout)
        return pid

    def _fork(self, mailbox: Mailbox, pool: int) -> int:
        """fork(); the child becomes the worker and never returns. Called with state.lock
        held, by spawn_worker."""
        # FORK SAFETY. The child gets only this thread. The other threads of the process
        # (see dealer.py and executor/host.py), and the locks each may hold at the fork:
        #   main thread      waits in pool_started.wait(), then join(): the Event's
        #                    condition lock, briefly;
        #   recv thread      state.lock; RecordWriter.lock, held while a write to main's
        #                    pipe (or the Executor's outcome pipe) blocks; logging's locks;
        #   send thread      state.lock, and its own waiter lock of backlog_room (a
        #                    Condition on state.lock) while it waits there; logging's locks;
        #   and in an Executor's Dealer:
        #   intake thread    the lock of the buffered reader of the submit pipe, held while
        #                    it blocks reading; logging's locks;
        #   lifeline thread  none: os.read() on a raw descriptor;
        # every thread holds its own join lock (_tstate_lock) while it lives, and any of
        # them may hold mqueue._CREATING from `exit_between_creations` on, which ends the
        # process. The child cannot deadlock on any of them:
        # - state.lock is held by us right now, so no other thread is inside a critical
        #   section at the fork (backlog_room's waiter lock is the send thread's alone);
        # - logging's module lock is taken by this very thread just before the fork, by
        #   logging's os.register_at_fork hook, which re-initialises it and every handler's
        #   lock in the child. (Taking it under state.lock cannot deadlock the parent: it is
        #   held only inside logging, which calls none of our code under it.) threading's
        #   own at-fork hook resets its module state and the threads' internal locks;
        # - every other lock above belongs to an object the child never touches: it uses
        #   only `self.setup`, the layout, its mailbox and the result queue, not the Dealer,
        #   the state, the writer, the Events or the submit pipe's reader; it creates no
        #   queue and leaves by os._exit(), so it never takes mqueue._CREATING;
        # - its mailbox (posix/mailbox.py) is shared memory with a process-shared semaphore:
        #   no lock a thread of ours could hold at the fork; the Dealer's threads touch
        #   mailboxes only under state.lock, which we hold, and this child's is new: nothing
        #   was posted to it yet;
        # - log lines go through log.FdHandler, one os.write() per line: no thread of ours
        #   holds the buffer lock of sys.stdout or sys.stderr (CPython gh-84579: not reset
        #   at fork) but on a path that is already a failure (logging's handleError after a
        #   log write failed; threading's excepthook for an intake or lifeline thread dead
        #   of a bug). Only then, and only if the child writes to that stream too (a print()
        #   in a caller's function run by an Executor's worker), could the child block;
        # - the GIL, the import lock and glibc's malloc locks are reset by CPython and glibc
        #   at fork; no thread of ours imports anything once the threads run, so no module
        #   import lock is held; posix_ipc holds no locks across its calls; libc for prctl()
        #   and the semaphores was loaded before any thread started (proc._LIBC,
        #   mailbox._LIBC), so the child calls no dlopen();
        # - the child's first acts are to reset its signal handlers and mask and close every
        #   descriptor it does not need; then it runs run_worker(), which uses only its
        #   mailbox, the result queue and the log descriptor, and leaves by os._exit(),
        #   never returning into this stack.
        # PR_SET_PDEATHSIG ties a worker to the thread that forked it, which is why every
        # worker is forked here: this thread lives until the last worker is reaped.
        pid = os.fork()
        if pid == 0:
            self._become_worker(mailbox, pool)
        return pid

    def _become_worker(self, mailbox: Mailbox, pool: int) -> NoReturn:
        try:
            if self.layout.typed:
                tplog.set_worker_pool(pool, self.layout.pool(pool).label)
            proc.set_parent_death_signal(self.dealer_pid)
            # SIGTERM to the whole group (a service manager stopping us) must not kill jobs
            # mid-way: the Dealer decides, and lets running jobs finish within --grace.
            proc.reset_signals_in_child(ignored=frozenset({signal.SIGINT, signal.SIGTERM}))
            setup = self.setup
            spool = {setup.spool.fd} if setup.spool is not None else set()
            proc.close_fds_except({0, 1, 2, setup.result_queue.mqd}
                                  | spool | tplog.descriptors() | setup.shared_fds)
            proc.close_on_exec_all()  # a command it starts inherits none of them
            mailbox.fence()  # no other worker's mailbox within its reach
            policy = setup.policy
            limits = WorkerLimits(policy.heartbeat, policy.max_tasks_per_child,
                                  policy.max_memory_mb, setup.ack_every_job, policy.timeout,
                                  setup.spool, setup.run_dir)
            run_worker(mailbox, self.setup.result_queue, self.setup.plan, limits,
                       log_each_job=self.layout.typed, initializer=self.setup.initializer)
        finally:
            os._exit(EXIT_WORKER_FAILED)

    def _reaped(self, pid: int) -> WorkerHandle | None:
        """Move a reaped worker to `exited`. Called with state.lock held, in the same
        critical section as the waitpid() that reaped it."""
        worker = self.state.workers.pop(pid, None)
        if worker is not None:
            self.state.exited[pid] = worker
            self.state.forget_deadlines(pid)  # no timer may fire for a reaped pid
        return worker

    def reap_workers(self) -> None:
        """Reap every exited worker and post each death to the recv thread."""
        while True:
            with self.state.lock:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                stopped, worker = None, None
                if os.WIFSTOPPED(status):
                    stopped = self._kill_stopped(pid, status)
                else:
                    worker = self._reaped(pid)
                retired = os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_RETIRED
                killed_for = self.state.kill_reasons.get(pid)
                preempted = killed_for is not None and killed_for.requeue
                crash = not self.state.stopping and not retired and not preempted
                if worker is not None and crash:
                    self.state.pools[worker.pool].crashes += 1
            if stopped is not None:
                self._log_killed(pid, stopped)
            if worker is None:
                continue
            self.kill_orphans()  # what it left running: its command's process group
            self._log_reaped(worker, status, retired, crash, preempted)
            # Posted before any replacement is forked, so that the job is resent (to another
            # idle worker, if there is one) without waiting for the new worker to start.
            self.setup.result_queue.send(WorkerExited(pid, status).encode())

    def _log_reaped(self, worker: WorkerHandle, status: int, retired: bool, crash: bool,
                    preempted: bool) -> None:
        pid = worker.pid
        if retired:
            log.info("Worker PID %d retired after %d jobs", pid,
                     self.setup.policy.max_tasks_per_child or 0,
                     extra=event(ev.WORKER_EXITED, worker=pid, type=worker.pool,
                                 reason="retired", crash=False))
        elif crash:
            how = reason = _how_it_ended(status)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_MEMORY_LIMIT:
                # Our own exit status, by name: the reason its job will be charged.
                reason = Death.of(Cause.MEMORY_LIMIT,
                                  megabytes=self.setup.policy.max_memory_mb).reason
                how = f"ran out of its {reason}"
            log.info("Worker PID %d %s", pid, how,
                     extra=event(ev.WORKER_EXITED, worker=pid, type=worker.pool,
                                 reason=reason, crash=True))
        else:  # while stopping, or preempted: our doing
            how = "preempted" if preempted else proc.describe_wait_status(status)
            log.debug("Reaped worker %d: %s", pid, how,
                      extra=event(ev.WORKER_EXITED, worker=pid, type=worker.pool,
                                  reason=how, crash=False))

    def _kill_stopped(self, pid: int, status: int) -> Death | None:
        """A stopped worker is hung: kill it (its death comes as another SIGCHLD) and
        return why. Called with state.lock held; the worker is not reaped, so the pid is
        still ours."""
        if pid not in self.state.workers:
            return None
        sig = os.WSTOPSIG(status)
        death = Death.of(Cause.STOPPED, signal=sig, name=signal.Signals(sig).name)
        self.state.kill_reasons[pid] = death
        self.state.forget_deadlines(pid)
        os.kill(pid, signal.SIGKILL)
        return death

    @staticmethod
    def _log_killed(pid: int, death: Death) -> None:
        log.info("Worker PID %d %s: killed it", pid, death.reason,
                 extra=event(ev.WORKER_KILLED, worker=pid, reason=death.reason))

    def kill_orphans(self) -> None:
        """Kill every child of ours that is no worker: a command orphaned by its worker's
        death, reparented to the Dealer (a child subreaper), with its process group. Called
        from this thread only, which forks every worker: none can be missing from the
        list."""
        with self.state.lock:
            workers = set(self.state.workers)
        proc.kill_orphans(workers)

    def kill_workers(self) -> None:
        with self.state.lock:
            for pid in self.state.workers:
                os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still ours

    def reap_until_empty(self) -> None:
        while True:
            self.kill_orphans()  # a worker's death may have orphaned a command
            try:
                # Wait without reaping, so that the reap below can happen under the lock.
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                return
            with self.state.lock:
                pid, status = os.waitpid(-1, os.WNOHANG)
                worker = self._reaped(pid) if pid else None
            if worker is not None:
                self.setup.result_queue.send(WorkerExited(pid, status).encode())
