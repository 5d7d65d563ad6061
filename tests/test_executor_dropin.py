"""taskpool.Executor as a drop-in for ProcessPoolExecutor: the functions users write (in
`python -c`, a script on stdin, the REPL; lambdas, closures), no stale references, a pool
dropped without shutdown(), multiprocessing objects, cancel_futures, a failing initializer,
PPE's constructor, calls that fork, a caller's SIGPIPE, typing, logging and stats.

Interactive cases run a real interpreter. Processes are awaited through pidfds and events
(a file, a weakref callback), never a sleep; deadlines only turn a hang into a failure."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import executor_jobs as jobs
import pytest
from test_executor import WAIT, _await_gone, executor, nothing_left_behind  # noqa: F401 - the fixture

import taskpool

from harness import queues_left

ROOT = Path(__file__).resolve().parent.parent


def _python(args: list[str], stdin: str | None = None, cwd: Path | None = None,
            timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    """A real interpreter (this one), run to its end."""
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


# --- 1. the functions users write ------------------------------------------------------------

_MAIN_SNIPPET = textwrap.dedent("""\
    import taskpool
    OFFSET = 10
    def square(x):
        return x * x

    class Point:
        def __init__(self, x):
            self.x = x

    def point(x):
        return Point(x)

    with taskpool.Executor(2) as ex:
        got = [ex.submit(square, 3).result(), list(ex.map(lambda x: x + OFFSET, range(3)))]
        got.append(type(ex.submit(point, 1).result()) is Point)
        print("GOT", got)

""")  # blank lines end each block, as the REPL needs

@pytest.mark.parametrize("how", ["python -c", "script on stdin", "REPL"])
def test_functions_lambdas_and_classes_of_an_interactive_main_run(how: str,
                                                                  tmp_path: Path) -> None:
    """PPE (fork) runs them; a worker cannot import such a `__main__`: they go by value."""
    if how == "python -c":
        done = _python(["-c", _MAIN_SNIPPET], cwd=tmp_path)
    elif how == "script on stdin":
        done = _python(["-"], stdin=_MAIN_SNIPPET, cwd=tmp_path)
    else:
        done = _python(["-i", "-q"], stdin=_MAIN_SNIPPET, cwd=tmp_path)
    assert "GOT [9, [10, 11, 12], True]" in done.stdout, done.stderr
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_a_dealer_that_cannot_start_tells_the_caller_why(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not only 'exited with status 3': the cause (here the caller's working directory,
    gone by the time the Dealer goes there), in WorkerCrashed's message."""
    import multiprocessing.spawn

    real = multiprocessing.spawn.get_preparation_data

    def gone_dir(name: str) -> dict[str, Any]:
        data = real(name)
        data["dir"] = str(tmp_path / "gone")
        return data

    monkeypatch.setattr(multiprocessing.spawn, "get_preparation_data", gone_dir)
    pool = taskpool.Executor(1)
    try:
        with pytest.raises(taskpool.WorkerCrashed, match="FileNotFoundError.*gone"):
            pool.submit(jobs.square, 2).result(timeout=WAIT)
    finally:
        pool.shutdown()


def _adder(n: int) -> Any:
    def add(x: int) -> int:
        return x + n
    return add


def test_closures_and_local_classes_run() -> None:
    class Local:
        def __init__(self, v: int) -> None:
            self.v = v

    with executor(2) as pool:
        assert pool.submit(_adder(5), 1).result(timeout=WAIT) == 6
        assert pool.submit(lambda: Local(7)).result(timeout=WAIT).v == 7
        assert list(pool.map(_adder(1), range(3), chunksize=2)) == [1, 2, 3]


def test_what_cannot_be_sent_fails_its_future_naming_the_callers_object() -> None:
    with executor(1) as pool:
        future = pool.submit(jobs.power, 2, y=threading.Lock())
        with pytest.raises(TypeError) as caught:  # the pickler's type, as PPE's
            future.result(timeout=WAIT)
        message = str(caught.value)
        assert "executor_jobs.power" in message
        assert "keyword argument 'y'" in message and "lock" in message
        assert "taskpool" not in message  # none of our internal names
        assert pool.submit(jobs.square, 3).result(timeout=WAIT) == 9


