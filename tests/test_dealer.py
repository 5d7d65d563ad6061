"""The Dealer's parts that no run can reach on purpose: what a failing thread leaves behind,
and the words a failure is recorded in."""

from __future__ import annotations

import io
import os
import select
import signal
from typing import NoReturn

import pytest

from taskpool.core.supervision import Cause, Death, Verdict, after_death
from taskpool.executor.host import FrameWriter
from taskpool.local.dealer import Dealer
from taskpool.local.records import RecordWriter
from taskpool.model.exits import EXIT_THREAD_FAILED
from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import JobRecord
from taskpool.model.policy import SupervisionPolicy
from taskpool.posix import mqueue
from taskpool.wire.calls import CallBatch, CallWhere
from taskpool.wire.frames import FrameType, decode_failed, read_frame
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


@pytest.mark.parametrize(("death", "failed_before", "reason"), [
    (Death.of(Cause.TIMED_OUT, job=7, seconds=1.5), 2,
     "ran job 7 past its timeout of 1.5 s on 3 attempts"),
    (Death.crashed(signal.SIGSEGV), 0, "killed by signal 11 (SIGSEGV) on 1 attempts"),
])
def test_a_failed_job_is_recorded_with_its_last_death_and_its_attempts(
        death: Death, failed_before: int, reason: str) -> None:
    decision = after_death(death, failed_before, SupervisionPolicy(max_attempts=failed_before + 1))
    assert decision.verdict is Verdict.FAIL
    written: list[bytes] = []
    writer = RecordWriter(-1)
    writer.write = written.append  # type: ignore[method-assign]
    writer.failed(Job(7, JobKind.FIB, 10), 4242, death, decision)
    record = decode_record(written[0])
    assert isinstance(record, JobRecord)
    assert (record.status, record.attempts, record.reason) == ("failed", decision.failed_attempts,
                                                              reason)


@pytest.mark.parametrize(("death", "failed_before", "reason"), [
    # The caller knows calls, not the job ids the Dealer gave its batches.
    (Death.of(Cause.TIMED_OUT, job=7, seconds=1.5), 2,
     "3 attempts of this call ended its worker; the last: ran the call past its timeout of 1.5 s"),
    (Death.crashed(signal.SIGSEGV), 0,
     "1 attempt of this call ended its worker; the last: killed by signal 11 (SIGSEGV)"),
])
def test_a_failed_call_is_told_to_the_executor_in_the_callers_words(
        death: Death, failed_before: int, reason: str) -> None:
    decision = after_death(death, failed_before, SupervisionPolicy(max_attempts=failed_before + 1))
    written: list[bytes] = []
    writer = FrameWriter(-1)
    writer.write = written.append  # type: ignore[method-assign]
    batch = CallBatch(7, 2, 1, CallWhere.INLINE, b"calls")
    writer.failed(Job(7, JobKind.CALL, 1, payload=batch.encode()), 4242, death, decision)
    frame = read_frame(io.BytesIO(written[0]).read)
    assert frame is not None and frame[0] is FrameType.FAILED
    assert decode_failed(frame[1]) == (7, 2, 1, reason)
