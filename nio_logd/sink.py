"""The sink: one writer thread appends whole batches of lines to the log files.

design: I/O loops hand the writer whole ``Batch`` objects (all the lines one loop rendered in one
pass over its ready sockets) through a bounded queue. The writer takes every waiting batch at
once, writes all their message lines in one ``write()`` and all their reject lines in another,
fsyncs once for all of them when durability is "fsync" (group commit), and only then hands each
batch back to its loop (``Batch.done``), which answers the acks. The queue is bounded in bytes:
``submit`` tells the loop when it is over the high-water mark so the loop stops reading its
sockets, and the writer resumes the loops once the queue has drained to half.

A write that fails (ENOSPC, EIO) is undone with ``ftruncate`` to the size before it, so a line
is whole in the file or absent, and retried with backoff; nothing is acked meanwhile.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .copytruncate import WriteJournal
from .events import get_logger
from .metrics import LatencyHistogram
from .stats import WriterStats

log = get_logger()


class Completion(Protocol):
    """Who gets a batch back once it is written (an I/O loop)."""

    def batch_done(self, batch: Batch) -> None: ...

    def resume_reading(self) -> None: ...


class Batch:
    """Lines rendered by one loop in one pass, plus the acks to send once they are written."""

    __slots__ = ("accepted", "acks", "messages", "nbytes", "owner", "refused", "rejects")

    def __init__(
        self,
        owner: Completion | None,
        messages: bytes | bytearray,
        accepted: int,
        *,
        rejects: bytes | bytearray = b"",
        refused: int = 0,
        acks: dict[Any, list[bytes]] | None = None,
        answer_bytes: int = 0,
    ) -> None:
        self.owner = owner
        self.messages = messages  # whole lines, each ending in a newline
        self.rejects = rejects
        self.acks = acks  # connection -> answer lines, sent by the owner after the write
        self.accepted = accepted
        self.refused = refused
        # What the batch holds, answers included: the queue bound counts memory, not input.
        self.nbytes = len(messages) + len(rejects) + answer_bytes

    def __repr__(self) -> str:
        return f"<Batch {self.accepted} accepted, {self.refused} refused, {self.nbytes} bytes>"


class LogFile:
    """One append-only log file: whole-line writes, undo on error, reopen, size rotation."""

    __slots__ = ("fd", "journal", "mode", "path", "pending", "size", "truncate_to")

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        self.fd = -1
        self.size = 0
        self.truncate_to = -1  # a failed write whose undo failed too: cut here before the next write
        self.journal = WriteJournal()  # the last bytes written, to repair a copytruncate
        self.pending = b""  # lines a truncation took, written again before the next write

    def __repr__(self) -> str:
        return f"<LogFile {self.path} fd={self.fd} size={self.size}>"

    def open(self) -> None:
        """Open (creating it with ``mode``) for appending; cut a partial last line left by a crash."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            size = os.fstat(fd).st_size
            tail = b""
            if size:
                size, tail = _repair_tail(fd, size, self.path)
        except BaseException:
            os.close(fd)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.size = fd, size
        self.journal.reset(size - len(tail), tail)  # a new file: offsets start again

    def close(self) -> None:
        if self.fd >= 0:
            try:
                if self.pending or os.fstat(self.fd).st_size < self.size:
                    self.write(b"")  # lines a copytruncate took: write them now, not never
            except OSError as exc:
                log.error("records_not_written", path=str(self.path), bytes=len(self.pending), error=exc.strerror)
            os.close(self.fd)
            self.fd = -1

    def write(self, data: bytes) -> int:
        """Append ``data`` (whole lines) completely and return the offset where it landed (the size
        before it), or leave the file as it was and raise OSError."""
        fd = self.fd
        if self.truncate_to >= 0:
            os.ftruncate(fd, self.truncate_to)  # raises again if the disk still refuses: retried
            self.truncate_to = -1
        # The file may have been truncated under us (logrotate copytruncate): ask, do not assume.
        start = os.fstat(fd).st_size
        if start < self.size:
            self._truncated()
        if self.pending:
            pending = self.pending
            self._remember(self._append(pending, start), pending)
            self.pending = b""
            start = self.size
        landed = self._append(data, start)
        self._remember(landed, data)
        return landed

    def _append(self, data: bytes, start: int) -> int:
        """Append ``data`` completely and return where it landed, or undo to ``start`` and raise."""
        if not data:
            return start
        fd = self.fd
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            self.undo(start)
            raise
        # O_APPEND put the data at the end of the file as it was at that moment: ask where.
        self.size = os.lseek(fd, 0, os.SEEK_CUR)
        return self.size - len(data)

    def _remember(self, landed: int, data: bytes) -> None:
        if not data:
            return
        if landed < self.journal.end:
            # Truncated between our fstat and the write: the lines it took go out with the next write.
            self._truncated()
        self.journal.add(landed, data)

    def _truncated(self) -> None:
        """Our file is shorter than what we wrote: keep what the truncating copy missed (``pending``)."""
        lost, info = self.journal.lost_to_truncation(self.path)
        self.pending += lost
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

    def fsync(self) -> None:
        os.fsync(self.fd)

    def rotate(self, keep: int) -> None:
        """Rename path -> path.1 -> ... -> path.keep (the oldest dropped) and open a new file.

        Retried after a failure (it runs under ``Writer._retry``): once our file has been renamed
        away, only the open is left to do, so a retry never shifts the rotated files twice.
        """
        if self._is_at_path():
            for i in range(keep - 1, 0, -1):
                older = Path(f"{self.path}.{i}")
                if older.exists():
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self.open()

    def _is_at_path(self) -> bool:
        """Is the file we write to still the one named ``path``?"""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        ours = os.fstat(self.fd)
        return (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino)


