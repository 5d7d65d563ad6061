"""Python calls in a worker: what a CALL job runs, for taskpool.Executor.

A call crosses as PPE's do, pickled as (fn, args, kwargs) in the caller's process and read
here; a batch of calls is one pickle (see `dumps`). What plain pickle would send by
reference to a module the worker cannot import the same way (the caller's `__main__`: a
`python -c`, a script on stdin, the REPL, a notebook) or cannot send at all (a lambda, a
closure, a class defined in a function) goes by value, through cloudpickle, as loky and
Dask send it. So the Dealer never imports the caller's main module, and a worker needs
only what the caller's functions import.

Every call of a batch that loads has an outcome, and nothing a call does (short of killing
the process) stops the batch: a raised exception is returned with its traceback text, as is
a return value that cannot be pickled. A batch whose pickle does not load here is answered
as such, and the caller sends its calls again one by one (wire/calls.py).
A batch's pickle too large for one message waits in a memfd of the caller's process; we read
it through /proc/PID/fd/FD (same user), so it never has a name that could be left behind.
"""

from __future__ import annotations

import collections
import copyreg
import io
import os
import pickle
import sys
import time
import traceback
from multiprocessing.reduction import ForkingPickler
from typing import Any

from taskpool.posix.proc import read_exactly
from taskpool.wire.calls import PLAIN_TYPES, CallBatch, CallWhere, decode_memfd_ref


class RemoteTraceback(Exception):
    """The cause of an exception raised in a worker: the worker's traceback, as text."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


# multiprocessing's reducers for objects that cross to another process (a Connection by
# its descriptor, through multiprocessing's resource sharer or a spawning Popen), as its
# ForkingPickler has them; live: a module imported later adds its own.
_REDUCERS = ForkingPickler._extra_reducers  # type: ignore[attr-defined]


class _Pickler(pickle.Pickler):
    """multiprocessing's ForkingPickler, without its copy of copyreg's table per use."""

    dispatch_table = collections.ChainMap(_REDUCERS, copyreg.dispatch_table)  # type: ignore[arg-type]


def dumps(obj: Any) -> bytes:
    """obj's pickle: by reference where the workers can import it, by value where not.

    First with multiprocessing's own pickler (C pickle, by reference, with the reducers
    that let a Connection or a socket cross to another process, as PPE pickles calls);
    then, if that failed or referred to anything of `__main__`, with cloudpickle and the
    same reducers: it sends `__main__`'s functions and classes, lambdas and closures by
    value, with the globals they use. Raises what cloudpickle raises when neither can."""
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
        data = buffer.getvalue()
    except Exception:  # noqa: BLE001 - by reference failed (a lambda, say): by value
        data = b"__main__"
    # A reference to `__main__` is the name as a string in the pickle: a cheap scan. A
    # string "__main__" among the arguments costs only the slower pickle.
    if b"__main__" in data:
        import cloudpickle  # only when needed: the common call never loads it

        buffer = io.BytesIO()
        pickler = cloudpickle.Pickler(buffer, pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = collections.ChainMap(_REDUCERS, pickler.dispatch_table)
        pickler.dump(obj)
        data = buffer.getvalue()
    return data


def run_calls(payload: bytes) -> tuple[float, bytes]:
    """Run the calls of a batch that this job holds; the seconds they took, and their
    outcomes (see wire/calls.py for the layout)."""
    started = time.perf_counter()
    batch = CallBatch.decode(payload)
    returned = bytearray(batch.count)  # 1: the call returned; 0: it raised
    try:
        data = _read_memfd(batch.calls) if batch.where == CallWhere.MEMFD else batch.calls
        calls = pickle.loads(data)[batch.first:batch.first + batch.count]
    except BaseException as e:  # noqa: BLE001 - one call's argument may be at fault
        # The caller knows which calls the pickle holds, and decides: see wire/calls.py.
        return time.perf_counter() - started, pickle.dumps((None, _pickle_exception(e)),
                                                           pickle.HIGHEST_PROTOCOL)
    # A plain value (immutable) is kept as it is, and pickled with the batch's others at the
    # end; any other is pickled at once, as PPE does, before a later call can change it.
    outcomes: list[Any] = []
    plain = bytearray(batch.count)
    worker = os.getpid()
    for i, (fn, args, kwargs) in enumerate(calls):
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - as PPE: even SystemExit is its outcome
            _leave_if_forked(worker, 1)
            outcomes.append(_pickle_exception(e))
            continue
        _leave_if_forked(worker, 0)
        if type(value) in PLAIN_TYPES:
            returned[i] = plain[i] = 1
            outcomes.append(value)
        else:
            outcomes.append(_pickle_value(fn, value, returned, i))
    if all(plain):
        return time.perf_counter() - started, pickle.dumps((None, outcomes),
                                                           pickle.HIGHEST_PROTOCOL)
    plain_dumps, protocol = pickle.dumps, pickle.HIGHEST_PROTOCOL
    values = [plain_dumps(v, protocol) if plain[i] else v for i, v in enumerate(outcomes)]
    return time.perf_counter() - started, _outcomes(returned, values)


def _leave_if_forked(worker: int, status: int) -> None:
    """A call that forked and whose child returned (or raised) here: the child must not go
    on as a worker (answer the Dealer, take jobs, take a Shutdown meant for its parent). It
    exits: 0 if the call returned, 1 if it raised; its output flushed first."""
    if os.getpid() == worker:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 - nothing more to do for it
            pass
    os._exit(status)


def _pickle_value(fn: Any, value: Any, returned: bytearray, i: int) -> bytes:
    """The pickle of call i's return value, and returned[i] set; or, if it does not pickle,
    that of a PicklingError that says so."""
    try:
        data = dumps(value)
    except BaseException as e:  # noqa: BLE001 - the pickler may raise anything
        error = pickle.PicklingError(
            f"the return value of {_name_of(fn)} could not be pickled: {e!r}")
        return _pickle_exception(error, cause=e)
    returned[i] = 1
    return data


def _outcomes(returned: bytearray, values: list[bytes]) -> bytes:
    return pickle.dumps((bytes(returned), values), pickle.HIGHEST_PROTOCOL)


def _name_of(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _pickle_exception(e: BaseException, cause: BaseException | None = None) -> bytes:
    shown = cause or e
    # The three-argument form: format_exception(exc) alone exists only from Python 3.10.
    tb = "".join(traceback.format_exception(type(shown), shown, shown.__traceback__))
    try:
        return dumps((e, tb))
    except BaseException as why:  # noqa: BLE001 - an exception that does not pickle
        stand_in = RuntimeError(f"{type(e).__name__}: {e} (the exception itself could not be "
                                f"pickled: {why!r})")
        return pickle.dumps((stand_in, tb), pickle.HIGHEST_PROTOCOL)


def _read_memfd(ref: bytes) -> bytes:
    pid, fd, size = decode_memfd_ref(ref)
    handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    try:
        return read_exactly(handle, size)
    finally:
        os.close(handle)


def raised(data: bytes) -> BaseException:
    """In the caller: the exception a call raised, with the worker's traceback as its
    cause (as PPE's)."""
    exc, tb = pickle.loads(data)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc  # type: ignore[no-any-return]
