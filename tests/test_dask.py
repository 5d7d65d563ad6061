"""The Dask engine (`taskpool run --engine dask`): the same jobs, results and guarantees as
the local pool, on a LocalCluster that taskpool starts (2 one-thread workers unless a test
needs more), or on an existing scheduler.

Every test runs taskpool with a TMPDIR of its own, and checks that the run left nothing in
it (distributed's scratch space is where a Dask run would leave files behind)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskpool.model.pools import PoolSpec
from taskpool.observe import events as ev

from harness import (
    ROOT,
    WAIT,
    PoolRun,
    assert_done_right,
    assert_exactly_once,
    await_exit,
    kill_quietly,
    read_results,
    write_job_file,
)

pytest.importorskip("distributed")

DASK = ["--engine", "dask"]


def _descendants(pid: int) -> set[int]:
    """Every process under `pid` (the LocalCluster's worker processes are main's children)."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = {int(child) for child in f.read().split()}
            except OSError:
                continue
            pending += list(children - found)
            found |= children
    return found


def _by_job(records: list[dict[str, Any]]) -> dict[int, tuple[str, Any]]:
    return {r["job"]: (r["status"], r["result"]) for r in records}


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _dask_engine_events(run: PoolRun) -> list[dict[str, Any]]:
    """What the Dask engine's client side said (its cluster, its jobs): nothing, when the
    run ended before it started."""
    return [e for e in _events(run.events_path) if e["role"] == "Dask"] \
        if run.events_path is not None else []


