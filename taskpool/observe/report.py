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
from typing import Any

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
    pool: str
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
    timeline = Timeline(events[0]["t"], events[-1]["t"])
    open_attempt: dict[int, Attempt] = {}  # job: its attempt in flight
    pending_resend: dict[int, tuple[int, float]] = {}  # job: (dead pid, when)
    for e in events:
        kind, t = e.get("event"), e["t"]
        if kind == "worker_started":
            timeline.workers[e["pid"]] = Worker(e["pid"], str(e.get("type", "1")), t)
        elif kind == "job_sent":
            attempt = Attempt(e["job"], e.get("attempt", 1), e["worker"], t,
                              label=f"{e.get('kind', '')} {e.get('arg', '')}".strip())
            open_attempt[e["job"]] = attempt
            timeline.attempts.append(attempt)
            if e["job"] in pending_resend:
                dead, when = pending_resend.pop(e["job"])
                timeline.links.append((dead, when, attempt))
        elif kind == "job_started":
            attempt_or_none = open_attempt.get(e["job"])
            if attempt_or_none is not None and attempt_or_none.pid == e["worker"]:
                attempt_or_none.start = t  # it ran from here; before, it waited queued
        elif kind == "job_requeued" and e.get("reason") == "unstarted":
            # It was still in the dead worker's queue: that attempt never ran.
            for attempt in reversed(timeline.attempts):
                if attempt.job == e["job"] and attempt.pid == e["worker"]:
                    attempt.outcome = "taken_back"
                    break
        elif kind == "job_done" and e["job"] not in open_attempt:
            # The worker's death was logged first (it sent its result, then died): the
            # attempt it closed did finish.
            for attempt in reversed(timeline.attempts):
                if attempt.job == e["job"] and attempt.pid == e["worker"]:
                    attempt.outcome = "done"
                    break
        elif kind in ("job_done", "job_failed", "job_taken_back"):
            attempt_or_none = open_attempt.pop(e["job"], None)
            if attempt_or_none is not None and attempt_or_none.end is None:
                attempt_or_none.end = t
                attempt_or_none.outcome = {"job_done": "done", "job_failed": "crashed",
                                           "job_taken_back": "taken_back"}[kind]
        elif kind == "worker_exited":
            worker = timeline.workers.get(e["worker"])
            if worker is not None:
                worker.end, worker.crashed = t, bool(e.get("crash"))
            for job, attempt in list(open_attempt.items()):
                if attempt.pid == e["worker"] and attempt.end is None:
                    attempt.end = t
                    attempt.outcome = "crashed" if e.get("crash") else "stopped"
                    del open_attempt[job]
        elif kind == "job_resent":
            pending_resend[e["job"]] = (e["worker"], t)
        elif kind == "summary":
            timeline.summary = e
    timeline.attempts = [a for a in timeline.attempts if a.outcome != "taken_back"]
    for attempt in timeline.attempts:
        if attempt.end is None:
            attempt.end = timeline.t1
    _assign_slots(timeline)
    return timeline


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


