"""How the caller's calls and initializer become bytes for the workers, and the error that
names what could not be sent.

Calls are pickled by core.calls.dumps: plain pickle, by reference, for what the workers
import by name; cloudpickle, by value, for what they cannot (functions and classes of the
caller's `__main__`, lambdas, closures). What neither can pickle fails its own future (as
PPE's) with an error that names the caller's function and the argument at fault (see
not_sent), the pickler's own error as its cause.
"""

from __future__ import annotations

import io
import multiprocessing.context
import pickle
from collections.abc import Callable
from multiprocessing.synchronize import SemLock
from typing import Any

from taskpool.core.calls import dumps


def describe(fn: object) -> str:
    """The caller's name for a function: module.qualname, or its repr."""
    name = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if name is None:
        return repr(fn)
    return f"{module}.{name}" if module else str(name)


def _parts(fn: Callable[..., Any], args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> list[tuple[str, object]]:
    """Each part of a call that is pickled, with the name the caller knows it by."""
    parts: list[tuple[str, object]] = [("the function", fn)]
    parts += [(f"argument {i} ({type(a).__name__})", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r} ({type(v).__name__})", v) for k, v in kwargs.items()]
    return parts


def not_sent(what: str, parts: list[tuple[str, object]], error: BaseException
             ) -> BaseException:
    """The error for something that could not be pickled: which part of it, and why. Of
    the pickler's own error's type where it can be made with a message (TypeError for a
    lock, as PPE's future gets), so that an `except` written for PPE still catches it;
    else a pickle.PicklingError. The pickler's error is its cause."""
    for name, part in parts:
        try:
            dumps(part)
        except BaseException as e:  # noqa: BLE001 - the pickler may raise anything
            error = e
            what = f"{what}: {name} cannot be pickled"
            break
    message = f"{what}: {type(error).__name__}: {error}"
    failure: BaseException
    try:
        failure = type(error)(message)
    except Exception:  # noqa: BLE001 - a constructor that wants other arguments
        failure = pickle.PicklingError(message)
    failure.__cause__ = error
    return failure


def call_not_sent(call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]],
                  error: BaseException) -> BaseException:
    fn, args, kwargs = call
    return not_sent(f"cannot send the call {describe(fn)}(...) to a worker",
                    _parts(fn, args, kwargs), error)


def dumps_initializer(initializer: Callable[..., object], initargs: tuple[Any, ...]
                      ) -> tuple[bytes, tuple[int, ...]]:
    """(initializer, initargs) for the workers, and the descriptors they refer to;
    PicklingError naming the part at fault.

    Pickled as multiprocessing pickles a new process's arguments under the 'spawn' and
    'forkserver' start methods (a spawning Popen set: see _Spawning), so that what PPE
    accepts in initargs reaches the workers: a multiprocessing Queue, Lock, Event,
    Semaphore, Condition of those contexts (their semaphores are opened by name, a queue's
    pipe is passed to the Dealer under its own numbers and kept open in the workers) and
    Manager() proxies. Those of the 'fork' context live only in processes forked from the
    caller's, which ours are not: refused, with the reason (_refuse_fork_only)."""
    parts: list[tuple[str, object]] = [("the initializer", initializer)]
    parts += [(f"initargs[{i}] ({type(a).__name__})", a) for i, a in enumerate(initargs)]
    what = f"cannot send the initializer {describe(initializer)} to the workers"
    spawning = _Spawning()
    previous = multiprocessing.context.get_spawning_popen()
    multiprocessing.context.set_spawning_popen(spawning)  # type: ignore[arg-type] # (thread's)
    try:
        _refuse_fork_only(what, parts)
        try:
            data = dumps((initializer, initargs))
        except BaseException as e:  # noqa: BLE001 - the pickler may raise anything
            raise not_sent(what, parts, e) from e
    finally:
        multiprocessing.context.set_spawning_popen(previous)
    return data, tuple(spawning.fds)


class InheritedFd:
    """A descriptor that the worker has under the same number (multiprocessing's DupFd
    for a spawned process): what a Queue's Connection is rebuilt from."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        return self.fd


class _Spawning:
    """Stands for multiprocessing's spawning Popen while initargs are pickled: objects that
    may only cross to a new process (Queue, Lock, ...) allow it then, and the descriptors
    they hand over are noted, to be passed to the Dealer."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        if fd not in self.fds:
            self.fds.append(fd)
        return fd

    DupFd = InheritedFd


class _ForkOnly(Exception):
    pass


class _ForkOnlyFinder(pickle.Pickler):
    """Pickles into nothing, to find a semaphore of the 'fork' context: unlinked at birth,
    it has no name to open it by, only an address valid in forks of the caller's process
    (before Python 3.12, multiprocessing would even send that address)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, SemLock) and obj._semlock.name is None:  # type: ignore[attr-defined]
            raise _ForkOnly()
        return NotImplemented


def _refuse_fork_only(what: str, parts: list[tuple[str, object]]) -> None:
    for name, part in parts:
        try:
            _ForkOnlyFinder(io.BytesIO(), pickle.HIGHEST_PROTOCOL).dump(part)
        except _ForkOnly:
            raise ValueError(
                f"{what}: {name} is a multiprocessing object of the 'fork' context (the "
                f"default on Linux before Python 3.14), which lives only in processes "
                f"forked from yours; taskpool's workers are not. Create it from "
                f"multiprocessing.get_context('forkserver') (or 'spawn'), as for a "
                f"ProcessPoolExecutor with that mp_context, or use a Manager()") from None
        except Exception:  # noqa: BLE001, S110 - anything else: the real pickle says it
            pass