# --- 2. no stale references ------------------------------------------------------------------

def _watch(objects: list[Any]) -> tuple[list[weakref.ref[Any]], threading.Semaphore]:
    """Weakrefs to `objects`, and a semaphore released as each dies."""
    gone = threading.Semaphore(0)
    return [weakref.ref(o, lambda _: gone.release()) for o in objects], gone


def _await_deaths(gone: threading.Semaphore, count: int) -> None:
    gc.collect()
    for i in range(count):
        assert gone.acquire(timeout=WAIT), f"only {i} of {count} objects were collected"


def test_no_stale_references_once_a_future_is_resolved() -> None:
    """CPython's test_no_stale_references: the Executor keeps nothing of a resolved call,
    neither its function (a bound method, its future dropped at once), nor its arguments,
    nor its result; whichever batch it travelled in."""
    with executor(2) as pool:
        list(pool.map(jobs.square, range(3000)))  # warm: calls travel in batches
        boxes = [jobs.Box(i) for i in range(300)]
        args, args_gone = _watch(boxes)
        futures = [pool.submit(jobs.box_value, box) for box in boxes]
        results = [f.result(timeout=WAIT) for f in futures]
        assert [r.value for r in results] == list(range(300))
        _, results_gone = _watch(results)
        del boxes, futures, results
        _await_deaths(args_gone, len(args))
        _await_deaths(results_gone, len(args))
        owner = jobs.Box(7)
        _, owner_gone = _watch([owner])
        pool.submit(owner.get)  # the future dropped: its call still runs, then is let go
        del owner
        _await_deaths(owner_gone, 1)


# --- 3. an Executor dropped without shutdown() ------------------------------------------------

