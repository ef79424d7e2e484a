"""Connection counts shared by the worker processes: ``max_connections`` and
``max_connections_per_client`` hold for the whole daemon, not for each worker.

design: a memfd that the hub creates and passes to every worker (by fd), mapped by each. It begins
with one record per worker, all of them side by side so that one unpack reads every worker's load:
its open connections, its entries at a count of 0, whether it takes connections handed over
(1/0), and how many are on their way to it (``service/handoff.py``: written by the worker that
sends one, taken off by the receiver). Then one table per worker of its open connections per
client address: open-addressed (linear probing), keyed by 64-bit BLAKE2 hashes of the address (0:
never used). An address's entry stays where it is at a count of 0 (nothing is deleted in place);
such entries are swept by rehashing once they fill an eighth of the table. A worker writes only
its own record (and, for a move, the receiver's count of connections on their way) and its own
table; a decision (read every worker's, then count in its own) runs under a POSIX record lock on
the memfd (``lockf``: between processes) and a thread lock (between the loops of one process),
two system calls per decision. A worker's closes wait for its next decision, which takes them off
first (``admit``'s ``closed``), or for the end of its loop's pass (``close_many``): one lock for a
close and the admission after it, which for a client of one record a connection is every
connection; meanwhile the counts are higher than the truth, never lower. When a worker dies the
hub clears its counts and its table: the connections it held are gone, and so are their counts.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import mmap
import operator
import os
import struct
import threading
from collections.abc import Sequence

_EMPTY = 0
_SLOT = struct.Struct("=Qq")  # key, count
_WORKER = struct.Struct("=qqqq")  # open connections, entries at a count of 0, taking (1/0), coming
_HEAD = struct.Struct("=qq")  # the first two of _WORKER: open connections, entries at 0
_TAKING = 16  # offsets in a worker's record
_COMING = 24
_ONE = struct.Struct("=q")


@functools.lru_cache(maxsize=1 << 12)  # a worker sees the same few client addresses again and again
def _key(host: str) -> int:
    digest = hashlib.blake2b(host.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    key = int.from_bytes(digest, "little")
    return key if key != _EMPTY else 1


def table_slots(max_connections: int) -> int:
    """Slots per worker's table: at least twice the connections one worker can hold, a power of two."""
    return 1 << max(10, (2 * max_connections - 1).bit_length())


def _map_size(workers: int, slots: int) -> int:
    return workers * (_WORKER.size + slots * _SLOT.size)


