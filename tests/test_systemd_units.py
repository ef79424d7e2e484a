"""systemd integration without a booted systemd: the notify protocol, socket activation, the units.

The notify socket is a real AF_UNIX datagram socket with SO_PASSCRED (what systemd listens on), the
activating socket comes from /usr/bin/systemd-socket-activate, the units are checked by
systemd-analyze. tests/test_systemd_real.py runs the same units in a real systemd.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, DaemonProcess, free_port, read_lines, record, wait_for, write_config

from nio_logd.config import load_file

UNITS = REPO / "systemd"
SERVICE = UNITS / "nio-logd.service"
SOCKET = UNITS / "nio-logd.socket"
ACTIVATED = UNITS / "nio-logd-activated.service"
SYSUSERS = UNITS / "nio-logd.sysusers"
SYSTEMD_CONFIG = REPO / "config" / "nio-logd.systemd.toml"
LOGROTATE_SNIPPET = REPO / "config" / "logrotate.d" / "nio-logd"
SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"
MAX_EXPOSURE = 1.5


# -- a fake NOTIFY_SOCKET --------------------------------------------------------------------------
@dataclass(frozen=True)
class Notification:
    pid: int  # the sender, from SCM_CREDENTIALS (the kernel's word, not the message's)
    at: float  # time.monotonic() when received
    fields: dict[str, str]


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket with SO_PASSCRED; collects every message."""

    def __init__(self, address: str) -> None:
        self.address = address  # as put in $NOTIFY_SOCKET ("@name" = abstract namespace)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.received: list[Notification] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        creds_size = struct.calcsize("3i")
        while not self._stop:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(creds_size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, _uid, _gid = struct.unpack("3i", cdata[:creds_size])
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines() if line)
            with self._lock:
                self.received.append(Notification(pid, time.monotonic(), fields))

    def messages(self, key: str | None = None) -> list[Notification]:
        with self._lock:
            return [n for n in self.received if key is None or key in n.fields]

    def wait(self, predicate: Callable[[Notification], bool], timeout: float = 10.0) -> Notification:
        def found() -> Notification | None:
            return next((n for n in self.messages() if predicate(n)), None)

        result: Notification = wait_for(found, timeout)
        return result

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(f"@nio-logd-test-{uuid.uuid4().hex}")
    yield ns
    ns.close()


def status_counters(n: Notification) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", n.fields.get("STATUS", ""))}


def send_lines(port: int, lines: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"".join(line + b"\n" for line in lines))


# -- sd_notify -------------------------------------------------------------------------------------
def test_notify_ready_status_watchdog_stopping_all_from_the_main_pid(
    tmp_path: Path, notify_socket: NotifySocket, daemon_factory: Any
) -> None:
    """READY=1 once listening, STATUS= with live counters, WATCHDOG=1, STOPPING=1: all from the main pid."""
    port = free_port()
    config = write_config(tmp_path, [{"address": f"tcp://127.0.0.1:{port}"}])
    d: DaemonProcess = daemon_factory(
        config, env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "1000000"}, ready=False
    )

    ready = notify_socket.wait(lambda n: n.fields.get("READY") == "1")
    # READY=1 means listening: a client connects at once, no retry.
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    assert status_counters(ready)["accepted"] == 0

    send_lines(port, [record("alice", f"m{i}") for i in range(3)] + [b'{"send_user": ""}'])
    counted = notify_socket.wait(
        lambda n: status_counters(n).get("accepted") == 3 and status_counters(n).get("refused") == 1, timeout=10
    )
    assert counted.at > ready.at
    notify_socket.wait(lambda n: n.fields.get("WATCHDOG") == "1" and n.at > counted.at)
    wait_for(lambda: len(notify_socket.messages("WATCHDOG")) >= 3, timeout=5)  # every 0.5 s

    d.signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    stopping = notify_socket.wait(lambda n: n.fields.get("STOPPING") == "1", timeout=5)
    assert stopping.at > counted.at
    assert not [n for n in notify_socket.messages("READY") if n.at > stopping.at]
    senders = {n.pid for n in notify_socket.messages()}
    assert senders == {d.pid}, f"notifications from {senders}, main pid is {d.pid}"
    assert len(read_lines(d.messages)) == 3


