"""The local engine: main forks the TaskGenerator and the Dealer, records every job's
outcome, ends the run.

main is the recorder: the Dealer sends it each outcome over the record pipe and main hands
it to the Recorder (recorder.py, shared with the Dask engine), which writes the --results
line once per job id. Because main outlives both children, a killed Dealer or
generator cannot take recorded results with it: main keeps them, reports every other job it
knows of as not done, and exits 1.

main is single-threaded. Its signal handlers only note the signal; signal.set_wakeup_fd()
wakes the select() loop, which does the work: read the pipes, reap children with
waitpid(-1, WNOHANG), and end the run. main is a child subreaper, so workers orphaned by a
killed Dealer (which PR_SET_PDEATHSIG kills at once) are reaped here too, not left as zombies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
from dataclasses import dataclass

import posix_ipc

from taskpool.core.engine import Engine, RunConfig
from taskpool.local.dealer import DealerConfig, run_dealer
from taskpool.local.generator import run_generator
from taskpool.model.exits import EXIT_ALL_DONE, EXIT_STOPPED_EARLY
from taskpool.model.outcome import JobRecord
from taskpool.observe import events as ev
from taskpool.observe.log import event
from taskpool.posix import mqueue, proc
from taskpool.wire import ProtocolError
from taskpool.wire.queue import MAX_MESSAGE_SIZE, READY_MESSAGE_SIZE
from taskpool.wire.records import JobAccepted, LineRejected, decode_record

log = logging.getLogger("taskpool.main")

__all__ = ["Main"]


@dataclass
class Child:
    role: str
    pid: int
    status: int | None = None  # raw wait status once reaped

    @property
    def running(self) -> bool:
        return self.status is None

    def ended_normally(self, expected_code: int = 0) -> bool:
        return (
            self.status is not None
            and os.WIFEXITED(self.status)
            and os.WEXITSTATUS(self.status) == expected_code
        )


class LineReader:
    """Splits what arrives on a pipe into lines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""
        self.open = True

    def read_lines(self) -> list[bytes]:
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.open = False
            os.close(self.fd)
            return []
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        return lines


