"""taskpool.Executor: PPE's behaviour where a user expects it, and none of PPE's breakage
when a worker dies."""

from __future__ import annotations

import os
import pickle
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, TimeoutError, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import executor_calls as calls
import pytest

import taskpool

from harness import queues_left


def _children() -> set[int]:
    return set(_children_of(os.getpid()))


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    queues_before = set(queues_left())
    children_before = _children()
    yield
    assert set(queues_left()) <= queues_before, "queue names left behind"
    assert _children() <= children_before, "processes left behind"


def _wait_for_pid(path: Path) -> int:
    deadline = time.monotonic() + 30
    while not path.exists():  # a file written by the job: polled with a deadline
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return int(path.read_text())


def test_submit_map_and_chunks_give_results_in_input_order() -> None:
    with taskpool.Executor(2) as pool:
        assert pool.submit(calls.square, 12).result() == 144
        assert list(pool.map(calls.square, range(50))) == [x * x for x in range(50)]
        assert list(pool.map(calls.square, range(50), chunksize=7)) == [x * x for x in range(50)]
        futures = [pool.submit(calls.square, x) for x in range(20)]
        assert sorted(f.result() for f in as_completed(futures)) == [x * x for x in range(20)]
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        assert done


def test_map_honours_its_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "go"
    with taskpool.Executor(1) as pool:
        results = pool.map(calls.wait_for_file, [str(marker)], timeout=0.2)
        with pytest.raises(TimeoutError):
            next(results)
        marker.touch()


def test_an_exception_reaches_the_caller_with_the_remote_traceback() -> None:
    with taskpool.Executor(1) as pool:
        with pytest.raises(ValueError, match="bad 3") as caught:
            pool.submit(calls.raise_value_error, 3).result()
        assert "raise_value_error" in str(caught.value.__cause__)
        assert pool.submit(calls.square, 3).result() == 9


def test_submit_after_shutdown_raises() -> None:
    pool = taskpool.Executor(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(calls.square, 1)


def test_shutdown_without_wait_returns_and_the_work_still_completes(tmp_path: Path) -> None:
    marker = tmp_path / "go"
    pool = taskpool.Executor(1)
    future = pool.submit(calls.wait_for_file, str(marker), None, 5)
    pool.shutdown(wait=False)  # returns though the call cannot finish before the marker
    assert not future.done()
    marker.touch()
    assert future.result(timeout=30) == 5
    pool._collector.join(timeout=30)
    assert pool._dealer.poll() is not None


def test_cancel_futures_cancels_what_has_not_started_and_loses_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "go"
    pid_file = tmp_path / "pid"
    pool = taskpool.Executor(1)
    first = pool.submit(calls.wait_for_file, str(marker), str(pid_file), 1)
    _wait_for_pid(pid_file)
    rest = [pool.submit(calls.square, x) for x in range(100)]
    pool.shutdown(wait=False, cancel_futures=True)
    marker.touch()
    pool.shutdown(wait=True)
    assert first.result() == 1
    cancelled = [f for f in rest if f.cancelled()]
    assert cancelled, "the calls still waiting in the Executor are cancelled"
    for x, f in enumerate(rest):
        assert f.cancelled() or f.result() == x * x


def test_a_cancelled_call_never_runs(tmp_path: Path) -> None:
    marker, pid_file, touched = tmp_path / "go", tmp_path / "pid", tmp_path / "touched"
    with taskpool.Executor(1) as pool:
        blocker = pool.submit(calls.wait_for_file, str(marker), str(pid_file))
        _wait_for_pid(pid_file)
        filler = [pool.submit(calls.square, x) for x in range(10)]
        late = pool.submit(calls.touch, str(touched))
        assert late.cancel()
        marker.touch()
        blocker.result()
        assert [f.result() for f in filler] == [x * x for x in range(10)]
    assert not touched.exists()


def test_several_threads_submitting_at_once_lose_nothing() -> None:
    with taskpool.Executor(2) as pool:
        def submit_many(base: int) -> list[tuple[int, object]]:
            return [(base + x, pool.submit(calls.square, base + x)) for x in range(500)]

        results: list[list[tuple[int, object]]] = [[] for _ in range(8)]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, submit_many(i * 1000))) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pairs = [pair for chunk in results for pair in chunk]
        assert len(pairs) == 4000
        assert all(f.result() == x * x for x, f in pairs)  # type: ignore[attr-defined]


def test_a_worker_killed_mid_call_costs_only_a_resend(tmp_path: Path) -> None:
    marker, pid_file = tmp_path / "go", tmp_path / "pid"
    with taskpool.Executor(2) as pool:
        before = [pool.submit(calls.square, x) for x in range(20)]
        victim = pool.submit(calls.wait_for_file, str(marker), str(pid_file), 42)
        os.kill(_wait_for_pid(pid_file), signal.SIGKILL)
        second_pid = _wait_for_pid_change(pid_file)
        assert second_pid > 0
        after = [pool.submit(calls.square, x) for x in range(20)]
        marker.touch()
        assert victim.result() == 42
        assert [f.result() for f in before + after] == [x * x for x in range(20)] * 2


def _wait_for_pid_change(path: Path) -> int:
    first = path.read_text()
    deadline = time.monotonic() + 30
    while path.read_text() == first:  # the resent call writes its new worker's pid
        assert time.monotonic() < deadline, "the call was never resent"
        time.sleep(0.01)
    return int(path.read_text())


