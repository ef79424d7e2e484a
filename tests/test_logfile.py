"""Unit tests for the log file (undo of a failed write, retry, tail repair, rotation) and the
copytruncate journal, on real files in ``tmp_path``.

No daemon, no threads, no mocks. Failures are real: a write is made to fail with RLIMIT_FSIZE in a
forked child (EFBIG, SIGXFSZ ignored), or with a full 64 KiB tmpfs (ENOSPC, root only); an undo
is made to fail with the append-only inode flag (ftruncate then gets EPERM, even for root); an
open is made to fail with RLIMIT_NOFILE (EMFILE) in a forked child; a rename with the immutable
flag (EPERM). The test plays logrotate for copytruncate: it copies the file and truncates it.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The one place the code under test is imported (modules may move into subpackages).
from conftest import tick_after
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nio_logd.output.copytruncate import WriteJournal
from nio_logd.output.logfile import LogFile

KIB = 1024
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20


# -- helpers ----------------------------------------------------------------------------------------
def lines(tag: str, n: int, width: int = 20) -> bytes:
    """``n`` distinct whole lines, each ending in a newline."""
    return b"".join(f"{tag}-{i:05d}-".encode().ljust(width, b"x") + b"\n" for i in range(n))


def in_child(body: Callable[[], None]) -> None:
    """Run ``body`` in a forked child (where resource limits may be lowered without touching
    pytest) and fail with the child's traceback unless it exited with status 0.

    The child's stdout/stderr (and ``sys.stdout``/``sys.stderr``, which structlog prints to) go to
    a pipe: a pipe is not subject to RLIMIT_FSIZE, pytest's capture file would be.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            out = os.fdopen(w, "w", buffering=1, closefd=False)
            sys.stdout = sys.stderr = out
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            try:
                body()
                status = 0
            except BaseException:
                out.write(traceback.format_exc())
                status = 3
            out.flush()
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, wstatus = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wstatus)
    assert code == 0, f"child exited with {code}:\n" + b"".join(chunks).decode(errors="replace")


