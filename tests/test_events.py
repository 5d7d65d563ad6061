"""Events as data (--events), the timeline report, the exit table and the live view."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from harness import ROOT, PoolRun


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The demo (12 jobs, 5 crashes), with its events file and its text log."""
    tmp = tmp_path_factory.mktemp("demo")
    events = tmp / "run.jsonl"
    run = PoolRun(["--demo", "--events", str(events)])
    assert run.finish() == 0
    return events, run.log_text().splitlines()


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_log_line_is_an_event_and_acks_are_recorded_too(
    demo_run: tuple[Path, list[str]],
) -> None:
    path, log_lines = demo_run
    events = read_events(path)
    shown = [e["text"] for e in events if e["level"] != "debug"]
    assert Counter(shown) == Counter(log_lines), "one source: the same lines, nothing else"
    assert all({"t", "event", "role", "pid"} <= set(e) for e in events)
    kinds = Counter(e["event"] for e in events)
    assert kinds["job_done"] == 12
    assert kinds["job_started"] >= 12, "ACKs are events even without --verbose"
    summary = next(e for e in events if e["event"] == "summary")
    assert kinds["job_resent"] == summary["resends"] and summary["crashes"] >= 3
    crashes = [e for e in events if e["event"] == "worker_exited" and e["crash"]]
    assert len(crashes) == summary["crashes"]
    for e in events:
        if e["event"] in ("job_sent", "job_started", "job_done", "job_resent"):
            assert isinstance(e["job"], int) and isinstance(e["worker"], int), e


def test_timestamps_are_one_monotonic_clock_across_processes(
    demo_run: tuple[Path, list[str]],
) -> None:
    events = read_events(demo_run[0])
    by_job: dict[int, dict[str, float]] = {}
    for e in events:
        if e["event"] in ("job_sent", "job_started", "job_done") and e.get("attempt", 1) == 1:
            by_job.setdefault(e["job"], {})[e["event"]] = e["t"]
    # Sent by the Dealer, ACKed by a worker, recorded by the Dealer: in that order in time,
    # which holds only if every process stamps with the same clock.
    for job, times in by_job.items():
        if len(times) == 3:
            assert times["job_sent"] <= times["job_started"] <= times["job_done"], job


def test_the_exit_table_is_in_the_log_and_in_the_events(
    demo_run: tuple[Path, list[str]],
) -> None:
    events = read_events(demo_run[0])
    [pool] = [e for e in events if e["event"] == "pool_summary"]
    summary = next(e for e in events if e["event"] == "summary")
    assert pool["done"] == 12 and pool["crashes"] == summary["crashes"]
    assert pool["restarts"] >= summary["crashes"] - 1
    [histogram] = [e for e in events if e["event"] == "attempts_histogram"]
    assert sum(histogram["attempts"].values()) == 12


