"""The classic daemon: ``nio-logd start | stop | status | reload`` with python-daemon.

design: ``start`` forks once and waits on a readiness pipe; the child does what python-daemon
cannot do for us (umask, the folders, opening the events file) and then enters a DaemonContext,
which double-forks away from the terminal. The daemon (the grandchild) writes the pidfile and
runs ``runner.serve``: the sockets are bound and the files opened as the starting user, then
privileges are dropped, then the I/O threads start and the daemon writes ``READY`` (or ``ERROR``
and the reason) into the pipe. So ``start`` exits 0 only once the daemon listens, and otherwise
non-zero with the daemon's own error message. Every path is absolute before the context changes
the working directory to "/". The context gets no pidfile and a signal map that only ignores the
terminal job-control signals: ``serve`` installs the SIGTERM/SIGINT/SIGHUP handlers itself.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..config import Settings, find_config, load_file
from ..errors import (
    EXIT_FAILURE,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    AlreadyRunningError,
    NioLogdError,
    NotRunningError,
    StartupError,
    StopTimeoutError,
)
from ..output.files import open_regular
from .pidfile import PidFile, ReloadStatus, is_alive
from .privilege import (
    Identity,
    check_config_files,
    daemon_umask,
    drop_privileges,
    hand_over,
    make_dirs,
    resolve_identity,
    warn_not_handed_over,
    warn_unwritable,
)

if TYPE_CHECKING:
    from .server import Server

EVENTS_FILE_NAME = "nio-logd.events.log"


# -- settings ---------------------------------------------------------------------------------------
def config_path(explicit: str | None) -> Path | None:
    """The config file ``start`` uses, as an absolute path (the daemon re-reads it from "/")."""
    path = find_config(explicit)
    return None if path is None else Path(os.path.abspath(path))


def load_checked(path: Path | None, base_dir: str | None = None) -> Settings:
    """Load the settings, refusing a config file that others could change (see privilege)."""
    if path is None:
        return Settings(base_dir=base_dir or str(Path.cwd()))
    check_config_files(path)
    return load_file(path)


def events_path(settings: Settings) -> Path:
    """Where the detached daemon's events go: ``[daemon] events_file`` or next to the messages log.

    The folder is resolved, the file name is not: a link planted at the name must reach the
    open (which refuses it), not be followed here to whatever it points at.
    """
    if settings.daemon.events_file:
        return _unfollowed(settings, settings.daemon.events_file)
    return _unfollowed(settings, settings.log.path).parent / EVENTS_FILE_NAME


def _unfollowed(settings: Settings, path: str) -> Path:
    name = Path(path).name
    if name in ("", ".", ".."):
        return settings.resolve(path)
    return settings.resolve(str(Path(path).parent)) / name


def pidfile_of(settings: Settings) -> PidFile:
    return PidFile(settings.resolve(settings.daemon.pidfile))


# -- start ------------------------------------------------------------------------------------------
def start(explicit_config: str | None, timeout: float, notice: Callable[[str], None]) -> str:
    """Start the daemon; once it listens, say so (the text returned), or raise with the reason
    it could not start. ``notice`` gets what is worth saying before then (a stale pidfile)."""
    path = config_path(explicit_config)
    settings = load_checked(path)
    identity = resolve_identity(settings.daemon.user, settings.daemon.group)
    if identity is not None and os.geteuid() != 0 and not identity.is_current():
        drop_privileges(identity)  # raises StartupError saying only root can switch users
    pidfile = pidfile_of(settings)
    running = pidfile.running_pid()
    if running is not None:
        raise AlreadyRunningError(f"already running (pid {running}, pidfile {pidfile.path})")
    stale = pidfile.read()
    if stale is not None:
        notice(f"replacing stale pidfile {pidfile.path} ({stale_pid_text(stale)})")

    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which never returns
        os.close(ready_r)
        code = EXIT_FAILURE
        try:
            code = _child(settings, path, identity, pidfile, ready_w)
        except BaseException:  # noqa: BLE001 - the child never returns: print, then _exit
            traceback.print_exc()  # to the events file once detached, else to the terminal
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(ready_w)
    try:
        answer = _read_answer(ready_r, timeout)
    finally:
        os.close(ready_r)
        os.waitpid(child, 0)  # the first child: it exits as soon as the daemon has detached
    events = events_path(settings)
    if answer is None:
        raise StartupError(f"no readiness report within {timeout:g} s; the daemon may still be starting (see {events})")
    if not answer:
        raise StartupError(f"the daemon exited during start-up without a reason; see {events}")
    word, _, rest = answer.partition(" ")
    if word == "READY":
        pid, _, addresses = rest.partition(" ")
        return f"nio-logd started: pid {pid}, listening on {addresses or '(nothing)'}; events in {events}"
    code_text, _, reason = rest.partition(" ")
    err = StartupError(reason or answer)
    if code_text.isdigit():
        err.exit_code = int(code_text)
    raise err


def _read_answer(fd: int, timeout: float) -> str | None:
    """One line from the readiness pipe: "" at EOF without one, None on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode("utf-8", "replace")


