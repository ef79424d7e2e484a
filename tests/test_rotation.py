"""Rotation under load: logrotate (create + HUP, copytruncate) and built-in size rotation.

Every test sends 50,000 uniquely numbered records over several connections while the files
rotate, stops the daemon (which writes everything it received), and then reads every file the
rotations left (gzip ones too): each record must be there exactly once, on a whole line.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, DaemonProcess, wait_for, write_config

SNIPPET = REPO / "config" / "logrotate.d" / "nio-logd"
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"

N_RECORDS = 50_000
SENDERS = 4
ROTATIONS = 5
CHUNK = 25  # records per sendall()
PAUSE = 0.004  # seconds between chunks: a steady stream (~20,000 records/s), so rotations meet writes

pytestmark = pytest.mark.skipif(not Path(LOGROTATE).exists(), reason="logrotate is not installed")


# -- load ------------------------------------------------------------------------------------------
def _line(sender: int, i: int) -> bytes:
    rid = f"s{sender}-{i:06d}"
    return (
        json.dumps(
            {"send_user": f"user{sender}", "send_time": "2026-11-29 12:00:00", "send_msg": f"rid={rid} " + "x" * 120}
        ).encode()
        + b"\n"
    )


RID = re.compile(r"^rid=(s\d+-\d+) ")


class Load:
    """SENDERS connections send N_RECORDS in ROTATIONS + 1 phases; ``between(k)`` runs as phase k starts.

    Phase k's records are sent while rotation k runs (the rotation starts, then the senders are let
    go at once), so every rotation happens with records in flight and in the writer's queue.
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.phases = ROTATIONS + 1
        self.gates = [threading.Event() for _ in range(self.phases)]
        self.cond = threading.Condition()
        self.finished = [0] * self.phases
        self.errors: list[BaseException] = []
        self.sent: set[str] = set()

    def _sender(self, s: int) -> None:
        try:
            per_sender = N_RECORDS // SENDERS
            per_phase = -(-per_sender // self.phases)
            with socket.create_connection(self.address, timeout=30) as sock:
                for p in range(self.phases):
                    assert self.gates[p].wait(60), "gate never opened"
                    ids = range(p * per_phase, min((p + 1) * per_phase, per_sender))
                    lines = [_line(s, i) for i in ids]
                    for c in range(0, len(lines), CHUNK):
                        sock.sendall(b"".join(lines[c : c + CHUNK]))
                        time.sleep(PAUSE)
                    with self.cond:
                        self.sent.update(f"s{s}-{i:06d}" for i in ids)
                        self.finished[p] += 1
                        self.cond.notify_all()
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(30)
                assert sock.recv(1) == b""  # the daemon closes once it has read everything
        except BaseException as exc:  # reported by run()
            self.errors.append(exc)
            with self.cond:
                self.cond.notify_all()

    def run(self, between: Callable[[int], None]) -> set[str]:
        threads = [threading.Thread(target=self._sender, args=(s,), daemon=True) for s in range(SENDERS)]
        for t in threads:
            t.start()
        self.gates[0].set()
        for k in range(1, self.phases):
            with self.cond:
                assert self.cond.wait_for(lambda k=k: self.finished[k - 1] == SENDERS or self.errors, 60)
            assert not self.errors, self.errors
            failed: list[BaseException] = []

            def rotate(k: int = k) -> None:
                try:
                    between(k)
                except BaseException as exc:
                    failed.append(exc)

            rotation = threading.Thread(target=rotate)
            rotation.start()
            self.gates[k].set()
            rotation.join(60)
            assert not rotation.is_alive()
            if failed:
                raise failed[0]
        for t in threads:
            t.join(60)
        assert not self.errors, self.errors
        assert len(self.sent) == N_RECORDS
        return self.sent


# -- reading every file ------------------------------------------------------------------------------
def read_union(directory: Path, stem: str) -> tuple[collections.Counter[str], list[str], list[str]]:
    """(record id -> times found, files read, problems) over ``stem`` and its rotated files."""
    found: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    files = sorted(p.name for p in directory.iterdir() if p.name.startswith(stem))
    for name in files:
        raw = (directory / name).read_bytes()
        if name.endswith(".gz"):
            raw = gzip.decompress(raw)
        if raw and not raw.endswith(b"\n"):
            problems.append(f"{name}: ends with a partial line {raw[-120:]!r}")
        for n, line in enumerate(raw.split(b"\n")[:-1], 1):
            try:
                obj = json.loads(line)
                match = RID.match(obj["send_msg"])
                assert match is not None
            except (ValueError, KeyError, TypeError, AssertionError):
                problems.append(f"{name}:{n}: not a whole record: {line[:120]!r}")
                continue
            found[match.group(1)] += 1
    return found, files, problems


def check_exactly_once(sent: set[str], daemon: DaemonProcess, stem: str = "messages.log") -> dict[str, Any]:
    found, files, problems = read_union(daemon.messages.parent, stem)
    missing = sent - found.keys()
    extra = found.keys() - sent
    dupes = {rid: n for rid, n in found.items() if n > 1}
    summary = {
        "sent": len(sent),
        "found": sum(found.values()),
        "unique": len(found),
        "missing": len(missing),
        "duplicated": len(dupes),
        "unknown": len(extra),
        "partial_or_bad_lines": len(problems),
        "files": files,
    }
    print(f"\n{stem}: {summary | {'files': len(files)}}")
    assert not problems, problems[:5]
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:5]}; {summary}"
    assert not dupes, f"{len(dupes)} records duplicated, e.g. {sorted(dupes.items())[:5]}; {summary}"
    assert not extra, extra
    assert sum(found.values()) == len(sent)
    return summary


