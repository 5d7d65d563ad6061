"""Payloads too large for a queue message, handed from a worker to its Dealer out of the
queue, over a Unix datagram socket: in the datagram itself up to INLINE_LIMIT bytes, else in
a memfd of their own passed with it (SCM_RIGHTS).

Why: a queue's every byte counts against the user's RLIMIT_MSGQUEUE, so an Executor's result
queue has small messages (executor/settings.py), and a result of 50 KB would cross it in
50 parts, two system calls and a Python decode each, one of 5 MB in thousands. Here it
costs the worker one sendmsg() (and, past INLINE_LIMIT, a memfd and one write), and the
Dealer one recvmsg() (and one read). Measured, one process, per payload: 50 KB inline
9 us, in a memfd 46 us, in 50 parts of 1 KB 283 us (in 7 of 8 KB, as before, 55 us).

How, with no name anywhere and nothing that could outlive the pool:

    worker   sendmsg(key + payload), or sendmsg(key, [memfd holding the payload]) and
             close its fd -> THEN its message on the result queue, which says "handed
             over" (wire/queue.py's ResultHandedOver)
    Dealer   (recv thread) reads that message, then takes the datagram of the same key
             from the socket (there already: it was sent first), and closes its memfd

What is in flight belongs to the socket: if the worker dies once it is sent, the Dealer
still finds it (`take`, its message was sent) or drops it (`forget`, at the worker's
WorkerExited: its message never came); if the Dealer dies, the kernel closes the socket and
whatever is in it. A memfd is anonymous memory, gone with its last descriptor.

Why not as a batch of calls goes (a memfd the reader opens through /proc/PID/fd/N): a worker
that exits right after its result (max_tasks_per_child, a Shutdown) would take its memfd
with it before the Dealer opened it; a socket owns what is in flight. Why not one memfd
shared by the pool, a region a worker: a dead worker's unannounced region could not be told
from that of a replacement given the same pid.

The socket pair is made by the Dealer before it forks any worker; every worker inherits the
send end (the Dealer keeps it open in each worker: local/dealer.py, _handoff_fds), and
finds it as this module's `pool_handoff()`, set in the Dealer's process by `install` before
the first fork (a worker closes the receive end, and never touches its object). A datagram
is sent whole or not at all, so the workers share the socket.
Back-pressure: when net.unix.max_dgram_qlen (10) datagrams, or the send end's buffer
(net.core.wmem_default, 208 KB), wait unread, a worker's sendmsg() blocks; each of them is
taken as the Dealer reads its message (sent already, or about to be by a live worker past
its sendmsg()), or dropped at its worker's death: never a deadlock, as the Dealer never
waits on the socket.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Union

from taskpool.posix.proc import read_exactly, write_all

# The key of a handed-over payload: worker pid, job id, attempt (one worker runs an attempt).
_KEY = struct.Struct("!IQH")
Key = tuple[int, int, int]

# A payload up to this size goes in its datagram; a larger one in a memfd. Well under the
# largest datagram the default send buffer takes (wmem_default, 212,992 bytes), so that a
# few fit in it at once.
INLINE_LIMIT = 64 * 1024

# What a datagram brought: the payload itself, the memfd that holds it, or None if its memfd
# was lost on the way (the Dealer out of descriptors: the kernel drops it).
Arrived = Union[bytes, int, None]


class PayloadHandoff:
    """Both ends of the pool's handoff socket: `hand_over` is a worker's (any number of
    them, each in its own process), `take` and `forget` the Dealer's recv thread's alone."""

    def __init__(self) -> None:
        self.receive_end, self.send_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.receive_end.setblocking(False)  # a payload is there before its message
        # Received ahead of their result message (another worker's was wanted), by key.
        self._arrived: dict[Key, Arrived] = {}

    # --- a worker's -------------------------------------------------------------------------

    def hand_over(self, key: Key, payload: bytes) -> None:
        """`payload` on its way to the Dealer; OSError if it could not be (no descriptor or
        memory for a memfd, too many in flight): then the caller sends it another way."""
        head = _KEY.pack(*key)
        if len(payload) <= INLINE_LIMIT:
            try:
                self.send_end.sendmsg([head, payload])
                return
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    raise
                # A send buffer below the default (net.core.wmem_default): by memfd.
        fd = os.memfd_create("taskpool-payload", os.MFD_CLOEXEC)
        try:
            write_all(fd, payload)
            socket.send_fds(self.send_end, [head], [fd])
        finally:
            os.close(fd)  # the socket holds its own reference now

    # --- the Dealer's recv thread's -----------------------------------------------------------

    def take(self, key: Key, size: int) -> bytes | None:
        """The payload handed over as `key`, of `size` bytes; None if it cannot be had (lost
        on the way, or never sent: a bug), which the caller treats as a result never sent."""
        if key in self._arrived:
            arrived = self._arrived.pop(key)
        else:
            arrived = self._receive_until(key)
        if isinstance(arrived, int):
            memfd = arrived
            try:
                arrived = read_exactly(memfd, size)
            except OSError:
                arrived = None
            finally:
                os.close(memfd)
        return arrived if arrived is not None and len(arrived) == size else None

    def forget(self, pid: int) -> None:
        """Worker `pid` is dead and reaped: what it handed over and never announced (it died
        between the two sends) will never be taken. Everything it sent is in the socket by
        now, so one drain finds it all."""
        self._receive_until(None)
        for key in [key for key in self._arrived if key[0] == pid]:
            _close_if_memfd(self._arrived.pop(key))

    def close(self) -> None:
        for arrived in self._arrived.values():
            _close_if_memfd(arrived)
        self._arrived.clear()
        self.receive_end.close()
        self.send_end.close()

    def _receive_until(self, wanted: Key | None) -> Arrived:
        """Datagrams, until the one of `wanted` (what it brought) or the socket is empty
        (None); the others wait in `_arrived`."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.receive_end,
                                                      _KEY.size + INLINE_LIMIT, 1)
            except BlockingIOError:
                return None
            if len(data) < _KEY.size:
                for fd in fds:
                    os.close(fd)
                continue  # not one of ours: nobody else holds the socket
            key: Key = _KEY.unpack_from(data)
            arrived: Arrived = data[_KEY.size:]
            if fds:
                arrived = fds[0]
            elif flags & socket.MSG_CTRUNC:
                arrived = None  # its memfd, dropped by the kernel: no descriptor was free
            if key == wanted:
                return arrived
            self._arrived[key] = arrived


def _close_if_memfd(arrived: Arrived) -> None:
    if isinstance(arrived, int):
        os.close(arrived)


# The handoff of the pool this process's Dealer runs, for its workers (forks of it): set
# before the first fork, in the Dealer's process only (an Executor's host), never in the
# caller's. A CLI run's pools have none: their results fit a message.
_POOL_HANDOFF: PayloadHandoff | None = None


def install(handoff: PayloadHandoff) -> None:
    global _POOL_HANDOFF
    _POOL_HANDOFF = handoff


def pool_handoff() -> PayloadHandoff | None:
    return _POOL_HANDOFF
