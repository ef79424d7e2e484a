"""The server end to end over real sockets: the seed client, concurrency, hostile input, limits."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, record, wait_for, write_config

from nio_logd.tools.client import send


def seed_client(host: str, port: int, payload: dict[str, Any]) -> None:
    """The original teaching client: connect, send one JSON record without a newline, close."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect((host, port))
    s.send(json.dumps(payload).encode("utf-8"))
    s.close()


def test_seed_client_record_lands_in_the_log(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path))
    seed_client(*srv.tcp, {"send_user": "Lyon", "send_time": "2026-11-29 12:00:00", "send_msg": "hello"})
    srv.wait_written(1)
    [line] = read_lines(srv.messages)
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert line["event"] == "message" and line["level"] == "info"
    assert line["timestamp"].endswith("Z")
    assert (line["send_user"], line["send_time"], line["send_msg"]) == ("Lyon", "2026-11-29T12:00:00", "hello")
    assert line["peer"].startswith("127.0.0.1:")
    assert line["listener"] == srv.settings.listeners[0].address


def test_200_concurrent_clients_x_50_records_each_exactly_once(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, server={"io_threads": 2}))
    host, port = srv.tcp
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            lines = [record(f"user{n}", f"c{n}-r{i}") for i in range(50)]
            if n % 2:  # streams: all 50 on one connection, in random-sized writes
                with socket.create_connection((host, port)) as s:
                    data = b"\n".join(lines) + b"\n"
                    rnd = random.Random(n)
                    while data:
                        cut = rnd.randint(1, 400)
                        s.sendall(data[:cut])
                        data = data[cut:]
                    s.shutdown(socket.SHUT_WR)
                    s.recv(1)
            else:  # one record per connection, no newline, like the seed client
                for line in lines:
                    with socket.create_connection((host, port)) as s:
                        s.sendall(line)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    srv.wait_written(10_000)
    srv.stop()
    msgs = [line["send_msg"] for line in read_lines(srv.messages)]
    assert len(msgs) == 10_000
    assert set(msgs) == {f"c{n}-r{i}" for n in range(200) for i in range(50)}


HOSTILE: list[tuple[bytes, str]] = [
    (b"{this is not json", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"send_user": "\xc3\x28", "send_time": "2026-11-29 12:00:00", "send_msg": "x"}', "invalid_utf8"),
    (b'{"send_user": "a\x00b", "send_time": "2026-11-29 12:00:00", "send_msg": "x"}', "invalid_json"),
    (b'{"send_time": "2026-11-29 12:00:00", "send_msg": "x"}', "invalid_fields"),
    (record()[:-1] + b', "extra": 1}', "invalid_fields"),
    (record(when="not a time"), "invalid_fields"),
    (
        json.dumps({"send_user": "ctl\u0007", "send_time": "2026-11-29 12:00:00", "send_msg": "x"}).encode(),
        "invalid_fields",
    ),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
]


def test_hostile_input_is_refused_with_reasons_and_the_stream_goes_on(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, limits={"max_record_bytes": 300_000}))
    host, port = srv.tcp
    stream = []
    for i, (bad, _reason) in enumerate(HOSTILE):
        stream += [record("good", f"before-{i}"), bad]
    stream.append(record("good", "last"))
    with socket.create_connection((host, port)) as s:
        s.sendall(b"\n".join(stream) + b"\n")
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
    srv.wait_written(len(HOSTILE) + 1, len(HOSTILE))
    msgs = [m["send_msg"] for m in read_lines(srv.messages)]
    assert msgs == [f"before-{i}" for i in range(len(HOSTILE))] + ["last"]
    rejects = read_lines(srv.rejects)
    assert [r["reason"] for r in rejects] == [reason for _bad, reason in HOSTILE]
    for r in rejects:
        assert r["event"] == "rejected" and r["error"] and r["errors"] and r["peer"].startswith("127.0.0.1:")
        assert len(r["raw"]) <= srv.settings.log.reject_raw_bytes + 8 * 4  # escaped, truncated
    assert rejects[4]["errors"][0]["field"] == "send_user"
    assert "send_user" in rejects[7]["error"]


def test_record_ten_times_max_record_bytes_mid_stream(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, limits={"max_record_bytes": 1000}))
    host, port = srv.tcp
    huge = record("big", "x" * 10_000)
    with socket.create_connection((host, port)) as s:
        s.sendall(record("a", "1") + b"\n" + huge + b"\n" + record("b", "2") + b"\n")
        s.sendall(record("c", "3"))  # and a last one without newline
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
    srv.wait_written(3, 1)
    assert [m["send_msg"] for m in read_lines(srv.messages)] == ["1", "2", "3"]
    [rej] = read_lines(srv.rejects)
    assert rej["reason"] == "too_large"
    assert "max_record_bytes (1000)" in rej["error"]
    assert rej["raw_bytes"] == 1000  # the first max_record_bytes of it are kept as raw
    assert rej["raw"] == huge[:1000].decode()


