"""Opening files in folders another user may write: no links followed, never blocking.

design: the log folders may belong to the daemon's user, who must not be able to point the
daemon (started as root) at another file. ``open_regular`` opens without following a symbolic
link and without blocking (a FIFO), creates only with ``O_EXCL``, and refuses anything but a
regular file with one link, saying what it found.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from ..events import get_logger

log = get_logger()

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message ("a FIFO", "a directory" ...)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return f"not a regular file (mode {mode:o})"


def _refuse(path: Path, code: int, reason: str) -> OSError:
    log.error("log_file_refused", path=str(path), reason=reason)
    return OSError(code, reason, str(path))


def open_regular(path: Path, flags: int, mode: int = 0o640, *, create: bool = True) -> tuple[int, bool]:
    """Open ``path`` (in a folder another user may write) without following a link or blocking.

    Returns the fd and whether this call created the file. A symbolic link, anything but a
    regular file, and a regular file with more than one link (a hard link to someone else's file)
    are refused with an OSError whose ``strerror`` says what was found, and a ``log_file_refused``
    event. ``flags`` are the access flags (O_WRONLY, O_RDWR, O_APPEND ...).
    """
    # O_NONBLOCK: open(2) of a FIFO without a reader would block the calling thread for ever.
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    created = False
    try:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if not create:
                raise
            # O_EXCL: what we create is ours; if someone plants a file meanwhile we refuse, not follow.
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
            created = True
            # Exactly ``mode``, whatever the umask (a unit's UMask=0077 would make 0640 into 0600,
            # unlike the files logrotate creates): ours, just made, so ours to set.
            os.fchmod(fd, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, errno.ELOOP, "is a symbolic link; refusing to follow it") from None
        if exc.errno == errno.ENXIO:  # O_WRONLY|O_NONBLOCK on a FIFO or a socket
            raise _refuse(path, errno.ENXIO, "is a FIFO or a socket, not a regular file; refused") from None
        if exc.errno == errno.EISDIR:
            raise _refuse(path, errno.EISDIR, "is a directory, not a regular file; refused") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, errno.EINVAL, f"is {file_kind(st.st_mode)}, not a regular file; refused")
        if st.st_nlink != 1:
            raise _refuse(
                path, errno.EMLINK, f"has {st.st_nlink} hard links; refused: it may be another user's file linked here"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, created
