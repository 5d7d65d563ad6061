"""A worker's mailbox (posix/mailbox.py): FIFO, and every message either taken by the worker
or taken back by the Dealer, never both and never neither, however the two race."""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from taskpool.posix.mailbox import Mailboxes

from harness import assert_done_right, assert_exactly_once, read_results, write_job_file

# The forks below play workers: each child uses only its mailbox and raw descriptors and
# leaves by os._exit(), so a thread of pytest's (event readers of other tests) cannot
# deadlock it; Python 3.12+ warns of any fork from a threaded process.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")


def test_the_worker_takes_messages_in_the_order_sent_and_take_back_gets_the_rest() -> None:
    boxes = Mailboxes(2, 2, 16)
    box = boxes.allocate()
    assert box is not None
    box.send(b"first")
    box.send(b"second")
    assert box.receive() == b"first"
    assert box.take_back_all() == [b"second"]
    assert box.take_back() is None
    box.send(b"third")  # into the place taken back
    assert box.receive() == b"third"


def test_a_message_larger_than_a_place_is_refused() -> None:
    box = Mailboxes(1, 1, 8).allocate()
    assert box is not None
    with pytest.raises(ValueError):
        box.send(b"123456789")


def test_slots_are_handed_out_until_none_is_free_and_come_back_empty() -> None:
    boxes = Mailboxes(2, 1, 8)
    first, second = boxes.allocate(), boxes.allocate()
    assert first is not None and second is not None and first.slot != second.slot
    assert boxes.allocate() is None
    first.send(b"left")  # a dead worker's message, taken back before its slot is released
    assert first.take_back_all() == [b"left"]
    boxes.release(first)
    again = boxes.allocate()
    assert again is not None and again.slot == first.slot
    assert again.take_back() is None, "a reused slot starts empty"


def test_each_message_is_taken_once_while_the_dealer_takes_back_and_the_worker_receives(
) -> None:
    """A forked worker receives as fast as it can and writes each message's number to a
    pipe; the Dealer sends in bursts of at most the mailbox's depth (as its credit allows)
    and takes back at random moments. Every number is then taken exactly once."""
    count, depth = 20_000, 2
    boxes = Mailboxes(1, depth, 8)
    box = boxes.allocate()
    assert box is not None
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: the mailbox alone, then a pipe back
        try:
            os.close(read_fd)
            while True:
                data = box.receive()
                os.write(write_fd, data)
                if data == struct.pack("!q", -1):
                    break
        finally:
            os._exit(0)
    os.close(write_fd)
    rng = random.Random(7)
    taken_back: list[int] = []
    held = 0  # sent, not yet seen back from the worker or taken back
    received: list[int] = []
    reader = os.fdopen(read_fd, "rb")
    for number in range(count):
        while held >= depth:  # no credit: wait for the worker to answer one
            received.append(struct.unpack("!q", reader.read(8))[0])
            held -= 1
        box.send(struct.pack("!q", number))
        held += 1
        if rng.random() < 0.3:
            back = [struct.unpack("!q", m)[0] for m in box.take_back_all()]
            taken_back += back
            held -= len(back)
    while held:
        received.append(struct.unpack("!q", reader.read(8))[0])
        held -= 1
    box.send(struct.pack("!q", -1))
    assert struct.unpack("!q", reader.read(8))[0] == -1
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    reader.close()
    assert sorted(received + taken_back) == list(range(count))
    assert received == sorted(received), "the worker takes them in the order sent"
    assert taken_back, "the race was run"


def test_a_worker_killed_while_waiting_leaves_a_slot_another_worker_can_use() -> None:
    boxes = Mailboxes(1, 1, 8)
    box = boxes.allocate()
    assert box is not None
    pid = os.fork()
    if pid == 0:
        try:
            box.receive()  # blocks: nothing is sent
        finally:
            os._exit(1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert box.take_back_all() == []
    boxes.release(box)
    reused = boxes.allocate()
    assert reused is not None
    pid = os.fork()
    if pid == 0:
        os._exit(0 if reused.receive() == b"go" else 1)
    reused.send(b"go")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_worker_cannot_reach_another_workers_mailbox_once_fenced() -> None:
    boxes = Mailboxes(3, 2, 128)
    mine, other = boxes.allocate(), boxes.allocate()
    assert mine is not None and other is not None
    mine.send(b"for you")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            faulthandler.disable()  # the SIGSEGV is expected: no dump of it in the output
            mine.fence()
            os.write(write_fd, mine.receive())  # its own slot: fine
            other.send(b"stray write")  # SIGSEGV: the process ends here
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_fd, 100) == b"for you"
    os.close(read_fd)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    assert other.take_back() is None, "nothing reached the other slot"


_ONE_MAILBOX_A_WORKER = """
import sys
import taskpool.local.dealer
taskpool.local.dealer.MAILBOXES_PER_WORKER = 1  # a replacement waits for the dead one's
from taskpool.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_pool_whose_mailboxes_are_all_in_use_waits_for_a_dead_workers_and_goes_on(
    shared_dir: Path,
) -> None:
    """With one mailbox a worker, each replacement is forked before the recv thread has
    drained its predecessor's: the recovery thread must wait for it (nudged by the recv
    thread). Workers retire after every job and some crash: a death a job."""
    jobs = write_job_file(shared_dir, ["fib 5"] * 300)
    results = shared_dir / "r.jsonl"
    faults = [arg for job in (3, 50, 150, 299)
              for arg in ("--inject-fault", f"{job}:during_compute")]
    code = subprocess.run(
        [sys.executable, "-c", _ONE_MAILBOX_A_WORKER, "run", "--workers", "3", "--jobs",
         str(jobs), "--results", str(results), "--max-tasks-per-child", "1", "-q", *faults],
        stdin=subprocess.DEVNULL, timeout=300).returncode
    assert code == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 301))
    assert_done_right(records)
