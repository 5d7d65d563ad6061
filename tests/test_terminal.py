"""What a terminal shows: stderr on a pseudo-terminal, as a person at a terminal sees a run.

By default the progress line, and above it the warnings, crashes, failures and how the run
ended, not a line a job; -v and --demo show every line; --log FILE gets every line while the
progress line stays on the terminal; -q shows errors and the summary alone. The log's lines
are recognised by their events' texts (`--events`) or by their role tags, never by their
wording (tests/test_log_format.py has that); the progress line is read as figures.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import JobRecord, Status
from taskpool.observe import events as ev
from taskpool.observe.live import LiveView
from taskpool.observe.shown import Shown

from harness import ROOT, Event, assert_exactly_once, read_events, read_results, write_job_file

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A row of the progress line: "[pool label] [bar] 7/20 done · 1 failed · 2 running ...".
ROW = re.compile(r"(?:(?P<label>type \S+|all)\s+)?[━╸╺ ]*\s*(?P<done>\d[\d,]*)/(?P<of>\d[\d,]*)"
                 r"\+? done(?P<rest>.*)")


class Terminal:
    """A taskpool command run with stdin closed and stdout and stderr on a pseudo-terminal."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        master, slave = pty.openpty()
        environ = dict(os.environ, TERM="xterm-256color", COLUMNS="200", LINES="40",
                       **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "taskpool", *args], cwd=ROOT,
                                     env=environ, stdin=subprocess.DEVNULL, stdout=slave,
                                     stderr=slave, start_new_session=True)
        os.close(slave)
        self.master = master
        self.out = bytearray()

    def read_until(self, pattern: bytes | None, timeout: float = 120) -> None:
        """Read what the terminal shows until `pattern` shows (None: until the command's
        end, when its last writer is gone)."""
        deadline = time.monotonic() + timeout
        while pattern is None or not re.search(pattern, ANSI.sub("", self.text).encode()):
            ready, _, _ = select.select([self.master], [], [], deadline - time.monotonic())
            assert ready, f"timed out waiting for {pattern!r}: {self.text[-2000:]!r}"
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                chunk = b""
            if not chunk:
                assert pattern is None, f"ended before {pattern!r}: {self.text[-2000:]!r}"
                return
            self.out.extend(chunk)

    def finish(self) -> int:
        try:
            self.read_until(None)
        finally:
            os.close(self.master)
        return self.proc.wait(timeout=60)

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace")

    def lines(self) -> list[str]:
        """Every line shown, control codes removed (a redrawn row is a line of its own)."""
        return [line.strip() for line in re.split(r"[\r\n]", ANSI.sub("", self.text))
                if line.strip()]

    def last_frame(self) -> dict[str, dict[str, str]]:
        """The figures of each row of the last drawing of the progress line, by the row's
        label ("all" for a plain run's one row): {"done": "7", "of": "20", "failed": "1",
        "running": "2", ...}."""
        rows: dict[str, dict[str, str]] = {}
        for line in self.lines():
            found = ROW.fullmatch(line)
            if found is None:
                continue
            label = found["label"] or "all"
            figures = {"done": found["done"].replace(",", ""), "of": found["of"]}
            for part in found["rest"].split(" · ")[1:]:
                counted = re.fullmatch(r"([\d,]+) (.+)", part.strip())
                if counted:  # "2 running": {"running": "2"}
                    figures[counted[2]] = counted[1].replace(",", "")
                else:  # "0:07", "ETA 3 s", "interrupted by SIGINT": as they are
                    figures[part.strip()] = ""
            rows[label] = figures  # each drawing overwrites the one before it
        return rows


def shown(terminal: Terminal, events: list[Event], name: str, **fields: object) -> list[bool]:
    """For each event `name` (with these fields), whether its line is on the terminal."""
    lines = set(terminal.lines())
    return [e["text"] in lines for e in events if e["event"] == name
            and all(e.get(key) == value for key, value in fields.items())]


