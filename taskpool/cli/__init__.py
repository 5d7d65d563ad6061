"""The command line: `taskpool run`, `dispatch`, `report` and `results`.

Nothing of the pool is imported here: a Ctrl-C while the modules load (the first tenth of
a second) is then caught by `entry_point` like any other before main's handlers are in place.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from taskpool.model.exits import EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """`taskpool ARGS...`; returns the exit status."""
    from taskpool.cli.app import main as run

    return run(argv)


def entry_point() -> None:
    try:
        code = main()
    except KeyboardInterrupt:
        # Ctrl-C before main's handlers are in place (they turn it into a graceful stop,
        # and no pool runs before they are): the status a run interrupted later gives,
        # without a traceback.
        code = EXIT_INTERRUPTED
    sys.exit(code)
