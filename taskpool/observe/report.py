"""`taskpool report RUN.jsonl -o run.html`: a timeline page of a run, from its --events file.

One lane per worker slot: a replacement takes the slot of the worker it replaces, so a lane
reads as "this place in the pool over time", and a crash shows as a red mark where one
worker ended and the next began. A summary above says what happened and how fast the pool
recovered (crash to resend, from the events' timestamps).

Up to `MAX_BARS` attempts, a bar each (from the job's ACK, or its send, to its result or its
worker's death); a crashed attempt is red, and a curve links the crash to the attempt that
ran the job again. Past that, bars would be narrower than a pixel (20,000 jobs on 1,000
pixels) and the page tens of megabytes: each lane is cut into columns instead, shaded by how
busy its worker was, with the attempts cut by a crash and the deaths counted per column,
and the page says so; `taskpool report --format trace` keeps every attempt, for Perfetto.

The page is self-contained: inline SVG and CSS, no script, nothing fetched.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

from taskpool.observe.timeline import Attempt, ReportError, Timeline, load, recovery_times

LANE_HEIGHT = 24
LABEL_WIDTH = 150
PLOT_WIDTH = 1000
TOP = 30  # room for the time axis
MAX_BARS = 2000  # more attempts than this are drawn as columns
# Columns a lane in the aggregated view: fewer when there are many lanes, so that the page
# stays under about 20,000 shapes (a few MB) even for 512 workers.
MAX_COLUMNS, MIN_COLUMNS, SHAPES_BUDGET = 250, 20, 20_000
BUSY_LEVELS = 4  # a column's shade: busy 1/4, 2/4, 3/4 or all of the time (or idle)

COLOURS = {"done": "#4caf50", "crashed": "#e53935", "failed": "#b71c1c", "stopped": "#9e9e9e",
           "lost": "#bdbdbd", "running": "#90caf9"}

LEGEND = ("<span class='key' style='background:#4caf50'></span>done "
          "<span class='key' style='background:#e53935'></span>attempt cut by a crash "
          "<span class='key' style='background:#9e9e9e'></span>stopped by us "
          "{lost}<b style='color:#b71c1c'>&#x2715;</b> worker died "
          "<b style='color:#ff9800'>- - -</b> job resent to its next worker")

LOST = ("<span class='key' style='background:#bdbdbd'></span>cut with its worker, not "
        "charged (Dask ran it again, or its result was lost) ")

AGGREGATED = ("<p class='note'>{attempts:,} attempts are too many to draw one by one: each "
              "lane is cut into {columns} columns of {width:.3g} s, shaded by how busy its "
              "worker was (darker: busier). A red tick marks a column where attempts were "
              "cut by a crash, &#x2715; one where workers died (hover for counts); resends "
              "are counted above, not drawn. <code>taskpool report --format trace</code> "
              "keeps every attempt, to zoom in Perfetto or chrome://tracing.</p>")

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 20px; color: #222; }}
.facts {{ display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }}
.fact {{ border: 1px solid #ccc; border-radius: 6px; padding: 6px 12px; }}
.fact b {{ display: block; font-size: 18px; }}
.fact span {{ font-size: 12px; color: #666; }}
.key {{ display: inline-block; width: 14px; height: 10px; margin: 0 4px 0 12px; }}
.note {{ max-width: 1150px; color: #444; }}
</style></head><body>
<h1>{title}</h1>
<div class="facts">{facts}</div>
<p class="legend">{legend}</p>
{note}{svg}
</body></html>
"""


def write_report(events_path: str, out_path: str) -> Timeline:
    timeline = load(events_path)
    page = render(timeline, f"taskpool run: {events_path}")
    write_text(out_path, page)
    return timeline


