"""The job file format: each line of text to a Job, or the reason it is bad.

A job file has one job a line, in either of two forms. The core's, real work::

    sh gzip -9 data/part-001.csv     # a shell command: the rest of the line, /bin/sh -c
    exec convert in.png out.jpg      # a program, its words split as a shell would, no shell
    call mypkg.tasks:resize "in.png" 640   # a Python function, JSON arguments
    timeout=60 type=2 priority=5 sh make -C src   # options first, then the kind

and the demonstration loads::

    fib 30          # naive-recursive fib(N), the CPU-bound load
    sleep 0.5       # sleep for SECONDS, the waiting load
    alloc 200       # allocate and touch MB megabytes (to meet --max-memory)
    crash           # kill the worker with SIGSEGV (a poison job, for testing)
    sleep 10 timeout=2   # any job: its own timeout in seconds, overriding --timeout
    fib 30 type=2 priority=5   # a demo job's options may also follow it
    timeout=2 sleep 10   # ...or come first, as for every kind

Options (`timeout=`, `type=`, `priority=`) come before the kind; for sh, exec and call
everything after the kind is the command, `sh echo type=2` included, and a `#` in it is
the command's (the shell's comment, exec's and call's too; docs/JOBS.md).

and seed 000's typed form, a sleep of DURATION seconds on a worker of type TYPE::

    2 3.0           # <job_type> <duration> [priority]
    2 3.0 9         # priority 9: started before queued jobs of lower priority

A line whose first word is a number is a typed line. Which pool a core line goes to is
`PoolLayout.pool_for_kind` (see model/pools.py). Priorities are 0 (the default) to PRIORITY_MAX,
higher first; they travel as the POSIX queue's own message priority.

With `--cmd TEMPLATE` every line is data instead, for one sh job (model/template.py).

Blank lines and ``#`` comments are ignored. Job ids are 1-based, in input order of the
accepted jobs. Parsing never raises for bad input: it returns a `LineError` that names the
line and the reason, so that the caller can list every bad line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from taskpool.model.commands import CommandError, call_spec, exec_argv, shell_text
from taskpool.model.jobs import (
    ALLOC_MAX_MB,
    FIB_MAX,
    PRIORITY_MAX,
    SLEEP_MAX,
    Arg,
    Job,
    JobKind,
    whole_number,
)
from taskpool.model.template import CommandTemplate, TemplateError

if TYPE_CHECKING:
    from taskpool.model.pools import PoolLayout


# A job line's length at most, in bytes, its end included: a longer one is refused, so
# that memory stays bounded whatever the input (an endless line from /dev/zero).
LINE_MAX = 1 << 20


@dataclass(frozen=True)
class LineError:
    source: str  # the file name, or "<stdin>"
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class ParsedLine:
    kind: JobKind
    arg: Arg
    timeout: float | None
    pool: int
    priority: int
    text: str = ""  # a command's (sh, exec, call): the rest of the line after its kind


@dataclass
class _Options:
    timeout: float | None = None
    pool: int | None = None
    priority: int | None = None


def _parse_options(words: list[str]) -> tuple[list[str], _Options] | str:
    """Split `key=value` options (timeout=, type=, priority=) from the arguments."""
    args: list[str] = []
    options = _Options()
    seen: set[str] = set()
    for word in words:
        if "=" not in word:
            args.append(word)
            continue
        key, value = word.split("=", 1)
        key = key.lower()
        if key in seen:
            return f"option {key}= given twice"
        seen.add(key)
        if key == "timeout":
            try:
                timeout = decimal(value)
            except ValueError:
                return f"timeout {value!r} is not a number"
            if not math.isfinite(timeout) or timeout <= 0:
                return f"timeout {value} must be a finite number > 0"
            options.timeout = timeout
        elif key == "type":
            try:
                options.pool = whole_number(value)
            except ValueError:
                return f"type {value!r} is not a whole number"
        elif key == "priority":
            priority = _priority(value)
            if isinstance(priority, str):
                return priority
            options.priority = priority
        else:
            return (f"unknown option {key!r} "
                    "(expected timeout=SECONDS, type=T or priority=P)")
    return args, options


def _priority(text: str) -> int | str:
    try:
        priority = whole_number(text)
    except ValueError:
        return f"priority {text!r} is not a whole number"
    if not 0 <= priority <= PRIORITY_MAX:
        return f"priority {priority} is out of range 0..{PRIORITY_MAX} (higher runs first)"
    return priority


# A number as README documents it: ASCII digits, an optional '-', a decimal point and an
# exponent. float() alone also takes '+1', '1_0' (ten) and non-ASCII digits ('٣'): a typo
# in a job line must be an error, not a job. inf and nan pass, to be refused by name.
_DECIMAL = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-?(inf|infinity|nan)",
                      re.ASCII | re.IGNORECASE)


def decimal(text: str) -> float:
    """`text` as a number of the job file's form; ValueError if it is not one."""
    if _DECIMAL.fullmatch(text) is None:
        raise ValueError(text)
    return float(text)


