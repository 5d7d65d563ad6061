"""The Executor's targets, side by side in alternating rounds: 10,000 submits through
taskpool.Executor, ProcessPoolExecutor and multiprocessing.Pool.imap_unordered(chunksize=1),
each round's ratios, then 1,000,000 no-op items through Executor.map against
multiprocessing.Pool.map with its default chunksize. 2 workers each.

    python bench/executor_side_by_side.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402 - bench's own module, beside this one

SUBMITS = 10_000
ITEMS = 1_000_000


def _line(name: str, values: list[float]) -> str:
    return (f"| {name} | {statistics.median(values):,.0f} | "
            f"{min(values):,.0f}-{max(values):,.0f} |")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    ours: list[float] = []
    ppe: list[float] = []
    mp: list[float] = []
    for _ in range(rounds):
        ours.append(peers.executor_rate(peers.taskpool_executor, SUBMITS, 1))
        ppe.append(peers.executor_rate(peers.ppe, SUBMITS, 1))
        mp.append(peers.mp_pool_rate(SUBMITS, 1))
    print("| submits | per second (median) | range |\n| --- | ---: | ---: |")
    for name, values in (("taskpool.Executor", ours), ("ProcessPoolExecutor", ppe),
                         ("mp.Pool.imap_unordered(chunksize=1)", mp)):
        print(_line(name, values))
    versus_ppe = sorted(a / b for a, b in zip(ours, ppe))
    versus_mp = sorted(a / b for a, b in zip(ours, mp))
    print(f"\nEach round's ratio: {statistics.median(versus_ppe):.1f}x PPE "
          f"({versus_ppe[0]:.1f}-{versus_ppe[-1]:.1f}), {statistics.median(versus_mp):.2f}x "
          f"mp.Pool ({versus_mp[0]:.2f}-{versus_mp[-1]:.2f}); targets 10x and 2x.\n")
    bulk = [peers.bulk_map_rates(ITEMS, 1) for _ in range(3)]
    print("| map of 1,000,000 items | items/s (median) | range |\n| --- | ---: | ---: |")
    for name in bulk[0]:
        print(_line(name, [b[name] for b in bulk]))


if __name__ == "__main__":
    main()
