"""Rendering: the hot path gives the bytes structlog itself gives with the same processors."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from nio_logd.records.record import Refusal
from nio_logd.records.render import Renderer, Stamp, processors, structlog_logger

ISO_UTC = re.compile(rb'"timestamp":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z)"')


def _without_timestamp(line: bytes) -> bytes:
    return ISO_UTC.sub(b'"timestamp":"T"', line)


@settings(max_examples=300)
@given(
    user=st.text(min_size=1, max_size=20),
    msg=st.text(max_size=200),
    when=st.datetimes(timezones=st.none() | st.just(UTC) | st.just(timezone(timedelta(hours=-3)))),
    client=st.none() | st.text(max_size=30),
)
def test_fast_path_equals_a_structlog_logger_with_the_same_processors(
    user: str, msg: str, when: datetime, client: str | None
) -> None:
    fields = {"send_user": user, "send_time": when, "send_msg": msg}
    renderer = Renderer(raw_limit=100)
    logger, collected = structlog_logger(processors())
    if client is None:
        renderer.message(dict(fields), "127.0.0.1:1", "tcp://127.0.0.1:8888")
        logger.info("message", **fields, peer="127.0.0.1:1", listener="tcp://127.0.0.1:8888")
    else:
        renderer.message_with_client(dict(fields), "127.0.0.1:1", "tcp://127.0.0.1:8888", client)
        logger.info("message", **fields, peer="127.0.0.1:1", listener="tcp://127.0.0.1:8888", client=client)
    fast, accepted, _rej, _n = renderer.take()
    assert accepted == 1
    assert ISO_UTC.search(fast) and ISO_UTC.search(collected.buf)
    assert _without_timestamp(bytes(fast)) == _without_timestamp(bytes(collected.buf))
    line = orjson.loads(fast)
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert line["send_time"] == when.isoformat()


def test_rejects_are_rendered_by_the_same_chain() -> None:
    renderer = Renderer(raw_limit=4)
    refusal = Refusal("invalid_json", [{"field": "(record)", "error": "invalid JSON: x"}], b"\xffabcdef")
    renderer.reject(refusal, "unix", "unix:///s")
    _m, _a, rejects, refused = renderer.take()
    assert refused == 1
    line = orjson.loads(rejects)
    assert line["event"] == "rejected" and line["level"] == "warning"
    assert line["raw"] == "\\xffabc" and line["raw_truncated"] is True and line["raw_bytes"] == 7


def test_stamp_text_is_structlog_timestampers() -> None:
    """Stamp formats the current time exactly as datetime.isoformat() + Z (no fraction at .000000)."""
    stamp = Stamp()
    for _ in range(2000):
        before = datetime.now(UTC)
        text = stamp(None, "info", {"event": "x"})["timestamp"]
        after = datetime.now(UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert before - timedelta(microseconds=1) <= parsed <= after
        assert text == parsed.isoformat().replace("+00:00", "Z")
