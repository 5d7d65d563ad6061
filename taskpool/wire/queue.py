"""Queue messages: the only module that knows how a POSIX queue message is laid out.

Queue messages are small fixed-layout structs (network byte order) behind a two-byte header
(version, type), so that every message of a CLI run fits the smallest queue we create
(`MAX_MESSAGE_SIZE`); but for the JobBatch, which fits the ready queue's
(`READY_MESSAGE_SIZE`). A message is one class, in one place: its type (the `mtype=` of
its class line), its fields and their `LAYOUT` (or, for a message with a payload, its own
`encode()` and `decode`), and the module's `decode()` finds its decoder by the header's
type. Which role sends which message on which queue: the package's docstring.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Union

from taskpool.model.jobs import COMMAND_KINDS, Arg, Job, JobKind
from taskpool.wire import ProtocolError

VERSION = 1
MAX_MESSAGE_SIZE = 128  # the largest encoded queue message is well below this, but...
READY_MESSAGE_SIZE = 1024  # ...a JobBatch, on the ready queue (10 of them: 11 KB of budget)

_HEADER = struct.Struct("!BB")


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
    RESULT_PART = 11
    JOB_BATCH = 12
    RESULT_HANDED_OVER = 13


# An argument or result is 8 bytes: float64 for sleep, int64 otherwise.
def _pack_value(kind: JobKind, value: Arg) -> bytes:
    if kind is JobKind.SLEEP or kind is JobKind.CALL and isinstance(value, float):
        return struct.pack("!d", float(value))
    return struct.pack("!q", int(value))


def _unpack_value(kind: JobKind, raw: bytes, is_result: bool = False) -> Arg:
    # A CALL job's arg is its number of calls; its result value, the seconds they ran.
    if kind is JobKind.SLEEP or kind is JobKind.CALL and is_result:
        return float(struct.unpack("!d", raw)[0])
    return int(struct.unpack("!q", raw)[0])


def _kind(code: int) -> JobKind:
    try:
        return JobKind(code)
    except ValueError:
        raise ProtocolError(f"unknown job kind {code}") from None


def _payload_of(kind: JobKind, body: bytes, fixed: int, mtype: MessageType) -> bytes:
    """What follows a message's fixed fields: a CALL job's calls; the outcomes of a CALL
    job's calls, or how a job of real work ended (wire/commands.py), in its Result. A job
    of real work's text never travels here: its arg says where it is in the run's spool."""
    payload = body[fixed:]
    if payload and kind is not JobKind.CALL and (
            mtype is not MessageType.RESULT or kind not in COMMAND_KINDS):
        raise ProtocolError(f"{mtype.name} message has {len(payload)} unexpected bytes")
    return payload


def _no_body(body: bytes, mtype: MessageType) -> None:
    if body:
        raise ProtocolError(f"{mtype.name} message has {len(body)} unexpected bytes")


# Each message class's decoder, by its type: filled in as the classes are defined.
_DECODERS: dict[int, Callable[[bytes], Message]] = {}


class QueueMessage:
    """What every queue message has: its type, the two header bytes its encoding starts
    with, and a decoder of what follows them, which `decode` finds by the type. A message
    names its type where it is defined: `class Ack(QueueMessage, mtype=MessageType.ACK)`;
    its LAYOUT follows it there, or, for a message with a payload, its own `encode` and
    `decode`."""

    TYPE: ClassVar[MessageType]
    HEADER: ClassVar[bytes]  # version, type
    # A message of fixed fields: their layout after the header, in the order the fields
    # are declared (none: a message that is its type alone). A message with a payload
    # (a job, a result) has its own encode and decode instead.
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("!")

    def __init_subclass__(cls, mtype: MessageType, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.TYPE = mtype
        cls.HEADER = _HEADER.pack(VERSION, mtype)
        _DECODERS[mtype] = cls.decode

    def encode(self) -> bytes:
        # A frozen dataclass's __dict__ holds its fields in declaration order.
        return self.HEADER + self.LAYOUT.pack(*self.__dict__.values())

    @classmethod
    def decode(cls, body: bytes) -> Message:
        """The message whose encoding, after the header, is `body`; struct.error or
        ProtocolError if it is none."""
        if not cls.LAYOUT.size:
            _no_body(body, cls.TYPE)
        return cls(*cls.LAYOUT.unpack(body))  # type: ignore[return-value]


# --- Jobs -------------------------------------------------------------------------------

# job id, attempt, kind, arg, timeout (0: none), pool (job type), priority
_JOB = struct.Struct("!QHB8sdHH")


def _pack_job(job: Job, attempt: int) -> bytes:
    return _JOB.pack(job.job_id, attempt, job.kind, _pack_value(job.kind, job.arg),
                     job.timeout or 0.0, job.pool, job.priority)


def _unpack_job(body: bytes, offset: int, mtype: MessageType) -> tuple[Job, int]:
    """The job at `offset` of `body`, and its attempt. A JOB message's payload follows it."""
    job_id, attempt, kind_code, raw, timeout, pool, priority = _JOB.unpack_from(body, offset)
    kind = _kind(kind_code)
    payload = _payload_of(kind, body, _JOB.size, mtype) if mtype is MessageType.JOB else b""
    return Job(job_id, kind, _unpack_value(kind, raw), timeout or None, pool, priority,
               payload=payload), attempt


