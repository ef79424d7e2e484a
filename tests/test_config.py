"""Configuration: validation at load, clear errors naming file and key, the lookup order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from nio_logd.config import Settings, find_config, load_file, load_settings, parse_address
from nio_logd.errors import ConfigError


def nio(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_example_config_is_valid_and_equals_the_defaults() -> None:
    example = load_file(REPO / "config" / "nio-logd.toml")
    defaults = Settings()
    assert example.model_dump(exclude={"base_dir", "source"}) == defaults.model_dump(exclude={"base_dir", "source"})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[log]\nbogus = 1\n", "log.bogus: unknown key"),
        ("[nope]\nx = 1\n", "nope: unknown key"),
        ('[log]\ndurability = "sometimes"\n', "log.durability"),
        ('[limits]\nmax_connections = "many"\n', "limits.max_connections"),
        ("[limits]\nidle_timeout = -1\n", "limits.idle_timeout"),
        ('[[listeners]]\naddress = "http://x:1"\n', "listeners.0.address"),
        ('[[listeners]]\naddress = "tcp://127.0.0.1:99999"\n', "port must be"),
        ('[[listeners]]\naddress = "tcp://::1:80"\n', "IPv6 addresses are written"),
        ('[[listeners]]\nack = "yes"\n', "listeners.0.ack"),
        ('[log]\nfile_mode = "rw"\n', "log.file_mode"),
        ("[log\n", "invalid TOML"),
        ("[log]\npath = 1979-05-27\n", "log.path"),
        ('base_dir = "/"\n', "base_dir: unknown key"),
    ],
)
def test_bad_config_names_file_key_and_problem(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_file(path)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_not_utf8_config(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_file(path)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "n.toml"
    path.write_text('[log]\npath = "x/m.log"\n')
    s = load_file(path)
    assert s.resolve(s.log.path) == tmp_path / "etc" / "x" / "m.log"


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_cfg = tmp_path / "env.toml"
    env_cfg.write_text("")
    monkeypatch.setenv("NIO_LOGD_CONFIG", str(env_cfg))
    assert find_config("/explicit.toml") == Path("/explicit.toml")
    assert find_config(None) == env_cfg
    monkeypatch.delenv("NIO_LOGD_CONFIG")
    monkeypatch.chdir(tmp_path)
    if not Path("/etc/nio-logd/nio-logd.toml").exists():
        s = load_settings(None)
        assert s.source == "built-in defaults"
        assert s.resolve(s.log.path) == tmp_path / "logs" / "messages.log"
        assert s.listeners[0].address == "tcp://127.0.0.1:8888"


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port"),
    [
        ("tcp://127.0.0.1:1", "tcp", "127.0.0.1", 1),
        ("tcp://[::1]:8888", "tcp", "::1", 8888),
        ("tcp://localhost:0", "tcp", "localhost", 0),
    ],
)
def test_parse_tcp_address(text: str, scheme: str, host: str, port: int) -> None:
    a = parse_address(text)
    assert (a.scheme, a.host, a.port) == (scheme, host, port)
    assert str(a) == text


def test_check_config_cli_prints_effective_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[log]\ndurability = "fsync"\n')
    out = nio("check-config", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert '"durability": "fsync"' in out.stdout
    assert "OK" in out.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[log]\nbogus = 1\n", "log.bogus: unknown key"),
        ('[limits]\nmax_record_bytes = "big"\n', "limits.max_record_bytes"),
        ('[[listeners]]\naddress = "tcp://nowhere"\n', "listeners.0.address"),
    ],
)
def test_run_with_bad_config_exits_non_zero_with_one_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    out = nio("run", "--config", str(path))
    assert out.returncode == 78
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    out = nio("run", "--config", str(tmp_path / "absent.toml"))
    assert out.returncode == 78
    assert "cannot read config file" in out.stderr and "absent.toml" in out.stderr


def test_unwritable_log_folder_stops_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    path = tmp_path / "c.toml"
    path.write_text(f'[[listeners]]\naddress = "tcp://127.0.0.1:0"\n[log]\npath = "{blocker}/sub/m.log"\n')
    out = nio("run", "--config", str(path))
    assert out.returncode == 69
    assert "cannot open log file" in out.stderr and "Traceback" not in out.stderr


def test_busy_port_stops_the_start(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(f'[[listeners]]\naddress = "tcp://127.0.0.1:{port}"\n')
        out = nio("run", "--config", str(path))
    assert out.returncode == 69
    assert f"cannot listen on tcp://127.0.0.1:{port}" in out.stderr
    assert "Address already in use" in out.stderr