# -- logrotate -------------------------------------------------------------------------------------
def logrotate_config(tmp_path: Path, logs: Path, *, method: str, pid: int) -> Path:
    """The shipped snippet, pointed at this test's files: ``method`` "create" (+ HUP) or "copytruncate"."""
    text = SNIPPET.read_text()
    assert "/var/log/nio-logd/*.log {" in text
    text = text.replace("/var/log/nio-logd/*.log {", f"{logs}/*.log {{")
    post = re.compile(r"^(\s*)postrotate\n.*?^\s*endscript\n", re.M | re.S)
    assert post.search(text), "the snippet has no postrotate script"
    if method == "create":
        script = "{0}postrotate\n{0}    kill -HUP {1}\n{0}endscript\n"
        text = post.sub(lambda m: script.format(m.group(1), pid), text)
    else:
        assert re.search(r"^\s*create 0640$", text, re.M)
        text = re.sub(r"^(\s*)create 0640$", r"\1copytruncate", text, flags=re.M)
        text = post.sub("", text)
    conf = tmp_path / f"logrotate-{method}.conf"
    conf.write_text(text)
    return conf


def run_logrotate(tmp_path: Path, conf: Path) -> None:
    proc = subprocess.run(
        [LOGROTATE, "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr, (proc.returncode, proc.stderr)


def reopened(daemon: DaemonProcess) -> int:
    return sum(
        1 for ev in list(daemon.events) if ev.get("event") == "reopened" and ev.get("path") == str(daemon.messages)
    )


def start_daemon(daemon_factory: Any, tmp_path: Path, **log: Any) -> DaemonProcess:
    config = write_config(tmp_path, **{"log": log} if log else {})
    d: DaemonProcess = daemon_factory(config)
    return d


def stop_clean(daemon: DaemonProcess) -> None:
    assert daemon.stop() == 0, daemon.stderr_lines[-20:]
    assert not daemon.rejects.exists() or daemon.rejects.stat().st_size == 0, daemon.rejects.read_text()[:500]


# -- tests -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_snippet_is_valid_for_logrotate(tmp_path: Path) -> None:
    """The shipped snippet parses (logrotate -d exits 0 with no error) as it is."""
    proc = subprocess.run(
        [LOGROTATE, "-d", "-s", str(tmp_path / "state"), str(SNIPPET)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower(), proc.stderr
    assert "rotating pattern: /var/log/nio-logd/*.log" in proc.stderr


@pytest.mark.slow
@pytest.mark.both_shapes
def test_logrotate_create_and_hup_under_load(daemon_factory: Any, tmp_path: Path) -> None:
    """logrotate (create + postrotate kill -HUP, compress, delaycompress) 5 times under load: each record once."""
    daemon = start_daemon(daemon_factory, tmp_path)
    conf = logrotate_config(tmp_path, daemon.messages.parent, method="create", pid=daemon.pid)

    def rotate(k: int) -> None:
        # notifempty: the file must hold records for logrotate to rotate it (and send the HUP)
        wait_for(lambda: daemon.messages.stat().st_size > 0)
        run_logrotate(tmp_path, conf)
        # The next run compresses this run's file: it must no longer be written to by then.
        wait_for(lambda: reopened(daemon) >= k, timeout=30)

    sent = Load(daemon.tcp).run(rotate)
    stop_clean(daemon)
    summary = check_exactly_once(sent, daemon)
    assert reopened(daemon) == ROTATIONS
    assert any(name.endswith(".gz") for name in summary["files"])  # the rotations really happened
    assert len(summary["files"]) == ROTATIONS + 1


@pytest.mark.slow
@pytest.mark.both_shapes
def test_logrotate_copytruncate_under_load(daemon_factory: Any, tmp_path: Path) -> None:
    """logrotate copytruncate (no signal at all) 5 times under load: each record once, no partial line."""
    daemon = start_daemon(daemon_factory, tmp_path)
    conf = logrotate_config(tmp_path, daemon.messages.parent, method="copytruncate", pid=daemon.pid)

    def rotate(_k: int) -> None:
        wait_for(lambda: daemon.messages.stat().st_size > 0)  # notifempty
        run_logrotate(tmp_path, conf)

    sent = Load(daemon.tcp).run(rotate)
    stop_clean(daemon)
    summary = check_exactly_once(sent, daemon)
    assert len(summary["files"]) == ROTATIONS + 1
    recovered = [ev for ev in daemon.events if ev.get("event") == "truncated"]
    print(f"copytruncate: bytes written again after each truncation: {[ev['put_back_bytes'] for ev in recovered]}")


@pytest.mark.slow
@pytest.mark.both_shapes
def test_builtin_size_rotation_under_load(daemon_factory: Any, tmp_path: Path) -> None:
    """[log] rotate_bytes rotation in the writer under load: each record once, in rotate_keep files at most."""
    daemon = start_daemon(daemon_factory, tmp_path, rotate_bytes=500_000, rotate_keep=200)
    sent = Load(daemon.tcp).run(lambda _k: None)
    stop_clean(daemon)
    summary = check_exactly_once(sent, daemon)
    rotated = [ev for ev in daemon.events if ev.get("event") == "rotated"]
    assert len(summary["files"]) == len(rotated) + 1 >= 10
    for name in summary["files"]:
        size = (daemon.messages.parent / name).stat().st_size
        # a file is rotated after the write that takes it past rotate_bytes: one batch over at most
        assert size < 500_000 + (4 << 20), (name, size)


def test_builtin_rotation_drops_beyond_keep(daemon_factory: Any, tmp_path: Path) -> None:
    """rotate_keep bounds the rotated files: messages.log.1 .. .3 and nothing older."""
    daemon = start_daemon(daemon_factory, tmp_path, rotate_bytes=2_000, rotate_keep=3)
    with socket.create_connection(daemon.tcp) as sock:
        for i in range(200):
            sock.sendall(_line(0, i))
            if i % 20 == 19:
                time.sleep(0.02)  # several batches, so several rotations
    stop_clean(daemon)
    names = sorted(p.name for p in daemon.messages.parent.iterdir() if p.name.startswith("messages.log"))
    assert names == ["messages.log", "messages.log.1", "messages.log.2", "messages.log.3"], names
    found, _files, problems = read_union(daemon.messages.parent, "messages.log")
    assert not problems
    assert max(found.values()) == 1
    assert "s0-000199" in found  # the newest record is kept; the oldest files went


def test_hup_reopens_a_deleted_file(daemon_factory: Any, tmp_path: Path) -> None:
    """The file removed by hand comes back on SIGHUP, and records go to it."""
    daemon = start_daemon(daemon_factory, tmp_path)
    with socket.create_connection(daemon.tcp) as sock:
        sock.sendall(_line(0, 1))
    wait_for(lambda: daemon.messages.exists() and daemon.messages.stat().st_size > 0)
    os.unlink(daemon.messages)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: reopened(daemon) >= 1)
    with socket.create_connection(daemon.tcp) as sock:
        sock.sendall(_line(0, 2))
    stop_clean(daemon)
    found, _files, problems = read_union(daemon.messages.parent, "messages.log")
    assert not problems
    assert dict(found) == {"s0-000002": 1}


def _send(daemon: DaemonProcess, ids: range) -> None:
    with socket.create_connection(daemon.tcp) as sock:
        sock.sendall(b"".join(_line(0, i) for i in ids))


def _lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("noticed_at", ["next_write", "shutdown"])
def test_copytruncate_window_is_put_back(daemon_factory: Any, tmp_path: Path, noticed_at: str) -> None:
    """Lines written after logrotate's copy but before its truncation are written again, once; a copy
    that ends inside a line (read during a write) is cut back, and that line is written again whole."""
    daemon = start_daemon(daemon_factory, tmp_path)
    _send(daemon, range(100))
    wait_for(lambda: _lines_in(daemon.messages) == 100)
    data = daemon.messages.read_bytes()
    # The copy logrotate makes when it reads while the 91st line is half written: lines 91..100
    # reach the file after the copy ended, before the truncation.
    ninety = sum(len(line) + 1 for line in data.split(b"\n")[:90])
    (daemon.messages.parent / "messages.log.1").write_bytes(data[: ninety + 50])
    os.truncate(daemon.messages, 0)
    if noticed_at == "next_write":
        _send(daemon, range(100, 101))
        wait_for(lambda: _lines_in(daemon.messages) == 11)
    stop_clean(daemon)
    expected = {f"s0-{i:06d}" for i in range(101 if noticed_at == "next_write" else 100)}
    check_exactly_once(expected, daemon)
    assert _lines_in(daemon.messages.parent / "messages.log.1") == 90
    ev = daemon.event("truncated")
    assert ev is not None and ev["copy_partial_line_bytes"] == 50, ev
    assert ev["put_back_bytes"] == len(data) - ninety


def test_truncation_without_a_copy_puts_nothing_back(daemon_factory: Any, tmp_path: Path) -> None:
    """A file emptied by hand (no copy next to it) stays empty of the old lines: no duplicates."""
    daemon = start_daemon(daemon_factory, tmp_path)
    _send(daemon, range(50))
    wait_for(lambda: _lines_in(daemon.messages) == 50)
    os.truncate(daemon.messages, 0)
    _send(daemon, range(50, 52))
    wait_for(lambda: _lines_in(daemon.messages) == 2)
    stop_clean(daemon)
    found, _files, problems = read_union(daemon.messages.parent, "messages.log")
    assert not problems
    assert dict(found) == {"s0-000050": 1, "s0-000051": 1}
    ev = daemon.event("truncated")
    assert ev is not None and ev["copy"] is None and ev["put_back_bytes"] == 0, ev
