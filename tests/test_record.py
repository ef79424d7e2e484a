"""Record validation: what is accepted, and that every refusal names the field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nio_logd.config import RecordSettings
from nio_logd.records.record import RecordValidator, Refusal
from nio_logd.wire.framing import TooLarge

V = RecordValidator(RecordSettings(max_user_chars=16, max_msg_chars=64), 1024)
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def rec(**fields: object) -> bytes:
    base: dict[str, object] = {"send_user": "alice", "send_time": "2026-11-29 12:00:00", "send_msg": "hi"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_seed_client_record_is_accepted_and_time_stays_naive() -> None:
    out = V.validate(rec())
    assert out == {"send_user": "alice", "send_time": datetime(2026, 11, 29, 12, 0), "send_msg": "hi"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-29T12:00:00Z", datetime(2026, 11, 29, 12, tzinfo=UTC)),
        ("2026-11-29T12:00:00.5+02:00", datetime(2026, 11, 29, 12, 0, 0, 500000, timezone(timedelta(hours=2)))),
        ("2026-11-29t12:00:00", datetime(2026, 11, 29, 12)),
    ],
)
def test_iso_8601_and_rfc_3339_times(text: str, expected: datetime) -> None:
    out = V.validate(rec(send_time=text))
    assert isinstance(out, dict)
    assert out["send_time"] == expected


@pytest.mark.parametrize(
    ("line", "reason", "field"),
    [
        (b"{not json", "invalid_json", "(record)"),
        (b"[1, 2]", "not_an_object", "(record)"),
        (b'"just a string"', "not_an_object", "(record)"),
        (b'{"send_user": "a\xff"}', "invalid_utf8", "(record)"),
        (b'{"send_user": "a\x00"}', "invalid_json", "(record)"),
        (rec(send_user=...), "invalid_fields", "send_user"),
        (rec(send_msg=...), "invalid_fields", "send_msg"),
        (rec(extra=1), "invalid_fields", "extra"),
        (rec(send_user=""), "invalid_fields", "send_user"),
        (rec(send_user="x" * 17), "invalid_fields", "send_user"),
        (rec(send_user="bad\u0001user"), "invalid_fields", "send_user"),
        (rec(send_user="bad\u0085user"), "invalid_fields", "send_user"),
        (rec(send_user=5), "invalid_fields", "send_user"),
        (rec(send_time="yesterday"), "invalid_fields", "send_time"),
        (rec(send_time="1700000000"), "invalid_fields", "send_time"),
        (rec(send_time=1700000000), "invalid_fields", "send_time"),
        (rec(send_time="2026-13-01 00:00:00"), "invalid_fields", "send_time"),
        (rec(send_msg="m" * 65), "invalid_fields", "send_msg"),
        (rec(send_msg=None), "invalid_fields", "send_msg"),
        (b"[" * 100_000, "invalid_json", "(record)"),
    ],
)
def test_refusals_name_the_field(line: bytes, reason: str, field: str) -> None:
    out = V.validate(line)
    assert isinstance(out, Refusal), out
    assert out.reason == reason
    assert field in [e["field"] for e in out.errors]
    assert field in out.message


def test_too_large_frame_is_a_refusal_with_its_prefix() -> None:
    out = V.validate(TooLarge(b"abc"))
    assert isinstance(out, Refusal)
    assert out.reason == "too_large"
    assert out.raw == b"abc"


def test_extra_policy_ignore_and_keep() -> None:
    line = rec(host="web-1")
    ignore = RecordValidator(RecordSettings(extra="ignore"), 1024).validate(line)
    keep = RecordValidator(RecordSettings(extra="keep"), 1024).validate(line)
    assert isinstance(ignore, dict) and "host" not in ignore
    assert isinstance(keep, dict) and keep["host"] == "web-1"


@settings(max_examples=1000)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_accepted_or_refused_never_raise(data: bytes) -> None:
    out = V.validate(data)
    assert isinstance(out, (dict, Refusal))
    if isinstance(out, Refusal):
        assert out.errors and all(e["field"] and e["error"] for e in out.errors)


@settings(max_examples=500)
@given(
    user=st.text(min_size=1, max_size=16).filter(
        lambda u: not any(ord(c) < 32 or 127 <= ord(c) <= 159 or c in BIDI_CONTROLS for c in u)
    ),
    msg=st.text(max_size=64),
)
def test_valid_records_round_trip_their_fields(user: str, msg: str) -> None:
    out = V.validate(orjson.dumps({"send_user": user, "send_time": "2026-01-02T03:04:05", "send_msg": msg}))
    assert isinstance(out, dict), out
    assert out["send_user"] == user and out["send_msg"] == msg


@pytest.mark.parametrize("name", ["timestamp", "level", "event", "peer", "listener", "client"])
def test_kept_extra_field_may_not_use_a_key_the_daemon_writes(name: str) -> None:
    out = RecordValidator(RecordSettings(extra="keep"), 1024).validate(rec(**{name: "spoofed"}))
    assert isinstance(out, Refusal)
    assert out.errors == [{"field": name, "error": "reserved: the daemon writes this key itself"}]


@pytest.mark.parametrize(
    ("raw", "field"),
    [(b'"n": 100000000000000000000000', "n"), (b'"f": 1e400', "f"), (b'"deep": {"a": [1, -1e999]}', "deep")],
)
def test_kept_extra_numbers_the_renderer_cannot_write_are_refused(raw: bytes, field: str) -> None:
    line = b'{"send_user": "a", "send_time": "2026-11-29 12:00:00", "send_msg": "x", ' + raw + b"}"
    out = RecordValidator(RecordSettings(extra="keep"), 1024).validate(line)
    assert isinstance(out, Refusal), out
    assert out.errors[0]["field"] == field and "cannot be written" in out.errors[0]["error"]


def test_kept_extra_values_in_range_are_kept() -> None:
    line = (
        b'{"send_user": "a", "send_time": "2026-11-29 12:00:00", "send_msg": "x", '
        b'"n": 18446744073709551615, "s": "inf"}'
    )
    out = RecordValidator(RecordSettings(extra="keep"), 1024).validate(line)
    assert isinstance(out, dict) and out["n"] == 2**64 - 1 and out["s"] == "inf"
