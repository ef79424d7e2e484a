"""A forwarder behind the writer across logrotate's copytruncate, its reader driven step by step.

The reader is called only as the forwarder calls it (``note_written`` with the largest size the
writer told since the last call, then ``read``, as ``Forwarder._fill`` does), and only at chosen
moments: it lags over a whole truncation, and the next copytruncate runs while it reads. That
rotation runs in another process (logrotate; the NATS test's thread), so it can land between the
reader's reading of the folder and its ``stat`` of each name (in ``files``), or between a listing
and an open. It is put there deterministically: at the reader's n-th look at the files (an
``os.scandir`` once the folder is read, or an ``os.open``) within one ``fill``.
"""

from __future__ import annotations

import gzip
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from conftest import tick_after
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nio_logd.forward.cursor import digest
from nio_logd.forward.reader import LogReader
from nio_logd.output.logfile import LogFile

KEEP = 5


def record(round_: int, index: int, pad: int) -> bytes:
    """A line like the daemon's: the rounds differ (another client, another port) at every offset."""
    return b'{"event":"message","send_user":"u%d","send_msg":"c%d-%d%s","peer":"127.0.0.1:%d"}\n' % (
        round_,
        round_,
        index,
        b"." * pad,
        40000 + round_,
    )


def shift(log: Path) -> None:
    """logrotate's first step, as the NATS test does it: .N to .N+1, from the highest down."""
    for i in range(KEEP, 0, -1):
        older = Path(f"{log}.{i}")
        if older.exists():
            os.replace(older, f"{log}.{i + 1}")


def copy_and_truncate(log: Path) -> None:
    shutil.copyfile(log, f"{log}.1")
    os.truncate(log, 0)


def copytruncate(log: Path) -> None:
    shift(log)
    copy_and_truncate(log)


class Forwarder:
    """The forwarder's side of the reader: ``wake`` from the writer, ``_fill``'s calls."""

    def __init__(self, reader: LogReader) -> None:
        self.reader = reader
        self.written: tuple[tuple[int, int], int] = ((0, 0), 0)
        self.got = bytearray()
        self.notes: list[str] = []

    def wake(self, ident: tuple[int, int], size: int) -> None:
        if ident != self.written[0] or size > self.written[1]:
            self.written = (ident, size)

    def fill(self, reads: int = 1 << 30) -> None:
        """Up to ``reads`` read() calls, fewer if one finds nothing. Then the in-flight window is
        full: the reader does not look at the log until the next ``fill``."""
        for _ in range(reads):
            written, self.written = self.written, ((0, 0), 0)
            self.reader.note_written(*written)
            segment = self.reader.read()
            self.notes += self.reader.notes
            self.reader.notes.clear()
            if segment is None:
                return
            assert segment.data.endswith(b"\n")
            self.got += segment.data


class Writer:
    """The daemon's writer: the real ``LogFile`` (it puts back what a copy missed), then ``wake``."""

    def __init__(self, log: Path, forwarder: Forwarder) -> None:
        self.file = LogFile(log, 0o640)
        self.file.open()
        self.forwarder = forwarder
        self.expected = bytearray()

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.expected += data
        st_ = os.fstat(self.file.fd)
        self.forwarder.wake((st_.st_dev, st_.st_ino), self.file.size)


@contextmanager
def rotation_while_reading(steps: dict[int, Callable[[], None]]) -> Iterator[dict[int, Callable[[], None]]]:
    """Run ``steps[n]`` at the reader's n-th look at the files: once an ``os.scandir`` has read the
    folder (its names are stat'ed after it), or just before an ``os.open``. The steps not reached
    are left in the dict."""
    real_scandir, real_open = os.scandir, os.open
    looks = [0]

    def look() -> None:
        looks[0] += 1
        step = steps.pop(looks[0], None)
        if step is not None:
            step()

    def scandir(path: Any) -> Iterator[os.DirEntry[str]]:
        entries = list(real_scandir(path))
        look()
        return iter(entries)

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        look()
        return real_open(path, flags, mode, dir_fd=dir_fd)

    with mock.patch.object(os, "scandir", scandir), mock.patch.object(os, "open", open_):
        yield steps


def in_writes(data: list[bytes], sizes: list[int]) -> Iterator[bytes]:
    """The lines in writes of the given numbers of lines (the daemon writes batches), the rest in one."""
    i = 0
    for n in sizes:
        if i >= len(data):
            return
        yield b"".join(data[i : i + n])
        i += n
    if i < len(data):
        yield b"".join(data[i:])


def started(log: Path, window: int = 1 << 20) -> tuple[LogReader, Forwarder, Writer]:
    """A reader at the start of the log, its forwarder, and the daemon's writer (the log created)."""
    reader = LogReader(log, window)
    forwarder = Forwarder(reader)
    writer = Writer(log, forwarder)
    reader.open_at(None)
    return reader, forwarder, writer


def finished(reader: LogReader, forwarder: Forwarder, writer: Writer) -> tuple[Writer, Forwarder]:
    """The daemon's next write (it puts back what a copy missed), the reader to the end, all closed."""
    writer.write(b"")
    forwarder.fill()
    forwarder.fill()
    writer.file.close()
    reader.close()
    return writer, forwarder


