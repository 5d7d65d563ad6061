"""The job model: what a job is, whatever reads it and whichever engine runs it.

A job has an id (1-based, in input order of the accepted jobs), a kind (`JobKind`) and its
argument, and may carry a timeout, a type and a priority. Its *type* is the number of the
typed pool that runs it (`model/pools.py`: `taskpool dispatch 1 3 1` has pools of types 1, 2
and 3); the code calls that number `pool` where it routes a job (`Job.pool`, `Pool.number`)
and the results file calls it `type`. Priorities are 0 (the default) to PRIORITY_MAX, higher
first. How a line of text becomes a Job is `core/jobfile.py`.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Union

# Naive recursion is exponential: fib(30) takes ~0.2 s in CPython, fib(40) ~20 s, fib(45)
# ~4 minutes. 45 leaves room for long jobs while refusing typos that would run for days.
FIB_MAX = 45
# An hour; longer sleeps are almost certainly a unit mistake (ms for s).
SLEEP_MAX = 3600.0
ALLOC_MAX_MB = 65536
# The highest POSIX message priority Linux allows (MQ_PRIO_MAX - 1).
PRIORITY_MAX = 32767


class JobKind(enum.IntEnum):
    FIB = 1
    SLEEP = 2
    ALLOC = 3
    CRASH = 4
    CALL = 5  # a batch of Python calls from taskpool.Executor; arg is how many (core/calls.py)

    @property
    def label(self) -> str:
        return _KIND_LABELS[self]  # looked up: Enum.name is a slow property, asked per job


_KIND_LABELS = {kind: kind.name.lower() for kind in JobKind}


Arg = Union[int, float]


@dataclass(frozen=True)
class Job:
    job_id: int
    kind: JobKind
    arg: Arg
    timeout: float | None = None  # the job file's timeout=, if any
    pool: int = 1  # the job type: it runs only on a worker of this pool
    priority: int = 0  # higher first, 0..PRIORITY_MAX
    line: int = field(default=0, compare=False)  # where it was read; not sent on the wire
    # A CALL job's calls, a protocol.CallBatch; opaque to the Dealer except to split a
    # batch in single calls.
    payload: bytes = field(default=b"", compare=False, repr=False)

    def describe(self) -> str:
        """The job as the log shows it: ``fib(30)``, ``sleep(0.5)``, ``crash()``."""
        return f"{self.kind.label}({'' if self.kind is JobKind.CRASH else self.arg})"

    def describe_typed(self) -> str:
        """As the dispatcher's log shows it: ``3.0s`` for a sleep (seed 000's jobs are
        durations), else as `describe`."""
        return f"{float(self.arg)!r}s" if self.kind is JobKind.SLEEP else self.describe()


def whole_number(text: str) -> int:
    """A decimal integer in ASCII digits, with an optional '-' (so that a range check can
    name it). Stricter than int(), which also takes '+5', '1_000' and non-ASCII digits: a
    typo in a job line should be an error, not a job."""
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(text)
    return int(text)


def job_digest(job: Job) -> str:
    """What a job is, independent of spacing and comments on its line (and of the form of
    the line: `2 3` and `sleep 3 type=2` are the same job)."""
    text = f"{job.kind.label} {job.arg!r} {job.timeout!r}"
    if job.pool != 1 or job.priority:  # so that schema-1 journals keep their digests
        text += f" {job.pool} {job.priority}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]

