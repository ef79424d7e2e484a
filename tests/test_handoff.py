"""Connections handed from the worker the kernel gave them to a worker that holds fewer
(``service/handoff.py``): a real daemon with two worker processes, real connections, the split read
from /proc."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

from conftest import read_lines, record, wait_for, write_config


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.extend(int(p) for p in (task / "children").read_text().split())
    return out


def _established_inodes(port: int) -> set[str]:
    """Socket inodes of the established TCP connections whose local port is ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    return inodes


def _split(pids: list[int], port: int) -> list[int]:
    """How many of the established connections to ``port`` each process holds."""
    inodes = _established_inodes(port)
    held = []
    for pid in pids:
        mine = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if target.startswith("socket:["):
                mine.add(target[len("socket:[") : -1])
        held.append(len(mine & inodes))
    return held


def test_a_few_long_connections_are_split_evenly_between_two_workers(tmp_path: Path, daemon_factory: Any) -> None:
    # SO_REUSEPORT's hash splits 8 connections 4/4 about a quarter of the time; five rounds all
    # within one of even would happen by chance once in a thousand runs.
    d = daemon_factory(write_config(tmp_path, server={"workers": 2}))
    host, port = d.tcp
    workers = _children(d.pid)
    assert len(workers) == 2, workers
    splits = []
    for _round in range(5):
        clients = [socket.create_connection((host, port), timeout=10) for _ in range(8)]
        try:
            wait_for(lambda: sum(_split(workers, port)) == 8, timeout=10)
            splits.append(_split(workers, port))
            for i, client in enumerate(clients):
                client.sendall(record(msg=f"round {_round} client {i}"))
        finally:
            for client in clients:
                client.close()
        wait_for(lambda: sum(_split(workers, port)) == 0, timeout=10)
    assert all(max(s) - min(s) <= 1 for s in splits), splits
    wait_for(lambda: len(read_lines(d.messages, writing=True)) == 40, timeout=10)
    d.signal(signal.SIGTERM)
    assert d.stop() == 0
    messages = sorted(line["send_msg"] for line in read_lines(d.messages))
    assert messages == sorted(f"round {r} client {i}" for r in range(5) for i in range(8))
    stopping = d.event("stopping")
    assert stopping is not None
    assert stopping["connections_total"] == 40
    assert stopping["connections_handed_off"] > 0
