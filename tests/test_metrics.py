"""The Prometheus endpoint and /healthz of a running daemon: the counters match what was sent."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port, record, wait_for, write_config
from faultkit import healthz, make_line, metric, metrics_address, scrape

from nio_logd.tools.client import send


def test_metrics_counters_match_what_the_test_sent(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(
        write_config(
            tmp_path,
            limits={"max_record_bytes": 1000},
            metrics={"address": "tcp://127.0.0.1:0"},
        )
    )
    mx = metrics_address(d)
    bad = {
        "invalid_json": [b"{nope", b'{"send_user": }'],
        "not_an_object": [b"[]", b"42", b'"text"'],
        "invalid_utf8": [b'{"send_user": "\xff", "send_time": "2026-11-29 12:00:00", "send_msg": "x"}'],
        "invalid_fields": [
            record(user=""),
            record(when="yesterday"),
            b'{"send_user": "a"}',
            record()[:-1] + b',"x":1}',
        ],
        "too_large": [b"{" + b"x" * 5000],
    }
    good = [make_line(0, i) for i in range(500)]
    streams = [
        good[:200] + bad["invalid_json"] + bad["not_an_object"],
        good[200:450] + bad["invalid_utf8"] + bad["invalid_fields"],
        good[450:] + bad["too_large"],
    ]
    total_bytes = 0
    for lines in streams:
        payload = b"\n".join(lines)  # the last record without a newline, like the original client
        total_bytes += len(payload)
        with socket.create_connection(d.tcp) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
    refused_total = sum(len(v) for v in bad.values())
    wait_for(lambda: metric(scrape(mx), "nio_logd_rejects_written_total") == refused_total, 30)
    wait_for(lambda: metric(scrape(mx), "nio_logd_records_written_total") == 500, 30)
    m = scrape(mx)
    assert metric(m, "nio_logd_records_accepted_total") == 500
    for reason, lines in bad.items():
        assert metric(m, "nio_logd_records_refused_total", reason=reason) == len(lines), reason
    assert metric(m, "nio_logd_bytes_received_total") == total_bytes
    assert metric(m, "nio_logd_connections_total") == 3
    wait_for(lambda: metric(scrape(mx), "nio_logd_connections_open") == 0, 10)
    assert metric(m, "nio_logd_connections_refused_total", reason="max_connections") == 0
    assert metric(m, "nio_logd_queue_bytes") == 0
    assert metric(m, "nio_logd_queue_records") == 0
    assert metric(m, "nio_logd_queue_limit_bytes") == 32 * 1024 * 1024
    assert metric(m, "nio_logd_write_seconds_count") >= 1
    assert metric(m, "nio_logd_write_seconds_bucket", le="+Inf") == metric(m, "nio_logd_write_seconds_count")
    assert metric(m, "nio_logd_fsync_seconds_count") == 0  # durability "write"
    assert metric(m, "nio_logd_write_errors_total") == 0
    assert metric(m, "nio_logd_backpressure_paused") == 0
    assert metric(m, "nio_logd_healthy") == 1
    assert metric(m, "process_resident_memory_bytes") > 10 << 20
    status, body = healthz(mx)
    assert status == 200 and body["status"] == "ok" and body["problems"] == []
    try:
        urllib.request.urlopen(f"http://{mx}/nothing-here", timeout=10)
        raise AssertionError("expected 404")
    except urllib.error.HTTPError as err:
        assert err.code == 404


def test_fsync_is_a_group_commit_counted_in_the_fsync_histogram(tmp_path: Path, daemon_factory: Any) -> None:
    """With durability fsync and fsync_max_wait, 20,000 acked records need far fewer fsyncs than records."""
    d = daemon_factory(
        write_config(
            tmp_path,
            listeners=[{"address": "tcp://127.0.0.1:0", "ack": True}],
            log={"durability": "fsync", "fsync_max_wait": 0.02},
            metrics={"address": "tcp://127.0.0.1:0"},
        )
    )
    mx = metrics_address(d)
    result = send(d.address, [make_line(1, i) for i in range(20_000)], ack=True)
    assert result.acked == 20_000
    m = scrape(mx)
    fsyncs = metric(m, "nio_logd_fsync_seconds_count")
    assert 1 <= fsyncs < 20_000 / 20
    assert metric(m, "nio_logd_fsync_seconds_sum") > 0
    assert metric(m, "nio_logd_records_written_total") == 20_000
    print(f"\n[group commit] records=20000 fsyncs={fsyncs:.0f}")


def test_connections_refused_are_counted_by_reason(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(
        write_config(
            tmp_path,
            limits={"max_connections": 3, "max_connections_per_client": 2},
            metrics={"address": "tcp://127.0.0.1:0"},
        )
    )
    mx = metrics_address(d)
    held = [socket.create_connection(d.tcp) for _ in range(2)]
    wait_for(lambda: metric(scrape(mx), "nio_logd_connections_open") == 2, 10)
    extra = socket.create_connection(d.tcp)  # a third from 127.0.0.1: over the per-client cap
    extra.settimeout(10)
    assert extra.recv(1) == b""
    other = socket.create_connection(d.tcp, source_address=("127.0.0.2", 0))  # another address: admitted
    wait_for(lambda: metric(scrape(mx), "nio_logd_connections_open") == 3, 10)
    fourth = socket.create_connection(d.tcp, source_address=("127.0.0.3", 0))  # over max_connections
    fourth.settimeout(10)
    assert fourth.recv(1) == b""
    m = scrape(mx)
    assert metric(m, "nio_logd_connections_refused_total", reason="max_connections_per_client") == 1
    assert metric(m, "nio_logd_connections_refused_total", reason="max_connections") == 1
    assert metric(m, "nio_logd_connections_total") == 3
    events = [e for e in d.events if e.get("event") == "connection_refused"]
    assert {e["reason"] for e in events} == {"max_connections_per_client", "max_connections"}
    for s in (*held, extra, other, fourth):
        s.close()


def test_metrics_address_that_cannot_be_bound_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(
            tmp_path,
            listeners=[{"address": f"tcp://127.0.0.1:{free_port()}"}],
            metrics={"address": f"tcp://127.0.0.1:{port}"},
        )
        proc = subprocess.run(
            [sys.executable, "-m", "nio_logd", "run", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )
    assert proc.returncode == 69  # EX_UNAVAILABLE, as for a listener that cannot be bound
    assert f"cannot listen on metrics address tcp://127.0.0.1:{port}: Address already in use" in proc.stderr
    cfg = write_config(tmp_path, metrics={"address": f"unix://{tmp_path}/metrics.sock"})
    proc = subprocess.run(
        [sys.executable, "-m", "nio_logd", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == 69
    assert "only tcp://HOST:PORT addresses are supported" in proc.stderr
