"""Functions for `call` jobs in the tests (imported by the workers: the run's directory is
the repository's root)."""

from __future__ import annotations

import sys


def square(x: int) -> int:
    print(f"squaring {x}")
    print(f"to stderr {x}", file=sys.stderr)
    return x * x


def fail(message: str) -> None:
    raise ValueError(message)
