"""The measurements behind `make bench`, one function each; bench.py runs them and prints.

Every pool is started and warmed with one call before its clock starts: these figures are
what a job costs once a pool runs (the CLI's figures, whole commands, include start-up).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import posix_ipc

ROOT = Path(__file__).resolve().parent.parent


def noop(i: int) -> int:
    return i


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class InlineExecutor(Executor):
    """The floor no Executor can beat: submit makes a Future and sets its result at once."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _submit_all(executor: Executor, n: int) -> float:
    """Seconds for n no-op submits and their n results, after one warm-up call."""
    executor.submit(noop, 0).result()
    started = time.perf_counter()
    futures = [executor.submit(noop, i) for i in range(n)]
    for future in futures:
        future.result()
    return time.perf_counter() - started


def executor_rate(make: Callable[[], Executor], n: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        executor = make()
        try:
            best = max(best, n / _submit_all(executor, n))
        finally:
            executor.shutdown(wait=True)
    return best


def taskpool_executor(workers: int = 2) -> Executor:
    import taskpool

    return taskpool.Executor(workers)


def ppe(workers: int = 2) -> Executor:
    return ProcessPoolExecutor(workers)


def loky_executor(workers: int = 2) -> Executor:
    import loky

    return loky.ProcessPoolExecutor(workers)  # type: ignore[no-any-return]


class _PebbleAsExecutor(Executor):
    """pebble's ProcessPool.schedule, per job, behind the Executor interface."""

    def __init__(self, workers: int) -> None:
        import pebble

        self.pool = pebble.ProcessPool(max_workers=workers)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.pool.schedule(fn, args=args, kwargs=kwargs)  # type: ignore[no-any-return]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pool.close()
        self.pool.join()


def pebble_executor(workers: int = 2) -> Executor:
    return _PebbleAsExecutor(workers)


def mp_pool_rate(n: int, repeats: int, workers: int = 2) -> float:
    """multiprocessing.Pool.imap_unordered(chunksize=1): one job per message, as ours."""
    best = 0.0
    for _ in range(repeats):
        with multiprocessing.Pool(workers) as pool:
            pool.apply(noop, (0,))
            started = time.perf_counter()
            for _ in pool.imap_unordered(noop, range(n), chunksize=1):
                pass
            best = max(best, n / (time.perf_counter() - started))
    return best


def bulk_map_rates(n: int, rounds: int, workers: int = 2) -> dict[str, float]:
    """Items/s of `n` no-op items through map, best of `rounds`, each pool warmed first and
    measured once a round, in turn: multiprocessing.Pool.map with its default chunksize
    (n / (4 x workers)), and taskpool.Executor.map with chunksize=1000 and with that same
    chunksize."""
    mp_default = -(-n // (4 * workers))

    def mp_map() -> float:
        with multiprocessing.Pool(workers) as pool:
            pool.map(noop, range(1000))
            started = time.perf_counter()
            pool.map(noop, range(n))
            return n / (time.perf_counter() - started)

    def executor_map(chunksize: int) -> float:
        import taskpool

        with taskpool.Executor(workers) as executor:
            list(executor.map(noop, range(1000), chunksize=100))
            started = time.perf_counter()
            for _ in executor.map(noop, range(n), chunksize=chunksize):
                pass
            return n / (time.perf_counter() - started)

    runs: dict[str, Callable[[], float]] = {
        "mp.Pool.map": mp_map,
        "Executor.map chunksize=1000": lambda: executor_map(1000),
        f"Executor.map chunksize={mp_default}": lambda: executor_map(mp_default),
    }
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    return best


def ping_pong_rate(n: int, repeats: int) -> float:
    """Round trips of a small message between two processes over two posix_ipc queues: what
    one job costs in queue operations alone, with no Python work around them."""
    best = 0.0
    for _ in range(repeats):
        names = [f"/taskpool-{os.getpid()}-bench-{i}" for i in range(2)]
        ping, pong = (posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=1,
                                             max_message_size=64) for name in names)
        for name in names:
            posix_ipc.unlink_message_queue(name)
        child = os.fork()
        if child == 0:
            for _ in range(n):
                pong.send(ping.receive()[0])
            os._exit(0)
        started = time.perf_counter()
        for _ in range(n):
            ping.send(b"x" * 16)
            pong.receive()
        best = max(best, n / (time.perf_counter() - started))
        os.waitpid(child, 0)
        ping.close()
        pong.close()
    return best


def fib_makespan(make: Callable[[], Executor], count: int, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        executor = make()
        try:
            executor.submit(noop, 0).result()
            started = time.perf_counter()
            list(executor.map(fib, [n] * count))
            best = min(best, time.perf_counter() - started)
        finally:
            executor.shutdown(wait=True)
    return best


def sequential_fib(n: int, count: int, repeats: int = 3) -> float:
    """`count` x fib(n) one after another in this process, best of `repeats`: the whole
    batch, not one call times count, so that it sees the same caches and clock speeds."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(count):
            fib(n)
        best = min(best, time.perf_counter() - started)
    return best


def forked_fib(n: int, count: int, workers: int = 2) -> float:
    """`count` x fib(n) shared by `workers` plain forked processes, no pool: the makespan
    the machine itself gives with every core busy (each core may run slower then than one
    alone, which the sequential reference does not see)."""
    started = time.perf_counter()
    children = []
    for w in range(workers):
        pid = os.fork()
        if pid == 0:
            for _ in range(w, count, workers):
                fib(n)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return time.perf_counter() - started


def cli_fib_makespan(workdir: Path, count: int, n: int, repeats: int) -> float:
    """The CLI run's own wall time (its summary event: fork of the pool to its end; to
    the millisecond, where the Summary line rounds to 10 ms, 2% of this batch)."""
    jobs = workdir / "fib.txt"
    jobs.write_text(f"fib {n}\n" * count)
    best = float("inf")
    for _ in range(repeats):
        events = workdir / "fib.jsonl"
        events.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "taskpool", "run", "--workers", "2",
                        "--jobs", str(jobs), "--log", str(workdir / "fib.log"),
                        "--events", str(events)],
                       cwd=ROOT, check=True, stdin=subprocess.DEVNULL)
        with events.open() as stream:
            summary = [e for e in _events(stream) if e["event"] == "summary"][-1]
        best = min(best, float(summary["wall_time"]))
    return best


def _events(stream: Any) -> Any:
    for line in stream:
        yield json.loads(line)


class RecoveryTimes(NamedTuple):
    """Seconds from each SIGKILL of a busy worker: to its death seen by the Dealer (its
    worker_exited event), to its job sent again (the job_sent event of the next attempt),
    and to the replacement worker up (its worker_started event)."""

    to_death_seen: list[float]
    to_resend: list[float]
    to_replacement: list[float]


def recovery_latency(kills: int, workers: int = 2,
                     preexec_fn: Callable[[], None] | None = None) -> RecoveryTimes:
    """SIGKILL a busy worker of a CLI run of `workers` workers (each running a job, with one
    more queued behind it), `kills` times, each once every worker runs a job again. The
    events' clock is CLOCK_MONOTONIC, the same as time.monotonic() here."""
    read_fd, write_fd = os.pipe()
    jobs = Path(os.environ.get("TMPDIR", "/tmp")) / f"taskpool-bench-{os.getpid()}.txt"
    jobs.write_text("sleep 3600\n" * (2 * workers))
    run = subprocess.Popen(
        [sys.executable, "-m", "taskpool", "run", "--workers", str(workers), "--jobs",
         str(jobs), "--max-attempts", "0", "--log", os.devnull,
         "--events", f"/dev/fd/{write_fd}"],
        cwd=ROOT, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)
    os.close(write_fd)
    times = RecoveryTimes([], [], [])
    running: dict[int, int] = {}  # worker pid -> job id it runs
    victim: tuple[int, int, float] | None = None  # pid, job, when killed
    seen: dict[str, float] = {}  # of the victim: when each of the three events came
    with os.fdopen(read_fd) as stream:
        for ev in _events(stream):
            name = ev["event"]
            if name == "job_started":
                running[ev["worker"]] = ev["job"]
            elif victim is not None and _marks_recovery(ev, victim[0], victim[1]):
                seen.setdefault(name, ev["t"])
            if victim is not None and len(seen) == 3:
                times.to_death_seen.append(seen["worker_exited"] - victim[2])
                times.to_resend.append(seen["job_sent"] - victim[2])
                times.to_replacement.append(seen["worker_started"] - victim[2])
                victim, seen = None, {}
                if len(times.to_resend) == kills:
                    break
            if victim is None and len(running) == workers:
                # Every worker runs a job: kill the one whose job started first.
                pid = next(iter(running))
                victim = (pid, running.pop(pid), time.monotonic())
                os.kill(pid, signal.SIGKILL)
        stop_at_once(run, _events(stream))
    run.wait()
    jobs.unlink()
    return times


def _marks_recovery(ev: dict[str, Any], victim: int, job: int) -> bool:
    """The victim's death seen, its job sent again (from it: the events of two threads may
    come out of order, and its first send be read after its start), or a worker started
    (its replacement: nothing else starts one here)."""
    name = ev["event"]
    return bool((name == "worker_exited" and ev["worker"] == victim)
                or (name == "job_sent" and ev["job"] == job
                    and ev.get("from_worker") == victim)
                or name == "worker_started")


def stop_at_once(run: subprocess.Popen[bytes], events: Any) -> None:
    """End a run of sleeps: SIGTERM, and once main has taken it (its interrupted event), a
    second, which stops the running jobs at once (two sent together may arrive as one, and
    the run then waits out its grace period); then read its events to their end."""
    run.send_signal(signal.SIGTERM)
    for ev in events:
        if ev["event"] == "interrupted":
            run.send_signal(signal.SIGTERM)
            break
    for _ in events:
        pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