def test_no_watchdog_pings_when_the_watchdog_is_for_another_process(
    tmp_path: Path, notify_socket: NotifySocket, daemon_factory: Any
) -> None:
    """WATCHDOG_PID names another process: the daemon still notifies READY but never pings."""
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    d: DaemonProcess = daemon_factory(write_config(tmp_path), env=env, ready=False)
    notify_socket.wait(lambda n: n.fields.get("READY") == "1")
    time.sleep(1.0)  # five watchdog periods
    d.signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    notify_socket.wait(lambda n: n.fields.get("STOPPING") == "1", timeout=5)
    assert notify_socket.messages("WATCHDOG") == []


def test_watchdog_pings_stop_while_the_writer_is_stuck_and_resume_when_it_writes(
    tmp_path: Path, notify_socket: NotifySocket, daemon_factory: Any
) -> None:
    """WATCHDOG=1 only while the writer makes progress: a file that cannot grow (RLIMIT_FSIZE=0,
    so every write fails with EFBIG) stops the pings; lifting the limit resumes writing and pings."""
    port = free_port()
    config = write_config(tmp_path, [{"address": f"tcp://127.0.0.1:{port}"}])
    watchdog_usec = 1_000_000  # systemd would kill the daemon 1 s after its last ping
    d: DaemonProcess = daemon_factory(
        config, env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": str(watchdog_usec)}, ready=False
    )
    notify_socket.wait(lambda n: n.fields.get("READY") == "1")
    soft, hard = resource.prlimit(d.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(d.pid, resource.RLIMIT_FSIZE, (0, hard))
    try:
        idle = time.monotonic()
        notify_socket.wait(lambda n: n.fields.get("WATCHDOG") == "1" and n.at > idle)  # idle: healthy

        stuck = time.monotonic()
        send_lines(port, [record("alice", "waits for the disk")])
        wait_for(lambda: d.event("write_failed"), timeout=5)
        time.sleep(2.5 * watchdog_usec / 1e6)
        late = [n for n in notify_socket.messages("WATCHDOG") if n.at > stuck + 1.6 * watchdog_usec / 1e6]
        assert late == [], "the watchdog was fed while the writer could not write"
        assert status_counters(notify_socket.messages("STATUS")[-1])["queue_bytes"] > 0
        assert read_lines(d.messages) == []
    finally:
        resource.prlimit(d.pid, resource.RLIMIT_FSIZE, (soft, hard))
    unstuck = time.monotonic()
    wait_for(lambda: len(read_lines(d.messages)) == 1, timeout=10)
    notify_socket.wait(lambda n: n.fields.get("WATCHDOG") == "1" and n.at > unstuck, timeout=5)
    assert d.stop() == 0


# -- socket activation -----------------------------------------------------------------------------
class ActivatedDaemon:
    """``systemd-socket-activate -l 127.0.0.1:PORT [strace ...] nio-logd run``: exec'd at the first connection."""

    def __init__(self, port: int, config: Path, wrapper: tuple[str, ...] = (), *, accept: bool = False) -> None:
        cmd = [
            *wrapper,
            SOCKET_ACTIVATE,
            *(["--accept"] if accept else []),
            "-l",
            f"127.0.0.1:{port}",
            sys.executable,
            "-m",
            "nio_logd",
            "run",
            "--config",
            str(config),
        ]
        self.wrapped = bool(wrapper)
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=config.parent)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                self.events.append(json.loads(raw))
            except ValueError:
                self.events.append({"event": "(text)", "text": raw.decode(errors="replace").rstrip()})

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in list(self.events) if e.get("event") == name), None)

    @property
    def daemon_pid(self) -> int:
        """systemd-socket-activate execs the daemon in its own process (a child of the wrapper, if any)."""
        if not self.wrapped:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.daemon_pid, signal.SIGTERM)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # and strace's tracee with it (strace -f kills it on exit)
            raise
        self.close()
        return code

    def close(self) -> None:
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def _connect_retrying(port: int, timeout: float = 10.0) -> socket.socket:
    """systemd-socket-activate needs a moment to bind before the first connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port somebody else listens on: a daemon that tried to bind it would fail to start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.skipif(not Path(SOCKET_ACTIVATE).exists(), reason=f"{SOCKET_ACTIVATE} is not installed")
def test_socket_activation_serves_on_the_inherited_socket_without_binding(tmp_path: Path, busy_port: int) -> None:
    """systemd-socket-activate hands the daemon its socket (LISTEN_FDS=1, fd 3): records sent land in the
    log, the daemon listens on that socket and never tries to bind the (busy) configured address."""
    port = free_port()
    config = write_config(tmp_path, [{"address": f"tcp://127.0.0.1:{busy_port}"}])
    daemon = ActivatedDaemon(port, config)
    try:
        with _connect_retrying(port) as s:  # this first connection makes it exec the daemon
            s.sendall(record("alice", "first") + b"\n" + record("bob", "second") + b"\n")
        settings = load_file(config)
        messages = settings.resolve(settings.log.path)
        wait_for(lambda: len(read_lines(messages)) == 2, timeout=15)
        send_lines(port, [record("carol", "third")])
        wait_for(lambda: len(read_lines(messages)) == 3, timeout=10)
        # Logged once every worker listens: a worker may serve the records above before that.
        listening = wait_for(lambda: daemon.event("listening"), 15)
        assert listening["address"] == f"tcp://127.0.0.1:{port}", daemon.events
        # fd 3 is now close-on-exec, as sd_listen_fds() leaves it: no child inherits the listener.
        flags = int(Path(f"/proc/{daemon.daemon_pid}/fdinfo/3").read_text().split("flags:")[1].split()[0], 8)
        assert flags & os.O_CLOEXEC
        assert [r["send_user"] for r in read_lines(messages)] == ["alice", "bob", "carol"]
    finally:
        code = daemon.stop()
    assert code == 0, daemon.events


@pytest.mark.skipif(not Path(SOCKET_ACTIVATE).exists(), reason=f"{SOCKET_ACTIVATE} is not installed")
def test_a_passed_connection_instead_of_a_listening_socket_is_a_clear_startup_error(tmp_path: Path) -> None:
    """Accept=yes (here `systemd-socket-activate --accept`) passes a connection, not a listening socket:
    the daemon refuses to start and says why."""
    port = free_port()
    config = write_config(tmp_path)
    daemon = ActivatedDaemon(port, config, accept=True)
    try:
        with _connect_retrying(port) as s:
            s.settimeout(10)
            assert s.recv(1) == b""  # the daemon exits and the connection closes
        wait_for(lambda: any("not a listening socket" in e.get("text", "") for e in list(daemon.events)), 10)
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(10)
        except subprocess.TimeoutExpired:  # never leave it behind, even when the test failed
            daemon.proc.kill()
            daemon.proc.wait(10)
        daemon.close()


@pytest.mark.skipif(not Path(SOCKET_ACTIVATE).exists(), reason=f"{SOCKET_ACTIVATE} is not installed")
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
def test_socket_activated_daemon_creates_no_internet_socket(tmp_path: Path, busy_port: int) -> None:
    """With every listener from systemd, the daemon calls socket() only for AF_UNIX (notify, wake-ups):
    it would fail under the activated unit's RestrictAddressFamilies=AF_UNIX otherwise."""
    port = free_port()
    trace = tmp_path / "strace.log"
    config = write_config(tmp_path, [{"address": f"tcp://127.0.0.1:{busy_port}"}])
    wrapper = ("strace", "-f", "-qq", "-s", "256", "-e", "trace=execve,socket,socketpair", "-o", str(trace))
    daemon = ActivatedDaemon(port, config, wrapper)
    try:
        with _connect_retrying(port) as s:
            s.sendall(record("alice", "traced") + b"\n")
        settings = load_file(config)
        wait_for(lambda: len(read_lines(settings.resolve(settings.log.path))) == 1, timeout=20)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.events
    lines = trace.read_text().splitlines()
    exec_at = next(i for i, line in enumerate(lines) if f'execve("{sys.executable}"' in line)
    before, after = lines[:exec_at], lines[exec_at + 1 :]
    assert any("socket(AF_INET," in line for line in before), "systemd-socket-activate's own socket not traced"
    calls = [line for line in after if "socket(" in line or "socketpair(" in line]
    assert calls, "no socket call traced in the daemon"
    internet = [line for line in calls if "AF_UNIX" not in line]
    assert internet == [], f"the daemon created non-AF_UNIX sockets: {internet}"


