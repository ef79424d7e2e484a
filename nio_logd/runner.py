"""Run the server in this process: signals, systemd notifications, and the control loop.

design: signal handlers only record the signal (``signal.set_wakeup_fd`` wakes the control loop
and a flag is set); the control loop, in the main thread, acts on it and logs. The first SIGTERM
or SIGINT starts a graceful shutdown; a second one during it forces the end.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType

from .config import Settings
from .events import get_logger
from .notify import Notifier
from .server import Server

log = get_logger()

STATUS_INTERVAL = 5.0


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

    def fileno(self) -> int:
        return self._r.fileno()

    def drain(self) -> None:
        try:
            while self._r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        signal.set_wakeup_fd(self._old_wakeup)
        self._r.close()
        self._w.close()


def status_text(server: Server) -> str:
    s = server.snapshot()
    paused = " PAUSED (writer behind)" if s["paused"] else ""
    return (
        f"connections={s['connections']} accepted={s['accepted']} refused={s['refused']} "
        f"queue_bytes={s['queue_bytes']}{paused}"
    )


def serve(
    settings: Settings,
    *,
    on_ready: Callable[[Server], None] | None = None,
    reload_settings: Callable[[], Settings] | None = None,
) -> bool:
    """Serve until SIGTERM/SIGINT; True if every record received was written before exit.

    Raises StartupError (or ConfigError) before serving if the daemon cannot start.
    """
    notifier = Notifier()
    catcher = SignalCatcher((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    try:
        server = Server(settings)
        server.startup()
        server.start()
        log.info("ready", pid=os.getpid(), config=settings.source,
                 messages=str(settings.resolve(settings.log.path)),
                 rejects=str(settings.resolve(settings.log.rejects_path)))
        notifier.send("READY=1", f"STATUS={status_text(server)}", f"MAINPID={os.getpid()}")
        if on_ready is not None:
            on_ready(server)
        _control_loop(server, catcher, notifier, reload_settings)
        notifier.send("STOPPING=1", "STATUS=stopping: writing what was received")
        log.info("stopping", reason="signal", **server.snapshot())
        clean = server.shutdown(force=catcher.force)
        log.info("stopped", clean=clean, written=server.writer.written_records,
                 rejected=server.writer.written_rejects)
        return clean
    finally:
        catcher.restore()
        notifier.close()


def _control_loop(
    server: Server,
    catcher: SignalCatcher,
    notifier: Notifier,
    reload_settings: Callable[[], Settings] | None,
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
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal", signal=signal.Signals(signum).name, action="shutting down")
                    return
                if signum == signal.SIGHUP:
                    log.info("signal", signal="SIGHUP", action="reopening log files")
                    if reload_settings is not None:
                        _reload(server, reload_settings)
                    server.request_reopen()
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
    """The watchdog is fed only while the writer makes progress (or has nothing to do)."""
    writer = server.writer
    return writer.depth == 0 or time.monotonic() - writer.last_progress < 2 * interval


def _reload(server: Server, reload_settings: Callable[[], Settings]) -> None:
    try:
        new = reload_settings()
    except Exception as exc:  # noqa: BLE001 - a bad file on reload must not take the daemon down
        log.error("reload_failed", error=str(exc), action="keeping the current settings")
        return
    if new.listeners != server.settings.listeners:
        log.warning("reload_partial", reason="listeners change only with a restart")
    log.info("reloaded", config=new.source)
