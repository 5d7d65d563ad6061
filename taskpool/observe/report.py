"""`taskpool report RUN.jsonl -o run.html`: a timeline of a run, from its --events file.

One lane per worker slot: a replacement takes the slot of the worker it replaces, so a lane
reads as "this place in the pool over time", and a crash shows as a red mark where one
worker ended and the next began. A bar per job attempt (from the job's ACK, or its send, to
its result or its worker's death); a crashed attempt is red, and a curve links the crash to
the attempt that ran the job again. A summary above says what happened and how fast the pool
recovered (crash to resend, from the events' timestamps).

The page is self-contained: inline SVG and CSS, no script, nothing fetched.
"""

from __future__ import annotations

import html
import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

LANE_HEIGHT = 24
LABEL_WIDTH = 150
PLOT_WIDTH = 1000
TOP = 30  # room for the time axis


class ReportError(Exception):
    """An events file that cannot be drawn; the message is for people."""


@dataclass
class Attempt:
    job: int
    attempt: int
    pid: int
    start: float
    end: float | None = None
    outcome: str = "running"  # done, crashed, failed, stopped, taken_back
    label: str = ""


@dataclass
class Worker:
    pid: int
    pool: str  # its pool's label: "type 1", "type fib"
    start: float
    end: float | None = None
    crashed: bool = False
    slot: int = 0


@dataclass
class Timeline:
    t0: float
    t1: float
    workers: dict[int, Worker] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    links: list[tuple[int, float, Attempt]] = field(default_factory=list)  # dead pid, t, retry
    summary: dict[str, Any] = field(default_factory=dict)


def read_events(path: str) -> list[dict[str, Any]]:
    events = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    body = json.loads(line)
                    float(body["t"])
                except (ValueError, KeyError, TypeError):
                    raise ReportError(f"{path}:{number}: not an event line") from None
                events.append(body)
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror}") from None
    if not events:
        raise ReportError(f"{path}: no events (was it written by 'taskpool run --events'?)")
    return sorted(events, key=lambda e: e["t"])


def build(events: list[dict[str, Any]]) -> Timeline:
    """The timeline of a run's events (in time order)."""
    builder = _TimelineBuilder(Timeline(events[0]["t"], events[-1]["t"]))
    for e in events:
        kind = e.get("event")
        handle = _ON_EVENT.get(kind) if isinstance(kind, str) else None
        if handle is not None:
            handle(builder, e)
    return builder.finish()


class _TimelineBuilder:
    """Reads the events one at a time, each by the method of its kind (`_ON_EVENT`)."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.open_attempt: dict[int, Attempt] = {}  # job: its attempt in flight
        self.pending_resend: dict[int, tuple[int, float]] = {}  # job: (dead pid, when)

    def worker_started(self, e: dict[str, Any]) -> None:
        # Its pool's label as the log shows it ("type 2", "type fib"); a plain run's one pool.
        self.timeline.workers[e["pid"]] = Worker(e["pid"], e.get("pool", "type 1"), e["t"])

    def job_sent(self, e: dict[str, Any]) -> None:
        attempt = Attempt(e["job"], e.get("attempt", 1), e["worker"], e["t"],
                          label=f"{e.get('kind', '')} {e.get('arg', '')}".strip())
        self.open_attempt[e["job"]] = attempt
        self.timeline.attempts.append(attempt)
        if e["job"] in self.pending_resend:
            dead, when = self.pending_resend.pop(e["job"])
            self.timeline.links.append((dead, when, attempt))

    def job_started(self, e: dict[str, Any]) -> None:
        attempt = self.open_attempt.get(e["job"])
        if attempt is not None and attempt.pid == e["worker"]:
            attempt.start = e["t"]  # it ran from here; before, it waited queued

    def job_requeued(self, e: dict[str, Any]) -> None:
        if e.get("reason") == "unstarted":
            # It was still in the dead worker's queue: that attempt never ran.
            self._mark_last_attempt(e, "taken_back")

    def job_done(self, e: dict[str, Any]) -> None:
        if e["job"] in self.open_attempt:
            self.job_ended(e)
        else:
            # The worker's death was logged first (it sent its result, then died): the
            # attempt it closed did finish.
            self._mark_last_attempt(e, "done")

    def job_ended(self, e: dict[str, Any]) -> None:
        """job_done, job_failed or job_taken_back: the job's attempt in flight ends."""
        attempt = self.open_attempt.pop(e["job"], None)
        if attempt is not None and attempt.end is None:
            attempt.end = e["t"]
            # A job of real work that ran and failed (the Dealer's job_failed: its worker
            # lives) is no crash.
            ran_and_failed = e["event"] == "job_failed" and e.get("role") == "Dealer"
            attempt.outcome = "failed" if ran_and_failed else _ENDED_AS[e["event"]]

    def worker_exited(self, e: dict[str, Any]) -> None:
        worker = self.timeline.workers.get(e["worker"])
        if worker is not None:
            worker.end, worker.crashed = e["t"], bool(e.get("crash"))
        for job, attempt in list(self.open_attempt.items()):
            if attempt.pid == e["worker"] and attempt.end is None:
                attempt.end = e["t"]
                attempt.outcome = "crashed" if e.get("crash") else "stopped"
                del self.open_attempt[job]

    def job_resent(self, e: dict[str, Any]) -> None:
        self.pending_resend[e["job"]] = (e["worker"], e["t"])

    def summary(self, e: dict[str, Any]) -> None:
        self.timeline.summary = e

    def _mark_last_attempt(self, e: dict[str, Any], outcome: str) -> None:
        """The latest attempt of e's job on e's worker ended as `outcome`."""
        for attempt in reversed(self.timeline.attempts):
            if attempt.job == e["job"] and attempt.pid == e["worker"]:
                attempt.outcome = outcome
                return

    def finish(self) -> Timeline:
        """Attempts that never ran dropped, those still running ended with the run, and the
        workers in their slots."""
        timeline = self.timeline
        timeline.attempts = [a for a in timeline.attempts if a.outcome != "taken_back"]
        for attempt in timeline.attempts:
            if attempt.end is None:
                attempt.end = timeline.t1
        _assign_slots(timeline)
        return timeline


