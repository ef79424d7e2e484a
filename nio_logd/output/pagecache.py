"""Which old part of a growing log file to let go of from the page cache.

design: a log file is written once and read soon after (``tail``, a forwarder), then rarely.
Left alone, the kernel keeps every page of it cached until memory runs short, so a daemon writing
100 MB/s fills gigabytes of cache with old lines, and each new page of the file is a free page the
kernel hands out afresh. ``CacheRelease`` keeps the last ``keep`` bytes cached and gives the
writer, each time the file has grown by ``step`` bytes past them, one range further back to pass
to ``posix_fadvise(DONTNEED)``. On Linux that call drops the clean pages of the range and starts
writing back the dirty ones (it does not wait), so each byte is advised in ``PASSES`` successive
calls: the first starts its write-back (or drops it at once if it is on disk already, as with
``durability = "fsync"``), a later one drops it once the write-back has finished. Nothing less
than ``keep`` bytes from the end is ever advised. What stays cached is ``keep``, plus what the
last ``PASSES`` calls could not drop yet (a write-back slower than ``PASSES - 1`` steps of
writing), plus pages read back by a reader. Sans-I/O: the caller makes the call and says the
file's size.
"""

from __future__ import annotations

import collections

MIN_STEP = 1 << 20
MAX_STEP = 8 << 20
PASSES = 4  # calls that advise each byte


class CacheRelease:
    """The ranges of one file to advise away, as it grows; ``keep`` > 0."""

    __slots__ = ("_ends", "_size", "keep", "step")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.step = min(MAX_STEP, max(MIN_STEP, keep // 8))
        # Where the last calls' ranges ended, oldest first, after the start of the oldest range
        # still to be advised again: the next range runs from _ends[0] to the new end.
        self._ends: collections.deque[int] = collections.deque([0], maxlen=PASSES)
        self._size = 0  # the size last told: a smaller one is another file or a truncation

    def __repr__(self) -> str:
        return f"<CacheRelease keep={self.keep} advised {self._ends[0]}..{self._ends[-1]}>"

    def reset(self) -> None:
        """Another file, or this one cut shorter (a copytruncate): offsets start again."""
        self._ends = collections.deque([0], maxlen=PASSES)
        self._size = 0

    def advise(self, size: int) -> tuple[int, int] | None:
        """The file is ``size`` bytes now: the ``(offset, length)`` to advise away, or None."""
        if size < self._size:
            self.reset()
        self._size = size
        end = size - self.keep
        if end - self._ends[-1] < self.step:
            return None
        offset = self._ends[0]
        self._ends.append(end)  # full: the oldest end goes, and the next range starts there
        return offset, end - offset
