"""The run's private directory, and the spool of command texts in it (the local engine).

A run keeps in one private directory (mode 0700, under $TMPDIR, or inside --output-dir so
that a kept file is renamed, never copied) what it must not hold in memory nor send over
a queue:

- the spool: every command's text, one file, unlinked as soon as it is made (the run's
  processes hold it open: it goes when the last of them ends, however it ends). The
  generator appends a job's text before it sends the job, whose queue message carries
  only where the text is (`SpoolRef`: offset and length in one 64-bit number, as the
  job's arg); a worker reads it there with one pread(). So a command of any length (up to
  a line's 1 MB) crosses queues of 128-byte messages, and the Dealer never holds it;
- each attempt's output: `<job>.<worker pid>.out` and `.err`, written by the command
  itself (core/commands.py). main delivers the recorded attempt's files once
  (core/output.py); the Dealer removes those of an attempt whose worker died; main removes
  the directory when the run ends. A run killed outright
  (SIGKILL of main) leaves it behind: the next run removes the directories of runs whose
  main is dead (`sweep_abandoned_run_dirs`), as it sweeps their queues.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from taskpool.posix.proc import read_exactly

RUN_DIR_PREFIX = "taskpool-run-"
_LENGTH_BITS = 24  # a text's length: up to 16 MB (a line is at most 1 MB)
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1


class Spool:
    """Command texts in an unlinked file shared by the run's processes. One writer (the
    generator, or main before it forks) appends; workers read. A write() to a file is seen
    by every later read of it, so a text written before its job is sent is there when the
    worker reads it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.end = 0  # the writer's: where the next text goes

    @classmethod
    def create(cls, directory: str) -> Spool:
        fd, path = tempfile.mkstemp(prefix="spool-", dir=directory)
        os.unlink(path)
        return cls(fd)

    def store(self, data: bytes) -> int:
        """Append `data`; the reference a job carries to it."""
        offset = self.end
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)
        self.end += len(data)
        return (offset << _LENGTH_BITS) | len(data)

    def load(self, ref: int) -> bytes:
        return read_exactly(self.fd, ref & _LENGTH_MASK, ref >> _LENGTH_BITS)

    def close(self) -> None:
        os.close(self.fd)


def make_run_dir(under: str | None = None) -> str:
    """A new private directory for this run, named with main's pid (for the sweep)."""
    return tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=under)


def remove_run_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def attempt_paths(run_dir: str, job_id: int, pid: int) -> tuple[str, str]:
    """Where the attempt of job `job_id` by worker `pid` spools its standard output and
    error. A worker runs a job's attempt once: a job goes to another worker after a crash
    (the dead one cannot take it again), and when the same worker runs it again (a failed
    job run again on request) that run's output replaces the last's, which is never
    delivered (core/commands.py: open_output)."""
    stem = os.path.join(run_dir, f"{job_id}.{pid}")
    return stem + ".out", stem + ".err"


def discard_attempt(run_dir: str, job_id: int, pid: int) -> None:
    """Remove the output of an attempt that will never be recorded (its worker died)."""
    for path in attempt_paths(run_dir, job_id, pid):
        with contextlib.suppress(OSError):
            os.unlink(path)


def sweep_abandoned_run_dirs(under: str | None = None) -> None:
    """Remove the run directories of our user's runs whose main is dead."""
    base = Path(under or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in base.glob(f"{RUN_DIR_PREFIX}*-*"):
            pid_text = entry.name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
            ours = entry.stat().st_uid == os.getuid()
            if pid_text.isdigit() and ours and not _alive(int(pid_text)):
                remove_run_dir(str(entry))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