def set_fsize_limit(limit: int) -> None:
    """Lower (or raise back, ``RLIM_INFINITY``) the soft RLIMIT_FSIZE of this (child) process."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def get_flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        return int(struct.unpack("@i", buf)[0])
    finally:
        os.close(fd)


def set_flag(path: Path, flag: int, on: bool) -> None:
    """Set or clear an inode flag (chattr +a / +i) through an fd opened without following links."""
    flags = get_flags(path)
    flags = flags | flag if on else flags & ~flag
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, bytearray(struct.pack("@i", flags)))
    finally:
        os.close(fd)


def clear_flags(*paths: Path) -> None:
    """Clean-up: never leave an append-only or immutable file behind (tmp_path could not be removed)."""
    for path in paths:
        try:
            if not path.is_symlink() and path.is_file() and get_flags(path) & (FS_APPEND_FL | FS_IMMUTABLE_FL):
                set_flag(path, FS_APPEND_FL | FS_IMMUTABLE_FL, False)
        except OSError:
            pass


def inode_flags_supported(path: Path, flag: int) -> str | None:
    """None if ``flag`` can be set on a file next to ``path``, else why not (for a skip)."""
    probe = path.parent / ".flag-probe"
    probe.write_bytes(b"")
    try:
        set_flag(probe, flag, True)
        set_flag(probe, flag, False)
    except OSError as exc:
        return (
            f"cannot set inode flag {flag:#x} here ({exc.strerror}): "
            "needs root (CAP_LINUX_IMMUTABLE) and a file system with chattr flags"
        )
    finally:
        clear_flags(probe)
        probe.unlink()
    return None


@pytest.fixture
def logfile(tmp_path: Path) -> Iterator[LogFile]:
    """An open LogFile at ``tmp_path/messages.log`` (closed afterwards)."""
    f = LogFile(tmp_path / "messages.log", 0o640)
    f.open()
    try:
        yield f
    finally:
        f.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- open, append, size -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_open_creates_file_with_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "messages.log"
    old = os.umask(0)
    try:
        f = LogFile(path, mode)
        f.open()
    finally:
        os.umask(old)
    try:
        st_ = os.lstat(path)
        assert stat.S_ISREG(st_.st_mode) and stat.S_IMODE(st_.st_mode) == mode
        assert f.created and f.size == 0 and st_.st_size == 0
        assert (os.fstat(f.fd).st_ino) == st_.st_ino
    finally:
        f.close()
    assert f.fd == -1


def test_open_existing_file_appends_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "messages.log"
    path.write_bytes(b"old-1\nold-2\n")
    os.chmod(path, 0o600)
    f = LogFile(path, 0o644)
    f.open()
    try:
        assert not f.created
        assert f.size == 12
        assert f.write(b"new-1\n") == 12
        assert path.read_bytes() == b"old-1\nold-2\nnew-1\n"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # an existing file is never chmodded
    finally:
        f.close()


def test_write_returns_offset_where_data_landed_and_tracks_size(logfile: LogFile) -> None:
    written = b""
    for i, data in enumerate([b"a\n", lines("b", 3), lines("c", 100, 50), b"d\n"]):
        landed = logfile.write(data)
        assert landed == len(written), i
        written += data
        assert logfile.size == len(written) == os.fstat(logfile.fd).st_size
    assert logfile.write(b"") == len(written)  # nothing written: the size before it
    assert logfile.path.read_bytes() == written
    assert logfile.size == len(written)


def test_write_lands_after_what_another_writer_appended(logfile: LogFile) -> None:
    """O_APPEND: the data goes to the real end; write() says where, not where it expected."""
    logfile.write(b"ours-1\n")
    with open(logfile.path, "ab") as other:
        other.write(b"theirs\n")
    assert logfile.write(b"ours-2\n") == 14
    assert logfile.size == 21
    assert logfile.path.read_bytes() == b"ours-1\ntheirs\nours-2\n"


def test_open_refuses_a_symlink_and_keeps_the_file_open_before(tmp_path: Path, logfile: LogFile) -> None:
    logfile.write(b"line\n")
    target = tmp_path / "target"
    target.write_bytes(b"secret\n")
    os.rename(logfile.path, tmp_path / "messages.log.moved")
    os.symlink(target, logfile.path)
    fd_before = logfile.fd
    with pytest.raises(OSError) as info:
        logfile.open()
    assert info.value.errno == errno.ELOOP
    assert logfile.fd == fd_before and logfile.size == 5
    assert target.read_bytes() == b"secret\n"


def test_write_after_unlink_creates_the_file_again(tmp_path: Path, logfile: LogFile) -> None:
    logfile.write(b"before\n")
    os.unlink(logfile.path)
    assert logfile.write(b"after\n") == 0
    assert logfile.path.read_bytes() == b"after\n"
    assert logfile.size == 6


# -- tail repair at open ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("whole", "partial"),
    [
        (lines("w", 3), b'{"partial": tr'),  # short
        (lines("w", 3), b"p" * (64 * KIB + 1)),  # longer than the 64 KiB looked at
        (lines("w", 5000), b"p" * 70_000),  # long, after more than 64 KiB of whole lines
        (lines("w", 3), b"p" * ((1 << 20) + 100_000)),  # longer than one 1 MiB step back
    ],
    ids=["short", "64k+1", "70k-after-100k", "1.1MiB"],
)
def test_open_cuts_a_partial_last_line(tmp_path: Path, whole: bytes, partial: bytes) -> None:
    path = tmp_path / "messages.log"
    path.write_bytes(whole + partial)
    f = LogFile(path, 0o640)
    f.open()
    try:
        assert f.size == len(whole)
        assert path.read_bytes() == whole
        assert f.write(b"next\n") == len(whole)
        assert path.read_bytes() == whole + b"next\n"
    finally:
        f.close()


def test_open_seeds_the_journal_with_the_tail_after_a_short_cut(tmp_path: Path) -> None:
    path = tmp_path / "messages.log"
    whole = lines("w", 10)
    path.write_bytes(whole + b"partial")
    f = LogFile(path, 0o640)
    f.open()
    try:
        j = f.journal
        assert (j.start, j.end) == (0, len(whole))
        assert j.slice(j.start, j.end) == whole
    finally:
        f.close()


@pytest.mark.parametrize("size_lines", [3, 5000], ids=["small", "over-64k"])
def test_open_leaves_a_file_ending_with_a_newline_untouched(tmp_path: Path, size_lines: int) -> None:
    path = tmp_path / "messages.log"
    whole = lines("w", size_lines)
    path.write_bytes(whole)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # a truncate (even to the same size) would change it
    f = LogFile(path, 0o640)
    f.open()
    try:
        assert f.size == len(whole)
        assert path.read_bytes() == whole
        assert os.stat(path).st_mtime_ns == 1_000_000_000
        j = f.journal
        assert j.end == len(whole)
        # The last 64 KiB, from its first line start on: a copy is only ever cut at a line start.
        low = max(0, len(whole) - 65536)
        assert low <= j.start < low + 200
        assert j.start == 0 or whole[j.start - 1 : j.start] == b"\n"
        assert j.slice(j.start, j.end) == whole[j.start :]
    finally:
        f.close()


@pytest.mark.parametrize("partial", [b"x", b'{"a": 1', b"y" * 70_000], ids=["1", "short", "70k"])
def test_open_empties_a_file_of_only_a_partial_line(tmp_path: Path, partial: bytes) -> None:
    path = tmp_path / "messages.log"
    path.write_bytes(partial)
    f = LogFile(path, 0o640)
    f.open()
    try:
        assert f.size == 0
        assert path.read_bytes() == b""
        assert f.journal.start == f.journal.end == 0
        assert f.write(b"first\n") == 0
        assert path.read_bytes() == b"first\n"
    finally:
        f.close()


@pytest.mark.parametrize("partial_len", [20, 70_000], ids=["short-partial", "long-partial"])
def test_copytruncate_right_after_a_tail_repair_puts_back_the_first_write(tmp_path: Path, partial_len: int) -> None:
    """After a crash left a partial line, logrotate copies the repaired file, we write, it truncates:
    the first write must be put back. That needs the journal to hold the bytes before the cut,
    whatever the length of the line that was cut (the short case seeds it with the tail)."""
    path = tmp_path / "messages.log"
    whole = lines("w", 50)
    path.write_bytes(whole + b"p" * partial_len)
    f = LogFile(path, 0o640)
    f.open()
    try:
        assert f.size == len(whole)
        copy = tmp_path / "messages.log.1"
        copy.write_bytes(path.read_bytes())  # logrotate's copy, made before our first write
        first = lines("first", 3)
        f.write(first)  # lands after the copy's end
        os.truncate(path, 0)  # logrotate truncates
        f.write(b"second\n")
        assert copy.read_bytes() + path.read_bytes() == whole + first + b"second\n"
    finally:
        f.close()


# -- undo of a failed write -------------------------------------------------------------------------
@pytest.mark.parametrize("room", [0, 1, 37, 150], ids=["no-room", "1-byte", "mid-line", "two-lines"])
def test_failed_write_is_undone_with_rlimit_fsize(tmp_path: Path, room: int) -> None:
    """A real EFBIG (RLIMIT_FSIZE, the write stops after ``room`` bytes): the file ends where it
    ended before, the size is unchanged, and the next write (limit lifted) lands right there."""
    path = tmp_path / "messages.log"
    before = lines("before", 20)
    data = lines("data", 10)

    def child() -> None:
        f = LogFile(path, 0o640)
        f.open()
        f.write(before)
        set_fsize_limit(len(before) + room)
        with pytest.raises(OSError) as info:
            f.write(data)
        assert info.value.errno == errno.EFBIG
        assert path.read_bytes() == before
        assert f.size == len(before) == os.fstat(f.fd).st_size
        assert f.truncate_to == -1
        set_fsize_limit(resource.RLIM_INFINITY)
        assert f.write(data) == len(before)
        assert path.read_bytes() == before + data
        f.close()

    in_child(child)
    assert path.read_bytes() == before + data


@pytest.mark.root
def test_failed_write_is_undone_on_a_full_tmpfs(tmp_path: Path) -> None:
    """A real ENOSPC (a 64 KiB tmpfs, the log's last page partly free): the part that fit is cut
    off again; once the filler is deleted the write lands right after the last whole line."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "nio-logd-test", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    f = LogFile(disk / "messages.log", 0o640)
    try:
        f.open()
        before = lines("before", 200, 40)  # 8200 bytes: the third page is mostly free
        f.write(before)
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, b"\0" * 4096)
            assert full.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        data = lines("data", 300, 40)  # 12,000 bytes: only what is left of the log's last page fits
        with pytest.raises(OSError) as info:
            f.write(data)
        assert info.value.errno == errno.ENOSPC
        assert f.path.read_bytes() == before
        assert f.size == len(before) == os.fstat(f.fd).st_size
        with pytest.raises(OSError):  # still full: the retry fails the same way, the file unchanged
            f.write(data)
        assert f.path.read_bytes() == before
        filler.unlink()
        assert f.write(data) == len(before)
        assert f.path.read_bytes() == before + data
    finally:
        f.close()
        subprocess.run(["umount", str(disk)], capture_output=True)
        if os.path.ismount(disk):
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.root
def test_undo_that_fails_is_applied_before_the_next_write(tmp_path: Path) -> None:
    """The truncate_to path, for real: the file is append-only (chattr +a), so the undo's ftruncate
    fails with EPERM after a partial EFBIG write. The partial line stays in the file, truncate_to
    remembers the cut; the next write does the cut first (and fails while it still cannot); once
    the flag is cleared the next write cuts, and the data lands right after the last whole line."""
    path = tmp_path / "messages.log"
    why = inode_flags_supported(path, FS_APPEND_FL)
    if why:
        pytest.skip(why)
    before = lines("before", 20)
    data = lines("data", 10)

    def child() -> None:
        f = LogFile(path, 0o640)
        f.open()
        f.write(before)
        set_flag(path, FS_APPEND_FL, True)
        try:
            set_fsize_limit(len(before) + 30)  # 30 bytes fit: a partial line
            with pytest.raises(OSError) as info:
                f.write(data)
            assert info.value.errno == errno.EFBIG
            set_fsize_limit(resource.RLIM_INFINITY)
            assert path.read_bytes() == before + data[:30]  # the undo could not cut
            assert f.truncate_to == len(before)
            assert f.size == len(before)
            with pytest.raises(OSError) as again:  # the cut is tried first, and still refused
                f.write(data)
            assert again.value.errno == errno.EPERM
            assert f.truncate_to == len(before)
            assert path.read_bytes() == before + data[:30]
        finally:
            set_fsize_limit(resource.RLIM_INFINITY)
            set_flag(path, FS_APPEND_FL, False)
        assert f.write(data) == len(before)
        assert f.truncate_to == -1
        assert path.read_bytes() == before + data
        assert f.size == len(before + data)
        f.close()

    try:
        in_child(child)
    finally:
        clear_flags(path)
    assert path.read_bytes() == before + data


