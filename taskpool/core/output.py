"""Each job's output, delivered once: when its outcome is recorded.

A command (or call) writes its standard output and error to files of the run's private
directory, one pair an attempt (posix/spool.py: attempt_paths). Only the attempt that is
recorded is delivered; an attempt cut short by a crash, or past its timeout, is never
recorded, and the Dealer removes its files as it handles the death (local/recovery.py).

By default the recorded attempt's standard output is copied whole to ours and its standard
error to ours, one job after the other (main is the only writer of both: never two jobs'
output interleaved), at the moment its results line is written. With --output-dir DIR the
files are renamed to DIR/<job>.out and DIR/<job>.err instead (the run's directory is inside
DIR: a rename, never a copy), and the results line names them. Memory stays bounded: the
files are copied by sendfile(), a chunk at a time, never read whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os

from taskpool.model.outcome import JobRecord
from taskpool.observe.log import main_log as log
from taskpool.posix.proc import write_all
from taskpool.posix.spool import attempt_paths

_CHUNK = 1 << 20


class JobOutput:
    """Delivers the output of each recorded attempt. Owned by main (the recorder)."""

    def __init__(self, run_dir: str, output_dir: str | None = None, stdout_fd: int = 1,
                 stderr_fd: int = 2) -> None:
        self.run_dir = run_dir
        self.output_dir = output_dir
        self.targets = (stdout_fd, stderr_fd)
        self.lost: set[int] = set()  # our descriptors that could not be written: said once

    def deliver(self, record: JobRecord) -> JobRecord:
        """Deliver the output of the attempt `record` records, if it ran to its end; the
        record, with the paths of its files under --output-dir."""
        if record.duration is None or record.worker is None:
            return record  # not a job of real work that ran to its end: no output
        spooled = attempt_paths(self.run_dir, record.job, record.worker)
        if self.output_dir is not None:
            kept = [os.path.join(self.output_dir, f"{record.job}{suffix}")
                    for suffix in (".out", ".err")]
            for source, target in zip(spooled, kept):
                _keep(source, target)
            return dataclasses.replace(record, stdout=kept[0], stderr=kept[1])
        for source, fd in zip(spooled, self.targets):
            self._print(source, fd)
        return record

    def _print(self, path: str, target: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.unlink(path)
            if target not in self.lost:
                _copy(fd, target)
        except OSError as e:
            self.lost.add(target)
            name = "standard output" if target == 1 else "standard error"
            log.error("Cannot write the jobs' output to %s (%s): the output of the jobs "
                      "recorded from here on is not shown", name, e.strerror or e)
        finally:
            os.close(fd)


def _keep(source: str, target: str) -> None:
    """Rename an attempt's file to its place in --output-dir; an empty one if it has none
    (a call's worker that printed nothing still made its files)."""
    try:
        os.replace(source, target)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))


def _copy(source: int, target: int) -> None:
    """All of `source` to `target`, a chunk at a time."""
    offset = 0
    while True:
        try:
            sent = os.sendfile(target, source, offset, _CHUNK)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS):  # a target sendfile cannot write
                raise
            _copy_by_reads(source, target, offset)
            return
        if sent == 0:
            return
        offset += sent


def _copy_by_reads(source: int, target: int, offset: int) -> None:
    while True:
        chunk = os.pread(source, _CHUNK, offset)
        if not chunk:
            return
        write_all(target, chunk)
        offset += len(chunk)
