"""A connection just accepted is read before it is watched (``Connection.read_ahead``).

Each test holds the I/O loop (a call on its thread that waits) while clients connect and send, so
their connections wait in the kernel's backlog with their bytes, as they do under a burst; then
lets it go. The loop's poller is watched (the real one, every call passed on) to tell whether a
connection was ever registered.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import read_lines, record, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nio_logd.wire.ioloop import IOLoop
from nio_logd.wire.poller import Poller


class Registrations:
    """The descriptors the loop's poller was asked to watch since (the calls go on to the real
    poller; the class is patched, its instances have slots)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fds: list[int] = []
        real = Poller.register

        def register(poller: Poller, fd: int, events: int, handler: Any) -> None:
            self.fds.append(fd)
            real(poller, fd, events, handler)

        monkeypatch.setattr(Poller, "register", register)


@contextmanager
def held(loop: IOLoop, timeout: float = 20.0) -> Iterator[None]:
    """The loop's thread waits (at most ``timeout``) until the block ends: nothing is accepted."""
    waiting, go = threading.Event(), threading.Event()

    def wait() -> None:
        waiting.set()
        go.wait(timeout)

    loop.call_soon_threadsafe(wait)
    assert waiting.wait(timeout), "the loop did not run the call"
    try:
        yield
    finally:
        go.set()


def sent_and_closed(address: tuple[str, int], data: bytes) -> socket.socket:
    """Connect, send ``data``, shut the sending side; the socket stays open to read answers."""
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    return sock


