"""POSIX message queues: created private and unlinked at once, swept after a crash, and
the queue budget (which limit refused a queue, and why).

Queue lifetime: every queue is created with O_EXCL, mode 0600, under an unguessable name, and
its name is unlinked at once. The processes that use it get the descriptor through fork(), so
the queue lives exactly as long as some process of ours holds it open.

The one window is the microseconds between mq_open and mq_unlink, and SIGKILL can land in
it. Each creator has a survivor that removes what it left: main creates only before it forks
anything; the Dealer creates its one queue before it starts any thread, and main sweeps the
Dealer's names when it reaps it; when main dies, the Dealer is told by a catchable
parent-death signal, and every exit of a Dealer that main cannot see waits for a creation in
progress to end (`exit_between_creations`). A name whose creator is dead (main killed during
its own start-up) is swept by the next run (`sweep_abandoned_queues`).

Queue budget: the kernel charges a queue about max_messages * (msgsize + 96) bytes against
the user's RLIMIT_MSGQUEUE (819,200 bytes by default), and counts it against
fs.mqueue.queues_max (256 queues for every unprivileged user of the machine together). So a
run has two queues whatever its number of workers, the ready queue and the result queue
(workers take their jobs from mailboxes in shared memory: posix/mailbox.py): a CLI run's
cost 13,440 bytes (10 x 1,024 and 10 x 128 byte messages).
"""

from __future__ import annotations

import errno
import os
import resource
import secrets
import threading
from typing import NoReturn

import posix_ipc

# The kernel's default fs.mqueue.msg_max is 10: never ask for more.
READY_QUEUE_DEPTH = 10
RESULT_QUEUE_DEPTH = 10

QUEUE_DIR = "/dev/mqueue"  # where Linux shows queue names, when mounted (containers mount it)
_NAME_PREFIX = "taskpool-"

_PER_MESSAGE_OVERHEAD = 96  # bytes of kernel bookkeeping per message slot, x86-64


class QueueLimitError(RuntimeError):
    """The kernel refused a queue; the message says why in plain words."""


def queue_cost(depth: int, msgsize: int) -> int:
    return depth * (msgsize + _PER_MESSAGE_OVERHEAD)


def fits_budget(cost: int) -> bool:
    """Whether `cost` bytes of queues fit this user's queue budget (the soft
    RLIMIT_MSGQUEUE), were it all ours."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    return soft == resource.RLIM_INFINITY or cost <= soft


def _read_sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/fs/mqueue/{name}") as f:
            return f.read().strip()
    except OSError:
        return "?"


# Held from mq_open to mq_unlink. A thread that ends the process takes it first
# (`exit_between_creations`), so that no exit of ours cuts a creation in two.
_CREATING = threading.Lock()


def exit_between_creations(code: int) -> NoReturn:
    _CREATING.acquire()
    os._exit(code)


def create_queue(
    role: str, depth: int, msgsize: int
) -> posix_ipc.MessageQueue:
    """Create a private queue and unlink its name at once (see the module doc)."""
    with _CREATING:
        return _create_and_unlink(role, depth, msgsize)


def _create_and_unlink(role: str, depth: int, msgsize: int) -> posix_ipc.MessageQueue:
    name = f"/{_NAME_PREFIX}{os.getpid()}-{role}-{secrets.token_hex(8)}"
    try:
        queue = posix_ipc.MessageQueue(
            name,
            flags=posix_ipc.O_CREX,
            mode=0o600,
            max_messages=depth,
            max_message_size=msgsize,
            read=True,
            write=True,
        )
    except ValueError as e:
        raise QueueLimitError(
            f"the kernel refused a message queue of {depth} x {msgsize} bytes ({e}); "
            f"fs.mqueue.msg_max is {_read_sysctl('msg_max')} and fs.mqueue.msgsize_max is "
            f"{_read_sysctl('msgsize_max')}: raise them with sysctl"
        ) from None
    except OSError as e:
        # posix_ipc raises a bare OSError (errno None) saying "the maximum number of files
        # open" for EMFILE, which is what mq_open returns both when this process is out of
        # descriptors and when RLIMIT_MSGQUEUE is used up; ENOSPC is fs.mqueue.queues_max.
        if e.errno in (errno.EMFILE, errno.ENOMEM, errno.ENOSPC, None):
            raise QueueLimitError(_which_limit(_errno_of(e), depth, msgsize)) from None
        raise
    queue.unlink()
    return queue


def _errno_of(error: OSError) -> int | None:
    """posix_ipc raises OSError with no errno for ENOSPC (fs.mqueue.queues_max) and
    EMFILE: its message says which."""
    if error.errno is None and "insufficient space" in str(error).lower():
        return errno.ENOSPC
    return error.errno


def _which_limit(error: int | None, depth: int, msgsize: int) -> str:
    """Which limit refused a queue, with its numbers and the setting that raises it."""
    if error != errno.ENOSPC and _out_of_descriptors():
        return out_of_descriptors_reason()
    queues_max = _read_sysctl("queues_max")
    if error == errno.ENOSPC or (queues_max.isdigit() and len(_queue_names_all()) >= int(
            queues_max)):
        return (f"the system's message queue count is used up (fs.mqueue.queues_max, "
                f"{queues_max}, for every user of this machine together): raise it with "
                "`sysctl fs.mqueue.queues_max`")
    soft, _ = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    return ("the kernel refused another message queue: this user's queue memory "
            f"(RLIMIT_MSGQUEUE, {soft} bytes) is used up. This queue needs "
            f"{queue_cost(depth, msgsize)} bytes. Other programs, or queues still open in "
            "processes of an earlier run, may hold the rest: raise the limit with `ulimit -q` "
            "(or `prlimit --msgqueue`)")


def out_of_descriptors_reason() -> str:
    """What to tell a user whose process hit its descriptor limit (EMFILE)."""
    fd_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"this process ran out of file descriptors (`ulimit -n` is {fd_limit}): "
            "raise it with `ulimit -n`")


def _out_of_descriptors() -> bool:
    try:
        os.close(os.dup(2))
    except OSError as e:
        return e.errno == errno.EMFILE
    return False


def _queue_names_all() -> list[str]:
    """Every queue of this IPC namespace, of any user (what queues_max counts), if
    /dev/mqueue is mounted."""
    try:
        return os.listdir(QUEUE_DIR)
    except OSError:
        return []


def sweep_queues_of(pid: int) -> None:
    """Unlink any name `pid` created and did not unlink: it was killed inside the window.
    Needs /dev/mqueue mounted; without it there is nothing we can list."""
    for name in _queue_names():
        if name.startswith(f"{_NAME_PREFIX}{pid}-"):
            _unlink_quietly(name)


def sweep_abandoned_queues() -> None:
    """Unlink names of ours whose creator no longer exists (see the module doc)."""
    uid = os.getuid()
    for name in _queue_names():
        try:
            pid = int(name[len(_NAME_PREFIX):].split("-", 1)[0])
            if os.stat(f"{QUEUE_DIR}/{name}").st_uid != uid:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            _unlink_quietly(name)
        except (ValueError, OSError):
            continue  # not a name of ours, gone already, or its creator lives


def _queue_names() -> list[str]:
    try:
        return [n for n in os.listdir(QUEUE_DIR) if n.startswith(_NAME_PREFIX)]
    except OSError:
        return []


def _unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_message_queue(f"/{name}")
    except posix_ipc.ExistentialError:
        pass  # unlinked by its creator after all


