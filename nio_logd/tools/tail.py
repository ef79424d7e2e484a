"""``nio-logd tail``: the last lines of the log, followed across rotation, filtered, pretty or raw JSON.

design: the file is read as bytes and cut into lines; each line is parsed once into a ``Line``
(a JSON object, or malformed with the reason), and the filters and renderers only ever see
``Line`` objects, so hostile content (not JSON, not UTF-8, not an object, huge, terminal escapes)
is shown as such and never crashes them. The last N lines come from reading backwards from the
end in blocks; a compressed file (gzip, bzip2, xz, known by its first bytes) and stdin (``-``) are
streams, read front to back keeping only the last N lines. A regular file's last line without a
newline is printed if it is a whole JSON object (else it is a write in progress: a notice says it
is not shown); a stream's is always printed, with a notice. Following watches the path, like
``tail -F``, with inotify where the kernel has it (waking only when the file or its folder
changes, and every FALLBACK_POLL seconds as a safety net), by polling otherwise: when another
file appears at the path
(rename + create) the old one is read to its end and kept open a while for a daemon that has not
reopened yet; when the file gets shorter (truncation), or its last bytes we read change, it is
read again from its start. After a truncation, the lines a ``copytruncate`` copy holds that we
had not read yet are read from the copy, and the lines the daemon writes again (see
``copytruncate.py``) are not printed twice. Only regular files are read: a directory, FIFO or
device at the path is reported (and waited out when following), and opening never blocks. On a
terminal no control or bidi character is written raw, in JSON mode either; piped, JSON mode writes
the lines byte for byte.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import os
import re
import stat
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson

from ..config import COMPRESSED
from ..errors import NoInputError, UsageError

MAX_LINE = 16 << 20  # longer lines are shown as malformed, with their start only
PREVIEW = 2048  # bytes of a malformed line that are shown
BLOCK = 1 << 16  # read size when reading backwards
READ = 1 << 20  # read size when reading forwards
POLL = 0.1  # seconds between looks at the file when following without inotify
FALLBACK_POLL = 2.0  # with inotify: seconds between looks when no event came (a change inotify cannot see)
DRAIN_GRACE = 10.0  # seconds a rotated-away file is still read after its last new line
SEEN_BYTES = 1 << 20  # what we remember of what we printed, to skip lines a copytruncate put back
DEFAULT_LINES = 10


# -- lines -------------------------------------------------------------------------------------------
class Line:
    """One line of the file: a JSON object (``obj``), or malformed (``error`` says why)."""

    __slots__ = ("error", "length", "obj", "raw")

    def __init__(self, raw: bytes, obj: dict[str, Any] | None, error: str | None, length: int) -> None:
        self.raw = raw  # the line without its newline (only its start when it is too long)
        self.obj = obj
        self.error = error
        self.length = length  # of the whole line, in bytes

    def __repr__(self) -> str:
        return f"<Line {self.length} bytes {'ok' if self.obj is not None else self.error}>"

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "backslashreplace")


def parse_line(raw: bytes) -> Line:
    """Parse one line; anything that is not a JSON object comes back malformed, with the reason."""
    if len(raw) > MAX_LINE:
        return too_long(raw[:PREVIEW], len(raw))
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Line(raw, None, f"not UTF-8 (byte {exc.start})", len(raw))
        try:  # what orjson refuses and is still JSON: integers beyond 64 bits, for one
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return Line(raw, None, f"not JSON ({exc.msg} at column {exc.colno})", len(raw))
        except (ValueError, RecursionError) as exc:
            return Line(raw, None, f"not JSON ({str(exc)[:80] or 'nested too deeply'})", len(raw))
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        return Line(raw, None, f"JSON {kind}, not an object", len(raw))
    return Line(raw, obj, None, len(raw))


def too_long(preview: bytes, length: int) -> Line:
    return Line(preview, None, f"line too long ({length} bytes, more than {MAX_LINE >> 20} MiB)", length)


class LineSplitter:
    """Bytes in, complete lines out (sans-I/O); a line over MAX_LINE is skipped and reported once."""

    __slots__ = ("buf", "preview", "skipped")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.preview = b""
        self.skipped = 0  # bytes of the overlong line being skipped (0: not skipping)

    def reset(self) -> None:
        self.buf.clear()
        self.preview = b""
        self.skipped = 0

    def feed(self, data: bytes) -> list[Line]:
        out: list[Line] = []
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            piece = data[start:nl]
            start = nl + 1
            if self.skipped:
                out.append(too_long(self.preview, self.skipped + len(piece)))
                self.preview, self.skipped = b"", 0
                continue
            if self.buf:
                self.buf += piece
                piece = bytes(self.buf)
                self.buf.clear()
            if piece.strip():
                out.append(parse_line(piece))
        rest = data[start:]
        if self.skipped:
            self.skipped += len(rest)
        elif rest:
            self.buf += rest
            if len(self.buf) > MAX_LINE:
                self.preview, self.skipped = bytes(self.buf[:PREVIEW]), len(self.buf)
                self.buf.clear()
        return out

    def finish(self) -> Line | None:
        """At the end of a stream: its last line if it had no newline (None if there is none)."""
        if not self.buf and not self.skipped:
            return None
        lines = self.feed(b"\n")
        return lines[0] if lines else None  # whitespace only: no line, as anywhere else


def lines_backwards(fd: int, end: int) -> Iterator[Line]:
    """The lines of [0, end) from the last to the first; ``end`` is just after a newline (or 0)."""
    if end <= 0:
        return
    line_end = end - 1  # where the newline of the line being collected is
    pos = line_end
    parts: list[bytes] = []  # the line's bytes found so far, last part first
    have = 0
    overlong = False
    while pos > 0:
        start = max(0, pos - BLOCK)
        chunk = os.pread(fd, pos - start, start)
        if len(chunk) < pos - start:
            return  # the file was truncated under us: what is left to read is not there any more
        i = len(chunk)
        while (nl := chunk.rfind(b"\n", 0, i)) >= 0:
            line = _assemble(fd, start + nl + 1, line_end, chunk[nl + 1 : i], parts, overlong=overlong)
            if line is not None:
                yield line
            parts, have, overlong = [], 0, False
            line_end, i = start + nl, nl
        if not overlong and i:
            parts.append(chunk[:i])
            have += i
            if have > MAX_LINE:
                parts, overlong = [], True
        pos = start
    line = _assemble(fd, 0, line_end, b"", parts, overlong=overlong)
    if line is not None:
        yield line


def _assemble(fd: int, start: int, stop: int, first: bytes, parts: list[bytes], *, overlong: bool) -> Line | None:
    if overlong or stop - start > MAX_LINE:
        return too_long(os.pread(fd, PREVIEW, start), stop - start)
    raw = first + b"".join(reversed(parts)) if parts else first
    return parse_line(raw) if raw.strip() else None


# -- filters -----------------------------------------------------------------------------------------
_DURATION = re.compile(r"\s*(?:\d+(?:\.\d+)?\s*[smhdw]\s*)+", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TIME_FORMS = (
    "ISO 8601 (2026-11-29T12:00:00Z, 2026-11-29T13:00:00+01:00; without an offset: local time), "
    "'YYYY-MM-DD HH:MM:SS', 'YYYY-MM-DD', or a duration ago: 30s, 10m, 2h, 1d, 1w, 1h30m"
)


def parse_time(text: str, option: str, now: datetime | None = None) -> datetime:
    """An absolute time (naive: local time) or a duration before ``now``; UsageError if neither."""
    now = now or datetime.now(UTC)
    if _DURATION.fullmatch(text):
        seconds = sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in _DURATION_PART.findall(text))
        try:
            return now - timedelta(seconds=seconds)
        except OverflowError:
            raise UsageError(f"{option} {text!r}: too far back") from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: not a time; use {TIME_FORMS}") from None
    return when.astimezone() if when.tzinfo is None else when


def _record_time(obj: dict[str, Any]) -> datetime | None:
    ts = obj.get("timestamp")
    if not isinstance(ts, str):
        return None
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when  # the daemon writes UTC


def _record_user(obj: dict[str, Any]) -> str | None:
    user = obj.get("send_user")
    if isinstance(user, str):
        return user
    raw = obj.get("raw")
    if obj.get("event") == "rejected" and isinstance(raw, str) and "send_user" in raw:
        try:
            refused = json.loads(raw)  # the refused input, as the rejects log keeps it
        except (ValueError, RecursionError):
            return None
        if isinstance(refused, dict) and isinstance(refused.get("send_user"), str):
            return str(refused["send_user"])
    return None


def _grep_text(line: Line) -> str:
    obj = line.obj
    if obj is not None:
        msg = obj.get("send_msg")
        if isinstance(msg, str):
            return msg
        if obj.get("event") == "rejected":
            return "\n".join(v for v in (obj.get("error"), obj.get("raw")) if isinstance(v, str))
    return line.text


class Filter:
    """Which lines to print: by user, time range, and a regex over the message."""

    def __init__(
        self,
        users: list[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        grep: re.Pattern[str] | None = None,
    ) -> None:
        self.users = frozenset(users) if users else None
        self.since = since
        self.until = until
        self.grep = grep

    @property
    def by_time(self) -> bool:
        return self.since is not None or self.until is not None

    def __call__(self, line: Line) -> bool:
        obj = line.obj
        if obj is None:  # a malformed line has no user and no time; --grep sees its text
            if self.users is not None or self.by_time:
                return False
        else:
            if self.users is not None and _record_user(obj) not in self.users:
                return False
            if self.by_time:
                when = _record_time(obj)
                if when is None:
                    return False
                if (self.since is not None and when < self.since) or (self.until is not None and when > self.until):
                    return False
        return self.grep is None or self.grep.search(_grep_text(line)) is not None


# -- output ------------------------------------------------------------------------------------------
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class TooDeepError(ValueError):
    """A value nested too deeply for orjson and for the bounded json fallback to write."""


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError: integers beyond 64 bits, or nested deeper than 254
        pass
    try:
        # orjson parses up to 1024 levels, deeper than it writes: json writes more, within the
        # interpreter's recursion limit, which bounds it.
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise TooDeepError("nested too deeply") from None


def safe_text(value: Any) -> str:
    """A value as one line of text a terminal cannot misread: control and bidi characters escaped.

    TooDeepError if it is nested too deeply to be written as JSON.
    """
    if not isinstance(value, str):
        value = _dumps(value)
    return _UNSAFE.sub(_escape_char, value)


def render_json(line: Line) -> bytes:
    """The line as it is in the file; a malformed line as a JSON object saying so."""
    if line.obj is not None:
        return line.raw + b"\n"
    return orjson.dumps({"malformed": True, "error": line.error, "bytes": line.length, "raw": line.text}) + b"\n"


def _escape_json_char(match: re.Match[str]) -> str:
    # In a line that parsed, a C0 character can only be whitespace between tokens (JSON allows
    # none raw inside a string); every other unsafe character is inside a string, where its
    # \u escape is the same value.
    ch = match.group()
    return " " if ch < " " else f"\\u{ord(ch):04x}"


def render_json_terminal(line: Line) -> bytes:
    """``render_json`` for a terminal: the same JSON values, with no control or bidi character raw."""
    text = render_json(line)[:-1].decode("utf-8", "backslashreplace")
    return _UNSAFE.sub(_escape_json_char, text).encode() + b"\n"


# Keys structlog's ConsoleRenderer treats specially (tracebacks, columns): a record's own are renamed.
_SPECIAL = frozenset({"timestamp", "level", "event", "logger", "logger_name", "stack", "exception", "exc_info"})


class PrettyRenderer:
    """Human-readable lines through structlog's ConsoleRenderer: the message is the event."""

    def __init__(self, colors: bool) -> None:
        from structlog.dev import BRIGHT, RED, RESET_ALL, ConsoleRenderer

        self.colors = colors
        self._console = ConsoleRenderer(colors=colors, sort_keys=False, pad_event_to=30)
        self._bad = f"{BRIGHT}{RED}[malformed]{RESET_ALL}" if colors else "[malformed]"
        self._deep = f"{BRIGHT}{RED}[too deep]{RESET_ALL}" if colors else "[too deep]"

    def __call__(self, line: Line) -> bytes:
        if line.obj is None:
            text = f"{self._bad} {safe_text(line.error)}: {self._preview(line)}"
        else:
            try:
                text = self._record(line.obj)
            except TooDeepError:
                text = f"{self._deep} JSON nested too deeply to show as fields: {self._preview(line)}"
        return text.encode("utf-8", "backslashreplace") + b"\n"

    @staticmethod
    def _preview(line: Line) -> str:
        more = "…" if line.length > len(line.raw) or len(line.raw) > PREVIEW else ""
        return f"{safe_text(line.text[:PREVIEW])}{more}"

    def _record(self, obj: dict[str, Any]) -> str:
        fields = dict(obj)
        event = fields.pop("event", "")
        if event == "message" and "send_msg" in fields:
            event = fields.pop("send_msg")
        event_dict: dict[str, Any] = {
            "timestamp": safe_text(fields.pop("timestamp", "")),
            "level": safe_text(fields.pop("level", "")),
            "event": safe_text(event),
        }
        for key, value in fields.items():
            name = safe_text(key)
            while name in _SPECIAL or name in event_dict:
                name += "_"
            event_dict[name] = safe_text(value)
        text: str = self._console(None, "info", event_dict)
        return text


