"""Standard input as a job source, read as it comes, for both engines."""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from taskpool.core.jobfile import LINE_MAX, LineError, parse_lines
from taskpool.model.jobs import COMMAND_KINDS, Job, job_digest
from taskpool.model.pools import PoolLayout
from taskpool.model.template import CommandTemplate
from taskpool.wire.records import LineRejected

STDIN_NAME = "<stdin>"


@dataclass(frozen=True)
class GeneratorInput:
    """Either the validated jobs of a file, or None to stream standard input. On --resume,
    `done` are the ids the journal has outcomes for (not run again) and `journal_digests`
    what each journaled job was (a streamed line that differs is rejected)."""

    jobs: list[Job] | None
    layout: PoolLayout  # how a streamed line is routed to its pool
    done: frozenset[int] = frozenset()
    journal_digests: dict[int, str] = field(default_factory=dict)
    # Why this run takes no sh, exec or call job, if it takes none: such a line is rejected
    # with this reason (a job file's, before anything runs: cli/run.py).
    refuse_commands: str | None = None
    template: CommandTemplate | None = None  # --cmd: each line is data for an sh job


def _no_op() -> None:
    pass


def stdin_lines(before_read: Callable[[], None] = _no_op) -> Iterable[str]:
    """Standard input's lines as they come: all the lines of one read, then `before_read()`
    and the next read, which blocks until more input comes. So a caller may hold back what
    it made of the lines read so far (a batch) until `before_read` tells it to let it go:
    a line is never kept waiting for input that has not come.

    Lines end as in a job file, which Python opens with universal newlines: at "\n", "\r\n"
    or a lone "\r", each given as "\n"; so a line has the same number on both inputs. A
    read that ends in "\r" ends its line at once, and a "\n" at the start of the next read
    is then the rest of that "\r\n", not an empty line. A byte-order mark at the very start
    is dropped, as a job file's is. A line longer than LINE_MAX is given, cut, as soon as it
    is that long (the parser refuses it), and the rest of it is read and dropped: memory
    stays bounded whatever comes."""
    lines = _LineSplitter()
    first = True
    while True:
        before_read()
        chunk = _read_stdin()
        if first and chunk.startswith(_BOM):
            chunk = chunk[len(_BOM):]
        first = False
        if not chunk:
            yield from lines.end()
            return
        yield from lines.split(chunk)


_BOM = b"\xef\xbb\xbf"


def _read_stdin() -> bytes:
    """One read of standard input. A producer may have made it non-blocking (the flag is
    shared with it, so it is not ours to change): then wait for it to be readable."""
    while True:
        try:
            return os.read(0, 65536)
        except BlockingIOError:
            select.select([0], [], [])


class _LineSplitter:
    """Reads' bytes to lines (see stdin_lines), holding at most LINE_MAX bytes of one."""

    def __init__(self) -> None:
        self.partial: list[bytes] = []  # a line's pieces so far: joined once it ends
        self.size = 0  # their bytes
        self.after_cr = False  # the last read ended in "\r"
        self.dropping = False  # the rest of a line too long, given already

    def split(self, chunk: bytes) -> Iterator[str]:
        if self.after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self.after_cr = chunk[-1:] == b"\r"
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            yield from self._hold(chunk)
            return
        *ended, rest = chunk.split(b"\n")
        if self.dropping:
            self.dropping = False  # the end of the line too long: given already
        else:
            yield _text(b"".join([*self.partial, ended[0]])) + "\n"
        self.partial, self.size = [], 0
        for line in ended[1:]:
            yield _text(line) + "\n"
        yield from self._hold(rest)

    def _hold(self, piece: bytes) -> Iterator[str]:
        if self.dropping or not piece:
            return
        self.partial.append(piece)
        self.size += len(piece)
        if self.size > LINE_MAX:
            yield _text(b"".join(self.partial))  # refused by the parser: too long
            self.partial, self.size, self.dropping = [], 0, True

    def end(self) -> Iterator[str]:
        if self.partial:
            yield _text(b"".join(self.partial))


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace")


def streamed_jobs(
    source: GeneratorInput, before_read: Callable[[], None] = _no_op
) -> Iterator[Job | LineRejected]:
    """Standard input's jobs, line by line as they come, or why a line is rejected: it does
    not parse, or (on --resume) its job differs from the one the journal has under its id.
    Both engines read standard input through this; `before_read` as in stdin_lines."""
    for item in parse_lines(stdin_lines(before_read), STDIN_NAME, source.layout,
                            template=source.template):
        if isinstance(item, LineError):
            yield LineRejected(f"{item.source}:{item.line}", item.reason, item.line)
            continue
        if source.refuse_commands is not None and item.kind in COMMAND_KINDS:
            yield LineRejected(f"{STDIN_NAME}:{item.line}", source.refuse_commands, item.line)
            continue
        journaled = source.journal_digests.get(item.job_id)
        if journaled is not None and journaled != job_digest(item):
            yield LineRejected(f"{STDIN_NAME}:{item.line}",
                               f"job {item.job_id} differs from the journal's; not run",
                               item.line)
            continue
        yield item
