"""The shipped units in a real systemd, booted for these tests (tests/systemd_box/box.py).

The package is installed inside the box the way an operator would (a venv under /opt/nio-logd with
Debian's python3, the units in /etc/systemd/system, the config in /etc/nio-logd), then driven with
systemctl. The box shares the host's network, so the records are sent from here. The tests run in
file order on one box; the last one powers it off and checks that nothing is left behind.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, free_port, record, wait_for
from systemd_box.box import BOX_ENV, Box, BoxError, unavailable_reason, visible_in_box

pytestmark = [pytest.mark.root, pytest.mark.slow]

VENV = "/opt/nio-logd"
LOG_DIR = "/var/log/nio-logd"
CONFIG = "/etc/nio-logd/nio-logd.toml"
LOGROTATE = "/etc/logrotate.d/nio-logd"


def _install_reason() -> str | None:
    """Why the package cannot be installed in the box the way the tests do it, or None."""
    debian = Path("/usr/bin/python3")
    if not debian.exists():
        return "/usr/bin/python3 is missing: the box installs nio-logd in a venv made with the system Python"
    probe = subprocess.run(
        [str(debian), "-c", "import sys, venv, setuptools, wheel, pip; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
        env=BOX_ENV,
    )
    if probe.returncode != 0:
        return (
            f"the system Python cannot build a venv and install a wheel (python3-venv python3-pip "
            f"python3-setuptools python3-wheel): {probe.stderr.strip().splitlines()[-1:]}"
        )
    if probe.stdout.strip() != str(sys.version_info[:2]):
        return (
            f"/usr/bin/python3 is {probe.stdout.strip()}, the tests' Python {sys.version_info[:2]}: "
            "their compiled dependencies (pydantic-core, orjson) cannot be reused in the box's venv"
        )
    import pydantic_core  # a compiled dependency: where the tests' packages are installed

    for needed in (Path(sys.executable), Path(pydantic_core.__file__)):
        if not visible_in_box(needed):
            return f"{needed} is not on the root file system, so the box (an overlay of /) cannot see it"
    return None


def _skip_reason() -> str | None:
    return unavailable_reason() or _install_reason()


# -- the box -----------------------------------------------------------------------------------------
def install(box: Box, port: int, socket_port: int) -> None:
    """The package in a venv under /opt (visible despite ProtectHome=yes), the units, the config.

    As an operator installs a released wheel: built here (the tests' environment, with `build`), then
    installed in the box's venv offline, without building anything there."""
    with tempfile.TemporaryDirectory(prefix="nio-logd-wheel-") as out:
        built = subprocess.run(
            [sys.executable, "-m", "build", "--wheel", "--outdir", out, str(REPO)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        (wheel,) = Path(out).glob("nio_logd-*.whl")
        box.run("mkdir", "/tmp/nio-logd-dist")
        shutil.copy(wheel, box.path(f"/tmp/nio-logd-dist/{wheel.name}"))  # the box's own /tmp (a tmpfs)
    # --system-site-packages: Debian's pip installs the wheel.
    box.run("/usr/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip", VENV)
    site = box.run(f"{VENV}/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout
    # The dependencies, offline: copied from the tests' own environment (same CPython version).
    box.run(sys.executable, "/src/tests/systemd_box/copy_deps.py", "/src/pyproject.toml", site.strip())
    box.run(
        f"{VENV}/bin/python",
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        f"/tmp/nio-logd-dist/{wheel.name}",
    )
    # The static user the units run as (User=nio-logd, Group=adm), as the README installs it.
    box.run("install", "-m", "0644", "/src/systemd/nio-logd.sysusers", "/usr/lib/sysusers.d/nio-logd.conf")
    box.run("systemd-sysusers")
    box.run("install", "-m", "0644", "/src/config/logrotate.d/nio-logd", LOGROTATE)
    box.run(
        "install",
        "-m",
        "0644",
        "/src/systemd/nio-logd.service",
        "/src/systemd/nio-logd.socket",
        "/src/systemd/nio-logd-activated.service",
        "/etc/systemd/system/",
    )
    config, n = re.subn(
        r'address = "tcp://127\.0\.0\.1:8888"',
        f'address = "tcp://127.0.0.1:{port}"',
        (REPO / "config" / "nio-logd.systemd.toml").read_text(),
    )
    assert n == 1
    box.run("mkdir", "-p", "/etc/nio-logd", "/etc/systemd/system/nio-logd.socket.d")
    box.path(CONFIG).write_text(config)
    # How an operator moves the socket: a drop-in that resets ListenStream= and sets the new one.
    box.path("/etc/systemd/system/nio-logd.socket.d/port.conf").write_text(
        f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{socket_port}\n"
    )
    box.systemctl("daemon-reload")


class Env:
    """The booted box and the ports it serves on."""

    def __init__(self, box: Box, port: int, socket_port: int) -> None:
        self.box = box
        self.port = port
        self.socket_port = socket_port
        self.shut_down: dict[str, list[str]] | None = None

    def log(self, name: str = "messages.log") -> list[dict[str, Any]]:
        path = self.box.path(f"{LOG_DIR}/{name}")
        if not path.exists():
            return []
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"partial line in {name}"
        return [json.loads(line) for line in data.splitlines()]

    def msgs(self, name: str = "messages.log") -> list[str]:
        return [r["send_msg"] for r in self.log(name)]

    def journal(self, unit: str) -> list[dict[str, Any]]:
        events = []
        for line in self.box.journal(unit).splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def systemctl(self, *args: str) -> None:
        """systemctl in the box; on failure, the error names the units' state and journal."""
        try:
            self.box.systemctl(*args)
        except BoxError as exc:
            units = [a for a in args[1:] if not a.startswith("-")]
            raise AssertionError(f"{exc}\n" + "\n".join(self.why(u) for u in units)) from None

    def why(self, unit: str) -> str:
        """For assertion messages: the unit's state and its journal."""
        state = self.box.show(unit, "ActiveState", "SubState", "Result", "MainPID", "NRestarts", "StatusText")
        return f"{state}\n{self.box.journal(unit)[-3000:]}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("systemd-box")
    box = Box(f"nio-logd-box-{uuid.uuid4().hex[:8]}", REPO, workdir)
    e = Env(box, free_port(), free_port())
    try:
        box.boot()
        install(box, e.port, e.socket_port)
        yield e
    finally:
        if e.shut_down is None:
            left = box.shutdown()
            assert left == {}, f"the box left behind: {left}"


def send(port: int, msgs: list[str], user: str = "alice") -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"".join(record(user, m) + b"\n" for m in msgs))


def counters(status_text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", status_text)}


def owner_and_mode(box: Box, path: str) -> str:
    """``stat`` inside the box (its /etc/passwd names the users): e.g. "regular file 640 nio-logd:adm"."""
    return box.run("stat", "-c", "%F %a %U:%G", path).stdout.strip().replace("regular empty file", "regular file")


def adm_gid(box: Box) -> str:
    return box.run("getent", "group", "adm").stdout.strip().split(":")[2]


# -- nio-logd.service --------------------------------------------------------------------------------
def test_start_returns_once_ready_and_listening(env: Env) -> None:
    """`systemctl start nio-logd` returns after READY=1: the daemon accepts a connection at once."""
    started = time.monotonic()
    env.systemctl("start", "nio-logd")
    print(f"systemctl start nio-logd: {time.monotonic() - started:.2f} s")
    with socket.create_connection(("127.0.0.1", env.port), timeout=5):
        pass  # no retry: READY=1 came after the listening socket
    state = env.box.show("nio-logd", "ActiveState", "SubState", "Type", "NotifyAccess", "WatchdogUSec")
    assert state == {
        "ActiveState": "active",
        "SubState": "running",
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogUSec": "30s",
    }, env.why("nio-logd")


def test_runs_in_the_sandbox_as_the_static_user_nio_logd_in_group_adm(env: Env) -> None:
    """The unit's sandbox really applies: no privileges, seccomp on, no new privileges; the daemon runs
    as the static user nio-logd (from the sysusers file) with group adm, and sees no other log but
    its own folder (adm could read the machine's other logs)."""
    main = env.box.show("nio-logd", "MainPID")["MainPID"]
    status = Path(f"/proc/{env.box.host_pid(int(main))}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    exe = Path(f"/proc/{env.box.host_pid(int(main))}/cmdline").read_bytes().split(b"\0")
    assert exe[1:4] == [f"{VENV}/bin/nio-logd".encode(), b"run", b"--config"]
    # Inside the box, whose /etc/passwd and /etc/group name the ids: real, effective, saved, fs ids.
    inside = env.box.run("cat", f"/proc/{main}/status").stdout
    ids = dict(line.split(":\t", 1) for line in inside.splitlines() if ":\t" in line)
    uids, gids = set(ids["Uid"].split()), set(ids["Gid"].split())
    assert len(uids) == 1 and len(gids) == 1, (ids["Uid"], ids["Gid"])
    user = env.box.run("getent", "passwd", uids.pop()).stdout.strip().split(":")
    group = env.box.run("getent", "group", gids.pop()).stdout.strip().split(":")
    assert (user[0], group[0]) == ("nio-logd", "adm"), (user, group)
    assert ids["Groups"].split() in ([], [group[2]]), ids["Groups"]
    assert int(user[2]) < 1000 and user[5] == LOG_DIR and user[6].endswith("nologin"), user  # a system user
    # The daemon's own view of /var/log: an empty tmpfs but for its folder.
    seen = env.box.run("ls", "-A", f"/proc/{main}/root/var/log").stdout.split()
    assert seen == ["nio-logd"], seen
    assert env.box.run("ls", "-A", "/var/log").stdout.split() != ["nio-logd"]  # the box's own has more


def test_check_config_of_the_installed_package_is_clean(env: Env) -> None:
    """The venv made with /usr/bin/python3 under /opt: check-config passes with no warning about
    a home folder (the units' ProtectHome=yes would hide one)."""
    result = env.box.run(f"{VENV}/bin/nio-logd", "check-config", "--config", CONFIG)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr


def test_records_land_in_var_log_nio_logd(env: Env) -> None:
    """Records sent from the host are in /var/log/nio-logd/messages.log; a refused one in rejects.log."""
    send(env.port, [f"first-{i}" for i in range(5)])
    with socket.create_connection(("127.0.0.1", env.port), timeout=10) as s:
        s.sendall(b'{"send_user": "", "send_time": "2026-11-29 12:00:00", "send_msg": "refused"}\n')
    wait_for(lambda: len(env.msgs()) == 5 and len(env.log("rejects.log")) == 1, timeout=15)
    assert env.msgs() == [f"first-{i}" for i in range(5)]
    # A real folder (DynamicUser= made it a link into /var/log/private, 0700 root), which adm may
    # list; files nio-logd:adm 0640, as [log] file_mode and logrotate's `create 0640 nio-logd adm`.
    assert env.box.run("test", "-L", LOG_DIR, check=False).returncode == 1
    assert env.box.run("test", "-e", "/var/log/private/nio-logd", check=False).returncode == 1
    assert owner_and_mode(env.box, LOG_DIR) == "directory 750 nio-logd:adm"
    for name in ("messages.log", "rejects.log"):
        assert owner_and_mode(env.box, f"{LOG_DIR}/{name}") == "regular file 640 nio-logd:adm", name


def test_the_adm_group_reads_the_log_and_others_cannot(env: Env) -> None:
    """An unprivileged user in group adm reads messages.log (as Debian's /var/log/syslog); the same
    user without adm gets "Permission denied"."""
    path = f"{LOG_DIR}/messages.log"
    as_adm = env.box.run(
        "setpriv", "--reuid=65534", f"--regid={adm_gid(env.box)}", "--clear-groups", "cat", path, check=False
    )
    assert as_adm.returncode == 0, as_adm.stderr
    assert [json.loads(line)["send_msg"] for line in as_adm.stdout.splitlines()] == [f"first-{i}" for i in range(5)]
    as_other = env.box.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", path, check=False)
    assert as_other.returncode != 0 and "Permission denied" in as_other.stderr, as_other
    assert as_other.stdout == ""


def test_status_text_has_the_live_counters(env: Env) -> None:
    """`systemctl show -P StatusText` carries the daemon's STATUS= counters."""

    def current() -> dict[str, int] | None:
        text = env.box.systemctl("show", "-P", "StatusText", "nio-logd").stdout.strip()
        c = counters(text)
        return c if c.get("accepted") == 5 and c.get("refused") == 1 else None

    c = wait_for(current, timeout=15)  # STATUS= is refreshed every 5 s at most
    assert c["connections"] == 0 and c["queue_bytes"] == 0


def test_reload_reopens_the_log_files(env: Env) -> None:
    """`systemctl reload` (SIGHUP): after logrotate-style renaming, the daemon writes to a new file."""
    live = env.box.path(f"{LOG_DIR}/messages.log")
    live.rename(live.with_name("messages.log.1"))
    env.systemctl("reload", "nio-logd")
    wait_for(live.exists, timeout=10)
    send(env.port, ["after-reload"])
    wait_for(lambda: env.msgs() == ["after-reload"], timeout=10)
    assert env.msgs("messages.log.1") == [f"first-{i}" for i in range(5)]
    assert any(e.get("event") == "reopened" for e in env.journal("nio-logd"))
    assert env.box.show("nio-logd", "ActiveState")["ActiveState"] == "active"


def test_logrotate_with_the_shipped_snippet_keeps_owner_and_mode(env: Env) -> None:
    """`logrotate -f` with config/logrotate.d/nio-logd (installed in /etc/logrotate.d): the new
    messages.log it creates is nio-logd:adm 0640, like the daemon's own (`create 0640` keeps the
    rotated file's owner and group), and its postrotate (SIGUSR1 through systemctl) has the daemon
    write the next record into that very file."""
    reopened = sum(e.get("event") == "reopened" for e in env.journal("nio-logd"))
    rotated = env.box.run("logrotate", "-f", "-s", "/tmp/logrotate.state", LOGROTATE, check=False)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert env.msgs("messages.log.1") == ["after-reload"]
    live = f"{LOG_DIR}/messages.log"
    assert owner_and_mode(env.box, live) == "regular file 640 nio-logd:adm"
    created = env.box.path(live).stat().st_ino
    wait_for(lambda: sum(e.get("event") == "reopened" for e in env.journal("nio-logd")) > reopened, timeout=10)
    send(env.port, ["after-logrotate"])
    wait_for(lambda: env.msgs() == ["after-logrotate"], timeout=10)
    assert env.box.path(live).stat().st_ino == created  # logrotate's file, not one the daemon made
    assert owner_and_mode(env.box, live) == "regular file 640 nio-logd:adm"
    assert env.msgs("messages.log.1") == ["after-reload"]


def test_kill_9_is_followed_by_a_restart(env: Env) -> None:
    """Restart=on-failure: after kill -9 of the main process systemd starts a new one, which serves."""
    before = env.box.show("nio-logd", "MainPID", "NRestarts")
    env.box.run("kill", "-9", before["MainPID"])

    def restarted() -> dict[str, str] | None:
        s = env.box.show("nio-logd", "MainPID", "NRestarts", "ActiveState", "SubState")
        running = s["ActiveState"] == "active" and s["SubState"] == "running"
        return s if running and s["MainPID"] not in ("0", before["MainPID"]) else None

    after = wait_for(restarted, timeout=20)
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    send(env.port, ["after-restart"])
    wait_for(lambda: env.msgs() == ["after-logrotate", "after-restart"], timeout=10)


def test_stop_ends_with_success(env: Env) -> None:
    """`systemctl stop` (SIGTERM): the daemon drains, says STOPPING=1 and exits 0: Result=success."""
    env.systemctl("stop", "nio-logd")
    state = env.box.show("nio-logd", "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, env.why("nio-logd")
    assert "nio-logd.service: Deactivated successfully." in env.box.journal("nio-logd")
    stopped = [e for e in env.journal("nio-logd") if e.get("event") == "stopped"]
    assert stopped and stopped[-1]["clean"] is True
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", env.port), timeout=5)


def _non_loopback_address() -> str | None:
    """This machine's IPv4 address on its way out (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_ip_allow_list_admits_local_clients_only(env: Env) -> None:
    """IPAddressDeny=any + IPAddressAllow=localhost is enforced: listening on every address, the daemon
    serves 127.0.0.1, but a connection to the machine's network address gets no answer at all."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine to connect through")
    config = env.box.path(CONFIG)
    original = config.read_text()
    config.write_text(original.replace('"tcp://127.0.0.1:', '"tcp://0.0.0.0:'))
    try:
        env.systemctl("start", "nio-logd")
        send(env.port, ["via-localhost"])
        with pytest.raises(TimeoutError):  # dropped by the unit's BPF filter: not even a refusal
            socket.create_connection((address, env.port), timeout=2).close()
        wait_for(lambda: env.msgs()[-1:] == ["via-localhost"], timeout=10)
        env.systemctl("stop", "nio-logd")
    finally:
        config.write_text(original)


# -- nio-logd.socket ---------------------------------------------------------------------------------
def test_socket_activated_variant_serves(env: Env) -> None:
    """nio-logd.socket listens; the first connection starts nio-logd-activated.service, which serves on
    systemd's socket with no network of its own (PrivateNetwork=yes, RestrictAddressFamilies=AF_UNIX)."""
    env.systemctl("start", "nio-logd.socket")
    assert env.box.show("nio-logd-activated.service", "ActiveState")["ActiveState"] == "inactive"
    send(env.socket_port, ["activated-1", "activated-2"], user="bob")
    wait_for(lambda: env.msgs()[-2:] == ["activated-1", "activated-2"], timeout=20)

    def started() -> dict[str, str] | None:  # a first worker may write records before READY=1
        state = env.box.show("nio-logd-activated.service", "ActiveState", "SubState", "MainPID", "StatusText")
        return state if state["ActiveState"] == "active" and state["SubState"] == "running" else None

    state = wait_for(started, timeout=20)
    host_pid = env.box.host_pid(int(state["MainPID"]))
    assert Path(f"/proc/{host_pid}/ns/net").readlink() != Path("/proc/self/ns/net").readlink()
    listening = [e for e in env.journal("nio-logd-activated") if e.get("event") == "listening"]
    assert [e["address"] for e in listening] == [f"tcp://127.0.0.1:{env.socket_port}"]
    send(env.socket_port, ["activated-3"], user="bob")
    wait_for(lambda: env.msgs()[-1] == "activated-3", timeout=10)
    # The same user and group as nio-logd.service: the same files, still nio-logd:adm 0640.
    main = state["MainPID"]
    inside = env.box.run("ps", "-o", "user=,group=", "-p", main).stdout.split()
    assert inside == ["nio-logd", "adm"], inside
    assert owner_and_mode(env.box, f"{LOG_DIR}/messages.log") == "regular file 640 nio-logd:adm"
    env.systemctl("stop", "nio-logd.socket", "nio-logd-activated.service")
    result = env.box.show("nio-logd-activated.service", "ActiveState", "Result")
    assert result == {"ActiveState": "inactive", "Result": "success"}, env.why("nio-logd-activated")


def test_socket_activated_with_metrics_serves_and_says_why_there_are_none(env: Env) -> None:
    """[metrics] set for the socket-activated unit, which may not make an Internet socket: the
    record systemd holds is written all the same, the unit stays active, and the journal and the
    STATUS line say that metrics are unavailable (before, the daemon failed until the socket unit
    itself failed, and the record was lost)."""
    config = env.box.path(CONFIG)
    original = config.read_text()
    config.write_text(original + '\n[metrics]\naddress = "tcp://127.0.0.1:9108"\n')
    try:
        env.systemctl("start", "nio-logd.socket")
        send(env.socket_port, ["with-metrics-configured"], user="bob")
        wait_for(lambda: env.msgs()[-1:] == ["with-metrics-configured"], timeout=20)

        def status() -> dict[str, str] | None:
            state = env.box.show("nio-logd-activated.service", "ActiveState", "StatusText", "NRestarts")
            return state if "METRICS UNAVAILABLE" in state["StatusText"] else None

        state = wait_for(status, timeout=20)
        assert state["ActiveState"] == "active" and state["NRestarts"] == "0", state
        events = [e for e in env.journal("nio-logd-activated") if e.get("event") == "metrics_unavailable"]
        assert events and events[-1]["level"] == "error" and "9108" in events[-1]["error"], events
        env.systemctl("stop", "nio-logd.socket", "nio-logd-activated.service")
    finally:
        config.write_text(original)


# -- last: tear the box down -------------------------------------------------------------------------
def test_poweroff_leaves_no_process_mount_or_cgroup(env: Env) -> None:
    """Powering the box off ends its PID 1; no process, mount or cgroup of it remains on the host."""
    box = env.box
    pid = box.pid
    cgroups = list(box.cgroups)
    env.shut_down = box.shutdown()
    assert env.shut_down == {}
    assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    assert box.proc is not None and box.proc.returncode is not None
    assert [cg for cg in cgroups if cg.exists()] == []
    assert box.leftovers() == {"processes": [], "mounts": [], "cgroups": []}
    assert not box.scratch.exists()
    with pytest.raises(BoxError):
        box.run("true")