class Printer:
    """Filters lines and writes the ones kept to ``out`` (a binary stream)."""

    def __init__(self, out: IO[bytes], keep: Filter, render: Callable[[Line], bytes]) -> None:
        self.out = out
        self.keep = keep
        self.render = render

    def __call__(self, lines: list[Line]) -> None:
        for line in lines:
            if self.keep(line):
                self.out.write(self.render(line))

    def flush(self) -> None:
        self.out.flush()


# -- reading the file --------------------------------------------------------------------------------
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class NotRegularFileError(OSError):
    """The path names a directory, FIFO, device or socket: only regular files are read."""

    def __init__(self, st: os.stat_result) -> None:
        super().__init__(f"{_KINDS.get(stat.S_IFMT(st.st_mode), 'an unknown kind of file')}, not a regular file")
        self.st = st


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of ``path`` if it is a regular file; NotRegularFileError if it is not."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # not even opened: opening a device can act (a tape rewinds)
        raise NotRegularFileError(st)
    # The path can change between the two looks. O_NONBLOCK: open() returns at once on a FIFO
    # without a writer instead of waiting for one; O_NOCTTY: a terminal does not become ours.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(st)
        os.set_blocking(fd, True)  # the flag was for open() only; reads of the file keep their usual meaning
    except BaseException:
        os.close(fd)
        raise
    return fd


