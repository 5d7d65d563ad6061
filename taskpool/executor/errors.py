"""What an Executor's futures raise when the pool, not the call, is at fault."""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool


class WorkerCrashed(BrokenProcessPool):
    """A call's worker died `max_attempts` times (the message says how: the signal), or
    the pool could not keep workers at all. A BrokenProcessPool, so that code written for
    ProcessPoolExecutor still catches it; unlike PPE's, the pool goes on."""