def render(timeline: Timeline, title: str) -> str:
    lanes = sorted({(w.pool, w.slot) for w in timeline.workers.values()},
                   key=lambda lane: (lane[0].zfill(8), lane[1]))
    lane_of = {lane: i for i, lane in enumerate(lanes)}
    span = max(timeline.t1 - timeline.t0, 1e-3)

    def x(t: float) -> float:
        return LABEL_WIDTH + (t - timeline.t0) / span * PLOT_WIDTH

    def y(pid: int) -> float:
        worker = timeline.workers.get(pid)
        lane = lane_of.get((worker.pool, worker.slot), 0) if worker else 0
        return TOP + lane * LANE_HEIGHT

    height = TOP + max(len(lanes), 1) * LANE_HEIGHT + 10
    width = LABEL_WIDTH + PLOT_WIDTH + 20
    svg: list[str] = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
                      f'height="{height}" font-family="sans-serif" font-size="11">']
    for i, (pool, slot) in enumerate(lanes):
        top = TOP + i * LANE_HEIGHT
        svg.append(f'<rect class="lane" x="0" y="{top}" width="{LABEL_WIDTH + PLOT_WIDTH}" '
                   f'height="{LANE_HEIGHT}" fill="{"#f4f4f4" if i % 2 else "#ffffff"}"/>')
        svg.append(f'<text x="6" y="{top + 16}">type {html.escape(pool)}, slot {slot + 1}</text>')
    for step in range(11):  # time axis: ten divisions
        t = timeline.t0 + span * step / 10
        svg.append(f'<line x1="{x(t):.1f}" y1="{TOP - 4}" x2="{x(t):.1f}" y2="{height - 10}" '
                   'stroke="#ddd"/>')
        svg.append(f'<text x="{x(t):.1f}" y="{TOP - 8}" text-anchor="middle">'
                   f'{t - timeline.t0:.2f}s</text>')
    colours = {"done": "#4caf50", "crashed": "#e53935", "stopped": "#9e9e9e",
               "running": "#90caf9"}
    for a in timeline.attempts:
        assert a.end is not None
        left, bar = x(a.start), max(x(a.end) - x(a.start), 1.5)
        tip = (f"job {a.job} {a.label}, attempt {a.attempt}, worker {a.pid}: {a.outcome}, "
               f"{a.end - a.start:.3f} s")
        svg.append(f'<rect class="attempt {a.outcome}" x="{left:.1f}" y="{y(a.pid) + 4}" '
                   f'width="{bar:.1f}" height="{LANE_HEIGHT - 8}" rx="2" '
                   f'fill="{colours.get(a.outcome, "#bbb")}" stroke="#333" stroke-width="0.5">'
                   f'<title>{html.escape(tip)}</title></rect>')
        if bar > 18:
            svg.append(f'<text x="{left + 3:.1f}" y="{y(a.pid) + 16}" fill="#fff">{a.job}</text>')
    for w in timeline.workers.values():
        if w.crashed and w.end is not None:
            cx, cy = x(w.end), y(w.pid) + LANE_HEIGHT / 2
            svg.append(f'<g class="crash"><title>worker {w.pid} died</title>'
                       f'<path d="M{cx - 6:.1f},{cy - 6:.1f} L{cx + 6:.1f},{cy + 6:.1f} '
                       f'M{cx - 6:.1f},{cy + 6:.1f} L{cx + 6:.1f},{cy - 6:.1f}" '
                       'stroke="#b71c1c" stroke-width="3"/></g>')
    for dead, when, retry in timeline.links:
        x1, y1 = x(when), y(dead) + LANE_HEIGHT / 2
        x2, y2 = x(retry.start), y(retry.pid) + LANE_HEIGHT / 2
        svg.append(f'<path class="resend" d="M{x1:.1f},{y1:.1f} C{x1 + 30:.1f},{y1:.1f} '
                   f'{x2 - 30:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" fill="none" stroke="#ff9800" '
                   f'stroke-width="2" stroke-dasharray="4 2"><title>job {retry.job} resent '
                   f'after worker {dead} died</title></path>')
    svg.append("</svg>")

    s = timeline.summary
    recoveries = recovery_times(timeline)
    wall = s.get("wall_time") or span
    facts = [("jobs", s.get("jobs", "?")), ("done", s.get("done", "?")),
             ("failed", s.get("failed", "?")), ("not done", s.get("not_done", "?")),
             ("crashes", s.get("crashes", "?")), ("resends", s.get("resends", "?")),
             ("wall time", f"{wall:.2f} s"),
             ("throughput", f"{(s.get('done') or 0) / wall:,.1f} jobs/s" if wall else "?")]
    if recoveries:
        facts.append(("crash to retry start", f"median {statistics.median(recoveries) * 1000:.1f} "
                                         f"ms, max {max(recoveries) * 1000:.1f} ms"))
    summary = "".join(f"<div class='fact'><b>{html.escape(str(v))}</b>"
                      f"<span>{html.escape(k)}</span></div>" for k, v in facts)
    legend = ("<span class='key' style='background:#4caf50'></span>done "
              "<span class='key' style='background:#e53935'></span>attempt cut by a crash "
              "<span class='key' style='background:#9e9e9e'></span>stopped by us "
              "<b style='color:#b71c1c'>&#x2715;</b> worker died "
              "<b style='color:#ff9800'>- - -</b> job resent to its next worker")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 20px; color: #222; }}
.facts {{ display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }}
.fact {{ border: 1px solid #ccc; border-radius: 6px; padding: 6px 12px; }}
.fact b {{ display: block; font-size: 18px; }}
.fact span {{ font-size: 12px; color: #666; }}
.key {{ display: inline-block; width: 14px; height: 10px; margin: 0 4px 0 12px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="facts">{summary}</div>
<p class="legend">{legend}</p>
{"".join(svg)}
</body></html>
"""


def write_report(events_path: str, out_path: str) -> Timeline:
    timeline = build(read_events(events_path))
    page = render(timeline, f"taskpool run: {events_path}")
    try:
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as e:
        raise ReportError(f"{out_path}: cannot write: {e.strerror}") from None
    return timeline
