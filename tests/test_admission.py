"""The connection counts the worker processes share (``service/admission.py``): a real memfd, real
locks, a second process mapping the same table."""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

from conftest import record, wait_for, write_config
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nio_logd.config import ListenerSettings, Settings
from nio_logd.output.writer import Writer
from nio_logd.service import ipc
from nio_logd.service.admission import SharedCounts
from nio_logd.service.server import Server
from nio_logd.wire.listeners import Listener

HOSTS = [f"10.0.0.{i}" for i in range(12)] + ["::1", "unix", "[fe80::1]"]

ops = st.lists(
    st.tuples(st.sampled_from(["open", "close", "die"]), st.integers(0, 2), st.sampled_from(HOSTS)),
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_counts_equal_a_counter_model_through_opens_closes_and_deaths(script: list[tuple[str, int, str]]) -> None:
    """Any mix of opens, closes and worker deaths over 3 workers: the shared table's total and
    per-client counts equal a plain per-worker Counter's (the table is small: deletions and the
    rehash that sweeps them are exercised)."""
    counts = SharedCounts.create(3, 16)  # 1024 slots per worker
    model = [collections.Counter[str]() for _ in range(3)]
    try:
        for op, worker, host in script:
            with counts:
                if op == "open":
                    counts.add(worker, host, 1)
                    model[worker][host] += 1
                elif op == "close" and model[worker][host] > 0:
                    counts.add(worker, host, -1)
                    model[worker][host] -= 1
                elif op == "die":
                    assert counts.clear(worker) == sum(model[worker].values())
                    model[worker] = collections.Counter()
                assert counts.open_connections() == sum(sum(m.values()) for m in model)
                for h in HOSTS:
                    assert counts.client(h) == sum(m[h] for m in model), h
    finally:
        counts.map.close()
        os.close(counts.fd)


def test_many_distinct_clients_come_and_go_without_filling_the_table() -> None:
    """50,000 distinct clients, each opening and closing: deleted entries are swept, the table never
    fills, and the counts end at zero."""
    counts = SharedCounts.create(1, 100)
    try:
        for i in range(50_000):
            host = f"192.0.{i >> 8 & 255}.{i & 255}:{i}"
            with counts:
                counts.add(0, host, 1)
                assert counts.client(host) == 1
                counts.add(0, host, -1)
        with counts:
            assert counts.open_connections() == 0
            assert counts.client("192.0.0.1:1") == 0
    finally:
        counts.map.close()
        os.close(counts.fd)


def test_another_process_sees_and_changes_the_same_counts() -> None:
    """A second interpreter maps the memfd it was passed (as a worker is): what it adds, we see."""
    counts = SharedCounts.create(2, 64)
    try:
        with counts:
            counts.add(0, "10.0.0.1", 1)
        code = (
            "import sys; from nio_logd.service.admission import SharedCounts\n"
            f"c = SharedCounts({counts.fd}, 2, {counts.slots})\n"
            "with c:\n"
            "    assert c.client('10.0.0.1') == 1, c.client('10.0.0.1')\n"
            "    c.add(1, '10.0.0.1', 2)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], pass_fds=[counts.fd], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        with counts:
            assert counts.client("10.0.0.1") == 3
            assert counts.open_connections() == 3
    finally:
        counts.map.close()
        os.close(counts.fd)


move_ops = st.lists(
    st.tuples(
        st.sampled_from(["open", "close", "send", "arrive", "take", "stop", "die"]),
        st.integers(0, 2),
        st.integers(0, 2),
        st.sampled_from(HOSTS[:4]),
    ),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(move_ops)
# The edges of "two fewer": loads 2 and 0 (sent), 1 and 0 (kept), 3 and 1 (sent).
@example([("take", 1, 0, HOSTS[0]), ("open", 0, 0, HOSTS[0]), ("open", 0, 0, HOSTS[1])])
@example([("take", 1, 0, HOSTS[0]), ("open", 0, 0, HOSTS[0])])
@example([("take", 1, 0, HOSTS[0]), ("open", 1, 0, HOSTS[2])] + [("open", 0, 0, HOSTS[0])] * 3)
def test_moves_between_workers_equal_a_model(script: list[tuple[str, int, int, str]]) -> None:
    """Connections handed from one worker to another (``service/handoff.py``): on their way they
    count as open for the whole daemon and as load for the receiver, then as the receiver's; a
    worker's death keeps those on their way to it (its successor takes them from its inbox);
    ``lighter`` names the lightest worker that takes connections and holds two fewer."""
    counts = SharedCounts.create(3, 16)
    held = [collections.Counter[str]() for _ in range(3)]
    coming: list[list[str]] = [[], [], []]
    taking = [False, False, False]
    try:
        for op, worker, other, host in script:
            with counts:
                if op == "open":
                    counts.add(worker, host, 1)
                    held[worker][host] += 1
                elif op == "close" and held[worker][host] > 0:
                    counts.add(worker, host, -1)
                    held[worker][host] -= 1
                elif op == "send" and held[worker][host] > 0 and other != worker:
                    counts.moved_out(worker, other, host)
                    held[worker][host] -= 1
                    coming[other].append(host)
                elif op == "arrive" and coming[worker]:
                    arrived = coming[worker].pop(0)
                    counts.moved_in(worker, arrived)
                    held[worker][arrived] += 1
                elif op in ("take", "stop"):
                    counts.set_taking(worker, op == "take")
                    taking[worker] = op == "take"
                elif op == "die":
                    counts.clear(worker)
                    held[worker] = collections.Counter()
                    taking[worker] = False
                loads = [sum(held[w].values()) + len(coming[w]) for w in range(3)]
                assert counts.open_connections() == sum(loads)
                for h in HOSTS[:4]:
                    assert counts.client(h) == sum(m[h] for m in held), h
                for w in range(3):
                    best, best_load = None, loads[w] - 1
                    for x in range(3):
                        if x != w and taking[x] and loads[x] < best_load:
                            best, best_load = x, loads[x]
                    assert counts.lighter(w) == best, (w, loads, taking)
    finally:
        counts.map.close()
        os.close(counts.fd)


admit_ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "close", "close_later", "flush", "send", "arrive", "die"]),
        st.integers(0, 2),
        st.sampled_from(HOSTS[:4]),
    ),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(admit_ops, st.integers(0, 8), st.integers(0, 3))
