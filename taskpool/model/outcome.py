"""A job's outcome, and the engine's counts: what --results and the journal hold."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from taskpool.model.jobs import COMMAND_KINDS, Arg, Job


class Status(str, enum.Enum):
    DONE = "done"
    FAILED = "failed"
    NOT_DONE = "not_done"


@dataclass(frozen=True)
class JobRecord:
    """One job's outcome: exactly the line written to --results."""

    job: int
    kind: str
    arg: Arg | str  # a job of real work's: its command (or call) text
    status: str
    result: Any  # a fib's number, a sleep's seconds, a call's JSON value
    worker: int | None
    attempts: int
    reason: str | None = None
    type: int = 1  # the job's pool
    priority: int = 0
    # A job of real work that ran to its end: its command's exit status (sh, exec), how
    # long it ran, and with --output-dir where its output is kept.
    exit_status: int | None = None
    duration: float | None = None
    stdout: str | None = None
    stderr: str | None = None

    @classmethod
    def of(cls, job: Job, status: Status, *, result: Arg | None = None,
           worker: int | None = None, attempts: int = 0,
           reason: str | None = None) -> JobRecord:
        arg = job.text if job.kind in COMMAND_KINDS else job.arg
        return cls(job=job.job_id, kind=job.kind.label, arg=arg, status=status.value,
                   result=result, worker=worker, attempts=attempts, reason=reason,
                   type=job.pool, priority=job.priority)

    def to_json(self) -> dict[str, Any]:
        fields = record_fields({}, self.job, self.kind, self.arg, self.type, self.priority,
                               self.status, self.result, self.worker, self.attempts,
                               self.reason)
        return ran_fields(fields, self.exit_status, self.duration, self.stdout, self.stderr)


def record_fields(fields: dict[str, Any], job: int, kind: str, arg: Arg | str, pool: int,
                  priority: int, status: str, result: Any, worker: int | None,
                  attempts: int, reason: str | None) -> dict[str, Any]:
    """A JobRecord's fields, in the results file's order, added to `fields`. Built by hand:
    dataclasses.asdict() deep-copies every field, and this runs once a job in the Dealer's
    recv thread and in main."""
    fields.update(job=job, kind=kind, arg=arg, type=pool, priority=priority, status=status,
                  result=result, worker=worker, attempts=attempts)
    if reason is not None:
        fields["reason"] = reason
    return fields


def ran_fields(fields: dict[str, Any], exit_status: int | None, duration: float | None,
               stdout: str | None = None, stderr: str | None = None) -> dict[str, Any]:
    """A job of real work's fields after the others, each only where it has one: a demo
    job's line is as it was."""
    for name, value in (("exit_status", exit_status), ("duration", duration),
                        ("stdout", stdout), ("stderr", stderr)):
        if value is not None:
            fields[name] = value
    return fields


@dataclass(frozen=True)
class DealerStats:
    crashes: int
    resends: int
    stop_reason: str | None = None  # why the pool stopped before all jobs were done
    # Per pool: {"type": 1, "workers": 2, "crashes": 3, "restarts": 3}
    pools: list[dict[str, int]] = field(default_factory=list)
