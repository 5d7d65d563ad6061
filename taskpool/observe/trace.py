"""`taskpool report --format trace RUN.jsonl -o run.trace.json`: a run in the Trace Event
format (the JSON object form, `{"traceEvents": [...]}`), which Perfetto (ui.perfetto.dev,
"Open trace file") and chrome://tracing open and zoom, however many jobs the run had.

    a pool          a process (pid 1, 2, ...: its number in the order pools appear),
                    named by `process_name` metadata ("taskpool type 1", "taskpool dask type 1")
    a worker        a thread of its pool (tid: the worker's own PID), named by `thread_name`
                    ("worker 1471"), ordered by when it started (`thread_sort_index`)
    an attempt      a complete event ("ph": "X") on its worker's thread: "job 12 fib 30",
                    category its outcome (done, crashed, failed, stopped, lost, running),
                    with the job, attempt, outcome and worker in `args`
    a death         an instant event ("ph": "i", thread scope) on the dead worker's thread
    a resend        a flow ("ph": "s" inside the attempt the death cut, "ph": "f" with
                    "bp": "e" inside the attempt that ran the job next), drawn as an arrow

Timestamps are microseconds from the first event. A thread's slices must not overlap
partially (the viewers nest them): an attempt sent to a worker's queue before the one ahead
of it ended is drawn from the end of that one.
"""

from __future__ import annotations

import json
from typing import Any

from taskpool.observe.report import write_text
from taskpool.observe.timeline import Attempt, Timeline, load

Slices = dict[int, tuple[float, float]]  # id(attempt): (ts, dur) as drawn


def write_trace(events_path: str, out_path: str) -> Timeline:
    timeline = load(events_path)
    document = trace_document(timeline, events_path)
    write_text(out_path, json.dumps(document, separators=(",", ":")) + "\n")
    return timeline


def trace_document(timeline: Timeline, source: str) -> dict[str, Any]:
    tracks = _tracks(timeline)
    slices = _slices(timeline)
    events = [*_metadata(timeline, tracks), *_attempts(timeline, tracks, slices),
              *_deaths(timeline, tracks), *_flows(timeline, tracks, slices)]
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"source": source, "engine": timeline.engine,
                          **{k: v for k, v in timeline.summary.items()
                             if k in ("jobs", "done", "failed", "not_done", "crashes",
                                      "resends", "wall_time")}}}


def _tracks(timeline: Timeline) -> dict[int, tuple[int, int]]:
    """Each worker's (pid, tid): its pool's process, its own PID as the thread."""
    pools: dict[str, int] = {}
    for worker in sorted(timeline.workers.values(), key=lambda w: w.start):
        pools.setdefault(worker.pool, len(pools) + 1)
    return {pid: (pools[worker.pool], pid) for pid, worker in timeline.workers.items()}


def _us(timeline: Timeline, t: float) -> float:
    return round((t - timeline.t0) * 1e6, 3)


def _metadata(timeline: Timeline, tracks: dict[int, tuple[int, int]]) -> list[dict[str, Any]]:
    named: dict[int, str] = {}
    events: list[dict[str, Any]] = []
    ordered = sorted(timeline.workers.values(), key=lambda w: w.start)
    for index, worker in enumerate(ordered):
        pid, tid = tracks[worker.pid]
        if pid not in named:
            named[pid] = worker.pool
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                           "args": {"name": f"taskpool {worker.pool}"}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                           "args": {"sort_index": pid}})
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                       "args": {"name": f"worker {worker.pid}"}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                       "args": {"sort_index": index}})
    return events


def _slices(timeline: Timeline) -> Slices:
    """Each attempt's (ts, dur) on its worker's thread, none overlapping the one before."""
    drawn: Slices = {}
    by_worker: dict[int, list[Attempt]] = {}
    for attempt in timeline.attempts:
        by_worker.setdefault(attempt.pid, []).append(attempt)
    for attempts in by_worker.values():
        free_from = float("-inf")
        for attempt in sorted(attempts, key=lambda a: a.start):
            assert attempt.end is not None
            ts = max(_us(timeline, attempt.start), free_from)
            dur = max(_us(timeline, attempt.end) - ts, 1.0)  # at least 1 us: it has an inside
            drawn[id(attempt)] = (ts, round(dur, 3))
            free_from = ts + dur
    return drawn


def _attempts(timeline: Timeline, tracks: dict[int, tuple[int, int]],
              slices: Slices) -> list[dict[str, Any]]:
    events = []
    for attempt in timeline.attempts:
        pid, tid = tracks[attempt.pid]
        ts, dur = slices[id(attempt)]
        args: dict[str, Any] = {"job": attempt.job, "attempt": attempt.attempt,
                                "outcome": attempt.outcome, "worker": attempt.pid}
        if attempt.reason:
            args["reason"] = attempt.reason
        if attempt.queued is not None and attempt.queued < attempt.start:
            args["queued_ms"] = round((attempt.start - attempt.queued) * 1000, 3)
        events.append({"ph": "X", "name": f"job {attempt.job} {attempt.label}".rstrip(),
                       "cat": attempt.outcome, "pid": pid, "tid": tid, "ts": ts, "dur": dur,
                       "args": args})
    return events


def _deaths(timeline: Timeline, tracks: dict[int, tuple[int, int]]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for worker in timeline.workers.values():
        if worker.crashed and worker.end is not None:
            pid, tid = tracks[worker.pid]
            events.append({"ph": "i", "s": "t", "name": f"worker {worker.pid} died",
                           "cat": "death", "pid": pid, "tid": tid,
                           "ts": _us(timeline, worker.end), "args": {"reason": worker.reason}})
    for t, address in timeline.lost_workers:  # no PID: no thread of its own
        events.append({"ph": "i", "s": "g", "name": f"worker {address} lost", "cat": "death",
                       "pid": 0, "tid": 0, "ts": _us(timeline, t)})
    return events


def _flows(timeline: Timeline, tracks: dict[int, tuple[int, int]],
           slices: Slices) -> list[dict[str, Any]]:
    """An arrow from each attempt a death cut to the attempt that ran its job next: the
    start inside the first slice, the end ("bp": "e", the enclosing slice) inside the
    second, so that each binds to its own slice."""
    events: list[dict[str, Any]] = []
    for number, link in enumerate(timeline.links, start=1):
        if link.cut is None or id(link.cut) not in slices:
            continue
        (cut_ts, cut_dur), (retry_ts, retry_dur) = slices[id(link.cut)], slices[id(link.retry)]
        name = f"job {link.retry.job} resent"
        for phase, attempt, ts in (("s", link.cut, cut_ts + cut_dur - min(1.0, cut_dur / 2)),
                                   ("f", link.retry, retry_ts + min(1.0, retry_dur / 2))):
            pid, tid = tracks[attempt.pid]
            flow: dict[str, Any] = {"ph": phase, "id": number, "name": name, "cat": "resend",
                                    "pid": pid, "tid": tid, "ts": round(ts, 3)}
            if phase == "f":
                flow["bp"] = "e"
            events.append(flow)
    return events
