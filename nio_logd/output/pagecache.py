"""Which old part of a growing log file to let go of from the page cache.

design: a log file is written once and read soon after (``tail``, a forwarder), then rarely.
Left alone, the kernel keeps every page of it cached until memory runs short, so a daemon writing
100 MB/s fills gigabytes of cache with old lines, and each new page of the file is a free page the
kernel hands out afresh. ``CacheRelease`` keeps the last ``keep`` bytes cached and gives the
writer, every ``step`` bytes, one range further back to pass to ``posix_fadvise(DONTNEED)``. On
Linux that call drops the clean pages of the range and starts writing back the dirty ones (it
does not wait), so each range is advised twice, one step apart: the first time it is written
back (and dropped at once if it already was, as with ``durability = "fsync"``), the second time
it is dropped. Nothing less than ``keep`` bytes from the end is ever advised. Sans-I/O: the
caller makes the call and says the file's size.
"""

from __future__ import annotations

MIN_STEP = 1 << 20
MAX_STEP = 8 << 20


class CacheRelease:
    """The ranges of one file to advise away, as it grows; ``keep`` > 0."""

    __slots__ = ("_advised", "_once", "keep", "step")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.step = min(MAX_STEP, max(MIN_STEP, keep // 8))
        self._once = 0  # advised once (written back) from here ...
        self._advised = 0  # ... up to here; nothing after it was advised

    def __repr__(self) -> str:
        return f"<CacheRelease keep={self.keep} advised once {self._once}..{self._advised}>"

    def reset(self) -> None:
        """Another file, or this one cut shorter (a copytruncate): offsets start again."""
        self._once = self._advised = 0

    def advise(self, size: int) -> tuple[int, int] | None:
        """The file is ``size`` bytes now: the ``(offset, length)`` to advise away, or None."""
        if size < self._advised:
            self.reset()
        limit = size - self.keep
        if limit - self._advised < self.step:
            return None
        offset = self._once
        self._once, self._advised = self._advised, limit
        return offset, limit - offset
