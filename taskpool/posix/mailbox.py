"""Mailboxes: how the Dealer hands a job to one worker, in memory shared with it.

A mailbox is a slot of one anonymous shared mapping (`Mailboxes`, made by the Dealer before
it forks any worker, so every worker inherits it): a process-shared POSIX semaphore, whose
count is the number of messages posted and not yet taken, and a small ring of messages.

    Dealer (under PoolState.lock)              Worker (its main thread)
    send:      write ring[head], sem_post      receive: sem_wait, read ring[tail]
    take_back: sem_trywait, read ring[head-1]

Why not a POSIX queue per worker, as before. Every queue counts against
`fs.mqueue.queues_max` (256 for every unprivileged user of the machine together) and against
the user's RLIMIT_MSGQUEUE: a queue per worker stopped one run near 250 workers, and a few
runs or Executors of one user much earlier. What the per-worker queue gave is kept here
exactly: the Dealer knows which worker holds a job from the moment it sends it (so no
window between a worker's receive and an ACK ever loses a job, and none runs twice because
of how it was handed over), and taking an unstarted job back is atomic, as a non-blocking
receive from the worker's queue was: sem_trywait() and the worker's sem_wait() take the
same count, so each message is taken by the worker or taken back, never both. Queues stay
where many write and one reads: the ready queue and the result queue, two a run whatever
its number of workers. A shared request queue per pool was the other way: it would have
needed every worker to ACK every job, and a job whose worker died between its receive and
its ACK could only be found by resending what nobody acknowledged, running some jobs twice
on every death in a busy pool.

Ordering: the worker takes messages in the order sent (a FIFO ring); a take-back takes the
newest untaken message, which is always the last one written (the taken ones are the
oldest). The Dealer writes a message before posting it, and the worker reads it after its
wait returns: sem_post and sem_wait order those memory accesses (release, acquire).

A slot's ring has `depth` + 1 places: `depth` messages a worker may hold (the Dealer never
sends more: its credit), and one more for a Shutdown, so that a message is never written
over one the worker may still be reading.

Nothing here is named: a killed run leaves nothing behind (the mapping ends with the last
process that maps it), and nothing counts against any IPC limit. Memory: a slot is
128 + (depth + 1) * (4 + message size) bytes rounded up to whole pages (a CLI worker's
4 KB, an Executor's 16 KB), two slots a worker, touched only when used. A worker fences
off every slot but its own (`Mailbox.fence`): it can no more write into another worker's
mailbox than it could into another worker's queue.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

_LIBC = ctypes.CDLL(None, use_errno=True)
for _name in ("sem_init", "sem_destroy", "sem_post", "sem_wait", "sem_trywait"):
    getattr(_LIBC, _name).argtypes = [ctypes.c_void_p] + (
        [ctypes.c_int, ctypes.c_uint] if _name == "sem_init" else [])
    getattr(_LIBC, _name).restype = ctypes.c_int
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_LIBC.mprotect.restype = ctypes.c_int
_PROT_NONE = 0

# sizeof(sem_t) is 32 bytes in glibc and musl on 64-bit machines: room to spare.
_SEM_SIZE = 128
_LENGTH = struct.Struct("=I")  # a message's length, before its bytes in the ring


class MailboxError(RuntimeError):
    """A semaphore call failed: a bug, or memory no longer shared."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise MailboxError(f"{what}: {os.strerror(code)}")


