"""Least privilege: bind as root, then run as the configured user; refuse a config others control.

These tests need root (to switch users and to chown); they are skipped, saying so, otherwise.
The daemon runs as ``nobody:nogroup``, which Debian always has.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, free_port, read_lines, record, wait_for, write_config

from nio_logd.config import load_file
from nio_logd.service.daemonize import events_path
from nio_logd.service.pidfile import is_alive

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: switching users and chown are root's"),
]

USER, GROUP = "nobody", "nogroup"


@pytest.fixture
def ids() -> tuple[int, int]:
    pw = pwd.getpwnam(USER)
    import grp

    return pw.pw_uid, grp.getgrnam(GROUP).gr_gid


def ctl(config: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        check=False,
    )


def proc_ids(pid: int) -> dict[str, list[int]]:
    """Real, effective, saved and filesystem uids and gids, groups, capabilities of ``pid``."""
    out: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
        elif key in ("CapEff", "CapPrm"):
            out[key] = [int(value.strip(), 16)]
    return out


@pytest.fixture
def killer() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("file_mode", [None, "0600"])
def test_start_as_root_binds_then_runs_as_the_configured_user(
    world_dir: Path, ids: tuple[int, int], killer: list[int], file_mode: str | None
) -> None:
    """After start the daemon's real/effective/saved ids are nobody:nogroup, without capabilities;
    its files have the configured mode and owner; records arrive, and reopen still works."""
    uid, gid = ids
    port = free_port()
    log_section: dict[str, Any] = {} if file_mode is None else {"file_mode": file_mode}
    config = write_config(
        world_dir,
        listeners=[{"address": f"tcp://127.0.0.1:{port}"}, {"address": "unix://run/nio-logd.sock"}],
        log=log_section,
        daemon={"user": USER, "group": GROUP, "pidfile": "run/nio-logd.pid"},
    )
    settings = load_file(config)
    pidfile = settings.resolve(settings.daemon.pidfile)
    messages = settings.resolve(settings.log.path)
    rejects = settings.resolve(settings.log.rejects_path)
    events = events_path(settings)
    started = ctl(config, "start")
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    killer.append(pid)

    got = proc_ids(pid)
    assert got["Uid"] == [uid] * 4
    assert got["Gid"] == [gid] * 4
    assert set(got["Groups"]) <= {gid}
    assert got["CapEff"] == [0]
    assert got["CapPrm"] == [0], "no capability left with which to become root again"

    expected_mode = 0o640 if file_mode is None else int(file_mode, 8)
    for path in (messages, rejects, events):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == expected_mode, path
        assert (st.st_uid, st.st_gid) == (uid, gid), path
    for folder in (messages.parent, pidfile.parent):  # created by the daemon: handed over too
        st = folder.stat()
        assert (st.st_uid, st.st_gid) == (uid, gid), folder
    assert pidfile.stat().st_uid == uid

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(record("alice", "over tcp") + b"\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(world_dir / "run" / "nio-logd.sock"))
        s.sendall(record("bob", "over unix") + b"\n")
    wait_for(lambda: len(read_lines(messages)) == 2)
    assert sorted(r["send_msg"] for r in read_lines(messages)) == ["over tcp", "over unix"]

    # As nobody it can still reopen: the renamed file stays, a new one is created, with the mode.
    messages.rename(messages.with_name("messages.log.1"))
    assert ctl(config, "reload").returncode == 0
    wait_for(messages.exists)
    st = messages.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (expected_mode, uid)

    stopped = ctl(config, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not pidfile.exists(), "the unprivileged daemon removes its pidfile"
    assert not (world_dir / "run" / "nio-logd.sock").exists()


def test_run_as_root_drops_too(world_dir: Path, ids: tuple[int, int], daemon_factory: Any) -> None:
    """`nio-logd run` started as root also serves as the configured user."""
    uid, gid = ids
    config = write_config(world_dir, daemon={"user": USER})  # the group: nobody's primary group
    d: DaemonProcess = daemon_factory(config)
    got = proc_ids(d.pid)
    assert got["Uid"] == [uid] * 4
    assert got["Gid"] == [gid] * 4
    assert d.event("privileges_dropped") is not None
    with socket.create_connection(d.tcp, timeout=10) as s:
        s.sendall(record(msg="as nobody") + b"\n")
    wait_for(lambda: len(read_lines(d.messages)) == 1)
    assert stat.S_IMODE(d.messages.stat().st_mode) == 0o640
    assert d.messages.stat().st_uid == uid
    assert d.stop() == 0


@pytest.mark.parametrize(("mode", "who"), [(0o646, "other users"), (0o664, "its group")])
def test_config_writable_by_others_is_refused(world_dir: Path, mode: int, who: str) -> None:
    """Both start and run (as root) refuse a config file others can write, and say why."""
    config = write_config(world_dir, daemon={"user": USER, "pidfile": "nio-logd.pid"})
    config.chmod(mode)
    for command in ("start", "run"):
        result = ctl(config, command)
        assert result.returncode == 78, (command, result.stderr)
        assert f"refusing a config file writable by {who} (mode {mode:04o})" in result.stderr
        assert f"chmod go-w {config}" in result.stderr
    assert not (world_dir / "nio-logd.pid").exists()
    assert not (world_dir / "logs").exists(), "nothing was started"


def test_config_owned_by_another_user_is_refused(world_dir: Path, ids: tuple[int, int]) -> None:
    config = write_config(world_dir, daemon={"user": USER})
    os.chown(config, *ids)
    result = ctl(config, "start")
    assert result.returncode == 78
    assert f"refusing a config file owned by {USER}" in result.stderr


def test_unknown_user_is_refused(world_dir: Path) -> None:
    config = write_config(world_dir, daemon={"user": "no-such-user-nio-logd"})
    result = ctl(config, "start")
    assert result.returncode == 78
    assert "[daemon] user: no such user 'no-such-user-nio-logd'" in result.stderr