def _is_number(word: str) -> bool:
    """Whether a line reads as a typed one (its first word a number, however written: its
    fields are then checked strictly, and '+2 1' is told its type is no whole number)."""
    try:
        float(word)
    except ValueError:
        return False
    return True


def too_long(text: str) -> bool:
    """Whether a line is over LINE_MAX bytes (cheap for the usual short line)."""
    return len(text) > LINE_MAX // 4 and len(text.encode("utf-8", "replace")) > LINE_MAX


# A line's leading options and the word after them, its kind: `timeout=5 type=2 sh ...`.
_LEADING = re.compile(r"\s*((?:[A-Za-z_]+=\S*\s+)*)(\S+)")
_COMMAND_WORDS = {"sh": JobKind.SH, "exec": JobKind.EXEC, "call": JobKind.FUNCTION}


def parse_job_text(text: str, layout: PoolLayout) -> ParsedLine | str | None:
    """Parse one line's text; None for a blank or comment line, or the reason it is bad."""
    if too_long(text):
        return f"the line is longer than {LINE_MAX} bytes"
    leading = _LEADING.match(text)
    if leading is not None and leading.group(2).lower() in _COMMAND_WORDS:
        kind = _COMMAND_WORDS[leading.group(2).lower()]
        return _parse_command(kind, leading.group(1).split(), text[leading.end():], layout)
    body = text.split("#", 1)[0].strip()
    if not body:
        return None
    words = body.split()
    # The kind is the first word that is no option: options may come before it or after.
    at = next((i for i, word in enumerate(words) if "=" not in word), 0)
    if _is_number(words[at]):
        return _parse_typed(words, layout)
    options = _parse_options(words[:at] + words[at + 1:])
    if isinstance(options, str):
        return options
    args, opts = options
    parsed = _parse_kind(words[at], args)
    if isinstance(parsed, str):
        return parsed
    kind, arg = parsed
    pool = _pool_of(kind, opts, layout)
    if isinstance(pool, str):
        return pool
    return ParsedLine(kind, arg, opts.timeout, pool, opts.priority or 0)


def parse_templated(text: str, template: CommandTemplate, job_id: int,
                    layout: PoolLayout) -> ParsedLine | str | None:
    """One input line of --cmd: the sh job it makes (job `job_id`), None for a blank
    line, or why it makes none. The whole line is data: no options, no comments."""
    if too_long(text):
        return f"the line is longer than {LINE_MAX} bytes"
    line = text.rstrip("\n")
    if not line.strip():
        return None
    try:
        command = template.fill(line, job_id).strip()
        check_command(JobKind.SH, command)
    except (TemplateError, CommandError) as e:
        return str(e)
    pool = layout.pool_for_kind(JobKind.SH)
    if isinstance(pool, str):
        return pool
    return ParsedLine(JobKind.SH, 0, None, pool, 0, command)


def _pool_of(kind: JobKind, opts: _Options, layout: PoolLayout) -> int | str:
    """The job's pool: its type=, or the pool for its kind; or why it has none."""
    pool = opts.pool if opts.pool is not None else layout.pool_for_kind(kind)
    if isinstance(pool, str):
        return pool
    return layout.check_type(pool) or pool


def check_command(kind: JobKind, command: str) -> None:
    """Raise CommandError (its text the reason) if `command` cannot run as a `kind` job."""
    if kind is JobKind.SH:
        shell_text(command)
    elif kind is JobKind.EXEC:
        exec_argv(command)
    elif kind is JobKind.FUNCTION:
        call_spec(command)
    else:
        raise CommandError(f"{kind.label} is not a kind of command")


def command_job(job_id: int, command: str, kind: JobKind = JobKind.SH, *,
                timeout: float | None = None, pool: int = 1, priority: int = 0,
                line: int = 0) -> Job:
    """A Job of real work (sh by default) from its command text, checked as a job file's
    line is; CommandError (its text the reason a line reports) if it cannot run. Its id,
    pool and line are the caller's to give (ids 1-based, in input order)."""
    command = command.strip()
    check_command(kind, command)
    return Job(job_id, kind, 0, timeout, pool, priority, line=line, payload=command.encode())


