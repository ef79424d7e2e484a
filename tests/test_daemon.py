"""The classic daemon (`nio-logd start | stop | status | reload`) and the daemon's signals.

Every test runs the real command line in subprocesses; the daemon really detaches, writes its
pidfile, and gets real signals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, free_port, read_lines, record, wait_for, write_config

from nio_logd.config import load_file
from nio_logd.service.daemonize import events_path
from nio_logd.service.pidfile import is_alive

CTL_TIMEOUT = 60


class Ctl:
    """`nio-logd COMMAND --config CONFIG` for one config, and the daemon it starts."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.reload_settings()

    def reload_settings(self) -> None:
        settings = load_file(self.config)
        self.settings = settings
        self.pidfile = settings.resolve(settings.daemon.pidfile)
        self.messages = settings.resolve(settings.log.path)
        self.rejects = settings.resolve(settings.log.rejects_path)
        self.events_file = events_path(settings)
        self.port = settings.listeners[0].parsed.port

    def __call__(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nio_logd", command, "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=CTL_TIMEOUT,
            cwd=self.config.parent,
            check=False,
        )

    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def events(self) -> list[dict[str, Any]]:
        out = []
        if self.events_file.exists():
            for line in self.events_file.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def event(self, name: str, after: int = 0) -> dict[str, Any] | None:
        for ev in self.events()[after:]:
            if ev.get("event") == name:
                return ev
        return None

    def send(self, *records: bytes) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"\n".join(records) + b"\n")

    def written(self) -> list[dict[str, Any]]:
        return read_lines(self.messages)


