"""A limit that stops the pool is named for what it is, with the setting that raises it."""

from __future__ import annotations

import resource

from harness import PoolRun


def _few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))


def test_running_out_of_descriptors_is_blamed_on_ulimit_n_not_the_queue_budget() -> None:
    run = PoolRun(["--workers", "64"], stdin=b"sleep 0\n" * 64, preexec_fn=_few_descriptors)
    assert run.finish() == 1
    log = run.log_text()
    assert "ran out of file descriptors (`ulimit -n` is 40)" in log
    assert "RLIMIT_MSGQUEUE" not in log and "Traceback" not in log
