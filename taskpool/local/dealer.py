"""The Dealer: hands jobs to workers, records results, recovers from worker deaths.

Its threads, the module each lives in, and what each may block on::

    send thread      sender.py      ready queue receive; state.backlog_room wait (backlogs
                                    full, until they want a refill);
                                    result queue send (EndOfJobs only)
    recv thread      receiver.py    result queue receive; record pipe write to main
                     recovery.py      what to resend after a death
                     stopping.py      ending the pool (all done, SIGTERM, giving up)
    recovery thread  supervisor.py  sigwait(); result queue send
    main thread      here           joins the others, then writes the stats

What they share is in state.py (PoolState, under its one lock); who gets which job is
scheduler.py's; where outcomes go, records.py's.

No thread waits for a free worker: jobs wait in their pool's backlog, and whichever thread
frees a worker or adds a job hands out work under the lock (see scheduler.py). So a job of
a busy pool never holds up the jobs of another, and the send thread always reads on.

The send and recv threads are separate, as in the seed, so that the Dealer never blocks on
sending while workers block on a full result queue. The recv thread is the sink: it never
waits for another thread of ours (its sends to the ready queue are non-blocking tries), so
every other blocked thread or worker is eventually released by it.

No job is lost, whenever a worker dies: recovery.py says why. No result is doubled: a job
is recorded once, by job id, in the recv thread (receiver.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Callable, NoReturn

import posix_ipc

from taskpool.local.receiver import Receiver
from taskpool.local.records import RecordWriter, Tally
from taskpool.local.recovery import Recovery
from taskpool.local.sender import Sender
from taskpool.local.state import PoolSlots, PoolState
from taskpool.local.stopping import Stopper
from taskpool.local.supervisor import (
    MAIN_LOST_SIGNAL,
    SUPERVISOR_SIGNALS,
    Supervisor,
    WorkerSetup,
    silence_fork_warning,
)
from taskpool.model.exits import EXIT_ALL_DONE, EXIT_STOPPED_EARLY, EXIT_THREAD_FAILED
from taskpool.model.faults import CrashPlan
from taskpool.model.outcome import DealerStats
from taskpool.model.policy import SupervisionPolicy
from taskpool.model.pools import PoolLayout
from taskpool.observe import events as ev
from taskpool.observe import log as tplog
from taskpool.observe.log import dealer_log as log
from taskpool.observe.log import event, supervisor_log
from taskpool.posix import mqueue, proc
from taskpool.posix.handoff import PayloadHandoff
from taskpool.posix.mailbox import Mailboxes
from taskpool.posix.spool import Spool
from taskpool.wire.queue import MAX_MESSAGE_SIZE

# Jobs a worker holds at most without --preempt: the one it runs and one behind it.
PREFETCH_CREDIT = 2
# Mailboxes a Dealer has, for each worker of its pool: a replacement is forked as soon as
# a worker is reaped, before the recv thread has drained the dead one's mailbox.
MAILBOXES_PER_WORKER = 2


@dataclass(frozen=True)
class DealerConfig:
    layout: PoolLayout
    plan: CrashPlan
    policy: SupervisionPolicy = SupervisionPolicy()
    preempt: bool = False
    # Message sizes (a worker's mailbox, the result queue): the CLI's messages are small
    # structs; an Executor's carry calls.
    request_message_size: int = MAX_MESSAGE_SIZE
    result_message_size: int = MAX_MESSAGE_SIZE
    initializer: bytes | None = None  # the Executor's pickled (initializer, initargs)
    # Where workers hand over result payloads too large for a message (the Executor's:
    # posix/handoff.py; each worker keeps its send end). None: in parts.
    handoff: PayloadHandoff | None = None
    # Descriptors the initargs refer to (a multiprocessing.Queue's pipe): kept open in
    # each worker, which otherwise closes all it does not need.
    shared_fds: frozenset[int] = frozenset()
    # The CLI's run: where the commands' texts wait, and where their output is spooled
    # (posix/spool.py). None in an Executor's host.
    spool: Spool | None = None
    run_dir: str | None = None
    # The jobs the run sends, when known at start (a job file, less what --resume skips):
    # the base of --halt fail=P%. None: standard input, counted as it is read.
    jobs_total: int | None = None

    @property
    def credit(self) -> int:
        """Jobs a worker may hold: one running and one prefetched, or only the running one
        with --preempt (an urgent job must never wait behind a prefetched one)."""
        return 1 if self.preempt else PREFETCH_CREDIT


class Dealer:
    """The parts, wired together: the recovery thread (supervisor.py), the recv thread
    (receiver.py, with recovery.py and stopping.py) and the send thread (sender.py)."""

    def __init__(
        self, config: DealerConfig, ready_queue: posix_ipc.MessageQueue, writer: RecordWriter
    ) -> None:
        self.config = config
        self.ready_queue = ready_queue
        self.writer = writer
        self.result_queue = mqueue.create_queue("result", mqueue.RESULT_QUEUE_DEPTH,
                                                config.result_message_size)
        # Acks are asked for where they are used (protocol.is_acked): the job_started
        # event is a DEBUG one.
        ack_every_job = (config.preempt or config.policy.timeout is not None
                         or log.isEnabledFor(logging.DEBUG))
        # Made before any worker is forked: every worker inherits the mapping.
        mailboxes = Mailboxes(MAILBOXES_PER_WORKER * config.layout.total_workers,
                              config.credit, config.request_message_size)
        self.state = PoolState(
            credit=config.credit, mailboxes=mailboxes, preempt=config.preempt,
            pools={p.number: PoolSlots(p.number, p.size) for p in config.layout.pools},
            ack_every_job=ack_every_job, heartbeat=config.policy.heartbeat)
        self.supervisor = Supervisor(
            self.state,
            WorkerSetup(self.result_queue, config.plan, config.policy, config.layout,
                        config.initializer, ack_every_job,
                        config.shared_fds | self._handoff_fds(), config.spool, config.run_dir),
        )
        self.stopper = Stopper(self.state, config.policy.grace, ready_queue)
        self.receiver = self._receiver()
        self.sender = Sender(self.state, ready_queue, self.result_queue, config.layout)
        writer.reader_lost = self._reader_lost

    def _handoff_fds(self) -> frozenset[int]:
        handoff = self.config.handoff
        return frozenset() if handoff is None else frozenset({handoff.send_end.fileno()})

    def _receiver(self) -> Receiver:
        config, tally = self.config, Tally()
        recovery = Recovery(self.state, config.policy, config.layout, self.writer, tally,
                            self.stopper, config.run_dir)
        return Receiver(self.state, self.result_queue, self.writer, tally, recovery,
                        self.stopper, config.policy, config.layout, config.jobs_total,
                        handoff=config.handoff)

    def run(self) -> int:
        layout = self.config.layout
        pools = f" ({layout.describe()})" if layout.typed else ""
        log.info("Starting (PID %d) with %d workers%s", os.getpid(), layout.total_workers, pools,
                 extra=event(ev.DEALER_STARTED, workers=layout.total_workers,
                             pools={p.number: p.size for p in layout.pools}))
        supervisor_log.info("%s", self.config.policy.describe())
        for thread in self._start_threads():
            thread.join()
        return self._finish()

    def _start_threads(self) -> list[threading.Thread]:
        threads = [
            self.supervisor,
            threading.Thread(target=self._guarded(self.receiver.run), name="recv",
                             daemon=True),
        ]
        for thread in threads:
            thread.start()
        # No job is sent before the whole pool is up: a pool that cannot start its workers
        # (fork() refused for good, say) runs nothing rather than a part of the pool.
        self.supervisor.pool_started.wait()
        if self.supervisor.failure is None:
            threads.append(threading.Thread(target=self._guarded(self.sender.run),
                                            name="send", daemon=True))
            threads[-1].start()
        return threads

    def _finish(self) -> int:
        """Once every other thread has ended: the stats, then the queues closed."""
        stopper = self.stopper
        if self.supervisor.failure is not None and stopper.stop_reason is None:
            stopper.stop_reason = (
                f"the pool could not start its workers: {self.supervisor.failure}")
        self.writer.stats(self._stats())
        self.writer.flush()
        self.result_queue.close()
        self.ready_queue.close()
        log.info("Shutting down.", extra=event(ev.DEALER_STOPPED))
        if stopper.terminated or self.supervisor.failure is not None:
            return EXIT_STOPPED_EARLY
        return EXIT_ALL_DONE

    def _stats(self) -> DealerStats:
        with self.state.lock:
            pool_stats = [{"type": p.number, "workers": p.size, "crashes": p.crashes,
                           "restarts": max(0, p.forked - p.size)}
                          for p in self.state.pools.values()]
        return DealerStats(crashes=sum(p["crashes"] for p in pool_stats),
                           resends=self.state.resends,
                           stop_reason=self.stopper.stop_reason, pools=pool_stats)

    def _reader_lost(self) -> NoReturn:
        """A write to main (or to the Executor's caller) failed: it is gone. End as on main's
        parent-death signal, which may come before or after this: the recovery thread kills
        and reaps the workers, then exits the process. Exiting here instead would leave the
        workers to their death signal, and their exit statuses to whatever process adopts
        them, which may never reap (a container's PID 1 that is no init, say). Called by
        any thread but the recovery thread, with no lock of PoolState held (that thread
        takes it to kill the workers)."""
        os.kill(os.getpid(), MAIN_LOST_SIGNAL)
        self.supervisor.join()  # not reached if it takes the signal: it exits the process
        # It had ended already, and killed and reaped the workers as it did.
        mqueue.exit_between_creations(EXIT_STOPPED_EARLY)

    def _guarded(self, loop: Callable[[], None]) -> Callable[[], None]:
        """A bug in the send or recv thread must end the run loudly, not leave the other
        threads waiting for it. Let it crash: the Dealer exits, main reports it lost (keeping
        every recorded result: the outcomes the recv thread holds are written first, whichever
        thread failed), and PR_SET_PDEATHSIG takes the workers with it."""

        def run() -> None:
            try:
                loop()
            except BaseException:
                log.exception("The %s thread failed", threading.current_thread().name)
                try:
                    self.writer.flush()
                finally:
                    mqueue.exit_between_creations(EXIT_THREAD_FAILED)

        return run


def run_dealer(
    config: DealerConfig,
    ready_queue: posix_ipc.MessageQueue,
    record_fd: int,
    main_pid: int,
) -> NoReturn:
    """The Dealer process, forked by main. Leaves only through os._exit(), by way of
    `mqueue.exit_between_creations`."""
    code = EXIT_STOPPED_EARLY
    try:
        proc.set_parent_death_signal(main_pid, MAIN_LOST_SIGNAL)
        silence_fork_warning()
        # Blocked before any thread starts, so that all inherit the mask: the recovery
        # thread alone takes these signals, with sigwait().
        proc.reset_signals_in_child(blocked=SUPERVISOR_SIGNALS)
        # A handler for SIGCHLD, so that the kernel queues it for sigwait() rather than
        # discarding it as default-ignored. It never runs: SIGCHLD stays blocked.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        proc.redirect_stdin_to_devnull()
        spool = {config.spool.fd} if config.spool is not None else set()
        proc.close_fds_except({0, 1, 2, ready_queue.mqd, record_fd} | spool
                              | tplog.descriptors())
        # A worker's command outlives it if the worker dies (SIGKILL, OOM): orphaned, it is
        # reparented to us, and the recovery thread kills its process group as it reaps the
        # worker (Supervisor.reap_workers). Without this, it would go to main, which hears
        # nothing of a worker's death.
        proc.become_subreaper()
        code = Dealer(config, ready_queue, RecordWriter(record_fd)).run()
    except mqueue.QueueLimitError as e:
        log.error("Cannot start: %s", e)
    except BaseException:
        log.exception("Dealer failed")
    finally:
        mqueue.exit_between_creations(code)
