"""One ``[[forward]]`` table at work: the log read from the cursor, published, acknowledged, the cursor moved.

design: a thread of its own runs an asyncio loop (nats-py is asyncio). The messages log is the
only buffer: lines are read from the reader in windows (``batch_bytes``) while fewer than
``max_in_flight`` messages wait for their acks, so an outage costs disk, not memory. Each line is
one message: the record's JSON with ``"host"`` added, and the id ``<host>:<epoch>:<seq>``, where
seq counts the records from the cursor's epoch on; it is the same after a crash and a restart
(the cursor holds the seq of its position), and after any rotation (it counts records, not
offsets), so JetStream's duplicate window drops every re-send. A window ("chunk") is done when
each of its messages has been acknowledged; done chunks move the acknowledged position, in
order; the cursor is replaced with it at most every ``cursor_interval`` (and at stop).

A message without an ack within ``ack_timeout``, or with an error answer (no leader, no stream),
is sent again with the same id, after a back-off (0.1 s doubling to 2 s) so that a stream
without a leader is not hammered; while disconnected nothing is re-sent, and everything not
acknowledged is re-sent once the client has reconnected. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson

from ..config import ForwardSettings
from ..errors import StartupError
from ..events import get_logger
from ..stats import ForwardStats
from . import cursor as cursor_file
from .cursor import Cursor, digest
from .jetstream import JetStreamLink, tls_context
from .reader import LogReader, Opened, Segment

log = get_logger()

SENT, ACKED, FAILED = 0, 1, 2
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0
IDLE_WAKE = 1.0  # with nothing to do, look anyway this often (a rotation by another program)
STATS_EVERY = 0.25
CONNECT_WAIT = 10.0  # one try to connect (nats-py goes through the servers meanwhile)


class _Chunk:
    """One window of lines in flight: their payloads, ids and states, and where it ends."""

    __slots__ = ("dev", "end", "failed", "first_seq", "id", "ino", "left", "nbytes", "oldest", "payloads", "sent_at",
                 "state", "tail")  # fmt: skip

    def __init__(self, chunk_id: int, segment: Segment, first_seq: int, payloads: list[bytes]) -> None:
        self.id = chunk_id
        self.dev, self.ino, self.end = segment.dev, segment.ino, segment.end
        self.tail = segment.data[-64:]
        self.first_seq = first_seq
        self.payloads = payloads
        self.state = bytearray(len(payloads))  # SENT (not acknowledged yet), ACKED, FAILED
        self.left = len(payloads)
        self.nbytes = len(segment.data)
        self.sent_at = 0.0
        self.failed = False
        self.oldest: float | None = None  # the first record's timestamp (epoch seconds), parsed once

    def __repr__(self) -> str:
        return f"<_Chunk {self.id} seq {self.first_seq}+{len(self.payloads)} left {self.left}>"


def _record_time(line: bytes) -> float | None:
    try:
        value = orjson.loads(line).get("timestamp")
        return datetime.fromisoformat(value).timestamp() if isinstance(value, str) else None
    except (orjson.JSONDecodeError, ValueError, AttributeError, TypeError):
        return None


class Forwarder:
    """Forwards the messages log to one JetStream stream, at least once, from a persisted cursor."""

    def __init__(
        self,
        settings: ForwardSettings,
        log_path: Path,
        cursor_path: Path,
        resolve: Callable[[str], Path],
        on_acked: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.label
        self.host = settings.host or socket.gethostname()
        self._host_json = orjson.dumps(self.host)
        self.log_path = log_path
        self.cursor_path = cursor_path
        self.resolve = resolve
        self.on_acked = on_acked  # ack_after: the writer's gate_moved
        self.reader = LogReader(log_path, settings.batch_bytes)
        self.cursor: Cursor | None = None  # the persisted one
        self.stats = ForwardStats(
            name=self.name, lag_limit_bytes=settings.lag_bytes, lag_limit_seconds=settings.lag_seconds
        )
        self.seq_start = 0  # the cursor's seq when the daemon started
        self.backlog = 0  # records after the cursor when the daemon started (before the writer ran)
        self.acked_seq = 0  # records before the acknowledged position
        self.next_seq = 0  # the next line read gets this seq
        self.writer_records = 0  # records the writer has written since it started (its watchers' count)
        self._chunks: deque[_Chunk] = deque()
        self._by_id: dict[int, _Chunk] = {}
        self._chunk_ids = 0
        self._in_flight = 0  # messages in chunks not done
        self._in_flight_bytes = 0
        self._acked_pos: tuple[int, int, int, str] | None = None  # dev, ino, offset, check
        self._stored_at = 0.0
        self._retry_at = 0.0
        self._delay = BACKOFF_FIRST
        self._reconnected = False
        self._disconnected_at: float | None = None
        self._behind = False
        self._eof = False
        self._stats_due = False
        self._stop = threading.Event()
        self._stop_by = float("inf")
        self._stop_from = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._woken = False
        self._written: tuple[tuple[int, int], int] = ((0, 0), 0)  # the writer's file and size, last told
        self._thread: threading.Thread | None = None
        self._tls: ssl.SSLContext | None = None
        self._link: JetStreamLink | None = None

    def __repr__(self) -> str:
        return f"<Forwarder {self.name} {self.settings.subject} -> {self.settings.stream} acked={self.acked_seq}>"

    # -- before the writer starts --------------------------------------------------------------
    def prepare(self) -> None:
        """Load the cursor, find its file, count the backlog; raise StartupError on bad TLS files."""
        try:
            self._tls = tls_context(self.settings, self.resolve)
        except (OSError, ValueError) as exc:
            raise StartupError(f"forward {self.name}: cannot load its TLS files: {exc}") from None
        try:
            stored = cursor_file.load(self.cursor_path)
        except ValueError as exc:
            log.error(
                "forward_cursor_unreadable",
                forward=self.name,
                error=str(exc),
                action="forwarding from the start of the oldest log file (records may be sent twice, none lost)",
            )
            stored = None
            found = self.reader.open_at((0, 0))  # no file has that identity: the oldest one, from its start
            opened = Opened(found.dev, found.ino, found.offset)
        else:
            if stored is None:
                opened = self.reader.open_at(None, at_end=self.settings.start == "end")
            else:
                opened = self.reader.open_at(stored.ident, stored.offset, stored.check)
        self._report(opened)
        if stored is None or opened.lost_files or opened.problem:
            stored = self._new_cursor(stored, opened)
        self.cursor = stored
        self.seq_start = self.acked_seq = self.next_seq = stored.seq
        self._acked_pos = (stored.dev, stored.ino, stored.offset, stored.check)
        self.backlog = self.reader.count_unread()
        self._behind = self.backlog > 0
        self.stats.lag_records = self.backlog
        self.stats.lag_bytes = self.reader.unread()

    def _new_cursor(self, old: Cursor | None, opened: Opened) -> Cursor:
        check = self.reader_check()
        if old is None:
            fresh = Cursor.new(opened.dev, opened.ino, opened.offset, check)
        else:  # same epoch and seq on: the ids go on from where they were
            fresh = old.moved(opened.dev, opened.ino, opened.offset, old.seq, check)
        if opened.dev or opened.ino:
            self._store(fresh)
        return fresh

    def reader_check(self) -> str:
        cur = self.reader.cur
        return digest(bytes(cur.recent)) if cur is not None and cur.pos else ""

    def _report(self, opened: Opened) -> None:
        if opened.lost_files:
            self.stats.lost_files += opened.lost_files
            log.error("forward_loss", forward=self.name, reason=opened.problem, lost_files=self.stats.lost_files)
        elif opened.problem:
            log.warning("forward_cursor_moved", forward=self.name, reason=opened.problem)

    # -- the other threads' side ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"nio-logd-forward-{self.name}", daemon=True)
        self._thread.start()

    def wake(self, written: int, ident: tuple[int, int], size: int) -> None:
        """The writer wrote (its thread): look at the log."""
        self.writer_records = written
        if ident != self._written[0] or size > self._written[1]:
            self._written = (ident, size)
        if self._woken:
            return
        self._woken = True
        self._signal()

    def _signal(self) -> None:
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(event.set)

    def may_drop(self, ident: tuple[int, int]) -> bool:
        """Whether the rotation may delete the file ``ident`` (we are past it)."""
        stored = self.cursor
        return stored is None or stored.ident != ident

    @property
    def acked_writer_records(self) -> int:
        """How many of the records the writer wrote since it started the engine has acknowledged."""
        return self.acked_seq - self.seq_start - self.backlog

    def snapshot(self) -> ForwardStats:
        s = self.stats
        return ForwardStats(
            name=s.name,
            forwarded=s.forwarded,
            resent=s.resent,
            lag_bytes=s.lag_bytes,
            lag_records=max(0, self.backlog + self.writer_records - s.forwarded),  # live, not as of the last look
            oldest_unforwarded_seconds=s.oldest_unforwarded_seconds,
            engine_errors=s.engine_errors,
            lost_records=s.lost_records,
            lost_files=s.lost_files,
            connected=s.connected,
            lag_limit_bytes=s.lag_limit_bytes,
            lag_limit_seconds=s.lag_limit_seconds,
            last_error=s.last_error,
        )

    def stop(self, timeout: float) -> bool:
        """Forward what is written (for at most ``timeout`` s), store the cursor, disconnect."""
        self._stop_from = time.monotonic()
        self._stop_by = self._stop_from + timeout
        self._stop.set()
        self._signal()
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(stopped.set)
        if self._thread is None:
            return True
        self._thread.join(timeout + 5.0)
        return not self._thread.is_alive() and not self._chunks and self._eof

    # -- the forwarder's thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                asyncio.run(self._main())
                return
            except Exception as exc:  # a bug: say so, and start again from the stored cursor
                log.error("forward_failed", forward=self.name, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
                self.stats.engine_errors += 1
                if self._stop.wait(1.0):
                    return
                self._restart_from_cursor()

    def _restart_from_cursor(self) -> None:
        self._chunks.clear()
        self._by_id.clear()
        self._in_flight = self._in_flight_bytes = 0
        stored = self.cursor
        if stored is None:
            self._report(self.reader.open_at(None, at_end=self.settings.start == "end"))
            return
        self._report(self.reader.open_at(stored.ident, stored.offset, stored.check))
        self.acked_seq = self.next_seq = stored.seq
        self._acked_pos = (stored.dev, stored.ino, stored.offset, stored.check)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._stopped = asyncio.Event()
        if self._stop.is_set():
            self._stopped.set()
        link = self._link = JetStreamLink(self.settings, self._tls, self._answer, self._state, self.resolve)
        next_connect = 0.0
        connect_delay = BACKOFF_FIRST
        next_stats = 0.0
        log.info(
            "forward_started",
            forward=self.name,
            servers=list(self.settings.servers),
            subject=self.settings.subject,
            stream=self.settings.stream,
            host=self.host,
            cursor=str(self.cursor_path),
            seq=self.acked_seq,
            backlog_records=self.backlog,
            ack_after=self.settings.ack_after,
        )
        try:
            while True:
                now = time.monotonic()
                stopping = self._stop.is_set()
                if stopping and ((not self._chunks and self._eof) or now >= self._stop_by):
                    break
                if stopping and not link.connected and now >= self._stop_from + 1.0:
                    break  # nothing can be forwarded now: the cursor keeps the rest for the next start
                if link.nc is not None and link.nc.is_closed:
                    await link.close()  # nats-py gave up on it (refused credentials on a reconnect): start again
                if link.nc is None and now >= next_connect:
                    if await self._connect(link):
                        connect_delay = BACKOFF_FIRST
                    else:
                        next_connect = time.monotonic() + connect_delay
                        connect_delay = min(connect_delay * 2, BACKOFF_MAX * 2)
                self._event.clear()
                self._woken = False
                self._advance()
                if link.connected:
                    await self._resend(link)
                    await self._fill(link)
                elif self._in_flight < self.settings.max_in_flight:
                    self._eof = self.reader.unread() == 0
                if now >= next_stats or self._stats_due:
                    self._stats_due = False
                    self._update_stats(link)
                    next_stats = now + STATS_EVERY
                await self._wait(link, next_connect, stopping)
        finally:
            self._advance()
            self._store_acked(force=True)
            self._update_stats(link)
            self.stats.connected = False
            await link.close()
            self._loop = None

    async def _connect(self, link: JetStreamLink) -> bool:
        assert self._stopped is not None
        connecting = asyncio.ensure_future(link.connect())
        stopper = asyncio.ensure_future(self._stopped.wait())
        await asyncio.wait({connecting, stopper}, timeout=CONNECT_WAIT, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not connecting.done():  # no server answered in time, or we are stopping: give up this try
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
        try:
            connecting.result()
        except (asyncio.CancelledError, Exception) as exc:  # noqa: BLE001 - no server, credentials, TLS: retried
            if isinstance(exc, asyncio.CancelledError):
                self._engine_error(f"connect: no server answered within {CONNECT_WAIT:g} s")
            else:
                self._engine_error(f"connect: {type(exc).__name__}: {exc}")
            if self._disconnected_at is None:
                self._disconnected_at = time.monotonic()
                log.warning(
                    "forward_disconnected",
                    forward=self.name,
                    servers=list(self.settings.servers),
                    error=self.stats.last_error,
                    action="the records wait in the log; connecting again with back-off",
                )
            return False
        problem = await link.stream_exists(self.settings.ack_timeout)
        if problem is not None:
            self._engine_error(problem)
            log.warning("forward_stream_problem", forward=self.name, problem=problem)
        if self._disconnected_at is not None:
            self._state("reconnected", "")
        else:
            log.info("forward_connected", forward=self.name, servers=list(self.settings.servers))
        self._resend_all()
        return True

    async def _wait(self, link: JetStreamLink, next_connect: float, stopping: bool) -> None:
        assert self._event is not None
        now = time.monotonic()
        timeout = IDLE_WAKE
        if self._chunks:
            timeout = min(timeout, max(0.01, self._chunks[0].sent_at + self.settings.ack_timeout - now))
            if self._retry_at > now:
                timeout = min(timeout, self._retry_at - now)
        if link.nc is None:
            timeout = min(timeout, max(0.01, next_connect - now))
        if stopping:
            timeout = min(timeout, 0.05)
        if self._chunks or stopping:
            timeout = min(timeout, STATS_EVERY)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=timeout)

    # -- publishing ----------------------------------------------------------------------------
    def _payload(self, line: bytes) -> bytes:
        if b'"host"' in line:  # a kept extra field named host (extra = "keep"): ours wins, theirs is kept
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and "host" in obj:
                obj["record_host"] = obj.pop("host")
                obj["host"] = self.host
                return orjson.dumps(obj)
        if line.endswith(b"}"):
            return line[:-1] + b',"host":' + self._host_json + b"}"
        return line

    async def _fill(self, link: JetStreamLink) -> None:
        """Read and publish new lines while the in-flight window has room."""
        limit = self.settings.max_in_flight
        while self._in_flight < limit:
            if self._retry_at > time.monotonic() and any(c.failed for c in self._chunks):
                return  # backing off: no new messages on top of failing ones
            written, self._written = self._written, ((0, 0), 0)
            self.reader.note_written(*written)
            segment = self.reader.read()
            self._notes()
            if segment is None:
                self._eof = self.reader.unread() == 0
                return
            self._eof = False
            lines = segment.data.split(b"\n")
            lines.pop()  # after the last newline
            self._chunk_ids += 1
            chunk = _Chunk(self._chunk_ids, segment, self.next_seq, [self._payload(line) for line in lines])
            self.next_seq += len(lines)
            self._chunks.append(chunk)
            self._by_id[chunk.id] = chunk
            self._in_flight += chunk.left
            self._in_flight_bytes += chunk.nbytes
            if chunk.oldest is None and lines:
                chunk.oldest = _record_time(lines[0])
            await self._send(link, chunk, first=True)

    async def _send(self, link: JetStreamLink, chunk: _Chunk, *, first: bool = False) -> None:
        chunk.sent_at = time.monotonic()
        chunk.failed = False
        nc = link.nc
        max_payload = nc.max_payload if nc is not None else 1 << 20
        prefix = f"{self.host}:{self._epoch}:"
        sent = 0
        try:
            for i, payload in enumerate(chunk.payloads):
                if chunk.state[i] == ACKED:
                    continue
                if not payload or len(payload) > max_payload - 512:
                    self._unforwardable(chunk, i, len(payload))
                    continue
                await link.publish(f"{chunk.id}_{i}", payload, prefix + str(chunk.first_seq + i))
                sent += 1
        except Exception as exc:  # noqa: BLE001 - disconnected, the client's buffer full: sent again later
            self._engine_error(f"publish: {type(exc).__name__}: {exc}")
            chunk.failed = True
            self._back_off()
        if not first:
            self.stats.resent += sent
        if not chunk.left:
            self._signal()

    def _unforwardable(self, chunk: _Chunk, i: int, size: int) -> None:
        chunk.state[i] = ACKED
        chunk.left -= 1
        if size:
            self.stats.lost_records += 1
            log.error(
                "forward_loss",
                forward=self.name,
                seq=chunk.first_seq + i,
                bytes=size,
                reason="the record is larger than the server's max_payload; it stays in the log only",
            )

    @property
    def _epoch(self) -> str:
        return self.cursor.epoch if self.cursor is not None else "0"

    async def _resend(self, link: JetStreamLink) -> None:
        now = time.monotonic()
        timeout = self.settings.ack_timeout
        for chunk in self._chunks:
            if chunk.left and not chunk.failed and now - chunk.sent_at >= timeout:
                # No answer in time (a server died holding it, a leader election): not stored, as far
                # as we know; sent again after the back-off, with the same ids.
                self._engine_error(f"no acknowledgement within {timeout:g} s")
                chunk.failed = True
                self._back_off()
        if now < self._retry_at:
            return
        for chunk in list(self._chunks):
            if chunk.left and chunk.failed:
                await self._send(link, chunk)
                if chunk.failed:
                    return

    def _resend_all(self) -> None:
        """After a (re)connect: every message not acknowledged goes again, now."""
        for chunk in self._chunks:
            if chunk.left:
                chunk.failed = True
        self._retry_at = 0.0

    def _back_off(self) -> None:
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, BACKOFF_MAX)

    def _engine_error(self, text: str) -> None:
        self.stats.engine_errors += 1
        self.stats.last_error = text[:500]

    def _answer(self, token: str, error: str | None) -> None:
        chunk_id, _, index = token.partition("_")
        try:
            chunk = self._by_id.get(int(chunk_id))
            i = int(index)
        except ValueError:
            return
        if chunk is None or i >= len(chunk.state) or chunk.state[i] == ACKED:
            return
        if error is None:
            chunk.state[i] = ACKED
            chunk.left -= 1
            self._delay = BACKOFF_FIRST
            if not chunk.left and self._event is not None:
                self._event.set()
            return
        if chunk.state[i] != FAILED:
            chunk.state[i] = FAILED
            self._engine_error(error)
        if not chunk.failed:
            chunk.failed = True
            self._back_off()
            if self._event is not None:
                self._event.set()

    def _state(self, what: str, detail: str) -> None:
        if what == "disconnected":
            if self._disconnected_at is None and not self._stop.is_set():
                self._disconnected_at = time.monotonic()
                self._behind = True
                log.warning(
                    "forward_disconnected",
                    forward=self.name,
                    action="the records wait in the log; nats-py reconnects with back-off",
                )
        elif what == "reconnected":
            since = self._disconnected_at
            self._disconnected_at = None
            log.info(
                "forward_reconnected",
                forward=self.name,
                server=detail,
                after_seconds=round(time.monotonic() - since, 3) if since is not None else 0.0,
            )
            self._resend_all()
            self._signal()
        elif what == "error":
            self._engine_error(detail)

    # -- the acknowledged position -------------------------------------------------------------
    def _advance(self) -> None:
        moved = False
        while self._chunks and not self._chunks[0].left:
            chunk = self._chunks.popleft()
            del self._by_id[chunk.id]
            count = len(chunk.payloads)
            self._in_flight -= count
            self._in_flight_bytes -= chunk.nbytes
            self.acked_seq = chunk.first_seq + count
            self._acked_pos = (chunk.dev, chunk.ino, chunk.end, digest(chunk.tail))
            moved = True
        if not self._chunks and self.reader.cur is not None:
            dev, ino, pos = self.reader.position
            if self._acked_pos is None or self._acked_pos[:3] != (dev, ino, pos):
                self._acked_pos = (dev, ino, pos, self.reader_check())
        if moved:
            self._stats_due = True
            self.stats.forwarded = self.acked_seq - self.seq_start
            if self.on_acked is not None:
                self.on_acked()
        self._store_acked()
        if self._behind and not self._chunks and self._eof and not self._stop.is_set():
            self._behind = False
            log.info("forward_caught_up", forward=self.name, forwarded=self.stats.forwarded, seq=self.acked_seq)

    def _store_acked(self, *, force: bool = False) -> None:
        pos = self._acked_pos
        if pos is None or (pos[0] == 0 and pos[1] == 0):
            return
        old = self.cursor
        if old is not None and old.ident == pos[:2] and old.offset == pos[2] and old.seq == self.acked_seq:
            return
        now = time.monotonic()
        new_file = old is None or old.ident != pos[:2]
        if not force and not new_file and now - self._stored_at < self.settings.cursor_interval:
            return
        fresh = (
            Cursor.new(pos[0], pos[1], pos[2], pos[3])
            if old is None
            else old.moved(pos[0], pos[1], pos[2], self.acked_seq, pos[3])
        )
        self._store(fresh)
        self._stored_at = now

    def _store(self, fresh: Cursor) -> None:
        try:
            cursor_file.store(self.cursor_path, fresh)
        except OSError as exc:
            self._engine_error(f"cursor {self.cursor_path}: {exc.strerror}")
            log.error(
                "forward_cursor_not_written",
                forward=self.name,
                path=str(self.cursor_path),
                error=exc.strerror,
                action="forwarding goes on; a restart re-sends from the cursor stored last (deduplicated)",
            )
            return
        self.cursor = fresh

    def _notes(self) -> None:
        while self.reader.notes:
            log.warning("forward_log_truncated", forward=self.name, detail=self.reader.notes.pop(0))

    # -- how far behind ------------------------------------------------------------------------
    def _update_stats(self, link: JetStreamLink) -> None:
        s = self.stats
        s.connected = link.connected
        try:
            unread = self.reader.unread()
        except OSError:
            unread = 0
        s.lag_bytes = self._in_flight_bytes + unread
        s.lag_records = max(0, self.backlog + self.writer_records - (self.acked_seq - self.seq_start))
        if not s.lag_records and not self._chunks:
            s.oldest_unforwarded_seconds = 0.0
            return
        oldest = self._chunks[0].oldest if self._chunks else None
        if oldest is not None:
            s.oldest_unforwarded_seconds = max(0.0, datetime.now(UTC).timestamp() - oldest)