def _repair_tail(fd: int, size: int, path: Path) -> tuple[int, bytes]:
    """If the file does not end with a newline (a crash cut a write), drop the partial line.

    Returns the size and the file's last bytes (up to 64 KiB, for the copytruncate journal).
    """
    with open(path, "rb") as f:
        ours = os.fstat(fd)
        named = os.fstat(f.fileno())
        if (named.st_dev, named.st_ino) != (ours.st_dev, ours.st_ino):
            return size, b""  # renamed or replaced since we opened it: not the file to look at
        f.seek(max(0, size - 65536))
        tail = f.read(min(size, 65536))
    if tail.endswith(b"\n"):
        return size, tail
    cut = tail.rfind(b"\n")
    if cut < 0 and size > len(tail):
        # The partial line is longer than we looked at (records reach max_record_bytes): its
        # start is the byte after the newline before it, or the start of the file.
        new_size = _line_start(path, size - len(tail))
        os.ftruncate(fd, new_size)
        log.warning("partial_line_removed", path=str(path), bytes=size - new_size)
        return new_size, b""
    new_size = size - len(tail) + cut + 1
    os.ftruncate(fd, new_size)
    log.warning("partial_line_removed", path=str(path), bytes=size - new_size)
    return new_size, tail[: cut + 1]


def _line_start(path: Path, before: int) -> int:
    """The offset just after the last newline before ``before`` (0 if there is none)."""
    with open(path, "rb") as f:
        while before > 0:
            step = min(before, 1 << 20)
            f.seek(before - step)
            nl = f.read(step).rfind(b"\n")
            if nl >= 0:
                return before - step + nl + 1
            before -= step
    return 0