def test_a_poison_call_fails_alone_and_the_pool_goes_on() -> None:
    with taskpool.Executor(2, max_attempts=2) as pool:
        burst = [pool.submit(calls.square, x) for x in range(30)]
        poison = pool.submit(calls.kill_own_worker)
        burst += [pool.submit(calls.square, x) for x in range(30, 60)]
        with pytest.raises(taskpool.WorkerCrashed, match="SIGKILL") as caught:
            poison.result()
        assert isinstance(caught.value, BrokenProcessPool)
        assert [f.result() for f in burst] == [x * x for x in range(60)]
        assert pool.submit(calls.square, 5).result() == 25


def test_workers_killed_at_random_instants_lose_no_call() -> None:
    rng = random.Random(3)
    with taskpool.Executor(2, max_attempts=0) as pool:
        futures = [pool.submit(calls.sleep, 0.001) for _ in range(1500)]
        dealer = pool._dealer.pid
        kills = 0
        while not all(f.done() for f in futures) and kills < 20:
            workers = [p for p in _children_of(dealer)]
            if workers:
                os.kill(rng.choice(workers), signal.SIGKILL)
                kills += 1
            time.sleep(rng.uniform(0.005, 0.03))  # the instant of the next kill
        assert all(f.result(timeout=60) == 0.001 for f in futures)
    assert kills >= 5


def _children_of(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def test_initializer_runs_in_each_worker() -> None:
    with taskpool.Executor(2, initializer=calls.set_initialized, initargs=("ready",)) as pool:
        assert {pool.submit(calls.initialized).result() for _ in range(10)} == {"ready"}


def test_an_initializer_that_raises_breaks_the_pool_with_the_cause() -> None:
    pool = taskpool.Executor(1, initializer=calls.failing_initializer)
    future = pool.submit(calls.square, 2)
    with pytest.raises(taskpool.WorkerCrashed, match="without taking a job"):
        future.result(timeout=60)
    pool._collector.join(timeout=60)
    with pytest.raises(BrokenProcessPool):
        pool.submit(calls.square, 3)
    pool.shutdown()


def test_large_arguments_and_results_arrive_whole() -> None:
    big = calls.sized(1 << 20)
    with taskpool.Executor(2) as pool:
        assert pool.submit(calls.sized, 100_000).result() == calls.sized(100_000)
        assert pool.submit(calls.sized, 1 << 20).result() == big
        assert pool.submit(calls.digest, big).result() == calls.digest(big)


def test_a_result_that_cannot_be_pickled_fails_its_future_only() -> None:
    with taskpool.Executor(1) as pool:
        with pytest.raises(pickle.PicklingError, match="could not be pickled"):
            pool.submit(calls.unpicklable).result()
        assert pool.submit(calls.square, 4).result() == 16


def test_no_signal_handler_installed_and_no_foreign_child_reaped() -> None:
    import subprocess
    import sys

    handlers = {s: signal.getsignal(s) for s in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM,
                                                  signal.SIGUSR1, signal.SIGUSR2)}
    ours = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    with taskpool.Executor(2, max_attempts=1) as pool:
        with pytest.raises(taskpool.WorkerCrashed):
            pool.submit(calls.kill_own_worker).result()
        assert pool.submit(calls.square, 2).result() == 4
    assert ours.wait() == 7
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_starts_while_the_callers_threads_hold_locks() -> None:
    import logging

    held = threading.Event()
    release = threading.Event()
    lock = threading.Lock()

    def hold() -> None:
        with lock, logging._lock:  # type: ignore[attr-defined]
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        with taskpool.Executor(2) as pool:
            assert list(pool.map(calls.square, range(10))) == [x * x for x in range(10)]
    finally:
        release.set()
        holder.join()


def test_the_dealer_killed_fails_pending_futures_and_leaves_nothing(tmp_path: Path) -> None:
    marker, pid_file = tmp_path / "go", tmp_path / "pid"
    pool = taskpool.Executor(2)
    pending = pool.submit(calls.wait_for_file, str(marker), str(pid_file))
    _wait_for_pid(pid_file)
    workers = _children_of(pool._dealer.pid)
    os.kill(pool._dealer.pid, signal.SIGKILL)
    with pytest.raises(taskpool.WorkerCrashed, match="SIGKILL"):
        pending.result(timeout=60)
    pool.shutdown()
    marker.touch()
    for worker in workers:  # their parent-death signal ends them; we are their subreaper
        _await_gone(worker)


def _await_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)  # reparented to us (a subreaper) if orphaned
        except ChildProcessError:
            pass
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.02)


def test_the_caller_killed_leaves_nothing_behind(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "caller.py"
    marker = tmp_path / "never"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import executor_calls as calls
import taskpool
if __name__ == "__main__":
    pool = taskpool.Executor(2)
    fs = [pool.submit(calls.wait_for_file, {str(marker)!r}, {str(tmp_path / 'pid')!r})]
    print(pool._dealer.pid, flush=True)
    fs[0].result()
""")
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).parent.parent))
    assert caller.stdout is not None
    dealer = int(caller.stdout.readline())
    worker = _wait_for_pid(tmp_path / "pid")
    caller.kill()
    caller.wait()
    _await_gone(worker)
    _await_gone(dealer)