def lagging_over_a_truncation(
    tmp: Path,
    rounds: list[list[int]],
    batch: list[int],
    window: int,
    read_first: int,
    copy_after: int,
    look: int,
    gap: int = 0,
    notice: int = 0,
) -> tuple[Writer, Forwarder]:
    """Round 1 (the reader reads after each of its first ``read_first`` writes, then lags);
    copytruncate; round 2 until ``copy_after`` of its lines are written (the reader reads
    ``notice`` times: 0, it lags over the whole truncation); then the reader reads while the second
    copytruncate runs: its shift at the reader's ``look``-th look at the files, its copy and
    truncation ``gap`` looks later; round 2's rest; round 3, with a third copytruncate three
    quarters into it, the reader a quarter behind."""
    log = tmp / "messages.log"
    reader = LogReader(log, window)
    reader.open_at(None)
    forwarder = Forwarder(reader)
    writer = Writer(log, forwarder)
    lines = [[record(r + 1, i, pad) for i, pad in enumerate(pads)] for r, pads in enumerate(rounds)]
    for n, data in enumerate(in_writes(lines[0], batch)):
        writer.write(data)
        if n < read_first:
            forwarder.fill(1)
    copytruncate(log)
    for data in in_writes(lines[1][:copy_after], batch):
        writer.write(data)
    forwarder.fill(notice)  # the reader may be in the first copy now, or at its end
    steps = {look: lambda: shift(log), look + gap: lambda: copy_and_truncate(log)}
    if not gap:
        steps = {look: lambda: copytruncate(log)}
    with rotation_while_reading(steps) as left:
        forwarder.fill()  # acks came: the forwarder reads on, while logrotate runs
    for _n, step in sorted(left.items()):
        step()  # the reader looked fewer times: logrotate ends after it
    for data in in_writes(lines[1][copy_after:], batch):
        writer.write(data)
    forwarder.fill()
    half, more = len(lines[2]) // 2, len(lines[2]) * 3 // 4
    for data in in_writes(lines[2][:half], batch):
        writer.write(data)
    forwarder.fill()
    for data in in_writes(lines[2][half:more], batch):
        writer.write(data)  # the reader behind again: it reads the copy's last lines
    copytruncate(log)
    for data in in_writes(lines[2][more:], batch):
        writer.write(data)
    return finished(reader, forwarder, writer)


def test_reader_lagging_when_a_copytruncate_lands_while_it_lists_the_files_loses_nothing(tmp_path: Path) -> None:
    """The failing run (3 rounds of 5,000, copytruncate after each; 9,482 forwarded; the notes "no
    copy found" twice, then "reading its last lines from the copy .1"). The reader is in round 1
    when the first copytruncate runs and does not look until the second one runs as it reads: its
    listing is read as messages.log.1 is renamed to .2, so it lacks the first copy ("no copy
    found"); the files listed next, both copies among them, are taken as known; the truncation
    lands within the same read(), nothing read yet, so no copy again. The rest of round 1 and all
    of the second copy were lost."""
    pads = [20] * 50
    writer, forwarder = lagging_over_a_truncation(
        tmp_path, [pads, pads, pads], [10], window=1 << 20, read_first=1, copy_after=40, look=1
    )
    assert forwarder.got == writer.expected, forwarder.notes
    assert not any("no copy found" in note for note in forwarder.notes), forwarder.notes


# (rounds: each line's padding; lines a write; window; round 2's lines before the second copy)
SHAPES = [
    ([[0] * 4] * 3, [1], 256, 1),
    ([[5] * 12, [30] * 9, [0] * 7], [2, 3], 300, 5),
]


def test_reader_reads_every_line_once_wherever_in_its_read_the_copytruncate_lands(tmp_path: Path) -> None:
    """Every look of the reader at the files in that read: the shift there, the copy and the
    truncation there too or up to 3 looks later; the reader in round 1 or in the first copy."""
    failed = []
    cases = itertools.product(SHAPES, range(1, 16), range(4), range(4), (1, 4))
    for n, ((rounds, batch, window, copy_after), look, gap, notice, read_first) in enumerate(cases):
        folder = tmp_path / str(n)
        folder.mkdir()
        writer, forwarder = lagging_over_a_truncation(
            folder, rounds, batch, window, read_first, copy_after, look, gap, notice
        )
        if forwarder.got != writer.expected:
            failed.append((SHAPES.index((rounds, batch, window, copy_after)), look, gap, notice, read_first))
        shutil.rmtree(folder)
    assert not failed, f"(shape, look, gap, notice, read_first) that lose or repeat lines: {failed}"


