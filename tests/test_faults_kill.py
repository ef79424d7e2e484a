"""kill -9 of the daemon mid-stream: no acknowledged record is ever lost (real process, real signal)."""

from __future__ import annotations

import collections
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, wait_for, write_config
from faultkit import AckedSender, logged_ids, make_line

from nio_logd.tools.client import send

CLIENTS = 4
RECORDS = 50_000


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["write", "fsync"])
@pytest.mark.both_shapes
def test_kill_9_mid_stream_then_restart_loses_no_acknowledged_record(
    tmp_path: Path, daemon_factory: Any, durability: str
) -> None:
    """4 clients stream 50,000 acked records each; the daemon is killed with SIGKILL at about a third
    and restarted on the same port; the client library resends what was not acked: every record is
    in the log (so none that was acked is missing), with no partial line."""
    port = free_port()
    cfg = write_config(
        tmp_path,
        listeners=[{"address": f"tcp://127.0.0.1:{port}", "ack": True}],
        # With fsync, the group commit waits up to 50 ms for more records: records then spend
        # real time in the queue, so an ack sent before its write would be caught by the kill.
        log={"durability": durability, "fsync_max_wait": 0.05 if durability == "fsync" else 0.0},
        server={"io_threads": 2},
    )
    first = daemon_factory(cfg)
    senders = [
        AckedSender(first.address, [make_line(c, i) for i in range(RECORDS)], retries=30, timeout=60)
        for c in range(CLIENTS)
    ]
    for s in senders:
        s.start()
    wait_for(lambda: first.messages.exists() and first.messages.stat().st_size > 0, 60)
    line_len = len(first.messages.read_bytes().split(b"\n", 1)[0]) + 1
    wait_for(lambda: first.messages.stat().st_size >= line_len * CLIENTS * RECORDS // 3, 120, 0.01)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert any(s.is_alive() for s in senders), "the clients finished before the kill: nothing was tested"
    second = daemon_factory(cfg)  # same config, same port
    for s in senders:
        s.join(300)
    errors = [s.error for s in senders if s.error is not None]
    assert not errors, errors
    results = [s.result for s in senders]
    assert all(r is not None and r.acked == RECORDS and not r.refused for r in results), results
    assert sum(r.reconnects for r in results if r is not None) >= 1
    second.stop()

    ids = logged_ids(second.messages)  # fails on a partial line
    counts = collections.Counter(ids)
    missing = [f"c{c}-{i}" for c in range(CLIENTS) for i in range(RECORDS) if f"c{c}-{i}" not in counts]
    duplicates = sum(n - 1 for n in counts.values())
    resent = sum(r.resent for r in results if r is not None)
    print(
        f"\n[kill -9, durability={durability}] records={CLIENTS * RECORDS} acked={CLIENTS * RECORDS} "
        f"missing={len(missing)} duplicates={duplicates} resent_by_clients={resent} "
        f"reconnects={sum(r.reconnects for r in results if r is not None)}"
    )
    assert not missing, f"{len(missing)} acknowledged records missing, e.g. {missing[:5]}"
    assert set(counts) == {f"c{c}-{i}" for c in range(CLIENTS) for i in range(RECORDS)}
    assert duplicates <= resent  # a duplicate can only come from a resend
    assert read_lines(second.rejects) == []


@pytest.mark.parametrize("partial", [100, 300_000], ids=["short", "longer-than-64KiB"])
def test_a_partial_last_line_left_by_a_crash_is_cut_at_restart(
    tmp_path: Path, daemon_factory: Any, partial: int
) -> None:
    """kill -9 can cut a write() in the middle of a line (of any length up to max_record_bytes):
    the restarted daemon cuts that partial line off before it appends, so every line stays whole."""
    cfg = write_config(tmp_path, limits={"max_record_bytes": 400_000})
    whole = b"".join(make_line(0, i) + b"\n" for i in range(3))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "messages.log").write_bytes(whole + b'{"send_user": "cut' + b"x" * partial)
    d = daemon_factory(cfg)
    assert d.event("partial_line_removed") is not None
    send(d.address, [make_line(1, 0)])
    wait_for(lambda: d.messages.read_bytes().count(b"\n") == 4, 10)
    d.stop()
    assert logged_ids(d.messages) == ["c0-0", "c0-1", "c0-2", "c1-0"]
