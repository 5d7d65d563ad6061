"""Large results and large arguments through taskpool.Executor and ProcessPoolExecutor, side
by side in alternating rounds, 2 workers each: seconds for `map` over

    2,000 calls each returning 50 KB    (results in several queue messages, or out of them)
    2,000 calls each taking 50 KB        (each batch's pickle in a memfd)
    8 calls each returning 5 MB
    8 calls each taking 5 MB

then the medians, ranges and each round's ratio (ours / PPE's time: under 1 is faster).

    python bench/executor_payloads.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor

import taskpool

SMALL = 50_000
LARGE = 5_000_000
CASES: dict[str, tuple[str, int, int]] = {
    # name: (which way, bytes, calls)
    "2,000 results of 50 KB": ("result", SMALL, 2000),
    "2,000 arguments of 50 KB": ("argument", SMALL, 2000),
    "8 results of 5 MB": ("result", LARGE, 8),
    "8 arguments of 5 MB": ("argument", LARGE, 8),
}


def make_bytes(size: int) -> bytes:
    return b"x" * size


def length(data: bytes) -> int:
    return len(data)


def _seconds(executor: Executor, way: str, size: int, calls: int) -> float:
    # Each argument its own object: one pickle of a batch would carry a repeated one once.
    blobs = [bytes([i % 251]) * size for i in range(calls)] if way == "argument" else []
    started = time.perf_counter()
    if way == "result":
        out = list(executor.map(make_bytes, [size] * calls))
        assert all(len(value) == size for value in out)
    else:
        out = list(executor.map(length, blobs))
        assert out == [size] * calls
    return time.perf_counter() - started


def _round(make: Callable[[], Executor]) -> dict[str, float]:
    with make() as executor:
        list(executor.map(length, [b"w"] * 100))  # warmed: workers up, first batches sized
        return {name: _seconds(executor, *case) for name, case in CASES.items()}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    peers: dict[str, Callable[[], Executor]] = {
        "taskpool.Executor": lambda: taskpool.Executor(2),
        "ProcessPoolExecutor": lambda: ProcessPoolExecutor(2),
    }
    times: dict[str, list[dict[str, float]]] = {name: [] for name in peers}
    for _ in range(rounds):
        for name, make in peers.items():
            times[name].append(_round(make))
    print(f"taskpool from {taskpool.__file__}, {rounds} rounds\n")
    print("| case | peer | seconds (median) | range |\n| --- | --- | ---: | ---: |")
    for case in CASES:
        for name in peers:
            values = [t[case] for t in times[name]]
            print(f"| {case} | {name} | {statistics.median(values):.3f} | "
                  f"{min(values):.3f}-{max(values):.3f} |")
    print("\nEach round's time, taskpool.Executor / ProcessPoolExecutor (median, range):")
    for case in CASES:
        ratios = sorted(a[case] / b[case] for a, b in zip(*times.values()))
        print(f"  {case}: {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