def test_ipv6_and_unix_listeners_at_once(tmp_path: Path, server_factory: Any) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    sock_path = tmp_path / "n.sock"
    cfg = write_config(
        tmp_path,
        listeners=[
            {"address": f"tcp://[::1]:{free_port()}"},
            {"address": f"unix://{sock_path}"},
            {"address": f"tcp://127.0.0.1:{free_port()}"},
        ],
    )
    srv = server_factory(cfg)
    v6, unix, v4 = srv.server.addresses()
    for addr, who in ((v6, "six"), (unix, "unix"), (v4, "four")):
        send(addr, [record(who, who)])
    srv.wait_written(3)
    by_user = {m["send_user"]: m for m in read_lines(srv.messages)}
    assert by_user["six"]["peer"].startswith("[::1]:")
    assert by_user["unix"]["listener"] == f"unix://{sock_path}"
    assert set(by_user) == {"six", "unix", "four"}
    srv.stop()
    assert not sock_path.exists()


def test_connections_past_max_connections_are_closed_and_counted(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, limits={"max_connections": 3}))
    held = [socket.create_connection(srv.tcp) for _ in range(3)]
    wait_for(lambda: srv.server.open_connections == 3)
    extra = socket.create_connection(srv.tcp)
    extra.settimeout(5)
    assert extra.recv(1) == b""  # closed at once
    wait_for(lambda: srv.server.snapshot()["connections_refused"] == 1)
    for s in held:
        s.sendall(record("held", "ok") + b"\n")
        s.close()
    srv.wait_written(3)
    extra.close()


def test_idle_connections_are_closed_after_idle_timeout(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, limits={"idle_timeout": 0.5}))
    s = socket.create_connection(srv.tcp)
    s.sendall(b'{"send_user": "slow"')  # half a record, then silence
    s.settimeout(10)
    assert s.recv(1) == b""  # the daemon closed it
    wait_for(lambda: srv.server.snapshot()["idle_closed"] == 1)
    s.close()


def test_client_library_acks_and_refusals(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}]))
    lines = [record("a", str(i)) for i in range(1000)] + [b"[]"] + [record("a", "end")]
    result = send(srv.address, lines, ack=True)
    assert result.acked == 1001
    [(index, line, answer)] = result.refused
    assert index == 1000 and line == b"[]"
    assert answer == {
        "seq": 1001,
        "ok": False,
        "error": "(record): not a JSON object",
        "reason": "not_an_object",
        "detail": [{"field": "(record)", "error": "not a JSON object"}],
    }
    assert len(read_lines(srv.messages)) == 1001


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_daemon_uses_no_cpu(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(write_config(tmp_path))
    send(d.address, [record()])  # one connection opened and closed, then idle
    wait_for(lambda: len(read_lines(d.messages)) == 1)
    time.sleep(0.5)
    before = _cpu_seconds(d.pid)
    time.sleep(2.0)
    used = _cpu_seconds(d.pid) - before
    assert used < 0.05, f"idle daemon used {used} CPU-seconds in 2 s"


def test_run_subprocess_sigterm_writes_everything_and_exits_0(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(write_config(tmp_path, server={"io_threads": 2}))
    host, port = d.tcp
    n = 20_000
    socks = [socket.create_connection((host, port)) for _ in range(4)]
    for k, s in enumerate(socks):
        s.sendall(b"".join(record(f"u{k}", f"{k}-{i}") + b"\n" for i in range(n // 4)))
    # Everything is sent (in the daemon's socket buffers or already read); the clients stay connected.
    d.signal(signal.SIGTERM)
    assert d.stop() == 0
    for s in socks:
        s.close()
    msgs = {m["send_msg"] for m in read_lines(d.messages)}
    assert len(msgs) == n
    assert d.event("stopped") is not None and d.event("stopped")["clean"] is True


def test_a_record_the_renderer_cannot_write_does_not_stop_the_daemon(tmp_path: Path, server_factory: Any) -> None:
    """With extra = "keep", a 100-bit integer used to kill the accepting loop (orjson refuses it)."""
    srv = server_factory(write_config(tmp_path, record={"extra": "keep"}))
    bad = b'{"send_user": "a", "send_time": "2026-11-29 12:00:00", "send_msg": "x", "n": 100000000000000000000000}'
    send(srv.address, [bad, record("a", "same connection")])
    send(srv.address, [record("b", "new connection")])  # the listener still accepts
    srv.wait_written(2, 1)
    assert [m["send_msg"] for m in read_lines(srv.messages)] == ["same connection", "new connection"]
    [rej] = read_lines(srv.rejects)
    assert rej["errors"][0]["field"] == "n"