def closed_by_daemon(sock: socket.socket) -> bool:
    """The daemon closed the connection: an end of stream, or a reset when it closed with bytes
    of ours unread."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def burst_served(srv: Any, loop: IOLoop, lines: list[bytes]) -> None:
    """One-record clients, one per line, all in the backlog while the loop is held; then served:
    waits until every record is written."""
    with held(loop):
        socks = [sent_and_closed(srv.tcp, line) for line in lines]
    try:
        srv.wait_written(len(lines))
    finally:
        for sock in socks:
            sock.close()


def peer_ports(srv: Any) -> list[int]:
    return sorted(int(line["peer"].rpartition(":")[2]) for line in read_lines(srv.messages))


def test_connections_that_sent_and_closed_before_the_accept_are_served_without_the_poller(
    tmp_path: Path, server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = server_factory(write_config(tmp_path))
    [loop] = srv.server.loops
    watched = Registrations(monkeypatch)
    with held(loop):
        clients = [sent_and_closed(srv.tcp, record(f"u{i}", f"m{i}")) for i in range(20)]  # no newline
    srv.wait_written(20)
    for sock in clients:
        assert sock.recv(1) == b""  # the daemon closed it
        sock.close()
    assert sorted(line["send_msg"] for line in read_lines(srv.messages)) == sorted(f"m{i}" for i in range(20))
    assert watched.fds == []
    wait_for(lambda: not loop.connections)


def test_a_connection_with_half_a_line_before_the_accept_is_watched_and_served(
    tmp_path: Path, server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = server_factory(write_config(tmp_path))
    [loop] = srv.server.loops
    watched = Registrations(monkeypatch)
    line = record("bob", "split") + b"\n"
    with held(loop):
        sock = socket.create_connection(srv.tcp, timeout=10)
        sock.sendall(line[:10])
    wait_for(lambda: len(watched.fds) == 1)  # read what there was, then watched for the rest
    sock.sendall(line[10:])
    srv.wait_written(1)
    assert [r["send_msg"] for r in read_lines(srv.messages)] == ["split"]
    sock.close()
    wait_for(lambda: not loop.connections)


def test_acks_are_sent_to_a_client_that_sent_its_records_and_shut_its_side_before_the_accept(
    tmp_path: Path, server_factory: Any
) -> None:
    srv = server_factory(write_config(tmp_path, [{"address": "tcp://127.0.0.1:0", "ack": True}]))
    [loop] = srv.server.loops
    with held(loop):
        sock = sent_and_closed(srv.tcp, record("carol", "a") + b"\n" + b"not json\n" + record("carol", "b") + b"\n")
    answers = b""
    while answers.count(b"\n") < 3:
        chunk = sock.recv(4096)
        assert chunk, f"closed before every answer came: {answers!r}"
        answers += chunk
    assert sock.recv(1) == b""
    sock.close()
    got = [json.loads(line) for line in answers.splitlines()]
    assert [(a["seq"], a["ok"]) for a in got] == [(1, True), (2, False), (3, True)], got


def test_more_than_the_reads_ahead_hold_is_read_to_the_end(tmp_path: Path, server_factory: Any) -> None:
    """300 KB waiting (more than the reads ahead take): the rest comes through the poller."""
    srv = server_factory(write_config(tmp_path))
    [loop] = srv.server.loops
    lines = [record("dave", f"r{i:05d}-" + "x" * 100) + b"\n" for i in range(2000)]
    with held(loop):
        sock = sent_and_closed(srv.tcp, b"".join(lines))
    srv.wait_written(2000)
    assert [r["send_msg"][:6] for r in read_lines(srv.messages)] == [f"r{i:05d}" for i in range(2000)]
    assert sock.recv(1) == b""
    sock.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    clients=st.lists(
        st.tuples(st.integers(0, 3), st.booleans(), st.integers(0, 2)),  # records, newline at the end, when
        min_size=1,
        max_size=6,
    )
)
def test_whatever_was_sent_before_or_after_the_accept_every_record_lands_once(
    tmp_path_factory: Any, server_factory: Any, clients: list[tuple[int, bool, int]]
) -> None:
    """Each client sends its records before the accept (closing then, 0), before it and closes
    after (1), or connects before it and sends everything after (2)."""
    srv = server_factory(write_config(tmp_path_factory.mktemp("ahead")))
    [loop] = srv.server.loops
    datas = []
    for c, (n, newline, _when) in enumerate(clients):
        body = b"\n".join(record(f"c{c}", f"c{c}-{i}") for i in range(n))
        datas.append(body + (b"\n" if newline and n else b""))
    socks: list[socket.socket | None] = [None] * len(clients)
    with held(loop):
        for c, (_n, _newline, when) in enumerate(clients):
            sock = socket.create_connection(srv.tcp, timeout=10)
            if when < 2:
                sock.sendall(datas[c])
            if when == 0:
                sock.shutdown(socket.SHUT_WR)
            socks[c] = sock
    for c, (_n, _newline, when) in enumerate(clients):
        sock = socks[c]
        assert sock is not None
        if when == 2:
            sock.sendall(datas[c])
        if when:
            sock.shutdown(socket.SHUT_WR)
    expected = sorted(f"c{c}-{i}" for c, (n, _nl, _w) in enumerate(clients) for i in range(n))
    srv.wait_written(len(expected))
    for sock in socks:
        assert sock is not None
        assert sock.recv(1) == b""
        sock.close()
    assert sorted(r["send_msg"] for r in read_lines(srv.messages)) == expected
    assert read_lines(srv.rejects) == []
    srv.stop()


def test_a_burst_of_short_reads_keeps_each_connections_order_and_its_reject_summary(
    tmp_path: Path, server_factory: Any
) -> None:
    """The first reads of a burst of new connections without acks are validated together
    (``IOLoop.take_frames`` defers them). Each connection's records stay in the order sent even
    when a later read of the same connection is too long to wait (four 16 KiB records fill the
    first read, ten short ones follow); a client that sent three refused records and closed
    before they were taken still gets its reject line and the summary of the two its reject rate
    left out."""
    srv = server_factory(write_config(tmp_path, log={"rejects_per_second": 1}))
    [loop] = srv.server.loops
    short = [record("s", f"short-{i}") + b"\n" for i in range(30)]
    big = [record("b", f"big-{i}-" + "x" * (16 * 1024 - 80)) + b"\n" for i in range(4)]
    pad = 65536 - sum(map(len, big))
    assert 0 < pad < 80
    big[-1] = record("b", "big-3-" + "x" * (16 * 1024 - 80 + pad)) + b"\n"  # the four fill one read of 64 KiB
    assert sum(map(len, big)) == 65536
    tail = [record("b", f"after-{i}") + b"\n" for i in range(10)]
    with held(loop):
        socks = [sent_and_closed(srv.tcp, line) for line in short[:15]]
        socks.append(sent_and_closed(srv.tcp, b"".join(big + tail)))
        socks.append(sent_and_closed(srv.tcp, b"nope 1\nnope 2\nnope 3\n"))
        socks += [sent_and_closed(srv.tcp, line) for line in short[15:]]
    srv.wait_written(30 + 14)
    lines = read_lines(srv.messages)
    from_b = [r["send_msg"].partition("-x")[0] for r in lines if r["send_user"] == "b"]
    assert from_b == ["big-0", "big-1", "big-2", "big-3"] + [f"after-{i}" for i in range(10)]
    assert sorted(r["send_msg"] for r in lines if r["send_user"] == "s") == sorted(f"short-{i}" for i in range(30))
    wait_for(lambda: len(read_lines(srv.rejects)) == 2)
    refused, summary = read_lines(srv.rejects)
    assert refused["reason"] == "invalid_json" and refused["raw"] == "nope 1"
    assert summary["event"] == "rejects_suppressed" and summary["count"] == 2, summary
    for sock in socks:
        assert sock.recv(1) == b""
        sock.close()


def test_a_burst_of_one_record_clients_is_validated_in_a_few_calls(
    tmp_path: Path, server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 clients of one record each, waiting in the backlog: their records are validated
    together (at most 64 connections a call), not in a call each."""
    srv = server_factory(write_config(tmp_path))
    [loop] = srv.server.loops
    calls: list[int] = []
    real = loop.pipeline.validate_batch

    def counting(frames: list[Any]) -> Any:
        calls.append(len(frames))
        return real(frames)

    monkeypatch.setattr(loop.pipeline, "validate_batch", counting)
    burst_served(srv, loop, [record(f"u{i}", f"m{i}") + b"\n" for i in range(20)])
    assert sorted(r["send_msg"] for r in read_lines(srv.messages)) == sorted(f"m{i}" for i in range(20))
    assert sum(calls) == 20 and len(calls) <= 3, calls


