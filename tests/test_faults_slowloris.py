"""Slowloris: 1,000 connections dribbling a byte a second must not slow a real client down, and
must be closed once they go quiet for idle_timeout."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for, write_config
from faultkit import Streamer, close_streams, count_lines, logged_ids, metric, metrics_address, scrape

SLOW = 1000
MAX_ROUNDS = 60  # seconds of dribbling at most: a bounded loop, stopped once the stream is written


@pytest.fixture(autouse=True)
def _streams_closed() -> Iterator[None]:
    yield
    close_streams()


@pytest.mark.slow
@pytest.mark.both_shapes
def test_slowloris_does_not_stall_a_stream_and_idle_connections_are_closed(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(
        write_config(
            tmp_path,
            limits={"idle_timeout": 3.0},
            metrics={"address": "tcp://127.0.0.1:0"},
        )
    )
    mx = metrics_address(d)
    slow = [socket.create_connection(d.tcp) for _ in range(SLOW)]
    try:
        _slow_connections_stay_while_a_stream_runs_then_idle_out(d, mx, slow)
    finally:
        for s in slow:
            s.close()  # also when an assertion failed: 1,000 sockets left to the collector warn later
    assert d.stop() == 0


def _slow_connections_stay_while_a_stream_runs_then_idle_out(d: Any, mx: Any, slow: list[socket.socket]) -> None:
    wait_for(lambda: metric(scrape(mx), "nio_logd_connections_open") == SLOW, 30)
    payload = b'{"send_user": "loris", "send_time": "2026-11-29 12:00:00", "send_msg": "never ends'
    written = threading.Event()

    def dribble() -> None:
        # A byte a second on each slow connection (less than idle_timeout apart) until the stream
        # is written, however long the machine takes; never a whole line.
        for i in range(MAX_ROUNDS):
            if written.is_set():
                return
            started = time.monotonic()
            for s in slow:
                s.send(payload[i % len(payload) : i % len(payload) + 1])
            written.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    dribbler = threading.Thread(target=dribble)
    dribbler.start()
    try:
        stream = Streamer(d.tcp, 0, 100_000, chunk=1000)
        stream.start()
        stream.finish()  # every record sent, and the daemon closed the stream after reading it all
        assert stream.error is None
        wait_for(lambda: count_lines(d.messages) >= 100_000, 60)
        during = scrape(mx)
    finally:
        written.set()
        dribbler.join(60)
    assert not dribbler.is_alive()
    assert sorted(logged_ids(d.messages), key=lambda k: int(k.split("-")[1])) == [f"c0-{i}" for i in range(100_000)]
    # The slow connections were all still there while the stream ran and was written.
    assert metric(during, "nio_logd_connections_idle_closed_total") == 0
    assert metric(during, "nio_logd_connections_open") >= SLOW

    # Now they go quiet: each is closed by the daemon after idle_timeout (EOF on our side).
    sel = selectors.DefaultSelector()
    for s in slow:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed = 0
    deadline = time.monotonic() + 60
    while closed < SLOW and time.monotonic() < deadline:
        for key, _mask in sel.select(1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(16)
            except ConnectionResetError:
                data = b""
            assert data == b""
            sel.unregister(sock)
            sock.close()
            closed += 1
    sel.close()
    assert closed == SLOW
    after = scrape(mx)
    assert metric(after, "nio_logd_connections_idle_closed_total") == SLOW
    assert metric(after, "nio_logd_connections_open") == 0
    assert metric(after, "nio_logd_records_accepted_total") == 100_000
    assert metric(after, "nio_logd_records_refused_total", reason="invalid_json") == 0  # partial lines dropped
    print(f"\n[slowloris] slow_connections={SLOW} stream_records=100000 written=100000 idle_closed={closed}")