@pytest.fixture(autouse=True)
def temporary_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The TMPDIR of the test's runs, empty at the end: a run's scratch space is removed
    whether it ends normally, on a usage error, or on Ctrl-C or SIGTERM."""
    scratch = tmp_path / "TMPDIR"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    yield scratch
    left = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))
    assert left == [], f"left in TMPDIR: {left}"


# --- set-up and bad input -------------------------------------------------------------------

def test_without_the_dask_extra_it_says_how_to_install_it_and_exits_2(tmp_path: Path) -> None:
    # A package named distributed that cannot be imported stands in for a missing extra.
    fake = tmp_path / "site" / "distributed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'distributed'\")\n")
    jobs = write_job_file(tmp_path, ["fib 10"])
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    done = subprocess.run([sys.executable, "-m", "taskpool", "run", *DASK, "--jobs", str(jobs)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 2
    assert done.stderr.startswith(
        "taskpool: --engine dask needs the dask extra: pip install 'taskpool[dask]'"), done.stderr
    assert "Traceback" not in done.stderr
    # The local engine never imports distributed: it runs as before.
    local = subprocess.run([sys.executable, "-m", "taskpool", "run", "--workers", "1", "--jobs",
                            str(jobs)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=WAIT)
    assert local.returncode == 0, local.stderr


def test_bad_input_is_reported_by_line_before_any_cluster_starts(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 10", "fib x", "sleep -1"])
    run = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs)], events=tmp_path / "e.jsonl")
    assert run.finish() == 2
    log = run.log_text()
    assert f"taskpool: {jobs}:2: fib argument 'x' is not an integer" in log
    assert f"taskpool: {jobs}:3: sleep argument -1 must be a finite number >= 0" in log
    assert not _dask_engine_events(run) and "Traceback" not in log


@pytest.mark.parametrize("flag", [["--preempt"], ["--max-memory", "100"], ["--heartbeat", "5"],
                                  ["--inject-fault", "1:hang"]])
def test_local_engine_options_are_usage_errors_with_dask(tmp_path: Path, flag: list[str]) -> None:
    jobs = write_job_file(tmp_path, ["fib 10"])
    run = PoolRun([*DASK, "--workers", "1", "--jobs", str(jobs), *flag],
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 2
    assert "--engine dask" in run.log_text() and not _dask_engine_events(run)


# --- same results as the local pool ----------------------------------------------------------

def test_the_demo_gives_the_same_results_on_both_engines(tmp_path: Path) -> None:
    local_results, dask_results = tmp_path / "local.jsonl", tmp_path / "dask.jsonl"
    local = PoolRun(["--demo", "--results", str(local_results)])
    assert local.finish() == 0
    run = PoolRun([*DASK, "--demo", "--results", str(dask_results)],
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    records = read_results(dask_results)
    assert_exactly_once(records, range(1, 13))
    assert_done_right(records)
    assert _by_job(records) == _by_job(read_results(local_results))
    # A crash is a function of (seed, job, attempt), and both engines count attempts alike
    # (a job waiting in a dead worker's queue is not charged): the same attempts per job.
    assert {r["job"]: r["attempts"] for r in records} == \
        {r["job"]: r["attempts"] for r in read_results(local_results)}
    # The demo's simulated crashes happen in Dask workers too, and are recovered.
    crashes = run.events_named(ev.WORKER_EXITED, reason="killed by signal 11 (SIGSEGV)")
    assert crashes, run.log_text()
    assert any(r["attempts"] > 1 for r in records)
    assert all(r["worker"] in _pids_seen(run) for r in records)
    summary = run.one_event(ev.SUMMARY)
    assert {k: summary[k] for k in ("jobs", "done", "failed", "not_done")} == {
        "jobs": 12, "done": 12, "failed": 0, "not_done": 0}, summary


def _pids_seen(run: PoolRun) -> set[int]:
    return {e["worker"] for e in run.events_named(ev.JOB_DONE)}


def test_seed_000_typed_example_runs_each_job_on_a_worker_of_its_type(tmp_path: Path) -> None:
    # Seed 000's `dispatch 1 3 1 1 1` example, durations scaled by 1/10, three rounds.
    lines = ["1 0.5", "2 0.3", "3 0.7", "4 0.2", "5 0.4"] * 3
    stdin = ("\n".join(lines) + "\n").encode()
    local_results, dask_results = tmp_path / "local.jsonl", tmp_path / "dask.jsonl"
    local = PoolRun(["1", "3", "1", "1", "1", "--results", str(local_results)], stdin=stdin,
                    command_name="dispatch")
    assert local.finish() == 0
    events = tmp_path / "events.jsonl"
    run = PoolRun(["1", "3", "1", "1", "1", *DASK, "--results", str(dask_results)],
                  stdin=stdin, command_name="dispatch", events=events)
    assert run.finish() == 0
    records = read_results(dask_results)
    assert_exactly_once(records, range(1, 16))
    assert_done_right(records)
    assert {r["job"]: (r["type"], r["status"], r["result"]) for r in records} == \
        {r["job"]: (r["type"], r["status"], r["result"]) for r in read_results(local_results)}
    # Each job ran on a worker that offers its type's resource (as the worker itself says).
    started = [e for e in _events(events) if e["event"] == "job_started"]
    assert len(started) == 15
    job_type = {r["job"]: r["type"] for r in records}
    for e in started:
        assert e["worker_resources"] == {f"type{job_type[e['job']]}": 1}, e
    # Type 2 has three workers: its jobs spread over more than one.
    assert len({e["worker"] for e in started if job_type[e["job"]] == 2}) > 1
    [sent] = run.events_named(ev.JOB_SENT, job=3)
    assert (sent["role"], sent["type"], sent["arg"]) == ("Dask", 3, 0.7)


def test_priorities_order_the_jobs_waiting_for_a_worker(tmp_path: Path) -> None:
    run = PoolRun([*DASK, "--workers", "1", "--verbose"], pipe_stdin=True,
                  events=tmp_path / "e.jsonl")
    run.send_line("sleep 1.0")
    run.wait_for_event(ev.JOB_STARTED, job=1)
    # Queued behind job 1, in this order: priorities 0, 3, 9, 5.
    for line in ["sleep 0", "sleep 0 priority=3", "sleep 0 priority=9", "sleep 0 priority=5"]:
        run.send_line(line)
    run.wait_for_event(ev.JOB_SENT, job=5)
    run.close_stdin()
    assert run.finish() == 0
    order = [e["job"] for e in run.events_named(ev.JOB_STARTED)]
    assert order == [1, 4, 5, 3, 2], run.log_text()


# --- exactly once across worker deaths ---------------------------------------------------------

def test_a_cluster_worker_killed_mid_job_reruns_it_and_records_it_once(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 32"] * 8)
    results = tmp_path / "r.jsonl"
    run = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--verbose"], events=tmp_path / "e.jsonl")
    [started] = run.wait_for_event(ev.JOB_STARTED)
    job, victim = started["job"], started["worker"]
    workers = _descendants(run.pid)
    assert victim in workers, "the job runs in a worker process of the LocalCluster"
    kill_quietly(victim)
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 9))
    assert_done_right(records)
    attempts = {r["job"]: r["attempts"] for r in records}
    assert attempts[job] == 2
    # Jobs that only waited in the dead worker's queue are sent again, not charged.
    assert all(n == 1 for j, n in attempts.items() if j != job), attempts
    assert run.events_named(ev.WORKER_EXITED, worker=victim,
                            reason="killed by signal 9 (SIGKILL)")
    assert run.events_named(ev.JOB_RESENT, job=job, worker=victim)
    assert victim not in {r["worker"] for r in records if r["job"] == job}
    summary = run.one_event(ev.SUMMARY)
    assert (summary["crashes"], summary["resends"]) == (1, 1)


# --- a worker's death, judged: the main loop's own methods on a stand-in cluster --------------
#
# Which tries a death charges is decided from what the start pipe and the client said, in an
# order no real cluster can be made to keep; so these tests hand the engine those messages
# themselves: the start records, as a worker writes them, on the engine's real start pipe, and
# the futures' outcomes, as the client's loop thread posts them.

class _StandInFuture:
    def __init__(self, key: str) -> None:
        self.key = key
        self.status = "pending"
        self.error: BaseException | None = None

    def add_done_callback(self, callback: Any) -> None:
        pass  # the test posts ("done", key) itself

    def exception(self) -> BaseException | None:
        return self.error

    def release(self) -> None:
        pass


class _StandInClient:
    """Takes submissions, runs nothing: `sent` is each (job, attempt) submitted."""

    def __init__(self) -> None:
        self.futures: dict[int, _StandInFuture] = {}  # the latest try of each job
        self.sent: list[tuple[int, int]] = []

    def map(self, fn: Any, job_ids: list[int], kinds: list[int], args: list[Any],
            attempts: list[int], keys: list[str], works: list[Any],
            **kwargs: Any) -> list[_StandInFuture]:
        for job_id, attempt, key in zip(job_ids, attempts, keys):
            self.futures[job_id] = _StandInFuture(key)
            self.sent.append((job_id, attempt))
        return [self.futures[job_id] for job_id in job_ids]

    def cancel(self, futures: Any) -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


class _OwnCluster:
    """A DaskEngine as on its own cluster (start pipe, allowed-failures 0), on a stand-in
    client; `step()` is one turn of its loop: the start pipe, then the inbox."""

    def __init__(self, jobs: list[str]) -> None:
        from taskpool.core.engine import RunConfig
        from taskpool.core.stdin import GeneratorInput
        from taskpool.dask.engine import DaskEngine
        from taskpool.model.faults import CrashPlan
        from taskpool.model.jobs import Job, JobKind
        from taskpool.model.policy import SupervisionPolicy
        from taskpool.model.pools import PoolLayout

        layout = PoolLayout.single(2)
        source = [Job(i, JobKind.FIB, int(line.split()[1]))
                  for i, line in enumerate(jobs, start=1)]
        config = RunConfig(PoolSpec(layout, CrashPlan(), SupervisionPolicy(max_attempts=0)),
                           GeneratorInput(source, layout), results=None,
                           report_error=lambda message: None)
        self.engine = DaskEngine(config)
        self.client = _StandInClient()
        self.engine.client = self.client  # type: ignore[assignment]
        for job in source:
            self.engine._submit(job, attempt=1)
        self.engine._send_unsent()

    def started(self, job: int, pid: int) -> None:
        """The worker process `pid` starts the latest try of `job` (dask_worker.run_job)."""
        key = self.client.futures[job].key
        attempt = [a for j, a in self.client.sent if j == job][-1]
        record = {"job": job, "attempt": attempt, "key": key, "pid": pid,
                  "address": _address(pid), "name": "type1-1", "nthreads": 1, "resources": {}}
        os.write(self.engine.start_w, json.dumps(record).encode() + b"\n")

    def result_lost(self, job: int) -> None:
        """The result of `job`'s try died with its worker; Dask computes it again."""
        future = self.client.futures[job]
        future.status = "lost"
        self.engine.post(("done", future.key))

    def killed(self, pid: int, jobs: list[int]) -> None:
        """The worker process `pid` died, and the scheduler erred the tries of `jobs` that it
        held (as processing) with KilledWorker."""
        from types import SimpleNamespace

        from distributed.scheduler import KilledWorker

        dead = SimpleNamespace(address=_address(pid), pid=pid)  # as the scheduler's ws.clean()
        for job in jobs:
            future = self.client.futures[job]
            future.status = "error"
            future.error = KilledWorker(future.key, dead, 0)  # type: ignore[arg-type]
            self.engine.post(("done", future.key))
        self.engine.post(("worker_exited", pid, "killed by signal 11 (SIGSEGV)"))

    def step(self) -> None:
        self.engine.read_ready([])

    def close(self) -> None:
        self.engine._close()


