"""The Dask engine's cluster: starting our own (a LocalCluster), reaching a given one
(--scheduler), closing it, and keeping distributed's logging out of ours.

Nothing here decides about jobs: the engine (engine.py) does. distributed is imported only
inside these functions, so that importing taskpool.dask costs nothing until a run asks for
the Dask engine (the CLI first asks `require_distributed()`).
"""

# distributed is typed only in part: its Client, Future and cluster methods are untyped calls
# (as for engine.py, in pyproject.toml).
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import logging
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from taskpool.model.pools import PoolLayout
from taskpool.observe import events as ev
from taskpool.observe.log import dask_log as log
from taskpool.observe.log import event
from taskpool.posix import proc

if TYPE_CHECKING:
    from distributed import Client, Future, SpecCluster


INSTALL_HINT = "--engine dask needs the dask extra: pip install 'taskpool[dask]'"
# Seconds for our cluster to close; distributed's Nanny kills a worker process that has not
# stopped after 0.8 of it (4 s), which README gives as the wait.
CLOSE_TIMEOUT = 5.0
RECONNECT_WINDOW = 0.5  # seconds a client tries to reach a lost --scheduler again


class DaskMissing(Exception):
    """`distributed` cannot be imported; the message says how to install it."""


def require_distributed() -> None:
    """Import distributed now, or raise DaskMissing: the CLI checks this before reading any
    job, so that a missing extra is said first and plainly."""
    try:
        import distributed  # noqa: F401
    except ImportError as e:
        raise DaskMissing(f"{INSTALL_HINT} ({e})") from None


def scheduler_address_error(address: str) -> str | None:
    """Why `address` is not an address Dask can connect to (no port, an unknown scheme), or
    None. The CLI asks before anything runs: given such an address, distributed's Client
    fails in a way that leaves it half built, and its finalizer then hangs the exit."""
    from distributed.comm.addressing import parse_address
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme).get_address_host_port(location)
    except NotImplementedError:
        return None  # a scheme without host:port addresses (ucx): Dask will say at connect
    except (ValueError, TypeError) as e:
        return str(e)
    return None


# --- our own cluster ----------------------------------------------------------------------

def configure_own_cluster() -> str:
    """Set Dask's configuration for our own cluster; the run's scratch directory.

    Attempts are counted by the engine, not by Dask (allowed-failures 0: see engine.py);
    and a worker holds every task assigned to it in its own priority queue, so Dask's
    priority orders what waits (no queueing on the scheduler, where only some tasks would
    wait). Its scratch space (distributed's dask-scratch-space: the workers' directories,
    lock files) is a directory of the run's own, removed at the end. Spawned workers inherit
    this configuration."""
    import dask

    scratch = tempfile.mkdtemp(prefix="taskpool-dask-")
    dask.config.set({"distributed.scheduler.allowed-failures": 0,
                     "distributed.scheduler.worker-saturation": math.inf,
                     "temporary-directory": scratch})
    return scratch


def local_cluster(layout: PoolLayout) -> SpecCluster:
    """Our LocalCluster: a scheduler on 127.0.0.1 (no dashboard), and per pool as many
    one-thread worker processes as the pool has workers, each under a nanny that starts a
    new process when one dies; a typed pool's workers offer the resource of its type."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {}
    for pool in layout.pools:
        for i in range(pool.size):
            options: dict[str, Any] = {
                "nthreads": 1, "host": "127.0.0.1", "dashboard": False,
                "memory_limit": 0, "silence_logs": logging.CRITICAL,
                "name": f"type{pool.number}-{i + 1}",
            }
            if layout.typed:
                options["resources"] = {resource_name(pool.number): 1}
            workers[f"type{pool.number}-{i + 1}"] = {"cls": Nanny, "options": options}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0,
                                               "dashboard": False,
                                               # its HTTP server (health, metrics) always
                                               # starts: on loopback, any free port
                                               "dashboard_address": "127.0.0.1:0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.CRITICAL,
                       name="taskpool")


def log_own_cluster_started(cluster: SpecCluster, layout: PoolLayout) -> None:
    log.info("Started a LocalCluster: scheduler %s, %d workers of 1 thread%s",
             cluster.scheduler_address, layout.total_workers,
             f" ({layout.describe()})" if layout.typed else "",
             extra=event(ev.DASK_STARTED, scheduler=cluster.scheduler_address,
                         workers=layout.total_workers, own_cluster=True))


def pool_of_worker(worker_name: str) -> int | None:
    """Our own cluster names its workers ``type2-1``."""
    match = re.fullmatch(r"type(\d+)-\d+", worker_name)
    return int(match.group(1)) if match else None


# --- a given cluster ----------------------------------------------------------------------

def connect(address: str, timeout: float) -> Client:
    """A client of the scheduler at `address`; raises if it cannot be reached within
    `timeout` seconds."""
    from distributed import Client

    log.info("Connecting to the Dask scheduler at %s (for up to %g s)", address, timeout,
             extra=event(ev.DASK_CONNECTING, scheduler=address, timeout=timeout))
    client = Client(address, timeout=timeout, set_as_default=False)
    # Once connected, the same timeout is how long the client tries to reconnect to a lost
    # scheduler, and its close() waits for that; but a loss cancels every future at once,
    # which ends our run (DaskEngine._on_cancelled): a short window, so that it ends within
    # about a second. distributed has no setting of its own for this window.
    client._timeout = RECONNECT_WINDOW
    return client


def log_connected(address: str, workers: dict[str, Any]) -> None:
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    log.info("Connected to the Dask scheduler at %s: %d workers, %d threads",
             address, len(workers), threads,
             extra=event(ev.DASK_STARTED, scheduler=address, workers=len(workers),
                         threads=threads, own_cluster=False))


def cluster_workers(client: Any) -> dict[str, Any]:
    """The cluster's workers, by address, as its scheduler describes them. Since distributed
    2025.4, scheduler_info() lists every worker only when given n_workers=-1 (at first it
    listed 5 by default); before, it took no n_workers and listed them all."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:
        info = client.scheduler_info()
    return dict(info.get("workers", {}))


