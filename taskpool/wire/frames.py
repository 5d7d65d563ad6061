"""The Executor's pipes: length-prefixed frames."""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

from taskpool.wire import ProtocolError
from taskpool.wire.calls import CallBatch


class FrameType(enum.IntEnum):
    SETTINGS = 1  # Executor -> host: a pickled ExecutorSettings, first and once
    BATCH = 2  # Executor -> host: a CallBatch (its batch id is the job id)
    END = 3  # Executor -> host: no more batches; the total sent
    OUTCOMES = 4  # host -> Executor: batch, first, seconds, then the outcomes' pickle
    FAILED = 5  # host -> Executor: calls that ran out of attempts (batch, first, count), why
    STOPPED = 6  # host -> Executor: the pool stopped before its jobs were done, and why
    LOST = 7  # host -> Executor: a worker died at work (pid, why, calls sent again)


_FRAME = struct.Struct("!IB")  # length of the body, FrameType


_JOB_ID = struct.Struct("!Q")


# batch, first, count (the calls of the batch this job ran), seconds they ran in the worker
_OUTCOMES_HEAD = struct.Struct("!QIId")


def encode_frame(ftype: FrameType, body: bytes) -> bytes:
    return _FRAME.pack(len(body), ftype) + body


def read_frame(read: Any) -> tuple[FrameType, bytes] | None:
    """The next frame from `read(n)` (which returns exactly n bytes, or fewer at EOF);
    None at a clean end of the stream."""
    head = read(_FRAME.size)
    if not head:
        return None
    if len(head) < _FRAME.size:
        raise ProtocolError("the stream ended inside a frame header")
    length, code = _FRAME.unpack(head)
    body = read(length)
    if len(body) < length:
        raise ProtocolError("the stream ended inside a frame")
    try:
        return FrameType(code), body
    except ValueError:
        raise ProtocolError(f"unknown frame type {code}") from None


def encode_batch(batch: CallBatch) -> bytes:
    return encode_frame(FrameType.BATCH, batch.encode())


def decode_batch(body: bytes) -> CallBatch:
    return CallBatch.decode(body)


def encode_end(total: int) -> bytes:
    return encode_frame(FrameType.END, _JOB_ID.pack(total))


def decode_end(body: bytes) -> int:
    return int(_JOB_ID.unpack(body)[0])


def encode_outcomes_frame(batch: CallBatch, seconds: float, outcomes: bytes) -> bytes:
    head = _OUTCOMES_HEAD.pack(batch.batch, batch.first, batch.count, seconds)
    return encode_frame(FrameType.OUTCOMES, head + outcomes)


def decode_outcomes_frame(body: bytes) -> tuple[int, int, int, float, bytes]:
    """(batch, index of its first call here, seconds the calls ran, outcomes' pickle)"""
    batch, first, count, seconds = _OUTCOMES_HEAD.unpack_from(body)
    return batch, first, count, seconds, body[_OUTCOMES_HEAD.size:]


def encode_failed(batch: CallBatch, reason: str) -> bytes:
    body = {"batch": batch.batch, "first": batch.first, "count": batch.count,
            "reason": reason}
    return encode_frame(FrameType.FAILED, json.dumps(body).encode())


def decode_failed(body: bytes) -> tuple[int, int, int, str]:
    try:
        failed = json.loads(body)
        return failed["batch"], failed["first"], failed["count"], failed["reason"]
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"bad Failed frame: {e!r}") from None


def encode_stopped(reason: str) -> bytes:
    return encode_frame(FrameType.STOPPED, reason.encode())


def encode_lost(pid: int, reason: str, resent: int) -> bytes:
    body = {"pid": pid, "reason": reason, "resent": resent}
    return encode_frame(FrameType.LOST, json.dumps(body).encode())


def decode_lost(body: bytes) -> tuple[int, str, int]:
    try:
        lost = json.loads(body)
        return lost["pid"], lost["reason"], lost["resent"]
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"bad Lost frame: {e!r}") from None
