"""Typed worker pools: how many workers of each job type, and which pool a job line goes to.

Seed 000's dispatcher has one pool of specialised workers per job type: `dispatch 1 3 1 1 1`
starts 1, 3, 1, 1 and 1 workers for types 1 to 5. Here a pool is given by a count (numbered
by position) or by `KIND=COUNT`, which also names it (`fib=2,sleep=1`: type 1 is the `fib`
pool and takes the `fib N` lines; type 2 is the `sleep` pool). A plain `taskpool run
--workers N` is one unnamed pool of N: type 1.

Every pool is supervised one-for-one on its own: a dead type-2 worker is replaced by a
type-2 worker, and its job goes back to the type-2 backlog.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskpool.model.faults import CrashPlan
from taskpool.model.jobs import JobKind, kind_of_label, whole_number
from taskpool.model.policy import SupervisionPolicy

MAX_POOLS = 64  # types are carried as 16 bits on the wire; 64 is plenty for people


class PoolSpecError(ValueError):
    """A --pools value (or dispatch counts) that cannot be used; the message is for people."""


@dataclass(frozen=True)
class Pool:
    number: int  # the job type, 1-based
    size: int  # workers; 0 is allowed (a type that accepts no jobs)
    kind: JobKind | None = None  # set for KIND=COUNT pools: they take that kind's lines

    @property
    def label(self) -> str:
        """How the log names the pool: ``type 2``, or ``type fib`` for a named pool."""
        return f"type {self.kind.label if self.kind else self.number}"


@dataclass(frozen=True)
class PoolLayout:
    pools: tuple[Pool, ...]
    # True when pools were asked for (dispatch, --pools): the log then names each job's
    # pool and each worker's type. False for a plain run: one pool, the core's log.
    typed: bool = False

    @classmethod
    def single(cls, workers: int) -> PoolLayout:
        return cls((Pool(1, workers),))

    @classmethod
    def parse(cls, items: list[str]) -> PoolLayout:
        """From dispatch's arguments (``1 3 1``) or --pools split at commas (``fib=2``)."""
        pools: list[Pool] = []
        kinds: set[JobKind] = set()
        for number, item in enumerate(items, start=1):
            name, _, count_text = item.rpartition("=")
            kind = None
            if name:
                try:
                    kind = kind_of_label(name.strip().lower())
                    if kind is JobKind.CALL:
                        raise KeyError(name)  # the Executor's, not a job file's
                except KeyError:
                    raise PoolSpecError(
                        f"{item!r}: unknown job kind {name!r} (expected fib, sleep, alloc, "
                        "crash, sh, exec or call)") from None
                if kind in kinds:
                    raise PoolSpecError(f"{item!r}: a second pool for {kind.label} jobs")
                kinds.add(kind)
            try:
                size = whole_number(count_text.strip())
            except ValueError:
                size = -1
            if size < 0:
                raise PoolSpecError(f"{item!r}: {count_text!r} is not a whole number of "
                                    "workers (0 or more)")
            pools.append(Pool(number, size, kind))
        if not pools:
            raise PoolSpecError("no pools given")
        if len(pools) > MAX_POOLS:
            raise PoolSpecError(f"{len(pools)} pools: at most {MAX_POOLS}")
        if not any(pool.size for pool in pools):
            raise PoolSpecError("every pool has 0 workers: nothing could run")
        return cls(tuple(pools), typed=True)

    @property
    def total_workers(self) -> int:
        return sum(pool.size for pool in self.pools)

    def pool(self, number: int) -> Pool:
        return self.pools[number - 1]

    def check_type(self, number: int) -> str | None:
        """Why a job of type `number` cannot run here, or None if it can."""
        if not 1 <= number <= len(self.pools):
            return f"type {number} is out of range 1..{len(self.pools)}"
        if self.pools[number - 1].size == 0:
            return f"type {number} has no workers (its pool was given 0)"
        return None

    def pool_for_kind(self, kind: JobKind) -> int | str:
        """The type a core line (`fib 30`) without type= goes to: the pool named for its
        kind, or the only pool if it is not named for another kind; else the reason it
        needs a type=."""
        for pool in self.pools:
            if pool.kind is kind:
                return pool.number
        if len(self.pools) == 1 and self.pools[0].kind is None:
            return 1
        return (f"no pool is named for {kind.label} jobs: add type=T to the line, or name a "
                f"pool {kind.label}=N")

    def describe(self) -> str:
        return ", ".join(f"{pool.label}: {pool.size}" for pool in self.pools)


@dataclass(frozen=True)
class PoolSpec:
    """What a run asks of its pool, whichever engine runs it: the layout of its typed pools,
    the crash plan (a demo's or a test's) and the supervision policy."""

    layout: PoolLayout
    plan: CrashPlan = CrashPlan()
    policy: SupervisionPolicy = SupervisionPolicy()
    preempt: bool = False  # --preempt: an urgent job may stop a running lower one
