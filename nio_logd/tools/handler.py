"""A ``logging.Handler`` that ships records to nio-logd and never blocks the application.

design: ``emit()`` (any thread) renders the record into one wire line, appends it to a bounded
queue under one lock, and returns; it never touches a socket. One daemon thread, the shipper,
takes everything waiting as a batch (at most ``batch_size`` lines), sends it on its connection
and, with acks, waits until each line is answered: ``client._pump`` pipelines the batch and
matches the answers to the lines by their ``seq``, batch after batch on one connection. A lost
connection (or no answer within ``timeout``) is closed; the lines not yet answered stay at the
head and go out again on the next connection (the next address when there are several), after a
back-off that doubles up to ``max_backoff`` and starts again once a line is answered. Delivery is
therefore at least once: nothing the handler holds is lost, but a line the daemon wrote whose
answer died with the connection is written twice. A refusal (``ok: false``) is an answer: counted
in ``refused``, never sent again.

Memory has one bound: the records the handler holds, queued or in flight (not yet answered),
are at most ``queue_size`` lines and ``queue_bytes`` bytes. A record past either is dropped at
``emit()`` and counted in ``dropped``; nothing else grows.

The shipper never logs: the handler may sit on the root logger, and a record about a failed send
would feed itself. What went wrong is kept in ``last_error`` and counted in ``errors``;
``handleError`` (logging's own way) is used only for a record that cannot be formatted.

The thread does not survive ``fork()``: a child process makes its own handler.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from ..config import Address
from ..errors import ClientError
from .client import SendResult, _addresses, _pump, client_context, connect, make_record

DEFAULT_ADDRESS = "tcp://127.0.0.1:8888"

# The attributes every LogRecord has; the others on a record came from ``extra={...}``.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

# A lost connection or a refused connect: what the shipper survives by reconnecting. Bad answers
# (ValueError from JSON, KeyError / TypeError from a line without a proper seq) end it the same way.
_LOST = (OSError, ClientError, ValueError, KeyError, TypeError)

_MIN_BACKOFF = 0.05


def record_time(created: float) -> str:
    """``created`` (seconds since the epoch) as ISO 8601 with this machine's UTC offset, to the
    microsecond: one instant whatever ``$TZ`` says, as ``nio-logd send`` writes its default time."""
    return datetime.fromtimestamp(created, UTC).astimezone().isoformat(timespec="microseconds")


def default_user() -> str:
    """The name of the user this process runs as (``uid-N`` when it has none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


@dataclass(slots=True)
class HandlerStats:
    """What the handler counted. ``sent`` counts lines on their first trip, ``resent`` the later
    ones; ``acked`` + ``refused`` are the answered (with ``ack=False``: ``acked`` counts lines
    handed to the kernel). ``dropped``: refused by emit() because the queue was full;
    ``abandoned``: still held when ``close()`` gave up."""

    sent: int = 0
    resent: int = 0
    acked: int = 0
    refused: int = 0
    dropped: int = 0
    abandoned: int = 0
    connections: int = 0
    errors: int = 0  # failed connects and lost connections


class _Shipper:
    """The bounded queue, the connection, and the thread that drains one into the other."""

    def __init__(
        self,
        addresses: list[Address],
        *,
        ack: bool,
        tls: ssl.SSLContext | None,
        server_name: str | None,
        timeout: float,
        queue_size: int,
        queue_bytes: int,
        batch_size: int,
        max_backoff: float,
    ) -> None:
        self.addresses = addresses
        self.ack = ack
        self.tls = tls
        self.server_name = server_name
        self.timeout = timeout
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.batch_size = batch_size
        self.max_backoff = max_backoff
        self.stats = HandlerStats()
        self.last_error: str | None = None
        self.last_refusal: dict[str, Any] | None = None
        # One lock for the queue, the counts of what is held and finished, and the socket slot.
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # the queue is not empty, or we stop
        self._finished_cond = threading.Condition(self._lock)  # lines were answered
        self._queue: deque[bytes] = deque()
        self._held = 0  # lines queued or in flight
        self._held_bytes = 0
        self._enqueued = 0  # lines ever taken, and of those, finished (in queue order)
        self._finished = 0
        self._gave_up_at = -1  # self._finished when a flush last timed out
        self._closing = False  # emit() takes no more; the thread drains, then ends
        self._abort = threading.Event()  # the thread ends now
        self._sock: socket.socket | None = None
        self._seq = 0  # lines the connection carried, all answered
        self._current = 0  # index of the address in use
        self._delay = _MIN_BACKOFF
        self._thread = threading.Thread(target=self._run, name="nio-logd-handler", daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    @property
    def held(self) -> int:
        return self._held

    # -- the application's side ------------------------------------------------------------------
    def put(self, line: bytes) -> bool:
        """Queue one line; False (and counted) if it does not fit or the handler is closed."""
        size = len(line) + 1
        with self._lock:
            if self._closing or self._held >= self.queue_size or self._held_bytes + size > self.queue_bytes:
                self.stats.dropped += 1
                return False
            self._queue.append(line)
            self._held += 1
            self._held_bytes += size
            self._enqueued += 1
            if len(self._queue) == 1:  # the shipper waits only on an empty queue
                self._ready.notify()
        return True

    def drop(self) -> None:
        with self._lock:
            self.stats.dropped += 1

    def flush(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until every line queued before this call is answered."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._enqueued
            while self._finished < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    self._gave_up_at = self._finished
                    return False
                self._finished_cond.wait(left)
        return True

    def close(self, timeout: float) -> bool:
        """Take no more lines, let the shipper finish within ``timeout`` s, then stop it."""
        with self._lock:
            if self._closing:
                return self._finished == self._enqueued  # closed before
            self._closing = True
            self._ready.notify()
            if self._gave_up_at == self._finished:
                # A flush just timed out with nothing delivered since (logging.shutdown calls
                # flush(), then close()): the daemon is away; do not wait a second time.
                timeout = 0.0
        flushed = self.flush(timeout)
        self._abort.set()
        with self._lock:
            self._ready.notify()
            if self._sock is not None:  # wakes a shipper waiting for answers
                try:
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # the raw socket, under TLS too
                except OSError:
                    pass
        self._thread.join(1.0)  # it only has to notice: a connect() under way is the most it waits for
        with self._lock:
            self.stats.abandoned += self._held
        return flushed

    # -- the shipper thread ----------------------------------------------------------------------
    def _run(self) -> None:
        batch: list[bytes] = []
        went_before = 0  # lines at batch's head that were sent on an earlier connection
        try:
            while not self._abort.is_set():
                if not batch:
                    batch = self._take()
                    went_before = 0
                    if not batch:
                        return
                if self._sock is None and not self._connect():
                    continue
                answered, went_out, failure = self._ship_acked(batch) if self.ack else self._ship_plain(batch)
                self.stats.sent += max(0, went_out - went_before)
                self.stats.resent += min(went_out, went_before)
                went_before = max(went_out, went_before) - answered
                if answered:
                    self._delay = _MIN_BACKOFF
                    size = sum(len(line) + 1 for line in batch[:answered])
                    del batch[:answered]
                    self._finish(answered, size)
                if failure is not None:
                    self._lost(failure)
        finally:
            self._close_socket()

    def _take(self) -> list[bytes]:
        """Every waiting line up to ``batch_size``; blocks while there is none (empty once closing)."""
        with self._lock:
            while not self._queue and not self._closing and not self._abort.is_set():
                self._ready.wait()
            if self._abort.is_set():
                return []
            queue = self._queue
            return [queue.popleft() for _ in range(min(len(queue), self.batch_size))]

    def _finish(self, lines: int, size: int) -> None:
        with self._lock:
            self._held -= lines
            self._held_bytes -= size
            self._finished += lines
            self._finished_cond.notify_all()

    def _ship_acked(self, batch: list[bytes]) -> tuple[int, int, BaseException | None]:
        """Pump the batch on the connection: (lines answered, lines that went out, why it broke)."""
        assert self._sock is not None
        result = SendResult()
        failure: BaseException | None = None
        try:
            _pump(self._sock, batch, self.batch_size, self.timeout, result, seq_base=self._seq)
        except _LOST as exc:
            failure = exc
        self._seq += result.answered
        self.stats.acked += result.acked
        if result.refused:
            self.stats.refused += len(result.refused)
            self.last_refusal = result.refused[-1][2]
        return result.answered, result.sent, failure

    def _ship_plain(self, batch: list[bytes]) -> tuple[int, int, BaseException | None]:
        """No acks: a batch is done once the kernel took it. One that failed part-way is sent again
        whole (what the lost daemon read of it is unknown: duplicates, or a loss of what sat in
        the kernel's buffers when the connection broke)."""
        assert self._sock is not None
        try:
            self._sock.sendall(b"".join(line + b"\n" for line in batch))
        except OSError as exc:
            return 0, len(batch), exc
        self.stats.acked += len(batch)
        return len(batch), len(batch), None

    def _connect(self) -> bool:
        """Connect to the current address, moving on to the next one that fails, with a back-off
        after each round of failures; False once stopped."""
        failed = 0
        while not self._abort.is_set():
            address = self.addresses[self._current]
            try:
                sock = connect(address, self.timeout, tls=self.tls, server_name=self.server_name)
            except ClientError as exc:  # TLSError too: it may be fixed on the other side; keep trying
                self._error(str(exc))
                self._current = (self._current + 1) % len(self.addresses)
                failed += 1
                if failed % len(self.addresses) == 0:
                    self._pause()
                continue
            with self._lock:
                if self._abort.is_set():
                    sock.close()
                    return False
                self._sock = sock
            self._seq = 0
            self.stats.connections += 1
            return True
        return False

    def _lost(self, exc: BaseException) -> None:
        """The connection broke: close it; the next one goes to the next address, or after a pause."""
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        self._error(f"connection to {self.addresses[self._current]} lost: {why}")
        self._close_socket()
        if len(self.addresses) > 1:
            self._current = (self._current + 1) % len(self.addresses)
        else:
            self._pause()

    def _pause(self) -> None:
        self._abort.wait(self._delay)
        self._delay = min(self._delay * 2, self.max_backoff)

    def _error(self, text: str) -> None:
        self.last_error = text
        self.stats.errors += 1

    def _close_socket(self) -> None:
        with self._lock:  # never closed while close() shuts it down: the fd cannot be reused meanwhile
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()


class NioLogdHandler(logging.Handler):
    """Send log records to nio-logd: ``emit()`` queues, a background thread delivers.

    ``address``: ``tcp://HOST:PORT`` or ``unix:///PATH``, or a list of them in order of preference
    (the handler stays on one until it fails, then goes on to the next). ``ack`` (default): the
    listener must have ``ack = true``; a line counts as delivered once the daemon answered it, and
    a line not answered when a connection breaks is sent again. ``ack=False`` writes plainly.

    ``tls``: True (or ``ca``, ``cert``, ``key`` given) verifies the daemon against ``ca`` (default:
    the system's CAs) and its name against ``server_name`` (default: the address's host); an
    ``ssl.SSLContext`` is used as given (see ``client.client_context``).

    Each record becomes ``{"send_user": user, "send_time": record.created with the local UTC
    offset, "send_msg": self.format(record)}``. More fields only on request, because a listener
    refuses unknown keys unless it has ``[record] extra = "keep"`` (or ``"ignore"``):

    - ``fields``: key -> LogRecord attribute, e.g. ``{"logger": "name", "log_level": "levelname"}``
      (not ``level``: the daemon writes that key itself and refuses a record that brings one; the
      same for ``timestamp``, ``event``, ``peer``, ``listener``, ``client``, ``peer_pid`` ...);
    - ``extra``: True sends every item the call gave in ``extra={...}``; a collection of names
      sends those of them. A value JSON cannot hold is sent as its ``str()``.

    Bounds: ``queue_size`` lines and ``queue_bytes`` bytes held (queued or unanswered); past
    them ``emit()`` drops the record and counts it. ``flush(timeout)`` waits until everything
    logged before it is delivered; ``close()`` flushes for at most ``close_timeout`` s and stops.
    """

    def __init__(
        self,
        address: str | Address | Sequence[str | Address] = DEFAULT_ADDRESS,
        *,
        user: str | None = None,
        level: int | str = logging.NOTSET,
        ack: bool = True,
        tls: bool | ssl.SSLContext = False,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
        fields: Mapping[str, str] | None = None,
        extra: bool | Collection[str] = False,
        queue_size: int = 10_000,
        queue_bytes: int = 64 << 20,
        batch_size: int = 1000,
        timeout: float = 10.0,
        max_backoff: float = 5.0,
        close_timeout: float = 5.0,
    ) -> None:
        # Everything that can raise comes before logging.Handler.__init__, which registers the
        # handler for logging.shutdown: a half-made one would be flushed at exit.
        try:
            addresses = _addresses(address)
        except ValueError as exc:
            raise ClientError(f"nio-logd handler: {exc}") from None
        if queue_size < 1 or queue_bytes < 1 or batch_size < 1 or timeout <= 0 or max_backoff <= 0:
            raise ClientError("nio-logd handler: queue_size, queue_bytes, batch_size, timeout, max_backoff must be > 0")
        user = default_user() if user is None else user
        if not user:
            raise ClientError("nio-logd handler: user must not be empty")
        context: ssl.SSLContext | None
        if isinstance(tls, ssl.SSLContext):
            context = tls
        elif tls or ca or cert or key:
            context = client_context(ca, cert, key)
        else:
            context = None
        super().__init__(level)
        self.user = user
        self.fields = dict(fields or {})
        self.extra = extra if isinstance(extra, bool) else frozenset(extra)
        self.close_timeout = close_timeout
        self._shipper = _Shipper(
            addresses,
            ack=ack,
            tls=context,
            server_name=server_name,
            timeout=timeout,
            queue_size=queue_size,
            queue_bytes=queue_bytes,
            batch_size=batch_size,
            max_backoff=max_backoff,
        )

    def __repr__(self) -> str:
        s = self._shipper
        return f"<NioLogdHandler {', '.join(map(str, s.addresses))} user={self.user!r} held={s.held}>"

    # -- what the application calls --------------------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        """Render and queue the record; never blocks, never raises (a bad record: ``handleError``)."""
        if threading.get_ident() == self._shipper.ident:
            self._shipper.drop()  # something the shipper itself triggered: never loop through ourselves
            return
        try:
            line = make_record(self.user, self.format(record), record_time(record.created), self._fields_of(record))
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's contract: a record that cannot be rendered goes to handleError
            self.handleError(record)
            return
        self._shipper.put(line)

    def enqueue(self, msg: str, created: float | None = None, extra: Mapping[str, Any] | None = None) -> bool:
        """Queue one record without a LogRecord (the structlog integration's way in); False if dropped.

        ``created`` defaults to now; ``extra`` are more fields (see the class's note on them).
        """
        when = record_time(time.time() if created is None else created)
        return self._shipper.put(make_record(self.user, msg, when, extra))

    def flush(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Wait at most ``timeout`` s (default ``close_timeout``) until every record logged before
        this call is delivered (answered, with acks); True if it was."""
        return self._shipper.flush(self.close_timeout if timeout is None else timeout)

    def close(self) -> None:
        """Flush for at most ``close_timeout`` s, then stop the sender (what is left is counted in
        ``abandoned``). ``logging.shutdown`` calls this at exit."""
        self._shipper.close(self.close_timeout)
        super().close()

    # -- what it counted -------------------------------------------------------------------------
    @property
    def stats(self) -> HandlerStats:
        return self._shipper.stats

    def counts(self) -> dict[str, int]:
        """The counters, as a dict (plus ``held``: lines queued or waiting for their answer)."""
        return {**asdict(self._shipper.stats), "held": self._shipper.held}

    @property
    def sent(self) -> int:
        return self._shipper.stats.sent

    @property
    def resent(self) -> int:
        return self._shipper.stats.resent

    @property
    def acked(self) -> int:
        return self._shipper.stats.acked

    @property
    def refused(self) -> int:
        return self._shipper.stats.refused

    @property
    def dropped(self) -> int:
        return self._shipper.stats.dropped

    @property
    def last_error(self) -> str | None:
        """Why the last connect failed or the last connection broke."""
        return self._shipper.last_error

    @property
    def last_refusal(self) -> dict[str, Any] | None:
        """The daemon's last ``ok: false`` answer (``error``, ``reason``, ``detail``)."""
        return self._shipper.last_refusal

    def _fields_of(self, record: logging.LogRecord) -> dict[str, Any] | None:
        if not self.fields and not self.extra:
            return None
        out = {key: getattr(record, attr, None) for key, attr in self.fields.items()}
        if self.extra is True:
            out.update((k, v) for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and k not in out)
        elif self.extra:
            out.update((k, record.__dict__[k]) for k in self.extra if k in record.__dict__ and k not in out)
        return out
