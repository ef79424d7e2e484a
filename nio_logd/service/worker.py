"""A worker process: the single-process server's loops, fed by the hub's sockets, writing through it.

Started by the hub (``service.workers``) as ``python -m nio_logd.service.worker FD``, FD being its
end of the channel. It reads its bootstrap, then runs a ``Server`` whose writer is a
``RemoteWriter`` and whose listeners are the sockets the hub passed. It ignores the stop and
reload signals (systemd and a terminal send them to the whole group): the hub relays what they
mean over the channel, once. When the channel closes (the hub has died) it stops at once: what it
sent and was not told is written stays unacknowledged, for the clients to send again.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import cast

from .. import programs  # noqa: F401 - before structlog (events)
from ..errors import StartupError
from ..events import configure_events, get_logger
from ..output.writer import Writer
from ..wire.listeners import Listener
from ..wire.tls import connection_factory, server_context
from . import ipc
from .admission import SharedCounts
from .handoff import Handoff
from .privilege import drop_privileges
from .server import Server
from .workers import Bootstrap, ListenerSpec

log = get_logger()


class HubStream:
    """The worker's ``sys.stderr``: each write goes to the hub as one EVENT (to the real stderr
    once the hub has gone)."""

    def __init__(self, remote: ipc.RemoteWriter, fallback: object) -> None:
        self.remote = remote
        self.fallback = fallback
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        # Whole lines only (print() writes the text and its newline apart): two workers' events
        # must not interleave within a line at the hub.
        with self._lock:
            text = self._partial + text
            cut = text.rfind("\n") + 1
            self._partial = text[cut:][-65536:]
            lines = text[:cut]
        if lines and not self.remote.send(ipc.EVENT, lines.encode("utf-8", "replace")):
            fallback = self.fallback
            if fallback is not None:
                fallback.write(lines)  # type: ignore[attr-defined]
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _tls_files(spec: ListenerSpec) -> tuple[dict[str, Path], list[int]]:
    """The TLS files' bytes in memfds, and their paths (/proc/self/fd/N) by configured name."""
    paths: dict[str, Path] = {}
    fds: list[int] = []
    assert spec.tls is not None and spec.settings.tls is not None
    configured = {"cert": spec.settings.tls.cert, "key": spec.settings.tls.key, "ca": spec.settings.tls.ca}
    for label, data in spec.tls.items():
        fd = os.memfd_create(f"nio-logd-tls-{label}", os.MFD_CLOEXEC)
        fds.append(fd)
        os.write(fd, data)
        name = configured[label]
        if name is not None:
            paths[name] = Path(f"/proc/self/fd/{fd}")
    return paths, fds


def _listeners(server: Server, specs: list[ListenerSpec]) -> list[Listener]:
    listeners = []
    for spec in specs:
        sock = socket.socket(fileno=spec.fd)
        sock.setblocking(False)
        listener = Listener(sock, spec.settings, spec.name)
        listeners.append(listener)
        if spec.tls is not None and spec.settings.tls is not None:
            paths, fds = _tls_files(spec)
            try:
                context = server_context(spec.settings.tls, paths.__getitem__, spec.name)
            finally:
                for fd in fds:
                    os.close(fd)
            server.connection_factories[listener] = connection_factory(context)
    return listeners


class OtherCode(Exception):
    """The hub that started this worker is not running this code."""


def serve_worker(fd: int) -> int:
    """Run one worker until the hub says stop (0) or goes away (1)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    kind, payload = ipc.recv_message(sock)
    identity = ipc.code_identity()
    if kind != ipc.BOOT or bytes(payload[: len(identity)]) != identity:
        raise OtherCode(
            "the daemon that started this worker runs other code (nio-logd was upgraded or changed"
            " on disk since it started): restart the daemon"
        )
    boot: Bootstrap = ipc.loads(payload[len(identity) :])
    settings = boot.settings
    remote = ipc.RemoteWriter(sock, settings.limits.queue_bytes)
    sys.stderr = HubStream(remote, sys.__stderr__)
    fmt, level = boot.events
    configure_events(fmt, level, context={"worker": boot.index})  # type: ignore[arg-type]
    server = Server(settings, writer=cast(Writer, remote))
    stop = threading.Event()
    force = threading.Event()
    hub_gone = threading.Event()
    server.on_fatal = stop.set
    server.shared = SharedCounts(*boot.counts)
    server.worker_index = boot.index
    try:
        listeners = _listeners(server, boot.listeners)
        server.adopt(listeners)
        inbox = socket.socket(fileno=boot.inbox)
        outboxes = [socket.socket(fileno=fd) for fd in boot.outboxes]
        for end in (inbox, *outboxes):
            end.setblocking(False)
        server.enable_handoff(Handoff(boot.index, inbox, outboxes, server.shared, listeners))
        if boot.identity is not None:
            drop_privileges(boot.identity)  # before the first byte from a client is read
    except StartupError as exc:
        log.error("worker_not_started", worker=boot.index, error=str(exc))
        return exc.exit_code

    def read() -> None:
        try:
            while True:
                kind, payload = ipc.recv_message(sock)
                if kind == ipc.DONE:
                    remote.written(ipc.SEQ.unpack(payload)[0])
                elif kind == ipc.QUERY:
                    remote.send(ipc.STATS, ipc.dumps(server.snapshot()))
                elif kind == ipc.SETTINGS:
                    new = ipc.loads(payload)
                    level_changed = new.daemon.events_level != server.settings.daemon.events_level
                    server.apply(new)
                    if level_changed:
                        configure_events(fmt, new.daemon.events_level, context={"worker": boot.index})  # type: ignore[arg-type]
                elif kind == ipc.STOP:
                    stop.set()
                elif kind == ipc.FORCE:
                    force.set()
                    stop.set()
        except ipc.ChannelClosed:
            hub_gone.set()
            remote.hub_gone()
            force.set()
            stop.set()

    threading.Thread(target=read, name="nio-logd-worker-channel", daemon=True).start()
    server.start()
    if server.handoff is not None:
        server.handoff.taking(True)
    remote.send(ipc.READY)
    stop.wait()
    clean = server.shutdown(force=force)
    return 0 if clean and not hub_gone.is_set() else 1


def main() -> None:
    try:
        fd = int(sys.argv[1])
    except (IndexError, ValueError):
        sys.exit("nio_logd.service.worker is started by nio-logd itself, with its channel's fd")
    try:
        code = serve_worker(fd)
    except ipc.ChannelClosed:
        code = 1  # the hub went away before the worker was started
    except OtherCode as exc:
        sys.stderr.write(f"nio-logd worker: {exc}\n")
        sys.stderr.flush()
        code = 3
    os._exit(code)  # no atexit work: the hub owns the files and the sockets


if __name__ == "__main__":
    main()