_DROPPED = textwrap.dedent("""\
    import gc, json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    import executor_jobs as jobs
    import taskpool
    ex = taskpool.Executor(2)
    future = ex.submit(jobs.square, 3)
    assert future.result() == 9
    dealer = ex._dealer.pid
    workers = [int(p) for t in os.listdir(f"/proc/{dealer}/task")
               for p in open(f"/proc/{dealer}/task/{t}/children").read().split()]
    threads = [ex._feeder, ex._collector]
    started = time.monotonic()
    del ex
    gc.collect()
    for thread in threads:
        thread.join(60)
    print(json.dumps({"alive": [t.is_alive() for t in threads], "dealer": dealer,
                      "workers": workers, "seconds": time.monotonic() - started}))
""")


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_an_executor_dropped_without_shutdown_releases_everything(tmp_path: Path) -> None:
    """As PPE's: once collected, its threads end, its Dealer and workers exit, its queues
    go; the caller's process goes on."""
    done = _python(["-c", _DROPPED, str(Path(jobs.__file__).parent)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["alive"] == [False, False]
    assert len(report["workers"]) == 2
    for pid in [report["dealer"], *report["workers"]]:
        assert _gone(pid), f"PID {pid} is still there"
    assert not [n for n in queues_left() if f"-{report['dealer']}-" in n]


def test_an_executor_dropped_at_once_finishes_its_calls_at_interpreter_exit(
        tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(Path(jobs.__file__).parent)!r})
        import executor_jobs as jobs
        import taskpool
        taskpool.Executor(2).submit(jobs.touch, {str(marker)!r})
    """)
    done = _python(["-c", script], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert marker.exists()


# --- 5. shutdown(cancel_futures=True) --------------------------------------------------------

def test_cancel_futures_after_a_burst_on_a_warm_pool_starts_what_idle_workers_take(
        tmp_path: Path) -> None:
    """CPython's test_cancel_futures: of a burst of 50 submits, shutdown(cancel_futures=True)
    cancels what has not started, and the calls that started (at least one: the workers
    were idle) finish."""
    marker, started = tmp_path / "go", tmp_path / "started"
    started.mkdir()
    pool = taskpool.Executor(2)
    try:
        assert list(pool.map(jobs.square, range(500))) == [x * x for x in range(500)]  # warm
        futures = [pool.submit(jobs.wait_for_file, str(marker), str(started), i)
                   for i in range(50)]
        pool.shutdown(wait=False, cancel_futures=True)
        marker.touch()
    finally:
        marker.touch()
        pool.shutdown(wait=True)
    cancelled = [f for f in futures if f.cancelled()]
    others = [f for f in futures if not f.cancelled()]
    assert cancelled, "nothing was cancelled"
    assert others, "the burst was cancelled whole: an idle worker should have started one"
    assert all(f.done() and f.exception() is None for f in others)
    ran = len([n for n in os.listdir(started) if not n.startswith(".")])
    assert ran <= len(others)  # a cancelled call never ran (a file a worker process)


# --- 6. a failing initializer -----------------------------------------------------------------

def test_a_failing_initializer_is_logged_as_ppe_logs_it_and_breaks_the_pool(
        tmp_path: Path) -> None:
    """In the worker, through the `concurrent.futures` logger at CRITICAL with the
    exception, where a handler the initializer attached sees it; the pool is then broken:
    pending futures and submit() raise BrokenProcessPool (WorkerCrashed)."""
    seen = tmp_path / "seen"
    pool = taskpool.Executor(1, None, jobs.failing_initializer_that_logs_to, (str(seen),))
    try:
        with pytest.raises(BrokenProcessPool):
            pool.submit(jobs.square, 2).result(timeout=WAIT)
        pool._collector.join(timeout=WAIT)
        with pytest.raises(BrokenProcessPool):
            pool.submit(jobs.square, 3)
    finally:
        pool.shutdown()
    lines = seen.read_text().splitlines()
    assert lines and all(line == "CRITICAL|Exception in initializer:|ValueError('bad config')"
                         for line in lines), lines


# --- 7. PPE's constructor ---------------------------------------------------------------------

def test_the_constructor_takes_ppes_signature() -> None:
    """Every parameter of ProcessPoolExecutor, with its kind and default, in its place; ours
    come after, keyword-only."""
    import inspect
    from concurrent.futures import ProcessPoolExecutor

    ppe = list(inspect.signature(ProcessPoolExecutor.__init__).parameters.values())
    ours = list(inspect.signature(taskpool.Executor.__init__).parameters.values())
    for theirs, mine in zip(ppe, ours):
        assert (mine.name, mine.kind, mine.default) == (theirs.name, theirs.kind, theirs.default)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(ppe):])


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_mp_context_forkserver_and_spawn_are_what_the_pool_does(method: str,
                                                                tmp_path: Path) -> None:
    import multiprocessing

    with executor(1, multiprocessing.get_context(method), jobs.init_worker,
                  ("by initargs", str(tmp_path))) as pool:
        assert pool.submit(jobs.initialized).result(timeout=WAIT)[1] == "by initargs"


def test_mp_context_fork_and_non_contexts_are_refused_clearly() -> None:
    import multiprocessing

    with pytest.raises(ValueError, match="cannot use the 'fork' start method.*forkserver"):
        taskpool.Executor(1, mp_context=multiprocessing.get_context("fork"))
    with pytest.raises(TypeError, match="mp_context must be a multiprocessing context"):
        taskpool.Executor(1, mp_context="forkserver")


# --- 8. a call that forks ---------------------------------------------------------------------

def test_the_child_of_a_call_that_forks_never_acts_as_a_worker() -> None:
    """Its child leaves when it returns into the worker (0) or raises there (1): it takes no
    job and no Shutdown, so every call is answered and shutdown() returns."""
    with executor(2) as pool:
        assert pool.submit(jobs.fork_in_call).result(timeout=WAIT) == 0
        assert pool.submit(jobs.fork_in_call, True).result(timeout=WAIT) == 1
        assert list(pool.map(jobs.square, range(200))) == [x * x for x in range(200)]


# --- 9. a caller that restored SIGPIPE's default action ---------------------------------------

_SIGPIPE_DEFAULT = textwrap.dedent("""\
    import json, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import executor_jobs as jobs
    import taskpool
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ex = taskpool.Executor(1)
    assert ex.submit(jobs.square, 2).result() == 4
    dealer = ex._dealer.pid
    workers = [int(p) for t in os.listdir(f"/proc/{dealer}/task")
               for p in open(f"/proc/{dealer}/task/{t}/children").read().split()]
    print(json.dumps(workers), flush=True)
    future = ex.submit(jobs.wait_for_file, sys.argv[2])
    os.kill(dealer, signal.SIGKILL)
    try:
        future.result(60)
    except taskpool.WorkerCrashed:
        print("CRASHED", flush=True)
    ex.shutdown()
    print("ALIVE")
""")


def test_a_caller_with_sigpipe_at_its_default_lives_when_its_dealer_dies(
        tmp_path: Path) -> None:
    done = _python(["-c", _SIGPIPE_DEFAULT, str(Path(jobs.__file__).parent),
                    str(tmp_path / "never")], cwd=tmp_path)
    lines = done.stdout.splitlines()
    if lines:  # the workers die of their parent-death signal, orphaned to us to reap
        _await_gone(json.loads(lines[0]))
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert lines[1:] == ["CRASHED", "ALIVE"]


# --- 10. typed for its users ------------------------------------------------------------------

_TYPED_SNIPPET = textwrap.dedent("""\
    import taskpool

    def square(x: int) -> int:
        return x * x

    with taskpool.Executor(2) as ex:
        fine: int = ex.submit(square, 3).result()
        also_fine: list[int] = list(ex.map(square, [1, 2]))
        x: str = ex.submit(square, 3).result()
        y: list[str] = list(ex.map(square, [1, 2]))
""")


def test_mypy_strict_on_a_users_snippet_catches_a_wrong_result_type(tmp_path: Path) -> None:
    """taskpool as a type checker finds it installed (a package beside the snippet's path,
    PEP 561: py.typed ships): submit() and map() carry the function's return type."""
    pytest.importorskip("mypy")
    site = tmp_path / "site"
    site.mkdir()
    (site / "taskpool").symlink_to(ROOT / "taskpool")
    (tmp_path / "snippet.py").write_text(_TYPED_SNIPPET)
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MYPYPATH", None)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "snippet.py"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=300)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, done.stdout
    assert errors[0].startswith("snippet.py:9:") and '"int", variable has type "str"' in errors[0]
    assert errors[1].startswith("snippet.py:10:")


# --- 11. crashes are not silent ---------------------------------------------------------------

def test_crashes_and_resends_are_logged_and_counted_in_stats(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="taskpool.executor")
    with executor(1, max_attempts=2) as pool:
        assert pool.stats == taskpool.ExecutorStats(0, 0, 0, 0)
        with pytest.raises(taskpool.WorkerCrashed):
            pool.submit(jobs.kill_own_worker).result(timeout=WAIT)
        assert pool.submit(jobs.square, 3).result(timeout=WAIT) == 9
        stats = pool.stats
        assert (stats.calls, stats.crashes, stats.resends, stats.failed) == (2, 2, 1, 1)
        with pytest.raises(AttributeError):
            pool.stats = stats  # type: ignore[misc]
        with pytest.raises(AttributeError):
            stats.crashes = 0  # type: ignore[misc]
    lost = [r for r in caplog.records if r.name == "taskpool.executor"
            and r.levelno == logging.WARNING and "sent again" in r.getMessage()]
    assert [r.getMessage().endswith(f"{n} call(s) sent again") for r, n in zip(lost, (1, 0))
            ] == [True, True]
    assert any("failed with WorkerCrashed" in r.getMessage() for r in caplog.records)


_QUIET_UNLESS_CONFIGURED = textwrap.dedent("""\
    import logging, sys
    sys.path.insert(0, sys.argv[1])
    import executor_jobs as jobs
    import taskpool
    if sys.argv[2] == "configured":
        logging.basicConfig(format="%(levelname)s %(name)s %(message)s")
    with taskpool.Executor(1, max_attempts=1) as ex:
        try:
            ex.submit(jobs.kill_own_worker).result()
        except taskpool.WorkerCrashed:
            print("CRASHED")
    print(len(logging.root.handlers), logging.root.level, logging.lastResort is not None)
""")


@pytest.mark.parametrize("logging_", ["not configured", "configured"])
def test_the_executors_warnings_show_only_where_the_caller_configured_logging(
        logging_: str, tmp_path: Path) -> None:
    done = _python(["-c", _QUIET_UNLESS_CONFIGURED, str(Path(jobs.__file__).parent),
                    logging_], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    if logging_ == "configured":
        assert done.stdout.splitlines() == ["CRASHED", "1 30 True"]
        assert "WARNING taskpool.executor A worker (PID" in done.stderr
    else:
        assert done.stdout.splitlines() == ["CRASHED", "0 30 True"]  # nothing global changed
        assert done.stderr == ""


# --- 4. multiprocessing objects ---------------------------------------------------------------

_MP_OBJECTS = textwrap.dedent("""\
    import multiprocessing, sys
    sys.path.insert(0, sys.argv[1])
    import executor_jobs as jobs
    import taskpool
    # Manager() proxies as arguments: they connect back with the caller's authkey.
    with multiprocessing.Manager() as manager, taskpool.Executor(2) as ex:
        shared = manager.dict()
        ex.submit(jobs.store, shared, "k", 5).result(60)
        print("manager", shared["k"])
        # A Connection as an argument: its descriptor crosses as PPE sends it, through
        # multiprocessing's resource sharer, never as a bare number.
        ours, theirs = multiprocessing.Pipe()
        ex.submit(jobs.send_on, theirs, "over the pipe").result(60)
        print("connection", ours.recv())
    # Queue, Lock, Event, Semaphore in initargs, of a context whose objects may cross to a
    # new process: 'forkserver' (multiprocessing's default from Python 3.14).
    ctx = multiprocessing.get_context("forkserver")
    queue, lock, event, semaphore = ctx.Queue(), ctx.Lock(), ctx.Event(), ctx.Semaphore(0)
    with taskpool.Executor(1, ctx, jobs.keep_shared, (queue, lock, event, semaphore)) as ex:
        with lock:
            print("lock held by us", ex.submit(jobs.use_shared, "try lock").result(60))
        print("lock free", ex.submit(jobs.use_shared, "try lock").result(60))
        waiting = ex.submit(jobs.use_shared, "wait event")
        event.set()
        print("event", waiting.result(60))
        pid = ex.submit(jobs.use_shared, "put pid").result(60)
        print("queue", queue.get(timeout=60) == pid)
        ex.submit(jobs.use_shared, "release semaphore").result(60)
        print("semaphore", semaphore.acquire(timeout=60))
    # One of the 'fork' context cannot reach workers that are not forks of ours: refused.
    try:
        taskpool.Executor(1, None, jobs.keep_shared,
                          (None, multiprocessing.get_context("fork").Lock(), None, None))
    except ValueError as e:
        print("fork", "initargs[1] (Lock)" in str(e) and "'fork' context" in str(e))
    from multiprocessing import resource_tracker
    print(resource_tracker._resource_tracker._pid)  # it outlives us, to be reaped
""")


def test_manager_proxies_and_multiprocessing_objects_in_initargs_reach_the_workers(
        tmp_path: Path) -> None:
    """In a process of its own: a Manager and the resource tracker of named semaphores
    are that process's children, not the test's."""
    done = _python(["-c", _MP_OBJECTS, str(Path(jobs.__file__).parent)], cwd=tmp_path)
    lines = done.stdout.splitlines()
    if lines and lines[-1].isdigit():  # orphaned to us (a subreaper: see conftest)
        _await_gone([int(lines.pop())])
    assert done.returncode == 0, done.stderr
    assert lines == [
        "manager 5", "connection over the pipe", "lock held by us False", "lock free True",
        "event True", "queue True", "semaphore True", "fork True"], done.stderr


# --- 12. map with chunksize sends chunks --------------------------------------------------------

def test_map_with_chunksize_sends_chunks_not_calls() -> None:
    """A chunk is one call to the pool (Executor.stats counts calls submitted), for one
    iterable as for several; results in order."""
    with executor(2) as pool:
        assert list(pool.map(jobs.square, range(1000), chunksize=100)) == [
            x * x for x in range(1000)]
        assert pool.stats.calls == 10
        assert list(pool.map(jobs.power, range(10), [2] * 10, chunksize=4)) == [
            x**2 for x in range(10)]
        assert pool.stats.calls == 13