def _parse_command(kind: JobKind, option_words: list[str], rest: str,
                   layout: PoolLayout) -> ParsedLine | str:
    """A line of real work: its leading options, and the command after its kind, checked
    as the worker will read it."""
    options = _parse_options(option_words)
    if isinstance(options, str):
        return options
    _, opts = options
    command = rest.strip()
    try:
        check_command(kind, command)
    except CommandError as e:
        return str(e)
    pool = _pool_of(kind, opts, layout)
    if isinstance(pool, str):
        return pool
    return ParsedLine(kind, 0, opts.timeout, pool, opts.priority or 0, command)


def _parse_typed(words: list[str], layout: PoolLayout) -> ParsedLine | str:
    """Seed 000's `<job_type> <duration> [priority]`, with the core's options too."""
    options = _parse_options(words)
    if isinstance(options, str):
        return options
    fields, opts = options
    if opts.pool is not None:
        return "a typed line gives its type first: type= is for 'fib N' and 'sleep S' lines"
    if len(fields) not in (2, 3):
        return (f"expected '<job_type> <duration> [priority]', got {len(fields)} field"
                f"{'' if len(fields) == 1 else 's'}")
    try:
        pool = whole_number(fields[0])
    except ValueError:
        return f"job type {fields[0]!r} is not a whole number"
    why_not = layout.check_type(pool)
    if why_not is not None:
        return why_not
    duration = _duration(fields[1], "duration")
    if isinstance(duration, str):
        return duration
    priority = opts.priority or 0
    if len(fields) == 3:
        if opts.priority is not None:
            return "priority given twice (third field and priority=)"
        parsed_priority = _priority(fields[2])
        if isinstance(parsed_priority, str):
            return parsed_priority
        priority = parsed_priority
    return ParsedLine(JobKind.SLEEP, duration, opts.timeout, pool, priority)


def _duration(text: str, name: str) -> float | str:
    try:
        seconds = decimal(text)
    except ValueError:
        return f"{name} {text!r} is not a number"
    if not math.isfinite(seconds) or seconds < 0:
        return f"{name} {text} must be a finite number >= 0"
    if seconds > SLEEP_MAX:
        return f"{name} {seconds:g} is over the limit of {SLEEP_MAX:g} seconds"
    return seconds


def _int_argument(kind: JobKind, args: list[str], maximum: int) -> tuple[JobKind, Arg] | str:
    name = kind.label
    if len(args) != 1:
        return f"{name} takes one argument, got {len(args)}"
    try:
        n = whole_number(args[0])
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
        seconds = _duration(args[0], "sleep argument")
        if isinstance(seconds, str):
            return seconds
        return JobKind.SLEEP, seconds
    return (f"unknown job kind {word!r} (expected 'sh COMMAND', 'exec PROGRAM [ARGS]', "
            "'call module:function [ARGS]', 'fib N', 'sleep SECONDS', 'alloc MB', 'crash' or "
            "'<job_type> <duration> [priority]')")


def parse_lines(
    lines: Iterable[str], source: str, layout: PoolLayout, first_id: int = 1,
    template: CommandTemplate | None = None,
) -> Iterator[Job | LineError]:
    """Yield a Job for each accepted line and a LineError for each bad one, in order. With
    a `template` (--cmd), each line is data for an sh job (model/template.py).

    Ids count accepted jobs only, so a skipped bad line on stdin does not leave a hole."""
    next_id = first_id
    for number, text in enumerate(lines, start=1):
        if template is None:
            parsed = parse_job_text(text, layout)
        else:
            parsed = parse_templated(text, template, next_id, layout)
        if parsed is None:
            continue
        if isinstance(parsed, str):
            yield LineError(source, number, parsed)
            continue
        yield Job(next_id, parsed.kind, parsed.arg, parsed.timeout, parsed.pool,
                  parsed.priority, line=number, payload=parsed.text.encode())
        next_id += 1


def read_job_file(path: str, layout: PoolLayout, template: CommandTemplate | None = None,
                  ) -> tuple[list[Job], list[LineError]]:
    """Validate a whole job file (with --cmd's `template`: its lines are data). The caller
    runs nothing if any error comes back."""
    jobs: list[Job] = []
    errors: list[LineError] = []
    # utf-8-sig: a byte-order mark (some editors write one) is no part of line 1.
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for item in parse_lines(_bounded_lines(f), path, layout, template=template):
            if isinstance(item, LineError):
                errors.append(item)
            else:
                jobs.append(item)
    return jobs, errors


def _bounded_lines(file: TextIO) -> Iterator[str]:
    """A file's lines, none held longer than LINE_MAX characters: a line that is longer
    (`--jobs /dev/zero`) is given cut there, to be refused, and the reading ends with it."""
    while True:
        line = file.readline(LINE_MAX + 1)
        if not line:
            return
        yield line
        if len(line) > LINE_MAX:
            return
