"""The server: listeners, I/O loops and the writer, with named lifecycle phases.

startup() opens the log files and binds the sockets (raising StartupError with the reason);
start() runs the threads; shutdown() stops accepting, drains against a deadline, writes
everything received and then closes. The CLI (``runner``) owns signals and process concerns.
"""

from __future__ import annotations

import _socket
import functools
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Settings, TLSSettings
from ..errors import StartupError
from ..events import get_logger
from ..output.writer import Writer
from ..records.record import RecordValidator
from ..records.render import Renderer
from ..stats import LoopStats, Stats
from ..wire.access import AllowList, OncePer
from ..wire.ioloop import IOLoop
from ..wire.listeners import Listener, bind, copies, describe
from ..wire.tls import ConnectionFactory, connection_factory, server_context
from .admission import SharedCounts
from .handoff import Handoff
from .privilege import Identity
from .workers import WorkerPool

if TYPE_CHECKING:  # imported where used: a daemon without [[forward]] or [metrics] loads neither
    from ..forward import Forwarder  # (nats-py, the reader) nor prometheus_client: megabytes of RSS a process
    from .metrics import MetricsServer

log = get_logger()


def _open_failure(exc: OSError, files: list[Path]) -> str:
    """Name the log file that could not be opened, also when it was its folder that failed."""
    failed = Path(str(exc.filename)) if exc.filename is not None else None
    for path in files:
        if failed == path:
            break
        if failed is not None and failed in path.parents:
            return f"cannot open log file {path}: cannot create its folder {failed}: {exc.strerror}"
    return f"cannot open log file {exc.filename}: {exc.strerror}"


def _tls_files(tls: TLSSettings, resolve: Callable[[str], Path]) -> dict[str, bytes]:
    """The bytes of a TLS listener's files, read now (as root, before the drop) for the workers."""
    files = {"cert": tls.cert, "key": tls.key, "ca": tls.ca}
    return {label: resolve(name).read_bytes() for label, name in files.items() if name is not None}


