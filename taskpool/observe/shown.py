"""What stderr shows of the log: the policy, as data.

    EVERYTHING  every line at the log's level: stderr is a pipe or a file (as it always
                was), or a terminal with -v or --demo (the demo's log is the point of it)
    WATCHED     a terminal's default: the progress line, and below it only what needs a
                person's eye (warnings and errors, crashes, failures, and how the run
                ends); the per-job lines go to --log FILE, or show with -v
    QUIET       -q, on a terminal or not: errors and the closing summary line

`--log FILE` always gets everything at the log's level: -q and the terminal's choice are
about stderr alone.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import Any

from taskpool.observe import events as ev


class Shown(enum.Enum):
    EVERYTHING = "everything"
    WATCHED = "watched"
    QUIET = "quiet"


# Beside warnings and errors, what a person watching a terminal is shown: a worker's death
# while the pool ran (`worker_exited` with crash true; not a retired or stopped one), a
# kill, a failed job, the pool giving up or losing a role, and how the run ends.
WATCHED_EVENTS = frozenset({
    ev.WORKER_KILLED, ev.JOB_FAILED, ev.GAVE_UP, ev.ROLE_LOST, ev.FORK_REFUSED,
    ev.INTERRUPTED, ev.INTERRUPTED_AGAIN, ev.STOPPING, ev.GRACE_OVER, ev.JOBS_NOT_DONE,
    ev.INPUT_UNREAD, ev.RUN_RESUMED, ev.TABLE_HEADER, ev.POOL_SUMMARY, ev.ATTEMPTS_HISTOGRAM,
    ev.SUMMARY,
})
QUIET_EVENTS = frozenset({ev.SUMMARY})


def is_shown(shown: Shown, level: int, fields: Mapping[str, Any]) -> bool:
    """Whether stderr shows a line of `level` (already at or above the log's level) that is
    the event `fields` (its "event" name, and its "crash" for a worker's death)."""
    if shown is Shown.EVERYTHING:
        return True
    name = fields.get("event")
    if shown is Shown.QUIET:
        return level >= logging.ERROR or name in QUIET_EVENTS
    if level >= logging.WARNING or name in WATCHED_EVENTS:
        return True
    return name == ev.WORKER_EXITED and bool(fields.get("crash"))


class ShownFilter(logging.Filter):
    """The policy on a text handler that writes to stderr (no live view: -q)."""

    def __init__(self, shown: Shown) -> None:
        super().__init__()
        self.shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        fields = {"event": getattr(record, "event", ev.LOG),
                  **getattr(record, "data", {})}
        return is_shown(self.shown, record.levelno, fields)
