"""The job model: what a job is, whatever reads it and whichever engine runs it.

A job has an id (1-based, in input order of the accepted jobs), a kind (`JobKind`) and its
argument, and may carry a timeout, a type and a priority. A job of real work (`sh`, `exec`,
`call`: COMMAND_KINDS) carries its text, what follows the kind on its line, as its payload
(UTF-8); its arg is 0, but on the local engine's queues, where it is where that text waits
in the run's spool (wire/spool.py). Its *type* is the number of the
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
    SH = 6  # a shell command: /bin/sh -c TEXT
    EXEC = 7  # a program without a shell: TEXT split as the shell splits words
    FUNCTION = 8  # a job file's `call module:function ARGS...`: labelled "call"

    @property
    def label(self) -> str:
        return _KIND_LABELS[self]  # looked up: Enum.name is a slow property, asked per job


# The labels the log, the events, the results file and the journal show. A job file's
# `call` is the user's word, so FUNCTION has it; the Executor's batches of calls, which no
# job file names, are "calls" (a batch: its arg is how many).
_KIND_LABELS = {kind: kind.name.lower() for kind in JobKind}
_KIND_LABELS.update({JobKind.CALL: "calls", JobKind.FUNCTION: "call"})
_KINDS_BY_LABEL = {label: kind for kind, label in _KIND_LABELS.items()}

# The kinds of real work: their text is their payload, what follows the kind on the line.
COMMAND_KINDS = frozenset({JobKind.SH, JobKind.EXEC, JobKind.FUNCTION})
# Of those, the ones that run as a process of their own (a command), not in the worker.
PROCESS_KINDS = frozenset({JobKind.SH, JobKind.EXEC})


def kind_of_label(label: str) -> JobKind:
    """The kind whose label is `label` (``"call"``: FUNCTION); KeyError if none is."""
    return _KINDS_BY_LABEL[label]


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

    @property
    def text(self) -> str:
        """A job of real work's text: the command, or the call's ``module:function ARGS``."""
        return self.payload.decode("utf-8", "replace")

    def describe(self) -> str:
        """The job as the log shows it: ``fib(30)``, ``sleep(0.5)``, ``crash()``; a
        command's first 40 characters, when this process has its text: ``sh(gzip x)``."""
        if self.kind in COMMAND_KINDS:
            if not self.payload:  # the Dealer's copy: the text waits in the run's spool
                return self.kind.label
            text = self.text
            return f"{self.kind.label}({text[:40]}{'...' if len(text) > 40 else ''})"
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
    if job.kind in COMMAND_KINDS:  # the command's text: a changed command is another job
        text += f" {job.text!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]

