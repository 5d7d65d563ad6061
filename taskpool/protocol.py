"""The wire format: the only module that knows how messages are laid out in bytes.

Who sends what, on which channel::

    TaskGenerator --Job, EndOfJobs--------------> ready queue ----> Dealer send thread
    Dealer (own threads) --Stop-----------------> ready queue ----> Dealer send thread
    Dealer send thread --Job, Shutdown----------> request queue (one per worker) --> Worker
    Worker --Ack, Result, Heartbeat-------------> result queue ---> Dealer recv thread
    Dealer recovery thread --WorkerExited, Terminate--> result queue
    Dealer send thread --EndOfJobs--------------> result queue
    TaskGenerator --JobAccepted, LineRejected---> intake pipe  ---> main   (stdin input only)
    Dealer recv thread --JobRecord, DealerStats-> record pipe  ---> main

Queue messages are small fixed-layout structs (network byte order) behind a two-byte header
(version, type), so that every message fits the smallest queue we create (`MAX_MESSAGE_SIZE`)
and no pickle ever crosses. Pipe messages are JSON lines, one object each, shorter than
PIPE_BUF so that a write is atomic. Anything malformed raises `ProtocolError`; receivers log
it and go on.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Union

from taskpool.jobs import Arg, Job, JobKind

VERSION = 1
MAX_MESSAGE_SIZE = 128  # the largest encoded queue message is well below this

_HEADER = struct.Struct("!BB")


class ProtocolError(ValueError):
    """A message that does not decode: wrong version, unknown type, wrong length."""


class MessageType(enum.IntEnum):
    JOB = 1
    END_OF_JOBS = 2
    # 3 was WAKE, retired when the send thread stopped waiting for workers
    STOP = 4
    SHUTDOWN = 5
    ACK = 6
    RESULT = 7
    WORKER_EXITED = 8
    TERMINATE = 9
    HEARTBEAT = 10


# Payload layouts. An argument or result is 8 bytes: float64 for sleep, int64 otherwise.
# job id, attempt, kind, arg, timeout (0: none), pool (job type), priority
_JOB = struct.Struct("!QHB8sdHH")
_END = struct.Struct("!Q")  # number of jobs accepted
_ACK = struct.Struct("!QHI")  # job id, attempt, worker pid
_RESULT = struct.Struct("!QHIB8s")  # job id, attempt, worker pid, kind, value
_EXITED = struct.Struct("!Ii")  # pid, raw wait status
_TERMINATE = struct.Struct("!B")  # signal number that asked for it
_HEARTBEAT = struct.Struct("!I")  # worker pid


def _pack_value(kind: JobKind, value: Arg) -> bytes:
    if kind is JobKind.SLEEP:
        return struct.pack("!d", float(value))
    return struct.pack("!q", int(value))


def _unpack_value(kind: JobKind, raw: bytes) -> Arg:
    if kind is JobKind.SLEEP:
        return float(struct.unpack("!d", raw)[0])
    return int(struct.unpack("!q", raw)[0])


def _kind(code: int) -> JobKind:
    try:
        return JobKind(code)
    except ValueError:
        raise ProtocolError(f"unknown job kind {code}") from None


@dataclass(frozen=True)
class JobMessage:
    """A job on its way to be run. `attempt` is 1 + the number of workers that took it and
    died; a crash decision is a function of (seed, job id, attempt)."""

    job: Job
    attempt: int

    def encode(self) -> bytes:
        job = self.job
        payload = _JOB.pack(job.job_id, self.attempt, job.kind, _pack_value(job.kind, job.arg),
                            job.timeout or 0.0, job.pool, job.priority)
        return _HEADER.pack(VERSION, MessageType.JOB) + payload


@dataclass(frozen=True)
class EndOfJobs:
    """No more jobs will come; `total` were accepted."""

    total: int

    def encode(self) -> bytes:
        return _HEADER.pack(VERSION, MessageType.END_OF_JOBS) + _END.pack(self.total)


@dataclass(frozen=True)
class Stop:
    """Ends the send thread."""

    def encode(self) -> bytes:
        return _HEADER.pack(VERSION, MessageType.STOP)


@dataclass(frozen=True)
class Shutdown:
    """Tells a worker to exit. A message kind of its own, so that no job value means 'stop'."""

    def encode(self) -> bytes:
        return _HEADER.pack(VERSION, MessageType.SHUTDOWN)


@dataclass(frozen=True)
class Ack:
    """A worker has taken the job and is about to run it."""

    job_id: int
    attempt: int
    pid: int

    def encode(self) -> bytes:
        payload = _ACK.pack(self.job_id, self.attempt, self.pid)
        return _HEADER.pack(VERSION, MessageType.ACK) + payload


@dataclass(frozen=True)
class Heartbeat:
    """A worker running a job is alive and not stopped (sent every heartbeat/3 s)."""

    pid: int

    def encode(self) -> bytes:
        return _HEADER.pack(VERSION, MessageType.HEARTBEAT) + _HEARTBEAT.pack(self.pid)


@dataclass(frozen=True)
class Result:
    job_id: int
    attempt: int
    pid: int
    kind: JobKind
    value: Arg

    def encode(self) -> bytes:
        payload = _RESULT.pack(
            self.job_id, self.attempt, self.pid, self.kind, _pack_value(self.kind, self.value)
        )
        return _HEADER.pack(VERSION, MessageType.RESULT) + payload


@dataclass(frozen=True)
class WorkerExited:
    """Sent by the recovery thread after it reaped `pid`. The worker is dead, so every message
    it sent is already in the result queue ahead of this one."""

    pid: int
    wait_status: int

    def encode(self) -> bytes:
        return _HEADER.pack(VERSION, MessageType.WORKER_EXITED) + _EXITED.pack(
            self.pid, self.wait_status
        )


@dataclass(frozen=True)
class Terminate:
    """The Dealer was asked to stop (SIGTERM from main) before the jobs were done."""

    signum: int

    def encode(self) -> bytes:
        return _HEADER.pack(VERSION, MessageType.TERMINATE) + _TERMINATE.pack(self.signum)


Message = Union[
    JobMessage, EndOfJobs, Stop, Shutdown, Ack, Heartbeat, Result, WorkerExited, Terminate
]


def decode(data: bytes) -> Message:
    if len(data) < _HEADER.size:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than its header")
    version, code = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ProtocolError(f"message version {version}, expected {VERSION}")
    body = data[_HEADER.size :]
    try:
        mtype = MessageType(code)
    except ValueError:
        raise ProtocolError(f"unknown message type {code}") from None
    try:
        if mtype is MessageType.JOB:
            job_id, attempt, kind_code, raw, timeout, pool, priority = _JOB.unpack(body)
            kind = _kind(kind_code)
            job = Job(job_id, kind, _unpack_value(kind, raw), timeout or None, pool, priority)
            return JobMessage(job, attempt)
        if mtype is MessageType.ACK:
            return Ack(*_ACK.unpack(body))
        if mtype is MessageType.RESULT:
            job_id, attempt, pid, kind_code, raw = _RESULT.unpack(body)
            kind = _kind(kind_code)
            return Result(job_id, attempt, pid, kind, _unpack_value(kind, raw))
        if mtype is MessageType.END_OF_JOBS:
            return EndOfJobs(*_END.unpack(body))
        if mtype is MessageType.WORKER_EXITED:
            return WorkerExited(*_EXITED.unpack(body))
        if mtype is MessageType.TERMINATE:
            return Terminate(*_TERMINATE.unpack(body))
        if mtype is MessageType.HEARTBEAT:
            return Heartbeat(*_HEARTBEAT.unpack(body))
    except struct.error as e:
        raise ProtocolError(f"{mtype.name} message of {len(data)} bytes: {e}") from None
    if body:
        raise ProtocolError(f"{mtype.name} message has {len(body)} unexpected bytes")
    if mtype is MessageType.STOP:
        return Stop()
    return Shutdown()


# --- Pipe records: JSON lines -------------------------------------------------------------

class Status(str, enum.Enum):
    DONE = "done"
    FAILED = "failed"
    NOT_DONE = "not_done"


@dataclass(frozen=True)
class JobRecord:
    """One job's outcome: exactly the line written to --results."""

    job: int
    kind: str
    arg: Arg
    status: str
    result: Arg | None
    worker: int | None
    attempts: int
    reason: str | None = None
    type: int = 1  # the job's pool
    priority: int = 0

    @classmethod
    def of(cls, job: Job, status: Status, *, result: Arg | None = None,
           worker: int | None = None, attempts: int = 0,
           reason: str | None = None) -> JobRecord:
        return cls(job=job.job_id, kind=job.kind.label, arg=job.arg, status=status.value,
                   result=result, worker=worker, attempts=attempts, reason=reason,
                   type=job.pool, priority=job.priority)

    def to_json(self) -> dict[str, Any]:
        # Built by hand: dataclasses.asdict() deep-copies every field, and this runs once
        # per job in the Dealer's recv thread and in main.
        fields = {"job": self.job, "kind": self.kind, "arg": self.arg, "type": self.type,
                  "priority": self.priority, "status": self.status, "result": self.result,
                  "worker": self.worker, "attempts": self.attempts}
        if self.reason is not None:
            fields["reason"] = self.reason
        return fields


@dataclass(frozen=True)
class DealerStats:
    crashes: int
    resends: int
    stop_reason: str | None = None  # why the pool stopped before all jobs were done
    # Per pool: {"type": 1, "workers": 2, "crashes": 3, "restarts": 3}
    pools: list[dict[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class JobAccepted:
    job: Job


@dataclass(frozen=True)
class LineRejected:
    where: str  # "<stdin>:7"
    reason: str


PipeRecord = Union[JobRecord, DealerStats, JobAccepted, LineRejected]


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
    else:
        body = {"t": "rejected", **asdict(record)}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode_record(line: bytes) -> PipeRecord:
    try:
        body = json.loads(line)
        tag = body.pop("t")
        if tag == "record":
            return JobRecord(**body)
        if tag == "stats":
            return DealerStats(**body)
        if tag == "accepted":
            return JobAccepted(Job(body["job"], JobKind(body["kind"]), body["arg"],
                                   body.get("timeout"), body["pool"], body["priority"],
                                   line=body.get("line", 0)))
        if tag == "rejected":
            return LineRejected(**body)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ProtocolError(f"bad pipe record {line[:80]!r}: {e}") from None
    raise ProtocolError(f"unknown pipe record {tag!r}")
