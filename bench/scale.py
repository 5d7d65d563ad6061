"""What a pool of many workers costs, as a normal user under the kernel's default limits.

    python bench/scale.py [--workers 64 512] [--kills 50]

For each pool size, a CLI run of one `sleep 3600` job a worker, as `nobody` when this is
root (through setpriv: root may pass fs.mqueue.queues_max), with RLIMIT_MSGQUEUE 819,200
bytes and RLIMIT_NOFILE 1,024, soft and hard, as a normal user starts with. Once every
worker runs its job (the events tell):
- start-up: from the Dealer's start (its dealer_started event) to the last worker up (the
  last worker_started), on the events' clock;
- a worker's memory, the mean over the workers, from /proc/PID/smaps_rollup: RSS, PSS (its
  share of the pages the forks leave shared) and USS (its private pages: what its end frees);
- the queues the run holds: each distinct POSIX queue open in any of its processes (main,
  generator, Dealer, workers), its size read from the kernel (mq_getattr), its bytes by
  mqueue.queue_cost, against the 819,200 bytes of RLIMIT_MSGQUEUE; the anonymous shared
  memory mapped (the Dealer's mailboxes); the Dealer's RSS and open descriptors (what
  `ulimit -n` bounds).
The same queue figures for a taskpool.Executor in this process, once each of its workers
runs a call; and the recovery latency (SIGKILL of a busy worker to its job sent again, and
to the replacement up) at the largest size. `make bench` runs it too (bench.py calls
`scale_table`).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peers

from taskpool.posix import mqueue

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MSGQUEUE_BYTES = 819_200  # the kernel's default RLIMIT_MSGQUEUE
USUAL_OPEN_FILES = 1024
QUEUE_NAME_PREFIX = "/taskpool-"  # as /proc/PID/fd shows our (unlinked) queues


def normal_user_limits() -> None:
    """In a child before it execs: the limits a normal user starts with."""
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (DEFAULT_MSGQUEUE_BYTES,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (USUAL_OPEN_FILES,) * 2)


@dataclass(frozen=True)
class Queues:
    sizes: list[tuple[int, int]]  # (max messages, message size) of each distinct queue

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def cost(self) -> int:
        return sum(mqueue.queue_cost(depth, size) for depth, size in self.sizes)

    def describe(self) -> str:
        """`10 x 1024, 10 x 128, 64 of 2 x 128`: each size (messages x bytes), how many of
        it if more than one."""
        counts = collections.Counter(self.sizes)
        return ", ".join(f"{n} of {d} x {s}" if n > 1 else f"{d} x {s}"
                         for (d, s), n in sorted(counts.items(), reverse=True)) or "none"


class PoolFailed(RuntimeError):
    """The pool never had all its workers at work: its first error, as its log said."""


@dataclass(frozen=True)
class Footprint:
    workers: int
    up: float  # seconds from the Dealer's start to the last worker up
    rss: float  # MB, mean per worker
    pss: float
    uss: float
    queues: Queues
    shared_bytes: int  # anonymous shared memory (the mailboxes) mapped in the run
    dealer_fds: int
    dealer_rss: float  # MB


class _MqAttr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long),
                ("msgsize", ctypes.c_long), ("curmsgs", ctypes.c_long),
                ("reserved", ctypes.c_long * 4)]


_librt = ctypes.CDLL("librt.so.1", use_errno=True)


def _queue_size(fd_path: str) -> tuple[int, int]:
    """A queue's size, from the kernel: the descriptor reopened through /proc."""
    fd = os.open(fd_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        attr = _MqAttr()
        if _librt.mq_getattr(fd, ctypes.byref(attr)) != 0:
            raise OSError(ctypes.get_errno(), f"mq_getattr {fd_path}")
        return attr.maxmsg, attr.msgsize
    finally:
        os.close(fd)


def queues_held(pids: list[int]) -> Queues:
    """Each distinct queue of ours open in any of `pids` (a queue shared by fork is open in
    several)."""
    found: dict[tuple[int, int], tuple[int, int]] = {}
    for pid in pids:
        for fd_path in _fd_paths(pid):
            try:
                if not os.readlink(fd_path).startswith(QUEUE_NAME_PREFIX):
                    continue
                st = os.stat(fd_path)
                if (st.st_dev, st.st_ino) not in found:
                    found[(st.st_dev, st.st_ino)] = _queue_size(fd_path)
            except OSError:
                continue  # closed meanwhile
    return Queues(list(found.values()))


def shared_memory_held(pids: list[int]) -> int:
    """Bytes of anonymous shared mappings (mmap(-1, ...): `rw-s ... /dev/zero (deleted)` in
    /proc/PID/maps, such as the Dealer's mailboxes) in any of `pids`, each mapping once
    however many processes inherited it. Mapped, not necessarily touched."""
    # A mapping whose pages have different protections (a worker fences off the slots not
    # its own) shows as several lines: its extent is the furthest offset + length of any.
    extent: dict[tuple[str, str], int] = {}
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 6 and fields[1].endswith("s") and fields[5] == "/dev/zero":
                start, end = (int(x, 16) for x in fields[0].split("-"))
                key = (fields[3], fields[4])
                extent[key] = max(extent.get(key, 0), int(fields[2], 16) + end - start)
    return sum(extent.values())


def _fd_paths(pid: int) -> list[str]:
    try:
        return [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """`pid`'s children, theirs, and so on."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in _listdir(f"/proc/{parent}/task"):
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            found += map(int, children)
            todo += map(int, children)
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _memory_kb(pid: int) -> dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) of `pid`, in kB."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                fields[name] = float(rest.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def _events(stream: Any) -> Iterator[dict[str, Any]]:
    for line in stream:
        yield json.loads(line)


def footprint(workers: int) -> Footprint:
    """A CLI run of `workers` workers as a normal user under the default limits (see the
    module doc), measured once every worker runs its job."""
    workdir = Path(tempfile.mkdtemp(prefix="taskpool-bench-"))
    os.chmod(workdir, 0o755)
    jobs = workdir / "jobs.txt"
    jobs.write_text("sleep 3600\n" * workers)
    os.chmod(jobs, 0o644)
    fifo = workdir / "events"  # a FIFO the other user can open: a pipe of ours it cannot
    os.mkfifo(fifo, 0o666)
    os.chmod(fifo, 0o666)
    as_user = (["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
               if os.getuid() == 0 else [])
    run = subprocess.Popen(
        [*as_user, sys.executable, "-m", "taskpool", "run", "--workers", str(workers),
         "--jobs", str(jobs), "--log", os.devnull, "--events", str(fifo)],
        cwd="/tmp", stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=normal_user_limits)
    try:
        with open(fifo) as stream:
            measured = _measure_when_busy(_events(stream), run.pid, workers)
            peers.stop_at_once(run, _events(stream))
    finally:
        if run.poll() is None:
            run.kill()
        run.wait()
        shutil.rmtree(workdir)
    return measured


def _measure_when_busy(events: Iterator[dict[str, Any]], main: int,
                       workers: int) -> Footprint:
    started_at = last_up = None
    dealer = 0
    pids: list[int] = []
    busy = 0
    errors: list[str] = []
    for ev in events:
        if ev.get("level") == "error":
            errors.append(ev.get("text", ev["event"]))
        if ev["event"] == "dealer_started":
            started_at, dealer = ev["t"], ev["pid"]
        elif ev["event"] == "worker_started":
            pids.append(ev["pid"])
            last_up = ev["t"]
        elif ev["event"] == "job_started":
            busy += 1
            if busy == workers:
                break
    else:
        raise PoolFailed(errors[0] if errors else "it ended before every worker ran a job")
    assert started_at is not None and last_up is not None
    memory = [_memory_kb(pid) for pid in pids]
    return Footprint(
        workers=workers, up=last_up - started_at,
        **{key: statistics.mean(m[key] for m in memory) / 1024 for key in ("rss", "pss", "uss")},
        queues=queues_held([main, *descendants(main)]),
        shared_bytes=shared_memory_held([main, *descendants(main)]),
        dealer_fds=len(_fd_paths(dealer)), dealer_rss=_memory_kb(dealer)["rss"] / 1024)


def executor_queues(workers: int) -> tuple[Queues, int]:
    """The queues a taskpool.Executor of `workers` workers holds (its Dealer and workers:
    this process holds none), once each worker runs a call: each call opens a FIFO (kept
    open for writing here, so the open does not block), then notes its pid, then reads the
    FIFO until this process closes it, which ends them all."""
    import taskpool

    workdir = Path(tempfile.mkdtemp(prefix="taskpool-bench-"))
    gate = workdir / "gate"
    os.mkfifo(gate)
    held = os.open(gate, os.O_RDWR)
    try:
        with taskpool.Executor(workers) as pool:
            calls = [pool.submit(hold_until_closed, str(gate), str(workdir))
                     for _ in range(workers)]
            _await_pid_files(workdir, workers)
            pool_processes = descendants(os.getpid())
            queues = queues_held(pool_processes)
            shared = shared_memory_held(pool_processes)
            os.close(held)
            held = -1
            for call in calls:
                call.result()
    finally:
        if held >= 0:
            os.close(held)
        shutil.rmtree(workdir)
    return queues, shared


def hold_until_closed(gate: str, notes: str) -> int:
    """An Executor call: see executor_queues."""
    fd = os.open(gate, os.O_RDONLY)
    Path(notes, f"{os.getpid()}.pid").touch()
    try:
        while os.read(fd, 4096):
            pass
    finally:
        os.close(fd)
    return os.getpid()


def _await_pid_files(directory: Path, count: int) -> None:
    """Until `count` distinct workers have noted their pid: woken by inotify, no polling."""
    libc = ctypes.CDLL(None, use_errno=True)
    watch = libc.inotify_init1(os.O_CLOEXEC)
    if watch < 0 or libc.inotify_add_watch(watch, os.fsencode(directory), 0x100) < 0:
        raise OSError(ctypes.get_errno(), "inotify")
    try:
        while sum(name.endswith(".pid") for name in os.listdir(directory)) < count:
            os.read(watch, 65536)  # IN_CREATE: blocks until a file is made
    finally:
        os.close(watch)


def recovery(workers: int, kills: int) -> peers.RecoveryTimes:
    """peers.recovery_latency at `workers` workers, under the default limits, in ms."""
    times = peers.recovery_latency(kills, workers=workers, preexec_fn=normal_user_limits)
    return peers.RecoveryTimes(*([1000 * s for s in field] for field in times))


def _spread(ms: list[float]) -> str:
    if not ms:
        return "not measured: the run ended first | |"
    return (f"{statistics.median(ms):.2f} ms | {min(ms):.2f}-{max(ms):.2f} ms | "
            f"{sorted(ms)[min(len(ms) - 1, int(0.99 * len(ms)))]:.2f} ms")


def scale_table(sizes: list[int], executor_sizes: list[int], kills: int) -> str:
    budget = DEFAULT_MSGQUEUE_BYTES
    rows = []
    for workers in sizes:
        print(f"scale: {workers} workers...", file=sys.stderr)
        try:
            f = footprint(workers)
        except PoolFailed as e:
            rows.append(f"| CLI run, {workers} workers | failed: {e} | | | | | |")
            continue
        rows.append(f"| CLI run, {workers} workers | {f.up:.2f} s | {f.rss:.1f} / {f.pss:.1f} / "
                    f"{f.uss:.1f} MB | {f.queues.count}: {f.queues.describe()} | "
                    f"{f.queues.cost:,} B ({f.queues.cost / budget:.1%}) | "
                    f"{f.shared_bytes:,} B | {f.dealer_rss:.1f} MB, {f.dealer_fds} |")
    for workers in executor_sizes:
        print(f"scale: an Executor of {workers} workers...", file=sys.stderr)
        try:
            q, shared = executor_queues(workers)
        except Exception as e:  # noqa: BLE001 - its row says why, the others are still taken
            rows.append(f"| taskpool.Executor({workers}) | failed: {e} | | | | | |")
            continue
        rows.append(f"| taskpool.Executor({workers}) | | | {q.count}: {q.describe()} | "
                    f"{q.cost:,} B ({q.cost / budget:.1%}) | {shared:,} B | |")
    largest = max(sizes)
    print(f"scale: recovery at {largest} workers...", file=sys.stderr)
    times = recovery(largest, kills)
    return "\n".join([
        "Scale, as a normal user (`nobody`) under the default limits (RLIMIT_MSGQUEUE "
        f"{budget:,} bytes, RLIMIT_NOFILE {USUAL_OPEN_FILES:,}): a CLI run of one "
        "`sleep 3600` job a worker, measured once every worker runs its job. Start-up: the "
        "Dealer's start to the last worker up. Memory: a worker's mean RSS / PSS (its share "
        "of the pages the forks share) / USS (its private pages). Queues: each distinct "
        "POSIX queue the run's processes hold, its size from the kernel, its bytes by "
        "`mqueue.queue_cost` (share of RLIMIT_MSGQUEUE). Shared memory: the anonymous "
        "shared mappings (the mailboxes) of the run's processes, as mapped. An Executor's "
        "figures once each of its workers runs a call.",
        "",
        "| pool | start-up | RSS / PSS / USS a worker | queues (messages x bytes) | queue "
        "bytes | shared memory mapped | Dealer's RSS, descriptors |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"Crash recovery at {largest} workers (as root, under the same limits): "
        f"{len(times.to_resend)} SIGKILLs of a busy worker, from the kill to its death seen "
        "by the Dealer, to its job sent again, and to the replacement up.",
        "",
        "| | median | range | p99 |",
        "| --- | ---: | ---: | ---: |",
        f"| kill -> death seen | {_spread(times.to_death_seen)} |",
        f"| kill -> job re-sent | {_spread(times.to_resend)} |",
        f"| kill -> replacement up | {_spread(times.to_replacement)} |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--executor-workers", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--kills", type=int, default=50)
    args = parser.parse_args()
    print(scale_table(args.workers, args.executor_workers, args.kills))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
