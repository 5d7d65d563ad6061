"""How the command line tells people what went wrong.

Errors meant for people are one line, `taskpool: <where>: <reason>`, on stderr, with exit
status 2 for a wrong command line or bad input. A traceback means a bug.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from taskpool.observe.live import LiveView


def error(message: str) -> None:
    os.write(2, f"taskpool: {message}\n".encode("utf-8", "replace"))


def error_reporter(live: LiveView | None) -> Callable[[str], None]:
    """Where a run's errors go (a rejected line of standard input, say): above the live view
    when it runs, as its log lines are (LiveView.report_error says why); else straight to
    stderr."""
    return error if live is None else live.report_error