@settings(max_examples=200, deadline=None, database=None)
@given(
    rounds=st.lists(st.lists(st.integers(0, 40), min_size=4, max_size=60), min_size=3, max_size=3),
    batch=st.lists(st.integers(1, 25), min_size=1, max_size=8),
    window=st.integers(256, 1 << 14),
    read_first=st.integers(1, 4),
    copy_after=st.integers(1, 60),
    look=st.integers(1, 15),
    gap=st.integers(0, 3),
    notice=st.integers(0, 3),
)
def test_reader_lagging_over_copytruncates_reads_every_line_once(
    rounds: list[list[int]],
    batch: list[int],
    window: int,
    read_first: int,
    copy_after: int,
    look: int,
    gap: int,
    notice: int,
) -> None:
    """Whatever the rounds, the line lengths, the writes, the window, how far behind the reader is
    and where in its read the second copytruncate lands: every line once, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        copy_after = min(copy_after, len(rounds[1]))
        writer, forwarder = lagging_over_a_truncation(
            Path(tmp), rounds, batch, window, read_first, copy_after, look, gap, notice
        )
        assert forwarder.got == writer.expected, forwarder.notes


def test_reader_whose_file_is_written_back_past_it_with_lines_ending_alike_sees_the_truncation(tmp_path: Path) -> None:
    """The run that failed once (hypothesis: rounds [[0] * 4, [36, 36, 0, 0], [0] * 4], copy_after
    1, notice 2; a line of round 2 lost), made small. A line padded so that its last 64 bytes are
    dots and the peer, as the next line's are; the reader reads it; copytruncate; the next line,
    as long, lands where it was. Before the reader looks again the file is as long as where it
    is, and the bytes just before that are alike: it must still see the truncation."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(record(2, 0, 36))
    forwarder.fill()
    copytruncate(log)
    writer.write(record(2, 1, 36))
    writer.write(record(2, 2, 0))
    forwarder.fill()
    assert forwarder.got == writer.expected, forwarder.notes
    writer.file.close()
    reader.close()


def test_reader_restarted_picks_the_newest_copy_when_copies_have_the_same_mtime(tmp_path: Path) -> None:
    """Restarted from its cursor, the reader knows only the 64 bytes before its position. Two copies
    end alike there: the older one (a copy of the same length, lines ending alike) and the newer one
    (the copy of this file). Made in one tick of a coarse clock, they have the same mtime: the
    listing (oldest first) must decide, not which one was compared first."""
    log = tmp_path / "messages.log"
    writer = Writer(log, Forwarder(LogReader(log)))
    for i in range(4):
        writer.write(record(2, i, 40))
    copytruncate(log)
    for i in range(4, 8):
        writer.write(record(2, i, 40))  # as long as the first copy: it ends where this does
    st_ = os.stat(log)
    reader = LogReader(log)
    forwarder = Forwarder(reader)
    writer.forwarder = forwarder
    assert not reader.open_at((st_.st_dev, st_.st_ino), st_.st_size, digest(log.read_bytes())).problem
    copytruncate(log)
    writer.write(record(3, 0, 0))
    same = os.stat(f"{log}.1").st_mtime_ns
    os.utime(f"{log}.2", ns=(same, same))
    forwarder.fill()
    assert forwarder.got == record(3, 0, 0), forwarder.notes
    writer.file.close()
    reader.close()


def test_reader_lagging_over_two_copytruncates_is_not_fooled_by_a_newer_copy_ending_alike(tmp_path: Path) -> None:
    """The reader read 10 lines, then lagged over two copytruncates: ``.2`` is the copy of the file
    it read, ``.1`` the copy of the next one. Every line is as long and ends in the same 64 bytes
    (dots and the peer), so at the reader's offset ``.1`` ends like what it read. Only more of the
    bytes it read tells the true copy: with 64 bytes it took the newer ``.1`` and lost both the
    rest of ``.2`` and the start of ``.1``."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    for i in range(10, 20):
        writer.write(record(2, i, 60))
    forwarder.fill()
    assert forwarder.got == writer.expected
    for i in range(20, 30):
        writer.write(record(2, i, 60))
    copytruncate(log)
    for i in range(30, 50):
        writer.write(record(2, i, 60))  # the same length and ending: lines fall at the same offsets
    copytruncate(log)
    writer.write(record(2, 50, 60))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


# -- a reader that has read nothing yet ------------------------------------------------------------
# At position 0 there are no bytes read to compare, and once the daemon has written the truncated
# file back to the size the reader was told, its size cannot tell either: only the copy that
# appeared next to it tells. A rename (logrotate's create, the built-in rotation) must not look
# like one.


def test_reader_that_read_nothing_reads_the_copy_of_a_copytruncate_written_back_to_the_size_told(
    tmp_path: Path,
) -> None:
    """The smallest case: an empty log; a line; copytruncate; a line as long; then the reader."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(b"a" * 17 + b"\n")
    copytruncate(log)
    writer.write(b"b" * 17 + b"\n")
    forwarder.fill()
    assert forwarder.got == writer.expected, forwarder.notes
    assert any("copy" in note for note in forwarder.notes), forwarder.notes
    writer.file.close()
    reader.close()


