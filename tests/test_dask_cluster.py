"""The Dask engine on a real cluster: a `dask scheduler` process and `dask worker`
processes on loopback, started by the test as a user would start them, not by taskpool.

`RealCluster` starts them, waits until each is ready by reading what it prints (a timed wait
on a queue its reader thread fills: never a sleep), and kills whatever is left of them at
the end of the test, however it ends."""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskpool.observe import events as ev

from harness import (
    WAIT,
    PoolRun,
    assert_done_right,
    assert_exactly_once,
    kill_quietly,
    read_results,
    write_job_file,
)

pytest.importorskip("distributed")

DASK_BIN = Path(sys.executable).parent / "dask"

# A worker whose Python cannot import taskpool: a preload (run in the worker process before
# it joins) that hides the package, as a worker of another environment would lack it.
NO_TASKPOOL = '''
import sys


class RefuseTaskpool:
    def find_spec(self, name, path=None, target=None):
        if name == "taskpool" or name.startswith("taskpool."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


for name in [n for n in sys.modules if n == "taskpool" or n.startswith("taskpool.")]:
    del sys.modules[name]
sys.meta_path.insert(0, RefuseTaskpool())
'''


class _Process:
    """A process of the cluster, and the lines of its stderr as they come."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The first line from now matching `pattern`, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s") \
                    from None
            if line is None:
                raise AssertionError(f"exited ({self.proc.wait()}) before {pattern!r}")
            found = re.search(pattern, line)
            if found:
                return found

    def children(self) -> list[int]:
        """The processes it started (a `dask worker`'s nanny starts the worker process)."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(pid) for pid in f.read().split()]
        except OSError:
            return []

    def stop(self) -> None:
        """Killed with its process group (a nanny's worker process with it)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class RealCluster:
    """A scheduler (no dashboard, on 127.0.0.1, a free port) and the workers a test adds."""

    def __init__(self, scratch: Path) -> None:
        self.env = dict(os.environ, TMPDIR=str(scratch))
        self.scratch = scratch
        self.workers: list[_Process] = []
        self.scheduler = _Process([str(DASK_BIN), "scheduler", "--host", "127.0.0.1",
                                   "--port", "0", "--no-dashboard"], self.env)
        self.address = self.scheduler.wait_for_line(r"Scheduler at:\s+(tcp://\S+)").group(1)

    def add_worker(self, *options: str) -> _Process:
        """A `dask worker` of one thread (a nanny and its worker process), once it has
        registered with the scheduler."""
        worker = _Process([str(DASK_BIN), "worker", self.address, "--nthreads", "1",
                           "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1",
                           *options], self.env)
        self.workers.append(worker)
        worker.wait_for_line(r"Registered to:")
        return worker

    def preload_without_taskpool(self) -> str:
        path = self.scratch / "no_taskpool.py"
        path.write_text(NO_TASKPOOL)
        return str(path)

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            process.stop()


@pytest.fixture
def real_cluster(tmp_path: Path) -> Iterator[RealCluster]:
    scratch = tmp_path / "cluster"
    scratch.mkdir()
    cluster = RealCluster(scratch)
    try:
        yield cluster
    finally:
        cluster.close()


def _run(cluster: RealCluster, tmp_path: Path, lines: list[str], *options: str) -> PoolRun:
    jobs = write_job_file(tmp_path, lines)
    return PoolRun(["--engine", "dask", "--scheduler", cluster.address, "--jobs", str(jobs),
                    "--results", str(tmp_path / "r.jsonl"), *options],
                   events=tmp_path / "e.jsonl")


def _table_row(run: PoolRun) -> dict[str, Any]:
    [row] = run.events_named(ev.POOL_SUMMARY)
    return row


# --- pre-flight and no workers ---------------------------------------------------------------

def test_a_worker_that_cannot_import_taskpool_is_a_set_up_error_said_in_seconds(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    real_cluster.add_worker("--preload", real_cluster.preload_without_taskpool())
    run = _run(real_cluster, tmp_path, ["fib 20", "sleep 0"])
    started = time.monotonic()
    assert run.finish() == 2
    assert time.monotonic() - started < WAIT
    records = read_results(tmp_path / "r.jsonl")
    assert_exactly_once(records, range(1, 3))
    reason = f"the Dask cluster at {real_cluster.address} cannot run taskpool's jobs"
    assert all(r["status"] == "not_done" and r["reason"].startswith(reason) for r in records)
    assert "ModuleNotFoundError" in records[0]["reason"]
    assert "pip install" in records[0]["reason"]  # what to install
    assert not run.events_named(ev.JOB_SENT), "nothing is sent to a cluster that cannot run it"
    assert "Traceback" not in run.log_text()


def test_a_worker_without_taskpool_that_joins_mid_run_ends_it_as_a_set_up_error(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    # Jobs from standard input, left open: the run goes on until the worker joins.
    real_cluster.add_worker()
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--engine", "dask", "--scheduler", real_cluster.address, "--results",
                   str(results)], pipe_stdin=True, events=tmp_path / "e.jsonl")
    run.send_line("fib 20")
    run.wait_for_event(ev.JOB_DONE)
    real_cluster.add_worker("--preload", real_cluster.preload_without_taskpool())
    assert run.finish() == 2
    run.close_stdin()
    [record] = read_results(results)
    assert (record["status"], record["result"]) == ("done", 6765)
    assert f"taskpool: the Dask cluster at {real_cluster.address} cannot run taskpool's jobs: " \
        "worker " in run.log_text()


def test_a_cluster_without_a_worker_for_dask_wait_ends_the_run_with_jobs_not_done(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    run = _run(real_cluster, tmp_path, ["fib 20", "sleep 0"], "--dask-wait", "1")
    assert run.finish() == 1
    assert run.one_event(ev.DASK_NO_WORKER)["wait"] == 1
    assert run.one_event(ev.ROLE_LOST)["lost"] == "workers"
    records = read_results(tmp_path / "r.jsonl")
    assert_exactly_once(records, range(1, 3))
    assert {(r["status"], r["reason"]) for r in records} == {
        ("not_done", "the Dask cluster had no worker for 1 s (--dask-wait)")}
    assert _table_row(run)["workers"] == 0


def test_jobs_wait_for_a_worker_that_joins_within_dask_wait(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    run = _run(real_cluster, tmp_path, ["fib 20", "sleep 0"], "--dask-wait", str(WAIT))
    run.wait_for_event(ev.DASK_NO_WORKER)
    real_cluster.add_worker()
    assert run.finish() == 0
    records = read_results(tmp_path / "r.jsonl")
    assert_exactly_once(records, range(1, 3))
    assert_done_right(records)
    assert run.one_event(ev.DASK_WORKER_JOINED)["workers"] == 1
    assert _table_row(run)["workers"] == 1


# --- worker loss: a crash in taskpool's terms -------------------------------------------------

def test_a_worker_killed_mid_job_is_logged_and_counted_and_each_job_done_once(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    real_cluster.add_worker()
    real_cluster.add_worker()
    run = _run(real_cluster, tmp_path, ["sleep 1"] * 6)
    [started] = run.wait_for_event(ev.JOB_STARTED)
    job, victim = started["job"], started["worker"]
    kill_quietly(victim)
    assert run.finish() == 0
    records = read_results(tmp_path / "r.jsonl")
    assert_exactly_once(records, range(1, 7))
    assert_done_right(records)
    attempts = {r["job"]: r["attempts"] for r in records}
    assert attempts[job] == 2
    assert all(n == 1 for j, n in attempts.items() if j != job), attempts
    lost = run.one_event(ev.WORKER_EXITED, worker=victim)
    assert (lost["crash"], lost["jobs"]) == (True, [job])
    assert [e["job"] for e in run.events_named(ev.JOB_RESENT)] == [job]
    summary = run.one_event(ev.SUMMARY)
    assert (summary["crashes"], summary["resends"]) == (1, 1)
    row = _table_row(run)
    assert (row["workers"], row["crashes"], row["done"]) == (2, 1, 6)


def test_a_poison_job_fails_after_max_attempts_and_charges_no_other_job(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    # One worker of one thread: the poison job kills it at once, three times (its nanny
    # starts another each time), while other jobs wait in its queue. Dask would run it again
    # by itself (allowed-failures, 3 by default): taskpool's --max-attempts decides instead.
    # The poison job goes first on each new worker (its priority): a death while another job's
    # result and the poison job's start were both still in the worker's batched stream cannot
    # be told from that job's own death on a given cluster (docs/DASK.md), and is not tested.
    real_cluster.add_worker()
    run = _run(real_cluster, tmp_path, ["priority=9 crash", "fib 24", "sleep 0.2", "fib 20"],
               "--max-attempts", "3")
    assert run.finish() == 1
    by_job = {r["job"]: r for r in read_results(tmp_path / "r.jsonl")}
    assert_exactly_once(list(by_job.values()), range(1, 5))
    assert (by_job[1]["status"], by_job[1]["attempts"]) == ("failed", 3)
    assert by_job[1]["reason"].endswith("on 3 attempts")
    innocent = [by_job[j] for j in (2, 3, 4)]
    assert_done_right(innocent)
    assert all(r["attempts"] == 1 for r in innocent), innocent
    lost = run.events_named(ev.WORKER_EXITED, crash=True)
    assert [e["jobs"] for e in lost] == [[1], [1], [1]]
    assert len(run.events_named(ev.JOB_RESENT, job=1)) == 2
    assert not [e for e in run.events_named(ev.JOB_RESENT) if e["job"] != 1]
    summary = run.one_event(ev.SUMMARY)
    assert (summary["crashes"], summary["resends"], summary["failed"]) == (3, 2, 1)
    row = _table_row(run)
    assert (row["workers"], row["crashes"], row["failed"], row["done"]) == (1, 3, 1, 3)


# --- a lost scheduler, and distributed's own output ---------------------------------------------

def test_a_killed_scheduler_ends_the_run_plainly_with_every_job_reported(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    real_cluster.add_worker()
    log = tmp_path / "run.log"
    run = _run(real_cluster, tmp_path, ["sleep 0.3"] * 12, "--log", str(log))
    run.wait_for_event(ev.JOB_DONE)
    real_cluster.scheduler.stop()
    assert run.finish() == 1
    records = read_results(tmp_path / "r.jsonl")
    assert_exactly_once(records, range(1, 13))
    assert_done_right([r for r in records if r["status"] == "done"])
    not_done = [r for r in records if r["status"] != "done"]
    assert not_done and {(r["status"], r["reason"]) for r in not_done} == {
        ("not_done", "the Dask scheduler was lost")}
    assert run.one_event(ev.ROLE_LOST)["lost"] == "scheduler"
    # distributed's records (its errors about the lost connection) went to our log, in one
    # line each: nothing raw on stderr, no traceback anywhere.
    assert run.log_text() == ""
    assert "Traceback" not in log.read_text()
    assert any(e["role"] == "Dask" and e["text"].startswith("[Dask] distributed.")
               for e in run.all_events())


# --- chaos --------------------------------------------------------------------------------------

@pytest.mark.soak
def test_chaos_on_a_real_cluster_loses_and_doubles_nothing(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    for _ in range(3):
        real_cluster.add_worker()
    rng = random.Random(7)
    lines = [rng.choice(["fib 18", "fib 23", "sleep 0.02", "sleep 0"]) for _ in range(300)]
    run = _run(real_cluster, tmp_path, lines, "--max-attempts", "0", "--crash-rate", "0.02",
               "--seed", "5")
    killed = []
    for step in range(1, 7):
        def enough(events: list[dict[str, Any]], wanted: int = 40 * step) -> bool:
            return sum(e["event"] == ev.JOB_STARTED for e in events) >= wanted or \
                any(e["event"] == ev.SUMMARY for e in events)
        if not run.wait_until_events(enough) or run.events_named(ev.SUMMARY):
            break
        victim = run.events_named(ev.JOB_STARTED)[-1]["worker"]
        kill_quietly(victim)  # mid-job, or just after: either way a worker is lost
        killed.append(victim)
    assert run.finish() == 0
    assert len(killed) >= 3, run.log_text()
    records = read_results(tmp_path / "r.jsonl")
    assert_exactly_once(records, range(1, len(lines) + 1))
    assert_done_right(records)
    summary = run.one_event(ev.SUMMARY)
    lost = run.events_named(ev.WORKER_EXITED, crash=True)
    assert summary["crashes"] == len(lost) >= len(set(killed))
    assert summary["resends"] == len(run.events_named(ev.JOB_RESENT))


# --- jobs of real work ------------------------------------------------------------------------

def test_a_given_clusters_workers_return_each_jobs_output_inline_cut_at_its_bound(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    real_cluster.add_worker()
    kept = tmp_path / "kept"
    big = 1100000  # over the 1 MiB a stream that a given cluster's worker returns inline
    run = _run(real_cluster, tmp_path, [
        "sh echo one; echo uno >&2; exit 3", "call tests.call_targets:square 4",
        f"sh head -c {big} /dev/zero | tr '\\0' x"], "--output-dir", str(kept))
    assert run.finish() == 1
    records = {r["job"]: r for r in read_results(tmp_path / "r.jsonl")}
    assert (records[1]["status"], records[1]["reason"], records[1]["exit_status"]) == \
        ("failed", "exit status 3", 3)
    assert (records[2]["status"], records[2]["result"]) == ("done", 16)
    assert (kept / "1.out").read_text() == "one\n" and (kept / "1.err").read_text() == "uno\n"
    assert (kept / "2.out").read_text() == "squaring 4\n"
    assert (kept / "2.err").read_text() == "to stderr 4\n"
    cut = (kept / "3.out").read_bytes()
    assert cut.startswith(b"x" * (1 << 20)) and not cut.startswith(b"x" * ((1 << 20) + 1))
    assert cut.endswith(f"output cut at {1 << 20} bytes of {big}: on a cluster given by "
                        "--scheduler, a job's output returns inline]\n".encode())
    assert records[3]["status"] == "done"
