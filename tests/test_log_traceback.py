"""A bug's traceback reaches the log: `log.exception` in any role writes it below its line."""

from __future__ import annotations

import logging
import os

from taskpool.observe.log import FdHandler


def test_an_exception_logged_by_a_role_writes_its_traceback_under_the_line() -> None:
    read_end, write_end = os.pipe()
    logger = logging.getLogger("taskpool.generator")
    handler = FdHandler(write_end)
    logger.addHandler(handler)
    try:
        try:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        except BlockingIOError:
            logger.exception("TaskGenerator failed")
    finally:
        logger.removeHandler(handler)
        os.close(write_end)
    text = os.read(read_end, 65536).decode()
    os.close(read_end)
    assert text.startswith("[TaskGenerator] TaskGenerator failed\nTraceback (most recent")
    assert "BlockingIOError: [Errno 11] Resource temporarily unavailable" in text


def test_a_log_whose_reader_is_gone_costs_the_line_not_the_process() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    handler = FdHandler(write_end)
    record = logging.LogRecord("taskpool.worker", logging.INFO, __file__, 1, "Starting up",
                               None, None)
    handler.emit(record)  # EPIPE (SIGPIPE is ignored in pytest, as in our children)
    os.close(write_end)
