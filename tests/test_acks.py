"""Acknowledgements (SPEC section 1): one answer per record, in order, and ``ok`` only once the
record is in the log file (durability "write") or on disk (durability "fsync")."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, record, wait_for, write_config
from faultkit import count_lines, logged_ids, make_line, wait_stable


@pytest.mark.parametrize("durability", ["write", "fsync"])
def test_ok_is_sent_only_once_the_record_is_in_the_file(tmp_path: Path, daemon_factory: Any, durability: str) -> None:
    """Each time answers arrive, the log already holds the newest record they acknowledge."""
    d = daemon_factory(
        write_config(
            tmp_path,
            listeners=[{"address": "tcp://127.0.0.1:0", "ack": True}],
            log={"durability": durability},
        )
    )
    total = 20_000
    s = socket.create_connection(d.tcp)
    sender = threading.Thread(target=lambda: s.sendall(b"".join(make_line(0, i) + b"\n" for i in range(total))))
    sender.start()
    s.settimeout(60)
    acked = checks = 0
    buf = b""
    while acked < total:
        chunk = s.recv(1 << 16)
        assert chunk, "the daemon closed the connection"
        buf += chunk
        *answers, buf = buf.split(b"\n")
        for raw in answers:
            assert raw == b'{"seq":%d,"ok":true}' % (acked + 1)
            acked += 1
        if answers:
            # The file is read after the answers came: it must hold at least that many lines,
            # whole (no partial line at its end) and in order.
            data = d.messages.read_bytes()
            cut = data.rfind(b"\n") + 1
            assert data[:cut].count(b"\n") >= acked, f"ack {acked} came before its record was written"
            checks += 1
    sender.join()
    s.close()
    assert checks > 1
    assert logged_ids(d.messages) == [f"c0-{i}" for i in range(total)]


def test_every_record_gets_one_answer_in_order_with_reasons(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}]))
    lines = [record("a", "1"), b"{bad", record("", "2"), b"", b"  ", record("b", "3") + b"\r", b"[1]"]
    with socket.create_connection(srv.tcp) as s:
        s.sendall(b"\n".join(lines) + b"\n" + record("c", "last"))  # the last one ends at EOF
        s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    answers = [json.loads(a) for a in buf.splitlines()]
    assert [(a["seq"], a["ok"]) for a in answers] == [
        (1, True),
        (2, False),
        (3, False),
        (4, True),
        (5, False),
        (6, True),
    ]  # blank lines are no records
    assert answers[1]["reason"] == "invalid_json" and answers[1]["detail"][0]["field"] == "(record)"
    assert answers[2]["reason"] == "invalid_fields" and answers[2]["detail"][0]["field"] == "send_user"
    assert "send_user" in answers[2]["error"]
    assert answers[4]["reason"] == "not_an_object"
    assert [m["send_msg"] for m in read_lines(srv.messages)] == ["1", "3", "last"]


def _cli_send(address: str, stdin: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", "send", "--address", address, "--ack", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def test_cli_send_ack_exits_non_zero_and_lists_the_refusals(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}]))
    good = _cli_send(srv.address, record("a", "1") + b"\n" + record("a", "2") + b"\n")
    assert good.returncode == 0, good.stderr
    assert b"2 acknowledged, 0 refused" in good.stderr
    bad = _cli_send(srv.address, record("a", "3") + b"\n" + b"[]\n" + record(when="never") + b"\n")
    assert bad.returncode == 1
    err = bad.stderr.decode()
    assert "record 2 refused: (record): not a JSON object" in err
    assert "record 3 refused:" in err and "send_time" in err
    assert "1 acknowledged, 2 refused" in err
    one = _cli_send(srv.address, b"", "--user", "cli", "--msg", "hi")
    assert one.returncode == 0
    srv.wait_written(4)


def test_cli_send_ack_resends_what_was_not_acked_after_the_daemon_restarts(tmp_path: Path, daemon_factory: Any) -> None:
    """``nio-logd send --ack`` over a kill -9 and a restart on the same address: exit 0, all there."""
    port = free_port()
    cfg = write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{port}", "ack": True}])
    first = daemon_factory(cfg)
    total = 200_000
    proc = subprocess.Popen(
        [sys.executable, "-m", "nio_logd", "send", "--address", f"tcp://127.0.0.1:{port}", "--ack"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(b"".join(make_line(7, i) + b"\n" for i in range(total)))
    proc.stdin.close()
    wait_for(lambda: count_lines(first.messages) >= 20_000, 60, 0.01)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    second = daemon_factory(cfg)
    assert proc.stderr is not None
    err = proc.stderr.read()  # until the CLI exits
    assert proc.wait(60) == 0, err
    proc.stderr.close()
    assert f"{total} acknowledged, 0 refused".encode() in err
    assert b"resent after" in err
    second.stop()
    ids = set(logged_ids(second.messages))
    assert ids == {f"c7-{i}" for i in range(total)}


def test_a_client_that_does_not_read_its_acks_is_not_read_either(tmp_path: Path, daemon_factory: Any) -> None:
    """Unread answers pile up to a bound, then the daemon stops reading that client (TCP makes it
    wait) instead of buffering answers without end; once it reads, everything goes through."""
    d = daemon_factory(write_config(tmp_path, listeners=[{"address": "tcp://127.0.0.1:0", "ack": True}]))
    total, chunk = 400_000, 2000
    s = socket.create_connection(d.tcp)
    sent = [0]

    def push() -> None:
        for start in range(0, total, chunk):
            s.sendall(b"".join(make_line(0, i) + b"\n" for i in range(start, start + chunk)))
            sent[0] = start + chunk

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    blocked_at = wait_stable(lambda: sent[0])
    assert blocked_at < total, "the daemon read everything although nobody read its answers"
    s.settimeout(60)
    buf = b""
    answers = 0
    while answers < total:
        data = s.recv(1 << 20)
        assert data
        buf += data
        *lines, buf = buf.split(b"\n")
        answers += len(lines)
    pusher.join(60)
    s.close()
    assert sent[0] == total
    assert count_lines(d.messages) == total
    print(f"\n[unread acks] client blocked after {blocked_at} of {total} records until it read its answers")


def test_a_client_that_never_reads_its_acks_is_closed_after_idle_timeout(tmp_path: Path, daemon_factory: Any) -> None:
    """The connection is not held for as long as TCP allows; every record read from it is written."""
    d = daemon_factory(
        write_config(
            tmp_path,
            listeners=[{"address": "tcp://127.0.0.1:0", "ack": True}],
            limits={"idle_timeout": 1.0},
        )
    )
    total, chunk = 400_000, 2000
    s = socket.create_connection(d.tcp)
    sent = [0]

    def push() -> None:
        try:
            for start in range(0, total, chunk):
                s.sendall(b"".join(make_line(0, i) + b"\n" for i in range(start, start + chunk)))
                sent[0] = start + chunk
        except OSError:
            pass  # the daemon closed the idle connection under a blocked sendall

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    blocked_at = wait_stable(lambda: sent[0])
    assert blocked_at < total  # the daemon stopped reading a client that does not read
    closed = wait_for(lambda: any(ev.get("event") == "idle_closed" for ev in d.events), timeout=30)
    assert closed
    pusher.join(60)
    s.close()
    assert d.stop() == 0
    stopping = d.event("stopping")
    assert stopping is not None and stopping["connections"] == 0
    # Every record the daemon read is in the file (what stayed unread in the kernel was never acked).
    assert 0 < count_lines(d.messages) == stopping["accepted"]


@pytest.mark.parametrize("workers", [1, 2])
def test_records_are_written_in_the_order_sent_while_answers_pile_up(
    tmp_path: Path, daemon_factory: Any, workers: int
) -> None:
    """A client that sends fast and does not read its answers for a while: once its unsent answers
    pass the bound the daemon holds the frames it read, and must not take the ones it reads next
    before them. Every record is written once, in the order sent."""
    d = daemon_factory(
        write_config(tmp_path, listeners=[{"address": "tcp://127.0.0.1:0", "ack": True}], server={"workers": workers})
    )
    total = 100_000
    s = socket.create_connection(d.tcp)
    payload = b"".join(make_line(0, i) + b"\n" for i in range(total))
    sender = threading.Thread(target=lambda: s.sendall(payload), daemon=True)
    sender.start()
    time.sleep(1.5)  # answers are not read meanwhile: they pile up past the bound
    s.settimeout(60)
    answered = 0
    buf = b""
    while answered < total:
        chunk = s.recv(1 << 16)
        assert chunk, "the daemon closed the connection"
        buf += chunk
        *answers, buf = buf.split(b"\n")
        answered += len(answers)
    sender.join(60)
    s.close()
    ids = logged_ids(d.messages)
    assert len(ids) == total
    firsts = [i for i, (a, b) in enumerate(zip(ids, ids[1:], strict=False)) if int(b[3:]) != int(a[3:]) + 1]
    assert ids == [f"c0-{i}" for i in range(total)], (
        f"out of order at {firsts[:5]}: {[ids[i : i + 2] for i in firsts[:3]]}"
    )
