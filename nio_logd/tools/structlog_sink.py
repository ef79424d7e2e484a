"""structlog to nio-logd: a logger factory whose loggers queue each event on a ``NioLogdHandler``.

design: structlog calls its wrapped logger's method with what the last processor returned. A
string (``JSONRenderer``, ``KeyValueRenderer``, ``ConsoleRenderer(colors=False)``) becomes the
record's ``send_msg``. An event dict (a last processor that returns it unchanged) becomes
``send_msg`` from its ``event`` and extra fields from the other keys, for a listener with
``[record] extra = "keep"``. Either way the logger only calls ``NioLogdHandler.enqueue``: the
same bounded queue, background sender, acks, resends and failover as for ``logging``, and it
never blocks. ``send_time`` is the moment of the call, with the local UTC offset.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .handler import NioLogdHandler

# Keys structlog's usual processors add (add_log_level, TimeStamper) that the daemon writes
# itself and refuses as extra fields: sent under these names instead.
DEFAULT_RENAME: Mapping[str, str] = {"level": "log_level", "timestamp": "log_timestamp"}


class NioLogdLogger:
    """The logger structlog wraps (``PrintLogger``'s shape): every method queues one record."""

    __slots__ = ("_handler", "_rename")

    def __init__(self, handler: NioLogdHandler, rename: Mapping[str, str] = DEFAULT_RENAME) -> None:
        self._handler = handler
        self._rename = rename

    def __repr__(self) -> str:
        return f"<NioLogdLogger {self._handler!r}>"

    def msg(self, message: str | bytes | None = None, **event: Any) -> None:
        """Queue ``message`` (a rendered event), or the event dict given as keywords."""
        created = time.time()
        if isinstance(message, bytes):  # JSONRenderer(serializer=orjson.dumps)
            message = message.decode("utf-8", "replace")
        if not event:
            self._handler.enqueue(message or "", created)
            return
        text = event.pop("event", "") if message is None else message
        fields = {self._rename.get(key, key): value for key, value in event.items()}
        self._handler.enqueue(text if isinstance(text, str) else str(text), created, fields)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class NioLogdLoggerFactory:
    """``structlog.configure(logger_factory=NioLogdLoggerFactory(handler), ...)``: one logger for all."""

    __slots__ = ("_logger",)

    def __init__(self, handler: NioLogdHandler, rename: Mapping[str, str] = DEFAULT_RENAME) -> None:
        self._logger = NioLogdLogger(handler, rename)

    def __call__(self, *args: Any) -> NioLogdLogger:
        return self._logger