# -- the unit files --------------------------------------------------------------------------------
def parse_unit(path: Path) -> dict[str, list[str]]:
    """``{"Section.Key": [values in order]}``; repeated keys keep every value."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


@pytest.mark.parametrize("path", [SERVICE, ACTIVATED], ids=lambda p: p.name)
def test_service_unit_settings(path: Path) -> None:
    """The service is Type=notify, reloads with SIGHUP, restarts on failure, has a watchdog, runs as the
    static user nio-logd with group adm and only its logs and runtime directories writable, and runs
    `nio-logd run`."""
    unit = parse_unit(path)
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"
    exec_start = one(unit, "Service.ExecStart").split()
    assert exec_start[0].startswith("/") and exec_start[0].endswith("/nio-logd")
    assert exec_start[1:] == ["run", "--config", "/etc/nio-logd/nio-logd.toml"]
    # The CLI sends SIGHUP and waits for the daemon's outcome: `systemctl reload` fails on a bad config.
    reload = one(unit, "Service.ExecReload").split()
    assert reload[0] == exec_start[0] and reload[1] == "reload" and "--config" in reload
    assert one(unit, "Service.Restart") == "on-failure"
    assert re.fullmatch(r"\d+s", one(unit, "Service.WatchdogSec"))
    # A static user (systemd/nio-logd.sysusers), group adm: DynamicUser= would hide the logs in
    # /var/log/private (0700 root) and give them the dynamic group.
    assert "Service.DynamicUser" not in unit
    assert one(unit, "Service.User") == "nio-logd"
    assert one(unit, "Service.Group") == "adm"
    assert "Service.SupplementaryGroups" not in unit
    assert one(unit, "Service.LogsDirectory") == "nio-logd"
    assert one(unit, "Service.LogsDirectoryMode") == "0750"  # adm may list it
    assert one(unit, "Service.RuntimeDirectory") == "nio-logd"
    assert one(unit, "Service.RuntimeDirectoryMode") == "0700"
    # At most 0640, as [log] file_mode's default and the logrotate snippet's create mode.
    assert one(unit, "Service.UMask") == "0027"
    # What DynamicUser=yes implied, spelt out (ProtectHome=yes is stricter than its read-only).
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RemoveIPC": "yes",
        "NoNewPrivileges": "yes",
        "RestrictSUIDSGID": "yes",
        "PrivateUsers": "yes",
    }.items():
        assert one(unit, f"Service.{key}") == value, key
    # adm reads the machine's other logs: the daemon sees only its own folder of /var/log.
    assert one(unit, "Service.TemporaryFileSystem") == "/var/log:ro"
    assert one(unit, "Service.BindPaths") == "/var/log/nio-logd"
    assert "Service.ReadWritePaths" not in unit
    # The IP allow list names real networks; "any" or a whole address space would only game the score.
    for key in ("Service.IPAddressAllow", "Service.IPAddressDeny"):
        for value in unit.get(key, []):
            assert not {"0.0.0.0/0", "::/0"} & set(value.split())
    assert unit.get("Service.IPAddressAllow", ["localhost"]) == ["localhost"]


def test_both_services_run_as_the_same_user_and_sandbox() -> None:
    """nio-logd.service and nio-logd-activated.service own the same files: same user, group, folders
    and modes; the sysusers file creates that user, as a system user whose home is the log folder."""
    keys = ("User", "Group", "LogsDirectory", "LogsDirectoryMode", "UMask", "TemporaryFileSystem", "BindPaths")
    service, activated = parse_unit(SERVICE), parse_unit(ACTIVATED)
    assert {k: service.get(f"Service.{k}") for k in keys} == {k: activated.get(f"Service.{k}") for k in keys}
    lines = [line.split() for line in SYSUSERS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1, lines
    kind, name, uid = lines[0][:3]
    assert (kind, name, uid) == ("u", one(service, "Service.User"), "-")  # "-": a free system uid
    assert lines[0][-1] == "/var/log/" + one(service, "Service.LogsDirectory")


def test_logrotate_snippet_creates_files_as_the_daemon_does() -> None:
    """logrotate's new files are 0640 (the daemon's [log] file_mode, the units' UMask=0027 allows it),
    with no owner named: logrotate keeps the rotated file's, nio-logd:adm under the units."""
    creates = re.findall(r"^\s*create\b(.*)$", LOGROTATE_SNIPPET.read_text(), re.M)
    assert [c.split() for c in creates] == [["0640"]]
    assert load_file(SYSTEMD_CONFIG).file_mode == 0o640
    assert int(creates[0].split()[0], 8) & int(one(parse_unit(SERVICE), "Service.UMask"), 8) == 0


