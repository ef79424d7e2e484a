"""Finding 12: framing and validation edges (CRLF at the size bound, duplicate keys, bidi controls)."""

from __future__ import annotations

import inspect
import json
import sys

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nio_logd.config import RecordSettings
from nio_logd.records.record import RecordValidator, Refusal, delimiting_quotes
from nio_logd.wire.framing import Frame, LineFramer, TooLarge

# --- CRLF at the size bound ---------------------------------------------------------------------


def frame_all(chunks: list[bytes], max_bytes: int) -> list[Frame]:
    framer = LineFramer(max_bytes)
    out: list[Frame] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
        # Memory stays bounded: one record and the CR that may precede its LF.
        assert framer.buffered <= max_bytes + 1
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


def test_crlf_record_of_exactly_max_bytes_is_accepted() -> None:
    record = b"z" * 100
    assert frame_all([record + b"\r\n"], 100) == [record]
    assert frame_all([record + b"\n"], 100) == [record]
    # One byte more is too large, whichever line ending it has.
    assert frame_all([record + b"z\r\n"], 100) == [TooLarge(record)]
    assert frame_all([record + b"z\n"], 100) == [TooLarge(record)]


def test_crlf_record_of_exactly_max_bytes_is_accepted_at_every_single_split() -> None:
    record = b"r" * 50
    data = b"a\n" + record + b"\r\nb\r\n"
    for cut in range(len(data) + 1):
        assert frame_all([data[:cut], data[cut:]], 50) == [b"a", record, b"b"], cut


def test_crlf_record_of_exactly_max_bytes_is_accepted_a_byte_at_a_time() -> None:
    record = b"d" * 64
    data = record + b"\r\n" + record + b"\r\nok\n"
    assert frame_all([data[i : i + 1] for i in range(len(data))], 64) == [record, record, b"ok"]


def test_crlf_record_of_exactly_max_bytes_is_accepted_as_the_last_record_at_eof() -> None:
    record = b"e" * 30
    assert frame_all([record + b"\r"], 30) == [record]
    assert frame_all([b"x\n", record, b"\r"], 30) == [b"x", record]


def test_max_bytes_plus_cr_followed_by_more_than_lf_is_too_large() -> None:
    """The CR at max_bytes+1 is only a line ending if the LF comes next."""
    record = b"q" * 40
    data = record + b"\rX\nok\n"
    for cut in range(len(data) + 1):
        assert frame_all([data[:cut], data[cut:]], 40) == [TooLarge(record), b"ok"], cut


@settings(max_examples=500)
@given(
    max_bytes=st.integers(min_value=1, max_value=120),
    before=st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")), max_size=4),
    after=st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")), max_size=4),
    fill=st.binary(min_size=1, max_size=1).filter(lambda b: b not in (b"\n", b"\r") and not b.isspace()),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
)
def test_crlf_record_of_exactly_max_bytes_is_accepted_across_every_split(
    max_bytes: int, before: list[bytes], after: list[bytes], fill: bytes, cuts: list[int]
) -> None:
    record = fill * max_bytes
    data = b"".join(line + b"\n" for line in before) + record + b"\r\n" + b"\n".join(after)
    whole = frame_all([data], max_bytes)
    assert record in whole
    assert frame_all(split(data, cuts), max_bytes) == whole


@settings(max_examples=500)
@given(
    data=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b"xx", b" ", b"x" * 7]), max_size=80).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    max_bytes=st.integers(min_value=1, max_value=12),
)
def test_cr_heavy_streams_frame_the_same_however_split(data: bytes, cuts: list[int], max_bytes: int) -> None:
    """Streams dense in CRs and lines near the bound: where the new CR rule could break split-invariance."""
    whole = frame_all([data], max_bytes)
    assert frame_all(split(data, cuts), max_bytes) == whole
    for line in data.split(b"\n")[:-1]:
        record = line[:-1] if line.endswith(b"\r") else line
        if len(record) > max_bytes:
            assert TooLarge(record[:max_bytes]) in whole
        elif record.strip():
            assert record in whole


# --- duplicate keys -----------------------------------------------------------------------------

HEAD = b'{"send_user": "alice", "send_time": "2026-11-29 12:00:00", "send_msg": "hi"'
FORBID = RecordValidator(RecordSettings(), 1 << 20)
IGNORE = RecordValidator(RecordSettings(extra="ignore"), 1 << 20)
KEEP = RecordValidator(RecordSettings(extra="keep"), 1 << 20)


