"""The record pipeline, alone: no sockets, no threads (``nio_logd.records.pipeline``).

A pass of frames from several streams gives the same lines (apart from the timestamp), the same
answers in the same order and the same counts as a one-record-at-a-time reference built from the
validator and a real structlog logger over the same processors.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nio_logd.config import RecordSettings
from nio_logd.records.pipeline import Pipeline, Stream, ok_answers
from nio_logd.records.record import RecordValidator, Refusal
from nio_logd.records.render import Renderer, escape_raw, processors, structlog_logger
from nio_logd.wire.framing import Frame, TooLarge

MAX = 4096

good_frames = st.builds(
    lambda u, m: json.dumps({"send_user": u, "send_time": "2026-11-29 12:00:00", "send_msg": m}).encode(),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=8),
    st.text(max_size=30),
)
bad_frames = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and not b.isspace()),
    st.just(b"1"),
    st.just(b'{"send_user":"a"}'),
    st.just(b'{"send_user":"a","send_user":"b","send_time":"2026-11-29 12:00:00","send_msg":"m"}'),
)
too_large = st.builds(lambda n: TooLarge(b"x" * n), st.integers(1, 64))
frames = st.lists(st.one_of(good_frames, good_frames, bad_frames, too_large), max_size=25)
intakes = st.lists(st.tuples(st.integers(0, 3), st.booleans(), frames), min_size=1, max_size=8)


def _strip_time(data: bytes) -> list[list[tuple[str, Any]]]:
    """Each line's keys and values in their order, without the timestamp (the order is checked)."""
    out = []
    for line in data.splitlines():
        pairs = json.loads(line, object_pairs_hook=list)
        assert pairs[0][0] == "timestamp"
        out.append(pairs[1:])
    return out


def _reference(validator: RecordValidator, intake: list[tuple[Stream, list[Frame]]]) -> dict[str, Any]:
    """One record at a time, through a real structlog logger."""
    msg_logger, msg_out = structlog_logger(processors())
    rej_logger, rej_out = structlog_logger(processors())
    answers: dict[int, list[dict[str, Any]]] = {}
    seqs: dict[int, int] = {}
    by_reason: dict[str, int] = {}
    accepted = 0
    for stream, fs in intake:
        for frame in fs:
            seq = seqs[id(stream)] = seqs.get(id(stream), 0) + 1
            result = validator.validate(frame)
            if isinstance(result, dict):
                accepted += 1
                msg_logger.info("message", **result, peer=stream.peer, listener=stream.listener_name)
                answer: dict[str, Any] = {"seq": seq, "ok": True}
            else:
                assert isinstance(result, Refusal)
                by_reason[result.reason] = by_reason.get(result.reason, 0) + 1
                raw = result.raw[:1024].decode("utf-8", "backslashreplace")
                rej_logger.warning(
                    "rejected",
                    reason=result.reason,
                    error=result.message,
                    errors=result.errors,
                    peer=stream.peer,
                    listener=stream.listener_name,
                    raw=raw,
                    raw_bytes=len(result.raw),
                    raw_truncated=len(result.raw) > 1024,
                )
                answer = {
                    "seq": seq,
                    "ok": False,
                    "error": result.message,
                    "reason": result.reason,
                    "detail": result.errors,
                }
            if stream.ack:
                answers.setdefault(id(stream), []).append(answer)
    return {
        "messages": _strip_time(bytes(msg_out.buf)),
        "rejects": _strip_time(bytes(rej_out.buf)),
        "answers": answers,
        "accepted": accepted,
        "refused_by_reason": by_reason,
    }


