"""The worker processes, seen from the process that owns the files (the hub).

design: as gunicorn's arbiter, the hub binds every socket and opens every file (as root, when it
starts as root), then starts the workers, which serve the sockets it passes them. Unlike a fork,
each worker is a fresh interpreter (``python -m nio_logd.service.worker``), started after the
privilege drop, so no worker ever runs as root and none inherits a lock held by a thread of the
hub. A worker gets its sockets by fd (``pass_fds``) and everything else in one bootstrap message:
its settings (with its share of the limits), its listeners, and the TLS files' bytes (read by the
hub before the drop: a key readable only by root still works; the worker loads it from a memfd).

TCP listeners are bound once per worker with ``SO_REUSEPORT``, so the kernel spreads new
connections over the workers; Unix and socket-activated listeners are one socket that every
worker accepts from. The hub keeps every listening socket open: while a dead worker is restarted
its connections wait in its backlog instead of being refused.

Per worker, two hub threads: the reader takes the worker's batches to the ``Writer`` (their
``batch_done`` comes back as ``DONE``), its reports and its events (written to the hub's stderr,
so every event leaves through one stream); the sender sends ``DONE`` (coalesced: the highest
written) and the requests. A worker that dies is logged and restarted (after 0.1 s, doubling to
10 s while it keeps dying young); its counters are kept.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import LimitSettings, ListenerSettings, Settings
from ..errors import StartupError
from ..events import get_logger
from ..output.writer import Batch, Writer
from ..stats import LoopStats, Stats
from ..wire.listeners import Listener
from . import handoff, ipc
from .admission import SharedCounts
from .privilege import Identity

log = get_logger()

READY_TIMEOUT = 60.0  # a worker imports pydantic and binds nothing: seconds at most, even on a busy machine
QUERY_TIMEOUT = 1.0  # a worker that does not answer a QUERY within this counts as not alive
RESTART_MIN, RESTART_MAX = 0.1, 10.0
YOUNG = 10.0  # a worker that dies younger than this doubles the restart delay


def worker_settings(settings: Settings, workers: int) -> Settings:
    """``settings`` with each worker's share of the daemon-wide memory limits.

    ``buffer_bytes`` and ``queue_bytes`` (the worker's credit) are divided among the workers;
    per-connection limits are the same in each; ``max_connections`` and
    ``max_connections_per_client`` are counted for all workers together (``SharedCounts``).
    """
    limits = settings.limits
    share = {
        "buffer_bytes": max(1 << 20, limits.buffer_bytes // workers),
        "queue_bytes": max(1 << 16, limits.queue_bytes // workers),
    }
    return settings.model_copy(update={"limits": LimitSettings.model_validate({**limits.model_dump(), **share})})


@dataclass(slots=True)
class ListenerSpec:
    """One listening socket as a worker gets it."""

    fd: int
    settings: ListenerSettings
    name: str
    tls: dict[str, bytes] | None  # "cert", "key" and maybe "ca": the files' bytes


@dataclass(slots=True)
class Bootstrap:
    """Everything a worker needs besides its fds."""

    index: int
    settings: Settings
    listeners: list[ListenerSpec]
    events: tuple[str, str]  # format ("json"/"console", decided by the hub's stderr) and level
    identity: Identity | None  # whom the worker becomes before it serves (started as root)
    counts: tuple[int, int, int]  # the shared connection counts: memfd, workers, slots per worker
    inbox: int  # where connections handed over to this worker arrive (handoff.py)
    outboxes: list[int]  # every worker's inbox, by index, to hand connections over


class HubBatch(Batch):
    """A worker's batch in the hub's writer queue: its sequence number, for ``DONE``."""

    __slots__ = ("seq",)

    def __init__(self, owner: WorkerLink, seq: int, messages: bytes | bytearray, accepted: int, **kw: Any) -> None:
        super().__init__(owner, messages, accepted, **kw)
        self.seq = seq


class WorkerLink:
    """One worker process and its channel."""

    def __init__(self, pool: WorkerPool, index: int, generation: int) -> None:
        self.pool = pool
        self.index = index
        self.generation = generation
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.started = time.monotonic()
        self.ready = threading.Event()
        self.gone = threading.Event()
        self.report: Stats | None = None
        self.answered = threading.Event()
        self._cond = threading.Condition()
        self._outbox: list[bytes] = []
        self._done = 0  # highest batch seq written
        self._done_sent = 0
        self.retired = False  # its counters were added to the pool's

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<WorkerLink {self.index} pid={pid} ready={self.ready.is_set()} gone={self.gone.is_set()}>"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def spawn(self, bootstrap: Bootstrap, fds: list[int]) -> None:
        hub_end, worker_end = ipc.channel_pair()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))}
        try:
            self.proc = subprocess.Popen(  # our own interpreter and module
                [sys.executable, "-m", "nio_logd.service.worker", str(worker_end.fileno())],
                pass_fds=[worker_end.fileno(), *fds],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # a detached hub has no stdout; a worker prints nothing
                env=env,
                close_fds=True,
            )
        finally:
            worker_end.close()
        self.sock = hub_end
        self.started = time.monotonic()
        ipc.send_parts(hub_end, [ipc.message(ipc.BOOT, ipc.code_identity() + ipc.dumps(bootstrap))])
        threading.Thread(target=self._read, name=f"nio-logd-hub-{self.index}-in", daemon=True).start()
        threading.Thread(target=self._send, name=f"nio-logd-hub-{self.index}-out", daemon=True).start()

    # -- to the worker ----------------------------------------------------------------------------
    def post(self, kind: int, payload: bytes = b"") -> None:
        with self._cond:
            self._outbox.append(ipc.message(kind, payload))
            self._cond.notify()

    def batch_done(self, batch: Batch) -> None:
        """The hub's writer thread: written; the sender tells the worker (one DONE for many)."""
        assert isinstance(batch, HubBatch)
        with self._cond:
            self._done = max(self._done, batch.seq)
            self._cond.notify()

    def resume_reading(self) -> None:
        """The worker's credit bounds what it sends; the hub never stops reading it."""

    def _send(self) -> None:
        sock = self.sock
        assert sock is not None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._outbox or self._done != self._done_sent or self.gone.is_set())
                if self.gone.is_set():
                    return
                parts = self._outbox
                self._outbox = []
                if self._done != self._done_sent:
                    self._done_sent = self._done
                    parts.append(ipc.message(ipc.DONE, ipc.SEQ.pack(self._done)))
            try:
                ipc.send_parts(sock, list(parts))
            except OSError:
                return  # the reader sees the end too, and handles it

    # -- from the worker ----------------------------------------------------------------------------
    def _read(self) -> None:
        sock = self.sock
        assert sock is not None
        writer = self.pool.writer
        try:
            while True:
                kind, size = ipc.recv_head(sock)
                if kind == ipc.BATCH:
                    seq, accepted, refused, messages, rejects = ipc.recv_batch(sock, size)
                    writer.submit(HubBatch(self, seq, messages, accepted, rejects=rejects, refused=refused))
                    continue
                payload = ipc.recv_payload(sock, size)
                if kind == ipc.STATS:
                    self.report = ipc.loads(payload)
                    self.answered.set()
                elif kind == ipc.EVENT:
                    self.pool.write_event(bytes(payload))
                elif kind == ipc.READY:
                    self.ready.set()
                else:
                    raise ipc.ChannelClosed(f"unknown message kind {kind}")
        except ipc.ChannelClosed as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - a broken channel ends this worker, not the hub
            reason = f"{type(exc).__name__}: {exc}"
        self._ended(reason)

    def _ended(self, reason: str) -> None:
        with self._cond:
            self.gone.set()
            self._cond.notify_all()
        if self.sock is not None:
            self.sock.close()
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its channel is gone: it cannot be told anything any more
                code = self.proc.wait(5.0)
        self.pool.ended(self, code, reason)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(slots=True)