# -- retry: what Writer._retry relies on ------------------------------------------------------------
def test_retried_write_after_repeated_failures_appends_the_data_once(tmp_path: Path) -> None:
    """The same batch written again and again (as _retry does) while the disk keeps refusing at
    different points: the file never holds part of it, and once it fits it is there exactly once."""
    path = tmp_path / "messages.log"
    before = lines("before", 5)
    data = lines("data", 50)

    def child() -> None:
        f = LogFile(path, 0o640)
        f.open()
        f.write(before)
        for room in (len(data) - 1, 0, 500, 21, 1):
            set_fsize_limit(len(before) + room)
            with pytest.raises(OSError):
                f.write(data)
            set_fsize_limit(resource.RLIM_INFINITY)
            assert path.read_bytes() == before and f.size == len(before)
        assert f.write(data) == len(before)
        assert f.write(b"after\n") == len(before) + len(data)
        f.close()

    in_child(child)
    content = path.read_bytes()
    assert content == before + data + b"after\n"
    assert sorted(content.splitlines()) == sorted(set(content.splitlines()))


def test_undo_of_a_written_batch_then_rewrite_lands_once(logfile: LogFile) -> None:
    """_commit's fsync failure path: the batch is cut with undo(start) and written again."""
    logfile.write(b"kept\n")
    data = lines("batch", 4)
    start = logfile.write(data)
    logfile.undo(start)
    assert logfile.path.read_bytes() == b"kept\n" and logfile.size == 5
    assert logfile.write(data) == start
    assert logfile.path.read_bytes() == b"kept\n" + data


# -- rotation ----------------------------------------------------------------------------------------
def rotated(path: Path, n: int) -> Path:
    return Path(f"{path}.{n}")


def test_rotate_shifts_files_drops_the_oldest_and_opens_a_new_file(logfile: LogFile) -> None:
    path = logfile.path
    fds = open_fds()
    for gen in range(6):
        logfile.write(f"gen-{gen}\n".encode())
        logfile.rotate(3)
        assert logfile.size == 0
        assert path.read_bytes() == b""
        assert os.fstat(logfile.fd).st_ino == os.lstat(path).st_ino
        assert open_fds() == fds  # the old fd was closed, the new one took its place
        for n in (1, 2, 3):
            expect = gen - n + 1
            if expect >= 0:
                assert rotated(path, n).read_bytes() == f"gen-{expect}\n".encode(), (gen, n)
            else:
                assert not os.path.lexists(rotated(path, n))
        assert not os.path.lexists(rotated(path, 4))
    assert logfile.write(b"new\n") == 0
    assert path.read_bytes() == b"new\n"


def test_rotate_again_after_the_open_failed_only_opens(tmp_path: Path) -> None:
    """The renames succeed, the open of the new file fails (EMFILE, RLIMIT_NOFILE in a child); the
    rotation retried does not shift the files a second time: it only opens the new file."""
    path = tmp_path / "messages.log"
    rotated(path, 1).write_bytes(b"older-1\n")
    rotated(path, 2).write_bytes(b"older-2\n")

    def child() -> None:
        f = LogFile(path, 0o640)
        f.open()
        f.write(b"current\n")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        for fd in (0, 1, 2):
            os.fstat(fd)  # all open: with a limit of 3 no new fd can be had
        resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))
        try:
            with pytest.raises(OSError) as info:
                f.rotate(3)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert info.value.errno == errno.EMFILE
        assert not os.path.lexists(path)
        assert [rotated(path, n).read_bytes() for n in (1, 2, 3)] == [b"current\n", b"older-1\n", b"older-2\n"]
        f.rotate(3)
        assert [rotated(path, n).read_bytes() for n in (1, 2, 3)] == [b"current\n", b"older-1\n", b"older-2\n"]
        assert not os.path.lexists(rotated(path, 4))
        assert path.read_bytes() == b"" and f.size == 0
        assert f.write(b"new\n") == 0
        f.close()

    in_child(child)
    assert path.read_bytes() == b"new\n"
    assert [rotated(path, n).read_bytes() for n in (1, 2, 3)] == [b"current\n", b"older-1\n", b"older-2\n"]


