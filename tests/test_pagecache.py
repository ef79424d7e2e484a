"""The page cache a log file keeps: only its last ``[log] cache_bytes`` (output.pagecache).

The planner is checked against a model of what it promised (hypothesis); the real effect with
``fincore`` (util-linux), which counts a file's pages in the page cache.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import read_lines, record, wait_for, write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from nio_logd.output.logfile import LogFile
from nio_logd.output.pagecache import MAX_STEP, MIN_STEP, PASSES, CacheRelease

MiB = 1 << 20


@settings(max_examples=300, deadline=None)
@given(
    keep=st.integers(min_value=1, max_value=128 * MiB),
    moves=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=40 * MiB)), min_size=1, max_size=60),
)
def test_advice_stays_behind_the_kept_end_and_gives_each_byte_passes_chances(
    keep: int, moves: list[tuple[bool, int]]
) -> None:
    """Each range ends exactly ``keep`` bytes before the size it was given for, and starts where
    the range ``PASSES`` calls before it ended: in one file's life (until it is told a smaller
    size) each byte is advised in at most ``PASSES`` calls, and every byte before the last range's
    start in exactly ``PASSES``. Silent only while the file has grown by less than a step."""
    cache = CacheRelease(keep)
    assert MIN_STEP <= cache.step <= MAX_STEP
    size = 0
    ends: list[int] = []  # this life's range ends, in order
    for grows, amount in moves:
        before = size
        size = size + amount if grows else max(0, size - amount)
        if size < before:  # cut shorter (copytruncate) or another file: a new life
            ends = []
        advice = cache.advise(size)
        reached = ends[-1] if ends else 0
        if advice is None:
            assert size - keep - reached < cache.step
            continue
        offset, length = advice
        assert offset + length == size - keep  # right up to the kept end, never into it
        assert size - keep - reached >= cache.step
        assert offset == (ends[-PASSES] if len(ends) >= PASSES else 0)
        assert length > 0
        ends.append(offset + length)


def test_a_new_file_or_a_truncation_starts_the_advice_again() -> None:
    cache = CacheRelease(4 * MiB)
    assert cache.advise(10 * MiB) == (0, 6 * MiB)
    assert cache.advise(12 * MiB) == (0, 8 * MiB)
    cache.reset()  # LogFile: a truncation found (the size may be larger again by now), or open()
    assert cache.advise(4 * MiB) is None
    assert cache.advise(6 * MiB) == (0, 2 * MiB)
    assert cache.advise(5 * MiB) == (0, MiB)  # smaller: a new life, whether reset() was called or not
    assert cache.advise(7 * MiB) == (0, 3 * MiB)


def resident_bytes(path: Path) -> int:
    """The file's bytes in the page cache, as fincore counts them (whole pages)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return int(out.stdout.strip())


needs_fincore = pytest.mark.skipif(shutil.which("fincore") is None, reason="fincore (util-linux) is not installed")


@pytest.fixture
def drops_pages(tmp_path: Path) -> None:
    """The real-file tests need a file system whose pages DONTNEED drops (tmpfs keeps them)."""
    probe = tmp_path / "probe"
    with probe.open("wb") as f:
        f.write(b"p" * MiB)
        f.flush()
        os.fdatasync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, MiB, os.POSIX_FADV_DONTNEED)
    resident = resident_bytes(probe)
    probe.unlink()
    if resident:
        pytest.skip(f"posix_fadvise(DONTNEED) drops no page on the file system of {tmp_path}")


LINE = b"x" * 1023 + b"\n"