@settings(max_examples=150, deadline=None)
@given(intakes)
def test_a_pass_equals_the_one_record_at_a_time_reference(spec: list[tuple[int, bool, list[Frame]]]) -> None:
    validator = RecordValidator(RecordSettings(), MAX)
    streams = {i: Stream(f"10.0.0.{i}:{1000 + i}", f"tcp://0.0.0.0:{i}", ack=ack) for i, ack, _ in spec}
    intake = [(streams[i], fs) for i, _ack, fs in spec]
    ref_streams = {i: Stream(s.peer, s.listener_name, ack=s.ack) for i, s in streams.items()}
    expected = _reference(validator, [(ref_streams[i], fs) for i, _ack, fs in spec])

    pipeline = Pipeline(validator.validate_batch, Renderer(1024))
    out = pipeline.run(intake, now=0.0)

    assert out.taken == [len(fs) for _i, _a, fs in spec]
    assert _strip_time(bytes(out.messages)) == expected["messages"]
    assert _strip_time(bytes(out.rejects)) == expected["rejects"]
    assert out.accepted == out.counts.accepted == expected["accepted"]
    assert out.counts.refused_by_reason == expected["refused_by_reason"]
    assert out.reject_lines == out.counts.refused == sum(expected["refused_by_reason"].values())
    got = {
        id(ref_streams[next(i for i, s in streams.items() if s is stream)]): [
            json.loads(a) for a in b"".join(items).splitlines()
        ]
        for stream, items in out.answers.items()
        if items
    }
    assert got == expected["answers"]
    assert out.answer_bytes == sum(len(a) for lines in out.answers.values() for a in lines)
    for i, stream in streams.items():
        assert stream.seq == sum(len(fs) for j, _a, fs in spec if j == i)