def test_by_default_a_terminal_shows_the_progress_line_and_crashes_not_a_line_a_job(
    tmp_path: Path,
) -> None:
    jobs = write_job_file(tmp_path, ["fib 20", "sleep 0.2"] * 10)
    events_path = tmp_path / "e.jsonl"
    terminal = Terminal(["run", "--workers", "2", "--jobs", str(jobs), "--crash-rate", "0.2",
                         "--seed", "4", "--events", str(events_path)])
    assert terminal.finish() == 0
    events = read_events(events_path)
    crashes = shown(terminal, events, ev.WORKER_EXITED, crash=True)
    assert crashes and all(crashes), "each crash is shown"
    assert all(shown(terminal, events, ev.SUMMARY))
    for per_job in (ev.JOB_SENT, ev.JOB_DONE, ev.JOB_RESENT, ev.SIMULATED_CRASH):
        assert not any(shown(terminal, events, per_job)), per_job
    [summary] = [e for e in events if e["event"] == ev.SUMMARY]
    final = terminal.last_frame()["all"]
    assert (final["done"], final["of"], final["crashes"]) == (
        "20", "20", str(summary["crashes"]))
    assert not {"running", "queued"} & set(final)
    assert not any(figure.startswith("ETA") for figure in final)


def test_without_an_events_file_no_job_line_reaches_the_terminal_unless_verbose(
    tmp_path: Path,
) -> None:
    # Here the per-job events reach the view without `logging` (log.job_event): the view
    # still counts every job, and prints none of them unless asked.
    jobs = write_job_file(tmp_path, ["sleep 0"] * 200)
    results = tmp_path / "r.jsonl"
    for verbose in (False, True):
        terminal = Terminal(["run", "--workers", "2", "--jobs", str(jobs), "--results",
                             str(results), *(["-v"] if verbose else [])])
        assert terminal.finish() == 0
        records = read_results(results)
        assert_exactly_once(records, range(1, 201))
        dealer_lines = [line for line in terminal.lines() if line.startswith("[Dealer]")]
        final = terminal.last_frame()["all"]
        assert (final["done"], final["of"]) == ("200", "200")
        if verbose:  # a job's sending, its start and its result
            assert len(dealer_lines) >= 3 * 200
        else:
            assert dealer_lines == []


def test_verbose_and_the_demo_show_every_line_above_the_progress_line(tmp_path: Path) -> None:
    events_path = tmp_path / "e.jsonl"
    terminal = Terminal(["run", "--demo", "--events", str(events_path)])
    assert terminal.finish() == 0
    events = read_events(events_path)
    for name in (ev.JOB_SENT, ev.JOB_DONE, ev.SIMULATED_CRASH, ev.JOB_RESENT, ev.SUMMARY):
        lines = shown(terminal, events, name)
        assert lines and all(lines), f"the demo's log shows every {name} line"
    assert not any(shown(terminal, events, ev.JOB_STARTED)), "ACKs are -v's"
    assert terminal.last_frame()["all"]["done"] == "12"
    jobs = write_job_file(tmp_path, ["fib 5"] * 5)
    terminal = Terminal(["run", "--workers", "2", "--jobs", str(jobs), "-v", "--events",
                         str(events_path)])
    assert terminal.finish() == 0
    events = read_events(events_path)
    for name in (ev.JOB_SENT, ev.JOB_DONE, ev.WORKER_STARTED):
        lines = shown(terminal, events, name)
        assert lines and all(lines), name


def test_with_a_log_file_the_file_gets_every_line_and_the_terminal_the_progress_line(
    tmp_path: Path,
) -> None:
    jobs = write_job_file(tmp_path, ["fib 5"] * 30)
    log, events_path = tmp_path / "run.log", tmp_path / "e.jsonl"
    terminal = Terminal(["run", "--workers", "2", "--jobs", str(jobs), "--log", str(log),
                         "--events", str(events_path)])
    assert terminal.finish() == 0
    events = read_events(events_path)
    in_the_file = set(log.read_text().splitlines())
    done = [e for e in events if e["event"] == ev.JOB_DONE]
    assert len(done) == 30 and all(e["text"] in in_the_file for e in done)
    assert not any(shown(terminal, events, ev.JOB_DONE))
    assert all(shown(terminal, events, ev.SUMMARY))
    assert terminal.last_frame()["all"]["done"] == "30"


