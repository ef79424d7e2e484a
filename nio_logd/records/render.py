"""Render accepted records and refusals as JSON lines through a structlog processor chain.

design: each I/O loop owns a ``Renderer``. A line is the output of one structlog processor chain,
``[stamp, JSONRenderer(orjson)]``: ``stamp`` puts the UTC ISO timestamp, the level and the event
first (the same text as ``TimeStamper(fmt="iso", utc=True)`` + ``add_log_level``, in a stable key
order) and structlog's ``JSONRenderer`` serializes with orjson. The hot path calls the chain
directly, as structlog's ``BoundLogger`` would, without the logger's per-call overhead (about
5 µs a record, more than validation and serialization together); ``structlog_logger()`` wraps
the very same processors in a real structlog logger, and the tests check both give the same
bytes. Lines are appended to one ``bytearray`` per batch: a list of small ``bytes`` would hold
about 4 KiB each (orjson over-allocates), costing memory and page faults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from .record import Fields, Refusal


class Stamp:
    """Processor: ``timestamp`` (UTC, ISO 8601, ``Z``), ``level``, ``event`` first, then the rest.

    The date-and-time part is formatted once per second; the text equals what
    ``datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")`` gives (no fraction when
    the microseconds are zero), which is structlog's ``TimeStamper(fmt="iso", utc=True)``.
    """

    __slots__ = ("_prefix", "_second", "clock")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # a test freezes it to compare the batch path with a structlog logger
        self._second = -1
        self._prefix = ""

    def text(self) -> str:
        """The timestamp of now, as written."""
        now = self.clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micro = int((now - second) * 1_000_000)
        return f"{self._prefix}.{micro:06d}Z" if micro else f"{self._prefix}Z"

    def __call__(self, _logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        return {"timestamp": self.text(), "level": name, "event": event_dict.pop("event"), **event_dict}


def processors(clock: Callable[[], float] = time.time) -> list[Any]:
    """The processor chain of both log files."""
    return [Stamp(clock), structlog.processors.JSONRenderer(serializer=orjson.dumps)]


class _Collector:
    """A structlog "logger" that appends each rendered line to a bytearray."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def msg(self, line: bytes) -> None:
        self.buf += line
        self.buf += b"\n"

    info = warning = msg


def structlog_logger(chain: list[Any]) -> tuple[Any, _Collector]:
    """A real structlog logger over ``chain`` (for checking the fast path gives the same bytes)."""
    collector = _Collector()
    logger = structlog.wrap_logger(
        collector, processors=chain, wrapper_class=structlog.make_filtering_bound_logger(0)
    ).bind()
    return logger, collector


def escape_raw(raw: bytes, limit: int) -> tuple[str, bool]:
    """The raw input as text for the rejects log: invalid UTF-8 as \\x escapes, cut to ``limit``."""
    cut = len(raw) > limit
    return raw[:limit].decode("utf-8", "backslashreplace"), cut


