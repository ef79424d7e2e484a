"""Run the server in this process: signals, systemd notifications, and the control loop.

design: signal handlers only record the signal (``signal.set_wakeup_fd`` wakes the control loop
and a flag is set); the control loop, in the main thread, acts on it and logs. The first SIGTERM
or SIGINT starts a graceful shutdown; a second one during it forces the end.

SIGUSR1 only reopens the log files (logrotate, every night: a half-edited config is never read
then). SIGHUP re-reads the config, applies what needs no restart, and reopens the files too; its
outcome (generation, ok/failed and the reason) is written to the ``ReloadStatus`` file next to
the pidfile, which ``nio-logd reload`` waits for; the file is created at the first reload (or
before a privilege drop), so a daemon nobody reloads leaves only its pidfile there. ``serve``
holds ``[daemon] pidfile`` locked for ``run`` as well (what systemd runs), so ``status``,
``start`` and ``reload`` find that daemon.
"""

from __future__ import annotations

import collections
import functools
import os
import selectors
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..config import Settings
from ..errors import EXIT_FAILURE, AlreadyRunningError, NioLogdError
from ..events import configure_events, get_logger
from .notify import Notifier
from .pidfile import PidFile, ReloadStatus
from .server import Server

log = get_logger()

STATUS_INTERVAL = 5.0
FATAL = -1  # not a signal: a thread died (``Server.fail``); the control loop stops the daemon


class SignalCatcher:
    """Records signals and wakes whoever selects on ``fileno()``."""

    def __init__(self, signums: tuple[int, ...]) -> None:
        self.received: collections.deque[int] = collections.deque()
        self.force = threading.Event()
        self._stop_seen = False
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, self._handle) for s in signums}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self._stop_seen:
                self.force.set()
            self._stop_seen = True
        self.received.append(signum)

    def post(self, signum: int) -> None:
        """Any thread: queue ``signum`` as if it had arrived, and wake the control loop."""
        self.received.append(signum)
        try:
            self._w.send(b"\0")
        except OSError:
            pass  # the wake-up is already pending, or we are exiting

    def fileno(self) -> int:
        return self._r.fileno()

    def drain(self) -> None:
        try:
            while self._r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def restore(self) -> None:
        # Stop signals that arrive after the drain (the process is about to exit) must not kill it
        # with their default action and turn a clean exit 0 into death by SIGTERM.
        for s, old in self._old.items():
            stop_signal = s in (signal.SIGTERM, signal.SIGINT) and self._stop_seen
            signal.signal(s, signal.SIG_IGN if stop_signal else old)
        signal.set_wakeup_fd(self._old_wakeup)
        self._r.close()
        self._w.close()


def status_text(server: Server) -> str:
    s = server.snapshot()
    paused = " PAUSED (writer behind)" if s.paused else ""
    metrics = " METRICS UNAVAILABLE (see the journal)" if server.metrics_error else ""
    return (
        f"connections={s.connections} accepted={s.loops.records.accepted} refused={s.loops.records.refused} "
        f"queue_bytes={s.writer.queue_bytes}{paused}{metrics}"
    )


