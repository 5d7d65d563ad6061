"""Every exit status of ours, in one table: the command's, and each process role's.

The command's (`taskpool run` and the others), which README documents::

    0    every job done
    1    a job not done or failed, or the run cut short (a role of the pool lost)
    2    bad input or a bad command line (nothing ran), or a line rejected on stdin
    130  interrupted by SIGINT (128 + the signal); 143 for SIGTERM

The pool's own processes, read by their parent and never shown to a user as the run's::

    Dealer   0 all jobs done, 3 stopped early (terminated, or the pool could not go on),
             1 main lost (it killed and reaped its workers), 70 a thread of it failed (a bug)
    worker   75 retired (--max-tasks-per-child), 76 over --max-memory, 77 the Executor's
             initializer raised, 78 its command ran past its timeout (and was ended),
             160 + N its command was killed by signal N, 70 an unexpected error (a bug:
             the traceback is logged)
"""

from __future__ import annotations

# --- the command --------------------------------------------------------------------------
EXIT_OK = 0
EXIT_JOBS_NOT_DONE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT; an interrupted run exits 128 + its signal

# --- the Dealer process ---------------------------------------------------------------------
EXIT_ALL_DONE = 0
EXIT_MAIN_LOST = 1
EXIT_STOPPED_EARLY = 3  # terminated, or the pool could not go on
EXIT_THREAD_FAILED = 70  # a bug: the traceback is in the log

# --- a worker process -----------------------------------------------------------------------
EXIT_WORKER_FAILED = 70  # a bug in the worker: the traceback is in the log
EXIT_RETIRED = 75  # --max-tasks-per-child reached: replace me, nothing went wrong
EXIT_MEMORY_LIMIT = 76  # a job ran out of --max-memory: counts as a failed attempt
EXIT_INITIALIZER_FAILED = 77  # the Executor's initializer raised: this worker cannot work
EXIT_COMMAND_TIMED_OUT = 78  # its command ran past its timeout: a crash of the attempt
EXIT_COMMAND_KILLED_BASE = 160  # + N: its command was killed by signal N: a crash too


def command_signal(code: int | None) -> int | None:
    """The signal that killed a worker's command, from the worker's exit code (160 + N);
    None for any other code."""
    if code is not None and EXIT_COMMAND_KILLED_BASE < code < EXIT_COMMAND_KILLED_BASE + 65:
        return code - EXIT_COMMAND_KILLED_BASE
    return None