def _address(pid: int) -> str:
    return f"tcp://127.0.0.1:{40000 + pid}"


@pytest.fixture
def own_cluster() -> Iterator[Callable[[list[str]], _OwnCluster]]:
    made: list[_OwnCluster] = []

    def make(jobs: list[str]) -> _OwnCluster:
        made.append(_OwnCluster(jobs))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()


def test_a_job_done_whose_report_died_with_its_worker_is_sent_again_uncharged(
        own_cluster: Callable[[list[str]], _OwnCluster]) -> None:
    # A one-thread worker ends job 1 and goes straight on to job 2, which kills it at once:
    # its report of job 1 has not left the process yet, and the scheduler errs with
    # KilledWorker every try it gave that worker. Only job 2 ran there: job 1 had
    # completed, and job 3 only waited in its queue.
    cluster = own_cluster(["fib 32", "fib 33", "fib 34"])
    cluster.started(1, pid=101)
    cluster.started(2, pid=101)
    cluster.killed(101, [1, 2, 3])
    cluster.step()
    assert cluster.client.sent[3:] == [(1, 1), (2, 2), (3, 1)]
    assert cluster.engine.supervisor.counts.resends == 1


def test_a_job_whose_run_again_waited_on_a_dying_worker_is_sent_again_uncharged(
        own_cluster: Callable[[list[str]], _OwnCluster]) -> None:
    # Job 1 is done on worker 101, and its result lost with it before we fetched it; Dask
    # computes it again, queued on worker 102 behind job 2, which kills 102: both err.
    # Only job 2 ran there; job 1 had started once, elsewhere, and completed.
    cluster = own_cluster(["fib 32", "fib 33"])
    cluster.started(1, pid=101)
    cluster.started(2, pid=102)
    cluster.killed(101, [])
    cluster.result_lost(1)
    cluster.step()
    cluster.killed(102, [1, 2])
    cluster.step()
    assert cluster.client.sent[2:] == [(1, 1), (2, 2)]
    assert cluster.engine.supervisor.counts.resends == 1