class Mailboxes:
    """The Dealer's mailboxes: `count` slots in one shared mapping, handed out to workers
    and back. Allocation is the Dealer's (its recovery thread allocates, its recv thread
    releases a dead worker's slot), under PoolState.lock; the mapping itself is inherited
    by every worker at fork."""

    def __init__(self, count: int, depth: int, message_size: int) -> None:
        self.depth = depth
        self.message_size = message_size
        self.places = depth + 1
        entry = _LENGTH.size + message_size
        # Whole pages, so that a worker can fence off every slot but its own (`fence`).
        page = mmap.PAGESIZE
        self.slot_size = -(-(_SEM_SIZE + self.places * entry) // page) * page
        self.memory = mmap.mmap(-1, max(1, count) * self.slot_size)  # MAP_SHARED|ANONYMOUS
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self.free = list(range(count - 1, -1, -1))  # slot numbers, the lowest last

    @property
    def bytes(self) -> int:
        return len(self.memory)

    def allocate(self) -> Mailbox | None:
        """An empty mailbox, or None if every slot is in use (a dead worker's slot comes
        back when its death is handled)."""
        if not self.free:
            return None
        slot = self.free.pop()
        box = Mailbox(self, slot)
        _check(_LIBC.sem_init(box.sem, 1, 0), "sem_init")
        return box

    def release(self, box: Mailbox) -> None:
        """The slot of a worker that is dead, or was never started, back for another one.
        Its semaphore has no waiter: the only process that ever waited on it is dead."""
        _LIBC.sem_destroy(box.sem)
        self.free.append(box.slot)


class Mailbox:
    """One worker's slot. The Dealer's copy uses `send` and `take_back`; the worker's copy
    (the same object, inherited at fork) uses `receive`. Each side keeps its own index:
    `head` (the Dealer's: where the next message goes) and `tail` (the worker's: the next
    message it reads)."""

    __slots__ = ("memory", "base", "slot", "slot_size", "sem", "start", "places", "entry",
                 "head", "tail", "message_size")

    def __init__(self, boxes: Mailboxes, slot: int) -> None:
        self.memory = boxes.memory
        self.base = boxes._base
        self.slot = slot
        self.slot_size = boxes.slot_size
        offset = slot * boxes.slot_size
        self.sem = boxes._base + offset  # the semaphore's address
        self.start = offset + _SEM_SIZE  # the ring's offset in the mapping
        self.places = boxes.places
        self.message_size = boxes.message_size
        self.entry = _LENGTH.size + boxes.message_size
        self.head = 0
        self.tail = 0

    def fence(self) -> None:
        """In the worker, once forked: make every other worker's slot inaccessible to this
        process, so that a stray write (a C extension's, in a call) ends this worker with a
        SIGSEGV, a crash like any, rather than corrupting another worker's mailbox."""
        own = self.slot * self.slot_size
        for start, end in ((0, own), (own + self.slot_size, len(self.memory))):
            if start < end:
                _check(_LIBC.mprotect(self.base + start, end - start, _PROT_NONE), "mprotect")

    def _at(self, index: int) -> int:
        return self.start + (index % self.places) * self.entry

    def send(self, data: bytes) -> None:
        """Post a message. Never blocks: the Dealer sends no more than the ring holds."""
        if len(data) > self.message_size:
            raise ValueError(f"a message of {len(data)} bytes; the mailbox takes "
                             f"{self.message_size}")
        at = self._at(self.head)
        _LENGTH.pack_into(self.memory, at, len(data))
        self.memory[at + _LENGTH.size:at + _LENGTH.size + len(data)] = data
        self.head += 1
        _check(_LIBC.sem_post(self.sem), "sem_post")

    def take_back(self) -> bytes | None:
        """The newest message the worker has not taken, taken back; None if it took them
        all. Never blocks."""
        if _LIBC.sem_trywait(self.sem) != 0:
            code = ctypes.get_errno()
            if code == errno.EAGAIN:
                return None
            raise MailboxError(f"sem_trywait: {os.strerror(code)}")
        self.head -= 1
        return self._read(self.head)

    def take_back_all(self) -> list[bytes]:
        """Every message the worker has not taken, in the order they were sent."""
        taken: list[bytes] = []
        while (data := self.take_back()) is not None:
            taken.append(data)
        taken.reverse()
        return taken

    def receive(self) -> bytes:
        """The worker's next message: blocks in the kernel (the GIL released) until one is
        posted."""
        while _LIBC.sem_wait(self.sem) != 0:
            code = ctypes.get_errno()
            if code != errno.EINTR:  # a signal's handler ran: wait again (as PEP 475)
                raise MailboxError(f"sem_wait: {os.strerror(code)}")
        data = self._read(self.tail)
        self.tail += 1
        return data

    def _read(self, index: int) -> bytes:
        at = self._at(index)
        (length,) = _LENGTH.unpack_from(self.memory, at)
        return bytes(self.memory[at + _LENGTH.size:at + _LENGTH.size + length])
