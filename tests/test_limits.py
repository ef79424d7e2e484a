"""Limits beyond the core ones: connections per client address, and the per-connection rate limit
that slows a client down (its reads stop until its token bucket refills) instead of dropping."""

from __future__ import annotations

import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from conftest import free_port, read_lines, wait_for, write_config
from faultkit import make_line

from nio_logd.tools.client import send


def _stream(address: tuple[str, int], lines: list[bytes]) -> None:
    with socket.create_connection(address) as s:
        s.sendall(b"".join(line + b"\n" for line in lines))
        s.shutdown(socket.SHUT_WR)
        s.settimeout(60)
        while s.recv(65536):
            pass


def _span_seconds(lines: list[dict[str, Any]]) -> float:
    stamps = [datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")) for line in lines]
    return (max(stamps) - min(stamps)).total_seconds()


def test_connections_per_client_address_are_capped_and_the_slot_comes_back(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, limits={"max_connections_per_client": 2}))
    held = [socket.create_connection(srv.tcp) for _ in range(2)]
    wait_for(lambda: srv.server.open_connections == 2)
    extra = socket.create_connection(srv.tcp)
    extra.settimeout(10)
    assert extra.recv(1) == b""  # closed at once
    other = socket.create_connection(srv.tcp, source_address=("127.0.0.2", 0))  # another address
    other.sendall(make_line(2, 0) + b"\n")
    wait_for(lambda: srv.server.open_connections == 3)
    snap = srv.server.snapshot()
    assert snap["connections_refused_by_reason"] == {"max_connections_per_client": 1}
    held.pop().close()  # a slot for 127.0.0.1 comes back
    wait_for(lambda: srv.server.open_connections == 2)
    again = socket.create_connection(srv.tcp)
    again.sendall(make_line(1, 0) + b"\n")
    for s in (*held, extra, other, again):
        s.close()
    srv.wait_written(2)
    assert srv.server.snapshot()["connections_refused_by_reason"] == {"max_connections_per_client": 1}
    assert {line["send_user"] for line in read_lines(srv.messages)} == {"u1", "u2"}


def test_rate_limit_paces_a_fast_client_without_dropping(tmp_path: Path, server_factory: Any) -> None:
    """3,000 records sent at once at rate_limit = 1,000/s (burst: one second's worth): all arrive, in
    order, none refused, and the daemon's own timestamps span at least the 2 s the bucket needs.

    That span is a lower bound the rate limiter guarantees (a slow machine only makes it longer),
    not a performance measurement.
    """
    srv = server_factory(write_config(tmp_path, limits={"rate_limit": 1000.0}))
    _stream(srv.tcp, [make_line(0, i) for i in range(3000)])
    srv.wait_written(3000)
    lines = read_lines(srv.messages)
    assert [line["send_msg"].rstrip(".") for line in lines] == [f"c0-{i}" for i in range(3000)]
    assert _span_seconds(lines) >= 1.8
    snap = srv.server.snapshot()
    assert snap["rate_limited"] >= 1 and snap["refused"] == 0


def test_rate_limit_is_per_connection(tmp_path: Path, server_factory: Any) -> None:
    """A second connection has its own bucket: its records are not held behind the first one's."""
    srv = server_factory(write_config(tmp_path, limits={"rate_limit": 500.0}))
    slow = socket.create_connection(srv.tcp)
    slow.sendall(b"".join(make_line(0, i) + b"\n" for i in range(2500)))  # 4 s of tokens
    wait_for(lambda: srv.server.writer.written_records >= 500)
    _stream(srv.tcp, [make_line(1, i) for i in range(100)])  # within its own burst
    wait_for(lambda: sum(1 for m in read_lines(srv.messages, writing=True) if m["send_user"] == "u1") == 100)
    written_first = sum(1 for m in read_lines(srv.messages, writing=True) if m["send_user"] == "u0")
    assert written_first < 2500  # the first is still being paced while the second went through
    slow.shutdown(socket.SHUT_WR)
    slow.settimeout(60)
    assert slow.recv(1) == b""
    slow.close()
    srv.wait_written(2600)


def test_rate_limited_connection_is_not_closed_as_idle_while_it_waits(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, limits={"rate_limit": 500.0, "idle_timeout": 0.5}))
    _stream(srv.tcp, [make_line(0, i) for i in range(1500)])  # 2 s of waiting for tokens > idle_timeout
    srv.wait_written(1500)
    assert srv.server.snapshot()["idle_closed"] == 0
    assert len(read_lines(srv.messages)) == 1500


def test_rate_limit_with_acks_answers_every_record_in_order(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(
        write_config(
            tmp_path,
            listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}],
            limits={"rate_limit": 2000.0},
        )
    )
    result = send(srv.address, [make_line(0, i) for i in range(5000)] + [b"[]"], ack=True)
    assert result.acked == 5000 and [r[0] for r in result.refused] == [5000]
    assert srv.server.snapshot()["rate_limited"] >= 1


def test_records_held_by_the_rate_limit_are_written_at_shutdown(tmp_path: Path, server_factory: Any) -> None:
    """They were received before the stop: the drain writes them without waiting for tokens."""
    srv = server_factory(write_config(tmp_path, limits={"rate_limit": 100.0}))
    s = socket.create_connection(srv.tcp)
    s.sendall(b"".join(make_line(0, i) + b"\n" for i in range(1000)))  # 10 s of tokens
    wait_for(lambda: srv.server.writer.written_records >= 100)
    assert srv.server.writer.written_records < 1000
    assert srv.stop() is True
    s.close()
    assert [m["send_msg"].rstrip(".") for m in read_lines(srv.messages)] == [f"c0-{i}" for i in range(1000)]
