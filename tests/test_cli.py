"""The command line's contract: usage errors and bad input get one clear line and exit 2,
never a traceback; a bad job file runs nothing; bad lines on stdin are skipped."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskpool import cli

from harness import ROOT, PoolRun, assert_done_right, assert_exactly_once, read_results


def taskpool(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskpool", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, **kw)  # type: ignore[call-overload]


def test_a_bad_job_file_lists_every_bad_line_runs_nothing_and_exits_2(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("fib 10\nfib 99\nsleep 1\nsleep -2\n# fine\nwork 3\n")
    proc = taskpool("run", "--jobs", str(jobs), "--results", str(tmp_path / "r.jsonl"),
                    stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"taskpool: {jobs}:2: fib argument 99 is out of range 0..45",
        f"taskpool: {jobs}:4: sleep argument -2 must be a finite number >= 0",
        f"taskpool: {jobs}:6: unknown job kind 'work' (expected 'sh COMMAND', "
        "'exec PROGRAM [ARGS]', 'call module:function [ARGS]', 'fib N', 'sleep SECONDS', "
        "'alloc MB', 'crash' or '<job_type> <duration> [priority]')",
        f"taskpool: {jobs}: 3 bad line(s); nothing was run",
    ]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.jsonl").exists(), "nothing may start before the file is valid"


def test_a_missing_job_file_is_named_with_the_reason(tmp_path: Path) -> None:
    proc = taskpool("run", "--jobs", str(tmp_path / "nope.txt"))
    assert proc.returncode == 2
    missing = tmp_path / "nope.txt"
    assert proc.stderr == f"taskpool: {missing}: cannot read: No such file or directory\n"


@pytest.mark.parametrize("args, fragment", [
    (["run", "--workers", "0"], "argument --workers: 0 is out of range"),
    (["run", "--workers", "many"], "argument --workers: 'many' is not a whole number"),
    (["run", "--crash-rate", "1"], "argument --crash-rate: 1 is out of range"),
    (["run", "--inject-fault", "3:sometime"], "argument --inject-fault"),
    (["run", "--demo", "--jobs", "x"], "--demo brings its own jobs"),
    (["fly"], "invalid choice: 'fly'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_a_wrong_command_line_exits_2_with_usage(args: list[str], fragment: str) -> None:
    proc = taskpool(*args, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert fragment in proc.stderr and "usage: taskpool" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_jobs_with_a_terminal_on_stdin_prints_usage_and_exits_2() -> None:
    controller, terminal = os.openpty()
    try:
        proc = taskpool("run", stdin=terminal)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == 2
    assert "usage: taskpool" in proc.stderr
    assert "taskpool: no jobs: give --jobs FILE, or pipe jobs into standard input" in proc.stderr


@pytest.mark.parametrize("jobs_args", [[], ["--jobs", "-"]])
def test_no_jobs_with_stdin_closed_says_so_and_exits_2(jobs_args: list[str]) -> None:
    """`taskpool run <&-`: Python's sys.stdin is None, and the generator could not read fd 0."""
    proc = taskpool("run", *jobs_args, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 2
    assert "taskpool: no jobs: standard input is closed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_lines_on_stdin_are_skipped_the_rest_complete_and_exit_is_2(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--results", str(results)],
                  stdin=b"fib 10\nfib ten\nsleep 0\n\nsleep forever\nfib 20\n")
    assert run.finish() == 2
    log = run.log_text()
    assert "taskpool: <stdin>:2: fib argument 'ten' is not an integer" in log
    assert "taskpool: <stdin>:5: sleep argument 'forever' is not a number" in log
    assert "Traceback" not in log
    records = read_results(results)
    assert_exactly_once(records, range(1, 4))
    assert_done_right(records)
    assert [(r["kind"], r["arg"]) for r in sorted(records, key=lambda r: r["job"])] == [
        ("fib", 10), ("sleep", 0.0), ("fib", 20)]


def test_a_bad_line_on_stdin_is_printed_above_the_live_view_not_run_into_it() -> None:
    """On a terminal the progress line stays at the bottom, redrawn in place. An error
    written to stderr past it would run on from the progress line (and leave it behind,
    stale); printed through the view, the view first clears its line."""
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="200", LINES="30")
    proc = subprocess.Popen([sys.executable, "-m", "taskpool", "run", "--workers", "1"],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    out = bytearray()

    def read_until(pattern: bytes | None) -> None:
        """Read the terminal until `pattern` shows (None: until its last writer is gone)."""
        deadline = time.monotonic() + 60
        while pattern is None or not re.search(pattern, out):
            ready, _, _ = select.select([master], [], [], deadline - time.monotonic())
            assert ready, f"timed out waiting for {pattern!r}: {bytes(out)!r}"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                chunk = b""
            if not chunk:
                assert pattern is None, f"ended before {pattern!r}: {bytes(out)!r}"
                return
            out.extend(chunk)

    try:
        assert proc.stdin is not None
        proc.stdin.write(b"fib 10\n")
        proc.stdin.flush()
        read_until(rb"1/1\+ done")  # the view is drawn, and job 1 done
        proc.stdin.write(b"fib ten\n")
        proc.stdin.close()
        read_until(None)
    finally:
        os.close(master)
        code = proc.wait(timeout=60)
    assert code == 2
    error = b"taskpool: <stdin>:2: fib argument 'ten' is not an integer"
    assert out.count(error) == 1, bytes(out)
    at = out.index(error)
    line_start = max(out.rfind(b"\r", 0, at), out.rfind(b"\n", 0, at))
    assert b" done " not in out[line_start:at], "the error ran on from the progress line"


def test_ctrl_c_before_mains_handlers_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A Ctrl-C in the first milliseconds, before main turns SIGINT into a graceful stop
    (while it parses its arguments, reads the job file...), raises KeyboardInterrupt there:
    the run ends with the status of an interrupted run, and no traceback."""

    def interrupted() -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    with pytest.raises(SystemExit) as ended:
        cli.entry_point()
    assert ended.value.code == 130
    assert capsys.readouterr().err == ""
