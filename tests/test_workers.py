"""Worker processes (``[server] workers``): real processes, real signals, real sockets.

The hub (the process ``run`` starts) owns the files; its children ``nio_logd.service.worker``
serve the sockets. Each test starts real daemons and stops every process by pid.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, record, wait_for, write_config
from faultkit import AckedSender, children, healthz, logged_ids, make_line, metric, rss_kib, scrape

from nio_logd.errors import ClientError
from nio_logd.service import ipc
from nio_logd.tools.client import send


def _workers(pid: int) -> list[int]:
    out = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"nio_logd.service.worker" in cmdline:
            out.append(child)
    return out


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie of a dead parent is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _config(tmp_path: Path, workers: int = 2, **sections: dict[str, Any]) -> tuple[Path, int, str]:
    port = free_port()
    metrics = f"127.0.0.1:{free_port()}"
    sections.setdefault("server", {})["workers"] = workers
    sections.setdefault("metrics", {})["address"] = f"tcp://{metrics}"
    cfg = write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{port}", "ack": True}], **sections)
    return cfg, port, metrics


def test_workers_serve_and_the_hub_writes_every_record(tmp_path: Path, daemon_factory: Any) -> None:
    """workers = 2: two worker processes, the records of 40 connections all in the one log, counted
    once in the summed metrics; both workers got connections (SO_REUSEPORT spreads them)."""
    cfg, port, metrics = _config(tmp_path)
    d = daemon_factory(cfg)
    pids = _workers(d.pid)
    assert len(pids) == 2, pids
    started = d.event("workers_started")
    assert started is not None and sorted(started["pids"]) == sorted(pids)
    for c in range(40):
        result = send(d.address, [make_line(c, i) for i in range(50)], ack=True)
        assert result.acked == 50
    ids = logged_ids(d.messages)
    assert sorted(ids) == sorted(f"c{c}-{i}" for c in range(40) for i in range(50))
    samples = scrape(metrics)
    assert metric(samples, "nio_logd_records_accepted_total") == 2000
    assert metric(samples, "nio_logd_connections_total") == 40
    assert metric(samples, "nio_logd_records_written_total") == 2000
    status, body = healthz(metrics)
    assert status == 200, body
    assert d.stop() == 0
    assert all(_gone(p) for p in pids)


def _connections_per_worker(pids: list[int], port: int) -> dict[int, int]:
    """How many established connections on ``port`` each worker process holds (from /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    counts: collections.Counter[int] = collections.Counter()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
            counts[inodes[fields[9]]] += 1
    return dict(counts)


def test_connections_are_spread_over_the_workers(tmp_path: Path, daemon_factory: Any) -> None:
    cfg, port, _metrics = _config(tmp_path)
    d = daemon_factory(cfg)
    pids = _workers(d.pid)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
    try:
        wait_for(lambda: sum(_connections_per_worker(pids, port).values()) == 64, 10)
        per_worker = _connections_per_worker(pids, port)
    finally:
        for s in socks:
            s.close()
    assert len(per_worker) == 2 and min(per_worker.values()) >= 8, per_worker
    d.stop()


@pytest.mark.slow
def test_kill_9_of_a_worker_under_acked_load_loses_no_acked_record_and_it_comes_back(
    tmp_path: Path, daemon_factory: Any
) -> None:
    """4 clients stream 30,000 acked records each; one worker is SIGKILLed at about a third: the
    hub logs it, starts a new one, the clients resend what was not acked (reconnecting to the same
    address), and every record is in the log; the counters do not go back; health is ok again."""
    cfg, _port, metrics = _config(tmp_path)
    d = daemon_factory(cfg)
    clients, records = 4, 30_000
    senders = [
        AckedSender(d.address, [make_line(c, i) for i in range(records)], retries=30, timeout=60)
        for c in range(clients)
    ]
    for s in senders:
        s.start()
    wait_for(lambda: d.messages.exists() and d.messages.stat().st_size > 0, 60)
    line_len = len(d.messages.read_bytes().split(b"\n", 1)[0]) + 1
    wait_for(lambda: d.messages.stat().st_size >= line_len * clients * records // 3, 120, 0.01)
    victim = _workers(d.pid)[0]
    before = metric(scrape(metrics), "nio_logd_records_accepted_total")
    os.kill(victim, signal.SIGKILL)
    assert any(s.is_alive() for s in senders), "the clients finished before the kill: nothing was tested"
    for s in senders:
        s.join(300)
    errors = [s.error for s in senders if s.error is not None]
    assert not errors, errors
    results = [s.result for s in senders]
    assert all(r is not None and r.acked == records for r in results), results
    wait_for(lambda: d.event("worker_restarted") is not None, 30)
    died = d.event("worker_died")
    assert died is not None and died["pid"] == victim and died["how"] == "killed by SIGKILL", died
    now = _workers(d.pid)
    assert len(now) == 2 and victim not in now, now
    wait_for(lambda: healthz(metrics)[0] == 200, 10)
    assert metric(scrape(metrics), "nio_logd_records_accepted_total") >= before
    assert d.stop() == 0
    counts = collections.Counter(logged_ids(d.messages))
    missing = [f"c{c}-{i}" for c in range(clients) for i in range(records) if f"c{c}-{i}" not in counts]
    assert not missing, f"{len(missing)} acknowledged records missing, e.g. {missing[:5]}"
    resent = sum(r.resent for r in results if r is not None)
    assert sum(n - 1 for n in counts.values()) <= resent  # a duplicate only from a resend


class _RawAckedClient(threading.Thread):
    """Streams ``total`` records on one connection and counts the ``ok`` answers it reads back."""

    def __init__(self, address: tuple[str, int], total: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(address)
        self.sock.settimeout(20)
        self.total = total
        self.acked = 0
        self.ended = threading.Event()
        self._writer = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        try:
            for start in range(0, self.total, 1000):
                self.sock.sendall(b"".join(make_line(0, i) + b"\n" for i in range(start, start + 1000)))
        except OSError:
            pass

    def run(self) -> None:
        self._writer.start()
        buf = b""
        try:
            while chunk := self.sock.recv(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                self.acked += sum(1 for line in lines if b'"ok":true' in line)
        except OSError:
            pass
        self.ended.set()


def test_kill_9_of_the_hub_ends_the_workers_and_loses_no_acked_record(tmp_path: Path, daemon_factory: Any) -> None:
    """The hub (the process owning the files) SIGKILLed mid-stream: its workers see the channel
    close and exit at once (no orphan serves the port); every record acked before is in the log."""
    cfg, port, _metrics = _config(tmp_path)
    d = daemon_factory(cfg)
    pids = _workers(d.pid)
    client = _RawAckedClient(("127.0.0.1", port), 300_000)
    client.start()
    wait_for(lambda: d.messages.exists() and d.messages.stat().st_size > 2_000_000, 60, 0.005)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    wait_for(lambda: all(_gone(p) for p in pids), 15)
    assert client.ended.wait(30)
    client.sock.close()
    acked = client.acked
    assert 0 < acked < 300_000, acked
    logged = [line["send_msg"].rstrip(".") for line in read_lines(d.messages, writing=True)]  # kill -9 may cut a line
    assert {f"c0-{i}" for i in range(acked)} <= set(logged), "an acked record is missing"
    print(f"\nFIGURE hub killed: {acked} acked, {len(logged)} in the log")
    with pytest.raises(OSError):  # nobody serves the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_sigterm_drains_every_worker_then_exits_0(tmp_path: Path, daemon_factory: Any) -> None:
    """SIGTERM to the hub while 8 un-acked clients have sent records: every worker drains what
    it was sent, the hub writes it, the workers and then the hub exit 0."""
    port = free_port()
    cfg = write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{port}"}], server={"workers": 2})
    d = daemon_factory(cfg)
    pids = _workers(d.pid)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    for c, s in enumerate(socks):
        s.sendall(b"".join(make_line(c, i) + b"\n" for i in range(2000)))
    d.signal(signal.SIGTERM)
    for s in socks:
        s.close()
    assert d.proc.wait(30) == 0, d.stderr_lines[-20:]
    assert all(_gone(p) for p in pids)
    assert len(logged_ids(d.messages)) == 16_000
    stopped = d.event("stopped")
    assert stopped is not None and stopped["clean"] is True and stopped["written"] == 16_000


def test_sighup_reaches_the_workers(tmp_path: Path, daemon_factory: Any) -> None:
    """A reloaded record rule is applied by every worker: after SIGHUP lowering max_msg_chars, a
    long message is refused on every connection (whichever worker it reaches)."""
    port = free_port()
    listeners = [{"address": f"tcp://127.0.0.1:{port}", "ack": True}]
    cfg = write_config(tmp_path, listeners=listeners, server={"workers": 2})
    d = daemon_factory(cfg)
    long_msg = record(msg="x" * 100)
    assert send(d.address, [long_msg], ack=True).acked == 1
    write_config(tmp_path, listeners=listeners, server={"workers": 2}, record={"max_msg_chars": 50})
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.event("reloaded") is not None, 10)
    time.sleep(0.3)  # the workers apply it between two passes
    results = [send(d.address, [long_msg], ack=True) for _ in range(20)]
    assert all(len(r.refused) == 1 and r.acked == 0 for r in results), results
    d.stop()
    assert len(read_lines(d.messages)) == 1
    assert len(read_lines(d.rejects)) == 20


def test_a_stopped_hub_makes_the_workers_stop_reading_not_buffer(tmp_path: Path, daemon_factory: Any) -> None:
    """Credit backpressure: with the hub stopped (SIGSTOP) nothing is written; the workers stop
    reading once their credit is used up, so a client pushing 200 MB gets stuck and the daemon's
    memory stays bounded; after SIGCONT everything sent is written."""
    port = free_port()
    cfg = write_config(
        tmp_path,
        listeners=[{"address": f"tcp://127.0.0.1:{port}"}],
        server={"workers": 2},
        limits={"queue_bytes": 4 << 20},
    )
    d = daemon_factory(cfg)
    baseline = rss_kib(d.pid)
    d.signal(signal.SIGSTOP)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(3.0)
    chunk = b"".join(make_line(0, i, pad=200) + b"\n" for i in range(4000))  # about 1 MB
    sent = 0
    try:
        for _ in range(200):
            sock.sendall(chunk)
            sent += 1
    except TimeoutError:
        pass
    peak = rss_kib(d.pid)
    d.signal(signal.SIGCONT)
    assert sent < 200, "200 MB went in with the hub stopped: nobody stopped reading"
    print(f"\nFIGURE hub stopped: {sent} MB accepted by the kernel and the workers, RSS {baseline} -> {peak} KiB")
    assert peak - baseline < 100 * 1024, (baseline, peak)
    sock.close()
    wait_for(lambda: d.messages.exists() and d.messages.read_bytes().count(b"\n") >= sent * 4000, 60)
    d.stop()


@pytest.mark.parametrize(
    ("kind", "identity"),
    [("boot", b"\0" * 32), ("settings", None)],
    ids=["other-code-identity", "first-message-of-an-older-hub"],
)
def test_a_worker_started_by_other_code_refuses_with_a_clear_error(kind: str, identity: bytes | None) -> None:
    """A worker is a fresh interpreter: after an upgrade on disk under a running daemon it would
    run other code than its hub (pickled messages, the shared counts' layout). Started by a hub
    whose code identity differs, or by one that sends the older first message, it exits 3 and
    says why, before unpickling anything."""

    hub, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nio_logd.service.worker", str(worker.fileno())],
        pass_fds=[worker.fileno()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    worker.close()
    try:
        payload = b"not a pickle"
        if kind == "boot":
            assert identity is not None and identity != ipc.code_identity()
            hub.sendall(ipc.message(ipc.BOOT, identity + payload))
        else:
            hub.sendall(ipc.message(ipc.SETTINGS, payload))
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        hub.close()
    assert proc.returncode == 3
    text = err.decode()
    assert "runs other code" in text and "restart the daemon" in text, text
    assert "Traceback" not in text, text


def test_code_identity_is_the_packages_source() -> None:
    """The identity is a digest of the package's Python files: the same in a fresh interpreter,
    another for other source (a copy of the package with one file changed)."""

    here = ipc.code_identity()
    probe = "import sys; from nio_logd.service import ipc; sys.stdout.write(ipc.code_identity().hex())"
    again = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60, check=True)
    assert again.stdout.decode() == here.hex()
    package = Path(ipc.__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "nio_logd"
        shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
        (copy / "records" / "pipeline.py").write_text((copy / "records" / "pipeline.py").read_text() + "\n# changed\n")
        other = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            timeout=60,
            check=True,
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": tmp},
        )
    assert other.stdout.decode() != here.hex()
    assert len(here) == 32


def test_a_worker_restarted_after_the_code_changed_on_disk_refuses_and_is_reported(
    tmp_path: Path, daemon_factory: Any
) -> None:
    """The daemon runs from a copy of the package; the copy is changed on disk (an upgrade) and a
    worker is SIGKILLed: the worker the hub starts in its place finds other code than its hub's,
    exits 3 saying to restart the daemon, and the hub reports that as a worker death (health not
    ok) instead of running a mismatched worker; SIGTERM stops the daemon, which exits 1."""
    package = Path(ipc.__file__).resolve().parents[1]
    site = tmp_path / "site"
    shutil.copytree(package, site / "nio_logd", ignore=shutil.ignore_patterns("__pycache__"))
    cfg, _port, metrics = _config(tmp_path)
    d = daemon_factory(cfg, env={"PYTHONPATH": str(site)})
    workers = _workers(d.pid)
    assert len(workers) == 2, workers
    changed = site / "nio_logd" / "records" / "pipeline.py"
    changed.write_text(changed.read_text() + "\n# the upgrade\n")
    os.kill(workers[0], signal.SIGKILL)

    def refused() -> dict[str, Any] | None:
        return next(
            (e for e in list(d.events) if e.get("event") == "worker_died" and e.get("how") == "exit code 3"),
            None,
        )

    wait_for(lambda: refused() is not None, 60)
    assert any("runs other code" in line and "restart the daemon" in line for line in d.stderr_lines), d.stderr_lines
    assert not any("Traceback" in line for line in d.stderr_lines)
    assert healthz(metrics)[0] != 200
    # SIGTERM stops it, and the exit code says that it did not run clean (a worker was missing).
    assert d.stop() == 1
    stopped = d.event("stopped")
    assert stopped is not None and stopped["clean"] is False, stopped


def test_the_per_client_limit_holds_across_the_workers_and_gives_back_what_closes(
    tmp_path: Path, daemon_factory: Any
) -> None:
    """workers = 2, max_connections_per_client = 3: 60 one-record clients one after another are
    all served (each close comes off the shared counts, whichever worker held it); 3 held open,
    wherever they landed, make a 4th refused; once they close, a client is served again."""
    cfg, port, metrics = _config(tmp_path, limits={"max_connections_per_client": 3})
    d = daemon_factory(cfg)
    for i in range(60):
        result = send(d.address, [make_line(0, i)], ack=True)
        assert result.acked == 1, (i, result)
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        wait_for(lambda: metric(scrape(metrics), "nio_logd_connections_open") == 3, 10)
        fourth = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            fourth.sendall(make_line(1, 0) + b"\n")
            assert fourth.recv(1) == b""  # closed at once: the limit counts both workers' clients
        except ConnectionResetError:
            pass  # closed with our line unread: refused all the same
        finally:
            fourth.close()
        refused = metric(scrape(metrics), "nio_logd_connections_refused_total", reason="max_connections_per_client")
        assert refused == 1
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: metric(scrape(metrics), "nio_logd_connections_open") == 0, 10)

    def served_again() -> bool:
        try:
            return send(d.address, [make_line(2, 0)], ack=True).acked == 1
        except (OSError, ClientError):
            return False  # refused: the closes of the held three are still on their way off

    wait_for(served_again, 10)
    assert sorted(logged_ids(d.messages)) == sorted([f"c0-{i}" for i in range(60)] + ["c2-0"])
    assert d.stop() == 0