@dataclass(frozen=True)
class JobMessage(QueueMessage, mtype=MessageType.JOB):
    """A job on its way to be run. `attempt` is 1 + the number of workers that took it and
    died; a crash decision is a function of (seed, job id, attempt)."""

    job: Job
    attempt: int

    def encode(self) -> bytes:
        return self.HEADER + _pack_job(self.job, self.attempt) + self.job.payload

    @classmethod
    def decode(cls, body: bytes) -> JobMessage:
        return cls(*_unpack_job(body, 0, cls.TYPE))


_BATCH_COUNT = struct.Struct("!H")  # number of jobs; then that many _JOB


def jobs_per_message(message_size: int) -> int:
    """A JobBatch's jobs at most: as many as fit one message of the ready queue."""
    return (message_size - _HEADER.size - _BATCH_COUNT.size) // _JOB.size


JOBS_PER_MESSAGE = jobs_per_message(READY_MESSAGE_SIZE)


@dataclass(frozen=True)
class JobBatch(QueueMessage, mtype=MessageType.JOB_BATCH):
    """Jobs on their way from the generator to the Dealer, up to `jobs_per_message` a message,
    where one message a job cost the generator and the Dealer's send thread a system call,
    and the send thread a wake-up, each. All of one priority (the message's), at their first
    attempt, and without payload (no CALL job). Only the ready queue carries it: each job
    still goes to its worker, and is accounted for there, alone."""

    jobs: tuple[Job, ...]

    def encode(self) -> bytes:
        return b"".join([self.HEADER, _BATCH_COUNT.pack(len(self.jobs)),
                         *(_pack_job(job, 1) for job in self.jobs)])

    @classmethod
    def decode(cls, body: bytes) -> JobBatch:
        (count,) = _BATCH_COUNT.unpack_from(body)
        size = _BATCH_COUNT.size + count * _JOB.size
        if len(body) != size:
            raise ProtocolError(f"JOB_BATCH message of {count} jobs has {len(body)} "
                                f"bytes, expected {size}")
        jobs = tuple(_unpack_job(body, offset, cls.TYPE)[0]
                     for offset in range(_BATCH_COUNT.size, size, _JOB.size))
        if any(job.kind is JobKind.CALL for job in jobs):
            raise ProtocolError("JOB_BATCH message with a CALL job")
        return cls(jobs)


@dataclass(frozen=True)
class EndOfJobs(QueueMessage, mtype=MessageType.END_OF_JOBS):
    """No more jobs will come; `total` were accepted."""

    LAYOUT: ClassVar = struct.Struct("!Q")  # total

    total: int


# --- Stopping -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Stop(QueueMessage, mtype=MessageType.STOP):
    """Ends the send thread."""


@dataclass(frozen=True)
class Shutdown(QueueMessage, mtype=MessageType.SHUTDOWN):
    """Tells a worker to exit. A message kind of its own, so that no job value means 'stop'."""


@dataclass(frozen=True)
class Terminate(QueueMessage, mtype=MessageType.TERMINATE):
    """The Dealer was asked to stop (SIGTERM from main) before the jobs were done."""

    LAYOUT: ClassVar = struct.Struct("!B")  # signal number that asked for it

    signum: int


# --- From the workers, and about them -----------------------------------------------------

@dataclass(frozen=True)
class Ack(QueueMessage, mtype=MessageType.ACK):
    """A worker has taken the job and is about to run it (sent only if `is_acked`)."""

    LAYOUT: ClassVar = struct.Struct("!QHI")  # job id, attempt, worker pid

    job_id: int
    attempt: int
    pid: int


def is_acked(job: Job, every_job: bool) -> bool:
    """Whether a worker sends an Ack when it takes `job`. The Dealer needs none to know which
    jobs a worker holds, nor which one it died in (local/recovery.py's doc says how): only to start
    the clock of a job's timeout, to know which job runs (--preempt), to report when each
    job started (a DEBUG event: --events, the live view) and for the Executor's calls (the
    first can wait behind a long initializer). `every_job`: one of these holds for the whole
    run. Else a job's Result is the only message of its worker's about it: one message a
    job fewer for the worker to send and the Dealer's recv thread to read."""
    return every_job or job.timeout is not None or job.kind is JobKind.CALL


@dataclass(frozen=True)
class Heartbeat(QueueMessage, mtype=MessageType.HEARTBEAT):
    """A worker running a job is alive and not stopped (sent every heartbeat/3 s)."""

    LAYOUT: ClassVar = struct.Struct("!I")  # worker pid

    pid: int


