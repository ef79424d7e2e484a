"""Unix listeners: the socket file's mode, owner and group, and the peer's pid, uid and gid.

Real daemons, real sockets, real users: the daemon binds as root; clients connect as ``nobody``
(``/usr/bin/python3`` with only the standard library, since root's own Python is not reachable
by other users). These tests need root; they are skipped, saying so, otherwise.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, record, wait_for, write_config

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: binding for other users and switching users"),
    pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="clients run /usr/bin/python3 as nobody"),
]

USER, GROUP = "nobody", "nogroup"
CLIENT_PYTHON = "/usr/bin/python3"

# Connects as whoever runs it, sends its stdin's lines, prints "ok" or the errno of connect().
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(exc.errno)
    sys.exit(3)
s.sendall(sys.stdin.buffer.read())
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
print("ok")
"""

# What systemd does before starting an activated service: the listening socket as fd 3
# (SD_LISTEN_FDS_START), LISTEN_PID and LISTEN_FDS set for the very process it then execs.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable, "-m", "nio_logd", "run", "--config", sys.argv[2]])
"""


@pytest.fixture
def nobody() -> tuple[int, int]:
    return pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid


def run_client_as_nobody(path: Path, data: bytes) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run CLIENT as nobody:nogroup (no supplementary groups); its pid and its result."""
    proc = subprocess.Popen(
        [CLIENT_PYTHON, "-I", "-c", CLIENT, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        user=USER,
        group=GROUP,
        extra_groups=[],
        cwd="/",
    )
    try:
        out, err = proc.communicate(data.decode(), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    return proc.pid, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def unix_config(directory: Path, path: Path, **listener: Any) -> Path:
    return write_config(directory, listeners=[{"address": f"unix://{path}", **listener}])


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=config.parent,
        check=False,
    )


def test_socket_file_gets_the_configured_mode_owner_and_group(world_dir: Path, daemon_factory: Any) -> None:
    sock_path = world_dir / "n.sock"
    d = daemon_factory(unix_config(world_dir, sock_path, mode="0660", owner=USER, group=GROUP))
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid)
    assert stat.S_IMODE(os.stat(world_dir).st_mode) == 0o755  # the folder is left as it was
    assert d.stop() == 0
    assert not sock_path.exists()


def test_numeric_owner_and_group_ids_are_taken_as_ids(world_dir: Path, daemon_factory: Any) -> None:
    sock_path = world_dir / "n.sock"
    d = daemon_factory(unix_config(world_dir, sock_path, mode="0640", owner="4242", group=4343))
    st = os.stat(sock_path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 4242, 4343)
    assert d.stop() == 0


def test_socket_file_is_0666_as_systemds_socketmode_when_mode_is_unset(world_dir: Path, daemon_factory: Any) -> None:
    sock_path = world_dir / "n.sock"
    d = daemon_factory(unix_config(world_dir, sock_path))
    st = os.stat(sock_path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o666, 0, 0)
    assert d.stop() == 0


def test_records_from_an_unprivileged_client_carry_its_pid_uid_and_gid(
    world_dir: Path, daemon_factory: Any, nobody: tuple[int, int]
) -> None:
    """Group access (mode 0660, group nogroup) lets nobody:nogroup connect; its accepted record
    and its refused one are written with the client process's own pid, uid and gid."""
    sock_path = world_dir / "n.sock"
    d = daemon_factory(unix_config(world_dir, sock_path, mode="0660", group=GROUP))
    pid, result = run_client_as_nobody(sock_path, record("nobody", "from a local app") + b"\n[1,2]\n")
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result
    uid, gid = nobody
    msgs = wait_for(lambda: read_lines(d.messages, writing=True))
    rejects = wait_for(lambda: read_lines(d.rejects, writing=True))
    (msg,) = msgs
    assert msg["send_user"] == "nobody"
    assert msg["peer"] == "unix"
    assert (msg["peer_pid"], msg["peer_uid"], msg["peer_gid"]) == (pid, uid, gid)
    keys = list(msg)
    assert keys[keys.index("listener") :] == ["listener", "peer_pid", "peer_uid", "peer_gid"]
    (rej,) = rejects
    assert rej["reason"] == "not_an_object"
    assert (rej["peer"], rej["peer_pid"], rej["peer_uid"], rej["peer_gid"]) == ("unix", pid, uid, gid)
    assert d.stop() == 0


