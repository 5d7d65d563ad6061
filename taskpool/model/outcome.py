"""A job's outcome, and the engine's counts: what --results and the journal hold."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from taskpool.model.jobs import Arg, Job


class Status(str, enum.Enum):
    DONE = "done"
    FAILED = "failed"
    NOT_DONE = "not_done"


@dataclass(frozen=True)
class JobRecord:
    """One job's outcome: exactly the line written to --results."""

    job: int
    kind: str
    arg: Arg
    status: str
    result: Arg | None
    worker: int | None
    attempts: int
    reason: str | None = None
    type: int = 1  # the job's pool
    priority: int = 0

    @classmethod
    def of(cls, job: Job, status: Status, *, result: Arg | None = None,
           worker: int | None = None, attempts: int = 0,
           reason: str | None = None) -> JobRecord:
        return cls(job=job.job_id, kind=job.kind.label, arg=job.arg, status=status.value,
                   result=result, worker=worker, attempts=attempts, reason=reason,
                   type=job.pool, priority=job.priority)

    def to_json(self) -> dict[str, Any]:
        return record_fields({}, self.job, self.kind, self.arg, self.type, self.priority,
                              self.status, self.result, self.worker, self.attempts,
                              self.reason)


def record_fields(fields: dict[str, Any], job: int, kind: str, arg: Arg, pool: int,
                   priority: int, status: str, result: Arg | None, worker: int | None,
                   attempts: int, reason: str | None) -> dict[str, Any]:
    """A JobRecord's fields, in the results file's order, added to `fields`. Built by hand:
    dataclasses.asdict() deep-copies every field, and this runs once a job in the Dealer's
    recv thread and in main."""
    fields.update(job=job, kind=kind, arg=arg, type=pool, priority=priority, status=status,
                  result=result, worker=worker, attempts=attempts)
    if reason is not None:
        fields["reason"] = reason
    return fields


@dataclass(frozen=True)
class DealerStats:
    crashes: int
    resends: int
    stop_reason: str | None = None  # why the pool stopped before all jobs were done
    # Per pool: {"type": 1, "workers": 2, "crashes": 3, "restarts": 3}
    pools: list[dict[str, int]] = field(default_factory=list)
