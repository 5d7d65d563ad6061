"""The job file format: what is accepted, and the reason given for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskpool.core.jobfile import (
    LineError,
    command_job,
    parse_job_text,
    parse_lines,
    read_job_file,
)
from taskpool.core.stdin import stdin_lines
from taskpool.model.jobs import FIB_MAX, PRIORITY_MAX, SLEEP_MAX, Job, JobKind, job_digest
from taskpool.model.pools import PoolLayout, PoolSpecError

from harness import stdin_in_pieces

ONE = PoolLayout.single(2)  # a plain run: one pool, type 1
SEED_000 = PoolLayout.parse(["1", "3", "1", "1", "1"])


def test_jobs_get_one_based_ids_in_input_order_skipping_blanks_and_comments() -> None:
    lines = ["# a comment\n", "fib 10\n", "\n", "   sleep 0.5   # why\n", "SLEEP 0\n"]
    assert list(parse_lines(lines, "f", ONE)) == [
        Job(1, JobKind.FIB, 10), Job(2, JobKind.SLEEP, 0.5), Job(3, JobKind.SLEEP, 0.0)]


def test_bad_lines_do_not_take_an_id() -> None:
    items = list(parse_lines(["fib 1", "fib x", "fib 2"], "<stdin>", ONE))
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
    [item] = parse_lines([text], "jobs.txt", ONE)
    assert isinstance(item, LineError)
    assert reason in item.reason
    assert str(item).startswith("jobs.txt:1: ")


def test_read_job_file_lists_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    path.write_text("fib 3\nfib\nsleep 1\nbogus\n")
    jobs, errors = read_job_file(str(path), ONE)
    assert [j.job_id for j in jobs] == [1, 2]
    assert [str(e) for e in errors] == [
        f"{path}:2: fib takes one argument, got 0",
        f"{path}:4: unknown job kind 'bogus' (expected 'sh COMMAND', 'exec PROGRAM [ARGS]', "
        "'call module:function [ARGS]', 'fib N', 'sleep SECONDS', 'alloc MB', "
        "'crash' or '<job_type> <duration> [priority]')",
    ]


def test_seed_000_example_lines_are_sleeps_of_their_type() -> None:
    lines = ["1 5", "2 3", "3 7", "4 2", "5 4"]
    jobs = list(parse_lines(lines, "<stdin>", SEED_000))
    assert [(j.pool, j.kind, j.arg, j.priority) for j in jobs] == [
        (1, JobKind.SLEEP, 5.0, 0), (2, JobKind.SLEEP, 3.0, 0), (3, JobKind.SLEEP, 7.0, 0),
        (4, JobKind.SLEEP, 2.0, 0), (5, JobKind.SLEEP, 4.0, 0)]


def test_typed_lines_take_a_priority_and_zero_is_a_job() -> None:
    jobs = list(parse_lines(["2 0", "2 1.5 9", "3 0 priority=4 timeout=2"], "f", SEED_000))
    assert jobs == [Job(1, JobKind.SLEEP, 0.0, pool=2), Job(2, JobKind.SLEEP, 1.5, pool=2,
                                                              priority=9),
                    Job(3, JobKind.SLEEP, 0.0, timeout=2.0, pool=3, priority=4)]


def test_core_lines_go_to_the_pool_named_for_their_kind_or_their_type() -> None:
    named = PoolLayout.parse(["fib=2", "sleep=1"])
    jobs = list(parse_lines(["fib 10", "sleep 1 priority=3", "1 0.5", "fib 3 type=2"], "f",
                            named))
    assert [(j.kind, j.pool, j.priority) for j in jobs] == [
        (JobKind.FIB, 1, 0), (JobKind.SLEEP, 2, 3), (JobKind.SLEEP, 1, 0), (JobKind.FIB, 2, 0)]


def test_a_single_pool_named_for_a_kind_takes_no_other_kind_by_default() -> None:
    [item] = parse_lines(["sleep 1"], "f", PoolLayout.parse(["fib=1"]))
    assert isinstance(item, LineError) and "no pool is named for sleep jobs" in item.reason


@pytest.mark.parametrize(
    "text, reason",
    [
        ("6 1", "type 6 is out of range 1..5"),
        ("0 1", "type 0 is out of range 1..5"),
        ("1.5 1", "job type '1.5' is not a whole number"),
        ("2 -1", "duration -1 must be a finite number >= 0"),
        ("2 soon", "duration 'soon' is not a number"),
        ("2", "expected '<job_type> <duration> [priority]', got 1 field"),
        ("2 1 3 4", "got 4 fields"),
        ("2 1 high", "priority 'high' is not a whole number"),
        ("2 1 -1", "priority -1 is out of range"),
        (f"2 1 {PRIORITY_MAX + 1}", f"out of range 0..{PRIORITY_MAX}"),
        ("2 1 3 priority=4", "priority given twice"),
        ("fib 10", "no pool is named for fib jobs"),
        ("fib 10 type=9", "type 9 is out of range 1..5"),
        ("fib 10 type=x", "type 'x' is not a whole number"),
        ("2 1 colour=red", "unknown option 'colour'"),
        ("2 1 +5", "priority '+5' is not a whole number"),
        ("2 1 1_000", "priority '1_000' is not a whole number"),
        ("+2 1", "job type '+2' is not a whole number"),
        ("fib 3 type=1 type=2", "option type= given twice"),
        ("fib 1_0 type=1", "fib argument '1_0' is not an integer"),
    ],
)
def test_bad_typed_line_reasons(text: str, reason: str) -> None:
    [item] = parse_lines([text], "<stdin>", SEED_000)
    assert isinstance(item, LineError), item
    assert reason in item.reason


def test_a_type_with_no_workers_takes_no_jobs() -> None:
    [item] = parse_lines(["2 1"], "f", PoolLayout.parse(["1", "0"]))
    assert isinstance(item, LineError)
    assert item.reason == "type 2 has no workers (its pool was given 0)"


@pytest.mark.parametrize(
    "items, reason",
    [
        (["0", "0"], "every pool has 0 workers"),
        (["2", "-1"], "'-1' is not a whole number of workers"),
        (["1_0"], "'1_0' is not a whole number"),
        (["two"], "'two' is not a whole number"),
        (["fib=1", "fib=2"], "a second pool for fib jobs"),
        (["gpu=1"], "unknown job kind 'gpu'"),
    ],
)
def test_bad_pool_specs(items: list[str], reason: str) -> None:
    with pytest.raises(PoolSpecError, match=reason):
        PoolLayout.parse(items)


def test_stdin_lines_are_whole_lines_however_the_reads_cut_them() -> None:
    """generator.stdin_lines reads fd 0 as the input comes: a line cut over several reads
    (a long one, or a slow writer) is joined, bad UTF-8 passes as before, and the last
    line needs no newline. Lines end as a job file's (universal newlines): at "\\n", "\\r\\n"
    (cut between two reads too) and a lone "\\r", each given as "\\n". Each piece is written
    by `before_read`, so each read gets exactly one piece."""
    pieces = [b"fib 1\nfi", b"b", b" 2\r", b"\nsleep 0\n\n\xff x\n" + b"y" * 30000,
              b"y" * 30000, b"z", b"\nsleep 1\rsleep 2\r\n\r", b"\r", b"\n",
              b"last"]  # each under a pipe's 64 KB: written whole
    with stdin_in_pieces(pieces) as before_read:
        lines = list(stdin_lines(before_read=before_read))
    assert lines == ["fib 1\n", "fib 2\n", "sleep 0\n", "\n", "\ufffd x\n",
                     "y" * 60000 + "z\n", "sleep 1\n", "sleep 2\n", "\n", "\n", "last"]


def test_options_come_before_a_command_and_the_rest_of_the_line_is_the_command() -> None:
    layout = PoolLayout.parse(["1", "2"])
    parsed = parse_job_text("timeout=5 type=2 priority=3 sh echo type=9 # kept\n", layout)
    assert parsed is not None and not isinstance(parsed, str)
    assert (parsed.kind.label, parsed.timeout, parsed.pool, parsed.priority, parsed.text) == \
        ("sh", 5.0, 2, 3, "echo type=9 # kept")
    both = [parse_job_text(line, layout) for line in ("fib 10 type=2", "type=2 fib 10")]
    assert both[0] == both[1] and not isinstance(both[0], str)
    assert parse_job_text("sh true", layout) == \
        "no pool is named for sh jobs: add type=T to the line, or name a pool sh=N"
    assert parse_job_text("FOO=1 sh true", layout) == \
        "unknown option 'foo' (expected timeout=SECONDS, type=T or priority=P)"


def test_a_changed_command_is_another_job_to_the_journal() -> None:
    assert job_digest(command_job(1, "gzip a")) == job_digest(command_job(1, " gzip a "))
    assert job_digest(command_job(1, "gzip a")) != job_digest(command_job(1, "gzip b"))
