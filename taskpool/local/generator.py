"""The TaskGenerator: a forked process that puts the jobs on the ready queue.

A job file was read and validated whole by main before anything started; the generator sends
that list, highest priority first (a stable sort: in file order within a priority).
Standard input is read here while the pool runs, as it comes: each good line is reported
to main (so that main can account for it even if the Dealer dies) and then queued; each bad
line is reported to main, which prints the error, and skipped. The lines of one read go
together (one write to main, then their jobs), and before the next read, which may block:
a line is never held for input still to come. The ready queue holds ten messages; the
Dealer reads it as fast as jobs come, into the backlogs of its pools.

A job of real work (sh, exec, call) has its text appended to the run's spool first
(posix/spool.py): its queue message carries only where the text is.

Jobs travel in JobBatches of one priority each, that priority the message's POSIX priority,
so that the Dealer receives the most urgent of what is queued first. EndOfJobs travels at
priority 0 and is sent last, so it is received last.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from typing import NoReturn

import posix_ipc

from taskpool.core.stdin import GeneratorInput, streamed_jobs
from taskpool.model.jobs import COMMAND_KINDS, Job
from taskpool.observe import log as tplog
from taskpool.observe.log import generator_log as log
from taskpool.posix import proc
from taskpool.posix.spool import Spool
from taskpool.wire.queue import EndOfJobs, JobBatch, jobs_per_message
from taskpool.wire.records import JobAccepted, LineRejected, encode_record


def spooled(job: Job, spool: Spool | None) -> Job:
    """The job as it travels: a command's text in the spool, its arg where it is there."""
    if job.kind not in COMMAND_KINDS:
        return job
    if spool is None:
        raise ValueError(f"job {job.job_id} is a command, and this run has no spool")
    return dataclasses.replace(job, arg=spool.store(job.payload), payload=b"")


def job_batches(jobs: list[Job], done: frozenset[int], size: int,
                spool: Spool | None = None) -> Iterator[JobBatch]:
    """The jobs not done, highest priority first (a stable sort: in file order within a
    priority), in batches of one priority each, `size` jobs at most; each command's
    text in the spool as its batch is made."""
    todo = sorted((job for job in jobs if job.job_id not in done), key=lambda job: -job.priority)
    todo = [spooled(job, spool) for job in todo] if spool is not None else todo
    for _, run in itertools.groupby(todo, key=lambda job: job.priority):
        while batch := tuple(itertools.islice(run, size)):
            yield JobBatch(batch)


def _stream(source: GeneratorInput, ready_queue: posix_ipc.MessageQueue, intake_fd: int,
            spool: Spool | None) -> int:
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
            proc.write_all(intake_fd, b"".join(records))
            records.clear()
        for batch in job_batches(jobs, source.done, size, spool):
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
    spool: Spool | None = None,
) -> NoReturn:
    code = 1
    try:
        proc.set_parent_death_signal(main_pid)
        proc.reset_signals_in_child()
        keep = {0, 1, 2, ready_queue.mqd} | tplog.descriptors()
        if spool is not None:
            keep.add(spool.fd)
        if intake_fd is not None:
            keep.add(intake_fd)
        proc.close_fds_except(keep)
        log.info("Starting (PID %d), reading %s", os.getpid(),
                 "standard input" if source.jobs is None else f"{len(source.jobs)} jobs")
        total = 0
        if source.jobs is not None:
            size = jobs_per_message(ready_queue.max_message_size)
            for batch in job_batches(source.jobs, source.done, size, spool):
                ready_queue.send(batch.encode(), priority=batch.jobs[0].priority)
                total += len(batch.jobs)
        else:
            assert intake_fd is not None
            total = _stream(source, ready_queue, intake_fd, spool)
        ready_queue.send(EndOfJobs(total).encode())
        log.info("All %d jobs queued", total)
        code = 0
    except BaseException:
        log.exception("TaskGenerator failed")
    finally:
        os._exit(code)
