"""The local engine: main forks the TaskGenerator and the Dealer, records every job's
outcome, ends the run.

main is the recorder: the Dealer sends it each outcome over the record pipe and main hands
it to the Recorder (recorder.py, shared with the Dask engine), which writes the --results
line once per job id. Because main outlives both children, a killed Dealer or
generator cannot take recorded results with it: main keeps them, reports every other job it
knows of as not done, and exits 1.

main is single-threaded, and runs the engines' one loop (core/loop.py): its signal
handlers only note the signal; signal.set_wakeup_fd() wakes the select() loop, which does
the work: climb the SIGINT/SIGTERM ladder, reap children with waitpid(-1, WNOHANG) on
SIGCHLD, read the pipes, and end the run. main is a child subreaper, so workers orphaned by a
killed Dealer (which PR_SET_PDEATHSIG kills at once) are reaped here too, not left as zombies.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

import posix_ipc

from taskpool.core.loop import INTERRUPTS, EngineLoop, Rung
from taskpool.core.output import JobOutput
from taskpool.local.dealer import DealerConfig, run_dealer
from taskpool.local.generator import run_generator
from taskpool.model.exits import EXIT_ALL_DONE, EXIT_STOPPED_EARLY
from taskpool.model.outcome import JobRecord
from taskpool.observe import events as ev
from taskpool.observe.log import event
from taskpool.observe.log import main_log as log
from taskpool.posix import mqueue, proc
from taskpool.posix.spool import Spool, make_run_dir, remove_run_dir, sweep_abandoned_run_dirs
from taskpool.wire import decoded_or_dropped
from taskpool.wire.queue import MAX_MESSAGE_SIZE, READY_MESSAGE_SIZE
from taskpool.wire.records import JobAccepted, LineRejected, decode_record

__all__ = ["Main"]

HANDLED = INTERRUPTS | {signal.SIGCHLD}


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


class Main(EngineLoop):
    """The local engine: a forked TaskGenerator and Dealer, and the Dealer's workers."""

    last_line_read = 0  # of standard input, as the generator reports its lines
    run_dir: str | None = None  # the run's private directory (posix/spool.py)
    spool: Spool | None = None

    def execute(self) -> None:
        # A shell may exec us with children of its own (a process substitution): those are
        # not ours to wait for.
        self.inherited_children = _children_of_self()
        proc.become_subreaper()
        self.install_signal_handlers(HANDLED)
        try:
            mqueue.sweep_abandoned_queues()
            self._make_run_dir()
            if self._fork_children():
                self.run_loop()
                self._reap_orphans()
                self._drain_live_view()
        finally:
            self.stop_waking()
            self.close_wake_pipe()

    def run(self) -> int:
        # The run's directory goes after the recorder's last outcomes, which deliver output.
        try:
            return super().run()
        finally:
            self._remove_run_dir()

    def _make_run_dir(self) -> None:
        """The run's private directory: the spool of the commands' texts and the output of
        their attempts (posix/spool.py), removed when the run ends."""
        output_dir = self.config.output_dir
        sweep_abandoned_run_dirs(output_dir)
        self.run_dir = make_run_dir(output_dir)
        self.spool = Spool.create(self.run_dir)
        self.recorder.output = JobOutput(self.run_dir, output_dir)

    def _remove_run_dir(self) -> None:
        if self.spool is not None:
            self.spool.close()
        if self.run_dir is not None:
            remove_run_dir(self.run_dir)

    def _fork_children(self) -> bool:
        """Fork the Dealer and the TaskGenerator, and open main's ends of their pipes; False
        if the pool cannot start (its ready queue is refused): every job is then reported
        not done, with the reason."""
        streaming = self.config.source.jobs is None
        try:
            ready_queue, (record_r, record_w), (intake_r, intake_w) = self._open_channels(
                streaming)
        except mqueue.QueueLimitError as e:
            self._cannot_start(str(e))
            return False
        main_pid = os.getpid()
        if self.config.results is not None:
            self.config.results.flush()

        # main is single-threaded: these forks copy no other thread's state. Our signals are
        # blocked across the forks, so that none is handled by main's handlers in a child
        # (or written to main's wake-up pipe) before the child has set its own. Each child
        # leaves through os._exit(), never back into this block.
        with self.signals_held(HANDLED):
            # The Dealer first: the pool's start (its workers' forks) is the longer way to
            # the first job, and the generator is not read before the pool is up.
            dealer_pid = os.fork()
            if dealer_pid == 0:
                os.close(record_r)
                run_dealer(self._dealer_config(), ready_queue, record_w, main_pid)
            generator_pid = os.fork()
            if generator_pid == 0:
                run_generator(self.config.source, ready_queue, intake_w, main_pid, self.spool)
        ready_queue.close()
        os.close(record_w)
        if intake_w is not None:
            os.close(intake_w)
        self.generator = Child("TaskGenerator", generator_pid)
        self.dealer = Child("Dealer", dealer_pid)

        # The intake pipe first: a job's JobAccepted is in it before the job is sent, and is
        # read in the same round as the job's outcome, or an earlier one; so a job is known
        # (and journaled) before its outcome is recorded.
        self.intake = LineReader(intake_r) if intake_r is not None else None
        self.readers = ([self.intake] if self.intake is not None else []) + \
            [LineReader(record_r)]
        # The live view's pipe stays open in main (its handler is inherited from here), so
        # it never ends the loop; it is drained once every child is gone.
        live_fd = self.config.live_fd
        self.live_reader = LineReader(live_fd) if live_fd is not None else None
        return True

    def _open_channels(self, streaming: bool) -> tuple[
            posix_ipc.MessageQueue, tuple[int, int], tuple[int | None, int | None]]:
        """The ready queue, the record pipe and (reading standard input) the intake pipe;
        QueueLimitError, naming the limit, if the kernel refuses one of them."""
        opened: list[int] = []
        queue = self._create_ready_queue()
        try:
            opened += os.pipe()
            if streaming:
                opened += os.pipe()
        except OSError as e:
            queue.close()
            for fd in opened:
                os.close(fd)
            if e.errno == errno.ENFILE:
                raise mqueue.QueueLimitError(
                    "the system ran out of file descriptors (fs.file-max)") from None
            if e.errno != errno.EMFILE:
                raise
            raise mqueue.QueueLimitError(mqueue.out_of_descriptors_reason()) from None
        intake = (opened[2], opened[3]) if streaming else (None, None)
        return queue, (opened[0], opened[1]), intake

    def _cannot_start(self, reason: str) -> None:
        self.config.report_error(reason)
        self.cut_short = True
        self.end_reason = f"the pool could not start: {reason}"

    # --- the loop's duties (core/loop.py) ------------------------------------------------

    def finished(self) -> bool:
        return not (any(r.open for r in self.readers) or self.dealer.running
                    or self.generator.running)

    def descriptors(self) -> list[int]:
        watched = [r.fd for r in self.readers if r.open]
        # Once a drawing of the live view is waiting, what the children write is read with
        # it (catch_up_live_view), not as it comes: a thousand events a second wake main
        # ten times, not a thousand. The pipe holds that long (its size: cli/run.py).
        live = self.config.live
        if self.live_reader is not None and live is not None and not live.dirty:
            watched.append(self.live_reader.fd)
        return watched

    def read_ready(self, ready: list[int]) -> None:
        for reader in self.readers:  # in order: the intake pipe first
            if reader.open and reader.fd in ready:
                self._on_pipe_lines(reader.read_lines())
        if self.live_reader is not None and self.live_reader.fd in ready:
            self._on_live_lines(self.live_reader)

    def input_done(self) -> bool:
        return self.intake is None or not self.intake.open

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self._reap_children()

    def on_interrupt(self, rung: Rung, signum: int) -> None:
        """First signal: the Dealer lets running jobs finish within the grace period.
        Second: the Dealer kills them at once. Third: the pool is killed outright."""
        self._signal_children(signal.SIGKILL if rung is Rung.KILL_POOL else signal.SIGTERM)

    def _create_ready_queue(self) -> posix_ipc.MessageQueue:
        """Of READY_MESSAGE_SIZE messages (JobBatches of 32 jobs) if the queue budget holds
        them with the Dealer's result queue; else, or if the kernel refuses them
        (fs.mqueue.msgsize_max), of the smallest ones (batches of 4 jobs), so that a tight
        budget (`ulimit -q`) still runs. These two are all the queues a run has, whatever
        its number of workers (workers take their jobs from mailboxes: posix/mailbox.py)."""
        # The Dealer's result queue: a CLI run's messages are of the smallest size.
        others = mqueue.queue_cost(mqueue.RESULT_QUEUE_DEPTH, MAX_MESSAGE_SIZE)
        ready = mqueue.queue_cost(mqueue.READY_QUEUE_DEPTH, READY_MESSAGE_SIZE)
        if mqueue.fits_budget(ready + others):
            try:
                return mqueue.create_queue("ready", mqueue.READY_QUEUE_DEPTH, READY_MESSAGE_SIZE)
            except mqueue.QueueLimitError:
                pass
        return mqueue.create_queue("ready", mqueue.READY_QUEUE_DEPTH, MAX_MESSAGE_SIZE)

    def _dealer_config(self) -> DealerConfig:
        pool, source = self.config.pool, self.config.source
        jobs_total = None if source.jobs is None else sum(
            1 for job in source.jobs if job.job_id not in source.done)
        return DealerConfig(pool.layout, pool.plan, pool.policy, pool.preempt,
                            spool=self.spool, run_dir=self.run_dir, jobs_total=jobs_total)

    def catch_up_live_view(self) -> None:
        self._drain_live_view()

    def _drain_live_view(self) -> None:
        """Read the children's events until their pipe is empty (the read end does not
        block: cli/run.py)."""
        if self.live_reader is not None:
            while self.live_reader.open and self._on_live_lines(self.live_reader):
                pass

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

    def _signal_children(self, sig: int) -> None:
        for child in (self.generator, self.dealer):
            _signal(child, sig)

    def _reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in (self.generator.pid, self.dealer.pid):
                self._kill_orphans()
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
            if self.generator.running and self.intake is not None:
                self._left_input_unread()
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

    def _left_input_unread(self) -> None:
        """The pool stopped while standard input was still being read: the lines not read
        are neither run nor reported, so the run cannot end as if all were done."""
        self.cut_short = True
        log.warning("Standard input was left unread: the pool stopped after line %d was "
                    "read; the lines after it were not run", self.last_line_read,
                    extra=event(ev.INPUT_UNREAD, last_line=self.last_line_read))

    @staticmethod
    def _stop(child: Child) -> None:
        _signal(child, signal.SIGTERM)

    def _on_pipe_lines(self, lines: list[bytes]) -> None:
        outcomes = []  # recorded together: their results lines go out in one write
        for line in lines:
            record = decoded_or_dropped(decode_record, line, log, "record")
            if record is None:
                continue
            if isinstance(record, JobRecord):
                outcomes.append(record)
            elif isinstance(record, JobAccepted):
                self.recorder.accept(record.job)
                self.last_line_read = max(self.last_line_read, record.job.line)
            elif isinstance(record, LineRejected):
                self.recorder.rejected_lines += 1
                self.last_line_read = max(self.last_line_read, record.line)
                self.config.report_error(f"{record.where}: {record.reason}")
            else:
                self.recorder.stats = record
        self.recorder.record_all(outcomes)

    def _kill_orphans(self) -> None:
        """A worker of a lost Dealer died, reparented to us: its command, if it ran one, is
        ours now too (reparented as the worker died, before we could reap the worker).
        Kill it with its process group at once, not at the end of the run."""
        keep = {child.pid for child in (self.generator, self.dealer) if child.running}
        proc.kill_orphans(keep | self.inherited_children)

    def _reap_orphans(self) -> None:
        """Wait for workers orphaned by a lost Dealer: PR_SET_PDEATHSIG has already sent
        them SIGKILL, and as a subreaper we are their parent now (they were reparented as
        the Dealer exited, before we reaped it). Their commands, orphaned with them, are
        ours too, each as its worker dies: killed with their process groups, round after
        round until no child of the run is left."""
        while True:
            left = _children_of_self() - self.inherited_children
            if not left:
                return
            proc.kill_orphans(self.inherited_children)
            for pid in left:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass


def _signal(child: Child, sig: int) -> None:
    if child.running:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass


def _children_of_self() -> set[int]:
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(child) for child in f.read().split()}
    except OSError:
        return set()