def complete_end(fd: int, size: int) -> int:
    """The offset just after the file's last newline: a last line still being written is not done."""
    pos = size
    while pos > 0:
        start = max(0, pos - BLOCK)
        chunk = os.pread(fd, pos - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def last_lines(fd: int, end: int, n: int, keep: Filter) -> list[Line]:
    """The last ``n`` lines of [0, end) that ``keep`` accepts, in file order."""
    out: list[Line] = []
    if n <= 0:
        return out
    for line in lines_backwards(fd, end):
        if keep(line):
            out.append(line)
            if len(out) >= n:
                break
    out.reverse()
    return out


def all_lines(fd: int, end: int, emit: Callable[[list[Line]], None]) -> None:
    """Every line of [0, end), front to back, in bounded memory."""
    splitter = LineSplitter()
    pos = 0
    while pos < end:
        data = os.pread(fd, min(READ, end - pos), pos)
        if not data:
            break
        pos += len(data)
        emit(splitter.feed(data))


def unterminated_line(fd: int, end: int, size: int) -> Line | None:
    """The bytes of [end, size) (after the last newline) as a line; None if there are none (or blanks)."""
    if size - end > MAX_LINE:
        return too_long(os.pread(fd, PREVIEW, end), size - end)
    raw = os.pread(fd, size - end, end) if size > end else b""
    return parse_line(raw) if raw.strip() else None


# -- streams: stdin and compressed files --------------------------------------------------------------
# What the first bytes of a file say it is: the formats read, and the ones that are only named.
_COMPRESSED_MAGIC = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
_OTHER_MAGIC = (
    (b"\x28\xb5\x2f\xfd", "zstd", "zstd -dc"),
    (b"\x04\x22\x4d\x18", "lz4", "lz4 -dc"),
    (b"\x89LZO\x00", "lzop", "lzop -dc"),
    (b"\x1f\x9d", "compress (.Z)", "uncompress -c"),
    (b"PK\x03\x04", "zip", "unzip -p"),
)
_OPENERS: dict[str, Callable[..., Any]] = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open, "lzma": lzma.open}
# What a damaged compressed file raises while it is read: truncated (EOFError), corrupt (the rest).
_DECODE_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