@pytest.mark.root
def test_rotate_again_after_a_rename_failed_partway_does_not_shift_twice(tmp_path: Path) -> None:
    """keep=4 with .1 .2 .3: .3 -> .4 and .2 -> .3 succeed, .1 -> .2 fails (EPERM: .1 is immutable,
    as a file planted by another user in a sticky folder would be). Once .1 can be moved, the
    retried rotation must end as one rotation would: .1 current, .2 old .1, .3 old .2, .4 old .3."""
    path = tmp_path / "messages.log"
    for n in (1, 2, 3):
        rotated(path, n).write_bytes(f"older-{n}\n".encode())
    why = inode_flags_supported(path, FS_IMMUTABLE_FL)
    if why:
        pytest.skip(why)
    f = LogFile(path, 0o640)
    f.open()
    try:
        f.write(b"current\n")
        set_flag(rotated(path, 1), FS_IMMUTABLE_FL, True)
        try:
            with pytest.raises(OSError) as info:
                f.rotate(4)
            assert info.value.errno == errno.EPERM
        finally:
            set_flag(rotated(path, 1), FS_IMMUTABLE_FL, False)
        f.rotate(4)
        found = {n: rotated(path, n).read_bytes() if rotated(path, n).exists() else None for n in (1, 2, 3, 4)}
        assert found == {1: b"current\n", 2: b"older-1\n", 3: b"older-2\n", 4: b"older-3\n"}
    finally:
        f.close()
        clear_flags(*(rotated(path, n) for n in (1, 2, 3, 4)))


def test_rotate_renames_planted_symlinks_and_never_follows_them(tmp_path: Path, logfile: LogFile) -> None:
    path = logfile.path
    victim1 = tmp_path / "victim1"
    victim3 = tmp_path / "victim3"
    victim1.write_bytes(b"victim one\n")
    victim3.write_bytes(b"victim three\n")
    os.symlink(victim1, rotated(path, 1))
    os.symlink(tmp_path / "nowhere", rotated(path, 2))  # dangling
    os.symlink(victim3, rotated(path, 3))  # the oldest slot: replaced by .2, never written through
    logfile.write(b"current\n")
    logfile.rotate(3)
    assert victim1.read_bytes() == b"victim one\n"
    assert victim3.read_bytes() == b"victim three\n"
    assert rotated(path, 1).read_bytes() == b"current\n" and not rotated(path, 1).is_symlink()
    assert os.readlink(rotated(path, 2)) == str(victim1)
    assert os.readlink(rotated(path, 3)) == str(tmp_path / "nowhere")
    assert not os.path.lexists(rotated(path, 4))
    assert path.read_bytes() == b"" and not path.is_symlink()
    logfile.write(b"new\n")
    logfile.rotate(3)
    assert victim1.read_bytes() == b"victim one\n"
    assert os.readlink(rotated(path, 3)) == str(victim1)
    assert rotated(path, 2).read_bytes() == b"current\n"


# -- writes of many parts (writev) ------------------------------------------------------------------
def test_a_write_of_parts_lands_them_in_order_past_one_writev_s_limit(logfile: LogFile) -> None:
    """3,000 parts (more than the 1,024 buffers one writev takes), as bytes, bytearrays and views
    of a bigger buffer (a worker's batch): the file and the journal hold them in order, once."""
    data = lines("p", 3000)
    width = len(data) // 3000
    pieces = [data[i * width : (i + 1) * width] for i in range(3000)]
    parts: list[Any] = []
    for i, piece in enumerate(pieces):
        parts.append(piece if i % 3 == 0 else bytearray(piece) if i % 3 == 1 else memoryview(b"##" + piece)[2:])
    parts.insert(1500, b"")  # an empty part is nothing
    logfile.write(b"first\n")
    landed = logfile.write(parts)
    assert landed == len(b"first\n")
    assert logfile.path.read_bytes() == b"first\n" + data
    assert logfile.size == len(data) + len(b"first\n")
    j = logfile.journal
    assert j.end == logfile.size and j.slice(j.start, j.end) == (b"first\n" + data)[-j.nbytes :]


def test_a_copytruncate_before_a_write_of_parts_puts_back_what_the_copy_missed(
    tmp_path: Path, logfile: LogFile
) -> None:
    w1, w2 = lines("w1", 5), lines("w2", 7)
    logfile.write([w1[:21], bytearray(w1[21:]), memoryview(w2)])
    copy = tmp_path / "messages.log.1"
    copy.write_bytes(w1)  # the copy missed w2
    os.truncate(logfile.path, 0)
    w3 = lines("w3", 2)
    logfile.write([w3[:5], w3[5:]])
    assert logfile.path.read_bytes() == w2 + w3


def test_a_write_undone_and_written_again_is_not_taken_for_a_truncation(tmp_path: Path, logfile: LogFile) -> None:
    """A failed fsync cuts the batch off (``undo``) and the writer writes it again. logrotate had
    copied the file meanwhile (its truncation still to come): the journal must forget what was
    cut, or the retry, landing below the journal's end, looks like a truncation, the copy matches,
    and the batch is put back: written twice."""
    logfile.write([b"a1\n", b"a2\n"])
    (tmp_path / "messages.log.1").write_bytes(logfile.path.read_bytes())
    start = logfile.write([b"b1\n"])
    logfile.undo(start)
    assert logfile.journal.end == start
    logfile.write([b"b1\n"])
    logfile.write([b"c1\n"])
    assert logfile.path.read_bytes() == b"a1\na2\nb1\nc1\n"


