"""Issue 21's targets: hundreds of workers, and several pools of one user, as a normal user
under the kernel's default queue limits (RLIMIT_MSGQUEUE 819,200 bytes, msg_max 10,
queues_max 256 for every user together) and the usual open-file limit of 1,024.

When the tests run as root, each pool runs as `nobody` (root may pass queues_max and
msg_max), with RLIMIT_MSGQUEUE and RLIMIT_NOFILE set to those defaults, soft and hard, in
the child before it becomes `nobody`: a design that needs more queues, queue bytes or
descriptors than a normal user has fails here. (16 Executors of 8 workers in one process:
tests/test_executor_scale.py.)

Each takes 2-5 s on a 2-core machine (about 1.2 GB of memory at 512 workers), so all are in
`make test`; `make soak` repeats the kills at 512 workers many more times.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import site
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from taskpool.observe import events as ev

from harness import (
    ROOT,
    WAIT,
    FileWatch,
    PoolRun,
    as_user,
    assert_done_right,
    assert_exactly_once,
    await_exit,
    group_members,
    kill_quietly,
    read_results,
    write_job_file,
)

NOBODY = 65534
DEFAULT_MSGQUEUE_BYTES = 819_200  # the kernel's default RLIMIT_MSGQUEUE, soft and hard
USUAL_OPEN_FILES = 1024  # the usual RLIMIT_NOFILE soft limit (set as the hard one too)


def _normal_user_limits() -> None:
    """In the child, before it becomes `nobody`: the limits a normal user starts with."""
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (DEFAULT_MSGQUEUE_BYTES,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (USUAL_OPEN_FILES,) * 2)


def _as_normal_user() -> int | None:
    """Run as `nobody` when the tests run as root: root may exceed msg_max and queues_max."""
    return NOBODY if os.geteuid() == 0 else None


@pytest.fixture(autouse=True)
def default_mqueue_sysctls() -> None:
    limits = {name: Path(f"/proc/sys/fs/mqueue/{name}").read_text().strip()
              for name in ("msg_max", "msgsize_max", "queues_max")}
    assert limits == {"msg_max": "10", "msgsize_max": "8192", "queues_max": "256"}, (
        f"these tests mean the kernel's default limits: {limits}")


def _run_as_normal_user(shared_dir: Path, args: list[str], name: str = "",
                        **kwargs: Any) -> PoolRun:
    return PoolRun(args, preexec_fn=_normal_user_limits, user=_as_normal_user(),
                   events=shared_dir / f"events{name}.jsonl", **kwargs)


def _assert_each_job_once(run: PoolRun, results: Path, jobs: int) -> None:
    """Every job recorded once, with the right value, in the results file and in the events
    (one job_done each)."""
    records = read_results(results)
    assert_exactly_once(records, range(1, jobs + 1))
    assert_done_right(records)
    assert_exactly_once(run.events_named(ev.JOB_DONE), range(1, jobs + 1))


# --- 512 workers -----------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_512_workers_run_sleep_jobs_as_a_normal_user_each_job_once(shared_dir: Path) -> None:
    workers, count = 512, 1024
    jobs = write_job_file(shared_dir, ["sleep 0.05"] * count)
    results = shared_dir / "r.jsonl"
    run = _run_as_normal_user(shared_dir, ["--workers", str(workers), "--jobs", str(jobs),
                                           "--results", str(results)])
    assert run.finish(timeout=300) == 0, run.log_text()
    assert len(set(run.worker_pids())) == workers
    _assert_each_job_once(run, results, count)
    assert run.one_event(ev.SUMMARY)["crashes"] == 0


@pytest.mark.timeout(900)
@pytest.mark.parametrize("rounds", [8, pytest.param(100, marks=pytest.mark.soak)])
def test_512_workers_survive_sigkills_of_busy_workers_each_job_once(shared_dir: Path,
                                                                    rounds: int) -> None:
    """Each round sends 64 more jobs, waits for one of them to start, and SIGKILLs the worker
    that runs it, once the pool is full again (the last victim replaced). The jobs come on
    standard input, so that the run lasts as long as the kills take, however loaded the
    machine."""
    workers, per_round = 512, 64
    rng = random.Random(21)
    results = shared_dir / "r.jsonl"
    run = _run_as_normal_user(shared_dir, ["--workers", str(workers), "--results", str(results),
                                           "--max-attempts", "0"], pipe_stdin=True)
    run.wait_for_event(ev.WORKER_STARTED, count=workers, timeout=300)
    victims: dict[int, int] = {}  # worker pid -> the job it was running when killed
    for first in range(1, rounds * per_round + 1, per_round):
        this_round = range(first, first + per_round)
        _await_full_pool(run, workers, victims)
        run.send_line("\n".join(f"sleep {rng.choice([0.2, 0.3, 0.5])}" for _ in this_round))
        started = run.wait_for_event(ev.JOB_STARTED, job=rng.choice(this_round),
                                     timeout=300)[0]
        kill_quietly(started["worker"])
        victims[started["worker"]] = started["job"]
    run.close_stdin()
    assert run.finish(timeout=300) == 0, run.log_text()
    _assert_each_job_once(run, results, rounds * per_round)
    exited = {e["worker"] for e in run.events_named(ev.WORKER_EXITED)}
    assert set(victims) <= exited, "a killed worker's death went unseen"
    for pid, job in victims.items():
        # Its job was resent, unless its result was in before the kill.
        [done] = run.events_named(ev.JOB_DONE, job=job)
        assert done["worker"] == pid or run.events_named(ev.JOB_RESENT, job=job, worker=pid)
    assert run.events_named(ev.JOB_RESENT), "no kill landed while its job ran"
    assert len(set(run.worker_pids())) == workers + len(victims)
    print(f"\n{workers} workers, {len(victims)} kills, "
          f"{len(run.events_named(ev.JOB_RESENT))} jobs resent: {run.one_event(ev.SUMMARY)}")


def _await_full_pool(run: PoolRun, workers: int, victims: dict[int, int]) -> None:
    """Until as many workers are started as the pool's size plus the kills so far: each
    victim replaced."""
    run.wait_for_event(ev.WORKER_STARTED, count=workers + len(victims), timeout=300)


# --- several pools, and an Executor of 256 workers: make test -----------------------------

@pytest.mark.timeout(300)
def test_8_concurrent_runs_of_64_workers_by_one_user_all_complete(shared_dir: Path) -> None:
    """All 8 pools are alive at once: each run gets half its jobs, and the rest (and the end
    of its input) only once every run has started its 64 workers."""
    runs_count, workers, count = 8, 64, 256
    half = "\n".join(["sleep 0.01", "fib 12"] * (count // 4))
    runs = [_run_as_normal_user(shared_dir, ["--workers", str(workers), "--results",
                                             str(shared_dir / f"r{i}.jsonl")],
                                name=str(i), pipe_stdin=True)
            for i in range(runs_count)]
    for run in runs:
        run.send_line(half)
    for run in runs:
        run.wait_for_event(ev.WORKER_STARTED, count=workers)
    for run in runs:
        run.send_line(half)
        run.close_stdin()
    for i, run in enumerate(runs):
        assert run.finish() == 0, run.log_text()
        assert len(set(run.worker_pids())) == workers
        _assert_each_job_once(run, shared_dir / f"r{i}.jsonl", count)


EXECUTOR_WORKERS = 256
EXECUTOR_SCRIPT = textwrap.dedent("""
    import json, sys
    import executor_jobs as jobs
    import taskpool

    marker, started, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with taskpool.Executor(workers) as pool:
        # One blocking call a worker: each notes its worker's pid, and all return once the
        # test has seen a pid of each worker, so all ran at once.
        blocked = [pool.submit(jobs.wait_for_file, marker, started, i)
                   for i in range(workers)]
        waited = [f.result() for f in blocked]
        squares = list(pool.map(jobs.square, range(20_000)))
        chunked = list(pool.map(jobs.power, range(5_000), [3] * 5_000, chunksize=100))
        stats = pool.stats
    json.dump({"waited": waited, "squares": squares, "chunked": chunked,
               "crashes": stats.crashes}, sys.stdout)