def serve(
    settings: Settings,
    *,
    on_ready: Callable[[Server], None] | None = None,
    reload_settings: Callable[[], Settings] | None = None,
    after_startup: Callable[[Server], None] | None = None,
    pidfile: PidFile | bool = True,
    reopen: Callable[[], None] | None = None,
) -> bool:
    """Serve until SIGTERM/SIGINT; True if every record received was written before exit.

    ``pidfile``: True (``run``) to hold ``[daemon] pidfile`` locked while serving (raises
    AlreadyRunningError if another daemon holds it); the caller's held PidFile (the classic
    daemon); False for none. The reload results are written next to it. ``reopen`` runs on
    SIGUSR1 and SIGHUP, besides the log files' reopening (the classic daemon's events file).

    ``after_startup`` runs once the sockets are bound and the files open, before any I/O thread
    reads a byte from a client (the privilege drop). Raises StartupError (or ConfigError) before
    serving if the daemon cannot start.
    """
    held = _hold_pidfile(settings) if pidfile is True else None
    path_of = held if held is not None else (pidfile if isinstance(pidfile, PidFile) else None)
    results = _ReloadResults(ReloadStatus(path_of.path)) if path_of is not None else None
    notifier = Notifier()
    catcher = SignalCatcher((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1))
    try:
        server = Server(settings, workers=settings.server.worker_count)
        server.on_fatal = functools.partial(catcher.post, FATAL)
        server.startup()
        if after_startup is not None:
            after_startup(server)
        server.start()
        log.info(
            "ready",
            pid=os.getpid(),
            config=settings.source,
            messages=str(settings.resolve(settings.log.path)),
            rejects=str(settings.resolve(settings.log.rejects_path)),
        )
        notifier.send("READY=1", f"STATUS={status_text(server)}", f"MAINPID={os.getpid()}")
        if on_ready is not None:
            on_ready(server)
        _control_loop(server, catcher, notifier, reload_settings, results=results, reopen=reopen)
        notifier.send(
            "STOPPING=1", "STATUS=stopping: writing what was received" + (f" ({server.fatal})" if server.fatal else "")
        )
        log.info("stopping", reason=server.fatal or "signal", **server.snapshot().as_dict())
        clean = server.shutdown(force=catcher.force)
        log.info("stopped", clean=clean, written=server.writer.written_records, rejected=server.writer.written_rejects)
        return clean
    finally:
        catcher.restore()
        notifier.close()
        if results is not None:
            results.status.remove(os.getpid())
        if held is not None:
            try:
                held.remove_if_ours(os.getpid())
            except OSError as exc:
                log.error("pidfile_not_removed", pidfile=str(held.path), error=repr(exc))


def _hold_pidfile(settings: Settings) -> PidFile | None:
    """``run``: lock ``[daemon] pidfile`` as the classic daemon does, so that ``status``, ``start``
    and ``reload`` find this daemon (under systemd too). Another daemon holding it is an error (it
    writes the same files); a pidfile that cannot be written is only a warning."""
    from .privilege import make_dirs

    held = PidFile(settings.resolve(settings.daemon.pidfile))
    try:
        make_dirs([held.path.parent])
        held.acquire(os.getpid())
    except AlreadyRunningError:
        raise
    except (OSError, NioLogdError) as exc:
        log.warning(
            "pidfile_not_written",
            pidfile=str(held.path),
            error=getattr(exc, "strerror", None) or str(exc),
            action="status, start and reload will not see this daemon",
        )
        return None
    return held


class _ReloadResults:
    """Numbers each reload's outcome and writes it to the status file for ``nio-logd reload``."""

    def __init__(self, status: ReloadStatus) -> None:
        self.status = status
        self.generation = 0  # 0: "started", written before a privilege drop (daemonize.privilege_hook)
        self.broken = False

    def record(self, outcome: dict[str, Any]) -> None:
        self.generation += 1
        try:
            self.status.write({"pid": os.getpid(), "generation": self.generation, **outcome})
        except OSError as exc:
            if not self.broken:  # once: the next reloads would fail the same way
                log.error(
                    "reload_status_not_written",
                    path=str(self.status.path),
                    error=exc.strerror,
                    action="nio-logd reload cannot tell the outcome (see these events)",
                )
            self.broken = True


def _control_loop(
    server: Server,
    catcher: SignalCatcher,
    notifier: Notifier,
    reload_settings: Callable[[], Settings] | None,
    *,
    results: _ReloadResults | None = None,
    reopen: Callable[[], None] | None = None,
) -> None:
    sel = selectors.DefaultSelector()
    sel.register(catcher.fileno(), selectors.EVENT_READ)
    wd = notifier.watchdog_interval
    timeout: float | None = None
    if notifier.enabled:
        timeout = min(STATUS_INTERVAL, wd) if wd else STATUS_INTERVAL
    last_status = ""
    try:
        while True:
            sel.select(timeout)
            catcher.drain()
            while catcher.received:
                signum = catcher.received.popleft()
                if signum == FATAL:
                    log.error("stopping", reason=server.fatal)
                    return
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal", signal=signal.Signals(signum).name, action="shutting down")
                    return
                if signum == signal.SIGUSR1:
                    log.info("signal", signal="SIGUSR1", action="reopening log files")
                    if reopen is not None:
                        reopen()
                    server.request_reopen()
                if signum == signal.SIGHUP:
                    log.info("signal", signal="SIGHUP", action="re-reading the config and reopening log files")
                    if reopen is not None:
                        reopen()
                    outcome: dict[str, Any] = {"result": "ok", "applied": {}, "needs_restart": []}
                    if reload_settings is not None:
                        outcome = _reload(server, reload_settings)
                    server.request_reopen()
                    if results is not None:
                        results.record(outcome)
            if notifier.enabled:
                text = status_text(server)
                if text != last_status:
                    notifier.send(f"STATUS={text}")
                    last_status = text
                if wd and _writer_healthy(server, wd):
                    notifier.send("WATCHDOG=1")
    finally:
        sel.close()