@needs_fincore
@pytest.mark.parametrize("cache_bytes", [0, 4 * MiB])
def test_only_the_end_of_a_written_file_stays_cached(tmp_path: Path, drops_pages: None, cache_bytes: int) -> None:
    """With the pages on disk (fdatasync after each write, as durability = "fsync" does), the
    file keeps ``cache_bytes`` and at most two steps more in the page cache; with 0, all of it."""
    path = tmp_path / "messages.log"
    f = LogFile(path, 0o640, cache_bytes=cache_bytes)
    f.open()
    try:
        for _ in range(64):
            f.write(LINE * 256)  # 256 KiB
            os.fdatasync(f.fd)
    finally:
        f.close()
    size = path.stat().st_size
    assert size == 16 * MiB
    resident = resident_bytes(path)
    if cache_bytes:
        assert cache_bytes <= resident <= cache_bytes + 2 * MIN_STEP
    else:
        assert resident == size
    assert path.read_bytes() == LINE * (16 * 1024)  # what was dropped from the cache is on disk


@needs_fincore
def test_a_copytruncated_file_is_advised_from_its_new_start(tmp_path: Path, drops_pages: None) -> None:
    """Truncated, and grown past its old size in the first write after (the planner never sees
    the file small): advised from offset 0 again, not from where the old file's advice was."""
    path = tmp_path / "messages.log"
    f = LogFile(path, 0o640, cache_bytes=2 * MiB)
    f.open()
    try:
        for _ in range(32):  # 8 MiB
            f.write(LINE * 256)
            os.fdatasync(f.fd)
        os.truncate(path, 0)  # what logrotate's copytruncate does, once it has copied the file
        f.write(LINE * (10 * 1024))  # 10 MiB at once: bigger than the file was
        os.fdatasync(f.fd)
        for _ in range(8):  # the later writes' advice drops what the big one's found dirty
            f.write(LINE * 256)
            os.fdatasync(f.fd)
    finally:
        f.close()
    assert path.stat().st_size == 12 * MiB
    assert 2 * MiB <= resident_bytes(path) <= 2 * MiB + 2 * MIN_STEP


@needs_fincore
def test_a_reopened_file_is_advised_from_its_start(tmp_path: Path, drops_pages: None) -> None:
    """Rotation (rename, reopen): the new file's advice starts at its own offset 0."""
    path = tmp_path / "messages.log"
    f = LogFile(path, 0o640, cache_bytes=MiB)
    f.open()
    try:
        for _ in range(32):  # 8 MiB: the old file's advice has moved past its offset 0
            f.write(LINE * 256)
            os.fdatasync(f.fd)
        os.replace(path, tmp_path / "messages.log.1")
        f.open()
        f.write(LINE * (10 * 1024))  # bigger than the old file at once
        os.fdatasync(f.fd)
        for _ in range(8):
            f.write(LINE * 256)
            os.fdatasync(f.fd)
    finally:
        f.close()
    assert path.stat().st_size == 12 * MiB
    assert MiB <= resident_bytes(path) <= MiB + 2 * MIN_STEP


@needs_fincore
@pytest.mark.both_shapes
def test_the_daemon_keeps_cache_bytes_of_its_log_cached(
    tmp_path: Path, drops_pages: None, daemon_factory: object
) -> None:
    """``[log] cache_bytes`` reaches the process that owns the files."""
    cache_bytes = MiB
    config = write_config(tmp_path, log={"durability": "fsync", "cache_bytes": cache_bytes})
    daemon = daemon_factory(config)  # type: ignore[operator]
    msg = "m" * 900
    batch = b"".join(record(msg=f"{i:06d}{msg}") + b"\n" for i in range(1000))  # about 1 MiB of lines
    messages = tmp_path / "logs" / "messages.log"
    with socket.create_connection(daemon.tcp, timeout=10) as sock:
        for n in range(1, 9):  # one write each: the file's size told to the planner after each
            sock.sendall(batch)
            wait_for(lambda n=n: messages.exists() and messages.stat().st_size > n * len(batch), timeout=60)
    # Measured before the file is read (reading it brings its pages back into the cache). The
    # last write's advice found its range on disk or not yet: a step and a write of slack.
    resident = resident_bytes(messages)
    assert cache_bytes <= resident <= cache_bytes + MIN_STEP + 2 * len(batch)
    wait_for(lambda: len(read_lines(messages, writing=True)) == 8000, timeout=60)
    assert daemon.stop() == 0
