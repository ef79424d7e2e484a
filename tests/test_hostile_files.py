"""Hostile files under the daemon: symlinks and FIFOs at its paths, a full rejects disk, a deleted
log folder, a writer stuck in the kernel. Real daemon processes, real files, mounts and signals.

The privilege tests run as root and drop to ``nobody:nogroup`` (Debian always has them), in a
folder under /tmp that the unprivileged user can traverse.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, free_port, read_lines, record, wait_for, write_config
from faultkit import (
    have_tools,
    healthz,
    is_root,
    metric,
    metrics_address,
    mount_loop_ext4,
    mount_tmpfs,
    scrape,
    unmount,
)

from nio_logd.output.copytruncate import WriteJournal
from nio_logd.service.pidfile import is_alive

USER, GROUP = "nobody", "nogroup"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, mounts, switching users")
# A root file that does not end with a newline: the partial-line repair would cut it.
SECRET = b"root:$6$secret-hash:19000:0:99999:7:::\nlast line without a newline"


# -- helpers -----------------------------------------------------------------------------------------
@pytest.fixture
def ids() -> tuple[int, int]:
    return pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid


@pytest.fixture
def killer() -> Iterator[list[int]]:
    """Pids of detached daemons a test started: killed at the end if still alive."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)


def run_cli(config: Path, command: str, timeout: float = 30.0) -> tuple[int | None, str]:
    """``nio-logd COMMAND``: (exit code, stderr); exit code None if it was still running at the
    timeout (it is then killed): a daemon that should have refused to start but serves instead."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nio_logd", command, "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=config.parent,
    )
    try:
        _out, err = proc.communicate(timeout=timeout)
        return proc.returncode, err.decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        return None, err.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def exchange(address: tuple[str, int], lines: list[bytes], timeout: float = 30.0) -> list[dict[str, Any]]:
    """Send ``lines`` on one acked connection and return the answers that came within ``timeout``."""
    sock = socket.create_connection(address, timeout=10)
    failed: list[BaseException] = []

    def push() -> None:
        try:
            sock.sendall(b"".join(line + b"\n" for line in lines))
        except OSError as exc:
            failed.append(exc)

    sender = threading.Thread(target=push, daemon=True)
    sender.start()
    answers: list[dict[str, Any]] = []
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while len(answers) < len(lines):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            buf += data
            *done, buf = buf.split(b"\n")
            answers.extend(json.loads(raw) for raw in done)
    finally:
        sock.close()
        sender.join(10)
    assert not failed, failed
    return answers


def msgs(path: Path) -> list[str]:
    return [r["send_msg"] for r in read_lines(path)]


def events_named(d: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [ev for ev in list(d.events) if ev.get("event") == name]


# -- finding 2: symlinks and FIFOs at the log paths, ownership ---------------------------------------
@needs_root
@pytest.mark.root
@pytest.mark.parametrize(
    ("which", "command"),
    [
        pytest.param("messages", "run"),
        pytest.param("messages", "start"),
        ("events", "start"),
    ],
)
def test_symlinked_log_file_is_refused_root_file_untouched(
    world_dir: Path, ids: tuple[int, int], killer: list[int], which: str, command: str
) -> None:
    """The daemon user planted ``messages.log`` (or the events file) -> a root file in the folder it
    was handed: the start fails naming the file, and the root file keeps its bytes, owner and mode."""
    uid, gid = ids
    target = world_dir / "root-secret"
    target.write_bytes(SECRET)
    target.chmod(0o600)
    config = write_config(world_dir, daemon={"user": USER, "group": GROUP, "pidfile": "run/nio-logd.pid"})
    logs = world_dir / "logs"
    logs.mkdir()
    os.chown(logs, uid, gid)  # handed over by an earlier start
    link = logs / ("messages.log" if which == "messages" else "nio-logd.events.log")
    link.symlink_to(target)
    os.lchown(link, uid, gid)
    pidfile = world_dir / "run" / "nio-logd.pid"
    try:
        code, err = run_cli(config, command, timeout=15)
    finally:
        if pidfile.exists() and pidfile.read_text().strip().isdigit():
            killer.append(int(pidfile.read_text()))
    st = target.stat()
    assert target.read_bytes() == SECRET, "the root file was changed through the link"
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), "the root file was handed over"
    assert code is not None and code != 0, f"the daemon started through a symlinked {which} file: {err}"
    assert str(link) in err and "is a symbolic link" in err, err
    assert link.is_symlink() and os.readlink(link) == str(target)


@pytest.mark.parametrize(("which", "linked"), [("messages", False), ("rejects", False), ("messages", True)])
def test_log_path_fifo_is_refused_at_start(tmp_path: Path, which: str, linked: bool) -> None:
    """A FIFO at a log path (or a link to one) stops the start at once with a clear message; it
    used to block in open(2) for ever."""
    config = write_config(tmp_path)
    (tmp_path / "logs").mkdir()
    path = tmp_path / "logs" / f"{which}.log"
    fifo = tmp_path / "a-fifo" if linked else path
    os.mkfifo(fifo)
    if linked:
        path.symlink_to(fifo)
    code, err = run_cli(config, "run", timeout=20)
    assert code is not None, f"the daemon blocked opening the FIFO: {err}"
    assert code == 69, err
    if linked:  # refused as a link, or (while config resolves links) as the FIFO it names
        assert f"{path}: is a symbolic link" in err or f"{fifo}: is a FIFO" in err, err
    else:
        assert f"{fifo}: is a FIFO" in err, err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_hard_linked_log_file_is_refused(tmp_path: Path) -> None:
    """messages.log as a second hard link to another file: refused at start, the file untouched."""
    config = write_config(tmp_path)
    (tmp_path / "logs").mkdir()
    target = tmp_path / "someone-elses"
    target.write_bytes(SECRET)
    os.link(target, tmp_path / "logs" / "messages.log")
    code, err = run_cli(config, "run", timeout=20)
    assert code == 69, err
    assert f"{tmp_path / 'logs' / 'messages.log'}: has 2 hard links" in err, err
    assert target.read_bytes() == SECRET


@needs_root
@pytest.mark.root
def test_existing_log_file_is_not_chowned(world_dir: Path, ids: tuple[int, int], daemon_factory: Any) -> None:
    """A messages.log that exists before the start (root's, 0644) is written but stays root's 0644;
    the rejects log the daemon creates in this start is handed to the daemon user."""
    uid, gid = ids
    config = write_config(world_dir, daemon={"user": USER, "group": GROUP})
    logs = world_dir / "logs"
    logs.mkdir(mode=0o755)
    messages = logs / "messages.log"
    messages.write_bytes(json.dumps({"send_msg": "from before"}).encode() + b"\n")
    messages.chmod(0o644)
    d: DaemonProcess = daemon_factory(config)
    st = messages.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644), "an existing file was handed over"
    rst = d.rejects.stat()
    assert (rst.st_uid, rst.st_gid, stat.S_IMODE(rst.st_mode)) == (uid, gid, 0o640)
    warned = d.event("log_file_not_handed_over")
    assert warned is not None and warned["path"] == str(messages), d.stderr_lines
    with socket.create_connection(d.tcp, timeout=10) as s:
        s.sendall(record(msg="as nobody") + b"\n")
    wait_for(lambda: len(read_lines(messages, writing=True)) == 2)
    assert d.stop() == 0
    assert msgs(messages) == ["from before", "as nobody"]


# -- finding 5: a FIFO at the path plus SIGHUP --------------------------------------------------------
def test_fifo_at_log_path_plus_sighup_does_not_hang(tmp_path: Path, daemon_factory: Any) -> None:
    """messages.log renamed away and replaced by a FIFO, then SIGHUP: the FIFO is refused, records go
    on being acked into the old file, and SIGTERM ends the daemon promptly with exit 0."""
    config = write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}])
    d: DaemonProcess = daemon_factory(config)
    first = exchange(d.tcp, [record(msg=f"before-{i}") for i in range(10)])
    assert [a["ok"] for a in first] == [True] * 10
    old = d.messages.with_name("messages.log.1")
    d.messages.rename(old)
    os.mkfifo(d.messages)
    d.signal(signal.SIGHUP)
    refused = wait_for(lambda: d.event("log_file_refused"), 10)
    assert refused["path"] == str(d.messages) and "FIFO" in refused["reason"], refused
    # Logged right after log_file_refused, by the same thread: waited for, not raced.
    wait_for(lambda: any(ev.get("path") == str(d.messages) for ev in events_named(d, "reopen_failed")), 10)
    second = exchange(d.tcp, [record(msg=f"after-{i}") for i in range(10)], timeout=15)
    assert [a["ok"] for a in second] == [True] * 10, "records were not acked after the SIGHUP"
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    code = d.proc.wait(15)
    took = time.monotonic() - t0
    print(f"\n[fifo + SIGHUP] acked={len(first) + len(second)} exit={code} sigterm_to_exit={took:.2f} s")
    assert code == 0
    assert msgs(old) == [f"before-{i}" for i in range(10)] + [f"after-{i}" for i in range(10)]
    assert stat.S_ISFIFO(d.messages.lstat().st_mode)
    # The drain never accepts on a closed listener (on 061c035: thousands of "Bad file descriptor").
    d._reader.join(5)
    assert not events_named(d, "accept_failed"), events_named(d, "accept_failed")[:3]


# -- finding 6: a full rejects disk -------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if not is_root():
        pytest.skip("mounting a size-limited tmpfs needs root")
    mountpoint = tmp_path / "rejects-disk"
    try:
        mount_tmpfs(mountpoint, "1m")
    except Exception as exc:  # noqa: BLE001 - no tmpfs here: skip, saying why
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)  # runs after daemon_factory killed the daemon


@needs_root
@pytest.mark.root
def test_full_rejects_disk_does_not_stop_messages(tmp_path: Path, small_disk: Path, daemon_factory: Any) -> None:
    """rejects.log on a 1 MiB tmpfs with 32 KiB left, messages.log elsewhere: a stream of good and
    bad records gets every answer, every good record is written, the rejects that fit are written as
    whole lines and the rest are counted as lost."""
    config = write_config(
        tmp_path,
        listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}],
        log={"path": "logs/messages.log", "rejects_path": "rejects-disk/rejects.log"},
        metrics={"address": "tcp://127.0.0.1:0"},
    )
    d: DaemonProcess = daemon_factory(config)
    mx = metrics_address(d)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        f.truncate(f.tell() - 32768 if f.tell() > 32768 else 0)
    good, bad = 3000, 1000
    lines = []
    for i in range(good + bad):
        if i % 4 == 3:
            bad_record = {"send_user": "", "send_time": "never", "send_msg": f"bad-{i} " + "b" * 600}
            lines.append(json.dumps(bad_record).encode())
        else:
            lines.append(record(msg=f"good-{i}"))
    answers = exchange(d.tcp, lines, timeout=30)
    assert len(answers) == good + bad, f"only {len(answers)} of {good + bad} answers: the rejects disk held them"
    assert sum(a["ok"] for a in answers) == good
    samples = scrape(mx)
    lost = metric(samples, "nio_logd_rejects_lost_total")
    written_rejects = metric(samples, "nio_logd_rejects_written_total")
    # Reject lines a per-connection rate left out (counted, summed up in one line), if the
    # daemon has that limit; they are neither written nor lost.
    suppressed = samples.get("nio_logd_rejects_suppressed_total", {}).get((), 0.0)
    event = wait_for(lambda: d.event("rejects_not_written"), 10)
    assert d.stop(timeout=20) == 0
    written = msgs(d.messages)
    lines_there = read_lines(d.rejects)  # fails on a partial line
    rejects = [r for r in lines_there if r["event"] == "rejected"]
    print(
        f"\n[full rejects disk] good={good} acked={sum(a['ok'] for a in answers)} bad={bad} "
        f"rejects_written={len(rejects)} rejects_lost={lost:.0f} suppressed={suppressed:.0f} "
        f"event_records={event['records']}"
    )
    assert sorted(written) == sorted(f"good-{i}" for i in range(good + bad) if i % 4 != 3)
    assert 0 < len(rejects) < bad, "the rejects should be partly written"
    assert len(rejects) == written_rejects
    assert lost > 0 and len(rejects) + lost + suppressed == bad
    assert {r["event"] for r in lines_there} <= {"rejected", "rejects_suppressed"}


# -- finding 9: the log folder deleted while running --------------------------------------------------
def test_deleted_log_folder_is_recreated(tmp_path: Path, daemon_factory: Any) -> None:
    """rm -rf of the logs folder under a running daemon: the records acked afterwards are in a
    recreated messages.log (and a refused one in a recreated rejects.log), with a warning event."""
    config = write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}])
    d: DaemonProcess = daemon_factory(config)
    first = exchange(d.tcp, [record(msg=f"before-{i}") for i in range(10)])
    assert all(a["ok"] for a in first)
    shutil.rmtree(d.messages.parent)
    second = exchange(d.tcp, [record(msg=f"after-{i}") for i in range(10)] + [b'{"send_user": 1}'])
    assert [a["ok"] for a in second] == [True] * 10 + [False]
    assert d.messages.exists(), "acked records went to a deleted file"
    assert msgs(d.messages) == [f"after-{i}" for i in range(10)]
    wait_for(lambda: len(read_lines(d.rejects, writing=True)) == 1, 10)
    deleted = {ev["path"] for ev in events_named(d, "log_file_deleted")}
    assert deleted == {str(d.messages), str(d.rejects)}
    assert d.stop() == 0
    assert msgs(d.messages) == [f"after-{i}" for i in range(10)]


# -- part of finding 3: the journal's bound -----------------------------------------------------------
def test_journal_holds_at_most_its_limit() -> None:
    """One giant chunk keeps only its last ``limit`` bytes (offsets adjusted), and no reference to
    the giant buffer; small chunks after it push the oldest bytes out; the bytes kept are the right
    ones at the right offsets; its memory (the ring) stays within the limit."""
    j = WriteJournal(limit=1000)
    giant = bytes(range(256)) * 40  # 10,240 bytes written at offset 500
    j.add(500, giant)
    assert j.nbytes == len(j.buf) == 1000
    assert j.buf is not giant
    assert (j.start, j.end) == (500 + len(giant) - 1000, 500 + len(giant))
    assert j.slice(j.start, j.end) == giant[-1000:]
    written = giant
    for i in range(40):
        j.add(j.end, bytes([i]) * (50 + 10 * i))
        written += bytes([i]) * (50 + 10 * i)
        assert j.nbytes == j.end - j.start <= 1000
        assert len(j.buf) <= 1000
        assert j.end == 500 + len(written)
        assert j.slice(j.start, j.end) == written[-j.nbytes :]
        assert j.slice(j.end - 100, j.end) == written[-100:]
    assert j.nbytes == 1000
    j.add(j.end + 5, b"x" * 3000)  # a gap: starts afresh, still bounded
    assert j.nbytes == 1000 and j.slice(j.start, j.end) == b"x" * 1000


# -- finding 5: a stuck writer shows in /healthz ------------------------------------------------------
@pytest.fixture
def freezable_disk(tmp_path: Path) -> Iterator[Path]:
    if not is_root():
        pytest.skip("needs root: mounts a loop device and freezes it with fsfreeze")
    if not have_tools("mkfs.ext4", "mount", "umount", "fsfreeze"):
        pytest.skip("needs mkfs.ext4, mount and fsfreeze")
    mountpoint = tmp_path / "disk"
    try:
        mount_loop_ext4(tmp_path / "disk.img", mountpoint, 32)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot loop-mount an ext4 image here: {exc}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)  # thaws first; runs after daemon_factory killed the daemon


@needs_root
@pytest.mark.root
@pytest.mark.slow
def test_stuck_writer_makes_health_fail(freezable_disk: Path, daemon_factory: Any) -> None:
    """SIGHUP after a rename on a frozen filesystem: the writer blocks creating the new file with
    nothing queued. /healthz must say so (503), and the daemon recovers after the thaw."""
    config = write_config(
        freezable_disk.parent,
        listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}],
        log={"path": "disk/logs/messages.log", "rejects_path": "disk/logs/rejects.log"},
        metrics={"address": "tcp://127.0.0.1:0", "health_stall_seconds": 1.0},
    )
    d: DaemonProcess = daemon_factory(config)
    mx = metrics_address(d)
    assert all(a["ok"] for a in exchange(d.tcp, [record(msg="before")]))
    d.messages.rename(d.messages.with_name("messages.log.1"))
    subprocess.run(["fsfreeze", "-f", str(freezable_disk)], check=True, timeout=60)
    try:
        d.signal(signal.SIGHUP)

        def unhealthy() -> tuple[int, dict[str, Any]] | None:
            answer = healthz(mx)
            return answer if answer[0] == 503 else None

        status, body = wait_for(unhealthy, 15)
        assert any("no progress" in p for p in body["problems"]), body
        assert body["queue_bytes"] == 0, body  # nothing queued: only the stuck open shows it
    finally:
        subprocess.run(["fsfreeze", "-u", str(freezable_disk)], check=False, timeout=60)
    wait_for(lambda: any(ev.get("path") == str(d.messages) for ev in events_named(d, "reopened")), 15)
    assert all(a["ok"] for a in exchange(d.tcp, [record(msg="after")]))
    wait_for(lambda: healthz(mx)[0] == 200, 15)
    assert d.stop() == 0
    assert msgs(d.messages) == ["after"]
    assert status == 503


def test_files_the_daemon_creates_get_file_mode_whatever_the_umask(tmp_path: Path) -> None:
    """Started under umask 0077 (the shipped units' UMask=), the daemon still creates its logs
    with [log] file_mode, as logrotate creates the next ones."""
    config = write_config(tmp_path, log={"file_mode": "0640"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "nio_logd", "run", "--config", str(config)],
        stderr=subprocess.DEVNULL,
        umask=0o077,
    )
    try:
        wait_for((tmp_path / "logs" / "rejects.log").exists, 20)
        for name in ("messages.log", "rejects.log"):
            assert stat.S_IMODE((tmp_path / "logs" / name).stat().st_mode) == 0o640, name
    finally:
        proc.terminate()
        proc.wait(30)