def test_the_report_draws_every_attempt_crash_and_resend(
    demo_run: tuple[Path, list[str]], tmp_path: Path,
) -> None:
    events_path = demo_run[0]
    out = tmp_path / "run.html"
    proc = subprocess.run([sys.executable, "-m", "taskpool", "report", str(events_path),
                           "-o", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    events = read_events(events_path)
    summary = next(e for e in events if e["event"] == "summary")
    sent = sum(e["event"] == "job_sent" for e in events)
    # An attempt that never ran is not drawn: taken back, or still queued for a dead worker.
    never_ran = sum(e["event"] == "job_taken_back" or (e["event"] == "job_requeued"
                                                        and e["reason"] == "unstarted")
                    for e in events)
    assert page.count('class="attempt ') == sent - never_ran
    assert page.count('class="attempt done"') == 12
    assert page.count('class="crash"') == summary["crashes"]
    assert page.count('class="resend"') == summary["resends"]
    assert page.count('class="attempt crashed"') == summary["resends"]
    assert f"<b>{summary['crashes']}</b><span>crashes</span>" in page
    # Self-contained: nothing to fetch, no script.
    assert "<script" not in page and "src=" not in page
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"]


def test_report_of_a_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"t": 1, "event": "log"}\nnot json\n')
    proc = subprocess.run([sys.executable, "-m", "taskpool", "report", str(bad), "-o",
                           str(tmp_path / "o.html")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"taskpool: {bad}:2: not an event line\n"


def run_on_a_terminal(args: list[str]) -> tuple[int, bytes]:
    """Run taskpool with stderr on a pseudo-terminal, as in a real terminal."""
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="30")
    proc = subprocess.Popen([sys.executable, "-m", "taskpool", *args], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=60), out


def test_the_live_view_draws_on_a_terminal_and_the_log_scrolls_above(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("fib 20\nsleep 0.2\n" * 10)
    events = tmp_path / "e.jsonl"
    code, out = run_on_a_terminal(["run", "--workers", "2", "--jobs", str(jobs),
                                   "--crash-rate", "0.2", "--seed", "4",
                                   "--events", str(events)])
    assert code == 0
    text = out.decode("utf-8", "replace")
    assert "\x1b[" in text, "drawn with terminal control codes"
    final = re.findall(r"(\d+)/(\d+) done · (\d+) running · (\d+) queued · (\d+) crashes", text)
    assert final and final[-1][:2] == ("20", "20") and final[-1][2:4] == ("0", "0")
    assert re.search(r"\[Main\] Summary: 20 jobs, 20 done", text)
    assert "[Dealer] Received result for job 1:" in text
    crashes = int(final[-1][4])
    summary = next(e for e in read_events(events) if e["event"] == "summary")
    assert crashes == summary["crashes"] > 0


def test_quiet_or_a_pipe_gets_the_plain_log(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("fib 10\n")
    code, out = run_on_a_terminal(["run", "--workers", "2", "--quiet", "--jobs", str(jobs)])
    assert code == 0
    text = out.decode()
    assert "[Main] Summary: 1 jobs, 1 done" in text
    assert " done · " not in text and "\x1b[" not in text
    proc = subprocess.run([sys.executable, "-m", "taskpool", "run", "--workers", "2"],
                          cwd=ROOT, input="fib 10\n", capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    assert "\x1b[" not in proc.stderr and " done · " not in proc.stderr


def test_per_job_lines_read_the_same_with_the_text_log_alone_as_through_logging(
    tmp_path: Path,
) -> None:
    # With the text log alone, a per-job line is written without `logging` (log.job_event);
    # with an events file, through it. The two must give the same line.
    import logging

    from taskpool.observe import log as tplog

    def lines(events: bool, level: int = logging.INFO) -> tuple[str, list[dict[str, Any]]]:
        text, jsonl = tmp_path / f"text-{events}-{level}", tmp_path / f"events-{events}-{level}"
        fd = os.open(text, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        events_fd = os.open(jsonl, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if events else None
        try:
            tplog.setup(fd, level, events_fd)
            for role in ("dealer", "recovery", "worker"):
                tplog.job_event(logging.getLogger(f"taskpool.{role}"), "job_done",
                                "Received result for job %d: %s from worker PID [%d]%s", 7,
                                0.25, 4242, " (attempt 2)", job=7, worker=4242, at=1.5)
        finally:
            tplog.setup(None)
            for descriptor in filter(None, (fd, events_fd)):
                os.close(descriptor)
        return text.read_text(), read_events(jsonl) if events else []

    alone, _ = lines(events=False)
    through_logging, events = lines(events=True)
    assert alone == through_logging
    assert alone.splitlines() == [
        "[Dealer] Received result for job 7: 0.25 from worker PID [4242] (attempt 2)",
        "[Recovery] Received result for job 7: 0.25 from worker PID [4242] (attempt 2)",
        f"[Worker {os.getpid()}] Received result for job 7: 0.25 from worker PID [4242] "
        "(attempt 2)"]
    assert [(e["event"], e["job"], e["worker"], e["t"]) for e in events] == \
        [("job_done", 7, 4242, 1.5)] * 3
    assert lines(events=False, level=logging.WARNING)[0] == ""  # below the log's level
