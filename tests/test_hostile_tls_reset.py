"""Finding 1 of the second hostile round: a TCP reset before accept on a TLS listener, and
exceptions that escape a loop.

A load-balancer health check connects and resets at once (SO_LINGER 0). When the reset reaches
the daemon before it has accepted the connection, ``wrap_socket`` fails on a dead socket. That
must cost nothing: no connection slot kept, no loop killed, every other client served, SIGTERM
exits 0 with everything written. The daemon is stopped (SIGSTOP) while the resets arrive, so they
are all in the listen backlog before it accepts them: the case is reproduced every time.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import read_lines, wait_for, write_config
from faultkit import healthz, make_line, metrics_address
from test_tls import PKI, ctx_for, pki, tls_listener  # noqa: F401 - pki is a fixture

from nio_logd.config import load_file
from nio_logd.service.metrics import health
from nio_logd.service.runner import _writer_healthy, serve
from nio_logd.tools.client import send


def reset_connections(addr: tuple[str, int], n: int) -> None:
    """``n`` connections, each closed with a TCP RST right after the handshake."""
    for _ in range(n):
        s = socket.create_connection(addr, timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


@pytest.mark.parametrize("io_threads", [1, 2])
def test_tls_reset_before_accept_keeps_the_daemon_serving(
    tmp_path: Path, daemon_factory: Any, pki: PKI, io_threads: int
) -> None:
    cfg = write_config(
        tmp_path,
        [tls_listener(pki, ack=True, ca=False)],
        limits={"max_connections": 20, "queue_bytes": 65536},
        server={"io_threads": io_threads},
        metrics={"address": "tcp://127.0.0.1:0"},
    )
    d = daemon_factory(cfg)
    mx = metrics_address(d)
    ctx = ctx_for(pki, None)
    address = d.address
    # 40 resets in the backlog of a stopped daemon: twice max_connections.
    os.kill(d.pid, signal.SIGSTOP)
    try:
        reset_connections(d.tcp, 40)
    finally:
        os.kill(d.pid, signal.SIGCONT)
    # Ten one-record clients, one connection each: a leaked slot or a dead loop loses some.
    for i in range(10):
        result = send(address, [make_line(1, i)], ack=True, tls=ctx, timeout=10)
        assert result.acked == 1, f"record {i}: {result}"
    # A stream big enough to fill the small queue: backpressure pauses and resumes the loops.
    lines = [make_line(2, i, pad=200) for i in range(20_000)]
    result = send(address, lines, ack=True, tls=ctx, timeout=60)
    assert result.acked == 20_000
    status, body = healthz(mx)
    assert status == 200, body
    # More resets, now while a stream is running, then SIGTERM: every record written, exit 0.
    stream = threading.Thread(
        target=send,
        args=(address, [make_line(3, i) for i in range(20_000)]),
        kwargs={"ack": True, "tls": ctx, "timeout": 60},
        daemon=True,
    )
    stream.start()
    reset_connections(d.tcp, 40)
    stream.join(90)
    assert not stream.is_alive()
    assert d.stop() == 0, d.stderr_lines[-20:]
    msgs = [r["send_msg"] for r in read_lines(d.messages)]
    assert len(msgs) == 10 + 20_000 + 20_000, len(msgs)
    print(f"FIGURE TLS, io_threads {io_threads}: 80 RST connects, {len(msgs)} of 40,010 acked records written, exit 0")
    assert not [e for e in d.events if e.get("event") in ("io_loop_crashed", "handler_failed", "fatal")]


def test_an_exception_escaping_a_loop_is_fatal(tmp_path: Path) -> None:
    """A bug that escapes an I/O loop: health goes 503, the watchdog stops, serve() reports
    failure (exit 1), and the records received before it are written. (The loops of this one
    process: with worker processes a worker whose loop dies exits 1 and is restarted, as
    test_workers.py kills one.)"""
    cfg = write_config(tmp_path, limits={"idle_timeout": 60.0}, server={"workers": 1})
    settings = load_file(cfg)
    seen: dict[str, Any] = {}
    stopped = threading.Event()

    def boom() -> None:
        raise RuntimeError("injected bug")

    def on_ready(server: Any) -> None:
        stop_daemon = server.on_fatal

        def on_fatal() -> None:  # what health and the watchdog say at the moment of the failure
            seen["health"] = health(server)
            seen["watchdog"] = _writer_healthy(server, 1.0)
            stop_daemon()

        server.on_fatal = on_fatal

        def inject() -> None:
            host, port = server.addresses()[0].removeprefix("tcp://").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(b"".join(make_line(7, i) + b"\n" for i in range(100)))
                wait_for(lambda: server.writer.written_records >= 100, 10)
                server.loops[0].call_soon_threadsafe(boom)

        def guard() -> None:
            # Without a fatal path serve() would never return: end it so the test fails, not hangs.
            if not stopped.wait(20):
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=inject, daemon=True).start()
        threading.Thread(target=guard, daemon=True).start()

    started = time.monotonic()
    try:
        clean = serve(settings, on_ready=on_ready)
    finally:
        stopped.set()
    assert time.monotonic() - started < 15, "serve() went on after the loop died"
    assert clean is False
    healthy, body = seen["health"]
    assert not healthy and any("injected bug" in p or "died" in p for p in body["problems"]), body
    assert seen["watchdog"] is False
    assert len(read_lines(settings.resolve(settings.log.path))) == 100
