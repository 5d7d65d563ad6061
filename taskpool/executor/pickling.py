"""How the caller's calls and initializer become bytes for the workers, and the error that
names what could not be sent.

Calls are pickled by core.calls.dumps: plain pickle, by reference, for what the workers
import by name; cloudpickle, by value, for what they cannot (functions and classes of the
caller's `__main__`, lambdas, closures). What neither can pickle fails its own future (as
PPE's) with an error that names the caller's function and the argument at fault (see
not_sent), the pickler's own error as its cause.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
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


def dumps_initializer(initializer: Callable[..., object], initargs: tuple[Any, ...]) -> bytes:
    """(initializer, initargs) for the workers; PicklingError naming the part at fault."""
    try:
        return dumps((initializer, initargs))
    except BaseException as e:  # noqa: BLE001 - the pickler may raise anything
        parts: list[tuple[str, object]] = [("the initializer", initializer)]
        parts += [(f"initargs[{i}] ({type(a).__name__})", a) for i, a in enumerate(initargs)]
        raise not_sent(f"cannot send the initializer {describe(initializer)} to the workers",
                       parts, e) from e