@settings(max_examples=100, deadline=None)
@given(intakes, st.integers(0, 5), st.integers(0, 30), st.integers(1, 400))
def test_bounds_keep_the_counts_whole(
    spec: list[tuple[int, bool, list[Frame]]], rate: int, close_after: int, answer_limit: int
) -> None:
    """With the reject rate, the refusal window and the answer limit on: every taken frame is
    counted once, every refused one is a reject line or suppressed, answers match the taken
    frames of ack streams, and nothing is taken past a closing stream or a full answer room."""
    validator = RecordValidator(RecordSettings(), MAX)
    pipeline = Pipeline(
        validator.validate_batch,
        Renderer(1024),
        rejects_per_second=rate,
        refused_close_after=close_after,
        answer_limit=answer_limit,
    )
    streams = {i: pipeline.new_stream(f"p{i}", "l", ack=ack, now=0.0) for i, ack, _ in spec}
    taken_total = 0
    for i, _ack, fs in spec:
        stream = streams[i]
        if stream.closing:
            continue
        before = stream.seq
        owed_before = stream.owed
        taken = pipeline.take(stream, fs, now=0.0)
        taken_total += taken
        assert stream.seq - before == taken
        if taken < len(fs):
            assert stream.closing or stream.owed >= answer_limit
        if stream.ack:
            assert owed_before >= answer_limit or taken > 0 or not fs
    for stream in streams.values():
        pipeline.summarize(stream)
    out = pipeline.outcome()
    counts = out.counts
    assert counts.accepted + counts.refused == taken_total
    assert out.reject_lines + counts.rejects_suppressed == counts.refused
    suppressed_lines = [json.loads(x) for x in bytes(out.rejects).splitlines()]
    assert sum(x["count"] for x in suppressed_lines if x["event"] == "rejects_suppressed") == counts.rejects_suppressed
    assert counts.closed_refused_records == len(out.closing) == sum(s.closing for s in streams.values())
    answered = sum(len(b"".join(v).splitlines()) for v in out.answers.values())
    assert answered == sum(s.seq for s in streams.values() if s.ack) - sum(
        1 for s in streams.values() if s.ack and s.closing
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), frames.filter(bool)), min_size=1, max_size=12),
    st.integers(0, 3),
    st.integers(0, 6),
    st.sampled_from(["forbid", "ignore"]),
)
def test_take_many_equals_taking_each_read_in_turn(
    spec: list[tuple[int, list[Frame]]], rate: int, close_after: int, extra: str
) -> None:
    """The reads of many connections without acks, validated in one call (``take_many``, the I/O
    loop's burst of one-record clients), give the lines, reject lines, counts and per-stream
    state that taking each read in turn gives, a stream that turns closing taking nothing more;
    a stream may appear more than once (two reads), and reads may mix with refused and
    oversize frames."""
    validator = RecordValidator(RecordSettings(extra=extra), MAX)

    def fresh() -> tuple[Pipeline, dict[int, Stream]]:
        pipeline = Pipeline(
            validator.validate_batch, Renderer(1024), rejects_per_second=rate, refused_close_after=close_after
        )
        return pipeline, {i: pipeline.new_stream(f"10.0.0.{i}:{1000 + i}", "l", ack=False, now=0.0) for i, _ in spec}

    one, one_streams = fresh()
    one.new_pass()
    expected_taken = [0 if one_streams[i].closing else one.take(one_streams[i], fs, 0.0) for i, fs in spec]
    for stream in one_streams.values():
        one.summarize(stream)
    expected = one.outcome()

    many, many_streams = fresh()
    many.new_pass()
    taken = many.take_many([(many_streams[i], fs) for i, fs in spec], 0.0)
    for stream in many_streams.values():
        many.summarize(stream)
    got = many.outcome()

    assert taken == expected_taken
    assert _strip_time(bytes(got.messages)) == _strip_time(bytes(expected.messages))
    assert _strip_time(bytes(got.rejects)) == _strip_time(bytes(expected.rejects))
    assert (got.accepted, got.reject_lines) == (expected.accepted, expected.reject_lines)
    assert got.counts == expected.counts
    assert len(got.closing) == len(expected.closing)
    for i, stream in many_streams.items():
        other = one_streams[i]
        assert (stream.seq, stream.refused, stream.closing) == (other.seq, other.refused, other.closing)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(good_frames, min_size=1, max_size=30),
    st.none() | st.text(max_size=20),
    st.floats(1.7e9, 2.0e9).map(lambda t: round(t, 6)),
)
def test_batch_lines_are_a_structlog_loggers_bytes_under_a_frozen_clock(
    fs: list[bytes], client: str | None, frozen: float
) -> None:
    """The batch path (one timestamp per read, fields spliced between a constant head and tail)
    writes exactly the bytes of a real structlog logger over the same processors, timestamp
    included, when both read the same frozen clock."""
    validator = RecordValidator(RecordSettings(), MAX)
    pipeline = Pipeline(validator.validate_batch, Renderer(1024, clock=lambda: frozen))
    stream = Stream("[::1]:5000", "tcp://[::1]:8888", ack=True, client=client)
    assert pipeline.take(stream, list(fs), now=0.0) == len(fs)
    out = pipeline.outcome()
    logger, collected = structlog_logger(processors(clock=lambda: frozen))
    for frame in fs:
        fields = validator.validate(frame)
        assert isinstance(fields, dict)
        extra = {} if client is None else {"client": client}
        logger.info("message", **fields, peer=stream.peer, listener=stream.listener_name, **extra)
    assert bytes(out.messages) == bytes(collected.buf)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.lists(good_frames, min_size=1, max_size=4), min_size=1, max_size=4), min_size=1, max_size=4)
)
def test_the_reads_of_one_pass_share_one_timestamp_and_each_pass_takes_the_clock_again(
    passes: list[list[list[bytes]]],
) -> None:
    """One timestamp per read pass: every accepted line of a pass carries the time of the pass's
    first record, however many reads and streams it holds; the next pass (``new_pass``, or the
    batch handed over by ``outcome``) reads the clock again."""
    ticks = iter(range(1_800_000_000, 1_900_000_000))
    validator = RecordValidator(RecordSettings(), MAX)
    pipeline = Pipeline(validator.validate_batch, Renderer(1024, clock=lambda: float(next(ticks))))
    seen: list[set[str]] = []
    for reads in passes:
        pipeline.new_pass()
        for i, read in enumerate(reads):
            stream = Stream(f"127.0.0.1:{5000 + i}", "tcp://127.0.0.1:8888", ack=False)
            assert pipeline.take(stream, list(read), now=0.0) == len(read)
        out = pipeline.outcome()
        lines = [json.loads(line) for line in bytes(out.messages).splitlines()]
        assert len(lines) == sum(map(len, reads))
        seen.append({line["timestamp"] for line in lines})
    assert all(len(stamps) == 1 for stamps in seen)
    assert len(set().union(*seen)) == len(passes)  # a new time for each pass


