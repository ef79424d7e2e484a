"""Put back the records that a ``logrotate copytruncate`` copy missed.

design: logrotate copies the log file, fsyncs the copy, and only then truncates the file, so
whatever the daemon appends between the end of the copy and the truncation would be in neither
file. The writer keeps the last bytes it wrote to each file (``WriteJournal``, bounded). When it
finds its file truncated it looks next to it for the copy: a regular, uncompressed file whose name
starts like the log's and whose last bytes are the bytes the journal holds at the same offsets.
What the journal holds past the copy's end was lost, and is written again. If the copy ends
inside a line (logrotate read while a write was half done), the copy is cut back to its last whole
line and that line is written again whole: a record is never split between two files. The folder
may be writable by the daemon user: a copy is read and cut only through an fd opened without
following links, and only if it is still the regular, singly linked file that was matched.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

from ..config import COMPRESSED, COPYTRUNCATE_JOURNAL_BYTES, rotated_name

JOURNAL_BYTES = COPYTRUNCATE_JOURNAL_BYTES  # how much recent output is kept to repair a copytruncate
PROBE_BYTES = 4096  # how much of a candidate copy's end must match the journal
_NUMBERED = re.compile(r"\.(\d+)$")  # logrotate's numbered copies: messages.log.1, .2, ...


class WriteJournal:
    """The last bytes written to one file, with their offsets (one contiguous range).

    A ring of at most ``limit`` bytes: what is written is copied in, so the journal holds exactly
    what it says (the buffers written, a worker's batch among them, are freed once written). The
    ring grows as bytes come, up to ``limit``: a quiet log costs what it wrote. Grown by appends,
    it keeps the spare room the last resize gave it (an eighth at most): its memory is under
    1.125 x ``limit``, once. The byte at file offset ``o`` is at ``(o - origin) % limit`` once full.
    """

    __slots__ = ("_end", "aligned", "buf", "empty_since", "first_write", "limit", "nbytes", "origin")

    def __init__(self, limit: int = JOURNAL_BYTES) -> None:
        self.limit = limit
        self.buf = bytearray()  # grows to ``limit``, then is written round (a ring)
        self.origin = 0  # the file offset of buf[0] (of the ring's turn that begins there)
        self._end = 0
        self.nbytes = 0  # bytes held, from ``start`` to ``end``: at most ``limit``
        # Whether ``start`` is the start of a line: writes are whole lines, so it is unless the
        # bytes held begin inside a line (the oldest were pushed out, or a giant write's start).
        self.aligned = True
        # The file's mtime (ns) when it was seen empty before the write at offset 0, and right
        # after that write (set by the file; None if not seen so): an empty copy made between the
        # two was taken before that write, so it holds none of the journal (see _find_copy).
        self.empty_since: int | None = None
        self.first_write: int | None = None

    def __repr__(self) -> str:
        return f"<WriteJournal {self.start}..{self.end}>"

    @property
    def start(self) -> int:
        return self._end - self.nbytes

    @property
    def end(self) -> int:
        return self._end

    def reset(self, offset: int = 0, data: bytes | bytearray | memoryview = b"") -> None:
        """Forget everything; optionally start again with ``data`` found at ``offset``."""
        self.buf = bytearray()
        self.origin = self._end = self.nbytes = 0
        self.aligned = True
        self.empty_since = self.first_write = None
        if data:
            self.add(offset, data)

    def add(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """``data`` was written at ``offset``; a gap or overlap (another writer, a cut) starts afresh.

        Holds at most ``limit`` bytes: of a write bigger than that only its end is kept.
        """
        n = len(data)
        if self.nbytes and self._end != offset:
            self.reset()
        if not n:
            return
        limit = self.limit
        if not self.nbytes:  # (reset: buf is empty)
            self.origin = self._end = offset
        if n >= limit:
            cut = n - limit
            if cut:
                self.aligned = data[cut - 1] == 0x0A
            elif self.nbytes:
                self.aligned = self._byte(self._end - 1) == 0x0A
            self.buf = bytearray()  # the old ring freed first: never two at once
            self.buf = bytearray(memoryview(data)[cut:])
            self.origin = offset + cut
            self._end, self.nbytes = offset + n, limit
            return
        if self.nbytes + n > limit:  # the oldest bytes go: is the first one left a line's start?
            self.aligned = self._byte(self._end + n - limit - 1) == 0x0A
        buf, view = self.buf, memoryview(data)
        if len(buf) < limit:  # still growing: appended (the bytes held are buf itself, from ``origin``)
            take = min(n, limit - len(buf))
            buf += view[:take]
            view = view[take:]
        if view:  # full: written round, from the ring's position of the next offset on
            at = (self._end + n - len(view) - self.origin) % limit
            first = min(len(view), limit - at)
            buf[at : at + first] = view[:first]
            buf[: len(view) - first] = view[first:]
        self._end += n
        self.nbytes = min(self.nbytes + n, limit)

    def _byte(self, offset: int) -> int:
        return self.buf[(offset - self.origin) % len(self.buf)]

    def cut(self, end: int) -> None:
        """The file was cut back to ``end`` (a write undone): forget what was held past it."""
        if end <= self.start:
            self.reset()
            return
        if end >= self._end:
            return
        self.nbytes -= self._end - end
        self._end = end
        if len(self.buf) < self.limit:
            del self.buf[end - self.origin :]  # growing: appends go on at buf's end

    def slice(self, begin: int, end: int) -> bytes:
        """The journal's bytes for file offsets [begin, end) (clamped to what it holds)."""
        begin, end = max(begin, self.start), min(end, self._end)
        if end <= begin:
            return b""
        size = len(self.buf)
        at = (begin - self.origin) % size
        n = end - begin
        if at + n <= size:
            return bytes(self.buf[at : at + n])
        return bytes(self.buf[at:]) + bytes(self.buf[: n - (size - at)])

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
            copy, size, ident = found
            cut = size
            if size and self.slice(size - 1, size) != b"\n":
                # The copy ends inside a line: cut it back to its last newline, write the line again.
                head = self.slice(begin, size)
                newline = head.rfind(b"\n")
                if newline >= 0 or self.aligned:
                    # No newline in what the journal holds of the copy: the copy ends inside the
                    # journal's first line, which starts at ``begin``; cut there.
                    cut = begin + newline + 1 if newline >= 0 else begin
                    try:
                        _cut_copy(copy, cut, ident)
                    except OSError as exc:
                        info["copy_cut_failed"] = exc.strerror
                info["copy_partial_line_bytes"] = size - cut
            info.update(copy=str(copy), copy_bytes=size)
            return self.slice(cut, end), info
        finally:
            self.reset()

    def _find_copy(self, path: Path, begin: int, end: int) -> tuple[Path, int, tuple[int, int]] | None:
        """The newest file next to ``path`` whose end matches the journal at the same offsets.

        Or an empty one named as logrotate names a copy, if the journal holds the file from its
        start and the copy was made after the file was seen empty (``empty_since``) and no later
        than the first write after that (``first_write``): logrotate (``ifempty``) copied it
        while it was empty, the first lines came before its truncation, and they are in neither
        file. An empty copy made before (an old rotation of an empty log: made in the same tick
        counts as before) or after (a rotation of the log once idle: what it lacks was copied
        earlier) is no copy of what the journal holds."""
        window = (
            (self.empty_since, self.first_write)
            if begin == 0 and self.empty_since is not None and self.first_write is not None
            else None
        )
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
            if stat.S_ISREG(st.st_mode) and (
                begin < st.st_size <= end
                or (
                    st.st_size == 0
                    and window is not None
                    and window[0] < st.st_mtime_ns <= window[1]
                    and rotated_name(name, path.name)
                )
            ):
                candidates.append((st.st_mtime_ns, _newness(name), name, st.st_size))
        empty: tuple[Path, int, tuple[int, int]] | None = None
        for _mtime, _newer, name, size in sorted(candidates, reverse=True):
            if not size:
                # Weaker evidence than bytes that match: only if no copy matches by its bytes.
                if empty is None:
                    try:
                        fd = _open_copy(path.parent / name, os.O_RDONLY)
                    except OSError:
                        continue
                    st = os.fstat(fd)
                    os.close(fd)
                    if st.st_size == 0:
                        empty = (path.parent / name, 0, (st.st_dev, st.st_ino))
                continue
            probe = max(begin, size - PROBE_BYTES)
            try:
                fd = _open_copy(path.parent / name, os.O_RDONLY)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                tail = os.pread(fd, size - probe, probe)
            except OSError:
                continue
            finally:
                os.close(fd)
            if tail == self.slice(probe, size):
                return path.parent / name, size, (st.st_dev, st.st_ino)
        return empty


def _newness(name: str) -> tuple[int, str]:
    """Orders copies made in the same tick of the clock (equal mtimes), newest last: ``.1`` is newer
    than ``.2`` (logrotate shifts the older ones up), and a later date sorts after an earlier one."""
    match = _NUMBERED.search(name)
    return (-int(match.group(1)), "") if match else (0, name)


def _open_copy(path: Path, flags: int) -> int:
    """Open a candidate copy without following a link or blocking; only a singly linked regular file."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(errno.EINVAL, "not a regular file with one link", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _cut_copy(path: Path, size: int, ident: tuple[int, int]) -> None:
    """Truncate the copy we matched to ``size``, through an fd: never a file swapped in at its name."""
    fd = _open_copy(path, os.O_WRONLY)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ident:
            raise OSError(errno.ESTALE, "replaced since it was read", str(path))
        os.ftruncate(fd, size)
        # Its times as logrotate left them: cut to 0 and made "now", it would pass for an empty
        # copy taken after the log was emptied (_find_copy's window).
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)
