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

from .events import get_logger

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
        messages: list[bytes],
        rejects: list[bytes],
        acks: dict[Any, list[bytes]] | None = None,
    ) -> None:
        self.owner = owner
        self.messages = messages
        self.rejects = rejects
        self.acks = acks  # connection -> answer lines, sent by the owner after the write
        self.accepted = len(messages)
        self.refused = len(rejects)
        self.nbytes = sum(map(len, messages)) + sum(map(len, rejects)) + self.accepted + self.refused

    def __repr__(self) -> str:
        return f"<Batch {self.accepted} accepted, {self.refused} refused, {self.nbytes} bytes>"


class LogFile:
    """One append-only log file: whole-line writes, undo on error, reopen, size rotation."""

    __slots__ = ("fd", "mode", "path", "size")

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        self.fd = -1
        self.size = 0

    def __repr__(self) -> str:
        return f"<LogFile {self.path} fd={self.fd} size={self.size}>"

    def open(self) -> None:
        """Open (creating it with ``mode``) for appending; cut a partial last line left by a crash."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            size = os.fstat(fd).st_size
            if size:
                size = _repair_tail(fd, size, self.path)
        except BaseException:
            os.close(fd)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.size = fd, size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write(self, data: bytes) -> None:
        """Append ``data`` (whole lines) completely, or leave the file as it was and raise OSError."""
        fd = self.fd
        # The file may have been truncated under us (logrotate copytruncate): ask, do not assume.
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
        self.size = start + len(data)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def rotate(self, keep: int) -> None:
        """Rename path -> path.1 -> ... -> path.keep (the oldest dropped) and open a new file."""
        for i in range(keep - 1, 0, -1):
            older = Path(f"{self.path}.{i}")
            if older.exists():
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self.open()


def _repair_tail(fd: int, size: int, path: Path) -> int:
    """If the file does not end with a newline (a crash cut a write), drop the partial line."""
    with open(path, "rb") as f:
        f.seek(max(0, size - 65536))
        tail = f.read()
    if tail.endswith(b"\n"):
        return size
    cut = tail.rfind(b"\n")
    if cut < 0 and size > len(tail):
        return size  # a line longer than we looked at: leave the file alone
    new_size = size - len(tail) + cut + 1
    os.ftruncate(fd, new_size)
    log.warning("partial_line_removed", path=str(path), bytes=size - new_size)
    return new_size


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
        self.last_progress = time.monotonic()
        self.on_progress: Callable[[], None] | None = None

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
            self._depth += batch.nbytes
            over = self._depth >= self.high_water
            if over and batch.owner is not None:
                self._paused.add(batch.owner)
            self._cond.notify()
        return over

    @property
    def depth(self) -> int:
        return self._depth

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
                self._write(batches)
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

    def _write(self, batches: list[Batch]) -> None:
        messages = [line for b in batches for line in b.messages]
        rejects = [line for b in batches for line in b.rejects]
        if messages:
            messages.append(b"")
            self._write_retrying(self.messages, b"\n".join(messages))
        if rejects:
            rejects.append(b"")
            self._write_retrying(self.rejects, b"\n".join(rejects))
        if self.fsync:
            self._retry(self.messages, self.messages.fsync)
            if rejects:
                self._retry(self.rejects, self.rejects.fsync)
        self.written_records += len(messages) - 1 if messages else 0
        self.written_rejects += len(rejects) - 1 if rejects else 0
        self.last_progress = time.monotonic()
        nbytes = 0
        for batch in batches:
            nbytes += batch.nbytes
            if batch.owner is not None:
                batch.owner.batch_done(batch)
        with self._cond:
            self._depth -= nbytes
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

    def _write_retrying(self, f: LogFile, data: bytes) -> None:
        self._retry(f, lambda: f.write(data))

    def _retry(self, f: LogFile, action: Callable[[], None]) -> None:
        """Run ``action`` until it succeeds, backing off on disk errors (ENOSPC, EIO, ...)."""
        delay = 0.05
        failed_since: float | None = None
        while True:
            try:
                action()
            except OSError as exc:
                self.write_errors += 1
                if self._force:
                    log.error("write_abandoned", path=str(f.path), error=exc.strerror)
                    raise
                if failed_since is None:
                    failed_since = time.monotonic()
                    log.error(
                        "write_failed",
                        path=str(f.path),
                        error=exc.strerror,
                        errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                        action="retrying; reading from clients pauses until the disk recovers",
                    )
                with self._cond:
                    self._cond.wait(delay)
                    if self._reopen:  # the operator may have fixed the file: reopen it
                        self._reopen = False
                        self._do_reopen()
                delay = min(delay * 2, 2.0)
                continue
            if failed_since is not None:
                log.warning(
                    "write_recovered", path=str(f.path), after_seconds=round(time.monotonic() - failed_since, 3)
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