def read_nothing_until_the_end(
    tmp: Path, ops: tuple[str, ...], rounds: list[list[int]], batch: list[int], window: int, between: bool
) -> tuple[Writer, Forwarder]:
    """Round 0, then each rotation of ``ops`` followed by its round (``rounds[n + 1]``); the reader
    reads nothing until all are done. "copytruncate": logrotate's; with ``between``, the last one
    has the round's first write land between its copy and its truncation (the daemon puts it back)
    and the reader looks there first. "create": logrotate's rename, the round's first write into the
    renamed file before the reopen. "rotate": the daemon's built-in rotation."""
    log = tmp / "messages.log"
    reader, forwarder, writer = started(log, window)
    lines = [[record(r + 1, i, pad) for i, pad in enumerate(pads)] for r, pads in enumerate(rounds)]
    for data in in_writes(lines[0], batch):
        writer.write(data)
    for n, op in enumerate(ops):
        writes = list(in_writes(lines[n + 1], batch))
        if op == "copytruncate":
            shift(log)
            shutil.copyfile(log, f"{log}.1")
            if between and n == len(ops) - 1:
                writer.write(writes.pop(0))  # in neither file: the daemon writes it again
                forwarder.fill()  # the reader's first look: copied, not truncated yet
            os.truncate(log, 0)
        elif op == "create":
            shift(log)
            os.replace(log, f"{log}.1")
            writer.write(writes.pop(0))  # the daemon writes on to the renamed file until its reopen
            writer.file.open()
        else:
            writer.file.rotate(KEEP)
        for data in writes:
            writer.write(data)
    return finished(reader, forwarder, writer)


# Each line's padding, by round: the same lengths (the truncated file written back to the size the
# reader was told), growing, shrinking (the size tells then).
PADS = [[[0] * 4] * 4, [[0] * 3, [5] * 4, [10] * 5, [20] * 6], [[20] * 6, [10] * 5, [5] * 4, [0] * 3]]
OPS = [ops for k in (1, 2, 3) for ops in itertools.product(("copytruncate", "create", "rotate"), repeat=k)]


def test_reader_that_read_nothing_over_rotations_reads_every_line_once(tmp_path: Path) -> None:
    """1 to 3 rotations of each kind, in every order, before the reader reads anything: every line
    once, in order; also when the reader first looks between the last copy and its truncation."""
    failed = []
    cases = itertools.product(OPS, range(len(PADS)), (False, True), ([1], [2, 3]))
    for n, (ops, pads, between, batch) in enumerate(cases):
        if between and ops[-1] != "copytruncate":
            continue
        folder = tmp_path / str(n)
        folder.mkdir()
        writer, forwarder = read_nothing_until_the_end(folder, ops, PADS[pads][: len(ops) + 1], batch, 256, between)
        if forwarder.got != writer.expected:
            failed.append((ops, pads, between, batch))
        shutil.rmtree(folder)
    assert not failed, f"(ops, pads, between, batch) that lose or repeat lines: {failed}"