class Server:
    """Everything that serves: the listeners, the I/O loops and the writer.

    Three shapes. ``workers == 1`` (the default): one process, loops and writer. ``workers > 1``
    (the hub): the writer, the metrics and the worker processes (``WorkerPool``), no loops. A
    worker's (``writer`` given: a ``RemoteWriter``): loops only, on the hub's sockets (``adopt``).
    """

    def __init__(self, settings: Settings, *, workers: int = 1, writer: Writer | None = None) -> None:
        self.settings = settings
        self.validator = RecordValidator(settings.record, settings.limits.max_record_bytes)
        log_settings = settings.log
        self.workers = workers
        self.pool: WorkerPool | None = None
        self.in_worker = writer is not None
        # A worker's connection counts, shared with the other workers (set by the worker).
        self.shared: SharedCounts | None = None
        self.worker_index = 0
        self.handoff: Handoff | None = None  # a worker's moves of connections to lighter workers
        self.writer = (
            writer
            if writer is not None
            else Writer(
                settings.resolve(log_settings.path),
                settings.resolve(log_settings.rejects_path),
                mode=settings.file_mode,
                fsync=log_settings.durability == "fsync",
                fsync_max_wait=log_settings.fsync_max_wait,
                queue_bytes=settings.limits.queue_bytes,
                rotate_bytes=log_settings.rotate_bytes,
                rotate_keep=log_settings.rotate_keep,
                cache_bytes=log_settings.cache_bytes,
            )
        )
        self.writer.on_fatal = self.fail
        self.forwarders: list[Forwarder] = []  # one per [[forward]] table, in the process that owns the files
        self.metrics: MetricsServer | None = None
        self.metrics_error: str | None = None  # [metrics] could not be served (socket activation)
        self.stopping = False
        self.listeners: list[Listener] = []
        self.loops: list[IOLoop] = []
        self._conn_lock = threading.Lock()
        self.open_connections = 0
        self._per_client: dict[str, int] = {}  # open connections by client host (none: no key)
        # A worker's: the client address of each connection closed and not yet off the shared counts.
        self._closed_hosts: list[str] = []
        self.started_at = time.time()
        self._refusal_logged: dict[str, float] = {}
        # Per listener name: how its connections are made (TLS) and who may connect (allow).
        # Keyed by the listener itself, not its configured address: two listeners may both be
        # configured as port 0, and only one of them has TLS.
        self.connection_factories: dict[Listener, ConnectionFactory] = {}
        self._allow: dict[Listener, AllowList] = {}
        # The first error that escaped a loop or the writer (a bug): the daemon stops, exit 1.
        self.fatal: str | None = None
        self.on_fatal: Callable[[], None] | None = None
        self.not_allowed_logged = OncePer(60.0)  # a refused address is logged once a minute
        self.tls_failures_logged = OncePer(60.0)  # a failed handshake: once a minute per address

    def __repr__(self) -> str:
        return f"<Server listeners={[listener.name for listener in self.listeners]} loops={len(self.loops)}>"

    def make_renderer(self) -> Renderer:
        return Renderer(self.settings.log.reject_raw_bytes)

    # -- lifecycle ---------------------------------------------------------------------------------
    def startup(self) -> None:
        """Open the files and bind the sockets; raise StartupError naming what failed."""
        settings = self.settings
        # Certificates and keys are read here, before binding and before privileges are dropped.
        contexts = {id(ls): server_context(ls.tls, settings.resolve, ls.address) for ls in settings.listeners if ls.tls}
        try:
            self.writer.open()
        except OSError as exc:
            raise StartupError(_open_failure(exc, [self.writer.messages.path, self.writer.rejects.path])) from None
        if not self.in_worker:
            self._make_forwarders()
        self.listeners = bind(self.settings, reuse_port=self.workers > 1)
        if self.workers > 1:
            try:
                tls = {id(ls): _tls_files(ls.tls, settings.resolve) for ls in settings.listeners if ls.tls}
                per_listener = [copies(listener, self.workers) for listener in self.listeners]
            except (OSError, StartupError) as exc:
                for listener in self.listeners:
                    listener.close()
                if isinstance(exc, StartupError):
                    raise
                raise StartupError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
            sets = [[mine[i] for mine in per_listener] for i in range(self.workers)]
            counts = SharedCounts.create(self.workers, settings.limits.max_connections)
            self.pool = WorkerPool(settings, self.writer, sets, tls, self.fail, counts=counts)
        else:
            self.adopt(self.listeners, contexts)
        if self.settings.metrics.address:
            from .metrics import MetricsServer

            try:
                self.metrics = MetricsServer(self, self.settings.metrics.address)
            except StartupError as exc:
                if any(listener.inherited for listener in self.listeners):
                    # Socket-activated (the shipped unit has no network of its own): the clients
                    # systemd holds for us are served all the same, and the journal says why
                    # there are no metrics. Failing would make systemd retry until the socket
                    # unit itself fails, and the waiting clients' records would be lost.
                    self.metrics_error = str(exc)
                    log.error(
                        "metrics_unavailable",
                        error=str(exc),
                        action="serving without [metrics]; use nio-logd.service for metrics",
                    )
                else:
                    for listener in self.listeners:
                        listener.close()
                    raise

    def adopt(self, listeners: list[Listener], contexts: dict[int, ssl.SSLContext] | None = None) -> None:
        """Serve ``listeners`` with this process's loops (a worker: the hub's sockets, whose TLS
        factories it has set up already)."""
        self.listeners = listeners
        for listener in listeners:
            context = (contexts or {}).get(id(listener.settings))
            if context is not None:
                self.connection_factories[listener] = connection_factory(context)
            if listener.settings.allow:
                self._allow[listener] = AllowList(listener.settings.allow)
        self.loops = [IOLoop(self, i) for i in range(self.settings.server.io_threads)]
        for listener in listeners:
            self.loops[0].add_listener(listener)

    def enable_handoff(self, handoff: Handoff) -> None:
        """A worker: hand connections over to lighter workers, and take those sent here (loop 0)."""
        self.handoff = handoff
        self.loops[0].add_inbox(handoff.fileno())

    def hand_off(self, sock: _socket.socket, listener: Listener, peer: str, host: str) -> bool:
        """Send a connection just admitted here, nothing read from it, to a lighter worker; True
        if it went (it is then neither open nor counted here)."""
        handoff = self.handoff
        if handoff is None or self.stopping or not handoff.offer(sock, listener, peer, host):
            return False
        with self._conn_lock:
            self.open_connections -= 1
        return True

    def handed_over(self, *, everything: bool = False) -> list[tuple[_socket.socket, Listener, str, str]]:
        """The connections other workers sent here, now counted as open here; with ``everything``
        (draining) this worker first stops taking more, then empties its inbox."""
        handoff = self.handoff
        if handoff is None:
            return []
        if everything:
            handoff.taking(False)
        arrived = handoff.receive(everything=everything)
        if arrived:
            with self._conn_lock:
                self.open_connections += len(arrived)
        return arrived

    def _make_forwarders(self) -> None:
        """One forwarder per ``[[forward]]`` table, its cursor read while the files are quiet."""
        settings = self.settings
        if not settings.forward:
            return
        from ..forward import Forwarder

        log_path = self.writer.messages.path
        for table in settings.forward:
            forwarder = Forwarder(
                table,
                log_path,
                settings.forward_cursor(table),
                settings.resolve,
                on_acked=self.writer.gate_moved if table.ack_after else None,
            )
            forwarder.prepare()
            self.forwarders.append(forwarder)
            self.writer.watchers.append(forwarder.wake)
        if self.forwarders:
            forwarders = list(self.forwarders)
            self.writer.may_drop = lambda ident: all(f.may_drop(ident) for f in forwarders)
        gated = [f for f in self.forwarders if f.settings.ack_after]
        if gated:
            self.writer.ack_gate = lambda: min(f.acked_writer_records for f in gated)

    def start_workers(self, identity: Identity | None) -> None:
        """The hub: start the worker processes now (the privilege drop calls this just before the
        hub drops: each worker becomes ``identity`` itself, once it has read its bootstrap)."""
        if self.pool is not None:
            self.pool.spawn(identity)

    def start(self) -> None:
        self.writer.start()
        for forwarder in self.forwarders:
            forwarder.start()
        for loop in self.loops:
            loop.start()
        if self.pool is not None:
            self.pool.start()
        if self.in_worker:
            return  # the hub says where it listens
        for listener in self.listeners:
            log.info(
                "listening",
                address=describe(listener),
                ack=listener.settings.ack,
                tls=listener.settings.tls is not None,
            )
        if self.metrics is not None:
            self.metrics.start()

    def fail(self, component: str, exc: BaseException) -> None:
        """``component`` (a thread) died of ``exc``: health fails and the daemon stops, exit 1."""
        reason = f"{component} failed: {type(exc).__name__}: {exc}"
        log.error(
            "fatal",
            component=component,
            error=reason,
            exc_info=exc,
            action="stopping: writing what was received, then exit 1",
        )
        if self.fatal is None:
            self.fatal = reason
        if self.on_fatal is not None:
            self.on_fatal()

    def addresses(self) -> list[str]:
        return [describe(listener) for listener in self.listeners]

    def shutdown(self, timeout: float | None = None, force: threading.Event | None = None) -> bool:
        """Drain and stop; True if everything received was written within the time allowed."""
        timeout = self.settings.server.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.stopping = True
        for loop in self.loops:
            loop.call_soon_threadsafe(loop.begin_drain)
        clean = True
        for loop in self.loops:
            assert loop.thread is not None
            while loop.thread.is_alive() and time.monotonic() < deadline:
                if force is not None and force.is_set():
                    break
                loop.thread.join(0.05)
            if loop.thread.is_alive():
                clean = False
                loop.call_soon_threadsafe(loop.force_close)
                loop.thread.join(2.0)
        if self.pool is not None:
            # The workers drain against the same deadline; the writer runs until they are done.
            clean = self.pool.stop(deadline + 1.0, force) and clean
            for sockets in self.pool.listener_sets:
                for listener in sockets:
                    if listener not in self.listeners:
                        listener.close()
        for listener in self.listeners:
            listener.close()
        left = max(0.5, deadline - time.monotonic())
        written = self.writer.stop(left if force is None or not force.is_set() else 0.5)
        for forwarder in self.forwarders:
            # What is written goes out within the time left (at least a moment); the cursor keeps the rest.
            forwarder.stop(0.5 if force is not None and force.is_set() else max(1.0, deadline - time.monotonic()))
        if self.metrics is not None:
            self.metrics.close()
        return clean and written and self.fatal is None

    # -- connection admission ------------------------------------------------------------------------
    def admit(self, listener: Listener, host: str) -> str | None:
        """None if a new connection may proceed, else why not (it is then closed and counted)."""
        if listener.settings.allow and not self._allow[listener].permits(host):
            return "not_allowed"
        limits = self.settings.limits
        shared = self.shared
        if shared is not None:  # a worker: the limits hold for all the workers together
            with shared:
                refusal = shared.admit(
                    self.worker_index,
                    host,
                    limits.max_connections,
                    limits.max_connections_per_client,
                    self._take_closed(),
                )
            if refusal:
                return refusal
            with self._conn_lock:
                self.open_connections += 1
            return None
        with self._conn_lock:
            if self.open_connections >= limits.max_connections:
                return "max_connections"
            open_now = self._per_client.get(host, 0)
            if limits.max_connections_per_client and open_now >= limits.max_connections_per_client:
                return "max_connections_per_client"
            self.open_connections += 1
            self._per_client[host] = open_now + 1
        return None

    def connection_closed(self, host: str) -> None:
        if self.shared is not None:
            # Taken off the shared counts by the next admission or by the loop's pass end
            # (flush_closed), under the lock that takes anyway; this worker's own count is exact.
            with self._conn_lock:
                self._closed_hosts.append(host)
                self.open_connections -= 1
            return
        with self._conn_lock:
            self.open_connections -= 1
            left = self._per_client.pop(host, 1) - 1
            if left > 0:
                self._per_client[host] = left

    def flush_closed(self) -> None:
        """A loop's pass is over: the connections closed since the last admission come off the
        counts the workers share, so that no other worker refuses a client for them."""
        if not self._closed_hosts or self.shared is None:
            return
        with self.shared:
            self.shared.close_many(self.worker_index, self._take_closed())

    def _take_closed(self) -> list[str]:
        """The closes waiting to come off the shared counts (the caller holds their lock)."""
        with self._conn_lock:
            closed, self._closed_hosts = self._closed_hosts, []
        return closed

    def note_refused_connection(self, reason: str, listener: Listener, peer: str) -> None:
        if reason == "not_allowed":
            # Once per address per minute, with how many were not logged: a flood cannot fill the journal.
            host = peer.rpartition(":")[0]
            muted = self.not_allowed_logged.check(host)
            if muted is not None:
                log.warning(
                    "connection_refused",
                    reason=reason,
                    listener=listener.name,
                    peer=peer,
                    allow=list(listener.settings.allow),
                    not_logged_since=muted,
                )
            return
        # Logged at most once per second per reason, so a flood cannot fill the journal.
        now = time.monotonic()
        last = self._refusal_logged.get(reason, 0.0)
        if now - last >= 1.0:
            self._refusal_logged[reason] = now
            log.warning(
                "connection_refused",
                reason=reason,
                listener=listener.name,
                peer=peer,
                limit=getattr(self.settings.limits, reason),
            )

    # -- observation ---------------------------------------------------------------------------------
    def snapshot(self) -> Stats:
        """Counters summed over the loops, and the writer's (read without locks: plain ints)."""
        totals = LoopStats()
        now = time.monotonic()
        paused_loops = 0
        paused_seconds = paused_now = 0.0
        threads_alive = self.writer.alive or not self.loops
        for loop in self.loops:
            totals.add(loop.stats)
            paused_seconds += loop.paused_seconds()
            if loop.paused:
                paused_loops += 1
                paused_now = max(paused_now, now - loop.paused_since)
            threads_alive = threads_alive and loop.thread is not None and loop.thread.is_alive()
        connections = self.open_connections
        buffered = sum(loop.mem for loop in self.loops)
        if self.pool is not None:
            # The workers' counters (asked now), and those of workers that died; a worker that
            # is down or does not answer makes the daemon not alive (health 503, no watchdog).
            reports, workers_alive = self.pool.reports()
            totals.add(self.pool.retired.loops)
            for report in reports:
                totals.add(report.loops)
                connections += report.connections
                buffered += report.buffered_bytes
                paused_loops += report.paused_loops
                paused_now = max(paused_now, report.paused_now_seconds)
                paused_seconds += report.paused_seconds
            threads_alive = self.writer.alive and workers_alive
        return Stats(
            loops=totals,
            writer=self.writer.stats(),
            connections=connections,
            buffered_bytes=buffered,
            paused_loops=paused_loops,
            paused_now_seconds=paused_now,
            paused_seconds=paused_seconds,
            threads_alive=threads_alive,
            stopping=self.stopping,
            fatal=self.fatal,
            forward=tuple(forwarder.snapshot() for forwarder in self.forwarders),
        )

    def apply(self, settings: Settings) -> None:
        """Reloaded settings (only the keys that need no restart differ): each part applies its own.

        Admission limits and the shutdown deadline read ``self.settings`` each time; the loops
        apply theirs on their own threads between two passes, the writer before its next batch.
        """
        old = self.settings
        if settings.record != old.record or settings.limits.max_record_bytes != old.limits.max_record_bytes:
            self.validator = RecordValidator(settings.record, settings.limits.max_record_bytes)
        self.settings = settings
        for loop in self.loops:
            loop.call_soon_threadsafe(
                functools.partial(
                    loop.apply,
                    self.validator.validate_batch,
                    idle_timeout=settings.limits.idle_timeout,
                    raw_limit=settings.log.reject_raw_bytes,
                    max_record_bytes=settings.limits.max_record_bytes,
                )
            )
        self.writer.apply(
            fsync=settings.log.durability == "fsync",
            fsync_max_wait=settings.log.fsync_max_wait,
            rotate_bytes=settings.log.rotate_bytes,
            rotate_keep=settings.log.rotate_keep,
        )
        if self.pool is not None:
            self.pool.apply(settings)

    def request_reopen(self) -> None:
        self.writer.request_reopen()


__all__ = ["Server", "StartupError"]