def taskpool_problems(client: Client, workers: list[str], timeout: float) -> list[str]:
    """Why these workers of a given cluster cannot run taskpool's tasks, one line each: a
    worker that cannot import taskpool, or has another version of it, would fail every task
    it is given (distributed unpickles `run_job` by reference). Asked of all at once;
    raises TimeoutError if they have not all answered within `timeout` seconds."""
    ours = our_version()
    answers = client.run(_taskpool_probe(), workers=workers, on_error="return",
                         callback_timeout=timeout)
    problems = []
    for address, answer in sorted(answers.items()):
        if isinstance(answer, OSError):
            continue  # it could not be reached: gone already (its "remove-worker" follows)
        if isinstance(answer, BaseException):
            problems.append(f"worker {address} cannot import taskpool "
                            f"({type(answer).__name__}: {answer})")
        elif answer != ours:
            problems.append(f"worker {address} has taskpool {answer}, this is {ours}")
    return problems


def our_version() -> str:
    """This taskpool's version: read from the package already loaded (we run in it),
    without an import of the package's lazy front (the Executor)."""
    return str(sys.modules["taskpool"].__version__)


def install_hint() -> str:
    version = our_version()
    return (f"every worker needs taskpool {version} in its Python "
            f"(pip install 'taskpool[dask]=={version}', or this checkout: "
            f"pip install -e '.[dask]')")


def _taskpool_probe() -> Callable[[], str]:
    """What a worker is asked: the version of the taskpool it imports. Made in a function,
    so that cloudpickle sends it by value: a worker without taskpool can still run it, and
    says why the import fails."""

    def taskpool_version() -> str:
        import importlib

        return str(importlib.import_module("taskpool").__version__)

    return taskpool_version