@settings(max_examples=200, deadline=None, database=None)
@given(
    ops=st.lists(st.sampled_from(["copytruncate", "create", "rotate"]), min_size=1, max_size=3).map(tuple),
    rounds=st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=30), min_size=4, max_size=4),
    batch=st.lists(st.integers(1, 10), min_size=1, max_size=6),
    window=st.integers(256, 1 << 14),
    between=st.booleans(),
)
def test_reader_that_read_nothing_over_any_rotations_reads_every_line_once(
    ops: tuple[str, ...], rounds: list[list[int]], batch: list[int], window: int, between: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        writer, forwarder = read_nothing_until_the_end(
            Path(tmp), ops, rounds[: len(ops) + 1], batch, window, between and ops[-1] == "copytruncate"
        )
        assert forwarder.got == writer.expected, forwarder.notes


def test_reader_between_a_copy_and_its_truncation_after_an_earlier_one_reads_each_line_once(tmp_path: Path) -> None:
    """The reader reads the first copy, then the second one (made, its log not truncated yet): the
    log still holds those lines; it goes on after them, not from the log's start again."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    for i in range(3):
        writer.write(record(1, i, 20))
    forwarder.fill()
    copytruncate(log)
    writer.write(record(2, 0, 0))
    shift(log)
    shutil.copyfile(log, f"{log}.1")
    forwarder.fill()
    writer.write(record(2, 1, 0))  # in neither file: the daemon writes it again
    os.truncate(log, 0)
    writer.write(record(3, 0, 0))
    forwarder.fill()
    assert forwarder.got == writer.expected, forwarder.notes
    writer.file.close()
    reader.close()


def test_reader_far_past_the_copy_when_its_log_is_truncated_reads_each_line_once(tmp_path: Path) -> None:
    """logrotate copies a big log slowly: the daemon writes on meanwhile (here 3 MiB) and the
    reader reads all of it, so at the truncation it is 3 MiB past the copy's end. The daemon
    writes those 3 MiB again at the start of the truncated log (its journal holds 8 MiB); the
    reader, which sent them already, must find the copy and step over them, not read them again."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    for i in range(2000):
        writer.write(record(1, i, 100))
    forwarder.fill()
    shutil.copyfile(log, f"{log}.1")  # the copy ends here
    i = 0
    while writer.file.size < os.path.getsize(f"{log}.1") + (3 << 20):
        writer.write(b"".join(record(2, i + k, 100) for k in range(100)))
        forwarder.fill()  # the reader keeps up
        i += 100
    os.truncate(log, 0)
    writer.write(record(3, 0, 0))  # the daemon finds the copy, writes the 3 MiB again, then this
    forwarder.fill()
    forwarder.fill()
    assert forwarder.got == writer.expected, forwarder.notes
    assert not [n for n in forwarder.notes if "no copy found" in n], forwarder.notes
    writer.file.close()
    reader.close()


def test_reader_past_the_end_of_an_empty_copy_reads_each_line_once(tmp_path: Path) -> None:
    """logrotate copies the log while it is empty, the daemon writes, the reader reads (all or part
    of it), logrotate truncates: the daemon writes those lines again at the log's start; the
    reader, which has sent what it read, steps over that, and reads the rest once."""
    for read_first in (1, 3):
        log = tmp_path / f"{read_first}" / "messages.log"
        log.parent.mkdir()
        reader, forwarder, writer = started(log)
        tick_after(log)
        shutil.copyfile(log, f"{log}.1")  # empty
        for i in range(3):
            writer.write(record(1, i, 20))
            if i < read_first:
                forwarder.fill()
        os.truncate(log, 0)
        writer.write(record(2, 0, 0))  # the daemon writes round 1 again, then this
        forwarder.fill()
        forwarder.fill()
        assert forwarder.got == writer.expected, forwarder.notes
        assert os.path.getsize(f"{log}.1") == 0
        writer.file.close()
        reader.close()


@settings(max_examples=100, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2)), min_size=1, max_size=12),
            st.integers(0, 12),
        ),
        min_size=1,
        max_size=4,
    ),
    window=st.integers(256, 1 << 14),
)
def test_reader_over_copytruncates_copied_anywhere_in_a_round_reads_every_line_once(
    rounds: list[tuple[list[tuple[int, int]], int]], window: int
) -> None:
    """Each round: lines written one at a time, the reader reading 0-2 times after each; logrotate
    copies the log at any point of the round (before its first line: an empty copy) and truncates
    it at the round's end. Every line once, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "messages.log"
        reader, forwarder, writer = started(log, window)
        for r, (lines_, copy_when) in enumerate(rounds):
            shift(log)
            copy_at = min(copy_when, len(lines_))
            tick_after(log)  # logrotate's runs are apart in time: not in one tick of the clock
            for i, (pad, reads) in enumerate(lines_):
                if i == copy_at:
                    shutil.copyfile(log, f"{log}.1")
                writer.write(record(r + 1, i, pad))
                forwarder.fill(reads)
            if copy_at == len(lines_):
                shutil.copyfile(log, f"{log}.1")
            os.truncate(log, 0)
        writer, forwarder = finished(reader, forwarder, writer)
        assert forwarder.got == writer.expected, forwarder.notes


@settings(max_examples=150, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2)), min_size=1, max_size=8),
            st.integers(0, 8),  # the line before which logrotate copies (past the last: after all)
            st.one_of(st.none(), st.integers(1, 400)),  # bytes of the copy made when the reader looks
            st.integers(0, 2),  # reads while the copy is that far
            st.booleans(),  # the copy compressed at once (no delaycompress): no copy left to find
            st.booleans(),  # the copy ends there (logrotate read while a write was half done)
        ),
        min_size=1,
        max_size=4,
    ),
)
# Found by it: a newer copy caught at its first byte and ending there, cut to nothing by the daemon.
@example(rounds=[([(0, 0), (0, 1)], 1, None, 0, False, False), ([(0, 0)], 1, 1, 1, False, True)])
def test_reader_over_copytruncates_seen_half_copied_reads_every_line_once(
    rounds: list[tuple[list[tuple[int, int]], int, int | None, int, bool, bool]],
) -> None:
    """As above, and the reader also looks while logrotate is still copying (the copy holds the
    first bytes of the log so far, lines that start alike cut anywhere; the copy may end there, as
    when logrotate read the log while a write was half done), and a copy may be
    compressed away right after the truncation (once the reader has read the log to its end:
    what only a compressed copy holds, no reader can read). Every line once, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "messages.log"
        reader, forwarder, writer = started(log)
        for r, (lines_, copy_when, caught_at, reads_during, compressed, ends_there) in enumerate(rounds):
            shift(log)
            copy_at = min(copy_when, len(lines_))
            tick_after(log)

            def copy() -> None:
                if caught_at is not None:
                    Path(f"{log}.1").write_bytes(log.read_bytes()[:caught_at])
                    forwarder.fill(reads_during)
                    if ends_there and not compressed:
                        # The daemon cuts it back to a whole line and writes the rest again (a
                        # copy compressed before that is the operator's loss: no delaycompress).
                        return
                shutil.copyfile(log, f"{log}.1")

            for i, (pad, reads) in enumerate(lines_):
                if i == copy_at:
                    copy()
                writer.write(record(r + 1, i, pad))
                forwarder.fill(reads)
            if copy_at == len(lines_):
                copy()
            if compressed:
                forwarder.fill()  # what only the compressed copy holds, the reader cannot read
            os.truncate(log, 0)
            if compressed:  # as logrotate's compress: a new .1.gz, then the copy removed
                Path(f"{log}.1.gz").write_bytes(gzip.compress(Path(f"{log}.1").read_bytes()))
                os.unlink(f"{log}.1")
                forwarder.fill(1)
        writer, forwarder = finished(reader, forwarder, writer)
        assert forwarder.got == writer.expected, forwarder.notes