class Main(Engine):
    """The local engine: a forked TaskGenerator and Dealer, and the Dealer's workers."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.signals_seen: list[int] = []

    def execute(self) -> None:
        # A shell may exec us with children of its own (a process substitution): those are
        # not ours to wait for.
        self.inherited_children = _children_of_self()
        proc.become_subreaper()
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._note_signal)

        mqueue.sweep_abandoned_queues()
        ready_queue = self._create_ready_queue()
        record_r, record_w = os.pipe()
        streaming = self.config.source.jobs is None
        intake_r, intake_w = os.pipe() if streaming else (None, None)
        main_pid = os.getpid()
        if self.config.results is not None:
            self.config.results.flush()

        # main is single-threaded: these forks copy no other thread's state. Our signals are
        # blocked across the forks, so that none is handled by main's handlers in a child
        # (or written to main's wake-up pipe) before the child has set its own.
        handled = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        # The Dealer first: the pool's start (its workers' forks) is the longer way to the
        # first job, and the generator is not read before the pool is up.
        dealer_pid = os.fork()
        if dealer_pid == 0:
            os.close(record_r)
            run_dealer(self._dealer_config(), ready_queue, record_w, main_pid)
        generator_pid = os.fork()
        if generator_pid == 0:
            run_generator(self.config.source, ready_queue, intake_w, main_pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        ready_queue.close()
        os.close(record_w)
        if intake_w is not None:
            os.close(intake_w)
        self.generator = Child("TaskGenerator", generator_pid)
        self.dealer = Child("Dealer", dealer_pid)

        # The intake pipe first: a job's JobAccepted is in it before the job is sent, and is
        # read in the same round as the job's outcome, or an earlier one; so a job is known
        # (and journaled) before its outcome is recorded.
        intake = LineReader(intake_r) if intake_r is not None else None
        readers = ([intake] if intake is not None else []) + [LineReader(record_r)]
        # The live view's pipe stays open in main (its handler is inherited from here), so
        # it never ends the loop; it is drained once every child is gone.
        live = self.config.live
        live_reader = LineReader(self.config.live_fd) if self.config.live_fd is not None else None
        while any(r.open for r in readers) or self.dealer.running or self.generator.running:
            watched = [r.fd for r in readers if r.open] + [wake_r]
            if live_reader is not None:
                watched.append(live_reader.fd)
            ready, _, _ = select.select(watched, [], [], self._seconds_to_wait())
            if self.recorder.seconds_to_commit() == 0.0:
                self.recorder.commit()
            for reader in readers:
                if reader.open and reader.fd in ready:
                    self._on_pipe_lines(reader.read_lines())
            if live_reader is not None and live_reader.fd in ready:
                self._on_live_lines(live_reader)
            if wake_r in ready:
                self._on_signals(wake_r)
            if live is not None:
                input_done = intake is None or not intake.open
                total = len(self.recorder.known) if input_done else None
                live.set_jobs(len(self.recorder.known), total)
                if live.seconds_to_redraw() == 0.0:
                    live.redraw()

        self._reap_orphans()
        if live_reader is not None:
            fcntl.fcntl(live_reader.fd, fcntl.F_SETFL, os.O_NONBLOCK)
            while live_reader.open and self._on_live_lines(live_reader):
                pass  # every child is gone: what they wrote is all in the pipe
        signal.set_wakeup_fd(-1)

    def _create_ready_queue(self) -> posix_ipc.MessageQueue:
        """Of READY_MESSAGE_SIZE messages (JobBatches of 32 jobs) if the queue budget holds
        them with the Dealer's and workers' queues; else, or if the kernel refuses them
        (fs.mqueue.msgsize_max), of the smallest ones (batches of 4 jobs), so that a tight
        budget (`ulimit -q`) goes to workers first."""
        dealer = self._dealer_config()
        others = (mqueue.queue_cost(mqueue.RESULT_QUEUE_DEPTH, dealer.result_message_size)
                  + dealer.layout.total_workers
                  * mqueue.queue_cost(mqueue.WORKER_QUEUE_DEPTH, dealer.request_message_size))
        ready = mqueue.queue_cost(mqueue.READY_QUEUE_DEPTH, READY_MESSAGE_SIZE)
        if mqueue.fits_budget(ready + others):
            try:
                return mqueue.create_queue("ready", mqueue.READY_QUEUE_DEPTH, READY_MESSAGE_SIZE)
            except mqueue.QueueLimitError:
                pass
        return mqueue.create_queue("ready", mqueue.READY_QUEUE_DEPTH, MAX_MESSAGE_SIZE)

    def _dealer_config(self) -> DealerConfig:
        pool = self.config.pool
        return DealerConfig(pool.layout, pool.plan, pool.policy, pool.preempt)

    def _seconds_to_wait(self) -> float | None:
        """select()'s timeout: the next journal commit or live redraw due; None (until
        something happens) when neither is pending."""
        waits = [self.recorder.seconds_to_commit()]
        if self.config.live is not None:
            waits.append(self.config.live.seconds_to_redraw())
        return min((w for w in waits if w is not None), default=None)

    def _on_live_lines(self, reader: LineReader) -> bool:
        """Hand what the children wrote to the live view; False if there was nothing."""
        assert self.config.live is not None
        try:
            lines = reader.read_lines()
        except BlockingIOError:
            return False
        for line in lines:
            self.config.live.on_line(line)
        return True

    # --- events ----------------------------------------------------------------------

    def _note_signal(self, signum: int, frame: object) -> None:
        pass  # the wake-up fd carries the signal number to the loop

    def _on_signals(self, wake_r: int) -> None:
        try:
            data = os.read(wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGINT, signal.SIGTERM):
                self._on_interrupt(signum)
        self._reap_children()

    def _on_interrupt(self, signum: int) -> None:
        """First signal: the Dealer lets running jobs finish within the grace period.
        Second: the Dealer kills them at once. Third: the pool is killed outright."""
        name = signal.Signals(signum).name
        self.signals_seen.append(signum)
        if self.interrupted is None:
            self.interrupted = signum
            self.end_reason = f"interrupted by {name}"
            log.info("Interrupted by %s: stopping the pool", name,
                     extra=event(ev.INTERRUPTED, signal=name))
            self._signal_children(signal.SIGTERM)
        elif len(self.signals_seen) == 2:
            log.info("Second %s: stopping running jobs now", name)
            self._signal_children(signal.SIGTERM)
        else:
            log.info("%s again: killing the pool", name)
            self._signal_children(signal.SIGKILL)

    def _signal_children(self, sig: int) -> None:
        for child in (self.generator, self.dealer):
            if child.running:
                try:
                    os.kill(child.pid, sig)
                except ProcessLookupError:
                    pass

    def _reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for child in (self.generator, self.dealer):
                if child.pid == pid:
                    child.status = status
                    if child is self.dealer and not child.ended_normally(EXIT_ALL_DONE):
                        mqueue.sweep_queues_of(pid)  # it may have died inside a creation
                    self._on_child_exit(child)

    def _on_child_exit(self, child: Child) -> None:
        assert child.status is not None
        if self.interrupted is not None:
            return
        if child is self.dealer:
            if child.ended_normally(EXIT_ALL_DONE):
                return
            # Nobody reads the ready queue any more: a generator blocked on it would wait
            # forever.
            self._stop(self.generator)
            if os.WIFEXITED(child.status) and os.WEXITSTATUS(child.status) == EXIT_STOPPED_EARLY:
                return  # the Dealer stopped the pool itself: its stats say why
        elif child.ended_normally() or not self.dealer.running:
            return  # a generator that finished, or that we stopped after the Dealer ended
        how = proc.describe_wait_status(child.status)
        self.cut_short = True  # a Dealer or generator died
        if self.end_reason is None:
            self.end_reason = f"the {child.role} was lost ({how})"
            log.info("%s (PID %d) %s: ending the run", child.role, child.pid, how,
                     extra=event(ev.ROLE_LOST, lost=child.role, lost_pid=child.pid, how=how))
        self._stop(self.dealer)
        self._stop(self.generator)

    @staticmethod
    def _stop(child: Child) -> None:
        if child.running:
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _on_pipe_lines(self, lines: list[bytes]) -> None:
        outcomes = []  # recorded together: their results lines go out in one write
        for line in lines:
            try:
                record = decode_record(line)
            except ProtocolError as e:
                log.error("Dropped a malformed record: %s", e)
                continue
            if isinstance(record, JobRecord):
                outcomes.append(record)
            elif isinstance(record, JobAccepted):
                self.recorder.accept(record.job)
            elif isinstance(record, LineRejected):
                self.recorder.rejected_lines += 1
                self.config.report_error(f"{record.where}: {record.reason}")
            else:
                self.recorder.stats = record
        self.recorder.record_all(outcomes)

    def _reap_orphans(self) -> None:
        """Wait for workers orphaned by a lost Dealer: PR_SET_PDEATHSIG has already sent
        them SIGKILL, and as a subreaper we are their parent now (they were reparented as
        the Dealer exited, before we reaped it)."""
        for pid in _children_of_self() - self.inherited_children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

def _children_of_self() -> set[int]:
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(child) for child in f.read().split()}
    except OSError:
        return set()
