"""Input taken as documented, and nothing else: numbers in ASCII digits, a byte-order mark
skipped, a line's length bounded, a non-blocking standard input read all the same."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from taskpool.core.jobfile import LINE_MAX, parse_lines, read_job_file
from taskpool.core.stdin import stdin_lines
from taskpool.model.jobs import Job, JobKind
from taskpool.model.pools import PoolLayout

from harness import ROOT, read_results, stdin_in_pieces

ONE = PoolLayout.single(2)


@pytest.mark.parametrize(("text", "reason"), [
    ("sleep \u0663", "sleep argument '\u0663' is not a number"),  # an Arabic-Indic 3
    ("sleep +1", "sleep argument '+1' is not a number"),
    ("sleep 1_0", "sleep argument '1_0' is not a number"),
    ("1 1_0", "duration '1_0' is not a number"),
    ("fib 3 timeout=1_0", "timeout '1_0' is not a number"),
    ("sleep 1 timeout=+2", "timeout '+2' is not a number"),
])
def test_numbers_are_ascii_digits_only(text: str, reason: str) -> None:
    [error] = parse_lines([text], "f", ONE)
    assert str(error) == f"f:1: {reason}"


@pytest.mark.parametrize("text", ["sleep 1.5", "sleep .5", "sleep 2.", "sleep 1e-3",
                                  "fib 3 timeout=0.25", "1 3.0"])
def test_numbers_of_the_documented_forms_still_pass(text: str) -> None:
    [job] = parse_lines([text], "f", ONE)
    assert isinstance(job, Job)


def test_a_byte_order_mark_at_the_start_of_a_job_file_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    path.write_bytes(b"\xef\xbb\xbffib 3\nsleep 0\n")
    assert read_job_file(str(path), ONE) == ([Job(1, JobKind.FIB, 3),
                                              Job(2, JobKind.SLEEP, 0.0)], [])


def test_an_endless_line_in_a_job_file_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "taskpool", "run", "--jobs", "/dev/zero"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"taskpool: /dev/zero:1: the line is longer than {LINE_MAX} bytes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_line_too_long_on_stdin_is_refused_and_the_next_ones_go_on() -> None:
    pieces = [b"fib 1\n", b"x" * 60000] + [b"y" * 60000] * 20 + [b"z\nfib 2\n"]
    with stdin_in_pieces(pieces) as before_read:
        items = list(parse_lines(stdin_lines(before_read), "<stdin>", ONE))
    assert items[0] == Job(1, JobKind.FIB, 1)
    assert str(items[1]) == f"<stdin>:2: the line is longer than {LINE_MAX} bytes"
    assert items[2] == Job(2, JobKind.FIB, 2, line=3)
    assert len(items) == 3


def test_a_byte_order_mark_at_the_start_of_stdin_is_skipped() -> None:
    with stdin_in_pieces([b"\xef\xbb\xbffib 3\n"]) as before_read:
        assert list(stdin_lines(before_read)) == ["fib 3\n"]


def test_a_non_blocking_stdin_is_read_as_it_comes(tmp_path: Path) -> None:
    """O_NONBLOCK set by the producer (as some programs do) on the pipe we read."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, fcntl.F_SETFL, fcntl.fcntl(read_end, fcntl.F_GETFL) | os.O_NONBLOCK)
    results = tmp_path / "r.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "taskpool", "run", "--workers", "2",
                             "--results", str(results)],
                            cwd=ROOT, stdin=read_end, stderr=subprocess.PIPE)
    os.close(read_end)
    assert proc.stderr is not None
    for line in proc.stderr:  # the generator starts, and reads an empty pipe: EAGAIN
        if line.startswith(b"[TaskGenerator] Starting"):
            break
    os.write(write_end, b"fib 10\nfib 11\n")
    os.write(write_end, b"sleep 0\n")
    os.close(write_end)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert sorted(r["job"] for r in read_results(results)) == [1, 2, 3]
