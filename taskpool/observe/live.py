"""The live view: on a terminal, a progress line stays at the bottom, and above it what a
person watching needs (observe/shown.py: by default warnings, crashes, failures and how the
run ends; every line with -v or --demo).

It runs in main, when stderr is a TTY and there is no -q. Every event of the run reaches
it: children write theirs as JSON lines to a pipe that main's loop reads (log.LiveHandler;
a per-job event, when no line of it is shown, as a short line of the fields counted:
log.job_event), main's own come straight in. The view copies each event to --events,
keeps the lines to show, and counts what the progress line shows.

It draws on a timer, never per event: main's loop asks `seconds_to_redraw()` for its
select() timeout. After a change, the lines waiting and the progress line are drawn at
most every REDRAW_INTERVAL; with nothing new, once every TICK, for the elapsed time. The
lines kept between two drawings are printed in one piece above the progress line, so a
thousand lines a second cost ten drawings, not a thousand.

It draws with a few ANSI control sequences of its own (`Screen`): importing a terminal
library (rich: ~0.1 s) would cost more than the whole of a run of 2,000 short jobs, and the
view is meant to cost a watched run next to nothing (`make bench`, bench/terminal.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from typing import Any, Callable

from taskpool.model.outcome import JobRecord, Status
from taskpool.observe import events as ev
from taskpool.observe.shown import Shown, is_shown
from taskpool.posix.proc import write_all

REDRAW_INTERVAL = 0.1  # seconds: 10 drawings a second at most
TICK = 1.0  # seconds: with nothing new, the elapsed time moves on once a second

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class Counts:
    """What the progress line counts, for the whole run or for one pool."""

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self.running = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed


class LiveView:
    """The view's state, owned by main's loop thread: what it counts, the lines waiting to
    be shown, and when it last drew."""

    def __init__(self, shown: Shown, text_level: int, events_fd: int | None,
                 pools: dict[int, str] | None = None) -> None:
        self.screen = Screen(2)
        self.shown = shown
        self.text_level = text_level
        self.events_fd = events_fd
        self.pools = pools or {}  # typed pools: number -> label, one row each
        self.started = time.monotonic()
        self.total: int | None = None  # known once the input is (a file, or stdin closed)
        self.accepted = 0
        self.pool_totals: Counter[int] | None = None
        self.all = Counts()
        self.per_pool: dict[int, Counts] = {number: Counts() for number in self.pools}
        self.job_pool: dict[int, int] = {}  # job: its pool, from its job_sent
        # The jobs each worker holds (sent to it, or seen started: Dask), and who holds
        # each: a worker that holds any runs one (the rest wait in its queue). A job sent
        # to another worker has left the first (taken back from its queue).
        self.holding: dict[int, set[int]] = {}  # worker pid: jobs
        self.held_by: dict[int, int] = {}  # job: worker pid
        # A death is logged as the worker is reaped, which may be before the Dealer reads
        # the ACK it sent: an event of a dead worker does not make it hold a job.
        self.dead: set[int] = set()
        self.recorded: Callable[[int], bool] = lambda job: False  # main's Recorder's
        self.crashes = 0
        self.resends = 0
        self.resumed = 0  # jobs the journal had an outcome for (--resume)
        self.interrupted: str | None = None  # the signal's name, once the run is stopping
        self.ended = False
        self.lines: list[str] = []  # shown at the next drawing
        self.dirty = False
        self.drawn_at = 0.0

    @property
    def wants_job_lines(self) -> bool:
        """Whether it shows the per-job lines (-v, --demo): they then come as whole events."""
        return self.shown is Shown.EVERYTHING and self.text_level <= logging.INFO

    def start(self) -> None:
        self.screen.start()

    def stop(self) -> None:
        """The last drawing, true of the run's end: nothing running or queued any more."""
        self.ended = True
        self.redraw()
        self.screen.stop()

    def report_error(self, message: str) -> None:
        """An error for the user, `taskpool: <message>`: printed above the progress line,
        as the log's lines are (the lines before it first). Written to stderr past the
        view, it would run on from the end of the progress line, and leave that line
        behind, stale, above the next drawing."""
        if self.ended:  # the last drawing is done: plainly below it
            self.screen.write_line(f"taskpool: {message}")
            return
        self.lines.append(f"taskpool: {message}")
        self.redraw()

    # --- events ------------------------------------------------------------------------

    def on_line(self, line: bytes) -> None:
        """A child's event, as it came through the pipe."""
        try:
            body = json.loads(line)
        except ValueError:
            return
        if self.events_fd is not None:
            os.write(self.events_fd, line + b"\n")
        self._show(body)

    def on_event(self, body: dict[str, Any]) -> None:
        """One of main's own events."""
        if self.events_fd is not None:
            os.write(self.events_fd, json.dumps(body, separators=(",", ":")).encode() + b"\n")
        self._show(body)

    def _show(self, body: dict[str, Any]) -> None:
        text = body.get("text")
        if text is not None:
            level = _LEVELS.get(body.get("level", "info"), logging.INFO)
            if level >= self.text_level and is_shown(self.shown, level, body):
                self.lines.append(text)
        self._count(body)
        self.dirty = True

    def _count(self, body: dict[str, Any]) -> None:
        kind = body.get("event")
        worker = int(body.get("worker") or 0)
        if kind in (ev.JOB_SENT, ev.JOB_STARTED):
            if self.pools and body.get("type") is not None:
                self.job_pool[body["job"]] = int(body["type"])
            if worker and worker not in self.dead:
                self._hold(body["job"], worker)
        elif kind == ev.WORKER_EXITED:
            for job in self.holding.pop(worker, set()):
                self.held_by.pop(job, None)
            self.dead.add(worker)
            self.crashes += bool(body.get("crash"))
        else:
            self._count_run(kind, body)

    def _count_run(self, kind: str | None, body: dict[str, Any]) -> None:
        """The events about the run as a whole."""
        if kind == ev.JOB_RESENT:
            self.resends += 1
        elif kind == ev.INTERRUPTED:
            self.interrupted = str(body.get("signal"))
        elif kind == ev.RUN_RESUMED:
            self.all.done += int(body.get("done") or 0)
            self.all.failed += int(body.get("failed") or 0)
            self.resumed = self.all.finished

    def on_outcomes(self, records: list[JobRecord]) -> None:
        """From main's Recorder: outcomes recorded (each job's once). The done and failed
        counts are these, not the events': a job is counted as the results file has it."""
        for record in records:
            self._release(record.job)
            pool = self.per_pool.get(record.type)
            for counts in (self.all, pool) if pool is not None else (self.all,):
                if record.status == Status.DONE.value:
                    counts.done += 1
                elif record.status == Status.FAILED.value:
                    counts.failed += 1
        self.dirty = True

    def _hold(self, job: int, worker: int) -> None:
        if self.recorded(job):  # its outcome overtook the event (read from another pipe)
            return
        self._release(job)
        self.held_by[job] = worker
        self.holding.setdefault(worker, set()).add(job)

    def _release(self, job: int) -> None:
        worker = self.held_by.pop(job, None)
        if worker is not None:
            self.holding[worker].discard(job)

    def _pool_counts(self, job: int) -> Counts:
        """The counts of the job's pool (typed pools), or a scratch one."""
        pool = self.per_pool.get(self.job_pool.get(job, -1))
        return pool if pool is not None else Counts()

    def _count_running(self) -> None:
        """Per pool and in all: the workers that hold a job run one."""
        for counts in (self.all, *self.per_pool.values()):
            counts.running = 0
        for jobs in self.holding.values():
            if jobs:
                self.all.running += 1
                self._pool_counts(next(iter(jobs))).running += 1

    def set_jobs(self, accepted: int, total: int | None) -> None:
        """From main: jobs accepted so far, and the total once it is known."""
        if (accepted, total) != (self.accepted, self.total):
            self.accepted, self.total = accepted, total
            self.dirty = True

    @property
    def wants_pool_totals(self) -> bool:
        return bool(self.pools) and self.total is not None and self.pool_totals is None

    def set_pool_totals(self, totals: Counter[int]) -> None:
        """From main, once the input is all known: each typed pool's jobs."""
        self.pool_totals = totals
        self.dirty = True

    # --- drawing -----------------------------------------------------------------------

    def seconds_to_redraw(self) -> float:
        wait = REDRAW_INTERVAL if self.dirty else TICK
        return max(0.0, self.drawn_at + wait - time.monotonic())

    def redraw(self) -> None:
        """The lines kept since the last drawing, then the progress line below them."""
        lines, self.lines = self.lines, []
        self.screen.draw(lines, self.render())
        self.dirty = False
        self.drawn_at = time.monotonic()

    def render(self) -> list[str]:
        """The progress line's rows: one per typed pool, then the run's."""
        self._count_running()
        labels = [*self.pools.values(), "all"] if self.pools else [""]
        width = max(len(label) for label in labels)
        rows = []
        for number, label in self.pools.items():
            total = self.pool_totals.get(number, 0) if self.pool_totals is not None else None
            rows.append((label, self._row(self.per_pool[number], total, run=False)))
        rows.append(("all" if self.pools else "", self._row(self.all, self.total, run=True)))
        return [(f"{label:<{width}} " if width else "") + row for label, row in rows]

    def _row(self, counts: Counts, total: int | None, run: bool) -> str:
        """A bar (once the total is known: a stream's is not until it ends) and the figures;
        the run's row adds crashes, resends, rate, elapsed time and ETA."""
        known = total if total is not None else self.accepted if run else counts.finished
        running = 0 if self.ended else counts.running
        queued = max(0, known - counts.finished - running)
        figures = [f"{counts.done:,}/{known:,}{'' if total is not None else '+'} done"]
        if counts.failed:
            figures.append(f"{counts.failed:,} failed")
        if self.ended:
            if queued:
                figures.append(f"{queued:,} not done")
        else:  # once stopping, the jobs not started never will be
            figures += [f"{running} running", f"{queued:,} "
                        + ("not started" if self.interrupted else "queued")]
        if run:
            figures += self._run_figures(total)
        bar = _bar(counts.finished, total) + " " if total else ""
        return f"{bar}{BOLD}{' · '.join(figures)}{RESET}"

    def _run_figures(self, total: int | None) -> list[str]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (self.all.finished - self.resumed) / elapsed
        figures = [f"{self.crashes} crashes", f"{self.resends} resends",
                   f"{rate:,.0f} jobs/s", _clock(elapsed)]
        if self.interrupted is not None:
            figures.append(f"interrupted by {self.interrupted}"
                           if self.ended else f"stopping on {self.interrupted}")
        elif total is not None and rate > 0 and not self.ended:
            figures.append(f"ETA {max(0.0, (total - self.all.finished) / rate):.0f} s")
        return figures


