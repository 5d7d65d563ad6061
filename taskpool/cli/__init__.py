"""The command line: `taskpool run`, `dispatch`, `report` and `results`.

Nothing of the pool is imported here: a Ctrl-C while the modules load (the first tenth of
a second) is then caught by `entry_point` like any other before main's handlers are in place.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence

from taskpool.model.exits import EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """`taskpool ARGS...`; returns the exit status."""
    started_at = time.monotonic()  # a run's summary counts its wall time from here
    from taskpool.cli.app import main as run

    return run(argv, started_at)


def entry_point() -> None:
    try:
        _reopen_closed_outputs()
        code = main()
    except KeyboardInterrupt:
        # Ctrl-C before main's handlers are in place (they turn it into a graceful stop,
        # and no pool runs before they are): the status a run interrupted later gives,
        # without a traceback.
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # Our output's reader went away (`taskpool results ... | head -1`): end quietly,
        # with the status of a Unix tool killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing more to flush at exit
        code = 128 + signal.SIGPIPE
    sys.exit(_unless_interrupted_late(code))


def _unless_interrupted_late(code: int) -> int:
    """From here to the exit, SIGINT and SIGTERM wait (the interpreter's shutdown would
    otherwise meet them with their default action, and the process die by the signal):
    one that came after the run's summary makes the status an interrupted run's."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    late = set(signal.sigpending() & {signal.SIGINT, signal.SIGTERM})
    loop = sys.modules.get("taskpool.core.loop")  # imported if a run's loop ran
    if loop is not None:
        late.update(loop.late_interrupts)
    if late and code < 128:
        return 128 + int(min(late))
    return code


def _reopen_closed_outputs() -> None:
    """Standard output or error closed by the caller (`2>&-`): /dev/null in its place. Else
    the first descriptor we open (the results file, a pipe, a queue) would take number 2,
    and the log would be written into it. What the log says is lost, as the caller asked;
    the run is not."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:  # Python found fd 2 closed at start
        sys.stderr = open(2, "w", closefd=False)  # the process's own
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