def test_reader_knew_the_empty_copy_sends_lines_twice(tmp_path: Path) -> None:
    """The reader notices truncation 1 only after the next (empty) copy was made: that copy is in
    ``known``. It reads A, written between that copy and truncation 2, then looks before the
    daemon's next write: no fallback (known), 'no copy found', it reads the log from its start
    and the daemon writes A again there."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(record(1, 0, 5) + record(1, 1, 5))
    forwarder.fill()
    copytruncate(log)  # round 1's copy holds it all
    shift(log)
    shutil.copyfile(log, f"{log}.1")  # round 2: the log copied while empty
    writer.write(record(2, 0, 5))  # the daemon's first write since truncation 1
    forwarder.fill()  # the reader sees truncation 1 now: the empty copy is 'known'
    os.truncate(log, 0)  # truncation 2
    forwarder.fill()  # an ack wakes it before the daemon's next write
    writer.write(record(3, 0, 5))  # the daemon writes round 2 again (its empty copy), then this
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


def test_reader_after_delaycompress_sends_lines_twice(tmp_path: Path) -> None:
    """Daemon idle across two rotations, delaycompress: the daemon writes X again; a reader that
    saw truncation 1 reads the log from 0 and sends X twice."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(record(1, 0, 5) + record(1, 1, 5))
    forwarder.fill()
    copytruncate(log)
    forwarder.fill()  # sees truncation 1, the copy matches, nothing to skip
    shift(log)
    os.replace(f"{log}.2", f"{log}.2.gz")  # delaycompress compresses the older copy
    shutil.copyfile(log, f"{log}.1")  # empty copy (ifempty)
    os.truncate(log, 0)
    writer.write(record(2, 0, 5))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


@settings(max_examples=200, deadline=None)
@given(
    nonempty=st.booleans(),
    stale=st.booleans(),
    rounds=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2)), min_size=0, max_size=8),
            st.integers(0, 8),  # copy when
            st.integers(0, 2),  # reads between the truncation and the next round
        ),
        min_size=1,
        max_size=5,
    ),
    window=st.integers(256, 1 << 14),
)
def test_reader_over_copytruncates_with_reads_between_rounds_reads_every_line_once(
    nonempty: bool, stale: bool, rounds: list[tuple[list[tuple[int, int]], int, int]], window: int
) -> None:
    """As the test above, with reads between a round's truncation and the next round, rounds of no
    lines, an old empty ``.1`` there from the start, and (``nonempty``) only non-empty copies."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "messages.log"
        if stale:
            Path(f"{log}.1").write_bytes(b"")
            os.utime(f"{log}.1", ns=(10**18, 10**18))  # and far in the future
        reader, forwarder, writer = started(log, window)
        for r, (lines_, copy_when, after) in enumerate(rounds):
            tick_after(log)
            shift(log)
            copy_at = min(copy_when, len(lines_))
            copied = False
            for i, (pad, reads) in enumerate(lines_):
                if i == copy_at and (not nonempty or log.stat().st_size):
                    shutil.copyfile(log, f"{log}.1")
                    copied = True
                writer.write(record(r + 1, i, pad))
                forwarder.fill(reads)
            if copy_at == len(lines_) and (not nonempty or log.stat().st_size):
                shutil.copyfile(log, f"{log}.1")
                copied = True
            if copied:
                os.truncate(log, 0)
            forwarder.fill(after)
        writer, forwarder = finished(reader, forwarder, writer)
        assert forwarder.got == writer.expected, forwarder.notes


def test_reader_waiting_for_skip_misses_a_second_copytruncate(tmp_path: Path) -> None:
    """Pre-existing (e24dfbc too): skip pending, the log empty; the daemon writes the skipped lines
    back and more (C), logrotate copies and truncates again before the reader looks: the reader
    only compares the new log's start with skip, gives up the skip, and reads from 0: C (in .1) lost."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(record(1, 0, 5))
    shutil.copyfile(log, f"{log}.1")
    writer.write(record(1, 1, 5))
    forwarder.fill()  # reads both
    os.truncate(log, 0)
    forwarder.fill()  # skip = line 1, waits
    writer.write(record(2, 0, 5))  # line 1 written again, then this
    shift(log)
    shutil.copyfile(log, f"{log}.1")
    os.truncate(log, 0)
    writer.write(record(3, 0, 5))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