def compression(fd: int, path: Path) -> str | None:
    """The compression of the open file (gzip, bzip2, xz, lzma), None for a plain file.

    NoInputError for a compression that is recognised and not read (zstd, lz4, ...), with the
    command that decompresses it into ``nio-logd tail -``.
    """
    head = os.pread(fd, 8, 0)
    for magic, kind in _COMPRESSED_MAGIC:
        if head.startswith(magic) and (kind != "bzip2" or head[3:4].isdigit()):
            return kind
    if path.name.endswith(".lzma") and head[:1] == b"\x5d":  # the old .lzma format has no real magic
        return "lzma"
    for magic, kind, command in _OTHER_MAGIC:
        if head.startswith(magic):
            shown = safe_text(str(path))
            raise NoInputError(
                f"{shown}: {kind}-compressed; only gzip, bzip2 and xz files are read "
                f"(decompress it into stdin: {command} {shown} | nio-logd tail -)"
            )
    return None


def decompressed(fd: int, kind: str, shown: str) -> Iterator[bytes]:
    """The decompressed bytes of the open file ``fd`` in blocks (closes it); NoInputError where the
    data is corrupt or cut short, after the blocks decoded before it."""
    decoded = 0
    with os.fdopen(fd, "rb") as raw, _OPENERS[kind](raw, "rb") as f:
        while True:
            try:
                data = f.read1(READ)  # one decompression step at a time: an error loses little
            except _DECODE_ERRORS as exc:
                reason = safe_text(str(exc) or type(exc).__name__)
                raise NoInputError(
                    f"{shown}: {kind} data corrupt or cut short after {decoded} bytes ({reason}); "
                    "the lines before it are printed"
                ) from None
            if not data:
                return
            decoded += len(data)
            yield data


def stdin_blocks(fd: int) -> Iterator[bytes]:
    """What stdin holds, in blocks as they arrive, to its end."""
    while True:
        try:
            data = os.read(fd, READ)
        except OSError as exc:
            raise NoInputError(f"stdin: cannot read: {exc.strerror}") from None
        if not data:
            return
        yield data


def print_stream(blocks: Iterator[bytes], n: int, keep: Filter, printer: Printer) -> Line | None:
    """The last ``n`` lines of a stream that ``keep`` accepts (n < 0: all of them, printed as they
    come), in bounded memory; a last line without a newline is one. Returns that line if it was
    printed. If the stream fails (NoInputError), the lines read before are printed first."""
    splitter = LineSplitter()
    last: deque[Line] | None = deque(maxlen=n) if n >= 0 else None

    def take(lines: list[Line]) -> None:
        if last is None:
            printer(lines)
            printer.flush()
        else:
            last.extend(line for line in lines if keep(line))

    try:
        for data in blocks:
            take(splitter.feed(data))
    except NoInputError:
        if last is not None:
            printer(list(last))
        printer.flush()
        raise
    final = splitter.finish()
    if final is not None:
        take([final])
    if last is not None:
        printer(list(last))
    printer.flush()
    if final is None or not keep(final) or (last is not None and (not last or last[-1] is not final)):
        return None
    return final