@pytest.mark.parametrize(
    ("validator", "line", "field"),
    [
        (FORBID, HEAD + b', "send_user": "mallory"}', "send_user"),
        (
            FORBID,
            b'{"send_user": "a", "send_user": "b", "send_time": "2026-11-29 12:00:00", "send_msg": ""}',
            "send_user",
        ),
        (FORBID, HEAD + b', "send_msg": "rewritten"}', "send_msg"),
        (FORBID, b'{"send_msg": 1, ' + HEAD[1:] + b"}", "send_msg"),
        (FORBID, HEAD + b', "send_time": "2000-01-01 00:00:00"}', "send_time"),
        # Keys are compared after JSON unescaping: "send\u005fuser" is "send_user".
        (FORBID, HEAD + b', "send\\u005fuser": "mallory"}', "send_user"),
        (FORBID, b'{"\\u0073\\u0065\\u006e\\u0064\\u005f\\u006d\\u0073\\u0067": "x", ' + HEAD[1:] + b"}", "send_msg"),
        (KEEP, HEAD + b', "meta": {"a": 1, "a": 2}}', "meta.a"),
        (KEEP, HEAD + b', "meta": {"inner": {"k": "1", "\\u006b": "2"}}}', "meta.inner.k"),
        (KEEP, HEAD + b', "tags": [1, {"k": 1, "k": 2}]}', "tags.1.k"),
        (KEEP, HEAD + b', "host": "a", "host": "b"}', "host"),
        (IGNORE, HEAD + b', "x": 1, "x": 2}', "x"),
        (IGNORE, HEAD + b', "x": {"y": 1, "y": 1}}', "x.y"),
        (IGNORE, HEAD + b', "send_user": "mallory"}', "send_user"),
    ],
    ids=[
        "top-level",
        "first-of-record",
        "send_msg",
        "non-string-first",
        "send_time",
        "u-escaped",
        "all-u-escaped",
        "keep-nested",
        "keep-nested-escaped",
        "keep-in-list",
        "keep-extra",
        "ignore-unknown",
        "ignore-nested",
        "ignore-known",
    ],
)
def test_duplicate_key_is_refused_naming_it(validator: RecordValidator, line: bytes, field: str) -> None:
    out = validator.validate(line)
    assert isinstance(out, Refusal), out
    assert out.reason == "invalid_fields"
    assert out.errors == [{"field": field, "error": "duplicate key"}]
    assert out.raw == line


def test_every_duplicated_key_is_named_once() -> None:
    line = HEAD + b', "send_user": "b", "send_user": "c", "send_msg": "d"}'
    out = FORBID.validate(line)
    assert isinstance(out, Refusal)
    assert out.errors == [
        {"field": "send_user", "error": "duplicate key"},
        {"field": "send_msg", "error": "duplicate key"},
    ]


@pytest.mark.parametrize(
    ("validator", "line"),
    [
        (FORBID, b'{"send_user": "a\\"b", "send_time": "2026-11-29 12:00:00", "send_msg": "\\"x\\": \\"y\\""}'),
        (KEEP, HEAD + b', "a": {"a": {"a": 1}}, "b": [{"a": 1}, {"a": 2}]}'),
        (IGNORE, HEAD + b', "send_userx": 1}'),
    ],
)
def test_same_key_at_different_places_is_not_a_duplicate(validator: RecordValidator, line: bytes) -> None:
    assert isinstance(validator.validate(line), dict)


@settings(max_examples=300)
@given(
    key=st.sampled_from(["send_user", "send_time", "send_msg"]),
    user=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=10),
    msg=st.text(max_size=30),
    where=st.integers(min_value=0, max_value=3),
)
def test_duplicate_key_anywhere_in_the_record_is_refused(key: str, user: str, msg: str, where: int) -> None:
    pairs = [("send_user", user), ("send_time", "2026-11-29 12:00:00"), ("send_msg", msg)]
    value = dict(pairs)[key]
    pairs.insert(where, (key, value))  # even the same value twice is ambiguous evidence
    line = ("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}").encode()
    out = FORBID.validate(line)
    assert isinstance(out, Refusal), line
    assert out.errors == [{"field": key, "error": "duplicate key"}]


def test_nesting_too_deep_for_the_duplicate_check_is_refused_not_raised() -> None:
    """The check parses in Python: a deep kept value must not end the I/O thread with RecursionError."""
    line = HEAD + b', "deep": ' + b"[" * 200 + b"]" * 200 + b"}"
    assert isinstance(KEEP.validate(line), dict)  # pydantic-core takes this depth
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 120)
    try:
        out = KEEP.validate(line)
    finally:
        sys.setrecursionlimit(old)
    assert isinstance(out, Refusal), out
    assert out.reason == "invalid_fields"
    assert "nested too deeply" in out.message