def test_a_connection_closed_for_refusals_by_its_waiting_read_takes_nothing_more(
    tmp_path: Path, server_factory: Any
) -> None:
    """refused_close_after = 4: a client's first read (four refused 16 KiB lines, 64 KiB) waits
    in the burst; its next read (ten good records, too many to wait) first takes the waiting
    one, which closes the connection for refusals, and then takes nothing: as without the wait."""
    srv = server_factory(write_config(tmp_path, limits={"refused_close_after": 4}))
    [loop] = srv.server.loops
    bad = [b"x" * 16383 + b"\n"] * 4
    assert sum(map(len, bad)) == 65536
    good = [record("a", f"after-{i}") + b"\n" for i in range(10)]
    with held(loop):
        first = sent_and_closed(srv.tcp, b"".join(bad + good))
        marker = sent_and_closed(srv.tcp, record("b", "marker") + b"\n")
    srv.wait_written(1, refused=4)
    assert closed_by_daemon(first)
    assert closed_by_daemon(marker)
    wait_for(lambda: loop.stats.records.closed_refused_records == 1)
    assert [r["send_msg"] for r in read_lines(srv.messages)] == ["marker"]
    assert len(read_lines(srv.rejects)) == 4
    first.close()
    marker.close()


def test_a_validation_that_fails_in_a_burst_costs_only_its_own_connection(
    tmp_path: Path, server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in validation (a bug, injected here for the frames holding "poison"): the burst's
    reads are taken one by one instead, and only the poisoned client's connection is closed (a
    handler error, counted); the other ten records are written."""
    srv = server_factory(write_config(tmp_path))
    [loop] = srv.server.loops
    real = loop.pipeline.validate_batch

    def failing(frames: list[Any]) -> Any:
        if any(b"poison" in f for f in frames if isinstance(f, bytes)):
            raise RuntimeError("injected")
        return real(frames)

    monkeypatch.setattr(loop.pipeline, "validate_batch", failing)
    with held(loop):
        socks = [sent_and_closed(srv.tcp, record(f"u{i}", f"m{i}") + b"\n") for i in range(5)]
        socks.append(sent_and_closed(srv.tcp, record("p", "poison") + b"\n"))
        socks += [sent_and_closed(srv.tcp, record(f"u{i}", f"m{i}") + b"\n") for i in range(5, 10)]
    srv.wait_written(10)
    wait_for(lambda: loop.stats.handler_errors == 1)
    assert sorted(r["send_msg"] for r in read_lines(srv.messages)) == sorted(f"m{i}" for i in range(10))
    for sock in socks:
        assert closed_by_daemon(sock)
        sock.close()


def test_a_burst_hands_its_batch_over_once_it_holds_a_passs_worth(
    tmp_path: Path, server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 one-record clients of 3 KB records in the backlog, queue_bytes at its least (a pass
    hands its batch over past 64 KiB): the burst's waiting records are taken 256 KiB at a time,
    by the read that fills the list, and that read's check of the pass hands the batch over; so no
    batch holds much more than one take's lines, where one batch for the whole burst would hold
    all 200 (about 640 KB)."""
    srv = server_factory(write_config(tmp_path, limits={"queue_bytes": 1 << 16}))
    [loop] = srv.server.loops
    assert loop.pass_limit == 64 << 10
    sizes: list[int] = []
    real = srv.server.writer.submit

    def submit(batch: Any) -> bool:
        sizes.append(len(batch.messages))
        return bool(real(batch))

    monkeypatch.setattr(srv.server.writer, "submit", submit)
    text = "x" * 3000
    burst_served(srv, loop, [record(f"u{i}", f"{i} {text}") + b"\n" for i in range(200)])
    assert sorted(int(r["send_msg"].split()[0]) for r in read_lines(srv.messages)) == list(range(200))
    assert sum(sizes) > 600_000 and max(sizes) < 400_000, sizes