def test_a_job_that_kills_its_workers_fails_after_max_attempts(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["crash", "fib 20"])
    results = tmp_path / "r.jsonl"
    run = PoolRun([*DASK, "--workers", "1", "--jobs", str(jobs), "--results", str(results),
                   "--max-attempts", "2"], events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    by_job = {r["job"]: r for r in read_results(results)}
    assert by_job[1]["status"] == "failed" and by_job[1]["attempts"] == 2
    assert by_job[1]["reason"] == "killed by signal 11 (SIGSEGV) on 2 attempts"
    assert by_job[2]["status"] == "done" and by_job[2]["result"] == 6765
    failed = run.one_event(ev.JOB_FAILED)
    assert (failed["job"], failed["attempts"], failed["reason"]) == (
        1, 2, "killed by signal 11 (SIGSEGV)")


def test_a_job_past_its_timeout_has_its_worker_killed_and_is_charged(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 30 timeout=0.5", "sleep 0.1"])
    results = tmp_path / "r.jsonl"
    run = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-attempts", "2"], events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    by_job = {r["job"]: r for r in read_results(results)}
    assert by_job[1]["status"] == "failed" and by_job[1]["attempts"] == 2
    assert by_job[1]["reason"] == "ran job 1 past its timeout of 0.5 s on 2 attempts"
    assert by_job[2]["status"] == "done"
    assert len(run.events_named(ev.WORKER_KILLED, job=1, reason="timeout")) == 2


def test_resume_runs_only_what_the_journal_has_no_outcome_for(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 20", "sleep 0.1", "fib 21"])
    journal, results = tmp_path / "run.db", tmp_path / "r.jsonl"
    first = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs), "--journal", str(journal),
                     "--results", str(results)])
    assert first.finish() == 0
    before = read_results(results)
    again = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs), "--journal", str(journal),
                     "--results", str(results), "--resume"], events=tmp_path / "e.jsonl")
    assert again.finish() == 0
    assert not again.events_named(ev.JOB_SENT)
    assert sorted(read_results(results), key=lambda r: r["job"]) == \
        sorted(before, key=lambda r: r["job"])