def write_text(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise ReportError(f"{path}: cannot write: {e.strerror}") from None


def render(timeline: Timeline, title: str) -> str:
    if len(timeline.attempts) <= MAX_BARS:
        plot: _Plot = _Plot(timeline)
        note = ""
    else:
        plot = _AggregatedPlot(timeline)
        note = AGGREGATED.format(attempts=len(timeline.attempts), columns=plot.columns,
                                 width=plot.span / plot.columns)
    lost = any(a.outcome == "lost" for a in timeline.attempts)
    return PAGE.format(title=html.escape(title), facts=_facts(timeline),
                       legend=LEGEND.format(lost=LOST if lost else ""), note=note,
                       svg="".join(plot.svg()))


def _facts(timeline: Timeline) -> str:
    """The summary boxes above the plot: the run's counts, speed and recovery times."""
    s = timeline.summary
    recoveries = recovery_times(timeline)
    wall = s.get("wall_time") or _span(timeline)
    facts = [("engine", timeline.engine), ("jobs", s.get("jobs", "?")),
             ("done", s.get("done", "?")), ("failed", s.get("failed", "?")),
             ("not done", s.get("not_done", "?")), ("crashes", s.get("crashes", "?")),
             ("resends", s.get("resends", "?")), ("wall time", f"{wall:.2f} s"),
             ("throughput", f"{(s.get('done') or 0) / wall:,.1f} jobs/s" if wall else "?")]
    if recoveries:
        facts.append(("crash to retry start", f"median {statistics.median(recoveries) * 1000:.1f} "
                                         f"ms, max {max(recoveries) * 1000:.1f} ms"))
    if timeline.lost_workers:
        facts.append(("workers lost, PID unknown (not drawn)", len(timeline.lost_workers)))
    return "".join(f"<div class='fact'><b>{html.escape(str(v))}</b>"
                   f"<span>{html.escape(k)}</span></div>" for k, v in facts)


def _span(timeline: Timeline) -> float:
    return max(timeline.t1 - timeline.t0, 1e-3)


class _Plot:
    """The SVG: a lane per worker slot, time left to right, a bar per attempt."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.lanes = sorted({(w.pool, w.slot) for w in timeline.workers.values()},
                            key=lambda lane: (lane[0].zfill(8), lane[1]))
        self.lane_of = {lane: i for i, lane in enumerate(self.lanes)}
        self.span = _span(timeline)
        self.height = TOP + max(len(self.lanes), 1) * LANE_HEIGHT + 10

    def x(self, t: float) -> float:
        return LABEL_WIDTH + (t - self.timeline.t0) / self.span * PLOT_WIDTH

    def lane(self, pid: int) -> int:
        worker = self.timeline.workers.get(pid)
        return self.lane_of.get((worker.pool, worker.slot), 0) if worker else 0

    def y(self, pid: int) -> float:
        """The top of the lane of worker `pid`."""
        return TOP + self.lane(pid) * LANE_HEIGHT

    def svg(self) -> list[str]:
        width = LABEL_WIDTH + PLOT_WIDTH + 20
        return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
                f'height="{self.height}" font-family="sans-serif" font-size="11">',
                *self.lane_rows(), *self.time_axis(), *self.marks(), "</svg>"]

    def marks(self) -> Iterator[str]:
        yield from self.attempt_bars()
        yield from self.crashes()
        yield from self.resends()

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
        return [self.cross(w.end, self.y(w.pid), f"worker {w.pid} died: {w.reason}")
                for w in self.timeline.workers.values() if w.crashed and w.end is not None]

    def cross(self, t: float, top: float, tip: str) -> str:
        cx, cy = self.x(t), top + LANE_HEIGHT / 2
        return (f'<g class="crash"><title>{html.escape(tip)}</title>'
                f'<path d="M{cx - 6:.1f},{cy - 6:.1f} L{cx + 6:.1f},{cy + 6:.1f} '
                f'M{cx - 6:.1f},{cy + 6:.1f} L{cx + 6:.1f},{cy - 6:.1f}" '
                'stroke="#b71c1c" stroke-width="3"/></g>')

    def resends(self) -> list[str]:
        curves = []
        for link in self.timeline.links:
            x1, y1 = self.x(link.when), self.y(link.dead) + LANE_HEIGHT / 2
            x2, y2 = self.x(link.retry.start), self.y(link.retry.pid) + LANE_HEIGHT / 2
            curves.append(f'<path class="resend" d="M{x1:.1f},{y1:.1f} '
                          f'C{x1 + 30:.1f},{y1:.1f} {x2 - 30:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
                          'fill="none" stroke="#ff9800" stroke-width="2" '
                          f'stroke-dasharray="4 2"><title>job {link.retry.job} resent after '
                          f'worker {link.dead} died</title></path>')
        return curves


@dataclass
class _Column:
    busy: float = 0.0  # seconds some attempt ran in it
    done: int = 0  # attempts that ended done in it
    cut: int = 0  # attempts cut by a crash in it
    deaths: int = 0


class _AggregatedPlot(_Plot):
    """The SVG of a large run: each lane cut into columns, a column shaded by its lane's
    busy time, with its attempts cut and its deaths counted. Runs of equally shaded columns
    are one shape."""

    def __init__(self, timeline: Timeline) -> None:
        super().__init__(timeline)
        self.columns = max(MIN_COLUMNS, min(MAX_COLUMNS, SHAPES_BUDGET // max(len(self.lanes), 1)))
        self.grid = [[_Column() for _ in range(self.columns)] for _ in self.lanes]
        for attempt in timeline.attempts:
            self.add(attempt)
        for w in timeline.workers.values():
            if w.crashed and w.end is not None:
                self.grid[self.lane(w.pid)][self.column(w.end)].deaths += 1

    def column(self, t: float) -> int:
        return min(int((t - self.timeline.t0) / self.span * self.columns), self.columns - 1)

    def add(self, attempt: Attempt) -> None:
        """Its running time into the columns it spans, its end into the last one."""
        assert attempt.end is not None
        lane, width = self.grid[self.lane(attempt.pid)], self.span / self.columns
        first, last = self.column(attempt.start), self.column(attempt.end)
        for i in range(first, last + 1):
            left = self.timeline.t0 + i * width
            lane[i].busy += max(0.0, min(attempt.end, left + width) - max(attempt.start, left))
        if attempt.outcome == "done":
            lane[last].done += 1
        elif attempt.outcome == "crashed":
            lane[last].cut += 1

    def marks(self) -> Iterator[str]:
        width = self.span / self.columns
        for i, lane in enumerate(self.grid):
            top = TOP + i * LANE_HEIGHT
            yield from self.shades(lane, top, width)
            for c, column in enumerate(lane):
                t = self.timeline.t0 + (c + 0.5) * width
                if column.cut:
                    yield (f'<rect class="cut" x="{self.x(t) - 1:.1f}" y="{top + 2}" width="2" '
                           f'height="{LANE_HEIGHT - 4}" fill="{COLOURS["crashed"]}"><title>'
                           f'{column.cut} attempts cut by a crash</title></rect>')
                if column.deaths:
                    yield self.cross(t, top, f"{column.deaths} workers died")

    def shades(self, lane: list[_Column], top: float, width: float) -> Iterator[str]:
        """One rect a run of columns of the same busy level, with its counts."""
        def level(column: _Column) -> int:
            return round(min(column.busy / width, 1.0) * BUSY_LEVELS)

        c = 0
        while c < len(lane):
            end, shade = c, level(lane[c])
            while end + 1 < len(lane) and level(lane[end + 1]) == shade:
                end += 1
            if shade:
                x1 = self.x(self.timeline.t0 + c * width)
                x2 = self.x(self.timeline.t0 + (end + 1) * width)
                done = sum(column.done for column in lane[c:end + 1])
                yield (f'<rect class="busy" x="{x1:.1f}" y="{top + 4}" width="{x2 - x1:.1f}" '
                       f'height="{LANE_HEIGHT - 8}" fill="{COLOURS["done"]}" '
                       f'fill-opacity="{shade / BUSY_LEVELS:.2f}"><title>busy '
                       f'{100 * shade // BUSY_LEVELS}% of the time, {done} attempts done'
                       f'</title></rect>')
            c = end + 1
