"""The job model and the job file format.

A job file has one job a line, in either of two forms. The core's::

    fib 30          # naive-recursive fib(N), the CPU-bound load
    sleep 0.5       # sleep for SECONDS, the waiting load
    alloc 200       # allocate and touch MB megabytes (to meet --max-memory)
    crash           # kill the worker with SIGSEGV (a poison job, for testing)
    sleep 10 timeout=2   # any job: its own timeout in seconds, overriding --timeout
    fib 30 type=2 priority=5   # any job: its pool (job type) and priority

and seed 000's typed form, a sleep of DURATION seconds on a worker of type TYPE::

    2 3.0           # <job_type> <duration> [priority]
    2 3.0 9         # priority 9: started before queued jobs of lower priority

A line whose first word is a number is a typed line. Which pool a core line goes to is
`PoolLayout.pool_for_kind` (see pools.py). Priorities are 0 (the default) to PRIORITY_MAX,
higher first; they travel as the POSIX queue's own message priority.

Blank lines and ``#`` comments are ignored. Job ids are 1-based, in input order of the
accepted jobs. Parsing never raises for bad input: it returns a `LineError` that names the
line and the reason, so that the caller can list every bad line.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    pass

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
    CALL = 5  # a batch of Python calls from taskpool.Executor; arg is how many (calls.py)

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

