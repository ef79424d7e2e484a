"""The classic daemon's pidfile: written atomically, and locked by the daemon for its whole life.

design: a pid alone does not identify the daemon. After a crash its pid can be reused by any
program, even one whose command line mentions nio-logd (``tail -f .../nio-logd-m.log``), and a
``stop`` that trusted it would signal that program. So the running daemon holds an exclusive
flock(2) on the file at the pidfile path, through an fd it keeps open (O_CLOEXEC) until it exits:
the kernel drops the lock however the daemon ends, and an open fd keeps its lock after the daemon
has given up root. A pid counts as the daemon's only while the file naming it is locked: readers
probe with a non-blocking shared lock on a fresh fd of their own, which fails while the daemon
holds its lock, and let go at once if they got it.

The file is written under a temporary name in the same folder and locked before it is moved to
the final name, so a reader sees the old file or the whole new one, already locked. Two daemons
starting at once cannot both win: a missing pidfile is created with link(2), which fails if one
appeared meanwhile, and a stale one is replaced only while holding the lock on it, after checking
that the locked file is still the one at the path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import time
from pathlib import Path

from ..errors import AlreadyRunningError, NioLogdError

# How long acquire() keeps trying for the lock on a stale pidfile: a reader's probe holds it for
# microseconds, so only a live daemon holds it that long.
_ACQUIRE_WAIT = 2.0
_RETRY_INTERVAL = 0.01
_MAX_PID_BYTES = 64


def _parse_pid(data: bytes) -> int | None:
    data = data.strip()
    if not data.isdigit() or len(data) > 12 or int(data) <= 0:
        return None
    return int(data)


def _open_existing(path: Path) -> int | None:
    """A read-only fd on the regular file at ``path``; None if there is none.

    O_NONBLOCK: a FIFO put at the pidfile path must not make ``status`` wait for a writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise NioLogdError(f"cannot read pidfile {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _read_fd(fd: int) -> int | None:
    return _parse_pid(os.pread(fd, _MAX_PID_BYTES, 0))


def _locked_by_someone(fd: int) -> bool:
    """True if another open file (the daemon's) holds a lock on the file behind ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def read_pid(path: Path) -> int | None:
    """The pid in ``path``; None if the file is missing, empty or does not hold a pid."""
    fd = _open_existing(path)
    if fd is None:
        return None
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def process_state(pid: int) -> str | None:
    """The state letter from /proc/PID/stat ("R", "S", "Z", ...); None if unknown."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) S ..." where comm may itself contain spaces and parentheses.
    _, _, rest = data.rpartition(b")")
    fields = rest.split()
    return fields[0].decode("ascii", "replace") if fields else None


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists but belongs to another user (a daemon that dropped its privileges)
    return process_state(pid) not in ("Z", "X")


class PidFile:
    """The pidfile at ``path``; the daemon's own instance also holds the lock (``acquire``)."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"<PidFile {self.path} pid={self.read()} held={self._fd is not None}>"

    def read(self) -> int | None:
        return read_pid(self.path)

    def running_pid(self) -> int | None:
        """The pid of the running daemon: the file at the path is locked and names a live process."""
        fd = _open_existing(self.path)
        if fd is None:
            return None
        try:
            pid = _read_fd(fd)  # from the fd probed below: pid and lock belong to the same file
            if pid is None or not _locked_by_someone(fd):
                return None
        finally:
            os.close(fd)
        # Sanity check: a lock outliving its daemon (an fd inherited by a fork) vouches for no pid.
        return pid if is_alive(pid) else None

    def is_stale(self) -> bool:
        """True if the file exists but names no running daemon."""
        return self.path.exists() and self.running_pid() is None

    def send_signal(self, signum: int) -> int | None:
        """Send ``signum`` to the running daemon; its pid, or None if none runs.

        A pidfd pins the process that has the pid when it is opened; if the pidfile is still
        locked and names that pid afterwards, the pinned process is the daemon, so the signal
        cannot reach a process that took the pid over in between. Raises PermissionError.
        """
        pid = self.running_pid()
        if pid is None:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError:
            pidfd = -1  # no pidfd here (old kernel, seccomp): only the moment between check and kill stays open
        try:
            if pidfd < 0:
                os.kill(pid, signum)
            elif self.running_pid() == pid:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                return None
        except ProcessLookupError:
            return None
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        return pid

    def write(self, pid: int, mode: int = 0o644) -> None:
        """Atomically write ``pid`` (temp file in the same folder, then rename), without a lock."""
        tmp = self.path.with_name(f".{self.path.name}.{pid}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            os.write(fd, f"{pid}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, self.path)
        except OSError:
            os.unlink(tmp)
            raise

    def acquire(self, pid: int, mode: int = 0o644) -> None:
        """Write ``pid`` and hold the file locked until ``release`` or the end of the process.

        Raises AlreadyRunningError if another process holds the pidfile, OSError if it cannot
        be written.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this process")
        tmp = self.path.with_name(f".{self.path.name}.{pid}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            # Nobody else knows this name yet, so this cannot block: locked before it is visible.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{pid}\n".encode())
            os.fsync(fd)
            self._install(tmp)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self._fd = fd

    def _install(self, tmp: Path) -> None:
        """Move the locked ``tmp`` to the path, unless a live daemon holds the file there."""
        deadline = time.monotonic() + _ACQUIRE_WAIT
        while True:
            if time.monotonic() >= deadline + _ACQUIRE_WAIT:
                raise OSError(errno.EAGAIN, "the pidfile keeps being replaced by another process")
            try:
                old = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                if self._create(tmp):
                    return
                continue  # another pidfile appeared meanwhile: look at it
            try:
                if not stat.S_ISREG(os.fstat(old).st_mode):
                    raise OSError(errno.EEXIST, "something other than a regular file is in the way")
                try:
                    fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        other = _read_fd(old)
                        raise AlreadyRunningError(
                            f"already running (pid {other}, pidfile {self.path})"
                            if other is not None
                            else f"pidfile {self.path} is locked by another process"
                        ) from None
                    time.sleep(_RETRY_INTERVAL)
                    continue
                if not _same_file(old, self.path):
                    continue  # replaced while we waited for its lock: that one is the one to check
                # Holding the stale file's lock, so no other starter can replace it at the same time.
                os.replace(tmp, self.path)
                return
            finally:
                os.close(old)

    def _create(self, tmp: Path) -> bool:
        """Put ``tmp`` at the free path; False if another file got there first."""
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            if os.path.islink(self.path) and not os.path.exists(self.path):
                os.replace(tmp, self.path)  # a dangling symlink names no daemon
                return True
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            os.replace(tmp, self.path)  # a filesystem without hard links: the lock still identifies us
            return True
        os.unlink(tmp)
        return True

    def release(self) -> None:
        """Close the held fd, which drops the lock (the file stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove_if_ours(self, pid: int) -> bool:
        """Remove the file if it is still ours; True if it was removed (or emptied).

        Ours: the file this instance holds, when it holds one; otherwise a file holding ``pid``.
        A daemon that dropped privileges may no longer write the pidfile's folder: then the file
        (which it owns) is emptied instead, which every reader takes as "not running".
        """
        if self._fd is None:
            if self.read() != pid:
                return False
        elif not _same_file(self._fd, self.path):
            self.release()
            return False
        try:
            # Removed while still locked, so that no reader sees our pid in an unlocked file.
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
            except PermissionError:
                if self._fd is not None:
                    os.ftruncate(self._fd, 0)
                    return True
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
                except OSError:
                    return False
                os.close(fd)
            return True
        finally:
            self.release()

    def chown(self, uid: int, gid: int) -> None:
        try:
            os.chown(self.path, uid, gid, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


class ReloadStatus:
    """The result of the daemon's last reload, next to its pidfile (``PIDFILE.reload``, JSON).

    The daemon writes it at start (``result: started``, generation 0) and after every SIGHUP
    (generation + 1, ``ok`` or ``failed`` with the reason and exit code); ``nio-logd reload``
    waits for the generation to change. Written under a temporary name and renamed; a daemon that
    can no longer write the folder (it dropped root) rewrites the file, which it owns, in place,
    in one write(2) - a reader that sees a partial file just reads again.
    """

    __slots__ = ("path", "pidfile")

    def __init__(self, pidfile_path: Path) -> None:
        self.pidfile = pidfile_path
        self.path = pidfile_path.with_name(pidfile_path.name + ".reload")

    def write(self, data: dict[str, object]) -> None:
        payload = (json.dumps(data, sort_keys=True) + "\n").encode()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except PermissionError:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, payload, 0)
            finally:
                os.close(fd)
            return
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, self.path)
        except OSError:
            os.unlink(tmp)
            raise

    def read(self) -> dict[str, object] | None:
        """The last result; None if missing or not (yet wholly) written."""
        fd = _open_existing(self.path)
        if fd is None:
            return None
        try:
            data = json.loads(os.pread(fd, 1 << 16, 0))
        except ValueError:
            return None
        finally:
            os.close(fd)
        return data if isinstance(data, dict) else None

    def remove(self, pid: int) -> None:
        """Remove the file if it is ``pid``'s (the exiting daemon's)."""
        current = self.read()
        if current is None or current.get("pid") != pid:
            return
        try:
            self.path.unlink()
        except OSError:
            pass  # a folder the daemon may no longer write: the next daemon replaces it


__all__ = ["PidFile", "ReloadStatus", "is_alive", "process_state", "read_pid"]