@pytest.mark.soak
def test_chaos_with_crashing_and_killed_cluster_workers_loses_and_doubles_nothing(
        tmp_path: Path) -> None:
    rng = random.Random(11)
    lines = [rng.choice(["fib 18", "fib 23", "sleep 0.02", "sleep 0"]) for _ in range(300)]
    jobs = write_job_file(tmp_path, lines)
    local_results, dask_results = tmp_path / "local.jsonl", tmp_path / "dask.jsonl"
    chaos = ["--jobs", str(jobs), "--crash-rate", "0.03", "--seed", "5", "--max-attempts", "0"]
    local = PoolRun(["--workers", "2", "--results", str(local_results), *chaos])
    assert local.finish() == 0
    run = PoolRun([*DASK, "--workers", "2", "--results", str(dask_results), "--verbose", *chaos],
                  events=tmp_path / "e.jsonl")
    killed = []
    for step in range(1, 9):
        def enough(events: list[dict[str, Any]], wanted: int = 30 * step) -> bool:
            return sum(e["event"] == ev.JOB_STARTED for e in events) >= wanted or \
                any(e["event"] == ev.SUMMARY for e in events)
        if not run.wait_until_events(enough) or run.events_named(ev.SUMMARY):
            break
        victim = run.events_named(ev.JOB_STARTED)[-1]["worker"]
        kill_quietly(victim)  # mid-job, or just after: either way a worker dies
        killed.append(victim)
    assert run.finish() == 0
    assert len(killed) >= 4, run.log_text()
    records = read_results(dask_results)
    assert_exactly_once(records, range(1, len(lines) + 1))
    assert_done_right(records)
    assert _by_job(records) == _by_job(read_results(local_results))
    assert len([e for e in run.events_named(ev.WORKER_EXITED, crash=True)
                if e["worker"] is not None]) >= len(killed)


