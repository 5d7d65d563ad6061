"""Run taskpool as a user would, and watch it through its log.

A `PoolRun` starts `python -m taskpool run ...` in a session of its own (so that a test can
send SIGINT to its whole process group, as a terminal does), reads its log line by line in a
thread, and lets a test wait for a log line (an event), never for a fixed time.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0  # generous: a loaded 2-core CI machine must never fail a correct run

WORKER_START = re.compile(r"^\[Worker (\d+)(?: type (\S+))?\] Starting up$")
ROLE_START = re.compile(r"^\[(Dealer|TaskGenerator)\] Starting \(PID (\d+)\)")


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def expected_result(kind: str, arg: float) -> float | int:
    return fib(int(arg)) if kind == "fib" else float(arg)


class PoolRun:
    """One taskpool process tree, started in its own session."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        stdin: bytes | None = None,
        pipe_stdin: bool = False,
        preexec_fn: Callable[[], None] | None = None,
        user: int | None = None,
        command_name: str = "run",
    ) -> None:
        command = [sys.executable, "-m", "taskpool", command_name, *args]
        if user is not None:
            command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                       *command]
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._stdin_data = stdin
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.PIPE if (stdin is not None or pipe_stdin) else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
        RUNS.append(self)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    _closed = False

    def wait_until(self, predicate: Callable[[list[str]], bool], timeout: float = WAIT) -> bool:
        """Block until predicate(log lines) holds (True) or the log ends (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.lines):
                remaining = deadline - time.monotonic()
                if self._closed:
                    return False
                if remaining <= 0:
                    raise AssertionError("timed out waiting; log:\n" + self.log_text())
                self._changed.wait(remaining)
            return True

    def wait_for(self, pattern: str, count: int = 1, timeout: float = WAIT) -> list[re.Match[str]]:
        """Block until `count` log lines match `pattern`; return the matches."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in map(regex.search, self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    raise AssertionError(
                        f"log never showed {count} x {pattern!r}; log:\n" + self.log_text())
                self._changed.wait(remaining)

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def finish(self, timeout: float = WAIT * 2) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def log_text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def worker_pids(self) -> list[int]:
        return [int(m.group(1)) for m in map(WORKER_START.match, self.lines) if m]

    def worker_types(self) -> dict[int, str]:
        """pid: type label (``2``, ``fib``), for the workers of typed pools."""
        return {int(m.group(1)): m.group(2) for m in map(WORKER_START.match, self.lines)
                if m and m.group(2)}

    def role_pid(self, role: str) -> int:
        match = self.wait_for(rf"^\[{role}\] Starting \(PID (\d+)\)")[0]
        return int(match.group(1))

    def seen_pids(self) -> set[int]:
        pids = set(self.worker_pids())
        pids.update(int(m.group(2)) for m in map(ROLE_START.match, self.lines) if m)
        return pids


RUNS: list[PoolRun] = []


def write_job_file(directory: Path, lines: list[str]) -> Path:
    path = directory / "jobs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_exactly_once(records: list[dict[str, Any]], job_ids: range | Sequence[int]) -> None:
    ids = [r["job"] for r in records]
    doubled = {i for i, n in Counter(ids).items() if n > 1}
    assert not doubled, f"results recorded more than once: {sorted(doubled)}"
    assert sorted(ids) == sorted(job_ids), (
        f"missing {sorted(set(job_ids) - set(ids))}, unexpected {sorted(set(ids) - set(job_ids))}")


def assert_done_right(records: list[dict[str, Any]]) -> None:
    for r in records:
        assert r["status"] == "done", r
        assert r["result"] == expected_result(r["kind"], r["arg"]), r
        assert r["attempts"] >= 1 and isinstance(r["worker"], int), r


def kill_workers_at_random(run: PoolRun, rng: random.Random, kills: int, pool_size: int) -> int:
    """Kill a random live worker at a random instant, wait for its replacement to start,
    repeat; stop early when the run is finishing. Returns how many were killed."""
    killed: list[int] = []
    for _ in range(kills):
        def pool_full_or_finishing(lines: list[str]) -> bool:
            if any("All jobs completed" in line for line in lines):
                return True
            return len(run.worker_pids()) >= pool_size + len(killed)

        if not run.wait_until(pool_full_or_finishing):
            break
        if "All jobs completed" in run.log_text():
            break
        dead = {int(pid) for pid in re.findall(r"^\[Supervisor\] Worker PID (\d+) ",
                                               run.log_text(), re.M)}
        live = [pid for pid in run.worker_pids() if pid not in killed and pid not in dead]
        if not live:
            continue
        victim = rng.choice(live)
        time.sleep(rng.uniform(0, 0.01))  # the random instant; not a synchronisation
        kill_quietly(victim)
        killed.append(victim)
    return len(killed)


# --- leftovers ------------------------------------------------------------------------------

def _group_members(pgid: int) -> list[int]:
    """Processes (alive or zombie) in process group `pgid`: every process of a run."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def await_exit(pids: list[int], timeout: float) -> list[int]:
    """Wait, in the kernel, for each pid to end (pidfds become readable at exit); the pids
    still running when the time is up."""
    deadline = time.monotonic() + timeout
    running = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
        if not ready:
            running.append(pid)
    return running


def _reap_if_ours(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def leftovers_of(run: PoolRun, timeout: float = 10.0) -> list[str]:
    """What a finished run left behind: live or zombie processes of its group, and queues.
    Processes get `timeout` to go (the promise is 2 s; the margin is for a loaded CI)."""
    if run.proc.poll() is None:
        return [f"main (PID {run.pid}) is still running"]
    members = [p for p in _group_members(run.pid)]
    await_exit(members, timeout)
    for pid in members:
        _reap_if_ours(pid)  # orphans are reparented to the test process, a subreaper
    problems = []
    for pid in _group_members(run.pid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        problems.append(f"PID {pid} state {state}: {cmd}")
    return problems


def queues_left() -> list[str]:
    try:
        return [name for name in os.listdir("/dev/mqueue") if name.startswith("taskpool-")]
    except FileNotFoundError:
        return []


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
