"""The engines' main loop, written once, in the shape of gunicorn's arbiter.

A signal handler only notes the signal: signal.set_wakeup_fd() writes its number to the
wake-up pipe, and the loop, blocked in select(), wakes on it. One method a duty::

    run_loop()  while not finished():
        sleep()             select() on the engine's descriptors and the wake-up pipe, until
                            one is ready or the earliest timer is due (it never polls: with
                            no timer pending it waits for a descriptor)
        handle_signals()    SIGINT/SIGTERM climb the ladder (interrupt(): one rung each);
                            any other signal goes to the engine's on_signal()
        read_ready()        the engine's own descriptors, in the order it needs
        commit_journal()    the Recorder's pending batch, once due
        check_timers()      the engine's own deadlines (--timeout, --grace)
        redraw_live_view()  the terminal's live view, once due

The ladder, decided here for every engine (each engine says what a rung does to its pool in
on_interrupt()):

    rung 1  GRACEFUL      jobs not started are not run; running ones get --grace to finish
    rung 2  STOP_RUNNING  running jobs are stopped now
    rung 3  KILL_POOL     the pool is killed outright (and on every signal after)

The loop, its state and the Recorder belong to the engine's main thread. Another thread of
the engine may wake the loop by writing a zero byte to `wake_w` (no signal is numbered 0).
"""

from __future__ import annotations

import enum
import fcntl
import os
import select
import signal
from abc import abstractmethod
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager

from taskpool.core.engine import Engine, RunConfig
from taskpool.observe import events as ev
from taskpool.observe.log import event
from taskpool.observe.log import main_log as log

__all__ = ["INTERRUPTS", "EngineLoop", "Rung", "set_nonblocking"]

INTERRUPTS = frozenset({signal.SIGINT, signal.SIGTERM})


class Rung(enum.IntEnum):
    """How far the SIGINTs and SIGTERMs of a run have gone: one rung a signal."""

    GRACEFUL = 1
    STOP_RUNNING = 2
    KILL_POOL = 3