def test_socket_unit_activates_the_network_less_service() -> None:
    """nio-logd.socket starts nio-logd-activated.service, which has no network and AF_UNIX only."""
    sock = parse_unit(SOCKET)
    assert one(sock, "Socket.Service") == ACTIVATED.name
    assert one(sock, "Install.WantedBy") == "sockets.target"
    assert one(sock, "Socket.IPAddressAllow") == "localhost"
    activated = parse_unit(ACTIVATED)
    assert one(activated, "Service.PrivateNetwork") == "yes"
    assert one(activated, "Service.RestrictAddressFamilies") == "AF_UNIX"
    assert one(activated, "Unit.Requires") == SOCKET.name
    assert "nio-logd.service" in one(activated, "Unit.Conflicts").split()
    assert SOCKET.name in one(parse_unit(SERVICE), "Unit.Conflicts").split()


def test_shipped_config_fits_the_units() -> None:
    """config/nio-logd.systemd.toml is valid, writes only inside LogsDirectory and RuntimeDirectory,
    and listens where nio-logd.socket does."""
    settings = load_file(SYSTEMD_CONFIG)
    for path in (settings.log.path, settings.log.rejects_path):
        assert Path(path).is_absolute() and Path(path).parent == Path("/var/log/nio-logd"), path
    assert Path(settings.daemon.pidfile).parent == Path("/run/nio-logd")
    assert settings.metrics.address is None  # would need a socket of its own under nio-logd.socket
    addresses = [str(ls.parsed) for ls in settings.listeners]
    listen = one(parse_unit(SOCKET), "Socket.ListenStream")
    assert addresses == [f"tcp://{listen}"]


