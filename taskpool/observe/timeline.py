"""A run's timeline, read back from its --events file: who ran which attempt of which job,
when, how it ended, which workers died, and which crash each resend answered.

Both report formats draw this (report.py: the HTML page; trace.py: the Trace Event format),
and both engines' events make it:

- local: `job_sent` names the worker whose queue took the job (the attempt starts there, and
  at its ACK, `job_started`, if one comes); `worker_started` opens a worker's lane.
- Dask: `job_sent` names no worker (the scheduler chooses); the attempt starts at
  `job_started`, which names the worker process, and a worker is known from the first event
  that names it. A worker lost with no PID known (`worker_exited` with `worker: null`) is
  found by its address, if an earlier event gave it.

An attempt ends at its result (`job_done`), its worker's death (`worker_exited`), its
failure, or when it is taken back unstarted (then it is not drawn: it never ran).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from taskpool.observe import events as ev


class ReportError(Exception):
    """An events file that cannot be drawn; the message is for people."""


@dataclass
class Attempt:
    job: int
    attempt: int
    pid: int
    start: float
    end: float | None = None
    # done, crashed (its worker died: charged, resent or failed), failed (Dask: it raised),
    # stopped (by the pool), lost (Dask: cut with its worker, not charged: run again by Dask
    # on its own, or completed and its result lost), running, taken_back
    outcome: str = "running"
    label: str = ""  # "fib 30"
    queued: float | None = None  # when it was sent, if before its start
    reason: str = ""  # how its worker died


@dataclass
class Worker:
    pid: int
    pool: str  # its pool's label: "type 1", "type fib", "dask type 1"
    start: float
    end: float | None = None
    crashed: bool = False
    reason: str = ""
    slot: int = 0


@dataclass(frozen=True)
class Link:
    """A worker's death and the attempt that ran its job next."""

    dead: int  # the dead worker's pid
    when: float
    cut: Attempt | None  # the attempt the death cut short, if it was seen
    retry: Attempt


@dataclass
class Timeline:
    t0: float
    t1: float
    engine: str = "local"
    workers: dict[int, Worker] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    lost_workers: list[tuple[float, str]] = field(default_factory=list)  # no pid: (t, what)
    summary: dict[str, Any] = field(default_factory=dict)


def read_events(path: str) -> list[dict[str, Any]]:
    """The events of `path` in time order, each with its line number as `_line`."""
    events = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    body = json.loads(line)
                    body["t"] = float(body["t"])
                except (ValueError, KeyError, TypeError):
                    raise ReportError(f"{path}:{number}: not an event line") from None
                body["_line"] = number
                events.append(body)
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text file of events") from None
    if not events:
        raise ReportError(f"{path}: no events (was it written by 'taskpool run --events'?)")
    return sorted(events, key=lambda e: e["t"])


def load(path: str) -> Timeline:
    """The timeline of the events file at `path`; ReportError if it has nothing to draw."""
    timeline = build(read_events(path), path)
    if not timeline.attempts:
        raise ReportError(f"{path}: no job ran in this run: there is no attempt to draw")
    return timeline


def build(events: list[dict[str, Any]], path: str = "events") -> Timeline:
    """The timeline of a run's events (in time order)."""
    builder = _TimelineBuilder(Timeline(events[0]["t"], events[-1]["t"]))
    for e in events:
        kind = e.get("event")
        handle = _ON_EVENT.get(kind) if isinstance(kind, str) else None
        if handle is None:
            continue
        try:
            handle(builder, e)
        except KeyError as missing:
            raise ReportError(f"{path}:{e.get('_line', '?')}: a {kind} event without its "
                              f"{missing} field") from None
        except (TypeError, ValueError, AttributeError):
            raise ReportError(f"{path}:{e.get('_line', '?')}: a {kind} event with a field "
                              "of the wrong type") from None
    return builder.finish()


