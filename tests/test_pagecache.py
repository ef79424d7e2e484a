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
from nio_logd.output.pagecache import MAX_STEP, MIN_STEP, CacheRelease

MiB = 1 << 20


@settings(max_examples=300, deadline=None)
@given(
    keep=st.integers(min_value=1, max_value=128 * MiB),
    moves=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=40 * MiB)), min_size=1, max_size=60),
)
def test_advice_stays_behind_the_kept_end_and_covers_the_rest_twice(keep: int, moves: list[tuple[bool, int]]) -> None:
    """Each range lies wholly ``keep`` bytes behind the size it was given for; in one file's life
    (until it is cut shorter) no byte is advised more than twice, every byte up to where the
    advice has reached was advised, and all of them but the last step's twice."""
    cache = CacheRelease(keep)
    assert MIN_STEP <= cache.step <= MAX_STEP
    size = 0
    ranges: list[tuple[int, int]] = []
    reached = 0  # where the advice of this file's life has got to
    for grows, amount in moves:
        size = size + amount if grows else max(0, size - amount)
        if size < reached:  # cut shorter (copytruncate): a new life
            ranges, reached = [], 0
        advice = cache.advise(size)
        if advice is None:
            # Silent only while the part past ``keep`` that is not yet advised is under a step.
            assert size - keep - reached < cache.step
            continue
        offset, length = advice
        assert length > 0 and offset >= 0
        assert offset + length == size - keep  # right up to the kept end, never into it
        assert offset + length - reached >= cache.step
        ranges.append(advice)
        reached = offset + length
        # Ranges start where the one before the last ended: each byte is in at most two of them,
        # and every byte before the last range's start is in two.
        edges = [0, *(o + n for o, n in ranges)]
        for i, (o, n) in enumerate(ranges):
            assert o == edges[max(0, i - 1)]
            assert o + n == edges[i + 1]


def test_a_new_file_starts_the_advice_again() -> None:
    cache = CacheRelease(4 * MiB)
    assert cache.advise(10 * MiB) == (0, 6 * MiB)
    assert cache.advise(12 * MiB) == (0, 8 * MiB)
    cache.reset()
    assert cache.advise(4 * MiB) is None
    assert cache.advise(6 * MiB) == (0, 2 * MiB)


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

LINE = b"x" * 1023 + b"\n"


@needs_fincore
@pytest.mark.parametrize("cache_bytes", [0, 4 * MiB])
def test_only_the_end_of_a_written_file_stays_cached(tmp_path: Path, cache_bytes: int) -> None:
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
def test_a_copytruncated_file_is_advised_from_its_new_start(tmp_path: Path) -> None:
    path = tmp_path / "messages.log"
    f = LogFile(path, 0o640, cache_bytes=2 * MiB)
    f.open()
    try:
        for _ in range(16):
            f.write(LINE * 256)
            os.fdatasync(f.fd)
        os.truncate(path, 0)  # what logrotate's copytruncate does, once it has copied the file
        for _ in range(24):
            f.write(LINE * 256)
            os.fdatasync(f.fd)
    finally:
        f.close()
    assert path.stat().st_size == 6 * MiB
    assert 2 * MiB <= resident_bytes(path) <= 2 * MiB + MIN_STEP // 2  # none of the first life


@needs_fincore
@pytest.mark.both_shapes
def test_the_daemon_keeps_cache_bytes_of_its_log_cached(tmp_path: Path, daemon_factory: object) -> None:
    """``[log] cache_bytes`` reaches the process that owns the files."""
    cache_bytes = MiB
    config = write_config(tmp_path, log={"durability": "fsync", "cache_bytes": cache_bytes})
    daemon = daemon_factory(config)  # type: ignore[operator]
    msg = "m" * 900
    batch = b"".join(record(msg=f"{i:06d}{msg}") + b"\n" for i in range(1000))
    with socket.create_connection(daemon.tcp, timeout=10) as sock:
        for _ in range(8):  # about 8 MiB of lines
            sock.sendall(batch)
    messages = tmp_path / "logs" / "messages.log"
    # Measured before the file is read (reading it brings its pages back into the cache).
    wait_for(lambda: messages.exists() and messages.stat().st_size > 7 * MiB, timeout=60)
    resident = resident_bytes(messages)
    assert cache_bytes <= resident <= cache_bytes + 2 * MIN_STEP + MiB  # a batch's worth of slack
    wait_for(lambda: len(read_lines(messages, writing=True)) == 8000, timeout=60)
    assert daemon.stop() == 0