class _Source:
    """A file being followed: its descriptor and identity, how far it was read."""

    __slots__ = ("dev", "fd", "idle_since", "ino", "pos", "seen", "skip_seen", "splitter")

    def __init__(self, fd: int, pos: int = 0) -> None:
        st = os.fstat(fd)
        self.fd = fd
        self.dev, self.ino = st.st_dev, st.st_ino
        self.pos = pos
        self.splitter = LineSplitter()
        self.seen = b""  # the last bytes read, up to ``pos``
        self.skip_seen = b""  # after a truncation: what we printed, in case the daemon writes it again
        self.idle_since = time.monotonic()

    def __repr__(self) -> str:
        return f"<_Source fd={self.fd} ino={self.ino} pos={self.pos}>"

    def same_file(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def close(self) -> None:
        os.close(self.fd)


class _Wakeup:
    """Sleep until the followed files may have changed: inotify where the kernel has it, else polling.

    With inotify each open file is watched through /proc/self/fd (its inode, whatever its name is
    now: a rotated-away file still being written wakes us too), and the folder for a file created
    or moved at the path. The events themselves are not looked at: any one means look again. A
    watch that cannot be added (no /proc, the watch limit) falls back to polling.
    """

    FILE_EVENTS = 0x2 | 0x4 | 0x400 | 0x800  # IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF
    FOLDER_EVENTS = 0x100 | 0x80 | 0x40 | 0x200  # IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.inotify: Any = None
        self.watches: dict[int, int] = {}  # a followed file's descriptor -> its watch
        self.polling = False  # a watch is missing: look every POLL seconds, as without inotify
        self.folder_watched = False
        try:
            import inotify_simple  # type: ignore[import-untyped,unused-ignore]

            self.inotify = inotify_simple.INotify()
        except (ImportError, OSError):  # not installed; no inotify in this kernel or container; no more instances
            return
        self._watch_folder()

    def _watch_folder(self) -> None:
        try:
            self.inotify.add_watch(self.folder, self.FOLDER_EVENTS)
            self.folder_watched = True
        except OSError:  # not there (yet): the file cannot appear without it; poll until it is
            self.folder_watched = False

    def watch(self, fd: int) -> None:
        if self.inotify is None:
            return
        try:
            self.watches[fd] = self.inotify.add_watch(f"/proc/self/fd/{fd}", self.FILE_EVENTS)
        except OSError:
            self.polling = True

    def unwatch(self, fd: int) -> None:
        wd = self.watches.pop(fd, None)
        if wd is not None and wd not in self.watches.values():
            try:
                self.inotify.rm_watch(wd)
            except OSError:  # the file is gone: its watch went with it
                pass

    def wait(self) -> None:
        if self.inotify is not None and not self.folder_watched:
            self._watch_folder()
        if self.inotify is None or self.polling or not self.folder_watched:
            time.sleep(POLL)
            return
        self.inotify.read(timeout=int(FALLBACK_POLL * 1000))

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None


class Follower:
    """``tail -F``: print what is appended to ``path``, across rotation and truncation."""

    def __init__(self, path: Path, emit: Callable[[list[Line]], None], notice: Callable[[str], None]) -> None:
        self.path = path
        self.shown = safe_text(str(path))  # a file name can hold terminal escapes too
        self.emit = emit
        self.notice = notice
        self.current: _Source | None = None
        self.draining: list[_Source] = []
        self.waiting = False
        self.refused: tuple[int, int] | None = None  # the non-regular file at the path last reported
        self.wakeup: _Wakeup | None = None  # while running

    def start_at(self, fd: int, pos: int) -> None:
        """Follow the open file ``fd`` from ``pos`` (where the initial output stopped)."""
        self.current = _Source(fd, pos)
        if pos:
            self.current.seen = os.pread(fd, min(pos, 64), pos - min(pos, 64))

    def run(self) -> None:
        self.wakeup = wakeup = _Wakeup(self.path.parent)
        try:
            if self.current is not None:
                wakeup.watch(self.current.fd)
            if self.current is None and not self.path.exists():
                self.notice(f"{self.shown}: no such file yet; waiting for it to appear")
                self.waiting = True
            while True:
                if not self.step():
                    wakeup.wait()
        finally:
            wakeup.close()
            self.wakeup = None

    def _watch(self, src: _Source) -> None:
        if self.wakeup is not None:
            self.wakeup.watch(src.fd)

    def _close(self, src: _Source) -> None:
        if self.wakeup is not None:
            self.wakeup.unwatch(src.fd)
        src.close()

    def step(self) -> bool:
        """One look at the files; True if any line was read."""
        got = False
        now = time.monotonic()
        for src in list(self.draining):
            if self._read(src):
                got = True
                src.idle_since = now
            elif now - src.idle_since > DRAIN_GRACE:
                self.draining.remove(src)
                self._close(src)
        current = self.current
        if current is not None:
            self._check_truncated(current)
            got |= self._read(current)
        try:
            named = os.stat(self.path)
        except OSError:
            return got  # moved away, not created again yet: keep reading the open file
        if current is not None and current.same_file(named):
            return got
        try:
            fd = open_regular(self.path)
        except NotRegularFileError as exc:
            self._refuse(exc)
            return got  # as when it is moved away: the file still open goes on being read
        except OSError:
            return got
        self.refused = None
        new = _Source(fd)
        if current is not None:
            self._read(current)  # what was written before the switch
            current.idle_since = now
            self.draining.append(current)
            self.notice(f"{self.shown}: replaced by a new file (rotated); following the new file")
            for missed in self._rotated_between(current, new):
                got |= self._read_whole(missed)
        elif self.waiting:
            self.notice(f"{self.shown}: has appeared; following it")
            self.waiting = False
        self.current = new
        self._watch(new)  # before reading: what is written after the read wakes us
        return self._read(new) or got

    def _refuse(self, exc: NotRegularFileError) -> None:
        """Say once per file that the path is not a regular file; wait for one to take its place."""
        if self.current is None:
            self.waiting = True
        key = (exc.st.st_dev, exc.st.st_ino)
        if key != self.refused:
            self.refused = key
            self.notice(f"{self.shown}: {exc}; waiting for a regular file")

    def _rotated_between(self, old: _Source, new: _Source) -> list[_Source]:
        """Files rotated after ``old`` and before ``new`` (several rotations between two looks),
        opened, oldest first.

        Rotated files are PATH.1 (newest), PATH.2, ... (the daemon's own rotation, logrotate
        without dateext): the ones named before ``old``'s current name are newer than it. Each is
        opened before it is identified, and a file met twice (the names shifted meanwhile: another
        rotation) is taken once; as ``new`` is already open, the set to find cannot change.
        """
        for attempt in range(3):
            found: list[_Source] = []
            seen = {(new.dev, new.ino)}
            gap = 0
            for i in range(1, 10_000):
                try:
                    fd = open_regular(f"{self.path}.{i}")
                except OSError:
                    gap += 1  # a rotation may be shifting the names right now: look a little further
                    if gap > 2:
                        break
                    continue
                gap = 0
                src = _Source(fd)
                if old.same_file(os.fstat(fd)):
                    src.close()
                    return found[::-1]
                if (src.dev, src.ino) in seen:
                    src.close()
                    continue
                seen.add((src.dev, src.ino))
                found.append(src)
            for src in found:
                src.close()
            if attempt < 2:
                time.sleep(0.02)
        return []  # old is not among them (renamed otherwise, or gone): nothing known

    def _read_whole(self, src: _Source) -> bool:
        try:
            got = self._read(src)
            if src.splitter.buf:  # a rotated file is complete; a last line without newline is still one
                self.emit(src.splitter.feed(b"\n"))
                got = True
            return got
        finally:
            src.close()

    def _read(self, src: _Source) -> bool:
        got = False
        while True:
            data = os.pread(src.fd, READ, src.pos)
            if not data:
                return got
            if src.skip_seen:
                data = self._skip_repeated(src, data)
            src.pos += len(data)
            src.seen = (src.seen + data)[-SEEN_BYTES:]
            lines = src.splitter.feed(data)
            if lines:
                self.emit(lines)
                got = True
            if len(data) < READ:
                return got

    def _check_truncated(self, src: _Source) -> None:
        size = os.fstat(src.fd).st_size
        if size >= src.pos:
            probe = src.seen[-64:]
            if not probe or os.pread(src.fd, len(probe), src.pos - len(probe)) == probe:
                return
        self.notice(f"{self.shown}: truncated; reading it again from the start")
        self._catch_up_from_copy(src)
        # The whole lines printed last (not a partial one): the daemon may write them again at the top.
        src.skip_seen = src.seen[src.seen.find(b"\n") + 1 : src.seen.rfind(b"\n") + 1]
        src.pos = 0
        src.seen = b""
        src.splitter.reset()

    def _catch_up_from_copy(self, src: _Source) -> None:
        """logrotate copytruncate: print the lines its copy holds that we had not read yet."""
        probe = src.seen[-64:]
        if not probe:
            return
        prefix = self.path.name.partition(".")[0] or self.path.name
        try:
            entries = list(os.scandir(self.path.parent))
        except OSError:
            return
        for entry in sorted(entries, key=_mtime, reverse=True):
            name = entry.name
            if name == self.path.name or not name.startswith(prefix) or name.endswith(COMPRESSED):
                continue
            try:
                with os.fdopen(open_regular(entry.path), "rb") as f:
                    if os.fstat(f.fileno()).st_size < src.pos:
                        continue
                    f.seek(src.pos - len(probe))
                    if f.read(len(probe)) != probe:
                        continue
                    while data := f.read(READ):
                        src.pos += len(data)
                        src.seen = (src.seen + data)[-SEEN_BYTES:]
                        self.emit(src.splitter.feed(data))
            except OSError:
                continue
            return

    def _skip_repeated(self, src: _Source, data: bytes) -> bytes:
        """The daemon writes again at the top what a copytruncate copy missed: do not print it twice."""
        seen, src.skip_seen = src.skip_seen, b""
        start = 0
        while start < len(seen):
            suffix = seen[start:]
            if data.startswith(suffix):
                src.pos += len(suffix)
                return data[len(suffix) :]
            nl = seen.find(b"\n", start)
            if nl < 0:
                break
            start = nl + 1
        return data


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


# -- the command -------------------------------------------------------------------------------------
def _count(text: str) -> int:
    if text == "all":
        return -1
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a number of lines, or 'all'")
    return int(text)


def _use_colors(choice: str, out: IO[bytes]) -> bool:
    if choice != "auto":
        return choice == "always"
    return out.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def build_filter(args: argparse.Namespace) -> Filter:
    now = datetime.now(UTC)
    since = parse_time(args.since, "--since", now) if args.since is not None else None
    until = parse_time(args.until, "--until", now) if args.until is not None else None
    if since is not None and until is not None and since > until:
        raise UsageError(f"--since {args.since!r} is after --until {args.until!r}")
    grep = None
    if args.grep is not None:
        try:
            grep = re.compile(args.grep, re.IGNORECASE if args.ignore_case else 0)
        except re.error as exc:
            raise UsageError(f"--grep {args.grep!r}: not a valid regular expression: {exc}") from None
    return Filter(args.user, since, until, grep)


def _log_path(args: argparse.Namespace) -> Path:
    if args.file is not None:
        if args.rejects:
            raise UsageError("give FILE or --rejects, not both")
        return Path(args.file)
    from ..config import load_settings

    settings = load_settings(args.config)
    return settings.resolve(settings.log.rejects_path if args.rejects else settings.log.path)


def tail_command(
    args: argparse.Namespace, out: IO[bytes], say: Callable[[str], None], stdin: IO[bytes] | None = None
) -> int:
    """``nio-logd tail``: print to ``out``; ``say`` gets the notices (rotation, a file gone).

    FILE ``-`` reads ``stdin`` (None: it is closed).
    """
    keep = build_filter(args)
    if args.from_url is not None:
        return _tail_stream(args, out, keep, say)
    path = _log_path(args)
    if args.follow and path.name.endswith(COMPRESSED):
        raise UsageError(f"-f: {safe_text(str(path))} is compressed and does not grow; drop -f to read it")
    pretty = args.pretty or (not args.json and out.isatty())
    render: Callable[[Line], bytes]
    if pretty:
        render = PrettyRenderer(_use_colors(args.color, out))
    else:  # piped, the lines as they are; a terminal must not get them raw
        render = render_json_terminal if out.isatty() else render_json
    printer = Printer(out, keep, render)
    n = args.lines if args.lines is not None else (-1 if keep.by_time else DEFAULT_LINES)

    def notice(text: str) -> None:
        printer.flush()
        say(text)

    def emit(lines: list[Line]) -> None:
        printer(lines)
        printer.flush()

    no_newline = "the last line has no newline at its end; printed as it is"
    if args.file == "-":
        try:
            fd = -1 if stdin is None else stdin.fileno()
        except (OSError, ValueError):  # closed, or not a real file
            fd = -1
        if fd < 0:
            raise NoInputError("stdin: cannot read: it is closed")
        # -f: every line as it comes, until the end of the stream (-n has nothing to count back from)
        if print_stream(stdin_blocks(fd), -1 if args.follow else n, keep, printer) is not None:
            notice(no_newline)
        return 0
    follower = Follower(path, emit, notice) if args.follow else None
    shown = safe_text(str(path))
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        if follower is None:
            raise NoInputError(f"{shown}: no such file (-f waits for it to appear)") from None
        fd = -1
    except NotRegularFileError as exc:
        if follower is None:
            raise NoInputError(f"{shown}: {exc}") from None
        fd = -1  # the follower says so, and waits for a regular file as for a missing one
    except OSError as exc:
        raise NoInputError(f"{shown}: cannot open: {exc.strerror}") from None
    if fd >= 0:
        try:
            kind = compression(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if kind is not None:
            if follower is not None:
                os.close(fd)
                raise UsageError(f"-f: {shown} is {kind}-compressed and does not grow; drop -f to read it")
            if print_stream(decompressed(fd, kind, shown), n, keep, printer) is not None:
                notice(no_newline)
            return 0
        try:
            size = os.fstat(fd).st_size
            end = complete_end(fd, size)
            # Read once, a static file's last line without a newline is shown if it is a whole JSON
            # object; a fragment is a write in progress (-f prints it once its newline is there).
            final = unterminated_line(fd, end, size) if follower is None else None
            fragment = final if final is not None and final.obj is None else None
            kept = [final] if final is not None and fragment is None and n != 0 and keep(final) else []
            if n < 0:
                all_lines(fd, end, printer)
                printer(kept)
            else:
                printer([*last_lines(fd, end, n - len(kept), keep), *kept])
            printer.flush()
        except BaseException:
            os.close(fd)
            raise
        if follower is None:
            os.close(fd)
            if kept:
                notice(no_newline)
            elif fragment is not None:
                notice(
                    f"the last line ({fragment.length} bytes) has no newline and is not a whole JSON object "
                    "(still being written?); not shown"
                )
            return 0
        follower.start_at(fd, end)
    assert follower is not None
    follower.run()
    return 0


def _tail_stream(args: argparse.Namespace, out: IO[bytes], keep: Filter, say: Callable[[str], None]) -> int:
    """``--from nats://HOST:PORT/STREAM``: the same filters and output, for the stream all hosts forward to."""
    from .tail_nats import StreamURL, read_stream

    if args.file is not None or args.rejects:
        raise UsageError("give --from or FILE/--rejects, not both")
    url = StreamURL.parse(args.from_url)
    pretty = args.pretty or (not args.json and out.isatty())
    render: Callable[[Line], bytes]
    if pretty:
        render = PrettyRenderer(_use_colors(args.color, out))
    else:
        render = render_json_terminal if out.isatty() else render_json
    printer = Printer(out, keep, render)
    n = args.lines if args.lines is not None else (-1 if keep.by_time else DEFAULT_LINES)
    filtered = keep.users is not None or keep.grep is not None or keep.by_time
    # Without filters the last N are the stream's last N; with them, the stream is read from the
    # start (or from --since) and the last N that pass are kept.
    last = n if n >= 0 and not filtered else None
    held: deque[Line] = deque(maxlen=n if n >= 0 else None)

    def on_batch(data: list[bytes], past: bool) -> None:
        lines = [parse_line(raw.rstrip(b"\n")) for raw in data]
        if past and n >= 0:
            held.extend(line for line in lines if keep(line))
            return
        printer(lines)
        printer.flush()

    def on_caught_up() -> None:
        if n >= 0:
            printer(list(held))
            held.clear()
        printer.flush()

    read_stream(url, last=last, since=keep.since, follow=args.follow, on_batch=on_batch, on_caught_up=on_caught_up)
    return 0


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """Add ``nio-logd tail`` to the command line's subparsers (the CLI sets its handler)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "tail",
        help="print the messages log: last lines, follow across rotation, filters, pretty or JSON",
        description="Print the last lines of the messages log (or FILE), optionally following it across "
        "rotation like tail -F. Pretty and coloured on a terminal, raw JSON lines otherwise. A line that "
        'is not a JSON object is shown marked [malformed] (with --json: as {"malformed": true, ...}).',
        epilog="examples:\n"
        "  nio-logd tail                        # last 10 records of the config's messages log\n"
        "  nio-logd tail -n 100 --user alice    # alice's last 100 records\n"
        "  nio-logd tail -f                     # follow, across rotation and truncation (like tail -F)\n"
        "  nio-logd tail --since 10m --grep 'disk (full|error)' -i\n"
        "  nio-logd tail --since '2026-11-29 08:00:00' --until 2026-11-29T09:00:00Z\n"
        "  nio-logd tail --rejects -f           # refused records, with their reasons\n"
        "  nio-logd tail /var/log/nio-logd/messages.log.1 --json | jq .send_msg\n"
        "  nio-logd tail -n all --user alice /var/log/nio-logd/messages.log.2.gz   # rotated and compressed\n"
        "  some-producer | nio-logd tail -f --pretty -                            # stdin, as it comes\n"
        "  nio-logd tail --from nats://127.0.0.1:4222/LOGS -f  # the stream the daemons forward to\n",
    )
    common(p)
    p.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="the log file to read, plain or gzip/bzip2/xz-compressed; '-' reads stdin "
        "(default: the config's messages log, or rejects log with --rejects)",
    )
    p.add_argument(
        "-n",
        "--lines",
        type=_count,
        metavar="N",
        help="print the last N lines that pass the filters, or 'all' "
        f"(default: {DEFAULT_LINES}; all with --since/--until)",
    )
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="then print new lines as they come, across rotation (rename + new file, truncation), like tail -F; "
        "waits for a missing file (or for a regular file in place of a directory, FIFO or device); Ctrl-C stops. "
        "Not for a compressed file; with FILE '-', every line of stdin as it comes, until its end",
    )
    p.add_argument(
        "--user", action="append", metavar="U", help="only records whose send_user is U (repeat for several users)"
    )
    p.add_argument("--since", metavar="T", help=f"only lines whose timestamp is T or later; T is {TIME_FORMS}")
    p.add_argument("--until", metavar="T", help="only lines whose timestamp is T or earlier (same forms)")
    p.add_argument(
        "--grep",
        metavar="REGEX",
        help="only lines where REGEX (Python syntax, re.search) matches the record's send_msg; "
        "in the rejects log its error and raw input; for a malformed line, the whole line",
    )
    p.add_argument("-i", "--ignore-case", action="store_true", help="--grep ignores case")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json", action="store_true", help="raw JSON lines as in the file (the default when stdout is not a terminal)"
    )
    fmt.add_argument("--pretty", action="store_true", help="human-readable lines even when stdout is not a terminal")
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colours in human-readable output (auto: on a terminal, unless $NO_COLOR is set)",
    )
    p.add_argument("--rejects", action="store_true", help="read the config's rejects log instead")
    p.add_argument(
        "--from",
        dest="from_url",
        metavar="nats://HOST:PORT/STREAM",
        help="read the NATS JetStream stream that the daemons forward to (all hosts' records, each with its "
        "host) instead of a file; same filters and output; -f follows it",
    )
    return p