def test_the_journal_keeps_no_more_than_the_bytes_it_holds_of_a_view(logfile: LogFile) -> None:
    """A part that is a view of a bigger buffer (a worker's message) is copied into the journal:
    the bigger buffer is not kept alive, nor held still (a buffer with a view on it cannot grow)."""
    j = WriteJournal(limit=1000)
    big = bytearray((b"x" * 59 + b"\n") * 10 + b"r" * 100_000)  # 600 bytes of lines, then the rejects
    lines_ = bytes(big[:600])
    view = memoryview(big)[:600]
    j.add(0, view)
    view.release()
    big.extend(b"r")  # BufferError if the journal kept a view of it
    j.add(600, b"y" * 499 + b"\n")
    j.add(1100, b"z" * 299 + b"\n")  # the view's first 400 bytes fall out
    assert len(j.buf) <= j.limit
    assert j.slice(j.start, j.end) == (lines_ + b"y" * 499 + b"\n" + b"z" * 299 + b"\n")[-1000:]


# -- truncation under us (logrotate copytruncate) ------------------------------------------------------
@pytest.mark.parametrize("copy_name", ["messages.log.1", "messages.log-20261201", "messages-20261201.log"])
def test_truncation_puts_back_exactly_what_the_copy_missed(tmp_path: Path, logfile: LogFile, copy_name: str) -> None:
    w1, w2, w3 = lines("w1", 5), lines("w2", 7), lines("w3", 3)
    for w in (w1, w2):
        logfile.write(w)
    copy = tmp_path / copy_name
    copy.write_bytes(w1 + w2)  # logrotate copied this much ...
    logfile.write(w3)  # ... we wrote on ...
    os.truncate(logfile.path, 0)  # ... and it truncated
    w4 = lines("w4", 2)
    landed = logfile.write(w4)
    assert logfile.path.read_bytes() == w3 + w4
    assert landed == len(w3)
    assert logfile.size == len(w3 + w4)
    assert copy.read_bytes() == w1 + w2


@pytest.mark.parametrize(
    ("newer", "older"),
    [
        ("messages.log.1", "messages.log.2"),
        ("messages.log.9", "messages.log.10"),
        ("messages.log.1", "messages.log.10"),
        ("messages.log-20261201", "messages.log-20261130"),
    ],
)
def test_of_two_matching_copies_with_the_same_mtime_the_newer_is_the_copy(
    tmp_path: Path, logfile: LogFile, newer: str, older: str
) -> None:
    """Lines all alike: an older, shorter copy matches the journal at its own offsets too. Made in
    the same tick of the clock, the two copies have the same mtime; the newer copy (the lower
    number, the later date) is the one logrotate just made, so only what it missed is put back."""
    same = b"the same line\n"
    logfile.write(same * 50)
    logfile.write(same * 50)
    (tmp_path / older).write_bytes(same * 30)
    (tmp_path / newer).write_bytes(same * 100)
    when = time.time_ns()
    for name in (older, newer):
        os.utime(tmp_path / name, ns=(when, when))
    logfile.write(same * 10)
    os.truncate(logfile.path, 0)
    landed = logfile.write(b"next\n")
    assert landed == len(same * 10)
    assert logfile.path.read_bytes() == same * 10 + b"next\n"


@pytest.mark.parametrize("inside", [1, 5, 21 * 3 + 4], ids=["1-byte-in", "5-in", "3-lines-and-4-in"])
def test_copy_ending_inside_a_line_is_cut_back_and_the_line_written_whole(
    tmp_path: Path, logfile: LogFile, inside: int
) -> None:
    w1, w2 = lines("w1", 5), lines("w2", 7)
    logfile.write(w1)
    logfile.write(w2)
    copy = tmp_path / "messages.log.1"
    copy.write_bytes(w1 + w2[:inside])  # logrotate read while our write was half done
    os.truncate(logfile.path, 0)
    logfile.write(b"next\n")
    kept = w2[: w2.rfind(b"\n", 0, inside) + 1]
    assert copy.read_bytes() == w1 + kept
    assert logfile.path.read_bytes() == w2[len(kept) :] + b"next\n"


def test_copy_ending_inside_the_first_line_written_is_not_split(tmp_path: Path, logfile: LogFile) -> None:
    """The file started empty; logrotate's copy holds part of the first line only. The line must end
    up whole in one file: the copy cut back to 0 bytes (the start of the file is a line start) and
    the line written again whole, never a record split between the copy and the file."""
    logfile.write(b"first-line\nsecond-line\n")
    copy = tmp_path / "messages.log.1"
    copy.write_bytes(b"first")
    os.truncate(logfile.path, 0)
    logfile.write(b"third-line\n")
    in_copy, in_file = copy.read_bytes(), logfile.path.read_bytes()
    assert in_copy + in_file == b"first-line\nsecond-line\nthird-line\n"
    assert in_copy == b"" or in_copy.endswith(b"\n"), (in_copy, in_file)


@pytest.mark.parametrize("earlier", [False, True], ids=["first", "after-an-earlier-copytruncate"])
def test_an_empty_copy_made_before_our_first_write_puts_back_every_line(
    tmp_path: Path, logfile: LogFile, earlier: bool
) -> None:
    """logrotate (``ifempty``) copies the log while it is still empty, the daemon writes, and
    logrotate truncates: what was written is in neither file unless it is written again. The
    copy holds none of the journal's bytes to match it by; an empty file made since the log was
    last empty is the copy."""
    if earlier:
        w0 = lines("w0", 4)
        logfile.write(w0)
        (tmp_path / "messages.log.1").write_bytes(w0)
        os.replace(tmp_path / "messages.log.1", tmp_path / "messages.log.2")
        os.truncate(logfile.path, 0)
        logfile.write(b"")  # the daemon's next write finds the truncation (the copy held it all)
        assert logfile.path.read_bytes() == b""
    tick_after(logfile.path)  # logrotate's next run: later than the log's emptying
    copy = tmp_path / "messages.log.1"
    copy.write_bytes(logfile.path.read_bytes())  # empty
    w1, w2 = lines("w1", 5), lines("w2", 3)
    logfile.write(w1)
    logfile.write(w2)
    os.truncate(logfile.path, 0)
    w3 = lines("w3", 2)
    assert logfile.write(w3) == len(w1 + w2)
    assert logfile.path.read_bytes() == w1 + w2 + w3
    assert copy.read_bytes() == b""


