"""The classic daemon's pidfile: atomic write, stale-pid detection, removal only if still ours.

design: the file is written to a temporary name in the same folder and renamed over the final
name, so a reader sees either the old content or the whole new pid, never a half-written one.
A pid is "running" only if the process exists, is not a zombie (an orphaned daemon whose parent
never reaps it stays in the process table), and, where /proc tells, is a nio-logd process; so a
pid reused by an unrelated program after a crash does not pass for the daemon.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Words one of which appears in the command line of a nio-logd process.
_OUR_COMMAND_LINES = (b"nio_logd", b"nio-logd")


def read_pid(path: Path) -> int | None:
    """The pid in ``path``; None if the file is missing, empty or does not hold a pid."""
    try:
        data = path.read_bytes().strip()  # bytes: no codec lookup, which may need an import
    except (FileNotFoundError, IsADirectoryError):
        return None
    if not data.isdigit() or len(data) > 12 or int(data) <= 0:
        return None
    return int(data)


def process_state(pid: int) -> str | None:
    """The state letter from /proc/PID/stat ("R", "S", "Z", ...); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) S ..." where comm may itself contain spaces and parentheses.
    _, _, rest = stat.rpartition(b")")
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


def is_nio_logd(pid: int) -> bool:
    """True if ``pid`` runs nio-logd (or /proc cannot tell, in which case we trust the pidfile)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return any(word in cmdline for word in _OUR_COMMAND_LINES)


class PidFile:
    """The pidfile at ``path``."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"<PidFile {self.path} pid={self.read()}>"

    def read(self) -> int | None:
        return read_pid(self.path)

    def running_pid(self) -> int | None:
        """The pid of the running daemon, or None if the file is missing or stale."""
        pid = self.read()
        if pid is None or not is_alive(pid) or not is_nio_logd(pid):
            return None
        return pid

    def is_stale(self) -> bool:
        """True if the file exists but names no running daemon."""
        return self.path.exists() and self.running_pid() is None

    def write(self, pid: int, mode: int = 0o644) -> None:
        """Atomically write ``pid`` (temp file in the same folder, then rename over the target)."""
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

    def remove_if_ours(self, pid: int) -> bool:
        """Remove the file if it still holds ``pid``; True if it was removed (or emptied).

        A daemon that dropped privileges may no longer write the pidfile's folder: then the file
        (which it owns) is emptied instead, which every reader takes as "not running".
        """
        if self.read() != pid:
            return False
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except PermissionError:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                return False
            os.close(fd)
        return True

    def chown(self, uid: int, gid: int) -> None:
        try:
            os.chown(self.path, uid, gid, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


__all__ = ["PidFile", "is_alive", "is_nio_logd", "process_state", "read_pid"]
