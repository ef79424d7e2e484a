"""Hostile clients of the metrics listener: silent, slow, too many, from outside ``allow``, at EMFILE.

Each test runs a real daemon process and looks at it from outside (/proc, sockets, /metrics).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, record, wait_for, write_config
from faultkit import healthz, metric, metrics_address, scrape
from pydantic import ValidationError

from nio_logd.config import MetricsSettings

CLK_TCK = os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)


def hostport(mx: str) -> tuple[str, int]:
    host, _, port = mx.rpartition(":")
    return host, int(port)


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    """A list the test fills with client sockets; every one is closed at the end, even on failure."""
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for s in held:
            s.close()


def connect_silent(address: tuple[str, int], into: list[socket.socket], count: int, give_up: float = 2.0) -> int:
    """Open up to ``count`` connections that never send a byte, one after the other.

    Each is waited for (a burst would overflow the listen backlog and wait for SYN retransmits);
    the first that is not established within ``give_up`` seconds (the backlog is full: the daemon
    is not accepting) ends the loop. Returns how many were established.
    """
    for established in range(count):
        s = socket.socket()
        into.append(s)
        s.setblocking(False)
        err = s.connect_ex(address)
        assert err in (0, errno.EINPROGRESS), os.strerror(err)
        _, writable, _ = select.select([], [s], [], give_up)
        if not writable:
            return established
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return count


def closed_by_peer(s: socket.socket) -> bool:
    """True once the daemon has closed ``s`` (EOF or reset); never blocks."""
    try:
        readable, _, _ = select.select([s], [], [], 0)
        if not readable:
            return False
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def metrics_config(tmp_path: Path, **metrics: Any) -> Path:
    return write_config(tmp_path, metrics={"address": f"tcp://127.0.0.1:{free_port()}", **metrics})


def send_one(address: tuple[str, int], msg: str) -> None:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(record(msg=msg) + b"\n")
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # EOF once the daemon has read everything


def test_metrics_silent_connections_are_bounded_and_time_out(tmp_path: Path, daemon_factory: Any) -> None:
    bound, read_timeout, clients = 8, 2.0, 200
    d = daemon_factory(metrics_config(tmp_path, max_connections=bound, read_timeout=read_timeout))
    mx = metrics_address(d)
    assert healthz(mx)[0] == 200
    time.sleep(0.3)  # let the /healthz handler thread end and its socket close
    fds0, threads0 = fd_count(d.pid), thread_count(d.pid)
    with sockets() as held:
        started = time.monotonic()
        assert connect_silent(hostport(mx), held, clients) == clients
        print(
            f"\n[silent metrics] connected {clients} in {time.monotonic() - started:.2f} s: "
            f"fds {fds0} -> {fd_count(d.pid)}, threads {threads0} -> {thread_count(d.pid)}"
        )
        # The daemon accepts every connection, keeps at most `bound` and closes the others at once.
        wait_for(lambda: sum(closed_by_peer(s) for s in held) >= clients - bound, 10)
        fds = threads = 0
        while time.monotonic() < started + read_timeout * 0.6:
            fds, threads = max(fds, fd_count(d.pid)), max(threads, thread_count(d.pid))
            time.sleep(0.02)
        print(f"[silent metrics] fds {fds0} -> max {fds}, threads {threads0} -> max {threads}")
        assert fds <= fds0 + bound + 1  # +1: a refused connection between accept and close
        assert threads <= threads0 + bound
        # A log client is served meanwhile.
        send_one(d.tcp, "while-metrics-is-flooded")
        wait_for(
            lambda: any(r["send_msg"] == "while-metrics-is-flooded" for r in read_lines(d.messages, writing=True)), 10
        )
        # The ones kept are closed after read_timeout (with some slack for a loaded machine).
        wait_for(lambda: all(closed_by_peer(s) for s in held), read_timeout + 5)
        assert time.monotonic() - started >= read_timeout * 0.9
        wait_for(lambda: fd_count(d.pid) <= fds0 and thread_count(d.pid) <= threads0, 5)
    status, body = healthz(mx)
    assert status == 200 and body["status"] == "ok"
    m = scrape(mx)
    refused = metric(m, "nio_logd_metrics_connections_refused_total", reason="max_connections")
    timed_out = metric(m, "nio_logd_metrics_connections_timed_out_total")
    assert refused + timed_out == clients
    assert 1 <= timed_out <= 2 * bound  # a slot freed by a timeout may take one more
    assert metric(m, "nio_logd_metrics_connections_refused_total", reason="not_allowed") == 0
    assert metric(m, "nio_logd_metrics_connections_open") == 1  # this scrape
    assert [e["reason"] for e in d.events if e.get("event") == "metrics_connection_refused"] == ["max_connections"]


def test_metrics_slow_request_is_cut_at_read_timeout(tmp_path: Path, daemon_factory: Any) -> None:
    """A client that drips its request a byte at a time cannot hold a slot past read_timeout."""
    read_timeout = 1.0
    d = daemon_factory(metrics_config(tmp_path, read_timeout=read_timeout))
    with socket.create_connection(hostport(metrics_address(d)), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.0\r\n")
        closed = False
        while not closed and time.monotonic() < started + 6:
            try:
                s.sendall(b"X")  # a header line that never ends
            except ConnectionError:
                closed = True
                break
            time.sleep(0.2)
            closed = closed_by_peer(s)
        took = time.monotonic() - started
    print(f"\n[slow metrics request] closed={closed} after {took:.2f} s (read_timeout {read_timeout})")
    assert closed and read_timeout * 0.9 <= took <= read_timeout + 2


def test_metrics_emfile_backs_off(tmp_path: Path, daemon_factory: Any) -> None:
    nofile = 64
    d = daemon_factory(metrics_config(tmp_path, max_connections=500, read_timeout=60.0))
    mx = metrics_address(d)
    assert fd_count(d.pid) < nofile - 16, "the daemon needs more fds at rest than this test assumes"
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
    with sockets() as held:
        deadline = time.monotonic() + 30
        while fd_count(d.pid) < nofile - 1:
            assert time.monotonic() < deadline and len(held) < 4 * nofile, f"{fd_count(d.pid)} fds"
            connect_silent(hostport(mx), held, 1, give_up=3.0)
        # A few more wait in the listen backlog: the listening socket stays readable.
        connect_silent(hostport(mx), held, 4, give_up=1.0)
        time.sleep(0.5)  # let the accept loop reach its steady state
        before, t0 = cpu_seconds(d.pid), time.monotonic()
        time.sleep(2.0)
        used, elapsed = cpu_seconds(d.pid) - before, time.monotonic() - t0
        print(f"\n[metrics at EMFILE] fds={fd_count(d.pid)} (limit {nofile}), CPU {used:.2f} s in {elapsed:.2f} s")
        assert used < 0.5
    # The fds come back once the clients go: the listener accepts again.
    wait_for(lambda: answers(mx), 15, 0.2)
    assert d.proc.poll() is None
    assert metric(scrape(mx), "nio_logd_metrics_accept_errors_total") >= 1
    assert [e["errno"] for e in d.events if e.get("event") == "metrics_accept_failed"] == ["EMFILE"]


def answers(mx: str) -> bool:
    """/healthz answers 200 within a short timeout (False on any connection error)."""
    try:
        return get_healthz(mx, "127.0.0.1", timeout=2.0) == 200
    except OSError:
        return False


def get_healthz(mx: str, source: str, timeout: float = 10.0) -> int:
    host, port = hostport(mx)
    conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


def test_metrics_allow_list_refuses_others(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(metrics_config(tmp_path, allow=["10.0.0.0/8", "127.0.0.2/32"]))
    mx = metrics_address(d)
    for _ in range(3):
        with socket.create_connection(hostport(mx), timeout=10) as s:  # from 127.0.0.1: not allowed
            try:
                s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                answer = s.recv(100)
            except ConnectionError:
                answer = b""
        assert answer == b"", answer  # closed without an answer
    assert get_healthz(mx, "127.0.0.2") == 200
    host, port = hostport(mx)
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=("127.0.0.2", 0))
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    assert 'nio_logd_metrics_connections_refused_total{reason="not_allowed"} 3.0' in text
    refusals = [e for e in d.events if e.get("event") == "metrics_connection_refused"]
    assert len(refusals) == 1 and refusals[0]["reason"] == "not_allowed"  # once a minute per address
    assert refusals[0]["peer"].startswith("127.0.0.1:")


def test_metrics_allow_list_of_loopback_answers(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(metrics_config(tmp_path, allow=["127.0.0.0/8"]))
    assert healthz(metrics_address(d))[0] == 200


def test_metrics_settings_are_validated() -> None:
    s = MetricsSettings()
    assert (s.allow, s.max_connections, s.read_timeout) == ((), 16, 5.0)
    for bad in ({"max_connections": 0}, {"read_timeout": 0.0}, {"allow": ["not-a-network"]}):
        with pytest.raises(ValidationError):
            MetricsSettings(**bad)