# --- nothing left behind ------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["ctrl_c_to_the_group", "sigterm_to_main"])
def test_an_interrupted_run_closes_its_cluster(tmp_path: Path, how: str) -> None:
    jobs = write_job_file(tmp_path, ["sleep 0.3"] * 20)
    results = tmp_path / "r.jsonl"
    run = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs), "--results", str(results)],
                  events=tmp_path / "e.jsonl")
    run.wait_for_event(ev.JOB_DONE, count=2)
    workers = _descendants(run.pid)
    if how == "ctrl_c_to_the_group":
        os.killpg(run.pid, signal.SIGINT)  # what a terminal does: the workers get it too
        expected, name = 130, "SIGINT"
    else:
        os.kill(run.pid, signal.SIGTERM)
        expected, name = 143, "SIGTERM"
    assert run.finish() == expected
    log = run.log_text()
    assert run.one_event(ev.INTERRUPTED)["signal"] == name
    assert "Traceback" not in log, log
    assert not run.events_named(ev.WORKER_EXITED) and not run.events_named(ev.WORKER_KILLED), \
        "a worker stopped with the run is not a crash"
    records = read_results(results)
    assert_exactly_once(records, range(1, 21))
    done = [r for r in records if r["status"] == "done"]
    assert len(done) >= 2
    assert_done_right(done)
    not_done = [r for r in records if r["status"] != "done"]
    assert not_done and all(r["reason"] == f"interrupted by {name}" for r in not_done)
    assert await_exit(sorted(workers), 10.0) == []  # and conftest checks the process group


def test_main_killed_takes_its_cluster_workers_with_it(
        tmp_path: Path, temporary_directory: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 34"] * 4)
    run = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs), "--verbose"],
                  events=tmp_path / "e.jsonl")
    run.wait_for_event(ev.JOB_STARTED, count=2)
    workers = _descendants(run.pid)
    assert len(workers) >= 2
    os.kill(run.pid, signal.SIGKILL)
    run.finish()
    # distributed's workers watch a pipe from their parent and exit when it closes.
    assert await_exit(sorted(workers), 10.0) == []
    # A SIGKILLed main cannot remove its scratch space: one directory of its own is left.
    left = list(temporary_directory.iterdir())
    assert len(left) == 1 and left[0].name.startswith("taskpool-dask-"), left
    shutil.rmtree(left[0])