class _Readiness:
    """The daemon's end of the readiness pipe: one line, then closed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _send(self, line: str) -> None:
        if self.fd < 0:
            return
        data = (" ".join(line.split()) + "\n").encode()
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # `start` gave up waiting: the events file has the story
        finally:
            os.close(self.fd)
            self.fd = -1

    def ready(self, addresses: list[str]) -> None:
        self._send(f"READY {os.getpid()} {' '.join(addresses)}")

    def error(self, code: int, reason: str) -> None:
        self._send(f"ERROR {code} {reason}")

    @property
    def pending(self) -> bool:
        return self.fd >= 0


def _open_events(path: Path, mode: int) -> tuple[IO[bytes], bool]:
    """The events file, opened as the log files are (no link followed, a regular file only), and
    whether this start created it (only then is it handed to ``[daemon] user``)."""
    try:
        fd, created = open_regular(path, os.O_WRONLY | os.O_APPEND, mode)
    except OSError as exc:
        raise StartupError(f"cannot open events file {path}: {exc.strerror}") from None
    return os.fdopen(fd, "ab", buffering=0), created


def _child(settings: Settings, path: Path | None, identity: Identity | None, pidfile: PidFile, ready_w: int) -> int:
    """The first child: prepare, detach with DaemonContext; the daemon itself carries on in here."""
    import daemon  # python-daemon, imported only where it is used

    readiness = _Readiness(ready_w)
    umask = daemon_umask(settings.file_mode)
    events = events_path(settings)
    try:
        os.umask(umask)
        log_files = [settings.resolve(settings.log.path), settings.resolve(settings.log.rejects_path)]
        created = make_dirs([p.parent for p in log_files] + [events.parent, pidfile.path.parent])
        events_file, events_created = _open_events(events, settings.file_mode)
    except NioLogdError as exc:
        readiness.error(exc.exit_code, str(exc))
        return exc.exit_code
    context = daemon.DaemonContext(
        working_directory="/",
        umask=umask,
        detach_process=True,  # always: even when started from init or with a socket on stdin
        prevent_core=True,
        files_preserve=[ready_w, events_file],
        stdin=None,  # /dev/null
        stdout=None,  # /dev/null: the daemon prints nothing; events go to stderr
        stderr=events_file,
        # Job control from a terminal must not stop the daemon, nor a SIGHUP (logrotate) while it
        # is still starting. serve() then installs its own SIGTERM/SIGINT/SIGHUP handlers.
        signal_map={
            signal.SIGTSTP: None,
            signal.SIGTTIN: None,
            signal.SIGTTOU: None,
            signal.SIGHUP: None,
            signal.SIGUSR1: None,
        },
    )
    try:
        context.open()
    except Exception as exc:  # noqa: BLE001 - DaemonError and OSError alike: report, do not crash
        readiness.error(EXIT_FAILURE, f"cannot detach: {exc}")
        return EXIT_FAILURE
    # From here on this is the daemon: a grandchild of `start`, in its own session.
    events_file.close()  # fd 2 is a duplicate of it now
    return _daemon_main(
        settings,
        path=path,
        identity=identity,
        pidfile=pidfile,
        readiness=readiness,
        created=created,
        events=events,
        events_created=events_created,
    )


def _daemon_main(
    settings: Settings,
    *,
    path: Path | None,
    identity: Identity | None,
    pidfile: PidFile,
    readiness: _Readiness,
    created: list[Path],
    events: Path,
    events_created: bool = False,
) -> int:
    from ..events import configure_events, get_logger
    from .runner import serve

    configure_events(settings.daemon.events, settings.daemon.events_level)
    log = get_logger()
    pid = os.getpid()
    log.info("daemon_starting", pid=pid, config=settings.source, pidfile=str(pidfile.path), events=str(events))
    # Held (locked) until the daemon exits: the lock, not the pid, is what marks it as running.
    try:
        pidfile.acquire(pid)
    except AlreadyRunningError as exc:
        readiness.error(exc.exit_code, str(exc))
        return exc.exit_code
    except OSError as exc:
        readiness.error(EXIT_FAILURE, f"cannot write pidfile {pidfile.path}: {exc.strerror}")
        return EXIT_FAILURE

    after_startup = privilege_hook(
        settings,
        identity,
        [*created, pidfile.path],
        reload_status=ReloadStatus(pidfile.path),
        events_fd=sys.stderr.fileno(),
        events_file=events,
        events_created=events_created,
    )

    def on_ready(server: Server) -> None:
        readiness.ready(server.addresses())

    def reload_settings() -> Settings:
        return load_checked(path, settings.base_dir)

    def reopen() -> None:
        _reopen_events(events, settings.file_mode)

    code = EXIT_FAILURE
    try:
        clean = serve(
            settings,
            on_ready=on_ready,
            reload_settings=reload_settings,
            after_startup=after_startup,
            pidfile=pidfile,
            reopen=reopen,
        )
        code = EXIT_OK if clean else EXIT_FAILURE
    except NioLogdError as exc:
        log.error("start_failed", error=str(exc))
        readiness.error(exc.exit_code, str(exc))
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - last resort: say why in the events file and to `start`
        log.error("crashed", error=repr(exc), traceback=traceback.format_exc())
        readiness.error(EXIT_FAILURE, f"unexpected error: {exc!r}; see {events}")
    finally:
        if readiness.pending:  # serve() returned or raised before it was ready
            readiness.error(EXIT_FAILURE, f"the daemon stopped before it was ready; see {events}")
        try:
            pidfile.remove_if_ours(pid)
        except Exception as exc:  # noqa: BLE001 - exiting anyway; say why the pidfile stays
            log.error("pidfile_not_removed", pidfile=str(pidfile.path), error=repr(exc))
    log.info("daemon_exited", pid=pid, code=code)
    return code


def privilege_hook(
    settings: Settings,
    identity: Identity | None,
    paths: list[Path],
    events_fd: int | None = None,
    *,
    events_file: Path | None = None,
    events_created: bool = False,
    reload_status: ReloadStatus | None = None,
) -> Callable[[Server], None]:
    """What runs between binding and serving: hand the files to ``identity`` and become it.

    Only the files this start created are handed over: an existing one may be a file of root's
    that the daemon user linked there, and chowning it would give it away. The others are
    written through the fd opened as root, and named in a ``log_file_not_handed_over`` warning.
    """
    from ..events import get_logger

    def after_startup(server: Server) -> None:
        if identity is None:
            if os.geteuid() == 0:
                get_logger().warning("running_as_root", advice="set [daemon] user (and group) to drop root")
            return
        writer = server.writer
        fds: list[int] = []
        kept: list[tuple[Path, int]] = []
        for f in (writer.messages, writer.rejects):
            if f.created:
                fds.append(f.fd)
            else:
                kept.append((f.path, f.fd))
        if events_fd is not None:
            if events_created:
                fds.append(events_fd)
            else:
                kept.append((events_file or Path(f"/proc/self/fd/{events_fd}"), events_fd))
        sockets = [Path(listener.unix_path) for listener in server.listeners if listener.unix_path]
        status_files: list[Path] = []
        if reload_status is not None and reload_status.pidfile.exists():
            # The reload results go next to the pidfile, a folder the new user may not write:
            # created now (generation 0), handed over, and rewritten in place if need be.
            try:
                reload_status.write({"pid": os.getpid(), "generation": 0, "result": "started"})
                status_files.append(reload_status.path)
            except OSError as exc:
                get_logger().warning("reload_status_not_written", path=str(reload_status.path), error=exc.strerror)
        hand_over(identity, fds, [*paths, *sockets, *status_files], mode=settings.file_mode)
        warn_not_handed_over(identity, kept)
        # Worker processes are started while still root (the interpreter may be readable by root
        # only); each becomes ``identity`` itself before it reads a byte from a client.
        server.start_workers(identity)
        drop_privileges(identity)
        warn_unwritable(sorted({writer.messages.path.parent, writer.rejects.path.parent}))

    return after_startup


def as_root(explicit_config: str | None, settings: Settings) -> Callable[[Server], None] | None:
    """``nio-logd run`` started as root: the config-file rule, and the drop to ``[daemon] user``."""
    path = config_path(explicit_config)
    if path is not None:
        check_config_files(path)
    identity = resolve_identity(settings.daemon.user, settings.daemon.group)
    if identity is None:
        return privilege_hook(settings, None, [])  # stays root: the same running_as_root warning as start
    pidfile = pidfile_of(settings).path
    created = make_dirs(
        sorted(
            {
                settings.resolve(settings.log.path).parent,
                settings.resolve(settings.log.rejects_path).parent,
                pidfile.parent,
            }
        )
    )
    # serve() writes the pidfile (freshly created, so theirs to hand over) before this hook runs.
    return privilege_hook(settings, identity, [*created, pidfile], reload_status=ReloadStatus(pidfile))


def _reopen_events(path: Path, mode: int) -> None:
    """SIGUSR1 and SIGHUP: point fd 2 at a fresh events file (after logrotate renamed the old one)."""
    from ..events import get_logger

    try:
        fd, _created = open_regular(path, os.O_WRONLY | os.O_APPEND, mode)
    except OSError as exc:
        get_logger().error(
            "events_reopen_failed", path=str(path), error=exc.strerror, action="events go on to the file open before"
        )
        return
    sys.stderr.flush()
    os.dup2(fd, sys.stderr.fileno())
    os.close(fd)


# -- stop, status, reload ---------------------------------------------------------------------------
def stale_pid_text(pid: int) -> str:
    """What became of the pid a stale pidfile names: gone, or now another program's."""
    if not is_alive(pid):
        return f"pid {pid} is gone"
    try:
        name = Path(f"/proc/{pid}/comm").read_text(errors="replace").strip()
    except OSError:
        name = ""
    program = f"another program ({name!r})" if name else "another program"
    return f"pid {pid} is now {program}, not nio-logd"


