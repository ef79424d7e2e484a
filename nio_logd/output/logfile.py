"""One append-only log file: whole-line writes, undo on error, repair after a crash, rotation.

design: a line is whole in the file or absent. ``write`` appends complete lines and, if the
disk refuses them, cuts the file back (``ftruncate``) to where it was; a partial last line left
by a crash is cut when the file is opened. The file is opened through ``files.open_regular`` (no
link followed, never blocking, one link only). The last bytes written are kept
(``WriteJournal``) to put back what a ``logrotate copytruncate`` copy missed. All but the last
``cache_bytes`` of the file are let go of from the page cache as it grows (``CacheRelease``).
Only the writer thread calls it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..events import get_logger
from .copytruncate import WriteJournal
from .files import open_regular
from .pagecache import CacheRelease

log = get_logger()

Data = bytes | bytearray | memoryview  # what is written: rendered lines, or a view of a worker's batch
IOV_MAX = 1024  # buffers one writev() takes (Linux's UIO_MAXIOV)


class LogFile:
    """One append-only log file: whole-line writes, undo on error, reopen, size rotation."""

    __slots__ = (
        "cache",
        "cache_bytes",
        "created",
        "fd",
        "gone",
        "journal",
        "mode",
        "path",
        "pending",
        "size",
        "truncate_to",
    )

    def __init__(self, path: Path, mode: int, *, cache_bytes: int = 0) -> None:
        """``cache_bytes``: how much of the end of the file stays in the page cache (0: all of it,
        as the kernel pleases)."""
        self.path = path
        self.mode = mode
        self.fd = -1
        self.created = False  # the last open created the file: only then may it be handed over
        self.gone = False  # our file was deleted and that was logged (once, not at every retry)
        self.size = 0
        self.truncate_to = -1  # a failed write whose undo failed too: cut here before the next write
        self.journal = WriteJournal()  # the last bytes written, to repair a copytruncate
        self.pending = b""  # lines a truncation took, written again before the next write
        # posix_fadvise is Linux's (and other POSIX systems'); without it the kernel decides.
        self.cache_bytes = cache_bytes if hasattr(os, "posix_fadvise") else 0
        self.cache: CacheRelease | None = None

    def __repr__(self) -> str:
        return f"<LogFile {self.path} fd={self.fd} size={self.size}>"

    def open(self) -> None:
        """Open (creating it with ``mode``) for appending; cut a partial last line left by a crash.

        Refuses (OSError naming the path and what is there) a symbolic link, a FIFO or anything but
        a regular file with one link; the file open before, if any, stays open then.
        """
        readable = True
        try:
            # O_RDWR: the partial-line repair reads through this fd, never through the path again.
            fd, created = open_regular(self.path, os.O_RDWR | os.O_APPEND, self.mode)
        except PermissionError:
            # A file we may write but not read (file_mode "0200", another owner): no repair then.
            fd, created = open_regular(self.path, os.O_WRONLY | os.O_APPEND, self.mode)
            readable = False
        try:
            st = os.fstat(fd)
            size = st.st_size
            tail = b""
            if size and readable:
                size, tail = _repair_tail(fd, size, self.path)
                if len(tail) < size:
                    # The journal must begin at a line start (a copy is only ever cut at one).
                    first = tail.find(b"\n")
                    tail = tail[first + 1 :] if first >= 0 else b""
        except BaseException:
            os.close(fd)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.size, self.created, self.gone = fd, size, created, False
        self.journal.reset(size - len(tail), tail)  # a new file: offsets start again
        if size == 0:
            self.journal.empty_since = st.st_mtime_ns
        # A new file: advised from its start (after a failed advice too: that was another file).
        self.cache = CacheRelease(self.cache_bytes) if self.cache_bytes > 0 else None

    def close(self) -> None:
        if self.fd >= 0:
            try:
                if self.pending or os.fstat(self.fd).st_size < self.size:
                    self.write(b"")  # lines a copytruncate took: write them now, not never
            except OSError as exc:
                log.error("records_not_written", path=str(self.path), bytes=len(self.pending), error=exc.strerror)
            os.close(self.fd)
            self.fd = -1

    def write(self, data: Data | list[Data]) -> int:
        """Append ``data`` (whole lines; or the parts of it, written in order with ``writev``, not
        joined first) completely and return the offset where it landed (the size before it), or
        leave the file as it was and raise OSError."""
        parts = data if isinstance(data, list) else [data]
        fd = self.fd
        if self.truncate_to >= 0:
            os.ftruncate(fd, self.truncate_to)  # raises again if the disk still refuses: retried
            self.truncate_to = -1
        # The file may have been truncated under us (logrotate copytruncate): ask, do not assume.
        st = os.fstat(fd)
        if st.st_nlink == 0:
            self._recreate()  # raises if it cannot: retried, nothing acked meanwhile
            st = os.fstat(self.fd)
        start = st.st_size
        if start < self.size:
            self._truncated()
        if start == 0:
            # Empty since its last change: a copy logrotate makes from now until this write holds
            # nothing of what is written next (the journal's _find_copy).
            self.journal.empty_since = st.st_mtime_ns
            self.journal.first_write = None
        if self.pending:
            pending = self.pending
            self._remember(self._append([pending], start), [pending])
            self.pending = b""
            start = self.size
        landed = self._append(parts, start)
        self._remember(landed, parts)
        if landed < self.size and os.fstat(self.fd).st_nlink == 0:
            # Deleted while we wrote: these lines would vanish with the file and still be acked.
            self._recreate()
            landed = self._append(parts, self.size)
            self._remember(landed, parts)
        journal = self.journal
        if journal.empty_since is not None and journal.first_write is None and self.size:
            journal.first_write = os.fstat(self.fd).st_mtime_ns  # the end of the empty copy's window
        if self.cache is not None:
            self._release_cache(self.cache)
        return landed

    def _release_cache(self, cache: CacheRelease) -> None:
        advice = cache.advise(self.size)
        if advice is None:
            return
        try:
            os.posix_fadvise(self.fd, advice[0], advice[1], os.POSIX_FADV_DONTNEED)
        except OSError as exc:  # only a hint: the records are written; stop giving it for this file
            self.cache = None  # until the next open()
            log.warning(
                "page_cache_release_failed",
                path=str(self.path),
                error=exc.strerror,
                action="the file's pages stay cached as the kernel decides",
            )

    def _recreate(self) -> None:
        """Our file was unlinked (the file or its folder deleted): create both again and go on.

        Only for a link count of 0: a file merely renamed (logrotate's create mode, which then
        creates the new file itself and sends SIGHUP) is written on until the reopen.
        """
        if not self.gone:
            self.gone = True
            log.warning(
                "log_file_deleted",
                path=str(self.path),
                action="creating the file (and its folder) again; records are written there",
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.open()

    def _append(self, parts: list[Data], start: int) -> int:
        """Append ``parts`` completely and return where they landed, or undo to ``start`` and raise."""
        views = [memoryview(p) for p in parts if len(p)]
        if not views:
            return start
        total = sum(len(v) for v in views)
        fd = self.fd
        try:
            i = 0
            while i < len(views):
                n = os.writev(fd, views[i : i + IOV_MAX])
                while n:  # a short write: step over what went, go on from there
                    first = views[i]
                    if n >= len(first):
                        n -= len(first)
                        i += 1
                    else:
                        views[i] = first[n:]
                        n = 0
        except OSError:
            self.undo(start)
            raise
        # O_APPEND put the data at the end of the file as it was at that moment: ask where.
        self.size = os.lseek(fd, 0, os.SEEK_CUR)
        return self.size - total

    def _remember(self, landed: int, parts: list[Data]) -> None:
        for data in parts:
            if not data:
                continue
            if landed < self.journal.end:
                # Truncated between our fstat and the write: the lines it took go out with the next write.
                self._truncated()
            self.journal.add(landed, data)
            landed += len(data)

    def _truncated(self) -> None:
        """Our file is shorter than what we wrote: keep what the truncating copy missed (``pending``)."""
        lost, info = self.journal.lost_to_truncation(self.path)
        self.pending += lost
        if self.cache is not None:
            self.cache.reset()  # its offsets were the file's before the truncation
        if info["copy"] is None:
            info["action"] = "no copy of the file found next to it: nothing written again"
            log.warning("truncated", path=str(self.path), put_back_bytes=0, **info)
        else:
            log.info("truncated", path=str(self.path), put_back_bytes=len(lost), **info)

    def undo(self, start: int) -> None:
        """Cut a failed write (or an unsynced one) off: the file ends with whole lines again."""
        try:
            os.ftruncate(self.fd, start)
        except OSError:
            self.truncate_to = start  # done before the next write, which is retried until it works
        self.size = start
        # Written again at ``start``, the lines cut must not look like a truncation under us.
        self.journal.cut(start)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def rotate(self, keep: int) -> None:
        """Rename path -> path.1 -> ... -> path.keep (the oldest dropped) and open a new file.

        Retried after a failure (it runs under ``Writer._retry``): once our file has been renamed
        away, only the open is left to do; and only the unbroken run .1, .2, ... is shifted, so
        a retry after a rename failed partway (which left a gap) never shifts a file twice.
        """
        if self._is_at_path():
            run = 0
            while run < keep - 1 and os.path.lexists(f"{self.path}.{run + 1}"):
                run += 1
            for i in range(run, 0, -1):
                older = Path(f"{self.path}.{i}")
                # lexists: a planted link is renamed as a link (inside the folder), never followed.
                if os.path.lexists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self.open()

    def _is_at_path(self) -> bool:
        """Is the file we write to still the one named ``path``?"""
        try:
            named = os.lstat(self.path)
        except FileNotFoundError:
            return False
        ours = os.fstat(self.fd)
        return (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino)


def _repair_tail(fd: int, size: int, path: Path) -> tuple[int, bytes]:
    """If the file does not end with a newline (a crash cut a write), drop the partial line.

    Returns the size and the file's last bytes (up to 64 KiB, for the copytruncate journal). Reads
    through ``fd`` (opened O_RDWR): opening the path again could follow a link planted meanwhile.
    """
    tail = _pread_all(fd, min(size, 65536), max(0, size - 65536))
    if len(tail) < min(size, 65536):
        return os.fstat(fd).st_size, b""  # shrunk under us (a truncation): the writer sees that
    if tail.endswith(b"\n"):
        return size, tail
    cut = tail.rfind(b"\n")
    if cut < 0 and size > len(tail):
        # The partial line is longer than we looked at (records reach max_record_bytes): its
        # start is the byte after the newline before it, or the start of the file.
        new_size = _line_start(fd, size - len(tail))
        os.ftruncate(fd, new_size)
        log.warning("partial_line_removed", path=str(path), bytes=size - new_size)
        # The whole lines before it seed the journal, as in the short case: a copytruncate right
        # after this start must still find its copy (it matches on the journal's bytes).
        start = max(0, new_size - 65536)
        return new_size, _pread_all(fd, new_size - start, start)
    new_size = size - len(tail) + cut + 1
    os.ftruncate(fd, new_size)
    log.warning("partial_line_removed", path=str(path), bytes=size - new_size)
    return new_size, tail[: cut + 1]


def _line_start(fd: int, before: int) -> int:
    """The offset just after the last newline before ``before`` (0 if there is none)."""
    while before > 0:
        step = min(before, 1 << 20)
        nl = _pread_all(fd, step, before - step).rfind(b"\n")
        if nl >= 0:
            return before - step + nl + 1
        before -= step
    return 0


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer only at the end of the file)."""
    parts = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)
