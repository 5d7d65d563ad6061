"""The crash-recovery log and the events file: one source, two renderings.

    [Dealer] Sent job 1 -> fib(30)
    {"t": 5123.402113, "event": "job_sent", "role": "Dealer", "pid": 1466, "job": 1, ...}

Every event is one call to a `logging` logger, with its structured fields given as
``extra=event(ev.JOB_SENT, job=1, worker=1471)``. Handlers render it: `FdHandler` as the text
line, `JsonlHandler` as a JSON object with a monotonic timestamp (CLOCK_MONOTONIC, the same
clock in every process of the run), and `LiveHandler` hands it to main's live view. A line
the text log shows is always an event in the JSONL; there is no second set of calls. The
per-job events (a job sent, a result received) are the one call `job_event`, which writes
the same text line itself when the text log is the only output, and goes through `logging`
otherwise.

Every process of a run writes with a single os.write() per line to descriptors opened
before the forks (stderr or the --log file opened O_APPEND, the --events file, the live
view's pipe). There is no buffered stream in the way, which matters twice: lines from
different processes never interleave mid-line, and a child forked while another thread is
logging cannot inherit a held stdio buffer lock (CPython gh-84579). The handlers' own
locks are re-initialised in the child by `logging`'s at-fork hook.

Who speaks: one tag a role, from the logger's name (`taskpool.<role>`), the same in the text
line's `[...]` and in the event's "role".

    Main           the `taskpool run` process: start-up, lost roles, the exit table, summary
    TaskGenerator  the process that reads the jobs and queues them
    Dealer         the Dealer process: jobs to workers (and, in typed pools, which worker of
                   the job's type), results, shutdown; and two duties of its own, logged
                   under their names:
      Supervisor     its workers' deaths and what they cost: the policy, failed jobs,
                     kills for a timeout or a missed heartbeat, giving up
      Recovery       the jobs a dead worker held: resent, requeued, split
    Worker         a worker process, with its PID (and its pool's type in typed pools):
                   `[Worker 1471 type 2]`
    Dask           the Dask engine's client side (it logs as Main, Supervisor and Recovery
                   too, for the same duties as the local engine's)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from taskpool.observe import events as ev
from taskpool.observe.shown import Shown, ShownFilter
from taskpool.posix.proc import write_all

_ROLE_TAGS = {
    "taskpool.main": "Main",
    "taskpool.generator": "TaskGenerator",
    "taskpool.dealer": "Dealer",
    "taskpool.supervisor": "Supervisor",
    "taskpool.recovery": "Recovery",
    "taskpool.worker": "Worker",
    "taskpool.dask": "Dask",
}

# The roles' loggers, one a role (tagged by _ROLE_TAGS): a module logs a line as the role
# whose duty it tells, as seed 004's log does (the Dealer's recv thread resends a job as
# [Recovery]; its recovery thread reports a death as [Supervisor]).
main_log = logging.getLogger("taskpool.main")
generator_log = logging.getLogger("taskpool.generator")
dealer_log = logging.getLogger("taskpool.dealer")
supervisor_log = logging.getLogger("taskpool.supervisor")
recovery_log = logging.getLogger("taskpool.recovery")
worker_log = logging.getLogger("taskpool.worker")
dask_log = logging.getLogger("taskpool.dask")

# In a worker of a typed pool: " type 2", so that its lines read [Worker 1471 type 2]; and
# the fields its events carry: the job type it takes (`type`, a number, as a job's) and its
# pool's label (`pool`, as the log names it: "type 2", "type fib").
_worker_pool = ""
_worker_fields: dict[str, Any] = {}
_descriptors: set[int] = set()


@dataclass(frozen=True)
class _JobLines:
    """Where `job_event` writes the per-job events itself, without `logging`: with no
    events file, and no live view that shows them as lines (the handlers that want the
    whole record)."""

    text_fd: int  # the text log; -1 when it does not show them
    text_level: int
    live_fd: int | None  # the live view's pipe, for what its progress line counts
    main_pid: int
    live_sink: Callable[[dict[str, Any]], None] | None  # the view itself, in main


# None: per-job events go through `logging`, as every other event.
_job_lines: _JobLines | None = None
# What the live view counts of the per-job events (who holds which job: its running jobs),
# and all it is sent of one when it shows no per-job line.
_LIVE_FIELDS = ("job", "worker", "type")
_LIVE_EVENTS = frozenset({ev.JOB_SENT, ev.JOB_STARTED})  # (outcomes: from main's Recorder)


def set_worker_pool(number: int, label: str) -> None:
    """Called once in a newly forked worker of a typed pool."""
    global _worker_pool
    _worker_pool = f" {label}"
    _worker_fields.update(type=number, pool=label)


def event(name: str, at: float | None = None, **data: Any) -> dict[str, Any]:
    """The `extra=` of a log call that is an event of its own kind (a name of
    `events.NAMES`), with its fields; `at` is when it happened (time.monotonic()), if earlier
    than the log call."""
    assert name in ev.NAMES, f"event {name!r} is not in observe/events.py"
    return {"event": name, "data": data, "at": at}


def role_tag(record: logging.LogRecord) -> str:
    return _role_tag(record.name, record.process)


def _role_tag(logger_name: str, pid: int | None) -> str:
    if logger_name == "taskpool.worker":
        return f"Worker {pid}{_worker_pool}"
    return _ROLE_TAGS.get(logger_name, logger_name)


def as_event(record: logging.LogRecord, text: str) -> dict[str, Any]:
    """The JSON object of a record: when, what kind, who, its fields, and its text line."""
    body: dict[str, Any] = {
        "t": round(getattr(record, "at", None) or time.monotonic(), 6),
        "event": getattr(record, "event", ev.LOG),
        "role": _ROLE_TAGS.get(record.name, record.name),
        "pid": record.process,
    }
    if record.name == "taskpool.worker":
        body.update(_worker_fields)
    body.update(getattr(record, "data", {}))
    body["level"] = record.levelname.lower()
    body["text"] = text
    return body


def job_event(logger: logging.Logger, name: str, msg: str, *args: Any,
              level: int = logging.INFO, **data: Any) -> None:
    """An event that comes once or more per job (a job sent, started, its result
    received): one call, as any event, rendered as `logger.log(level, msg, *args,
    extra=event(name, **data))` would render it. With no events file, its line is written
    here, without a LogRecord: `logging` costs ~6.6 us a line against ~1.4 us for the write
    itself (measured with the Dealer's result line), and the Dealer writes two lines a job;
    the live view is sent only the fields it counts, as a short JSON line."""
    sinks = _job_lines
    if sinks is None:
        if logger.isEnabledFor(level):
            logger.log(level, msg, *args, extra=event(name, **data))
        return
    if sinks.text_fd >= 0 and level >= sinks.text_level:
        line = f"[{_role_tag(logger.name, os.getpid())}] {msg % args}\n"
        _write_quietly(sinks.text_fd, line.encode("utf-8", "replace"))
    if sinks.live_fd is not None and name in _LIVE_EVENTS:
        body = {"event": name, **{key: data[key] for key in _LIVE_FIELDS if key in data}}
        if sinks.live_sink is not None and os.getpid() == sinks.main_pid:
            sinks.live_sink(body)
        else:
            _write_quietly(sinks.live_fd, json.dumps(body, separators=(",", ":")).encode()
                           + b"\n")


def _write_quietly(fd: int, data: bytes) -> None:
    try:
        write_all(fd, data)
    except OSError:
        pass  # a log line must never take a process down (as FdHandler's)


class RoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        """``[Role] message``, and the traceback below it when the record has one
        (`log.exception`: a bug, whose traceback must reach the log)."""
        line = f"[{role_tag(record)}] {record.getMessage()}"
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        return line


class FdHandler(logging.Handler):
    """Writes each record as its text line with one os.write() to a raw descriptor."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.setFormatter(RoleFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_all(self.fd, (self.format(record) + "\n").encode("utf-8", "replace"))
        except OSError:
            pass  # its reader went away (a closed pipe): the log is lost, never the process
        except Exception:  # a log line must never take a process down
            self.handleError(record)


class JsonlHandler(FdHandler):
    """Writes each record as one JSON line (`as_event`) with one os.write()."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = json.dumps(as_event(record, self.format(record)), separators=(",", ":"))
            write_all(self.fd, line.encode("utf-8", "replace") + b"\n")
        except Exception:
            self.handleError(record)


class LiveHandler(JsonlHandler):
    """With the live view on: children write their events as JSON lines to a pipe that
    main reads; main itself hands its own straight to `sink`."""

    def __init__(self, fd: int, main_pid: int, sink: Callable[[dict[str, Any]], None],
                 wants_job_lines: bool = True) -> None:
        super().__init__(fd)
        self.main_pid = main_pid
        self.sink = sink
        # Whether the view shows the per-job lines (-v, --demo): else job_event sends it
        # only what it counts, without `logging`.
        self.wants_job_lines = wants_job_lines

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self.main_pid:
            super().emit(record)
            return
        try:
            self.sink(as_event(record, self.format(record)))
        except Exception:
            self.handleError(record)


def setup(
    fd: int | None,
    level: int = logging.INFO,
    events_fd: int | None = None,
    live: LiveHandler | None = None,
    shown: Shown = Shown.EVERYTHING,
    stderr_shown: Shown | None = None,
) -> None:
    """Route every taskpool logger: the text log to `fd` at `level`, what `shown` lets
    through (observe/shown.py); every event (debug included) to `events_fd`, or, with the
    live view, to `live`, which renders both the terminal and the events file. With
    `stderr_shown`, stderr gets the text log too, through that policy (-q with --log: the
    errors and the summary). Called once in main, before any fork; children inherit the
    configuration."""
    _skip_what_no_handler_renders()
    root = logging.getLogger("taskpool")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    _descriptors.clear()
    texts = [] if fd is None else [(fd, shown)]
    if stderr_shown is not None and fd != 2:
        texts.append((2, stderr_shown))
    for handler in _handlers(texts, level, events_fd, live):
        root.addHandler(handler)
        if isinstance(handler, FdHandler):
            _descriptors.add(handler.fd)
    # Every event for an events file, or a view that shows every line (it filters them by
    # its own level); else only the lines shown: a DEBUG line costs its Ack (dealer.py).
    detailed = events_fd is not None or (live is not None and live.wants_job_lines)
    root.setLevel(logging.DEBUG if detailed else level)
    root.propagate = False
    global _job_lines
    _job_lines = None
    if events_fd is None and (live is None or not live.wants_job_lines):
        text_fd = fd if fd is not None and shown is Shown.EVERYTHING else -1
        _job_lines = _JobLines(text_fd, level, live.fd if live else None, os.getpid(),
                               live.sink if live else None)
    logging.raiseExceptions = False


def _skip_what_no_handler_renders() -> None:
    # What no handler of ours renders, and `logging` would work out for every record (the
    # Logging HOWTO's "Optimization"): the caller's file and line (a walk up the stack),
    # the thread's name, the multiprocessing process's name. The Dealer writes two lines
    # per job; these were about a sixth of its cost per line. The processes are our own
    # (the CLI's, the Executor's host): no caller's logging is touched.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


def _handlers(
    texts: list[tuple[int, Shown]], level: int, events_fd: int | None,
    live: LiveHandler | None,
) -> list[logging.Handler]:
    handlers: list[logging.Handler] = []
    for fd, shown in texts:
        text = FdHandler(fd)
        text.setLevel(level)
        if shown is not Shown.EVERYTHING:
            text.addFilter(ShownFilter(shown))
        handlers.append(text)
    if live is not None:
        handlers.append(live)
    elif events_fd is not None:
        handlers.append(JsonlHandler(events_fd))
    return handlers


def descriptors() -> set[int]:
    """The descriptors the log writes to: a forked child must keep them open."""
    return set(_descriptors)
