"""Which process the pidfile names: only the daemon that holds a lock on it is "ours".

A pid left in a stale pidfile can be reused by any program, even one whose command line mentions
nio-logd (``tail -f .../nio-logd-m.log``). status, stop, reload and start must take such a pid for
"not running" and never signal it; a daemon really started keeps being found, also after it has
dropped root. Every test runs the real command line and real processes.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for, write_config

from nio_logd.config import load_file
from nio_logd.service.pidfile import is_alive

CTL_TIMEOUT = 60


def ctl(config: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", command, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT,
        cwd=config.parent,
        check=False,
    )


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end of the test (each daemon a test starts, by its pid)."""
    started: list[int] = []
    yield started
    for pid in started:
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)


def pidfile_of(config: Path) -> Path:
    settings = load_file(config)
    return settings.resolve(settings.daemon.pidfile)


def is_locked(path: Path) -> bool:
    """True if some process holds a lock on the file at ``path`` (probed from a fresh fd)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_stale_pid_reused_by_other_process_is_not_ours(tmp_path: Path, pids: list[int]) -> None:
    """A live `tail -f .../nio-logd-m.log` whose pid is in the pidfile is not the daemon."""
    config = write_config(tmp_path, daemon={"pidfile": "run/nio-logd.pid"})
    pidfile = pidfile_of(config)
    pidfile.parent.mkdir()
    watched = tmp_path / "logs" / "nio-logd-m.log"
    watched.parent.mkdir()
    watched.write_text("")
    other = subprocess.Popen(["tail", "-f", str(watched)], stdout=subprocess.DEVNULL)
    try:
        # Right after fork, before exec, the child's command line is still empty (or ours).
        wait_for(lambda: b"nio-logd-m.log" in Path(f"/proc/{other.pid}/cmdline").read_bytes(), 10)
        pidfile.write_text(f"{other.pid}\n")

        status = ctl(config, "status")
        assert status.returncode == 3, status.stdout + status.stderr
        assert "not running" in status.stdout

        stopped = ctl(config, "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "not running" in stopped.stdout
        reloaded = ctl(config, "reload")
        assert reloaded.returncode == 3, reloaded.stdout + reloaded.stderr
        assert other.poll() is None, "stop/reload signalled a process that is not the daemon"

        started = ctl(config, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "stale" in started.stderr
        pid = int(pidfile.read_text())
        pids.append(pid)
        assert pid != other.pid
        assert ctl(config, "status").returncode == 0
        assert ctl(config, "stop").returncode == 0
        assert not is_alive(pid)
        assert other.poll() is None, "stopping the real daemon must leave the other process alone"
    finally:
        other.kill()
        other.wait(10)


def test_running_daemon_is_found_by_status_stop_reload(tmp_path: Path, pids: list[int]) -> None:
    """A daemon started with `nio-logd start` holds a lock on its pidfile and is found by it."""
    config = write_config(tmp_path, daemon={"pidfile": "run/nio-logd.pid"})
    pidfile = pidfile_of(config)
    started = ctl(config, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int(pidfile.read_text())
    pids.append(pid)
    assert is_locked(pidfile), "the running daemon must hold a lock on the file at the pidfile path"
    assert [p.name for p in pidfile.parent.iterdir()] == [pidfile.name], "no temporary file left behind"

    status = ctl(config, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"pid {pid}" in status.stdout
    again = ctl(config, "start")
    assert again.returncode == 1
    assert "already running" in again.stderr
    events = tmp_path / "logs" / "nio-logd.events.log"
    reloaded = ctl(config, "reload")
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    wait_for(lambda: '"reloaded"' in events.read_text(), timeout=20)

    stopped = ctl(config, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"stopped (pid {pid})" in stopped.stdout
    assert not is_alive(pid)
    assert not pidfile.exists()


def test_copied_pidfile_without_lock_is_not_running(tmp_path: Path, pids: list[int]) -> None:
    """The daemon's own pid in a file nobody locks (a copy put in place) does not count."""
    config = write_config(tmp_path, daemon={"pidfile": "run/nio-logd.pid"})
    pidfile = pidfile_of(config)
    assert ctl(config, "start").returncode == 0
    pid = int(pidfile.read_text())
    pids.append(pid)
    try:
        # Same content, another inode: what a restore from backup or a careless `cp` leaves.
        copy = pidfile.with_name("copy")
        copy.write_text(f"{pid}\n")
        held = pidfile.with_name("held")
        pidfile.rename(held)
        copy.rename(pidfile)
        status = ctl(config, "status")
        assert status.returncode == 3, status.stdout + status.stderr
        assert ctl(config, "stop").returncode == 0
        assert is_alive(pid), "stop signalled a pid named by a file its daemon does not hold"
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not is_alive(pid), timeout=30)


def test_pidfile_lock_is_exclusive_in_process(tmp_path: Path) -> None:
    """acquire() holds the lock until release(); a second acquire on the same path is refused."""
    from nio_logd.errors import AlreadyRunningError
    from nio_logd.service.pidfile import PidFile

    path = tmp_path / "x.pid"
    first = PidFile(path)
    first.acquire(os.getpid())
    try:
        assert is_locked(path)
        assert PidFile(path).running_pid() == os.getpid()
        with pytest.raises(AlreadyRunningError, match=str(os.getpid())):
            PidFile(path).acquire(os.getpid())
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        assert first.remove_if_ours(os.getpid())
    assert not path.exists()
    assert PidFile(path).running_pid() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: dropping to nobody is root's")
def test_lock_survives_privilege_drop(pids: list[int]) -> None:
    """The daemon drops to nobody after writing its pidfile; the lock (an open fd) stays."""
    folder = Path(tempfile.mkdtemp(prefix="nio-logd-lock-", dir="/tmp"))
    folder.chmod(0o755)  # nobody must traverse it; tmp_path is 0700 root
    try:
        config = write_config(folder, daemon={"user": "nobody", "group": "nogroup", "pidfile": "run/nio-logd.pid"})
        pidfile = pidfile_of(config)
        started = ctl(config, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        pid = int(pidfile.read_text())
        pids.append(pid)
        uid = pwd.getpwnam("nobody").pw_uid
        uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
        assert uids.split()[1:] == [str(uid)] * 4, "start returns once the daemon has dropped root"
        assert is_locked(pidfile)
        assert ctl(config, "status").returncode == 0
        assert ctl(config, "reload").returncode == 0
        stopped = ctl(config, "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not is_alive(pid)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_CONTENDER = """
import os, sys, time
from pathlib import Path
from nio_logd.errors import AlreadyRunningError
from nio_logd.service.pidfile import PidFile
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    PidFile(Path(sys.argv[1])).acquire(os.getpid())
except AlreadyRunningError:
    print("lost", flush=True)
else:
    print("won", flush=True)
    time.sleep(5)  # hold the lock while the others try
"""


@pytest.mark.parametrize("stale", [False, True], ids=["no-pidfile", "stale-pidfile"])
def test_concurrent_acquire_has_exactly_one_winner(tmp_path: Path, stale: bool) -> None:
    """Daemons starting at the same moment: one holds the pidfile, every other one is refused."""
    path = tmp_path / "x.pid"
    if stale:
        path.write_text("999999999\n")
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONTENDER, str(path), str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    try:
        go.touch()
        answers = []
        for p in procs:
            assert p.stdout is not None
            answers.append(p.stdout.readline().strip())
        assert sorted(answers) == ["lost"] * 5 + ["won"], answers
        winner = procs[answers.index("won")].pid
        assert path.read_text() == f"{winner}\n"
        assert is_locked(path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "x.pid"], "no temporary file left behind"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
