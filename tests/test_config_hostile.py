"""Hostile config files: each is refused with one line and exit 78, never a traceback or a hang.

Both `check-config` and `run` are real subprocesses with a timeout: a hang fails the test instead
of stalling the suite, and a crash shows up as a traceback on stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TIMEOUT = 30


def nio(command: str, config: Path) -> subprocess.CompletedProcess[str]:
    """`python3 -m nio_logd COMMAND --config CONFIG`; a hang is killed and reported as such."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nio_logd", command, "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=config.parent if config.parent.is_dir() else None,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        pytest.fail(f"nio-logd {command} --config {config} still running after {TIMEOUT} s (hangs)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_refused(config: Path, problem: str) -> None:
    """Both commands exit 78 with one stderr line naming the file and ``problem``."""
    for command in ("check-config", "run"):
        result = nio(command, config)
        lines = result.stderr.splitlines()
        assert "Traceback" not in result.stderr, f"{command}: {result.stderr[-2000:]}"
        assert result.returncode == 78, f"{command}: exit {result.returncode}: {result.stderr[-2000:]}"
        assert len(lines) == 1, f"{command}: {lines}"
        assert str(config) in lines[0], f"{command}: {lines[0]}"
        assert problem in lines[0], f"{command}: {lines[0]}"


def test_config_deeply_nested_toml(tmp_path: Path) -> None:
    """An inline array nested 100,000 deep: tomllib recurses per level."""
    config = tmp_path / "nested.toml"
    depth = 100_000
    config.write_text("x = " + "[" * depth + "]" * depth + "\n")
    assert_refused(config, "nested too deeply")


def test_config_nested_within_tomllib_limits(tmp_path: Path) -> None:
    """Nesting tomllib still parses but the JSON validation cannot take: refused the same way."""
    config = tmp_path / "arrays.toml"
    depth = 300  # below tomllib's recursion limit, above pydantic's JSON parser's
    config.write_text("[log]\npath = " + "[" * depth + "]" * depth + "\n")
    assert_refused(config, "log.path: nested too deeply")


def test_config_dev_zero() -> None:
    """/dev/zero: endless input, a character device, not a config file."""
    assert_refused(Path("/dev/zero"), "not a regular file (a character device)")


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fifo.toml"
    os.mkfifo(path, 0o600)
    yield path
    path.unlink()


def test_config_fifo(fifo: Path) -> None:
    """A FIFO nobody writes to: opening it for reading would wait for a writer for ever."""
    assert_refused(fifo, "not a regular file (a FIFO)")


def test_config_huge_file(tmp_path: Path) -> None:
    """A 64 MiB file (a valid comment) is over the size cap: refused before it is read."""
    config = tmp_path / "huge.toml"
    with config.open("wb") as f:
        f.write(b"#")
        f.truncate(64 << 20)  # sparse: NUL bytes, cheap on disk; the cap must refuse it first
    assert_refused(config, "larger than the 1 MiB limit")


def test_config_just_under_the_cap_is_read(tmp_path: Path) -> None:
    """A config of comments just under 1 MiB is still a valid config (the cap is not too tight)."""
    config = tmp_path / "big.toml"
    line = "# " + "x" * 1021 + "\n"  # 1 KiB per line
    config.write_text(line * 1023)
    result = nio("check-config", config)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"{config}: OK"


def test_config_directory(tmp_path: Path) -> None:
    """A folder given as the config file."""
    folder = tmp_path / "conf.d"
    folder.mkdir()
    assert_refused(folder, "not a regular file (a directory)")
