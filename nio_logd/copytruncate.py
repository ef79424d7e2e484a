"""Put back the records that a ``logrotate copytruncate`` copy missed.

design: logrotate copies the log file, fsyncs the copy, and only then truncates the file, so
whatever the daemon appends between the end of the copy and the truncation would be in neither
file. The writer keeps the last bytes it wrote to each file (``WriteJournal``, bounded). When it
finds its file truncated it looks next to it for the copy: a regular, uncompressed file whose name
starts like the log's and whose last bytes are the bytes the journal holds at the same offsets.
What the journal holds past the copy's end was lost, and is written again. If the copy ends
inside a line (logrotate read while a write was half done), the copy is cut back to its last whole
line and that line is written again whole: a record is never split between two files.
"""

from __future__ import annotations

import collections
import os
import stat
from pathlib import Path
from typing import Any

JOURNAL_BYTES = 8 << 20  # how much recent output is kept to repair a copytruncate
PROBE_BYTES = 4096  # how much of a candidate copy's end must match the journal
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzo", ".lzma", ".Z", ".zip")


class WriteJournal:
    """The last bytes written to one file, with their offsets (one contiguous range)."""

    __slots__ = ("chunks", "limit", "nbytes")

    def __init__(self, limit: int = JOURNAL_BYTES) -> None:
        self.limit = limit
        self.chunks: collections.deque[tuple[int, bytes]] = collections.deque()
        self.nbytes = 0

    def __repr__(self) -> str:
        return f"<WriteJournal {self.start}..{self.end}>"

    @property
    def start(self) -> int:
        return self.chunks[0][0] if self.chunks else 0

    @property
    def end(self) -> int:
        if not self.chunks:
            return 0
        offset, data = self.chunks[-1]
        return offset + len(data)

    def reset(self, offset: int = 0, data: bytes = b"") -> None:
        """Forget everything; optionally start again with ``data`` found at ``offset``."""
        self.chunks.clear()
        self.nbytes = 0
        if data:
            self.add(offset, data)

    def add(self, offset: int, data: bytes) -> None:
        """``data`` was written at ``offset``; a gap or overlap (another writer, a cut) starts afresh."""
        chunks = self.chunks
        if chunks and self.end != offset:
            self.reset()
        chunks.append((offset, data))
        self.nbytes += len(data)
        while len(chunks) > 1 and self.nbytes - len(chunks[0][1]) >= self.limit:
            self.nbytes -= len(chunks.popleft()[1])

    def slice(self, begin: int, end: int) -> bytes:
        """The journal's bytes for file offsets [begin, end) (which it must hold)."""
        parts = []
        for offset, data in self.chunks:
            stop = offset + len(data)
            if stop <= begin or offset >= end:
                continue
            parts.append(data[max(begin - offset, 0) : min(end, stop) - offset])
        return b"".join(parts)

    def lost_to_truncation(self, path: Path) -> tuple[bytes, dict[str, Any]]:
        """``path`` was truncated under us: the bytes to write again, and what was found (for the log).

        The journal is reset: its offsets described the file as it was before the truncation.
        """
        begin, end = self.start, self.end
        info: dict[str, Any] = {"journal_bytes": end - begin}
        try:
            if end <= begin:
                info["copy"] = None
                return b"", info
            found = self._find_copy(path, begin, end)
            if found is None:
                info["copy"] = None
                return b"", info
            copy, size = found
            cut = size
            if self.slice(size - 1, size) != b"\n":
                # The copy ends inside a line: cut it back to its last newline, write the line again.
                head = self.slice(begin, size)
                newline = head.rfind(b"\n")
                if newline >= 0:
                    cut = begin + newline + 1
                    try:
                        os.truncate(copy, cut)
                    except OSError as exc:
                        info["copy_cut_failed"] = exc.strerror
                info["copy_partial_line_bytes"] = size - cut
            info.update(copy=str(copy), copy_bytes=size)
            return self.slice(cut, end), info
        finally:
            self.reset()

    def _find_copy(self, path: Path, begin: int, end: int) -> tuple[Path, int] | None:
        """The newest file next to ``path`` whose end matches the journal at the same offsets."""
        prefix = path.name.partition(".")[0] or path.name
        candidates = []
        try:
            entries = list(os.scandir(path.parent))
        except OSError:
            return None
        for entry in entries:
            name = entry.name
            if name == path.name or not name.startswith(prefix) or name.endswith(COMPRESSED):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            # A copy of a prefix of what the journal holds: never empty, never longer than the file.
            if stat.S_ISREG(st.st_mode) and begin < st.st_size <= end:
                candidates.append((st.st_mtime_ns, name, st.st_size))
        for _mtime, name, size in sorted(candidates, reverse=True):
            probe = max(begin, size - PROBE_BYTES)
            try:
                with open(path.parent / name, "rb") as f:
                    f.seek(probe)
                    tail = f.read(size - probe)
            except OSError:
                continue
            if tail == self.slice(probe, size):
                return path.parent / name, size
        return None
