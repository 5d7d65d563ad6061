"""The wire format: every message survives a round trip, and nothing malformed decodes."""

from __future__ import annotations

import json
import struct

import pytest

from taskpool.local.generator import job_batches
from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import DealerStats, JobRecord, Status
from taskpool.wire import ProtocolError
from taskpool.wire.queue import (
    JOBS_PER_MESSAGE,
    MAX_MESSAGE_SIZE,
    READY_MESSAGE_SIZE,
    Ack,
    EndOfJobs,
    Heartbeat,
    JobBatch,
    JobMessage,
    MessageType,
    Result,
    ResultHandedOver,
    ResultPart,
    Shutdown,
    Stop,
    Terminate,
    WorkerExited,
    decode,
)
from taskpool.wire.records import (
    JobAccepted,
    LineRejected,
    decode_record,
    encode_done,
    encode_record,
    results_line,
)

MESSAGES = [
    JobMessage(Job(1, JobKind.FIB, 30), attempt=1),
    JobMessage(Job(2**40, JobKind.SLEEP, 0.25, timeout=2.5), attempt=7),
    JobMessage(Job(5, JobKind.CRASH, 0), attempt=3),
    Heartbeat(4242),
    EndOfJobs(12),
    JobMessage(Job(6, JobKind.SLEEP, 0.0, pool=5, priority=32767), attempt=1),
    Stop(),
    Shutdown(),
    Ack(3, 2, 4242),
    Result(3, 2, 4242, JobKind.FIB, 832040),
    Result(4, 1, 4243, JobKind.SLEEP, 1.5),
    WorkerExited(4242, 11),
    Terminate(15),
    JobBatch((Job(7, JobKind.FIB, 20, priority=3), Job(8, JobKind.SLEEP, 0.5, priority=3))),
    ResultPart(3, 2, 4242, b"the head of a payload"),
    ResultHandedOver(3, 2, 4242, JobKind.CALL, 0.25, 5_000_000),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_within_the_queue_message_size(message: object) -> None:
    data = message.encode()  # type: ignore[attr-defined]
    assert len(data) <= MAX_MESSAGE_SIZE
    assert decode(data) == message


def test_every_message_type_has_a_row_above() -> None:
    assert {type(message).TYPE for message in MESSAGES} == set(MessageType)


def test_fib_values_and_sleep_values_keep_their_types() -> None:
    assert decode(Result(1, 1, 1, JobKind.FIB, 2**62).encode()).value == 2**62  # type: ignore[union-attr]
    value = decode(Result(1, 1, 1, JobKind.SLEEP, 0.1).encode()).value  # type: ignore[union-attr]
    assert isinstance(value, float) and value == 0.1


def test_a_full_job_batch_round_trips_within_the_ready_queue_message_size() -> None:
    jobs = tuple(Job(2**40 + i, JobKind.SLEEP if i % 2 else JobKind.FIB, 0.5 if i % 2 else i,
                     timeout=2.0 if i % 3 else None, pool=1 + i % 5, priority=7)
                 for i in range(JOBS_PER_MESSAGE))
    data = JobBatch(jobs).encode()
    assert MAX_MESSAGE_SIZE < len(data) <= READY_MESSAGE_SIZE
    assert decode(data) == JobBatch(jobs)


def test_a_job_file_goes_out_in_full_batches_of_one_priority_highest_first() -> None:
    jobs = [Job(i, JobKind.SLEEP, 0.0, priority=5 if i % 10 == 0 else 0)
            for i in range(1, 3 * JOBS_PER_MESSAGE + 1)]
    batches = list(job_batches(jobs, frozenset({20, 21}), JOBS_PER_MESSAGE))
    sent = [job for batch in batches for job in batch.jobs]
    urgent = [job for job in jobs if job.priority == 5 and job.job_id != 20]
    rest = [job for job in jobs if job.priority == 0 and job.job_id != 21]
    assert sent == urgent + rest  # each priority in file order; done jobs left out
    assert all(len({job.priority for job in batch.jobs}) == 1 for batch in batches)
    assert len(batches) == 1 + -(-len(rest) // JOBS_PER_MESSAGE)  # only the last is short


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "shorter than its header"),
        (b"\x01", "shorter than its header"),
        (b"\x02\x01" + bytes(19), "version 2"),
        (b"\x01\x63", "unknown message type 99"),
        (b"\x01\x03", "unknown message type 3"),  # WAKE, retired
        (JobMessage(Job(1, JobKind.FIB, 3), 1).encode()[:-1], "JOB message"),
        (Ack(1, 1, 1).encode() + b"x", "ACK message"),
        (Stop().encode() + b"x", "unexpected bytes"),
        (Shutdown().encode() + b"xy", "SHUTDOWN message has 2 unexpected bytes"),
        (ResultPart(1, 1, 1, b"").encode()[:-1], "RESULT_PART message"),
        (Result(1, 1, 1, JobKind.FIB, 3).encode() + b"x", "RESULT message has 1 unexpected"),
        (JobBatch((Job(1, JobKind.FIB, 3),) * 2).encode()[:-1], "JOB_BATCH message of 2"),
        (b"\x01\x0c\x00\x01" + JobMessage(Job(1, JobKind.CALL, 1), 1).encode()[2:],
         "with a CALL job"),
        (b"\x01\x01" + struct.pack("!QHB8sdHH", 1, 1, 9, bytes(8), 0.0, 1, 0),
         "unknown job kind 9"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode(data)


RECORDS = [
    JobRecord(job=3, kind="fib", arg=30, status="done", result=832040, worker=1471, attempts=2),
    JobRecord(job=4, kind="sleep", arg=0.5, status="not_done", result=None, worker=None,
              attempts=0, reason="interrupted by SIGINT"),
    DealerStats(crashes=5, resends=4),
    JobRecord(job=5, kind="sleep", arg=3.0, status="done", result=3.0, worker=7, attempts=1,
              type=2, priority=9),
    JobAccepted(Job(9, JobKind.SLEEP, 0.0)),
    JobAccepted(Job(10, JobKind.SLEEP, 1.5, pool=3, priority=4)),
    LineRejected("<stdin>:7", "unknown job kind 'x'"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_pipe_records_round_trip_as_one_json_line(record: object) -> None:
    line = encode_record(record)  # type: ignore[arg-type]
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and len(line) < 4096
    assert decode_record(line.rstrip(b"\n")) == record


def test_results_line_has_the_contract_fields() -> None:
    fields = RECORDS[0].to_json()  # type: ignore[union-attr]
    assert fields == {"job": 3, "kind": "fib", "arg": 30, "type": 1, "priority": 0,
                      "status": "done", "result": 832040, "worker": 1471, "attempts": 2}


def test_results_lines_are_written_as_json_dumps_writes_them() -> None:
    """The results file's bytes did not change when its encoder was made once."""
    odd = JobRecord(job=7, kind="sleep", arg=1e-7, status="failed", result=None, worker=3,
                    attempts=3, reason='killed "it"\n\u00e9\U0001f600\t', type=2, priority=1)
    for record in [*[r for r in RECORDS if isinstance(r, JobRecord)], odd]:
        assert results_line(record) == json.dumps(record.to_json()) + "\n"
        assert encode_record(record) == (json.dumps(
            {"t": "record", **record.to_json()}, separators=(",", ":")) + "\n").encode()


@pytest.mark.parametrize("job, result", [
    (Job(3, JobKind.FIB, 30, pool=2, priority=4), Result(3, 2, 1471, JobKind.FIB, 832040)),
    (Job(2**40, JobKind.SLEEP, 0.25, timeout=1.0), Result(2**40, 1, 7, JobKind.SLEEP, 0.25)),
])
def test_a_done_record_is_the_record_of_the_jobs_result(job: Job, result: Result) -> None:
    record = JobRecord.of(job, Status.DONE, result=result.value, worker=result.pid,
                          attempts=result.attempt)
    assert encode_done(job, result) == encode_record(record)
    assert decode_record(encode_done(job, result).rstrip(b"\n")) == record


@pytest.mark.parametrize("line", [b"not json", b"{}", b'{"t":"nope"}', b'{"t":"record"}',
                                  b'{"t":"stats","crashes":1,"resends":0} {}', b"\xff{}", b""])
def test_malformed_pipe_records_are_rejected(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_record(line)


def test_a_result_handed_over_carries_its_fields_and_size_and_gets_its_payload_back() -> None:
    result = Result(3, 2, 4242, JobKind.CALL, 0.25, b"outcomes" * 1000)
    assert len(result.encode()) == Result.FIXED_SIZE + len(result.payload)
    message = decode(ResultHandedOver.of(result).encode())
    assert isinstance(message, ResultHandedOver) and message.size == len(result.payload)
    assert message.with_payload(result.payload) == result
