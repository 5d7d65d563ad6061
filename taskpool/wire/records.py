"""JSON lines: the record and intake pipes to main, and the results file's lines."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Union

from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import DealerStats, JobRecord, ran_fields, record_fields
from taskpool.wire import ProtocolError
from taskpool.wire.commands import Ending
from taskpool.wire.queue import Result


@dataclass(frozen=True)
class JobAccepted:
    job: Job


@dataclass(frozen=True)
class LineRejected:
    where: str  # "<stdin>:7"
    reason: str
    line: int = 0  # 7: the line's number, as data


PipeRecord = Union[JobRecord, DealerStats, JobAccepted, LineRejected]


def _json_writer(item_separator: str, key_separator: str) -> Callable[[Any], str]:
    """json.dumps(obj, separators=(item_separator, key_separator)), with its C encoder made
    once: json.dumps() and JSONEncoder.encode() make a new one at each call, 2.7 us against
    1.6 us for a job's record, written twice a job. No check for cycles: our records are
    flat."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the _json accelerator
        return json.JSONEncoder(separators=(item_separator, key_separator)).encode
    encode = make(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None,
                  key_separator, item_separator, False, False, True)
    return lambda obj: "".join(encode(obj, 0))


_COMPACT_JSON = _json_writer(",", ":")  # the record pipe's lines


_RESULTS_JSON = _json_writer(", ", ": ")  # the results file's, as json.dumps() writes them


def results_line(record: JobRecord) -> str:
    """The line of --results for `record`."""
    return _RESULTS_JSON(record.to_json()) + "\n"


def encode_done(job: Job, result: Result) -> bytes:
    """encode_record(JobRecord.of(job, Status.DONE, ...)) for a job's Result, without the
    JobRecord: the Dealer's recv thread writes one a job (7.6 us a record with it)."""
    return _COMPACT_JSON(record_fields(
        {"t": "record"}, job.job_id, job.kind.label, job.arg, job.pool, job.priority, "done",
        result.value, result.pid, result.attempt, None)).encode() + b"\n"


def encode_ended(job: Job, result: Result, ending: Ending, reason: str | None) -> bytes:
    """The record of a job of real work that ran to its end: done, or (`reason`) failed.
    Its arg is left to main, who has its text (the Dealer has only where it is)."""
    fields = record_fields(
        {"t": "record"}, job.job_id, job.kind.label, "", job.pool, job.priority,
        "done" if reason is None else "failed", ending.result, result.pid, result.attempt,
        reason)
    return _COMPACT_JSON(ran_fields(fields, ending.exit_status,
                                    round(ending.duration, 6))).encode() + b"\n"


def encode_record(record: PipeRecord) -> bytes:
    body: dict[str, Any]
    if isinstance(record, JobRecord):
        body = {"t": "record", **record.to_json()}
    elif isinstance(record, DealerStats):
        body = {"t": "stats", **asdict(record)}
    elif isinstance(record, JobAccepted):
        job = record.job
        body = {"t": "accepted", "job": job.job_id, "kind": int(job.kind), "arg": job.arg,
                "timeout": job.timeout, "pool": job.pool, "priority": job.priority,
                "line": job.line}
        if job.payload:  # a command's text (one writer: the line may be longer than PIPE_BUF)
            body["text"] = job.text
    else:
        body = {"t": "rejected", **asdict(record)}
    return _COMPACT_JSON(body).encode() + b"\n"


_JSON_DECODER = json.JSONDecoder()


def _json_line(line: bytes) -> Any:
    """json.loads(line) for a line of ours, without json.loads' guess of the encoding and
    its wrappers: half its cost, on a record per job in main."""
    text = line.decode().strip()
    value, end = _JSON_DECODER.raw_decode(text)
    if end != len(text):
        raise ValueError(f"extra data after the JSON value, at {end}")
    return value


def decode_record(line: bytes) -> PipeRecord:
    try:
        body = _json_line(line)
        tag = body.pop("t")
        if tag == "record":
            return JobRecord(**body)
        if tag == "stats":
            return DealerStats(**body)
        if tag == "accepted":
            return JobAccepted(Job(body["job"], JobKind(body["kind"]), body["arg"],
                                   body.get("timeout"), body["pool"], body["priority"],
                                   line=body.get("line", 0),
                                   payload=body.get("text", "").encode()))
        if tag == "rejected":
            return LineRejected(**body)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ProtocolError(f"bad pipe record {line[:80]!r}: {e}") from None
    raise ProtocolError(f"unknown pipe record {tag!r}")
