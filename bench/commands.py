"""Jobs of real work: commands a second, 2,000 `true` commands on 2 workers, taskpool
against xargs and GNU parallel side by side; and a worker's memory after many commands.

    python bench/commands.py [--commands 2000] [--workers 2] [--rounds 5]

Each tool runs one command per input line, 2 at a time, and every measurement is of the
whole command (its start-up included, as a user waits for it):

    xargs -P 2 -n 1 true < lines              true ARG, exec'd with no shell
    parallel -j 2 true < lines                GNU parallel (Debian's `parallel`)
    taskpool run --workers 2 --cmd true       /bin/sh -c "true 'ARG'" (true is sh's builtin)
    the same with --journal RUN.db            every outcome in the journal, as --resume needs
    taskpool run --jobs EXEC_TRUE_LINES       a job file of `exec true` lines: no shell, as xargs

The tools run in turn, round after round, so that the load of the machine falls on all of
them alike; the table gives each one's median and range over the rounds. GNU parallel may
be missing: `make bench` installs Debian's `parallel` when it can (root, apt-get), and
without it that row says it was skipped.

The memory figure: one worker runs 100 `sh true`, then a command that prints its worker's
VmRSS (the command's parent is its worker), then 9,900 more, then the same command again.

Prints Markdown; `make bench` runs it too (bench.py calls `commands_table`) and writes it to
bench/results.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RSS = "sh grep VmRSS /proc/$PPID/status"


def _timed(command: list[str], stdin: Path) -> float:
    with stdin.open("rb") as lines:
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, stdin=lines, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: "
                         f"{done.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def _tools(workers: int, scratch: Path) -> dict[str, Callable[[Path], list[str]]]:
    """Each tool's command line for an input file (a fresh journal per taskpool run)."""
    taskpool = [sys.executable, "-m", "taskpool", "run", "--workers", str(workers),
                "--cmd", "true", "--quiet", "--log", str(scratch / "taskpool.log")]
    runs = iter(range(1_000_000))
    tools: dict[str, Callable[[Path], list[str]]] = {
        f"xargs -P {workers} -n 1 true": lambda _: ["xargs", "-P", str(workers), "-n", "1",
                                                     "true"],
        f"taskpool run --workers {workers} --cmd true": lambda _: taskpool,
        "the same with --journal": lambda _: [
            *taskpool, "--journal", str(scratch / f"run{next(runs)}.db")],
    }
    exec_jobs = scratch / "exec.txt"
    exec_jobs.write_text("exec true\n" * sum(1 for _ in (scratch / "lines.txt").open()))
    tools[f"taskpool run --workers {workers} --jobs EXEC_TRUE_LINES"] = lambda _: [
        *taskpool[:taskpool.index("--cmd")], "--jobs", str(exec_jobs),
        *taskpool[taskpool.index("--cmd") + 2:]]
    if shutil.which("parallel"):
        tools[f"GNU parallel -j {workers} true"] = lambda _: [
            "parallel", "--will-cite", "-j", str(workers), "true"]
    return tools


def measure(commands: int, workers: int, rounds: int) -> dict[str, list[float]]:
    """Commands a second of each tool, one figure a round."""
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        lines = scratch / "lines.txt"
        lines.write_text("".join(f"{n}\n" for n in range(1, commands + 1)))
        tools = _tools(workers, scratch)  # after lines.txt: the exec job file is as long
        for _ in range(rounds):
            for name, command in tools.items():
                rates.setdefault(name, []).append(commands / _timed(command(lines), lines))
    return rates


def worker_memory() -> tuple[int, int]:
    """A worker's resident memory (kB) after 100 commands and after 10,000."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = Path(tmp) / "memory.txt"
        jobs.write_text("sh true\n" * 100 + f"{RSS}\n" + "sh true\n" * 9_900 + f"{RSS}\n")
        out = subprocess.run([sys.executable, "-m", "taskpool", "run", "--workers", "1",
                              "--jobs", str(jobs), "--log", "/dev/null"], cwd=ROOT,
                             check=True, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True).stdout
    first, last = (int(n) for n in re.findall(r"VmRSS:\s+(\d+)", out))
    return first, last


def commands_table(commands: int = 2000, workers: int = 2, rounds: int = 5) -> str:
    rates = measure(commands, workers, rounds)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    xargs = next(v for k, v in medians.items() if k.startswith("xargs"))
    parallel = next((v for k, v in medians.items() if k.startswith("GNU parallel")), None)
    rows = ["| tool | commands/s (median) | range | vs xargs | vs GNU parallel |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name, values in rates.items():
        versus = f"{medians[name] / parallel:.1f}x" if parallel else "-"
        rows.append(f"| `{name}` | {medians[name]:,.0f} | {min(values):,.0f}-"
                    f"{max(values):,.0f} | {medians[name] / xargs:.2f}x | {versus} |")
    if parallel is None:
        rows.append("| GNU parallel | skipped: `parallel` is not installed (`make bench` "
                    "installs Debian's when run as root) | | | |")
    first, last = worker_memory()
    rows += ["", f"A worker's VmRSS: {first} kB after 100 `sh true`, {last} kB after 10,000 "
                 f"({100 * (last - first) / first:+.1f}%; target: within 10%)."]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(commands_table(args.commands, args.workers, args.rounds))


if __name__ == "__main__":
    main()
