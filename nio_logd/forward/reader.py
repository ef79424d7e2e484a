"""Whole lines of the messages log from a position on, across rotation of every kind.

design: the reader holds the file it reads open (by descriptor, so a rename or even a deletion
does not take it away) and returns ``Segment``s: whole lines of one file with their offsets,
at most ``window`` bytes at a time (longer only for a single line longer than that). The files
of the log are its path and the rotated ones next to it ("messages.log.1", "messages.log-2026..."),
oldest first: numbered names by number downwards, then other names by age, the path last.

- rename + create (logrotate, then SIGHUP or SIGUSR1) and the built-in rotation: once the file
  read is no longer at the path and its successor has bytes, the daemon (one writer thread) has
  written its last line to the old file, which is read to its end before the reader moves on;
- copytruncate: the file gets shorter than our position (or the bytes before the position
  change). The copy is found next to it by the bytes we read last (``RECENT``); the lines the
  copy holds past our position are read from it, then the files after it (newer copies, if the
  reader was behind by several rotations, and the file itself) from their start, skipping the
  lines the daemon wrote again there (``copytruncate.py``) if we had read them already. The
  next rotation may rename the files meanwhile: they are listed until two listings agree, and
  opened by identity. Nothing read from the file yet, its size may tell nothing (written back
  to the size we were told): a copy new before it in the listing tells, and is read from its
  start. A copy whose file is not truncated yet is the file's start: read on after it there.
  A copy is matched over a whole line if any does (a copy logrotate has just begun, of lines that
  start alike, matches within one). Lines to skip are looked for whole in a new copy, or in a
  complete copy of their first lines (whole lines, and the log no longer starts with them), the
  rest then at the start of the next file; a copy that holds their start while the log still
  does is still being made, and waited for. With no copy found, what was read is expected again
  at the file's start, until other bytes come there, the file is renamed away and the new one
  written, or a new copy starts with other lines (a shrink alone, or an empty copy, is no sign:
  a size told late, or a copy the daemon writes everything again after).

Sans network, sans threads: the forwarder calls ``read()`` when the writer says it wrote.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import COPYTRUNCATE_JOURNAL_BYTES, rotated_name
from .cursor import CHECK_BYTES, digest

# Bytes read last that are kept: to find a copytruncate copy and skip the lines written again. The
# daemon writes again up to what its journal holds (at most COPYTRUNCATE_JOURNAL_BYTES),
# all of which the reader may have read past the copy's end: so it keeps more than that.
RECENT = 2 * COPYTRUNCATE_JOURNAL_BYTES
PROBE = 4096  # bytes compared at a file's start and at an offset: is one file a copy of the other?
_NUMBERED = re.compile(r"\.(\d{1,6})")
_ATTEMPTS = 8  # listings to find the next file while a rotation renames the files


@dataclass(frozen=True, slots=True)
class Segment:
    """Whole lines of one file, found at ``start``."""

    dev: int
    ino: int
    start: int
    data: bytes

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@dataclass(frozen=True, slots=True)
class Opened:
    """Where ``open_at`` put the reader, and what it could not find (for the events)."""

    dev: int
    ino: int
    offset: int
    problem: str = ""  # non-empty: records may have been lost or will be sent again
    lost_files: int = 0


class _Source:
    __slots__ = ("dev", "fd", "ino", "known", "pos", "recent", "seen")

    def __init__(self, fd: int, pos: int) -> None:
        st = os.fstat(fd)
        self.fd = fd
        self.dev, self.ino = st.st_dev, st.st_ino
        self.pos = pos
        self.recent = bytearray()  # the bytes just before pos (at most RECENT)
        self.seen = st.st_size  # the largest size seen: smaller later means truncated, even before pos
        self.known: set[tuple[int, int]] = set()  # the log's files when we began reading this one

    def __repr__(self) -> str:
        return f"<_Source {self.dev}:{self.ino} at {self.pos}>"

    @property
    def ident(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    def keep(self, data: bytes) -> None:
        self.recent += data
        if len(self.recent) > RECENT:
            del self.recent[: len(self.recent) - RECENT]


def _pread(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        chunk = os.pread(fd, min(n, 1 << 22), offset)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _same_bytes(fd: int, other: int, end: int) -> bool:
    """Do the two files hold the same bytes at their start and just before ``end``?"""
    n = min(end, PROBE)
    return _pread(fd, n, 0) == _pread(other, n, 0) and _pread(fd, n, end - n) == _pread(other, n, end - n)


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _idents(files: list[tuple[Path, os.stat_result]]) -> list[tuple[int, int]]:
    return [_ident(st) for _path, st in files]


def _named(files: list[tuple[Path, os.stat_result]]) -> list[tuple[str, int, int]]:
    return [(path.name, st.st_dev, st.st_ino) for path, st in files]


def _open_ident(path: Path, ident: tuple[int, int]) -> int | None:
    """Open ``path`` if it still is the file ``ident`` (a rotation may have renamed it since)."""
    try:
        fd = _open(path)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != ident:
        os.close(fd)
        return None
    return fd


def _open(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path}: not a regular file")
    return fd


class LogReader:
    """Reads the log at ``path`` (and its rotated files) in whole lines, from a position on."""

    def __init__(self, path: Path, window: int = 1 << 20) -> None:
        self.path = path
        self.window = window
        self.cur: _Source | None = None
        self.skip: bytes = b""  # expected at the start of a truncated file: lines read already
        self.origin: tuple[int, int] | None = None  # the truncated file ``skip`` was set for
        self.notes: list[str] = []  # what happened (truncation, a copy used), for the events

    def __repr__(self) -> str:
        return f"<LogReader {self.path} {self.cur!r}>"

    # -- the files of the log ------------------------------------------------------------------
    def files(self) -> list[tuple[Path, os.stat_result]]:
        """The log's files, oldest first (see the module's docstring)."""
        base = self.path.name
        found: list[tuple[tuple[int, float, str], Path, os.stat_result]] = []
        try:
            entries = list(os.scandir(self.path.parent))
        except OSError:
            return []
        for entry in entries:
            name = entry.name
            if name == base:
                rank: tuple[int, float, str] = (2, 0.0, name)
            elif rotated_name(name, base):
                match = _NUMBERED.fullmatch(name[len(base) :])
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                rank = (0, -int(match.group(1)), name) if match else (1, mtime, name)
            else:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((rank, Path(entry.path), st))
        found.sort(key=lambda item: item[0])
        return [(path, st) for _rank, path, st in found]

    def _listing(self) -> list[tuple[Path, os.stat_result]]:
        """``files()``, listed again until two listings agree. logrotate renames the rotated files
        (.1 to .2, just before it copies) while we list them: a file renamed between the reading of
        the folder and its stat is in that listing under neither name."""
        files = self.files()
        for _ in range(_ATTEMPTS):
            again = self.files()
            if _named(again) == _named(files):
                return again
            files = again
        return files

    def _source(self, fd: int, pos: int, files: list[tuple[Path, os.stat_result]] | None = None) -> _Source:
        src = _Source(fd, pos)
        # A listing no rename tore: a file missing from it would later look like a new copy.
        src.known = set(_idents(self._listing() if files is None else files))
        return src

    def note_written(self, ident: tuple[int, int], size: int) -> None:
        """The daemon has written file ``ident`` up to ``size``: a truncation below it is seen even
        if we never looked at the file in between."""
        cur = self.cur
        if cur is not None and cur.ident == ident and size > cur.seen:
            cur.seen = size

    def _find(self, ident: tuple[int, int]) -> Path | None:
        for path, st in self.files():
            if (st.st_dev, st.st_ino) == ident:
                return path
        return None

    def _open_listed(self, path: Path, ident: tuple[int, int]) -> int | None:
        """Open the file listed as ``path`` by its identity: the next rotation may have given the
        name to another file since (then it is found by its new name). None if it is gone."""
        fd = _open_ident(path, ident)
        return fd if fd is not None else self._open_found(ident)

    def _open_found(self, ident: tuple[int, int]) -> int | None:
        """Open the file ``ident`` by its name now (a rotation renames it between the listing and
        the open: look again); None if it is gone."""
        for _ in range(_ATTEMPTS):
            path = self._find(ident)
            if path is None:
                return None
            fd = _open_ident(path, ident)
            if fd is not None:
                return fd
        return None

    # -- positioning ---------------------------------------------------------------------------
    def open_at(
        self, ident: tuple[int, int] | None, offset: int = 0, check: str = "", *, at_end: bool = False
    ) -> Opened:
        """Start at ``offset`` of the file ``ident`` (None: the path, at its start or ``at_end``)."""
        self.close()
        if ident is None:
            try:
                fd = _open(self.path)
            except FileNotFoundError:
                return Opened(0, 0, 0)  # read() opens it once the daemon has created it
            size = os.fstat(fd).st_size
            self.cur = self._source(fd, size if at_end else 0)
            if at_end and size:
                self.cur.keep(_pread(fd, min(size, CHECK_BYTES), size - min(size, CHECK_BYTES)))
            return Opened(self.cur.dev, self.cur.ino, self.cur.pos)
        found = self._open_found(ident)  # after a restart from the cursor the writer may be rotating
        if found is None:
            files = self.files()
            if not files:
                return Opened(0, 0, 0, f"the file of the cursor ({ident[0]}:{ident[1]}) is gone", 1)
            first = files[0][0]
            self.cur = self._source(_open(first), 0)
            return Opened(
                self.cur.dev,
                self.cur.ino,
                0,
                f"the file of the cursor ({ident[0]}:{ident[1]}) is gone: its records not yet forwarded are lost; "
                f"going on from the start of {first}",
                1,
            )
        fd = found
        path = self._find(ident) or self.path  # its name, for the note below
        src = self._source(fd, offset)
        size = os.fstat(fd).st_size
        before = _pread(fd, min(offset, CHECK_BYTES), offset - min(offset, CHECK_BYTES)) if offset <= size else b""
        if offset <= size and (offset == 0 or digest(before) == check):
            src.keep(before)
            self.cur = src
            return Opened(src.dev, src.ino, offset)
        # Truncated (copytruncate) since the cursor was written: the rest may be in the copy.
        self.cur = src
        copy = self._copy_by_check(src, offset, check)
        src.pos = 0
        if copy is not None:
            os.close(src.fd)
            self.cur = copy
            return Opened(copy.dev, copy.ino, copy.pos)
        return Opened(
            src.dev,
            src.ino,
            0,
            f"{path} was truncated and no copy holding the cursor's position was found: the records between "
            "the position and the truncation may be lost; going on from its start",
        )

    def _copy_by_check(self, src: _Source, offset: int, check: str) -> _Source | None:
        for path, st in reversed(self.files()):
            if (st.st_dev, st.st_ino) == src.ident or st.st_size < offset:
                continue
            try:
                fd = _open(path)
            except OSError:
                continue
            before = _pread(fd, min(offset, CHECK_BYTES), offset - min(offset, CHECK_BYTES))
            if offset == 0 or digest(before) == check:
                copy = self._source(fd, offset)
                copy.keep(before)
                return copy
            os.close(fd)
        return None

    @property
    def position(self) -> tuple[int, int, int]:
        """(dev, ino, offset) of the next byte to read; zeros before the log exists."""
        cur = self.cur
        return (cur.dev, cur.ino, cur.pos) if cur is not None else (0, 0, 0)

    def close(self) -> None:
        if self.cur is not None:
            os.close(self.cur.fd)
        self.cur = None
        self.skip = b""

    # -- reading -------------------------------------------------------------------------------
    def read(self) -> Segment | None:
        """The next whole lines (at most ``window`` bytes, unless one line is longer), or None for now."""
        for _ in range(4):  # a few moves (a rotation, a truncation) per call, never a loop for ever
            cur = self.cur
            if cur is None:
                try:
                    self.cur = self._source(_open(self.path), 0)
                except OSError:
                    return None
                continue
            size = os.fstat(cur.fd).st_size
            shrunk = size < cur.seen
            cur.seen = max(cur.seen, size)
            if self.skip:
                if not shrunk:
                    if not self._skip_written_again(cur, size, cut=False):
                        return None
                elif cur.ident != self._log_ident():
                    # A copy (only the daemon's cut shrinks one): its complete first lines.
                    if not self._skip_written_again(cur, size, cut=True):
                        return None
                elif self._skip_in_a_copy(cur):
                    pass
                elif self._other_lines_copied(cur):
                    # Written and truncated again while we waited, and the new copy starts with
                    # other lines: the daemon wrote nothing again, and what it wrote is there.
                    self.skip = b""
                    self._truncated(cur, size)
                elif not self._skip_written_again(cur, size, cut=True):
                    # No new copy, or an empty one (the daemon writes everything again after it),
                    # or a size told late: still waiting for the lines here.
                    return None
                continue
            if (
                shrunk
                or size < cur.pos
                or (cur.pos and not self._same_before(cur))
                or (cur.pos == 0 and not cur.recent and self._copied_unread(cur, size))
            ):
                self._truncated(cur, size)
                continue
            if size > cur.pos:
                segment = self._lines(cur, size)
                if segment is not None:
                    return segment
            if not self._moved_on(cur):
                return None
        return None

    def _lines(self, cur: _Source, size: int) -> Segment | None:
        want = min(size - cur.pos, self.window)
        data = _pread(cur.fd, want, cur.pos)
        cut = data.rfind(b"\n") + 1
        while not cut and cur.pos + len(data) < size:  # one line longer than the window
            more = _pread(cur.fd, min(size - cur.pos - len(data), self.window), cur.pos + len(data))
            if not more:
                break
            newline = more.find(b"\n")
            data += more
            if newline >= 0:
                cut = len(data) - len(more) + newline + 1
        if not cut:
            return None  # a line still being written (or a crash's partial line, cut at the next open)
        data = data[:cut]
        segment = Segment(cur.dev, cur.ino, cur.pos, data)
        cur.pos += cut
        cur.keep(data)
        return segment

    def _same_before(self, cur: _Source) -> bool:
        # PROBE, not CHECK_BYTES: the last 64 bytes of two lines are often alike (the same peer, a
        # long message's same end). Truncated and written back past our position with such a line
        # ending there, the file would pass for the one we read: the lines written back before our
        # position would be lost.
        n = min(len(cur.recent), PROBE)
        if not n:
            return True
        return _pread(cur.fd, n, cur.pos - n) == bytes(cur.recent[-n:])

    def _copied_unread(self, cur: _Source, size: int) -> bool:
        """Nothing read from ``cur`` yet: was it copied and truncated (copytruncate) meanwhile?

        Its size cannot tell once the daemon has written it back to the size we were told, and
        there are no bytes read to compare. But the copy is new next to it: a non-empty file listed
        before it that was not there when we began reading it. A rename (logrotate's create, the
        built-in rotation) moves ``cur`` itself and lists the new file after it: not a copy."""
        files = self._listing()
        idents = _idents(files)
        if cur.ident not in idents:
            return False
        new = [
            (path, st)
            for path, st in files[: idents.index(cur.ident)]
            if st.st_size and (st.st_dev, st.st_ino) not in cur.known
        ]
        if not new:
            return False
        path, st = new[0]  # the oldest: later ones are copies made after it
        if size < st.st_size:
            return True
        fd = self._open_listed(path, (st.st_dev, st.st_ino))
        if fd is None:
            return True  # gone: ``_truncated`` finds it by its new name, or says it is lost
        try:
            # Copied, not truncated yet: ``cur`` still holds the copy's bytes. Read it; the
            # truncation is seen later, by the bytes read.
            return not _same_bytes(fd, cur.fd, st.st_size)
        finally:
            os.close(fd)

    def _moved_on(self, cur: _Source) -> bool:
        """At the end of ``cur``: move to the next file if the daemon writes elsewhere now."""
        try:
            named = os.lstat(self.path)
            if (named.st_dev, named.st_ino) == cur.ident:
                return False  # still the file written to
        except FileNotFoundError:
            pass
        # The built-in rotation runs in the writer's thread, and may rename the files (once or
        # several times) while we list them or between the listing and the open: the name listed
        # for the next file may be another file's by then (opening it would skip a whole file).
        # So the file opened must be the one listed, and a listing taken after the open must
        # agree with the one before it (a rotation during a listing tears it); else look again.
        for _ in range(_ATTEMPTS):
            files = self.files()
            idents = _idents(files)
            after = files[idents.index(cur.ident) + 1 :] if cur.ident in idents else files
            if not any(st.st_size for _path, st in after):
                return False  # the daemon may still write its last lines here (no reopen yet)
            if os.fstat(cur.fd).st_size > cur.pos:
                return True  # those last lines: read them first (the caller loops)
            path, st = after[0]
            fd = _open_ident(path, (st.st_dev, st.st_ino))
            if fd is None:
                continue
            if _named(self.files()) != _named(files):
                os.close(fd)
                continue
            # At the end of a copy whose log is not truncated yet (we came to the copy from an
            # earlier truncation): the log still holds what we read. Go on after it, not from 0.
            pos = 0
            if path.name == self.path.name and os.fstat(fd).st_size >= cur.pos and _same_bytes(fd, cur.fd, cur.pos):
                pos = cur.pos
            os.close(cur.fd)
            # Known: the listing that chose this file, not a later one. A later one may hold a copy
            # of this very file (copied, not truncated yet): known, that copy is never read.
            self.cur = self._source(fd, pos, files)
            if pos:
                self.cur.keep(bytes(cur.recent))
            # And the size it had in that listing: cut before our fstat, it is still seen as cut.
            self.cur.seen = max(self.cur.seen, st.st_size)
            return True
        return False  # rotating all the time: the next read() (the writer wakes us) looks again

    def _truncated(self, cur: _Source, now: int) -> None:
        """``cur`` was truncated (copytruncate): read on from its copy, or its start."""
        old = cur.pos
        cur.seen = now
        recent = bytes(cur.recent)
        begin = old - len(recent)  # the file offset of recent[0]
        best: tuple[int, Path, int, tuple[int, int]] | None = None
        best_rank = (False, 0)
        # One listing for all below, and one that no rename tore: the next copytruncate may be
        # shifting the copy we look for (.1 to .2) right now. A torn listing lacked the copy ("no
        # copy found"); a second listing, with the copy and the next one in it, became ``known``; so
        # the next truncation, landing before we read anything, found no copy either. Both lost.
        files = self._listing()
        empty: tuple[int, Path, int, tuple[int, int]] | None = None
        for path, st in files:
            ident = (st.st_dev, st.st_ino)
            if ident == cur.ident:
                continue
            size = st.st_size
            if size == 0 and recent and begin == 0 and ident not in cur.known:
                # An empty file made since we began reading this one from its start: logrotate
                # copied it while it was empty. Everything we read came after that copy, and the
                # daemon writes it again (its journal's _find_copy): a fallback, weaker than bytes
                # that match. If the daemon did not, _skip_written_again reads the file whole.
                if empty is None or st.st_mtime_ns >= empty[0]:
                    empty = (st.st_mtime_ns, path, size, ident)
                continue
            if not recent:
                # Nothing read from this file yet: no bytes to match a copy by. Its copy is the
                # oldest file that appeared since we began reading it (newer ones are later copies).
                if size and ident not in cur.known and best is None:
                    best = (st.st_mtime_ns, path, size, ident)
                continue
            probe_end = min(size, old)
            # PROBE, not CHECK_BYTES: a newer copy whose lines end alike matches in 64 bytes.
            probe = min(PROBE, probe_end - begin)
            if probe <= 0 or size == 0:
                continue
            fd = self._open_listed(path, ident)
            if fd is None:
                continue
            ours = recent[probe_end - probe - begin : probe_end - begin]
            try:
                same = _pread(fd, probe, probe_end - probe) == ours
            finally:
                os.close(fd)
            # The newest copy that matches over a whole line; one that matches only within a line
            # (a copy just begun, of lines that start alike) only if none does. Two copies made
            # within one tick of the clock have the same mtime: then the one listed later (the
            # listing is oldest first) is the newer.
            rank = (b"\n" in ours, st.st_mtime_ns)
            if same and (best is None or rank >= best_rank):
                best, best_rank = (st.st_mtime_ns, path, size, ident), rank
        if best is None:
            best = empty
        cur.recent = bytearray()
        cur.pos = 0
        # Known: the files there before we read it again from its start, not a later listing. A
        # copy made since is a copy of what we read from now on: it must not count as known.
        cur.known = set(_idents(files))
        if best is None:
            if recent and begin == 0:
                # The daemon may still have written what we read again (an empty copy it took for
                # the copy, one we had listed already): step over it if the file starts with it;
                # if not, _skip_written_again reads the file whole.
                self.skip, self.origin = recent, cur.ident
            self.notes.append(f"{self.path} was truncated; no copy found next to it: reading it from its start")
            return
        _mtime, path, size, copy_ident = best
        if size > old or (not recent and size):
            found = self._open_listed(path, copy_ident)
            if found is None:
                self.notes.append(f"{self.path} was truncated; its copy {path} is gone: reading it from its start")
                return
            copy = self._source(found, old)
            copy.keep(recent)
            os.close(cur.fd)
            self.cur = copy
            self.notes.append(f"{self.path} was truncated: reading its last lines from the copy {path}")
            return
        # We read past the copy's end: the daemon writes those lines again at the start of the file
        # after the copy (from the copy's last whole line on). They are sent already: skip them.
        cut = size
        if recent[size - 1 - begin : size - begin] != b"\n":
            cut = begin + recent.rfind(b"\n", 0, size - begin) + 1
        self.skip, self.origin = recent[cut - begin :], cur.ident
        idents = _idents(files)  # the listing the copy was found in: listed again, it may be renamed
        # A newer copy holds the lines written again at its start. An empty one was copied before
        # the daemon wrote them: they are at the start of the next file that is not empty (the next
        # copy, or the log itself, written again there when the empty copy's truncation came).
        after = [
            (path, st) for path, st in files[idents.index(copy_ident) + 1 :] if st.st_size or _ident(st) == cur.ident
        ]
        if after and _ident(after[0][1]) != cur.ident:
            fd = self._open_listed(after[0][0], _ident(after[0][1]))
            if fd is None:
                return
            os.close(cur.fd)
            self.cur = self._source(fd, 0)  # a newer copy: we were behind by more than one rotation
        self.notes.append(f"{self.path} was truncated after the copy {path}: skipping the lines written again")

    def _skip_written_again(self, cur: _Source, size: int, *, cut: bool) -> bool:
        """The start of the truncated file holds ``skip`` (lines read already): step over it.

        Unless the next copytruncate came first: the daemon wrote them again, logrotate copied
        the file away and truncated it. Then they begin a copy made since (``_skip_in_a_copy``);
        a copy holding only the first of them is stepped over whole, the rest looked for after it.
        """
        n = min(size, len(self.skip))
        head = _pread(cur.fd, n, 0)
        if head != self.skip[:n] or n < len(self.skip):
            if self._skip_in_a_copy(cur):
                return True
            if head != self.skip[:n]:
                self.skip = b""  # not written again (no copy found by the daemon): read it all
                return True
            log_ident = self._log_ident()
            if cur.ident == self.origin and cur.ident != log_ident and self._successor_written():
                # The file we read, renamed away (create, the built-in rotation) while we waited
                # for lines the daemon might write again: it writes elsewhere now, and they were
                # not written here. Nothing to skip: read what it holds.
                self.skip = b""
                return True
            if cur.ident != log_ident and (cut or self._finished_copy(head)):
                # A copy of the first of them (or of none: empty), complete: the daemon cut it back
                # to its last whole line (``cut``: smaller than seen) and wrote the rest again, or
                # the log no longer starts with it. The rest begins the next file.
                cur.pos = n
                cur.keep(head)
                self.skip = self.skip[n:]
                self._to_next_file(cur)
                return True
            # Not all there yet: the daemon writes them (whole) here, or logrotate is still
            # copying them (the log still starts with what this copy holds): it grows.
            return False
        cur.pos = n
        cur.keep(self.skip)
        self.skip = b""
        return True

    def _log_ident(self) -> tuple[int, int] | None:
        try:
            return _ident(os.stat(self.path, follow_symlinks=False))
        except OSError:
            return None

    def _successor_written(self) -> bool:
        try:
            return os.stat(self.path, follow_symlinks=False).st_size > 0
        except OSError:
            return False

    def _finished_copy(self, data: bytes) -> bool:
        """``data`` (a copy's whole bytes, the start of ``skip``) is a complete copy: whole lines,
        and the log no longer starts with them (truncated after the copy was made; while
        logrotate copies, the log still holds what the copy holds so far)."""
        if not data.endswith(b"\n"):
            return False
        try:
            fd = _open(self.path)
        except OSError:
            return True
        try:
            return _pread(fd, len(data), 0) != data
        finally:
            os.close(fd)

    def _to_next_file(self, cur: _Source) -> None:
        """Read on at the start of the file after ``cur``: the next that is not empty, or the log."""
        files = self._listing()
        idents = _idents(files)
        log_ident = self._log_ident()
        after = files[idents.index(cur.ident) + 1 :] if cur.ident in idents else files
        for path, st in after:
            if st.st_size or _ident(st) == log_ident:
                fd = self._open_listed(path, _ident(st))
                if fd is not None:
                    os.close(cur.fd)
                    self.cur = self._source(fd, 0, files)
                    return

    def _new_copies(self, cur: _Source) -> Iterator[tuple[Path, int, int]]:
        """The non-empty files made since we began ``cur``: (path, size, an open descriptor that
        the caller keeps or closes)."""
        for path, st in self._listing():
            ident = _ident(st)
            if ident == cur.ident or ident in cur.known or not st.st_size:
                continue
            fd = self._open_listed(path, ident)
            if fd is not None:
                yield path, st.st_size, fd

    def _skip_in_a_copy(self, cur: _Source) -> bool:
        """A file made since we began ``cur`` that starts with the whole ``skip``, or a complete
        copy of its first lines: read on there. Whole: the start of a copy still being made, or
        lines that begin alike (the same user, the same peer), would pass for it over a few bytes."""
        skip = self.skip
        partial: tuple[Path, int] | None = None
        for path, size, fd in self._new_copies(cur):
            head = _pread(fd, min(size, len(skip)), 0)
            if head == skip:
                if partial is not None:
                    os.close(partial[1])
                self._read_on_in(cur, fd, path)
                return True
            if partial is None and size < len(skip) and head == skip[:size] and self._finished_copy(head):
                partial = (path, fd)
            else:
                os.close(fd)
        if partial is not None:
            self._read_on_in(cur, partial[1], partial[0])
            return True
        return False

    def _read_on_in(self, cur: _Source, fd: int, path: Path) -> None:
        os.close(cur.fd)
        self.cur = self._source(fd, 0)
        self.notes.append(f"{self.path} was copied and truncated again: reading on in {path}")

    def _other_lines_copied(self, cur: _Source) -> bool:
        """A file made since we began ``cur`` that does not start like ``skip``."""
        found = False
        for _path, size, fd in self._new_copies(cur):
            n = min(size, len(self.skip))
            try:
                found = found or _pread(fd, n, 0) != self.skip[:n]
            finally:
                os.close(fd)
        return found

    # -- how far behind ------------------------------------------------------------------------
    def unread(self) -> int:
        """Bytes in the log not read yet (this file's rest and the files after it)."""
        cur = self.cur
        if cur is None:
            try:
                return os.stat(self.path).st_size
            except OSError:
                return 0
        total = max(0, os.fstat(cur.fd).st_size - cur.pos)
        files = self.files()
        idents = [(st.st_dev, st.st_ino) for _path, st in files]
        after = files[idents.index(cur.ident) + 1 :] if cur.ident in idents else files
        return total + sum(st.st_size for _path, st in after) - len(self.skip)

    def count_unread(self) -> int:
        """Lines not read yet (a scan: call it while the files are quiet, before the writer starts)."""
        cur = self.cur
        if cur is None:
            return 0
        lines = self._count(cur.fd, cur.pos)
        files = self.files()
        idents = [(st.st_dev, st.st_ino) for _path, st in files]
        after = files[idents.index(cur.ident) + 1 :] if cur.ident in idents else files
        for path, _st in after:
            try:
                fd = _open(path)
            except OSError:
                continue
            try:
                lines += self._count(fd, 0)
            finally:
                os.close(fd)
        return lines

    @staticmethod
    def _count(fd: int, offset: int) -> int:
        lines = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            lines += chunk.count(b"\n")
            offset += len(chunk)
        return lines
