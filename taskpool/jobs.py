"""The job model and the job file format.

A job file has one job a line::

    fib 30          # naive-recursive fib(N), the CPU-bound load
    sleep 0.5       # sleep for SECONDS, the waiting load
    alloc 200       # allocate and touch MB megabytes (to meet --max-memory)
    crash           # kill the worker with SIGSEGV (a poison job, for testing)
    sleep 10 timeout=2   # any job: its own timeout in seconds, overriding --timeout

Blank lines and ``#`` comments are ignored. Job ids are 1-based, in input order of the
accepted jobs. Parsing never raises for bad input: it returns a `LineError` that names the
line and the reason, so that the caller can list every bad line.
"""

from __future__ import annotations

import enum
import math
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Union

# Naive recursion is exponential: fib(30) takes ~0.2 s in CPython, fib(40) ~20 s, fib(45)
# ~4 minutes. 45 leaves room for long jobs while refusing typos that would run for days.
FIB_MAX = 45
# An hour; longer sleeps are almost certainly a unit mistake (ms for s).
SLEEP_MAX = 3600.0
ALLOC_MAX_MB = 65536


class JobKind(enum.IntEnum):
    FIB = 1
    SLEEP = 2
    ALLOC = 3
    CRASH = 4

    @property
    def label(self) -> str:
        return self.name.lower()


Arg = Union[int, float]


@dataclass(frozen=True)
class Job:
    job_id: int
    kind: JobKind
    arg: Arg
    timeout: float | None = None  # the job file's timeout=, if any
    line: int = field(default=0, compare=False)  # where it was read; not sent on the wire

    def describe(self) -> str:
        """The job as the log shows it: ``fib(30)``, ``sleep(0.5)``, ``crash()``."""
        return f"{self.kind.label}({'' if self.kind is JobKind.CRASH else self.arg})"


@dataclass(frozen=True)
class LineError:
    source: str  # the file name, or "<stdin>"
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


def _parse_options(words: list[str]) -> tuple[list[str], float | None] | str:
    """Split `key=value` options (only `timeout=`) from the arguments."""
    args: list[str] = []
    timeout: float | None = None
    for word in words:
        if "=" not in word:
            args.append(word)
            continue
        key, value = word.split("=", 1)
        if key.lower() != "timeout":
            return f"unknown option {key!r} (expected timeout=SECONDS)"
        try:
            timeout = float(value)
        except ValueError:
            return f"timeout {value!r} is not a number"
        if not math.isfinite(timeout) or timeout <= 0:
            return f"timeout {value} must be a finite number > 0"
    return args, timeout


def parse_job_text(text: str) -> tuple[JobKind, Arg, float | None] | str | None:
    """Parse one line's text: (kind, arg, timeout), None for a blank or comment line, or
    the reason it is bad."""
    body = text.split("#", 1)[0].strip()
    if not body:
        return None
    words = body.split()
    options = _parse_options(words[1:])
    if isinstance(options, str):
        return options
    args, timeout = options
    parsed = _parse_kind(words[0], args)
    if isinstance(parsed, str):
        return parsed
    return parsed[0], parsed[1], timeout


def _int_argument(kind: JobKind, args: list[str], maximum: int) -> tuple[JobKind, Arg] | str:
    name = kind.label
    if len(args) != 1:
        return f"{name} takes one argument, got {len(args)}"
    try:
        n = int(args[0])
    except ValueError:
        return f"{name} argument {args[0]!r} is not an integer"
    if not 0 <= n <= maximum:
        return f"{name} argument {n} is out of range 0..{maximum}"
    return kind, n


def _parse_kind(word: str, args: list[str]) -> tuple[JobKind, Arg] | str:
    name = word.lower()
    if name == "crash":
        if args:
            return f"crash takes no argument, got {len(args)}"
        return JobKind.CRASH, 0
    if name == "alloc":
        return _int_argument(JobKind.ALLOC, args, ALLOC_MAX_MB)
    if name == "fib":
        return _int_argument(JobKind.FIB, args, FIB_MAX)
    if name == "sleep":
        if len(args) != 1:
            return f"sleep takes one argument, got {len(args)}"
        try:
            seconds = float(args[0])
        except ValueError:
            return f"sleep argument {args[0]!r} is not a number"
        if not math.isfinite(seconds) or seconds < 0:
            return f"sleep argument {args[0]} must be a finite number >= 0"
        if seconds > SLEEP_MAX:
            return f"sleep argument {seconds:g} is over the limit of {SLEEP_MAX:g} seconds"
        return JobKind.SLEEP, seconds
    return (f"unknown job kind {word!r} "
            "(expected 'fib N', 'sleep SECONDS', 'alloc MB' or 'crash')")


def parse_lines(
    lines: Iterable[str], source: str, first_id: int = 1
) -> Iterator[Job | LineError]:
    """Yield a Job for each accepted line and a LineError for each bad one, in order.

    Ids count accepted jobs only, so a skipped bad line on stdin does not leave a hole."""
    next_id = first_id
    for number, text in enumerate(lines, start=1):
        parsed = parse_job_text(text)
        if parsed is None:
            continue
        if isinstance(parsed, str):
            yield LineError(source, number, parsed)
            continue
        kind, arg, timeout = parsed
        yield Job(next_id, kind, arg, timeout, line=number)
        next_id += 1


def read_job_file(path: str) -> tuple[list[Job], list[LineError]]:
    """Validate a whole job file. The caller runs nothing if any error comes back."""
    jobs: list[Job] = []
    errors: list[LineError] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for item in parse_lines(f, path):
            if isinstance(item, LineError):
                errors.append(item)
            else:
                jobs.append(item)
    return jobs, errors


def fib(n: int) -> int:
    """Naive recursion on purpose: it is the CPU-bound load, not a fast Fibonacci."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def execute(kind: JobKind, arg: Arg) -> Arg:
    """Run a job in the worker. A sleep job's result is the time it slept, as seed 000's
    workers report their duration back; an alloc job's is the megabytes it touched."""
    if kind is JobKind.FIB:
        return fib(int(arg))
    if kind is JobKind.SLEEP:
        time.sleep(float(arg))
        return float(arg)
    if kind is JobKind.ALLOC:
        block = bytearray(int(arg) * 1024 * 1024)  # zero-filled: every page is touched
        return len(block) // (1024 * 1024)
    os.kill(os.getpid(), signal.SIGSEGV)  # JobKind.CRASH: a poison job
    raise AssertionError("not reached: SIGSEGV's default action ends the process")