def test_an_empty_file_older_than_the_empty_log_is_no_copy(tmp_path: Path, logfile: LogFile) -> None:
    """An empty file left from before the log was last empty (an old rotation of an empty log) is
    no copy of what was written since: a truncation then puts nothing back."""
    stale = tmp_path / "messages.log.1"
    stale.write_bytes(b"")
    past = time.time_ns() - 3600 * 10**9
    os.utime(stale, ns=(past, past))
    logfile.write(lines("w1", 5))
    os.truncate(logfile.path, 0)
    assert logfile.write(b"next\n") == 0
    assert logfile.path.read_bytes() == b"next\n"


def _opened(tmp_path: Path) -> LogFile:
    f = LogFile(tmp_path / "messages.log", 0o640)
    f.open()
    return f


# -- an empty copy that is no copy of what was written (review of the empty-copy repair) ----------------
def test_idle_over_two_rotations_delaycompress_duplicates(tmp_path: Path) -> None:
    """compress+delaycompress, ifempty (logrotate's default): X in .2.gz, empty .1; X written again."""
    f = _opened(tmp_path)
    log = f.path
    x = lines("x", 5)
    f.write(x)
    # rotation 1: copy, truncate (daemon idle)
    (tmp_path / "messages.log.1").write_bytes(log.read_bytes())
    os.truncate(log, 0)
    # rotation 2: shift .1 -> .2, copy the (empty) log to .1, truncate, compress .2 (delaycompress)
    os.replace(tmp_path / "messages.log.1", tmp_path / "messages.log.2")
    (tmp_path / "messages.log.1").write_bytes(log.read_bytes())
    os.truncate(log, 0)
    os.replace(tmp_path / "messages.log.2", tmp_path / "messages.log.2.gz")  # stands for gzip
    y = lines("y", 2)
    f.write(y)
    f.close()
    files = ("messages.log.2.gz", "messages.log.1")
    union = b"".join((tmp_path / name).read_bytes() for name in files) + log.read_bytes()
    assert union == x + y, log.read_bytes()


def test_idle_over_two_rotations_rotate_1_resurrects(tmp_path: Path) -> None:
    """rotate 1: logrotate drops X's copy at rotation 2; the daemon writes X back into the log."""
    f = _opened(tmp_path)
    log = f.path
    f.write(lines("x", 5))
    (tmp_path / "messages.log.1").write_bytes(log.read_bytes())
    os.truncate(log, 0)
    os.unlink(tmp_path / "messages.log.1")  # rotate 1: the old copy is removed
    (tmp_path / "messages.log.1").write_bytes(log.read_bytes())  # empty copy
    os.truncate(log, 0)
    y = lines("y", 2)
    f.write(y)
    f.close()
    assert log.read_bytes() == y


def test_operator_truncation_with_an_empty_rotation_in_the_same_tick(tmp_path: Path) -> None:
    """An empty log rotated (copy, truncate: one clock tick), the daemon writes A, the operator
    empties the log (': >'): A must not come back."""
    f = _opened(tmp_path)
    log = f.path
    (tmp_path / "messages.log.1").write_bytes(b"")  # logrotate ifempty: empty copy
    os.truncate(log, 0)
    t = os.stat(log).st_mtime_ns
    os.utime(tmp_path / "messages.log.1", ns=(t, t))  # same tick as the truncation
    f.write(lines("a", 3))
    os.truncate(log, 0)  # the operator: : > messages.log
    b = lines("b", 1)
    f.write(b)
    f.close()
    assert log.read_bytes() == b


def test_operator_truncation_after_a_copy_cut_to_zero(tmp_path: Path) -> None:
    """A copy that ended inside the first line is cut to 0 by the daemon (mtime: now). It is then an
    empty file newer than empty_since: an operator truncation later writes everything back."""
    f = _opened(tmp_path)
    log = f.path
    first = lines("first", 1)
    f.write(first)
    (tmp_path / "messages.log.1").write_bytes(first[:7])  # copy taken mid-write
    os.truncate(log, 0)
    a = lines("a", 3)
    f.write(a)  # puts back `first`, then a
    assert (tmp_path / "messages.log.1").read_bytes() == b""
    assert log.read_bytes() == first + a
    os.truncate(log, 0)  # the operator
    b = lines("b", 1)
    f.write(b)
    f.close()
    assert log.read_bytes() == b


def test_unrelated_empty_file_with_the_prefix(tmp_path: Path) -> None:
    """Any empty file whose name starts with 'messages' (another program's messages-audit.log,
    created after the log) is taken for the copy."""
    f = _opened(tmp_path)
    log = f.path
    f.write(b"")
    (tmp_path / "messages-audit.log").write_bytes(b"")
    f.write(lines("a", 3))
    os.truncate(log, 0)  # the operator
    b = lines("b", 1)
    f.write(b)
    f.close()
    assert log.read_bytes() == b


@pytest.mark.parametrize("kind", ["none", "other-content", "symlink", "compressed", "other-name"])
def test_truncation_with_no_copy_found_puts_nothing_back(tmp_path: Path, logfile: LogFile, kind: str) -> None:
    w1, w2 = lines("w1", 5), lines("w2", 5)
    logfile.write(w1)
    logfile.write(w2)
    real_copy = tmp_path / "elsewhere"
    real_copy.write_bytes(w1)
    candidate = None
    if kind == "other-content":  # right name and size, different bytes
        candidate = tmp_path / "messages.log.1"
        candidate.write_bytes(lines("zz", 5))
    elif kind == "symlink":  # a link to a true copy: never followed
        candidate = tmp_path / "messages.log.1"
        os.symlink(real_copy, candidate)
    elif kind == "compressed":
        candidate = tmp_path / "messages.log.1.gz"
        candidate.write_bytes(w1)
    elif kind == "other-name":
        candidate = tmp_path / "other.log.1"
        candidate.write_bytes(w1)
    before = None if candidate is None else candidate.read_bytes()
    os.truncate(logfile.path, 0)
    assert logfile.write(b"next\n") == 0
    assert logfile.path.read_bytes() == b"next\n"
    assert real_copy.read_bytes() == w1
    if candidate is not None:
        assert candidate.read_bytes() == before