# --- the terminal ----------------------------------------------------------------------

BAR_WIDTH = 30
BOLD, RESET = "\x1b[1m", "\x1b[0m"
BAR_DONE, BAR_COMPLETE, BAR_LEFT = "\x1b[38;5;197m", "\x1b[38;5;70m", "\x1b[38;5;237m"


def _bar(finished: int, total: int) -> str:
    filled = min(BAR_WIDTH, BAR_WIDTH * finished // total)
    color = BAR_COMPLETE if finished >= total else BAR_DONE
    return (f"{color}{'━' * filled}{BAR_LEFT}{'━' * (BAR_WIDTH - filled)}{RESET}")


class Screen:
    """The bottom rows of a terminal, redrawn in place: the cursor goes back to the first
    row of the last drawing, the rows are erased to the end of the screen, the new lines
    are written (they scroll up and stay), then the rows again. Each drawing is one write.
    A row is cut at the terminal's width: a wrapped row would leave its first part behind,
    where the next drawing does not reach."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.rows_drawn = 0  # the rows of the last drawing, the cursor on the last one

    def start(self) -> None:
        self._write("\x1b[?25l")  # no cursor blinking over the progress line

    def draw(self, lines: list[str], rows: list[str]) -> None:
        width = shutil.get_terminal_size((100, 24)).columns - 1
        back = f"\x1b[{self.rows_drawn - 1}A" if self.rows_drawn > 1 else ""
        text = "".join(line + "\n" for line in lines)
        self._write(f"\r{back}\x1b[J{text}" + "\n".join(_cut(row, width) for row in rows))
        self.rows_drawn = len(rows)

    def stop(self) -> None:
        self._write("\n\x1b[?25h")
        self.rows_drawn = 0

    def write_line(self, line: str) -> None:
        self._write(line + "\n")

    def _write(self, text: str) -> None:
        try:
            write_all(self.fd, text.encode("utf-8", "replace"))
        except OSError:
            pass  # the terminal went away: the run goes on, its log and results too


def _cut(row: str, width: int) -> str:
    """`row` cut to `width` visible characters; its control sequences (ours: a few
    colours) take no room."""
    visible, out, i = 0, [], 0
    while i < len(row):
        if row[i] == "\x1b":
            end = row.index("m", i) + 1
            out.append(row[i:end])
            i = end
            continue
        if visible == width:
            out.append(RESET)
            break
        out.append(row[i])
        visible += 1
        i += 1
    return "".join(out)


def _clock(seconds: float) -> str:
    """Elapsed time as a clock: 0:07, 12:30, 1:02:03."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
