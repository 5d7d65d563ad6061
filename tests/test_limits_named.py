"""A limit that stops the pool is named for what it is, with the setting that raises it."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from harness import PoolRun, as_user, read_results, write_job_file

NOBODY = 65534


FEW_DESCRIPTORS = 10  # main's own: too few for its queue and pipes


def _few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FEW_DESCRIPTORS, FEW_DESCRIPTORS))


def test_running_out_of_descriptors_is_blamed_on_ulimit_n_not_the_queue_budget() -> None:
    run = PoolRun(["--workers", "64"], stdin=b"sleep 0\n" * 64, preexec_fn=_few_descriptors)
    assert run.finish() == 1
    log = run.log_text()
    assert f"ran out of file descriptors (`ulimit -n` is {FEW_DESCRIPTORS})" in log
    assert "RLIMIT_MSGQUEUE" not in log and "Traceback" not in log


def test_a_pool_needs_no_descriptor_for_each_worker() -> None:
    """Workers take their jobs from mailboxes in shared memory: 64 workers run under an
    open-file limit that one descriptor a worker would pass three times over."""
    run = PoolRun(["--workers", "64"], stdin=b"sleep 0\n" * 64,
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (20, 20)))
    assert run.finish() == 0, run.log_text()


def _tiny_queue_budget() -> None:
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (1000, 1000))


def test_a_pool_that_cannot_start_reports_every_job_not_done(shared_dir: Path) -> None:
    """main's own queue refused (a budget too small for the first queue): the run still
    writes a record for every job of its file, with the reason."""
    jobs = write_job_file(shared_dir, ["fib 1", "sleep 0", "fib 2"])
    results = shared_dir / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results)],
                  preexec_fn=_tiny_queue_budget,
                  user=NOBODY if os.geteuid() == 0 else None)  # root passes queue limits
    assert run.finish() == 1
    assert "Traceback" not in run.log_text()
    records = read_results(results)
    assert [(r["job"], r["status"]) for r in records] == [
        (1, "not_done"), (2, "not_done"), (3, "not_done")]
    assert all("the pool could not start" in r["reason"] for r in records)


_FILL_QUEUE_COUNT = """
import sys, posix_ipc, secrets
held = []
while True:
    try:
        q = posix_ipc.MessageQueue("/taskpool-test-fill-" + secrets.token_hex(8),
                                   flags=posix_ipc.O_CREX, max_messages=1,
                                   max_message_size=1)
    except OSError:
        break  # the system's queue count, or this user's budget: either way, full
    q.unlink()  # counted until closed: nothing is left if this process is killed
    held.append(q)
print(len(held), flush=True)
sys.stdin.read()  # until the test is done with the full count
"""


_IN_NEW_IPC_NAMESPACE = """
import json, subprocess, sys
filler_command, pool_command = json.loads(sys.argv[1])
filler = subprocess.Popen(filler_command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
print("filled", int(filler.stdout.readline()), flush=True)
pool = subprocess.run(pool_command, stdin=subprocess.DEVNULL,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
print("exit", pool.returncode)
print(pool.stdout.decode())
filler.communicate(b"", timeout=60)
"""


def test_the_systems_queue_count_used_up_is_named_with_its_setting(shared_dir: Path) -> None:
    """Another program of this user holds every queue the system allows
    (fs.mqueue.queues_max, for all users together): the run names that limit. In an IPC
    namespace of its own (`unshare --ipc`), so that no other run on the machine is short
    of queues meanwhile, and none of theirs frees one."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a new IPC namespace, and a normal user in it")
    if subprocess.run(["unshare", "--ipc", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine allows no new IPC namespace (unshare --ipc)")
    jobs = write_job_file(shared_dir, ["fib 1"])
    filler = as_user(NOBODY, [sys.executable, "-c", _FILL_QUEUE_COUNT])
    pool = as_user(NOBODY, [sys.executable, "-m", "taskpool", "run", "--workers", "2",
                            "--jobs", str(jobs)])
    out = subprocess.run(["unshare", "--ipc", sys.executable, "-c", _IN_NEW_IPC_NAMESPACE,
                          json.dumps([filler, pool])],
                         capture_output=True, text=True, timeout=180).stdout
    assert "filled" in out and "filled 0" not in out, out
    assert "exit 1" in out, out
    assert "fs.mqueue.queues_max" in out and "Traceback" not in out, out
