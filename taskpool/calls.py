"""Python calls in a worker: what a CALL job runs, for taskpool.Executor.

A call crosses as PPE's do: `pickle.dumps((fn, args, kwargs))` made in the caller's process,
read here. The worker was forked from the Executor's Dealer process, which imported the
caller's main module the way multiprocessing's spawn does, so functions pickled by
reference resolve here too.

Every call of a batch has an outcome, and nothing a call does (short of killing the process)
stops the batch: a raised exception is returned with its traceback text, as is a return
value that cannot be pickled. A call's pickle too large for one message waits in a memfd of
the caller's process; we read it through /proc/PID/fd/FD (same user), so it never has a
name that could be left behind.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from typing import Any

from taskpool.protocol import (
    CallWhere,
    OutcomeKind,
    decode_calls,
    decode_memfd_ref,
    encode_outcomes,
)


class RemoteTraceback(Exception):
    """The cause of an exception raised in a worker: the worker's traceback, as text."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def run_calls(payload: bytes) -> tuple[float, bytes]:
    """Run every call of a batch; the seconds they took, and their outcomes."""
    started = time.perf_counter()
    outcomes = []
    for call_id, where, data in decode_calls(payload):
        outcomes.append((call_id, *_run_one(where, data)))
    return time.perf_counter() - started, encode_outcomes(outcomes)


def _run_one(where: CallWhere, data: bytes) -> tuple[OutcomeKind, bytes]:
    try:
        if where == CallWhere.MEMFD:
            data = _read_memfd(data)
        fn, args, kwargs = pickle.loads(data)
        value = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - as PPE: even SystemExit is the call's outcome
        return OutcomeKind.RAISED, _pickle_exception(e)
    try:
        return OutcomeKind.RETURNED, pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except BaseException as e:  # noqa: BLE001 - the pickler may raise anything
        error = pickle.PicklingError(
            f"the return value of {_name_of(fn)} could not be pickled: {e!r}")
        return OutcomeKind.RAISED, _pickle_exception(error, cause=e)


def _name_of(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _pickle_exception(e: BaseException, cause: BaseException | None = None) -> bytes:
    tb = "".join(traceback.format_exception(cause or e))
    try:
        return pickle.dumps((e, tb), pickle.HIGHEST_PROTOCOL)
    except BaseException as why:  # noqa: BLE001 - an exception that does not pickle
        stand_in = RuntimeError(f"{type(e).__name__}: {e} (the exception itself could not be "
                                f"pickled: {why!r})")
        return pickle.dumps((stand_in, tb), pickle.HIGHEST_PROTOCOL)


def _read_memfd(ref: bytes) -> bytes:
    pid, fd, size = decode_memfd_ref(ref)
    handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    try:
        data = os.pread(handle, size, 0)
        while len(data) < size:
            data += os.pread(handle, size - len(data), len(data))
        return data
    finally:
        os.close(handle)


def call_outcome(kind: OutcomeKind, data: bytes) -> tuple[bool, Any]:
    """In the caller: (True, value) or (False, exception with its remote traceback)."""
    if kind == OutcomeKind.RETURNED:
        return True, pickle.loads(data)
    exc, tb = pickle.loads(data)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return False, exc