def test_a_client_whose_uid_the_mode_does_not_allow_gets_eacces(world_dir: Path, daemon_factory: Any) -> None:
    """Mode 0660 with group root: nobody (neither owner nor in the group) cannot connect."""
    sock_path = world_dir / "n.sock"
    d = daemon_factory(unix_config(world_dir, sock_path, mode="0660", owner="root", group="root"))
    _pid, result = run_client_as_nobody(sock_path, record("nobody", "refused") + b"\n")
    assert (result.returncode, result.stdout.strip()) == (3, str(errno.EACCES)), result
    # Root still can, and nothing from nobody was written.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(record("root", "allowed") + b"\n")
    msgs = wait_for(lambda: read_lines(d.messages, writing=True))
    assert [m["send_user"] for m in msgs] == ["root"]
    assert (msgs[0]["peer_pid"], msgs[0]["peer_uid"], msgs[0]["peer_gid"]) == (os.getpid(), 0, 0)
    assert d.stop() == 0


def test_a_kept_extra_field_may_not_be_named_peer_pid_uid_or_gid(world_dir: Path, daemon_factory: Any) -> None:
    sock_path = world_dir / "n.sock"
    d = daemon_factory(write_config(world_dir, [{"address": f"unix://{sock_path}"}], record={"extra": "keep"}))
    fake = json.loads(record("mallory", "spoofed"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        for key in ("peer_pid", "peer_uid", "peer_gid"):
            s.sendall(json.dumps({**fake, key: 0}).encode() + b"\n")
        s.sendall(json.dumps({**fake, "app": "kept"}).encode() + b"\n")
    rejects = wait_for(lambda: len(read_lines(d.rejects, writing=True)) == 3 and read_lines(d.rejects))
    assert [r["errors"] for r in rejects] == [
        [{"field": key, "error": "reserved: the daemon writes this key itself"}]
        for key in ("peer_pid", "peer_uid", "peer_gid")
    ]
    (msg,) = wait_for(lambda: read_lines(d.messages, writing=True))
    assert msg["app"] == "kept" and msg["peer_uid"] == 0
    assert d.stop() == 0


@pytest.mark.parametrize(("key", "value"), [("mode", "0660"), ("owner", "root"), ("group", "root")])
def test_mode_owner_or_group_on_a_tcp_listener_exits_78_naming_the_key(tmp_path: Path, key: str, value: str) -> None:
    cfg = write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", key: value}])
    result = check_config(cfg)
    assert result.returncode == 78, result
    assert f"listeners.0: {key}: " in result.stderr
    assert "Value error" not in result.stderr and "at least 1 item" not in result.stderr  # said once, plainly
    assert "unix://" in result.stderr


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("owner", "no-such-user-nio", "no such user 'no-such-user-nio'"),
        ("group", "no-such-group-nio", "no such group 'no-such-group-nio'"),
        ("mode", "rw-rw----", "is not an octal file mode"),
        ("mode", "01777", "between 0000 and 0777"),
    ],
)
def test_an_unknown_owner_or_group_or_a_bad_mode_exits_78_naming_the_key(
    tmp_path: Path, key: str, value: str, needle: str
) -> None:
    sock_path = tmp_path / "n.sock"
    result = check_config(unix_config(tmp_path, sock_path, **{key: value}))
    assert result.returncode == 78, result
    assert f"listeners.0.{key}" in result.stderr and needle in result.stderr, result.stderr
    assert not sock_path.exists()


def test_a_socket_systemd_hands_over_keeps_its_mode_and_owner(world_dir: Path, nobody: tuple[int, int]) -> None:
    """LISTEN_FDS: the socket file is systemd's (SocketMode=, SocketUser=, SocketGroup=); the
    listener's mode, owner and group are not applied to it, and peers still get credentials."""
    sock_path = world_dir / "n.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(sock_path))
    os.chmod(sock_path, 0o606)
    os.chown(sock_path, *nobody)
    listening.listen(16)
    cfg = unix_config(world_dir, sock_path, mode="0600", owner="root", group="root")
    events = world_dir / "events.log"
    fd = listening.fileno()
    with events.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(fd), str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            pass_fds=(fd,),
            cwd=world_dir,
        )
    try:
        wait_for(lambda: b'"event":"ready"' in events.read_bytes() or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, events.read_text()
        st = os.stat(sock_path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o606, *nobody)
        pid, result = run_client_as_nobody(sock_path, record("nobody", "activated") + b"\n")
        assert (result.returncode, result.stdout.strip()) == (0, "ok"), result
        messages = world_dir / "logs" / "messages.log"
        (msg,) = wait_for(lambda: read_lines(messages, writing=True))
        assert (msg["peer_pid"], msg["peer_uid"], msg["peer_gid"]) == (pid, *nobody)
        proc.terminate()
        assert proc.wait(30) == 0
        assert sock_path.exists()  # systemd's file: not removed by the daemon either
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        listening.close()