def test_duplicate_check_takes_integers_python_would_refuse_to_convert() -> None:
    """Python's int() refuses more digits than sys.get_int_max_str_digits(), which may be set below
    what pydantic-core takes (4300); the check must not refuse, or raise on, such a record."""
    line = HEAD + b', "n": ' + b"9" * 1000 + b"}"
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        out = IGNORE.validate(line)
    finally:
        sys.set_int_max_str_digits(old)
    assert isinstance(out, dict) and "n" not in out


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(
    extras=st.dictionaries(st.text(min_size=1, max_size=8).map(lambda k: "x_" + k), _JSON_VALUES, max_size=4),
    ascii_only=st.booleans(),
)
def test_records_without_duplicates_pass_the_duplicate_check(extras: dict[str, object], ascii_only: bool) -> None:
    """Whatever pydantic-core takes, Python's parser takes too: no false refusals from the check."""
    record = {"send_user": "alice", "send_time": "2026-11-29 12:00:00", "send_msg": "hi", **extras}
    line = json.dumps(record, ensure_ascii=ascii_only).encode()
    for validator in (IGNORE, KEEP):
        out = validator.validate(line)
        if isinstance(out, Refusal):  # only a number the renderer cannot write may be refused here
            assert all("cannot be written" in e["error"] for e in out.errors), out


def _strings_in(value: object) -> int:
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        return sum(map(_strings_in, value))
    if isinstance(value, dict):
        return len(value) + sum(map(_strings_in, value.values()))
    return 0


# Texts rich in what the count must see through: quotes, backslashes and escapes of each.
_TRICKY_TEXT = st.text(alphabet=st.sampled_from(['"', "\\", "a", "\n", "\t", "/", "\u00e9", "\x7f", " "]), max_size=12)
_TRICKY_VALUES = st.recursive(
    st.none() | st.integers() | _TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY_TEXT, inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=500)
@given(value=_TRICKY_VALUES, ascii_only=st.booleans(), compact=st.booleans())
def test_delimiting_quotes_counts_two_per_string_of_any_json(value: object, ascii_only: bool, compact: bool) -> None:
    """The count that spares the exact duplicate check: two per string (key or value), escaped
    quotes and backslashes not counted, whatever serializer wrote the text."""
    texts = [json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":") if compact else None).encode()]
    try:
        texts.append(orjson.dumps(value))
    except TypeError:
        pass  # orjson refuses integers beyond 64 bits
    for text in texts:
        assert delimiting_quotes(text) == 2 * _strings_in(value), text


@settings(max_examples=300)
@given(
    key=st.sampled_from(["send_user", "send_time", "send_msg"]),
    msg=_TRICKY_TEXT,
    where=st.integers(min_value=0, max_value=3),
)
def test_duplicate_key_next_to_escaped_quotes_is_refused(key: str, msg: str, where: int) -> None:
    """Escaped quotes and backslashes in the text do not hide a duplicate key from the check."""
    pairs = [("send_user", "alice"), ("send_time", "2026-11-29 12:00:00"), ("send_msg", msg)]
    pairs.insert(where, (key, dict(pairs)[key]))
    line = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()
    for validator in (FORBID, IGNORE):
        out = validator.validate(line)
        assert isinstance(out, Refusal), line
        assert out.errors == [{"field": key, "error": "duplicate key"}]
        (batched,) = validator.validate_many([line])
        assert isinstance(batched, Refusal) and batched.errors == out.errors


# --- bidi controls in send_user -----------------------------------------------------------------

BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
V = RecordValidator(RecordSettings(max_user_chars=64), 1024)


def user_line(user: str) -> bytes:
    return orjson.dumps({"send_user": user, "send_time": "2026-11-29 12:00:00", "send_msg": "hi"})


@pytest.mark.parametrize("point", BIDI, ids=[f"U+{p:04X}" for p in BIDI])
def test_bidi_controls_in_user_are_refused(point: int) -> None:
    out = V.validate(user_line(f"admin{chr(point)}nimda"))
    assert isinstance(out, Refusal), out
    assert out.reason == "invalid_fields"
    assert out.errors == [
        {"field": "send_user", "error": "must not contain control or bidirectional formatting characters"}
    ]


@settings(max_examples=500)
@given(
    name=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs")), min_size=0, max_size=20),
    point=st.sampled_from(BIDI),
    where=st.integers(min_value=0, max_value=20),
)
def test_bidi_controls_in_user_are_refused_anywhere_in_the_name(name: str, point: int, where: int) -> None:
    user = name[:where] + chr(point) + name[where:]
    out = V.validate(user_line(user))
    assert isinstance(out, Refusal), user
    assert [e["field"] for e in out.errors] == ["send_user"]
    assert "bidirectional" in out.message


@pytest.mark.parametrize("point", [0x061B, 0x200D, 0x2029, 0x202F, 0x2065, 0x206A], ids=lambda p: f"U+{p:04X}")
def test_neighbours_of_the_bidi_controls_are_still_accepted(point: int) -> None:
    user = f"ok{chr(point)}ok"
    out = V.validate(user_line(user))
    assert isinstance(out, dict), out
    assert out["send_user"] == user
