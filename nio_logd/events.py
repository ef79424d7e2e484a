"""The daemon's own events (listening, stopped, limits hit, errors): structlog to stderr.

Under systemd (stderr is the journal's stream, named by ``$JOURNAL_STREAM``) each line starts with
its syslog priority, ``<4>`` for a warning: journald strips the prefix and files the line at that
priority, so ``journalctl -p warning`` finds the warnings.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from typing import Any, Literal

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


# syslog priorities (sd-daemon.h's SD_DEBUG ... SD_CRIT), by structlog method name.
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "msg": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}


def _orjson_str(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def stderr_is_journal() -> bool:
    """Whether fd 2 is the journal stream systemd named in ``$JOURNAL_STREAM`` ("DEV:INODE").

    Checked against fd 2 itself, as sd_journal_stream_fd users do: the variable is inherited by
    children whose stderr was redirected elsewhere (a file, a terminal, a pipe to another program).
    """
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    if stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode):  # a plain file, a terminal
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _with_priority(renderer: Any) -> Any:
    """The renderer, with each line of its output prefixed by the event's ``<priority>``."""

    def render(logger: Any, method_name: str, event_dict: Any) -> str:
        text = str(renderer(logger, method_name, event_dict))
        prefix = f"<{PRIORITIES.get(method_name, 6)}>"
        return "\n".join(prefix + line for line in text.split("\n"))

    return render


def configure_events(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: Literal["debug", "info", "warning", "error"] = "info",
    *,
    context: dict[str, Any] | None = None,
) -> None:
    """Route ``get_logger()`` events to stderr as JSON lines, or coloured text on a terminal.

    ``context``: fields every event of this process carries (a worker's ``worker`` number).
    """
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_str)
    if stderr_is_journal():  # decided per configure: a detached daemon configures again
        renderer = _with_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([_add_context(dict(context))] if context else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # Resolved at call time so that a daemonized process writes to its current stderr.
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def _add_context(fields: dict[str, Any]) -> Any:
    def add(_logger: Any, _method: str, event_dict: Any) -> Any:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


class _Stderr:
    """A file-like that always writes to the current ``sys.stderr`` (it changes when detaching)."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (OSError, ValueError):
            return 0  # stderr gone (closed terminal): events are not worth dying for

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def get_logger(**initial: Any) -> Any:
    """The daemon's event logger."""
    return structlog.get_logger("nio-logd", **initial)
