"""The TaskGenerator: a forked process that puts the jobs on the ready queue.

A job file was read and validated whole by main before anything started; the generator sends
that list, highest priority first (a stable sort: in file order within a priority).
Standard input is read here, line by line, while the pool runs: each good line is reported
to main (so that main can account for it even if the Dealer dies) and then queued; each bad
line is reported to main, which prints the error, and skipped. The ready queue holds ten
messages; the Dealer reads it as fast as jobs come, into the backlogs of its pools.

Each job travels at its own priority as the message's POSIX priority, so that the Dealer
receives the most urgent of what is queued first. EndOfJobs travels at priority 0 and is
sent last, so it is received last. A job file's jobs travel in JobBatches, each a run of
jobs of one priority; a line from standard input goes out alone as soon as it is read.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator
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
    JobMessage,
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


def stdin_lines() -> Iterable[str]:
    with os.fdopen(0, "rb", closefd=False) as stream:
        while True:
            line = stream.readline()
            if not line:
                return
            yield line.decode("utf-8", "replace")


def streamed_jobs(source: GeneratorInput) -> Iterator[Job | LineRejected]:
    """Standard input's jobs, line by line as they come, or why a line is rejected: it does
    not parse, or (on --resume) its job differs from the one the journal has under its id.
    Both engines read standard input through this."""
    for item in parse_lines(stdin_lines(), STDIN_NAME, source.layout):
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
            for item in streamed_jobs(source):
                if isinstance(item, LineRejected):
                    os.write(intake_fd, encode_record(item))
                    continue
                # Tell main first: a job main knows of is reported at the end, done or not.
                os.write(intake_fd, encode_record(JobAccepted(item)))
                if item.job_id not in source.done:
                    ready_queue.send(JobMessage(item, attempt=1).encode(),
                                     priority=item.priority)
                    total += 1
        ready_queue.send(EndOfJobs(total).encode())
        log.info("All %d jobs queued", total)
        code = 0
    except BaseException:
        log.exception("TaskGenerator failed")
    finally:
        os._exit(code)
