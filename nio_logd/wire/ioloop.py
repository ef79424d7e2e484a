"""An I/O loop: one thread, one poller (epoll), many non-blocking connections.

design: each loop owns its poller (``poller.Poller``, epoll) and its connections; a handler per
descriptor, called as ``handler(mask)``. Other threads (the writer, the acceptor loop, the main thread) talk
to a loop only through ``call_soon_threadsafe``: a deque plus a wake-up socketpair. In one pass
the loop reads every ready socket, frames and validates what arrived, renders it into a single
``Batch`` and hands that to the writer: one hand-off per pass, not per record. A connection's
acks travel with the batch and come back through ``batch_done`` once the writer has written it,
so they are answered in order and only after the write (or fsync). A burst of new connections is
read as it is accepted (``Connection.read_ahead``), and the first reads that hold a few records
without acks are validated together at the end of the burst (``take_frames``): clients of one
record a connection cost one call into pydantic-core for many, not a cold one each.

Backpressure: when the writer's queue is over its bound the loop drops read interest on every
connection (the kernel then applies TCP flow control to the clients) until the writer calls
``resume_reading``. A pass hands its batch over early once it holds ``pass_limit`` bytes, so
one pass over thousands of ready sockets cannot overshoot the bound by much; a connection whose
unsent acks pile up (a client that does not read them) is not read either. With ``rate_limit``
each connection has a token bucket (records/s, burst one second's worth): frames beyond its
tokens wait in the connection and its read interest is dropped until a timer (``call_later``,
a heap consulted for the select timeout) releases them, so a fast client is slowed, not cut.
The loop sleeps in ``select()`` with no timeout when it has no connections and no timers, so an
idle daemon uses no CPU.

Shutdown (``begin_drain``): stop accepting; every connection is read until it has delivered the
bytes that were in its kernel receive buffer when the drain began (FIONREAD) and then has been
quiet for ``DRAIN_QUIET`` seconds with nothing unread in the kernel (or the client closed, or
half of ``shutdown_timeout`` has passed); those records are written and acked; then the
connection is closed.
"""

from __future__ import annotations

import _socket
import collections
import errno
import fcntl
import functools
import heapq
import os
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Settings
from ..events import get_logger
from ..output.writer import Batch, Writer
from ..records.pipeline import Pipeline, Stream
from ..records.record import Frame, RecordValidator
from ..records.render import Renderer
from ..stats import LoopStats
from .access import OncePer
from .framing import LineFramer
from .poller import READ, WRITE, Poller

if TYPE_CHECKING:
    from .listeners import Listener

log = get_logger()

RECV_BYTES = 64 * 1024
ACCEPTS_PER_EVENT = 256
READ_AHEAD = 2  # reads of a connection just accepted before it is watched: its records, its end
# Answer bytes a connection may owe (made, not yet sent) before it is neither read nor its records
# taken: a refused 2-byte line costs a 130-byte answer, so the bound counts answers, not input.
OUT_LIMIT = 256 << 10
DRAIN_QUIET = 0.2  # at shutdown, a connection silent this long has sent all it is going to
# Connections just accepted whose first read held a few records (without acks) are validated
# together, at most this many connections or bytes at a time (IOLoop.take_frames).
DEFER_FRAMES = 4
DEFER_CONNECTIONS = 64
DEFER_BYTES = 256 << 10


