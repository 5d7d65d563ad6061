"""The built-in job kinds' work, as a worker runs it: the CPU-bound `fib`, `sleep`, `alloc`
(to meet --max-memory) and the poison `crash`. Both engines' workers call `execute`."""

from __future__ import annotations

import os
import signal
import time

from taskpool.model.jobs import Arg, JobKind


def fib(n: int) -> int:
    """Naive recursion on purpose: it is the CPU-bound load, not a fast Fibonacci."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def execute(kind: JobKind, arg: Arg) -> Arg:
    """Run a job in the worker. A sleep job's result is the time it slept, as seed 000's
    workers report their duration back; an alloc job's is the megabytes it touched."""
    if kind is JobKind.FIB:
        return fib(int(arg))
    if kind is JobKind.SLEEP:
        if arg > 0:
            time.sleep(float(arg))
        return float(arg)
    if kind is JobKind.ALLOC:
        block = bytearray(int(arg) * 1024 * 1024)  # zero-filled: every page is touched
        return len(block) // (1024 * 1024)
    if kind is JobKind.CRASH:  # a poison job
        os.kill(os.getpid(), signal.SIGSEGV)
        raise AssertionError("not reached: SIGSEGV's default action ends the process")
    # sh, exec and call run through core/commands.py, in an engine that hands them there.
    raise ValueError(f"{kind.label} jobs are not run by this engine")