@pytest.fixture
def ctl_factory() -> Iterator[Any]:
    """Make a Ctl; every daemon its pidfile names at the end of the test is killed."""
    made: list[Ctl] = []

    def make(config: Path) -> Ctl:
        c = Ctl(config)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            pid = c.pid()
        except (OSError, ValueError):
            continue
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    sections.setdefault("daemon", {}).setdefault("pidfile", "run/nio-logd.pid")
    return write_config(tmp_path, **sections)


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def test_start_status_reload_stop_lifecycle(tmp_path: Path, ctl_factory: Any) -> None:
    """start detaches and returns once it listens; status/reload/stop work on the pid it wrote."""
    ctl = ctl_factory(_config(tmp_path))
    started = ctl("start")
    assert started.returncode == 0, started.stderr
    assert "started" in started.stdout
    # The pidfile exists with the pid of a live, detached nio-logd.
    pid = ctl.pid()
    assert str(pid) in started.stdout
    assert is_alive(pid)
    assert b"nio_logd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert os.getsid(pid) != os.getsid(0), "the daemon must be in its own session"
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert Path(os.readlink(f"/proc/{pid}/fd/2")) == ctl.events_file
    assert proc_status(pid)["Umask"] == "0027"
    # It listens as soon as start has returned: no wait before the first connection.
    ctl.send(record("alice", "one"), record("bob", "two"))
    wait_for(lambda: len(ctl.written()) == 2)
    assert [r["send_msg"] for r in ctl.written()] == ["one", "two"]

    status = ctl("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert str(pid) in status.stdout

    # reload = SIGHUP: the file logrotate renamed is left alone and a new one is created.
    ctl.messages.rename(ctl.messages.with_name("messages.log.1"))
    reloaded = ctl("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    wait_for(ctl.messages.exists)
    ctl.send(record("carol", "three"))
    wait_for(lambda: len(ctl.written()) == 1)
    assert ctl.written()[0]["send_msg"] == "three"
    assert len(read_lines(ctl.messages.with_name("messages.log.1"))) == 2

    stopped = ctl("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not is_alive(pid)
    assert not ctl.pidfile.exists()
    status = ctl("status")
    assert status.returncode == 3
    assert "not running" in status.stdout
    assert ctl.event("daemon_exited")["code"] == 0
    # stop and reload when nothing runs: stop succeeds (LSB), reload says "not running" with 3.
    assert ctl("stop").returncode == 0
    again = ctl("reload")
    assert again.returncode == 3
    assert "not running" in again.stderr


def test_second_start_is_refused(tmp_path: Path, ctl_factory: Any) -> None:
    """A second start while the daemon runs fails, names the pid, and leaves the first alone."""
    ctl = ctl_factory(_config(tmp_path))
    assert ctl("start").returncode == 0
    pid = ctl.pid()
    second = ctl("start")
    assert second.returncode != 0
    assert "already running" in second.stderr
    assert str(pid) in second.stderr
    assert ctl.pid() == pid
    assert is_alive(pid)
    ctl.send(record(msg="still serving"))
    wait_for(lambda: len(ctl.written()) == 1)
    assert ctl("stop").returncode == 0


def test_start_on_busy_port_fails_with_the_reason(tmp_path: Path, ctl_factory: Any) -> None:
    """start exits non-zero with the bind error when the port is taken, and leaves nothing behind."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        ctl = ctl_factory(_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{port}"}]))
        result = ctl("start")
    assert result.returncode == 69, result.stdout + result.stderr
    assert f"tcp://127.0.0.1:{port}" in result.stderr
    assert "Address already in use" in result.stderr
    assert not ctl.pidfile.exists() or not ctl.pidfile.read_text().strip()
    assert ctl("status").returncode == 3
    assert ctl.event("start_failed") is not None


def _make_unwritable(folder: Path) -> bool:
    """Make ``folder`` unwritable even for root (immutable) or by mode; False if impossible."""
    if os.geteuid() == 0:
        return subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode == 0
    folder.chmod(0o500)
    return True


def test_start_with_unwritable_log_folder_fails_with_the_reason(tmp_path: Path, ctl_factory: Any) -> None:
    """A log folder the daemon cannot write: start exits non-zero naming the file and the error."""
    logs = tmp_path / "logs"
    logs.mkdir()
    # Events elsewhere, so that the failure is the daemon's own, reported through the readiness pipe.
    ctl = ctl_factory(_config(tmp_path, daemon={"events_file": "events.log"}))
    if not _make_unwritable(logs):
        pytest.skip("running as root and `chattr +i` is not possible here: root writes any folder")
    try:
        result = ctl("start")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(logs)], check=True)
        else:
            logs.chmod(0o755)
    assert result.returncode == 69, result.stdout + result.stderr
    assert f"cannot open log file {logs / 'messages.log'}" in result.stderr
    assert "not permitted" in result.stderr or "Permission denied" in result.stderr
    assert ctl("status").returncode == 3


def test_start_with_a_log_path_under_a_file_fails(tmp_path: Path, ctl_factory: Any) -> None:
    """A log folder that cannot be created (a file is in the way) is reported before detaching."""
    (tmp_path / "logs").write_text("not a folder\n")
    ctl = ctl_factory(_config(tmp_path))
    result = ctl("start")
    assert result.returncode == 69
    assert f"cannot create folder {tmp_path / 'logs'}" in result.stderr or "Not a directory" in result.stderr


def test_start_with_bad_config_fails_naming_the_key(tmp_path: Path, ctl_factory: Any) -> None:
    config = _config(tmp_path)
    ctl = ctl_factory(config)
    config.write_text(config.read_text() + "[limits]\nidle_timeot = 3.0\n")
    result = ctl("start")
    assert result.returncode == 78
    assert "limits.idle_timeot: unknown key" in result.stderr
    assert not ctl.pidfile.exists()


def test_stale_pidfile_is_detected_and_replaced(tmp_path: Path, ctl_factory: Any) -> None:
    """A pidfile naming a dead process (or a live process that is not nio-logd) is stale."""
    ctl = ctl_factory(_config(tmp_path))
    ctl.pidfile.parent.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    ctl.pidfile.write_text(f"{dead.pid}\n")
    status = ctl("status")
    assert status.returncode == 3
    assert "stale" in status.stdout
    started = ctl("start")
    assert started.returncode == 0, started.stderr
    assert "stale" in started.stderr
    pid = ctl.pid()
    assert pid != dead.pid
    assert is_alive(pid)
    assert ctl("stop").returncode == 0

    # A reused pid: a live process, but not nio-logd.
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            ctl.pidfile.write_text(f"{other.pid}\n")
            assert ctl("status").returncode == 3
            started = ctl("start")
            assert started.returncode == 0, started.stderr
            assert ctl.pid() != other.pid
            assert ctl("stop").returncode == 0
            assert other.poll() is None, "stop must not signal a process that is not nio-logd"
        finally:
            other.kill()


def test_pidfile_is_written_atomically_and_only_our_pid_is_removed(tmp_path: Path) -> None:
    from nio_logd.service.pidfile import PidFile

    pf = PidFile(tmp_path / "x.pid")
    pf.write(12345)
    assert pf.path.read_text() == "12345\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pid"], "no temporary file left behind"
    assert not pf.remove_if_ours(54321)
    assert pf.path.exists()
    assert pf.remove_if_ours(12345)
    assert not pf.path.exists()


def test_sigterm_during_a_stream_writes_everything_received(tmp_path: Path, ctl_factory: Any) -> None:
    """Records a client has sent before the stop are written, even if the daemon had not read them."""
    ctl = ctl_factory(_config(tmp_path))
    assert ctl("start").returncode == 0
    count = 30_000
    payload = b"".join(record("streamer", f"m{i}") + b"\n" for i in range(count))
    pid = ctl.pid()
    with socket.create_connection(("127.0.0.1", ctl.port), timeout=30) as s:
        s.sendall(payload)  # all of it is in the daemon's socket buffer or already read
        os.kill(pid, signal.SIGTERM)  # while the connection is still open, mid-stream
        wait_for(lambda: not is_alive(pid), timeout=60)
    written = ctl.written()
    assert len(written) == count
    assert [r["send_msg"] for r in written] == [f"m{i}" for i in range(count)]
    ev = ctl.event("stopped")
    assert ev is not None
    assert ev["clean"] is True
    assert ctl.event("daemon_exited")["code"] == 0
    assert not ctl.pidfile.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_forces_the_end(tmp_path: Path, daemon_factory: Any, signum: int) -> None:
    """A drain that cannot finish (a client that never reads its acks) ends at the second signal."""
    port = free_port()
    config = write_config(
        tmp_path,
        listeners=[{"address": f"tcp://127.0.0.1:{port}", "ack": True}],
        server={"shutdown_timeout": 3600.0},
        limits={"refused_close_after": 0},  # the stalling client sends only refused records
    )
    d: DaemonProcess = daemon_factory(config)
    s = _stall_a_drain(port)
    try:
        d.signal(signum)
        wait_for(lambda: d.event("stopping"))
        time.sleep(1.0)
        assert d.proc.poll() is None, "the drain should still be waiting for the client to read"
        d.signal(signum)
        code = d.proc.wait(60)  # far less than shutdown_timeout: the second signal forced the end
    finally:
        s.close()
    assert code == 1, "a forced stop is not a clean one"
    ev = d.event("stopped")
    assert ev is not None
    assert ev["clean"] is False


def test_sighup_applies_hot_settings_and_names_those_needing_restart(tmp_path: Path, ctl_factory: Any) -> None:
    """SIGHUP re-reads the config: a new max_msg_chars applies to new records; listeners do not."""
    config = _config(tmp_path, record={"max_msg_chars": 100})
    ctl = ctl_factory(config)
    assert ctl("start").returncode == 0
    ctl.send(record(msg="x" * 50))
    wait_for(lambda: len(ctl.written()) == 1)

    # The events file is reopened too (logrotate renamed it).
    ctl.events_file.rename(ctl.events_file.with_name("events.old"))
    text = config.read_text()
    text = text.replace("max_msg_chars = 100", "max_msg_chars = 10")
    text += "[server]\nio_threads = 2\n"
    config.write_text(text)
    assert ctl("reload").returncode == 0
    reloaded = wait_for(lambda: ctl.event("reloaded"))
    assert reloaded["applied"] == {"record.max_msg_chars": 10}
    restart = ctl.event("reload_needs_restart")
    assert restart is not None
    assert restart["keys"] == ["server.io_threads"]

    ctl.send(record(msg="y" * 50), record(msg="short"))
    wait_for(lambda: len(ctl.written()) == 2 and len(read_lines(ctl.rejects)) == 1)
    assert ctl.written()[1]["send_msg"] == "short"
    reject = read_lines(ctl.rejects)[0]
    assert "send_msg" in reject["error"]

    # A broken file: `reload` says so and sends nothing; a SIGHUP anyway keeps the running settings.
    before = len(ctl.events())
    pid = ctl.pid()
    config.write_text(text + "this is not toml\n")
    refused = ctl("reload")
    assert refused.returncode == 78
    assert "invalid TOML" in refused.stderr
    os.kill(pid, signal.SIGHUP)
    failed = wait_for(lambda: ctl.event("reload_failed", after=before))
    assert "invalid TOML" in failed["error"]
    ctl.send(record(msg="z" * 50), record(msg="ok"))
    wait_for(lambda: len(ctl.written()) == 3 and len(read_lines(ctl.rejects)) == 2)
    config.write_text(text)  # stop, too, needs a valid config to find the pidfile
    assert ctl("stop").returncode == 0


def test_sighup_on_run_rereads_limits(tmp_path: Path, daemon_factory: Any) -> None:
    """`run` too: SIGHUP makes a new idle_timeout and max_user_chars apply."""
    config = write_config(tmp_path, limits={"idle_timeout": 3600.0})
    d: DaemonProcess = daemon_factory(config)
    config.write_text(
        config.read_text().replace("idle_timeout = 3600.0", "idle_timeout = 0.5") + "[record]\nmax_user_chars = 3\n"
    )
    d.signal(signal.SIGHUP)
    ev = wait_for(lambda: d.event("reloaded"))
    assert ev["applied"] == {"limits.idle_timeout": 0.5, "record.max_user_chars": 3}
    with socket.create_connection(d.tcp, timeout=10) as s:
        s.sendall(record(user="abcd") + b"\n" + record(user="abc") + b"\n")
        s.settimeout(30)
        assert s.recv(100) == b"", "the idle connection is closed by the new idle_timeout"
    wait_for(lambda: len(read_lines(d.messages)) == 1 and len(read_lines(d.rejects)) == 1)
    assert d.stop() == 0


def test_config_writable_by_others_is_refused_by_start(tmp_path: Path, ctl_factory: Any) -> None:
    """start refuses a group- or world-writable config file, saying why and how to fix it."""
    config = _config(tmp_path)
    ctl = ctl_factory(config)
    for mode, who in ((0o666, "its group and other users"), (0o602, "other users"), (0o620, "its group")):
        config.chmod(mode)
        result = ctl("start")
        assert result.returncode == 78, result.stderr
        assert f"writable by {who}" in result.stderr
        assert f"chmod go-w {config}" in result.stderr
        assert not ctl.pidfile.exists()
    config.chmod(0o644)
    tmp_path.chmod(0o777)
    try:
        result = ctl("start")
    finally:
        tmp_path.chmod(0o700)
    assert result.returncode == 78
    assert f"folder {tmp_path} is writable by its group and other users" in result.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o644


def _stall_a_drain(port: int) -> socket.socket:
    """A client that sends refused records (each nack larger than the record) and never reads:
    the daemon stops reading it once its unsent answers pile up, and a drain cannot finish."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    bad = (
        json.dumps({"send_user": "u", "send_time": "2026-11-29 12:00:00", "send_msg": "m", "k" * 4000: 1}).encode()
        + b"\n"
    )
    stalled_since: float | None = None
    while True:
        try:
            s.send(bad)
            stalled_since = None
        except BlockingIOError:
            if stalled_since is None:
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since > 1.0:
                return s
            time.sleep(0.05)


def test_stop_times_out_then_a_second_stop_forces(tmp_path: Path, ctl_factory: Any) -> None:
    """stop --timeout fails (non-zero, the pid named) if the daemon is still draining; stop again
    sends the second SIGTERM, which forces the end."""
    port = free_port()
    config = _config(
        tmp_path,
        listeners=[{"address": f"tcp://127.0.0.1:{port}", "ack": True}],
        server={"shutdown_timeout": 3600.0},
        limits={"refused_close_after": 0},
    )  # the stalling client sends only refused records
    ctl = ctl_factory(config)
    assert ctl("start").returncode == 0
    pid = ctl.pid()
    s = _stall_a_drain(port)
    try:
        first = ctl("stop", "--timeout", "2")
        assert first.returncode == 1
        assert f"pid {pid} is still running 2 s after SIGTERM" in first.stderr
        assert is_alive(pid)
        assert ctl("status").returncode == 0
        second = ctl("stop")
        assert second.returncode == 0, second.stderr
    finally:
        s.close()
    assert not is_alive(pid)
    assert ctl.event("stopped")["clean"] is False
    assert ctl.event("daemon_exited")["code"] == 1
    assert not ctl.pidfile.exists()
