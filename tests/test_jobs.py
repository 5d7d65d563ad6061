"""The job file format: what is accepted, and the reason given for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskpool.jobs import FIB_MAX, SLEEP_MAX, Job, JobKind, LineError, parse_lines, read_job_file


def test_jobs_get_one_based_ids_in_input_order_skipping_blanks_and_comments() -> None:
    lines = ["# a comment\n", "fib 10\n", "\n", "   sleep 0.5   # why\n", "SLEEP 0\n"]
    assert list(parse_lines(lines, "f")) == [
        Job(1, JobKind.FIB, 10), Job(2, JobKind.SLEEP, 0.5), Job(3, JobKind.SLEEP, 0.0)]


def test_bad_lines_do_not_take_an_id() -> None:
    items = list(parse_lines(["fib 1", "fib x", "fib 2"], "<stdin>"))
    assert items == [
        Job(1, JobKind.FIB, 1),
        LineError("<stdin>", 2, "fib argument 'x' is not an integer"),
        Job(2, JobKind.FIB, 2),
    ]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("fib", "fib takes one argument, got 0"),
        ("fib 1 2", "fib takes one argument, got 2"),
        ("fib 3.5", "fib argument '3.5' is not an integer"),
        ("fib -1", f"fib argument -1 is out of range 0..{FIB_MAX}"),
        (f"fib {FIB_MAX + 1}", f"out of range 0..{FIB_MAX}"),
        ("sleep", "sleep takes one argument, got 0"),
        ("sleep soon", "sleep argument 'soon' is not a number"),
        ("sleep -0.1", "must be a finite number >= 0"),
        ("sleep nan", "must be a finite number >= 0"),
        ("sleep inf", "must be a finite number >= 0"),
        (f"sleep {SLEEP_MAX + 1}", "over the limit"),
        ("compute 3", "unknown job kind 'compute'"),
    ],
)
def test_bad_line_reasons(text: str, reason: str) -> None:
    [item] = parse_lines([text], "jobs.txt")
    assert isinstance(item, LineError)
    assert reason in item.reason
    assert str(item).startswith("jobs.txt:1: ")


def test_read_job_file_lists_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    path.write_text("fib 3\nfib\nsleep 1\nbogus\n")
    jobs, errors = read_job_file(str(path))
    assert [j.job_id for j in jobs] == [1, 2]
    assert [str(e) for e in errors] == [
        f"{path}:2: fib takes one argument, got 0",
        f"{path}:4: unknown job kind 'bogus' "
        "(expected 'fib N', 'sleep SECONDS', 'alloc MB' or 'crash')",
    ]