def _writer_healthy(server: Server, interval: float) -> bool:
    """The watchdog is fed only while the writer makes progress (or has nothing to do) and every
    thread still runs: systemd then restarts a daemon whose disk or threads are stuck."""
    writer = server.writer
    if (
        server.fatal is not None
        or not writer.alive
        or not all(loop.thread is not None and loop.thread.is_alive() for loop in server.loops)
    ):
        return False
    if server.pool is not None and not server.snapshot().threads_alive:
        return False  # a worker is down (being restarted) or does not answer
    # Measured from when records started waiting, not from the last write: after an idle hour the
    # first record is not a stall.
    return writer.stalled_seconds() < 2 * interval


# The settings SIGHUP applies to the running daemon. Every other key (listeners, log paths and
# file mode, I/O threads, metrics, pidfile, user) needs a restart: re-binding, other files, other
# threads or another user. Record rules and limits apply to records and connections from then on.
HOT_SETTINGS = frozenset(
    {
        "record.max_user_chars",
        "record.max_msg_chars",
        "record.extra",
        "limits.max_record_bytes",  # for new connections
        "limits.max_connections",
        "limits.max_connections_per_client",
        "limits.idle_timeout",
        "log.reject_raw_bytes",
        "log.durability",
        "log.fsync_max_wait",
        "log.rotate_bytes",
        "log.rotate_keep",
        "server.shutdown_timeout",
        "daemon.events",
        "daemon.events_level",
    }
)


def _flatten(settings: Settings) -> dict[str, Any]:
    """``{"section.key": value}`` (top-level lists such as ``listeners`` as one key)."""
    flat: dict[str, Any] = {}
    for name, value in settings.model_dump(mode="json", exclude={"base_dir", "source"}).items():
        if isinstance(value, dict):
            flat.update((f"{name}.{key}", v) for key, v in value.items())
        else:
            flat[name] = value
    return flat


def _merge(old: Settings, new: Settings, keys: set[str]) -> Settings:
    """``old`` with the values of ``keys`` (hot ``section.key`` names) taken from ``new``."""
    sections: dict[str, Any] = {}
    for key in keys:
        section, _, name = key.partition(".")
        updates = sections.setdefault(section, {})
        updates[name] = getattr(getattr(new, section), name)
    update = {section: getattr(old, section).model_copy(update=u) for section, u in sections.items()}
    return old.model_copy(update={**update, "source": new.source})


def _reload(server: Server, reload_settings: Callable[[], Settings]) -> dict[str, Any]:
    """Re-read the config and apply its hot settings; the outcome, for the reload status file."""
    try:
        new = reload_settings()
    except Exception as exc:  # noqa: BLE001 - a bad file on reload must not take the daemon down
        log.error("reload_failed", error=str(exc), action="keeping the current settings")
        code = exc.exit_code if isinstance(exc, NioLogdError) else EXIT_FAILURE
        return {"result": "failed", "error": str(exc), "exit_code": code}
    old = server.settings
    before, after = _flatten(old), _flatten(new)
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    hot = changed & HOT_SETTINGS
    restart = changed - HOT_SETTINGS
    if restart:
        log.warning(
            "reload_needs_restart",
            keys=sorted(restart),
            action="kept the running values; restart the daemon to apply them",
        )
    outcome: dict[str, Any] = {"result": "ok", "config": new.source, "needs_restart": sorted(restart)}
    if not hot:
        log.info("reloaded", config=new.source, applied={})
        return {**outcome, "applied": {}}
    merged = _merge(old, new, hot)
    server.apply(merged)
    if "daemon.events" in hot or "daemon.events_level" in hot:
        configure_events(merged.daemon.events, merged.daemon.events_level)
    applied = {key: after[key] for key in sorted(hot)}
    log.info("reloaded", config=new.source, applied=applied)
    return {**outcome, "applied": applied}
