"""Every test is checked for what it leaves behind: a live or zombie process of a run, or a
queue in /dev/mqueue, fails the test that left it."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import RUNS, leftovers_of, queues_left

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="session", autouse=True)
def test_process_is_subreaper() -> None:
    """When a test kills main with SIGKILL, the Dealer and generator are reparented to us
    (as they would be to init) and reaped by the leftovers check, not left as zombies."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


@pytest.fixture(scope="session", autouse=True)
def mqueue_mounted() -> None:
    """/dev/mqueue shows the queues that exist; mount it if this machine has not."""
    if not os.path.ismount("/dev/mqueue") and os.geteuid() == 0:
        os.makedirs("/dev/mqueue", exist_ok=True)
        subprocess.run(["mount", "-t", "mqueue", "none", "/dev/mqueue"], check=False)


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    before = set(queues_left())
    del RUNS[:]
    yield
    problems = []
    for run in RUNS:
        if run.proc.poll() is None:
            problems.append(f"run {run.pid} was still running at the end of the test")
            os.killpg(run.pid, signal.SIGKILL)
            run.proc.wait()
        problems += leftovers_of(run)
    problems += [f"queue /dev/mqueue/{q}" for q in set(queues_left()) - before]
    del RUNS[:]
    assert not problems, "left behind:\n" + "\n".join(problems)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory a normal user can write (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="taskpool-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)
