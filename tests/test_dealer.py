"""The Dealer's parts that no run can reach on purpose: what a failing thread leaves behind."""

from __future__ import annotations

import os
import select
from typing import NoReturn

import pytest

from taskpool.local.dealer import Dealer, RecordWriter
from taskpool.model.exits import EXIT_THREAD_FAILED
from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import JobRecord
from taskpool.posix import mqueue
from taskpool.wire.queue import Result
from taskpool.wire.records import decode_record


def test_a_failed_send_thread_first_hands_main_the_outcomes_the_recv_thread_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The recv thread holds outcomes until it would block (RecordWriter). If another
    thread fails (a bug) the Dealer exits at once: what is held is written first, so that
    main records those jobs done rather than not done."""
    read_fd, write_fd = os.pipe()
    writer = RecordWriter(write_fd)
    writer.done(Job(7, JobKind.FIB, 10), Result(7, 1, 4242, JobKind.FIB, 55))
    assert select.select([read_fd], [], [], 0)[0] == []  # held, not written yet
    dealer = Dealer.__new__(Dealer)  # no queues, no threads: only what _guarded uses
    dealer.writer = writer
    exits: list[int] = []

    def exit_between_creations(code: int) -> NoReturn:
        exits.append(code)
        raise SystemExit(code)

    def send_loop() -> None:
        raise RuntimeError("a bug in the send thread")

    monkeypatch.setattr(mqueue, "exit_between_creations", exit_between_creations)
    try:
        with pytest.raises(SystemExit):
            dealer._guarded(send_loop)()
        assert exits == [EXIT_THREAD_FAILED]
        assert select.select([read_fd], [], [], 0)[0] == [read_fd]
        record = decode_record(os.read(read_fd, 4096))
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert isinstance(record, JobRecord)
    assert (record.job, record.status, record.result, record.worker) == (7, "done", 55, 4242)