class _Counters:
    """The loop counters of workers that have died (a restart must not make counters go back)."""

    loops: LoopStats = field(default_factory=LoopStats)
    restarts: int = 0


class WorkerPool:
    """Starts, watches, restarts and stops the workers; sums what they count."""

    def __init__(
        self,
        settings: Settings,
        writer: Writer,
        listener_sets: list[list[Listener]],
        tls: dict[int, dict[str, bytes]],
        on_fatal: Callable[[str, BaseException], None],
        *,
        counts: SharedCounts,
    ) -> None:
        self.counts = counts
        self.count = len(listener_sets)
        # Held for the hub's whole life: a restarted worker finds what was sent to its predecessor.
        self.inboxes = handoff.inboxes(self.count)
        self.settings = worker_settings(settings, self.count)
        self.writer = writer
        self.listener_sets = listener_sets
        self.tls = tls  # id(ListenerSettings) -> files' bytes
        self.on_fatal = on_fatal
        self.links: list[WorkerLink] = []
        self.stopping = False
        self.retired = _Counters()
        self._lock = threading.Lock()
        self._query_lock = threading.Lock()
        self._events_lock = threading.Lock()
        self._delay = [RESTART_MIN] * self.count
        self.events: tuple[str, str] = ("json", settings.daemon.events_level)
        self.identity: Identity | None = None

    def __repr__(self) -> str:
        return f"<WorkerPool {self.count} workers, {self.retired.restarts} restarts>"

    def _bootstrap(self, index: int) -> tuple[Bootstrap, list[int]]:
        specs = [
            ListenerSpec(ls.sock.fileno(), ls.settings, ls.name, self.tls.get(id(ls.settings)))
            for ls in self.listener_sets[index]
        ]
        counts = (self.counts.fd, self.counts.workers, self.counts.slots)
        inbox = self.inboxes[index][0].fileno()
        outboxes = [send.fileno() for _receive, send in self.inboxes]
        boot = Bootstrap(index, self.settings, specs, self.events, self.identity, counts, inbox, outboxes)
        return boot, [self.counts.fd, *{s.fd for s in specs}, inbox, *outboxes]

    def spawn(self, identity: Identity | None) -> None:
        """Start every worker. Called by the privilege drop just before the hub drops (with the
        identity each worker becomes after it has read its bootstrap), or by ``start``."""
        self.identity = identity
        fmt, level = self.settings.daemon.events, self.settings.daemon.events_level
        if fmt == "auto":
            fmt = "console" if sys.stderr.isatty() else "json"
        self.events = (fmt, level)
        for index in range(self.count):
            link = WorkerLink(self, index, 0)
            self.links.append(link)
            link.spawn(*self._bootstrap(index))

    def start(self) -> None:
        """Wait until every worker listens (starting them if nobody has); StartupError if one does not."""
        if not self.links:
            self.spawn(None)
        deadline = time.monotonic() + READY_TIMEOUT
        for link in self.links:
            while not link.ready.wait(0.05):
                if link.gone.is_set() or time.monotonic() > deadline:
                    code = link.proc.poll() if link.proc else None
                    self.stop(time.monotonic() + 5.0)
                    raise StartupError(
                        f"worker {link.index} did not start ({_exit_text(code) if code is not None else 'no answer'}); "
                        "its events above say why"
                    )
        log.info("workers_started", workers=self.count, pids=[link.pid for link in self.links])

    def ended(self, link: WorkerLink, code: int | None, reason: str) -> None:
        """A worker's channel closed (its reader thread): count it, and restart it unless stopping."""
        with self._lock:
            if link.report is not None and not link.retired:
                self.retired.loops.add(link.report.loops)
                link.retired = True
            with self.counts:
                self.counts.clear(link.index)  # its connections died with it
            if self.stopping or link not in self.links:
                return
            age = time.monotonic() - link.started
            index = link.index
            delay = self._delay[index] = min(RESTART_MAX, self._delay[index] * 2) if age < YOUNG else RESTART_MIN
            self.retired.restarts += 1
        log.error(
            "worker_died",
            worker=index,
            pid=link.pid,
            how=_exit_text(code),
            reason=reason,
            action=f"restarting it in {delay:.1f} s; its clients' unacknowledged records are theirs to resend",
        )
        time.sleep(delay)
        with self._lock:
            if self.stopping:
                return
            new = WorkerLink(self, index, link.generation + 1)
            self.links[index] = new
        try:
            new.spawn(*self._bootstrap(index))
        except OSError as exc:
            self.on_fatal(f"worker {index} restart", exc)
            return
        if new.ready.wait(READY_TIMEOUT):
            log.warning("worker_restarted", worker=index, pid=new.pid, restarts=self.retired.restarts)

    def write_event(self, line: bytes) -> None:
        """A worker's event line, to the hub's current stderr (one stream for the journal)."""
        with self._events_lock:
            try:
                sys.stderr.write(line.decode("utf-8", "replace"))
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr is gone (closed terminal): events are best effort, records are not

    # -- observation ---------------------------------------------------------------------------------
    def reports(self) -> tuple[list[Stats], bool]:
        """Every worker's Stats now (asked, answered within QUERY_TIMEOUT), and whether every worker
        is alive and answered; a worker that did not answer counts with its last report."""
        with self._query_lock:
            links = list(self.links)
            live = [link for link in links if link.ready.is_set() and not link.gone.is_set()]
            for link in live:
                link.answered.clear()
                link.post(ipc.QUERY)
            deadline = time.monotonic() + QUERY_TIMEOUT
            healthy = len(live) == len(links)
            for link in live:
                if not link.answered.wait(max(0.0, deadline - time.monotonic())):
                    healthy = False
            out = [link.report for link in links if link.report is not None and not link.retired]
            return out, healthy and all(r.threads_alive for r in out)

    def apply(self, settings: Settings) -> None:
        """Reloaded settings: each worker applies its share between two passes."""
        self.settings = worker_settings(settings, self.count)
        payload = ipc.dumps(self.settings)
        for link in list(self.links):
            link.post(ipc.SETTINGS, payload)

    # -- shutdown ----------------------------------------------------------------------------------
    def stop(self, deadline: float, force: threading.Event | None = None) -> bool:
        """Tell every worker to drain and exit; a second signal (``force``) or the deadline ends
        the drain. True if every worker finished its drain (exit code 0) in time."""
        with self._lock:
            self.stopping = True
            links = list(self.links)
        for link in links:
            link.post(ipc.STOP)
        forced = False
        clean = True
        for link in links:
            proc = link.proc
            if proc is None:
                continue
            while proc.poll() is None:
                if not forced and ((force is not None and force.is_set()) or time.monotonic() >= deadline):
                    forced = True
                    clean = False
                    for other in links:
                        other.post(ipc.FORCE)
                if forced and time.monotonic() >= deadline + 5.0:
                    proc.kill()
                    proc.wait(5.0)
                    break
                time.sleep(0.02)
            link.gone.wait(10.0)  # its reader has passed on every batch the worker sent
            if proc.returncode != 0:
                clean = False
                log.error("worker_stopped", worker=link.index, pid=proc.pid, how=_exit_text(proc.returncode))
        return clean
