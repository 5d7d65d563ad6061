"""The TaskGenerator: a forked process that puts the jobs on the ready queue.

A job file was read and validated whole by main before anything started; the generator sends
that list, highest priority first (a stable sort: in file order within a priority).
Standard input is read here while the pool runs, as it comes: each good line is reported
to main (so that main can account for it even if the Dealer dies) and then queued; each bad
line is reported to main, which prints the error, and skipped. The lines of one read go
together (one write to main, then their jobs), and before the next read, which may block:
a line is never held for input still to come. The ready queue holds ten messages; the
Dealer reads it as fast as jobs come, into the backlogs of its pools.

Jobs travel in JobBatches of one priority each, that priority the message's POSIX priority,
so that the Dealer receives the most urgent of what is queued first. EndOfJobs travels at
priority 0 and is sent last, so it is received last.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import posix_ipc

from taskpool import ipc
from taskpool import log as tplog
from taskpool.jobs import Job, LineError, parse_lines
from taskpool.journal import job_digest
from taskpool.pools import PoolLayout
from taskpool.protocol import (
    EndOfJobs,
    JobAccepted,
    JobBatch,
    LineRejected,
    encode_record,
    jobs_per_message,
)

log = logging.getLogger("taskpool.generator")

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
    is then the rest of that "\r\n", not an empty line."""
    partial: list[bytes] = []  # a line's pieces so far: joined once it ends, not per read
    after_cr = False  # the last read ended in "\r"
    while True:
        before_read()
        chunk = os.read(0, 65536)
        if not chunk:
            if partial:
                yield b"".join(partial).decode("utf-8", "replace")
            return
        if after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        after_cr = chunk[-1:] == b"\r"
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            if chunk:
                partial.append(chunk)
            continue
        *lines, rest = chunk.split(b"\n")
        lines[0] = b"".join([*partial, lines[0]])
        partial = [rest] if rest else []
        for line in lines:
            yield line.decode("utf-8", "replace") + "\n"


def streamed_jobs(
    source: GeneratorInput, before_read: Callable[[], None] = _no_op
) -> Iterator[Job | LineRejected]:
    """Standard input's jobs, line by line as they come, or why a line is rejected: it does
    not parse, or (on --resume) its job differs from the one the journal has under its id.
    Both engines read standard input through this; `before_read` as in stdin_lines."""
    for item in parse_lines(stdin_lines(before_read), STDIN_NAME, source.layout):
        if isinstance(item, LineError):
            yield LineRejected(f"{item.source}:{item.line}", item.reason)
            continue
        journaled = source.journal_digests.get(item.job_id)
        if journaled is not None and journaled != job_digest(item):
            yield LineRejected(f"{STDIN_NAME}:{item.line}",
                               f"job {item.job_id} differs from the journal's; not run")
            continue
        yield item


def job_batches(jobs: list[Job], done: frozenset[int], size: int) -> Iterator[JobBatch]:
    """The jobs not done, highest priority first (a stable sort: in file order within a
    priority), in batches of one priority each, `size` jobs at most."""
    todo = sorted((job for job in jobs if job.job_id not in done), key=lambda job: -job.priority)
    for _, run in itertools.groupby(todo, key=lambda job: job.priority):
        while batch := tuple(itertools.islice(run, size)):
            yield JobBatch(batch)


def _stream(source: GeneratorInput, ready_queue: posix_ipc.MessageQueue, intake_fd: int) -> int:
    """Send standard input's jobs as they come, the lines of one read together: their
    records to main in one write, then the jobs in JobBatches. Returns how many were sent."""
    size = jobs_per_message(ready_queue.max_message_size)
    records: list[bytes] = []  # for main: each line's JobAccepted or LineRejected, in order
    jobs: list[Job] = []
    sent = 0

    def send() -> None:
        nonlocal sent
        # Tell main first: a job main knows of is reported at the end, done or not.
        if records:
            ipc.write_all(intake_fd, b"".join(records))
            records.clear()
        for batch in job_batches(jobs, source.done, size):
            ready_queue.send(batch.encode(), priority=batch.jobs[0].priority)
            sent += len(batch.jobs)
        jobs.clear()

    for item in streamed_jobs(source, before_read=send):
        if isinstance(item, LineRejected):
            records.append(encode_record(item))
            continue
        records.append(encode_record(JobAccepted(item)))
        jobs.append(item)
        if len(jobs) == size:
            send()
    send()
    return sent


def run_generator(
    source: GeneratorInput,
    ready_queue: posix_ipc.MessageQueue,
    intake_fd: int | None,
    main_pid: int,
) -> NoReturn:
    code = 1
    try:
        ipc.set_parent_death_signal(main_pid)
        ipc.reset_signals_in_child()
        keep = {0, 1, 2, ready_queue.mqd} | tplog.descriptors()
        if intake_fd is not None:
            keep.add(intake_fd)
        ipc.close_fds_except(keep)
        log.info("Starting (PID %d), reading %s", os.getpid(),
                 "standard input" if source.jobs is None else f"{len(source.jobs)} jobs")
        total = 0
        if source.jobs is not None:
            size = jobs_per_message(ready_queue.max_message_size)
            for batch in job_batches(source.jobs, source.done, size):
                ready_queue.send(batch.encode(), priority=batch.jobs[0].priority)
                total += len(batch.jobs)
        else:
            assert intake_fd is not None
            total = _stream(source, ready_queue, intake_fd)
        ready_queue.send(EndOfJobs(total).encode())
        log.info("All %d jobs queued", total)
        code = 0
    except BaseException:
        log.exception("TaskGenerator failed")
    finally:
        os._exit(code)
