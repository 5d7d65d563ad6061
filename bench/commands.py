"""Jobs of real work: commands a second against xargs -P and GNU parallel, and a worker's
memory after many commands. A benchmark, not a test: it asserts nothing.

    .venv/bin/python bench/commands.py [N]      # N commands (default 2000), 2 workers

Each figure is the best of REPEATS runs of the whole command (interpreter start-up
included, as for xargs and parallel), `true` run N times on 2 workers: taskpool's `exec
true` and `sh true` lines (with and without --journal), `xargs -P 2 -n 1 true`, and
`parallel -j 2 true` when GNU parallel is installed.

The memory figure: one worker runs 100 `sh true`, then a command that prints its worker's
VmRSS (the command's parent is its worker), then 9,900 more, then the same command again.

The orphan figure: a worker is SIGKILLed while its command (a shell, a subshell, a sleep)
runs; the time from the kill to the end of the last process of the command's group, seen
through pidfds, KILLS times.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 3
KILLS = 10
RSS = "sh grep VmRSS /proc/$PPID/status"


def rate(command: list[str] | str, count: int, *, shell: bool = False) -> float:
    started = time.perf_counter()
    subprocess.run(command, shell=shell, check=True, cwd=ROOT,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return count / (time.perf_counter() - started)


def best_rate(command: list[str] | str, count: int, *, shell: bool = False) -> float:
    return max(rate(command, count, shell=shell) for _ in range(REPEATS))


def taskpool_rate(workdir: Path, line: str, count: int, journal: bool) -> float:
    jobs = workdir / "jobs.txt"
    jobs.write_text(f"{line}\n" * count)
    command = [sys.executable, "-m", "taskpool", "run", "--workers", "2", "--jobs", str(jobs),
               "--log", "/dev/null", "--results", str(workdir / "r.jsonl")]
    if not journal:
        return best_rate(command, count)
    return max(rate(command + ["--journal", str(workdir / f"{attempt}.db")], count)
               for attempt in range(REPEATS))


def worker_memory(workdir: Path) -> tuple[int, int]:
    """A worker's resident memory (kB) after 100 commands and after 10,000."""
    jobs = workdir / "memory.txt"
    jobs.write_text("sh true\n" * 100 + f"{RSS}\n" + "sh true\n" * 9_900 + f"{RSS}\n")
    out = subprocess.run([sys.executable, "-m", "taskpool", "run", "--workers", "1", "--jobs",
                          str(jobs), "--log", "/dev/null"], cwd=ROOT, check=True,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True).stdout
    first, last = (int(n) for n in re.findall(r"VmRSS:\s+(\d+)", out))
    return first, last


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _group(pgid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and int(_stat_fields(int(name))[2]) == pgid:
                members.append(int(name))
        except OSError:
            pass
    return members


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None  # ended already (the `mv` of the command)


def orphan_kill_ms(workdir: Path) -> list[float]:
    """Kill -> the killed worker's command tree gone, in ms, KILLS times."""
    once, ready = workdir / "once", workdir / "leader"
    jobs = workdir / "kill.txt"
    jobs.write_text(f"sh [ -e {once} ] || (touch {once}; sleep 300 & echo $$ > {ready}.tmp; "
                    f"mv {ready}.tmp {ready}; wait)\n")
    times = []
    for _ in range(KILLS):
        for path in (once, ready):
            path.unlink(missing_ok=True)
        run = subprocess.Popen([sys.executable, "-m", "taskpool", "run", "--workers", "1",
                                "--jobs", str(jobs), "--log", "/dev/null"], cwd=ROOT,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        while not ready.exists():
            time.sleep(0.01)  # a bench, not the pool: a plain wait for the file
        pgid = int(_stat_fields(int(ready.read_text()))[2])
        worker = int(_stat_fields(pgid)[1])
        pidfds = [fd for fd in map(_pidfd, _group(pgid)) if fd is not None]
        started = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        waiting = list(pidfds)
        while waiting and select.select(waiting, [], [], 10)[0]:
            waiting = [fd for fd in waiting if fd not in select.select(waiting, [], [], 0)[0]]
        times.append(1000 * (time.monotonic() - started))
        for fd in pidfds:
            os.close(fd)
        run.wait(60)
    return times


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = [
            ("taskpool run, `exec true`", taskpool_rate(workdir, "exec true", count, False)),
            ("taskpool run, `sh true`", taskpool_rate(workdir, "sh true", count, False)),
            ("taskpool run --journal, `exec true`",
             taskpool_rate(workdir, "exec true", count, True)),
            ("xargs -P 2 -n 1 true",
             best_rate(f"yes | head -n {count} | xargs -P 2 -n 1 true", count, shell=True)),
        ]
        if shutil.which("parallel"):
            rows.append(("parallel -j 2 true", best_rate(
                f"yes | head -n {count} | parallel -j 2 true", count, shell=True)))
        first, last = worker_memory(workdir)
        kills = orphan_kill_ms(workdir)
    print(f"{count} `true` commands on 2 workers, best of {REPEATS}:\n")
    print("| runner | commands/s |\n| --- | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")
    print(f"\nA worker's VmRSS: {first} kB after 100 `sh true`, {last} kB after 10,000 "
          f"({100 * (last - first) / first:+.1f}%)")
    print(f"A worker SIGKILLed mid-command: its command's tree gone in "
          f"{statistics.median(kills):.1f} ms (median), {max(kills):.1f} ms at most, "
          f"of {KILLS} kills")


if __name__ == "__main__":
    main()