_ENDED_AS = {"job_done": "done", "job_failed": "crashed", "job_taken_back": "taken_back"}
_ON_EVENT: dict[str, Callable[[_TimelineBuilder, dict[str, Any]], None]] = {
    "worker_started": _TimelineBuilder.worker_started,
    "job_sent": _TimelineBuilder.job_sent,
    "job_started": _TimelineBuilder.job_started,
    "job_requeued": _TimelineBuilder.job_requeued,
    "job_done": _TimelineBuilder.job_done,
    "job_failed": _TimelineBuilder.job_ended,
    "job_taken_back": _TimelineBuilder.job_ended,
    "worker_exited": _TimelineBuilder.worker_exited,
    "job_resent": _TimelineBuilder.job_resent,
    "summary": _TimelineBuilder.summary,
}


def _assign_slots(timeline: Timeline) -> None:
    """A worker takes the lowest slot of its pool that is free when it starts."""
    busy_until: dict[str, list[float]] = {}
    for worker in sorted(timeline.workers.values(), key=lambda w: w.start):
        slots = busy_until.setdefault(worker.pool, [])
        free = [i for i, end in enumerate(slots) if end <= worker.start]
        worker.slot = free[0] if free else len(slots)
        end = worker.end if worker.end is not None else float("inf")
        if free:
            slots[worker.slot] = end
        else:
            slots.append(end)


def recovery_times(timeline: Timeline) -> list[float]:
    """Seconds from each crash to its job's next send."""
    return [link[2].start - link[1] for link in timeline.links if link[2].start >= link[1]]


# --- The page ---------------------------------------------------------------------------

COLOURS = {"done": "#4caf50", "crashed": "#e53935", "failed": "#fb8c00", "stopped": "#9e9e9e",
           "running": "#90caf9"}

