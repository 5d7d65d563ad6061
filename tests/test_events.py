"""Events as data (--events), the timeline report, the exit table and the live view."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from taskpool.observe import events as ev

from harness import ROOT, PoolRun


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The demo (12 jobs, 5 crashes), with its events file and its text log."""
    tmp = tmp_path_factory.mktemp("demo")
    events = tmp / "run.jsonl"
    run = PoolRun(["--demo"], events=events)
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


def _event_names_the_tests_use() -> set[str]:
    """Every event name a test file names: `ev.X`, a name given to wait_for_event,
    events_named or one_event, and a string compared with an event's "event" field."""
    names: set[str] = set()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "ev" and node.attr != "NAMES":
                value = getattr(ev, node.attr, None)
                assert isinstance(value, str), f"{path.name}:{node.lineno}: ev.{node.attr}"
                names.add(value)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("wait_for_event", "events_named", "one_event") \
                    and node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(side, ast.Subscript) and isinstance(side.slice, ast.Constant)
                       and side.slice.value == "event" for side in sides):
                    for side in sides:
                        for item in (side.elts if isinstance(side, (ast.Tuple, ast.Set,
                                                                    ast.List)) else [side]):
                            if isinstance(item, ast.Constant) and isinstance(item.value, str):
                                names.add(item.value)
    return names


def test_every_event_name_a_test_waits_on_or_a_run_writes_is_in_the_vocabulary(
    demo_run: tuple[Path, list[str]],
) -> None:
    """A test waiting on a name no role emits would only time out; a role emitting a name
    of its own would be missed by the live view, the report and the tests. The demo: a
    crashing run (--crash-rate 0.3, a seed)."""
    used = _event_names_the_tests_use()
    assert len(used) >= 20, sorted(used)  # the scan sees the tests' names
    assert used - ev.NAMES == set()
    written = {e["event"] for e in read_events(demo_run[0])}
    assert written - ev.NAMES == set()
    assert {ev.JOB_DONE, ev.JOB_RESENT, ev.WORKER_EXITED, ev.SUMMARY} <= written
