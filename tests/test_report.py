"""`taskpool report`: the Trace Event file (`--format trace`) of a local and of a Dask run,
the HTML page of a run too large to draw bar by bar, and the events it refuses to draw."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from taskpool.observe import events as ev

from harness import ROOT, PoolRun, read_events, write_job_file

# The demo's crash plan on cheaper jobs: (seed 21, job id, attempt) decides, so the same
# five crashes as the demo's.
CRASHING = ["--workers", "2", "--crash-rate", "0.3", "--seed", "21", "--max-attempts", "0"]


def _report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskpool", "report", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("local")
    jobs = write_job_file(tmp, ["fib 15"] * 12)
    run = PoolRun([*CRASHING, "--jobs", str(jobs)], events=tmp / "run.jsonl")
    assert run.finish() == 0
    return tmp / "run.jsonl"


Track = tuple[int, int]


def check_trace(path: Path) -> dict[str, Any]:
    """The structure Perfetto and chrome://tracing need, checked; what it holds, counted:
    a named thread for every slice, slices that nest (none overlaps another of its thread),
    and every flow's start and end inside a slice of their own threads."""
    document = json.loads(path.read_text())
    events = document["traceEvents"]
    assert isinstance(events, list)
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e["ph"] == "M" and e["name"] == "thread_name"}
    processes = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    slices: dict[Track, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            assert (e["pid"], e["tid"]) in threads and e["pid"] in processes, e
            assert e["dur"] > 0 and e["ts"] >= 0
            slices[(e["pid"], e["tid"])].append(e)
    for track in slices.values():
        track.sort(key=lambda e: e["ts"])
        for before, after in zip(track, track[1:]):
            assert after["ts"] >= before["ts"] + before["dur"] - 1e-3, (before, after)
    flows: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for e in events:
        if e["ph"] in ("s", "f"):
            flows[e["id"]][e["ph"]] = e
    for pair in flows.values():
        assert set(pair) == {"s", "f"} and pair["f"]["bp"] == "e"
        cut, retry = (_enclosing(slices, pair[phase]) for phase in ("s", "f"))
        assert cut["args"]["job"] == retry["args"]["job"]
        assert cut["args"]["outcome"] == "crashed" and retry["ts"] >= cut["ts"]
    return {"threads": threads, "slices": [e for t in slices.values() for e in t],
            "deaths": [e for e in events if e["ph"] == "i"], "flows": flows}


def _enclosing(slices: dict[Track, list[dict[str, Any]]], flow: dict[str, Any]) -> Any:
    [enclosing] = [e for e in slices[(flow["pid"], flow["tid"])]
                   if e["ts"] <= flow["ts"] <= e["ts"] + e["dur"]]
    return enclosing


def test_the_trace_of_a_run_has_a_track_per_worker_a_slice_per_attempt_and_flows(
        local_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.trace.json"
    proc = _report("--format", "trace", str(local_run), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    trace = check_trace(out)
    events = read_events(local_run)
    summary = next(e for e in events if e["event"] == ev.SUMMARY)
    workers = {e["pid"] for e in events if e["event"] == ev.WORKER_STARTED}
    assert {tid for _, tid in trace["threads"]} == workers  # one track per worker process
    assert set(trace["threads"].values()) == {f"worker {pid}" for pid in workers}
    outcomes = [e["args"]["outcome"] for e in trace["slices"]]
    assert outcomes.count("done") == 12
    assert outcomes.count("crashed") == summary["resends"] == 5
    assert len(trace["deaths"]) == summary["crashes"]
    assert len(trace["flows"]) == summary["resends"]


def test_the_default_output_follows_the_format(local_run: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "taskpool", "report", "--format", "trace",
                           str(local_run)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run.trace.json").read_text())["traceEvents"]


def test_the_trace_and_the_page_of_a_dask_run_place_each_attempt_on_its_worker(
        tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    jobs = write_job_file(tmp_path, ["fib 15"] * 12)
    events_path = tmp_path / "run.jsonl"
    run = PoolRun(["--engine", "dask", *CRASHING, "--jobs", str(jobs)], events=events_path)
    assert run.finish() == 0
    out = tmp_path / "run.trace.json"
    assert _report("--format", "trace", str(events_path), "-o", str(out)).returncode == 0
    trace = check_trace(out)
    events = read_events(events_path)
    summary = next(e for e in events if e["event"] == ev.SUMMARY)
    pids = {e["worker"] for e in events if e["event"] in (ev.JOB_STARTED, ev.JOB_DONE)}
    assert {tid for _, tid in trace["threads"]} >= pids and None not in pids
    done = {e["args"]["job"] for e in trace["slices"] if e["args"]["outcome"] == "done"}
    assert done == set(range(1, 13))
    assert len(trace["deaths"]) == summary["crashes"] > 0
    assert len(trace["flows"]) == summary["resends"]
    page_path = tmp_path / "run.html"
    proc = _report(str(events_path), "-o", str(page_path))
    assert proc.returncode == 0, proc.stderr
    page = page_path.read_text()
    assert page.count('class="attempt done"') == 12
    assert page.count('class="crash"') == summary["crashes"]
    assert "None" not in page


def _large_run_events(path: Path, jobs: int, workers: int, crash_every: int) -> int:
    """The events of a local run of `jobs` jobs on `workers` workers, in which the job of
    every `crash_every`-th attempt kills its worker and is resent; the crash count."""
    lines: list[dict[str, Any]] = []
    t = 1000.0
    alive = list(range(100, 100 + workers))
    next_pid = 100 + workers
    crashes = 0
    lines += [{"t": t, "event": ev.WORKER_STARTED, "pid": pid} for pid in alive]
    for job in range(1, jobs + 1):
        slot = job % workers
        pid = alive[slot]
        lines.append({"t": t, "event": ev.JOB_SENT, "job": job, "worker": pid, "attempt": 1,
                      "kind": "fib", "arg": 10})
        lines.append({"t": t + 1e-4, "event": ev.JOB_STARTED, "job": job, "worker": pid})
        attempt = 1
        if job % crash_every == 0:
            crashes += 1
            lines.append({"t": t + 2e-4, "event": ev.WORKER_EXITED, "worker": pid,
                          "crash": True, "reason": "killed by signal 11 (SIGSEGV)"})
            lines.append({"t": t + 3e-4, "event": ev.JOB_RESENT, "job": job, "worker": pid})
            alive[slot], next_pid, attempt = next_pid, next_pid + 1, 2
            pid = alive[slot]
            lines.append({"t": t + 3e-4, "event": ev.WORKER_STARTED, "pid": pid})
            lines.append({"t": t + 4e-4, "event": ev.JOB_SENT, "job": job, "worker": pid,
                          "attempt": 2, "kind": "fib", "arg": 10})
        lines.append({"t": t + 5e-4, "event": ev.JOB_DONE, "job": job, "worker": pid,
                      "attempt": attempt})
        t += 0.001 / workers * (1 + job % 3)
    lines.append({"t": t, "event": ev.SUMMARY, "jobs": jobs, "done": jobs, "failed": 0,
                  "not_done": 0, "crashes": crashes, "resends": crashes, "wall_time": t - 1000})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return crashes


def test_the_page_of_a_20000_job_run_is_aggregated_and_stays_small(tmp_path: Path) -> None:
    events_path = tmp_path / "big.jsonl"
    crashes = _large_run_events(events_path, jobs=20_000, workers=8, crash_every=97)
    page_path = tmp_path / "big.html"
    proc = _report(str(events_path), "-o", str(page_path))
    assert proc.returncode == 0, proc.stderr
    page = page_path.read_text()
    assert len(page.encode()) < 1_000_000, len(page)
    assert 'class="attempt ' not in page  # no bar per attempt: columns instead
    assert "20,206 attempts are too many to draw one by one" in page
    lanes = page.count('class="lane"')
    assert lanes == 8
    died = [int(n) for n in re.findall(r"<title>(\d+) workers died</title>", page)]
    assert sum(died) == crashes
    cut = [int(n) for n in re.findall(r"<title>(\d+) attempts cut by a crash</title>", page)]
    assert sum(cut) == crashes
    done = [int(n) for n in re.findall(r", (\d+) attempts done</title>", page)]
    assert sum(done) == 20_000
    out = tmp_path / "big.trace.json"
    assert _report("--format", "trace", str(events_path), "-o", str(out)).returncode == 0
    trace = check_trace(out)
    assert len(trace["slices"]) == 20_000 + crashes
    assert len(trace["flows"]) == crashes


@pytest.mark.parametrize("form", ["html", "trace"])
def test_events_with_no_attempt_are_refused_not_drawn_empty(tmp_path: Path, form: str) -> None:
    events_path = tmp_path / "run.jsonl"
    events_path.write_text('{"t": 1, "event": "dealer_started"}\n'
                           '{"t": 2, "event": "summary", "jobs": 0}\n')
    proc = _report("--format", form, str(events_path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr == (f"taskpool: {events_path}: no job ran in this run: there is no "
                           "attempt to draw\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("line", "says"), [
    ('{"t": 2, "event": "job_sent", "worker": 7}', "2: a job_sent event without its 'job' field"),
    ('{"t": 2, "event": "job_sent", "job": 1, "worker": 7, "attempt": "x"}',
     "2: a job_sent event with a field of the wrong type"),
    ('{"t": "soon", "event": "job_sent"}', "2: not an event line"),
])
def test_an_event_that_cannot_be_read_is_named_by_its_line(
        tmp_path: Path, line: str, says: str) -> None:
    events_path = tmp_path / "run.jsonl"
    events_path.write_text('{"t": 1, "event": "worker_started", "pid": 7}\n' + line + "\n")
    proc = _report(str(events_path), "-o", str(tmp_path / "out.html"))
    assert proc.returncode == 2
    assert proc.stderr == f"taskpool: {events_path}:{says}\n"
    assert not (tmp_path / "out.html").exists()
