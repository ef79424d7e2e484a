"""The writer: one thread appends whole batches of lines to the log files.

design: I/O loops hand the writer whole ``Batch`` objects (all the lines one loop rendered in one
pass over its ready sockets) through a bounded queue. The writer takes every waiting batch at
once, writes all their message lines in one ``write()`` and all their reject lines in another,
fsyncs once for all of them when durability is "fsync" (group commit), and only then hands each
batch back to its loop (``Batch.done``), which answers the acks. The queue is bounded in bytes:
``submit`` tells the loop when it is over the high-water mark so the loop stops reading its
sockets, and the writer resumes the loops once the queue has drained to half.

A write that fails (ENOSPC, EIO) is undone with ``ftruncate`` to the size before it, so a line
is whole in the file or absent, and retried with backoff; nothing is acked meanwhile. That holds
for the messages file only: the rejects file never holds accepted records or acks back. A rejects
write that fails is written again in smaller parts (whole lines) as far as they fit, and the lines
that do not fit are dropped and counted (``rejects_lost``).

The log folders may be writable by the daemon user, who must not be able to point the daemon
(started as root) at another file: every file is opened with ``O_NOFOLLOW`` and must be a regular
file with one link (``files.open_regular``), and opening never blocks (a FIFO). Opening,
writing, fsyncing and rotating happen outside the queue lock, so a stuck disk never stops the
I/O loops from queueing or the control loop from seeing the stall (``stalled_seconds``).

Readers of the messages log downstream (the forwarders) get three narrow hooks, as callables:
``watchers`` are told the count of records written after each write, and which file was written
up to where (a wake-up, and a truncation the reader can see without having looked); ``may_drop``
is asked before the built-in rotation drops the oldest rotated file (a reader not past it yet
postpones the rotation); and ``ack_gate`` (``[[forward]] ack_after``) holds each written batch,
its acks unsent, until the gate's count of records acknowledged downstream passes the batch's
end. Held batches count towards the queue bound, so the loops stop reading while the gate is
behind; ``batch_done`` is still called on this thread, in order.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..events import get_logger
from ..stats import LatencyHistogram, WriterStats
from .logfile import Data, LogFile

log = get_logger()

T = TypeVar("T")
# How a record's line in the rejects log begins its event (render.Renderer.reject, orjson, compact):
# counted to tell refused records from other lines there (a rejects_suppressed summary). Inside a
# JSON string a quote is escaped, so raw input can never contain this byte sequence.
REJECTED_MARKER = b'"event":"rejected"'


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
        cache_bytes: int = 0,
    ) -> None:
        self.messages = LogFile(messages_path, mode, cache_bytes=cache_bytes)
        self.rejects = LogFile(rejects_path, mode, cache_bytes=cache_bytes)
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
        self.rejects_lost = 0  # refused records whose rejects line could not be written
        self._lost_unreported = 0
        self._lost_reported_at = -1e9
        self.write_errors = 0
        self.busy_since: float | None = None  # when the file operation running now began
        self.last_progress = time.monotonic()
        self.waiting_since = self.last_progress  # when the queue last went from empty to not empty
        self.queued_records = 0
        self.failing_since: float | None = None  # a write or fsync keeps failing and is retried
        self.last_error = ""
        self.write_hist = LatencyHistogram()
        self.fsync_hist = LatencyHistogram()
        self.on_progress: Callable[[], None] | None = None
        self.on_fatal: Callable[[str, BaseException], None] | None = None
        # Downstream readers of the messages log (see the module's docstring).
        self.watchers: list[Callable[[int, tuple[int, int], int], None]] = []
        self.may_drop: Callable[[tuple[int, int]], bool] | None = None
        self.ack_gate: Callable[[], int] | None = None
        self._held: collections.deque[tuple[int, Batch]] = collections.deque()
        self._held_bytes = 0
        self._gate_moved = False
        self._postponed: tuple[int, int] | None = None  # the rotated file whose drop was postponed (logged once)

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
            over = self._depth + self._held_bytes >= self.high_water
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
        """How long records have waited with no write finishing, or how long the file operation
        running now (write, fsync, open, rotate) has taken, whichever is longer.

        The second counts with an empty queue too: a reopen stuck in open(2) blocks every record
        that comes next, and must show before one arrives.
        """
        now = time.monotonic()
        busy = self.busy_since
        stuck = 0.0 if busy is None else now - busy
        if not self._depth:
            return max(0.0, stuck)
        grace = self.fsync_max_wait if self.fsync else 0.0  # a group commit waits on purpose
        return max(0.0, stuck, now - max(self.last_progress, self.waiting_since) - grace)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def request_reopen(self) -> None:
        with self._cond:
            self._reopen = True
            self._cond.notify()

    def gate_moved(self) -> None:
        """The ack gate's count went up (any thread): release the batches it now covers."""
        with self._cond:
            if not self._gate_moved:
                self._gate_moved = True
                self._cond.notify()

    @property
    def held_records(self) -> int:
        """Records written whose acks wait for the ack gate."""
        return sum(b.accepted for _end, b in list(self._held))

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
                    while not self._queue and not self._stopping and not self._reopen and not self._gate_moved:
                        self._cond.wait()
                    reopen, self._reopen = self._reopen, False
                    gate, self._gate_moved = self._gate_moved, False
                    empty, stopping = not self._queue, self._stopping
                if gate:
                    self._release()
                if reopen:
                    self._do_reopen()  # outside the lock: an open may block, submit() must not
                    continue
                if empty:
                    if stopping:
                        if self._held and not self._force:
                            with self._cond:  # the gate's engine may still acknowledge them: wait for it
                                if not self._gate_moved:
                                    self._cond.wait(0.05)
                            continue
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
        except Exception as exc:  # a dead writer stops the daemon, loudly
            if self.on_fatal is not None:
                self.on_fatal("writer", exc)
            raise
        finally:
            if self._held:
                log.warning(
                    "acks_not_sent",
                    records=self.held_records,
                    reason="stopped before the forward engine acknowledged them (ack_after); they are in the log "
                    "and are forwarded after the restart",
                )
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
        # The batches' lines go out as they are, in one writev: joining them first copied every
        # byte once more (and, in the hub, faulted in fresh pages for the copy at every write).
        messages: list[Data] = [b.messages for b in batches if b.messages]
        rejects = b"".join([b.rejects for b in batches])
        if messages:
            self._commit(self.messages, messages)
        del messages  # not held while the rejects are written or the next batches wait
        lost = self._commit_rejects(rejects) if rejects else 0
        del rejects
        self.written_records += sum(b.accepted for b in batches)
        self.written_rejects += max(0, sum(b.refused for b in batches) - lost)
        self.last_progress = time.monotonic()
        nbytes = 0
        records = 0
        gated = self.ack_gate is not None
        end = self.written_records - sum(b.accepted for b in batches)
        held = 0
        for batch in batches:
            nbytes += batch.nbytes
            records += batch.accepted + batch.refused
            end += batch.accepted
            if gated and batch.owner is not None and batch.accepted:
                self._held.append((end, batch))
                held += batch.nbytes
            elif batch.owner is not None:
                batch.owner.batch_done(batch)
        with self._cond:
            self._depth -= nbytes
            self._held_bytes += held
            self.queued_records -= records
        if self.watchers:
            st = os.fstat(self.messages.fd)  # which file, and how far: a later truncation shows
            for watcher in self.watchers:
                watcher(self.written_records, (st.st_dev, st.st_ino), self.messages.size)
        if gated:
            self._release()
        else:
            self._resume_readers()
        if self.on_progress is not None:
            self.on_progress()
        if self.rotate_bytes:
            for f in (self.messages, self.rejects):
                if f.size < self.rotate_bytes:
                    continue
                if f is self.messages and not self._may_rotate(f):
                    continue
                if f is self.messages:
                    self._retry(f, lambda f=f: f.rotate(self.rotate_keep))  # type: ignore[misc]
                else:
                    try:  # the rejects file never holds the messages back: tried again next write
                        self._timed(lambda f=f: f.rotate(self.rotate_keep))  # type: ignore[misc]
                    except OSError as exc:
                        self.write_errors += 1
                        log.error(
                            "rotate_failed",
                            path=str(f.path),
                            error=exc.strerror,
                            action="writing on to the current file; rotation is tried after the next write",
                        )
                        continue
                log.info("rotated", path=str(f.path), keep=self.rotate_keep)

    def _resume_readers(self) -> None:
        with self._cond:
            resume = self._paused if self._depth + self._held_bytes <= self.high_water // 2 else set()
            if resume:
                self._paused = set()
        for owner in resume:
            owner.resume_reading()

    def _release(self) -> None:
        """Hand back the held batches the ack gate now covers, in order (ack_after)."""
        gate = self.ack_gate
        if gate is None or not self._held:
            return
        passed = gate()
        freed = 0
        while self._held and self._held[0][0] <= passed:
            _end, batch = self._held.popleft()
            freed += batch.nbytes
            assert batch.owner is not None
            batch.owner.batch_done(batch)
        if freed:
            with self._cond:
                self._held_bytes -= freed
            self.last_progress = time.monotonic()
        self._resume_readers()

    def _may_rotate(self, f: LogFile) -> bool:
        """Whether rotating now may drop the oldest rotated file (``may_drop``: a reader is past it)."""
        if self.may_drop is None:
            return True
        try:
            st = os.lstat(f"{f.path}.{self.rotate_keep}")
        except OSError:
            return True  # nothing is dropped
        victim = (st.st_dev, st.st_ino)
        if self.may_drop(victim):
            return True
        if self._postponed != victim:
            self._postponed = victim
            log.warning(
                "rotation_postponed",
                path=str(f.path),
                dropped=f"{f.path}.{self.rotate_keep}",
                reason="a forwarder has not forwarded that file yet",
                action="writing on to the current file; rotation is tried again after each write",
            )
        return False

    def _timed(self, action: Callable[[], T]) -> T:
        """Run one file operation, visible to ``stalled_seconds`` while it runs."""
        self.busy_since = time.monotonic()
        try:
            return action()
        finally:
            self.busy_since = None

    def _commit_rejects(self, data: bytes) -> int:
        """Write the rejects lines as far as they fit; return how many refused records' lines were not.

        Never retried like the messages: a rejects disk that is full (or failing) must not hold
        accepted records or any ack. A part that does not fit is halved (at line boundaries) until
        one line alone does not fit; what is left then is dropped and counted.
        """
        f = self.rejects
        pos, n, size = 0, len(data), len(data)
        first = -1  # where the first written part landed: a failed fsync undoes from there
        error: OSError | None = None
        t0 = time.monotonic()
        while pos < n:
            end = min(n, pos + size)
            if end < n:
                end = data.rfind(b"\n", pos, end) + 1
                if end <= pos:  # the next line alone is longer than the part: try it alone
                    end = data.index(b"\n", pos) + 1
            part = data[pos:end]
            try:
                landed = self._timed(lambda part=part: f.write(part))  # type: ignore[misc]
            except OSError as exc:
                self.write_errors += 1
                error = exc
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) and part.count(b"\n") > 1:
                    size = len(part) // 2
                    continue
                break
            if first < 0:
                first = landed
            pos = end
        t1 = time.monotonic()
        if pos:
            self.write_hist.observe(t1 - t0)
        if pos and self.fsync:
            try:
                self._timed(f.fsync)
                self.fsync_hist.observe(time.monotonic() - t1)
            except OSError as exc:
                # As for the messages: after a failed fsync the lines may not be on disk; cut them.
                self.write_errors += 1
                error = exc
                f.undo(first)
                pos = 0
        if pos >= n or error is None:  # error is set whenever something was left
            return 0
        lost = data.count(REJECTED_MARKER, pos)
        self._rejects_not_written(lost, data.count(b"\n", pos), error)
        return lost

    def _rejects_not_written(self, lost: int, lines: int, exc: OSError) -> None:
        self.rejects_lost += lost
        self._lost_unreported += lost
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.last_error = f"{self.rejects.path}: {code} ({exc.strerror})"
        now = time.monotonic()
        if now - self._lost_reported_at < 30.0:
            return
        log.error(
            "rejects_not_written",
            path=str(self.rejects.path),
            records=self._lost_unreported,
            total=self.rejects_lost,
            lines_now=lines,
            error=exc.strerror,
            errno=code,
            action="those refused records' lines are dropped (their clients were told they were refused); "
            "accepted records and acks go on",
        )
        self._lost_unreported = 0
        self._lost_reported_at = now

    def _commit(self, f: LogFile, data: list[Data]) -> None:
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
                self._timed(action)
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
                    log.error(
                        "write_still_failing",
                        path=str(f.path),
                        error=exc.strerror,
                        errno=code,
                        failing_seconds=round(now - failed_since, 1),
                        records_waiting=self.queued_records,
                    )
                with self._cond:
                    self._cond.wait(delay)
                    reopen, self._reopen = self._reopen, False
                if reopen:  # the operator may have fixed the file: reopen it (not under the lock)
                    self._do_reopen()
                delay = min(delay * 2, 2.0)
                continue
            if failed_since is not None:
                self.failing_since = None
                log.warning(
                    "write_recovered",
                    path=str(f.path),
                    after_seconds=round(time.monotonic() - failed_since, 3),
                    errors=self.write_errors,
                )
            return

    def _do_reopen(self) -> None:
        for f in (self.messages, self.rejects):
            self.busy_since = time.monotonic()
            try:
                f.path.parent.mkdir(parents=True, exist_ok=True)
                f.open()
            except OSError as exc:
                log.error(
                    "reopen_failed",
                    path=str(f.path),
                    error=exc.strerror,
                    action="writing on to the file open before" if f.fd >= 0 else "no file open",
                )
            else:
                log.info("reopened", path=str(f.path))
            finally:
                self.busy_since = None
