"""``nio-logd check-config`` is a pre-flight check: what ``run`` would refuse, it refuses first, with
exit 78 and one line per problem (real files, real users, real TLS files, the real CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, write_config


def check(config: Path, *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def run_briefly(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", "run", "--config", str(config)], capture_output=True, text=True, timeout=60
    )


def _lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The problems (a warning about where this interpreter lives is not one)."""
    return [line for line in result.stderr.splitlines() if line and ": warning: " not in line]


def test_a_good_config_is_ok(tmp_path: Path) -> None:
    result = check(write_config(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().endswith(": OK")


def test_every_problem_is_named_on_its_own_line_with_exit_78(tmp_path: Path) -> None:
    """A missing TLS certificate, an unknown user and a FIFO where the messages log goes: three
    lines, exit 78, nothing printed on stdout (no effective settings for a config that cannot run)."""
    (tmp_path / "logs").mkdir()
    os.mkfifo(tmp_path / "logs" / "messages.log")
    listener = {"address": f"tcp://127.0.0.1:{free_port()}", "tls": {"cert": "missing.pem", "key": "missing.key"}}
    cfg = write_config(tmp_path, listeners=[listener], daemon={"user": "no-such-user-nio"})
    result = check(cfg)
    assert result.returncode == 78, result.stderr
    assert result.stdout == ""
    lines = _lines(result)
    assert len(lines) == 3, lines
    assert "[daemon] user: no such user 'no-such-user-nio'" in lines[0]
    assert "TLS cert file" in lines[1] and "missing.pem" in lines[1] and "No such file" in lines[1]
    assert "messages log" in lines[2] and "a FIFO" in lines[2]
    assert all(line.startswith("nio-logd check-config: ") for line in lines)
    # run refuses the same config, for the first of the same reasons
    ran = run_briefly(cfg)
    assert ran.returncode == 78, ran.stderr
    assert "no such user 'no-such-user-nio'" in ran.stderr


def test_a_config_others_can_write_is_refused_as_run_refuses_it(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    cfg.chmod(0o666)
    result = check(cfg)
    assert result.returncode == 78
    assert "writable by" in result.stderr and "chmod go-w" in result.stderr


@pytest.mark.parametrize(
    ("listeners", "log", "expected"),
    [
        (["tcp://127.0.0.1:{p}", "tcp://127.0.0.1:{p}"], {}, "listeners.0 and listeners.1 are both"),
        (["unix://a.sock", "unix://./a.sock"], {}, "listeners.0 and listeners.1 are both"),
        (["tcp://127.0.0.1:{p}"], {"path": "x.log", "rejects_path": "./x.log"}, "are the same file"),
    ],
    ids=["same-tcp-address", "same-unix-path", "path-is-rejects-path"],
)
def test_combinations_that_cannot_work_are_config_errors(
    tmp_path: Path, listeners: list[str], log: dict[str, str], expected: str
) -> None:
    port = free_port()
    cfg = write_config(tmp_path, listeners=[{"address": a.format(p=port)} for a in listeners], log=log)
    for result in (check(cfg), run_briefly(cfg)):
        assert result.returncode == 78, result.stderr
        assert expected in result.stderr, result.stderr
        assert "(top level)" not in result.stderr and "Value error" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr  # said once


def test_two_listeners_on_port_0_are_not_a_clash(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, listeners=[{"address": "tcp://127.0.0.1:0"}, {"address": "tcp://127.0.0.1:0"}])
    assert check(cfg).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts a read-only tmpfs")
def test_a_log_folder_the_daemon_cannot_create_is_named(tmp_path: Path) -> None:
    """The log path is under a read-only file system (a tmpfs mounted ro): check-config names the
    folder where the log's folder would have to be created, and run fails to start."""
    locked = tmp_path / "locked"
    locked.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)], check=True, timeout=30)
    try:
        cfg = write_config(tmp_path, log={"path": "locked/sub/messages.log", "rejects_path": "rejects.log"})
        result = check(cfg)
        assert result.returncode == 78, result.stderr
        assert f"{locked} (where its folder would be created) is not writable by root" in result.stderr, result.stderr
        ran = run_briefly(cfg)
        assert ran.returncode != 0 and "messages" in ran.stderr.lower(), ran.stderr
    finally:
        subprocess.run(["umount", "-l", str(locked)], check=False, timeout=30)


def test_an_interpreter_under_a_home_folder_is_warned_about_for_the_units(tmp_path: Path) -> None:
    """The shipped units have ProtectHome=yes: check-config warns (exit 0) when it runs from a venv
    whose interpreter or package lives under /root or /home, and names the fix; else no warning."""
    result = check(write_config(tmp_path))
    assert result.returncode == 0, result.stderr
    real = [Path(sys.executable).resolve(), Path(__file__).resolve().parents[1]]
    homes = (Path("/root"), Path("/home"), Path("/run/user"))
    hidden = sys.prefix != sys.base_prefix and any(p.is_relative_to(home) for p in real for home in homes)
    if hidden:
        assert "warning:" in result.stderr and "ProtectHome=yes" in result.stderr, result.stderr
        assert "/usr/bin/python3 -m venv" in result.stderr
    else:
        assert "warning:" not in result.stderr, result.stderr