def _bytes_waiting(sock: _socket.socket) -> int:
    """Bytes in the socket's kernel receive buffer (FIONREAD); 0 if the kernel will not say."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(buf, "little", signed=True)


def _peer_name(address: Any, family: int) -> str:
    """The peer as written with its records, from the address accept() returned."""
    if family == socket.AF_UNIX:
        return "unix"
    try:
        host, port = address[:2]
    except (TypeError, ValueError):
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _peer_credentials(sock: _socket.socket) -> tuple[int, int, int] | None:
    """The pid, uid and gid of a Unix socket's peer (SO_PEERCRED, as of its connect()); None if
    the kernel will not say."""
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (OSError, struct.error):
        return None
    return pid, uid, gid


class LoopHost(Protocol):
    """What a loop needs from the server that runs it (``service.server.Server`` is one): a narrow
    view, so that the wire does not import the service layer above it."""

    settings: Settings
    validator: RecordValidator
    writer: Writer
    loops: list[IOLoop]
    connection_factories: dict[Listener, Callable[..., Connection]]
    tls_failures_logged: OncePer

    def make_renderer(self) -> Renderer: ...

    def admit(self, listener: Listener, host: str) -> str | None: ...

    def note_refused_connection(self, reason: str, listener: Listener, peer: str) -> None: ...

    def connection_closed(self, host: str) -> None: ...

    def flush_closed(self) -> None: ...

    def hand_off(self, sock: _socket.socket, listener: Listener, peer: str, host: str) -> bool: ...

    def handed_over(self, *, everything: bool = False) -> list[tuple[_socket.socket, Listener, str, str]]: ...

    def fail(self, component: str, exc: BaseException) -> None: ...


class DeadSocketError(Exception):
    """The accepted socket was already dead (reset before accept): no connection to make."""


class Connection(Stream):
    """One client connection, owned by one loop; as a ``Stream``, the pipeline's view of it."""

    __slots__ = (
        "ack",
        "client",
        "client_host",
        "closed",
        "drain_owed",
        "draining",
        "eof",
        "events",
        "fd",
        "framer",
        "held",
        "held_bytes",
        "in_flight",
        "last_active",
        "listener",
        "loop",
        "mem",
        "out",
        "sock",
        "tokens",
        "tokens_at",
    )

    def __init__(self, loop: IOLoop, sock: _socket.socket, listener: Listener, peer: str, host: str) -> None:
        super().__init__(
            peer, listener.name, ack=listener.settings.ack, reject_tokens=loop.pipeline.rejects_burst, now=loop.now
        )
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.listener = listener
        self.client_host = host
        self.framer = LineFramer(loop.max_record_bytes)
        self.out = bytearray()  # ack lines not yet sent
        self.in_flight = 0  # batches holding our records that the writer has not finished
        self.eof = False
        self.closed = False
        self.draining = False
        self.last_active = loop.now  # adopt() sets the time it was adopted
        self.events = 0
        self.drain_owed = 0  # at shutdown: bytes the kernel held for us when the drain began
        self.tokens = loop.rate_burst  # rate limit: records this connection may send now
        self.tokens_at = self.last_active
        self.held: list[Frame] = []  # frames read but not taken yet: waiting for rate tokens or answer room
        self.held_bytes = 0
        self.mem = 0  # what this connection holds as counted in loop.mem (partial line, held, out)

    def __repr__(self) -> str:
        return f"<Connection {self.peer} on {self.listener.name} seq={self.seq} in_flight={self.in_flight}>"

    def wanted_events(self) -> int:
        events = 0
        if not self.eof and not self.draining and not self.loop.paused and not self.held and self.owed < OUT_LIMIT:
            events |= READ
        if self.out:
            events |= WRITE
        return events

    def update_events(self) -> None:
        if self.closed:
            return
        wanted = self.wanted_events()
        if wanted == self.events:
            return
        sel = self.loop.poller
        if self.events and wanted:
            sel.modify(self.fd, wanted, self.on_event)
        elif wanted:
            sel.register(self.fd, wanted, self.on_event)
        else:
            sel.unregister(self.fd)
        self.events = wanted

    def on_event(self, mask: int) -> None:
        # Interest may have been dropped earlier in this pass (pause, rate limit): then do not read.
        if mask & READ and self.events & READ:
            self.on_readable()
        if mask & WRITE and not self.closed:
            self.flush()

    def read_ahead(self) -> None:
        """Just accepted: read what the client has sent already, before watching the socket. A
        client of one record a connection has often sent it and closed by the time we accept:
        such a connection is served and closed without entering the poller (no epoll_ctl, no wake)."""
        for _ in range(READ_AHEAD):
            if self.closed or self.eof or not self.wanted_events() & READ or not self.on_readable():
                return

    def on_readable(self) -> bool:
        """One read; False if there was nothing to read (the socket would block)."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.loop.stats.read_errors += 1
            log.debug("connection_error", peer=self.peer, error=exc.strerror)
            self.close()
            return True
        loop = self.loop
        self.last_active = loop.now
        if data:
            n = len(data)
            loop.stats.bytes_in += n
            if self.drain_owed > 0:
                self.drain_owed -= n
            frames = self.framer.feed(data)
        else:
            frames = self.framer.eof()
            self.eof = True
        made = False  # whether this read rendered anything
        if frames:
            if loop.rate and not loop.stopping:
                frames = loop.rate_gate(self, frames)
            elif self.held:
                # Older frames wait for answer room (read interest is dropped at the next update):
                # these go behind them, never ahead.
                self.hold(self.held + frames)
                frames = []
            if frames:
                loop.take_frames(self, frames)
                made = True
        if self.closed:
            return True
        self.account()
        if loop.mem > loop.mem_limit:
            loop.shed()
            if self.closed:
                return True
        if self.eof:
            self.finish_if_done()
        if made and loop.pipeline.nbytes >= loop.pass_limit:
            # Hand over early: the writer's bound holds even on a huge pass. Counted in what was
            # rendered, not in what was read: a refused line renders a hundred times its size.
            loop._flush_batch()
        return True

    def account(self) -> None:
        """Bring ``loop.mem`` up to date with what this connection holds now."""
        mem = self.framer.buffered + self.held_bytes + len(self.out)
        self.loop.mem += mem - self.mem
        self.mem = mem

    def hold(self, frames: list[Frame]) -> None:
        """Keep ``frames`` (read, not taken) until the rate limit or the answer room lets them in."""
        self.held = frames
        # Each held frame costs its bytes plus its object and list slot (about 48 bytes in
        # CPython): a read of 64 KiB of 2-byte lines holds 32,768 frames, 1.6 MB, not 64 KiB.
        self.held_bytes = sum(len(f) if isinstance(f, bytes) else len(f.prefix) for f in frames) + 48 * len(frames)

    def finish_if_done(self) -> None:
        """After EOF (or a drain): close once every ack owed has been sent."""
        if self.closed or self.held:
            return
        if not self.ack or not self.owes_acks:
            self.close()
        else:
            self.update_events()

    @property
    def owes_acks(self) -> bool:
        """Answers not yet sent: in the current batch, at the writer, or in the send buffer."""
        return bool(self.out) or self.in_flight > 0 or self.loop.pipeline.pending(self)

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.out += data
        self.flush()

    def flush(self) -> None:
        if self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                log.debug("connection_error", peer=self.peer, error=exc.strerror)
                self.close()
                return
            del self.out[:n]
            if n:
                self.owed -= n
                self.last_active = self.loop.now  # the client reads its answers: not idle
                if self.held and not self.loop.rate and self.owed < OUT_LIMIT // 2:
                    self.loop.release_held(self)  # room for answers again: take what waits
                    if self.closed:
                        return
            self.account()
        if (self.eof or self.draining) and not self.owes_acks and not self.held:
            self.close()
            return
        self.update_events()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        loop.mem -= self.mem
        self.mem = 0
        if self.suppressed:
            loop.pipeline.summarize(self)
        if self.events:
            loop.poller.unregister(self.fd)
            self.events = 0
        try:
            self.sock.close()
        except OSError:
            pass
        self.loop.forget(self)


class IOLoop:
    """A poller loop in its own thread."""

    def __init__(self, server: LoopHost, index: int) -> None:
        self.server = server
        self.index = index
        self.poller = Poller()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.poller.register(self._wake_r.fileno(), READ, self._on_wake)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self.connections: set[Connection] = set()
        self.listeners: list[Listener] = []
        self.paused = False
        self.paused_since = 0.0
        self.stopping = False
        self.now = time.monotonic()
        self.thread: threading.Thread | None = None
        settings = server.settings
        self.idle_timeout = settings.limits.idle_timeout
        self.max_record_bytes = settings.limits.max_record_bytes
        self.pipeline = Pipeline(
            server.validator.validate_batch,
            server.make_renderer(),
            rejects_per_second=settings.log.rejects_per_second,
            refused_close_after=settings.limits.refused_close_after,
            answer_limit=OUT_LIMIT,
        )
        self._next_loop = 0
        self._inbox = -1  # a worker's inbox of connections handed over (add_inbox), on loop 0
        self.stats = LoopStats()
        # Bytes the pass has made (lines, answers: ``pipeline.nbytes``); past pass_limit the batch
        # goes to the writer before the pass ends.
        self.pass_limit = max(RECV_BYTES, min(settings.limits.queue_bytes // 4, 8 << 20))  # budget.pass_limit
        # What the connections hold (partial lines, records read and not taken, unsent answers):
        # past mem_limit the ones holding the most are closed.
        self.mem = 0
        self.mem_limit = max(RECV_BYTES, settings.limits.buffer_bytes // settings.server.io_threads)
        self._shed_logged = -1e9
        self._closed_logged = -1e9
        self.rate = settings.limits.rate_limit  # records/s per connection; 0 = off
        self.rate_burst = max(1.0, self.rate)
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self.drain_until = 0.0
        self._pause_logged = False
        self._pause_logged_at = -1e9
        # While _accept serves a burst of new connections: the frames of those that sent a record
        # or a few, not taken yet (take_frames), and their bytes.
        self._deferred: list[tuple[Connection, list[Frame]]] | None = None
        self._deferred_bytes = 0

    def __repr__(self) -> str:
        return f"<IOLoop {self.index} connections={len(self.connections)} paused={self.paused}>"

    def apply(
        self,
        validate_batch: Callable[[list[Frame]], tuple[list[Any], bytes | None]],
        *,
        idle_timeout: float,
        raw_limit: int,
        max_record_bytes: int,
    ) -> None:
        """Reloaded settings, on the loop's own thread between two passes (nothing half-rendered).

        Record rules and the reject size apply from the next record on, the line limit to new
        connections, the idle timeout at the next sweep.
        """
        self.pipeline.apply(validate_batch, raw_limit)
        self.idle_timeout = idle_timeout
        self.max_record_bytes = max_record_bytes

    # -- thread-safe entry points ---------------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is already pending) or the loop has closed

    def batch_done(self, batch: Batch) -> None:
        """Writer thread: the batch is written; answer its acks on the loop thread."""
        self.call_soon_threadsafe(lambda: self._complete(batch))

    def resume_reading(self) -> None:
        """Writer thread: the queue has drained; read from sockets again."""
        self.call_soon_threadsafe(self._resume)

    # -- the loop -------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=f"nio-logd-io-{self.index}", daemon=True)
        self.thread.start()

    def run(self) -> None:
        select = self.poller.poll
        last_sweep = time.monotonic()
        sweep_every = min(1.0, self.idle_timeout / 4)
        timers = self._timers
        pipeline = self.pipeline
        flush_closed = self.server.flush_closed
        try:
            while True:
                timeout: float | None = None
                if self.stopping:
                    if not self.connections:
                        break
                    timeout = 0.05
                elif self.connections:
                    timeout = sweep_every
                if timers:
                    wait = max(0.0, timers[0][0] - time.monotonic())
                    timeout = wait if timeout is None else min(timeout, wait)
                events = select(timeout)
                self.now = time.monotonic()
                pipeline.new_pass()
                for handler, mask in events:
                    try:
                        handler(mask)
                    except Exception:  # noqa: BLE001 - one connection's bug must not end the loop
                        self._handler_failed(handler)
                if timers:
                    self._run_timers()
                # The pass's closes come off the counts the worker processes share before its
                # batch goes out: once its records are written, another worker admits as if
                # those connections had never been.
                flush_closed()
                self._flush_batch()
                while self._calls:
                    self._calls.popleft()()
                self._flush_batch()
                if self.stopping:
                    self._drain_check()
                elif self.now - last_sweep >= sweep_every:
                    last_sweep = self.now
                    self._sweep_idle()
                flush_closed()
        except Exception as exc:  # noqa: BLE001 - a loop that dies takes the daemon down, loudly
            try:
                self._flush_batch()  # what was rendered is written (not acked: its connections close)
            except Exception:  # noqa: BLE001, S110 - already failing; the first error is the one reported
                pass
            self.server.fail(f"I/O loop {self.index}", exc)
        finally:
            for conn in list(self.connections):
                conn.close()
            self.poller.close()
            self._wake_r.close()
            self._wake_w.close()
            self.server.flush_closed()

    # -- timers (loop thread only) ----------------------------------------------------------------
    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread ``delay`` seconds from now."""
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, fn))

    def _run_timers(self) -> None:
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            heapq.heappop(timers)[2]()

    def _each(self, fn: Callable[[Connection], None]) -> None:
        """Apply ``fn`` to every connection; one connection's failure closes it, not the loop."""
        for conn in list(self.connections):
            try:
                fn(conn)
            except Exception:  # noqa: BLE001 - the same rule as for event handlers
                self._handler_failed(conn.on_event)

    def _handler_failed(self, handler: Callable[[int], None]) -> None:
        """An unexpected error in one handler: log it, close that connection, keep serving."""
        self.stats.handler_errors += 1
        conn = getattr(handler, "__self__", None)
        log.exception(
            "handler_failed",
            loop=self.index,
            connection=repr(conn),
            action="closing the connection" if isinstance(conn, Connection) else "continuing",
        )
        if isinstance(conn, Connection):
            conn.close()

    def _on_wake(self, _mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # -- accepting --------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)
        self.poller.register(listener.sock.fileno(), READ, lambda _mask: self._accept(listener))

    def _accept(self, listener: Listener, *, draining: bool = False) -> None:
        server = self.server
        # socket.accept() is the C method _accept() and a socket object made from the descriptor,
        # but it asks the listener for its family and type as enums each time: a third of its cost
        # a connection. The same two steps here, with the family read once (typeshed omits _accept).
        accept: Callable[[], tuple[int, Any]] = listener.sock._accept  # type: ignore[attr-defined]
        family = listener.family
        # A plain connection needs only the C socket type (recv, send, close): socket.socket adds a
        # Python __init__ and close() around it, a tenth of the loop's work for a one-record
        # client. A TLS listener's sockets are wrapped by the ssl module, which wants the full type.
        make_socket: Callable[[int, int, int, int], _socket.socket] = (
            socket.socket if listener in server.connection_factories else _socket.socket
        )
        # The records of the connections this burst reads ahead are validated together
        # (take_frames), not one cold call into pydantic-core a connection; not while draining,
        # where each block of the backlog is a pass of its own.
        if not draining:
            self._deferred = []
        try:
            self._accept_burst(listener, accept, family, make_socket, draining=draining)
        finally:
            self._take_deferred(end=True)

    def _accept_burst(
        self,
        listener: Listener,
        accept: Callable[[], tuple[int, Any]],
        family: int,
        make_socket: Callable[[int, int, int, int], _socket.socket],
        *,
        draining: bool,
    ) -> None:
        server = self.server
        # At shutdown (draining) the whole backlog is taken, into this loop: those clients
        # connected, and may have sent records, before the stop.
        for i in range(1 << 16 if draining else ACCEPTS_PER_EVENT):
            if draining and not i % ACCEPTS_PER_EVENT:
                self.pipeline.new_pass()  # the whole backlog is one pass: a timestamp per 256 of it
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    return  # the listener itself is closed (shutdown): not a connection's error
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.stats.accept_errors += 1
                    log.error(
                        "accept_failed",
                        listener=listener.name,
                        error=exc.strerror,
                        action="stopping" if draining else "pausing accepts for 0.5 s",
                    )
                    if not draining:
                        self._pause_accepting(listener, 0.5)
                    return
                # accept(2) also passes on a pending network error of the new connection (EPROTO,
                # ENETUNREACH, EPERM from a firewall, ...): that connection is gone, the listener is not.
                self.stats.accept_errors += 1
                log.warning("accept_failed", listener=listener.name, error=exc.strerror, action="skipped")
                continue
            try:
                sock = make_socket(family, socket.SOCK_STREAM, 0, fd)
            except OSError as exc:  # its validation (getsockname) failed: the descriptor is closed, not kept
                os.close(fd)
                self.stats.accept_errors += 1
                log.warning("accept_failed", listener=listener.name, error=exc.strerror, action="skipped")
                continue
            peer = _peer_name(address, family)
            host = peer.rpartition(":")[0] if family != socket.AF_UNIX else "unix"
            refusal = server.admit(listener, host)
            if refusal:
                self.stats.connections_refused += 1
                by_reason = self.stats.connections_refused_by_reason
                by_reason[refusal] = by_reason.get(refusal, 0) + 1
                server.note_refused_connection(refusal, listener, peer)
                try:
                    sock.close()
                except OSError:
                    pass
                continue
            sock.setblocking(False)
            if family != socket.AF_UNIX and (listener.settings.ack or listener.settings.tls is not None):
                # Answers and TLS handshakes go out at once; a listener without acks sends nothing.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not draining and family != socket.AF_UNIX and server.hand_off(sock, listener, peer, host):
                self.stats.connections_handed_off += 1
                continue  # to a worker process that holds fewer (SO_REUSEPORT's hash is uneven)
            self._dispatch(sock, listener, peer, host, draining=draining)

    def _dispatch(self, sock: _socket.socket, listener: Listener, peer: str, host: str, *, draining: bool) -> None:
        """A new connection to this process's loops in turn (to this one while draining)."""
        loops = self.server.loops
        target = self if draining else loops[self._next_loop % len(loops)]
        self._next_loop += 1
        if target is self:
            self.adopt(sock, listener, peer, host, draining=draining)
        else:
            target.call_soon_threadsafe(functools.partial(target.adopt, sock, listener, peer, host))

    def add_inbox(self, fd: int) -> None:
        """Connections other worker processes hand over to this one arrive on ``fd``."""
        self._inbox = fd
        self.poller.register(fd, READ, lambda _mask: self._take_handed_over())

    def _take_handed_over(self, *, draining: bool = False) -> None:
        for sock, listener, peer, host in self.server.handed_over(everything=draining):
            self._dispatch(sock, listener, peer, host, draining=draining)

    def _pause_accepting(self, listener: Listener, seconds: float) -> None:
        """Out of file descriptors: stop accepting for a while instead of spinning on EMFILE."""
        self.poller.unregister(listener.sock.fileno())

        def accept_again() -> None:
            if not self.stopping:
                self.poller.register(listener.sock.fileno(), READ, lambda _mask: self._accept(listener))

        self.call_later(seconds, accept_again)

    def adopt(self, sock: _socket.socket, listener: Listener, peer: str, host: str, *, draining: bool = False) -> None:
        """Take a freshly accepted socket into this loop."""
        if self.stopping and not draining:
            sock.close()
            self.server.connection_closed(host)
            return
        try:
            conn = self.server.connection_factories.get(listener, Connection)(self, sock, listener, peer, host)
        except DeadSocketError:
            # Reset before we could accept it (a health check's RST): nothing to serve, no slot kept.
            self.stats.accept_dead += 1
            try:
                sock.close()
            except OSError:
                pass
            self.server.connection_closed(host)
            return
        if listener.family == socket.AF_UNIX:
            conn.credentials = _peer_credentials(sock)  # written with each record: "peer_pid", ...
        conn.last_active = self.now = time.monotonic()
        self.connections.add(conn)
        self.stats.connections_total += 1
        try:
            conn.read_ahead()
        except Exception:  # noqa: BLE001 - as in an event handler: this connection closes, the loop goes on
            self._handler_failed(conn.on_event)
            return
        conn.update_events()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.pipeline.forget(conn)
        self.server.connection_closed(conn.client_host)

    # -- records --------------------------------------------------------------------------------
    def take_frames(self, conn: Connection, frames: list[Frame]) -> None:
        """Hand the frames of one read to the pipeline; keep what it could not take yet.

        In a burst of accepts (``_deferred`` is a list), the first read of a connection without
        acks that holds a few whole records waits, and the records of up to DEFER_CONNECTIONS such
        connections are taken in one call (``Pipeline.take_many``) when the burst ends, or when
        the list is full: one validation call for many one-record clients instead of a cold one
        each. They are rendered in the same pass, before its batch goes to the writer."""
        deferred = self._deferred
        if deferred is not None and not conn.ack and len(frames) <= DEFER_FRAMES:
            size = 0
            for frame in frames:
                if type(frame) is not bytes:
                    break  # a TooLarge: taken now, as any other read
                size += len(frame)
            else:
                deferred.append((conn, frames))
                self._deferred_bytes += size
                if len(deferred) >= DEFER_CONNECTIONS or self._deferred_bytes >= DEFER_BYTES:
                    self._take_deferred()
                return
        if deferred:
            self._take_deferred()  # this connection's earlier frames may wait there: they go first
            if conn.closed or conn.closing:
                return  # those earlier frames had it closed for refusals: nothing more is taken
        self._taken(conn, frames, self.pipeline.take(conn, frames, self.now))

    def _taken(self, conn: Connection, frames: list[Frame], taken: int) -> None:
        """After the pipeline took ``taken`` of a read's ``frames``."""
        if conn.closing:
            self._close_refusing(conn)
        elif taken < len(frames):
            conn.hold(frames[taken:] + conn.held)  # no room for more answers: wait, unread
            conn.update_events()  # and read no more until there is

    def _take_deferred(self, *, end: bool = False) -> None:
        """Take the frames the burst deferred (take_frames); ``end``: the burst is over.

        One validation call for all of them; should it fail (a bug), each read is taken alone
        instead, as it would have been without the wait, so that only a read that fails on its
        own costs its connection (closed, as a failing handler's is), not its neighbours'."""
        deferred = self._deferred
        if end:
            self._deferred = None
        elif deferred is not None:
            self._deferred = []
        self._deferred_bytes = 0
        if not deferred:
            return
        pipeline = self.pipeline
        per_read: list[list[Any]] | None
        try:
            per_read = pipeline.validate_reads([frames for _conn, frames in deferred])
        except Exception:  # noqa: BLE001 - taken one by one below, where a failure is reported
            per_read = None
        for i, (conn, frames) in enumerate(deferred):
            try:
                if per_read is None:
                    taken = 0 if conn.closing else pipeline.take(conn, frames, self.now)
                else:
                    taken = pipeline.take_validated(conn, per_read[i], self.now)
            except Exception:  # noqa: BLE001 - as in an event handler: this connection closes, the rest go on
                self._handler_failed(conn.on_event)
                continue
            if conn.closed:
                # It ended (its client closed, or it was closed for refusals by an earlier read of
                # this list) before these records were taken: what a close does for the pipeline
                # (the summary of its suppressed reject lines) is done now.
                pipeline.summarize(conn)
                continue
            self._taken(conn, frames, taken)

    def _close_refusing(self, conn: Connection) -> None:
        closed = self.stats.records.closed_refused_records + 1  # this pass's count is added at hand-off
        if self.now - self._closed_logged >= 1.0:  # a flood of such clients cannot flood the journal
            self._closed_logged = self.now
            log.warning(
                "connection_closed",
                reason="refused_records",
                peer=conn.peer,
                listener=conn.listener.name,
                records=conn.seq,
                refused=conn.refused,
                refused_close_after=self.pipeline.refused_close_after,
                closed_so_far=closed,
            )
        conn.close()

    def release_held(self, conn: Connection) -> None:
        """Take the frames a connection holds (as far as its answer room allows)."""
        frames = conn.held
        conn.hold([])
        self.take_frames(conn, frames)
        if conn.closed:
            return
        conn.account()
        if not conn.held and conn.eof:
            conn.finish_if_done()

    def shed(self) -> None:
        """Over ``buffer_bytes``: close the connections holding the most until back under it."""
        target = self.mem_limit * 9 // 10  # a little room, so that the next read does not shed again
        closed = 0
        biggest = 0
        for conn in sorted(self.connections, key=lambda c: c.mem, reverse=True):
            if self.mem <= target or not conn.mem:
                break
            biggest = max(biggest, conn.mem)
            conn.close()
            closed += 1
        self.stats.closed_buffer_bytes += closed
        if closed and self.now - self._shed_logged >= 1.0:
            self._shed_logged = self.now
            log.warning(
                "connections_closed",
                reason="buffer_bytes",
                count=closed,
                largest_bytes=biggest,
                limit_bytes=self.mem_limit,
                closed_so_far=self.stats.closed_buffer_bytes,
                action="closed the connections holding the most unfinished lines and unsent answers",
            )

    def _flush_batch(self) -> None:
        pipeline = self.pipeline
        if not pipeline.nbytes:
            return
        out = pipeline.outcome()
        self.stats.records.add(out.counts)
        for conn in out.answers:
            conn.in_flight += 1
        batch = Batch(
            self,
            out.messages,
            out.accepted,
            rejects=out.rejects,
            refused=out.reject_lines,
            acks=out.answers or None,
            answer_bytes=out.answer_bytes,
        )
        if self.server.writer.submit(batch) and not self.paused:
            self._pause()

    # -- rate limit --------------------------------------------------------------------------------
    def rate_gate(self, conn: Connection, frames: list[Frame]) -> list[Frame]:
        """The frames ``conn``'s token bucket covers now; the rest wait in ``conn.held`` (not read)."""
        if conn.held:  # keep the order: nothing may overtake frames already waiting
            conn.hold(conn.held + frames)
            return []
        now = self.now
        tokens = min(self.rate_burst, conn.tokens + (now - conn.tokens_at) * self.rate)
        conn.tokens_at = now
        n = len(frames)
        if n <= tokens:
            conn.tokens = tokens - n
            return frames
        allowed = max(0, int(tokens))
        conn.tokens = tokens - allowed
        conn.hold(frames[allowed:])
        self.stats.rate_limited += 1
        conn.update_events()  # no more reading until the bucket refills: TCP slows the client down
        self._schedule_release(conn)
        return frames[:allowed]

    def _schedule_release(self, conn: Connection) -> None:
        need = min(len(conn.held), self.rate_burst)
        self.call_later(max(0.001, (need - conn.tokens) / self.rate), functools.partial(self._release, conn))

    def _release(self, conn: Connection) -> None:
        """Timer: let a rate-limited connection's waiting frames through as its tokens allow."""
        if conn.closed or not conn.held:
            return
        now = time.monotonic()
        tokens = min(self.rate_burst, conn.tokens + (now - conn.tokens_at) * self.rate)
        conn.tokens_at = now
        allowed = int(tokens)
        if allowed > 0:
            frames = conn.held[:allowed]
            conn.hold(conn.held[allowed:])
            conn.tokens = tokens - len(frames)
            conn.last_active = now  # waiting for tokens is not the client's idleness
            self.take_frames(conn, frames)
            if conn.closed:
                return
            conn.account()
        else:
            conn.tokens = tokens
        if conn.held:
            self._schedule_release(conn)
        elif conn.eof:
            conn.finish_if_done()
        else:
            conn.update_events()

    def _complete(self, batch: Batch) -> None:
        if not batch.acks:
            return
        for conn, answers in batch.acks.items():
            conn.in_flight -= 1
            conn.send(b"".join(answers))
        if self.mem > self.mem_limit:
            self.shed()

    # -- backpressure ----------------------------------------------------------------------------
    def _pause(self) -> None:
        self.paused = True
        self.paused_since = time.monotonic()
        self.stats.pauses += 1
        self._pause_logged = False
        self._each(Connection.update_events)
        # Under a steady overload pauses come many times a second: log an edge at most once a
        # second, and a pause that outlasts that second in any case (metrics count every one).
        if self.paused_since - self._pause_logged_at >= 1.0:
            self._log_pause()
        else:
            pause_number = self.stats.pauses
            self.call_later(1.0, lambda: self._log_pause(pause_number))

    def _log_pause(self, pause_number: int = 0) -> None:
        if not self.paused or self._pause_logged or (pause_number and pause_number != self.stats.pauses):
            return
        self._pause_logged = True
        self._pause_logged_at = time.monotonic()
        writer = self.server.writer
        log.warning(
            "reading_paused",
            loop=self.index,
            queue_bytes=writer.depth,
            queue_limit=writer.high_water,
            pauses=self.stats.pauses,
            reason="the writer is behind; clients wait in TCP",
        )

    def _resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        paused_for = time.monotonic() - self.paused_since
        self.stats.paused_seconds += paused_for
        if self._pause_logged or paused_for >= 1.0:
            log.info("reading_resumed", loop=self.index, paused_seconds=round(paused_for, 3), pauses=self.stats.pauses)
        now = self.now

        def resume(conn: Connection) -> None:
            conn.last_active = now  # time spent paused is not the client's idleness
            conn.update_events()

        self._each(resume)

    def paused_seconds(self) -> float:
        """Seconds spent paused by backpressure, the current pause included (any thread)."""
        total = self.stats.paused_seconds
        since = self.paused_since
        if self.paused:
            total += max(0.0, time.monotonic() - since)
        return total

    def _sweep_idle(self) -> None:
        if self.paused or self.stopping:
            return
        deadline = self.now - self.idle_timeout
        # A client that neither sends nor reads its answers for idle_timeout is idle too: otherwise
        # it would hold its connection and up to OUT_LIMIT of answers for as long as TCP lets it.
        idle = [c for c in self.connections if c.last_active < deadline]
        for conn in idle:
            # Waiting on us (the writer, rate tokens) is not idleness; waiting for room for
            # answers its client does not read is.
            if conn.in_flight or (conn.held and conn.owed < OUT_LIMIT):
                continue

            self.stats.idle_closed += 1
            log.info("idle_closed", peer=conn.peer, listener=conn.listener.name, idle_timeout=self.idle_timeout)
            conn.close()

    # -- shutdown ---------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Stop accepting; keep reading what clients already sent; finish acks; then the loop ends.

        A connection is read until it has delivered the bytes its kernel buffer held now, and then
        until it is quiet for DRAIN_QUIET seconds (or closes); past ``drain_until`` only the bytes
        held now are still read. Backpressure still applies, so memory stays bounded.
        """
        self.stopping = True
        for listener in self.listeners:
            if listener.sock.fileno() < 0:
                continue  # closed already (a forced stop): nothing to accept, nothing to unregister
            try:
                self.poller.unregister(listener.sock.fileno())
            except (KeyError, ValueError):
                pass  # accepting was paused (EMFILE)
            try:
                self._accept(listener, draining=True)
            except OSError as exc:
                log.error("accept_failed", listener=listener.name, error=exc.strerror, action="stopping")
        if self._inbox >= 0:
            # No worker sends here once this one has stopped taking (under the counts' lock): what
            # was sent before is in the inbox, and is served like the backlog.
            self.poller.unregister(self._inbox)
            self._take_handed_over(draining=True)
        self.now = time.monotonic()
        self.drain_until = self.now + self.server.settings.server.shutdown_timeout / 2
        self._each(self._drain_one)
        self._flush_batch()
        self._drain_check()

    def _drain_one(self, conn: Connection) -> None:
        if conn.held:  # frames received before the stop are written now (as far as answer room allows)
            self.release_held(conn)
            if conn.closed:
                return
        if conn.eof:
            conn.finish_if_done()
        else:
            conn.drain_owed = _bytes_waiting(conn.sock)
            conn.update_events()

    def _drain_check(self) -> None:
        """While stopping: stop reading connections that have sent everything they are going to."""
        quiet_before = self.now - DRAIN_QUIET
        late = self.now >= self.drain_until
        dropped = 0
        for conn in list(self.connections):
            if conn.draining or conn.eof or conn.closed:
                continue
            if not late and conn.drain_owed > 0:
                continue  # bytes that were waiting when the drain began: they are read first
            # Quiet, and nothing unread in the kernel (a paused loop leaves bytes there): done.
            if late or (conn.last_active <= quiet_before and not _bytes_waiting(conn.sock)):
                conn.draining = True
                if conn.framer.buffered:
                    dropped += 1
                conn.finish_if_done()
                if not conn.closed:
                    conn.flush()
        if dropped:
            self.stats.incomplete_dropped += dropped
            log.warning(
                "incomplete_records_dropped",
                loop=self.index,
                count=dropped,
                reason="no newline and no end of stream when the daemon stopped",
            )

    def force_close(self) -> None:
        for conn in list(self.connections):
            conn.close()
        self.stopping = True