def _runnable_copies(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at an executable that exists here (verify checks it)."""
    installed = Path(sys.executable).parent / "nio-logd"
    exe = str(installed) if installed.exists() else "/bin/true"
    copies = []
    for unit in (SERVICE, SOCKET, ACTIVATED):
        text = unit.read_text()
        if unit.suffix == ".service":
            text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={exe}", text, flags=re.MULTILINE)
            assert n == 1
            text, n = re.subn(r"^ExecReload=\S+", f"ExecReload={exe}", text, flags=re.MULTILINE)
            assert n == 1
        (tmp_path / unit.name).write_text(text)
        copies.append(tmp_path / unit.name)
    return copies


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify`: exit 0 and not one warning (unknown keys and bad values only warn)."""
    copies = _runnable_copies(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, copies)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_reports_a_bad_key(tmp_path: Path) -> None:
    """The verify test can fail: a misspelt key shows on stderr (with exit code 0)."""
    copies = _runnable_copies(tmp_path)
    service = copies[0]
    service.write_text(service.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(service)], capture_output=True, text=True, timeout=60
    )
    assert "WatchdogSecs" in result.stderr


def exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", [SERVICE, ACTIVATED], ids=lambda p: p.name)
def test_security_exposure_score(unit: Path) -> None:
    """`systemd-analyze security --offline=true` rates each service at most 1.5 (0 = best, 10 = worst)."""
    score = exposure(unit)
    print(f"{unit.name}: exposure {score}")
    assert score <= MAX_EXPOSURE


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_security_score_reflects_the_sandbox(tmp_path: Path) -> None:
    """The score test can fail: without its [Service] sandbox the same unit is rated UNSAFE."""
    text = SERVICE.read_text()
    keep = ("[", "Description=", "Type=", "NotifyAccess=", "ExecStart=", "ExecReload=", "Restart", "Watchdog")
    bare = "\n".join(line for line in text.splitlines() if line.startswith(keep))
    (tmp_path / SERVICE.name).write_text(bare + "\n")
    assert exposure(tmp_path / SERVICE.name) > 5.0


def test_outside_systemd_no_notify_socket_is_opened(tmp_path: Path, daemon_factory: Any) -> None:
    """Without $NOTIFY_SOCKET the daemon opens no datagram socket: outside systemd it is silent."""
    env = {k: "" for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID") if k in os.environ}
    d: DaemonProcess = daemon_factory(write_config(tmp_path), env=env)
    inodes = set()
    for fd in os.listdir(f"/proc/{d.pid}/fd"):
        target = os.readlink(f"/proc/{d.pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    unix_dgram = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[4] == "0002":  # SOCK_DGRAM
            unix_dgram.add(fields[6])
    assert inodes and not inodes & unix_dgram
    assert d.stop() == 0