def _not_running(pidfile: PidFile) -> str:
    stale = pidfile.read()
    if stale is not None:
        return f"not running (stale pidfile {pidfile.path}: {stale_pid_text(stale)})"
    return f"not running (no pidfile at {pidfile.path})"


def stop(settings: Settings, timeout: float) -> str:
    """SIGTERM, then wait until the process is gone; also fine if it was not running (LSB)."""
    pidfile = pidfile_of(settings)
    try:
        pid = pidfile.send_signal(signal.SIGTERM)
    except PermissionError:
        raise NioLogdError(
            f"cannot signal the daemon of {pidfile.path}: permission denied (run as root or as its user)"
        ) from None
    if pid is None:
        return f"nio-logd {_not_running(pidfile)}"
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() >= deadline:
            raise StopTimeoutError(f"pid {pid} is still running {timeout:g} s after SIGTERM")
        time.sleep(0.05)
    return f"nio-logd stopped (pid {pid})"


def status(settings: Settings) -> tuple[int, str]:
    """0 and the pid when running; 3 when not (LSB); with the sentence to say."""
    pidfile = pidfile_of(settings)
    pid = pidfile.running_pid()
    if pid is None:
        return EXIT_NOT_RUNNING, f"nio-logd is {_not_running(pidfile)}"
    return EXIT_OK, f"nio-logd is running (pid {pid})"


