"""``nio-logd check-config``: every check that ``run`` and ``start`` make before they serve, without
binding a socket or creating a file, each failure one line naming what is wrong.

``run`` makes the same checks by doing the thing (loading the TLS files, resolving the user,
opening the logs); this runs the very functions it runs where they have no side effect, and
looks where they would act (a log folder it would create, a file it would open).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import sys
from pathlib import Path

from ..config import Key, Settings, key_location
from ..errors import NioLogdError
from ..output.files import file_kind
from ..wire.tls import server_context
from .privilege import check_config_files, name_of_uid, resolve_identity


def _file_problem(label: str, path: Path) -> str | None:
    """What stops the daemon from opening or creating the file ``path`` (as the current user)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return f"{label} {path}: {exc.strerror}"
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            return f"{label} {path}: {file_kind(st.st_mode)}, not a regular file: the daemon refuses it"
        if not os.access(path, os.W_OK):
            return f"{label} {path}: not writable by {_whoami()}"
        return None
    folder = path.parent
    while not folder.exists():  # the daemon creates the missing folders: the first existing one must allow it
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        return f"{label} {path}: {folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        what = "its folder" if folder == path.parent else f"{folder} (where its folder would be created)"
        return f"{label} {path}: {what} is not writable by {_whoami()}"
    return None


def _whoami() -> str:
    return name_of_uid(os.geteuid())


PROTECTED_HOMES = (Path("/root"), Path("/home"), Path("/run/user"))


def interpreter_warning() -> str | None:
    """The shipped units have ProtectHome=yes: a virtual environment (what the units run, at
    /opt/nio-logd) made from an interpreter under a home folder (pyenv's, under /root) is
    invisible to the service, which then fails with 203/EXEC. Said by check-config, not fatal:
    outside those units it works; and not said outside a virtual environment (a developer's)."""
    if sys.prefix == sys.base_prefix:
        return None
    for path in (Path(sys.executable), Path(__file__)):
        real = path.resolve()
        for home in PROTECTED_HOMES:
            if real.is_relative_to(home):
                return (
                    f"{real} is under {home}: the shipped systemd units (ProtectHome=yes) cannot run it "
                    "(203/EXEC); make the venv with /usr/bin/python3 -m venv /opt/nio-logd"
                )
    return None


_TLS_FILE = re.compile(r"TLS (cert|key|ca) file ")


def _at_key(config: Path | None, key: Key, problem: str) -> str:
    """``problem`` after ``FILE:LINE: ``, the place of the key it is about, when a config file sets it."""
    if config is None:
        return problem
    try:
        where = key_location(config, key)
    except NioLogdError:  # the files changed since they were loaded: said without a place
        return problem
    return problem if where is None else f"{where}: {problem}"


def preflight(settings: Settings, config: Path | None) -> list[str]:
    """Every problem that would stop the daemon from starting (or make it run badly), one line each;
    one about a key starts with its place in the config, ``FILE:LINE: ``."""
    problems: list[str] = []
    if config is not None:
        try:
            check_config_files(config)
        except NioLogdError as exc:
            problems.append(str(exc))
    identity: list[tuple[str, str | None, str | None]] = [
        ("user", settings.daemon.user, None),
        ("group", None, settings.daemon.group),
    ]
    for name, user, group in identity:  # each name checked on its own: each error at its own key
        if user is None and group is None:
            continue
        try:
            resolve_identity(user, group)
        except NioLogdError as exc:
            problems.append(_at_key(config, ("daemon", name), str(exc)))
    for i, ls in enumerate(settings.listeners):
        if ls.tls is not None:
            try:
                server_context(ls.tls, settings.resolve, ls.address)
            except NioLogdError as exc:
                named = _TLS_FILE.match(str(exc))
                key: Key = ("listeners", i, "tls", named[1]) if named else ("listeners", i, "tls")
                problems.append(_at_key(config, key, str(exc)))
    files: list[tuple[str, Key, str]] = [
        ("messages log", ("log", "path"), settings.log.path),
        ("rejects log", ("log", "rejects_path"), settings.log.rejects_path),
        ("pidfile", ("daemon", "pidfile"), settings.daemon.pidfile),
    ]
    for label, at_key, path in files:
        problem = _file_problem(label, settings.resolve(path))
        if problem:
            problems.append(_at_key(config, at_key, problem))
    if settings.metrics.address:
        family = socket.AF_UNIX if settings.metrics.address.startswith("unix:") else socket.AF_INET
        try:
            socket.socket(family, socket.SOCK_STREAM).close()
        except OSError as exc:  # e.g. RestrictAddressFamilies=AF_UNIX: the socket-activated unit
            problems.append(
                _at_key(
                    config,
                    ("metrics", "address"),
                    f"[metrics] address = {settings.metrics.address}: cannot make a socket here ({exc.strerror}); "
                    "the socket-activated unit has no network of its own: serve metrics with nio-logd.service",
                )
            )
    return problems
