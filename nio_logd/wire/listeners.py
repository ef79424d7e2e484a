"""Listening sockets: bound from the configuration, or inherited from systemd (LISTEN_FDS)."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Address, ListenerSettings, Settings
from ..errors import StartupError

SD_LISTEN_FDS_START = 3


def listen_backlog() -> int:
    """The system's maximum accept queue (net.core.somaxconn), so bursts do not overflow."""
    try:
        return max(128, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


@dataclass(slots=True, eq=False)  # compared and hashed by identity: a dict key per socket
class Listener:
    """One listening socket and the settings it serves."""

    sock: socket.socket
    settings: ListenerSettings
    name: str  # the address as configured, written with each record
    unix_path: str | None = None  # a socket file we created and remove on exit
    inherited: bool = False  # passed by systemd (LISTEN_FDS)
    # The socket's family as a plain int, read once: ``socket.family`` builds an enum per call,
    # and accepting asks for it per connection.
    family: int = field(init=False)

    def __post_init__(self) -> None:
        self.family = int(self.sock.family)

    def close(self) -> None:
        self.sock.close()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass


def bind(settings: Settings, *, reuse_port: bool = False) -> list[Listener]:
    """Bind every configured listener, or use systemd's sockets; raise StartupError on failure.

    ``reuse_port``: TCP sockets get SO_REUSEPORT, so that ``copies`` can bind more on the same
    address (one per worker process; the kernel spreads new connections over them).
    """
    inherited = inherited_sockets()
    if inherited:
        return _match_inherited(settings, inherited)
    out: list[Listener] = []
    try:
        for ls in settings.listeners:
            out.append(_bind_one(settings, ls, reuse_port=reuse_port))
    except StartupError:
        for listener in out:
            listener.close()
        raise
    return out


def copies(listener: Listener, count: int) -> list[Listener]:
    """``count`` sockets serving ``listener``: itself, and for a TCP listener bound with
    SO_REUSEPORT, more sockets bound to the very address it has (port 0 resolved). Unix and
    inherited sockets are shared: the same one ``count`` times."""
    sock = listener.sock
    if sock.family == socket.AF_UNIX or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        return [listener] * count
    out = [listener]
    try:
        for _ in range(count - 1):
            more = socket.socket(sock.family, socket.SOCK_STREAM)
            out.append(Listener(more, listener.settings, listener.name))
            more.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            more.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if sock.family == socket.AF_INET6:
                more.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            more.bind(sock.getsockname())
            more.listen(listen_backlog())
            more.setblocking(False)
    except OSError as exc:
        for extra in out[1:]:
            extra.close()
        raise StartupError(f"cannot listen on {listener.name} once per worker: {exc.strerror}") from None
    return out


def _bind_one(settings: Settings, ls: ListenerSettings, *, reuse_port: bool = False) -> Listener:
    addr = ls.parsed
    backlog = listen_backlog()
    if addr.scheme == "unix":
        path = str(settings.resolve(addr.path))
        _remove_stale_unix_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {ls.address}: {exc.strerror}") from None
        try:
            # Owner, group and mode before listen(): until then a connect() is refused, so no
            # client gets in through the mode bind() left (umask-dependent).
            _set_socket_file(path, ls)
            sock.listen(backlog)
        except (OSError, StartupError) as exc:
            sock.close()
            try:
                os.unlink(path)
            except OSError:
                pass
            if isinstance(exc, StartupError):
                raise
            raise StartupError(f"cannot listen on {ls.address}: {exc.strerror}") from None
        sock.setblocking(False)
        return Listener(sock, ls, ls.address, unix_path=path)
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {ls.address}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Restarts must not fail with "Address already in use" while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {ls.address}: {exc.strerror}") from None
    sock.setblocking(False)
    return Listener(sock, ls, ls.address)


def _set_socket_file(path: str, ls: ListenerSettings) -> None:
    """Give the socket file just bound its configured owner, group and mode (systemd's SocketUser=,
    SocketGroup=, SocketMode=); the folder is left as it is."""
    try:
        uid, gid = ls.socket_uid, ls.socket_gid
    except ValueError as exc:  # the user or group was removed since the config was loaded
        raise StartupError(f"cannot listen on {ls.address}: owner/group: {exc}") from None
    if uid != -1 or gid != -1:
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except OSError as exc:
            keys = " and ".join(k for k, v in (("owner", ls.owner), ("group", ls.group)) if v is not None)
            raise StartupError(
                f"cannot listen on {ls.address}: {keys}: cannot give the socket file uid {uid} gid {gid}: "
                f"{exc.strerror}"
            ) from None
    # os.chmod follows symlinks (Linux has no lchmod): make sure the path is still our socket.
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise StartupError(f"cannot listen on {ls.address}: the socket file was replaced while binding")
    try:
        os.chmod(path, ls.socket_mode)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {ls.address}: mode: cannot chmod the socket file: {exc.strerror}"
        ) from None


def _remove_stale_unix_socket(path: str) -> None:
    """A socket file left by a crash blocks bind(); remove it only if nobody listens on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot listen on unix://{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"cannot listen on unix://{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody answers
    else:
        raise StartupError(f"cannot listen on unix://{path}: another process is listening there")
    finally:
        probe.close()


def inherited_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), if they are for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)  # as sd_listen_fds() does: not passed on to children
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def _sock_address(sock: socket.socket) -> Address:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return Address("unix", path=name if isinstance(name, str) else name.decode(errors="replace"))
    return Address("tcp", host=name[0], port=name[1])


def _match_inherited(settings: Settings, socks: list[socket.socket]) -> list[Listener]:
    """Pair each inherited socket with the listener settings for its address (or the first's)."""
    by_address = {str(ls.parsed): ls for ls in settings.listeners}
    out = []
    for sock in socks:
        if sock.type != socket.SOCK_STREAM:
            raise StartupError(f"systemd passed fd {sock.fileno()}, which is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise StartupError(
                f"systemd passed fd {sock.fileno()}, which is not a listening socket (Accept=yes is not supported)"
            )
        addr = _sock_address(sock)
        ls = by_address.get(str(addr), settings.listeners[0])
        out.append(Listener(sock, ls, str(addr), inherited=True))
    return out


def describe(listener: Listener) -> str:
    """The address the listener really has (port 0 resolved)."""
    return str(_sock_address(listener.sock))