def test_a_failure_after_the_cluster_started_still_closes_it(tmp_path: Path) -> None:
    """_close must run however _start ends: here the first submit raises, after our
    cluster started. Its scratch space is removed (the fixture checks TMPDIR is empty) and
    the run ends (its processes are the nannies' children, and end with it)."""
    jobs = write_job_file(tmp_path, ["sleep 0"] * 3)
    script = tmp_path / "boom.py"
    script.write_text(
        "import sys\n"
        "from taskpool import cli\nfrom taskpool.dask import engine as dask_engine\n"
        "def boom(self, job, attempt):\n"
        "    raise RuntimeError('a submit that fails')\n"
        "dask_engine.DaskEngine._submit = boom\n"
        "if __name__ == '__main__':\n"  # the cluster's workers are spawned: they import us
        f"    sys.exit(cli.main(['run', '--engine', 'dask', '--workers', '1', '--jobs', "
        f"{str(jobs)!r}]))\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode != 0
    assert "a submit that fails" in run.stderr + run.stdout


# --- an existing cluster ------------------------------------------------------------------------

def test_a_scheduler_address_that_is_not_one_is_a_usage_error(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 10"])
    for address in ("nonsense", "tcp://127.0.0.1", "http://127.0.0.1:8786"):
        run = PoolRun([*DASK, "--scheduler", address, "--jobs", str(jobs)],
                      events=tmp_path / "e.jsonl")
        assert run.finish() == 2
        log = run.log_text()
        assert f"--scheduler {address!r} is not a scheduler address" in log, log
        assert not _dask_engine_events(run) and "Traceback" not in log, log


@pytest.fixture
def unused_port() -> Iterator[int]:
    """A port nothing listens on: bound but never listened on (a connection is refused),
    and held until the test ends, so that nothing else can take it meanwhile."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield int(holder.getsockname()[1])


def test_an_unreachable_scheduler_is_said_plainly_and_exits_2(
        tmp_path: Path, unused_port: int) -> None:
    address = f"tcp://127.0.0.1:{unused_port}"
    jobs = write_job_file(tmp_path, ["fib 10", "sleep 0"])
    results = tmp_path / "r.jsonl"
    run = PoolRun([*DASK, "--scheduler", address, "--connect-timeout", "0.5", "--jobs",
                   str(jobs), "--results", str(results)])
    assert run.finish() == 2
    log = run.log_text()
    reason = f"the Dask scheduler at {address} could not be reached"
    assert re.search(rf"^taskpool: {re.escape(reason)} \(", log, re.M), log
    assert "Traceback" not in log and "Exception ignored" not in log, log
    # No job ran; each is recorded not done, with the reason.
    records = read_results(results)
    assert_exactly_once(records, range(1, 3))
    assert all(r["status"] == "not_done" and r["reason"].startswith(reason) for r in records)


def test_ctrl_c_while_connecting_to_a_scheduler_ends_the_run_as_interrupted(
        tmp_path: Path, unused_port: int) -> None:
    # SIGINT is held while the scheduler is tried (a Client interrupted half-built hangs
    # the exit); once the try is over, it counts: exit 130, as the local engine's.
    address = f"tcp://127.0.0.1:{unused_port}"
    jobs = write_job_file(tmp_path, ["fib 10"])
    results = tmp_path / "r.jsonl"
    run = PoolRun([*DASK, "--scheduler", address, "--connect-timeout", "3", "--jobs",
                   str(jobs), "--results", str(results)], events=tmp_path / "e.jsonl")
    run.wait_for_event(ev.DASK_CONNECTING, scheduler=address, timeout=3)
    os.killpg(run.pid, signal.SIGINT)
    assert run.finish() == 130
    log = run.log_text()
    assert run.one_event(ev.INTERRUPTED)["signal"] == "SIGINT", log
    assert "Traceback" not in log, log
    assert [(r["status"], r["reason"]) for r in read_results(results)] == \
        [("not_done", "interrupted by SIGINT")]


def test_the_workers_of_a_cluster_are_read_from_every_supported_distributed() -> None:
    from taskpool.dask.cluster import cluster_workers

    workers = {f"tcp://10.0.0.{i}:1": {"nthreads": 1} for i in range(7)}

    class Before2025_4:  # scheduler_info() takes no n_workers, lists every worker
        def scheduler_info(self) -> dict[str, Any]:
            return {"workers": workers}

    class Since2025_4:  # lists 5 workers unless asked for all with n_workers=-1
        def scheduler_info(self, n_workers: int = 5) -> dict[str, Any]:
            return {"workers": dict(list(workers.items())[:n_workers] if n_workers >= 0
                                    else workers)}

    assert cluster_workers(Before2025_4()) == workers
    assert cluster_workers(Since2025_4()) == workers


@pytest.fixture(scope="module")
def existing_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Dask cluster that taskpool did not start: a scheduler, and one worker process of
    two threads offering type1. Its address."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, TMPDIR=str(tmp_path_factory.mktemp("cluster")))
    scheduler = subprocess.Popen(
        [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=env)
    worker = None
    try:
        assert scheduler.stderr is not None
        for line in scheduler.stderr:
            found = re.search(r"Scheduler at:\s+(tcp://\S+)", line)
            if found:
                address = found.group(1)
                break
        else:
            raise AssertionError("the scheduler did not start")
        # What it logs from now on is read and dropped (a full pipe would block it).
        threading.Thread(target=scheduler.stderr.read, daemon=True).start()
        worker = subprocess.Popen(
            [str(bin_dir / "dask"), "worker", address, "--nthreads", "2", "--nworkers", "1",
             "--no-dashboard", "--resources", "type1=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        yield address
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(WAIT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_runs_on_an_existing_scheduler(tmp_path: Path, existing_cluster: str) -> None:
    jobs = write_job_file(tmp_path, ["fib 20", "sleep 0.1", "fib 25"])
    results = tmp_path / "r.jsonl"
    run = PoolRun([*DASK, "--scheduler", existing_cluster, "--jobs", str(jobs), "--results",
                   str(results)], events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 4))
    assert_done_right(records)
    assert run.one_event(ev.DASK_STARTED, scheduler=existing_cluster)["own_cluster"] is False


def test_on_an_existing_cluster_a_job_past_its_timeout_is_abandoned_and_charged(
        tmp_path: Path, existing_cluster: str) -> None:
    # Dask cannot stop one task there: each try is abandoned (left to end on its worker,
    # which has a second thread for the next try) and charged; its late result is dropped.
    jobs = write_job_file(tmp_path, ["sleep 5 timeout=0.5", "fib 20"])
    results = tmp_path / "r.jsonl"
    run = PoolRun([*DASK, "--scheduler", existing_cluster, "--jobs", str(jobs), "--results",
                   str(results), "--max-attempts", "2"], events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    records = read_results(results)
    assert_exactly_once(records, range(1, 3))
    by_job = {r["job"]: r for r in records}
    assert by_job[1]["status"] == "failed" and by_job[1]["attempts"] == 2
    assert by_job[1]["reason"] == "ran job 1 past its timeout of 0.5 s on 2 attempts"
    assert by_job[2]["status"] == "done" and by_job[2]["result"] == 6765
    abandoned = run.events_named(ev.JOB_ABANDONED, job=1, reason="timeout")
    assert len(abandoned) == 2, run.log_text()
    assert run.events_named(ev.JOB_FAILED, job=1, attempts=2)


def test_a_cluster_that_does_not_close_has_its_worker_processes_killed() -> None:
    # distributed falls back to SIGTERM, which our workers hold blocked; a close that times
    # out (a nanny waiting for a worker that is starting again) must not leave them behind.
    from types import SimpleNamespace

    from taskpool.dask.cluster import _close_or_kill

    worker = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.pthread_sigmask("
                               "signal.SIG_BLOCK, {signal.SIGTERM}); time.sleep(60)"])

    class Unclosable:
        workers = {0: SimpleNamespace(process=SimpleNamespace(
            process=SimpleNamespace(pid=worker.pid)))}

        def close(self, timeout: float) -> None:
            raise TimeoutError(f"timed out after {timeout} s.")

    _close_or_kill(Unclosable())  # type: ignore[arg-type]
    assert worker.wait(timeout=10) == -signal.SIGKILL


def test_a_lost_workers_running_jobs_are_those_it_told_of_then_those_it_would_run_first() -> None:
    # On a given cluster, a worker's start may die with it (a job that kills it at once):
    # its threads left over are taken to run what it held in the order it runs them.
    from taskpool.dask.state import Tries, Try
    from taskpool.model.jobs import Job, JobKind

    tries = Tries(own_cluster=False)
    address = "tcp://10.0.0.6:4000"
    held = [Try(Job(job_id, JobKind.FIB, 20, priority=priority), 1, f"k{job_id}",
                _StandInFuture(f"k{job_id}"))  # type: ignore[arg-type]
            for job_id, priority in ((3, 0), (2, 0), (4, 5))]

    def running(threads: int) -> list[int]:
        return [t.job.job_id for t in tries.running_on(address, held, threads)]

    assert running(1) == [4]  # none told: the highest priority, then the oldest
    held.pop()
    assert running(1) == [2]
    tries.add(held[0])
    tries.note_start({"key": "k3", "address": address, "pid": 7, "nthreads": 1}, lambda j: None)
    assert running(1) == [3]  # it told of job 3: job 2 only waited
    assert running(2) == [3, 2]