def test_close_writes_back_what_a_truncation_took(tmp_path: Path) -> None:
    path = tmp_path / "messages.log"
    f = LogFile(path, 0o640)
    f.open()
    try:
        w1, w2 = lines("w1", 4), lines("w2", 4)
        f.write(w1)
        (tmp_path / "messages.log.1").write_bytes(w1)
        f.write(w2)
        os.truncate(path, 0)
    finally:
        f.close()
    assert path.read_bytes() == w2


@pytest.mark.parametrize("fail_in", ["put-back", "data"])
def test_put_back_survives_a_failed_write(tmp_path: Path, fail_in: str) -> None:
    """A truncation found by a write that then fails (EFBIG): the retry still writes the lines the
    copy missed, once, then the data."""
    path = tmp_path / "messages.log"
    w1, w2, data = lines("w1", 4), lines("w2", 6), lines("data", 6)

    def child() -> None:
        f = LogFile(path, 0o640)
        f.open()
        f.write(w1)
        (tmp_path / "messages.log.1").write_bytes(w1)
        f.write(w2)
        os.truncate(path, 0)
        set_fsize_limit(10 if fail_in == "put-back" else len(w2) + 10)
        try:
            with pytest.raises(OSError):
                f.write(data)
        finally:
            set_fsize_limit(resource.RLIM_INFINITY)
        assert path.read_bytes() == (b"" if fail_in == "put-back" else w2)
        f.write(data)
        assert path.read_bytes() == w2 + data
        f.close()

    in_child(child)
    assert path.read_bytes() == w2 + data


# -- WriteJournal -------------------------------------------------------------------------------------
def test_journal_contiguous_adds_accumulate() -> None:
    j = WriteJournal(limit=1000)
    assert (j.start, j.end, j.nbytes) == (0, 0, 0)
    j.add(100, b"abc")
    j.add(103, b"defg")
    assert (j.start, j.end, j.nbytes) == (100, 107, 7)
    assert j.slice(100, 107) == b"abcdefg"


@pytest.mark.parametrize("offset", [108, 106, 50], ids=["gap", "overlap", "before"])
def test_journal_non_contiguous_add_starts_afresh(offset: int) -> None:
    j = WriteJournal(limit=1000)
    j.add(100, b"abcdefg")
    j.add(offset, b"xyz")
    assert (j.start, j.end, j.nbytes) == (offset, offset + 3, 3)
    assert j.slice(j.start, j.end) == b"xyz"


def test_journal_holds_at_most_limit_bytes_of_many_chunks() -> None:
    j = WriteJournal(limit=100)
    written = b""
    for i in range(40):
        chunk = bytes([65 + i % 26]) * (7 + i % 30)
        j.add(len(written), chunk)
        written += chunk
        assert j.nbytes == min(len(written), 100) == j.end - j.start
        assert j.end == len(written)
        assert j.slice(j.start, j.end) == written[-j.nbytes :]
        assert len(j.buf) <= j.limit


@pytest.mark.parametrize("size", [10, 11, 5000])
def test_journal_giant_chunk_keeps_only_its_last_limit_bytes(size: int) -> None:
    j = WriteJournal(limit=10)
    j.add(0, b"12345")
    giant = (bytes(range(256)) * 20)[:size]
    j.add(5, giant)
    assert (j.start, j.end, j.nbytes) == (5 + size - 10, 5 + size, 10)
    assert j.slice(j.start, j.end) == giant[-10:]
    # A copy of the end, not a view keeping the caller's giant buffer alive.
    assert type(j.buf) is bytearray and len(j.buf) == 10


def test_journal_slice_ranges() -> None:
    j = WriteJournal(limit=1000)
    j.add(10, b"0123")
    j.add(14, b"4567")
    j.add(18, b"89")
    assert j.slice(10, 20) == b"0123456789"
    assert j.slice(12, 17) == b"23456"
    assert j.slice(14, 18) == b"4567"
    assert j.slice(19, 20) == b"9"
    assert j.slice(0, 12) == b"01"  # clamped to what it holds
    assert j.slice(15, 15) == b""


def test_journal_reset() -> None:
    j = WriteJournal(limit=1000)
    j.add(0, b"old data")
    j.reset(500, b"tail\n")
    assert (j.start, j.end, j.nbytes) == (500, 505, 5)
    assert j.slice(500, 505) == b"tail\n"
    j.add(505, b"more\n")
    assert j.slice(500, 510) == b"tail\nmore\n"
    j.reset()
    assert (j.start, j.end, j.nbytes) == (0, 0, 0)
    assert not j.buf
    j.reset(7, b"")
    assert (j.start, j.end, j.nbytes) == (0, 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 64),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 100)),
            st.tuples(st.just("gap"), st.integers(1, 30)),
            st.tuples(st.just("reset"), st.integers(0, 40)),
        ),
        max_size=40,
    ),
)
def test_journal_matches_a_model(limit: int, ops: list[tuple[str, int]]) -> None:
    """Random adds, gaps and resets against a model: the last ``limit`` contiguous bytes."""
    j = WriteJournal(limit=limit)
    counter = itertools.count()
    base, held = 0, b""  # the model: contiguous bytes written since the last restart, from ``base``
    end = 0
    for kind, n in ops:
        data = bytes(next(counter) % 251 for _ in range(n))
        if kind == "reset":
            j.reset(end + 3, data)
            base, held, end = end + 3, data, end + 3 + len(data)
            continue
        offset = end + (n if kind == "gap" else 0)
        if kind == "gap" or not j.nbytes:
            base, held = offset, b""
        j.add(offset, data)
        held += data
        end = offset + len(data)
        keep = held[-limit:] if held else b""
        if keep:
            assert (j.start, j.end) == (base + len(held) - len(keep), end)
            assert j.slice(j.start, j.end) == keep
        assert j.nbytes == len(keep) <= limit
        assert len(j.buf) <= limit  # its memory: the ring, never more than limit