class _TimelineBuilder:
    """Reads the events one at a time, each by the method of its kind (`_ON_EVENT`)."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.open_attempt: dict[tuple[int, int], Attempt] = {}  # (job, pid): in flight
        self.submitted: dict[int, tuple[float, int, str]] = {}  # Dask job: (t, attempt, label)
        self.pending_resend: dict[int, Link] = {}  # job: its crash, the retry not yet known
        self.pid_at: dict[str, int] = {}  # a Dask worker's address: its pid
        self.charged: set[int] = set()  # id() of the attempts the supervisor charged
        self.one_thread = False  # Dask: every worker runs one task at a time
        self.job_types: dict[int, Any] = {}  # job: its type (pool), from its send

    # --- workers ----------------------------------------------------------------------

    def dask_started(self, e: dict[str, Any]) -> None:
        self.timeline.engine = "dask"
        # Our own cluster's workers have one thread each; a given cluster's, if it says so.
        self.one_thread = bool(e.get("own_cluster")) or e.get("threads") == e.get("workers")

    def worker_started(self, e: dict[str, Any]) -> None:
        # Its pool's label as the log shows it ("type 2", "type fib"); a plain run's one pool.
        self.timeline.workers[e["pid"]] = Worker(e["pid"], e.get("pool", "type 1"), e["t"])

    def _seen(self, pid: int, t: float, address: Any = None, pool: Any = None) -> None:
        """A worker named by an event (Dask's have no worker_started): known from then, in
        the pool (job type) of the first job it is seen with."""
        if isinstance(address, str):
            self.pid_at[address] = pid
        if pid not in self.timeline.workers:
            label = f"type {pool if pool is not None else 1}"
            if self.timeline.engine == "dask":
                label = f"dask {label}"
            self.timeline.workers[pid] = Worker(pid, label, t)

    def worker_exited(self, e: dict[str, Any]) -> None:
        pid = e["worker"]
        if pid is None:
            pid = self.pid_at.get(e.get("address", ""))
        crashed = bool(e.get("crash"))
        if pid is None:
            if crashed:
                self.timeline.lost_workers.append((e["t"], str(e.get("address", "?"))))
            return
        self._seen(int(pid), e["t"], pool=e.get("type"))
        worker = self.timeline.workers[pid]
        worker.end, worker.crashed, worker.reason = e["t"], crashed, str(e.get("reason", ""))
        for (_, on), attempt in list(self.open_attempt.items()):
            if on == pid:
                self._end(attempt, e["t"], "crashed" if crashed else "stopped")
                attempt.reason = worker.reason

    # --- attempts ---------------------------------------------------------------------

    def job_sent(self, e: dict[str, Any]) -> None:
        label = f"{e.get('kind', '')} {e.get('arg', '')}".strip()
        self.job_types[e["job"]] = e.get("type")
        if e.get("worker") is None:  # Dask: the attempt starts where it is started
            self.submitted[e["job"]] = (e["t"], int(e.get("attempt", 1)), label)
            return
        self._open(e["job"], int(e.get("attempt", 1)), e["worker"], e["t"], label)

    def job_started(self, e: dict[str, Any]) -> None:
        key = (e["job"], e["worker"])
        attempt = self.open_attempt.get(key)
        if attempt is not None:
            attempt.start = e["t"]  # it ran from here; before, it waited queued
            return
        worker = self.timeline.workers.get(e["worker"])
        if worker is not None and worker.end is not None:
            # Heard after its worker's death was (an ACK read after the reaping): the
            # attempt it started was drawn from its send, and is over.
            return
        queued, number, label = self.submitted.get(e["job"], (None, e.get("attempt", 1), ""))
        self._seen(e["worker"], e["t"], e.get("address"), self.job_types.get(e["job"]))
        opened = self._open(e["job"], int(e.get("attempt", number)), e["worker"], e["t"], label)
        opened.queued = queued

    def _open(self, job: int, number: int, pid: int, t: float, label: str) -> Attempt:
        self._seen(pid, t, pool=self.job_types.get(job))
        attempt = Attempt(job, number, pid, t, label=label, queued=t)
        self.open_attempt[(job, pid)] = attempt
        self.timeline.attempts.append(attempt)
        crash = self.pending_resend.pop(job, None)
        if crash is not None:
            self.timeline.links.append(Link(crash.dead, crash.when, crash.cut, attempt))
        return attempt

    def job_done(self, e: dict[str, Any]) -> None:
        job, pid = e["job"], e["worker"]
        self._seen(pid, e["t"], e.get("address"), self.job_types.get(job))
        attempt = self.open_attempt.get((job, pid))
        if attempt is None:
            attempt = self._last_on(job, pid)
            if attempt is not None:
                # The worker's death was logged first (it sent its result, then died): the
                # attempt it closed did finish.
                attempt.outcome = "done"
                return
            attempt = self._unseen_start(e)
        self._end(attempt, e["t"], "done")
        for (other, _), rival in list(self.open_attempt.items()):
            if other == job:  # Dask: a run of it cut short elsewhere, its worker lost
                self._end(rival, e["t"], "lost")

    def _unseen_start(self, e: dict[str, Any]) -> Attempt:
        """Dask: a result whose start was not seen. The attempt is drawn from when the job
        was last submitted (or its previous attempt ended), the earliest it could start."""
        job = e["job"]
        queued, _, label = self.submitted.get(job, (e["t"], 1, ""))
        ends = [a.end for a in self.timeline.attempts if a.job == job and a.end is not None]
        attempt = self._open(job, int(e.get("attempt", 1)), e["worker"],
                             max([queued, *ends]), label)
        attempt.queued = None
        return attempt

    def job_failed(self, e: dict[str, Any]) -> None:
        attempt = self.open_attempt.get((e["job"], e["worker"]))
        if attempt is not None:  # Dask: it raised (a local worker's death closed it first)
            self._end(attempt, e["t"], "failed")
            attempt.reason = str(e.get("reason", ""))
        attempt = attempt or self._last_on(e["job"], e["worker"])
        if attempt is not None:
            self.charged.add(id(attempt))

    def job_taken_back(self, e: dict[str, Any]) -> None:
        attempt = self.open_attempt.get((e["job"], e["worker"]))
        if attempt is not None:
            self._end(attempt, e["t"], "taken_back")
            self._unlink(attempt)

    def _unlink(self, taken_back: Attempt) -> None:
        """A resend that never ran (taken back, or its worker died first): the crash it
        answered links to the attempt after it instead."""
        for link in self.timeline.links:
            if link.retry is taken_back:
                self.timeline.links.remove(link)
                self.pending_resend[taken_back.job] = link
                return

    def job_requeued(self, e: dict[str, Any]) -> None:
        reason, pid = e.get("reason"), e.get("worker")
        if reason == "unstarted" and pid is not None:
            # It was still in the dead worker's queue: that attempt never ran.
            attempt = self._last_on(e["job"], pid)
            if attempt is not None and attempt.outcome in ("running", "crashed", "stopped"):
                attempt.outcome = "taken_back"
                self.open_attempt.pop((e["job"], pid), None)
                self._unlink(attempt)
        elif reason == "result_lost" and pid is not None:
            attempt = self._last_on(e["job"], pid)
            if attempt is not None:
                attempt.outcome = "lost"

    def job_resent(self, e: dict[str, Any]) -> None:
        job, dead = e["job"], e["worker"]
        cut = self._last_on(job, dead)
        if cut is not None:
            self.charged.add(id(cut))
        self.pending_resend[job] = Link(dead, e["t"], cut, _NO_RETRY)

    def summary(self, e: dict[str, Any]) -> None:
        self.timeline.summary = e

    def _end(self, attempt: Attempt, t: float, outcome: str) -> None:
        attempt.end, attempt.outcome = t, outcome
        self.open_attempt.pop((attempt.job, attempt.pid), None)

    def _last_on(self, job: int, pid: int) -> Attempt | None:
        """The latest attempt of `job` on worker `pid`."""
        for attempt in reversed(self.timeline.attempts):
            if attempt.job == job and attempt.pid == pid:
                return attempt
        return None

    def finish(self) -> Timeline:
        """Attempts that never ran dropped, those still running ended with the run, and the
        workers in their slots."""
        timeline = self.timeline
        timeline.attempts = [a for a in timeline.attempts if a.outcome != "taken_back"]
        for attempt in timeline.attempts:
            if attempt.end is None:
                attempt.end = timeline.t1
            attempt.end = max(attempt.end, attempt.start)
            if attempt.outcome == "crashed" and id(attempt) not in self.charged:
                # Cut with its worker, yet neither resent nor failed for it: Dask ran it
                # again on its own, or it had completed and its result went with the worker.
                attempt.outcome = "lost"
        if self.one_thread:
            _end_at_next_start(timeline.attempts)
        _assign_slots(timeline)
        return timeline


_NO_RETRY = Attempt(0, 0, 0, 0.0)  # a pending resend's retry, until it is sent
_ON_EVENT: dict[str, Callable[[_TimelineBuilder, dict[str, Any]], None]] = {
    ev.DASK_STARTED: _TimelineBuilder.dask_started,
    ev.WORKER_STARTED: _TimelineBuilder.worker_started,
    ev.JOB_SENT: _TimelineBuilder.job_sent,
    ev.JOB_STARTED: _TimelineBuilder.job_started,
    ev.JOB_REQUEUED: _TimelineBuilder.job_requeued,
    ev.JOB_DONE: _TimelineBuilder.job_done,
    ev.JOB_FAILED: _TimelineBuilder.job_failed,
    ev.JOB_TAKEN_BACK: _TimelineBuilder.job_taken_back,
    ev.WORKER_EXITED: _TimelineBuilder.worker_exited,
    ev.JOB_RESENT: _TimelineBuilder.job_resent,
    ev.SUMMARY: _TimelineBuilder.summary,
}


def _end_at_next_start(attempts: list[Attempt]) -> None:
    """Dask workers of one thread: an attempt was over when the next one started on its
    worker. What main hears of a Dask attempt's end is when its result was gathered, often
    later, and a worker's starts come to main in batches."""
    by_worker: dict[int, list[Attempt]] = {}
    for attempt in attempts:
        by_worker.setdefault(attempt.pid, []).append(attempt)
    for ran in by_worker.values():
        ran.sort(key=lambda a: a.start)
        for before, after in zip(ran, ran[1:]):
            assert before.end is not None
            before.end = min(before.end, after.start)


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
    """Seconds from each crash to its job's next start."""
    return [link.retry.start - link.when for link in timeline.links
            if link.retry.start >= link.when]