RELOAD_WAIT = 10.0


def _signal(pidfile: PidFile, signum: int) -> int | None:
    try:
        return pidfile.send_signal(signum)
    except PermissionError:
        raise NioLogdError(
            f"cannot signal the daemon of {pidfile.path}: permission denied (run as root or as its user)"
        ) from None


def reload(settings: Settings, timeout: float = RELOAD_WAIT) -> str:
    """SIGHUP, then wait for the daemon's reload result: the text to say, or raise with its reason.

    The daemon re-reads the config, applies the settings that need no restart and reopens its
    files, then writes the outcome next to its pidfile under a new generation number. A failed
    reload raises with the daemon's reason and exit code (78 for a config error); the daemon
    keeps its running settings.
    """
    pidfile = pidfile_of(settings)
    status_file = ReloadStatus(pidfile.path)
    before = status_file.read()
    pid = _signal(pidfile, signal.SIGHUP)
    if pid is None:
        raise NotRunningError(_not_running(pidfile))
    last = -1
    if before is not None and before.get("pid") == pid and isinstance(before.get("generation"), int):
        last = int(before["generation"])  # type: ignore[call-overload]
    deadline = time.monotonic() + timeout
    while True:
        now = status_file.read()
        if now is not None and now.get("pid") == pid and now.get("result") != "started":
            generation = now.get("generation")
            if isinstance(generation, int) and generation > last:
                break
        if not is_alive(pid):
            raise NioLogdError(f"pid {pid} exited during the reload (see its events)")
        if time.monotonic() >= deadline:
            raise NioLogdError(
                f"sent SIGHUP to pid {pid}, but it reported no reload result in {status_file.path} "
                f"within {timeout:g} s (see its events)"
            )
        time.sleep(0.02)
    if now.get("result") != "ok":
        err = NioLogdError(f"reload failed, pid {pid} keeps its running settings: {now.get('error')}")
        code = now.get("exit_code")
        err.exit_code = code if isinstance(code, int) and code > 0 else EXIT_FAILURE
        raise err
    applied = now.get("applied") or {}
    text = f"nio-logd reloaded (pid {pid}): applied {json.dumps(applied, sort_keys=True)}"
    restart = now.get("needs_restart")
    if restart:
        text += f"; needs a restart to apply: {', '.join(map(str, restart))}"  # type: ignore[call-overload]
    return text


def reopen(settings: Settings) -> str:
    """SIGUSR1: reopen the log files only (logrotate); the config is not read."""
    pidfile = pidfile_of(settings)
    pid = _signal(pidfile, signal.SIGUSR1)
    if pid is None:
        raise NotRunningError(_not_running(pidfile))
    return f"nio-logd reopen: sent SIGUSR1 to pid {pid}"


__all__ = ["as_root", "config_path", "events_path", "load_checked", "reload", "reopen", "start", "status", "stop"]