@settings(max_examples=200, deadline=None)
@given(frames, st.sampled_from(["forbid", "ignore", "keep"]))
def test_validate_many_equals_validate_one_by_one(fs: list[Frame], extra: str) -> None:
    validator = RecordValidator(RecordSettings(extra=extra), MAX)  # type: ignore[arg-type]

    def key(result: Any) -> Any:
        return result if isinstance(result, dict) else (result.reason, result.errors, result.raw)

    assert [key(r) for r in validator.validate_many(fs)] == [key(validator.validate(f)) for f in fs]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(good_frames, bad_frames), min_size=1, max_size=30),
    st.tuples(st.integers(1, 2**31 - 1), st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.floats(1.7e9, 2.0e9).map(lambda t: round(t, 6)),
)
def test_unix_peer_credentials_are_spliced_into_structlog_loggers_bytes_for_records_and_rejects(
    fs: list[bytes], credentials: tuple[int, int, int], frozen: float
) -> None:
    """A stream with SO_PEERCRED credentials writes "peer_pid", "peer_uid", "peer_gid" after
    "listener" in each accepted line and each reject line: exactly a structlog logger's bytes."""
    validator = RecordValidator(RecordSettings(), MAX)
    pipeline = Pipeline(validator.validate_batch, Renderer(1024, clock=lambda: frozen))
    stream = Stream("unix", "unix:///run/nio-logd/nio-logd.sock", ack=False, credentials=credentials)
    assert pipeline.take(stream, list(fs), now=0.0) == len(fs)
    out = pipeline.outcome()
    logger, collected = structlog_logger(processors(clock=lambda: frozen))
    rejects_logger, rejects_collected = structlog_logger(processors(clock=lambda: frozen))
    pid, uid, gid = credentials
    ids = {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}
    for frame in fs:
        fields = validator.validate(frame)
        if isinstance(fields, dict):
            logger.info("message", **fields, peer=stream.peer, listener=stream.listener_name, **ids)
        else:
            assert isinstance(fields, Refusal)
            raw, cut = escape_raw(fields.raw, 1024)
            rejects_logger.warning(
                "rejected",
                reason=fields.reason,
                error=fields.message,
                errors=fields.errors,
                peer=stream.peer,
                listener=stream.listener_name,
                **ids,
                raw=raw,
                raw_bytes=len(fields.raw),
                raw_truncated=cut,
            )
    assert bytes(out.messages) == bytes(collected.buf)
    assert bytes(out.rejects) == bytes(rejects_collected.buf)
    for line in bytes(out.messages).splitlines() + bytes(out.rejects).splitlines():
        keys = list(json.loads(line))
        at = keys.index("listener")
        assert keys[at + 1 : at + 4] == ["peer_pid", "peer_uid", "peer_gid"]
        assert json.loads(line)["peer_pid"] == pid


# -- the batch path: plain reads validated by map and rendered in one serialisation ---------------
# Text that stresses the splice and the quote arithmetic: the splice's own pattern, a message
# ending in "},{", quotes, backslashes (a string ending in one makes `\"` of `\\"`); _record_text
# may write its quotes as the escape \u0022 (a quote that is no quote byte in the input).
_TRICKY = st.lists(
    st.sampled_from(['},{"send_user":', "},{", '"', "\\", "\\\\", '\\"', "é", " ", "a", "{", "}"]),
    max_size=6,
).map("".join)
_TIMES = st.sampled_from(["2026-11-29 12:00:00", "2026-11-29T12:00:00Z", "2026-11-29T12:00:00.5+01:00"])


