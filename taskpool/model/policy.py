"""The supervision policy, as data (Erlang/OTP style): passed in, printed at start-up.

Strategy is one_for_one: a dead worker is replaced alone; the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass

# Defaults, and why:
# - 3 attempts: a job that killed three different workers is far more likely to be the cause
#   than the victim (Celery and OTP users will recognise the order of magnitude).
# - 10 restarts in 5 s of workers that died without taking a job: a pool whose workers
#   cannot start dies within a second or two instead of forking forever; the bound does not
#   count deaths during jobs (those are bounded per job by max_attempts), so chaos with
#   hundreds of kills is not stopped. At least the pool size, so that losing every idle
#   worker once (an OOM killer sweep) is survived.
# - 10 s heartbeat: a worker beats every 1/3 of it while it runs a job; 10 s is long
#   against the beat (3.3 s) and short against a user's patience.
# - 10 s grace: long enough for typical short jobs to finish on Ctrl-C, short enough that a
#   second Ctrl-C is rarely needed.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_RESTARTS = 10
DEFAULT_RESTART_WINDOW = 5.0
DEFAULT_HEARTBEAT = 10.0
DEFAULT_GRACE = 10.0


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:g}s"


@dataclass(frozen=True)
class SupervisionPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # 0: unlimited
    max_restarts: int = DEFAULT_MAX_RESTARTS  # of workers that died without taking a job...
    restart_window: float = DEFAULT_RESTART_WINDOW  # ...within this many seconds
    timeout: float | None = None  # per job, unless the job file says timeout=
    heartbeat: float | None = DEFAULT_HEARTBEAT  # None: no heartbeat check
    grace: float = DEFAULT_GRACE  # on SIGTERM/SIGINT, for running jobs to finish
    max_tasks_per_child: int | None = None
    max_memory_mb: int | None = None
    # A job that ran and failed (non-zero exit, a call that raised) runs again up to this
    # many times (--retry-failed; core/supervision.py: after_failure). 0: never.
    retry_failed: int = 0

    def describe(self) -> str:
        attempts = "unlimited" if self.max_attempts == 0 else str(self.max_attempts)
        return (
            f"one_for_one, max_attempts={attempts}, max_restarts={self.max_restarts} in "
            f"{self.restart_window:g}s, timeout={_seconds(self.timeout)}, "
            f"heartbeat={_seconds(self.heartbeat)}, grace={self.grace:g}s, "
            f"max_tasks_per_child={self.max_tasks_per_child or 'none'}, "
            f"max_memory={f'{self.max_memory_mb}MB' if self.max_memory_mb else 'none'}"
        )