""")


@pytest.mark.timeout(600)
def test_an_executor_of_256_workers_starts_and_maps_as_a_normal_user(shared_dir: Path) -> None:
    marker, started = shared_dir / "go", shared_dir / "started"
    started.mkdir(mode=0o777)
    started.chmod(0o777)
    command, path = _python_of(_as_normal_user())
    proc = subprocess.Popen(
        [*command, "-c", EXECUTOR_SCRIPT, str(marker), str(started), str(EXECUTOR_WORKERS)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_normal_user_limits)
    try:
        pids = _await_pid_files(started, EXECUTOR_WORKERS, proc)
        marker.touch()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert len(set(pids)) == EXECUTOR_WORKERS
    answer = json.loads(out)
    assert answer["waited"] == list(range(EXECUTOR_WORKERS))
    assert answer["squares"] == [x * x for x in range(20_000)]
    assert answer["chunked"] == [x**3 for x in range(5_000)]
    assert answer["crashes"] == 0
    assert not await_exit([*pids, *group_members(proc.pid)], timeout=WAIT), (
        "the Executor's Dealer or workers outlived it")


def _python_of(user: int | None) -> tuple[list[str], list[str]]:
    """The command that starts this Python as `user`, and its PYTHONPATH (tests/ for
    executor_jobs). The Executor starts its Dealer with sys.executable, which for `nobody`
    must be a path that user may run: a venv's python may lead to one under /root (pyenv),
    so `nobody` runs the system's interpreter of this version, given our dependencies."""
    path = [str(ROOT), str(ROOT / "tests")]
    if user is None:
        return [sys.executable], path
    system_python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(system_python, os.X_OK):
        pytest.skip(f"no {system_python} for user {user} to run")
    return as_user(user, [system_python]), path + site.getsitepackages()


def _await_pid_files(directory: Path, count: int, proc: subprocess.Popen[bytes]) -> list[int]:
    """The pids of `count` pid files in `directory` (inotify wakes us at each), or a failure
    as soon as `proc` exits without them (or, bounding a hang, after 5 x WAIT)."""
    watch, exited = FileWatch(directory), os.pidfd_open(proc.pid)
    deadline = time.monotonic() + 5 * WAIT
    try:
        while True:
            names = [n for n in os.listdir(directory) if n.isdigit()]
            if len(names) >= count:
                return [int(n) for n in names]
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(names)} of {count} workers ran a call"
            if exited in watch.wait(also=exited, timeout=remaining):
                proc.wait()
                assert proc.stderr is not None
                raise AssertionError(f"the Executor's process ended with {proc.returncode} "
                                     f"after {len(names)} of {count} workers ran a call:\n"
                                     + proc.stderr.read().decode())
    finally:
        watch.close()
        os.close(exited)