class SharedCounts:
    """The open connections of every worker, per client address too, in shared memory."""

    def __init__(self, fd: int, workers: int, slots: int) -> None:
        self.fd = fd
        self.workers = workers
        self.slots = slots
        self.map = mmap.mmap(fd, _map_size(workers, slots))
        # Every worker's record in one unpack: (open, at 0, taking, coming) for worker 0, 1, ...
        self._records = struct.Struct("=" + _WORKER.format.lstrip("=") * workers)
        self._record_at = [w * _WORKER.size for w in range(workers)]
        tables = workers * _WORKER.size
        self._table_at = [tables + w * slots * _SLOT.size for w in range(workers)]
        self._lock = threading.Lock()
        # (worker, key) -> the offset of its slot: a process writes only its own table, so the
        # slots it filled stay where it put them until it rehashes or the table is cleared.
        self._offsets: dict[tuple[int, int], int] = {}

    def __repr__(self) -> str:
        return f"<SharedCounts workers={self.workers} slots={self.slots}>"

    @classmethod
    def create(cls, workers: int, max_connections: int) -> SharedCounts:
        """The hub, before it starts the workers (the fd goes to them through pass_fds)."""
        slots = table_slots(max_connections)
        fd = os.memfd_create("nio-logd-connections", os.MFD_CLOEXEC)
        os.ftruncate(fd, _map_size(workers, slots))
        return cls(fd, workers, slots)

    # -- locking ------------------------------------------------------------------------------------
    def __enter__(self) -> SharedCounts:
        self._lock.acquire()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    # -- reading (under the lock) -------------------------------------------------------------------
    def open_connections(self) -> int:
        """Every worker's connections, those on their way to one included."""
        records: tuple[int, ...] = self._records.unpack_from(self.map)
        return sum(records[0::4]) + sum(records[3::4])

    def lighter(self, worker: int) -> int | None:
        """The worker that takes connections handed over and holds at least two fewer than
        ``worker``, the lightest (each counted with the connections on their way to it); or None.
        Also read without the lock, as a hint: the decision is taken again under it."""
        records = self._records.unpack_from(self.map)
        at = 4 * worker
        if records[at] + records[at + 3] < 2:
            return None  # no load is below 0: the common case of short connections, decided at once
        loads = list(map(operator.add, records[0::4], records[3::4]))
        taking = records[2::4]
        best, best_load = None, loads[worker] - 1
        for w, load in enumerate(loads):
            if load < best_load and taking[w] and w != worker:
                best, best_load = w, load
        return best

    def _find(self, table: int, key: int) -> tuple[int, int]:
        """In the table at ``table``: (offset of ``key``'s slot or -1, the empty slot that ends
        its probe or -1)."""
        mask = self.slots - 1
        i = key & mask
        for _ in range(self.slots):
            offset = table + i * _SLOT.size
            k = _SLOT.unpack_from(self.map, offset)[0]
            if k == key:
                return offset, -1
            if k == _EMPTY:
                return -1, offset
            i = (i + 1) & mask
        return -1, -1

    def client(self, host: str) -> int:
        """The connections open from ``host`` in every worker."""
        return self._client(_key(host))

    def _client(self, key: int) -> int:
        total = 0
        for table in self._table_at:
            offset, _free = self._find(table, key)
            if offset >= 0:
                total += int(_SLOT.unpack_from(self.map, offset)[1])
        return total

    def admit(
        self, worker: int, host: str, max_connections: int, max_per_client: int, closed: Sequence[str] = ()
    ) -> str | None:
        """One decision for a connection from ``host`` (under the lock): None, and it is counted as
        ``worker``'s; or the limit that refuses it (``max_per_client`` 0: no limit per client).

        ``closed``: the client addresses of connections ``worker`` has closed and not yet taken off
        (``close_many``); they are taken off first, so the decision sees the counts as they are. A
        close from ``host`` itself and this connection's admission cancel out, so a client of one
        record a connection, whose previous connection has just closed, costs no table write."""
        key = _key(host)
        others = [other for other in closed if _key(other) != key]
        same = len(closed) - len(others)
        self.close_many(worker, others)
        refusal = None
        if self.open_connections() - same >= max_connections:
            refusal = "max_connections"
        elif max_per_client and self._client(key) - same >= max_per_client:
            refusal = "max_connections_per_client"
        delta = -same if refusal else 1 - same
        if delta:
            self._add(worker, key, delta)
        return refusal

    def close_many(self, worker: int, hosts: Sequence[str]) -> None:
        """Connections from ``hosts`` (one entry per connection) closed in ``worker``."""
        for host in hosts:
            self.add(worker, host, -1)

    # -- writing one's own counts (under the lock) --------------------------------------------------
    def add(self, worker: int, host: str, delta: int) -> None:
        """``delta`` connections from ``host`` opened (or, negative, closed) in ``worker``."""
        self._add(worker, _key(host), delta)

    def _add(self, worker: int, key: int, delta: int) -> None:
        m = self.map
        at = self._record_at[worker]
        open_now, idle = _HEAD.unpack_from(m, at)
        open_now += delta
        offset = self._offsets.get((worker, key), -1)
        if offset < 0:
            offset, free = self._find(self._table_at[worker], key)
            if offset < 0:
                if delta <= 0 or free < 0:
                    # nothing to take off; or full (cannot be: twice the worker's connections)
                    _HEAD.pack_into(m, at, open_now, idle)
                    return
                offset = free
                _SLOT.pack_into(m, offset, key, 0)
                idle += 1  # counted back out just below, as its count rises from 0
            self._offsets[worker, key] = offset
        before = _SLOT.unpack_from(m, offset)[1]
        count = max(0, before + delta)
        # A client's entry stays in its slot at 0 (the next connection from it finds it again
        # without a search; one-record connections take a count from 0 to 1 and back each time)
        # until the sweep drops it.
        if before <= 0 < count:
            idle -= 1
        elif count <= 0 < before:
            idle += 1
        _SLOT.pack_into(m, offset, key, count)
        _HEAD.pack_into(m, at, open_now, idle)
        if idle * 8 > self.slots:
            self._rehash(worker)

    def set_taking(self, worker: int, taking: bool) -> None:
        """``worker`` (its own record) starts or stops taking connections handed over."""
        _ONE.pack_into(self.map, self._record_at[worker] + _TAKING, int(taking))

    def moved_out(self, worker: int, target: int, host: str) -> None:
        """``worker`` has sent one of its connections (from ``host``) to ``target``."""
        self._add(worker, _key(host), -1)
        offset = self._record_at[target] + _COMING
        _ONE.pack_into(self.map, offset, _ONE.unpack_from(self.map, offset)[0] + 1)

    def moved_in(self, worker: int, host: str | None) -> None:
        """``worker`` has received a connection (from ``host``) handed over to it; None: one it
        could not take (it is no longer on its way, and not held either)."""
        offset = self._record_at[worker] + _COMING
        _ONE.pack_into(self.map, offset, max(0, _ONE.unpack_from(self.map, offset)[0] - 1))
        if host is not None:
            self._add(worker, _key(host), 1)

    def _forget_offsets(self, worker: int) -> None:
        for cached in [k for k in self._offsets if k[0] == worker]:
            del self._offsets[cached]

    def _rehash(self, worker: int) -> None:
        self._forget_offsets(worker)
        table = self._table_at[worker]
        end = table + self.slots * _SLOT.size
        live = []
        for offset in range(table, end, _SLOT.size):
            key, count = _SLOT.unpack_from(self.map, offset)
            if key != _EMPTY and count > 0:
                live.append((key, count))
        self.map[table:end] = bytes(end - table)
        mask = self.slots - 1
        for key, count in live:
            i = key & mask
            while _SLOT.unpack_from(self.map, table + i * _SLOT.size)[0] != _EMPTY:
                i = (i + 1) & mask
            _SLOT.pack_into(self.map, table + i * _SLOT.size, key, count)
        at = self._record_at[worker]
        _HEAD.pack_into(self.map, at, _HEAD.unpack_from(self.map, at)[0], 0)

    def clear(self, worker: int) -> int:
        """The hub, once ``worker`` has died: its connections are gone; returns how many it held.
        The ones on their way to it stay counted: they wait in its inbox for its successor."""
        at = self._record_at[worker]
        held = int(_HEAD.unpack_from(self.map, at)[0])
        _HEAD.pack_into(self.map, at, 0, 0)
        table = self._table_at[worker]
        size = self.slots * _SLOT.size
        self.map[table : table + size] = bytes(size)
        self.set_taking(worker, False)
        self._forget_offsets(worker)
        return held
