"""A job of real work (sh, exec, call) in a Dask worker: run by core/commands.py, the same
code as a local worker's, and its outcome as the value of the job's task.

The value is the command's Ending as wire/commands.py encodes it (``{"d": 0.01, "x": 3}``),
or, for a command killed by a signal or past its timeout, ``{"d": ..., "signal": N}`` or
``{"d": ..., "timed_out": true}``: main judges those by the shared supervision rules, as a
crash of the attempt (dask/supervisor.py). The worker lives on either way.

Where the output goes:
- on taskpool's own cluster (same machine, same user) the command writes it straight into
  main's private run directory, as a local worker does (posix/spool.py: attempt_paths):
  nothing of it is held in memory, and main delivers the recorded attempt's files once
  (core/output.py);
- on a cluster given by --scheduler, main's directory is out of reach: the output is
  written to a temporary directory of the worker, and the value carries it inline, up to
  INLINE_MAX bytes of each stream (the rest is cut, and a line says so); main writes it
  into its run directory as it records the job, and delivers it the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from taskpool.core.commands import Killed, run_attempt
from taskpool.model.jobs import JobKind
from taskpool.posix.spool import attempt_paths

# Each stream's output a given cluster's worker returns inline, at most: what main holds
# for a job until it is recorded (it is recorded in the loop's turn that fetched it).
INLINE_MAX = 1 << 20

def run_real_work(kind: JobKind, job_id: int, text: str, timeout: float | None,
                  run_dir: str | None, spawned: Callable[[int], None]) -> dict[str, Any]:
    """One attempt of a job of real work; its value (see the module's docstring).
    `run_dir`: main's run directory, on our own cluster; None on a given cluster."""
    own_dir = run_dir if run_dir is not None else tempfile.mkdtemp(prefix="taskpool-job-")
    try:
        paths = attempt_paths(own_dir, job_id, os.getpid())
        value = _run(kind, text, timeout, paths, spawned)
        if run_dir is None and "d" in value and not _killed(value):
            value["out"], value["err"] = (_inline(path) for path in paths)
        return value
    finally:
        if run_dir is None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _killed(value: dict[str, Any]) -> bool:
    return "signal" in value or "timed_out" in value


def _run(kind: JobKind, text: str, timeout: float | None, paths: tuple[str, str],
         spawned: Callable[[int], None]) -> dict[str, Any]:
    ending = run_attempt(kind, text, timeout, paths, spawned)
    if isinstance(ending, Killed):
        # Never delivered: its files go now (main removes them too, on our cluster).
        for path in paths:
            os.unlink(path)
        return ({"d": 0.0, "timed_out": True} if ending.timed_out
                else {"d": 0.0, "signal": ending.signal})
    body: dict[str, Any] = json.loads(ending.encode())
    return body


def _inline(path: str) -> bytes:
    """A stream's output to return inline: at most INLINE_MAX bytes, and a line that says
    how much was cut."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(INLINE_MAX)
    if size > INLINE_MAX:
        data += (f"\n[taskpool: output cut at {INLINE_MAX} bytes of {size}: on a cluster "
                 f"given by --scheduler, a job's output returns inline]\n").encode()
    return data
