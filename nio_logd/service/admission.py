"""Connection counts shared by the worker processes: ``max_connections`` and
``max_connections_per_client`` hold for the whole daemon, not for each worker.

design: a memfd that the hub creates and passes to every worker (by fd), mapped by each, with one
region per worker: its open connections, and an open-addressed table (linear probing) of its open
connections per client address, keyed by 64-bit BLAKE2 hashes of the address (0: never used).
An address's entry stays where it is at a count of 0 (nothing is deleted in place); such entries
are swept by rehashing once they fill an eighth of the table. A worker writes only its own
region; a decision (read every region, then count in its own) runs under a POSIX record lock on
the memfd (``lockf``: between processes) and a thread lock (between the loops of one process),
two system calls per connection admitted. When a worker dies the hub clears its region: the
connections it held are gone, and so are their counts.

After the regions, one record per worker for the moves between workers (``service/handoff.py``):
whether it takes connections handed over, and how many are on their way to it (written by the
worker that sends one, taken off by the receiver, under the lock; counted as open meanwhile).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import mmap
import os
import struct
import threading

_EMPTY = 0
_SLOT = struct.Struct("=Qq")  # key, count
_HEAD = struct.Struct("=qq")  # the region's open connections, its entries at a count of 0
_COUNT = struct.Struct("=q")  # the first of _HEAD alone
_MOVES = struct.Struct("=qq")  # takes connections handed over (1/0), connections on their way to it


@functools.lru_cache(maxsize=1 << 12)  # a worker sees the same few client addresses again and again
def _key(host: str) -> int:
    digest = hashlib.blake2b(host.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    key = int.from_bytes(digest, "little")
    return key if key != _EMPTY else 1


def table_slots(max_connections: int) -> int:
    """Slots per region: at least twice the connections one worker can hold, a power of two."""
    return 1 << max(10, (2 * max_connections - 1).bit_length())


class SharedCounts:
    """The open connections of every worker, per client address too, in shared memory."""

    def __init__(self, fd: int, workers: int, slots: int) -> None:
        self.fd = fd
        self.workers = workers
        self.slots = slots
        self.region = _HEAD.size + slots * _SLOT.size
        self.moves = self.region * workers  # where the move records begin
        self.map = mmap.mmap(fd, self.moves + _MOVES.size * workers)
        # Read for every connection admitted: each region's open count, and all the move records
        # in one unpack (taking, coming, taking, coming, ...).
        self._open_at = [w * self.region for w in range(workers)]
        self._all_moves = struct.Struct("=" + "qq" * workers)
        self._lock = threading.Lock()
        # (worker, key) -> the offset of its slot: a process writes only its own region, so the
        # slots it filled stay where it put them until it rehashes or the region is cleared.
        self._offsets: dict[tuple[int, int], int] = {}

    def __repr__(self) -> str:
        return f"<SharedCounts workers={self.workers} slots={self.slots}>"

    @classmethod
    def create(cls, workers: int, max_connections: int) -> SharedCounts:
        """The hub, before it starts the workers (the fd goes to them through pass_fds)."""
        slots = table_slots(max_connections)
        fd = os.memfd_create("nio-logd-connections", os.MFD_CLOEXEC)
        os.ftruncate(fd, (_HEAD.size + slots * _SLOT.size + _MOVES.size) * workers)
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
        return sum(self._loads()[0])

    def _loads(self) -> tuple[list[int], tuple[int, ...]]:
        """Each worker's load (the connections it holds and those on their way to it), and
        whether each takes connections handed over (1/0)."""
        m = self.map
        moves = self._all_moves.unpack_from(m, self.moves)
        coming = moves[1::2]
        loads = [_COUNT.unpack_from(m, at)[0] + coming[w] for w, at in enumerate(self._open_at)]
        return loads, moves[0::2]

    def lighter(self, worker: int) -> int | None:
        """The worker that takes connections handed over and holds at least two fewer than
        ``worker``, the lightest (each counted with the connections on their way to it); or None.
        Also read without the lock, as a hint: the decision is taken again under it."""
        loads, taking = self._loads()
        best, best_load = None, loads[worker] - 1
        for w, load in enumerate(loads):
            if load < best_load and taking[w] and w != worker:
                best, best_load = w, load
        return best

    def _find(self, base: int, key: int) -> tuple[int, int]:
        """In the region at ``base``: (offset of ``key``'s slot or -1, the empty slot that ends
        its probe or -1)."""
        mask = self.slots - 1
        i = key & mask
        table = base + _HEAD.size
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
        key = _key(host)
        total = 0
        for w in range(self.workers):
            offset, _free = self._find(w * self.region, key)
            if offset >= 0:
                total += int(_SLOT.unpack_from(self.map, offset)[1])
        return total

    # -- writing one's own region (under the lock) --------------------------------------------------
    def add(self, worker: int, host: str, delta: int, *, per_client: bool) -> None:
        m = self.map
        base = worker * self.region
        open_now, idle = _HEAD.unpack_from(m, base)
        open_now += delta
        if not per_client:
            _HEAD.pack_into(m, base, open_now, idle)
            return
        key = _key(host)
        offset = self._offsets.get((worker, key), -1)
        if offset < 0:
            offset, free = self._find(base, key)
            if offset < 0:
                if delta <= 0 or free < 0:
                    # nothing to take off; or full (cannot be: twice the worker's connections)
                    _HEAD.pack_into(m, base, open_now, idle)
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
        _HEAD.pack_into(m, base, open_now, idle)
        if idle * 8 > self.slots:
            self._rehash(base)

    def set_taking(self, worker: int, taking: bool) -> None:
        """``worker`` (its own record) starts or stops taking connections handed over."""
        offset = self.moves + worker * _MOVES.size
        _MOVES.pack_into(self.map, offset, int(taking), _MOVES.unpack_from(self.map, offset)[1])

    def moved_out(self, worker: int, target: int, host: str) -> None:
        """``worker`` has sent one of its connections (from ``host``) to ``target``."""
        self.add(worker, host, -1, per_client=True)
        offset = self.moves + target * _MOVES.size
        taking, coming = _MOVES.unpack_from(self.map, offset)
        _MOVES.pack_into(self.map, offset, taking, coming + 1)

    def moved_in(self, worker: int, host: str | None) -> None:
        """``worker`` has received a connection (from ``host``) handed over to it; None: one it
        could not take (it is no longer on its way, and not held either)."""
        offset = self.moves + worker * _MOVES.size
        taking, coming = _MOVES.unpack_from(self.map, offset)
        _MOVES.pack_into(self.map, offset, taking, max(0, coming - 1))
        if host is not None:
            self.add(worker, host, 1, per_client=True)

    def _forget_offsets(self, worker: int) -> None:
        for cached in [k for k in self._offsets if k[0] == worker]:
            del self._offsets[cached]

    def _rehash(self, base: int) -> None:
        self._forget_offsets(base // self.region)
        table = base + _HEAD.size
        end = base + self.region
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
        _HEAD.pack_into(self.map, base, _HEAD.unpack_from(self.map, base)[0], 0)

    def clear(self, worker: int) -> int:
        """The hub, once ``worker`` has died: its connections are gone; returns how many it held.
        The ones on their way to it stay counted: they wait in its inbox for its successor."""
        base = worker * self.region
        held = int(_HEAD.unpack_from(self.map, base)[0])
        self.map[base : base + self.region] = bytes(self.region)
        self.set_taking(worker, False)
        self._forget_offsets(worker)
        return held