@dataclass(frozen=True)
class Result(QueueMessage, mtype=MessageType.RESULT):
    """A job's value, from the worker that ran it; a CALL job's outcomes in its payload."""

    # job id, attempt, worker pid, kind, value; then a CALL job's payload
    LAYOUT: ClassVar = struct.Struct("!QHIB8s")
    FIXED_SIZE: ClassVar = _HEADER.size + LAYOUT.size  # the bytes before the payload

    job_id: int
    attempt: int
    pid: int
    kind: JobKind
    value: Arg
    payload: bytes = field(default=b"", repr=False)  # a CALL job's outcomes

    def encode(self) -> bytes:
        fields = self.LAYOUT.pack(
            self.job_id, self.attempt, self.pid, self.kind, _pack_value(self.kind, self.value)
        )
        return self.HEADER + fields + self.payload

    @classmethod
    def decode(cls, body: bytes) -> Result:
        job_id, attempt, pid, kind_code, raw = cls.LAYOUT.unpack_from(body)
        kind = _kind(kind_code)
        payload = _payload_of(kind, body, cls.LAYOUT.size, cls.TYPE)
        return cls(job_id, attempt, pid, kind, _unpack_value(kind, raw, True), payload)

    def encode_in_parts(self, max_size: int) -> list[bytes]:
        """The result as queue messages of at most `max_size` bytes: ResultParts carrying
        the payload's head, then the Result with its tail. The receiver joins the parts of
        one worker (its messages keep their order), and drops them if the worker dies."""
        whole = self.encode()
        if len(whole) <= max_size:
            return [whole]
        piece = max_size - ResultPart.FIXED_SIZE
        tail_room = max_size - (len(whole) - len(self.payload))
        head = len(self.payload) - tail_room
        parts = [ResultPart(self.job_id, self.attempt, self.pid,
                            self.payload[i:min(i + piece, head)]).encode()
                 for i in range(0, head, piece)]
        last = Result(self.job_id, self.attempt, self.pid, self.kind, self.value,
                      self.payload[head:])
        return parts + [last.encode()]


@dataclass(frozen=True)
class ResultPart(QueueMessage, mtype=MessageType.RESULT_PART):
    """A piece of a Result's payload too large for one message (see encode_in_parts)."""

    # job id, attempt, worker pid; then a piece of the payload
    LAYOUT: ClassVar = struct.Struct("!QHI")
    FIXED_SIZE: ClassVar = _HEADER.size + LAYOUT.size  # the bytes before the piece

    job_id: int
    attempt: int
    pid: int
    piece: bytes = field(repr=False)

    def encode(self) -> bytes:
        return self.HEADER + self.LAYOUT.pack(self.job_id, self.attempt, self.pid) + self.piece

    @classmethod
    def decode(cls, body: bytes) -> ResultPart:
        job_id, attempt, pid = cls.LAYOUT.unpack_from(body)
        return cls(job_id, attempt, pid, body[cls.LAYOUT.size:])


@dataclass(frozen=True)
class ResultHandedOver(QueueMessage, mtype=MessageType.RESULT_HANDED_OVER):
    """A Result whose payload, too large for a message, was handed to the Dealer out of the
    queue just before this message (posix/handoff.py, under the key (pid, job id,
    attempt)): the Result's fields, and the payload's size."""

    LAYOUT: ClassVar = struct.Struct("!QHIB8sQ")  # Result's fields; the payload's size

    job_id: int
    attempt: int
    pid: int
    kind: JobKind
    value: Arg
    size: int

    def encode(self) -> bytes:
        return self.HEADER + self.LAYOUT.pack(
            self.job_id, self.attempt, self.pid, self.kind, _pack_value(self.kind, self.value),
            self.size)

    @classmethod
    def decode(cls, body: bytes) -> ResultHandedOver:
        job_id, attempt, pid, kind_code, raw, size = cls.LAYOUT.unpack(body)
        kind = _kind(kind_code)
        return cls(job_id, attempt, pid, kind, _unpack_value(kind, raw, True), size)

    @classmethod
    def of(cls, result: Result) -> ResultHandedOver:
        return cls(result.job_id, result.attempt, result.pid, result.kind, result.value,
                   len(result.payload))

    def with_payload(self, payload: bytes) -> Result:
        return Result(self.job_id, self.attempt, self.pid, self.kind, self.value, payload)


@dataclass(frozen=True)
class WorkerExited(QueueMessage, mtype=MessageType.WORKER_EXITED):
    """Sent by the recovery thread after it reaped `pid`. The worker is dead, so every message
    it sent is already in the result queue ahead of this one."""

    LAYOUT: ClassVar = struct.Struct("!Ii")  # pid, raw wait status

    pid: int
    wait_status: int


Message = Union[
    JobMessage, JobBatch, EndOfJobs, Stop, Shutdown, Ack, Heartbeat, Result, ResultPart,
    ResultHandedOver, WorkerExited, Terminate,
]


def decode(data: bytes) -> Message:
    """The message `data` encodes, by its type's decoder; ProtocolError if it is none."""
    if len(data) < _HEADER.size:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than its header")
    version, code = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ProtocolError(f"message version {version}, expected {VERSION}")
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise ProtocolError(f"unknown message type {code}")
    try:
        return decoder(data[_HEADER.size:])
    except struct.error as e:
        raise ProtocolError(f"{MessageType(code).name} message of {len(data)} bytes: "
                            f"{e}") from None
