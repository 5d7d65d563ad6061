"""Many Executors in one user's queue budget: an Executor's queues are small (its settings'
arithmetic), and results and arguments far larger than a queue message still arrive whole,
handed over out of the queue (taskpool/posix/handoff.py).

The test of 16 Executors of 8 workers alive at once runs as a user of its own, under the
kernel's default RLIMIT_MSGQUEUE (marked `scale`), and can be run alone:

    .venv/bin/python -m pytest -q tests/test_executor_scale.py -m scale
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import wait
from pathlib import Path

import executor_jobs as jobs
import pytest

import taskpool
from taskpool.executor.settings import (
    EXECUTOR_QUEUE_COST,
    REQUEST_MESSAGE_SIZE,
    RESULT_MESSAGE_SIZE,
)
from taskpool.posix.handoff import INLINE_LIMIT, PayloadHandoff

from harness import WAIT, as_user

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MSGQUEUE_BYTES = 819_200  # the kernel's default RLIMIT_MSGQUEUE, soft and hard
# A user of these tests' own: the budget is per user, and other tests run as `nobody`.
BUDGET_USER = 47_021


# --- the budget, from the settings ------------------------------------------------------

def test_sixteen_executors_take_under_half_of_a_users_default_queue_budget() -> None:
    """Whatever their number of workers: a worker costs no queue memory."""
    assert EXECUTOR_QUEUE_COST <= 40_000
    assert 16 * EXECUTOR_QUEUE_COST <= DEFAULT_MSGQUEUE_BYTES // 2


def test_a_result_message_takes_a_calls_small_outcome_and_a_request_a_small_batch() -> None:
    # What the sizes must still carry: an Ack and a small Result (a few dozen bytes), and
    # a batch of a few small calls inline (beyond it, a memfd).
    assert RESULT_MESSAGE_SIZE >= 512
    assert REQUEST_MESSAGE_SIZE >= 1024


# --- large payloads ------------------------------------------------------------------------

SIZES = [
    RESULT_MESSAGE_SIZE + 1,  # just over a message: in its datagram
    10 * RESULT_MESSAGE_SIZE,
    INLINE_LIMIT - 100,
    INLINE_LIMIT + 100,  # in a memfd
    1 << 20,
    5_000_000,
]


def test_results_many_times_a_message_arrive_whole() -> None:
    with taskpool.Executor(2) as pool:
        got = list(pool.map(jobs.random_bytes, SIZES, range(len(SIZES)), timeout=WAIT))
        assert got == [jobs.random_bytes(n, seed) for seed, n in enumerate(SIZES)]
        # A batch of many calls whose outcomes together are far larger than a message.
        many = list(pool.map(jobs.random_bytes, [3000] * 400, range(400), timeout=WAIT))
        assert many == [jobs.random_bytes(3000, seed) for seed in range(400)]


def test_large_arguments_arrive_whole_and_come_back_whole() -> None:
    blobs = [jobs.random_bytes(n, seed) for seed, n in enumerate(SIZES)]
    with taskpool.Executor(2) as pool:
        assert list(pool.map(jobs.sha256, blobs, timeout=WAIT)) == [
            hashlib.sha256(b).hexdigest() for b in blobs]
        assert list(pool.map(jobs.echo, blobs, timeout=WAIT)) == blobs


def test_a_large_result_survives_its_worker_retiring_right_after_sending_it() -> None:
    """The payload belongs to the handoff socket once sent: a worker that exits at once
    (max_tasks_per_child=1) takes nothing of it along."""
    sizes = [INLINE_LIMIT + 1, 2_000_000, 5000] * 3
    with taskpool.Executor(2, max_tasks_per_child=1, max_attempts=1) as pool:
        assert list(pool.map(jobs.random_bytes, sizes, range(9), timeout=WAIT)) == [
            jobs.random_bytes(n, seed) for seed, n in enumerate(sizes)]


def _dealer_memfds(dealer: int) -> int:
    """The Dealer's descriptors that are handoff memfds."""
    count = 0
    for fd in os.listdir(f"/proc/{dealer}/fd"):
        try:
            link = os.readlink(f"/proc/{dealer}/fd/{fd}")
        except OSError:
            continue
        count += link.startswith("/memfd:taskpool-payload")
    return count


def test_workers_killed_while_handing_over_large_results_lose_none_and_leave_none(
        tmp_path: Path) -> None:
    """Killed at random instants, some between a payload and its message: every result
    arrives once and whole, and the Dealer holds no payload of a dead worker afterwards."""
    rng = random.Random(21)
    noted = tmp_path / "noted"
    noted.mkdir()
    sizes = [2_000, INLINE_LIMIT + 5_000, 300_000]
    n = 600
    with taskpool.Executor(2, max_attempts=0) as pool:
        futures = [pool.submit(jobs.note_worker_bytes, x, str(noted), sizes[x % 3])
                   for x in range(n)]
        dealer = pool._dealer.pid
        killed: set[int] = set()
        # The next kill a few ms after the last, unless all is done.
        while len(killed) < 12 and wait(futures, timeout=rng.uniform(0.002, 0.01)).not_done:
            victims = [p for p in _children_of(dealer)
                       if p not in killed and (noted / str(p)).exists()]
            if victims:
                killed.add(victim := rng.choice(victims))
                os.kill(victim, signal.SIGKILL)
        for x, future in enumerate(futures):
            assert future.result(timeout=WAIT) == jobs.random_bytes(sizes[x % 3], x), x
        assert _dealer_memfds(dealer) == 0
    assert len(killed) >= 4, f"only {len(killed)} kills happened during the calls"


