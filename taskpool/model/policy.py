"""The supervision policy, as data (Erlang/OTP style): passed in, printed at start-up.

Strategy is one_for_one: a dead worker is replaced alone; the others go on.
"""

from __future__ import annotations

import math
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


class HaltWhen:
    """--halt's WHEN, in GNU parallel's words: `soon` takes no new job and lets the running
    ones finish; `now` also stops the running ones; `never` runs every job (the default)."""

    NEVER = "never"
    SOON = "soon"
    NOW = "now"


@dataclass(frozen=True)
class HaltPolicy:
    """--halt WHEN,fail=N or WHEN,fail=P%: stop the run once N jobs (or P% of the run's
    jobs) have failed. A failed job is one recorded `failed` (out of --max-attempts, or a
    command that failed past --retry-failed); a crash that is sent again is no failure."""

    when: str = HaltWhen.NEVER
    failures: int = 0  # fail=N; 0 with a percentage
    percent: float | None = None  # fail=P%: of the run's jobs (see threshold)

    @classmethod
    def parse(cls, text: str) -> HaltPolicy:
        """`never`, `soon,fail=N`, `now,fail=N`, `soon,fail=P%` or `now,fail=P%`;
        ValueError with the reason otherwise."""
        if text.strip() == HaltWhen.NEVER:
            return cls()
        when, _, why = text.strip().partition(",")
        if when not in (HaltWhen.SOON, HaltWhen.NOW) or not why.startswith("fail="):
            raise ValueError(f"{text!r} is not never, soon,fail=N, now,fail=N or "
                             "WHEN,fail=P%")
        value = why[len("fail="):]
        if value.endswith("%"):
            percent = _number(value[:-1], text)
            if not 0 < percent <= 100:
                raise ValueError(f"{text!r}: the percentage must be over 0 and at most 100")
            return cls(when, percent=percent)
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{text!r}: fail= takes a whole number of jobs >= 1, or P%")
        return cls(when, failures=int(value))

    @property
    def halts(self) -> bool:
        return self.when != HaltWhen.NEVER

    @property
    def kills_running(self) -> bool:
        return self.when == HaltWhen.NOW

    def threshold(self, jobs: int) -> int:
        """How many failed jobs halt a run of `jobs` jobs: N, or P% of them rounded up
        (at least 1)."""
        if self.percent is None:
            return self.failures
        return max(1, math.ceil(self.percent * jobs / 100 - 1e-9))

    def describe(self) -> str:
        if not self.halts:
            return HaltWhen.NEVER
        amount = f"{self.percent:g}%" if self.percent is not None else str(self.failures)
        return f"{self.when},fail={amount}"


def _number(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{whole!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{whole!r}: {text!r} is not a number")
    return value


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
    halt: HaltPolicy = HaltPolicy()  # --halt: stop the run after failures
    # A job that ran and failed (non-zero exit, a call that raised) runs again up to this
    # many times (--retry-failed; core/supervision.py: after_failure). 0: never.
    retry_failed: int = 0

    def describe(self) -> str:
        attempts = "unlimited" if self.max_attempts == 0 else str(self.max_attempts)
        extra = f", halt={self.halt.describe()}" if self.halt.halts else ""
        if self.retry_failed:
            extra += f", retry_failed={self.retry_failed}"
        return (
            f"one_for_one, max_attempts={attempts}, max_restarts={self.max_restarts} in "
            f"{self.restart_window:g}s, timeout={_seconds(self.timeout)}, "
            f"heartbeat={_seconds(self.heartbeat)}, grace={self.grace:g}s, "
            f"max_tasks_per_child={self.max_tasks_per_child or 'none'}, "
            f"max_memory={f'{self.max_memory_mb}MB' if self.max_memory_mb else 'none'}"
            f"{extra}"
        )