def test_admit_decides_as_a_model_of_both_limits(
    script: list[tuple[str, int, str]], max_connections: int, per_client: int
) -> None:
    """``admit`` (one decision under the lock, as a worker takes it): refused with the limit's name
    exactly when the model's daemon-wide count (connections on their way to a worker included) or
    the client's count across the workers is at its limit; counted as the worker's otherwise.

    A worker's closes may wait ("close_later", as ``Server.connection_closed`` leaves them): its
    next ``admit`` takes them off before deciding (``closed``), or ``close_many`` does ("flush");
    until then the other workers count them as open, never as closed too early."""
    _admit_model(script, 3, max_connections, per_client)


# Two workers, two clients, low limits: a close that waits is soon followed by an admission at
# the limit, from the same client or another, in the same worker or the other one.
close_then_admit_ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "admit_low", "close_later", "close_later", "close", "flush"]),
        st.integers(0, 1),
        st.sampled_from(HOSTS[:2]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(close_then_admit_ops, st.integers(1, 3), st.integers(0, 2))
@example([("admit", 0, HOSTS[0]), ("close_later", 0, HOSTS[0]), ("admit", 0, HOSTS[0])], 1, 0)
@example([("admit", 0, HOSTS[0]), ("close_later", 0, HOSTS[0]), ("admit", 0, HOSTS[1])], 1, 0)
@example([("admit", 0, HOSTS[0]), ("close_later", 0, HOSTS[0]), ("admit", 1, HOSTS[0])], 1, 0)
@example([("admit", 0, HOSTS[0]), ("admit", 0, HOSTS[1]), ("close_later", 0, HOSTS[0]), ("admit", 0, HOSTS[0])], 9, 1)
# More open than a lowered limit allows, a close waiting: refused, and that close still comes off.
@example([("admit", 0, HOSTS[0])] * 2 + [("close_later", 0, HOSTS[0]), ("admit_low", 0, HOSTS[0])], 3, 0)
def test_closes_that_wait_are_taken_off_at_the_next_admission_or_flush(
    script: list[tuple[str, int, str]], max_connections: int, per_client: int
) -> None:
    """The same model, where it matters: an admission right after a close that waited decides
    as if that close had been counted at once (in its own worker), and no count is left behind.
    "admit_low": an admission under limits of 1 and 1, as after a reload lowered them (so more
    connections may be open than the limit, and one refused may have closes waiting)."""
    _admit_model(script, 2, max_connections, per_client)


def _admit_model(script: list[tuple[str, int, str]], workers: int, max_connections: int, per_client: int) -> None:
    counts = SharedCounts.create(workers, 16)
    held = [collections.Counter[str]() for _ in range(workers)]  # the truth: open now
    waiting: list[list[str]] = [[] for _ in range(workers)]  # closed, not yet off the shared counts
    coming: list[list[str]] = [[] for _ in range(workers)]
    try:
        for op, worker, host in script:
            with counts:
                if op in ("admit", "admit_low"):
                    limit, client_limit = (max_connections, per_client) if op == "admit" else (1, 1)
                    # What the decision sees: the truth, the other workers' waiting closes still open.
                    seen = [
                        held[w] if w == worker else held[w] + collections.Counter(waiting[w]) for w in range(workers)
                    ]
                    total = sum(sum(m.values()) for m in seen) + sum(map(len, coming))
                    if total >= limit:
                        expected: str | None = "max_connections"
                    elif client_limit and sum(m[host] for m in seen) >= client_limit:
                        expected = "max_connections_per_client"
                    else:
                        expected = None
                    closed, waiting[worker] = waiting[worker], []
                    assert counts.admit(worker, host, limit, client_limit, closed) == expected
                    if expected is None:
                        held[worker][host] += 1
                elif op == "close" and held[worker][host] > 0:
                    counts.add(worker, host, -1)
                    held[worker][host] -= 1
                elif op == "close_later" and held[worker][host] > 0:
                    waiting[worker].append(host)
                    held[worker][host] -= 1
                elif op == "flush":
                    counts.close_many(worker, waiting[worker])
                    waiting[worker] = []
                elif op == "send" and held[worker][host] > 0:
                    target = (worker + 1) % workers
                    counts.moved_out(worker, target, host)
                    held[worker][host] -= 1
                    coming[target].append(host)
                elif op == "arrive" and coming[worker]:
                    arrived = coming[worker].pop(0)
                    counts.moved_in(worker, arrived)
                    held[worker][arrived] += 1
                elif op == "die":
                    assert counts.clear(worker) == sum(held[worker].values()) + len(waiting[worker])
                    held[worker] = collections.Counter()
                    waiting[worker] = []
                shown = [held[w] + collections.Counter(waiting[w]) for w in range(workers)]
                assert counts.open_connections() == sum(sum(m.values()) for m in shown) + sum(map(len, coming))
                for h in HOSTS[:4]:
                    assert counts.client(h) == sum(m[h] for m in shown), h
    finally:
        counts.map.close()
        os.close(counts.fd)


def test_a_workers_closes_come_off_the_shared_counts_at_its_next_admission_or_its_flush() -> None:
    """Two worker servers (``service/server.py``) on one memfd, max_connections = 1: a close waits
    (counted as open for the other worker, never as closed too early) until the worker's next
    admission, which decides without it, or its loop's pass end (``flush_closed``)."""
    settings = Settings.model_validate({"limits": {"max_connections": 1}})
    counts = SharedCounts.create(2, settings.limits.max_connections)
    channel, other_end = socket.socketpair()
    listener_sock = socket.create_server(("127.0.0.1", 0))
    try:
        listener = Listener(listener_sock, ListenerSettings(address="tcp://127.0.0.1:1"), "tcp://127.0.0.1:1")
        servers = []
        for index in range(2):
            server = Server(settings, writer=cast(Writer, ipc.RemoteWriter(channel, 1 << 20)))
            server.shared = SharedCounts(counts.fd, 2, counts.slots)  # each worker maps it itself
            server.worker_index = index
            servers.append(server)
        first, second = servers
        assert first.admit(listener, "10.0.0.1") is None
        assert second.admit(listener, "10.0.0.2") == "max_connections"
        first.connection_closed("10.0.0.1")
        assert first.open_connections == 0  # the worker's own count at once
        assert second.admit(listener, "10.0.0.2") == "max_connections"  # the close waits
        assert first.admit(listener, "10.0.0.1") is None  # its own closes first, then the decision
        first.connection_closed("10.0.0.1")
        first.flush_closed()
        with counts:
            assert counts.open_connections() == 0
        assert second.admit(listener, "10.0.0.2") is None
        second.connection_closed("10.0.0.2")
        second.flush_closed()
        with counts:
            assert counts.open_connections() == 0 and counts.client("10.0.0.1") == counts.client("10.0.0.2") == 0
    finally:
        listener_sock.close()
        channel.close()
        other_end.close()
        counts.map.close()
        os.close(counts.fd)


def test_a_loop_takes_its_closes_off_the_shared_counts_by_the_end_of_its_pass(
    tmp_path: Path, server_factory: Any
) -> None:
    """A real loop (an in-process server, as worker 0 of 2 on one memfd): five one-record clients
    come and go, and nothing connects after them; their closes still come off the counts the
    workers share (IOLoop.run calls flush_closed each pass), or the other worker would go on
    refusing clients for them."""
    srv = server_factory(write_config(tmp_path))
    counts = SharedCounts.create(2, 64)
    srv.server.worker_index = 0
    srv.server.shared = SharedCounts(counts.fd, 2, counts.slots)
    try:
        socks = []
        for i in range(5):
            sock = socket.create_connection(srv.tcp, timeout=10)
            sock.sendall(record(f"u{i}", f"m{i}") + b"\n")
            sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
        srv.wait_written(5)
        for sock in socks:
            assert sock.recv(1) == b""  # closed by the daemon
            sock.close()

        def settled() -> bool:
            with counts:
                return counts.open_connections() == 0 and counts.client("127.0.0.1") == 0

        wait_for(settled, 10)
        assert srv.server.open_connections == 0
    finally:
        srv.stop()
        srv.server.shared = None
        counts.map.close()
        os.close(counts.fd)