# An escaped quote: a backslash before it that an even number of backslashes precede.
_ESCAPED_QUOTE = re.compile(rb'(?<!\\)((?:\\\\)*)\\"')


def _record_text(user: str, when: str, msg: str, ascii_only: bool, spaced: bool, u0022: bool = False) -> bytes:
    sep = (", ", ": ") if spaced else (",", ":")
    text = json.dumps(
        {"send_user": user, "send_time": when, "send_msg": msg}, ensure_ascii=ascii_only, separators=sep
    ).encode()
    return _ESCAPED_QUOTE.sub(rb"\1\\u0022", text) if u0022 else text


plain_records = st.builds(
    _record_text,
    _TRICKY.filter(lambda u: u.strip() != ""),
    _TIMES,
    _TRICKY,
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
# Records that look plain to a careless count: a key written with an escape, a repeated key with a
# number (one string more, not two), an extra field with quotes in it, a value with "\u0022".
_DUP = '{"send_user":"a","send_time":"2026-11-29 12:00:00","send_msg":"m",%s}'
_MISSING_AND_EXTRA = b'{"send_user":"a","send_time":"2026-11-29 12:00:00","x":1}'
_NUMBER_FIRST = b'{"send_msg":1,"send_user":"a","send_time":"2026-11-29 12:00:00","send_msg":"m"}'  # kept: the last
# A repeated key whose left-out value is "" (four quote bytes more in the input), the kept value
# four quotes written as \u0022 (four quote bytes more in the output): the counts agree.
_HIDDEN_BY_U0022 = (
    b'{"send_msg":"","send_user":"a","send_time":"2026-11-29 12:00:00","send_msg":"\\u0022\\u0022\\u0022\\u0022"}'
)
crafted_records = st.sampled_from(
    [
        (_DUP % '"send\\u005fuser":"b"').encode(),
        (_DUP % '"send_msg":1').encode(),
        _NUMBER_FIRST,
        _HIDDEN_BY_U0022,
        (_DUP % '"send_msg":"\\\\"').encode(),
        (_DUP % '"x":"q\\"q"').encode(),
        (_DUP % '"x":{"y":1,"y":2}').encode(),
        b'{"send_user":"a","send_time":"2026-11-29 12:00:00","send_msg":"\\u0022\\u0022"}',
        b'{"send_user":"a\\\\","send_time":"2026-11-29 12:00:00","send_msg":"\\\\"}',
        b'{"send_user":"a","send_time":"2026-11-29 12:00:00","send_msg":"m"}  ',
        # Extra fields (refused by "forbid", left out by "ignore"): a number, null, nested values,
        # one next to a missing field (forbid names both), one whose key's two quote bytes are
        # matched by the two quotes its message writes as \u0022 (orjson writes each as \").
        (_DUP % '"x":1').encode(),
        (_DUP % '"x":null').encode(),
        (_DUP % '"x":[1,{"y":true}]').encode(),
        _MISSING_AND_EXTRA,
        b'{"send_user":"a","send_time":"2026-11-29 12:00:00","send_msg":"\\u0022\\u0022","x":1}',
    ]
)
batch_reads = st.lists(
    st.one_of(plain_records, plain_records, crafted_records, good_frames, bad_frames, too_large), max_size=30
)


_BACKSLASHES_AT_THE_END = b'{"send_user":"a\\\\","send_time":"2026-11-29 12:00:00","send_msg":"\\\\"}'


@settings(max_examples=300, deadline=None)
@given(batch_reads, st.sampled_from(["forbid", "ignore"]))
# Two strings ending in an escaped backslash (each `\\"` holds a `\"` that is no escaped quote)
# next to a repeated key with a number (two quotes more): a count that took every `\"` for an
# escaped quote would find 12 a record and let the repeat through.
@example([_BACKSLASHES_AT_THE_END, _NUMBER_FIRST], "forbid")
@example([_HIDDEN_BY_U0022, b'{"send_user":"a","send_time":"2026-11-29 12:00:00","send_msg":"\\""}'], "forbid")
# A refused record with an extra field: "forbid" names the missing field and the unknown one,
# "ignore" only the first (the errors of a refusal are the configured rules', not the first pass's).
@example([_MISSING_AND_EXTRA, _NUMBER_FIRST], "forbid")
@example([_MISSING_AND_EXTRA], "forbid")
def test_validate_batch_equals_validate_one_by_one_and_plain_means_three_fields(fs: list[Frame], extra: str) -> None:
    """The batch's results, and ``validate``'s, are ``validate_exact``'s (the configured rules
    alone: duplicates refused, extra fields as configured, whatever the other records of the read
    hold); "plain" only when every record was accepted with exactly the three
    fields in order, the precondition of the one-call rendering; a read of one record is never
    plain (rendered alone, the batch's proof would cost more than the record)."""
    validator = RecordValidator(RecordSettings(extra=extra), MAX)  # type: ignore[arg-type]

    def key(result: Any) -> Any:
        return result if isinstance(result, dict) else (result.reason, result.errors, result.raw)

    results, body = validator.validate_batch(fs)
    exact = [key(validator.validate_exact(f)) for f in fs]
    assert [key(r) for r in results] == exact
    assert [key(validator.validate(f)) for f in fs] == exact
    everything_accepted = all(isinstance(r, dict) for r in results)
    assert (body is not None) == (everything_accepted and len(fs) > 1)
    if body is not None:
        assert all(list(r) == ["send_user", "send_time", "send_msg"] for r in results)
        assert body == orjson.dumps(results)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(plain_records, crafted_records), min_size=1, max_size=30),
    st.booleans(),
    st.floats(1.7e9, 2.0e9).map(lambda t: round(t, 6)),
)
def test_a_plain_read_in_one_serialisation_is_a_structlog_loggers_bytes(
    fs: list[bytes], ack: bool, frozen: float
) -> None:
    """Reads whose texts hold the splice's own pattern, a message ending in "},{", quotes and
    backslashes: the lines are a real structlog logger's bytes, record by record, and the
    refused ones (repeated keys) are refused as one by one."""
    validator = RecordValidator(RecordSettings(), MAX)
    pipeline = Pipeline(validator.validate_batch, Renderer(1024, clock=lambda: frozen))
    stream = Stream("127.0.0.1:5000", "tcp://127.0.0.1:8888", ack=ack)
    assert pipeline.take(stream, list(fs), now=0.0) == len(fs)
    out = pipeline.outcome()
    logger, collected = structlog_logger(processors(clock=lambda: frozen))
    expected_answers = []
    for seq, frame in enumerate(fs, 1):
        fields = validator.validate(frame)
        if isinstance(fields, dict):
            logger.info("message", **fields, peer=stream.peer, listener=stream.listener_name)
        expected_answers.append({"seq": seq, "ok": isinstance(fields, dict)})
    assert bytes(out.messages) == bytes(collected.buf)
    assert out.accepted == len(bytes(collected.buf).splitlines())
    if ack:
        answers = [json.loads(a) for a in b"".join(out.answers[stream]).splitlines()]
        assert [{"seq": a["seq"], "ok": a["ok"]} for a in answers] == expected_answers
        assert out.answer_bytes == stream.owed == len(b"".join(out.answers[stream]))


@given(st.integers(1, 1 << 62), st.integers(1, 600))
@example(1, 1)
@example(9, 2)  # the answers cross a power of ten
@example(99_999, 300)
def test_a_run_of_ok_answers_is_one_answer_line_per_record(first: int, count: int) -> None:
    run = ok_answers(first, count)
    assert run == b"".join(b'{"seq":%d,"ok":true}\n' % seq for seq in range(first, first + count))
    assert [json.loads(line) for line in run.splitlines()][-1] == {"seq": first + count - 1, "ok": True}
