"""The forwarder's pieces alone: the persisted cursor, the line reader across rotation, the payload."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nio_logd.config import ForwardSettings
from nio_logd.forward.cursor import Cursor, digest, load, store
from nio_logd.forward.forwarder import Forwarder
from nio_logd.forward.reader import LogReader
from nio_logd.output.logfile import LogFile

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def line(i: int, pad: int = 0) -> bytes:
    return b'{"send_msg":"m%d%s"}\n' % (i, b"." * pad)


def drain(reader: LogReader) -> bytes:
    out = b""
    for _ in range(10_000):
        segment = reader.read()
        if segment is None:
            return out
        assert segment.data.endswith(b"\n"), "a segment ends inside a line"
        out += segment.data
    raise AssertionError("the reader never ran out")


# -- the cursor ------------------------------------------------------------------------------------
@given(
    epoch=st.text("0123456789abcdef", min_size=1, max_size=16),
    numbers=st.tuples(*[st.integers(0, 1 << 62)] * 4),
    check=st.text("0123456789abcdef", max_size=16),
)
def test_cursor_round_trips_through_its_bytes(epoch: str, numbers: tuple[int, int, int, int], check: str) -> None:
    cursor = Cursor(epoch, *numbers, check)
    assert Cursor.from_bytes(cursor.to_bytes()) == cursor


@given(data=st.binary(max_size=200))
def test_cursor_parse_of_any_bytes_raises_only_value_error(data: bytes) -> None:
    try:
        Cursor.from_bytes(data)
    except ValueError:
        pass


def test_cursor_store_replaces_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "c.cursor"
    assert load(path) is None
    first = Cursor.new(1, 2, 3, "ab")
    store(path, first)
    second = first.moved(1, 5, 0, 77, "")
    store(path, second)
    assert load(path) == second and load(path).epoch == first.epoch  # type: ignore[union-attr]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.cursor"]
    path.write_bytes(b'{"version": 1, "epoch": "x", "dev": -1}')
    with pytest.raises(ValueError, match=r"c\.cursor"):
        load(path)


def test_new_cursors_get_distinct_epochs() -> None:
    assert len({Cursor.new(1, 1).epoch for _ in range(50)}) == 50


# -- the reader ------------------------------------------------------------------------------------
@FAST
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=40),
    cuts=st.lists(st.integers(1, 5000), max_size=20),
    window=st.integers(64, 2000),
)
def test_reader_returns_exactly_the_whole_lines_written_whatever_the_writes_and_window(
    tmp_path: Path, sizes: list[int], cuts: list[int], window: int
) -> None:
    path = tmp_path / f"m-{os.urandom(4).hex()}.log"
    data = b"".join(line(i, pad) for i, pad in enumerate(sizes))
    path.write_bytes(b"")
    reader = LogReader(path, window)
    reader.open_at(None)
    got = b""
    pos = 0
    with path.open("ab") as f:
        for cut in [*cuts, len(data)]:
            end = min(len(data), pos + cut)
            f.write(data[pos:end])
            f.flush()
            pos = end
            segment = reader.read()
            while segment is not None:
                assert len(segment.data) <= window or segment.data.count(b"\n") == 1
                assert segment.start == len(got)
                got += segment.data
                segment = reader.read()
            assert data[: len(got)] == got
            assert len(got) == data.rfind(b"\n", 0, pos) + 1  # every whole line written so far
    reader.close()


def test_reader_follows_rename_and_create_reading_the_old_files_last_lines_first(tmp_path: Path) -> None:
    path = tmp_path / "messages.log"
    old = LogFile(path, 0o640)
    old.open()
    old.write(line(0) + line(1))
    reader = LogReader(path)
    reader.open_at(None)
    assert drain(reader) == line(0) + line(1)
    os.replace(path, f"{path}.1")  # logrotate's create: renamed, the daemon writes on until its reopen
    old.write(line(2))
    path.write_bytes(b"")  # the new, empty file
    assert drain(reader) == line(2)  # the new file is empty: the old one may still grow
    old.write(line(3))
    old.open()  # SIGHUP: the reopen opens the new file
    old.write(line(4))
    assert drain(reader) == line(3) + line(4)
    old.close()
    reader.close()


def test_reader_behind_the_builtin_rotation_reads_every_file_in_order(tmp_path: Path) -> None:
    path = tmp_path / "messages.log"
    f = LogFile(path, 0o640)
    f.open()
    reader = LogReader(path)
    reader.open_at(None)
    expected = b""
    for i in range(12):
        f.write(line(i))
        expected += line(i)
        if i % 3 == 2:
            f.rotate(5)
    assert drain(reader) == expected
    assert reader.unread() == 0
    f.close()
    reader.close()


@pytest.mark.parametrize("rotations", [1, 2, 3])
def test_reader_keeps_every_file_when_the_builtin_rotation_runs_between_its_listing_and_its_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rotations: int
) -> None:
    """The writer thread rotates (once or several times) right after the reader listed the files
    to find the one after its own: the reader must not open whatever now has that name."""
    path = tmp_path / "messages.log"
    f = LogFile(path, 0o640)
    f.open()
    reader = LogReader(path)
    reader.open_at(None)
    f.write(line(0))
    assert drain(reader) == line(0)
    f.rotate(5)  # the reader's file is messages.log.1 now; the next one gets a line
    f.write(line(1))
    expected = line(1)
    listing = LogReader.files
    pending = [rotations]

    def files_then_rotate(self: LogReader) -> list[tuple[Path, os.stat_result]]:
        found = listing(self)
        if pending[0]:  # the rotations land between the listing and the open, once
            n, pending[0] = pending[0], 0
            for i in range(n):
                f.rotate(5)
                f.write(line(2 + i))
        return found

    monkeypatch.setattr(LogReader, "files", files_then_rotate)
    expected += b"".join(line(2 + i) for i in range(rotations))
    assert drain(reader) == expected
    assert reader.unread() == 0
    f.close()
    reader.close()


@FAST
@given(
    before=st.integers(1, 30),
    missed=st.integers(0, 10),
    read_before=st.integers(1, 40),  # read() calls before the copy (each reads at most 256 bytes)
    after=st.integers(1, 10),
)
def test_reader_across_copytruncate_reads_each_line_once_with_the_daemons_put_back(
    tmp_path: Path, before: int, missed: int, read_before: int, after: int
) -> None:
    """Lines written between the copy and the truncation are put back by the daemon; read once."""
    folder = tmp_path / os.urandom(4).hex()
    folder.mkdir()
    path = folder / "messages.log"
    f = LogFile(path, 0o640)
    f.open()
    reader = LogReader(path, 256)
    reader.open_at(None)
    expected = b"".join(line(i) for i in range(before + missed + after))
    got = b""
    for i in range(before):
        f.write(line(i))
    for _ in range(min(read_before, before)):  # the reader somewhere before the copy's end
        segment = reader.read()
        got += segment.data if segment is not None else b""
    shutil.copyfile(path, f"{path}.1")
    for i in range(before, before + missed):  # in neither file: the daemon writes them again
        f.write(line(i))
    if read_before > before:
        got += drain(reader)  # the reader read past the copy's end before the truncation
    os.truncate(path, 0)
    for i in range(before + missed, before + missed + after):
        f.write(line(i))
    got += drain(reader)
    assert got == expected
    f.close()
    reader.close()


def test_reader_opened_at_a_cursor_in_a_truncated_file_continues_in_the_copy(tmp_path: Path) -> None:
    path = tmp_path / "messages.log"
    data = b"".join(line(i) for i in range(10))
    path.write_bytes(data)
    st_ = os.stat(path)
    offset = len(b"".join(line(i) for i in range(4)))
    shutil.copyfile(path, f"{path}.1")
    os.truncate(path, 0)
    with path.open("ab") as f:
        f.write(line(10) * 20)  # grown past the cursor again: the check tells the bytes differ
    reader = LogReader(path)
    opened = reader.open_at((st_.st_dev, st_.st_ino), offset, digest(data[:offset]))
    assert not opened.problem
    assert drain(reader) == data[offset:] + line(10) * 20
    reader.close()


def test_reader_reports_a_cursor_file_that_is_gone_and_starts_at_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "messages.log"
    path.write_bytes(line(1))
    Path(f"{path}.1").write_bytes(line(0))
    reader = LogReader(path)
    opened = reader.open_at((1, 1), 5, "")
    assert opened.lost_files == 1 and "gone" in opened.problem
    assert drain(reader) == line(0) + line(1)  # the oldest first, then the path (the daemon writes there)
    reader.close()


def test_reader_skips_cursor_and_compressed_files_next_to_the_log(tmp_path: Path) -> None:
    path = tmp_path / "messages.log"
    for name in ("messages.log", "messages.log.1", "messages.log.2.gz", "messages.log.forward-x.cursor", "other"):
        (tmp_path / name).write_bytes(b"x\n")
    assert [p.name for p, _st in LogReader(path).files()] == ["messages.log.1", "messages.log"]


# -- what is published -----------------------------------------------------------------------------
@given(msg=st.text(max_size=50), host=st.text(min_size=1, max_size=20).filter(lambda h: h.isprintable()))
def test_each_payload_is_the_record_with_its_host(msg: str, host: str) -> None:
    forwarder = Forwarder(ForwardSettings(host=host), Path("/nonexistent/m.log"), Path("/nonexistent/c"), Path)
    raw = json.dumps({"event": "message", "send_msg": msg}, separators=(",", ":")).encode()
    assert json.loads(forwarder._payload(raw)) == {"event": "message", "send_msg": msg, "host": host}
    kept = json.dumps({"send_msg": msg, "host": "theirs"}).encode()
    assert json.loads(forwarder._payload(kept)) == {"send_msg": msg, "record_host": "theirs", "host": host}
