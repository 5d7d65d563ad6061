"""The wire formats, one module a channel: `queue` (POSIX queue messages, and the same
messages in a worker's mailbox, posix/mailbox.py), `records` (JSON
lines on the pipes to main, and the results file's lines), `frames` (the Executor's pipes),
`calls` (a CALL job's payload). Each is the only place that knows its bytes.

Who sends what, on which channel::

    TaskGenerator --JobBatch, Job, EndOfJobs----> ready queue ----> Dealer send thread
    Dealer (own threads) --Stop-----------------> ready queue ----> Dealer send thread
    Dealer send thread --Job, Shutdown----------> mailbox (one per worker) -------> Worker
    Worker --Ack, Result, Heartbeat-------------> result queue ---> Dealer recv thread
    Dealer recovery thread --WorkerExited, Terminate--> result queue
    Dealer send thread --EndOfJobs--------------> result queue
    TaskGenerator --JobAccepted, LineRejected---> intake pipe  ---> main   (stdin input only)
    Dealer recv thread --JobRecord, DealerStats-> record pipe  ---> main

and, when the caller is a taskpool.Executor (the Dealer runs in executor/host.py)::

    Executor feeder thread --Settings, Batch, End--> submit pipe ---> host's intake thread
    host intake thread --Job (kind CALL), EndOfJobs--> ready queue ---> Dealer send thread
    Worker --ResultHandedOver-------------------> result queue (a result over one message,
                                                  its payload first by the handoff socket,
                                                  posix/handoff.py; where a pool has none,
                                                  as ResultPart..., Result)
    Dealer recv thread --Outcomes, Failed, Stopped--> outcome pipe --> Executor collector

A CALL job carries a CallBatch as a payload after the fixed fields, and its Result carries
the calls' outcomes. Calls and outcomes are pickles made and read only by the Executor and
the workers; the Dealer reads the CallBatch header alone, to split a batch whose worker died
into single calls.

Pipe messages are JSON lines, one object each, shorter than PIPE_BUF; each pipe has one
writer, which may write several lines at once (the Dealer's records up to PIPE_BUF, the
generator's a read of standard input's) and the reader splits them. Anything malformed
raises `ProtocolError`; receivers log it and go on (`decoded_or_dropped`).
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that does not decode: wrong version, unknown type, wrong length."""


def decoded_or_dropped(decode: Callable[[bytes], T], data: bytes, log: logging.Logger,
                       what: str) -> T | None:
    """`decode(data)`, or None after logging why `what` (``message from a worker``) was
    dropped: a receiver goes on past a malformed message."""
    try:
        return decode(data)
    except ProtocolError as e:
        log.error("Dropped a malformed %s: %s", what, e)
        return None