def test_journal_memory_stays_within_an_eighth_over_its_limit() -> None:
    """Found by a review: the length of the ring is no measure of its memory (an append leaves
    spare room). Filled and written round many times, by lines and by one giant write, the buffer
    it holds stays under 1.125 x limit."""
    limit = 1 << 20
    j = WriteJournal(limit)
    line = b"x" * 199 + b"\n"
    offset = 0
    for _ in range(3 * limit // len(line)):
        j.add(offset, line)
        offset += len(line)
    assert j.nbytes == limit
    assert j.buf.__alloc__() < limit * 9 // 8
    j.add(offset, line * (limit // len(line) + 7))
    assert j.buf.__alloc__() < limit * 9 // 8
    assert j.slice(j.end - len(line), j.end) == line


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 48),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.binary(max_size=120).map(lambda b: b.replace(b"\x00", b"\n"))),
            st.tuples(st.just("view"), st.binary(max_size=60)),
            st.tuples(st.just("cut"), st.integers(0, 60)),
            st.tuples(st.just("gap"), st.binary(min_size=1, max_size=30)),
        ),
        max_size=50,
    ),
    probe=st.tuples(st.integers(0, 60), st.integers(0, 60)),
)
def test_journal_ring_matches_a_model_with_cuts(limit: int, ops: list[tuple[str, Any]], probe: tuple[int, int]) -> None:
    """The ring against a model of what it must hold: the bytes written since it started afresh,
    less the oldest past ``limit`` (never held again, even after a cut) and less what a cut took;
    with its offsets, any slice of them, and whether its first byte starts a line."""
    j = WriteJournal(limit=limit)
    base = start = end = 0
    written = b""  # the model: the bytes from ``base`` to ``end``
    for kind, arg in ops:
        if kind == "cut":
            cut_to = end - arg
            j.cut(cut_to)
            if cut_to <= start:
                base = start = end = 0
                written = b""
            elif cut_to < end:
                written, end = written[: cut_to - base], cut_to
        else:
            offset = end + (len(arg) if kind == "gap" else 0)
            j.add(offset, memoryview(b"##" + arg)[2:] if kind == "view" else arg)
            if kind == "gap" or end == start:
                base = start = offset
                written = b""
            written += arg
            end = offset + len(arg)
            start = max(start, end - limit)
        if end == start:
            assert j.nbytes == 0
            continue
        assert (j.start, j.end, j.nbytes) == (start, end, end - start)
        assert j.slice(start, end) == written[start - base :]
        a, b = sorted((start + probe[0], start + probe[1]))
        assert j.slice(a, b) == written[start - base :][a - start : b - start]
        assert j.aligned == (start == base or written[start - base - 1 : start - base] == b"\n")
        assert len(j.buf) <= limit


# -- properties: every line exactly once, never a partial line -----------------------------------------
_examples = itertools.count()


def _example_dir(root: Path) -> Path:
    d = root / f"ex{next(_examples)}"
    d.mkdir()
    return d


def _check_whole_lines_once(chunks: list[bytes], expected: bytes) -> None:
    joined = b"".join(chunks)
    assert joined == expected
    for c in chunks:
        assert c == b"" or c.endswith(b"\n"), c[-40:]
    got = joined.splitlines()
    assert len(got) == len(set(got))


line_lengths = st.lists(st.integers(0, 60), min_size=1, max_size=6)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(line_lengths, st.lists(st.integers(0, 10**6), max_size=3)), min_size=1, max_size=8))
def test_property_rlimit_failures_leave_each_line_once(tmp_path: Path, plan: list[tuple[list[int], list[int]]]) -> None:
    """Batches of whole lines, each refused 0-3 times by a real RLIMIT_FSIZE cutting it at a random
    byte, then retried: after every step the file is exactly the batches that succeeded."""
    path = _example_dir(tmp_path) / "messages.log"
    counter = itertools.count()
    batches = [
        (b"".join(f"{next(counter):04d}:".encode() + b"y" * n + b"\n" for n in lengths), fails)
        for lengths, fails in plan
    ]
    expected = b"".join(b for b, _ in batches)

    def child() -> None:
        f = LogFile(path, 0o640)
        f.open()
        done = b""
        for data, fails in batches:
            for v in fails:
                set_fsize_limit(len(done) + v % len(data))
                try:
                    with pytest.raises(OSError):
                        f.write(data)
                finally:
                    set_fsize_limit(resource.RLIM_INFINITY)
                assert path.read_bytes() == done and f.size == len(done)
            assert f.write(data) == len(done)
            done += data
            assert path.read_bytes() == done
        f.close()

    in_child(child)
    _check_whole_lines_once([path.read_bytes()], expected)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=st.lists(
        st.one_of(
            st.tuples(st.just("write"), line_lengths),
            st.tuples(st.just("logrotate"), st.lists(line_lengths, max_size=3)),
        ),
        min_size=1,
        max_size=12,
    ),
    ifempty=st.booleans(),
)
def test_property_copytruncate_loses_and_duplicates_nothing(
    tmp_path: Path, plan: list[tuple[str, Any]], ifempty: bool
) -> None:
    """The test plays logrotate copytruncate at random moments: shift the old copies (.1 -> .2 ...),
    copy the file to .1, let the daemon write 0-3 more batches, truncate the file to 0. In the end
    the copies (oldest first) plus the file are everything written, each line once, whole. With
    ``ifempty`` an empty file is rotated too (its copy is empty)."""
    folder = _example_dir(tmp_path)
    path = folder / "messages.log"
    counter = itertools.count()

    def batch(lengths: list[int]) -> bytes:
        return b"".join(f"{next(counter):04d}:".encode() + b"z" * n + b"\n" for n in lengths)

    written = b""
    copies = 0
    f = LogFile(path, 0o640)
    f.open()
    try:
        for kind, arg in plan:
            if kind == "write":
                data = batch(arg)
                f.write(data)
                written += data
                continue
            between = [batch(lengths) for lengths in arg]
            content = path.read_bytes()
            rotate = bool(content) or ifempty  # notifempty: an empty file is not rotated
            if rotate:
                tick_after(path)  # logrotate's runs are apart in time: not in one tick of the clock
                for n in range(copies, 0, -1):
                    os.rename(rotated(path, n), rotated(path, n + 1))
                copies += 1
                rotated(path, 1).write_bytes(content)
            for data in between:
                f.write(data)
                written += data
            if rotate:
                os.truncate(path, 0)
        f.close()
        parts = [rotated(path, n).read_bytes() for n in range(copies, 0, -1)] + [path.read_bytes()]
        _check_whole_lines_once(parts, written)
    finally:
        f.close()