# -- a copy seen while logrotate still makes it; a skip without a copy ------------------------------
@pytest.mark.parametrize("copied", [30, 40, 85, 120, 200])
def test_reader_seeing_a_copy_half_made_after_lines_written_again_reads_each_line_once(
    tmp_path: Path, copied: int
) -> None:
    """Truncation 1 makes the daemon write L1 L2 again; before the reader looks, the next
    copytruncate has begun: .1 holds the first ``copied`` bytes of the log so far. Lines that
    start alike match it over a few bytes (30, 40: within the first line), and one that holds L1
    and part of L2 grows still: neither is the copy of what the reader read, nor stepped over."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(record(1, 0, 5))
    shutil.copyfile(log, f"{log}.1")  # round 1's copy: L0
    writer.write(record(1, 1, 5) + record(1, 2, 5))
    forwarder.fill()
    os.truncate(log, 0)
    writer.write(record(2, 0, 5))  # L1 L2 written again, then this
    tick_after(log)
    shift(log)
    Path(f"{log}.1").write_bytes(log.read_bytes()[:copied])
    forwarder.fill()
    shutil.copyfile(log, f"{log}.1")
    os.truncate(log, 0)
    writer.write(record(3, 0, 5))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


def _compressed_away(log: Path) -> None:
    """copytruncate with compress (no delaycompress): nothing is left to find the copy by."""
    shutil.copyfile(log, f"{log}.1")
    os.truncate(log, 0)
    Path(f"{log}.1.gz").write_bytes(gzip.compress(Path(f"{log}.1").read_bytes()))
    os.unlink(f"{log}.1")


@pytest.mark.parametrize("copied", [20, 30, 85])
def test_reader_without_a_copy_is_not_fooled_by_the_start_of_the_next_copy(tmp_path: Path, copied: int) -> None:
    """No copy found: the reader waits for what it read at the log's start (the daemon may write
    it again). The daemon did not; the next copy, half made, starts like those lines for a few
    bytes: it must hold all of them to be taken for them."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(record(1, 0, 5) + record(1, 1, 5))
    forwarder.fill()
    _compressed_away(log)
    forwarder.fill()
    writer.write(record(2, 0, 5) + record(2, 1, 5))
    tick_after(log)
    shift(log)
    Path(f"{log}.1").write_bytes(log.read_bytes()[:copied])
    forwarder.fill()
    shutil.copyfile(log, f"{log}.1")
    os.truncate(log, 0)
    writer.write(record(3, 0, 5))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


@pytest.mark.parametrize("rotation", ["create", "built-in"])
def test_reader_without_a_copy_moves_on_when_its_log_is_renamed(tmp_path: Path, rotation: str) -> None:
    """No copy found, the reader waits in the empty log for lines the daemon may write again;
    the log is renamed away instead (logrotate's create, the built-in rotation) and the daemon
    writes the new one: the reader reads on there, not waiting in the old file for ever."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(record(1, 0, 5) + record(1, 1, 5))
    forwarder.fill()
    _compressed_away(log)
    forwarder.fill()
    if rotation == "create":
        shift(log)
        os.replace(log, f"{log}.1")
        writer.file.open()
    else:
        writer.file.rotate(KEEP)
    writer.write(record(2, 0, 5))
    forwarder.fill()
    forwarder.fill()
    assert forwarder.got == writer.expected, forwarder.notes
    writer.file.close()
    reader.close()


@pytest.mark.parametrize("look", [False, True])
def test_reader_without_a_copy_reads_lines_copied_and_truncated_while_it_waited(tmp_path: Path, look: bool) -> None:
    """No copy found, the reader waits in the empty log; the daemon writes new lines (nothing
    again) and the next copytruncate takes them, before the reader looks or after."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(record(1, 0, 5) + record(1, 1, 5))
    forwarder.fill()
    _compressed_away(log)
    forwarder.fill()
    writer.write(record(2, 0, 5))
    tick_after(log)
    copytruncate(log)
    if look:
        forwarder.fill()
    writer.write(record(3, 0, 5))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


