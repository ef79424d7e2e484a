"""``nio-logd bench`` against a real daemon: it runs, reports, and the records arrived (no timing asserts)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, read_lines, write_config

from nio_logd.config import RecordSettings
from nio_logd.records.record import RecordValidator
from nio_logd.tools.bench import lane_chunks, lane_pool, make_record, parse_record_bytes, split


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def bench_json(*args: str) -> dict[str, Any]:
    done = bench(*args, "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_generated_records_are_valid_and_sized_as_asked() -> None:
    validator = RecordValidator(RecordSettings(), 256 * 1024)
    rng = random.Random(3)
    for size in (80, 100, 123, 150, 400):
        for _ in range(200):
            record = make_record(rng, size)
            assert len(record) == size
            assert isinstance(validator.validate(record), dict), record


def test_lanes_are_deterministic_and_chunks_hold_every_record_once() -> None:
    pool = lane_pool(7, 2, 5000, (100, 150), 100)
    assert pool == lane_pool(7, 2, 5000, (100, 150), 100)
    assert len(set(pool)) > 1900  # varied users and texts, not one record repeated
    chunks = lane_chunks(pool, 5000, 100)
    data = b"".join(c for c, _n in chunks)
    assert sum(n for _c, n in chunks) == 5000 == data.count(b"\n")
    assert all(100 <= len(line) <= 150 for line in data.splitlines())
    assert split(10, 4) == [3, 3, 2, 2]


def test_record_bytes_spellings() -> None:
    assert parse_record_bytes("120") == (120, 120)
    assert parse_record_bytes("100-150") == (100, 150)
    for bad in ("10", "150-100", "x", "100-"):
        with pytest.raises(ValueError):
            parse_record_bytes(bad)


def test_stream_reports_rates_and_every_record_is_written(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(write_config(tmp_path))
    result = bench_json(
        "--address",
        d.address,
        "--records",
        "3000",
        "--connections",
        "4",
        "--processes",
        "2",
        "--wait-file",
        str(d.messages),
    )
    assert result["sent"]["records"] == 3000
    assert result["sent"]["records_per_s"] > 0 and result["sent"]["mb_per_s"] > 0
    assert result["written"]["complete"] and result["written"]["lines"] == 3000
    # The count's checks: the file read again agrees, and the clock stopped at no more lines than
    # the senders had sent by then (a count ahead of them is no measurement).
    assert result["written"]["recounted_lines"] == 3000
    assert 0 < result["written"]["sent_when_counted"] <= 3000
    assert result["errors"] == 0 and result["latency_ms"] is None
    lines = read_lines(d.messages)
    assert len(lines) == 3000
    assert {line["event"] for line in lines} == {"message"}
    assert len({line["send_user"] for line in lines}) > 10
    assert read_lines(d.rejects) == []


def test_one_record_per_connection_without_newline(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(write_config(tmp_path))
    result = bench_json(
        "--address",
        d.address,
        "--mode",
        "one-per-connection",
        "--records",
        "300",
        "--connections",
        "6",
        "--wait-file",
        str(d.messages),
    )
    assert result["sent"]["records"] == 300 == result["connections_made"]
    assert result["written"]["complete"]
    assert len(read_lines(d.messages)) == 300
    assert read_lines(d.rejects) == []


@pytest.mark.parametrize("mode", ["stream", "one-per-connection"])
def test_ack_mode_counts_answers_and_reports_latency(tmp_path: Path, daemon_factory: Any, mode: str) -> None:
    config = write_config(tmp_path, listeners=[{"address": "tcp://127.0.0.1:0", "ack": True}])
    d = daemon_factory(config)
    result = bench_json(
        "--address", d.address, "--ack", "--mode", mode, "--records", "2000", "--connections", "4", "--window", "100"
    )
    assert result["acked"] == 2000 and result["refused"] == 0
    assert set(result["latency_ms"]) == {"p50", "p99", "p99.9", "max"}
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
    assert len(read_lines(d.messages)) == 2000


def test_text_output_and_exit_code(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(write_config(tmp_path))
    done = bench("--address", d.address, "--records", "500", "--connections", "2", "--record-bytes", "120")
    assert done.returncode == 0, done.stderr
    assert "records/s" in done.stdout and "MB/s" in done.stdout
    assert "500 records" in done.stdout.replace(",", "")
    assert len(read_lines(d.messages)) == 500


def test_nobody_listening_is_an_error_not_a_hang(tmp_path: Path) -> None:
    done = bench("--address", "tcp://127.0.0.1:1", "--records", "10", "--connections", "1", timeout=60)
    assert done.returncode != 0
    assert "cannot connect" in done.stderr
