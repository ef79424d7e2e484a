"""SIGTERM during a load of un-acked streams, and a second signal that forces the exit.

What counts as "sent": a record is sent once the client's ``sendall()`` of the chunk holding it
has returned (the bytes are then in the kernel, on their way to or already in the daemon's
receive buffer). The streams are told to stop starting new ``sendall()`` calls just before the
signal; a call already running may still finish after it, and its records count as sent too,
which is stricter than "sent before the signal".
"""

from __future__ import annotations

import collections
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import read_lines, wait_for, write_config
from faultkit import Streamer, close_streams, count_lines, logged_ids, make_line


@pytest.fixture(autouse=True)
def _streams_closed() -> Iterator[None]:
    yield
    close_streams()


@pytest.mark.slow
@pytest.mark.both_shapes
def test_sigterm_mid_stream_writes_every_complete_record_sent(tmp_path: Path, daemon_factory: Any) -> None:
    """4 un-acked streams at full speed; SIGTERM; every record whose sendall() returned is in the log
    exactly once, the daemon exits 0 and says it stopped clean."""
    d = daemon_factory(write_config(tmp_path, server={"io_threads": 2}))
    streams = [Streamer(d.tcp, c, total=10_000_000, chunk=300) for c in range(4)]
    for s in streams:
        s.start()
    wait_for(lambda: count_lines(d.messages) >= 40_000, 120, 0.05)
    for s in streams:
        s.stop.set()  # no new sendall() from here on
    d.signal(signal.SIGTERM)
    code = d.stop(60)
    for s in streams:
        s.join(60)
        s.sock.close()
    sent = {s.client: s.sent for s in streams}
    counts = collections.Counter(logged_ids(d.messages))  # fails on a partial line
    lost = [f"c{c}-{i}" for c, n in sent.items() for i in range(n) if f"c{c}-{i}" not in counts]
    extra = [k for k in counts if int(k.split("-")[1]) >= sent[int(k[1:].split("-")[0])]]
    print(
        f"\n[SIGTERM] sent={sum(sent.values())} written={sum(counts.values())} lost={len(lost)} "
        f"duplicates={sum(n - 1 for n in counts.values())} beyond_sent={len(extra)} "
        f"stream_errors={[type(s.error).__name__ for s in streams if s.error]}"
    )
    assert not lost, f"{len(lost)} sent records lost, e.g. {lost[:5]}"
    assert max(counts.values()) == 1  # no acks, no resends: exactly once
    assert code == 0
    stopped = d.event("stopped")
    assert stopped is not None and stopped["clean"] is True
    assert read_lines(d.rejects) == []


@pytest.mark.both_shapes
def test_sigterm_writes_and_acks_records_of_open_acked_connections(tmp_path: Path, daemon_factory: Any) -> None:
    """Clients that sent records with ack and keep the connection open get every answer before the exit,
    even those whose connection was still in the listen backlog (not yet accepted) at the signal: the
    daemon is stopped (SIGSTOP) while they connect and send, and gets SIGTERM before it runs again."""
    d = daemon_factory(write_config(tmp_path, listeners=[{"address": "tcp://127.0.0.1:0", "ack": True}]))
    early = socket.create_connection(d.tcp)
    early.sendall(make_line(9, 0) + b"\n")
    assert early.recv(100) == b'{"seq":1,"ok":true}\n'
    d.signal(signal.SIGSTOP)
    socks = [early, *(socket.create_connection(d.tcp) for _ in range(3))]  # the kernel completes these
    for k, s in enumerate(socks):
        s.sendall(b"".join(make_line(k, i) + b"\n" for i in range(1 if k == 0 else 0, 2000)) + b'{"half a record')
    d.signal(signal.SIGTERM)
    d.signal(signal.SIGCONT)
    answers = []
    errors = []
    for s in socks:
        s.settimeout(30)
        buf = b""
        try:
            while chunk := s.recv(65536):
                buf += chunk
        except OSError as exc:
            errors.append(exc)
        answers.append(buf.splitlines())
        s.close()
    code = d.stop()
    story = f"errors={errors} answers={[len(a) for a in answers]} events={d.stderr_lines[-12:]}"
    assert code == 0 and not errors, story
    assert answers[0] == [b'{"seq":%d,"ok":true}' % n for n in range(2, 2001)], story
    for lines in answers[1:]:
        assert lines == [b'{"seq":%d,"ok":true}' % n for n in range(1, 2001)], story
    assert count_lines(d.messages) == 8000
    dropped = [ev["count"] for ev in d.events if ev.get("event") == "incomplete_records_dropped"]
    assert sum(dropped) == 4


@pytest.mark.both_shapes
def test_second_signal_forces_the_exit_while_the_drain_waits(tmp_path: Path, daemon_factory: Any) -> None:
    """A drain that cannot finish (a client keeps streaming until shutdown_timeout) ends at once on a
    second SIGTERM, with a non-zero exit (not everything could be written as promised)."""
    d = daemon_factory(write_config(tmp_path, server={"shutdown_timeout": 120.0}))
    stream = Streamer(d.tcp, 0, total=100_000_000, chunk=200)
    stream.start()
    wait_for(lambda: count_lines(d.messages) >= 5000, 60, 0.05)
    d.signal(signal.SIGTERM)
    wait_for(lambda: d.event("stopping") is not None, 30)
    time.sleep(0.5)  # the drain is running: the stream has not stopped, so it would last 60 s
    assert d.proc.poll() is None
    d.signal(signal.SIGTERM)
    code = d.proc.wait(30)
    stream.close()
    assert code != 0
    stopped = d.event("stopped")
    assert stopped is not None and stopped["clean"] is False
    read_lines(d.messages)  # whole lines only, even when forced
