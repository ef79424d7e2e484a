"""Least privilege: the config-file ownership rule, and dropping root once the sockets are bound.

design: the daemon binds its sockets and opens its files as root (ports below 1024, /var/log),
then, before it starts the I/O threads and so before it reads a byte from any client, hands the
files and any folder it created to the configured user and group and gives up root for good:
supplementary groups, then the group, then the user (real, effective and saved ids), and checks
that root cannot be regained. A config file that another user can write would let that user
choose what the daemon (started as root) binds, writes and runs as, so it is refused.
"""

from __future__ import annotations

import grp
import importlib
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from ..config import config_files
from ..errors import ConfigError, StartupError
from ..events import get_logger

log = get_logger()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the daemon runs as after the drop; ``user`` None keeps the uid (only the group changes)."""

    user: str | None
    uid: int
    group: str
    gid: int

    def __str__(self) -> str:
        return f"{self.user or self.uid}:{self.group}"

    def is_current(self) -> bool:
        """True if the process already runs with exactly these ids."""
        uids = os.getresuid()
        gids = os.getresgid()
        return set(uids) == {self.uid} and set(gids) == {self.gid}


def _user_entry(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"[daemon] user: no such user {name!r}") from None


def _group_entry(name: str) -> grp.struct_group:
    try:
        return grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)
    except KeyError:
        raise ConfigError(f"[daemon] group: no such group {name!r}") from None


def resolve_identity(user: str | None, group: str | None) -> Identity | None:
    """The configured ``[daemon] user`` / ``group`` as ids; None when neither is set.

    With only ``user``, the group is the user's primary group; with only ``group``, the uid is
    kept. Raises ConfigError if a name is unknown.
    """
    if user is None and group is None:
        return None
    if user is not None:
        pw = _user_entry(user)
        uid, user_name, gid = pw.pw_uid, pw.pw_name, pw.pw_gid
    else:
        uid, user_name, gid = os.geteuid(), None, os.getegid()
    if group is not None:
        gr = _group_entry(group)
        gid, group_name = gr.gr_gid, gr.gr_name
    else:
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = str(gid)
    return Identity(user_name, uid, group_name, gid)


def name_of_uid(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _writable_by(mode: int) -> str | None:
    who = [w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "other users")) if mode & bit]
    return " and ".join(who) or None


def check_config_file(path: Path) -> None:
    """Refuse a config file (or its folder) that someone other than root or us could change.

    The rule: the file must be owned by root or by the user starting the daemon, and not
    writable by its group or by others; the same holds for the folder it is in, unless that
    folder has the sticky bit (like /tmp), where only a file's owner may replace it.
    """
    me = os.geteuid()
    trusted = {0, me}
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    fix = f"chmod go-w {path}"
    who = _writable_by(st.st_mode)
    if who:
        raise ConfigError(
            f"{path}: refusing a config file writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"whoever can change it controls what the daemon binds, writes and runs as; fix: {fix}"
        )
    if st.st_uid not in trusted:
        raise ConfigError(
            f"{path}: refusing a config file owned by {name_of_uid(st.st_uid)}: it must belong to "
            f"root or to the user starting the daemon ({name_of_uid(me)})"
        )
    folder = path.absolute().parent
    try:
        dst = folder.stat()
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot read the config file's folder: {exc.strerror}") from None
    who = _writable_by(dst.st_mode)
    if who and not dst.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"{path}: refusing a config file whose folder {folder} is writable by {who} "
            f"(mode {stat.S_IMODE(dst.st_mode):04o}): they could replace the file; fix: chmod go-w {folder}"
        )
    if dst.st_uid not in trusted:
        raise ConfigError(
            f"{path}: refusing a config file whose folder {folder} is owned by {name_of_uid(dst.st_uid)}: "
            f"it must belong to root or to the user starting the daemon ({name_of_uid(me)})"
        )


def check_config_files(path: Path) -> None:
    """``check_config_file`` for the config file and each of its drop-ins (and so their folder)."""
    for each in config_files(path):
        check_config_file(each)


def daemon_umask(file_mode: int) -> int:
    """0o027, relaxed only as far as ``file_mode`` asks, so log files get exactly that mode."""
    return 0o027 & ~file_mode


def make_dirs(paths: list[Path]) -> list[Path]:
    """Create the missing folders of ``paths`` (parents first); the folders created, to chown."""
    created: list[Path] = []
    for path in paths:
        missing = []
        folder = path
        while not folder.exists():
            missing.append(folder)
            if folder.parent == folder:
                break
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise StartupError(f"cannot create folder {folder}: {exc.strerror}") from None
            created.append(folder)
    return created


def warn_not_handed_over(identity: Identity, files: list[tuple[Path, int]]) -> None:
    """Existing files are never chowned (the path may name a file planted by the daemon user):
    say which ones ``identity`` will not own, since reopening them after a rotation may fail."""
    for path, fd in files:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_uid != identity.uid:
            log.warning(
                "log_file_not_handed_over",
                path=str(path),
                owner=name_of_uid(st.st_uid),
                user=str(identity),
                reason="the file existed before this start; only files the daemon creates are handed over",
                consequence=f"writing goes on through the open file; reopening it as {identity} may fail "
                f"until its owner is fixed (chown {identity} {path})",
            )


def hand_over(identity: Identity, fds: list[int], paths: list[Path], mode: int | None = None) -> None:
    """Give open files (and ``paths``: folders we created, the pidfile) to ``identity``.

    ``fds`` must be files this start created (``open_regular`` said so): an existing file at a log
    path may be a link someone planted to a file of root's, and chowning it would hand it over.
    ``mode``, if given, is applied to the open files too (the configured ``[log] file_mode``).
    """
    for fd in fds:
        try:
            os.fchown(fd, identity.uid, identity.gid)
            if mode is not None:
                os.fchmod(fd, mode)
        except OSError as exc:
            raise StartupError(f"cannot hand file descriptor {fd} to {identity}: {exc.strerror}") from None
    for path in paths:
        try:
            os.chown(path, identity.uid, identity.gid, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StartupError(f"cannot hand {path} to {identity}: {exc.strerror}") from None


# Imported before the drop: the new user may not be able to read the Python installation (one
# under /root, mode 0700), and Python imports these lazily (codec lookups, IDNA host names).
_PRELOAD = ("encodings.ascii", "encodings.latin_1", "encodings.idna", "encodings.utf_8", "stringprep")


def _preload() -> None:
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def drop_privileges(identity: Identity) -> None:
    """Become ``identity`` for good (groups, gid, uid); raise StartupError if that fails.

    Must run as root unless the process already has exactly these ids.
    """
    if identity.is_current():
        return
    _preload()
    if os.geteuid() != 0:
        raise StartupError(
            f"[daemon] user/group = {identity}: only root can switch to another user "
            f"(running as {name_of_uid(os.geteuid())}); start as root or remove the setting"
        )
    try:
        if identity.user is not None:
            os.initgroups(identity.user, identity.gid)
        else:
            os.setgroups([])
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    except OSError as exc:
        raise StartupError(f"cannot switch to {identity}: {exc.strerror}") from None
    if os.getresuid() != (identity.uid,) * 3 or os.getresgid() != (identity.gid,) * 3:
        raise StartupError(f"switching to {identity} left ids {os.getresuid()} / {os.getresgid()}")
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise StartupError(f"after switching to {identity} the process could become root again")
    log.info(
        "privileges_dropped",
        user=identity.user or identity.uid,
        uid=identity.uid,
        group=identity.group,
        gid=identity.gid,
        groups=os.getgroups(),
    )


def warn_unwritable(folders: list[Path]) -> None:
    """After the drop: say which log folders the daemon cannot write (reopen and rotation need it)."""
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            log.warning(
                "log_folder_not_writable",
                folder=str(folder),
                consequence="reopen after a rename and built-in rotation cannot create new files",
            )


__all__ = [
    "Identity",
    "check_config_file",
    "check_config_files",
    "daemon_umask",
    "drop_privileges",
    "hand_over",
    "make_dirs",
    "resolve_identity",
    "warn_not_handed_over",
    "warn_unwritable",
]
