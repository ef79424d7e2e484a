"""Sans-I/O framing: records out of any byte stream, however it is split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nio_logd.wire.framing import Frame, LineFramer, TooLarge


def frame_all(chunks: list[bytes], max_bytes: int) -> list[Frame]:
    framer = LineFramer(max_bytes)
    out: list[Frame] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    out.extend(framer.eof())
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return chunks


def test_lines_crlf_and_blank_lines() -> None:
    assert frame_all([b"a\nb\r\n\n  \r\n\tc\n"], 100) == [b"a", b"b", b"\tc"]


def test_bytes_after_last_newline_are_a_record_at_eof() -> None:
    framer = LineFramer(100)
    assert framer.feed(b'{"x": 1}') == []
    assert framer.eof() == [b'{"x": 1}']


def test_oversize_line_is_refused_once_and_stream_goes_on() -> None:
    big = b"x" * 1000
    out = frame_all([b"a\n", big, b"\nb\n"], 100)
    assert out == [b"a", TooLarge(b"x" * 100), b"b"]


def test_oversize_across_many_chunks_discards_to_next_newline() -> None:
    chunks = [b"y" * 60 for _ in range(20)] + [b"tail-of-big\nnext\n"]
    assert frame_all(chunks, 100) == [TooLarge(b"y" * 100), b"next"]


def test_line_of_exactly_max_bytes_is_accepted() -> None:
    assert frame_all([b"z" * 100 + b"\n"], 100) == [b"z" * 100]
    assert frame_all([b"z" * 101 + b"\n"], 100) == [TooLarge(b"z" * 100)]


@settings(max_examples=500)
@given(
    data=st.binary(max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30),
    max_bytes=st.integers(min_value=1, max_value=300),
)
def test_any_split_gives_the_same_records_as_unsplit(data: bytes, cuts: list[int], max_bytes: int) -> None:
    assert frame_all(split(data, cuts), max_bytes) == frame_all([data], max_bytes)


@settings(max_examples=300)
@given(
    lines=st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30),
)
def test_records_are_the_non_blank_lines(lines: list[bytes], cuts: list[int]) -> None:
    data = b"\n".join(lines)
    expected = []
    for line in lines:
        cleaned = line[:-1] if line.endswith(b"\r") else line
        if cleaned.strip():
            expected.append(cleaned)
    assert frame_all(split(data, cuts), 100) == expected


@settings(max_examples=300)
@given(data=st.binary(max_size=3000), max_bytes=st.integers(min_value=1, max_value=200))
def test_no_frame_exceeds_the_bound_and_nothing_contains_a_newline(data: bytes, max_bytes: int) -> None:
    for frame in frame_all([data], max_bytes):
        raw = frame.prefix if isinstance(frame, TooLarge) else frame
        assert len(raw) <= max_bytes
        assert b"\n" not in raw


def test_a_long_line_arriving_a_byte_at_a_time_is_one_record() -> None:
    """(The unfinished line grows in place: this took seconds of CPU when each byte re-split it.)"""
    framer = LineFramer(300_000)
    line = b"x" * 200_000
    for i in range(len(line)):
        assert framer.feed(line[i : i + 1]) == []
    assert framer.buffered == 200_000
    assert framer.feed(b"\n") == [line]


def test_oversize_detected_while_a_line_dribbles_in() -> None:
    framer = LineFramer(10)
    out = []
    for byte in b"abcdefghijklmnop\nok\n":
        out += framer.feed(bytes([byte]))
    assert out == [TooLarge(b"abcdefghij"), b"ok"]


_PIECES = st.sampled_from([b"{", b"}", b"x", b'"', b" ", b"\t", b"\r", b"\x0b", b"\x0c"])


@settings(max_examples=500)
@given(
    lines=st.lists(st.lists(_PIECES, min_size=1, max_size=12).map(b"".join), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=3),
    max_bytes=st.integers(min_value=1, max_value=14),
)
def test_lines_of_spaces_carriage_returns_and_sizes_near_the_bound(
    lines: list[bytes], cuts: list[int], max_bytes: int
) -> None:
    # Chunks with no empty line, blank lines of every ASCII space, CRs inside and at the end of
    # lines, lines at and over the bound: the chunk-at-once path must agree with the line rules.
    expected: list[Frame] = []
    for line in lines:
        cleaned = line[:-1] if line.endswith(b"\r") else line
        if len(cleaned) > max_bytes:
            expected.append(TooLarge(cleaned[:max_bytes]))
        elif cleaned and not cleaned.isspace():
            expected.append(cleaned)
    data = b"".join(line + b"\n" for line in lines)
    assert frame_all(split(data, cuts), max_bytes) == expected