def test_a_payload_whose_worker_died_before_announcing_it_is_dropped(tmp_path: Path) -> None:
    """Its memfd goes when the Dealer hears of the death: a later handoff, which reads the
    socket past it, does not keep it either."""
    with taskpool.Executor(1) as pool:
        assert pool.submit(jobs.hand_over_then_die, str(tmp_path / "died")).result(
            timeout=WAIT) == "survived"
        big = INLINE_LIMIT + 7
        assert pool.submit(jobs.random_bytes, big, 3).result(timeout=WAIT) == (
            jobs.random_bytes(big, 3))
        assert _dealer_memfds(pool._dealer.pid) == 0


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return children


# --- the handoff, in one process ---------------------------------------------------------

def _memfds() -> int:
    """Our descriptors that are handoff memfds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:taskpool-payload")
        except OSError:
            pass
    return count


def test_the_handoff_gives_each_payload_to_its_key_in_any_order() -> None:
    handoff = PayloadHandoff()
    try:
        small, large = b"s" * 2000, jobs.random_bytes(INLINE_LIMIT * 3, 7)
        handoff.hand_over((11, 1, 1), small)
        handoff.hand_over((12, 2, 1), large)
        handoff.hand_over((11, 3, 2), b"third")
        assert handoff.take((12, 2, 1), len(large)) == large
        assert handoff.take((11, 3, 2), 5) == b"third"
        assert handoff.take((11, 1, 1), len(small)) == small
        # Never sent, or of another size than its message says: lost, and no wait.
        assert handoff.take((11, 4, 1), 10) is None
        handoff.hand_over((11, 5, 1), b"abc")
        assert handoff.take((11, 5, 1), 4) is None
        assert _memfds() == 0
    finally:
        handoff.close()


def test_what_a_dead_worker_handed_over_and_never_announced_is_dropped() -> None:
    handoff = PayloadHandoff()
    try:
        handoff.hand_over((21, 1, 1), b"x" * (INLINE_LIMIT + 1))  # announced: kept
        handoff.hand_over((22, 2, 1), b"y" * (INLINE_LIMIT + 1))  # its worker died
        handoff.hand_over((22, 3, 1), b"z" * 10)
        handoff.forget(22)
        assert _memfds() == 1  # the one of worker 21, until it is taken
        assert handoff.take((21, 1, 1), INLINE_LIMIT + 1) == b"x" * (INLINE_LIMIT + 1)
        assert handoff.take((22, 2, 1), INLINE_LIMIT + 1) is None
        assert _memfds() == 0
    finally:
        handoff.close()


# --- sixteen Executors, one user ----------------------------------------------------------

SIXTEEN_EXECUTORS = textwrap.dedent(f"""
    import resource
    import taskpool
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, ({DEFAULT_MSGQUEUE_BYTES},) * 2)
    pools = [taskpool.Executor(8) for _ in range(16)]
    try:
        # All sixteen alive and given work before any result is read.
        maps = [pool.map(pow, range(200), [i] * 200, timeout={WAIT})
                for i, pool in enumerate(pools)]
        for i, results in enumerate(maps):
            assert list(results) == [x ** i for x in range(200)], i
        print("all", len(pools), "mapped")
    finally:
        for pool in pools:
            pool.shutdown(wait=True)
""")


def _as_budget_user(code: str) -> list[str]:
    """`python -c code` as BUDGET_USER when the tests run as root (root passes queues_max),
    by an interpreter that user can exec again: the Executor starts its Dealer with
    sys.executable, and a pyenv Python under /root is out of a normal user's reach (setpriv
    reaches it only for its own exec). Skipped if no interpreter of this version is."""
    if os.geteuid() != 0:
        return [sys.executable, "-c", code]
    # Through env(1), which execs as the user, as the Executor will: no capability left.
    path = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        command = as_user(BUDGET_USER, ["/usr/bin/env", f"PYTHONPATH={path}", python, "-c"])
        probe = subprocess.run([*command, "import taskpool, posix_ipc, cloudpickle"],
                               cwd=ROOT, capture_output=True, timeout=WAIT)
        if probe.returncode == 0:
            return [*command, code]
    pytest.skip(f"user {BUDGET_USER} can exec no {version} that imports taskpool")


def _run_as_budget_user(code: str, timeout: float) -> str:
    done = subprocess.run(_as_budget_user(code), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.scale
def test_sixteen_executors_of_eight_workers_work_at_once_as_a_normal_user() -> None:
    assert _run_as_budget_user(SIXTEEN_EXECUTORS, 4 * WAIT).split() == ["all", "16", "mapped"]


def test_an_executor_works_within_exactly_its_queue_budget() -> None:
    """The kernel charges its queues no more than EXECUTOR_QUEUE_COST (the settings'
    comment is right), whatever its number of workers."""
    code = textwrap.dedent(f"""
        import resource
        import taskpool
        resource.setrlimit(resource.RLIMIT_MSGQUEUE, ({EXECUTOR_QUEUE_COST},) * 2)
        with taskpool.Executor(4) as pool:
            print(sum(pool.map(abs, range(-50, 50), timeout={WAIT})))
    """)
    assert _run_as_budget_user(code, WAIT).strip() == "2500"