def test_quiet_shows_the_errors_and_the_summary_only(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["crash", "fib 5", "fib 6"])
    events_path = tmp_path / "e.jsonl"
    args = ["run", "--workers", "2", "--jobs", str(jobs), "--max-attempts", "1", "-q",
            "--events", str(events_path)]
    terminal = Terminal(args)
    assert terminal.finish() == 1
    events = read_events(events_path)
    [summary] = [e for e in events if e["event"] == ev.SUMMARY]
    assert terminal.lines() == [summary["text"]], "no progress line, no crash, no failure"
    assert "\x1b[" not in terminal.text
    # Not on a terminal: the same.
    piped = subprocess.run([sys.executable, "-m", "taskpool", *args[:-2]], cwd=ROOT,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=120)
    assert piped.returncode == 1
    assert len(piped.stderr.splitlines()) == 1 and piped.stderr.startswith("[Main] Summary: ")


def test_into_a_pipe_the_log_is_the_whole_plain_log(tmp_path: Path) -> None:
    events_path = tmp_path / "e.jsonl"
    proc = subprocess.run([sys.executable, "-m", "taskpool", "run", "--workers", "2",
                           "--events", str(events_path)], cwd=ROOT, input="fib 10\nfib 11\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "\x1b[" not in proc.stderr
    lines = proc.stderr.splitlines()
    for e in read_events(events_path):
        if e["level"] == "info":
            assert e["text"] in lines, e


def test_failed_jobs_are_counted_apart_from_done_ones(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["crash", "fib 5", "crash", "fib 6", "fib 7"])
    events_path = tmp_path / "e.jsonl"
    terminal = Terminal(["run", "--workers", "2", "--jobs", str(jobs), "--max-attempts", "2",
                         "--events", str(events_path)])
    assert terminal.finish() == 1
    events = read_events(events_path)
    failures = shown(terminal, events, ev.JOB_FAILED)
    assert len(failures) == 2 and all(failures), "each failure is shown"
    final = terminal.last_frame()["all"]
    assert (final["done"], final["failed"], final["of"]) == ("3", "2", "5")


def test_dispatch_draws_a_row_per_pool(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["1 0.05", "2 0.05", "2 0.05", "1 0.05", "2 0.05"])
    events_path = tmp_path / "e.jsonl"
    terminal = Terminal(["dispatch", "1", "2", "--jobs", str(jobs), "--events",
                         str(events_path)])
    assert terminal.finish() == 0
    rows = terminal.last_frame()
    assert list(rows) == ["type 1", "type 2", "all"]
    for e in read_events(events_path):
        if e["event"] == ev.POOL_SUMMARY:
            row = rows[f"type {e['type']}"]
            assert (row["done"], row["of"]) == (str(e["done"]), str(e["done"]))
    assert (rows["all"]["done"], rows["all"]["of"]) == ("5", "5")


def test_the_last_frame_after_ctrl_c_is_true_of_the_run_s_end(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 0.3"] * 40)
    events_path = tmp_path / "e.jsonl"
    terminal = Terminal(["run", "--workers", "2", "--jobs", str(jobs), "--events",
                         str(events_path)])
    try:
        terminal.read_until(rb"[1-9]\d*/40 done")  # drawn, and a job done
    finally:
        os.killpg(terminal.proc.pid, signal.SIGINT)  # Ctrl-C: to the terminal's group
    assert terminal.finish() == 130
    events = read_events(events_path)
    assert all(shown(terminal, events, ev.INTERRUPTED))
    [summary] = [e for e in events if e["event"] == ev.SUMMARY]
    assert summary["not_done"] > 0
    final = terminal.last_frame()["all"]
    assert final["done"] == str(summary["done"])
    assert final["not done"] == str(summary["not_done"])
    assert not {"running", "queued"} & set(final)
    assert not any(figure.startswith("ETA") for figure in final)
    assert "interrupted by SIGINT" in final
    assert not any("signal 15" in line for line in terminal.lines())


@pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                    reason="needs the dask extra")
def test_on_the_dask_engine_the_progress_line_shows_running_jobs(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 0.3"] * 12)
    terminal = Terminal(["run", "--engine", "dask", "--workers", "2", "--jobs", str(jobs)],
                        env={"TMPDIR": str(tmp_path)})
    assert terminal.finish() == 0
    running = [int(m) for m in re.findall(r"· (\d+) running", ANSI.sub("", terminal.text))]
    assert running and max(running) > 0
    assert terminal.last_frame()["all"]["done"] == "12"


# --- the view's counts, fed events directly (no process) ---------------------------------

def _rows(view: LiveView) -> list[str]:
    return [ANSI.sub("", row) for row in view.render()]


def test_the_view_counts_what_the_events_say() -> None:
    view = LiveView(Shown.WATCHED, logging.INFO, None, pools={1: "type 1", 2: "type 2"})
    view.set_jobs(4, 4)
    view.set_pool_totals(Counter({1: 2, 2: 2}))
    for job, worker, pool in [(1, 101, 1), (2, 101, 1), (3, 201, 2), (4, 202, 2)]:
        view.on_event({"event": ev.JOB_SENT, "job": job, "worker": worker, "type": pool})
    # Job 2, queued behind job 1 on worker 101, moves to a new worker 102 of its pool.
    view.on_event({"event": ev.JOB_SENT, "job": 2, "worker": 102, "type": 1})
    # Outcomes, as main's Recorder records them: the counts are the results file's.
    recorded: set[int] = set()
    view.recorded = recorded.__contains__
    view.on_outcomes([JobRecord.of(Job(3, JobKind.SLEEP, 0.0, pool=2), Status.DONE),
                      JobRecord.of(Job(4, JobKind.SLEEP, 0.0, pool=2), Status.FAILED)])
    recorded |= {3, 4}
    view.on_event({"event": ev.JOB_SENT, "job": 4, "worker": 203, "type": 2})  # late: no hold
    rows = _rows(view)
    assert "type 1" in rows[0] and "0/2 done · 2 running · 0 queued" in rows[0]
    assert "type 2" in rows[1] and "1/2 done · 1 failed · 0 running · 0 queued" in rows[1]
    assert "1/4 done · 1 failed · 2 running · 0 queued" in rows[2]
    # A worker's death frees what it held; Ctrl-C, then the end: nothing left running.
    view.on_event({"event": ev.WORKER_EXITED, "worker": 101, "crash": True})
    view.on_event({"event": ev.INTERRUPTED, "signal": "SIGINT"})
    assert "1 running · 1 not started" in _rows(view)[2]
    assert "stopping on SIGINT" in _rows(view)[2]
    view.ended = True
    last = _rows(view)[2]
    assert "1/4 done · 1 failed · 2 not done · 1 crashes" in last
    assert "running" not in last and "ETA" not in last and "interrupted by SIGINT" in last


def test_results_to_the_terminal_leave_out_the_progress_line_not_the_watched_lines(
    tmp_path: Path,
) -> None:
    # `--results -` on the terminal too: no redrawn line to tear the results apart; stderr
    # still shows what a person watches (here the summary), not a line a job.
    jobs = write_job_file(tmp_path, ["fib 5"] * 10)
    terminal = Terminal(["run", "--workers", "2", "--jobs", str(jobs), "--results", "-"])
    assert terminal.finish() == 0
    assert "\x1b[" not in terminal.text
    lines = terminal.lines()
    assert sum(line.startswith('{"job":') for line in lines) == 10
    logged = [line for line in lines if line.startswith("[")]
    assert logged and all(line.startswith("[Main] ") for line in logged), logged
