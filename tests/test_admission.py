"""The connection counts the worker processes share (``service/admission.py``): a real memfd, real
locks, a second process mapping the same table."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from nio_logd.service.admission import SharedCounts

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
        st.sampled_from(["admit", "close", "send", "arrive", "die"]), st.integers(0, 2), st.sampled_from(HOSTS[:4])
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
    the client's count across the workers is at its limit; counted as the worker's otherwise."""
    counts = SharedCounts.create(3, 16)
    held = [collections.Counter[str]() for _ in range(3)]
    coming: list[list[str]] = [[], [], []]
    try:
        for op, worker, host in script:
            with counts:
                total = sum(sum(m.values()) for m in held) + sum(map(len, coming))
                if op == "admit":
                    if total >= max_connections:
                        expected: str | None = "max_connections"
                    elif per_client and sum(m[host] for m in held) >= per_client:
                        expected = "max_connections_per_client"
                    else:
                        expected = None
                        held[worker][host] += 1
                    assert counts.admit(worker, host, max_connections, per_client) == expected
                elif op == "close" and held[worker][host] > 0:
                    counts.add(worker, host, -1)
                    held[worker][host] -= 1
                elif op == "send" and held[worker][host] > 0:
                    target = (worker + 1) % 3
                    counts.moved_out(worker, target, host)
                    held[worker][host] -= 1
                    coming[target].append(host)
                elif op == "arrive" and coming[worker]:
                    arrived = coming[worker].pop(0)
                    counts.moved_in(worker, arrived)
                    held[worker][arrived] += 1
                elif op == "die":
                    assert counts.clear(worker) == sum(held[worker].values())
                    held[worker] = collections.Counter()
                assert counts.open_connections() == sum(sum(m.values()) for m in held) + sum(map(len, coming))
    finally:
        counts.map.close()
        os.close(counts.fd)