class EngineLoop(Engine):
    """An engine run by one thread's select() loop: see the module's docstring. A subclass
    supplies its descriptors (`descriptors`, `read_ready`), when it is done (`finished`),
    its timers (`timers`, `check_timers`) and what each rung of the ladder does
    (`on_interrupt`)."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.wake_r, self.wake_w = _nonblocking_pipe()
        self.interrupts: list[int] = []  # the SIGINTs and SIGTERMs caught, in order

    # --- signals -----------------------------------------------------------------------

    def install_signal_handlers(self, signums: Collection[int]) -> None:
        """From now on each of `signums` is noted and wakes the loop."""
        signal.set_wakeup_fd(self.wake_w)
        for signum in signums:
            signal.signal(signum, _note_signal)

    @staticmethod
    @contextmanager
    def signals_held(signums: Collection[int]) -> Iterator[None]:
        """Block `signums` in this thread for the block's span: one that comes meanwhile is
        held by the kernel, and handled (noted, written to the wake-up pipe) once unblocked."""
        signal.pthread_sigmask(signal.SIG_BLOCK, signums)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)

    def stop_waking(self) -> None:
        """The loop is over: signals no longer reach the wake-up pipe. A SIGINT or SIGTERM
        from now on changes nothing of the run, which writes its results; it is noted, so
        that the command exits as an interrupted run (cli.entry_point), not by the signal."""
        signal.set_wakeup_fd(-1)
        for signum in INTERRUPTS:
            signal.signal(signum, _note_late_interrupt)

    def close_wake_pipe(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)

    # --- the loop ----------------------------------------------------------------------

    def run_loop(self) -> None:
        while not self.finished():
            ready = self.sleep()
            if self.wake_r in ready:
                self.handle_signals()
            self.read_ready(ready)
            self.commit_journal()
            self.check_timers()
            self.redraw_live_view()

    def sleep(self) -> list[int]:
        """Block until a descriptor is ready or the earliest timer is due; the ready ones."""
        watched = [*self.descriptors(), self.wake_r]
        ready, _, _ = select.select(watched, [], [], self.seconds_to_wait())
        return ready

    def seconds_to_wait(self) -> float | None:
        """select()'s timeout: the next journal commit, live redraw or engine timer due;
        None (until something happens) when none is pending."""
        waits = [self.recorder.seconds_to_commit(), *self.timers()]
        if self.config.live is not None:
            waits.append(self.config.live.seconds_to_redraw())
        due = [wait for wait in waits if wait is not None]
        return max(0.0, min(due)) if due else None

    def handle_signals(self) -> None:
        """What the wake-up pipe holds: the interrupts first, in the order they came, then
        one call of on_signal() for each other signal caught."""
        try:
            caught = os.read(self.wake_r, 4096)
        except BlockingIOError:
            return
        for signum in caught:
            if signum in INTERRUPTS:
                self.interrupt(signum)
        for signum in sorted(set(caught) - INTERRUPTS - {0}):
            self.on_signal(signum)

    def interrupt(self, signum: int) -> None:
        """A SIGINT or SIGTERM: the run's next rung. The first one sets why the run ends
        (128 + the signal)."""
        self.interrupts.append(signum)
        rung = Rung(min(len(self.interrupts), Rung.KILL_POOL))
        name = signal.Signals(signum).name
        if rung is Rung.GRACEFUL:
            self.interrupted = signum
            self.end_reason = f"interrupted by {name}"
            log.info("Interrupted by %s: stopping the pool", name,
                     extra=event(ev.INTERRUPTED, signal=name))
        elif rung is Rung.STOP_RUNNING:
            log.info("Second %s: stopping running jobs now", name,
                     extra=event(ev.INTERRUPTED_AGAIN, signal=name, rung=int(rung)))
        else:
            log.info("%s again: killing the pool", name,
                     extra=event(ev.INTERRUPTED_AGAIN, signal=name, rung=int(rung)))
        self.on_interrupt(rung, signum)

    def commit_journal(self) -> None:
        if self.recorder.seconds_to_commit() == 0.0:
            self.recorder.commit()

    def redraw_live_view(self) -> None:
        live = self.config.live
        if live is None:
            return
        known = len(self.recorder.known)
        live.set_jobs(known, known if self.input_done() else None)
        if live.wants_pool_totals:  # once, when every job is known
            live.set_pool_totals(Counter(job.pool for job in self.recorder.known.values()))
        if live.seconds_to_redraw() == 0.0:
            self.catch_up_live_view()
            live.redraw()

    # --- what the engine supplies ----------------------------------------------------------

    @abstractmethod
    def finished(self) -> bool:
        """Whether the loop is over."""

    @abstractmethod
    def descriptors(self) -> list[int]:
        """The engine's descriptors to wait on, beside the wake-up pipe."""

    @abstractmethod
    def read_ready(self, ready: list[int]) -> None:
        """Read what the engine's descriptors (those in `ready`) and threads brought."""

    @abstractmethod
    def input_done(self) -> bool:
        """Whether every job is known (the live view's total)."""

    @abstractmethod
    def on_interrupt(self, rung: Rung, signum: int) -> None:
        """What the `rung` of the ladder does to the engine's pool."""

    def timers(self) -> list[float]:
        """Seconds to each of the engine's own deadlines."""
        return []

    def check_timers(self) -> None:
        """Act on the engine's deadlines that are due."""

    def on_signal(self, signum: int) -> None:
        """A signal other than SIGINT and SIGTERM that the engine installed a handler for."""

    def catch_up_live_view(self) -> None:
        """Hand the live view, before it draws, the events the engine has not read yet."""


def set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def _nonblocking_pipe() -> tuple[int, int]:
    """Non-blocking at both ends: a full pipe drops a wake-up (the loop is awake anyway),
    and the loop reads what is there without waiting for more."""
    read_end, write_end = os.pipe()
    set_nonblocking(read_end)
    set_nonblocking(write_end)
    return read_end, write_end


def _note_signal(signum: int, frame: object) -> None:
    pass  # the wake-up fd carries the signal number to the loop


# SIGINTs and SIGTERMs that came after an engine's loop ended: written by the handler below,
# read by cli.entry_point for the exit status. Only the CLI's process runs an engine.
late_interrupts: list[int] = []


def _note_late_interrupt(signum: int, frame: object) -> None:
    late_interrupts.append(signum)