class Renderer:
    """Turns validated fields and refusals into JSON lines, collected per batch."""

    __slots__ = ("_dump", "_head", "_stamp", "accepted", "messages", "raw_limit", "refused", "rejects")

    def __init__(self, raw_limit: int, clock: Callable[[], float] = time.time) -> None:
        self.raw_limit = raw_limit
        self._stamp, self._dump = processors(clock)
        self.messages = bytearray()
        self.rejects = bytearray()
        self.accepted = 0
        self.refused = 0
        self._head: bytes | None = None  # the accepted lines' head, with this pass's timestamp

    def new_pass(self) -> None:
        """A new read pass begins: the accepted lines from now on get a new timestamp."""
        self._head = None

    def take(self) -> tuple[bytearray, int, bytearray, int]:
        """The lines rendered since the last call (newline-terminated) and how many of each; the
        next line rendered gets a new timestamp."""
        out = self.messages, self.accepted, self.rejects, self.refused
        self.messages = bytearray()
        self.rejects = bytearray()
        self.accepted = self.refused = 0
        self._head = None
        return out

    @property
    def nbytes(self) -> int:
        """Bytes rendered since the last ``take``."""
        return len(self.messages) + len(self.rejects)

    def message(self, fields: Fields, peer: str, listener: str) -> None:
        self.messages += self._dump(
            None, "info", self._stamp(None, "info", {"event": "message", **fields, "peer": peer, "listener": listener})
        )
        self.messages += b"\n"
        self.accepted += 1

    def frame(
        self, peer: str, listener: str, client: str | None, credentials: tuple[int, int, int] | None = None
    ) -> tuple[bytes, bytes]:
        """What goes before and after a record's own fields in its line, for the lines of one read;
        the timestamp is the pass's (taken at the pass's first ``frame``, see ``new_pass``).

        The chain's output is ``{"timestamp":…,"level":"info","event":"message",`` + the fields
        (orjson, compact, in their order) + ``,"peer":…,"listener":…[,"peer_pid":…,"peer_uid":…,
        "peer_gid":…][,"client":…]}``: so the fields are serialised alone and spliced in, one
        timestamp for the whole read (the tests check the bytes equal a structlog logger's under
        a frozen clock). ``credentials``: a Unix socket peer's pid, uid and gid (SO_PEERCRED).
        """
        # The timestamp is digits, "-", "T", ":", "." and "Z": as a JSON string it is just quoted.
        head = self._head
        if head is None:
            head = self._head = b'{"timestamp":"%s","level":"info","event":"message",' % self._stamp.text().encode()
        tail = b',"peer":%s,"listener":%s' % (orjson.dumps(peer), orjson.dumps(listener))
        if credentials is not None:
            tail += b',"peer_pid":%d,"peer_uid":%d,"peer_gid":%d' % credentials
        if client is not None:
            tail += b',"client":%s' % orjson.dumps(client)
        return head, tail + b"}\n"

    def splice(self, body: bytes, head: bytes, tail: bytes) -> None:
        """The lines of a plain read, from its records' fields serialised as one JSON array
        (``RecordValidator.validate_batch``).

        ``body`` is ``[{`` + the first record's fields + ``},{`` + the next's ... + ``}]``, each
        record's fields beginning with ``"send_user":``. ``},{"send_user":`` can only stand
        between two records: inside a string orjson writes ``"`` as ``\\"``, so this ``"`` opens or
        closes a string; a closing one is followed by ``,``, ``:``, ``}`` or ``]``, not by
        ``send_user``, so it opens one, and the ``{`` before it opens an object, which in a plain
        record happens only at its start. So each occurrence becomes the tail of one line and the
        head of the next, and the bytes are those ``frame`` describes, record by record (a
        message ending in ``},{`` is why the pattern carries the key: ``},{"`` alone is not
        enough).
        """
        self.messages += head
        # split + join: one search of the body (replace searches it twice: to count, then to copy)
        self.messages += (tail + head + b'"send_user":').join(body[2:-2].split(b'},{"send_user":'))
        self.messages += tail

    def message_with_client(self, fields: Fields, peer: str, listener: str, client: str) -> None:
        event = {"event": "message", **fields, "peer": peer, "listener": listener, "client": client}
        self.messages += self._dump(None, "info", self._stamp(None, "info", event))
        self.messages += b"\n"
        self.accepted += 1

    def reject(
        self, refusal: Refusal, peer: str, listener: str, credentials: tuple[int, int, int] | None = None
    ) -> None:
        raw, truncated = escape_raw(refusal.raw, self.raw_limit)
        event: dict[str, Any] = {
            "event": "rejected",
            "reason": refusal.reason,
            "error": refusal.message,
            "errors": refusal.errors,
            "peer": peer,
            "listener": listener,
        }
        if credentials is not None:
            event["peer_pid"], event["peer_uid"], event["peer_gid"] = credentials
        event["raw"] = raw
        event["raw_bytes"] = len(refusal.raw)
        event["raw_truncated"] = truncated
        self.rejects += self._dump(None, "warning", self._stamp(None, "warning", event))
        self.rejects += b"\n"
        self.refused += 1

    def suppressed(self, count: int, peer: str, listener: str, rate: float) -> None:
        """The line that stands for ``count`` reject lines the connection's rate left out."""
        event = {
            "event": "rejects_suppressed",
            "count": count,
            "peer": peer,
            "listener": listener,
            "reason": f"more than {rate:g} refused records per second from this connection: counted, not written",
        }
        self.rejects += self._dump(None, "warning", self._stamp(None, "warning", event))
        self.rejects += b"\n"