def test_reader_without_a_copy_reads_the_next_copy_when_nothing_follows_the_truncation(tmp_path: Path) -> None:
    """Found by the half-copied property test: no copy found after truncation 1 (an empty log
    copied, then compressed), the reader waits in the empty log; the daemon writes one line and
    the next copytruncate takes it before the reader looks, with nothing written since. The log
    is as empty as when the reader began waiting: only its shrinking tells, and the line is in
    the copy."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    shutil.copyfile(log, f"{log}.1")  # copied while empty
    writer.write(record(1, 0, 0))
    forwarder.fill()
    os.truncate(log, 0)
    Path(f"{log}.1.gz").write_bytes(gzip.compress(Path(f"{log}.1").read_bytes()))
    os.unlink(f"{log}.1")
    forwarder.fill(1)
    tick_after(log)
    writer.write(record(2, 0, 0))
    shutil.copyfile(log, f"{log}.1")
    os.truncate(log, 0)
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


# -- a copy that ends inside the lines to skip; a shrink that is not a new copy ---------------------
def _copy_caught_inside(log: Path, nbytes: int) -> None:
    """copytruncate whose copy ends inside a line (logrotate read while the daemon's write was
    half done): the daemon cuts such a copy back to its last whole line and writes that line again."""
    shift(log)
    Path(f"{log}.1").write_bytes(log.read_bytes()[:nbytes])
    os.truncate(log, 0)


def _copy_2_caught_inside_the_skip(log: Path, *, seen_truncation_1: bool) -> tuple[LogReader, Forwarder, Writer]:
    """Copy 1 = L0; the reader reads L0 L1 L2; truncation 1 (seen by the reader or not); the
    daemon writes L1 L2 again and M; copy 2 is caught inside L2 and the log truncated."""
    reader, forwarder, writer = started(log)
    writer.write(record(1, 0, 5))
    shutil.copyfile(log, f"{log}.1")
    writer.write(record(1, 1, 5) + record(1, 2, 5))
    forwarder.fill()
    os.truncate(log, 0)
    if seen_truncation_1:
        forwarder.fill()
    writer.write(record(2, 0, 5))
    tick_after(log)
    _copy_caught_inside(log, len(record(1, 1, 5)) + 10)
    return reader, forwarder, writer


def test_reader_behind_two_copytruncates_steps_over_a_newer_copy_that_ends_inside_the_skip(tmp_path: Path) -> None:
    """Copy 1 = L0; the reader reads L0 L1 L2; truncation 1 unseen; the daemon writes L1 L2 again
    and M; copy 2 is caught inside L2 and the log truncated; the daemon cuts copy 2 back to L1 and
    writes L2 M again, then N. The reader steps over copy 2 (L1, complete) and over L2 at the start
    of the log, and reads M and N once (it waited in copy 2 for ever before)."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = _copy_2_caught_inside_the_skip(log, seen_truncation_1=False)
    writer.write(record(3, 0, 5))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


@pytest.mark.parametrize("pad", [0, 60])  # N shorter than L1 (the log seen shrunk) or longer
def test_reader_waiting_in_the_log_steps_over_a_next_copy_that_ends_inside_the_skip(tmp_path: Path, pad: int) -> None:
    """As above, with the reader waiting in the log (skip = L1 L2) when copy 2 comes: copy 2,
    complete, holds only L1; the rest, L2, begins the log. Each line once (L1 and L2 were sent
    twice, with the log seen shrunk or not)."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = _copy_2_caught_inside_the_skip(log, seen_truncation_1=True)
    writer.write(record(3, 0, pad))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


def test_reader_waiting_for_a_skip_takes_no_late_wake_for_a_truncation(tmp_path: Path) -> None:
    """The writer thread writes A and, before its wake reaches the forwarder, logrotate copies
    and truncates and the reader looks (skip = what it read past the copy). The late wake then
    tells a size larger than the log will be after the daemon writes the skip again and B: that
    is no second truncation, and nothing is read twice."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    writer.write(record(1, 0, 5))
    forwarder.fill()
    shutil.copyfile(log, f"{log}.1")
    writer.write(record(1, 1, 5))
    forwarder.fill()
    a = record(1, 2, 5) + record(1, 3, 5)
    writer.file.write(a)  # the writer thread, before its wake
    writer.expected += a
    st_ = os.fstat(writer.file.fd)
    late = (st_.st_dev, st_.st_ino), writer.file.size
    os.truncate(log, 0)
    forwarder.fill()
    forwarder.wake(*late)
    writer.write(record(2, 0, 0))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


def test_reader_waiting_for_a_skip_over_an_empty_copy_and_its_truncation_reads_each_line_once(tmp_path: Path) -> None:
    """Skip = L1 (after an empty copy), the reader waits in the empty log; logrotate copies it
    again while empty, the daemon writes L1 again and M, logrotate truncates, and the reader looks
    before the daemon's next write (which puts L1 M back, the empty copy in its window). The
    shrink with only an empty new copy is no reason to give the skip up: L1 once."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = started(log)
    tick_after(log)
    shift(log)
    shutil.copyfile(log, f"{log}.1")
    writer.write(record(1, 0, 0))
    forwarder.fill(1)
    os.truncate(log, 0)
    forwarder.fill(1)
    tick_after(log)
    shift(log)
    shutil.copyfile(log, f"{log}.1")
    writer.write(record(2, 0, 0))
    os.truncate(log, 0)
    forwarder.fill(1)
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes


def test_reader_waiting_in_a_copy_cut_back_is_not_fooled_by_the_next_copytruncate(tmp_path: Path) -> None:
    """Found by a review: the reader waits in copy 2 (caught inside L2, skip = L1 L2); the daemon
    cuts copy 2 back to L1 and writes L2 M again, then N; the next copytruncate (copy 3 = L2 M N)
    lands before the reader looks. Copy 2 shrank because the daemon cut it, not for a new copy of
    other lines: L2 once."""
    log = tmp_path / "messages.log"
    reader, forwarder, writer = _copy_2_caught_inside_the_skip(log, seen_truncation_1=False)
    forwarder.fill()
    writer.write(record(3, 0, 5))
    tick_after(log)
    copytruncate(log)
    writer.write(record(4, 0, 5))
    writer, forwarder = finished(reader, forwarder, writer)
    assert forwarder.got == writer.expected, forwarder.notes
