"""Crash plans: which (job, attempt) a worker crashes in, and at which step.

`--crash-rate P --seed S` makes the demo's crashes (seed 004's "simulated node failure"), and
`--inject-fault JOB:STEP[:ATTEMPT]` is the test hook that kills a worker at an exact point of
the worker protocol. Both are decided here, as pure functions of the job and the attempt, so
that every engine's workers crash the same jobs at the same steps.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field


class Step(str, enum.Enum):
    """Points of the worker protocol where a crash can be made to happen."""

    BEFORE_ACK = "before_ack"  # job received from the queue, Ack (if any) not sent
    DURING_COMPUTE = "during_compute"  # Ack (if any) sent, result not computed
    BEFORE_RESULT = "before_result"  # result computed, not sent
    AFTER_RESULT = "after_result"  # result sent, next job not taken (test hook only)
    AT_START = "at_start"  # a worker that has just started (test hook only, any job)
    HANG = "hang"  # instead of computing: stop beating and block forever (test hook only)


SIMULATED_STEPS = (Step.BEFORE_ACK, Step.DURING_COMPUTE, Step.BEFORE_RESULT)


@dataclass(frozen=True)
class InjectedFault:
    """Test hook: SIGKILL the worker that reaches `step` of `job_id` on `attempt`."""

    job_id: int
    step: Step
    attempt: int = 1

    @classmethod
    def parse(cls, text: str) -> InjectedFault:
        """JOB:STEP[:ATTEMPT], e.g. ``3:before_ack`` or ``3:before_result:2``; or
        ``at_start``: every worker dies as it starts (a crash loop)."""
        if text == Step.AT_START.value:
            return cls(0, Step.AT_START)
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"expected JOB:STEP[:ATTEMPT], got {text!r}")
        job, step, attempt = parts[0], parts[1], parts[2] if len(parts) == 3 else "1"
        if step not in _STEPS_BY_NAME:
            raise ValueError(f"{step!r} is not a step: give one of "
                             f"{', '.join(STEP_NAMES)} (or '{Step.AT_START.value}' alone)")
        return cls(_positive(job, "job"), _STEPS_BY_NAME[step], _positive(attempt, "attempt"))


# The steps JOB:STEP takes (at_start stands alone: it names no job).
STEP_NAMES = tuple(step.value for step in Step if step is not Step.AT_START)
_STEPS_BY_NAME = {name: Step(name) for name in STEP_NAMES}


def _positive(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{text!r} is not a {what} number (1, 2, ...)")
    return int(text)


@dataclass(frozen=True)
class CrashPlan:
    """Which (job, attempt) pairs crash, and where.

    A decision is a pure function of (seed, job id, attempt), so a seeded run crashes the
    same jobs at the same steps whichever worker takes them and in whatever order."""

    rate: float = 0.0
    seed: int = 0
    injected: frozenset[InjectedFault] = field(default_factory=frozenset)

    def simulated_step(self, job_id: int, attempt: int) -> Step | None:
        if self.rate <= 0.0:
            return None
        digest = hashlib.blake2b(
            f"{self.seed}:{job_id}:{attempt}".encode(), digest_size=16
        ).digest()
        draw = int.from_bytes(digest[:8], "big") / 2.0**64
        if draw >= self.rate:
            return None
        return SIMULATED_STEPS[digest[8] % len(SIMULATED_STEPS)]

    def is_injected(self, job_id: int, step: Step, attempt: int) -> bool:
        # Asked four times a job: the common case, no fault injected, costs no lookup.
        return bool(self.injected) and InjectedFault(job_id, step, attempt) in self.injected