class Writer:
    """The writer thread: drains the batch queue into the log files."""

    def __init__(
        self,
        messages_path: Path,
        rejects_path: Path,
        *,
        mode: int = 0o640,
        fsync: bool = False,
        fsync_max_wait: float = 0.0,
        queue_bytes: int = 32 << 20,
        rotate_bytes: int = 0,
        rotate_keep: int = 5,
    ) -> None:
        self.messages = LogFile(messages_path, mode)
        self.rejects = LogFile(rejects_path, mode)
        self.fsync = fsync
        self.fsync_max_wait = fsync_max_wait
        self.high_water = queue_bytes
        self.rotate_bytes = rotate_bytes
        self.rotate_keep = rotate_keep
        self._cond = threading.Condition()
        self._queue: list[Batch] = []
        self._depth = 0  # bytes queued or being written
        self._paused: set[Completion] = set()
        self._stopping = False
        self._force = False
        self._reopen = False
        self._thread: threading.Thread | None = None
        # Counters, read by the metrics; only the writer thread changes them.
        self.written_records = 0
        self.written_rejects = 0
        self.write_errors = 0
        self.rejects_lost = 0  # refused records whose reject line could not be written
        self.last_progress = time.monotonic()
        self.waiting_since = self.last_progress  # when the queue last went from empty to not empty
        self.queued_records = 0
        self.failing_since: float | None = None  # a write or fsync keeps failing and is retried
        self.last_error = ""
        self.write_hist = LatencyHistogram()
        self.fsync_hist = LatencyHistogram()
        self.on_progress: Callable[[], None] | None = None
        self.on_fatal: Callable[[str, BaseException], None] | None = None

    # -- called from other threads -------------------------------------------------------------
    def open(self) -> None:
        """Open both files (raises OSError naming the file), before the thread starts."""
        for f in (self.messages, self.rejects):
            f.path.parent.mkdir(parents=True, exist_ok=True)
            f.open()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nio-logd-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch) -> bool:
        """Queue a batch; True when the queue is over its bound and the caller must stop reading."""
        with self._cond:
            self._queue.append(batch)
            if not self._depth:
                self.waiting_since = time.monotonic()
            self._depth += batch.nbytes
            self.queued_records += batch.accepted + batch.refused
            over = self._depth >= self.high_water
            if over and batch.owner is not None:
                self._paused.add(batch.owner)
            self._cond.notify()
        return over

    @property
    def depth(self) -> int:
        return self._depth

    def stats(self) -> WriterStats:
        """The writer's counters and state now (any thread)."""
        failing_since = self.failing_since
        return WriterStats(
            written=self.written_records,
            rejects_written=self.written_rejects,
            rejects_lost=self.rejects_lost,
            write_errors=self.write_errors,
            queue_bytes=self._depth,
            queue_records=self.queued_records,
            queue_limit=self.high_water,
            write_failing_seconds=0.0 if failing_since is None else max(0.0, time.monotonic() - failing_since),
            writer_stalled_seconds=self.stalled_seconds(),
            last_write_error=self.last_error,
        )

    def apply(self, *, fsync: bool, fsync_max_wait: float, rotate_bytes: int, rotate_keep: int) -> None:
        """Reloaded settings: plain attributes the writer thread reads before each batch."""
        self.fsync = fsync
        self.fsync_max_wait = fsync_max_wait
        self.rotate_bytes = rotate_bytes
        self.rotate_keep = rotate_keep

    def stalled_seconds(self) -> float:
        """How long records have waited with no write finishing (0 when the queue is empty)."""
        if not self._depth:
            return 0.0
        grace = self.fsync_max_wait if self.fsync else 0.0  # a group commit waits on purpose
        return max(0.0, time.monotonic() - max(self.last_progress, self.waiting_since) - grace)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def request_reopen(self) -> None:
        with self._cond:
            self._reopen = True
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> bool:
        """Write everything queued, close the files; False if it did not finish in ``timeout``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._force = True  # stop retrying a failing disk
                self._cond.notify()
            self._thread.join(5.0)
        return not self._thread.is_alive()

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping and not self._reopen:
                        self._cond.wait()
                    if self._reopen:
                        self._reopen = False
                        self._do_reopen()
                    if not self._queue:
                        if self._stopping:
                            break
                        continue
                if self.fsync and self.fsync_max_wait > 0:
                    self._gather(self.fsync_max_wait)
                with self._cond:
                    batches, self._queue = self._queue, []
                try:
                    self._write(batches)
                except OSError:
                    self._abandon(batches)  # only when a forced stop gave up on a failing disk
                    break
                del batches  # not held while waiting for the next ones
        except Exception as exc:  # noqa: BLE001 - a dead writer stops the daemon, loudly
            if self.on_fatal is not None:
                self.on_fatal("writer", exc)
            raise
        finally:
            self.messages.close()
            self.rejects.close()

    def _gather(self, wait: float) -> None:
        """Group commit: wait up to ``wait`` for more batches before one fsync covers them all."""
        deadline = time.monotonic() + wait
        with self._cond:
            while not self._stopping and self._depth < self.high_water // 2:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)

    def _abandon(self, batches: list[Batch]) -> None:
        with self._cond:
            batches += self._queue
            self._queue = []
        lost = sum(b.accepted + b.refused for b in batches)
        log.error("records_not_written", records=lost, reason="forced stop while the disk was failing; none was acked")

    def _write(self, batches: list[Batch]) -> None:
        messages = b"".join([b.messages for b in batches])
        rejects = b"".join([b.rejects for b in batches])
        if messages:
            self._commit(self.messages, messages)
        if rejects:
            self._commit(self.rejects, rejects)
        self.written_records += sum(b.accepted for b in batches)
        self.written_rejects += sum(b.refused for b in batches)
        self.last_progress = time.monotonic()
        nbytes = 0
        records = 0
        for batch in batches:
            nbytes += batch.nbytes
            records += batch.accepted + batch.refused
            if batch.owner is not None:
                batch.owner.batch_done(batch)
        with self._cond:
            self._depth -= nbytes
            self.queued_records -= records
            resume = self._paused if self._depth <= self.high_water // 2 else set()
            if resume:
                self._paused = set()
        for owner in resume:
            owner.resume_reading()
        if self.on_progress is not None:
            self.on_progress()
        if self.rotate_bytes:
            for f in (self.messages, self.rejects):
                if f.size >= self.rotate_bytes:
                    self._retry(f, lambda f=f: f.rotate(self.rotate_keep))  # type: ignore[misc]
                    log.info("rotated", path=str(f.path), keep=self.rotate_keep)

    def _commit(self, f: LogFile, data: bytes) -> None:
        """Write ``data`` (and fsync it, with durability fsync) or, on failure, undo and retry both."""
        hist_w, hist_s, sync = self.write_hist, self.fsync_hist, self.fsync

        def write_and_sync() -> None:
            t0 = time.monotonic()
            start = f.write(data)
            t1 = time.monotonic()
            hist_w.observe(t1 - t0)
            if sync:
                try:
                    f.fsync()
                except OSError:
                    # After a failed fsync the kernel may have dropped the dirty pages, and a second
                    # fsync would then "succeed" without them: cut the lines and write them again.
                    f.undo(start)
                    raise
                hist_s.observe(time.monotonic() - t1)

        self._retry(f, write_and_sync)

    def _retry(self, f: LogFile, action: Callable[[], object]) -> None:
        """Run ``action`` until it succeeds, backing off on disk errors (ENOSPC, EIO, ...)."""
        delay = 0.05
        failed_since: float | None = None
        reminded = 0.0
        while True:
            try:
                action()
            except OSError as exc:
                self.write_errors += 1
                code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                self.last_error = f"{f.path}: {code} ({exc.strerror})"
                if self._force:
                    log.error("write_abandoned", path=str(f.path), error=exc.strerror, errno=code)
                    raise
                now = time.monotonic()
                if failed_since is None:
                    failed_since = reminded = now
                    self.failing_since = now
                    log.error(
                        "write_failed",
                        path=str(f.path),
                        error=exc.strerror,
                        errno=code,
                        records_waiting=self.queued_records,
                        action="retrying with backoff; nothing is acked and reading from clients pauses "
                        "until the disk recovers",
                    )
                elif now - reminded >= 30.0:
                    reminded = now
                    log.error("write_still_failing", path=str(f.path), error=exc.strerror, errno=code,
                              failing_seconds=round(now - failed_since, 1), records_waiting=self.queued_records)
                with self._cond:
                    self._cond.wait(delay)
                    if self._reopen:  # the operator may have fixed the file: reopen it
                        self._reopen = False
                        self._do_reopen()
                delay = min(delay * 2, 2.0)
                continue
            if failed_since is not None:
                self.failing_since = None
                log.warning(
                    "write_recovered", path=str(f.path), after_seconds=round(time.monotonic() - failed_since, 3),
                    errors=self.write_errors,
                )
            return

    def _do_reopen(self) -> None:
        for f in (self.messages, self.rejects):
            try:
                f.path.parent.mkdir(parents=True, exist_ok=True)
                f.open()
            except OSError as exc:
                log.error("reopen_failed", path=str(f.path), error=exc.strerror)
            else:
                log.info("reopened", path=str(f.path))
