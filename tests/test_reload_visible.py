"""A reload's outcome reaches its caller; SIGUSR1 only reopens; status/start see a `run` daemon.

Real daemons only (`nio-logd run` and `nio-logd start`), real signals, real command lines. Every
wait is bounded; every daemon started here is killed by its pid at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, read_lines, record, wait_for, write_config

from nio_logd.config import load_file
from nio_logd.service.daemonize import events_path
from nio_logd.service.pidfile import is_alive

CTL_TIMEOUT = 60


def nio(config: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", command, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT,
        cwd=config.parent,
        check=False,
    )


def send(port: int, *records: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\n".join(records) + b"\n")


def events_of(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end of the test (whatever happened)."""
    started: list[int] = []
    yield started
    for pid in started:
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runs() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.kill()


def _config(tmp_path: Path) -> Path:
    return write_config(tmp_path, record={"max_msg_chars": 10}, daemon={"pidfile": "run/nio-logd.pid"})


def _run(config: Path, runs: list[DaemonProcess]) -> DaemonProcess:
    d = DaemonProcess(config)
    runs.append(d)
    return d.wait_ready()


def test_run_reload_good_config_exits_0_and_applies(tmp_path: Path, runs: list[DaemonProcess]) -> None:
    """`nio-logd reload` against `run`: exit 0 with "reloaded" once the daemon has applied it."""
    config = _config(tmp_path)
    d = _run(config, runs)
    config.write_text(config.read_text().replace("max_msg_chars = 10", "max_msg_chars = 20"))
    result = nio(config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reloaded" in result.stdout
    assert str(d.pid) in result.stdout
    # Applied by the time reload returned: no wait.
    assert d.event("reloaded") is not None and d.event("reloaded")["applied"] == {"record.max_msg_chars": 20}
    send(d.tcp[1], record(msg="x" * 15))
    wait_for(lambda: len(read_lines(d.messages, writing=True)) == 1, timeout=10)
    assert d.stop() == 0


def test_run_reload_broken_config_fails_and_keeps_settings(tmp_path: Path, runs: list[DaemonProcess]) -> None:
    """A broken config: `nio-logd reload` exits 78 naming the error; a SIGHUP anyway (an old logrotate
    snippet) is refused by the daemon at error level, and the old rules keep applying."""
    config = _config(tmp_path)
    d = _run(config, runs)
    good = config.read_text()
    config.write_text(good.replace("max_msg_chars = 10", "max_msg_chars = 20") + "this is not toml\n")
    result = nio(config, "reload")
    assert result.returncode == 78, result.stdout + result.stderr
    assert "invalid TOML" in result.stderr
    d.signal(signal.SIGHUP)
    failed = wait_for(lambda: d.event("reload_failed"), timeout=10)
    assert failed["level"] == "error"
    assert "invalid TOML" in failed["error"]
    assert d.proc.poll() is None
    # Old rules: max_msg_chars = 10 still, so 15 chars are refused and 5 accepted.
    send(d.tcp[1], record(msg="y" * 15), record(msg="short"))
    wait_for(lambda: len(read_lines(d.messages, writing=True)) == 1, timeout=10)
    wait_for(lambda: len(read_lines(d.rejects, writing=True)) == 1, timeout=10)
    assert read_lines(d.messages)[0]["send_msg"] == "short"
    config.write_text(good)
    assert d.stop() == 0


def test_start_reload_failure_reported_by_the_daemon(tmp_path: Path, pids: list[int]) -> None:
    """The classic daemon refuses a config on reload that the CLI could read (writable by others):
    `nio-logd reload` exits 78 with the daemon's own reason; the daemon keeps serving."""
    config = _config(tmp_path)
    config.chmod(0o600)
    started = nio(config, "start")
    assert started.returncode == 0, started.stderr
    settings = load_file(config)
    pid = int(settings.resolve(settings.daemon.pidfile).read_text())
    pids.append(pid)
    events = events_path(settings)
    config.write_text(config.read_text().replace("max_msg_chars = 10", "max_msg_chars = 20"))
    config.chmod(0o666)
    result = nio(config, "reload")
    assert result.returncode == 78, result.stdout + result.stderr
    assert "refusing a config file writable by" in result.stderr
    assert str(pid) in result.stderr
    failed = [e for e in events_of(events) if e.get("event") == "reload_failed"]
    assert failed and failed[-1]["level"] == "error"
    assert is_alive(pid)
    port = settings.listeners[0].parsed.port
    send(port, record(msg="z" * 15), record(msg="ok"))
    messages = settings.resolve(settings.log.path)
    wait_for(lambda: len(read_lines(messages, writing=True)) == 1, timeout=10)
    assert read_lines(messages)[0]["send_msg"] == "ok"
    config.chmod(0o600)
    good = nio(config, "reload")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "reloaded" in good.stdout
    assert nio(config, "stop").returncode == 0


def test_sigusr1_reopens_without_rereading_the_config(tmp_path: Path, runs: list[DaemonProcess]) -> None:
    """SIGUSR1 (logrotate's postrotate): a new log file after the rename; the config, broken
    meanwhile, is not read (no reload_failed, no reloaded)."""
    config = _config(tmp_path)
    d = _run(config, runs)
    send(d.tcp[1], record(msg="before"))
    wait_for(lambda: len(read_lines(d.messages, writing=True)) == 1, timeout=10)
    good = config.read_text()
    config.write_text(good + "this is not toml\n")
    d.messages.rename(d.messages.with_name("messages.log.1"))
    d.signal(signal.SIGUSR1)
    wait_for(d.messages.exists, timeout=10)
    send(d.tcp[1], record(msg="after"))
    wait_for(lambda: len(read_lines(d.messages, writing=True)) == 1, timeout=10)
    assert read_lines(d.messages)[0]["send_msg"] == "after"
    assert [r["send_msg"] for r in read_lines(d.messages.with_name("messages.log.1"))] == ["before"]
    assert d.proc.poll() is None
    assert d.event("reload_failed") is None
    assert d.event("reloaded") is None
    config.write_text(good)
    assert d.stop() == 0


def test_reopen_command_sends_sigusr1(tmp_path: Path, runs: list[DaemonProcess]) -> None:
    """`nio-logd reopen` finds the daemon by its pidfile and has it reopen its files."""
    config = _config(tmp_path)
    d = _run(config, runs)
    send(d.tcp[1], record(msg="before"))
    wait_for(lambda: len(read_lines(d.messages, writing=True)) == 1, timeout=10)
    d.messages.rename(d.messages.with_name("messages.log.1"))
    result = nio(config, "reopen")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(d.messages.exists, timeout=10)
    assert d.event("reload_failed") is None and d.event("reloaded") is None
    assert d.stop() == 0


def test_status_and_start_see_a_run_daemon(tmp_path: Path, runs: list[DaemonProcess]) -> None:
    """`run` (what systemd runs) holds the pidfile: status says running with its pid, start says
    "already running" before trying to bind, and the pidfile is gone after a clean stop."""
    config = _config(tmp_path)
    d = _run(config, runs)
    status = nio(config, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"running (pid {d.pid})" in status.stdout
    start = nio(config, "start")
    assert start.returncode == 1, start.stdout + start.stderr
    assert "already running" in start.stderr and str(d.pid) in start.stderr
    assert "Address already in use" not in start.stderr
    second = DaemonProcess(config)
    runs.append(second)
    assert second.proc.wait(30) == 1
    wait_for(lambda: any("already running" in line for line in second.stderr_lines), timeout=10)
    assert d.proc.poll() is None
    assert d.stop() == 0
    settings = load_file(config)
    assert not settings.resolve(settings.daemon.pidfile).exists()
    assert nio(config, "status").returncode == 3


# -- under a real systemd (tests/systemd_box) ---------------------------------------------------------
@pytest.mark.root
@pytest.mark.slow
def test_under_systemd_reload_fails_on_broken_config_and_status_sees_the_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """nio-logd.service in a booted systemd: `nio-logd status` says running with the MainPID and
    `start` "already running"; `nio-logd reload` reports the daemon's outcome; with the README's
    ExecReload drop-in `systemctl reload` succeeds on a good config and fails with the reason on a
    broken one, the service staying active with its old settings; `systemctl kill -s USR1` only
    reopens the files."""
    import uuid

    from conftest import REPO, free_port
    from systemd_box.box import Box
    from test_systemd_real import CONFIG, LOG_DIR, VENV, _skip_reason, install

    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    box = Box(f"nio-logd-reload-{uuid.uuid4().hex[:8]}", REPO, tmp_path_factory.mktemp("systemd-box"))
    port = free_port()
    try:
        box.boot()
        install(box, port, free_port())
        version = box.run("systemctl", "--version").stdout.splitlines()[0]
        print(f"in the box: {version}")
        box.systemctl("start", "nio-logd")
        main = box.show("nio-logd", "MainPID")["MainPID"]
        cli = (f"{VENV}/bin/nio-logd",)
        status = box.run(*cli, "status", "--config", CONFIG, check=False)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"running (pid {main})" in status.stdout
        start = box.run(*cli, "start", "--config", CONFIG, check=False)
        assert start.returncode == 1 and "already running" in start.stderr, start.stdout + start.stderr

        config = box.path(CONFIG)
        good = config.read_text()
        config.write_text(good + "\n[record]\nmax_msg_chars = 500\n")
        # The shipped unit: the CLI, run by the operator, waits for the daemon's outcome.
        cli_ok = box.run(*cli, "reload", "--config", CONFIG, check=False)
        assert cli_ok.returncode == 0 and "reloaded" in cli_ok.stdout, cli_ok.stdout + cli_ok.stderr
        # The README's drop-in: `systemctl reload` runs that CLI (in the unit's sandbox).
        dropin = box.path("/etc/systemd/system/nio-logd.service.d/reload.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(f"[Service]\nExecReload=\nExecReload={VENV}/bin/nio-logd reload --config {CONFIG}\n")
        box.systemctl("daemon-reload")
        ok = box.systemctl("reload", "nio-logd", check=False)
        assert ok.returncode == 0, ok.stdout + ok.stderr + box.journal("nio-logd")[-3000:]

        config.write_text(good + "\nthis is not toml\n")
        bad = box.systemctl("reload", "nio-logd", check=False)
        assert bad.returncode != 0, bad.stdout + bad.stderr
        print(f"systemctl reload (broken config): exit {bad.returncode}: {bad.stderr.strip()}")
        journal = box.journal("nio-logd")
        print("journal:", [line for line in journal.splitlines() if "nio-logd reload" in line])
        assert "invalid TOML" in journal, journal[-3000:]
        state = box.show("nio-logd", "ActiveState", "SubState", "MainPID")
        assert state == {"ActiveState": "active", "SubState": "running", "MainPID": main}
        send(port, record(msg="still serving"))
        messages = box.path(f"{LOG_DIR}/messages.log")
        wait_for(lambda: "still serving" in (messages.read_text() if messages.exists() else ""), timeout=15)

        # logrotate's way: rename, then SIGUSR1 to the main process; the broken config is not read.
        messages.rename(messages.with_name("messages.log.1"))
        box.systemctl("kill", "--kill-who=main", "-s", "USR1", "nio-logd")
        wait_for(messages.exists, timeout=10)
        events = [json.loads(line) for line in box.journal("nio-logd").splitlines() if line.startswith("{")]
        assert not [e for e in events if e.get("event") == "reload_failed"]
        assert box.show("nio-logd", "MainPID")["MainPID"] == main
        config.write_text(good)
        box.systemctl("stop", "nio-logd")
    finally:
        left = box.shutdown()
        assert left == {}, f"the box left behind: {left}"