def count_attempts_ourselves(client: Client, prefix: str) -> str | None:
    """Make a given cluster's scheduler err our tasks (those whose key starts with
    `prefix`) at the first death of a worker that holds them, as our own cluster's
    allowed-failures 0 does, and leave every other task to its allowed-failures: so that
    our supervision decides, and Dask never runs a job again by itself after a crash.

    The scheduler errs a task with KilledWorker once its `suspicious` count (the deaths of
    workers that held it) exceeds allowed-failures; a scheduler plugin sets that count to
    allowed-failures as each of our tasks enters the graph, before it can run. The plugin
    is sent by value (a class made here): the scheduler needs nothing of taskpool.
    Returns the plugin's name (to remove it at the end), or None if the scheduler refused
    it (the caller falls back to counting Dask's own runs)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class TaskpoolCountsAttempts(SchedulerPlugin):
        def update_graph(self, scheduler: Any, *, tasks: Any = (), **kwargs: Any) -> None:
            allowed = scheduler.allowed_failures
            for key in tasks:
                if isinstance(key, str) and key.startswith(prefix):
                    state = scheduler.tasks.get(key)
                    if state is not None and state.suspicious < allowed:
                        state.suspicious = allowed

    name = f"{prefix}attempts"
    try:
        client.register_plugin(TaskpoolCountsAttempts(), name=name)
    except Exception as e:  # noqa: BLE001 - a scheduler that takes no pickled plugin
        log.warning("The scheduler refused taskpool's plugin (%s): Dask may run a job again "
                    "by itself after a worker dies (its allowed-failures); each run counts "
                    "as an attempt", e)
        return None
    return name


def remove_plugin(client: Client, name: str | None) -> None:
    if name is None:
        return
    try:
        client.unregister_scheduler_plugin(name)
    except Exception:  # noqa: BLE001 - a lost scheduler took it with it
        pass


def warn_of_missing_resources(layout: PoolLayout, workers: dict[str, Any]) -> None:
    """A typed pool whose resource no worker of a given cluster offers: its jobs wait."""
    if not layout.typed:
        return
    offered = {name for w in workers.values() for name in w.get("resources", {})}
    for pool in layout.pools:
        if pool.size and resource_name(pool.number) not in offered:
            log.warning("No worker of the cluster offers %s yet: its jobs wait for one "
                        "(dask worker ... --resources %s=1)",
                        resource_name(pool.number), resource_name(pool.number))


def resource_name(pool: int) -> str:
    """The Dask worker resource a job of type `pool` asks for: ``type2``."""
    return f"type{pool}"


# --- closing ------------------------------------------------------------------------------

def close_cluster(client: Client | None, cluster: SpecCluster | None, scratch: str | None,
                  outstanding: Iterable[Future[Any]]) -> None:
    """Close the client, and our cluster: its workers are asked to stop and killed if they
    do not within CLOSE_TIMEOUT (a job still running after --grace); remove our scratch
    directory."""
    if client is not None:
        futures = list(outstanding)
        if futures:
            try:
                client.cancel(futures)
            except Exception:  # noqa: BLE001 - a lost scheduler: nothing to cancel
                pass
        client.close(timeout=CLOSE_TIMEOUT)
    try:
        if cluster is not None:
            _close_or_kill(cluster)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _close_or_kill(cluster: SpecCluster) -> None:
    """Close our cluster; if it does not close within CLOSE_TIMEOUT, SIGKILL its worker
    processes. distributed's own fallback is SIGTERM, which our workers hold blocked (see
    DaskEngine.execute); and a nanny whose worker is starting again after a death waits for
    it to connect before asking it to stop, which a closing scheduler may never allow."""
    try:
        cluster.close(timeout=CLOSE_TIMEOUT)
        return
    except Exception as e:  # noqa: BLE001 - distributed's TimeoutError or a broken close
        why = str(e) or type(e).__name__
    for pid in _our_worker_pids(cluster):
        if proc.kill_child(pid):
            log.warning("Worker PID %d did not stop as the cluster closed (%s): killed it",
                        pid, why, extra=event(ev.WORKER_KILLED, worker=pid,
                                              reason="close_timeout"))


def _our_worker_pids(cluster: SpecCluster) -> list[int]:
    """The pids of our cluster's worker processes, each started by its nanny in our
    process (distributed's Nanny.process.process is the multiprocessing child)."""
    pids = []
    for nanny in list(getattr(cluster, "workers", {}).values()):
        child = getattr(getattr(nanny, "process", None), "process", None)
        pid = getattr(child, "pid", None)
        if isinstance(pid, int):
            pids.append(pid)
    return pids


# --- distributed's logging ----------------------------------------------------------------

_NANNY_EXIT = re.compile(r"^Worker process (\d+) (?:was killed by signal (\d+)|exited with "
                         r"status (\d+))")


class _NannyExits(logging.Handler):
    """distributed has no hook for a worker process's exit status; its nanny (in our
    process, for our own cluster) logs it. This handler turns that line into an inbox item,
    ("worker_exited", pid, how)."""

    def __init__(self, post: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(logging.INFO)
        self.post = post

    def emit(self, record: logging.LogRecord) -> None:
        match = _NANNY_EXIT.match(record.getMessage())
        if match is None:
            return
        pid = int(match.group(1))
        # As waitpid() would have given it: a signal's number, or the exit code shifted.
        if match.group(2) is not None:
            status = int(match.group(2))
        else:
            status = int(match.group(3)) << 8
        self.post(("worker_exited", pid, proc.describe_wait_status(status)))


# The loggers of what runs in our process for the Dask engine: distributed's client (and our
# own cluster's scheduler and nannies), and the libraries under its event loop. dask's
# logging configuration gives some of them a stderr handler of their own.
_THEIR_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")


class _IntoOurLog(logging.Handler):
    """distributed's records (and tornado's, asyncio's: its event loop's) become inbox
    items, ("their_log", logger, text), which the main loop writes to taskpool's log as one
    [Dask] line at debug level: in --events, and in the text log with --verbose; never
    raw to stderr. What they say that matters (a worker lost, the scheduler lost, a task
    that failed), the engine says itself, in its own words. One line a record: a
    traceback is reduced to its exception."""

    def __init__(self, post: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(logging.DEBUG)
        self.post = post

    def emit(self, record: logging.LogRecord) -> None:
        try:
            lines = record.getMessage().strip().splitlines()
            text = lines[0] if lines else ""
            error = record.exc_info[1] if record.exc_info else None
            if error is not None:
                text = f"{text} ({type(error).__name__}: {error})".strip()
            self.post(("their_log", record.name, f"{record.levelname.lower()}: {text}"))
        except Exception:  # noqa: BLE001 - a log line must never take a thread down
            pass


def quiet_distributed(post: Callable[[tuple[Any, ...]], None]) -> None:
    """distributed logs to stderr, our log; its records go to `post` instead (see
    _IntoOurLog), and the nanny's line about a worker process's exit also as an inbox item
    of its own. Only the CLI's process runs the Dask engine: these loggers are its own."""
    import distributed  # noqa: F401 - it sets up its loggers on import: route them after

    forward = _IntoOurLog(post)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in _THEIR_LOGGERS:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    for name in _THEIR_LOGGERS:
        top = logging.getLogger(name)
        top.addHandler(forward)
        top.propagate = False
    logging.getLogger("distributed.nanny").addHandler(_NannyExits(post))
