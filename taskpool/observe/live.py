"""The live view: on a terminal, a progress line stays at the bottom while the log scrolls.

It runs in main, and only when stderr is a TTY (not with --quiet or --log). Every event of
the run reaches it: children write theirs as JSON lines to a pipe that main's loop reads
(log.LiveHandler), main's own come straight in. The view prints each event's text line
above the progress line (when its level is shown), copies the event to --events, and counts
what the progress line shows.

It redraws on events, at most every REDRAW_INTERVAL: main's loop asks `seconds_to_redraw()`
for its select() timeout, which is None (sleep until something happens) unless a change is
waiting to be drawn. No timer wakes while nothing changes. rich draws it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

REDRAW_INTERVAL = 0.1  # seconds: 10 redraws a second at most

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class LiveView:
    def __init__(self, text_level: int, events_fd: int | None) -> None:
        self.console = Console(stderr=True, highlight=False)
        self.live = Live(console=self.console, auto_refresh=False, transient=False)
        self.text_level = text_level
        self.events_fd = events_fd
        self.started = time.monotonic()
        self.total: int | None = None  # known once the input is (a file, or stdin closed)
        self.accepted = 0
        self.finished = 0  # done or failed
        self.running: dict[int, int] = {}  # worker pid: job
        # A death is logged as the worker is reaped, which may be before the Dealer reads
        # the ACK it sent: an ACK from a dead worker does not make a job running.
        self.dead: set[int] = set()
        self.crashes = 0
        self.resends = 0
        self.dirty = False
        self.drawn_at = 0.0

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.redraw()
        self.live.stop()

    def report_error(self, message: str) -> None:
        """An error for the user, `taskpool: <message>`: printed above the progress line,
        as the log's lines are. Written to stderr past the view, it would run on from the
        end of the progress line, and leave that line behind, stale, above the next
        drawing."""
        self.console.print(Text(f"taskpool: {message}"))

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
        if _LEVELS.get(body.get("level", "info"), logging.INFO) >= self.text_level:
            self.console.print(Text(body.get("text", "")))
        self._count(body)
        self.dirty = True

    def _count(self, body: dict[str, Any]) -> None:
        kind = body.get("event")
        worker = int(body.get("worker") or 0)
        if kind == "job_started" and worker not in self.dead:
            self.running[worker] = body["job"]
        elif kind in ("job_done", "job_failed"):
            self.finished += 1
            self.running.pop(worker, None)
        elif kind == "worker_exited":
            self.running.pop(worker, None)
            self.dead.add(worker)
            self.crashes += bool(body.get("crash"))
        elif kind == "job_resent":
            self.resends += 1

    def set_jobs(self, accepted: int, total: int | None) -> None:
        """From main: jobs accepted so far, and the total once it is known."""
        if (accepted, total) != (self.accepted, self.total):
            self.accepted, self.total = accepted, total
            self.dirty = True

    # --- drawing -----------------------------------------------------------------------

    def seconds_to_redraw(self) -> float | None:
        if not self.dirty:
            return None
        return max(0.0, self.drawn_at + REDRAW_INTERVAL - time.monotonic())

    def redraw(self) -> None:
        self.live.update(self.render(), refresh=True)
        self.dirty = False
        self.drawn_at = time.monotonic()

    def render(self) -> Table:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.finished / elapsed
        known = self.total if self.total is not None else self.accepted
        queued = max(0, known - self.finished - len(self.running))
        figures = (f"{self.finished:,}/{known:,}{'' if self.total is not None else '+'} done"
                   f" · {len(self.running)} running · {queued:,} queued"
                   f" · {self.crashes} crashes · {self.resends} resends · {rate:,.0f} jobs/s")
        if self.total is not None and rate > 0:
            figures += f" · ETA {max(0.0, (self.total - self.finished) / rate):.0f} s"
        line = Table.grid(padding=(0, 1))
        parts: list[Any] = []
        if self.total:  # a stream's total is unknown until it ends: counts, no bar
            parts.append(ProgressBar(total=self.total, completed=self.finished, width=30))
        parts.append(Text(figures, style="bold"))
        line.add_row(*parts)
        return line
