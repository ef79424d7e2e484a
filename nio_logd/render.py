"""Render accepted records and refusals as JSON lines through structlog.

design: each I/O loop owns a ``Renderer``: two structlog loggers (messages, rejects) whose
processor chains end in an orjson renderer and whose "logger" only collects the rendered bytes
into the batch being built. Rendering happens on the I/O thread, so the writer thread only
concatenates whole lines and writes them.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from .record import Fields, Refusal


def _put_first(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """Stable key order: timestamp, level, event, then the fields as given."""
    timestamp = event_dict.pop("timestamp")
    level = event_dict.pop("level")
    event = event_dict.pop("event")
    return {"timestamp": timestamp, "level": level, "event": event, **event_dict}


class _Collector:
    """A structlog "logger" that appends each rendered line to ``lines``."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def info(self, line: bytes) -> None:
        self.lines.append(line)

    warning = info


def _processors() -> list[Any]:
    return [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _put_first,
        structlog.processors.JSONRenderer(serializer=orjson.dumps),
    ]


def escape_raw(raw: bytes, limit: int) -> tuple[str, bool]:
    """The raw input as text for the rejects log: invalid UTF-8 as \\x escapes, cut to ``limit``."""
    cut = len(raw) > limit
    return raw[:limit].decode("utf-8", "backslashreplace"), cut


class Renderer:
    """Turns validated fields and refusals into JSON lines, collected per batch."""

    __slots__ = ("_msg", "_rej", "messages", "raw_limit", "rejects")

    def __init__(self, raw_limit: int) -> None:
        self.raw_limit = raw_limit
        self.messages = _Collector()
        self.rejects = _Collector()
        wrapper = structlog.make_filtering_bound_logger(0)
        self._msg = structlog.wrap_logger(
            self.messages, processors=_processors(), wrapper_class=wrapper
        )
        self._rej = structlog.wrap_logger(
            self.rejects, processors=_processors(), wrapper_class=wrapper
        )

    def take(self) -> tuple[list[bytes], list[bytes]]:
        """The lines rendered since the last call."""
        messages, rejects = self.messages.lines, self.rejects.lines
        self.messages.lines = []
        self.rejects.lines = []
        return messages, rejects

    def message(self, fields: Fields, peer: str, listener: str) -> None:
        self._msg.info("message", **fields, peer=peer, listener=listener)

    def message_with_client(self, fields: Fields, peer: str, listener: str, client: str) -> None:
        self._msg.info("message", **fields, peer=peer, listener=listener, client=client)

    def reject(self, refusal: Refusal, peer: str, listener: str) -> None:
        raw, truncated = escape_raw(refusal.raw, self.raw_limit)
        self._rej.warning(
            "rejected",
            reason=refusal.reason,
            error=refusal.message,
            errors=refusal.errors,
            peer=peer,
            listener=listener,
            raw=raw,
            raw_bytes=len(refusal.raw),
            raw_truncated=truncated,
        )
