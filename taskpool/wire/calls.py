"""A CALL job's payload: a batch of the Executor's calls, and their outcomes."""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass

from taskpool.wire import ProtocolError


class CallWhere(enum.IntEnum):
    """Where a batch's pickle is: in the message, or (too large for one) in a memfd of the
    Executor's process that the worker opens through /proc/PID/fd/FD."""

    INLINE = 0
    MEMFD = 1


@dataclass(frozen=True)
class CallBatch:
    """A CALL job's payload: calls [first, first + count) of the Executor's batch `batch`.

    The calls are ONE pickle of a list of (fn, args, kwargs) for the whole batch, made and
    read only by the Executor and the workers (one pickle per batch, not per call, is what
    makes a call cheap). The Dealer reads this header alone: to split a batch whose worker
    died, it sends the same pickle again once per call, each time with `first` the call's
    index and `count` 1."""

    batch: int  # the Executor's job id for the batch; split jobs keep it
    first: int
    count: int
    where: CallWhere
    calls: bytes  # the pickle, or (where=MEMFD) encode_memfd_ref()

    def encode(self) -> bytes:
        return _CALL_BATCH.pack(self.batch, self.first, self.count, self.where) + self.calls

    @classmethod
    def decode(cls, payload: bytes) -> CallBatch:
        try:
            batch, first, count, where = _CALL_BATCH.unpack_from(payload)
            return cls(batch, first, count, CallWhere(where), payload[_CALL_BATCH.size:])
        except (struct.error, ValueError) as e:
            raise ProtocolError(f"bad batch of calls: {e}") from None

    def split(self) -> list[CallBatch]:
        """Each call alone, with the same pickle."""
        return [dataclasses.replace(self, first=i, count=1)
                for i in range(self.first, self.first + self.count)]


_CALL_BATCH = struct.Struct("!QIIB")  # batch, first, count, CallWhere


_MEMFD = struct.Struct("!IIQ")  # pid, fd, size of the pickle


def encode_memfd_ref(pid: int, fd: int, size: int) -> bytes:
    return _MEMFD.pack(pid, fd, size)


def decode_memfd_ref(data: bytes) -> tuple[int, int, int]:
    try:
        return _MEMFD.unpack(data)
    except struct.error as e:
        raise ProtocolError(f"bad memfd reference: {e}") from None


# A batch's outcomes (a CALL job's Result payload) are one pickle of (returned, values), one
# item each per call run, in order: returned[i] is 1 if call i returned, and values[i] the
# pickle of its return value; else 0, and the pickle of (exception, traceback text). Each
# value is a pickle of its own, so that one value that does not unpickle in the caller fails
# its own future and no other.
# When every call returned a value of a PLAIN_TYPES type (which unpickles anywhere), returned
# is None and values are the values themselves: one pickle for the batch, the common case.
# A batch whose pickle does not load in the worker has the outcomes (None, the pickle of
# (exception, traceback text)). The worker cannot tell which call is at fault, nor how many
# calls the pickle holds (a batch split after a worker's death runs one call of it): the
# caller can. If the pickle held other calls, it sends the calls run here again, a batch
# each, so that an argument that cannot be unpickled there fails its own call alone; if
# not, that call fails with the exception.
PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})
