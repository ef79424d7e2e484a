"""The hostile corpus and a hypothesis fuzz against the RUNNING daemon (a real process): it never
crashes, answers every record exactly once and in order, and its counters add up:
records sent = accepted + refused, in the acks, in /metrics and in the two log files."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import read_lines, record, wait_for, write_config
from faultkit import count_lines, healthz, metric, metrics_address, scrape
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import HOSTILE

MAX_RECORD = 300_000
EXAMPLES = 300
PER_EXAMPLE = 70  # at least: 300 x 70 = 21,000 generated records
REASONS = ("invalid_json", "invalid_utf8", "not_an_object", "invalid_fields", "too_large")


def exchange(address: tuple[str, int], lines: list[bytes]) -> list[dict[str, Any]]:
    """Send the lines on one acked connection, half-close, and return every answer."""
    with socket.create_connection(address) as s:
        s.sendall(b"".join(line + b"\n" for line in lines))
        s.shutdown(socket.SHUT_WR)
        s.settimeout(60)
        buf = b""
        while chunk := s.recv(1 << 16):
            buf += chunk
    return [json.loads(raw) for raw in buf.splitlines()]


def one_record(line: bytes) -> bytes:
    """Make a generated line exactly one record: no newline inside, not blank after framing."""
    line = line.replace(b"\n", b" ")
    core = line[:-1] if line.endswith(b"\r") else line
    if not core or core.isspace():
        line = b"#" + line
    return line


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=5,
)
almost_records = st.fixed_dictionaries(
    {
        "send_user": st.text(max_size=40),
        "send_time": st.text(max_size=30)
        | st.sampled_from(["2026-11-29 12:00:00", "2026-11-29T12:00:00+02:00", "2026-02-30 12:00:00", "12:00"]),
        "send_msg": st.text(max_size=200) | json_values,
    },
    optional={"extra": json_values},
)
lines = st.one_of(
    st.builds(lambda u, m: record(u or "x", m), st.text(max_size=30), st.text(max_size=300)),  # mostly good
    almost_records.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.tuples(st.builds(record), st.binary(min_size=1, max_size=8), st.integers(0, 80)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    ),  # a good record with bytes spliced in
    # Too large: rare (each is 300 KB on the wire), chosen by a 1-in-25 draw.
    st.sampled_from(range(25)).flatmap(
        lambda k: (
            st.integers(MAX_RECORD + 1, MAX_RECORD + 5000).map(lambda n: b"{" + b"x" * n)
            if k == 0
            else st.builds(record, st.text(max_size=10))
        )
    ),
).map(one_record)


@pytest.mark.slow
def test_hostile_corpus_and_hypothesis_fuzz_never_crash_and_counters_add_up(
    tmp_path: Path, daemon_factory: Any
) -> None:
    d = daemon_factory(
        write_config(
            tmp_path,
            listeners=[{"address": "tcp://127.0.0.1:0", "ack": True}],
            limits={"max_record_bytes": MAX_RECORD},
            metrics={"address": "tcp://127.0.0.1:0"},
        )
    )
    mx = metrics_address(d)
    sent = ok = 0
    refused: dict[str, int] = dict.fromkeys(REASONS, 0)
    connections = 0

    def tally(batch: list[bytes]) -> list[dict[str, Any]]:
        nonlocal sent, ok, connections
        answers = exchange(d.tcp, batch)
        connections += 1
        assert [a["seq"] for a in answers] == list(range(1, len(batch) + 1))  # one answer each, in order
        sent += len(batch)
        for a in answers:
            if a["ok"]:
                ok += 1
            else:
                assert a["error"] and a["detail"], a
                refused[a["reason"]] += 1
        return answers

    # The hostile corpus, between good records.
    corpus: list[bytes] = []
    for bad, _reason in HOSTILE:
        corpus += [record("good", "before"), bad]
    answers = tally(corpus)
    assert [a.get("reason") for a in answers[1::2]] == [reason for _bad, reason in HOSTILE]
    assert all(a["ok"] for a in answers[0::2])

    # The fuzz: many generated records per connection keeps 20,000+ inputs fast.
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(st.lists(lines, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE + 20))
    def fuzz(batch: list[bytes]) -> None:
        tally(batch)
        assert d.proc.poll() is None

    fuzz()
    assert sent >= 20_000 + len(corpus)

    assert d.proc.poll() is None
    assert not [e for e in d.events if e.get("level") in ("error", "critical")]
    total_refused = sum(refused.values())
    assert sent == ok + total_refused
    samples = scrape(mx)
    assert metric(samples, "nio_logd_records_accepted_total") == ok
    for reason in REASONS:
        assert metric(samples, "nio_logd_records_refused_total", reason=reason) == refused[reason], reason
    assert metric(samples, "nio_logd_connections_total") == connections
    wait_for(lambda: metric(scrape(mx), "nio_logd_rejects_written_total") == total_refused, 30)
    assert metric(scrape(mx), "nio_logd_records_written_total") == ok
    assert healthz(mx)[0] == 200
    assert d.stop() == 0
    assert count_lines(d.messages) == ok
    rejects = read_lines(d.rejects)  # every line whole and valid JSON
    assert len(rejects) == total_refused
    print(
        f"\n[fuzz] inputs={sent} (hostile corpus {len(corpus)}) accepted={ok} refused={total_refused} "
        f"by_reason={refused} connections={connections} crashes=0"
    )