LEGEND = ("<span class='key' style='background:#4caf50'></span>done "
          "<span class='key' style='background:#e53935'></span>attempt cut by a crash "
          "<span class='key' style='background:#9e9e9e'></span>stopped by us "
          "<b style='color:#b71c1c'>&#x2715;</b> worker died "
          "<b style='color:#ff9800'>- - -</b> job resent to its next worker")

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 20px; color: #222; }}
.facts {{ display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }}
.fact {{ border: 1px solid #ccc; border-radius: 6px; padding: 6px 12px; }}
.fact b {{ display: block; font-size: 18px; }}
.fact span {{ font-size: 12px; color: #666; }}
.key {{ display: inline-block; width: 14px; height: 10px; margin: 0 4px 0 12px; }}
</style></head><body>
<h1>{title}</h1>
<div class="facts">{facts}</div>
<p class="legend">{legend}</p>
{svg}
</body></html>
"""


def render(timeline: Timeline, title: str) -> str:
    return PAGE.format(title=html.escape(title), facts=_facts(timeline), legend=LEGEND,
                       svg="".join(_Plot(timeline).svg()))


def _facts(timeline: Timeline) -> str:
    """The summary boxes above the plot: the run's counts, speed and recovery times."""
    s = timeline.summary
    recoveries = recovery_times(timeline)
    wall = s.get("wall_time") or _span(timeline)
    facts = [("jobs", s.get("jobs", "?")), ("done", s.get("done", "?")),
             ("failed", s.get("failed", "?")), ("not done", s.get("not_done", "?")),
             ("crashes", s.get("crashes", "?")), ("resends", s.get("resends", "?")),
             ("wall time", f"{wall:.2f} s"),
             ("throughput", f"{(s.get('done') or 0) / wall:,.1f} jobs/s" if wall else "?")]
    if recoveries:
        facts.append(("crash to retry start", f"median {statistics.median(recoveries) * 1000:.1f} "
                                         f"ms, max {max(recoveries) * 1000:.1f} ms"))
    return "".join(f"<div class='fact'><b>{html.escape(str(v))}</b>"
                   f"<span>{html.escape(k)}</span></div>" for k, v in facts)


def _span(timeline: Timeline) -> float:
    return max(timeline.t1 - timeline.t0, 1e-3)


class _Plot:
    """The SVG: a lane per worker slot, time left to right."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.lanes = sorted({(w.pool, w.slot) for w in timeline.workers.values()},
                            key=lambda lane: (lane[0].zfill(8), lane[1]))
        self.lane_of = {lane: i for i, lane in enumerate(self.lanes)}
        self.span = _span(timeline)
        self.height = TOP + max(len(self.lanes), 1) * LANE_HEIGHT + 10

    def x(self, t: float) -> float:
        return LABEL_WIDTH + (t - self.timeline.t0) / self.span * PLOT_WIDTH

    def y(self, pid: int) -> float:
        """The top of the lane of worker `pid`."""
        worker = self.timeline.workers.get(pid)
        lane = self.lane_of.get((worker.pool, worker.slot), 0) if worker else 0
        return TOP + lane * LANE_HEIGHT

    def svg(self) -> list[str]:
        width = LABEL_WIDTH + PLOT_WIDTH + 20
        return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
                f'height="{self.height}" font-family="sans-serif" font-size="11">',
                *self.lane_rows(), *self.time_axis(), *self.attempt_bars(), *self.crashes(),
                *self.resends(), "</svg>"]

    def lane_rows(self) -> list[str]:
        """A band a lane, shaded every other one, named by its pool and slot."""
        width = LABEL_WIDTH + PLOT_WIDTH
        return [row for i, (pool, slot) in enumerate(self.lanes) for row in (
            f'<rect class="lane" x="0" y="{TOP + i * LANE_HEIGHT}" width="{width}" '
            f'height="{LANE_HEIGHT}" fill="{"#f4f4f4" if i % 2 else "#ffffff"}"/>',
            f'<text x="6" y="{TOP + i * LANE_HEIGHT + 16}">{html.escape(pool)}, '
            f'slot {slot + 1}</text>')]

    def time_axis(self) -> list[str]:
        ticks = []
        for step in range(11):  # ten divisions
            t = self.timeline.t0 + self.span * step / 10
            ticks.append(f'<line x1="{self.x(t):.1f}" y1="{TOP - 4}" x2="{self.x(t):.1f}" '
                         f'y2="{self.height - 10}" stroke="#ddd"/>')
            ticks.append(f'<text x="{self.x(t):.1f}" y="{TOP - 8}" text-anchor="middle">'
                         f'{t - self.timeline.t0:.2f}s</text>')
        return ticks

    def attempt_bars(self) -> list[str]:
        bars = []
        for a in self.timeline.attempts:
            assert a.end is not None
            left, bar = self.x(a.start), max(self.x(a.end) - self.x(a.start), 1.5)
            top = self.y(a.pid)
            tip = (f"job {a.job} {a.label}, attempt {a.attempt}, worker {a.pid}: "
                   f"{a.outcome}, {a.end - a.start:.3f} s")
            bars.append(f'<rect class="attempt {a.outcome}" x="{left:.1f}" y="{top + 4}" '
                        f'width="{bar:.1f}" height="{LANE_HEIGHT - 8}" rx="2" '
                        f'fill="{COLOURS.get(a.outcome, "#bbb")}" stroke="#333" '
                        f'stroke-width="0.5"><title>{html.escape(tip)}</title></rect>')
            if bar > 18:
                bars.append(f'<text x="{left + 3:.1f}" y="{top + 16}" fill="#fff">'
                            f'{a.job}</text>')
        return bars

    def crashes(self) -> list[str]:
        marks = []
        for w in self.timeline.workers.values():
            if w.crashed and w.end is not None:
                cx, cy = self.x(w.end), self.y(w.pid) + LANE_HEIGHT / 2
                marks.append(f'<g class="crash"><title>worker {w.pid} died</title>'
                             f'<path d="M{cx - 6:.1f},{cy - 6:.1f} L{cx + 6:.1f},{cy + 6:.1f} '
                             f'M{cx - 6:.1f},{cy + 6:.1f} L{cx + 6:.1f},{cy - 6:.1f}" '
                             'stroke="#b71c1c" stroke-width="3"/></g>')
        return marks

    def resends(self) -> list[str]:
        curves = []
        for dead, when, retry in self.timeline.links:
            x1, y1 = self.x(when), self.y(dead) + LANE_HEIGHT / 2
            x2, y2 = self.x(retry.start), self.y(retry.pid) + LANE_HEIGHT / 2
            curves.append(f'<path class="resend" d="M{x1:.1f},{y1:.1f} '
                          f'C{x1 + 30:.1f},{y1:.1f} {x2 - 30:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
                          'fill="none" stroke="#ff9800" stroke-width="2" '
                          f'stroke-dasharray="4 2"><title>job {retry.job} resent after '
                          f'worker {dead} died</title></path>')
        return curves


def write_report(events_path: str, out_path: str) -> Timeline:
    timeline = build(read_events(events_path))
    page = render(timeline, f"taskpool run: {events_path}")
    try:
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as e:
        raise ReportError(f"{out_path}: cannot write: {e.strerror}") from None
    return timeline
